//! The `wsrelay.v1` envelope protocol: parsing client commands and encoding server frames.
//! Pure functions over bytes and strings; the event loop decides what to do with them. The
//! README's "Envelope protocol" section is the specification this file implements.
//!
//! Every command may carry a `ref` (any JSON string or number) that is echoed verbatim in its
//! reply, so it is kept as JSON text and never interpreted.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::frame::Kind;
use crate::position::Position;

/// The subprotocol name offered in `Sec-WebSocket-Protocol`.
pub const PROTOCOL: &str = "wsrelay.v1";

/// A client command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Join a channel, optionally recovering from a known position.
    Subscribe {
        /// The channel.
        channel: String,
        /// Offset and epoch of the last message the client has.
        recover: Option<(u64, String)>,
        /// What presence lists with this subscription (any JSON value, as JSON text).
        info: Option<String>,
    },
    /// Leave a channel.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// Publish a message.
    Publish {
        /// The channel.
        channel: String,
        /// Text (`data`) or binary (`data_b64`).
        kind: Kind,
        /// The payload.
        data: Bytes,
    },
    /// Liveness check answered with `pong`.
    Ping,
    /// Authenticate with a token (first command when the URL carried none).
    Connect {
        /// The HS256 token.
        token: String,
    },
    /// Replace the connection's token (and grants) before it expires.
    Refresh {
        /// The new HS256 token.
        token: String,
    },
    /// Read a channel's stored messages without subscribing.
    History {
        /// The channel.
        channel: String,
        /// Most messages to return; `None`: as many as one reply holds.
        limit: Option<u64>,
        /// The messages after this position (offset, epoch); `None`: the newest.
        since: Option<(u64, String)>,
    },
    /// Who is subscribed to a channel (`stats`: only how many).
    Presence {
        /// The channel.
        channel: String,
        /// Counts only (`presence_stats`).
        stats: bool,
    },
}

/// Why a command was refused: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One of the codes in the README's table.
    pub code: &'static str,
    /// What was wrong, for people.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// A parsed frame: the `ref` (if any could be read) and the command or why it was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The command's `ref` as JSON text.
    pub reference: Option<Box<str>>,
    /// The command.
    pub command: Result<Command, Refusal>,
}

/// Parses one text frame from a client. Never panics.
pub fn parse(frame: &[u8]) -> Parsed {
    // Fields stay raw JSON until needed, so `ref` is echoed byte for byte as the client sent it
    // (a float or a huge integer reformatted would not match the client's own).
    let fields = match serde_json::from_slice::<std::collections::HashMap<String, &RawValue>>(frame) {
        Ok(f) => f,
        Err(_) if serde_json::from_slice::<Value>(frame).is_ok() => {
            return refused(None, "bad_json", "a command is a JSON object");
        }
        Err(e) => return refused(None, "bad_json", format!("not JSON: {e}")),
    };
    let reference = match fields
        .get("ref")
        .map(|r| (r.get(), serde_json::from_str::<Value>(r.get())))
    {
        None | Some((_, Ok(Value::Null))) => None,
        Some((raw, Ok(Value::String(_) | Value::Number(_)))) => Some(raw.into()),
        Some(_) => return refused(None, "bad_request", "ref must be a string or a finite number"),
    };
    // Raw values are only checked for syntax; decoding can still fail (a lone surrogate
    // escape in a string): then the frame is not JSON after all.
    let mut obj = Map::new();
    for (k, v) in fields.iter().filter(|(k, _)| *k != "ref") {
        match serde_json::from_str(v.get()) {
            Ok(value) => {
                obj.insert(k.clone(), value);
            }
            Err(e) => return refused(None, "bad_json", format!("not JSON: {e}")),
        }
    }
    Parsed {
        command: command(&obj),
        reference,
    }
}

fn refused(reference: Option<Box<str>>, code: &'static str, message: impl Into<String>) -> Parsed {
    Parsed {
        reference,
        command: Err(Refusal::new(code, message)),
    }
}

