//! In-memory history and sessions for the in-process broker: the same semantics as the Redis
//! data model (capped per-channel history with gapless offsets and an epoch, time-to-live on
//! history and sessions), as pure data structures. Time is passed in, so tests need no clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bridge::{Channel, Delivery, History, Origin, Position, SessionState};
use crate::frame::Kind;
use crate::position::new_epoch;

/// Bytes a stored message costs beyond its frame: the shared `Delivery`, its
/// `Arc` and the ring slot (measured size of the structs, rounded up).
pub const ENTRY_OVERHEAD: usize = 192;
/// Bytes a stored session costs beyond its id, subject and channel names (map slot, state).
pub const SESSION_OVERHEAD: usize = 160;
/// Bytes per channel of a stored session beyond the name (the entry, offset, epoch handle).
pub const SESSION_CHANNEL_OVERHEAD: usize = 48;

/// What a stored message costs: its raw frame (the payload behind a header, kept so a replay
/// costs no encoding; the payload is a view of it) and [`ENTRY_OVERHEAD`].
fn entry_bytes(d: &Delivery) -> usize {
    d.raw_frame.len() + ENTRY_OVERHEAD
}

#[derive(Debug)]
struct Log {
    epoch: Arc<str>,
    top: u64,
    ring: VecDeque<Arc<Delivery>>,
    /// Bytes of `ring`, by `entry_bytes`.
    bytes: usize,
    expires: Instant,
    /// Who created it (published or subscribed first).
    origin: Option<Origin>,
}

/// Makes room for one more entry in a map holding at most `cap`: drops expired entries, and if
/// that is not enough, the sixteenth of the entries that `order` puts first (so the cost of the
/// scan is shared by the next sixteenth of inserts). Returns the entries dropped.
fn make_room<K: Clone + Eq + std::hash::Hash, V, O: Ord>(
    map: &mut HashMap<K, V>,
    cap: usize,
    now: Instant,
    expires: impl Fn(&V) -> Instant,
    order: impl Fn(&K, &V) -> O,
) -> Vec<V> {
    let mut dropped = Vec::new();
    if map.len() < cap {
        return dropped;
    }
    let expired: Vec<K> = map
        .iter()
        .filter(|(_, v)| expires(v) < now)
        .map(|(k, _)| k.clone())
        .collect();
    dropped.extend(expired.iter().filter_map(|k| map.remove(k)));
    if map.len() >= cap {
        let mut ranked: Vec<(O, K)> = map.iter().map(|(k, v)| (order(k, v), k.clone())).collect();
        let n = (cap / 16).max(1).min(ranked.len());
        ranked.select_nth_unstable_by(n - 1, |a, b| a.0.cmp(&b.0));
        dropped.extend(ranked.drain(..n).filter_map(|(_, k)| map.remove(&k)));
    }
    dropped
}

/// Limits of a [`HistoryStore`].
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Messages kept per channel (`--history-size`).
    pub size: usize,
    /// A channel's history expires this long after its last publish (`--history-ttl`).
    pub ttl: Duration,
    /// Channels with a history (`--max-history-channels`).
    pub max_channels: usize,
    /// Bytes of all stored messages together (`--history-memory`).
    pub max_bytes: usize,
    /// Bytes of one channel's stored messages (`--history-channel-memory`).
    pub channel_bytes: usize,
}

/// Message history per channel, capped in messages and bytes per channel, and in channels and
/// bytes overall. Past an overall cap, what goes first is, in order: channels without live
/// subscribers and not named in a stored session (the caller's `live`); of those, the ones
/// whose creator (see [`Origin`]) created the most channels still held; then those published
/// to longest ago. So one client creating channels by the
/// thousand pushes out its own, not the history of channels people are on or wait to recover.
#[derive(Debug)]
pub struct HistoryStore {
    limits: HistoryLimits,
    logs: HashMap<Channel, Log>,
    /// Channels held per creator.
    owned: HashMap<Origin, usize>,
    /// Bytes of every stored message, by `entry_bytes`.
    bytes: usize,
    /// Channels and messages dropped early to stay under the caps.
    pub evicted: u64,
}

