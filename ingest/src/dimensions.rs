//! The cap on distinct dimension combinations: per customer and meter, at most
//! `max_dimension_combinations` distinct combinations of dimension values per calendar month
//! (UTC, by event time) pass this ingest process; an event that would add one more is refused
//! with `dimension_cap_exceeded`, so a flood of random values cannot grow the stores and the
//! breakdowns without bound. Combinations already seen keep passing (retries, duplicates).
//!
//! The count is this process's: each ingest replica admits up to the cap of what it sees, and a
//! restarted process counts afresh, so the stores hold at most replicas × cap combinations per
//! customer and meter and month (more across restarts); the cap bounds a flood, it is not a
//! billing figure.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Mutex;

use tally_schemas::UsageEvent;
use tally_schemas::period::calendar_month;

/// Per (customer, meter): the month counted, and the hashes of its combinations seen.
type Seen = HashMap<(String, String), (i64, HashSet<u64>)>;

/// The combinations seen per (customer, meter) in the current month.
pub struct DimensionCap {
    cap: usize,
    hasher: std::collections::hash_map::RandomState,
    seen: Mutex<Seen>,
}

impl DimensionCap {
    pub fn new(cap: usize) -> DimensionCap {
        DimensionCap {
            cap,
            hasher: Default::default(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Most distinct combinations per customer, meter and month.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn combination(&self, dimensions: &[tally_schemas::meter::Dimension]) -> u64 {
        self.hasher.hash_one(dimensions)
    }

    /// Whether every dimensioned reading of `e` stays within the cap; if so, its new
    /// combinations are remembered. Events without dimensions always pass.
    pub fn admit(&self, e: &UsageEvent) -> bool {
        let mut wanted: Vec<(&str, u64)> = e
            .readings()
            .filter(|r| !r.dimensions.is_empty())
            .map(|r| (r.meter, self.combination(r.dimensions)))
            .collect();
        if wanted.is_empty() {
            return true;
        }
        wanted.sort_unstable();
        wanted.dedup();
        let month = calendar_month(e.time_ms).start_ms;
        let mut seen = self.seen.lock().expect("dimension cap lock");
        let mut fresh: HashMap<&str, usize> = HashMap::new();
        for (meter, combination) in &wanted {
            let known = seen
                .get(&(e.customer.clone(), (*meter).to_owned()))
                .filter(|(m, _)| *m == month);
            let have = known.map_or(0, |(_, set)| set.len());
            if known.is_some_and(|(_, set)| set.contains(combination)) {
                continue;
            }
            let adding = fresh.entry(meter).or_insert(0);
            *adding += 1;
            if have + *adding > self.cap {
                return false;
            }
        }
        for (meter, combination) in wanted {
            let entry = seen
                .entry((e.customer.clone(), meter.to_owned()))
                .or_insert_with(|| (month, HashSet::new()));
            if entry.0 != month {
                // A new month (or an older event's): the count starts again.
                if month > entry.0 {
                    *entry = (month, HashSet::new());
                } else {
                    continue;
                }
            }
            entry.1.insert(combination);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::meter::{Dimension, Reading};

    const NOV: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    const DEC: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z

    fn event(customer: &str, region: &str, time_ms: i64) -> UsageEvent {
        UsageEvent {
            customer: customer.into(),
            meter: "request".into(),
            time_ms,
            readings: vec![Reading {
                meter: "request_bytes".into(),
                value: 1,
                dimensions: vec![Dimension {
                    name: "region".into(),
                    value: region.into(),
                }],
            }],
            ..UsageEvent::default()
        }
    }

    #[test]
    fn admits_up_to_the_cap_per_customer_meter_and_month() {
        let cap = DimensionCap::new(2);
        assert!(cap.admit(&event("a", "eu", NOV)));
        assert!(cap.admit(&event("a", "us", NOV)));
        assert!(!cap.admit(&event("a", "ap", NOV)), "a third combination");
        assert!(cap.admit(&event("a", "eu", NOV + 1)), "a known one passes");
        assert!(
            cap.admit(&event("b", "ap", NOV)),
            "another customer has its own"
        );
        assert!(
            cap.admit(&event("a", "ap", DEC)),
            "a new month starts again"
        );
        assert!(cap.admit(&event("a", "sa", DEC)));
        assert!(!cap.admit(&event("a", "xx", DEC)));
        let plain = UsageEvent {
            customer: "a".into(),
            meter: "api_requests".into(),
            value: 1,
            time_ms: DEC,
            ..UsageEvent::default()
        };
        assert!(cap.admit(&plain), "no dimensions, no cap");
    }
}
