//! HTTP metrics of every Tally listener (labelled by matched route, never by raw path) and the
//! `/metrics` endpoint that renders the process-wide registry.

use std::sync::LazyLock;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, TextEncoder, register_histogram_vec,
    register_int_counter_vec,
};

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

pub static AUTH_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_auth_refused_total",
            "Requests refused by the access layer, by reason (missing, invalid, forbidden, unavailable)"
        ),
        &["reason"]
    )
    .expect("metric registers once")
});

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
