//! Billing-sync metrics (per report, never labelled by customer).

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGauge, Opts, register_int_counter_vec, register_int_gauge};

/// Meter event attempts by outcome: `accepted`, `retry`, `rejected`.
pub static REPORTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_billing_reports_total",
            "Stripe meter event attempts, by outcome"
        ),
        &["outcome"]
    )
    .expect("metric registers once")
});

/// Reports waiting for the next round after retryable failures.
pub static PENDING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tally_billing_pending_reports",
        "Stripe meter events waiting to be sent again"
    )
    .expect("metric registers once")
});
