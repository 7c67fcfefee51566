//! The messages that cross threads, and the handles that carry them. Loops never share state
//! with each other or with the broker: they talk only through these bounded crossbeam queues,
//! and a loop blocked in `poll` is woken by its `mio::Waker`.
//!
//! Direction loop → broker: [`Publish`] (a client's message), [`Control`] (subscribe and
//! unsubscribe), [`Request`] (history and session storage) and [`NodeWork`] (presence, the
//! nodes, the server API), through a [`BrokerHandle`].
//! Direction broker → loop: [`ToLoop`] (deliveries, events, server API commands,
//! confirmations, replies) through a [`LoopHandle`]. Wakes merge: a sender only calls `wake()` when no wake is already pending, and
//! the loop clears the flag before it drains its inbox with `try_recv`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

pub use crate::channels::Channel;
use crate::frame::{self, Kind};
pub use crate::position::Position;

/// A message on its way to clients, decoded and framed once, shared by all loops through `Arc`.
#[derive(Debug)]
pub struct Delivery {
    /// Channel name, without the Redis prefix.
    pub channel: Channel,
    /// Frame type the publisher used.
    pub kind: Kind,
    /// The payload exactly as published: the tail of `raw_frame`, so a message is held once.
    pub data: Bytes,
    /// Offset and epoch when the channel keeps history.
    pub position: Option<Position>,
    /// The complete WebSocket frame raw-protocol clients receive.
    pub raw_frame: Bytes,
    /// The `wsrelay.v1` message frame, encoded by the first loop that needs it.
    envelope: OnceLock<Bytes>,
    /// The same without offset and epoch, for a position foreign to the channel's history.
    plain_envelope: OnceLock<Bytes>,
}

impl Delivery {
    /// Builds a delivery, encoding the raw frame once. The payload it keeps is the frame's own
    /// (the one given is dropped): a message waiting in inboxes, output buffers or history
    /// costs its frame, not its frame and a second copy of its payload.
    pub fn new(channel: Channel, kind: Kind, data: Bytes, position: Option<Position>) -> Arc<Self> {
        let raw_frame = frame::encode(kind, &data);
        let data = raw_frame.slice(raw_frame.len() - data.len()..);
        Arc::new(Delivery {
            channel,
            kind,
            data,
            position,
            raw_frame,
            envelope: OnceLock::new(),
            plain_envelope: OnceLock::new(),
        })
    }

    /// A copy for a history store: the same payload and frame (shared, not copied), without
    /// the envelopes cached for live delivery, so a stored message costs its payload and frame
    /// only (an escaped v1 envelope can be six times the payload).
    pub fn stored_copy(&self) -> Arc<Self> {
        Arc::new(Delivery {
            channel: self.channel.clone(),
            kind: self.kind,
            data: self.data.clone(),
            position: self.position.clone(),
            raw_frame: self.raw_frame.clone(),
            envelope: OnceLock::new(),
            plain_envelope: OnceLock::new(),
        })
    }

    /// The `wsrelay.v1` frame without caching it: for replays of stored messages, which would
    /// otherwise keep an envelope per stored message for as long as the history.
    pub fn envelope_frame_uncached(&self) -> Bytes {
        match self.envelope.get() {
            Some(f) => f.clone(),
            None => frame::text(&crate::envelope::message(
                &self.channel,
                self.position.as_ref(),
                self.kind,
                &self.data,
            )),
        }
    }

    /// The frame `wsrelay.v1` clients receive: encoded once, shared by every such recipient.
    pub fn envelope_frame(&self) -> &Bytes {
        self.envelope.get_or_init(|| {
            frame::text(&crate::envelope::message(
                &self.channel,
                self.position.as_ref(),
                self.kind,
                &self.data,
            ))
        })
    }

