//! A Stripe-compatible fake of the meter-event API, for tests (Stripe is not reachable here).
//!
//! It checks what Stripe checks: `Authorization: Bearer sk_test_...`, form-encoded bodies,
//! required fields, whole-number values, timestamps within the past 35 days and at most 5
//! minutes ahead, `Idempotency-Key` replay (the stored answer, byte for byte) and `identifier`
//! uniqueness (`resource_already_exists`), and that a meter exists for the `event_name`
//! (`resource_missing`). It records what it accepted and fails on demand: 429, 500, refusals
//! with Stripe's codes, or accepting an event and then not answering for a while (a reply lost
//! on the way).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Internal status meaning: drop the connection.
const DROP: u16 = 0;

/// Most events Stripe takes in one v2 stream request.
pub const STREAM_BATCH_LIMIT: usize = 100;

/// A failure to inject into the next request.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this status (429 or 5xx) without accepting the event.
    Status(u16),
    /// Accept the event, then wait this long before answering.
    AcceptThenStall(Duration),
    /// Close the connection without answering (and without accepting the event).
    DropConnection,
    /// Refuse with this status and Stripe error code, as Stripe does (`parameter_invalid`,
    /// `api_key_expired`, `resource_missing`...), without accepting the event.
    Refuse(u16, &'static str),
}

#[derive(Debug, Clone)]
pub struct MeterEvent {
    pub event_name: String,
    pub customer: String,
    pub value: u64,
    pub identifier: String,
    pub timestamp: i64,
}

#[derive(Default)]
pub struct Inner {
    pub accepted: Vec<MeterEvent>,
    identifiers: HashSet<String>,
    /// Stored answers by idempotency key.
    answers: HashMap<String, (u16, String)>,
    pub faults: VecDeque<Fault>,
    /// Requests seen, by answer status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests answered from the idempotency store (v1), or events already held (v2).
    pub replays: u64,
    /// Events cancelled by adjustments.
    pub cancelled: Vec<MeterEvent>,
    /// v2 session tokens handed out.
    tokens: HashSet<String>,
    /// When each v2 stream request arrived.
    pub stream_requests: Vec<std::time::Instant>,
}

#[derive(Clone)]
pub struct StripeFake {
    pub url: String,
    pub inner: Arc<Mutex<Inner>>,
}

impl StripeFake {
    /// Starts the fake on a free port, on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime) -> StripeFake {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/v1/billing/meter_events", post(meter_event))
            .route("/v1/billing/meters", get(meters))
            .route("/v1/billing/meters/{id}/event_summaries", get(summaries))
            .route("/v1/billing/meter_event_adjustments", post(adjustment))
            .route("/v2/billing/meter_event_session", post(session))
            .route("/v2/billing/meter_event_stream", post(stream))
            .with_state(inner.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        StripeFake { url, inner }
    }

    pub fn inject(&self, faults: &[Fault]) {
        self.inner.lock().unwrap().faults.extend(faults);
    }

    /// Accepted value per (Stripe customer, event name).
    pub fn totals(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for e in &self.inner.lock().unwrap().accepted {
            *out.entry((e.customer.clone(), e.event_name.clone()))
                .or_insert(0) += e.value;
        }
        out
    }

    /// Most v2 stream requests that arrived within any one second.
    pub fn peak_stream_rate(&self) -> usize {
        let times = &self.inner.lock().unwrap().stream_requests;
        let mut peak = 0;
        let mut first = 0;
        for (i, t) in times.iter().enumerate() {
            while t.duration_since(times[first]) >= Duration::from_secs(1) {
                first += 1;
            }
            peak = peak.max(i + 1 - first);
        }
        peak
    }

    /// What each (Stripe customer, event name) of a `last` meter holds over all time.
    pub fn lasts(&self) -> BTreeMap<(String, String), u64> {
        let s = self.inner.lock().unwrap();
        let mut keys: Vec<(String, String)> = s
            .accepted
            .iter()
            .filter(|e| LAST_METERS.contains(&e.event_name.as_str()))
            .map(|e| (e.customer.clone(), e.event_name.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let of_key = s
                    .accepted
                    .iter()
                    .filter(|e| (&e.customer, &e.event_name) == (&k.0, &k.1));
                last_of(of_key).map(|v| (k, v))
            })
            .collect()
    }

