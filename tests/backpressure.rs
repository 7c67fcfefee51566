//! Slow consumers: a client that reads is never closed because one burst, one large message or
//! one replay was large; a client that does not read is closed (1008), and the server's memory
//! stays bounded. Connections are judged after their socket was tried, against a hard limit, a
//! soft limit with a grace period, and a per-loop budget.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::json;

fn node(redis: Option<&Redis>, extra: &[&str]) -> Node {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Some(r) = redis {
        args.extend(["--redis".to_owned(), r.url()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start(&args)
}

/// Sends every command before reading any reply (a burst), then waits for every ack.
fn publish_burst(p: &mut V1, channel: &str, bodies: &[String]) {
    {
        let ws = p.client.inner();
        for (i, b) in bodies.iter().enumerate() {
            let cmd = json!({"op":"publish","channel":channel,"data":b,"ref":i});
            ws.write(tungstenite::Message::text(cmd.to_string())).unwrap();
        }
        ws.flush().unwrap();
    }
    for _ in bodies {
        let v = p.next(WAIT).unwrap();
        assert_eq!(v["type"], "published", "{v}");
    }
}

#[test]
fn readers_are_not_closed_for_a_burst_of_large_messages() {
    for (redis, subscribers, burst) in [(None, 20, 8), (Some(Redis::start()), 10, 16)] {
        let n = node(redis.as_ref(), &[]);
        let mut subs: Vec<V1> = (0..subscribers)
            .map(|_| {
                let mut c = V1::connect(n.addr, None).unwrap();
                c.subscribe("burst", None).unwrap();
                c
            })
            .collect();
        let bodies: Vec<String> = (0..burst)
            .map(|i| format!("{i:03}{}", "b".repeat(65_000)))
            .collect();
        let mut p = V1::connect(n.addr, None).unwrap();
        publish_burst(&mut p, "burst", &bodies);
        for (k, c) in subs.iter_mut().enumerate() {
            for b in &bodies {
                let m = c.message(WAIT).unwrap_or_else(|e| panic!("subscriber {k}: {e}"));
                assert_eq!(m["data"].as_str(), Some(b.as_str()));
            }
        }
        assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), 0);
    }
}

#[test]
fn a_message_whose_envelope_is_six_times_larger_reaches_readers() {
    let n = node(None, &[]);
    let mut subs: Vec<V1> = (0..5)
        .map(|_| {
            let mut c = V1::connect(n.addr, None).unwrap();
            c.subscribe("esc", None).unwrap();
            c
        })
        .collect();
    // JSON escapes U+0001 as \u0001: 44,000 bytes become a 264 KB envelope.
    let text = "\u{1}".repeat(44_000);
    let mut raw = n.client("/esc");
    raw.send_text(&text).unwrap();
    for c in &mut subs {
        assert_eq!(c.message(WAIT).unwrap()["data"].as_str(), Some(text.as_str()));
    }
    assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), 0);
}

#[test]
fn a_large_replay_is_not_followed_by_a_close() {
    let n = node(None, &[]);
    let mut c = V1::connect(n.addr, None).unwrap();
    let sub = c.subscribe("replay", None).unwrap();
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    c.client.close();
    let bodies: Vec<String> = (0..600).map(|i| format!("{i:04}{}", "r".repeat(1000))).collect();
    let mut p = V1::connect(n.addr, None).unwrap();
    for chunk in bodies.chunks(100) {
        publish_burst(&mut p, "replay", chunk);
    }
    // 600 KB of replay, more than the old 256 KiB cap.
    let mut c = V1::connect(n.addr, None).unwrap();
    let sub = c.subscribe("replay", Some((0, &epoch))).unwrap();
    assert_eq!(sub["recovered"], true, "{sub}");
    for b in &bodies {
        assert_eq!(c.message(WAIT).unwrap()["data"].as_str(), Some(b.as_str()));
    }
    assert_eq!(c.publish("replay", "after").unwrap()["type"], "published");
    assert_eq!(c.message(WAIT).unwrap()["data"], "after");
    assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), 0);
}

