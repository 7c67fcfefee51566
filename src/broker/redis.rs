//! The Redis backplane: how nodes share channels.
//!
//! - The **subscriber** thread holds one blocking Pub/Sub connection. It SUBSCRIBEs only to
//!   channels some local loop has members on (refcounted over loops through [`Routes`]),
//!   UNSUBSCRIBEs when the last loop leaves, and routes each message only to the loops that
//!   need it. Its read timeout is short (10 ms) so subscription requests from loops reach Redis
//!   within milliseconds. After a lost connection it reconnects with jittered backoff and
//!   resubscribes every routed channel. While Redis is down, subscriptions are confirmed to
//!   loops at once, so local delivery goes on.
//! - The **publisher** thread drains the loops' bounded publish queue in batches and pipelines
//!   them to Redis (one round trip per batch). What cannot reach Redis is delivered to this
//!   node's loops only, counted and logged: nothing queues up without bound while Redis is away.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::{debug, info, warn};

use super::{Confirmations, RateLimit, Routes, fan_out, wire};
use crate::backoff::Backoff;
use crate::bridge::{BrokerInbox, Channel, Control, Delivery, LoopHandle, Publish};
use crate::config::Config;
use crate::metrics::{Metrics, add, inc};

/// Read timeout of the Pub/Sub connection between checks for subscription requests.
const READ_TIMEOUT: Duration = Duration::from_millis(10);
/// Time allowed for Redis to answer a command (SUBSCRIBE, a publish pipeline, PING at start).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Channels per SUBSCRIBE command when resubscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;

/// Checks that Redis answers, then starts the subscriber and publisher threads.
pub fn spawn(
    config: &Config,
    url: &str,
    inbox: BrokerInbox,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL {url:?}: {e}"))?;
    let mut con = connect(&client).map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
    redis::cmd("PING")
        .query::<String>(&mut con)
        .map_err(|e| format!("Redis at {url} does not answer PING: {e}"))?;
    let backoff = Backoff::new(config.redis_backoff_min, config.redis_backoff_max);

    let subscriber = Subscriber {
        client: client.clone(),
        prefix: config.redis_prefix.clone(),
        loops: loops.clone(),
        metrics: metrics.clone(),
        routes: Routes::default(),
        confirmations: Confirmations::default(),
        control: inbox.control,
        backoff: backoff.clone(),
        drop_log: RateLimit::default(),
        connected_before: false,
    };
    let publisher = Publisher {
        client,
        prefix: config.redis_prefix.clone(),
        loops,
        metrics,
        queue: inbox.publish,
        batch_max: config.publish_batch,
        con: Some(con),
        backoff,
        next_attempt: Instant::now(),
        outage: None,
        drop_log: RateLimit::default(),
    };
    let sub = std::thread::Builder::new()
        .name("wsrelay-redis-sub".into())
        .spawn(move || subscriber.run())
        .map_err(|e| format!("cannot start subscriber thread: {e}"))?;
    let publ = std::thread::Builder::new()
        .name("wsrelay-redis-pub".into())
        .spawn(move || publisher.run())
        .map_err(|e| format!("cannot start publisher thread: {e}"))?;
    Ok(vec![sub, publ])
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    con.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(con)
}

/// Why the subscriber left its connection.
enum Exit {
    /// Every loop is gone: the process is shutting down.
    Stop,
    /// The connection failed; reconnect.
    Lost(redis::RedisError),
}

struct Subscriber {
    client: redis::Client,
    prefix: String,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    routes: Routes,
    confirmations: Confirmations,
    control: Receiver<Control>,
    backoff: Backoff,
    drop_log: RateLimit,
    connected_before: bool,
}

