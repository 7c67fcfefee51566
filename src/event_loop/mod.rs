//! One per-core event loop: accept → handshake → read and publish → fan-out → flush → close.
//!
//! A loop owns its mio `Poll`, its SO_REUSEPORT listener, a slab of connections and its channel
//! index; no other thread touches them. It hears from the broker through its inbox (woken by
//! its `Waker`) and talks to the broker only with `try_send`, so it never blocks on anything
//! but `poll`.
//!
//! One turn of the loop:
//! 1. poll; handle accept, inbox (deliveries are appended to each member's output buffer) and
//!    socket events (reads until WouldBlock or the read budget is spent);
//! 2. continue reads that were deferred (budget spent, or waiting for a subscription);
//! 3. flush every connection that got output this turn, once: a burst of k messages costs one
//!    write per connection, not k;
//! 4. remove connections that ended (deferred to the end of the turn so a reused slab key never
//!    sees a stale event), and run timers (handshake, ping, idle, close deadlines, sessions).
//!
//! The rest of the loop lives next to this file, in the order of a connection's life:
//! `accept.rs` (the listeners), `handshake.rs` (HTTP request → WebSocket or HTTP answer), `messages.rs` (what clients send),
//! `subscriptions.rs` (joining channels, recovery, sessions and broker replies), `close.rs`
//! (closing, removal and timers), `drain.rs` (the graceful shutdown).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

use self::accept::{Acceptor, LISTENER, Listener, PROXY_LISTENER};
use crate::backpressure::{Backpressure, judge};
use crate::bridge::{BrokerHandle, LoopInbox, ToLoop};
use crate::channels::ChannelIndex;
use crate::conn::{Conn, Phase, ReadAhead, Written};
use crate::fanout::{self, Turn};
use crate::http::{self, Status};
use crate::log_throttle::LogThrottle as RateLimit;
use crate::metrics::{HandshakeFailure, LoopMetrics, add, inc};
use crate::shared::Shared;

mod accept;
mod api;
mod close;
mod drain;
mod handshake;
mod history;
mod link;
mod messages;
mod presence;
mod subscriptions;

/// Token of the loop's waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Size of the loop's shared read buffer: a socket is read in one call of up to this much.
const READ_AHEAD: usize = 64 * 1024;

