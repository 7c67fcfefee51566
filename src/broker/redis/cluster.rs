//! Redis Cluster routing (`--redis-cluster`): which primary owns a key's slot, the connections
//! to the primaries, and the redirections of a cluster (`MOVED`, `ASK`, `TRYAGAIN`,
//! `CLUSTERDOWN`). No thread of its own: every Redis thread holds its own [`Router`] (its own
//! connections and its own copy of the slot map, refreshed when Redis says it is stale), as it
//! held its own connection to one Redis.
//!
//! A [`Router`] is a [`redis::ConnectionLike`]: `cmd(..).query(&mut router)`, scripts and
//! pipelines run on it unchanged. Each command of a pipeline goes to the owner of its key's
//! slot (the pipeline is split per primary, sent to every primary before any answer is read,
//! and the answers are put back in order). A command refused with `MOVED` (the slot map was
//! stale) or `ASK` (its slot is being migrated) did not run: it is sent again to the node
//! named, after a refresh of the slot map for `MOVED`; `TRYAGAIN` and `CLUSTERDOWN` (a
//! migration or a failover under way) are retried after a short pause. At most
//! [`ATTEMPTS`] times: then Redis's refusal is the answer.
//!
//! What a connection lost with commands unanswered did is unknown. [`Router::run`] says so per
//! command ([`Outcome::Unknown`]) and the caller decides: the request and nodes threads repeat
//! them (reads and whole-value writes), the publisher does not (a publish applied twice would
//! be delivered twice under two offsets).
//!
//! Each connection knows the replication ids of its node (`INFO replication`), read when it
//! is opened and after each refresh of the slot map: arguments equal to [`REPLID`] and
//! [`REPLID2`] are replaced by them when a command is sent, so a script knows whether the
//! primary running it was promoted from a replica of the node that last wrote a key (see
//! `publish.lua`: its history may have lost that node's last writes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use redis::{ConnectionAddr, ConnectionInfo, Value};

use super::{COMMAND_TIMEOUT, CONNECT_TIMEOUT};

/// Slots of a Redis Cluster.
pub const SLOTS: usize = 16384;
/// Most times one command is sent (redirections and retries included).
pub const ATTEMPTS: usize = 6;
/// Pause before a command refused with `TRYAGAIN` or `CLUSTERDOWN` is sent again (doubled on
/// each retry: 25, 50, 100, 200, 400 ms, about the time a failover with a short
/// `cluster-node-timeout` takes to be agreed).
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// A primary's connection unused this long is checked with a PING before a batch is sent on it.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Shortest time between two refreshes of the slot map forced by errors (a dead primary makes
/// every command fail; one refresh per this is enough).
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// How long a primary that did not answer in time (paused, overloaded, cut off) is skipped
/// before it is tried again: commands for its slots are not sent meanwhile (they count as not
/// sent: the publisher delivers them locally) instead of each batch waiting out the command
/// timeout on it while the other primaries' work waits too. Doubled on each new timeout, up to
/// [`SUSPECT_MAX`]; forgotten at its first answer or when it stops being a primary.
const SUSPECT_FIRST: Duration = Duration::from_secs(1);
/// Longest time a primary that keeps not answering is skipped between two tries.
const SUSPECT_MAX: Duration = Duration::from_secs(16);

/// An argument replaced by the replication id of the node a command is sent to.
pub const REPLID: &[u8] = b"\0wsrelay-replid";
/// An argument replaced by the secondary replication id of the node a command is sent to (the
/// replication id of the primary it replicated before it was promoted).
pub const REPLID2: &[u8] = b"\0wsrelay-replid2";

/// CRC16 (XMODEM) as Redis Cluster computes it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or shard channel: of its hash tag (the text between the first `{` and the
/// next `}`, when not empty), else of the whole name.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// `name` with no braces, reversibly: `%` is written `%25`, `{` `%7B` and `}` `%7D`. A channel's
/// name in a cluster is this encoding of prefix and channel, so that its keys can carry it whole
/// as their hash tag: with a brace in it, a channel could otherwise choose the tag (and so the
/// slot) of another channel's keys, or split its own keys over two slots.
pub fn encode_name(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains(['%', '{', '}']) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out.into()
}

