//! The quota check over HTTP, and the customer (plan assignment) API.
//!
//! - `POST /v1/check` `{"customer", "meter", "quantity"}` and
//!   `GET /v1/check?customer=..&meter=..&quantity=..`: 200 with the decision, or 429 with an
//!   `application/problem+json` body carrying the same members and `Retry-After` when blocked.
//!   `quantity` (default 1) is what the caller is about to use; a check never counts usage.
//!   Every finite-limit answer carries the IETF `RateLimit-Policy` and `RateLimit` headers
//!   (draft-ietf-httpapi-ratelimit-headers: policy `quota`, `q` the limit, `w` the period in
//!   seconds, `r` the units left before the soft limit, `t` seconds to the period's end), and
//!   `Tally-Quota-State: ok|warn|over|blocked`.
//! - `PUT /v1/customers/{id}` assigns a plan, per-meter limit overrides and a period anchor;
//!   members left out keep their value, `null` clears one. `GET /v1/customers/{id}` reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use tally_backends::store::Store;
use tally_http::extract::Json as JsonBody;
use tally_http::problem::ApiError;
use tally_http::problem::Problem;
use tally_schemas::period::{parse_rfc3339, rfc3339};
use tally_schemas::{Customer, Decision, Limit, UsageState};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::metrics;
use crate::state::{Answer, CheckError, Question, State};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct EnforcerHttp {
    pub state: Arc<State>,
    pub store: Arc<dyn Store>,
}

pub fn router(s: EnforcerHttp) -> Router {
    Router::new()
        .route("/v1/check", post(post_check).get(get_check))
        .route(
            "/v1/forward-auth/{gateway}",
            any(crate::forward_auth::handle),
        )
        .route(
            "/v1/forward-auth/{gateway}/{*rest}",
            any(crate::forward_auth::handle),
        )
        .route("/v1/customers/{id}", get(get_customer).put(put_customer))
        .with_state(s)
}

/// The enforcer's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(
        post_check,
        get_check,
        get_customer,
        put_customer,
        crate::forward_auth::handle
    ),
    components(schemas(
        CheckRequest,
        CheckReply,
        CustomerUpdate,
        CustomerView,
        Decision,
        UsageState
    ))
)]
pub struct EnforcerApi;

/// A quota question as JSON or query string.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckRequest {
    /// Customer id.
    #[param(required = true)]
    #[schema(required = true)]
    pub customer: Option<String>,
    /// Meter name from the catalogue.
    #[param(required = true)]
    #[schema(required = true)]
    pub meter: Option<String>,
    /// Units the caller is about to use (default 1; a check never counts usage). JSON may give
    /// it as a string of digits.
    #[serde(default, deserialize_with = "quantity")]
    #[param(minimum = 0)]
    #[schema(minimum = 0)]
    pub quantity: Option<u64>,
}

/// `quantity` in a JSON check: a whole number, or the same written as a string; `null` means
/// the default. Read by a visitor, without buffering, since it is on the check path.
fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Quantity;
    impl<'de> serde::de::Visitor<'de> for Quantity {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("quantity must be a whole number >= 0")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse()
                .map(Some)
                .map_err(|_| E::custom("quantity must be a whole number >= 0"))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Quantity)
}

/// The decision body of `/v1/check`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckReply {
    pub decision: Decision,
    pub state: UsageState,
    pub customer: String,
    pub meter: String,
    #[schema(value_type = String)]
    pub plan: Arc<str>,
    pub quantity: u64,
    pub usage: u64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub percent: Option<f64>,
    pub threshold: Option<u32>,
    pub period_start: String,
    pub period_end: String,
    pub grace_until: Option<String>,
    /// Why a check was blocked: `quota` or `rate_limit`; absent when allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reason: Option<&'static str>,
    /// Present (true) when the enforcer answered from possibly stale state (its log is
    /// unreachable).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
}

static STATE_HEADER: HeaderName = HeaderName::from_static("tally-quota-state");
static POLICY_HEADER: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT_HEADER: HeaderName = HeaderName::from_static("ratelimit");

fn state_name(s: UsageState) -> &'static str {
    match s {
        UsageState::Ok => "ok",
        UsageState::Warn => "warn",
        UsageState::Over => "over",
        UsageState::Blocked => "blocked",
    }
}

pub(crate) fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Warn => "warn",
        Decision::Block => "block",
    }
}

