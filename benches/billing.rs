//! Billing-sync reporting 100,000 customers x 3 meters through Stripe's v2 meter event stream,
//! against the Stripe-compatible fake of the tests, with a configured request limit:
//! `cargo run --release --example billing [-- LIMIT ...]` (default limits: 100 and 1000
//! requests per second).
//!
//! The store is the embedded one. Its customer table is filled directly in one transaction
//! (through the API it would take one durable write per customer, which is not what is
//! measured here); usage goes through the store's normal write. Then billing-sync runs in this
//! process until the fake holds every event. Reported: the time against the ideal
//! `requests / limit`, the peak number of stream requests in any one second (must not exceed
//! the limit), and billing-sync's CPU time.

#[path = "../tests/stripe_fake/mod.rs"]
mod stripe_fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_backends::log::Record;
use tally_backends::store::Store;
use tally_backends::store::prelude::*;
use tally_backends::store::sqlite::SqliteStore;
use tally_billing_sync::{BillingSettings, MeterApi, StatusHandle, StripeSettings};
use tally_schemas::rollup::Rollup;
use tally_schemas::{Catalog, Customer, SystemClock, UsageEvent};
use tokio_util::sync::CancellationToken;

const CUSTOMERS: usize = 100_000;
const METERS: [&str; 3] = ["api_requests", "bandwidth_bytes", "build_minutes"];

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() {
    let limits: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let limits = if limits.is_empty() {
        vec![100, 1000]
    } else {
        limits
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let catalog = Arc::new(Catalog::builtin());
    println!(
        "machine: {} cores; {CUSTOMERS} customers x {} meters",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        METERS.len()
    );
    for limit in limits {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        {
            let mut c = rusqlite::Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            let mut customer = Customer::new_default(&catalog);
            for i in 0..CUSTOMERS {
                customer.stripe_customer_id = Some(format!("cus_{i}"));
                tx.execute(
                    "INSERT INTO customers (id, record, updated_ms) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        format!("c-{i}"),
                        serde_json::to_string(&customer).unwrap(),
                        now
                    ],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let records: Vec<Record> = (0..CUSTOMERS * METERS.len())
            .map(|i| Record {
                partition: 0,
                offset: i as u64,
                event: UsageEvent {
                    id: i.to_string(),
                    source: "bench".into(),
                    customer: format!("c-{}", i / METERS.len()),
                    meter: METERS[i % METERS.len()].into(),
                    value: 1 + (i as u64 % 50),
                    time_ms: now - 600_000,
                    received_ms: now - 600_000,
                    readings: Vec::new(),
                },
            })
            .collect();
        rt.block_on(store.apply(&Rollup::from_records(&records, &catalog)))
            .unwrap();
        let fake = stripe_fake::StripeFake::start(&rt);
        let settings = BillingSettings {
            interval: Duration::from_secs(3600),
            settle: Duration::from_secs(1),
            stripe: Some(StripeSettings {
                secret_key: "sk_test_bench".into(),
                api_base: fake.url.clone(),
                requests_per_second: limit,
                timeout: Duration::from_secs(30),
                api: MeterApi::V2,
                events_base: fake.url.clone(),
            }),
            ..BillingSettings::default()
        };
        let shutdown = CancellationToken::new();
        let store: Arc<dyn Store> = Arc::new(store);
        let cpu_before = cpu_seconds();
        let started = Instant::now();
        let task = rt.spawn(tally_billing_sync::run(
            settings,
            tally_backends::catalog::LiveCatalog::fixed((*catalog).clone()),
            store,
            Arc::new(SystemClock),
            StatusHandle::default(),
            shutdown.clone(),
        ));
        let events = records.len();
        while fake.accepted_count() < events {
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "billing-sync did not finish"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        shutdown.cancel();
        let _ = rt.block_on(task);
        let requests = events.div_ceil(stripe_fake::STREAM_BATCH_LIMIT);
        let ideal = requests as f64 / limit as f64;
        let expected: u64 = records.iter().map(|r| r.event.value).sum();
        let reported: u64 = fake.totals().values().sum();
        assert_eq!(reported, expected, "Stripe's total differs from Tally's");
        println!(
            "limit {limit}/s: {events} events in {requests} requests, {elapsed:.1} s \
             (ideal at the limit {ideal:.1} s, ratio {:.2}); peak {} requests in one second; \
             {cpu:.1} CPU s in this process (billing-sync, the fake and the store)",
            elapsed / ideal,
            fake.peak_stream_rate()
        );
    }
}
