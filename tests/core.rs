//! The core server end to end: real wsrelay processes, real redis-server processes, real
//! sockets on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn in_process_broker_delivers_across_loops_sender_included() {
    let node = Node::start(&["--threads", "2"]);
    // 16 clients: the kernel spreads them over both loops' listeners (checked below).
    let mut clients: Vec<Client> = (0..16).map(|_| node.client("/")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("sync-{i}"), WAIT).unwrap();
    }
    let (_, metrics) = node.http_get("/metrics");
    for l in 0..2 {
        let line = format!("wsrelay_connections{{loop=\"{l}\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|x| x.strip_prefix(&line))
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0, "loop {l} got no connections: {metrics}");
    }
    clients[0].send_text("Hello from Client!").unwrap();
    for c in &mut clients {
        recv_until(c, "Hello from Client!");
    }
}

#[test]
fn channels_are_separate() {
    let node = Node::start(&[]);
    let mut a = node.client("/room-a");
    let mut b = node.client("/room-b");
    a.sync("a0", WAIT).unwrap();
    b.sync("b0", WAIT).unwrap();
    a.send_text("for a").unwrap();
    b.send_text("for b").unwrap();
    assert_eq!(a.recv_text(WAIT).unwrap(), "for a");
    assert_eq!(b.recv_text(WAIT).unwrap(), "for b");
}

