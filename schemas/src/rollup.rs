//! Folding log records into per (customer, meter, minute) cells: the pure heart of the
//! aggregator. Additive meters sum, `max` and `min` meters keep the minute's largest or smallest
//! value, `unique_count` meters keep one cell per distinct value and minute, gauges keep the latest value by event time (ties keep the larger value). Every merge
//! is commutative and associative (and for max, min and gauges idempotent), so any batching, order or replay
//! of the same records yields the same cells. Duplicates are dropped before the fold (by the log,
//! or by the store's de-duplication table) and only [`Rollup::cover`]ed.

use std::collections::{BTreeMap, HashMap};

use crate::Record;
use crate::meter::Dimension;
use crate::period::minute_of;
use crate::{Aggregation, Catalog};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellKey {
    /// Log partition of the records (one customer's records share one partition).
    pub partition: u32,
    pub customer: String,
    pub meter: String,
    /// The reading's dimensions as a JSON object in name order (`{"model":"m1","region":"eu"}`),
    /// or empty for none: see [`dimensions_key`].
    pub dims: String,
    /// For a `unique_count` meter, the value counted (each distinct value has its own cells);
    /// empty for every other meter.
    pub distinct: String,
    /// Start of the UTC minute, in ms.
    pub minute_ms: i64,
}

/// The stored form of a reading's dimensions: a JSON object of their values in name order, or
/// the empty string when the reading has none. Readings with the same dimensions share cells.
pub fn dimensions_key(dimensions: &[Dimension]) -> String {
    if dimensions.is_empty() {
        return String::new();
    }
    // What serializing the map of names to values writes (names are in order already), without
    // building the map.
    let len: usize = dimensions
        .iter()
        .map(|d| d.name.len() + d.value.len() + 6)
        .sum();
    let mut out = Vec::with_capacity(len + 2);
    out.push(b'{');
    for (i, d) in dimensions.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &d.name).expect("a string serializes");
        out.push(b':');
        serde_json::to_writer(&mut out, &d.value).expect("a string serializes");
    }
    out.push(b'}');
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// The dimensions of a stored key (the inverse of [`dimensions_key`]); a key that is not a
/// JSON object of strings reads as none.
pub fn parse_dimensions_key(key: &str) -> Vec<Dimension> {
    if key.is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<std::collections::BTreeMap<String, String>>(key)
        .map(|m| {
            m.into_iter()
                .map(|(name, value)| Dimension { name, value })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Sum of the values of an additive meter.
    Add(u64),
    /// The largest value of a `max` meter; 1 for a value seen by a `unique_count` meter (its
    /// cells say which values were seen in which minute: seeing one again changes nothing).
    Max(u64),
    /// The smallest value of a `min` meter.
    Min(u64),
    /// The latest value of a gauge, with its event time.
    Latest { time_ms: i64, value: u64 },
}

impl Cell {
    /// The cell's figure: the sum, the extreme or the gauge's value.
    pub fn value(&self) -> u64 {
        match *self {
            Cell::Add(v) | Cell::Max(v) | Cell::Min(v) => v,
            Cell::Latest { value, .. } => value,
        }
    }

    /// Merges `other` into `self`; commutative and associative.
    pub fn merge(&mut self, other: Cell) {
        match (self, other) {
            (Cell::Add(a), Cell::Add(b)) => *a = crate::quantity::add(*a, b),
            (Cell::Max(a), Cell::Max(b)) => *a = (*a).max(b),
            (Cell::Min(a), Cell::Min(b)) => *a = (*a).min(b),
            (
                Cell::Latest { time_ms, value },
                Cell::Latest {
                    time_ms: t2,
                    value: v2,
                },
            ) if (t2, v2) > (*time_ms, *value) => (*time_ms, *value) = (t2, v2),
            // An older gauge value, or a meter that changed kind (impossible within one
            // catalogue): keep what is there.
            _ => {}
        }
    }
}

/// Records of one batch, rolled up, with the log positions they cover.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    /// The batch's own usage (an increment).
    pub cells: HashMap<CellKey, Cell>,
    /// Per partition: (first offset in the batch, next offset after it).
    pub ranges: BTreeMap<u32, (u64, u64)>,
    /// Records folded in.
    pub events: usize,
    /// The same batch as cumulative blocks (the aggregator's `blocks` module), for stores that
    /// take them (the backends' `UsageWriter::takes_blocks`); then `cells` stays empty. Without
    /// blocks, a store takes each partition's range of the batch as one block.
    pub blocks: Vec<Block>,
}

/// All the usage of one block of a partition from its start: the positions
/// `[first, next)`. Written again as the block grows, with `next` as the version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub partition: u32,
    pub first: u64,
    pub next: u64,
    pub cells: HashMap<CellKey, Cell>,
}

