//! What arrives from Redis, or what Redis refuses, is never trusted to drive the server: a
//! payload that only looks like wsrelay's own cannot put subscribers into a loop, deployments
//! sharing a Redis stay apart, and a Redis that refuses writes is reported as a refusal, not
//! as an outage.

mod common;

use common::*;
use wsrelay::client::V1;

/// `INFO stats` field `name` as a number.
fn info_stat(con: &mut redis::Connection, name: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in INFO stats"))
}

fn config_set(con: &mut redis::Connection, key: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(con)
        .unwrap();
}

/// `POST /publish?channel=C` with a text body; returns (status, body).
fn post(node: &Node, key: &str, channel: &str, body: &str) -> (u16, String) {
    http_request(
        node.addr,
        &format!(
            "POST /publish?channel={channel} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn redis_refusing_writes_is_a_refusal_not_an_outage() {
    let key = "backend-key-0123456789";
    let redis = Redis::start();
    let a = Node::start(&["--redis", &redis.url(), "--api-key", key]);
    let b = Node::start(&["--redis", &redis.url()]);
    let mut on_a = V1::connect(a.addr, None).unwrap();
    let mut on_b = V1::connect(b.addr, None).unwrap();
    on_a.subscribe("c", None).unwrap();
    on_b.subscribe("c", None).unwrap();
    let mut publisher = V1::connect(a.addr, None).unwrap();
    assert_eq!(publisher.publish("c", "before").unwrap()["type"], "published");
    assert_eq!(on_a.message(WAIT).unwrap()["data"], "before");
    assert_eq!(on_b.message(WAIT).unwrap()["data"], "before");
    wait_for("healthz 200", WAIT, || {
        (a.http_get("/healthz").0 == 200).then_some(())
    });

    // Every write is refused from now on (noeviction is the default policy).
    let mut con = redis.con();
    let connections = info_stat(&mut con, "total_connections_received");
    config_set(&mut con, "maxmemory", "1");
    for i in 0..20 {
        let r = publisher.publish("c", &format!("refused-{i}")).unwrap();
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some("refused")),
            "{r}"
        );
        assert!(r["message"].as_str().unwrap().contains("OOM"), "{r}");
    }
    let (status, body) = post(&a, key, "c", "over http");
    assert_eq!(status, 507, "{body}");
    let (status, body) = a.http_get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refusing writes"), "{body}");
    assert_eq!(a.metric("wsrelay_publish_refused_total"), 21);
    assert_eq!(a.metric("wsrelay_publish_failed_total"), 0);
    // The publisher kept its connection: Redis saw no new one.
    assert_eq!(info_stat(&mut con, "total_connections_received"), connections);

    config_set(&mut con, "maxmemory", "0");
    assert_eq!(publisher.publish("c", "after").unwrap()["type"], "published");
    // Nothing refused was delivered anywhere: the next message on both nodes is "after".
    assert_eq!(on_a.message(WAIT).unwrap()["data"], "after");
    assert_eq!(on_b.message(WAIT).unwrap()["data"], "after");
    let (status, body) = a.http_get("/healthz");
    assert_eq!(status, 200, "{body}");
}