/// Validates a question and asks the state. Shared by every protocol.
pub fn answer(
    state: &State,
    req: CheckRequest,
    protocol: &'static str,
) -> Result<(CheckReply, Answer), ApiError> {
    let customer = req
        .customer
        .ok_or_else(|| ApiError::bad_request("missing_parameter", "`customer` is required"))?;
    tally_schemas::event::check_customer_id(&customer)?;
    let meter = req
        .meter
        .ok_or_else(|| ApiError::bad_request("missing_parameter", "`meter` is required"))?;
    let quantity = req.quantity.unwrap_or(1);
    let a = state
        .check(Question {
            customer: &customer,
            meter: &meter,
            quantity,
            // Only the check API answers status queries; gateways ask about real requests.
            passing: protocol != "http",
        })
        .map_err(|e| match e {
            CheckError::UnknownMeter => {
                ApiError::not_found("unknown_meter", format!("no meter named `{meter}`"))
            }
            CheckError::NotReady => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    "quota state is still loading and the enforcer fails closed",
                );
                e.retry_after = Some(1);
                e
            }
        })?;
    metrics::decision(a.verdict.decision, protocol);
    let reply = CheckReply {
        decision: a.verdict.decision,
        state: a.verdict.state,
        customer,
        meter,
        plan: a.plan.clone(),
        quantity,
        usage: a.usage,
        limit: a.limit.finite(),
        remaining: a.verdict.remaining,
        percent: a.verdict.percent.map(|p| (p * 100.0).round() / 100.0),
        threshold: a.verdict.threshold,
        period_start: rfc3339(a.period.start_ms),
        period_end: rfc3339(a.period.end_ms),
        grace_until: a.verdict.grace_until_ms.map(rfc3339),
        reason: match a.verdict.decision {
            Decision::Block if a.rate_limited() => Some("rate_limit"),
            Decision::Block => Some("quota"),
            _ => None,
        },
        degraded: a.degraded,
    };
    Ok((reply, a))
}

static DECISION_HEADER: HeaderName = HeaderName::from_static("tally-decision");

/// The RateLimit, state, decision and Retry-After headers of an answer. Policies: `quota` (the
/// plan's limit over the billing period) and, when the plan has one, `rate` (requests per
/// second).
pub fn quota_headers(a: &Answer) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    write_quota_headers(a, &mut h);
    h
}

/// [`quota_headers`], added to a response's headers.
pub fn write_quota_headers(a: &Answer, h: &mut HeaderMap) {
    h.insert(
        STATE_HEADER.clone(),
        HeaderValue::from_static(state_name(a.verdict.state)),
    );
    h.insert(
        DECISION_HEADER.clone(),
        HeaderValue::from_static(decision_name(a.verdict.decision)),
    );
    let reset_secs = ((a.period.end_ms - a.now_ms).max(0) + 999) / 1000;
    // Written straight into two buffers: this runs on every check.
    let mut policy = String::with_capacity(64);
    let mut limits = String::with_capacity(64);
    if let Limit::Finite(limit) = a.limit {
        let window = ((a.period.end_ms - a.period.start_ms) / 1000).max(0) as u64;
        let r = a.verdict.remaining.unwrap_or(0);
        sf_item(&mut policy, "quota", [("q", limit), ("w", window)]);
        sf_item(&mut limits, "quota", [("r", r), ("t", reset_secs as u64)]);
    }
    if let Some(rate) = a.rate {
        let t = rate
            .retry_after
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        sf_item(
            &mut policy,
            "rate",
            [("q", u64::from(rate.per_second)), ("w", 1)],
        );
        sf_item(
            &mut limits,
            "rate",
            [("r", u64::from(rate.remaining)), ("t", t)],
        );
    }
    if !policy.is_empty() {
        if let Ok(v) = HeaderValue::try_from(policy) {
            h.insert(POLICY_HEADER.clone(), v);
        }
        if let Ok(v) = HeaderValue::try_from(limits) {
            h.insert(RATELIMIT_HEADER.clone(), v);
        }
    }
    if a.verdict.decision == Decision::Block {
        let secs = match a.rate.and_then(|r| r.retry_after) {
            Some(d) => d.as_secs() + u64::from(d.subsec_nanos() > 0),
            None => reset_secs as u64,
        };
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
}

/// Appends `"name";k=v;k=v` to a structured-field list.
fn sf_item(out: &mut String, name: &str, params: [(&str, u64); 2]) {
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push('"');
    out.push_str(name);
    out.push('"');
    let mut n = itoa::Buffer::new();
    for (k, v) in params {
        out.push(';');
        out.push_str(k);
        out.push('=');
        out.push_str(n.format(v));
    }
}

/// The `application/problem+json` reply to a blocked check, with the decision's members.
pub fn blocked(reply: &CheckReply, headers: HeaderMap) -> Response {
    let mut body = serde_json::to_value(reply).unwrap_or_default();
    if let Some(obj) = body.as_object_mut() {
        let (kind, title, detail) = if reply.reason == Some("rate_limit") {
            (
                "urn:tally:problem:rate-limited",
                "Rate limit exceeded",
                format!(
                    "customer `{}` sends more requests than its plan allows",
                    reply.customer
                ),
            )
        } else {
            (
                "urn:tally:problem:quota-exceeded",
                "Quota exceeded",
                format!(
                    "customer `{}` has used {} of {} on `{}` this period",
                    reply.customer,
                    reply.usage,
                    reply
                        .limit
                        .map_or("unlimited".to_string(), |l| l.to_string()),
                    reply.meter
                ),
            )
        };
        obj.insert("type".into(), kind.into());
        obj.insert("title".into(), title.into());
        obj.insert("status".into(), 429.into());
        obj.insert("detail".into(), detail.into());
    }
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// The reply to a check: the JSON body serialized into one pre-sized buffer (it is about 300
/// bytes) and the headers written straight into the response's own map. This runs on every
/// check, so it avoids the intermediate maps and buffers of the generic response builders.
fn respond(reply: CheckReply, a: &Answer) -> Response {
    if a.verdict.decision == Decision::Block {
        return blocked(&reply, quota_headers(a));
    }
    let mut buf = Vec::with_capacity(512);
    if let Err(e) = serde_json::to_writer(&mut buf, &reply) {
        return ApiError::unavailable(&e).into_response();
    }
    let mut resp = Response::new(Body::from(buf));
    let h = resp.headers_mut();
    h.reserve(8);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    write_quota_headers(a, h);
    resp
}

/// May the customer use `quantity` more of the meter?
///
/// 200 with the decision (allow, or warn between 80 % and the block), or 429 with the same
/// members and `Retry-After` when blocked. Finite limits carry the `RateLimit-Policy`,
/// `RateLimit` and `Tally-Quota-State` headers.
#[utoipa::path(
    post,
    path = "/v1/check",
    tag = "enforcer",
    request_body = CheckRequest,
    responses(
        (status = 200, description = "Allowed (decision allow or warn)", body = CheckReply),
        (status = 429, description = "Blocked: quota (110 %, or 100 % after the grace) or the plan's rate limit", body = CheckReply, content_type = "application/problem+json"),
        (status = 400, description = "Invalid request", body = Problem),
        (status = 404, description = "Unknown meter", body = Problem),
        (status = 503, description = "The enforcer is loading its state", body = Problem),
    )
)]
async fn post_check(
    AxState(s): AxState<EnforcerHttp>,
    JsonBody(req): JsonBody<CheckRequest>,
) -> Result<Response, ApiError> {
    let (reply, a) = answer(&s.state, req, "http")?;
    Ok(respond(reply, &a))
}

