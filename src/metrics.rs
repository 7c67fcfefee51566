//! Counters and gauges, and their Prometheus text rendering for `GET /metrics`.
//!
//! Each loop writes only its own [`LoopMetrics`] (cache-line aligned, relaxed atomics), so
//! counting on the per-message path costs a plain add and no cross-core traffic. Readers sum
//! over loops when rendering. Broker threads have their own [`BrokerMetrics`].
//!
//! Every metric is declared once, as a field in the `metrics!` macro with the name, type and
//! help text it is rendered with; the rendering walks those declarations, so a field cannot be
//! added without appearing in `/metrics`, nor a row without its field.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// How a loop's metric is shown: summed over loops, or one sample per loop (`loop` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Per {
    Process,
    Loop,
}

/// One rendered metric of a struct `T`: where it comes from and how it is shown.
struct Family<T> {
    /// Name without the `wsrelay_` prefix.
    name: &'static str,
    kind: Kind,
    per: Per,
    help: &'static str,
    read: fn(&T) -> u64,
}

/// A value a metric can be read from.
trait Read {
    fn read(&self) -> u64;
}

impl Read for AtomicU64 {
    fn read(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Read for AtomicBool {
    fn read(&self) -> u64 {
        u64::from(self.load(Ordering::Relaxed))
    }
}

/// Declares a struct of metrics, each public field once with how it is rendered:
/// `field: Type => kind per "name" "help";` (`kind` is `counter` or `gauge`, `per` is `Loop` or
/// `Process`, the name is without `wsrelay_`) in `rendered`; fields in `unrendered` are not shown.
/// Generates the struct and its `FAMILIES`, in declaration order.
macro_rules! metrics {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            rendered {
                $(
                    $(#[$fmeta:meta])*
                    $field:ident: $ty:ty => $kind:ident $per:ident $metric:literal $help:literal;
                )*
            }
            unrendered {
                $( $(#[$pmeta:meta])* $pfield:ident: $pty:ty, )*
            }
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            $( $(#[$pmeta])* $pfield: $pty, )*
        }

        impl $name {
            const FAMILIES: &'static [Family<$name>] = &[
                $(
                    Family {
                        name: $metric,
                        kind: metrics!(@kind $kind),
                        per: Per::$per,
                        help: $help,
                        read: |m: &$name| Read::read(&m.$field),
                    },
                )*
            ];
        }
    };
    (@kind counter) => { Kind::Counter };
    (@kind gauge) => { Kind::Gauge };
}

/// Declares [`HandshakeFailure`] with each reason's label once; its discriminant indexes the
/// per-reason counters.
macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $label:literal, )*) => {
        /// Why a connection never became a WebSocket (or a served HTTP request).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum HandshakeFailure {
            $( $(#[$doc])* $variant, )*
        }

        impl HandshakeFailure {
            /// Every reason, in discriminant order.
            const ALL: &'static [HandshakeFailure] = &[$(HandshakeFailure::$variant),*];

            fn label(self) -> &'static str {
                match self {
                    $( HandshakeFailure::$variant => $label, )*
                }
            }
        }
    };
}

reasons! {
    /// Unparseable request or invalid upgrade fields.
    BadRequest => "bad_request",
    /// Request head larger than allowed.
    TooLarge => "too_large",
    /// The request did not arrive within the handshake timeout.
    Timeout => "timeout",
    /// The process was at `--max-connections`.
    OverCapacity => "over_capacity",
    /// Peer went away mid-request.
    Disconnected => "disconnected",
    /// Origin not in `--allowed-origin`.
    Origin => "origin",
    /// Token missing, forged or expired.
    Unauthorized => "unauthorized",
    /// Over `--max-connections-per-ip`.
    PerIpLimit => "per_ip_limit",
    /// A WebSocket asked for while the node drains (after SIGTERM).
    Draining => "draining",
    /// No valid PROXY protocol header on a `--proxy-listen` connection.
    ProxyHeader => "proxy_header",
}

metrics! {
    /// One loop's counters. Written by that loop only.
    #[derive(Debug, Default)]
    #[repr(align(128))]
    pub struct LoopMetrics {
        rendered {
            /// Gauge: sockets this loop holds (handshaking, open or closing).
            connections: AtomicU64 => gauge Loop "connections" "Sockets held, per loop.";
            /// Gauge: open WebSocket connections.
            websockets: AtomicU64 => gauge Process "websockets" "Open WebSocket connections.";
            /// Connections accepted.
            accepted: AtomicU64 => counter Process "accepted_total" "Connections accepted.";
            /// Plain HTTP requests answered.
            http_requests: AtomicU64 => counter Process "http_requests_total" "Plain HTTP requests answered.";
            /// Messages received from clients.
            messages_in: AtomicU64 => counter Process "messages_received_total" "Messages received from clients.";
            /// Messages queued to clients (one per recipient).
            deliveries: AtomicU64 => counter Process "deliveries_total" "Messages queued to clients, one per recipient.";
            /// Bytes written to sockets.
            bytes_out: AtomicU64 => counter Process "bytes_out_total" "Bytes written to client sockets.";
            /// Socket writes that sent bytes (deliveries / writes = messages per write).
            writes: AtomicU64 => counter Process "writes_total" "Socket writes that sent bytes.";
            /// Connections closed for exceeding `--max-output`.
            slow_consumers: AtomicU64 => counter Process "slow_consumer_closes_total" "Connections closed for exceeding --max-output.";
            /// Connections closed for a message over `--max-message-size`.
            oversize: AtomicU64 => counter Process "oversize_closes_total" "Connections closed for a message over --max-message-size.";
            /// Connections closed for protocol violations or invalid UTF-8.
            protocol_errors: AtomicU64 => counter Process "protocol_error_closes_total" "Connections closed for protocol violations.";
            /// Connections closed for silence past `--idle-timeout`.
            idle_closed: AtomicU64 => counter Process "idle_closes_total" "Connections closed for silence past --idle-timeout.";
            /// Connections closed because their token expired (and was not refreshed).
            token_expired: AtomicU64 => counter Process "token_expired_closes_total" "Connections closed because their token expired (4401).";
            /// `POST /publish` requests refused (503) because the publish queue was full.
            publish_dropped: AtomicU64 => counter Process "publish_dropped_total" "POST /publish requests refused (503) because the publish queue was full.";
            /// Times a connection's reads were paused because the publish queue was full.
            publish_paused: AtomicU64 => counter Process "publish_pauses_total" "Times reading from a publishing connection paused because the publish queue was full.";
            /// Accept pauses caused by running out of descriptors.
            accept_paused: AtomicU64 => counter Process "accept_pauses_total" "Accept pauses after running out of file descriptors.";
            /// Subscriptions that asked to recover from an offset (including session resumes).
            recoveries: AtomicU64 => counter Process "recoveries_total" "Subscriptions that asked to recover from an offset.";
            /// Recoveries answered `recovered: false` (history trimmed, expired, or epoch changed).
            recovery_failed: AtomicU64 => counter Process "recovery_failed_total" "recovered: false sent: asked-for recoveries that failed, and later losses the history could not fill (unsolicited notices).";
            /// Messages replayed from history.
            replayed: AtomicU64 => counter Process "replayed_total" "Messages replayed from history.";
            /// Subscribes and publishes outside the token's grant.
            forbidden: AtomicU64 => counter Process "forbidden_total" "Subscribes and publishes outside the token's grant.";
            /// Publishes over `--publish-rate`.
            rate_limited: AtomicU64 => counter Process "rate_limited_total" "Publishes over --publish-rate.";
        }
        unrendered {
            /// Per [`HandshakeFailure`], by discriminant; rendered with a `reason` label.
            handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
        }
    }
}

impl LoopMetrics {
    /// Adds one handshake failure of `reason`.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        inc(&self.handshake_failures[reason as usize]);
    }
}

