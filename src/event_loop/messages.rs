//! What clients send: reading WebSocket frames off an open connection, publishing raw frames,
//! and carrying out `wsrelay.v1` commands. Errors in a client's input never reach other
//! clients: a bad frame closes that connection with the matching close code, a bad v1 command
//! gets an error reply and the connection stays usable.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use log::{debug, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message};

use super::{EventLoop, interrupted, would_block};
use crate::bridge::{Channel, Publish, PublishAck};
use crate::conn::{Io, Pending, Phase, Protocol, ReadEnd, Stage, Sub, SubState, Unpublished};
use crate::envelope::{self, Command, Refusal};
use crate::frame::{self, Kind};
use crate::metrics::{add, inc};

/// Why a client may not publish right now.
enum Denied {
    /// Outside its token's grant.
    Forbidden,
    /// Over `--publish-rate`.
    RateLimited,
}

/// Why a publish was not queued.
pub(super) enum Refused {
    /// The publish queue is full.
    QueueFull,
}

impl EventLoop {
    /// Reads WebSocket frames until WouldBlock or the read budget is spent, then acts on the
    /// messages. A raw connection is not read until its channel's subscription is live, so a
    /// client's first message cannot overtake its own subscription; no connection is read
    /// while its session is being restored.
    pub(super) fn read_frames(&mut self, key: usize, now: Instant) {
        if !self.may_read(key) {
            return;
        }
        let (mut read, end, nothing_queued) = self.read_messages(key, now);
        add(&self.metrics().messages_in, read.len() as u64);
        let mut messages = read.drain(..);
        while let Some((kind, data)) = messages.next() {
            if !self.on_message(key, kind, data, now) {
                if !self.keep_unpublished(key, &mut messages) {
                    return;
                }
                // Paused: the rest of the input stays in the socket (and in pending_input)
                // until the publish queue has room; a peer that closed or failed is handled
                // now, as below.
                break;
            }
        }
        // Anything left after a pause went to `keep_unpublished`: the buffer is empty again,
        // and the next read fills it without allocating.
        drop(messages);
        self.read_buf = read;
        self.read_ended(key, end, nothing_queued, now);
    }

    /// Whether the connection may be read now; if not, it is read once it may. A raw
    /// connection waits for its subscription (with a session, for the position it joins at,
    /// so that its session stores it before the client can do anything); any connection waits
    /// for its stored session, and for room in the publish queue.
    fn may_read(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        let Phase::Open(open) = &mut conn.phase else {
            return false;
        };
        let waiting = matches!(open.stage, Stage::Resuming { .. })
            || (open.protocol == Protocol::Raw
                && !open
                    .subs
                    .iter()
                    .all(|s| self.index.is_online(&s.channel) && matches!(s.state, SubState::Live)))
            || conn.unpublished.is_some();
        conn.read_pending = waiting;
        !waiting
    }

