//! What arrives from Redis, or what Redis refuses, is never trusted to drive the server: a
//! payload that only looks like wsrelay's own cannot put subscribers into a loop, deployments
//! sharing a Redis stay apart, and a Redis that refuses writes is reported as a refusal, not
//! as an outage.

mod common;

use common::*;

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

/// The next frame of a v1 client, which must be a message with `data`; returns its offset.
#[track_caller]
fn expect_message(c: &mut V1, data: &str) -> Option<u64> {
    let m = c.next(WAIT).unwrap();
    assert_eq!(
        (m["type"].as_str(), m["data"].as_str()),
        (Some("message"), Some(data)),
        "{m}"
    );
    m["offset"].as_u64()
}

#[test]
fn a_payload_with_a_foreign_header_is_delivered_once_and_loops_nothing() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url()]);
    let mut v1 = V1::connect(n.addr, None).unwrap();
    v1.subscribe("c", None).unwrap();
    let mut raw = n.client("/c?session=raw-session-0001");
    raw.sync("raw ready", WAIT).unwrap();
    assert_eq!(expect_message(&mut v1, "raw ready"), Some(1));

    // A backend publishes payloads that look like wsrelay's own, with an epoch that is not
    // the channel's (or two deployments' channels meet in Redis).
    let mut con = redis.con();
    for body in ["foreign one", "foreign two"] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("c")
            .arg(format!("\0wr1 t 7 x\n{body}"))
            .query(&mut con)
            .unwrap();
    }
    let mut p = V1::connect(n.addr, None).unwrap();
    assert_eq!(p.publish("c", "after").unwrap()["offset"], 2);
    // Each is delivered once, without a position (it has none in this channel's history),
    // and the channel's own messages go on: no notices, no replays, no loop.
    assert_eq!(expect_message(&mut v1, "foreign one"), None);
    assert_eq!(expect_message(&mut v1, "foreign two"), None);
    assert_eq!(expect_message(&mut v1, "after"), Some(2));
    for want in ["foreign one", "foreign two", "after"] {
        assert_eq!(raw.recv_text(WAIT).unwrap(), want);
    }
    assert_eq!(p.publish("c", "after two").unwrap()["offset"], 3);
    assert_eq!(expect_message(&mut v1, "after two"), Some(3));
    assert_eq!(raw.recv_text(WAIT).unwrap(), "after two");
    assert_eq!(n.metric("wsrelay_recovery_failed_total"), 0);
}

#[test]
fn deployments_sharing_a_redis_stay_apart() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Node::start(&["--redis", &url, "--redis-prefix", "a:"]);
    let b = Node::start(&["--redis", &url, "--redis-prefix", "b:"]);
    let mut va = V1::connect(a.addr, None).unwrap();
    let mut vb = V1::connect(b.addr, None).unwrap();
    assert_eq!(va.subscribe("room", None).unwrap()["offset"], 0);
    assert_eq!(vb.subscribe("room", None).unwrap()["offset"], 0);
    let mut ra = a.client("/room");
    let mut rb = b.client("/room");
    ra.sync("raw a", WAIT).unwrap();
    rb.sync("raw b", WAIT).unwrap();
    assert_eq!(expect_message(&mut va, "raw a"), Some(1));
    assert_eq!(expect_message(&mut vb, "raw b"), Some(1));
    // Each deployment's channel "room" has its own history and its own subscribers, and a
    // channel named like the other's Redis channel is still its own.
    let mut pa = V1::connect(a.addr, None).unwrap();
    let mut pb = V1::connect(b.addr, None).unwrap();
    assert_eq!(pa.publish("b:room", "not for b").unwrap()["offset"], 1);
    assert_eq!(pb.publish("a:room", "not for a").unwrap()["offset"], 1);
    assert_eq!(pa.publish("room", "second in a").unwrap()["offset"], 2);
    assert_eq!(pb.publish("room", "second in b").unwrap()["offset"], 2);
    assert_eq!(expect_message(&mut va, "second in a"), Some(2));
    assert_eq!(expect_message(&mut vb, "second in b"), Some(2));
    assert_eq!(ra.recv_text(WAIT).unwrap(), "second in a");
    assert_eq!(rb.recv_text(WAIT).unwrap(), "second in b");
    // Sessions are per deployment.
    let id = va.session.clone();
    va.client.close();
    assert!(!V1::connect(b.addr, Some(&id)).unwrap().resumed);
    assert!(V1::connect(a.addr, Some(&id)).unwrap().resumed);
    // Every key either deployment wrote carries its prefix (the registry of prefixes aside).
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis.con()).unwrap();
    for k in &keys {
        assert!(
            k.starts_with("a:") || k.starts_with("b:") || k == "wsrelay:prefixes",
            "{k}"
        );
    }
    // A prefix that one of theirs starts with, or that starts with one of theirs, could meet
    // their channels: refused at start. The same prefix is another node of a deployment.
    refuses_to_start(&["--redis", &url], &[], "prefix");
    refuses_to_start(&["--redis", &url, "--redis-prefix", "a:x:"], &[], "prefix");
    refuses_to_start(&["--redis", &url, "--redis-prefix", "b"], &[], "prefix");
    let again = Node::start(&["--redis", &url, "--redis-prefix", "a:"]);
    drop(again);
}

