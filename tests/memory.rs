//! The in-process broker's stores are bounded in bytes, whatever clients publish or however
//! many sessions they open, and one client creating channels by the thousand cannot push out
//! the history of someone else's channel.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::json;

/// Sends `cmds` without waiting, then reads one reply per command.
fn pipelined(c: &mut V1, cmds: &[serde_json::Value]) {
    {
        let ws = c.client.inner();
        for cmd in cmds {
            ws.write(tungstenite::Message::text(cmd.to_string())).unwrap();
        }
        ws.flush().unwrap();
    }
    for _ in cmds {
        let v = c.next(WAIT).unwrap();
        assert!(v["type"] != "error", "{v}");
    }
}

#[test]
fn history_memory_is_bounded_in_bytes() {
    let n = Node::start(&["--history-memory", "33554432"]);
    let mut p = V1::connect(n.addr, None).unwrap();
    p.publish("warm-up", "x").unwrap();
    let before = rss_kib(n.pid());
    // 1,000 messages of 65 KB (65 MB, each held in its frame) over 20 channels.
    let body = "h".repeat(65_000);
    for round in 0..10 {
        let cmds: Vec<_> = (0..100)
            .map(|i| json!({"op":"publish","channel":format!("ch{}", (round * 100 + i) % 20),"data":body,"ref":i}))
            .collect();
        pipelined(&mut p, &cmds);
    }
    let grown = rss_kib(n.pid()).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB with a 32 MiB history cap"
    );
    wait_for("evictions counted", WAIT, || {
        (n.metric("wsrelay_store_evictions_total") > 0).then_some(())
    });
}

/// A v1 client whose connection comes from `ip` (any address of 127.0.0.0/8).
fn v1_from(ip: &str, addr: SocketAddr) -> V1 {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{ip}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&addr.into()).unwrap();
    let client = Client::handshake(sock.into(), addr, "/", Some("wsrelay.v1")).unwrap();
    V1::from_client(client).unwrap()
}

#[test]
fn a_client_flooding_new_channels_cannot_wipe_someone_elses_history() {
    let n = Node::start(&["--max-history-channels", "1000"]);
    let mut alice = V1::connect(n.addr, None).unwrap();
    let sub = alice.subscribe("legit", None).unwrap();
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    assert_eq!(alice.publish("legit", "one").unwrap()["offset"], 1);
    assert_eq!(alice.message(WAIT).unwrap()["data"], "one");
    // Alice goes offline; nobody is on her channel while she is away.
    alice.client.close();
    // Another client creates 5,000 channels (five times the cap) by publishing one byte each.
    let mut flooder = v1_from("127.0.0.2", n.addr);
    for round in 0..50 {
        let cmds: Vec<_> = (0..100)
            .map(|i| json!({"op":"publish","channel":format!("junk{}", round * 100 + i),"data":"x","ref":i}))
            .collect();
        pipelined(&mut flooder, &cmds);
    }
    // The broker publishes its eviction count once a second.
    wait_for("evictions counted", WAIT, || {
        (n.metric("wsrelay_store_evictions_total") >= 4000).then_some(())
    });
    let mut bob = V1::connect(n.addr, None).unwrap();
    assert_eq!(bob.publish("legit", "two").unwrap()["offset"], 2);
    // Alice comes back: her channel's history is whole.
    let mut alice = V1::connect(n.addr, None).unwrap();
    let sub = alice.subscribe("legit", Some((1, &epoch))).unwrap();
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(alice.message(WAIT).unwrap()["data"], "two");
}

