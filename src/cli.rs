//! Command-line flags: parsed here, resolved into a [`Config`] by [`Cli::into_config`]. Defaults
//! are not repeated here: a flag left out keeps the value from `Config::default()`, and
//! `--help` shows each flag's default as [`shown_defaults`] reads it from there. The README's
//! flag table is checked against the same by a unit test, so none of the three can drift.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::config::Config;
use crate::forwarded::Cidr;

/// wsrelay: a WebSocket pub/sub fan-out server. Without --redis one process is a complete server
/// (in-process broker); with --redis, any number of nodes share channels through Redis.
#[derive(Debug, Parser)]
#[command(name = "wsrelay", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on (every loop binds it with SO_REUSEPORT)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Also listen here, requiring a PROXY protocol header (v1 or v2) on every connection: the client's address comes from it
    #[arg(long, value_name = "ADDR")]
    pub proxy_listen: Option<SocketAddr>,
    /// Peer whose X-Forwarded-For names the client (e.g. 10.0.0.0/8, 192.0.2.7); repeatable
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<Cidr>,
    /// Event-loop threads
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Redis backplane URL (redis://HOST:PORT or redis+unix:///path)
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Redis Cluster seed nodes, comma-separated redis://HOST:PORT (or redis://USER:PASSWORD@HOST:PORT) URLs; the slots are discovered
    #[arg(long, value_name = "URLS")]
    pub redis_cluster: Option<String>,
    /// Prefix added to channel names and keys in Redis; deployments sharing a Redis need prefix-free prefixes
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// Channel of raw clients that connect to `/`
    #[arg(long, value_name = "NAME")]
    pub default_channel: Option<String>,
    /// Longest channel name, bytes
    #[arg(long, value_name = "BYTES")]
    pub max_channel_len: Option<usize>,
    /// Most connections per process; more get HTTP 503
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest client message, bytes; larger closes with 1009
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Hard cap on a connection's unsent output after a write, bytes; past it the client is closed (1008)
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<usize>,
    /// Soft cap on a connection's unsent output, bytes; staying above it past --soft-output-grace closes (1008)
    #[arg(long, value_name = "BYTES")]
    pub soft_output: Option<usize>,
    /// How long a connection may stay above --soft-output
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub soft_output_grace: Option<Duration>,
    /// Cap on the unsent output of one loop's connections together, bytes; past it the largest holders are closed
    #[arg(long, value_name = "BYTES")]
    pub loop_output_budget: Option<usize>,
    /// Per-connection read buffer, bytes
    #[arg(long, value_name = "BYTES")]
    pub read_buffer: Option<usize>,
    /// SO_SNDBUF for accepted sockets, bytes
    #[arg(long, value_name = "BYTES")]
    pub socket_send_buffer: Option<usize>,
    /// Time allowed for the HTTP upgrade request (e.g. 10s, 500ms)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Interval between server pings
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// Close connections silent for this long
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Time allowed for a close handshake
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub close_timeout: Option<Duration>,
    /// After SIGTERM: time to keep serving while /healthz says "draining", so the load balancer stops sending new clients
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_delay: Option<Duration>,
    /// After the drain delay: clients are closed (1001) at an even rate over this period
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_period: Option<Duration>,
    /// Time allowed for the last close handshakes and session writes after the drain period
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Capacity of each loop's delivery inbox, messages
    #[arg(long, value_name = "N")]
    pub loop_queue: Option<usize>,
    /// Capacity of each loop's delivery inbox, bytes (the raw frame of each delivery)
    #[arg(long, value_name = "BYTES")]
    pub loop_queue_bytes: Option<usize>,
    /// Capacity of the publish queue, messages; when full, publishing connections are not read until there is room
    #[arg(long, value_name = "N")]
    pub publish_queue: Option<usize>,
    /// Capacity of the publish queue, payload bytes
    #[arg(long, value_name = "BYTES")]
    pub publish_queue_bytes: Option<usize>,
    /// Most publishes per Redis pipeline
    #[arg(long, value_name = "N")]
    pub publish_batch: Option<usize>,
    /// Longest time output may wait to share a write with later messages
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub coalesce: Option<Duration>,
    /// Messages read from one connection per loop turn
    #[arg(long, value_name = "N")]
    pub read_budget: Option<usize>,
    /// Shortest Redis reconnect backoff
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub redis_backoff_min: Option<Duration>,
    /// Longest Redis reconnect backoff
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub redis_backoff_max: Option<Duration>,
    /// Messages of history kept per channel for recovery; 0 turns history off
    #[arg(long, value_name = "N")]
    pub history_size: Option<usize>,
    /// How long a channel's history lives after its last publish
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub history_ttl: Option<Duration>,
    /// In-process broker: most channels with history in memory
    #[arg(long, value_name = "N")]
    pub max_history_channels: Option<usize>,
    /// In-process broker: most sessions kept
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// In-process broker: bytes of all stored messages (oldest of channels nobody is on go first)
    #[arg(long, value_name = "BYTES")]
    pub history_memory: Option<usize>,
    /// In-process broker: bytes of one channel's stored messages
    #[arg(long, value_name = "BYTES")]
    pub history_channel_memory: Option<usize>,
    /// In-process broker: bytes of all sessions (those closest to expiry go first)
    #[arg(long, value_name = "BYTES")]
    pub session_memory: Option<usize>,
    /// Most sessions kept per token subject; past it the one saved longest ago is dropped
    #[arg(long, value_name = "N")]
    pub max_sessions_per_subject: Option<usize>,
    /// How long a session is kept after its connection ends
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub session_ttl: Option<Duration>,
    /// How often open sessions' offsets are written
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub session_flush: Option<Duration>,
    /// Most channels per wsrelay.v1 connection
    #[arg(long, value_name = "N")]
    pub max_channels_per_conn: Option<usize>,
    /// Channels (pattern, `*` wildcards) whose wsrelay.v1 subscribers are listed in presence; repeatable; `*` for all
    #[arg(long = "presence", value_name = "PATTERN")]
    pub presence: Vec<String>,
    /// Channels (pattern) whose subscribers receive join and leave events (and have presence); repeatable
    #[arg(long = "join-leave", value_name = "PATTERN")]
    pub join_leave: Vec<String>,
    /// Most presence entries per channel (all nodes together); more subscribers are not listed
    #[arg(long, value_name = "N")]
    pub presence_max: Option<usize>,
    /// Largest presence entry (client id, user and info as JSON), bytes
    #[arg(long, value_name = "BYTES")]
    pub presence_entry_size: Option<usize>,
    /// A presence entry not refreshed for this long (its node died) expires; refreshed every third of it
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub presence_ttl: Option<Duration>,
    /// Origin allowed to open WebSockets; repeatable; `*` wildcards in the host
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// HS256 token secret (or env WSRELAY_TOKEN_SECRET, which keeps it out of `ps`)
    #[arg(long, value_name = "SECRET")]
    pub token_secret: Option<String>,
    /// Clock skew allowed on token expiry
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub token_leeway: Option<Duration>,
    /// Key for POST /publish (or env WSRELAY_API_KEY)
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Publishes per second per connection; 0 = unlimited
    #[arg(long, value_name = "N")]
    pub publish_rate: Option<u32>,
    /// Publish burst above the rate; 0 = twice the rate
    #[arg(long, value_name = "N")]
    pub publish_burst: Option<u32>,
    /// Connections per client IPv4 address or IPv6 /64; 0 = unlimited
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// Log level: error, warn, info, debug, trace, off
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

impl Cli {
    /// The command line definition, each flag's help ending in `[default: ...]` from
    /// [`shown_defaults`].
    pub fn command_with_defaults() -> clap::Command {
        shown_defaults()
            .into_iter()
            .fold(Cli::command(), |cmd, (id, shown)| {
                cmd.mut_arg(id, |arg| {
                    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                    arg.help(format!("{help} [default: {shown}]"))
                })
            })
    }

    /// Parses the process's arguments; on an error or `--help`, prints and exits.
    pub fn parse_args() -> Cli {
        let matches = Self::command_with_defaults().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

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
            soft_output,
            soft_output_grace,
            loop_output_budget,
            read_buffer,
            handshake_timeout,
            ping_interval,
            idle_timeout,
            close_timeout,
            drain_delay,
            drain_period,
            shutdown_timeout,
            loop_queue,
            loop_queue_bytes,
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
            history_memory,
            history_channel_memory,
            session_memory,
            max_sessions_per_subject,
            session_ttl,
            session_flush,
            max_channels_per_conn,
            presence_max,
            presence_entry_size,
            presence_ttl,
            token_leeway,
            publish_rate,
            publish_burst,
            max_connections_per_ip,
            log_level,
        );
        c.allowed_origins = self.allowed_origins;
        c.presence = self.presence;
        c.join_leave = self.join_leave;
        c.proxy_listen = self.proxy_listen.or(c.proxy_listen);
        c.trusted_proxies = self.trusted_proxies;
        // Secrets may come from the environment so they do not show in `ps`.
        c.token_secret = match self.token_secret {
            Some(s) => Some(s),
            None => secret_from_env("WSRELAY_TOKEN_SECRET")?,
        };
        c.api_key = match self.api_key {
            Some(k) => Some(k),
            None => secret_from_env("WSRELAY_API_KEY")?,
        };
        c.redis = self.redis.or(c.redis);
        c.redis_cluster = self.redis_cluster.or(c.redis_cluster);
        c.socket_send_buffer = self.socket_send_buffer.or(c.socket_send_buffer);
        c.validate()?;
        Ok(c)
    }
}

