//! The `wsrelay.v1` protocol, history, gapless recovery and sessions, end to end, in-process and
//! through a real Redis.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wsrelay_client::V1;

/// A node in-process (`None`) or on a fresh Redis, with extra flags.
fn node(redis: Option<&Redis>, extra: &[&str]) -> Node {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Some(r) = redis {
        args.extend(["--redis".to_owned(), r.url()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start(&args)
}

fn both_modes(test: impl Fn(Option<&Redis>)) {
    test(None);
    let redis = Redis::start();
    test(Some(&redis));
}

fn offset(v: &Value) -> u64 {
    v["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {v}"))
}

fn epoch(v: &Value) -> String {
    v["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {v}"))
        .to_owned()
}

/// Publishes `data` through a fresh v1 connection and returns its acknowledged offset.
fn publish(n: &Node, channel: &str, data: &str) -> u64 {
    let mut p = V1::connect(n.addr, None).unwrap();
    let ack = p.publish(channel, data).unwrap();
    assert_eq!(ack["type"], "published", "{ack}");
    offset(&ack)
}

#[test]
fn commands_acks_and_deliveries() {
    both_modes(|redis| {
        let n = node(redis, &["--max-channels-per-conn", "2"]);
        let mut c = V1::connect(n.addr, None).unwrap();
        assert_eq!(c.session.len(), 22);
        assert!(!c.resumed);
        let sub = c.subscribe("news", None).unwrap();
        assert_eq!(sub["type"], "subscribed");
        assert_eq!(sub["channel"], "news");
        assert_eq!(offset(&sub), 0);
        assert!(sub.get("recovered").is_none());
        let e = epoch(&sub);

        let ack = c.publish("news", "hello").unwrap();
        assert_eq!(
            (ack["type"].as_str(), offset(&ack), epoch(&ack)),
            (Some("published"), 1, e.clone())
        );
        let m = c.message(WAIT).unwrap();
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str(), offset(&m)),
            (Some("news"), Some("hello"), 1)
        );
        assert_eq!(epoch(&m), e);

        // Binary round trip, and raw clients of the channel see the same frames.
        let mut raw = n.client("/news");
        raw.sync("raw-ready", WAIT).unwrap();
        let m = c.message(WAIT).unwrap();
        assert_eq!(m["data"], "raw-ready");
        c.request(json!({"op":"publish","channel":"news","data_b64":"AAH/"}))
            .unwrap();
        assert_eq!(c.message(WAIT).unwrap()["data_b64"], "AAH/");
        assert_eq!(raw.recv(WAIT).unwrap(), Received::Binary(vec![0, 1, 255]));

        assert_eq!(c.request(json!({"op":"ping"})).unwrap()["type"], "pong");
        let unsub = c.request(json!({"op":"unsubscribe","channel":"news"})).unwrap();
        assert_eq!(unsub["type"], "unsubscribed");
        raw.sync("after-unsubscribe", WAIT).unwrap();
        // Nothing more arrives for the v1 client: the next frame is the pong to this ping.
        c.send(&json!({"op":"ping","ref":"last"})).unwrap();
        assert_eq!(c.next(WAIT).unwrap()["ref"], "last");
    });
}

