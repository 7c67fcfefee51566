//! One event loop of the load generator: its share of the connections, driven through the
//! phases that [`super::run`] announces in [`Shared::phase`].
//!
//! Connection `j` of the run belongs to loop `j % threads`, is on channel `j % channels`, goes
//! to target `(j / channels) % targets` from source address `j % sources`. Channel `c`'s
//! publisher is connection `c`, so the loop that owns it keeps that channel's schedule.
//!
//! Per received frame the work is: parse the header in place, decode 41 hex digits, one
//! [`SeqTracker`] update, one histogram record. Receipt time is read once per `read` call (all
//! frames in one read arrived together), not once per frame.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::payload::{self, Payload, now_nanos};
use super::run::{Phase, Shared};
use super::stats::{Arrival, Histogram, SeqTracker};
use super::sys;
use wsrelay_client::wire::{self, Parsed, Response, op};

/// Bytes read per `read` call; the buffer is shared by all of the loop's connections.
const READ_BUF: usize = 256 * 1024;
/// How often a probe is sent on each channel during the probe phase.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// A send this much later than its schedule counts as late.
const LATE_NS: u64 = 10_000_000;
/// Most messages one channel publishes per loop turn when behind, so reads are not starved.
const PUBLISH_BUDGET: u64 = 4096;

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// Where a connection is in its life.
enum State {
    /// Not started yet (waiting for a connect slot).
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent; holds the response bytes so far.
    Handshake(Vec<u8>),
    /// A WebSocket.
    Open,
    /// Gone: failed, or closed by the server.
    Closed,
}

struct Conn {
    /// Global index (see the module doc).
    index: usize,
    channel: u32,
    sock: Option<TcpStream>,
    state: State,
    /// The unparsed tail of the last read (a frame split across reads); usually empty.
    carry: Vec<u8>,
    /// Bytes waiting for the socket to accept them (publishes, pongs); usually empty.
    out: Vec<u8>,
    tracker: SeqTracker,
    /// A probe arrived: the server delivers this channel to it.
    live: bool,
    /// The WebSocket handshake completed.
    established: bool,
}

/// What one loop hands back when the run is over.
pub(super) struct WorkerResult {
    /// (channel, tracker, established) of every connection.
    pub conns: Vec<(u32, SeqTracker, bool)>,
    pub hist: Histogram,
    pub measured: u64,
    /// Receipt time of the last measured delivery, ns.
    pub last_receipt: u64,
    pub misrouted: u64,
    pub foreign: u64,
    pub fragmented: u64,
    pub dropped: u64,
    pub pings: u64,
    /// Share of the measured window this thread was on a CPU.
    pub busy: f64,
    pub publisher: PublisherStats,
}

/// Schedule keeping of the channels this loop publishes.
#[derive(Default, Clone, Copy)]
pub(super) struct PublisherStats {
    pub sent: u64,
    pub max_lateness_ns: u64,
    pub late_sends: u64,
}

impl PublisherStats {
    pub(super) fn on_send(&mut self, scheduled: u64, now: u64) {
        let late = now.saturating_sub(scheduled);
        self.max_lateness_ns = self.max_lateness_ns.max(late);
        self.late_sends += u64::from(late > LATE_NS);
        self.sent += 1;
    }

    pub(super) fn merge(&mut self, o: &PublisherStats) {
        self.sent += o.sent;
        self.max_lateness_ns = self.max_lateness_ns.max(o.max_lateness_ns);
        self.late_sends += o.late_sends;
    }
}

/// Counters of one loop, kept apart from the connections so a frame handler can borrow both.
#[derive(Default)]
struct Tally {
    hist: Histogram,
    measured: u64,
    last_receipt: u64,
    misrouted: u64,
    foreign: u64,
    fragmented: u64,
    dropped: u64,
    pings: u64,
    /// Messages received since the last report to `Shared::received`.
    received: u64,
    /// Distinct messages received on this loop (for drain completion).
    distinct: u64,
    /// Newly live connections since the last report to `Shared::live`.
    newly_live: usize,
    /// Measured window start (ns), once known.
    measure_from: u64,
    /// Observe mode: the warmup (ns) to add to the first message's send time.
    observe_warmup: Option<u64>,
}

