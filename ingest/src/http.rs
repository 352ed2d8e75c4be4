//! `POST /v1/events`: CloudEvents in, durable log records out.
//!
//! | Content-Type | body |
//! |---|---|
//! | `application/json`, `application/cloudevents+json` | one event (a JSON array is taken as a batch) |
//! | `application/cloudevents-batch+json` | a JSON array of events |
//! | `application/x-ndjson` | one event per line |
//!
//! Reply: 202 `{"accepted", "duplicates", "rejected", "errors": [{"index", "code", "message"}]}`
//! once every accepted event is durable. Invalid events never block the valid ones of the same
//! request; a request whose events are all invalid gets 400. 413 for an oversize body
//! (`body_too_large`) or batch (`too_many_events`), 415 for other content types, 429
//! `rate_limited` with `Retry-After` when the caller's API key is over its event rate, 503 with
//! `Retry-After` when the log cannot take the events (nothing of either request is acknowledged).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tally_schemas::event::{BatchError, decode_batch, decode_event, split_ndjson};
use tally_schemas::{Catalog, Clock, EventError, TimePolicy, UsageEvent};
use utoipa::{OpenApi, ToSchema};

use tally_backends::catalog::LiveCatalog;
use tally_backends::log::EventLog;
use tally_http::problem::{ApiError, EventFault, Problem, from_body_rejection};

use crate::dimensions::DimensionCap;
use crate::metrics;

/// Limits and rules of the ingest endpoint.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Late and future limits on event times.
    pub time_policy: TimePolicy,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            max_body_bytes: 16 * 1024 * 1024,
            max_batch_events: 50_000,
            time_policy: TimePolicy::default(),
        }
    }
}

/// A caller's event allowance, set on the request by the access layer (per API key): given the
/// number of valid events of a request, `Ok` takes them from the allowance, `Err` tells how long
/// to wait before they would fit. Requests without one are not limited.
#[derive(Clone)]
pub struct EventAllowance(pub Arc<dyn Fn(u32) -> Result<(), std::time::Duration> + Send + Sync>);

/// What this process knows of each customer's period totals (an enforcer in the same
/// process): for an event's customer, meter and time, the start of its billing period and how
/// much more that period's total may grow before the usage cap (see
/// [`tally_schemas::quantity`]). `None`: not known here; the stores hold such totals at the cap.
pub type UsageRoom = Arc<dyn Fn(&str, &str, i64) -> Option<(i64, u64)> + Send + Sync>;

/// Everything the ingest handler needs.
#[derive(Clone)]
pub struct IngestState {
    pub log: Arc<dyn EventLog>,
    /// Read once per request: a meter created through the API counts from the next request.
    pub catalog: Arc<LiveCatalog>,
    pub clock: Arc<dyn Clock>,
    pub settings: Arc<IngestSettings>,
    /// Events that would push a known period total past the cap are refused
    /// (`usage_cap_exceeded`).
    pub room: Option<UsageRoom>,
    /// Events that would add a dimension combination past the cap are refused
    /// (`dimension_cap_exceeded`).
    pub dimensions: Arc<DimensionCap>,
}

/// Most per-event errors listed in one reply; the counts stay exact.
const MAX_LISTED_ERRORS: usize = 1_000;
/// Bodies larger than this are decoded off the async workers.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

pub fn router(state: IngestState) -> Router {
    let limit = state.settings.max_body_bytes;
    Router::new()
        .route("/v1/events", post(post_events))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Batch,
    Ndjson,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" | "application/cloudevents+json" => Ok(BodyKind::Json),
        "application/cloudevents-batch+json" => Ok(BodyKind::Batch),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyKind::Ndjson),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json, application/cloudevents+json, \
             application/cloudevents-batch+json or application/x-ndjson",
        )),
    }
}

/// The reply once the request's valid events are durable.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestReply {
    /// Events written to the log.
    pub accepted: usize,
    /// Events whose (source, id) was already counted: acknowledged, not counted again.
    pub duplicates: usize,
    /// Invalid events, listed in `errors`.
    pub rejected: usize,
    pub errors: Vec<EventFault>,
    /// Present (true) when more events were invalid than `errors` lists.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub errors_truncated: bool,
}

