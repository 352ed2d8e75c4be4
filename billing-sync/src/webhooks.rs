//! `POST /v1/webhooks/stripe`: learning plans, billing periods and payment state from Stripe.
//!
//! # Verification
//! The `Stripe-Signature` header (`t=<unix seconds>,v1=<hex>,v1=<hex>...`) must carry a `v1`
//! HMAC-SHA256 of `"<t>.<raw body>"` under the endpoint's signing secret (any one of several
//! `v1` values may match, as during a secret roll; compared in constant time), and `t` must be
//! within 300 s of now. Anything else is refused with 400 and a code (`missing_signature`,
//! `invalid_signature`, `signature_expired`), and nothing is applied.
//!
//! # Events
//! - `customer.subscription.created` / `updated` of a subscription that is paid for (status
//!   `active`, `trialing` or `past_due`): the customer's plan (the subscription's first
//!   price, or its product, mapped through `stripe_plans`; a price whose `lookup_key` is a plan
//!   id needs no mapping), its current billing period (`current_period_start` / `_end`, on the
//!   subscription or, in newer API versions, on its item) and its Stripe customer id. Limits
//!   are monthly: a subscription billed yearly (or over several months) sets the anchor of
//!   monthly quota periods, not one long period.
//! - Any other status (`incomplete`, `incomplete_expired`, `unpaid`, `paused`, `canceled`)
//!   grants no paid plan: the customer is on the default plan (`unpaid`: the fallback plan).
//! - `customer.subscription.deleted`: back to the catalogue's default plan; the period follows
//!   the last one's anchor.
//! - The plan follows one subscription at a time, the newest (by the subscription's own
//!   `created`) that was paid for: events of an older subscription the customer replaced
//!   (its `deleted` above all) and of a newer one not paid for yet change nothing
//!   (`other_subscription`).
//! - `invoice.payment_failed`: the 7-day payment grace starts at the event's time (if not
//!   already running); `invoice.payment_succeeded` / `invoice.paid`: it ends.
//! - `v1.billing.meter.error_report_triggered`: Stripe could not process some meter events;
//!   the report is logged, counted and shown by `GET /v1/billing/status`.
//!
//! The Tally customer is the subscription's `metadata.tally_customer_id`, else the customer
//! linked to the Stripe customer id. Stripe delivers at least once and in any order: each record
//! keeps the (`created`, id) of the latest event applied of its current subscription and of its
//! invoices, and an event that is not newer is acknowledged without being applied. Other event types are acknowledged
//! and ignored.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tally_backends::catalog::LiveCatalog;
use tally_backends::store::Store;
use tally_http::problem::ApiError;
use tally_schemas::period::Period;
use tally_schemas::{Clock, Customer};

/// Largest gap between a signature's timestamp and now.
pub const TOLERANCE_SECS: i64 = 300;

/// Called with every customer record a webhook changed (the enforcer, when it runs in the same
/// process; other processes pick changes up from the store).
pub type OnChange =
    Arc<dyn Fn(String, Customer) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct StripeWebhooks {
    /// `None`: the endpoint answers that it is not configured.
    pub secret: Option<String>,
    /// Plan id by Stripe price or product id.
    pub plans: HashMap<String, String>,
    /// Read per event: its meters matter to which limits a change touches.
    pub catalog: Arc<LiveCatalog>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub on_change: Option<OnChange>,
    /// Where meter error reports are recorded for `GET /v1/billing/status`.
    pub status: crate::StatusHandle,
}

pub fn router(hooks: Arc<StripeWebhooks>) -> Router {
    Router::new()
        .route("/v1/webhooks/stripe", post(receive))
        .with_state(hooks)
}

/// Checks `header` against `body` (see the module docs).
pub fn verify(secret: &str, header: &str, body: &[u8], now_s: i64) -> Result<(), ApiError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t else {
        return Err(ApiError::bad_request(
            "invalid_signature",
            "Stripe-Signature has no timestamp",
        ));
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let valid = signatures
        .iter()
        .any(|sig| mac.clone().verify_slice(sig).is_ok());
    if !valid {
        return Err(ApiError::bad_request(
            "invalid_signature",
            "no v1 signature matches the payload",
        ));
    }
    if (now_s - t).abs() > TOLERANCE_SECS {
        return Err(ApiError::bad_request(
            "signature_expired",
            format!("the signature's timestamp is more than {TOLERANCE_SECS} s from now"),
        ));
    }
    Ok(())
}

