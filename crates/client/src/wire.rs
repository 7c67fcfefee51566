//! The client side of the WebSocket wire format, byte by byte: the upgrade request and the check
//! of the server's answer, encoding client frames (masked as RFC 6455 §5.3 requires, or built
//! wrong on purpose by a test) and parsing server frames in place.
//!
//! Headers are written by tungstenite's [`FrameHeader`]; what is added here is what a load
//! generator and a hostile test need and tungstenite's `WebSocket` does not offer: frames
//! parsed from a shared read buffer with no copy and no allocation (millions a second in
//! `wsrelay-load`, see [`parse`]), and any first byte (reserved bits and opcodes) or announced
//! length a test wants to send.
//!
//! ```
//! use wsrelay_client::wire::{self, Parsed, op};
//!
//! // A masked client frame, then the same payload as a server would frame it (unmasked).
//! let mut out = Vec::new();
//! wire::encode_masked(&mut out, op::TEXT, b"hi");
//! assert_eq!(out.len(), 2 + 4 + 2);
//! let mut server = Vec::new();
//! wire::put_frame(&mut server, wire::first_byte(true, 0, op::TEXT), b"hi", None);
//! match wire::parse(&server) {
//!     Parsed::Frame(f, used) => assert_eq!((f.opcode, f.payload, used), (op::TEXT, &b"hi"[..], 4)),
//!     other => panic!("{other:?}"),
//! }
//! assert_eq!(wire::parse(&server[..3]), Parsed::Partial);
//! ```

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::OpCode;

/// The `Sec-WebSocket-Key` of [`request`]: the RFC 6455 example key. Clients built on this
/// module measure or attack a server; they do not check its `Sec-WebSocket-Accept`.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The upgrade request for `path` on `host`.
pub fn request(host: &str, path: &str) -> Vec<u8> {
    request_with(host, path, "")
}

/// Like [`request`], with extra header lines (each ending in CRLF) before the blank line.
pub fn request_with(host: &str, path: &str, headers: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
    .into_bytes()
}

/// What the server's answer to the upgrade request is so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// The head is not complete yet: read more.
    Partial,
    /// `101 Switching Protocols`; frames start at this offset.
    Upgraded(usize),
    /// Any other answer (its status line): the connection is refused.
    Refused(String),
}

/// Longest response head accepted.
pub const MAX_RESPONSE: usize = 8 * 1024;

/// Checks the response head at the front of `buf`.
pub fn response(buf: &[u8]) -> Response {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE {
            return Response::Refused("response head too large".into());
        }
        return Response::Partial;
    };
    let line = buf[..end].split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    if line.split_whitespace().nth(1) == Some("101") {
        Response::Upgraded(end + 4)
    } else {
        Response::Refused(line.into_owned())
    }
}

/// Frame opcodes (RFC 6455 §5.2).
pub mod op {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text data.
    pub const TEXT: u8 = 0x1;
    /// Binary data.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// The first header byte: FIN, the three RSV bits (`rsv`, RSV1 the highest) and the opcode.
/// Any value is allowed: tests send reserved bits and opcodes on purpose.
pub fn first_byte(fin: bool, rsv: u8, opcode: u8) -> u8 {
    (u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xf)
}

/// Appends a frame header with first byte `first` announcing `len` payload bytes, masked with
/// `mask` when given. The payload is not written: a test may announce more than it sends.
pub fn put_header(out: &mut Vec<u8>, first: u8, len: u64, mask: Option<[u8; 4]>) {
    let header = FrameHeader {
        is_final: first & 0x80 != 0,
        rsv1: first & 0x40 != 0,
        rsv2: first & 0x20 != 0,
        rsv3: first & 0x10 != 0,
        opcode: OpCode::from(first & 0x0f),
        mask,
    };
    header.format(len, out).expect("writing to a Vec cannot fail");
}

/// Appends a complete frame: [`put_header`], then `payload`, masked when `mask` is given.
pub fn put_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    put_header(out, first, payload.len() as u64, mask);
    match mask {
        Some(m) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i & 3])),
        None => out.extend_from_slice(payload),
    }
}

/// Appends a final, masked client frame. The mask only has to be unpredictable to defeat cache
/// poisoning by proxies (RFC 6455 §10.3), which loopback has none of, so a cheap PRNG is enough.
pub fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let mask = fastrand::u32(..).to_ne_bytes();
    put_frame(out, first_byte(true, 0, opcode), payload, Some(mask));
}

