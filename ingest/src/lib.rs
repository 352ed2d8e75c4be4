//! Ingest: edge nodes POST usage events; Tally validates them, drops duplicates and appends them
//! to the usage-event log, keyed by customer.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Layout
//! - [`http`]: `POST /v1/events` (CloudEvents 1.0: single, batch, NDJSON).
//! - [`log`]: the event-log contract ([`log::EventLog`]) and its adapters.
//! - [`problem`]: the JSON error reply shared by every Tally endpoint.
//! - [`metrics`]: Prometheus metrics of this stage.
//! - [`sqlite`]: how the embedded SQLite databases are opened.
//!
//! # Contract
//! A 202 is sent only once every accepted event of the request is durable on the log. A
//! duplicate (`source`, `id`) within the de-duplication window is acknowledged but not appended
//! again. Nothing is acknowledged when the log fails: the reply is 503 with `Retry-After`, and the
//! client's retry is de-duplicated.

pub mod error;
pub mod http;
pub mod log;
pub mod metrics;
pub mod problem;
pub mod sqlite;

use std::future::Future;

pub use error::{Error, Result};
pub use http::{EventAllowance, IngestSettings, IngestState, UsageRoom, router};

/// Serves the ingest API on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    state: IngestState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