#[test]
fn malformed_commands_get_errors_and_the_connection_stays_usable() {
    let n = node(None, &["--max-channels-per-conn", "2", "--max-channel-len", "12"]);
    let mut c = V1::connect(n.addr, None).unwrap();
    let code = |c: &mut V1, cmd: Value| {
        let r = c.request(cmd).unwrap();
        assert_eq!(r["type"], "error", "{r}");
        r["code"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        code(&mut c, json!({"op":"publsh","channel":"a","data":"x"})),
        "unknown_op"
    );
    assert_eq!(code(&mut c, json!({"channel":"a"})), "bad_request");
    assert_eq!(code(&mut c, json!({"op":"subscribe"})), "bad_request");
    assert_eq!(
        code(&mut c, json!({"op":"subscribe","channel":""})),
        "bad_channel"
    );
    assert_eq!(
        code(&mut c, json!({"op":"subscribe","channel":"much-too-long-name"})),
        "bad_channel"
    );
    assert_eq!(code(&mut c, json!({"op":"publish","channel":"a"})), "bad_request");
    assert_eq!(
        code(&mut c, json!({"op":"publish","channel":"a","data_b64":"%%"})),
        "bad_request"
    );
    assert_eq!(
        code(&mut c, json!({"op":"unsubscribe","channel":"a"})),
        "not_subscribed"
    );
    assert_eq!(c.subscribe("a", None).unwrap()["type"], "subscribed");
    assert_eq!(
        code(&mut c, json!({"op":"subscribe","channel":"a"})),
        "already_subscribed"
    );
    assert_eq!(c.subscribe("b", None).unwrap()["type"], "subscribed");
    assert_eq!(
        code(&mut c, json!({"op":"subscribe","channel":"c"})),
        "too_many_channels"
    );
    // Frames that are not commands at all.
    c.client.send_text("not json").unwrap();
    assert_eq!(c.next(WAIT).unwrap()["code"], "bad_json");
    c.client.send_text("[1,2,3]").unwrap();
    assert_eq!(c.next(WAIT).unwrap()["code"], "bad_json");
    c.client.send_binary(b"{\"op\":\"ping\"}").unwrap();
    assert_eq!(c.next(WAIT).unwrap()["code"], "bad_json");
    // Still fully usable.
    assert_eq!(c.publish("a", "still here").unwrap()["type"], "published");
    assert_eq!(c.message(WAIT).unwrap()["data"], "still here");
}

#[test]
fn reconnect_with_last_offset_gets_exactly_the_missed_messages() {
    both_modes(|redis| {
        let n = node(redis, &[]);
        let mut c = V1::connect(n.addr, None).unwrap();
        c.subscribe("room", None).unwrap();
        for i in 0..3 {
            publish(&n, "room", &format!("m{i}"));
        }
        let mut last = Value::Null;
        for i in 0..3 {
            last = c.message(WAIT).unwrap();
            assert_eq!(last["data"], format!("m{i}"));
        }
        let (off, ep) = (offset(&last), epoch(&last));
        c.client.close();

        for i in 3..10 {
            publish(&n, "room", &format!("m{i}"));
        }
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("room", Some((off, &ep))).unwrap();
        assert_eq!(sub["recovered"], true, "{sub}");
        assert_eq!(offset(&sub), 10);
        for i in 3..10 {
            let m = c.message(WAIT).unwrap();
            assert_eq!(
                (m["data"].as_str(), offset(&m)),
                (Some(format!("m{i}").as_str()), i as u64 + 1)
            );
        }
        // Then live, continuing the sequence.
        publish(&n, "room", "m10");
        let m = c.message(WAIT).unwrap();
        assert_eq!((m["data"].as_str(), offset(&m)), (Some("m10"), 11));
    });
}

#[test]
fn recovery_while_publishing_has_no_gap_and_no_duplicate() {
    both_modes(|redis| {
        let n = node(redis, &["--history-size", "100000", "--max-output", "67108864"]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = n.addr;
        let publisher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut p = V1::connect(addr, None).unwrap();
                let mut sent = 0u64;
                // Reads and drops acknowledgements up to the pong answering `ping`.
                let drain = |p: &mut V1, ping: u64| {
                    p.send(&json!({"op":"ping","ref":format!("p{ping}")})).unwrap();
                    while p.next(WAIT).unwrap()["ref"] != format!("p{ping}") {}
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sent += 1;
                    p.send(&json!({"op":"publish","channel":"busy","data":sent.to_string()}))
                        .unwrap();
                    if sent % 20 == 0 {
                        drain(&mut p, sent);
                        // Pace the publisher (about 10,000 messages/s at most) so a debug-build
                        // reader keeps up; this is rate control, not synchronisation.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                drain(&mut p, sent);
                sent
            })
        };
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("busy", None).unwrap();
        let mut last = offset(&sub);
        let mut ep = epoch(&sub);
        let mut seen = 0;
        for round in 0..6 {
            // Read a while, then drop the connection mid-stream and recover.
            for _ in 0..(50 + round * 37) {
                let m = c.message(WAIT).unwrap();
                assert_eq!(offset(&m), last + 1, "gap or duplicate in round {round}");
                assert_eq!(m["data"], offset(&m).to_string());
                last = offset(&m);
                ep = epoch(&m);
                seen += 1;
            }
            c.client.close();
            c = V1::connect(n.addr, None).unwrap();
            let sub = c.subscribe("busy", Some((last, &ep))).unwrap();
            assert_eq!(sub["recovered"], true, "{sub}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = publisher.join().unwrap();
        while last < sent {
            let m = c.message(WAIT).unwrap();
            assert_eq!(offset(&m), last + 1);
            last = offset(&m);
        }
        assert!(seen > 300);
    });
}

#[test]
fn trimmed_history_says_not_recovered() {
    both_modes(|redis| {
        let n = node(redis, &["--history-size", "5"]);
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("t", None).unwrap();
        let ep = epoch(&sub);
        c.client.close();
        // Redis trims the stream in whole nodes of 100 entries (MAXLEN ~), so it keeps
        // between 5 and about 105 messages: 210 are sure to trim the first ones.
        let mut p = V1::connect(n.addr, None).unwrap();
        for i in 0..210 {
            let ack = p.publish("t", &format!("{i}")).unwrap();
            assert_eq!(ack["type"], "published", "{ack}");
        }
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("t", Some((0, &ep))).unwrap();
        assert_eq!(sub["recovered"], false, "{sub}");
        assert_eq!(offset(&sub), 210);
        // No partial replay: the next message is the next live one.
        publish(&n, "t", "live");
        let m = c.message(WAIT).unwrap();
        assert_eq!((m["data"].as_str(), offset(&m)), (Some("live"), 211));
        // Within the window, recovery works.
        let mut c2 = V1::connect(n.addr, None).unwrap();
        assert_eq!(c2.subscribe("t", Some((208, &ep))).unwrap()["recovered"], true);
        assert_eq!(offset(&c2.message(WAIT).unwrap()), 209);
        // The subscribe from offset 0 only; the one within the window recovered.
        assert_eq!(n.metric("wsrelay_recovery_failed_total"), 1);
    });
}

#[test]
fn redis_losing_its_data_changes_the_epoch() {
    let mut redis = Redis::start();
    let n = node(Some(&redis), &["--redis-backoff-max", "300ms"]);
    let mut c = V1::connect(n.addr, None).unwrap();
    c.subscribe("e", None).unwrap();
    publish(&n, "e", "one");
    let m = c.message(WAIT).unwrap();
    let (off, ep) = (offset(&m), epoch(&m));
    c.client.close();

    // FLUSHALL: the history is gone.
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.con()).unwrap();
    publish(&n, "e", "after flush");
    let mut c = V1::connect(n.addr, None).unwrap();
    let sub = c.subscribe("e", Some((off, &ep))).unwrap();
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_ne!(epoch(&sub), ep);

    // A restart (no persistence) likewise; the publish script is loaded again (NOSCRIPT).
    let e2 = epoch(&sub);
    c.client.close();
    redis.kill();
    redis.restart();
    wait_for("subscriber back", WAIT, || {
        (n.http_get("/healthz").0 == 200).then_some(())
    });
    wait_for("wsrelay publishing through the restarted redis", WAIT, || {
        let mut p = V1::connect(n.addr, None).ok()?;
        let ack = p.publish("e", "after restart").ok()?;
        (ack["type"] == "published").then_some(())
    });
    let mut c = V1::connect(n.addr, None).unwrap();
    let sub = c.subscribe("e", Some((1, &e2))).unwrap();
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_ne!(epoch(&sub), e2);
}

#[test]
fn script_flush_is_survived() {
    let redis = Redis::start();
    let n = node(Some(&redis), &[]);
    publish(&n, "s", "before");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut redis.con()).unwrap();
    let mut c = V1::connect(n.addr, None).unwrap();
    c.subscribe("s", None).unwrap();
    assert_eq!(offset(&c.publish("s", "after").unwrap()), 2);
    assert_eq!(c.message(WAIT).unwrap()["data"], "after");
}

/// The offset Redis has stored for `channel` in session `id` (written by the node).
fn stored_offset(redis: &Redis, id: &str, channel: &str) -> Option<u64> {
    let v: Option<String> = redis::cmd("HGET")
        .arg(format!("wsrelay:session:{id}"))
        .arg(format!("c:{channel}"))
        .query(&mut redis.con())
        .ok()?;
    v?.split(' ').next()?.parse().ok()
}

#[test]
fn session_resumes_on_another_node_after_sigkill() {
    let redis = Redis::start();
    let mut a = node(Some(&redis), &["--session-flush", "100ms"]);
    let b = node(Some(&redis), &["--session-flush", "100ms"]);
    let mut c = V1::connect(a.addr, None).unwrap();
    let id = c.session.clone();
    c.subscribe("s", None).unwrap();
    for i in 1..=5 {
        publish(&b, "s", &format!("{i}"));
        assert_eq!(c.message(WAIT).unwrap()["data"], i.to_string());
    }
    // The session's offsets reach Redis by themselves (no clean disconnect).
    wait_for("session flushed", WAIT, || {
        (stored_offset(&redis, &id, "s")? == 5).then_some(())
    });
    a.kill();
    for i in 6..=9 {
        publish(&b, "s", &format!("{i}"));
    }
    let mut c = V1::connect(b.addr, Some(&id)).unwrap();
    assert!(c.resumed);
    assert_eq!(c.session, id);
    let sub = c.next(WAIT).unwrap();
    assert_eq!(
        (sub["type"].as_str(), sub["channel"].as_str()),
        (Some("subscribed"), Some("s"))
    );
    assert_eq!(sub["recovered"], true, "{sub}");
    for i in 6..=9 {
        let m = c.message(WAIT).unwrap();
        assert_eq!(m["data"], i.to_string());
    }
    publish(&b, "s", "10");
    assert_eq!(c.message(WAIT).unwrap()["data"], "10");
}

#[test]
fn raw_clients_resume_with_their_own_session_id() {
    both_modes(|redis| {
        let n = node(redis, &[]);
        let mut c = Client::connect(n.addr, "/raw-room?session=my-session-1").unwrap();
        c.sync("hello", WAIT).unwrap();
        c.close();
        for i in 0..3 {
            publish(&n, "raw-room", &format!("missed-{i}"));
        }
        let mut c = Client::connect(n.addr, "/raw-room?session=my-session-1").unwrap();
        for i in 0..3 {
            assert_eq!(c.recv_text(WAIT).unwrap(), format!("missed-{i}"));
        }
        c.sync("live again", WAIT).unwrap();
        // An invalid id is refused at the handshake.
        assert!(Client::connect(n.addr, "/raw-room?session=bad id").is_err());
    });
}

#[test]
fn sessions_expire_after_their_ttl() {
    both_modes(|redis| {
        let n = node(redis, &["--session-ttl", "1s"]);
        let mut c = V1::connect(n.addr, None).unwrap();
        let id = c.session.clone();
        c.subscribe("x", None).unwrap();
        c.client.close();
        // Resumable right away (closing again restarts the TTL)...
        let c2 = V1::connect(n.addr, Some(&id)).unwrap();
        assert!(c2.resumed);
        c2.client.close();
        // ...and not once the TTL has passed. The wait is the behaviour under test: time.
        std::thread::sleep(Duration::from_millis(2200));
        if let Some(r) = redis {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("wsrelay:session:{id}"))
                .query(&mut r.con())
                .unwrap();
            assert!(!exists, "session key still in redis");
        }
        let c3 = V1::connect(n.addr, Some(&id)).unwrap();
        assert!(!c3.resumed);
    });
}

