//! One client connection: its socket, its unsent output, and the phase of its life.
//!
//! ```text
//!  accept ──▶ Request(head bytes) ──upgrade──▶ Open(WebSocket) ──close──▶ Closing ──▶ dropped
//!                   │                                                       ▲
//!                   └──────── plain HTTP answered / bad request ───────────┘
//! ```
//!
//! tungstenite parses incoming frames and writes its automatic replies (pong, close) through
//! [`Io`], whose write side only appends to the connection's [`OutBuf`] and never blocks. Data
//! frames to clients are pre-encoded once per message (`frame.rs`) and queued here by
//! reference, shared with every other recipient.
//! So every byte the server sends goes through `OutBuf`, whose size is the slow-consumer
//! measure, and the socket is written once per loop turn by `OutBuf::write_to`.
//! This file owns no policy: what to do on overflow, errors or timeouts is the loop's business.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use std::sync::Arc;

use bytes::{Buf, Bytes};
use mio::net::TcpStream;
use tungstenite::protocol::WebSocketContext;

use crate::bridge::{Delivery, Position};
use crate::channels::Channel;

/// Bytes queued for a socket and not yet accepted by the kernel, in order: frames shared with
/// every other recipient of a message (a delivery's frame is one `Bytes`, queued here by
/// reference, so a message waiting for a thousand clients is in memory once), and bytes
/// written for this connection alone (replies, tungstenite's pongs and close frames), copied
/// and packed together.
#[derive(Debug, Default)]
pub struct OutBuf {
    /// The oldest piece, advanced past what was written of it. A connection that gets one
    /// message per loop turn (the common case) needs nothing more: no allocation of its own.
    first: Option<Bytes>,
    /// The pieces after it, when there are.
    rest: Option<Box<Rest>>,
    /// Unsent bytes.
    len: usize,
}

/// The pieces after the first: shared ones, then bytes of this connection's own.
#[derive(Debug, Default)]
struct Rest {
    queue: VecDeque<Bytes>,
    /// Copied bytes written after the last queued piece (many small writes, one buffer).
    tail: Vec<u8>,
}

/// What one queued piece costs beyond its bytes: its `Bytes` handle.
pub const PIECE_OVERHEAD: usize = std::mem::size_of::<Bytes>();

/// Most pieces handed to one `writev`.
const MAX_IOV: usize = 64;

/// What a write attempt achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Everything queued is now in the kernel.
    All(usize),
    /// The socket's send buffer is full; the rest waits for a writable event.
    Blocked(usize),
}

impl OutBuf {
    /// Unsent bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the queue holds for the loop's budget: the unsent bytes (shared frames counted in
    /// full, as if this connection alone held them), each piece's handle, and the spare room of
    /// its own buffers.
    pub fn held(&self) -> usize {
        let first = usize::from(self.first.is_some()) * PIECE_OVERHEAD;
        let rest = self.rest.as_ref().map_or(0, |r| {
            std::mem::size_of::<Rest>()
                + r.queue.capacity() * PIECE_OVERHEAD
                + (r.tail.capacity() - r.tail.len())
        });
        self.len + first + rest
    }

