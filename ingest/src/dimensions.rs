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

/// Per customer, per meter: the month counted and the hashes of its combinations seen.
type Seen = HashMap<String, HashMap<String, (i64, HashSet<u64>)>>;

/// The combinations seen per (customer, meter) in the current month.
pub struct DimensionCap {
    cap: usize,
    hasher: std::collections::hash_map::RandomState,
    /// The latest month seen, and what was seen.
    seen: Mutex<(i64, Seen)>,
}

impl DimensionCap {
    pub fn new(cap: usize) -> DimensionCap {
        DimensionCap {
            cap,
            hasher: Default::default(),
            seen: Mutex::new((i64::MIN, HashMap::new())),
        }
    }

    /// Most distinct combinations per customer, meter and month.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether every dimensioned reading of `e` stays within the cap; if so, its new
    /// combinations are remembered. Events without dimensions always pass.
    pub fn admit(&self, e: &UsageEvent) -> bool {
        let wanted: Vec<(&str, u64)> = e
            .readings()
            .filter(|r| !r.dimensions.is_empty())
            .map(|r| (r.meter, self.hasher.hash_one(r.dimensions)))
            .collect();
        if wanted.is_empty() {
            return true;
        }
        let month = calendar_month(e.time_ms).start_ms;
        let mut guard = self.seen.lock().expect("dimension cap lock");
        let (latest, seen) = &mut *guard;
        if month > *latest {
            // A new month: what earlier months saw no longer counts anywhere.
            *latest = month;
            seen.retain(|_, meters| {
                meters.retain(|_, (m, _)| *m >= month);
                !meters.is_empty()
            });
        }
        // Check first, so nothing is remembered for a refused event. A meter has one reading
        // per event, so each meter of `wanted` adds at most one combination.
        for (meter, combination) in &wanted {
            let set = match seen.get(e.customer.as_str()).and_then(|m| m.get(*meter)) {
                Some((m, set)) if *m == month => Some(set),
                _ => None,
            };
            if set.is_some_and(|set| set.contains(combination)) {
                continue;
            }
            if set.map_or(0, HashSet::len) + 1 > self.cap {
                return false;
            }
        }
        if !seen.contains_key(e.customer.as_str()) {
            seen.insert(e.customer.clone(), HashMap::new());
        }
        let meters = seen.get_mut(e.customer.as_str()).expect("just inserted");
        for (meter, combination) in wanted {
            if !meters.contains_key(meter) {
                meters.insert(meter.to_owned(), (month, HashSet::new()));
            }
            let (m, set) = meters.get_mut(meter).expect("just inserted");
            if *m < month {
                (*m, *set) = (month, HashSet::new());
            }
            if *m == month {
                set.insert(combination);
            }
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
                distinct: None,
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
