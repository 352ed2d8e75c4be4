//! Tally's I/O-free core.
//!
//! `edge -> ingest -> Kafka -> aggregator -> ClickHouse / enforcer -> billing-sync -> Stripe`
//!
//! Everything the stages must agree on, with no tokio and no sockets, so it is cheap to test,
//! fuzz and benchmark.
//!
//! # Layout
//! - [`event`]: the CloudEvents 1.0 contract, validation with stable error codes.
//! - [`wire`]: the binary encoding of events on the log (Kafka or embedded).
//! - [`catalog`]: meters, plans, limits and the quota policy (`catalog.toml`).
//! - [`meter`]: meters over the event's payload: the readings (meter, quantity, dimensions) of
//!   one event; [`path`]: the JSON paths they read.
//! - [`customer`]: a customer's plan, overrides, billing period and payment state.
//! - [`period`]: billing periods (subscription anchor or calendar month, UTC) and series windows.
//! - [`quantity`]: the usage cap, and overflow-free sums of stored quantities.
//! - [`quota`]: the 80 / 100 / 110 % decision rules, threshold crossings and notifications.
//! - [`record`]: a usage event as read back from the log, with its partition and offset.
//! - [`rollup`]: folding records into per (customer, meter, minute) cells, exactly.
//! - [`clock`]: wall-clock time behind a trait, so tests control it.
//!
//! # Units
//! Quantities are whole numbers in the meter's unit (requests, bytes, minutes, items). Times are
//! milliseconds since the Unix epoch, UTC.

pub mod catalog;
pub mod clock;
pub mod customer;
pub mod event;
pub mod meter;
pub mod path;
pub mod period;
pub mod quantity;
pub mod quota;
pub mod record;
pub mod rollup;
pub mod wire;

pub use catalog::{Aggregation, Catalog, Limit, ManagedMeter, Meter, OnLimit, Plan, QuotaPolicy};
pub use clock::{Clock, ManualClock, SystemClock};
pub use customer::Customer;
pub use event::{EventError, TimePolicy, UsageEvent};
pub use period::{Period, Window};
pub use quota::{Decision, Notification, UsageState, Verdict};
pub use record::Record;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid catalogue: {0}")]
    Catalog(String),
    #[error("undecodable event record: {0}")]
    Wire(#[from] prost::DecodeError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
