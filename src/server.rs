//! Wiring: builds the listeners, polls, queues and broker, starts one thread per loop, and
//! shuts everything down in order. The only process-wide state is [`Shared`] (`shared.rs`):
//! configuration, metrics, the shutdown request and the connection count; nothing on the
//! per-message path locks.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::auth::Verifier;
use crate::bridge::{self, LoopHandle};
use crate::config::Config;
use crate::event_loop::{EventLoop, WAKER};
use crate::forwarded::TrustedProxies;
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;
use crate::ratelimit::PerIpLimit;
pub use crate::shared::{Shared, Stop};
use crate::{broker, listener};

/// A fresh node id: 8 characters of `A-Z a-z 0-9` from the OS's randomness (48 bits: two
/// nodes of a cluster never share one in practice).
fn node_id() -> Arc<str> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect::<String>()
        .into()
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    proxy_addr: Option<SocketAddr>,
    loops: Vec<LoopHandle>,
    loop_threads: Vec<JoinHandle<()>>,
    broker_threads: Vec<JoinHandle<()>>,
}

/// Starts a graceful shutdown from any thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    loops: Vec<LoopHandle>,
}

impl ShutdownHandle {
    /// Stops accepting and closes every client with 1001 at once (SIGINT).
    pub fn trigger(&self) {
        self.begin(false);
    }

    /// Drains (SIGTERM): `/healthz` answers 503 "draining" and new WebSockets are refused for
    /// `--drain-delay`; then the listeners close and clients are closed with 1001 over
    /// `--drain-period`, each after its session is stored.
    pub fn drain(&self) {
        self.begin(true);
    }

    fn begin(&self, drain: bool) {
        let stop = Stop {
            at: Instant::now(),
            drain,
        };
        // The first request wins: a second one is the signal thread's business.
        let _ = self.shared.stop.set(stop);
        for l in &self.loops {
            l.wake();
        }
    }
}

impl Server {
    /// Binds, connects to Redis if configured, and starts every thread. Errors are one line,
    /// meant for the operator.
    pub fn start(config: Config) -> Result<Server, String> {
        config.validate()?;
        let fd_limit =
            listener::raise_fd_limit().map_err(|e| format!("cannot read the open-file limit: {e}"))?;
        let (listeners, addr) = listener::bind_all(config.listen, config.threads)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let (mut proxy_listeners, proxy_addr) = match config.proxy_listen {
            Some(a) => {
                let (ls, bound) = listener::bind_all(a, config.threads)
                    .map_err(|e| format!("cannot listen on {a} (--proxy-listen): {e}"))?;
                (ls.into_iter().map(Some).collect(), Some(bound))
            }
            None => ((0..config.threads).map(|_| None).collect::<Vec<_>>(), None),
        };
        let metrics = Arc::new(Metrics::new(config.threads));

        let mut polls = Vec::new();
        let mut loops = Vec::new();
        let mut inboxes = Vec::new();
        for id in 0..config.threads {
            let poll = mio::Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
            let waker =
                mio::Waker::new(poll.registry(), WAKER).map_err(|e| format!("cannot create waker: {e}"))?;
            let (handle, inbox) =
                bridge::loop_queue(id, config.loop_queue, config.loop_queue_bytes, Arc::new(waker));
            polls.push(poll);
            loops.push(handle);
            inboxes.push(inbox);
        }
        let node = node_id();
        let broker = broker::start(&config, node.clone(), loops.clone(), metrics.clone())?;
        let backplane = match (&config.redis, &config.redis_cluster) {
            (Some(url), _) => format!("redis {}", crate::config::redact_url(url)),
            (None, Some(seeds)) => format!(
                "redis cluster ({} seed nodes)",
                seeds.split(',').filter(|s| !s.trim().is_empty()).count()
            ),
            (None, None) => "in-process broker".to_owned(),
        };
        let origin = OriginPolicy::new(&config.allowed_origins)?;
        let verifier = match &config.token_secret {
            Some(secret) => Some(Verifier::new(secret.as_bytes(), config.token_leeway.as_secs())?),
            None => None,
        };
        let per_ip = (config.max_connections_per_ip > 0)
            .then(|| Mutex::new(PerIpLimit::new(config.max_connections_per_ip)));
        let trusted = TrustedProxies::new(config.trusted_proxies.clone());
        let shared = Arc::new(Shared {
            trusted,
            config,
            metrics,
            stop: OnceLock::new(),
            connections: AtomicUsize::new(0),
            origin,
            verifier,
            node,
            per_ip,
        });

        let trimmer = shared.clone();
        crate::trim::spawn(move || trimmer.stop.get().is_some())
            .map_err(|e| format!("cannot start the memory trim thread: {e}"))?;
        let mut loop_threads = Vec::new();
        for (id, ((poll, listener), inbox)) in polls.into_iter().zip(listeners).zip(inboxes).enumerate() {
            let listeners = [Some(listener), proxy_listeners[id].take()];
            let ev = EventLoop::new(id, poll, listeners, inbox, broker.handle.clone(), shared.clone())
                .map_err(|e| format!("cannot start loop {id}: {e}"))?;
            let t = std::thread::Builder::new()
                .name(format!("wsrelay-loop-{id}"))
                .spawn(move || ev.run())
                .map_err(|e| format!("cannot start loop thread: {e}"))?;
            loop_threads.push(t);
        }
        // The broker threads exit when the last handle is gone; the loops hold the others.
        drop(broker.handle);
        info!(
            "listening on {addr} ({} loops, {backplane}, open-file limit {fd_limit})",
            shared.config.threads
        );
        if let Some(p) = proxy_addr {
            info!("proxy protocol listener on {p} (a PROXY v1 or v2 header is required)");
        }
        Ok(Server {
            shared,
            addr,
            proxy_addr,
            loops,
            loop_threads,
            broker_threads: broker.threads,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `--proxy-listen` address actually bound, if any.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy_addr
    }

    /// Process-wide state, e.g. for reading metrics.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A handle that can start the shutdown from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
            loops: self.loops.clone(),
        }
    }

    /// Waits until every loop has exited (after a shutdown), then for the broker threads: they
    /// finish what the loops queued (publishes, the last session writes) and exit. Past the
    /// shutdown deadline (a Redis that stopped answering) they are abandoned, so the process
    /// still exits in bounded time.
    pub fn wait(self) -> Result<(), String> {
        let mut failed = false;
        for t in self.loop_threads {
            failed |= t.join().is_err();
        }
        // Dropping the loops' handles is what lets the broker threads see the end.
        drop(self.loops);
        let deadline = self.shared.stop.get().map(|s| s.deadline(&self.shared.config));
        let mut left = self.broker_threads;
        while !left.is_empty() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                warn!(
                    "shutdown deadline passed with {} broker threads busy; the last publishes or session writes may be lost",
                    left.len()
                );
                break;
            }
            let (done, busy): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
            for t in done {
                failed |= t.join().is_err();
            }
            left = busy;
            if !left.is_empty() {
                // Polled, not joined: a thread stuck on Redis must not hold the exit past the
                // deadline.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if failed {
            return Err("a server thread panicked".into());
        }
        info!("shut down");
        Ok(())
    }
}
