//! Redis failing under steady traffic: killed, restarted empty, and paused (SIGSTOP), with
//! clients on two nodes. The nodes must survive with bounded memory, delivery must resume by
//! itself, and every message Redis acknowledged must reach every v1 subscriber exactly once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::delivery::{gaps, subscriber};
use common::*;
use serde_json::Value;
use wsrelay_client::{V1, wire};

#[test]
fn gaps_excuse_only_what_lies_between_their_ends() {
    let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    let got = [
        json(r#"{"type":"subscribed","epoch":"a","offset":3}"#),
        json(r#"{"type":"message","epoch":"a","offset":4}"#),
        json(r#"{"type":"subscribed","epoch":"b","offset":2,"recovered":false}"#),
        json(r#"{"type":"message","epoch":"b","offset":3}"#),
        json(r#"{"type":"subscribed","recovered":false}"#),
        json(r#"{"type":"message","epoch":"b","offset":7}"#),
    ];
    let gaps = gaps("t", &got);
    let excused = |e: &str, o: u64| gaps.iter().any(|g| g.excuses(&(e.to_owned(), o)));
    assert!(!excused("a", 4));
    assert!(excused("a", 5) && excused("a", 99));
    assert!(excused("b", 1) && excused("b", 2));
    assert!(!excused("b", 3));
    assert!(excused("b", 4) && excused("b", 6));
    assert!(!excused("b", 7) && !excused("b", 8));
    assert!(!excused("c", 1));
}

/// Sends text frames `{prefix}0` … `{prefix}{n-1}` (masked with a zero key) in one write.
fn send_burst(raw: &mut Client, prefix: &str, n: usize) {
    let mut burst = Vec::new();
    for i in 0..n {
        let payload = format!("{prefix}{i}");
        wire::encode_masked(&mut burst, wire::op::TEXT, payload.as_bytes());
    }
    std::io::Write::write_all(raw.inner().get_mut(), &burst).unwrap();
}

#[test]
fn redis_killed_restarted_and_paused_during_steady_publishing() {
    let mut redis = Redis::start();
    let url = redis.url();
    let flags = [
        "--redis",
        &url,
        "--redis-backoff-max",
        "300ms",
        "--history-size",
        "100000",
    ];
    let a = Node::start(&flags);
    let b = Node::start(&flags);
    for n in [&a, &b] {
        wait_for("subscriber up", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    let on_a = subscriber(&a, "f");
    let on_b = subscriber(&b, "f");

    // A publisher on B, one message every 2 ms, recording what Redis acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, addr) = (stop.clone(), b.addr);
        std::thread::spawn(move || {
            let mut p = V1::connect(addr, None).unwrap();
            let mut acked = HashMap::new();
            let mut refused = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = p.publish("f", &i.to_string()).unwrap();
                match r["type"].as_str() {
                    Some("published") => {
                        acked.insert(
                            (
                                r["epoch"].as_str().unwrap().to_owned(),
                                r["offset"].as_u64().unwrap(),
                            ),
                            i,
                        );
                    }
                    _ => refused += 1,
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (acked, refused, i)
        })
    };
    let steady = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    steady(Duration::from_millis(500));
    redis.kill();
    steady(Duration::from_secs(1));
    redis.restart();
    for n in [&a, &b] {
        wait_for("subscriber back after restart", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    steady(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    steady(Duration::from_millis(2500));
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    for n in [&a, &b] {
        wait_for("subscriber back after SIGCONT", Duration::from_secs(20), || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    steady(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked, refused, sent) = publisher.join().unwrap();
    // The end marker, acknowledged by Redis, closes both subscriber streams.
    let mut p = V1::connect(b.addr, None).unwrap();
    let end = wait_for("end marker stored", WAIT, || {
        let r = p.publish("f", "end").ok()?;
        (r["type"] == "published").then_some(r)
    });
    let got_a = on_a.join().unwrap();
    let got_b = on_b.join().unwrap();

    assert!(acked.len() > 200, "only {} of {sent} acknowledged", acked.len());
    assert!(refused > 0, "the outage refused nothing: did it happen?");
    for (name, got, node) in [("a", &got_a, &a), ("b", &got_b, &b)] {
        let mut seen = HashSet::new();
        let mut positions = HashMap::new();
        for m in got.iter().filter(|m| m["type"] == "message") {
            let Some(offset) = m["offset"].as_u64() else {
                continue;
            };
            let key = (m["epoch"].as_str().unwrap().to_owned(), offset);
            assert!(seen.insert(key.clone()), "{name}: duplicate {key:?}");
            positions.insert(key, m["data"].as_str().unwrap().to_owned());
        }
        // Every acknowledged message arrived, with its own data, unless it lies in a gap the
        // subscriber was told of (`recovered: false`) between the positions around it.
        let gaps = gaps(name, got);
        eprintln!(
            "{name}: {} messages acknowledged; gaps told: {gaps:?}",
            acked.len()
        );
        let mut missing = Vec::new();
        for (key, i) in &acked {
            match positions.get(key) {
                Some(data) => assert_eq!(data, &i.to_string(), "{name}: wrong data at {key:?}"),
                None if gaps.iter().any(|g| g.excuses(key)) => {}
                None => missing.push((*i, key)),
            }
        }
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "{name}: acknowledged messages missing outside any recovered:false gap {gaps:?}: {missing:?}"
        );
        let end_key = (
            end["epoch"].as_str().unwrap().to_owned(),
            end["offset"].as_u64().unwrap(),
        );
        assert_eq!(positions.get(&end_key).map(String::as_str), Some("end"));
        // Bounded memory: a node that queued everything it could not send would grow.
        let rss = rss_kib(node.pid());
        assert!(rss < 100 * 1024, "{name}: {rss} KiB resident");
    }
}

#[test]
fn a_full_loop_inbox_drops_deliveries_and_v1_clients_recover_them() {
    // An inbox of one delivery: bursts overflow it; the drops are counted and v1 subscribers
    // fill the gaps from history by offset. In-process, then through Redis.
    let flags = ["--threads", "1", "--loop-queue", "1", "--history-size", "100000"];
    inbox_overflow(Node::start(&flags));
    let redis = Redis::start();
    let url = redis.url();
    inbox_overflow(Node::start(&[&flags[..], &["--redis", &url]].concat()));
}

fn inbox_overflow(node: Node) {
    let mut v1 = V1::connect(node.addr, None).unwrap();
    v1.subscribe("burst", None).unwrap();
    let mut raw = node.client("/burst");
    raw.sync("start", WAIT).unwrap();
    assert_eq!(v1.message(WAIT).unwrap()["data"], "start");
    // 3,000 messages in one write: the publisher pipelines them, the subscriber thread routes
    // them faster than one loop turn takes.
    send_burst(&mut raw, "", 3000);
    let mut last = 0;
    for i in 0..3000 {
        let m = v1
            .message(WAIT)
            .unwrap_or_else(|e| panic!("message {i}: {e}; metrics: {}", node.http_get("/metrics").1));
        assert_eq!(m["data"], i.to_string(), "message {i}");
        let offset = m["offset"].as_u64().unwrap();
        assert!(offset > last);
        last = offset;
    }
    assert!(
        node.metric("wsrelay_deliveries_dropped_total") > 0,
        "the inbox never overflowed"
    );
    assert!(node.log().iter().any(|l| l.contains("inbox full")));
}

/// Publishers whose reads are paused by a full publish queue, raw and `wsrelay.v1`, end their
/// connection (a close frame, or only a FIN) before the server has published what it read
/// from them: what was read is still published, in order, before the connection is closed.
#[test]
fn a_publisher_that_ends_while_paused_loses_nothing_it_sent() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url(), "--publish-queue", "4"]);
    let (mut sub, mut framed) = subscriber_and_publisher(&node, "framed ready");
    let mut fin = node.client("/q");
    fin.sync("fin ready", WAIT).unwrap();
    assert_eq!(sub.message(WAIT).unwrap()["data"], "fin ready");
    let mut v1_framed = V1::connect(node.addr, None).unwrap();
    let mut v1_fin = V1::connect(node.addr, None).unwrap();
    // SAFETY: kill(2) on our own child process; resumed below, within the publisher's 2 s
    // command timeout.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    send_burst(&mut framed, "c", 100);
    send_burst(&mut fin, "f", 100);
    send_publishes(&mut v1_framed, "C", 100);
    send_publishes(&mut v1_fin, "F", 100);
    wait_for("reads paused", WAIT, || {
        (node.metric("wsrelay_publish_pauses_total") > 0).then_some(())
    });
    // Each protocol: one ends with a close frame, the other with a FIN alone, while paused.
    let mut close = Vec::new();
    wire::encode_masked(&mut close, wire::op::CLOSE, &1000u16.to_be_bytes());
    for framed in [framed.inner().get_mut(), v1_framed.client.inner().get_mut()] {
        std::io::Write::write_all(framed, &close).unwrap();
    }
    for fin in [fin.inner().get_mut(), v1_fin.client.inner().get_mut()] {
        fin.shutdown(std::net::Shutdown::Write).unwrap();
    }
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    expect_in_order(&mut sub, &[("c", 100), ("f", 100), ("C", 100), ("F", 100)]);
    // No connection is left behind once its peer is gone.
    drop((framed, fin, v1_framed, v1_fin));
    // The subscriber and the /metrics request itself are left.
    wait_for("the publishers closed", WAIT, || {
        (node.metric("wsrelay_connections") == 2).then_some(())
    });
}

/// Sends `wsrelay.v1` publishes of `{prefix}0` … `{prefix}{n-1}` to `q`, each with a `ref`,
/// in one write.
fn send_publishes(v1: &mut V1, prefix: &str, n: usize) {
    let mut commands = Vec::new();
    for i in 0..n {
        let cmd = serde_json::json!({"op":"publish","channel":"q","data":format!("{prefix}{i}"),"ref":i});
        wire::encode_masked(&mut commands, wire::op::TEXT, cmd.to_string().as_bytes());
    }
    std::io::Write::write_all(v1.client.inner().get_mut(), &commands).unwrap();
}

/// A `wsrelay.v1` subscriber on `q`, and a raw publisher on `/q` whose first message
/// (`ready`) both have received.
fn subscriber_and_publisher(node: &Node, ready: &str) -> (V1, Client) {
    let mut sub = V1::connect(node.addr, None).unwrap();
    sub.subscribe("q", None).unwrap();
    let mut raw = node.client("/q");
    raw.sync(ready, WAIT).unwrap();
    assert_eq!(sub.message(WAIT).unwrap()["data"], ready);
    (sub, raw)
}

/// Makes closing `sock` reset the connection (SO_LINGER 0: the kernel sends RST), once
/// everything written to it has reached the server's kernel (a reset discards what the
/// client's kernel still holds; what the server's holds it may still read).
fn reset_on_close(sock: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    wait_for("everything sent acknowledged", WAIT, || {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int; the descriptor is a connected TCP socket.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (r == 0 && n == 0).then_some(())
    });
    socket2::SockRef::from(sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Takes messages from `sub` until every prefix has its `n` messages, checking each prefix's
/// messages arrive once and in order.
fn expect_in_order(sub: &mut V1, prefixes: &[(&str, usize)]) {
    let mut next: HashMap<String, usize> = prefixes.iter().map(|(p, _)| (p.to_string(), 0)).collect();
    while prefixes.iter().any(|(p, n)| next[*p] < *n) {
        let m = sub.message(WAIT).unwrap_or_else(|e| panic!("{e}: next {next:?}"));
        let data = m["data"].as_str().unwrap().to_owned();
        let (p, i) = data.split_at(1);
        let i = i.split(' ').next().unwrap();
        let want = next.get_mut(p).unwrap_or_else(|| panic!("unexpected {data}"));
        assert_eq!(i.parse::<usize>().unwrap(), *want, "in order, once: {data}");
        *want += 1;
    }
}

/// The connection that runs the publishes is killed (`CLIENT KILL TYPE normal`) while
/// batches are in flight, twenty times: the publishes that ran before it went are not run
/// again on the next connection, so every message arrives once and in order (found by an
/// outside probe: some arrived twice, under two offsets).
#[test]
fn publishes_in_flight_when_their_connection_is_killed_run_once() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let (mut sub, mut raw) = subscriber_and_publisher(&node, "ready");
    let mut v1 = V1::connect(node.addr, None).unwrap();
    let mut con = redis.con();
    let (rounds, n) = (20, 500);
    for round in 0..rounds {
        let (mut frames, mut commands) = (Vec::new(), Vec::new());
        for i in round * n..(round + 1) * n {
            wire::encode_masked(&mut frames, wire::op::TEXT, format!("r{i}").as_bytes());
            let cmd = serde_json::json!({"op":"publish","channel":"q","data":format!("v{i}")});
            wire::encode_masked(&mut commands, wire::op::TEXT, cmd.to_string().as_bytes());
        }
        let before = node.metric("wsrelay_published_total");
        std::io::Write::write_all(raw.inner().get_mut(), &frames).unwrap();
        std::io::Write::write_all(v1.client.inner().get_mut(), &commands).unwrap();
        // Killed while this round's publishes go through.
        wait_for("publishing under way", WAIT, || {
            (node.metric("wsrelay_published_total") >= before + n as u64 / 4).then_some(())
        });
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal"])
            .query(&mut con)
            .unwrap();
    }
    expect_in_order(&mut sub, &[("r", rounds * n), ("v", rounds * n)]);
}

/// Publishers whose reads are paused by a full publish queue, raw and `wsrelay.v1`, are
/// reset by their peers (RST) with most of what they sent still in the server's socket
/// buffer: what they sent before the reset is still published, in order.
#[test]
fn publishers_reset_while_paused_lose_nothing_they_sent() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url(), "--publish-queue", "4"]);
    let (mut sub, mut raw) = subscriber_and_publisher(&node, "ready");
    let mut v1 = V1::connect(node.addr, None).unwrap();
    // SAFETY: kill(2) on our own child process; resumed below, within the publisher's 2 s
    // command timeout.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    send_burst(&mut raw, "r", 100);
    send_publishes(&mut v1, "v", 100);
    wait_for("reads paused", WAIT, || {
        (node.metric("wsrelay_publish_pauses_total") > 0).then_some(())
    });
    reset_on_close(raw.inner().get_ref());
    reset_on_close(v1.client.inner().get_ref());
    drop((raw, v1));
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    expect_in_order(&mut sub, &[("r", 100), ("v", 100)]);
    // Neither connection is left behind: the subscriber and the /metrics request are left.
    wait_for("both publishers gone", WAIT, || {
        (node.metric("wsrelay_connections") == 2).then_some(())
    });
}

/// The server closes publishers whose reads are paused by a full publish queue (here all at
/// once, for SIGINT): what it read from them is still published, in order; what it had not
/// read is dropped with the connection. A second node's subscriber sees what was published.
#[test]
fn paused_publishers_the_server_closes_keep_what_was_read() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url(), "--publish-queue", "4"]);
    let other = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut sub = V1::connect(other.addr, None).unwrap();
    sub.subscribe("q", None).unwrap();
    let mut raw = node.client("/q");
    raw.sync("ready", WAIT).unwrap();
    assert_eq!(sub.message(WAIT).unwrap()["data"], "ready");
    let mut v1 = V1::connect(node.addr, None).unwrap();
    let before = node.metric("wsrelay_messages_received_total");
    // SAFETY: kill(2) on our own child process; resumed below, within the publisher's 2 s
    // command timeout.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    send_burst(&mut raw, "r", 1_000);
    send_publishes(&mut v1, "v", 1_000);
    // Each publisher holds far more than the queue and the batches in flight take.
    wait_for("both paused", WAIT, || {
        (node.metric("wsrelay_publish_pauses_total") >= 2).then_some(())
    });
    // Paused connections are not read while Redis is stopped (at most a pause more).
    let read = node.metric("wsrelay_messages_received_total") - before;
    node.signal(libc::SIGINT);
    node.wait_log("closing 2 connections");
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    let mut marker = V1::connect(other.addr, None).unwrap();
    // Everything read, once and in each publisher's order.
    let (mut next_r, mut next_v) = (0, 0);
    let mut marked = false;
    loop {
        if next_r + next_v >= read && !marked {
            assert_eq!(marker.publish("q", "marker").unwrap()["type"], "published");
            marked = true;
        }
        let m = sub
            .message(WAIT)
            .unwrap_or_else(|e| panic!("{e}: {next_r} + {next_v} of {read}"));
        let data = m["data"].as_str().unwrap().to_owned();
        let (next, i) = match data.split_at(1) {
            ("r", i) => (&mut next_r, i),
            ("v", i) => (&mut next_v, i),
            ("m", _) if marked => break,
            _ => panic!("unexpected {data}"),
        };
        assert_eq!(i.parse::<u64>().unwrap(), *next, "in order, once: {data}");
        *next += 1;
    }
    drop((raw, v1));
}

/// A raw client on a channel whose subscription cannot go live (Redis stopped) is not read
/// yet, but it is not silent: its messages wait in the kernel. It is not closed at a short
/// `--idle-timeout`, and its messages are published once the subscription is live.
#[test]
fn a_client_waiting_for_its_subscription_is_not_idle() {
    let redis = Redis::start();
    let flags = [
        "--idle-timeout",
        "1s",
        "--ping-interval",
        "200ms",
        "--redis",
        &redis.url(),
    ];
    let node = Node::start(&[&flags[..], &["--threads", "1"]].concat());
    let other = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut sub = V1::connect(other.addr, None).unwrap();
    sub.subscribe("fresh", None).unwrap();
    // SAFETY: kill(2) on our own child process; resumed below.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    let mut raw = node.client("/fresh");
    send_burst(&mut raw, "m", 20);
    // Pings for longer than the idle timeout (each answered; the answers are not read
    // either): the client is past `--idle-timeout` without being read.
    let ws = raw.inner();
    let mut pings = 0;
    while pings < 8 {
        ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        match ws.read().unwrap() {
            tungstenite::Message::Ping(_) => pings += 1,
            other => panic!("while Redis is stopped: {other:?}"),
        }
    }
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    expect_in_order(&mut sub, &[("m", 20)]);
    assert_eq!(node.metric("wsrelay_idle_closes_total"), 0);
}

/// A raw publisher that sends 8 MiB of frames in one write, never reads, and resets its
/// connection as soon as the server's kernel has all of it: the server is still reading (the
/// network is faster than publishing), and its writes to the client (the copies of its own
/// messages) fail. Every frame the client sent is still published.
#[test]
fn a_publisher_reset_right_after_sending_loses_nothing() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let (mut sub, mut raw) = subscriber_and_publisher(&node, "ready");
    send_burst(&mut raw, "r", 100_000);
    reset_on_close(raw.inner().get_ref());
    drop(raw);
    expect_in_order(&mut sub, &[("r", 100_000)]);
    wait_for("the publisher gone", WAIT, || {
        (node.metric("wsrelay_connections") == 2).then_some(())
    });
}

#[test]
fn a_full_publish_queue_pauses_publishers_and_loses_nothing() {
    // A queue of two publishes, batches of one (so at most eight in flight): a paused Redis
    // fills it at once. Raw and v1 publishers must be paused, not closed or refused; once
    // Redis runs again every message is delivered once, in each publisher's order.
    let key = "backend-key-0123456789";
    let redis = Redis::start();
    let flags = ["--publish-queue", "2", "--publish-batch", "1", "--api-key", key];
    let node = Node::start(&[&flags[..], &["--threads", "1", "--redis", &redis.url()]].concat());
    let (mut sub, mut raw) = subscriber_and_publisher(&node, "start");
    let mut v1 = V1::connect(node.addr, None).unwrap();

    // SAFETY: kill(2) on our own child process. Resumed below, well within the publisher's
    // 2 s command timeout (the wait for the pause takes milliseconds).
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    send_burst(&mut raw, "r", 100);
    for i in 0..50 {
        v1.send(&serde_json::json!({"op":"publish","channel":"q","data":format!("v{i}"),"ref":i}))
            .unwrap();
    }
    wait_for("reads paused", WAIT, || {
        (node.metric("wsrelay_publish_pauses_total") > 0).then_some(())
    });
    // A backend cannot be paused: it is told when to come back.
    let mut http = std::net::TcpStream::connect(node.addr).unwrap();
    http.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "POST /publish?channel=q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 4\r\n\r\nhttp"
    );
    std::io::Write::write_all(&mut http, request.as_bytes()).unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut http, &mut response).unwrap();
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
    // The body is a v1 error, like the server API's other errors.
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );

    for i in 0..50 {
        let ack = v1.next(WAIT).unwrap();
        assert_eq!(
            (ack["type"].as_str(), ack["ref"].as_u64()),
            (Some("published"), Some(i)),
            "{ack}"
        );
    }
    let (mut next_raw, mut next_v1) = (0, 0);
    while next_raw < 100 || next_v1 < 50 {
        let m = sub.message(WAIT).unwrap();
        let data = m["data"].as_str().unwrap();
        if let Some(i) = data.strip_prefix('r') {
            assert_eq!(
                i.parse::<usize>().unwrap(),
                next_raw,
                "raw messages in order, once"
            );
            next_raw += 1;
        } else {
            assert_eq!(data, format!("v{next_v1}"), "v1 messages in order, once");
            next_v1 += 1;
        }
    }
    // The raw publisher is still connected and served.
    raw.sync("end", WAIT).unwrap();
    assert_eq!(sub.message(WAIT).unwrap()["data"], "end");
    assert_eq!(node.metric("wsrelay_publish_failed_total"), 0);
    assert_eq!(node.metric("wsrelay_publish_dropped_total"), 1);
    assert!(node.log().iter().any(|l| l.contains("pausing reads")));
}

