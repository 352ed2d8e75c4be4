//! Ingest: edge nodes POST usage events; Tally validates them, drops duplicates and appends them
//! to the usage-event log, keyed by customer.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! # Layout
//! - [`http`]: `POST /v1/events` (CloudEvents 1.0: single, batch, NDJSON).
//! - [`dimensions`]: the cap on distinct dimension combinations per customer and meter.
//! - [`metrics`]: Prometheus metrics of this stage.
//!
//! The log it appends to is the backends' (`tally_backends::log::EventLog`: embedded or Kafka);
//! its error replies are the shared ones (`tally_http::problem`).
//!
//! # Contract
//! A 202 is sent only once every accepted event of the request is durable on the log. A
//! duplicate (`source`, `id`) within the de-duplication window is acknowledged but not appended
//! again. Nothing is acknowledged when the log fails: the reply is 503 with `Retry-After`, and the
//! client's retry is de-duplicated.

pub mod dimensions;
pub mod error;
pub mod http;
pub mod metrics;

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