impl HistoryStore {
    /// A store with `limits` (past an overall cap, histories of channels nobody is on go first:
    /// their clients get `recovered: false`, as after a Redis eviction).
    pub fn new(limits: HistoryLimits) -> Self {
        HistoryStore {
            limits: HistoryLimits {
                max_channels: limits.max_channels.max(1),
                ..limits
            },
            logs: HashMap::new(),
            owned: HashMap::new(),
            bytes: 0,
            evicted: 0,
        }
    }

    /// Eviction order (smallest first): nobody on it, most channels held by its creator,
    /// published to longest ago.
    fn rank(
        owned: &HashMap<Origin, usize>,
        live: bool,
        log: &Log,
    ) -> (bool, std::cmp::Reverse<usize>, Instant) {
        let held = log
            .origin
            .as_ref()
            .and_then(|o| owned.get(o))
            .copied()
            .unwrap_or(0);
        (live, std::cmp::Reverse(held), log.expires)
    }

    /// Forgets a dropped log's bytes and its creator's count.
    fn forget(&mut self, log: &Log) {
        self.bytes -= log.bytes;
        if let Some(o) = &log.origin {
            if let Some(n) = self.owned.get_mut(o) {
                *n -= 1;
                if *n == 0 {
                    self.owned.remove(o);
                }
            }
        }
    }

    /// The channel's log, created (or restarted, when expired) with a fresh epoch and a full
    /// time to live, as the Redis scripts do. `live` tells channels with subscribers.
    fn log(
        &mut self,
        channel: &Channel,
        now: Instant,
        origin: Option<&Origin>,
        live: &dyn Fn(&str) -> bool,
    ) -> &mut Log {
        let ttl = self.limits.ttl;
        let fresh = |origin: Option<&Origin>| Log {
            epoch: new_epoch(),
            top: 0,
            ring: VecDeque::new(),
            bytes: 0,
            expires: now + ttl,
            origin: origin.cloned(),
        };
        match self.logs.get(channel) {
            Some(log) if now <= log.expires => {}
            Some(_) => {
                // Expired: the history is gone, like an expired Redis key; a new epoch says so.
                if let Some(old) = self.logs.remove(channel) {
                    self.forget(&old);
                }
            }
            None => {
                let owned = &self.owned;
                let dropped = make_room(
                    &mut self.logs,
                    self.limits.max_channels,
                    now,
                    |l| l.expires,
                    |c, l| Self::rank(owned, live(c), l),
                );
                for log in &dropped {
                    self.forget(log);
                    if log.expires >= now {
                        self.evicted += 1;
                    }
                }
            }
        }
        if !self.logs.contains_key(channel) {
            if let Some(o) = origin {
                *self.owned.entry(o.clone()).or_default() += 1;
            }
            self.logs.insert(channel.clone(), fresh(origin));
        }
        self.logs.get_mut(channel).expect("inserted above")
    }

    /// Stores a message, giving it the channel's next offset. The store keeps its own copy
    /// (sharing the payload and frame) so that the v1 envelope encoded for live delivery is
    /// not kept for as long as the history.
    pub fn append(
        &mut self,
        channel: Channel,
        kind: Kind,
        data: Bytes,
        now: Instant,
        origin: Option<&Origin>,
        live: &dyn Fn(&str) -> bool,
    ) -> Arc<Delivery> {
        let limits = self.limits;
        let log = self.log(&channel, now, origin, live);
        log.top += 1;
        log.expires = now + limits.ttl;
        let position = Position {
            offset: log.top,
            epoch: log.epoch.clone(),
        };
        let d = Delivery::new(channel, kind, data, Some(position));
        let stored = d.stored_copy();
        let added = entry_bytes(&stored);
        log.ring.push_back(stored);
        log.bytes += added;
        let (mut freed, mut trimmed_for_bytes) = (0, 0);
        while log.ring.len() > limits.size || log.bytes > limits.channel_bytes {
            let over_count = log.ring.len() > limits.size;
            let Some(old) = log.ring.pop_front() else { break };
            let b = entry_bytes(&old);
            log.bytes -= b;
            freed += b;
            if !over_count {
                trimmed_for_bytes += 1;
            }
        }
        self.bytes = self.bytes + added - freed;
        self.evicted += trimmed_for_bytes;
        if self.bytes > limits.max_bytes {
            self.shed(live);
        }
        d
    }

