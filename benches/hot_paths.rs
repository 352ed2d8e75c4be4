//! Hot paths, no I/O: parse + validate + encode of events, roll-up, quota decisions.
//! Run: `cargo bench --bench hot_paths` (see benches/README.md).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tally_backends::log::Record;
use tally_enforcer::state::{Question, State};
use tally_schemas::event::{decode_batch, decode_event};
use tally_schemas::rollup::Rollup;
use tally_schemas::{Catalog, ManualClock, TimePolicy, UsageEvent, wire};

/// The allocator of the `tally` binary, so the figures are the ones it has.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

fn event_json(i: usize) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"evt-{i:010}","source":"edge-fra-1","type":"api_requests","subject":"cust_{:06}","time":"2026-11-21T09:59:{:02}Z","data":{{"value":{}}}}}"#,
        i % 100_000,
        i % 60,
        1 + i % 7
    )
}

fn parse(c: &mut Criterion) {
    let catalog = Catalog::builtin();
    let policy = TimePolicy::default();
    let one = event_json(42);
    let mut g = c.benchmark_group("parse_validate_encode");
    g.throughput(Throughput::Elements(1));
    // Baseline measured in the same run: a generic JSON parse of the same text, so that the
    // figures below can be read as a ratio whatever the machine's speed today.
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            black_box(serde_json::from_str::<serde_json::Value>(black_box(&one)).expect("json"))
        })
    });
    g.bench_function("single_event", |b| {
        let mut buf = Vec::with_capacity(256);
        b.iter(|| {
            let e = decode_event(black_box(&one), &catalog, &policy, NOW).expect("valid");
            buf.clear();
            wire::encode_into(&e, &mut buf);
            black_box(&buf);
        })
    });
    let batch = format!(
        "[{}]",
        (0..1_000).map(event_json).collect::<Vec<_>>().join(",")
    );
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("batch_of_1000", |b| {
        let mut buf = Vec::with_capacity(256 * 1_000);
        b.iter(|| {
            buf.clear();
            for e in
                decode_batch(black_box(&batch), &catalog, &policy, NOW, usize::MAX).expect("array")
            {
                wire::encode_into(&e.expect("valid"), &mut buf);
            }
            black_box(&buf);
        })
    });
    g.finish();
}

fn records(n: usize, customers: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            partition: 0,
            offset: i as u64,
            event: UsageEvent {
                id: format!("evt-{i}"),
                source: "edge".into(),
                customer: format!("cust_{:06}", i % customers),
                meter: if i % 4 == 0 {
                    "bandwidth_bytes"
                } else {
                    "api_requests"
                }
                .into(),
                value: 1 + (i % 7) as u64,
                time_ms: NOW - (i as i64 % 600) * 1_000,
                received_ms: NOW,
                readings: Vec::new(),
            },
        })
        .collect()
}

fn rollup(c: &mut Criterion) {
    let catalog = Catalog::builtin();
    let recs = records(10_000, 1_000);
    let mut g = c.benchmark_group("rollup");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.bench_function("10k_events_1k_customers", |b| {
        b.iter(|| black_box(Rollup::from_records(black_box(&recs), &catalog)))
    });
    g.finish();
}

/// A meter over the payload with three dimensions, beside the built-in plain meters.
const DIMENSIONED: &str = include_str!("fixtures/request_bytes.toml");

fn dimensioned_json(i: usize) -> String {
    let region = ["eu", "us", "ap", "sa"][i % 4];
    let model = ["m1", "m2", "m3", "m4", "m5"][i % 5];
    format!(
        r#"{{"specversion":"1.0","id":"evt-{i:010}","source":"edge-fra-1","type":"request","subject":"cust_{:06}","time":"2026-11-21T09:59:{:02}Z","data":{{"bytes":{},"region":"{region}","model":"{model}","route":"/r{}"}}}}"#,
        i % 100_000,
        i % 60,
        1 + i % 7,
        i % 10
    )
}