/// A client frame (masked, key 0: the payload is sent as it is).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn the_reader_gets_everything_and_only_the_one_that_never_reads_is_closed() {
    let n = node(
        None,
        &[
            "--threads",
            "1",
            "--max-output",
            "4194304",
            "--soft-output",
            "262144",
            "--soft-output-grace",
            "2s",
            "--close-timeout",
            "60s",
        ],
    );
    let before = rss_kib(n.pid());
    // Never reads, with a tiny receive window.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&n.addr.into()).unwrap();
    let mut never = Client::handshake(sock.into(), n.addr, "/room", None).unwrap();
    never.sync("never ready", WAIT).unwrap();
    let mut reader = n.client("/room");
    reader.sync("reader ready", WAIT).unwrap();

    // The publisher writes 20,000 × 1 KiB as fast as it can; a second thread drains what the
    // server sends it (its own messages come back), so it is a reader too.
    let total = 20_000;
    let mut publisher = n.client("/room");
    publisher.sync("publisher ready", WAIT).unwrap();
    let mut out = publisher.inner().get_ref().try_clone().unwrap();
    let mut drain = out.try_clone().unwrap();
    let drainer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        drain.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
    });
    let writer = std::thread::spawn(move || {
        for i in 0..total {
            let body = format!("{i:05}{}", "p".repeat(1019));
            out.write_all(&text_frame(body.as_bytes())).unwrap();
        }
    });
    assert_eq!(reader.recv_text(WAIT).unwrap(), "publisher ready");
    for i in 0..total {
        let t = reader.recv_text(Duration::from_secs(30)).unwrap();
        assert_eq!(
            t[..5].parse::<usize>().unwrap(),
            i,
            "the reader lost or reordered messages"
        );
    }
    writer.join().unwrap();
    // The one that never reads was closed (it holds at most its window of the stream).
    let mut got = 0;
    let closed = loop {
        match never.recv(WAIT).unwrap() {
            Received::Closed(f) => break f,
            _ => got += 1,
        }
    };
    assert_eq!(closed.map(|f| f.0), Some(1008));
    assert!(got < total, "never-reader got everything");
    assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), 1);
    let after = rss_kib(n.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    publisher
        .inner()
        .get_ref()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drainer.join().unwrap();
}

/// A raw client on `path` with a tiny receive window that does not read until told.
fn stalled_client(n: &Node, path: &str) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&n.addr.into()).unwrap();
    let mut c = Client::handshake(sock.into(), n.addr, path, None).unwrap();
    c.sync("ready", WAIT).unwrap();
    c
}

