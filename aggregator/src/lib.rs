//! Aggregator: consumes the usage-event log and rolls it into per (customer, meter, minute)
//! usage in the store; hour, day, month and billing-period figures are summed from those cells
//! at query time. Also serves the query API that reads them back.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Layout
//! - [`rollup`]: the pure fold of records into cells.
//! - [`store`]: the usage-store contract ([`store::UsageStore`]) and its adapters.
//! - [`query`]: `GET /v1/usage`.
//! - [`metrics`]: Prometheus metrics of this stage.
//!
//! # Checkpoints and exactly-once semantics
//! The aggregator reads the log from the positions stored *in the usage store*, not from the
//! log's own consumer offsets. Each batch (up to `max_batch_events` records, or whatever arrived
//! within `flush_interval` of the first) is rolled up and written together with the positions
//! after it in one atomic store write. So:
//! - a crash before the write loses nothing: the batch is read again from the stored position;
//! - a crash after the write re-reads nothing: the stored position moved with the data;
//! - a batch that is written twice anyway (a retry after an ambiguous failure) is recognised by
//!   its positions and skipped.
//!
//! Duplicates (`source`, `id`) are removed before the log, so every record counts once. A store
//! failure is retried with backoff, holding the batch, until it succeeds or the process stops;
//! offsets reported to the log ([`tally_ingest::log::EventLog::commit`]) are advisory, for
//! retention only.
//!
//! # Units and periods
//! Cells are keyed by the event's own time (UTC minute), so late events land in their own
//! period. Values are whole numbers in the meter's unit.

pub mod error;
pub mod metrics;
pub mod query;
pub mod rollup;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::{Error, Result};
use tally_ingest::log::EventLog;
use tally_schemas::Catalog;
use tokio_util::sync::CancellationToken;

use crate::rollup::Rollup;
use crate::store::{Applied, UsageStore};

/// Name under which the aggregator reports its positions to the log.
pub const CONSUMER_GROUP: &str = "tally-aggregator";

/// Batching of the aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    /// Most records in one store write.
    pub max_batch_events: usize,
    /// Longest a record waits for its batch to fill.
    pub flush_interval: Duration,
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        AggregatorSettings {
            max_batch_events: 50_000,
            flush_interval: Duration::from_millis(200),
        }
    }
}

/// Rolls the log into the store until `shutdown` is cancelled; the batch in hand is written
/// before returning.
pub async fn run(
    settings: AggregatorSettings,
    catalog: Arc<Catalog>,
    log: Arc<dyn EventLog>,
    store: Arc<dyn UsageStore>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut reader = log.reader()?;
    for (partition, next) in store.offsets().await? {
        reader.seek(partition, next);
    }
    tracing::info!("aggregator started");
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = reader.poll(settings.max_batch_events, settings.flush_interval) => b?,
        };
        if batch.is_empty() {
            continue;
        }
        let rollup = Rollup::from_records(&batch, &catalog);
        flush(&rollup, store.as_ref(), &shutdown).await?;
        for (&partition, &(_, next)) in &rollup.ranges {
            if let Err(e) = log.commit(CONSUMER_GROUP, partition, next).await {
                tracing::warn!(partition, error = %e, "could not report position to the log");
            }
        }
    }
    tracing::info!("aggregator stopped");
    Ok(())
}

/// Writes one batch, retrying with backoff while the store fails.
async fn flush(
    rollup: &Rollup,
    store: &dyn UsageStore,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match store.apply(rollup).await {
            Ok(applied) => {
                metrics::FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
                let result = match applied {
                    Applied::Written => "written",
                    Applied::Replay => "replay",
                };
                metrics::FLUSHES.with_label_values(&[result]).inc();
                if applied == Applied::Written {
                    metrics::EVENTS.inc_by(rollup.events as u64);
                    metrics::CELLS.inc_by(rollup.cells.len() as u64);
                }
                return Ok(());
            }
            Err(e @ Error::Fenced { .. }) => return Err(e),
            Err(e) => {
                metrics::FLUSHES.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "flush failed");
                tokio::select! {
                    // Stopping without writing is safe: the batch is read again on restart.
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