metrics! {
    /// Counters of the broker side (in-process broker or Redis bridge).
    #[derive(Debug, Default)]
    pub struct BrokerMetrics {
        rendered {
            /// In-process histories and sessions dropped early to stay under their caps.
            store_evictions: AtomicU64 => counter Process "store_evictions_total" "In-process histories and sessions dropped early to stay under their caps.";
            /// Gauge: true while the Redis subscriber connection is up (always true in-process).
            subscriber_up: AtomicBool => gauge Process "redis_subscriber_up" "1 while the Redis subscriber connection is up.";
            /// Gauge: channels subscribed upstream.
            channels: AtomicU64 => gauge Process "channels_subscribed" "Channels subscribed upstream.";
            /// Successful reconnects to Redis after a failure.
            redis_reconnects: AtomicU64 => counter Process "redis_reconnects_total" "Reconnects to Redis after a failure.";
            /// Publishes handed to Redis (or routed in-process).
            published: AtomicU64 => counter Process "published_total" "Publishes handed to the broker.";
            /// Publishes that could not reach Redis; they were delivered to this node's clients only.
            publish_failed: AtomicU64 => counter Process "publish_failed_total" "Publishes that could not reach Redis (delivered on this node only).";
            /// Times the publisher waited for this node's Redis subscriber to subscribe again
            /// before publishing (one Redis).
            publish_waits: AtomicU64 => counter Process "publish_subscriber_waits_total" "Times publishing waited for this node's Redis subscriber to subscribe again.";
            /// Publishes Redis answered with an error (out of memory, read-only, ...): not stored.
            publish_refused: AtomicU64 => counter Process "publish_refused_total" "Publishes Redis answered with an error (out of memory, read-only): not stored.";
            /// Deliveries dropped because a loop's inbox was full.
            deliveries_dropped: AtomicU64 => counter Process "deliveries_dropped_total" "Deliveries dropped because a loop's inbox was full.";
            /// Gauge: presence entries this node holds (its subscriptions on channels with presence).
            presence_entries: AtomicU64 => gauge Process "presence_entries" "Presence entries this node holds.";
            /// Subscriptions not listed in presence: their channel held `--presence-max` entries.
            presence_overflow: AtomicU64 => counter Process "presence_overflow_total" "Subscriptions not listed in presence because their channel held --presence-max entries.";
        }
        unrendered {
            /// Milliseconds since the Unix epoch of the last answered PING on the subscriber
            /// connection; 0 in-process (nothing to probe).
            last_probe_ms: AtomicU64,
            /// How old the last answered probe may be before the subscriber counts as stale.
            stale_after_ms: AtomicU64,
            /// The last refusal that concerns every write (out of memory, read-only replica,
            /// failed persistence), with when it happened; cleared by the next stored publish.
            refusing: std::sync::Mutex<Option<(std::time::Instant, String)>>,
        }
    }
}

