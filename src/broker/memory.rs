//! The in-process broker: one thread that routes every publish to the loops with members on
//! its channel, and keeps history and sessions in memory. With it, one wsrelay process is a
//! complete server with nothing else running. It owns the routing table and the stores; loops
//! reach it only through the bridge queues.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::select;

use super::memory_store::{HistoryLimits, HistoryStore, SessionStore};
use super::presence::{Added, PresenceTable};
use super::{LoopChannels, Outbox, Routes};
use crate::bridge::{
    BrokerInbox, Control, Delivery, LoopHandle, NodeWork, Position, Publish, Reply, Request,
};
use crate::config::Config;
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, inc};

/// How often expired history and sessions are swept out.
const SWEEP: Duration = Duration::from_secs(1);

/// Starts the broker thread. It exits when every loop has dropped its broker handle.
pub fn spawn(
    config: &Config,
    node: Arc<str>,
    inbox: BrokerInbox,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    metrics.broker.subscriber_up.store(true, Ordering::Relaxed);
    let broker = MemoryBroker {
        loops,
        metrics,
        routes: Routes::default(),
        outbox: Outbox::default(),
        drop_log: LogThrottle::default(),
        history: (config.history_size > 0).then(|| {
            HistoryStore::new(HistoryLimits {
                size: config.history_size,
                ttl: config.history_ttl,
                max_channels: config.max_history_channels,
                max_bytes: config.history_memory,
                channel_bytes: config.history_channel_memory,
            })
        }),
        sessions: SessionStore::new(config.session_ttl, config.max_sessions, config.session_memory)
            .per_subject(config.max_sessions_per_subject),
        presence: PresenceTable::default(),
        loop_channels: LoopChannels::default(),
        config: config.clone(),
        node,
        started: super::unix_secs(),
    };
    std::thread::Builder::new()
        .name("wsrelay-broker".into())
        .spawn(move || broker.run(inbox))
        .expect("spawn broker thread")
}

struct MemoryBroker {
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    routes: Routes,
    outbox: Outbox,
    drop_log: LogThrottle,
    /// `None` with `--history-size 0`.
    history: Option<HistoryStore>,
    sessions: SessionStore,
    /// Every presence entry of the process.
    presence: PresenceTable,
    /// The loops' channel counts (server API on).
    loop_channels: LoopChannels,
    config: Config,
    node: Arc<str>,
    started: u64,
}

impl MemoryBroker {
    fn run(mut self, inbox: BrokerInbox) {
        let mut next_sweep = Instant::now() + SWEEP;
        loop {
            let timeout = self.outbox.idle_wait().min(SWEEP);
            select! {
                recv(inbox.control) -> c => match c {
                    Ok(c) => self.control(c),
                    Err(_) => return,
                },
                recv(inbox.publish) -> p => match p {
                    Ok(p) => self.publish(inbox.queued.taken(p)),
                    Err(_) => return,
                },
                recv(inbox.requests) -> r => match r {
                    Ok(r) => self.request(r),
                    Err(_) => return,
                },
                recv(inbox.nodes) -> c => match c {
                    Ok(c) => self.node_work(c),
                    Err(_) => return,
                },
                default(timeout) => {}
            }
            self.outbox.retry(&self.loops);
            let now = Instant::now();
            if now >= next_sweep {
                if let Some(h) = &mut self.history {
                    h.expire(now);
                }
                self.sessions.expire(now);
                next_sweep = now + SWEEP;
            }
            // Counted before anything that follows can show its effect (a failed resume).
            let evicted = self.sessions.evicted + self.history.as_ref().map_or(0, |h| h.evicted);
            self.metrics
                .broker
                .store_evictions
                .store(evicted, Ordering::Relaxed);
        }
    }

    fn control(&mut self, c: Control) {
        // In-process, a route is live as soon as it is in the table.
        if let (channel, Some((loop_id, generation))) = self.routes.apply(c) {
            self.outbox
                .confirm(&self.loops, loop_id, channel, generation, false);
        }
        self.metrics
            .broker
            .channels
            .store(self.routes.len() as u64, Ordering::Relaxed);
    }

    fn publish(&mut self, p: Publish) {
        inc(&self.metrics.broker.published);
        let Publish {
            origin,
            channel,
            kind,
            data,
            ack,
            ..
        } = p;
        let d = match &mut self.history {
            Some(h) => {
                // Kept longest: channels someone is on, or an offline session waits for.
                let (routes, sessions) = (&self.routes, &self.sessions);
                h.append(channel, kind, data, Instant::now(), origin.as_ref(), &|c| {
                    routes.contains(c) || sessions.names(c)
                })
            }
            None => Delivery::new(channel, kind, data, None),
        };
        if let Some(ack) = ack {
            let answer = Reply::Published {
                channel: d.channel.clone(),
                reference: ack.reference,
                result: Ok(d.position.clone()),
            };
            self.outbox.reply(&self.loops, ack.to, answer);
        }
        let targets = self.routes.loops(&d.channel);
        self.outbox
            .fan_out(&self.loops, targets, &d, &self.metrics, &mut self.drop_log);
    }

