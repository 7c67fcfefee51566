//! The Redis backplane: how nodes share channels, history and sessions.
//!
//! - `subscriber.rs`: one blocking Pub/Sub connection. SUBSCRIBEs only to channels some local
//!   loop has members on (refcounted over loops), routes each message only to the loops that
//!   need it, reconnects with jittered backoff and resubscribes everything. Its connection
//!   (`resp.rs`) parses each message in place, without redis-rs's value tree.
//! - `publisher.rs`: drains the loops' bounded publish queue in batches and pipelines them,
//!   several batches in flight on one connection (so order is kept). With history on, each
//!   publish runs atomically in a Lua script (`publish.lua`; up to 16 publishes per call on
//!   one Redis): offset, stream append, expiry and PUBLISH together. Publishes wait (a while)
//!   for the subscriber when it is away and Redis is not. What cannot reach Redis is
//!   delivered to this node's clients only, counted and logged.
//! - `requests.rs`: request/response work off the loops: history reads for recovery
//!   (`read.lua`) and session reads and writes.
//! - `nodes.rs`: presence (this node's entries, refreshed so that they outlive nothing but
//!   their node; `presence.lua`), the registry of live nodes (`node.lua`) and the server API's
//!   reads and commands (published on the control channel, which the subscriber hears).
//! - On a Redis Cluster (`--redis-cluster`): `cluster.rs` routes every command thread's work
//!   to the primary of each key's slot (a [`cluster::Router`] per thread, used through
//!   `Link` like a connection to one Redis), and `shards.rs` replaces `subscriber.rs`:
//!   sharded Pub/Sub, one connection per primary.
//!
//! Redis data model, per channel `C` (with `--redis-prefix P`):
//! `P` + `C` the Pub/Sub channel; `Pwsrelay:{C}:meta` a hash with the channel's `epoch` and
//! last `offset`; `Pwsrelay:{C}:stream` a stream of the last `--history-size` messages with
//! ids `<offset>-0` (trimmed every 64 publishes, so it may hold up to about 164 more); both
//! expire `--history-ttl` after the last publish (up to 1 s sooner: a node refreshes a
//! channel's expiry at most once a second). Epochs made by the publish script are a 4-character
//! per-process prefix and Redis's clock in hexadecimal microseconds. The braces keep both
//! keys of a channel in one cluster slot. Sessions: `Pwsrelay:session:<id>`, a hash expiring
//! `--session-ttl` after the last write. Presence: `Pwsrelay:{C}:presence`, a hash client id →
//! entry, and `Pwsrelay:{C}:presence-exp`, a sorted set client id → expiry; both expire
//! `--presence-ttl` after the last write. The live nodes (server API on): `Pwsrelay:nodes`, a
//! sorted set node id → last heartbeat, each node's `Pwsrelay:node:<id>` (its info) and
//! `Pwsrelay:node:<id>:channels` (channel → its local subscribers). The control channel, a
//! Pub/Sub channel every node subscribes to: `P` + `wsrelay:control` (a name no client channel
//! may take).
//!
//! In a cluster (`Keys` with `cluster`), `P` + `C` is written without braces
//! ([`cluster::encode_name`]) and is the channel's shard channel (`SPUBLISH`); each channel key
//! carries it whole as its hash tag (`wsrelay:{P+C}:meta`), so the keys and the shard channel
//! share a slot. The meta hash also holds `gen`, the replication id of the primary that wrote it
//! last (see `publish.lua`). Sessions and subject indexes are in slots of their own; the node
//! registry shares the slot of `{nodes}`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;

use crate::backoff::Backoff;
use crate::bridge::{BrokerInbox, LoopHandle};
use crate::config::Config;
use crate::metrics::Metrics;

pub mod cluster;
mod nodes;
mod publisher;
mod requests;
mod resp;
mod shards;
mod subscriber;

