//! End-to-end benchmark on loopback: starts the wsrelay binary (`--threads 1`) with the
//! in-process broker, and again in Redis mode against a `redis-server` it starts on a free
//! port, drives it with the load generator library (`wsrelay_load`, the engine of
//! `wsrelay-load`), and reports per mode:
//!
//! - deliveries per second, server CPU-seconds per million deliveries (and deliveries per
//!   server CPU-second), p50/p99/p999 publish-to-receipt latency, for a throughput run and a
//!   latency run (1 channel, every connection subscribed, 64-byte messages; in Redis mode the
//!   messages are published with Redis PUBLISH, so the Redis hop is in the latency);
//! - server memory per idle connection: VmRSS growth of a fresh server over N idle, subscribed
//!   connections, divided by N;
//! - Redis mode only, the rooms workload: many channels of two connections each, every room's
//!   first connection publishing through wsrelay, so every message runs the history script;
//!   server and Redis CPU per message beside latency and loss.
//!
//! It prints a table and writes the numbers to `target/wsrelay-bench.json`. Generator
//! warnings (it was saturated, or its publisher fell behind) are printed and kept in the JSON:
//! a run with a warning measured the generator, not the server.
//!
//! Default run: under a minute. Bigger runs through the environment:
//!
//! | variable                      | default      | meaning                                          |
//! |-------------------------------|--------------|--------------------------------------------------|
//! | `WSRELAY_BENCH_MODES`         | memory,redis | which brokers to measure                         |
//! | `WSRELAY_BENCH_CONNS`         | 500          | subscribers on the one channel                   |
//! | `WSRELAY_BENCH_RATE`          | 400          | throughput run, messages/s (× CONNS deliveries)  |
//! | `WSRELAY_BENCH_LATENCY_RATE`  | 100          | latency run, messages/s                          |
//! | `WSRELAY_BENCH_SECS`          | 4            | measured window of each run, seconds             |
//! | `WSRELAY_BENCH_WARMUP`        | 1            | warmup before each window, seconds               |
//! | `WSRELAY_BENCH_IDLE`          | 5000         | idle connections for the memory measurement      |
//! | `WSRELAY_BENCH_GEN_THREADS`   | 1            | load generator threads                           |
//! | `WSRELAY_BENCH_PIN`           | (none)       | `S:G`: server on CPU S, generator and Redis on G |
//! | `WSRELAY_BENCH_ROOMS`         | 500          | rooms run: channels (two connections each)       |
//! | `WSRELAY_BENCH_ROOMS_RATE`    | 5000         | rooms run: messages/s over all rooms             |
//!
//! The targets, on a 2-core box: `WSRELAY_BENCH_CONNS=1000 WSRELAY_BENCH_RATE=2000
//! WSRELAY_BENCH_IDLE=19000 WSRELAY_BENCH_SECS=10 WSRELAY_BENCH_PIN=0:1 cargo bench --bench e2e`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use wsrelay_load::{self as load, LoadConfig, Report};
use wsrelay_testkit::{Echo, Node, Redis, command, server_binary};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

struct Settings {
    modes: Vec<String>,
    conns: usize,
    rate: f64,
    latency_rate: f64,
    secs: f64,
    warmup: f64,
    idle: usize,
    gen_threads: usize,
    /// (server CPU, generator + Redis CPU)
    pin: Option<(usize, usize)>,
    rooms: usize,
    rooms_rate: f64,
}

impl Settings {
    fn from_env() -> Settings {
        let pin = std::env::var("WSRELAY_BENCH_PIN").ok().map(|v| {
            let (s, g) = v
                .split_once(':')
                .expect("WSRELAY_BENCH_PIN is SERVER_CPU:GENERATOR_CPU");
            (s.parse().expect("cpu number"), g.parse().expect("cpu number"))
        });
        Settings {
            modes: env_or("WSRELAY_BENCH_MODES", "memory,redis".to_string())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            conns: env_or("WSRELAY_BENCH_CONNS", 500),
            rate: env_or("WSRELAY_BENCH_RATE", 400.0),
            latency_rate: env_or("WSRELAY_BENCH_LATENCY_RATE", 100.0),
            secs: env_or("WSRELAY_BENCH_SECS", 4.0),
            warmup: env_or("WSRELAY_BENCH_WARMUP", 1.0),
            idle: env_or("WSRELAY_BENCH_IDLE", 5000),
            gen_threads: env_or("WSRELAY_BENCH_GEN_THREADS", 1),
            pin,
            rooms: env_or("WSRELAY_BENCH_ROOMS", 500),
            rooms_rate: env_or("WSRELAY_BENCH_ROOMS_RATE", 5000.0),
        }
    }
}

