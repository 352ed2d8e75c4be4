//! How the aggregator turns each partition of the log into batches for the store.
//!
//! Stores that can check a batch's positions and write it in one transaction (SQLite) take
//! *increments*: each batch's own usage, added to what is stored.
//!
//! Stores that cannot (ClickHouse: no transactions, so a writer that stalled after checking
//! the stored position can still land a write after another writer's) take *blocks*. A block
//! is a run of one partition's records, cut the same way by every aggregator that reads the
//! partition, whatever its batches:
//! - a block starts where the previous one ended, or where the store says the last written
//!   block started (resuming), or at the first record of a partition never written;
//! - it ends before the first record that is [`BLOCK_RECORDS`] offsets or more past its start,
//!   or that was received more than [`BLOCK_MS`] after the block's first record.
//!
//! Each write of a block carries *all* its usage from its start, with the next offset after it
//! as the row version, and the store keeps, per block and cell, the write that reached
//! furthest (ClickHouse: `ReplacingMergeTree(batch_next_offset)`). Two writers of one partition
//! (a rebalance, a member that stalled past its session) write the same rows at different
//! versions; whichever lands last, the furthest wins and blocks never overlap, so no record is
//! counted twice or lost. The position check before a write only saves a stale writer from
//! useless work.
//!
//! Resuming, the aggregator reads again from the last block's start (the log's reader resumes
//! exactly where it is sought): the records already written only rebuild the block in memory
//! (de-duplication answers the same for them), and the records from the stored next offset on
//! are new.
//!
//! Costs: an open block is written again with each batch until it ends (at most about
//! `BLOCK_MS / flush_interval` times, merged away by the store), and a resume re-reads at most
//! one block per partition.

use std::collections::{BTreeMap, HashMap};

use tally_backends::store::Resume;
use tally_schemas::Catalog;
use tally_schemas::Record;

use tally_schemas::rollup::{Block, Rollup, cells_of, fold};

/// Most offsets in one block.
pub const BLOCK_RECORDS: u64 = 32_768;

/// Longest span of receipt times in one block, from its first record.
pub const BLOCK_MS: i64 = 1_000;

/// The aggregator's per-partition position and, for block stores, the open blocks.
#[derive(Debug, Default)]
pub struct Cutter {
    blocks: bool,
    parts: BTreeMap<u32, Part>,
}

#[derive(Debug, Default)]
struct Part {
    /// Next offset to read; records below it are skipped.
    seen: u64,
    /// Next offset after what the store holds: records from here on are new.
    stored: u64,
    /// Start of the block to open with the next record (after a resume).
    resume_at: Option<u64>,
    open: Option<OpenBlock>,
    /// Blocks ended and not taken yet, with their new counted records.
    ended: Vec<(Block, usize)>,
}

#[derive(Debug)]
struct OpenBlock {
    block: Block,
    /// Receipt time of the block's first record.
    first_ms: i64,
    /// New records counted into it since it was last taken.
    fresh: usize,
}

impl OpenBlock {
    /// Whether `rec` belongs to a later block.
    fn ends_before(&self, rec: &Record) -> bool {
        rec.offset.saturating_sub(self.block.first) >= BLOCK_RECORDS
            || rec.event.received_ms > self.first_ms.saturating_add(BLOCK_MS)
    }
}

impl Cutter {
    /// A cutter of blocks (`blocks`) or of increments.
    pub fn new(blocks: bool) -> Cutter {
        Cutter {
            blocks,
            parts: BTreeMap::new(),
        }
    }

    /// Forgets everything and resumes from `resume` (the store's positions); partitions not
    /// in it start at their first record.
    pub fn reset(&mut self, resume: &BTreeMap<u32, Resume>) {
        self.parts = resume
            .iter()
            .map(|(&p, r)| {
                let start = if self.blocks {
                    r.start.min(r.next)
                } else {
                    r.next
                };
                let part = Part {
                    seen: start,
                    stored: r.next,
                    resume_at: Some(start),
                    ..Part::default()
                };
                (p, part)
            })
            .collect();
    }

    /// Where to read each partition from after [`Cutter::reset`].
    pub fn read_from(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.parts.iter().map(|(&p, part)| (p, part.seen))
    }

    /// Whether `rec` is still to be folded (not below the partition's position).
    pub fn wants(&self, rec: &Record) -> bool {
        self.parts
            .get(&rec.partition)
            .is_none_or(|p| rec.offset >= p.seen)
    }

