//! A throttle for log lines about conditions that repeat (a full inbox, a stalled Redis): at most
//! one line per second, so an overload is reported without the report becoming a load of its
//! own. It limits logging only; client publish rates and per-IP connection limits are
//! `ratelimit`.

use std::time::Instant;

/// Lets an event through at most once per second.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
}

impl LogThrottle {
    /// True at most once per second: log the line when it is.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t).as_secs() < 1) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_once_per_second() {
        let mut l = LogThrottle::default();
        assert!(l.allow());
        assert!(!l.allow());
        // A second later it lets the next one through.
        l.last = Some(Instant::now() - std::time::Duration::from_millis(1001));
        assert!(l.allow());
    }
}