/// A Stripe event's envelope: what the webhook endpoint reads before acting on it.
#[derive(Debug, Clone, PartialEq)]
pub struct StripeEvent {
    pub id: String,
    pub kind: String,
    pub created: i64,
    /// `data.object` (`null` when absent).
    pub object: Value,
}

/// Parses a (signature-checked) webhook body: 400 `malformed_json` or `invalid_event` when it is
/// not a Stripe event.
pub fn parse_event(body: &[u8]) -> Result<StripeEvent, ApiError> {
    let mut event: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("event: {e}")))?;
    let (Some(id), Some(kind), Some(created)) = (
        event["id"].as_str(),
        event["type"].as_str(),
        event["created"].as_i64(),
    ) else {
        return Err(ApiError::bad_request(
            "invalid_event",
            "an event needs `id`, `type` and `created`",
        ));
    };
    let (id, kind) = (id.to_owned(), kind.to_owned());
    let object = event
        .get_mut("data")
        .and_then(|d| d.get_mut("object"))
        .map(Value::take)
        .unwrap_or(Value::Null);
    Ok(StripeEvent {
        id,
        kind,
        created,
        object,
    })
}

/// Stripe webhook endpoint: subscription and invoice events set plans, billing periods and
/// payment state; meter error reports are recorded. Requires a valid `Stripe-Signature`
/// (HMAC-SHA256, 300 s tolerance).
#[utoipa::path(
    post,
    path = "/v1/webhooks/stripe",
    tag = "billing",
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"t.body\">")),
    request_body(content = Object, description = "A Stripe event", content_type = "application/json"),
    responses(
        (status = 200, description = "Handled, or ignored (`{\"received\": true, ...}`)", body = Object),
        (status = 400, description = "missing_signature, invalid_signature, signature_expired or malformed_json", body = tally_http::problem::Problem),
        (status = 404, description = "not_configured: no stripe_webhook_secret", body = tally_http::problem::Problem),
        (status = 503, description = "The store is unavailable; Stripe retries", body = tally_http::problem::Problem),
    )
)]
pub(crate) async fn receive(
    State(hooks): State<Arc<StripeWebhooks>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &hooks.secret else {
        return Err(ApiError::not_found(
            "not_configured",
            "Stripe webhooks are not configured (stripe_webhook_secret)",
        ));
    };
    let Some(header) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return Err(ApiError::bad_request(
            "missing_signature",
            "Stripe-Signature header is required",
        ));
    };
    verify(secret, header, &body, hooks.clock.now_ms().div_euclid(1000))?;
    let event = parse_event(&body)?;
    let (id, kind, created, object) = (
        event.id.as_str(),
        event.kind.as_str(),
        event.created,
        &event.object,
    );
    let outcome = match kind {
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            hooks
                .apply_subscription(id, created, kind.ends_with("deleted"), object)
                .await?
        }
        "invoice.payment_failed" | "invoice.payment_succeeded" | "invoice.paid" => {
            hooks
                .apply_invoice(id, created, kind == "invoice.payment_failed", object)
                .await?
        }
        // Stripe's reports of meter events it could not process (sent asynchronously, as for
        // the v2 stream): recorded for operators, and counted.
        "v1.billing.meter.error_report_triggered" | "billing.meter.error_report_triggered" => {
            crate::metrics::REPORTS
                .with_label_values(&["error_report"])
                .inc();
            tracing::error!(event = id, report = %object, "Stripe reported meter event errors");
            hooks.status.record_error_report(json!({
                "event": id,
                "created": created,
                "report": object,
            }));
            "recorded"
        }
        _ => "ignored",
    };
    tracing::info!(event = id, kind, outcome, "Stripe webhook");
    Ok(Json(json!({"received": true, "outcome": outcome})))
}

fn newer(last: &Option<(i64, String)>, created: i64, id: &str) -> bool {
    match last {
        None => true,
        Some((t, last_id)) => created > *t || (created == *t && last_id != id),
    }
}

/// Whether a subscription bills by the year (its first price's interval, or a period longer
/// than any month).
fn yearly(sub: &Value) -> bool {
    let item = &sub["items"]["data"][0];
    let interval = item["price"]["recurring"]["interval"]
        .as_str()
        .or(item["plan"]["interval"].as_str())
        .or(sub["plan"]["interval"].as_str());
    let count = item["price"]["recurring"]["interval_count"]
        .as_i64()
        .unwrap_or(1);
    let months = match interval {
        Some("year") => 12 * count,
        Some("month") => count,
        _ => 1,
    };
    let long = match (
        sub["current_period_start"]
            .as_i64()
            .or(item["current_period_start"].as_i64()),
        sub["current_period_end"]
            .as_i64()
            .or(item["current_period_end"].as_i64()),
    ) {
        (Some(start), Some(end)) => end - start > 31 * 86_400,
        _ => false,
    };
    months > 1 || long
}

