//! Memory per (customer, meter) counter in the enforcer, measured with 10M counters.
//! Run: `cargo bench --bench enforcer_memory` (see benches/README.md).
//!
//! Each scenario runs in its own process so that resident memory is measured from a clean
//! start: the state is filled through the same `apply` path the log follower uses, and the
//! growth of the process's resident set is divided by the number of counters in use.

use std::process::Command;
use std::sync::Arc;

use tally_enforcer::state::State;
use tally_schemas::{Catalog, ManualClock, UsageEvent};

/// The allocator of the `tally` binary, so the figures are the ones it has.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_795_255_200_000;
const COUNTERS: usize = 10_000_000;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss");
    pages * 4096
}

fn scenario(meters_per_customer: usize) {
    let catalog = Arc::new(Catalog::builtin());
    let meters: Vec<String> = catalog
        .meters
        .keys()
        .take(meters_per_customer)
        .cloned()
        .collect();
    let state = State::new(catalog, Arc::new(ManualClock::new(NOW)), true);
    let customers = COUNTERS / meters_per_customer;
    let before = resident_bytes();
    let started = std::time::Instant::now();
    let mut notes = Vec::new();
    for c in 0..customers {
        let customer = format!("cust_{c:08}");
        for m in &meters {
            let e = UsageEvent {
                id: String::new(),
                source: String::new(),
                customer: customer.clone(),
                meter: m.clone(),
                value: 1,
                time_ms: NOW,
                received_ms: NOW,
                readings: Vec::new(),
            };
            state.apply(&e, &mut notes);
        }
        notes.clear();
    }
    let grown = resident_bytes().saturating_sub(before);
    let counters = customers * meters.len();
    println!(
        "| {} meters per customer | {customers} | {counters} | {:.0} MiB | {:.1} | {:.1} s |",
        meters.len(),
        grown as f64 / 1_048_576.0,
        grown as f64 / counters as f64,
        started.elapsed().as_secs_f64()
    );
    if let Ok(path) = std::env::var("BENCH_RESULTS") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("results file");
        writeln!(
            f,
            "memory.bytes_per_counter.{}\t{:.1}",
            meters.len(),
            grown as f64 / counters as f64
        )
        .expect("results file");
    }
    assert_eq!(state.customers_len(), customers);
}

fn main() {
    if let Ok(n) = std::env::var("TALLY_MEMORY_SCENARIO") {
        scenario(n.parse().expect("meters per customer"));
        return;
    }
    println!(
        "| scenario | customers | counters in use | resident growth | bytes per counter | fill time |"
    );
    println!("|---|---|---|---|---|---|");
    let me = std::env::current_exe().expect("own path");
    for meters in [7, 3, 1] {
        let status = Command::new(&me)
            .env("TALLY_MEMORY_SCENARIO", meters.to_string())
            .status()
            .expect("scenario runs");
        assert!(status.success());
    }
}
