/// Errors of the aggregator and of the usage-store adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the embedded store at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: rusqlite::Error,
    },
    #[error("embedded store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "partition {partition}: batch starts at offset {first} but the store is at {stored}; another aggregator wrote this partition"
    )]
    Fenced {
        partition: u32,
        first: u64,
        stored: u64,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(String),
    #[error("stored customer record is unreadable: {0}")]
    Record(#[from] serde_json::Error),
    #[error(transparent)]
    Log(#[from] tally_ingest::Error),
    #[error("the store is shut down")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tally_ingest::sqlite::Unavailable> for Error {
    fn from(_: tally_ingest::sqlite::Unavailable) -> Error {
        Error::Closed
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
