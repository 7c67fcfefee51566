//! The `wsrelay.v1` client: JSON commands with a `ref`, waiting for the reply that carries it,
//! over a [`Client`] connection that offered the `wsrelay.v1` subprotocol. Frames that arrive
//! while a reply is awaited are kept, in order, for [`V1::next`].
//!
//! Besides subscribing and publishing: presence ([`V1::presence`], [`V1::presence_stats`];
//! `join` and `leave` events arrive like messages, see [`V1::next_of`]), history on demand
//! ([`V1::history`]) and token refresh ([`V1::refresh`]; a connection whose token expires is
//! closed with [`TOKEN_EXPIRED`]).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{Client, PROTOCOL, Received};

/// The close code of a connection whose token expired without a [`V1::refresh`].
pub const TOKEN_EXPIRED: u16 = 4401;

/// A `wsrelay.v1` client over [`Client`]: JSON commands with refs, waiting for their replies.
/// Frames that arrive while waiting for a reply are kept, in order, for [`V1::next`].
pub struct V1 {
    /// The underlying connection.
    pub client: Client,
    /// Session id from the welcome.
    pub session: String,
    /// This connection's client id (how presence lists it), from the welcome.
    pub client_id: String,
    /// Whether the welcome said the session was resumed.
    pub resumed: bool,
    next_ref: u64,
    backlog: VecDeque<serde_json::Value>,
}

/// How long [`V1`] helpers wait for a reply.
const REPLY_WAIT: Duration = Duration::from_secs(10);

impl V1 {
    /// Connects with `wsrelay.v1`, resuming `session` if given, and reads the welcome.
    pub fn connect(addr: SocketAddr, session: Option<&str>) -> io::Result<V1> {
        Self::connect_with(addr, session, None)
    }

    /// Like [`V1::connect`], presenting `token` in the URL.
    pub fn connect_with(addr: SocketAddr, session: Option<&str>, token: Option<&str>) -> io::Result<V1> {
        let mut query = Vec::new();
        if let Some(id) = session {
            query.push(format!("session={id}"));
        }
        if let Some(t) = token {
            query.push(format!("token={t}"));
        }
        let path = if query.is_empty() {
            "/".to_owned()
        } else {
            format!("/?{}", query.join("&"))
        };
        let client = Client::connect_with(addr, &path, Some(PROTOCOL))?;
        Self::from_client(client)
    }

    /// Takes over a connection already upgraded with `wsrelay.v1` (e.g. one from a chosen
    /// source address) and reads the welcome.
    pub fn from_client(client: Client) -> io::Result<V1> {
        let mut v1 = Self::unwelcomed(client);
        let welcome = v1.next(REPLY_WAIT)?;
        v1.welcomed(&welcome)?;
        Ok(v1)
    }

    /// Connects with `wsrelay.v1` and authenticates with a `connect` command carrying `token`
    /// (which keeps the token out of the URL), resuming `session` if given.
    pub fn connect_token(addr: SocketAddr, session: Option<&str>, token: &str) -> io::Result<V1> {
        let path = session.map_or_else(|| "/".to_owned(), |id| format!("/?session={id}"));
        let client = Client::connect_with(addr, &path, Some(PROTOCOL))?;
        let mut v1 = Self::unwelcomed(client);
        let welcome = v1.request(serde_json::json!({"op": "connect", "token": token}))?;
        v1.welcomed(&welcome)?;
        Ok(v1)
    }

    fn unwelcomed(client: Client) -> V1 {
        V1 {
            client,
            session: String::new(),
            client_id: String::new(),
            resumed: false,
            next_ref: 0,
            backlog: Default::default(),
        }
    }

    fn welcomed(&mut self, welcome: &serde_json::Value) -> io::Result<()> {
        if welcome["type"] != "welcome" {
            return Err(io::Error::other(format!("expected welcome, got {welcome}")));
        }
        self.session = welcome["session"].as_str().unwrap_or_default().to_owned();
        self.client_id = welcome["client"].as_str().unwrap_or_default().to_owned();
        self.resumed = welcome["resumed"] == true;
        Ok(())
    }

    /// Sends a command as it is.
    pub fn send(&mut self, cmd: &serde_json::Value) -> io::Result<()> {
        self.client.send_text(&cmd.to_string())
    }

    /// The next frame from the server, as JSON.
    pub fn next(&mut self, timeout: Duration) -> io::Result<serde_json::Value> {
        if let Some(v) = self.backlog.pop_front() {
            return Ok(v);
        }
        match self.client.recv(timeout)? {
            Received::Text(t) => serde_json::from_str(&t).map_err(io::Error::other),
            other => Err(io::Error::other(format!(
                "expected a JSON text frame, got {other:?}"
            ))),
        }
    }

