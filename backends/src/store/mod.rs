//! The usage store: where rolled-up usage, log positions and customer records live. Its roles
//! are narrow traits, so each stage names what it uses:
//!
//! | trait | used by |
//! |---|---|
//! | [`UsageWriter`] (de-duplication, atomic batch writes, positions) | aggregator |
//! | [`UsageReader`] (totals, series, top customers, the snapshot) | query API, enforcer, billing-sync |
//! | [`Customers`] (plan, overrides, period, payment state) | enforcer, billing-sync, the customer API |
//! | [`BillingMarks`] (what was reported to Stripe) | billing-sync |
//! | [`WebhookOutbox`] (notification deliveries in flight) | enforcer |
//! | [`ApiKeys`] (hashed API keys) | the binary's authentication |
//! | [`MeterDefinitions`] (meters managed through the API) | every component, through [`crate::catalog`] |
//!
//! [`Store`] is all of them. One adapter per backend, each split by role with its schema beside
//! it:
//!
//! - [`sqlite`]: the embedded default (`usage.db`, SQLite in WAL mode, `synchronous=FULL`).
//! - [`clickhouse`] (cargo feature `clickhouse`): ClickHouse, for the distributed deployment.
//!
//! # Contract
//! [`UsageWriter::apply`] writes a batch's cells and the log positions after it in one atomic
//! step. A batch whose positions the store has already passed is skipped, so a replay after a
//! crash can never add twice; a batch that overlaps the stored position only in part is refused
//! ([`crate::Error::Fenced`]): another writer owns the partition.

#[cfg(feature = "clickhouse")]
pub mod clickhouse;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tally_schemas::Record;
use tally_schemas::{Aggregation, Customer, Window};

use tally_schemas::rollup::Rollup;

use crate::Result;

/// What [`UsageWriter::apply`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Written,
    /// Every record of the batch was already in the store.
    Replay,
}

/// Which usage the enforcer wants at start-up.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Period start of customers billed by calendar month (the default).
    pub default_since_ms: i64,
    /// Customers whose current period starts elsewhere, with that start.
    pub since_by_customer: Vec<(String, i64)>,
    /// Meters whose usage belongs to a period ([`Aggregation::is_periodic`]), with their
    /// aggregation; the others are gauges.
    pub periodic_meters: Vec<(String, Aggregation)>,
}

/// Period-to-date usage, consistent with the log positions it covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Next offset per partition: follow the log from here.
    pub offsets: BTreeMap<u32, u64>,
    /// The figure of every periodic meter (sums, extremes, distinct counts) since each
    /// customer's period start: (customer, meter, usage).
    pub totals: Vec<(String, String, u64)>,
    /// Latest gauge values: (customer, meter, event time, value).
    pub gauges: Vec<(String, String, i64, u64)>,
    /// The values `unique_count` meters saw since each customer's period start: (customer,
    /// meter, value).
    pub distinct: Vec<(String, String, String)>,
}

/// Where the aggregator resumes one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Start of the last block written (blocks), or `next` (increments).
    pub start: u64,
    /// Next offset after what the store holds.
    pub next: u64,
}

/// The aggregator's side: de-duplication, atomic batch writes and the log positions they
/// cover (see the module contract).
#[async_trait]
pub trait UsageWriter: Send + Sync + 'static {
    /// For each record, whether it is the first of its (`source`, `id`) within the
    /// de-duplication window, remembering the ones that are. A record read again (same partition
    /// and offset) is still the first. Stores fed by a log that drops duplicates itself keep
    /// every record.
    async fn first_seen(&self, records: &[Record]) -> Result<Vec<bool>> {
        Ok(vec![true; records.len()])
    }

    /// Periodic housekeeping (expiring de-duplication ids).
    async fn maintain(&self, _now_ms: i64) -> Result<()> {
        Ok(())
    }

    /// Writes a batch and its log positions atomically (see the module contract).
    async fn apply(&self, rollup: &Rollup) -> Result<Applied>;

    /// Next offset per partition that the store covers.
    async fn offsets(&self) -> Result<BTreeMap<u32, u64>>;

    /// Whether batches reach this store as cumulative blocks rather than increments (see
    /// the aggregator's `blocks` module): stores that cannot check positions and write in one transaction.
    fn takes_blocks(&self) -> bool {
        false
    }

    /// Where the aggregator resumes each partition. Stores of increments resume at the next
    /// offset; stores of blocks at the start of the last block written.
    async fn resume(&self) -> Result<BTreeMap<u32, Resume>> {
        Ok(self
            .offsets()
            .await?
            .into_iter()
            .map(|(p, next)| (p, Resume { start: next, next }))
            .collect())
    }
}

