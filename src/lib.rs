//! Tally: a usage metering pipeline.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! This crate is the `tally` binary's library: configuration, wiring of the components
//! ([`app`]), the admin endpoints and logging. The stages live in their own crates:
//! `tally-schemas` (the I/O-free core), `tally-ingest`, `tally-aggregator`, `tally-enforcer` and
//! `tally-billing-sync`.

pub mod app;
pub mod auth;
pub mod config;
pub mod dashboard;
pub mod keys;
pub mod meters;
pub mod metrics;
pub mod openapi;
pub mod operator;
pub mod replay;
pub mod serve;
pub mod telemetry;

pub use app::{App, Component, run};
pub use config::Config;

/// Errors at the binary's level.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Schema(#[from] tally_schemas::Error),
    #[error(transparent)]
    Backend(#[from] tally_backends::Error),
    #[error(transparent)]
    Ingest(#[from] tally_ingest::Error),
    #[error(transparent)]
    Aggregator(#[from] tally_aggregator::Error),
    #[error(transparent)]
    Billing(#[from] tally_billing_sync::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("a pipeline task failed: {0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