    /// The frame `wsrelay.v1` clients receive when the message's position is not one of the
    /// channel's (a foreign header): the message without offset and epoch.
    pub fn plain_envelope_frame(&self) -> &Bytes {
        self.plain_envelope.get_or_init(|| {
            frame::text(&crate::envelope::message(
                &self.channel,
                None,
                self.kind,
                &self.data,
            ))
        })
    }

    /// Bytes a delivery waiting in a loop's inbox holds: its raw frame, which holds the payload
    /// (the `--loop-queue-bytes` measure; the same for the whole wait, so it is given back
    /// exactly).
    pub fn queued_bytes(&self) -> usize {
        self.raw_frame.len()
    }

    /// The offset if this message has one in `epoch`.
    pub fn offset_in(&self, epoch: &str) -> Option<u64> {
        self.position
            .as_ref()
            .filter(|p| &*p.epoch == epoch)
            .map(|p| p.offset)
    }
}

/// One connection of one loop. The slab key is reused after a connection ends; the serial is
/// not, so a late reply never reaches the wrong connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    /// Slab key in its loop.
    pub key: usize,
    /// Unique per loop for the process's lifetime.
    pub serial: u64,
}

/// Where a broker reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The loop.
    pub loop_id: usize,
    /// The connection in it.
    pub conn: ConnId,
}

/// A `wsrelay.v1` publish waiting for its acknowledgement.
#[derive(Clone, Debug)]
pub struct PublishAck {
    /// Who asked.
    pub to: ReplyTo,
    /// The command's `ref`, as JSON text, echoed in the reply.
    pub reference: Option<Box<str>>,
}

/// A channel's stored messages, as read for a (re)subscription.
#[derive(Debug)]
pub struct History {
    /// The history's epoch (created on first use).
    pub epoch: Arc<str>,
    /// Offset of the newest message (0 if none).
    pub top: u64,
    /// Stored messages after the requested offset, oldest first (empty when none was asked).
    pub entries: Vec<Arc<Delivery>>,
}

/// A session as stored: who owns it and where each of its subscriptions stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionState {
    /// Token subject the session belongs to, when tokens are in use.
    pub subject: Option<String>,
    /// Subscribed channels with the last delivered offset and its epoch (`None`: not known
    /// yet).
    pub channels: Vec<(Channel, u64, Option<Arc<str>>)>,
}

/// A session whose subscription to a channel starts at the channel's current position: the
/// broker writes that position into the session as it reads it, so the position is stored
/// before anyone can see it (a node dying right after the `subscribed` reply loses nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session id (the storage key).
    pub id: Arc<str>,
    /// Token subject the session belongs to.
    pub subject: Option<String>,
}

/// A history read a client asked for (the v1 `history` command, `GET /history`), not for a
/// subscription: echoed in [`Reply::History`] so the answer finds its way back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    /// The command's `ref` (v1), echoed in the reply.
    pub reference: Option<Box<str>>,
    /// Most messages to return (at most `recovery::PAGE_ENTRIES`); 0 for the position only.
    pub limit: usize,
    /// The messages after this position (offset, epoch); `None`: the newest `limit`.
    pub since: Option<(u64, Arc<str>)>,
}

/// Request/response work for the broker (storage reads and writes), answered through
/// [`ToLoop::Reply`] where a reply is due.
#[derive(Debug)]
pub enum Request {
    /// The channel's position, and its stored messages after `since` if given (or, for a
    /// [`HistoryQuery`] without a position, its newest messages).
    History {
        /// The channel.
        channel: Channel,
        /// Return messages with offsets above this.
        since: Option<u64>,
        /// Write the position read into this session (for a subscription starting now).
        record: Option<SessionRecord>,
        /// Who subscribes (a read can create the channel's history).
        origin: Option<Origin>,
        /// Set when a client asked to read history, not to subscribe.
        query: Option<Box<HistoryQuery>>,
        /// The asking loop's number for this read, echoed in the reply: a subscription takes
        /// only the answer to the read it is waiting for (0 for a client's read).
        read: u64,
        /// Who asked.
        to: ReplyTo,
    },
    /// Read a session.
    LoadSession {
        /// Session id.
        id: Arc<str>,
        /// Who asked.
        to: ReplyTo,
    },
    /// Replace a session's stored state and restart its time to live; a channel whose
    /// position is unknown (no epoch) keeps the position stored for it, if any. No reply.
    SaveSession {
        /// Session id.
        id: Arc<str>,
        /// The whole state.
        state: SessionState,
    },
    /// Answered with [`ToLoop::Barrier`] once every request sent before it has been carried
    /// out (requests are handled one at a time, in order): a session saved before it is
    /// stored. A draining node closes a client only after this, so the client cannot resume
    /// elsewhere from an older copy of its session.
    Barrier {
        /// Who asked.
        to: ReplyTo,
    },
}

