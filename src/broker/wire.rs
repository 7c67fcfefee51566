//! The payload format of wsrelay's messages in Redis Pub/Sub.
//!
//! A message published by wsrelay carries its frame type (text or binary) and, when the channel
//! keeps history, its offset and epoch, in a short header:
//!
//! ```text
//! \0wr1 <t|b> <offset|-> <epoch|->\n<payload bytes>
//! ```
//!
//! The leading NUL keeps it apart from what backends publish by hand: any payload without this
//! header (`redis-cli PUBLISH chat_channel hello`) is delivered as it is, as a text frame when it
//! is valid UTF-8 and as a binary frame otherwise. The history script (Lua) writes the same
//! header, so live and replayed messages decode alike.
//!
//! Three more kinds are not messages ([`Signal`]): `j` and `l`, a `join` or `leave` event whose
//! body is the presence entry (published by the presence script), and `c`, a server API command
//! on the nodes' control channel (JSON). Their position fields are always `- -`.

use std::sync::Arc;

use bytes::Bytes;

use crate::bridge::{Admin, Position};
use crate::frame::Kind;

const MAGIC: &[u8] = b"\0wr1 ";
/// The header is short; a newline further out than this means "not our header".
const MAX_HEADER: usize = 128;

/// A message read back from Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Frame type.
    pub kind: Kind,
    /// Payload.
    pub data: Bytes,
    /// Offset and epoch, if the message went through the history script.
    pub position: Option<Position>,
}

/// Encodes a message for PUBLISH.
pub fn encode(kind: Kind, data: &[u8], position: Option<&Position>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 24 + data.len());
    out.extend_from_slice(MAGIC);
    out.push(kind_byte(kind));
    match position {
        Some(p) => {
            out.extend_from_slice(format!(" {} {}\n", p.offset, p.epoch).as_bytes());
        }
        None => out.extend_from_slice(b" - -\n"),
    }
    out.extend_from_slice(data);
    out
}

/// The one-letter frame type used in the header.
pub fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Text => b't',
        Kind::Binary => b'b',
    }
}

/// Decodes any payload seen on a subscribed channel. Never fails: what is not ours is plain.
pub fn decode(payload: &[u8]) -> Decoded {
    parse_header(payload).unwrap_or_else(|| Decoded {
        kind: if std::str::from_utf8(payload).is_ok() {
            Kind::Text
        } else {
            Kind::Binary
        },
        data: Bytes::copy_from_slice(payload),
        position: None,
    })
}

fn parse_header(payload: &[u8]) -> Option<Decoded> {
    let rest = payload.strip_prefix(MAGIC)?;
    let nl = rest.iter().take(MAX_HEADER).position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&rest[..nl]).ok()?;
    let data = &rest[nl + 1..];
    let mut parts = header.split(' ');
    let kind = match parts.next()? {
        "t" if std::str::from_utf8(data).is_ok() => Kind::Text,
        "t" | "b" => Kind::Binary,
        _ => return None,
    };
    let position = match (parts.next()?, parts.next()?) {
        ("-", "-") => None,
        (offset, epoch) if !epoch.is_empty() => Some(Position {
            offset: offset.parse().ok()?,
            epoch: Arc::from(epoch),
        }),
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Decoded {
        kind,
        data: Bytes::copy_from_slice(data),
        position,
    })
}

/// What a payload that is not a message carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Signal<'a> {
    /// A subscription joined the channel's presence: its entry.
    Join(&'a [u8]),
    /// A subscription left it: its entry.
    Leave(&'a [u8]),
    /// A server API command (JSON), on the control channel.
    Command(&'a [u8]),
}

/// The header of a signal of kind `kind` (`j`, `l` or `c`), for the Lua scripts and PUBLISH.
pub fn signal_header(kind: u8) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(kind);
    out.extend_from_slice(b" - -\n");
    out
}

/// The signal in `payload`, if it is one (else it is a message: [`decode`]).
pub fn signal(payload: &[u8]) -> Option<Signal<'_>> {
    // A message (kind `t` or `b`) is told apart at its fifth byte.
    let rest = payload.strip_prefix(MAGIC)?;
    let (&kind, rest) = rest.split_first()?;
    if !matches!(kind, b'j' | b'l' | b'c') {
        return None;
    }
    let body = rest.strip_prefix(b" - -\n")?;
    Some(match kind {
        b'j' => Signal::Join(body),
        b'l' => Signal::Leave(body),
        _ => Signal::Command(body),
    })
}

