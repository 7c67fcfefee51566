//! Who may connect and what they may do: origin checks, tokens and channel grants, sessions
//! bound to their subject, the server-side publish API, rate limits, metrics and health.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;
use wsrelay::auth::{Claims, mint};
use wsrelay_client::V1;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(secret: &str, sub: &str, subscribe: &[&str], publish: &[&str], exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        publish: publish.iter().map(|s| s.to_string()).collect(),
    };
    mint(secret.as_bytes(), &claims)
}

/// A node whose token secret comes from the environment (not visible in `ps`).
fn auth_node(extra: &[&str]) -> Node {
    let mut cmd = Command::new(server_binary());
    cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
    cmd.env("WSRELAY_TOKEN_SECRET", SECRET);
    Node::spawn(&mut cmd)
}

/// The status of a WebSocket upgrade to `path` with extra header lines.
fn upgrade_status(node: &Node, path: &str, headers: &str) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 12];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
}

#[test]
fn origins_outside_the_allow_list_get_403() {
    let node = Node::start(&[
        "--allowed-origin",
        "https://app.example.com",
        "--allowed-origin",
        "https://*.example.org",
    ]);
    assert_eq!(
        upgrade_status(&node, "/", "Origin: https://evil.example.net\r\n"),
        403
    );
    assert_eq!(upgrade_status(&node, "/", "Origin: https://example.org\r\n"), 403);
    assert_eq!(
        upgrade_status(&node, "/", "Origin: http://app.example.com\r\n"),
        403
    );
    assert_eq!(
        upgrade_status(&node, "/", "Origin: https://app.example.com\r\n"),
        101
    );
    assert_eq!(
        upgrade_status(&node, "/", "Origin: https://a.b.example.org\r\n"),
        101
    );
    // Non-browser clients send no Origin.
    assert_eq!(upgrade_status(&node, "/", ""), 101);
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("wsrelay_handshake_failures_total{reason=\"origin\"} 3"),
        "{metrics}"
    );
}

#[test]
fn tokens_are_required_and_checked_at_the_handshake() {
    let node = auth_node(&[]);
    let good = token(SECRET, "alice", &["*"], &["*"], now() + 600);
    let forged = token(
        "another-secret-another-secret-another",
        "alice",
        &["*"],
        &["*"],
        now() + 600,
    );
    let expired = token(SECRET, "alice", &["*"], &["*"], now() - 3600);
    assert_eq!(upgrade_status(&node, "/", ""), 401);
    assert_eq!(upgrade_status(&node, &format!("/?token={forged}"), ""), 401);
    assert_eq!(upgrade_status(&node, &format!("/?token={expired}"), ""), 401);
    assert_eq!(upgrade_status(&node, "/?token=not.a.token", ""), 401);
    assert_eq!(upgrade_status(&node, &format!("/?token={good}"), ""), 101);
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("wsrelay_handshake_failures_total{reason=\"unauthorized\"} 4"),
        "{metrics}"
    );
}

#[test]
fn raw_clients_outside_their_grant_are_closed_with_1008_and_nothing_is_delivered() {
    let node = auth_node(&[]);
    let watcher_token = token(SECRET, "ops", &["*"], &[], now() + 600);
    let mut watcher = V1::connect_with(node.addr, None, Some(&watcher_token)).unwrap();
    watcher.subscribe("news", None).unwrap();
    watcher.subscribe("secret", None).unwrap();

    // May read "news" but not publish there.
    let reader = token(SECRET, "reader", &["news"], &[], now() + 600);
    let mut c = Client::connect(node.addr, &format!("/news?token={reader}")).unwrap();
    c.send_text("should not arrive").unwrap();
    assert_eq!(
        c.recv(WAIT).unwrap(),
        Received::Closed(Some((1008, "forbidden".into())))
    );

    // May not even subscribe to "secret".
    let mut c = Client::connect(node.addr, &format!("/secret?token={reader}")).unwrap();
    assert_eq!(
        c.recv(WAIT).unwrap(),
        Received::Closed(Some((1008, "forbidden".into())))
    );

    // A permitted publisher goes through; the watcher's next message is that one.
    let writer = token(SECRET, "writer", &["news"], &["news"], now() + 600);
    let mut w = Client::connect(node.addr, &format!("/news?token={writer}")).unwrap();
    w.sync("allowed", WAIT).unwrap();
    let m = watcher.message(WAIT).unwrap();
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_str()),
        (Some("news"), Some("allowed"))
    );
    // The reader's publish and its subscription to "secret".
    assert_eq!(node.metric("wsrelay_forbidden_total"), 2);
}

