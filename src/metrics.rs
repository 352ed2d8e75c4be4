//! Metrics of the binary's own layers (request metrics of every listener are `tally_http`'s).

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts, register_int_counter_vec};

/// Requests refused by the access layer, by reason.
pub static AUTH_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "tally_auth_refused_total",
            "Requests refused by the access layer, by reason (missing, invalid, forbidden, host, unavailable)"
        ),
        &["reason"]
    )
    .expect("metric registers once")
});