    /// Reads frames until WouldBlock or the read budget is spent: the messages, how the read
    /// ended, and whether nothing was queued to the client before it.
    fn read_messages(&mut self, key: usize, now: Instant) -> (Vec<(Kind, Bytes)>, ReadEnd, bool) {
        let budget = self.shared.config.read_budget;
        let conn = &mut self.conns[key];
        let Phase::Open(open) = &mut conn.phase else {
            return (Vec::new(), ReadEnd::Drained, false);
        };
        if let Some(saved) = conn.pending_input.take() {
            self.ahead.load(&saved);
        }
        // Nothing queued before this read: if the peer now closes, everything it was sent
        // has been written; whether it arrived, the kernel tells (see `save_session`).
        let nothing_queued = conn.out.is_empty();
        let mut io = Io {
            sock: &mut conn.sock,
            out: &mut conn.out,
            ahead: Some(&mut self.ahead),
            got_input: false,
        };
        let mut messages = std::mem::take(&mut self.read_buf);
        let end = loop {
            if messages.len() == budget {
                break ReadEnd::BudgetSpent;
            }
            match open.ctx.read(&mut io) {
                Ok(Message::Text(t)) => messages.push((Kind::Text, Bytes::from(t))),
                Ok(Message::Binary(b)) => messages.push((Kind::Binary, b)),
                // tungstenite queued the reply to our Io; flush it there and finish closing.
                Ok(Message::Close(_)) => {
                    let _ = open.ctx.flush(&mut io);
                    break ReadEnd::PeerClosed;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(WsError::Io(e)) if would_block(&e) => break ReadEnd::Drained,
                Err(WsError::Io(e)) if interrupted(&e) => {}
                Err(e) => break ReadEnd::Failed(e),
            }
        };
        if io.got_input {
            conn.last_seen = now;
        }
        // Keep what this connection did not consume; the buffer is shared by the next one.
        if matches!(end, ReadEnd::BudgetSpent) {
            conn.pending_input = Some(self.ahead.unread().into());
        }
        self.ahead.clear();
        if !conn.out.is_empty() {
            // Replies tungstenite queued (pongs, a close) are judged with the rest after the
            // flush: a client that pings without reading must not grow the server.
            self.mark_dirty(key);
        }
        (messages, end, nothing_queued)
    }

    /// What follows a read: another one next turn (budget spent), the close handshake, or
    /// the error's close.
    fn read_ended(&mut self, key: usize, end: ReadEnd, nothing_queued: bool, now: Instant) {
        let paused = self.conns[key].unpublished.is_some();
        if matches!(end, ReadEnd::PeerClosed | ReadEnd::Failed(_)) {
            if let Some(waiting) = self.conns[key].unpublished.as_mut() {
                // What was read before the end waits for room in the publish queue: the end
                // is acted on once it is all published (`resume_paused`).
                waiting.ended = Some(end);
                return;
            }
        }
        if self.conns[key].hung_up && !paused && !matches!(end, ReadEnd::BudgetSpent) {
            // Everything its peer sent before it went away was read and acted on: nothing
            // more can come (after a reset the kernel answers an end, never WouldBlock).
            return self.kill(key);
        }
        match end {
            ReadEnd::Drained => {}
            ReadEnd::BudgetSpent if paused => {}
            ReadEnd::BudgetSpent => {
                self.conns[key].read_pending = true;
                self.read_backlog.push(key);
            }
            ReadEnd::PeerClosed => {
                // A clean close: what the client's TCP acknowledged before it, it has.
                let conn = &mut self.conns[key];
                if nothing_queued && !conn.hung_up && crate::conn::unacknowledged(&conn.sock) == Some(0) {
                    if let Some(open) = conn.open_mut() {
                        open.subs.iter_mut().for_each(|s| s.delivered_all());
                    }
                }
                self.enter_closing(key, now)
            }
            ReadEnd::Failed(e) => self.read_failed(key, e, now),
        }
    }

    /// Acts on one client message. False when the connection was closed because of it.
    fn on_message(&mut self, key: usize, kind: Kind, data: Bytes, now: Instant) -> bool {
        let Some(open) = self.conns[key].open_mut() else {
            return false;
        };
        match open.protocol {
            Protocol::Raw => {
                let channel = open.subs[0].channel.clone();
                if let Err(denied) = self.may_publish_now(key, &channel, now) {
                    let reason = match denied {
                        Denied::Forbidden => "forbidden",
                        Denied::RateLimited => "rate limited",
                    };
                    self.close(key, CloseCode::Policy, reason, now);
                    return false;
                }
                match self.publish(key, channel, kind, data.clone(), None) {
                    Ok(()) => true,
                    Err(Refused::QueueFull) => {
                        self.pause(key, kind, data);
                        false
                    }
                }
            }
            Protocol::V1 => {
                if kind == Kind::Binary {
                    self.send_error(
                        key,
                        None,
                        &Refusal::new("bad_json", "commands are JSON text frames"),
                    );
                    return true;
                }
                let parsed = envelope::parse(&data);
                let awaiting_connect = matches!(open.stage, Stage::AwaitingConnect { .. });
                match parsed.command {
                    Ok(Command::Connect { token }) if awaiting_connect => {
                        self.connect(key, &token, parsed.reference, now)
                    }
                    Ok(_) | Err(_) if awaiting_connect => {
                        inc(&self.metrics().forbidden);
                        let refusal = Refusal::new("unauthorized", "send connect with a token first");
                        self.send_error(key, parsed.reference.as_deref(), &refusal);
                        self.close(key, CloseCode::Policy, "unauthorized", now);
                        false
                    }
                    Ok(cmd) => match self.command(key, cmd, parsed.reference, now) {
                        Ok(()) => true,
                        Err(Refused::QueueFull) => {
                            // Carried out again, from the frame, once there is room.
                            self.pause(key, kind, data);
                            false
                        }
                    },
                    Err(refusal) => {
                        self.send_error(key, parsed.reference.as_deref(), &refusal);
                        true
                    }
                }
            }
        }
    }

    /// The `connect` command of a v1 connection that came without `?token=`.
    fn connect(&mut self, key: usize, token: &str, reference: Option<Box<str>>, now: Instant) -> bool {
        let verified = match &self.shared.verifier {
            Some(v) => v.verify(token, super::handshake::unix_now()),
            None => return true,
        };
        let resume = match self.conns[key].open_mut().map(|o| &o.stage) {
            Some(Stage::AwaitingConnect { resume: true, .. }) => Some(None),
            _ => None,
        };
        match verified {
            Ok(identity) => {
                self.authenticated(key, Some(identity), reference, resume, now);
                true
            }
            Err(e) => {
                self.metrics()
                    .handshake_failed(crate::metrics::HandshakeFailure::Unauthorized);
                let refusal = Refusal::new("unauthorized", e.to_string());
                self.send_error(key, reference.as_deref(), &refusal);
                self.close(key, CloseCode::Policy, "unauthorized", now);
                false
            }
        }
    }

    /// Carries out one `wsrelay.v1` command. A publish that finds the publish queue full
    /// is handed back (`Refused::QueueFull`) to be carried out again once there is room.
    fn command(
        &mut self,
        key: usize,
        cmd: Command,
        reference: Option<Box<str>>,
        now: Instant,
    ) -> Result<(), Refused> {
        let r = reference.as_deref();
        match cmd {
            Command::Publish { channel, kind, data } => {
                return self.publish_command(key, &channel, kind, data, reference, now);
            }
            Command::Subscribe {
                channel,
                recover,
                info,
            } => self.subscribe_command(key, &channel, recover, info.as_deref(), reference, now),
            Command::Unsubscribe { channel } => self.unsubscribe_command(key, &channel, r),
            Command::Ping => self.send_json(key, &envelope::pong(r)),
            Command::History {
                channel,
                limit,
                since,
            } => self.history_command(key, &channel, limit, since, reference),
            Command::Presence { channel, stats } => self.presence_command(key, &channel, stats, reference),
            Command::Refresh { token } => self.refresh_command(key, &token, r, now),
            Command::Connect { .. } => {
                let refusal = Refusal::new("bad_request", "already connected");
                self.send_error(key, r, &refusal);
            }
        }
        Ok(())
    }

    /// The v1 `refresh` command: a new token for the same subject replaces the connection's
    /// token, its grants and its expiry; subscriptions the new grants do not allow end
    /// (`unsubscribed`, reason `forbidden`). A bad token changes nothing.
    fn refresh_command(&mut self, key: usize, token: &str, r: Option<&str>, _now: Instant) {
        let Some(verifier) = &self.shared.verifier else {
            let refusal = Refusal::new("bad_request", "tokens are off (no --token-secret)");
            return self.send_error(key, r, &refusal);
        };
        let identity = match verifier.verify(token, super::handshake::unix_now()) {
            Ok(i) => i,
            Err(e) => return self.send_error(key, r, &Refusal::new("unauthorized", e.to_string())),
        };
        let leeway = self.shared.config.token_leeway;
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        if open.subject() != Some(identity.subject.as_str()) {
            let refusal = Refusal::new("forbidden", "the new token is for another subject");
            return self.send_error(key, r, &refusal);
        }
        let expires = identity.expires_at;
        open.token = Some(Box::new(super::handshake::token_state(identity, leeway)));
        self.send_json(key, &envelope::refreshed(r, expires));
        loop {
            let Some(open) = self.conns[key].open_mut() else {
                return;
            };
            let Some(i) = open.subs.iter().position(|s| !open.may_subscribe(&s.channel)) else {
                return;
            };
            inc(&self.metrics().forbidden);
            self.end_sub_because(key, i, "forbidden", "the new token does not grant it");
        }
    }

    /// Why connection `key` may not subscribe to `channel`, if it may not.
    fn may_subscribe(&self, key: usize, channel: &Channel) -> Option<Refusal> {
        let max = self.shared.config.max_channels_per_conn;
        let Phase::Open(open) = &self.conns[key].phase else {
            return Some(Refusal::new("bad_request", "not open"));
        };
        if !open.may_subscribe(channel) {
            inc(&self.metrics().forbidden);
            Some(Refusal::new(
                "forbidden",
                format!("the token does not grant subscribing to {channel:?}"),
            ))
        } else if open.subs.iter().any(|s| s.channel == *channel) {
            Some(Refusal::new(
                "already_subscribed",
                format!("already subscribed to {channel:?}"),
            ))
        } else if open.subs.len() >= max {
            Some(Refusal::new(
                "too_many_channels",
                format!("at most {max} channels per connection"),
            ))
        } else {
            None
        }
    }

    /// The v1 `subscribe` command: the subscription waits for its channel to be live, then
    /// for its position (and replay, with `recover`), and is announced with `subscribed`.
    fn subscribe_command(
        &mut self,
        key: usize,
        channel: &str,
        recover: Option<(u64, String)>,
        info: Option<&str>,
        reference: Option<Box<str>>,
        now: Instant,
    ) {
        let channel = match self.channel_name(channel) {
            Ok(c) => c,
            Err(refusal) => return self.send_error(key, reference.as_deref(), &refusal),
        };
        if let Some(refusal) = self.may_subscribe(key, &channel) {
            return self.send_error(key, reference.as_deref(), &refusal);
        }
        let presence = match self.presence_entry(key, &channel, info) {
            Ok(p) => p,
            Err(refusal) => return self.send_error(key, reference.as_deref(), &refusal),
        };
        let recovering = recover.is_some();
        let (offset, epoch) = recover.map_or((0, None), |(o, e)| (o, Some(Arc::from(e))));
        let pending = Pending {
            reference,
            recover: recovering,
            announce: true,
            ..Pending::default()
        };
        if let Some(entry) = presence {
            self.listing.pending.insert((key, channel.clone()), entry);
        }
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        open.add_sub(Sub::awaiting(channel.clone(), offset, epoch, pending));
        if recovering {
            inc(&self.metrics().recoveries);
        }
        self.session_changed.push(key);
        self.join(key, &channel, now);
    }

    /// The v1 `unsubscribe` command. A subscribe not answered yet still gets its one reply
    /// (`cancelled`), before this one's.
    fn unsubscribe_command(&mut self, key: usize, channel: &str, r: Option<&str>) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let Some(i) = open.subs.iter().position(|s| *s.channel == *channel) else {
            let refusal = Refusal::new("not_subscribed", format!("not subscribed to {channel:?}"));
            return self.send_error(key, r, &refusal);
        };
        let mut sub = open.subs.swap_remove(i);
        let pending = match std::mem::replace(&mut sub.state, SubState::Live) {
            SubState::AwaitingHistory { pending, held } => {
                open.release_held(held.iter().map(|d| d.data.len()).sum());
                Some(pending)
            }
            SubState::AwaitingLive(pending) => Some(pending),
            SubState::Live => None,
        };
        self.end_sub(key, sub);
        self.session_changed.push(key);
        if let Some(Pending {
            reference: Some(subscribe_ref),
            announce: true,
            ..
        }) = pending
        {
            let refusal = Refusal::new("cancelled", "unsubscribed before the subscription took effect");
            self.send_error(key, Some(&subscribe_ref), &refusal);
        }
        self.send_json(key, &envelope::unsubscribed(r, channel));
    }