/// The inverse of [`encode_name`] (`None` for a name it cannot have made).
pub fn decode_name(name: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !name.contains('%') {
        return (!name.contains(['{', '}'])).then_some(name.into());
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let c = match rest.get(i + 1..i + 3)? {
            "25" => '%',
            "7B" => '{',
            "7D" => '}',
            _ => return None,
        };
        out.push(c);
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty() && encode_name(&out) == name).then_some(out.into())
}

/// A node's address as the cluster names it.
pub type Addr = (String, u16);

/// Which primary owns each slot.
#[derive(Clone, Debug, Default)]
pub struct SlotMap {
    /// Index into `primaries` per slot; `u16::MAX` when no node serves the slot.
    owner: Vec<u16>,
    primaries: Vec<Addr>,
}

impl SlotMap {
    /// The primary serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<&Addr> {
        let i = *self.owner.get(usize::from(slot))?;
        self.primaries.get(usize::from(i))
    }

    /// Every primary that serves at least one slot.
    pub fn primaries(&self) -> &[Addr] {
        &self.primaries
    }

    /// True when every slot has a primary.
    pub fn complete(&self) -> bool {
        self.owner.len() == SLOTS && self.owner.iter().all(|&i| i != u16::MAX)
    }

    /// Parses a `CLUSTER SLOTS` answer. `asked` names the node that answered (a node may leave
    /// its own host empty).
    fn parse(v: &Value, asked: &str) -> Option<SlotMap> {
        let Value::Array(ranges) = v else { return None };
        let mut map = SlotMap {
            owner: vec![u16::MAX; SLOTS],
            primaries: Vec::new(),
        };
        for r in ranges {
            let Value::Array(r) = r else { return None };
            let int = |v: &Value| match v {
                Value::Int(n) => usize::try_from(*n).ok(),
                _ => None,
            };
            let (start, end) = (int(r.first()?)?, int(r.get(1)?)?);
            let Value::Array(node) = r.get(2)? else {
                return None;
            };
            let host = match node.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" {
                asked.to_owned()
            } else {
                host
            };
            let port = u16::try_from(int(node.get(1)?)?).ok()?;
            let addr = (host, port);
            let index = match map.primaries.iter().position(|a| *a == addr) {
                Some(i) => i,
                None => {
                    map.primaries.push(addr);
                    map.primaries.len() - 1
                }
            };
            for s in start..=end.min(SLOTS - 1) {
                map.owner[s] = index as u16;
            }
        }
        Some(map)
    }
}

/// Where the cluster is and how to log in: the seed nodes of `--redis-cluster`, with the
/// credentials and TCP settings every node connection uses.
#[derive(Clone, Debug)]
pub struct Seeds {
    infos: Vec<ConnectionInfo>,
}