#[test]
fn v1_grants_connect_command_and_sessions_bound_to_their_subject() {
    let node = auth_node(&[]);
    let alice = token(SECRET, "alice", &["chat:*"], &["chat:general"], now() + 600);

    // Token in the connect command instead of the URL.
    let mut c = Client::connect_with(node.addr, "/", Some("wsrelay.v1")).unwrap();
    c.send_text(&json!({"op":"connect","token":alice,"ref":1}).to_string())
        .unwrap();
    let welcome: serde_json::Value = serde_json::from_str(&c.recv_text(WAIT).unwrap()).unwrap();
    assert_eq!(
        (welcome["type"].as_str(), welcome["ref"].as_i64()),
        (Some("welcome"), Some(1))
    );

    let mut a = V1::connect_with(node.addr, None, Some(&alice)).unwrap();
    assert_eq!(a.subscribe("chat:general", None).unwrap()["type"], "subscribed");
    let r = a.subscribe("admin", None).unwrap();
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let r = a.publish("chat:random", "x").unwrap();
    assert_eq!(r["code"], "forbidden");
    assert_eq!(a.publish("chat:general", "hi").unwrap()["type"], "published");
    assert_eq!(a.message(WAIT).unwrap()["data"], "hi");
    let id = a.session.clone();
    a.client.close();

    // The session resumes for alice, not for bob holding its id.
    let bob = token(SECRET, "bob", &["*"], &["*"], now() + 600);
    let b = V1::connect_with(node.addr, Some(&id), Some(&bob)).unwrap();
    assert!(!b.resumed);
    assert_ne!(b.session, id, "bob must not take over alice's session id");
    b.client.close();
    let a2 = V1::connect_with(node.addr, Some(&id), Some(&alice)).unwrap();
    assert!(a2.resumed);
    a2.client.close();
    // The connect command resuming a session gets its welcome as its reply too.
    let mut c = Client::connect_with(node.addr, &format!("/?session={id}"), Some("wsrelay.v1")).unwrap();
    c.send_text(&json!({"op":"connect","token":alice,"ref":"resume"}).to_string())
        .unwrap();
    let welcome: serde_json::Value = serde_json::from_str(&c.recv_text(WAIT).unwrap()).unwrap();
    assert_eq!(
        (
            welcome["type"].as_str(),
            welcome["ref"].as_str(),
            welcome["resumed"].as_bool()
        ),
        (Some("welcome"), Some("resume"), Some(true)),
        "{welcome}"
    );

    // Without a token, anything but connect is refused and the connection closed.
    let mut c = Client::connect_with(node.addr, "/", Some("wsrelay.v1")).unwrap();
    c.send_text(r#"{"op":"subscribe","channel":"chat:general","ref":2}"#)
        .unwrap();
    let err: serde_json::Value = serde_json::from_str(&c.recv_text(WAIT).unwrap()).unwrap();
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(
        c.recv(WAIT).unwrap(),
        Received::Closed(Some((1008, "unauthorized".into())))
    );
    // A bad token in connect likewise.
    let mut c = Client::connect_with(node.addr, "/", Some("wsrelay.v1")).unwrap();
    c.send_text(r#"{"op":"connect","token":"x.y.z"}"#).unwrap();
    let err: serde_json::Value = serde_json::from_str(&c.recv_text(WAIT).unwrap()).unwrap();
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(
        c.recv(WAIT).unwrap(),
        Received::Closed(Some((1008, "unauthorized".into())))
    );
}

/// `POST /publish` with `key`, `content_type` and `body`; returns (status, body).
fn post(node: &Node, query: &str, key: Option<&str>, content_type: &str, body: &[u8]) -> (u16, String) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "POST /publish{query} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // The body in a separate write: the server must wait for it.
    let split = req.len() - body.len() / 2;
    s.write_all(&req[..split]).unwrap();
    s.write_all(&req[split..]).unwrap();
    let mut resp = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut resp).unwrap();
    parse_response(&resp)
}

