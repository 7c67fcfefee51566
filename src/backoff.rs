//! Reconnect pacing: exponential backoff with jitter above a floor. Pure, no I/O.
//!
//! Each wait is drawn uniformly from `[min/2, cap]`, where `cap` starts at `min` and doubles
//! per failure up to `max`. The jitter spreads a fleet of nodes that lost Redis at the same
//! moment over the window instead of having them all reconnect in the same millisecond. This
//! is not "full jitter" (uniform in `[0, cap]`): the floor of `min/2` keeps a connect that
//! fails at once from being retried in a tight loop, at the price of a slightly narrower
//! spread on the first attempts.

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

    /// Wait before the next attempt: uniform in `[min/2, cap]`, then the cap doubles (up to
    /// `max`). After `n` failures since the last [`Backoff::reset`] the cap is
    /// `min(max, min * 2^n)`.
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

    /// Draws the `n`th delay (0-based) of a fresh backoff, `draws` times.
    fn nth_delays(min: Duration, max: Duration, n: u32, draws: usize) -> Vec<Duration> {
        (0..draws)
            .map(|_| {
                let mut b = Backoff::new(min, max);
                (0..n).for_each(|_| {
                    b.next_delay();
                });
                b.next_delay()
            })
            .collect()
    }

    #[test]
    fn each_delay_is_uniform_between_the_floor_and_the_doubling_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for n in 0..8 {
            let cap = (min * 2u32.pow(n)).min(max);
            let floor = min / 2;
            let d = nth_delays(min, max, n, 2000);
            assert!(d.iter().all(|d| *d >= floor && *d <= cap), "attempt {n}: {d:?}");
            // Both ends of the range are reached: the lowest and highest tenth each hold some
            // of 2,000 draws (a miss has probability 0.9^2000).
            let tenth = (cap - floor) / 10;
            assert!(
                d.iter().any(|d| *d < floor + tenth),
                "attempt {n}: nothing near {floor:?}"
            );
            assert!(
                d.iter().any(|d| *d > cap - tenth),
                "attempt {n}: nothing near {cap:?}"
            );
        }
    }

    #[test]
    fn reset_starts_from_min_again() {
        let min = Duration::from_millis(100);
        let mut b = Backoff::new(min, Duration::from_secs(5));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.cap, Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() <= min);
        assert_eq!(b.cap, min * 2);
    }
}
