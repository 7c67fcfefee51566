//! The publisher thread: drains the loops' bounded publish queue in batches and pipelines each
//! batch to Redis in one round trip. With history on, every publish is the atomic
//! `publish.lua` script (offset, stream append, expiry, PUBLISH); otherwise a plain PUBLISH of
//! the wire-encoded payload. Acknowledgements with offsets go back to the publishing
//! connection. What cannot reach Redis is delivered to this node's loops only, counted and
//! logged: nothing queues up without bound while Redis is away.

use std::sync::LazyLock;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use redis::Value;

use super::{Shared, connect, ttl_secs};
use crate::bridge::{Delivery, Position, Publish, Reply};
use crate::broker::memory_store::new_epoch;
use crate::broker::{Outbox, wire};
use crate::config::Config;
use crate::log_throttle::LogThrottle as RateLimit;
use crate::metrics::add;

static PUBLISH_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("publish.lua")));

pub(super) struct Publisher {
    redis: Shared,
    queue: Receiver<Publish>,
    batch_max: usize,
    /// `(maxlen, ttl seconds)` with history on.
    history: Option<(usize, u64)>,
    con: Option<redis::Connection>,
    next_attempt: Instant,
    /// Start of the current outage and publishes delivered locally since.
    outage: Option<(Instant, u64)>,
    outbox: Outbox,
    drop_log: RateLimit,
    redis_stalled_log: RateLimit,
}

/// What became of a pipelined batch.
enum Outcome {
    /// Redis ran it: one result per publish.
    Stored(Vec<Value>),
    /// It never reached Redis (no connection).
    Unsent,
    /// It was sent but not answered: Redis may still run it.
    Unknown(String),
}