/// A usage event as CloudEvents 1.0 JSON (the wire format the decoder reads; described here for
/// the OpenAPI document).
#[derive(ToSchema)]
#[schema(example = json!({"specversion": "1.0", "id": "e-1", "source": "edge-fra-1",
    "type": "api_requests", "subject": "cust_42", "time": "2026-11-21T10:00:00Z",
    "data": {"value": 1}}))]
pub struct CloudEvent {
    /// Must be "1.0".
    pub specversion: String,
    /// Unique per source: the same (source, id) is counted once.
    pub id: String,
    /// The emitting node.
    pub source: String,
    /// The meter (a name from the catalogue).
    #[schema(rename = "type")]
    pub type_: String,
    /// The customer id: 1 to 128 of A-Z a-z 0-9 . _ : @ -.
    pub subject: String,
    /// Event time (RFC 3339); default the time of receipt. Decides the billing period.
    pub time: Option<String>,
    pub data: Option<CloudEventData>,
}

/// The event's quantity.
#[derive(ToSchema)]
pub struct CloudEventData {
    /// A whole number >= 0 in the meter's unit (default 1); a string of digits is accepted.
    pub value: Option<u64>,
}

/// The ingest endpoint's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(post_events),
    components(schemas(CloudEvent, CloudEventData, IngestReply, EventFault)),
    modifiers(&EventCodes)
)]
pub struct IngestApi;

/// Lists every event error code in `EventFault.code`, from [`EventError::CODES`]. Apply it
/// again after merging documents that also carry `EventFault`.
pub struct EventCodes;

impl utoipa::Modify for EventCodes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::Schema;
        let Some(components) = doc.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(fault))) = components.schemas.get_mut("EventFault")
            && let Some(RefOr::T(Schema::Object(code))) = fault.properties.get_mut("code")
        {
            code.enum_values = Some(EventError::CODES.iter().map(|c| (*c).into()).collect());
        }
    }
}

/// The events of one request, decoded.
struct Decoded {
    valid: Vec<UsageEvent>,
    /// The position in the request of each valid event.
    index: Vec<usize>,
    faults: Vec<EventFault>,
    rejected: usize,
    /// The body was one event rather than a batch.
    single: bool,
}

fn decode_body(
    kind: BodyKind,
    text: &str,
    catalog: &Catalog,
    settings: &IngestSettings,
    now_ms: i64,
) -> Result<Decoded, ApiError> {
    let mut out = Decoded {
        valid: Vec::new(),
        index: Vec::new(),
        faults: Vec::new(),
        rejected: 0,
        single: false,
    };
    let policy = &settings.time_policy;
    let take = |index: usize, r: Result<UsageEvent, EventError>, out: &mut Decoded| match r {
        Ok(e) => {
            out.valid.push(e);
            out.index.push(index);
        }
        Err(e) => {
            out.rejected += 1;
            metrics::REJECTED.with_label_values(&[e.code()]).inc();
            if out.faults.len() < MAX_LISTED_ERRORS {
                out.faults.push(EventFault {
                    index,
                    code: e.code(),
                    message: e.to_string(),
                });
            }
        }
    };
    let too_many = |n: usize| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!(
                "a request may carry at most {} events, this one has {n}",
                settings.max_batch_events
            ),
        )
    };
    let is_array = text.trim_start().starts_with('[');
    // The limit holds while decoding: lines or elements past it are counted, never kept.
    match kind {
        BodyKind::Ndjson => {
            let lines = split_ndjson(text).count();
            if lines > settings.max_batch_events {
                return Err(too_many(lines));
            }
            out.valid.reserve(lines);
            for (i, line) in split_ndjson(text).enumerate() {
                take(i, decode_event(line, catalog, policy, now_ms), &mut out);
            }
        }
        BodyKind::Batch | BodyKind::Json if kind == BodyKind::Batch || is_array => {
            let results =
                match decode_batch(text, catalog, policy, now_ms, settings.max_batch_events) {
                    Ok(results) => results,
                    Err(BatchError::TooMany(n)) => return Err(too_many(n)),
                    Err(BatchError::Invalid(e)) => return Err(e.into()),
                };
            out.valid.reserve(results.len());
            for (i, r) in results.into_iter().enumerate() {
                take(i, r, &mut out);
            }
        }
        BodyKind::Json | BodyKind::Batch => {
            out.single = true;
            take(0, decode_event(text, catalog, policy, now_ms), &mut out);
        }
    }
    Ok(out)
}