impl StripeWebhooks {
    /// The Tally customer an object belongs to, with its record.
    async fn customer_of(&self, object: &Value) -> Result<Option<(String, Customer)>, ApiError> {
        let stripe_id = object["customer"].as_str();
        let unavailable = |e: tally_backends::Error| ApiError::unavailable(&e);
        if let Some(id) = object["metadata"]["tally_customer_id"].as_str() {
            tally_schemas::event::check_customer_id(id)?;
            let record = self
                .store
                .customer(id)
                .await
                .map_err(unavailable)?
                .unwrap_or_else(|| Customer::new_default(self.catalog.base()));
            return Ok(Some((id.to_owned(), record)));
        }
        let Some(stripe_id) = stripe_id else {
            return Ok(None);
        };
        Ok(self
            .store
            .customers_since(0)
            .await
            .map_err(unavailable)?
            .into_iter()
            .find(|(_, c)| c.stripe_customer_id.as_deref() == Some(stripe_id)))
    }

    fn plan_of(&self, subscription: &Value) -> Option<String> {
        let price = &subscription["items"]["data"][0]["price"];
        let candidates = [
            price["id"].as_str(),
            price["product"].as_str(),
            price["lookup_key"].as_str(),
            subscription["plan"]["id"].as_str(),
        ];
        candidates.into_iter().flatten().find_map(|k| {
            self.plans
                .get(k)
                .cloned()
                .or_else(|| self.catalog.base().plan(k).map(|_| k.to_owned()))
        })
    }

    /// Stores `record`, the change of `before` (the record as read), noting limit changes.
    async fn save(
        &self,
        id: String,
        before: &Customer,
        mut record: Customer,
    ) -> Result<(), ApiError> {
        record.updated_ms = self.clock.now_ms();
        record.note_limit_changes(before, &self.catalog.get(), record.updated_ms);
        self.store
            .put_customer(&id, &record)
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        if let Some(f) = &self.on_change {
            f(id, record).await;
        }
        Ok(())
    }

