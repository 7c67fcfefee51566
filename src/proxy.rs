//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer writes at the
//! start of a connection to say which client it carries. Pure functions over bytes, like
//! `http.rs`: the event loop feeds them what a `--proxy-listen` connection sent so far.
//!
//! Only the source address is used (for `--max-connections-per-ip` and logs). A header that says
//! `UNKNOWN` (v1) or `LOCAL` (v2, the balancer's own health checks), or names a family other
//! than TCP over IPv4 or IPv6, leaves the connection's own peer address in place, as the
//! specification asks. Anything else that is not a valid header ends the connection: a listener
//! that requires the header must not guess (specification §2).
//!
//! Reference: <https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt>

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes that open a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, CRLF included (specification §2.1).
const V1_MAX: usize = 107;
/// Longest version 2 header accepted: the fixed 16 bytes, addresses and TLVs. Balancers send
/// a few hundred bytes at most (TLS details, a unique id); the request head limit is the cap.
const V2_MAX: usize = crate::http::MAX_HEAD;

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Not complete yet: read more.
    Partial,
    /// A complete header of `len` bytes, naming the client's address when it carries one.
    Complete {
        /// The client as the balancer saw it; `None` for `UNKNOWN`, `LOCAL` and other families.
        source: Option<SocketAddr>,
        /// Bytes the header takes; what follows is the client's own data (the HTTP request).
        len: usize,
    },
    /// Not a valid header: close the connection.
    Invalid(&'static str),
}

/// Parses a PROXY header (v1 or v2) at the start of `buf`. Never panics on any input.
pub fn parse(buf: &[u8]) -> Header {
    let v2_prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_prefix] == V2_SIGNATURE[..v2_prefix] && !buf.is_empty() {
        return if buf.len() < 16 {
            Header::Partial
        } else {
            parse_v2(buf)
        };
    }
    let v1_prefix = buf.len().min(6);
    if buf[..v1_prefix] == b"PROXY "[..v1_prefix] {
        return if buf.len() < 6 {
            Header::Partial
        } else {
            parse_v1(buf)
        };
    }
    Header::Invalid("no PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Header {
    let window = &buf[..buf.len().min(V1_MAX)];
    // The first LF decides, so that the verdict does not depend on how the bytes were split.
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Header::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Header::Partial
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Header::Invalid("PROXY v1 header not ended by CRLF");
    }
    let (end, len) = (lf - 1, lf + 1);
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Header::Invalid("PROXY v1 header is not ASCII");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let source = match fields.as_slice() {
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Ok(src), Ok(dst)) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>()) else {
                return Header::Invalid("PROXY v1 header with an invalid address");
            };
            let v4 = *proto == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Header::Invalid("PROXY v1 address of the wrong family");
            }
            let (Some(sport), Some(_)) = (port(sport), port(dport)) else {
                return Header::Invalid("PROXY v1 header with an invalid port");
            };
            Some(SocketAddr::new(src, sport))
        }
        _ => return Header::Invalid("malformed PROXY v1 header"),
    };
    Header::Complete { source, len }
}

/// A decimal port, 0 to 65535, without sign or leading zeros (specification §2.1).
fn port(s: &str) -> Option<u16> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

fn parse_v2(buf: &[u8]) -> Header {
    let (ver_cmd, family) = (buf[12], buf[13]);
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Header::Invalid("PROXY v2 header with a version other than 2");
    }
    let len = 16 + body;
    if len > V2_MAX {
        return Header::Invalid("PROXY v2 header too long");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Header::Invalid("PROXY v2 header with an unknown command"),
    };
    // Family in the high nibble (0 unspecified, 1 IPv4, 2 IPv6, 3 unix), transport in the low
    // one (0 unspecified, 1 stream, 2 datagram): anything else is refused (the specification
    // says receivers must).
    if !local && (family >> 4 > 3 || family & 0x0f > 2) {
        return Header::Invalid("PROXY v2 header with an unknown address family or transport");
    }
    if buf.len() < len {
        return Header::Partial;
    }
    let addr = &buf[16..len];
    let source = match family {
        _ if local => None,
        0x11 if addr.len() >= 12 => {
            let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addr[8], addr[9]])))
        }
        0x21 if addr.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addr[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([addr[32], addr[33]]),
            ))
        }
        0x11 | 0x21 => return Header::Invalid("PROXY v2 address block too short"),
        _ => None,
    };
    Header::Complete { source, len }
}

