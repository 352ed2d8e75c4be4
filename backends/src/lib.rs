//! Tally's backends: every adapter to durable storage, in one place, behind narrow traits.
//!
//! `edge -> ingest -> [log] -> aggregator -> [store] <- enforcer, billing-sync, query API`
//!
//! # Layout
//! - [`log`]: the usage-event log ([`log::EventLog`], [`log::LogReader`]) and its threshold
//!   notification claims ([`log::Notifications`]); adapters [`log::embedded`] (SQLite) and
//!   `log::kafka` (cargo feature `kafka`).
//! - [`store`]: the usage store, one trait per role ([`store::UsageWriter`],
//!   [`store::UsageReader`], [`store::Customers`], [`store::BillingMarks`],
//!   [`store::WebhookOutbox`], [`store::ApiKeys`]; [`store::Store`] is all of them); adapters
//!   [`store::sqlite`] and `store::clickhouse` (cargo feature `clickhouse`), each split by role
//!   with its schema beside it.
//! - [`catalog`]: the live catalogue, the file's meters and plans with the meters managed
//!   through the API, kept fresh from the store.
//! - [`sqlite`]: how the embedded SQLite databases are opened and used off the async workers.
//! - [`backoff`]: the one retry schedule of every loop that waits for a backend to come back.
//! - [`metrics`]: Prometheus metrics of the adapters (commit times, consumer lag).
//!
//! Every stage depends on this crate and on the core (`tally-schemas`), never on another stage.
//! The contracts (durability of an append, atomicity of a batch write, what a replay does) are
//! stated in each module's documentation; `tests/conformance.rs` runs the same scenarios
//! against every backend.

pub mod backoff;
pub mod catalog;
pub mod error;
pub mod log;
pub mod metrics;
pub mod periodic;
pub mod sqlite;
pub mod store;

pub use error::{Error, Result};