/// Nanoseconds since the epoch: the version of a record written now (the latest write wins,
/// in ClickHouse's ReplacingMergeTree tables as in SQLite).
pub fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Reads of rolled-up usage: the query API, the enforcer's start-up snapshot, billing-sync.
#[async_trait]
pub trait UsageReader: Send + Sync + 'static {
    /// For each record, the offset (in its partition) at which its (`source`, `id`) was first
    /// counted, as far as the store knows; `None` when not counted yet. Reads only. Stores fed
    /// by a log that drops duplicates itself know none.
    async fn counted_at(&self, records: &[Record]) -> Result<Vec<Option<u64>>> {
        Ok(vec![None; records.len()])
    }

    /// Usage of one meter: the sum over `[from_ms, to_ms)` for additive meters (the largest or
    /// smallest value for `max` and `min`, how many distinct values for `unique_count`); for
    /// gauges the latest value reported before `to_ms` (gauges carry over between periods).
    async fn total(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64>;

    /// An additive meter's usage of one customer over `[from_ms, to_ms)` per stored dimensions
    /// key (`tally_schemas::rollup::dimensions_key`: a JSON object of the dimensions' values,
    /// `""` for readings without any), in key order. Keys without usage are left out.
    async fn dimension_totals(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, u64)>>;

    /// [`UsageReader::dimension_totals`] per window bucket: for each stored dimensions key (in
    /// key order), its usage per bucket over `[from_ms, to_ms)`, buckets without usage left out.
    async fn dimension_series(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(String, Vec<(i64, u64)>)>>;

    /// The values a `unique_count` meter saw from one customer over `[from_ms, to_ms)`, in
    /// order (the enforcer's set when a customer's period moves).
    async fn distinct_values(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<String>>;

    /// Usage per window bucket over `[from_ms, to_ms)`: sums (largest, smallest, distinct
    /// values), or the latest gauge value in each bucket. Buckets without events are left out.
    async fn series(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(i64, u64)>>;

    /// [`UsageReader::total`] of several meters of one customer over the same range, in the
    /// order asked (the current-period summary).
    async fn totals(
        &self,
        customer: &str,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(meters.len());
        for (meter, aggregation) in meters {
            out.push(
                self.total(customer, meter, *aggregation, from_ms, to_ms)
                    .await?,
            );
        }
        Ok(out)
    }

    /// The `limit` customers with the most usage of one meter over `[from_ms, to_ms)` (for
    /// gauges: the latest value before `to_ms`), highest first, ties by customer id. Customers
    /// without usage are left out.
    async fn top_customers(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>>;

    /// One meter's usage across every customer over `[from_ms, to_ms)`: the sum of each
    /// customer's usage (for `max` and `min` meters the sum of each customer's largest or
    /// smallest value, for gauges of each customer's latest value before `to_ms`), and how many
    /// customers it covers.
    async fn meter_total(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<MeterTotal>;

    /// [`UsageReader::meter_total`] of several meters, in the order asked, in as few reads as
    /// the store can.
    async fn meter_totals(
        &self,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterTotal>> {
        let mut out = Vec::with_capacity(meters.len());
        for (meter, aggregation) in meters {
            out.push(
                self.meter_total(meter, *aggregation, from_ms, to_ms)
                    .await?,
            );
        }
        Ok(out)
    }

    /// Period-to-date usage for the enforcer, in one consistent read.
    async fn snapshot(&self, request: SnapshotRequest) -> Result<Snapshot>;
}

/// Customer records (plan, overrides, billing period, payment state), latest write wins.
#[async_trait]
pub trait Customers: Send + Sync + 'static {
    async fn customer(&self, id: &str) -> Result<Option<Customer>>;

    async fn put_customer(&self, id: &str, customer: &Customer) -> Result<()>;

    /// Customers changed at or after `updated_ms`.
    async fn customers_since(&self, updated_ms: i64) -> Result<Vec<(String, Customer)>>;
}

/// Billing-sync's state per (customer, meter): what was reported to Stripe.
#[async_trait]
pub trait BillingMarks: Send + Sync + 'static {
    /// Billing-sync's state per (customer, meter), as it wrote it (JSON the store does not
    /// read).
    async fn billing_marks(&self) -> Result<Vec<(String, String, String)>>;

    /// Stores billing-sync's state of one (customer, meter); durable when this returns.
    async fn put_billing_mark(&self, customer: &str, meter: &str, mark: &str) -> Result<()>;

    /// [`BillingMarks::put_billing_mark`] for many at once, in one write where the store can.
    async fn put_billing_marks(&self, marks: &[(String, String, String)]) -> Result<()> {
        for (customer, meter, mark) in marks {
            self.put_billing_mark(customer, meter, mark).await?;
        }
        Ok(())
    }
}

/// The enforcer's webhook outbox, shared by its replicas.
#[async_trait]
pub trait WebhookOutbox: Send + Sync + 'static {
    /// The enforcer's webhook outbox: deliveries not yet finished.
    async fn pending_webhooks(&self) -> Result<Vec<WebhookDelivery>>;

    /// Records a delivery's state; durable when this returns. A finished one (`done`) leaves
    /// the outbox.
    async fn put_webhook(&self, delivery: &WebhookDelivery) -> Result<()>;
}

/// API key records (hashes of the keys, never the keys).
#[async_trait]
pub trait ApiKeys: Send + Sync + 'static {
    /// Every API key record, as `(id, record)`: JSON the store does not read (the records hold
    /// hashes of the keys, never the keys).
    async fn api_keys(&self) -> Result<Vec<(String, String)>>;

    /// Stores an API key record; a later `version` of the same id replaces it. Durable when
    /// this returns.
    async fn put_api_key(&self, id: &str, record: &str, version: u64) -> Result<()>;
}

/// Meters managed through the API (`/v1/meters`), as JSON [`tally_schemas::ManagedMeter`]
/// records; the catalogue file's meters are never stored.
#[async_trait]
pub trait MeterDefinitions: Send + Sync + 'static {
    /// Every meter record, as `(name, record)`.
    async fn meter_definitions(&self) -> Result<Vec<(String, String)>>;

    /// Stores a meter record; a later `version` of the same name replaces it. Durable when
    /// this returns.
    async fn put_meter_definition(&self, name: &str, record: &str, version: u64) -> Result<()>;
}

/// Every role's trait, for code that calls the methods of a concrete store
/// (`use tally_backends::store::prelude::*`).
pub mod prelude {
    pub use super::{
        ApiKeys as _, BillingMarks as _, Customers as _, MeterDefinitions as _, UsageReader as _,
        UsageWriter as _, WebhookOutbox as _,
    };
}

/// Every role at once: what a backend implements, and what the process wires up. A stage keeps
/// only the roles it uses (`Arc<dyn Store>` coerces to `Arc<dyn Customers>` and the others).
pub trait Store:
    UsageWriter + UsageReader + Customers + BillingMarks + WebhookOutbox + ApiKeys + MeterDefinitions
{
}

impl<T> Store for T where
    T: UsageWriter
        + UsageReader
        + Customers
        + BillingMarks
        + WebhookOutbox
        + ApiKeys
        + MeterDefinitions
{
}

/// A meter's usage across customers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterTotal {
    pub usage: u64,
    /// Customers with usage of the meter in the range.
    pub customers: u64,
}

