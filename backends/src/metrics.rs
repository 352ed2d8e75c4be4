//! Metrics of the backends, registered in the process-wide Prometheus registry: the embedded
//! log's commit times, the Kafka reader's assignment and skipped records, and consumer lag.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, register_histogram,
    register_int_counter, register_int_gauge, register_int_gauge_vec,
};

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
