//! Work repeated at an interval until shutdown (refreshing what other processes change).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `work` every `period` (the first time after one period) until `shutdown`; a failure is
/// logged as `what` not done, and the next tick tries again. Ticks missed while `work` ran are
/// skipped.
pub async fn every<T, E, F, Fut>(
    period: Duration,
    shutdown: CancellationToken,
    what: &str,
    mut work: F,
) where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = work().await {
            tracing::warn!(error = %e, "{what} not done; retrying");
        }
    }
}
