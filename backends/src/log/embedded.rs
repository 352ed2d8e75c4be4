//! The embedded event log: one SQLite database (`events.db`) in WAL mode with
//! `synchronous=FULL`, a single partition (0).
//!
//! Appends go through one writer thread that commits every pending append in one transaction
//! (group commit), so a burst of requests costs one fsync. An append is answered only after its
//! transaction committed: a 202 survives `kill -9` and power loss.
//!
//! Tables: `events` (offset, encoded record, receipt time), `dedup` ((source, id) seen within the
//! window), `consumer_offsets` (positions consumers reported, for retention), `notifications`
//! (threshold crossings, unique per customer, meter, period and threshold).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tally_schemas::{Clock, Notification, UsageEvent, wire};
use tokio::sync::{mpsc, oneshot, watch};

use super::{AppendOutcome, EventLog, LogReader, Notifications, Record};
use crate::{Error, Result, metrics};

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedLogConfig {
    /// The SQLite file; its directory is created if missing.
    pub path: PathBuf,
    /// How long a (source, id) is remembered for de-duplication.
    pub dedup_window: Duration,
    /// How long records are kept after every consumer passed them.
    pub retention: Duration,
    /// Most events committed in one group-commit transaction.
    pub max_group_events: usize,
}

impl EmbeddedLogConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedLogConfig {
            path: path.into(),
            dedup_window: Duration::from_secs(35 * 86_400),
            retention: Duration::from_secs(7 * 86_400),
            max_group_events: 100_000,
        }
    }
}

struct AppendJob {
    events: Vec<UsageEvent>,
    reply: oneshot::Sender<Result<AppendOutcome>>,
}