    pub fn accepted_count(&self) -> usize {
        self.inner.lock().unwrap().accepted.len()
    }
}

fn error(status: u16, kind: &str, code: &str, message: &str) -> (u16, String) {
    (
        status,
        json!({"error": {"type": kind, "code": code, "message": message}}).to_string(),
    )
}

fn reply((status, body): (u16, String)) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

async fn meter_event(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (answer, stall) = handle(&inner, &headers, &body);
    finish(&inner, answer, stall).await
}

/// Counts the answer, stalls if asked to, and answers (or drops the connection).
async fn finish(inner: &Mutex<Inner>, answer: (u16, String), stall: Option<Duration>) -> Response {
    if answer.0 == DROP {
        // Unwinding out of the handler makes the server close the connection unanswered.
        std::panic::resume_unwind(Box::new("stripe fake: connection dropped on purpose"));
    }
    *inner.lock().unwrap().statuses.entry(answer.0).or_insert(0) += 1;
    if let Some(d) = stall {
        tokio::time::sleep(d).await;
    }
    reply(answer)
}

/// What an injected fault does to a request: answer at once (`Err`), or go on and then stall
/// for the returned time, if any.
fn injected(fault: Option<Fault>) -> Result<Option<Duration>, (u16, String)> {
    match fault {
        None => Ok(None),
        Some(Fault::AcceptThenStall(d)) => Ok(Some(d)),
        Some(Fault::DropConnection) => Err((DROP, String::new())),
        Some(Fault::Status(429)) => Err(error(
            429,
            "invalid_request_error",
            "rate_limit",
            "injected failure",
        )),
        Some(Fault::Status(status)) => Err(error(status, "api_error", "", "injected failure")),
        Some(Fault::Refuse(status, code)) => Err(error(
            status,
            "invalid_request_error",
            code,
            "injected refusal",
        )),
    }
}

fn handle(
    inner: &Mutex<Inner>,
    headers: &HeaderMap,
    body: &[u8],
) -> ((u16, String), Option<Duration>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if !authorized(headers) {
        return (
            error(
                401,
                "invalid_request_error",
                "api_key_invalid",
                "Invalid API Key provided",
            ),
            None,
        );
    }
    if !header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
        return (
            error(
                400,
                "invalid_request_error",
                "parameter_invalid",
                "bodies are form-encoded",
            ),
            None,
        );
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let key = header("idempotency-key").map(str::to_owned);
    let mut s = inner.lock().unwrap();
    if let Some(k) = &key
        && let Some(answer) = s.answers.get(k).cloned()
    {
        s.replays += 1;
        return (answer, None);
    }
    let stall = match injected(s.faults.pop_front()) {
        Ok(stall) => stall,
        Err(answer) => return (answer, None),
    };
    let answer = validate(&mut s, &form);
    if let Some(k) = key
        && answer.0 != 400
    {
        // Stripe stores the answer of a request its endpoint executed; one whose parameters
        // failed validation (a 400) saves nothing, so a retry with the key is checked anew.
        s.answers.insert(k, answer.clone());
    }
    (answer, stall)
}

fn validate(s: &mut Inner, form: &HashMap<String, String>) -> (u16, String) {
    let timestamp = match form.get("timestamp").map(|t| t.parse::<i64>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            return error(
                400,
                "invalid_request_error",
                "parameter_invalid",
                "timestamp is not an integer",
            );
        }
    };
    accept(
        s,
        form.get("event_name").map(String::as_str),
        form.get("payload[stripe_customer_id]").map(String::as_str),
        form.get("payload[value]").map(String::as_str),
        timestamp,
        form.get("identifier").cloned(),
    )
}

