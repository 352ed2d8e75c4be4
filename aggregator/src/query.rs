//! The query API: usage read back from the store, as JSON or CSV.
//!
//! - `GET /v1/usage?customer=C&meter=M`: one meter's usage in the current billing period, with
//!   the customer's limit, percent and state.
//! - `GET /v1/usage?customer=C&meter=M&from=T1&to=T2&window=minute|hour|day|month|period`: a
//!   series, one point per bucket that has usage (`to` defaults to now, `window` to `hour`).
//!   Buckets are UTC; months are calendar months; `period` buckets are the customer's billing
//!   periods. Gauges report the latest value in each bucket. Series are streamed, so long ranges
//!   cost the server one chunk of points at a time.
//! - `GET /v1/usage/summary?customer=C`: the current period across every meter of the
//!   catalogue, with limit, percent, state and the end of the soft-limit grace.
//! - `GET /v1/usage/top?meter=M&from=T1&to=T2&limit=N`: the customers with the most usage.
//! - `GET /v1/usage/totals?from=T1&to=T2`: each meter's usage across customers.
//!
//! `top` and `totals` default to the current calendar month (UTC). Every query answers CSV
//! instead of JSON with `format=csv` or `Accept: text/csv`.
//!
//! # Consistency
//! Queries read what the aggregator has written: usage is as fresh as the aggregator's last
//! flush. A summary's state is computed from stored usage with the same rules as the enforcer
//! ([`quota::decide`]); the grace's start is the minute in which stored usage reached the soft
//! limit, so `grace_until` may be up to a minute earlier than the enforcer's (which uses the
//! crossing event's own time).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tally_http::extract::Query;

use crate::groups::{Breakdown, Group};
use tally_http::problem::ApiError;
use tally_schemas::period::{calendar_month, parse_rfc3339, rfc3339};
use tally_schemas::{Aggregation, Catalog, Clock, Customer, Meter, Period, Window, quota};
use utoipa::{IntoParams, OpenApi, ToSchema};

use tally_backends::catalog::LiveCatalog;
use tally_backends::store::{Customers, UsageReader};

/// Most points one series may return.
pub const MAX_POINTS: i64 = 1_000_000;
/// Points read from the store per chunk of a streamed series.
const CHUNK_POINTS: i64 = 10_000;
/// Most customers a top-N query may return.
pub const MAX_TOP: usize = 10_000;

#[derive(Clone)]
pub struct QueryState {
    /// Rolled-up usage.
    pub usage: Arc<dyn UsageReader>,
    /// Customer records (plan, overrides, billing period).
    pub customers: Arc<dyn Customers>,
    /// Read once per request: a meter created through the API is queryable at once.
    pub catalog: Arc<LiveCatalog>,
    pub clock: Arc<dyn Clock>,
}

/// What one request reads: the query state with the catalogue in force when it came.
#[derive(Clone)]
struct Snapshot {
    usage: Arc<dyn UsageReader>,
    customers: Arc<dyn Customers>,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
}

impl FromRef<QueryState> for Snapshot {
    fn from_ref(s: &QueryState) -> Snapshot {
        Snapshot {
            usage: s.usage.clone(),
            customers: s.customers.clone(),
            catalog: s.catalog.get(),
            clock: s.clock.clone(),
        }
    }
}

pub fn router(state: QueryState) -> Router {
    Router::new()
        .route("/v1/usage", get(get_usage))
        .route("/v1/usage/summary", get(get_summary))
        .route("/v1/usage/top", get(get_top))
        .route("/v1/usage/totals", get(get_totals))
        .with_state(state)
}

/// The query API's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(get_usage, get_summary, get_top, get_totals),
    components(schemas(
        PeriodUsage,
        Series,
        Point,
        Summary,
        MeterUsage,
        Top,
        TopCustomer,
        Totals,
        MeterTotals,
        GroupedSeries,
        SeriesGroup,
        crate::groups::Group
    ))
)]
pub struct QueryApi;

/// Reply format: `format=json|csv`, else the `Accept` header, else JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

impl Format {
    fn of(param: Option<&str>, headers: &HeaderMap) -> Result<Format, ApiError> {
        match param {
            Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some(_) => Err(ApiError::bad_request(
                "invalid_format",
                "`format` must be json or csv",
            )),
            None => {
                let accept = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                Ok(if accept.contains("text/csv") {
                    Format::Csv
                } else {
                    Format::Json
                })
            }
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
        })
    }
}

