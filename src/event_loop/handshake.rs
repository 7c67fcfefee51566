//! The loop's handshake path: reading the HTTP request head, answering plain HTTP requests
//! (`/healthz`, `/metrics`, the browser client and demo page), and turning an upgrade request
//! into an open WebSocket of the protocol the client asked for.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use log::debug;
use tungstenite::protocol::{Role, WebSocketContext};

use super::{EventLoop, interrupted, would_block};
use crate::bridge::Channel;
use crate::conn::{Open, Phase, Protocol, SessionLink, Sub};
use crate::envelope;
use crate::http::{self, Head, Parse, Status};
use crate::metrics::{HandshakeFailure, inc};

/// The browser client, served at `/wsrelay.js`.
const CLIENT_JS: &str = include_str!("../../client/wsrelay.js");
/// The demo chat page, served at `/`.
const DEMO_HTML: &str = include_str!("../../client/demo.html");

/// A session id a client may choose: 8 to 64 characters of `A-Z a-z 0-9 _ -`.
pub fn valid_session_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A new random session id (128 bits from the OS, base62-ish): unguessable, since knowing an
/// id is what lets a connection resume a session.
pub fn new_session_id() -> Arc<str> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 22];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness is a broken system; fall back rather than refuse service.
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    let id: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    Arc::from(id)
}

impl EventLoop {
    /// Reads the HTTP request head until it is complete, invalid, too large or WouldBlock.
    pub(super) fn read_request(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        let Phase::Request(head) = &mut conn.phase else {
            return;
        };
        loop {
            let start = head.len();
            let want = (http::MAX_HEAD + 1).saturating_sub(start).clamp(1, 4096);
            head.resize(start + want, 0);
            match io::Read::read(&mut conn.sock, &mut head[start..]) {
                Ok(0) => {
                    head.truncate(start);
                    self.metrics().handshake_failed(HandshakeFailure::Disconnected);
                    self.kill(key);
                    return;
                }
                Ok(n) => {
                    head.truncate(start + n);
                    conn.last_seen = now;
                    match http::parse(head) {
                        Parse::Partial => continue,
                        Parse::Complete(parsed, len) => {
                            let rest = head.split_off(len);
                            self.serve(key, parsed, rest, now);
                            return;
                        }
                        Parse::Invalid(status) => {
                            let reason = if status == Status::HeadersTooLarge {
                                HandshakeFailure::TooLarge
                            } else {
                                HandshakeFailure::BadRequest
                            };
                            debug!("bad request from {}: {status:?}", conn.peer);
                            self.metrics().handshake_failed(reason);
                            self.respond(key, http::error_response(status), now);
                            return;
                        }
                    }
                }
                Err(e) if would_block(&e) => {
                    head.truncate(start);
                    return;
                }
                Err(e) if interrupted(&e) => head.truncate(start),
                Err(_) => {
                    head.truncate(start);
                    self.metrics().handshake_failed(HandshakeFailure::Disconnected);
                    self.kill(key);
                    return;
                }
            }
        }
    }