/// Starts the wsrelay binary with one loop (pinned to `cpu` when given), its warnings and
/// errors echoed.
fn start_server(redis: Option<&str>, cpu: Option<usize>) -> Node {
    let mut cmd = command(server_binary(), cpu);
    cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"]);
    if let Some(url) = redis {
        cmd.args(["--redis", url]);
    }
    Node::spawn_echo(&mut cmd, Echo::Problems("[wsrelay] "))
}

/// One line of the table.
#[derive(Serialize)]
struct Row {
    mode: String,
    run: String,
    connections: usize,
    rate: f64,
    deliveries_per_sec: f64,
    server_cpu_secs_per_million: f64,
    deliveries_per_server_cpu_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    lost: u64,
    reordered: u64,
    rss_bytes_per_idle_connection: Option<f64>,
    generator_busy: f64,
    warnings: Vec<String>,
    /// Rooms run: Redis CPU per message published (the history script and the deliveries).
    redis_cpu_us_per_msg: Option<f64>,
    report: Report,
}

fn row(mode: &str, run: &str, r: Report, idle: bool) -> Row {
    Row {
        mode: mode.into(),
        run: run.into(),
        connections: r.established,
        rate: r.rate,
        deliveries_per_sec: r.deliveries_per_sec,
        server_cpu_secs_per_million: r.server_cpu_secs_per_million,
        deliveries_per_server_cpu_sec: r.deliveries_per_server_cpu_sec,
        p50_ms: r.latency.p50_us / 1e3,
        p99_ms: r.latency.p99_us / 1e3,
        p999_ms: r.latency.p999_us / 1e3,
        lost: r.counts.lost,
        reordered: r.counts.reordered,
        rss_bytes_per_idle_connection: idle.then_some(r.rss_bytes_per_connection),
        generator_busy: r.generator.thread_busy.iter().cloned().fold(0.0, f64::max),
        warnings: r.warnings.clone(),
        redis_cpu_us_per_msg: None,
        report: r,
    }
}

