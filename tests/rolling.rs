//! Restarting every node behind a load balancer, one after the other, while clients stay
//! connected and a publisher keeps publishing, measured (README "Deploying"):
//!
//! - HAProxy from `deploy/haproxy.cfg` in front of three nodes sharing one Redis;
//! - at least 1,000 `wsrelay.v1` clients through HAProxy (`tests/common/swarm.rs`), each on two
//!   of four channels, with sessions, reconnecting and resuming as the README describes;
//! - a publisher publishing steadily through HAProxy, acknowledged message by message;
//! - every node in turn gets SIGTERM, exits, and starts again on the same ports (rolling);
//!   or one node gets SIGKILL and starts again (crash).
//!
//! Every client must end with every message of its channels since it subscribed, in order,
//! each acknowledged one with the data published: after a rolling restart exactly once (not a
//! single duplicate reached a client), after a crash at least once with the duplicates dropped
//! by offset. No client may give up or be told `recovered: false`. The test prints reconnect
//! times, how many clients moved and the peak connection rate a node saw.
//!
//! Scale comes from the environment (`scripts/rolling-restart.sh` sets bigger numbers):
//! `WSRELAY_ROLLING_CLIENTS` (1000), `WSRELAY_ROLLING_RATE` (publishes per second, 20),
//! `WSRELAY_ROLLING_DRAIN_DELAY` (2s), `WSRELAY_ROLLING_DRAIN_PERIOD` (2s).

mod common;
#[path = "common/lb.rs"]
mod lb;
#[path = "common/swarm.rs"]
mod swarm;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// How long the cluster may take for anything (all clients back, a node restarted).
const SLOW: Duration = Duration::from_secs(60);
const CHANNELS: usize = 4;
const PER_CLIENT: usize = 2;

struct Scale {
    clients: usize,
    rate: f64,
    drain_delay: String,
    drain_period: String,
}

fn scale() -> Scale {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    Scale {
        clients: var("WSRELAY_ROLLING_CLIENTS", "1000").parse().unwrap(),
        rate: var("WSRELAY_ROLLING_RATE", "20").parse().unwrap(),
        drain_delay: var("WSRELAY_ROLLING_DRAIN_DELAY", "2s"),
        drain_period: var("WSRELAY_ROLLING_DRAIN_PERIOD", "2s"),
    }
}

/// Redis, three nodes (each restartable on its ports) and HAProxy.
struct Cluster {
    nodes: Vec<Node>,
    listen: Vec<SocketAddr>,
    proxy: Vec<SocketAddr>,
    args: Vec<String>,
    haproxy: lb::Haproxy,
    redis: Redis,
}

impl Cluster {
    fn start(bin: &std::path::Path, scale: &Scale) -> Cluster {
        let redis = Redis::start();
        let args: Vec<String> = [
            "--redis",
            &redis.url(),
            "--threads",
            "1",
            "--drain-delay",
            &scale.drain_delay,
            "--drain-period",
            &scale.drain_period,
        ]
        .map(str::to_owned)
        .to_vec();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(["--proxy-listen", "127.0.0.1:0"]);
            nodes.push(Node::start(&a));
        }
        let listen: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let proxy: Vec<SocketAddr> = nodes.iter().map(Node::proxy_addr).collect();
        let haproxy = lb::Haproxy::start(bin, [proxy[0], proxy[1], proxy[2]]);
        haproxy.wait_all_up();
        Cluster {
            nodes,
            listen,
            proxy,
            args,
            haproxy,
            redis,
        }
    }

    /// Starts node `i` again on its ports and waits until HAProxy has it UP.
    fn restart(&mut self, i: usize) {
        let proxy = self.proxy[i].to_string();
        let mut a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        a.extend(["--proxy-listen", &proxy]);
        self.nodes[i] = Node::start_on(&self.listen[i].to_string(), &a);
        self.haproxy.wait_status(lb::HAPROXY_SERVERS[i], "UP", SLOW);
    }
}

/// What the publisher got acknowledged: (channel, offset) → data.
struct Published {
    acked: HashMap<(String, u64), String>,
    /// Publishes whose connection closed before the acknowledgement: stored or not.
    unknown: usize,
    reconnects: usize,
}