/// Why a publish was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The broker could not be reached: the message went to this node's clients only.
    Unreachable,
    /// Sent but not answered (a stalled Redis): it may still be stored and delivered.
    Unknown(String),
    /// The broker answered with an error (Redis out of memory, read-only, a key of the wrong
    /// type): nothing was stored and nothing delivered.
    Refused(String),
}

impl PublishError {
    /// The `wsrelay.v1` error code.
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Unreachable | PublishError::Unknown(_) => "unavailable",
            PublishError::Refused(_) => "refused",
        }
    }

    /// What the client is told.
    pub fn message(&self) -> String {
        match self {
            PublishError::Unreachable => "redis unreachable: delivered to this node's clients only".into(),
            PublishError::Unknown(e) => {
                format!("redis did not answer ({e}); the message may or may not be delivered")
            }
            PublishError::Refused(e) => format!("redis refused the write: {e}"),
        }
    }

    /// True when the broker refused for lack of memory (HTTP 507 rather than 503).
    pub fn out_of_memory(&self) -> bool {
        matches!(self, PublishError::Refused(e) if e.starts_with("OOM"))
    }
}

/// A channel's presence as read: every entry (a `presence` read) or only counts
/// (`presence_stats`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PresenceAnswer {
    /// Subscriptions listed.
    pub clients: u64,
    /// Distinct users among them (token subjects; clients without one count once each).
    pub users: u64,
    /// The entries as JSON objects (`presence::encode`), for a `presence` read.
    pub entries: Vec<Box<str>>,
}

/// One node as the server API's `info` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id (random, chosen at start; client ids start with it).
    pub id: String,
    /// wsrelay's version.
    pub version: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Channels with local subscribers.
    pub channels: u64,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
}

/// Active channels across the nodes, as the server API's `channels` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    /// (channel, subscribers on every node together), most subscribers first, at most the
    /// limit asked for.
    pub channels: Vec<(String, u64)>,
    /// How many channels there were before the limit.
    pub total: usize,
}

/// A command for every node, from the server API: sent through Redis (the control channel)
/// or, in-process, straight to every loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admin {
    /// Close every connection of `user` (token subject) with `code` and `reason`.
    Disconnect {
        /// The token subject.
        user: String,
        /// WebSocket close code.
        code: u16,
        /// Close reason (at most 123 bytes of UTF-8).
        reason: String,
    },
    /// End every subscription of `user` to `channel`.
    Unsubscribe {
        /// The token subject.
        user: String,
        /// The channel.
        channel: String,
    },
}

impl Admin {
    /// Whether it may be carried out: a close code a server may send (1000, 1001, 1008,
    /// 3000-4999) and a reason that fits a close frame (123 bytes).
    pub fn valid(&self) -> bool {
        match self {
            Admin::Disconnect { code, reason, .. } => {
                matches!(code, 1000 | 1001 | 1008 | 3000..=4999) && reason.len() <= 123
            }
            Admin::Unsubscribe { .. } => true,
        }
    }
}