/// Checks one meter event as Stripe does and records it; the v1 answer.
fn accept(
    s: &mut Inner,
    event_name: Option<&str>,
    customer: Option<&str>,
    value: Option<&str>,
    timestamp: Option<i64>,
    identifier: Option<String>,
) -> (u16, String) {
    let Some(event_name) = event_name else {
        return error(
            400,
            "invalid_request_error",
            "parameter_missing",
            "Missing required param: event_name.",
        );
    };
    let Some(customer) = customer else {
        return error(
            400,
            "invalid_request_error",
            "parameter_missing",
            "Missing required param: payload[stripe_customer_id].",
        );
    };
    if !METERS.contains(&event_name) {
        return error(
            400,
            "invalid_request_error",
            "resource_missing",
            "No active meter found for this event_name",
        );
    }
    if !customer.starts_with("cus_") {
        return error(
            400,
            "invalid_request_error",
            "resource_missing",
            "No such customer",
        );
    }
    let Some(value) = value.and_then(|v| v.parse::<u64>().ok()) else {
        return error(
            400,
            "invalid_request_error",
            "parameter_invalid",
            "payload[value] must be a whole number",
        );
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let timestamp = timestamp.unwrap_or(now);
    if timestamp < now - 35 * 86_400 || timestamp > now + 300 {
        return error(
            400,
            "invalid_request_error",
            "timestamp_outside_window",
            "timestamp must be within the past 35 days and at most 5 minutes in the future",
        );
    }
    let identifier = identifier.unwrap_or_else(|| format!("gen_{}", s.accepted.len()));
    if !s.identifiers.insert(identifier.clone()) {
        return error(
            400,
            "invalid_request_error",
            "resource_already_exists",
            "An event with this identifier already exists",
        );
    }
    s.accepted.push(MeterEvent {
        event_name: event_name.to_owned(),
        customer: customer.to_owned(),
        value,
        identifier: identifier.clone(),
        timestamp,
    });
    (
        200,
        json!({
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": false,
            "payload": {"stripe_customer_id": customer, "value": value.to_string()},
            "timestamp": timestamp,
        })
        .to_string(),
    )
}

/// `POST /v1/billing/meter_event_adjustments` with `type=cancel`: the event with
/// `cancel[identifier]` stops counting; its identifier stays taken.
async fn adjustment(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        return reply(error(
            401,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        ));
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut s = inner.lock().unwrap();
    if let Some(answer) = key.as_ref().and_then(|k| s.answers.get(k).cloned()) {
        s.replays += 1;
        return reply(answer);
    }
    let answer = match (
        form.get("event_name"),
        form.get("type").map(String::as_str),
        form.get("cancel[identifier]"),
    ) {
        (Some(event_name), Some("cancel"), Some(identifier)) => {
            match s
                .accepted
                .iter()
                .position(|e| &e.identifier == identifier && &e.event_name == event_name)
            {
                Some(i) => {
                    let e = s.accepted.remove(i);
                    s.cancelled.push(e);
                    (200, json!({"object": "billing.meter_event_adjustment", "event_name": event_name,
                        "livemode": false, "status": "pending", "type": "cancel",
                        "cancel": {"identifier": identifier}}).to_string())
                }
                None => error(
                    400,
                    "invalid_request_error",
                    "resource_missing",
                    "No such meter event",
                ),
            }
        }
        _ => error(
            400,
            "invalid_request_error",
            "parameter_missing",
            "event_name, type=cancel and cancel[identifier] are required",
        ),
    };
    if let Some(k) = key {
        s.answers.insert(k, answer.clone());
    }
    reply(answer)
}

async fn session(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return reply(error(
            401,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        ));
    }
    let mut s = inner.lock().unwrap();
    let token = format!("mes_tok_{}", s.tokens.len());
    s.tokens.insert(token.clone());
    let expires = tally_schemas::period::rfc3339(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 900)
            * 1000,
    );
    reply((
        200,
        json!({"id": "mes_1", "object": "v2.billing.meter_event_session",
        "authentication_token": token, "expires_at": expires, "livemode": false})
        .to_string(),
    ))
}

/// The v2 stream: up to 100 events, all valid or none recorded; repeated identifiers ignored.
async fn stream(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let (answer, stall) = {
        let mut s = inner.lock().unwrap();
        s.stream_requests.push(std::time::Instant::now());
        if !s.tokens.contains(&token) {
            (
                error(
                    401,
                    "invalid_request_error",
                    "authentication_failed",
                    "invalid session token",
                ),
                None,
            )
        } else {
            match injected(s.faults.pop_front()) {
                Ok(stall) => (stream_events(&mut s, &body), stall),
                Err(answer) => (answer, None),
            }
        }
    };
    finish(&inner, answer, stall).await
}

