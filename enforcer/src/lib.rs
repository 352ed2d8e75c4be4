//! Enforcer: answers, per request, whether a customer may go on, from memory.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Layout
//! - [`state`]: customers and counters in memory; applying events; answering checks.
//! - [`http`]: `/v1/check` (POST and GET) and `/v1/customers/{id}`.
//! - [`forward_auth`]: `/v1/forward-auth/{nginx,traefik,envoy}` for gateways.
//! - [`grpc`]: Envoy's rate limit service and ext_authz over gRPC.
//! - [`webhooks`]: signed, retried notification webhooks.
//! - [`metrics`]: Prometheus metrics of this stage.
//!
//! # Contract
//! - At start-up the state is loaded from the usage store (period-to-date totals and gauges,
//!   with the log positions they cover) and the enforcer then follows the log from exactly those
//!   positions, so its counters converge to the store's without counting anything twice. It is
//!   ready (`/readyz`) once it caught up with the log's end as of start-up.
//! - A repeat of an event (same `source` and `id`) is counted once. Repeats the log reader
//!   remembers are dropped by it; older ones (a retry that reached another ingest process,
//!   `tally replay` of old events, anything read again after a restart) are looked up in the
//!   store's de-duplication ids and skipped when first counted at another offset.
//! - Before it is ready it fails open by default (answers from what it has, marked
//!   `"degraded": true`); with `fail_open = false` it answers 503 `not_ready`.
//! - Decisions follow [`tally_schemas::quota`]: 80 % warn, 100 % soft limit with a 48 h grace
//!   from the event that crossed it, 110 % block; unlimited meters and overage plans never block;
//!   7 days after a failed payment the fallback plan's limits apply.
//! - Threshold notifications (80, 100, 110 %) are published to the log, which keeps one per
//!   customer, meter, period and threshold however many replicas publish it; the replica whose
//!   publication came first sends the webhooks ([`webhooks`]).
//! - Customer changes made through this process apply at once; changes made elsewhere are picked
//!   up from the store within `customer_refresh`. When a change moves a customer's current
//!   period, its counters are re-read from the store (events not yet flushed by the aggregator
//!   are then missing until the next restart: at most `flush_interval` of usage).

pub mod error;
pub mod forward_auth;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod state;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::{Error, Result};
pub use state::State;
use tally_backends::backoff::Backoff;
use tally_backends::catalog::meters_of;
use tally_backends::log::EventLog;
use tally_backends::store::{SnapshotRequest, Store};
use tally_schemas::period::{Window, calendar_month};
use tally_schemas::{Aggregation, Customer, Notification};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How the enforcer follows the log and the store.
#[derive(Debug, Clone)]
pub struct EnforcerSettings {
    /// Answer from partial state before loading finished (true) or refuse with 503 (false).
    pub fail_open: bool,
    /// How often customer changes made by other processes are read from the store.
    pub customer_refresh: Duration,
    /// Longest the follower waits to batch log records (freshness vs. overhead).
    pub follow_linger: Duration,
    /// Notification webhooks.
    pub webhooks: webhooks::WebhookSettings,
}

impl Default for EnforcerSettings {
    fn default() -> Self {
        EnforcerSettings {
            fail_open: true,
            customer_refresh: Duration::from_secs(1),
            follow_linger: Duration::from_millis(2),
            webhooks: webhooks::WebhookSettings::default(),
        }
    }
}

/// How far ahead of its receipt an event's time may be (ingest's future tolerance, with room).
const FUTURE_MARGIN_MS: i64 = 10 * 60_000;

/// For each record of `batch`, whether it repeats an event already counted at another offset:
/// asked of the store for the records whose event time is before what the reader remembers by
/// itself (a retry that reached another ingest process, `tally replay` of old events, anything
/// read again after a restart). If the store cannot answer, they are counted (the enforcer
/// keeps answering; its counters converge to the store's at the next start).
async fn repeats(
    batch: &[tally_schemas::Record],
    remembers_since_ms: Option<i64>,
    store: &dyn Store,
) -> Vec<bool> {
    let mut out = vec![false; batch.len()];
    let Some(since) = remembers_since_ms else {
        return out;
    };
    let horizon = since.saturating_add(FUTURE_MARGIN_MS);
    let (idx, doubtful): (Vec<usize>, Vec<tally_schemas::Record>) = batch
        .iter()
        .enumerate()
        .filter(|(_, r)| r.event.time_ms < horizon)
        .map(|(i, r)| (i, r.clone()))
        .unzip();
    if doubtful.is_empty() {
        return out;
    }
    match store.counted_at(&doubtful).await {
        Ok(counted) => {
            for ((i, r), at) in idx.into_iter().zip(&doubtful).zip(counted) {
                out[i] = at.is_some_and(|o| o != r.offset);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, records = doubtful.len(),
                "repeats not checked against the store; counted");
        }
    }
    out
}