/// A reply in `format`: `json` serialized as it is, or `rows` as CSV under `header`.
fn reply<T: Serialize, R: Serialize>(
    format: Format,
    json: &T,
    header: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> Result<Response, ApiError> {
    let body = match format {
        Format::Json => serde_json::to_vec(json).map_err(|e| ApiError::unavailable(&e))?,
        Format::Csv => csv_rows(Some(header), rows)?,
    };
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

fn csv_rows<R: Serialize>(
    header: Option<&[&str]>,
    rows: impl IntoIterator<Item = R>,
) -> Result<Vec<u8>, ApiError> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    let fail = |e: csv::Error| ApiError::unavailable(&e);
    if let Some(h) = header {
        w.write_record(h).map_err(fail)?;
    }
    for row in rows {
        w.serialize(row).map_err(fail)?;
    }
    w.into_inner().map_err(|e| ApiError::unavailable(&e))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Customer id.
    customer: Option<String>,
    /// Meter name from the catalogue.
    meter: Option<String>,
    /// Start of a series (RFC 3339); without `from`, `to` and `window` the reply is the
    /// current period's usage.
    from: Option<String>,
    /// End of a series, exclusive (RFC 3339); default now.
    to: Option<String>,
    /// Bucket of a series: minute, hour (default), day, month or period.
    window: Option<String>,
    /// json (default) or csv; `Accept: text/csv` also selects CSV.
    format: Option<String>,
    /// Break the usage (current period, or a minute to month series) down by these dimensions
    /// of the meter, comma-separated (`region,model`); the reply lists `groups` (in CSV: one
    /// row per group, or per group and bucket, with a column for each asked dimension).
    group_by: Option<String>,
    /// `filter[<dimension>]=<value>` (any number of dimensions): `groups` keep only usage
    /// with these values. Any other parameter is refused.
    #[serde(flatten)]
    #[param(ignore)]
    rest: BTreeMap<String, String>,
}

/// One meter's usage in the customer's current billing period.
#[derive(Debug, Serialize, ToSchema)]
pub struct PeriodUsage {
    pub customer: String,
    pub meter: String,
    pub unit: String,
    /// The plan in force now.
    pub plan: String,
    pub period_start: String,
    pub period_end: String,
    pub usage: u64,
    /// Absent for unlimited meters.
    pub limit: Option<u64>,
    pub percent: Option<f64>,
    /// Highest threshold reached (80, 100, 110 with the default policy).
    pub threshold: Option<u32>,
    /// ok, warn, over or blocked.
    #[schema(value_type = String)]
    pub state: quota::UsageState,
    /// End of the soft-limit grace, once usage reached the limit.
    pub grace_until: Option<String>,
    /// With `group_by` or `filter[...]`: the period's usage by dimension, largest first. The
    /// other figures are the meter's as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<Group>>,
}

/// One bucket of a series.
#[derive(Debug, Serialize, ToSchema)]
pub struct Point {
    pub start: String,
    pub end: String,
    pub value: u64,
}

/// Most buckets per group of a series by dimension (the answer is not streamed).
pub const MAX_GROUP_POINTS: i64 = 10_000;

/// One group of a series by dimension.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesGroup {
    /// The group's value of each asked dimension; `null` where its readings had none.
    pub dimensions: BTreeMap<String, Option<String>>,
    /// Buckets with usage, in time order.
    pub points: Vec<Point>,
}

/// A usage series by dimension (`group_by` or `filter[...]` with `from`/`window`), largest
/// group first.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupedSeries {
    pub customer: String,
    pub meter: String,
    pub unit: String,
    pub window: &'static str,
    pub from: String,
    pub to: String,
    pub groups: Vec<SeriesGroup>,
}

/// A usage series (streamed).
#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub customer: String,
    pub meter: String,
    pub unit: String,
    /// minute, hour, day, month or period.
    pub window: String,
    pub from: String,
    pub to: String,
    pub points: Vec<Point>,
}

/// The series' members before its points, written first when streaming.
#[derive(Serialize)]
struct SeriesHead<'a> {
    customer: &'a str,
    meter: &'a str,
    unit: &'a str,
    window: &'a str,
    from: String,
    to: String,
}