impl Seeds {
    /// Parses `redis://[[user]:password@]host:port` URLs, separated by commas. Every node is
    /// reached with the first URL's credentials.
    pub fn parse(urls: &str) -> Result<Seeds, String> {
        let mut infos = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            // As errors show it (without its password).
            let shown = crate::config::redact_url(url);
            let invalid = |e: redis::RedisError| format!("invalid Redis Cluster seed URL {shown:?}: {e}");
            let info = redis::IntoConnectionInfo::into_connection_info(url)
                .map_err(invalid)?
                .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
            match info.addr() {
                ConnectionAddr::Tcp(..) => {}
                _ => return Err(format!("Redis Cluster seed {shown:?} must be redis://host:port")),
            }
            if info.redis_settings().db() != 0 {
                return Err(format!(
                    "Redis Cluster seed {shown:?} names a database: a cluster has only 0"
                ));
            }
            infos.push(info);
        }
        if infos.is_empty() {
            return Err("--redis-cluster names no seed node".into());
        }
        Ok(Seeds { infos })
    }

    /// The seed nodes' addresses.
    pub fn addrs(&self) -> Vec<Addr> {
        self.infos
            .iter()
            .filter_map(|i| match i.addr() {
                ConnectionAddr::Tcp(h, p) => Some((h.clone(), *p)),
                _ => None,
            })
            .collect()
    }

    /// Connection settings for the node at `addr`.
    pub fn info(&self, addr: &Addr) -> ConnectionInfo {
        self.infos[0]
            .clone()
            .set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1))
    }

    /// A command connection to `addr`, with timeouts so a stalled node cannot hang a thread.
    pub fn connect(&self, addr: &Addr) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.info(addr))?;
        let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        con.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        con.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok(con)
    }

    /// The slot map, asked of the nodes of `known` first, then of the seeds. A map that leaves
    /// slots unserved is taken only when no node has a complete one.
    pub fn slot_map(&self, known: &[Addr]) -> redis::RedisResult<SlotMap> {
        let mut candidates: Vec<Addr> = known.to_vec();
        for a in self.addrs() {
            if !candidates.contains(&a) {
                candidates.push(a);
            }
        }
        let mut partial = None;
        let mut last_err = None;
        for addr in &candidates {
            let map = self.connect(addr).and_then(|mut con| {
                let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con)?;
                SlotMap::parse(&v, &addr.0).ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS answer"))
                })
            });
            match map {
                Ok(m) if m.complete() => return Ok(m),
                Ok(m) => partial = partial.or(Some(m)),
                Err(e) => last_err = Some(e),
            }
        }
        match (partial, last_err) {
            (Some(m), _) => Ok(m),
            (None, Some(e)) => Err(e),
            (None, None) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no cluster node answers",
            ))),
        }
    }
}

/// A connection to one node and what it was told about itself.
struct NodeCon {
    con: redis::Connection,
    replid: Vec<u8>,
    replid2: Vec<u8>,
    /// When a batch was last sent on it.
    used: Instant,
}

/// Where a command goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// The owner of this slot.
    Slot(u16),
    /// Any primary (a command without keys).
    Any,
    /// Every primary (`SCRIPT LOAD`): the first answer is returned.
    All,
}

/// The commands of one node in a round of [`Router::run`], in order: (command index, sent
/// after ASKING).
type Group = (Addr, Vec<(usize, bool)>);

/// The state of [`Router::run`] between rounds.
struct Round {
    /// What became of each command, once decided.
    outcomes: Vec<Option<Outcome>>,
    /// Commands for the next round: (command index, the node a redirection named and whether
    /// it was an ASK).
    todo: Vec<(usize, Option<(Addr, bool)>)>,
    /// Learn the slot map again before the next round.
    refresh: bool,
    /// Pause before the next round (TRYAGAIN, CLUSTERDOWN).
    wait: bool,
}

/// What became of one command sent by [`Router::run`].
#[derive(Debug)]
pub enum Outcome {
    /// Redis answered (possibly with an error: a refusal, or a redirection past [`ATTEMPTS`]).
    Answer(Value),
    /// Sent, but the connection was lost before the answer: it may or may not have run.
    Unknown(String),
    /// Never reached a node (none serves its slot, or the owner cannot be reached): it did not
    /// run.
    NotSent(String),
}

/// Routes commands to the primaries of a cluster (see the module documentation).
pub struct Router {
    seeds: Seeds,
    map: SlotMap,
    cons: HashMap<Addr, NodeCon>,
    /// Scripts loaded on every new connection (so that EVALSHA finds them).
    scripts: Vec<&'static redis::Script>,
    last_refresh: Option<Instant>,
    /// Primaries that did not answer in time: (skipped until, the next skip's length).
    suspects: HashMap<Addr, (Instant, Duration)>,
    /// The node the last `MOVED` named, asked first at the next refresh.
    moved_to: Option<Addr>,
}