/// Publishes `rate` messages a second through `target`, round robin over `channels`, until
/// `stop`; reconnects (through the balancer) whenever its connection goes.
fn publisher(
    target: SocketAddr,
    channels: Vec<String>,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Published> {
    std::thread::spawn(move || {
        let mut out = Published {
            acked: HashMap::new(),
            unknown: 0,
            reconnects: 0,
        };
        let start = Instant::now();
        let mut con: Option<V1> = None;
        let mut seq = 0u64;
        while !stop.load(Ordering::Acquire) {
            let Some(p) = con.as_mut() else {
                match V1::connect(target, None) {
                    Ok(p) => con = Some(p),
                    Err(_) => {
                        out.reconnects += 1;
                        // Pacing a retry, not waiting for an event.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                continue;
            };
            let channel = &channels[seq as usize % channels.len()];
            let data = format!("m{seq}");
            seq += 1;
            match p.publish(channel, &data) {
                Ok(ack) if ack["type"] == "published" => {
                    let offset = ack["offset"].as_u64().expect("offset in the ack");
                    out.acked.insert((channel.clone(), offset), data);
                }
                Ok(other) => panic!("publish refused: {other}"),
                Err(_) => {
                    out.unknown += 1;
                    out.reconnects += 1;
                    con = None;
                }
            }
            // Steady rate: the next publish is due at seq / rate.
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        out
    })
}

/// Samples every node's WebSocket connections accepted (accepts minus plain HTTP requests)
/// every 100 ms until `stop`; returns, per node, the most accepted within one second.
fn sampler(nodes: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut last: Vec<Option<u64>> = vec![None; nodes.len()];
        let mut per_second: Vec<HashMap<u64, u64>> = vec![HashMap::new(); nodes.len()];
        while !stop.load(Ordering::Acquire) {
            for (i, addr) in nodes.iter().enumerate() {
                let body = match metrics_of(*addr) {
                    Ok(body) => body,
                    // Down or restarting: the next process counts from zero.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        last[i] = Some(0);
                        continue;
                    }
                    // Too busy to answer in time: the next sample covers this one.
                    Err(_) => continue,
                };
                let ws = metric_value(&body, "wsrelay_accepted_total")
                    .saturating_sub(metric_value(&body, "wsrelay_http_requests_total"));
                let before = last[i].unwrap_or(ws);
                // The difference wobbles by a request or two (a health check accepted, not yet
                // answered); a much smaller count is a new process started between two samples.
                let delta = if ws + 16 < before {
                    ws
                } else {
                    ws.saturating_sub(before)
                };
                last[i] = Some(ws);
                *per_second[i].entry(start.elapsed().as_secs()).or_default() += delta;
            }
            // A sampling period, not a synchronisation.
            std::thread::sleep(Duration::from_millis(100));
        }
        per_second
            .iter()
            .map(|m| m.values().copied().max().unwrap_or(0))
            .collect()
    })
}

fn metrics_of(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    if resp.is_empty() {
        // Killed between reading the request and answering it: the kernel closed the socket.
        return Err(std::io::Error::other("/metrics: closed without an answer"));
    }
    match parse_response(&resp) {
        (200, body) => Ok(body),
        (status, _) => Err(std::io::Error::other(format!("/metrics: {status}"))),
    }
}

/// Waits until every stored session has its channels' positions (offset and epoch): what a
/// resume after a crash reads.
fn sessions_stored(redis: &Redis, clients: usize) {
    let mut con = redis.con();
    wait_for("every session stored with positions", SLOW, || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("wsrelay:session:*")
            .query(&mut con)
            .unwrap();
        let positioned = keys
            .iter()
            .filter(|k| {
                let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(k).query(&mut con).unwrap();
                let channels: Vec<&String> = fields
                    .iter()
                    .filter(|(f, _)| f.starts_with("c:"))
                    .map(|(_, v)| v)
                    .collect();
                channels.len() == PER_CLIENT && channels.iter().all(|v| !v.ends_with(" -"))
            })
            .count();
        (positioned >= clients).then_some(())
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    /// SIGTERM, wait for the exit, start again: every node in turn.
    Rolling,
    /// SIGKILL one node once every session has been written with its position, start it
    /// again once HAProxy has it DOWN.
    Crash,
    /// The same right after the clients subscribed, before the periodic session flush.
    CrashBeforeFlush,
    /// SIGKILL every node in turn, each started again once HAProxy has it DOWN, from right
    /// after the clients subscribed (the case issue 11 measured: 101 clients told
    /// `recovered: false` and 938 acknowledged deliveries missing with 300 clients).
    CrashEach,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(scenario: Scenario) {
    let test = format!("rolling::{scenario:?}");
    let Some(bin) = lb::binary_or_skip("haproxy", "haproxy", &test) else {
        return;
    };
    let scale = scale();
    let began = Instant::now();
    let mut cluster = Cluster::start(&bin, &scale);
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("room{c}")).collect();
    let swarm = swarm::Swarm::start(swarm::Config {
        target: cluster.haproxy.addr,
        clients: scale.clients,
        channels: channels.clone(),
        per_client: PER_CLIENT,
        threads: 2,
    });
    let progress = swarm.progress.clone();
    wait_for("every client connected and subscribed", SLOW, || {
        (progress.ready.load(Ordering::Acquire) == scale.clients).then_some(())
    });
    let spread: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.metric("wsrelay_websockets"))
        .collect();
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishing_since = Instant::now();
    let publishing = publisher(
        cluster.haproxy.addr,
        channels.clone(),
        scale.rate,
        stop_publishing.clone(),
    );
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampling = sampler(cluster.listen.clone(), stop_sampling.clone());
    if !matches!(scenario, Scenario::CrashBeforeFlush | Scenario::CrashEach) {
        // Sessions as they are a few seconds into a connection: with their positions written.
        sessions_stored(&cluster.redis, scale.clients);
    }

    let restarting = Instant::now();
    let mut steps = Vec::new();
    match scenario {
        Scenario::Rolling => {
            for i in 0..3 {
                let t = Instant::now();
                cluster.nodes[i].signal(libc::SIGTERM);
                let status = cluster.nodes[i].wait_exit(SLOW);
                assert_eq!(status.code(), Some(0), "node{} after SIGTERM", i + 1);
                let exited = t.elapsed();
                cluster.restart(i);
                wait_for("every client back", SLOW, || {
                    (progress.ready.load(Ordering::Acquire) == scale.clients).then_some(())
                });
                steps.push((exited, t.elapsed()));
            }
        }
        Scenario::Crash | Scenario::CrashBeforeFlush => {
            let on: Vec<usize> = cluster
                .nodes
                .iter()
                .map(|n| n.metric("wsrelay_websockets") as usize)
                .collect();
            let busiest = (0..3).max_by_key(|&i| on[i]).unwrap();
            let lost_before = progress.lost.load(Ordering::Acquire);
            let t = Instant::now();
            cluster.nodes[busiest].kill();
            // Back: the killed node's clients noticed (its count may include the publisher,
            // which is not a swarm client: one less), and every client is subscribed again.
            wait_for("every client back", SLOW, || {
                let noticed = progress.lost.load(Ordering::Acquire) - lost_before;
                let ready = progress.ready.load(Ordering::Acquire) == scale.clients;
                (noticed + 1 >= on[busiest] && ready).then_some(())
            });
            let back = t.elapsed();
            // Publishing goes on over two nodes until HAProxy has seen the crash.
            let name = lb::HAPROXY_SERVERS[busiest];
            cluster.haproxy.wait_status(name, "DOWN", SLOW);
            cluster.restart(busiest);
            steps.push((back, t.elapsed()));
        }
        Scenario::CrashEach => {
            for i in 0..3 {
                let on = cluster.nodes[i].metric("wsrelay_websockets") as usize;
                let lost_before = progress.lost.load(Ordering::Acquire);
                let t = Instant::now();
                cluster.nodes[i].kill();
                wait_for("every client back", SLOW, || {
                    let noticed = progress.lost.load(Ordering::Acquire) - lost_before;
                    let ready = progress.ready.load(Ordering::Acquire) == scale.clients;
                    (noticed + 1 >= on && ready).then_some(())
                });
                let back = t.elapsed();
                cluster.haproxy.wait_status(lb::HAPROXY_SERVERS[i], "DOWN", SLOW);
                cluster.restart(i);
                steps.push((back, t.elapsed()));
            }
        }
    }
    let restarted = restarting.elapsed();

    // Publishing goes on for a moment on the restarted cluster, then stops; a last message on
    // every channel marks the end.
    stop_publishing.store(true, Ordering::Release);
    let published = publishing.join().unwrap();
    let publish_rate = published.acked.len() as f64 / publishing_since.elapsed().as_secs_f64();
    let mut last = V1::connect(cluster.haproxy.addr, None).unwrap();
    let mut targets = HashMap::new();
    for c in &channels {
        let ack = last.publish(c, "end").unwrap();
        targets.insert(c.clone(), ack["offset"].as_u64().unwrap());
    }
    progress.set_targets(targets.clone());
    wait_for("every client to have every message", SLOW, || {
        (progress.caught_up.load(Ordering::Acquire) == scale.clients).then_some(())
    });
    stop_sampling.store(true, Ordering::Release);
    let peaks = sampling.join().unwrap();
    let reports = swarm.stop();

    // Every client: no surprise, every message once and in order, the published data.
    let mut failing: Vec<String> = reports
        .iter()
        .filter(|r| !r.failures.is_empty() || !r.ready)
        .map(|r| format!("client {}: ready {} {:?}", r.id, r.ready, r.failures))
        .collect();
    let mut duplicates = 0;
    let mut delivered = 0;
    for r in &reports {
        for c in &r.channels {
            duplicates += c.duplicates;
            delivered += c.got.len();
            let top = targets[&c.name];
            let want: Vec<u64> = (c.start + 1..=top).collect();
            let got: Vec<u64> = c.got.iter().map(|(o, _)| *o).collect();
            if got != want {
                failing.push(format!(
                    "client {} {}: {} messages after {}, want {} up to {top}",
                    r.id,
                    c.name,
                    got.len(),
                    c.start,
                    want.len()
                ));
            }
            for (o, data) in &c.got {
                if let Some(sent) = published.acked.get(&(c.name.clone(), *o)) {
                    if sent != data {
                        failing.push(format!("client {} {}@{o}: {data:?} ≠ {sent:?}", r.id, c.name));
                    }
                }
            }
        }
    }
    let mut times: Vec<Duration> = reports.iter().flat_map(|r| r.reconnects.clone()).collect();
    times.sort();
    let moved = reports.iter().filter(|r| !r.reconnects.is_empty()).count();
    let closes_1001 = reports
        .iter()
        .flat_map(|r| &r.closes)
        .filter(|c| **c == Some(1001))
        .count();
    let dropped = reports
        .iter()
        .flat_map(|r| &r.closes)
        .filter(|c| c.is_none())
        .count();
    let worst_attempts = reports.iter().map(|r| r.worst_attempts).max().unwrap_or(0);
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "== {scenario:?}: {} clients through HAProxy, 3 nodes (debug={}), drain delay {} / period {}\n\
         clients per node before: {spread:?}\n\
         published: {} acknowledged ({publish_rate:.0}/s of {}/s asked), {} unknown (connection lost before the ack), publisher reconnects {}\n\
         restart steps (node exited or clients back, then node UP and every client back): {:?}\n\
         whole restart: {} s\n\
         clients moved: {moved} ({} reconnects; closes 1001: {closes_1001}, connections dropped: {dropped})\n\
         reconnect time (lost → resumed, all channels back): p50 {}, p99 {}, max {} \n\
         most failed attempts in a row: {worst_attempts}\n\
         peak WebSocket connections accepted per second, per node: {peaks:?}\n\
         delivered {delivered} messages, duplicates dropped by offset: {duplicates}\n\
         test took {:.1} s",
        scale.clients,
        cfg!(debug_assertions),
        scale.drain_delay,
        scale.drain_period,
        published.acked.len(),
        scale.rate,
        published.unknown,
        published.reconnects,
        steps
            .iter()
            .map(|(a, b)| format!("{} / {}", ms(*a), ms(*b)))
            .collect::<Vec<_>>(),
        restarted.as_secs_f64().round(),
        times.len(),
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(times.last().copied().unwrap_or_default()),
        began.elapsed().as_secs_f64(),
    );
    failing.truncate(20);
    assert!(failing.is_empty(), "{scenario:?}: {failing:#?}");
    assert!(moved > 0, "no client moved");
    if scenario == Scenario::Rolling {
        assert_eq!(duplicates, 0, "a graceful restart repeated messages");
        assert_eq!(
            dropped, 0,
            "a graceful restart dropped connections without a close"
        );
        assert_eq!(moved, scale.clients, "every node restarted: every client moved");
    }
    assert!(!published.acked.is_empty());
}

#[test]
fn rolling_restart_behind_haproxy_loses_and_repeats_nothing() {
    run(Scenario::Rolling);
}

#[test]
fn node_crash_behind_haproxy_loses_nothing() {
    run(Scenario::Crash);
}

/// Every node SIGKILLed in turn, the first right after the clients subscribed: every client
/// ends with every acknowledged message, none told `recovered: false`.
#[test]
fn every_node_crashing_in_turn_loses_nothing() {
    run(Scenario::CrashEach);
}

/// A crash within `--session-flush` of the clients' subscribe, before any periodic flush:
/// the stored sessions must already hold the channels' positions (issue 11), or the resume
/// elsewhere answers `recovered: false` although the history covers the gap.
#[test]
fn node_crash_right_after_subscribing_loses_nothing() {
    run(Scenario::CrashBeforeFlush);
}
