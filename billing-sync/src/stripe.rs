//! The one place Tally talks to Stripe's meter API.
//!
//! v1 meter events (`POST /v1/billing/meter_events`) go through async-stripe
//! (`CreateBillingMeterEvent`), with the report's identifier both as the event's `identifier`
//! and as the `Idempotency-Key`: a request repeated after a timeout or a crash gets Stripe's
//! stored answer, and an identifier Stripe already holds is answered `resource_already_exists`,
//! which means the report was already accepted.
//!
//! Outcomes are sorted for the caller: accepted (or already accepted), retryable (429, 5xx,
//! timeouts, connection failures: retry later with the same identifier), rejected (any other
//! 4xx: a validation error; retrying would not help).

use std::collections::HashMap;
use std::time::Duration;

use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use stripe_billing::BillingMeterEventAdjustmentType;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_adjustment::{
    CreateBillingMeterEventAdjustment, CreateBillingMeterEventAdjustmentCancel,
};

use crate::Report;

/// An idempotency key, or the refusal a report gets when its identifier cannot be one.
fn idempotency_key(raw: String) -> Result<IdempotencyKey, Outcome> {
    IdempotencyKey::new(raw).map_err(|e| Outcome::Rejected {
        status: 0,
        message: format!("identifier unusable as an idempotency key: {e}"),
    })
}

/// What Stripe made of one meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stripe holds the event (now, or from an earlier attempt).
    Accepted,
    /// Try again later with the same identifier.
    Retryable(String),
    /// Stripe refused on grounds of the account, the key or the configuration (401, 403, 404,
    /// a missing meter or customer): nothing is wrong with the event, so it stays pending and
    /// is sent again next round, until an operator fixes what Stripe names.
    Held { status: u16, message: String },
    /// Stripe refused the event itself; the message says why.
    Rejected { status: u16, message: String },
}

/// Stripe's error codes that fault one event's content (a value, a timestamp, a missing or
/// malformed parameter): only these set a report aside. Any other refusal is
/// [`Outcome::Held`].
const EVENT_ERRORS: &[&str] = &[
    "parameter_invalid",
    "parameter_invalid_empty",
    "parameter_invalid_integer",
    "parameter_invalid_string_blank",
    "parameter_invalid_string_empty",
    "parameter_missing",
    "parameter_unknown",
    "timestamp_outside_window",
    "timestamp_too_far_in_past",
    "timestamp_in_future",
];

/// The outcome of a refusal Stripe answered with `status` and error `code`.
pub fn refusal(status: u16, code: &str, message: String) -> Outcome {
    if status == 429 || status >= 500 || status == 409 {
        // 409: an idempotent request still in flight at Stripe.
        Outcome::Retryable(format!("{status}: {message}"))
    } else if status == 400 && EVENT_ERRORS.contains(&code) {
        Outcome::Rejected { status, message }
    } else {
        Outcome::Held { status, message }
    }
}

/// A Stripe client for meter events.
pub struct StripeMeters {
    client: Client,
    timeout: Duration,
    /// For the read calls of `reconcile` (plain GETs; async-stripe's meter types would add a
    /// feature build for two calls).
    http: reqwest::Client,
    api_base: String,
    secret_key: String,
}