/// Work about all the nodes as a whole, handled off the loops: presence (this node's entries
/// and reads), the registry of nodes, and the server API's reads and commands.
#[derive(Debug)]
pub enum NodeWork {
    /// A `wsrelay.v1` subscription entered `channel`'s presence with `entry`. No reply.
    Join {
        /// The channel.
        channel: Channel,
        /// The subscribing connection's client id.
        client: Arc<str>,
        /// Its entry, as JSON (`presence::encode`).
        entry: Arc<str>,
    },
    /// It left. No reply.
    Leave {
        /// The channel.
        channel: Channel,
        /// The client id.
        client: Arc<str>,
    },
    /// Read a channel's presence: answered with [`Reply::Presence`].
    Presence {
        /// The channel.
        channel: Channel,
        /// Counts only (`presence_stats`).
        stats: bool,
        /// The command's `ref`.
        reference: Option<Box<str>>,
        /// Who asked.
        to: ReplyTo,
    },
    /// A loop's channels and how many of its connections are on each (sent while the server
    /// API is on, when they changed). No reply.
    LoopChannels {
        /// Which loop.
        loop_id: usize,
        /// Its channels with their member counts.
        channels: Vec<(Channel, u32)>,
    },
    /// The live nodes: answered with [`Reply::Nodes`].
    Nodes {
        /// Who asked.
        to: ReplyTo,
    },
    /// The active channels across nodes: answered with [`Reply::Channels`].
    Channels {
        /// Most channels to list.
        limit: usize,
        /// Who asked.
        to: ReplyTo,
    },
    /// Carry out `admin` on every node: answered with [`Reply::AdminSent`].
    Admin {
        /// The command.
        admin: Admin,
        /// Who asked.
        to: ReplyTo,
    },
}

/// An answer to a [`Request`] or an acknowledged [`Publish`].
#[derive(Debug)]
pub enum Reply {
    /// Answer to [`Request::History`].
    History {
        /// The channel asked about.
        channel: Channel,
        /// The history, or why it could not be read.
        result: Result<History, String>,
        /// The client's read, when it was one (not a subscription's).
        query: Option<Box<HistoryQuery>>,
        /// The request's `read`.
        read: u64,
    },
    /// Answer to [`NodeWork::Presence`].
    Presence {
        /// The channel.
        channel: Channel,
        /// Counts only.
        stats: bool,
        /// The command's `ref`.
        reference: Option<Box<str>>,
        /// The presence, or why it could not be read.
        result: Result<PresenceAnswer, String>,
    },
    /// Answer to [`NodeWork::Nodes`].
    Nodes(Result<Vec<NodeInfo>, String>),
    /// Answer to [`NodeWork::Channels`].
    Channels(Result<ChannelCounts, String>),
    /// Answer to [`NodeWork::Admin`]: how many nodes received the command.
    AdminSent(Result<u64, String>),
    /// Answer to [`Request::LoadSession`]: `None` when no such session is stored.
    Session(Result<Option<SessionState>, String>),
    /// Acknowledgement of a publish.
    Published {
        /// The channel published to.
        channel: Channel,
        /// The command's `ref`.
        reference: Option<Box<str>>,
        /// The message's position (when the channel keeps history), or why it failed.
        result: Result<Option<Position>, PublishError>,
    },
}

/// A frame for the `wsrelay.v1` subscribers of a channel only (a `join` or `leave` event),
/// encoded once; raw clients never see it, and it has no offset.
#[derive(Debug)]
pub struct Event {
    /// The channel.
    pub channel: Channel,
    /// The complete text frame.
    pub frame: Bytes,
}

