//! In-memory history and sessions for the in-process broker: the same semantics as the Redis
//! data model (capped per-channel history with gapless offsets and an epoch, time-to-live on
//! history and sessions), as pure data structures. Time is passed in, so tests need no clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bridge::{Channel, Delivery, History, Position, SessionState};
use crate::frame::Kind;

/// A fresh, random epoch name. Not a secret: it only has to differ from the previous one.
pub fn new_epoch() -> Arc<str> {
    let s: String = std::iter::repeat_with(fastrand::alphanumeric).take(10).collect();
    Arc::from(s)
}

#[derive(Debug)]
struct Log {
    epoch: Arc<str>,
    top: u64,
    ring: VecDeque<Arc<Delivery>>,
    expires: Instant,
}

/// Capped message history per channel.
#[derive(Debug)]
pub struct HistoryStore {
    size: usize,
    ttl: Duration,
    logs: HashMap<Channel, Log>,
}

impl HistoryStore {
    /// Keeps `size` messages per channel for `ttl` after the channel's last publish.
    pub fn new(size: usize, ttl: Duration) -> Self {
        HistoryStore {
            size,
            ttl,
            logs: HashMap::new(),
        }
    }

    /// The channel's log, created (or restarted, when expired) with a fresh epoch and a full
    /// time to live, as the Redis scripts do.
    fn log(&mut self, channel: &Channel, now: Instant) -> &mut Log {
        let ttl = self.ttl;
        let fresh = move || Log {
            epoch: new_epoch(),
            top: 0,
            ring: VecDeque::new(),
            expires: now + ttl,
        };
        let log = self.logs.entry(channel.clone()).or_insert_with(fresh);
        if now > log.expires {
            // Expired: the history is gone, like an expired Redis key; a new epoch says so.
            *log = fresh();
        }
        log
    }

    /// Stores a message, giving it the channel's next offset.
    pub fn append(&mut self, channel: Channel, kind: Kind, data: Bytes, now: Instant) -> Arc<Delivery> {
        let (size, ttl) = (self.size, self.ttl);
        let log = self.log(&channel, now);
        log.top += 1;
        log.expires = now + ttl;
        let position = Position {
            offset: log.top,
            epoch: log.epoch.clone(),
        };
        let d = Delivery::new(channel, kind, data, Some(position));
        if log.ring.len() == size {
            log.ring.pop_front();
        }
        log.ring.push_back(d.clone());
        d
    }

    /// The channel's position and, with `since`, its stored messages after that offset.
    pub fn read(&mut self, channel: &Channel, since: Option<u64>, now: Instant) -> History {
        let log = self.log(channel, now);
        let entries = match since {
            None => Vec::new(),
            Some(since) => log
                .ring
                .iter()
                .filter(|d| d.position.as_ref().is_some_and(|p| p.offset > since))
                .cloned()
                .collect(),
        };
        History {
            epoch: log.epoch.clone(),
            top: log.top,
            entries,
        }
    }

    /// Forgets expired channels (their memory is released).
    pub fn expire(&mut self, now: Instant) {
        self.logs.retain(|_, log| log.expires >= now);
    }

    /// Channels with a history in memory.
    pub fn len(&self) -> usize {
        self.logs.len()
    }

    /// True when no channel has history.
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }
}

/// Sessions with a time to live.
#[derive(Debug)]
pub struct SessionStore {
    ttl: Duration,
    sessions: HashMap<Arc<str>, (SessionState, Instant)>,
}

impl SessionStore {
    /// Sessions live `ttl` after their last save.
    pub fn new(ttl: Duration) -> Self {
        SessionStore {
            ttl,
            sessions: HashMap::new(),
        }
    }

    /// The stored session, unless absent or expired.
    pub fn load(&self, id: &str, now: Instant) -> Option<SessionState> {
        self.sessions
            .get(id)
            .filter(|(_, expires)| now <= *expires)
            .map(|(s, _)| s.clone())
    }

    /// Replaces the session and restarts its time to live.
    pub fn save(&mut self, id: Arc<str>, state: SessionState, now: Instant) {
        self.sessions.insert(id, (state, now + self.ttl));
    }

    /// Forgets expired sessions.
    pub fn expire(&mut self, now: Instant) {
        self.sessions.retain(|_, (_, expires)| *expires >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Arc::from(s)
    }

    fn offsets(h: &History) -> Vec<u64> {
        h.entries
            .iter()
            .map(|d| d.position.as_ref().unwrap().offset)
            .collect()
    }

    #[test]
    fn offsets_are_gapless_and_history_is_capped() {
        let t = Instant::now();
        let mut h = HistoryStore::new(3, Duration::from_secs(60));
        let c = ch("c");
        for i in 1..=5u64 {
            let d = h.append(c.clone(), Kind::Text, Bytes::from(i.to_string()), t);
            assert_eq!(d.position.as_ref().unwrap().offset, i);
        }
        let all = h.read(&c, Some(0), t);
        assert_eq!(all.top, 5);
        assert_eq!(offsets(&all), vec![3, 4, 5]);
        assert_eq!(offsets(&h.read(&c, Some(4), t)), vec![5]);
        assert!(h.read(&c, None, t).entries.is_empty());
        // Another channel has its own offsets.
        let d = h.append(ch("other"), Kind::Text, Bytes::new(), t);
        assert_eq!(d.position.as_ref().unwrap().offset, 1);
    }

    #[test]
    fn expiry_starts_a_new_epoch() {
        let t = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut h = HistoryStore::new(10, ttl);
        let c = ch("c");
        let first = h
            .append(c.clone(), Kind::Text, Bytes::new(), t)
            .position
            .clone()
            .unwrap();
        assert_eq!(
            h.read(&c, None, t + ttl).epoch,
            first.epoch,
            "still alive at the boundary"
        );
        let later = h.read(&c, Some(0), t + ttl + Duration::from_secs(1));
        assert_ne!(later.epoch, first.epoch);
        assert_eq!(later.top, 0);
        assert!(later.entries.is_empty());
        h.expire(t + ttl * 5);
        assert!(h.is_empty());
    }

    #[test]
    fn reading_an_unknown_channel_fixes_its_epoch() {
        let t = Instant::now();
        let mut h = HistoryStore::new(10, Duration::from_secs(10));
        let c = ch("c");
        let before = h.read(&c, None, t);
        assert_eq!(before.top, 0);
        let d = h.append(c, Kind::Text, Bytes::new(), t);
        assert_eq!(d.position.as_ref().unwrap().epoch, before.epoch);
    }

    #[test]
    fn sessions_expire() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(5));
        let state = SessionState {
            subject: None,
            channels: vec![(ch("a"), 3, Some(Arc::from("e")))],
        };
        s.save(Arc::from("id"), state.clone(), t);
        assert_eq!(s.load("id", t + Duration::from_secs(5)), Some(state));
        assert_eq!(s.load("id", t + Duration::from_secs(6)), None);
        assert_eq!(s.load("other", t), None);
        s.expire(t + Duration::from_secs(6));
        assert!(s.sessions.is_empty());
    }
}