    /// Queues a copy of `bytes`.
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if self.first.is_none() {
            self.first = Some(Bytes::copy_from_slice(bytes));
        } else {
            self.rest.get_or_insert_default().tail.extend_from_slice(bytes);
        }
    }

    /// Queues `frame` by reference (a reference count, no copy).
    pub fn push_shared(&mut self, frame: &Bytes) {
        self.len += frame.len();
        if self.first.is_none() {
            self.first = Some(frame.clone());
            return;
        }
        let rest = self.rest.get_or_insert_default();
        if !rest.tail.is_empty() {
            rest.queue.push_back(Bytes::from(std::mem::take(&mut rest.tail)));
        }
        rest.queue.push_back(frame.clone());
    }

    /// Forgets everything queued (for a connection being dropped without a goodbye).
    pub fn discard(&mut self) {
        self.first = None;
        self.rest = None;
        self.len = 0;
    }

    /// Writes queued bytes until done or the socket would block, up to 64 pieces per
    /// system call. When done, every allocation of its own is released, so an idle connection
    /// holds no output memory.
    pub fn write_to(&mut self, sock: &mut impl Write) -> io::Result<Written> {
        let mut total = 0;
        // Loop until WouldBlock or empty: the socket is edge-triggered.
        while self.len > 0 {
            let result = match (&self.first, &self.rest) {
                // One piece (the common case): a plain write.
                (Some(first), None) => sock.write(first),
                _ => {
                    let mut slices = [IoSlice::new(&[]); MAX_IOV];
                    let k = self.slices(&mut slices);
                    sock.write_vectored(&slices[..k])
                }
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Written::Blocked(total)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.discard();
        Ok(Written::All(total))
    }

    /// Fills `slices` with the oldest unsent pieces, in order; returns how many.
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let Some(first) = &self.first else {
            return 0;
        };
        slices[0] = IoSlice::new(first);
        let mut k = 1;
        if let Some(rest) = &self.rest {
            for piece in &rest.queue {
                if k == slices.len() {
                    return k;
                }
                slices[k] = IoSlice::new(piece);
                k += 1;
            }
            if !rest.tail.is_empty() && k < slices.len() {
                slices[k] = IoSlice::new(&rest.tail);
                k += 1;
            }
        }
        k
    }

    /// Drops the first `n` unsent bytes (written), releasing each piece written in full.
    fn consume(&mut self, mut n: usize) {
        debug_assert!(n <= self.len, "{n} bytes written of {} queued", self.len);
        self.len -= n;
        while let Some(first) = &mut self.first {
            if n < first.len() {
                first.advance(n);
                return;
            }
            n -= first.len();
            self.first = self.next_piece();
        }
    }

    /// Takes the piece after the first out of `rest` (dropped once empty).
    fn next_piece(&mut self) -> Option<Bytes> {
        let rest = self.rest.as_mut()?;
        let next = match rest.queue.pop_front() {
            Some(piece) => piece,
            None => Bytes::from(std::mem::take(&mut rest.tail)),
        };
        if rest.queue.is_empty() && rest.tail.is_empty() {
            self.rest = None;
        }
        Some(next)
    }
}

/// A loop's shared read buffer. A socket is read once, in one large read, into this buffer;
/// tungstenite then takes the bytes in small pieces. So every connection can have a tiny
/// per-connection read buffer (`--read-buffer`, 64 bytes is enough) without paying one system
/// call per tiny read: idle connections stay small, busy ones read in bulk.
///
/// Invariant: empty between connections. Bytes a connection did not consume (its read budget
/// ran out) move to that connection's `pending_input` and come back first on its next read.
///
/// A read that returns less than the buffer holds emptied the socket: when the loop says so
/// ([`ReadAhead::trust_short_reads`]), the next read of the same connection answers
/// `WouldBlock` without a system call. epoll(7) documents this for stream sockets under
/// edge-triggered polling: anything arriving later raises a new event. Not trusted when the
/// event reported the peer's close or an error (the end of the stream must still be read).
#[derive(Debug)]
pub struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Short reads end this connection's read (see above).
    trust_short: bool,
    /// The last read of this connection was short.
    drained: bool,
}

impl ReadAhead {
    /// A buffer of `size` bytes.
    pub fn new(size: usize) -> Self {
        ReadAhead {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            trust_short: false,
            drained: false,
        }
    }

    /// Whether the reads of the next connection may end at a short read (set before each
    /// connection's reads; see the type's documentation).
    pub fn trust_short_reads(&mut self, yes: bool) {
        self.trust_short = yes;
    }

    /// Bytes read and not consumed yet.
    pub fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The whole buffer, for reads whose bytes are thrown away.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        self.clear();
        &mut self.buf
    }

    /// Forgets the unread bytes (the connection they belonged to is done).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.drained = false;
        self.trust_short = false;
    }

    /// Loads bytes saved from an earlier turn; they must fit (they came from this buffer).
    pub fn load(&mut self, saved: &[u8]) {
        debug_assert!(
            self.unread().is_empty(),
            "read-ahead still holds another connection's bytes"
        );
        let n = saved.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&saved[..n]);
        self.start = 0;
        self.end = n;
    }
}