/// The cells `rec` adds to, and what it adds to each: one per meter the event feeds (see
/// [`crate::meter`]); none for an event that feeds no meter. Readings of a meter with different
/// dimensions go to different cells.
pub fn cells_of<'r>(
    rec: &'r Record,
    catalog: &'r Catalog,
) -> impl Iterator<Item = (CellKey, Cell)> + 'r {
    let e = &rec.event;
    e.readings().map(move |r| {
        // A meter removed from a replaced catalogue is still summed: nothing is thrown away.
        let kind = catalog
            .meter(r.meter)
            .map_or(Aggregation::Sum, |m| m.aggregation);
        let cell = match kind {
            Aggregation::Count | Aggregation::Sum => Cell::Add(r.value),
            Aggregation::Max => Cell::Max(r.value),
            Aggregation::UniqueCount => Cell::Max(1),
            Aggregation::Min => Cell::Min(r.value),
            Aggregation::Latest => Cell::Latest {
                time_ms: e.time_ms,
                value: r.value,
            },
        };
        let key = CellKey {
            partition: rec.partition,
            customer: e.customer.clone(),
            meter: r.meter.to_owned(),
            dims: dimensions_key(r.dimensions),
            distinct: r.distinct.unwrap_or_default().to_owned(),
            minute_ms: minute_of(e.time_ms),
        };
        (key, cell)
    })
}

/// Folds `cell` into `key`'s cell of `cells`.
pub fn fold(cells: &mut HashMap<CellKey, Cell>, key: CellKey, cell: Cell) {
    cells
        .entry(key)
        .and_modify(|c| c.merge(cell))
        .or_insert(cell);
}

impl Rollup {
    pub fn from_records(records: &[Record], catalog: &Catalog) -> Rollup {
        let mut r = Rollup::default();
        for rec in records {
            r.push(rec, catalog);
        }
        r
    }

    pub fn push(&mut self, rec: &Record, catalog: &Catalog) {
        for (key, cell) in cells_of(rec, catalog) {
            fold(&mut self.cells, key, cell);
        }
        self.cover(rec);
        self.events += 1;
    }

