//! The enforcer's in-memory state: per customer, its resolved plan, billing period and one
//! counter per meter.
//!
//! Counters are updated from the log in log order and only from event data (event times, the
//! customer records), so replicas that applied the same records hold the same counters and give
//! the same answers. Additive counters hold the usage of the latest billing period they saw;
//! gauges hold the latest value by event time. An event of the next period (clock skew allows
//! events up to a few minutes ahead) moves its counter to that period: until the clock reaches
//! that period, checks see no usage on that meter, which errs on the side of allowing.
//!
//! # The check path
//! A check is one map lookup and arithmetic. Plans are resolved once, at start, into limits by
//! meter index. A customer with a stored record keeps it resolved (plan index, overrides by
//! meter index) with the billing period of its last check, recomputed only when the clock leaves
//! it; customers without a record share one cached calendar month. Counters are sparse: a
//! customer holds one only for each meter it used, the first inline.
//!
//! # Meters added at runtime
//! A meter created through `/v1/meters` joins the state without a restart
//! ([`State::set_catalog`]): meters keep their index, new ones are appended (255 at most, the
//! catalogue's cap). Plans, from the catalogue file, do not limit such a meter; a customer's
//! limit override may, and the records naming one are resolved again when it joins.
//!
//! # Distinct values
//! A `unique_count` meter's counter is the number of distinct values of the period; beside it
//! the state keeps a set of the values' 64-bit hashes (fixed seed: every replica hashes alike),
//! so a value seen again adds nothing. Two values with one hash would count once: at a million
//! values of a period the odds are about 3 in 10^8. The figures billed come from the store,
//! which keeps the values themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::time::Duration;

use arc_swap::ArcSwap;
use compact_str::CompactString;
use dashmap::DashMap;
use foldhash::fast::RandomState;
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tally_backends::catalog::LiveCatalog;
use tally_schemas::period::{Period, calendar_month};
use tally_schemas::quota::{self, Verdict};
use tally_schemas::{
    Aggregation, Catalog, Clock, Customer, Limit, Notification, OnLimit, UsageEvent,
};

/// One (customer, meter) counter: 24 bytes. A customer holds counters only for the meters it
/// used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Usage in the period (the sum, or the largest or smallest value), or the gauge's latest
    /// value.
    pub usage: u64,
    /// Periodic meters: start of the billing period `usage` belongs to (any earlier time: no
    /// usage in the current period). Gauges: event time of the latest value. `i64::MIN`
    /// before the first event.
    pub time_ms: i64,
    /// When usage first reached the soft limit in that period, in seconds since the epoch;
    /// 0 if it did not.
    pub soft_crossed_s: u32,
    /// Index of the counter's meter in the catalogue (fits in the struct's padding).
    pub meter: u8,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            usage: 0,
            time_ms: i64::MIN,
            soft_crossed_s: 0,
            meter: 0,
        }
    }
}

impl Counter {
    fn soft_crossed_ms(&self) -> Option<i64> {
        (self.soft_crossed_s != 0).then(|| i64::from(self.soft_crossed_s) * 1000)
    }

    fn set_soft_crossed(&mut self, ms: i64) {
        // Seconds, rounded up so the grace never starts before the crossing; 0 means "none".
        let secs = ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0);
        self.soft_crossed_s = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
    }
}

/// The hashes of the values a `unique_count` counter saw in its period.
#[derive(Debug, Default)]
struct DistinctSet {
    period_start_ms: i64,
    hashes: std::collections::HashSet<u64, RandomState>,
}

/// Hashes `unique_count` values, alike in every process.
const DISTINCT_HASH: foldhash::quality::FixedState =
    foldhash::quality::FixedState::with_seed(0x7a11_7a11_d157_1c75);

/// Token buckets of one plan, keyed by a hash of the customer id.
type PlanLimiter =
    RateLimiter<u64, DashMapStateStore<u64>, DefaultClock, StateInformationMiddleware>;

/// A plan, resolved for the check path.
struct ResolvedPlan {
    id: Arc<str>,
    /// Limit by meter index.
    limits: Box<[Limit]>,
    on_limit: OnLimit,
    /// The plan's request-rate limit, if it has one: (per second, burst, buckets).
    rate: Option<(u32, u32, PlanLimiter)>,
}

/// The outcome of a plan's request-rate limit for one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOutcome {
    pub per_second: u32,
    pub burst: u32,
    /// Checks left in the burst after this one.
    pub remaining: u32,
    /// Set when the check was refused: how long until one is allowed again.
    pub retry_after: Option<Duration>,
}

/// A customer: counters for the meters it used and, for customers with a stored record, that
/// record resolved against the catalogue. Customers without a record (most of them, on the
/// default plan and calendar months) and with one meter cost a key and 32 bytes: the first
/// counter is inline, everything else is behind one optional pointer.
#[derive(Debug)]
pub struct CustomerState {
    /// The first meter used; `meter == NO_METER` while the customer has no counter.
    first: Counter,
    tail: Option<Box<Tail>>,
}

/// Marks an unused inline counter.
const NO_METER: u8 = u8::MAX;

// The memory goal (<= 100 bytes per counter at 10M counters) rests on these sizes.
const _: () = assert!(std::mem::size_of::<Counter>() == 24);
const _: () = assert!(std::mem::size_of::<CustomerState>() == 32);

impl Default for CustomerState {
    fn default() -> Self {
        CustomerState {
            first: Counter {
                meter: NO_METER,
                ..Counter::default()
            },
            tail: None,
        }
    }
}

/// What few customers have: more than one meter, or a stored record. Kept small (32 bytes)
/// and allocated exactly, for customers using every meter.
#[derive(Debug, Default)]
struct Tail {
    extra: Option<Box<CustomerExtra>>,
    counters: Vec<Counter>,
}

/// What a stored customer record adds.
#[derive(Debug)]
struct CustomerExtra {
    record: Arc<Customer>,
    /// Index of the record's plan.
    plan: usize,
    /// Limit overrides by meter index, if any.
    overrides: Option<Box<[Option<Limit>]>>,
    /// When each meter's limit last changed, by meter index, if any did.
    limit_changed_ms: Option<Box<[Option<i64>]>>,
    /// From here on the fallback plan applies (a failed payment's grace ran out).
    fallback_from_ms: i64,
    /// The billing period of the last check; refreshed when the clock leaves it.
    period: Period,
}

impl CustomerState {
    fn extra(&self) -> Option<&CustomerExtra> {
        self.tail.as_ref().and_then(|t| t.extra.as_deref())
    }

    fn extra_mut(&mut self) -> Option<&mut CustomerExtra> {
        self.tail.as_mut().and_then(|t| t.extra.as_deref_mut())
    }

