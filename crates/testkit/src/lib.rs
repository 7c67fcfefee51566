//! The harness the tests (`tests/*.rs`) and the end-to-end benchmark (`benches/e2e.rs`) share:
//! real `redis-server` and `wsrelay` processes started on ports nobody else holds, clients with
//! timeouts, waits for observable events, and what `/proc` says about a process.
//!
//! Nothing here sleeps to synchronise: readiness is observed (a log line, a PING answer from
//! the right process, a message coming back). Every wait has a timeout and panics with what it
//! was waiting for, at the caller's line (`#[track_caller]`).
//!
//! ```no_run
//! use wsrelay_testkit::{Node, Redis, WAIT};
//!
//! let redis = Redis::start();
//! let node = Node::start(&["--redis", &redis.url()]);
//! let mut c = node.client("/news");
//! c.sync("ready", WAIT).unwrap(); // its channel is live once its own message comes back
//! assert_eq!(node.metric("wsrelay_websockets"), 1);
//! ```
#![deny(missing_docs, rust_2018_idioms)]

pub mod cluster;
pub mod delivery;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use wsrelay_client::{Api, Client, PROTOCOL, Received, TOKEN_EXPIRED, V1, wire};

/// Default timeout for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// Connects to `to` from the loopback address `from_ip` (any 127.x.y.z works on Linux), to
/// play several clients with different addresses.
pub fn connect_from(from_ip: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{from_ip}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into())
        .unwrap_or_else(|e| panic!("connect {to} from {from_ip}: {e}"));
    s.into()
}

/// Polls `f` every few milliseconds until it returns `Some`, or panics after `timeout`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The process id of the Redis server answering at `url`, if any answers.
fn redis_server_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut con).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()
}

/// A port on 127.0.0.1 that refuses connections for as long as this value lives: its socket
/// is bound (so nobody else can take the port) but never listens. For "nothing is there" tests,
/// without the race of a port that was free a moment ago.
pub struct ClosedPort {
    socket: socket2::Socket,
}

impl ClosedPort {
    /// Binds a fresh port without listening on it.
    pub fn new() -> ClosedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        ClosedPort { socket }
    }

    /// The address: connecting to it is refused.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap().as_socket().unwrap()
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// The `wsrelay` binary under test: `CARGO_BIN_EXE_wsrelay` (cargo sets it for the root
/// package's tests and benchmarks), else the `wsrelay` next to the running test's `deps/`.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_wsrelay") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(2)
        .map(|dir| dir.join("wsrelay"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| panic!("no wsrelay binary next to {}: build it first", exe.display()))
}

/// Runs wsrelay with `args` and the environment `env` and expects it to refuse to start:
/// exit 1 with a message containing `needle` on stderr.
#[track_caller]
pub fn refuses_to_start(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wsrelay {args:?} {env:?} started; it should have refused");
        }
        // Polling a child's exit: there is nothing to wait on but time.
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
}