/// A secret from the environment variable `var`. Set but empty is refused: it is a secret
/// that was not filled in, and running without it would turn authentication off unnoticed.
fn secret_from_env(var: &str) -> Result<Option<String>, String> {
    match std::env::var(var) {
        Ok(s) if s.is_empty() => Err(format!("{var} is set but empty; unset it to run without it")),
        Ok(s) => Ok(Some(s)),
        Err(_) => Ok(None),
    }
}

/// Each flag's default as `--help` and the README show it, by argument id (the field name),
/// read from `Config::default()`. Where the default is "nothing" or a value that turns a
/// feature off, the text says what that means.
pub fn shown_defaults() -> Vec<(&'static str, String)> {
    let d = Config::default();
    let none_means = |v: Option<&dyn std::fmt::Display>, meaning: &str| match v {
        Some(v) => v.to_string(),
        None => meaning.to_owned(),
    };
    let zero_means = |v: u32, meaning: &str| match v {
        0 => format!("0 ({meaning})"),
        v => v.to_string(),
    };
    let text = |v: &str| {
        if v.is_empty() {
            "empty".to_owned()
        } else {
            v.to_owned()
        }
    };
    let dur = format_duration;
    let patterns = |p: &[String]| {
        if p.is_empty() {
            "none (off)".to_owned()
        } else {
            p.join(", ")
        }
    };
    vec![
        ("listen", d.listen.to_string()),
        (
            "proxy_listen",
            none_means(d.proxy_listen.as_ref().map(|v| v as _), "none"),
        ),
        (
            "trusted_proxies",
            if d.trusted_proxies.is_empty() {
                "none (the header is ignored)".to_owned()
            } else {
                format!("{:?}", d.trusted_proxies)
            },
        ),
        // `Config::default()` counts this machine's cores; the help speaks for any machine.
        ("threads", "number of cores".to_owned()),
        (
            "redis",
            none_means(d.redis.as_ref().map(|v| v as _), "none (in-process broker)"),
        ),
        (
            "redis_cluster",
            none_means(d.redis_cluster.as_ref().map(|v| v as _), "none"),
        ),
        ("redis_prefix", text(&d.redis_prefix)),
        ("default_channel", text(&d.default_channel)),
        ("max_channel_len", d.max_channel_len.to_string()),
        ("max_connections", d.max_connections.to_string()),
        ("max_message_size", d.max_message_size.to_string()),
        ("max_output", d.max_output.to_string()),
        ("soft_output", d.soft_output.to_string()),
        ("soft_output_grace", dur(d.soft_output_grace)),
        ("loop_output_budget", d.loop_output_budget.to_string()),
        ("read_buffer", d.read_buffer.to_string()),
        (
            "socket_send_buffer",
            none_means(
                d.socket_send_buffer.as_ref().map(|v| v as _),
                "kernel auto-tuning",
            ),
        ),
        ("handshake_timeout", dur(d.handshake_timeout)),
        ("ping_interval", dur(d.ping_interval)),
        ("idle_timeout", dur(d.idle_timeout)),
        ("close_timeout", dur(d.close_timeout)),
        ("drain_delay", dur(d.drain_delay)),
        ("drain_period", dur(d.drain_period)),
        ("shutdown_timeout", dur(d.shutdown_timeout)),
        ("loop_queue", d.loop_queue.to_string()),
        ("loop_queue_bytes", d.loop_queue_bytes.to_string()),
        ("publish_queue", d.publish_queue.to_string()),
        ("publish_queue_bytes", d.publish_queue_bytes.to_string()),
        ("publish_batch", d.publish_batch.to_string()),
        ("coalesce", dur(d.coalesce)),
        ("read_budget", d.read_budget.to_string()),
        ("redis_backoff_min", dur(d.redis_backoff_min)),
        ("redis_backoff_max", dur(d.redis_backoff_max)),
        ("history_size", d.history_size.to_string()),
        ("history_ttl", dur(d.history_ttl)),
        ("max_history_channels", d.max_history_channels.to_string()),
        ("max_sessions", d.max_sessions.to_string()),
        ("history_memory", d.history_memory.to_string()),
        ("history_channel_memory", d.history_channel_memory.to_string()),
        ("session_memory", d.session_memory.to_string()),
        ("max_sessions_per_subject", d.max_sessions_per_subject.to_string()),
        ("session_ttl", dur(d.session_ttl)),
        ("session_flush", dur(d.session_flush)),
        ("max_channels_per_conn", d.max_channels_per_conn.to_string()),
        ("presence", patterns(&d.presence)),
        ("join_leave", patterns(&d.join_leave)),
        ("presence_max", d.presence_max.to_string()),
        ("presence_entry_size", d.presence_entry_size.to_string()),
        ("presence_ttl", dur(d.presence_ttl)),
        (
            "allowed_origins",
            if d.allowed_origins.is_empty() {
                "any".to_owned()
            } else {
                d.allowed_origins.join(", ")
            },
        ),
        (
            "token_secret",
            none_means(d.token_secret.as_ref().map(|v| v as _), "none (no auth)"),
        ),
        ("token_leeway", dur(d.token_leeway)),
        (
            "api_key",
            none_means(d.api_key.as_ref().map(|v| v as _), "none (endpoint off)"),
        ),
        ("publish_rate", zero_means(d.publish_rate, "off")),
        ("publish_burst", zero_means(d.publish_burst, "twice the rate")),
        (
            "max_connections_per_ip",
            zero_means(d.max_connections_per_ip, "off"),
        ),
        ("log_level", d.log_level.to_string().to_lowercase()),
    ]
}

