//! Aggregator: consumes the usage-event log and rolls it into per (customer, meter, minute)
//! usage in the store; hour, day, month and billing-period figures are summed from those cells
//! at query time. Also serves the query API that reads them back.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Layout
//! - [`blocks`]: how each partition is cut into batches: increments, or cumulative blocks.
//! - [`query`]: the query API; [`groups`]: its breakdowns by dimension.
//!
//! The fold of records into cells is the core's (`tally_schemas::rollup`); the store it writes
//! and the log it reads are the backends' (`tally_backends::store::UsageWriter`,
//! `tally_backends::log::LogReader`).
//! - [`query`]: `GET /v1/usage`.
//! - [`metrics`]: Prometheus metrics of this stage.
//!
//! # Checkpoints and exactly-once semantics
//! The aggregator reads the log from the positions stored *in the usage store*, not from the
//! log's own consumer offsets. Each batch (up to `max_batch_events` records, or whatever arrived
//! within `flush_interval` of the first) is de-duplicated, rolled up and written together with
//! the positions after it in one atomic store write (one SQLite transaction; one ClickHouse
//! INSERT, which is one part, of cumulative [`blocks`]). So:
//! - a crash before the write loses nothing: the batch is read again from the stored position;
//! - a crash after the write re-reads nothing that counts: records below the stored position are
//!   skipped, whatever the log's committed offsets say;
//! - a batch written twice anyway (a retry after an ambiguous failure) is recognised by its
//!   positions and skipped (and in ClickHouse its rows carry the same batch keys and collapse);
//! - a batch whose new records start below the stored position is refused
//!   ([`tally_backends::Error::Fenced`]): another aggregator wrote that partition meanwhile. The batch is
//!   dropped and reading resumes from the store.
//!
//! With Kafka, aggregators form a consumer group and share the partitions. On every rebalance
//! ([`tally_backends::log::LogReader::assignment_epoch`]) the positions are re-read from the store
//! before anything of the new assignment is written, and records buffered for revoked
//! partitions are dropped. Offsets are committed to Kafka only after the store has the batch;
//! they are advisory (monitoring, retention), never the source of truth. A member that stalls
//! past the session timeout while holding a batch can still land its write after the new
//! owner's (ClickHouse cannot check and write atomically): blocks make that harmless, since every
//! member cuts the same blocks and the store keeps each block's furthest write.
//!
//! Duplicates (`source`, `id`) are dropped within the de-duplication window: by the embedded log
//! before it appends, or with Kafka by the store ([`tally_backends::store::UsageWriter::first_seen`], ClickHouse
//! table `event_ids`), which tells a duplicate (same id at another offset) from a replay (the
//! same record read again). A store failure is retried with backoff, holding the batch, until
//! it succeeds or the process stops.
//!
//! # Units and periods
//! Cells are keyed by the event's own time (UTC minute), so late events land in their own
//! period. Values are whole numbers in the meter's unit.

pub mod blocks;
pub mod error;
pub mod groups;
pub mod metrics;
pub mod query;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::{Error, Result};
use tally_backends::backoff::Backoff;
use tally_backends::catalog::{LiveCatalog, meters_of};
use tally_backends::log::{EventLog, LogReader};
use tally_backends::store::{Applied, UsageWriter};
use tally_schemas::rollup::Rollup;
use tally_schemas::{Catalog, Record};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::blocks::Cutter;

/// Batching of the aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    /// Most records in one store write.
    pub max_batch_events: usize,
    /// Longest a record waits for its batch to fill.
    pub flush_interval: Duration,
    /// Consumer group the aggregators share the log's partitions in.
    pub group: String,
    /// How long a partition with unread records may make no progress in the store before
    /// this aggregator rejoins the group (see [`run`]).
    pub stall_rejoin: Duration,
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        AggregatorSettings {
            max_batch_events: 50_000,
            flush_interval: Duration::from_millis(200),
            group: "tally-aggregator".into(),
            stall_rejoin: Duration::from_secs(60),
        }
    }
}

