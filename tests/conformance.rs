//! The backends' conformance suite: the same scenarios, run against every store backend
//! (SQLite, ClickHouse) and every log backend (embedded, Kafka). A new backend is added by
//! giving it a subject below; every scenario then runs against it.
//!
//! Each scenario states one part of a backend's contract (`tally_backends::store`,
//! `tally_backends::log`) with exact expected figures. SQLite and the embedded log run
//! everywhere; ClickHouse and Kafka run against the suite's servers and are skipped (saying so)
//! on a machine without them, unless `TALLY_TEST_REQUIRE_SERVERS` is set (tests/run.sh).

mod common;
mod servers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use servers::{ClickHouse, Kafka, unique_name};
use tally_backends::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use tally_backends::log::kafka::{KafkaLog, KafkaLogConfig};
use tally_backends::log::{EventLog, LogReader};
use tally_backends::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use tally_backends::store::sqlite::SqliteStore;
use tally_backends::store::{Applied, SnapshotRequest, Store, WebhookDelivery};
use tally_schemas::rollup::Rollup;
use tally_schemas::{
    Aggregation, Catalog, Customer, Notification, Record, SystemClock, UsageEvent, Window,
};

/// One store under test, with whatever keeps its server or files alive.
struct StoreSubject {
    store: Arc<dyn Store>,
    /// The store drops repeats of a (source, id) itself (a store fed by a log that does not).
    dedups: bool,
    _dir: Option<tempfile::TempDir>,
    _server: Option<ClickHouse>,
}

fn sqlite_store() -> Option<StoreSubject> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("usage.db")).unwrap();
    Some(StoreSubject {
        store: Arc::new(store),
        dedups: false,
        _dir: Some(dir),
        _server: None,
    })
}

fn clickhouse_store(rt: &tokio::runtime::Runtime) -> Option<StoreSubject> {
    if servers::skip_without_servers(false) {
        return None;
    }
    let ch = ClickHouse::shared();
    let config = ClickHouseConfig::new(ch.http.clone(), unique_name("conformance"));
    rt.block_on(ClickHouseStore::migrate(&config)).unwrap();
    Some(StoreSubject {
        store: Arc::new(ClickHouseStore::new(&config)),
        dedups: true,
        _dir: None,
        _server: Some(ch),
    })
}

/// One log under test.
struct LogSubject {
    log: Arc<dyn EventLog>,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Kafka>,
}

fn embedded_log() -> Option<LogSubject> {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedLogConfig::new(dir.path().join("log.db"));
    let log = EmbeddedLog::open(config, Arc::new(SystemClock)).unwrap();
    Some(LogSubject {
        log: Arc::new(log),
        _dir: Some(dir),
        _server: None,
    })
}

