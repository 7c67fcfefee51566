//! The loop's side of presence and of what the server API asks of every node: listing a
//! subscription in its channel's presence once it is live and taking it out when it ends,
//! answering `presence` and `presence_stats`, passing `join` and `leave` events to the live
//! `wsrelay.v1` subscriptions of their channel, and carrying out server API commands
//! (disconnect a user, end a user's subscription). Everything here is opt-in: with no
//! `--presence`/`--join-leave` pattern and no `--api-key`, none of it runs, and the delivery
//! path (`fanout.rs`) never sees events.
//!
//! Subscriptions carry nothing of it (a subscription costs the same with presence off): the
//! loop keeps, beside them, a [`Listing`]: the entries of subscriptions that will be listed
//! once live and which are listed; the broker keeps this node's entries, refreshes them and
//! takes them out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;

use super::EventLoop;
use crate::bridge::{Admin, Channel, Event, NodeWork, PresenceAnswer};
use crate::conn::{Phase, Protocol, Sub, SubState};
use crate::envelope::{self, Refusal};
use crate::metrics::add;

/// How often a loop tells the broker its channels' member counts, when they changed and the
/// server API is on (`GET /api/channels` is at most about this much behind).
pub(super) const CHANNELS_EVERY: Duration = Duration::from_secs(1);

/// What the loop knows of presence: which subscriptions wait to be listed and which are, and
/// when it last reported its channels.
pub(super) struct Listing {
    /// Entries of subscriptions listed once they are live (channels with presence), by
    /// connection and channel.
    pub(super) pending: std::collections::HashMap<(usize, Channel), Arc<str>>,
    /// Subscriptions listed in presence (to be taken out when they end).
    listed: std::collections::HashSet<(usize, Channel)>,
    /// `index.changes()` when the loop last reported its channels (server API on).
    channels_sent: u64,
    /// When the loop may report its channels again.
    next_channels: Instant,
}

impl Listing {
    pub(super) fn new(now: Instant) -> Self {
        Listing {
            pending: Default::default(),
            listed: Default::default(),
            channels_sent: 0,
            next_channels: now,
        }
    }
}

impl EventLoop {
    /// The id presence and the welcome give connection `key`: this node's id, the loop and
    /// the connection's serial, unique across all nodes and over time.
    pub(super) fn client_id(&self, key: usize) -> Arc<str> {
        let serial = self.conns.get(key).map_or(0, |c| c.serial);
        Arc::from(format!("{}-{}-{serial}", self.shared.node, self.id))
    }

    /// The presence entry of connection `key` on `channel` with `info` (JSON text), if the
    /// channel has presence. Refused when it is over `--presence-entry-size`.
    pub(super) fn presence_entry(
        &self,
        key: usize,
        channel: &str,
        info: Option<&str>,
    ) -> Result<Option<Arc<str>>, Refusal> {
        let cfg = &self.shared.config;
        if !cfg.presence_on(channel) {
            return Ok(None);
        }
        let subject = match &self.conns[key].phase {
            Phase::Open(open) => open.subject().map(str::to_owned),
            _ => None,
        };
        let entry = crate::presence::encode(&self.client_id(key), subject.as_deref(), info);
        if entry.len() > cfg.presence_entry_size {
            return Err(Refusal::new(
                "bad_request",
                format!(
                    "the presence entry (client, user and info) is {} bytes, over --presence-entry-size {}",
                    entry.len(),
                    cfg.presence_entry_size
                ),
            ));
        }
        Ok(Some(Arc::from(entry)))
    }

    /// A subscription just went live: it enters its channel's presence (once), with the entry
    /// its subscribe prepared.
    pub(super) fn list_present(&mut self, key: usize, channel: &Channel) {
        if self.listing.pending.is_empty() {
            return;
        }
        let Some(entry) = self.listing.pending.remove(&(key, channel.clone())) else {
            return;
        };
        if !self.listing.listed.insert((key, channel.clone())) {
            return;
        }
        let client = self.client_id(key);
        self.link.presence(NodeWork::Join {
            channel: channel.clone(),
            client,
            entry,
        });
    }

