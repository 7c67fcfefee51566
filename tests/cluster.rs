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

/// A wsrelay node on `cluster`, healthy.
fn node(cluster: &Cluster, extra: &[&str]) -> Node {
    let seeds = cluster.seeds();
    let flags = [
        &["--redis-cluster", &seeds, "--redis-backoff-max", "300ms"][..],
        extra,
    ]
    .concat();
    let n = Node::start(&flags);
    wait_for("/healthz 200", WAIT, || {
        (n.http_get("/healthz").0 == 200).then_some(())
    });
    n
}

/// Two wsrelay nodes on `cluster`, both healthy.
fn nodes(cluster: &Cluster, extra: &[&str]) -> (Node, Node) {
    (node(cluster, extra), node(cluster, extra))
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
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str()),
            (Some(channel.as_str()), Some("v1 hello"))
        );
        assert_eq!(m["offset"], r["offset"]);
        assert_eq!(m["epoch"], r["epoch"]);

        // The channel's keys are on the primary that owns its Pub/Sub channel's slot.
        let meta = format!("wsrelay:{{{channel}}}:meta");
        let here: u64 = redis::cmd("EXISTS")
            .arg(&meta)
            .query(&mut cluster.con(*primary))
            .unwrap();
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
            .args([
                "-c",
                "-p",
                &cluster.nodes[0].port.to_string(),
                "SPUBLISH",
                channel,
                "from the backend",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        recv_until(&mut on_a, "from the backend");
        recv_until(&mut on_b, "from the backend");
    }

    // Without history, a publish is a plain SPUBLISH on the channel's shard.
    let plain = node(&cluster, &["--history-size", "0"]);
    for (channel, _) in &channels {
        let mut on_a = a.client(&format!("/{channel}"));
        on_a.sync("ready", WAIT).unwrap();
        let mut from_plain = plain.client(&format!("/{channel}"));
        from_plain.sync("plain-ready", WAIT).unwrap();
        from_plain.send_text("no history").unwrap();
        recv_until(&mut on_a, "no history");
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
    assert_eq!(
        (r1["offset"].as_u64(), r2["offset"].as_u64()),
        (Some(1), Some(1)),
        "{r1} {r2}"
    );
    assert_eq!(message(&mut one)["data"], "to {x}");
    assert_eq!(message(&mut two)["data"], "to y{x}");
    assert!(
        one.next(Duration::from_millis(200)).is_err(),
        "{{x}} heard another channel"
    );
}

#[test]
fn a_cluster_with_a_password_serves_every_shard() {
    let cluster = Cluster::start_with_password("cluster-secret-1");
    // One node logs in with the password alone, the other as an ACL user.
    let a = node(&cluster, &[]);
    let port = |i: usize| cluster.nodes[i].port;
    let as_user = format!(
        "redis://default:cluster-secret-1@127.0.0.1:{},redis://default:cluster-secret-1@127.0.0.1:{}",
        port(0),
        port(1)
    );
    let b = Node::start(&["--redis-cluster", &as_user]);
    wait_for("/healthz 200", WAIT, || {
        (b.http_get("/healthz").0 == 200).then_some(())
    });
    for (channel, _) in cluster.channels_on_every_primary("locked", 1) {
        let mut raw = b.client(&format!("/{channel}"));
        raw.sync("ready", WAIT).unwrap();
        let mut sub = V1::connect(a.addr, None).unwrap();
        sub.subscribe(&channel, None).unwrap();
        let mut publ = V1::connect(b.addr, None).unwrap();
        assert_eq!(
            publ.publish(&channel, "behind a password").unwrap()["type"],
            "published"
        );
        assert_eq!(message(&mut sub)["data"], "behind a password");
        recv_until(&mut raw, "behind a password");
    }
    // Without the password, a node refuses to start.
    let bare = format!("redis://127.0.0.1:{}", port(0));
    refuses_to_start(&["--redis-cluster", &bare], &[], "cannot reach the Redis Cluster");
}

/// The client ids `channel`'s presence lists, sorted, as `c` reads them.
fn listed(c: &mut V1, channel: &str) -> Option<Vec<String>> {
    let p = c.presence(channel).ok()?;
    let mut ids: Vec<String> = p["clients"]
        .as_array()?
        .iter()
        .filter_map(|c| Some(c["client"].as_str()?.to_owned()))
        .collect();
    ids.sort();
    Some(ids)
}

#[test]
fn presence_events_and_the_server_api_work_on_a_cluster() {
    const KEY: &str = "cluster-test-api-key";
    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
    let cluster = Cluster::start();
    // A prefix with braces: in Redis it is app%7B1%7D: (keys and shard channels alike).
    let flags = [
        "--redis-prefix",
        "app{1}:",
        "--api-key",
        KEY,
        "--token-secret",
        SECRET,
        "--presence",
        "*",
        "--join-leave",
        "*",
        // Two listed per channel; refreshed every second, so a subscriber waiting past the
        // bound takes room freed on the other node within that.
        "--presence-max",
        "2",
        "--presence-ttl",
        "3s",
    ];
    let (a, b) = nodes(&cluster, &flags);
    let token = |sub: &str| {
        let claims = wsrelay::auth::Claims {
            sub: sub.into(),
            exp: 4_000_000_000,
            nbf: None,
            subscribe: vec!["*".into()],
            publish: vec!["*".into()],
        };
        wsrelay::auth::mint(SECRET.as_bytes(), &claims)
    };
    let channels = cluster.channels_on_every_primary_after("app%7B1%7D:", "pres", 1);
    let mut on_a = V1::connect_with(a.addr, None, Some(&token("u1"))).unwrap();
    let mut on_b = V1::connect_with(b.addr, None, Some(&token("u2"))).unwrap();
    for (c, primary) in &channels {
        on_a.subscribe(c, None).unwrap();
        // The join of b's client reaches a's, through the channel's shard.
        on_b.subscribe(c, None).unwrap();
        loop {
            let join = on_a.next_of("join", WAIT).unwrap();
            if join["client"] == on_b.client_id.as_str() {
                assert_eq!(join["channel"].as_str(), Some(c.as_str()));
                break;
            }
        }
        let mut want = vec![on_a.client_id.clone(), on_b.client_id.clone()];
        want.sort();
        wait_for("presence to list both", WAIT, || {
            (listed(&mut on_a, c)? == want).then_some(())
        });
        let key = format!("app%7B1%7D:wsrelay:{{app%7B1%7D:{c}}}:presence");
        let here: u64 = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut cluster.con(*primary))
            .unwrap();
        assert_eq!(here, 1, "{key} not on {primary}");
    }
    // A third subscriber of the first channel is past the bound: it waits.
    let first = channels[0].0.clone();
    let mut third = V1::connect_with(a.addr, None, Some(&token("u3"))).unwrap();
    third.subscribe(&first, None).unwrap();
    wait_for("the overflow to be counted", WAIT, || {
        (a.metric("wsrelay_presence_overflow_total") == 1).then_some(())
    });
    assert!(!listed(&mut third, &first).unwrap().contains(&third.client_id));
    // The node registry (one slot) and the channel counts of every node.
    let api = Api::new(a.addr, KEY);
    wait_for("both nodes in info", WAIT, || {
        let (_, i) = api.info().ok()?;
        (i["nodes"].as_array()?.len() == 2).then_some(())
    });
    wait_for("channel counts of both nodes", WAIT, || {
        let (_, c) = api.channels(None).ok()?;
        let list = c["channels"].as_array()?.clone();
        channels
            .iter()
            .all(|(ch, _)| {
                // The first channel also has the waiting subscriber.
                let n = if *ch == first { 3 } else { 2 };
                list.iter()
                    .any(|x| x["channel"] == ch.as_str() && x["subscribers"] == n)
            })
            .then_some(())
    });
    // A command on the control channel (SPUBLISH on its shard) reaches both nodes.
    let (status, r) = api.disconnect("u2", 4000, "banned").unwrap();
    assert_eq!((status, r["nodes"].as_u64()), (200, Some(2)), "{r}");
    loop {
        match on_b.client.recv(WAIT).unwrap() {
            Received::Closed(f) => {
                assert_eq!(f, Some((4000, "banned".to_owned())));
                break;
            }
            _ => continue,
        }
    }
    // Its leave reaches the other node.
    let leave = on_a.next_of("leave", WAIT).unwrap();
    assert_eq!(leave["client"].as_str(), Some(on_b.client_id.as_str()), "{leave}");
    // The room it freed on the first channel goes to the subscriber that waited.
    let mut want = vec![on_a.client_id.clone(), third.client_id.clone()];
    want.sort();
    wait_for("the waiting subscriber to be listed", WAIT, || {
        (listed(&mut third, &first)? == want).then_some(())
    });
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
    assert_eq!(
        fields.iter().filter(|(f, _)| f.starts_with("c:")).count(),
        3,
        "{fields:?}"
    );
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
        channels
            .iter()
            .all(|(c, _)| got.get(c).is_some_and(|v| v.last() == Some(&format!("{c} 4"))))
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

/// Frames a collector received so far.
type Frames = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

/// A v1 subscriber of `channel` collecting frames (first its subscribe reply) until the
/// message `end`; what it has so far is readable meanwhile.
fn collector(node: &Node, channel: &str) -> (std::thread::JoinHandle<Vec<Value>>, Frames) {
    let mut c = V1::connect(node.addr, None).unwrap();
    let reply = c.subscribe(channel, None).unwrap();
    assert_eq!(reply["type"], "subscribed");
    let frames: Frames = Default::default();
    frames.lock().unwrap().push(reply);
    let shared = frames.clone();
    let handle = std::thread::spawn(move || {
        loop {
            let v = c.next(Duration::from_secs(30)).expect("subscriber stalled");
            let end = v["type"] == "message" && v["data"] == "end";
            shared.lock().unwrap().push(v);
            if end {
                return shared.lock().unwrap().clone();
            }
        }
    });
    (handle, frames)
}

/// A v1 publisher on `channel` publishing "1", "2", … until `stop`; returns what was
/// acknowledged: (epoch, offset, data).
fn steady_publisher(
    node: &Node,
    channel: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Vec<(String, u64, String)>> {
    let mut p = V1::connect(node.addr, None).unwrap();
    let channel = channel.to_owned();
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering;
        let mut out = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let r = p.publish(&channel, &i.to_string()).unwrap();
            if r["type"] == "published" {
                out.push((
                    r["epoch"].as_str().unwrap().to_owned(),
                    r["offset"].as_u64().unwrap(),
                    i.to_string(),
                ));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            // Paced, so that the test measures delivery, not a flood.
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    })
}

#[test]
fn a_slot_migrated_live_keeps_its_subscribers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let cluster = Cluster::start();
    let (a, b) = nodes(&cluster, &[]);
    let (channel, from) = cluster.channels_on_every_primary("moving", 1).remove(0);
    let to = *cluster.primaries().iter().find(|&&p| p != from).unwrap();
    let slot = cluster.keyslot(&channel);
    let subs = [collector(&a, &channel), collector(&b, &channel)];
    // A third node with nobody on the channel: Redis has no reason to tell it of the move.
    let c = node(&cluster, &[]);
    let mut raw = a.client(&format!("/{channel}"));
    raw.sync("raw-ready", WAIT).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = steady_publisher(&b, &channel, stop.clone(), acked.clone());
    let after = |n: u64| {
        let at = acked.load(Ordering::Relaxed);
        wait_for("publishes acknowledged", WAIT, || {
            (acked.load(Ordering::Relaxed) >= at + n).then_some(())
        });
    };
    after(50);
    let mut publisher = Some(publisher);
    let mut acked_list = Vec::new();
    cluster.migrate_slot(slot, from, to, || {
        // The keys are on `to`, the slot still `from`'s: publishes are ASKed there, and
        // SPUBLISHed where nobody listens yet. They are the last ones.
        after(30);
        stop.store(true, Ordering::Relaxed);
        acked_list = publisher.take().unwrap().join().unwrap();
    });
    assert_eq!(cluster.owner(slot), to, "the slot did not move");
    // With nothing published since, only the move itself can tell the subscribers that they
    // missed the last messages: they read them from the history on the new owner.
    let last = acked_list.last().unwrap().clone();
    for (_, frames) in &subs {
        wait_for("the last acknowledged message", WAIT, || {
            frames
                .lock()
                .unwrap()
                .iter()
                .any(|m| m["offset"].as_u64() == Some(last.1) && m["data"] == last.2.as_str())
                .then_some(())
        });
    }
    // Its slot map is stale: its first subscription goes to the old owner, is answered MOVED,
    // and follows the slot.
    let mut late = V1::connect(c.addr, None).unwrap();
    assert_eq!(late.subscribe(&channel, None).unwrap()["type"], "subscribed");
    let mut p = V1::connect(a.addr, None).unwrap();
    assert_eq!(p.publish(&channel, "end").unwrap()["type"], "published");
    assert_eq!(late.message(WAIT).unwrap()["data"], "end");

    for (i, (s, _)) in subs.into_iter().enumerate() {
        let got = s.join().unwrap();
        let messages: Vec<(String, u64, String)> = got
            .iter()
            .filter(|m| m["type"] == "message" && m["data"] != "end" && m["data"] != "raw-ready")
            .map(|m| {
                (
                    m["epoch"].as_str().unwrap().to_owned(),
                    m["offset"].as_u64().unwrap(),
                    m["data"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            got.iter().all(|m| m["recovered"] != false),
            "subscriber {i} was told of a loss: {:?}",
            got.iter().filter(|m| m["type"] != "message").collect::<Vec<_>>()
        );
        // Every acknowledged message exactly once, in order.
        assert_eq!(messages, acked_list, "subscriber {i}");
    }
    // The raw client still receives on the new owner.
    p.publish(&channel, "raw after").unwrap();
    recv_until(&mut raw, "raw after");
}
