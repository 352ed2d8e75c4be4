//! Forward-auth for gateways that ask an external URL about every request:
//! `/v1/forward-auth/{gateway}` with `gateway` one of `nginx`, `traefik`, `envoy`, any method.
//!
//! The customer, meter (default `api_requests`) and quantity (default 1) come from the path,
//! `/v1/forward-auth/nginx/{customer}/{meter}/{quantity}` (each part optional from the end),
//! else from the query string (`?customer=&meter=&quantity=`), else from the
//! `X-Tally-Customer`, `X-Tally-Meter` and `X-Tally-Quantity` headers. What the URL gives wins:
//! it is the gateway's configuration, while headers may come from the client.
//! A gateway that passes headers must set or remove every `X-Tally-*` header itself (the
//! examples in `deploy/` do). Envoy's HTTP ext_authz appends the original request path (the
//! client's) to the URL, so with Envoy they come from headers only. Every call is a request
//! passing through: it counts against the plan's request rate even with quantity 0.
//!
//! | decision | nginx `auth_request` | Traefik ForwardAuth, Envoy ext_authz |
//! |---|---|---|
//! | allow, warn | 200 | 200 |
//! | block | 403 with `Tally-Decision: block` (nginx only understands 2xx, 401 and 403; the snippet in `deploy/nginx/` turns it into 429) | 429, `application/problem+json` |
//! | no customer | 401 | 401 |
//!
//! Every answer carries `RateLimit-Policy`, `RateLimit`, `Tally-Quota-State`, `Tally-Decision`
//! and, when blocked, `Retry-After`, for the gateway to pass on.

use axum::extract::{RawPathParams, State as AxState};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tally_http::problem::ApiError;
use tally_schemas::Decision;

use crate::http::{CheckRequest, EnforcerHttp, answer, blocked, quota_headers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gateway {
    Nginx,
    Traefik,
    Envoy,
}

impl Gateway {
    fn parse(s: &str) -> Option<Gateway> {
        match s {
            "nginx" => Some(Gateway::Nginx),
            "traefik" => Some(Gateway::Traefik),
            "envoy" => Some(Gateway::Envoy),
            _ => None,
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Gateway::Nginx => "nginx",
            Gateway::Traefik => "traefik",
            Gateway::Envoy => "envoy_http",
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Forward-auth check for gateways (any method; Envoy appends the original path).
#[utoipa::path(
    get,
    path = "/v1/forward-auth/{gateway}",
    tag = "enforcer",
    params(
        ("gateway" = String, Path, description = "nginx, traefik or envoy"),
        ("X-Tally-Customer" = Option<String>, Header, description = "The customer (or the first path segment after the gateway, except for envoy)"),
        ("X-Tally-Meter" = Option<String>, Header, description = "Default api_requests"),
        ("X-Tally-Quantity" = Option<u64>, Header, description = "Default 1"),
    ),
    responses(
        (status = 200, description = "Allowed"),
        (status = 400, description = "Invalid meter or quantity", body = tally_http::problem::Problem),
        (status = 401, description = "No customer given", body = tally_http::problem::Problem),
        (status = 403, description = "Blocked (nginx: `Tally-Decision: block`)"),
        (status = 404, description = "Unknown gateway or meter", body = tally_http::problem::Problem),
        (status = 429, description = "Blocked (Traefik, Envoy)", body = tally_http::problem::Problem),
    )
)]
pub async fn handle(
    AxState(s): AxState<EnforcerHttp>,
    params: RawPathParams,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params: Vec<(&str, &str)> = params.iter().collect();
    let gateway_name = params.first().map(|(_, v)| *v).unwrap_or("");
    let gateway = Gateway::parse(gateway_name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_gateway",
            "use /v1/forward-auth/nginx, traefik or envoy",
        )
    })?;
    let rest = params.get(1).map(|(_, v)| *v).unwrap_or("");
    // Positional: an empty part (an unset gateway variable) is absent, not skipped.
    let mut segments = rest.strip_prefix('/').unwrap_or(rest).split('/');
    // Envoy's URL ends with the client's path and query: never read.
    let query: Vec<(String, String)> = match (gateway, uri.query()) {
        (Gateway::Envoy, _) | (_, None) => Vec::new(),
        (_, Some(q)) => form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    };
    let from_query = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let (path_customer, path_meter, path_quantity) = if gateway == Gateway::Envoy {
        (None, None, None)
    } else {
        let mut next = || segments.next().filter(|p| !p.is_empty()).map(str::to_owned);
        let (c, m, q) = (next(), next(), next());
        (
            c.or_else(|| from_query("customer")),
            m.or_else(|| from_query("meter")),
            q.or_else(|| from_query("quantity")),
        )
    };
    let customer = path_customer.or_else(|| header(&headers, "x-tally-customer"));
    let Some(customer) = customer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_customer",
            "no customer: send X-Tally-Customer",
        ));
    };
    let meter = path_meter
        .or_else(|| header(&headers, "x-tally-meter"))
        .unwrap_or_else(|| "api_requests".to_owned());
    let quantity = match path_quantity.or_else(|| header(&headers, "x-tally-quantity")) {
        None => None,
        Some(q) => Some(q.parse::<u64>().map_err(|_| {
            ApiError::bad_request("invalid_request", "the quantity must be a whole number")
        })?),
    };
    let req = CheckRequest {
        customer: Some(customer),
        meter: Some(meter),
        quantity,
    };
    let (reply, a) = answer(&s.state, req, gateway.protocol())?;
    let headers = quota_headers(&a);
    Ok(match (a.verdict.decision, gateway) {
        (Decision::Block, Gateway::Nginx) => (StatusCode::FORBIDDEN, headers).into_response(),
        (Decision::Block, _) => blocked(&reply, headers),
        _ => (StatusCode::OK, headers).into_response(),
    })
}
