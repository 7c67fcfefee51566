//! One loop's part of a graceful shutdown: what a node behind a load balancer does between
//! SIGTERM and exit so that no client loses or repeats a message and no other node is hit by a
//! reconnect storm.
//!
//! ```text
//!  SIGTERM ──▶ Announcing ──--drain-delay──▶ Closing ──--drain-period──▶ Finishing ──▶ exit
//!              /healthz 503 "draining"       listener closed             close handshakes,
//!              new WebSockets get 503        one client after another,   --shutdown-timeout
//!              (the balancer retries them    evenly over the period
//!              on another node)
//! ```
//!
//! A client is closed only after its session is stored at the position it really reached: its
//! subscriptions leave their channels (nothing more is queued to it), the loop waits until the
//! kernel has seen the client acknowledge everything queued (a round trip, usually), the
//! session is written at that position, and a [`Request::Barrier`] behind that write comes back
//! once it is in Redis. Only then does the 1001 close frame go out. A client that resumes on
//! another node therefore reads exactly the position it reached here: the replay starts at the
//! next message, with no duplicate and no gap.
//!
//! SIGINT (or `ShutdownHandle::trigger` in `server.rs`) runs the same steps with no delay and
//! no period: everyone is closed at once.

use std::time::{Duration, Instant};

use log::{debug, info};
use tungstenite::protocol::frame::coding::CloseCode;

use super::EventLoop;
use crate::bridge::{ConnId, Request};
use crate::conn::Phase;

/// How often a finishing loop checks whether its last clients have everything.
const FINISH_CHECK: Duration = Duration::from_millis(10);

/// Where a loop is in its shutdown; each step owns what it needs.
#[derive(Debug)]
pub(super) enum Stopping {
    /// `/healthz` answers 503 "draining" and new WebSockets are refused with 503, until
    /// `until`; the listener stays open so that the balancer's health checks see the 503.
    Announcing {
        /// End of `--drain-delay`.
        until: Instant,
    },
    /// The listener is closed; the connections open at `start` are closed evenly over
    /// `period`, last in `queue` first.
    Closing {
        /// When closing began (per the shared schedule, not when this loop noticed).
        start: Instant,
        /// `--drain-period` (zero: everyone at once).
        period: Duration,
        /// Connections not asked to close yet.
        queue: Vec<ConnId>,
        /// How many were open at `start`.
        total: usize,
    },
    /// Every client has been asked to close; the loop exits when the last one is gone or at
    /// `deadline`.
    Finishing {
        /// `--shutdown-timeout` after the drain period.
        deadline: Instant,
    },
}

impl Stopping {
    /// How many of the `total` connections should have been asked to close `elapsed` into
    /// `period`: the first at once, then evenly, the last just before the period ends.
    fn due(total: usize, elapsed: Duration, period: Duration) -> usize {
        if elapsed >= period {
            return total;
        }
        let share = elapsed.as_secs_f64() / period.as_secs_f64();
        ((total as f64 * share) as usize + 1).min(total)
    }

    /// When the loop must next act on its own (no event needed).
    pub(super) fn next_step(&self) -> Instant {
        match self {
            Stopping::Announcing { until } => *until,
            Stopping::Closing {
                start,
                period,
                queue,
                total,
            } => {
                let closed = total - queue.len();
                *start + period.mul_f64(closed as f64 / (*total).max(1) as f64)
            }
            // Acknowledgements of the last bytes come with no event: look again soon.
            Stopping::Finishing { deadline } => (*deadline).min(Instant::now() + FINISH_CHECK),
        }
    }
}

impl EventLoop {
    /// Whether a shutdown has started on this loop: new WebSockets are refused, `/healthz`
    /// says so.
    pub(super) fn draining(&self) -> bool {
        self.stopping.is_some()
    }

    /// True when the shutdown is over for this loop: every client was asked to close and
    /// is gone, or the deadline passed.
    pub(super) fn stopped(&self, now: Instant) -> bool {
        match self.stopping {
            // Done when every client has our close frame: the peer's own FIN is not waited
            // for (a client may keep its socket open after the close handshake).
            // Messages read from closed connections are published first.
            Some(Stopping::Finishing { deadline }) => {
                now >= deadline
                    || (self.orphans.is_empty() && self.conns.iter().all(|(_, c)| c.closed_and_delivered()))
            }
            _ => false,
        }
    }