/// What the broker sends a loop.
#[derive(Debug)]
pub enum ToLoop {
    /// Deliver to every local member of the channel.
    Deliver(Arc<Delivery>),
    /// Send to every live `wsrelay.v1` subscription of the channel.
    Event(Arc<Event>),
    /// A server API command for every node.
    Admin(Arc<Admin>),
    /// The loop's subscription `generation` to `channel` is in effect upstream: anything
    /// published from now on reaches this loop.
    Live {
        /// The channel.
        channel: Channel,
        /// The generation from the matching [`Control::Subscribe`].
        generation: u64,
        /// Confirmed while the Redis subscriber connection is down (so that local delivery
        /// goes on): in effect upstream only once that connection is back, which the loop
        /// learns from the [`ToLoop::Lost`] that follows every reconnect.
        offline: bool,
    },
    /// Deliveries on `channel` were dropped on their way to this loop (its inbox was full, or
    /// the Redis subscriber was reconnecting): connections that track offsets re-read history.
    Lost {
        /// The channel.
        channel: Channel,
    },
    /// The answer to [`Request::Barrier`]: what connection `conn` asked to store is stored.
    Barrier {
        /// The connection.
        conn: ConnId,
    },
    /// A reply for one connection.
    Reply {
        /// The connection.
        conn: ConnId,
        /// The answer.
        reply: Reply,
    },
}

/// Who a publish or a subscription comes from, so that bounded stores can be shared fairly
/// (one client flooding new channels evicts its own first): `sub:` and the token subject when
/// the client has one, else `ip:` and its address (an IPv6 client by its /64), `api` for
/// `POST /publish`.
pub type Origin = Arc<str>;

/// A client's message on its way to the broker.
#[derive(Debug)]
pub struct Publish {
    /// Who published it.
    pub origin: Option<Origin>,
    /// Target channel, without prefix.
    pub channel: Channel,
    /// Frame type, kept end to end.
    pub kind: Kind,
    /// Payload.
    pub data: Bytes,
    /// Where to acknowledge, for `wsrelay.v1` publishes.
    pub ack: Option<PublishAck>,
    /// Numbered by the Redis publisher as it takes the publish (0 until then): with the
    /// publisher's random id, the tag that tells a retry after a lost connection whether the
    /// publish ran before it was lost (`publish.lua`).
    pub seq: u64,
}

/// Subscription changes from a loop. Sent only on a channel's first join and last leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The loop's first local member joined `channel`.
    Subscribe {
        /// The channel.
        channel: Channel,
        /// Which loop.
        loop_id: usize,
        /// Echoed back in [`ToLoop::Live`].
        generation: u64,
    },
    /// The loop's last local member left `channel`.
    Unsubscribe {
        /// The channel.
        channel: Channel,
        /// Which loop.
        loop_id: usize,
    },
}

/// The publish queue's bound in bytes: payload bytes queued by the loops and not yet taken by
/// the broker, shared by both sides. The queue's capacity in messages bounds the count; this
/// bounds the memory whatever the message size.
#[derive(Clone, Debug)]
pub struct PublishQueue {
    bytes: Arc<AtomicUsize>,
    cap: usize,
}