/// Time allowed for Redis to answer a command (SUBSCRIBE, a pipeline, a script).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Which Redis the nodes share.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// One Redis (`--redis`).
    One(&'a str),
    /// A Redis Cluster, by its seed nodes (`--redis-cluster`).
    Cluster(&'a str),
}

/// Checks that Redis answers, then starts the subscriber, publisher and request threads.
pub fn spawn(
    config: &Config,
    node: Arc<str>,
    target: Target<'_>,
    inbox: BrokerInbox,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let (backend, where_) = match target {
        Target::One(url) => (
            Backend::One(client(url)?),
            format!("Redis at {}", crate::config::redact_url(url)),
        ),
        Target::Cluster(seeds) => (
            Backend::Cluster(cluster::Seeds::parse(seeds)?),
            "the Redis Cluster".to_owned(),
        ),
    };
    let mut con = backend
        .link(vec![&*publisher::PUBLISH_SCRIPT])
        .map_err(|e| format!("cannot reach {where_}: {e}"))?;
    let cluster = matches!(backend, Backend::Cluster(_));
    // A cluster that answered but is failing over (a primary dead, its replica not promoted
    // yet) is waited for, a while: a node restarted in that window would otherwise exit.
    let wait_until = Instant::now()
        + if cluster {
            CLUSTER_START_WAIT
        } else {
            Duration::ZERO
        };
    let mut waiting = false;
    loop {
        match ready(&mut con, &where_, &config.redis_prefix) {
            Ok(()) => break,
            Err((why, true)) if Instant::now() < wait_until => {
                if !waiting {
                    warn!("{why}; waiting up to {CLUSTER_START_WAIT:?} for the Redis Cluster to settle");
                    waiting = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                if let Link::Cluster(router) = &mut con {
                    let _ = router.refresh();
                }
            }
            Err((why, _)) => return Err(why),
        }
    }
    let shared = Shared {
        backend,
        keys: Keys {
            prefix: config.redis_prefix.clone(),
            cluster,
        },
        loops,
        metrics,
        backoff: Backoff::new(config.redis_backoff_min, config.redis_backoff_max),
        wake_subscriber: Arc::default(),
        entry_size: config.presence_entry_size,
    };
    let sub: Box<dyn FnOnce() + Send> = match &shared.backend {
        Backend::One(_) => {
            let sub = subscriber::Subscriber::new(shared.clone(), inbox.control);
            Box::new(move || sub.run())
        }
        Backend::Cluster(seeds) => {
            let sub = shards::ShardSubscriber::new(shared.clone(), seeds.clone(), inbox.control);
            Box::new(move || sub.run())
        }
    };
    let publ = publisher::Publisher::new(shared.clone(), config, inbox.publish, inbox.queued, con);
    let req = requests::Requests::new(shared.clone(), config, inbox.requests);
    let nodes_thread = nodes::NodesThread::new(shared, config, node, inbox.nodes);
    let start = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| format!("cannot start {name} thread: {e}"))
    };
    Ok(vec![
        start("wsrelay-redis-sub", sub)?,
        start("wsrelay-redis-pub", Box::new(move || publ.run()))?,
        start("wsrelay-redis-req", Box::new(move || req.run()))?,
        start("wsrelay-redis-nodes", Box::new(move || nodes_thread.run()))?,
    ])
}

/// How long a node starting on a Redis Cluster that answers but does not serve every slot,
/// or has a primary that does not answer, waits for it to settle (a failover) before it gives
/// up.
const CLUSTER_START_WAIT: Duration = Duration::from_secs(20);

/// Whether Redis is ready for this node: it answers PING (every primary, on a cluster), a
/// cluster serves every slot, and the key prefix is registered. The error says why, and
/// whether waiting may help (not for a prefix that clashes with another deployment's).
fn ready(con: &mut Link, where_: &str, prefix: &str) -> Result<(), (String, bool)> {
    redis::cmd("PING")
        .query::<String>(con)
        .map_err(|e| (format!("{where_} does not answer PING: {e}"), true))?;
    if let Link::Cluster(router) = &*con
        && !router.map().complete()
    {
        return Err((
            format!("{where_} does not serve every slot (CLUSTER SLOTS): is it set up?"),
            true,
        ));
    }
    match register(con, prefix) {
        Ok(None) => Ok(()),
        Ok(Some(other)) => Err((prefix_conflict(prefix, &other), false)),
        Err(e) => Err((format!("cannot register the key prefix in {where_}: {e}"), true)),
    }
}

