//! The subscriber thread: one blocking Pub/Sub connection. It SUBSCRIBEs only to channels some
//! local loop has members on (refcounted over loops through [`Routes`]), UNSUBSCRIBEs when the
//! last loop leaves, and routes each message only to the loops that need it. Its read timeout
//! is short (10 ms) so subscription requests from loops reach Redis within milliseconds. After
//! a lost connection it reconnects with jittered backoff and resubscribes every routed channel.
//! While Redis is down, subscriptions are confirmed to loops at once, so local delivery goes on.
//!
//! It also listens, always, on the nodes' control channel (server API commands for every loop)
//! and tells `join`/`leave` events from messages on client channels (`wire::Signal`). Both are
//! checked like anything else read from Redis: a command is carried out only when it is one the
//! server API could have sent, an event passed on only re-encoded from a valid entry.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::{debug, info, warn};
use redis::Value;

use super::resp::{Conn, Frame};
use super::{COMMAND_TIMEOUT, CONNECT_TIMEOUT, Shared};
use crate::bridge::{Channel, Control, Delivery};
use crate::broker::{Outbox, Routes, wire};
use crate::log_throttle::LogThrottle;
use crate::metrics::inc;

/// Read timeout of the Pub/Sub connection between checks for subscription requests.
const READ_TIMEOUT: Duration = Duration::from_millis(10);
/// How often the Pub/Sub connection is probed with PING.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often a subscriber waiting out its backoff checks whether the publisher found Redis
/// back (see `Shared::wake_subscriber`).
const WAKE_POLL: Duration = Duration::from_millis(10);
/// Channels per SUBSCRIBE command when resubscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;

/// Why the subscriber left its connection.
enum Exit {
    /// Every loop is gone: the process is shutting down.
    Stop,
    /// The connection failed; reconnect.
    Lost(io::Error),
}

pub(super) struct Subscriber {
    redis: Shared,
    /// The control channel's name in Redis (with the prefix).
    control_channel: String,
    routes: Routes,
    outbox: Outbox,
    control: Receiver<Control>,
    drop_log: LogThrottle,
    /// "Connection lost", at most once a second (Redis refusing every SUBSCRIBE would log it
    /// on every attempt).
    lost_log: LogThrottle,
    connected_before: bool,
    /// Loops waiting for a subscription to take effect: confirmed once Redis has answered the
    /// SUBSCRIBE, or at once if the connection is lost first (offline, a route is live as soon
    /// as it is in the table; the next connection subscribes it and has its offset-tracking
    /// clients recover what they missed).
    awaiting: Vec<(usize, Channel, u64)>,
}

