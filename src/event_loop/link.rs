//! The loop's link to the broker: the inbox it is woken for (deliveries, confirmations,
//! replies) and the queues it sends on (publishes, subscription changes, storage requests,
//! work for all nodes). Nothing here blocks: a full publish or request queue hands the item
//! back to the caller, who decides (pause the publisher, answer `unavailable`); subscription
//! changes and presence changes must not be lost or reordered, so what does not fit waits
//! here, in order, and goes out next turn. Owns no connection.

use std::collections::VecDeque;

use crossbeam_channel::{Sender, TrySendError};

use crate::bridge::{BrokerHandle, Control, LoopInbox, NodeWork, Publish, Request, ToLoop};

/// See the module documentation.
pub(super) struct Link {
    broker: BrokerHandle,
    inbox: LoopInbox,
    /// Subscription changes not sent yet, in order.
    control: VecDeque<Control>,
    /// Presence changes not sent yet, in order.
    nodes: VecDeque<NodeWork>,
}

impl Link {
    pub(super) fn new(broker: BrokerHandle, inbox: LoopInbox) -> Self {
        Link {
            broker,
            inbox,
            control: VecDeque::new(),
            nodes: VecDeque::new(),
        }
    }

    /// Called on a wake, before draining: a message sent after this wakes the loop again.
    pub(super) fn rearm(&self) {
        self.inbox.rearm();
    }

    /// The next message from the broker, if any (wakes merge: drain until `None`).
    pub(super) fn next(&self) -> Option<ToLoop> {
        self.inbox.try_recv()
    }

    /// Queues a publish; a full queue (in messages or bytes) hands it back (unboxed: see
    /// `BrokerHandle::try_publish`).
    #[allow(clippy::result_large_err)]
    pub(super) fn publish(&self, p: Publish) -> Result<(), TrySendError<Publish>> {
        self.broker.try_publish(p)
    }

    /// Whether a publish of `n` bytes would find the queue full now.
    pub(super) fn publish_full(&self, n: usize) -> bool {
        self.broker.publish_full(n)
    }

    /// Queues a storage request, unless the queue is full.
    pub(super) fn request(&self, r: Request) -> Result<(), QueueFull> {
        self.broker.requests.try_send(r).map_err(|_| QueueFull)
    }

    /// Sends work for all nodes that has an answer (the caller answers a refusal).
    pub(super) fn ask_nodes(&self, w: NodeWork) -> Result<(), NodeWork> {
        self.broker.nodes.try_send(w).map_err(TrySendError::into_inner)
    }

    /// Queues a subscription change: sent in order, never dropped.
    pub(super) fn subscription(&mut self, c: Control) {
        self.control.push_back(c);
    }

    /// Queues a presence change: sent in order, never dropped.
    pub(super) fn presence(&mut self, w: NodeWork) {
        self.nodes.push_back(w);
    }

    /// Sends what is queued, in order, until a queue is full.
    pub(super) fn send_queued(&mut self) {
        send_in_order(&mut self.control, &self.broker.control);
        send_in_order(&mut self.nodes, &self.broker.nodes);
    }

    /// True while changes wait for room (the loop then polls again soon).
    pub(super) fn has_queued(&self) -> bool {
        !self.control.is_empty() || !self.nodes.is_empty()
    }
}

/// Sends `queue` in order until `tx` is full; a disconnected broker (shutting down) takes the
/// rest away.
fn send_in_order<T>(queue: &mut VecDeque<T>, tx: &Sender<T>) {
    while let Some(c) = queue.pop_front() {
        match tx.try_send(c) {
            Ok(()) => {}
            Err(TrySendError::Full(c)) => {
                queue.push_front(c);
                return;
            }
            Err(TrySendError::Disconnected(_)) => {
                queue.clear();
                return;
            }
        }
    }
}

/// A request was not queued: the broker's request queue is full.
#[derive(Debug)]
pub(super) struct QueueFull;
