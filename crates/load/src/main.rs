//! `wsrelay-load`: the load generator's command line. Parses the flags, resolves them into a
//! [`LoadConfig`], runs it and prints the report (a table, or JSON with `--json`). Everything
//! it measures and how is in the `wsrelay_load` library; `--help` lists the flags.
//!
//! Exit status: 0 when every expected delivery arrived once and in order, 2 when the run
//! measured loss, reordering or duplicates, 1 when it could not run.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use wsrelay::cli::parse_duration;
use wsrelay_load::{self as load, LoadConfig, sys};

const EXAMPLES: &str = "\
Examples (server pid in $SRV; the report's WARNING lines say when the generator, not the
server, was the bottleneck):

  # 1,000 subscribers on one channel, 2,000 msg/s of 64 B, server CPU per delivery
  wsrelay-load --url ws://127.0.0.1:9000/ -n 1000 --rate 2000 --server-pid $SRV

  # rooms: 1,000 channels of 2 connections, each room's first one publishing (through the
  # server, so with --redis every message runs the history script)
  wsrelay-load --url ws://127.0.0.1:9000/r -n 2000 -k 1000 --rate 20000 --server-pid $SRV

  # latency at 100 msg/s, published straight into Redis (the Redis hop is in the latency)
  wsrelay-load --url ws://127.0.0.1:9000/ -n 1000 --rate 100 --publish-via redis://127.0.0.1:6379

  # server memory per idle connection over 19,000 connections from 4 source addresses
  wsrelay-load --url ws://127.0.0.1:9000/ -n 19000 --rate 0 --warmup 0s --duration 2s \\
      --source-ips 127.0.0.1-127.0.0.4 --server-pid $SRV

  # more connections than one process may open: observers first, then one publisher
  wsrelay-load --observe --url ws://127.0.0.1:9000/ -n 15000 --source-ips 127.0.0.11-12 &
  (wait for its \"ready\" line)
  wsrelay-load --url ws://127.0.0.1:9000/ -n 15000 --rate 5 --source-ips 127.0.0.21-22

Exit status: 0 every delivery arrived once and in order; 2 loss, reordering or duplicates; 1 error.";

/// Load generator for raw-protocol WebSocket pub/sub servers (wsrelay, the Node baseline):
/// many connections, a timed publisher, and exact loss / order / latency accounting.
#[derive(Debug, Parser)]
#[command(name = "wsrelay-load", version, about, long_about = None, after_help = EXAMPLES)]
struct Args {
    /// Server URL; the path names the channel. PORT may be a list or range (9000,9001 or
    /// 9000-9003) to spread connections over several nodes. Repeatable.
    #[arg(long, value_name = "ws://HOST:PORT/PATH", required = true)]
    url: Vec<String>,
    /// Total connections (each channel's first one also publishes)
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Channels; subscribers per channel = connections / channels
    #[arg(long, short = 'k', default_value_t = 1)]
    channels: usize,
    /// Total publish rate, messages per second over all channels (0: hold idle connections)
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Message size, bytes (at least 41: sequence number and send time)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured window (e.g. 10s, 500ms)
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Publishing before the window: counted for loss, not for latency or CPU
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Source addresses for the connections (bind before connect), e.g. 127.0.0.1-127.0.0.20,
    /// to get past the ~28k ephemeral ports per source address
    #[arg(long, value_name = "LIST")]
    source_ips: Option<String>,
    /// Publish with Redis PUBLISH on this URL instead of through a WebSocket
    #[arg(long, value_name = "redis://HOST:PORT")]
    publish_via: Option<String>,
    /// Prefix of Redis channel names (the server's --redis-prefix)
    #[arg(long, default_value = "")]
    redis_prefix: String,
    /// Redis channel of the path / (the server's --default-channel)
    #[arg(long, default_value = "chat_channel")]
    default_channel: String,
    /// Only receive: account for another generator's messages on the same channels (for
    /// more connections than one process may open). Start observers first, wait for
    /// "ready", then start the publishing generator.
    #[arg(long)]
    observe: bool,
    /// Event-loop threads of the generator
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Server process to report CPU time and memory of (repeatable)
    #[arg(long, value_name = "PID")]
    server_pid: Vec<u32>,
    /// Connection attempts in flight at once
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Time allowed to connect everything, and again to see every subscription live
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    connect_timeout: Duration,
    /// Wait for deliveries in flight after publishing stops (observe: silence that ends the run)
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    drain: Duration,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

impl Args {
    fn into_config(self) -> Result<(LoadConfig, bool), String> {
        let mut targets = Vec::new();
        for u in &self.url {
            targets.extend(load::parse_url(u)?);
        }
        let source_ips = match &self.source_ips {
            Some(s) => sys::parse_source_ips(s)?,
            None => Vec::new(),
        };
        let cfg = LoadConfig {
            targets,
            connections: self.connections,
            channels: self.channels,
            rate: self.rate,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            source_ips,
            publish_via: self.publish_via,
            redis_prefix: self.redis_prefix,
            default_channel: self.default_channel,
            observe: self.observe,
            threads: self.threads,
            server_pids: self.server_pid,
            connect_concurrency: self.connect_concurrency,
            connect_timeout: self.connect_timeout,
            drain: self.drain,
        };
        cfg.validate()?;
        Ok((cfg, self.json))
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("wsrelay-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<bool, String> {
    let (cfg, json) = args.into_config()?;
    eprintln!(
        "wsrelay-load: {} connections, {} channels, {} msg/s of {} B, warmup {:?}, window {:?}{}",
        cfg.connections,
        cfg.channels,
        cfg.rate,
        cfg.size,
        cfg.warmup,
        cfg.duration,
        if cfg.observe { " (observe)" } else { "" }
    );
    let report = load::run_with_progress(cfg, |line| eprintln!("wsrelay-load: {line}"))?;
    if json {
        let out = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{out}");
        for w in &report.warnings {
            eprintln!("WARNING: {w}");
        }
    } else {
        print!("{}", report.table());
    }
    Ok(report.perfect())
}
