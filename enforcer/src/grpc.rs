//! Envoy's gRPC protocols, answering from the same decision code as `/v1/check`:
//!
//! - `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: each descriptor with a
//!   `customer` entry (and optionally `meter`, default `api_requests`) is one check; its
//!   `hits_addend` (else the request's, else 1) is the quantity. Descriptors without a
//!   `customer` entry are not Tally's and answer `OK`. The overall code is `OVER_LIMIT` when any
//!   descriptor is blocked. The quota headers of the first Tally descriptor are returned in
//!   `response_headers_to_add`.
//! - `envoy.service.auth.v3.Authorization/Check` (ext_authz): the customer, meter and quantity
//!   come from the route's `context_extensions` (`tally_customer`, `tally_meter`,
//!   `tally_quantity`: Envoy's configuration, which wins), else the `x-tally-customer`,
//!   `x-tally-meter` and `x-tally-quantity` request headers. Every check counts against the
//!   plan's request rate, even with quantity 0. Allowed: status OK
//!   with the quota headers for the response. Blocked: `PERMISSION_DENIED` with a 429 denied
//!   response (problem JSON body, `Retry-After`). No customer: `UNAUTHENTICATED` with 401.
//!
//! Both are served on Tally's public listener over HTTP/2 (h2c).

use std::sync::Arc;

use axum::http::HeaderMap;
use tally_schemas::Decision;
use tonic::{Request, Response, Status};

use crate::http::{CheckRequest, answer, quota_headers};
use crate::state::{Answer, State};

#[allow(clippy::all, missing_docs)]
pub mod rls {
    tonic::include_proto!("envoy.service.ratelimit.v3");
}

#[allow(clippy::all, missing_docs)]
pub mod authz {
    tonic::include_proto!("envoy.service.auth.v3");
}

use authz::authorization_server::{Authorization, AuthorizationServer};
use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit};
use rls::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};

/// The gRPC services as routes of Tally's public router.
pub fn router(state: Arc<State>) -> axum::Router {
    tonic::service::Routes::new(RateLimitServiceServer::new(RateLimitGrpc {
        state: state.clone(),
    }))
    .add_service(AuthorizationServer::new(AuthzGrpc { state }))
    .into_axum_router()
}

fn header_pairs(h: &HeaderMap) -> impl Iterator<Item = (String, String)> + '_ {
    h.iter().filter_map(|(k, v)| {
        v.to_str()
            .ok()
            .map(|v| (k.as_str().to_owned(), v.to_owned()))
    })
}

pub struct RateLimitGrpc {
    state: Arc<State>,
}

fn descriptor_status(a: &Answer, now_ms: i64) -> DescriptorStatus {
    let blocked = a.verdict.decision == Decision::Block;
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let (limit, remaining, reset_ms) = match a.rate.filter(|_| a.rate_limited()) {
        Some(r) => (
            Some(RateLimit {
                name: "rate".into(),
                requests_per_unit: r.per_second,
                unit: Unit::Second as i32,
            }),
            0,
            r.retry_after.map_or(0, |d| d.as_millis() as i64),
        ),
        None => (
            a.limit.finite().map(|l| RateLimit {
                name: "quota".into(),
                requests_per_unit: clamp(l),
                unit: Unit::Month as i32,
            }),
            clamp(a.verdict.remaining.unwrap_or(0)),
            a.period.end_ms - now_ms,
        ),
    };
    DescriptorStatus {
        code: if blocked { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: limit,
        limit_remaining: remaining,
        duration_until_reset: Some(prost_types::Duration {
            seconds: reset_ms.max(0) / 1000,
            nanos: ((reset_ms.max(0) % 1000) * 1_000_000) as i32,
        }),
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<rls::RateLimitRequest>,
    ) -> Result<Response<rls::RateLimitResponse>, Status> {
        let req = request.into_inner();
        let now = self.state.clock().now_ms();
        let mut out = rls::RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        };
        for d in &req.descriptors {
            let entry = |k: &str| {
                d.entries
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
            };
            let Some(customer) = entry("customer") else {
                out.statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                });
                continue;
            };
            let quantity = d
                .hits_addend
                .or((req.hits_addend > 0).then_some(u64::from(req.hits_addend)))
                .unwrap_or(1);
            let check = CheckRequest {
                customer: Some(customer),
                meter: Some(entry("meter").unwrap_or_else(|| "api_requests".into())),
                quantity: Some(quantity),
            };
            let (_, a) = answer(&self.state, check, "envoy_rls").map_err(Status::from)?;
            let status = descriptor_status(&a, now);
            if status.code == Code::OverLimit as i32 {
                out.overall_code = Code::OverLimit as i32;
            }
            if out.response_headers_to_add.is_empty() {
                out.response_headers_to_add = header_pairs(&quota_headers(&a))
                    .map(|(key, value)| rls::HeaderValue { key, value })
                    .collect();
            }
            out.statuses.push(status);
        }
        Ok(Response::new(out))
    }
}