/// Rolls the log into the store until `shutdown` is cancelled; the batch in hand is written
/// before returning.
pub async fn run(
    settings: AggregatorSettings,
    catalog: Arc<LiveCatalog>,
    log: Arc<dyn EventLog>,
    store: Arc<dyn UsageWriter>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut reader = log.group_reader(&settings.group)?;
    let mut cutter = Cutter::new(store.takes_blocks());
    // The store may be unreachable at start-up: wait for it rather than exit.
    reread(store.as_ref(), reader.as_mut(), &mut cutter, &shutdown).await?;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let stalled = Arc::new(Notify::new());
    tokio::spawn(report_lag(
        log.clone(),
        store.clone(),
        settings.stall_rejoin,
        stalled.clone(),
        shutdown.clone(),
    ));
    let mut a = Aggregator {
        epoch: reader.assignment_epoch(),
        reader,
        cutter,
        maintained: None,
        settings,
        catalog,
        store,
        shutdown,
    };
    tracing::info!("aggregator started");
    loop {
        a.maintain().await;
        let batch = tokio::select! {
            _ = a.shutdown.cancelled() => break,
            _ = stalled.notified() => {
                metrics::REJOINS.inc();
                a.reader.rejoin()?;
                continue;
            }
            b = a.reader.poll(a.settings.max_batch_events, a.settings.flush_interval) => b?,
        };
        if a.take(batch).await? == Flow::Stop {
            break;
        }
    }
    tracing::info!("aggregator stopped");
    Ok(())
}

/// Whether the aggregator reads on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Shutdown came before the store took the batch: it is read again on restart.
    Stop,
}

/// One aggregator's loop state: its reader, the cutter of its partitions into batches, and
/// the assignment it last resumed from the store.
struct Aggregator {
    settings: AggregatorSettings,
    /// Read once per batch; a batch naming a meter it lacks reads the store first.
    catalog: Arc<LiveCatalog>,
    store: Arc<dyn UsageWriter>,
    reader: Box<dyn LogReader>,
    cutter: Cutter,
    /// The reader's assignment epoch the positions were last read for.
    epoch: u64,
    maintained: Option<Instant>,
    shutdown: CancellationToken,
}

impl Aggregator {
    /// Store housekeeping (expiring de-duplication ids), every [`MAINTENANCE_INTERVAL`].
    async fn maintain(&mut self) {
        if self
            .maintained
            .is_none_or(|t| t.elapsed() >= MAINTENANCE_INTERVAL)
        {
            self.maintained = Some(Instant::now());
            if let Err(e) = self.store.maintain(now_ms()).await {
                tracing::warn!(error = %e, "store maintenance failed");
            }
        }
    }

    /// De-duplicates, rolls up and writes one polled batch, then reports the positions to the
    /// log.
    async fn take(&mut self, mut batch: Vec<Record>) -> Result<Flow> {
        // A full batch: more is waiting (catching up).
        let full = batch.len() >= self.settings.max_batch_events;
        self.follow_rebalance(&mut batch).await?;
        batch.retain(|r| self.cutter.wants(r));
        if batch.is_empty() {
            return Ok(Flow::Continue);
        }
        let Some(catalog) = retrying("reading the meters", &self.shutdown, || {
            self.catalog.knowing(meters_of(&batch))
        })
        .await?
        else {
            return Ok(Flow::Stop);
        };
        self.catalog.note_unknown(meters_of(&batch));
        let cut = roll_up(
            &batch,
            &catalog,
            self.store.as_ref(),
            &mut self.cutter,
            !full,
            &self.shutdown,
        );
        let Some(rollup) = cut.await? else {
            return Ok(Flow::Stop);
        };
        if rollup.ranges.is_empty() {
            // Nothing to write yet: records the store holds (a resume rebuilding its last
            // block), or an open block left for later.
            return Ok(Flow::Continue);
        }
        match flush(&rollup, self.store.as_ref(), &self.shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(Flow::Stop),
            Err(e) if e.is_fenced() => {
                tracing::warn!(error = %e, "batch dropped; resuming from the store's positions");
                self.resume_from_store().await?;
                return Ok(Flow::Continue);
            }
            Err(e) => return Err(e),
        }
        let positions: BTreeMap<u32, u64> = rollup
            .ranges
            .iter()
            .map(|(&p, &(_, next))| (p, next))
            .collect();
        if let Err(e) = self.reader.commit(&positions).await {
            tracing::warn!(error = %e, "could not report positions to the log");
        }
        Ok(Flow::Continue)
    }