impl BrokerMetrics {
    /// Records that Redis refused every write for `reason` (see [`BrokerMetrics::refusing`]).
    pub fn refusing_writes(&self, reason: &str) {
        let mut r = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
        *r = Some((std::time::Instant::now(), reason.to_owned()));
    }

    /// Records a stored publish: Redis takes writes.
    pub fn writes_accepted(&self) {
        let mut r = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_some() {
            *r = None;
        }
    }

    /// Why Redis refuses writes, if it refused one within `window` and took none since. The
    /// window lets the state clear by itself when nothing is published after Redis recovers.
    pub fn refusing(&self, window: std::time::Duration) -> Option<String> {
        let r = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref()
            .filter(|(at, _)| at.elapsed() <= window)
            .map(|(_, reason)| reason.clone())
    }

    /// Records an answered probe of the subscriber connection, which is probed every
    /// `every`: three missed probes make it stale.
    pub fn probe_ok(&self, every: std::time::Duration) {
        self.stale_after_ms
            .store(every.as_millis() as u64 * 3, Ordering::Relaxed);
        self.last_probe_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Healthy: the subscriber is connected and, when probed, answered recently (within three
    /// probe intervals).
    pub fn subscriber_healthy(&self) -> bool {
        let last = self.last_probe_ms.load(Ordering::Relaxed);
        let stale = self.stale_after_ms.load(Ordering::Relaxed);
        self.subscriber_up.load(Ordering::Relaxed) && (last == 0 || unix_ms().saturating_sub(last) <= stale)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// All metrics of the process.
#[derive(Debug)]
pub struct Metrics {
    /// One entry per loop, indexed by loop id.
    pub loops: Box<[LoopMetrics]>,
    /// The broker's counters.
    pub broker: BrokerMetrics,
}

/// Relaxed increment: counters need no ordering with anything else.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Relaxed add.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Relaxed decrement of a gauge.
pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

/// Writes one family's `# HELP` and `# TYPE` lines.
fn describe(s: &mut String, name: &str, kind: Kind, help: &str) {
    let _ = writeln!(
        s,
        "# HELP wsrelay_{name} {help}\n# TYPE wsrelay_{name} {}",
        kind.as_str()
    );
}

impl Metrics {
    /// Metrics for `loops` loops, all zero.
    pub fn new(loops: usize) -> Self {
        Metrics {
            loops: (0..loops).map(|_| LoopMetrics::default()).collect(),
            broker: BrokerMetrics::default(),
        }
    }

    /// Sum of one counter over all loops.
    pub fn sum(&self, f: impl Fn(&LoopMetrics) -> &AtomicU64) -> u64 {
        self.loops.iter().map(|l| f(l).load(Ordering::Relaxed)).sum()
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        for f in LoopMetrics::FAMILIES {
            describe(&mut s, f.name, f.kind, f.help);
            match f.per {
                Per::Loop => {
                    for (i, l) in self.loops.iter().enumerate() {
                        let _ = writeln!(s, "wsrelay_{}{{loop=\"{i}\"}} {}", f.name, (f.read)(l));
                    }
                }
                Per::Process => {
                    let total: u64 = self.loops.iter().map(f.read).sum();
                    let _ = writeln!(s, "wsrelay_{} {total}", f.name);
                }
            }
        }
        describe(
            &mut s,
            "handshake_failures_total",
            Kind::Counter,
            "Connections that failed before being served, by reason.",
        );
        for &r in HandshakeFailure::ALL {
            let n: u64 = self
                .loops
                .iter()
                .map(|l| l.handshake_failures[r as usize].read())
                .sum();
            let _ = writeln!(
                s,
                "wsrelay_handshake_failures_total{{reason=\"{}\"}} {n}",
                r.label()
            );
        }
        for f in BrokerMetrics::FAMILIES {
            debug_assert_eq!(f.per, Per::Process, "the broker is one per process");
            describe(&mut s, f.name, f.kind, f.help);
            let _ = writeln!(s, "wsrelay_{} {}", f.name, (f.read)(&self.broker));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_loops_and_labels_reasons() {
        let m = Metrics::new(2);
        inc(&m.loops[0].deliveries);
        add(&m.loops[1].deliveries, 4);
        m.loops[1].handshake_failed(HandshakeFailure::Timeout);
        let text = m.render();
        assert!(text.contains("\nwsrelay_deliveries_total 5\n"));
        assert!(text.contains("wsrelay_handshake_failures_total{reason=\"timeout\"} 1\n"));
        assert!(text.contains("wsrelay_connections{loop=\"1\"} 0\n"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} undeclared");
        }
    }

    /// The families `render` declares: (name with its label, if any; type).
    fn rendered_families() -> Vec<(String, String)> {
        let text = Metrics::new(1).render();
        let mut out = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap();
            let sample = lines.peek().unwrap();
            let label = sample
                .strip_prefix(name)
                .and_then(|l| l.strip_prefix('{'))
                .and_then(|l| l.split_once('='))
                .map(|(label, _)| format!("{{{label}}}"));
            out.push((format!("{name}{}", label.unwrap_or_default()), kind.to_owned()));
        }
        out
    }

    #[test]
    fn readme_lists_every_metric_with_its_type_and_label() {
        let readme = include_str!("../README.md");
        let section = readme.split("\n## Metrics\n").nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        let documented: Vec<(String, String)> = section
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((name.to_owned(), cells.get(2)?.to_string()))
            })
            .collect();
        let mut rendered = rendered_families();
        let mut documented_sorted = documented.clone();
        rendered.sort();
        documented_sorted.sort();
        assert_eq!(
            documented_sorted, rendered,
            "README.md's metrics table and src/metrics.rs disagree"
        );
    }
}
