//! What every Tally endpoint shares, in one place:
//!
//! - [`problem`]: the one error reply, `{"code", "message", ...}` with a stable machine-readable
//!   code, its gRPC status (the same code mapped once for both protocols), and the mapping of
//!   axum's rejections (bad JSON, a body too large, a slow body) to codes.
//! - [`extract`]: `Query` and `Json` extractors rejected with the shared error reply.
//! - [`metrics`]: request counts and durations by matched route (the [`metrics::track`] layer)
//!   and the `/metrics` endpoint.
//!
//! Stages (`ingest`, `aggregator`'s query API, `enforcer`, `billing-sync`'s webhooks) and the
//! binary's own routes use these, so every listener answers errors and counts requests alike.

pub mod extract;
pub mod metrics;
pub mod problem;

pub use problem::{ApiError, EventFault, Problem, from_body_rejection, from_rejection};
