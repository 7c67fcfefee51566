//! The subscriber thread on a Redis Cluster (`--redis-cluster`): sharded Pub/Sub, one
//! connection per primary. Each channel is `SSUBSCRIBE`d (one channel, so one slot, per
//! command) on the primary that owns its slot, only while some local loop has members on it
//! (refcounted over loops through [`Routes`], as on one Redis); the control channel always.
//!
//! One thread owns every connection's state. Each connection also has a reader thread that
//! does nothing but parse what Redis sends and pass it on, in order, through one bounded queue;
//! this thread waits on that queue and on the loops' requests at once (`select!`), so a new
//! subscription reaches Redis at once and a message is routed as soon as it is read, whatever
//! the number of primaries. Commands are written here, and their answers matched in order to
//! what each connection was sent.
//!
//! A channel whose subscription ends other than by our request moves: `MOVED` (the slot map
//! was stale), a `sunsubscribe` Redis sends by itself (its slot was migrated away, or the node
//! was demoted by a failover), or its connection lost (the primary died: failover). The slot
//! map is then learned again (first from the node a `MOVED` named) and the channel subscribed
//! on its owner, but never again on the node it just left while the map still names that node
//! (right after a failover, a demoted node's map can be stale); the map is also learned again
//! every [`MAP_CHECK_EVERY`] in case a move went unannounced; once that owner confirms, the loops are told the channel may
//! have lost messages ([`Outbox::lost`], as after a reconnect to one Redis), so their
//! offset-tracking clients recover what was published in between from history. While a channel
//! has no reachable owner, its subscriptions are confirmed to loops at once, marked offline
//! (local delivery goes on; a raw connection is read only once the channel is subscribed again
//! and the `Lost` notice arrives, so nothing it sends is published before anyone could hear it),
//! and it is tried again on every refresh of the slot map (with the reconnect backoff).
//!
//! Health: up while every primary has a connection, every slot a primary and every wanted
//! channel a subscription; each connection is PINGed every [`PROBE_EVERY`] and dropped when
//! the previous PING is still unanswered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use log::{debug, info, warn};
use redis::Value;

use super::cluster::{Addr, Seeds, SlotMap, slot};
use super::subscriber::{PROBE_EVERY, received};
use super::{COMMAND_TIMEOUT, CONNECT_TIMEOUT, Shared};
use crate::bridge::{Channel, Control};
use crate::broker::{Outbox, Routes};
use crate::log_throttle::LogThrottle;
use crate::metrics::inc;

/// Longest wait for a request or a message before the periodic work (probes, refreshes).
const TICK: Duration = Duration::from_millis(10);
/// How often the slot map is learned again even when nothing said it changed: a backstop for
/// a move Redis did not announce to this connection (a notice lost with its connection, a
/// replica's stale map taken for the truth right after a failover).
const MAP_CHECK_EVERY: Duration = Duration::from_secs(10);
/// What the reader threads may have read and this thread not yet routed, in messages: past
/// it a reader stops reading, and Redis holds the rest (up to its Pub/Sub output limit).
const EVENTS: usize = 65_536;

/// A command sent on a connection, waiting for its answer.
#[derive(Debug)]
enum Sent {
    Subscribe(String),
    Unsubscribe(String),
    Ping,
}

/// One primary's Pub/Sub connection.
struct Link {
    id: u64,
    writer: TcpStream,
    sent: VecDeque<Sent>,
    /// When the last PING was sent, while it is unanswered.
    ping_out: Option<Instant>,
    /// Redis has answered on this connection. A new connection proves nothing: the kernel
    /// accepts connections for a Redis that answers nothing (stopped, stalled).
    answered: bool,
}

/// A channel subscribed (or being subscribed) on a primary.
struct Sub {
    addr: Addr,
    confirmed: bool,
}

pub(super) struct ShardSubscriber {
    redis: Shared,
    seeds: Seeds,
    control_channel: String,
    routes: Routes,
    outbox: Outbox,
    control: Receiver<Control>,
    events_tx: Sender<(u64, Result<Value, String>)>,
    events: Receiver<(u64, Result<Value, String>)>,
    drop_log: LogThrottle,
    map: SlotMap,
    links: HashMap<Addr, Link>,
    next_link: u64,
    /// Pub/Sub name → where it is subscribed.
    subs: HashMap<String, Sub>,
    /// Wanted names with no subscription (no reachable owner): tried again after a refresh.
    orphans: HashSet<String>,
    /// Loops waiting for a name's subscription to take effect.
    awaiting: HashMap<String, Vec<(usize, u64)>>,
    /// Names whose loops are told of possible losses once subscribed again.
    lost: HashSet<String>,
    /// The node each moving name left (its `sunsubscribe`, or `MOVED`): a slot map that still
    /// names it is stale, and is learned again before the name is subscribed there.
    left: HashMap<String, Addr>,
    /// The node the last `MOVED` named: asked first for the slot map.
    moved_to: Option<Addr>,
    next_map_check: Instant,
    refresh_due: bool,
    next_refresh: Instant,
    next_probe: Instant,
}