fn kafka_log(rt: &tokio::runtime::Runtime) -> Option<LogSubject> {
    if servers::skip_without_servers(false) {
        return None;
    }
    let kafka = Kafka::shared();
    let mut config = KafkaLogConfig::new(kafka.brokers.clone(), unique_name("conformance"));
    config.partitions = 4;
    config.delivery_timeout = Duration::from_secs(10);
    rt.block_on(KafkaLog::create_topics(&config)).unwrap();
    // The log starts its own tasks on the runtime.
    let _in_runtime = rt.enter();
    let log = KafkaLog::connect(config).unwrap();
    Some(LogSubject {
        log: Arc::new(log),
        _dir: None,
        _server: Some(kafka),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs each scenario of `$suite` against the subject `$subject` gives (none: skipped), one
/// test per scenario in module `$backend`.
macro_rules! conformance {
    ($backend:ident, $subject:expr, $suite:ident: $($scenario:ident),* $(,)?) => {
        mod $backend {
            $(#[test]
            fn $scenario() {
                let rt = super::runtime();
                #[allow(clippy::redundant_closure_call)]
                if let Some(s) = ($subject)(&rt) {
                    rt.block_on(super::$suite::$scenario(&s));
                }
            })*
        }
    };
}

/// Every store scenario against every store backend.
macro_rules! store_conformance {
    ($($scenario:ident),* $(,)?) => {
        conformance!(sqlite_store, |_| super::sqlite_store(), store: $($scenario),*);
        conformance!(clickhouse_store, super::clickhouse_store, store: $($scenario),*);
    };
}

/// Every log scenario against every log backend.
macro_rules! log_conformance {
    ($($scenario:ident),* $(,)?) => {
        conformance!(embedded_log, |_| super::embedded_log(), log: $($scenario),*);
        conformance!(kafka_log, super::kafka_log, log: $($scenario),*);
    };
}

store_conformance!(
    a_batch_is_written_once_and_its_replay_skipped,
    a_batch_overlapping_the_stored_position_is_fenced,
    the_analytics_queries_give_exact_answers,
    sums_past_the_cap_are_held_and_cross_customer_totals_exact,
    the_snapshot_covers_each_customers_period,
    usage_with_other_dimensions_is_kept_apart,
    the_largest_and_smallest_values_of_a_period_are_kept,
    each_distinct_value_counts_once_per_period,
    duplicates_are_told_from_replays_where_the_store_drops_them,
    customer_records_round_trip_and_the_latest_write_wins,
    billing_marks_keep_the_latest_per_customer_and_meter,
    the_webhook_outbox_keeps_the_latest_state_until_done,
    api_keys_keep_the_latest_version,
    meter_definitions_keep_the_latest_version,
);

log_conformance!(
    appends_are_durable_once_and_read_back_in_offset_order,
    a_reader_sought_to_the_end_reads_only_what_comes_after,
    a_cancelled_poll_loses_nothing,
    each_notification_is_claimed_once,
);

const NOV: &str = "2026-11-01T00:00:00Z";
const NOW: &str = "2026-11-21T10:00:00Z";

fn at(t: &str) -> i64 {
    common::ms(t)
}

fn event(id: &str, customer: &str, meter: &str, value: u64, t: &str) -> UsageEvent {
    UsageEvent {
        id: id.into(),
        source: "edge-1".into(),
        customer: customer.into(),
        meter: meter.into(),
        value,
        time_ms: at(t),
        received_ms: at(NOW),
        readings: Vec::new(),
    }
}

fn record(offset: u64, customer: &str, meter: &str, value: u64, t: &str) -> Record {
    Record {
        partition: 0,
        offset,
        event: event(&format!("e{offset}"), customer, meter, value, t),
    }
}

mod store {
    use super::*;

    fn roll(records: &[Record]) -> Rollup {
        Rollup::from_records(records, &Catalog::builtin())
    }

    /// Positions: a written batch moves the stored position to the offset after it (offsets
    /// and resume agree), and the same batch again (a crash after the write, before the log's
    /// offsets were committed) is a replay that changes nothing.
    pub async fn a_batch_is_written_once_and_its_replay_skipped(s: &StoreSubject) {
        let store = &s.store;
        assert!(
            store.offsets().await.unwrap().is_empty(),
            "a new store is at 0"
        );
        let first: Vec<Record> = (0..4)
            .map(|o| record(o, "a", "api_requests", 10, "2026-11-02T00:00:00Z"))
            .collect();
        let mut on_1 = record(0, "b", "api_requests", 5, "2026-11-02T00:00:00Z");
        on_1.partition = 1;
        let mut batch = first.clone();
        batch.push(on_1);
        assert_eq!(store.apply(&roll(&batch)).await.unwrap(), Applied::Written);
        assert_eq!(
            store.offsets().await.unwrap(),
            BTreeMap::from([(0, 4), (1, 1)])
        );
        let resume = store.resume().await.unwrap();
        assert_eq!(
            resume.iter().map(|(p, r)| (*p, r.next)).collect::<Vec<_>>(),
            [(0, 4), (1, 1)]
        );
        assert!(resume.values().all(|r| r.start <= r.next));
        assert_eq!(store.apply(&roll(&batch)).await.unwrap(), Applied::Replay);
        assert_eq!(
            store.apply(&roll(&first)).await.unwrap(),
            Applied::Replay,
            "a part of a written batch is a replay too"
        );
        let next = [record(4, "a", "api_requests", 1, "2026-11-02T00:01:00Z")];
        assert_eq!(store.apply(&roll(&next)).await.unwrap(), Applied::Written);
        let (nov, now) = (at(NOV), at(NOW));
        let total = |c: &'static str| async move {
            store
                .total(c, "api_requests", Aggregation::Count, nov, now)
                .await
                .unwrap()
        };
        assert_eq!((total("a").await, total("b").await), (41, 5));
        assert_eq!(store.offsets().await.unwrap()[&0], 5);
    }

    /// A batch whose new records start below the stored position, but which is not entirely
    /// below it, was cut by another writer: it is refused and nothing of it is counted.
    pub async fn a_batch_overlapping_the_stored_position_is_fenced(s: &StoreSubject) {
        let store = &s.store;
        let first: Vec<Record> = (0..4)
            .map(|o| record(o, "a", "api_requests", 10, "2026-11-02T00:00:00Z"))
            .collect();
        store.apply(&roll(&first)).await.unwrap();
        let overlapping: Vec<Record> = (2..6)
            .map(|o| record(o, "a", "api_requests", 100, "2026-11-02T00:00:00Z"))
            .collect();
        let err = store.apply(&roll(&overlapping)).await.unwrap_err();
        assert!(
            matches!(
                err,
                tally_backends::Error::Fenced {
                    partition: 0,
                    first: 2,
                    stored: 4
                }
            ),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert_eq!(store.offsets().await.unwrap()[&0], 4);
        let total = store
            .total("a", "api_requests", Aggregation::Count, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(total, 40, "nothing of the fenced batch counted");
    }

    /// Totals, a current-period summary, top customers, totals across customers and series,
    /// for additive meters and gauges, with a batch written twice.
    pub async fn the_analytics_queries_give_exact_answers(s: &StoreSubject) {
        let store = &s.store;
        let first = [
            record(0, "a", "api_requests", 300, "2026-11-02T00:00:00Z"),
            record(1, "b", "api_requests", 100, "2026-11-03T00:00:00Z"),
            record(2, "c", "api_requests", 150, "2026-11-04T00:00:00Z"),
            record(3, "a", "wasm_modules", 5, "2026-11-02T00:00:00Z"),
        ];
        let second = [
            record(4, "c", "api_requests", 50, "2026-11-21T09:00:00Z"),
            record(5, "d", "api_requests", 50, "2026-10-25T00:00:00Z"),
            record(6, "a", "wasm_modules", 1, "2026-11-05T00:00:00Z"),
            record(7, "b", "wasm_modules", 3, "2026-11-05T00:00:00Z"),
            record(8, "a", "api_requests", 7, "2026-11-02T00:00:30Z"),
        ];
        let one = roll(&first);
        assert_eq!(store.apply(&one).await.unwrap(), Applied::Written);
        store.apply(&roll(&second)).await.unwrap();
        assert_eq!(store.apply(&one).await.unwrap(), Applied::Replay);
        let (nov, now) = (at(NOV), at(NOW));
        let meters = [
            ("api_requests".to_owned(), Aggregation::Count),
            ("wasm_modules".to_owned(), Aggregation::Latest),
            ("build_minutes".to_owned(), Aggregation::Sum),
        ];
        assert_eq!(
            store.totals("a", &meters, nov, now).await.unwrap(),
            [307, 1, 0]
        );
        let top = store
            .top_customers("api_requests", Aggregation::Count, nov, now, 2)
            .await
            .unwrap();
        assert_eq!(top, [("a".to_owned(), 307), ("c".to_owned(), 200)]);
        let top_gauge = store
            .top_customers("wasm_modules", Aggregation::Latest, nov, now, 10)
            .await
            .unwrap();
        assert_eq!(top_gauge, [("b".to_owned(), 3), ("a".to_owned(), 1)]);
        let all = store
            .meter_total("api_requests", Aggregation::Count, 0, now)
            .await
            .unwrap();
        assert_eq!((all.usage, all.customers), (657, 4));
        let gauge = store
            .meter_total("wasm_modules", Aggregation::Latest, nov, now)
            .await
            .unwrap();
        assert_eq!((gauge.usage, gauge.customers), (4, 2));
        let both = store.meter_totals(&meters, nov, now).await.unwrap();
        let november = store
            .meter_total("api_requests", Aggregation::Count, nov, now)
            .await
            .unwrap();
        assert_eq!(both, [november, gauge, Default::default()]);
        assert_eq!((november.usage, november.customers), (607, 3));
        let minutes = store
            .series(
                "a",
                "api_requests",
                Aggregation::Count,
                nov,
                now,
                Window::Minute,
            )
            .await
            .unwrap();
        assert_eq!(minutes, [(at("2026-11-02T00:00:00Z"), 307)]);
        let days = store
            .series("c", "api_requests", Aggregation::Count, 0, now, Window::Day)
            .await
            .unwrap();
        assert_eq!(
            days,
            [
                (at("2026-11-04T00:00:00Z"), 150),
                (at("2026-11-21T00:00:00Z"), 50)
            ]
        );
        let gauge_days = store
            .series(
                "a",
                "wasm_modules",
                Aggregation::Latest,
                nov,
                now,
                Window::Day,
            )
            .await
            .unwrap();
        assert_eq!(
            gauge_days,
            [
                (at("2026-11-02T00:00:00Z"), 5),
                (at("2026-11-05T00:00:00Z"), 1)
            ]
        );
        let before_the_5th = store
            .total(
                "a",
                "wasm_modules",
                Aggregation::Latest,
                nov,
                at("2026-11-05T00:00:00Z"),
            )
            .await
            .unwrap();
        assert_eq!(before_the_5th, 5, "a gauge's latest value before the end");
    }

    /// Quantities at the usage cap: no store wraps, fails or turns a sum negative. A
    /// customer's totals are held at the cap; a meter's total over customers is exact past
    /// 2^63 and held at `u64::MAX` past that.
    pub async fn sums_past_the_cap_are_held_and_cross_customer_totals_exact(s: &StoreSubject) {
        let store = &s.store;
        let max = tally_schemas::quantity::MAX;
        let rec = |o, c, v, t| record(o, c, "api_requests", v, t);
        let batches = [
            vec![rec(0, "a", max, "2026-11-02T00:00:00Z")],
            vec![
                rec(1, "a", max, "2026-11-02T00:00:10Z"),
                rec(2, "b", max - 10, "2026-11-02T00:00:10Z"),
            ],
            vec![
                rec(3, "a", max, "2026-11-03T00:00:00Z"),
                rec(4, "c", 5, "2026-11-03T00:00:00Z"),
            ],
        ];
        for b in &batches {
            assert_eq!(store.apply(&roll(b)).await.unwrap(), Applied::Written);
        }
        let (nov, now) = (at(NOV), at(NOW));
        let meters = [("api_requests".to_owned(), Aggregation::Count)];
        let total = store
            .total("a", "api_requests", Aggregation::Count, nov, now)
            .await
            .unwrap();
        assert_eq!(total, max, "a customer's total is held at the cap");
        assert_eq!(
            store.totals("b", &meters, nov, now).await.unwrap(),
            [max - 10]
        );
        let top = store
            .top_customers("api_requests", Aggregation::Count, nov, now, 10)
            .await
            .unwrap();
        assert_eq!(
            top,
            [
                ("a".to_owned(), max),
                ("b".to_owned(), max - 10),
                ("c".to_owned(), 5)
            ]
        );
        let day = store
            .series(
                "a",
                "api_requests",
                Aggregation::Count,
                nov,
                now,
                Window::Day,
            )
            .await
            .unwrap();
        assert_eq!(
            day,
            [
                (at("2026-11-02T00:00:00Z"), max),
                (at("2026-11-03T00:00:00Z"), max)
            ]
        );
        let all = store
            .meter_total("api_requests", Aggregation::Count, nov, now)
            .await
            .unwrap();
        assert_eq!(all.customers, 3);
        assert_eq!(all.usage, u64::MAX, "past u64: held at u64::MAX");
        let from_3rd = store
            .meter_total(
                "api_requests",
                Aggregation::Count,
                at("2026-11-03T00:00:00Z"),
                now,
            )
            .await
            .unwrap();
        assert_eq!((from_3rd.usage, from_3rd.customers), (max + 5, 2));
    }

    /// Readings with other dimensions go to other cells: the meter's totals and series add
    /// them all up, and `dimension_totals` tells them apart, in key order.
    pub async fn usage_with_other_dimensions_is_kept_apart(s: &StoreSubject) {
        let store = &s.store;
        let with = |offset: u64, value: u64, dims: &[(&str, &str)]| {
            let mut r = record(offset, "a", "request_bytes", value, "2026-11-02T00:00:10Z");
            r.event.readings = vec![tally_schemas::meter::Reading {
                meter: "request_bytes".into(),
                value,
                dimensions: dims
                    .iter()
                    .map(|(n, v)| tally_schemas::meter::Dimension {
                        name: (*n).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                distinct: None,
            }];
            r.event.meter = "request".into();
            r.event.value = 0;
            r
        };
        let batch = [
            with(0, 1200, &[("model", "m1"), ("region", "eu")]),
            with(1, 300, &[("model", "m2"), ("region", "eu")]),
            with(2, 800, &[("region", "us")]),
            with(3, 5, &[("model", "m1"), ("region", "eu")]),
            with(4, 7, &[]),
        ];
        assert_eq!(store.apply(&roll(&batch)).await.unwrap(), Applied::Written);
        assert_eq!(store.apply(&roll(&batch)).await.unwrap(), Applied::Replay);
        let (nov, now) = (at(NOV), at(NOW));
        let total = store
            .total("a", "request_bytes", Aggregation::Sum, nov, now)
            .await
            .unwrap();
        assert_eq!(total, 2312);
        let minutes = store
            .series(
                "a",
                "request_bytes",
                Aggregation::Sum,
                nov,
                now,
                Window::Minute,
            )
            .await
            .unwrap();
        assert_eq!(minutes, [(at("2026-11-02T00:00:00Z"), 2312)]);
        let by_key = store
            .dimension_totals("a", "request_bytes", nov, now)
            .await
            .unwrap();
        assert_eq!(
            by_key,
            [
                (String::new(), 7),
                (r#"{"model":"m1","region":"eu"}"#.to_owned(), 1205),
                (r#"{"model":"m2","region":"eu"}"#.to_owned(), 300),
                (r#"{"region":"us"}"#.to_owned(), 800),
            ]
        );
        let days = store
            .dimension_series("a", "request_bytes", nov, now, Window::Day)
            .await
            .unwrap();
        let day = at("2026-11-02T00:00:00Z");
        assert_eq!(
            days,
            [
                (String::new(), vec![(day, 7)]),
                (
                    r#"{"model":"m1","region":"eu"}"#.to_owned(),
                    vec![(day, 1205)]
                ),
                (
                    r#"{"model":"m2","region":"eu"}"#.to_owned(),
                    vec![(day, 300)]
                ),
                (r#"{"region":"us"}"#.to_owned(), vec![(day, 800)]),
            ]
        );
        let before = store
            .dimension_totals("a", "request_bytes", nov, at("2026-11-02T00:00:00Z"))
            .await
            .unwrap();
        assert!(before.is_empty(), "{before:?}");
    }

    /// `max` and `min` meters: every read (totals, series, top customers, totals across
    /// customers, the snapshot) gives the period's largest or smallest value, whatever the
    /// batches, minutes and blocks the values came in; 0 is a smallest value like any other,
    /// and values at the usage cap are kept exactly.
    pub async fn the_largest_and_smallest_values_of_a_period_are_kept(s: &StoreSubject) {
        let store = &s.store;
        let toml = format!(
            "{}\n[meters.peak]\naggregation = 'max'\nunit = 'x'\n\
             [meters.least]\naggregation = 'min'\nunit = 'x'\n",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        );
        let catalog = Catalog::from_toml(&toml).unwrap();
        let max = tally_schemas::quantity::MAX;
        let both = |o: u64, c: &str, v: u64, t: &str| {
            [
                record(o, c, "peak", v, t),
                record(o + 100, c, "least", v, t),
            ]
        };
        let mut first = Vec::new();
        for (o, c, v, t) in [
            (0, "a", 5, "2026-11-02T00:00:00Z"),
            (1, "a", 40, "2026-10-25T00:00:00Z"),
            (2, "b", max, "2026-11-05T00:00:00Z"),
        ] {
            first.extend(both(o, c, v, t));
        }
        let mut second = Vec::new();
        for (o, c, v, t) in [
            (3, "a", 9, "2026-11-02T00:00:30Z"),
            (4, "a", 3, "2026-11-03T00:00:00Z"),
            (5, "a", 0, "2026-11-04T00:00:00Z"),
            (6, "b", 7, "2026-11-05T00:00:10Z"),
            (7, "a", 2, "2026-10-26T00:00:00Z"),
        ] {
            second.extend(both(o, c, v, t));
        }
        first.sort_by_key(|r| r.offset);
        second.sort_by_key(|r| r.offset);
        // Offsets of one partition: the second batch starts after the first.
        let renumber = |recs: &mut Vec<Record>, from: u64| {
            for (i, r) in recs.iter_mut().enumerate() {
                r.offset = from + i as u64;
            }
        };
        renumber(&mut first, 0);
        renumber(&mut second, first.len() as u64);
        let one = Rollup::from_records(&first, &catalog);
        assert_eq!(store.apply(&one).await.unwrap(), Applied::Written);
        let two = Rollup::from_records(&second, &catalog);
        assert_eq!(store.apply(&two).await.unwrap(), Applied::Written);
        assert_eq!(store.apply(&one).await.unwrap(), Applied::Replay);
        let (nov, now) = (at(NOV), at(NOW));
        let (peak, least) = (Aggregation::Max, Aggregation::Min);
        let total = |c: &'static str, m: &'static str, a, from, to| async move {
            store.total(c, m, a, from, to).await.unwrap()
        };
        assert_eq!(total("a", "peak", peak, nov, now).await, 9);
        assert_eq!(total("a", "least", least, nov, now).await, 0);
        let before_4th = at("2026-11-04T00:00:00Z");
        assert_eq!(total("a", "least", least, nov, before_4th).await, 3);
        assert_eq!(total("a", "peak", peak, 0, now).await, 40);
        assert_eq!(total("a", "least", least, 0, nov).await, 2);
        assert_eq!(total("b", "peak", peak, nov, now).await, max);
        assert_eq!(total("b", "least", least, nov, now).await, 7);
        assert_eq!(total("c", "least", least, nov, now).await, 0);
        let days = store
            .series("a", "peak", peak, nov, now, Window::Day)
            .await
            .unwrap();
        let day = |d: &str| at(&format!("2026-11-{d}T00:00:00Z"));
        assert_eq!(days, [(day("02"), 9), (day("03"), 3), (day("04"), 0)]);
        let months = store
            .series("a", "least", least, 0, now, Window::Month)
            .await
            .unwrap();
        assert_eq!(months, [(at("2026-10-01T00:00:00Z"), 2), (nov, 0)]);
        let meters = [
            ("peak".to_owned(), peak),
            ("least".to_owned(), least),
            ("api_requests".to_owned(), Aggregation::Count),
        ];
        assert_eq!(
            store.totals("a", &meters, nov, now).await.unwrap(),
            [9, 0, 0]
        );
        let top = store
            .top_customers("peak", peak, nov, now, 10)
            .await
            .unwrap();
        assert_eq!(top, [("b".to_owned(), max), ("a".to_owned(), 9)]);
        // A smallest value of 0 is no usage to rank.
        let top = store
            .top_customers("least", least, nov, now, 10)
            .await
            .unwrap();
        assert_eq!(top, [("b".to_owned(), 7)]);
        let across = store.meter_total("peak", peak, nov, now).await.unwrap();
        assert_eq!((across.usage, across.customers), (max + 9, 2));
        let all = store.meter_totals(&meters, nov, now).await.unwrap();
        assert_eq!(all[0], across);
        assert_eq!((all[1].usage, all[1].customers), (7, 1));
        assert_eq!(all[2], Default::default());
        let snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: nov,
                since_by_customer: vec![
                    ("b".into(), at("2026-11-05T00:00:00Z")),
                    ("c".into(), nov),
                ],
                periodic_meters: vec![("peak".into(), peak), ("least".into(), least)],
            })
            .await
            .unwrap();
        let mut totals = snap.totals.clone();
        totals.sort();
        let row = |c: &str, m: &str, v| (c.to_owned(), m.to_owned(), v);
        assert_eq!(
            totals,
            [
                row("a", "least", 0),
                row("a", "peak", 9),
                row("b", "least", 7),
                row("b", "peak", max),
            ]
        );
    }

    /// `unique_count` meters: every read (totals, series, top customers, totals across
    /// customers, the snapshot, the values themselves) counts each distinct value once over
    /// the range asked for, whichever batches, minutes and customers it came in; a replayed
    /// batch changes nothing.
    pub async fn each_distinct_value_counts_once_per_period(s: &StoreSubject) {
        let store = &s.store;
        let toml = format!(
            "{}\n[meters.active_users]\naggregation = 'unique_count'\nunit = 'users'\n\
             event_type = 'session'\nvalue = '$.user'\n",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        );
        let catalog = Catalog::from_toml(&toml).unwrap();
        let ty = catalog.event_type("session").unwrap();
        let session = |o: u64, c: &str, user: &str, t: &str| {
            let data = serde_json::json!({ "user": user });
            let mut r = record(o, c, "session", 0, t);
            r.event.readings = ty
                .readings(&tally_schemas::path::Payload::Value(&data))
                .unwrap();
            r
        };
        let first = [
            session(0, "a", "ann", "2026-10-30T00:00:00Z"),
            session(1, "a", "ann", "2026-11-02T00:00:00Z"),
            session(2, "a", "bob", "2026-11-02T00:00:20Z"),
            session(3, "b", "ann", "2026-11-02T00:00:30Z"),
        ];
        let second = [
            session(4, "a", "ann", "2026-11-03T00:00:00Z"),
            session(5, "a", "cy", "2026-11-03T00:00:00Z"),
            session(6, "a", "bob", "2026-11-04T00:00:00Z"),
            session(7, "a", "dee", "2026-10-31T00:00:00Z"),
        ];
        let one = Rollup::from_records(&first, &catalog);
        assert_eq!(store.apply(&one).await.unwrap(), Applied::Written);
        let two = Rollup::from_records(&second, &catalog);
        assert_eq!(store.apply(&two).await.unwrap(), Applied::Written);
        assert_eq!(store.apply(&two).await.unwrap(), Applied::Replay);
        let (nov, now) = (at(NOV), at(NOW));
        let users = Aggregation::UniqueCount;
        let total = |c: &'static str, from, to| async move {
            store
                .total(c, "active_users", users, from, to)
                .await
                .unwrap()
        };
        assert_eq!(total("a", nov, now).await, 3, "ann, bob and cy");
        assert_eq!(total("a", 0, nov).await, 2, "ann and dee in October");
        assert_eq!(total("a", 0, now).await, 4);
        assert_eq!(total("a", nov, at("2026-11-03T00:00:00Z")).await, 2);
        assert_eq!(total("b", nov, now).await, 1);
        assert_eq!(total("c", nov, now).await, 0);
        let values = store
            .distinct_values("a", "active_users", nov, now)
            .await
            .unwrap();
        assert_eq!(values, ["ann", "bob", "cy"]);
        let day = |d: &str| at(&format!("2026-11-{d}T00:00:00Z"));
        let days = store
            .series("a", "active_users", users, nov, now, Window::Day)
            .await
            .unwrap();
        assert_eq!(days, [(day("02"), 2), (day("03"), 2), (day("04"), 1)]);
        let months = store
            .series("a", "active_users", users, 0, now, Window::Month)
            .await
            .unwrap();
        assert_eq!(months, [(at("2026-10-01T00:00:00Z"), 2), (nov, 3)]);
        let meters = [
            ("active_users".to_owned(), users),
            ("api_requests".to_owned(), Aggregation::Count),
        ];
        assert_eq!(store.totals("a", &meters, nov, now).await.unwrap(), [3, 0]);
        let top = store
            .top_customers("active_users", users, nov, now, 10)
            .await
            .unwrap();
        assert_eq!(top, [("a".to_owned(), 3), ("b".to_owned(), 1)]);
        let across = store
            .meter_total("active_users", users, nov, now)
            .await
            .unwrap();
        assert_eq!(
            (across.usage, across.customers),
            (4, 2),
            "each customer's distinct values, added up"
        );
        assert_eq!(
            store.meter_totals(&meters, nov, now).await.unwrap()[0],
            across
        );
        let snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: nov,
                since_by_customer: vec![("b".into(), at("2026-11-03T00:00:00Z"))],
                periodic_meters: vec![("active_users".into(), users)],
            })
            .await
            .unwrap();
        assert_eq!(
            snap.totals,
            [("a".to_owned(), "active_users".to_owned(), 3)],
            "b has no value since its own period start"
        );
        let mut distinct = snap.distinct.clone();
        distinct.sort();
        let row = |c: &str, v: &str| (c.to_owned(), "active_users".to_owned(), v.to_owned());
        assert_eq!(distinct, [row("a", "ann"), row("a", "bob"), row("a", "cy")]);
    }

    /// The enforcer's start-up read: additive usage since each customer's own period start,
    /// the latest value of every gauge, and the positions it is consistent with.
    pub async fn the_snapshot_covers_each_customers_period(s: &StoreSubject) {
        let store = &s.store;
        let batch = [
            record(0, "a", "api_requests", 300, "2026-11-02T00:00:00Z"),
            record(1, "c", "api_requests", 150, "2026-11-02T00:00:00Z"),
            record(2, "c", "api_requests", 50, "2026-11-21T09:00:00Z"),
            record(3, "d", "api_requests", 50, "2026-10-25T00:00:00Z"),
            record(4, "a", "wasm_modules", 5, "2026-10-02T00:00:00Z"),
            record(5, "a", "wasm_modules", 2, "2026-11-05T00:00:00Z"),
        ];
        store.apply(&roll(&batch)).await.unwrap();
        let snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: at(NOV),
                since_by_customer: vec![("c".into(), at("2026-11-10T00:00:00Z"))],
                periodic_meters: vec![("api_requests".into(), Aggregation::Count)],
            })
            .await
            .unwrap();
        assert_eq!(snap.offsets, BTreeMap::from([(0, 6)]));
        let mut totals = snap.totals.clone();
        totals.sort();
        assert_eq!(
            totals,
            [
                ("a".to_owned(), "api_requests".to_owned(), 300),
                ("c".to_owned(), "api_requests".to_owned(), 50),
            ]
        );
        let gauges: Vec<(String, String, u64)> = snap
            .gauges
            .iter()
            .map(|(c, m, _, v)| (c.clone(), m.clone(), *v))
            .collect();
        assert_eq!(gauges, [("a".to_owned(), "wasm_modules".to_owned(), 2)]);
        assert!(
            snap.gauges[0].2 >= at("2026-11-05T00:00:00Z") - 60_000
                && snap.gauges[0].2 <= at("2026-11-05T00:00:00Z"),
            "the gauge's time is its latest event's (to the minute): {}",
            snap.gauges[0].2
        );
    }

    /// A store fed by a log that repeats events (Kafka) drops a (source, id) already counted
    /// at another offset, but keeps the same record read again (a replay); `counted_at` says
    /// where it was counted. A store fed by a log that drops repeats itself keeps everything.
    pub async fn duplicates_are_told_from_replays_where_the_store_drops_them(s: &StoreSubject) {
        let store = &s.store;
        let first = [
            record(0, "a", "api_requests", 1, "2026-11-02T00:00:00Z"),
            record(1, "a", "api_requests", 1, "2026-11-02T00:00:00Z"),
        ];
        assert_eq!(store.first_seen(&first).await.unwrap(), [true, true]);
        let mut again = first[0].clone();
        again.offset = 7;
        let batch = [first[1].clone(), again];
        let expected: [bool; 2] = if s.dedups {
            [true, false]
        } else {
            [true, true]
        };
        assert_eq!(store.first_seen(&batch).await.unwrap(), expected);
        let counted = store.counted_at(&batch).await.unwrap();
        if s.dedups {
            assert_eq!(counted, [Some(1), Some(0)]);
        } else {
            assert_eq!(counted, [None, None]);
        }
    }

    /// Customer records: what is written is read back, an unknown id is `None`, a later write
    /// replaces the record, and `customers_since` lists the records changed from a time on.
    pub async fn customer_records_round_trip_and_the_latest_write_wins(s: &StoreSubject) {
        let store = &s.store;
        let catalog = Catalog::builtin();
        let mut a = Customer::new_default(&catalog);
        a.plan = "starter".into();
        a.stripe_customer_id = Some("cus_'quoted'".into());
        a.updated_ms = 1_000;
        let mut b = Customer::new_default(&catalog);
        b.updated_ms = 2_000;
        store.put_customer("a", &a).await.unwrap();
        store.put_customer("b", &b).await.unwrap();
        assert_eq!(store.customer("a").await.unwrap(), Some(a.clone()));
        assert_eq!(store.customer("nobody").await.unwrap(), None);
        let mut a2 = a.clone();
        a2.plan = "pro".into();
        a2.updated_ms = 3_000;
        store.put_customer("a", &a2).await.unwrap();
        assert_eq!(store.customer("a").await.unwrap(), Some(a2.clone()));
        let mut since: Vec<(String, Customer)> = store.customers_since(2_000).await.unwrap();
        since.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(since, [("a".to_owned(), a2), ("b".to_owned(), b)]);
        assert!(store.customers_since(3_001).await.unwrap().is_empty());
    }

    /// Billing-sync's marks: one per (customer, meter), the latest write wins, single and
    /// batched writes alike.
    pub async fn billing_marks_keep_the_latest_per_customer_and_meter(s: &StoreSubject) {
        let store = &s.store;
        let row = |c: &str, m: &str, mark: &str| (c.to_owned(), m.to_owned(), mark.to_owned());
        assert!(store.billing_marks().await.unwrap().is_empty());
        store
            .put_billing_mark("a", "api_requests", r#"{"reported":1}"#)
            .await
            .unwrap();
        store
            .put_billing_marks(&[
                row("a", "api_requests", r#"{"reported":2,"q":"it's"}"#),
                row("a", "bandwidth_bytes", r#"{"reported":3}"#),
                row("b", "api_requests", r#"{"reported":4}"#),
            ])
            .await
            .unwrap();
        let mut marks = store.billing_marks().await.unwrap();
        marks.sort();
        assert_eq!(
            marks,
            [
                row("a", "api_requests", r#"{"reported":2,"q":"it's"}"#),
                row("a", "bandwidth_bytes", r#"{"reported":3}"#),
                row("b", "api_requests", r#"{"reported":4}"#),
            ]
        );
    }

    /// The webhook outbox keeps the latest state of each (notification, URL) and forgets
    /// finished deliveries.
    pub async fn the_webhook_outbox_keeps_the_latest_state_until_done(s: &StoreSubject) {
        let store = &s.store;
        let d = |id: &str, url: &str, attempts: u32, done: bool| WebhookDelivery {
            id: id.into(),
            url: url.into(),
            body: format!(r#"{{"id":"{id}","q":"it's"}}"#),
            attempts,
            next_attempt_ms: 1_000 * i64::from(attempts),
            owner: "r1".into(),
            lease_until_ms: 2_000 * i64::from(attempts),
            done,
        };
        assert!(store.pending_webhooks().await.unwrap().is_empty());
        for delivery in [
            d("n1", "http://a", 0, false),
            d("n1", "http://b", 0, false),
            d("n2", "http://a", 0, false),
            d("n1", "http://a", 3, false),
            d("n2", "http://a", 1, true),
        ] {
            store.put_webhook(&delivery).await.unwrap();
        }
        let mut pending = store.pending_webhooks().await.unwrap();
        pending.sort_by(|x, y| (&x.id, &x.url).cmp(&(&y.id, &y.url)));
        assert_eq!(
            pending,
            [d("n1", "http://a", 3, false), d("n1", "http://b", 0, false)]
        );
    }

    /// API key records: a later version of an id replaces it, an earlier one does not.
    pub async fn api_keys_keep_the_latest_version(s: &StoreSubject) {
        let store = &s.store;
        assert!(store.api_keys().await.unwrap().is_empty());
        store.put_api_key("k1", r#"{"v":1}"#, 1).await.unwrap();
        store.put_api_key("k2", r#"{"v":1}"#, 1).await.unwrap();
        store.put_api_key("k1", r#"{"v":3}"#, 3).await.unwrap();
        store.put_api_key("k1", r#"{"v":2}"#, 2).await.unwrap();
        let mut keys = store.api_keys().await.unwrap();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("k1".to_owned(), r#"{"v":3}"#.to_owned()),
                ("k2".to_owned(), r#"{"v":1}"#.to_owned()),
            ]
        );
    }

    /// Meter records: a later version of a name replaces it, an earlier one does not.
    pub async fn meter_definitions_keep_the_latest_version(s: &StoreSubject) {
        let store = &s.store;
        assert!(store.meter_definitions().await.unwrap().is_empty());
        store
            .put_meter_definition("tokens", r#"{"v":1}"#, 1)
            .await
            .unwrap();
        store
            .put_meter_definition("seats", r#"{"v":1}"#, 1)
            .await
            .unwrap();
        store
            .put_meter_definition("tokens", r#"{"v":3}"#, 3)
            .await
            .unwrap();
        store
            .put_meter_definition("tokens", r#"{"v":2}"#, 2)
            .await
            .unwrap();
        let mut meters = store.meter_definitions().await.unwrap();
        meters.sort();
        assert_eq!(
            meters,
            [
                ("seats".to_owned(), r#"{"v":1}"#.to_owned()),
                ("tokens".to_owned(), r#"{"v":3}"#.to_owned()),
            ]
        );
    }
}

mod log {
    use super::*;

    fn events(prefix: &str, n: usize) -> Vec<UsageEvent> {
        (0..n)
            .map(|i| {
                event(
                    &format!("{prefix}{i}"),
                    &format!("customer-{}", i % 7),
                    "api_requests",
                    i as u64 + 1,
                    "2026-11-21T09:00:00Z",
                )
            })
            .collect()
    }

    /// Polls until `n` records came (or 30 s passed).
    async fn read(reader: &mut dyn LogReader, n: usize) -> Vec<Record> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while out.len() < n && tokio::time::Instant::now() < deadline {
            out.extend(
                reader
                    .poll(n - out.len(), Duration::from_millis(100))
                    .await
                    .unwrap(),
            );
        }
        out
    }

    /// An append reports what is durable; a (source, id) appended again is dropped as a
    /// duplicate; a reader from the start gets every accepted event once, in offset order
    /// within each partition, one customer's events in one partition; the end offsets count
    /// what was appended.
    pub async fn appends_are_durable_once_and_read_back_in_offset_order(s: &LogSubject) {
        let log = &s.log;
        let first = events("a", 20);
        let outcome = log.append(first.clone()).await.unwrap();
        assert_eq!((outcome.accepted, outcome.duplicates), (20, 0));
        let mut again = first[..10].to_vec();
        again.extend(events("b", 3));
        let outcome = log.append(again).await.unwrap();
        assert_eq!((outcome.accepted, outcome.duplicates), (3, 10));
        let mut reader = log.reader().unwrap();
        let records = read(reader.as_mut(), 23).await;
        assert_eq!(records.len(), 23);
        let more = reader.poll(10, Duration::from_millis(500)).await.unwrap();
        assert!(more.is_empty(), "nothing past what was accepted: {more:?}");
        let ids: BTreeSet<&str> = records.iter().map(|r| r.event.id.as_str()).collect();
        assert_eq!(ids.len(), 23, "each accepted event once");
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        let mut partition_of: BTreeMap<&str, u32> = BTreeMap::new();
        for r in &records {
            if let Some(prev) = last.insert(r.partition, r.offset) {
                assert!(
                    r.offset > prev,
                    "offsets grow within partition {}",
                    r.partition
                );
            }
            let p = *partition_of.entry(&r.event.customer).or_insert(r.partition);
            assert_eq!(p, r.partition, "one customer, one partition");
        }
        let by_id: BTreeMap<&str, &UsageEvent> = records
            .iter()
            .map(|r| (r.event.id.as_str(), &r.event))
            .collect();
        assert_eq!(by_id["a7"], &first[7], "read back as appended");
        let ends: BTreeMap<u32, u64> = log.end_offsets().await.unwrap().into_iter().collect();
        for (p, at) in &last {
            assert_eq!(
                ends.get(p),
                Some(&(at + 1)),
                "partition {p} ends after its last record"
            );
        }
    }

    /// A reader sought to the log's end offsets reads only what is appended after.
    pub async fn a_reader_sought_to_the_end_reads_only_what_comes_after(s: &LogSubject) {
        let log = &s.log;
        log.append(events("old", 12)).await.unwrap();
        let mut reader = log.reader().unwrap();
        for (p, end) in log.end_offsets().await.unwrap() {
            reader.seek(p, end);
        }
        log.append(events("new", 5)).await.unwrap();
        let records = read(reader.as_mut(), 5).await;
        let mut ids: Vec<&str> = records.iter().map(|r| r.event.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["new0", "new1", "new2", "new3", "new4"]);
        let more = reader.poll(10, Duration::from_millis(500)).await.unwrap();
        assert!(more.is_empty(), "{more:?}");
    }

    /// A poll dropped before it returns (a timeout, a shutdown) loses no record: the next
    /// poll returns them.
    pub async fn a_cancelled_poll_loses_nothing(s: &LogSubject) {
        let log = &s.log;
        let mut reader = log.reader().unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(300),
            reader.poll(100, Duration::from_secs(5)),
        )
        .await;
        assert!(
            waiting.is_err(),
            "nothing to read yet: the poll is cancelled"
        );
        log.append(events("c", 6)).await.unwrap();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(1),
            reader.poll(100, Duration::from_secs(5)),
        )
        .await;
        let mut records = cancelled.map(|r| r.unwrap()).unwrap_or_default();
        let rest = 6 - records.len();
        records.extend(read(reader.as_mut(), rest).await);
        let ids: BTreeSet<String> = records.iter().map(|r| r.event.id.clone()).collect();
        assert_eq!(ids.len(), 6, "{ids:?}");
    }

    /// The first publication of a (customer, meter, period, threshold) wins; a second is
    /// refused; `notifications_since` lists the notifications of periods ending after a time.
    pub async fn each_notification_is_claimed_once(s: &LogSubject) {
        let log = &s.log;
        let n = |customer: &str, threshold: u32, period_end: &str| Notification {
            customer: customer.into(),
            meter: "api_requests".into(),
            period_start_ms: at(period_end) - 30 * 86_400_000,
            period_end_ms: at(period_end),
            threshold,
            usage: 8_000,
            limit: 10_000,
            crossed_ms: at("2026-11-21T09:00:00Z"),
        };
        let december = "2026-12-01T00:00:00Z";
        assert!(
            log.publish_notification(&n("a", 80, december))
                .await
                .unwrap()
        );
        assert!(
            !log.publish_notification(&n("a", 80, december))
                .await
                .unwrap()
        );
        let mut later = n("a", 80, december);
        later.usage = 9_000;
        assert!(
            !log.publish_notification(&later).await.unwrap(),
            "the same crossing with other figures is the same notification"
        );
        assert!(
            log.publish_notification(&n("a", 100, december))
                .await
                .unwrap()
        );
        assert!(
            log.publish_notification(&n("b", 80, december))
                .await
                .unwrap()
        );
        assert!(
            log.publish_notification(&n("a", 80, "2026-11-01T00:00:00Z"))
                .await
                .unwrap(),
            "another period"
        );
        let mut current: Vec<(String, u32)> = log
            .notifications_since(at(NOW))
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.customer, n.threshold))
            .collect();
        current.sort();
        assert_eq!(
            current,
            [
                ("a".to_owned(), 80),
                ("a".to_owned(), 100),
                ("b".to_owned(), 80)
            ]
        );
        let all = log.notifications_since(0).await.unwrap();
        assert_eq!(all.len(), 4);
        assert!(
            all.contains(&n("a", 80, december)),
            "stored as first published"
        );
    }
}