fn command(obj: &Map<String, Value>) -> Result<Command, Refusal> {
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(Refusal::new("bad_request", "op must be a string")),
        None => return Err(Refusal::new("bad_request", "missing op")),
    };
    match op {
        "subscribe" => subscribe_command(obj),
        "unsubscribe" => Ok(Command::Unsubscribe {
            channel: string(obj, "channel")?,
        }),
        "publish" => publish_command(obj),
        "ping" => Ok(Command::Ping),
        "connect" => Ok(Command::Connect {
            token: string(obj, "token")?,
        }),
        "refresh" => Ok(Command::Refresh {
            token: string(obj, "token")?,
        }),
        "history" => history_command(obj),
        "presence" | "presence_stats" => Ok(Command::Presence {
            channel: string(obj, "channel")?,
            stats: op == "presence_stats",
        }),
        other => Err(Refusal::new(
            "unknown_op",
            format!("unknown op {:?}", truncate(other, 64)),
        )),
    }
}

/// `subscribe`: a channel, optionally a position to recover from and presence info.
fn subscribe_command(obj: &Map<String, Value>) -> Result<Command, Refusal> {
    let channel = string(obj, "channel")?;
    let recover = match (obj.get("offset"), obj.get("epoch")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => None,
        (Some(Value::Number(n)), Some(Value::String(e))) => {
            Some((whole(n, "offset must be a non-negative integer")?, e.clone()))
        }
        _ => {
            return Err(Refusal::new(
                "bad_request",
                "recovery needs both offset (integer) and epoch (string)",
            ));
        }
    };
    let info = match obj.get("info") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.to_string()),
    };
    Ok(Command::Subscribe {
        channel,
        recover,
        info,
    })
}

/// `publish`: a channel and exactly one of `data` (text) or `data_b64` (binary).
fn publish_command(obj: &Map<String, Value>) -> Result<Command, Refusal> {
    let channel = string(obj, "channel")?;
    let (kind, data) = match (obj.get("data"), obj.get("data_b64")) {
        (Some(Value::String(s)), None) => (Kind::Text, Bytes::from(s.clone().into_bytes())),
        (None, Some(Value::String(s))) => {
            let bytes = B64
                .decode(s)
                .map_err(|e| Refusal::new("bad_request", format!("data_b64: {e}")))?;
            (Kind::Binary, Bytes::from(bytes))
        }
        _ => {
            return Err(Refusal::new(
                "bad_request",
                "publish needs exactly one of data (string) or data_b64 (base64 string)",
            ));
        }
    };
    Ok(Command::Publish { channel, kind, data })
}

/// `history`: a channel, optionally a `limit` and a `since` position.
fn history_command(obj: &Map<String, Value>) -> Result<Command, Refusal> {
    let channel = string(obj, "channel")?;
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(whole(n, "limit must be a non-negative integer")?),
        Some(_) => return Err(Refusal::new("bad_request", "limit must be a number")),
    };
    let since = match obj.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => match (p.get("offset"), p.get("epoch")) {
            (Some(Value::Number(n)), Some(Value::String(e))) => Some((
                whole(n, "since.offset must be a non-negative integer")?,
                e.clone(),
            )),
            _ => {
                return Err(Refusal::new(
                    "bad_request",
                    "since needs offset (integer) and epoch (string)",
                ));
            }
        },
        Some(_) => {
            return Err(Refusal::new(
                "bad_request",
                "since must be an object {offset, epoch}",
            ));
        }
    };
    Ok(Command::History {
        channel,
        limit,
        since,
    })
}

/// A JSON number as a non-negative integer, or a refusal saying `what`.
fn whole(n: &serde_json::Number, what: &str) -> Result<u64, Refusal> {
    n.as_u64().ok_or_else(|| Refusal::new("bad_request", what))
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<String, Refusal> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Refusal::new("bad_request", format!("{field} must be a string"))),
        None => Err(Refusal::new("bad_request", format!("missing {field}"))),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Appends `"key":<json string>`.