/// Reads `customer`, `meter` and `quantity` from a query string. Gateways call this on every
/// request, so the three keys are read directly rather than through serde.
pub fn parse_check_query(query: &str) -> Result<CheckRequest, ApiError> {
    let mut req = CheckRequest {
        customer: None,
        meter: None,
        quantity: None,
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "customer" => req.customer = Some(v.into_owned()),
            "meter" => req.meter = Some(v.into_owned()),
            "quantity" => {
                req.quantity = Some(v.parse().map_err(|_| {
                    ApiError::bad_request("invalid_request", "quantity must be a whole number >= 0")
                })?)
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("unknown query parameter `{other}`"),
                ));
            }
        }
    }
    Ok(req)
}

/// The same check, by query string.
#[utoipa::path(
    get,
    path = "/v1/check",
    tag = "enforcer",
    params(CheckRequest),
    responses(
        (status = 200, description = "Allowed (decision allow or warn)", body = CheckReply),
        (status = 429, description = "Blocked", body = CheckReply, content_type = "application/problem+json"),
        (status = 400, description = "Invalid request", body = Problem),
        (status = 404, description = "Unknown meter", body = Problem),
        (status = 503, description = "The enforcer is loading its state", body = Problem),
    )
)]
async fn get_check(
    AxState(s): AxState<EnforcerHttp>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let req = parse_check_query(query.as_deref().unwrap_or(""))?;
    let (reply, a) = answer(&s.state, req, "http")?;
    Ok(respond(reply, &a))
}

fn some<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Body of `PUT /v1/customers/{id}`: members left out keep their value; `null` clears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerUpdate {
    /// A plan id from the catalogue.
    #[serde(default)]
    pub plan: Option<String>,
    /// Per-meter limits replacing the plan's; replaces every override when present.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<BTreeMap<String, Limit>>)]
    pub limits: Option<Option<BTreeMap<String, Limit>>>,
    /// Billing periods start on this day and time of each month (RFC 3339).
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub period_anchor: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub stripe_customer_id: Option<Option<String>>,
    /// Normally set from Stripe's `invoice.payment_failed`; settable for manual dunning.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub payment_failed_at: Option<Option<String>>,
}