#[test]
fn subscriber_cut_off_for_its_output_buffer_recovers_by_offset() {
    // Redis closes a Pub/Sub connection whose output buffer passes the hard limit. One
    // script publishing 3,000 messages of 4 KB (12 MB) through the real publish script is sure
    // to pass 1 MB before anything is written to the socket.
    let redis = Redis::start();
    let flags = ["--history-size", "100000", "--max-output", "67108864"];
    let node = Node::start(&[&flags[..], &["--redis", &redis.url()]].concat());
    let mut v1 = V1::connect(node.addr, None).unwrap();
    v1.subscribe("burst", None).unwrap();
    let mut con = redis.con();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 1mb 512kb 1")
        .query(&mut con)
        .unwrap();
    let script = format!(
        "local function publish(KEYS, ARGV)\n{}\nend\n\
         for i = 1, tonumber(ARGV[1]) do\n\
           publish(KEYS, {{'100000', '600', 'test', '1000000000', '1000000', 'PUBLISH', '', '', 'burst', 't', ARGV[2] .. i, '0', ''}})\n\
         end\nreturn 1",
        include_str!("../src/broker/redis/publish.lua")
    );
    let filler = "x".repeat(4000);
    let _: i64 = redis::cmd("EVAL")
        .arg(script)
        .arg(2)
        .arg("wsrelay:{burst}:meta")
        .arg("wsrelay:{burst}:stream")
        .arg(3000)
        .arg(&filler)
        .query(&mut con)
        .unwrap();
    for i in 1..=3000u64 {
        let m = v1
            .message(WAIT)
            .unwrap_or_else(|e| panic!("message {i}: {e}; metrics: {}", node.http_get("/metrics").1));
        assert_eq!(m["offset"].as_u64(), Some(i));
        assert_eq!(m["data"].as_str(), Some(format!("{filler}{i}").as_str()));
    }
    assert!(
        node.metric("wsrelay_redis_reconnects_total") >= 1,
        "the subscriber was never cut off"
    );
    assert!(
        node.log()
            .iter()
            .any(|l| l.contains("client-output-buffer-limit"))
    );
}