/// Calls of `cmd` Redis has run (`INFO commandstats`).
fn calls(redis: &Redis, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.con())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_payload_claiming_a_future_offset_of_the_channel_loops_nothing() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url()]);
    let mut v1 = V1::connect(n.addr, None).unwrap();
    v1.subscribe("f", None).unwrap();
    let mut raw = n.client("/f?session=raw-session-0002");
    raw.sync("raw ready", WAIT).unwrap();
    assert_eq!(expect_message(&mut v1, "raw ready"), Some(1));
    let mut p = V1::connect(n.addr, None).unwrap();
    let epoch = p.publish("f", "real").unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(expect_message(&mut v1, "real"), Some(2));
    assert_eq!(raw.recv_text(WAIT).unwrap(), "real");
    // The channel's own epoch, an offset its history will not reach for a long time.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("f")
        .arg(format!("\0wr1 t 1004 {epoch}\nfake"))
        .query(&mut redis.con())
        .unwrap();
    assert_eq!(p.publish("f", "after").unwrap()["offset"], 3);
    // The history cannot fill a gap up to 1004: one read finds that out (and replays what it
    // has, so "after" may come first), then the payload is passed on without a position.
    let mut got: Vec<(String, Option<u64>)> = (0..2)
        .map(|_| {
            let m = v1.next(WAIT).unwrap();
            (
                m["data"].as_str().unwrap_or_default().to_owned(),
                m["offset"].as_u64(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, [("after".to_owned(), Some(3)), ("fake".to_owned(), None)]);
    let mut texts = [raw.recv_text(WAIT).unwrap(), raw.recv_text(WAIT).unwrap()];
    texts.sort();
    assert_eq!(texts, ["after", "fake"]);
    // Nothing goes on behind the scenes: one more message costs Redis one script call.
    let before = calls(&redis, "evalsha");
    assert_eq!(p.publish("f", "after two").unwrap()["offset"], 4);
    assert_eq!(expect_message(&mut v1, "after two"), Some(4));
    assert_eq!(raw.recv_text(WAIT).unwrap(), "after two");
    assert_eq!(calls(&redis, "evalsha"), before + 1);
}

/// A channel whose keys someone else overwrote (a meta that is not a hash): its publishes are
/// refused with Redis's reason, and the other channels' publishes sent with them, several to
/// one script call, are stored and delivered as usual, in order.
#[test]
fn a_channel_with_broken_keys_refuses_only_its_own_publishes() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut con = redis.con();
    let _: () = redis::cmd("SET")
        .arg("wsrelay:{broken}:meta")
        .arg("x")
        .query(&mut con)
        .unwrap();
    let mut sub = V1::connect(node.addr, None).unwrap();
    sub.subscribe("fine", None).unwrap();
    let mut p = V1::connect(node.addr, None).unwrap();
    // Sent without waiting, so they are queued, and packed, together.
    for i in 0..40 {
        let channel = if i % 2 == 0 { "fine" } else { "broken" };
        let cmd = serde_json::json!({"op": "publish", "channel": channel, "data": format!("m{i}"), "ref": i});
        p.send(&cmd).unwrap();
    }
    let mut replies = std::collections::HashMap::new();
    while replies.len() < 40 {
        let v = p.next(WAIT).unwrap();
        replies.insert(v["ref"].as_u64().unwrap(), v);
    }
    for i in 0..40u64 {
        let v = &replies[&i];
        if i % 2 == 0 {
            assert_eq!(
                (v["type"].as_str(), v["offset"].as_u64()),
                (Some("published"), Some(i / 2 + 1)),
                "{v}"
            );
        } else {
            assert_eq!(v["code"], "refused", "{v}");
            assert!(
                v["message"].as_str().unwrap_or_default().contains("WRONGTYPE"),
                "{v}"
            );
        }
    }
    for i in 0..20 {
        let m = sub.message(WAIT).unwrap();
        assert_eq!(m["data"], format!("m{}", 2 * i));
    }
    assert_eq!(node.metric("wsrelay_publish_refused_total"), 20);
}

/// A channel's epoch removed by someone else while its offset stays: the next publish starts a
/// new epoch, from offset 1, and a live subscriber gets every message of it (after a
/// `recovered: false` notice), none skipped.
#[test]
fn a_new_epoch_after_a_removed_one_starts_at_offset_one() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut p = V1::connect(node.addr, None).unwrap();
    for i in 0..3 {
        assert_eq!(p.publish("eg", &format!("pre{i}")).unwrap()["offset"], i + 1);
    }
    let mut sub = V1::connect(node.addr, None).unwrap();
    sub.subscribe("eg", None).unwrap();
    let _: () = redis::cmd("HDEL")
        .arg("wsrelay:{eg}:meta")
        .arg("epoch")
        .query(&mut redis.con())
        .unwrap();
    for i in 0..6u64 {
        let r = p.publish("eg", &format!("post{i}")).unwrap();
        assert_eq!(r["offset"], i + 1, "{r}");
    }
    assert_eq!(
        messages_after_new_epoch_notices(&mut sub, 6),
        (0..6).map(|i| format!("post{i}")).collect::<Vec<_>>()
    );
}

