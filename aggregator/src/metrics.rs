//! Aggregator metrics (per batch, never per event or per customer).

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, register_histogram,
    register_int_counter, register_int_counter_vec,
};

pub static EVENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_events_total",
        "Log records rolled up and written to the store"
    )
    .expect("metric registers once")
});

pub static DUPLICATES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_duplicate_events_total",
        "Events dropped by the aggregator because their (source, id) was already counted"
    )
    .expect("metric registers once")
});

pub static REJOINS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_group_rejoins_total",
        "Times this aggregator rejoined its consumer group because a partition with unread \
         records made no progress"
    )
    .expect("metric registers once")
});

pub static CELLS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_cells_total",
        "Per (customer, meter, minute) cells written to the store"
    )
    .expect("metric registers once")
});

pub static FLUSHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_aggregator_flushes_total",
            "Batches flushed to the store, by result: written, replay, error"
        ),
        &["result"]
    )
    .expect("metric registers once")
});

pub static FLUSH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        HistogramOpts::new(
            "tally_aggregator_flush_seconds",
            "Duration of one flush to the store"
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
        ])
    )
    .expect("metric registers once")
});
