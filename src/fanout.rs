//! Fan-out: one delivery appended to the output of every local member of its channel.
//!
//! This is the per-message hot path, kept free of sockets and syscalls so it can be measured on
//! its own (`benches/fanout.rs`). The frame was encoded once for every recipient of a protocol;
//! here each member's output buffer gets a reference to it (no copy), is marked for the end-of-turn flush
//! (once per turn however many messages it got); whether its backlog is too large is judged
//! after that flush (`backpressure.rs`). Connections that track offsets also drop duplicates, hold deliveries while their
//! history is being read, and report gaps (deliveries lost upstream) for recovery.

use std::sync::Arc;

use slab::Slab;

use crate::bridge::{Channel, Delivery};
use crate::channels::Members;
use crate::conn::{Conn, Open, PIECE_OVERHEAD, Pending, Phase, Protocol, SubState};

/// What fan-out leaves for the rest of the loop turn.
#[derive(Debug, Default)]
pub struct Turn {
    /// Connections with output to flush at the end of the turn, each once (and then judged
    /// by the slow-consumer policy, `backpressure.rs`).
    pub dirty: Vec<usize>,
    /// Subscriptions that saw a gap in offsets and now wait for a history read.
    pub gaps: Vec<(usize, Channel)>,
    /// Bytes appended to output buffers since they were last written and judged: not in the
    /// loop's unsent total yet, but in memory. The loop writes and judges as soon as the two
    /// together pass `--loop-output-budget`, so a backlog of deliveries drained in one turn
    /// cannot pile up far past the budget before anyone is judged.
    pub queued: usize,
}

impl Turn {
    /// Marks `key` for the end-of-turn flush unless it already is.
    pub fn mark_dirty(&mut self, key: usize, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }
}

/// What one delivery means for one connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send it.
    Send,
    /// Send it without its position: the position is foreign to the channel's history (a
    /// payload published straight into Redis with a header that only looks like wsrelay's).
    Plain,
    /// Already delivered, or not for this connection yet.
    Skip,
    /// Kept until the subscription's history arrives.
    Held,
}

/// The frame a connection of `protocol` receives for `d`; `plain` drops the position.
pub(crate) fn frame_of(protocol: Protocol, d: &Delivery, plain: bool) -> &bytes::Bytes {
    match (protocol, plain) {
        (Protocol::Raw, _) => &d.raw_frame,
        (Protocol::V1, false) => d.envelope_frame(),
        (Protocol::V1, true) => d.plain_envelope_frame(),
    }
}

/// Appends `d` to every member's output. Returns the number of messages queued. Nobody is
/// judged here: the end of the turn writes first, then judges what is left.
pub fn deliver(d: &Arc<Delivery>, members: &Members, conns: &mut Slab<Conn>, turn: &mut Turn) -> usize {
    let mut sent = 0;
    let mut queued = 0;
    for &key in members {
        let conn = &mut conns[key];
        let Phase::Open(open) = &mut conn.phase else {
            debug_assert!(false, "channel member {key} is not open");
            continue;
        };
        if conn.dead || conn.hung_up {
            // Dropped earlier in this turn (over the budget): it leaves its channels when the
            // turn ends, and gets nothing more meanwhile. Or a write to it failed: it is read
            // for what it sent before, and gets nothing more.
            continue;
        }
        let frame = if !open.tracks_offsets {
            // The common case (a plain raw subscriber): nothing to check.
            match open.protocol {
                Protocol::Raw => &d.raw_frame,
                Protocol::V1 => d.envelope_frame(),
            }
        } else {
            match track(open, d, key, turn) {
                Verdict::Skip | Verdict::Held => continue,
                Verdict::Send => frame_of(open.protocol, d, false),
                Verdict::Plain => frame_of(open.protocol, d, true),
            }
        };
        conn.out.push_shared(frame);
        queued += frame.len() + PIECE_OVERHEAD;
        sent += 1;
        turn.mark_dirty(key, conn);
    }
    turn.queued += queued;
    sent
}