/// Records a customer change in memory; re-reads its counters when its current period moved.
pub async fn update_customer(
    state: &State,
    store: &dyn Store,
    id: &str,
    record: Customer,
) -> Result<()> {
    let now = state.clock().now_ms();
    let new_period = record.period_at(now);
    let old = state.set_customer(id, record);
    let old_period = old
        .as_ref()
        .map_or_else(|| calendar_month(now), |o| o.period_at(now));
    if old_period == new_period {
        // A limit changed within the period may put usage past thresholds at once.
        state.queue(state.limit_crossings(id, old.as_deref(), now));
    } else {
        for (name, meter) in &state.catalog().meters {
            let aggregation = meter.aggregation;
            if aggregation == Aggregation::Min {
                // A smallest value exists only with cells: read by month so an empty period
                // stays empty (not a smallest value of 0).
                let months = store
                    .series(
                        id,
                        name,
                        aggregation,
                        new_period.start_ms,
                        i64::MAX,
                        Window::Month,
                    )
                    .await?;
                if let Some(v) = months.into_iter().map(|(_, v)| v).min() {
                    state.load_total(id, name, new_period.start_ms, v);
                } else {
                    state.clear_period(id, name, new_period.start_ms);
                }
            } else if aggregation == Aggregation::UniqueCount {
                let values = store
                    .distinct_values(id, name, new_period.start_ms, i64::MAX)
                    .await?;
                state.load_distinct(
                    id,
                    name,
                    new_period.start_ms,
                    values.iter().map(String::as_str),
                );
            } else if aggregation.is_periodic() {
                let total = store
                    .total(id, name, aggregation, new_period.start_ms, i64::MAX)
                    .await?;
                state.load_total(id, name, new_period.start_ms, total);
            }
        }
    }
    Ok(())
}

async fn load(
    state: &State,
    log: &dyn EventLog,
    store: &dyn Store,
    notes: &mpsc::Sender<Notification>,
) -> Result<(BTreeMap<u32, u64>, i64)> {
    let now = state.clock().now_ms();
    let mut last_update = 0;
    let mut since_by_customer = Vec::new();
    let default_since = calendar_month(now).start_ms;
    let mut starts = std::collections::HashMap::new();
    for (id, record) in store.customers_since(0).await? {
        last_update = last_update.max(record.updated_ms);
        let start = record.period_at(now).start_ms;
        if start != default_since {
            since_by_customer.push((id.clone(), start));
        }
        starts.insert(id.clone(), start);
        state.set_customer(&id, record);
    }
    let catalog = state.catalog().clone();
    let snapshot = store
        .snapshot(SnapshotRequest {
            default_since_ms: default_since,
            since_by_customer,
            periodic_meters: catalog
                .meters
                .iter()
                .filter(|(_, m)| m.aggregation.is_periodic())
                .map(|(n, m)| (n.clone(), m.aggregation))
                .collect(),
        })
        .await?;
    for (customer, meter, usage) in &snapshot.totals {
        let start = starts.get(customer).copied().unwrap_or(default_since);
        state.load_total(customer, meter, start, *usage);
    }
    for (customer, meter, time_ms, value) in &snapshot.gauges {
        state.load_gauge(customer, meter, *time_ms, *value);
    }
    let mut distinct: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (customer, meter, value) in &snapshot.distinct {
        distinct.entry((customer, meter)).or_default().push(value);
    }
    for ((customer, meter), values) in distinct {
        let start = starts.get(customer).copied().unwrap_or(default_since);
        state.load_distinct(customer, meter, start, values);
    }
    for n in log.notifications_since(now).await? {
        state.load_crossing(&n);
    }
    for n in state.pending_crossings() {
        state.load_crossing(&n);
        let _ = notes.send(n).await;
    }
    tracing::info!(
        customers = state.customers_len(),
        totals = snapshot.totals.len(),
        gauges = snapshot.gauges.len(),
        "enforcer state loaded from the store"
    );
    Ok((snapshot.offsets, last_update))
}

