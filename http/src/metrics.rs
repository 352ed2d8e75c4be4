//! Request metrics of every Tally listener (labelled by matched route, never by raw path), the
//! layer that records them ([`track`]), and the `/metrics` endpoint that renders the
//! process-wide registry.

use std::sync::LazyLock;

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, TextEncoder, register_histogram_vec,
    register_int_counter_vec,
};

/// Requests by matched route, method and status. The method is one of HTTP's registered ones or
/// `other` ([`method_label`]), so invented methods cannot grow the series without bound.
pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_http_requests_total",
            "HTTP requests, by route, method and status"
        ),
        &["route", "method", "status"]
    )
    .expect("metric registers once")
});

pub static HTTP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        HistogramOpts::new(
            "tally_http_request_duration_seconds",
            "HTTP request duration, by route"
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
        ]),
        &["route"]
    )
    .expect("metric registers once")
});

/// The `method` label of a request: the standard methods by name, anything else `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Prometheus metrics (admin listener), text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "admin",
    responses((status = 200, description = "Every metric of the process", body = String, content_type = "text/plain; version=0.0.4"))
)]
pub async fn render() -> Response {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        tracing::error!(error = %e, "cannot render metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut resp = buf.into_response();
    if let Ok(v) = HeaderValue::from_str(encoder.format_type()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// Counts and times every request by route, method and status, and logs it at debug level (one
/// layer for both: the check routes answer tens of thousands of requests per second). Install
/// with `axum::middleware::from_fn(track)`.
pub async fn track(req: Request, next: Next) -> Response {
    // The matched route is an `Arc<str>` inside axum: cloned, not copied, on every request.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    let route = route.as_ref().map_or("unmatched", |m| m.as_str());
    HTTP_REQUESTS
        .with_label_values(&[route, method, resp.status().as_str()])
        .inc();
    let elapsed = started.elapsed();
    HTTP_SECONDS
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
    tracing::debug!(
        %method,
        route,
        status = resp.status().as_u16(),
        latency_us = elapsed.as_micros() as u64,
        "request"
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_label_is_other_for_invented_methods() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for name in ["FOO", "BREW", "get", "X-1"] {
            let m = Method::from_bytes(name.as_bytes()).expect("a valid token");
            assert_eq!(method_label(&m), "other", "{name}");
        }
    }
}