/// Ingest usage events (CloudEvents 1.0).
///
/// A 202 is sent once every accepted event is durable. The same (source, id) is counted once.
/// Invalid events are reported by index and never block the valid ones of the same request;
/// when every event is invalid the reply is 400.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "ingest",
    request_body(
        description = "One event, a JSON array of events, or NDJSON (one event per line)",
        content(
            (CloudEvent = "application/json"),
            (CloudEvent = "application/cloudevents+json"),
            (Vec<CloudEvent> = "application/cloudevents-batch+json"),
            (String = "application/x-ndjson")
        )
    ),
    responses(
        (status = 202, description = "Accepted events are durable", body = IngestReply),
        (status = 400, description = "Malformed body or every event invalid (code: malformed_json, invalid_type, invalid_events or the single event's code; `errors` lists each event's)", body = Problem),
        (status = 408, description = "body_timeout: the body did not arrive within the body timeout; nothing of it was taken", body = Problem),
        (status = 413, description = "body_too_large or too_many_events", body = Problem),
        (status = 415, description = "unsupported_media_type", body = Problem),
        (status = 429, description = "rate_limited: the API key is over its event rate; nothing of the request was acknowledged. Retry after Retry-After seconds.", body = Problem),
        (status = 503, description = "The log cannot take events now; nothing of the request was acknowledged. Retry after Retry-After seconds.", body = Problem),
    )
)]
async fn post_events(
    State(state): State<IngestState>,
    allowance: Option<Extension<EventAllowance>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| from_body_rejection(&r))?;
    let kind = body_kind(&headers)?;
    let now_ms = state.clock.now_ms();
    let decoded = if body.len() <= INLINE_DECODE_BYTES {
        decode_utf8(kind, &body, &state, now_ms)?
    } else {
        let s = state.clone();
        tokio::task::spawn_blocking(move || decode_utf8(kind, &body, &s, now_ms))
            .await
            .map_err(|e| ApiError::unavailable(&e))??
    };
    let total = decoded.valid.len() + decoded.rejected;
    metrics::EVENTS
        .with_label_values(&["rejected"])
        .inc_by(decoded.rejected as u64);
    if decoded.valid.is_empty() && total > 0 {
        let (code, message) = if decoded.single {
            let f = &decoded.faults[0];
            (f.code, f.message.clone())
        } else {
            ("invalid_events", format!("all {total} events are invalid"))
        };
        return Err(ApiError::bad_request(code, message)
            .with("rejected", decoded.rejected)
            .with(
                "errors",
                serde_json::to_value(&decoded.faults).unwrap_or_default(),
            ));
    }
    if let Some(Extension(allowance)) = allowance
        && let Err(wait) = (allowance.0)(decoded.valid.len().min(u32::MAX as usize) as u32)
    {
        metrics::EVENTS
            .with_label_values(&["rate_limited"])
            .inc_by(decoded.valid.len() as u64);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this API key is over its event rate; retry in {} ms",
                wait.as_millis()
            ),
        );
        e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return Err(e);
    }
    let started = std::time::Instant::now();
    let outcome = state
        .log
        .append(decoded.valid)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    metrics::APPEND_SECONDS.observe(started.elapsed().as_secs_f64());
    metrics::EVENTS
        .with_label_values(&["accepted"])
        .inc_by(outcome.accepted as u64);
    metrics::EVENTS
        .with_label_values(&["duplicate"])
        .inc_by(outcome.duplicates as u64);
    let reply = IngestReply {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected: decoded.rejected,
        errors_truncated: decoded.rejected > decoded.faults.len(),
        errors: decoded.faults,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(reply)).into_response())
}

