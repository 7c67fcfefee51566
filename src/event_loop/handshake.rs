//! The loop's handshake path: reading the HTTP request head, answering plain HTTP requests
//! (`/healthz`, `/metrics`, the browser client and demo page), and turning an upgrade request
//! into an open WebSocket of the protocol the client asked for.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketContext};

use super::{EventLoop, count_ip, interrupted, would_block};
use crate::auth::Identity;
use crate::bridge::{Channel, Position, PublishAck, PublishError};
use crate::conn::{ApiWait, Open, Phase, Protocol, SessionLink, Stage, Sub, TokenState};
use crate::envelope;
use crate::frame::Kind;
use crate::http::{self, Head, Parse, Status};
use crate::metrics::{HandshakeFailure, inc};
use crate::proxy;
use crate::ratelimit::TokenBucket;

/// The browser client, served at `/wsrelay.js`.
const CLIENT_JS: &str = include_str!("../../client/wsrelay.js");
/// The demo chat page, served at `/`.
const DEMO_HTML: &str = include_str!("../../client/demo.html");

/// How long `/healthz` reports a Redis that refused every write (out of memory, read-only)
/// when nothing was stored since: long enough for a balancer's health checks to see it, short
/// enough that a recovered Redis with no publishes to prove it turns healthy by itself.
const REFUSING_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Seconds since the Unix epoch, for token expiry.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A session id a client may choose: 8 to 64 characters of `A-Z a-z 0-9 _ -`.
pub fn valid_session_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where a raw client's chosen session id is stored when it has a token: under a digest of
/// its subject, so ids chosen by different users never meet.
pub fn raw_session_key(subject: &str, id: &str) -> Arc<str> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(subject.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("raw.{hex}.{id}"))
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

/// What a connection keeps of its verified token: it is closed at `exp` plus `leeway` unless
/// a `refresh` replaced the token before.
pub(super) fn token_state(identity: Identity, leeway: std::time::Duration) -> TokenState {
    let expires_ms = identity
        .expires_at
        .saturating_add(leeway.as_secs())
        .saturating_mul(1000);
    TokenState {
        subject: Arc::from(identity.subject),
        grant: identity.grant,
        expires_ms,
    }
}

/// An upgrade let through: what the new WebSocket asked for and who it is.
struct Admitted {
    protocol: Protocol,
    /// `?session=`: the session to resume.
    session: Option<String>,
    /// A raw connection's channel (its path's).
    raw_channel: Option<Channel>,
    /// From a valid `?token=`.
    identity: Option<Identity>,
    /// A v1 connection that must send its token in a `connect` command first.
    awaiting_connect: bool,
}

/// A connection's publish rate limit (`--publish-rate`, `--publish-burst`: twice the rate when
/// 0), if there is one.
fn publish_bucket(cfg: &crate::config::Config, now: Instant) -> Option<Box<TokenBucket>> {
    (cfg.publish_rate > 0).then(|| {
        let burst = if cfg.publish_burst > 0 {
            cfg.publish_burst
        } else {
            cfg.publish_rate.saturating_mul(2)
        };
        Box::new(TokenBucket::new(cfg.publish_rate, burst, now))
    })
}

/// Whether a request needs more bytes, or has been dealt with (served, refused, dropped).
enum Progress {
    More,
    Done,
}

impl EventLoop {
    /// Reads the request until it is complete, refused or gone, or until WouldBlock (the
    /// socket is edge-triggered).
    pub(super) fn read_request(&mut self, key: usize, now: Instant) {
        while self.read_request_bytes(key, now) {
            if let Progress::Done = self.request_progress(key, now) {
                return;
            }
        }
    }