#[test]
fn cross_node_delivery_through_redis_keeps_frame_types() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Node::start(&["--redis", &url]);
    let b = Node::start(&["--redis", &url]);
    let mut on_a = a.client("/");
    let mut on_b = b.client("/");
    on_a.sync("sync-a", WAIT).unwrap();
    on_b.sync("sync-b", WAIT).unwrap();
    on_a.send_text("Hello from Client!").unwrap();
    recv_until(&mut on_b, "Hello from Client!");
    let bytes = [0u8, 159, 146, 150, b'\n'];
    on_a.send_binary(&bytes).unwrap();
    assert_eq!(on_b.recv(WAIT).unwrap(), Received::Binary(bytes.to_vec()));
    // Valid UTF-8 sent as binary stays binary.
    on_b.send_binary(b"plain ascii").unwrap();
    loop {
        match on_a.recv(WAIT).unwrap() {
            // Its own binary message comes back to the sender first.
            Received::Binary(b) if b == bytes => {}
            Received::Binary(b) => {
                assert_eq!(b, b"plain ascii");
                break;
            }
            Received::Text(t) => assert!(t.starts_with("Hello") || t == "sync-b", "{t}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn backend_publish_through_redis_reaches_clients() {
    let redis = Redis::start();
    let node = Node::start(&["--redis", &redis.url(), "--redis-prefix", "app:"]);
    let mut c = node.client("/news");
    c.sync("ready", WAIT).unwrap();
    let mut con = redis.con();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("app:news")
        .arg("hello")
        .query(&mut con)
        .unwrap();
    assert_eq!(receivers, 1, "exactly one node subscription");
    assert_eq!(c.recv(WAIT).unwrap(), Received::Text("hello".into()));
    let _: i64 = redis::cmd("PUBLISH")
        .arg("app:news")
        .arg(&[0xffu8, 0x00][..])
        .query(&mut con)
        .unwrap();
    assert_eq!(c.recv(WAIT).unwrap(), Received::Binary(vec![0xff, 0x00]));
    // Unprefixed and other channels do not leak in: nobody on this node subscribed to them,
    // and nothing arrives before the client's own next message (which travels through the same
    // subscriber connection, after them).
    for other in ["news", "app:other"] {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(other)
            .arg("wrong")
            .query(&mut con)
            .unwrap();
        assert_eq!(receivers, 0, "{other} has a subscriber");
    }
    assert_eq!(c.sync("after", WAIT).unwrap(), vec![]);
}

#[test]
fn subscriptions_follow_local_clients() {
    let redis = Redis::start();
    let node = Node::start(&["--redis", &redis.url(), "--threads", "2"]);
    let mut con = redis.con();
    let numsub = |con: &mut redis::Connection, ch: &str| -> i64 {
        let v: Vec<(String, i64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(ch).query(con).unwrap();
        v[0].1
    };
    let mut c1 = node.client("/watched");
    let mut c2 = node.client("/watched");
    c1.sync("s1", WAIT).unwrap();
    c2.sync("s2", WAIT).unwrap();
    // One Redis subscription for the node, however many local clients and loops.
    assert_eq!(numsub(&mut con, "watched"), 1);
    c1.close();
    c2.sync("s3", WAIT).unwrap();
    assert_eq!(numsub(&mut con, "watched"), 1);
    c2.close();
    wait_for("UNSUBSCRIBE after the last client", WAIT, || {
        (numsub(&mut con, "watched") == 0).then_some(())
    });
}

#[test]
fn two_processes_share_one_port() {
    let redis = Redis::start();
    let url = redis.url();
    let mut first = Node::start(&["--redis", &url, "--threads", "1"]);
    let second = Node::start_on(&first.addr.to_string(), &["--redis", &url, "--threads", "1"]);
    assert_eq!(first.addr, second.addr);
    let mut clients: Vec<Client> = (0..16).map(|_| first.client("/")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("sync-{i}"), WAIT).unwrap();
    }
    clients[0].send_text("to all").unwrap();
    for c in &mut clients {
        recv_until(c, "to all");
    }
    // Kill one process: its clients drop, the other's keep working. Both had some.
    first.kill();
    let mut alive = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        if c.sync(&format!("after-{i}"), Duration::from_secs(3)).is_ok() {
            alive += 1;
        }
    }
    assert!(
        alive > 0 && alive < 16,
        "connections were not spread over both processes: {alive} of 16 survived"
    );
}

#[test]
fn slow_consumer_is_closed_while_fast_one_gets_everything() {
    let node = Node::start(&[
        "--threads",
        "1",
        "--max-output",
        "65536",
        "--socket-send-buffer",
        "4096",
        "--close-timeout",
        "30s",
    ]);
    // The slow client has a tiny receive window and never reads until the end.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&node.addr.into()).unwrap();
    let mut slow = Client::handshake(sock.into(), node.addr, "/", None).unwrap();
    let mut fast = node.client("/");
    fast.sync("ready", WAIT).unwrap();
    let payload = "x".repeat(1000);
    let n = 3000;
    for i in 0..n {
        let msg = format!("{i:05}{payload}");
        fast.send_text(&msg).unwrap();
        // The fast client reads each of its messages back, in order, none missing.
        assert_eq!(fast.recv_text(WAIT).unwrap(), msg);
    }
    assert_eq!(node.metric("wsrelay_slow_consumer_closes_total"), 1);
    assert!(node.log().iter().any(|l| l.contains("slow consumer")));
    // The slow client finds a prefix of the stream, in order, then close 1008.
    let mut next = 0;
    loop {
        match slow.recv(WAIT).unwrap() {
            Received::Text(t) if t == "ready" => {}
            Received::Text(t) => {
                assert_eq!(t[..5].parse::<usize>().unwrap(), next);
                next += 1;
            }
            Received::Closed(frame) => {
                assert_eq!(frame.unwrap().0, 1008);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(next < n, "slow client was not cut off");
}

#[test]
fn oversize_message_gets_1009_and_others_are_unaffected() {
    let node = Node::start(&["--max-message-size", "1024"]);
    let mut ok = node.client("/");
    ok.sync("ok", WAIT).unwrap();
    let mut big = node.client("/");
    big.sync("big", WAIT).unwrap();
    big.send_text(&"y".repeat(2000)).unwrap();
    loop {
        match big.recv(WAIT).unwrap() {
            Received::Closed(f) => {
                assert_eq!(f.unwrap().0, 1009);
                break;
            }
            Received::Text(t) => assert_eq!(t, "ok-after"),
            other => panic!("{other:?}"),
        }
    }
    ok.sync("ok-after", WAIT).unwrap();
    assert_eq!(node.metric("wsrelay_oversize_closes_total"), 1);
}

#[test]
fn invalid_utf8_text_gets_1007() {
    let node = Node::start(&[]);
    let mut c = node.client("/");
    c.sync("s", WAIT).unwrap();
    let frame = tungstenite::protocol::frame::Frame::message(
        vec![0xc3u8, 0x28],
        tungstenite::protocol::frame::coding::OpCode::Data(tungstenite::protocol::frame::coding::Data::Text),
        true,
    );
    c.inner().send(tungstenite::Message::Frame(frame)).unwrap();
    assert_eq!(
        c.recv(WAIT).unwrap(),
        Received::Closed(Some((1007, "invalid utf-8".into())))
    );
}

#[test]
fn http_endpoints_and_garbage_do_not_disturb_clients() {
    let node = Node::start(&["--handshake-timeout", "500ms"]);
    let mut c = node.client("/");
    c.sync("before", WAIT).unwrap();

    assert_eq!(node.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(node.http_get("/nope").0, 404);
    assert_eq!(
        http_request(
            node.addr,
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .0,
        405
    );
    assert_eq!(
        http_request(node.addr, "\x16\x03\x01\x02\x00garbage\r\n\r\n").0,
        400
    );
    let too_big = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(http_request(node.addr, &too_big).0, 431);
    let bad_version = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n";
    assert_eq!(http_request(node.addr, bad_version).0, 426);

    // Half-open handshakes: they hold nothing up and are answered 408 at the deadline.
    let mut half: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(node.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nUpgrade: webso").unwrap();
            s
        })
        .collect();
    c.sync("during", WAIT).unwrap();
    for s in &mut half {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        assert_eq!(parse_response(&resp).0, 408);
    }
    // A connection that says nothing at all is closed too.
    let mut silent = TcpStream::connect(node.addr).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut resp = Vec::new();
    silent.read_to_end(&mut resp).unwrap();
    assert_eq!(parse_response(&resp).0, 408);
    c.sync("after", WAIT).unwrap();
    // Exactly what was sent: 21 timeouts (20 half-open, 1 silent), the garbage and the bad
    // version as bad requests, the oversized head.
    let (_, metrics) = node.http_get("/metrics");
    let failures = |reason: &str| {
        metric_value(
            &metrics,
            &format!("wsrelay_handshake_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(failures("timeout"), 21, "{metrics}");
    assert_eq!(failures("bad_request"), 2, "{metrics}");
    assert_eq!(failures("too_large"), 1, "{metrics}");
    assert_eq!(
        metric_value(&metrics, "wsrelay_handshake_failures_total"),
        24,
        "{metrics}"
    );
}

#[test]
fn redis_killed_and_restarted_mid_stream() {
    let mut redis = Redis::start();
    let url = redis.url();
    let mut a = Node::start(&["--redis", &url, "--redis-backoff-max", "500ms"]);
    let mut b = Node::start(&["--redis", &url, "--redis-backoff-max", "500ms"]);
    let mut on_a = a.client("/");
    let mut on_b = b.client("/");
    on_a.sync("sa", WAIT).unwrap();
    on_b.sync("sb", WAIT).unwrap();

    redis.kill();
    // Local delivery goes on without Redis; the clients stay connected.
    for i in 0..20 {
        on_a.sync(&format!("local-{i}"), WAIT).unwrap();
    }
    wait_for("healthz 503", WAIT, || {
        (a.http_get("/healthz").0 == 503).then_some(())
    });
    // Each of the 20 local messages was published and failed to reach Redis (the count may
    // trail the local delivery of the last one by a moment).
    let failed = wait_for("20 failed publishes counted", WAIT, || {
        let n = a.metric("wsrelay_publish_failed_total");
        (n >= 20).then_some(n)
    });
    assert_eq!(failed, 20);

    redis.restart();
    wait_for("subscriber back", WAIT, || {
        (b.http_get("/healthz").0 == 200).then_some(())
    });
    // Cross-node delivery resumes by itself; no wsrelay restart.
    let mut n = 0;
    wait_for("cross-node delivery after restart", WAIT, || {
        n += 1;
        let token = format!("resume-{n}");
        on_a.send_text(&token).ok()?;
        loop {
            match on_b.recv(Duration::from_millis(300)) {
                Ok(Received::Text(t)) if t == token => return Some(()),
                Ok(Received::Closed(f)) => panic!("client on b closed: {f:?}"),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    });
    assert!(a.running() && b.running());
    // One outage, one reconnect of the subscriber.
    assert_eq!(b.metric("wsrelay_redis_reconnects_total"), 1);
    assert!(a.log().iter().any(|l| l.contains("redis")));
}

#[test]
fn sigterm_sends_1001_and_exits_zero() {
    // No balancer to wait for: everyone at once (tests/drain.rs has the drain itself).
    let mut node = Node::start(&["--threads", "2", "--drain-delay", "0", "--drain-period", "0"]);
    let mut clients: Vec<Client> = (0..4).map(|_| node.client("/")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("s{i}"), WAIT).unwrap();
    }
    node.signal(libc::SIGTERM);
    for c in &mut clients {
        assert_eq!(recv_close(c), Some(1001));
    }
    drop(clients);
    let status = node.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn startup_errors_are_one_line_and_nonzero() {
    let nobody = ClosedPort::new();
    let out = std::process::Command::new(server_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis",
            &format!("redis://{}", nobody.addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wsrelay: cannot reach Redis"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("wsrelay:")).count(),
        1,
        "{err}"
    );

    let out = std::process::Command::new(server_binary())
        .args(["--threads", "zero"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));

    let out = std::process::Command::new(server_binary())
        .args(["--threads", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads must be at least 1"));

    // A port already taken by a non-reuseport socket.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = std::process::Command::new(server_binary())
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
}

#[test]
fn idle_peers_are_pinged_then_closed() {
    let node = Node::start(&["--ping-interval", "200ms", "--idle-timeout", "600ms"]);
    // A tungstenite client answers pings automatically when it reads: it stays.
    let mut live = node.client("/");
    live.sync("s", WAIT).unwrap();
    // A raw TCP client that completed the handshake but never answers anything.
    let mut mute = TcpStream::connect(node.addr).unwrap();
    mute.write_all(&wire::request("x", "/")).unwrap();
    mute.set_read_timeout(Some(WAIT)).unwrap();
    let mute = std::thread::spawn(move || {
        let mut got = Vec::new();
        mute.read_to_end(&mut got).unwrap();
        got
    });
    // Meanwhile the live client keeps reading, which answers the server's pings.
    while !mute.is_finished() {
        if let Ok(Received::Closed(f)) = live.recv(Duration::from_millis(50)) {
            panic!("live client closed: {f:?}");
        }
    }
    let got = mute.join().unwrap();
    // It saw the 101, then pings and a close frame with 1001, and nothing after it.
    let wire::Response::Upgraded(mut at) = wire::response(&got) else {
        panic!("no 101: {got:?}");
    };
    let mut opcodes = Vec::new();
    let mut close_code = None;
    while let wire::Parsed::Frame(f, used) = wire::parse(&got[at..]) {
        opcodes.push(f.opcode);
        if f.opcode == wire::op::CLOSE {
            close_code = Some(u16::from_be_bytes([f.payload[0], f.payload[1]]));
        }
        at += used;
    }
    assert_eq!(at, got.len(), "not whole frames: {got:?}");
    assert!(
        opcodes.len() >= 2
            && opcodes[..opcodes.len() - 1]
                .iter()
                .all(|&op| op == wire::op::PING),
        "{opcodes:?}"
    );
    assert_eq!(close_code, Some(1001));
    // The live client is still served.
    for i in 0..3 {
        live.sync(&format!("still-{i}"), WAIT).unwrap();
    }
    // Only the mute one: the live client answered every ping.
    assert_eq!(node.metric("wsrelay_idle_closes_total"), 1);
}

/// Reads an HTTP status line's code from `s`, waiting up to `timeout`.
fn status_of(s: &mut TcpStream, timeout: Duration) -> Option<u16> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

#[test]
fn max_connections_answers_503_and_frees_up() {
    let node = Node::start(&["--max-connections", "3", "--threads", "1"]);
    let mut held: Vec<Client> = (0..3).map(|_| node.client("/")).collect();
    held[0].sync("in", WAIT).unwrap();
    let mut extra = TcpStream::connect(node.addr).unwrap();
    extra.write_all(&wire::request("x", "/")).unwrap();
    assert_eq!(status_of(&mut extra, WAIT), Some(503));
    held.pop().unwrap().close();
    wait_for("a slot after a close", WAIT, || {
        let mut s = TcpStream::connect(node.addr).ok()?;
        s.write_all(&wire::request("x", "/")).ok()?;
        (status_of(&mut s, WAIT)? == 101).then_some(())
    });
}

#[test]
fn running_out_of_descriptors_pauses_accepting_without_spinning() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(server_binary());
    cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"]);
    // SAFETY: setrlimit in the child between fork and exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let node = Node::spawn(&mut cmd);
    // More upgrade requests than the process has descriptors for.
    let mut socks: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut s = TcpStream::connect(node.addr).unwrap();
            s.write_all(&wire::request("x", "/")).unwrap();
            s
        })
        .collect();
    // The backlog is served in order: the first connection without an answer marks the limit.
    let first_waiting = socks
        .iter_mut()
        .position(|s| status_of(s, Duration::from_millis(300)) != Some(101))
        .expect("some connections must wait");
    assert!(first_waiting > 10, "only {first_waiting} served");
    assert!(node.wait_log("pausing accepts").contains("accept failed"));
    // Stuck at the limit, the loop sleeps between retries instead of spinning: a spinning
    // loop would burn the whole second. This is a bound on CPU, not on speed.
    let before = cpu_time(node.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time(node.pid()) - before;
    assert!(
        used < Duration::from_millis(300),
        "server used {used:?} of CPU in 1 s while out of descriptors"
    );
    // Free descriptors: the waiting connections are served.
    socks.drain(..first_waiting);
    for s in &mut socks {
        assert_eq!(status_of(s, WAIT), Some(101));
    }
}

#[test]
fn read_budget_spreads_a_burst_over_turns_without_losing_bytes() {
    // With a budget of 3 messages per turn, a burst of 300 frames in one TCP write is read over
    // many turns; the bytes read ahead but not consumed must carry over intact.
    let node = Node::start(&["--read-budget", "3", "--threads", "1"]);
    let mut c = node.client("/burst");
    c.sync("ready", WAIT).unwrap();
    let mut burst = Vec::new();
    for i in 0..300 {
        let payload = format!("m{i:03}-{}", "z".repeat(i % 200)).into_bytes();
        wire::encode_masked(&mut burst, wire::op::TEXT, &payload);
    }
    c.inner().get_mut().write_all(&burst).unwrap();
    for i in 0..300 {
        assert_eq!(
            c.recv_text(WAIT).unwrap(),
            format!("m{i:03}-{}", "z".repeat(i % 200))
        );
    }
}

/// Sends `n` messages 10 ms apart from `p` and reads them back on `s`; returns the server's
/// socket writes during that.
fn paced_writes(node: &Node, n: usize) -> u64 {
    let mut p = node.client("/paced");
    let mut s = node.client("/paced");
    p.sync("p", WAIT).unwrap();
    s.sync("s", WAIT).unwrap();
    recv_until(&mut p, "s");
    let before = node.metric("wsrelay_writes_total");
    for i in 0..n {
        p.send_text(&format!("m{i}")).unwrap();
        // Pacing the publisher, not synchronising: messages must not arrive as one burst.
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..n {
        assert_eq!(s.recv_text(WAIT).unwrap(), format!("m{i}"));
    }
    for i in 0..n {
        assert_eq!(p.recv_text(WAIT).unwrap(), format!("m{i}"));
    }
    // The /metrics request itself is one more write.
    node.metric("wsrelay_writes_total") - before - 1
}

#[test]
fn coalesce_lets_messages_share_writes() {
    let eager = Node::start(&["--threads", "1"]);
    let patient = Node::start(&["--threads", "1", "--coalesce", "500ms"]);
    let (w_eager, w_patient) = (paced_writes(&eager, 20), paced_writes(&patient, 20));
    // Two receivers: about one write per message each without coalescing, a handful with.
    assert!(w_eager >= 30, "eager: {w_eager} writes");
    assert!(w_patient <= 10, "coalescing: {w_patient} writes");
}

/// The subscriber connection authenticates as the URL says: with the password alone, and as
/// an ACL user. A node whose subscriber could not log in would deliver nothing from the other.
#[test]
fn redis_behind_a_password_and_as_an_acl_user() {
    let redis = Redis::start();
    let mut con = redis.con();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relay", "on", ">relay-secret-1", "~*", "&*", "+@all"])
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "default-secret-1"])
        .query(&mut con)
        .unwrap();
    let a = Node::start(&[
        "--redis",
        &format!("redis://:default-secret-1@127.0.0.1:{}", redis.port),
    ]);
    let b = Node::start(&[
        "--redis",
        &format!("redis://relay:relay-secret-1@127.0.0.1:{}", redis.port),
    ]);
    let mut ca = a.client("/locked");
    ca.sync("a ready", WAIT).unwrap();
    let mut cb = b.client("/locked");
    cb.sync("b ready", WAIT).unwrap();
    // Each node delivers what the other published, through its own subscriber connection.
    assert_eq!(ca.recv_text(WAIT).unwrap(), "b ready");
    ca.send_text("from a").unwrap();
    assert_eq!(cb.recv_text(WAIT).unwrap(), "from a");
    assert_eq!(ca.recv_text(WAIT).unwrap(), "from a");
    // The URL is logged at start, without its password.
    for (node, secret) in [(&a, "default-secret-1"), (&b, "relay-secret-1")] {
        let listening = node.wait_log("listening on");
        assert!(listening.contains(":***@"), "{listening}");
        assert!(node.log().iter().all(|l| !l.contains(secret)), "{:?}", node.log());
    }
}

/// A database number in the URL is where the history goes, from the publisher's own
/// connection as from the others: a v1 client's stored messages are read back (by a second
/// node, through its request connection) and are in that database, not in 0.
#[test]
fn redis_database_number_in_the_url_is_used() {
    let redis = Redis::start();
    let url = format!("{}/5", redis.url());
    let (a, b) = (Node::start(&["--redis", &url]), Node::start(&["--redis", &url]));
    let mut p = V1::connect(a.addr, None).unwrap();
    let mut epoch = String::new();
    for i in 0..3 {
        let r = p.publish("numbered", &format!("m{i}")).unwrap();
        assert_eq!(r["type"], "published", "{r}");
        epoch = r["epoch"].as_str().unwrap().to_owned();
    }
    let mut s = V1::connect(b.addr, None).unwrap();
    let r = s.subscribe("numbered", Some((0, &epoch))).unwrap();
    assert_eq!(
        (r["type"].as_str(), r["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{r}"
    );
    for i in 0..3 {
        assert_eq!(s.message(WAIT).unwrap()["data"], format!("m{i}"));
    }
    let mut con = redis.con();
    let in_0: usize = redis::cmd("DBSIZE").query(&mut con).unwrap();
    let _: () = redis::cmd("SELECT").arg(5).query(&mut con).unwrap();
    let in_5: usize = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert!(in_5 > 0, "nothing stored in database 5");
    assert_eq!(in_0, 0, "stored in database 0");
}

#[test]
fn redis_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("wsrelay-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("redis.sock");
    let mut redis = std::process::Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&sock)
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("redis+unix://{}", sock.display());
    wait_for("redis on its unix socket", WAIT, || {
        let mut con = redis::Client::open(url.as_str()).ok()?.get_connection().ok()?;
        redis::cmd("PING").query::<String>(&mut con).ok()
    });
    let node = Node::start(&["--redis", &url]);
    let mut c = node.client("/u");
    c.sync("through the unix socket", WAIT).unwrap();
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("u")
        .arg("from redis")
        .query(&mut con)
        .unwrap();
    assert_eq!(c.recv_text(WAIT).unwrap(), "from redis");
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
