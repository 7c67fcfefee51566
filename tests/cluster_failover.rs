//! Failovers of a Redis Cluster under wsrelay (`--redis-cluster`): a primary SIGKILLed under
//! steady publishing on every shard, and a primary killed with acknowledged publishes its
//! replica never received. Every v1 subscriber must end with every acknowledged message exactly
//! once, in order, or with an explicit `recovered: false` covering what it lacks; delivery must
//! resume by itself once the replica is promoted; `/healthz` must report the outage and then
//! the recovery.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use common::delivery::{Gap, Position, gaps, position, subscriber};
use common::*;
use serde_json::Value;
use wsrelay_client::{V1, wire};

fn nodes(cluster: &Cluster) -> (Node, Node) {
    let seeds = cluster.seeds();
    let flags = ["--redis-cluster", &seeds, "--redis-backoff-max", "300ms"];
    let (a, b) = (Node::start(&flags), Node::start(&flags));
    for n in [&a, &b] {
        wait_for("/healthz 200", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    (a, b)
}

/// Checks one subscriber: no position twice; each acknowledged message present with its own
/// data unless a `recovered: false` gap excuses it; acknowledged messages in order. Returns the
/// gaps it was told of.
#[track_caller]
fn check(name: &str, got: &[Value], acked: &HashMap<Position, String>) -> Vec<Gap> {
    let mut seen = HashSet::new();
    let mut positions = HashMap::new();
    let mut order = Vec::new();
    for m in got.iter().filter(|m| m["type"] == "message") {
        let Some(key) = position(m) else { continue };
        assert!(seen.insert(key.clone()), "{name}: duplicate {key:?}");
        positions.insert(key.clone(), m["data"].as_str().unwrap().to_owned());
        order.push(key);
    }
    let gaps = gaps(name, got);
    let mut missing = Vec::new();
    for (key, data) in acked {
        match positions.get(key) {
            Some(d) => assert_eq!(d, data, "{name}: another message at {key:?} (an offset reused)"),
            None if gaps.iter().any(|g| g.excuses(key)) => {}
            None => missing.push(key.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{name}: acknowledged messages missing outside any recovered:false gap {gaps:?}: {missing:?}"
    );
    // In order: the acknowledged ones received follow their publisher's order (numbers).
    let numbers: Vec<u64> = order
        .iter()
        .filter(|k| acked.contains_key(*k))
        .map(|k| positions[k].parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "{name}: out of order: {numbers:?}"
    );
    gaps
}

/// Publishes "1", "2", … on `channel` through `node` every 3 ms until `stop`; counts and
/// returns what was acknowledged.
fn steady_publisher(
    node: &Node,
    channel: &str,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<HashMap<Position, String>> {
    let mut p = V1::connect(node.addr, None).unwrap();
    let channel = channel.to_owned();
    std::thread::spawn(move || {
        let mut acked = HashMap::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let r = p.publish(&channel, &i.to_string()).unwrap();
            if r["type"] == "published" {
                acked.insert(position(&r).unwrap(), i.to_string());
                count.fetch_add(1, Ordering::Relaxed);
            }
            // Paced, so that a failover happens under traffic, not under a flood.
            std::thread::sleep(Duration::from_millis(3));
        }
        acked
    })
}

/// Publishes `end` on `channel` until it is acknowledged.
fn end(node: &Node, channel: &str) {
    let mut p = V1::connect(node.addr, None).unwrap();
    wait_for("end marker stored", Duration::from_secs(20), || {
        let r = p.publish(channel, "end").ok()?;
        (r["type"] == "published").then_some(())
    });
}

#[test]
fn a_primary_killed_under_steady_publishing() {
    let mut cluster = Cluster::start();
    let (a, b) = nodes(&cluster);
    let channels = cluster.channels_on_every_primary("steady", 1);
    let subs: Vec<_> = channels
        .iter()
        .flat_map(|(c, _)| {
            [
                (format!("{c}@a"), subscriber(&a, c)),
                (format!("{c}@b"), subscriber(&b, c)),
            ]
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = channels.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let publishers: Vec<_> = channels
        .iter()
        .zip(&counts)
        .enumerate()
        .map(|(i, ((c, _), n))| {
            steady_publisher(if i % 2 == 0 { &a } else { &b }, c, stop.clone(), n.clone())
        })
        .collect();
    let after = |i: usize, n: u64, timeout: Duration| {
        let at = counts[i].load(Ordering::Relaxed);
        wait_for("publishes acknowledged", timeout, || {
            (counts[i].load(Ordering::Relaxed) >= at + n).then_some(())
        });
    };
    for i in 0..channels.len() {
        after(i, 50, WAIT);
    }
    // The primary of the first channel dies.
    let (victim_channel, victim) = channels[0].clone();
    let replica = cluster.replica_of(victim);
    cluster.kill(victim);
    for n in [&a, &b] {
        wait_for("/healthz to report the outage", WAIT, || {
            (n.http_get("/healthz").0 != 200).then_some(())
        });
    }
    // The other shards go on meanwhile.
    after(1, 20, WAIT);
    wait_for("the replica promoted", Duration::from_secs(20), || {
        (cluster.role(replica).as_deref() == Some("master")).then_some(())
    });
    for n in [&a, &b] {
        wait_for("/healthz back", Duration::from_secs(20), || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    // Publishing on the failed shard resumed by itself.
    after(0, 50, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<HashMap<Position, String>> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    for (c, _) in &channels {
        end(&a, c);
    }
    for (i, (name, s)) in subs.into_iter().enumerate() {
        let got = s.join().unwrap();
        let gaps = check(&name, &got, &acked[i / 2]);
        eprintln!("{name}: {} acknowledged; gaps told: {gaps:?}", acked[i / 2].len());
        if !name.starts_with(&victim_channel) {
            assert!(
                gaps.is_empty(),
                "{name}: a shard that did not fail told of a loss: {gaps:?}"
            );
        }
    }
    // Nothing stays subscribed on the dead primary: both nodes have every channel live.
    for n in [&a, &b] {
        assert_eq!(n.metric("wsrelay_redis_subscriber_up"), 1);
    }
}

#[test]
fn a_promoted_replica_that_missed_acknowledged_publishes_starts_a_new_epoch() {
    let mut cluster = Cluster::start();
    let (a, b) = nodes(&cluster);
    let (channel, primary) = cluster.channels_on_every_primary("lossy", 1).remove(0);
    let replica = cluster.replica_of(primary);
    let sub = subscriber(&a, &channel);
    let mut p = V1::connect(b.addr, None).unwrap();
    let mut acked = HashMap::new();
    let publish = |p: &mut V1, acked: &mut HashMap<Position, String>, i: u64| {
        let r = p.publish(&channel, &i.to_string()).unwrap();
        assert_eq!(r["type"], "published", "{r}");
        acked.insert(position(&r).unwrap(), i.to_string());
        r
    };
    let mut first = Value::Null;
    for i in 1..=5 {
        first = publish(&mut p, &mut acked, i);
    }
    wait_for("the replica to have them", WAIT, || {
        let mut con = cluster.con(replica);
        let _: () = redis::cmd("READONLY").query(&mut con).ok()?;
        let meta = format!("wsrelay:{{{channel}}}:meta");
        let offset: Option<u64> = redis::cmd("HGET").arg(&meta).arg("offset").query(&mut con).ok()?;
        (offset == Some(5)).then_some(())
    });
    // Replication cut: the replica cannot log in to its primary any more, which drops it.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("masterauth")
        .arg("not-the-password")
        .query(&mut cluster.con(replica))
        .unwrap();
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query(&mut cluster.con(primary))
        .unwrap();
    wait_for("replication down", WAIT, || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut cluster.con(replica))
            .ok()?;
        info.contains("master_link_status:down").then_some(())
    });
    // Acknowledged by the primary, delivered, never replicated.
    for i in 6..=10 {
        publish(&mut p, &mut acked, i);
    }
    cluster.kill(primary);
    wait_for("the replica promoted", Duration::from_secs(20), || {
        (cluster.role(replica).as_deref() == Some("master")).then_some(())
    });
    // The first publish acknowledged by the promoted replica is in a new epoch: offsets 6 to 10
    // of the old one are never given to other messages.
    let next = wait_for(
        "a publish on the promoted replica",
        Duration::from_secs(20),
        || {
            let r = p.publish(&channel, "11").ok()?;
            (r["type"] == "published").then_some(r)
        },
    );
    acked.insert(position(&next).unwrap(), "11".into());
    assert_ne!(
        next["epoch"], first["epoch"],
        "offsets reused under the old epoch: {next}"
    );
    for i in 12..=14 {
        publish(&mut p, &mut acked, i);
    }
    end(&b, &channel);
    let got = sub.join().unwrap();
    let gaps = check("subscriber", &got, &acked);
    // It was told, and it has every message after the failover.
    assert!(!gaps.is_empty(), "no recovered:false: {got:?}");
    let data: Vec<&str> = got
        .iter()
        .filter(|m| m["type"] == "message")
        .filter_map(|m| m["data"].as_str())
        .collect();
    assert!(data.ends_with(&["11", "12", "13", "14", "end"]), "{data:?}");
}

#[test]
fn a_manual_failover_moves_publishes_and_subscriptions_to_the_new_primary() {
    let cluster = Cluster::start();
    let (a, b) = nodes(&cluster);
    let (channel, primary) = cluster.channels_on_every_primary("handover", 1).remove(0);
    let replica = cluster.replica_of(primary);
    let subs = [subscriber(&a, &channel), subscriber(&b, &channel)];
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let publisher = steady_publisher(&b, &channel, stop.clone(), count.clone());
    let after = |n: u64| {
        let at = count.load(Ordering::Relaxed);
        wait_for("publishes acknowledged", Duration::from_secs(20), || {
            (count.load(Ordering::Relaxed) >= at + n).then_some(())
        });
    };
    after(50);
    // The replica takes over in agreement with its primary (which becomes its replica).
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.con(replica))
        .unwrap();
    wait_for("the replica promoted", Duration::from_secs(20), || {
        (cluster.role(replica).as_deref() == Some("master")).then_some(())
    });
    // Publishes follow (MOVED), and so do the subscriptions (the old primary drops them).
    after(50);
    stop.store(true, Ordering::Relaxed);
    let acked = publisher.join().unwrap();
    end(&a, &channel);
    for (name, s) in ["a", "b"].into_iter().zip(subs) {
        let got = s.join().unwrap();
        let gaps = check(name, &got, &acked);
        eprintln!("{name}: {} acknowledged; gaps told: {gaps:?}", acked.len());
    }
    for n in [&a, &b] {
        wait_for("/healthz 200", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
}

#[test]
fn a_paused_primary_does_not_hold_up_the_other_shards() {
    // A long node timeout: the paused primary stays a primary for the whole test.
    let cluster = Cluster::start_with_node_timeout(30_000);
    let (a, _b) = nodes(&cluster);
    let channels = cluster.channels_on_every_primary("paused", 1);
    let (stuck, paused) = channels[0].clone();
    let free = channels[1].0.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (n_stuck, n_free) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let publishers = [
        steady_publisher(&a, &stuck, stop.clone(), n_stuck.clone()),
        steady_publisher(&a, &free, stop.clone(), n_free.clone()),
    ];
    wait_for("both channels published on", WAIT, || {
        (n_stuck.load(Ordering::Relaxed) >= 20 && n_free.load(Ordering::Relaxed) >= 20).then_some(())
    });
    cluster.signal(paused, libc::SIGSTOP);
    let before = n_free.load(Ordering::Relaxed);
    // Eight seconds of a primary that accepts connections and answers nothing, under
    // traffic. /healthz is read throughout: the node cannot hear that shard.
    let paused_at = std::time::Instant::now();
    let mut health = Vec::new();
    while paused_at.elapsed() < Duration::from_secs(8) {
        health.push((paused_at.elapsed(), a.http_get("/healthz").0));
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = n_free.load(Ordering::Relaxed) - before;
    eprintln!("{during} publishes acknowledged on another shard during the pause");
    // Down within a few seconds (PINGs every second, unanswered for 2 s), and down until the
    // end: a new connection to the paused primary (the kernel still accepts them) counts only
    // once it has answered.
    let late: Vec<_> = health
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(5))
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|(_, status)| *status == 503),
        "/healthz while a primary answered nothing: {health:?}"
    );
    cluster.signal(paused, libc::SIGCONT);
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }
    // Each publish waiting out the command timeout on the paused primary would allow a
    // handful (one per 2 s); skipping it after its first timeout lets the other shard go on.
    assert!(
        during > 100,
        "only {during} publishes acknowledged on another shard in 8 s"
    );
    // It answers again: publishing on its slots resumes.
    let at = n_stuck.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let again = steady_publisher(&a, &stuck, stop.clone(), n_stuck.clone());
    wait_for(
        "publishes on the resumed primary",
        Duration::from_secs(40),
        || (n_stuck.load(Ordering::Relaxed) >= at + 20).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    again.join().unwrap();
    wait_for("/healthz 200", Duration::from_secs(20), || {
        (a.http_get("/healthz").0 == 200).then_some(())
    });
}

/// The first publish to a shard whose primary died while this node was not publishing there
/// goes to the promoted replica: the publisher's connection to the dead primary was closed by
/// then, so nothing was sent on it and nothing is "outcome unknown".
#[test]
fn a_publish_after_its_primary_died_goes_to_the_new_primary() {
    let mut cluster = Cluster::start();
    let (a, _b) = nodes(&cluster);
    let (channel, victim) = cluster.channels_on_every_primary("idle", 1)[0].clone();
    let mut p = V1::connect(a.addr, None).unwrap();
    let r = p.publish(&channel, "before").unwrap();
    assert_eq!(r["type"], "published", "{r}");
    let replica = cluster.replica_of(victim);
    cluster.kill(victim);
    wait_for("the replica promoted", Duration::from_secs(20), || {
        (cluster.role(replica).as_deref() == Some("master")).then_some(())
    });
    wait_for("/healthz back", Duration::from_secs(20), || {
        (a.http_get("/healthz").0 == 200).then_some(())
    });
    let r = p.publish(&channel, "after").unwrap();
    assert_eq!(r["type"], "published", "{r}");
}

/// A node started while a primary is dead and its replica not promoted yet waits for the
/// failover instead of exiting, then serves every shard.
#[test]
fn a_node_started_during_a_failover_waits_for_it() {
    let mut cluster = Cluster::start();
    let channels = cluster.channels_on_every_primary("late", 1);
    let victim = channels[0].1;
    cluster.kill(victim);
    let seeds = cluster.seeds();
    let node = Node::start(&["--redis-cluster", &seeds, "--redis-backoff-max", "300ms"]);
    wait_for("/healthz 200", Duration::from_secs(20), || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    let mut p = V1::connect(node.addr, None).unwrap();
    for (channel, _) in &channels {
        let r = p.publish(channel, "hello").unwrap();
        assert_eq!(r["type"], "published", "{channel}: {r}");
    }
}

/// A raw client that joins a channel while its shard's primary answers nothing (its Pub/Sub
/// connection given up) is read only once the channel is subscribed on that primary again: its
/// own messages come back to it, none published before anyone could hear them.
#[test]
fn a_raw_client_that_joins_while_its_primary_is_stalled_receives_its_own() {
    // A long node timeout: the paused primary stays a primary for the whole test.
    let cluster = Cluster::start_with_node_timeout(30_000);
    let seeds = cluster.seeds();
    let node = Node::start(&[
        "--threads",
        "1",
        "--redis-cluster",
        &seeds,
        "--redis-backoff-max",
        "300ms",
    ]);
    wait_for("/healthz 200", WAIT, || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    let (channel, primary) = cluster.channels_on_every_primary("stalled", 1)[0].clone();
    let reconnects = node.metric("wsrelay_redis_reconnects_total");
    cluster.signal(primary, libc::SIGSTOP);
    let mut raw = node.client(&format!("/{channel}"));
    let mut burst = Vec::new();
    for i in 0..20 {
        wire::encode_masked(&mut burst, wire::op::TEXT, format!("m{i}").as_bytes());
    }
    std::io::Write::write_all(raw.inner().get_mut(), &burst).unwrap();
    // The SSUBSCRIBE and PINGs go unanswered; the node gives that connection up.
    wait_for("the Pub/Sub connection given up", Duration::from_secs(20), || {
        (node.metric("wsrelay_redis_reconnects_total") > reconnects).then_some(())
    });
    cluster.signal(primary, libc::SIGCONT);
    for i in 0..20 {
        assert_eq!(raw.recv_text(Duration::from_secs(30)).unwrap(), format!("m{i}"));
    }
}
