//! The publisher thread: drains the loops' bounded publish queue in batches and pipelines them
//! to Redis on one connection, several batches in flight: while Redis runs one batch, the next
//! is already in its input buffer, so Redis never waits for this thread's round trip. Redis
//! runs the commands of one connection in the order they were sent, so the order of messages
//! (within a channel, and overall) is the order the loops queued them. With history on, every
//! publish runs atomically in the `publish.lua` script (offset, stream append, expiry,
//! PUBLISH), up to [`CALL_MAX`] publishes per call on one Redis;
//! otherwise a plain PUBLISH of the wire-encoded payload. Acknowledgements with offsets go back
//! to the publishing connection. What cannot reach Redis is delivered to this node's loops
//! only, counted and logged: nothing queues up without bound while Redis is away. What Redis
//! answers with an error (out of memory, read-only) was not applied: it is reported to its
//! publisher as refused, delivered nowhere, and the connection is kept.
//!
//! On a Redis Cluster the same thread routes each batch through a [`Router`]: split per
//! primary (by each channel's slot), every primary's share pipelined and sent before any answer
//! is read, one batch at a time, `SPUBLISH` inside the script ([`Publisher::run_cluster`]).

use std::collections::{HashMap, VecDeque};
use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use redis::Value;

use super::cluster::{Outcome, REPLID, REPLID2, Router};
use super::resp::{Conn, timed_out};
use super::{Backend, COMMAND_TIMEOUT, CONNECT_TIMEOUT, Link, Shared, ttl_secs};
use crate::bridge::{Channel, Delivery, Position, Publish, PublishAck, PublishError, PublishQueue, Reply};
use crate::broker::{Outbox, wire};
use crate::config::Config;
use crate::log_throttle::LogThrottle as RateLimit;
use crate::metrics::{add, inc};

const PUBLISH_LUA: &str = include_str!("publish.lua");
pub(super) static PUBLISH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(PUBLISH_LUA));

/// Connections a batch is tried on after a lost one (with history: see [`Publisher::resend`]).
const RESEND_ATTEMPTS: usize = 3;
/// Longest wait, with Redis answering, for this node's subscriber to subscribe again before
/// publishing anyway (see [`Publisher::await_subscriber`]).
const SUBSCRIBER_WAIT: Duration = Duration::from_secs(2);
/// Most batches sent and not yet answered. Two keep Redis busy (it runs one while the next
/// waits in its input buffer); more only help when batches are full.
const MAX_IN_FLIGHT: usize = 8;
/// Publishes per call of the publish script on one Redis (history on): what Redis spends on a
/// call itself (parsing it, running the script's setup, its reply) is paid once for these
/// (tuning.md, "Several publishes per script call"). A call runs at most this many publishes
/// at once, some tens of microseconds of Redis's time.
const CALL_MAX: usize = 16;
/// Below this many batches in flight a batch is sent whatever its size; above, only full ones
/// (`--publish-batch`): under load batches grow instead of multiplying, so the cost per
/// publish of a write here and a read in Redis falls as the rate rises.
const EAGER_IN_FLIGHT: usize = 2;
/// Most payload bytes in flight: with large messages, the bound on memory held here and in
/// Redis's input buffer for this connection.
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;
/// Longest time between two refreshes of a channel's history expiry by this node while it
/// publishes on it (shorter with a `--history-ttl` under 4 s): the history then lives at
/// least `--history-ttl` minus this after the last publish, and the script skips two EXPIRE
/// calls on every other publish.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// History settings, with history on.
#[derive(Clone, Copy)]
struct History {
    maxlen: usize,
    ttl: u64,
    refresh_every: Duration,
    /// Bytes of large messages one channel's stream may hold (`publish.lua`'s ARGV 8).
    large_budget: usize,
    /// Payload size above which a message is large (ARGV 9).
    large: usize,
}

/// Entries a stream may hold past `--history-size` (the trim every 64th publish, in whole
/// stream nodes of 100 entries, Redis's default `stream-node-max-entries`).
pub(super) const TRIM_SLACK: usize = 164;

impl History {
    /// A channel's stream holds at most `--history-channel-memory` bytes of payload (plus its
    /// newest message): large messages are counted against half of it; the small ones, held
    /// by count, cannot fill more than the other half.
    fn new(config: &Config) -> History {
        let half = config.history_channel_memory / 2;
        History {
            maxlen: config.history_size,
            ttl: ttl_secs(config.history_ttl),
            refresh_every: REFRESH_EVERY.min(config.history_ttl / 4),
            large_budget: half,
            large: half / (config.history_size + TRIM_SLACK),
        }
    }
}

/// A pipeline sent and being answered, in order.
struct Batch {
    publishes: Vec<Publish>,
    answers: Vec<Value>,
    bytes: usize,
}

