//! The request thread: Redis work that has an answer, kept off the loops and off the publish
//! pipeline so a slow history read never holds up delivery. History reads (`read.lua`) serve
//! recovery on (re)subscribe; sessions are hashes read on resume and rewritten whole on change.
//! Failures are answered (the client hears `unavailable`), never retried behind its back.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::debug;
use redis::Value;

use super::{Link, Shared, ttl_secs};
use crate::bridge::{
    Channel, Delivery, History, Position, Reply, Request, SessionRecord, SessionState, ToLoop,
};
use crate::broker::Outbox;
use crate::config::Config;
use crate::frame::Kind;
use crate::position::new_epoch;

static READ_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("read.lua")));
static SAVE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("save.lua")));
static SUBJECT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("subject.lua")));

/// Seconds a channel's history created by a read (its epoch, fixed at subscription time) is
/// kept when no publish follows: a subscription on a quiet channel whose epoch expired takes the
/// next epoch from its start without a notice (it had nothing to miss), and one client
/// subscribing to channel after channel leaves keys that go within a minute.
const CREATED_BY_READ_TTL: u64 = 60;

/// Field holding the session's token subject.
const SUBJECT: &str = "sub";
/// Prefix of the fields holding `offset epoch` per channel.
const CHANNEL: &str = "c:";

pub(super) struct Requests {
    redis: Shared,
    queue: Receiver<Request>,
    history_ttl: u64,
    session_ttl: u64,
    sessions_per_subject: usize,
    con: Option<Link>,
    next_attempt: Instant,
    outbox: Outbox,
}

impl Requests {
    pub(super) fn new(redis: Shared, config: &Config, queue: Receiver<Request>) -> Self {
        Requests {
            redis,
            queue,
            history_ttl: ttl_secs(config.history_ttl),
            session_ttl: ttl_secs(config.session_ttl),
            sessions_per_subject: config.max_sessions_per_subject,
            con: None,
            next_attempt: Instant::now(),
            outbox: Outbox::default(),
        }
    }

