//! The ClickHouse usage store, for the distributed deployment (schema in
//! [`tally_schemas::clickhouse`], applied by `tally migrate`).
//!
//! # Exactly once
//! ClickHouse has no transactions: a writer that checked the stored position can land its write
//! after another writer's (a rebalance, a member that stalled past its session). So batches come
//! as cumulative blocks ([`crate::blocks`]), cut the same way by every aggregator, and a write of
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
//! [`UsageStore::first_seen`] keeps, per Kafka partition, the (source, id) of every counted
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

use async_trait::async_trait;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use tally_ingest::log::Record;
use tally_schemas::{Aggregation, Customer, Window, quantity};

use super::{Applied, MeterTotal, Snapshot, SnapshotRequest, UsageStore, WebhookDelivery};
use crate::blocks::Resume;
use crate::rollup::{Block, Cell, Rollup};
use crate::{Error, Result};

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
    Error::ClickHouse(e.to_string())
}

/// Ids looked up per query (keeps each query well under `max_query_size`).
const LOOKUP_CHUNK: usize = 5_000;

/// `sum(value)` as two exact parts, `h` (the high 32 bits) and `l` (the low ones): ClickHouse's
/// `sum(UInt64)` wraps past 2^64. Joined by [`joined`] (see [`tally_schemas::quantity`]).
const SPLIT_SUM: &str = "sum(bitShiftRight(value, 32)) AS h, sum(bitAnd(value, 4294967295)) AS l";

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