/// The stream tungstenite sees: reads come from the socket (through the loop's read-ahead
/// buffer when given), writes go to the output buffer.
pub struct Io<'a> {
    /// The socket.
    pub sock: &'a mut TcpStream,
    /// Where tungstenite's writes go.
    pub out: &'a mut OutBuf,
    /// The loop's read-ahead buffer; `None` reads the socket directly.
    pub ahead: Option<&'a mut ReadAhead>,
    /// Set when a read returned bytes (the peer is alive).
    pub got_input: bool,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(ahead) = self.ahead.as_deref_mut() else {
            let n = self.sock.read(buf)?;
            self.got_input |= n > 0;
            return Ok(n);
        };
        if ahead.start == ahead.end {
            if ahead.drained && ahead.trust_short {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // One large read; WouldBlock and EOF pass straight through.
            let n = self.sock.read(&mut ahead.buf)?;
            ahead.start = 0;
            ahead.end = n;
            ahead.drained = n > 0 && n < ahead.buf.len();
            self.got_input |= n > 0;
        }
        let n = buf.len().min(ahead.end - ahead.start);
        buf[..n].copy_from_slice(&ahead.buf[ahead.start..ahead.start + n]);
        ahead.start += n;
        Ok(n)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        // The loop writes the socket once per turn; nothing to do here.
        Ok(())
    }
}

/// Which wire protocol an open connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The path names the channel; frames are published and delivered as they are.
    Raw,
    /// `wsrelay.v1`: JSON commands and envelopes, many channels, acks, recovery.
    V1,
}

/// What a subscription waits for before messages flow.
#[derive(Debug, Default)]
pub struct Pending {
    /// The subscribe command's `ref`, echoed in the `subscribed` reply.
    pub reference: Option<Box<str>>,
    /// Whether to replay from the subscription's offset and report `recovered`.
    pub recover: bool,
    /// Whether to send a `subscribed` reply (v1) once the position is known.
    pub announce: bool,
    /// Deliveries were lost after the history read was asked for: read again once it is done.
    pub again: bool,
    /// The read checks this epoch, seen on a delivery but not the subscription's: if the
    /// history still has the subscription's epoch, deliveries in it are foreign (published
    /// straight into Redis with a header that only looks like ours).
    pub checked: Option<Arc<str>>,
    /// This read follows one that found the history restarted (new epoch): it reads the new
    /// epoch from its start. Only once: a history that keeps changing is not read forever.
    pub restarted: bool,
    /// The read was started by a delivery at this offset that skipped some: if the history
    /// cannot fill the gap up to it, that delivery's offset is not one of the channel's (a
    /// payload published into Redis with a header that only looks like ours), and it does not
    /// start another read.
    pub gap_to: Option<u64>,
    /// The loop's number of the history read asked for this wait (0: not asked yet). An
    /// answer to another read is stale: it was asked for a subscription since cancelled (the
    /// client unsubscribed and subscribed again while it was under way) or for an earlier
    /// wait, and settles nothing.
    pub read: u64,
}

impl Pending {
    /// A recovery the client did not ask for (a gap, lost deliveries): no reply unless it
    /// fails.
    pub fn quiet() -> Self {
        Pending {
            recover: true,
            ..Pending::default()
        }
    }

    /// A quiet recovery of the messages missed before a delivery at `offset`.
    pub fn gap(offset: u64) -> Self {
        Pending {
            gap_to: Some(offset),
            ..Pending::quiet()
        }
    }

    /// A quiet recovery that also checks whether `epoch`, seen on a delivery, is the
    /// channel's new epoch or a foreign one.
    pub fn check(epoch: Arc<str>) -> Self {
        Pending {
            checked: Some(epoch),
            ..Pending::quiet()
        }
    }
}

/// Where one subscription of a connection stands.
#[derive(Debug)]
pub enum SubState {
    /// The loop's upstream subscription to the channel is not live yet; anything published
    /// before it is live is covered by the history read that follows.
    AwaitingLive(Pending),
    /// The channel's position (and history, when recovering) has been requested; deliveries
    /// wait in `held` and are released after the replay, without duplicates.
    AwaitingHistory {
        /// What to do when the answer comes.
        pending: Pending,
        /// Live deliveries that arrived in the meantime.
        held: Vec<Arc<Delivery>>,
    },
    /// Messages flow.
    Live,
}