/// A subscribe sent while Redis is stalled: the subscriber's SUBSCRIBE times out and its
/// connection is given up. The subscribe is still answered, and delivery starts once Redis is
/// back.
/// A raw client that connects while Redis is stalled, long enough for the subscriber to give
/// its connection up, is read only once its channel's subscription is in effect in Redis
/// again: it receives its own messages.
/// Waits until the node's Redis subscriber has given up its connection to the stopped
/// (SIGSTOP) `redis`, then resumes it.
#[track_caller]
fn resume_once_the_subscriber_gave_up(node: &Node, redis: &Redis) {
    wait_for("subscriber down", Duration::from_secs(20), || {
        (node.metric("wsrelay_redis_subscriber_up") == 0).then_some(())
    });
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
}

#[test]
fn a_raw_client_that_joins_while_redis_is_stalled_receives_its_own() {
    let mut redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    wait_for("subscriber up", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 1).then_some(())
    });
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    let mut raw = node.client("/stalled");
    send_burst(&mut raw, "m", 20);
    // The SUBSCRIBE waits out its timeout and the subscriber gives the connection up.
    resume_once_the_subscriber_gave_up(&node, &redis);
    for i in 0..20 {
        assert_eq!(raw.recv_text(Duration::from_secs(20)).unwrap(), format!("m{i}"));
    }
    // The reconnected subscriber counts the channel it subscribed.
    assert_eq!(node.metric("wsrelay_channels_subscribed"), 1);
    redis.kill();
}