/// One server frame, parsed in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// FIN bit: the last frame of its message.
    pub fin: bool,
    /// Opcode (see [`op`]).
    pub opcode: u8,
    /// Payload (servers do not mask).
    pub payload: &'a [u8],
}

/// Result of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A complete frame and the bytes it took.
    Frame(Frame<'a>, usize),
    /// More bytes are needed: read more and parse again from the same start.
    Partial,
    /// Not a frame a server may send (masked, or an absurd length): give up on the connection.
    Invalid(&'static str),
}

/// Largest frame payload accepted, bytes: far above any message a test or load run sends, far
/// below memory trouble.
pub const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// Parses one server frame from the front of `buf`, without copying it. Reserved opcodes are
/// returned as they are, for the caller to ignore or refuse.
///
/// Written out rather than through `FrameHeader::parse`, which reads through a `Cursor` and
/// costs about 85 ns a frame against 13 ns here (64-byte frames, measured on the 2-core dev
/// box): this runs for every frame the load generator receives, millions a second.
#[inline]
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    let [b0, b1, ..] = *buf else {
        return Parsed::Partial;
    };
    if b1 & 0x80 != 0 {
        return Parsed::Invalid("server frame is masked");
    }
    let (len, head) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Parsed::Partial,
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Parsed::Partial,
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME {
        return Parsed::Invalid("frame larger than 16 MiB");
    }
    let end = head + len as usize;
    let Some(payload) = buf.get(head..end) else {
        return Parsed::Partial;
    };
    Parsed::Frame(
        Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        },
        end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame as TFrame;
    use tungstenite::protocol::frame::coding::Data;

    #[test]
    fn response_head() {
        assert_eq!(response(b"HTTP/1.1 101 Switching"), Response::Partial);
        assert_eq!(
            response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x01a"),
            Response::Upgraded(56)
        );
        assert_eq!(
            response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Response::Refused("HTTP/1.1 503 Service Unavailable".into())
        );
    }

    #[test]
    fn parses_what_tungstenite_writes_at_every_length_class_and_waits_for_more() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536] {
            let payload = vec![b'x'; len];
            let mut raw = Vec::new();
            TFrame::message(payload.clone(), OpCode::Data(Data::Text), true)
                .format(&mut raw)
                .unwrap();
            for cut in [0, 1, raw.len() / 2, raw.len() - 1] {
                assert_eq!(parse(&raw[..cut]), Parsed::Partial, "len {len} cut {cut}");
            }
            let mut two = raw.clone();
            two.extend_from_slice(&raw);
            match parse(&two) {
                Parsed::Frame(f, used) => {
                    assert!(f.fin);
                    assert_eq!(f.opcode, op::TEXT);
                    assert_eq!(f.payload, &payload[..]);
                    assert_eq!(used, raw.len());
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn masked_frames_are_what_tungstenite_reads() {
        let mut out = Vec::new();
        encode_masked(&mut out, op::TEXT, b"hello");
        let mut cursor = std::io::Cursor::new(&out);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert!(header.is_final);
        let mask = header.mask.expect("client frames are masked");
        let start = cursor.position() as usize;
        assert_eq!(len, 5);
        let plain: Vec<u8> = out[start..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(plain, b"hello");
        assert_eq!(
            parse(&[0x81, 0x85, 0, 0, 0, 0]),
            Parsed::Invalid("server frame is masked")
        );
    }

    #[test]
    fn any_first_byte_and_length_can_be_announced() {
        let mut out = Vec::new();
        put_header(
            &mut out,
            first_byte(false, 0b101, 0xb),
            u64::MAX,
            Some([1, 2, 3, 4]),
        );
        assert_eq!(out[0], 0b0101_1011);
        assert_eq!(out[1], 0x80 | 127);
        assert_eq!(&out[2..10], &u64::MAX.to_be_bytes());
        assert_eq!(&out[10..], &[1, 2, 3, 4]);
        let mut reserved = Vec::new();
        put_frame(&mut reserved, first_byte(true, 0, 0x3), b"x", None);
        match parse(&reserved) {
            Parsed::Frame(f, 3) => assert_eq!((f.opcode, f.payload), (0x3, &b"x"[..])),
            other => panic!("{other:?}"),
        }
        let mut huge = Vec::new();
        put_header(&mut huge, 0x82, MAX_FRAME + 1, None);
        assert_eq!(parse(&huge), Parsed::Invalid("frame larger than 16 MiB"));
    }
}