#[test]
fn expired_history_says_not_recovered() {
    both_modes(|redis| {
        let n = node(redis, &["--history-ttl", "1s"]);
        let mut c = V1::connect(n.addr, None).unwrap();
        c.subscribe("ttl", None).unwrap();
        publish(&n, "ttl", "one");
        let m = c.message(WAIT).unwrap();
        let (off, ep) = (offset(&m), epoch(&m));
        c.client.close();
        // The time to live is the behaviour under test: wait it out.
        std::thread::sleep(Duration::from_millis(2200));
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("ttl", Some((off, &ep))).unwrap();
        assert_eq!(sub["recovered"], false, "{sub}");
        assert_ne!(epoch(&sub), ep);
    });
}

#[test]
fn a_subscribe_undone_at_once_still_gets_its_reply() {
    both_modes(|redis| {
        let n = node(redis, &[]);
        let mut c = V1::connect(n.addr, None).unwrap();
        // Both commands in one write: the server reads them in the same turn, before the
        // channel's subscription can take effect.
        {
            use tungstenite::Message;
            let ws = c.client.inner();
            for cmd in [
                json!({"op":"subscribe","channel":"flip","ref":1}),
                json!({"op":"unsubscribe","channel":"flip","ref":2}),
                json!({"op":"ping","ref":3}),
            ] {
                ws.write(Message::text(cmd.to_string())).unwrap();
            }
            ws.flush().unwrap();
        }
        let mut replies = Vec::new();
        loop {
            let v = c.next(WAIT).unwrap();
            let done = v["ref"] == 3;
            replies.push(v);
            if done {
                break;
            }
        }
        let of = |r: i64| -> Vec<&Value> { replies.iter().filter(|v| v["ref"] == r).collect() };
        assert_eq!(of(1).len(), 1, "{replies:?}");
        assert_eq!(
            (of(1)[0]["type"].as_str(), of(1)[0]["code"].as_str()),
            (Some("error"), Some("cancelled"))
        );
        assert_eq!(of(2).len(), 1, "{replies:?}");
        assert_eq!(of(2)[0]["type"], "unsubscribed");
        assert_eq!(replies.len(), 3, "{replies:?}");
        // Nothing of it is left behind: subscribing again works as usual.
        assert_eq!(c.subscribe("flip", None).unwrap()["type"], "subscribed");
        publish(&n, "flip", "hello");
        assert_eq!(c.message(WAIT).unwrap()["data"], "hello");
    });
}