/// Offset bookkeeping for one subscription: duplicates are skipped, deliveries wait while the
/// history is read, a jump in offsets (deliveries lost before reaching this loop) starts a
/// history read from the last delivered offset, and an epoch that is not the subscription's
/// starts one that tells a restarted history from a foreign payload.
pub(crate) fn track(open: &mut Open, d: &Arc<Delivery>, key: usize, turn: &mut Turn) -> Verdict {
    let Open {
        subs,
        held_bytes,
        session,
        ..
    } = open;
    let Some(sub) = subs.iter_mut().find(|s| s.channel == d.channel) else {
        return Verdict::Skip;
    };
    match &mut sub.state {
        SubState::AwaitingLive(_) => return Verdict::Skip,
        SubState::AwaitingHistory { held, .. } => {
            held.push(d.clone());
            *held_bytes += d.data.len();
            return Verdict::Held;
        }
        SubState::Live => {}
    }
    let Some(pos) = &d.position else {
        // Published straight into Redis, or during a Redis outage: no offset to track.
        return Verdict::Send;
    };
    match sub.epoch.as_deref() {
        Some(epoch) if epoch == &*pos.epoch => {
            if pos.offset <= sub.offset {
                return Verdict::Skip;
            }
            if pos.offset > sub.offset + 1 {
                // Recover what was lost between the last delivered offset and this one.
                hold(sub, held_bytes, Pending::gap(pos.offset), d);
                turn.gaps.push((key, d.channel.clone()));
                return Verdict::Held;
            }
        }
        Some(_) if sub.foreign.as_deref() == Some(&*pos.epoch) => return Verdict::Plain,
        Some(_) => {
            // A new epoch (the history restarted) or a foreign one: the history decides.
            hold(sub, held_bytes, Pending::check(pos.epoch.clone()), d);
            turn.gaps.push((key, d.channel.clone()));
            return Verdict::Held;
        }
        // The first message with an offset (the history could not be read at subscribe).
        None => {}
    }
    sub.offset = pos.offset;
    sub.epoch = Some(pos.epoch.clone());
    if let Some(s) = session {
        s.offsets_dirty = true;
    }
    Verdict::Send
}

/// Puts `sub` into a history read described by `pending`, holding `d`.
fn hold(sub: &mut crate::conn::Sub, held_bytes: &mut usize, pending: Pending, d: &Arc<Delivery>) {
    sub.state = SubState::AwaitingHistory {
        pending,
        held: vec![d.clone()],
    };
    *held_bytes += d.data.len();
}