    /// Drops the oldest messages of channels in eviction order (see [`HistoryStore`]) until
    /// the store is a sixteenth under its byte cap: the scan is paid once per sixteenth of the
    /// cap.
    fn shed(&mut self, live: &dyn Fn(&str) -> bool) {
        let target = self.limits.max_bytes - self.limits.max_bytes / 16;
        let mut order: Vec<(_, Channel)> = self
            .logs
            .iter()
            .filter(|(_, l)| !l.ring.is_empty())
            .map(|(c, l)| (Self::rank(&self.owned, live(c), l), c.clone()))
            .collect();
        order.sort_unstable_by_key(|a| a.0);
        for (_, channel) in order {
            let Some(log) = self.logs.get_mut(&channel) else {
                continue;
            };
            while self.bytes > target {
                let Some(old) = log.ring.pop_front() else { break };
                let b = entry_bytes(&old);
                log.bytes -= b;
                self.bytes -= b;
                self.evicted += 1;
            }
            if self.bytes <= target {
                return;
            }
        }
    }

    /// The channel's position and, with `since`, its stored messages after that offset.
    /// A read can create the channel's history (fixing its epoch): `origin` is its creator.
    pub fn read(
        &mut self,
        channel: &Channel,
        since: Option<u64>,
        now: Instant,
        origin: Option<&Origin>,
    ) -> History {
        let log = self.log(channel, now, origin, &|_| true);
        let entries = match since {
            None => Vec::new(),
            Some(since) => log
                .ring
                .iter()
                .filter(|d| d.position.as_ref().is_some_and(|p| p.offset > since))
                .take(crate::recovery::PAGE_ENTRIES)
                .cloned()
                .collect(),
        };
        crate::recovery::page(History {
            epoch: log.epoch.clone(),
            top: log.top,
            entries,
        })
    }

    /// The channel's position and its newest `n` stored messages (oldest of them first), at
    /// most one page (`recovery::PAGE_ENTRIES`, `recovery::PAGE_BYTES`).
    pub fn newest(&mut self, channel: &Channel, n: usize, now: Instant, origin: Option<&Origin>) -> History {
        let log = self.log(channel, now, origin, &|_| true);
        let n = n.min(crate::recovery::PAGE_ENTRIES);
        let skip = log.ring.len().saturating_sub(n);
        let entries = log.ring.iter().skip(skip).cloned().collect();
        crate::recovery::page_newest(History {
            epoch: log.epoch.clone(),
            top: log.top,
            entries,
        })
    }

    /// Forgets expired channels (their memory is released).
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<Channel> = self
            .logs
            .iter()
            .filter(|(_, l)| l.expires < now)
            .map(|(c, _)| c.clone())
            .collect();
        for c in expired {
            if let Some(log) = self.logs.remove(&c) {
                self.forget(&log);
            }
        }
    }

    /// Channels with a history in memory.
    pub fn len(&self) -> usize {
        self.logs.len()
    }

    /// True when no channel has history.
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    /// Bytes of all stored messages (by frame and [`ENTRY_OVERHEAD`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What a stored session costs, by names and [`SESSION_OVERHEAD`].
fn session_bytes(id: &str, state: &SessionState) -> usize {
    SESSION_OVERHEAD
        + id.len()
        + state.subject.as_ref().map_or(0, String::len)
        + state
            .channels
            .iter()
            .map(|(c, _, e)| c.len() + e.as_ref().map_or(0, |e| e.len()) + SESSION_CHANNEL_OVERHEAD)
            .sum::<usize>()
}

