//! The distributed pipeline against real servers: `tally ingest`, `tally aggregator` and
//! `tally enforcer` as separate processes on a Kafka-compatible broker (tansu) and ClickHouse,
//! with the faults the production path must survive. Totals are compared, exactly, with what
//! the clients had acknowledged.
//!
//! Each test uses a fresh topic, consumer group and database on the suite's servers; the tests
//! that stop a server start a private one.

mod common;
#[path = "servers/mod.rs"]
mod servers;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start_with_env};
use serde_json::{Value, json};
use servers::{Backends, ClickHouse, Kafka, unique_name};
use tally_backends::log::Record;
use tally_backends::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use tally_backends::store::prelude::*;
use tally_backends::store::{Applied, SnapshotRequest};
use tally_schemas::rollup::Rollup;
use tally_schemas::{Aggregation, Catalog, UsageEvent};

/// One isolated pipeline: its own topic, consumer group and database.
struct Pipeline {
    b: Backends,
    dir: tempfile::TempDir,
}

impl Pipeline {
    fn new(kafka: Kafka, ch: ClickHouse) -> Pipeline {
        Pipeline {
            b: Backends::new(kafka, ch),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn shared() -> Pipeline {
        Pipeline::new(Kafka::shared(), ClickHouse::shared())
    }

    fn start(&self, command: &str) -> Proc {
        self.start_with(command, &[])
    }

    fn start_with(&self, command: &str, extra: &[(&str, &str)]) -> Proc {
        let env = self.b.env();
        let mut pairs = servers::pairs(&env);
        pairs.extend_from_slice(extra);
        start_with_env(
            command,
            self.dir.path(),
            free_port(),
            free_port(),
            "100ms",
            &pairs,
        )
    }

    /// Additive usage per customer of `api_requests`, as ClickHouse has it.
    fn totals(&self) -> BTreeMap<String, u64> {
        self.sums("customer", "api_requests", "customer")
    }

    /// Usage of `meter` per customer and stored dimensions key (`"<customer> <key>"`), as
    /// ClickHouse has it.
    fn dimension_totals(&self, meter: &str) -> BTreeMap<String, u64> {
        self.sums("concat(customer, ' ', dims)", meter, "customer, dims")
    }

    /// `sum(value)` of `meter`'s cells per `key`, grouped by `group`.
    fn sums(&self, key: &str, meter: &str, group: &str) -> BTreeMap<String, u64> {
        let out = self
            .b
            .ch
            .query(&format!(
                "SELECT {key}, sum(value) FROM {}.usage_block_cells FINAL
                 WHERE meter = '{meter}' AND customer != '' GROUP BY {group} FORMAT TSV",
                self.b.db
            ))
            .unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let (c, v) = l.split_once('\t')?;
                Some((c.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// Waits until ClickHouse holds exactly `want`; fails after `timeout` or on any excess.
    fn wait_totals(&self, want: &BTreeMap<String, u64>, timeout: Duration) {
        self.wait_for(|| self.totals(), want, timeout)
    }

    /// Waits until `read` gives exactly `want`; fails after `timeout` or on any excess.
    fn wait_for(
        &self,
        read: impl Fn() -> BTreeMap<String, u64>,
        want: &BTreeMap<String, u64>,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = read();
            for (c, v) in &got {
                let w = want.get(c).copied().unwrap_or(0);
                assert!(*v <= w, "{c} counted {v}, more than the {w} acknowledged");
            }
            if &got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "totals did not converge: {} customers differ",
                want.iter().filter(|(c, v)| got.get(*c) != Some(v)).count()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A batch of `size` events numbered from `tag`, spread over `customers` customers, with what
/// each customer should be counted.
fn batch(tag: &str, size: usize, customers: usize) -> (String, BTreeMap<String, u64>) {
    let mut expected = BTreeMap::new();
    let events: Vec<Value> = (0..size)
        .map(|i| {
            let customer = format!("cust-{}", i % customers);
            let value = 1 + (i as u64 % 3);
            *expected.entry(customer.clone()).or_insert(0) += value;
            json!({"specversion": "1.0", "id": format!("{tag}-{i}"), "source": "edge-1",
                   "type": "api_requests", "subject": customer, "data": {"value": value}})
        })
        .collect();
    (Value::Array(events).to_string(), expected)
}

/// The payload meters of the tests (`tests/fixtures/payload_meters.toml`) beside the default
/// catalogue, written to `dir`; the environment that gives them to a process.
fn payload_catalogue(dir: &std::path::Path) -> (&'static str, String) {
    let path = dir.join("payload_catalog.toml");
    let text = format!(
        "{}\n{}",
        tally_schemas::catalog::DEFAULT_CATALOG_TOML,
        include_str!("fixtures/payload_meters.toml")
    );
    std::fs::write(&path, text).unwrap();
    ("TALLY_CATALOG_FILE", path.to_str().unwrap().to_owned())
}

/// A batch of `size` `request` events with a `bytes` quantity and `region` and `model`
/// dimensions (some without a model), with what `request_bytes` should count per customer and
/// dimensions key (`"<customer> <key>"`).
fn dimensioned_batch(tag: &str, size: usize, customers: usize) -> (String, BTreeMap<String, u64>) {
    let mut expected = BTreeMap::new();
    let events: Vec<Value> = (0..size)
        .map(|i| {
            let (customer, j) = (format!("cust-{}", i % customers), i / customers);
            let bytes = 100 + (i as u64 % 7);
            let region = ["eu", "us", "ap"][j % 3];
            let mut data = json!({"bytes": bytes, "region": region});
            let key = if j % 4 == 0 {
                format!(r#"{{"region":"{region}"}}"#)
            } else {
                let model = ["m1", "m2"][j % 2];
                data["model"] = json!(model);
                format!(r#"{{"model":"{model}","region":"{region}"}}"#)
            };
            *expected.entry(format!("{customer} {key}")).or_insert(0) += bytes;
            json!({"specversion": "1.0", "id": format!("{tag}-{i}"), "source": "edge-1",
                   "type": "request", "subject": customer, "data": data})
        })
        .collect();
    (Value::Array(events).to_string(), expected)
}

fn add(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (c, v) in from {
        *into.entry(c.clone()).or_insert(0) += v;
    }
}

/// Posts `body` until ingest answers 202, as an edge node does; returns the 503s seen.
fn post_until_accepted(api: &str, body: &str) -> u64 {
    let client = servers::client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match client
            .post(format!("{api}/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.to_owned())
            .send()
        {
            Ok(r) if r.status().as_u16() == 202 => return refused,
            Ok(r) => {
                assert_eq!(
                    r.status().as_u16(),
                    503,
                    "only 503 may refuse a valid batch"
                );
                assert!(
                    r.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                refused += 1;
            }
            Err(e) => panic!("ingest did not answer: {e}"),
        }
        assert!(Instant::now() < deadline, "ingest never accepted the batch");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of an unlabelled metric of `proc` (0 when absent).
fn metric(proc: &Proc, name: &str) -> f64 {
    let m = reqwest::blocking::get(format!("{}/metrics", proc.admin))
        .unwrap()
        .text()
        .unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn usage(client: &reqwest::blocking::Client, url: String) -> u64 {
    let v: Value = client.get(url).send().unwrap().json().unwrap();
    v["usage"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage in {v}"))
}

#[test]
fn hundred_thousand_events_end_to_end_with_duplicates_dropped() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    let ingest = p.start("ingest");
    let second_ingest = p.start("ingest");
    let aggregator = p.start("aggregator");
    let enforcer = p.start("enforcer");
    let mut want = BTreeMap::new();
    let mut bodies = Vec::new();
    for k in 0..100 {
        let (body, expected) = batch(&format!("e2e-{k}"), 1_000, 500);
        let r = ingest.post_batch(body.clone());
        assert_eq!(r.status().as_u16(), 202);
        assert_eq!(r.json::<Value>().unwrap()["accepted"], 1_000);
        add(&mut want, &expected);
        bodies.push(body);
    }
    // A retry to the same ingest process is answered as a duplicate; the same events through
    // another ingest process reach the topic again and must be dropped by the aggregator.
    let r: Value = ingest.post_batch(bodies[7].clone()).json().unwrap();
    assert_eq!(
        (r["accepted"].clone(), r["duplicates"].clone()),
        (json!(0), json!(1_000))
    );
    for body in &bodies[..5] {
        assert_eq!(
            second_ingest.post_batch(body.clone()).status().as_u16(),
            202
        );
    }
    p.wait_totals(&want, Duration::from_secs(120));

    // The query API and the enforcer read the same figures.
    let client = servers::client();
    for c in ["cust-0", "cust-123", "cust-499"] {
        let stored = usage(
            &client,
            format!(
                "{}/v1/usage?customer={c}&meter=api_requests",
                aggregator.api
            ),
        );
        assert_eq!(stored, want[c], "query API for {c}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = usage(
                &client,
                format!(
                    "{}/v1/check?customer={c}&meter=api_requests&quantity=0",
                    enforcer.api
                ),
            );
            if seen == want[c] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "enforcer sees {seen} for {c}, want {}",
                want[c]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A restarted enforcer loads period-to-date totals from ClickHouse, then follows the topic.
    drop(enforcer);
    let enforcer = p.start("enforcer");
    let seen = usage(
        &client,
        format!(
            "{}/v1/check?customer=cust-7&meter=api_requests&quantity=0",
            enforcer.api
        ),
    );
    assert_eq!(seen, want["cust-7"]);
    let dups =
        p.b.ch
            .query(&format!("SELECT count() FROM {}.event_ids", p.b.db))
            .unwrap();
    assert_eq!(
        dups.trim(),
        "100000",
        "one de-duplication id per counted event"
    );
}

async fn total(store: &ClickHouseStore) -> u64 {
    store
        .total("c1", "api_requests", Aggregation::Sum, 0, i64::MAX)
        .await
        .unwrap()
}

/// Event ids, some with characters that need quoting in SQL.
fn tricky_id(n: u64) -> String {
    format!("id-{n}{}", ["", "'", "\\", "?"][(n % 4) as usize])
}

fn record(partition: u32, offset: u64, id: &str, customer: &str, value: u64) -> Record {
    let now = 1_795_255_200_000; // 2026-11-21T10:00:00Z
    Record {
        partition,
        offset,
        event: UsageEvent {
            id: id.into(),
            source: "edge-1".into(),
            customer: customer.into(),
            meter: "api_requests".into(),
            value,
            time_ms: now,
            received_ms: now,
            readings: Vec::new(),
        },
    }
}

/// The store's side of exactly once, on the real ClickHouse: a batch read and written twice
/// (a crash after the write, before the log's offsets were committed) counts once, duplicates
/// inside and across batches count once, and a batch overlapping the stored position is refused.
#[test]
fn a_replayed_batch_counts_once_in_clickhouse() {
    if servers::skip_without_servers(false) {
        return;
    }
    let ch = ClickHouse::shared();
    let config = ClickHouseConfig::new(ch.http.clone(), unique_name("replay"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert_eq!(
            ClickHouseStore::migrate(&config).await.unwrap(),
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert!(ClickHouseStore::migrate(&config).await.unwrap().is_empty());
        let store = ClickHouseStore::new(&config);
        let catalog = Catalog::builtin();
        // Offsets 0..100 on partition 0; ids repeat every 80 records (20 duplicates), and some
        // hold characters that need quoting in SQL.
        let first: Vec<Record> = (0..100)
            .map(|o| record(0, o, &tricky_id(o % 80), "c1", 2))
            .collect();
        let roll = |batch: &[Record], keep: &[bool]| {
            let mut r = Rollup::default();
            for (rec, k) in batch.iter().zip(keep) {
                if *k {
                    r.push(rec, &catalog)
                } else {
                    r.cover(rec)
                }
            }
            r
        };
        let keep = store.first_seen(&first).await.unwrap();
        assert_eq!(keep.iter().filter(|k| **k).count(), 80);
        let rollup = roll(&first, &keep);
        assert_eq!(store.apply(&rollup).await.unwrap(), Applied::Written);
        // The same records again: the same ones are kept (replay, not duplicates) and the
        // write is recognised.
        let again = store.first_seen(&first).await.unwrap();
        assert_eq!(again, keep);
        assert_eq!(
            store.apply(&roll(&first, &again)).await.unwrap(),
            Applied::Replay
        );
        assert_eq!(total(&store).await, 160);
        assert_eq!(store.offsets().await.unwrap().get(&0), Some(&100));
        // The next batch re-sends three old ids (duplicates) and one new one.
        let next: Vec<Record> = (100..104)
            .map(|o| {
                record(
                    0,
                    o,
                    &if o < 103 {
                        tricky_id(o - 100)
                    } else {
                        "id-500".into()
                    },
                    "c1",
                    5,
                )
            })
            .collect();
        let keep = store.first_seen(&next).await.unwrap();
        assert_eq!(keep, vec![false, false, false, true]);
        assert_eq!(
            store.apply(&roll(&next, &keep)).await.unwrap(),
            Applied::Written
        );
        assert_eq!(total(&store).await, 165);
        // A batch that starts below the stored position belongs to another writer.
        let overlap: Vec<Record> = (102..110)
            .map(|o| record(0, o, &format!("late-{o}"), "c1", 1))
            .collect();
        let err = store.apply(&roll(&overlap, &[true; 8])).await.unwrap_err();
        assert!(matches!(err, tally_backends::Error::Fenced { .. }), "{err}");
        assert_eq!(total(&store).await, 165);
        // The enforcer's snapshot agrees with the positions it reports.
        let snap = store
            .snapshot(SnapshotRequest {
                default_since_ms: 0,
                since_by_customer: vec![],
                periodic_meters: vec![("api_requests".into(), Aggregation::Count)],
            })
            .await
            .unwrap();
        assert_eq!(snap.offsets.get(&0), Some(&104));
        assert_eq!(snap.totals, vec![("c1".into(), "api_requests".into(), 165)]);
    });
    // Ids older than the window are dropped by day, the others stay.
    let db = &config.database;
    ch.query(&format!(
        "INSERT INTO {db}.event_ids VALUES ('2026-10-01', 0, 'edge-1', 'old', 1)"
    ))
    .unwrap();
    let count = || {
        ch.query(&format!("SELECT count() FROM {db}.event_ids"))
            .unwrap()
    };
    assert_eq!(count().trim(), "82");
    let store = ClickHouseStore::new(&config);
    rt.block_on(store.maintain(1_795_255_200_000)).unwrap();
    assert_eq!(count().trim(), "81");
}

#[test]
fn a_replayed_topic_counts_nothing_twice() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    let ingest = p.start("ingest");
    let aggregator = p.start("aggregator");
    let mut want = BTreeMap::new();
    for k in 0..10 {
        let (body, expected) = batch(&format!("replay-{k}"), 500, 20);
        assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
        add(&mut want, &expected);
    }
    p.wait_totals(&want, Duration::from_secs(60));
    drop(aggregator);
    // A consumer group with no committed offsets reads the topic again from its start: every
    // record is below the positions stored in ClickHouse and must be skipped.
    let group = unique_name("replay");
    let _replayer = p.start_with("aggregator", &[("TALLY_KAFKA_CONSUMER_GROUP", &group)]);
    let (body, expected) = batch("replay-after", 100, 20);
    assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
    add(&mut want, &expected);
    // Events after the replay are counted, and the replayed ones were not counted again.
    p.wait_totals(&want, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.totals(), want);
}

/// `tally replay --from-topic` feeds another topic into the pipeline; replaying it again, whole
/// or a range of some partitions, counts nothing twice (the aggregator drops the duplicates).
#[test]
fn tally_replay_feeds_another_topic_in_once() {
    if servers::skip_without_servers(false) {
        return;
    }
    let target = Pipeline::shared();
    // The source: another topic on the same broker, fed by an ingest process.
    let source = unique_name("replay_source");
    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("migrate")
        .envs(target.b.env())
        .env("TALLY_KAFKA_TOPIC", &source)
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let ingest = target.start_with("ingest", &[("TALLY_KAFKA_TOPIC", &source)]);
    let (body, want) = batch("src", 2_000, 25);
    assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
    drop(ingest);
    let _aggregator = target.start("aggregator");
    let replay = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("replay")
            .args(["--from-topic", &source, "--no-progress"])
            .args(extra)
            .envs(target.b.env())
            .env("TALLY_DATA_DIR", target.dir.path())
            .env("TALLY_LOG", "warn")
            .output()
            .expect("tally replay runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let summary = replay(&[]);
    assert!(
        summary.starts_with("read 2000, accepted 2000, duplicates 0, rejected 0"),
        "{summary}"
    );
    target.wait_totals(&want, Duration::from_secs(60));
    // Again, whole and in part: read and appended, never counted twice.
    assert!(replay(&[]).starts_with("read 2000, "));
    let part = replay(&[
        "--partition",
        "0,1",
        "--from-offset",
        "10",
        "--to-offset",
        "60",
    ]);
    assert!(part.starts_with("read 100, "), "{part}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(target.totals(), want);
}

#[test]
fn an_aggregator_killed_mid_flush_restarts_exact() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    // Plain events, and events of a payload meter with dimensions.
    let catalogue = payload_catalogue(p.dir.path());
    let extra = [(catalogue.0, catalogue.1.as_str())];
    let ingest = p.start_with("ingest", &extra);
    let want = Arc::new(Mutex::new(BTreeMap::new()));
    let want_dims = Arc::new(Mutex::new(BTreeMap::new()));
    let done = Arc::new(AtomicBool::new(false));
    let loader = {
        let (want, want_dims, done) = (want.clone(), want_dims.clone(), done.clone());
        let api = ingest.api.clone();
        std::thread::spawn(move || {
            for k in 0..60 {
                let (body, expected) = batch(&format!("kill-{k}"), 500, 50);
                post_until_accepted(&api, &body);
                add(&mut want.lock().unwrap(), &expected);
                if k % 3 == 0 {
                    let (body, expected) = dimensioned_batch(&format!("kill-dims-{k}"), 300, 20);
                    post_until_accepted(&api, &body);
                    add(&mut want_dims.lock().unwrap(), &expected);
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Kill -9 the aggregator over and over while batches are flowing and being written.
    let mut kills = 0;
    while !done.load(Ordering::SeqCst) || kills < 3 {
        let mut aggregator = p.start_with("aggregator", &extra);
        std::thread::sleep(Duration::from_millis(400 + 300 * (kills % 3)));
        aggregator.child.kill().unwrap();
        aggregator.child.wait().unwrap();
        kills += 1;
    }
    loader.join().unwrap();
    let _aggregator = p.start_with("aggregator", &extra);
    let want = want.lock().unwrap().clone();
    p.wait_totals(&want, Duration::from_secs(120));
    // Every customer's usage per dimensions key, exactly once.
    let want_dims = want_dims.lock().unwrap().clone();
    assert_eq!(want_dims.len(), 20 * 9, "20 customers x 9 dimension keys");
    p.wait_for(
        || p.dimension_totals("request_bytes"),
        &want_dims,
        Duration::from_secs(60),
    );
    assert!(kills >= 3);
}

#[test]
fn two_aggregators_share_the_partitions_and_one_dies() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    let ingest = p.start("ingest");
    let mut first = p.start("aggregator");
    let second = p.start("aggregator");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&first, "tally_log_assigned_partitions") < 1.0
        || metric(&second, "tally_log_assigned_partitions") < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the group never shared its partitions"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut want = BTreeMap::new();
    for k in 0..20 {
        let (body, expected) = batch(&format!("pair-{k}"), 500, 64);
        assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
        add(&mut want, &expected);
    }
    p.wait_totals(&want, Duration::from_secs(90));
    // Both members wrote: the partitions were shared between them.
    let written = |proc: &Proc| metric(proc, "tally_aggregator_events_total");
    let (a, b) = (written(&first), written(&second));
    assert!(
        a > 0.0 && b > 0.0,
        "one aggregator did all the work: {a} and {b}"
    );
    assert_eq!(a + b, 10_000.0, "each event written once");
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    for k in 20..40 {
        let (body, expected) = batch(&format!("pair-{k}"), 500, 64);
        assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
        add(&mut want, &expected);
    }
    // The survivor takes the dead member's partitions after the session timeout.
    p.wait_totals(&want, Duration::from_secs(120));
}

#[test]
fn the_broker_restarting_under_load_loses_nothing_acknowledged() {
    if servers::skip_without_servers(true) {
        return;
    }
    let p = Pipeline::new(Kafka::private(), ClickHouse::shared());
    let ingest = p.start("ingest");
    let _aggregator = p.start("aggregator");
    let want = Arc::new(Mutex::new(BTreeMap::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let loader = {
        let (want, refused) = (want.clone(), refused.clone());
        let api = ingest.api.clone();
        std::thread::spawn(move || {
            for k in 0..80 {
                let (body, expected) = batch(&format!("outage-{k}"), 250, 40);
                refused.fetch_add(post_until_accepted(&api, &body), Ordering::SeqCst);
                add(&mut want.lock().unwrap(), &expected);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut kafka = p.b.kafka;
    kafka.stop();
    std::thread::sleep(Duration::from_secs(6));
    kafka.restart();
    loader.join().unwrap();
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "ingest acknowledged batches while the broker was down"
    );
    let p = Pipeline {
        b: Backends { kafka, ..p.b },
        ..p
    };
    let want = want.lock().unwrap().clone();
    p.wait_totals(&want, Duration::from_secs(120));
}

#[test]
fn clickhouse_down_for_a_minute_then_the_aggregator_catches_up() {
    if servers::skip_without_servers(true) {
        return;
    }
    let mut p = Pipeline::new(Kafka::shared(), ClickHouse::private());
    let ingest = p.start("ingest");
    let aggregator = p.start("aggregator");
    let mut want = BTreeMap::new();
    let (body, expected) = batch("ch-before", 500, 30);
    assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
    add(&mut want, &expected);
    p.wait_totals(&want, Duration::from_secs(60));
    p.b.ch.stop();
    for k in 0..10 {
        let (body, expected) = batch(&format!("ch-during-{k}"), 500, 30);
        assert_eq!(ingest.post_batch(body).status().as_u16(), 202);
        add(&mut want, &expected);
    }
    // An aggregator started while ClickHouse is down waits for it too.
    let mut late = p.start("aggregator");
    std::thread::sleep(Duration::from_secs(60));
    // The aggregators waited, they did not give up.
    for a in [&aggregator, &late] {
        let health = reqwest::blocking::get(format!("{}/healthz", a.admin)).unwrap();
        assert_eq!(health.status().as_u16(), 200);
    }
    assert!(
        late.child.try_wait().unwrap().is_none(),
        "the late aggregator exited"
    );
    p.b.ch.restart();
    p.wait_totals(&want, Duration::from_secs(120));
}

/// Repeats the enforcer cannot remember by itself are not counted again: events counted
/// before it started, sent again through another ingest process (a client's retry), some from
/// two hours back (`tally replay` of old events). The enforcer asks ClickHouse where each was
/// first counted; it and the aggregator agree.
#[test]
fn enforcer_repeats_older_than_its_memory_count_once() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    let ingest = p.start("ingest");
    let _aggregator = p.start("aggregator");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut want = BTreeMap::new();
    let events: Vec<Value> = (0..200)
        .map(|i| {
            let customer = format!("rep-{}", i % 5);
            *want.entry(customer.clone()).or_insert(0u64) += 2;
            let minutes_ago = if i % 2 == 0 { 120 } else { 1 };
            json!({"specversion": "1.0", "id": format!("rep-{i}"), "source": "edge-1",
                   "type": "api_requests", "subject": customer,
                   "time": tally_schemas::period::rfc3339(now - minutes_ago * 60_000),
                   "data": {"value": 2}})
        })
        .collect();
    let body = Value::Array(events).to_string();
    assert_eq!(ingest.post_batch(body.clone()).status().as_u16(), 202);
    p.wait_totals(&want, Duration::from_secs(60));
    let enforcer = p.start("enforcer");
    let client = servers::client();
    let seen = |c: &str| {
        usage(
            &client,
            format!(
                "{}/v1/check?customer={c}&meter=api_requests&quantity=0",
                enforcer.api
            ),
        )
    };
    let wait_seen = |c: &str, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen(c) != want {
            assert!(
                Instant::now() < deadline,
                "enforcer sees {} for {c}, want {want}",
                seen(c)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for (c, v) in &want {
        wait_seen(c, *v);
    }
    // The same events through another ingest process, whose memory holds none of them, then
    // one new event: once the enforcer counted it, it has read past the repeats.
    let other = p.start("ingest");
    assert_eq!(other.post_batch(body).status().as_u16(), 202);
    let marker = json!([{"specversion": "1.0", "id": "rep-marker", "source": "edge-1",
        "type": "api_requests", "subject": "rep-0", "data": {"value": 1}}]);
    assert_eq!(other.post_batch(marker.to_string()).status().as_u16(), 202);
    *want.get_mut("rep-0").unwrap() += 1;
    p.wait_totals(&want, Duration::from_secs(60));
    wait_seen("rep-0", want["rep-0"]);
    for (c, v) in &want {
        assert_eq!(seen(c), *v, "the enforcer counted repeats of {c}");
    }
    assert!(metric(&enforcer, "tally_enforcer_repeats_skipped_total") >= 200.0);
}

/// A meter created through one process's API reaches the others without a restart: ingest in
/// another process accepts its events within `meters_refresh`, an aggregator in a third counts
/// them by dimension, and the enforcer knows the meter.
#[test]
fn a_meter_created_in_one_process_reaches_the_others_within_seconds() {
    if servers::skip_without_servers(false) {
        return;
    }
    let p = Pipeline::shared();
    let fast = [("TALLY_METERS_REFRESH", "500ms")];
    let ingest = p.start_with("ingest", &fast);
    let aggregator = p.start_with("aggregator", &fast);
    let enforcer = p.start_with("enforcer", &fast);
    let client = servers::client();
    let made = client
        .post(format!("{}/v1/meters", enforcer.api))
        .json(&json!({
            "name": "llm_tokens", "aggregation": "sum", "unit": "tokens",
            "event_type": "llm.call", "value": "$.tokens", "group_by": {"model": "$.model"}
        }))
        .send()
        .unwrap();
    assert_eq!(made.status().as_u16(), 201, "{}", made.text().unwrap());
    let created = Instant::now();
    let events: Vec<Value> = (0..60u64)
        .map(|i| {
            let model = ["m1", "m2"][(i % 2) as usize];
            json!({"specversion": "1.0", "id": format!("llm-{i}"), "source": "edge-1",
                   "type": "llm.call", "subject": format!("cust-{}", i % 3),
                   "data": {"tokens": 100 + i, "model": model}})
        })
        .collect();
    let mut want = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let model = e["data"]["model"].as_str().unwrap();
        *want
            .entry(format!("cust-{} {{\"model\":\"{model}\"}}", i % 3))
            .or_insert(0) += 100 + i as u64;
    }
    let body = Value::Array(events).to_string();
    // Until ingest has read the meter, its events are refused as of an unknown meter (nothing
    // is accepted); then all of them are.
    loop {
        let r = client
            .post(format!("{}/v1/events", ingest.api))
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.clone())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let b: Value = r.json().unwrap();
        if status == 202 {
            assert_eq!(b["accepted"], 60, "{b}");
            break;
        }
        assert_eq!(
            (status, b["errors"][0]["code"].as_str()),
            (400, Some("unknown_meter")),
            "{b}"
        );
        assert!(
            created.elapsed() < Duration::from_secs(10),
            "ingest did not learn the meter"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_for(
        || p.dimension_totals("llm_tokens"),
        &want,
        Duration::from_secs(60),
    );
    let total: u64 = want
        .iter()
        .filter(|(k, _)| k.starts_with("cust-0 "))
        .map(|(_, v)| v)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while usage(
        &client,
        format!("{}/v1/check?customer=cust-0&meter=llm_tokens", enforcer.api),
    ) != total
    {
        assert!(
            Instant::now() < deadline,
            "the enforcer never counted the new meter"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, m): (u16, Value) = {
        let r = client
            .get(format!("{}/v1/meters/llm_tokens", aggregator.api))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    assert_eq!(m["source"], "api", "{m}");
}
