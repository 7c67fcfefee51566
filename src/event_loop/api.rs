//! The server API for backends: JSON over HTTP on the same port, every request with
//! `Authorization: Bearer <--api-key>` (without `--api-key` these paths answer 404).
//!
//! | request | what it does |
//! |---|---|
//! | `POST /publish?channel=C` | publish the body (`handshake.rs`) |
//! | `POST /api/broadcast` | publish one message on several channels |
//! | `POST /api/disconnect` | close every connection of a user, on every node |
//! | `POST /api/unsubscribe` | end a user's subscription to a channel, on every node |
//! | `GET /api/channels` | active channels and their subscribers, across nodes |
//! | `GET /api/info` | the live nodes: version, connections, channels |
//! | `GET /api/presence`, `GET /api/presence_stats` | a channel's presence |
//! | `GET /history` | a channel's stored messages |
//!
//! A request waits in `Phase::Api` for the broker's answer (at most `--close-timeout`, then
//! 504); the loop never blocks on it. Commands for every node go through the broker: with
//! Redis, published on the control channel (the answer says how many nodes heard it; they act
//! within milliseconds), in-process straight to every loop.

use std::time::Instant;

use bytes::Bytes;
use serde_json::{Value, json};

use super::EventLoop;
use crate::bridge::{Admin, Channel, HistoryQuery, NodeWork, PublishAck, Reply};
use crate::conn::{ApiWait, Phase};
use crate::envelope;
use crate::frame::Kind;
use crate::http::{self, Head, Status};

/// Most channels one broadcast may name.
pub(super) const MAX_BROADCAST: usize = 1000;
/// Most channels `GET /api/channels` lists (and its default).
const MAX_CHANNELS_LISTED: usize = 10_000;
const DEFAULT_CHANNELS_LISTED: usize = 1000;

