//! wsrelay on a Redis Cluster (`--redis-cluster`): three primaries and three replicas started
//! by each test, two wsrelay nodes, channels on every shard. Delivery across nodes (raw and
//! v1), a backend's `SPUBLISH`, channel names with braces, history recovery and sessions across
//! shards, and a slot migrated live under its subscribers. Failovers are in
//! `cluster_failover.rs`.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use serde_json::Value;
use wsrelay_client::V1;

/// Two wsrelay nodes on `cluster`, both healthy.
fn nodes(cluster: &Cluster, extra: &[&str]) -> (Node, Node) {
    let seeds = cluster.seeds();
    let flags = [&["--redis-cluster", &seeds, "--redis-backoff-max", "300ms"][..], extra].concat();
    let (a, b) = (Node::start(&flags), Node::start(&flags));
    for n in [&a, &b] {
        wait_for("/healthz 200", WAIT, || (n.http_get("/healthz").0 == 200).then_some(()));
    }
    (a, b)
}

/// The next message frame of a v1 client (skipping anything else).
fn message(c: &mut V1) -> Value {
    c.message(WAIT).expect("a message")
}

#[test]
fn delivery_crosses_nodes_on_every_shard_raw_and_v1() {
    let cluster = Cluster::start();
    let (a, b) = nodes(&cluster, &[]);
    let channels = cluster.channels_on_every_primary("room", 2);
    assert_eq!(cluster.primaries().len(), 3);
    for (channel, primary) in &channels {
        // Raw: a client on each node; each one's message reaches both.
        let mut on_a = a.client(&format!("/{channel}"));
        let mut on_b = b.client(&format!("/{channel}"));
        on_a.sync("a-ready", WAIT).unwrap();
        on_b.sync("b-ready", WAIT).unwrap();
        // `sync` returns once the client's own message came back through Redis; the other
        // node's subscription is live too, so the next message reaches both.
        on_a.send_text(&format!("from a on {channel}")).unwrap();
        recv_until(&mut on_b, &format!("from a on {channel}"));
        recv_until(&mut on_a, &format!("from a on {channel}"));
        on_b.send_text(&format!("from b on {channel}")).unwrap();
        recv_until(&mut on_a, &format!("from b on {channel}"));

        // v1: subscriber on b, publisher on a, with positions.
        let mut sub = V1::connect(b.addr, None).unwrap();
        assert_eq!(sub.subscribe(channel, None).unwrap()["type"], "subscribed");
        let mut publ = V1::connect(a.addr, None).unwrap();
        let r = publ.publish(channel, "v1 hello").unwrap();
        assert_eq!(r["type"], "published", "{r}");
        let m = message(&mut sub);
        assert_eq!((m["channel"].as_str(), m["data"].as_str()), (Some(channel.as_str()), Some("v1 hello")));
        assert_eq!(m["offset"], r["offset"]);
        assert_eq!(m["epoch"], r["epoch"]);

        // The channel's keys are on the primary that owns its Pub/Sub channel's slot.
        let meta = format!("wsrelay:{{{channel}}}:meta");
        let here: u64 = redis::cmd("EXISTS").arg(&meta).query(&mut cluster.con(*primary)).unwrap();
        assert_eq!(here, 1, "{meta} not on {primary}");
    }
    // Every primary carried some of it.
    let per_primary: Vec<u16> = channels.iter().map(|(_, p)| *p).collect();
    for p in cluster.primaries() {
        assert!(per_primary.contains(&p));
    }

    // A backend's SPUBLISH through redis-cli -c (following MOVED) reaches raw clients of both
    // nodes, on every shard.
    for (channel, _) in &channels {
        let mut on_a = a.client(&format!("/{channel}"));
        let mut on_b = b.client(&format!("/{channel}"));
        on_a.sync("ready", WAIT).unwrap();
        on_b.sync("ready", WAIT).unwrap();
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &cluster.nodes[0].port.to_string(), "SPUBLISH", channel, "from the backend"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        recv_until(&mut on_a, "from the backend");
        recv_until(&mut on_b, "from the backend");
    }

    // Channels with braces keep to themselves: "{x}" and "y{x}" would share a hash tag if
    // their names were used as is.
    let mut one = V1::connect(a.addr, None).unwrap();
    let mut two = V1::connect(b.addr, None).unwrap();
    one.subscribe("{x}", None).unwrap();
    two.subscribe("y{x}", None).unwrap();
    let mut publ = V1::connect(b.addr, None).unwrap();
    let r1 = publ.publish("{x}", "to {x}").unwrap();
    let r2 = publ.publish("y{x}", "to y{x}").unwrap();
    assert_eq!((r1["offset"].as_u64(), r2["offset"].as_u64()), (Some(1), Some(1)), "{r1} {r2}");
    assert_eq!(message(&mut one)["data"], "to {x}");
    assert_eq!(message(&mut two)["data"], "to y{x}");
    assert!(one.next(Duration::from_millis(200)).is_err(), "{{x}} heard another channel");
}