/// A recovery asked for while Redis is stalled is answered `recovered: false` without a
/// position; once Redis is back, nothing is replayed after all (README: `recovered: false`
/// means nothing is replayed), and live messages follow.
#[test]
fn a_recovery_refused_during_a_stall_replays_nothing_later() {
    let mut redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut p = V1::connect(node.addr, None).unwrap();
    let mut epoch = String::new();
    for i in 1..=10 {
        let r = p.publish("news", &format!("m{i}")).unwrap();
        epoch = r["epoch"].as_str().unwrap().to_owned();
    }
    wait_for("subscriber up", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 1).then_some(())
    });
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    let mut c = V1::connect(node.addr, None).unwrap();
    let reply = c.subscribe("news", Some((7, &epoch))).unwrap();
    assert_eq!(
        (reply["recovered"].as_bool(), reply.get("offset")),
        (Some(false), None),
        "{reply}"
    );
    resume_once_the_subscriber_gave_up(&node, &redis);
    wait_for("subscriber back", Duration::from_secs(20), || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    let mut p = V1::connect(node.addr, None).unwrap();
    assert_eq!(p.publish("news", "after").unwrap()["type"], "published");
    // At most a notice that more may have been missed; then the live message, and no m8-m10.
    loop {
        let v = c.next(WAIT).unwrap();
        match v["type"].as_str() {
            Some("subscribed") => assert_eq!(v["recovered"], false, "{v}"),
            Some("message") => {
                assert_eq!(v["data"], "after", "replayed after recovered: false: {v}");
                break;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    redis.kill();
}

#[test]
fn a_subscribe_sent_while_redis_is_stalled_is_answered() {
    let mut redis = Redis::start();
    let node = Node::start(&["--threads", "1", "--redis", &redis.url()]);
    let mut c = V1::connect(node.addr, None).unwrap();
    wait_for("subscriber up", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 1).then_some(())
    });
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    c.send(&serde_json::json!({"op":"subscribe","channel":"stalled","ref":"s"}))
        .unwrap();
    // The SUBSCRIBE waits out its timeout (2 s) and the subscriber gives the connection up.
    resume_once_the_subscriber_gave_up(&node, &redis);
    let reply = c.next(Duration::from_secs(20)).unwrap();
    assert_eq!(
        (reply["type"].as_str(), reply["ref"].as_str()),
        (Some("subscribed"), Some("s")),
        "{reply}"
    );
    wait_for("subscriber back", Duration::from_secs(20), || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    let mut p = V1::connect(node.addr, None).unwrap();
    assert_eq!(p.publish("stalled", "after").unwrap()["type"], "published");
    let m = c.message(WAIT).unwrap();
    assert_eq!(m["data"], "after", "{m}");
    redis.kill();
}

/// A node without history on `redis` (fast reconnects), a raw subscriber and a raw publisher
/// on its channel `room1`, once the subscriber is up and a first message went round.
fn room_without_history(redis: &Redis) -> (Node, Client, Client) {
    let flags = [
        "--threads",
        "1",
        "--history-size",
        "0",
        "--redis-backoff-max",
        "200ms",
    ];
    let node = Node::start(&[&flags[..], &["--redis", &redis.url()]].concat());
    let mut sub = node.client("/room1");
    let mut publisher = node.client("/room1");
    wait_for("subscriber up", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 1).then_some(())
    });
    send_burst(&mut publisher, "warm", 1);
    assert_eq!(sub.recv_text(WAIT).unwrap(), "warm0");
    assert_eq!(publisher.recv_text(WAIT).unwrap(), "warm0");
    (node, sub, publisher)
}