#[test]
fn the_client_offers_the_protocol_name_the_server_accepts() {
    assert_eq!(wsrelay_client::PROTOCOL, wsrelay::envelope::PROTOCOL);
}

/// A subscription's history read is still under way when the client unsubscribes and
/// subscribes again: the first read's answer belongs to the cancelled subscription, and only
/// the new read's answer settles the new one (here: recovering from a later offset).
#[test]
fn an_answer_to_a_cancelled_subscription_does_not_settle_the_next() {
    let redis = Redis::start();
    let n = node(Some(&redis), &["--threads", "1"]);
    let mut first = 0;
    for i in 1..=20 {
        let at = publish(&n, "reread", &format!("m{i}"));
        if i == 1 {
            first = at;
        }
    }
    let mut p = V1::connect(n.addr, None).unwrap();
    let ack = p.publish("reread", "m21").unwrap();
    let (top, ep) = (offset(&ack), epoch(&ack));
    assert_eq!(top, first + 20);
    // Another client keeps the channel live on the (only) loop, so both subscriptions go
    // straight to their history reads.
    let mut watcher = V1::connect(n.addr, None).unwrap();
    assert_eq!(watcher.subscribe("reread", None).unwrap()["type"], "subscribed");
    // Redis answers nothing while stopped: both reads wait, in order.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    let mut c = V1::connect(n.addr, None).unwrap();
    for cmd in [
        json!({"op":"subscribe","channel":"reread","offset":0,"epoch":ep,"ref":1}),
        json!({"op":"unsubscribe","channel":"reread","ref":2}),
        json!({"op":"subscribe","channel":"reread","offset":top - 3,"epoch":ep,"ref":3}),
        json!({"op":"ping","ref":4}),
    ] {
        c.send(&cmd).unwrap();
    }
    let mut replies = Vec::new();
    while replies.last().is_none_or(|v: &Value| v["ref"] != 4) {
        replies.push(c.next(WAIT).unwrap());
    }
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    let codes: Vec<_> = replies
        .iter()
        .map(|v| (v["ref"].clone(), v["type"].clone()))
        .collect();
    assert_eq!(
        codes,
        [
            (json!(1), json!("error")),
            (json!(2), json!("unsubscribed")),
            (json!(4), json!("pong"))
        ],
        "{replies:?}"
    );
    let subscribed = c.next(WAIT).unwrap();
    assert_eq!(subscribed["ref"], 3, "{subscribed}");
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    for want in top - 2..=top {
        let m = c.message(WAIT).unwrap();
        assert_eq!(offset(&m), want, "{m}");
    }
    let after = publish(&n, "reread", "after");
    assert_eq!(offset(&c.message(WAIT).unwrap()), after);
}