/// One channel subscription of an open connection.
#[derive(Debug)]
pub struct Sub {
    /// The channel.
    pub channel: Channel,
    /// Its state.
    pub state: SubState,
    /// Offset of the last message delivered; while recovering, the offset to recover after.
    pub offset: u64,
    /// Epoch of `offset`, once known.
    pub epoch: Option<Arc<str>>,
    /// The position its session stores: every message up to it has reached the client (the
    /// client's TCP acknowledged every byte queued up to it, or the client named it when
    /// subscribing), so a resume from it loses nothing. `None` until known. Behind `offset`
    /// while output is in flight.
    pub stored: Option<Position>,
    /// An epoch found to be foreign to this channel (see [`Pending::checked`]): deliveries in
    /// it are passed on without a position, and never start a recovery again.
    pub foreign: Option<Arc<str>>,
}

impl Sub {
    /// A subscription that delivers at once, tracking offsets from the first message.
    pub fn live(channel: Channel) -> Self {
        Sub {
            channel,
            state: SubState::Live,
            offset: 0,
            epoch: None,
            stored: None,
            foreign: None,
        }
    }

    /// A subscription waiting for its channel to be live, then for its history read after
    /// `offset` (the last message the client has) in `epoch`.
    pub fn awaiting(channel: Channel, offset: u64, epoch: Option<Arc<str>>, pending: Pending) -> Self {
        let stored = epoch.clone().map(|epoch| Position { offset, epoch });
        Sub {
            channel,
            state: SubState::AwaitingLive(pending),
            offset,
            epoch,
            stored,
            foreign: None,
        }
    }

    /// Everything delivered so far has reached the client: its position becomes the one its
    /// session stores. A subscription still reading its history keeps the stored one.
    pub fn delivered_all(&mut self) {
        if let (SubState::Live, Some(epoch)) = (&self.state, &self.epoch) {
            self.stored = Some(Position {
                offset: self.offset,
                epoch: epoch.clone(),
            });
        }
    }
}

/// Bytes the socket has queued that its peer has not acknowledged yet (sent or not), or
/// `None` when the kernel cannot tell.
pub fn unacknowledged(sock: &TcpStream) -> Option<usize> {
    queued(sock, libc::TIOCOUTQ)
}

/// Bytes received on the socket that have not been read yet, or `None` when the kernel
/// cannot tell.
pub fn unread(sock: &TcpStream) -> Option<usize> {
    queued(sock, libc::FIONREAD)
}

/// One of the socket's queue lengths, by `ioctl` request (TIOCOUTQ, FIONREAD).
fn queued(sock: &TcpStream, request: libc::Ioctl) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer; the descriptor is a connected
    // TCP socket owned by `sock`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut n) };
    (r == 0).then(|| usize::try_from(n).ok()).flatten()
}

/// A connection's session: stored so that another connection can resume it.
#[derive(Debug)]
pub struct SessionLink {
    /// Session id.
    pub id: Arc<str>,
    /// Token subject the session belongs to.
    pub subject: Option<String>,
    /// Delivered offsets moved since the last save.
    pub offsets_dirty: bool,
    /// Last time the session was written.
    pub saved_at: Instant,
}

