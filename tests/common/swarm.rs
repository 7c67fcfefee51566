//! Many `wsrelay.v1` clients on a few threads (nonblocking sockets, one mio poll per thread),
//! behaving as the README says clients should: each keeps its session id, reconnects with
//! jittered exponential backoff after any close or failure, resumes with `?session=ID`, and
//! drops duplicates by offset. Each one checks, as messages arrive, that its channels' offsets
//! go up one at a time, and keeps what it received for the test to compare with what was
//! published. Included with `#[path = "common/swarm.rs"] mod swarm;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// First reconnect delay ceiling; doubles per failed attempt (full jitter, as the shipped
/// clients do).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a worker looks at its clients without an event (timers, the final targets).
const TICK: Duration = Duration::from_millis(20);

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to connect (the balancer).
    pub target: SocketAddr,
    /// How many clients.
    pub clients: usize,
    /// Channel names; client `i` subscribes to `per_client` consecutive ones from `i`.
    pub channels: Vec<String>,
    /// Channels per client.
    pub per_client: usize,
    /// Worker threads.
    pub threads: usize,
}

/// One channel as one client saw it.
#[derive(Debug, Default, Clone)]
pub struct ChannelLog {
    /// Channel name.
    pub name: String,
    /// Offset of the channel when the client first subscribed (it receives what follows).
    pub start: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Offset of the last message delivered (after dropping duplicates).
    pub last: u64,
    /// Every message delivered, in order: (offset, data).
    pub got: Vec<(u64, String)>,
    /// Messages received again (offset not above `last`) and dropped.
    pub duplicates: u64,
}

/// What one client went through.
#[derive(Debug, Default)]
pub struct Report {
    /// Client number.
    pub id: usize,
    /// Its channels.
    pub channels: Vec<ChannelLog>,
    /// For every reconnect: from losing the connection to having every channel back.
    pub reconnects: Vec<Duration>,
    /// Close codes received (`None`: the connection failed without a close frame).
    pub closes: Vec<Option<u16>>,
    /// Most consecutive failed connection attempts.
    pub worst_attempts: u32,
    /// Anything a correct server never does: a session not resumed, `recovered: false`, a gap,
    /// an epoch change, an error reply.
    pub failures: Vec<String>,
    /// Connected and subscribed when the swarm stopped.
    pub ready: bool,
}

/// What the test can watch while the swarm runs.
#[derive(Default)]
pub struct Progress {
    /// Clients connected with every channel subscribed, right now.
    pub ready: AtomicUsize,
    /// Clients that have every message up to `targets`.
    pub caught_up: AtomicUsize,
    /// Connections lost so far (closes and failures of open connections).
    pub lost: AtomicUsize,
    targets: Mutex<Option<HashMap<String, u64>>>,
    has_targets: AtomicBool,
    stop: AtomicBool,
}

impl Progress {
    /// The last offset of each channel: clients count as caught up once they have them.
    pub fn set_targets(&self, targets: HashMap<String, u64>) {
        *self.targets.lock().unwrap() = Some(targets);
        self.has_targets.store(true, Ordering::Release);
    }
}

/// A running swarm.
pub struct Swarm {
    /// Watch it.
    pub progress: Arc<Progress>,
    threads: Vec<JoinHandle<Vec<Report>>>,
}

impl Swarm {
    /// Starts `config.clients` clients over `config.threads` threads.
    pub fn start(config: Config) -> Swarm {
        let progress = Arc::new(Progress::default());
        let threads = (0..config.threads)
            .map(|t| {
                let ids: Vec<usize> = (t..config.clients).step_by(config.threads).collect();
                let (config, progress) = (config.clone(), progress.clone());
                std::thread::Builder::new()
                    .name(format!("swarm-{t}"))
                    .spawn(move || Worker::new(config, ids, progress).run())
                    .unwrap()
            })
            .collect();
        Swarm { progress, threads }
    }

    /// Stops every client and returns what each saw, by client number.
    pub fn stop(self) -> Vec<Report> {
        self.progress.stop.store(true, Ordering::Release);
        let mut all: Vec<Report> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("swarm thread"))
            .collect();
        all.sort_by_key(|r| r.id);
        all
    }
}

