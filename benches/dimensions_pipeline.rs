//! The whole pipeline on the embedded default, with plain events against events with three
//! dimensions, in the same run: `TALLY_BIN=<release tally> cargo run --release --example
//! dimensions_pipeline [-- RUNS EVENTS CUSTOMERS]` (default 3 runs of 200,000 events over
//! 10,000 customers each).
//!
//! Each run starts a fresh `tally run` (ingest, aggregator, enforcer and query API in one
//! process, embedded log and store) with the default catalogue plus one payload meter, posts the
//! events as batches of 1,000 from 8 clients, and waits until the aggregator has counted them
//! all. Plain: `api_requests` events (`data.value`). Three dimensions: `request` events read by
//! `request_bytes`, whose quantity is `$.bytes` and whose dimensions are `region`, `model` and
//! `route`. The two kinds alternate, run by run. Reported per kind (median of the runs): ingest
//! events/s (until the last 202), end-to-end events/s (until the aggregator has counted the
//! last), the process's CPU seconds per million events, and the ratio of dimensioned to plain.
//! Each run then checks through the query API that one customer's usage reads back exactly.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_process::{Tally, post_all};

#[path = "tally_process.rs"]
mod tally_process;

const BATCH: usize = 1_000;
const CLIENTS: usize = 8;

/// The payload meter of the dimensioned runs, beside the default catalogue (the same as
/// `benches/hot_paths.rs`'s).
const DIMENSIONED: &str = include_str!("fixtures/request_bytes.toml");

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Plain,
    Dimensioned,
}

impl Kind {
    fn event(self, tag: &str, i: usize, customers: usize) -> Value {
        let (id, subject) = (format!("{tag}-{i}"), format!("cust-{}", i % customers));
        match self {
            Kind::Plain => json!({"specversion": "1.0", "id": id, "source": "edge-bench",
                "type": "api_requests", "subject": subject, "data": {"value": 1}}),
            Kind::Dimensioned => {
                let region = ["eu", "us", "ap", "sa"][i % 4];
                let model = ["m1", "m2", "m3", "m4", "m5"][i % 5];
                json!({"specversion": "1.0", "id": id, "source": "edge-bench",
                    "type": "request", "subject": subject,
                    "data": {"bytes": 1 + i % 7, "region": region, "model": model,
                             "route": format!("/r{}", i % 10)}})
            }
        }
    }

    fn meter(self) -> &'static str {
        match self {
            Kind::Plain => "api_requests",
            Kind::Dimensioned => "request_bytes",
        }
    }

    /// The usage the events of customer `c` add up to, out of `n`.
    fn expected(self, c: usize, n: usize, customers: usize) -> u64 {
        (c..n)
            .step_by(customers)
            .map(|i| match self {
                Kind::Plain => 1,
                Kind::Dimensioned => 1 + (i % 7) as u64,
            })
            .sum()
    }
}

struct Figures {
    ingest: f64,
    end_to_end: f64,
    cpu_per_million: f64,
}

fn run(kind: Kind, run: usize, events: usize, customers: usize) -> Figures {
    let tag = format!("{kind:?}{run}");
    let bodies: Vec<String> = (0..events / BATCH)
        .map(|b| {
            Value::Array(
                (0..BATCH)
                    .map(|i| kind.event(&tag, b * BATCH + i, customers))
                    .collect(),
            )
            .to_string()
        })
        .collect();
    let catalog = tempfile::tempdir().unwrap();
    let path = catalog.path().join("catalog.toml");
    let text = format!(
        "{}\n{DIMENSIONED}",
        tally_schemas::catalog::DEFAULT_CATALOG_TOML
    );
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let tally = Tally::start("run", &[("TALLY_CATALOG_FILE", path)]);
    let cpu = tally.cpu_seconds();
    let started = Instant::now();
    post_all(&tally.api, bodies, BATCH, CLIENTS);
    let ingested = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    while tally.metric("tally_aggregator_events_total") < events as f64 {
        assert!(Instant::now() < deadline, "the aggregator did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    let counted = started.elapsed().as_secs_f64();
    let cpu = tally.cpu_seconds() - cpu;
    // One customer's usage reads back exactly.
    let c = 7;
    let usage: Value = reqwest::blocking::get(format!(
        "{}/v1/usage?customer=cust-{c}&meter={}",
        tally.api,
        kind.meter()
    ))
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(
        usage["usage"].as_u64(),
        Some(kind.expected(c, events, customers)),
        "{usage}"
    );
    Figures {
        ingest: events as f64 / ingested,
        end_to_end: events as f64 / counted,
        cpu_per_million: cpu / (events as f64 / 1e6),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("RUNS EVENTS"))
        .collect();
    let runs = args.first().copied().unwrap_or(3);
    let events = args.get(1).copied().unwrap_or(200_000) / BATCH * BATCH;
    let customers = args.get(2).copied().unwrap_or(10_000);
    let mut figures: Vec<(Kind, Figures)> = Vec::new();
    for r in 0..runs {
        let order = if r % 2 == 0 {
            [Kind::Plain, Kind::Dimensioned]
        } else {
            [Kind::Dimensioned, Kind::Plain]
        };
        for kind in order {
            let f = run(kind, r, events, customers);
            println!(
                "run {r} {kind:?}: ingest {:.0} events/s, end to end {:.0} events/s, {:.2} CPU s per million",
                f.ingest, f.end_to_end, f.cpu_per_million
            );
            figures.push((kind, f));
        }
    }
    let of = |kind: Kind, pick: fn(&Figures) -> f64| {
        median(
            figures
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, f)| pick(f))
                .collect(),
        )
    };
    println!(
        "| figure (median of {runs} runs of {events} events, {customers} customers) | plain | three dimensions | ratio |"
    );
    println!("|---|---|---|---|");
    for (name, pick, higher_is_better) in [
        (
            "ingest, events/s",
            (|f: &Figures| f.ingest) as fn(&Figures) -> f64,
            true,
        ),
        ("end to end, events/s", |f: &Figures| f.end_to_end, true),
        (
            "CPU s per million events",
            |f: &Figures| f.cpu_per_million,
            false,
        ),
    ] {
        let (p, d) = (of(Kind::Plain, pick), of(Kind::Dimensioned, pick));
        // The ratio reads as dimensioned speed against plain: CPU is inverted.
        let ratio = if higher_is_better { d / p } else { p / d };
        println!("| {name} | {p:.2} | {d:.2} | {ratio:.2}x |");
    }
}
