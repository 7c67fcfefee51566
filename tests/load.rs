//! The load generator against a real wsrelay process: every expected delivery must arrive,
//! once and in order, and the report must carry the server's CPU and memory.

mod common;

use std::time::Duration;

use common::*;
use wsrelay_load::{self as load, LoadConfig};

fn small_run(node: &Node, path: &str) -> LoadConfig {
    LoadConfig {
        targets: load::parse_url(&format!("ws://{}{path}", node.addr)).unwrap(),
        connections: 50,
        channels: 2,
        rate: 200.0,
        size: 64,
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(1),
        server_pids: vec![node.pid()],
        connect_timeout: WAIT,
        drain: WAIT,
        ..LoadConfig::default()
    }
}

#[track_caller]
fn assert_exact(r: &load::Report) {
    assert_eq!(r.established, 50, "{}", r.table());
    let p = r.publisher.as_ref().unwrap();
    assert!(p.sent > 0);
    // Every subscriber of a channel gets every message of that channel, sender included.
    assert_eq!(r.expected, p.sent * 25, "{}", r.table());
    assert_eq!(r.counts.received, r.expected, "{}", r.table());
    assert_eq!(r.counts.lost, 0, "{}", r.table());
    assert_eq!(r.counts.reordered, 0, "{}", r.table());
    assert_eq!(r.counts.duplicates, 0, "{}", r.table());
    assert_eq!(r.misrouted, 0, "{}", r.table());
    assert!(r.perfect());
    assert!(r.latency.samples > 0 && r.latency.p50_us > 0.0);
    assert!(r.measured <= r.counts.received);
    assert_eq!(r.servers.len(), 1);
    assert!(r.servers[0].rss_end > 0);
}

#[test]
fn in_process_broker_delivers_everything_in_order() {
    let node = Node::start(&["--threads", "2"]);
    let r = load::run(small_run(&node, "/load")).unwrap();
    assert_exact(&r);
}

#[test]
fn redis_mode_with_publish_via_redis_and_two_generator_threads() {
    let redis = Redis::start();
    let node = Node::start(&["--threads", "2", "--redis", &redis.url()]);
    let cfg = LoadConfig {
        publish_via: Some(redis.url()),
        threads: 2,
        source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
        ..small_run(&node, "/")
    };
    let r = load::run(cfg).unwrap();
    assert_exact(&r);
    assert_eq!(r.generator.thread_busy.len(), 2);
}

#[test]
fn an_unreachable_server_is_an_error_not_a_report() {
    let nobody = ClosedPort::new();
    let cfg = LoadConfig {
        targets: load::parse_url(&format!("ws://{}/", nobody.addr())).unwrap(),
        connections: 3,
        connect_timeout: WAIT,
        ..LoadConfig::default()
    };
    let e = load::run(cfg).unwrap_err();
    assert!(e.contains("no connection"), "{e}");
}

#[test]
fn an_observer_accounts_for_another_generators_messages() {
    let node = Node::start(&["--threads", "2"]);
    let observer_cfg = LoadConfig {
        connections: 20,
        channels: 1,
        observe: true,
        drain: Duration::from_secs(2),
        ..small_run(&node, "/shared")
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let observer = std::thread::spawn(move || {
        load::run_with_progress(observer_cfg, |line| {
            if line.starts_with("ready") {
                let _ = ready_tx.send(());
            }
        })
    });
    ready_rx.recv_timeout(WAIT).expect("observer ready");
    let publisher = load::run(LoadConfig {
        connections: 10,
        channels: 1,
        ..small_run(&node, "/shared")
    })
    .unwrap();
    let observed = observer.join().unwrap().unwrap();
    let sent = publisher.publisher.as_ref().unwrap().sent;
    assert!(publisher.perfect(), "{}", publisher.table());
    assert!(observed.perfect(), "{}", observed.table());
    assert_eq!(observed.expected, sent * 20, "{}", observed.table());
    assert!(observed.latency.samples > 0);
}