/// What a connection's token says, as long as the token is valid.
#[derive(Debug)]
pub struct TokenState {
    /// The token's `sub`.
    pub subject: Arc<str>,
    /// Which channels it may use.
    pub grant: crate::auth::Grant,
    /// When the connection is closed unless a fresh token replaced this one: the token's `exp`
    /// plus `--token-leeway`, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Where an open WebSocket stands before it is served.
///
/// ```text
///  upgrade ─▶ AwaitingConnect ──connect──▶ Resuming ──stored session──▶ Ready
///     │            (v1, no token)     │        ▲                            ▲
///     └────────────────────────────────┴────────┴──── (no session asked) ───┘
/// ```
#[derive(Debug)]
pub enum Stage {
    /// A v1 connection that came without `?token=`: its first command must be `connect`,
    /// before `deadline`; `resume` when the URL asked to resume a session.
    AwaitingConnect {
        /// When it is closed if no `connect` came.
        deadline: Instant,
        /// Whether to resume the session named in the URL once authenticated.
        resume: bool,
    },
    /// Waiting for its stored session: nothing is read or joined until it is known. A raw
    /// connection's channel (its path's) waits here to be joined with the session's position.
    Resuming {
        /// The raw connection's channel; `None` for v1.
        raw_channel: Option<Channel>,
        /// The `connect` command's `ref`, echoed in the welcome (v1).
        reference: Option<Box<str>>,
    },
    /// Served: frames are read, commands carried out.
    Ready,
}

/// An open WebSocket.
#[derive(Debug)]
pub struct Open {
    /// tungstenite's protocol state (frame parser, close handshake).
    pub ctx: WebSocketContext,
    /// Wire protocol.
    pub protocol: Protocol,
    /// Subscriptions (a raw connection has exactly one once it has joined).
    pub subs: Vec<Sub>,
    /// Whether delivered offsets are tracked (v1 connections and sessions): needed for
    /// duplicate and gap detection and for resuming; plain raw connections skip it.
    pub tracks_offsets: bool,
    /// The session, if the connection has one.
    pub session: Option<Box<SessionLink>>,
    /// Whether it is served yet, or still owes a token or waits for its stored session.
    pub stage: Stage,
    /// Who the connection is and what it may do, from its token; `None` when tokens are off.
    pub token: Option<Box<TokenState>>,
    /// Publish rate limit, when `--publish-rate` is set.
    pub bucket: Option<Box<crate::ratelimit::TokenBucket>>,
    /// Bytes of deliveries held by subscriptions awaiting history (counted against the cap).
    pub held_bytes: usize,
    /// A replay page was queued: ask for the next once the output drains (see
    /// `recovery::PAGE_ENTRIES`).
    pub pages_wanted: bool,
    /// Last time a ping was queued to it.
    pub last_ping: Instant,
}

impl Open {
    /// A freshly upgraded connection: no subscriptions, no session, no token, no limits.
    pub fn new(ctx: WebSocketContext, protocol: Protocol, now: Instant) -> Self {
        Open {
            ctx,
            protocol,
            subs: Vec::new(),
            tracks_offsets: protocol == Protocol::V1,
            session: None,
            stage: Stage::Ready,
            token: None,
            bucket: None,
            held_bytes: 0,
            pages_wanted: false,
            last_ping: now,
        }
    }

    /// Whether the token allows subscribing to `channel`.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.token.as_ref().is_none_or(|t| t.grant.may_subscribe(channel))
    }

    /// Whether the token allows publishing to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.token.as_ref().is_none_or(|t| t.grant.may_publish(channel))
    }

    /// The token's subject, if the connection has a token.
    pub fn subject(&self) -> Option<&str> {
        self.token.as_deref().map(|t| &*t.subject)
    }

    /// Counts `n` bytes of held deliveries as released.
    pub fn release_held(&mut self, n: usize) {
        debug_assert!(
            n <= self.held_bytes,
            "releasing {n} held bytes of {}",
            self.held_bytes
        );
        self.held_bytes = self.held_bytes.saturating_sub(n);
    }

    /// Adds a subscription. The first one gets room for itself only: most connections (every
    /// raw one) never have a second, and an idle connection should cost what it holds.
    pub fn add_sub(&mut self, sub: Sub) {
        if self.subs.capacity() == 0 {
            self.subs.reserve_exact(1);
        }
        self.subs.push(sub);
    }

    /// The subscription to `channel`, if any.
    pub fn sub_mut(&mut self, channel: &str) -> Option<&mut Sub> {
        self.subs.iter_mut().find(|s| &*s.channel == channel)
    }
}

/// A connection's HTTP request, as it arrives.
#[derive(Debug)]
pub struct Request {
    /// What arrived so far.
    pub head: Vec<u8>,
    /// Accepted on `--proxy-listen`: a PROXY protocol header must come first.
    pub proxy_header: bool,
    /// When it must be complete (`--handshake-timeout`, from the accept).
    pub deadline: Instant,
}

