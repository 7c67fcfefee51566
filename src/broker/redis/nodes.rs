//! The nodes thread: presence, the registry of live nodes and the server API, through Redis,
//! off the loops and off the publish pipeline (a burst of subscribers joining never delays a
//! message, a slow presence read never delays a recovery).
//!
//! - Presence: this node's entries are kept here ([`PresenceTable`]) and written to Redis by
//!   `presence.lua` as subscriptions join and leave (pipelined, in order). Every third of
//!   `--presence-ttl` they are refreshed; an entry whose node stops refreshing it (the node
//!   died) expires, and the next script that touches the channel removes it with a `leave`
//!   event. So a dead node's subscribers leave presence within the time to live and a third.
//!   `join`/`leave` events are published by the scripts themselves, once per change, to the
//!   channel's Pub/Sub channel: every node with subscribers there hears them.
//! - Nodes (server API on): a heartbeat every second (`node.lua`) keeps this node in the
//!   registry with its info and its channels' subscriber counts (only what changed is
//!   written); `info` and `channels` read every live node's.
//! - Server API commands are published on the control channel; the answer says how many nodes
//!   heard it.
//!
//! Failures are answered (`unavailable`) or, for presence changes, mended by the next refresh:
//! an entry Redis did not take is written again, one it did not remove expires.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, warn};
use redis::Value;

use super::{Link, Shared};
use crate::bridge::{Admin, Channel, NodeInfo, NodeWork, PresenceAnswer, Reply, ReplyTo};
use crate::broker::presence::{Added, PresenceTable};
use crate::broker::{LoopChannels, Outbox, wire};
use crate::config::Config;
use crate::log_throttle::LogThrottle;
use crate::metrics::inc;

static PRESENCE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("presence.lua")));
static NODE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("node.lua")));

/// How often a node renews its place in the registry (server API on).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone from `info` and `channels`.
pub const NODE_STALE: Duration = Duration::from_secs(3);
/// Most commands in one pipeline.
const BATCH: usize = 256;
/// Most nodes `info` and `channels` read.
const MAX_NODES: isize = 1000;

/// One script call: its keys and arguments.
struct Call {
    script: &'static redis::Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

pub(super) struct NodesThread {
    redis: Shared,
    queue: Receiver<NodeWork>,
    config: Config,
    node: Arc<str>,
    started: u64,
    con: Option<Link>,
    next_attempt: Instant,
    /// This node's presence entries.
    table: PresenceTable,
    loop_channels: LoopChannels,
    /// This node's channel counts as last written to Redis.
    written: HashMap<Channel, u64>,
    next_refresh: Instant,
    next_beat: Instant,
    outbox: Outbox,
    full_log: LogThrottle,
}

impl NodesThread {
    pub(super) fn new(redis: Shared, config: &Config, node: Arc<str>, queue: Receiver<NodeWork>) -> Self {
        NodesThread {
            redis,
            queue,
            config: config.clone(),
            node,
            started: crate::broker::unix_secs(),
            con: None,
            next_attempt: Instant::now(),
            table: PresenceTable::default(),
            loop_channels: LoopChannels::default(),
            written: HashMap::new(),
            next_refresh: Instant::now() + config.presence_ttl / 3,
            next_beat: Instant::now(),
            outbox: Outbox::default(),
            full_log: LogThrottle::default(),
        }
    }

    fn api(&self) -> bool {
        self.config.api_key.is_some()
    }