    /// After a rebalance, another aggregator may have advanced the partitions meanwhile: each
    /// resumes from the store, which is the truth, not from the log's committed offsets, and
    /// what `batch` read before for the partitions sought comes again from there.
    async fn follow_rebalance(&mut self, batch: &mut Vec<Record>) -> Result<()> {
        if self.reader.assignment_epoch() == self.epoch {
            return Ok(());
        }
        self.epoch = self.reader.assignment_epoch();
        let sought = self.resume_from_store().await?;
        batch.retain(|r| !sought.contains(&r.partition));
        Ok(())
    }

    async fn resume_from_store(&mut self) -> Result<BTreeSet<u32>> {
        reread(
            self.store.as_ref(),
            self.reader.as_mut(),
            &mut self.cutter,
            &self.shutdown,
        )
        .await
    }
}

/// How often the consumer lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `tally_log_consumer_lag{consumer="aggregator"}` every [`LAG_INTERVAL`]: the log's end
/// offsets against the positions in the store, which are the whole consumer group's (every
/// replica reports the same figures, and a stuck replica's partitions show their lag).
///
/// Also the group's watchdog: a partition with unread records whose stored position has not
/// moved for `stall` (while the store answers) is read by nobody; `stalled` is notified and
/// the aggregator rejoins its group, at most once per `stall`. A member that was assigned
/// nothing cannot tell otherwise that the group lost a partition: tansu 0.6.0 can form a group
/// whose assignment is empty when its leader times out while the group forms.
async fn report_lag(
    log: Arc<dyn EventLog>,
    store: Arc<dyn UsageWriter>,
    stall: Duration,
    stalled: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watch = StallWatch::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::try_join!(log.end_offsets(), store.offsets()) {
            Ok((ends, positions)) => {
                tally_backends::metrics::set_lag("aggregator", &positions, &ends);
                if watch.observe(&positions, &ends, Instant::now(), stall) {
                    tracing::warn!(
                        stall_s = stall.as_secs(),
                        "a partition with unread records made no progress; rejoining the group"
                    );
                    stalled.notify_one();
                }
            }
            Err(e) => {
                // Nothing is known: progress is timed afresh once the store answers again.
                watch = StallWatch::default();
                tracing::debug!(error = %e, "consumer lag not measured");
            }
        }
    }
}

/// Since when each partition's stored position has not moved while records wait after it.
#[derive(Default)]
struct StallWatch {
    /// Partition: (stored position, since when it is there with records after it).
    since: BTreeMap<u32, (u64, Instant)>,
    /// The last time it answered that a partition stalled.
    last_alarm: Option<Instant>,
}

impl StallWatch {
    /// Whether a partition stalled for `stall` (and no alarm was raised within `stall`).
    fn observe(
        &mut self,
        positions: &BTreeMap<u32, u64>,
        ends: &[(u32, u64)],
        now: Instant,
        stall: Duration,
    ) -> bool {
        let mut stalled = false;
        for &(p, end) in ends {
            let at = positions.get(&p).copied().unwrap_or(0);
            if at >= end {
                self.since.remove(&p);
                continue;
            }
            let since = match self.since.get(&p) {
                Some(&(pos, t)) if pos == at => t,
                _ => {
                    self.since.insert(p, (at, now));
                    now
                }
            };
            stalled |= now.duration_since(since) >= stall;
        }
        if stalled
            && self
                .last_alarm
                .is_none_or(|t| now.duration_since(t) >= stall)
        {
            self.last_alarm = Some(now);
            // Progress is timed afresh after the rejoin.
            self.since.clear();
            return true;
        }
        false
    }
}