    /// Takes the shutdown's next steps, once a shutdown was asked for (a turn's work, before
    /// the end-of-turn flush that sends what they queue).
    pub(super) fn step_stopping(&mut self, now: Instant) {
        let Some(stop) = self.shared.stop.get().copied() else {
            return;
        };
        self.settle(now);
        let config = &self.shared.config;
        let (delay, period, deadline) = (stop.delay(config), stop.period(config), stop.deadline(config));
        if self.stopping.is_none() {
            debug!("loop {}: draining for {delay:?}", self.id);
            self.stopping = Some(Stopping::Announcing {
                until: stop.at + delay,
            });
        }
        if let Some(Stopping::Announcing { until }) = self.stopping {
            if now < until {
                return;
            }
            self.start_closing(until, period);
        }
        if let Some(Stopping::Closing {
            start,
            period,
            queue,
            total,
        }) = &mut self.stopping
        {
            let due = Stopping::due(*total, now.saturating_duration_since(*start), *period);
            let mut now_due = Vec::new();
            while *total - queue.len() < due {
                let Some(id) = queue.pop() else { break };
                now_due.push(id);
            }
            let finished = queue.is_empty();
            for id in now_due {
                self.drain_close(id, now);
            }
            if !finished {
                return;
            }
            // Requests still arriving on accepted sockets are not worth waiting for.
            self.kill_handshaking();
            self.stopping = Some(Stopping::Finishing { deadline });
        }
    }

    /// The end of the announcement: stops accepting and queues every open connection to be
    /// closed over `period` from `start`.
    fn start_closing(&mut self, start: Instant, period: Duration) {
        self.close_listener();
        let queue: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Open(_)) && !c.dead)
            .map(|(key, c)| ConnId {
                key,
                serial: c.serial,
            })
            .rev()
            .collect();
        info!(
            "loop {}: closing {} connections over {period:?}",
            self.id,
            queue.len()
        );
        self.stopping = Some(Stopping::Closing {
            start,
            period,
            total: queue.len(),
            queue,
        });
    }

    /// Drops every connection still sending its request.
    fn kill_handshaking(&mut self) {
        let handshaking: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Request(_)))
            .map(|(key, _)| key)
            .collect();
        for key in handshaking {
            self.kill(key);
        }
    }

    /// Stops accepting (both listeners): the balancer sees refused connections from now on (and the kernel
    /// hands new connections to other processes sharing the port, if any).
    fn close_listener(&mut self) {
        self.acceptor.close(self.poll.registry());
    }

    /// Closes one client of a draining node (see the module documentation): it leaves its
    /// channels, so nothing more is queued to it; once it has acknowledged what was queued,
    /// its session is stored at that position; once the store has confirmed, it gets 1001.
    fn drain_close(&mut self, id: ConnId, now: Instant) {
        if !self.is_open(id) {
            return;
        }
        let Some(open) = self.conns[id.key].open_mut() else {
            return;
        };
        if open.session.is_none() {
            return self.close(id.key, CloseCode::Away, "server shutting down", now);
        }
        // The subscriptions stay: the session is stored from them. They leave presence now.
        let channels: Vec<_> = open.subs.iter().map(|s| s.channel.clone()).collect();
        for channel in channels {
            self.unlist(id.key, &channel);
            self.leave(id.key, channel);
        }
        let give_up = now + self.shared.config.close_timeout;
        self.settling.push((id, give_up));
    }

    /// Draining clients whose last messages the kernel has not seen acknowledged yet: each is
    /// stored and closed once they are, or at its give-up time (a client that stopped reading;
    /// its stored position is then the last acknowledged one, and it may see a few messages
    /// twice after resuming).
    fn settle(&mut self, now: Instant) {
        for (id, give_up) in std::mem::take(&mut self.settling) {
            if !self.is_open(id) {
                continue;
            }
            let conn = &self.conns[id.key];
            let acknowledged = conn.acknowledged_all();
            if !acknowledged && now < give_up {
                self.settling.push((id, give_up));
                continue;
            }
            self.save_session(id.key, now, false);
            if let Some(open) = self.conns[id.key].open_mut() {
                // Stored: the close must not write it again.
                open.session = None;
            }
            let Some(to) = self.reply_to(id.key) else { continue };
            if self.link.request(Request::Barrier { to }).is_err() {
                self.close(id.key, CloseCode::Away, "server shutting down", now);
            }
        }
    }

    /// Whether `id` is still the open WebSocket it was.
    fn is_open(&self, id: ConnId) -> bool {
        self.reply_to(id.key).is_some_and(|to| to.conn == id)
            && !self.conns[id.key].dead
            && matches!(self.conns[id.key].phase, Phase::Open(_))
    }

    /// The session writes a draining client's close was waiting for are done.
    pub(super) fn on_barrier(&mut self, id: ConnId, now: Instant) {
        if self.is_open(id) {
            self.close(id.key, CloseCode::Away, "server shutting down", now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_evenly_over_the_period() {
        let p = Duration::from_secs(10);
        assert_eq!(Stopping::due(100, Duration::ZERO, p), 1, "the first at once");
        assert_eq!(Stopping::due(100, Duration::from_secs(5), p), 51);
        assert_eq!(Stopping::due(100, Duration::from_millis(9_999), p), 100);
        assert_eq!(Stopping::due(100, p, p), 100);
        assert_eq!(Stopping::due(0, Duration::ZERO, p), 0);
        assert_eq!(
            Stopping::due(3, Duration::ZERO, Duration::ZERO),
            3,
            "no period: all at once"
        );
    }
}
