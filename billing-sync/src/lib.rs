//! Billing sync: reports usage to Stripe Billing Meters.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # What is reported
//! Every `interval`, for each customer linked to a Stripe customer (`stripe_customer_id`) and
//! each additive meter mapped to a Stripe meter (`event_name`: the meter's name unless the
//! configuration maps it): the growth of the billing period's usage since the last accepted
//! report, as one meter event. Usage is counted up to the start of the minute `settle` before
//! now, so what the aggregator may still be flushing waits for the next report. Because each
//! report is a difference of period totals, late events (up to 35 days) are billed with the next
//! report of their own period, and the previous period is finished (while Stripe still accepts
//! its timestamps) before the current one is reported. Values are whole numbers in the meter's
//! unit (Tally counts whole units: nothing is left over to carry). The event's timestamp is the
//! last second counted, within the period, moved forward to 35 days ago (less an hour) if older:
//! Stripe refuses older events and anything more than 5 minutes ahead.
//!
//! # Meters of other aggregations
//! `max`, `min`, `unique_count` and `latest` meters are reported only where the configuration
//! names them (`last_meters`), to Stripe meters with the `last` formula (Stripe takes the last
//! event's value of the billing period): each report is the period's figure so far (the
//! largest or smallest value, the number of distinct values, the gauge's value), sent whenever
//! it differs from the figure Stripe last accepted for that period, under an identifier
//! `tally:{customer}:{meter}:{period start}:last{n}:{figure}` (`n` counts the period's reports)
//! and at a timestamp later than the period's previous report (the last second counted, within
//! the period). The previous period is finished first, as for additive meters; nothing is
//! cancelled (a lower figure is a new last value). A correction of a period that has ended is
//! sent at the period's last second, as its previous report may have been: Stripe's order of
//! two events of one second is Stripe's. A Stripe meter of another formula would add the
//! figures up: create these meters with `default_aggregation[formula]=last`.
//!
//! # Nothing billed twice, nothing dropped
//! Per (customer, meter) a mark is kept in the usage store: the usage already reported per
//! counted time range, and the report in flight. A range is a billing period; when the period
//! moves (`PUT period_anchor`, a subscription's new `current_period_start`), a period that
//! overlaps ranges reported before is counted together with them, as one wider range, and only
//! its usage beyond what they reported is sent: no unit is reported under two periods. A
//! report is written to the mark *before* it is sent, and the reported total moves only after
//! Stripe accepted it. Its identifier,
//! `tally:{customer}:{meter}:{range start}:{range total after it}`, is both the meter event's
//! `identifier` and the request's `Idempotency-Key`: a report sent again (after a timeout, a
//! 5xx, or a crash between sending and recording) is the same event to Stripe. After a crash
//! the pending report is sent again first, unchanged.
//!
//! # Corrections
//! Usage only grows through events (duplicates are dropped before counting), so a period total
//! below what was reported comes from an operator's correction or a replaced catalogue. The
//! rule: if the latest accepted report of that period was received by Stripe less than 24
//! hours ago (with ten minutes of margin), it is cancelled with a meter event adjustment
//! (`type=cancel`, recorded as pending before it is sent, like a report), the reported total
//! goes back by its value, and the next round reports the difference again, under a new
//! identifier (the mark's generation is part of it). Otherwise the shortfall is carried as a
//! negative delta: nothing is reported for that meter until the period total passes what was
//! reported, and only the excess is sent.
//!
//! # Limits and failures
//! Requests are paced by a token bucket (`requests_per_second`, governor) and at most one call
//! is in flight per customer and meter. 429, 5xx, timeouts and connection failures are retried
//! with exponential backoff and jitter, a few times per round and then again next round (the
//! report stays pending). Refusals about the account, the key or the configuration (401, 403,
//! 404, a 400 naming a missing meter or customer) are outages an operator must fix: the report
//! stays pending, is shown as `held` by `GET /v1/billing/status`, and is sent again every
//! round until Stripe accepts it; nothing is written off. Only a 400 that faults the event
//! itself (an invalid or missing parameter, a timestamp out of Stripe's window) is recorded
//! (metrics, logs, `rejected` in the status) and its window set aside, never retried forever.
//!
//! # Dry run
//! Without a Stripe secret key, billing-sync logs the meter events it would send and keeps its
//! marks in memory only, so that enabling Stripe later reports from the period's start.

pub mod metrics;
pub mod stripe;
pub mod webhooks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tally_backends::backoff::Backoff;
use tally_backends::catalog::LiveCatalog;
use tally_backends::store::Store;
use tally_schemas::period::{Period, minute_of, rfc3339};
use tally_schemas::{Catalog, Clock, Customer};
use tokio_util::sync::CancellationToken;

use crate::stripe::{MeterEventStream, Outcome, STREAM_BATCH, StripeMeters};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] tally_backends::Error),
    #[error("stripe client: {0}")]
    Stripe(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stripe connection settings.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    pub secret_key: String,
    /// `https://api.stripe.com`, or a compatible server for tests.
    pub api_base: String,
    /// Most requests per second (Stripe allows 1000/s in live mode, 25 writes/s in test mode).
    pub requests_per_second: u32,
    /// Longest one request may take before it counts as failed (and is retried).
    pub timeout: Duration,
    /// v1 meter events, or the v2 stream (100 events per request, for high volume).
    pub api: MeterApi,
    /// Host of the v2 stream (`https://meter-events.stripe.com`).
    pub events_base: String,
}

/// Which Stripe API meter events go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeterApi {
    V1,
    V2,
}

/// How often and how late billing-sync reports, and where.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Time between two reports.
    pub interval: Duration,
    /// How far behind now a window must end (lets the aggregator finish flushing).
    pub settle: Duration,
    /// `None`: dry run.
    pub stripe: Option<StripeSettings>,
    /// Stripe meter `event_name` per Tally meter, where it differs from the meter's name.
    pub event_names: HashMap<String, String>,
    /// Attempts per report within one round before it waits for the next round.
    pub attempts_per_round: u32,
    /// First retry delay; doubles with each attempt.
    pub retry_base: Duration,
    /// Customer-meter pairs reported at the same time.
    pub concurrency: usize,
    /// Meters of other aggregations than count and sum (max, min, unique_count, latest)
    /// reported, as their period's figure, to Stripe meters with the `last` formula.
    pub last_meters: HashSet<String>,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            interval: Duration::from_secs(60),
            settle: Duration::from_secs(120),
            stripe: None,
            event_names: HashMap::new(),
            attempts_per_round: 4,
            retry_base: Duration::from_millis(200),
            concurrency: 16,
            last_meters: HashSet::new(),
        }
    }
}

/// One meter event: what is sent, and the usage it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    pub customer: String,
    pub meter: String,
    pub stripe_customer_id: String,
    pub event_name: String,
    /// The growth being reported.
    pub value: u64,
    /// The counted range `[period_start_ms, period_end_ms)`: the billing period, widened to
    /// the ranges reported before that it overlaps (after a billing period moved).
    pub period_start_ms: i64,
    /// 0 in reports written before ranges were kept: the period of `period_start_ms`.
    #[serde(default)]
    pub period_end_ms: i64,
    /// The range's usage reported once this is accepted.
    pub period_total: u64,
    /// Usage counted up to here (exclusive).
    pub counted_until_ms: i64,
    /// Seconds since the epoch, within Stripe's window.
    pub timestamp_s: i64,
    pub identifier: String,
    /// The period's figure for a Stripe meter with the `last` formula (a max, min,
    /// unique_count or latest meter), not a growth: `value` is `period_total`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub figure: bool,
}