/// One notification webhook to one URL, as the enforcer's outbox keeps it between attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// The notification's stable id (`Tally-Webhook-Id`).
    pub id: String,
    pub url: String,
    /// The JSON body, sent unchanged on every attempt.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, milliseconds since the epoch.
    pub next_attempt_ms: i64,
    /// The replica delivering it, and until when: another replica takes a delivery over once
    /// its lease has run out.
    pub owner: String,
    pub lease_until_ms: i64,
    /// Delivered or given up.
    pub done: bool,
}

/// Compares a batch's positions with the `stored` ones (next offset per partition): `Replay`
/// when the store has every partition of the batch already, `Written` when the batch is to be
/// written, [`crate::Error::Fenced`] when it starts below a stored position it does not cover.
pub(crate) fn check_positions(rollup: &Rollup, stored: &BTreeMap<u32, u64>) -> Result<Applied> {
    let mut fresh = false;
    for (&partition, &(first, next)) in &rollup.ranges {
        let at = stored.get(&partition).copied().unwrap_or(0);
        if at >= next {
            continue;
        }
        if at > first {
            return Err(crate::Error::Fenced {
                partition,
                first,
                stored: at,
            });
        }
        fresh = true;
    }
    Ok(if fresh {
        Applied::Written
    } else {
        Applied::Replay
    })
}

