//! A Redis Cluster started by a test: six `redis-server` processes (three primaries, three
//! replicas) on free ports, no persistence, a short `cluster-node-timeout` so that a killed
//! primary's replica takes over within a few seconds, joined by `redis-cli --cluster create`.
//! Everything is observed, never waited for by time: a node is taken as started when it
//! answers as the process we spawned, the cluster as ready when every node reports
//! `cluster_state:ok` and knows every other.
//!
//! ```no_run
//! use wsrelay_testkit::cluster::Cluster;
//!
//! let cluster = Cluster::start();
//! let seeds = cluster.seeds(); // redis://127.0.0.1:P1,redis://127.0.0.1:P2
//! let primaries = cluster.primaries();
//! assert_eq!(primaries.len(), 3);
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{WAIT, command, unused_port, wait_for};

/// `cluster-node-timeout` in milliseconds: a primary unreachable this long is failing, and its
/// replica is promoted about a second or two later.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// One `redis-server` of the cluster.
pub struct ClusterNode {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    bus: u16,
    child: Option<Child>,
}

/// A Redis Cluster of three primaries and three replicas, killed (and its files removed) on
/// drop.
pub struct Cluster {
    /// Every node, primaries and replicas, in start order.
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
    /// `requirepass` (and `masterauth`) of every node, if any.
    password: Option<String>,
    node_timeout_ms: u64,
}

impl Cluster {
    /// Starts six nodes, makes them a cluster with one replica per primary, and waits until
    /// every node reports the cluster ok.
    #[track_caller]
    pub fn start() -> Cluster {
        Self::start_with(None, NODE_TIMEOUT_MS)
    }

    /// Like [`Cluster::start`], every node requiring `password` (clients and replicas alike).
    #[track_caller]
    pub fn start_with_password(password: &str) -> Cluster {
        Self::start_with(Some(password), NODE_TIMEOUT_MS)
    }

    /// Like [`Cluster::start`] with another `cluster-node-timeout`: a long one keeps a paused
    /// primary a primary (no failover) for a while.
    #[track_caller]
    pub fn start_with_node_timeout(ms: u64) -> Cluster {
        Self::start_with(None, ms)
    }