impl Router {
    /// A router that loads `scripts` on each node it connects to. Learns the slot map first.
    pub fn new(seeds: Seeds, scripts: Vec<&'static redis::Script>) -> redis::RedisResult<Router> {
        let mut r = Router {
            seeds,
            map: SlotMap::default(),
            cons: HashMap::new(),
            scripts,
            last_refresh: None,
            suspects: HashMap::new(),
            moved_to: None,
        };
        r.refresh()?;
        Ok(r)
    }

    /// The current slot map.
    pub fn map(&self) -> &SlotMap {
        &self.map
    }

    /// The seeds this router was made from.
    pub fn seeds(&self) -> &Seeds {
        &self.seeds
    }

    /// Learns the slot map again, closes the connections to nodes that are no longer primaries
    /// and reads the replication ids of the others again (a node may have been promoted).
    pub fn refresh(&mut self) -> redis::RedisResult<()> {
        self.last_refresh = Some(Instant::now());
        // A node a MOVED named first: it took the slot over, so it knows.
        let mut known: Vec<Addr> = self.moved_to.take().into_iter().collect();
        known.extend(self.map.primaries().iter().cloned());
        let map = self.seeds.slot_map(&known)?;
        self.cons.retain(|a, _| map.primaries().contains(a));
        self.suspects.retain(|a, _| map.primaries().contains(a));
        let stale: Vec<Addr> = self
            .cons
            .iter_mut()
            .filter_map(|(a, c)| read_replids(c).err().map(|_| a.clone()))
            .collect();
        for a in stale {
            self.cons.remove(&a);
        }
        if map.primaries() != self.map.primaries() {
            info!(
                "redis cluster: {} primaries serve the slots",
                map.primaries().len()
            );
        }
        self.map = map;
        Ok(())
    }

    /// Refreshes the slot map unless it was refreshed within [`REFRESH_GAP`].
    fn refresh_soon(&mut self) {
        if self.last_refresh.is_some_and(|t| t.elapsed() < REFRESH_GAP) {
            return;
        }
        if let Err(e) = self.refresh() {
            debug!("redis cluster slot map not refreshed: {e}");
        }
    }

    /// The connection to `addr`, opened (and its scripts loaded) if needed.
    fn node(&mut self, addr: &Addr) -> redis::RedisResult<&mut NodeCon> {
        if !self.cons.contains_key(addr) {
            let con = self.seeds.connect(addr)?;
            let mut node = NodeCon {
                con,
                replid: Vec::new(),
                replid2: Vec::new(),
                used: Instant::now(),
            };
            read_replids(&mut node)?;
            for s in &self.scripts {
                s.prepare_invoke().load(&mut node.con)?;
            }
            self.cons.insert(addr.clone(), node);
        }
        Ok(self.cons.get_mut(addr).expect("inserted above"))
    }

    /// Whether the open connection to `addr`, unused for [`IDLE_CHECK`] or longer, no longer
    /// answers a PING: its primary died (or stalls) meanwhile. A batch written into a
    /// connection its primary closed would end "outcome unknown" although it never ran.
    fn went_away(&mut self, addr: &Addr) -> bool {
        let Some(n) = self.cons.get_mut(addr) else {
            return false;
        };
        if n.used.elapsed() < IDLE_CHECK {
            return false;
        }
        match redis::cmd("PING").query::<Value>(&mut n.con) {
            Ok(_) => {
                n.used = Instant::now();
                false
            }
            Err(e) => {
                debug!("redis cluster connection to {}:{} went away: {e}", addr.0, addr.1);
                if e.is_timeout() {
                    self.suspect(addr);
                }
                true
            }
        }
    }

    /// Drops the connection to `addr` (after an I/O error).
    fn drop_node(&mut self, addr: &Addr) {
        self.cons.remove(addr);
    }

