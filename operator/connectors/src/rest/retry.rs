//! When to try again, and how long to wait first.
//!
//! Exponential backoff with full jitter: before retry `n` (1-based) the wait
//! is uniform in `0..=min(initial * 2^(n-1), max)`. A `Retry-After` on 429 or
//! 503 sets a floor under that wait, capped at [`MAX_RETRY_AFTER`] so a
//! confused server cannot park a message for days.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tallyman_api::v1alpha1::RetryPolicy;

/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    pub(crate) max_attempts: u32,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(policy: &RetryPolicy) -> Self {
        Self {
            max_attempts: policy.max_attempts.max(1),
            initial: policy.initial_backoff.as_std(),
            max: policy.max_backoff.as_std(),
        }
    }

    /// The upper bound of the wait before retry `n` (1-based).
    pub(crate) fn cap(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry `n` (1-based), at least `floor`.
    pub(crate) fn delay(&self, retry: u32, floor: Option<Duration>) -> Duration {
        let cap = u64::try_from(self.cap(retry).as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(fastrand::u64(0..=cap));
        match floor {
            Some(floor) => jittered.max(floor.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// Whether an answer with this status is worth another attempt.
pub(crate) fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// Whether a call's answer is worth another attempt; `keyed`: the request
/// carried an idempotency key and has attempts left. A 409 to a keyed request says the key's
/// first request is still being processed (draft-ietf-httpapi-idempotency-
/// key-header); its answer comes to a later attempt. Taken as a refusal,
/// the call would fail while the booking is made.
pub(crate) fn retryable_call(status: StatusCode, keyed: bool) -> bool {
    retryable(status) || (keyed && status == StatusCode::CONFLICT)
}

/// The server's `Retry-After` on a 429 or 503: delay seconds or an HTTP date.
pub(crate) fn retry_after(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    parse_retry_after(value, SystemTime::now())
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            max_attempts: 5,
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn caps_double_up_to_the_maximum() {
        let b = backoff(200, 1000);
        let caps: Vec<_> = (1..=5).map(|n| b.cap(n).as_millis()).collect();
        assert_eq!(caps, [200, 400, 800, 1000, 1000]);
        assert_eq!(b.cap(200), Duration::from_millis(1000));
    }

    #[test]
    fn delays_are_jittered_within_the_cap() {
        let b = backoff(100, 1000);
        let delays: Vec<_> = (0..200).map(|_| b.delay(2, None)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
        // Full jitter spreads the waits out instead of synchronising clients.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(100)));
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_five_minutes() {
        let b = backoff(1, 1);
        assert!(b.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(42))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn only_429_and_503_carry_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            retry_after(StatusCode::TOO_MANY_REQUESTS, &headers),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(StatusCode::SERVICE_UNAVAILABLE, &headers),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(StatusCode::BAD_GATEWAY, &headers), None);
    }

    #[test]
    fn retries_server_errors_timeouts_and_throttling_only() {
        for s in [500, 502, 503, 504, 408, 429] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
