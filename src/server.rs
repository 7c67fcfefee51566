//! Wiring: builds the listeners, polls, queues and broker, starts one thread per loop, and
//! shuts everything down in order. The only process-wide state is [`Shared`]: configuration,
//! metrics, the shutdown flag and the connection count; nothing on the per-message path locks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::info;

use crate::auth::Verifier;
use crate::bridge::{self, LoopHandle};
use crate::config::Config;
use crate::event_loop::{EventLoop, WAKER};
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;
use crate::ratelimit::PerIpLimit;
use crate::{broker, listener};

/// State every thread may read.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the process started with.
    pub config: Config,
    /// All counters.
    pub metrics: Arc<Metrics>,
    /// Set once to start a graceful shutdown.
    pub shutdown: AtomicBool,
    /// Sockets held by all loops together, for `--max-connections`.
    pub connections: AtomicUsize,
    /// Which origins may open WebSockets.
    pub origin: OriginPolicy,
    /// Token verifier, when `--token-secret` is set.
    pub verifier: Option<Verifier>,
    /// Connections per client address, when `--max-connections-per-ip` is set. A lock is
    /// fine here: it is taken once per accept and once per close, never per message, and it
    /// must be shared because SO_REUSEPORT spreads one address's connections over all loops.
    pub per_ip: Option<Mutex<PerIpLimit>>,
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
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
    /// Stops accepting, closes every client with 1001 and lets the loops exit.
    pub fn trigger(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
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
        let metrics = Arc::new(Metrics::new(config.threads));

        let mut polls = Vec::new();
        let mut loops = Vec::new();
        let mut inboxes = Vec::new();
        for id in 0..config.threads {
            let poll = mio::Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
            let waker =
                mio::Waker::new(poll.registry(), WAKER).map_err(|e| format!("cannot create waker: {e}"))?;
            let (handle, inbox) = bridge::loop_queue(id, config.loop_queue, Arc::new(waker));
            polls.push(poll);
            loops.push(handle);
            inboxes.push(inbox);
        }
        let broker = broker::start(&config, loops.clone(), metrics.clone())?;
        let backplane = match &config.redis {
            Some(url) => format!("redis {url}"),
            None => "in-process broker".to_owned(),
        };
        let origin = OriginPolicy::new(&config.allowed_origins)?;
        let verifier = match &config.token_secret {
            Some(secret) => Some(Verifier::new(secret.as_bytes(), config.token_leeway.as_secs())?),
            None => None,
        };
        let per_ip = (config.max_connections_per_ip > 0)
            .then(|| Mutex::new(PerIpLimit::new(config.max_connections_per_ip)));
        let shared = Arc::new(Shared {
            config,
            metrics,
            shutdown: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            origin,
            verifier,
            per_ip,
        });

        let trimmer = shared.clone();
        crate::trim::spawn(move || trimmer.shutdown.load(Ordering::Acquire))
            .map_err(|e| format!("cannot start the memory trim thread: {e}"))?;
        let mut loop_threads = Vec::new();
        for (id, ((poll, listener), inbox)) in polls.into_iter().zip(listeners).zip(inboxes).enumerate() {
            let ev = EventLoop::new(id, poll, listener, inbox, broker.handle.clone(), shared.clone())
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
        Ok(Server {
            shared,
            addr,
            loops,
            loop_threads,
            broker_threads: broker.threads,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

    /// Waits until every loop has exited (after a shutdown), then for the broker threads.
    pub fn wait(self) -> Result<(), String> {
        let mut failed = false;
        for t in self.loop_threads {
            failed |= t.join().is_err();
        }
        // Dropping the loops' handles is what lets the broker threads see the end.
        drop(self.loops);
        for t in self.broker_threads {
            failed |= t.join().is_err();
        }
        if failed {
            return Err("a server thread panicked".into());
        }
        info!("shut down");
        Ok(())
    }
}