#[test]
fn history_and_sessions_work_across_shards() {
    let cluster = Cluster::start();
    let (a, b) = nodes(&cluster, &[]);
    let channels = cluster.channels_on_every_primary("hist", 1);
    let mut publ = V1::connect(a.addr, None).unwrap();
    // A session on b subscribed to a channel of every shard.
    let s = V1::connect(b.addr, None).unwrap();
    let mut s = s;
    let id = s.session.clone();
    assert!(!id.is_empty());
    for (c, _) in &channels {
        assert_eq!(s.subscribe(c, None).unwrap()["type"], "subscribed");
    }
    for (c, _) in &channels {
        publ.publish(c, &format!("{c} 1")).unwrap();
    }
    for _ in &channels {
        message(&mut s);
    }
    // Gone; messages published meanwhile on every shard.
    drop(s);
    // The session is in a slot of its own: its positions name channels of every shard.
    let key = format!("wsrelay:session:{id}");
    let mut owner = cluster.con(cluster.owner(cluster.keyslot(&key)));
    let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(&key).query(&mut owner).unwrap();
    assert_eq!(fields.iter().filter(|(f, _)| f.starts_with("c:")).count(), 3, "{fields:?}");
    for (c, _) in &channels {
        for i in 2..=4 {
            publ.publish(c, &format!("{c} {i}")).unwrap();
        }
    }
    // Resumed on the other node: every missed message, per channel in order (from where
    // the session's stored position stands: the first message at the latest).
    let mut s = V1::connect(a.addr, Some(&id)).unwrap();
    assert!(s.resumed);
    let mut got: std::collections::HashMap<String, Vec<String>> = Default::default();
    let done = |got: &std::collections::HashMap<String, Vec<String>>| {
        channels.iter().all(|(c, _)| got.get(c).is_some_and(|v| v.last() == Some(&format!("{c} 4"))))
    };
    while !done(&got) {
        let m = s.next(WAIT).expect("resumed messages");
        if m["type"] == "message" {
            got.entry(m["channel"].as_str().unwrap().to_owned())
                .or_default()
                .push(m["data"].as_str().unwrap().to_owned());
        } else if m["type"] == "subscribed" {
            assert_ne!(m["recovered"], false, "{m}");
        }
    }
    for (c, _) in &channels {
        let all: Vec<String> = (1..=4).map(|i| format!("{c} {i}")).collect();
        let got = &got[c];
        assert!(got.len() >= 3 && all.ends_with(got), "{c}: {got:?}");
    }
    // Recovery by offset on a fresh connection, every shard.
    for (c, _) in &channels {
        let mut v = V1::connect(b.addr, None).unwrap();
        let first = publ.publish(c, "r1").unwrap();
        publ.publish(c, "r2").unwrap();
        let epoch = first["epoch"].as_str().unwrap();
        let offset = first["offset"].as_u64().unwrap() - 1;
        let reply = v.subscribe(c, Some((offset, epoch))).unwrap();
        assert_eq!(reply["recovered"], true, "{reply}");
        assert_eq!(message(&mut v)["data"], "r1");
        assert_eq!(message(&mut v)["data"], "r2");
    }
}
