//! Redis failing under steady traffic: killed, restarted empty, and paused (SIGSTOP), with
//! clients on two nodes. The nodes must survive with bounded memory, delivery must resume by
//! itself, and every message Redis acknowledged must reach every v1 subscriber exactly once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use wsrelay_client::V1;

/// Collects every frame a v1 subscriber of `channel` receives until it sees `end`, starting
/// with the reply to its subscribe (which names the position it starts from).
fn subscriber(node: &Node, channel: &'static str) -> std::thread::JoinHandle<Vec<Value>> {
    let mut c = V1::connect(node.addr, None).unwrap();
    let reply = c.subscribe(channel, None).unwrap();
    assert_eq!(reply["type"], "subscribed");
    std::thread::spawn(move || {
        let mut got = vec![reply];
        loop {
            let v = c.next(Duration::from_secs(60)).expect("subscriber stalled");
            let end = v["type"] == "message" && v["data"] == "end";
            got.push(v);
            if end {
                return got;
            }
        }
    })
}

/// A position in a channel: (epoch, offset).
type Position = (String, u64);

fn position(v: &Value) -> Option<Position> {
    Some((v["epoch"].as_str()?.to_owned(), v["offset"].as_u64()?))
}

/// Messages a subscriber was told it may have missed: those after `after`, up to and
/// including `upto` (the two may be in different epochs).
#[derive(Debug)]
struct Gap {
    after: Position,
    upto: Position,
}

impl Gap {
    fn excuses(&self, (epoch, offset): &Position) -> bool {
        let (after, upto) = (&self.after, &self.upto);
        let past_after = *epoch != after.0 || *offset > after.1;
        let before_upto = *epoch != upto.0 || *offset <= upto.1;
        (*epoch == after.0 || *epoch == upto.0) && past_after && before_upto
    }
}

/// The gaps a subscriber's `recovered: false` notices excuse, each from the position the
/// subscriber had before the notice to the position the notice names (or, when it names
/// none, to just before the next message).
fn gaps(name: &str, got: &[Value]) -> Vec<Gap> {
    let mut last = position(&got[0]).unwrap_or_else(|| panic!("{name}: subscribed without a position"));
    let mut gaps = Vec::new();
    let mut open: Option<Position> = None;
    for m in &got[1..] {
        let here = position(m);
        if m["type"] == "message" {
            let Some(here) = here else { continue };
            if let Some(after) = open.take() {
                gaps.push(Gap {
                    after,
                    upto: (here.0.clone(), here.1.saturating_sub(1)),
                });
            }
            last = here;
        } else if m["type"] == "subscribed" && m["recovered"] == false {
            match here {
                Some(upto) => {
                    gaps.push(Gap {
                        after: open.take().unwrap_or_else(|| last.clone()),
                        upto: upto.clone(),
                    });
                    last = upto;
                }
                None => open = Some(open.take().unwrap_or_else(|| last.clone())),
            }
        }
    }
    gaps
}