impl Report {
    /// Points a pending report at the customer's current Stripe customer and meter event name
    /// (an operator's fix of a held report). Its identifier, and so Stripe's de-duplication of
    /// it, stays.
    fn readdress(&mut self, stripe_customer_id: &str, event_name: &str) {
        if self.stripe_customer_id != stripe_customer_id || self.event_name != event_name {
            tracing::info!(customer = %self.customer, meter = %self.meter,
                stripe_customer = stripe_customer_id, event_name, identifier = %self.identifier,
                "pending report sent to the customer's new Stripe customer or meter");
            self.stripe_customer_id = stripe_customer_id.to_owned();
            self.event_name = event_name.to_owned();
        }
    }

    /// The `Idempotency-Key` of sending it: the identifier, and where the report goes (a
    /// request with the same key and other parameters is refused by Stripe).
    pub fn request_key(&self) -> String {
        use sha2::Digest;
        let to = sha2::Sha256::digest(format!("{}\n{}", self.stripe_customer_id, self.event_name));
        format!("{}:{}", self.identifier, hex::encode(&to[..6]))
    }
}

/// A report Stripe refused, kept for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rejected {
    pub report: Report,
    pub status: u16,
    pub message: String,
    pub at_ms: i64,
}

/// Billing-sync's state of one (customer, meter), persisted in the usage store as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Usage reported, by counted time range: disjoint ranges in time order, the last few.
    /// A range is a billing period, or several periods' ranges merged once a billing period
    /// moved across them (`PUT period_anchor`, a new `current_period_start`), so that no unit
    /// is reported under two periods.
    #[serde(default)]
    pub ranges: Vec<Reported>,
    /// Marks written before ranges were kept: usage reported by period start. Read once,
    /// turned into ranges ([`Mark::upgrade`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reported: BTreeMap<i64, u64>,
    /// Written before sending, cleared once Stripe accepted it.
    pub pending: Option<Report>,
    /// The most recent refusals (at most 10).
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    /// Reports Stripe accepted in the last 24 hours: what can still be cancelled.
    #[serde(default)]
    pub recent: Vec<Accepted>,
    /// A cancellation written before it is sent, cleared once Stripe accepted it.
    #[serde(default)]
    pub pending_cancel: Option<Accepted>,
    /// Bumped by every cancellation, so that later identifiers differ from cancelled ones.
    #[serde(default)]
    pub generation: u32,
    /// For a meter reported by its figure (`last`): the figure Stripe last accepted per
    /// billing period, the last few periods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<FigureReported>,
}

/// The figure Stripe last accepted for one billing period `[start_ms, end_ms)` of a meter
/// reported by its figure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FigureReported {
    pub start_ms: i64,
    pub end_ms: i64,
    pub value: u64,
    /// Reports of the period so far (each one's identifier differs).
    pub reports: u32,
    /// Timestamp of the latest, seconds since the epoch: the next is later.
    pub timestamp_s: i64,
}

/// Usage Stripe accepted over one counted range `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub start_ms: i64,
    pub end_ms: i64,
    pub total: u64,
}

/// Ranges kept per mark: the current and previous periods, and a few before them.
const KEPT_RANGES: usize = 6;

/// A report Stripe accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub identifier: String,
    pub event_name: String,
    pub value: u64,
    pub period_start_ms: i64,
    pub period_total: u64,
    pub accepted_at_ms: i64,
}

/// How long after Stripe received an event billing-sync still cancels it (Stripe allows 24 h).
const CANCEL_WINDOW_MS: i64 = 24 * 3_600_000 - 600_000;

impl Mark {
    /// Turns a mark written before ranges were kept into ranges: each period start's total
    /// covers that period, as `record` places it now.
    pub fn upgrade(&mut self, record: &Customer) {
        for (start, total) in std::mem::take(&mut self.reported) {
            let end = record.period_at(start).end_ms;
            self.ranges.push(Reported {
                start_ms: start,
                end_ms: end,
                total,
            });
        }
        self.ranges.sort_by_key(|r| r.start_ms);
        if let Some(p) = self.pending.as_mut()
            && p.period_end_ms == 0
        {
            p.period_end_ms = record.period_at(p.period_start_ms).end_ms;
        }
    }

    /// The range to count for `[start_ms, end_ms)`: widened to the reported ranges it overlaps,
    /// with the usage reported over them.
    fn covering(&self, start_ms: i64, end_ms: i64) -> (i64, i64, u64) {
        self.ranges
            .iter()
            .filter(|r| r.start_ms < end_ms && r.end_ms > start_ms)
            .fold((start_ms, end_ms, 0), |(s, e, done), r| {
                (s.min(r.start_ms), e.max(r.end_ms), done + r.total)
            })
    }

    /// The figure last accepted for the period `[start_ms, end_ms)`.
    fn figure_of(&self, start_ms: i64, end_ms: i64) -> Option<&FigureReported> {
        self.figures
            .iter()
            .find(|f| (f.start_ms, f.end_ms) == (start_ms, end_ms))
    }

    /// Records `report` as done (accepted, or set aside after a refusal): its range replaces
    /// the ranges it covers, or its figure the period's.
    fn settle(&mut self, report: &Report) {
        if report.figure {
            let (start, end) = (report.period_start_ms, report.period_end_ms);
            let reports = self.figure_of(start, end).map_or(0, |f| f.reports) + 1;
            self.figures
                .retain(|f| (f.start_ms, f.end_ms) != (start, end));
            self.figures.push(FigureReported {
                start_ms: start,
                end_ms: end,
                value: report.period_total,
                reports,
                timestamp_s: report.timestamp_s,
            });
            self.figures.sort_by_key(|f| f.start_ms);
            let excess = self.figures.len().saturating_sub(KEPT_RANGES);
            self.figures.drain(..excess);
            self.pending = None;
            return;
        }
        let (start, end) = (report.period_start_ms, report.period_end_ms);
        let mut total = report.period_total;
        self.ranges.retain(|r| {
            let overlaps = r.start_ms < end && r.end_ms > start;
            if overlaps && (r.start_ms, r.end_ms) == (start, end) {
                total = total.max(r.total);
            }
            !overlaps
        });
        let at = self.ranges.partition_point(|r| r.start_ms < start);
        self.ranges.insert(
            at,
            Reported {
                start_ms: start,
                end_ms: end,
                total,
            },
        );
        self.pending = None;
        let excess = self.ranges.len().saturating_sub(KEPT_RANGES);
        self.ranges.drain(..excess);
    }

    /// Records `report` as accepted by Stripe at `now_ms`.
    fn accepted(&mut self, report: &Report, now_ms: i64) {
        self.settle(report);
        if report.figure {
            // A figure is never cancelled: a lower one is the next report.
            return;
        }
        self.recent
            .retain(|a| now_ms - a.accepted_at_ms < CANCEL_WINDOW_MS);
        self.recent.push(Accepted {
            identifier: report.identifier.clone(),
            event_name: report.event_name.clone(),
            value: report.value,
            period_start_ms: report.period_start_ms,
            period_total: report.period_total,
            accepted_at_ms: now_ms,
        });
        let excess = self.recent.len().saturating_sub(10);
        self.recent.drain(..excess);
    }

