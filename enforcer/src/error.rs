/// Errors of the enforcer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log or the store failed or refused (see [`tally_backends::Error::is_retryable`]).
    #[error(transparent)]
    Backend(#[from] tally_backends::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
