//! The ClickHouse usage store, for the distributed deployment (schema in [`schema`], applied by
//! `tally migrate`). By role: `writer` ([`UsageWriter`]: de-duplication ids, block writes,
//! positions), `reader` ([`UsageReader`]), `records` (customers, billing marks, the outbox, API
//! keys).
//!
//! # Exactly once
//! ClickHouse has no transactions: a writer that checked the stored position can land its write
//! after another writer's (a rebalance, a member that stalled past its session). So batches come
//! as cumulative blocks (the aggregator's `blocks` module), cut the same way by every aggregator, and a write of
//! a batch is one INSERT into `usage_block_cells`, an unpartitioned
//! `ReplacingMergeTree(batch_next_offset)`: one part, all or nothing. Every row carries its
//! block's Kafka partition, first offset and the next offset after what it covers; a block
//! without usage (all duplicates) gets a marker row (`customer = ''`), so the stored position
//! always moves with the data:
//! - per cell and block, the write that reached furthest wins (reads use `FINAL`), whatever
//!   order writes land in; a block written again after an ambiguous failure collapses;
//! - a partition resumes at the start of its furthest block (`argMax(batch_first_offset,
//!   batch_next_offset)`) and writes from `max(batch_next_offset)` on, both read from the cells
//!   themselves (no second table to get out of step) when a partition is assigned;
//! - before writing, the small `batch_offsets` view is read: a batch entirely below it is a
//!   replay and skipped; one whose new records start below it is refused
//!   ([`crate::Error::Fenced`]), which only spares a stale writer useless work.
//!
//! # De-duplication
//! [`UsageWriter::first_seen`] keeps, per Kafka partition, the (source, id) of every counted
//! event with its offset in `event_ids` (day-partitioned by receipt; days past the window are
//! dropped). The same id at another offset is a duplicate; at the same offset, a replay of the
//! record that was counted. The ids are written before the cells, so a crash in between loses
//! nothing: the replay finds its own offsets and counts them.
//!
//! # Compatibility
//! Queries stay within what ClickHouse 18.16 and current releases both accept: no
//! `RowBinaryWithNamesAndTypes` (the client's validation is off), no `DateTime64`, no
//! parameterised queries (values are bound and escaped by the client).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::store::version_now;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use tally_schemas::rollup::{Block, Cell, CellKey, Rollup};
use tally_schemas::{Aggregation, Customer, Record, Window, quantity};

use super::{
    ApiKeys, Applied, BillingMarks, Customers, MeterDefinitions, MeterTotal, Resume, Snapshot,
    SnapshotRequest, UsageReader, UsageWriter, WebhookDelivery, WebhookOutbox,
};
use crate::{Error, Result};

mod reader;
mod records;
pub mod schema;
mod writer;

/// Settings of the ClickHouse store.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// How long a (source, id) stays in the de-duplication table.
    pub dedup_window: Duration,
}

impl ClickHouseConfig {
    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        ClickHouseConfig {
            url: url.into(),
            database: database.into(),
            user: None,
            password: None,
            dedup_window: Duration::from_secs(35 * 86_400),
        }
    }
}

fn ch(e: clickhouse::error::Error) -> Error {
    Error::ClickHouse(e)
}

/// Ids looked up per query (keeps each query well under `max_query_size`).
const LOOKUP_CHUNK: usize = 5_000;

/// `sum(value)` as two exact parts, `h` (the high 32 bits) and `l` (the low ones): ClickHouse's
/// `sum(UInt64)` wraps past 2^64. Joined by [`joined`] (see [`tally_schemas::quantity`]).
const SPLIT_SUM: &str = "sum(bitShiftRight(value, 32)) AS h, sum(bitAnd(value, 4294967295)) AS l";

/// The split figure (`h`, `l`) of the rows selected, by `aggregation`: [`SPLIT_SUM`] for
/// additive meters, the parts of the largest or smallest value for `max` and `min`, of the
/// number of distinct values for `unique_count`.
fn split_of(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::UniqueCount => {
            "bitShiftRight(uniqExact(distinct_value), 32) AS h, \
             bitAnd(uniqExact(distinct_value), 4294967295) AS l"
        }
        Aggregation::Max => {
            "bitShiftRight(max(value), 32) AS h, bitAnd(max(value), 4294967295) AS l"
        }
        Aggregation::Min => {
            "bitShiftRight(min(value), 32) AS h, bitAnd(min(value), 4294967295) AS l"
        }
        _ => SPLIT_SUM,
    }
}

/// A customer's total from its split sums: exact, held at the cap.
fn joined((h, l): (u64, u64)) -> u64 {
    quantity::join_capped(h.into(), l.into())
}

