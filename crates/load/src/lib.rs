//! The load generator behind `wsrelay-load` and `benches/e2e.rs`: many raw-protocol WebSocket
//! connections from one process, a timed publisher, and exact accounting of what arrived.
//!
//! It speaks only the raw protocol (the URL path names the channel; every frame sent is
//! delivered to every client of that channel, sender included), so the same run works against
//! wsrelay and against the Node baseline in `shared/baseline/node-ws-redis`.
//!
//! A run goes through fixed phases, driven by [`run()`] on the calling thread:
//!
//! ```text
//!  Connect ──▶ Probe ──▶ Run (warmup, then measured window) ──▶ Drain ──▶ Done
//!  N sockets   until every   publish at --rate; latency is      until every expected
//!  (bounded    connection    recorded for messages sent after   delivery arrived or
//!  in flight)  saw a probe   the warmup                         --drain passed
//! ```
//!
//! The probe phase exists because a WebSocket that is open is not yet subscribed upstream
//! (wsrelay confirms a channel's Redis subscription asynchronously): measuring before every
//! subscriber provably receives would count the server's start-up as loss.
//!
//! Connections live in `--threads` mio loops (`worker`), nonblocking and edge-triggered, with
//! one shared read buffer per loop: an idle connection costs its socket and ~150 bytes.
//! Files: [`payload`] (what a message carries), [`stats`] (histogram, loss accounting), [`sys`]
//! (CPU, memory, sockets), [`run`](mod@run) (the phases and the report), `worker` (one loop),
//! `redis_pub` (the `--publish-via` publisher thread), `main.rs` (the command line). WebSocket
//! framing is `wsrelay_client::wire`, shared with the tests.

#![deny(missing_docs, rust_2018_idioms)]

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

pub mod payload;
mod redis_pub;
pub mod run;
pub mod stats;
pub mod sys;
mod worker;

pub use run::{run, run_with_progress};
pub use stats::{Histogram, LatencySummary, SeqCounts, SeqTracker};

/// One server address to connect to, with the path (channel) to upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request path; names the channel on wsrelay (the Node baseline ignores it).
    pub path: String,
}