    fn request(&mut self, r: Request) {
        let now = Instant::now();
        match r {
            Request::History {
                channel,
                since,
                record,
                origin,
                query,
                read,
                to,
            } => {
                let newest = query.as_ref().filter(|q| q.since.is_none()).map(|q| q.limit);
                let result = match (&mut self.history, newest) {
                    (Some(h), Some(n)) => Ok(h.newest(&channel, n, now, origin.as_ref())),
                    (Some(h), None) => Ok(h.read(&channel, since, now, origin.as_ref())),
                    (None, _) => Err("history is off (--history-size 0)".to_owned()),
                };
                if let (Some(r), Ok(h)) = (record, &result) {
                    let position = Position {
                        offset: h.top,
                        epoch: h.epoch.clone(),
                    };
                    self.sessions
                        .record(r.id, r.subject, channel.clone(), position, now);
                }
                let reply = Reply::History {
                    channel,
                    result,
                    query,
                    read,
                };
                self.outbox.reply(&self.loops, to, reply);
            }
            Request::LoadSession { id, to } => {
                let found = self.sessions.load(&id, now);
                self.outbox.reply(&self.loops, to, Reply::Session(Ok(found)));
            }
            Request::SaveSession { id, state } => self.sessions.save(id, state, now),
            Request::Barrier { to } => {
                let msg = crate::bridge::ToLoop::Barrier { conn: to.conn };
                self.outbox.send(&self.loops, to.loop_id, msg);
            }
        }
    }
}

impl MemoryBroker {
    /// A `join` or `leave` event of `entry` to `channel`'s subscribers, where it has them.
    fn presence_event(&mut self, kind: &str, channel: &super::Channel, entry: &str) {
        if self.config.join_leave_on(channel) {
            let e = super::presence_event(kind, channel, entry);
            self.outbox
                .event(&self.loops, self.routes.loops(channel), &e, &self.metrics);
        }
    }

    /// Presence, the node's info and the server API, in one process: presence is this
    /// broker's table, events go straight to the loops, commands to every loop.
    fn node_work(&mut self, c: NodeWork) {
        let max = self.config.presence_max;
        match c {
            NodeWork::Join {
                channel,
                client,
                entry,
            } => match self.presence.add(&channel, client, entry.clone(), max) {
                Added::New => self.presence_event("join", &channel, &entry),
                Added::Full => {
                    inc(&self.metrics.broker.presence_overflow);
                    if self.drop_log.allow() {
                        log::warn!(
                            "presence of {channel:?} is full (--presence-max {max}): a subscriber waits to be listed"
                        );
                    }
                }
                Added::Existing => {}
            },
            NodeWork::Leave { channel, client } => {
                if let Some(entry) = self.presence.remove(&channel, &client) {
                    self.presence_event("leave", &channel, &entry);
                    // The room it freed goes to the subscriber that waited longest.
                    if let Some((_, entry)) = self.presence.promote(&channel, max) {
                        self.presence_event("join", &channel, &entry);
                    }
                }
            }
            NodeWork::Presence {
                channel,
                stats,
                reference,
                to,
            } => {
                let result = Ok(self.presence.read(&channel, stats));
                let reply = Reply::Presence {
                    channel,
                    stats,
                    reference,
                    result,
                };
                self.outbox.reply(&self.loops, to, reply);
            }
            NodeWork::LoopChannels { loop_id, channels } => self.loop_channels.set(loop_id, channels),
            NodeWork::Nodes { to } => {
                let channels = self.loop_channels.total().len();
                let me = super::node_info(&self.node, self.started, &self.metrics, channels);
                self.outbox.reply(&self.loops, to, Reply::Nodes(Ok(vec![me])));
            }
            NodeWork::Channels { limit, to } => {
                let counts = self
                    .loop_channels
                    .total()
                    .into_iter()
                    .map(|(c, n)| (c.to_string(), n))
                    .collect();
                let reply = Reply::Channels(Ok(super::top_channels(counts, limit)));
                self.outbox.reply(&self.loops, to, reply);
            }
            NodeWork::Admin { admin, to } => {
                self.outbox.admin(&self.loops, &Arc::new(admin));
                self.outbox.reply(&self.loops, to, Reply::AdminSent(Ok(1)));
            }
        }
        self.metrics
            .broker
            .presence_entries
            .store(self.presence.len() as u64, Ordering::Relaxed);
    }
}