impl PublishQueue {
    /// A queue accounting of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        PublishQueue {
            bytes: Arc::new(AtomicUsize::new(0)),
            cap,
        }
    }

    /// Reserves room for `n` bytes. Refused when that would pass the cap, unless the queue is
    /// empty (so one message larger than the cap still passes).
    fn reserve(&self, n: usize) -> bool {
        let before = self.bytes.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.cap {
            self.bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back the room of a publish the broker took off the queue (or that was not queued).
    pub fn taken(&self, p: Publish) -> Publish {
        self.bytes.fetch_sub(p.data.len(), Ordering::AcqRel);
        p
    }

    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// The loops' side of the broker, whichever broker it is.
#[derive(Clone, Debug)]
pub struct BrokerHandle {
    /// Bounded in messages and (with `queued`) in bytes: a full queue pauses the publisher's
    /// reads, never blocks a loop. Send through [`BrokerHandle::try_publish`].
    pub publish: Sender<Publish>,
    /// The publish queue's byte accounting.
    pub queued: PublishQueue,
    /// Bounded; a loop that finds it full keeps the request and retries next turn.
    pub control: Sender<Control>,
    /// Bounded; a full queue fails the request (the client is told `unavailable`).
    pub requests: Sender<Request>,
    /// Bounded; presence changes that find it full wait in the loop and are sent again,
    /// reads fail (`unavailable`).
    pub nodes: Sender<NodeWork>,
}

impl BrokerHandle {
    /// Queues a publish without blocking. A full queue (in messages or in bytes) hands the
    /// publish back.
    // The error hands the publish itself back (to be kept while the connection is paused):
    // boxing it would allocate on every refusal to save a copy of 128 bytes.
    #[allow(clippy::result_large_err)]
    pub fn try_publish(&self, p: Publish) -> Result<(), TrySendError<Publish>> {
        if !self.queued.reserve(p.data.len()) {
            return Err(TrySendError::Full(p));
        }
        self.publish.try_send(p).map_err(|e| match e {
            TrySendError::Full(p) => TrySendError::Full(self.queued.taken(p)),
            TrySendError::Disconnected(p) => TrySendError::Disconnected(self.queued.taken(p)),
        })
    }

    /// True when a publish of `n` bytes would find the queue full now.
    pub fn publish_full(&self, n: usize) -> bool {
        let q = self.queued.bytes();
        self.publish.is_full() || (q > 0 && q + n > self.queued.cap)
    }
}

/// The broker's side of the loops' queues, handed to whichever broker runs.
#[derive(Debug)]
pub struct BrokerInbox {
    /// Client publishes; hand each one to `queued.taken` when taking it off the queue.
    pub publish: Receiver<Publish>,
    /// The publish queue's byte accounting.
    pub queued: PublishQueue,
    /// Subscription changes.
    pub control: Receiver<Control>,
    /// Storage requests.
    pub requests: Receiver<Request>,
    /// Presence, nodes and server API work.
    pub nodes: Receiver<NodeWork>,
}

/// Creates the queues between the loops and a broker: at most `publish_cap` publishes of
/// `publish_bytes` payload bytes in all.
pub fn broker_queues(
    publish_cap: usize,
    publish_bytes: usize,
    control_cap: usize,
) -> (BrokerHandle, BrokerInbox) {
    let queued = PublishQueue::new(publish_bytes);
    let (ptx, prx) = crossbeam_channel::bounded(publish_cap);
    let (ctx, crx) = crossbeam_channel::bounded(control_cap);
    // Requests are one per subscription or session change: the publish bound fits them too.
    let (rtx, rrx) = crossbeam_channel::bounded(publish_cap);
    // One presence change per subscription and leave, like control requests.
    let (xtx, xrx) = crossbeam_channel::bounded(control_cap);
    (
        BrokerHandle {
            publish: ptx,
            queued: queued.clone(),
            control: ctx,
            requests: rtx,
            nodes: xtx,
        },
        BrokerInbox {
            publish: prx,
            queued,
            control: crx,
            requests: rrx,
            nodes: xrx,
        },
    )
}

/// How other threads reach one loop: its inbox and its waker.
#[derive(Clone, Debug)]
pub struct LoopHandle {
    /// Index of the loop, 0-based.
    pub id: usize,
    tx: Sender<ToLoop>,
    /// Bytes of the deliveries in the inbox (see [`Delivery::queued_bytes`]).
    bytes: Arc<AtomicUsize>,
    /// Most bytes of deliveries the inbox takes (`--loop-queue-bytes`).
    cap_bytes: usize,
    waker: Arc<mio::Waker>,
    wake_pending: Arc<AtomicBool>,
}

/// The loop's end of its inbox.
#[derive(Debug)]
pub struct LoopInbox {
    rx: Receiver<ToLoop>,
    bytes: Arc<AtomicUsize>,
    wake_pending: Arc<AtomicBool>,
}

/// Creates a loop's inbox of `cap` messages, at most `cap_bytes` of them deliveries (by
/// [`Delivery::queued_bytes`]), woken through `waker`.
pub fn loop_queue(
    id: usize,
    cap: usize,
    cap_bytes: usize,
    waker: Arc<mio::Waker>,
) -> (LoopHandle, LoopInbox) {
    let (tx, rx) = crossbeam_channel::bounded(cap);
    let wake_pending = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        LoopHandle {
            id,
            tx,
            bytes: bytes.clone(),
            cap_bytes,
            waker,
            wake_pending: wake_pending.clone(),
        },
        LoopInbox {
            rx,
            bytes,
            wake_pending,
        },
    )
}

impl LoopHandle {
    /// Queues `msg` without blocking and wakes the loop. A full inbox (in messages, or in
    /// bytes for a delivery) hands the message back.
    pub fn try_send(&self, msg: ToLoop) -> Result<(), ToLoop> {
        let n = match &msg {
            ToLoop::Deliver(d) => d.queued_bytes(),
            _ => 0,
        };
        if n > 0 {
            // Refused past the cap, unless the inbox holds no delivery (so one message larger
            // than the cap still passes).
            let before = self.bytes.fetch_add(n, Ordering::AcqRel);
            if before > 0 && before + n > self.cap_bytes {
                self.bytes.fetch_sub(n, Ordering::AcqRel);
                return Err(msg);
            }
        }
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => {
                self.bytes.fetch_sub(n, Ordering::AcqRel);
                Err(m)
            }
        }
    }

    /// Wakes the loop unless a wake is already on its way.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the loop's poll is gone, i.e. the loop has exited.
            let _ = self.waker.wake();
        }
    }
}

