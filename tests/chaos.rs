//! Chaos: the distributed pipeline (two ingest, two aggregator, one enforcer and one
//! billing-sync process, on a private Kafka-compatible broker and a private ClickHouse, reporting
//! to the Stripe fake) under steady load while processes are SIGKILLed at random moments (at
//! least 20 kills, every kind of component), the broker restarts once and ClickHouse is down for
//! 60 s. Then: every event that got a 202 is counted exactly once in ClickHouse, the enforcer's
//! totals match, and the Stripe fake holds exactly those totals.
//!
//! Bounded: about 2 minutes of chaos, then up to 3 minutes to converge.
//!
//! What it found, and what fixed it: ClickHouse cannot check a partition's stored position and
//! write in one transaction, so two aggregators writing one partition (a rebalance, a write
//! landing after its check) counted records twice or lost some, and the Kafka reader's seeks
//! could leave records out of order. Blocks (`aggregator/src/blocks.rs`, the furthest write of
//! a block wins) and exact seeks fixed both. `TALLY_CHAOS_DIR` keeps every process's log.

mod common;
#[path = "servers/mod.rs"]
mod servers;
#[path = "stripe_fake/mod.rs"]
mod stripe_fake;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::free_port;
use serde_json::{Value, json};
use servers::{Backends, ClickHouse, Kafka};
use stripe_fake::StripeFake;

const CUSTOMERS: usize = 20;

/// One component process, restartable on the same ports.
struct Slot {
    command: &'static str,
    api: u16,
    admin: u16,
    child: Option<Child>,
}

