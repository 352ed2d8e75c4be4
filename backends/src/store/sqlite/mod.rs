//! The embedded usage store: SQLite (`usage.db`) in WAL mode with `synchronous=FULL`.
//!
//! Tables: `usage_minute` (customer, meter, dimensions, distinct value, minute) cells; `gauge_latest`, the latest value of
//! each gauge; `log_offsets`, the next log offset per partition, written in the same transaction
//! as the cells; `customers`, JSON customer records; `billing_marks`, billing-sync's state;
//! `webhook_outbox`, the enforcer's undelivered notifications; `api_keys`, API key records;
//! `meter_definitions`, the meters managed through the API (`schema.sql`).
//!
//! By role: `writer` ([`UsageWriter`]: one transaction per batch, cells and positions together),
//! `reader` ([`UsageReader`]), `records` (customers, billing marks, the outbox, API keys).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tally_schemas::{Aggregation, Customer, Window, quantity};

use tally_schemas::rollup::{Cell, Rollup};

use super::{
    ApiKeys, Applied, BillingMarks, Customers, MeterDefinitions, MeterTotal, Snapshot,
    SnapshotRequest, UsageReader, UsageWriter, WebhookDelivery, WebhookOutbox,
};
use crate::{Error, Result};

mod reader;
mod records;
mod writer;

/// The schema, applied at every open (every statement is `IF NOT EXISTS`).
const SCHEMA: &str = include_str!("schema.sql");

/// The embedded store. Writes go through one connection, reads through another, so queries
/// never wait for a flush (WAL readers see the last committed state).
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn open(path: &Path) -> Result<Connection> {
    crate::sqlite::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// Moves a store written before dimensions or distinct values (`usage_minute` keyed by
/// customer, meter and minute, or also by dimensions) to today's table, every cell kept (no
/// dimensions, no distinct value where the old table had none), in one transaction: a crash
/// leaves the old table whole, and the next open moves it again.
fn upgrade_usage_minute(c: &mut Connection) -> Result<()> {
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('usage_minute')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let has = |name: &str| columns.iter().any(|n| n == name);
    if columns.is_empty() || has("distinct_value") {
        return Ok(());
    }
    let dims = if has("dims") { "dims" } else { "''" };
    let tx = c.transaction()?;
    tx.execute_batch(
        "ALTER TABLE usage_minute RENAME TO usage_minute_before_upgrade;
         DROP INDEX IF EXISTS usage_by_minute;",
    )?;
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(&format!(
        "INSERT INTO usage_minute (customer, meter, dims, distinct_value, minute_ms, value, last_ms)
           SELECT customer, meter, {dims}, '', minute_ms, value, last_ms
           FROM usage_minute_before_upgrade;
         DROP TABLE usage_minute_before_upgrade;"
    ))?;
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    pub fn open(path: impl Into<PathBuf>) -> Result<SqliteStore> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut writer = open(&path)?;
        upgrade_usage_minute(&mut writer)?;
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
        crate::sqlite::with_connection(conn, f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::Record;
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
                readings: Vec::new(),
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
                periodic_meters: vec![("api_requests".into(), Aggregation::Count)],
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
                periodic_meters: vec![("api_requests".into(), Aggregation::Count)],
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
                periodic_meters: vec![("api_requests".into(), Aggregation::Count)],
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

    /// A store written before dimensions, or before distinct values, opens with every cell
    /// kept (no dimensions, no distinct value where it had none), and opens again unchanged.
    #[tokio::test]
    async fn a_store_from_before_dimensions_or_distinct_values_keeps_every_cell() {
        let before_dimensions = "CREATE TABLE usage_minute (
                customer TEXT NOT NULL, meter TEXT NOT NULL, minute_ms INTEGER NOT NULL,
                value INTEGER NOT NULL, last_ms INTEGER NOT NULL,
                PRIMARY KEY (customer, meter, minute_ms)) WITHOUT ROWID;
             CREATE INDEX usage_by_minute ON usage_minute (minute_ms);
             INSERT INTO usage_minute VALUES ('a', 'api_requests', 60000, 5, 0),
                 ('a', 'api_requests', 120000, 7, 0), ('b', 'wasm_modules', 60000, 3, 61000);";
        let before_distinct = "CREATE TABLE usage_minute (
                customer TEXT NOT NULL, meter TEXT NOT NULL, dims TEXT NOT NULL DEFAULT '',
                minute_ms INTEGER NOT NULL, value INTEGER NOT NULL, last_ms INTEGER NOT NULL,
                PRIMARY KEY (customer, meter, dims, minute_ms)) WITHOUT ROWID;
             CREATE INDEX usage_by_minute ON usage_minute (minute_ms);
             INSERT INTO usage_minute VALUES ('a', 'api_requests', '', 60000, 5, 0),
                 ('a', 'api_requests', '{\"region\":\"eu\"}', 120000, 7, 0),
                 ('b', 'wasm_modules', '', 60000, 3, 61000);";
        for (old, dims) in [
            (before_dimensions, vec![(String::new(), 12)]),
            (
                before_distinct,
                vec![(String::new(), 5), (r#"{"region":"eu"}"#.to_owned(), 7)],
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("usage.db");
            Connection::open(&path).unwrap().execute_batch(old).unwrap();
            for _ in 0..2 {
                let store = SqliteStore::open(&path).unwrap();
                let total = store
                    .total("a", "api_requests", Aggregation::Count, 0, i64::MAX)
                    .await
                    .unwrap();
                assert_eq!(total, 12);
                assert_eq!(
                    store
                        .dimension_totals("a", "api_requests", 0, i64::MAX)
                        .await
                        .unwrap(),
                    dims
                );
                let gauge = store
                    .total("b", "wasm_modules", Aggregation::Latest, 0, i64::MAX)
                    .await
                    .unwrap();
                assert_eq!(gauge, 3);
            }
        }
    }
}