/// Parses `ws://HOST:PORTS/PATH` where PORTS is a port, a list (`9000,9001`) or a range
/// (`9000-9003`): one target per port, so one flag can name every node on a host.
pub fn parse_url(url: &str) -> Result<Vec<Target>, String> {
    let bad = |why: &str| format!("--url {url:?}: {why} (expected ws://HOST:PORT/PATH)");
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| bad("only ws:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, ports) = authority.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let mut list = Vec::new();
    for part in ports.split(',') {
        let port = |s: &str| s.parse::<u16>().map_err(|_| bad("bad port"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if b < a {
                    return Err(bad("empty port range"));
                }
                list.extend(a..=b);
            }
            None => list.push(port(part)?),
        }
    }
    list.into_iter()
        .map(|port| {
            let addr = (host, port)
                .to_socket_addrs()
                .map_err(|e| bad(&e.to_string()))?
                .find(SocketAddr::is_ipv4)
                .ok_or_else(|| bad("host has no IPv4 address"))?;
            Ok(Target {
                addr,
                host: format!("{host}:{port}"),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// Everything a run needs. Build it by hand (tests, benches) or from `wsrelay-load`'s flags.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Servers; connections are spread over them round-robin (every channel on every target).
    pub targets: Vec<Target>,
    /// Total WebSocket connections (publishers included: each channel's first connection
    /// publishes and also receives, as any raw-protocol client does).
    pub connections: usize,
    /// Channels; subscribers per channel = connections / channels. With more than one, the
    /// path `/p` becomes `/p-0`, `/p-1`, … (`/` becomes `/c0`, …).
    pub channels: usize,
    /// Total publish rate over all channels, messages per second. 0: connect, probe and hold
    /// the connections idle for warmup + duration (memory measurements).
    pub rate: f64,
    /// Payload size in bytes (at least [`payload::HEADER`]).
    pub size: usize,
    /// Measured window.
    pub duration: Duration,
    /// Publishing before the measured window: loss is counted, latency and CPU are not.
    pub warmup: Duration,
    /// Source addresses, used round-robin (bind before connect); empty: the kernel's choice.
    pub source_ips: Vec<IpAddr>,
    /// Publish with Redis PUBLISH on this URL instead of through a WebSocket.
    pub publish_via: Option<String>,
    /// Prefix of Redis channel names for `publish_via` (wsrelay's `--redis-prefix`).
    pub redis_prefix: String,
    /// Redis channel of the path `/` (wsrelay's `--default-channel`; the Node baseline's only
    /// channel).
    pub default_channel: String,
    /// Do not publish; account for whatever another generator publishes on the same channels.
    pub observe: bool,
    /// Event-loop threads of the generator.
    pub threads: usize,
    /// Server processes whose CPU time and memory are reported.
    pub server_pids: Vec<u32>,
    /// Connection attempts in flight at once (the server's accept backlog is finite; a
    /// SYN dropped from a full backlog costs a 1 s retransmit).
    pub connect_concurrency: usize,
    /// Time allowed to connect (and again to see every subscription live).
    pub connect_timeout: Duration,
    /// After publishing stops, how long to wait for deliveries still in flight (observe mode:
    /// how long without a delivery means the publisher is done).
    pub drain: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            targets: Vec::new(),
            connections: 1000,
            channels: 1,
            rate: 1000.0,
            size: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            source_ips: Vec::new(),
            publish_via: None,
            redis_prefix: String::new(),
            default_channel: "chat_channel".into(),
            observe: false,
            threads: 1,
            server_pids: Vec::new(),
            connect_concurrency: 256,
            connect_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(5),
        }
    }
}

impl LoadConfig {
    /// Rejects settings that cannot work; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.targets.is_empty() {
            return Err("--url is required".into());
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.channels == 0 || self.channels > self.connections {
            return Err("--channels must be between 1 and --connections".into());
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err("--rate must be a number >= 0".into());
        }
        if self.size < payload::HEADER || self.size > 1 << 20 {
            return Err(format!(
                "--size must be between {} (the sequence/timestamp header) and 1048576",
                payload::HEADER
            ));
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("--threads must be between 1 and 64".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be above 0".into());
        }
        Ok(())
    }

    /// The request path of channel `c` on `target`.
    pub fn channel_path(&self, target: &Target, c: usize) -> String {
        if self.channels == 1 {
            return target.path.clone();
        }
        let base = target.path.trim_end_matches('/');
        if base.is_empty() {
            format!("/c{c}")
        } else {
            format!("{base}-{c}")
        }
    }

    /// The Redis channel `publish_via` publishes channel `c` on (what wsrelay subscribes to
    /// for that path: the path without its `/`, or the default channel for `/`).
    pub fn redis_channel(&self, c: usize) -> String {
        let path = self.channel_path(&self.targets[0], c);
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() {
            self.default_channel.as_str()
        } else {
            name
        };
        format!("{}{name}", self.redis_prefix)
    }
}

/// Server-side measurements for one `--server-pid`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerReport {
    /// Process id.
    pub pid: u32,
    /// CPU seconds (user + system, all threads) used during the measured window.
    pub cpu_secs: f64,
    /// Share of one core used during the window.
    pub cpu_busy: f64,
    /// Resident memory before the generator connected, bytes.
    pub rss_before: u64,
    /// Resident memory once every connection was open and subscribed, bytes.
    pub rss_connected: u64,
    /// Resident memory at the end of the window, bytes.
    pub rss_end: u64,
}

/// The publisher's own health: did it keep to its schedule?
#[derive(Clone, Debug, Default, Serialize)]
pub struct PublisherReport {
    /// Messages the schedule called for (rate × (warmup + duration)).
    pub scheduled: u64,
    /// Messages actually sent.
    pub sent: u64,
    /// Largest delay between a message's scheduled time and its send, ms.
    pub max_lateness_ms: f64,
    /// Messages sent more than 10 ms late.
    pub late_sends: u64,
    /// True when it could not keep to the schedule: over 1 % of sends more than 10 ms late,
    /// or messages never sent.
    pub behind: bool,
}

/// The generator's own load during the measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GeneratorReport {
    /// Event-loop threads.
    pub threads: usize,
    /// CPU seconds of the whole process during the window.
    pub cpu_secs: f64,
    /// Per loop thread: share of the window it spent on a CPU (1.0 = saturated).
    pub thread_busy: Vec<f64>,
    /// True when a loop thread was busy for 90 % or more of the window: the numbers then
    /// measure the generator, not the server.
    pub saturated: bool,
}

/// Everything a run measured. Printed as a table, or as JSON with `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Servers, as `host:port/path` of channel 0.
    pub targets: Vec<String>,
    /// Connections asked for.
    pub connections: usize,
    /// Connections that completed the WebSocket handshake.
    pub established: usize,
    /// Connections that failed to connect or were refused.
    pub connect_failed: usize,
    /// The first connection error, if any.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last subscription proven live.
    pub setup_secs: f64,
    /// Channels.
    pub channels: usize,
    /// Offered publish rate, messages/s, all channels together.
    pub rate: f64,
    /// Payload bytes.
    pub size: usize,
    /// Measured window, seconds (warmup excluded, drain included).
    pub window_secs: f64,
    /// True when this process only observed another generator's messages.
    pub observe: bool,
    /// Publisher schedule keeping (absent in observe mode).
    pub publisher: Option<PublisherReport>,
    /// Deliveries every subscriber should have had, warmup included.
    pub expected: u64,
    /// Sequence accounting summed over all connections.
    pub counts: SeqCounts,
    /// Frames with our header that arrived on the wrong channel.
    pub misrouted: u64,
    /// Data frames without our header (another client's messages).
    pub foreign: u64,
    /// Fragmented messages (not parsed: the servers measured here never fragment).
    pub fragmented: u64,
    /// Connections the server closed or reset during the run.
    pub dropped: u64,
    /// Pings answered.
    pub pings: u64,
    /// Deliveries of messages sent inside the measured window.
    pub measured: u64,
    /// Measured deliveries per second of window.
    pub deliveries_per_sec: f64,
    /// Offered deliveries per second (rate × subscribers per channel).
    pub offered_deliveries_per_sec: f64,
    /// Publish-to-receipt latency of measured deliveries.
    pub latency: LatencySummary,
    /// The generator's own load.
    pub generator: GeneratorReport,
    /// One entry per `--server-pid`.
    pub servers: Vec<ServerReport>,
    /// Sum of the servers' CPU seconds in the window.
    pub server_cpu_secs: f64,
    /// Measured deliveries per server CPU-second (0 without `--server-pid`).
    pub deliveries_per_server_cpu_sec: f64,
    /// Server CPU-seconds per million measured deliveries.
    pub server_cpu_secs_per_million: f64,
    /// Server RSS growth from before connecting to all connected, per established connection.
    pub rss_bytes_per_connection: f64,
    /// Every reason to distrust these numbers.
    pub warnings: Vec<String>,
}