    pub(super) fn run(mut self) {
        loop {
            let now = Instant::now();
            let mut wait = self.outbox.idle_wait();
            if !self.table.is_empty() {
                wait = wait.min(self.next_refresh.saturating_duration_since(now));
            }
            if self.api() {
                wait = wait.min(self.next_beat.saturating_duration_since(now));
            }
            match self.queue.recv_timeout(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match self.queue.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    self.handle(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.leave_registry(),
            }
            self.outbox.retry(&self.redis.loops);
            let now = Instant::now();
            if now >= self.next_refresh {
                self.next_refresh = now + self.config.presence_ttl / 3;
                self.refresh();
            }
            if self.api() && now >= self.next_beat {
                self.next_beat = now + HEARTBEAT;
                self.beat();
            }
            self.redis
                .metrics
                .broker
                .presence_entries
                .store(self.table.len() as u64, Ordering::Relaxed);
        }
    }

    /// Carries out a batch in order: presence changes together in one pipeline, the rest one
    /// by one.
    fn handle(&mut self, batch: Vec<NodeWork>) {
        let mut changes = Vec::new();
        for c in batch {
            match c {
                NodeWork::Join { .. } | NodeWork::Leave { .. } => changes.push(c),
                NodeWork::LoopChannels { loop_id, channels } => self.loop_channels.set(loop_id, channels),
                other => {
                    self.presence_changes(std::mem::take(&mut changes));
                    self.answer(other);
                }
            }
        }
        self.presence_changes(changes);
    }

    /// Where `presence.lua` publishes `channel`'s join and leave events: "" when it has none,
    /// else "P" (PUBLISH) or "S" (SPUBLISH, in a cluster) and the Pub/Sub channel.
    fn events(&self, channel: &str) -> String {
        if !self.config.join_leave_on(channel) {
            return String::new();
        }
        let how = if self.redis.keys.cluster { "S" } else { "P" };
        format!("{how}{}", self.redis.keys.channel(channel))
    }

    fn presence_call(&self, channel: &str, op: &str, extra: Vec<Vec<u8>>) -> Call {
        let keys = &self.redis.keys;
        let mut args = vec![
            op.as_bytes().to_vec(),
            self.events(channel).into_bytes(),
            self.config.presence_ttl.as_millis().to_string().into_bytes(),
        ];
        args.extend(extra);
        Call {
            script: &PRESENCE_SCRIPT,
            keys: vec![keys.presence(channel), keys.presence_expiry(channel)],
            args,
        }
    }

    /// Joins and leaves, in order, in one pipeline. An entry Redis refused for a full channel
    /// waits here (counted, logged) for room: a leave of this node on its channel, or the next
    /// refresh, offers it again. One that did not reach Redis stays here and is written by the
    /// next refresh.
    fn presence_changes(&mut self, changes: Vec<NodeWork>) {
        if changes.is_empty() {
            return;
        }
        let max = self.config.presence_max;
        let mut calls = Vec::new();
        let mut joins = Vec::new();
        let mut fills = Vec::new();
        for c in changes {
            match c {
                NodeWork::Join {
                    channel,
                    client,
                    entry,
                } => match self.table.add(&channel, client.clone(), entry.clone(), max) {
                    Added::Full => self.overflow(&channel),
                    Added::New | Added::Existing => {
                        let extra = vec![
                            max.to_string().into_bytes(),
                            client.as_bytes().to_vec(),
                            entry.as_bytes().to_vec(),
                        ];
                        joins.push((calls.len(), channel.clone(), client));
                        calls.push(self.presence_call(&channel, "add", extra));
                    }
                },
                NodeWork::Leave { channel, client } if self.table.remove(&channel, &client).is_some() => {
                    calls.push(self.presence_call(&channel, "remove", vec![client.as_bytes().to_vec()]));
                    if let Some(fill) = self.fill_call(&channel) {
                        fills.push((calls.len(), channel));
                        calls.push(fill);
                    }
                }
                _ => {}
            }
        }
        match self.with_con(|con| eval_all(con, &calls)) {
            Ok(answers) => {
                for (i, channel, client) in joins {
                    if matches!(answers.get(i), Some(Value::Int(0))) {
                        self.table.refused_elsewhere(&channel, &client);
                        self.overflow(&channel);
                    }
                }
                self.filled(&fills, &answers);
            }
            Err(e) => debug!("presence changes not written: {e}; the next refresh writes them"),
        }
    }

    /// The call that lists this node's subscribers of `channel` waiting past the bound, while
    /// there is room (`presence.lua` "fill"), if it has any.
    fn fill_call(&self, channel: &Channel) -> Option<Call> {
        let max = self.config.presence_max;
        let waiting = self.table.waiting_on(channel)?;
        let mut extra = vec![max.to_string().into_bytes()];
        // No more can be listed than the bound.
        for (client, entry) in waiting.iter().take(max) {
            extra.push(client.as_bytes().to_vec());
            extra.push(entry.as_bytes().to_vec());
        }
        Some(self.presence_call(channel, "fill", extra))
    }

    /// Takes the answers to "fill" calls (`(index of the answer, channel)`): the subscribers
    /// Redis listed are this node's listed entries from now on.
    fn filled(&mut self, fills: &[(usize, Channel)], answers: &[Value]) {
        for (i, channel) in fills {
            let Some(Value::Array(listed)) = answers.get(*i) else {
                continue;
            };
            for client in listed {
                if let Value::BulkString(c) = client {
                    if let Ok(c) = std::str::from_utf8(c) {
                        self.table.listed_elsewhere(channel, c);
                    }
                }
            }
        }
    }

    fn overflow(&mut self, channel: &str) {
        inc(&self.redis.metrics.broker.presence_overflow);
        if self.full_log.allow() {
            warn!(
                "presence of {channel:?} is full (--presence-max {}): a subscriber waits to be listed",
                self.config.presence_max
            );
        }
    }

    /// Renews every entry of this node (and writes again any Redis lost), and offers its
    /// subscribers waiting past the bound the room others freed.
    fn refresh(&mut self) {
        let mut calls: Vec<Call> = self
            .table
            .channels()
            .map(|(channel, clients)| {
                let pairs = clients
                    .iter()
                    .flat_map(|(c, e)| [c.as_bytes().to_vec(), e.as_bytes().to_vec()])
                    .collect();
                self.presence_call(channel, "refresh", pairs)
            })
            .collect();
        let waiting: Vec<Channel> = self.table.waiting_channels().cloned().collect();
        let mut fills = Vec::new();
        for channel in waiting {
            if let Some(fill) = self.fill_call(&channel) {
                fills.push((calls.len(), channel));
                calls.push(fill);
            }
        }
        let mut answers = Vec::with_capacity(calls.len());
        for chunk in calls.chunks(BATCH) {
            match self.with_con(|con| eval_all(con, chunk)) {
                Ok(a) => answers.extend(a),
                Err(e) => {
                    debug!("presence not refreshed: {e}");
                    return;
                }
            }
        }
        self.filled(&fills, &answers);
    }

    /// Renews this node in the registry, with its info and what changed in its channels.
    fn beat(&mut self) {
        let totals = self.loop_channels.total();
        let keys = self.redis.keys.clone();
        let node_channels = keys.node_channels(&self.node);
        let changed: Vec<(&Channel, u64)> = totals
            .iter()
            .filter(|(c, n)| self.written.get(*c) != Some(n))
            .map(|(c, n)| (c, *n))
            .collect();
        let gone: Vec<&Channel> = self.written.keys().filter(|c| !totals.contains_key(*c)).collect();
        let mut pipe = redis::pipe();
        for chunk in changed.chunks(BATCH) {
            let cmd = pipe.cmd("HSET").arg(&node_channels);
            for (c, n) in chunk {
                cmd.arg(&***c).arg(*n);
            }
            cmd.ignore();
        }
        for chunk in gone.chunks(BATCH) {
            let cmd = pipe.cmd("HDEL").arg(&node_channels);
            for c in chunk {
                cmd.arg(&***c);
            }
            cmd.ignore();
        }
        let info = crate::broker::node_info(&self.node, self.started, &self.redis.metrics, totals.len());
        pipe.cmd("EVALSHA")
            .arg(NODE_SCRIPT.get_hash())
            .arg(3)
            .arg(keys.nodes())
            .arg(keys.node(&self.node))
            .arg(&node_channels)
            .arg(&*self.node)
            .arg(NODE_STALE.as_millis() as u64)
            .arg("version")
            .arg(&info.version)
            .arg("connections")
            .arg(info.connections)
            .arg("channels")
            .arg(info.channels)
            .arg("started")
            .arg(info.started);
        match self.with_con(|con| pipe.query::<Vec<i64>>(con)) {
            Ok(kept) => {
                // The channels hash was gone (expired while Redis was away, or Redis restarted
                // empty): everything is written again next time.
                self.written = if kept.first() == Some(&0) && changed.is_empty() {
                    HashMap::new()
                } else {
                    totals
                };
            }
            Err(e) => {
                debug!("heartbeat not written: {e}");
                // Reconnect (and load the scripts again) next time: a flushed script fails here.
                self.con = None;
            }
        }
    }

    /// At exit (every loop is gone, their subscribers' leaves written): this node leaves the
    /// registry at once rather than when its heartbeat goes stale.
    fn leave_registry(&mut self) {
        if !self.api() {
            return;
        }
        let keys = self.redis.keys.clone();
        let node = self.node.clone();
        let gone = self.with_con(|con| {
            redis::pipe()
                .cmd("ZREM")
                .arg(keys.nodes())
                .arg(&*node)
                .cmd("DEL")
                .arg(keys.node(&node))
                .arg(keys.node_channels(&node))
                .query::<()>(con)
        });
        if let Err(e) = gone {
            debug!("this node stays in the registry until it is stale: {e}");
        }
    }

    /// A read or a command with an answer.
    fn answer(&mut self, c: NodeWork) {
        match c {
            NodeWork::Presence {
                channel,
                stats,
                reference,
                to,
            } => {
                let call = self.presence_call(&channel, if stats { "stats" } else { "read" }, Vec::new());
                let (max, size) = (self.config.presence_max, self.redis.entry_size);
                let result = self
                    .with_con(|con| eval_all(con, std::slice::from_ref(&call)))
                    .and_then(|v| presence_answer(v.into_iter().next(), stats, max, size));
                let reply = Reply::Presence {
                    channel,
                    stats,
                    reference,
                    result,
                };
                self.outbox.reply(&self.redis.loops, to, reply);
            }
            NodeWork::Nodes { to } => {
                let result = self.live_nodes(|keys, id| keys.node(id)).map(|nodes| {
                    nodes
                        .into_iter()
                        .map(|(id, fields)| node_from(id, &fields))
                        .collect()
                });
                self.reply(to, Reply::Nodes(result));
            }
            NodeWork::Channels { limit, to } => {
                let result = self.live_nodes(|keys, id| keys.node_channels(id)).map(|nodes| {
                    let mut counts: HashMap<String, u64> = HashMap::new();
                    for (channel, n) in nodes.into_iter().flat_map(|(_, f)| f) {
                        *counts.entry(channel).or_default() += n.parse::<u64>().unwrap_or(0);
                    }
                    crate::broker::top_channels(counts, limit)
                });
                self.reply(to, Reply::Channels(result));
            }
            NodeWork::Admin { admin, to } => {
                let result = self.publish_admin(&admin);
                self.reply(to, Reply::AdminSent(result));
            }
            NodeWork::Join { .. } | NodeWork::Leave { .. } | NodeWork::LoopChannels { .. } => {}
        }
    }

    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        self.outbox.reply(&self.redis.loops, to, reply);
    }

