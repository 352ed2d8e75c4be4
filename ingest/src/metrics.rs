//! Ingest metrics, registered in the process-wide Prometheus registry. Counted per request or
//! batch, never per event in the hot loop, and never labelled by customer.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, Opts, register_histogram, register_int_counter_vec,
};

/// Events by outcome: `accepted`, `duplicate`, `rejected`.
pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_ingest_events_total",
            "Usage events received, by outcome"
        ),
        &["outcome"]
    )
    .expect("metric registers once")
});

/// Rejected events by error code (a fixed set of codes).
pub static REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_ingest_rejected_events_total",
            "Usage events refused, by error code"
        ),
        &["code"]
    )
    .expect("metric registers once")
});

/// Time from the start of an append to its durable acknowledgement.
pub static APPEND_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        HistogramOpts::new(
            "tally_ingest_append_seconds",
            "Time to make a request's events durable on the log"
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
        ])
    )
    .expect("metric registers once")
});