#[derive(Serialize)]
struct SeriesRow<'a> {
    customer: &'a str,
    meter: &'a str,
    unit: &'a str,
    window: &'a str,
    start: String,
    end: String,
    value: u64,
}

const SERIES_HEADER: &[&str] = &[
    "customer", "meter", "unit", "window", "start", "end", "value",
];

fn time_param(name: &'static str, v: &str) -> Result<i64, ApiError> {
    parse_rfc3339(v).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_time",
            format!("`{name}` must be an RFC 3339 timestamp such as 2026-11-21T00:00:00Z"),
        )
    })
}

/// `[from, to)` from the parameters, with defaults; `from` must come before `to`.
fn range(
    from: Option<&str>,
    to: Option<&str>,
    default_from: Option<i64>,
    default_to: i64,
) -> Result<(i64, i64), ApiError> {
    let from = match from {
        Some(v) => time_param("from", v)?,
        None => default_from
            .ok_or_else(|| ApiError::bad_request("missing_parameter", "a series needs `from`"))?,
    };
    let to = to
        .map(|v| time_param("to", v))
        .transpose()?
        .unwrap_or(default_to);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "`from` must be before `to`",
        ));
    }
    Ok((from, to))
}

fn lookup<'c>(catalog: &'c Catalog, meter: &str) -> Result<&'c Meter, ApiError> {
    catalog
        .meter(meter)
        .ok_or_else(|| ApiError::not_found("unknown_meter", format!("no meter named `{meter}`")))
}

/// Every meter of the catalogue with its aggregation, in name order (what the store's
/// several-meter reads take).
fn catalog_meters(catalog: &Catalog) -> Vec<(String, Aggregation)> {
    catalog
        .meters
        .iter()
        .map(|(name, m)| (name.clone(), m.aggregation))
        .collect()
}

fn required(v: Option<String>, name: &str) -> Result<String, ApiError> {
    v.ok_or_else(|| ApiError::bad_request("missing_parameter", format!("`{name}` is required")))
}

fn customer_param(v: Option<String>) -> Result<String, ApiError> {
    let customer = required(v, "customer")?;
    tally_schemas::event::check_customer_id(&customer).map_err(|e| {
        ApiError::bad_request(
            e.code(),
            "`customer` must be 1-128 bytes of letters, digits and . _ : @ -",
        )
    })?;
    Ok(customer)
}

async fn record(s: &Snapshot, customer: &str) -> Result<Customer, ApiError> {
    Ok(s.customers
        .customer(customer)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .unwrap_or_else(|| Customer::new_default(&s.catalog)))
}

/// The current period's usage of one meter, with its verdict.
async fn period_usage(
    s: &Snapshot,
    customer: &str,
    record: &Customer,
    meter_name: &str,
    meter: &Meter,
    usage: u64,
    now: i64,
) -> Result<PeriodUsage, ApiError> {
    let period = record.period_at(now);
    let limit = record.limit_at(&s.catalog, meter_name, now);
    let (plan_id, plan) = record.plan_at(&s.catalog, now);
    let crossed = match limit.finite() {
        Some(l) if quota::reaches(usage, l, s.catalog.policy.soft_percent) => {
            let crossed =
                soft_crossed(s, customer, meter_name, meter.aggregation, period, l).await?;
            quota::grace_start(crossed, record.limit_since(&s.catalog, meter_name, now))
        }
        _ => None,
    };
    let verdict = quota::decide(
        &s.catalog.policy,
        limit,
        plan.on_limit,
        usage,
        0,
        crossed,
        now,
    );
    Ok(PeriodUsage {
        customer: customer.to_owned(),
        meter: meter_name.to_owned(),
        unit: meter.unit.clone(),
        plan: plan_id.to_owned(),
        period_start: rfc3339(period.start_ms),
        period_end: rfc3339(period.end_ms),
        usage,
        limit: limit.finite(),
        percent: verdict.percent,
        threshold: verdict.threshold,
        state: verdict.state,
        grace_until: verdict.grace_until_ms.map(rfc3339),
        groups: None,
    })
}