/// How a thread reaches Redis.
#[derive(Clone)]
enum Backend {
    /// One Redis.
    One(redis::Client),
    /// A Redis Cluster: each thread routes by slot ([`cluster::Router`]).
    Cluster(cluster::Seeds),
}

impl Backend {
    /// A new command connection (one Redis), or a new router over the cluster's primaries
    /// that loads `scripts` on every node it connects to.
    fn link(&self, scripts: Vec<&'static redis::Script>) -> redis::RedisResult<Link> {
        match self {
            Backend::One(client) => {
                let mut con = connect(client)?;
                for s in scripts {
                    s.prepare_invoke().load(&mut con)?;
                }
                Ok(Link::One(con))
            }
            Backend::Cluster(seeds) => Ok(Link::Cluster(cluster::Router::new(seeds.clone(), scripts)?)),
        }
    }
}

/// A command connection to one Redis, or a router over a cluster: the request and nodes
/// threads use either alike.
#[allow(clippy::large_enum_variant)]
enum Link {
    One(redis::Connection),
    Cluster(cluster::Router),
}

impl redis::ConnectionLike for Link {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Link::One(c) => c.req_packed_command(cmd),
            Link::Cluster(r) => r.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Link::One(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(r) => r.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::One(c) => c.get_db(),
            Link::Cluster(r) => r.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Link::One(c) => c.check_connection(),
            Link::Cluster(r) => r.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Link::One(c) => c.is_open(),
            Link::Cluster(r) => r.is_open(),
        }
    }
}

/// What every Redis thread needs.
#[derive(Clone)]
struct Shared {
    backend: Backend,
    keys: Keys,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    /// Set by the publisher when Redis answers it while the subscriber is away: the subscriber
    /// tries to connect at once instead of waiting out its backoff.
    wake_subscriber: Arc<AtomicBool>,
    /// `--presence-entry-size`: entries and events read back are checked against it.
    entry_size: usize,
}

/// The registry of key prefixes of the deployments sharing a Redis (not prefixed itself).
pub const PREFIX_REGISTRY: &str = "wsrelay:prefixes";
/// How often a running node renews its deployment's prefix in the registry.
const REGISTER_EVERY: Duration = Duration::from_secs(60);
/// A prefix not renewed for this long belongs to a deployment that is gone.
const REGISTRATION_STALE: Duration = Duration::from_secs(180);

static REGISTER_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("register.lua")));

/// Registers `prefix` in the registry. Returns the prefix of another live deployment that is
/// not prefix-free with it (one starts with the other: their channels and keys could meet),
/// in which case `prefix` is not registered.
fn register(con: &mut dyn redis::ConnectionLike, prefix: &str) -> redis::RedisResult<Option<String>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stale = now.saturating_sub(REGISTRATION_STALE.as_secs());
    let answer: String = REGISTER_SCRIPT
        .key(PREFIX_REGISTRY)
        .arg(prefix)
        .arg(now)
        .arg(stale)
        .invoke(con)?;
    Ok(answer.strip_prefix('=').map(str::to_owned))
}

/// Why `prefix` may not share a Redis with `other`.
fn prefix_conflict(prefix: &str, other: &str) -> String {
    format!(
        "--redis-prefix {prefix:?} is not safe next to prefix {other:?}, used by another wsrelay \
         deployment on this Redis: one starts with the other, so their channels and keys can meet. \
         Prefixes sharing a Redis must be prefix-free (e.g. \"a:\" and \"b:\")"
    )
}

/// The client for `url`, with TCP_NODELAY (redis-rs leaves it off): the publisher writes a
/// pipeline while earlier ones are still unanswered, and with Nagle's algorithm each such
/// write would wait for the acknowledgement of the previous one, adding a round trip (tens of
/// milliseconds under load) to every batch.
fn client(url: &str) -> Result<redis::Client, String> {
    let invalid =
        |e: redis::RedisError| format!("invalid Redis URL {:?}: {e}", crate::config::redact_url(url));
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(invalid)?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info).map_err(invalid)
}