pub struct AuthzGrpc {
    state: Arc<State>,
}

fn options(h: &HeaderMap) -> Vec<authz::HeaderValueOption> {
    header_pairs(h)
        .map(|(key, value)| authz::HeaderValueOption {
            header: Some(authz::HeaderValue { key, value }),
            append: Some(false),
        })
        .collect()
}

fn denied(
    grpc_code: tonic::Code,
    http: i32,
    headers: Vec<authz::HeaderValueOption>,
    body: String,
) -> authz::CheckResponse {
    authz::CheckResponse {
        status: Some(authz::RpcStatus {
            code: grpc_code as i32,
            message: String::new(),
        }),
        http_response: Some(authz::check_response::HttpResponse::DeniedResponse(
            authz::DeniedHttpResponse {
                status: Some(authz::HttpStatus { code: http }),
                headers,
                body,
            },
        )),
    }
}

#[tonic::async_trait]
impl Authorization for AuthzGrpc {
    async fn check(
        &self,
        request: Request<authz::CheckRequest>,
    ) -> Result<Response<authz::CheckResponse>, Status> {
        let req = request.into_inner();
        let attrs = req.attributes.unwrap_or_default();
        let headers = attrs
            .request
            .and_then(|r| r.http)
            .map(|h| h.headers)
            .unwrap_or_default();
        let ext = &attrs.context_extensions;
        // The route's context extensions are Envoy's configuration: they win over request
        // headers, which the client may have sent.
        let pick = |header: &str, extension: &str| {
            ext.get(extension)
                .or_else(|| headers.get(header))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(customer) = pick("x-tally-customer", "tally_customer") else {
            let body =
                r#"{"code":"missing_customer","message":"no customer: send x-tally-customer"}"#;
            return Ok(Response::new(denied(
                tonic::Code::Unauthenticated,
                401,
                Vec::new(),
                body.into(),
            )));
        };
        let quantity = match pick("x-tally-quantity", "tally_quantity") {
            None => None,
            Some(q) => Some(q.parse::<u64>().map_err(|_| {
                Status::invalid_argument("x-tally-quantity must be a whole number")
            })?),
        };
        let check = CheckRequest {
            customer: Some(customer),
            meter: Some(
                pick("x-tally-meter", "tally_meter").unwrap_or_else(|| "api_requests".into()),
            ),
            quantity,
        };
        let (reply, a) = answer(&self.state, check, "envoy_ext_authz").map_err(Status::from)?;
        let h = quota_headers(&a);
        if a.verdict.decision == Decision::Block {
            let body = serde_json::to_string(&reply).unwrap_or_default();
            let mut hs = options(&h);
            hs.push(authz::HeaderValueOption {
                header: Some(authz::HeaderValue {
                    key: "content-type".into(),
                    value: "application/problem+json".into(),
                }),
                append: Some(false),
            });
            return Ok(Response::new(denied(
                tonic::Code::PermissionDenied,
                429,
                hs,
                body,
            )));
        }
        Ok(Response::new(authz::CheckResponse {
            status: Some(authz::RpcStatus {
                code: tonic::Code::Ok as i32,
                message: String::new(),
            }),
            http_response: Some(authz::check_response::HttpResponse::OkResponse(
                authz::OkHttpResponse {
                    headers: Vec::new(),
                    response_headers_to_add: options(&h),
                },
            )),
        }))
    }
}