fn decode_utf8(
    kind: BodyKind,
    body: &[u8],
    state: &IngestState,
    now_ms: i64,
) -> Result<Decoded, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("malformed_json", "the body is not UTF-8"))?;
    let catalog = state.catalog.get();
    let mut decoded = decode_body(kind, text, &catalog, &state.settings, now_ms)?;
    if let Some(room) = &state.room {
        refuse_past_cap(&mut decoded, room);
    }
    refuse_past_dimension_cap(&mut decoded, &state.dimensions);
    Ok(decoded)
}

/// Moves the valid events that would push their customer's period total past the usage cap
/// (what the process counted so far plus the earlier events of this request) to the faults.
fn refuse_past_cap(decoded: &mut Decoded, room: &UsageRoom) {
    // A customer whose room holds the whole request's usage needs no per-event bookkeeping
    // (the usual case: no strings are copied).
    let request_total = decoded
        .valid
        .iter()
        .flat_map(|e| e.readings())
        .fold(0u64, |t, r| t.saturating_add(r.value));
    let mut left: HashMap<(String, String, i64), u64> = HashMap::new();
    let mut keep = vec![true; decoded.valid.len()];
    for (n, e) in decoded.valid.iter().enumerate() {
        // What the event takes from each (customer, meter, period), one reading per meter: all
        // of it fits, or the event is refused and takes nothing.
        let mut takes: Vec<((String, String, i64), u64)> = Vec::new();
        let mut fits = true;
        for r in e.readings() {
            if r.value == 0 {
                continue;
            }
            let Some((period, known)) = room(&e.customer, r.meter, e.time_ms) else {
                continue;
            };
            if known >= request_total {
                continue;
            }
            let key = (e.customer.clone(), r.meter.to_owned(), period);
            if r.value > *left.entry(key.clone()).or_insert(known) {
                fits = false;
                break;
            }
            takes.push((key, r.value));
        }
        if fits {
            for (key, v) in takes {
                if let Some(l) = left.get_mut(&key) {
                    *l -= v;
                }
            }
        } else {
            keep[n] = false;
        }
    }
    refuse(decoded, &keep, &EventError::UsageCapExceeded);
}

/// Moves the events that would pass the cap of distinct dimension combinations or of distinct
/// values to the faults (see [`crate::dimensions`]).
fn refuse_past_dimension_cap(decoded: &mut Decoded, cap: &DimensionCap) {
    let mut verdicts: Vec<Result<(), EventError>> =
        decoded.valid.iter().map(|e| cap.admit(e)).collect();
    // One refusal at a time: `refuse` lists every event it drops under one error.
    while let Some(e) = verdicts.iter().find_map(|v| v.clone().err()) {
        let keep: Vec<bool> = verdicts
            .iter()
            .map(|v| v.as_ref().err() != Some(&e))
            .collect();
        refuse(decoded, &keep, &e);
        verdicts.retain(|v| v.as_ref().err() != Some(&e));
    }
}

/// Drops the valid events not kept and lists them, at their request `index`, as faults `e`.
fn refuse(decoded: &mut Decoded, keep: &[bool], e: &EventError) {
    let refused: Vec<usize> = keep
        .iter()
        .zip(&decoded.index)
        .filter(|(k, _)| !**k)
        .map(|(_, i)| *i)
        .collect();
    if refused.is_empty() {
        return;
    }
    (decoded.valid, decoded.index) = std::mem::take(&mut decoded.valid)
        .into_iter()
        .zip(std::mem::take(&mut decoded.index))
        .zip(keep.iter().copied())
        .filter_map(|(pair, keep)| keep.then_some(pair))
        .unzip();
    metrics::REJECTED
        .with_label_values(&[e.code()])
        .inc_by(refused.len() as u64);
    decoded.rejected += refused.len();
    for index in refused {
        if decoded.faults.len() < MAX_LISTED_ERRORS {
            decoded.faults.push(EventFault {
                index,
                code: e.code(),
                message: e.to_string(),
            });
        }
    }
    decoded.faults.sort_by_key(|f| f.index);
}
