//! Errors of the backends, by kind: an outage (retry later) is told apart from a refusal that
//! retrying cannot fix (bad input, a fenced writer, a misconfigured topic or database).

use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A group commit of the embedded log failed; every append waiting on it gets the error.
    #[error("embedded log commit failed: {0}")]
    Commit(Arc<Error>),
    #[cfg(feature = "kafka")]
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[cfg(feature = "clickhouse")]
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// The broker or the database does not have what the configuration names (a topic without
    /// partitions, an invalid database name): an operator must act.
    #[error("misconfigured: {0}")]
    Config(String),
    /// A backend did not answer within the time the caller allows.
    #[error("{what} not acknowledged within {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error(
        "partition {partition}: batch starts at offset {first} but the store is at {stored}; another aggregator wrote this partition"
    )]
    Fenced {
        partition: u32,
        first: u64,
        stored: u64,
    },
    #[error("stored record is unreadable: {0}")]
    Record(#[from] serde_json::Error),
    /// A record that is not a Tally usage event (undecodable bytes).
    #[error(transparent)]
    Schema(#[from] tally_schemas::Error),
    #[error("the backend is shut down")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::sqlite::Unavailable> for Error {
    fn from(_: crate::sqlite::Unavailable) -> Error {
        Error::Closed
    }
}

impl Error {
    /// Whether the same call may succeed later, once the backend is back (an outage, a timeout,
    /// a busy database), rather than needing other input, another owner or an operator.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::Schema(_) | Error::Config(_) | Error::Fenced { .. } | Error::Record(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