/// Sessions with a time to live, capped in number and in bytes.
#[derive(Debug)]
pub struct SessionStore {
    ttl: Duration,
    max: usize,
    max_bytes: usize,
    per_subject: usize,
    bytes: usize,
    sessions: HashMap<Arc<str>, (SessionState, Instant, usize)>,
    /// Each subject's session ids, oldest first (some may be gone already; at most
    /// `per_subject + 1` each).
    by_subject: HashMap<String, VecDeque<Arc<str>>>,
    /// How many stored sessions name each channel: the history of such a channel is what an
    /// offline client waits to recover, and goes after every other (see [`HistoryStore`]).
    /// One entry per distinct channel named, so it is bounded with the sessions' bytes.
    named: HashMap<Channel, u32>,
    /// Sessions dropped early to stay under the caps.
    pub evicted: u64,
}

impl SessionStore {
    /// Sessions live `ttl` after their last save; at most `max` are kept, and at most
    /// `max_bytes` by `session_bytes` (past either, those closest to expiry go first).
    pub fn new(ttl: Duration, max: usize, max_bytes: usize) -> Self {
        SessionStore {
            ttl,
            max: max.max(1),
            max_bytes,
            per_subject: usize::MAX,
            bytes: 0,
            sessions: HashMap::new(),
            by_subject: HashMap::new(),
            named: HashMap::new(),
            evicted: 0,
        }
    }

    /// Whether a stored session names `channel`.
    pub fn names(&self, channel: &str) -> bool {
        self.named.contains_key(channel)
    }

    /// Counts the channels of a session stored (`add`) or gone.
    fn count_names(named: &mut HashMap<Channel, u32>, state: &SessionState, add: bool) {
        for (channel, _, _) in &state.channels {
            if add {
                *named.entry(channel.clone()).or_default() += 1;
            } else if let Some(n) = named.get_mut(channel) {
                *n -= 1;
                if *n == 0 {
                    named.remove(channel);
                }
            }
        }
    }

    /// Keeps at most `n` sessions per token subject: past it, the subject's oldest session
    /// goes (so one user reconnecting without end cannot fill the store).
    pub fn per_subject(mut self, n: usize) -> Self {
        self.per_subject = n.max(1);
        self
    }

    /// The stored session, unless absent or expired.
    pub fn load(&self, id: &str, now: Instant) -> Option<SessionState> {
        self.sessions
            .get(id)
            .filter(|(_, expires, _)| now <= *expires)
            .map(|(s, _, _)| s.clone())
    }

    /// Replaces the session and restarts its time to live. A channel whose position is not
    /// known (no epoch) keeps the position stored for it, if any: [`SessionStore::record`]
    /// may have stored it first.
    pub fn save(&mut self, id: Arc<str>, mut state: SessionState, now: Instant) {
        if let Some((old, _, _)) = self.sessions.get(&id) {
            for (channel, offset, epoch) in state.channels.iter_mut().filter(|c| c.2.is_none()) {
                if let Some((_, o, e)) = old.channels.iter().find(|c| c.0 == *channel) {
                    (*offset, *epoch) = (*o, e.clone());
                }
            }
        }
        self.put(id, state, now);
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
        let state = match self.sessions.get(&id) {
            Some((state, _, _)) => {
                let mut state = state.clone();
                match state.channels.iter_mut().find(|c| c.0 == entry.0) {
                    Some(c) => *c = entry,
                    None => state.channels.push(entry),
                }
                state
            }
            None => SessionState {
                subject,
                channels: vec![entry],
            },
        };
        self.put(id, state, now);
    }

    /// Inserts or replaces, keeping both caps.
    fn put(&mut self, id: Arc<str>, state: SessionState, now: Instant) {
        let size = session_bytes(&id, &state);
        let new = match self.sessions.remove(&id) {
            Some((old_state, _, old)) => {
                self.bytes -= old;
                Self::count_names(&mut self.named, &old_state, false);
                false
            }
            None => true,
        };
        if let (true, Some(subject)) = (new, state.subject.clone()) {
            self.one_more_of(subject, id.clone());
        }
        while !self.sessions.is_empty()
            && (self.sessions.len() >= self.max || self.bytes + size > self.max_bytes)
        {
            let cap = self.sessions.len().min(self.max);
            let dropped = make_room(&mut self.sessions, cap, now, |(_, t, _)| *t, |_, (_, t, _)| *t);
            for (gone, expires, b) in &dropped {
                self.bytes -= b;
                Self::count_names(&mut self.named, gone, false);
                if *expires >= now {
                    self.evicted += 1;
                }
            }
        }
        self.bytes += size;
        Self::count_names(&mut self.named, &state, true);
        self.sessions.insert(id, (state, now + self.ttl, size));
    }

