//! A token bucket shared by every clone of one client.
//!
//! Callers reserve a token under a short lock and then sleep outside it until
//! their token exists: waiting is a timer, never a loop, and callers are
//! served in the order they asked. A caller dropped while it waits keeps its
//! reservation, which only makes the limit a little stricter.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_second: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Negative when callers are already waiting for future tokens.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(requests_per_second: u32, burst: Option<u32>) -> Self {
        let per_second = f64::from(requests_per_second.max(1));
        let burst = f64::from(burst.unwrap_or(requests_per_second).max(1));
        Self {
            per_second,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Waits until one request may go out.
    pub(crate) async fn acquire(&self) {
        let wait = self.reserve(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token, possibly one not yet there, and says how long until it is.
    fn reserve(&self, now: Instant) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.per_second).min(self.burst);
        s.at = now;
        s.tokens -= 1.0;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u64 {
        (d.as_secs_f64() * 1000.0).round() as u64
    }

    #[test]
    fn a_burst_is_free_then_tokens_come_at_the_rate() {
        let bucket = TokenBucket::new(10, Some(3));
        let t0 = Instant::now();
        let waits: Vec<_> = (0..6).map(|_| ms(bucket.reserve(t0))).collect();
        assert_eq!(waits, [0, 0, 0, 100, 200, 300]);
        // One second later the queue has drained and a fresh token exists.
        assert_eq!(ms(bucket.reserve(t0 + Duration::from_millis(1000))), 0);
    }

    #[test]
    fn the_burst_defaults_to_the_rate_and_never_overfills() {
        let bucket = TokenBucket::new(2, None);
        let t0 = Instant::now() + Duration::from_secs(60);
        let waits: Vec<_> = (0..3).map(|_| ms(bucket.reserve(t0))).collect();
        assert_eq!(waits, [0, 0, 500]);
    }
}
