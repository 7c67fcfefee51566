//! The publisher thread: drains the loops' bounded publish queue in batches and pipelines each
//! batch to Redis in one round trip. With history on, every publish is the atomic
//! `publish.lua` script (offset, stream append, expiry, PUBLISH); otherwise a plain PUBLISH of
//! the wire-encoded payload. Acknowledgements with offsets go back to the publishing
//! connection. What cannot reach Redis is delivered to this node's loops only, counted and
//! logged: nothing queues up without bound while Redis is away. What Redis answers with an
//! error (out of memory, read-only) was not applied: it is reported to its publisher as
//! refused, delivered nowhere, and the connection is kept.

use std::sync::LazyLock;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use redis::Value;

use super::{Shared, connect, ttl_secs};
use crate::bridge::{Delivery, Position, Publish, PublishError, Reply};
use crate::broker::{Outbox, wire};
use crate::config::Config;
use crate::log_throttle::LogThrottle as RateLimit;
use crate::metrics::{add, inc};
use crate::position::new_epoch;

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
    refused_log: RateLimit,
}

/// What became of a pipelined batch.
enum Outcome {
    /// Redis answered: one result per publish, each a stored message or an error reply
    /// (`Value::ServerError`: that command was not applied).
    Answered(Vec<Value>),
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
            refused_log: RateLimit::default(),
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
                match self.send(&batch) {
                    Outcome::Answered(results) => self.acknowledge(&mut batch, results),
                    Outcome::Unsent => self.deliver_locally(&mut batch),
                    Outcome::Unknown(e) => self.fail(&mut batch, &e),
                }
            }
            self.outbox.retry(&self.redis.loops);
        }
    }

    /// The batch as one pipeline. Errors come back per command (`ignore_errors`), so one
    /// refused publish does not hide the outcome of the others.
    fn pipeline<'a>(&self, batch: impl Iterator<Item = &'a Publish>) -> redis::Pipeline {
        let keys = &self.redis.keys;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
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

    /// Sends the batch as one pipeline. A connection that fails gets one immediate retry on a
    /// fresh connection: after a Redis restart the first batch fails on the dead socket. So
    /// delivery is at-least-once across a restart (the old server may have applied part of the
    /// batch). Error replies are answers, not failures: the connection is kept.
    fn send(&mut self, batch: &[Publish]) -> Outcome {
        let pipe = self.pipeline(batch.iter());
        if let Some(mut con) = self.con.take() {
            match self.query(&mut con, &pipe, batch) {
                Ok(v) => {
                    self.con = Some(con);
                    return Outcome::Answered(v);
                }
                Err(e) => {
                    debug!("redis publish failed: {e}; retrying on a new connection");
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
        match self.query(&mut con, &pipe, batch) {
            Ok(values) => {
                self.con = Some(con);
                self.redis.backoff.reset();
                if let Some((since, n)) = self.outage.take() {
                    info!(
                        "redis publisher reconnected after {:.1}s; {n} publishes in that time reached this node's clients only",
                        since.elapsed().as_secs_f64()
                    );
                }
                Outcome::Answered(values)
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

    /// Runs a pipeline. When Redis has lost the publish script (restart, SCRIPT FLUSH), the
    /// commands that failed with NOSCRIPT ran nothing: the script is loaded and exactly those
    /// run again, in order (they are a suffix of the batch: once the script is gone, every
    /// later EVALSHA fails alike).
    fn query(
        &self,
        con: &mut redis::Connection,
        pipe: &redis::Pipeline,
        batch: &[Publish],
    ) -> redis::RedisResult<Vec<Value>> {
        let mut values: Vec<Value> = pipe.query(con)?;
        let missing: Vec<usize> = (0..values.len()).filter(|&i| is_noscript(&values[i])).collect();
        if missing.is_empty() {
            return Ok(values);
        }
        info!("loading the publish script into redis");
        PUBLISH_SCRIPT.prepare_invoke().load(con)?;
        let again: Vec<Value> = self.pipeline(missing.iter().map(|&i| &batch[i])).query(con)?;
        for (i, v) in missing.into_iter().zip(again) {
            values[i] = v;
        }
        Ok(values)
    }

    /// Answers each publish of an answered batch: stored (with its position), or refused by
    /// Redis (counted, logged at most once a second, and delivered nowhere).
    fn acknowledge(&mut self, batch: &mut Vec<Publish>, results: Vec<Value>) {
        let metrics = &self.redis.metrics.broker;
        // Before any answer goes out: whoever hears "published" finds /healthz agreeing.
        let stored = results
            .iter()
            .filter(|v| !matches!(v, Value::ServerError(_)))
            .count();
        if stored > 0 {
            metrics.writes_accepted();
        }
        for (p, v) in batch.drain(..).zip(results) {
            let result = match (&v, self.history) {
                (Value::ServerError(e), _) => {
                    let reason = format!(
                        "{}{}",
                        e.code(),
                        e.details().map(|d| format!(" {d}")).unwrap_or_default()
                    );
                    inc(&metrics.publish_refused);
                    if refuses_every_write(e.code()) {
                        metrics.refusing_writes(&reason);
                    }
                    if self.refused_log.allow() {
                        warn!("redis refused a publish on {:?}: {reason}", p.channel);
                    }
                    Err(PublishError::Refused(reason))
                }
                (_, Some(_)) => position(&v)
                    .ok_or_else(|| PublishError::Refused("unexpected reply from the publish script".into()))
                    .map(Some),
                (_, None) => Ok(None),
            };
            let Some(ack) = p.ack else { continue };
            let reply = Reply::Published {
                channel: p.channel,
                reference: ack.reference,
                result,
            };
            self.outbox.reply(&self.redis.loops, ack.to, reply);
        }
        add(&metrics.published, stored as u64);
    }

    /// Answers a batch whose fate is unknown, and counts it.
    fn fail(&mut self, batch: &mut Vec<Publish>, why: &str) {
        add(&self.redis.metrics.broker.publish_failed, batch.len() as u64);
        for p in batch.drain(..) {
            if let Some(ack) = p.ack {
                let reply = Reply::Published {
                    channel: p.channel,
                    reference: ack.reference,
                    result: Err(PublishError::Unknown(why.to_owned())),
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
                    result: Err(PublishError::Unreachable),
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

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// Error codes by which Redis refuses every write, not just this one: out of memory, a
/// read-only replica, failed persistence (`stop-writes-on-bgsave-error`). `/healthz` reports
/// them; a refusal about one key (WRONGTYPE) concerns only its publish.
fn refuses_every_write(code: &str) -> bool {
    matches!(code, "OOM" | "READONLY" | "MISCONF" | "NOREPLICAS")
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
