//! What every thread of the process may read: the configuration, the metrics, the shutdown
//! request, the connection count and the policies checked at connect time. Written by the
//! server at start (and once by a shutdown request); the loops and broker threads only read
//! it, so nothing on the per-message path locks. Kept apart from `server.rs` so the loops
//! depend on this state, not on the code that starts them.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::auth::Verifier;
use crate::config::Config;
use crate::forwarded::TrustedProxies;
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;
use crate::ratelimit::PerIpLimit;

/// State every thread may read.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the process started with.
    pub config: Config,
    /// All counters.
    pub metrics: Arc<Metrics>,
    /// Set once to start a graceful shutdown: when, and whether to drain first.
    pub stop: OnceLock<Stop>,
    /// Sockets held by all loops together, for `--max-connections`.
    pub connections: AtomicUsize,
    /// Which origins may open WebSockets.
    pub origin: OriginPolicy,
    /// Token verifier, when `--token-secret` is set.
    pub verifier: Option<Verifier>,
    /// Proxies whose `X-Forwarded-For` is believed (`--trusted-proxy`).
    pub trusted: TrustedProxies,
    /// This process's node id: random, chosen at start. Client ids (presence, the welcome)
    /// start with it, and the server API's `info` lists nodes by it.
    pub node: Arc<str>,
    /// Connections per client address, when `--max-connections-per-ip` is set. A lock is
    /// fine here: it is taken once per accept and once per close, never per message, and it
    /// must be shared because SO_REUSEPORT spreads one address's connections over all loops.
    pub per_ip: Option<Mutex<PerIpLimit>>,
}

/// A graceful shutdown that has been asked for. Every loop times its steps from `at`, so the
/// loops agree on the schedule whenever each of them notices.
#[derive(Clone, Copy, Debug)]
pub struct Stop {
    /// When it was asked for.
    pub at: Instant,
    /// Drain (SIGTERM): report "draining" for `--drain-delay`, then close clients over
    /// `--drain-period`. Otherwise (SIGINT) every client is closed at once.
    pub drain: bool,
}

impl Stop {
    /// How long the node keeps serving while reporting itself unhealthy.
    pub fn delay(&self, config: &Config) -> Duration {
        if self.drain {
            config.drain_delay
        } else {
            Duration::ZERO
        }
    }

    /// Over how long clients are closed, after the delay.
    pub fn period(&self, config: &Config) -> Duration {
        if self.drain {
            config.drain_period
        } else {
            Duration::ZERO
        }
    }

    /// When the process exits, whatever is left: close handshakes and session writes get
    /// `--shutdown-timeout` after the last client was asked to close.
    pub fn deadline(&self, config: &Config) -> Instant {
        self.at + self.delay(config) + self.period(config) + config.shutdown_timeout
    }
}
