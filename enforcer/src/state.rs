//! The enforcer's in-memory state: per customer, its record and one counter per meter.
//!
//! Counters are updated from the log in log order and only from event data (event times, the
//! customer records), so replicas that applied the same records hold the same counters and give
//! the same answers. Additive counters hold the usage of the latest billing period they saw;
//! gauges hold the latest value by event time. An event of the next period (clock skew allows
//! events up to a few minutes ahead) moves its counter to that period: until the clock reaches
//! it, checks see the new period's usage as zero, which errs on the side of allowing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use tally_schemas::period::Period;
use tally_schemas::quota::{self, Verdict};
use tally_schemas::{Aggregation, Catalog, Clock, Customer, Limit, Notification, UsageEvent};

const NONE: i64 = i64::MIN;

/// One (customer, meter) counter: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Start of the billing period `usage` belongs to (additive meters).
    pub period_start_ms: i64,
    /// Usage in that period, or the gauge's latest value.
    pub usage: u64,
    /// When usage first reached the soft limit in that period; `NONE` if it did not.
    pub soft_crossed_ms: i64,
    /// Event time of a gauge's latest value.
    pub gauge_time_ms: i64,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            period_start_ms: NONE,
            usage: 0,
            soft_crossed_ms: NONE,
            gauge_time_ms: NONE,
        }
    }
}

/// A customer's record (absent for customers on the default plan) and counters, indexed like
/// the catalogue's meters.
#[derive(Debug, Clone)]
pub struct CustomerState {
    pub record: Option<Arc<Customer>>,
    pub counters: Box<[Counter]>,
}

/// What a check is about.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub quantity: u64,
}

/// A check's answer with what the protocols report beside the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub verdict: Verdict,
    pub usage: u64,
    pub limit: Limit,
    pub period: Period,
    pub plan: String,
    /// The state was not loaded yet and the enforcer fails open.
    pub degraded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    UnknownMeter,
    /// The state is not loaded and the enforcer fails closed.
    NotReady,
}

/// The in-memory quota state.
pub struct State {
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    meters: HashMap<String, (usize, Aggregation)>,
    customers: DashMap<Box<str>, CustomerState>,
    default_customer: Arc<Customer>,
    ready: AtomicBool,
    fail_open: bool,
}

