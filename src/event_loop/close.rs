//! How connections end, and the loop's clocks: WebSocket closes and HTTP answers that close
//! after writing, removals at the end of a turn, and the periodic sweep (handshake, ping, idle,
//! token expiry, close and session deadlines). The graceful shutdown is `drain.rs`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use log::debug;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::EventLoop;
use crate::conn::{Io, Phase};
use crate::frame;
use crate::http::{self, Status};
use crate::metrics::{HandshakeFailure, dec, inc};

/// The close code of a connection whose token expired (and was not refreshed in time).
pub const TOKEN_EXPIRED: u16 = 4401;

/// Milliseconds since the Unix epoch, for token expiry.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl EventLoop {
    // ---- closing -------------------------------------------------------------------------

    /// Queues an HTTP response and closes once it is written.
    pub(super) fn respond(&mut self, key: usize, response: Vec<u8>, now: Instant) {
        self.conns[key].out.push(&response);
        self.enter_closing(key, now);
    }

    /// Starts a WebSocket close with `code`: the close frame goes out after whatever is
    /// already queued.
    pub(super) fn close(&mut self, key: usize, code: CloseCode, reason: &'static str, now: Instant) {
        self.close_with(key, code, reason.to_owned(), now);
    }

    /// [`EventLoop::close`] with a reason made at run time (at most 123 bytes).
    pub(super) fn close_with(&mut self, key: usize, code: CloseCode, reason: String, now: Instant) {
        let conn = &mut self.conns[key];
        if let Phase::Open(open) = &mut conn.phase {
            let mut io = Io {
                sock: &mut conn.sock,
                out: &mut conn.out,
                ahead: None,
                got_input: false,
            };
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = open.ctx.close(&mut io, Some(frame));
        }
        self.enter_closing(key, now);
    }

    /// Leaves every channel and waits for the last bytes to go out and the peer to hang up.
    pub(super) fn enter_closing(&mut self, key: usize, now: Instant) {
        self.end_open(key, now);
        let close_timeout = self.shared.config.close_timeout;
        self.conns[key].phase = Phase::closing(now + close_timeout);
        self.mark_dirty(key);
    }

    /// Drops the connection at the end of this turn, without a goodbye.
    pub(super) fn kill(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.dead {
            conn.dead = true;
            self.dead.push(key);
        }
    }

    pub(super) fn remove_dead(&mut self) {
        let now = Instant::now();
        for key in std::mem::take(&mut self.dead) {
            self.end_open(key, now);
            let mut conn = self.conns.remove(key);
            self.unsent = self.unsent.saturating_sub(conn.accounted);
            let _ = self.poll.registry().deregister(&mut conn.sock);
            if conn.ip_counted {
                if let Some(per_ip) = &self.shared.per_ip {
                    per_ip
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .release(conn.peer.ip());
                }
            }
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            dec(&self.metrics().connections);
        }
        // Unsubscribes and presence leaves from removals go out this turn rather than next
        // (there may be no next turn: the loop may be stopping).
        self.link.send_queued();
    }

    // ---- timers --------------------------------------------------------------------------

    /// Handshake deadlines, pings, idle timeouts, close deadlines and session flushes, in one
    /// pass over the connections.
    pub(super) fn sweep(&mut self, now: Instant) {
        let due = self.due(now);
        for key in due.over_soft {
            self.judge_output(key, now);
        }
        for key in due.sessions {
            self.save_session(key, now, true);
        }
        for key in due.refreshes {
            self.save_session(key, now, false);
        }
        for key in due.expired_requests {
            self.metrics().handshake_failed(HandshakeFailure::Timeout);
            if self.conns[key].awaits_proxy_header() {
                // A balancer that did not finish its PROXY header is not spoken HTTP to.
                self.kill(key);
            } else {
                self.respond(key, http::error_response(Status::RequestTimeout), now);
            }
        }
        for key in due.expired_publishes {
            let body = crate::envelope::error(None, "unavailable", "the broker did not answer in time");
            self.respond(
                key,
                http::response(Status::GatewayTimeout, "application/json", body.as_bytes()),
                now,
            );
        }
        for key in due.unauthenticated {
            self.metrics().handshake_failed(HandshakeFailure::Unauthorized);
            self.close(key, CloseCode::Policy, "no connect command in time", now);
        }
        let idle_timeout = self.shared.config.idle_timeout;
        for key in due.idle {
            inc(&self.metrics().idle_closed);
            debug!("{}: idle past {idle_timeout:?}; closing", self.conns[key].peer);
            self.close(key, CloseCode::Away, "idle timeout", now);
        }
        for key in due.token_expired {
            inc(&self.metrics().token_expired);
            debug!(
                "{}: token expired; closing with {TOKEN_EXPIRED}",
                self.conns[key].peer
            );
            self.close(key, CloseCode::from(TOKEN_EXPIRED), "token expired", now);
        }
        self.report_channels(now);
        self.flush_at = None;
        for key in std::mem::take(&mut self.turn.dirty) {
            self.flush(key);
        }
        self.remove_dead();
    }

    /// One pass over the connections: what each one's timers call for. Pings and the end of a
    /// closing handshake's wait are done on the way; the rest is returned.
    fn due(&mut self, now: Instant) -> Due {
        let cfg = &self.shared.config;
        let (ping_interval, idle_timeout) = (cfg.ping_interval, cfg.idle_timeout);
        // A session is rewritten when its offsets moved (every `session_flush`), and at least
        // every third of its time to live so an open connection's session never expires.
        let (flush_every, refresh_every) = (cfg.session_flush, cfg.session_ttl / 3);
        let mut due = Due::default();
        let now_ms = unix_ms();
        for (key, conn) in self.conns.iter_mut() {
            if conn.dead {
                continue;
            }
            let expired = conn.deadline().is_some_and(|d| now >= d);
            match &mut conn.phase {
                Phase::Request(_) if expired => due.expired_requests.push(key),
                Phase::Api { .. } if expired => due.expired_publishes.push(key),
                Phase::Closing { .. } if expired => {
                    conn.dead = true;
                    self.dead.push(key);
                }
                // Only a connection that owes its `connect` has a deadline while open.
                Phase::Open(_) if expired => due.unauthenticated.push(key),
                Phase::Open(open) => {
                    if open.token.as_ref().is_some_and(|t| now_ms >= t.expires_ms) {
                        due.token_expired.push(key);
                        continue;
                    }
                    if conn.over_soft_since.is_some() {
                        // Over the soft limit and not written to since: its grace runs out
                        // here, not only when more output comes.
                        due.over_soft.push(key);
                    }
                    if let Some(s) = &open.session {
                        let age = now.duration_since(s.saved_at);
                        if age >= refresh_every {
                            due.refreshes.push(key);
                        } else if s.offsets_dirty && age >= flush_every {
                            due.sessions.push(key);
                        }
                    }
                    // A connection the loop is not reading (paused by a full publish queue,
                    // waiting for its subscription or its session) is not silent if input
                    // waits for it in the kernel.
                    let waiting_input = || {
                        conn.unpublished.is_some()
                            || (conn.read_pending && crate::conn::unread(&conn.sock).is_some_and(|n| n > 0))
                    };
                    if now.duration_since(conn.last_seen) >= idle_timeout && !waiting_input() {
                        due.idle.push(key);
                    } else if now.duration_since(conn.last_seen.max(open.last_ping)) >= ping_interval {
                        open.last_ping = now;
                        conn.out.push(&frame::ping(b""));
                        self.turn.mark_dirty(key, conn);
                    }
                }
                _ => {}
            }
        }
        due
    }
}

/// What a sweep found due, by connection key (`EventLoop::due`).
#[derive(Default)]
struct Due {
    /// Requests not complete within `--handshake-timeout`.
    expired_requests: Vec<usize>,
    /// `POST /publish` requests the broker did not answer in time.
    expired_publishes: Vec<usize>,
    /// v1 connections that owed a `connect` command and did not send it in time.
    unauthenticated: Vec<usize>,
    /// Connections silent past `--idle-timeout`.
    idle: Vec<usize>,
    /// Sessions whose positions moved, due for a flush.
    sessions: Vec<usize>,
    /// Sessions due for a rewrite so they do not expire while their connection lives.
    refreshes: Vec<usize>,
    /// Connections over the soft output limit, to judge again.
    over_soft: Vec<usize>,
    /// Connections whose token expired.
    token_expired: Vec<usize>,
}
