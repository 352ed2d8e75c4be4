//! The query API: usage read back from the store.
//!
//! - `GET /v1/usage?customer=C&meter=M`: the current billing period's usage with the customer's
//!   limit and percent.
//! - `GET /v1/usage?customer=C&meter=M&from=T1&to=T2&window=minute|hour|day|month`: a series,
//!   one point per bucket that has usage (`to` defaults to now, `window` to `hour`). Buckets
//!   are UTC; months are calendar months. Gauges report the latest value in each bucket.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tally_ingest::problem::{ApiError, from_rejection};
use tally_schemas::period::{parse_rfc3339, rfc3339};
use tally_schemas::{Catalog, Clock, Customer, Meter, Window, quota};

use crate::store::UsageStore;

/// Most points one series may return.
pub const MAX_POINTS: i64 = 100_000;

#[derive(Clone)]
pub struct QueryState {
    pub store: Arc<dyn UsageStore>,
    pub catalog: Arc<Catalog>,
    pub clock: Arc<dyn Clock>,
}

pub fn router(state: QueryState) -> Router {
    Router::new()
        .route("/v1/usage", get(get_usage))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    customer: Option<String>,
    meter: Option<String>,
    from: Option<String>,
    to: Option<String>,
    window: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PeriodUsage {
    pub customer: String,
    pub meter: String,
    pub unit: String,
    pub plan: String,
    pub period_start: String,
    pub period_end: String,
    pub usage: u64,
    pub limit: Option<u64>,
    pub percent: Option<f64>,
    pub threshold: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Point {
    pub start: String,
    pub value: u64,
}

#[derive(Debug, Serialize)]
pub struct Series {
    pub customer: String,
    pub meter: String,
    pub unit: String,
    pub window: Window,
    pub from: String,
    pub to: String,
    pub points: Vec<Point>,
}

fn time_param(name: &'static str, v: &str) -> Result<i64, ApiError> {
    parse_rfc3339(v).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_time",
            format!("`{name}` must be an RFC 3339 timestamp such as 2026-11-21T00:00:00Z"),
        )
    })
}

fn lookup<'c>(catalog: &'c Catalog, meter: &str) -> Result<&'c Meter, ApiError> {
    catalog
        .meter(meter)
        .ok_or_else(|| ApiError::not_found("unknown_meter", format!("no meter named `{meter}`")))
}

async fn get_usage(
    State(s): State<QueryState>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Query(q) = q.map_err(|r| from_rejection(r.status(), r.body_text()))?;
    let customer = q
        .customer
        .ok_or_else(|| ApiError::bad_request("missing_parameter", "`customer` is required"))?;
    tally_schemas::event::check_customer_id(&customer)?;
    let meter_name = q
        .meter
        .ok_or_else(|| ApiError::bad_request("missing_parameter", "`meter` is required"))?;
    let meter = lookup(&s.catalog, &meter_name)?;
    let now = s.clock.now_ms();
    let record = s
        .store
        .customer(&customer)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .unwrap_or_else(|| Customer::new_default(&s.catalog));

    if q.from.is_none() && q.to.is_none() && q.window.is_none() {
        let period = record.period_at(now);
        let usage = s
            .store
            .total(
                &customer,
                &meter_name,
                meter.aggregation,
                period.start_ms,
                period.end_ms,
            )
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        let limit = record.limit_at(&s.catalog, &meter_name, now);
        let (plan_id, _) = record.plan_at(&s.catalog, now);
        let verdict = quota::decide(
            &s.catalog.policy,
            limit,
            tally_schemas::OnLimit::Block,
            usage,
            0,
            None,
            now,
        );
        return Ok(Json(PeriodUsage {
            customer,
            meter: meter_name,
            unit: meter.unit.clone(),
            plan: plan_id.to_owned(),
            period_start: rfc3339(period.start_ms),
            period_end: rfc3339(period.end_ms),
            usage,
            limit: limit.finite(),
            percent: verdict.percent,
            threshold: verdict.threshold,
        })
        .into_response());
    }

    let from = q
        .from
        .as_deref()
        .map(|v| time_param("from", v))
        .transpose()?
        .ok_or_else(|| ApiError::bad_request("missing_parameter", "a series needs `from`"))?;
    let to =
        q.to.as_deref()
            .map(|v| time_param("to", v))
            .transpose()?
            .unwrap_or(now);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "`from` must be before `to`",
        ));
    }
    let window = match q.window.as_deref() {
        None => Window::Hour,
        Some(w) => Window::parse(w).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_window",
                "`window` must be minute, hour, day or month",
            )
        })?,
    };
    let step = match window {
        Window::Minute => 60_000,
        Window::Hour => 3_600_000,
        Window::Day => 86_400_000,
        Window::Month => 28 * 86_400_000,
    };
    if (to - from) / step > MAX_POINTS {
        return Err(ApiError::bad_request(
            "range_too_large",
            format!("a series may have at most {MAX_POINTS} points; use a larger window"),
        ));
    }
    let points = s
        .store
        .series(&customer, &meter_name, meter.aggregation, from, to, window)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    Ok(Json(Series {
        customer,
        meter: meter_name,
        unit: meter.unit.clone(),
        window,
        from: rfc3339(from),
        to: rfc3339(to),
        points: points
            .into_iter()
            .map(|(start, value)| Point {
                start: rfc3339(start),
                value,
            })
            .collect(),
    })
    .into_response())
}