/// Start of the minute in which stored usage first reached the soft limit in `period`.
async fn soft_crossed(
    s: &Snapshot,
    customer: &str,
    meter: &str,
    aggregation: Aggregation,
    period: Period,
    limit: u64,
) -> Result<Option<i64>, ApiError> {
    let minutes = s
        .usage
        .series(
            customer,
            meter,
            aggregation,
            period.start_ms,
            period.end_ms,
            Window::Minute,
        )
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let soft = s.catalog.policy.soft_percent;
    let mut usage: Option<u64> = None;
    for (minute, value) in minutes {
        // The period's usage as of this minute.
        let now = match (usage, aggregation) {
            (Some(u), a) if a.is_periodic() => a.fold(u, value),
            _ => value,
        };
        usage = Some(now);
        if quota::reaches(now, limit, soft) {
            return Ok(Some(minute));
        }
    }
    Ok(None)
}

/// The columns of a period's usage by dimension before the dimensions.
const GROUP_LEAD: &[&str] = &["customer", "meter", "unit", "period_start", "period_end"];

/// A period's usage by dimension as CSV records: one per group, its dimensions in the asked
/// order (empty where it has none), then its usage.
fn group_rows<'a>(
    b: &'a Breakdown,
    u: &'a PeriodUsage,
    groups: &'a [Group],
) -> impl Iterator<Item = Vec<String>> + 'a {
    groups.iter().map(move |g| {
        [
            u.customer.clone(),
            u.meter.clone(),
            u.unit.clone(),
            u.period_start.clone(),
            u.period_end.clone(),
        ]
        .into_iter()
        .chain(b.csv_cells(&g.dimensions))
        .chain([g.usage.to_string()])
        .collect()
    })
}

const PERIOD_HEADER: &[&str] = &[
    "customer",
    "meter",
    "unit",
    "plan",
    "period_start",
    "period_end",
    "usage",
    "limit",
    "percent",
    "threshold",
    "state",
    "grace_until",
];

/// One meter's current-period usage, or its series.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "query",
    params(UsageQuery),
    responses(
        (status = 200, description = "Without from/to/window: the current period's usage (`PeriodUsage`); with them: a series (`Series`), streamed. CSV with `format=csv` or `Accept: text/csv`.",
         content((PeriodUsage = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Missing or invalid parameter", body = tally_http::problem::Problem),
        (status = 404, description = "Unknown meter", body = tally_http::problem::Problem),
        (status = 503, description = "The store is unavailable", body = tally_http::problem::Problem),
    )
)]
async fn get_usage(
    State(s): State<Snapshot>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let format = Format::of(q.format.as_deref(), &headers)?;
    let customer = customer_param(q.customer)?;
    let meter_name = required(q.meter, "meter")?;
    let meter = lookup(&s.catalog, &meter_name)?.clone();
    let now = s.clock.now_ms();
    let breakdown = Breakdown::parse(&meter_name, &meter, q.group_by.as_deref(), &q.rest)?;
    if breakdown.is_some() && q.window.as_deref() == Some("period") {
        return Err(ApiError::bad_request(
            "unsupported_breakdown",
            "group_by and filter apply to the current period and to minute, hour, day and month series",
        ));
    }
    let record = record(&s, &customer).await?;

    if q.from.is_none() && q.to.is_none() && q.window.is_none() {
        let period = record.period_at(now);
        let usage = s
            .usage
            .total(
                &customer,
                &meter_name,
                meter.aggregation,
                period.start_ms,
                period.end_ms,
            )
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        let mut u = period_usage(&s, &customer, &record, &meter_name, &meter, usage, now).await?;
        if let Some(b) = breakdown {
            let totals = s
                .usage
                .dimension_totals(&customer, &meter_name, period.start_ms, period.end_ms)
                .await
                .map_err(|e| ApiError::unavailable(&e))?;
            let groups = b.groups(&totals);
            if format == Format::Csv {
                let header = b.csv_header(GROUP_LEAD, &["usage"]);
                return reply(format, &(), &header, group_rows(&b, &u, &groups));
            }
            u.groups = Some(groups);
        }
        return reply(format, &u, PERIOD_HEADER, [&u]);
    }

    let (from, to) = range(q.from.as_deref(), q.to.as_deref(), None, now)?;
    let window = match q.window.as_deref() {
        None => Some(Window::Hour),
        Some("period") => None,
        Some(w) => Some(Window::parse(w).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_window",
                "`window` must be minute, hour, day, month or period",
            )
        })?),
    };
    let step = window.map_or(28 * 86_400_000, step_ms);
    if (to - from) / step > MAX_POINTS {
        return Err(ApiError::bad_request(
            "range_too_large",
            format!("a series may have at most {MAX_POINTS} points; use a larger window"),
        ));
    }
    if let (Some(b), Some(w)) = (breakdown, window) {
        if (to - from) / step > MAX_GROUP_POINTS {
            return Err(ApiError::bad_request(
                "range_too_large",
                format!(
                    "a series by dimension may have at most {MAX_GROUP_POINTS} buckets per group; use a larger window"
                ),
            ));
        }
        let per_key = s
            .usage
            .dimension_series(&customer, &meter_name, from, to, w)
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        let grouped = b.series_groups(per_key);
        if format == Format::Csv {
            let header = b.csv_header(
                &["customer", "meter", "unit", "window"],
                &["start", "end", "value"],
            );
            let rows = grouped.iter().flat_map(|(dims, points)| {
                points.iter().map(|(start, value)| {
                    [customer.clone(), meter_name.clone(), meter.unit.clone()]
                        .into_iter()
                        .chain([window_name(window).to_owned()])
                        .chain(b.csv_cells(dims))
                        .chain([
                            rfc3339(*start),
                            rfc3339(bucket_end(w, *start)),
                            value.to_string(),
                        ])
                        .collect::<Vec<String>>()
                })
            });
            return reply(format, &(), &header, rows);
        }
        let groups = grouped
            .into_iter()
            .map(|(dimensions, points)| SeriesGroup {
                dimensions,
                points: points
                    .into_iter()
                    .map(|(start, value)| Point {
                        start: rfc3339(start),
                        end: rfc3339(bucket_end(w, start)),
                        value,
                    })
                    .collect(),
            })
            .collect();
        let body = GroupedSeries {
            customer,
            meter: meter_name,
            unit: meter.unit.clone(),
            window: window_name(window),
            from: rfc3339(from),
            to: rfc3339(to),
            groups,
        };
        return reply(format, &body, &[], std::iter::empty::<&Point>());
    }
    Ok(series_response(
        s, customer, meter_name, meter, record, from, to, window, format,
    ))
}

