//! Reconnect pacing: exponential backoff with full jitter. Pure, no I/O.
//!
//! "Full jitter" (wait a uniform random time between 0 and the current cap) spreads a fleet of
//! nodes that lost Redis at the same moment over the whole window, instead of having them all
//! reconnect in the same millisecond.

use std::time::Duration;

/// Backoff state for one reconnecting client.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    /// Starts at `min`, doubling per failure up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        debug_assert!(min <= max && !min.is_zero());
        Backoff { min, max, cap: min }
    }

    /// Wait before the next attempt: uniform in `[min/2, cap]`, then the cap doubles. The floor
    /// of `min/2` keeps a failing connect from being retried in a tight loop.
    pub fn next_delay(&mut self) -> Duration {
        let lo = self.min / 2;
        let span = self.cap.saturating_sub(lo).as_micros() as u64;
        let delay = lo + Duration::from_micros(fastrand::u64(0..=span));
        self.cap = (self.cap * 2).min(self.max);
        delay
    }

    /// Call after a success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.cap = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let mut caps = Vec::new();
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= min / 2 && d <= max, "{d:?}");
            caps.push(b.cap);
        }
        assert_eq!(*caps.last().unwrap(), max);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn delays_are_spread_not_identical() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            b.next_delay();
            b.next_delay();
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "jitter too weak: {} distinct", seen.len());
    }
}
