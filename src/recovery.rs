//! How a subscription settles a history answer: whether the client's position is recovered,
//! what it is told, what is replayed, and where it stands afterwards. Pure decisions over a
//! subscription's position and a [`History`]; the event loop carries them out (frames, the
//! held deliveries, metrics). Kept apart so every case has a unit test.
//!
//! The rules (README, "Envelope protocol" and "Sessions"):
//! - Recovered when recovery was asked for, the epoch is the one the client knows, and the
//!   stored history starts right after its offset (or nothing was published since). Then every
//!   stored message after the offset is replayed, in order.
//! - Not recovered: nothing is replayed and the subscription continues from the newest
//!   offset; a v1 client is told (`subscribed`, `recovered: false`), whether it asked or not.
//! - An unknown epoch on a delivery is checked with a position-only read: the subscription's
//!   own epoch means the delivery was foreign, and nothing changes.
//! - A recovery the client did not ask for (a gap, lost deliveries, an unknown epoch on a
//!   delivery) that finds the history restarted under a new epoch tells the client once
//!   (`recovered: false` at offset 0 of the new epoch) and reads the new epoch from its start,
//!   so that its messages are not lost too. Only once per recovery: a history that keeps
//!   changing under it is settled as not recovered, not read forever.

use std::sync::Arc;

use crate::bridge::{Delivery, History, Position};
use crate::conn::Pending;

/// Most stored messages one history read returns: a replay comes in pages, the next asked
/// for once the connection has written the last one out, so neither a long history nor a
/// slow client makes the server hold a whole replay (or the client be closed for it).
pub const PAGE_ENTRIES: usize = 256;
/// Most payload bytes in one page (at least one message): with 64 KiB messages, four of them;
/// as v1 envelopes at most six times that.
pub const PAGE_BYTES: usize = 256 * 1024;

/// Cuts a history answer to one page of [`PAGE_BYTES`] (the brokers already return at most
/// [`PAGE_ENTRIES`]); the reader sees that more follow because the last offset is below `top`.
pub fn page(mut h: History) -> History {
    let mut bytes = 0;
    let keep = h
        .entries
        .iter()
        .take_while(|d| {
            let first = bytes == 0;
            bytes += d.data.len();
            first || bytes <= PAGE_BYTES
        })
        .count();
    h.entries.truncate(keep);
    h
}

/// Like [`page`], keeping the newest messages: for a read of the newest messages, whose
/// oldest are the ones to leave out.
pub fn page_newest(mut h: History) -> History {
    h.entries.reverse();
    let mut h = page(h);
    h.entries.reverse();
    h
}

/// What to do with a history answer.
#[derive(Debug)]
pub enum Settled {
    /// The history restarted under a recovery the client did not ask for: tell a v1 client
    /// (`recovered: false` at offset 0 of `epoch`) when it may have missed something, and
    /// read again from that epoch's start.
    Restart {
        /// The history's new epoch.
        epoch: Arc<str>,
        /// Whether to tell the client: not when its position was offset 0, the start of an
        /// epoch that never delivered it anything (a live subscription would have had every
        /// message of it), so the new epoch read from its start misses nothing.
        notify: bool,
    },
    /// The subscription is settled.
    Done {
        /// The `subscribed` reply (or unsolicited notice) to send first, for v1 clients:
        /// the position it names and its `recovered` field.
        notice: Option<(Position, Option<bool>)>,
        /// Stored messages to replay, oldest first.
        replay: Vec<Arc<Delivery>>,
        /// Whether the recovery asked for succeeded (false when none was asked for).
        recovered: bool,
        /// The subscription's position after the replay.
        position: Position,
        /// The replay is one page: more stored messages follow `position` (ask again from
        /// there once this page is written out).
        more: bool,
    },
}