/// The flooder even created the channel: what protects it is the session of the client
/// waiting to come back to it.
#[test]
fn a_flooder_that_created_a_channel_cannot_wipe_the_history_an_offline_session_waits_for() {
    let n = Node::start(&["--max-history-channels", "1000"]);
    let mut flooder = v1_from("127.0.0.2", n.addr);
    assert_eq!(flooder.publish("legit", "zero").unwrap()["offset"], 1);
    let mut alice = V1::connect(n.addr, None).unwrap();
    alice.subscribe("legit", None).unwrap();
    assert_eq!(flooder.publish("legit", "one").unwrap()["offset"], 2);
    assert_eq!(alice.message(WAIT).unwrap()["data"], "one");
    let session = alice.session.clone();
    alice.client.close();
    for round in 0..30 {
        let cmds: Vec<_> = (0..100)
            .map(|i| json!({"op":"publish","channel":format!("junk{}", round * 100 + i),"data":"x","ref":i}))
            .collect();
        pipelined(&mut flooder, &cmds);
    }
    assert!(n.metric("wsrelay_store_evictions_total") >= 2000);
    let mut bob = V1::connect(n.addr, None).unwrap();
    assert_eq!(bob.publish("legit", "two").unwrap()["offset"], 3);
    // Alice comes back through her session: nothing is missing.
    let mut alice = V1::connect(n.addr, Some(&session)).unwrap();
    assert!(alice.resumed);
    let sub = alice.next(WAIT).unwrap();
    assert_eq!(
        (sub["type"].as_str(), sub["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{sub}"
    );
    assert_eq!(alice.message(WAIT).unwrap()["data"], "two");
}

#[test]
fn sessions_are_bounded_in_bytes() {
    // 4 MiB of sessions; each below is about 128 × (200 + 48) bytes ≈ 32 KiB: ~130 fit.
    let n = Node::start(&["--session-memory", "4194304"]);
    let mut ids = Vec::new();
    for s in 0..200 {
        let mut c = V1::connect(n.addr, None).unwrap();
        let cmds: Vec<_> = (0..128)
            .map(|i| json!({"op":"subscribe","channel":format!("{s:03}-{i:0>196}"),"ref":i}))
            .collect();
        pipelined(&mut c, &cmds);
        ids.push(c.session.clone());
        c.client.close();
    }
    // The oldest sessions went to keep the cap; the newest are there.
    assert!(!V1::connect(n.addr, Some(&ids[0])).unwrap().resumed);
    // Counted by the time a client can see it: the eviction came before the failed resume.
    assert!(n.metric("wsrelay_store_evictions_total") > 0);
    assert!(V1::connect(n.addr, Some(&ids[199])).unwrap().resumed);
    wait_for("evictions counted", WAIT, || {
        (n.metric("wsrelay_store_evictions_total") >= 50).then_some(())
    });
}

#[test]
fn memory_returns_to_the_system_after_a_burst() {
    let n = Node::start(&["--history-ttl", "1s", "--threads", "1"]);
    let mut p = V1::connect(n.addr, None).unwrap();
    p.publish("warm-up", "x").unwrap();
    let before = rss_kib(n.pid());
    // About 120 MB held as history for a moment (each message in its frame).
    let body = "m".repeat(60_000);
    for round in 0..20 {
        let cmds: Vec<_> = (0..100)
            .map(|i| json!({"op":"publish","channel":format!("burst{}", (round * 100 + i) % 20),"data":body,"ref":i}))
            .collect();
        pipelined(&mut p, &cmds);
    }
    let peak = rss_kib(n.pid());
    assert!(
        peak > before + 64 * 1024,
        "the burst did not show: {before} -> {peak} KiB"
    );
    p.client.close();
    // The history expires after a second, and freed memory goes back within a few more: the
    // wait is the behaviour under test.
    wait_for(
        "RSS back near where it started",
        std::time::Duration::from_secs(20),
        || (rss_kib(n.pid()) < before + 16 * 1024).then_some(()),
    );
}

/// Milliseconds to live of a Redis key (-2 when it does not exist).
fn pttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(&mut redis.con()).unwrap()
}

#[test]
fn subscribing_alone_leaves_nothing_in_redis_for_long() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url()]);
    let mut c = V1::connect(n.addr, None).unwrap();
    // A client walks through channels nobody publishes to.
    for round in 0..5 {
        let subs: Vec<_> = (0..100)
            .map(|i| json!({"op":"subscribe","channel":format!("walk{}", round * 100 + i),"ref":i}))
            .collect();
        pipelined(&mut c, &subs);
        let unsubs: Vec<_> = (0..100)
            .map(|i| json!({"op":"unsubscribe","channel":format!("walk{}", round * 100 + i),"ref":i}))
            .collect();
        pipelined(&mut c, &unsubs);
    }
    // Each channel's epoch was fixed in Redis, for a minute only (not --history-ttl's 10).
    for i in [0, 250, 499] {
        let ms = pttl(&redis, &format!("wsrelay:{{walk{i}}}:meta"));
        assert!((1..=60_000).contains(&ms), "walk{i}: PTTL {ms} ms");
    }
    // A publish makes a history that lasts --history-ttl.
    assert_eq!(c.publish("walk7", "now it has history").unwrap()["offset"], 1);
    assert!(pttl(&redis, "wsrelay:{walk7}:meta") > 60_000);
}

