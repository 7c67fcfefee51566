//! The server's configuration: one struct, every field documented with its unit, default and
//! trade-off. The command line (`cli.rs`) parses into it; `tuning.md` explains the same fields
//! with measured effects. Values live only in `impl Default`; `validate` rejects inconsistent
//! combinations at start so a bad setting fails loudly instead of misbehaving under load.

use std::net::SocketAddr;
use std::time::Duration;

/// Everything a running wsrelay process needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address every loop's listener binds (SO_REUSEPORT). Port 0 picks a free port once and
    /// every loop then binds that same port. Default `127.0.0.1:9000`.
    pub listen: SocketAddr,
    /// Number of event-loop threads, each with its own listener, poll and connections.
    /// Default: the number of cores. More loops than cores only adds context switches.
    pub threads: usize,
    /// Redis URL (`redis://host:port`, `redis+unix:///path`). `None` runs the in-process broker:
    /// one process is then a complete server, but nodes do not share messages.
    pub redis: Option<String>,
    /// Prepended to every channel name to form the Redis channel. Default empty, so a backend's
    /// `PUBLISH chat_channel hello` reaches clients of `chat_channel`.
    pub redis_prefix: String,
    /// The channel of a raw-protocol client that connects to `/`. Default `chat_channel`.
    pub default_channel: String,
    /// Longest accepted channel name in bytes. Default 256: channel names are keys in every
    /// loop's index and in Redis, so they are kept short.
    pub max_channel_len: usize,
    /// Most connections one process holds (all loops together). Past it, new connections get
    /// HTTP 503 and are closed. Default 1,000,000; the open-file limit usually binds first.
    pub max_connections: usize,
    /// Largest message a client may send, in bytes (frame and reassembled message). Larger:
    /// close 1009. Default 64 KiB: enough for chat and dashboards, small enough that one client
    /// cannot make the server buffer much.
    pub max_message_size: usize,
    /// Cap on one connection's unsent output, in bytes. A client whose backlog passes it is a
    /// slow consumer: it is closed with 1008 and counted; nobody else waits for it. Default
    /// 256 KiB: about 4,000 64-byte messages of burst before a stalled client is cut off. Worst
    /// case memory is this times the number of connections.
    pub max_output: usize,
    /// Per-connection read buffer in bytes (tungstenite's `read_buffer_size`, allocated per
    /// connection up front). Sockets are read in one large read into the loop's shared 64 KiB
    /// buffer, and tungstenite takes the bytes from there in pieces of this size, so it costs
    /// no extra system calls. Default 64: an idle connection holds 64 bytes of read buffer;
    /// larger only saves memory copies for clients that send large messages. tungstenite's own
    /// default (128 KiB) is never used.
    pub read_buffer: usize,
    /// Kernel send buffer (SO_SNDBUF) for accepted sockets, in bytes. `None` leaves the kernel's
    /// auto-tuning. Smaller values make slow consumers show up sooner and bound kernel memory.
    pub socket_send_buffer: Option<usize>,
    /// Time a new connection has to send its complete HTTP request. Default 10 s.
    pub handshake_timeout: Duration,
    /// Interval between server pings to an open connection. Default 25 s: under the 30-60 s idle
    /// cut-off of common load balancers and NATs.
    pub ping_interval: Duration,
    /// A connection silent (no frame, no pong) for this long is closed. Default 60 s: two pings
    /// can go unanswered.
    pub idle_timeout: Duration,
    /// How long a closing connection may take to finish the close handshake. Default 5 s.
    pub close_timeout: Duration,
    /// Upper bound on a graceful shutdown (close 1001 to everyone, flush). Default 5 s.
    pub shutdown_timeout: Duration,
    /// Capacity, in messages, of each loop's inbox (deliveries from the broker). When a loop
    /// falls this far behind, further deliveries to it are dropped and counted. Default 65,536.
    pub loop_queue: usize,
    /// Capacity, in messages, of the queue from the loops to the publisher. When it is full,
    /// the loops stop reading from connections that publish until there is room again (TCP
    /// backpressure slows the senders; nothing read is dropped, no one is closed), and
    /// `POST /publish` answers 503 with `Retry-After`. Default 65,536.
    pub publish_queue: usize,
    /// Capacity, in payload bytes, of the same queue: with large messages this bound is
    /// reached before the count. Default 64 MiB (at 64-byte messages the count binds first).
    pub publish_queue_bytes: usize,
    /// Most publishes pipelined to Redis in one round trip. Default 512: large enough that a
    /// burst is one round trip, small enough that one slow batch does not hold the rest back.
    pub publish_batch: usize,
    /// Longest time output may wait so that more messages share one write. 0 (default): every
    /// loop turn writes what it queued. Under load turns get longer and messages coalesce by
    /// themselves; a small value (1-10 ms) cuts CPU further at moderate rates, at that much
    /// added latency.
    pub coalesce: Duration,
    /// Messages read from one connection per loop turn before the loop serves the others.
    /// Default 64: one flooding client cannot starve the rest of its loop.
    pub read_budget: usize,
    /// Shortest wait before reconnecting to Redis; doubles up to `redis_backoff_max`, with full
    /// jitter so a fleet of nodes does not reconnect in lock step. Default 100 ms.
    pub redis_backoff_min: Duration,
    /// Longest wait between Redis reconnect attempts. Default 5 s.
    pub redis_backoff_max: Duration,
    /// Messages kept per channel for recovery (a Redis stream capped at this length, or an
    /// in-memory ring). 0 turns history off: plain PUBLISH, no offsets, no recovery. Default
    /// 1,000: about a minute of a busy chat room; memory per channel is this times the average
    /// message size.
    pub history_size: usize,
    /// How long a channel's history lives after its last publish. Default 10 min: a client away
    /// longer gets `recovered: false` and reloads.
    pub history_ttl: Duration,
    /// In-process broker only: most channels with a history in memory. Past it, the histories
    /// closest to expiry are dropped (their clients get `recovered: false`). Default 100,000:
    /// with `history_size` messages each, this bounds the history's memory whatever clients
    /// publish to. With Redis, Redis's own memory policy bounds it.
    pub max_history_channels: usize,
    /// In-process broker only: most sessions kept. Past it, those closest to expiry go first.
    /// Default 1,000,000 (a few hundred bytes each).
    pub max_sessions: usize,
    /// How long a session (subscriptions and last offsets) is kept after its connection ends.
    /// Default 10 min, matching `history_ttl`: resuming later could not recover anyway.
    pub session_ttl: Duration,
    /// How often a session's delivered offsets are written while the connection is open.
    /// Subscription changes are written at once. Default 2 s: after a node crash a resumed
    /// client sees at most this much twice; shorter costs more session writes.
    pub session_flush: Duration,
    /// Most channels one `wsrelay.v1` connection may subscribe to. Default 128.
    pub max_channels_per_conn: usize,
    /// Origins allowed to open WebSockets (`https://app.example.com`, `https://*.example.com`,
    /// `http://localhost:*`, `*`). Empty: any origin. A handshake from another origin gets
    /// 403; this is what stops other sites' pages from using a visitor's browser to connect
    /// (cross-site WebSocket hijacking). Requests without an Origin header (non-browser
    /// clients) are allowed: browsers always send it.
    pub allowed_origins: Vec<String>,
    /// Secret for HS256 tokens (at least 32 bytes). `None`: no authentication, every client
    /// may subscribe and publish anywhere.
    pub token_secret: Option<String>,
    /// Clock skew allowed when checking token expiry. Default 60 s.
    pub token_leeway: Duration,
    /// Key for `POST /publish` (sent as `Authorization: Bearer KEY`). `None`: the endpoint is
    /// off.
    pub api_key: Option<String>,
    /// Messages per second one connection may publish (token bucket). 0: no limit (default:
    /// limits suit the application, and benchmarks and trusted backends need none).
    pub publish_rate: u32,
    /// Burst above `publish_rate`. 0: twice the rate.
    pub publish_burst: u32,
    /// Most connections from one client address (IPv4 address or IPv6 /64). 0: no limit
    /// (default: behind a proxy or carrier NAT, many clients share one address).
    pub max_connections_per_ip: u32,
    /// Log level.
    pub log_level: log::LevelFilter,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9000".parse().expect("literal address"),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            redis: None,
            redis_prefix: String::new(),
            default_channel: "chat_channel".into(),
            max_channel_len: 256,
            max_connections: 1_000_000,
            max_message_size: 64 * 1024,
            max_output: 256 * 1024,
            read_buffer: 64,
            socket_send_buffer: None,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            loop_queue: 65_536,
            publish_queue: 65_536,
            publish_queue_bytes: 64 << 20,
            publish_batch: 512,
            coalesce: Duration::ZERO,
            read_budget: 64,
            redis_backoff_min: Duration::from_millis(100),
            redis_backoff_max: Duration::from_secs(5),
            history_size: 1000,
            history_ttl: Duration::from_secs(600),
            max_history_channels: 100_000,
            max_sessions: 1_000_000,
            session_ttl: Duration::from_secs(600),
            session_flush: Duration::from_secs(2),
            max_channels_per_conn: 128,
            allowed_origins: Vec::new(),
            token_secret: None,
            token_leeway: Duration::from_secs(60),
            api_key: None,
            publish_rate: 0,
            publish_burst: 0,
            max_connections_per_ip: 0,
            log_level: log::LevelFilter::Info,
        }
    }
}