impl LoopInbox {
    /// Called on a wake event, before draining: a message sent after this point wakes again.
    pub fn rearm(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Next queued message, if any.
    pub fn try_recv(&self) -> Option<ToLoop> {
        let msg = self.rx.try_recv().ok()?;
        if let ToLoop::Deliver(d) = &msg {
            self.bytes.fetch_sub(d.queued_bytes(), Ordering::AcqRel);
        }
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_merge_until_rearmed() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (h, inbox) = loop_queue(0, 2, usize::MAX, waker);
        let live = |g| ToLoop::Live {
            channel: Arc::from("c"),
            generation: g,
            offline: false,
        };
        h.try_send(live(1)).unwrap();
        assert!(h.wake_pending.load(Ordering::Acquire));
        h.try_send(live(2)).unwrap();
        // Bounded: the third is handed back.
        assert!(matches!(
            h.try_send(live(3)),
            Err(ToLoop::Live { generation: 3, .. })
        ));
        inbox.rearm();
        assert!(inbox.try_recv().is_some());
        assert!(inbox.try_recv().is_some());
        assert!(inbox.try_recv().is_none());
        assert!(!h.wake_pending.load(Ordering::Acquire));
    }

    #[test]
    fn deliveries_are_bounded_in_bytes_too() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let d = |n| {
            let data = Bytes::from(vec![b'x'; n]);
            ToLoop::Deliver(Delivery::new(Arc::from("c"), Kind::Binary, data, None))
        };
        // 1,000 bytes of payload in a frame with a 4-byte header.
        let (h, inbox) = loop_queue(0, 100, 1500, waker);
        h.try_send(d(1000)).unwrap();
        assert_eq!(h.bytes.load(Ordering::Acquire), 1004);
        assert!(h.try_send(d(1000)).is_err(), "over the byte cap");
        // Other messages are bounded by count only.
        h.try_send(ToLoop::Lost {
            channel: Arc::from("c"),
        })
        .unwrap();
        assert!(inbox.try_recv().is_some());
        assert_eq!(h.bytes.load(Ordering::Acquire), 0);
        // An empty inbox takes one delivery larger than the cap.
        h.try_send(d(5000)).unwrap();
        assert!(h.try_send(d(1)).is_err());
    }
}