/// Ingest's decode and the aggregator's roll-up of events with three dimensions, against
/// today's plain meters in the same run (issue: >= 0.8x).
fn dimensions(c: &mut Criterion) {
    let catalog = Catalog::from_toml(&format!(
        "{}\n{DIMENSIONED}",
        tally_schemas::catalog::DEFAULT_CATALOG_TOML
    ))
    .expect("catalogue");
    let policy = TimePolicy::default();
    let batch =
        |f: fn(usize) -> String| format!("[{}]", (0..1_000).map(f).collect::<Vec<_>>().join(","));
    let (plain, dimensioned) = (batch(event_json), batch(dimensioned_json));
    let mut g = c.benchmark_group("dimensions");
    g.throughput(Throughput::Elements(1_000));
    for (name, body) in [
        ("decode_plain_batch_of_1000", &plain),
        ("decode_three_dimensions_batch_of_1000", &dimensioned),
    ] {
        g.bench_function(name, |b| {
            let mut buf = Vec::with_capacity(256 * 1_000);
            b.iter(|| {
                buf.clear();
                for e in decode_batch(black_box(body), &catalog, &policy, NOW, usize::MAX)
                    .expect("array")
                {
                    wire::encode_into(&e.expect("valid"), &mut buf);
                }
                black_box(&buf);
            })
        });
    }
    let records = |body: &str| -> Vec<Record> {
        (0..10)
            .flat_map(|round| {
                decode_batch(body, &catalog, &policy, NOW, usize::MAX)
                    .expect("array")
                    .into_iter()
                    .enumerate()
                    .map(move |(i, e)| (round * 1_000 + i, e))
            })
            .map(|(i, e)| Record {
                partition: 0,
                offset: i as u64,
                event: e.expect("valid"),
            })
            .collect()
    };
    let (plain, dimensioned) = (records(&plain), records(&dimensioned));
    g.throughput(Throughput::Elements(plain.len() as u64));
    for (name, recs) in [
        ("rollup_plain_10k", &plain),
        ("rollup_three_dimensions_10k", &dimensioned),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(Rollup::from_records(black_box(recs), &catalog)))
        });
    }
    g.finish();
}

fn decide(c: &mut Criterion) {
    let catalog = Arc::new(Catalog::builtin());
    let state = State::new(catalog, Arc::new(ManualClock::new(NOW)), true);
    state.set_ready();
    let recs = records(200_000, 100_000);
    let mut notes = Vec::new();
    for r in &recs {
        state.apply(&r.event, &mut notes);
    }
    let names: Vec<String> = (0..100_000).map(|i| format!("cust_{i:06}")).collect();
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("check_100k_customers", |b| {
        b.iter(|| {
            i = (i + 7_919) % names.len();
            black_box(state.check(Question {
                customer: &names[i],
                meter: "api_requests",
                quantity: 0,
                passing: false,
            }))
        })
    });
    // Quota only (quantity 0 is a status query: the plan's rate limit does not apply).
    let mut j = 0usize;
    g.bench_function("check_hot_1k_customers", |b| {
        b.iter(|| {
            j = (j + 7_919) % 1_000;
            black_box(state.check(Question {
                customer: &names[j],
                meter: "api_requests",
                quantity: 0,
                passing: false,
            }))
        })
    });
    // Quota and the plan's token bucket; in this tight loop most checks find the bucket empty.
    g.bench_function("check_hot_1k_customers_rate_limited", |b| {
        b.iter(|| {
            j = (j + 7_919) % 1_000;
            black_box(state.check(Question {
                customer: &names[j],
                meter: "api_requests",
                quantity: 1,
                passing: false,
            }))
        })
    });
    let events: Vec<UsageEvent> = records(1_000, 100_000)
        .into_iter()
        .map(|r| r.event)
        .collect();
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply_1000_events", |b| {
        b.iter_batched(
            || events.clone(),
            |evs| {
                for e in &evs {
                    state.apply(e, &mut notes);
                }
                notes.clear();
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The access layer on the check route: the same request through a router with an empty
/// handler, without the layer (baseline) and with it and a `check` key (hash, lookup, scope).
fn access(c: &mut Criterion) {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use tally::auth::{KeyGrant, KeyRing, Scope};
    use tower::ServiceExt;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        tally_backends::store::sqlite::SqliteStore::open(dir.path().join("usage.db")).unwrap(),
    );
    let ring = Arc::new(KeyRing::new(
        store,
        Arc::new(ManualClock::new(NOW)),
        None,
        false,
        1_000,
    ));
    let grant = KeyGrant {
        name: "bench".into(),
        scopes: vec![Scope::Check],
        ..KeyGrant::default()
    };
    let key = rt.block_on(ring.create(&grant)).unwrap().key;
    let bare = axum::Router::new().route("/v1/check", get(|| async { "ok" }));
    let guarded = bare.clone().layer(axum::middleware::from_fn_with_state(
        ring,
        tally::auth::require,
    ));
    let request = || {
        Request::get("/v1/check?customer=cust_000042&meter=api_requests")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let mut g = c.benchmark_group("access");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_router_without_keys", |b| {
        b.iter(|| rt.block_on(bare.clone().oneshot(request())).unwrap())
    });
    g.bench_function("router_with_check_key", |b| {
        b.iter(|| {
            let resp = rt.block_on(guarded.clone().oneshot(request())).unwrap();
            assert_eq!(resp.status(), 200);
            resp
        })
    });
    g.finish();
}

criterion_group!(benches, parse, rollup, dimensions, decide, access);
criterion_main!(benches);
