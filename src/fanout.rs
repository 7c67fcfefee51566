//! Fan-out: one delivery appended to the output of every local member of its channel.
//!
//! This is the per-message hot path, kept free of sockets and syscalls so it can be measured on
//! its own (`benches/fanout.rs`). The frame was encoded once for every recipient; here each
//! member gets one copy into its output buffer, is marked for the end-of-turn flush (once per
//! turn however many messages it got), and is reported when its backlog passes the cap.

use slab::Slab;

use crate::bridge::Delivery;
use crate::channels::Members;
use crate::conn::{Conn, Phase};

/// What fan-out leaves for the rest of the loop turn.
#[derive(Debug, Default)]
pub struct Turn {
    /// Connections with output to flush at the end of the turn, each once.
    pub dirty: Vec<usize>,
    /// Connections whose unsent output passed the cap: slow consumers to close.
    pub slow: Vec<usize>,
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

/// Appends `d` to every member's output. Returns the number of recipients.
pub fn deliver(
    d: &Delivery,
    members: &Members,
    conns: &mut Slab<Conn>,
    max_output: usize,
    turn: &mut Turn,
) -> usize {
    for &key in members {
        let conn = &mut conns[key];
        debug_assert!(
            matches!(conn.phase, Phase::Open(_)),
            "channel member {key} is not open"
        );
        conn.out.push(&d.raw_frame);
        turn.mark_dirty(key, conn);
        if conn.out.len() > max_output && !conn.dead {
            turn.slow.push(key);
        }
    }
    members.len()
}