/// Publishes made while the node's Redis subscriber is away (its connection lost, Redis
/// answering the publisher) wait for it to subscribe again, a while, instead of going out to
/// a Redis nobody on this node listens to: without history nobody would ever get them, the
/// sender's own echo included. Redis ACLs keep the subscriber out (it also subscribes the
/// control channel, which the new rule forbids) while publishes to the room still run.
#[test]
fn publishes_wait_for_the_subscriber_to_be_back() {
    let mut redis = Redis::start();
    let (node, mut sub, mut publisher) = room_without_history(&redis);
    let mut con = redis.con();
    let acl = |rule: &str, con: &mut redis::Connection| {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("resetchannels")
            .arg(rule)
            .query(con)
            .unwrap();
    };
    // Redis closes the subscriber's connection (its control channel is no longer allowed),
    // and refuses its SUBSCRIBE until the rule is lifted.
    acl("&room*", &mut con);
    wait_for("subscriber down", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 0).then_some(())
    });
    let published = node.metric("wsrelay_published_total");
    send_burst(&mut publisher, "m", 20);
    // Either they went out (the subscriber away) or the publisher holds them.
    wait_for("publishes taken", WAIT, || {
        (node.metric("wsrelay_published_total") >= published + 20
            || node.metric("wsrelay_publish_subscriber_waits_total") > 0)
            .then_some(())
    });
    acl("allchannels", &mut con);
    for client in [&mut sub, &mut publisher] {
        for i in 0..20 {
            assert_eq!(client.recv_text(WAIT).unwrap(), format!("m{i}"));
        }
    }
    assert_eq!(node.metric("wsrelay_publish_failed_total"), 0);
    redis.kill();
}