#[test]
fn backends_publish_over_http() {
    let off = Node::start(&[]);
    assert_eq!(post(&off, "?channel=a", Some("k"), "text/plain", b"x").0, 404);

    let key = "backend-key-0123456789";
    let redis = Redis::start();
    let node = Node::start(&[
        "--api-key",
        key,
        "--redis",
        &redis.url(),
        "--max-message-size",
        "1024",
    ]);
    let mut v1 = V1::connect(node.addr, None).unwrap();
    v1.subscribe("orders", None).unwrap();
    let mut raw = node.client("/orders");
    raw.sync("raw-ready", WAIT).unwrap();
    assert_eq!(v1.message(WAIT).unwrap()["data"], "raw-ready");

    assert_eq!(post(&node, "?channel=orders", None, "text/plain", b"x").0, 401);
    assert_eq!(
        post(
            &node,
            "?channel=orders",
            Some("wrong-key-0123456789"),
            "text/plain",
            b"x"
        )
        .0,
        401
    );
    assert_eq!(post(&node, "", Some(key), "text/plain", b"x").0, 400);
    assert_eq!(
        post(&node, "?channel=orders", Some(key), "text/plain", &[0xff, 0xfe]).0,
        400
    );
    assert_eq!(
        post(&node, "?channel=orders", Some(key), "text/plain", &[b'x'; 2000]).0,
        413
    );

    let (status, body) = post(
        &node,
        "?channel=orders",
        Some(key),
        "text/plain",
        b"order #1 shipped",
    );
    assert_eq!(status, 200, "{body}");
    let ack: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ack["channel"].as_str(), ack["offset"].as_u64()),
        (Some("orders"), Some(2))
    );
    let m = v1.message(WAIT).unwrap();
    assert_eq!(
        (m["data"].as_str(), m["offset"].as_u64()),
        (Some("order #1 shipped"), Some(2))
    );
    assert_eq!(raw.recv_text(WAIT).unwrap(), "order #1 shipped");

    let (status, _) = post(
        &node,
        "?channel=orders",
        Some(key),
        "application/octet-stream",
        &[0, 1, 2],
    );
    assert_eq!(status, 200);
    assert_eq!(raw.recv(WAIT).unwrap(), Received::Binary(vec![0, 1, 2]));
}

