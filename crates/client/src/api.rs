//! The server API client, for backends: JSON over HTTP with the API key (`--api-key`) as a
//! bearer token. Every call returns the HTTP status and the body as JSON (a body that is not
//! JSON comes back as a JSON string); a status other than 200 is not an error here, so the
//! caller sees exactly what the server said.
//!
//! ```no_run
//! use wsrelay_client::Api;
//!
//! # fn main() -> std::io::Result<()> {
//! let api = Api::new("127.0.0.1:9000".parse().unwrap(), "the-api-key-of-16+chars");
//! let (status, reply) = api.broadcast(&["room:1", "room:2"], "maintenance at 18:00")?;
//! assert_eq!(status, 200, "{reply}");
//! api.disconnect("u42", 4000, "banned")?; // every connection of u42, on every node
//! let (_, info) = api.info()?; // {"type":"info","nodes":[{"id","version","connections",..}]}
//! # let _ = info;
//! # Ok(())
//! # }
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{Value, json};

/// How long a call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A server API client for one node (any node: commands reach every node).
#[derive(Clone, Debug)]
pub struct Api {
    addr: SocketAddr,
    key: String,
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Api {
    /// A client for the node at `addr`, with the API key `key`.
    pub fn new(addr: SocketAddr, key: &str) -> Api {
        Api {
            addr,
            key: key.to_owned(),
        }
    }

    /// Any request: `method` and `path` (with its query), a JSON body for POST.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> io::Result<(u16, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = TcpStream::connect_timeout(&self.addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.key,
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other(format!("not an HTTP response: {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        Ok((status, value))
    }

    /// `POST /publish?channel=C`: publishes `data` (text) and waits until it is stored.
    pub fn publish(&self, channel: &str, data: &str) -> io::Result<(u16, Value)> {
        let path = format!("/publish?channel={}", encode(channel));
        let mut s = TcpStream::connect_timeout(&self.addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{data}",
            self.addr,
            self.key,
            data.len()
        );
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
        ))
    }

    /// `POST /api/broadcast`: `data` (text) on every channel of `channels`; the reply lists
    /// each channel's offset (or error), in order.
    pub fn broadcast(&self, channels: &[&str], data: &str) -> io::Result<(u16, Value)> {
        let body = json!({"channels": channels, "data": data});
        self.request("POST", "/api/broadcast", Some(&body))
    }

    /// `POST /api/disconnect`: closes every connection of `user` (token subject) on every node
    /// with `code` and `reason`; the reply says how many nodes heard it.
    pub fn disconnect(&self, user: &str, code: u16, reason: &str) -> io::Result<(u16, Value)> {
        let body = json!({"user": user, "code": code, "reason": reason});
        self.request("POST", "/api/disconnect", Some(&body))
    }

    /// `POST /api/unsubscribe`: ends every subscription of `user` to `channel`, on every node.
    pub fn unsubscribe(&self, user: &str, channel: &str) -> io::Result<(u16, Value)> {
        let body = json!({"user": user, "channel": channel});
        self.request("POST", "/api/unsubscribe", Some(&body))
    }

    /// `GET /api/channels`: active channels with their subscribers across nodes, most first.
    pub fn channels(&self, limit: Option<usize>) -> io::Result<(u16, Value)> {
        let path = match limit {
            Some(l) => format!("/api/channels?limit={l}"),
            None => "/api/channels".to_owned(),
        };
        self.request("GET", &path, None)
    }

    /// `GET /api/info`: the live nodes, their version, connections and channels.
    pub fn info(&self) -> io::Result<(u16, Value)> {
        self.request("GET", "/api/info", None)
    }

    /// `GET /history`: `channel`'s newest `limit` messages, or those after `since`.
    pub fn history(
        &self,
        channel: &str,
        limit: Option<u64>,
        since: Option<(u64, &str)>,
    ) -> io::Result<(u16, Value)> {
        let mut path = format!("/history?channel={}", encode(channel));
        if let Some(l) = limit {
            path.push_str(&format!("&limit={l}"));
        }
        if let Some((offset, epoch)) = since {
            path.push_str(&format!("&since={offset}&epoch={}", encode(epoch)));
        }
        self.request("GET", &path, None)
    }

    /// `GET /api/presence`: who is on `channel` (`stats`: only how many).
    pub fn presence(&self, channel: &str, stats: bool) -> io::Result<(u16, Value)> {
        let op = if stats { "presence_stats" } else { "presence" };
        self.request("GET", &format!("/api/{op}?channel={}", encode(channel)), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("room:1 a&b"), "room%3A1%20a%26b");
        assert_eq!(encode("plain-name_1.x~"), "plain-name_1.x~");
    }
}
