//! What the load generator puts in a message, and how it reads it back.
//!
//! ```text
//! M cccccccc ssssssssssssssss tttttttttttttttt ....padding....
//! │ channel  sequence number   send time (ns, CLOCK_MONOTONIC)
//! └ 'M' a measured message, 'P' a probe (proves a subscription is live; not counted)
//! ```
//!
//! All fields are fixed-width lowercase hex with no separators, padded with `.` to `--size`.
//! ASCII rather than binary because the payload must come back byte-identical through every
//! path a server may use: a text frame, wsrelay's UTF-8 check on Redis payloads, and the Node
//! baseline's `message.toString()`, which would mangle arbitrary bytes. The timestamp is
//! CLOCK_MONOTONIC, which is one clock for every process on the host, so a message published
//! by one generator process (or through Redis) is timed correctly by another.

/// Bytes of the header; `--size` must be at least this.
pub const HEADER: usize = 1 + 8 + 16 + 16;

/// A decoded payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A numbered message of the measured stream.
    Message {
        /// Channel index the publisher sent it on.
        channel: u32,
        /// Per-channel sequence number, from 0.
        seq: u64,
        /// Send time, ns on CLOCK_MONOTONIC.
        sent: u64,
    },
    /// A subscription probe.
    Probe {
        /// Channel index the probe was sent on.
        channel: u32,
    },
}

/// Current CLOCK_MONOTONIC time in nanoseconds (system-wide, unlike `Instant`'s opaque value).
#[inline]
pub fn now_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], v: u64) {
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((v >> (4 * (n - 1 - i))) & 0xf) as usize];
    }
}

#[inline]
fn get_hex(s: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// Writes a payload of exactly `size` bytes (`size >= HEADER`) into `out`, replacing its content.
pub fn encode(out: &mut Vec<u8>, p: Payload, size: usize) {
    debug_assert!(size >= HEADER, "payload size below the header");
    out.clear();
    out.resize(size.max(HEADER), b'.');
    let (tag, channel, seq, sent) = match p {
        Payload::Message { channel, seq, sent } => (b'M', channel, seq, sent),
        Payload::Probe { channel } => (b'P', channel, 0, now_nanos()),
    };
    out[0] = tag;
    put_hex(&mut out[1..9], u64::from(channel));
    put_hex(&mut out[9..25], seq);
    put_hex(&mut out[25..41], sent);
}

/// Reads a payload; `None` for anything this generator did not write.
#[inline]
pub fn decode(data: &[u8]) -> Option<Payload> {
    if data.len() < HEADER {
        return None;
    }
    let channel = get_hex(&data[1..9])? as u32;
    match data[0] {
        b'M' => Some(Payload::Message {
            channel,
            seq: get_hex(&data[9..25])?,
            sent: get_hex(&data[25..41])?,
        }),
        b'P' => Some(Payload::Probe { channel }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_the_requested_size() {
        let mut buf = Vec::new();
        let m = Payload::Message {
            channel: 7,
            seq: 0x1234_5678_9abc,
            sent: u64::MAX - 1,
        };
        encode(&mut buf, m, 64);
        assert_eq!(buf.len(), 64);
        assert!(std::str::from_utf8(&buf).is_ok());
        assert_eq!(decode(&buf), Some(m));
        encode(&mut buf, Payload::Probe { channel: 3 }, HEADER);
        assert_eq!(buf.len(), HEADER);
        assert_eq!(decode(&buf), Some(Payload::Probe { channel: 3 }));
    }

    #[test]
    fn foreign_payloads_are_not_ours() {
        assert_eq!(decode(b"Hello from Client!"), None);
        assert_eq!(decode(&[b'M'; 64]), None);
        assert_eq!(decode(b""), None);
    }

    #[test]
    fn clock_moves_forward() {
        let a = now_nanos();
        let b = now_nanos();
        assert!(b >= a && a > 0);
    }
}