impl Subscriber {
    pub(super) fn new(redis: Shared, control: Receiver<Control>) -> Self {
        Subscriber {
            control_channel: redis.keys.control(),
            redis,
            routes: Routes::default(),
            outbox: Outbox::default(),
            control,
            drop_log: LogThrottle::default(),
            lost_log: LogThrottle::default(),
            connected_before: false,
            awaiting: Vec::new(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let super::Backend::One(client) = &self.redis.backend else {
                unreachable!("a cluster has its own subscriber (shards.rs)")
            };
            match Conn::open(client.get_connection_info(), CONNECT_TIMEOUT, COMMAND_TIMEOUT) {
                Ok(mut ps) => match self.serve(&mut ps) {
                    Exit::Stop => return,
                    Exit::Lost(e) => {
                        if self.lost_log.allow() {
                            warn!(
                                "redis subscriber connection lost: {e}; local delivery continues, reconnecting, and offset-tracking clients recover what it missed (if Redis closed it for its output buffer, raise client-output-buffer-limit pubsub)"
                            );
                        }
                        for (loop_id, channel, generation) in self.awaiting.drain(..) {
                            self.outbox
                                .confirm(&self.redis.loops, loop_id, channel, generation, true);
                        }
                    }
                },
                Err(e) => debug!("redis subscriber cannot connect: {e}"),
            }
            self.redis
                .metrics
                .broker
                .subscriber_up
                .store(false, Ordering::Relaxed);
            // Wait out the backoff while still serving the loops' subscription requests.
            let until = Instant::now() + self.redis.backoff.next_delay();
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // Redis answers the publisher: it is back, try now.
                if self.redis.wake_subscriber.swap(false, Ordering::Relaxed) {
                    break;
                }
                match self.control.recv_timeout(left.min(WAKE_POLL)) {
                    Ok(c) => {
                        // Offline, a route is live as soon as it is in the table.
                        if let (channel, Some((loop_id, generation))) = self.routes.apply(c) {
                            self.outbox
                                .confirm(&self.redis.loops, loop_id, channel, generation, true);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                self.outbox.retry(&self.redis.loops);
            }
        }
    }

    fn serve(&mut self, ps: &mut Conn) -> Exit {
        // Everything currently routed is subscribed on this new connection.
        let mut upstream: HashSet<Channel> = self.routes.channels().cloned().collect();
        if let Err(e) = self.subscribe_all(ps, &upstream) {
            return Exit::Lost(e);
        }
        let mut last_probe = Instant::now();
        self.redis.metrics.broker.probe_ok(PROBE_EVERY);
        loop {
            match self.take_requests(ps, &mut upstream) {
                Ok(true) => {}
                Ok(false) => return Exit::Stop,
                Err(e) => return Exit::Lost(e),
            }
            self.outbox.retry(&self.redis.loops);
            if last_probe.elapsed() >= PROBE_EVERY {
                // A Pub/Sub connection can stop delivering without an error (a stalled or
                // half-dead Redis): an answered PING is the proof that it still works.
                if let Err(e) = self.command(ps, &redis::cmd("PING"), 1) {
                    return Exit::Lost(e);
                }
                last_probe = Instant::now();
                self.redis.metrics.broker.probe_ok(PROBE_EVERY);
            }
            match ps.frame() {
                Ok(Some(Frame::Message { channel, payload })) => self.route(channel, payload),
                Ok(Some(Frame::Other(v))) => debug!("redis subscriber: unexpected {v:?}"),
                Ok(None) => {}
                Err(e) => return Exit::Lost(e),
            }
        }
    }

    /// A new connection: subscribes `upstream` and the control channel; after a reconnect,
    /// the loops' offset-tracking connections catch up from history.
    fn subscribe_all(&mut self, ps: &mut Conn, upstream: &HashSet<Channel>) -> io::Result<()> {
        let mut names: Vec<String> = upstream.iter().map(|c| self.redis.keys.channel(c)).collect();
        names.push(self.control_channel.clone());
        for chunk in names.chunks(RESUBSCRIBE_CHUNK) {
            self.command(ps, redis::cmd("SUBSCRIBE").arg(chunk), chunk.len())?;
        }
        ps.set_read_timeout(READ_TIMEOUT)?;
        let broker = &self.redis.metrics.broker;
        broker.subscriber_up.store(true, Ordering::Relaxed);
        self.redis.wake_subscriber.store(false, Ordering::Relaxed);
        broker.channels.store(upstream.len() as u64, Ordering::Relaxed);
        self.redis.backoff.reset();
        // Whatever was published while the subscriber was away never reached the loops, and
        // subscriptions confirmed meanwhile are in effect only now (also on a first
        // connection, after an outage at start).
        for channel in self.routes.channels().cloned().collect::<Vec<_>>() {
            for &loop_id in self.routes.loops(&channel) {
                self.outbox.lost(loop_id, channel.clone());
            }
        }
        if self.connected_before {
            inc(&self.redis.metrics.broker.redis_reconnects);
            info!(
                "redis subscriber reconnected; resubscribed {} channels",
                upstream.len()
            );
        }
        self.connected_before = true;
        Ok(())
    }

    /// Takes every pending request, then brings Redis to the resulting state in at most one
    /// SUBSCRIBE and one UNSUBSCRIBE, and confirms the waiting loops. False when the loops are
    /// gone (shutdown).
    fn take_requests(&mut self, ps: &mut Conn, upstream: &mut HashSet<Channel>) -> io::Result<bool> {
        let mut touched = Vec::new();
        loop {
            match self.control.try_recv() {
                Ok(c) => {
                    let (channel, waiter) = self.routes.apply(c);
                    if let Some((loop_id, generation)) = waiter {
                        self.awaiting.push((loop_id, channel.clone(), generation));
                    }
                    touched.push(channel);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(false),
            }
        }
        if touched.is_empty() {
            return Ok(true);
        }
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        for ch in touched {
            let wanted = self.routes.contains(&ch);
            if wanted && upstream.insert(ch.clone()) {
                sub.push(self.redis.keys.channel(&ch));
            } else if !wanted && upstream.remove(&ch) {
                unsub.push(self.redis.keys.channel(&ch));
            }
        }
        if !sub.is_empty() {
            self.command(ps, redis::cmd("SUBSCRIBE").arg(&sub), sub.len())?;
        }
        if !unsub.is_empty() {
            self.command(ps, redis::cmd("UNSUBSCRIBE").arg(&unsub), unsub.len())?;
        }
        self.redis
            .metrics
            .broker
            .channels
            .store(upstream.len() as u64, Ordering::Relaxed);
        // Redis has answered: the subscriptions are in effect.
        for (loop_id, ch, generation) in self.awaiting.drain(..) {
            self.outbox
                .confirm(&self.redis.loops, loop_id, ch, generation, false);
        }
        Ok(true)
    }

    /// Sends a command and waits, at most a command's time for each, for its `answers`
    /// (SUBSCRIBE and UNSUBSCRIBE answer once per channel), routing the messages that arrive
    /// meanwhile. An error answer ends the connection.
    fn command(&mut self, ps: &mut Conn, cmd: &redis::Cmd, answers: usize) -> io::Result<()> {
        ps.send(&cmd.get_packed_command())?;
        ps.set_read_timeout(COMMAND_TIMEOUT)?;
        let mut left = answers;
        while left > 0 {
            match ps.frame()? {
                Some(Frame::Message { channel, payload }) => self.route(channel, payload),
                Some(Frame::Other(Value::ServerError(e))) => {
                    return Err(io::Error::other(format!("redis refused {e:?}")));
                }
                Some(Frame::Other(_)) => left -= 1,
                None => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        ps.set_read_timeout(READ_TIMEOUT)
    }

    fn route(&mut self, channel: &[u8], payload: &[u8]) {
        // Every name this node subscribes is UTF-8.
        let Ok(name) = std::str::from_utf8(channel) else {
            return;
        };
        received(
            &self.redis,
            &self.routes,
            &mut self.outbox,
            &mut self.drop_log,
            &self.control_channel,
            name,
            payload,
        );
    }
}

/// A message Redis delivered on the Pub/Sub channel `name` (plain or sharded): a server API
/// command on the control channel, otherwise a message for the loops whose clients are on its
/// channel (a name outside this deployment's prefix is ignored).
pub(super) fn received(
    redis: &Shared,
    routes: &Routes,
    outbox: &mut Outbox,
    drop_log: &mut LogThrottle,
    control_channel: &str,
    name: &str,
    payload: &[u8],
) {
    if name == control_channel {
        return command(redis, outbox, drop_log, payload);
    }
    if let Some(channel) = redis.keys.channel_of(name) {
        route(redis, routes, outbox, drop_log, &channel, payload);
    }
}

/// Routes a message read from Redis on `channel` to the loops that have members there: a
/// presence event (re-encoded from a valid entry) or a delivery.
fn route(
    redis: &Shared,
    routes: &Routes,
    outbox: &mut Outbox,
    drop_log: &mut LogThrottle,
    channel: &str,
    payload: &[u8],
) {
    let Some((channel, targets)) = routes.route(channel) else {
        return;
    };
    if let Some(signal) = wire::signal(payload) {
        let (kind, entry) = match signal {
            wire::Signal::Join(e) => ("join", e),
            wire::Signal::Leave(e) => ("leave", e),
            wire::Signal::Command(_) => return,
        };
        if let Some(entry) = crate::presence::canonical(entry, redis.entry_size) {
            let e = crate::broker::presence_event(kind, channel, &entry);
            outbox.event(&redis.loops, targets, &e, &redis.metrics);
        }
        return;
    }
    let decoded = wire::decode(payload);
    let d = Delivery::new(channel.clone(), decoded.kind, decoded.data, decoded.position);
    outbox.fan_out(&redis.loops, targets, &d, &redis.metrics, drop_log);
}

/// A server API command from the control channel: to every loop, if it is one.
fn command(redis: &Shared, outbox: &mut Outbox, drop_log: &mut LogThrottle, payload: &[u8]) {
    let admin = match wire::signal(payload) {
        Some(wire::Signal::Command(body)) => wire::decode_admin(body),
        _ => None,
    };
    match admin {
        Some(a) => outbox.admin(&redis.loops, &Arc::new(a)),
        None => {
            if drop_log.allow() {
                warn!("ignoring a payload on the control channel that is not a server API command");
            }
        }
    }
}