/// Why an API request is refused: its status and the v1 error it carries.
type Refused = (Status, &'static str, String);

fn bad(message: impl Into<String>) -> Refused {
    (Status::BadRequest, "bad_request", message.into())
}

/// Compares secrets in time independent of where they differ.
pub(super) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `path` is one of the server API's.
pub(super) fn is_api(path: &str) -> bool {
    path.starts_with("/api/") || path == "/history"
}

impl EventLoop {
    /// Answers with `status` and a JSON body, and closes.
    fn api_respond(&mut self, key: usize, status: Status, body: &str, now: Instant) {
        self.respond(
            key,
            http::response(status, "application/json", body.as_bytes()),
            now,
        );
    }

    /// Answers with a v1 error.
    fn api_refuse(&mut self, key: usize, (status, code, message): Refused, now: Instant) {
        let body = envelope::error(None, code, &message);
        self.api_respond(key, status, &body, now);
    }

    /// Whether the request carries the API key; if not, it is answered (404 without a key
    /// configured, 401 with a wrong one).
    pub(super) fn api_authorized(&mut self, key: usize, head: &Head, now: Instant) -> bool {
        let Some(api_key) = &self.shared.config.api_key else {
            let body = b"the server API is off: start wsrelay with --api-key\n";
            self.respond(key, http::response(Status::NotFound, "text/plain", body), now);
            return false;
        };
        let presented = head
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        if presented.is_some_and(|p| same_secret(p.trim().as_bytes(), api_key.as_bytes())) {
            return true;
        }
        let body = envelope::error(None, "unauthorized", "missing or wrong API key");
        let response = http::response_with(
            Status::Unauthorized,
            "application/json",
            &["WWW-Authenticate: Bearer"],
            body.as_bytes(),
        );
        self.respond(key, response, now);
        false
    }

    /// A server API request (see the module documentation).
    pub(super) fn api_request(&mut self, key: usize, head: &Head, body: Bytes, now: Instant) {
        if !self.api_authorized(key, head, now) {
            return;
        }
        let q = head.query.as_deref();
        let outcome = match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/history") => self.http_history(key, q),
            ("GET", "/api/info") => self.ask(key, |to| NodeWork::Nodes { to }),
            ("GET", "/api/channels") => match limit(q, DEFAULT_CHANNELS_LISTED, MAX_CHANNELS_LISTED) {
                Ok(limit) => self.ask(key, |to| NodeWork::Channels { limit, to }),
                Err(e) => Err(e),
            },
            ("GET", "/api/presence" | "/api/presence_stats") => {
                let stats = head.path.ends_with("_stats");
                self.http_presence(key, q, stats)
            }
            ("POST", "/api/broadcast") => self.broadcast(key, &body, now),
            ("POST", "/api/disconnect" | "/api/unsubscribe") => match admin(&head.path, &body, self) {
                Ok(admin) => self.ask(key, |to| NodeWork::Admin { admin, to }),
                Err(e) => Err(e),
            },
            (_, "/history" | "/api/info" | "/api/channels" | "/api/presence" | "/api/presence_stats")
            | (_, "/api/broadcast" | "/api/disconnect" | "/api/unsubscribe") => Err((
                Status::MethodNotAllowed,
                "bad_request",
                format!("{} is not allowed on {}", head.method, head.path),
            )),
            _ => Err((
                Status::NotFound,
                "bad_request",
                format!("no such endpoint {}", head.path),
            )),
        };
        match outcome {
            Ok(wait) => {
                let deadline = now + self.shared.config.close_timeout;
                self.conns[key].phase = Phase::Api {
                    deadline,
                    wait: Box::new(wait),
                };
            }
            Err(refused) => self.api_refuse(key, refused, now),
        }
    }

    /// Sends `make(to)` to the broker; the connection then waits for one reply.
    fn ask(
        &mut self,
        key: usize,
        make: impl FnOnce(crate::bridge::ReplyTo) -> NodeWork,
    ) -> Result<ApiWait, Refused> {
        let to = self
            .reply_to(key)
            .ok_or_else(|| (Status::Unavailable, "unavailable", "gone".to_owned()))?;
        self.link.ask_nodes(make(to)).map_err(|_| {
            (
                Status::Unavailable,
                "unavailable",
                "the broker's queue is full; retry".to_owned(),
            )
        })?;
        Ok(ApiWait::Reply)
    }

    /// `GET /history?channel=C[&limit=N][&since=OFFSET&epoch=E]`.
    fn http_history(&mut self, key: usize, q: Option<&str>) -> Result<ApiWait, Refused> {
        let channel = http::query_param(q, "channel").unwrap_or_default();
        let limit = match http::query_param(q, "limit") {
            None => None,
            Some(l) => Some(l.parse::<u64>().map_err(|_| bad("limit must be a number"))?),
        };
        let since = match (http::query_param(q, "since"), http::query_param(q, "epoch")) {
            (None, None) => None,
            (Some(o), Some(e)) => Some((o.parse::<u64>().map_err(|_| bad("since must be an offset"))?, e)),
            _ => return Err(bad("since needs epoch (and epoch since)")),
        };
        let query = self
            .history_query(key, &channel, limit, since, None)
            .map_err(|r| {
                let status = if r.code == "not_enabled" {
                    Status::NotFound
                } else {
                    Status::BadRequest
                };
                (status, r.code, r.message)
            })?;
        self.request_history_query(key, query.0, query.1)
            .map(|()| ApiWait::Reply)
            .map_err(|r| (Status::Unavailable, r.code, r.message))
    }

    /// `GET /api/presence?channel=C` and `GET /api/presence_stats?channel=C`.
    fn http_presence(&mut self, key: usize, q: Option<&str>, stats: bool) -> Result<ApiWait, Refused> {
        let name = http::query_param(q, "channel").unwrap_or_default();
        let channel = self
            .channel_name(&name)
            .map_err(|r| (Status::BadRequest, r.code, r.message))?;
        if !self.shared.config.presence_on(&channel) {
            return Err((
                Status::NotFound,
                "not_enabled",
                format!("{channel:?} has no presence (see --presence)"),
            ));
        }
        self.ask(key, |to| NodeWork::Presence {
            channel,
            stats,
            reference: None,
            to,
        })
    }

    /// `POST /api/broadcast` with `{"channels":[...],"data":"..."}` (or `data_b64`): one
    /// publish per channel through the usual path; answered once every one is acknowledged.
    fn broadcast(&mut self, key: usize, body: &[u8], _now: Instant) -> Result<ApiWait, Refused> {
        let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        let names = v
            .get("channels")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("channels must be a list of channel names"))?;
        if names.is_empty() || names.len() > MAX_BROADCAST {
            return Err(bad(format!("channels must name 1 to {MAX_BROADCAST} channels")));
        }
        let mut channels: Vec<Channel> = Vec::with_capacity(names.len());
        for n in names {
            let n = n.as_str().ok_or_else(|| bad("channels must be strings"))?;
            let c = self
                .channel_name(n)
                .map_err(|r| (Status::BadRequest, r.code, r.message))?;
            channels.push(c);
        }
        let (kind, data) = match (v.get("data"), v.get("data_b64")) {
            (Some(Value::String(s)), None) => (Kind::Text, Bytes::from(s.clone().into_bytes())),
            (None, Some(Value::String(s))) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| bad(format!("data_b64: {e}")))?;
                (Kind::Binary, Bytes::from(bytes))
            }
            _ => return Err(bad("exactly one of data (string) or data_b64 (base64 string)")),
        };
        let Some(to) = self.reply_to(key) else {
            return Err((Status::Unavailable, "unavailable", "gone".into()));
        };
        let mut results = Vec::with_capacity(channels.len());
        for (i, channel) in channels.iter().enumerate() {
            let ack = PublishAck {
                to,
                reference: Some(i.to_string().into()),
            };
            match self.publish(key, channel.clone(), kind, data.clone(), Some(ack)) {
                Ok(()) => results.push(None),
                Err(super::messages::Refused::QueueFull) => {
                    crate::metrics::inc(&self.metrics().publish_dropped);
                    results.push(Some(Err(("unavailable", "publish queue full; retry".to_owned()))));
                }
            }
        }
        Ok(ApiWait::Broadcast { channels, results })
    }

    /// One acknowledgement of a broadcast's publishes; the answer goes out with the last.
    pub(super) fn broadcast_acked(
        &mut self,
        key: usize,
        reference: Option<&str>,
        result: Result<Option<crate::bridge::Position>, crate::bridge::PublishError>,
        now: Instant,
    ) {
        let Phase::Api { wait, .. } = &mut self.conns[key].phase else {
            return;
        };
        let ApiWait::Broadcast { channels, results } = &mut **wait else {
            return;
        };
        let Some(slot) = reference
            .and_then(|r| r.parse::<usize>().ok())
            .and_then(|i| results.get_mut(i))
        else {
            return;
        };
        *slot = Some(result.map_err(|e| (e.code(), e.message())));
        if results.iter().any(Option::is_none) {
            return;
        }
        let list: Vec<Value> = channels
            .iter()
            .zip(results.iter())
            .map(|(c, r)| match r {
                Some(Ok(Some(p))) => json!({"channel": &**c, "offset": p.offset, "epoch": &*p.epoch}),
                Some(Ok(None)) => json!({"channel": &**c}),
                Some(Err((code, message))) => {
                    json!({"channel": &**c, "error": {"code": code, "message": message}})
                }
                None => Value::Null,
            })
            .collect();
        let body = json!({"type": "broadcast", "results": list}).to_string();
        self.api_respond(key, Status::Ok, &body, now);
    }

    /// The broker's answer to an `info`, `channels` or command request.
    pub(super) fn api_answer(&mut self, key: usize, reply: Reply, now: Instant) {
        if !matches!(self.conns[key].phase, Phase::Api { .. }) {
            return;
        }
        let body = match reply {
            Reply::Nodes(Ok(nodes)) => {
                let nodes: Vec<Value> = nodes
                    .iter()
                    .map(|n| {
                        json!({"id": n.id, "version": n.version, "connections": n.connections,
                               "channels": n.channels, "started": n.started})
                    })
                    .collect();
                Ok(json!({"type": "info", "nodes": nodes}))
            }
            Reply::Channels(Ok(c)) => {
                let list: Vec<Value> = c
                    .channels
                    .iter()
                    .map(|(name, n)| json!({"channel": name, "subscribers": n}))
                    .collect();
                Ok(json!({"type": "channels", "total": c.total, "channels": list}))
            }
            Reply::AdminSent(Ok(nodes)) => Ok(json!({"type": "sent", "nodes": nodes})),
            Reply::Nodes(Err(e)) | Reply::Channels(Err(e)) | Reply::AdminSent(Err(e)) => Err(e),
            _ => return,
        };
        match body {
            Ok(v) => self.api_respond(key, Status::Ok, &v.to_string(), now),
            Err(e) => self.api_refuse(key, (Status::Unavailable, "unavailable", e), now),
        }
    }

    /// Answers an API request with a reply built for v1 (`presence`, `history`): the same JSON,
    /// or a v1 error as 503. True when `key` was such a request.
    pub(super) fn api_reply_json(&mut self, key: usize, json: Result<&str, &str>, now: Instant) -> bool {
        if !matches!(self.conns[key].phase, Phase::Api { .. }) {
            return false;
        }
        match json {
            Ok(body) => self.api_respond(key, Status::Ok, body, now),
            Err(e) => self.api_refuse(key, (Status::Unavailable, "unavailable", e.to_owned()), now),
        }
        true
    }

    /// Sends a client's history read to the broker.
    pub(super) fn request_history_query(
        &mut self,
        key: usize,
        channel: Channel,
        query: HistoryQuery,
    ) -> Result<(), envelope::Refusal> {
        let Some(to) = self.reply_to(key) else {
            return Ok(());
        };
        let since = query.since.as_ref().map(|(o, _)| *o);
        let request = crate::bridge::Request::History {
            channel,
            since,
            record: None,
            origin: self.origin(key),
            query: Some(Box::new(query)),
            read: 0,
            to,
        };
        self.link
            .request(request)
            .map_err(|_| envelope::Refusal::new("unavailable", "request queue full; try again"))
    }
}