pub(super) struct Worker {
    id: usize,
    shared: Arc<Shared>,
    poll: Poll,
    conns: Vec<Conn>,
    /// Next connection (position in `conns`) to start connecting.
    next_connect: usize,
    in_flight: usize,
    max_in_flight: usize,
    buf: Vec<u8>,
    tally: Tally,
    /// Channels this loop publishes: (channel, position of its publisher in `conns`, next seq).
    publishes: Vec<(u32, usize, u64)>,
    publisher: PublisherStats,
    publish_done: bool,
    /// Subscribers per channel on this loop, counted when the run starts.
    members: Vec<u64>,
    scratch: Vec<u8>,
    cpu_mark: Option<(Instant, Duration)>,
    busy: f64,
}

impl Worker {
    pub(super) fn new(id: usize, shared: Arc<Shared>) -> io::Result<Worker> {
        let cfg = &shared.cfg;
        let t = cfg.threads;
        let conns: Vec<Conn> = (id..cfg.connections)
            .step_by(t)
            .map(|index| Conn {
                index,
                channel: (index % cfg.channels) as u32,
                sock: None,
                state: State::Idle,
                carry: Vec::new(),
                out: Vec::new(),
                tracker: SeqTracker::default(),
                live: false,
                established: false,
            })
            .collect();
        let publishes = if cfg.publish_via.is_some() {
            Vec::new()
        } else {
            // Connection c is channel c's publisher (and for observers, its prober).
            conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.index < cfg.channels)
                .map(|(pos, c)| (c.channel, pos, 0))
                .collect()
        };
        let max_in_flight = cfg.connect_concurrency.div_ceil(t);
        Ok(Worker {
            id,
            poll: Poll::new()?,
            members: vec![0; cfg.channels],
            conns,
            next_connect: 0,
            in_flight: 0,
            max_in_flight,
            buf: vec![0; READ_BUF],
            tally: Tally {
                observe_warmup: cfg.observe.then_some(cfg.warmup.as_nanos() as u64),
                ..Tally::default()
            },
            publishes,
            publisher: PublisherStats::default(),
            publish_done: false,
            scratch: Vec::with_capacity(cfg.size + 16),
            cpu_mark: None,
            busy: 0.0,
            shared,
        })
    }

    /// Runs the loop until the run is done.
    pub(super) fn run(mut self) -> io::Result<WorkerResult> {
        let mut events = Events::with_capacity(1024);
        let mut next_probe = Instant::now();
        let mut run_started = false;
        loop {
            let phase = self.shared.phase();
            if phase == Phase::Done {
                break;
            }
            let timeout = self.poll_timeout(phase);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let pos = ev.token().0;
                if ev.is_writable() {
                    self.on_writable(pos);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(pos);
                }
            }
            match phase {
                Phase::Connect => self.start_connects(),
                Phase::Probe => {
                    if Instant::now() >= next_probe && self.shared.cfg.publish_via.is_none() {
                        self.send_probes();
                        next_probe = Instant::now() + PROBE_EVERY;
                    }
                }
                Phase::Run | Phase::Drain => {
                    if !run_started {
                        run_started = true;
                        self.count_members();
                        if !self.shared.cfg.observe {
                            self.tally.measure_from = self.shared.measure_from.load(Ordering::Acquire);
                        }
                    }
                    self.publish();
                    self.mark_window();
                    if phase == Phase::Drain {
                        self.check_drained();
                    }
                }
                Phase::Done => {}
            }
            self.report_progress();
        }
        if let Some((at, cpu)) = self.cpu_mark.take() {
            let wall = at.elapsed().as_secs_f64();
            if wall > 0.0 {
                self.busy = (sys::thread_cpu() - cpu).as_secs_f64() / wall;
            }
        }
        Ok(self.finish())
    }

    fn poll_timeout(&self, phase: Phase) -> Duration {
        const TICK: Duration = Duration::from_millis(10);
        if phase != Phase::Run || self.publish_done || self.publishes.is_empty() {
            return TICK;
        }
        let sched = self.shared.schedule();
        let now = now_nanos();
        let next = self
            .publishes
            .iter()
            .map(|&(c, _, seq)| sched.at(c as usize, seq))
            .min()
            .unwrap_or(u64::MAX);
        // epoll waits in whole milliseconds (mio rounds up), so a due message waits ≤ 1 ms.
        Duration::from_nanos(next.saturating_sub(now)).min(TICK)
    }

    /// Pushes loop-local counters to the shared ones the orchestrator watches.
    fn report_progress(&mut self) {
        if self.tally.newly_live > 0 {
            self.shared
                .live
                .fetch_add(std::mem::take(&mut self.tally.newly_live), Ordering::AcqRel);
        }
        if let (Some(_), from @ 1..) = (self.tally.observe_warmup, self.tally.measure_from) {
            // Every loop of this process measures from the same instant: the first one's.
            self.tally.measure_from = observe_window(&self.shared, from);
        }
        if self.tally.received > 0 {
            self.shared
                .received
                .fetch_add(std::mem::take(&mut self.tally.received), Ordering::AcqRel);
        }
    }

    // ---- connect phase -------------------------------------------------------------------

    fn start_connects(&mut self) {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        while self.in_flight < self.max_in_flight && self.next_connect < self.conns.len() {
            let pos = self.next_connect;
            self.next_connect += 1;
            let index = self.conns[pos].index;
            let target = &cfg.targets[(index / cfg.channels) % cfg.targets.len()];
            let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[index % cfg.source_ips.len()]);
            match sys::connect(target.addr, source) {
                Ok(mut sock) => {
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(pos),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        self.fail(pos, format!("register: {e}"));
                        continue;
                    }
                    self.conns[pos].sock = Some(sock);
                    self.conns[pos].state = State::Connecting;
                    self.in_flight += 1;
                }
                Err(e) => self.fail(pos, format!("connect to {}: {e}", target.addr)),
            }
        }
    }

    /// A connection that never became a WebSocket.
    fn fail(&mut self, pos: usize, why: String) {
        let conn = &mut self.conns[pos];
        if matches!(conn.state, State::Connecting | State::Handshake(_)) {
            self.in_flight -= 1;
        }
        conn.state = State::Closed;
        if let Some(mut s) = conn.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        self.shared.failed.fetch_add(1, Ordering::AcqRel);
        self.shared.note_error(why);
    }

    /// An open connection the server closed or reset.
    fn drop_conn(&mut self, pos: usize) {
        let conn = &mut self.conns[pos];
        conn.state = State::Closed;
        if let Some(mut s) = conn.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        conn.carry = Vec::new();
        conn.out = Vec::new();
        self.tally.dropped += 1;
        self.shared.dropped.fetch_add(1, Ordering::AcqRel);
    }

    fn on_writable(&mut self, pos: usize) {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let Some(conn) = self.conns.get_mut(pos) else {
            return;
        };
        match conn.state {
            State::Connecting => {
                let sock = conn.sock.as_mut().expect("connecting socket");
                // Writable means the connect finished, one way or the other.
                if let Ok(Some(e)) | Err(e) = sock.take_error() {
                    return self.fail(pos, format!("connect: {e}"));
                }
                match sock.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                    Err(e) => return self.fail(pos, format!("connect: {e}")),
                }
                let target = &cfg.targets[(conn.index / cfg.channels) % cfg.targets.len()];
                let path = cfg.channel_path(target, conn.channel as usize);
                conn.out = wire::request(&target.host, &path);
                conn.state = State::Handshake(Vec::new());
                if self.write_out(pos).is_err() {
                    self.fail(pos, "write of the upgrade request failed".into());
                }
            }
            State::Handshake(_) | State::Open => {
                if self.write_out(pos).is_err() {
                    self.on_write_error(pos);
                }
            }
            State::Idle | State::Closed => {}
        }
    }

    fn on_write_error(&mut self, pos: usize) {
        if matches!(self.conns[pos].state, State::Open) {
            self.drop_conn(pos);
        } else {
            self.fail(pos, "write failed during the handshake".into());
        }
    }

    /// Writes pending output until done or WouldBlock (edge-triggered: a later writable event
    /// resumes it).
    fn write_out(&mut self, pos: usize) -> io::Result<()> {
        let conn = &mut self.conns[pos];
        let Some(sock) = conn.sock.as_mut() else {
            return Ok(());
        };
        let mut done = 0;
        while done < conn.out.len() {
            match sock.write(&conn.out[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if done == conn.out.len() {
            conn.out.clear();
        } else {
            conn.out.drain(..done);
        }
        Ok(())
    }

    // ---- reading -------------------------------------------------------------------------

    fn on_readable(&mut self, pos: usize) {
        let Some(conn) = self.conns.get_mut(pos) else {
            return;
        };
        match conn.state {
            State::Handshake(_) => self.read_handshake(pos),
            State::Open => self.read_frames(pos),
            // A refused connect shows up as an error event before writable.
            State::Connecting => self.on_writable(pos),
            State::Idle | State::Closed => {}
        }
    }

    fn read_handshake(&mut self, pos: usize) {
        loop {
            let conn = &mut self.conns[pos];
            let (State::Handshake(head), Some(sock)) = (&mut conn.state, conn.sock.as_mut()) else {
                return;
            };
            match sock.read(&mut self.buf) {
                Ok(0) => return self.fail(pos, "server closed during the handshake".into()),
                Ok(n) => {
                    head.extend_from_slice(&self.buf[..n]);
                    match wire::response(head) {
                        Response::Partial => {}
                        Response::Refused(line) => {
                            return self.fail(pos, format!("upgrade refused: {line}"));
                        }
                        Response::Upgraded(at) => {
                            // Frames that came with the response are handled like any read.
                            let rest = head.split_off(at);
                            conn.state = State::Open;
                            conn.established = true;
                            self.in_flight -= 1;
                            self.shared.open.fetch_add(1, Ordering::AcqRel);
                            if !rest.is_empty() {
                                let n = rest.len();
                                self.buf[..n].copy_from_slice(&rest);
                                self.consume(pos, n, now_nanos());
                            }
                            return self.read_frames(pos);
                        }
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => {}
                Err(e) => return self.fail(pos, format!("handshake read: {e}")),
            }
        }
    }

    /// Reads until WouldBlock (edge-triggered), handling every complete frame.
    fn read_frames(&mut self, pos: usize) {
        loop {
            let conn = &mut self.conns[pos];
            let Some(sock) = conn.sock.as_mut() else {
                return;
            };
            // A frame split by the previous read goes in front of this read's bytes.
            let carry = conn.carry.len();
            if self.buf.len() < carry + READ_BUF / 2 {
                self.buf.resize(carry + READ_BUF, 0);
            }
            self.buf[..carry].copy_from_slice(&conn.carry);
            match sock.read(&mut self.buf[carry..]) {
                Ok(0) => return self.drop_conn(pos),
                Ok(n) => {
                    let now = now_nanos();
                    if !self.consume(pos, carry + n, now) {
                        return;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => return self.drop_conn(pos),
            }
        }
        if !self.conns[pos].out.is_empty() && self.write_out(pos).is_err() {
            self.drop_conn(pos);
        }
    }

    /// Handles the frames in `buf[..len]`, keeping a split tail in the connection's carry.
    /// False when the connection is gone.
    fn consume(&mut self, pos: usize, len: usize, now: u64) -> bool {
        let conn = &mut self.conns[pos];
        let mut at = 0;
        let mut closed = false;
        while at < len {
            match wire::parse(&self.buf[at..len]) {
                Parsed::Partial => break,
                Parsed::Invalid(_) => {
                    closed = true;
                    break;
                }
                Parsed::Frame(f, used) => {
                    at += used;
                    match f.opcode {
                        op::TEXT | op::BINARY if f.fin => {
                            on_data(conn, &mut self.tally, f.payload, now);
                        }
                        op::TEXT | op::BINARY | op::CONTINUATION => self.tally.fragmented += 1,
                        op::PING => {
                            self.tally.pings += 1;
                            wire::encode_masked(&mut conn.out, op::PONG, f.payload);
                        }
                        op::CLOSE => {
                            // Echo the status code, as the close handshake asks.
                            let code = f.payload.get(..2).unwrap_or_default();
                            wire::encode_masked(&mut conn.out, op::CLOSE, code);
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
            }
        }
        conn.carry.clear();
        if !closed && at < len {
            conn.carry.extend_from_slice(&self.buf[at..len]);
        }
        if closed {
            let _ = self.write_out(pos);
            self.drop_conn(pos);
            return false;
        }
        true
    }

    // ---- probing and publishing ------------------------------------------------------------

    fn send_probes(&mut self) {
        let size = self.shared.cfg.size;
        for i in 0..self.publishes.len() {
            let (channel, pos, _) = self.publishes[i];
            if !matches!(self.conns[pos].state, State::Open) {
                continue;
            }
            payload::encode(&mut self.scratch, Payload::Probe { channel }, size);
            wire::encode_masked(&mut self.conns[pos].out, op::TEXT, &self.scratch);
            if self.write_out(pos).is_err() {
                self.drop_conn(pos);
            }
        }
    }

    fn count_members(&mut self) {
        for c in &self.conns {
            if matches!(c.state, State::Open) {
                self.members[c.channel as usize] += 1;
            }
        }
    }

    /// Sends every message that is due on this loop's channels; several due messages of one
    /// channel go out in one write.
    fn publish(&mut self) {
        if self.publish_done || self.shared.cfg.observe || self.publishes.is_empty() {
            return;
        }
        let sched = self.shared.schedule();
        let size = self.shared.cfg.size;
        let now = now_nanos();
        for i in 0..self.publishes.len() {
            let (channel, pos, mut seq) = self.publishes[i];
            let first = seq;
            while seq - first < PUBLISH_BUDGET {
                let at = sched.at(channel as usize, seq);
                if at > now || at >= sched.end {
                    break;
                }
                if !matches!(self.conns[pos].state, State::Open) {
                    break;
                }
                let m = Payload::Message {
                    channel,
                    seq,
                    sent: now_nanos(),
                };
                payload::encode(&mut self.scratch, m, size);
                wire::encode_masked(&mut self.conns[pos].out, op::TEXT, &self.scratch);
                self.publisher.on_send(at, now);
                seq += 1;
            }
            if seq != first {
                self.publishes[i].2 = seq;
                self.shared.sent[channel as usize].store(seq, Ordering::Release);
                if self.write_out(pos).is_err() {
                    self.drop_conn(pos);
                }
            }
        }
        if now >= sched.end {
            self.publish_done = true;
            self.shared.publishers_done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Starts this thread's CPU accounting when the measured window begins.
    fn mark_window(&mut self) {
        if self.cpu_mark.is_some() {
            return;
        }
        let from = self.tally.measure_from;
        if from != 0 && now_nanos() >= from {
            self.cpu_mark = Some((Instant::now(), sys::thread_cpu()));
        }
    }

    /// Tells the orchestrator once every delivery this loop expects has arrived.
    fn check_drained(&mut self) {
        if self.shared.cfg.observe || self.shared.drained_flags[self.id].load(Ordering::Acquire) {
            return;
        }
        let expected: u64 = self
            .members
            .iter()
            .enumerate()
            .map(|(c, &m)| m * self.shared.sent[c].load(Ordering::Acquire))
            .sum();
        if self.tally.distinct >= expected {
            self.shared.drained_flags[self.id].store(true, Ordering::Release);
        }
    }

    fn finish(self) -> WorkerResult {
        let t = self.tally;
        WorkerResult {
            conns: self
                .conns
                .into_iter()
                .map(|c| (c.channel, c.tracker, c.established))
                .collect(),
            hist: t.hist,
            measured: t.measured,
            last_receipt: t.last_receipt,
            misrouted: t.misrouted,
            foreign: t.foreign,
            fragmented: t.fragmented,
            dropped: t.dropped,
            pings: t.pings,
            busy: self.busy,
            publisher: self.publisher,
        }
    }
}

/// One data frame: a measured message, a probe, or someone else's traffic.
#[inline]
fn on_data(conn: &mut Conn, t: &mut Tally, data: &[u8], now: u64) {
    match payload::decode(data) {
        Some(Payload::Message { channel, seq, sent }) => {
            if channel != conn.channel {
                t.misrouted += 1;
                return;
            }
            t.received += 1;
            if conn.tracker.on(seq) != Arrival::Duplicate {
                t.distinct += 1;
            }
            if t.measure_from == 0 {
                match t.observe_warmup {
                    Some(w) => t.measure_from = sent + w,
                    None => return,
                }
            }
            if sent >= t.measure_from {
                t.hist.record(now.saturating_sub(sent));
                t.measured += 1;
                t.last_receipt = now;
            }
        }
        Some(Payload::Probe { channel }) => {
            if channel == conn.channel && !conn.live {
                conn.live = true;
                t.newly_live += 1;
            }
        }
        None => t.foreign += 1,
    }
}

/// Observe mode: the measured window starts `warmup` after the first message seen anywhere
/// in this process (another generator publishes; its schedule is not known here).
fn observe_window(shared: &Shared, from: u64) -> u64 {
    match shared
        .first_measured
        .compare_exchange(0, from, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => from,
        Err(existing) => existing,
    }
}