impl Report {
    /// True when every expected delivery arrived once and in order.
    pub fn perfect(&self) -> bool {
        self.counts.lost == 0
            && self.counts.reordered == 0
            && self.counts.duplicates == 0
            && self.counts.unexpected == 0
            && self.misrouted == 0
            && self.counts.received == self.expected
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<34} {v}");
        };
        row("targets", self.targets.join(" "));
        row(
            "connections established",
            format!(
                "{} of {} ({} failed{}) in {:.1} s",
                self.established,
                self.connections,
                self.connect_failed,
                self.first_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                self.setup_secs
            ),
        );
        row("channels × size", format!("{} × {} B", self.channels, self.size));
        if let Some(p) = &self.publisher {
            row(
                "messages sent",
                format!(
                    "{} of {} scheduled at {}/s (max {:.1} ms late, {} sends >10 ms late)",
                    p.sent, p.scheduled, self.rate, p.max_lateness_ms, p.late_sends
                ),
            );
        }
        row(
            "deliveries expected / received",
            format!("{} / {}", self.expected, self.counts.received),
        );
        row(
            "lost / reordered / duplicated",
            format!(
                "{} / {} / {}",
                self.counts.lost, self.counts.reordered, self.counts.duplicates
            ),
        );
        if self.misrouted + self.foreign + self.fragmented + self.dropped > 0 {
            row(
                "misrouted / foreign / fragmented",
                format!("{} / {} / {}", self.misrouted, self.foreign, self.fragmented),
            );
            row("connections dropped by server", self.dropped.to_string());
        }
        row(
            "deliveries/s (offered)",
            format!(
                "{:.0} ({:.0}); window {:.2} s with drain",
                self.deliveries_per_sec, self.offered_deliveries_per_sec, self.window_secs
            ),
        );
        let l = &self.latency;
        row(
            "latency p50 / p99 / p999 / max",
            format!(
                "{} / {} / {} / {}  ({} samples)",
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.samples
            ),
        );
        let g = &self.generator;
        row(
            "generator CPU",
            format!(
                "{:.2} s; loop threads busy {}",
                g.cpu_secs,
                g.thread_busy
                    .iter()
                    .map(|b| format!("{:.0}%", b * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        for sv in &self.servers {
            row(
                &format!("server {} CPU", sv.pid),
                format!("{:.2} s ({:.0}% of a core)", sv.cpu_secs, sv.cpu_busy * 100.0),
            );
            row(
                &format!("server {} RSS before/conn/end", sv.pid),
                format!(
                    "{:.1} / {:.1} / {:.1} MiB",
                    mib(sv.rss_before),
                    mib(sv.rss_connected),
                    mib(sv.rss_end)
                ),
            );
        }
        if !self.servers.is_empty() {
            row(
                "deliveries per server CPU-second",
                format!("{:.0}", self.deliveries_per_server_cpu_sec),
            );
            row(
                "server CPU-s per million deliveries",
                format!("{:.3}", self.server_cpu_secs_per_million),
            );
            row(
                "server RSS per connection",
                format!("{:.0} B", self.rss_bytes_per_connection),
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "WARNING: {w}");
        }
        s
    }
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1e3)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_port_lists_and_ranges() {
        let t = parse_url("ws://127.0.0.1:9000-9002/room").unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[2].addr, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(t[0].path, "/room");
        assert_eq!(t[0].host, "127.0.0.1:9000");
        let t = parse_url("ws://localhost:9000,9005").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].path, "/");
        assert!(parse_url("http://x:1/").is_err());
        assert!(parse_url("ws://127.0.0.1/").is_err());
        assert!(parse_url("ws://127.0.0.1:9005-9000/").is_err());
    }

    #[test]
    fn channel_names() {
        let mut c = LoadConfig {
            targets: parse_url("ws://127.0.0.1:1/").unwrap(),
            channels: 1,
            ..LoadConfig::default()
        };
        assert_eq!(c.channel_path(&c.targets[0].clone(), 0), "/");
        assert_eq!(c.redis_channel(0), "chat_channel");
        c.channels = 3;
        assert_eq!(c.channel_path(&c.targets[0].clone(), 2), "/c2");
        assert_eq!(c.redis_channel(2), "c2");
        c.targets = parse_url("ws://127.0.0.1:1/room/").unwrap();
        c.redis_prefix = "app:".into();
        assert_eq!(c.channel_path(&c.targets[0].clone(), 1), "/room-1");
        assert_eq!(c.redis_channel(1), "app:room-1");
    }
}
