use std::path::PathBuf;

/// Errors of the ingest stage and of the event-log adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the embedded log at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("embedded log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("append failed: {0}")]
    Append(String),
    #[error("the event log is shut down")]
    Closed,
    #[error(transparent)]
    Schema(#[from] tally_schemas::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::sqlite::Unavailable> for Error {
    fn from(_: crate::sqlite::Unavailable) -> Error {
        Error::Closed
    }
}

impl Error {
    /// Whether the caller may retry later (the log is down or busy) rather than fix its input.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Schema(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