/// A connection for commands, with timeouts so a stalled Redis cannot hang a thread.
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    con.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(con)
}

/// Redis key and channel names (see the module documentation).
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
    /// Cluster names: no brace but the hash tags (see [`cluster::encode_name`]).
    cluster: bool,
}

impl Keys {
    /// The Pub/Sub channel of `channel`.
    fn channel(&self, channel: &str) -> String {
        let name = format!("{}{channel}", self.prefix);
        if self.cluster {
            cluster::encode_name(&name).into_owned()
        } else {
            name
        }
    }
    /// The channel a Pub/Sub channel name is of (the inverse of [`Keys::channel`]).
    fn channel_of<'a>(&self, name: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let name = if self.cluster {
            cluster::decode_name(name)?
        } else {
            name.into()
        };
        match name {
            std::borrow::Cow::Borrowed(n) => n.strip_prefix(self.prefix.as_str()).map(Into::into),
            std::borrow::Cow::Owned(n) => n.strip_prefix(self.prefix.as_str()).map(|c| c.to_owned().into()),
        }
    }
    /// The start of every key: the prefix (without braces in a cluster).
    fn key_prefix(&self) -> std::borrow::Cow<'_, str> {
        if self.cluster {
            cluster::encode_name(&self.prefix)
        } else {
            self.prefix.as_str().into()
        }
    }
    /// A key of `channel`: in a cluster its hash tag is the channel's whole Pub/Sub name, so
    /// every key of the channel and its Pub/Sub channel share one slot.
    fn channel_key(&self, channel: &str, what: &str) -> String {
        if self.cluster {
            format!(
                "{}wsrelay:{{{}}}:{what}",
                self.key_prefix(),
                self.channel(channel)
            )
        } else {
            String::from_utf8(self.plain_key(channel, what).concat()).expect("pieces of strings")
        }
    }
    /// A key of `channel` on one Redis, as the pieces it is spelled from (no allocation: the
    /// publisher packs the pieces for every publish).
    fn plain_key<'a>(&'a self, channel: &'a str, what: &'a str) -> [&'a [u8]; 5] {
        let (prefix, channel, what) = (self.prefix.as_bytes(), channel.as_bytes(), what.as_bytes());
        [prefix, b"wsrelay:{", channel, b"}:", what]
    }
    fn meta(&self, channel: &str) -> String {
        self.channel_key(channel, "meta")
    }
    fn stream(&self, channel: &str) -> String {
        self.channel_key(channel, "stream")
    }
    fn session(&self, id: &str) -> String {
        if self.cluster {
            format!(
                "{}wsrelay:session:{}",
                self.key_prefix(),
                cluster::encode_name(id)
            )
        } else {
            format!("{}wsrelay:session:{id}", self.prefix)
        }
    }
    fn presence(&self, channel: &str) -> String {
        self.channel_key(channel, "presence")
    }
    fn presence_expiry(&self, channel: &str) -> String {
        self.channel_key(channel, "presence-exp")
    }
    /// The registry of live nodes; in a cluster, it and every node's keys share one slot.
    fn nodes(&self) -> String {
        if self.cluster {
            format!("{}wsrelay:{{nodes}}", self.key_prefix())
        } else {
            format!("{}wsrelay:nodes", self.prefix)
        }
    }
    fn node(&self, id: &str) -> String {
        if self.cluster {
            format!(
                "{}wsrelay:{{nodes}}:node:{}",
                self.key_prefix(),
                cluster::encode_name(id)
            )
        } else {
            format!("{}wsrelay:node:{id}", self.prefix)
        }
    }
    fn node_channels(&self, id: &str) -> String {
        format!("{}:channels", self.node(id))
    }
    fn control(&self) -> String {
        self.channel(crate::channels::CONTROL)
    }
    /// The Pub/Sub publish command: `SPUBLISH` (sharded) in a cluster.
    fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }
    /// The index of one token subject's sessions (the subject hashed: it may be anything).
    fn subject_sessions(&self, subject: &str) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(subject.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}wsrelay:subject:{hex}", self.key_prefix())
    }
}

/// Whole seconds for EXPIRE, at least 1.
fn ttl_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