/// Counts a connection from `peer` against `--max-connections-per-ip`; false when that address
/// is over the limit. Called once per connection, at the accept or as soon as the client's real
/// address is known (PROXY header, `X-Forwarded-For`), so connections that never finish a
/// handshake count too. The caller records the outcome in `Conn::ip_counted`.
fn count_ip(shared: &Shared, peer: SocketAddr, via: Option<SocketAddr>) -> bool {
    let Some(per_ip) = &shared.per_ip else {
        return false;
    };
    let counted = per_ip
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .try_acquire(peer.ip());
    if !counted {
        let via = via.map(|v| format!(" (via {v})")).unwrap_or_default();
        debug!("{peer}{via}: over --max-connections-per-ip");
    }
    counted
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// A per-core event loop and everything it owns.
pub struct EventLoop {
    id: usize,
    poll: Poll,
    /// The plain listener and the PROXY protocol listener, while they accept (`accept.rs`).
    acceptor: Acceptor,
    conns: Slab<Conn>,
    index: ChannelIndex,
    /// The broker: its inbox, and the queues the loop sends on (`link.rs`).
    link: link::Link,
    shared: Arc<Shared>,
    ws_config: WebSocketConfig,
    /// Which subscriptions are listed in presence, and the loop's channel report
    /// (`presence.rs`).
    listing: presence::Listing,
    /// Connections to flush and gaps, gathered during the turn.
    turn: Turn,
    /// Unsent output of all connections as of their last write (see `Conn::accounted`):
    /// held to `--loop-output-budget`.
    unsent: usize,
    /// The slow-consumer limits.
    limits: crate::backpressure::Limits,
    /// Connections to continue reading next turn.
    read_backlog: Vec<usize>,
    /// Connections not read because the publish queue was full, in the order they paused.
    paused: VecDeque<usize>,
    /// Messages read from paused connections that are no longer open (closed by the server,
    /// dropped), waiting for room in the publish queue; published before the paused
    /// connections' (`resume_paused`). At most what those connections held.
    orphans: VecDeque<crate::bridge::Publish>,
    /// Connections to drop at the end of the turn.
    dead: Vec<usize>,
    /// Connections whose subscriptions changed: their sessions are written at the end of the turn.
    session_changed: Vec<usize>,
    /// When the connections in `turn.dirty` are written (`--coalesce`).
    flush_at: Option<Instant>,
    /// Serial number for the next open connection (see `ConnId`).
    next_serial: u64,
    /// History reads asked for subscriptions so far: each read's number (`Pending::read`).
    reads: u64,
    /// Shared read buffer: one large read per socket, handed to tungstenite in small pieces.
    ahead: ReadAhead,
    /// The messages of one connection's read (kept empty between reads: its room is reused).
    read_buf: Vec<(crate::frame::Kind, bytes::Bytes)>,
    next_sweep: Instant,
    sweep_every: Duration,
    /// Set when shutting down: which step of the shutdown the loop is in.
    stopping: Option<drain::Stopping>,
    /// Draining clients waiting for their last messages to be acknowledged, with when to stop
    /// waiting (`drain.rs`).
    settling: Vec<(crate::bridge::ConnId, Instant)>,
    log_limit: RateLimit,
}

impl EventLoop {
    /// Builds loop `id` around its poll and listener.
    pub fn new(
        id: usize,
        poll: Poll,
        listeners: [Option<TcpListener>; 2],
        inbox: LoopInbox,
        broker: BrokerHandle,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let acceptor = Acceptor::new(listeners, poll.registry())?;
        let c = &shared.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(c.read_buffer)
            // Io never blocks, so tungstenite's own buffer is handed over at once.
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(c.max_message_size))
            .max_frame_size(Some(c.max_message_size));
        let shortest = c
            .handshake_timeout
            .min(c.ping_interval)
            .min(c.close_timeout)
            .min(c.session_flush);
        let sweep_every = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let limits = c.output_limits();
        Ok(EventLoop {
            id,
            poll,
            acceptor,
            conns: Slab::with_capacity(1024),
            index: ChannelIndex::default(),
            link: link::Link::new(broker, inbox),
            shared,
            ws_config,
            listing: presence::Listing::new(Instant::now()),
            turn: Turn::default(),
            unsent: 0,
            limits,
            read_backlog: Vec::new(),
            paused: VecDeque::new(),
            orphans: VecDeque::new(),
            dead: Vec::new(),
            session_changed: Vec::new(),
            flush_at: None,
            next_serial: 0,
            reads: 0,
            ahead: ReadAhead::new(READ_AHEAD),
            read_buf: Vec::new(),
            next_sweep: Instant::now() + sweep_every,
            sweep_every,
            stopping: None,
            settling: Vec::new(),
            log_limit: RateLimit::default(),
        })
    }

    fn metrics(&self) -> &LoopMetrics {
        &self.shared.metrics.loops[self.id]
    }

    /// Runs until shutdown completes. Logs and returns on a fatal poll error.
    pub fn run(mut self) {
        if let Err(e) = self.run_inner() {
            log::error!("loop {} stopped: {e}", self.id);
        }
    }

    fn run_inner(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(Listener::Plain, now),
                    PROXY_LISTENER => self.accept(Listener::Proxy, now),
                    WAKER => self.drain_inbox(now),
                    Token(key) => {
                        // Writable matters only to a connection whose last write blocked;
                        // other output waits for the end-of-turn flush, where it coalesces.
                        if event.is_writable() && self.conns.get(key).is_some_and(|c| c.blocked) {
                            self.flush(key);
                            self.judge_output(key, now);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            // A new event follows any input after a short read, unless the
                            // stream is ending.
                            self.ahead
                                .trust_short_reads(!event.is_read_closed() && !event.is_error());
                            self.read(key, now);
                            // Reads from elsewhere (deferred ones) read until WouldBlock.
                            self.ahead.trust_short_reads(false);
                        }
                    }
                }
            }
            self.step_stopping(now);
            self.end_turn(now);
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + self.sweep_every;
            }
            if self.acceptor.resume(now) {
                self.accept(Listener::Plain, now);
                self.accept(Listener::Proxy, now);
            }
            if self.stopped(now) {
                debug!("loop {} done, {} connections left", self.id, self.conns.len());
                return Ok(());
            }
        }
    }

    /// Everything that happens once per turn after the events: deferred reads, gap recovery,
    /// one flush per connection and then the slow-consumer judgement, subscription requests,
    /// session writes, removals.
    fn end_turn(&mut self, now: Instant) {
        if !self.paused.is_empty() || !self.orphans.is_empty() {
            self.resume_paused(now);
        }
        for key in std::mem::take(&mut self.read_backlog) {
            self.read(key, now);
        }
        for (key, channel) in std::mem::take(&mut self.turn.gaps) {
            self.request_history(key, &channel);
        }
        // With --coalesce, output waits up to that long so that more messages share a write.
        let coalesce = self.shared.config.coalesce;
        if !self.turn.dirty.is_empty() && self.flush_at.is_none() {
            self.flush_at = Some(now + coalesce);
        }
        if self.flush_at.is_some_and(|t| now >= t) {
            self.flush_at = None;
            self.write_out(now);
        }
        for key in std::mem::take(&mut self.session_changed) {
            self.save_session(key, now, false);
        }
        self.link.send_queued();
        self.remove_dead();
    }

    /// Writes every connection that got output, once, judges what each has left
    /// (`backpressure.rs`), then holds the loop to its budget.
    fn write_out(&mut self, now: Instant) {
        for key in std::mem::take(&mut self.turn.dirty) {
            self.flush(key);
            self.judge_output(key, now);
        }
        self.turn.queued = 0;
        self.hold_to_budget(now);
    }

    fn poll_timeout(&self) -> Duration {
        if !self.read_backlog.is_empty() || !self.turn.gaps.is_empty() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut until = self.next_sweep;
        let stopping = self.stopping.as_ref().map(drain::Stopping::next_step);
        for t in [self.acceptor.paused_until(), self.flush_at, stopping]
            .into_iter()
            .flatten()
        {
            until = until.min(t);
        }
        let mut timeout = until.saturating_duration_since(now);
        if self.link.has_queued() || !self.paused.is_empty() || !self.orphans.is_empty() {
            // Retry soon: the control queue, or the publish queue paused connections wait for.
            timeout = timeout.min(Duration::from_millis(1));
        }
        if !self.settling.is_empty() {
            // Acknowledgements come with no event: look again soon (a round trip is short).
            timeout = timeout.min(Duration::from_millis(2));
        }
        timeout
    }

    // ---- accept ------------------------------------------------------------------------

    /// Accepts from listener `which` until there is nothing more to accept (the listener is
    /// edge-triggered).
    fn accept(&mut self, which: Listener, now: Instant) {
        while let Some((sock, peer)) = self
            .acceptor
            .next(which, now, &self.shared.metrics.loops[self.id])
        {
            self.admit(sock, peer, which == Listener::Proxy, now);
        }
    }

    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr, proxied: bool, now: Instant) {
        let cfg = &self.shared.config;
        let _ = sock.set_nodelay(true);
        if let Some(size) = cfg.socket_send_buffer {
            let _ = socket2::SockRef::from(&sock).set_send_buffer_size(size);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Readable and writable from the start: edge-triggered, so writable fires only when a
        // full send buffer drains, and no interest change (syscall) is ever needed.
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut sock, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        self.next_serial += 1;
        let mut conn = Conn::new(sock, peer, self.next_serial, now, now + cfg.handshake_timeout);
        if let Phase::Request(request) = &mut conn.phase {
            request.proxy_header = proxied;
        }
        let m = &self.shared.metrics.loops[self.id];
        inc(&m.accepted);
        inc(&m.connections);
        // Refusals are answered, not silently dropped: the client learns why.
        let refusal = if self.shared.connections.fetch_add(1, Ordering::Relaxed) >= cfg.max_connections {
            Some((HandshakeFailure::OverCapacity, Status::Unavailable))
        } else if proxied || self.shared.trusted.trusts(peer.ip()) {
            // The client's address comes with the PROXY header or the request: counted then.
            None
        } else if self.shared.per_ip.is_some() {
            conn.ip_counted = count_ip(&self.shared, peer, None);
            (!conn.ip_counted).then_some((HandshakeFailure::PerIpLimit, Status::TooManyRequests))
        } else {
            None
        };
        if let Some((reason, status)) = refusal {
            m.handshake_failed(reason);
            conn.out.push(&http::error_response(status));
            conn.phase = Phase::closing(now + cfg.close_timeout);
        }
        let refused = refusal.is_some();
        entry.insert(conn);
        if refused {
            self.mark_dirty(key);
        }
    }

    // ---- reading -------------------------------------------------------------------------

    /// Handles readable input according to the connection's phase.
    fn read(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.dead {
            return;
        }
        match conn.phase {
            Phase::Request(_) => self.read_request(key, now),
            Phase::Open(_) => self.read_frames(key, now),
            Phase::Closing { .. } | Phase::Api { .. } => self.discard_input(key),
        }
    }

    /// Input on a closing connection is not parsed any more: read and drop it until EOF.
    fn discard_input(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        loop {
            match io::Read::read(&mut conn.sock, self.ahead.buf_mut()) {
                Ok(0) => return self.kill(key),
                Ok(_) => {}
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => {}
                Err(_) => return self.kill(key),
            }
        }
    }

    // ---- the broker ----------------------------------------------------------------------

    /// Sends queued subscription requests in order; what does not fit waits for next turn.
    /// Takes everything the broker sent. Wakes merge, so this drains until empty.
    fn drain_inbox(&mut self, now: Instant) {
        self.link.rearm();
        while let Some(msg) = self.link.next() {
            match msg {
                ToLoop::Deliver(d) => {
                    let Some(members) = self.index.members(&d.channel) else {
                        continue;
                    };
                    let n = fanout::deliver(&d, members, &mut self.conns, &mut self.turn);
                    add(&self.shared.metrics.loops[self.id].deliveries, n as u64);
                    if self.unsent + self.turn.queued > self.shared.config.loop_output_budget {
                        // A backlog drained in one turn would otherwise be copied to every
                        // member before anyone is judged: write and judge now (the sockets are
                        // tried first, so readers keep what they can take).
                        self.write_out(now);
                    }
                }
                ToLoop::Event(e) => self.on_event(&e),
                ToLoop::Admin(a) => self.on_admin(&a, now),
                ToLoop::Live {
                    channel,
                    generation,
                    offline,
                } => self.channel_live(&channel, generation, offline),
                ToLoop::Lost { channel } => self.channel_lost(&channel),
                ToLoop::Reply { conn, reply } => self.on_reply(conn, reply, now),
                ToLoop::Barrier { conn } => self.on_barrier(conn, now),
            }
        }
    }

    /// The slow-consumer policy (`backpressure.rs`), after the connection's socket was tried:
    /// its unsent output and the deliveries it holds for a history read, against the hard
    /// limit and the soft limit's grace period.
    pub(super) fn judge_output(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Open(open) = &conn.phase else {
            return;
        };
        if conn.dead {
            return;
        }
        let unsent = conn.out.len() + open.held_bytes;
        // Written out far enough: the next page of a replay may come (live deliveries held
        // meanwhile do not count here: they wait for the replay to end).
        let next_page = open.pages_wanted && conn.out.len() <= self.limits.soft;
        if let Backpressure::Close(why) = judge(unsent, &mut conn.over_soft_since, now, &self.limits) {
            return self.close_slow_consumer(key, why, now);
        }
        if next_page {
            self.next_pages(key);
        }
    }

    /// Closes a slow consumer with 1008 (after what is queued), counted and logged.
    fn close_slow_consumer(&mut self, key: usize, why: &str, now: Instant) {
        inc(&self.metrics().slow_consumers);
        let conn = &self.conns[key];
        warn!(
            "slow consumer {} closed: {} bytes unsent ({why})",
            conn.peer,
            conn.out.len()
        );
        self.close(key, CloseCode::Policy, "slow consumer", now);
    }

    /// Past `--loop-output-budget`, the connections holding the most unsent output are dropped
    /// at once, their output with them, until the rest fits.
    fn hold_to_budget(&mut self, now: Instant) {
        let budget = self.shared.config.loop_output_budget;
        if self.unsent <= budget {
            return;
        }
        let holders: Vec<(usize, usize)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.accounted > 0 && !c.dead)
            .map(|(k, c)| (c.accounted, k))
            .collect();
        for key in crate::backpressure::over_budget(holders, self.unsent, budget) {
            let conn = &mut self.conns[key];
            if matches!(conn.phase, Phase::Open(_)) {
                // Not counted twice: one closed as a slow consumer already is closing.
                inc(&self.shared.metrics.loops[self.id].slow_consumers);
            }
            warn!(
                "slow consumer {} dropped: {} bytes unsent, the loop holds {} (--loop-output-budget {budget})",
                conn.peer,
                conn.out.len(),
                self.unsent
            );
            self.discard_output(key);
            self.kill(key);
        }
        let _ = now;
    }

    // ---- writing -------------------------------------------------------------------------

    /// A write to an open connection failed: its peer reset the connection (or closed it and
    /// was then sent more). What it sent before may still be in the kernel, readable after the
    /// reset: the connection gets no more output and is read until its input ends, so that
    /// everything it sent is acted on (published), and is then removed (`read_ended`). Its
    /// session keeps the position the peer acknowledged.
    fn hang_up(&mut self, key: usize) {
        self.discard_output(key);
        let conn = &mut self.conns[key];
        conn.hung_up = true;
        conn.blocked = false;
        // A paused connection is read again by `resume_paused`; one already waiting to be
        // read (budget spent, a subscription not live yet) is read when it would have been.
        if !conn.read_pending {
            conn.read_pending = true;
            self.read_backlog.push(key);
        }
    }

    /// Drops the connection's unsent output and takes it out of the loop's total.
    fn discard_output(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.out.discard();
        self.unsent = self.unsent.saturating_sub(conn.accounted);
        conn.accounted = 0;
    }

    fn mark_dirty(&mut self, key: usize) {
        self.turn.mark_dirty(key, &mut self.conns[key]);
    }

    /// Writes the connection's output until done or WouldBlock; a closing connection whose
    /// last bytes are out gets its write side shut.
    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.dirty = false;
        if conn.dead {
            return;
        }
        if conn.hung_up {
            // Nobody to write to: what was queued since is dropped.
            return self.discard_output(key);
        }
        let result = conn.out.write_to(&mut conn.sock);
        // The loop's total follows every connection's output after each write.
        self.unsent = (self.unsent + conn.out.held()).saturating_sub(conn.accounted);
        conn.accounted = conn.out.held();
        let written = match result {
            Ok(Written::All(n)) => {
                conn.blocked = false;
                if let Phase::Closing { write_shut, .. } = &mut conn.phase {
                    if !*write_shut {
                        *write_shut = true;
                        let _ = conn.sock.shutdown(std::net::Shutdown::Write);
                    }
                }
                n
            }
            Ok(Written::Blocked(n)) => {
                conn.blocked = true;
                n
            }
            Err(e) => {
                debug!("{}: write failed: {e}", conn.peer);
                if matches!(conn.phase, Phase::Open(_)) {
                    self.hang_up(key);
                } else {
                    self.kill(key);
                }
                return;
            }
        };
        if written > 0 {
            let m = &self.shared.metrics.loops[self.id];
            add(&m.bytes_out, written as u64);
            inc(&m.writes);
        }
    }
}