/// A command running `program`, under `taskset -c CPU` when a CPU is given (the process keeps
/// its pid: taskset execs it).
pub fn command(program: impl AsRef<OsStr>, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A `redis-server` started by the test (no persistence), killed on drop.
pub struct Redis {
    /// The TCP port it listens on, 127.0.0.1 only.
    pub port: u16,
    cpu: Option<usize>,
    child: Option<Child>,
}

/// How many ports [`Redis::start`] tries before giving up.
const REDIS_ATTEMPTS: usize = 5;

impl Redis {
    /// Starts a fresh server and waits until it answers.
    #[track_caller]
    pub fn start() -> Redis {
        Self::start_on_cpu(None)
    }

    /// Like [`Redis::start`], pinned to `cpu` when given.
    ///
    /// redis-server cannot listen on an ephemeral port and tell us which (`--port 0` turns TCP
    /// off), so a port is picked free here and handed to it, and another process may take it
    /// in between. Then redis-server exits at once (address in use) and start-up is tried
    /// again on a fresh port; a server answering on the port is only taken for ours when its
    /// `INFO` names our process.
    #[track_caller]
    pub fn start_on_cpu(cpu: Option<usize>) -> Redis {
        let mut failures = Vec::new();
        for _ in 0..REDIS_ATTEMPTS {
            let mut r = Redis {
                port: unused_port(),
                cpu,
                child: None,
            };
            match r.launch(&[]) {
                Ok(()) => return r,
                Err(e) => failures.push(format!("port {}: {e}", r.port)),
            }
        }
        panic!("redis-server did not start: {failures:?}");
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it answers.
    #[track_caller]
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Like [`Redis::restart`], with more `redis-server` arguments (configuration directives,
    /// e.g. `["--user", "default", "on", "nopass", "~*", "&room*", "+@all"]`).
    #[track_caller]
    pub fn restart_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "redis already running");
        if let Err(e) = self.launch(args) {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// Spawns redis-server on `self.port` and waits until it answers as itself, or exits.
    fn launch(&mut self, args: &[&str]) -> Result<(), String> {
        let mut child = command("redis-server", self.cpu)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (apt-get install redis-server): {e}"))?;
        let pid = child.id();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status}"));
            }
            if self.server_pid() == Some(pid) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer in time".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id of the server answering on the port, if any answers.
    fn server_pid(&self) -> Option<u32> {
        redis_server_pid(&self.url())
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    /// A fresh connection for commands.
    pub fn con(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    /// SIGKILLs the server (its data is gone: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now, for a program that cannot bind port 0 and report it.
/// Racy by nature: see [`Redis::start_on_cpu`] for how the race is survived.
pub fn unused_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `wsrelay` process started by the test, killed on drop.
pub struct Node {
    /// The address it listens on.
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts the binary on a port of its choosing (port 0; the real one is read from its
    /// "listening on" line) with `args`.
    pub fn start(args: &[&str]) -> Node {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Starts the binary listening on `listen` (e.g. another node's address, for SO_REUSEPORT).
    pub fn start_on(listen: &str, args: &[&str]) -> Node {
        Self::spawn(
            Command::new(server_binary())
                .args(["--listen", listen])
                .args(args),
        )
    }

    /// Starts a prepared command and waits for its "listening on" line. Its log is echoed to
    /// stderr when `WSRELAY_TEST_LOG` is set.
    pub fn spawn(cmd: &mut Command) -> Node {
        let echo = match std::env::var_os("WSRELAY_TEST_LOG") {
            Some(_) => Echo::All("[wsrelay] "),
            None => Echo::Nothing,
        };
        Self::spawn_echo(cmd, echo)
    }

    /// Like [`Node::spawn`], echoing the log lines `echo` selects.
    pub fn spawn_echo(cmd: &mut Command, echo: Echo) -> Node {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsrelay");
        let (log, rx) = watch_stderr(child.stderr.take().unwrap(), "listening on ", echo);
        let addr = match rx.recv_timeout(WAIT) {
            Ok(a) => a.split_whitespace().next().unwrap_or("").parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("wsrelay did not start: {:?}", log.lock().unwrap());
            }
        };
        Node { addr, child, log }
    }

    /// The `--proxy-listen` address, from the node's log.
    pub fn proxy_addr(&self) -> SocketAddr {
        let marker = "proxy protocol listener on ";
        let line = self.wait_log(marker);
        let rest = line.split(marker).nth(1).unwrap_or_default();
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle`.
    #[track_caller]
    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(&format!("log line {needle:?}"), WAIT, || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// A raw-protocol client on `path`.
    pub fn client(&self, path: &str) -> Client {
        Client::connect(self.addr, path).expect("connect")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for("wsrelay exit", timeout, || self.child.try_wait().unwrap())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET path` over plain HTTP; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// The value of a metric from `/metrics` (see [`metric_value`]).
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200);
        metric_value(&body, name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which of a child's log lines [`watch_stderr`] prints, with what prefix.
#[derive(Clone, Copy, Debug)]
pub enum Echo {
    /// None.
    Nothing,
    /// Every line.
    All(&'static str),
    /// Warnings and errors.
    Problems(&'static str),
}

/// Collects a child's stderr lines (draining it so the child never blocks on a full pipe) and
/// sends the rest of every line containing `marker`, after the marker. Lines `echo` selects are
/// also printed.
pub fn watch_stderr(
    stderr: std::process::ChildStderr,
    marker: &'static str,
    echo: Echo,
) -> (Arc<Mutex<Vec<String>>>, std::sync::mpsc::Receiver<String>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split(marker).nth(1) {
                let _ = tx.send(rest.trim().to_owned());
            }
            match echo {
                Echo::All(prefix) => eprintln!("{prefix}{line}"),
                Echo::Problems(prefix) if line.contains("WARN") || line.contains("ERROR") => {
                    eprintln!("{prefix}{line}")
                }
                _ => {}
            }
            sink.lock().unwrap().push(line);
        }
    });
    (log, rx)
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
#[track_caller]
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    wsrelay_load::sys::proc_status(pid, field).unwrap_or_else(|e| panic!("{e}")) / 1024
}

/// Resident memory of a process, in KiB.
#[track_caller]
pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "VmRSS")
}

/// CPU time (user + system, all threads) a process has used, at the kernel's tick resolution.
#[track_caller]
pub fn cpu_time(pid: u32) -> Duration {
    wsrelay_load::sys::proc_cpu(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// The value of `name` in a Prometheus text body: summed over its label sets for a family name
/// (`wsrelay_handshake_failures_total`), or one series when the name carries its labels
/// (`wsrelay_handshake_failures_total{reason="timeout"}`). 0 when absent.
pub fn metric_value(body: &str, name: &str) -> u64 {
    let series = |l: &&str| {
        let key = l.split(' ').next().unwrap_or_default();
        if name.contains('{') {
            key == name
        } else {
            key.split('{').next() == Some(name)
        }
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(series)
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends raw bytes as an HTTP request and reads the response until the server closes.
pub fn http_request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    parse_response(&resp)
}

/// (status, body) of a raw HTTP response.
pub fn parse_response(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Receives until `want` data frames arrived, skipping nothing: returns them in order.
#[track_caller]
pub fn recv_n(c: &mut Client, want: usize) -> Vec<Received> {
    (0..want)
        .map(|i| {
            c.recv(WAIT)
                .unwrap_or_else(|e| panic!("message {i} of {want}: {e}"))
        })
        .collect()
}

/// Receives until the server closes, skipping text messages: the close code, if any.
#[track_caller]
pub fn recv_close(c: &mut Client) -> Option<u16> {
    loop {
        match c.recv(WAIT) {
            Ok(Received::Closed(f)) => return f.map(|f| f.0),
            Ok(Received::Text(_)) => {}
            Ok(other) => panic!("waiting for the close: {other:?}"),
            Err(e) => panic!("waiting for the close: {e}"),
        }
    }
}

/// Receives until a text equal to `text` arrives, skipping other messages.
#[track_caller]
pub fn recv_until(c: &mut Client, text: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Ok(Received::Text(t)) if t == text => return,
            Ok(Received::Closed(f)) => panic!("closed while waiting for {text:?}: {f:?}"),
            Ok(_) => {}
            Err(e) => panic!("waiting for {text:?}: {e}"),
        }
    }
}