/// Settles a subscription at `offset` in `epoch` (its last delivered message, or the one to
/// recover after) waiting for `h` as described by `pending`.
pub fn settle(offset: u64, epoch: Option<&str>, pending: &Pending, h: &History) -> Settled {
    let same_epoch = epoch == Some(&*h.epoch);
    if pending.checked.is_some() && !pending.restarted && same_epoch {
        // An epoch check (a position-only read) found the subscription's own epoch: the
        // delivery's epoch was foreign; nothing to replay, the position stands.
        return Settled::Done {
            notice: None,
            replay: Vec::new(),
            recovered: true,
            position: Position {
                offset,
                epoch: h.epoch.clone(),
            },
            more: false,
        };
    }
    if pending.recover && !pending.announce && !pending.restarted && epoch.is_some() && !same_epoch {
        return Settled::Restart {
            epoch: h.epoch.clone(),
            notify: offset > 0,
        };
    }
    let recovered = pending.recover && same_epoch && covers(offset, h);
    let top = Position {
        offset: h.top,
        epoch: h.epoch.clone(),
    };
    let notice = if pending.announce {
        Some((top.clone(), pending.recover.then_some(recovered)))
    } else if pending.recover && !recovered {
        // A gap that history cannot fill: tell the client, as on a failed resubscribe.
        Some((top.clone(), Some(false)))
    } else {
        None
    };
    let (replay, position) = if recovered {
        replay_after(offset, h)
    } else {
        (Vec::new(), top)
    };
    let more = recovered && position.offset < h.top;
    Settled::Done {
        notice,
        replay,
        recovered,
        position,
        more,
    }
}

/// Whether history `h` (of the subscription's epoch) continues from `offset`: it starts right
/// after it, or nothing came since.
/// Settles a quiet recovery (lost deliveries) of a subscription that has no position: it was
/// answered while the history could not be read, so which stored messages came after it is
/// unknown. `held` are the deliveries that arrived during the read, all of them after the
/// subscription: they are delivered, never covered by the notice. The subscription takes the
/// position just before the first of them in the history's epoch (or the newest, when none
/// is). Everything before that position may have been missed, so a v1 client is told
/// (`recovered: false`) unless that position is the start of the epoch (nothing to miss).
pub fn settle_unplaced(h: &History, held: &[Arc<Delivery>]) -> Settled {
    let first_held = held.iter().find_map(|d| d.offset_in(&h.epoch));
    let offset = first_held.map_or(h.top, |o| o.saturating_sub(1).min(h.top));
    let position = Position {
        offset,
        epoch: h.epoch.clone(),
    };
    Settled::Done {
        notice: (offset > 0).then(|| (position.clone(), Some(false))),
        replay: Vec::new(),
        recovered: offset == 0,
        position,
        more: false,
    }
}

fn covers(offset: u64, h: &History) -> bool {
    let first = h
        .entries
        .first()
        .and_then(|d| d.position.as_ref())
        .map(|p| p.offset);
    h.top >= offset && (h.top == offset || first == Some(offset + 1))
}