impl State {
    pub fn new(catalog: Arc<Catalog>, clock: Arc<dyn Clock>, fail_open: bool) -> State {
        let meters = catalog
            .meters
            .iter()
            .enumerate()
            .map(|(i, (name, m))| (name.clone(), (i, m.aggregation)))
            .collect();
        State {
            default_customer: Arc::new(Customer::new_default(&catalog)),
            catalog,
            clock,
            meters,
            customers: DashMap::new(),
            ready: AtomicBool::new(false),
            fail_open,
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn customers_len(&self) -> usize {
        self.customers.len()
    }

    fn empty_counters(&self) -> Box<[Counter]> {
        vec![Counter::default(); self.meters.len()].into_boxed_slice()
    }

    fn entry(&self, customer: &str) -> dashmap::mapref::one::RefMut<'_, Box<str>, CustomerState> {
        if let Some(e) = self.customers.get_mut(customer) {
            return e;
        }
        self.customers
            .entry(customer.into())
            .or_insert_with(|| CustomerState {
                record: None,
                counters: self.empty_counters(),
            })
    }

    /// The customer's record, or the default one.
    pub fn customer(&self, id: &str) -> Arc<Customer> {
        self.customers
            .get(id)
            .and_then(|c| c.record.clone())
            .unwrap_or_else(|| self.default_customer.clone())
    }

    /// Replaces a customer's record. Returns the record it replaced.
    pub fn set_customer(&self, id: &str, record: Customer) -> Option<Arc<Customer>> {
        let mut e = self.entry(id);
        e.record.replace(Arc::new(record))
    }

    /// Sets a counter from the store at start-up or after a period change.
    pub fn load_total(&self, customer: &str, meter: &str, period_start_ms: i64, usage: u64) {
        let Some(&(i, _)) = self.meters.get(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        let c = &mut e.counters[i];
        *c = Counter {
            period_start_ms,
            usage,
            soft_crossed_ms: NONE,
            gauge_time_ms: NONE,
        };
    }

    /// Sets a gauge from the store at start-up.
    pub fn load_gauge(&self, customer: &str, meter: &str, time_ms: i64, value: u64) {
        let Some(&(i, _)) = self.meters.get(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        let c = &mut e.counters[i];
        c.usage = value;
        c.gauge_time_ms = time_ms;
    }

    /// Restores when the soft limit was crossed, from a published notification.
    pub fn load_crossing(&self, n: &Notification) {
        if n.threshold != self.catalog.policy.soft_percent {
            return;
        }
        let Some(&(i, agg)) = self.meters.get(n.meter.as_str()) else {
            return;
        };
        let mut e = self.entry(&n.customer);
        let c = &mut e.counters[i];
        let same_period = !agg.is_additive() || c.period_start_ms == n.period_start_ms;
        if same_period && (c.soft_crossed_ms == NONE || n.crossed_ms < c.soft_crossed_ms) {
            c.soft_crossed_ms = n.crossed_ms;
        }
    }

    /// Thresholds that loaded counters already passed, for notifications that were lost (a
    /// crash between counting and publishing). Their crossing time is `now`.
    pub fn pending_crossings(&self) -> Vec<Notification> {
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        for e in self.customers.iter() {
            let record = e
                .record
                .clone()
                .unwrap_or_else(|| self.default_customer.clone());
            for (name, &(i, agg)) in &self.meters {
                let c = e.counters[i];
                let period = if agg.is_additive() {
                    if c.period_start_ms == NONE {
                        continue;
                    }
                    record.period_at(c.period_start_ms)
                } else {
                    record.period_at(now)
                };
                let limit = record.limit_at(&self.catalog, name, now);
                for t in quota::thresholds_crossed(&self.catalog.policy, limit, 0, c.usage) {
                    out.push(Notification {
                        customer: e.key().to_string(),
                        meter: name.clone(),
                        period_start_ms: period.start_ms,
                        period_end_ms: period.end_ms,
                        threshold: t,
                        usage: c.usage,
                        limit: limit.finite().unwrap_or(0),
                        crossed_ms: now,
                    });
                }
            }
        }
        out
    }

    /// Applies one log record; returns the notifications it triggers.
    pub fn apply(&self, event: &UsageEvent, out: &mut Vec<Notification>) {
        let Some(&(i, agg)) = self.meters.get(event.meter.as_str()) else {
            return;
        };
        let mut e = self.entry(&event.customer);
        let record = e
            .record
            .clone()
            .unwrap_or_else(|| self.default_customer.clone());
        let period = record.period_at(event.time_ms);
        let limit = record.limit_at(&self.catalog, &event.meter, event.time_ms);
        let c = &mut e.counters[i];
        let before;
        if agg.is_additive() {
            if period.start_ms < c.period_start_ms {
                return; // a late event of a period already closed in memory
            }
            if period.start_ms > c.period_start_ms {
                *c = Counter {
                    period_start_ms: period.start_ms,
                    ..Counter::default()
                };
            }
            before = c.usage;
            c.usage = c.usage.saturating_add(event.value);
        } else {
            if (event.time_ms, event.value) <= (c.gauge_time_ms, c.usage) {
                return;
            }
            before = if c.gauge_time_ms == NONE { 0 } else { c.usage };
            c.usage = event.value;
            c.gauge_time_ms = event.time_ms;
        }
        let policy = &self.catalog.policy;
        for t in quota::thresholds_crossed(policy, limit, before, c.usage) {
            if t == policy.soft_percent && c.soft_crossed_ms == NONE {
                c.soft_crossed_ms = event.time_ms;
            }
            out.push(Notification {
                customer: event.customer.clone(),
                meter: event.meter.clone(),
                period_start_ms: period.start_ms,
                period_end_ms: period.end_ms,
                threshold: t,
                usage: c.usage,
                limit: limit.finite().unwrap_or(0),
                crossed_ms: event.time_ms,
            });
        }
        if !agg.is_additive() && c.usage < before {
            // A gauge that went down below the soft limit ends its grace.
            let back_under = limit.finite().is_some_and(|l| {
                u128::from(c.usage) * 100 < u128::from(l) * u128::from(policy.soft_percent)
            });
            if back_under {
                c.soft_crossed_ms = NONE;
            }
        }
    }

    /// Answers a quota question from memory.
    pub fn check(&self, q: Question<'_>) -> Result<Answer, CheckError> {
        let &(i, agg) = self.meters.get(q.meter).ok_or(CheckError::UnknownMeter)?;
        let ready = self.is_ready();
        if !ready && !self.fail_open {
            return Err(CheckError::NotReady);
        }
        let now = self.clock.now_ms();
        let (record, counter) = match self.customers.get(q.customer) {
            Some(e) => (
                e.record
                    .clone()
                    .unwrap_or_else(|| self.default_customer.clone()),
                e.counters[i],
            ),
            None => (self.default_customer.clone(), Counter::default()),
        };
        let period = record.period_at(now);
        // Gauges carry over; additive usage counts only in the period it belongs to.
        let (usage, crossed) = if !agg.is_additive() || counter.period_start_ms == period.start_ms {
            (counter.usage, counter.soft_crossed_ms)
        } else {
            (0, NONE)
        };
        let limit = record.limit_at(&self.catalog, q.meter, now);
        let (plan_id, plan) = record.plan_at(&self.catalog, now);
        let verdict = quota::decide(
            &self.catalog.policy,
            limit,
            plan.on_limit,
            usage,
            q.quantity,
            (crossed != NONE).then_some(crossed),
            now,
        );
        Ok(Answer {
            verdict,
            usage,
            limit,
            period,
            plan: plan_id.to_owned(),
            degraded: !ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::period::parse_rfc3339;
    use tally_schemas::{Decision, ManualClock};

    fn ms(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    fn ev(customer: &str, meter: &str, value: u64, time: &str) -> UsageEvent {
        UsageEvent {
            id: String::new(),
            source: String::new(),
            customer: customer.into(),
            meter: meter.into(),
            value,
            time_ms: ms(time),
            received_ms: ms(time),
        }
    }

    fn state(now: &str) -> (State, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(ms(now)));
        let s = State::new(Arc::new(Catalog::builtin()), clock.clone(), false);
        s.set_ready();
        (s, clock)
    }

    fn ask<'a>(customer: &'a str, meter: &'a str, quantity: u64) -> Question<'a> {
        Question {
            customer,
            meter,
            quantity,
        }
    }

    #[test]
    fn counts_per_period_and_notifies_once_per_threshold() {
        let (s, clock) = state("2026-11-21T10:00:00Z");
        let mut notes = Vec::new();
        s.apply(
            &ev("c", "api_requests", 7_999, "2026-11-20T00:00:00Z"),
            &mut notes,
        );
        assert!(notes.is_empty());
        s.apply(
            &ev("c", "api_requests", 1, "2026-11-20T00:01:00Z"),
            &mut notes,
        );
        assert_eq!(
            notes.iter().map(|n| n.threshold).collect::<Vec<_>>(),
            vec![80]
        );
        s.apply(
            &ev("c", "api_requests", 1, "2026-11-20T00:02:00Z"),
            &mut notes,
        );
        assert_eq!(notes.len(), 1);
        // Last month's late event does not count toward this month.
        s.apply(
            &ev("c", "api_requests", 5_000, "2026-10-31T23:59:59Z"),
            &mut notes,
        );
        let a = s.check(ask("c", "api_requests", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (8_001, Decision::Warn));
        assert_eq!(a.period.start_ms, ms("2026-11-01T00:00:00Z"));
        s.apply(
            &ev("c", "api_requests", 3_000, "2026-11-20T00:03:00Z"),
            &mut notes,
        );
        assert_eq!(
            notes.iter().map(|n| n.threshold).collect::<Vec<_>>(),
            vec![80, 100, 110]
        );
        assert_eq!(
            s.check(ask("c", "api_requests", 0))
                .unwrap()
                .verdict
                .decision,
            Decision::Block
        );
        // Next period starts from zero.
        s.apply(
            &ev("c", "api_requests", 1, "2026-12-01T00:00:00Z"),
            &mut notes,
        );
        assert_eq!(notes.len(), 3);
        clock.set(ms("2026-12-01T00:00:01Z"));
        let a = s.check(ask("c", "api_requests", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (1, Decision::Allow));
    }

    #[test]
    fn a_check_in_a_new_period_sees_zero_before_any_event() {
        let (s, clock) = state("2026-11-30T23:59:00Z");
        s.apply(
            &ev("c", "api_requests", 20_000, "2026-11-30T00:00:00Z"),
            &mut Vec::new(),
        );
        assert_eq!(
            s.check(ask("c", "api_requests", 1))
                .unwrap()
                .verdict
                .decision,
            Decision::Block
        );
        clock.set(ms("2026-12-01T00:00:00Z"));
        let a = s.check(ask("c", "api_requests", 1)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (0, Decision::Allow));
    }

    #[test]
    fn grace_runs_from_the_crossing_event() {
        let (s, clock) = state("2026-11-21T10:00:00Z");
        s.apply(
            &ev("c", "api_requests", 10_500, "2026-11-21T10:00:00Z"),
            &mut Vec::new(),
        );
        let a = s.check(ask("c", "api_requests", 0)).unwrap();
        assert_eq!(a.verdict.decision, Decision::Warn);
        assert_eq!(a.verdict.grace_until_ms, Some(ms("2026-11-23T10:00:00Z")));
        clock.set(ms("2026-11-23T09:59:59Z"));
        assert_eq!(
            s.check(ask("c", "api_requests", 0))
                .unwrap()
                .verdict
                .decision,
            Decision::Warn
        );
        clock.set(ms("2026-11-23T10:00:00Z"));
        assert_eq!(
            s.check(ask("c", "api_requests", 0))
                .unwrap()
                .verdict
                .decision,
            Decision::Block
        );
    }

    #[test]
    fn gauges_carry_over_and_ignore_older_reports() {
        let (s, clock) = state("2026-11-21T10:00:00Z");
        s.apply(
            &ev("c", "wasm_modules", 2, "2026-11-21T09:00:00Z"),
            &mut Vec::new(),
        );
        s.apply(
            &ev("c", "wasm_modules", 9, "2026-11-21T08:00:00Z"),
            &mut Vec::new(),
        );
        let a = s.check(ask("c", "wasm_modules", 1)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (2, Decision::Warn));
        assert_eq!(a.verdict.threshold, Some(100));
        assert_eq!(
            s.check(ask("c", "wasm_modules", 2))
                .unwrap()
                .verdict
                .decision,
            Decision::Block
        );
        clock.set(ms("2026-12-05T00:00:00Z"));
        assert_eq!(s.check(ask("c", "wasm_modules", 0)).unwrap().usage, 2);
    }

    #[test]
    fn plans_overrides_unknown_meters_and_fail_closed() {
        let (s, _) = state("2026-11-21T10:00:00Z");
        let mut rec = Customer::new_default(s.catalog());
        rec.plan = "enterprise".into();
        s.set_customer("big", rec.clone());
        s.apply(
            &ev("big", "build_minutes", 1_000_000, "2026-11-21T09:00:00Z"),
            &mut Vec::new(),
        );
        let a = s.check(ask("big", "build_minutes", 1)).unwrap();
        assert_eq!(
            (a.verdict.decision, a.limit, a.plan.as_str()),
            (Decision::Allow, Limit::Unlimited, "enterprise")
        );
        rec.limit_overrides
            .insert("api_requests".into(), Limit::Finite(100));
        s.set_customer("big", rec);
        assert_eq!(
            s.check(ask("big", "api_requests", 100))
                .unwrap()
                .verdict
                .threshold,
            Some(100)
        );
        assert_eq!(
            s.check(ask("big", "gpu_hours", 1)),
            Err(CheckError::UnknownMeter)
        );
        let closed = State::new(
            Arc::new(Catalog::builtin()),
            Arc::new(ManualClock::new(0)),
            false,
        );
        assert_eq!(
            closed.check(ask("c", "api_requests", 1)),
            Err(CheckError::NotReady)
        );
        let open = State::new(
            Arc::new(Catalog::builtin()),
            Arc::new(ManualClock::new(0)),
            true,
        );
        assert!(open.check(ask("c", "api_requests", 1)).unwrap().degraded);
    }

    #[test]
    fn overage_plans_never_block() {
        let mut cat = Catalog::builtin();
        cat.plans.get_mut("starter").unwrap().on_limit = tally_schemas::OnLimit::Overage;
        let s = State::new(
            Arc::new(cat),
            Arc::new(ManualClock::new(ms("2026-11-21T10:00:00Z"))),
            false,
        );
        s.set_ready();
        let mut rec = Customer::new_default(s.catalog());
        rec.plan = "starter".into();
        s.set_customer("c", rec);
        s.apply(
            &ev("c", "api_requests", 500_000, "2026-11-21T09:00:00Z"),
            &mut Vec::new(),
        );
        let a = s.check(ask("c", "api_requests", 1)).unwrap();
        assert_eq!(
            (a.verdict.decision, a.verdict.threshold),
            (Decision::Warn, Some(110))
        );
    }
}