impl Publisher {
    pub(super) fn new(
        redis: Shared,
        config: &Config,
        queue: Receiver<Publish>,
        con: redis::Connection,
    ) -> Self {
        Publisher {
            redis,
            queue,
            batch_max: config.publish_batch,
            history: (config.history_size > 0).then(|| (config.history_size, ttl_secs(config.history_ttl))),
            con: Some(con),
            next_attempt: Instant::now(),
            outage: None,
            outbox: Outbox::default(),
            drop_log: RateLimit::default(),
            redis_stalled_log: RateLimit::default(),
        }
    }

    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch_max);
        loop {
            // Block for the first publish (waking now and then while replies wait for room),
            // then take whatever else is already queued.
            match self.queue.recv_timeout(self.outbox.idle_wait()) {
                Ok(p) => batch.push(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < self.batch_max {
                match self.queue.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let pipe = self.pipeline(&batch);
                match self.send(&pipe) {
                    Outcome::Stored(results) => self.acknowledge(&mut batch, results),
                    Outcome::Unsent => self.deliver_locally(&mut batch),
                    Outcome::Unknown(e) => self.fail(
                        &mut batch,
                        &format!("redis did not answer ({e}); the message may or may not be delivered"),
                    ),
                }
            }
            self.outbox.retry(&self.redis.loops);
        }
    }

    fn pipeline(&self, batch: &[Publish]) -> redis::Pipeline {
        let keys = &self.redis.keys;
        let mut pipe = redis::pipe();
        for p in batch {
            match self.history {
                Some((maxlen, ttl)) => {
                    pipe.cmd("EVALSHA")
                        .arg(PUBLISH_SCRIPT.get_hash())
                        .arg(2)
                        .arg(keys.meta(&p.channel))
                        .arg(keys.stream(&p.channel))
                        .arg(maxlen)
                        .arg(ttl)
                        .arg(keys.channel(&p.channel))
                        .arg(&[wire::kind_byte(p.kind)][..])
                        .arg(&p.data[..])
                        .arg(&*new_epoch());
                }
                None => {
                    pipe.cmd("PUBLISH")
                        .arg(keys.channel(&p.channel))
                        .arg(wire::encode(p.kind, &p.data, None));
                }
            }
        }
        pipe
    }

    /// Sends one pipeline. A connection that fails gets one immediate retry on a fresh
    /// connection: after a Redis restart the first batch fails on the dead socket. So delivery
    /// is at-least-once across a restart (the old server may have applied part of the batch).
    fn send(&mut self, pipe: &redis::Pipeline) -> Outcome {
        if let Some(con) = &mut self.con {
            match query(con, pipe) {
                Ok(v) => return Outcome::Stored(v),
                Err(e) => {
                    debug!("redis publish failed: {e}; retrying on a new connection");
                    self.con = None;
                    self.next_attempt = Instant::now();
                }
            }
        }
        if Instant::now() < self.next_attempt {
            return Outcome::Unsent;
        }
        let mut con = match connect(&self.redis.client) {
            Ok(con) => con,
            Err(e) => {
                self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                if self.outage.is_none() {
                    warn!(
                        "redis unreachable for publishing: {e}; publishes reach this node's clients only until it is back"
                    );
                    self.outage = Some((Instant::now(), 0));
                }
                return Outcome::Unsent;
            }
        };
        match query(&mut con, pipe) {
            Ok(values) => {
                self.con = Some(con);
                self.redis.backoff.reset();
                if let Some((since, n)) = self.outage.take() {
                    info!(
                        "redis publisher reconnected after {:.1}s; {n} publishes in that time reached this node's clients only",
                        since.elapsed().as_secs_f64()
                    );
                }
                Outcome::Stored(values)
            }
            Err(e) => {
                // Connected but no answer (a stalled Redis): the commands may still run later,
                // so delivering them locally too could duplicate them.
                self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                if self.redis_stalled_log.allow() {
                    warn!(
                        "redis did not answer a publish batch: {e}; outcome unknown, not delivered locally"
                    );
                }
                Outcome::Unknown(e.to_string())
            }
        }
    }

    /// Counts the batch as published and answers the publishes that asked for it.
    fn acknowledge(&mut self, batch: &mut Vec<Publish>, results: Vec<Value>) {
        add(&self.redis.metrics.broker.published, batch.len() as u64);
        for (p, v) in batch.drain(..).zip(results) {
            let Some(ack) = p.ack else { continue };
            let result = match self.history {
                Some(_) => position(&v)
                    .ok_or_else(|| "unexpected reply from the publish script".to_owned())
                    .map(Some),
                None => Ok(None),
            };
            let reply = Reply::Published {
                channel: p.channel,
                reference: ack.reference,
                result,
            };
            self.outbox.reply(&self.redis.loops, ack.to, reply);
        }
    }

    /// Answers a batch whose fate is unknown, and counts it.
    fn fail(&mut self, batch: &mut Vec<Publish>, why: &str) {
        add(&self.redis.metrics.broker.publish_failed, batch.len() as u64);
        for p in batch.drain(..) {
            if let Some(ack) = p.ack {
                let reply = Reply::Published {
                    channel: p.channel,
                    reference: ack.reference,
                    result: Err(why.to_owned()),
                };
                self.outbox.reply(&self.redis.loops, ack.to, reply);
            }
        }
    }

    /// Delivers publishes that could not reach Redis to this node's loops (each loop ignores
    /// channels it has no members on).
    fn deliver_locally(&mut self, batch: &mut Vec<Publish>) {
        let all: Vec<usize> = (0..self.redis.loops.len()).collect();
        let n = batch.len() as u64;
        for p in batch.drain(..) {
            if let Some(ack) = p.ack {
                let reply = Reply::Published {
                    channel: p.channel.clone(),
                    reference: ack.reference,
                    result: Err("redis unreachable: delivered to this node's clients only".into()),
                };
                self.outbox.reply(&self.redis.loops, ack.to, reply);
            }
            let d = Delivery::new(p.channel, p.kind, p.data, None);
            self.outbox.fan_out(
                &self.redis.loops,
                &all,
                &d,
                &self.redis.metrics,
                &mut self.drop_log,
            );
        }
        add(&self.redis.metrics.broker.publish_failed, n);
        if let Some((_, count)) = &mut self.outage {
            *count += n;
        }
    }
}

/// Runs a pipeline; when Redis has lost the publish script (restart, SCRIPT FLUSH), loads it
/// and runs the pipeline again. Nothing ran the first time: NOSCRIPT fails every EVALSHA alike.
fn query(con: &mut redis::Connection, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
    match pipe.query::<Vec<Value>>(con) {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            info!("loading the publish script into redis");
            PUBLISH_SCRIPT.prepare_invoke().load(con)?;
            pipe.query(con)
        }
        other => other,
    }
}

/// `{offset, epoch}` from the publish script.
fn position(v: &Value) -> Option<Position> {
    let Value::Array(items) = v else { return None };
    let offset = match items.first()? {
        Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let epoch = match items.get(1)? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::SimpleString(s) => s.as_str(),
        _ => return None,
    };
    Some(Position {
        offset,
        epoch: epoch.into(),
    })
}