    pub(super) fn run(mut self) {
        let mut next_register = Instant::now() + super::REGISTER_EVERY;
        loop {
            let wait = self
                .outbox
                .idle_wait()
                .min(next_register.saturating_duration_since(Instant::now()));
            match self.queue.recv_timeout(wait) {
                Ok(r) => self.handle(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.outbox.retry(&self.redis.loops);
            if Instant::now() >= next_register {
                next_register = Instant::now() + super::REGISTER_EVERY;
                let prefix = self.redis.keys.prefix.clone();
                match self.with_con(|con, _, _| super::register(con, &prefix)) {
                    Ok(None) => {}
                    // Only if this deployment's registration lapsed (Redis unreachable for
                    // minutes) and a conflicting one started meanwhile.
                    Ok(Some(other)) => log::error!("{}", super::prefix_conflict(&prefix, &other)),
                    Err(e) => debug!("prefix registration not renewed: {e}"),
                }
            }
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::History {
                channel,
                since,
                record,
                query,
                read,
                to,
                ..
            } => {
                // A client's read without a position: the newest messages.
                let newest = query.as_ref().filter(|q| q.since.is_none()).map(|q| q.limit);
                let result = self.with_con(|con, keys, ttl| {
                    read_history(con, keys, &channel, since, newest, ttl, record.as_ref())
                });
                let reply = Reply::History {
                    channel,
                    result,
                    query,
                    read,
                };
                self.outbox.reply(&self.redis.loops, to, reply);
            }
            Request::LoadSession { id, to } => {
                let result = self.with_con(|con, keys, _| load_session(con, &keys.session(&id)));
                self.outbox.reply(&self.redis.loops, to, Reply::Session(result));
            }
            Request::SaveSession { id, state } => {
                let per_subject = self.sessions_per_subject;
                if let Err(e) =
                    self.with_con(|con, keys, ttl| save_session(con, keys, &id, &state, (ttl.1, per_subject)))
                {
                    debug!("session {id} not saved: {e}");
                }
            }
            Request::Barrier { to } => {
                let msg = ToLoop::Barrier { conn: to.conn };
                self.outbox.send(&self.redis.loops, to.loop_id, msg);
            }
        }
    }

    /// Runs `f` on the connection, connecting first if needed (not more often than the
    /// backoff allows). A connection that fails gets one retry on a fresh connection: after a
    /// Redis restart the first request fails on the dead socket, and every request here is
    /// safe to repeat (reads, whole-session writes).
    fn with_con<T>(
        &mut self,
        mut f: impl FnMut(&mut Link, &super::Keys, (u64, u64)) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let ttls = (self.history_ttl, self.session_ttl);
        if let Some(con) = &mut self.con {
            match f(con, &self.redis.keys, ttls) {
                Ok(v) => return Ok(v),
                Err(e) if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) => {
                    return Err(format!("redis: {e}"));
                }
                Err(e) => {
                    debug!("redis request failed: {e}; retrying on a new connection");
                    self.con = None;
                    self.next_attempt = Instant::now();
                }
            }
        }
        // Within the backoff, fail fast, unless the subscriber has just reconnected: then
        // Redis is back and the client waiting for this answer should not wait out the backoff.
        let subscriber_up = self
            .redis
            .metrics
            .broker
            .subscriber_up
            .load(std::sync::atomic::Ordering::Relaxed);
        if Instant::now() < self.next_attempt && !subscriber_up {
            return Err("redis unreachable".into());
        }
        let scripts = vec![&*READ_SCRIPT, &*SAVE_SCRIPT, &*SUBJECT_SCRIPT];
        let mut con = match self.redis.backend.link(scripts) {
            Ok(c) => c,
            Err(e) => {
                self.next_attempt = Instant::now() + self.redis.backoff.next_delay();
                return Err(format!("redis unreachable: {e}"));
            }
        };
        self.redis.backoff.reset();
        let result = f(&mut con, &self.redis.keys, ttls).map_err(|e| format!("redis: {e}"));
        self.con = Some(con);
        result
    }
}

/// Reads the channel's position and history (after `since`, or its `newest` messages); with
/// `record`, stores the position in that session in the same script.
fn read_history(
    con: &mut Link,
    keys: &super::Keys,
    channel: &Channel,
    since: Option<u64>,
    newest: Option<usize>,
    (history_ttl, session_ttl): (u64, u64),
    record: Option<&SessionRecord>,
) -> redis::RedisResult<History> {
    let (start, count) = match (newest, since) {
        (Some(n), _) => ("newest".to_owned(), n.min(crate::recovery::PAGE_ENTRIES)),
        (None, Some(s)) => (format!("{}-0", s + 1), crate::recovery::PAGE_ENTRIES),
        (None, None) => (String::new(), crate::recovery::PAGE_ENTRIES),
    };
    let mut call = READ_SCRIPT.key(keys.meta(channel));
    call.key(keys.stream(channel))
        .arg(start)
        .arg(count)
        .arg(&*new_epoch())
        // A history created by a read (a subscribe to a channel nobody published to yet)
        // expires soon unless a publish follows: subscribing alone cannot fill Redis.
        .arg(history_ttl.min(CREATED_BY_READ_TTL));
    // In a cluster the session lives in another slot than the channel: it is written after
    // the read (before the answer, so still before anyone can see the position).
    let record_here = record.filter(|_| !keys.cluster);
    if let Some(r) = record_here {
        call.key(keys.session(&r.id))
            .arg(format!("{CHANNEL}{channel}"))
            .arg(session_ttl)
            .arg(subject_arg(r.subject.as_deref()));
    }
    let v: Value = call.invoke(con)?;
    let page = if newest.is_some() {
        crate::recovery::page_newest
    } else {
        crate::recovery::page
    };
    let history = parse_history(channel, &v).map(page).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected reply from the history script",
        ))
    })?;
    if let Some(r) = record.filter(|_| keys.cluster) {
        let key = keys.session(&r.id);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg(format!("{CHANNEL}{channel}"))
            .arg(format!("{} {}", history.top, history.epoch))
            .arg("v")
            .arg(1)
            .ignore();
        if let Some(subject) = &r.subject {
            pipe.cmd("HSET").arg(&key).arg(SUBJECT).arg(subject).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(session_ttl).ignore();
        pipe.query::<()>(con)?;
    }
    Ok(history)
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// `{top, epoch, [[id, [field, value, ...]], ...]}` into a [`History`].
fn parse_history(channel: &Channel, v: &Value) -> Option<History> {
    let Value::Array(parts) = v else { return None };
    let top: u64 = match parts.first()? {
        Value::Int(n) => u64::try_from(*n).ok()?,
        other => text(other)?.parse().ok()?,
    };
    let epoch: Arc<str> = text(parts.get(1)?)?.into();
    let Value::Array(raw) = parts.get(2)? else {
        return None;
    };
    let mut entries = Vec::with_capacity(raw.len());
    for e in raw {
        let Value::Array(e) = e else { return None };
        let offset: u64 = text(e.first()?)?.strip_suffix("-0")?.parse().ok()?;
        let Value::Array(fields) = e.get(1)? else {
            return None;
        };
        let (mut kind, mut data) = (Kind::Binary, None);
        for pair in fields.chunks(2) {
            match (text(&pair[0]), pair.get(1)) {
                (Some("k"), Some(k)) if text(k) == Some("t") => kind = Kind::Text,
                (Some("d"), Some(Value::BulkString(b))) => data = Some(bytes::Bytes::copy_from_slice(b)),
                _ => {}
            }
        }
        let data = data?;
        if kind == Kind::Text && std::str::from_utf8(&data).is_err() {
            kind = Kind::Binary;
        }
        let position = Position {
            offset,
            epoch: epoch.clone(),
        };
        entries.push(Delivery::new(channel.clone(), kind, data, Some(position)));
    }
    Some(History { epoch, top, entries })
}

fn load_session(con: &mut Link, key: &str) -> redis::RedisResult<Option<SessionState>> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query(con)?;
    if fields.is_empty() {
        return Ok(None);
    }
    let mut state = SessionState::default();
    for (field, value) in fields {
        if field == SUBJECT {
            state.subject = Some(value);
        } else if let Some(channel) = field.strip_prefix(CHANNEL) {
            let (offset, epoch) = value.split_once(' ').unwrap_or((value.as_str(), "-"));
            let offset = offset.parse().unwrap_or(0);
            let epoch = (epoch != "-").then(|| Arc::from(epoch));
            state.channels.push((Arc::from(channel), offset, epoch));
        }
    }
    // Hash order is arbitrary; keep resubscription order stable.
    state.channels.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(state))
}