/// The server's frames, as far as these clients read them.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    channel: Option<String>,
    offset: Option<u64>,
    epoch: Option<String>,
    data: Option<String>,
    session: Option<String>,
    resumed: Option<bool>,
    recovered: Option<bool>,
    code: Option<String>,
    message: Option<String>,
}

enum State {
    /// Waiting to (re)connect.
    Waiting { until: Instant },
    /// TCP connect in progress.
    Connecting(TcpStream),
    /// The upgrade request is out; waiting for the 101.
    Handshaking(MidHandshake<ClientHandshake<TcpStream>>),
    /// A WebSocket.
    Open(Box<WebSocket<TcpStream>>),
    /// Swapped out while a transition is computed.
    Gone,
}

struct Sim {
    report: Report,
    state: State,
    session: Option<String>,
    /// Channels not announced (`subscribed`) yet on this connection.
    awaiting: usize,
    /// When the connection was lost (set until every channel is back).
    lost_at: Option<Instant>,
    attempts: u32,
    ready: bool,
    caught_up: bool,
    /// Bytes that did not fit the socket: flush when writable.
    unflushed: bool,
}

struct Worker {
    config: Config,
    progress: Arc<Progress>,
    poll: Poll,
    sims: Vec<Sim>,
    ws_config: WebSocketConfig,
}

impl Worker {
    fn new(config: Config, ids: Vec<usize>, progress: Arc<Progress>) -> Worker {
        let now = Instant::now();
        let n = config.channels.len();
        let sims = ids
            .into_iter()
            .map(|id| Sim {
                report: Report {
                    id,
                    channels: (0..config.per_client)
                        .map(|k| ChannelLog {
                            name: config.channels[(id + k) % n].clone(),
                            ..ChannelLog::default()
                        })
                        .collect(),
                    ..Report::default()
                },
                // Spread the first connections over 100 ms.
                state: State::Waiting {
                    until: now + Duration::from_micros(fastrand::u64(0..100_000)),
                },
                session: None,
                awaiting: 0,
                lost_at: None,
                attempts: 0,
                ready: false,
                caught_up: false,
                unflushed: false,
            })
            .collect();
        Worker {
            config,
            progress,
            poll: Poll::new().unwrap(),
            sims,
            ws_config: WebSocketConfig::default().read_buffer_size(4096),
        }
    }

    fn run(mut self) -> Vec<Report> {
        let mut events = Events::with_capacity(1024);
        while !self.progress.stop.load(Ordering::Acquire) {
            match self.poll.poll(&mut events, Some(TICK)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("swarm poll: {e}"),
            }
            let now = Instant::now();
            let ready: Vec<(usize, bool)> = events.iter().map(|e| (e.token().0, e.is_writable())).collect();
            for (i, writable) in ready {
                self.drive(i, writable, now);
            }
            let targets = self
                .progress
                .has_targets
                .load(Ordering::Acquire)
                .then(|| self.progress.targets.lock().unwrap().clone())
                .flatten();
            for i in 0..self.sims.len() {
                if matches!(self.sims[i].state, State::Waiting { until } if now >= until) {
                    self.connect(i, now);
                }
                if let Some(t) = &targets {
                    self.check_caught_up(i, t);
                }
            }
        }
        let progress = self.progress.clone();
        self.sims
            .into_iter()
            .map(|mut s| {
                s.report.ready = s.ready;
                if s.ready {
                    progress.ready.fetch_sub(1, Ordering::AcqRel);
                }
                s.report
            })
            .collect()
    }