    /// Records `cancelled` as cancelled by Stripe: its value is no longer reported.
    fn cancelled(&mut self, cancelled: &Accepted) {
        if let Some(r) = self
            .ranges
            .iter_mut()
            .find(|r| r.start_ms == cancelled.period_start_ms)
        {
            r.total = r.total.saturating_sub(cancelled.value);
        }
        self.recent.retain(|a| a.identifier != cancelled.identifier);
        self.pending_cancel = None;
        self.generation += 1;
    }
}

/// What one customer's meter needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Due {
    Report(Report),
    /// Reported usage went down: cancel this accepted report.
    Cancel(Accepted),
}

/// Counters of the running billing-sync, for `GET /v1/billing/status`.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `stripe`, or `dry-run` without a Stripe key.
    #[schema(value_type = String)]
    pub mode: &'static str,
    pub rounds: u64,
    pub last_round_at: Option<String>,
    pub reports_accepted: u64,
    /// Units of additive meters accepted (figure reports are not added up).
    pub value_accepted: u64,
    pub retries: u64,
    /// Reports waiting for the next round after retryable failures.
    pub pending: u64,
    pub rejected: Vec<Rejected>,
    /// Reports Stripe refused on account or configuration grounds (key, permissions, a
    /// missing meter or customer): pending, sent again every round until accepted. The latest
    /// refusal per customer and meter.
    pub held: Vec<Rejected>,
    /// Stripe's meter error reports received by webhook (the most recent 100).
    #[schema(value_type = Vec<Object>)]
    pub error_reports: Vec<serde_json::Value>,
}

/// Shared status of this process's billing-sync.
#[derive(Clone, Default)]
pub struct StatusHandle(Arc<Mutex<Status>>);

impl StatusHandle {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    /// Records a finished round, with the reports left pending (none in a dry run).
    fn round_done(&self, now_ms: i64, pending: Option<u64>) {
        self.update(|s| {
            s.rounds += 1;
            s.last_round_at = Some(rfc3339(now_ms));
            s.pending = pending.unwrap_or(0);
        });
        metrics::PENDING.set(pending.unwrap_or(0) as i64);
    }

    pub fn record_error_report(&self, report: serde_json::Value) {
        self.update(|s| {
            s.error_reports.push(report);
            let excess = s.error_reports.len().saturating_sub(100);
            s.error_reports.drain(..excess);
        });
    }

    pub fn snapshot(&self) -> Status {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// `GET /v1/billing/status`.
pub fn router(status: StatusHandle) -> Router {
    Router::new()
        .route("/v1/billing/status", get(status_handler))
        .with_state(status)
}

/// Billing-sync's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(status_handler, webhooks::receive),
    components(schemas(Status, Rejected, Report))
)]
pub struct BillingApi;

/// Billing-sync's state: mode, rounds, accepted reports, retries, reports pending after
/// retryable failures, reports Stripe refused (set aside, not retried), and Stripe's meter
/// error reports.
#[utoipa::path(
    get,
    path = "/v1/billing/status",
    tag = "billing",
    responses((status = 200, description = "This process's billing-sync", body = Status))
)]
async fn status_handler(State(status): State<StatusHandle>) -> Json<Status> {
    Json(status.snapshot())
}

/// Oldest timestamp Stripe accepts, with an hour of margin.
const STRIPE_MAX_AGE_MS: i64 = 35 * 86_400_000 - 3_600_000;

/// Longest identifier sent as is; longer ones (long customer ids) are hashed.
const MAX_IDENTIFIER: usize = 100;

fn identifier(
    customer: &str,
    meter: &str,
    period_start_ms: i64,
    period_total: u64,
    generation: u32,
) -> String {
    let id = if generation == 0 {
        format!("tally:{customer}:{meter}:{period_start_ms}:{period_total}")
    } else {
        format!("tally:{customer}:{meter}:{period_start_ms}:{period_total}:g{generation}")
    };
    bounded(id)
}

/// The identifier of the `n`th figure report of a period.
fn figure_identifier(
    customer: &str,
    meter: &str,
    period_start_ms: i64,
    n: u32,
    figure: u64,
) -> String {
    bounded(format!(
        "tally:{customer}:{meter}:{period_start_ms}:last{n}:{figure}"
    ))
}

/// `id`, or a hash of it when longer than Stripe takes.
fn bounded(id: String) -> String {
    if id.len() <= MAX_IDENTIFIER {
        return id;
    }
    use sha2::Digest;
    format!(
        "tally:{}",
        hex::encode(&sha2::Sha256::digest(id.as_bytes())[..20])
    )
}

/// What is due for one customer and meter: the growth of the previous period (while Stripe
/// still takes its timestamps), else of the current one, up to `until`.
#[allow(clippy::too_many_arguments)]
async fn due(
    store: &dyn Store,
    catalog: &Catalog,
    customer: &str,
    meter: &str,
    stripe_id: &str,
    event_name: &str,
    record: &Customer,
    mark: &Mark,
    until: i64,
    now_ms: i64,
) -> Result<Option<Due>> {
    let aggregation = catalog
        .meter(meter)
        .map_or(tally_schemas::Aggregation::Sum, |m| m.aggregation);
    let current = record.period_at(until - 1);
    let previous = record.period_at(current.start_ms - 1);
    if !aggregation.is_additive() {
        let first = mark.figures.is_empty();
        for period in open_periods(first, previous, current, now_ms) {
            let upto = period.end_ms.min(until);
            let figure = store
                .total(customer, meter, aggregation, period.start_ms, upto)
                .await?;
            let sent = mark.figure_of(period.start_ms, period.end_ms);
            match sent {
                Some(f) if f.value == figure => continue,
                // Stripe's figure of a period without events is 0.
                None if figure == 0 => continue,
                _ => {}
            }
            let timestamp_s = report_timestamp_ms(upto, period.start_ms, now_ms)
                .div_euclid(1000)
                .max(sent.map_or(i64::MIN, |f| f.timestamp_s + 1))
                .min((period.end_ms - 1).div_euclid(1000))
                .min(now_ms.div_euclid(1000));
            let n = sent.map_or(0, |f| f.reports) + 1;
            return Ok(Some(Due::Report(Report {
                customer: customer.to_owned(),
                meter: meter.to_owned(),
                stripe_customer_id: stripe_id.to_owned(),
                event_name: event_name.to_owned(),
                value: figure,
                period_start_ms: period.start_ms,
                period_end_ms: period.end_ms,
                period_total: figure,
                counted_until_ms: upto,
                timestamp_s,
                identifier: figure_identifier(customer, meter, period.start_ms, n, figure),
                figure: true,
            })));
        }
        return Ok(None);
    }
    for period in open_periods(mark.ranges.is_empty(), previous, current, now_ms) {
        // The period with the ranges reported before that it overlaps: after a billing period
        // moved, what was reported under the old periods counts against the new one.
        let (start, end, done) = mark.covering(period.start_ms, period.end_ms);
        let upto = end.min(until);
        let total = store
            .total(customer, meter, aggregation, start, upto)
            .await?;
        if total < done {
            // A correction: cancel the latest report of the range while Stripe still can.
            let latest = mark.recent.iter().rev().find(|a| {
                a.period_start_ms == start
                    && a.period_total == done
                    && now_ms - a.accepted_at_ms < CANCEL_WINDOW_MS
            });
            if let Some(a) = latest {
                return Ok(Some(Due::Cancel(a.clone())));
            }
            continue;
        }
        if total == done {
            continue;
        }
        let timestamp_ms = report_timestamp_ms(upto, period.start_ms, now_ms);
        return Ok(Some(Due::Report(Report {
            customer: customer.to_owned(),
            meter: meter.to_owned(),
            stripe_customer_id: stripe_id.to_owned(),
            event_name: event_name.to_owned(),
            value: total - done,
            period_start_ms: start,
            period_end_ms: end,
            period_total: total,
            counted_until_ms: upto,
            timestamp_s: timestamp_ms.div_euclid(1000),
            identifier: identifier(customer, meter, start, total, mark.generation),
            figure: false,
        })));
    }
    Ok(None)
}