/// A channel's offset set back by someone else, below its stream's newest entry: the next
/// publish cannot be stored under it, so the history starts again under a new epoch, from
/// offset 1 (not refused, no offset skipped), and a live subscriber gets every message.
#[test]
fn an_offset_set_back_starts_a_new_epoch() {
    let (node, _redis) = tampered_history_starts_again("ob", |con| {
        let _: () = redis::cmd("HSET")
            .arg("wsrelay:{ob}:meta")
            .arg("offset")
            .arg(1)
            .query(con)
            .unwrap();
    });
    assert_eq!(node.metric("wsrelay_publish_refused_total"), 0);
}

/// A node and a channel with 3 messages and a live v1 subscriber; then `tamper` changes the
/// channel's keys in Redis, and 4 publishes must be stored under a new epoch from offset 1 and
/// reach the subscriber (after its `recovered: false` notice).
fn tampered_history_starts_again(
    channel: &str,
    tamper: impl FnOnce(&mut redis::Connection),
) -> (Node, Redis) {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut p = V1::connect(node.addr, None).unwrap();
    let mut epoch = serde_json::Value::Null;
    for i in 0..3 {
        epoch = p.publish(channel, &format!("pre{i}")).unwrap()["epoch"].clone();
    }
    let mut sub = V1::connect(node.addr, None).unwrap();
    sub.subscribe(channel, None).unwrap();
    tamper(&mut redis.con());
    for i in 0..4u64 {
        let r = p.publish(channel, &format!("post{i}")).unwrap();
        assert_eq!(
            (r["type"].as_str(), r["offset"].as_u64()),
            (Some("published"), Some(i + 1)),
            "{r}"
        );
        assert_ne!(r["epoch"], epoch, "{r}");
    }
    assert_eq!(
        messages_after_new_epoch_notices(&mut sub, 4),
        (0..4).map(|i| format!("post{i}")).collect::<Vec<_>>()
    );
    (node, redis)
}

/// The data of the next `n` messages, allowing `recovered: false` notices among them (a
/// history that started again under a live subscription).
fn messages_after_new_epoch_notices(sub: &mut V1, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = sub.next(WAIT).unwrap();
        match v["type"].as_str() {
            Some("subscribed") => assert_eq!(v["recovered"], false, "{v}"),
            Some("message") => got.push(v["data"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected {v}"),
        }
    }
    got
}

/// A channel's stream deleted by someone else (or evicted apart from its meta) while its meta
/// stays: what it held is gone, so the next publish starts a new epoch from offset 1, which a
/// live subscriber is told of and replays, and the new stream expires like the meta.
#[test]
fn a_lost_stream_starts_a_new_epoch_with_its_expiry() {
    let (_node, redis) = tampered_history_starts_again("z", |con| {
        let _: () = redis::cmd("DEL").arg("wsrelay:{z}:stream").query(con).unwrap();
    });
    let ttl: i64 = redis::cmd("TTL")
        .arg("wsrelay:{z}:stream")
        .query(&mut redis.con())
        .unwrap();
    assert!(ttl > 0, "the new stream has no expiry: {ttl}");
}
