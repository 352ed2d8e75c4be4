//! Billing sync: reports usage to Stripe Billing Meters.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Status
//! This release runs in **dry-run mode only**: every `interval` it computes, for each customer
//! linked to a Stripe customer (`stripe_customer_id`) and each additive meter, the usage of the
//! settled window since its last report, and logs the meter event it would send, with the
//! deterministic identifier it would carry. Sending to Stripe, persisted watermarks and the
//! subscription webhooks are not implemented yet.
//!
//! # Windows
//! A window ends at the start of the minute `settle` before now, so usage the aggregator may
//! still be flushing is left for the next report. Identifiers are
//! `tally:{customer}:{meter}:{window_start_ms}-{window_end_ms}`: the same window always yields
//! the same identifier, so Stripe can drop a repeated report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tally_aggregator::store::UsageStore;
use tally_schemas::period::{minute_of, rfc3339};
use tally_schemas::{Catalog, Clock};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] tally_aggregator::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often and how late billing-sync reports.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Time between two reports.
    pub interval: Duration,
    /// How far behind now a window must end (lets the aggregator finish flushing).
    pub settle: Duration,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            interval: Duration::from_secs(60),
            settle: Duration::from_secs(120),
        }
    }
}

/// The meter event billing-sync would send for one customer, meter and window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedReport {
    pub customer: String,
    pub stripe_customer_id: String,
    pub event_name: String,
    pub value: u64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub identifier: String,
}

/// Plans the reports of one round and advances the in-memory watermarks.
pub async fn plan_round(
    catalog: &Catalog,
    store: &dyn UsageStore,
    now_ms: i64,
    settle: Duration,
    watermarks: &mut HashMap<(String, String), i64>,
) -> Result<Vec<PlannedReport>> {
    let window_end = minute_of(now_ms - settle.as_millis() as i64);
    let mut out = Vec::new();
    for (customer, record) in store.customers_since(0).await? {
        let Some(stripe_id) = record.stripe_customer_id.clone() else {
            continue;
        };
        for (meter, m) in catalog
            .meters
            .iter()
            .filter(|(_, m)| m.aggregation.is_additive())
        {
            let key = (customer.clone(), meter.clone());
            let start = watermarks
                .get(&key)
                .copied()
                .unwrap_or_else(|| record.period_at(window_end).start_ms);
            if start >= window_end {
                continue;
            }
            let value = store
                .total(&customer, meter, m.aggregation, start, window_end)
                .await?;
            watermarks.insert(key, window_end);
            if value == 0 {
                continue;
            }
            out.push(PlannedReport {
                identifier: format!("tally:{customer}:{meter}:{start}-{window_end}"),
                customer: customer.clone(),
                stripe_customer_id: stripe_id.clone(),
                event_name: meter.clone(),
                value,
                window_start_ms: start,
                window_end_ms: window_end,
            });
        }
    }
    Ok(out)
}

/// Runs dry-run rounds every `interval` until `shutdown`.
pub async fn run(
    settings: BillingSettings,
    catalog: Arc<Catalog>,
    store: Arc<dyn UsageStore>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<()> {
    tracing::info!("billing-sync runs in dry-run mode: no Stripe client is configured");
    let mut watermarks = HashMap::new();
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match plan_round(
            &catalog,
            store.as_ref(),
            clock.now_ms(),
            settings.settle,
            &mut watermarks,
        )
        .await
        {
            Ok(reports) => {
                for r in reports {
                    tracing::info!(
                        customer = %r.customer,
                        stripe_customer = %r.stripe_customer_id,
                        event_name = %r.event_name,
                        value = r.value,
                        window_start = %rfc3339(r.window_start_ms),
                        window_end = %rfc3339(r.window_end_ms),
                        identifier = %r.identifier,
                        "dry-run: would send a meter event"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "billing round failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_aggregator::rollup::Rollup;
    use tally_aggregator::store::sqlite::SqliteStore;
    use tally_ingest::log::Record;
    use tally_schemas::{Customer, UsageEvent};

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
        let round = plan_round(&catalog, &store, now, settle, &mut marks)
            .await
            .unwrap();
        assert_eq!(round.len(), 1);
        assert_eq!((round[0].customer.as_str(), round[0].value), ("a", 7));
        assert_eq!(round[0].stripe_customer_id, "cus_1");
        assert!(
            plan_round(&catalog, &store, now, settle, &mut marks)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