fn stream_events(s: &mut Inner, body: &[u8]) -> (u16, String) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(
            400,
            "invalid_request_error",
            "parameter_invalid",
            "body is not JSON",
        );
    };
    let Some(events) = v["events"].as_array() else {
        return error(
            400,
            "invalid_request_error",
            "parameter_missing",
            "events is required",
        );
    };
    if events.is_empty() || events.len() > STREAM_BATCH_LIMIT {
        return error(
            400,
            "invalid_request_error",
            "parameter_invalid",
            "between 1 and 100 events",
        );
    }
    // All or nothing: check every event first (on a scratch record with no identifiers, so
    // that duplicates are told apart here), then record the new ones.
    let mut fresh = Vec::with_capacity(events.len());
    for e in events {
        let ts = e["timestamp"]
            .as_str()
            .and_then(tally_schemas::period::parse_rfc3339)
            .map(|ms| ms / 1000);
        let identifier = e["identifier"].as_str().map(str::to_owned);
        let mut scratch = Inner::default();
        let (status, body) = accept(
            &mut scratch,
            e["event_name"].as_str(),
            e["payload"]["stripe_customer_id"].as_str(),
            e["payload"]["value"].as_str(),
            ts,
            identifier.clone(),
        );
        if status != 200 {
            return (status, body);
        }
        fresh.push((identifier, scratch.accepted.pop().expect("accepted")));
    }
    for (identifier, event) in fresh {
        let new = identifier.is_none_or(|id| s.identifiers.insert(id));
        if new {
            s.accepted.push(event);
        } else {
            s.replays += 1;
        }
    }
    (200, "{}".to_owned())
}

/// The meters this Stripe account has: one per Tally meter, `event_name` = meter name.
const METERS: &[&str] = &[
    "api_requests",
    "bandwidth_bytes",
    "build_minutes",
    "active_users",
    "peak_request_bytes",
];

/// The meters created with the `last` formula (the last event's value of the window); the
/// others sum.
const LAST_METERS: &[&str] = &["active_users", "peak_request_bytes"];

/// What a meter with the `last` formula holds: the value of the latest event by timestamp,
/// of the latest received among events of one second.
fn last_of<'a>(events: impl Iterator<Item = &'a MeterEvent>) -> Option<u64> {
    events
        .enumerate()
        .max_by_key(|(i, e)| (e.timestamp, *i))
        .map(|(_, e)| e.value)
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("Bearer sk_test_"))
}

async fn meters(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return reply(error(
            401,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        ));
    }
    let data: Vec<Value> = METERS
        .iter()
        .map(|m| {
            let formula = if LAST_METERS.contains(m) {
                "last"
            } else {
                "sum"
            };
            json!({"id": format!("mtr_{m}"), "object": "billing.meter", "event_name": m,
                   "default_aggregation": {"formula": formula},
                   "status": "active", "livemode": false})
        })
        .collect();
    reply((
        200,
        json!({"object": "list", "data": data, "has_more": false}).to_string(),
    ))
}

async fn summaries(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&headers) {
        return reply(error(
            401,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        ));
    }
    let Some(event_name) = id.strip_prefix("mtr_").filter(|m| METERS.contains(m)) else {
        return reply(error(
            404,
            "invalid_request_error",
            "resource_missing",
            "No such meter",
        ));
    };
    let (Some(customer), Some(start), Some(end)) = (
        q.get("customer"),
        q.get("start_time").and_then(|v| v.parse::<i64>().ok()),
        q.get("end_time").and_then(|v| v.parse::<i64>().ok()),
    ) else {
        return reply(error(
            400,
            "invalid_request_error",
            "parameter_missing",
            "customer, start_time and end_time are required",
        ));
    };
    let s = inner.lock().unwrap();
    let events = s
        .accepted
        .iter()
        .filter(|e| e.event_name == event_name && &e.customer == customer)
        .filter(|e| e.timestamp >= start && e.timestamp < end);
    let total: u64 = if LAST_METERS.contains(&event_name) {
        last_of(events).unwrap_or(0)
    } else {
        events.map(|e| e.value).sum()
    };
    drop(s);
    let data = json!([{"id": "mtrsum_1", "object": "billing.meter_event_summary",
        "aggregated_value": total, "start_time": start, "end_time": end, "meter": id,
        "livemode": false}]);
    reply((
        200,
        json!({"object": "list", "data": data, "has_more": false}).to_string(),
    ))
}

/// The fake's JSON for tests that look at raw answers.
pub fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap()
}
