//! The loop's listeners: the plain one (`--listen`) and the PROXY protocol one
//! (`--proxy-listen`), both SO_REUSEPORT, edge-triggered, and paused for a moment when the
//! process runs out of descriptors (retrying at once would spin).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use super::{interrupted, would_block};
use crate::log_throttle::LogThrottle;
use crate::metrics::{LoopMetrics, inc};

/// Token of the loop's listener (`--listen`).
pub(super) const LISTENER: Token = Token(usize::MAX - 2);
/// Token of the loop's PROXY protocol listener (`--proxy-listen`).
pub(super) const PROXY_LISTENER: Token = Token(usize::MAX - 3);
/// How long accepting pauses after the process ran out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listener {
    /// `--listen`: plain connections.
    Plain = 0,
    /// `--proxy-listen`: each connection starts with a PROXY protocol header.
    Proxy = 1,
}

/// The listeners while they accept, and when accepting resumes after running out of
/// descriptors.
pub(super) struct Acceptor {
    listeners: [Option<TcpListener>; 2],
    paused_until: Option<Instant>,
    log_limit: LogThrottle,
}

impl Acceptor {
    /// Registers the listeners (plain, PROXY) with the loop's poll.
    pub(super) fn new(mut listeners: [Option<TcpListener>; 2], registry: &Registry) -> io::Result<Self> {
        for (l, token) in listeners.iter_mut().zip([LISTENER, PROXY_LISTENER]) {
            if let Some(l) = l {
                registry.register(l, token, Interest::READABLE)?;
            }
        }
        Ok(Acceptor {
            listeners,
            paused_until: None,
            log_limit: LogThrottle::default(),
        })
    }

    /// The next connection waiting on `which`, or `None` when there is none (WouldBlock), the
    /// listener is closed, or accepting is paused. Out of descriptors, it pauses accepting for
    /// a moment (counted): the pending connection stays in the backlog.
    pub(super) fn next(
        &mut self,
        which: Listener,
        now: Instant,
        metrics: &LoopMetrics,
    ) -> Option<(TcpStream, SocketAddr)> {
        if self.paused_until.is_some() {
            return None;
        }
        loop {
            let listener = self.listeners[which as usize].as_ref()?;
            match listener.accept() {
                Ok(accepted) => return Some(accepted),
                Err(e) if would_block(&e) => return None,
                Err(e) if interrupted(&e) => {}
                Err(e) if crate::listener::is_resource_exhausted(&e) => {
                    inc(&metrics.accept_paused);
                    if self.log_limit.allow() {
                        warn!(
                            "accept failed: {e}; pausing accepts for {ACCEPT_PAUSE:?} (raise the open-file limit)"
                        );
                    }
                    self.paused_until = Some(now + ACCEPT_PAUSE);
                    return None;
                }
                // The connection died in the backlog (ECONNABORTED and the like): next.
                Err(e) => debug!("accept: {e}"),
            }
        }
    }

    /// When accepting resumes, while it is paused.
    pub(super) fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Ends a pause that is over; true when one ended (the listeners are edge-triggered, so
    /// the caller accepts from both now).
    pub(super) fn resume(&mut self, now: Instant) -> bool {
        let over = self.paused_until.is_some_and(|t| now >= t);
        if over {
            self.paused_until = None;
        }
        over
    }

    /// Stops accepting on both listeners: the balancer sees refused connections from now on
    /// (and the kernel hands new connections to other processes sharing the port, if any).
    pub(super) fn close(&mut self, registry: &Registry) {
        for l in &mut self.listeners {
            if let Some(mut l) = l.take() {
                let _ = registry.deregister(&mut l);
            }
        }
    }
}