    #[track_caller]
    fn start_with(password: Option<&str>, node_timeout_ms: u64) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "wsrelay-cluster-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
            password: password.map(str::to_owned),
            node_timeout_ms,
        };
        for _ in 0..6 {
            let node = cluster.launch_node();
            cluster.nodes.push(node);
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(pw) = password {
            create.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok();
        wait_for("three primaries with a replica each", WAIT, || {
            let replicas = cluster
                .nodes
                .iter()
                .filter(|n| cluster.role(n.port).as_deref() == Some("slave"))
                .filter(|n| cluster.link_up(n.port))
                .count();
            (replicas == 3).then_some(())
        });
        cluster
    }

    /// Starts one node on free ports (client and bus), retrying on a port taken meanwhile.
    fn launch_node(&self) -> ClusterNode {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let (port, bus) = (unused_port(), unused_port());
            let conf = self.dir.join(format!("nodes-{port}.conf"));
            let mut cmd = command("redis-server", None);
            if let Some(pw) = &self.password {
                cmd.args(["--requirepass", pw, "--masterauth", pw]);
            }
            let mut child = cmd
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(&conf)
                .args(["--cluster-node-timeout", &self.node_timeout_ms.to_string()])
                // A replica takes over however long ago it last heard its primary (the tests
                // cut replication on purpose), and the other shards keep serving while one is
                // down.
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot run redis-server (apt-get install redis-server)");
            let pid = child.id();
            let deadline = Instant::now() + WAIT;
            let started = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break Err(format!("exited with {status}"));
                }
                if crate::redis_server_pid(&self.url(port)) == Some(pid) {
                    break Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err("no answer in time".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            match started {
                Ok(()) => {
                    return ClusterNode {
                        port,
                        bus,
                        child: Some(child),
                    };
                }
                Err(e) => failures.push(format!("port {port}/{bus}: {e}")),
            }
        }
        panic!("a cluster node did not start: {failures:?}");
    }

    /// The seed list for `--redis-cluster`: the first two nodes (with the password, if any).
    pub fn seeds(&self) -> String {
        format!(
            "{},{}",
            self.url(self.nodes[0].port),
            self.url(self.nodes[1].port)
        )
    }

    /// `redis://[:PASSWORD@]127.0.0.1:PORT`
    pub fn url(&self, port: u16) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{port}"),
            None => format!("redis://127.0.0.1:{port}"),
        }
    }

    /// A connection to the node on `port`.
    pub fn con(&self, port: u16) -> redis::Connection {
        let client = redis::Client::open(self.url(port)).unwrap();
        let con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .unwrap();
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con
    }

    fn try_con(&self, port: u16) -> Option<redis::Connection> {
        let client = redis::Client::open(self.url(port)).ok()?;
        let con = client
            .get_connection_with_timeout(Duration::from_millis(300))
            .ok()?;
        con.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        Some(con)
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `ROLE` of the node on `port`: "master" or "slave".
    pub fn role(&self, port: u16) -> Option<String> {
        let mut con = self.try_con(port)?;
        let v: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con).ok()?;
        match v.first()? {
            redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// True when the replica on `port` has its replication link up.
    fn link_up(&self, port: u16) -> bool {
        self.info(port, "replication")
            .is_some_and(|i| i.contains("master_link_status:up"))
    }

    fn info(&self, port: u16, section: &str) -> Option<String> {
        let mut con = self.try_con(port)?;
        redis::cmd("INFO").arg(section).query(&mut con).ok()
    }

    /// The primaries serving slots, by port, ordered by their first slot (as a running node
    /// sees them).
    pub fn primaries(&self) -> Vec<u16> {
        let mut ranges = self.slot_ranges();
        ranges.sort();
        let mut out = Vec::new();
        for (_, _, port) in ranges {
            if !out.contains(&port) {
                out.push(port);
            }
        }
        out
    }

    /// (first slot, last slot, primary port) per range, from a live node's `CLUSTER SLOTS`.
    pub fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        for port in self.live_ports() {
            let Some(mut con) = self.try_con(port) else {
                continue;
            };
            let Ok(v) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Vec<redis::Value>>(&mut con)
            else {
                continue;
            };
            let mut out = Vec::new();
            for r in v {
                let redis::Value::Array(r) = r else { continue };
                let int = |v: &redis::Value| match v {
                    redis::Value::Int(n) => *n as u16,
                    _ => 0,
                };
                let redis::Value::Array(node) = &r[2] else {
                    continue;
                };
                out.push((int(&r[0]), int(&r[1]), int(&node[1])));
            }
            return out;
        }
        panic!("no cluster node answers CLUSTER SLOTS");
    }

    /// The port of the primary serving `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.slot_ranges()
            .into_iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, p)| p)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// `CLUSTER KEYSLOT name`.
    pub fn keyslot(&self, name: &str) -> u16 {
        let port = self.live_ports()[0];
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(name)
            .query(&mut self.con(port))
            .unwrap()
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> u16 {
        let id = self.node_id(primary);
        self.live_ports()
            .into_iter()
            .find(|&p| {
                self.info(p, "replication").is_some_and(|i| {
                    i.contains("role:slave") && i.contains(&format!("master_port:{primary}"))
                }) || self
                    .cluster_nodes_line(p)
                    .is_some_and(|l| l.contains(&id) && l.contains("slave"))
            })
            .unwrap_or_else(|| panic!("no replica of {primary}"))
    }

    /// `CLUSTER MYID` of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.con(port))
            .unwrap()
    }

    fn cluster_nodes_line(&self, port: u16) -> Option<String> {
        let mut con = self.try_con(port)?;
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).ok()?;
        nodes.lines().find(|l| l.contains("myself")).map(str::to_owned)
    }

    /// Channel names (no prefix) whose slots are served by each primary in turn, `per_primary`
    /// of them per primary, named `{stem}-N`: channels spread over every shard.
    pub fn channels_on_every_primary(&self, stem: &str, per_primary: usize) -> Vec<(String, u16)> {
        self.channels_on_every_primary_after("", stem, per_primary)
    }

    /// Like [`Cluster::channels_on_every_primary`], for shard channels named `prefix` + the
    /// channel (`prefix` as it is in Redis: a `--redis-prefix` with braces is encoded).
    pub fn channels_on_every_primary_after(
        &self,
        prefix: &str,
        stem: &str,
        per_primary: usize,
    ) -> Vec<(String, u16)> {
        let ranges = self.slot_ranges();
        let owner = |slot: u16| {
            ranges
                .iter()
                .find(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|r| r.2)
        };
        let mut counts = std::collections::HashMap::new();
        let mut out = Vec::new();
        let port = self.live_ports()[0];
        let mut con = self.con(port);
        for i in 0.. {
            let name = format!("{stem}-{i}");
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{prefix}{name}"))
                .query(&mut con)
                .unwrap();
            let p = owner(slot).expect("every slot served");
            let n = counts.entry(p).or_insert(0);
            if *n < per_primary {
                *n += 1;
                out.push((name, p));
            }
            if counts.len() == 3 && counts.values().all(|&n| n == per_primary) {
                break;
            }
        }
        out
    }

    /// Waits until every running node reports `cluster_state:ok` and knows every running node.
    #[track_caller]
    pub fn wait_ok(&self) {
        let live = self.live_ports();
        wait_for(
            "the cluster to be ok on every node",
            Duration::from_secs(20),
            || {
                live.iter()
                    .all(|&p| {
                        self.info_cluster(p)
                            .is_some_and(|i| i.contains("cluster_state:ok"))
                    })
                    .then_some(())
            },
        );
    }

    fn info_cluster(&self, port: u16) -> Option<String> {
        let mut con = self.try_con(port)?;
        redis::cmd("CLUSTER").arg("INFO").query(&mut con).ok()
    }

    /// Sends `signal` to the node on `port` (SIGSTOP, SIGCONT).
    pub fn signal(&self, port: u16, signal: i32) {
        let node = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        let pid = node.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The bus port of the node on `port` (its client port is not enough to reach it there).
    pub fn bus_port(&self, port: u16) -> u16 {
        self.nodes.iter().find(|n| n.port == port).map(|n| n.bus).unwrap()
    }

    /// Moves `slot` from the primary on `from` to the one on `to` the way `redis-cli --cluster
    /// reshard` does: IMPORTING/MIGRATING, MIGRATE of its keys in batches, then SETSLOT NODE on
    /// both. `between` runs after the keys moved and before the slot's ownership changes (a
    /// window in which the keys are on `to` while `from` still owns the slot).
    pub fn migrate_slot(&self, slot: u16, from: u16, to: u16, mut between: impl FnMut()) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let (mut src, mut dst) = (self.con(from), self.con(to));
        let setslot = |con: &mut redis::Connection, how: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(id)
                .query::<()>(con)
                .unwrap()
        };
        setslot(&mut dst, "IMPORTING", &from_id);
        setslot(&mut src, "MIGRATING", &to_id);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(to).arg("").arg(0).arg(5000);
            if let Some(pw) = &self.password {
                migrate.arg("AUTH").arg(pw);
            }
            migrate.arg("KEYS").arg(&keys).query::<()>(&mut src).unwrap();
        }
        between();
        setslot(&mut dst, "NODE", &to_id);
        setslot(&mut src, "NODE", &to_id);
        for port in self.live_ports() {
            if port != from && port != to {
                let _ = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("NODE")
                    .arg(&to_id)
                    .query::<()>(&mut self.con(port));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A suffix that differs between clusters of one test process.
fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