/// The periods a round reports, oldest first: the previous one (unless the customer is seen
/// for the first time, `first`: billed from its current period) and the current one, each only
/// while Stripe still accepts its timestamps.
fn open_periods(
    first: bool,
    previous: Period,
    current: Period,
    now_ms: i64,
) -> impl Iterator<Item = Period> {
    (!first)
        .then_some(previous)
        .into_iter()
        .chain([current])
        .filter(move |p| p.end_ms > now_ms - STRIPE_MAX_AGE_MS)
}

/// A report's timestamp, in ms: the last second counted (`upto` exclusive), within the period
/// (from `period_start_ms`) and Stripe's window (35 days back, not past now).
fn report_timestamp_ms(upto: i64, period_start_ms: i64, now_ms: i64) -> i64 {
    (upto - 1_000)
        .max(period_start_ms)
        .max(now_ms - STRIPE_MAX_AGE_MS)
        .min(now_ms)
}

/// Every (customer, record, Stripe customer id, meter) to report: customers linked to Stripe,
/// with each additive meter and each of `last_meters`.
async fn linked(
    store: &dyn Store,
    catalog: &Catalog,
    last_meters: &HashSet<String>,
) -> Result<Vec<(String, Customer, String, String)>> {
    let mut out = Vec::new();
    for (customer, record) in store.customers_since(0).await? {
        let Some(stripe_id) = record.stripe_customer_id.clone() else {
            continue;
        };
        for (meter, _) in catalog
            .meters
            .iter()
            .filter(|(name, m)| m.aggregation.is_additive() || last_meters.contains(*name))
        {
            out.push((
                customer.clone(),
                record.clone(),
                stripe_id.clone(),
                meter.clone(),
            ));
        }
    }
    Ok(out)
}

/// Plans the reports of one round against in-memory marks (the dry run's bookkeeping), and
/// records them as done there.
pub async fn plan_round(
    catalog: &Catalog,
    store: &dyn Store,
    now_ms: i64,
    settle: Duration,
    last_meters: &HashSet<String>,
    marks: &mut HashMap<(String, String), Mark>,
) -> Result<Vec<Report>> {
    let until = minute_of(now_ms - settle.as_millis() as i64);
    let mut out = Vec::new();
    for (customer, record, stripe_id, meter) in linked(store, catalog, last_meters).await? {
        let mark = marks.entry((customer.clone(), meter.clone())).or_default();
        match due(
            store, catalog, &customer, &meter, &stripe_id, &meter, &record, mark, until, now_ms,
        )
        .await?
        {
            Some(Due::Report(r)) => {
                mark.accepted(&r, now_ms);
                out.push(r);
            }
            Some(Due::Cancel(a)) => {
                tracing::info!(
                    customer = %customer, meter = %meter, identifier = %a.identifier,
                    "dry-run: would cancel a meter event"
                );
                mark.cancelled(&a);
            }
            None => {}
        }
    }
    Ok(out)
}

/// One line of `tally billing reconcile`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub customer: String,
    pub stripe_customer_id: String,
    pub meter: String,
    pub tally: u64,
    /// `None` when Stripe has no meter with the event name.
    pub stripe: Option<f64>,
}