/// A version 1 header for `source` → `dest` (tests and tools); mixed families are written
/// as IPv6.
pub fn v1(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let (proto, s, d) = match (source.ip(), dest.ip()) {
        (s @ IpAddr::V4(_), d @ IpAddr::V4(_)) => ("TCP4", s, d),
        (s, d) => ("TCP6", IpAddr::V6(to_v6(s)), IpAddr::V6(to_v6(d))),
    };
    format!("PROXY {proto} {s} {d} {} {}\r\n", source.port(), dest.port()).into_bytes()
}

/// A version 2 `PROXY` header for `source` → `dest` (tests and tools); both of one family.
pub fn v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let mut addr = Vec::new();
    match (source.ip(), dest.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            addr.extend_from_slice(&s.octets());
            addr.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21);
            addr.extend_from_slice(&to_v6(s).octets());
            addr.extend_from_slice(&to_v6(d).octets());
        }
    }
    addr.extend_from_slice(&source.port().to_be_bytes());
    addr.extend_from_slice(&dest.port().to_be_bytes());
    out.extend_from_slice(&(addr.len() as u16).to_be_bytes());
    out.extend_from_slice(&addr);
    out
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Header::Complete {
                source: Some(addr("192.0.2.1:56324")),
                len: 45
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert_eq!(
            parse(h),
            Header::Complete {
                source: Some(addr("[2001:db8::1]:1")),
                len: h.len()
            }
        );
        let h = b"PROXY UNKNOWN whatever\r\n";
        assert_eq!(
            parse(h),
            Header::Complete {
                source: None,
                len: h.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Complete {
                source: None,
                len: 15
            }
        );
        let built = v1(addr("203.0.113.9:4000"), addr("10.0.0.1:9000"));
        assert_eq!(
            parse(&built),
            Header::Complete {
                source: Some(addr("203.0.113.9:4000")),
                len: built.len()
            }
        );
    }

    #[test]
    fn v1_partial_then_complete() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Header::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.300 198.51.100.2 1 2\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            b"PROXY UNKNOWN a\nb\r\n",
            b"PROXY \xff\xfe\r\n",
            b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Header::Invalid(_)),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY UNKNOWN {}", "x".repeat(200));
        assert!(matches!(parse(long.as_bytes()), Header::Invalid(_)));
    }

    #[test]
    fn v2_headers() {
        let built = v2(addr("203.0.113.9:4000"), addr("10.0.0.1:9000"));
        assert_eq!(built.len(), 28);
        let mut with_request = built.clone();
        with_request.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&with_request),
            Header::Complete {
                source: Some(addr("203.0.113.9:4000")),
                len: 28
            }
        );
        for cut in 0..built.len() {
            assert_eq!(parse(&built[..cut]), Header::Partial, "cut at {cut}");
        }
        let six = v2(addr("[2001:db8::7]:80"), addr("[2001:db8::1]:9000"));
        assert_eq!(
            parse(&six),
            Header::Complete {
                source: Some(addr("[2001:db8::7]:80")),
                len: 52
            }
        );
        // LOCAL (health checks): the connection's own address stands; TLVs are skipped.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(
            parse(&local),
            Header::Complete {
                source: None,
                len: 19
            }
        );
        // A UNIX-socket client: no address to use.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0x00]);
        assert_eq!(
            parse(&unix),
            Header::Complete {
                source: None,
                len: 16
            }
        );
    }

    #[test]
    fn v2_refusals() {
        let good = v2(addr("203.0.113.9:4000"), addr("10.0.0.1:9000"));
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        assert!(
            matches!(parse(&with(12, 0x11)), Header::Invalid(_)),
            "version 1 in a v2 header"
        );
        assert!(
            matches!(parse(&with(12, 0x22)), Header::Invalid(_)),
            "unknown command"
        );
        assert!(
            matches!(parse(&with(15, 4)), Header::Invalid(_)),
            "address block too short"
        );
        for family in [0x51, 0x13, 0xf1] {
            assert!(
                matches!(parse(&with(13, family)), Header::Invalid(_)),
                "family/transport {family:#x}"
            );
            // Known before the addresses arrive.
            assert!(matches!(parse(&with(13, family)[..16]), Header::Invalid(_)));
        }
        // Unspecified, unix or datagram: taken, the connection's own address stands.
        for family in [0x00, 0x31, 0x12] {
            assert!(matches!(
                parse(&with(13, family)),
                Header::Complete { source: None, .. }
            ));
        }
        assert!(
            matches!(parse(&with(3, b'x')), Header::Invalid(_)),
            "broken signature"
        );
        let mut huge = good.clone();
        huge[14] = 0xff;
        assert!(matches!(parse(&huge), Header::Invalid(_)), "too long");
    }
}
