//! The broker: where publishes from every loop meet the subscriptions of every loop. Two
//! implementations behind one interface ([`BrokerHandle`] in, [`LoopHandle`]s out):
//!
//! - `memory`: one thread inside the process. One process is a complete server.
//! - `redis`: a subscriber thread (one blocking Pub/Sub connection) and a publisher thread (one
//!   pipelined connection). Nodes share channels through Redis.
//!
//! Shared here: the routing table (channel → loops that have members), the fan-out of one
//! delivery to those loops, and the retry of subscription confirmations to loops whose inbox
//! was momentarily full (a confirmation is never dropped, or the loop would wait forever).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;

use crate::bridge::{
    BrokerHandle, Channel, ChannelCounts, Control, Delivery, Event, LoopHandle, NodeInfo, Reply, ReplyTo,
    ToLoop,
};
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, inc};

pub mod memory;
pub mod redis;
pub mod memory_store;
pub mod presence;
pub mod wire;

/// A running broker: the handle loops publish through, and its threads.
pub struct Broker {
    /// Given to every loop.
    pub handle: BrokerHandle,
    /// Threads to join at shutdown; they exit once every `BrokerHandle` is dropped.
    pub threads: Vec<JoinHandle<()>>,
}

/// Capacity of the control queue (subscribe/unsubscribe requests from loops). Requests are
/// sent only on a channel's first join and last leave per loop, so this is rarely above a few.
pub const CONTROL_QUEUE: usize = 65_536;

/// Starts the broker the configuration asks for. Fails when Redis is configured and
/// unreachable at start.
pub fn start(
    config: &crate::config::Config,
    node: Arc<str>,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) -> Result<Broker, String> {
    let (handle, inbox) =
        crate::bridge::broker_queues(config.publish_queue, config.publish_queue_bytes, CONTROL_QUEUE);
    let threads = match (&config.redis, &config.redis_cluster) {
        (Some(url), _) => redis::spawn(config, node, redis::Target::One(url), inbox, loops, metrics)?,
        (None, Some(seeds)) => {
            redis::spawn(config, node, redis::Target::Cluster(seeds), inbox, loops, metrics)?
        }
        (None, None) => vec![memory::spawn(config, node, inbox, loops, metrics)],
    };
    Ok(Broker { handle, threads })
}

/// A `join` or `leave` event (`kind`) of `channel` for `entry` (an entry as
/// `presence::encode` writes it), framed once for every loop.
pub fn presence_event(kind: &str, channel: &Channel, entry: &str) -> Arc<Event> {
    Arc::new(Event {
        channel: channel.clone(),
        frame: crate::frame::text(&crate::envelope::presence_event(kind, channel, entry)),
    })
}

/// The channels with the most subscribers first (then by name), at most `limit` of them.
pub fn top_channels(counts: HashMap<String, u64>, limit: usize) -> ChannelCounts {
    let total = counts.len();
    let mut channels: Vec<(String, u64)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
    channels.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    channels.truncate(limit);
    ChannelCounts { channels, total }
}

/// Each loop's channel member counts, as the loops last reported them (server API on).
#[derive(Debug, Default)]
pub struct LoopChannels {
    per_loop: HashMap<usize, Vec<(Channel, u32)>>,
}

impl LoopChannels {
    /// Replaces loop `loop_id`'s counts.
    pub fn set(&mut self, loop_id: usize, channels: Vec<(Channel, u32)>) {
        self.per_loop.insert(loop_id, channels);
    }

    /// The node's counts: every loop's added up.
    pub fn total(&self) -> HashMap<Channel, u64> {
        let mut out: HashMap<Channel, u64> = HashMap::new();
        for (c, n) in self.per_loop.values().flatten() {
            *out.entry(c.clone()).or_default() += u64::from(*n);
        }
        out
    }
}