    /// Replaces the stored record's part; returns the previous one.
    fn set_extra(&mut self, extra: CustomerExtra) -> Option<Box<CustomerExtra>> {
        self.tail
            .get_or_insert_default()
            .extra
            .replace(Box::new(extra))
    }

    /// The counter of meter `i` (a zero counter if the customer never used it).
    fn counter(&self, i: usize) -> Counter {
        if usize::from(self.first.meter) == i {
            return self.first;
        }
        self.tail
            .as_ref()
            .and_then(|t| t.counters.iter().find(|c| usize::from(c.meter) == i))
            .copied()
            .unwrap_or_default()
    }

    fn counter_mut(&mut self, i: usize) -> &mut Counter {
        let fresh = Counter {
            meter: i as u8,
            ..Counter::default()
        };
        if self.first.meter == NO_METER {
            self.first = fresh;
        }
        if usize::from(self.first.meter) == i {
            return &mut self.first;
        }
        let rest = &mut self.tail.get_or_insert_default().counters;
        let at = match rest.iter().position(|c| usize::from(c.meter) == i) {
            Some(at) => at,
            None => {
                rest.reserve_exact(1);
                rest.push(fresh);
                rest.len() - 1
            }
        };
        &mut rest[at]
    }
}

/// What a check is about.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub quantity: u64,
    /// A request passing through a gateway (forward-auth, ext_authz, the rate limit service):
    /// it counts against the plan's request rate whatever its quantity. Otherwise (the check
    /// API) quantity 0 is a status query and does not count.
    pub passing: bool,
}

/// A check's answer with what the protocols report beside the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub verdict: Verdict,
    pub usage: u64,
    pub limit: Limit,
    pub period: Period,
    pub plan: Arc<str>,
    /// The plan's request-rate limit, when it has one and the check was rate limited.
    pub rate: Option<RateOutcome>,
    /// The state was not loaded yet and the enforcer fails open.
    pub degraded: bool,
    /// The clock when the decision was taken, milliseconds since the epoch.
    pub now_ms: i64,
}

impl Answer {
    /// Blocked by the request-rate limit rather than by the quota.
    pub fn rate_limited(&self) -> bool {
        self.rate.is_some_and(|r| r.retry_after.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    UnknownMeter,
    /// The state is not loaded and the enforcer fails closed.
    NotReady,
}

const NO_PERIOD: Period = Period {
    start_ms: 0,
    end_ms: 0,
};

/// The meters the state knows, by index.
struct MeterTable {
    /// The catalogue they come from.
    catalog: Arc<Catalog>,
    by_name: HashMap<String, (usize, Aggregation), RandomState>,
    /// Names by index.
    names: Vec<String>,
}

impl MeterTable {
    /// `catalog`'s meters: `before`'s keep their index, others follow in the catalogue's
    /// stable order (those past the cap of 255 are left out, reported).
    fn extend(before: Option<&MeterTable>, catalog: Arc<Catalog>) -> MeterTable {
        let mut names = before.map(|t| t.names.clone()).unwrap_or_default();
        for name in catalog.meter_order() {
            if before.is_some_and(|t| t.by_name.contains_key(name)) {
                continue;
            }
            if names.len() >= usize::from(NO_METER) {
                tracing::error!(
                    meter = name,
                    "the enforcer holds 255 meters; this one is not enforced"
                );
                continue;
            }
            names.push(name.to_owned());
        }
        let by_name = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let agg = catalog.meter(n).map_or(Aggregation::Sum, |m| m.aggregation);
                (n.clone(), (i, agg))
            })
            .collect();
        MeterTable {
            catalog,
            by_name,
            names,
        }
    }
}

/// The in-memory quota state.
pub struct State {
    /// The catalogue at start: plans and policy (the catalogue file's, which do not change).
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    /// The meters, grown by [`State::set_catalog`].
    meters: ArcSwap<MeterTable>,
    /// Serialises [`State::set_catalog`].
    extending: std::sync::Mutex<()>,
    /// Where a newer catalogue comes from, if anywhere.
    live: Option<Arc<LiveCatalog>>,
    plans: Vec<ResolvedPlan>,
    plan_index: HashMap<String, usize, RandomState>,
    default_plan: usize,
    fallback_plan: usize,
    /// Hashes customer ids for the rate limiters (no allocation per check).
    rate_keys: RandomState,
    customers: DashMap<CompactString, CustomerState, RandomState>,
    /// Per (customer, meter index) of `unique_count` meters. Locked only while its customer's
    /// entry in `customers` is (or after that entry was released), never the other way round.
    distinct: DashMap<(CompactString, u8), DistinctSet, RandomState>,
    default_customer: Arc<Customer>,
    /// Stands for every customer never seen: default plan, no usage.
    unseen: CustomerState,
    /// The calendar month of the last check of a customer never seen.
    month: RwLock<Period>,
    ready: AtomicBool,
    fail_open: bool,
    /// Notifications of thresholds that limit changes crossed, for the follower to publish.
    crossed_by_changes: std::sync::Mutex<Vec<Notification>>,
    /// Woken when notifications are queued.
    queued: tokio::sync::Notify,
}

impl State {
    pub fn new(catalog: Arc<Catalog>, clock: Arc<dyn Clock>, fail_open: bool) -> State {
        let meters = MeterTable::extend(None, catalog.clone());
        let plans: Vec<ResolvedPlan> = catalog
            .plans
            .iter()
            .map(|(id, plan)| ResolvedPlan {
                id: Arc::from(id.as_str()),
                limits: meters.names.iter().map(|m| plan.limit(m)).collect(),
                on_limit: plan.on_limit,
                rate: plan.rate_limit.and_then(|r| {
                    let per_second = NonZeroU32::new(r.per_second)?;
                    let burst = NonZeroU32::new(r.burst.max(1))?;
                    let quota = Quota::per_second(per_second).allow_burst(burst);
                    let limiter = RateLimiter::dashmap_with_clock(quota, DefaultClock::default())
                        .with_middleware::<StateInformationMiddleware>();
                    Some((r.per_second, burst.get(), limiter))
                }),
            })
            .collect();
        let plan_index: HashMap<String, usize, RandomState> = catalog
            .plans
            .keys()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let default_plan = plan_index[&catalog.policy.default_plan];
        let unseen = CustomerState::default();
        State {
            rate_keys: RandomState::default(),
            unseen,
            default_plan,
            fallback_plan: plan_index[&catalog.policy.fallback_plan],
            default_customer: Arc::new(Customer::new_default(&catalog)),
            month: RwLock::new(NO_PERIOD),
            crossed_by_changes: std::sync::Mutex::new(Vec::new()),
            queued: tokio::sync::Notify::new(),
            catalog,
            clock,
            meters: ArcSwap::from_pointee(meters),
            extending: std::sync::Mutex::new(()),
            live: None,
            plans,
            plan_index,
            customers: DashMap::with_hasher(RandomState::default()),
            distinct: DashMap::with_hasher(RandomState::default()),
            ready: AtomicBool::new(false),
            fail_open,
        }
    }

