//! The embedded usage store: SQLite (`usage.db`) in WAL mode with `synchronous=FULL`.
//!
//! Tables: `usage_minute` (customer, meter, minute) cells; `gauge_latest`, the latest value of
//! each gauge; `log_offsets`, the next log offset per partition, written in the same transaction
//! as the cells; `customers`, JSON customer records; `billing_marks`, billing-sync's state;
//! `webhook_outbox`, the enforcer's undelivered notifications; `api_keys`, API key records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tally_schemas::{Aggregation, Customer, Window, quantity};

use super::{Applied, MeterTotal, Snapshot, SnapshotRequest, UsageStore, WebhookDelivery};
use crate::rollup::{Cell, Rollup};
use crate::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_minute (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    minute_ms INTEGER NOT NULL,
    value INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (customer, meter, minute_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage_minute (minute_ms);
CREATE TABLE IF NOT EXISTS gauge_latest (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (customer, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_offsets (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS customers_by_update ON customers (updated_ms);
CREATE TABLE IF NOT EXISTS billing_marks (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    mark TEXT NOT NULL,
    PRIMARY KEY (customer, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT NOT NULL,
    url TEXT NOT NULL,
    delivery TEXT NOT NULL,
    PRIMARY KEY (id, url)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The embedded store. Writes go through one connection, reads through another, so queries
/// never wait for a flush (WAL readers see the last committed state).
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn open(path: &Path) -> Result<Connection> {
    tally_ingest::sqlite::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

impl SqliteStore {
    pub fn open(path: impl Into<PathBuf>) -> Result<SqliteStore> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let writer = open(&path)?;
        writer.execute_batch(SCHEMA)?;
        let reader = open(&path)?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn with<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tally_ingest::sqlite::with_connection(conn, f).await
    }
}

fn read_offsets(c: &Connection) -> Result<BTreeMap<u32, u64>> {
    let mut stmt = c.prepare_cached("SELECT partition, next_offset FROM log_offsets")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn apply_rollup(c: &mut Connection, rollup: &Rollup) -> Result<Applied> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if super::check_positions(rollup, &read_offsets(&tx)?)? == Applied::Replay {
        return Ok(Applied::Replay);
    }
    {
        let mut add = tx.prepare_cached(
            "INSERT INTO usage_minute (customer, meter, minute_ms, value, last_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (customer, meter, minute_ms)
             DO UPDATE SET value = CASE WHEN value > 9223372036854775807 - excluded.value
                                        THEN 9223372036854775807
                                        ELSE value + excluded.value END",
        )?;
        let mut latest = tx.prepare_cached(
            "INSERT INTO usage_minute (customer, meter, minute_ms, value, last_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (customer, meter, minute_ms) DO UPDATE SET
               value = CASE WHEN (excluded.last_ms, excluded.value) > (last_ms, value)
                            THEN excluded.value ELSE value END,
               last_ms = max(last_ms, excluded.last_ms)",
        )?;
        let mut gauge = tx.prepare_cached(
            "INSERT INTO gauge_latest (customer, meter, time_ms, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (customer, meter) DO UPDATE SET
               value = CASE WHEN (excluded.time_ms, excluded.value) > (time_ms, value)
                            THEN excluded.value ELSE value END,
               time_ms = max(time_ms, excluded.time_ms)",
        )?;
        for (k, cell) in &rollup.cells {
            match *cell {
                Cell::Add(v) => {
                    add.execute(params![k.customer, k.meter, k.minute_ms, v as i64, 0])?;
                }
                Cell::Latest { time_ms, value } => {
                    latest.execute(params![
                        k.customer,
                        k.meter,
                        k.minute_ms,
                        value as i64,
                        time_ms
                    ])?;
                    gauge.execute(params![k.customer, k.meter, time_ms, value as i64])?;
                }
            }
        }
        let mut pos = tx.prepare_cached(
            "INSERT INTO log_offsets (partition, next_offset) VALUES (?1, ?2)
             ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
        )?;
        for (&partition, &(_, next)) in &rollup.ranges {
            pos.execute(params![partition, next as i64])?;
        }
    }
    tx.commit()?;
    Ok(Applied::Written)
}

fn total(
    c: &Connection,
    customer: &str,
    meter: &str,
    aggregation: Aggregation,
    from_ms: i64,
    to_ms: i64,
) -> Result<u64> {
    if aggregation.is_additive() {
        let (high, low): (Option<i64>, Option<i64>) = c
            .prepare_cached(
                "SELECT SUM(value >> 32), SUM(value & 4294967295) FROM usage_minute
                 WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4",
            )?
            .query_row(params![customer, meter, from_ms, to_ms], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        return Ok(joined(high, low));
    }
    let v: Option<i64> = {
        c.prepare_cached(
            "SELECT value FROM usage_minute
             WHERE customer = ?1 AND meter = ?2 AND minute_ms < ?3
             ORDER BY minute_ms DESC LIMIT 1",
        )?
        .query_row(params![customer, meter, to_ms], |r| r.get(0))
        .optional()?
    };
    Ok(v.unwrap_or(0).max(0) as u64)
}

/// A customer's total from the sums of the high and low parts of its cells (see
/// [`tally_schemas::quantity`]): exact, held at the cap.
fn joined(high: Option<i64>, low: Option<i64>) -> u64 {
    quantity::join_capped(high.unwrap_or(0).into(), low.unwrap_or(0).into())
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn apply(&self, rollup: &Rollup) -> Result<Applied> {
        let rollup = rollup.clone();
        Self::with(&self.writer, move |c| apply_rollup(c, &rollup)).await
    }

    async fn offsets(&self) -> Result<BTreeMap<u32, u64>> {
        Self::with(&self.reader, |c| read_offsets(c)).await
    }

    async fn total(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            total(c, &customer, &meter, aggregation, from_ms, to_ms)
        })
        .await
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
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT minute_ms, value, last_ms FROM usage_minute
                 WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
                 ORDER BY minute_ms",
            )?;
            let rows = stmt.query_map(params![customer, meter, from_ms, to_ms], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?;
            // Rows come in time order: the last one in a bucket is the latest.
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(super::bucket(rows, window, aggregation))
        })
        .await
    }

    async fn top_customers(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        let meter = meter.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Self::with(&self.reader, move |c| {
            let mut stmt = c.prepare_cached(if aggregation.is_additive() {
                // The sums normalised to (high, low < 2^32) order exactly, without overflow.
                "SELECT customer, h + (l >> 32) AS hi, l & 4294967295 AS lo FROM (
                     SELECT customer, SUM(value >> 32) AS h, SUM(value & 4294967295) AS l
                     FROM usage_minute WHERE meter = ?1 AND minute_ms >= ?2 AND minute_ms < ?3
                     GROUP BY customer)
                 WHERE h > 0 OR l > 0 ORDER BY hi DESC, lo DESC, customer LIMIT ?4"
            } else {
                "SELECT customer, value >> 32, value & 4294967295 AS v FROM (
                     SELECT customer, value, ROW_NUMBER() OVER
                         (PARTITION BY customer ORDER BY minute_ms DESC) AS n
                     FROM usage_minute WHERE meter = ?1 AND minute_ms < ?3)
                 WHERE n = 1 AND value > 0 ORDER BY value DESC, customer LIMIT ?4"
            })?;
            let rows = stmt.query_map(params![meter, from_ms, to_ms, limit], |r| {
                Ok((r.get::<_, String>(0)?, joined(r.get(1)?, r.get(2)?)))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn meter_total(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<MeterTotal> {
        let meter = meter.to_owned();
        Self::with(&self.reader, move |c| {
            let (high, low, customers): (Option<i64>, Option<i64>, i64) = c
                .prepare_cached(if aggregation.is_additive() {
                    "SELECT SUM(h), SUM(l), COUNT(*) FROM (
                         SELECT customer, SUM(value >> 32) AS h, SUM(value & 4294967295) AS l
                         FROM usage_minute WHERE meter = ?1 AND minute_ms >= ?2 AND minute_ms < ?3
                         GROUP BY customer HAVING h > 0 OR l > 0)"
                } else {
                    "SELECT SUM(value >> 32), SUM(value & 4294967295), COUNT(*) FROM (
                         SELECT customer, value, ROW_NUMBER() OVER
                             (PARTITION BY customer ORDER BY minute_ms DESC) AS n
                         FROM usage_minute WHERE meter = ?1 AND minute_ms < ?3)
                     WHERE n = 1 AND value > 0"
                })?
                .query_row(params![meter, from_ms, to_ms], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            Ok(MeterTotal {
                // Several customers: exact up to u64::MAX, not held at one customer's cap.
                usage: quantity::join(high.unwrap_or(0).into(), low.unwrap_or(0).into()),
                customers: customers.max(0) as u64,
            })
        })
        .await
    }

    async fn snapshot(&self, req: SnapshotRequest) -> Result<Snapshot> {
        Self::with(&self.reader, move |c| {
            let tx = c.transaction()?; // one read snapshot for offsets and usage
            let offsets = read_offsets(&tx)?;
            let mut totals = Vec::new();
            let special: std::collections::HashMap<&str, i64> = req
                .since_by_customer
                .iter()
                .map(|(c, s)| (c.as_str(), *s))
                .collect();
            {
                let mut stmt = tx.prepare(
                    "SELECT customer, SUM(value >> 32), SUM(value & 4294967295) FROM usage_minute
                     WHERE meter = ?1 AND minute_ms >= ?2 GROUP BY customer",
                )?;
                for meter in &req.additive_meters {
                    let rows = stmt.query_map(params![meter, req.default_since_ms], |r| {
                        Ok((r.get::<_, String>(0)?, joined(r.get(1)?, r.get(2)?)))
                    })?;
                    for row in rows {
                        let (customer, sum) = row?;
                        if !special.contains_key(customer.as_str()) {
                            totals.push((customer, meter.clone(), sum));
                        }
                    }
                }
                for (customer, since) in &req.since_by_customer {
                    for meter in &req.additive_meters {
                        let v = total(&tx, customer, meter, Aggregation::Sum, *since, i64::MAX)?;
                        if v > 0 {
                            totals.push((customer.clone(), meter.clone(), v));
                        }
                    }
                }
            }
            let mut gauges = Vec::new();
            {
                let mut stmt =
                    tx.prepare("SELECT customer, meter, time_ms, value FROM gauge_latest")?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, i64>(3)?.max(0) as u64,
                    ))
                })?;
                for row in rows {
                    gauges.push(row?);
                }
            }
            tx.finish()?;
            Ok(Snapshot {
                offsets,
                totals,
                gauges,
            })
        })
        .await
    }

    async fn customer(&self, id: &str) -> Result<Option<Customer>> {
        let id = id.to_owned();
        Self::with(&self.reader, move |c| {
            let rec: Option<String> = c
                .prepare_cached("SELECT record FROM customers WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            Ok(rec.map(|r| serde_json::from_str(&r)).transpose()?)
        })
        .await
    }

    async fn put_customer(&self, id: &str, customer: &Customer) -> Result<()> {
        let (id, json, updated) = (
            id.to_owned(),
            serde_json::to_string(customer)?,
            customer.updated_ms,
        );
        Self::with(&self.writer, move |c| {
            c.prepare_cached(
                "INSERT INTO customers (id, record, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record,
                                                updated_ms = excluded.updated_ms",
            )?
            .execute(params![id, json, updated])?;
            Ok(())
        })
        .await
    }

    async fn api_keys(&self) -> Result<Vec<(String, String)>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT id, record FROM api_keys")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn put_api_key(&self, id: &str, record: &str, version: u64) -> Result<()> {
        let (id, record) = (id.to_owned(), record.to_owned());
        Self::with(&self.writer, move |c| {
            c.prepare_cached(
                "INSERT INTO api_keys (id, record, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record, version = excluded.version
                 WHERE excluded.version >= api_keys.version",
            )?
            .execute(params![id, record, version as i64])?;
            Ok(())
        })
        .await
    }

    async fn billing_marks(&self) -> Result<Vec<(String, String, String)>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT customer, meter, mark FROM billing_marks")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn put_billing_mark(&self, customer: &str, meter: &str, mark: &str) -> Result<()> {
        self.put_billing_marks(&[(customer.to_owned(), meter.to_owned(), mark.to_owned())])
            .await
    }

    async fn put_billing_marks(&self, marks: &[(String, String, String)]) -> Result<()> {
        let marks = marks.to_vec();
        Self::with(&self.writer, move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO billing_marks (customer, meter, mark) VALUES (?1, ?2, ?3)
                     ON CONFLICT (customer, meter) DO UPDATE SET mark = excluded.mark",
                )?;
                for (customer, meter, mark) in &marks {
                    stmt.execute(params![customer, meter, mark])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn pending_webhooks(&self) -> Result<Vec<WebhookDelivery>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT delivery FROM webhook_outbox")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_webhook(&self, delivery: &WebhookDelivery) -> Result<()> {
        let d = delivery.clone();
        let json = serde_json::to_string(&d)?;
        Self::with(&self.writer, move |c| {
            if d.done {
                c.prepare_cached("DELETE FROM webhook_outbox WHERE id = ?1 AND url = ?2")?
                    .execute(params![d.id, d.url])?;
            } else {
                c.prepare_cached(
                    "INSERT INTO webhook_outbox (id, url, delivery) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id, url) DO UPDATE SET delivery = excluded.delivery",
                )?
                .execute(params![d.id, d.url, json])?;
            }
            Ok(())
        })
        .await
    }

    async fn customers_since(&self, updated_ms: i64) -> Result<Vec<(String, Customer)>> {
        Self::with(&self.reader, move |c| {
            let mut stmt =
                c.prepare_cached("SELECT id, record FROM customers WHERE updated_ms >= ?1")?;
            let rows = stmt.query_map([updated_ms], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, rec) = row?;
                out.push((id, serde_json::from_str(&rec)?));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_ingest::log::Record;
    use tally_schemas::{Catalog, UsageEvent};

    fn rec(offset: u64, customer: &str, meter: &str, value: u64, time_ms: i64) -> Record {
        Record {
            partition: 0,
            offset,
            event: UsageEvent {
                id: offset.to_string(),
                source: "s".into(),
                customer: customer.into(),
                meter: meter.into(),
                value,
                time_ms,
                received_ms: time_ms,
            },
        }
    }

    #[tokio::test]
    async fn applies_once_and_skips_replays() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let cat = Catalog::builtin();
        let b1 = Rollup::from_records(
            &[
                rec(1, "a", "api_requests", 2, 60_000),
                rec(2, "a", "api_requests", 3, 61_000),
            ],
            &cat,
        );
        assert_eq!(store.apply(&b1).await.unwrap(), Applied::Written);
        assert_eq!(store.apply(&b1).await.unwrap(), Applied::Replay);
        let b2 = Rollup::from_records(&[rec(3, "a", "api_requests", 10, 3_600_000)], &cat);
        assert_eq!(store.apply(&b2).await.unwrap(), Applied::Written);
        assert_eq!(store.offsets().await.unwrap()[&0], 4);
        let t = store
            .total("a", "api_requests", Aggregation::Count, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(t, 15);
        let s = store
            .series(
                "a",
                "api_requests",
                Aggregation::Count,
                0,
                7_200_000,
                Window::Hour,
            )
            .await
            .unwrap();
        assert_eq!(s, vec![(0, 5), (3_600_000, 10)]);
        // A batch overlapping the stored position in part means another writer: refused.
        let overlap = Rollup::from_records(
            &[
                rec(3, "a", "api_requests", 1, 0),
                rec(4, "a", "api_requests", 1, 0),
            ],
            &cat,
        );
        assert!(matches!(
            store.apply(&overlap).await,
            Err(Error::Fenced { .. })
        ));
    }

    #[tokio::test]
    async fn overflow_sums_are_exact_and_held_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let cat = Catalog::builtin();
        let max = quantity::MAX;
        // "a": the cap twice in one cell (two batches), then in two more minutes.
        let batches = [
            vec![rec(1, "a", "api_requests", max, 60_000)],
            vec![
                rec(2, "a", "api_requests", max, 61_000),
                rec(3, "b", "api_requests", max - 10, 61_000),
            ],
            vec![
                rec(4, "a", "api_requests", max, 120_000),
                rec(5, "a", "api_requests", 1, 180_000),
                rec(6, "c", "api_requests", 5, 180_000),
            ],
        ];
        for b in &batches {
            let r = Rollup::from_records(b, &cat);
            assert_eq!(store.apply(&r).await.unwrap(), Applied::Written);
        }
        let total = |c: &'static str| {
            let store = &store;
            async move {
                store
                    .total(c, "api_requests", Aggregation::Count, 0, i64::MAX)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(total("a").await, max, "held at the cap, not an error");
        assert_eq!(total("b").await, max - 10);
        let series = store
            .series(
                "a",
                "api_requests",
                Aggregation::Count,
                0,
                240_000,
                Window::Minute,
            )
            .await
            .unwrap();
        assert_eq!(series, vec![(60_000, max), (120_000, max), (180_000, 1)]);
        let top = store
            .top_customers("api_requests", Aggregation::Count, 0, i64::MAX, 10)
            .await
            .unwrap();
        let want: Vec<(String, u64)> =
            vec![("a".into(), max), ("b".into(), max - 10), ("c".into(), 5)];
        assert_eq!(top, want);
        // Across customers: exact beyond 2^63 (a's three cells are summed as stored).
        let m = store
            .meter_total("api_requests", Aggregation::Count, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(m.customers, 3);
        assert_eq!(
            m.usage,
            u64::MAX,
            "3 * max + ... is past u64: held at u64::MAX"
        );
        let m = store
            .meter_total("api_requests", Aggregation::Count, 100_000, i64::MAX)
            .await
            .unwrap();
        assert_eq!(m.usage, max + 1 + 5);
        let snap = store
            .snapshot(SnapshotRequest {
                additive_meters: vec!["api_requests".into()],
                default_since_ms: 0,
                since_by_customer: vec![("b".into(), 0)],
            })
            .await
            .unwrap();
        let mut totals = snap.totals.clone();
        totals.sort();
        assert_eq!(
            totals,
            vec![
                ("a".into(), "api_requests".into(), max),
                ("b".into(), "api_requests".into(), max - 10),
                ("c".into(), "api_requests".into(), 5),
            ]
        );
    }

    #[tokio::test]
    async fn gauges_keep_the_latest_value_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let cat = Catalog::builtin();
        let late = Rollup::from_records(&[rec(1, "a", "wasm_modules", 5, 200_000)], &cat);
        let early = Rollup::from_records(&[rec(2, "a", "wasm_modules", 9, 100_000)], &cat);
        store.apply(&late).await.unwrap();
        store.apply(&early).await.unwrap();
        let g = Aggregation::Latest;
        assert_eq!(
            store
                .total("a", "wasm_modules", g, 0, i64::MAX)
                .await
                .unwrap(),
            5
        );
        assert_eq!(
            store
                .total("a", "wasm_modules", g, 0, 150_000)
                .await
                .unwrap(),
            9
        );
        let snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: 0,
                since_by_customer: vec![],
                additive_meters: vec!["api_requests".into()],
            })
            .await
            .unwrap();
        assert_eq!(
            snap.gauges,
            vec![("a".into(), "wasm_modules".into(), 200_000, 5)]
        );
        assert_eq!(snap.offsets[&0], 3);
    }

    #[tokio::test]
    async fn snapshot_uses_each_customers_period_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let cat = Catalog::builtin();
        let b = Rollup::from_records(
            &[
                rec(1, "month", "api_requests", 1, 0),
                rec(2, "month", "api_requests", 2, 600_000),
                rec(3, "anchored", "api_requests", 4, 0),
                rec(4, "anchored", "api_requests", 8, 600_000),
            ],
            &cat,
        );
        store.apply(&b).await.unwrap();
        let mut snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: 60_000,
                since_by_customer: vec![("anchored".into(), 0)],
                additive_meters: vec!["api_requests".into()],
            })
            .await
            .unwrap();
        snap.totals.sort();
        assert_eq!(
            snap.totals,
            vec![
                ("anchored".into(), "api_requests".into(), 12),
                ("month".into(), "api_requests".into(), 2)
            ]
        );
    }

    #[tokio::test]
    async fn customers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("u.db")).unwrap();
        let mut c = Customer::new_default(&Catalog::builtin());
        c.plan = "starter".into();
        c.updated_ms = 50;
        store.put_customer("cust_1", &c).await.unwrap();
        assert_eq!(store.customer("cust_1").await.unwrap(), Some(c.clone()));
        assert_eq!(store.customer("nobody").await.unwrap(), None);
        assert_eq!(store.customers_since(50).await.unwrap().len(), 1);
        assert!(store.customers_since(51).await.unwrap().is_empty());
    }
}