/// What history `h` holds after `offset`, and the position the subscription reaches once it is
/// replayed (`offset` itself when nothing follows).
fn replay_after(offset: u64, h: &History) -> (Vec<Arc<Delivery>>, Position) {
    let replay: Vec<Arc<Delivery>> = h
        .entries
        .iter()
        .filter(|d| d.offset_in(&h.epoch).is_some_and(|o| o > offset))
        .cloned()
        .collect();
    let last = replay
        .last()
        .and_then(|d| d.offset_in(&h.epoch))
        .unwrap_or(offset);
    let position = Position {
        offset: last,
        epoch: h.epoch.clone(),
    };
    (replay, position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Kind;
    use bytes::Bytes;

    /// A history answer as the brokers give it: the stored entries after the offset asked for.
    fn history(epoch: &str, top: u64, stored: std::ops::Range<u64>) -> History {
        let epoch: Arc<str> = Arc::from(epoch);
        let entries = stored
            .map(|o| {
                let position = Position {
                    offset: o,
                    epoch: epoch.clone(),
                };
                Delivery::new(
                    Arc::from("c"),
                    Kind::Text,
                    Bytes::from(o.to_string()),
                    Some(position),
                )
            })
            .collect();
        History { epoch, top, entries }
    }

    /// (notice offset and `recovered`, replayed offsets, recovered, new offset)
    type Summary = (Option<(u64, Option<bool>)>, Vec<u64>, bool, u64);

    fn done(s: Settled) -> Summary {
        match s {
            Settled::Done {
                notice,
                replay,
                recovered,
                position,
                ..
            } => (
                notice.map(|(p, r)| (p.offset, r)),
                replay
                    .iter()
                    .map(|d| d.position.as_ref().unwrap().offset)
                    .collect(),
                recovered,
                position.offset,
            ),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn subscribe(recover: bool) -> Pending {
        Pending {
            announce: true,
            recover,
            ..Pending::default()
        }
    }

    #[test]
    fn a_fresh_subscription_starts_at_the_top_without_recovered() {
        let h = history("e", 7, 0..0);
        assert_eq!(
            done(settle(0, None, &subscribe(false), &h)),
            (Some((7, None)), vec![], false, 7)
        );
    }

    #[test]
    fn recovery_replays_exactly_what_follows_the_offset() {
        let h = history("e", 9, 6..10);
        assert_eq!(
            done(settle(5, Some("e"), &subscribe(true), &h)),
            (Some((9, Some(true))), vec![6, 7, 8, 9], true, 9)
        );
        // Nothing published since: recovered, nothing to replay.
        let h = history("e", 5, 0..0);
        assert_eq!(
            done(settle(5, Some("e"), &subscribe(true), &h)),
            (Some((5, Some(true))), vec![], true, 5)
        );
    }

    #[test]
    fn trimmed_or_foreign_epochs_are_not_recovered() {
        let trimmed = history("e", 9, 8..10);
        assert_eq!(
            done(settle(5, Some("e"), &subscribe(true), &trimmed)),
            (Some((9, Some(false))), vec![], false, 9)
        );
        let other = history("f", 9, 6..10);
        assert_eq!(
            done(settle(5, Some("e"), &subscribe(true), &other)),
            (Some((9, Some(false))), vec![], false, 9)
        );
        // A position beyond the history (the client came from another history).
        let behind = history("e", 3, 0..0);
        assert_eq!(
            done(settle(5, Some("e"), &subscribe(true), &behind)),
            (Some((3, Some(false))), vec![], false, 3)
        );
        // An unknown epoch (position never learned) cannot be recovered.
        let h = history("e", 3, 1..4);
        assert_eq!(
            done(settle(0, None, &subscribe(true), &h)),
            (Some((3, Some(false))), vec![], false, 3)
        );
    }

    #[test]
    fn quiet_recoveries_speak_only_on_failure() {
        let h = history("e", 9, 7..10);
        assert_eq!(
            done(settle(6, Some("e"), &Pending::quiet(), &h)),
            (None, vec![7, 8, 9], true, 9)
        );
        let trimmed = history("e", 9, 8..10);
        assert_eq!(
            done(settle(6, Some("e"), &Pending::quiet(), &trimmed)),
            (Some((9, Some(false))), vec![], false, 9)
        );
    }

    #[test]
    fn a_subscription_without_a_position_keeps_what_arrived_during_its_recovery() {
        // Published after the read was asked for, before it ran: held, and delivered after a
        // notice that covers only what came before it.
        let h = history("e", 5, 1..6);
        let held = history("e", 5, 4..6).entries;
        assert_eq!(
            done(settle_unplaced(&h, &held)),
            (Some((3, Some(false))), vec![], false, 3)
        );
        // The first message of the epoch held: nothing before it to miss, no notice.
        let h = history("e", 2, 1..3);
        let held = history("e", 2, 1..3).entries;
        assert_eq!(done(settle_unplaced(&h, &held)), (None, vec![], true, 0));
        // Nothing held: everything stored may have been missed.
        assert_eq!(
            done(settle_unplaced(&h, &[])),
            (Some((2, Some(false))), vec![], false, 2)
        );
        let empty = history("e", 0, 0..0);
        assert_eq!(done(settle_unplaced(&empty, &[])), (None, vec![], true, 0));
        // Held deliveries of another epoch do not place it.
        let other = history("f", 5, 4..6).entries;
        assert_eq!(
            done(settle_unplaced(&history("e", 2, 1..3), &other)),
            (Some((2, Some(false))), vec![], false, 2)
        );
    }

    #[test]
    fn a_restarted_history_is_read_again_from_its_start_once() {
        let h = history("new", 2, 1..3);
        assert!(matches!(
            settle(6, Some("old"), &Pending::check(Arc::from("new")), &h),
            Settled::Restart { epoch, notify: true } if &*epoch == "new"
        ));
        // A live subscription that had nothing yet (offset 0) misses nothing: no notice.
        assert!(matches!(
            settle(0, Some("old"), &Pending::check(Arc::from("new")), &h),
            Settled::Restart { notify: false, .. }
        ));
        // The second read, from the new epoch's start, replays it.
        let again = Pending {
            restarted: true,
            ..Pending::check(Arc::from("new"))
        };
        assert_eq!(
            done(settle(0, Some("new"), &again, &h)),
            (None, vec![1, 2], true, 2)
        );
        // If it changed yet again meanwhile, it is settled, not read a third time.
        let third = history("newer", 4, 1..5);
        assert_eq!(
            done(settle(0, Some("new"), &again, &third)),
            (Some((4, Some(false))), vec![], false, 4)
        );
    }

    #[test]
    fn an_epoch_check_that_finds_the_known_epoch_changes_nothing() {
        // The delivery's epoch was foreign: the history is still the subscription's. The read
        // was for the position only, so newer messages are not replayed here: they are held
        // live deliveries, released in order after it.
        let h = history("e", 9, 0..0);
        assert_eq!(
            done(settle(6, Some("e"), &Pending::check(Arc::from("x")), &h)),
            (None, vec![], true, 6)
        );
    }

    #[test]
    fn a_replay_comes_in_pages() {
        // The broker answered a page: 6..=9 of a history that goes on to 20.
        let h = history("e", 20, 6..10);
        match settle(5, Some("e"), &subscribe(true), &h) {
            Settled::Done {
                notice,
                recovered,
                position,
                more,
                ..
            } => {
                assert_eq!(notice.map(|(p, r)| (p.offset, r)), Some((20, Some(true))));
                assert!(recovered && more);
                assert_eq!(position.offset, 9);
            }
            other => panic!("{other:?}"),
        }
        // The next page continues quietly; the last one ends the paging.
        let next = history("e", 20, 10..21);
        match settle(9, Some("e"), &Pending::quiet(), &next) {
            Settled::Done {
                notice,
                more,
                position,
                ..
            } => {
                assert!(notice.is_none() && !more);
                assert_eq!(position.offset, 20);
            }
            other => panic!("{other:?}"),
        }
        // Pages are cut by bytes too, keeping at least one message.
        let big: Vec<Arc<Delivery>> = (1..=10)
            .map(|o| {
                let position = Position {
                    offset: o,
                    epoch: Arc::from("e"),
                };
                Delivery::new(
                    Arc::from("c"),
                    Kind::Binary,
                    Bytes::from(vec![0; PAGE_BYTES / 3]),
                    Some(position),
                )
            })
            .collect();
        let paged = page(History {
            epoch: Arc::from("e"),
            top: 10,
            entries: big.clone(),
        });
        assert_eq!(paged.entries.len(), 3);
        let huge = Delivery::new(
            Arc::from("c"),
            Kind::Binary,
            Bytes::from(vec![0; PAGE_BYTES * 2]),
            None,
        );
        let one = page(History {
            epoch: Arc::from("e"),
            top: 10,
            entries: vec![huge.clone(), huge],
        });
        assert_eq!(one.entries.len(), 1);
        // Reading the newest, the oldest are cut.
        let newest = page_newest(History {
            epoch: Arc::from("e"),
            top: 10,
            entries: big,
        });
        let offsets: Vec<u64> = newest
            .entries
            .iter()
            .map(|d| d.position.as_ref().unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![8, 9, 10]);
    }
}