    /// A subscription ended: it leaves the loop's channel index and, if it was listed, its
    /// channel's presence.
    pub(super) fn end_sub(&mut self, key: usize, sub: Sub) {
        self.unlist(key, &sub.channel);
        self.leave(key, sub.channel);
    }

    /// Takes connection `key`'s subscription to `channel` out of presence, if it was listed
    /// (or about to be).
    pub(super) fn unlist(&mut self, key: usize, channel: &Channel) {
        if self.listing.listed.is_empty() && self.listing.pending.is_empty() {
            return;
        }
        let at = (key, channel.clone());
        self.listing.pending.remove(&at);
        if self.listing.listed.remove(&at) {
            let client = self.client_id(key);
            self.link.presence(NodeWork::Leave {
                channel: channel.clone(),
                client,
            });
        }
    }

    /// The server ends subscription `i` of connection `key` (`forbidden`: its grant no longer
    /// allows it; `server`: the server API asked): a v1 client is told (`unsubscribed` with
    /// `reason`; a subscribe not answered yet gets its one reply instead, the error
    /// `forbidden` or `cancelled`), and the session forgets it.
    pub(super) fn end_sub_because(&mut self, key: usize, i: usize, reason: &'static str, why: &str) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let sub = open.subs.swap_remove(i);
        let channel = sub.channel.clone();
        let unanswered = match &sub.state {
            SubState::AwaitingHistory { pending, held } => {
                open.release_held(held.iter().map(|d| d.data.len()).sum());
                pending.announce.then(|| pending.reference.clone()).flatten()
            }
            SubState::AwaitingLive(pending) => pending.announce.then(|| pending.reference.clone()).flatten(),
            SubState::Live => None,
        };
        self.end_sub(key, sub);
        self.session_changed.push(key);
        match unanswered {
            Some(r) => {
                let code = if reason == "forbidden" {
                    "forbidden"
                } else {
                    "cancelled"
                };
                let refusal = Refusal::new(code, format!("{why}: subscription to {channel:?} ended"));
                self.send_error(key, Some(&r), &refusal);
            }
            None => self.send_json(key, &envelope::unsubscribed_because(&channel, reason)),
        }
    }

    /// The v1 `presence` and `presence_stats` commands: anyone the token lets subscribe to the
    /// channel may ask, subscribed or not.
    pub(super) fn presence_command(
        &mut self,
        key: usize,
        channel: &str,
        stats: bool,
        reference: Option<Box<str>>,
    ) {
        let r = reference.as_deref();
        let channel = match self.channel_name(channel) {
            Ok(c) => c,
            Err(refusal) => return self.send_error(key, r, &refusal),
        };
        if let Err(refusal) = self.may_look(key, &channel) {
            return self.send_error(key, r, &refusal);
        }
        if !self.shared.config.presence_on(&channel) {
            let refusal = Refusal::new(
                "not_enabled",
                format!("{channel:?} has no presence (see --presence)"),
            );
            return self.send_error(key, r, &refusal);
        }
        let Some(to) = self.reply_to(key) else { return };
        let ask = NodeWork::Presence {
            channel,
            stats,
            reference,
            to,
        };
        if let Err(NodeWork::Presence { reference, .. }) = self.link.ask_nodes(ask) {
            let refusal = Refusal::new("unavailable", "presence queue full; try again");
            self.send_error(key, reference.as_deref(), &refusal);
        }
    }