/// A customer's plan, overrides and billing period.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerView {
    pub id: String,
    /// Whether Tally has a record for this customer (otherwise it is on the default plan).
    pub known: bool,
    pub plan: String,
    /// The plan in force now (the fallback plan once a payment grace ran out).
    pub effective_plan: String,
    pub limits: BTreeMap<String, Limit>,
    pub period_anchor: Option<String>,
    pub period_start: String,
    pub period_end: String,
    pub stripe_customer_id: Option<String>,
    pub payment_failed_at: Option<String>,
    pub payment_grace_until: Option<String>,
}

fn view(state: &State, id: String, c: &Customer, known: bool) -> CustomerView {
    let now = state.clock().now_ms();
    let period = c.period_at(now);
    CustomerView {
        known,
        plan: c.plan.clone(),
        effective_plan: c.plan_at(&state.catalog(), now).0.to_owned(),
        limits: c.limit_overrides.clone(),
        period_anchor: c.period_anchor_ms.map(rfc3339),
        period_start: rfc3339(period.start_ms),
        period_end: rfc3339(period.end_ms),
        stripe_customer_id: c.stripe_customer_id.clone(),
        payment_failed_at: c.payment_failed_at_ms.map(rfc3339),
        payment_grace_until: c.payment_grace_until(&state.catalog()).map(rfc3339),
        id,
    }
}

fn time_member(name: &str, v: Option<String>) -> Result<Option<i64>, ApiError> {
    v.map(|t| {
        parse_rfc3339(&t).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_time",
                format!("`{name}` must be an RFC 3339 timestamp"),
            )
        })
    })
    .transpose()
}

/// A customer's plan, overrides and billing period (customers never seen are on the default
/// plan).
#[utoipa::path(
    get,
    path = "/v1/customers/{id}",
    tag = "customers",
    params(("id" = String, Path, description = "Customer id: 1 to 128 of A-Z a-z 0-9 . _ : @ -")),
    responses(
        (status = 200, description = "The customer", body = CustomerView),
        (status = 400, description = "Invalid customer id", body = Problem),
        (status = 503, description = "The store is unavailable", body = Problem),
    )
)]
async fn get_customer(
    AxState(s): AxState<EnforcerHttp>,
    Path(id): Path<String>,
) -> Result<Json<CustomerView>, ApiError> {
    tally_schemas::event::check_customer_id(&id)?;
    let stored = s
        .store
        .customer(&id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let known = stored.is_some();
    let c = stored.unwrap_or_else(|| Customer::new_default(&s.state.catalog()));
    Ok(Json(view(&s.state, id, &c, known)))
}

/// Assign a plan, limit overrides, a period anchor or a Stripe customer id.
#[utoipa::path(
    put,
    path = "/v1/customers/{id}",
    tag = "customers",
    params(("id" = String, Path, description = "Customer id")),
    request_body = CustomerUpdate,
    responses(
        (status = 200, description = "The customer as stored", body = CustomerView),
        (status = 400, description = "Invalid id, unknown plan or meter, invalid time", body = Problem),
        (status = 422, description = "A member of the wrong type", body = Problem),
        (status = 503, description = "The store is unavailable", body = Problem),
    )
)]
async fn put_customer(
    AxState(s): AxState<EnforcerHttp>,
    Path(id): Path<String>,
    JsonBody(u): JsonBody<CustomerUpdate>,
) -> Result<Json<CustomerView>, ApiError> {
    tally_schemas::event::check_customer_id(&id)?;
    let catalog = s.state.catalog().clone();
    let mut c = s
        .store
        .customer(&id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .unwrap_or_else(|| Customer::new_default(&catalog));
    let before = c.clone();
    if let Some(plan) = u.plan {
        if catalog.plan(&plan).is_none() {
            return Err(ApiError::bad_request(
                "unknown_plan",
                format!("no plan named `{plan}`"),
            ));
        }
        c.plan = plan;
    }
    if let Some(limits) = u.limits {
        let limits = limits.unwrap_or_default();
        if let Some(m) = limits.keys().find(|m| catalog.meter(m).is_none()) {
            return Err(ApiError::bad_request(
                "unknown_meter",
                format!("no meter named `{m}`"),
            ));
        }
        c.limit_overrides = limits;
    }
    if let Some(anchor) = u.period_anchor {
        c.period_anchor_ms = time_member("period_anchor", anchor)?;
        // An explicit anchor replaces the subscription period learnt earlier.
        c.current_period = None;
    }
    if let Some(stripe) = u.stripe_customer_id {
        c.stripe_customer_id = stripe;
    }
    if let Some(failed) = u.payment_failed_at {
        c.payment_failed_at_ms = time_member("payment_failed_at", failed)?;
    }
    c.updated_ms = s.state.clock().now_ms();
    c.note_limit_changes(&before, &catalog, c.updated_ms);
    s.store
        .put_customer(&id, &c)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    crate::update_customer(&s.state, s.store.as_ref(), &id, c.clone())
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    Ok(Json(view(&s.state, id, &c, true)))
}
