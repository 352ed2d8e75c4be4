//! The caps on cardinality: per customer and meter, at most `max_dimension_combinations`
//! distinct combinations of dimension values and at most `max_distinct_values` distinct values
//! of a `unique_count` meter per calendar month (UTC, by event time) pass this ingest process.
//! An event that would add one more is refused, with `dimension_cap_exceeded` or
//! `distinct_cap_exceeded`, so a flood of random values cannot grow the stores, the enforcer's
//! sets of values and the breakdowns without bound. Combinations and values already seen keep
//! passing (retries, duplicates), and a refused event leaves nothing remembered.
//!
//! The count is this process's: each ingest replica admits up to the cap of what it sees, and a
//! restarted process counts afresh, so the stores hold at most replicas × cap combinations (or
//! values) per customer and meter and month (more across restarts); the caps bound a flood,
//! they are not billing figures.

use std::hash::BuildHasher;
use std::sync::Mutex;

use tally_schemas::UsageEvent;
use tally_schemas::event::EventError;
use tally_schemas::period::calendar_month;

/// foldhash (seeded per process): these maps are on ingest's path for every event with
/// dimensions or a distinct value, and SipHash cost about a tenth of that path. A collision of
/// two fingerprints only lets one more combination past the cap.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// What one (customer, meter) saw in its month: the hashes of its dimension combinations and
/// of its distinct values.
#[derive(Default)]
struct MeterSeen {
    month: i64,
    combinations: HashSet<u64>,
    values: HashSet<u64>,
}

/// Per customer, per meter.
type Seen = HashMap<String, HashMap<String, MeterSeen>>;

/// What one reading would add: its meter, and the hashes of its combination and its value.
struct Wanted<'a> {
    meter: &'a str,
    combination: Option<u64>,
    value: Option<u64>,
}

/// The combinations and values seen per (customer, meter) in the current month.
pub struct DimensionCap {
    combinations: usize,
    values: usize,
    hasher: foldhash::quality::RandomState,
    /// The latest month seen, and what was seen.
    seen: Mutex<(i64, Seen)>,
}

impl DimensionCap {
    /// At most `combinations` dimension combinations and `values` distinct values per
    /// customer, meter and month.
    pub fn new(combinations: usize, values: usize) -> DimensionCap {
        DimensionCap {
            combinations,
            values,
            hasher: Default::default(),
            seen: Mutex::new((i64::MIN, HashMap::default())),
        }
    }

    /// Whether every reading of `e` stays within the caps (the refusal if not); if so, its new
    /// combinations and values are remembered. Events with neither always pass.
    pub fn admit(&self, e: &UsageEvent) -> Result<(), EventError> {
        let wanted: Vec<Wanted> = e
            .readings()
            .filter(|r| !r.dimensions.is_empty() || r.distinct.is_some())
            .map(|r| Wanted {
                meter: r.meter,
                combination: (!r.dimensions.is_empty()).then(|| self.hasher.hash_one(r.dimensions)),
                value: r.distinct.map(|v| self.hasher.hash_one(v)),
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let month = calendar_month(e.time_ms).start_ms;
        let mut guard = self.seen.lock().expect("cardinality cap lock");
        let (latest, seen) = &mut *guard;
        if month > *latest {
            // A new month: what earlier months saw no longer counts anywhere.
            *latest = month;
            seen.retain(|_, meters| {
                meters.retain(|_, m| m.month >= month);
                !meters.is_empty()
            });
        }
        // Check first, so nothing is remembered for a refused event. A meter has one reading
        // per event, so each meter of `wanted` adds at most one combination and one value.
        let customer = seen.get(e.customer.as_str());
        for w in &wanted {
            let had = customer
                .and_then(|m| m.get(w.meter))
                .filter(|m| m.month == month);
            let passes = |new: Option<u64>, set: Option<&HashSet<u64>>, cap: usize| match new {
                Some(h) => set.is_some_and(|s| s.contains(&h)) || set.map_or(0, HashSet::len) < cap,
                None => true,
            };
            if !passes(
                w.combination,
                had.map(|m| &m.combinations),
                self.combinations,
            ) {
                return Err(EventError::DimensionCapExceeded {
                    cap: self.combinations,
                });
            }
            if !passes(w.value, had.map(|m| &m.values), self.values) {
                return Err(EventError::DistinctCapExceeded { cap: self.values });
            }
        }
        if !seen.contains_key(e.customer.as_str()) {
            seen.insert(e.customer.clone(), HashMap::default());
        }
        let meters = seen.get_mut(e.customer.as_str()).expect("just inserted");
        for w in wanted {
            if !meters.contains_key(w.meter) {
                meters.insert(w.meter.to_owned(), MeterSeen::default());
            }
            let m = meters.get_mut(w.meter).expect("just inserted");
            if m.month < month {
                *m = MeterSeen {
                    month,
                    ..MeterSeen::default()
                };
            }
            if m.month == month {
                m.combinations.extend(w.combination);
                m.values.extend(w.value);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::meter::{Dimension, Reading};

    const NOV: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    const DEC: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z

    fn ok(cap: &DimensionCap, e: &UsageEvent) -> bool {
        cap.admit(e).is_ok()
    }

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
        let cap = DimensionCap::new(2, 100);
        assert!(ok(&cap, &event("a", "eu", NOV)));
        assert!(ok(&cap, &event("a", "us", NOV)));
        assert!(!ok(&cap, &event("a", "ap", NOV)), "a third combination");
        assert!(ok(&cap, &event("a", "eu", NOV + 1)), "a known one passes");
        assert!(
            ok(&cap, &event("b", "ap", NOV)),
            "another customer has its own"
        );
        assert!(ok(&cap, &event("a", "ap", DEC)), "a new month starts again");
        assert!(ok(&cap, &event("a", "sa", DEC)));
        assert!(!ok(&cap, &event("a", "xx", DEC)));
        let plain = UsageEvent {
            customer: "a".into(),
            meter: "api_requests".into(),
            value: 1,
            time_ms: DEC,
            ..UsageEvent::default()
        };
        assert!(ok(&cap, &plain), "no dimensions, no cap");
    }

    fn session(customer: &str, region: &str, user: &str, time_ms: i64) -> UsageEvent {
        let mut e = event(customer, region, time_ms);
        e.readings[0].meter = "active_users".into();
        e.readings[0].distinct = Some(user.into());
        e
    }

    #[test]
    fn admits_up_to_the_cap_of_distinct_values_and_remembers_nothing_refused() {
        let cap = DimensionCap::new(2, 2);
        assert!(ok(&cap, &session("a", "eu", "ann", NOV)));
        assert!(ok(&cap, &session("a", "eu", "bob", NOV)));
        assert_eq!(
            cap.admit(&session("a", "us", "cy", NOV))
                .unwrap_err()
                .code(),
            "distinct_cap_exceeded",
            "a third value"
        );
        // The refused event's new region was not remembered: one more region still fits,
        // with a known value.
        assert!(ok(&cap, &session("a", "ap", "ann", NOV)));
        assert_eq!(
            cap.admit(&session("a", "sa", "ann", NOV))
                .unwrap_err()
                .code(),
            "dimension_cap_exceeded"
        );
        assert!(
            ok(&cap, &session("a", "eu", "bob", NOV + 1)),
            "known ones pass"
        );
        assert!(ok(&cap, &session("b", "eu", "cy", NOV)), "per customer");
        assert!(ok(&cap, &session("a", "eu", "cy", DEC)), "per month");
        let mut other = session("a", "eu", "dee", NOV);
        other.readings[0].meter = "seats".into();
        assert!(ok(&cap, &other), "per meter");
    }
}
