//! Graceful shutdown as a node behind a load balancer does it (README "Deploying"): on SIGTERM
//! `/healthz` says "draining" and new WebSockets get 503 for `--drain-delay`; then the listener
//! closes and clients get 1001 spread over `--drain-period`, each after its session is stored;
//! then the process exits 0. SIGINT and a second signal do not wait.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Reads a v1 client until its close; returns the messages before it and the close code.
fn until_close(c: &mut V1, timeout: Duration) -> (Vec<Value>, Option<u16>) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.client.recv(left) {
            Ok(Received::Text(t)) => got.push(serde_json::from_str(&t).unwrap()),
            Ok(Received::Closed(f)) => return (got, f.map(|(code, _)| code)),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("no close within {timeout:?}: {e}"),
        }
    }
}

fn upgrade_status(node: &Node) -> (u16, String) {
    http_request(
        node.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
}

/// The whole drain against Redis: announce, refuse, keep serving, close spread out, store
/// every session before its close, exit 0; the sessions then resume on another node exactly
/// where each client stopped.
#[test]
fn sigterm_drains_then_exits_with_every_session_stored() {
    let redis = Redis::start();
    let url = redis.url();
    let (delay, period) = (Duration::from_millis(1500), Duration::from_millis(1500));
    // Offsets are flushed only every 10 minutes: what the resume finds was written by the drain.
    let args = [
        "--redis",
        &url,
        "--threads",
        "2",
        "--drain-delay",
        "1500ms",
        "--drain-period",
        "1500ms",
        "--session-flush",
        "10m",
    ];
    let mut node = Node::start(&args);
    let mut clients: Vec<V1> = (0..10)
        .map(|_| {
            let mut c = V1::connect(node.addr, None).unwrap();
            assert_eq!(c.subscribe("drain", None).unwrap()["type"], "subscribed");
            c
        })
        .collect();
    let mut publisher = V1::connect(node.addr, None).unwrap();
    for i in 1..=5 {
        publisher.publish("drain", &format!("m{i}")).unwrap();
    }
    for c in &mut clients {
        for i in 1..=5 {
            assert_eq!(c.message(WAIT).unwrap()["offset"], i);
        }
    }

    let signalled = Instant::now();
    node.signal(libc::SIGTERM);
    let (status, body) = wait_for("/healthz 503", WAIT, || {
        let r = node.http_get("/healthz");
        (r.0 == 503).then_some(r)
    });
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert!(signalled.elapsed() < delay, "the node must say it drains at once");
    let (status, body) = upgrade_status(&node);
    assert_eq!(status, 503, "new WebSockets are refused while draining: {body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(node.metric("wsrelay_handshake_failures_total"), 1);
    // Connected clients are still served during the delay.
    let ack = publisher.publish("drain", "m6").unwrap();
    assert_eq!(ack["offset"], 6);

    // Each client (the publisher too) gets 1001 after the delay, spread over the period; every
    // message published before its close reached it first.
    let mut closed_at = Vec::new();
    let mut last_offsets = Vec::new();
    for c in clients.iter_mut().chain(std::iter::once(&mut publisher)) {
        let (got, code) = until_close(c, delay + period + WAIT);
        closed_at.push(signalled.elapsed());
        assert_eq!(code, Some(1001));
        let offsets: Vec<u64> = got
            .iter()
            .filter(|m| m["type"] == "message")
            .filter_map(|m| m["offset"].as_u64())
            .collect();
        last_offsets.push(offsets.last().copied());
    }
    closed_at.sort();
    let (first, last) = (closed_at[0], *closed_at.last().unwrap());
    assert!(
        first >= delay,
        "a client closed {first:?} after SIGTERM, before the delay"
    );
    assert!(
        last - first >= period / 2,
        "11 clients over {period:?} closed within {:?}: not spread",
        last - first
    );
    // After the delay the listener is closed.
    assert!(TcpStream::connect(node.addr).is_err(), "still accepting");
    let exit = node.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0));
    assert!(
        node.log().iter().any(|l| l.contains("draining")),
        "{:?}",
        node.log()
    );

    // Every session was stored with the client's last offset before its close: resuming on
    // another node replays exactly what came after it, nothing twice.
    let mut other = Node::start(&["--redis", &url]);
    let mut p = V1::connect(other.addr, None).unwrap();
    let ack = p.publish("drain", "after").unwrap();
    let top = ack["offset"].as_u64().unwrap();
    assert_eq!(top, 7);
    for (c, last) in clients.iter().zip(&last_offsets) {
        let had = last.unwrap_or(5);
        let mut r = V1::connect(other.addr, Some(&c.session)).unwrap();
        assert!(r.resumed, "session {} not stored", c.session);
        let sub = r.next(WAIT).unwrap();
        assert_eq!(
            (sub["type"].as_str(), sub["recovered"].as_bool()),
            (Some("subscribed"), Some(true)),
            "{sub}"
        );
        for want in had + 1..=top {
            let m = r.message(WAIT).unwrap();
            assert_eq!(m["offset"], want, "resumed after {had}: {m}");
        }
    }
    other.kill();
}

/// A second signal does not wait for the drain.
#[test]
fn second_signal_exits_at_once() {
    let mut node = Node::start(&["--drain-delay", "60s", "--drain-period", "60s"]);
    let mut c = node.client("/");
    c.sync("ready", WAIT).unwrap();
    node.signal(libc::SIGTERM);
    wait_for("draining", WAIT, || {
        (node.http_get("/healthz").0 == 503).then_some(())
    });
    let t = Instant::now();
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(WAIT);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_ne!(status.code(), Some(0), "an interrupted drain is not a clean exit");
}

/// SIGINT (Ctrl-C) closes everyone at once, whatever the drain flags say.
#[test]
fn sigint_closes_everyone_at_once() {
    let mut node = Node::start(&["--drain-delay", "60s", "--drain-period", "60s"]);
    let mut clients: Vec<Client> = (0..3).map(|_| node.client("/")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("s{i}"), WAIT).unwrap();
    }
    node.signal(libc::SIGINT);
    for c in &mut clients {
        // Each raw client of `/` also got the others' sync messages.
        assert_eq!(recv_close(c), Some(1001));
    }
    assert_eq!(node.wait_exit(WAIT).code(), Some(0));
}

/// A client that answers the close but keeps its socket open does not hold the exit until
/// `--close-timeout` (or `--shutdown-timeout`): the node is done once every client has its
/// close frame.
#[test]
fn clients_keeping_their_sockets_after_the_close_do_not_hold_the_exit() {
    let mut node = Node::start(&[
        "--shutdown-timeout",
        "60s",
        "--close-timeout",
        "30s",
        "--threads",
        "2",
    ]);
    let mut clients: Vec<Client> = (0..4).map(|_| node.client("/")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("s{i}"), WAIT).unwrap();
    }
    node.signal(libc::SIGINT);
    for c in &mut clients {
        assert_eq!(recv_close(c), Some(1001));
    }
    // The sockets stay open (the clients live on) while the node exits.
    assert_eq!(node.wait_exit(WAIT).code(), Some(0));
    assert!(
        !node.log().iter().any(|l| l.contains("shutdown deadline passed")),
        "{:?}",
        node.log()
    );
    drop(clients);
}
