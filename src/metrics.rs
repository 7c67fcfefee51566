//! Counters and gauges, and their Prometheus text rendering for `GET /metrics`.
//!
//! Each loop writes only its own [`LoopMetrics`] (cache-line aligned, relaxed atomics), so
//! counting on the per-message path costs a plain add and no cross-core traffic. Readers sum
//! over loops when rendering. Broker threads have their own [`BrokerMetrics`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a connection never became a WebSocket (or a served HTTP request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Unparseable request or invalid upgrade fields.
    BadRequest,
    /// Request head larger than allowed.
    TooLarge,
    /// The request did not arrive within the handshake timeout.
    Timeout,
    /// The process was at `--max-connections`.
    OverCapacity,
    /// Peer went away mid-request.
    Disconnected,
    /// Origin not in `--allowed-origin`.
    Origin,
    /// Token missing, forged or expired.
    Unauthorized,
    /// Over `--max-connections-per-ip`.
    PerIpLimit,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::BadRequest,
        HandshakeFailure::TooLarge,
        HandshakeFailure::Timeout,
        HandshakeFailure::OverCapacity,
        HandshakeFailure::Disconnected,
        HandshakeFailure::Origin,
        HandshakeFailure::Unauthorized,
        HandshakeFailure::PerIpLimit,
    ];
    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::BadRequest => "bad_request",
            HandshakeFailure::TooLarge => "too_large",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::OverCapacity => "over_capacity",
            HandshakeFailure::Disconnected => "disconnected",
            HandshakeFailure::Origin => "origin",
            HandshakeFailure::Unauthorized => "unauthorized",
            HandshakeFailure::PerIpLimit => "per_ip_limit",
        }
    }
}

/// One loop's counters. Written by that loop only.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct LoopMetrics {
    /// Gauge: sockets this loop holds (handshaking, open or closing).
    pub connections: AtomicU64,
    /// Gauge: open WebSocket connections.
    pub websockets: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Plain HTTP requests answered.
    pub http_requests: AtomicU64,
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Messages queued to clients (one per recipient).
    pub deliveries: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_out: AtomicU64,
    /// Socket writes that sent bytes (deliveries / writes = messages per write).
    pub writes: AtomicU64,
    /// Connections closed for exceeding `--max-output`.
    pub slow_consumers: AtomicU64,
    /// Connections closed for a message over `--max-message-size`.
    pub oversize: AtomicU64,
    /// Connections closed for protocol violations or invalid UTF-8.
    pub protocol_errors: AtomicU64,
    /// Connections closed for silence past `--idle-timeout`.
    pub idle_closed: AtomicU64,
    /// `POST /publish` requests refused (503) because the publish queue was full.
    pub publish_dropped: AtomicU64,
    /// Times a connection's reads were paused because the publish queue was full.
    pub publish_paused: AtomicU64,
    /// Accept pauses caused by running out of descriptors.
    pub accept_paused: AtomicU64,
    /// Subscriptions that asked to recover from an offset (including session resumes).
    pub recoveries: AtomicU64,
    /// Recoveries answered `recovered: false` (history trimmed, expired, or epoch changed).
    pub recovery_failed: AtomicU64,
    /// Messages replayed from history.
    pub replayed: AtomicU64,
    /// Subscribes and publishes outside the token's grant.
    pub forbidden: AtomicU64,
    /// Publishes over `--publish-rate`.
    pub rate_limited: AtomicU64,
    handshake_failures: [AtomicU64; 8],
}

impl LoopMetrics {
    /// Adds one handshake failure of `reason`.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        let i = HandshakeFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        inc(&self.handshake_failures[i]);
    }
}

