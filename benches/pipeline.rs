//! The distributed pipeline, measured against real servers (run by `benches/pipeline.sh`, which
//! starts them and passes their addresses):
//!
//! 1. ingest: HTTP batch ingest (`tally ingest`) into the broker, beside a raw librdkafka
//!    producer (rdkafka, the same producer settings) sending the same events, already
//!    serialized, to the same broker. Interleaved, `RUNS` times each; events/s and the ingest
//!    process's CPU seconds per million events.
//! 2. aggregator: a topic preloaded with events, then `tally aggregator` started: events/s until
//!    ClickHouse holds them all, and its CPU seconds per million events.
//! 3. queries: 10M per-minute cells loaded into ClickHouse, then through the query API (p50 /
//!    p99): a customer's current-period summary across meters, one meter's period usage, an
//!    hourly series and a CSV minute export of 7 days, the top 10 customers and the totals per
//!    meter of the month.
//! 4. freshness: under a steady background load, single events for fresh customers; the time
//!    from the 202 until ClickHouse and until the enforcer show them (p50 / p99).
//! 5. growth: how costs grow with customers (1k to 1M, 1M events each: ingest events/s,
//!    aggregator events/s and peak memory, enforcer memory, period-summary latency) and with
//!    stored events (1M to 100M: period-summary latency and aggregator events/s over that many
//!    stored per-minute cells and retained de-duplication ids).
//!
//! The ingest section also runs `tally ingest` on the embedded default (no broker). With
//! `BENCH_RESULTS` set, every figure is also appended to that file as `key<TAB>value` lines
//! (`benches/run.sh` builds its table from them).
//! Environment: `BENCH_KAFKA_FAST` (a broker for produce-only runs), `BENCH_KAFKA` (a broker
//! for runs that consume), `BENCH_CLICKHOUSE` (HTTP URL), `TALLY_BIN` (the release binary).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tally_process::{Tally, cpu_seconds};
use tally_schemas::{UsageEvent, wire};

#[path = "tally_process.rs"]
mod tally_process;

const RUNS: usize = 3;
const BATCH: usize = 1_000;
const INGEST_EVENTS: usize = 200_000;
const CLIENTS: usize = 8;
const AGGREGATOR_EVENTS: usize = 200_000;
const PROBES: usize = 60;
const QUERY_CELLS: usize = 10_000_000;

/// Appends one figure to `BENCH_RESULTS`, when set.
fn result(key: &str, value: f64) {
    use std::io::Write as _;
    if let Ok(path) = std::env::var("BENCH_RESULTS")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{key}\t{value:.3}");
    }
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run benches/pipeline.sh"))
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn settings(brokers: &str, topic: &str, db: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TALLY_KAFKA_BROKERS", brokers.to_owned()),
        ("TALLY_KAFKA_TOPIC", topic.to_owned()),
        ("TALLY_KAFKA_CONSUMER_GROUP", topic.to_owned()),
        ("TALLY_CLICKHOUSE_URL", env("BENCH_CLICKHOUSE")),
        ("TALLY_CLICKHOUSE_DATABASE", db.to_owned()),
        ("TALLY_FLUSH_INTERVAL", "100ms".to_owned()),
    ]
}