impl StripeMeters {
    /// `api_base` is Stripe's API (`https://api.stripe.com`) or a compatible test server.
    pub fn new(secret_key: &str, api_base: &str, timeout: Duration) -> Result<Self, String> {
        let client = ClientBuilder::new(secret_key)
            .url(api_base)
            // Retries are billing-sync's (with its rate limit and backoff), not the client's.
            .request_strategy(RequestStrategy::Once)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(StripeMeters {
            client,
            timeout,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?,
            api_base: api_base.trim_end_matches('/').to_owned(),
            secret_key: secret_key.to_owned(),
        })
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<serde_json::Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.api_base))
            .bearer_auth(&self.secret_key)
            .query(query)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{path}: {status}: {}", body["error"]["message"]));
        }
        Ok(body)
    }

    /// Every item of a Stripe list endpoint, following `has_more` / `starting_after`.
    async fn list_all(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<serde_json::Value>, String> {
        let mut items = Vec::new();
        loop {
            let mut q = query.to_vec();
            q.push(("limit", "100".to_owned()));
            if let Some(last) = items
                .last()
                .and_then(|v: &serde_json::Value| v["id"].as_str())
            {
                q.push(("starting_after", last.to_owned()));
            }
            let page = self.get(path, &q).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            let more = page["has_more"].as_bool() == Some(true) && !data.is_empty();
            items.extend(data);
            if !more {
                return Ok(items);
            }
        }
    }

    /// Stripe meter id per `event_name` (`GET /v1/billing/meters`).
    pub async fn meters(&self) -> Result<HashMap<String, String>, String> {
        Ok(self
            .list_all("/v1/billing/meters", &[])
            .await?
            .iter()
            .filter_map(|m| {
                Some((
                    m["event_name"].as_str()?.to_owned(),
                    m["id"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// What Stripe aggregated for one customer on one meter over `[start_s, end_s)`
    /// (`GET /v1/billing/meters/{id}/event_summaries`).
    pub async fn summary(
        &self,
        meter_id: &str,
        stripe_customer_id: &str,
        start_s: i64,
        end_s: i64,
    ) -> Result<f64, String> {
        let query = [
            ("customer", stripe_customer_id.to_owned()),
            ("start_time", start_s.to_string()),
            ("end_time", end_s.to_string()),
        ];
        Ok(self
            .list_all(
                &format!("/v1/billing/meters/{meter_id}/event_summaries"),
                &query,
            )
            .await?
            .iter()
            .filter_map(|s| s["aggregated_value"].as_f64())
            .sum())
    }

    /// A request's answer within the timeout, classified.
    async fn outcome<T>(
        &self,
        sent: impl std::future::Future<Output = Result<T, StripeError>>,
    ) -> Outcome {
        match tokio::time::timeout(self.timeout, sent).await {
            Err(_) => Outcome::Retryable("timed out".into()),
            Ok(Ok(_)) => Outcome::Accepted,
            Ok(Err(e)) => classify(e),
        }
    }

    /// Cancels a meter event Stripe accepted (within 24 hours of receiving it) with a meter
    /// event adjustment, idempotently.
    pub async fn cancel(&self, event_name: &str, identifier: &str) -> Outcome {
        let key = match idempotency_key(format!("cancel:{identifier}")) {
            Ok(k) => k,
            Err(refused) => return refused,
        };
        let mut cancel = CreateBillingMeterEventAdjustmentCancel::new();
        cancel.identifier = Some(identifier.to_owned());
        let request = CreateBillingMeterEventAdjustment::new(
            event_name,
            BillingMeterEventAdjustmentType::Cancel,
        )
        .cancel(cancel);
        let sent = stripe::StripeRequest::customize(&request)
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client);
        self.outcome(sent).await
    }

    /// Sends one report as a v1 meter event.
    pub async fn send(&self, report: &Report) -> Outcome {
        let key = match idempotency_key(report.request_key()) {
            Ok(k) => k,
            Err(refused) => return refused,
        };
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                report.stripe_customer_id.clone(),
            ),
            ("value".to_owned(), report.value.to_string()),
        ]);
        let request = CreateBillingMeterEvent::new(report.event_name.clone(), payload)
            .identifier(report.identifier.clone())
            .timestamp(report.timestamp_s);
        let sent = stripe::StripeRequest::customize(&request)
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client);
        self.outcome(sent).await
    }
}

fn classify(e: StripeError) -> Outcome {
    match e {
        StripeError::Stripe(err, status) => {
            let code = err.code.as_ref().map(|c| c.to_string()).unwrap_or_default();
            let message = err.message.clone().unwrap_or_else(|| code.clone());
            if code == "resource_already_exists" {
                Outcome::Accepted
            } else {
                refusal(status, &code, message)
            }
        }
        StripeError::Timeout => Outcome::Retryable("timed out".into()),
        StripeError::ClientError(m) => Outcome::Retryable(m),
        // An answer Stripe's own client cannot read: a proxy page, a truncated body.
        StripeError::JSONDeserialize(m) => Outcome::Retryable(format!("unreadable reply: {m}")),
        StripeError::ConfigError(m) => Outcome::Held {
            status: 0,
            message: m,
        },
    }
}

/// Stripe's v2 meter event stream: a short-lived session token from
/// `POST /v2/billing/meter_event_session`, then up to 100 events per
/// `POST /v2/billing/meter_event_stream` on the meter-events host.
///
/// Written with reqwest: async-stripe has no v2 types. Events carry the same identifiers as in
/// v1, so a batch sent again after a lost reply is de-duplicated by Stripe.
pub struct MeterEventStream {
    http: reqwest::Client,
    api_base: String,
    events_base: String,
    secret_key: String,
    /// The session token and when to stop using it.
    session: tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// Most events in one stream request.
pub const STREAM_BATCH: usize = 100;

impl MeterEventStream {
    pub fn new(
        secret_key: &str,
        api_base: &str,
        events_base: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        Ok(MeterEventStream {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?,
            api_base: api_base.trim_end_matches('/').to_owned(),
            events_base: events_base.trim_end_matches('/').to_owned(),
            secret_key: secret_key.to_owned(),
            session: tokio::sync::Mutex::new(None),
        })
    }

    async fn token(&self) -> Result<String, Outcome> {
        let mut session = self.session.lock().await;
        if let Some((token, until)) = &*session
            && std::time::Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let r = self
            .http
            .post(format!("{}/v2/billing/meter_event_session", self.api_base))
            .bearer_auth(&self.secret_key)
            .send()
            .await
            .map_err(|e| Outcome::Retryable(format!("session: {e}")))?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r
            .json()
            .await
            .map_err(|e| Outcome::Retryable(format!("session reply: {e}")))?;
        if status != 200 {
            // A session is about the account and key, never about an event.
            let message = format!("session: {}", body["error"]["message"]);
            return Err(match refusal(status, "", message) {
                Outcome::Rejected { status, message } => Outcome::Held { status, message },
                other => other,
            });
        }
        let token = body["authentication_token"]
            .as_str()
            .ok_or_else(|| Outcome::Retryable("session reply without a token".into()))?
            .to_owned();
        // Sessions last 15 minutes; renew well before.
        let until = std::time::Instant::now() + Duration::from_secs(10 * 60);
        *session = Some((token.clone(), until));
        Ok(token)
    }

    /// Sends up to [`STREAM_BATCH`] reports in one request; the outcome is the batch's.
    pub async fn send(&self, reports: &[Report]) -> Outcome {
        let token = match self.token().await {
            Ok(t) => t,
            Err(outcome) => return outcome,
        };
        let events: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "event_name": r.event_name,
                    "identifier": r.identifier,
                    "payload": {"stripe_customer_id": r.stripe_customer_id, "value": r.value.to_string()},
                    "timestamp": tally_schemas::period::rfc3339(r.timestamp_s * 1000),
                })
            })
            .collect();
        let sent = self
            .http
            .post(format!(
                "{}/v2/billing/meter_event_stream",
                self.events_base
            ))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return Outcome::Retryable(e.to_string()),
        };
        let status = r.status().as_u16();
        if status == 200 {
            return Outcome::Accepted;
        }
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        let message = format!("{status}: {}", body["error"]["message"]);
        if status == 401 {
            // The session expired early: a new one next attempt.
            *self.session.lock().await = None;
            return Outcome::Retryable(message);
        }
        refusal(
            status,
            body["error"]["code"].as_str().unwrap_or(""),
            message,
        )
    }
}