    /// Whether connection `key` may look at `channel`'s presence or history: whoever its token
    /// lets subscribe to it (a server API request may read anything).
    pub(super) fn may_look(&self, key: usize, channel: &str) -> Result<(), Refusal> {
        match &self.conns[key].phase {
            Phase::Open(open) if !open.may_subscribe(channel) => {
                crate::metrics::inc(&self.metrics().forbidden);
                Err(Refusal::new(
                    "forbidden",
                    format!("the token does not grant subscribing to {channel:?}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The broker's answer to a `presence` or `presence_stats` command (v1, or the server
    /// API's `GET /api/presence`).
    pub(super) fn on_presence(
        &mut self,
        key: usize,
        channel: &str,
        stats: bool,
        reference: Option<&str>,
        result: Result<PresenceAnswer, String>,
        now: Instant,
    ) {
        let json = match result {
            Ok(p) if stats => Ok(envelope::presence_stats(reference, channel, p.clients, p.users)),
            Ok(p) => Ok(envelope::presence(reference, channel, &p.entries)),
            Err(e) => {
                debug!("presence of {channel:?} unavailable: {e}");
                Err(format!("presence could not be read: {e}"))
            }
        };
        if self.api_reply_json(
            key,
            json.as_ref().map(String::as_str).map_err(String::as_str),
            now,
        ) {
            return;
        }
        match json {
            Ok(j) => self.send_json(key, &j),
            Err(e) => self.send_error(key, reference, &Refusal::new("unavailable", e)),
        }
    }

    /// A `join` or `leave` event: to every live v1 subscription of its channel here (raw
    /// clients and subscriptions not answered yet do not get it).
    pub(super) fn on_event(&mut self, event: &Event) {
        let Some(members) = self.index.members(&event.channel) else {
            return;
        };
        let mut sent = 0;
        for &key in members {
            let conn = &mut self.conns[key];
            let Phase::Open(open) = &conn.phase else {
                continue;
            };
            let live = open.protocol == Protocol::V1
                && open
                    .subs
                    .iter()
                    .any(|s| s.channel == event.channel && matches!(s.state, SubState::Live));
            if live {
                conn.out.push_shared(&event.frame);
                self.turn.mark_dirty(key, conn);
                sent += 1;
            }
        }
        add(&self.shared.metrics.loops[self.id].deliveries, sent);
    }

    /// A server API command, on every node: every connection of the user (its token subject)
    /// is closed, or loses its subscription to the channel (a raw connection, which has only
    /// that one, is closed).
    pub(super) fn on_admin(&mut self, admin: &Admin, now: Instant) {
        let user = match admin {
            Admin::Disconnect { user, .. } | Admin::Unsubscribe { user, .. } => user.as_str(),
        };
        let theirs: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.dead)
            .filter_map(|(key, c)| match &c.phase {
                Phase::Open(open) if open.subject() == Some(user) => Some(key),
                _ => None,
            })
            .collect();
        for key in theirs {
            match admin {
                Admin::Disconnect { code, reason, .. } => {
                    self.close_with(key, CloseCode::from(*code), reason.clone(), now);
                }
                Admin::Unsubscribe { channel, .. } => {
                    let Some(open) = self.conns[key].open_mut() else {
                        continue;
                    };
                    let Some(i) = open.subs.iter().position(|s| *s.channel == **channel) else {
                        continue;
                    };
                    if open.protocol == Protocol::Raw {
                        self.close(key, CloseCode::Policy, "unsubscribed", now);
                    } else {
                        self.end_sub_because(key, i, "server", "the server API unsubscribed the user");
                    }
                }
            }
        }
    }

    /// With the server API on, tells the broker this loop's channels and member counts when
    /// they changed, at most every [`CHANNELS_EVERY`].
    pub(super) fn report_channels(&mut self, now: Instant) {
        if self.shared.config.api_key.is_none()
            || now < self.listing.next_channels
            || self.index.changes() == self.listing.channels_sent
        {
            return;
        }
        let msg = NodeWork::LoopChannels {
            loop_id: self.id,
            channels: self.index.counts(),
        };
        if self.link.ask_nodes(msg).is_ok() {
            self.listing.channels_sent = self.index.changes();
            self.listing.next_channels = now + CHANNELS_EVERY;
        }
    }
}
