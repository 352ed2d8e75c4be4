/// Errors of the ingest stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event log failed or refused (see [`tally_backends::Error::is_retryable`]).
    #[error(transparent)]
    Log(#[from] tally_backends::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