/// Bucket length of the fixed windows (months: their shortest).
fn step_ms(window: Window) -> i64 {
    match window {
        Window::Minute => 60_000,
        Window::Hour => 3_600_000,
        Window::Day => 86_400_000,
        Window::Month => 28 * 86_400_000,
    }
}

/// End of the bucket that starts at `start`.
fn bucket_end(window: Window, start: i64) -> i64 {
    match window {
        Window::Month => calendar_month(start).end_ms,
        w => start + step_ms(w),
    }
}

/// What one chunk of a streamed series covers: `[from, to)` read with `window`, or one billing
/// period.
enum Chunk {
    Window { from: i64, to: i64 },
    Period { bucket: Period, from: i64, to: i64 },
}

/// The chunks of `[from, to)`: minute, hour and day series in runs of [`CHUNK_POINTS`] buckets
/// (chunk ends are bucket starts, so no bucket is split); months whole; periods one by one.
fn chunks(record: &Customer, from: i64, to: i64, window: Option<Window>) -> Vec<Chunk> {
    let mut out = Vec::new();
    match window {
        Some(Window::Month) => out.push(Chunk::Window { from, to }),
        Some(w) => {
            let mut at = from;
            while at < to {
                let end = (w.bucket_of(at) + step_ms(w) * CHUNK_POINTS).min(to);
                out.push(Chunk::Window { from: at, to: end });
                at = end;
            }
        }
        None => {
            let mut at = from;
            while at < to {
                let bucket = record.period_at(at);
                let end = bucket.end_ms.min(to);
                out.push(Chunk::Period {
                    bucket,
                    from: at,
                    to: end,
                });
                at = end.max(at + 1);
            }
        }
    }
    out
}