fn migrate(env: &[(&str, String)]) {
    let out = Command::new(self::env("TALLY_BIN"))
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn event_json(tag: &str, i: usize, customers: usize) -> Value {
    json!({"specversion": "1.0", "id": format!("{tag}-{i}"), "source": "edge-bench",
           "type": "api_requests", "subject": format!("cust-{}", i % customers),
           "data": {"value": 1}})
}

/// `n` events over 10,000 customers as batch bodies of [`BATCH`].
fn bodies(tag: &str, n: usize) -> Vec<String> {
    bodies_for(tag, n, 10_000)
}

fn bodies_for(tag: &str, n: usize, customers: usize) -> Vec<String> {
    (0..n / BATCH)
        .map(|b| {
            Value::Array(
                (0..BATCH)
                    .map(|i| event_json(tag, b * BATCH + i, customers))
                    .collect(),
            )
            .to_string()
        })
        .collect()
}

/// The same events as the log holds them: (customer key, protobuf bytes).
fn encoded(tag: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    encoded_for(tag, n, 10_000)
}

fn encoded_for(tag: &str, n: usize, customers: usize) -> Vec<(String, Vec<u8>)> {
    let now = now_ms();
    (0..n)
        .map(|i| {
            let e = UsageEvent {
                id: format!("{tag}-{i}"),
                source: "edge-bench".into(),
                customer: format!("cust-{}", i % customers),
                meter: "api_requests".into(),
                value: 1,
                time_ms: now,
                received_ms: now,
                readings: Vec::new(),
            };
            (e.customer.clone(), wire::encode(&e))
        })
        .collect()
}

/// Posts every body with `CLIENTS` concurrent clients; events/s.
fn post_all(api: &str, bodies: Vec<String>) -> f64 {
    tally_process::post_all(api, bodies, BATCH, CLIENTS)
}

/// The raw librdkafka producer: the same settings as Tally's, every event awaited.
async fn raw_produce(brokers: &str, topic: &str, events: &[(String, Vec<u8>)]) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(events.len());
    for (key, payload) in events {
        let d = producer
            .send_result(FutureRecord::to(topic).key(key).payload(payload))
            .map_err(|(e, _)| e)
            .unwrap();
        pending.push(d);
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

fn clickhouse(sql: &str) -> String {
    reqwest::blocking::Client::new()
        .post(env("BENCH_CLICKHOUSE"))
        .body(sql.to_owned())
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits until `aggregator` has written `events` events, then checks that ClickHouse holds
/// `total` in `db`. Polls the aggregator's own counter: polling `sum ... FINAL` over a table of
/// 100M rows would load ClickHouse more than the aggregator does.
fn wait_for_aggregator(aggregator: &Tally, events: usize, db: &str, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while aggregator.metric("tally_aggregator_events_total") < events as f64 {
        assert!(Instant::now() < deadline, "the aggregator did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = clickhouse(&format!(
        "SELECT sum(value) FROM {db}.usage_block_cells FINAL WHERE partition < 1000"
    ));
    match n.trim().parse::<usize>() {
        Ok(n) => assert_eq!(n, total, "ClickHouse total"),
        // Over 100M rows the FINAL read can exceed the server's limits on this machine.
        Err(_) => println!("(ClickHouse total not checked: {})", n.trim()),
    }
}

/// p99 of a customer's current-period total through `GET /v1/usage` (100 requests over
/// `customers` customers), in ms.
fn period_summary_p99(api: &str, customers: usize) -> f64 {
    let client = reqwest::blocking::Client::new();
    let mut lat = Vec::new();
    for q in 0..100 {
        let url = format!(
            "{api}/v1/usage?customer=cust-{}&meter=api_requests",
            (q * 7919) % customers
        );
        let t = Instant::now();
        let r = client.get(url).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    percentile(&mut lat, 0.99)
}

/// Resident memory of a process now, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

const GROWTH_EVENTS: usize = 1_000_000;

/// Costs against the number of customers, each step with [`GROWTH_EVENTS`] events.
fn growth_with_customers(rt: &tokio::runtime::Runtime, fast: &str, durable: &str) {
    println!("## growth with customers ({GROWTH_EVENTS} events per step)");
    println!(
        "| customers | ingest events/s | aggregator events/s | aggregator peak memory | enforcer memory | period summary p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for customers in [1_000, 10_000, 100_000, 1_000_000] {
        let topic = unique("bench_grow_in");
        let env = settings(fast, &topic, "bench");
        migrate(&env[..3]);
        let ingest = Tally::start("ingest", &env[..3]);
        let tag = format!("gi{customers}");
        let ingest_rate = post_all(&ingest.api, bodies_for(&tag, INGEST_EVENTS, customers));
        drop(ingest);

        let topic = unique("bench_grow");
        let db = unique("bench");
        let env = settings(durable, &topic, &db);
        migrate(&env);
        let events = encoded_for(&format!("g{customers}"), GROWTH_EVENTS, customers);
        rt.block_on(raw_produce(durable, &topic, &events));
        drop(events);
        let started = Instant::now();
        let aggregator = Tally::start("aggregator", &env);
        wait_for_aggregator(&aggregator, GROWTH_EVENTS, &db, GROWTH_EVENTS);
        let agg_rate = GROWTH_EVENTS as f64 / started.elapsed().as_secs_f64();
        let agg_mem = peak_rss_mib(aggregator.child.id());
        // The enforcer loads every customer's period total from ClickHouse; ready once loaded
        // and caught up with the topic.
        let enforcer = Tally::start("enforcer", &env);
        let enf_mem = rss_mib(enforcer.child.id());
        let p99 = period_summary_p99(&aggregator.api, customers);
        println!(
            "| {customers} | {ingest_rate:.0} | {agg_rate:.0} | {agg_mem:.0} MiB | {enf_mem:.0} MiB | {p99:.1} ms |"
        );
        for (key, v) in [
            ("ingest_rps", ingest_rate),
            ("aggregator_rps", agg_rate),
            ("aggregator_peak_mib", agg_mem),
            ("enforcer_mib", enf_mem),
            ("period_p99_ms", p99),
        ] {
            result(&format!("growth.customers.{customers}.{key}"), v);
        }
        clickhouse(&format!("DROP DATABASE IF EXISTS {db}"));
    }
}

/// Costs against the number of stored events: 1,000 customers' per-minute cells (one event per
/// cell, the worst case for roll-up) and as many retained de-duplication ids, grown to 1M, 10M
/// and 100M; at each size the period summary's latency and the aggregator's rate on 200,000
/// new events. The synthetic rows sit on partition 1000, which the topic does not have, so they
/// cost space and lookups but never positions.
fn growth_with_events(rt: &tokio::runtime::Runtime, durable: &str) {
    println!("## growth with stored events (1,000 customers)");
    println!("| stored events | period summary p99 | aggregator events/s on top |");
    println!("|---|---|---|");
    let topic = unique("bench_grow_ev");
    let db = unique("bench");
    let env = settings(durable, &topic, &db);
    migrate(&env);
    let now_s = now_ms() / 1000 / 60 * 60;
    let (mut stored, mut on_topic) = (0usize, 0usize);
    for size in [1_000_000usize, 10_000_000, 100_000_000] {
        let add = size - stored;
        // 20 days of minutes per customer, then again with the next batch key.
        clickhouse(&format!(
            "INSERT INTO {db}.usage_block_cells SELECT concat('cust-', toString(number % 1000)),
             'api_requests', toDateTime({now_s} - (intDiv(number, 1000) % 28800) * 60), 1, 0,
             toUInt32(1000), intDiv(number, 28800000) * 1000, intDiv(number, 28800000) * 1000 + 1000
             FROM system.numbers LIMIT {stored}, {add}"
        ));
        clickhouse(&format!(
            "INSERT INTO {db}.event_ids SELECT today(), toUInt32(1000), 'edge-bench',
             concat('synthetic-', toString(number)), number
             FROM system.numbers LIMIT {stored}, {add}"
        ));
        stored = size;
        // Merge the bulk-loaded parts first: a live table's merges follow its ingest rate, not a
        // one-time load of 90M rows.
        clickhouse(&format!("OPTIMIZE TABLE {db}.usage_block_cells FINAL"));
        clickhouse(&format!("OPTIMIZE TABLE {db}.event_ids FINAL"));
        let events = encoded_for(&format!("ge{size}"), AGGREGATOR_EVENTS, 1000);
        rt.block_on(raw_produce(durable, &topic, &events));
        on_topic += AGGREGATOR_EVENTS;
        let started = Instant::now();
        let aggregator = Tally::start("aggregator", &env);
        // This process writes the new events; the topic's events are all on partitions below
        // 1000.
        wait_for_aggregator(&aggregator, AGGREGATOR_EVENTS, &db, on_topic);
        let rate = AGGREGATOR_EVENTS as f64 / started.elapsed().as_secs_f64();
        let p99 = period_summary_p99(&aggregator.api, 1000);
        println!("| {size} | {p99:.1} ms | {rate:.0} |");
        result(&format!("growth.events.{size}.period_p99_ms"), p99);
        result(&format!("growth.events.{size}.aggregator_rps"), rate);
    }
    clickhouse(&format!("DROP DATABASE IF EXISTS {db}"));
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fast = env("BENCH_KAFKA_FAST");
    let durable = env("BENCH_KAFKA");

    // `benches/pipeline.sh ingest,queries` runs only those sections.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .flat_map(|a| a.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let wants = |s: &str| only.is_empty() || only.iter().any(|o| o == s);

    // 1. Ingest beside the raw producer, interleaved.
    if wants("ingest") {
        println!(
            "## ingest into the broker ({INGEST_EVENTS} events per run, batches of {BATCH}, {CLIENTS} clients)"
        );
        let (mut raw, mut tally, mut cpu, mut raw_cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut emb, mut emb_cpu) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let topic = unique("bench_raw");
            let env = settings(&fast, &topic, "bench");
            migrate(&env[..3]);
            let events = encoded(&format!("raw{run}"), INGEST_EVENTS);
            let before = cpu_seconds(std::process::id());
            raw.push(rt.block_on(raw_produce(&fast, &topic, &events)));
            raw_cpu.push((cpu_seconds(std::process::id()) - before) / (INGEST_EVENTS as f64 / 1e6));

            let topic = unique("bench_ingest");
            let env = settings(&fast, &topic, "bench");
            migrate(&env[..3]);
            let ingest = Tally::start("ingest", &env[..3]);
            let bodies = bodies(&format!("ingest{run}"), INGEST_EVENTS);
            let before = ingest.cpu_seconds();
            tally.push(post_all(&ingest.api, bodies));
            cpu.push((ingest.cpu_seconds() - before) / (INGEST_EVENTS as f64 / 1e6));
            drop(ingest);

            // The embedded default: the same bodies into `tally ingest` with no broker.
            let embedded = Tally::start("ingest", &[]);
            let bodies = self::bodies(&format!("embedded{run}"), INGEST_EVENTS);
            let before = embedded.cpu_seconds();
            emb.push(post_all(&embedded.api, bodies));
            emb_cpu.push((embedded.cpu_seconds() - before) / (INGEST_EVENTS as f64 / 1e6));
            println!(
                "run {}: raw producer {:.0} events/s ({:.2} CPU s per million), tally ingest {:.0} events/s ({:.2}x), ingest CPU {:.2} s per million; embedded {:.0} events/s, CPU {:.2} s per million",
                run + 1,
                raw[run],
                raw_cpu[run],
                tally[run],
                tally[run] / raw[run],
                cpu[run],
                emb[run],
                emb_cpu[run]
            );
        }
        let ratios: Vec<f64> = tally.iter().zip(&raw).map(|(t, r)| t / r).collect();
        let m = |v: &[f64]| median(&mut v.to_vec());
        println!(
            "median: raw {:.0}/s ({:.2} CPU s per million), tally {:.0}/s, ratio {:.2}x, ingest CPU {:.2} s per million events; embedded {:.0}/s, CPU {:.2} s per million",
            m(&raw),
            m(&raw_cpu),
            m(&tally),
            m(&ratios),
            m(&cpu),
            m(&emb),
            m(&emb_cpu)
        );
        for (key, v) in [
            ("ingest.raw.rps", &raw),
            ("ingest.raw.cpu_s_per_m", &raw_cpu),
            ("ingest.kafka.rps", &tally),
            ("ingest.kafka.cpu_s_per_m", &cpu),
            ("ingest.ratio", &ratios),
            ("ingest.embedded.rps", &emb),
            ("ingest.embedded.cpu_s_per_m", &emb_cpu),
        ] {
            result(key, m(v));
        }
    }

    // 2. Aggregator throughput from a preloaded topic.
    if wants("aggregator") {
        println!("## aggregator ({AGGREGATOR_EVENTS} events preloaded)");
        let (mut rates, mut agg_cpu, mut cell_rows, mut id_rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut enf_rates, mut enf_cpu) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let topic = unique("bench_agg");
            let db = unique("bench");
            let env = settings(&durable, &topic, &db);
            migrate(&env);
            let events = encoded(&format!("agg{run}"), AGGREGATOR_EVENTS);
            rt.block_on(raw_produce(&durable, &topic, &events));
            let started = Instant::now();
            let aggregator = Tally::start("aggregator", &env);
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let n = clickhouse(&format!(
                    "SELECT sum(value) FROM {db}.usage_block_cells FINAL WHERE customer != ''"
                ));
                if n.trim().parse::<usize>().unwrap_or(0) >= AGGREGATOR_EVENTS {
                    break;
                }
                assert!(Instant::now() < deadline, "the aggregator did not finish");
                std::thread::sleep(Duration::from_millis(50));
            }
            let rate = AGGREGATOR_EVENTS as f64 / started.elapsed().as_secs_f64();
            let cpu = aggregator.cpu_seconds() / (AGGREGATOR_EVENTS as f64 / 1e6);
            // Rows written per million events: usage cells (with the batches' marker rows) and
            // de-duplication ids.
            let per_million = |table: &str| {
                let n: f64 = clickhouse(&format!("SELECT count() FROM {db}.{table}"))
                    .trim()
                    .parse()
                    .unwrap_or(0.0);
                n / (AGGREGATOR_EVENTS as f64 / 1e6)
            };
            cell_rows.push(per_million("usage_block_cells"));
            id_rows.push(per_million("event_ids"));
            // An enforcer on the same topic, with an empty store of its own so that it reads
            // the topic from the start.
            let empty = settings(&durable, &topic, &unique("bench"));
            migrate(&empty);
            let started = Instant::now();
            let enforcer = Tally::start("enforcer", &empty);
            while enforcer.metric("tally_enforcer_events_applied_total") < AGGREGATOR_EVENTS as f64
            {
                assert!(
                    started.elapsed() < Duration::from_secs(600),
                    "the enforcer did not finish"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let enforcer_rate = AGGREGATOR_EVENTS as f64 / started.elapsed().as_secs_f64();
            let enforcer_cpu = enforcer.cpu_seconds() / (AGGREGATOR_EVENTS as f64 / 1e6);
            println!(
                "run {}: {rate:.0} events/s, aggregator CPU {cpu:.2} s per million, {:.0} cell rows and {:.0} id rows per million events; enforcer following the topic {enforcer_rate:.0} events/s, CPU {enforcer_cpu:.2} s per million",
                run + 1,
                cell_rows[run],
                id_rows[run]
            );
            rates.push(rate);
            agg_cpu.push(cpu);
            enf_rates.push(enforcer_rate);
            enf_cpu.push(enforcer_cpu);
        }
        let m = |v: &[f64]| median(&mut v.to_vec());
        println!(
            "median: {:.0} events/s, {:.2} CPU s per million events, {:.0} cell rows and {:.0} id rows per million; enforcer {:.0} events/s, {:.2} CPU s per million",
            m(&rates),
            m(&agg_cpu),
            m(&cell_rows),
            m(&id_rows),
            m(&enf_rates),
            m(&enf_cpu)
        );
        for (key, v) in [
            ("aggregator.rps", &rates),
            ("aggregator.cpu_s_per_m", &agg_cpu),
            ("aggregator.cell_rows_per_m", &cell_rows),
            ("aggregator.id_rows_per_m", &id_rows),
            ("enforcer.follow.rps", &enf_rates),
            ("enforcer.follow.cpu_s_per_m", &enf_cpu),
        ] {
            result(key, m(v));
        }
    }

    // 3. Queries on 10M stored cells (query-time roll-up by ClickHouse).
    if wants("queries") {
        println!("## queries over {QUERY_CELLS} stored per-minute cells (1,000 customers)");
        {
            let topic = unique("bench_query");
            let db = unique("bench");
            let env = settings(&fast, &topic, &db);
            migrate(&env);
            // 10,000 minutes (about a week, ending now) per customer, one batch key per 1M rows.
            let now_min = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                / 60)
                * 60;
            let started = Instant::now();
            clickhouse(&format!(
            "INSERT INTO {db}.usage_block_cells SELECT concat('cust-', toString(number % 1000)),
             'api_requests', toDateTime({now_min} - intDiv(number, 1000) * 60), 1 + number % 7, 0,
             toUInt32(number % 8), intDiv(number, 1000000) * 1000000, intDiv(number, 1000000) * 1000000 + 1000000
             FROM system.numbers LIMIT {QUERY_CELLS}"
        ));
            println!("loaded in {:.1} s", started.elapsed().as_secs_f64());
            let aggregator = Tally::start("aggregator", &env);
            let client = reqwest::blocking::Client::new();
            let from7 = tally_schemas::period::rfc3339(now_min as i64 * 1000 - 7 * 86_400_000);
            // (key, what, path with {c} for the customer)
            let queries = [
                (
                    "period",
                    "current-period summary, every meter (/v1/usage/summary)",
                    "/v1/usage/summary?customer=cust-{c}".to_owned(),
                ),
                (
                    "meter_period",
                    "current-period usage of one meter (/v1/usage)",
                    "/v1/usage?customer=cust-{c}&meter=api_requests".to_owned(),
                ),
                (
                    "hourly",
                    "hourly series, last 7 days",
                    format!(
                        "/v1/usage?customer=cust-{{c}}&meter=api_requests&window=hour&from={from7}"
                    ),
                ),
                (
                    "minute_csv",
                    "minute series, last 7 days, as CSV (10,000 rows, streamed)",
                    format!(
                        "/v1/usage?customer=cust-{{c}}&meter=api_requests&window=minute&from={from7}&format=csv"
                    ),
                ),
                (
                    "top",
                    "top 10 customers this month, over every customer's cells",
                    "/v1/usage/top?meter=api_requests&limit=10".to_owned(),
                ),
                (
                    "totals",
                    "totals per meter this month, over every cell",
                    "/v1/usage/totals".to_owned(),
                ),
            ];
            for (key, name, path) in queries {
                // The scans of every customer are slower: fewer rounds.
                let rounds = if matches!(key, "top" | "totals") {
                    20
                } else {
                    200
                };
                let mut lat = Vec::new();
                for q in 0..rounds {
                    let url = format!(
                        "{}{}",
                        aggregator.api,
                        path.replace("{c}", &((q * 37) % 1000).to_string())
                    );
                    let t = Instant::now();
                    let r = client.get(url).send().unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    r.bytes().unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
                println!("{name}: p50 {p50:.1} ms, p99 {p99:.1} ms ({rounds} requests)");
                result(&format!("query.{key}.p50_ms"), p50);
                result(&format!("query.{key}.p99_ms"), p99);
            }
        }
    }

    // 5. Growth (before freshness, which ends the run).
    if wants("growth") || wants("growth-customers") {
        growth_with_customers(&rt, &fast, &durable);
    }
    if wants("growth") || wants("growth-events") {
        growth_with_events(&rt, &durable);
    }

    // 4. Freshness under load.
    if !wants("freshness") {
        return;
    }
    println!("## freshness ({PROBES} probes under a background load of about 2,000 events/s)");
    let topic = unique("bench_fresh");
    let db = unique("bench");
    let env = settings(&durable, &topic, &db);
    migrate(&env);
    let ingest = Tally::start("ingest", &env);
    let _aggregator = Tally::start("aggregator", &env);
    let enforcer = Tally::start("enforcer", &env);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, api) = (stop.clone(), ingest.api.clone());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = Value::Array(
                    (0..100)
                        .map(|i| event_json(&format!("load{k}"), i, 10_000))
                        .collect(),
                )
                .to_string();
                let _ = client
                    .post(format!("{api}/v1/events"))
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send();
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let client = reqwest::blocking::Client::new();
    let (mut to_ch, mut to_enforcer) = (Vec::new(), Vec::new());
    for probe in 0..PROBES {
        let customer = format!("probe-{probe}");
        let body = json!({"specversion": "1.0", "id": format!("probe-{probe}"), "source": "edge-bench",
                          "type": "api_requests", "subject": customer, "data": {"value": 7}});
        let r = client
            .post(format!("{}/v1/events", ingest.api))
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let accepted = Instant::now();
        let (mut seen_ch, mut seen_enf) = (None, None);
        while seen_ch.is_none() || seen_enf.is_none() {
            if seen_enf.is_none() {
                let v: Value = client
                    .get(format!(
                        "{}/v1/check?customer={customer}&meter=api_requests&quantity=0",
                        enforcer.api
                    ))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                if v["usage"] == 7 {
                    seen_enf = Some(accepted.elapsed());
                }
            }
            if seen_ch.is_none()
                && clickhouse(&format!(
                    "SELECT sum(value) FROM {db}.usage_block_cells WHERE customer = '{customer}'"
                ))
                .trim()
                    == "7"
            {
                seen_ch = Some(accepted.elapsed());
            }
            assert!(accepted.elapsed() < Duration::from_secs(30), "probe lost");
            std::thread::sleep(Duration::from_millis(5));
        }
        to_ch.push(seen_ch.unwrap().as_secs_f64() * 1e3);
        to_enforcer.push(seen_enf.unwrap().as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let figures = [
        ("freshness.clickhouse.p50_ms", percentile(&mut to_ch, 0.5)),
        ("freshness.clickhouse.p99_ms", percentile(&mut to_ch, 0.99)),
        (
            "freshness.enforcer.p50_ms",
            percentile(&mut to_enforcer, 0.5),
        ),
        (
            "freshness.enforcer.p99_ms",
            percentile(&mut to_enforcer, 0.99),
        ),
    ];
    println!(
        "202 -> ClickHouse: p50 {:.0} ms, p99 {:.0} ms; 202 -> enforcer: p50 {:.0} ms, p99 {:.0} ms",
        figures[0].1, figures[1].1, figures[2].1, figures[3].1
    );
    for (key, v) in figures {
        result(key, v);
    }
}