/// A subscriber Redis keeps refusing is waited for 2 s, not for ever: then publishes go out
/// without it (logged), and the next ones do not wait again until it is back.
#[test]
fn publishes_wait_for_a_refused_subscriber_a_bounded_time() {
    let mut redis = Redis::start();
    let flags = ["--threads", "1", "--redis-backoff-max", "100ms"];
    let node = Node::start(&[&flags[..], &["--redis", &redis.url()]].concat());
    let mut publisher = V1::connect(node.addr, None).unwrap();
    assert_eq!(publisher.publish("room1", "warm").unwrap()["type"], "published");
    // (The first publish may have waited for the subscriber's first connection.)
    let waits = node.metric("wsrelay_publish_subscriber_waits_total");
    let mut con = redis.con();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("resetchannels")
        .arg("&room*")
        .query(&mut con)
        .unwrap();
    wait_for("subscriber down", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 0).then_some(())
    });
    let refused_since = Instant::now();
    let started = Instant::now();
    assert_eq!(publisher.publish("room1", "a").unwrap()["type"], "published");
    assert!(started.elapsed() >= Duration::from_secs(2), "did not wait");
    assert!(node.log().iter().any(|l| l.contains("still away")));
    for i in 0..20 {
        assert_eq!(
            publisher.publish("room1", &format!("b{i}")).unwrap()["type"],
            "published"
        );
    }
    assert_eq!(node.metric("wsrelay_publish_subscriber_waits_total"), waits + 1);
    assert_eq!(node.metric("wsrelay_redis_subscriber_up"), 0);
    // Refused every 50-100 ms, and logged at most once a second.
    let lost = node
        .log()
        .iter()
        .filter(|l| l.contains("redis subscriber connection lost"))
        .count() as u64;
    assert!(
        lost <= refused_since.elapsed().as_secs() + 1,
        "{lost} lines in {:?}",
        refused_since.elapsed()
    );
    redis.kill();
}