impl Config {
    /// Rejects settings that cannot work together. The message names the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (self.threads, "--threads"),
            (self.max_channel_len, "--max-channel-len"),
            (self.max_connections, "--max-connections"),
            (self.max_message_size, "--max-message-size"),
            (self.max_output, "--max-output"),
            (self.loop_queue, "--loop-queue"),
            (self.publish_queue, "--publish-queue"),
            (self.publish_queue_bytes, "--publish-queue-bytes"),
            (self.publish_batch, "--publish-batch"),
            (self.read_budget, "--read-budget"),
            (self.max_channels_per_conn, "--max-channels-per-conn"),
            (self.max_history_channels, "--max-history-channels"),
            (self.max_sessions, "--max-sessions"),
        ];
        if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if self.threads > 1024 {
            return Err("--threads must be at most 1024".into());
        }
        if self.read_buffer < 64 {
            return Err("--read-buffer must be at least 64 bytes".into());
        }
        if self.default_channel.is_empty() || self.default_channel.len() > self.max_channel_len {
            return Err("--default-channel must be 1 to --max-channel-len bytes".into());
        }
        if self.idle_timeout <= self.ping_interval {
            return Err("--idle-timeout must be longer than --ping-interval".into());
        }
        if self.redis_backoff_min.is_zero() || self.redis_backoff_min > self.redis_backoff_max {
            return Err("--redis-backoff-min must be above 0 and at most --redis-backoff-max".into());
        }
        if self.history_ttl.as_secs() == 0 || self.session_ttl.as_secs() == 0 {
            return Err(
                "--history-ttl and --session-ttl must be at least 1s (Redis expiry is in seconds)".into(),
            );
        }
        if self.session_flush.is_zero() {
            return Err("--session-flush must be above 0".into());
        }
        crate::origin::OriginPolicy::new(&self.allowed_origins)?;
        if let Some(secret) = &self.token_secret {
            crate::auth::Verifier::new(secret.as_bytes(), self.token_leeway.as_secs())?;
        }
        if self.api_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err("--api-key must be at least 16 characters".into());
        }
        if let Some(url) = &self.redis {
            redis::parse_redis_url(url)
                .ok_or_else(|| format!("--redis {url:?} is not a redis:// or redis+unix:// URL"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn inconsistent_settings_name_the_flag() {
        let cfg = Config {
            idle_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        assert!(cfg.validate().unwrap_err().contains("--idle-timeout"));
        let cfg = Config {
            max_output: 0,
            ..Config::default()
        };
        assert!(cfg.validate().unwrap_err().contains("--max-output"));
        let cfg = Config {
            redis: Some("http://x".into()),
            ..Config::default()
        };
        assert!(cfg.validate().unwrap_err().contains("--redis"));
    }
}
