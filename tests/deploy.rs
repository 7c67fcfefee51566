//! wsrelay behind load balancers (README "Deploying"): the plain HTTP that balancers' health
//! checks speak, and the committed configurations in `deploy/` run for real.

mod common;
#[path = "common/lb.rs"]
mod lb;

use std::time::{Duration, Instant};

use common::*;

/// Every plain endpoint answers HTTP/1.0 without a `Host` header, as HAProxy's `option httpchk`
/// sends it; a WebSocket upgrade still needs HTTP/1.1.
#[test]
fn plain_http_answers_http_1_0_without_host() {
    let node = Node::start(&["--api-key", "0123456789abcdef0123"]);
    for (request, want) in [
        ("GET /healthz HTTP/1.0\r\n\r\n", "ok\n"),
        ("GET /metrics HTTP/1.0\r\n\r\n", "wsrelay_accepted_total"),
        ("GET / HTTP/1.0\r\n\r\n", "<html"),
        ("GET /wsrelay.js HTTP/1.0\r\n\r\n", "export class WsRelay"),
        ("GET /healthz HTTP/1.1\r\n\r\n", "ok\n"),
        (
            "POST /publish?channel=c HTTP/1.0\r\nAuthorization: Bearer 0123456789abcdef0123\r\n\
             Content-Length: 2\r\n\r\nhi",
            "\"published\"",
        ),
    ] {
        let (status, body) = http_request(node.addr, request);
        assert_eq!(status, 200, "{request:?}: {body}");
        assert!(body.contains(want), "{request:?}: {body}");
    }
    let (status, _) = http_request(
        node.addr,
        "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, 400, "a WebSocket upgrade needs HTTP/1.1");
}

/// Three nodes on one Redis, each with a PROXY protocol listener, started with `extra` flags.
fn nodes(redis: &Redis, extra: &[&str]) -> [Node; 3] {
    let url = redis.url();
    let mut args = vec!["--redis", &url, "--proxy-listen", "127.0.0.1:0", "--threads", "1"];
    args.extend_from_slice(extra);
    [Node::start(&args), Node::start(&args), Node::start(&args)]
}

/// The committed HAProxy configuration in front of three nodes: its default health check
/// (HTTP/1.0, no Host, through the PROXY listener) marks them UP; WebSockets cross it and reach
/// each other through Redis; the nodes see each client's own address (PROXY v2); a node that
/// drains is taken out before it closes anyone, and new clients never see its 503.
#[test]
fn haproxy_config_checks_balances_and_drains() {
    let test = "haproxy_config_checks_balances_and_drains";
    let Some(bin) = lb::binary_or_skip("haproxy", "haproxy", test) else {
        return;
    };
    let redis = Redis::start();
    let flags = [
        "--max-connections-per-ip",
        "1",
        "--log-level",
        "debug",
        "--drain-delay",
        "3s",
        "--drain-period",
        "500ms",
    ];
    let mut n = nodes(&redis, &flags);
    let servers = [n[0].proxy_addr(), n[1].proxy_addr(), n[2].proxy_addr()];
    let h = lb::Haproxy::start(&bin, servers);
    h.wait_all_up();

    // Clients from different addresses, through HAProxy, on every node (leastconn).
    let from = |ip: &str| connect_from(ip, h.addr);
    let mut clients: Vec<Client> = (2..8)
        .map(|i| Client::handshake(from(&format!("127.0.0.{i}")), h.addr, "/lb", None).unwrap())
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("ready-{i}"), WAIT).unwrap();
    }
    for node in &n {
        assert!(
            node.metric("wsrelay_websockets") >= 1,
            "leastconn spreads 6 clients over 3 nodes"
        );
    }
    clients[0].send_text("across nodes").unwrap();
    for c in &mut clients {
        recv_until(c, "across nodes");
    }
    // The nodes count the client's address, not HAProxy's: more connections from 127.0.0.2
    // than there are nodes, so at least one lands where 127.0.0.2 already has one.
    let mut extra = Vec::new();
    let mut refused = 0;
    for _ in 0..3 {
        match Client::handshake(from("127.0.0.2"), h.addr, "/lb", None) {
            Ok(c) => extra.push(c),
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused >= 1,
        "127.0.0.2 was never limited: HAProxy's address was counted"
    );
    let logged = n
        .iter()
        .flat_map(|node| node.log())
        .find(|l| l.contains("over --max-connections-per-ip"))
        .unwrap();
    assert!(logged.contains("127.0.0.2:"), "{logged}");
    clients.append(&mut extra);
    for (i, c) in clients.iter_mut().enumerate() {
        c.sync(&format!("all-{i}"), WAIT).unwrap();
    }
    // Counters stay private.
    let (status, _) = http_request(h.addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 403);

    // Drain node1: HAProxy sees "draining" and takes it out before any client is closed;
    // meanwhile new clients are retried elsewhere and never see the 503.
    let on_node1 = n[0].metric("wsrelay_websockets");
    assert!(on_node1 >= 1);
    n[0].signal(libc::SIGTERM);
    let signalled = Instant::now();
    h.wait_status("node1", "DOWN", WAIT);
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "HAProxy took {:?} to notice the drain",
        signalled.elapsed()
    );
    assert_eq!(
        n[0].metric("wsrelay_websockets"),
        on_node1,
        "closed before HAProxy noticed"
    );
    let mut late: Vec<Client> = (0..6)
        .map(|i| {
            let mut c = Client::handshake(from(&format!("127.0.1.{i}")), h.addr, "/lb", None)
                .expect("a new client during the drain");
            c.sync(&format!("during-{i}"), WAIT).unwrap();
            c
        })
        .collect();
    assert_eq!(n[0].wait_exit(WAIT).code(), Some(0));
    // node1's clients got 1001; the others are still served.
    late[0].send_text("after").unwrap();
    let mut away = 0;
    for c in &mut clients {
        loop {
            match c.recv(WAIT).unwrap() {
                Received::Closed(f) => {
                    assert_eq!(f.map(|f| f.0), Some(1001));
                    away += 1;
                    break;
                }
                Received::Text(t) if t == "after" => break,
                _ => {}
            }
        }
    }
    assert_eq!(away, on_node1 as usize);
    assert!(
        h.log().iter().any(|l| l.contains("node1 is DOWN")),
        "{:?}",
        h.log()
    );
}

