//! Presence entries held by one broker, per channel: the whole of presence in-process, and, with
//! Redis, this node's own entries (the ones it refreshes, and re-creates if Redis lost them). A
//! pure data structure: no I/O, no clock.
//!
//! Bounded: at most `max` entries listed per channel (`--presence-max`), each at most
//! `--presence-entry-size` bytes (checked by the loop before it asks), so a channel lists at
//! most `max` × entry size. Subscribers past the bound wait, in the order they came, for room
//! to free; waiting entries are as many as the loops' subscriptions on channels with presence
//! (`--max-channels-per-conn` per connection), each at most the entry size.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

use crate::bridge::{Channel, PresenceAnswer};

/// What adding an entry did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// A new entry: a `join` event is due where the channel has them.
    New,
    /// The client was listed already (its entry is replaced).
    Existing,
    /// The channel holds `max` entries: not listed; it waits for room (see
    /// [`PresenceTable::promote`]).
    Full,
}

/// Channel → client id → entry (JSON, `presence::encode`), in the order clients joined; and
/// the subscribers past the bound, waiting to be listed.
#[derive(Debug, Default)]
pub struct PresenceTable {
    channels: HashMap<Channel, IndexMap<Arc<str>, Arc<str>>>,
    entries: usize,
    waiting: HashMap<Channel, IndexMap<Arc<str>, Arc<str>>>,
}

impl PresenceTable {
    /// Lists `client` on `channel` with `entry`, unless the channel holds `max` entries: then
    /// the entry waits for room.
    pub fn add(&mut self, channel: &Channel, client: Arc<str>, entry: Arc<str>, max: usize) -> Added {
        let clients = self.channels.entry(channel.clone()).or_default();
        if let Some(e) = clients.get_mut(&client) {
            *e = entry;
            return Added::Existing;
        }
        if clients.len() >= max {
            if clients.is_empty() {
                self.channels.remove(channel);
            }
            self.waiting
                .entry(channel.clone())
                .or_default()
                .insert(client, entry);
            return Added::Full;
        }
        if let Some(waiting) = self.waiting.get_mut(&**channel) {
            waiting.shift_remove(&client);
            if waiting.is_empty() {
                self.waiting.remove(&**channel);
            }
        }
        clients.insert(client, entry);
        self.entries += 1;
        Added::New
    }

    /// Takes `client` off `channel`, listed or waiting; its entry if it was listed.
    pub fn remove(&mut self, channel: &str, client: &str) -> Option<Arc<str>> {
        if let Some(waiting) = self.waiting.get_mut(channel) {
            if waiting.shift_remove(client).is_some() {
                if waiting.is_empty() {
                    self.waiting.remove(channel);
                }
                return None;
            }
        }
        let clients = self.channels.get_mut(channel)?;
        let entry = clients.shift_remove(client)?;
        self.entries -= 1;
        if clients.is_empty() {
            self.channels.remove(channel);
        }
        Some(entry)
    }

    /// Lists the subscriber of `channel` that has waited longest, if the channel has room for
    /// it under `max`: its client id and entry (a `join` is due).
    pub fn promote(&mut self, channel: &Channel, max: usize) -> Option<(Arc<str>, Arc<str>)> {
        if self.channels.get(channel).map_or(0, IndexMap::len) >= max {
            return None;
        }
        let (client, entry) = self.take_waiting(channel)?;
        self.list(channel, client.clone(), entry.clone());
        Some((client, entry))
    }

    /// Lists a waiting subscriber that an outside store (Redis) took: it is this table's to
    /// refresh from now on. False if it is not waiting (it left meanwhile).
    pub fn listed_elsewhere(&mut self, channel: &Channel, client: &str) -> bool {
        let Some(waiting) = self.waiting.get_mut(channel) else {
            return false;
        };
        let Some(entry) = waiting.shift_remove(client) else {
            return false;
        };
        if waiting.is_empty() {
            self.waiting.remove(channel);
        }
        self.list(channel, Arc::from(client), entry);
        true
    }

    /// Puts a listed subscriber that an outside store (Redis) refused for a full channel
    /// back among the waiting ones.
    pub fn refused_elsewhere(&mut self, channel: &Channel, client: &str) {
        if let Some(entry) = self.remove(channel, client) {
            self.waiting
                .entry(channel.clone())
                .or_default()
                .insert(Arc::from(client), entry);
        }
    }

    /// Every channel with subscribers waiting for room.
    pub fn waiting_channels(&self) -> impl Iterator<Item = &Channel> {
        self.waiting.keys()
    }

    /// The subscribers of `channel` waiting for room (client id → entry), longest waiting
    /// first, if it has any.
    pub fn waiting_on(&self, channel: &str) -> Option<&IndexMap<Arc<str>, Arc<str>>> {
        self.waiting.get(channel)
    }