    /// Folds `rec` (counted if `keep`, else only covered: a duplicate) into `rollup` if it is
    /// new, and into its block. Whether it was new (not yet in the store).
    pub fn push(
        &mut self,
        rec: &Record,
        keep: bool,
        catalog: &Catalog,
        rollup: &mut Rollup,
    ) -> bool {
        let part = self.parts.entry(rec.partition).or_default();
        if rec.offset < part.seen {
            return false;
        }
        if let Some(start) = part
            .resume_at
            .filter(|&s| s < part.stored && rec.offset != s)
        {
            // The log resumes where it was sought unless those records are gone (retention):
            // the last block cannot be rebuilt, and new records start a block of their own.
            tracing::error!(
                partition = rec.partition,
                expected = start,
                first = rec.offset,
                "the last block's records are no longer in the log"
            );
            part.resume_at = None;
            part.seen = part.seen.max(part.stored);
            if rec.offset < part.seen {
                return false;
            }
        }
        part.seen = rec.offset + 1;
        let new = rec.offset >= part.stored;
        if !self.blocks {
            if new {
                if keep {
                    rollup.push(rec, catalog);
                } else {
                    rollup.cover(rec);
                }
            }
            return new;
        }
        if part.open.as_ref().is_some_and(|o| o.ends_before(rec)) {
            let ended = part.open.take().expect("open block");
            if ended.block.next > part.stored {
                part.ended.push((ended.block, ended.fresh));
            }
        }
        let open = part.open.get_or_insert_with(|| {
            let first = part.resume_at.take().unwrap_or(rec.offset).min(rec.offset);
            OpenBlock {
                block: Block {
                    partition: rec.partition,
                    first,
                    next: first,
                    cells: HashMap::new(),
                },
                first_ms: rec.event.received_ms,
                fresh: 0,
            }
        });
        open.fresh += usize::from(new && keep);
        if keep {
            for (key, cell) in cells_of(rec, catalog) {
                fold(&mut open.block.cells, key, cell);
            }
        }
        open.block.next = rec.offset + 1;
        new
    }

