//! Property: with blocks (the ClickHouse path), however many aggregators write one partition,
//! however they cut it into batches, crash, resume from the store, stall with a write in flight
//! and land it late, in any order, a store that keeps per cell and block the write that reached
//! furthest (`ReplacingMergeTree(batch_next_offset)` read with `FINAL`) holds every record once.
//!
//! No position check is modelled: writers write whatever they cut, the worst case for a store
//! that cannot fence them.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tally_aggregator::blocks::Cutter;
use tally_backends::log::Record;
use tally_backends::store::Resume;
use tally_schemas::rollup::{Block, Cell, Rollup};
use tally_schemas::{Catalog, UsageEvent};

/// 2026-11-21T10:00:00Z.
const NOW: i64 = 1_795_255_200_000;

/// The store: per (customer, minute, block first offset), the furthest write (version, value).
#[derive(Default)]
struct Store {
    rows: HashMap<(String, i64, u64), (u64, u64)>,
    /// Per block first offset, the furthest next offset written (marker rows included).
    blocks: BTreeMap<u64, u64>,
}

impl Store {
    fn land(&mut self, write: &[Block]) {
        for b in write {
            let n = self.blocks.entry(b.first).or_insert(b.next);
            *n = (*n).max(b.next);
            for (k, c) in &b.cells {
                let Cell::Add(v) = *c else { unreachable!() };
                let row = self
                    .rows
                    .entry((k.customer.clone(), k.minute_ms, b.first))
                    .or_insert((b.next, v));
                if b.next >= row.0 {
                    *row = (b.next, v);
                }
            }
        }
    }

    /// `argMax(batch_first_offset, batch_next_offset), max(batch_next_offset)`.
    fn resume(&self) -> BTreeMap<u32, Resume> {
        self.blocks
            .iter()
            .max_by_key(|(_, next)| **next)
            .map(|(&start, &next)| (0, Resume { start, next }))
            .into_iter()
            .collect()
    }

    fn totals(&self) -> BTreeMap<(String, i64), u64> {
        let mut out = BTreeMap::new();
        for ((c, m, _), (_, v)) in &self.rows {
            *out.entry((c.clone(), *m)).or_insert(0) += v;
        }
        out
    }
}

struct Writer {
    cutter: Cutter,
    /// Next offset to read.
    at: u64,
    /// The write sent and not acknowledged: an aggregator cuts its next batch only once the
    /// store took the previous one.
    in_flight: Option<Vec<Block>>,
}

impl Writer {
    fn resume(store: &Store) -> Writer {
        let mut cutter = Cutter::new(true);
        cutter.reset(&store.resume());
        let at = cutter.read_from().next().map_or(0, |(_, at)| at);
        Writer {
            cutter,
            at,
            in_flight: None,
        }
    }

    fn read(&mut self, log: &[Record], n: usize, with_open: bool, catalog: &Catalog) {
        if self.in_flight.is_some() {
            return;
        }
        let end = (self.at as usize + n).min(log.len());
        let mut rollup = Rollup::default();
        for rec in &log[self.at as usize..end] {
            self.cutter.push(rec, true, catalog, &mut rollup);
        }
        self.at = end as u64;
        self.cutter.take(&mut rollup, with_open);
        if !rollup.blocks.is_empty() {
            self.in_flight = Some(rollup.blocks);
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Writer reads and cuts up to n records, once its previous write landed; with its open
    /// block, or leaving it for later (catching up).
    Read(usize, usize, bool),
    /// Writer's write lands and is acknowledged.
    Land(usize),
    /// Writer crashes and resumes from the store; its write in flight may land at any time
    /// later, or never.
    Restart(usize),
    /// The orphaned write at this index (modulo) lands.
    LandOrphan(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, 1..40usize, any::<bool>()).prop_map(|(w, n, o)| Step::Read(w, n, o)),
        3 => (0..3usize).prop_map(Step::Land),
        1 => (0..3usize).prop_map(Step::Restart),
        1 => (0..4usize).prop_map(Step::LandOrphan),
    ]
}

/// Records with values, customers, minutes and receipt times that mostly advance, sometimes by
/// more than a block's span, sometimes backwards (another ingest node's clock).
fn log() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec((1..10u64, 0..3u8, 0..3i64, -300..700i64), 1..150).prop_map(|evs| {
        let mut received = NOW;
        evs.into_iter()
            .enumerate()
            .map(|(i, (value, customer, minute, step))| {
                received += step;
                Record {
                    partition: 0,
                    offset: i as u64,
                    event: UsageEvent {
                        id: format!("e{i}"),
                        source: "edge".into(),
                        customer: format!("c{customer}"),
                        meter: "api_requests".into(),
                        value,
                        time_ms: NOW + minute * 60_000,
                        received_ms: received,
                        readings: Vec::new(),
                    },
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn concurrent_stale_and_crashing_writers_count_every_record_once(
        log in log(),
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let catalog = Catalog::builtin();
        let mut store = Store::default();
        let mut writers: Vec<Writer> = (0..3).map(|_| Writer::resume(&store)).collect();
        let mut orphans: Vec<Vec<Block>> = Vec::new();
        for s in steps {
            match s {
                Step::Read(w, n, open) => writers[w].read(&log, n, open, &catalog),
                Step::Land(w) => {
                    if let Some(write) = writers[w].in_flight.take() {
                        store.land(&write);
                    }
                }
                Step::Restart(w) => {
                    orphans.extend(writers[w].in_flight.take());
                    writers[w] = Writer::resume(&store);
                }
                Step::LandOrphan(i) => {
                    if !orphans.is_empty() {
                        let write = orphans.remove(i % orphans.len());
                        store.land(&write);
                    }
                }
            }
        }
        // Writes still in flight land late: some before a last writer resumes and reads to
        // the end, the others after it.
        let late: Vec<Vec<Block>> = writers.iter_mut().filter_map(|w| w.in_flight.take()).collect();
        let half = orphans.len() / 2;
        for write in orphans.drain(..half) {
            store.land(&write);
        }
        let mut last = Writer::resume(&store);
        while last.at < log.len() as u64 {
            last.read(&log, 25, true, &catalog);
            if let Some(write) = last.in_flight.take() {
                store.land(&write);
            }
        }
        for write in orphans.iter().chain(&late) {
            store.land(write);
        }
        let mut want = BTreeMap::new();
        for r in &log {
            *want.entry((r.event.customer.clone(), r.event.time_ms)).or_insert(0) +=
                r.event.value;
        }
        prop_assert_eq!(store.totals(), want);
    }
}