#[derive(Row, Serialize, Deserialize)]
struct CellRow {
    customer: String,
    meter: String,
    /// Seconds since the epoch (`DateTime`).
    minute: u32,
    value: u64,
    last_ms: i64,
    partition: u32,
    batch_first_offset: u64,
    batch_next_offset: u64,
    dims: String,
    distinct_value: String,
}

#[derive(Row, Serialize, Deserialize)]
struct IdRow {
    /// Days since the epoch (`Date`).
    day: u16,
    partition: u32,
    source: String,
    id: String,
    offset: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct OutboxRow {
    id: String,
    url: String,
    done: u8,
    /// The delivery as JSON.
    delivery: String,
    /// Nanoseconds since the epoch when written: the latest write wins.
    version: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct MarkRow {
    customer: String,
    meter: String,
    mark: String,
    /// Nanoseconds since the epoch when written: the latest write wins.
    version: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct CustomerRow {
    id: String,
    record: String,
    updated_ms: i64,
}

#[derive(Row, Serialize)]
struct ApiKeyRow {
    id: String,
    record: String,
    version: u64,
}

#[derive(Row, Serialize)]
struct MeterDefinitionRow {
    name: String,
    record: String,
    version: u64,
}

/// A client for the server of `config`, without a database.
fn client(config: &ClickHouseConfig) -> Client {
    let mut client = Client::default()
        .with_url(&config.url)
        // 18.16 knows neither RowBinaryWithNamesAndTypes nor the settings validation uses.
        .with_validation(false);
    if let Some(user) = &config.user {
        client = client.with_user(user);
    }
    if let Some(password) = &config.password {
        client = client.with_password(password);
    }
    client
}

/// The ClickHouse store.
pub struct ClickHouseStore {
    client: Client,
    database: String,
    dedup_window: Duration,
}

/// The first whole second at or after `ms`, within `DateTime`'s range: `minute >= it` is
/// `minute_ms >= ms`.
fn seconds(ms: i64) -> i64 {
    ms.saturating_add(999)
        .div_euclid(1000)
        .clamp(0, u32::MAX as i64)
}

impl ClickHouseStore {
    pub fn new(config: &ClickHouseConfig) -> ClickHouseStore {
        ClickHouseStore {
            client: client(config).with_database(&config.database),
            database: config.database.clone(),
            dedup_window: config.dedup_window,
        }
    }

    /// Applies every migration not yet applied (`tally migrate`); idempotent.
    pub async fn migrate(config: &ClickHouseConfig) -> Result<Vec<u32>> {
        use schema::{MIGRATIONS, statements, valid_database_name};
        if !valid_database_name(&config.database) {
            return Err(Error::Config(format!(
                "invalid database name {:?}",
                config.database
            )));
        }
        // Statements name the database themselves: connect without one (it may not exist).
        let client = client(config);
        let db = &config.database;
        let exists: u64 = client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = 'schema_migrations'")
            .bind(db.as_str())
            .fetch_one()
            .await
            .map_err(ch)?;
        let applied: HashSet<u32> = if exists > 0 {
            client
                .query(&format!("SELECT version FROM {db}.schema_migrations"))
                .fetch_all::<u32>()
                .await
                .map_err(ch)?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        let mut done = Vec::new();
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            let done_before = match m.unless {
                Some(q) => {
                    let n: u64 = client
                        .query(&q.replace("{db}", db))
                        .fetch_one()
                        .await
                        .map_err(ch)?;
                    n > 0
                }
                None => false,
            };
            if !done_before {
                for sql in statements(m, db) {
                    client.query(&sql).execute().await.map_err(ch)?;
                }
            }
            client
                .query(&format!(
                    "INSERT INTO {db}.schema_migrations (version, name, applied_at) VALUES (?, ?, now())"
                ))
                .bind(m.version)
                .bind(m.name)
                .execute()
                .await
                .map_err(ch)?;
            done.push(m.version);
        }
        Ok(done)
    }

    /// Positions from the `batch_offsets` view: a few rows, cheap on every flush. The view is
    /// filled by the same INSERT as the cells; if it ever lags (its write failed after the
    /// cells'), a replay it does not recognise is written again with the same batch keys and
    /// collapses, so it is safe for the check before a write, not for resuming.
    async fn recorded_offsets(&self) -> Result<BTreeMap<u32, u64>> {
        self.offsets_by(
            "SELECT partition, maxMerge(next_offset) FROM batch_offsets GROUP BY partition",
        )
        .await
    }

    /// Positions read from the cells themselves: the truth, for resuming and snapshots.
    async fn stored_offsets(&self) -> Result<BTreeMap<u32, u64>> {
        self.offsets_by(
            "SELECT partition, max(batch_next_offset) FROM usage_block_cells GROUP BY partition",
        )
        .await
    }

    /// Runs a `(partition, next offset)` query.
    async fn offsets_by(&self, sql: &str) -> Result<BTreeMap<u32, u64>> {
        let rows: Vec<(u32, u64)> = self.client.query(sql).fetch_all().await.map_err(ch)?;
        Ok(rows.into_iter().collect())
    }

    /// Drops de-duplication days older than the window.
    async fn expire_ids(&self, now_ms: i64) -> Result<()> {
        let horizon_day = (now_ms - self.dedup_window.as_millis() as i64).div_euclid(86_400_000);
        let days: Vec<u16> = self
            .client
            .query(
                "SELECT DISTINCT min_date FROM system.parts
                 WHERE database = ? AND table = 'event_ids' AND active",
            )
            .bind(self.database.as_str())
            .fetch_all()
            .await
            .map_err(ch)?;
        for day in days.into_iter().filter(|d| (*d as i64) < horizon_day) {
            let date = &tally_schemas::period::rfc3339(day as i64 * 86_400_000)[..10];
            self.client
                .query(&format!("ALTER TABLE event_ids DROP PARTITION '{date}'"))
                .execute()
                .await
                .map_err(ch)?;
            tracing::info!(day = %date, "expired de-duplication ids");
        }
        Ok(())
    }
}

/// For each of `meters`, in order, its row from `additive` or `gauges` (by the meter's kind), or
/// the default when the query returned none (no usage). `max` and `min` meters get the default
/// too: the caller reads them on their own.
fn per_meter<T: Clone + Default>(
    meters: &[(String, Aggregation)],
    additive: &[(String, T)],
    gauges: &[(String, T)],
) -> Vec<T> {
    meters
        .iter()
        .map(|(meter, aggregation)| {
            let rows = match aggregation {
                a if a.is_additive() => additive,
                Aggregation::Latest => gauges,
                _ => &[],
            };
            rows.iter()
                .find(|(m, _)| m == meter)
                .map_or_else(T::default, |(_, v)| v.clone())
        })
        .collect()
}

/// A batch given as increments, as blocks: each partition's range of it is a block of its own.
fn batch_blocks(rollup: &Rollup) -> Vec<Block> {
    let mut blocks: BTreeMap<u32, Block> = rollup
        .ranges
        .iter()
        .map(|(&partition, &(first, next))| {
            let block = Block {
                partition,
                first,
                next,
                cells: HashMap::new(),
            };
            (partition, block)
        })
        .collect();
    for (k, cell) in &rollup.cells {
        if let Some(b) = blocks.get_mut(&k.partition) {
            b.cells.insert(k.clone(), *cell);
        }
    }
    blocks.into_values().collect()
}

/// Appends `s` as a ClickHouse string literal.
fn quote(s: &str, out: &mut String) {
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// The SQL list `('source', 'id'), ...` of the records at `idx`. Written here rather than bound
/// one value at a time: the client's binding rescans the query for every value, quadratic in
/// a list of thousands.
fn pair_list(records: &[Record], idx: &[usize]) -> String {
    let mut s = String::with_capacity(idx.len() * 48);
    for (n, &i) in idx.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        s.push('(');
        quote(&records[i].event.source, &mut s);
        s.push_str(", ");
        quote(&records[i].event.id, &mut s);
        s.push(')');
    }
    s
}

impl ClickHouseStore {
    /// The offset at which each (source, id) of `records[idx]` (all of `partition`) was first
    /// counted, per `event_ids`.
    async fn counted_in<'r>(
        &self,
        partition: u32,
        records: &'r [Record],
        idx: &[usize],
        index: &HashMap<(&str, &str), usize>,
    ) -> Result<HashMap<(&'r str, &'r str), u64>> {
        let mut counted = HashMap::new();
        for chunk in idx.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT source, id, min(offset) FROM event_ids
                 WHERE partition = {partition} AND (source, id) IN ({}) GROUP BY source, id",
                pair_list(records, chunk)
            );
            let found: Vec<(String, String, u64)> = self
                .client
                .query_raw(&sql)
                .with_setting("max_query_size", "67108864")
                .fetch_all()
                .await
                .map_err(ch)?;
            for (source, id, offset) in found {
                if let Some(&i) = index.get(&(source.as_str(), id.as_str())) {
                    let e = &records[i].event;
                    counted.insert((e.source.as_str(), e.id.as_str()), offset);
                }
            }
        }
        Ok(counted)
    }
}

/// The indexes of `records`, per partition.
fn by_partition(records: &[Record]) -> BTreeMap<u32, Vec<usize>> {
    let mut out: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        out.entry(r.partition).or_default().push(i);
    }
    out
}

/// (source, id) -> index, of `records[idx]`.
fn id_index<'r>(records: &'r [Record], idx: &[usize]) -> HashMap<(&'r str, &'r str), usize> {
    idx.iter()
        .map(|&i| {
            let e = &records[i].event;
            ((e.source.as_str(), e.id.as_str()), i)
        })
        .collect()
}
