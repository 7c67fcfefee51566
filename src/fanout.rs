//! Fan-out: one delivery appended to the output of every local member of its channel.
//!
//! This is the per-message hot path, kept free of sockets and syscalls so it can be measured on
//! its own (`benches/fanout.rs`). The frame was encoded once for every recipient of a protocol;
//! here each member gets one copy into its output buffer, is marked for the end-of-turn flush
//! (once per turn however many messages it got), and is reported when its backlog passes the
//! cap. Connections that track offsets also drop duplicates, hold deliveries while their
//! history is being read, and report gaps (deliveries lost upstream) for recovery.

use std::sync::Arc;

use slab::Slab;

use crate::bridge::{Channel, Delivery};
use crate::channels::Members;
use crate::conn::{Conn, Open, Pending, Phase, Protocol, SubState};

/// What fan-out leaves for the rest of the loop turn.
#[derive(Debug, Default)]
pub struct Turn {
    /// Connections with output to flush at the end of the turn, each once.
    pub dirty: Vec<usize>,
    /// Connections whose unsent output passed the cap: slow consumers to close.
    pub slow: Vec<usize>,
    /// Subscriptions that saw a gap in offsets and now wait for a history read.
    pub gaps: Vec<(usize, Channel)>,
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
pub(crate) enum Verdict {
    /// Send it.
    Send,
    /// The channel's history restarted (new epoch, e.g. Redis lost its data): a v1 client is
    /// told (`recovered: false`: what was published in between may be lost), and the new
    /// epoch is replayed from its start, this delivery held until then.
    NewEpoch,
    /// Already delivered, or not for this connection yet.
    Skip,
    /// Kept until the subscription's history arrives.
    Held,
}

/// Appends `d` to every member's output. Returns the number of messages queued.
pub fn deliver(
    d: &Arc<Delivery>,
    members: &Members,
    conns: &mut Slab<Conn>,
    max_output: usize,
    turn: &mut Turn,
) -> usize {
    let mut sent = 0;
    for &key in members {
        let conn = &mut conns[key];
        let Phase::Open(open) = &mut conn.phase else {
            debug_assert!(false, "channel member {key} is not open");
            continue;
        };
        let verdict = if open.tracks_offsets {
            track(open, d, key, turn)
        } else {
            Verdict::Send
        };
        let backlog = match verdict {
            Verdict::Skip => continue,
            Verdict::Held => conn.out.len() + open.held_bytes,
            Verdict::NewEpoch => {
                let held = open.held_bytes;
                if open.protocol == Protocol::V1 {
                    conn.out.push(&new_epoch_notice(d));
                    turn.mark_dirty(key, conn);
                }
                conn.out.len() + held
            }
            Verdict::Send => {
                let frame = match open.protocol {
                    Protocol::Raw => &d.raw_frame,
                    Protocol::V1 => d.envelope_frame(),
                };
                conn.out.push(frame);
                sent += 1;
                turn.mark_dirty(key, conn);
                conn.out.len()
            }
        };
        if backlog > max_output && !conn.dead {
            turn.slow.push(key);
        }
    }
    sent
}

/// Offset bookkeeping for one subscription: duplicates are skipped, deliveries wait while the
/// history is read, and a jump in offsets (deliveries lost before reaching this loop) starts a
/// history read from the last delivered offset.
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
    if sub.epoch.as_deref() == Some(&*pos.epoch) {
        if pos.offset <= sub.offset {
            return Verdict::Skip;
        }
        if pos.offset > sub.offset + 1 {
            // Recover what was lost between the last delivered offset and this one.
            sub.state = recover_holding(d);
            *held_bytes += d.data.len();
            turn.gaps.push((key, d.channel.clone()));
            return Verdict::Held;
        }
    }
    if sub.epoch.as_deref().is_some_and(|e| e != &*pos.epoch) {
        // Recover the new epoch from its start.
        sub.epoch = Some(pos.epoch.clone());
        sub.offset = 0;
        sub.state = recover_holding(d);
        *held_bytes += d.data.len();
        turn.gaps.push((key, d.channel.clone()));
        return Verdict::NewEpoch;
    }
    // Next in sequence, or the first message with an offset.
    sub.offset = pos.offset;
    sub.epoch = Some(pos.epoch.clone());
    if let Some(s) = session {
        s.offsets_dirty = true;
    }
    Verdict::Send
}

/// A quiet recovery from the subscription's offset (no `subscribed` reply), holding `d`.
fn recover_holding(d: &Arc<Delivery>) -> SubState {
    SubState::AwaitingHistory {
        pending: Pending::quiet(),
        held: vec![d.clone()],
    }
}

/// An unsolicited `subscribed` reply with `recovered: false`, positioned at the start of the
/// new epoch (its messages follow).
pub(crate) fn new_epoch_notice(d: &Delivery) -> bytes::Bytes {
    let position = d.position.as_ref().map(|p| crate::bridge::Position {
        offset: 0,
        epoch: p.epoch.clone(),
    });
    let json = crate::envelope::subscribed(None, &d.channel, position.as_ref(), Some(false));
    crate::frame::text(&json)
}