/// Several channels recovering on one connection, each replay longer than one page: every
/// channel gets `recovered: true` and all its messages once, with no second `subscribed`.
#[test]
fn several_long_recoveries_on_one_connection_all_complete() {
    both_modes(|redis| {
        let n = node(redis, &["--threads", "1", "--history-size", "2000"]);
        let channels = ["pages0", "pages1", "pages2", "pages3"];
        let mut p = V1::connect(n.addr, None).unwrap();
        let mut epochs = Vec::new();
        for ch in channels {
            let mut last = Value::Null;
            for round in 0..3 {
                let cmds: Vec<_> = (0..200)
                    .map(|i| json!({"op":"publish","channel":ch,"data":format!("{ch}-{}", round * 200 + i),"ref":i}))
                    .collect();
                for cmd in &cmds {
                    p.send(cmd).unwrap();
                }
                for _ in &cmds {
                    last = p.next(WAIT).unwrap();
                    assert_eq!(last["type"], "published", "{last}");
                }
            }
            assert_eq!(offset(&last), 600);
            epochs.push(epoch(&last));
        }
        let mut c = V1::connect(n.addr, None).unwrap();
        for (i, ch) in channels.iter().enumerate() {
            c.send(&json!({"op":"subscribe","channel":ch,"offset":0,"epoch":epochs[i],"ref":i}))
                .unwrap();
        }
        let mut next = [1u64; 4];
        let mut replies = 0;
        while next.iter().any(|&o| o <= 600) {
            let v = c.next(WAIT).unwrap();
            let i = channels.iter().position(|ch| v["channel"] == *ch).unwrap();
            match v["type"].as_str() {
                Some("subscribed") => {
                    assert_eq!(v["recovered"], true, "{v}");
                    replies += 1;
                }
                Some("message") => {
                    assert_eq!(offset(&v), next[i], "{v}");
                    next[i] += 1;
                }
                _ => panic!("unexpected {v}"),
            }
        }
        assert_eq!(replies, channels.len());
        // Nothing more follows: a ping's pong is next.
        c.send(&json!({"op":"ping","ref":"end"})).unwrap();
        let v = c.next(WAIT).unwrap();
        assert_eq!(v["type"], "pong", "{v}");
    });
}
