//! The Redis backplane: how nodes share channels, history and sessions.
//!
//! - `subscriber.rs`: one blocking Pub/Sub connection. SUBSCRIBEs only to channels some local
//!   loop has members on (refcounted over loops), routes each message only to the loops that
//!   need it, reconnects with jittered backoff and resubscribes everything.
//! - `publisher.rs`: drains the loops' bounded publish queue in batches and pipelines them,
//!   several batches in flight on one connection (so order is kept). With history on, each publish is one atomic Lua script
//!   (`publish.lua`): offset, stream append, expiry and PUBLISH together. What cannot reach
//!   Redis is delivered to this node's clients only, counted and logged.
//! - `requests.rs`: request/response work off the loops: history reads for recovery
//!   (`read.lua`) and session reads and writes.
//! - `nodes.rs`: presence (this node's entries, refreshed so that they outlive nothing but
//!   their node; `presence.lua`), the registry of live nodes (`node.lua`) and the server API's
//!   reads and commands (published on the control channel, which the subscriber hears).
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

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::bridge::{BrokerInbox, LoopHandle};
use crate::config::Config;
use crate::metrics::Metrics;

mod nodes;
mod publisher;
mod requests;
mod subscriber;

/// Time allowed for Redis to answer a command (SUBSCRIBE, a pipeline, a script).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks that Redis answers, then starts the subscriber, publisher and request threads.
pub fn spawn(
    config: &Config,
    node: Arc<str>,
    url: &str,
    inbox: BrokerInbox,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let client = client(url)?;
    let mut con = connect(&client).map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
    redis::cmd("PING")
        .query::<String>(&mut con)
        .map_err(|e| format!("Redis at {url} does not answer PING: {e}"))?;
    let prefix = &config.redis_prefix;
    match register(&mut con, prefix) {
        Ok(None) => {}
        Ok(Some(other)) => return Err(prefix_conflict(prefix, &other)),
        Err(e) => return Err(format!("cannot register the key prefix in Redis at {url}: {e}")),
    }
    let shared = Shared {
        client,
        keys: Keys {
            prefix: config.redis_prefix.clone(),
        },
        loops,
        metrics,
        backoff: Backoff::new(config.redis_backoff_min, config.redis_backoff_max),
        entry_size: config.presence_entry_size,
    };
    let sub = subscriber::Subscriber::new(shared.clone(), inbox.control);
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
        start("wsrelay-redis-sub", Box::new(move || sub.run()))?,
        start("wsrelay-redis-pub", Box::new(move || publ.run()))?,
        start("wsrelay-redis-req", Box::new(move || req.run()))?,
        start("wsrelay-redis-nodes", Box::new(move || nodes_thread.run()))?,
    ])
}

/// What every Redis thread needs.
#[derive(Clone)]
struct Shared {
    client: redis::Client,
    keys: Keys,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
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
fn register(con: &mut redis::Connection, prefix: &str) -> redis::RedisResult<Option<String>> {
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
    let invalid = |e: redis::RedisError| format!("invalid Redis URL {url:?}: {e}");
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
}

impl Keys {
    fn channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
    fn meta(&self, channel: &str) -> String {
        format!("{}wsrelay:{{{channel}}}:meta", self.prefix)
    }
    fn stream(&self, channel: &str) -> String {
        format!("{}wsrelay:{{{channel}}}:stream", self.prefix)
    }
    fn session(&self, id: &str) -> String {
        format!("{}wsrelay:session:{id}", self.prefix)
    }
    fn presence(&self, channel: &str) -> String {
        format!("{}wsrelay:{{{channel}}}:presence", self.prefix)
    }
    fn presence_expiry(&self, channel: &str) -> String {
        format!("{}wsrelay:{{{channel}}}:presence-exp", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}wsrelay:nodes", self.prefix)
    }
    fn node(&self, id: &str) -> String {
        format!("{}wsrelay:node:{id}", self.prefix)
    }
    fn node_channels(&self, id: &str) -> String {
        format!("{}wsrelay:node:{id}:channels", self.prefix)
    }
    fn control(&self) -> String {
        format!("{}{}", self.prefix, crate::channels::CONTROL)
    }
    /// The index of one token subject's sessions (the subject hashed: it may be anything).
    fn subject_sessions(&self, subject: &str) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(subject.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}wsrelay:subject:{hex}", self.prefix)
    }
}

/// Whole seconds for EXPIRE, at least 1.
fn ttl_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