/// The embedded log. Cheap to share behind an `Arc`.
pub struct EmbeddedLog {
    jobs: mpsc::Sender<AppendJob>,
    /// Next offset to be written; readers wait on it.
    high: watch::Receiver<u64>,
    /// A connection for low-volume writes and reads off the append path.
    side: Arc<Mutex<Connection>>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    seen_ms INTEGER NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_by_time ON dedup (seen_ms);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notifications (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    period_end_ms INTEGER NOT NULL,
    usage INTEGER NOT NULL,
    limit_value INTEGER NOT NULL,
    crossed_ms INTEGER NOT NULL,
    PRIMARY KEY (customer, meter, period_start_ms, threshold)
) WITHOUT ROWID;
";

fn open(path: &Path) -> Result<Connection> {
    crate::sqlite::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

fn next_offset(conn: &Connection) -> Result<u64> {
    let seq: Option<i64> = conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'events'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(seq.map_or(1, |s| s as u64 + 1))
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log and starts its writer thread.
    pub fn open(config: EmbeddedLogConfig, clock: Arc<dyn Clock>) -> Result<EmbeddedLog> {
        if let Some(dir) = config.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let writer = open(&config.path)?;
        writer.execute_batch(SCHEMA)?;
        let side = open(&config.path)?;
        let (high_tx, high) = watch::channel(next_offset(&writer)?);
        let (jobs, rx) = mpsc::channel(1024);
        let path = config.path.clone();
        std::thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer_loop(writer, rx, high_tx, config, clock))?;
        Ok(EmbeddedLog {
            jobs,
            high,
            side: Arc::new(Mutex::new(side)),
            path,
        })
    }

    fn open_reader(&self, group: Option<String>) -> Result<EmbeddedReader> {
        Ok(EmbeddedReader {
            conn: Arc::new(Mutex::new(open(&self.path)?)),
            group,
            next: 0,
            high: self.high.clone(),
            cross_process: false,
            last_stored_check: None,
            pending: Vec::new(),
            pending_since: None,
        })
    }

    async fn with_side<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        crate::sqlite::with_connection(&self.side, move |c| f(c)).await
    }
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<AppendJob>,
    high: watch::Sender<u64>,
    config: EmbeddedLogConfig,
    clock: Arc<dyn Clock>,
) {
    let mut last_maintenance = Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut pending = jobs[0].events.len();
        while pending < config.max_group_events {
            match rx.try_recv() {
                Ok(job) => {
                    pending += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        match write_group(&mut conn, &jobs) {
            Ok((outcomes, next)) => {
                metrics::LOG_COMMIT_SECONDS.observe(started.elapsed().as_secs_f64());
                high.send_replace(next);
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded log append failed");
                let e = std::sync::Arc::new(e);
                for job in jobs {
                    let _ = job.reply.send(Err(Error::Commit(e.clone())));
                }
            }
        }
        if last_maintenance.elapsed() >= Duration::from_secs(30) {
            last_maintenance = Instant::now();
            if let Err(e) = maintain(&conn, &config, clock.now_ms()) {
                tracing::warn!(error = %e, "embedded log maintenance failed");
            }
        }
    }
}

fn write_group(conn: &mut Connection, jobs: &[AppendJob]) -> Result<(Vec<AppendOutcome>, u64)> {
    let tx = conn.transaction()?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    {
        let mut dedup = tx.prepare_cached(
            "INSERT OR IGNORE INTO dedup (source, id, seen_ms) VALUES (?1, ?2, ?3)",
        )?;
        let mut append =
            tx.prepare_cached("INSERT INTO events (record, received_ms) VALUES (?1, ?2)")?;
        let mut buf = Vec::with_capacity(256);
        for job in jobs {
            let mut outcome = AppendOutcome::default();
            for e in &job.events {
                if dedup.execute(params![e.source, e.id, e.received_ms])? == 0 {
                    outcome.duplicates += 1;
                    continue;
                }
                buf.clear();
                wire::encode_into(e, &mut buf);
                append.execute(params![buf, e.received_ms])?;
                outcome.accepted += 1;
            }
            outcomes.push(outcome);
        }
    }
    let next = next_offset(&tx)?;
    tx.commit()?;
    Ok((outcomes, next))
}

fn maintain(conn: &Connection, config: &EmbeddedLogConfig, now_ms: i64) -> Result<()> {
    let dedup_cutoff = now_ms - config.dedup_window.as_millis() as i64;
    let expired = conn.execute("DELETE FROM dedup WHERE seen_ms < ?1", [dedup_cutoff])?;
    let retention_cutoff = now_ms - config.retention.as_millis() as i64;
    let dropped = conn.execute(
        "DELETE FROM events WHERE received_ms < ?1
           AND offset < (SELECT COALESCE(MIN(next_offset), 0) FROM consumer_offsets)",
        [retention_cutoff],
    )?;
    if expired + dropped > 0 {
        tracing::debug!(expired, dropped, "embedded log maintenance");
    }
    Ok(())
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, events: Vec<UsageEvent>) -> Result<AppendOutcome> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(AppendJob { events, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn reader(&self) -> Result<Box<dyn LogReader>> {
        Ok(Box::new(self.open_reader(None)?))
    }

    /// One partition, so a group has one member; its commits are kept for retention.
    fn group_reader(&self, group: &str) -> Result<Box<dyn LogReader>> {
        Ok(Box::new(self.open_reader(Some(group.to_owned()))?))
    }

    async fn end_offsets(&self) -> Result<Vec<(u32, u64)>> {
        Ok(vec![(0, *self.high.borrow())])
    }
}

#[async_trait]
impl Notifications for EmbeddedLog {
    async fn publish_notification(&self, n: &Notification) -> Result<bool> {
        let n = n.clone();
        self.with_side(move |c| {
            let inserted = c.execute(
                "INSERT OR IGNORE INTO notifications (customer, meter, period_start_ms, threshold,
                     period_end_ms, usage, limit_value, crossed_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    n.customer,
                    n.meter,
                    n.period_start_ms,
                    n.threshold,
                    n.period_end_ms,
                    n.usage as i64,
                    n.limit as i64,
                    n.crossed_ms
                ],
            )?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn notifications_since(&self, since_ms: i64) -> Result<Vec<Notification>> {
        self.with_side(move |c| {
            let mut stmt = c.prepare(
                "SELECT customer, meter, period_start_ms, period_end_ms, threshold, usage,
                        limit_value, crossed_ms
                 FROM notifications WHERE period_end_ms > ?1",
            )?;
            let rows = stmt.query_map([since_ms], |r| {
                Ok(Notification {
                    customer: r.get(0)?,
                    meter: r.get(1)?,
                    period_start_ms: r.get(2)?,
                    period_end_ms: r.get(3)?,
                    threshold: r.get(4)?,
                    usage: r.get::<_, i64>(5)? as u64,
                    limit: r.get::<_, i64>(6)? as u64,
                    crossed_ms: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

/// How often an idle reader looks for records written by another process.
const STORED_CHECK_INTERVAL: Duration = Duration::from_millis(100);

struct EmbeddedReader {
    conn: Arc<Mutex<Connection>>,
    /// The consumer group whose positions `commit` records (none: commits are not kept).
    group: Option<String>,
    next: u64,
    high: watch::Receiver<u64>,
    /// Set once records were found that this process did not write: from then on the stored
    /// high watermark is read on every poll.
    cross_process: bool,
    /// When the database was last asked for its high watermark.
    last_stored_check: Option<tokio::time::Instant>,
    /// Records read but not yet returned (kept across a cancelled poll).
    pending: Vec<Record>,
    /// When the first pending record was read; the batch lingers from here.
    pending_since: Option<tokio::time::Instant>,
}

impl EmbeddedReader {
    fn take(&mut self, max: usize) -> Vec<Record> {
        let rest = if self.pending.len() > max {
            self.pending.split_off(max)
        } else {
            Vec::new()
        };
        self.pending_since = if rest.is_empty() {
            None
        } else {
            Some(tokio::time::Instant::now())
        };
        std::mem::replace(&mut self.pending, rest)
    }

    async fn stored_high(&self) -> Result<u64> {
        crate::sqlite::with_connection(&self.conn, |c| next_offset(c)).await
    }

    async fn read(&self, max: usize) -> Result<Vec<Record>> {
        let from = self.next;
        crate::sqlite::with_connection(&self.conn, move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT offset, record FROM events WHERE offset >= ?1 ORDER BY offset LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![from as i64, max as i64])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let offset: i64 = row.get(0)?;
                let bytes = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
                out.push(Record {
                    partition: 0,
                    offset: offset as u64,
                    event: wire::decode(bytes)?,
                });
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl LogReader for EmbeddedReader {
    async fn commit(&mut self, positions: &BTreeMap<u32, u64>) -> Result<()> {
        let Some(group) = self.group.clone() else {
            return Ok(());
        };
        let positions = positions.clone();
        crate::sqlite::with_connection(&self.conn, move |c| {
            for (partition, next_offset) in positions {
                c.execute(
                    "INSERT INTO consumer_offsets (consumer, partition, next_offset)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (consumer, partition)
                     DO UPDATE SET next_offset = excluded.next_offset",
                    params![group, partition, next_offset as i64],
                )?;
            }
            Ok(())
        })
        .await
    }

    fn seek(&mut self, partition: u32, next_offset: u64) {
        if partition == 0 {
            self.next = next_offset;
            self.pending.clear();
            self.pending_since = None;
        }
    }

    async fn poll(&mut self, max: usize, linger: Duration) -> Result<Vec<Record>> {
        // Records read so far live in `self.pending`, and `self.next` moves only together with
        // them, so dropping this future at any await point loses nothing.
        let started = tokio::time::Instant::now();
        loop {
            if self.pending.len() >= max {
                return Ok(self.take(max));
            }
            let deadline = self.pending_since.unwrap_or(started) + linger;
            let mut high = *self.high.borrow_and_update();
            if self.cross_process {
                high = high.max(self.stored_high().await?);
            }
            if high > self.next {
                let batch = self.read(max - self.pending.len()).await?;
                match batch.last() {
                    Some(last) => {
                        self.next = last.offset + 1;
                        if self.pending.is_empty() {
                            self.pending_since = Some(tokio::time::Instant::now());
                        }
                        self.pending.extend(batch);
                    }
                    // Nothing at or above `next`: the rows below `high` were removed by
                    // retention. Skip the gap rather than read it again.
                    None => self.next = high,
                }
                continue;
            }
            tokio::select! {
                changed = self.high.changed() => {
                    if changed.is_err() {
                        return if self.pending.is_empty() { Err(Error::Closed) } else { Ok(self.take(max)) };
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Another process may share the file: look at the database itself before
                    // reporting that nothing arrived (at most every 100 ms while this process
                    // has seen no record it did not write itself).
                    let due = self
                        .last_stored_check
                        .is_none_or(|t| t.elapsed() >= STORED_CHECK_INTERVAL);
                    if self.pending.is_empty() && due {
                        self.last_stored_check = Some(tokio::time::Instant::now());
                        if self.stored_high().await? > self.next {
                            self.cross_process = true;
                            continue;
                        }
                    }
                    return Ok(self.take(max));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::ManualClock;

    fn event(id: &str, customer: &str, value: u64) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            source: "edge-1".into(),
            customer: customer.into(),
            meter: "api_requests".into(),
            value,
            time_ms: 1_000,
            received_ms: 1_000,
            readings: Vec::new(),
        }
    }

    #[tokio::test]
    async fn appends_dedups_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_000));
        let log =
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("e.db")), clock).unwrap();
        let out = log
            .append(vec![
                event("a", "c1", 1),
                event("b", "c2", 2),
                event("a", "c1", 1),
            ])
            .await
            .unwrap();
        assert_eq!(
            out,
            AppendOutcome {
                accepted: 2,
                duplicates: 1
            }
        );
        let out = log
            .append(vec![event("b", "c2", 2), event("c", "c1", 3)])
            .await
            .unwrap();
        assert_eq!(
            out,
            AppendOutcome {
                accepted: 1,
                duplicates: 1
            }
        );
        assert_eq!(log.end_offsets().await.unwrap(), vec![(0, 4)]);

        let mut r = log.reader().unwrap();
        let recs = r.poll(10, Duration::from_millis(10)).await.unwrap();
        let ids: Vec<_> = recs
            .iter()
            .map(|r| (r.offset, r.event.id.as_str()))
            .collect();
        assert_eq!(ids, vec![(1, "a"), (2, "b"), (3, "c")]);
        assert!(
            r.poll(10, Duration::from_millis(10))
                .await
                .unwrap()
                .is_empty()
        );
        r.seek(0, 2);
        let recs = r.poll(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(recs[0].event, event("b", "c2", 2));
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_append_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        let clock = Arc::new(ManualClock::new(1_000));
        {
            let log =
                Arc::new(EmbeddedLog::open(EmbeddedLogConfig::new(&path), clock.clone()).unwrap());
            let mut r = log.reader().unwrap();
            let waiter = tokio::spawn(async move { r.poll(1, Duration::from_secs(5)).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.append(vec![event("x", "c", 5)]).await.unwrap();
            let got = waiter.await.unwrap().unwrap();
            assert_eq!(got.len(), 1);
            let n = Notification {
                customer: "c".into(),
                meter: "api_requests".into(),
                period_start_ms: 0,
                period_end_ms: 10,
                threshold: 80,
                usage: 8,
                limit: 10,
                crossed_ms: 5,
            };
            assert!(log.publish_notification(&n).await.unwrap());
            assert!(!log.publish_notification(&n).await.unwrap());
        }
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(&path), clock).unwrap();
        assert_eq!(
            log.append(vec![event("x", "c", 5)])
                .await
                .unwrap()
                .duplicates,
            1
        );
        assert_eq!(log.end_offsets().await.unwrap(), vec![(0, 2)]);
        assert_eq!(log.notifications_since(0).await.unwrap().len(), 1);
        assert!(log.notifications_since(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_poll_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(
            EmbeddedLogConfig::new(dir.path().join("e.db")),
            Arc::new(ManualClock::new(1_000)),
        )
        .unwrap();
        log.append(vec![event("a", "c", 1), event("b", "c", 1)])
            .await
            .unwrap();
        let mut r = log.reader().unwrap();
        // The poll reads both records, then lingers for more and is cancelled while it waits.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            r.poll(10, Duration::from_secs(5)),
        )
        .await;
        assert!(cancelled.is_err());
        let got = r.poll(10, Duration::from_millis(1)).await.unwrap();
        assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[tokio::test]
    async fn maintenance_expires_ids_and_drops_only_consumed_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = EmbeddedLogConfig::new(dir.path().join("e.db"));
        cfg.dedup_window = Duration::from_secs(10);
        cfg.retention = Duration::from_secs(10);
        let log = EmbeddedLog::open(cfg.clone(), Arc::new(ManualClock::new(0))).unwrap();
        log.append(vec![event("a", "c", 1), event("b", "c", 1)])
            .await
            .unwrap();
        log.group_reader("aggregator")
            .unwrap()
            .commit(&BTreeMap::from([(0, 2)]))
            .await
            .unwrap();
        {
            let side = log.side.lock().unwrap();
            maintain(&side, &cfg, 20_000).unwrap();
            let left: i64 = side
                .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
                .unwrap();
            assert_eq!(left, 1, "record 2 is not consumed yet");
            let ids: i64 = side
                .query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ids, 0);
        }
        // Offsets keep growing after records were dropped.
        log.append(vec![event("a", "c", 1)]).await.unwrap();
        assert_eq!(log.end_offsets().await.unwrap(), vec![(0, 4)]);
    }
}