    /// Publishes a command on the control channel: how many nodes heard it.
    fn publish_admin(&mut self, admin: &Admin) -> Result<u64, String> {
        let channel = self.redis.keys.control();
        let payload = wire::encode_admin(admin);
        let keys_publish = self.redis.keys.publish_command();
        self.with_con(|con| {
            redis::cmd(keys_publish)
                .arg(&channel)
                .arg(&payload)
                .query::<u64>(con)
        })
    }

    /// Every live node's hash named by `key`: (node id, its fields).
    #[allow(clippy::type_complexity)]
    fn live_nodes(
        &mut self,
        key: impl Fn(&super::Keys, &str) -> String,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, String> {
        let keys = self.redis.keys.clone();
        self.with_con(|con| {
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys.nodes())
                .arg(0)
                .arg(MAX_NODES - 1)
                .query(con)?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL").arg(key(&keys, id));
            }
            let hashes: Vec<Vec<(String, String)>> = pipe.query(con)?;
            // A node whose hash expired is gone, even if the registry still names it.
            Ok(ids
                .into_iter()
                .zip(hashes)
                .filter(|(_, h)| !h.is_empty())
                .collect())
        })
    }

    /// Runs `f` on the connection, connecting (and loading the scripts) first if needed, not
    /// more often than the backoff allows. An I/O failure gets one retry on a fresh connection
    /// (after a Redis restart the first command fails on the dead socket); everything here is
    /// safe to repeat.
    fn with_con<T>(&mut self, mut f: impl FnMut(&mut Link) -> redis::RedisResult<T>) -> Result<T, String> {
        if let Some(con) = &mut self.con {
            match f(con) {
                Ok(v) => return Ok(v),
                Err(e) if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) => {
                    return Err(format!("redis: {e}"));
                }
                Err(e) => {
                    debug!("redis nodes command failed: {e}; retrying on a new connection");
                    self.con = None;
                    self.next_attempt = Instant::now();
                }
            }
        }
        if Instant::now() < self.next_attempt {
            return Err("redis unreachable".into());
        }
        let mut con = match self.redis.backend.link(vec![&*PRESENCE_SCRIPT, &*NODE_SCRIPT]) {
            Ok(c) => c,
            Err(e) => {
                self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                return Err(format!("redis unreachable: {e}"));
            }
        };
        let result = f(&mut con).map_err(|e| format!("redis: {e}"));
        self.con = Some(con);
        result
    }
}