    /// Runs `commands` (each one command's arguments), each on the primary that owns its
    /// key's slot, following redirections. Commands for one primary are pipelined in order;
    /// every primary gets its share before any answer is read. Answers come back in the order
    /// of `commands`.
    pub fn run(&mut self, commands: &[Vec<&[u8]>]) -> Vec<Outcome> {
        let mut round = Round {
            outcomes: (0..commands.len()).map(|_| None).collect(),
            todo: (0..commands.len()).map(|i| (i, None)).collect(),
            refresh: false,
            wait: false,
        };
        let mut pause = RETRY_PAUSE;
        for attempt in 0..ATTEMPTS {
            if round.todo.is_empty() {
                break;
            }
            let groups = self.group(commands, &mut round);
            for (addr, group) in self.send(commands, groups, &mut round) {
                self.read(&addr, group, attempt + 1 == ATTEMPTS, &mut round);
            }
            // Keep the order of the retried commands.
            round.todo.sort_by_key(|(i, _)| *i);
            if round.wait && !round.todo.is_empty() {
                std::thread::sleep(pause);
                pause *= 2;
            }
            if round.refresh {
                self.refresh_soon();
            }
            (round.refresh, round.wait) = (false, false);
        }
        round
            .outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::NotSent("not attempted".into())))
            .collect()
    }

    /// The commands of this round per node, in order; keyless commands for every primary are
    /// run here, and those whose slot has no primary are decided (not sent).
    fn group(&mut self, commands: &[Vec<&[u8]>], round: &mut Round) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        let mut push = |addr: Addr, i: usize, asking: bool| match groups.iter_mut().find(|(a, _)| *a == addr)
        {
            Some((_, g)) => g.push((i, asking)),
            None => groups.push((addr, vec![(i, asking)])),
        };
        let mut all = Vec::new();
        for (i, to) in round.todo.drain(..) {
            if let Some((addr, asking)) = to {
                push(addr, i, asking);
                continue;
            }
            match target(&commands[i]) {
                Target::Slot(s) => match self.map.owner(s) {
                    Some(a) if self.skipped(a) => {
                        // It may have been failed over meanwhile.
                        round.refresh = true;
                        round.outcomes[i] = Some(Outcome::NotSent(format!(
                            "redis cluster primary {}:{} did not answer in time; skipped for now",
                            a.0, a.1
                        )));
                    }
                    Some(a) => push(a.clone(), i, false),
                    None => {
                        round.refresh = true;
                        round.outcomes[i] =
                            Some(Outcome::NotSent(format!("no redis cluster node serves slot {s}")));
                    }
                },
                Target::Any => match self.map.primaries().first() {
                    Some(a) => push(a.clone(), i, false),
                    None => {
                        round.outcomes[i] = Some(Outcome::NotSent("no redis cluster primary known".into()))
                    }
                },
                Target::All => all.push(i),
            }
        }
        for i in all {
            round.outcomes[i] = Some(self.on_every_primary(&commands[i]));
        }
        groups
    }

    /// Writes every group's pipeline to its node; returns the groups sent. A group whose node
    /// cannot be reached is decided: not sent when the connection could not be opened, outcome
    /// unknown when a write on an open one failed (part of it may have gone).
    fn send(&mut self, commands: &[Vec<&[u8]>], groups: Vec<Group>, round: &mut Round) -> Vec<Group> {
        let mut sent = Vec::new();
        for (addr, group) in groups {
            if self.went_away(&addr) {
                // Nothing was sent: these go to the slot's owner after a refresh.
                self.drop_node(&addr);
                round.refresh = true;
                round.todo.extend(group.into_iter().map(|(i, _)| (i, None)));
                continue;
            }
            let packed = self.pack(&addr, commands, &group);
            match packed.and_then(|p| self.node(&addr).and_then(|n| n.con.send_packed_command(&p))) {
                Ok(()) => {
                    if let Some(n) = self.cons.get_mut(&addr) {
                        n.used = Instant::now();
                    }
                    sent.push((addr, group));
                }
                Err(e) => {
                    let unknown = self.cons.contains_key(&addr);
                    if e.is_timeout() {
                        self.suspect(&addr);
                    }
                    self.drop_node(&addr);
                    // A primary that cannot be reached may have been replaced.
                    round.refresh = true;
                    for (i, _) in group {
                        round.outcomes[i] = Some(if unknown {
                            Outcome::Unknown(e.to_string())
                        } else {
                            Outcome::NotSent(e.to_string())
                        });
                    }
                }
            }
        }
        sent
    }

    /// Reads a sent group's answers, in order: each one decides its command, or sends it to
    /// the next round (a redirection, unless this is the `last` round). A lost connection
    /// leaves the rest of the group unknown.
    fn read(&mut self, addr: &Addr, group: Vec<(usize, bool)>, last: bool, round: &mut Round) {
        for (n, &(i, asking)) in group.iter().enumerate() {
            let con = &mut self.cons.get_mut(addr).expect("sent on it").con;
            let answer = if asking {
                con.recv_response().and_then(|_| con.recv_response())
            } else {
                con.recv_response()
            };
            let v = match answer {
                Ok(v) => v,
                Err(e) => {
                    for &(j, _) in &group[n..] {
                        round.outcomes[j] = Some(Outcome::Unknown(e.to_string()));
                    }
                    if e.is_timeout() {
                        self.suspect(addr);
                    }
                    self.drop_node(addr);
                    round.refresh = true;
                    return;
                }
            };
            match redirection(&v) {
                // Sent where Redis says at once (the refreshed map may still be stale: the
                // node asked may not know of a failover yet).
                Some(Redirect::Moved(to)) if !last => {
                    round.refresh = true;
                    self.moved_to = Some(to.clone());
                    round.todo.push((i, Some((to, false))));
                }
                Some(Redirect::Ask(to)) if !last => round.todo.push((i, Some((to, true)))),
                Some(Redirect::Wait) if !last => {
                    (round.refresh, round.wait) = (true, true);
                    round.todo.push((i, None));
                }
                Some(Redirect::NoScript) if !last => {
                    // The node lost the scripts (restart, SCRIPT FLUSH): load them again.
                    for s in &self.scripts {
                        let _ = s.prepare_invoke().load(con);
                    }
                    round.todo.push((i, None));
                }
                _ => round.outcomes[i] = Some(Outcome::Answer(v)),
            }
        }
        if !self.suspects.is_empty() {
            self.suspects.remove(addr);
        }
    }

    /// Whether `addr` is skipped for now (see [`SUSPECT_FIRST`]).
    fn skipped(&self, addr: &Addr) -> bool {
        self.suspects
            .get(addr)
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// `addr` did not answer in time: skipped for a while, longer each time.
    fn suspect(&mut self, addr: &Addr) {
        let (until, next) = self
            .suspects
            .entry(addr.clone())
            .or_insert((Instant::now(), SUSPECT_FIRST));
        *until = Instant::now() + *next;
        warn!(
            "redis cluster primary {}:{} did not answer in time: its slots are skipped for {:?}",
            addr.0, addr.1, *next
        );
        *next = (*next * 2).min(SUSPECT_MAX);
    }

    /// A keyless command on every primary: the first answer, or the first failure.
    fn on_every_primary(&mut self, command: &[&[u8]]) -> Outcome {
        let mut first = None;
        for addr in self.map.primaries().to_vec() {
            let mut cmd = redis::cmd(std::str::from_utf8(command[0]).unwrap_or("PING"));
            for a in &command[1..] {
                cmd.arg(*a);
            }
            let r: redis::RedisResult<Value> = self.node(&addr).and_then(|n| cmd.query(&mut n.con));
            let o = match r {
                Ok(v) => Outcome::Answer(v),
                Err(e) => {
                    self.drop_node(&addr);
                    Outcome::Unknown(e.to_string())
                }
            };
            if first.is_none() || !matches!(o, Outcome::Answer(_)) {
                first = Some(o);
            }
        }
        first.unwrap_or_else(|| Outcome::NotSent("no redis cluster primary known".into()))
    }

    /// The packed pipeline of `group` for the node at `addr`: ASKING before each asked
    /// command, the node's replication ids in place of [`REPLID`] and [`REPLID2`].
    fn pack(
        &mut self,
        addr: &Addr,
        commands: &[Vec<&[u8]>],
        group: &[(usize, bool)],
    ) -> redis::RedisResult<Vec<u8>> {
        let node = self.node(addr)?;
        let mut out = Vec::new();
        for &(i, asking) in group {
            if asking {
                out.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
            }
            let args = &commands[i];
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                let a: &[u8] = match *a {
                    REPLID => &node.replid,
                    REPLID2 => &node.replid2,
                    other => other,
                };
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        Ok(out)
    }
}

/// Reads a node's replication ids (`INFO replication`).
fn read_replids(node: &mut NodeCon) -> redis::RedisResult<()> {
    let info: String = redis::cmd("INFO").arg("replication").query(&mut node.con)?;
    for line in info.lines() {
        if let Some(id) = line.strip_prefix("master_replid:") {
            node.replid = id.trim().as_bytes().to_vec();
        } else if let Some(id) = line.strip_prefix("master_replid2:") {
            node.replid2 = id.trim().as_bytes().to_vec();
        }
    }
    Ok(())
}

/// Where a command (its arguments) goes: by its first key.
fn target(args: &[&[u8]]) -> Target {
    let name = args.first().map(|n| n.to_ascii_uppercase()).unwrap_or_default();
    match name.as_slice() {
        b"EVALSHA" | b"EVAL" | b"EVALSHA_RO" | b"EVAL_RO" | b"FCALL" => {
            let keys: usize = args
                .get(2)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                .unwrap_or(0);
            match args.get(3) {
                Some(k) if keys > 0 => Target::Slot(slot(k)),
                _ => Target::Any,
            }
        }
        b"SCRIPT" => Target::All,
        b"PING" | b"INFO" | b"CLUSTER" | b"TIME" => Target::Any,
        _ => match args.get(1) {
            Some(k) => Target::Slot(slot(k)),
            None => Target::Any,
        },
    }
}

/// What an error answer asks of the sender.
#[derive(Debug, PartialEq)]
pub enum Redirect {
    /// The slot lives elsewhere now (refresh the map; send it there).
    Moved(Addr),
    /// The key is being migrated to this node: send it there once, after ASKING.
    Ask(Addr),
    /// A migration or failover is under way: send it again shortly.
    Wait,
    /// The node does not have the script.
    NoScript,
}

/// The redirection an answer asks for, if any.
pub fn redirection(v: &Value) -> Option<Redirect> {
    let Value::ServerError(e) = v else { return None };
    let addr = || {
        let d = e.details()?;
        let to = d.split_whitespace().nth(1)?;
        let (h, p) = to.rsplit_once(':')?;
        Some((h.to_owned(), p.parse().ok()?))
    };
    match e.code() {
        "MOVED" => Some(Redirect::Moved(addr()?)),
        "ASK" => Some(Redirect::Ask(addr()?)),
        "TRYAGAIN" | "CLUSTERDOWN" => Some(Redirect::Wait),
        "NOSCRIPT" => Some(Redirect::NoScript),
        _ => None,
    }
}

/// Splits a packed pipeline (RESP arrays of bulk strings, as redis-rs writes them) into its
/// commands' arguments.
pub fn split_packed(mut packed: &[u8]) -> Option<Vec<Vec<&[u8]>>> {
    fn line(b: &mut &[u8], lead: u8) -> Option<usize> {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        let (head, rest) = b.split_at(end);
        if head.first() != Some(&lead) {
            return None;
        }
        let n = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
        *b = &rest[2..];
        Some(n)
    }
    let mut out = Vec::new();
    while !packed.is_empty() {
        let n = line(&mut packed, b'*')?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            let len = line(&mut packed, b'$')?;
            if packed.len() < len + 2 {
                return None;
            }
            args.push(&packed[..len]);
            packed = &packed[len + 2..];
        }
        out.push(args);
    }
    Some(out)
}

