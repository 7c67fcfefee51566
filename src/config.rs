//! The server's configuration: one struct, every field documented with its unit, default and
//! trade-off. The command line (`cli.rs`) parses into it; `tuning.md` explains the same fields
//! with measured effects. Values live only in `impl Default`; `validate` rejects inconsistent
//! combinations at start so a bad setting fails loudly instead of misbehaving under load.

use std::net::SocketAddr;
use std::time::Duration;

use crate::forwarded::Cidr;
use crate::wildcard::wildcard_match;

/// Everything a running wsrelay process needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address every loop's listener binds (SO_REUSEPORT). Port 0 picks a free port once and
    /// every loop then binds that same port. Default `127.0.0.1:9000`.
    pub listen: SocketAddr,
    /// A second address every loop also listens on, where each connection must start with a
    /// PROXY protocol header (v1 or v2) from a load balancer (HAProxy `send-proxy-v2`, nginx
    /// `proxy_protocol on`): the client's address is taken from it. A connection without a
    /// valid header is closed. `None` (default): no such listener. The `listen` address never
    /// reads PROXY headers, so clients that reach it directly cannot claim another address.
    pub proxy_listen: Option<SocketAddr>,
    /// Peers whose `X-Forwarded-For` header names the client (the rightmost address in it that
    /// is not itself a trusted proxy). Empty (default): the header is ignored. Anyone not in
    /// the list can write the header, so list only your own proxies.
    pub trusted_proxies: Vec<Cidr>,
    /// Number of event-loop threads, each with its own listener, poll and connections.
    /// Default: the number of cores. More loops than cores only adds context switches.
    pub threads: usize,
    /// Redis URL (`redis://host:port`, `redis+unix:///path`). `None` runs the in-process broker:
    /// one process is then a complete server, but nodes do not share messages.
    pub redis: Option<String>,
    /// Redis Cluster seed nodes, comma-separated `redis://[[user]:password@]host:port` URLs
    /// (the first one's credentials are used for every node; the slot map is discovered).
    /// `None` (default): no cluster. Exclusive with `redis`. Channels use sharded Pub/Sub
    /// (`SSUBSCRIBE`/`SPUBLISH`), so Pub/Sub capacity grows with the number of primaries.
    pub redis_cluster: Option<String>,
    /// Prepended to every channel name to form the Redis channel, and to every key. Default
    /// empty, so a backend's `PUBLISH chat_channel hello` reaches clients of `chat_channel`.
    /// Deployments sharing a Redis must use prefix-free prefixes (none starting with another):
    /// a node refuses to start next to a live deployment whose prefix is not.
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
    /// Hard cap on one connection's unsent output, in bytes, judged after its socket was
    /// tried: past it the client is a slow consumer, closed with 1008 and counted; nobody else
    /// waits for it. Default 16 MiB: 40 of the largest possible v1 envelopes (a 64 KiB message
    /// of control characters escapes to 384 KiB), so no single message, burst of a few or
    /// replay of a reading client comes near it. Per-connection worst case; the total is
    /// bounded by `loop_output_budget`.
    pub max_output: usize,
    /// Soft cap on one connection's unsent output, in bytes: a connection may stay above it
    /// only for `soft_output_grace`, then it is closed as a slow consumer. Default 1 MiB: a
    /// reading client on a 1 Mbit/s link drains it in about 8 s, well within the grace period.
    pub soft_output: usize,
    /// How long a connection may stay above `soft_output`. Default 30 s (Redis closes Pub/Sub
    /// clients that stay over 8 MB for 60 s): long enough for a client whose event loop or
    /// network stalled for a moment, short enough that a client that stopped reading is cut
    /// off long before the hard cap matters.
    pub soft_output_grace: Duration,
    /// Cap on the unsent output of all of one loop's connections together, in bytes: past it,
    /// the connections holding the most are closed first (dropping their output at once).
    /// Default 1 GiB per loop: worst-case memory for unsent output is this times `--threads`,
    /// whatever the number of connections.
    pub loop_output_budget: usize,
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
    /// After SIGTERM: how long the node keeps serving while it reports itself unhealthy
    /// (`/healthz` 503 "draining", new WebSockets refused with 503) before it closes its
    /// listener and starts closing clients. It is the time a load balancer needs to see the
    /// failing health check and stop sending new clients: a client closed earlier could be sent
    /// straight back to this node. Default 5 s: HAProxy as configured in `deploy/haproxy.cfg`
    /// (check every 1 s, down after 2 failures) needs 2-3 s. 0 skips it.
    pub drain_delay: Duration,
    /// After the drain delay: clients are closed (1001, their sessions stored first) at an
    /// even rate over this period instead of all at once, so the nodes that take them over see
    /// a steady stream of reconnects, not a storm. Default 10 s: 100,000 clients arrive
    /// elsewhere at 10,000 a second. 0 closes everyone at once.
    pub drain_period: Duration,
    /// After the last client was asked to close: the time allowed for close handshakes and
    /// for the last session writes to reach Redis. The process exits at most
    /// `drain_delay + drain_period + shutdown_timeout` after SIGTERM. Default 5 s.
    pub shutdown_timeout: Duration,
    /// Capacity, in messages, of each loop's inbox (deliveries from the broker). When a loop
    /// falls this far behind, further deliveries to it are dropped and counted. Default 65,536.
    pub loop_queue: usize,
    /// Capacity, in bytes, of the same inbox: a delivery counts its raw frame, which holds its
    /// payload (a delivery to several loops is counted in each). Full: dropped and counted,
    /// like the count. Default 64 MiB: a thousand messages of 64 KiB, and a bound on what a
    /// loop that fell behind holds whatever the message size (65,536 messages of 64 KiB would
    /// be 4 GiB).
    pub loop_queue_bytes: usize,
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
    /// Reconnect backoff to Redis: the cap on the wait starts here and doubles per failure up
    /// to `redis_backoff_max`; each wait is uniform between half of this and the cap, so a
    /// fleet of nodes does not reconnect in lock step. Default 100 ms.
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
    /// In-process broker only: most channels with a history in memory. Past it, histories of
    /// channels without live subscribers go first, those published to longest ago first (their
    /// clients get `recovered: false`). Default 100,000. With Redis, Redis's own memory policy
    /// bounds it.
    pub max_history_channels: usize,
    /// In-process broker only: bytes of all stored messages together (its frame, which holds
    /// the payload, and about 192 bytes of bookkeeping each). Past it, the oldest messages of channels without
    /// live subscribers go first, then those of the others. Default 1 GiB: this is the
    /// worst case of history memory, whatever clients publish.
    pub history_memory: usize,
    /// In-process broker only: bytes of one channel's stored messages; past it its oldest
    /// go, even if fewer than `history_size` remain. Default 16 MiB: a thousand 16 KiB
    /// messages, or 255 of the largest (64 KiB in its frame).
    pub history_channel_memory: usize,
    /// In-process broker only: most sessions kept. Past it, those closest to expiry go first.
    /// Default 1,000,000.
    pub max_sessions: usize,
    /// In-process broker only: bytes of all sessions together (ids, subjects, channel names
    /// and about 48 bytes per channel, 160 per session). Past it, those closest to expiry go
    /// first. Default 256 MiB: the worst case of session memory (a session of 128 channels of
    /// 256-byte names is about 40 KiB, so at least 6,500 such sessions, or a million small ones).
    pub session_memory: usize,
    /// Most sessions kept per token subject (with Redis and in-process); past it, the
    /// subject's session saved longest ago is dropped (resuming it starts a fresh session).
    /// Default 64: more than the tabs and devices of one user, few enough that one user
    /// reconnecting in a loop holds at most 64 sessions (about 3 MiB at 128 channels of 256
    /// bytes each). Clients without a token are bounded by `--session-ttl` and, in-process,
    /// `--session-memory` (with Redis, by its `maxmemory`).
    pub max_sessions_per_subject: usize,
    /// How long a session (subscriptions and last offsets) is kept after its connection ends.
    /// Default 10 min, matching `history_ttl`: resuming later could not recover anyway.
    pub session_ttl: Duration,
    /// How often a session's delivered offsets are written while the connection is open.
    /// Subscription changes are written at once. Default 2 s: after a node crash a resumed
    /// client sees at most this much twice; shorter costs more session writes.
    pub session_flush: Duration,
    /// Most channels one `wsrelay.v1` connection may subscribe to. Default 128.
    pub max_channels_per_conn: usize,
    /// Channel patterns (`*` wildcards, as in token grants) whose `wsrelay.v1` subscribers are
    /// listed in presence (`presence`, `presence_stats`). Empty (default): presence is off, and
    /// costs nothing. Channels matching `join_leave` have presence too.
    pub presence: Vec<String>,
    /// Channel patterns whose subscribers also receive `join` and `leave` events (and which
    /// have presence). Empty (default): no events.
    pub join_leave: Vec<String>,
    /// Most presence entries one channel holds (all nodes together); a subscriber past it is
    /// not listed (counted and logged). Default 1,000: a channel's presence is then at most
    /// this times `presence_entry_size` bytes (plus Redis's overhead per entry, see
    /// `tuning.md`), and a `presence` reply at most that.
    pub presence_max: usize,
    /// Largest presence entry in bytes: the client id, the token subject and the `info` the
    /// subscriber supplied, as JSON. A subscribe whose entry is larger is refused
    /// (`bad_request`). Default 512.
    pub presence_entry_size: usize,
    /// A presence entry not refreshed for this long expires by itself (its node died): its
    /// node refreshes it every third of this. A dead node's subscribers leave presence (with
    /// `leave` events) at most this plus a third of it after it died. Default 30 s.
    pub presence_ttl: Duration,
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
            proxy_listen: None,
            trusted_proxies: Vec::new(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            redis: None,
            redis_cluster: None,
            redis_prefix: String::new(),
            default_channel: "chat_channel".into(),
            max_channel_len: 256,
            max_connections: 1_000_000,
            max_message_size: 64 * 1024,
            max_output: 16 * 1024 * 1024,
            soft_output: 1024 * 1024,
            soft_output_grace: Duration::from_secs(30),
            loop_output_budget: 1024 * 1024 * 1024,
            read_buffer: 64,
            socket_send_buffer: None,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            drain_delay: Duration::from_secs(5),
            drain_period: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            loop_queue: 65_536,
            loop_queue_bytes: 64 << 20,
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
            history_memory: 1024 * 1024 * 1024,
            history_channel_memory: 16 * 1024 * 1024,
            session_memory: 256 * 1024 * 1024,
            max_sessions_per_subject: 64,
            session_ttl: Duration::from_secs(600),
            session_flush: Duration::from_secs(2),
            max_channels_per_conn: 128,
            presence: Vec::new(),
            join_leave: Vec::new(),
            presence_max: 1000,
            presence_entry_size: 512,
            presence_ttl: Duration::from_secs(30),
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
    /// The slow-consumer limits; a soft limit above the hard one is the hard one.
    pub fn output_limits(&self) -> crate::backpressure::Limits {
        crate::backpressure::Limits {
            hard: self.max_output,
            soft: self.soft_output.min(self.max_output),
            grace: self.soft_output_grace,
        }
    }

    /// Whether `channel`'s `wsrelay.v1` subscribers are listed in presence.
    pub fn presence_on(&self, channel: &str) -> bool {
        let any = |patterns: &[String]| patterns.iter().any(|p| wildcard_match(p, channel));
        any(&self.presence) || any(&self.join_leave)
    }

    /// Whether `channel`'s subscribers receive `join` and `leave` events.
    pub fn join_leave_on(&self, channel: &str) -> bool {
        self.join_leave.iter().any(|p| wildcard_match(p, channel))
    }

    /// Whether any channel has presence: when none has, nothing of it runs.
    pub fn presence_anywhere(&self) -> bool {
        !self.presence.is_empty() || !self.join_leave.is_empty()
    }

    /// Rejects settings that cannot work together. The message names the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (self.threads, "--threads"),
            (self.max_channel_len, "--max-channel-len"),
            (self.max_connections, "--max-connections"),
            (self.max_message_size, "--max-message-size"),
            (self.max_output, "--max-output"),
            (self.soft_output, "--soft-output"),
            (self.loop_output_budget, "--loop-output-budget"),
            (self.loop_queue, "--loop-queue"),
            (self.loop_queue_bytes, "--loop-queue-bytes"),
            (self.publish_queue, "--publish-queue"),
            (self.publish_queue_bytes, "--publish-queue-bytes"),
            (self.publish_batch, "--publish-batch"),
            (self.read_budget, "--read-budget"),
            (self.max_channels_per_conn, "--max-channels-per-conn"),
            (self.max_history_channels, "--max-history-channels"),
            (self.max_sessions, "--max-sessions"),
            (self.history_memory, "--history-memory"),
            (self.history_channel_memory, "--history-channel-memory"),
            (self.session_memory, "--session-memory"),
            (self.presence_max, "--presence-max"),
            (self.max_sessions_per_subject, "--max-sessions-per-subject"),
        ];
        if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if let Some(p) = self.proxy_listen {
            if p.port() != 0 && p.port() == self.listen.port() {
                return Err(
                    "--proxy-listen needs a port of its own: on --listen's port the two listeners would share connections"
                        .into(),
                );
            }
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
        if self.presence_entry_size < 128 {
            return Err("--presence-entry-size must be at least 128 bytes (a client id and a user)".into());
        }
        if self.presence_ttl < Duration::from_millis(300) {
            return Err(
                "--presence-ttl must be at least 300ms (entries are refreshed every third of it)".into(),
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
            redis::parse_redis_url(url).ok_or_else(|| {
                format!(
                    "--redis {:?} is not a redis:// or redis+unix:// URL",
                    redact_url(url)
                )
            })?;
        }
        if let Some(seeds) = &self.redis_cluster {
            if self.redis.is_some() {
                return Err(
                    "--redis and --redis-cluster exclude each other: name one Redis or one cluster".into(),
                );
            }
            let urls: Vec<&str> = seeds
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            if urls.is_empty() {
                return Err("--redis-cluster names no seed node".into());
            }
            for url in urls {
                match redis::parse_redis_url(url) {
                    Some(u) if u.scheme() == "redis" && u.host().is_some() => {}
                    _ => {
                        return Err(format!(
                            "--redis-cluster seed {:?} is not a redis://HOST:PORT URL",
                            redact_url(url)
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// `url` with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    match url[start..at].find(':').map(|i| start + i) {
        Some(colon) => format!("{}:***{}", &url[..colon], &url[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_urls_shown() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/2"),
            "redis://:***@10.0.0.1:6379/2"
        );
        assert_eq!(
            redact_url("redis://relay:p%40ss@host:6379"),
            "redis://relay:***@host:6379"
        );
        assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock"),
            "redis+unix:///run/redis.sock"
        );
    }

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

    #[test]
    fn a_cluster_is_named_by_redis_urls_and_excludes_one_redis() {
        let cluster = |seeds: &str| Config {
            redis_cluster: Some(seeds.into()),
            ..Config::default()
        };
        cluster("redis://a:7000, redis://:pw@b:7001").validate().unwrap();
        assert!(cluster("").validate().unwrap_err().contains("no seed"));
        assert!(
            cluster("redis+unix:///tmp/r.sock")
                .validate()
                .unwrap_err()
                .contains("redis://HOST:PORT")
        );
        let both = Config {
            redis: Some("redis://x:6379".into()),
            ..cluster("redis://a:7000")
        };
        assert!(both.validate().unwrap_err().contains("exclude each other"));
    }
}