pub(super) struct Publisher {
    redis: Shared,
    queue: Receiver<Publish>,
    /// Byte accounting of the queue, shared with the loops.
    queued: PublishQueue,
    batch_max: usize,
    history: Option<History>,
    /// The publish script's arguments that are the same for every publish, packed once.
    script_args: ScriptArgs,
    /// Publishes taken off the queue so far: the last one's [`Publish::seq`].
    taken: u64,
    /// One Redis with history: the key the last publish of each pipelined batch sets to its
    /// number, in the same script run (`publish.lua`, KEYS[3]). Redis runs a connection's
    /// commands in order, so after a lost connection it tells which of the publishes in
    /// flight ran: those up to it did; the script looks for the others' tags.
    marker: Option<Vec<u8>>,
    /// The pipeline being packed (kept: its capacity is reused).
    packed: Vec<u8>,
    /// Channels whose history expiry this node refreshed lately, and when.
    refreshed: HashMap<Channel, Instant>,
    next_prune: Instant,
    /// One Redis: the connection of the server's own (`resp.rs`: answers parsed without
    /// redis-rs's combinator parser, one per publish).
    con: Option<Conn>,
    /// In a cluster: the router over the primaries (and no `con`).
    router: Option<Router>,
    in_flight: VecDeque<Batch>,
    in_flight_bytes: usize,
    next_attempt: Instant,
    /// Start of the current outage and publishes delivered locally since.
    outage: Option<(Instant, u64)>,
    outbox: Outbox,
    drop_log: RateLimit,
    redis_stalled_log: RateLimit,
    refused_log: RateLimit,
    /// The subscriber stayed away longer than [`SUBSCRIBER_WAIT`]: publishes go out without
    /// waiting until it is back.
    waited_out: bool,
}

impl Publisher {
    pub(super) fn new(
        redis: Shared,
        config: &Config,
        queue: Receiver<Publish>,
        queued: PublishQueue,
        link: Link,
    ) -> Self {
        // One Redis: the start-up connection (which loaded the script) is not the kind this
        // thread keeps; the first batch opens one, at once.
        let router = match link {
            Link::One(_) => None,
            Link::Cluster(r) => Some(r),
        };
        let history = (config.history_size > 0).then(|| History::new(config));
        // Prefix of the epochs this node's publishes create (see `publish.lua`).
        let epoch_prefix: String = std::iter::repeat_with(fastrand::alphanumeric).take(4).collect();
        let script_args = ScriptArgs::new(history, &epoch_prefix, redis.keys.cluster);
        let marker =
            (script_args.tag.as_ref()).map(|tag| [redis.keys.prefix.as_bytes(), b"pub:", tag].concat());
        Publisher {
            redis,
            queue,
            queued,
            batch_max: config.publish_batch,
            history,
            marker,
            script_args,
            taken: 0,
            packed: Vec::new(),
            refreshed: HashMap::new(),
            next_prune: Instant::now(),
            con: None,
            router,
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            in_flight_bytes: 0,
            next_attempt: Instant::now(),
            outage: None,
            outbox: Outbox::default(),
            drop_log: RateLimit::default(),
            redis_stalled_log: RateLimit::default(),
            refused_log: RateLimit::default(),
            waited_out: false,
        }
    }