    /// The v1 `publish` command. The queue's room is checked first, so a publish that must
    /// wait does not use up its rate limit.
    fn publish_command(
        &mut self,
        key: usize,
        channel: &str,
        kind: Kind,
        data: Bytes,
        reference: Option<Box<str>>,
        now: Instant,
    ) -> Result<(), Refused> {
        let r = reference.as_deref();
        let channel = match self.channel_name(channel) {
            Ok(c) => c,
            Err(refusal) => {
                self.send_error(key, r, &refusal);
                return Ok(());
            }
        };
        if self.link.publish_full(data.len()) {
            return Err(Refused::QueueFull);
        }
        if let Err(denied) = self.may_publish_now(key, &channel, now) {
            let refusal = match denied {
                Denied::Forbidden => Refusal::new(
                    "forbidden",
                    format!("the token does not grant publishing to {channel:?}"),
                ),
                Denied::RateLimited => Refusal::new("rate_limited", "over --publish-rate; slow down"),
            };
            self.send_error(key, r, &refusal);
            return Ok(());
        }
        let Some(to) = self.reply_to(key) else {
            return Ok(());
        };
        let ack = PublishAck { to, reference };
        self.publish(key, channel, kind, data, Some(ack))
    }

    /// Whether connection `key` may publish on `channel` now: its token's grant first (so a
    /// refused publish does not use up the rate), then its rate. Refusals are counted here.
    fn may_publish_now(&mut self, key: usize, channel: &str, now: Instant) -> Result<(), Denied> {
        let m = &self.shared.metrics.loops[self.id];
        let Some(open) = self.conns[key].open_mut() else {
            return Err(Denied::Forbidden);
        };
        if !open.may_publish(channel) {
            inc(&m.forbidden);
            return Err(Denied::Forbidden);
        }
        if !open.bucket.as_mut().is_none_or(|b| b.try_take(now)) {
            inc(&m.rate_limited);
            return Err(Denied::RateLimited);
        }
        Ok(())
    }