impl Subscriber {
    fn run(mut self) {
        loop {
            match connect(&self.client) {
                Ok(mut con) => match self.serve(&mut con) {
                    Exit::Stop => return,
                    Exit::Lost(e) => {
                        warn!("redis subscriber connection lost: {e}; local delivery continues, reconnecting")
                    }
                },
                Err(e) => debug!("redis subscriber cannot connect: {e}"),
            }
            self.metrics.broker.subscriber_up.store(false, Ordering::Relaxed);
            // Wait out the backoff while still serving the loops' subscription requests.
            let until = Instant::now() + self.backoff.next_delay();
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.control.recv_timeout(left) {
                    Ok(c) => {
                        // Offline, a route is live as soon as it is in the table.
                        if let (channel, Some((loop_id, generation))) = self.apply(c) {
                            self.confirmations
                                .confirm(&self.loops, loop_id, channel, generation);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                self.confirmations.retry(&self.loops);
            }
        }
    }

    /// Applies one request to the routing table. Returns its channel and, for a subscription,
    /// the loop and generation waiting for the confirmation.
    fn apply(&mut self, c: Control) -> (Channel, Option<(usize, u64)>) {
        match c {
            Control::Subscribe {
                channel,
                loop_id,
                generation,
            } => {
                self.routes.add(&channel, loop_id);
                (channel, Some((loop_id, generation)))
            }
            Control::Unsubscribe { channel, loop_id } => {
                self.routes.remove(&channel, loop_id);
                (channel, None)
            }
        }
    }

    fn redis_name(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }

    fn serve(&mut self, con: &mut redis::Connection) -> Exit {
        let mut ps = con.as_pubsub();
        // Everything currently routed is subscribed on this new connection.
        let mut upstream: HashSet<Channel> = self.routes.channels().cloned().collect();
        let names: Vec<String> = upstream.iter().map(|c| self.redis_name(c)).collect();
        for chunk in names.chunks(RESUBSCRIBE_CHUNK) {
            if let Err(e) = ps.subscribe(chunk) {
                return Exit::Lost(e);
            }
        }
        if let Err(e) = ps.set_read_timeout(Some(READ_TIMEOUT)) {
            return Exit::Lost(e);
        }
        self.metrics.broker.subscriber_up.store(true, Ordering::Relaxed);
        self.backoff.reset();
        if self.connected_before {
            inc(&self.metrics.broker.redis_reconnects);
            info!(
                "redis subscriber reconnected; resubscribed {} channels",
                upstream.len()
            );
        }
        self.connected_before = true;

        let mut touched = Vec::new();
        let mut awaiting = Vec::new();
        loop {
            // Take every pending request, then bring Redis to the resulting state in at most
            // one SUBSCRIBE and one UNSUBSCRIBE.
            loop {
                match self.control.try_recv() {
                    Ok(c) => {
                        let (channel, waiter) = self.apply(c);
                        if let Some((loop_id, generation)) = waiter {
                            awaiting.push((loop_id, channel.clone(), generation));
                        }
                        touched.push(channel);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Exit::Stop,
                }
            }
            if !touched.is_empty() {
                let (mut sub, mut unsub) = (Vec::new(), Vec::new());
                for ch in touched.drain(..) {
                    let wanted = self.routes.contains(&ch);
                    if wanted && upstream.insert(ch.clone()) {
                        sub.push(self.redis_name(&ch));
                    } else if !wanted && upstream.remove(&ch) {
                        unsub.push(self.redis_name(&ch));
                    }
                }
                if let Err(e) = update_subscriptions(&mut ps, &sub, &unsub) {
                    return Exit::Lost(e);
                }
                self.metrics
                    .broker
                    .channels
                    .store(upstream.len() as u64, Ordering::Relaxed);
                // Redis has answered: the subscriptions are in effect.
                for (loop_id, ch, generation) in awaiting.drain(..) {
                    self.confirmations.confirm(&self.loops, loop_id, ch, generation);
                }
            }
            self.confirmations.retry(&self.loops);

            match ps.get_message() {
                Ok(msg) => self.route(&msg),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Exit::Lost(e),
            }
        }
    }

    fn route(&mut self, msg: &redis::Msg) {
        let Some(channel) = msg.get_channel_name().strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let targets = self.routes.loops(channel);
        if targets.is_empty() {
            return;
        }
        let decoded = wire::decode(msg.get_payload_bytes());
        let channel: Channel = Arc::from(channel);
        let d = Delivery::new(channel, decoded.kind, decoded.data, decoded.position);
        fan_out(&self.loops, targets, &d, &self.metrics, &mut self.drop_log);
    }
}

/// Sends SUBSCRIBE/UNSUBSCRIBE and waits for Redis's reply, with a command-length timeout.
fn update_subscriptions(
    ps: &mut redis::PubSub<'_>,
    sub: &[String],
    unsub: &[String],
) -> redis::RedisResult<()> {
    if sub.is_empty() && unsub.is_empty() {
        return Ok(());
    }
    ps.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    if !sub.is_empty() {
        ps.subscribe(sub)?;
    }
    if !unsub.is_empty() {
        ps.unsubscribe(unsub)?;
    }
    ps.set_read_timeout(Some(READ_TIMEOUT))
}

struct Publisher {
    client: redis::Client,
    prefix: String,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    queue: Receiver<Publish>,
    batch_max: usize,
    con: Option<redis::Connection>,
    backoff: Backoff,
    next_attempt: Instant,
    /// Start of the current outage and publishes delivered locally since.
    outage: Option<(Instant, u64)>,
    drop_log: RateLimit,
}

impl Publisher {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch_max);
        // Block for the first publish, then take whatever else is already queued.
        while let Ok(first) = self.queue.recv() {
            batch.push(first);
            while batch.len() < self.batch_max {
                match self.queue.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let mut pipe = redis::pipe();
            for p in &batch {
                pipe.cmd("PUBLISH")
                    .arg(format!("{}{}", self.prefix, p.channel))
                    .arg(wire::encode(p.kind, &p.data, None))
                    .ignore();
            }
            if self.send(&pipe) {
                add(&self.metrics.broker.published, batch.len() as u64);
            } else {
                self.deliver_locally(&mut batch);
            }
            batch.clear();
        }
    }

    /// Sends one pipeline. A connection that fails gets one immediate retry on a fresh
    /// connection: after a Redis restart the first batch fails on the dead socket. This makes
    /// delivery at-least-once across a restart (the old server may have applied part of it).
    fn send(&mut self, pipe: &redis::Pipeline) -> bool {
        if let Some(con) = &mut self.con {
            match pipe.query::<()>(con) {
                Ok(()) => return true,
                Err(e) => {
                    debug!("redis publish failed: {e}; retrying on a new connection");
                    self.con = None;
                    self.next_attempt = Instant::now();
                }
            }
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let result = connect(&self.client).and_then(|mut con| pipe.query::<()>(&mut con).map(|()| con));
        match result {
            Ok(con) => {
                self.con = Some(con);
                self.backoff.reset();
                if let Some((since, n)) = self.outage.take() {
                    info!(
                        "redis publisher reconnected after {:.1}s; {n} publishes in that time reached this node's clients only",
                        since.elapsed().as_secs_f64()
                    );
                }
                true
            }
            Err(e) => {
                self.next_attempt = Instant::now() + self.backoff.next_delay();
                if self.outage.is_none() {
                    warn!(
                        "redis unreachable for publishing: {e}; publishes reach this node's clients only until it is back"
                    );
                    self.outage = Some((Instant::now(), 0));
                }
                false
            }
        }
    }

    /// Delivers publishes that could not reach Redis to this node's loops (each loop ignores
    /// channels it has no members on).
    fn deliver_locally(&mut self, batch: &mut Vec<Publish>) {
        let all: Vec<usize> = (0..self.loops.len()).collect();
        let n = batch.len() as u64;
        for p in batch.drain(..) {
            let d = Delivery::new(p.channel, p.kind, p.data, None);
            fan_out(&self.loops, &all, &d, &self.metrics, &mut self.drop_log);
        }
        add(&self.metrics.broker.publish_failed, n);
        if let Some((_, count)) = &mut self.outage {
            *count += n;
        }
    }
}