/// Compares Tally's totals over `[from_ms, to_ms)` with Stripe's meter event summaries, for
/// every linked customer and reported meter; returns the pairs that differ. Usage not yet
/// reported (the last `settle` and `interval`) shows as a difference: reconcile closed periods,
/// or wait a round.
pub async fn reconcile(
    settings: &BillingSettings,
    catalog: &Catalog,
    store: &dyn Store,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Difference>> {
    let stripe = settings
        .stripe
        .as_ref()
        .ok_or_else(|| Error::Stripe("no Stripe secret key is configured".into()))?;
    let client = StripeMeters::new(&stripe.secret_key, &stripe.api_base, stripe.timeout)
        .map_err(Error::Stripe)?;
    let meters = client.meters().await.map_err(Error::Stripe)?;
    let mut out = Vec::new();
    for (customer, _, stripe_id, meter) in linked(store, catalog, &settings.last_meters).await? {
        let aggregation = catalog
            .meter(&meter)
            .map_or(tally_schemas::Aggregation::Sum, |m| m.aggregation);
        let event_name = settings
            .event_names
            .get(&meter)
            .map_or(meter.as_str(), String::as_str);
        let tally = store
            .total(&customer, &meter, aggregation, from_ms, to_ms)
            .await?;
        let stripe_total = match meters.get(event_name) {
            Some(id) => Some(
                client
                    .summary(
                        id,
                        &stripe_id,
                        from_ms.div_euclid(1000),
                        to_ms.div_euclid(1000),
                    )
                    .await
                    .map_err(Error::Stripe)?,
            ),
            None if tally == 0 => continue,
            None => None,
        };
        if stripe_total != Some(tally as f64) {
            out.push(Difference {
                customer,
                stripe_customer_id: stripe_id,
                meter,
                tally,
                stripe: stripe_total,
            });
        }
    }
    Ok(out)
}

/// Runs rounds every `interval` until `shutdown`: dry-run without Stripe settings.
pub async fn run(
    settings: BillingSettings,
    catalog: Arc<LiveCatalog>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    status: StatusHandle,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let Some(stripe) = settings.stripe.clone() else {
        tracing::info!("billing-sync runs in dry-run mode: no Stripe secret key is configured");
        status.update(|s| s.mode = "dry-run");
        let mut marks = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let now = clock.now_ms();
            let settle = settings.settle;
            let last = &settings.last_meters;
            let catalog = catalog.get();
            match plan_round(&catalog, store.as_ref(), now, settle, last, &mut marks).await {
                Ok(reports) => {
                    reports.iter().for_each(log_dry_run);
                    status.round_done(now, None);
                }
                Err(e) => tracing::warn!(error = %e, "billing round failed"),
            }
        }
    };
    status.update(|s| s.mode = "stripe");
    let (client, stream) = stripe_clients(&stripe)?;
    let rps = NonZeroU32::new(stripe.requests_per_second.max(1)).expect("at least 1");
    // No burst: requests are spaced evenly, so no one-second window holds more than the limit.
    let limiter = Arc::new(RateLimiter::direct(
        Quota::per_second(rps).allow_burst(NonZeroU32::MIN),
    ));
    let sync = Arc::new(Syncer {
        settings,
        catalog,
        store,
        clock,
        client,
        stream,
        limiter,
        status,
        shutdown: shutdown.clone(),
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = sync.clone().round().await {
            tracing::warn!(error = %e, "billing round failed; retrying next round");
        }
    }
}

/// A report billing-sync would send, logged in dry-run mode (no Stripe key configured).
fn log_dry_run(r: &Report) {
    tracing::info!(
        customer = %r.customer,
        stripe_customer = %r.stripe_customer_id,
        event_name = %r.event_name,
        value = r.value,
        period_start = %rfc3339(r.period_start_ms),
        counted_until = %rfc3339(r.counted_until_ms),
        identifier = %r.identifier,
        "dry-run: would send a meter event"
    );
}

/// The Stripe clients of the configured API: v1 meter events, and the v2 stream when chosen.
fn stripe_clients(
    stripe: &StripeSettings,
) -> Result<(Arc<StripeMeters>, Option<Arc<MeterEventStream>>)> {
    let client = Arc::new(
        StripeMeters::new(&stripe.secret_key, &stripe.api_base, stripe.timeout)
            .map_err(Error::Stripe)?,
    );
    let stream = match stripe.api {
        MeterApi::V1 => None,
        MeterApi::V2 => Some(Arc::new(
            MeterEventStream::new(
                &stripe.secret_key,
                &stripe.api_base,
                &stripe.events_base,
                stripe.timeout,
            )
            .map_err(Error::Stripe)?,
        )),
    };
    Ok((client, stream))
}

/// One billing-sync with a Stripe client.
struct Syncer {
    settings: BillingSettings,
    /// Read once per round.
    catalog: Arc<LiveCatalog>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    client: Arc<StripeMeters>,
    /// Set when reporting through the v2 stream.
    stream: Option<Arc<MeterEventStream>>,
    limiter: Arc<DefaultDirectRateLimiter>,
    status: StatusHandle,
    shutdown: CancellationToken,
}

/// A customer's meter with its mark, as the v2 round passes them on.
type Item = (String, String, Mark);

/// A customer's meter to report: (customer, meter, Stripe customer, record, mark).
type Job = (String, String, String, Customer, Mark);

impl Syncer {
    /// Every linked customer's reported meters, with their marks.
    async fn jobs(&self) -> Result<Vec<Job>> {
        let mut marks: BTreeMap<(String, String), Mark> = BTreeMap::new();
        for (customer, meter, json) in self.store.billing_marks().await? {
            match serde_json::from_str(&json) {
                Ok(mark) => {
                    marks.insert((customer, meter), mark);
                }
                Err(e) => tracing::error!(%customer, %meter, error = %e, "unreadable billing mark"),
            }
        }
        let mut jobs = Vec::new();
        for (customer, record, stripe_id, meter) in linked(
            self.store.as_ref(),
            &self.catalog.get(),
            &self.settings.last_meters,
        )
        .await?
        {
            let mut mark = marks
                .remove(&(customer.clone(), meter.clone()))
                .unwrap_or_default();
            mark.upgrade(&record);
            jobs.push((customer, meter, stripe_id, record, mark));
        }
        Ok(jobs)
    }

    async fn round(self: Arc<Self>) -> Result<()> {
        if let Some(stream) = self.stream.clone() {
            return self.round_v2(stream).await;
        }
        let now = self.clock.now_ms();
        let until = minute_of(now - self.settings.settle.as_millis() as i64);
        let jobs = self.jobs().await?;
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.settings.concurrency.max(1),
        ));
        let mut set = tokio::task::JoinSet::new();
        for (customer, meter, stripe_id, record, mark) in jobs {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let this = self.clone();
            set.spawn(async move {
                let _permit = permit;
                this.sync_one(&customer, &meter, &stripe_id, &record, mark, until, now)
                    .await
            });
        }
        let mut pending = 0;
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok(still_pending)) => pending += u64::from(still_pending),
                Ok(Err(e)) => tracing::warn!(error = %e, "billing report failed"),
                Err(e) => tracing::error!(error = %e, "billing task panicked"),
            }
        }
        self.status.round_done(now, Some(pending));
        Ok(())
    }

    /// Reports one customer's meter; `true` when a report is still pending afterwards.
    #[allow(clippy::too_many_arguments)]
    async fn sync_one(
        &self,
        customer: &str,
        meter: &str,
        stripe_id: &str,
        record: &Customer,
        mut mark: Mark,
        until: i64,
        now: i64,
    ) -> Result<bool> {
        if mark.pending_cancel.is_some() {
            return self.send_cancel(customer, meter, mark).await;
        }
        let event_name = self
            .settings
            .event_names
            .get(meter)
            .map_or(meter, String::as_str);
        if let Some(pending) = mark.pending.as_mut() {
            // A report held for a wrong Stripe customer or meter goes out with the fixed ones.
            pending.readdress(stripe_id, event_name);
        } else {
            match due(
                self.store.as_ref(),
                &self.catalog.get(),
                customer,
                meter,
                stripe_id,
                event_name,
                record,
                &mark,
                until,
                now,
            )
            .await?
            {
                None => return Ok(false),
                Some(Due::Cancel(a)) => {
                    mark.pending_cancel = Some(a);
                    self.save(customer, meter, &mark).await?;
                    return self.send_cancel(customer, meter, mark).await;
                }
                Some(Due::Report(report)) => {
                    mark.pending = Some(report);
                    self.save(customer, meter, &mark).await?;
                }
            }
        }
        self.send_v1(customer, meter, mark).await
    }

    /// Sends `mark`'s pending cancellation (one attempt a round); `true` while it is pending.
    async fn send_cancel(&self, customer: &str, meter: &str, mut mark: Mark) -> Result<bool> {
        let cancel = mark.pending_cancel.clone().expect("a pending cancellation");
        tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(true),
            _ = self.limiter.until_ready() => {}
        }
        match self
            .client
            .cancel(&cancel.event_name, &cancel.identifier)
            .await
        {
            Outcome::Accepted => {
                tracing::info!(customer, meter, identifier = %cancel.identifier, value = cancel.value,
                    "meter event cancelled after a downward correction");
                mark.cancelled(&cancel);
                metrics::REPORTS.with_label_values(&["cancelled"]).inc();
            }
            Outcome::Rejected { status, message } => {
                // Too late or unknown to Stripe: the shortfall is carried instead.
                tracing::warn!(customer, meter, identifier = %cancel.identifier, status, %message,
                    "meter event not cancelled; the correction is carried");
                mark.recent.retain(|a| a.identifier != cancel.identifier);
                mark.pending_cancel = None;
            }
            Outcome::Retryable(why) | Outcome::Held { message: why, .. } => {
                tracing::warn!(customer, meter, reason = %why, "cancellation not accepted yet");
                return Ok(true);
            }
        }
        self.save(customer, meter, &mark).await?;
        Ok(false)
    }

    /// Sends `mark`'s pending report as a v1 meter event, retrying within the round; `true`
    /// when it is still pending afterwards.
    async fn send_v1(&self, customer: &str, meter: &str, mut mark: Mark) -> Result<bool> {
        let report = mark.pending.clone().expect("a pending report");
        let mut wait = Backoff::new(self.settings.retry_base, Duration::from_secs(30)).jittered();
        for attempt in 1..=self.settings.attempts_per_round.max(1) {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(true),
                _ = self.limiter.until_ready() => {}
            }
            match self.client.send(&report).await {
                Outcome::Accepted => {
                    mark.accepted(&report, self.clock.now_ms());
                    self.save(customer, meter, &mark).await?;
                    metrics::REPORTS.with_label_values(&["accepted"]).inc();
                    self.status.update(|s| {
                        s.reports_accepted += 1;
                        if !report.figure {
                            s.value_accepted += report.value;
                        }
                        s.held.retain(|h| {
                            (&h.report.customer, &h.report.meter)
                                != (&report.customer, &report.meter)
                        });
                    });
                    return Ok(false);
                }
                Outcome::Held { status, message } => {
                    tracing::error!(
                        customer, meter, identifier = %report.identifier, status, %message,
                        "Stripe refused a meter event on account or configuration grounds; \
                         it stays pending and is sent again next round"
                    );
                    metrics::REPORTS.with_label_values(&["held"]).inc();
                    let held = Rejected {
                        report: report.clone(),
                        status,
                        message,
                        at_ms: self.clock.now_ms(),
                    };
                    self.status.update(|s| {
                        s.held.retain(|h| {
                            (&h.report.customer, &h.report.meter)
                                != (&report.customer, &report.meter)
                        });
                        s.held.push(held);
                        let excess = s.held.len().saturating_sub(100);
                        s.held.drain(..excess);
                    });
                    return Ok(true);
                }
                Outcome::Rejected { status, message } => {
                    tracing::error!(
                        customer, meter, identifier = %report.identifier, status, %message,
                        "Stripe refused a meter event; the window is set aside"
                    );
                    let rejected = Rejected {
                        report: report.clone(),
                        status,
                        message,
                        at_ms: self.clock.now_ms(),
                    };
                    mark.rejected.push(rejected.clone());
                    let excess = mark.rejected.len().saturating_sub(10);
                    mark.rejected.drain(..excess);
                    mark.settle(&report);
                    self.save(customer, meter, &mark).await?;
                    metrics::REPORTS.with_label_values(&["rejected"]).inc();
                    self.status.update(|s| {
                        s.rejected.push(rejected);
                        let excess = s.rejected.len().saturating_sub(100);
                        s.rejected.drain(..excess);
                    });
                    return Ok(false);
                }
                Outcome::Retryable(why) => {
                    tracing::warn!(customer, meter, attempt, reason = %why, "meter event not accepted yet");
                    if !self.pause_before_retry(attempt, &mut wait).await {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(true)
    }

    /// One round over the v2 stream: reports are computed in one task and sent in batches of
    /// [`stripe::STREAM_BATCH`] as they come, each batch recorded pending in one write before it
    /// is sent and settled in one write after. A batch Stripe refuses is sent again one event at
    /// a time through v1, so that only the faulty events are set aside.
    async fn round_v2(self: Arc<Self>, stream: Arc<MeterEventStream>) -> Result<()> {
        let now = self.clock.now_ms();
        let until = minute_of(now - self.settings.settle.as_millis() as i64);
        let jobs = self.jobs().await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(4 * STREAM_BATCH);
        let producer = {
            let this = self.clone();
            tokio::spawn(async move {
                for (customer, meter, stripe_id, record, mut mark) in jobs {
                    if mark.pending_cancel.is_some() {
                        if let Err(e) = this.send_cancel(&customer, &meter, mark).await {
                            tracing::warn!(%customer, %meter, error = %e, "cancellation failed");
                        }
                        continue;
                    }
                    let event_name = this
                        .settings
                        .event_names
                        .get(&meter)
                        .cloned()
                        .unwrap_or_else(|| meter.clone());
                    let report = match mark.pending.clone() {
                        Some(mut r) => {
                            r.readdress(&stripe_id, &event_name);
                            r
                        }
                        None => {
                            match due(
                                this.store.as_ref(),
                                &this.catalog.get(),
                                &customer,
                                &meter,
                                &stripe_id,
                                &event_name,
                                &record,
                                &mark,
                                until,
                                now,
                            )
                            .await
                            {
                                Ok(Some(Due::Report(r))) => r,
                                Ok(Some(Due::Cancel(a))) => {
                                    mark.pending_cancel = Some(a);
                                    let sent = match this.save(&customer, &meter, &mark).await {
                                        Ok(()) => this.send_cancel(&customer, &meter, mark).await,
                                        Err(e) => Err(e),
                                    };
                                    if let Err(e) = sent {
                                        tracing::warn!(%customer, %meter, error = %e, "cancellation failed");
                                    }
                                    continue;
                                }
                                Ok(None) => continue,
                                Err(e) => {
                                    tracing::warn!(%customer, %meter, error = %e, "usage not read");
                                    continue;
                                }
                            }
                        }
                    };
                    mark.pending = Some(report);
                    if tx.send((customer, meter, mark)).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut pending = 0u64;
        let mut batch = Vec::with_capacity(STREAM_BATCH);
        loop {
            let next = rx.recv().await;
            let closed = next.is_none();
            batch.extend(next);
            if batch.len() == STREAM_BATCH || (closed && !batch.is_empty()) {
                pending += self.send_batch(&stream, std::mem::take(&mut batch)).await?;
            }
            if closed {
                break;
            }
        }
        let _ = producer.await;
        self.status.round_done(now, Some(pending));
        Ok(())
    }

    /// Sends one stream batch; returns how many reports are still pending.
    async fn send_batch(&self, stream: &MeterEventStream, mut batch: Vec<Item>) -> Result<u64> {
        self.save_all(&batch).await?;
        let reports: Vec<Report> = batch
            .iter()
            .map(|(_, _, m)| m.pending.clone().expect("a pending report"))
            .collect();
        let mut wait = Backoff::new(self.settings.retry_base, Duration::from_secs(30)).jittered();
        for attempt in 1..=self.settings.attempts_per_round.max(1) {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(batch.len() as u64),
                _ = self.limiter.until_ready() => {}
            }
            match stream.send(&reports).await {
                Outcome::Accepted => {
                    let now = self.clock.now_ms();
                    for ((_, _, mark), report) in batch.iter_mut().zip(&reports) {
                        mark.accepted(report, now);
                    }
                    self.save_all(&batch).await?;
                    metrics::REPORTS
                        .with_label_values(&["accepted"])
                        .inc_by(reports.len() as u64);
                    self.status.update(|s| {
                        s.reports_accepted += reports.len() as u64;
                        s.value_accepted += reports
                            .iter()
                            .filter(|r| !r.figure)
                            .map(|r| r.value)
                            .sum::<u64>();
                    });
                    return Ok(0);
                }
                Outcome::Held { status, message } if status != 400 => {
                    // The key or the account: every event of the batch waits for the fix.
                    tracing::error!(status, %message, "Stripe refused the stream batch on account or \
                        configuration grounds; it stays pending and is sent again next round");
                    metrics::REPORTS
                        .with_label_values(&["held"])
                        .inc_by(batch.len() as u64);
                    return Ok(batch.len() as u64);
                }
                Outcome::Rejected { status, message } | Outcome::Held { status, message } => {
                    tracing::warn!(status, %message, "stream batch refused; sending its events one by one");
                    let mut left = 0;
                    for (customer, meter, mark) in batch {
                        left += u64::from(self.send_v1(&customer, &meter, mark).await?);
                    }
                    return Ok(left);
                }
                Outcome::Retryable(why) => {
                    tracing::warn!(attempt, reason = %why, "stream batch not accepted yet");
                    if !self.pause_before_retry(attempt, &mut wait).await {
                        return Ok(batch.len() as u64);
                    }
                }
            }
        }
        Ok(batch.len() as u64)
    }

    /// Counts a retryable failure and, unless it was the round's last attempt, waits the
    /// jittered backoff `wait` (then doubles it, up to 30 s). `false` if shutdown came first.
    async fn pause_before_retry(&self, attempt: u32, wait: &mut Backoff) -> bool {
        metrics::REPORTS.with_label_values(&["retry"]).inc();
        self.status.update(|s| s.retries += 1);
        if attempt >= self.settings.attempts_per_round {
            return true;
        }
        wait.wait(&self.shutdown).await
    }

    async fn save_all(&self, batch: &[Item]) -> Result<()> {
        let rows: Vec<(String, String, String)> = batch
            .iter()
            .map(|(c, m, mark)| {
                let json = serde_json::to_string(mark).expect("a mark serializes");
                (c.clone(), m.clone(), json)
            })
            .collect();
        Ok(self.store.put_billing_marks(&rows).await?)
    }

    async fn save(&self, customer: &str, meter: &str, mark: &Mark) -> Result<()> {
        let json = serde_json::to_string(mark).expect("a mark serializes");
        Ok(self.store.put_billing_mark(customer, meter, &json).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_backends::log::Record;
    use tally_backends::store::prelude::*;
    use tally_backends::store::sqlite::SqliteStore;
    use tally_schemas::rollup::Rollup;
    use tally_schemas::{Customer, UsageEvent};

    #[test]
    fn long_identifiers_are_hashed_and_stay_deterministic() {
        let short = identifier("c", "api_requests", 0, 5, 0);
        assert_eq!(short, "tally:c:api_requests:0:5");
        assert_eq!(
            identifier("c", "api_requests", 0, 5, 1),
            "tally:c:api_requests:0:5:g1"
        );
        let long_customer = "x".repeat(128);
        let a = identifier(&long_customer, "api_requests", 0, 5, 0);
        assert!(a.len() <= MAX_IDENTIFIER, "{a}");
        assert_eq!(a, identifier(&long_customer, "api_requests", 0, 5, 0));
        assert_ne!(a, identifier(&long_customer, "api_requests", 0, 6, 0));
    }

    #[tokio::test]
    async fn plans_each_settled_window_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let catalog = Catalog::builtin();
        let mut linked = Customer::new_default(&catalog);
        linked.stripe_customer_id = Some("cus_1".into());
        store.put_customer("a", &linked).await.unwrap();
        store
            .put_customer("b", &Customer::new_default(&catalog))
            .await
            .unwrap();
        let recs: Vec<Record> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, c)| Record {
                partition: 0,
                offset: i as u64,
                event: UsageEvent {
                    id: i.to_string(),
                    source: "s".into(),
                    customer: c.to_string(),
                    meter: "api_requests".into(),
                    value: 7,
                    time_ms: 1_795_255_200_000,
                    received_ms: 1_795_255_200_000,
                    readings: Vec::new(),
                },
            })
            .collect();
        store
            .apply(&Rollup::from_records(&recs, &catalog))
            .await
            .unwrap();
        let mut marks = HashMap::new();
        let now = 1_795_255_200_000 + 600_000;
        let settle = Duration::from_secs(120);
        let round = plan_round(&catalog, &store, now, settle, &HashSet::new(), &mut marks)
            .await
            .unwrap();
        assert_eq!(round.len(), 1);
        assert_eq!(
            round[0].identifier,
            format!("tally:a:api_requests:{}:7", round[0].period_start_ms)
        );
        assert_eq!((round[0].customer.as_str(), round[0].value), ("a", 7));
        assert_eq!(round[0].stripe_customer_id, "cus_1");
        assert!(
            plan_round(&catalog, &store, now, settle, &HashSet::new(), &mut marks)
                .await
                .unwrap()
                .is_empty()
        );
    }

    fn ms(t: &str) -> i64 {
        tally_schemas::period::parse_rfc3339(t).unwrap()
    }

    async fn add_usage(store: &SqliteStore, catalog: &Catalog, offset: u64, value: u64, t: &str) {
        let rec = Record {
            partition: 0,
            offset,
            event: UsageEvent {
                id: offset.to_string(),
                source: "s".into(),
                customer: "a".into(),
                meter: "api_requests".into(),
                value,
                time_ms: ms(t),
                received_ms: ms(t),
                readings: Vec::new(),
            },
        };
        store
            .apply(&Rollup::from_records(&[rec], catalog))
            .await
            .unwrap();
    }

    /// Moving the billing period mid-period (`PUT period_anchor`) reports nothing a second
    /// time: usage reported under the old period counts against the new periods that overlap
    /// it (this reported the first 100 again, under the new previous period).
    #[tokio::test]
    async fn billing_period_move_reports_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let catalog = Catalog::builtin();
        let mut record = Customer::new_default(&catalog);
        record.stripe_customer_id = Some("cus_1".into());
        store.put_customer("a", &record).await.unwrap();
        let settle = Duration::from_secs(120);
        let mut marks = HashMap::new();
        let mut sent = 0;
        let round = async |marks: &mut HashMap<(String, String), Mark>, now: &str| {
            let reports = plan_round(&catalog, &store, ms(now), settle, &HashSet::new(), marks)
                .await
                .unwrap();
            reports.iter().map(|r| r.value).sum::<u64>()
        };
        add_usage(&store, &catalog, 0, 100, "2026-11-05T00:00:00Z").await;
        sent += round(&mut marks, "2026-11-06T00:00:00Z").await;
        assert_eq!(sent, 100);
        // The anchor moves to the 10th: the previous period is now Oct 10 - Nov 10, the
        // current Nov 10 - Dec 10; both overlap what was reported for November.
        record.period_anchor_ms = Some(ms("2026-10-10T00:00:00Z"));
        store.put_customer("a", &record).await.unwrap();
        add_usage(&store, &catalog, 1, 50, "2026-11-12T00:00:00Z").await;
        for now in [
            "2026-11-13T00:00:00Z",
            "2026-11-13T00:10:00Z",
            "2026-11-20T00:00:00Z",
        ] {
            sent += round(&mut marks, now).await;
        }
        assert_eq!(sent, 150, "Stripe holds Tally's total");
        // On: the next period (Dec 10) reports only its own usage, and a late event of
        // November is billed once.
        add_usage(&store, &catalog, 2, 7, "2026-12-11T00:00:00Z").await;
        add_usage(&store, &catalog, 3, 3, "2026-11-21T00:00:00Z").await;
        for now in [
            "2026-12-12T00:00:00Z",
            "2026-12-12T00:10:00Z",
            "2026-12-13T00:00:00Z",
        ] {
            sent += round(&mut marks, now).await;
        }
        assert_eq!(sent, 160);
        let mark = &marks[&("a".to_owned(), "api_requests".to_owned())];
        let covered: u64 = mark.ranges.iter().map(|r| r.total).sum();
        assert_eq!(covered, 160, "{:?}", mark.ranges);
        assert!(
            mark.ranges.windows(2).all(|w| w[0].end_ms <= w[1].start_ms),
            "disjoint: {:?}",
            mark.ranges
        );
    }

    /// Meters reported by their figure (`last`): the period's largest value, distinct count
    /// and gauge value, sent whenever they differ from what was accepted, each under a new
    /// identifier at a later timestamp; a late event of the previous period is reported within
    /// it, and a meter not named in `last_meters` is never reported.
    #[tokio::test]
    async fn figures_are_reported_whenever_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let toml = format!(
            "{}\n[meters.active_users]\naggregation = 'unique_count'\nunit = 'users'\n\
             event_type = 'session'\nvalue = '$.user'\n\
             [meters.peak_builds]\naggregation = 'max'\nunit = 'builds'\n",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        );
        let catalog = Catalog::from_toml(&toml).unwrap();
        let mut record = Customer::new_default(&catalog);
        record.stripe_customer_id = Some("cus_1".into());
        store.put_customer("a", &record).await.unwrap();
        let last: HashSet<String> = ["active_users", "peak_builds", "wasm_modules"]
            .map(String::from)
            .into();
        let mut offset = 0;
        let mut add = async |meter: &str, value: u64, user: Option<&str>, t: &str| {
            let mut event = UsageEvent {
                id: offset.to_string(),
                source: "s".into(),
                customer: "a".into(),
                meter: meter.into(),
                value,
                time_ms: ms(t),
                received_ms: ms(t),
                readings: Vec::new(),
            };
            if let Some(user) = user {
                let data = serde_json::json!({ "user": user });
                event.readings = catalog
                    .event_type("session")
                    .unwrap()
                    .readings(&tally_schemas::path::Payload::Value(&data))
                    .unwrap();
            }
            let rec = Record {
                partition: 0,
                offset,
                event,
            };
            offset += 1;
            store
                .apply(&Rollup::from_records(&[rec], &catalog))
                .await
                .unwrap();
        };
        let settle = Duration::from_secs(120);
        let mut marks = HashMap::new();
        let mut sent: Vec<Report> = Vec::new();
        let mut round = async |marks: &mut HashMap<(String, String), Mark>, now: &str| {
            let reports = plan_round(&catalog, &store, ms(now), settle, &last, marks)
                .await
                .unwrap();
            let mut got: Vec<(String, u64)> = reports
                .iter()
                .filter(|r| r.figure)
                .map(|r| (r.meter.clone(), r.value))
                .collect();
            got.sort();
            sent.extend(reports);
            got
        };
        let pair = |m: &str, v: u64| (m.to_owned(), v);
        add("session", 0, Some("ann"), "2026-11-05T00:00:00Z").await;
        add("session", 0, Some("bob"), "2026-11-05T00:01:00Z").await;
        add("peak_builds", 4, None, "2026-11-05T00:00:00Z").await;
        add("wasm_modules", 3, None, "2026-11-05T00:00:00Z").await;
        assert_eq!(
            round(&mut marks, "2026-11-06T00:00:00Z").await,
            [
                pair("active_users", 2),
                pair("peak_builds", 4),
                pair("wasm_modules", 3)
            ]
        );
        assert!(round(&mut marks, "2026-11-06T00:10:00Z").await.is_empty());
        // A known user, a lower peak, the gauge going down: only the gauge changed.
        add("session", 0, Some("ann"), "2026-11-07T00:00:00Z").await;
        add("peak_builds", 2, None, "2026-11-07T00:00:00Z").await;
        add("wasm_modules", 1, None, "2026-11-07T00:00:00Z").await;
        assert_eq!(
            round(&mut marks, "2026-11-08T00:00:00Z").await,
            [pair("wasm_modules", 1)]
        );
        // The gauge back to 3: a new report, not the first one again.
        add("wasm_modules", 3, None, "2026-11-09T00:00:00Z").await;
        assert_eq!(
            round(&mut marks, "2026-11-10T00:00:00Z").await,
            [pair("wasm_modules", 3)]
        );
        // December: the distinct count and the peak start again; the gauge carries over, so
        // December's first report of it is 3. A late November user is reported in November.
        add("session", 0, Some("cy"), "2026-12-02T00:00:00Z").await;
        add("session", 0, Some("dee"), "2026-11-30T23:00:00Z").await;
        let dec = round(&mut marks, "2026-12-03T00:00:00Z").await;
        assert_eq!(
            dec,
            [pair("active_users", 3), pair("wasm_modules", 3)],
            "November's users first"
        );
        let dec = round(&mut marks, "2026-12-03T00:10:00Z").await;
        assert_eq!(dec, [pair("active_users", 1)]);
        let gauge: Vec<&Report> = sent.iter().filter(|r| r.meter == "wasm_modules").collect();
        let ids: HashSet<&str> = gauge.iter().map(|r| r.identifier.as_str()).collect();
        assert_eq!(
            ids.len(),
            gauge.len(),
            "every report has its own identifier"
        );
        let nov: Vec<i64> = gauge
            .iter()
            .filter(|r| r.period_start_ms == ms("2026-11-01T00:00:00Z"))
            .map(|r| r.timestamp_s)
            .collect();
        assert_eq!(nov.len(), 3);
        assert!(nov.windows(2).all(|w| w[0] < w[1]), "{nov:?}");
        let late = sent
            .iter()
            .find(|r| r.meter == "active_users" && r.value == 3)
            .unwrap();
        assert!(
            late.timestamp_s * 1000 < ms("2026-12-01T00:00:00Z"),
            "within November"
        );
        assert_eq!(
            late.identifier,
            format!(
                "tally:a:active_users:{}:last2:3",
                ms("2026-11-01T00:00:00Z")
            )
        );
        assert!(
            sent.iter().all(|r| r.meter != "edge_deployments"),
            "gauges not named are not reported"
        );
    }

    #[test]
    fn a_mark_written_before_ranges_is_upgraded() {
        let catalog = Catalog::builtin();
        let record = Customer::new_default(&catalog);
        let nov = ms("2026-11-01T00:00:00Z");
        let old = format!(
            r#"{{"reported":{{"{nov}":100}},"pending":{{"customer":"a","meter":"api_requests",
            "stripe_customer_id":"cus_1","event_name":"api_requests","value":5,
            "period_start_ms":{nov},"period_total":105,"counted_until_ms":{nov},
            "timestamp_s":0,"identifier":"tally:a:api_requests:{nov}:105"}}}}"#
        );
        let mut mark: Mark = serde_json::from_str(&old).unwrap();
        mark.upgrade(&record);
        let dec = ms("2026-12-01T00:00:00Z");
        assert_eq!(
            mark.ranges,
            [Reported {
                start_ms: nov,
                end_ms: dec,
                total: 100
            }]
        );
        assert_eq!(mark.pending.as_ref().unwrap().period_end_ms, dec);
        assert!(mark.reported.is_empty());
        let again: Mark = serde_json::from_str(&serde_json::to_string(&mark).unwrap()).unwrap();
        assert_eq!(again, mark);
    }
}