/// The subject as the scripts take it: "" for none, else "=" and the subject (so that an
/// empty subject is still a subject).
fn subject_arg(subject: Option<&str>) -> String {
    subject.map(|s| format!("={s}")).unwrap_or_default()
}

/// Replaces the session (`save.lua`): positions not known yet keep the stored ones. A session
/// with a token subject is indexed under it, and the subject's sessions saved longest ago past
/// `per_subject` are deleted.
fn save_session(
    con: &mut Link,
    keys: &super::Keys,
    id: &str,
    state: &SessionState,
    (ttl, per_subject): (u64, usize),
) -> redis::RedisResult<()> {
    let mut call = SAVE_SCRIPT.key(keys.session(id));
    // In a cluster the subject's index is in another slot: updated by its own script below.
    if let Some(subject) = state.subject.as_ref().filter(|_| !keys.cluster) {
        call.key(keys.subject_sessions(subject));
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    call.arg(ttl)
        .arg(subject_arg(state.subject.as_deref()))
        .arg(per_subject)
        .arg(now_ms);
    for (channel, offset, epoch) in &state.channels {
        call.arg(format!("{CHANNEL}{channel}")).arg(
            epoch
                .as_ref()
                .map(|e| format!("{offset} {e}"))
                .unwrap_or_default(),
        );
    }
    let mut evicted: Vec<String> = call.invoke(con)?;
    if let Some(subject) = state.subject.as_ref().filter(|_| keys.cluster) {
        evicted = SUBJECT_SCRIPT
            .key(keys.subject_sessions(subject))
            .arg(ttl)
            .arg(per_subject)
            .arg(now_ms)
            .arg(keys.session(id))
            .invoke(con)?;
    }
    if !evicted.is_empty() {
        debug!("{} sessions of one subject evicted past its cap", evicted.len());
        if keys.cluster {
            // One key per DEL: the sessions are in different slots.
            let mut pipe = redis::pipe();
            for key in &evicted {
                pipe.cmd("DEL").arg(key).ignore();
            }
            pipe.query::<()>(con)?;
        } else {
            redis::cmd("DEL").arg(&evicted).query::<()>(con)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn history_reply_parses() {
        let v = Value::Array(vec![
            bulk("7"),
            bulk("ep"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("6-0"),
                    Value::Array(vec![bulk("k"), bulk("t"), bulk("d"), bulk("six")]),
                ]),
                Value::Array(vec![
                    bulk("7-0"),
                    Value::Array(vec![
                        bulk("k"),
                        bulk("b"),
                        bulk("d"),
                        Value::BulkString(vec![0xff]),
                    ]),
                ]),
            ]),
        ]);
        let h = parse_history(&Arc::from("c"), &v).unwrap();
        assert_eq!((h.top, &*h.epoch), (7, "ep"));
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].kind, Kind::Text);
        assert_eq!(&h.entries[0].data[..], b"six");
        assert_eq!(h.entries[1].position.as_ref().unwrap().offset, 7);
        assert_eq!(h.entries[1].kind, Kind::Binary);
        assert!(parse_history(&Arc::from("c"), &Value::Nil).is_none());
    }
}
