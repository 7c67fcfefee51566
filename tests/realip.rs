//! Real client addresses behind a balancer: the PROXY protocol (v1 and v2) on `--proxy-listen`,
//! and `X-Forwarded-For` believed only from `--trusted-proxy`. Both feed
//! `--max-connections-per-ip` and the logs; a missing or broken PROXY header closes the
//! connection and nobody else notices.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use wsrelay::proxy;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Sends `preface` and a WebSocket upgrade of `path` with `extra` header lines; returns the
/// status and the stream, still open (a 101 keeps the connection counted).
fn upgrade(mut s: TcpStream, preface: &[u8], path: &str, extra: &str) -> (u16, TcpStream) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    let mut bytes = preface.to_vec();
    bytes.extend_from_slice(req.as_bytes());
    s.write_all(&bytes).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no response to {path:?}: {other:?} after {head:?}"),
        }
    }
    (parse_response(&head).0, s)
}

/// Bytes the server sends before it closes `s` (nothing, for a refused PROXY header).
fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("not closed within {timeout:?}: {e} (got {got:?})"),
        }
    }
}

/// A raw client on `path` through the PROXY listener, claiming to be `client`.
fn proxied_client(node: &Node, client: &str, path: &str) -> Client {
    let paddr = node.proxy_addr();
    let mut s = TcpStream::connect(paddr).unwrap();
    s.write_all(&proxy::v2(addr(client), paddr)).unwrap();
    Client::handshake(s, paddr, path, None).expect("handshake through the PROXY listener")
}

#[test]
fn proxy_protocol_names_the_client_for_the_per_ip_limit_and_logs() {
    let node = Node::start(&[
        "--proxy-listen",
        "127.0.0.1:0",
        "--max-connections-per-ip",
        "1",
        "--log-level",
        "debug",
    ]);
    let paddr = node.proxy_addr();
    let v1 = |client: &str| proxy::v1(addr(client), paddr);
    let v2 = |client: &str| proxy::v2(addr(client), paddr);
    let to_proxy = || TcpStream::connect(paddr).unwrap();

    // Every client here comes from 127.0.0.1; the limit of 1 applies to the addresses the
    // headers name.
    let (status, a) = upgrade(to_proxy(), &v1("203.0.113.1:1111"), "/ip", "");
    assert_eq!(status, 101);
    let (status, _) = upgrade(to_proxy(), &v2("203.0.113.1:2222"), "/ip", "");
    assert_eq!(status, 429, "a second connection from 203.0.113.1");
    let (status, _b) = upgrade(to_proxy(), &v2("203.0.113.2:3333"), "/ip", "");
    assert_eq!(status, 101);
    let (status, _c) = upgrade(to_proxy(), &v1("[2001:db8::1]:4"), "/ip", "");
    assert_eq!(status, 101);
    let (status, _) = upgrade(to_proxy(), &v2("[2001:db8::2]:5"), "/ip", "");
    assert_eq!(status, 429, "same IPv6 /64");
    // LOCAL (a balancer's health check) and UNKNOWN: the connection's own address.
    let mut local = proxy::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    // Both count as 127.0.0.1 (limit 1): the second waits until the first has been let go
    // (the server drops it once it has read the client's hang-up, a moment after the answer).
    for preface in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        let answer = wait_for("a health check through the PROXY listener", WAIT, || {
            let mut s = to_proxy();
            s.write_all(&preface).unwrap();
            s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
            let answer = parse_response(&read_until_closed(&mut s, WAIT));
            (answer.0 != 429).then_some(answer)
        });
        assert_eq!(answer, (200, "ok\n".to_owned()));
    }
    // The address is freed when its connection ends.
    drop(a);
    wait_for("203.0.113.1 freed", WAIT, || {
        let (status, s) = upgrade(to_proxy(), &v1("203.0.113.1:1112"), "/ip", "");
        (status == 101).then_some(s)
    });

    // Logs name the client, and the balancer it came through.
    let mut s = to_proxy();
    s.write_all(&v1("198.51.100.7:4242")).unwrap();
    s.write_all(b"GET /%zz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(parse_response(&read_until_closed(&mut s, WAIT)).0, 400);
    let line = node.wait_log("bad request from");
    assert!(line.contains("198.51.100.7:4242"), "{line}");
    let line = node.wait_log("over --max-connections-per-ip");
    assert!(line.contains("203.0.113.1:2222 (via 127.0.0.1:"), "{line}");

    // Clients through the PROXY listener are served like any other.
    let mut x = proxied_client(&node, "192.0.2.10:1", "/chat");
    let mut y = proxied_client(&node, "192.0.2.11:1", "/chat");
    x.sync("x-ready", WAIT).unwrap();
    y.send_text("from y").unwrap();
    recv_until(&mut x, "from y");
}