/// Releases a delivery held while a history read was answered, after the subscription took
/// the history's position: like [`track`], except that an epoch the read was checking and
/// that is not the history's is foreign (remembered only when the read succeeded, so a
/// failed read cannot turn a restarted history into a foreign one for good), and that after
/// a failed read nothing starts another read (the client was told recovery failed).
pub(crate) fn release(
    open: &mut Open,
    d: &Arc<Delivery>,
    key: usize,
    pending: &Pending,
    read_ok: bool,
    turn: &mut Turn,
) -> Verdict {
    let checked = pending.checked.as_deref();
    let Some(sub) = open.subs.iter_mut().find(|s| s.channel == d.channel) else {
        return Verdict::Skip;
    };
    if let (SubState::Live, Some(pos)) = (&sub.state, &d.position) {
        let in_epoch = sub.epoch.as_deref() == Some(&*pos.epoch);
        if read_ok && in_epoch && pending.gap_to == Some(pos.offset) && pos.offset > sub.offset + 1 {
            // The read this delivery started could not fill the gap before it: its offset is
            // not the channel's. Passed on once, without a position.
            return Verdict::Plain;
        }
        let mismatched = sub.epoch.as_deref().is_some_and(|e| e != &*pos.epoch);
        if mismatched && (!read_ok || checked == Some(&*pos.epoch)) {
            if read_ok {
                sub.foreign = Some(pos.epoch.clone());
            }
            return Verdict::Plain;
        }
        if !read_ok && !mismatched && pos.offset > sub.offset + 1 {
            // A gap that history could not fill a moment ago: the client was told.
            sub.offset = pos.offset - 1;
        }
    }
    track(open, d, key, turn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Position;
    use crate::conn::Sub;
    use crate::frame::Kind;
    use bytes::Bytes;
    use tungstenite::protocol::{Role, WebSocketContext};

    fn open_on(channel: &str, offset: u64, epoch: &str) -> Open {
        let ctx = WebSocketContext::new(Role::Server, None);
        let mut open = Open::new(ctx, Protocol::V1, std::time::Instant::now());
        let mut sub = Sub::live(Arc::from(channel));
        sub.offset = offset;
        sub.epoch = Some(Arc::from(epoch));
        open.subs.push(sub);
        open
    }

    fn at(offset: u64, epoch: &str) -> Arc<Delivery> {
        let position = Position {
            offset,
            epoch: Arc::from(epoch),
        };
        Delivery::new(Arc::from("c"), Kind::Text, Bytes::from("data"), Some(position))
    }

    fn held(open: &Open) -> Vec<u64> {
        match &open.subs[0].state {
            SubState::AwaitingHistory { held, .. } => {
                held.iter().map(|d| d.position.as_ref().unwrap().offset).collect()
            }
            _ => vec![],
        }
    }

    #[test]
    fn duplicates_are_skipped_and_gaps_held_for_recovery() {
        let mut open = open_on("c", 5, "e");
        let mut turn = Turn::default();
        assert_eq!(track(&mut open, &at(5, "e"), 1, &mut turn), Verdict::Skip);
        assert_eq!(track(&mut open, &at(6, "e"), 1, &mut turn), Verdict::Send);
        assert_eq!(open.subs[0].offset, 6);
        assert_eq!(track(&mut open, &at(9, "e"), 1, &mut turn), Verdict::Held);
        assert_eq!(turn.gaps.len(), 1);
        assert_eq!(track(&mut open, &at(10, "e"), 1, &mut turn), Verdict::Held);
        assert_eq!(held(&open), vec![9, 10]);
        assert_eq!(open.held_bytes, 8);
        // Messages without a position pass untracked.
        let plain = Delivery::new(Arc::from("c"), Kind::Text, Bytes::from("x"), None);
        let mut live = open_on("c", 5, "e");
        assert_eq!(track(&mut live, &plain, 1, &mut turn), Verdict::Send);
        assert_eq!(live.subs[0].offset, 5);
    }

    #[test]
    fn an_unknown_epoch_is_checked_once_and_a_foreign_one_passes_plain() {
        let mut open = open_on("c", 5, "e");
        let mut turn = Turn::default();
        let foreign = at(7, "x");
        assert_eq!(track(&mut open, &foreign, 1, &mut turn), Verdict::Held);
        let SubState::AwaitingHistory { pending, .. } = &open.subs[0].state else {
            panic!("not reading history");
        };
        assert_eq!(pending.checked.as_deref(), Some("x"));
        // The history still has epoch "e": the read settles, then the held delivery is
        // released as foreign, once, and remembered.
        open.subs[0].state = SubState::Live;
        assert_eq!(
            release(
                &mut open,
                &foreign,
                1,
                &Pending::check(Arc::from("x")),
                true,
                &mut turn
            ),
            Verdict::Plain
        );
        assert_eq!(open.subs[0].foreign.as_deref(), Some("x"));
        assert_eq!(open.subs[0].offset, 5, "a foreign offset moves nothing");
        let gaps = turn.gaps.len();
        assert_eq!(track(&mut open, &at(8, "x"), 1, &mut turn), Verdict::Plain);
        assert_eq!(turn.gaps.len(), gaps, "no second read for a known foreign epoch");
        assert_eq!(track(&mut open, &at(6, "e"), 1, &mut turn), Verdict::Send);
    }

    #[test]
    fn a_delivery_released_after_a_read_never_starts_the_same_check_again() {
        // Released with an epoch other than the one checked: that one is checked in turn.
        let mut open = open_on("c", 5, "e");
        let mut turn = Turn::default();
        assert_eq!(
            release(
                &mut open,
                &at(3, "y"),
                1,
                &Pending::check(Arc::from("x")),
                true,
                &mut turn
            ),
            Verdict::Held
        );
        // After a failed read nothing starts another read: the mismatch passes plain (not
        // remembered), a gap is accepted (the client was told recovery failed).
        let mut open = open_on("c", 5, "e");
        assert_eq!(
            release(
                &mut open,
                &at(3, "y"),
                1,
                &Pending::check(Arc::from("y")),
                false,
                &mut turn
            ),
            Verdict::Plain
        );
        assert_eq!(open.subs[0].foreign, None);
        assert_eq!(
            release(&mut open, &at(9, "e"), 1, &Pending::quiet(), false, &mut turn),
            Verdict::Send
        );
        assert_eq!(open.subs[0].offset, 9);
    }

    #[test]
    fn the_first_position_is_taken_when_none_is_known() {
        let ctx = WebSocketContext::new(Role::Server, None);
        let mut open = Open::new(ctx, Protocol::Raw, std::time::Instant::now());
        open.subs.push(Sub::live(Arc::from("c")));
        let mut turn = Turn::default();
        assert_eq!(track(&mut open, &at(4, "e"), 1, &mut turn), Verdict::Send);
        assert_eq!(
            (open.subs[0].offset, open.subs[0].epoch.as_deref()),
            (4, Some("e"))
        );
    }

    #[test]
    fn stored_positions_follow_only_what_was_acknowledged() {
        let mut open = open_on("c", 5, "e");
        assert_eq!(open.subs[0].stored, None);
        open.subs[0].delivered_all();
        assert_eq!(open.subs[0].stored.as_ref().map(|p| p.offset), Some(5));
        let mut turn = Turn::default();
        assert_eq!(track(&mut open, &at(6, "e"), 1, &mut turn), Verdict::Send);
        assert_eq!(open.subs[0].stored.as_ref().map(|p| p.offset), Some(5));
        // A subscription reading its history keeps its stored position.
        assert_eq!(track(&mut open, &at(9, "e"), 1, &mut turn), Verdict::Held);
        open.subs[0].delivered_all();
        assert_eq!(open.subs[0].stored.as_ref().map(|p| p.offset), Some(5));
    }

    #[test]
    fn a_gap_the_history_cannot_fill_passes_plain_once() {
        let mut open = open_on("c", 5, "e");
        let mut turn = Turn::default();
        let far = at(1004, "e");
        assert_eq!(track(&mut open, &far, 1, &mut turn), Verdict::Held);
        let SubState::AwaitingHistory { pending, .. } = &open.subs[0].state else {
            panic!("not reading history");
        };
        assert_eq!(pending.gap_to, Some(1004));
        // The read found the history ending at 6: the gap up to 1004 stays.
        open.subs[0].state = SubState::Live;
        open.subs[0].offset = 6;
        let gaps = turn.gaps.len();
        assert_eq!(
            release(&mut open, &far, 1, &Pending::gap(1004), true, &mut turn),
            Verdict::Plain
        );
        assert_eq!(turn.gaps.len(), gaps, "no second read");
        assert_eq!(open.subs[0].offset, 6);
        // A real message after a gap the read filled is delivered as usual.
        assert_eq!(
            release(&mut open, &at(7, "e"), 1, &Pending::gap(7), true, &mut turn),
            Verdict::Send
        );
    }
}