    /// Extends the batch's positions over `rec` without counting it (a dropped duplicate).
    pub fn cover(&mut self, rec: &Record) {
        let range = self
            .ranges
            .entry(rec.partition)
            .or_insert((rec.offset, rec.offset + 1));
        range.0 = range.0.min(rec.offset);
        range.1 = range.1.max(rec.offset + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UsageEvent;

    fn rec(offset: u64, meter: &str, value: u64, time_ms: i64) -> Record {
        Record {
            partition: 0,
            offset,
            event: UsageEvent {
                id: offset.to_string(),
                source: "s".into(),
                customer: "c".into(),
                meter: meter.into(),
                value,
                time_ms,
                received_ms: time_ms,
                readings: Vec::new(),
            },
        }
    }

    #[test]
    fn sums_per_minute_and_keeps_latest_gauges() {
        let c = Catalog::builtin();
        let recs = vec![
            rec(5, "api_requests", 2, 60_000),
            rec(6, "api_requests", 3, 119_999),
            rec(7, "api_requests", 4, 120_000),
            rec(8, "wasm_modules", 9, 61_000),
            rec(9, "wasm_modules", 4, 62_000),
            rec(10, "wasm_modules", 7, 62_000),
        ];
        let r = Rollup::from_records(&recs, &c);
        let key = |m: &str, minute| CellKey {
            partition: 0,
            customer: "c".into(),
            meter: m.into(),
            dims: String::new(),
            distinct: String::new(),
            minute_ms: minute,
        };
        assert_eq!(r.cells[&key("api_requests", 60_000)], Cell::Add(5));
        assert_eq!(r.cells[&key("api_requests", 120_000)], Cell::Add(4));
        assert_eq!(
            r.cells[&key("wasm_modules", 60_000)],
            Cell::Latest {
                time_ms: 62_000,
                value: 7
            }
        );
        assert_eq!(r.ranges[&0], (5, 11));
        assert_eq!(r.events, 6);
        // Order does not matter.
        let mut rev = recs.clone();
        rev.reverse();
        assert_eq!(Rollup::from_records(&rev, &c).cells, r.cells);
    }

    #[test]
    fn max_and_min_cells_keep_the_extremes_of_the_minute_in_any_order() {
        let toml = format!(
            "{}\n[meters.peak]\naggregation = 'max'\nunit = 'x'\n\
             [meters.least]\naggregation = 'min'\nunit = 'x'\n",
            crate::catalog::DEFAULT_CATALOG_TOML
        );
        let c = Catalog::from_toml(&toml).unwrap();
        let max = crate::quantity::MAX;
        let mut recs = Vec::new();
        for (i, v) in [7, 0, max, 3, 7].into_iter().enumerate() {
            recs.push(rec(i as u64, "peak", v, 60_000 + i as i64));
            recs.push(rec(10 + i as u64, "least", v, 60_000 + i as i64));
        }
        recs.push(rec(20, "least", 5, 120_000));
        let key = |m: &str, minute| CellKey {
            partition: 0,
            customer: "c".into(),
            meter: m.into(),
            dims: String::new(),
            distinct: String::new(),
            minute_ms: minute,
        };
        let r = Rollup::from_records(&recs, &c);
        assert_eq!(r.cells[&key("peak", 60_000)], Cell::Max(max));
        assert_eq!(r.cells[&key("least", 60_000)], Cell::Min(0));
        assert_eq!(r.cells[&key("least", 120_000)], Cell::Min(5));
        let mut rev = recs.clone();
        rev.reverse();
        assert_eq!(Rollup::from_records(&rev, &c).cells, r.cells);
        // A replayed record changes no extreme (the merge is idempotent).
        let mut twice = recs.clone();
        twice.extend(recs.iter().cloned());
        assert_eq!(Rollup::from_records(&twice, &c).cells, r.cells);
        assert_eq!(Aggregation::Min.fold(4, 9), 4);
        assert_eq!(Aggregation::Max.fold(4, 9), 9);
        assert_eq!(Aggregation::Sum.fold(max, 9), max, "sums hold at the cap");
        assert!(Aggregation::Max.is_periodic() && !Aggregation::Max.is_additive());
        assert!(!Aggregation::Latest.is_periodic());
    }

    #[test]
    fn unique_count_cells_mark_each_value_once_per_minute() {
        let toml = format!(
            "{}\n[meters.active_users]\naggregation = 'unique_count'\nunit = 'users'\n\
             event_type = 'session'\nvalue = '$.user'\n",
            crate::catalog::DEFAULT_CATALOG_TOML
        );
        let c = Catalog::from_toml(&toml).unwrap();
        let ty = c.event_type("session").unwrap();
        let session = |offset: u64, user: serde_json::Value, time_ms: i64| {
            let data = serde_json::json!({ "user": user });
            let readings = ty.readings(&crate::path::Payload::Value(&data)).unwrap();
            let mut r = rec(offset, "session", 0, time_ms);
            r.event.readings = readings;
            r
        };
        let recs = vec![
            session(1, "ann".into(), 60_000),
            session(2, "bob".into(), 61_000),
            session(3, "ann".into(), 62_000),
            session(4, 7.into(), 63_000),
            session(5, "7".into(), 64_000),
            session(6, "ann".into(), 120_000),
        ];
        let key = |user: &str, minute| CellKey {
            partition: 0,
            customer: "c".into(),
            meter: "active_users".into(),
            dims: String::new(),
            distinct: user.into(),
            minute_ms: minute,
        };
        let r = Rollup::from_records(&recs, &c);
        assert_eq!(r.cells.len(), 4, "{:?}", r.cells);
        assert_eq!(r.cells[&key("ann", 60_000)], Cell::Max(1));
        assert_eq!(r.cells[&key("bob", 60_000)], Cell::Max(1));
        assert_eq!(
            r.cells[&key("7", 60_000)],
            Cell::Max(1),
            "7 and \"7\" are one value"
        );
        assert_eq!(r.cells[&key("ann", 120_000)], Cell::Max(1));
        let mut twice = recs.clone();
        twice.extend(recs.iter().rev().cloned());
        assert_eq!(Rollup::from_records(&twice, &c).cells, r.cells);
        let err = ty
            .readings(&crate::path::Payload::Value(
                &serde_json::json!({"user": [1]}),
            ))
            .unwrap_err();
        assert_eq!(err.code(), "invalid_value");
        let err = ty
            .readings(&crate::path::Payload::Value(
                &serde_json::json!({"seat": 1}),
            ))
            .unwrap_err();
        assert_eq!(err.code(), "value_missing");
    }

    #[test]
    fn dimensions_keys_are_the_json_object_of_the_values_and_read_back() {
        let d = |n: &str, v: &str| Dimension {
            name: n.into(),
            value: v.into(),
        };
        let dims = [d("model", "m\"1"), d("region", "eu\u{e9}")];
        let key = dimensions_key(&dims);
        let map: serde_json::Map<String, serde_json::Value> = dims
            .iter()
            .map(|x| (x.name.clone(), serde_json::Value::String(x.value.clone())))
            .collect();
        assert_eq!(key, serde_json::Value::Object(map).to_string());
        assert_eq!(key, "{\"model\":\"m\\\"1\",\"region\":\"eu\u{e9}\"}");
        assert_eq!(parse_dimensions_key(&key), dims);
        assert_eq!(dimensions_key(&[]), "");
        assert!(parse_dimensions_key("").is_empty());
    }
}