    /// Counts a new session of `subject`, dropping the subject's oldest past the cap.
    fn one_more_of(&mut self, subject: String, id: Arc<str>) {
        let ids = self.by_subject.entry(subject).or_default();
        ids.push_back(id);
        while ids.len() > self.per_subject {
            let Some(old) = ids.pop_front() else { break };
            if let Some((gone, _, b)) = self.sessions.remove(&old) {
                self.bytes -= b;
                Self::count_names(&mut self.named, &gone, false);
                self.evicted += 1;
            }
        }
    }

    /// Forgets expired sessions.
    pub fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        let named = &mut self.named;
        self.sessions.retain(|_, (state, expires, b)| {
            let keep = *expires >= now;
            if !keep {
                freed += *b;
                Self::count_names(named, state, false);
            }
            keep
        });
        self.bytes -= freed;
        let sessions = &self.sessions;
        self.by_subject.retain(|_, ids| {
            ids.retain(|id| sessions.contains_key(id));
            !ids.is_empty()
        });
    }

    /// Bytes of all stored sessions, by `session_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Arc::from(s)
    }

    fn limits(size: usize, ttl: Duration, max_channels: usize) -> HistoryLimits {
        HistoryLimits {
            size,
            ttl,
            max_channels,
            max_bytes: usize::MAX,
            channel_bytes: usize::MAX,
        }
    }

    fn nobody(_: &str) -> bool {
        false
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
        let mut h = HistoryStore::new(limits(3, Duration::from_secs(60), 100));
        let c = ch("c");
        for i in 1..=5u64 {
            let d = h.append(
                c.clone(),
                Kind::Text,
                Bytes::from(i.to_string()),
                t,
                None,
                &nobody,
            );
            assert_eq!(d.position.as_ref().unwrap().offset, i);
        }
        let all = h.read(&c, Some(0), t, None);
        assert_eq!(all.top, 5);
        assert_eq!(offsets(&all), vec![3, 4, 5]);
        assert_eq!(offsets(&h.read(&c, Some(4), t, None)), vec![5]);
        assert!(h.read(&c, None, t, None).entries.is_empty());
        // Another channel has its own offsets.
        let d = h.append(ch("other"), Kind::Text, Bytes::new(), t, None, &nobody);
        assert_eq!(d.position.as_ref().unwrap().offset, 1);
    }

    #[test]
    fn expiry_starts_a_new_epoch() {
        let t = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut h = HistoryStore::new(limits(10, ttl, 100));
        let c = ch("c");
        let first = h
            .append(c.clone(), Kind::Text, Bytes::new(), t, None, &nobody)
            .position
            .clone()
            .unwrap();
        assert_eq!(
            h.read(&c, None, t + ttl, None).epoch,
            first.epoch,
            "still alive at the boundary"
        );
        let later = h.read(&c, Some(0), t + ttl + Duration::from_secs(1), None);
        assert_ne!(later.epoch, first.epoch);
        assert_eq!(later.top, 0);
        assert!(later.entries.is_empty());
        h.expire(t + ttl * 5);
        assert!(h.is_empty());
    }

    #[test]
    fn reading_an_unknown_channel_fixes_its_epoch() {
        let t = Instant::now();
        let mut h = HistoryStore::new(limits(10, Duration::from_secs(10), 100));
        let c = ch("c");
        let before = h.read(&c, None, t, None);
        assert_eq!(before.top, 0);
        let d = h.append(c, Kind::Text, Bytes::new(), t, None, &nobody);
        assert_eq!(d.position.as_ref().unwrap().epoch, before.epoch);
    }

    #[test]
    fn channel_and_session_counts_are_capped() {
        let t = Instant::now();
        let mut h = HistoryStore::new(limits(10, Duration::from_secs(60), 32));
        for i in 0..1000u64 {
            h.append(
                ch(&i.to_string()),
                Kind::Text,
                Bytes::new(),
                t + Duration::from_millis(i),
                None,
                &nobody,
            );
        }
        assert!(h.len() <= 32, "{} channels kept", h.len());
        assert!(h.evicted >= 1000 - 32);
        // The most recently published survive.
        assert_eq!(
            h.read(&ch("999"), Some(0), t + Duration::from_secs(1), None).top,
            1
        );
        let mut s = SessionStore::new(Duration::from_secs(60), 16, usize::MAX);
        for i in 0..100u64 {
            s.save(
                Arc::from(i.to_string()),
                SessionState::default(),
                t + Duration::from_millis(i),
            );
        }
        assert!(s.sessions.len() <= 16);
        assert!(s.evicted >= 100 - 16);
        assert!(s.load("99", t + Duration::from_secs(1)).is_some());
        assert!(s.load("0", t + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn a_recorded_position_survives_a_save_that_does_not_know_it() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(5), 100, usize::MAX);
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
        let mut s = SessionStore::new(Duration::from_secs(5), 100, usize::MAX);
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

    #[test]
    fn the_channels_stored_sessions_name_are_counted_while_they_are_stored() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(5), 2, usize::MAX);
        let of = |names: &[&str]| SessionState {
            subject: None,
            channels: names.iter().map(|n| (ch(n), 0, None)).collect(),
        };
        s.save(Arc::from("x"), of(&["a", "b"]), t);
        s.save(Arc::from("y"), of(&["b"]), t);
        assert!(s.names("a") && s.names("b") && !s.names("c"));
        // Replaced: "a" is no longer named.
        s.save(Arc::from("x"), of(&["b", "c"]), t);
        assert!(!s.names("a") && s.names("b") && s.names("c"));
        // Evicted past the cap of 2 sessions, then expired.
        s.save(Arc::from("z"), of(&["d"]), t + Duration::from_secs(1));
        assert!(s.names("d"));
        s.expire(t + Duration::from_secs(10));
        assert!(!s.names("b") && !s.names("c") && !s.names("d"));
        assert!(s.named.is_empty());
    }

    #[test]
    fn history_is_capped_in_bytes_per_channel_and_overall() {
        let t = Instant::now();
        let entry = |n: usize| n + ENTRY_OVERHEAD + 4; // frame (payload + header)
        let mut h = HistoryStore::new(HistoryLimits {
            size: 1000,
            ttl: Duration::from_secs(60),
            max_channels: 100,
            max_bytes: 40 * entry(1000),
            channel_bytes: 10 * entry(1000),
        });
        let c = ch("big");
        for _ in 0..30 {
            h.append(
                c.clone(),
                Kind::Binary,
                Bytes::from(vec![0; 1000]),
                t,
                None,
                &nobody,
            );
        }
        // Per channel: the newest ten fit.
        let kept = h.read(&c, Some(0), t, None);
        assert_eq!(kept.top, 30);
        assert_eq!(offsets(&kept), (21..=30).collect::<Vec<_>>());
        assert!(h.bytes() <= 10 * entry(1000));
        assert_eq!(h.evicted, 20);
        // Overall: past the cap, the store sheds a sixteenth below it.
        for i in 0..10 {
            for _ in 0..10 {
                h.append(
                    ch(&format!("c{i}")),
                    Kind::Binary,
                    Bytes::from(vec![0; 1000]),
                    t,
                    None,
                    &nobody,
                );
            }
        }
        assert!(h.bytes() <= 40 * entry(1000), "{} bytes", h.bytes());
    }

    #[test]
    fn a_flood_of_new_channels_does_not_push_out_channels_people_are_on() {
        let t = Instant::now();
        let mut h = HistoryStore::new(HistoryLimits {
            size: 100,
            ttl: Duration::from_secs(60),
            max_channels: 64,
            max_bytes: 64 * 1024,
            channel_bytes: usize::MAX,
        });
        let watched = ch("watched");
        let live = |c: &str| c == "watched";
        for _ in 0..5 {
            h.append(
                watched.clone(),
                Kind::Text,
                Bytes::from_static(b"keep me"),
                t,
                None,
                &live,
            );
        }
        // One client publishes to thousands of channels nobody is on, later than the
        // watched channel's last publish.
        for i in 0..5000u64 {
            let now = t + Duration::from_millis(i + 1);
            h.append(
                ch(&format!("junk{i}")),
                Kind::Text,
                Bytes::from(vec![b'x'; 100]),
                now,
                None,
                &live,
            );
        }
        let kept = h.read(&watched, Some(0), t + Duration::from_secs(6), None);
        assert_eq!(
            offsets(&kept),
            vec![1, 2, 3, 4, 5],
            "the watched channel's history survived"
        );
        assert!(h.len() <= 64 && h.bytes() <= 64 * 1024);
    }

    #[test]
    fn stored_messages_do_not_keep_the_live_envelope() {
        let t = Instant::now();
        let mut h = HistoryStore::new(limits(10, Duration::from_secs(60), 10));
        let live = h.append(
            ch("c"),
            Kind::Text,
            Bytes::from("\u{1}".repeat(100)),
            t,
            None,
            &nobody,
        );
        let _ = live.envelope_frame();
        let stored = h.read(&ch("c"), Some(0), t, None);
        assert!(!Arc::ptr_eq(&live, &stored.entries[0]));
        assert_eq!(stored.entries[0].data, live.data);
    }

    #[test]
    fn sessions_are_capped_in_bytes() {
        let t = Instant::now();
        let state = |n: usize| SessionState {
            subject: None,
            channels: (0..n).map(|i| (ch(&format!("{i:0>200}")), 0, None)).collect(),
        };
        let one = session_bytes("id-000", &state(128));
        let mut s = SessionStore::new(Duration::from_secs(60), 1_000_000, 10 * one);
        for i in 0..100u64 {
            s.save(
                Arc::from(format!("id-{i:03}")),
                state(128),
                t + Duration::from_millis(i),
            );
        }
        assert!(s.bytes() <= 10 * one, "{} bytes", s.bytes());
        assert!(s.load("id-099", t).is_some());
        assert!(s.load("id-000", t).is_none());
        assert!(s.evicted >= 90);
        s.expire(t + Duration::from_secs(120));
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn a_flood_from_one_origin_evicts_its_own_channels_first() {
        let t = Instant::now();
        let mut h = HistoryStore::new(limits(100, Duration::from_secs(600), 64));
        let alice: Origin = Arc::from("ip:10.0.0.1");
        let flooder: Origin = Arc::from("ip:10.0.0.66");
        // Nobody is on Alice's channel right now: its client is offline, waiting to recover.
        h.append(
            ch("alice-room"),
            Kind::Text,
            Bytes::from_static(b"hi"),
            t,
            Some(&alice),
            &nobody,
        );
        for i in 0..10_000u64 {
            let now = t + Duration::from_millis(i + 1);
            h.append(
                ch(&format!("junk{i}")),
                Kind::Text,
                Bytes::new(),
                now,
                Some(&flooder),
                &nobody,
            );
        }
        let kept = h.read(&ch("alice-room"), Some(0), t + Duration::from_secs(11), None);
        assert_eq!(offsets(&kept), vec![1], "the flooder's channels went first");
        assert!(h.len() <= 64);
        assert!(h.evicted >= 10_000 - 64);
    }

    #[test]
    fn each_subject_keeps_its_newest_sessions_only() {
        let t = Instant::now();
        let mut s = SessionStore::new(Duration::from_secs(60), 1000, usize::MAX).per_subject(3);
        let of = |who: &str| SessionState {
            subject: Some(who.into()),
            channels: vec![],
        };
        for i in 0..5 {
            s.save(Arc::from(format!("m{i}")), of("mallory"), t);
        }
        s.save(Arc::from("a0"), of("alice"), t);
        // Saving an existing session again does not count as a new one.
        s.save(Arc::from("m4"), of("mallory"), t);
        let kept: Vec<bool> = (0..5).map(|i| s.load(&format!("m{i}"), t).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert!(s.load("a0", t).is_some());
        assert_eq!(s.evicted, 2);
        s.expire(t + Duration::from_secs(120));
        assert!(s.by_subject.is_empty());
    }
}