impl Slot {
    fn spawn(&mut self, env: &[(String, String)], data: &std::path::Path) {
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg(self.command)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TALLY_DATA_DIR", data)
            .env("TALLY_LISTEN", format!("127.0.0.1:{}", self.api))
            .env("TALLY_ADMIN_LISTEN", format!("127.0.0.1:{}", self.admin))
            .env("TALLY_FLUSH_INTERVAL", "100ms")
            .env("TALLY_LOG", "info")
            .stdout(log_file(data))
            .stderr(log_file(data))
            .spawn()
            .expect("tally starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again if it exited by itself, as a supervisor such as Kubernetes
    /// does (components wait for an unreachable ClickHouse at start-up, but a pipeline task
    /// that fails, for example on a broker error, stops the process).
    fn supervise(&mut self, env: &[(String, String)], data: &std::path::Path) -> bool {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        };
        if exited {
            self.spawn(env, data);
        }
        exited
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The process's log (appended across restarts), kept in its data directory.
fn log_file(data: &std::path::Path) -> Stdio {
    std::fs::create_dir_all(data).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("tally.log"))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// A tiny deterministic generator (xorshift), so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Waits until `diff` finds nothing (an empty list), keeping every process running; panics
/// with the differences and each process's last log lines after `timeout`.
fn converge(
    what: &str,
    timeout: Duration,
    slots: &mut [Slot],
    env: &[(String, String)],
    dir: &std::path::Path,
    mut diff: impl FnMut() -> Vec<String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let d = diff();
        if d.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            print_log_tails(slots, dir);
            panic!("{what} did not converge: {d:?}");
        }
        for (j, s) in slots.iter_mut().enumerate() {
            s.supervise(env, &dir.join(format!("p{j}")));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Prints each process's last log lines (for a failing run).
fn print_log_tails(slots: &[Slot], dir: &std::path::Path) {
    for (j, s) in slots.iter().enumerate() {
        let log = std::fs::read_to_string(dir.join(format!("p{j}/tally.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        eprintln!("{} (p{j}) last log lines: {tail:#?}", s.command);
    }
}

/// The customers whose `got` differs from `want`.
fn differences(got: &BTreeMap<String, u64>, want: &BTreeMap<String, u64>) -> Vec<String> {
    want.iter()
        .filter(|(c, v)| got.get(*c) != Some(v))
        .map(|(c, v)| format!("{c}: {:?}, acknowledged {v}", got.get(c)))
        .chain(
            got.keys()
                .filter(|c| !want.contains_key(*c))
                .map(|c| format!("{c}: never acknowledged")),
        )
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn kills_a_broker_restart_and_a_clickhouse_outage_lose_and_double_nothing() {
    if servers::skip_without_servers(true) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let b = Backends::new(Kafka::private(), ClickHouse::private());
    // Process logs stay in TALLY_CHAOS_DIR when set (for a failing run), else a temporary one.
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = std::env::var_os("TALLY_CHAOS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let dir = dir_path.as_path();
    let mut env: Vec<(String, String)> = b
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (k, v) in [
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally"),
        ("TALLY_STRIPE_API_BASE", fake.url.as_str()),
        ("TALLY_BILLING_SYNC_INTERVAL", "500ms"),
        ("TALLY_BILLING_SYNC_SETTLE", "1s"),
    ] {
        env.push((k.into(), v.into()));
    }
    let mut slots: Vec<Slot> = [
        "ingest",
        "ingest",
        "aggregator",
        "aggregator",
        "enforcer",
        "billing-sync",
    ]
    .into_iter()
    .map(|command| Slot {
        command,
        api: free_port(),
        admin: free_port(),
        child: None,
    })
    .collect();
    for (i, s) in slots.iter_mut().enumerate() {
        s.spawn(&env, &dir.join(format!("p{i}")));
    }
    let client = servers::client_builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let enforcer = slots[4].url();
    wait_until("the enforcer is ready", Duration::from_secs(60), || {
        client
            .get(format!("http://127.0.0.1:{}/readyz", slots[4].admin))
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    for c in 0..CUSTOMERS {
        let r = client
            .put(format!("{enforcer}/v1/customers/x-{c}"))
            .json(&json!({"plan": "enterprise", "stripe_customer_id": format!("cus_x{c}")}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }

    // Steady load: batches of 100 events over the customers, each posted (to either ingest
    // process) until one answers 202, as an edge node does; only acknowledged batches count.
    let acked = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    // Why posts were retried: "503" or the client error, with counts.
    let retries = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let ingest_urls = [slots[0].url(), slots[1].url()];
    let loader = {
        let (acked, stop, batches) = (acked.clone(), stop.clone(), batches.clone());
        let retries = retries.clone();
        let client = client.clone();
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut want = BTreeMap::new();
                let events: Vec<Value> = (0..100)
                    .map(|i| {
                        let customer = format!("x-{}", (k as usize * 7 + i) % CUSTOMERS);
                        let value = 1 + (i as u64 % 5);
                        *want.entry(customer.clone()).or_insert(0) += value;
                        json!({"specversion": "1.0", "id": format!("chaos-{k}-{i}"),
                               "source": "edge-chaos", "type": "api_requests",
                               "subject": customer, "data": {"value": value}})
                    })
                    .collect();
                let body = Value::Array(events).to_string();
                let mut attempt = 0;
                loop {
                    let url = &ingest_urls[(k as usize + attempt) % 2];
                    attempt += 1;
                    let sent = client
                        .post(format!("{url}/v1/events"))
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body.clone())
                        .send();
                    let why = match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            assert!(status == 202 || status == 503, "a valid batch got {status}");
                            if status == 202 {
                                break;
                            }
                            status.to_string()
                        }
                        Err(e) if e.is_timeout() => "timeout".to_owned(),
                        Err(e) if e.is_connect() => "connect".to_owned(),
                        Err(_) => "other error".to_owned(),
                    };
                    *retries.lock().unwrap().entry(why).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut a = acked.lock().unwrap();
                for (c, v) in want {
                    *a.entry(c).or_insert(0) += v;
                }
                drop(a);
                batches.fetch_add(1, Ordering::SeqCst);
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Chaos: a kill every 3 s (the process restarts a moment later), the broker restarted at
    // 15 s, ClickHouse down from 40 s to 100 s.
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut kafka = b.kafka;
    let mut ch = b.ch;
    let started = Instant::now();
    let mut kills: BTreeMap<&'static str, u32> = BTreeMap::new();
    let (mut broker_restarted, mut ch_down, mut ch_back) = (false, false, false);
    let mut round = 0u64;
    // Processes that exited by themselves and were started again.
    let mut restarts: BTreeMap<&'static str, u32> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(110) {
        std::thread::sleep(Duration::from_millis(2_000 + rng.below(2_000)));
        let t = started.elapsed();
        if !broker_restarted && t > Duration::from_secs(15) {
            kafka.stop();
            std::thread::sleep(Duration::from_secs(3));
            kafka.restart();
            broker_restarted = true;
        }
        if !ch_down && t > Duration::from_secs(40) {
            ch.stop();
            ch_down = true;
        }
        if ch_down && !ch_back && t > Duration::from_secs(100) {
            ch.restart();
            ch_back = true;
        }
        // Every kind in turn first, then at random.
        let i = if round < 6 {
            round as usize
        } else {
            rng.below(slots.len() as u64) as usize
        };
        round += 1;
        let slot = &mut slots[i];
        slot.kill();
        *kills.entry(slot.command).or_default() += 1;
        std::thread::sleep(Duration::from_millis(rng.below(1_500)));
        slot.spawn(&env, &dir.join(format!("p{i}")));
        for (j, s) in slots.iter_mut().enumerate() {
            if s.supervise(&env, &dir.join(format!("p{j}"))) {
                *restarts.entry(s.command).or_default() += 1;
            }
        }
    }
    if !ch_back {
        ch.restart();
    }
    stop.store(true, Ordering::SeqCst);
    // The loader finishes the batch in hand (posting until a 202); processes that exit by
    // themselves meanwhile are started again, as a supervisor does.
    let finishing = Instant::now();
    while !loader.is_finished() {
        if finishing.elapsed() > Duration::from_secs(120) {
            print_log_tails(&slots, dir);
            panic!(
                "no ingest process acknowledged the last batch within 120 s of the chaos; \
                 retries: {:?}",
                retries.lock().unwrap()
            );
        }
        for (j, s) in slots.iter_mut().enumerate() {
            if s.supervise(&env, &dir.join(format!("p{j}"))) {
                *restarts.entry(s.command).or_default() += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    loader.join().unwrap();
    // Until everything runs again (a process started while ClickHouse was down may have exited).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(20) {
        for (j, s) in slots.iter_mut().enumerate() {
            if s.supervise(&env, &dir.join(format!("p{j}"))) {
                *restarts.entry(s.command).or_default() += 1;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let total_kills: u32 = kills.values().sum();
    assert!(total_kills >= 20, "{kills:?}");
    for kind in ["ingest", "aggregator", "enforcer", "billing-sync"] {
        assert!(
            kills.get(kind).copied().unwrap_or(0) >= 1,
            "{kind}: {kills:?}"
        );
    }
    let want = acked.lock().unwrap().clone();
    assert!(batches.load(Ordering::SeqCst) > 50, "too little load");

    // ClickHouse: every acknowledged event exactly once.
    let db = env
        .iter()
        .find(|(k, _)| k == "TALLY_CLICKHOUSE_DATABASE")
        .map(|(_, v)| v.clone())
        .unwrap();
    let ch_totals = || -> BTreeMap<String, u64> {
        ch.query(&format!(
            "SELECT customer, sum(value) FROM {db}.usage_block_cells FINAL
             WHERE meter = 'api_requests' GROUP BY customer FORMAT TSV"
        ))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (c, v) = l.split_once('\t')?;
            Some((c.to_owned(), v.parse().ok()?))
        })
        .collect()
    };
    converge(
        "ClickHouse's totals",
        Duration::from_secs(180),
        &mut slots,
        &env,
        dir,
        || {
            let got = ch_totals();
            for (c, v) in &got {
                let acked = want.get(c).copied().unwrap_or(0);
                if *v > acked {
                    // The customer's batches, to see which ranges overlap.
                    let batches = ch.query(&format!(
                        "SELECT partition, batch_first_offset, batch_next_offset, count(),
                                sum(value) FROM {db}.usage_block_cells FINAL WHERE customer = '{c}'
                         GROUP BY partition, batch_first_offset, batch_next_offset
                         ORDER BY batch_first_offset FORMAT TSV"
                    ));
                    panic!(
                        "{c} counted twice in ClickHouse: {v}, acknowledged {acked}; \
                         its batches (partition, first, next, cells, usage):\n{batches:?}"
                    );
                }
            }
            differences(&got, &want)
        },
    );
    // The enforcer: the same totals.
    let enforcer_totals = || -> BTreeMap<String, u64> {
        (0..CUSTOMERS)
            .filter_map(|c| {
                let v: Value = client
                    .get(format!(
                        "{enforcer}/v1/check?customer=x-{c}&meter=api_requests&quantity=0"
                    ))
                    .send()
                    .ok()?
                    .json()
                    .ok()?;
                Some((format!("x-{c}"), v["usage"].as_u64()?))
            })
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    converge(
        "the enforcer's totals",
        Duration::from_secs(60),
        &mut slots,
        &env,
        dir,
        || differences(&enforcer_totals(), &want),
    );
    // Stripe: exactly those totals, per Stripe customer.
    let stripe_want: BTreeMap<(String, String), u64> = want
        .iter()
        .map(|(c, v)| ((c.replace("x-", "cus_x"), "api_requests".to_owned()), *v))
        .collect();
    converge(
        "Stripe's totals",
        Duration::from_secs(90),
        &mut slots,
        &env,
        dir,
        || {
            let got = fake.totals();
            if got == stripe_want {
                vec![]
            } else {
                vec![format!("Stripe holds {got:?}")]
            }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ch_totals(), want, "ClickHouse, settled");
    assert_eq!(enforcer_totals(), want, "the enforcer, settled");
    assert_eq!(
        fake.totals(),
        stripe_want,
        "Stripe, settled: nothing reported twice"
    );
    println!(
        "chaos: {} batches acknowledged, kills {kills:?}, exits restarted {restarts:?}, \
         posts retried {:?}, broker restarted once, ClickHouse down 60 s",
        batches.load(Ordering::SeqCst),
        retries.lock().unwrap()
    );
}
