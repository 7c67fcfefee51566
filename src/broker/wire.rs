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

use std::sync::Arc;

use bytes::Bytes;

use crate::bridge::Position;
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
    fn text_claim_with_invalid_utf8_becomes_binary() {
        let bytes = encode(Kind::Text, &[0xff], None);
        assert_eq!(decode(&bytes).kind, Kind::Binary);
    }
}