/// The rooms run's row: the report's server figures count wsrelay and Redis together, so they
/// are split here, per message of the measured window.
fn rooms_row(mode: &str, r: Report) -> Row {
    let per_room = (r.connections / r.channels.max(1)).max(1) as f64;
    let messages = (r.measured as f64 / per_room).max(1.0);
    let (server, redis) = (r.servers[0].cpu_secs, r.servers[1].cpu_secs);
    let mut row = row(mode, "rooms", r, false);
    row.server_cpu_secs_per_million =
        server * 1e6 / row.deliveries_per_sec.max(1.0) / row.report.window_secs.max(1e-9);
    row.deliveries_per_server_cpu_sec = row.deliveries_per_sec * row.report.window_secs / server.max(1e-9);
    row.redis_cpu_us_per_msg = Some(redis * 1e6 / messages);
    row
}

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            eprintln!(
                "cannot pin the generator to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn target_dir() -> PathBuf {
    // The bench runs as target/<profile>/deps/e2e-<hash>.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument other than a flag selects nothing here.
    let s = Settings::from_env();
    if let Some((_, g)) = s.pin {
        // Threads spawned from here on (the generator's loops) inherit the mask.
        pin_self(g);
    }
    let server_cpu = s.pin.map(|(c, _)| c);
    let other_cpu = s.pin.map(|(_, g)| g);
    let mut rows = Vec::new();
    for mode in &s.modes {
        let redis = match mode.as_str() {
            "memory" => None,
            "redis" => Some(Redis::start_on_cpu(other_cpu)),
            other => panic!("WSRELAY_BENCH_MODES: unknown mode {other:?} (memory, redis)"),
        };
        let redis_url = redis.as_ref().map(Redis::url);
        let base = |server: &Node, rate: f64, conns: usize| LoadConfig {
            targets: load::parse_url(&format!("ws://{}/bench", server.addr)).unwrap(),
            connections: conns,
            channels: 1,
            rate,
            size: 64,
            warmup: Duration::from_secs_f64(s.warmup),
            duration: Duration::from_secs_f64(s.secs),
            publish_via: redis_url.clone(),
            threads: s.gen_threads,
            server_pids: vec![server.pid()],
            connect_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(5),
            ..LoadConfig::default()
        };
        for (run, rate) in [("throughput", s.rate), ("latency", s.latency_rate)] {
            let server = start_server(redis_url.as_deref(), server_cpu);
            eprintln!("e2e: {mode} {run}: {} subscribers, {rate} msg/s", s.conns);
            match load::run(base(&server, rate, s.conns)) {
                Ok(r) => rows.push(row(mode, run, r, false)),
                Err(e) => eprintln!("e2e: {mode} {run} failed: {e}"),
            }
        }
        // A fresh server, so memory freed by earlier runs does not hide the growth.
        let server = start_server(redis_url.as_deref(), server_cpu);
        eprintln!("e2e: {mode} idle memory: {} connections", s.idle);
        let idle = LoadConfig {
            warmup: Duration::ZERO,
            duration: Duration::from_millis(500),
            ..base(&server, 0.0, s.idle)
        };
        match load::run(idle) {
            Ok(r) => rows.push(row(mode, "idle", r, true)),
            Err(e) => eprintln!("e2e: {mode} idle failed: {e}"),
        }
        if let Some(redis) = &redis {
            let server = start_server(redis_url.as_deref(), server_cpu);
            eprintln!(
                "e2e: {mode} rooms: {} rooms of 2, {} msg/s",
                s.rooms, s.rooms_rate
            );
            let rooms = LoadConfig {
                targets: load::parse_url(&format!("ws://{}/room", server.addr)).unwrap(),
                connections: 2 * s.rooms,
                channels: s.rooms,
                publish_via: None,
                server_pids: vec![server.pid(), redis.pid()],
                ..base(&server, s.rooms_rate, 2 * s.rooms)
            };
            match load::run(rooms) {
                Ok(r) => rows.push(rooms_row(mode, r)),
                Err(e) => eprintln!("e2e: {mode} rooms failed: {e}"),
            }
        }
    }
    print_table(&rows);
    let out = target_dir().join("wsrelay-bench.json");
    let json = serde_json::json!({
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default().trim(),
            "pinned": s.pin.map(|(a, b)| format!("server cpu {a}, generator+redis cpu {b}")),
        },
        "rows": rows,
    });
    match std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()) {
        Ok(()) => println!("\nwritten to {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<7} {:<10} {:>6} {:>7} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8} {:>6} {:>9} {:>5}",
        "mode",
        "run",
        "conns",
        "msg/s",
        "deliv/s",
        "srvCPU-s/1M",
        "deliv/CPU-s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "lost",
        "B/idle",
        "gen%"
    );
    for r in rows {
        println!(
            "{:<7} {:<10} {:>6} {:>7.0} {:>12.0} {:>12.3} {:>12.0} {:>8.3} {:>8.3} {:>8.3} {:>6} {:>9} {:>5.0}",
            r.mode,
            r.run,
            r.connections,
            r.rate,
            r.deliveries_per_sec,
            r.server_cpu_secs_per_million,
            r.deliveries_per_server_cpu_sec,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.lost + r.reordered,
            r.rss_bytes_per_idle_connection
                .map_or("-".to_string(), |b| format!("{b:.0}")),
            r.generator_busy * 100.0,
        );
    }
    for r in rows {
        if let Some(us) = r.redis_cpu_us_per_msg {
            println!("{} {}: Redis CPU {us:.1} us per message", r.mode, r.run);
        }
    }
    for r in rows {
        for w in &r.warnings {
            println!("WARNING ({} {}): {w}", r.mode, r.run);
        }
    }
}
