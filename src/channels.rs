//! One loop's channel index: which of its connections are on which channel, and whether the
//! broker has confirmed the loop's subscription to that channel. A pure data structure with no
//! I/O, owned by exactly one loop thread, so fan-out needs no locks.
//!
//! A channel enters the index with its first local member and leaves with its last; the caller
//! turns those two transitions into Subscribe/Unsubscribe requests to the broker. Each upstream
//! subscription gets a generation number so that a confirmation for an older subscription (one
//! already unsubscribed) is not mistaken for the current one.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;

/// A channel name as shared between loops, broker and connections.
pub type Channel = Arc<str>;

/// The Redis Pub/Sub channel (after `--redis-prefix`) that carries server API commands to
/// every node. No client channel may have this name: see [`check_name`].
pub const CONTROL: &str = "wsrelay:control";

/// Why `name` cannot be a channel, if it cannot: empty, longer than `max` bytes, or the
/// name reserved for the nodes' control channel ([`CONTROL`]).
pub fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!("channel names are 1 to {max} bytes"));
    }
    if name == CONTROL {
        return Err(format!("{CONTROL:?} is reserved for the nodes"));
    }
    Ok(())
}

/// Connections on one channel, in a set with O(1) insert and remove and contiguous iteration.
pub type Members = IndexSet<usize, std::hash::BuildHasherDefault<KeyHasher>>;

/// Result of adding a connection to a channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// First local member: the caller must subscribe upstream with this generation.
    First(u64),
    /// The channel already exists here; `live` says whether its subscription is confirmed.
    Existing {
        /// Whether the broker has confirmed the subscription.
        live: bool,
    },
}

#[derive(Debug)]
struct Entry {
    members: Members,
    generation: u64,
    live: bool,
    /// Live, but confirmed while the Redis subscriber connection was down (see
    /// `ToLoop::Live`): not in effect upstream until that connection is back.
    offline: bool,
}

/// Channel name → local members, with the upstream subscription state per channel.
#[derive(Debug, Default)]
pub struct ChannelIndex {
    map: HashMap<Channel, Entry>,
    next_generation: u64,
    /// Joins and leaves so far: a reader of [`ChannelIndex::counts`] can tell whether they
    /// changed since it last looked.
    changes: u64,
}

impl ChannelIndex {
    /// Adds connection `key` to `channel`.
    pub fn join(&mut self, channel: &Channel, key: usize) -> Joined {
        self.changes += 1;
        if let Some(e) = self.map.get_mut(channel) {
            e.members.insert(key);
            return Joined::Existing { live: e.live };
        }
        self.next_generation += 1;
        let mut members = Members::default();
        members.insert(key);
        self.map.insert(
            channel.clone(),
            Entry {
                members,
                generation: self.next_generation,
                live: false,
                offline: false,
            },
        );
        Joined::First(self.next_generation)
    }

    /// Removes connection `key` from `channel`. True when it was the last member: the channel
    /// is gone from the index and the caller must unsubscribe upstream.
    pub fn leave(&mut self, channel: &str, key: usize) -> bool {
        let Some(e) = self.map.get_mut(channel) else {
            return false;
        };
        self.changes += 1;
        e.members.swap_remove(&key);
        if e.members.is_empty() {
            self.map.remove(channel);
            return true;
        }
        false
    }

    /// Marks the subscription of `generation` live. Returns the members (to resume anything
    /// that waited for it), or `None` when the confirmation is stale or the channel is gone.
    pub fn set_live(&mut self, channel: &str, generation: u64, offline: bool) -> Option<&Members> {
        let e = self.map.get_mut(channel)?;
        if e.generation != generation || e.live {
            return None;
        }
        e.live = true;
        e.offline = offline;
        Some(&e.members)
    }

    /// A channel confirmed offline is now subscribed upstream (the subscriber connection is
    /// back): its members, if it was offline.
    pub fn set_online(&mut self, channel: &str) -> Option<&Members> {
        let e = self.map.get_mut(channel)?;
        if !std::mem::replace(&mut e.offline, false) {
            return None;
        }
        Some(&e.members)
    }

    /// The shared name of `channel` if some local connection is on it (so a thousand members
    /// share one allocation), else a new one.
    pub fn intern(&self, channel: &str) -> Channel {
        match self.map.get_key_value(channel) {
            Some((k, _)) => k.clone(),
            None => Arc::from(channel),
        }
    }

    /// Members of `channel`, for fan-out.
    pub fn members(&self, channel: &str) -> Option<&Members> {
        self.map.get(channel).map(|e| &e.members)
    }

    /// Whether `channel`'s upstream subscription is confirmed.
    pub fn is_live(&self, channel: &str) -> bool {
        self.map.get(channel).is_some_and(|e| e.live)
    }

    /// Whether `channel` is live and in effect upstream (not only confirmed offline).
    pub fn is_online(&self, channel: &str) -> bool {
        self.map.get(channel).is_some_and(|e| e.live && !e.offline)
    }

    /// Every channel with its number of members.
    pub fn counts(&self) -> Vec<(Channel, u32)> {
        self.map
            .iter()
            .map(|(c, e)| (c.clone(), u32::try_from(e.members.len()).unwrap_or(u32::MAX)))
            .collect()
    }

    /// How many joins and leaves there have been: unchanged means [`ChannelIndex::counts`]
    /// is too.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Number of channels with at least one local member.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no channel has local members.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Hasher for connection keys: they are small distinct integers chosen by the slab, not by
/// clients, so a multiplicative hash is enough and cheaper than SipHash.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Arc::from(s)
    }

    #[test]
    fn first_join_subscribes_and_last_leave_unsubscribes() {
        let mut idx = ChannelIndex::default();
        let a = ch("a");
        let Joined::First(g) = idx.join(&a, 1) else {
            panic!()
        };
        assert_eq!(idx.join(&a, 2), Joined::Existing { live: false });
        assert_eq!(idx.counts(), vec![(a.clone(), 2)]);
        let before = idx.changes();
        assert!(!idx.leave("a", 1));
        assert_ne!(idx.changes(), before);
        assert!(idx.leave("a", 2));
        assert!(idx.is_empty());
        // Leaving a channel that is not there is harmless.
        assert!(!idx.leave("a", 2));
        assert!(idx.set_live("a", g, false).is_none());
    }

    #[test]
    fn live_confirmation_of_an_old_generation_is_ignored() {
        let mut idx = ChannelIndex::default();
        let a = ch("a");
        let Joined::First(g1) = idx.join(&a, 1) else {
            panic!()
        };
        assert!(idx.leave("a", 1));
        let Joined::First(g2) = idx.join(&a, 1) else {
            panic!()
        };
        assert_ne!(g1, g2);
        assert!(idx.set_live("a", g1, false).is_none());
        assert!(!idx.is_live("a"));
        assert_eq!(idx.set_live("a", g2, false).unwrap().len(), 1);
        assert!(idx.is_live("a"));
        assert_eq!(idx.join(&a, 5), Joined::Existing { live: true });
        assert!(Arc::ptr_eq(&idx.intern("a"), &a));
        assert_eq!(&*idx.intern("new"), "new");
    }

    #[test]
    fn members_are_exact_after_many_joins_and_leaves() {
        let mut idx = ChannelIndex::default();
        let a = ch("a");
        for k in 0..1000 {
            idx.join(&a, k);
        }
        for k in (0..1000).step_by(2) {
            idx.leave("a", k);
        }
        let mut m: Vec<usize> = idx.members("a").unwrap().iter().copied().collect();
        m.sort_unstable();
        assert_eq!(m, (1..1000).step_by(2).collect::<Vec<_>>());
    }
}
