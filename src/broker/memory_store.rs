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

/// Makes room for one more entry in a map holding at most `cap`: drops expired entries, and if
/// that is not enough, the sixteenth of the entries closest to expiry (so the cost of the scan
/// is shared by the next sixteenth of inserts). Returns how many entries were dropped.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    now: Instant,
    expires: impl Fn(&V) -> Instant,
) -> usize {
    if map.len() < cap {
        return 0;
    }
    let before = map.len();
    map.retain(|_, v| expires(v) >= now);
    if map.len() >= cap {
        let mut by_expiry: Vec<(Instant, K)> = map.iter().map(|(k, v)| (expires(v), k.clone())).collect();
        let n = (cap / 16).max(1).min(by_expiry.len());
        by_expiry.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        for (_, k) in &by_expiry[..n] {
            map.remove(k);
        }
    }
    before - map.len()
}

/// Capped message history per channel, for a bounded number of channels.
#[derive(Debug)]
pub struct HistoryStore {
    size: usize,
    ttl: Duration,
    max_channels: usize,
    logs: HashMap<Channel, Log>,
    /// Channels dropped early to stay under `max_channels`.
    pub evicted: u64,
}

impl HistoryStore {
    /// Keeps `size` messages per channel for `ttl` after the channel's last publish, for at
    /// most `max_channels` channels (past it, the histories closest to expiry go first: their
    /// clients get `recovered: false`, as after a Redis eviction).
    pub fn new(size: usize, ttl: Duration, max_channels: usize) -> Self {
        HistoryStore {
            size,
            ttl,
            max_channels: max_channels.max(1),
            logs: HashMap::new(),
            evicted: 0,
        }
    }

    /// The channel's log, created (or restarted, when expired) with a fresh epoch and a full
    /// time to live, as the Redis scripts do.
    fn log(&mut self, channel: &Channel, now: Instant) -> &mut Log {
        if !self.logs.contains_key(channel) {
            self.evicted += make_room(&mut self.logs, self.max_channels, now, |l| l.expires) as u64;
        }
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

/// Sessions with a time to live, a bounded number of them.
#[derive(Debug)]
pub struct SessionStore {
    ttl: Duration,
    max: usize,
    sessions: HashMap<Arc<str>, (SessionState, Instant)>,
    /// Sessions dropped early to stay under the cap.
    pub evicted: u64,
}

impl SessionStore {
    /// Sessions live `ttl` after their last save; at most `max` are kept (past it, those
    /// closest to expiry go first).
    pub fn new(ttl: Duration, max: usize) -> Self {
        SessionStore {
            ttl,
            max: max.max(1),
            sessions: HashMap::new(),
            evicted: 0,
        }
    }

    /// The stored session, unless absent or expired.
    pub fn load(&self, id: &str, now: Instant) -> Option<SessionState> {
        self.sessions
            .get(id)
            .filter(|(_, expires)| now <= *expires)
            .map(|(s, _)| s.clone())
    }

    /// Replaces the session and restarts its time to live. A channel whose position is not
    /// known (no epoch) keeps the position stored for it, if any: [`SessionStore::record`]
    /// may have stored it first.
    pub fn save(&mut self, id: Arc<str>, mut state: SessionState, now: Instant) {
        match self.sessions.get(&id) {
            Some((old, _)) => {
                for (channel, offset, epoch) in state.channels.iter_mut().filter(|c| c.2.is_none()) {
                    if let Some((_, o, e)) = old.channels.iter().find(|c| c.0 == *channel) {
                        (*offset, *epoch) = (*o, e.clone());
                    }
                }
            }
            None => self.evicted += make_room(&mut self.sessions, self.max, now, |(_, t)| *t) as u64,
        }
        self.sessions.insert(id, (state, now + self.ttl));
    }

    /// Stores `channel`'s position in the session (created if absent, for `subject`) and
    /// restarts its time to live.
    pub fn record(
        &mut self,
        id: Arc<str>,
        subject: Option<String>,
        channel: Channel,
        position: Position,
        now: Instant,
    ) {
        let entry = (channel, position.offset, Some(position.epoch));
        if let Some((state, expires)) = self.sessions.get_mut(&id) {
            match state.channels.iter_mut().find(|c| c.0 == entry.0) {
                Some(c) => *c = entry,
                None => state.channels.push(entry),
            }
            *expires = now + self.ttl;
            return;
        }
        let state = SessionState {
            subject,
            channels: vec![entry],
        };
        self.save(id, state, now);
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
        let mut h = HistoryStore::new(3, Duration::from_secs(60), 100);
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
        let mut h = HistoryStore::new(10, ttl, 100);
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
        let mut h = HistoryStore::new(10, Duration::from_secs(10), 100);
        let c = ch("c");
        let before = h.read(&c, None, t);
        assert_eq!(before.top, 0);
        let d = h.append(c, Kind::Text, Bytes::new(), t);
        assert_eq!(d.position.as_ref().unwrap().epoch, before.epoch);
    }

    #[test]
    fn channel_and_session_counts_are_capped() {
        let t = Instant::now();
        let mut h = HistoryStore::new(10, Duration::from_secs(60), 32);
        for i in 0..1000u64 {
            h.append(
                ch(&i.to_string()),
                Kind::Text,
                Bytes::new(),
                t + Duration::from_millis(i),
            );
        }
        assert!(h.len() <= 32, "{} channels kept", h.len());
        assert!(h.evicted >= 1000 - 32);
        // The most recently published survive.
        assert_eq!(h.read(&ch("999"), Some(0), t + Duration::from_secs(1)).top, 1);
        let mut s = SessionStore::new(Duration::from_secs(60), 16);
        for i in 0..100u64 {
            s.save(
                Arc::from(i.to_string()),
                SessionState::default(),
                t + Duration::from_millis(i),
            );
        }
        assert!(s.sessions.len() <= 16);
        assert!(s.load("99", t + Duration::from_secs(1)).is_some());
        assert!(s.load("0", t + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn a_recorded_position_survives_a_save_that_does_not_know_it() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(5), 100);
        let e: Arc<str> = Arc::from("e");
        let at = |offset| Position {
            offset,
            epoch: e.clone(),
        };
        // The position is recorded before the loop's first save (which does not know it yet).
        s.record(Arc::from("id"), Some("alice".into()), ch("a"), at(3), t);
        let unknown = SessionState {
            subject: Some("alice".into()),
            channels: vec![(ch("a"), 0, None), (ch("b"), 0, None)],
        };
        s.save(Arc::from("id"), unknown, t);
        let stored = s.load("id", t).unwrap();
        assert_eq!(stored.channels[0], (ch("a"), 3, Some(e.clone())));
        assert_eq!(stored.channels[1], (ch("b"), 0, None));
        // A known position replaces it; a channel left behind is dropped.
        let known = SessionState {
            subject: Some("alice".into()),
            channels: vec![(ch("a"), 5, Some(e.clone()))],
        };
        s.save(Arc::from("id"), known.clone(), t);
        assert_eq!(s.load("id", t), Some(known));
        s.record(Arc::from("id"), None, ch("c"), at(1), t);
        assert_eq!(s.load("id", t).unwrap().channels.len(), 2);
    }

    #[test]
    fn sessions_expire() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(5), 100);
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