/// Nanoseconds since the epoch: the version of a row in a ReplacingMergeTree of states.
fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
        use tally_schemas::clickhouse::{MIGRATIONS, statements, valid_database_name};
        if !valid_database_name(&config.database) {
            return Err(Error::ClickHouse(format!(
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
            for sql in statements(m, db) {
                client.query(&sql).execute().await.map_err(ch)?;
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
/// the default when the query returned none (no usage).
fn per_meter<T: Clone + Default>(
    meters: &[(String, Aggregation)],
    additive: &[(String, T)],
    gauges: &[(String, T)],
) -> Vec<T> {
    meters
        .iter()
        .map(|(meter, aggregation)| {
            let rows = if aggregation.is_additive() {
                additive
            } else {
                gauges
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

#[async_trait]
impl UsageStore for ClickHouseStore {
    async fn counted_at(&self, records: &[Record]) -> Result<Vec<Option<u64>>> {
        let mut out = vec![None; records.len()];
        for (partition, idx) in by_partition(records) {
            let index = id_index(records, &idx);
            let counted = self.counted_in(partition, records, &idx, &index).await?;
            for i in idx {
                let e = &records[i].event;
                out[i] = counted.get(&(e.source.as_str(), e.id.as_str())).copied();
            }
        }
        Ok(out)
    }

    async fn first_seen(&self, records: &[Record]) -> Result<Vec<bool>> {
        let mut keep = vec![false; records.len()];
        let mut new_ids = Vec::new();
        for (partition, idx) in by_partition(records) {
            let index = id_index(records, &idx);
            // The offset at which each (source, id) was counted, per what is stored.
            let mut counted = self.counted_in(partition, records, &idx, &index).await?;
            for i in idx {
                let r = &records[i];
                let key = (r.event.source.as_str(), r.event.id.as_str());
                match counted.get(&key) {
                    Some(&offset) => keep[i] = offset == r.offset,
                    None => {
                        counted.insert(key, r.offset);
                        keep[i] = true;
                        new_ids.push(IdRow {
                            day: r
                                .event
                                .received_ms
                                .div_euclid(86_400_000)
                                .clamp(0, u16::MAX as i64) as u16,
                            partition: r.partition,
                            source: r.event.source.clone(),
                            id: r.event.id.clone(),
                            offset: r.offset,
                        });
                    }
                }
            }
        }
        if !new_ids.is_empty() {
            let mut insert = self.client.insert::<IdRow>("event_ids").await.map_err(ch)?;
            for row in &new_ids {
                insert.write(row).await.map_err(ch)?;
            }
            insert.end().await.map_err(ch)?;
        }
        Ok(keep)
    }

    async fn apply(&self, rollup: &Rollup) -> Result<Applied> {
        if super::check_positions(rollup, &self.recorded_offsets().await?)? == Applied::Replay {
            return Ok(Applied::Replay);
        }
        let own;
        let blocks = if rollup.blocks.is_empty() {
            own = batch_blocks(rollup);
            &own
        } else {
            &rollup.blocks
        };
        let mut insert = self
            .client
            .insert::<CellRow>("usage_block_cells")
            .await
            .map_err(ch)?;
        for block in blocks {
            let row = |customer: &str, meter: &str, minute_ms: i64, value, last_ms| CellRow {
                customer: customer.to_owned(),
                meter: meter.to_owned(),
                minute: seconds(minute_ms) as u32,
                value,
                last_ms,
                partition: block.partition,
                batch_first_offset: block.first,
                batch_next_offset: block.next,
            };
            if block.cells.is_empty() {
                // The block's position, without usage.
                insert.write(&row("", "", 0, 0, 0)).await.map_err(ch)?;
            }
            for (k, cell) in &block.cells {
                let (value, last_ms) = match *cell {
                    Cell::Add(v) => (v, 0),
                    Cell::Latest { time_ms, value } => (value, time_ms),
                };
                insert
                    .write(&row(&k.customer, &k.meter, k.minute_ms, value, last_ms))
                    .await
                    .map_err(ch)?;
            }
        }
        insert.end().await.map_err(ch)?;
        Ok(Applied::Written)
    }

    fn takes_blocks(&self) -> bool {
        true
    }

    async fn resume(&self) -> Result<BTreeMap<u32, Resume>> {
        // The last block written is the one that reaches furthest.
        let rows: Vec<(u32, u64, u64)> = self
            .client
            .query(
                "SELECT partition, argMax(batch_first_offset, batch_next_offset),
                        max(batch_next_offset)
                 FROM usage_block_cells GROUP BY partition",
            )
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(rows
            .into_iter()
            .map(|(p, start, next)| (p, Resume { start, next }))
            .collect())
    }

    async fn offsets(&self) -> Result<BTreeMap<u32, u64>> {
        self.stored_offsets().await
    }

    async fn maintain(&self, now_ms: i64) -> Result<()> {
        self.expire_ids(now_ms).await
    }

    async fn total(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64> {
        if aggregation.is_additive() {
            let v: (u64, u64) = self
                .client
                .query(&format!(
                    "SELECT {SPLIT_SUM} FROM usage_block_cells FINAL
                     WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)"
                ))
                .bind(customer)
                .bind(meter)
                .bind(seconds(from_ms))
                .bind(seconds(to_ms))
                .fetch_one()
                .await
                .map_err(ch)?;
            Ok(joined(v))
        } else {
            let v: Option<u64> = self
                .client
                .query(
                    "SELECT value FROM usage_block_cells
                     WHERE customer = ? AND meter = ? AND minute < toDateTime(?)
                     ORDER BY minute DESC, last_ms DESC, value DESC LIMIT 1",
                )
                .bind(customer)
                .bind(meter)
                .bind(seconds(to_ms))
                .fetch_optional()
                .await
                .map_err(ch)?;
            Ok(v.unwrap_or(0))
        }
    }

    async fn series(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(i64, u64)>> {
        // Hours and days are rolled up by ClickHouse; months (calendar) from its daily rows.
        let bucket = match window {
            Window::Minute => "minute",
            Window::Hour => "toStartOfHour(minute)",
            Window::Day | Window::Month => "toStartOfDay(minute)",
        };
        let sql = if aggregation.is_additive() {
            format!(
                "SELECT toUInt32({bucket}) AS b, {SPLIT_SUM} FROM usage_block_cells FINAL
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY b ORDER BY b"
            )
        } else {
            format!(
                "SELECT b, bitShiftRight(v, 32), bitAnd(v, 4294967295) FROM (
                 SELECT toUInt32({bucket}) AS b, argMax(value, (minute, last_ms, value)) AS v FROM usage_block_cells
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY b) ORDER BY b"
            )
        };
        let rows: Vec<(u32, u64, u64)> = self
            .client
            .query(&sql)
            .bind(customer)
            .bind(meter)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms))
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(super::bucket(
            rows.into_iter()
                .map(|(b, h, l)| (b as i64 * 1000, joined((h, l)))),
            window,
            aggregation,
        ))
    }

    async fn totals(
        &self,
        customer: &str,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<u64>> {
        // Two reads of the customer's rows (the primary key's prefix), whatever the meters.
        let sums = self
            .client
            .query(&format!(
                "SELECT meter, {SPLIT_SUM} FROM usage_block_cells FINAL
                 WHERE customer = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY meter"
            ))
            .bind(customer)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms));
        let latest = self
            .client
            .query(
                "SELECT meter, argMax(value, (minute, last_ms, value)) FROM usage_block_cells
                 WHERE customer = ? AND minute < toDateTime(?) GROUP BY meter",
            )
            .bind(customer)
            .bind(seconds(to_ms));
        let (sums, latest) = tokio::try_join!(
            sums.fetch_all::<(String, u64, u64)>(),
            latest.fetch_all::<(String, u64)>()
        )
        .map_err(ch)?;
        let sums: Vec<(String, u64)> = sums
            .into_iter()
            .map(|(m, h, l)| (m, joined((h, l))))
            .collect();
        Ok(per_meter(meters, &sums, &latest))
    }

    async fn top_customers(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        let query = if aggregation.is_additive() {
            // The sums normalised to (high, low < 2^32) order exactly, without overflow.
            self.client
                .query(&format!(
                    "SELECT customer, h + bitShiftRight(l, 32) AS hi, bitAnd(l, 4294967295) AS lo
                     FROM (SELECT customer, {SPLIT_SUM} FROM usage_block_cells FINAL
                           WHERE meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                           GROUP BY customer HAVING h > 0 OR l > 0)
                     ORDER BY hi DESC, lo DESC, customer LIMIT ?"
                ))
                .bind(meter)
                .bind(seconds(from_ms))
        } else {
            self.client
                .query(
                    "SELECT customer, bitShiftRight(v, 32), bitAnd(v, 4294967295) FROM (
                         SELECT customer, argMax(value, (minute, last_ms, value)) AS v
                         FROM usage_block_cells WHERE meter = ? AND minute < toDateTime(?)
                         GROUP BY customer HAVING v > 0)
                     ORDER BY v DESC, customer LIMIT ?",
                )
                .bind(meter)
        };
        let rows: Vec<(String, u64, u64)> = query
            .bind(seconds(to_ms))
            .bind(limit as u64)
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(rows
            .into_iter()
            .map(|(c, h, l)| (c, joined((h, l))))
            .collect())
    }

    async fn meter_totals(
        &self,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterTotal>> {
        // One scan for the additive meters and one for the gauges, whatever their number.
        let sums = self
            .client
            .query(&format!(
                "SELECT meter, sum(h), sum(l), count() FROM (
                     SELECT meter, customer, {SPLIT_SUM} FROM usage_block_cells FINAL
                     WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
                     GROUP BY meter, customer HAVING h > 0 OR l > 0)
                 GROUP BY meter"
            ))
            .bind(seconds(from_ms))
            .bind(seconds(to_ms));
        let latest = self
            .client
            .query(
                "SELECT meter, sum(bitShiftRight(v, 32)), sum(bitAnd(v, 4294967295)), count() FROM (
                     SELECT meter, customer, argMax(value, (minute, last_ms, value)) AS v
                     FROM usage_block_cells WHERE minute < toDateTime(?)
                     GROUP BY meter, customer HAVING v > 0)
                 GROUP BY meter",
            )
            .bind(seconds(to_ms));
        let additive = meters.iter().any(|(_, a)| a.is_additive());
        let gauges = meters.iter().any(|(_, a)| !a.is_additive());
        let (sums, latest) = tokio::try_join!(
            async {
                if additive {
                    sums.fetch_all::<(String, u64, u64, u64)>().await
                } else {
                    Ok(Vec::new())
                }
            },
            async {
                if gauges {
                    latest.fetch_all::<(String, u64, u64, u64)>().await
                } else {
                    Ok(Vec::new())
                }
            }
        )
        .map_err(ch)?;
        // Several customers: exact up to u64::MAX, not held at one customer's cap.
        let total = |rows: Vec<(String, u64, u64, u64)>| -> Vec<(String, MeterTotal)> {
            rows.into_iter()
                .map(|(m, h, l, customers)| {
                    let usage = quantity::join(h.into(), l.into());
                    (m, MeterTotal { usage, customers })
                })
                .collect()
        };
        Ok(per_meter(meters, &total(sums), &total(latest)))
    }

    async fn meter_total(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<MeterTotal> {
        let query = if aggregation.is_additive() {
            self.client
                .query(&format!(
                    "SELECT sum(h), sum(l), count() FROM (
                         SELECT customer, {SPLIT_SUM} FROM usage_block_cells FINAL
                         WHERE meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                         GROUP BY customer HAVING h > 0 OR l > 0)"
                ))
                .bind(meter)
                .bind(seconds(from_ms))
        } else {
            self.client
                .query(
                    "SELECT sum(bitShiftRight(v, 32)), sum(bitAnd(v, 4294967295)), count() FROM (
                         SELECT customer, argMax(value, (minute, last_ms, value)) AS v
                         FROM usage_block_cells WHERE meter = ? AND minute < toDateTime(?)
                         GROUP BY customer HAVING v > 0)",
                )
                .bind(meter)
        };
        let (h, l, customers): (u64, u64, u64) =
            query.bind(seconds(to_ms)).fetch_one().await.map_err(ch)?;
        Ok(MeterTotal {
            usage: quantity::join(h.into(), l.into()),
            customers,
        })
    }

    async fn snapshot(&self, req: SnapshotRequest) -> Result<Snapshot> {
        // Positions first, then only rows of batches at or below them: usage and positions
        // agree even while batches keep landing.
        let offsets = self.stored_offsets().await?;
        if offsets.is_empty() {
            return Ok(Snapshot::default());
        }
        let (parts, nexts): (Vec<u32>, Vec<u64>) = offsets.iter().map(|(p, n)| (*p, *n)).unzip();
        let covered = "batch_next_offset <= transform(partition, ?, ?, toUInt64(0))";
        let mut totals = Vec::new();
        if !req.additive_meters.is_empty() {
            let special: HashSet<&str> = req
                .since_by_customer
                .iter()
                .map(|(c, _)| c.as_str())
                .collect();
            let rows: Vec<(String, String, u64, u64)> = self
                .client
                .query(&format!(
                    "SELECT customer, meter, {SPLIT_SUM} FROM usage_block_cells FINAL
                     WHERE has(?, meter) AND minute >= toDateTime(?) AND customer != '' AND {covered}
                     GROUP BY customer, meter"
                ))
                .bind(&req.additive_meters)
                .bind(seconds(req.default_since_ms))
                .bind(&parts)
                .bind(&nexts)
                .fetch_all()
                .await
                .map_err(ch)?;
            totals.extend(
                rows.into_iter()
                    .filter(|(c, _, _, _)| !special.contains(c.as_str()))
                    .map(|(c, m, h, l)| (c, m, joined((h, l)))),
            );
            for (customer, since) in &req.since_by_customer {
                let rows: Vec<(String, u64, u64)> = self
                    .client
                    .query(&format!(
                        "SELECT meter, {SPLIT_SUM} FROM usage_block_cells FINAL
                         WHERE customer = ? AND has(?, meter) AND minute >= toDateTime(?) AND {covered}
                         GROUP BY meter"
                    ))
                    .bind(customer.as_str())
                    .bind(&req.additive_meters)
                    .bind(seconds(*since))
                    .bind(&parts)
                    .bind(&nexts)
                    .fetch_all()
                    .await
                    .map_err(ch)?;
                totals.extend(
                    rows.into_iter()
                        .map(|(m, h, l)| (m, joined((h, l))))
                        .filter(|(_, v)| *v > 0)
                        .map(|(m, v)| (customer.clone(), m, v)),
                );
            }
        }
        let gauges: Vec<(String, String, i64, u64)> = self
            .client
            .query(&format!(
                "SELECT customer, meter, max(last_ms), argMax(value, (last_ms, value)) FROM usage_block_cells
                 WHERE last_ms != 0 AND customer != '' AND {covered}
                 GROUP BY customer, meter"
            ))
            .bind(&parts)
            .bind(&nexts)
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(Snapshot {
            offsets,
            totals,
            gauges,
        })
    }

    async fn customer(&self, id: &str) -> Result<Option<Customer>> {
        let rec: Option<String> = self
            .client
            .query("SELECT record FROM customers WHERE id = ? ORDER BY updated_ms DESC LIMIT 1")
            .bind(id)
            .fetch_optional()
            .await
            .map_err(ch)?;
        Ok(rec.map(|r| serde_json::from_str(&r)).transpose()?)
    }

    async fn put_customer(&self, id: &str, customer: &Customer) -> Result<()> {
        let mut insert = self
            .client
            .insert::<CustomerRow>("customers")
            .await
            .map_err(ch)?;
        insert
            .write(&CustomerRow {
                id: id.to_owned(),
                record: serde_json::to_string(customer)?,
                updated_ms: customer.updated_ms,
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }

    async fn billing_marks(&self) -> Result<Vec<(String, String, String)>> {
        self.client
            .query(
                "SELECT customer, meter, argMax(mark, version) FROM billing_marks
                 GROUP BY customer, meter",
            )
            .fetch_all()
            .await
            .map_err(ch)
    }

    async fn put_billing_mark(&self, customer: &str, meter: &str, mark: &str) -> Result<()> {
        self.put_billing_marks(&[(customer.to_owned(), meter.to_owned(), mark.to_owned())])
            .await
    }

    async fn pending_webhooks(&self) -> Result<Vec<WebhookDelivery>> {
        let rows: Vec<(String, u8)> = self
            .client
            .query(
                "SELECT argMax(delivery, version), argMax(done, version) AS d FROM webhook_outbox
                 GROUP BY id, url HAVING d = 0",
            )
            .fetch_all()
            .await
            .map_err(ch)?;
        rows.into_iter()
            .map(|(json, _)| Ok(serde_json::from_str(&json)?))
            .collect()
    }

    async fn put_webhook(&self, d: &WebhookDelivery) -> Result<()> {
        let mut insert = self
            .client
            .insert::<OutboxRow>("webhook_outbox")
            .await
            .map_err(ch)?;
        insert
            .write(&OutboxRow {
                id: d.id.clone(),
                url: d.url.clone(),
                done: u8::from(d.done),
                delivery: serde_json::to_string(d)?,
                version: version_now(),
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }

    async fn put_billing_marks(&self, marks: &[(String, String, String)]) -> Result<()> {
        let version = version_now();
        let mut insert = self
            .client
            .insert::<MarkRow>("billing_marks")
            .await
            .map_err(ch)?;
        for (customer, meter, mark) in marks {
            insert
                .write(&MarkRow {
                    customer: customer.clone(),
                    meter: meter.clone(),
                    mark: mark.clone(),
                    version,
                })
                .await
                .map_err(ch)?;
        }
        insert.end().await.map_err(ch)
    }

    async fn api_keys(&self) -> Result<Vec<(String, String)>> {
        self.client
            .query("SELECT id, argMax(record, version) FROM api_keys GROUP BY id")
            .fetch_all()
            .await
            .map_err(ch)
    }

    async fn put_api_key(&self, id: &str, record: &str, version: u64) -> Result<()> {
        let mut insert = self
            .client
            .insert::<ApiKeyRow>("api_keys")
            .await
            .map_err(ch)?;
        insert
            .write(&ApiKeyRow {
                id: id.to_owned(),
                record: record.to_owned(),
                version,
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }

    async fn customers_since(&self, updated_ms: i64) -> Result<Vec<(String, Customer)>> {
        let rows: Vec<(String, String)> = self
            .client
            .query(
                "SELECT id, argMax(record, updated_ms) FROM customers
                 WHERE updated_ms >= ? GROUP BY id",
            )
            .bind(updated_ms)
            .fetch_all()
            .await
            .map_err(ch)?;
        rows.into_iter()
            .map(|(id, rec)| Ok((id, serde_json::from_str(&rec)?)))
            .collect()
    }
}
