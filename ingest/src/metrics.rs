//! Ingest metrics, registered in the process-wide Prometheus registry. Counted per request or
//! batch, never per event in the hot loop, and never labelled by customer.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec,
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

/// Duration of one group commit of the embedded log.
pub static LOG_COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        HistogramOpts::new(
            "tally_log_commit_seconds",
            "Duration of one group commit of the embedded log"
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
        ])
    )
    .expect("metric registers once")
});

/// Records on the Kafka topic that are not Tally usage events (skipped by readers).
pub static UNDECODABLE: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_log_undecodable_records_total",
        "Records on the event topic that could not be decoded and were skipped"
    )
    .expect("metric registers once")
});

/// Partitions of the event topic this process's consumer-group member owns.
pub static ASSIGNED_PARTITIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tally_log_assigned_partitions",
        "Partitions of the event topic assigned to this process's consumer-group member"
    )
    .expect("metric registers once")
});

/// Records on the log not yet processed, by consumer (`aggregator`, `enforcer`) and partition.
pub static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "tally_log_consumer_lag",
            "Records on the event log not yet processed, by consumer and partition"
        ),
        &["consumer", "partition"]
    )
    .expect("metric registers once")
});

/// Sets [`CONSUMER_LAG`] of `consumer` from its next offsets and the log's end offsets.
/// Partitions without a position (never read by the consumer) are not reported.
pub fn set_lag(
    consumer: &str,
    positions: &std::collections::BTreeMap<u32, u64>,
    ends: &[(u32, u64)],
) {
    for &(partition, end) in ends {
        let Some(&at) = positions.get(&partition) else {
            continue;
        };
        CONSUMER_LAG
            .with_label_values(&[consumer, &partition.to_string()])
            .set(end.saturating_sub(at).min(i64::MAX as u64) as i64);
    }
}
