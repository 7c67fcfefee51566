//! `proxy::parse` on arbitrary bytes (what a `--proxy-listen` connection sends first) and on
//! headers built from arbitrary addresses, and `forwarded::TrustedProxies::client` on arbitrary
//! `X-Forwarded-For` values.
//!
//! Properties (beyond "never panics"):
//! - `Complete { len, .. }`: `0 < len <= input.len()`, `len <= http::MAX_HEAD`, and parsing
//!   exactly `input[..len]` gives the same result (the header does not depend on what follows).
//! - Bytes arriving in pieces: `Partial` on a prefix is never followed by a different decision
//!   than the whole input allows (a complete header on a prefix is the same on the whole), and
//!   a refusal on a prefix stays a refusal.
//! - v1 and v2 headers built for any pair of addresses parse back to the source address, with
//!   any bytes after them untouched.
//! - The client named by `X-Forwarded-For` is one of its entries, and never anything when the
//!   peer is not trusted.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wsrelay::forwarded::{Cidr, TrustedProxies};
use wsrelay::http::MAX_HEAD;
use wsrelay::proxy::{self, Header};

#[derive(Arbitrary, Debug)]
struct Input {
    raw: Vec<u8>,
    source: (IpAddr, u16),
    dest: (IpAddr, u16),
    tail: Vec<u8>,
    forwarded_for: String,
    peer: IpAddr,
    trusted: Vec<(IpAddr, u8)>,
}

fuzz_target!(|input: Input| {
    let whole = proxy::parse(&input.raw);
    check(&input.raw, &whole);
    for cut in [
        input.raw.len() / 3,
        input.raw.len() / 2,
        input.raw.len().saturating_sub(1),
    ] {
        let early = proxy::parse(&input.raw[..cut]);
        match &early {
            Header::Partial => {}
            Header::Complete { .. } => assert_eq!(early, whole, "complete after {cut} bytes, then different"),
            Header::Invalid(why) => assert!(
                matches!(whole, Header::Invalid(_)),
                "refused after {cut} bytes ({why}) but accepted whole: {whole:?}"
            ),
        }
    }

    let source = SocketAddr::new(input.source.0, input.source.1);
    let dest = SocketAddr::new(input.dest.0, input.dest.1);
    for built in [proxy::v1(source, dest), proxy::v2(source, dest)] {
        let mut bytes = built.clone();
        bytes.extend_from_slice(&input.tail);
        let Header::Complete {
            source: Some(got),
            len,
        } = proxy::parse(&bytes)
        else {
            panic!("built header refused: {built:?}");
        };
        assert_eq!(len, built.len());
        assert_eq!(got.port(), source.port());
        assert_eq!(got.ip().to_canonical(), source.ip().to_canonical());
    }

    let blocks: Vec<Cidr> = input
        .trusted
        .iter()
        .filter_map(|(ip, bits)| format!("{ip}/{}", bits % 129).parse().ok())
        .collect();
    let trusted = TrustedProxies::new(blocks);
    if let Some(client) = trusted.client(input.peer, Some(&input.forwarded_for)) {
        assert!(trusted.trusts(input.peer));
        let named = input
            .forwarded_for
            .split(',')
            .any(|e| entry(e.trim()) == Some(client));
        assert!(named, "{client} is not in {:?}", input.forwarded_for);
    }
});

fn check(input: &[u8], result: &Header) {
    if let Header::Complete { len, .. } = result {
        assert!(*len > 0 && *len <= input.len(), "len {len} of {}", input.len());
        assert!(*len <= MAX_HEAD);
        assert_eq!(
            &proxy::parse(&input[..*len]),
            result,
            "the header alone parses differently"
        );
    }
}

/// Reference reading of one `X-Forwarded-For` entry: an address, `[v6]:port` or `v4:port`.
fn entry(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(inner) = e.strip_prefix('[').and_then(|r| r.split(']').next()) {
        return inner.parse().ok();
    }
    let (ip, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}