/// Writes a duration the way [`parse_duration`] reads it: `250ms` below a whole second, `10s`,
/// and whole minutes past one (`10m`).
pub fn format_duration(d: Duration) -> String {
    match (d.subsec_nanos(), d.as_secs()) {
        (0, s) if s > 60 && s % 60 == 0 => format!("{}m", s / 60),
        (0, s) if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
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
    fn durations_are_shown_as_they_are_parsed() {
        for (d, shown) in [
            (Duration::ZERO, "0ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(60), "60s"),
            (Duration::from_secs(600), "10m"),
        ] {
            assert_eq!(format_duration(d), shown);
            assert_eq!(parse_duration(shown).unwrap(), d);
        }
    }

    #[test]
    fn help_shows_every_flag_with_its_default() {
        let ids: Vec<String> = Cli::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "help" && id != "version")
            .collect();
        let shown: Vec<String> = shown_defaults()
            .into_iter()
            .map(|(id, _)| id.to_owned())
            .collect();
        assert_eq!(
            ids, shown,
            "shown_defaults() must list every flag, in declaration order"
        );
        let help = Cli::command_with_defaults().render_help().to_string();
        assert!(help.contains("[default: 127.0.0.1:9000]"), "{help}");
        assert!(help.contains("[default: 16777216]"), "{help}");
        assert!(help.contains("[default: 10m]"), "{help}");
    }

    /// The flag table of README.md: (flag cell, default cell), backticks removed.
    fn readme_flag_rows() -> Vec<(String, String)> {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Flags\n")
            .nth(1)
            .expect("README has a Flags section");
        let section = section.split("\n## ").next().unwrap();
        section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                let cells: Vec<String> = l
                    .split(" | ")
                    .map(|c| c.trim_matches(['|', ' ', '`']).to_owned())
                    .collect();
                (cells[0].clone(), cells[1].clone())
            })
            .collect()
    }

    #[test]
    fn readme_flag_table_matches_the_flags_and_their_defaults() {
        let cmd = Cli::command();
        let expected: Vec<(String, String)> = shown_defaults()
            .into_iter()
            .map(|(id, shown)| {
                let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
                let value = arg.get_value_names().unwrap_or_default().join(" ");
                (format!("--{} {value}", arg.get_long().unwrap()), shown)
            })
            .collect();
        let documented = readme_flag_rows();
        // In any order: the README may group flags by topic.
        let table = |rows: &[(String, String)]| {
            let mut rows: Vec<String> = rows.iter().map(|(f, d)| format!("| `{f}` | {d} |\n")).collect();
            rows.sort();
            rows.concat()
        };
        assert_eq!(
            table(&documented),
            table(&expected),
            "README.md's flag table (left) differs from the flags and Config::default() (right)"
        );
    }

    #[test]
    fn invalid_combination_is_rejected() {
        let cli = Cli::try_parse_from(["wsrelay", "--threads", "0"]).unwrap();
        assert!(cli.into_config().unwrap_err().contains("--threads"));
    }
}