#[test]
fn gaps_excuse_only_what_lies_between_their_ends() {
    let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    let got = [
        json(r#"{"type":"subscribed","epoch":"a","offset":3}"#),
        json(r#"{"type":"message","epoch":"a","offset":4}"#),
        json(r#"{"type":"subscribed","epoch":"b","offset":2,"recovered":false}"#),
        json(r#"{"type":"message","epoch":"b","offset":3}"#),
        json(r#"{"type":"subscribed","recovered":false}"#),
        json(r#"{"type":"message","epoch":"b","offset":7}"#),
    ];
    let gaps = gaps("t", &got);
    let excused = |e: &str, o: u64| gaps.iter().any(|g| g.excuses(&(e.to_owned(), o)));
    assert!(!excused("a", 4));
    assert!(excused("a", 5) && excused("a", 99));
    assert!(excused("b", 1) && excused("b", 2));
    assert!(!excused("b", 3));
    assert!(excused("b", 4) && excused("b", 6));
    assert!(!excused("b", 7) && !excused("b", 8));
    assert!(!excused("c", 1));
}

#[test]
fn redis_killed_restarted_and_paused_during_steady_publishing() {
    let mut redis = Redis::start();
    let url = redis.url();
    let flags = [
        "--redis",
        &url,
        "--redis-backoff-max",
        "300ms",
        "--history-size",
        "100000",
    ];
    let a = Node::start(&flags);
    let b = Node::start(&flags);
    for n in [&a, &b] {
        wait_for("subscriber up", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    let on_a = subscriber(&a, "f");
    let on_b = subscriber(&b, "f");

    // A publisher on B, one message every 2 ms, recording what Redis acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, addr) = (stop.clone(), b.addr);
        std::thread::spawn(move || {
            let mut p = V1::connect(addr, None).unwrap();
            let mut acked = HashMap::new();
            let mut refused = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = p.publish("f", &i.to_string()).unwrap();
                match r["type"].as_str() {
                    Some("published") => {
                        acked.insert(
                            (
                                r["epoch"].as_str().unwrap().to_owned(),
                                r["offset"].as_u64().unwrap(),
                            ),
                            i,
                        );
                    }
                    _ => refused += 1,
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (acked, refused, i)
        })
    };
    let steady = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    steady(Duration::from_millis(500));
    redis.kill();
    steady(Duration::from_secs(1));
    redis.restart();
    for n in [&a, &b] {
        wait_for("subscriber back after restart", WAIT, || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    steady(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    steady(Duration::from_millis(2500));
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    for n in [&a, &b] {
        wait_for("subscriber back after SIGCONT", Duration::from_secs(20), || {
            (n.http_get("/healthz").0 == 200).then_some(())
        });
    }
    steady(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked, refused, sent) = publisher.join().unwrap();
    // The end marker, acknowledged by Redis, closes both subscriber streams.
    let mut p = V1::connect(b.addr, None).unwrap();
    let end = wait_for("end marker stored", WAIT, || {
        let r = p.publish("f", "end").ok()?;
        (r["type"] == "published").then_some(r)
    });
    let got_a = on_a.join().unwrap();
    let got_b = on_b.join().unwrap();

    assert!(acked.len() > 200, "only {} of {sent} acknowledged", acked.len());
    assert!(refused > 0, "the outage refused nothing: did it happen?");
    for (name, got, node) in [("a", &got_a, &a), ("b", &got_b, &b)] {
        let mut seen = HashSet::new();
        let mut positions = HashMap::new();
        for m in got.iter().filter(|m| m["type"] == "message") {
            let Some(offset) = m["offset"].as_u64() else {
                continue;
            };
            let key = (m["epoch"].as_str().unwrap().to_owned(), offset);
            assert!(seen.insert(key.clone()), "{name}: duplicate {key:?}");
            positions.insert(key, m["data"].as_str().unwrap().to_owned());
        }
        // Every acknowledged message arrived, with its own data, unless it lies in a gap the
        // subscriber was told of (`recovered: false`) between the positions around it.
        let gaps = gaps(name, got);
        eprintln!(
            "{name}: {} messages acknowledged; gaps told: {gaps:?}",
            acked.len()
        );
        let mut missing = Vec::new();
        for (key, i) in &acked {
            match positions.get(key) {
                Some(data) => assert_eq!(data, &i.to_string(), "{name}: wrong data at {key:?}"),
                None if gaps.iter().any(|g| g.excuses(key)) => {}
                None => missing.push((*i, key)),
            }
        }
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "{name}: acknowledged messages missing outside any recovered:false gap {gaps:?}: {missing:?}"
        );
        let end_key = (
            end["epoch"].as_str().unwrap().to_owned(),
            end["offset"].as_u64().unwrap(),
        );
        assert_eq!(positions.get(&end_key).map(String::as_str), Some("end"));
        // Bounded memory: a node that queued everything it could not send would grow.
        let rss = rss_kib(node.pid());
        assert!(rss < 100 * 1024, "{name}: {rss} KiB resident");
    }
}

#[test]
fn a_full_loop_inbox_drops_deliveries_and_v1_clients_recover_them() {
    // An inbox of one delivery: bursts overflow it; the drops are counted and v1 subscribers
    // fill the gaps from history by offset. In-process, then through Redis.
    let flags = ["--threads", "1", "--loop-queue", "1", "--history-size", "100000"];
    inbox_overflow(Node::start(&flags));
    let redis = Redis::start();
    let url = redis.url();
    inbox_overflow(Node::start(&[&flags[..], &["--redis", &url]].concat()));
}

fn inbox_overflow(node: Node) {
    let mut v1 = V1::connect(node.addr, None).unwrap();
    v1.subscribe("burst", None).unwrap();
    let mut raw = node.client("/burst");
    raw.sync("start", WAIT).unwrap();
    assert_eq!(v1.message(WAIT).unwrap()["data"], "start");
    // 3,000 messages in one write: the publisher pipelines them, the subscriber thread routes
    // them faster than one loop turn takes.
    let mut burst = Vec::new();
    for i in 0..3000 {
        let payload = format!("{i}");
        wire::encode_masked(&mut burst, wire::op::TEXT, payload.as_bytes());
    }
    std::io::Write::write_all(raw.inner().get_mut(), &burst).unwrap();
    let mut last = 0;
    for i in 0..3000 {
        let m = v1
            .message(WAIT)
            .unwrap_or_else(|e| panic!("message {i}: {e}; metrics: {}", node.http_get("/metrics").1));
        assert_eq!(m["data"], i.to_string(), "message {i}");
        let offset = m["offset"].as_u64().unwrap();
        assert!(offset > last);
        last = offset;
    }
    assert!(
        node.metric("wsrelay_deliveries_dropped_total") > 0,
        "the inbox never overflowed"
    );
    assert!(node.log().iter().any(|l| l.contains("inbox full")));
}

#[test]
fn a_full_publish_queue_refuses_publishes() {
    let redis = Redis::start();
    let node = Node::start(&["--redis", &redis.url(), "--publish-queue", "2"]);
    let mut v1 = V1::connect(node.addr, None).unwrap();
    wait_for("subscriber up", WAIT, || {
        (node.http_get("/healthz").0 == 200).then_some(())
    });
    // A stopped Redis holds the publisher in its first batch; the queue behind it fills.
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(redis.pid() as i32, libc::SIGSTOP) };
    for i in 0..20 {
        v1.send(&serde_json::json!({"op":"publish","channel":"q","data":i.to_string(),"ref":i}))
            .unwrap();
    }
    // Refusals are answered at once, while Redis is still stopped.
    let mut replies = vec![v1.next(WAIT).unwrap()];
    assert_eq!(replies[0]["code"], "publish_queue_full", "{}", replies[0]);
    unsafe { libc::kill(redis.pid() as i32, libc::SIGCONT) };
    // Every publish gets one answer; those refused are exactly the ones counted.
    while replies.len() < 20 {
        replies.push(v1.next(WAIT).unwrap());
    }
    let mut refs: Vec<u64> = replies.iter().map(|r| r["ref"].as_u64().unwrap()).collect();
    refs.sort_unstable();
    assert_eq!(refs, (0..20).collect::<Vec<_>>());
    let refused = replies
        .iter()
        .filter(|r| r["code"] == "publish_queue_full")
        .count() as u64;
    assert_eq!(node.metric("wsrelay_publish_dropped_total"), refused);
    assert!(node.log().iter().any(|l| l.contains("publish queue full")));
}