    /// Answers a complete request: a WebSocket upgrade, or a plain HTTP endpoint.
    fn serve(&mut self, key: usize, head: Head, rest: Vec<u8>, now: Instant) {
        let Some(upgrade) = &head.upgrade else {
            inc(&self.metrics().http_requests);
            let response = self.http_endpoint(&head);
            self.respond(key, response, now);
            return;
        };
        let cfg = &self.shared.config;
        let protocol = if upgrade.protocols.iter().any(|p| p == envelope::PROTOCOL) {
            Protocol::V1
        } else {
            Protocol::Raw
        };
        let session = http::query_param(head.query.as_deref(), "session");
        if session.as_deref().is_some_and(|s| !valid_session_id(s)) {
            self.metrics().handshake_failed(HandshakeFailure::BadRequest);
            self.respond(
                key,
                http::response(Status::BadRequest, "text/plain", b"invalid session id\n"),
                now,
            );
            return;
        }
        // Raw connections are on the channel their path names; v1 ignores the path.
        let raw_channel: Option<Channel> = match protocol {
            Protocol::V1 => None,
            Protocol::Raw => {
                let name = head.path.strip_prefix('/').unwrap_or(&head.path);
                let name = if name.is_empty() {
                    cfg.default_channel.as_str()
                } else {
                    name
                };
                if name.len() > cfg.max_channel_len {
                    self.metrics().handshake_failed(HandshakeFailure::BadRequest);
                    self.respond(key, http::error_response(Status::BadRequest), now);
                    return;
                }
                Some(Arc::from(name))
            }
        };
        let ctx = if rest.is_empty() {
            WebSocketContext::new(Role::Server, Some(self.ws_config))
        } else {
            WebSocketContext::from_partially_read(rest, Role::Server, Some(self.ws_config))
        };
        let resuming = session.is_some();
        let session = match (protocol, session) {
            (_, Some(id)) => Some(Arc::from(id)),
            (Protocol::V1, None) => Some(new_session_id()),
            (Protocol::Raw, None) => None,
        };
        self.next_serial += 1;
        let offered = (protocol == Protocol::V1).then_some(envelope::PROTOCOL);
        let conn = &mut self.conns[key];
        conn.out.push(&http::upgrade_response(&upgrade.key, offered));
        conn.deadline = None;
        conn.phase = Phase::Open(Box::new(Open {
            ctx,
            protocol,
            serial: self.next_serial,
            subs: Vec::new(),
            tracks_offsets: protocol == Protocol::V1 || session.is_some(),
            session: session.map(|id| SessionLink {
                id,
                subject: None,
                offsets_dirty: false,
                saved_at: now,
            }),
            resuming,
            raw_channel: if resuming { raw_channel.clone() } else { None },
            held_bytes: 0,
            last_ping: now,
        }));
        inc(&self.metrics().websockets);
        self.mark_dirty(key);
        if resuming {
            // Nothing is read or joined until the stored session is known.
            self.conns[key].read_pending = true;
            self.load_session(key);
            return;
        }
        if protocol == Protocol::V1 {
            let id = self.conns[key]
                .open_mut()
                .and_then(|o| o.session.as_ref())
                .map(|s| s.id.clone());
            if let Some(id) = id {
                self.send_json(key, &envelope::welcome(&id, false));
            }
        }
        if let Some(channel) = raw_channel {
            self.join_raw(key, channel, None, now);
        }
        // Bytes that arrived with the request may already hold frames.
        self.conns[key].read_pending = true;
        self.read_backlog.push(key);
    }

    /// Puts a raw connection on its channel, recovering from a stored session position.
    pub(super) fn join_raw(
        &mut self,
        key: usize,
        channel: Channel,
        from: Option<(u64, Option<Arc<str>>)>,
        now: Instant,
    ) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        match from {
            Some((offset, epoch)) => {
                let mut sub = Sub::live(channel.clone());
                sub.offset = offset;
                sub.epoch = epoch;
                sub.state = crate::conn::SubState::AwaitingLive(crate::conn::Pending {
                    reference: None,
                    recover: true,
                    announce: false,
                });
                open.subs.push(sub);
            }
            None => open.subs.push(Sub::live(channel.clone())),
        }
        if open.session.is_some() {
            self.session_changed.push(key);
        }
        self.join(key, &channel, now);
    }

    /// The response to a plain (non-WebSocket) HTTP request.
    fn http_endpoint(&self, head: &Head) -> Vec<u8> {
        const TEXT: &str = "text/plain; charset=utf-8";
        match (head.method.as_str(), head.path.as_str()) {
            ("GET" | "HEAD", "/healthz") => {
                if self.shared.metrics.broker.subscriber_up.load(Ordering::Relaxed) {
                    http::response(Status::Ok, TEXT, b"ok\n")
                } else {
                    http::response(Status::Unavailable, TEXT, b"redis subscriber down\n")
                }
            }
            ("GET" | "HEAD", "/metrics") => http::response(
                Status::Ok,
                "text/plain; version=0.0.4; charset=utf-8",
                self.shared.metrics.render().as_bytes(),
            ),
            ("GET" | "HEAD", "/") => {
                http::response(Status::Ok, "text/html; charset=utf-8", DEMO_HTML.as_bytes())
            }
            ("GET" | "HEAD", "/wsrelay.js") => {
                http::response(Status::Ok, "text/javascript; charset=utf-8", CLIENT_JS.as_bytes())
            }
            ("GET" | "HEAD", _) => http::error_response(Status::NotFound),
            _ => http::error_response(Status::MethodNotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(valid_session_id("abcdEFGH"));
        assert!(valid_session_id(&"x".repeat(64)));
        assert!(!valid_session_id("short"));
        assert!(!valid_session_id(&"x".repeat(65)));
        assert!(!valid_session_id("has space1"));
        let a = new_session_id();
        assert!(valid_session_id(&a));
        assert_ne!(a, new_session_id());
    }
}