    /// A state that follows `live`'s meters ([`State::live`]).
    pub fn following(live: Arc<LiveCatalog>, clock: Arc<dyn Clock>, fail_open: bool) -> State {
        let mut state = State::new(live.get(), clock, fail_open);
        state.live = Some(live);
        state
    }

    /// The live catalogue this state follows, if any.
    pub fn live(&self) -> Option<&Arc<LiveCatalog>> {
        self.live.as_ref()
    }

    /// The catalogue in force: the file's plans and policy, and every meter the state knows.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.meters.load().catalog.clone()
    }

    /// Puts `catalog` in force: its new meters join (see the module docs), a changed
    /// aggregation of a known meter applies (the API allows that only while a meter has no
    /// usage). Plans and policy stay the state's first catalogue's.
    pub fn set_catalog(&self, catalog: Arc<Catalog>) {
        let _one = self.extending.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.meters.load_full();
        if Arc::ptr_eq(&before.catalog, &catalog) {
            return;
        }
        let next = MeterTable::extend(Some(&before), catalog);
        let added: Vec<String> = next.names[before.names.len()..].to_vec();
        self.meters.store(Arc::new(next));
        if added.is_empty() {
            return;
        }
        tracing::info!(meters = ?added, "meters joined the enforcer");
        // Records naming a new meter (an override set before this process knew it) resolve
        // again, now that it has an index.
        let names = |c: &Customer| {
            c.limit_overrides
                .keys()
                .chain(c.limit_changed_ms.keys())
                .any(|m| added.contains(m))
        };
        let again: Vec<(CompactString, Customer)> = self
            .customers
            .iter()
            .filter_map(|e| {
                let x = e.extra()?;
                names(&x.record).then(|| (e.key().clone(), (*x.record).clone()))
            })
            .collect();
        for (id, record) in again {
            self.set_customer(&id, record);
        }
    }

    /// The index and aggregation of a meter the state knows.
    fn meter(&self, name: &str) -> Option<(usize, Aggregation)> {
        self.meters.load().by_name.get(name).copied()
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

    fn entry(
        &self,
        customer: &str,
    ) -> dashmap::mapref::one::RefMut<'_, CompactString, CustomerState> {
        if let Some(e) = self.customers.get_mut(customer) {
            return e;
        }
        self.customers
            .entry(CompactString::from(customer))
            .or_default()
    }

    /// The customer's record, or the default one.
    pub fn customer(&self, id: &str) -> Arc<Customer> {
        self.customers
            .get(id)
            .and_then(|c| c.extra().map(|x| x.record.clone()))
            .unwrap_or_else(|| self.default_customer.clone())
    }

    fn record_of(&self, c: &CustomerState) -> Arc<Customer> {
        c.extra()
            .map(|x| x.record.clone())
            .unwrap_or_else(|| self.default_customer.clone())
    }

    /// Replaces a customer's record. Returns the record it replaced.
    pub fn set_customer(&self, id: &str, record: Customer) -> Option<Arc<Customer>> {
        let plan = self
            .plan_index
            .get(&record.plan)
            .copied()
            .unwrap_or(self.default_plan);
        let meters = self.meters.load();
        let overrides = (!record.limit_overrides.is_empty()).then(|| {
            meters
                .names
                .iter()
                .map(|m| record.limit_overrides.get(m).copied())
                .collect()
        });
        let limit_changed_ms = (!record.limit_changed_ms.is_empty()).then(|| {
            meters
                .names
                .iter()
                .map(|m| record.limit_changed_ms.get(m).copied())
                .collect()
        });
        let fallback_from_ms = record
            .payment_grace_until(&self.catalog)
            .unwrap_or(i64::MAX);
        let mut e = self.entry(id);
        e.set_extra(CustomerExtra {
            record: Arc::new(record),
            plan,
            overrides,
            limit_changed_ms,
            fallback_from_ms,
            period: NO_PERIOD,
        })
        .map(|x| x.record)
    }

    /// Thresholds that customer `id`'s usage reaches under its limits in force at `now_ms` and
    /// did not under `old`'s (a limit lowered or a plan changed): notified at `now_ms`, which
    /// is also when the soft-limit grace starts if the soft limit is among them. Called after
    /// [`State::set_customer`]; notifications are deduplicated per period downstream as usual.
    pub fn limit_crossings(
        &self,
        id: &str,
        old: Option<&Customer>,
        now_ms: i64,
    ) -> Vec<Notification> {
        let default = Customer::new_default(&self.catalog);
        let old = old.unwrap_or(&default);
        let policy = &self.catalog.policy;
        let mut out = Vec::new();
        let Some(mut e) = self.customers.get_mut(id) else {
            return out;
        };
        let record = self.record_of(&e);
        let period = record.period_at(now_ms);
        let meters = self.meters.load();
        for (name, &(i, agg)) in &meters.by_name {
            let before = old.limit_at(&self.catalog, name, now_ms);
            let after = self.limit_of(&e, i, now_ms);
            let (Some(after_l), true) = (after.finite(), before != after) else {
                continue;
            };
            let c = e.counter_mut(i);
            let counted = !agg.is_periodic() || c.time_ms == period.start_ms;
            let usage = if counted { c.usage } else { 0 };
            for t in [
                policy.warn_percent,
                policy.soft_percent,
                policy.block_percent,
            ] {
                let was = before.finite().is_some_and(|l| quota::reaches(usage, l, t));
                if !quota::reaches(usage, after_l, t) || was {
                    continue;
                }
                if t == policy.soft_percent && counted {
                    c.set_soft_crossed(now_ms);
                }
                out.push(Notification {
                    customer: id.to_owned(),
                    meter: name.clone(),
                    period_start_ms: period.start_ms,
                    period_end_ms: period.end_ms,
                    threshold: t,
                    usage,
                    limit: after_l,
                    crossed_ms: now_ms,
                });
            }
        }
        out
    }

    /// Forgets customers whose state is the same as a customer never seen: no stored record,
    /// no usage of an additive meter in the current calendar month and no gauge (a gauge
    /// keeps its latest report's time, which orders late reports).
    /// Nothing is lost (their next event starts them again, as it would have); it bounds the
    /// memory to the customers active this period and those with a record. Returns how many
    /// were forgotten.
    pub fn evict_idle(&self) -> usize {
        let month = calendar_month(self.clock.now_ms()).start_ms;
        let meters = self.meters.load();
        let mut additive = vec![false; meters.names.len()];
        for &(i, agg) in meters.by_name.values() {
            additive[i] = agg.is_periodic();
        }
        let idle = |c: &Counter| {
            c.meter == NO_METER
                || match additive.get(usize::from(c.meter)) {
                    Some(true) => c.time_ms < month,
                    Some(false) => c.time_ms == i64::MIN,
                    None => true,
                }
        };
        let before = self.customers.len();
        let mut forgotten = Vec::new();
        self.customers.retain(|id, c| {
            let tail_idle = c
                .tail
                .as_ref()
                .is_none_or(|t| t.extra.is_none() && t.counters.iter().all(idle));
            let keep = !(tail_idle && idle(&c.first));
            if !keep {
                forgotten.push(id.clone());
            }
            keep
        });
        if !self.distinct.is_empty() {
            // Their sets belong to earlier periods: the next event starts a new one anyway.
            for id in forgotten {
                for &(i, agg) in meters.by_name.values() {
                    if agg == Aggregation::UniqueCount {
                        self.distinct.remove(&(id.clone(), i as u8));
                    }
                }
            }
        }
        before - self.customers.len()
    }

    /// Queues notifications for the follower to publish ([`State::take_queued`]).
    pub fn queue(&self, notes: Vec<Notification>) {
        if !notes.is_empty()
            && let Ok(mut q) = self.crossed_by_changes.lock()
        {
            q.extend(notes);
            self.queued.notify_one();
        }
    }

    /// Completes when notifications were queued since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await
    }

    /// The notifications queued by [`State::queue`].
    pub fn take_queued(&self) -> Vec<Notification> {
        self.crossed_by_changes
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Sets a counter from the store at start-up or after a period change.
    pub fn load_total(&self, customer: &str, meter: &str, period_start_ms: i64, usage: u64) {
        let Some((i, _)) = self.meter(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        *e.counter_mut(i) = Counter {
            usage,
            time_ms: period_start_ms,
            soft_crossed_s: 0,
            meter: i as u8,
        };
    }

    /// Sets a `unique_count` counter from the store: the values seen in the period starting at
    /// `period_start_ms` (at start-up, or after a period change), whatever it held before.
    pub fn load_distinct<'v>(
        &self,
        customer: &str,
        meter: &str,
        period_start_ms: i64,
        values: impl IntoIterator<Item = &'v str>,
    ) {
        let Some((i, Aggregation::UniqueCount)) = self.meter(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        let mut set = self
            .distinct
            .entry((CompactString::from(customer), i as u8))
            .or_default();
        set.period_start_ms = period_start_ms;
        set.hashes.clear();
        set.hashes
            .extend(values.into_iter().map(|v| DISTINCT_HASH.hash_one(v)));
        *e.counter_mut(i) = Counter {
            usage: set.hashes.len() as u64,
            time_ms: period_start_ms,
            soft_crossed_s: 0,
            meter: i as u8,
        };
    }

    /// Whether `value` is new to customer's set of meter `i` for the period starting at
    /// `period_start_ms` (a set of an earlier period starts afresh). Called with the customer's
    /// entry held.
    fn first_in_period(&self, customer: &str, i: usize, period_start_ms: i64, value: &str) -> bool {
        let mut set = self
            .distinct
            .entry((CompactString::from(customer), i as u8))
            .or_default();
        if set.period_start_ms != period_start_ms {
            set.period_start_ms = period_start_ms;
            set.hashes.clear();
        }
        set.hashes.insert(DISTINCT_HASH.hash_one(value))
    }

    /// Marks a periodic counter as holding no usage of the period starting at
    /// `period_start_ms` (its next event there starts it), whatever it held before.
    pub fn clear_period(&self, customer: &str, meter: &str, period_start_ms: i64) {
        let Some((i, _)) = self.meter(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        *e.counter_mut(i) = Counter {
            time_ms: period_start_ms.saturating_sub(1),
            meter: i as u8,
            ..Counter::default()
        };
    }

    /// Sets a gauge from the store at start-up.
    pub fn load_gauge(&self, customer: &str, meter: &str, time_ms: i64, value: u64) {
        let Some((i, _)) = self.meter(meter) else {
            return;
        };
        let mut e = self.entry(customer);
        let c = e.counter_mut(i);
        c.usage = value;
        c.time_ms = time_ms;
    }

    /// Restores when the soft limit was crossed, from a published notification.
    pub fn load_crossing(&self, n: &Notification) {
        if n.threshold != self.catalog.policy.soft_percent {
            return;
        }
        let Some((i, agg)) = self.meter(n.meter.as_str()) else {
            return;
        };
        let mut e = self.entry(&n.customer);
        let c = e.counter_mut(i);
        let same_period = !agg.is_periodic() || c.time_ms == n.period_start_ms;
        if same_period && c.soft_crossed_ms().is_none_or(|t| n.crossed_ms < t) {
            c.set_soft_crossed(n.crossed_ms);
        }
    }

    /// Thresholds that loaded counters already passed, for notifications that were lost (a
    /// crash between counting and publishing). Their crossing time is `now`.
    pub fn pending_crossings(&self) -> Vec<Notification> {
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        let meters = self.meters.load();
        for e in self.customers.iter() {
            let record = self.record_of(&e);
            for (name, &(i, agg)) in &meters.by_name {
                let c = e.counter(i);
                if c.time_ms == i64::MIN {
                    continue;
                }
                let period = if agg.is_periodic() {
                    if c.time_ms == i64::MIN {
                        continue;
                    }
                    record.period_at(c.time_ms)
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

    /// Applies one log record: each meter it feeds; pushes the notifications it triggers.
    pub fn apply(&self, event: &UsageEvent, out: &mut Vec<Notification>) {
        for r in event.readings() {
            self.apply_reading(event, r.meter, r.value, r.distinct, out);
        }
    }

    /// Applies one meter's reading of `event`.
    fn apply_reading(
        &self,
        event: &UsageEvent,
        meter: &str,
        value: u64,
        distinct: Option<&str>,
        out: &mut Vec<Notification>,
    ) {
        let Some((i, agg)) = self.meter(meter) else {
            return;
        };
        let mut e = self.entry(&event.customer);
        let period = match e.extra() {
            None => self.calendar_month(event.time_ms),
            Some(x) if x.period.contains(event.time_ms) => x.period,
            Some(x) => x.record.period_at(event.time_ms),
        };
        let limit = self.limit_of(&e, i, event.time_ms);
        let limit_since = self.limit_since(&e, i, event.time_ms);
        let policy = &self.catalog.policy;
        let c = e.counter_mut(i);
        let before;
        if agg.is_periodic() {
            if period.start_ms < c.time_ms {
                return; // a late event of a period already closed in memory
            }
            let value = if agg == Aggregation::UniqueCount {
                let value = distinct.unwrap_or_default();
                let new = self.first_in_period(&event.customer, i, period.start_ms, value);
                if !new && period.start_ms == c.time_ms {
                    return; // a value this period already counted
                }
                u64::from(new)
            } else {
                value
            };
            if period.start_ms > c.time_ms {
                *c = Counter {
                    time_ms: period.start_ms,
                    meter: i as u8,
                    ..Counter::default()
                };
                before = 0;
                c.usage = value;
            } else {
                before = c.usage;
                c.usage = agg.fold(c.usage, value);
            }
        } else {
            if (event.time_ms, value) <= (c.time_ms, c.usage) {
                return;
            }
            before = if c.time_ms == i64::MIN { 0 } else { c.usage };
            c.usage = value;
            c.time_ms = event.time_ms;
        }
        for t in quota::thresholds_crossed(policy, limit, before, c.usage) {
            // A crossing of the soft limit in force; one recorded against an earlier limit
            // (before the change) gives way to it.
            if t == policy.soft_percent
                && c.soft_crossed_ms()
                    .is_none_or(|crossed| limit_since.is_some_and(|since| crossed < since))
            {
                c.set_soft_crossed(event.time_ms);
            }
            out.push(Notification {
                customer: event.customer.clone(),
                meter: meter.to_owned(),
                period_start_ms: period.start_ms,
                period_end_ms: period.end_ms,
                threshold: t,
                usage: c.usage,
                limit: limit.finite().unwrap_or(0),
                crossed_ms: event.time_ms,
            });
        }
        if c.usage < before {
            // A gauge or a smallest value that went back below the soft limit ends its grace.
            let back_under = limit
                .finite()
                .is_some_and(|l| !quota::reaches(c.usage, l, policy.soft_percent));
            if back_under {
                c.soft_crossed_s = 0;
            }
        }
    }

    /// For an event of an additive meter: the start of its billing period and how much more
    /// the customer's total of that period may grow before the usage cap
    /// ([`tally_schemas::quantity::MAX`]), as far as this state has counted. `None` for a gauge
    /// or an unknown meter. Ingest refuses an event larger than the room
    /// (`usage_cap_exceeded`) when it shares the process with the enforcer.
    pub fn room(&self, customer: &str, meter: &str, time_ms: i64) -> Option<(i64, u64)> {
        let (i, agg) = self.meter(meter)?;
        if !agg.is_additive() {
            return None;
        }
        let max = tally_schemas::quantity::MAX;
        let Some(e) = self.customers.get(customer) else {
            return Some((self.calendar_month(time_ms).start_ms, max));
        };
        let period = match e.extra() {
            None => self.calendar_month(time_ms),
            Some(x) if x.period.contains(time_ms) => x.period,
            Some(x) => x.record.period_at(time_ms),
        };
        let c = e.counter(i);
        let used = if c.time_ms == period.start_ms {
            c.usage
        } else {
            0
        };
        Some((period.start_ms, max.saturating_sub(used)))
    }

    /// The plan in force for a customer at `now_ms`.
    fn plan_of(&self, c: &CustomerState, now_ms: i64) -> &ResolvedPlan {
        match c.extra() {
            None => &self.plans[self.default_plan],
            Some(x) if now_ms >= x.fallback_from_ms => &self.plans[self.fallback_plan],
            Some(x) => &self.plans[x.plan],
        }
    }

    /// When meter `i`'s limit in force at `now_ms` took effect, if it changed
    /// ([`tally_schemas::customer::Customer::limit_since`]): the change time resolved by meter
    /// index, and only once the fallback plan applies the record's own rule.
    fn limit_since(&self, c: &CustomerState, i: usize, now_ms: i64) -> Option<i64> {
        let x = c.extra()?;
        if now_ms >= x.fallback_from_ms {
            let meters = self.meters.load();
            let meter = meters.names.get(i)?;
            return x.record.limit_since(&self.catalog, meter, now_ms);
        }
        x.limit_changed_ms
            .as_ref()
            .and_then(|v| v.get(i).copied().flatten())
    }

    /// The limit on meter `i` for a customer at `now_ms`.
    fn limit_of(&self, c: &CustomerState, i: usize, now_ms: i64) -> Limit {
        if let Some(x) = c.extra()
            && now_ms < x.fallback_from_ms
            && let Some(l) = x
                .overrides
                .as_ref()
                .and_then(|o| o.get(i).copied().flatten())
        {
            return l;
        }
        // A meter that joined after the plans were resolved: plans do not limit it.
        self.plan_of(c, now_ms)
            .limits
            .get(i)
            .copied()
            .unwrap_or(Limit::Unlimited)
    }

    fn calendar_month(&self, now_ms: i64) -> Period {
        if let Ok(m) = self.month.read()
            && m.contains(now_ms)
        {
            return *m;
        }
        let m = calendar_month(now_ms);
        if let Ok(mut w) = self.month.write() {
            *w = m;
        }
        m
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        c: &CustomerState,
        period: Period,
        i: usize,
        agg: Aggregation,
        q: &Question<'_>,
        now: i64,
        ready: bool,
    ) -> Answer {
        let counter = c.counter(i);
        // Gauges carry over; periodic usage counts only in the period it belongs to.
        let counted = counter.time_ms == period.start_ms;
        let (usage, crossed) = if !agg.is_periodic() || counted {
            (counter.usage, counter.soft_crossed_ms())
        } else {
            (0, None)
        };
        let limit = self.limit_of(c, i, now);
        let plan = self.plan_of(c, now);
        // The grace runs only while usage is past the soft limit in force, and from no earlier
        // than that limit took effect (as the query API computes it).
        let crossed = match limit.finite() {
            Some(l) if quota::reaches(usage, l, self.catalog.policy.soft_percent) => {
                quota::grace_start(crossed, self.limit_since(c, i, now))
            }
            _ => None,
        };
        // What the usage would be with the quantity asked for: added to a sum or a gauge, as
        // the next value of a `max` or `min` meter (0 asks about the usage as it is).
        let (base, quantity) = match agg {
            Aggregation::Max | Aggregation::Min if q.quantity > 0 => {
                let next = if counted {
                    agg.fold(usage, q.quantity)
                } else {
                    q.quantity
                };
                (next, 0)
            }
            _ => (usage, q.quantity),
        };
        let mut verdict = quota::decide(
            &self.catalog.policy,
            limit,
            plan.on_limit,
            base,
            quantity,
            crossed,
            now,
        );
        // Every request a gateway passes, and every check that asks for something, counts
        // against the plan's request rate, unless the quota already refused it; quantity 0 on
        // the check API is a status query and does not count.
        let rate = match &plan.rate {
            Some((per_second, burst, limiter))
                if (q.passing || q.quantity > 0) && verdict.decision != quota::Decision::Block =>
            {
                let key = self.rate_keys.hash_one(q.customer);
                Some(match limiter.check_key(&key) {
                    Ok(snapshot) => RateOutcome {
                        per_second: *per_second,
                        burst: *burst,
                        remaining: snapshot.remaining_burst_capacity(),
                        retry_after: None,
                    },
                    Err(not_until) => {
                        verdict.decision = quota::Decision::Block;
                        verdict.state = quota::UsageState::Blocked;
                        RateOutcome {
                            per_second: *per_second,
                            burst: *burst,
                            remaining: 0,
                            retry_after: Some(not_until.wait_time_from(limiter.clock().now())),
                        }
                    }
                })
            }
            _ => None,
        };
        Answer {
            verdict,
            usage,
            limit,
            period,
            plan: plan.id.clone(),
            rate,
            degraded: !ready,
            now_ms: now,
        }
    }

    /// Forgets rate-limit buckets that are full again (idle customers), bounding their memory.
    pub fn sweep_rate_limits(&self) {
        for plan in &self.plans {
            if let Some((_, _, limiter)) = &plan.rate {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }

    /// Answers a quota question from memory.
    pub fn check(&self, q: Question<'_>) -> Result<Answer, CheckError> {
        let (i, agg) = self.meter(q.meter).ok_or(CheckError::UnknownMeter)?;
        let ready = self.is_ready();
        if !ready && !self.fail_open {
            return Err(CheckError::NotReady);
        }
        let now = self.clock.now_ms();
        if let Some(c) = self.customers.get(q.customer) {
            match c.extra() {
                None => {
                    let period = self.calendar_month(now);
                    return Ok(self.answer(&c, period, i, agg, &q, now, ready));
                }
                Some(x) if x.period.contains(now) => {
                    return Ok(self.answer(&c, x.period, i, agg, &q, now, ready));
                }
                Some(_) => {}
            }
            drop(c);
            // The clock left the cached period (once a month): recompute it.
            if let Some(mut c) = self.customers.get_mut(q.customer)
                && let Some(x) = c.extra_mut()
            {
                x.period = x.record.period_at(now);
                let period = x.period;
                return Ok(self.answer(&c, period, i, agg, &q, now, ready));
            }
        }
        // A customer never seen: default plan, no usage.
        let period = self.calendar_month(now);
        Ok(self.answer(&self.unseen, period, i, agg, &q, now, ready))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::period::parse_rfc3339;
    use tally_schemas::{Decision, ManagedMeter, ManualClock};

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
            readings: Vec::new(),
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
            passing: false,
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

    /// Moves customer `id` to `plan` at the clock's time, as the customer API does.
    fn change_plan(s: &State, id: &str, plan: &str) {
        let now = s.clock().now_ms();
        let before = s
            .customers
            .get(id)
            .and_then(|e| e.extra().map(|x| (*x.record).clone()))
            .unwrap_or_else(|| Customer::new_default(&s.catalog()));
        let mut after = before.clone();
        after.plan = plan.into();
        after.note_limit_changes(&before, &s.catalog(), now);
        s.set_customer(id, after);
    }

    fn decision(s: &State, id: &str) -> (Decision, Option<i64>) {
        let v = s.check(ask(id, "api_requests", 0)).unwrap().verdict;
        (v.decision, v.grace_until_ms)
    }

    #[test]
    fn a_lowered_limit_gives_a_fresh_grace_from_the_change() {
        let (s, clock) = state("2026-11-02T10:00:00Z");
        change_plan(&s, "c", "professional");
        // 105k of professional's 1M: fine.
        s.apply(
            &ev("c", "api_requests", 105_000, "2026-11-02T10:00:00Z"),
            &mut Vec::new(),
        );
        assert_eq!(decision(&s, "c"), (Decision::Allow, None));
        // Down to starter (100k): 105 % of the new limit, past its soft limit without an
        // event crossing it. The grace runs 48 h from the change, then blocks.
        clock.set(ms("2026-11-10T00:00:00Z"));
        change_plan(&s, "c", "starter");
        let until = ms("2026-11-12T00:00:00Z");
        assert_eq!(decision(&s, "c"), (Decision::Warn, Some(until)));
        clock.set(until - 1000);
        assert_eq!(decision(&s, "c").0, Decision::Warn);
        clock.set(until);
        assert_eq!(decision(&s, "c").0, Decision::Block);
    }

    #[test]
    fn a_raised_limit_gives_a_fresh_grace_from_its_own_crossing() {
        let (s, clock) = state("2026-11-02T10:00:00Z");
        change_plan(&s, "c", "starter");
        s.apply(
            &ev("c", "api_requests", 100_000, "2026-11-02T10:00:00Z"),
            &mut Vec::new(),
        );
        // Past starter's soft limit for 72 h: blocked.
        clock.set(ms("2026-11-05T10:00:00Z"));
        assert_eq!(decision(&s, "c").0, Decision::Block);
        // Up to professional (1M): far below; the old grace is gone.
        change_plan(&s, "c", "professional");
        assert_eq!(decision(&s, "c"), (Decision::Allow, None));
        // Crossing professional's soft limit starts a grace of its own.
        s.apply(
            &ev("c", "api_requests", 900_000, "2026-11-06T08:00:00Z"),
            &mut Vec::new(),
        );
        clock.set(ms("2026-11-06T09:00:00Z"));
        let until = ms("2026-11-08T08:00:00Z");
        assert_eq!(decision(&s, "c"), (Decision::Warn, Some(until)));
        clock.set(until);
        assert_eq!(decision(&s, "c").0, Decision::Block);
    }

    #[test]
    fn the_fallback_plan_after_a_failed_payment_gives_a_fresh_grace() {
        let (s, clock) = state("2026-11-02T10:00:00Z");
        change_plan(&s, "c", "starter");
        s.apply(
            &ev("c", "api_requests", 10_500, "2026-11-02T10:00:00Z"),
            &mut Vec::new(),
        );
        let mut record = (*s.customers.get("c").unwrap().extra().unwrap().record).clone();
        record.payment_failed_at_ms = Some(ms("2026-11-03T00:00:00Z"));
        s.set_customer("c", record);
        // Seven days later the customer falls back to free (10k): 105 % of it, grace from
        // the fallback.
        clock.set(ms("2026-11-10T01:00:00Z"));
        assert_eq!(
            decision(&s, "c"),
            (Decision::Warn, Some(ms("2026-11-12T00:00:00Z")))
        );
    }

    #[test]
    fn idle_customers_are_forgotten_without_changing_any_answer() {
        let (s, clock) = state("2026-11-21T10:00:00Z");
        let mut notes = Vec::new();
        s.apply(
            &ev("old", "api_requests", 9_000, "2026-10-30T00:00:00Z"),
            &mut notes,
        );
        s.apply(
            &ev("now", "api_requests", 9_000, "2026-11-20T00:00:00Z"),
            &mut notes,
        );
        s.apply(
            &ev("g", "wasm_modules", 2, "2026-10-01T00:00:00Z"),
            &mut notes,
        );
        change_plan(&s, "rec", "starter");
        let answers = |s: &State| {
            ["old", "now", "g", "rec", "never"].map(|c| {
                let m = if c == "g" {
                    "wasm_modules"
                } else {
                    "api_requests"
                };
                let a = s.check(ask(c, m, 1)).unwrap();
                (a.usage, a.verdict.decision, a.limit)
            })
        };
        let before = answers(&s);
        // Only last month's customer without a record goes.
        assert_eq!(s.evict_idle(), 1);
        assert_eq!(s.customers_len(), 3);
        assert_eq!(answers(&s), before);
        // Next month, the current month's customer is idle too.
        clock.set(ms("2026-12-02T00:00:00Z"));
        let before = answers(&s);
        assert_eq!(s.evict_idle(), 1);
        assert_eq!(answers(&s), before);
        assert_eq!(s.customers_len(), 2);
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

    /// `max` and `min` meters: usage is the period's largest or smallest value, a single
    /// report past a threshold crosses it, the next period starts empty, and a check's quantity
    /// is the next value.
    #[test]
    fn largest_and_smallest_values_per_period_cross_thresholds() {
        let toml = format!(
            "{}\n[meters.peak]\naggregation = 'max'\nunit = 'x'\n\
             [meters.least]\naggregation = 'min'\nunit = 'x'\n",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        );
        let catalog = Arc::new(Catalog::from_toml(&toml).unwrap());
        let clock = Arc::new(ManualClock::new(ms("2026-11-21T10:00:00Z")));
        let s = State::new(catalog.clone(), clock.clone(), false);
        s.set_ready();
        let mut rec = Customer::new_default(&catalog);
        for m in ["peak", "least"] {
            rec.limit_overrides.insert(m.into(), Limit::Finite(100));
        }
        s.set_customer("c", rec);
        let mut notes = Vec::new();
        let feed = |meter: &str, v: u64, t: &str, notes: &mut Vec<Notification>| {
            s.apply(&ev("c", meter, v, t), notes);
        };
        feed("peak", 79, "2026-11-02T00:00:00Z", &mut notes);
        feed("peak", 10, "2026-11-03T00:00:00Z", &mut notes);
        assert!(notes.is_empty());
        let a = s.check(ask("c", "peak", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (79, Decision::Allow));
        // The next value asked about, not added: 79 then 80 peaks at 80.
        let a = s.check(ask("c", "peak", 80)).unwrap();
        assert_eq!(a.verdict.threshold, Some(80));
        assert_eq!(
            s.check(ask("c", "peak", 50)).unwrap().verdict.threshold,
            None
        );
        // One report at 110 % crosses every threshold at once.
        feed("peak", 110, "2026-11-04T00:00:00Z", &mut notes);
        let crossed: Vec<u32> = notes.iter().map(|n| n.threshold).collect();
        assert_eq!(crossed, [80, 100, 110]);
        feed("peak", 5, "2026-11-05T00:00:00Z", &mut notes);
        let a = s.check(ask("c", "peak", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (110, Decision::Block));
        // The next period starts empty: its first value is the usage.
        clock.set(ms("2026-12-01T00:10:00Z"));
        assert_eq!(s.check(ask("c", "peak", 0)).unwrap().usage, 0);
        feed("peak", 7, "2026-12-01T00:05:00Z", &mut notes);
        assert_eq!(s.check(ask("c", "peak", 0)).unwrap().usage, 7);
        // A late report of the closed period changes nothing.
        feed("peak", 500, "2026-11-30T23:59:00Z", &mut notes);
        assert_eq!(s.check(ask("c", "peak", 0)).unwrap().usage, 7);

        // The smallest value: the first report of the period is the usage, then only lower.
        notes.clear();
        feed("least", 120, "2026-12-01T00:01:00Z", &mut notes);
        let crossed: Vec<u32> = notes.iter().map(|n| n.threshold).collect();
        assert_eq!(crossed, [80, 100, 110]);
        let a = s.check(ask("c", "least", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (120, Decision::Block));
        // A value of 90 would take the smallest down to 90: past the soft limit no more.
        let a = s.check(ask("c", "least", 90)).unwrap();
        assert_eq!(a.verdict.threshold, Some(80));
        feed("least", 0, "2026-12-01T00:02:00Z", &mut notes);
        feed("least", 40, "2026-12-01T00:03:00Z", &mut notes);
        let a = s.check(ask("c", "least", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (0, Decision::Allow));
        assert_eq!(notes.len(), 3, "falling values notify nothing");
    }

    #[test]
    fn distinct_values_count_once_per_period_and_cross_thresholds() {
        let toml = format!(
            "{}\n[meters.active_users]\naggregation = 'unique_count'\nunit = 'users'\n\
             event_type = 'session'\nvalue = '$.user'\n",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        );
        let catalog = Arc::new(Catalog::from_toml(&toml).unwrap());
        let clock = Arc::new(ManualClock::new(ms("2026-11-21T10:00:00Z")));
        let s = State::new(catalog.clone(), clock.clone(), false);
        s.set_ready();
        let mut rec = Customer::new_default(&catalog);
        rec.limit_overrides
            .insert("active_users".into(), Limit::Finite(10));
        s.set_customer("c", rec);
        let session = |user: &str, t: &str| {
            let mut e = ev("c", "session", 0, t);
            e.readings = vec![tally_schemas::meter::Reading {
                meter: "active_users".into(),
                value: 1,
                dimensions: vec![],
                distinct: Some(user.into()),
            }];
            e
        };
        let mut notes = Vec::new();
        for (i, user) in ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"]
            .iter()
            .enumerate()
        {
            // Each user twice: the second changes nothing.
            s.apply(
                &session(user, &format!("2026-11-0{}T00:00:00Z", i + 1)),
                &mut notes,
            );
            s.apply(&session(user, "2026-11-20T00:00:00Z"), &mut notes);
        }
        let a = s.check(ask("c", "active_users", 0)).unwrap();
        assert_eq!(a.usage, 8);
        assert_eq!(
            notes
                .iter()
                .map(|n| (n.threshold, n.usage))
                .collect::<Vec<_>>(),
            [(80, 8)],
            "the eighth user of ten is 80 %, once"
        );
        // Asking about 3 more new values: 11 of 10 blocks, 2 more is the soft limit.
        assert_eq!(
            s.check(ask("c", "active_users", 3))
                .unwrap()
                .verdict
                .decision,
            Decision::Block
        );
        assert_eq!(
            s.check(ask("c", "active_users", 2))
                .unwrap()
                .verdict
                .threshold,
            Some(100)
        );
        for user in ["u8", "u9", "u10", "u0"] {
            s.apply(&session(user, "2026-11-21T09:00:00Z"), &mut notes);
        }
        let a = s.check(ask("c", "active_users", 0)).unwrap();
        assert_eq!((a.usage, a.verdict.decision), (11, Decision::Block));
        assert_eq!(
            notes.iter().map(|n| n.threshold).collect::<Vec<_>>(),
            [80, 100, 110]
        );
        // The next period starts with no users; a late event of the closed one changes nothing.
        clock.set(ms("2026-12-01T00:10:00Z"));
        assert_eq!(s.check(ask("c", "active_users", 0)).unwrap().usage, 0);
        s.apply(&session("u0", "2026-12-01T00:05:00Z"), &mut notes);
        s.apply(&session("u99", "2026-11-30T23:59:00Z"), &mut notes);
        s.apply(&session("u0", "2026-12-01T00:06:00Z"), &mut notes);
        assert_eq!(s.check(ask("c", "active_users", 0)).unwrap().usage, 1);
        // Loaded from the store (a restart, a period change): the values seen count as one each,
        // and seeing one of them again adds nothing.
        s.load_distinct(
            "c",
            "active_users",
            ms("2026-12-01T00:00:00Z"),
            ["u0", "u1", "u1"],
        );
        assert_eq!(s.check(ask("c", "active_users", 0)).unwrap().usage, 2);
        s.apply(&session("u1", "2026-12-01T00:07:00Z"), &mut notes);
        s.apply(&session("u2", "2026-12-01T00:07:00Z"), &mut notes);
        assert_eq!(s.check(ask("c", "active_users", 0)).unwrap().usage, 3);
    }

    #[test]
    fn plans_overrides_unknown_meters_and_fail_closed() {
        let (s, _) = state("2026-11-21T10:00:00Z");
        let mut rec = Customer::new_default(&s.catalog());
        rec.plan = "enterprise".into();
        s.set_customer("big", rec.clone());
        s.apply(
            &ev("big", "build_minutes", 1_000_000, "2026-11-21T09:00:00Z"),
            &mut Vec::new(),
        );
        let a = s.check(ask("big", "build_minutes", 1)).unwrap();
        assert_eq!(
            (a.verdict.decision, a.limit, &*a.plan),
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
    fn rate_limits_allow_the_burst_then_block() {
        let mut cat = Catalog::builtin();
        cat.plans.get_mut("free").unwrap().rate_limit = Some(tally_schemas::catalog::RateLimit {
            per_second: 1,
            burst: 3,
        });
        let s = State::new(
            Arc::new(cat),
            Arc::new(ManualClock::new(ms("2026-11-21T10:00:00Z"))),
            false,
        );
        s.set_ready();
        for n in 0..3 {
            let a = s.check(ask("burst", "api_requests", 1)).unwrap();
            assert_eq!(a.verdict.decision, Decision::Allow, "check {n}");
            assert_eq!(a.rate.unwrap().remaining, 2 - n);
        }
        let a = s.check(ask("burst", "api_requests", 1)).unwrap();
        assert_eq!(a.verdict.decision, Decision::Block);
        assert!(a.rate_limited());
        assert!(a.rate.unwrap().retry_after.unwrap() <= Duration::from_secs(1));
        // Status queries (quantity 0) and other customers are not held back.
        assert_eq!(
            s.check(ask("burst", "api_requests", 0))
                .unwrap()
                .verdict
                .decision,
            Decision::Allow
        );
        assert_eq!(
            s.check(ask("other", "api_requests", 1))
                .unwrap()
                .verdict
                .decision,
            Decision::Allow
        );
        // Plans without a rate limit (enterprise) are never rate limited.
        let mut rec = Customer::new_default(&s.catalog());
        rec.plan = "enterprise".into();
        s.set_customer("big", rec);
        for _ in 0..100 {
            assert!(
                !s.check(ask("big", "api_requests", 1))
                    .unwrap()
                    .rate_limited()
            );
        }
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
        let mut rec = Customer::new_default(&s.catalog());
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

    fn managed(name: &str, created_ms: i64, meter: serde_json::Value) -> ManagedMeter {
        ManagedMeter {
            name: name.into(),
            meter: serde_json::from_value(meter).unwrap(),
            created_ms,
            updated_ms: created_ms,
            archived_ms: None,
        }
    }

    #[test]
    fn a_meter_added_at_runtime_joins_without_moving_the_others() {
        let (s, _) = state("2026-11-21T10:00:00Z");
        let mut notes = Vec::new();
        s.apply(
            &ev("c", "api_requests", 9_000, "2026-11-20T00:00:00Z"),
            &mut notes,
        );
        // Before it joins, a meter is unknown to checks and its readings count nowhere.
        assert_eq!(
            s.check(ask("c", "aa_tokens", 0)),
            Err(CheckError::UnknownMeter)
        );
        // A customer whose override names the meter before this process knows it.
        let mut rec = Customer::new_default(&s.catalog());
        rec.limit_overrides
            .insert("aa_tokens".into(), Limit::Finite(100));
        s.set_customer("d", rec);
        // Named to sort first: an index by name order would move every other meter.
        let base = Catalog::builtin();
        let tokens = managed(
            "aa_tokens",
            5,
            serde_json::json!({"aggregation": "sum", "unit": "tokens"}),
        );
        s.set_catalog(Arc::new(base.with_managed([tokens.clone()]).unwrap()));
        let a = s.check(ask("c", "api_requests", 0)).unwrap();
        assert_eq!((a.usage, a.limit), (9_000, Limit::Finite(10_000)));
        let a = s.check(ask("c", "aa_tokens", 0)).unwrap();
        assert_eq!((a.usage, a.limit), (0, Limit::Unlimited));
        s.apply(
            &ev("d", "aa_tokens", 85, "2026-11-21T09:00:00Z"),
            &mut notes,
        );
        assert_eq!(
            notes
                .iter()
                .map(|n| (n.meter.as_str(), n.threshold))
                .collect::<Vec<_>>(),
            vec![("api_requests", 80), ("aa_tokens", 80)]
        );
        let a = s.check(ask("d", "aa_tokens", 30)).unwrap();
        assert_eq!(
            (a.usage, a.limit, a.verdict.decision),
            (85, Limit::Finite(100), Decision::Block)
        );
        // A second meter, created earlier by a skewed clock, still goes after the first.
        let other = managed(
            "ab_seats",
            1,
            serde_json::json!({"aggregation": "max", "unit": "seats"}),
        );
        s.set_catalog(Arc::new(base.with_managed([tokens, other]).unwrap()));
        assert_eq!(s.check(ask("d", "aa_tokens", 0)).unwrap().usage, 85);
        s.apply(&ev("d", "ab_seats", 4, "2026-11-21T09:00:00Z"), &mut notes);
        s.apply(&ev("d", "ab_seats", 3, "2026-11-21T09:01:00Z"), &mut notes);
        assert_eq!(s.check(ask("d", "ab_seats", 0)).unwrap().usage, 4);
        assert_eq!(s.check(ask("c", "api_requests", 0)).unwrap().usage, 9_000);
    }
}
