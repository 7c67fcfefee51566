//! Test helpers: real `redis-server` processes on free ports, real `wsrelay` processes, and
//! clients with timeouts. Nothing here sleeps to synchronise: readiness is observed (a log line,
//! a PING answer, a message coming back).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use wsrelay::client::{Client, Received};

/// Default timeout for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A `redis-server` started by the test, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts a fresh server on a free port, with no persistence.
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        wait_for("redis PING", WAIT, || self.ping().then_some(()));
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

/// A `wsrelay` process started by the test, killed on drop.
pub struct Node {
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts the binary on a free port with `args`, waiting for its "listening on" line.
    pub fn start(args: &[&str]) -> Node {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Starts the binary listening on `listen` (e.g. another node's address, for SO_REUSEPORT).
    pub fn start_on(listen: &str, args: &[&str]) -> Node {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_wsrelay"))
                .args(["--listen", listen])
                .args(args),
        )
    }

    /// Starts a prepared command and waits for its "listening on" line.
    pub fn spawn(cmd: &mut Command) -> Node {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsrelay");
        let echo = std::env::var_os("WSRELAY_TEST_LOG")
            .is_some()
            .then_some("[wsrelay] ");
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

    /// The value of a metric (summed over label sets) from `/metrics`.
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

/// Collects a child's stderr lines (draining it so the child never blocks on a full pipe) and
/// sends the rest of every line containing `marker`, after the marker. With `echo`, lines are
/// also printed with that prefix.
pub fn watch_stderr(
    stderr: std::process::ChildStderr,
    marker: &'static str,
    echo: Option<&'static str>,
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
            if let Some(prefix) = echo {
                eprintln!("{prefix}{line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    (log, rx)
}

/// Sum of the samples of `name` in a Prometheus text body.
pub fn metric_value(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
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

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}
