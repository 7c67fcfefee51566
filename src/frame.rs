//! Server-to-client WebSocket frames, encoded once per message and shared by every recipient.
//!
//! A server frame is never masked (RFC 6455 §5.1), so the bytes on the wire are the same for
//! every client of a channel: the header and payload are built once into one `Bytes`, and
//! delivering to a connection queues a reference to it (no copy). Incoming frames and the
//! control frames tungstenite answers with (pong, close) are not encoded here.

use bytes::{BufMut, Bytes, BytesMut};

/// The two data frame types; a message keeps its type end to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Opcode 0x1: UTF-8 text.
    Text,
    /// Opcode 0x2: arbitrary bytes.
    Binary,
}

impl Kind {
    fn opcode(self) -> u8 {
        match self {
            Kind::Text => 0x1,
            Kind::Binary => 0x2,
        }
    }
}

/// Encodes one final, unmasked data frame carrying `payload`.
pub fn encode(kind: Kind, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut buf, 0x80 | kind.opcode(), payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a text frame (a `wsrelay.v1` reply, say).
pub fn text(s: &str) -> Bytes {
    encode(Kind::Text, s.as_bytes())
}

/// Encodes a ping frame (payload at most 125 bytes, per RFC 6455 §5.5).
pub fn ping(payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= 125, "control frame payload too long");
    let mut buf = BytesMut::with_capacity(2 + payload.len());
    put_header(&mut buf, 0x89, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn put_header(buf: &mut BytesMut, first: u8, len: usize) {
    buf.put_u8(first);
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=0xFFFF => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    fn tungstenite_encoding(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let op = match kind {
            Kind::Text => OpCode::Data(Data::Text),
            Kind::Binary => OpCode::Data(Data::Binary),
        };
        let frame = Frame::message(Bytes::copy_from_slice(payload), op, true);
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    #[test]
    fn matches_tungstenite_at_every_length_class() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            for kind in [Kind::Text, Kind::Binary] {
                assert_eq!(
                    encode(kind, &payload)[..],
                    tungstenite_encoding(kind, &payload)[..],
                    "len {len}"
                );
            }
        }
    }

    #[test]
    fn ping_frame() {
        assert_eq!(&ping(b"hi")[..], &[0x89, 2, b'h', b'i']);
    }
}