/// The phases of a connection's life; each owns the data it needs.
#[derive(Debug)]
pub enum Phase {
    /// Waiting for the complete HTTP request (and, first, a PROXY header when required).
    /// Boxed: most connections are open, and every slab entry is as large as its largest phase.
    Request(Box<Request>),
    /// A WebSocket: frames in, deliveries out.
    Open(Box<Open>),
    /// A server API request (`POST /publish`, `/api/...`, `GET /history`) waiting for the
    /// broker's answer.
    Api {
        /// When it is answered 504 if the broker has not answered.
        deadline: Instant,
        /// What it waits for.
        wait: Box<ApiWait>,
    },
    /// The last bytes (HTTP response or close frame) are queued. Once they are written the
    /// write side is shut; input is discarded until the peer closes or the deadline passes.
    Closing {
        /// When the connection is dropped whatever the peer does.
        deadline: Instant,
        /// The last bytes are out and the write side is shut.
        write_shut: bool,
    },
}

/// One publish's outcome for a broadcast: its position (when the channel keeps history), or
/// the error code and message.
pub type Acked = Result<Option<Position>, (&'static str, String)>;

/// What a server API request waits for.
#[derive(Debug)]
pub enum ApiWait {
    /// `POST /publish`: the acknowledgement of its message.
    Publish,
    /// `POST /api/broadcast`: one acknowledgement per channel (the publishes carry their index
    /// as `ref`), each result kept until the last one came.
    Broadcast {
        /// The channels, in the request's order.
        channels: Vec<Channel>,
        /// Each channel's outcome once known.
        results: Vec<Option<Acked>>,
    },
    /// Any other request: one reply.
    Reply,
}

impl Phase {
    /// A phase that closes after the bytes already queued, dropped at `deadline` at the latest.
    pub fn closing(deadline: Instant) -> Self {
        Phase::Closing {
            deadline,
            write_shut: false,
        }
    }
}

/// One slab entry of a loop.
#[derive(Debug)]
pub struct Conn {
    /// The socket, registered with the loop's poll under this entry's key.
    pub sock: TcpStream,
    /// Remote address: the client's, once a PROXY header or a trusted proxy's
    /// `X-Forwarded-For` has named it (logs and `--max-connections-per-ip` use it).
    pub peer: SocketAddr,
    /// The proxy the connection came through, when `peer` was taken from what it said (boxed:
    /// rare, and every slab entry pays for the field).
    pub via: Option<Box<SocketAddr>>,
    /// Identifies this connection in replies from the broker (slab keys are reused).
    pub serial: u64,
    /// Counted in the per-IP connection limit (released when the connection ends).
    pub ip_counted: bool,
    /// Unsent output.
    pub out: OutBuf,
    /// Where in its life the connection is.
    pub phase: Phase,
    /// Last time the peer sent anything.
    pub last_seen: Instant,
    /// Already in this turn's flush list.
    pub dirty: bool,
    /// The last write stopped at a full socket buffer: write again when it is writable.
    pub blocked: bool,
    /// Input may be waiting that the loop has not read yet (read budget spent, or the
    /// channel's subscription is not live yet).
    pub read_pending: bool,
    /// Scheduled for removal at the end of this turn; ignore further events.
    pub dead: bool,
    /// A write to the peer failed (it reset or closed the connection): it gets no more
    /// output, and is read only for what it sent before (the kernel keeps that after a reset),
    /// which is published before the connection is removed.
    pub hung_up: bool,
    /// Input read from the socket but not consumed yet (the read budget ran out).
    pub pending_input: Option<Box<[u8]>>,
    /// When its unsent output went over the soft limit (see `backpressure.rs`).
    pub over_soft_since: Option<Instant>,
    /// Its output as last counted in the loop's total (`OutBuf::held`, after its last write).
    pub accounted: usize,
    /// Messages read but not published yet because the publish queue was full. While set,
    /// the connection is not read (its sender is slowed by TCP).
    pub unpublished: Option<Box<Unpublished>>,
}

/// A paused connection's messages, read but not published yet because the publish queue was
/// full, oldest first; and how its input ended, if it did before they were all published
/// (acted on once they are: nothing read is dropped).
#[derive(Debug)]
pub struct Unpublished {
    /// The messages, oldest first.
    pub messages: VecDeque<(crate::frame::Kind, Bytes)>,
    /// How the connection's input ended while they waited (a close, an error), if it did.
    pub ended: Option<ReadEnd>,
}

/// How a read pass over one connection ended.
#[derive(Debug)]
pub enum ReadEnd {
    /// WouldBlock: everything available was read.
    Drained,
    /// The read budget is spent; more may be waiting.
    BudgetSpent,
    /// The peer sent a close frame.
    PeerClosed,
    /// A protocol, size or I/O error.
    Failed(tungstenite::Error),
}

impl Conn {
    /// A freshly accepted connection waiting for its request until `deadline`.
    pub fn new(sock: TcpStream, peer: SocketAddr, serial: u64, now: Instant, deadline: Instant) -> Self {
        Conn {
            sock,
            peer,
            via: None,
            serial,
            ip_counted: false,
            out: OutBuf::default(),
            phase: Phase::Request(Box::new(Request {
                head: Vec::new(),
                proxy_header: false,
                deadline,
            })),
            last_seen: now,
            dirty: false,
            blocked: false,
            read_pending: false,
            dead: false,
            hung_up: false,
            pending_input: None,
            over_soft_since: None,
            accounted: 0,
            unpublished: None,
        }
    }

    /// Whether the peer has everything the connection was sent: nothing is left unsent and
    /// the kernel has seen all of it acknowledged (never for a connection that hung up).
    pub fn acknowledged_all(&self) -> bool {
        !self.dead && !self.hung_up && self.out.is_empty() && unacknowledged(&self.sock) == Some(0)
    }

    /// A closing connection whose last bytes (its close frame) are out and acknowledged by the
    /// peer: nothing is left for it but the peer's FIN, which an exiting process need not wait
    /// for.
    pub fn closed_and_delivered(&self) -> bool {
        matches!(self.phase, Phase::Closing { write_shut: true, .. }) && unacknowledged(&self.sock) == Some(0)
    }

    /// Whether the connection came through `--proxy-listen` and its PROXY header is not
    /// complete yet.
    pub fn awaits_proxy_header(&self) -> bool {
        matches!(&self.phase, Phase::Request(r) if r.proxy_header)
    }

    /// When the current phase (or an open connection's stage) must be over, if it has a
    /// deadline: the one place the loop's timers read.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Request(r) => Some(r.deadline),
            Phase::Api { deadline, .. } | Phase::Closing { deadline, .. } => Some(*deadline),
            Phase::Open(open) => match open.stage {
                Stage::AwaitingConnect { deadline, .. } => Some(deadline),
                Stage::Resuming { .. } | Stage::Ready => None,
            },
        }
    }

    /// The open WebSocket, if this connection is one.
    pub fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.phase {
            Phase::Open(o) => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts `room` bytes, then blocks.
    struct Limited {
        got: Vec<u8>,
        room: usize,
    }
    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room).min(3);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_free_memory_when_done() {
        let mut out = OutBuf::default();
        out.push(b"hello ");
        out.push(b"world");
        let mut w = Limited { got: vec![], room: 4 };
        assert_eq!(out.write_to(&mut w).unwrap(), Written::Blocked(4));
        assert_eq!(out.len(), 7);
        out.push(b"!");
        w.room = 100;
        assert_eq!(out.write_to(&mut w).unwrap(), Written::All(8));
        assert_eq!(w.got, b"hello world!");
        assert!(out.is_empty());
        assert!(out.first.is_none() && out.rest.is_none());
    }

    #[test]
    fn an_output_buffer_is_small() {
        // Every connection has one, idle or not.
        assert!(std::mem::size_of::<OutBuf>() <= 48);
    }

    #[test]
    fn small_writes_of_its_own_are_packed_together() {
        let mut out = OutBuf::default();
        for _ in 0..1000 {
            out.push(b"pong");
        }
        assert_eq!(out.len(), 4000);
        assert!(out.held() < 4000 + 4096, "{} held for 4000 bytes", out.held());
        let mut all = Vec::new();
        assert_eq!(out.write_to(&mut all).unwrap(), Written::All(4000));
        assert_eq!(all.len(), 4000);
    }

    #[test]
    fn shared_frames_are_queued_by_reference_and_written_in_order() {
        let frame = Bytes::from(b"0123456789".to_vec());
        let mut a = OutBuf::default();
        let mut b = OutBuf::default();
        a.push(b"<");
        a.push_shared(&frame);
        b.push_shared(&frame);
        a.push(b">");
        assert_eq!((a.len(), b.len()), (12, 10));
        assert_eq!(b.held(), 10 + PIECE_OVERHEAD);
        assert!(a.held() > 12 + 2 * PIECE_OVERHEAD);
        // Both queues point at the one frame.
        let queued = &a.rest.as_ref().unwrap().queue;
        assert_eq!(queued[0].as_ptr(), b.first.as_ref().unwrap().as_ptr());
        let mut w = Limited { got: vec![], room: 5 };
        assert_eq!(a.write_to(&mut w).unwrap(), Written::Blocked(5));
        assert_eq!(a.len(), 7);
        w.room = 100;
        assert_eq!(a.write_to(&mut w).unwrap(), Written::All(7));
        assert_eq!(w.got, b"<0123456789>");
        let mut all = Vec::new();
        assert_eq!(b.write_to(&mut all).unwrap(), Written::All(10));
        assert_eq!(all, b"0123456789");
    }

    #[test]
    fn a_connections_deadline_follows_its_phase_and_stage() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(5);
        let mut conn = Conn::new(TcpStream::from_std(server), peer, 1, now, later);
        assert_eq!(
            conn.deadline(),
            Some(later),
            "a request has the handshake's deadline"
        );
        let ctx = WebSocketContext::new(tungstenite::protocol::Role::Server, None);
        let mut open = Open::new(ctx, Protocol::V1, now);
        open.stage = Stage::AwaitingConnect {
            deadline: later,
            resume: false,
        };
        conn.phase = Phase::Open(Box::new(open));
        assert_eq!(
            conn.deadline(),
            Some(later),
            "so does a connection owing its token"
        );
        if let Some(open) = conn.open_mut() {
            open.stage = Stage::Ready;
        }
        assert_eq!(conn.deadline(), None, "an open connection has none");
        conn.phase = Phase::closing(now);
        assert_eq!(conn.deadline(), Some(now));
    }

    /// A short read ends a connection's reads only when the loop trusts short reads: the
    /// next read then answers WouldBlock without reading the socket (so bytes sent since are
    /// not seen: they raise a new event). Otherwise the socket is read again.
    #[test]
    fn a_short_read_ends_the_read_only_when_trusted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut sock = TcpStream::from_std(server);
        let mut out = OutBuf::default();
        let mut ahead = ReadAhead::new(1024);
        let mut buf = [0u8; 64];
        let wait_readable = |sock: &TcpStream| {
            let mut fds = [libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(sock),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd for the call's duration.
            assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) }, 1);
        };
        for trusted in [false, true] {
            peer.write_all(b"first").unwrap();
            wait_readable(&sock);
            ahead.trust_short_reads(trusted);
            let mut io = Io {
                sock: &mut sock,
                out: &mut out,
                ahead: Some(&mut ahead),
                got_input: false,
            };
            assert_eq!(io.read(&mut buf).unwrap(), 5);
            peer.write_all(b"second").unwrap();
            wait_readable(io.sock);
            match io.read(&mut buf) {
                Err(e) if trusted => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                Ok(6) if !trusted => {}
                other => panic!("trusted {trusted}: {other:?}"),
            }
            ahead.clear();
        }
        // What the trusted read left is there for the next read: nothing was lost.
        peer.write_all(b"third").unwrap();
        drop(peer);
        wait_readable(&sock);
        let mut rest = Vec::new();
        let mut io = Io {
            sock: &mut sock,
            out: &mut out,
            ahead: Some(&mut ahead),
            got_input: false,
        };
        while let Ok(n @ 1..) = io.read(&mut buf) {
            rest.extend_from_slice(&buf[..n]);
        }
        assert_eq!(rest, b"secondthird");
    }
}