    fn connect(&mut self, i: usize, now: Instant) {
        match TcpStream::connect(self.config.target) {
            Ok(mut sock) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                self.poll
                    .registry()
                    .register(&mut sock, Token(i), interest)
                    .unwrap();
                self.sims[i].state = State::Connecting(sock);
            }
            Err(e) => self.failed(i, &format!("connect: {e}"), now),
        }
    }

    /// Moves client `i` on after an event, until it would block.
    fn drive(&mut self, i: usize, writable: bool, now: Instant) {
        let state = std::mem::replace(&mut self.sims[i].state, State::Gone);
        let next = match state {
            State::Connecting(sock) => match sock.take_error() {
                Ok(Some(e)) | Err(e) => return self.failed(i, &format!("connect: {e}"), now),
                Ok(None) if sock.peer_addr().is_err() => State::Connecting(sock),
                Ok(None) => self.start_handshake(i, sock, now),
            },
            State::Handshaking(mid) => self.handshake_step(i, mid.handshake(), now),
            State::Open(ws) => State::Open(ws),
            other => other,
        };
        self.sims[i].state = next;
        if matches!(self.sims[i].state, State::Open(_)) {
            if writable && self.sims[i].unflushed {
                self.flush(i, now);
            }
            self.read(i, now);
        }
    }

    fn start_handshake(&mut self, i: usize, sock: TcpStream, now: Instant) -> State {
        let sim = &self.sims[i];
        let query = sim
            .session
            .as_ref()
            .map(|s| format!("?session={s}"))
            .unwrap_or_default();
        let mut req = format!("ws://{}/{query}", self.config.target)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "wsrelay.v1".parse().unwrap());
        let result = tungstenite::client::client_with_config(req, sock, Some(self.ws_config));
        self.handshake_step(i, result, now)
    }

    fn handshake_step(
        &mut self,
        i: usize,
        result: Result<
            (WebSocket<TcpStream>, tungstenite::handshake::client::Response),
            HandshakeError<ClientHandshake<TcpStream>>,
        >,
        now: Instant,
    ) -> State {
        match result {
            Ok((ws, _)) => State::Open(Box::new(ws)),
            Err(HandshakeError::Interrupted(mid)) => State::Handshaking(mid),
            Err(HandshakeError::Failure(e)) => {
                self.failed(i, &format!("handshake: {e}"), now);
                std::mem::replace(&mut self.sims[i].state, State::Gone)
            }
        }
    }

    /// A connection attempt, or an open connection, failed: wait and try again.
    fn failed(&mut self, i: usize, _why: &str, now: Instant) {
        let sim = &mut self.sims[i];
        if matches!(sim.state, State::Open(_)) {
            self.progress.lost.fetch_add(1, Ordering::Relaxed);
        }
        if sim.ready {
            sim.ready = false;
            self.progress.ready.fetch_sub(1, Ordering::AcqRel);
        }
        sim.lost_at.get_or_insert(now);
        sim.attempts += 1;
        sim.report.worst_attempts = sim.report.worst_attempts.max(sim.attempts);
        sim.unflushed = false;
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << (sim.attempts - 1).min(16))
            .min(BACKOFF_MAX);
        let delay = Duration::from_micros(fastrand::u64(0..=ceiling.as_micros() as u64));
        sim.state = State::Waiting { until: now + delay };
    }

    fn read(&mut self, i: usize, now: Instant) {
        loop {
            let State::Open(ws) = &mut self.sims[i].state else {
                return;
            };
            match ws.read() {
                Ok(Message::Text(t)) => self.on_frame(i, t.as_str(), now),
                Ok(Message::Close(f)) => {
                    let code = f.map(|f| u16::from(f.code));
                    self.sims[i].report.closes.push(code);
                    // Our reply goes out if it can; the connection is done either way.
                    if let State::Open(ws) = &mut self.sims[i].state {
                        let _ = ws.flush();
                    }
                    return self.failed(i, "closed", now);
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.sims[i].report.closes.push(None);
                    return self.failed(i, &format!("read: {e}"), now);
                }
            }
        }
        // Pongs and close replies tungstenite queued while reading.
        self.flush(i, now);
    }

    fn send(&mut self, i: usize, cmd: serde_json::Value, now: Instant) {
        let State::Open(ws) = &mut self.sims[i].state else {
            return;
        };
        match ws.write(Message::text(cmd.to_string())) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return self.failed(i, &format!("write: {e}"), now),
        }
        self.flush(i, now);
    }

    fn flush(&mut self, i: usize, now: Instant) {
        let State::Open(ws) = &mut self.sims[i].state else {
            return;
        };
        match ws.flush() {
            Ok(()) => self.sims[i].unflushed = false,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.sims[i].unflushed = true;
            }
            Err(e) => self.failed(i, &format!("flush: {e}"), now),
        }
    }

    fn on_frame(&mut self, i: usize, text: &str, now: Instant) {
        let f: Frame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                self.sims[i]
                    .report
                    .failures
                    .push(format!("bad frame {text:?}: {e}"));
                return;
            }
        };
        match f.kind.as_str() {
            "welcome" => self.on_welcome(i, f, now),
            "subscribed" => self.on_subscribed(i, f, now),
            "message" => self.on_message(i, f),
            "pong" => {}
            _ => {
                let what = format!(
                    "{} {}: {}",
                    f.kind,
                    f.code.unwrap_or_default(),
                    f.message.unwrap_or_default()
                );
                self.sims[i].report.failures.push(what);
            }
        }
    }

    fn on_welcome(&mut self, i: usize, f: Frame, now: Instant) {
        let sim = &mut self.sims[i];
        let first = sim.session.is_none();
        sim.awaiting = sim.report.channels.len();
        if !first && f.resumed != Some(true) {
            sim.report
                .failures
                .push(format!("session {:?} not resumed", sim.session));
        }
        sim.session = f.session;
        if first || f.resumed != Some(true) {
            // Subscribe, recovering from our own position when we have one.
            let cmds: Vec<serde_json::Value> = sim
                .report
                .channels
                .iter()
                .map(|c| {
                    let mut cmd = serde_json::json!({"op": "subscribe", "channel": c.name});
                    if !first {
                        cmd["offset"] = c.last.into();
                        cmd["epoch"] = c.epoch.clone().into();
                    }
                    cmd
                })
                .collect();
            for cmd in cmds {
                self.send(i, cmd, now);
            }
        }
    }

    fn on_subscribed(&mut self, i: usize, f: Frame, now: Instant) {
        let sim = &mut self.sims[i];
        let name = f.channel.unwrap_or_default();
        let Some(c) = sim.report.channels.iter_mut().find(|c| c.name == name) else {
            sim.report
                .failures
                .push(format!("subscribed to {name}, never asked"));
            return;
        };
        let (offset, epoch) = (f.offset.unwrap_or(0), f.epoch.unwrap_or_default());
        if c.epoch.is_empty() {
            // The first subscription: messages after `offset` are this client's to receive.
            (c.start, c.last, c.epoch) = (offset, offset, epoch);
        } else {
            if f.recovered != Some(true) {
                sim.report.failures.push(format!(
                    "{name}: recovered {:?} resuming after {} (now at {offset})",
                    f.recovered, c.last
                ));
                c.last = c.last.max(offset);
            }
            if epoch != c.epoch {
                sim.report.failures.push(format!("{name}: epoch changed"));
            }
        }
        sim.awaiting = sim.awaiting.saturating_sub(1);
        if sim.awaiting == 0 && !sim.ready {
            sim.ready = true;
            sim.attempts = 0;
            if let Some(t) = sim.lost_at.take() {
                sim.report.reconnects.push(now - t);
            }
            self.progress.ready.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn on_message(&mut self, i: usize, f: Frame) {
        let sim = &mut self.sims[i];
        let name = f.channel.unwrap_or_default();
        let Some(c) = sim.report.channels.iter_mut().find(|c| c.name == name) else {
            sim.report
                .failures
                .push(format!("message on {name}, not subscribed"));
            return;
        };
        let Some(offset) = f.offset else {
            sim.report
                .failures
                .push(format!("{name}: message without offset"));
            return;
        };
        if offset <= c.last {
            c.duplicates += 1;
            return;
        }
        if offset != c.last + 1 {
            sim.report
                .failures
                .push(format!("{name}: gap from {} to {offset}", c.last));
        }
        c.last = offset;
        c.got.push((offset, f.data.unwrap_or_default()));
    }

    fn check_caught_up(&mut self, i: usize, targets: &HashMap<String, u64>) {
        let sim = &mut self.sims[i];
        if sim.caught_up {
            return;
        }
        let done = sim
            .report
            .channels
            .iter()
            .all(|c| targets.get(&c.name).is_some_and(|t| c.last >= *t));
        if done {
            sim.caught_up = true;
            self.progress.caught_up.fetch_add(1, Ordering::AcqRel);
        }
    }
}
