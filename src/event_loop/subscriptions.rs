//! Joining and leaving channels, recovery and sessions: the loop's side of the broker's
//! request/response work.
//!
//! A subscription goes `AwaitingLive` → `AwaitingHistory` → `Live`. It waits until the loop's
//! upstream subscription to its channel is confirmed, so that nothing published from then on
//! can be missed; then it reads the channel's position (and, when recovering, the messages
//! after its offset) while holding live deliveries; then it sends the replay and the held
//! deliveries with offsets above the last one sent. That is the gapless switch from history to
//! live: every message is either in the history read or arrives live afterwards, and
//! duplicates are dropped by offset.

use std::sync::Arc;
use std::time::Instant;

use log::debug;

use super::EventLoop;
use crate::bridge::{
    Channel, ConnId, Delivery, History, Position, Reply, ReplyTo, Request, SessionRecord, SessionState,
};
use crate::channels::Joined;
use crate::conn::{Pending, Phase, Protocol, Stage, SubState};
use crate::envelope::{self, Refusal};
use crate::fanout::{self, Verdict};
use crate::metrics::{add, dec, inc};
use crate::recovery::{self, Settled};

impl EventLoop {
    /// Where the broker should answer connection `key`.
    pub(super) fn reply_to(&self, key: usize) -> Option<ReplyTo> {
        let conn = self.conns.get(key)?;
        Some(ReplyTo {
            loop_id: self.id,
            conn: ConnId {
                key,
                serial: conn.serial,
            },
        })
    }

    /// Adds the connection to `channel` in the loop's index (subscribing upstream on the
    /// channel's first local member) and starts its subscription if the channel is live.
    pub(super) fn join(&mut self, key: usize, channel: &Channel, _now: Instant) {
        match self.index.join(channel, key) {
            Joined::First(generation) => self.link.subscription(crate::bridge::Control::Subscribe {
                channel: channel.clone(),
                loop_id: self.id,
                generation,
            }),
            Joined::Existing { live: true } => self.activate(key, channel),
            Joined::Existing { live: false } => {}
        }
    }

    /// Removes the connection from `channel`, unsubscribing upstream after the last member.
    pub(super) fn leave(&mut self, key: usize, channel: Channel) {
        if self.index.leave(&channel, key) {
            self.link.subscription(crate::bridge::Control::Unsubscribe {
                channel,
                loop_id: self.id,
            });
        }
    }

    /// The broker confirmed the loop's subscription: waiting reads and subscriptions go on
    /// (a raw connection's reads only once the subscription is in effect upstream: see
    /// `may_read`).
    pub(super) fn channel_live(&mut self, channel: &Channel, generation: u64, offline: bool) {
        let Some(members) = self.index.set_live(channel, generation, offline) else {
            return;
        };
        let members: Vec<usize> = members.iter().copied().collect();
        for key in members {
            if self.conns[key].read_pending {
                self.read_backlog.push(key);
            }
            self.activate(key, channel);
        }
    }

    /// Starts a subscription whose channel is live: reads its position (and history when
    /// recovering), or, with history off, lets messages flow at once.
    fn activate(&mut self, key: usize, channel: &Channel) {
        let history_on = self.shared.config.history_size > 0;
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let protocol = open.protocol;
        let Some(sub) = open.sub_mut(channel) else { return };
        let SubState::AwaitingLive(pending) = std::mem::replace(&mut sub.state, SubState::Live) else {
            return;
        };
        if history_on {
            sub.state = SubState::AwaitingHistory {
                pending,
                held: Vec::new(),
            };
            self.request_history(key, channel);
            return;
        }
        if pending.announce && protocol == Protocol::V1 {
            let json = envelope::subscribed(
                pending.reference.as_deref(),
                channel,
                None,
                pending.recover.then_some(false),
            );
            if pending.recover {
                inc(&self.metrics().recovery_failed);
            }
            self.send_json(key, &json);
        }
        self.list_present(key, channel);
    }