async fn publish(
    log: Arc<dyn EventLog>,
    hooks: webhooks::Webhooks,
    mut rx: mpsc::Receiver<Notification>,
) {
    while let Some(n) = rx.recv().await {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(60));
        let mut tries = 0;
        loop {
            match log.publish_notification(&n).await {
                Ok(true) => {
                    metrics::NOTIFICATIONS
                        .with_label_values(&["published"])
                        .inc();
                    tracing::info!(
                        customer = %n.customer,
                        meter = %n.meter,
                        threshold = n.threshold,
                        usage = n.usage,
                        limit = n.limit,
                        "quota threshold crossed"
                    );
                    if hooks.is_enabled() {
                        hooks.send(&n);
                    }
                    break;
                }
                Ok(false) => {
                    metrics::NOTIFICATIONS
                        .with_label_values(&["already_published"])
                        .inc();
                    break;
                }
                Err(e) if tries < 8 => {
                    tries += 1;
                    tracing::warn!(error = %e, "publishing a notification failed; retrying");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => {
                    metrics::NOTIFICATIONS.with_label_values(&["failed"]).inc();
                    tracing::error!(error = %e, customer = %n.customer, meter = %n.meter,
                        threshold = n.threshold, "notification dropped after retries");
                    break;
                }
            }
        }
    }
}

/// Notifications waiting for the publisher, at most.
const NOTIFICATION_QUEUE: usize = 10_000;

/// How often customers without a record and without usage in the current period are
/// forgotten (their state is the same as a customer never seen).
const EVICT_INTERVAL: Duration = Duration::from_secs(3600);

/// How often the follower measures its consumer lag (`tally_log_consumer_lag`).
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Loads the state, then follows the log and the customer records until `shutdown`.
pub async fn run(
    settings: EnforcerSettings,
    state: Arc<State>,
    log: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<()> {
    // Bounded: a burst of crossings (a start-up after a crash, a catalogue change) waits for
    // the publisher instead of growing memory; the follower reads on once there is room.
    let (notes_tx, notes_rx) = mpsc::channel(NOTIFICATION_QUEUE);
    let hooks = webhooks::Webhooks::new(settings.webhooks.clone(), store.clone());
    if hooks.is_enabled() {
        tokio::spawn(hooks.clone().sweep(shutdown.clone()));
    }
    let publisher = tokio::spawn(publish(log.clone(), hooks, notes_rx));
    if let Some(live) = state.live() {
        tokio::spawn(follow_catalog(
            live.subscribe(),
            state.clone(),
            shutdown.clone(),
        ));
    }
    let Some((offsets, last_update)) =
        load_until_done(&state, log.as_ref(), store.as_ref(), &notes_tx, &shutdown).await
    else {
        return Ok(());
    };
    let mut reader = log.reader()?;
    for (&partition, &next) in &offsets {
        reader.seek(partition, next);
    }
    let mut f = Follower {
        catch_up: log.end_offsets().await?,
        position: offsets,
        last_update,
        lag_measured: Instant::now() - LAG_INTERVAL,
        evicted: Instant::now(),
        notes: Vec::new(),
        notes_tx,
        state,
        log,
        store,
    };
    let mut refresh = tokio::time::interval(settings.customer_refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        f.check_caught_up();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = f.state.queued() => f.send_queued().await,
            _ = refresh.tick() => f.housekeeping().await?,
            batch = reader.poll(10_000, settings.follow_linger) => {
                let batch = batch?;
                f.apply(&batch, reader.remembers_since_ms()).await;
            }
        }
    }
    f.send_queued().await;
    drop(f);
    // Let queued notifications go out, within bounds.
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    Ok(())
}

/// Puts each new catalogue in force (meters created through the API join the state).
async fn follow_catalog(
    mut changes: tokio::sync::watch::Receiver<Arc<tally_schemas::Catalog>>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = changes.borrow_and_update().clone();
                state.set_catalog(next);
            }
        }
    }
}