/// Longest server API command accepted from the control channel, in bytes.
const MAX_COMMAND: usize = 4096;

/// A server API command as it travels on the control channel (after [`signal_header`]).
pub fn encode_admin(a: &Admin) -> Vec<u8> {
    let body = match a {
        Admin::Disconnect { user, code, reason } => {
            serde_json::json!({"op": "disconnect", "user": user, "code": code, "reason": reason})
        }
        Admin::Unsubscribe { user, channel } => {
            serde_json::json!({"op": "unsubscribe", "user": user, "channel": channel})
        }
    };
    let mut out = signal_header(b'c');
    out.extend_from_slice(body.to_string().as_bytes());
    out
}

/// A command read from the control channel, checked as strictly as the server API checks it
/// (anyone with access to Redis may have written it): `None` when it is not one.
pub fn decode_admin(body: &[u8]) -> Option<Admin> {
    if body.len() > MAX_COMMAND {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |k: &str| v.get(k)?.as_str().map(str::to_owned);
    let user = text("user").filter(|u| !u.is_empty())?;
    let admin = match v.get("op")?.as_str()? {
        "disconnect" => Admin::Disconnect {
            user,
            code: u16::try_from(v.get("code")?.as_u64()?).ok()?,
            reason: text("reason")?,
        },
        "unsubscribe" => Admin::Unsubscribe {
            user,
            channel: text("channel").filter(|c| !c.is_empty())?,
        },
        _ => return None,
    };
    admin.valid().then_some(admin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_kind_and_position() {
        let pos = Position {
            offset: 42,
            epoch: Arc::from("e1x"),
        };
        for kind in [Kind::Text, Kind::Binary] {
            for position in [None, Some(pos.clone())] {
                let bytes = encode(kind, b"hi\nthere", position.as_ref());
                let d = decode(&bytes);
                assert_eq!(d.kind, kind);
                assert_eq!(&d.data[..], b"hi\nthere");
                assert_eq!(d.position, position);
            }
        }
    }

    #[test]
    fn plain_payloads_pass_through() {
        assert_eq!(decode(b"hello").kind, Kind::Text);
        let bin = decode(&[0xff, 0x00, 0x10]);
        assert_eq!(bin.kind, Kind::Binary);
        assert_eq!(&bin.data[..], &[0xff, 0x00, 0x10]);
        // Something that only looks like our header is delivered whole.
        let fake = b"\0wr1 x 1 2\nbody";
        assert_eq!(&decode(fake).data[..], fake);
    }

    #[test]
    fn signals_are_told_from_messages() {
        let mut join = signal_header(b'j');
        join.extend_from_slice(br#"{"client":"c"}"#);
        assert_eq!(signal(&join), Some(Signal::Join(br#"{"client":"c"}"#)));
        let mut cmd = signal_header(b'c');
        cmd.extend_from_slice(b"{}");
        assert_eq!(signal(&cmd), Some(Signal::Command(b"{}")));
        assert_eq!(signal(&encode(Kind::Text, b"hi", None)), None);
        assert_eq!(signal(b"\0wr1 j 1 e\n{}"), None);
        assert_eq!(signal(b"plain"), None);
    }

    #[test]
    fn commands_round_trip_and_bad_ones_are_refused() {
        for a in [
            Admin::Disconnect {
                user: "u42".into(),
                code: 4000,
                reason: "banned".into(),
            },
            Admin::Unsubscribe {
                user: "u42".into(),
                channel: "room".into(),
            },
        ] {
            let wire = encode_admin(&a);
            let Some(Signal::Command(body)) = signal(&wire) else {
                panic!("not a command")
            };
            assert_eq!(decode_admin(body), Some(a));
        }
        assert_eq!(
            decode_admin(br#"{"op":"disconnect","user":"u","code":1005,"reason":""}"#),
            None
        );
        assert_eq!(
            decode_admin(br#"{"op":"disconnect","user":"","code":4000,"reason":""}"#),
            None
        );
        assert_eq!(decode_admin(br#"{"op":"reboot","user":"u"}"#), None);
        assert_eq!(decode_admin(b"not json"), None);
    }

    #[test]
    fn text_claim_with_invalid_utf8_becomes_binary() {
        let bytes = encode(Kind::Text, &[0xff], None);
        assert_eq!(decode(&bytes).kind, Kind::Binary);
    }
}