#[test]
fn publish_rate_limits_and_per_ip_caps() {
    let node = Node::start(&[
        "--publish-rate",
        "2",
        "--publish-burst",
        "5",
        "--max-connections-per-ip",
        "3",
    ]);
    let mut v1 = V1::connect(node.addr, None).unwrap();
    let mut published = 0;
    let mut limited = 0;
    for i in 0..12 {
        let r = v1.publish("rl", &i.to_string()).unwrap();
        match r["type"].as_str() {
            Some("published") => published += 1,
            _ if r["code"] == "rate_limited" => limited += 1,
            _ => panic!("{r}"),
        }
    }
    assert!(
        published >= 5 && limited >= 1,
        "published {published}, limited {limited}"
    );

    // A raw client over the rate is closed with 1008.
    let mut raw = node.client("/rl");
    for i in 0..20 {
        if raw.send_text(&format!("r{i}")).is_err() {
            break;
        }
    }
    let closed = loop {
        if let Received::Closed(f) = raw.recv(WAIT).unwrap() {
            break f;
        }
    };
    assert_eq!(closed, Some((1008, "rate limited".into())));
    drop(raw);

    // Per-IP cap: the v1 client holds one slot from 127.0.0.1; two more fit, a fourth is 429.
    let _c2 = node.client("/x");
    let _c3 = node.client("/x");
    wait_for("per-IP refusal", WAIT, || {
        (upgrade_status(&node, "/x", "") == 429).then_some(())
    });
    // Another address is not affected.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&node.addr.into()).unwrap();
    let mut other = Client::handshake(sock.into(), node.addr, "/x", None).unwrap();
    other.sync("from another address", WAIT).unwrap();
    // Free the slots to read the metrics from 127.0.0.1 again.
    drop((v1, _c2, _c3, other));
    let metrics = wait_for("a free slot", WAIT, || {
        let (status, body) = node.http_get("/metrics");
        (status == 200).then_some(body)
    });
    // The v1 publishes refused, and the raw client's one (it is closed at the first).
    assert_eq!(metric_value(&metrics, "wsrelay_rate_limited_total"), limited + 1);
    assert!(!metrics.contains("reason=\"per_ip_limit\"} 0"), "{metrics}");
}

#[test]
fn metrics_cover_what_operators_need() {
    let node = Node::start(&[]);
    let mut c = node.client("/m");
    c.sync("one", WAIT).unwrap();
    let (status, body) = node.http_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "wsrelay_connections",
        "wsrelay_websockets",
        "wsrelay_messages_received_total",
        "wsrelay_deliveries_total",
        "wsrelay_bytes_out_total",
        "wsrelay_slow_consumer_closes_total",
        "wsrelay_publish_dropped_total",
        "wsrelay_publish_failed_total",
        "wsrelay_redis_reconnects_total",
        "wsrelay_redis_subscriber_up",
        "wsrelay_replayed_total",
        "wsrelay_recovery_failed_total",
        "wsrelay_handshake_failures_total",
        "wsrelay_rate_limited_total",
        "wsrelay_forbidden_total",
    ] {
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    // "one", received once and delivered once (to its sender).
    assert_eq!(metric_value(&body, "wsrelay_messages_received_total"), 1);
    assert_eq!(metric_value(&body, "wsrelay_deliveries_total"), 1);
    assert!(metric_value(&body, "wsrelay_bytes_out_total") > 0);
}

#[test]
fn healthz_turns_unhealthy_when_redis_stalls() {
    let redis = Redis::start();
    let node = Node::start(&["--redis", &redis.url()]);
    wait_for("healthz 200 once the subscriber is connected", WAIT, || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    // SIGSTOP: the connection stays open but nothing answers. Only a probe notices.
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    let resume = Resume(redis.pid());
    wait_for(
        "healthz 503 while redis is stopped",
        Duration::from_secs(15),
        || (node.http_get("/healthz").0 == 503).then_some(()),
    );
    drop(resume);
    wait_for("healthz 200 after SIGCONT", Duration::from_secs(20), || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
}

/// Sends SIGCONT on drop, so a failing test does not leave Redis stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn http_publish_bodies_larger_than_a_request_head() {
    let key = "backend-key-0123456789";
    let node = Node::start(&["--api-key", key]);
    let mut v1 = V1::connect(node.addr, None).unwrap();
    v1.subscribe("big", None).unwrap();
    // 20 KB: past the 8 KiB head limit, so the body is read on after the head.
    let body = "b".repeat(20_000);
    let (status, reply) = post(&node, "?channel=big", Some(key), "text/plain", body.as_bytes());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        v1.message(WAIT).unwrap()["data"].as_str().map(str::len),
        Some(20_000)
    );
}

/// A secret variable that is set but empty is a deployment mistake (a secret that was not
/// injected), not a request to run without authentication: the server refuses to start.
#[test]
fn an_empty_secret_in_the_environment_is_refused() {
    for var in ["WSRELAY_TOKEN_SECRET", "WSRELAY_API_KEY"] {
        refuses_to_start(&[], &[(var, "")], var);
    }
}