/// What `info` says about this node.
pub fn node_info(node: &str, started: u64, metrics: &Metrics, channels: usize) -> NodeInfo {
    NodeInfo {
        id: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        connections: metrics.sum(|l| &l.websockets),
        channels: channels as u64,
        started,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which loops have members on which channel.
#[derive(Debug, Default)]
pub struct Routes {
    map: HashMap<Channel, Vec<usize>>,
}

impl Routes {
    /// Adds `loop_id` to `channel`. True when the channel is new (subscribe upstream).
    pub fn add(&mut self, channel: &Channel, loop_id: usize) -> bool {
        let loops = self.map.entry(channel.clone()).or_default();
        if !loops.contains(&loop_id) {
            loops.push(loop_id);
        }
        loops.len() == 1
    }

    /// Removes `loop_id` from `channel`. True when no loop is left (unsubscribe upstream).
    pub fn remove(&mut self, channel: &str, loop_id: usize) -> bool {
        let Some(loops) = self.map.get_mut(channel) else {
            return false;
        };
        loops.retain(|&l| l != loop_id);
        if loops.is_empty() {
            self.map.remove(channel);
            return true;
        }
        false
    }

    /// Applies a loop's request. Returns its channel and, for a subscription, the loop and
    /// generation waiting for the confirmation.
    pub fn apply(&mut self, c: Control) -> (Channel, Option<(usize, u64)>) {
        match c {
            Control::Subscribe {
                channel,
                loop_id,
                generation,
            } => {
                self.add(&channel, loop_id);
                (channel, Some((loop_id, generation)))
            }
            Control::Unsubscribe { channel, loop_id } => {
                self.remove(&channel, loop_id);
                (channel, None)
            }
        }
    }

    /// The loops to deliver `channel`'s messages to.
    pub fn loops(&self, channel: &str) -> &[usize] {
        self.map.get(channel).map_or(&[], Vec::as_slice)
    }

    /// The loops on `channel` with the channel's shared name, if any loop is on it.
    pub fn route(&self, channel: &str) -> Option<(&Channel, &[usize])> {
        self.map
            .get_key_value(channel)
            .map(|(c, loops)| (c, loops.as_slice()))
    }

    /// Whether any loop is on `channel`.
    pub fn contains(&self, channel: &str) -> bool {
        self.map.contains_key(channel)
    }

    /// Every routed channel.
    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.map.keys()
    }

    /// Number of routed channels.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no channel is routed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Messages a loop must not miss (subscription confirmations and replies), with the ones that
/// found the loop's inbox full kept here and retried: a dropped confirmation or reply would
/// leave a connection waiting forever. Deliveries may be dropped when a loop falls behind;
/// then the loop is told, also reliably, which channels lost some, so its connections that
/// track offsets recover them from history even when no later message reveals the gap.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Vec<(usize, ToLoop)>,
    lost: HashSet<(usize, Channel)>,
}

impl Outbox {
    /// Sends `msg` to loop `loop_id`, keeping it for [`Outbox::retry`] if the inbox is full.
    pub fn send(&mut self, loops: &[LoopHandle], loop_id: usize, msg: ToLoop) {
        if let Err(msg) = loops[loop_id].try_send(msg) {
            self.pending.push((loop_id, msg));
        }
    }

    /// Sends one delivery to each of `targets`. A full inbox drops the delivery for that loop
    /// only: counted, logged at most once per second, and reported to the loop later.
    pub fn fan_out(
        &mut self,
        loops: &[LoopHandle],
        targets: &[usize],
        d: &Arc<Delivery>,
        metrics: &Metrics,
        log: &mut LogThrottle,
    ) {
        for &id in targets {
            if loops[id].try_send(ToLoop::Deliver(d.clone())).is_err() {
                inc(&metrics.broker.deliveries_dropped);
                if log.allow() {
                    warn!(
                        "loop {id} inbox full: dropping deliveries (raise --loop-queue or --loop-queue-bytes, or the loop is overloaded)"
                    );
                }
                self.lost.insert((id, d.channel.clone()));
            }
        }
    }

    /// Tells loop `loop_id` (reliably, once) that deliveries on `channel` may have been missed.
    pub fn lost(&mut self, loop_id: usize, channel: Channel) {
        self.lost.insert((loop_id, channel));
    }

    /// Confirms to `loop_id` that its subscription `generation` to `channel` is live;
    /// `offline` while the Redis subscriber connection is down (see [`ToLoop::Live`]).
    pub fn confirm(
        &mut self,
        loops: &[LoopHandle],
        loop_id: usize,
        channel: Channel,
        generation: u64,
        offline: bool,
    ) {
        let live = ToLoop::Live {
            channel,
            generation,
            offline,
        };
        self.send(loops, loop_id, live);
    }

    /// Sends an event to each of `targets`. Like a delivery, it is dropped for a loop whose
    /// inbox is full (counted): events are at most once.
    pub fn event(&mut self, loops: &[LoopHandle], targets: &[usize], e: &Arc<Event>, metrics: &Metrics) {
        for &id in targets {
            if loops[id].try_send(ToLoop::Event(e.clone())).is_err() {
                inc(&metrics.broker.deliveries_dropped);
            }
        }
    }

    /// Sends a server API command to every loop, reliably.
    pub fn admin(&mut self, loops: &[LoopHandle], a: &Arc<crate::bridge::Admin>) {
        for id in 0..loops.len() {
            self.send(loops, id, ToLoop::Admin(a.clone()));
        }
    }

    /// Sends a reply to the connection that asked.
    pub fn reply(&mut self, loops: &[LoopHandle], to: ReplyTo, reply: Reply) {
        self.send(loops, to.loop_id, ToLoop::Reply { conn: to.conn, reply });
    }

    /// Retries what did not fit earlier, in order, then the loss reports.
    pub fn retry(&mut self, loops: &[LoopHandle]) {
        for (loop_id, msg) in std::mem::take(&mut self.pending) {
            self.send(loops, loop_id, msg);
        }
        self.lost.retain(|(loop_id, channel)| {
            let msg = ToLoop::Lost {
                channel: channel.clone(),
            };
            loops[*loop_id].try_send(msg).is_err()
        });
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.lost.is_empty()
    }

    /// How long a broker thread may block on its queue: briefly while something waits here
    /// to be retried, otherwise until work arrives.
    pub fn idle_wait(&self) -> std::time::Duration {
        if self.is_empty() {
            std::time::Duration::from_secs(3600)
        } else {
            std::time::Duration::from_millis(5)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_refcount_over_loops() {
        let mut r = Routes::default();
        let a: Channel = Arc::from("a");
        assert!(r.add(&a, 0));
        assert!(!r.add(&a, 1));
        assert!(!r.add(&a, 1), "duplicate add is idempotent");
        assert_eq!(r.loops("a"), &[0, 1]);
        assert!(!r.remove("a", 0));
        assert!(r.remove("a", 1));
        assert!(!r.contains("a"));
        assert!(!r.remove("a", 1));
        assert!(r.loops("a").is_empty());
    }
}
