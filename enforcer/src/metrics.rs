//! Enforcer metrics. Decisions are counted by outcome and protocol only, never by customer.

use std::sync::LazyLock;

use tally_schemas::Decision;

use crate::http::decision_name;
use prometheus::{
    IntCounter, IntCounterVec, IntGauge, Opts, register_int_counter, register_int_counter_vec,
    register_int_gauge,
};

pub static REPEATS_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_enforcer_repeats_skipped_total",
        "Log records not counted: repeats of events the store counted at another offset"
    )
    .expect("metric registers once")
});

pub static DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_enforcer_decisions_total",
            "Quota decisions, by decision and protocol"
        ),
        &["decision", "protocol"]
    )
    .expect("metric registers once")
});

/// The protocols that answer checks, as labelled in [`DECISIONS`].
const PROTOCOLS: [&str; 6] = [
    "http",
    "nginx",
    "traefik",
    "envoy_http",
    "envoy_rls",
    "envoy_ext_authz",
];

/// [`DECISIONS`]' counters, resolved once per (protocol, decision): counting a decision is then
/// one atomic add instead of a labelled lookup.
static DECISION_COUNTERS: LazyLock<Vec<[IntCounter; 3]>> = LazyLock::new(|| {
    PROTOCOLS
        .iter()
        .map(|p| {
            [Decision::Allow, Decision::Warn, Decision::Block]
                .map(|d| DECISIONS.with_label_values(&[decision_name(d), p]))
        })
        .collect()
});

/// Counts one decision.
pub fn decision(d: Decision, protocol: &'static str) {
    match PROTOCOLS.iter().position(|p| *p == protocol) {
        Some(i) => DECISION_COUNTERS[i][d as usize].inc(),
        None => DECISIONS
            .with_label_values(&[decision_name(d), protocol])
            .inc(),
    }
}

pub static EVENTS_APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_enforcer_events_applied_total",
        "Log records applied to the in-memory counters"
    )
    .expect("metric registers once")
});

pub static NOTIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_enforcer_notifications_total",
            "Threshold notifications, by result: published, already_published, failed"
        ),
        &["result"]
    )
    .expect("metric registers once")
});

pub static WEBHOOKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_enforcer_webhooks_total",
            "Webhook delivery attempts, by result: delivered, retried, abandoned"
        ),
        &["result"]
    )
    .expect("metric registers once")
});

pub static CUSTOMERS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("tally_enforcer_customers", "Customers held in memory")
        .expect("metric registers once")
});