/// Counters of the broker side (in-process broker or Redis bridge).
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Gauge: true while the Redis subscriber connection is up (always true in-process).
    pub subscriber_up: AtomicBool,
    /// Milliseconds since the Unix epoch of the last answered PING on the subscriber
    /// connection; 0 in-process (nothing to probe).
    pub last_probe_ms: AtomicU64,
    /// Gauge: channels subscribed upstream.
    pub channels: AtomicU64,
    /// Successful reconnects to Redis after a failure.
    pub redis_reconnects: AtomicU64,
    /// Publishes handed to Redis (or routed in-process).
    pub published: AtomicU64,
    /// Publishes that could not reach Redis; they were delivered to this node's clients only.
    pub publish_failed: AtomicU64,
    /// Deliveries dropped because a loop's inbox was full.
    pub deliveries_dropped: AtomicU64,
    /// In-process histories and sessions dropped early to stay under their caps.
    pub store_evictions: AtomicU64,
    /// Publishes Redis answered with an error (out of memory, read-only, ...): not stored.
    pub publish_refused: AtomicU64,
    /// The last refusal that concerns every write (out of memory, read-only replica, failed
    /// persistence), with when it happened; cleared by the next stored publish.
    refusing: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl BrokerMetrics {
    /// Records an answered probe of the subscriber connection.
    pub fn probe_ok(&self) {
        self.last_probe_ms.store(unix_ms(), Ordering::Relaxed);
    }

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

    /// Healthy: the subscriber is connected and, when probed, answered recently. `stale` is
    /// how old the last answer may be.
    pub fn subscriber_healthy(&self, stale: std::time::Duration) -> bool {
        let last = self.last_probe_ms.load(Ordering::Relaxed);
        self.subscriber_up.load(Ordering::Relaxed)
            && (last == 0 || unix_ms().saturating_sub(last) <= stale.as_millis() as u64)
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

/// Picks one counter out of a loop's metrics.
type Field = fn(&LoopMetrics) -> &AtomicU64;

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
        s.push_str("# HELP wsrelay_connections Sockets held, per loop.\n# TYPE wsrelay_connections gauge\n");
        for (i, l) in self.loops.iter().enumerate() {
            let _ = writeln!(
                s,
                "wsrelay_connections{{loop=\"{i}\"}} {}",
                l.connections.load(Ordering::Relaxed)
            );
        }
        #[rustfmt::skip]
        let per_loop: [(&str, &str, &str, Field); 19] = [
            ("websockets", "gauge", "Open WebSocket connections.", |l| &l.websockets),
            ("accepted_total", "counter", "Connections accepted.", |l| &l.accepted),
            ("http_requests_total", "counter", "Plain HTTP requests answered.", |l| &l.http_requests),
            ("messages_received_total", "counter", "Messages received from clients.", |l| &l.messages_in),
            ("deliveries_total", "counter", "Messages queued to clients, one per recipient.", |l| &l.deliveries),
            ("bytes_out_total", "counter", "Bytes written to client sockets.", |l| &l.bytes_out),
            ("writes_total", "counter", "Socket writes that sent bytes.", |l| &l.writes),
            ("slow_consumer_closes_total", "counter", "Connections closed for exceeding --max-output.", |l| &l.slow_consumers),
            ("oversize_closes_total", "counter", "Connections closed for a message over --max-message-size.", |l| &l.oversize),
            ("protocol_error_closes_total", "counter", "Connections closed for protocol violations.", |l| &l.protocol_errors),
            ("idle_closes_total", "counter", "Connections closed for silence past --idle-timeout.", |l| &l.idle_closed),
            ("publish_dropped_total", "counter", "POST /publish requests refused (503) because the publish queue was full.", |l| &l.publish_dropped),
            ("publish_pauses_total", "counter", "Times reading from a publishing connection paused because the publish queue was full.", |l| &l.publish_paused),
            ("accept_pauses_total", "counter", "Accept pauses after running out of file descriptors.", |l| &l.accept_paused),
            ("recoveries_total", "counter", "Subscriptions that asked to recover from an offset.", |l| &l.recoveries),
            ("recovery_failed_total", "counter", "Recoveries answered recovered: false.", |l| &l.recovery_failed),
            ("replayed_total", "counter", "Messages replayed from history.", |l| &l.replayed),
            ("forbidden_total", "counter", "Subscribes and publishes outside the token's grant.", |l| &l.forbidden),
            ("rate_limited_total", "counter", "Publishes over --publish-rate.", |l| &l.rate_limited),
        ];
        for (name, kind, help, f) in per_loop {
            let _ = writeln!(
                s,
                "# HELP wsrelay_{name} {help}\n# TYPE wsrelay_{name} {kind}\nwsrelay_{name} {}",
                self.sum(f)
            );
        }
        let _ = writeln!(
            s,
            "# HELP wsrelay_handshake_failures_total Connections that failed before being served, by reason.\n\
             # TYPE wsrelay_handshake_failures_total counter"
        );
        for (i, r) in HandshakeFailure::ALL.iter().enumerate() {
            let n: u64 = self
                .loops
                .iter()
                .map(|l| l.handshake_failures[i].load(Ordering::Relaxed))
                .sum();
            let _ = writeln!(
                s,
                "wsrelay_handshake_failures_total{{reason=\"{}\"}} {n}",
                r.label()
            );
        }
        let b = &self.broker;
        let broker: [(&str, &str, &str, u64); 8] = [
            (
                "store_evictions_total",
                "counter",
                "In-process histories and sessions dropped early to stay under their caps.",
                b.store_evictions.load(Ordering::Relaxed),
            ),
            (
                "redis_subscriber_up",
                "gauge",
                "1 while the Redis subscriber connection is up.",
                u64::from(b.subscriber_up.load(Ordering::Relaxed)),
            ),
            (
                "channels_subscribed",
                "gauge",
                "Channels subscribed upstream.",
                b.channels.load(Ordering::Relaxed),
            ),
            (
                "redis_reconnects_total",
                "counter",
                "Reconnects to Redis after a failure.",
                b.redis_reconnects.load(Ordering::Relaxed),
            ),
            (
                "published_total",
                "counter",
                "Publishes handed to the broker.",
                b.published.load(Ordering::Relaxed),
            ),
            (
                "publish_failed_total",
                "counter",
                "Publishes that could not reach Redis (delivered on this node only).",
                b.publish_failed.load(Ordering::Relaxed),
            ),
            (
                "publish_refused_total",
                "counter",
                "Publishes Redis answered with an error (out of memory, read-only): not stored.",
                b.publish_refused.load(Ordering::Relaxed),
            ),
            (
                "deliveries_dropped_total",
                "counter",
                "Deliveries dropped because a loop's inbox was full.",
                b.deliveries_dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in broker {
            let _ = writeln!(
                s,
                "# HELP wsrelay_{name} {help}\n# TYPE wsrelay_{name} {kind}\nwsrelay_{name} {v}"
            );
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
}
