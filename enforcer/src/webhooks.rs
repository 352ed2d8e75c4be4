//! Threshold notifications as webhooks, signed with HMAC-SHA256 and retried with backoff.
//!
//! Only the replica whose publication of a notification was the first one (the log keeps one
//! per customer, meter, period and threshold) delivers it, so several replicas send each
//! notification once. Each URL gets a POST with the JSON body below and the headers:
//!
//! - `Tally-Webhook-Id`: the notification's stable id (`customer:meter:period_start_ms:threshold`);
//!   receivers use it to drop a repeated delivery;
//! - `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>`,
//!   when `webhook_secret` is set.
//!
//! A delivery that fails (connection error, timeout, any status but 2xx) is retried with
//! exponential backoff and jitter, up to `max_attempts` times. Deliveries are durable: each one
//! is written to the usage store's webhook outbox before its first attempt and after every
//! attempt, with the replica delivering it and a lease (the next attempt's time plus twice the
//! request timeout). Every replica reads the outbox at start-up and every `sweep` interval and
//! takes over the deliveries whose lease ran out, so a delivery interrupted by a crash or a
//! restart resumes where it stopped, on the same replica or another one. Delivery is therefore
//! at least once: a replica that stalls past its lease and then sends, or two replicas taking
//! over the same delivery, send it twice, with the same `Tally-Webhook-Id` and body.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tally_backends::backoff::Backoff;
use tally_backends::store::{WebhookDelivery, WebhookOutbox};
use tally_schemas::Notification;
use tally_schemas::period::rfc3339;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Where and how notifications are delivered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Every notification is POSTed to each of these URLs.
    pub urls: Vec<String>,
    /// Signs each delivery when set.
    pub secret: Option<String>,
    /// Attempts per URL before a delivery is given up.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with every attempt (at most 5 minutes).
    pub retry_base: Duration,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// How often the outbox is read for deliveries whose replica stopped.
    pub sweep: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            urls: Vec::new(),
            secret: None,
            max_attempts: 8,
            retry_base: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            sweep: Duration::from_secs(30),
        }
    }
}

/// The body of a notification webhook.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub customer: &'a str,
    pub meter: &'a str,
    pub threshold: u32,
    pub usage: u64,
    pub limit: u64,
    pub period_start: String,
    pub period_end: String,
    pub crossed_at: String,
}