#[test]
fn missing_or_broken_proxy_headers_close_the_connection_without_harm() {
    let node = Node::start(&[
        "--proxy-listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1s",
        "--threads",
        "1",
    ]);
    let paddr = node.proxy_addr();
    // A well-behaved client on the same (only) loop, before, during and after.
    let mut good = proxied_client(&node, "192.0.2.1:1", "/good");
    good.sync("ready", WAIT).unwrap();
    let mut sig_then_junk = proxy::V2_SIGNATURE.to_vec();
    sig_then_junk.extend_from_slice(&[0x21, 0x11, 0x00, 0x02, 1, 2]);
    let mut v2_bad_version = proxy::v2(addr("192.0.2.2:1"), paddr);
    v2_bad_version[12] = 0x31;
    let mut v2_too_long = proxy::v2(addr("192.0.2.2:1"), paddr);
    v2_too_long[14] = 0xff;
    let mut v2_bad_family = proxy::v2(addr("192.0.2.2:1"), paddr);
    v2_bad_family[13] = 0x51;
    let broken: Vec<(&str, Vec<u8>)> = vec![
        ("no header", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("TLS", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
        (
            "v1 missing fields",
            b"PROXY TCP4 192.0.2.2\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 192.0.2.300 192.0.2.1 1 2\r\n".to_vec(),
        ),
        (
            "v1 LF only",
            b"PROXY TCP4 192.0.2.2 192.0.2.1 1 2\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "v1 too long",
            format!("PROXY UNKNOWN {}", "x".repeat(300)).into_bytes(),
        ),
        ("v2 address too short", sig_then_junk),
        ("v2 version 3", v2_bad_version),
        ("v2 too long", v2_too_long),
        ("v2 unknown address family", v2_bad_family),
    ];
    for (i, (what, bytes)) in broken.iter().enumerate() {
        let mut s = TcpStream::connect(paddr).unwrap();
        s.write_all(bytes).unwrap();
        let got = read_until_closed(&mut s, WAIT);
        assert!(
            got.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
        good.sync(&format!("after-{i}"), WAIT).unwrap();
    }
    assert_eq!(
        node.metric("wsrelay_handshake_failures_total"),
        broken.len() as u64
    );
    // Half a header and then silence: closed at the handshake timeout, unanswered (the bytes
    // so far are not an HTTP request either).
    let v2 = proxy::v2(addr("192.0.2.2:1"), paddr);
    let halves: [&[u8]; 3] = [b"PROXY TCP4 192.0.2.", b"PROXY", &v2[..20]];
    for (i, half) in halves.iter().enumerate() {
        let mut s = TcpStream::connect(paddr).unwrap();
        s.write_all(half).unwrap();
        let t = Instant::now();
        let got = read_until_closed(&mut s, WAIT);
        assert!(t.elapsed() < WAIT);
        assert!(
            got.is_empty(),
            "{:?}: answered {:?}",
            String::from_utf8_lossy(half),
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            metric_value(
                &node.http_get("/metrics").1,
                "wsrelay_handshake_failures_total{reason=\"timeout\"}"
            ),
            i as u64 + 1,
            "{:?} closed for another reason than the timeout",
            String::from_utf8_lossy(half)
        );
    }
    good.sync("after-silence", WAIT).unwrap();
    // The plain listener never reads PROXY headers: a client cannot claim another address.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.write_all(&proxy::v1(addr("192.0.2.3:1"), node.addr)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(parse_response(&read_until_closed(&mut s, WAIT)).0, 400);
    good.sync("the end", WAIT).unwrap();
}

#[test]
fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let node = Node::start(&[
        "--trusted-proxy",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "1",
        "--log-level",
        "debug",
    ]);
    let xff = |v: &str| format!("X-Forwarded-For: {v}\r\n");
    let from = |ip: &str| connect_from(ip, node.addr);
    // From the trusted proxy (127.0.0.1): the client is the rightmost address that is not a
    // trusted proxy.
    let (status, _a) = upgrade(from("127.0.0.1"), b"", "/x", &xff("203.0.113.5"));
    assert_eq!(status, 101);
    let forged = xff("198.51.100.1, 203.0.113.5");
    let (status, _) = upgrade(from("127.0.0.1"), b"", "/x", &forged);
    assert_eq!(
        status, 429,
        "the client forged the left entry; 203.0.113.5 is at its limit"
    );
    let two_headers = format!("{}{}", xff("198.51.100.1"), xff("203.0.113.6, 127.0.0.1"));
    let (status, _b) = upgrade(from("127.0.0.1"), b"", "/x", &two_headers);
    assert_eq!(status, 101, "203.0.113.6 through two proxies");
    let line = node.wait_log("over --max-connections-per-ip");
    assert!(line.contains("203.0.113.5:0 (via 127.0.0.1:"), "{line}");

    // From anyone else the header is ignored: 127.0.0.2 is limited as itself.
    let (status, _c) = upgrade(from("127.0.0.2"), b"", "/x", &xff("203.0.113.7"));
    assert_eq!(status, 101);
    let (status, _) = upgrade(from("127.0.0.2"), b"", "/x", &xff("203.0.113.8"));
    assert_eq!(status, 429, "a forged header from an untrusted peer");
    // A header that is not a list of addresses is not believed either: the proxy is the client.
    let (status, _d) = upgrade(from("127.0.0.1"), b"", "/x", &xff("unknown"));
    assert_eq!(status, 101);
    let (status, _) = upgrade(from("127.0.0.1"), b"", "/x", &xff("garbage"));
    assert_eq!(status, 429, "both counted as 127.0.0.1");
}