fn put_str(out: &mut String, key: &str, value: &str) {
    let _ = write!(out, ",\"{key}\":");
    // Serializing a str cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
}

fn put_ref(out: &mut String, reference: Option<&str>) {
    if let Some(r) = reference {
        let _ = write!(out, ",\"ref\":{r}");
    }
}

fn put_position(out: &mut String, position: Option<&Position>) {
    if let Some(p) = position {
        let _ = write!(out, ",\"offset\":{}", p.offset);
        put_str(out, "epoch", &p.epoch);
    }
}

/// `{"type":"welcome",...}`; `reference` when it answers a `connect` command. `client` is
/// the connection's id, as presence lists it.
pub fn welcome(reference: Option<&str>, session: &str, resumed: bool, client: &str) -> String {
    let mut s = String::from("{\"type\":\"welcome\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "session", session);
    put_str(&mut s, "client", client);
    let _ = write!(s, ",\"resumed\":{resumed}}}");
    s
}

/// `{"type":"refreshed",...}`: the new token is in effect until `expires` (Unix seconds).
pub fn refreshed(reference: Option<&str>, expires: u64) -> String {
    let mut s = String::from("{\"type\":\"refreshed\"");
    put_ref(&mut s, reference);
    let _ = write!(s, ",\"expires\":{expires}}}");
    s
}

/// `{"type":"history",...}`: the channel's position, the messages read (each a `message`
/// object, oldest first), `more` when stored messages follow the last one returned, and, for a
/// read after a position, whether the history still had everything after it (`recovered`).
/// `reference` is `None` over HTTP.
pub fn history(
    reference: Option<&str>,
    channel: &str,
    top: &Position,
    messages: &[String],
    more: bool,
    recovered: Option<bool>,
) -> String {
    let mut s = String::with_capacity(96 + messages.iter().map(|m| m.len() + 1).sum::<usize>());
    s.push_str("{\"type\":\"history\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    put_position(&mut s, Some(top));
    if let Some(r) = recovered {
        let _ = write!(s, ",\"recovered\":{r}");
    }
    let _ = write!(s, ",\"more\":{more},\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(m);
    }
    s.push_str("]}");
    s
}

/// `{"type":"presence",...,"clients":[entries]}`; each entry is a JSON object from
/// `presence::encode`.
pub fn presence(reference: Option<&str>, channel: &str, entries: &[Box<str>]) -> String {
    let mut s = String::with_capacity(64 + entries.iter().map(|e| e.len() + 1).sum::<usize>());
    s.push_str("{\"type\":\"presence\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    s.push_str(",\"clients\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(e);
    }
    s.push_str("]}");
    s
}

/// `{"type":"presence_stats",...}`: subscriptions listed and distinct users among them.
pub fn presence_stats(reference: Option<&str>, channel: &str, clients: u64, users: u64) -> String {
    let mut s = String::from("{\"type\":\"presence_stats\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    let _ = write!(s, ",\"clients\":{clients},\"users\":{users}}}");
    s
}

/// A `join` or `leave` event (`kind`) of `channel`: the entry's fields after the type and
/// channel. `entry` must be a JSON object from `presence::encode` (it starts with `{"client"`).
pub fn presence_event(kind: &str, channel: &str, entry: &str) -> String {
    debug_assert!(entry.starts_with("{\"client\":"), "not an entry: {entry}");
    let mut s = String::with_capacity(40 + channel.len() + entry.len());
    s.push_str("{\"type\":");
    s.push_str(&serde_json::to_string(kind).unwrap_or_default());
    put_str(&mut s, "channel", channel);
    s.push(',');
    s.push_str(entry.strip_prefix('{').unwrap_or(entry));
    s
}

/// `{"type":"subscribed",...}`; `recovered` only when recovery was requested.
pub fn subscribed(
    reference: Option<&str>,
    channel: &str,
    position: Option<&Position>,
    recovered: Option<bool>,
) -> String {
    let mut s = String::from("{\"type\":\"subscribed\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    put_position(&mut s, position);
    if let Some(r) = recovered {
        let _ = write!(s, ",\"recovered\":{r}");
    }
    s.push('}');
    s
}

/// `{"type":"unsubscribed",...}`
pub fn unsubscribed(reference: Option<&str>, channel: &str) -> String {
    let mut s = String::from("{\"type\":\"unsubscribed\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    s.push('}');
    s
}

/// An unsolicited `{"type":"unsubscribed",...,"reason":...}`: the server ended the
/// subscription (`forbidden`: the current token does not grant it).
pub fn unsubscribed_because(channel: &str, reason: &str) -> String {
    let mut s = String::from("{\"type\":\"unsubscribed\"");
    put_str(&mut s, "channel", channel);
    put_str(&mut s, "reason", reason);
    s.push('}');
    s
}

/// `{"type":"published",...}`
pub fn published(reference: Option<&str>, channel: &str, position: Option<&Position>) -> String {
    let mut s = String::from("{\"type\":\"published\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "channel", channel);
    put_position(&mut s, position);
    s.push('}');
    s
}

/// `{"type":"pong",...}`
pub fn pong(reference: Option<&str>) -> String {
    let mut s = String::from("{\"type\":\"pong\"");
    put_ref(&mut s, reference);
    s.push('}');
    s
}

/// `{"type":"error",...}`
pub fn error(reference: Option<&str>, code: &str, message: &str) -> String {
    let mut s = String::from("{\"type\":\"error\"");
    put_ref(&mut s, reference);
    put_str(&mut s, "code", code);
    put_str(&mut s, "message", message);
    s.push('}');
    s
}

/// `{"type":"message",...}` for a message of `channel` at `position` (absent for a message
/// outside the channel's history): `data` for text, `data_b64` for binary.
pub fn message(channel: &str, position: Option<&Position>, kind: Kind, data: &[u8]) -> String {
    let mut s = String::with_capacity(64 + data.len() * 4 / 3);
    s.push_str("{\"type\":\"message\"");
    put_str(&mut s, "channel", channel);
    put_position(&mut s, position);
    match (kind, std::str::from_utf8(data)) {
        (Kind::Text, Ok(text)) => put_str(&mut s, "data", text),
        _ => put_str(&mut s, "data_b64", &B64.encode(data)),
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cmd(json: &str) -> Result<Command, Refusal> {
        parse(json.as_bytes()).command
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            cmd(r#"{"op":"subscribe","channel":"a"}"#),
            Ok(Command::Subscribe {
                channel: "a".into(),
                recover: None,
                info: None,
            })
        );
        assert_eq!(
            cmd(r#"{"op":"subscribe","channel":"a","offset":7,"epoch":"e","info":{"n":1}}"#),
            Ok(Command::Subscribe {
                channel: "a".into(),
                recover: Some((7, "e".into())),
                info: Some(r#"{"n":1}"#.into()),
            })
        );
        assert_eq!(
            cmd(r#"{"op":"history","channel":"a","limit":5,"since":{"offset":3,"epoch":"e"}}"#),
            Ok(Command::History {
                channel: "a".into(),
                limit: Some(5),
                since: Some((3, "e".into())),
            })
        );
        assert_eq!(
            cmd(r#"{"op":"presence_stats","channel":"a"}"#),
            Ok(Command::Presence {
                channel: "a".into(),
                stats: true,
            })
        );
        assert_eq!(
            cmd(r#"{"op":"refresh","token":"t"}"#),
            Ok(Command::Refresh { token: "t".into() })
        );
        assert_eq!(
            cmd(r#"{"op":"publish","channel":"a","data_b64":"AAH/"}"#),
            Ok(Command::Publish {
                channel: "a".into(),
                kind: Kind::Binary,
                data: Bytes::from_static(&[0, 1, 255])
            })
        );
        assert_eq!(cmd(r#"{"op":"ping"}"#), Ok(Command::Ping));
        assert_eq!(
            cmd(r#"{"op":"connect","token":"t"}"#),
            Ok(Command::Connect { token: "t".into() })
        );
    }

    #[test]
    fn refs_are_kept_as_json_text() {
        assert_eq!(
            parse(br#"{"op":"ping","ref":"x\"y"}"#).reference.as_deref(),
            Some(r#""x\"y""#)
        );
        assert_eq!(
            parse(br#"{"op":"ping","ref":12}"#).reference.as_deref(),
            Some("12")
        );
        assert_eq!(pong(Some("12")), r#"{"type":"pong","ref":12}"#);
    }

    #[test]
    fn malformed_commands_get_codes_and_keep_the_ref() {
        let code = |j: &str| parse(j.as_bytes()).command.unwrap_err().code;
        assert_eq!(code("not json"), "bad_json");
        assert_eq!(code("[1,2]"), "bad_json");
        assert_eq!(code(r#"{"channel":"a"}"#), "bad_request");
        assert_eq!(code(r#"{"op":"publsh","channel":"a"}"#), "unknown_op");
        assert_eq!(code(r#"{"op":"subscribe"}"#), "bad_request");
        assert_eq!(code(r#"{"op":"subscribe","channel":5}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","channel":"a","offset":-1,"epoch":"e"}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","channel":"a","offset":1}"#),
            "bad_request"
        );
        assert_eq!(code(r#"{"op":"publish","channel":"a"}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"publish","channel":"a","data":"x","data_b64":"AA=="}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"publish","channel":"a","data_b64":"!!"}"#),
            "bad_request"
        );
        assert_eq!(code(r#"{"op":"x","ref":{}}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"history","channel":"a","limit":-1}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"history","channel":"a","since":{"offset":1}}"#),
            "bad_request"
        );
        assert_eq!(code(r#"{"op":"presence"}"#), "bad_request");
        assert_eq!(code(r#"{"op":"ping","ref":97332E009733}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","channel":"\uda27","ref":2}"#),
            "bad_json"
        );
        let p = parse(br#"{"op":"nope","ref":3}"#);
        assert_eq!(p.reference.as_deref(), Some("3"));
        let e = error(
            p.reference.as_deref(),
            "unknown_op",
            &p.command.unwrap_err().message,
        );
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["ref"], 3);
        assert_eq!(v["code"], "unknown_op");
    }

    #[test]
    fn encoded_frames_are_valid_json() {
        let pos = Position {
            offset: 9,
            epoch: Arc::from("ep\"och"),
        };
        for s in [
            welcome(None, "abc", true, "n-0-1"),
            welcome(Some("7"), "abc", false, "n-0-1"),
            refreshed(Some("2"), 1_700_000_000),
            history(
                Some("1"),
                "c",
                &pos,
                &[message("c", Some(&pos), Kind::Text, b"x")],
                true,
                Some(true),
            ),
            history(None, "c", &pos, &[], false, None),
            presence(
                Some("3"),
                "c",
                &[r#"{"client":"a"}"#.into(), r#"{"client":"b"}"#.into()],
            ),
            presence_stats(None, "c", 2, 1),
            presence_event("join", "c\"", r#"{"client":"a","user":"u"}"#),
            subscribed(Some("\"r\""), "ch\n", Some(&pos), Some(false)),
            subscribed(None, "c", None, None),
            unsubscribed(None, "c"),
            published(Some("1"), "c", Some(&pos)),
            error(None, "bad_json", "quote \" here"),
        ] {
            let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(v["type"].is_string());
        }
        let v: Value = serde_json::from_str(&message("c", Some(&pos), Kind::Binary, &[0xff])).unwrap();
        assert_eq!(v["data_b64"], "/w==");
        assert_eq!(v["offset"], 9);
        let v: Value = serde_json::from_str(&message("c", None, Kind::Text, b"hi \xe2\x9c\x93")).unwrap();
        assert_eq!(v["data"], "hi \u{2713}");
        assert!(v.get("offset").is_none());
    }
}