/// The stable id of a notification.
pub fn notification_id(n: &Notification) -> String {
    format!(
        "{}:{}:{}:{}",
        n.customer, n.meter, n.period_start_ms, n.threshold
    )
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256("<t>.<body>")>`.
pub fn signature(secret: &str, unix_secs: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_secs},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Delivers notifications to the configured URLs, through the store's outbox.
#[derive(Clone)]
pub struct Webhooks {
    settings: Arc<WebhookSettings>,
    client: reqwest::Client,
    store: Arc<dyn WebhookOutbox>,
    /// This replica, as written in the outbox.
    owner: Arc<str>,
    /// (id, url) of the deliveries this replica is running.
    running: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Webhooks {
    pub fn new(settings: WebhookSettings, store: Arc<dyn WebhookOutbox>) -> Webhooks {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .unwrap_or_default();
        Webhooks {
            settings: Arc::new(settings),
            client,
            store,
            owner: format!("{:016x}", rand::random::<u64>()).into(),
            running: Arc::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.settings.urls.is_empty()
    }

    /// Until `shutdown`: at once and then every `sweep` interval, takes over the outbox's
    /// deliveries whose lease ran out.
    pub async fn sweep(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.store.pending_webhooks().await {
                Ok(pending) => {
                    let now = now_ms();
                    for mut d in pending {
                        if d.lease_until_ms > now || self.is_running(&d) {
                            continue;
                        }
                        tracing::info!(webhook_id = %d.id, url = %d.url, attempts = d.attempts,
                            "resuming a webhook delivery from the outbox");
                        d.next_attempt_ms = d.next_attempt_ms.max(now);
                        self.spawn(d);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the webhook outbox failed"),
            }
        }
    }

    /// Starts delivering `n` to every URL in the background.
    pub fn send(&self, n: &Notification) {
        let body = WebhookBody {
            kind: "tally.quota.threshold_crossed",
            id: notification_id(n),
            customer: &n.customer,
            meter: &n.meter,
            threshold: n.threshold,
            usage: n.usage,
            limit: n.limit,
            period_start: rfc3339(n.period_start_ms),
            period_end: rfc3339(n.period_end_ms),
            crossed_at: rfc3339(n.crossed_ms),
        };
        let Ok(json) = serde_json::to_string(&body) else {
            return;
        };
        for url in &self.settings.urls {
            self.spawn(WebhookDelivery {
                id: body.id.clone(),
                url: url.clone(),
                body: json.clone(),
                attempts: 0,
                next_attempt_ms: now_ms(),
                owner: String::new(),
                lease_until_ms: 0,
                done: false,
            });
        }
    }

    fn is_running(&self, d: &WebhookDelivery) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.contains(&(d.id.clone(), d.url.clone()))
    }

    fn spawn(&self, d: WebhookDelivery) {
        let key = (d.id.clone(), d.url.clone());
        if !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.deliver(d).await;
            this.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }

    /// Writes the delivery's state to the outbox, under this replica's lease.
    async fn record(&self, d: &mut WebhookDelivery) {
        d.owner = self.owner.to_string();
        d.lease_until_ms = d.next_attempt_ms + 2 * self.settings.timeout.as_millis() as i64;
        if let Err(e) = self.store.put_webhook(d).await {
            // Delivery goes on; only its resumption after a crash is at stake.
            tracing::warn!(error = %e, webhook_id = %d.id, "writing the webhook outbox failed");
        }
    }

    async fn deliver(&self, mut d: WebhookDelivery) {
        let s = &self.settings;
        self.record(&mut d).await;
        loop {
            let wait = d.next_attempt_ms - now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            d.attempts += 1;
            let mut req = self
                .client
                .post(&d.url)
                .header("content-type", "application/json")
                .header("tally-webhook-id", &d.id);
            if let Some(secret) = &s.secret {
                let now = chrono::Utc::now().timestamp();
                req = req.header("tally-signature", signature(secret, now, d.body.as_bytes()));
            }
            let url = &d.url;
            let attempt = d.attempts;
            match req.body(d.body.clone()).send().await {
                Ok(r) if r.status().is_success() => {
                    metrics::WEBHOOKS.with_label_values(&["delivered"]).inc();
                    d.done = true;
                    self.record(&mut d).await;
                    return;
                }
                Ok(r) => {
                    tracing::warn!(%url, status = r.status().as_u16(), attempt, "webhook refused");
                }
                Err(e) => tracing::warn!(%url, error = %e, attempt, "webhook failed"),
            }
            if d.attempts >= s.max_attempts {
                metrics::WEBHOOKS.with_label_values(&["abandoned"]).inc();
                tracing::error!(%url, webhook_id = %d.id, "webhook abandoned after every attempt");
                d.done = true;
                self.record(&mut d).await;
                return;
            }
            metrics::WEBHOOKS.with_label_values(&["retried"]).inc();
            // Doubling from `retry_base`, at most 5 minutes; jitter: somewhere in the second
            // half of the step.
            let pause = Backoff::new(s.retry_base, Duration::from_secs(300))
                .jittered()
                .wait_of(d.attempts);
            d.next_attempt_ms = now_ms() + pause.as_millis() as i64;
            self.record(&mut d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_documented_scheme() {
        // Reference value from `printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec`.
        let sig = signature("whsec", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            sig,
            "t=1700000000,v1=8ad37ba156048ae0e0a5533c75cdf26fee88b07f93cb57ee4c80adb053012032"
        );
    }
}
