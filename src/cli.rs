//! Command-line flags: parsed here, resolved into a [`Config`] by [`Cli::into_config`]. Defaults
//! are not repeated here: a flag left out keeps the value from `Config::default()`, so the two
//! cannot drift apart. `--help` shows each flag with that default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::config::Config;

/// wsrelay: a WebSocket pub/sub fan-out server. Without --redis one process is a complete server
/// (in-process broker); with --redis, any number of nodes share channels through Redis.
#[derive(Debug, Parser)]
#[command(name = "wsrelay", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on (every loop binds it with SO_REUSEPORT) [default: 127.0.0.1:9000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Event-loop threads [default: number of cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Redis backplane URL (redis://HOST:PORT or redis+unix:///path); without it, the in-process broker
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Prefix added to channel names in Redis [default: empty]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// Channel of raw clients that connect to `/` [default: chat_channel]
    #[arg(long, value_name = "NAME")]
    pub default_channel: Option<String>,
    /// Longest channel name, bytes [default: 256]
    #[arg(long, value_name = "BYTES")]
    pub max_channel_len: Option<usize>,
    /// Most connections per process; more get HTTP 503 [default: 1000000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest client message, bytes; larger closes with 1009 [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Cap on a connection's unsent output, bytes; past it the client is closed (1008) [default: 262144]
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<usize>,
    /// Per-connection read buffer, bytes [default: 64]
    #[arg(long, value_name = "BYTES")]
    pub read_buffer: Option<usize>,
    /// SO_SNDBUF for accepted sockets, bytes [default: kernel auto-tuning]
    #[arg(long, value_name = "BYTES")]
    pub socket_send_buffer: Option<usize>,
    /// Time allowed for the HTTP upgrade request (e.g. 10s, 500ms) [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Interval between server pings [default: 25s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// Close connections silent for this long [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Time allowed for a close handshake [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub close_timeout: Option<Duration>,
    /// Upper bound on graceful shutdown [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Capacity of each loop's delivery inbox, messages [default: 65536]
    #[arg(long, value_name = "N")]
    pub loop_queue: Option<usize>,
    /// Capacity of the publish queue, messages; when full, publishing connections are not
    /// read until there is room [default: 65536]
    #[arg(long, value_name = "N")]
    pub publish_queue: Option<usize>,
    /// Capacity of the publish queue, payload bytes [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    pub publish_queue_bytes: Option<usize>,
    /// Most publishes per Redis pipeline [default: 512]
    #[arg(long, value_name = "N")]
    pub publish_batch: Option<usize>,
    /// Longest time output may wait to share a write with later messages [default: 0ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub coalesce: Option<Duration>,
    /// Messages read from one connection per loop turn [default: 64]
    #[arg(long, value_name = "N")]
    pub read_budget: Option<usize>,
    /// Shortest Redis reconnect backoff [default: 100ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub redis_backoff_min: Option<Duration>,
    /// Longest Redis reconnect backoff [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub redis_backoff_max: Option<Duration>,
    /// Messages of history kept per channel for recovery; 0 turns history off [default: 1000]
    #[arg(long, value_name = "N")]
    pub history_size: Option<usize>,
    /// How long a channel's history lives after its last publish [default: 10m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub history_ttl: Option<Duration>,
    /// In-process broker: most channels with history in memory [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_history_channels: Option<usize>,
    /// In-process broker: most sessions kept [default: 1000000]
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// How long a session is kept after its connection ends [default: 10m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub session_ttl: Option<Duration>,
    /// How often open sessions' offsets are written [default: 2s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub session_flush: Option<Duration>,
    /// Most channels per wsrelay.v1 connection [default: 128]
    #[arg(long, value_name = "N")]
    pub max_channels_per_conn: Option<usize>,
    /// Origin allowed to open WebSockets; repeatable; `*` wildcards in the host [default: any]
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// HS256 token secret (or env WSRELAY_TOKEN_SECRET, which keeps it out of `ps`) [default: no auth]
    #[arg(long, value_name = "SECRET")]
    pub token_secret: Option<String>,
    /// Clock skew allowed on token expiry [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub token_leeway: Option<Duration>,
    /// Key for POST /publish (or env WSRELAY_API_KEY) [default: endpoint off]
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Publishes per second per connection; 0 = unlimited [default: 0]
    #[arg(long, value_name = "N")]
    pub publish_rate: Option<u32>,
    /// Publish burst above the rate; 0 = twice the rate [default: 0]
    #[arg(long, value_name = "N")]
    pub publish_burst: Option<u32>,
    /// Connections per client IPv4 address or IPv6 /64; 0 = unlimited [default: 0]
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// Log level: error, warn, info, debug, trace, off [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

impl Cli {
    /// Resolves the flags over the defaults and validates the result.
    pub fn into_config(self) -> Result<Config, String> {
        let mut c = Config::default();
        macro_rules! take {
            ($($field:ident),* $(,)?) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        take!(
            listen,
            threads,
            redis_prefix,
            default_channel,
            max_channel_len,
            max_connections,
            max_message_size,
            max_output,
            read_buffer,
            handshake_timeout,
            ping_interval,
            idle_timeout,
            close_timeout,
            shutdown_timeout,
            loop_queue,
            publish_queue,
            publish_queue_bytes,
            publish_batch,
            read_budget,
            coalesce,
            redis_backoff_min,
            redis_backoff_max,
            history_size,
            history_ttl,
            max_history_channels,
            max_sessions,
            session_ttl,
            session_flush,
            max_channels_per_conn,
            token_leeway,
            publish_rate,
            publish_burst,
            max_connections_per_ip,
            log_level,
        );
        c.allowed_origins = self.allowed_origins;
        // Secrets may come from the environment so they do not show in `ps`.
        c.token_secret = self.token_secret.or_else(|| {
            std::env::var("WSRELAY_TOKEN_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
        });
        c.api_key = self
            .api_key
            .or_else(|| std::env::var("WSRELAY_API_KEY").ok().filter(|s| !s.is_empty()));
        c.redis = self.redis.or(c.redis);
        c.socket_send_buffer = self.socket_send_buffer.or(c.socket_send_buffer);
        c.validate()?;
        Ok(c)
    }
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 250ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn flags_override_defaults_only_where_given() {
        let cli = Cli::try_parse_from(["wsrelay", "--threads", "3", "--max-output", "1000"]).unwrap();
        let c = cli.into_config().unwrap();
        assert_eq!(c.threads, 3);
        assert_eq!(c.max_output, 1000);
        assert_eq!(c.max_message_size, Config::default().max_message_size);
    }

    #[test]
    fn invalid_combination_is_rejected() {
        let cli = Cli::try_parse_from(["wsrelay", "--threads", "0"]).unwrap();
        assert!(cli.into_config().unwrap_err().contains("--threads"));
    }
}
