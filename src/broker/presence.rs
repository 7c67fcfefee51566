//! Presence entries held by one broker, per channel: the whole of presence in-process, and, with
//! Redis, this node's own entries (the ones it refreshes, and re-creates if Redis lost them). A
//! pure data structure: no I/O, no clock.
//!
//! Bounded: at most `max` entries per channel (`--presence-max`), each at most
//! `--presence-entry-size` bytes (checked by the loop before it asks), so a channel holds at
//! most `max` × entry size; the number of channels is bounded by the subscriptions the loops
//! hold (`--max-channels-per-conn` per connection).

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
    /// The channel holds `max` entries: not listed.
    Full,
}

/// Channel → client id → entry (JSON, `presence::encode`), in the order clients joined.
#[derive(Debug, Default)]
pub struct PresenceTable {
    channels: HashMap<Channel, IndexMap<Arc<str>, Arc<str>>>,
    entries: usize,
}

impl PresenceTable {
    /// Lists `client` on `channel` with `entry`, unless the channel holds `max` entries.
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
            return Added::Full;
        }
        clients.insert(client, entry);
        self.entries += 1;
        Added::New
    }

    /// Takes `client` off `channel`; its entry if it was listed.
    pub fn remove(&mut self, channel: &str, client: &str) -> Option<Arc<str>> {
        let clients = self.channels.get_mut(channel)?;
        let entry = clients.shift_remove(client)?;
        self.entries -= 1;
        if clients.is_empty() {
            self.channels.remove(channel);
        }
        Some(entry)
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
        // A full refusal on an empty channel (max 0) leaves nothing behind.
        assert_eq!(t.add(&c, a("x"), a(r#"{"client":"x"}"#), 0), Added::Full);
        assert_eq!(t.channels().count(), 0);
    }
}