#[test]
fn a_quiet_channel_whose_epoch_expired_goes_on_without_a_notice() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url(), "--history-ttl", "1s"]);
    let mut c = V1::connect(n.addr, None).unwrap();
    let sub = c.subscribe("quiet", None).unwrap();
    assert_eq!(sub["offset"], 0, "{sub}");
    // Nothing is published until the channel's epoch has expired: the wait is the behaviour
    // under test.
    wait_for("the epoch to expire", std::time::Duration::from_secs(10), || {
        (pttl(&redis, "wsrelay:{quiet}:meta") == -2).then_some(())
    });
    let mut p = V1::connect(n.addr, None).unwrap();
    assert_eq!(p.publish("quiet", "first").unwrap()["offset"], 1);
    // The subscriber had nothing to miss: the message comes, no recovered:false before it.
    let m = c.next(WAIT).unwrap();
    assert_eq!(
        (m["type"].as_str(), m["data"].as_str()),
        (Some("message"), Some("first")),
        "{m}"
    );
    assert_eq!(n.metric("wsrelay_recovery_failed_total"), 0);
}

/// A stream entry as XRANGE returns it: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// Payload bytes of the messages Redis holds for `channel`, and how many there are.
fn stored(redis: &Redis, channel: &str) -> (usize, usize) {
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(format!("wsrelay:{{{channel}}}:stream"))
        .arg("-")
        .arg("+")
        .query(&mut redis.con())
        .unwrap();
    let bytes = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter().filter(|(f, _)| f == "d").map(|(_, d)| d.len()))
        .sum();
    (bytes, entries.len())
}

#[test]
fn a_channels_history_in_redis_is_bounded_in_bytes() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url(), "--history-channel-memory", "1048576"]);
    let mut p = V1::connect(n.addr, None).unwrap();
    // 200 messages of 60 KB: 12 MB, well within --history-size (1,000) by count.
    let body = "b".repeat(60_000);
    for round in 0..4 {
        let cmds: Vec<_> = (0..50)
            .map(|i| json!({"op":"publish","channel":"big","data":body,"ref":round * 50 + i}))
            .collect();
        pipelined(&mut p, &cmds);
    }
    let (bytes, count) = stored(&redis, "big");
    assert!(bytes <= (1 << 20) + 60_000, "{bytes} bytes in {count} messages");
    assert!(count >= 8, "only {count} messages kept");
    // What is kept is the newest: a recovery from just before the last few replays them.
    let mut c = V1::connect(n.addr, None).unwrap();
    let last = p.publish("big", "last").unwrap();
    let top = last["offset"].as_u64().unwrap();
    let ep = last["epoch"].as_str().unwrap();
    let sub = c.subscribe("big", Some((top - 5, ep))).unwrap();
    assert_eq!(sub["recovered"], true, "{sub}");
    for want in top - 4..=top {
        assert_eq!(c.message(WAIT).unwrap()["offset"], want);
    }
    // Small messages are bounded by count as before, and none of it counts against them.
    for round in 0..3 {
        let cmds: Vec<_> = (0..500)
            .map(|i| json!({"op":"publish","channel":"big","data":"s","ref":round * 500 + i}))
            .collect();
        pipelined(&mut p, &cmds);
    }
    let (bytes, count) = stored(&redis, "big");
    assert!((1000..=1164).contains(&count), "{count} messages, {bytes} bytes");
}

#[test]
fn a_history_byte_count_that_redis_lost_track_of_does_not_empty_the_history() {
    let redis = Redis::start();
    let n = Node::start(&["--redis", &redis.url(), "--history-channel-memory", "1048576"]);
    let mut p = V1::connect(n.addr, None).unwrap();
    let body = "b".repeat(60_000);
    let cmds: Vec<_> = (0..40)
        .map(|i| json!({"op":"publish","channel":"lost","data":body,"ref":i}))
        .collect();
    pipelined(&mut p, &cmds);
    // Someone removes the stored messages (eviction, a script): the count of their bytes in
    // the channel's meta is now wrong.
    let _: () = redis::cmd("DEL")
        .arg("wsrelay:{lost}:stream")
        .query(&mut redis.con())
        .unwrap();
    let cmds: Vec<_> = (0..5)
        .map(|i| json!({"op":"publish","channel":"lost","data":body,"ref":i}))
        .collect();
    pipelined(&mut p, &cmds);
    assert_eq!(stored(&redis, "lost").1, 5);
}

#[test]
fn a_session_evicted_is_counted_before_its_client_can_tell() {
    let n = Node::start(&["--max-sessions", "20"]);
    let mut victim = V1::connect(n.addr, None).unwrap();
    victim.subscribe("mine", None).unwrap();
    let id = victim.session.clone();
    victim.client.close();
    for i in 0..40 {
        let mut c = V1::connect(n.addr, None).unwrap();
        c.subscribe(&format!("other{i}"), None).unwrap();
        c.client.close();
    }
    let back = V1::connect(n.addr, Some(&id)).unwrap();
    assert!(!back.resumed);
    assert!(n.metric("wsrelay_store_evictions_total") > 0);
}