    /// Validates a channel name from a command.
    pub(super) fn channel_name(&self, name: &str) -> Result<Channel, Refusal> {
        crate::channels::check_name(name, self.shared.config.max_channel_len)
            .map_err(|why| Refusal::new("bad_channel", why))?;
        Ok(self.index.intern(name))
    }

    /// Hands a message to the broker without blocking.
    pub(super) fn publish(
        &mut self,
        key: usize,
        channel: Channel,
        kind: Kind,
        data: Bytes,
        ack: Option<PublishAck>,
    ) -> Result<(), Refused> {
        let p = Publish {
            origin: self.origin(key),
            channel,
            kind,
            data,
            ack,
            seq: 0,
        };
        match self.link.publish(p) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(_)) => Err(Refused::QueueFull),
            // Shutting down: the message has nowhere to go.
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Ok(()),
        }
    }

    /// Who connection `key` is, for fair shares of bounded stores (see `bridge::Origin`).
    /// Only the in-process broker's stores use it: with Redis, none (it is not made for every
    /// publish for nothing).
    pub(super) fn origin(&self, key: usize) -> Option<crate::bridge::Origin> {
        let config = &self.shared.config;
        if config.redis.is_some() || config.redis_cluster.is_some() {
            return None;
        }
        let conn = self.conns.get(key)?;
        let subject = match &conn.phase {
            Phase::Open(open) => open.session.as_ref().and_then(|s| s.subject.as_deref()),
            Phase::Api { .. } | Phase::Request(_) => return Some(Arc::from("api")),
            Phase::Closing { .. } => None,
        };
        Some(Arc::from(match (subject, conn.peer.ip()) {
            (Some(s), _) => format!("sub:{s}"),
            (None, std::net::IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            (None, ip) => format!("ip:{ip}"),
        }))
    }

    /// Keeps a message that found the publish queue full, first in line, and stops reading
    /// from the connection until the loop has published it (see `resume_paused`): the
    /// sender's TCP window fills and it slows down. Nothing read is dropped.
    fn pause(&mut self, key: usize, kind: Kind, data: Bytes) {
        let conn = &mut self.conns[key];
        conn.read_pending = true;
        match &mut conn.unpublished {
            Some(waiting) => waiting.messages.push_front((kind, data)),
            None => {
                conn.unpublished = Some(Box::new(Unpublished {
                    messages: VecDeque::from([(kind, data)]),
                    ended: None,
                }));
                self.paused.push_back(key);
                inc(&self.metrics().publish_paused);
                if self.log_limit.allow() {
                    warn!(
                        "publish queue full: pausing reads from publishing connections (raise --publish-queue, or Redis is slow)"
                    );
                }
            }
        }
    }

    /// After a message of the connection paused it (`on_message` returned false): keeps the
    /// messages read after it. False when the connection was closed instead.
    fn keep_unpublished(&mut self, key: usize, rest: impl Iterator<Item = (Kind, Bytes)>) -> bool {
        match self.conns.get_mut(key).and_then(|c| c.unpublished.as_mut()) {
            Some(waiting) => {
                waiting.messages.extend(rest);
                true
            }
            None => false,
        }
    }

    /// A paused connection stops being open (the server closes it: a slow consumer, an
    /// expired token, a backend's disconnect, a shutdown; or drops it) while it holds
    /// messages it read but could not publish yet: they are still published, after the grant
    /// and rate checks they would have had, without acknowledgement (nothing is left to
    /// answer). Nothing read is dropped. What the connection sent and was not read is dropped
    /// with it.
    pub(super) fn orphan_unpublished(&mut self, key: usize, now: Instant) {
        let Some(waiting) = self.conns[key].unpublished.take() else {
            return;
        };
        for (kind, data) in waiting.messages {
            let Some(open) = self.conns[key].open_mut() else {
                return;
            };
            let (channel, kind, data) = match open.protocol {
                Protocol::Raw => match open.subs.first() {
                    Some(sub) => (sub.channel.clone(), kind, data),
                    None => return,
                },
                Protocol::V1 => match envelope::parse(&data).command {
                    Ok(Command::Publish { channel, kind, data }) => match self.channel_name(&channel) {
                        Ok(channel) => (channel, kind, data),
                        Err(_) => continue,
                    },
                    // Other commands have no effect on a connection that is gone.
                    _ => continue,
                },
            };
            if self.may_publish_now(key, &channel, now).is_err() {
                continue;
            }
            self.orphans.push_back(Publish {
                origin: self.origin(key),
                channel,
                kind,
                data,
                ack: None,
                seq: 0,
            });
        }
    }

    /// Publishes what closed connections left (`orphan_unpublished`), then what paused
    /// connections kept, oldest pause first, while the queue has room; a connection whose
    /// messages all went out is read again. Runs every turn while any are waiting (the poll
    /// timeout is then 1 ms). A paused connection counts as active: it is not closed as idle.
    pub(super) fn resume_paused(&mut self, now: Instant) {
        while let Some(p) = self.orphans.pop_front() {
            match self.link.publish(p) {
                Ok(()) => {}
                Err(crossbeam_channel::TrySendError::Full(p)) => {
                    self.orphans.push_front(p);
                    return;
                }
                // Shutting down: the message has nowhere to go.
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => {}
            }
        }
        while let Some(&key) = self.paused.front() {
            let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) else {
                self.paused.pop_front();
                continue;
            };
            let Some(mut waiting) = conn.unpublished.take() else {
                self.paused.pop_front();
                continue;
            };
            conn.last_seen = now;
            let size = waiting.messages.front().map_or(0, |(_, d)| d.len());
            if self.link.publish_full(size) {
                self.conns[key].unpublished = Some(waiting);
                return;
            }
            self.paused.pop_front();
            while let Some((kind, data)) = waiting.messages.pop_front() {
                if !self.on_message(key, kind, data, now) {
                    if self.keep_unpublished(key, waiting.messages.drain(..)) {
                        // Paused again (it is at the back of the line now): the queue is
                        // full. How the input ended stays with the messages.
                        let again = self.conns[key].unpublished.as_mut();
                        again.expect("kept").ended = waiting.ended.take();
                        return;
                    }
                    break;
                }
            }
            if let Some(end) = waiting.ended.take() {
                // Everything read is published: now the end it was read with.
                if self.conns.get(key).is_some_and(|c| !c.dead) {
                    self.read_ended(key, end, false, now);
                }
                continue;
            }
            if self.conns.get(key).is_some_and(|c| c.read_pending && !c.dead) {
                self.read(key, now);
            }
        }
    }

    /// Queues a JSON text frame to a v1 connection.
    pub(super) fn send_json(&mut self, key: usize, json: &str) {
        let conn = &mut self.conns[key];
        if conn.dead || conn.hung_up || !matches!(conn.phase, Phase::Open(_)) {
            return;
        }
        conn.out.push_shared(&frame::text(json));
        self.mark_dirty(key);
    }

    /// Queues an error reply.
    pub(super) fn send_error(&mut self, key: usize, reference: Option<&str>, refusal: &Refusal) {
        debug!("{}: {} ({})", self.conns[key].peer, refusal.code, refusal.message);
        self.send_json(key, &envelope::error(reference, refusal.code, &refusal.message));
    }

    /// Maps a tungstenite read error to the connection's fate.
    fn read_failed(&mut self, key: usize, e: WsError, now: Instant) {
        use tungstenite::error::ProtocolError as P;
        let m = &self.shared.metrics.loops[self.id];
        let peer = self.conns[key].peer;
        match e {
            WsError::Capacity(e) => {
                inc(&m.oversize);
                debug!("{peer}: {e}; closing with 1009");
                self.close(key, CloseCode::Size, "message too big", now);
            }
            WsError::Utf8(_) => {
                inc(&m.protocol_errors);
                self.close(key, CloseCode::Invalid, "invalid utf-8", now);
            }
            WsError::Protocol(P::ResetWithoutClosingHandshake)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed => self.kill(key),
            WsError::Protocol(p) => {
                inc(&m.protocol_errors);
                debug!("{peer}: protocol error: {p}; closing with 1002");
                self.close(key, CloseCode::Protocol, "protocol error", now);
            }
            e => {
                debug!("{peer}: {e}; dropping");
                self.kill(key);
            }
        }
    }
}