/// How often the store's housekeeping runs.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Retries `op` with backoff while the store fails; `None` once `shutdown` is cancelled. A
/// refusal that retrying cannot fix (a fenced batch, bad input, a misconfigured store) is
/// returned at once.
async fn retrying<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tally_backends::Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match op().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if !e.is_retryable() => return Err(e.into()),
            Err(e) => {
                metrics::FLUSHES.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "{what} failed; retrying");
                // Stopping without writing is safe: the batch is read again on restart.
                if !backoff.wait(shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Re-reads the store's positions and moves the cutter and the reader there; the partitions
/// sought.
async fn reread(
    store: &dyn UsageWriter,
    reader: &mut dyn LogReader,
    cutter: &mut Cutter,
    shutdown: &CancellationToken,
) -> Result<BTreeSet<u32>> {
    let resume = retrying("reading positions", shutdown, || store.resume())
        .await?
        .unwrap_or_default();
    cutter.reset(&resume);
    for (partition, from) in cutter.read_from() {
        reader.seek(partition, from);
    }
    Ok(resume.into_keys().collect())
}

/// Drops duplicates (per the store) and cuts the rest into a batch (with the open blocks if
/// `with_open`, see [`Cutter::take`]); `None` once `shutdown` is cancelled.
async fn roll_up(
    batch: &[tally_backends::log::Record],
    catalog: &Catalog,
    store: &dyn UsageWriter,
    cutter: &mut Cutter,
    with_open: bool,
    shutdown: &CancellationToken,
) -> Result<Option<Rollup>> {
    let Some(keep) = retrying("de-duplication", shutdown, || store.first_seen(batch)).await? else {
        return Ok(None);
    };
    let mut rollup = Rollup::default();
    let mut duplicates = 0u64;
    for (rec, keep) in batch.iter().zip(keep) {
        if cutter.push(rec, keep, catalog, &mut rollup) && !keep {
            duplicates += 1;
        }
    }
    cutter.take(&mut rollup, with_open);
    if duplicates > 0 {
        metrics::DUPLICATES.inc_by(duplicates);
    }
    Ok(Some(rollup))
}

/// Writes one batch, retrying with backoff while the store fails; `false` if `shutdown` came
/// first.
async fn flush(
    rollup: &Rollup,
    store: &dyn UsageWriter,
    shutdown: &CancellationToken,
) -> Result<bool> {
    let started = Instant::now();
    let Some(applied) = retrying("flush", shutdown, || store.apply(rollup)).await? else {
        return Ok(false);
    };
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
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_with_unread_records_and_no_progress_raises_one_alarm_per_stall() {
        let stall = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = StallWatch::default();
        let ends = [(0, 100), (1, 50)];
        let mut positions = BTreeMap::from([(0, 100), (1, 10)]);
        assert!(!w.observe(&positions, &ends, at(0), stall));
        assert!(!w.observe(&positions, &ends, at(29), stall));
        assert!(w.observe(&positions, &ends, at(30), stall));
        // Timed afresh after the alarm, and never twice within a stall.
        assert!(!w.observe(&positions, &ends, at(35), stall));
        assert!(!w.observe(&positions, &ends, at(59), stall));
        assert!(w.observe(&positions, &ends, at(66), stall));
        // Progress, or nothing left to read, is no stall.
        for s in (70..200).step_by(5) {
            positions.insert(1, 10 + s);
            assert!(!w.observe(&positions, &ends, at(s), stall), "{s}");
        }
        positions.insert(1, 50);
        assert!(!w.observe(&positions, &ends, at(300), stall));
        assert!(!w.observe(&positions, &ends, at(400), stall));
        // A partition never written counts from 0.
        assert!(!w.observe(&BTreeMap::new(), &[(2, 5)], at(500), stall));
        assert!(w.observe(&BTreeMap::new(), &[(2, 5)], at(530), stall));
    }
}