    /// Sends `cmd` with a fresh `ref` and waits for the reply carrying it.
    pub fn request(&mut self, mut cmd: serde_json::Value) -> io::Result<serde_json::Value> {
        self.next_ref += 1;
        let r = self.next_ref;
        cmd["ref"] = r.into();
        self.send(&cmd)?;
        let deadline = Instant::now() + REPLY_WAIT;
        let mut other = Vec::new();
        let reply = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.client.recv(left)? {
                Received::Text(t) => {
                    serde_json::from_str::<serde_json::Value>(&t).map_err(io::Error::other)?
                }
                x => return Err(io::Error::other(format!("expected a JSON text frame, got {x:?}"))),
            };
            if v["ref"] == r {
                break v;
            }
            other.push(v);
        };
        self.backlog.extend(other);
        Ok(reply)
    }

    /// Subscribes, optionally recovering after `(offset, epoch)`; returns the reply.
    pub fn subscribe(
        &mut self,
        channel: &str,
        recover: Option<(u64, &str)>,
    ) -> io::Result<serde_json::Value> {
        let mut cmd = serde_json::json!({"op": "subscribe", "channel": channel});
        if let Some((offset, epoch)) = recover {
            cmd["offset"] = offset.into();
            cmd["epoch"] = epoch.into();
        }
        self.request(cmd)
    }

    /// Subscribes with `info` for the channel's presence (any JSON value, listed with this
    /// subscription where the channel has presence); returns the reply.
    pub fn subscribe_with_info(
        &mut self,
        channel: &str,
        info: serde_json::Value,
    ) -> io::Result<serde_json::Value> {
        self.request(serde_json::json!({"op": "subscribe", "channel": channel, "info": info}))
    }

    /// Who is on `channel`: `{"type":"presence","clients":[{"client","user","info"}, ...]}`.
    pub fn presence(&mut self, channel: &str) -> io::Result<serde_json::Value> {
        self.request(serde_json::json!({"op": "presence", "channel": channel}))
    }

    /// How many are on `channel`: `{"type":"presence_stats","clients":N,"users":M}`.
    pub fn presence_stats(&mut self, channel: &str) -> io::Result<serde_json::Value> {
        self.request(serde_json::json!({"op": "presence_stats", "channel": channel}))
    }

    /// `channel`'s stored messages without subscribing: the newest `limit` (all one reply
    /// holds if `None`), or those after `since` (offset, epoch). The reply carries the
    /// channel's position, `messages` (each a `message` object), `more`, and with `since`,
    /// `recovered`.
    pub fn history(
        &mut self,
        channel: &str,
        limit: Option<u64>,
        since: Option<(u64, &str)>,
    ) -> io::Result<serde_json::Value> {
        let mut cmd = serde_json::json!({"op": "history", "channel": channel});
        if let Some(l) = limit {
            cmd["limit"] = l.into();
        }
        if let Some((offset, epoch)) = since {
            cmd["since"] = serde_json::json!({"offset": offset, "epoch": epoch});
        }
        self.request(cmd)
    }

    /// Replaces the connection's token before it expires: `{"type":"refreshed","expires":..}`,
    /// or an error (the old token stays).
    pub fn refresh(&mut self, token: &str) -> io::Result<serde_json::Value> {
        self.request(serde_json::json!({"op": "refresh", "token": token}))
    }

    /// The next frame whose `type` is `kind` (`"join"`, `"leave"`, `"message"`, ...); the
    /// frames before it stay queued for [`V1::next`], in order.
    pub fn next_of(&mut self, kind: &str, timeout: Duration) -> io::Result<serde_json::Value> {
        if let Some(i) = self.backlog.iter().position(|v| v["type"] == kind) {
            return Ok(self.backlog.remove(i).expect("found above"));
        }
        let deadline = Instant::now() + timeout;
        let mut other = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.client.recv(left) {
                Ok(Received::Text(t)) => {
                    serde_json::from_str::<serde_json::Value>(&t).map_err(io::Error::other)
                }
                Ok(x) => Err(io::Error::other(format!("waiting for {kind}, got {x:?}"))),
                Err(e) => Err(e),
            };
            match v {
                Ok(v) if v["type"] == kind => break Ok(v),
                Ok(v) => other.push(v),
                Err(e) => break Err(e),
            }
        };
        self.backlog.extend(other);
        found
    }

    /// Publishes text and waits for the acknowledgement.
    pub fn publish(&mut self, channel: &str, data: &str) -> io::Result<serde_json::Value> {
        self.request(serde_json::json!({"op": "publish", "channel": channel, "data": data}))
    }

    /// The next `message` frame, skipping nothing else: any other frame is an error.
    pub fn message(&mut self, timeout: Duration) -> io::Result<serde_json::Value> {
        let v = self.next(timeout)?;
        if v["type"] != "message" {
            return Err(io::Error::other(format!("expected a message, got {v}")));
        }
        Ok(v)
    }
}