/// The committed nginx site in front of three nodes: WebSockets cross it; the nodes believe
/// its X-Forwarded-For (`--trusted-proxy`) and nobody else's; a draining node's upgrades go
/// to the others.
#[test]
fn nginx_config_proxies_websockets_and_forwards_addresses() {
    let test = "nginx_config_proxies_websockets_and_forwards_addresses";
    let Some(bin) = lb::binary_or_skip("nginx", "nginx-light", test) else {
        return;
    };
    let redis = Redis::start();
    let flags = [
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
        "--drain-delay",
        "5s",
        "--drain-period",
        "0",
    ];
    let mut n = nodes(&redis, &flags);
    let ngx = lb::Nginx::start(&bin, [n[0].addr, n[1].addr, n[2].addr]);
    let from = |ip: &str, xff: Option<&str>| {
        let s = connect_from(ip, ngx.addr);
        let mut req =
            tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/nx", ngx.addr))
                .unwrap();
        if let Some(v) = xff {
            req.headers_mut().insert("X-Forwarded-For", v.parse().unwrap());
        }
        tungstenite::client::client(req, s)
            .map(|(ws, _)| ws)
            .map_err(|e| e.to_string())
    };
    // Clients from 127.0.0.2..7 each claiming to be 203.0.113.1: nginx appends what it saw,
    // and the nodes (trusting only nginx, at 127.0.0.1) count each by its own address.
    let mut clients: Vec<_> = (2..8)
        .map(|i| from(&format!("127.0.0.{i}"), Some("203.0.113.1")).expect("upgrade through nginx"))
        .collect();
    for node in &n {
        assert!(
            node.metric("wsrelay_websockets") >= 1,
            "least_conn spreads 6 clients over 3 nodes"
        );
    }
    // More connections from 127.0.0.2 than nodes, each with another forged address: limited.
    // (Those that get through stay open, so the count holds.)
    let attempts: Vec<_> = (0..3)
        .map(|i| from("127.0.0.2", Some(&format!("198.51.100.{i}"))))
        .collect();
    let refused = attempts
        .iter()
        .filter_map(|r| r.as_ref().err())
        .inspect(|e| assert!(e.to_string().contains("429"), "{e}"))
        .count();
    assert!(refused >= 1, "a forged X-Forwarded-For was believed");
    // Messages cross nginx and Redis (each client first sees its own message: subscribed).
    let until = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>, text: &str| {
        ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        loop {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) if t.as_str() == text => break,
                _ => {}
            }
        }
    };
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(tungstenite::Message::text(format!("ready-{i}"))).unwrap();
        until(ws, &format!("ready-{i}"));
    }
    clients[0]
        .send(tungstenite::Message::text("through nginx"))
        .unwrap();
    for ws in &mut clients {
        until(ws, "through nginx");
    }
    let (status, _) = http_request(ngx.addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 404, "counters stay private");

    // A draining node: every new upgrade through nginx still succeeds (its 503 sends nginx to
    // the next node), and its own clients get 1001.
    n[1].signal(libc::SIGTERM);
    wait_for("node2 draining", WAIT, || {
        (n[1].http_get("/healthz").0 == 503).then_some(())
    });
    let refused_by_node2 = || {
        let (_, body) = n[1].http_get("/metrics");
        body.lines()
            .find(|l| l.starts_with("wsrelay_handshake_failures_total{reason=\"draining\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // New clients until nginx has tried node2 (least_conn picks it soon), all served.
    let mut during = Vec::new();
    wait_for("nginx to try the draining node", WAIT, || {
        let i = during.len();
        let r = from(&format!("127.0.2.{i}"), None);
        assert!(r.is_ok(), "upgrade {i} during the drain: {:?}", r.err());
        during.push(r);
        (refused_by_node2() >= 1).then_some(())
    });
    // node2's clients are closed (1001), the others stay.
    let status = n[1].wait_exit(WAIT);
    assert_eq!(status.code(), Some(0));
    let mut away = 0;
    // From a client that nginx placed during the drain: not on node2.
    let sender = during[0].as_mut().unwrap();
    sender.send(tungstenite::Message::text("after")).unwrap();
    for ws in &mut clients {
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Close(f)) => {
                    assert_eq!(f.map(|f| u16::from(f.code)), Some(1001));
                    away += 1;
                    break;
                }
                Ok(tungstenite::Message::Text(t)) if t.as_str() == "after" => break,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(away >= 1, "node2 had clients");

    // node2 comes back on its address: nginx sends it new clients at once (least_conn: it has
    // none). A node nginx counted as failed (its 503s while draining, then its closed port)
    // must not be held out: with max_fails, nginx lets one request through per fail_timeout
    // to see whether the node is back, and counts it as back only when that request ends,
    // which a WebSocket does not do for hours.
    let url = redis.url();
    let mut args = vec!["--redis", &url, "--proxy-listen", "127.0.0.1:0", "--threads", "1"];
    args.extend_from_slice(&flags);
    n[1] = Node::start_on(&n[1].addr.to_string(), &args);
    let back: Vec<_> = (0..10)
        .map(|i| from(&format!("127.0.3.{i}"), None).expect("upgrade after the restart"))
        .collect();
    let on_node2 = n[1].metric("wsrelay_websockets");
    assert!(
        on_node2 >= 5,
        "the restarted node got {on_node2} of {} new clients",
        back.len()
    );
}

/// `deploy/wsrelay.service`: systemd accepts it, its stop policy fits the drain its own flags
/// ask for, and its ExecStart line runs (addresses swapped for the test's) and drains on the
/// unit's KillSignal within TimeoutStopSec.
#[test]
fn systemd_unit_is_valid_and_outlasts_the_drain() {
    let test = "systemd_unit_is_valid_and_outlasts_the_drain";
    let path = lb::deploy_dir().join("wsrelay.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    let service = unit_section(&unit, "Service");
    let get = |key: &str| {
        let v: Vec<&str> = service
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(v.len(), 1, "{key}= must be set once in [Service]");
        v[0]
    };
    assert_eq!(get("KillSignal"), "SIGTERM", "SIGTERM is what drains");
    let restart = get("Restart");
    assert!(
        ["always", "on-failure", "on-abnormal"].contains(&restart),
        "Restart={restart}: a crashed node must come back"
    );
    let nofile: u64 = get("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!(
        nofile >= 65_536,
        "LimitNOFILE={nofile}: one descriptor per client"
    );

    // The flags ExecStart gives, parsed and validated as the binary does.
    let exec: Vec<&str> = get("ExecStart").split_whitespace().collect();
    assert!(exec[0].ends_with("/wsrelay"), "{exec:?}");
    let cli = <wsrelay::cli::Cli as clap::Parser>::try_parse_from(
        std::iter::once("wsrelay").chain(exec[1..].iter().copied()),
    )
    .unwrap_or_else(|e| panic!("ExecStart flags: {e}"));
    let config = cli.into_config().unwrap();
    let drain = config.drain_delay + config.drain_period + config.shutdown_timeout;
    let stop = systemd_seconds(get("TimeoutStopSec"));
    assert!(
        stop > drain,
        "TimeoutStopSec={stop:?} must exceed --drain-delay + --drain-period + --shutdown-timeout = {drain:?}"
    );

    let bin = env!("CARGO_BIN_EXE_wsrelay");
    match lb::find_binary("systemd-analyze") {
        Some(analyze) => {
            // `verify` checks the ExecStart binary exists: point it at the one just built.
            let dir = lb::TempDir::new("systemd");
            let from = format!("ExecStart={}", exec[0]);
            let rendered = lb::render(&unit, &[(&from, format!("ExecStart={bin}"))]);
            let copy = dir.0.join("wsrelay.service");
            std::fs::write(&copy, rendered).unwrap();
            let out = std::process::Command::new(analyze)
                .arg("verify")
                .arg(&copy)
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "systemd-analyze verify: {said}");
            let complaints: Vec<&str> = said.lines().filter(|l| l.contains("wsrelay.service")).collect();
            assert!(complaints.is_empty(), "systemd-analyze verify: {complaints:?}");
        }
        None => {
            assert!(
                std::env::var_os("WSRELAY_REQUIRE_DEPLOY").is_none(),
                "{test}: systemd-analyze not found and WSRELAY_REQUIRE_DEPLOY is set (apt-get install systemd)"
            );
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("SKIPPED {test} (systemd-analyze verify only): systemd-analyze not found\n")
                    .as_bytes(),
            );
        }
    }

    // ExecStart itself, on the test's addresses and Redis.
    let redis = Redis::start();
    let line = lb::render(
        &exec[1..].join(" "),
        &[
            ("0.0.0.0:9000", "127.0.0.1:0".to_owned()),
            ("0.0.0.0:9001", "127.0.0.1:0".to_owned()),
            ("redis://127.0.0.1:6379", redis.url()),
        ],
    );
    let mut node = Node::spawn(std::process::Command::new(bin).args(line.split_whitespace()));
    assert!(
        V1::connect(node.proxy_addr(), None).is_err(),
        "the PROXY listener takes no plain clients"
    );
    let mut c = V1::connect(node.addr, None).unwrap();
    c.subscribe("unit", None).unwrap();
    let t = Instant::now();
    node.signal(libc::SIGTERM);
    match c.client.recv(stop).unwrap() {
        Received::Closed(f) => assert_eq!(f.map(|f| f.0), Some(1001)),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() >= config.drain_delay, "closed before --drain-delay");
    drop(c);
    let status = node.wait_exit(stop.saturating_sub(t.elapsed()));
    assert_eq!(status.code(), Some(0));
    assert!(t.elapsed() < stop, "systemd would have killed it");
}

/// The `key=value` lines of one `[section]` of a unit file (comments and blanks skipped).
fn unit_section<'a>(unit: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
    let header = format!("[{name}]");
    unit.lines()
        .map(str::trim)
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// A systemd time span as this unit writes it: `30s`, `2min`, `1min 30s` or bare seconds.
fn systemd_seconds(v: &str) -> Duration {
    v.split_whitespace()
        .map(|part| {
            let digits = part.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
            match &part[digits.len()..] {
                "" | "s" | "sec" => Duration::from_secs(n),
                "min" | "m" => Duration::from_secs(60 * n),
                unit => panic!("time span unit {unit:?} in {v:?}"),
            }
        })
        .sum()
}
