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
//! exponential backoff and jitter, up to `max_attempts` times. Pending retries live in memory: a
//! replica that stops while retrying drops them (the notification stays on the log).

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tally_schemas::Notification;
use tally_schemas::period::rfc3339;

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
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            urls: Vec::new(),
            secret: None,
            max_attempts: 8,
            retry_base: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
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

/// Delivers notifications to the configured URLs.
#[derive(Clone)]
pub struct Webhooks {
    settings: Arc<WebhookSettings>,
    client: reqwest::Client,
}

impl Webhooks {
    pub fn new(settings: WebhookSettings) -> Webhooks {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .unwrap_or_default();
        Webhooks {
            settings: Arc::new(settings),
            client,
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.settings.urls.is_empty()
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
        let Ok(bytes) = serde_json::to_vec(&body) else {
            return;
        };
        for url in &self.settings.urls {
            let this = self.clone();
            let (url, bytes, id) = (url.clone(), bytes.clone(), body.id.clone());
            tokio::spawn(async move { this.deliver(url, id, bytes).await });
        }
    }

    async fn deliver(&self, url: String, id: String, body: Vec<u8>) {
        let s = &self.settings;
        let mut wait = s.retry_base;
        for attempt in 1..=s.max_attempts {
            let mut req = self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .header("tally-webhook-id", &id);
            if let Some(secret) = &s.secret {
                let now = chrono::Utc::now().timestamp();
                req = req.header("tally-signature", signature(secret, now, &body));
            }
            let outcome = req.body(body.clone()).send().await;
            match outcome {
                Ok(r) if r.status().is_success() => {
                    metrics::WEBHOOKS.with_label_values(&["delivered"]).inc();
                    return;
                }
                Ok(r) => {
                    tracing::warn!(%url, status = r.status().as_u16(), attempt, "webhook refused");
                }
                Err(e) => tracing::warn!(%url, error = %e, attempt, "webhook failed"),
            }
            metrics::WEBHOOKS.with_label_values(&["retried"]).inc();
            if attempt == s.max_attempts {
                break;
            }
            // Jitter: somewhere in the second half of the current backoff step.
            let jitter = wait.mul_f64(rand::random_range(0.5..1.0));
            tokio::time::sleep(jitter).await;
            wait = (wait * 2).min(Duration::from_secs(300));
        }
        metrics::WEBHOOKS.with_label_values(&["abandoned"]).inc();
        tracing::error!(%url, webhook_id = %id, "webhook abandoned after every attempt");
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