/// `?limit=N`, at most `max`.
fn limit(q: Option<&str>, default: usize, max: usize) -> Result<usize, Refused> {
    match http::query_param(q, "limit") {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .map(|n| n.min(max))
            .map_err(|_| bad("limit must be a number")),
    }
}

/// The command a `POST /api/disconnect` or `/api/unsubscribe` body asks for.
fn admin(path: &str, body: &[u8], lp: &EventLoop) -> Result<Admin, Refused> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    let user = text("user")
        .filter(|u| !u.is_empty() && u.len() <= 1024)
        .ok_or_else(|| bad("user must name a token subject"))?
        .to_owned();
    let a = if path.ends_with("disconnect") {
        let code = match v.get("code") {
            None => 4000,
            Some(c) => c
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .ok_or_else(|| bad("code must be a close code"))?,
        };
        let reason = match v.get("reason") {
            None => "disconnected by the server",
            Some(r) => r.as_str().ok_or_else(|| bad("reason must be a string"))?,
        };
        Admin::Disconnect {
            user,
            code,
            reason: reason.to_owned(),
        }
    } else {
        let channel = match v.get("channel") {
            None => "",
            Some(c) => c.as_str().ok_or_else(|| bad("channel must be a string"))?,
        };
        lp.channel_name(channel)
            .map_err(|r| (Status::BadRequest, r.code, r.message))?;
        Admin::Unsubscribe {
            user,
            channel: channel.to_owned(),
        }
    };
    if !a.valid() {
        return Err(bad(
            "code must be 1000, 1001, 1008 or 3000-4999, and reason at most 123 bytes",
        ));
    }
    Ok(a)
}
