//! Who the client really is behind a proxy that speaks HTTP: `X-Forwarded-For`, believed only
//! when the connection comes from a proxy the operator trusts (`--trusted-proxy CIDR`). Pure
//! functions, no sockets.
//!
//! Each proxy appends the address it received the request from, so the header reads
//! `client, proxy1, proxy2` and the connection itself comes from the last proxy. Anyone can
//! write anything at the left end; only entries added by trusted proxies are facts. So the
//! client is the rightmost entry that is not a trusted proxy (nginx's `real_ip_recursive on`):
//! a client that sends its own `X-Forwarded-For: 1.2.3.4` through a trusted proxy is still
//! seen at the address the proxy saw. A header from an untrusted peer is ignored entirely, and
//! so is a header with an entry that is not an address (the proxy chain is not what we think).

use std::net::IpAddr;
use std::str::FromStr;

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad =
            || format!("{s:?} is not an address or CIDR block (e.g. 10.0.0.0/8, 2001:db8::/32, 127.0.0.1)");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max} bits"));
        }
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in the block. An IPv4 address written as IPv6 (`::ffff:10.0.0.1`, as a
    /// dual-stack socket reports it) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`--trusted-proxy`, repeatable).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// From the operator's list.
    pub fn new(blocks: Vec<Cidr>) -> Self {
        TrustedProxies(blocks)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// True when no proxy is trusted (the header is never read).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client behind `peer`, given the request's `X-Forwarded-For` (every such header
    /// joined with commas, in order). `None` when the header is not to be believed: the peer
    /// is not trusted, the header is absent, or an entry is not an address.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> Option<IpAddr> {
        if !self.trusts(peer) {
            return None;
        }
        let entries: Vec<IpAddr> = forwarded_for?
            .split(',')
            .map(|e| entry_ip(e.trim()))
            .collect::<Option<_>>()?;
        // Right to left, trusted proxies are hops of the chain; the first other address is
        // the client. When every entry is a trusted proxy, the leftmost is as far as it goes.
        entries
            .iter()
            .rev()
            .find(|ip| !self.trusts(**ip))
            .or(entries.first())
            .copied()
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`), as some proxies write it.
fn entry_ip(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (ip, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped IPv6");
        let c: Cidr = "192.168.1.128/25".parse().unwrap();
        assert!(c.contains(ip("192.168.1.200")));
        assert!(!c.contains(ip("192.168.1.100")));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let six: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(six.contains(ip("2001:db8:1::5")));
        assert!(!six.contains(ip("2001:db9::5")));
        assert!(!six.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        for bad in [
            "10.0.0/8",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "host",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn client_is_the_rightmost_untrusted_entry() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let lb = ip("10.0.0.5");
        // Through one proxy.
        assert_eq!(t.client(lb, Some("203.0.113.7")), Some(ip("203.0.113.7")));
        // A client forging the header: the proxy appended what it saw.
        assert_eq!(
            t.client(lb, Some("1.2.3.4, 203.0.113.7")),
            Some(ip("203.0.113.7"))
        );
        // Through two trusted proxies.
        assert_eq!(
            t.client(lb, Some("203.0.113.7, 10.0.0.9")),
            Some(ip("203.0.113.7"))
        );
        // Only proxies: the leftmost.
        assert_eq!(t.client(lb, Some("10.0.0.1, 10.0.0.2")), Some(ip("10.0.0.1")));
        // Several headers joined, ports and brackets.
        assert_eq!(t.client(lb, Some("203.0.113.7:5000")), Some(ip("203.0.113.7")));
        assert_eq!(t.client(lb, Some("[2001:db8::1]:5000")), Some(ip("2001:db8::1")));
        assert_eq!(t.client(lb, Some("2001:db8::1")), Some(ip("2001:db8::1")));
    }

    #[test]
    fn header_is_ignored_unless_trusted_and_well_formed() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            t.client(ip("198.51.100.1"), Some("203.0.113.7")),
            None,
            "untrusted peer"
        );
        assert_eq!(t.client(ip("10.0.0.5"), None), None);
        assert_eq!(t.client(ip("10.0.0.5"), Some("unknown, 203.0.113.7")), None);
        assert_eq!(t.client(ip("10.0.0.5"), Some("")), None);
        assert_eq!(
            TrustedProxies::default().client(ip("10.0.0.5"), Some("1.2.3.4")),
            None
        );
    }
}