/// Loads the state, retrying while the store (ClickHouse) is unreachable (not ready
/// meanwhile); `None` once `shutdown` came first.
async fn load_until_done(
    state: &State,
    log: &dyn EventLog,
    store: &dyn Store,
    notes: &mpsc::Sender<Notification>,
    shutdown: &CancellationToken,
) -> Option<(BTreeMap<u32, u64>, i64)> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match load(state, log, store, notes).await {
            Ok(loaded) => return Some(loaded),
            Err(e) => {
                tracing::warn!(error = %e, "enforcer state not loaded; retrying");
                if !backoff.wait(shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// The enforcer's side of the log once loaded: the position it has applied, the customer
/// records it has seen, and what is still to read before it is ready.
struct Follower {
    state: Arc<State>,
    log: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    /// Next offset per partition applied.
    position: BTreeMap<u32, u64>,
    /// End offsets at start-up not yet reached: ready once empty.
    catch_up: Vec<(u32, u64)>,
    /// Latest `updated_ms` of the customer records read.
    last_update: i64,
    lag_measured: Instant,
    evicted: Instant,
    notes: Vec<Notification>,
    notes_tx: mpsc::Sender<Notification>,
}

impl Follower {
    /// Becomes ready once every partition reached its start-up end.
    fn check_caught_up(&mut self) {
        if self.state.is_ready() {
            return;
        }
        let position = &self.position;
        self.catch_up
            .retain(|(p, end)| position.get(p).copied().unwrap_or(0) < *end);
        if self.catch_up.is_empty() {
            self.state.set_ready();
            tracing::info!("enforcer caught up with the log; ready");
        }
    }

    /// Hands the notifications queued by changes outside the log to the publisher.
    async fn send_queued(&self) {
        for n in self.state.take_queued() {
            let _ = self.notes_tx.send(n).await;
        }
    }

    /// Applies a batch (repeats the store already counted are skipped) and hands the
    /// crossings to the publisher.
    async fn apply(&mut self, batch: &[tally_schemas::Record], remembers_since_ms: Option<i64>) {
        self.know_meters(batch).await;
        let repeats = repeats(batch, remembers_since_ms, self.store.as_ref()).await;
        for (rec, repeat) in batch.iter().zip(repeats) {
            self.position.insert(rec.partition, rec.offset + 1);
            if repeat {
                metrics::REPEATS_SKIPPED.inc();
                continue;
            }
            self.state.apply(&rec.event, &mut self.notes);
        }
        metrics::EVENTS_APPLIED.inc_by(batch.len() as u64);
        for n in self.notes.drain(..) {
            let _ = self.notes_tx.send(n).await;
        }
        if batch.is_empty() && !self.state.is_ready() {
            // Nothing more to read: whatever remains below the start-up end is gone.
            self.catch_up.clear();
        }
    }

    /// Makes sure the state knows the meters `batch` names, reading the stored meters first if
    /// one is new (see [`tally_backends::catalog`]). While the store cannot be read, a reading of
    /// a meter still unknown is not counted here (the store counts it; this process counts it
    /// again after a restart), and that is logged.
    async fn know_meters(&self, batch: &[tally_schemas::Record]) {
        let Some(live) = self.state.live() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
        for attempt in 0..3 {
            match live.knowing(meters_of(batch)).await {
                Ok(catalog) => {
                    self.state.set_catalog(catalog);
                    live.note_unknown(meters_of(batch));
                    return;
                }
                Err(e) if attempt == 2 => {
                    tracing::error!(error = %e, "meters not read; readings of unknown meters are not counted in memory");
                }
                Err(_) => tokio::time::sleep(backoff.next_wait()).await,
            }
        }
    }

    /// Every `customer_refresh`: customer records changed elsewhere, idle customers forgotten
    /// (hourly), the customer gauge, consumer lag and expired rate limiters.
    async fn housekeeping(&mut self) -> Result<()> {
        match self.store.customers_since(self.last_update).await {
            Ok(changed) => {
                for (id, record) in changed {
                    self.last_update = self.last_update.max(record.updated_ms);
                    if self.state.customer(&id).as_ref() != &record {
                        update_customer(&self.state, self.store.as_ref(), &id, record).await?;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "customer refresh failed"),
        }
        if self.evicted.elapsed() >= EVICT_INTERVAL {
            self.evicted = Instant::now();
            let n = self.state.evict_idle();
            tracing::debug!(customers = n, "idle customers forgotten");
        }
        metrics::CUSTOMERS.set(self.state.customers_len() as i64);
        if self.lag_measured.elapsed() >= LAG_INTERVAL {
            self.lag_measured = Instant::now();
            match self.log.end_offsets().await {
                Ok(ends) => tally_backends::metrics::set_lag("enforcer", &self.position, &ends),
                Err(e) => tracing::debug!(error = %e, "consumer lag not measured"),
            }
        }
        self.state.sweep_rate_limits();
        Ok(())
    }
}