    /// Deliveries on `channel` were dropped before reaching this loop: every member that
    /// tracks offsets re-reads the history after its last delivered offset.
    pub(super) fn channel_lost(&mut self, channel: &Channel) {
        // After a reconnect of the Redis subscriber: a channel confirmed while it was down is
        // now subscribed, and raw connections waiting for that are read.
        if let Some(members) = self.index.set_online(channel) {
            let waiting: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&k| self.conns[k].read_pending)
                .collect();
            self.read_backlog.extend(waiting);
        }
        let Some(members) = self.index.members(channel) else {
            return;
        };
        let members: Vec<usize> = members.iter().copied().collect();
        for key in members {
            self.recover_quietly(key, channel);
        }
    }

    /// Starts a recovery without a `subscribed` reply (unless it fails) for a subscription that
    /// tracks offsets; one already reading its history reads again when that is done.
    fn recover_quietly(&mut self, key: usize, channel: &Channel) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        if !open.tracks_offsets {
            return;
        }
        let Some(sub) = open.sub_mut(channel) else { return };
        match &mut sub.state {
            SubState::Live => {
                sub.state = SubState::AwaitingHistory {
                    pending: Pending::quiet(),
                    held: Vec::new(),
                };
                self.turn.gaps.push((key, channel.clone()));
            }
            SubState::AwaitingHistory { pending, .. } => pending.again = true,
            // Its history read comes after the subscription is live, so it misses nothing.
            SubState::AwaitingLive(_) => {}
        }
    }

    /// Asks the broker for the position and history of a subscription in `AwaitingHistory`.
    /// A subscription that starts at the channel's current position (no recovery) in a
    /// session has the broker store that position in the session as it reads it.
    pub(super) fn request_history(&mut self, key: usize, channel: &Channel) {
        let Some(to) = self.reply_to(key) else { return };
        self.reads += 1;
        let read = self.reads;
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let record = open.session.as_ref().map(|s| SessionRecord {
            id: s.id.clone(),
            subject: s.subject.clone(),
        });
        let Some(sub) = open.sub_mut(channel) else { return };
        let SubState::AwaitingHistory { pending, .. } = &mut sub.state else {
            return;
        };
        pending.read = read;
        let (since, record) = match (&pending.checked, pending.restarted, pending.recover) {
            // An epoch check: the history's epoch (and position) is all it needs.
            (Some(_), false, _) => (None, None),
            (_, _, true) => (Some(sub.offset), None),
            // A subscription starting now: its session stores where it starts.
            (_, _, false) => (None, record),
        };
        let request = Request::History {
            channel: channel.clone(),
            since,
            record,
            origin: self.origin(key),
            query: None,
            read,
            to,
        };
        if self.link.request(request).is_err() {
            self.on_history(key, channel.clone(), read, Err("request queue full".into()));
        }
    }

    /// A reply from the broker, for a connection that may have gone since.
    pub(super) fn on_reply(&mut self, id: ConnId, reply: Reply, now: Instant) {
        let current = self.reply_to(id.key).is_some_and(|to| to.conn == id);
        if !current || self.conns[id.key].dead {
            return;
        }
        let api = matches!(self.conns[id.key].phase, Phase::Api { .. });
        match reply {
            Reply::History {
                channel,
                result,
                query: Some(query),
                ..
            } => self.history_answer(id.key, &channel, *query, result, now),
            Reply::History {
                channel,
                result,
                read,
                ..
            } => self.on_history(id.key, channel, read, result),
            Reply::Session(result) => self.on_session(id.key, result, now),
            Reply::Presence {
                channel,
                stats,
                reference,
                result,
            } => self.on_presence(id.key, &channel, stats, reference.as_deref(), result, now),
            Reply::Nodes(_) | Reply::Channels(_) | Reply::AdminSent(_) => self.api_answer(id.key, reply, now),
            Reply::Published {
                channel,
                reference,
                result,
            } if api => self.http_published(id.key, &channel, reference.as_deref(), result, now),
            Reply::Published {
                channel,
                reference,
                result,
            } => {
                let r = reference.as_deref();
                match result {
                    Ok(position) => {
                        self.send_json(id.key, &envelope::published(r, &channel, position.as_ref()))
                    }
                    Err(e) => self.send_error(id.key, r, &Refusal::new(e.code(), e.message())),
                }
            }
        }
    }

    /// The position (and history) of a subscription arrived: announce, replay, release the
    /// deliveries held meanwhile. See `recovery.rs` for the decisions.
    /// An answer to any read but the one the subscription waits for is stale and ignored.
    fn on_history(&mut self, key: usize, channel: Channel, read: u64, result: Result<History, String>) {
        let Some(sub) = self.conns[key].open_mut().and_then(|o| o.sub_mut(&channel)) else {
            return;
        };
        if !matches!(&sub.state, SubState::AwaitingHistory { pending, .. } if pending.read == read) {
            return;
        }
        let SubState::AwaitingHistory { pending, held } = std::mem::replace(&mut sub.state, SubState::Live)
        else {
            return;
        };
        // A quiet recovery of a subscription answered without a position (see
        // `recovery::settle_unplaced`).
        let unplaced =
            sub.epoch.is_none() && pending.recover && !pending.announce && pending.checked.is_none();
        match result {
            Ok(h) if unplaced => {
                let done = recovery::settle_unplaced(&h, &held);
                self.history_settled(key, channel, done, h.top, pending, held)
            }
            Ok(h) => match recovery::settle(sub.offset, sub.epoch.as_deref(), &pending, &h) {
                Settled::Restart { epoch, notify } => {
                    self.history_restarted(key, channel, epoch, notify, pending, held)
                }
                done => self.history_settled(key, channel, done, h.top, pending, held),
            },
            Err(e) => {
                debug!("history for {channel:?} unavailable: {e}");
                self.history_unavailable(key, channel, pending, held);
            }
        }
    }

    /// The history could not be read: no replay; a v1 client is told, whether it asked
    /// (subscribe) or not (a gap), and live deliveries go on.
    fn history_unavailable(
        &mut self,
        key: usize,
        channel: Channel,
        pending: Pending,
        held: Vec<Arc<Delivery>>,
    ) {
        let mut frames = Vec::new();
        if self.protocol(key) == Some(Protocol::V1) && (pending.announce || pending.recover) {
            let reply = envelope::subscribed(
                reply_ref(&pending),
                &channel,
                None,
                pending.recover.then_some(false),
            );
            frames.push(crate::frame::text(&reply));
            // Told it has no position (and, if it asked, that nothing is replayed): it has
            // none, so a later recovery does not replay from the one it had or asked for.
            if let Some(sub) = self.conns[key].open_mut().and_then(|o| o.sub_mut(&channel)) {
                sub.epoch = None;
                sub.offset = 0;
            }
        }
        if pending.recover {
            inc(&self.metrics().recovery_failed);
        }
        self.release_held(key, &channel, pending, held, false, frames);
    }

    /// The history restarted under a quiet recovery: tell the client once (`notify`), then
    /// read the new epoch from its start, still holding live deliveries.
    fn history_restarted(
        &mut self,
        key: usize,
        channel: Channel,
        epoch: Arc<str>,
        notify: bool,
        pending: Pending,
        held: Vec<Arc<Delivery>>,
    ) {
        if notify {
            inc(&self.metrics().recovery_failed);
        }
        let v1 = notify && self.protocol(key) == Some(Protocol::V1);
        let Some(sub) = self.conns[key].open_mut().and_then(|o| o.sub_mut(&channel)) else {
            return;
        };
        let notice = v1.then(|| {
            let position = Position {
                offset: 0,
                epoch: epoch.clone(),
            };
            crate::frame::text(&envelope::subscribed(
                None,
                &channel,
                Some(&position),
                Some(false),
            ))
        });
        sub.epoch = Some(epoch);
        sub.offset = 0;
        sub.state = SubState::AwaitingHistory {
            pending: Pending {
                restarted: true,
                ..pending
            },
            held,
        };
        self.turn.gaps.push((key, channel));
        self.queue_frames(key, notice.as_slice());
    }

    /// The history answered (`Settled::Done`): announce, replay, take the position, then
    /// release what was held, or, for one page of a longer replay, keep holding and ask for
    /// the next page once this one is written out (see `next_pages`).
    fn history_settled(
        &mut self,
        key: usize,
        channel: Channel,
        done: Settled,
        top: u64,
        pending: Pending,
        held: Vec<Arc<Delivery>>,
    ) {
        let Settled::Done {
            notice,
            replay,
            recovered,
            position,
            more,
        } = done
        else {
            return;
        };
        let m = &self.shared.metrics.loops[self.id];
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let frames = settled_frames(open.protocol, &channel, notice, &replay, &pending);
        add(&m.replayed, replay.len() as u64);
        if pending.recover && !recovered {
            inc(&m.recovery_failed);
        }
        if let Some(s) = &mut open.session {
            s.offsets_dirty = true;
        }
        let Some(sub) = open.sub_mut(&channel) else { return };
        if !pending.recover {
            // The broker stored this position in the session as it read it.
            sub.stored = Some(Position {
                offset: top,
                epoch: position.epoch.clone(),
            });
        }
        sub.offset = position.offset;
        sub.epoch = Some(position.epoch);
        if !more {
            return self.release_held(key, &channel, pending, held, true, frames);
        }
        sub.state = SubState::AwaitingHistory {
            pending: Pending {
                recover: true,
                announce: false,
                reference: None,
                checked: None,
                // The next page is asked for once this one is written out (`next_pages`).
                read: 0,
                ..pending
            },
            held,
        };
        open.pages_wanted = true;
        self.queue_frames(key, &frames);
    }

    /// The wire protocol of connection `key`, if it is open.
    fn protocol(&self, key: usize) -> Option<Protocol> {
        match &self.conns[key].phase {
            Phase::Open(open) => Some(open.protocol),
            _ => None,
        }
    }

    /// Sends `frames`, then the deliveries held during a history read (through the same
    /// bookkeeping as live ones: duplicates of the replay are skipped, a new gap or an epoch
    /// not seen before starts another read, holding the rest again).
    fn release_held(
        &mut self,
        key: usize,
        channel: &Channel,
        pending: Pending,
        held: Vec<Arc<Delivery>>,
        read_ok: bool,
        mut frames: Vec<bytes::Bytes>,
    ) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        open.release_held(held.iter().map(|d| d.data.len()).sum());
        let protocol = open.protocol;
        for d in &held {
            match fanout::release(open, d, key, &pending, read_ok, &mut self.turn) {
                Verdict::Send => frames.push(frame_for(protocol, d)),
                Verdict::Plain => frames.push(fanout::frame_of(protocol, d, true).clone()),
                Verdict::Held | Verdict::Skip => {}
            }
        }
        if pending.again {
            self.recover_quietly(key, channel);
        }
        self.queue_frames(key, &frames);
        // Live: it enters the channel's presence (its join comes after its `subscribed`).
        self.list_present(key, channel);
        // A raw connection's input waits for its subscription (see `read_frames`).
        if self.conns[key].read_pending {
            self.read_backlog.push(key);
        }
    }

    /// Asks for the next page of every replay of connection `key` that waits for one: called
    /// once its output is back under the soft limit, so a replay goes out at the pace the
    /// client reads it.
    pub(super) fn next_pages(&mut self, key: usize) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        if !std::mem::take(&mut open.pages_wanted) {
            return;
        }
        let waiting: Vec<Channel> = open
            .subs
            .iter()
            .filter(|s| {
                // A page not asked for yet; not a read under way (another channel's page, a
                // gap's recovery): asking again would only waste a read.
                matches!(&s.state, SubState::AwaitingHistory { pending, .. }
                    if !pending.announce && pending.recover && pending.read == 0)
            })
            .map(|s| s.channel.clone())
            .collect();
        for channel in waiting {
            self.request_history(key, &channel);
        }
    }

    /// Queues frames to a connection; like deliveries, they are judged after the flush.
    fn queue_frames(&mut self, key: usize, frames: &[bytes::Bytes]) {
        let conn = &mut self.conns[key];
        for f in frames {
            conn.out.push_shared(f);
        }
        self.mark_dirty(key);
    }

    // ---- sessions ------------------------------------------------------------------------

    /// Asks the broker for the stored session this connection wants to resume.
    pub(super) fn load_session(&mut self, key: usize) {
        let Some(to) = self.reply_to(key) else { return };
        let Some(id) = self.conns[key]
            .open_mut()
            .and_then(|o| o.session.as_ref())
            .map(|s| s.id.clone())
        else {
            return;
        };
        if self.link.request(Request::LoadSession { id, to }).is_err() {
            self.on_session(key, Err("request queue full".into()), Instant::now());
        }
    }

    /// The stored session arrived (or not): restore its subscriptions, then start reading.
    fn on_session(&mut self, key: usize, result: Result<Option<SessionState>, String>, now: Instant) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let Stage::Resuming {
            raw_channel,
            reference,
        } = std::mem::replace(&mut open.stage, Stage::Ready)
        else {
            return;
        };
        let protocol = open.protocol;
        if open.session.is_none() {
            return;
        }
        let stored = Self::owned_session(open, result);
        let resumed = stored.is_some();
        let channels = stored.map(|s| s.channels).unwrap_or_default();
        match protocol {
            Protocol::V1 => {
                if !self.restore_v1(key, reference.as_deref(), resumed, channels, now) {
                    return;
                }
            }
            // The raw channel is the path's; it was kept aside until now.
            Protocol::Raw => match raw_channel {
                Some(channel) => self.restore_raw(key, channel, channels, now),
                None => return,
            },
        }
        self.conns[key].read_pending = true;
        self.read_backlog.push(key);
    }

    /// The stored session `result` names, if it is the connection's to resume. Someone else's
    /// session is not resumed, and not overwritten either: the connection continues under a
    /// fresh id (a raw client, whose id is its own choice, continues without a session).
    fn owned_session(
        open: &mut crate::conn::Open,
        result: Result<Option<SessionState>, String>,
    ) -> Option<SessionState> {
        let session = open.session.as_mut()?;
        match result {
            Ok(Some(s)) if s.subject != session.subject => {
                debug!("session {} belongs to another subject", session.id);
                match open.protocol {
                    Protocol::V1 => session.id = super::handshake::new_session_id(),
                    Protocol::Raw => open.session = None,
                }
                None
            }
            Ok(s) => s,
            Err(e) => {
                debug!("session {} not loaded: {e}", session.id);
                None
            }
        }
    }

    /// A v1 connection's resume: the welcome, then each stored subscription the current token
    /// still allows, recovering from its stored position. False when the connection is no
    /// longer open.
    fn restore_v1(
        &mut self,
        key: usize,
        reference: Option<&str>,
        resumed: bool,
        channels: Vec<(Channel, u64, Option<Arc<str>>)>,
        now: Instant,
    ) -> bool {
        let Some(open) = self.conns[key].open_mut() else {
            return false;
        };
        let id = open
            .session
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_else(|| Arc::from(""));
        let client = self.client_id(key);
        self.send_json(key, &envelope::welcome(reference, &id, resumed, &client));
        let mut dropped = false;
        for (channel, offset, epoch) in channels {
            match self.restore_sub(key, channel, offset, epoch, now) {
                Some(true) => {}
                Some(false) => dropped = true,
                None => return false,
            }
        }
        if dropped {
            self.session_changed.push(key);
        }
        true
    }

    /// One stored subscription of a v1 connection, authorized again against the current
    /// token: `Some(true)` restored, `Some(false)` ended, said so (to be removed from the
    /// session), `None` the connection is gone.
    fn restore_sub(
        &mut self,
        key: usize,
        channel: Channel,
        offset: u64,
        epoch: Option<Arc<str>>,
        now: Instant,
    ) -> Option<bool> {
        let open = self.conns[key].open_mut()?;
        let refusal = if !open.may_subscribe(&channel) {
            inc(&self.shared.metrics.loops[self.id].forbidden);
            Some("forbidden")
        } else if open.subs.len() >= self.shared.config.max_channels_per_conn {
            Some("too_many_channels")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.send_json(key, &envelope::unsubscribed_because(&channel, reason));
            return Some(false);
        }
        // Listed in presence without info: info is not kept in sessions.
        let presence = self.presence_entry(key, &channel, None).ok().flatten();
        let open = self.conns[key].open_mut()?;
        let pending = Pending {
            announce: true,
            ..Pending::quiet()
        };
        if let Some(entry) = presence {
            self.listing.pending.insert((key, channel.clone()), entry);
        }
        open.add_sub(crate::conn::Sub::awaiting(
            channel.clone(),
            offset,
            epoch,
            pending,
        ));
        inc(&self.metrics().recoveries);
        self.join(key, &channel, now);
        Some(true)
    }

    /// A raw connection's resume: its path's channel, from the stored position if one was
    /// learned. A position never learned ("0 -") is no position: it joins as new, which stores
    /// the current one.
    fn restore_raw(
        &mut self,
        key: usize,
        channel: Channel,
        channels: Vec<(Channel, u64, Option<Arc<str>>)>,
        now: Instant,
    ) {
        let from = channels
            .into_iter()
            .find(|(c, _, e)| *c == channel && e.is_some())
            .map(|(_, offset, epoch)| (offset, epoch));
        if from.is_some() {
            inc(&self.metrics().recoveries);
        }
        self.join_raw(key, channel, from, now);
    }

    /// Writes the connection's session as it stands: each subscription at its stored
    /// position, which first catches up with the delivered one when the client has
    /// acknowledged everything queued to it (nothing unsent, nothing unacknowledged in the
    /// kernel). A connection that broke (reset, write error) is not asked: a reset socket's
    /// queue is empty because it was thrown away, not because it arrived.
    ///
    /// With `only_if_moved` (the periodic flush of delivered offsets), nothing is written
    /// unless a stored position moves: until the client has acknowledged, the session stays
    /// due and is tried again at the next sweep.
    pub(super) fn save_session(&mut self, key: usize, now: Instant, only_if_moved: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let acknowledged = conn.acknowledged_all();
        let Phase::Open(open) = &mut conn.phase else {
            return;
        };
        if matches!(open.stage, Stage::Resuming { .. }) {
            return;
        }
        let Some(session) = &mut open.session else { return };
        if only_if_moved && !acknowledged {
            return;
        }
        if acknowledged {
            open.subs.iter_mut().for_each(|s| s.delivered_all());
        }
        session.offsets_dirty = false;
        session.saved_at = now;
        let state = SessionState {
            subject: session.subject.clone(),
            channels: open
                .subs
                .iter()
                .map(|s| match &s.stored {
                    Some(p) => (s.channel.clone(), p.offset, Some(p.epoch.clone())),
                    None => (s.channel.clone(), 0, None),
                })
                .collect(),
        };
        let id = session.id.clone();
        if self.link.request(Request::SaveSession { id, state }).is_err() {
            // Retried at the next flush.
            if let Some(s) = &mut open.session {
                s.offsets_dirty = true;
            }
        }
    }

    /// The connection stops being an open WebSocket: its session is written one last time and
    /// it leaves every channel.
    pub(super) fn end_open(&mut self, key: usize, now: Instant) {
        if !matches!(self.conns[key].phase, Phase::Open(_)) {
            return;
        }
        self.orphan_unpublished(key, now);
        self.save_session(key, now, false);
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        let subs = std::mem::take(&mut open.subs);
        open.held_bytes = 0;
        for sub in subs {
            self.end_sub(key, sub);
        }
        dec(&self.metrics().websockets);
    }
}

fn frame_for(protocol: Protocol, d: &Delivery) -> bytes::Bytes {
    fanout::frame_of(protocol, d, false).clone()
}

/// The `ref` a `subscribed` reply echoes: the subscribe command's, when the reply answers it.
fn reply_ref(pending: &Pending) -> Option<&str> {
    if pending.announce {
        pending.reference.as_deref()
    } else {
        None
    }
}

/// What a settled history read sends a connection: for v1 the `subscribed` notice, if there is
/// one, then the replayed messages in the connection's protocol.
fn settled_frames(
    protocol: Protocol,
    channel: &Channel,
    notice: Option<(Position, Option<bool>)>,
    replay: &[Arc<Delivery>],
    pending: &Pending,
) -> Vec<bytes::Bytes> {
    let mut frames = Vec::with_capacity(replay.len() + 1);
    if let (Some((at, recovered)), Protocol::V1) = (notice, protocol) {
        let reply = envelope::subscribed(reply_ref(pending), channel, Some(&at), recovered);
        frames.push(crate::frame::text(&reply));
    }
    frames.extend(replay.iter().map(|d| match protocol {
        Protocol::Raw => d.raw_frame.clone(),
        Protocol::V1 => d.envelope_frame_uncached(),
    }));
    frames
}