/// Reads until the close frame; returns its code.
fn close_code(c: &mut Client) -> Option<u16> {
    loop {
        match c.recv(WAIT) {
            Ok(Received::Closed(f)) => return f.map(|f| f.0),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn staying_over_the_soft_limit_past_the_grace_period_closes() {
    let n = node(
        None,
        &[
            "--socket-send-buffer",
            "4096",
            "--soft-output",
            "65536",
            "--soft-output-grace",
            "1s",
            "--close-timeout",
            "30s",
        ],
    );
    let mut stalled = stalled_client(&n, "/soft");
    // 300 KB once: over the soft limit, far under the hard one, and then nothing more.
    let mut p = V1::connect(n.addr, None).unwrap();
    let bodies: Vec<String> = (0..30).map(|i| format!("{i:02}{}", "s".repeat(10_000))).collect();
    publish_burst(&mut p, "soft", &bodies);
    // Closed by the grace period running out (the wait is the behaviour under test), after
    // everything queued before it.
    wait_for("the slow-consumer close", Duration::from_secs(10), || {
        (n.metric("wsrelay_slow_consumer_closes_total") == 1).then_some(())
    });
    assert_eq!(close_code(&mut stalled), Some(1008));
    assert!(n.log().iter().any(|l| l.contains("--soft-output-grace")));
}

#[test]
fn the_loop_budget_drops_the_largest_holders_first() {
    let n = node(
        None,
        &[
            "--threads",
            "1",
            "--socket-send-buffer",
            "4096",
            "--loop-output-budget",
            "700000",
        ],
    );
    let mut big: Vec<Client> = (0..2).map(|_| stalled_client(&n, "/big")).collect();
    let mut small = stalled_client(&n, "/small");
    let mut p = V1::connect(n.addr, None).unwrap();
    publish_burst(&mut p, "small", &["x".repeat(60_000)]);
    // 2 × 700 KB on top of 60 KB: over the budget until both big holders are gone.
    let bodies: Vec<String> = (0..70).map(|i| format!("{i:02}{}", "b".repeat(10_000))).collect();
    publish_burst(&mut p, "big", &bodies);
    wait_for("the budget to drop both big holders", WAIT, || {
        (n.metric("wsrelay_slow_consumer_closes_total") == 2).then_some(())
    });
    // Their output was dropped with them: no close frame, the connection just ends.
    for c in &mut big {
        let end = loop {
            match c.recv(WAIT) {
                Ok(Received::Closed(f)) => break f.map(|f| f.0),
                Ok(_) => {}
                Err(e) if e.to_string().contains("reset") => break None,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(end, None);
    }
    assert!(n.log().iter().any(|l| l.contains("--loop-output-budget")));
    // The small holder keeps everything it was sent.
    assert_eq!(small.recv_text(WAIT).unwrap().len(), 60_000);
    small.sync("still here", WAIT).unwrap();
}

#[test]
fn a_replay_larger_than_the_hard_limit_reaches_a_reading_client() {
    let redis = Redis::start();
    for redis in [None, Some(&redis)] {
        let n = node(
            redis,
            &["--history-channel-memory", "268435456", "--max-output", "2097152"],
        );
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("long", None).unwrap();
        let epoch = sub["epoch"].as_str().unwrap().to_owned();
        c.client.close();
        // 200 × 60 KB: 12 MB of replay, six times the hard limit.
        let bodies: Vec<String> = (0..200)
            .map(|i| format!("{i:04}{}", "l".repeat(60_000)))
            .collect();
        let mut p = V1::connect(n.addr, None).unwrap();
        for chunk in bodies.chunks(50) {
            publish_burst(&mut p, "long", chunk);
        }
        let mut c = V1::connect(n.addr, None).unwrap();
        let sub = c.subscribe("long", Some((0, &epoch))).unwrap();
        assert_eq!(sub["recovered"], true, "{sub}");
        // Live messages published during the replay come after it, in order.
        assert_eq!(p.publish("long", "live").unwrap()["offset"], 201);
        for (i, b) in bodies.iter().enumerate() {
            let m = c
                .message(WAIT)
                .unwrap_or_else(|e| panic!("replayed message {i}: {e}"));
            assert_eq!(m["offset"], i + 1);
            assert_eq!(m["data"].as_str(), Some(b.as_str()));
        }
        assert_eq!(c.message(WAIT).unwrap()["data"], "live");
        assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), 0);
    }
}

/// The budget bounds memory, not just what is counted after a write: a backlog of deliveries
/// drained in one loop turn used to be copied to every member before anyone was judged, so
/// 100 clients that do not read could hold every delivery waiting in the loop's inbox (here up
/// to 150 of 60 KB each: 900 MB) with a 4 MiB budget.
#[test]
fn memory_for_clients_that_never_read_stays_within_the_loop_budget() {
    const BUDGET: u64 = 4 << 20;
    const PUBLISH_QUEUE: u64 = 1 << 20;
    const MESSAGES: u64 = 150;
    // Room for the whole burst and its acknowledgements: nothing is dropped on its way.
    const LOOP_QUEUE: u64 = 2 * MESSAGES + 10;
    const SIZE: usize = 60_000;
    const SUBSCRIBERS: u64 = 100;
    let n = node(
        None,
        &[
            "--threads",
            "1",
            "--history-size",
            "0",
            "--loop-output-budget",
            &BUDGET.to_string(),
            "--publish-queue-bytes",
            &PUBLISH_QUEUE.to_string(),
            "--loop-queue",
            &LOOP_QUEUE.to_string(),
        ],
    );
    let _stalled: Vec<Client> = (0..SUBSCRIBERS).map(|_| stalled_client(&n, "/flood")).collect();
    let mut p = V1::connect(n.addr, None).unwrap();
    let before = rss_kib(n.pid());
    // 150 × 60 KB, as fast as the server takes them: 9 MB to each of 100 subscribers.
    let bodies: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{i:03}{}", "f".repeat(SIZE)))
        .collect();
    publish_burst(&mut p, "flood", &bodies);
    // Acknowledged after the last delivery was queued to the only loop, which drains its inbox
    // in order: once this is acknowledged, every delivery before it has been handled.
    assert_eq!(p.publish("flood", "end").unwrap()["type"], "published");
    let peak = proc_kib(n.pid(), "VmHWM");
    // What may sit in memory: the budget, one delivery past it (the check follows each
    // delivery: a handle per member, the frame is shared), the queues on the way (each message
    // waits in its frame), and 8 MiB for the allocator.
    let frame = SIZE as u64 + 16;
    let allowed = BUDGET + SUBSCRIBERS * 64 + PUBLISH_QUEUE + MESSAGES * frame + (8 << 20);
    let grown = (peak.saturating_sub(before)) * 1024;
    assert!(
        grown < allowed,
        "peak RSS grew by {grown} bytes, more than the {allowed} the budget allows"
    );
    // Every one of them was dropped (each was sent far more than the budget), once.
    assert_eq!(n.metric("wsrelay_deliveries_dropped_total"), 0);
    assert_eq!(n.metric("wsrelay_slow_consumer_closes_total"), SUBSCRIBERS);
}