impl ShardSubscriber {
    pub(super) fn new(redis: Shared, seeds: Seeds, control: Receiver<Control>) -> Self {
        let (events_tx, events) = crossbeam_channel::bounded(EVENTS);
        let control_channel = redis.keys.control();
        let mut orphans = HashSet::new();
        orphans.insert(control_channel.clone());
        ShardSubscriber {
            redis,
            seeds,
            control_channel,
            routes: Routes::default(),
            outbox: Outbox::default(),
            control,
            events_tx,
            events,
            drop_log: LogThrottle::default(),
            map: SlotMap::default(),
            links: HashMap::new(),
            next_link: 0,
            subs: HashMap::new(),
            orphans,
            awaiting: HashMap::new(),
            lost: HashSet::new(),
            left: HashMap::new(),
            moved_to: None,
            next_map_check: Instant::now() + MAP_CHECK_EVERY,
            refresh_due: true,
            next_refresh: Instant::now(),
            next_probe: Instant::now(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let control = self.control.clone();
            let events = self.events.clone();
            crossbeam_channel::select! {
                recv(control) -> c => match c {
                    Ok(c) => self.request(c),
                    Err(_) => return self.stop(),
                },
                recv(events) -> e => {
                    let (id, e) = e.expect("this thread holds a sender");
                    self.event(id, e);
                }
                default(TICK) => {}
            }
            // Whatever else is waiting, before the periodic work.
            loop {
                match self.control.try_recv() {
                    Ok(c) => self.request(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.stop(),
                }
            }
            for _ in 0..1024 {
                match self.events.try_recv() {
                    Ok((id, e)) => self.event(id, e),
                    Err(_) => break,
                }
            }
            self.outbox.retry(&self.redis.loops);
            let now = Instant::now();
            if now >= self.next_map_check {
                self.next_map_check = now + MAP_CHECK_EVERY;
                self.refresh_due = true;
            }
            if self.refresh_due && now >= self.next_refresh {
                self.refresh();
            }
            if now >= self.next_probe {
                self.next_probe = now + PROBE_EVERY;
                self.probe();
            }
        }
    }

    fn stop(&mut self) {
        for (_, link) in self.links.drain() {
            let _ = link.writer.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether a Pub/Sub name is wanted: the control channel, or a channel a loop is on.
    fn wanted(&self, name: &str) -> bool {
        name == self.control_channel
            || self
                .redis
                .keys
                .channel_of(name)
                .is_some_and(|c| self.routes.contains(&c))
    }

    /// A loop's subscribe or unsubscribe.
    fn request(&mut self, c: Control) {
        let (channel, waiter) = self.routes.apply(c);
        let name = self.redis.keys.channel(&channel);
        let wanted = self.routes.contains(&channel);
        if let Some((loop_id, generation)) = waiter {
            match self.subs.get(&name) {
                Some(s) if s.confirmed => {
                    self.outbox
                        .confirm(&self.redis.loops, loop_id, channel.clone(), generation, false)
                }
                Some(_) => self
                    .awaiting
                    .entry(name.clone())
                    .or_default()
                    .push((loop_id, generation)),
                // Offline: live as soon as routed; recovered once subscribed (raw connections
                // are read from then on: the `Lost` notice sent after the SSUBSCRIBE says so).
                None if self.orphans.contains(&name) => {
                    self.outbox
                        .confirm(&self.redis.loops, loop_id, channel.clone(), generation, true)
                }
                None => self
                    .awaiting
                    .entry(name.clone())
                    .or_default()
                    .push((loop_id, generation)),
            }
        }
        if wanted && !self.subs.contains_key(&name) && !self.orphans.contains(&name) {
            self.subscribe(name);
        } else if !wanted {
            self.orphans.remove(&name);
            self.lost.remove(&name);
            self.left.remove(&name);
            if let Some(sub) = self.subs.remove(&name) {
                self.send(&sub.addr, Sent::Unsubscribe(name));
            }
        }
        self.redis
            .metrics
            .broker
            .channels
            .store(self.subs.len() as u64, Ordering::Relaxed);
    }

    /// SSUBSCRIBEs `name` on the owner of its slot, or makes it an orphan.
    fn subscribe(&mut self, name: String) {
        let Some(addr) = self.map.owner(slot(name.as_bytes())).cloned() else {
            return self.orphan(name, "no primary serves its slot");
        };
        if self.left.get(&name) == Some(&addr) {
            return self.orphan(name, "the slot map still names the node it left");
        }
        if !self.links.contains_key(&addr)
            && let Err(e) = self.open(&addr)
        {
            return self.orphan(name, &format!("cannot reach {}:{}: {e}", addr.0, addr.1));
        }
        self.subs.insert(
            name.clone(),
            Sub {
                addr: addr.clone(),
                confirmed: false,
            },
        );
        self.send(&addr, Sent::Subscribe(name));
    }

    /// `name` has no subscription for now: its waiting loops are confirmed (local delivery goes
    /// on), it is told of losses once subscribed, and tried again after a refresh.
    fn orphan(&mut self, name: String, why: &str) {
        debug!("redis cluster: {name:?} not subscribed for now: {why}");
        self.subs.remove(&name);
        self.confirm_waiters(&name, true);
        self.lost.insert(name.clone());
        self.orphans.insert(name);
        self.refresh_due = true;
        self.redis
            .metrics
            .broker
            .subscriber_up
            .store(false, Ordering::Relaxed);
    }

    /// Confirms the loops waiting for `name`; `offline` when it is not subscribed (a `Lost`
    /// notice follows once it is).
    fn confirm_waiters(&mut self, name: &str, offline: bool) {
        let Some(waiters) = self.awaiting.remove(name) else {
            return;
        };
        let Some(channel) = self.redis.keys.channel_of(name) else {
            return;
        };
        let channel: Channel = channel.as_ref().into();
        for (loop_id, generation) in waiters {
            self.outbox
                .confirm(&self.redis.loops, loop_id, channel.clone(), generation, offline);
        }
    }

    /// Writes a command on the connection to `addr`; a failed write drops the connection.
    fn send(&mut self, addr: &Addr, what: Sent) {
        let Some(link) = self.links.get_mut(addr) else {
            if let Sent::Subscribe(name) = what {
                self.orphan(name, "no connection");
            }
            return;
        };
        let packed = match &what {
            Sent::Subscribe(n) => redis::cmd("SSUBSCRIBE").arg(n).get_packed_command(),
            Sent::Unsubscribe(n) => redis::cmd("SUNSUBSCRIBE").arg(n).get_packed_command(),
            Sent::Ping => redis::cmd("PING").get_packed_command(),
        };
        match link.writer.write_all(&packed) {
            Ok(()) => link.sent.push_back(what),
            Err(e) => {
                let addr = addr.clone();
                if let Sent::Subscribe(name) = what {
                    self.subs.remove(&name);
                    self.lost.insert(name.clone());
                    self.orphans.insert(name);
                }
                self.drop_link(&addr, &e.to_string());
            }
        }
    }

    /// Opens the Pub/Sub connection to `addr` and starts its reader thread.
    fn open(&mut self, addr: &Addr) -> std::io::Result<()> {
        let target = (addr.0.as_str(), addr.1)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let mut parser = redis::Parser::new();
        if let Some(auth) = super::resp::auth_command(&self.seeds.info(addr)) {
            (&stream).write_all(&auth)?;
            match parser.parse_value(&stream) {
                Ok(Value::Okay) | Ok(Value::SimpleString(_)) => {}
                Ok(v) => return Err(std::io::Error::other(format!("AUTH refused: {v:?}"))),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        stream.set_read_timeout(None)?;
        let reader = stream.try_clone()?;
        let id = self.next_link;
        self.next_link += 1;
        let tx = self.events_tx.clone();
        std::thread::Builder::new()
            .name("wsrelay-redis-shard".into())
            .spawn(move || read_loop(id, reader, parser, tx))?;
        self.links.insert(
            addr.clone(),
            Link {
                id,
                writer: stream,
                sent: VecDeque::new(),
                ping_out: None,
                answered: false,
            },
        );
        Ok(())
    }

    /// Drops the connection to `addr`: its channels are subscribed again elsewhere (after a
    /// refresh) and their loops told of possible losses then.
    fn drop_link(&mut self, addr: &Addr, why: &str) {
        let Some(link) = self.links.remove(addr) else {
            return;
        };
        let _ = link.writer.shutdown(std::net::Shutdown::Both);
        warn!(
            "redis cluster Pub/Sub connection to {}:{} lost: {why}; local delivery continues, its channels move to the slots' owner and offset-tracking clients recover what they missed",
            addr.0, addr.1
        );
        inc(&self.redis.metrics.broker.redis_reconnects);
        let names: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.addr == *addr)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.orphan(name, why);
        }
    }

    /// What a reader thread read, or why it stopped.
    fn event(&mut self, id: u64, e: Result<Value, String>) {
        let Some(addr) = self
            .links
            .iter()
            .find(|(_, l)| l.id == id)
            .map(|(a, _)| a.clone())
        else {
            return; // a connection already dropped
        };
        let v = match e {
            Ok(v) => v,
            Err(why) => return self.drop_link(&addr, &why),
        };
        let items = match v {
            Value::Array(items) => items,
            Value::Push { data, .. } => data,
            Value::SimpleString(s) if s == "PONG" => return self.answered(&addr, "pong", None),
            Value::ServerError(e) => return self.refused(&addr, &e),
            other => return debug!("redis cluster: unexpected {other:?} on a Pub/Sub connection"),
        };
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
            Some(Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        };
        let kind = text(items.first()).unwrap_or_default().to_ascii_lowercase();
        match kind.as_str() {
            "smessage" | "message" => {
                let (Some(name), Some(Value::BulkString(payload))) = (text(items.get(1)), items.get(2))
                else {
                    return;
                };
                received(
                    &self.redis,
                    &self.routes,
                    &mut self.outbox,
                    &mut self.drop_log,
                    &self.control_channel,
                    &name,
                    payload,
                );
            }
            "ssubscribe" | "sunsubscribe" | "pong" => {
                let name = text(items.get(1));
                self.answered(&addr, &kind, name);
            }
            _ => debug!("redis cluster: unexpected {kind:?} on a Pub/Sub connection"),
        }
    }

    /// An answer (or, for `sunsubscribe`, perhaps a notice) on the connection to `addr`.
    fn answered(&mut self, addr: &Addr, kind: &str, name: Option<String>) {
        let link = self.links.get_mut(addr).expect("event of a live link");
        link.answered = true;
        let ours = match (link.sent.front(), kind, &name) {
            (Some(Sent::Subscribe(n)), "ssubscribe", Some(m)) => n == m,
            (Some(Sent::Unsubscribe(n)), "sunsubscribe", Some(m)) => n == m,
            (Some(Sent::Ping), "pong", _) => true,
            _ => false,
        };
        if !ours {
            if kind == "sunsubscribe"
                && let Some(name) = name
            {
                // Redis ended the subscription itself: the slot was migrated away, or the node
                // is no longer its primary.
                if self.subs.get(&name).is_some_and(|s| s.addr == *addr) && self.wanted(&name) {
                    info!(
                        "redis cluster: {name:?} left {}:{} (its slot moved: migrated, or a failover); subscribing on its owner",
                        addr.0, addr.1
                    );
                    self.left.insert(name.clone(), addr.clone());
                    self.orphan(name, "its slot moved");
                }
            }
            return;
        }
        match link.sent.pop_front() {
            Some(Sent::Ping) => link.ping_out = None,
            Some(Sent::Subscribe(name)) => {
                if let Some(s) = self.subs.get_mut(&name) {
                    s.confirmed = true;
                }
                self.left.remove(&name);
                self.confirm_waiters(&name, false);
                if self.lost.remove(&name)
                    && let Some(channel) = self.redis.keys.channel_of(&name)
                {
                    let channel: Channel = channel.as_ref().into();
                    for &loop_id in self.routes.loops(&channel) {
                        self.outbox.lost(loop_id, channel.clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// An error answer: to the oldest command sent on the connection.
    fn refused(&mut self, addr: &Addr, e: &redis::ServerError) {
        let link = self.links.get_mut(addr).expect("event of a live link");
        link.answered = true;
        match link.sent.pop_front() {
            Some(Sent::Subscribe(name)) => {
                // MOVED (a stale slot map) or CLUSTERDOWN: subscribe again after a refresh.
                let why = format!("{} {}", e.code(), e.details().unwrap_or(""));
                if self.subs.get(&name).is_some_and(|s| s.addr == *addr) {
                    if let Some(super::cluster::Redirect::Moved(to)) =
                        super::cluster::redirection(&Value::ServerError(e.clone()))
                    {
                        self.left.insert(name.clone(), addr.clone());
                        self.moved_to = Some(to);
                    }
                    self.orphan(name, &why);
                }
            }
            Some(Sent::Ping) => link.ping_out = None,
            other => debug!("redis cluster: {other:?} refused: {e:?}"),
        }
    }

    /// Learns the slot map again; connects to every primary; subscribes the orphans and the
    /// channels whose slot moved. On failure, tries again after the reconnect backoff.
    fn refresh(&mut self) {
        let mut known: Vec<Addr> = self.moved_to.take().into_iter().collect();
        known.extend(self.map.primaries().iter().cloned());
        match self.seeds.slot_map(&known) {
            Ok(map) => self.map = map,
            Err(e) => {
                debug!("redis cluster slot map not refreshed: {e}");
                self.next_refresh = Instant::now() + self.redis.backoff.next_delay();
                return;
            }
        }
        self.refresh_due = false;
        // Connections to nodes that no longer serve slots go.
        let gone: Vec<Addr> = self
            .links
            .keys()
            .filter(|a| !self.map.primaries().contains(a))
            .cloned()
            .collect();
        for addr in gone {
            self.drop_link(&addr, "no longer a primary");
        }
        for addr in self.map.primaries().to_vec() {
            if !self.links.contains_key(&addr)
                && let Err(e) = self.open(&addr)
            {
                debug!("redis cluster: cannot reach {}:{}: {e}", addr.0, addr.1);
                self.refresh_due = true;
            }
        }
        // Subscriptions on a node that no longer owns their slot move (Redis usually says so
        // itself with a sunsubscribe; this covers a notice lost with its connection).
        let moved: Vec<String> = self
            .subs
            .iter()
            .filter(|(n, s)| self.map.owner(slot(n.as_bytes())) != Some(&s.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for name in moved {
            if let Some(sub) = self.subs.remove(&name) {
                self.send(&sub.addr, Sent::Unsubscribe(name.clone()));
            }
            self.lost.insert(name.clone());
            self.orphans.insert(name);
        }
        for name in std::mem::take(&mut self.orphans) {
            if self.wanted(&name) {
                self.subscribe(name);
            } else {
                self.lost.remove(&name);
            }
        }
        if self.refresh_due {
            self.next_refresh = Instant::now() + self.redis.backoff.next_delay();
        } else {
            self.redis.backoff.reset();
            self.update_health();
        }
    }

    /// PINGs every connection; one whose last PING is still unanswered is dropped.
    fn probe(&mut self) {
        let stalled: Vec<Addr> = self
            .links
            .iter()
            .filter(|(_, l)| l.ping_out.is_some_and(|t| t.elapsed() >= COMMAND_TIMEOUT))
            .map(|(a, _)| a.clone())
            .collect();
        for addr in stalled {
            self.drop_link(&addr, "no answer to PING");
            self.refresh_due = true;
        }
        let addrs: Vec<Addr> = self
            .links
            .iter()
            .filter(|(_, l)| l.ping_out.is_none())
            .map(|(a, _)| a.clone())
            .collect();
        for addr in addrs {
            if let Some(l) = self.links.get_mut(&addr) {
                l.ping_out = Some(Instant::now());
            }
            self.send(&addr, Sent::Ping);
        }
        self.update_health();
    }

    /// Up while every slot has a primary, every primary a connection that has answered and
    /// answers PINGs, and every wanted channel a subscription.
    fn update_health(&mut self) {
        let up = self.map.complete()
            && self.orphans.is_empty()
            && !self.refresh_due
            && self.map.primaries().iter().all(|a| {
                self.links
                    .get(a)
                    .is_some_and(|l| l.answered && l.ping_out.is_none_or(|t| t.elapsed() < PROBE_EVERY * 2))
            });
        let broker = &self.redis.metrics.broker;
        broker.subscriber_up.store(up, Ordering::Relaxed);
        if up {
            broker.probe_ok(PROBE_EVERY);
        }
    }
}

/// A connection's reader thread: parses what Redis sends and passes it on, until the
/// connection ends (then says why) or this side stops listening.
fn read_loop(
    id: u64,
    stream: TcpStream,
    mut parser: redis::Parser,
    tx: Sender<(u64, Result<Value, String>)>,
) {
    let mut reader = std::io::BufReader::with_capacity(64 << 10, stream);
    loop {
        match parser.parse_value(&mut reader) {
            Ok(v) => {
                if tx.send((id, Ok(v))).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send((id, Err(e.to_string())));
                return;
            }
        }
    }
}