/// A series, streamed chunk by chunk: the JSON document's head, then each chunk's points, then
/// its tail; or CSV rows. A store failure mid-stream ends the body early (the client sees an
/// incomplete transfer, never a short series passed off as whole).
#[allow(clippy::too_many_arguments)]
fn series_response(
    s: Snapshot,
    customer: String,
    meter_name: String,
    meter: Meter,
    record: Customer,
    from: i64,
    to: i64,
    window: Option<Window>,
    format: Format,
) -> Response {
    let q = Arc::new(SeriesQuery {
        s,
        customer,
        meter_name,
        meter,
        window,
        format,
    });
    let head = q.head(from, to);
    let tail: &'static [u8] = match format {
        Format::Json => b"]}",
        Format::Csv => b"",
    };
    let reader = q.clone();
    let mut first = true;
    let body = stream::iter(chunks(&record, from, to, window))
        .then(move |chunk| {
            let q = reader.clone();
            async move { q.points(chunk).await }
        })
        .map(move |points| {
            let points = points.map_err(|e| {
                tracing::error!(error = %e, "series read failed mid-stream");
                std::io::Error::other("store unavailable")
            })?;
            q.encode(&points, &mut first).map(Bytes::from)
        });
    let body = stream::once(async move { Ok(Bytes::from(head)) })
        .chain(body)
        .chain(stream::once(async move { Ok(Bytes::from_static(tail)) }));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response()
}

/// One series request, shared by the chunks of its streamed body.
struct SeriesQuery {
    s: Snapshot,
    customer: String,
    meter_name: String,
    meter: Meter,
    window: Option<Window>,
    format: Format,
}

/// The name of a series window; `period` for billing periods.
fn window_name(window: Option<Window>) -> &'static str {
    match window {
        Some(Window::Minute) => "minute",
        Some(Window::Hour) => "hour",
        Some(Window::Day) => "day",
        Some(Window::Month) => "month",
        None => "period",
    }
}

