//! The one slow-consumer policy: what a connection's unsent output means, decided in one
//! place and only after its socket was tried (a flush), so that output that arrived in one turn
//! and went straight out never counts against anyone.
//!
//! - Over the hard limit (`--max-output`): closed at once. One message (64 KiB, 384 KiB as an
//!   escaped v1 envelope) or one turn's burst to a reading client stays far below it.
//! - Over the soft limit (`--soft-output`) for longer than the grace period
//!   (`--soft-output-grace`): closed. A client that is only behind for a moment drains below
//!   the soft limit within the grace period and is never closed.
//! - The loop's budget (`--loop-output-budget`) bounds the sum over all its connections
//!   whatever their number; past it, the connections holding the most are closed first.
//!
//! Pure: the loop passes the bytes and the time and carries the outcome out.

use std::time::{Duration, Instant};

/// The limits, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Unsent bytes past which a connection is closed at once.
    pub hard: usize,
    /// Unsent bytes a connection may stay above only for `grace`.
    pub soft: usize,
    /// How long a connection may stay above `soft`.
    pub grace: Duration,
}

/// What a connection's unsent output means right after its socket was tried.
#[derive(Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// At or under the soft limit.
    Fine,
    /// Over the soft limit since the instant given, within the grace period.
    OverSoft(Instant),
    /// Over the hard limit, or over the soft one for longer than the grace period: close it.
    Close(&'static str),
}

/// Judges `unsent` bytes at `now`; `over_soft_since` remembers when the connection went over
/// the soft limit (cleared once it is back under).
pub fn judge(
    unsent: usize,
    over_soft_since: &mut Option<Instant>,
    now: Instant,
    limits: &Limits,
) -> Backpressure {
    if unsent > limits.hard {
        return Backpressure::Close("over --max-output");
    }
    if unsent <= limits.soft {
        *over_soft_since = None;
        return Backpressure::Fine;
    }
    let since = *over_soft_since.get_or_insert(now);
    if now.duration_since(since) > limits.grace {
        Backpressure::Close("over --soft-output past --soft-output-grace")
    } else {
        Backpressure::OverSoft(since)
    }
}

/// Which connections to close so that the loop's unsent total fits `budget`: given each
/// connection's unsent bytes, the largest holders first, until the rest fits.
pub fn over_budget(mut holders: Vec<(usize, usize)>, total: usize, budget: usize) -> Vec<usize> {
    if total <= budget {
        return Vec::new();
    }
    holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
    let mut left = total;
    let mut close = Vec::new();
    for (bytes, key) in holders {
        if left <= budget {
            break;
        }
        left = left.saturating_sub(bytes);
        close.push(key);
    }
    close
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        hard: 1000,
        soft: 100,
        grace: Duration::from_secs(10),
    };

    #[test]
    fn a_burst_under_the_hard_limit_that_drains_in_time_is_fine() {
        let t = Instant::now();
        let mut since = None;
        assert_eq!(judge(50, &mut since, t, &LIMITS), Backpressure::Fine);
        assert_eq!(judge(900, &mut since, t, &LIMITS), Backpressure::OverSoft(t));
        let later = t + Duration::from_secs(9);
        assert_eq!(judge(500, &mut since, later, &LIMITS), Backpressure::OverSoft(t));
        assert_eq!(judge(100, &mut since, later, &LIMITS), Backpressure::Fine);
        assert_eq!(since, None, "back under the soft limit restarts the grace period");
        let again = later + Duration::from_secs(1);
        assert_eq!(
            judge(200, &mut since, again, &LIMITS),
            Backpressure::OverSoft(again)
        );
    }

    #[test]
    fn staying_over_the_soft_limit_or_passing_the_hard_one_closes() {
        let t = Instant::now();
        let mut since = None;
        assert!(matches!(
            judge(1001, &mut since, t, &LIMITS),
            Backpressure::Close(_)
        ));
        assert_eq!(judge(101, &mut since, t, &LIMITS), Backpressure::OverSoft(t));
        let late = t + Duration::from_secs(11);
        assert!(matches!(
            judge(101, &mut since, late, &LIMITS),
            Backpressure::Close(_)
        ));
    }

    #[test]
    fn the_budget_closes_the_largest_holders_first() {
        let holders = vec![(10, 1), (500, 2), (300, 3), (50, 4)];
        assert_eq!(over_budget(holders.clone(), 860, 1000), Vec::<usize>::new());
        assert_eq!(over_budget(holders.clone(), 860, 400), vec![2]);
        assert_eq!(over_budget(holders, 860, 50), vec![2, 3, 4]);
    }
}