/// Runs script calls in one pipeline; calls answered NOSCRIPT (the scripts were flushed) are
/// loaded and run again, in order. Other errors come back as the call's answer.
fn eval_all(con: &mut Link, calls: &[Call]) -> redis::RedisResult<Vec<Value>> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let pipeline = |which: &mut dyn Iterator<Item = &Call>| {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in which {
            let cmd = pipe.cmd("EVALSHA").arg(c.script.get_hash()).arg(c.keys.len());
            for k in &c.keys {
                cmd.arg(k);
            }
            for a in &c.args {
                cmd.arg(&a[..]);
            }
        }
        pipe
    };
    let mut values: Vec<Value> = pipeline(&mut calls.iter()).query(con)?;
    let missing: Vec<usize> = (0..values.len())
        .filter(|&i| matches!(&values[i], Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript)))
        .collect();
    if missing.is_empty() {
        return Ok(values);
    }
    PRESENCE_SCRIPT.prepare_invoke().load(con)?;
    NODE_SCRIPT.prepare_invoke().load(con)?;
    let again: Vec<Value> = pipeline(&mut missing.iter().map(|&i| &calls[i])).query(con)?;
    for (i, v) in missing.into_iter().zip(again) {
        values[i] = v;
    }
    Ok(values)
}

/// A presence read's answer: entries read back are re-encoded from their fields, those that
/// are not entries (or too large) are skipped, and at most `max` are listed.
fn presence_answer(v: Option<Value>, stats: bool, max: usize, size: usize) -> Result<PresenceAnswer, String> {
    let bad = || "unexpected reply from the presence script".to_owned();
    match v {
        Some(Value::ServerError(e)) => Err(format!("redis: {e:?}")),
        Some(Value::Array(items)) if stats => {
            let n = |i: usize| match items.get(i) {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            Ok(PresenceAnswer {
                clients: n(0).ok_or_else(bad)?,
                users: n(1).ok_or_else(bad)?,
                entries: Vec::new(),
            })
        }
        Some(Value::Array(items)) => {
            let entries: Vec<Box<str>> = items
                .iter()
                .filter_map(|i| match i {
                    Value::BulkString(b) => crate::presence::canonical(b, size),
                    _ => None,
                })
                .take(max)
                .map(Box::from)
                .collect();
            let users: std::collections::HashSet<String> = entries
                .iter()
                .filter_map(|e| crate::presence::user_key(e))
                .collect();
            Ok(PresenceAnswer {
                clients: entries.len() as u64,
                users: users.len() as u64,
                entries,
            })
        }
        _ => Err(bad()),
    }
}

/// A node's info from its hash.
fn node_from(id: String, fields: &[(String, String)]) -> NodeInfo {
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let num = |k: &str| get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    NodeInfo {
        version: get("version").unwrap_or_default().chars().take(64).collect(),
        connections: num("connections"),
        channels: num("channels"),
        started: num("started"),
        id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn presence_answers_are_checked() {
        let read = Value::Array(vec![
            bulk(r#"{"client":"a","user":"u"}"#),
            bulk("junk"),
            bulk(r#"{"client":"b","user":"u","extra":1}"#),
            bulk(r#"{"client":"c"}"#),
        ]);
        let p = presence_answer(Some(read.clone()), false, 10, 512).unwrap();
        assert_eq!(p.clients, 3);
        assert_eq!(p.users, 2);
        assert_eq!(&*p.entries[1], r#"{"client":"b","user":"u"}"#);
        assert_eq!(presence_answer(Some(read), false, 1, 512).unwrap().clients, 1);
        let stats = Value::Array(vec![Value::Int(3), Value::Int(2)]);
        let p = presence_answer(Some(stats), true, 10, 512).unwrap();
        assert_eq!((p.clients, p.users), (3, 2));
        assert!(presence_answer(Some(Value::Nil), true, 10, 512).is_err());
    }

    #[test]
    fn node_info_from_its_hash() {
        let fields = vec![
            ("version".to_owned(), "0.1.0".to_owned()),
            ("connections".to_owned(), "12".to_owned()),
            ("started".to_owned(), "x".to_owned()),
        ];
        let n = node_from("abc".into(), &fields);
        assert_eq!(
            (n.id.as_str(), n.version.as_str(), n.connections, n.started),
            ("abc", "0.1.0", 12, 0)
        );
    }
}