/// Splits `(key, time, value)` rows ordered by key then time into each key's buckets (sums).
pub(crate) fn bucket_by_key(
    rows: impl IntoIterator<Item = (String, i64, u64)>,
    window: Window,
) -> Vec<(String, Vec<(i64, u64)>)> {
    let mut keys: Vec<(String, Vec<(i64, u64)>)> = Vec::new();
    for (key, t, v) in rows {
        match keys.last_mut() {
            Some((k, points)) if *k == key => points.push((t, v)),
            _ => keys.push((key, vec![(t, v)])),
        }
    }
    keys.into_iter()
        .map(|(k, points)| (k, bucket(points, window, Aggregation::Sum)))
        .map(|(k, points)| {
            (
                k,
                points
                    .into_iter()
                    .filter(|(_, v)| *v > 0)
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, points)| !points.is_empty())
        .collect()
}

/// How many distinct values fall in each `window` bucket, from time-ordered `(bucket start or
/// finer time, value)` rows (a `unique_count` meter's series).
pub(crate) fn bucket_distinct(
    rows: impl IntoIterator<Item = (i64, String)>,
    window: Window,
) -> Vec<(i64, u64)> {
    let mut out: Vec<(i64, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, value) in rows {
        let bucket = window.bucket_of(t);
        if out.last().is_none_or(|(b, _)| *b != bucket) {
            out.push((bucket, 0));
            seen.clear();
        }
        if seen.insert(value) {
            out.last_mut().expect("pushed above").1 += 1;
        }
    }
    out
}

/// Groups time-ordered `(bucket start or finer time, value)` rows into `window` buckets: sums
/// for additive meters, the largest or smallest for `max` and `min`, the last (latest) value for
/// gauges.
pub(crate) fn bucket(
    rows: impl IntoIterator<Item = (i64, u64)>,
    window: Window,
    aggregation: Aggregation,
) -> Vec<(i64, u64)> {
    let mut out: Vec<(i64, u64)> = Vec::new();
    for (t, value) in rows {
        let bucket = window.bucket_of(t);
        match out.last_mut() {
            Some((b, v)) if *b == bucket => {
                *v = if aggregation.is_periodic() {
                    aggregation.fold(*v, value)
                } else {
                    value
                };
            }
            _ => out.push((bucket, value)),
        }
    }
    out
}