    /// Moves the blocks with new records into `rollup` (ended ones, and a copy of the open one
    /// if `with_open`) with the positions they cover, and counts them as stored: call once per
    /// batch, before writing it. A batch the store refuses is followed by a
    /// [`Cutter::reset`]. Leaving the open block out while catching up (full batches) spares
    /// writing it again and again: it is written once it ends, or with a batch that is not full.
    pub fn take(&mut self, rollup: &mut Rollup, with_open: bool) {
        for (&p, part) in &mut self.parts {
            if !self.blocks {
                part.stored = part.stored.max(part.seen);
                continue;
            }
            let mut next = part.stored;
            for (block, fresh) in part.ended.drain(..) {
                next = next.max(block.next);
                rollup.events += fresh;
                rollup.blocks.push(block);
            }
            if let Some(open) = part
                .open
                .as_mut()
                .filter(|o| with_open && o.block.next > next)
            {
                next = open.block.next;
                rollup.events += std::mem::take(&mut open.fresh);
                rollup.blocks.push(open.block.clone());
            }
            if next > part.stored {
                rollup.ranges.insert(p, (part.stored, next));
                part.stored = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::UsageEvent;
    use tally_schemas::rollup::Cell;

    fn rec(offset: u64, received_ms: i64, value: u64) -> Record {
        Record {
            partition: 0,
            offset,
            event: UsageEvent {
                id: offset.to_string(),
                source: "s".into(),
                customer: "c".into(),
                meter: "api_requests".into(),
                value,
                time_ms: 60_000,
                received_ms,
                readings: Vec::new(),
            },
        }
    }

    fn spans(blocks: &[Block]) -> Vec<(u64, u64)> {
        blocks.iter().map(|b| (b.first, b.next)).collect()
    }

    fn total(b: &Block) -> u64 {
        b.cells.values().map(Cell::value).sum()
    }

    #[test]
    fn blocks_end_by_receipt_time_and_by_offsets_and_grow_cumulatively() {
        let cat = Catalog::builtin();
        let mut c = Cutter::new(true);
        let mut r = Rollup::default();
        for (o, ms) in [(0, 1_000), (1, 1_500), (2, 2_000)] {
            c.push(&rec(o, ms, 1), true, &cat, &mut r);
        }
        c.take(&mut r, true);
        assert_eq!(spans(&r.blocks), [(0, 3)]);
        assert_eq!(r.ranges[&0], (0, 3));
        // 2,001 ms is more than a second after the block's first record: a new block.
        let mut r = Rollup::default();
        c.push(&rec(3, 1_900, 1), true, &cat, &mut r);
        c.push(&rec(4, 2_001, 1), true, &cat, &mut r);
        c.take(&mut r, true);
        assert_eq!(spans(&r.blocks), [(0, 4), (4, 5)]);
        assert_eq!(total(&r.blocks[0]), 4, "the whole block from its start");
        assert_eq!(r.ranges[&0], (3, 5), "only the new records are the batch's");
        // An earlier receipt time (another ingest node's clock) does not end a block.
        let mut r = Rollup::default();
        c.push(&rec(5, 500, 1), true, &cat, &mut r);
        c.push(&rec(4 + BLOCK_RECORDS, 2_100, 1), true, &cat, &mut r);
        c.take(&mut r, true);
        assert_eq!(
            spans(&r.blocks),
            [(4, 6), (4 + BLOCK_RECORDS, 5 + BLOCK_RECORDS)]
        );
    }

    #[test]
    fn an_open_block_can_wait_for_its_end() {
        let cat = Catalog::builtin();
        let mut c = Cutter::new(true);
        let mut r = Rollup::default();
        for (o, ms) in [(0, 0), (1, 0), (2, 1_001), (3, 1_001)] {
            c.push(&rec(o, ms, 1), true, &cat, &mut r);
        }
        c.take(&mut r, false);
        assert_eq!(spans(&r.blocks), [(0, 2)]);
        assert_eq!((r.ranges[&0], r.events), ((0, 2), 2));
        let mut r = Rollup::default();
        c.take(&mut r, false);
        assert!(r.blocks.is_empty() && r.ranges.is_empty());
        c.push(&rec(4, 1_001, 1), true, &cat, &mut r);
        c.take(&mut r, true);
        assert_eq!(spans(&r.blocks), [(2, 5)]);
        assert_eq!((r.ranges[&0], r.events), ((2, 5), 3));
    }

    #[test]
    fn a_resume_rebuilds_the_last_block_and_writes_only_from_the_stored_position() {
        let cat = Catalog::builtin();
        let mut c = Cutter::new(true);
        c.reset(&BTreeMap::from([(
            0,
            Resume {
                start: 10,
                next: 13,
            },
        )]));
        assert_eq!(c.read_from().collect::<Vec<_>>(), [(0, 10)]);
        assert!(!c.wants(&rec(9, 0, 1)));
        let mut r = Rollup::default();
        for o in 10..13 {
            c.push(&rec(o, 0, 2), true, &cat, &mut r);
        }
        c.take(&mut r, true);
        assert!(r.blocks.is_empty() && r.ranges.is_empty(), "nothing new");
        c.push(&rec(13, 0, 2), false, &cat, &mut r);
        c.push(&rec(14, 0, 2), true, &cat, &mut r);
        c.take(&mut r, true);
        assert_eq!(spans(&r.blocks), [(10, 15)]);
        assert_eq!(
            total(&r.blocks[0]),
            8,
            "three rebuilt, one duplicate, one new"
        );
        assert_eq!((r.ranges[&0], r.events), ((13, 15), 1));
    }

    #[test]
    fn increments_carry_only_new_records() {
        let cat = Catalog::builtin();
        let mut c = Cutter::new(false);
        c.reset(&BTreeMap::from([(
            0,
            Resume {
                start: 10,
                next: 13,
            },
        )]));
        assert_eq!(c.read_from().collect::<Vec<_>>(), [(0, 13)]);
        let mut r = Rollup::default();
        c.push(&rec(13, 0, 2), true, &cat, &mut r);
        c.push(&rec(13, 0, 2), true, &cat, &mut r);
        c.push(&rec(14, 0, 3), false, &cat, &mut r);
        c.take(&mut r, true);
        assert!(r.blocks.is_empty());
        assert_eq!((r.ranges[&0], r.events), ((13, 15), 1));
        assert_eq!(r.cells.values().collect::<Vec<_>>(), [&Cell::Add(2)]);
    }
}