    async fn apply_subscription(
        &self,
        event_id: &str,
        created: i64,
        deleted: bool,
        sub: &Value,
    ) -> Result<&'static str, ApiError> {
        let Some((id, mut record)) = self.customer_of(sub).await? else {
            return Ok("unknown_customer");
        };
        let before = record.clone();
        let this = (
            sub["created"].as_i64().unwrap_or(0),
            sub["id"].as_str().unwrap_or_default().to_owned(),
        );
        let status = sub["status"].as_str().unwrap_or("active");
        // Stripe's statuses of a subscription that is paid for (past_due: the invoice is being
        // retried, and the payment grace runs from `invoice.payment_failed`).
        let grants = !deleted && matches!(status, "active" | "trialing" | "past_due");
        let events = record.stripe_events.get_or_insert_with(Default::default);
        match &events.current_subscription {
            Some(current) if current.1 != this.1 => {
                // Another subscription than the one the plan follows: an older one (replaced,
                // now ending) changes nothing; a newer one takes over once it is paid for.
                if this < *current || !grants {
                    return Ok("other_subscription");
                }
                events.subscription = None;
            }
            _ => {}
        }
        if !newer(&events.subscription, created, event_id) {
            return Ok("stale");
        }
        events.subscription = Some((created, event_id.to_owned()));
        events.current_subscription = Some(this);
        if let Some(stripe_id) = sub["customer"].as_str() {
            record.stripe_customer_id = Some(stripe_id.to_owned());
        }
        if !grants {
            // Ended, or not (or no longer) paid for: incomplete, incomplete_expired, unpaid,
            // paused, canceled.
            record.plan = if status == "unpaid" {
                self.catalog.base().policy.fallback_plan.clone()
            } else {
                self.catalog.base().policy.default_plan.clone()
            };
            if deleted && let Some(p) = record.current_period.take() {
                record.period_anchor_ms = Some(p.start_ms);
            }
            self.save(id, &before, record).await?;
            return Ok("applied");
        }
        match self.plan_of(sub) {
            Some(plan) => record.plan = plan,
            None => tracing::warn!(
                customer = %id,
                "subscription's price maps to no plan (stripe_plans); plan unchanged"
            ),
        }
        let item = &sub["items"]["data"][0];
        let start = sub["current_period_start"]
            .as_i64()
            .or(item["current_period_start"].as_i64());
        let end = sub["current_period_end"]
            .as_i64()
            .or(item["current_period_end"].as_i64());
        if let (Some(start), Some(end)) = (start, end)
            && start < end
        {
            record.period_anchor_ms = Some(start * 1000);
            // Limits are monthly: a yearly (or longer) subscription's period holds twelve
            // quota periods anchored on its start, not one.
            record.current_period = (!yearly(sub)).then_some(Period {
                start_ms: start * 1000,
                end_ms: end * 1000,
            });
        }
        self.save(id, &before, record).await?;
        Ok("applied")
    }

    async fn apply_invoice(
        &self,
        event_id: &str,
        created: i64,
        failed: bool,
        invoice: &Value,
    ) -> Result<&'static str, ApiError> {
        let Some((id, mut record)) = self.customer_of(invoice).await? else {
            return Ok("unknown_customer");
        };
        let before = record.clone();
        let events = record.stripe_events.get_or_insert_with(Default::default);
        if !newer(&events.invoice, created, event_id) {
            return Ok("stale");
        }
        events.invoice = Some((created, event_id.to_owned()));
        if failed {
            // The grace runs from the first failure, not from each retry of the charge.
            record.payment_failed_at_ms.get_or_insert(created * 1000);
        } else {
            record.payment_failed_at_ms = None;
        }
        self.save(id, &before, record).await?;
        Ok("applied")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_backends::store::sqlite::SqliteStore;
    use tally_schemas::ManualClock;

    const DAY: i64 = 86_400;

    fn hooks(dir: &std::path::Path) -> StripeWebhooks {
        let catalog = LiveCatalog::fixed(tally_schemas::Catalog::builtin());
        StripeWebhooks {
            secret: None,
            plans: [
                ("price_pro", "professional"),
                ("price_pro_year", "professional"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            catalog,
            store: Arc::new(SqliteStore::open(dir.join("u.db")).unwrap()),
            clock: Arc::new(ManualClock::new(1_796_000_000_000)),
            on_change: None,
            status: crate::StatusHandle::default(),
        }
    }

    /// A subscription object of customer `c`.
    fn sub(id: &str, created: i64, status: &str, price: &str, start: i64, end: i64) -> Value {
        let interval = if price.ends_with("year") {
            "year"
        } else {
            "month"
        };
        json!({"id": id, "object": "subscription", "created": created, "status": status,
               "customer": "cus_c", "metadata": {"tally_customer_id": "c"},
               "current_period_start": start, "current_period_end": end,
               "items": {"data": [{"price": {"id": price,
                   "recurring": {"interval": interval, "interval_count": 1}}}]}})
    }

    async fn plan(h: &StripeWebhooks) -> String {
        h.store.customer("c").await.unwrap().unwrap().plan
    }

    #[tokio::test]
    async fn the_deletion_of_a_replaced_subscription_keeps_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let h = hooks(dir.path());
        let t = 1_795_000_000;
        let old = sub("sub_old", t, "active", "price_pro", t, t + 30 * DAY);
        assert_eq!(
            h.apply_subscription("evt_1", t, false, &old).await.unwrap(),
            "applied"
        );
        // The customer subscribes again, then the old subscription is cancelled.
        let new = sub(
            "sub_new",
            t + 10,
            "active",
            "price_pro",
            t + 10,
            t + 10 + 30 * DAY,
        );
        assert_eq!(
            h.apply_subscription("evt_2", t + 10, false, &new)
                .await
                .unwrap(),
            "applied"
        );
        let mut ended = old.clone();
        ended["status"] = json!("canceled");
        assert_eq!(
            h.apply_subscription("evt_3", t + 20, true, &ended)
                .await
                .unwrap(),
            "other_subscription"
        );
        assert_eq!(plan(&h).await, "professional");
        // A late update of the old subscription changes nothing either.
        assert_eq!(
            h.apply_subscription("evt_4", t + 30, false, &old)
                .await
                .unwrap(),
            "other_subscription"
        );
        // The new one's own deletion does.
        let mut gone = new.clone();
        gone["status"] = json!("canceled");
        assert_eq!(
            h.apply_subscription("evt_5", t + 40, true, &gone)
                .await
                .unwrap(),
            "applied"
        );
        assert_eq!(plan(&h).await, "free");
    }

    #[tokio::test]
    async fn subscriptions_not_paid_for_grant_no_paid_plan() {
        let dir = tempfile::tempdir().unwrap();
        let h = hooks(dir.path());
        let t = 1_795_000_000;
        for (i, status) in ["incomplete", "incomplete_expired", "unpaid", "paused"]
            .into_iter()
            .enumerate()
        {
            let s = sub("sub_1", t, status, "price_pro", t, t + 30 * DAY);
            let created = t + i as i64;
            assert_eq!(
                h.apply_subscription(&format!("evt_{i}"), created, false, &s)
                    .await
                    .unwrap(),
                "applied"
            );
            assert_eq!(plan(&h).await, "free", "{status}");
        }
        let paid = sub("sub_1", t, "active", "price_pro", t, t + 30 * DAY);
        h.apply_subscription("evt_9", t + 9, false, &paid)
            .await
            .unwrap();
        assert_eq!(plan(&h).await, "professional");
        // A newer subscription still incomplete does not take over (nor downgrade).
        let pending = sub(
            "sub_2",
            t + 50,
            "incomplete",
            "price_pro",
            t + 50,
            t + 50 + 30 * DAY,
        );
        assert_eq!(
            h.apply_subscription("evt_10", t + 50, false, &pending)
                .await
                .unwrap(),
            "other_subscription"
        );
        assert_eq!(plan(&h).await, "professional");
        // Once paid it does, and the first subscription's end changes nothing.
        let mut paid2 = pending.clone();
        paid2["status"] = json!("active");
        assert_eq!(
            h.apply_subscription("evt_11", t + 60, false, &paid2)
                .await
                .unwrap(),
            "applied"
        );
        let mut ended = paid.clone();
        ended["status"] = json!("canceled");
        assert_eq!(
            h.apply_subscription("evt_12", t + 70, true, &ended)
                .await
                .unwrap(),
            "other_subscription"
        );
        assert_eq!(plan(&h).await, "professional");
    }

    #[tokio::test]
    async fn a_yearly_subscription_keeps_monthly_quota_periods() {
        let dir = tempfile::tempdir().unwrap();
        let h = hooks(dir.path());
        let start = 1_793_491_200; // 2026-11-01T00:00:00Z
        let s = sub(
            "sub_y",
            start,
            "active",
            "price_pro_year",
            start,
            start + 365 * DAY,
        );
        h.apply_subscription("evt_1", start, false, &s)
            .await
            .unwrap();
        let c = h.store.customer("c").await.unwrap().unwrap();
        assert_eq!(c.plan, "professional");
        let p = c.period_at((start + 40 * DAY) * 1000);
        assert_eq!(
            (p.start_ms, p.end_ms),
            (
                tally_schemas::period::parse_rfc3339("2026-12-01T00:00:00Z").unwrap(),
                tally_schemas::period::parse_rfc3339("2027-01-01T00:00:00Z").unwrap()
            )
        );
        // A monthly one follows Stripe's period.
        let m = sub(
            "sub_y",
            start,
            "active",
            "price_pro",
            start,
            start + 30 * DAY,
        );
        h.apply_subscription("evt_2", start + 1, false, &m)
            .await
            .unwrap();
        let c = h.store.customer("c").await.unwrap().unwrap();
        assert_eq!(c.period_at(start * 1000).end_ms, (start + 30 * DAY) * 1000);
    }

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"id":"evt_1"}"#;
        let now = 1_795_255_200;
        let good = sign("whsec_a", now, body);
        assert!(verify("whsec_a", &good, body, now).is_ok());
        // A second v1 (a rolled secret) may be the one that matches.
        let rolled = format!(
            "{},v1={}",
            sign("whsec_old", now, body),
            &good[good.find("v1=").unwrap() + 3..]
        );
        assert!(verify("whsec_a", &rolled, body, now).is_ok());
        let code = |r: Result<(), ApiError>| r.unwrap_err().code;
        assert_eq!(
            code(verify("whsec_b", &good, body, now)),
            "invalid_signature"
        );
        assert_eq!(
            code(verify("whsec_a", &good, br#"{"id":"evt_2"}"#, now)),
            "invalid_signature"
        );
        assert_eq!(
            code(verify("whsec_a", &good, body, now + 301)),
            "signature_expired"
        );
        assert_eq!(
            code(verify("whsec_a", "v1=00", body, now)),
            "invalid_signature"
        );
    }
}
