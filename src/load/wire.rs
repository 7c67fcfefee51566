//! The client side of the WebSocket wire format, as much as the load generator needs: the
//! upgrade request, the check of the server's answer, parsing server frames in place, and
//! encoding masked client frames.
//!
//! Written out rather than going through tungstenite because it runs once per received frame
//! for millions of frames a second: here a frame is parsed from the loop's shared read buffer
//! with no copy and no allocation, and a connection holds no buffer at all between reads
//! unless a frame was split across two of them.

/// The upgrade request for `path` on `host`. The key is fixed: the generator does not check
/// the server's `Sec-WebSocket-Accept` (it is measuring, not validating), only the 101.
pub fn request(host: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// What the server's answer to the upgrade request is so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// The head is not complete yet.
    Partial,
    /// `101 Switching Protocols`; frames start at this offset.
    Upgraded(usize),
    /// Any other answer: the status line.
    Refused(String),
}

/// Longest response head accepted.
pub const MAX_RESPONSE: usize = 8 * 1024;

/// Checks the response head in `buf`.
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

/// One frame parsed in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Payload (unmasked; servers do not mask).
    pub payload: &'a [u8],
}

/// Result of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A complete frame and the bytes it took.
    Frame(Frame<'a>, usize),
    /// More bytes are needed.
    Partial,
    /// The server masked its frame or sent something absurd: give up on the connection.
    Invalid(&'static str),
}

/// Largest frame payload accepted, bytes: far above any `--size`, far below memory trouble.
pub const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// Parses one frame from the front of `buf`.
#[inline]
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < 2 {
        return Parsed::Partial;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Parsed::Invalid("server frame is masked");
    }
    let (len, head) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Parsed::Partial;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Partial;
            }
            let mut b = [0; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME {
        return Parsed::Invalid("frame larger than 16 MiB");
    }
    let total = head + len as usize;
    if buf.len() < total {
        return Parsed::Partial;
    }
    Parsed::Frame(
        Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload: &buf[head..total],
        },
        total,
    )
}

/// Appends a final, masked client frame (RFC 6455 §5.3: clients must mask). The mask only has
/// to be unpredictable to defeat cache poisoning by proxies, which loopback has none of, so a
/// cheap PRNG is enough.
pub fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask = fastrand::u32(..).to_ne_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_every_length_class_and_waits_for_more() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536] {
            let payload = vec![b'x'; len];
            let raw = crate::frame::encode(crate::frame::Kind::Text, &payload);
            for cut in [0, 1, raw.len() / 2, raw.len() - 1] {
                if cut < raw.len() {
                    assert_eq!(parse(&raw[..cut]), Parsed::Partial, "len {len} cut {cut}");
                }
            }
            let mut two = raw.to_vec();
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
        let (header, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cursor)
            .unwrap()
            .unwrap();
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
}