/// Redis restarted while the node publishes: publishes made after it is back wait for the
/// node's subscriber, however long Redis was away (the wait is counted from Redis answering
/// the publisher, not from the subscriber's loss). The restarted Redis refuses the subscriber
/// (an ACL rule forbids the control channel) until the test lifts the rule, so without the
/// wait those publishes would reach no client of the node.
#[test]
fn publishes_after_a_redis_restart_wait_for_the_subscriber() {
    let mut redis = Redis::start();
    let (node, mut sub, mut publisher) = room_without_history(&redis);
    redis.kill();
    wait_for("subscriber down", WAIT, || {
        (node.metric("wsrelay_redis_subscriber_up") == 0).then_some(())
    });
    // While Redis is away: delivered on this node only.
    send_burst(&mut publisher, "a", 10);
    for i in 0..10 {
        assert_eq!(sub.recv_text(WAIT).unwrap(), format!("a{i}"));
    }
    let user = ["--user", "default", "on", "nopass", "~*", "&room*", "+@all"];
    redis.restart_with(&user);
    // One message at a time, until one goes the way of Redis (within the publisher's reconnect
    // backoff they are still delivered on this node only).
    let metric = |name| node.metric(name);
    let mut sent = 0;
    loop {
        let failed = metric("wsrelay_publish_failed_total");
        let published = metric("wsrelay_published_total");
        let waits = metric("wsrelay_publish_subscriber_waits_total");
        send_burst(&mut publisher, &format!("b{sent}-"), 1);
        sent += 1;
        let to_redis = wait_for("the publish taken", WAIT, || {
            if metric("wsrelay_publish_subscriber_waits_total") > waits
                || metric("wsrelay_published_total") > published
            {
                Some(true)
            } else {
                (metric("wsrelay_publish_failed_total") > failed).then_some(false)
            }
        });
        if to_redis {
            break;
        }
    }
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("allchannels")
        .query(&mut redis.con())
        .unwrap();
    for client in [&mut sub, &mut publisher] {
        for i in 0..sent {
            // (The sender also has its own a0-a9 to read first.)
            let text = loop {
                let t = client.recv_text(WAIT).unwrap();
                if !t.starts_with('a') && !t.starts_with("warm") {
                    break t;
                }
            };
            assert_eq!(text, format!("b{i}-0"));
        }
    }
    redis.kill();
}
