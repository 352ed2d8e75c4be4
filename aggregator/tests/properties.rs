//! Property: whatever the order in which a set of events arrives, however often each is sent
//! again, and however the log and the aggregator cut it into batches (a batch applied twice, as
//! after a crash before the log's offsets were committed, included), the stored totals are the
//! totals of the distinct events: sums for additive meters, the latest value for gauges.
//!
//! The path is the embedded pipeline's: the log drops repeated (source, id) pairs on append;
//! the aggregator rolls the log's records into batches and writes them to the SQLite store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tally_backends::log::EventLog;
use tally_backends::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use tally_backends::store::Applied;
use tally_backends::store::prelude::*;
use tally_backends::store::sqlite::SqliteStore;
use tally_schemas::rollup::Rollup;
use tally_schemas::{Aggregation, Catalog, ManualClock, UsageEvent};

/// 2026-11-21T10:00:00Z; the period is November.
const NOW: i64 = 1_795_255_200_000;
const NOV: i64 = 1_793_491_200_000;
const METERS: [(&str, Aggregation); 3] = [
    ("api_requests", Aggregation::Count),
    ("bandwidth_bytes", Aggregation::Sum),
    ("wasm_modules", Aggregation::Latest),
];

#[derive(Debug, Clone)]
struct Ev {
    customer: u8,
    meter: usize,
    value: u64,
    /// Minutes before NOW.
    ago: u32,
}

fn event(i: usize, e: &Ev) -> UsageEvent {
    UsageEvent {
        id: format!("e{i}"),
        source: format!("edge-{}", i % 3),
        customer: format!("c{}", e.customer),
        meter: METERS[e.meter].0.into(),
        value: e.value,
        // Distinct times (a gauge's latest value is then unambiguous), all in November.
        time_ms: NOW - i64::from(e.ago) * 60_000 - i as i64,
        received_ms: NOW,
        readings: Vec::new(),
    }
}

/// What the store must hold: (customer, meter) -> total.
fn model(events: &[Ev]) -> BTreeMap<(String, String), u64> {
    let mut latest: BTreeMap<(String, String), (i64, u64)> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let ev = event(i, e);
        let key = (ev.customer.clone(), ev.meter.clone());
        if METERS[e.meter].1.is_additive() {
            *out.entry(key).or_insert(0) += ev.value;
        } else {
            let l = latest.entry(key).or_insert((i64::MIN, 0));
            if (ev.time_ms, ev.value) > *l {
                *l = (ev.time_ms, ev.value);
            }
        }
    }
    out.extend(latest.into_iter().map(|(k, (_, v))| (k, v)));
    out
}

type Scenario = (Vec<Ev>, Vec<usize>, Vec<usize>, Vec<usize>, usize);

fn scenario() -> impl Strategy<Value = Scenario> {
    let ev =
        (0u8..4, 0usize..3, 0u64..1_000, 0u32..20_000).prop_map(|(customer, meter, value, ago)| {
            Ev {
                customer,
                meter,
                value,
                ago,
            }
        });
    prop::collection::vec(ev, 1..60).prop_flat_map(|events| {
        let n = events.len();
        (
            Just(events),
            // The arrival order: every event at least once, some again (duplicates), shuffled.
            prop::collection::vec(0..n, 0..n).prop_flat_map(move |repeats| {
                let order: Vec<usize> = (0..n).chain(repeats).collect();
                Just(order).prop_shuffle()
            }),
            // Sizes of the requests that append them, and of the aggregator's batches.
            prop::collection::vec(1usize..15, 1..20),
            prop::collection::vec(1usize..25, 1..20),
            // Which aggregator batch is applied a second time.
            0usize..20,
        )
    })
}

/// Runs the scenario through the embedded log and the aggregator's store; the stored totals.
async fn run(
    dir: &std::path::Path,
    (events, order, appends, batches, replayed): &Scenario,
) -> Result<BTreeMap<(String, String), u64>, TestCaseError> {
    let catalog = Catalog::builtin();
    let clock = Arc::new(ManualClock::new(NOW));
    let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir.join("events.db")), clock).unwrap();
    let store = SqliteStore::open(dir.join("usage.db")).unwrap();
    // Ingest: requests of varying sizes, in arrival order, repeats included.
    let mut at = 0;
    for size in appends.iter().cycle() {
        if at >= order.len() {
            break;
        }
        let chunk: Vec<UsageEvent> = order[at..(at + size).min(order.len())]
            .iter()
            .map(|&i| event(i, &events[i]))
            .collect();
        log.append(chunk).await.unwrap();
        at += size;
    }
    // Aggregate: the log's records in batches of varying sizes.
    let mut reader = log.reader().unwrap();
    let mut records = Vec::new();
    loop {
        let polled = reader.poll(1_000, Duration::from_millis(20)).await.unwrap();
        if polled.is_empty() {
            break;
        }
        records.extend(polled);
    }
    prop_assert_eq!(records.len(), events.len(), "the log kept each event once");
    let mut at = 0;
    let mut applied = Vec::new();
    for size in batches.iter().cycle() {
        if at >= records.len() {
            break;
        }
        let rollup = Rollup::from_records(&records[at..(at + size).min(records.len())], &catalog);
        prop_assert_eq!(store.apply(&rollup).await.unwrap(), Applied::Written);
        applied.push(rollup);
        at += size;
    }
    // A batch written again (a crash after the write): skipped.
    let again = &applied[replayed % applied.len()];
    prop_assert_eq!(store.apply(again).await.unwrap(), Applied::Replay);
    let meters: Vec<(String, Aggregation)> =
        METERS.iter().map(|(m, a)| ((*m).to_owned(), *a)).collect();
    let mut got = BTreeMap::new();
    for c in 0..4u8 {
        let customer = format!("c{c}");
        let totals = store
            .totals(&customer, &meters, NOV, NOW + 60_000)
            .await
            .unwrap();
        for ((m, _), t) in meters.iter().zip(totals) {
            if t > 0 {
                got.insert((customer.clone(), m.clone()), t);
            }
        }
    }
    Ok(got)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_order_duplication_and_batching_gives_the_same_totals(s in scenario()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let got = rt.block_on(run(dir.path(), &s))?;
        let mut want = model(&s.0);
        want.retain(|_, v| *v > 0);
        prop_assert_eq!(got, want);
    }
}