    fn take_waiting(&mut self, channel: &Channel) -> Option<(Arc<str>, Arc<str>)> {
        let waiting = self.waiting.get_mut(channel)?;
        let first = waiting.shift_remove_index(0);
        if waiting.is_empty() {
            self.waiting.remove(channel);
        }
        first
    }

    fn list(&mut self, channel: &Channel, client: Arc<str>, entry: Arc<str>) {
        if self
            .channels
            .entry(channel.clone())
            .or_default()
            .insert(client, entry)
            .is_none()
        {
            self.entries += 1;
        }
    }

    /// The entries of `channel` (everything for a `presence` read, counts only for `stats`).
    pub fn read(&self, channel: &str, stats: bool) -> PresenceAnswer {
        let Some(clients) = self.channels.get(channel) else {
            return PresenceAnswer::default();
        };
        let users: std::collections::HashSet<String> = clients
            .values()
            .filter_map(|e| crate::presence::user_key(e))
            .collect();
        PresenceAnswer {
            clients: clients.len() as u64,
            users: users.len() as u64,
            entries: if stats {
                Vec::new()
            } else {
                clients.values().map(|e| Box::from(&**e)).collect()
            },
        }
    }

    /// Every channel with its (client, entry) pairs.
    pub fn channels(&self) -> impl Iterator<Item = (&Channel, &IndexMap<Arc<str>, Arc<str>>)> {
        self.channels.iter()
    }

    /// Entries held, over all channels.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True when nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Subscribers waiting for room, over all channels.
    pub fn waiting_len(&self) -> usize {
        self.waiting.values().map(IndexMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn entries_are_bounded_per_channel_and_counted_by_user() {
        let mut t = PresenceTable::default();
        let c = a("room");
        let e1 = a(r#"{"client":"n-0-1","user":"u1"}"#);
        let e2 = a(r#"{"client":"n-0-2","user":"u1"}"#);
        let e3 = a(r#"{"client":"n-0-3"}"#);
        assert_eq!(t.add(&c, a("n-0-1"), e1.clone(), 2), Added::New);
        assert_eq!(t.add(&c, a("n-0-1"), e1.clone(), 2), Added::Existing);
        assert_eq!(t.add(&c, a("n-0-2"), e2, 2), Added::New);
        assert_eq!(t.add(&c, a("n-0-3"), e3.clone(), 2), Added::Full);
        let r = t.read("room", false);
        assert_eq!((r.clients, r.users, r.entries.len()), (2, 1, 2));
        assert_eq!(t.read("room", true).entries.len(), 0);
        assert_eq!(t.remove("room", "n-0-1").as_deref(), Some(&*e1));
        assert_eq!(t.remove("room", "n-0-1"), None);
        assert_eq!(t.add(&c, a("n-0-3"), e3, 2), Added::New);
        assert_eq!(t.read("room", true).users, 2);
        assert_eq!(t.len(), 2);
        t.remove("room", "n-0-2");
        t.remove("room", "n-0-3");
        assert!(t.is_empty());
        assert_eq!(t.channels().count(), 0);
        // A full refusal on an empty channel (max 0) lists nothing; it waits.
        assert_eq!(t.add(&c, a("x"), a(r#"{"client":"x"}"#), 0), Added::Full);
        assert_eq!(t.channels().count(), 0);
        assert_eq!(t.remove("room", "x"), None);
        assert_eq!(t.waiting_len(), 0);
    }

    #[test]
    fn subscribers_past_the_bound_wait_for_room_in_order() {
        let mut t = PresenceTable::default();
        let c = a("room");
        for i in 1..=4 {
            let added = t.add(&c, a(&format!("n-0-{i}")), a(&format!("e{i}")), 2);
            assert_eq!(added, if i <= 2 { Added::New } else { Added::Full });
        }
        assert_eq!((t.len(), t.waiting_len()), (2, 2));
        assert_eq!(t.promote(&c, 2), None, "no room yet");
        // A waiting subscriber that leaves waits no more, and was never listed.
        assert_eq!(t.remove("room", "n-0-4"), None);
        assert_eq!(t.remove("room", "n-0-1").as_deref(), Some("e1"));
        assert_eq!(t.promote(&c, 2), Some((a("n-0-3"), a("e3"))));
        assert_eq!(t.promote(&c, 2), None);
        assert_eq!((t.len(), t.waiting_len()), (2, 0));
        assert_eq!(t.read("room", false).entries.len(), 2);
        // Another store's answers: refused goes back to waiting, taken is listed.
        t.refused_elsewhere(&c, "n-0-3");
        assert_eq!((t.len(), t.waiting_len()), (1, 1));
        assert_eq!(t.waiting_on("room").map(IndexMap::len), Some(1));
        assert!(t.listed_elsewhere(&c, "n-0-3"));
        assert!(!t.listed_elsewhere(&c, "n-0-3"));
        assert_eq!((t.len(), t.waiting_len()), (2, 0));
    }
}
