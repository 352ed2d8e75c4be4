/// Errors of the aggregator and of its query API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log or the store failed or refused: an outage is retryable
    /// ([`tally_backends::Error::is_retryable`]), a fenced batch is not.
    #[error(transparent)]
    Backend(#[from] tally_backends::Error),
}

impl Error {
    /// Another aggregator wrote the batch's partition meanwhile
    /// ([`tally_backends::Error::Fenced`]).
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Backend(tally_backends::Error::Fenced { .. }))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
