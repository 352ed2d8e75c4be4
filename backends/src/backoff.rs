//! The one retry schedule of every loop that waits for a backend (or a remote API) to come
//! back: exponential, doubling from a first wait up to a ceiling, with optional jitter (each
//! wait drawn from the second half of its step, so replicas that failed together do not retry
//! together).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// An exponential backoff. [`Backoff::next_wait`] gives the wait before the next attempt and
/// doubles the step; [`Backoff::reset`] goes back to the first step after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
    jitter: bool,
}

impl Backoff {
    /// Waits of `first`, `2 * first`, ... up to `max`, without jitter.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            step: first.min(max),
            jitter: false,
        }
    }

    /// Each wait drawn uniformly from the second half of its step.
    pub fn jittered(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The step of attempt `attempt` (1 for the first retry), without drawing: `first * 2^(attempt - 1)`,
    /// at most `max`. For callers that keep the attempt count themselves (a durable outbox).
    pub fn step_of(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1 << attempt.saturating_sub(1).min(30))
            .min(self.max)
    }

    /// [`Backoff::step_of`], with this backoff's jitter.
    pub fn wait_of(&self, attempt: u32) -> Duration {
        self.draw(self.step_of(attempt))
    }

    fn draw(&self, step: Duration) -> Duration {
        if self.jitter {
            step.mul_f64(rand::random_range(0.5..1.0))
        } else {
            step
        }
    }

    /// The wait before the next attempt; doubles the step for the one after.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.draw(self.step);
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.first.min(self.max);
    }

    /// Sleeps [`Backoff::next_wait`]; `false` if `shutdown` was cancelled first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next_wait();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_wait(), ms(100));
        assert_eq!(b.step_of(1), ms(100));
        assert_eq!(b.step_of(3), ms(400));
        assert_eq!(b.step_of(64), ms(500), "no overflow far out");
    }

    #[test]
    fn jitter_stays_in_the_second_half_of_each_step() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(1000), ms(4000)).jittered();
        for step in [1000, 2000, 4000, 4000] {
            let w = b.next_wait();
            assert!(
                w >= ms(step / 2) && w < ms(step),
                "{w:?} outside [{}, {step}) ms",
                step / 2
            );
        }
    }

    #[tokio::test]
    async fn a_cancelled_wait_returns_false_at_once() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(!b.wait(&shutdown).await);
    }
}