    pub(super) fn run(mut self) {
        let mut next: Vec<Publish> = Vec::with_capacity(self.batch_max);
        loop {
            if next.is_empty() && self.in_flight.is_empty() {
                // Nothing to do but wait for the first publish (waking now and then while
                // replies wait for room in a loop's inbox).
                match self.queue.recv_timeout(self.outbox.idle_wait()) {
                    Ok(p) => next.push(self.take(p)),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            // Whatever else is queued, up to a batch.
            while next.len() < self.batch_max {
                match self.queue.try_recv() {
                    Ok(p) => next.push(self.take(p)),
                    Err(_) => break,
                }
            }
            if !next.is_empty() && self.router.is_some() {
                let batch = std::mem::replace(&mut next, Vec::with_capacity(self.batch_max));
                self.run_cluster(batch);
            } else if !next.is_empty() && self.may_send(next.len()) {
                let batch = std::mem::replace(&mut next, Vec::with_capacity(self.batch_max));
                self.start(batch);
            }
            if !self.in_flight.is_empty() {
                self.receive();
            }
            self.outbox.retry(&self.redis.loops);
            self.prune_refreshed();
        }
    }

    /// A publish taken off the queue, numbered (see [`Publish::seq`]).
    fn take(&mut self, p: Publish) -> Publish {
        let mut p = self.queued.taken(p);
        self.taken += 1;
        p.seq = self.taken;
        p
    }

    /// Whether a batch of `len` publishes goes out now (see [`EAGER_IN_FLIGHT`]).
    fn may_send(&self, len: usize) -> bool {
        let n = self.in_flight.len();
        n < EAGER_IN_FLIGHT
            || (n < MAX_IN_FLIGHT && len == self.batch_max && self.in_flight_bytes < MAX_IN_FLIGHT_BYTES)
    }

    /// The batch as one pipeline, packed straight into `out` (RESP; no allocation per
    /// argument: this runs for every publish): with history, calls of the publish script of up
    /// to [`Publisher::per_call`] publishes each. Errors come back per publish, so one refused
    /// publish does not hide the outcome of the others. `rerun`: these publishes were not
    /// applied before (their expiry refresh did not happen either), or may have been: a retry
    /// after a lost connection has the script look for each publish's tag first.
    fn pack<'a>(&mut self, out: &mut Vec<u8>, batch: impl IntoIterator<Item = &'a Publish>, rerun: bool) {
        let now = Instant::now();
        let per_call = self.per_call();
        let mut call: Vec<(&Publish, Flag)> = Vec::with_capacity(per_call);
        let mut batch = batch.into_iter().peekable();
        while let Some(p) = batch.next() {
            let Some(h) = self.history else {
                pack_plain(out, &self.redis.keys, p);
                continue;
            };
            let refresh = rerun
                || match self.refreshed.get_mut(&p.channel) {
                    Some(at) if now.duration_since(*at) < h.refresh_every => false,
                    Some(at) => {
                        *at = now;
                        true
                    }
                    None => {
                        self.refreshed.insert(p.channel.clone(), now);
                        true
                    }
                };
            let flag = match (rerun, refresh) {
                (true, _) => Flag::Retry,
                (false, true) => Flag::Refresh,
                (false, false) => Flag::Plain,
            };
            call.push((p, flag));
            let last = batch.peek().is_none();
            if call.len() == per_call || last {
                // A pipelined batch's last call also sets the progress marker.
                let marker = match &self.marker {
                    Some(key) if last && !rerun => Some(&key[..]),
                    _ => None,
                };
                pack_call(out, &self.redis.keys, &self.script_args, &call, marker);
                call.clear();
            }
        }
    }

    /// Publishes per script call: [`CALL_MAX`] on one Redis, one in a cluster (where each is
    /// routed to its channel's primary).
    fn per_call(&self) -> usize {
        if self.router.is_some() { 1 } else { CALL_MAX }
    }

    /// Forgets refreshes older than the refresh interval: the map holds only the channels
    /// published on lately.
    fn prune_refreshed(&mut self) {
        let Some(h) = self.history else { return };
        let now = Instant::now();
        if now < self.next_prune {
            return;
        }
        self.refreshed
            .retain(|_, at| now.duration_since(*at) < h.refresh_every);
        self.next_prune = now + h.refresh_every;
    }

    /// Sends a batch without waiting for its answers. Without a connection, or when sending
    /// fails, it goes the way of [`Publisher::resend`] with everything still unanswered.
    fn start(&mut self, batch: Vec<Publish>) {
        if self.con.is_none() {
            return self.resend(batch, false);
        }
        let con = self.con.take().expect("checked above");
        self.await_subscriber(&con);
        self.con = Some(con);
        let mut packed = std::mem::take(&mut self.packed);
        packed.clear();
        self.pack(&mut packed, &batch, false);
        let con = self.con.as_mut().expect("checked above");
        let sent = con.send(&packed);
        self.packed = packed;
        match sent {
            Ok(()) => {
                let bytes = batch.iter().map(|p| p.data.len()).sum();
                self.in_flight_bytes += bytes;
                self.in_flight.push_back(Batch {
                    answers: Vec::with_capacity(batch.len()),
                    publishes: batch,
                    bytes,
                });
            }
            Err(e) => {
                debug!("redis publish failed: {e}; retrying on a new connection");
                let mut pending = self.abandon_connection();
                pending.extend(batch);
                self.resend(pending, true);
            }
        }
    }

    /// Reads one answer, for the oldest batch in flight; a complete batch is acknowledged.
    fn receive(&mut self) {
        let (history, per_call) = (self.history.is_some(), self.per_call());
        let con = self.con.as_mut().expect("batches in flight have a connection");
        let front = self.in_flight.front_mut().expect("a batch is in flight");
        let remaining = &front.publishes[front.answers.len()..];
        match read_answer(con, history, per_call, remaining, &mut front.answers) {
            Ok(()) => {
                if front.answers.len() < front.publishes.len() {
                    return;
                }
                let b = self.in_flight.pop_front().expect("a batch is in flight");
                self.in_flight_bytes -= b.bytes;
                if b.answers.iter().any(is_noscript) {
                    self.reload_script(b);
                } else {
                    self.answered(b.publishes, b.answers);
                }
            }
            Err(e) if timed_out(&e) => {
                // Connected but no answer (a stalled Redis): the commands may still run later,
                // so neither retrying nor delivering them locally is safe.
                let pending = self.abandon_connection();
                self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                if self.redis_stalled_log.allow() {
                    warn!(
                        "redis did not answer a publish batch: {e}; outcome unknown, not delivered locally"
                    );
                }
                self.fail(pending, &e.to_string());
            }
            Err(e) => {
                debug!("redis publish failed: {e}; retrying on a new connection");
                let pending = self.abandon_connection();
                self.resend(pending, true);
            }
        }
    }

    /// Drops the connection. Publishes answered so far are acknowledged; the others (no
    /// answer yet, or NOSCRIPT: not applied) are returned in the order they were sent.
    fn abandon_connection(&mut self) -> Vec<Publish> {
        self.con = None;
        self.in_flight_bytes = 0;
        let batches: Vec<Batch> = self.in_flight.drain(..).collect();
        self.settle(batches)
    }

    /// Acknowledges the applied publishes of `batches`; returns the others, in order.
    fn settle(&mut self, batches: Vec<Batch>) -> Vec<Publish> {
        let mut pending = Vec::new();
        for b in batches {
            let mut answers = b.answers.into_iter();
            let (mut done, mut values) = (Vec::new(), Vec::new());
            for p in b.publishes {
                match answers.next() {
                    Some(v) if !is_noscript(&v) => {
                        done.push(p);
                        values.push(v);
                    }
                    _ => pending.push(p),
                }
            }
            self.answered(done, values);
        }
        pending
    }

    /// Redis lost the publish script (restart, SCRIPT FLUSH): the commands that failed with
    /// NOSCRIPT ran nothing. Every batch sent before the script is loaded again fails alike,
    /// so their answers are read first; then the script is loaded and exactly the failed
    /// commands run again, in the order they were sent, before anything newer is sent.
    fn reload_script(&mut self, first: Batch) {
        let mut batches = vec![first];
        while let Some(mut b) = self.in_flight.pop_front() {
            self.in_flight_bytes -= b.bytes;
            let (history, per_call) = (self.history.is_some(), self.per_call());
            while b.answers.len() < b.publishes.len() {
                let con = self.con.as_mut().expect("batches in flight have a connection");
                let remaining = &b.publishes[b.answers.len()..];
                match read_answer(con, history, per_call, remaining, &mut b.answers) {
                    Ok(()) => {}
                    Err(e) => {
                        debug!("redis publish failed: {e}; retrying on a new connection");
                        batches.push(b);
                        let mut pending = self.settle(batches);
                        pending.extend(self.abandon_connection());
                        return self.resend(pending, true);
                    }
                }
            }
            batches.push(b);
        }
        let failed = self.settle(batches);
        info!("loading the publish script into redis");
        let mut con = self.con.take().expect("batches in flight have a connection");
        match self.query(&mut con, &failed, true) {
            Ok(values) => {
                self.con = Some(con);
                self.answered(failed, values);
            }
            Err(e) => {
                debug!("redis publish failed: {e}; retrying on a new connection");
                self.resend(failed, true);
            }
        }
    }

    /// Runs a batch on a new connection and waits for its answers: after a failed connection
    /// (`failed`: at once, one retry, since after a Redis restart the first batch fails on the
    /// dead socket; so delivery is at-least-once across a restart, as the old server may have
    /// applied part of it), or without one once the reconnect backoff has passed. Until then,
    /// and when Redis cannot be reached, the batch is delivered to this node's clients only.
    fn resend(&mut self, mut batch: Vec<Publish>, failed: bool) {
        if batch.is_empty() {
            return;
        }
        if failed {
            self.next_attempt = Instant::now();
        }
        let mut attempts = 0;
        loop {
            if Instant::now() < self.next_attempt {
                return self.deliver_locally(batch);
            }
            let Backend::One(client) = &self.redis.backend else {
                unreachable!("only the one-Redis publisher reconnects here")
            };
            // Connected means answering: a stalled Redis (the kernel still accepts
            // connections) counts as unreachable, so nothing is sent that might run later
            // unseen.
            let ping = redis::cmd("PING").get_packed_command();
            let opened = Conn::open(client.get_connection_info(), CONNECT_TIMEOUT, COMMAND_TIMEOUT)
                .and_then(|mut con| con.command(&ping, "PING").map(|_| con));
            let mut con = match opened {
                Ok(con) => con,
                Err(e) => {
                    self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                    if self.outage.is_none() {
                        warn!(
                            "redis unreachable for publishing: {e}; publishes reach this node's clients only until it is back"
                        );
                        self.outage = Some((Instant::now(), 0));
                    }
                    return self.deliver_locally(batch);
                }
            };
            attempts += 1;
            // Redis answers again: a subscriber still away is waited for anew.
            self.waited_out = false;
            self.await_subscriber(&con);
            let result = self
                .settle_ran(&mut con, &mut batch)
                .and_then(|()| self.query(&mut con, &batch, true));
            match result {
                Ok(values) => {
                    self.con = Some(con);
                    self.redis.backoff.reset();
                    if let Some((since, n)) = self.outage.take() {
                        info!(
                            "redis publisher reconnected after {:.1}s; {n} publishes in that time reached this node's clients only",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    return self.answered(batch, values);
                }
                // This connection was lost too (closed, reset: not a stall, whose commands may
                // still run later): with history a retry is safe (see `settle_ran`).
                Err(e) if self.history.is_some() && !timed_out(&e) && attempts < RESEND_ATTEMPTS => {
                    debug!("redis publish failed again: {e}; retrying on a new connection");
                }
                Err(e) => {
                    // Connected but no answer (a stalled Redis): the commands may still run
                    // later, so delivering them locally too could duplicate them.
                    self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                    if self.redis_stalled_log.allow() {
                        warn!(
                            "redis did not answer a publish batch: {e}; outcome unknown, not delivered locally"
                        );
                    }
                    return self.fail(batch, &e.to_string());
                }
            }
        }
    }

    /// One Redis, about to send publishes on `con`: if this node's subscriber is away (its
    /// connection lost while Redis answers the publisher, e.g. just after a Redis restart),
    /// waits for it to subscribe again, up to [`SUBSCRIBER_WAIT`], waking it from its backoff.
    /// Published meanwhile, a message would reach no client of this node (the sender
    /// included), and without history no client anywhere whose node's subscriber is away too.
    /// The publish queue fills meanwhile and the loops pause their publishers. No wait when
    /// `con` is closed (Redis went away: the send fails, and the next connection, once Redis
    /// answers, waits). A subscriber that stays away longer (Redis refusing its SUBSCRIBE) is
    /// not waited for again until it is back or the publisher connects anew.
    fn await_subscriber(&mut self, con: &Conn) {
        let up = |s: &Self| s.redis.metrics.broker.subscriber_up.load(Ordering::Relaxed);
        if self.router.is_some() || up(self) {
            self.waited_out = false;
            return;
        }
        if self.waited_out || con.closed() {
            return;
        }
        inc(&self.redis.metrics.broker.publish_waits);
        self.redis.wake_subscriber.store(true, Ordering::Relaxed);
        let until = Instant::now() + SUBSCRIBER_WAIT;
        let mut polls = 0u32;
        while !up(self) {
            if Instant::now() >= until {
                warn!(
                    "the redis subscriber is still away after {SUBSCRIBER_WAIT:?} with Redis answering; publishing without it until it is back (this node's clients miss those messages)"
                );
                self.waited_out = true;
                return;
            }
            polls += 1;
            if polls % 10 == 0 && con.closed() {
                return;
            }
            self.outbox.retry(&self.redis.loops);
            std::thread::sleep(Duration::from_millis(1));
        }
        debug!("the redis subscriber is back; publishing");
    }

    /// Before publishes that were in flight on a lost connection run again: those up to the
    /// last progress marker that ran (see [`Publisher::marker`]) ran, and are answered as
    /// stored and taken out of `batch` (a `wsrelay.v1` publisher is told without a position:
    /// its answer was lost with the connection). The others run again with the script looking
    /// for their tags first, so one that ran in the last batch is not stored twice either.
    fn settle_ran(&mut self, con: &mut Conn, batch: &mut Vec<Publish>) -> std::io::Result<()> {
        let Some(key) = &self.marker else {
            return Ok(());
        };
        let get = redis::cmd("GET").arg(&key[..]).get_packed_command();
        let ran = match con.command(&get, "GET")? {
            Value::BulkString(b) => std::str::from_utf8(&b).ok().and_then(|n| n.parse().ok()),
            _ => None,
        };
        let Some(ran) = ran else { return Ok(()) };
        let (done, rest): (Vec<Publish>, Vec<Publish>) =
            std::mem::take(batch).into_iter().partition(|p| p.seq <= ran);
        *batch = rest;
        if done.is_empty() {
            return Ok(());
        }
        let metrics = &self.redis.metrics.broker;
        metrics.writes_accepted();
        add(&metrics.published, done.len() as u64);
        for p in done {
            self.acknowledge(p.channel, p.ack, Ok(None));
        }
        Ok(())
    }

    /// Runs a pipeline and waits for it, on a connection with nothing in flight. Commands that
    /// failed with NOSCRIPT ran nothing: the script is loaded and exactly those run again, in
    /// order.
    fn query(&mut self, con: &mut Conn, batch: &[Publish], rerun: bool) -> std::io::Result<Vec<Value>> {
        let mut values = self.exchange(con, batch, rerun)?;
        let missing: Vec<usize> = (0..values.len()).filter(|&i| is_noscript(&values[i])).collect();
        if missing.is_empty() {
            return Ok(values);
        }
        info!("loading the publish script into redis");
        let load = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(PUBLISH_LUA)
            .get_packed_command();
        con.command(&load, "SCRIPT LOAD")?;
        let again: Vec<&Publish> = missing.iter().map(|&i| &batch[i]).collect();
        let answers = self.exchange(con, again, true)?;
        for (i, v) in missing.into_iter().zip(answers) {
            values[i] = v;
        }
        Ok(values)
    }

    /// Sends a batch and reads its answers (an error reply is an answer, per publish).
    fn exchange<'a>(
        &mut self,
        con: &mut Conn,
        batch: impl IntoIterator<Item = &'a Publish>,
        rerun: bool,
    ) -> std::io::Result<Vec<Value>> {
        let mut packed = Vec::new();
        let batch: Vec<&Publish> = batch.into_iter().collect();
        self.pack(&mut packed, batch.iter().copied(), rerun);
        con.send(&packed)?;
        let (history, per_call) = (self.history.is_some(), self.per_call());
        let mut answers = Vec::with_capacity(batch.len());
        while answers.len() < batch.len() {
            read_answer(con, history, per_call, &batch[answers.len()..], &mut answers)?;
        }
        Ok(answers)
    }

    /// Runs a batch on a cluster and waits for it: each publish on the primary of its channel's
    /// slot, pipelined per primary, every primary's share sent before any answer is read. The
    /// router follows `MOVED`/`ASK` and retries `TRYAGAIN`/`CLUSTERDOWN` (a publish refused so
    /// did not run), in order, a bounded number of times. Then each publish is answered like
    /// on one Redis: stored or refused; not sent (its primary cannot be reached, or no primary
    /// serves its slot during a failover): delivered to this node's clients only; sent on a
    /// connection lost before its answer (a primary that died): outcome unknown, not retried
    /// (it may have run, and its message reached subscribers: a retry would deliver it twice
    /// under two offsets) and not delivered locally.
    fn run_cluster(&mut self, batch: Vec<Publish>) {
        let mut packed = Vec::new();
        self.pack(&mut packed, &batch, false);
        let router = self.router.as_mut().expect("cluster publisher");
        let outcomes = match super::cluster::split_packed(&packed) {
            Some(commands) => router.run(&commands),
            None => unreachable!("redis-rs packs arrays of bulk strings"),
        };
        // Answered in order, a run of like outcomes at a time.
        let mut answered = (Vec::new(), Vec::new());
        let mut outcomes = outcomes.into_iter();
        for p in batch {
            let o = outcomes.next().expect("one outcome per publish");
            if !matches!(o, Outcome::Answer(_)) {
                let (done, values) = std::mem::take(&mut answered);
                self.answered(done, values);
            }
            match o {
                Outcome::Answer(v) => {
                    answered.0.push(p);
                    if self.history.is_some() {
                        // A script call of one publish.
                        spread(v, 1, &mut answered.1);
                    } else {
                        answered.1.push(v);
                    }
                }
                Outcome::Unknown(e) => {
                    if self.redis_stalled_log.allow() {
                        warn!(
                            "redis cluster connection lost with a publish unanswered: {e}; outcome unknown, not delivered locally"
                        );
                    }
                    self.fail(vec![p], &e);
                }
                Outcome::NotSent(e) => {
                    if self.refused_log.allow() {
                        warn!(
                            "redis cluster: a publish reached no primary: {e}; delivered to this node's clients only"
                        );
                    }
                    self.deliver_locally(vec![p]);
                }
            }
        }
        let (done, values) = answered;
        self.answered(done, values);
    }

    /// Answers each publish of an answered batch: stored (with its position), or refused by
    /// Redis (counted, logged at most once a second, and delivered nowhere).
    fn answered(&mut self, batch: Vec<Publish>, results: Vec<Value>) {
        if batch.is_empty() {
            return;
        }
        let all = self.redis.metrics.clone();
        let metrics = &all.broker;
        // Before any answer goes out: whoever hears "published" finds /healthz agreeing.
        let stored = results
            .iter()
            .filter(|v| !matches!(v, Value::ServerError(_)))
            .count();
        if stored > 0 {
            metrics.writes_accepted();
        }
        for (p, v) in batch.into_iter().zip(results) {
            if p.ack.is_none() && !matches!(v, Value::ServerError(_)) {
                // Stored, and nobody to tell (a raw publish): the position is not read.
                continue;
            }
            let result = outcome(&v, self.history.is_some());
            if let (Err(PublishError::Refused(reason)), Value::ServerError(e)) = (&result, &v) {
                inc(&metrics.publish_refused);
                if refuses_every_write(e.code()) {
                    metrics.refusing_writes(reason);
                }
                if self.refused_log.allow() {
                    warn!("redis refused a publish on {:?}: {reason}", p.channel);
                }
                // Its expiry refresh was not applied either.
                self.refreshed.remove(&p.channel);
            }
            self.acknowledge(p.channel, p.ack, result);
        }
        add(&metrics.published, stored as u64);
    }

    /// Tells a `wsrelay.v1` publisher (one with `ack`) how its publish on `channel` went.
    fn acknowledge(
        &mut self,
        channel: Channel,
        ack: Option<PublishAck>,
        result: Result<Option<Position>, PublishError>,
    ) {
        if let Some(ack) = ack {
            let reply = Reply::Published {
                channel,
                reference: ack.reference,
                result,
            };
            self.outbox.reply(&self.redis.loops, ack.to, reply);
        }
    }

    /// Answers a batch whose fate is unknown, and counts it.
    fn fail(&mut self, batch: Vec<Publish>, why: &str) {
        add(&self.redis.metrics.broker.publish_failed, batch.len() as u64);
        for p in batch {
            self.refreshed.remove(&p.channel);
            self.acknowledge(p.channel, p.ack, Err(PublishError::Unknown(why.to_owned())));
        }
    }

    /// Delivers publishes that could not reach Redis to this node's loops (each loop ignores
    /// channels it has no members on).
    fn deliver_locally(&mut self, batch: Vec<Publish>) {
        let all: Vec<usize> = (0..self.redis.loops.len()).collect();
        let n = batch.len() as u64;
        for p in batch {
            self.refreshed.remove(&p.channel);
            self.acknowledge(p.channel.clone(), p.ack, Err(PublishError::Unreachable));
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

/// The publish script's arguments that are the same for every call (ARGV 1-8 of
/// `publish.lua`), packed (RESP) once, and the start of every publish's tag.
#[derive(Default)]
struct ScriptArgs {
    fixed: Vec<u8>,
    /// One Redis: the start of every publish's tag (its last argument), random per process;
    /// its [`Publish::seq`] follows.
    tag: Option<Vec<u8>>,
}

/// A publish's flag in the script call (see `publish.lua`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flag {
    Plain,
    /// Refresh the keys' time to live.
    Refresh,
    /// Refresh, and look for the publish's tag among the newest entries first: it may have
    /// run already (a retry after a lost connection).
    Retry,
}

impl ScriptArgs {
    fn new(history: Option<History>, epoch_prefix: &str, cluster: bool) -> ScriptArgs {
        let Some(h) = history else {
            return ScriptArgs::default();
        };
        let mut a = ScriptArgs::default();
        resp::bulk(&mut a.fixed, &[h.maxlen.to_string().as_bytes()]);
        resp::bulk(&mut a.fixed, &[h.ttl.to_string().as_bytes()]);
        resp::bulk(&mut a.fixed, &[epoch_prefix.as_bytes()]);
        resp::bulk(&mut a.fixed, &[h.large_budget.to_string().as_bytes()]);
        resp::bulk(&mut a.fixed, &[h.large.to_string().as_bytes()]);
        if cluster {
            // The replication ids of the primary running it (the router puts them in).
            // No tag: a publish is not retried after a lost connection in a cluster (its
            // outcome is unknown, see `run_cluster`).
            for arg in [&b"SPUBLISH"[..], REPLID, REPLID2] {
                resp::bulk(&mut a.fixed, &[arg]);
            }
        } else {
            for arg in [&b"PUBLISH"[..], b"", b""] {
                resp::bulk(&mut a.fixed, &[arg]);
            }
            a.tag = Some(
                std::iter::repeat_with(fastrand::alphanumeric)
                    .take(8)
                    .map(|c| c as u8)
                    .collect(),
            );
        }
        a
    }
}

/// A plain PUBLISH of the wire-encoded payload (history off).
fn pack_plain(out: &mut Vec<u8>, keys: &super::Keys, p: &Publish) {
    let name = keys.channel(&p.channel);
    resp::array(out, 3);
    resp::bulk(out, &[keys.publish_command().as_bytes()]);
    resp::bulk(out, &[name.as_bytes()]);
    resp::bulk(out, &[&wire::encode(p.kind, &p.data, None)]);
}

/// One call of the publish script for `call`'s publishes, in order (and, with `marker`,
/// setting that key to the last one's number: see [`Publisher::marker`]).
fn pack_call(
    out: &mut Vec<u8>,
    keys: &super::Keys,
    fixed: &ScriptArgs,
    call: &[(&Publish, Flag)],
    marker: Option<&[u8]>,
) {
    let keys_n = 2 * call.len() + usize::from(marker.is_some());
    resp::array(out, 3 + keys_n + 8 + 5 * call.len());
    resp::bulk(out, &[b"EVALSHA"]);
    resp::bulk(out, &[PUBLISH_SCRIPT.get_hash().as_bytes()]);
    let mut digits = [0u8; 20];
    resp::bulk(out, &[resp::decimal_in(&mut digits, keys_n as u64)]);
    for (p, _) in call {
        if keys.cluster {
            resp::bulk(out, &[keys.meta(&p.channel).as_bytes()]);
            resp::bulk(out, &[keys.stream(&p.channel).as_bytes()]);
        } else {
            resp::bulk(out, &keys.plain_key(&p.channel, "meta"));
            resp::bulk(out, &keys.plain_key(&p.channel, "stream"));
        }
    }
    if let Some(key) = marker {
        resp::bulk(out, &[key]);
    }
    out.extend_from_slice(&fixed.fixed);
    for &(p, flag) in call {
        if keys.cluster {
            resp::bulk(out, &[keys.channel(&p.channel).as_bytes()]);
        } else {
            // The channel as `Keys::channel` spells it on one Redis.
            resp::bulk(out, &[keys.prefix.as_bytes(), p.channel.as_bytes()]);
        }
        resp::bulk(out, &[&[wire::kind_byte(p.kind)]]);
        resp::bulk(out, &[&p.data]);
        let flag: &[u8] = match flag {
            Flag::Plain => b"0",
            Flag::Refresh => b"1",
            Flag::Retry => b"2",
        };
        resp::bulk(out, &[flag]);
        match &fixed.tag {
            Some(tag) => resp::bulk(out, &[tag, resp::decimal_in(&mut digits, p.seq)]),
            None => resp::bulk(out, &[b""]),
        }
    }
}

/// Reads the answer of the next command for a batch's first `remaining` unanswered publishes
/// and adds one answer per publish it covered to `answers`: a plain PUBLISH covers one, a
/// script call up to `per_call`. When none of those publishes wants its position (raw
/// publishes), the answer is parsed only if it holds an error.
fn read_answer<P: std::borrow::Borrow<Publish>>(
    con: &mut Conn,
    history: bool,
    per_call: usize,
    remaining: &[P],
    answers: &mut Vec<Value>,
) -> std::io::Result<()> {
    let n = if history { per_call.min(remaining.len()) } else { 1 };
    let v = if remaining[..n].iter().all(|p| p.borrow().ack.is_none()) {
        con.value_unless_ok()?
    } else {
        con.value()?
    };
    if history {
        spread(v, n, answers);
    } else {
        answers.push(v);
    }
    Ok(())
}

/// A script call's answer as one answer per publish of the call (`n`): its elements; an error
/// refused the whole call (NOSCRIPT, OOM, READONLY), so each of them; `Okay` (read for errors
/// only, and none) each stored.
fn spread(v: Value, n: usize, answers: &mut Vec<Value>) {
    match v {
        Value::Array(items) if items.len() == n => answers.extend(items),
        Value::Okay | Value::ServerError(_) => answers.extend(std::iter::repeat_n(v, n)),
        _ => answers.extend(std::iter::repeat_n(
            redis::parse_redis_value(b"-ERR unexpected reply from the publish script\r\n")
                .expect("a valid error line"),
            n,
        )),
    }
}

/// RESP, written straight into a buffer.
mod resp {
    /// An array header of `n` elements.
    pub(super) fn array(out: &mut Vec<u8>, n: usize) {
        out.push(b'*');
        decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }

    /// One bulk string: the concatenation of `parts`.
    pub(super) fn bulk(out: &mut Vec<u8>, parts: &[&[u8]]) {
        out.push(b'$');
        decimal(out, parts.iter().map(|p| p.len()).sum());
        out.extend_from_slice(b"\r\n");
        for p in parts {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    }

    fn decimal(out: &mut Vec<u8>, n: usize) {
        let mut digits = [0u8; 20];
        out.extend_from_slice(decimal_in(&mut digits, n as u64));
    }

    /// `n` in decimal, written at the end of `digits`.
    pub(super) fn decimal_in(digits: &mut [u8; 20], mut n: u64) -> &[u8] {
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &digits[at..]
    }
}

/// What one publish's answer in a pipeline means: stored (with its position when the channel
/// keeps history), or refused with Redis's reason (an error reply: the command was not applied).
fn outcome(v: &Value, history: bool) -> Result<Option<Position>, PublishError> {
    match v {
        Value::ServerError(e) => Err(PublishError::Refused(format!(
            "{}{}",
            e.code(),
            e.details().map(|d| format!(" {d}")).unwrap_or_default()
        ))),
        _ if history => position(v)
            .ok_or_else(|| PublishError::Refused("unexpected reply from the publish script".into()))
            .map(Some),
        _ => Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply as redis-rs reads it off the wire.
    fn server_error(line: &str) -> Value {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap()
    }

    #[test]
    fn each_answer_of_a_batch_has_its_own_outcome() {
        use std::sync::Arc;
        let stored = Value::Array(vec![Value::Int(7), Value::BulkString(b"ep".to_vec())]);
        assert_eq!(
            outcome(&stored, true),
            Ok(Some(Position {
                offset: 7,
                epoch: Arc::from("ep")
            }))
        );
        // History off: a plain PUBLISH answers how many received it.
        assert_eq!(outcome(&Value::Int(3), false), Ok(None));
        // A reply the script never gives is not taken for a position.
        assert!(matches!(
            outcome(&Value::Int(3), true),
            Err(PublishError::Refused(_))
        ));
        let oom = server_error("OOM command not allowed when used memory > 'maxmemory'.");
        match outcome(&oom, true) {
            Err(PublishError::Refused(reason)) => {
                assert!(reason.starts_with("OOM command not allowed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!is_noscript(&oom));
        assert!(is_noscript(&server_error("NOSCRIPT No matching script.")));
    }

    /// The packed call is, byte for byte, what redis-rs packs for the same command, with the
    /// keys `Keys` names: on one Redis (two publishes in one call, with and without the
    /// progress marker) and in a cluster (one), history on and off.
    #[test]
    fn a_packed_publish_is_the_command_redis_rs_would_send() {
        let history = History {
            maxlen: 1000,
            ttl: 600,
            refresh_every: REFRESH_EVERY,
            large_budget: 8 << 20,
            large: 7206,
        };
        let publish = |channel: &str, seq| Publish {
            origin: None,
            channel: std::sync::Arc::from(channel),
            kind: crate::frame::Kind::Binary,
            data: bytes::Bytes::from_static(b"\x00hello\r\n"),
            ack: None,
            seq,
        };
        let (p, q) = (publish("room {7}", 7), publish("other", 8));
        for cluster in [false, true] {
            let keys = super::super::Keys {
                prefix: "app:".into(),
                cluster,
            };
            let script = ScriptArgs::new(Some(history), "EP12", cluster);
            let call: Vec<(&Publish, Flag)> = if cluster {
                vec![(&p, Flag::Refresh)]
            } else {
                vec![(&p, Flag::Refresh), (&q, Flag::Retry)]
            };
            for marker in [None, Some(&b"app:pub:x"[..])]
                .into_iter()
                .take(2 - usize::from(cluster))
            {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(PUBLISH_SCRIPT.get_hash())
                    .arg(2 * call.len() + usize::from(marker.is_some()));
                for (p, _) in &call {
                    cmd.arg(keys.meta(&p.channel)).arg(keys.stream(&p.channel));
                }
                if let Some(m) = marker {
                    cmd.arg(m);
                }
                cmd.arg(1000).arg(600).arg("EP12").arg(8 << 20).arg(7206);
                if cluster {
                    cmd.arg("SPUBLISH").arg(REPLID).arg(REPLID2);
                } else {
                    cmd.arg("PUBLISH").arg("").arg("");
                }
                for (p, flag) in &call {
                    cmd.arg(keys.channel(&p.channel))
                        .arg("b")
                        .arg(&p.data[..])
                        .arg(if *flag == Flag::Refresh { "1" } else { "2" });
                    match &script.tag {
                        Some(tag) => cmd.arg([&tag[..], p.seq.to_string().as_bytes()].concat()),
                        None => cmd.arg(""),
                    };
                }
                let mut out = Vec::new();
                pack_call(&mut out, &keys, &script, &call, marker);
                assert_eq!(
                    out,
                    cmd.get_packed_command(),
                    "cluster {cluster}, marker {marker:?}"
                );
            }

            let mut plain = redis::cmd(keys.publish_command());
            plain
                .arg(keys.channel(&p.channel))
                .arg(wire::encode(p.kind, &p.data, None));
            let mut out = Vec::new();
            pack_plain(&mut out, &keys, &p);
            assert_eq!(out, plain.get_packed_command(), "cluster {cluster}");
        }
    }

    /// A call's answer is one answer per publish of it, whatever Redis answered.
    #[test]
    fn a_call_answer_is_spread_over_its_publishes() {
        let stored = |o| Value::Array(vec![Value::Int(o), Value::BulkString(b"ep".to_vec())]);
        let refused = server_error("WRONGTYPE Operation against a key");
        let mut answers = Vec::new();
        spread(Value::Array(vec![stored(1), refused.clone()]), 2, &mut answers);
        assert_eq!(answers, vec![stored(1), refused]);
        let mut answers = Vec::new();
        spread(server_error("NOSCRIPT No matching script."), 3, &mut answers);
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(is_noscript));
        let mut answers = Vec::new();
        spread(Value::Okay, 2, &mut answers);
        assert_eq!(answers, vec![Value::Okay, Value::Okay]);
        // An answer of the wrong shape (not the script's) refuses each publish it covered.
        let mut answers = Vec::new();
        spread(Value::Array(vec![stored(1)]), 2, &mut answers);
        assert!(matches!(
            &answers[..],
            [Value::ServerError(_), Value::ServerError(_)]
        ));
    }

    #[test]
    fn only_some_refusals_concern_every_write() {
        for code in ["OOM", "READONLY", "MISCONF", "NOREPLICAS"] {
            assert!(refuses_every_write(code), "{code}");
        }
        for code in ["WRONGTYPE", "ERR", "NOSCRIPT"] {
            assert!(!refuses_every_write(code), "{code}");
        }
    }
}