impl Router {
    /// Runs packed commands, repeating those whose connection was lost once on a refreshed
    /// map (for work that is safe to repeat).
    fn run_packed(&mut self, packed: &[u8]) -> redis::RedisResult<Vec<Value>> {
        let commands = split_packed(packed).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "cannot route this command"))
        })?;
        let mut outcomes = self.run(&commands);
        let again: Vec<usize> = (0..outcomes.len())
            .filter(|&i| !matches!(outcomes[i], Outcome::Answer(_)))
            .collect();
        if !again.is_empty() {
            self.refresh_soon();
            let retry: Vec<Vec<&[u8]>> = again.iter().map(|&i| commands[i].clone()).collect();
            for (i, o) in again.into_iter().zip(self.run(&retry)) {
                outcomes[i] = o;
            }
        }
        outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Answer(v) => Ok(v),
                Outcome::Unknown(e) | Outcome::NotSent(e) => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "redis cluster",
                    e,
                ))),
            })
            .collect()
    }
}

impl redis::ConnectionLike for Router {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<Value> {
        let mut v = self.run_packed(cmd)?;
        v.pop()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no command")))
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let v = self.run_packed(cmd)?;
        Ok(v.into_iter().skip(offset).take(count).collect())
    }

    fn get_db(&self) -> i64 {
        0
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"), "an empty tag is no tag");
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn names_lose_their_braces_reversibly() {
        for name in ["plain", "a{b}c", "{", "}", "%", "%7B", "x%25{}", "é{ü}"] {
            let e = encode_name(name);
            assert!(!e.contains(['{', '}']), "{e}");
            assert_eq!(decode_name(&e).as_deref(), Some(name), "{name}");
        }
        assert_eq!(encode_name("plain"), "plain");
        assert_ne!(encode_name("a{b}"), encode_name("a%7Bb%7D"));
        assert_eq!(decode_name("a{b"), None);
        assert_eq!(decode_name("a%7"), None);
        assert_eq!(decode_name("a%7b"), None, "only the encoder's own spelling");
    }

    #[test]
    fn packed_pipelines_split_into_commands() {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg("k")
            .arg("v\r\n")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(2)
            .arg("{x}a")
            .arg("{x}b");
        let packed = pipe.get_packed_pipeline();
        let cmds = split_packed(&packed).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0], vec![&b"SET"[..], b"k", b"v\r\n"]);
        assert_eq!(target(&cmds[0]), Target::Slot(slot(b"k")));
        assert_eq!(target(&cmds[1]), Target::Slot(slot(b"x")));
        assert_eq!(target(&[b"EVALSHA", b"abc", b"0"]), Target::Any);
        assert_eq!(target(&[b"SCRIPT", b"LOAD", b"return 1"]), Target::All);
    }

    #[test]
    fn redirections_are_read_from_errors() {
        let err = |line: &str| redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        assert_eq!(
            redirection(&err("MOVED 3999 127.0.0.1:6381")),
            Some(Redirect::Moved(("127.0.0.1".into(), 6381)))
        );
        assert_eq!(
            redirection(&err("ASK 3999 10.0.0.2:7000")),
            Some(Redirect::Ask(("10.0.0.2".into(), 7000)))
        );
        assert_eq!(
            redirection(&err("TRYAGAIN Multiple keys request during rehashing of slot")),
            Some(Redirect::Wait)
        );
        assert_eq!(
            redirection(&err("CLUSTERDOWN The cluster is down")),
            Some(Redirect::Wait)
        );
        assert_eq!(redirection(&err("OOM no")), None);
        assert_eq!(redirection(&Value::Int(1)), None);
    }

    #[test]
    fn slot_maps_parse() {
        let node =
            |h: &str, p: i64| Value::Array(vec![Value::BulkString(h.as_bytes().to_vec()), Value::Int(p)]);
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node("", 7001)]),
        ]);
        let m = SlotMap::parse(&v, "10.0.0.9").unwrap();
        assert!(m.complete());
        assert_eq!(m.owner(0), Some(&("10.0.0.1".to_owned(), 7000)));
        assert_eq!(m.owner(16383), Some(&("10.0.0.9".to_owned(), 7001)));
        assert_eq!(m.primaries().len(), 2);
    }
}