    /// One read into the request. True when bytes arrived; false on WouldBlock or when the
    /// peer is gone (the connection is then dropped).
    fn read_request_bytes(&mut self, key: usize, now: Instant) -> bool {
        let conn = &mut self.conns[key];
        let Phase::Request(request) = &mut conn.phase else {
            return false;
        };
        let head = &mut request.head;
        let start = head.len();
        // Past the head limit only a complete head with a body may be read further (the head
        // is parsed again only then; below it, the parse after each read decides).
        let limit = if start <= http::MAX_HEAD {
            http::MAX_HEAD + 1
        } else if let Parse::Complete(h, len) = http::parse(head) {
            len + h.content_length
        } else {
            http::MAX_HEAD + 1
        };
        // Read into the loop's shared buffer and keep only what arrived: a request head costs
        // its own size, not a fixed buffer per handshaking connection.
        let buf = self.ahead.buf_mut();
        let want = limit.saturating_sub(start).clamp(1, buf.len());
        loop {
            match io::Read::read(&mut conn.sock, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    head.extend_from_slice(&buf[..n]);
                    conn.last_seen = now;
                    return true;
                }
                Err(e) if would_block(&e) => return false,
                Err(e) if interrupted(&e) => {}
                Err(_) => break,
            }
        }
        self.metrics().handshake_failed(HandshakeFailure::Disconnected);
        self.kill(key);
        false
    }

    /// Acts on the request as it stands: its PROXY header first when one is required, then
    /// the HTTP request: served, refused, or waiting for more.
    fn request_progress(&mut self, key: usize, now: Instant) -> Progress {
        let Phase::Request(request) = &mut self.conns[key].phase else {
            return Progress::Done;
        };
        if request.proxy_header {
            match self.proxy_header(key, now) {
                Progress::More => {}
                done => return done,
            }
        }
        if self.conns[key].awaits_proxy_header() {
            // Half a PROXY header: it is not an HTTP request yet either.
            return Progress::More;
        }
        let max_body = self.shared.config.max_message_size;
        let conn = &mut self.conns[key];
        let Phase::Request(request) = &mut conn.phase else {
            return Progress::Done;
        };
        let head = &mut request.head;
        if head.is_empty() {
            return Progress::More;
        }
        match http::parse(head) {
            Parse::Partial => Progress::More,
            Parse::Complete(parsed, _) if parsed.content_length > max_body => {
                debug!("{}: request body over --max-message-size", conn.peer);
                self.metrics().handshake_failed(HandshakeFailure::TooLarge);
                self.respond(key, http::error_response(Status::PayloadTooLarge), now);
                Progress::Done
            }
            Parse::Complete(parsed, len) if head.len() < len + parsed.content_length => Progress::More,
            Parse::Complete(parsed, len) => {
                let rest = head.split_off(len);
                self.serve(key, parsed, rest, now);
                Progress::Done
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
                Progress::Done
            }
        }
    }

    /// `--proxy-listen`: the balancer's PROXY header comes first and names the client;
    /// without a valid one the connection is closed unanswered. `More` once it is taken (the
    /// request follows) or while it is incomplete.
    fn proxy_header(&mut self, key: usize, now: Instant) -> Progress {
        let conn = &mut self.conns[key];
        let Phase::Request(request) = &mut conn.phase else {
            return Progress::Done;
        };
        match proxy::parse(&request.head) {
            proxy::Header::Partial => Progress::More,
            proxy::Header::Invalid(why) => {
                debug!("{}: {why}; closing", conn.peer);
                self.metrics().handshake_failed(HandshakeFailure::ProxyHeader);
                self.kill(key);
                Progress::Done
            }
            proxy::Header::Complete { source, len } => {
                request.head.drain(..len);
                request.proxy_header = false;
                if let Some(client) = source {
                    conn.via = Some(Box::new(conn.peer));
                    conn.peer = client;
                }
                // A trusted proxy behind the balancer may still name the client in
                // X-Forwarded-For: then it is counted in `serve`.
                let trusted = self.shared.trusted.trusts(conn.peer.ip());
                if self.shared.per_ip.is_some() && !trusted {
                    conn.ip_counted = count_ip(&self.shared, conn.peer, conn.via.as_deref().copied());
                    if !conn.ip_counted {
                        self.over_ip_limit(key, now);
                        return Progress::Done;
                    }
                }
                Progress::More
            }
        }
    }

    /// A connection over `--max-connections-per-ip`, once its real address is known: 429.
    fn over_ip_limit(&mut self, key: usize, now: Instant) {
        self.metrics().handshake_failed(HandshakeFailure::PerIpLimit);
        self.respond(key, http::error_response(Status::TooManyRequests), now);
    }

    /// Takes the client's address from `X-Forwarded-For` when the connection comes from a
    /// trusted proxy, and counts a connection not counted yet against the per-IP limit.
    /// False when the connection was refused (429).
    fn real_client(&mut self, key: usize, head: &Head, now: Instant) -> bool {
        let conn = &mut self.conns[key];
        if let Some(client) = self
            .shared
            .trusted
            .client(conn.peer.ip(), head.forwarded_for.as_deref())
        {
            if client != conn.peer.ip() {
                conn.via.get_or_insert_with(|| Box::new(conn.peer));
                // The header carries no port.
                conn.peer = SocketAddr::new(client, 0);
            }
        }
        if self.shared.per_ip.is_none() || conn.ip_counted {
            return true;
        }
        let counted = count_ip(&self.shared, conn.peer, conn.via.as_deref().copied());
        conn.ip_counted = counted;
        if !counted {
            self.over_ip_limit(key, now);
        }
        counted
    }

    /// Answers a complete request: a WebSocket upgrade, or a plain HTTP endpoint.
    fn serve(&mut self, key: usize, head: Box<Head>, rest: Vec<u8>, now: Instant) {
        if !self.real_client(key, &head, now) {
            return;
        }
        let Some(upgrade) = &head.upgrade else {
            inc(&self.metrics().http_requests);
            if (head.method.as_str(), head.path.as_str()) == ("POST", "/publish") {
                let body = Bytes::from(rest).slice(..head.content_length);
                return self.http_publish(key, &head, body, now);
            }
            if super::api::is_api(&head.path) {
                let body = Bytes::from(rest).slice(..head.content_length);
                return self.api_request(key, &head, body, now);
            }
            let response = self.http_endpoint(&head);
            self.respond(key, response, now);
            return;
        };
        match self.admit_upgrade(key, &head) {
            Ok(admitted) => self.open_websocket(key, &upgrade.key, admitted, rest, now),
            Err((reason, status, body)) => self.refuse(key, reason, status, &body, now),
        }
    }

    /// Decides a WebSocket upgrade: who may open one (draining, origin, token) and what it
    /// asks for (protocol, session, a raw connection's channel).
    fn admit_upgrade(
        &mut self,
        key: usize,
        head: &Head,
    ) -> Result<Admitted, (HandshakeFailure, Status, String)> {
        let refused = |reason, status, body: &str| Err((reason, status, body.to_owned()));
        if self.draining() {
            // A balancer that retries on 503 (deploy/haproxy.cfg, deploy/nginx.conf) sends the
            // client to another node; a client connecting directly retries on its own.
            let body = "draining: this node is shutting down\n";
            return refused(HandshakeFailure::Draining, Status::Unavailable, body);
        }
        if !self.shared.origin.allows(head.origin.as_deref()) {
            debug!("{}: origin {:?} not allowed", self.conns[key].peer, head.origin);
            return refused(
                HandshakeFailure::Origin,
                Status::Forbidden,
                "origin not allowed\n",
            );
        }
        let offered = head.upgrade.as_ref().map_or(&[][..], |u| &u.protocols[..]);
        let protocol = if offered.iter().any(|p| p == envelope::PROTOCOL) {
            Protocol::V1
        } else {
            Protocol::Raw
        };
        let session = http::query_param(head.query.as_deref(), "session");
        if session.as_deref().is_some_and(|s| !valid_session_id(s)) {
            return refused(
                HandshakeFailure::BadRequest,
                Status::BadRequest,
                "invalid session id\n",
            );
        }
        // Raw connections are on the channel their path names; v1 ignores the path.
        let raw_channel = match protocol {
            Protocol::V1 => None,
            Protocol::Raw => match self.path_channel(&head.path) {
                Ok(channel) => Some(channel),
                Err(body) => return refused(HandshakeFailure::BadRequest, Status::BadRequest, &body),
            },
        };
        let (identity, awaiting_connect) = self.url_token(key, head, protocol)?;
        Ok(Admitted {
            protocol,
            session,
            raw_channel,
            identity,
            awaiting_connect,
        })
    }

    /// The channel a raw connection's path names (the default channel for `/`), or why it
    /// cannot be one.
    fn path_channel(&mut self, path: &str) -> Result<Channel, String> {
        let cfg = &self.shared.config;
        let name = path.strip_prefix('/').unwrap_or(path);
        let name = if name.is_empty() {
            cfg.default_channel.as_str()
        } else {
            name
        };
        crate::channels::check_name(name, cfg.max_channel_len).map_err(|why| format!("{why}\n"))?;
        Ok(self.index.intern(name))
    }

    /// The identity a token in the URL gives, checked now, and whether the connection waits
    /// for a `connect` command instead (a v1 client may send its token there: tokens in URLs
    /// end up in proxy logs).
    fn url_token(
        &self,
        key: usize,
        head: &Head,
        protocol: Protocol,
    ) -> Result<(Option<Identity>, bool), (HandshakeFailure, Status, String)> {
        let unauthorized = |body: String| Err((HandshakeFailure::Unauthorized, Status::Unauthorized, body));
        match (
            &self.shared.verifier,
            http::query_param(head.query.as_deref(), "token"),
        ) {
            (None, _) => Ok((None, false)),
            (Some(v), Some(t)) => match v.verify(&t, unix_now()) {
                Ok(identity) => Ok((Some(identity), false)),
                Err(e) => {
                    debug!("{}: token refused: {e}", self.conns[key].peer);
                    unauthorized(format!("{e}\n"))
                }
            },
            (Some(_), None) if protocol == Protocol::V1 => Ok((None, true)),
            (Some(_), None) => unauthorized("token required\n".to_owned()),
        }
    }

    /// Answers the upgrade and opens the WebSocket: greeted (or resumed) and joined at once,
    /// or once its `connect` command came.
    fn open_websocket(&mut self, key: usize, ws_key: &str, a: Admitted, rest: Vec<u8>, now: Instant) {
        let cfg = &self.shared.config;
        let ctx = if rest.is_empty() {
            WebSocketContext::new(Role::Server, Some(self.ws_config))
        } else {
            WebSocketContext::from_partially_read(rest, Role::Server, Some(self.ws_config))
        };
        let resuming = a.session.is_some();
        let session = match (a.protocol, a.session) {
            (_, Some(id)) => Some(Arc::from(id)),
            (Protocol::V1, None) => Some(new_session_id()),
            (Protocol::Raw, None) => None,
        };
        let offered = (a.protocol == Protocol::V1).then_some(envelope::PROTOCOL);
        let mut open = Open::new(ctx, a.protocol, now);
        open.tracks_offsets = a.protocol == Protocol::V1 || session.is_some();
        open.session = session.map(|id| {
            Box::new(SessionLink {
                id,
                subject: None,
                offsets_dirty: false,
                saved_at: now,
            })
        });
        open.bucket = publish_bucket(cfg, now);
        if a.awaiting_connect {
            // It owes its token, within the handshake time.
            open.stage = Stage::AwaitingConnect {
                deadline: now + cfg.handshake_timeout,
                resume: resuming,
            };
        }
        let conn = &mut self.conns[key];
        conn.out.push(&http::upgrade_response(ws_key, offered));
        conn.phase = Phase::Open(Box::new(open));
        inc(&self.metrics().websockets);
        self.mark_dirty(key);
        if a.awaiting_connect {
            // Bytes that arrived with the request may already hold the connect command.
            self.conns[key].read_pending = true;
            self.read_backlog.push(key);
            return;
        }
        let raw_channel = a.raw_channel;
        self.authenticated(
            key,
            a.identity,
            None,
            resuming.then_some(raw_channel.clone()),
            now,
        );
        if !resuming {
            if let Some(channel) = raw_channel {
                self.join_raw(key, channel, None, now);
            }
        }
    }

    /// Answers a refused handshake with `status` and closes.
    fn refuse(&mut self, key: usize, reason: HandshakeFailure, status: Status, body: &str, now: Instant) {
        self.metrics().handshake_failed(reason);
        self.respond(
            key,
            http::response(status, "text/plain; charset=utf-8", body.as_bytes()),
            now,
        );
    }

    /// The connection's identity is settled (by its URL token, its connect command, or
    /// because tokens are off): resume its session (`resume`, with a raw connection's
    /// channel) or greet it.
    pub(super) fn authenticated(
        &mut self,
        key: usize,
        identity: Option<Identity>,
        reference: Option<Box<str>>,
        resume: Option<Option<Channel>>,
        _now: Instant,
    ) {
        let Some(open) = self.conns[key].open_mut() else {
            return;
        };
        open.stage = Stage::Ready;
        if let Some(identity) = identity {
            if let Some(s) = &mut open.session {
                if open.protocol == Protocol::Raw {
                    // A raw client chooses its id: stored under its subject, so that another
                    // user choosing the same id gets a session of their own.
                    s.id = raw_session_key(&identity.subject, &s.id);
                }
                s.subject = Some(identity.subject.clone());
            }
            open.token = Some(Box::new(token_state(identity, self.shared.config.token_leeway)));
        }
        if let Some(raw_channel) = resume {
            // Nothing is read or joined until the stored session is known.
            open.stage = Stage::Resuming {
                raw_channel,
                reference,
            };
            self.conns[key].read_pending = true;
            self.load_session(key);
            return;
        }
        if open.protocol == Protocol::V1 {
            let id = open.session.as_ref().map(|s| s.id.clone());
            if let Some(id) = id {
                let client = self.client_id(key);
                self.send_json(key, &envelope::welcome(reference.as_deref(), &id, false, &client));
            }
        }
        // Bytes that arrived with the request may already hold frames.
        self.conns[key].read_pending = true;
        self.read_backlog.push(key);
    }

    /// `POST /publish?channel=NAME` with the message as the body: a backend publishing
    /// through the same path as clients (history, offsets). Answered once the broker has
    /// stored the message.
    fn http_publish(&mut self, key: usize, head: &Head, body: Bytes, now: Instant) {
        if !self.api_authorized(key, head, now) {
            return;
        }
        let cfg = &self.shared.config;
        let channel = http::query_param(head.query.as_deref(), "channel").unwrap_or_default();
        if crate::channels::check_name(&channel, cfg.max_channel_len).is_err() {
            let body = b"{\"error\":\"?channel= must name a channel\"}";
            return self.respond(
                key,
                http::response(Status::BadRequest, "application/json", body),
                now,
            );
        }
        let binary = head
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/octet-stream"));
        if !binary && std::str::from_utf8(&body).is_err() {
            let body =
                b"{\"error\":\"text bodies must be UTF-8 (send application/octet-stream for binary)\"}";
            return self.respond(
                key,
                http::response(Status::BadRequest, "application/json", body),
                now,
            );
        }
        let kind = if binary { Kind::Binary } else { Kind::Text };
        let close_timeout = cfg.close_timeout;
        let Some(to) = self.reply_to(key) else { return };
        let ack = PublishAck { to, reference: None };
        match self.publish(key, Arc::from(channel), kind, body, Some(ack)) {
            Ok(()) => {
                self.conns[key].phase = Phase::Api {
                    deadline: now + close_timeout,
                    wait: Box::new(ApiWait::Publish),
                };
            }
            Err(super::messages::Refused::QueueFull) => {
                crate::metrics::inc(&self.metrics().publish_dropped);
                let body = crate::envelope::error(None, "unavailable", "publish queue full; retry later");
                let response = http::response_with(
                    Status::Unavailable,
                    "application/json",
                    &["Retry-After: 1"],
                    body.as_bytes(),
                );
                self.respond(key, response, now);
            }
        }
    }

    /// The broker's answer to a `POST /publish` (or to one of a broadcast's publishes).
    pub(super) fn http_published(
        &mut self,
        key: usize,
        channel: &str,
        reference: Option<&str>,
        result: Result<Option<Position>, PublishError>,
        now: Instant,
    ) {
        match &self.conns[key].phase {
            Phase::Api { wait, .. } if matches!(**wait, ApiWait::Broadcast { .. }) => {
                return self.broadcast_acked(key, reference, result, now);
            }
            Phase::Api { wait, .. } if matches!(**wait, ApiWait::Publish) => {}
            _ => return,
        }
        let response = match result {
            Ok(position) => http::response(
                Status::Ok,
                "application/json",
                envelope::published(None, channel, position.as_ref()).as_bytes(),
            ),
            Err(e) => {
                let body = envelope::error(None, e.code(), &e.message());
                let status = if e.out_of_memory() {
                    Status::InsufficientStorage
                } else {
                    Status::Unavailable
                };
                http::response(status, "application/json", body.as_bytes())
            }
        };
        self.respond(key, response, now);
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
        if !open.may_subscribe(&channel) {
            inc(&self.shared.metrics.loops[self.id].forbidden);
            return self.close(key, CloseCode::Policy, "forbidden", now);
        }
        match from {
            Some((offset, epoch)) => {
                let pending = crate::conn::Pending::quiet();
                open.add_sub(Sub::awaiting(channel.clone(), offset, epoch, pending));
            }
            // With a session, the position where it joins is read (and stored) first.
            None if open.session.is_some() => {
                let pending = crate::conn::Pending::default();
                open.add_sub(Sub::awaiting(channel.clone(), 0, None, pending));
            }
            None => open.add_sub(Sub::live(channel.clone())),
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
                // Three missed probes make a subscriber stale (see broker/redis/subscriber.rs).
                let broker = &self.shared.metrics.broker;
                if self.draining() {
                    http::response(Status::Unavailable, TEXT, b"draining\n")
                } else if !broker.subscriber_healthy() {
                    http::response(Status::Unavailable, TEXT, b"redis subscriber down or stale\n")
                } else if let Some(reason) = broker.refusing(REFUSING_WINDOW) {
                    let body = format!("redis refusing writes: {reason}\n");
                    http::response(Status::Unavailable, TEXT, body.as_bytes())
                } else {
                    http::response(Status::Ok, TEXT, b"ok\n")
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

    #[test]
    fn raw_session_keys_are_per_subject() {
        let alice = raw_session_key("alice", "chosen-id-1");
        assert_ne!(alice, raw_session_key("bob", "chosen-id-1"));
        assert_eq!(alice, raw_session_key("alice", "chosen-id-1"));
        assert!(alice.ends_with(".chosen-id-1"));
    }
}