impl SeriesQuery {
    fn window_name(&self) -> &'static str {
        window_name(self.window)
    }

    /// The body before the points: the JSON object up to its `points` array, or the CSV
    /// header.
    fn head(&self, from: i64, to: i64) -> Vec<u8> {
        match self.format {
            Format::Json => {
                let mut head = serde_json::to_string(&SeriesHead {
                    customer: &self.customer,
                    meter: &self.meter_name,
                    unit: &self.meter.unit,
                    window: self.window_name(),
                    from: rfc3339(from),
                    to: rfc3339(to),
                })
                .unwrap_or_default();
                head.pop(); // the closing brace
                head.push_str(",\"points\":[");
                head.into_bytes()
            }
            Format::Csv => csv_rows::<SeriesRow>(Some(SERIES_HEADER), []).unwrap_or_default(),
        }
    }

    /// The points of one chunk, as (bucket start, bucket end, usage); empty buckets left out.
    async fn points(&self, chunk: Chunk) -> crate::Result<Vec<(i64, i64, u64)>> {
        let (customer, meter, aggregation) =
            (&self.customer, &self.meter_name, self.meter.aggregation);
        Ok(match chunk {
            Chunk::Window { from, to } => {
                let w = self.window.unwrap_or(Window::Month);
                self.s
                    .usage
                    .series(customer, meter, aggregation, from, to, w)
                    .await?
                    .into_iter()
                    .map(|(start, v)| (start, bucket_end(w, start), v))
                    .collect()
            }
            Chunk::Period { bucket, from, to } => {
                let v = self
                    .s
                    .usage
                    .total(customer, meter, aggregation, from, to)
                    .await?;
                if v == 0 {
                    vec![]
                } else {
                    vec![(bucket.start_ms, bucket.end_ms, v)]
                }
            }
        })
    }

    /// Points as JSON array members (`first`: none written yet) or CSV rows.
    fn encode(&self, points: &[(i64, i64, u64)], first: &mut bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for &(start, end, value) in points {
            match self.format {
                Format::Json => {
                    if !std::mem::take(first) {
                        out.push(b',');
                    }
                    let point = Point {
                        start: rfc3339(start),
                        end: rfc3339(end),
                        value,
                    };
                    serde_json::to_writer(&mut out, &point).map_err(std::io::Error::other)?;
                }
                Format::Csv => {
                    let row = SeriesRow {
                        customer: &self.customer,
                        meter: &self.meter_name,
                        unit: &self.meter.unit,
                        window: self.window_name(),
                        start: rfc3339(start),
                        end: rfc3339(end),
                        value,
                    };
                    out.extend(
                        csv_rows(None, [row]).map_err(|e| std::io::Error::other(e.message))?,
                    );
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// Customer id.
    customer: Option<String>,
    /// json (default) or csv.
    format: Option<String>,
    /// Break each meter that has these dimensions down by them, comma-separated
    /// (`region,model`): those meters list `groups`; in CSV, the reply is one row per meter and
    /// group. Each dimension must be one of some meter's.
    group_by: Option<String>,
    /// `filter[<dimension>]=<value>`: `groups` keep only usage with these values (and only
    /// meters with these dimensions are broken down). Any other parameter is refused.
    #[serde(flatten)]
    #[param(ignore)]
    rest: BTreeMap<String, String>,
}

/// A customer's current billing period across every meter.
#[derive(Debug, Serialize, ToSchema)]
pub struct Summary {
    pub customer: String,
    pub plan: String,
    pub period_start: String,
    pub period_end: String,
    pub meters: Vec<MeterUsage>,
}

/// One meter of a [`Summary`].
#[derive(Debug, Serialize, ToSchema)]
pub struct MeterUsage {
    pub meter: String,
    pub unit: String,
    pub usage: u64,
    /// Absent for unlimited meters.
    pub limit: Option<u64>,
    pub percent: Option<f64>,
    pub threshold: Option<u32>,
    /// ok, warn, over or blocked.
    #[schema(value_type = String)]
    pub state: quota::UsageState,
    pub grace_until: Option<String>,
    /// With `group_by` or `filter[...]`, for a meter with those dimensions: its usage by
    /// dimension, largest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<Group>>,
}

/// The current-period summary of one customer across meters.
#[utoipa::path(
    get,
    path = "/v1/usage/summary",
    tag = "query",
    params(SummaryQuery),
    responses(
        (status = 200, description = "Every meter of the catalogue, in name order",
         content((Summary = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Missing or invalid parameter", body = tally_http::problem::Problem),
        (status = 503, description = "The store is unavailable", body = tally_http::problem::Problem),
    )
)]
async fn get_summary(
    State(s): State<Snapshot>,
    headers: HeaderMap,
    Query(q): Query<SummaryQuery>,
) -> Result<Response, ApiError> {
    let format = Format::of(q.format.as_deref(), &headers)?;
    let customer = customer_param(q.customer)?;
    let now = s.clock.now_ms();
    let breakdown =
        Breakdown::parse_across(s.catalog.meters.values(), q.group_by.as_deref(), &q.rest)?;
    let record = record(&s, &customer).await?;
    let period = record.period_at(now);
    let meters = catalog_meters(&s.catalog);
    let usage = s
        .usage
        .totals(&customer, &meters, period.start_ms, period.end_ms)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let mut rows = Vec::with_capacity(meters.len());
    for ((name, _), usage) in meters.iter().zip(usage) {
        let meter = &s.catalog.meters[name];
        let mut u = period_usage(&s, &customer, &record, name, meter, usage, now).await?;
        if let Some(b) = breakdown.as_ref().filter(|b| b.applies_to(meter)) {
            let totals = s
                .usage
                .dimension_totals(&customer, name, period.start_ms, period.end_ms)
                .await
                .map_err(|e| ApiError::unavailable(&e))?;
            u.groups = Some(b.groups(&totals));
        }
        rows.push(u);
    }
    if let (Some(b), Format::Csv) = (&breakdown, format) {
        let header = b.csv_header(GROUP_LEAD, &["usage"]);
        let records = rows.iter().flat_map(|u| {
            group_rows(b, u, u.groups.as_deref().unwrap_or_default()).collect::<Vec<_>>()
        });
        return reply(format, &(), &header, records);
    }
    let summary = Summary {
        customer: customer.clone(),
        plan: record.plan_at(&s.catalog, now).0.to_owned(),
        period_start: rfc3339(period.start_ms),
        period_end: rfc3339(period.end_ms),
        meters: rows
            .iter()
            .map(|u| MeterUsage {
                meter: u.meter.clone(),
                unit: u.unit.clone(),
                usage: u.usage,
                limit: u.limit,
                percent: u.percent,
                threshold: u.threshold,
                state: u.state,
                grace_until: u.grace_until.clone(),
                groups: u.groups.clone(),
            })
            .collect(),
    };
    reply(format, &summary, PERIOD_HEADER, &rows)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopQuery {
    /// Meter name from the catalogue.
    meter: Option<String>,
    /// Start (RFC 3339); default the start of the current calendar month (UTC).
    from: Option<String>,
    /// End, exclusive (RFC 3339); default now.
    to: Option<String>,
    /// How many customers, 1 to 10000; default 10.
    limit: Option<usize>,
    /// json (default) or csv.
    format: Option<String>,
}

/// The customers with the most usage of a meter.
#[derive(Debug, Serialize, ToSchema)]
pub struct Top {
    pub meter: String,
    pub unit: String,
    pub from: String,
    pub to: String,
    pub customers: Vec<TopCustomer>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopCustomer {
    pub customer: String,
    pub usage: u64,
}

/// Top-N customers by one meter over a range.
#[utoipa::path(
    get,
    path = "/v1/usage/top",
    tag = "query",
    params(TopQuery),
    responses(
        (status = 200, description = "Highest usage first, ties by customer id",
         content((Top = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Missing or invalid parameter", body = tally_http::problem::Problem),
        (status = 404, description = "Unknown meter", body = tally_http::problem::Problem),
        (status = 503, description = "The store is unavailable", body = tally_http::problem::Problem),
    )
)]
async fn get_top(
    State(s): State<Snapshot>,
    headers: HeaderMap,
    Query(q): Query<TopQuery>,
) -> Result<Response, ApiError> {
    let format = Format::of(q.format.as_deref(), &headers)?;
    let meter_name = required(q.meter, "meter")?;
    let meter = lookup(&s.catalog, &meter_name)?;
    let now = s.clock.now_ms();
    let (from, to) = range(
        q.from.as_deref(),
        q.to.as_deref(),
        Some(calendar_month(now).start_ms),
        now,
    )?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=MAX_TOP).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("`limit` must be between 1 and {MAX_TOP}"),
        ));
    }
    let customers: Vec<TopCustomer> = s
        .usage
        .top_customers(&meter_name, meter.aggregation, from, to, limit)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .into_iter()
        .map(|(customer, usage)| TopCustomer { customer, usage })
        .collect();
    let top = Top {
        meter: meter_name,
        unit: meter.unit.clone(),
        from: rfc3339(from),
        to: rfc3339(to),
        customers,
    };
    reply(format, &top, &["customer", "usage"], &top.customers)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TotalsQuery {
    /// Start (RFC 3339); default the start of the current calendar month (UTC).
    from: Option<String>,
    /// End, exclusive (RFC 3339); default now.
    to: Option<String>,
    /// json (default) or csv.
    format: Option<String>,
}

/// Each meter's usage across customers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Totals {
    pub from: String,
    pub to: String,
    pub meters: Vec<MeterTotals>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeterTotals {
    pub meter: String,
    pub unit: String,
    /// Sum over customers (gauges: of each customer's latest value).
    pub usage: u64,
    /// Customers with usage in the range.
    pub customers: u64,
}

/// Totals per meter across customers over a range.
#[utoipa::path(
    get,
    path = "/v1/usage/totals",
    tag = "query",
    params(TotalsQuery),
    responses(
        (status = 200, description = "Every meter of the catalogue, in name order",
         content((Totals = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Invalid parameter", body = tally_http::problem::Problem),
        (status = 503, description = "The store is unavailable", body = tally_http::problem::Problem),
    )
)]
async fn get_totals(
    State(s): State<Snapshot>,
    headers: HeaderMap,
    Query(q): Query<TotalsQuery>,
) -> Result<Response, ApiError> {
    let format = Format::of(q.format.as_deref(), &headers)?;
    let now = s.clock.now_ms();
    let (from, to) = range(
        q.from.as_deref(),
        q.to.as_deref(),
        Some(calendar_month(now).start_ms),
        now,
    )?;
    let asked = catalog_meters(&s.catalog);
    let found = s
        .usage
        .meter_totals(&asked, from, to)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let meters = asked
        .iter()
        .zip(found)
        .map(|((name, _), t)| MeterTotals {
            meter: name.clone(),
            unit: s.catalog.meters[name].unit.clone(),
            usage: t.usage,
            customers: t.customers,
        })
        .collect();
    let totals = Totals {
        from: rfc3339(from),
        to: rfc3339(to),
        meters,
    };
    reply(
        format,
        &totals,
        &["meter", "unit", "usage", "customers"],
        &totals.meters,
    )
}
