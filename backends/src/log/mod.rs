//! The usage-event log: the durable, ordered hand-off between ingest and the consumers
//! (aggregator, enforcer). One adapter per backend, all behind [`EventLog`]:
//!
//! - [`embedded`]: SQLite in WAL mode with `synchronous=FULL`, for the one-process default.
//! - `kafka` (cargo feature `kafka`): a Kafka topic keyed by customer, for the distributed
//!   deployment.
//!
//! # Contract
//! - [`EventLog::append`] returns only once every event it reports as accepted is durable; an
//!   error means nothing of that call may be assumed durable or not (the caller answers 503 and
//!   the client retries; the retry is de-duplicated).
//! - Events with a (`source`, `id`) already appended within the de-duplication window are dropped
//!   and reported as duplicates.
//! - Records carry a partition and an offset; offsets only grow within a partition. A consumer
//!   keeps its own position ([`LogReader::seek`]) and may report it with [`LogReader::commit`] so
//!   the log can drop what every consumer has passed.

pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
pub use tally_schemas::Record;
use tally_schemas::{Notification, UsageEvent};

use crate::Result;

/// What an append did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Events now durable on the log.
    pub accepted: usize,
    /// Events dropped because their (`source`, `id`) was already on the log.
    pub duplicates: usize,
}

/// The write side and the shared facilities of a log backend. Every log also keeps
/// [`Notifications`].
#[async_trait]
pub trait EventLog: Notifications {
    /// Appends `events` durably, dropping duplicates.
    async fn append(&self, events: Vec<UsageEvent>) -> Result<AppendOutcome>;

    /// A reader over every partition, positioned at the start until [`LogReader::seek`].
    fn reader(&self) -> Result<Box<dyn LogReader>>;

    /// A reader that shares the partitions with the other members of consumer group `group`
    /// (see [`LogReader::assignment_epoch`]). Backends without groups give every partition.
    fn group_reader(&self, _group: &str) -> Result<Box<dyn LogReader>> {
        self.reader()
    }

    /// Next offset to be written, per partition (the high watermark).
    async fn end_offsets(&self) -> Result<Vec<(u32, u64)>>;
}

/// Threshold-notification claims, kept beside the log: the first publication of a
/// (customer, meter, period, threshold) wins, whichever replica makes it, so each notification
/// goes out once.
#[async_trait]
pub trait Notifications: Send + Sync + 'static {
    /// Publishes a threshold notification; returns `true` for the first publication of its
    /// (customer, meter, period start, threshold) and `false` when it was already published,
    /// by this handle or another replica. Exactly one call returns `true` per key, provided a
    /// call that failed is retried until it answers.
    async fn publish_notification(&self, n: &Notification) -> Result<bool>;

    /// Notifications of periods that end after `since_ms`.
    async fn notifications_since(&self, since_ms: i64) -> Result<Vec<Notification>>;
}

/// The read side: an ordered cursor over the log.
#[async_trait]
pub trait LogReader: Send {
    /// Positions the cursor of `partition` at `next_offset`: the partition's next record is
    /// the one there (or, if it is gone from the log, the first after it).
    fn seek(&mut self, partition: u32, next_offset: u64);

    /// Returns up to `max` records in offset order, waiting up to `linger` for the batch to
    /// fill once the first record is there, and up to `linger` for a first record.
    ///
    /// Cancel-safe: a poll dropped before it returns loses no record; the next poll returns
    /// them.
    async fn poll(&mut self, max: usize, linger: Duration) -> Result<Vec<Record>>;

    /// Changes whenever the partitions this reader owns change (a consumer-group rebalance).
    /// A caller that keeps positions per partition re-reads them when it does.
    fn assignment_epoch(&self) -> u64 {
        0
    }

    /// Reports positions durably processed downstream: a consumer group's committed offsets
    /// (Kafka), or the positions the embedded log keeps for retention. Readers that are not
    /// group members keep nothing.
    async fn commit(&mut self, _positions: &BTreeMap<u32, u64>) -> Result<()> {
        Ok(())
    }

    /// The event time (ms) from which this reader drops repeats of an event by itself: a
    /// record whose event `time` is earlier may repeat one it no longer remembers, or read
    /// before it began (a retry to another ingest process, `tally replay`); a caller that must
    /// not count it twice asks the store where the aggregator first counted it. `None`: the log never
    /// holds a repeat (it drops them when appending).
    fn remembers_since_ms(&self) -> Option<i64> {
        None
    }

    /// Leaves the consumer group and joins it again, for a caller that saw partitions nobody
    /// reads (a group stuck with an assignment that leaves them out). Readers that are not
    /// group members do nothing.
    fn rejoin(&mut self) -> Result<()> {
        Ok(())
    }
}
