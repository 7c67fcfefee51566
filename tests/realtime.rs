//! What real-time apps need beyond fan-out (issue 14), each in-process (one node) and through
//! Redis with two nodes: presence, join and leave events (and a SIGKILLed node's subscribers
//! leaving by themselves), history on demand, the server API for backends, and token expiry
//! and refresh. Clients are the shipped Rust client (`V1`, `Api`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use wsrelay::auth::{Claims, mint};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
const KEY: &str = "realtime-test-api-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(sub: &str, subscribe: &[&str], exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        publish: vec!["*".into()],
    };
    mint(SECRET.as_bytes(), &claims)
}

/// One node in-process, or two nodes on one Redis; `at(i)` is the address of node `i` (the
/// same node twice in-process).
struct Setup {
    nodes: Vec<Node>,
    _redis: Option<Redis>,
}

impl Setup {
    fn start(redis: bool, flags: &[&str]) -> Setup {
        let redis = redis.then(Redis::start);
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.extend(["--api-key".into(), KEY.into()]);
        if let Some(r) = &redis {
            args.extend(["--redis".to_owned(), r.url()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let n = if redis.is_some() { 2 } else { 1 };
        let nodes = (0..n).map(|_| Node::start(&args)).collect();
        Setup { nodes, _redis: redis }
    }

    fn at(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].addr
    }

    fn api(&self, i: usize) -> Api {
        Api::new(self.at(i), KEY)
    }
}

fn both_modes(test: impl Fn(bool)) {
    test(false);
    test(true);
}

fn v1(addr: SocketAddr) -> V1 {
    V1::connect(addr, None).unwrap()
}

fn v1_token(addr: SocketAddr, token: &str) -> V1 {
    V1::connect_with(addr, None, Some(token)).unwrap()
}

/// The client ids a presence reply lists, sorted.
fn listed(reply: &Value) -> Vec<String> {
    assert_eq!(reply["type"], "presence", "{reply}");
    let mut ids: Vec<String> = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Polls `c`'s presence of `channel` until it lists exactly `want`.
#[track_caller]
fn wait_listed(c: &mut V1, channel: &str, want: &[String]) -> Value {
    let mut want = want.to_vec();
    want.sort();
    let mut last = Value::Null;
    let found = (0..400).find_map(|_| {
        last = c.presence(channel).unwrap();
        if listed(&last) == want {
            return Some(last.clone());
        }
        std::thread::sleep(Duration::from_millis(25));
        None
    });
    found.unwrap_or_else(|| panic!("presence of {channel} never listed {want:?}; last {last}"))
}

#[test]
fn presence_lists_subscribers_across_nodes_with_info_users_and_a_bound() {
    both_modes(|redis| {
        let s = Setup::start(
            redis,
            &[
                "--presence",
                "room:*",
                "--token-secret",
                SECRET,
                "--presence-max",
                "3",
                "--presence-entry-size",
                "200",
                // Refreshed every second: a subscriber waiting past the bound on one node
                // takes the room a leave on another freed within that.
                "--presence-ttl",
                "3s",
            ],
        );
        let exp = now() + 600;
        let alice = token("alice", &["room:*", "other"], exp);
        let bob = token("bob", &["room:*", "other"], exp);
        let mut a1 = v1_token(s.at(0), &alice);
        let mut a2 = v1_token(s.at(1), &alice);
        let mut b = v1_token(s.at(1), &bob);
        let r = a1.subscribe_with_info("room:1", json!({"name": "Ada"})).unwrap();
        assert_eq!(r["type"], "subscribed", "{r}");
        a2.subscribe("room:1", None).unwrap();
        b.subscribe("room:1", None).unwrap();

        // Every node sees the same three subscriptions, with user and info.
        let three = [a1.client_id.clone(), a2.client_id.clone(), b.client_id.clone()];
        let p = wait_listed(&mut b, "room:1", &three);
        let mine = p["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client"] == a1.client_id.as_str())
            .unwrap();
        assert_eq!(mine["user"], "alice");
        assert_eq!(mine["info"]["name"], "Ada");
        wait_listed(&mut a1, "room:1", &three);
        let st = a1.presence_stats("room:1").unwrap();
        assert_eq!(
            (st["type"].as_str(), st["clients"].as_u64(), st["users"].as_u64()),
            (Some("presence_stats"), Some(3), Some(2)),
            "{st}"
        );

        // The bound: a fourth subscriber is not listed, and that is counted.
        let mut c = v1_token(s.at(0), &bob);
        assert_eq!(c.subscribe("room:1", None).unwrap()["type"], "subscribed");
        let overflow = || {
            s.nodes
                .iter()
                .map(|n| n.metric("wsrelay_presence_overflow_total"))
                .sum::<u64>()
        };
        wait_for("the overflow to be counted", WAIT, || {
            (overflow() == 1).then_some(())
        });
        assert_eq!(
            listed(&c.presence("room:1").unwrap()),
            sorted(&three.each_ref().map(|c| c.as_str()))
        );

        // Unsubscribing and closing take subscriptions out, on every node; the subscriber
        // waiting past the bound takes the first room freed (a leave on the other node).
        let four = [three[0].clone(), three[2].clone(), c.client_id.clone()];
        a2.request(json!({"op": "unsubscribe", "channel": "room:1"}))
            .unwrap();
        wait_listed(&mut c, "room:1", &four);
        a1.client.close();
        wait_listed(&mut c, "room:1", &four[1..]);
        assert_eq!(overflow(), 1, "a waiting subscriber is counted once");

        // Refusals: no presence on the channel, no grant, info too large.
        let code = |c: &mut V1, cmd: Value| c.request(cmd).unwrap()["code"].as_str().unwrap_or("").to_owned();
        assert_eq!(
            code(&mut b, json!({"op": "presence", "channel": "other"})),
            "not_enabled"
        );
        assert_eq!(
            code(&mut b, json!({"op": "presence", "channel": "secret"})),
            "forbidden"
        );
        let big = "x".repeat(200);
        assert_eq!(
            code(
                &mut b,
                json!({"op": "subscribe", "channel": "room:2", "info": {"name": big}})
            ),
            "bad_request"
        );
        // The server API reads it too.
        let (status, p) = s.api(0).presence("room:1", false).unwrap();
        assert_eq!(status, 200, "{p}");
        assert_eq!(listed(&p), sorted(&[&b.client_id, &c.client_id]));
        let (status, p) = s.api(1).presence("room:1", true).unwrap();
        assert_eq!((status, p["clients"].as_u64()), (200, Some(2)), "{p}");
    });
}

/// Every frame `c` receives until the message `marker` published on `channel`: the types of
/// the join and leave events among them, with their client ids.
fn events_until(c: &mut V1, channel: &str, marker: &str) -> Vec<(String, String)> {
    c.publish(channel, marker).unwrap();
    let mut events = Vec::new();
    loop {
        let v = c.next(WAIT).unwrap();
        if v["type"] == "message" && v["data"] == marker {
            return events;
        }
        if v["type"] == "join" || v["type"] == "leave" {
            assert_eq!(v["channel"], channel, "{v}");
            events.push((
                v["type"].as_str().unwrap().to_owned(),
                v["client"].as_str().unwrap().to_owned(),
            ));
        }
    }
}

#[test]
fn join_and_leave_events_reach_every_node_once() {
    both_modes(|redis| {
        let s = Setup::start(redis, &["--join-leave", "room:*", "--presence", "quiet:*"]);
        let mut w = v1(s.at(0));
        w.subscribe("room:1", None).unwrap();
        w.subscribe("quiet:1", None).unwrap();
        let own = w.next_of("join", WAIT).unwrap();
        assert_eq!(
            own["client"],
            w.client_id.as_str(),
            "a subscriber sees its own join: {own}"
        );

        let mut c = v1(s.at(1));
        c.subscribe_with_info("room:1", json!({"name": "Cy"})).unwrap();
        c.subscribe("quiet:1", None).unwrap();
        let j = w.next_of("join", WAIT).unwrap();
        assert_eq!(
            (j["client"].as_str(), j["info"]["name"].as_str()),
            (Some(c.client_id.as_str()), Some("Cy"))
        );
        c.client.close();
        let l = w.next_of("leave", WAIT).unwrap();
        assert_eq!(l["client"], c.client_id.as_str(), "{l}");
        assert_eq!(l["info"]["name"], "Cy");

        // Exactly once each, and none on a channel with presence but no events.
        let seen = events_until(&mut w, "room:1", "end");
        assert!(seen.is_empty(), "no event twice: {seen:?}");
        let quiet = events_until(&mut w, "quiet:1", "end");
        assert!(quiet.is_empty(), "quiet:* has no events: {quiet:?}");
        // Raw clients of the channel never see events.
        let mut raw = Client::connect(s.at(1), "/room:1").unwrap();
        raw.sync("raw-ready", WAIT).unwrap();
        let mut d = v1(s.at(1));
        d.subscribe("room:1", None).unwrap();
        let j = w.next_of("join", WAIT).unwrap();
        assert_eq!(j["client"], d.client_id.as_str());
        let before = raw.sync("raw-again", WAIT).unwrap();
        assert!(
            before
                .iter()
                .all(|m| !matches!(m, Received::Text(t) if t.contains("join"))),
            "{before:?}"
        );
    });
}

/// Two nodes on one Redis with join/leave on `room:*` and `extra` flags, and a watcher on the
/// first subscribed to `room:1`.
fn watched_pair(extra: &[&str]) -> (Redis, Node, Node, V1) {
    let redis = Redis::start();
    let url = redis.url();
    let mut flags = vec!["--redis", &url, "--join-leave", "room:*"];
    flags.extend_from_slice(extra);
    let a = Node::start(&flags);
    let b = Node::start(&flags);
    let mut w = v1(a.addr);
    w.subscribe("room:1", None).unwrap();
    (redis, a, b, w)
}

#[test]
fn a_sigkilled_nodes_subscribers_leave_presence_within_the_ttl() {
    let (_redis, _a, mut b, mut w) = watched_pair(&["--presence-ttl", "1500ms"]);
    let mut gone = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..3 {
        let mut c = v1(b.addr);
        c.subscribe("room:1", None).unwrap();
        gone.push(c.client_id.clone());
        keep.push(c);
    }
    let mut all = gone.clone();
    all.push(w.client_id.clone());
    wait_listed(&mut w, "room:1", &all);
    while w.next_of("join", Duration::from_millis(200)).is_ok() {}

    let killed = Instant::now();
    b.kill();
    // Leaves come from the next refresh of another node (every third of the TTL) once the
    // entries expired: within TTL + TTL/3 (+ the time to run it).
    let mut left = Vec::new();
    while left.len() < gone.len() {
        let l = w
            .next_of("leave", Duration::from_secs(5))
            .expect("a leave for each");
        left.push(l["client"].as_str().unwrap().to_owned());
    }
    let took = killed.elapsed();
    left.sort();
    let mut want = gone.clone();
    want.sort();
    assert_eq!(left, want);
    assert!(
        took < Duration::from_millis(1500 + 500 + 1500),
        "leaves took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1000),
        "not before the entries expired: {took:?}"
    );
    assert_eq!(listed(&w.presence("room:1").unwrap()), sorted(&[&w.client_id]));
    drop(keep);
}

#[test]
fn a_stopping_nodes_subscribers_leave_at_once() {
    // The default TTL (30 s): leaves that came only from expiry would not come in time.
    let (_redis, _a, mut b, mut w) = watched_pair(&["--shutdown-timeout", "1s"]);
    let mut c = v1(b.addr);
    c.subscribe("room:1", None).unwrap();
    let j = w.next_of("join", WAIT).unwrap();
    let j = if j["client"] == w.client_id.as_str() {
        w.next_of("join", WAIT).unwrap()
    } else {
        j
    };
    assert_eq!(j["client"], c.client_id.as_str());
    b.signal(libc::SIGINT);
    let l = w.next_of("leave", Duration::from_secs(5)).unwrap();
    assert_eq!(l["client"], c.client_id.as_str());
    assert_eq!(b.wait_exit(WAIT).code(), Some(0));
    assert_eq!(listed(&w.presence("room:1").unwrap()), vec![w.client_id.clone()]);
}

/// Publishes `n` messages `m1..` on `channel` through `c`; the last offset.
fn publish_n(c: &mut V1, channel: &str, n: usize, size: usize) -> (u64, String) {
    let mut last = Value::Null;
    for i in 1..=n {
        let data = format!("m{i}:{}", "x".repeat(size));
        last = c.publish(channel, &data).unwrap();
        assert_eq!(last["type"], "published", "{last}");
    }
    (
        last["offset"].as_u64().unwrap(),
        last["epoch"].as_str().unwrap().to_owned(),
    )
}

fn offsets(h: &Value) -> Vec<u64> {
    h["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {h}"))
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[test]
fn history_on_demand_newest_after_a_position_and_over_http() {
    both_modes(|redis| {
        let s = Setup::start(redis, &["--history-size", "8", "--token-secret", SECRET]);
        let t = token("u", &["news", "big"], now() + 600);
        let mut p = v1_token(s.at(0), &t);
        let (top, epoch) = publish_n(&mut p, "news", 10, 0);
        assert_eq!(top, 10);
        let mut c = v1_token(s.at(1), &t);

        let h = c.history("news", Some(3), None).unwrap();
        assert_eq!(h["type"], "history", "{h}");
        assert_eq!(
            (h["offset"].as_u64(), h["epoch"].as_str()),
            (Some(10), Some(epoch.as_str()))
        );
        assert_eq!(offsets(&h), vec![8, 9, 10]);
        assert_eq!(h["messages"][2]["data"], "m10:");
        assert!(h.get("recovered").is_none());
        // Bounded by --history-size, whatever the limit asked.
        assert_eq!(
            offsets(&c.history("news", Some(1000), None).unwrap()),
            (3..=10).collect::<Vec<_>>()
        );
        // After a position: what follows it, in pages.
        let h = c.history("news", None, Some((6, &epoch))).unwrap();
        assert_eq!(
            (offsets(&h), h["recovered"].as_bool(), h["more"].as_bool()),
            (vec![7, 8, 9, 10], Some(true), Some(false))
        );
        let h = c.history("news", Some(2), Some((6, &epoch))).unwrap();
        assert_eq!((offsets(&h), h["more"].as_bool()), (vec![7, 8], Some(true)));
        // A limit of 0: the position alone, newest or after a position, and over HTTP.
        let h = c.history("news", Some(0), None).unwrap();
        assert_eq!((offsets(&h), h["offset"].as_u64()), (vec![], Some(10)), "{h}");
        let h = c.history("news", Some(0), Some((6, &epoch))).unwrap();
        assert_eq!((offsets(&h), h["offset"].as_u64()), (vec![], Some(10)), "{h}");
        let (status, h) = s.api(1).history("news", Some(0), None).unwrap();
        assert_eq!((status, offsets(&h)), (200, vec![]), "{h}");
        // A stale epoch, or a position the history no longer covers, says so.
        let h = c.history("news", None, Some((6, "some-old-epoch"))).unwrap();
        assert_eq!(
            (offsets(&h), h["recovered"].as_bool()),
            (vec![], Some(false)),
            "{h}"
        );
        if !redis {
            // In-process the ring keeps exactly 8 (Redis trims in whole stream nodes).
            let h = c.history("news", None, Some((1, &epoch))).unwrap();
            assert_eq!(h["recovered"], false, "{h}");
        }
        // Not granted.
        let h = c.history("secret", None, None).unwrap();
        assert_eq!(h["code"], "forbidden", "{h}");
        // Over HTTP for backends, with the API key.
        let (status, h) = s.api(1).history("news", Some(2), None).unwrap();
        assert_eq!((status, offsets(&h)), (200, vec![9, 10]), "{h}");
        let (status, h) = s.api(0).history("news", None, Some((8, &epoch))).unwrap();
        assert_eq!(
            (status, offsets(&h), h["recovered"].as_bool()),
            (200, vec![9, 10], Some(true))
        );
        let (status, _) = Api::new(s.at(0), "a-wrong-api-key-123")
            .history("news", None, None)
            .unwrap();
        assert_eq!(status, 401);
    });
}

#[test]
fn a_history_reply_is_bounded_in_bytes() {
    both_modes(|redis| {
        let s = Setup::start(redis, &["--history-size", "1000"]);
        let mut p = v1(s.at(0));
        // 300 messages of 2 KB: 600 KB stored, more than one reply may hold (256 KiB).
        publish_n(&mut p, "big", 300, 2000);
        let h = v1(s.at(1)).history("big", None, None).unwrap();
        let got = offsets(&h);
        let payload: usize = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"].as_str().unwrap().len())
            .sum();
        assert!(payload <= 256 * 1024, "{payload} bytes of payload in one reply");
        assert!(got.len() >= 100 && got.len() < 256, "{} messages", got.len());
        assert_eq!(*got.last().unwrap(), 300, "the newest");
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
        // Paging forward from a position goes on where a page stopped.
        let epoch = h["epoch"].as_str().unwrap().to_owned();
        let first = v1(s.at(1)).history("big", None, Some((0, &epoch))).unwrap();
        assert_eq!((first["more"].as_bool(), offsets(&first)[0]), (Some(true), 1));
    });
    let s = Setup::start(false, &["--history-size", "0"]);
    let h = v1(s.at(0)).history("news", None, None).unwrap();
    assert_eq!(h["code"], "not_enabled", "{h}");
}

#[test]
fn the_server_api_reaches_every_node() {
    both_modes(|redis| {
        let s = Setup::start(redis, &["--token-secret", SECRET]);
        let nodes = s.nodes.len() as u64;
        let exp = now() + 600;
        let u1 = token("u1", &["*"], exp);
        let u2 = token("u2", &["*"], exp);
        let mut a = v1_token(s.at(0), &u1);
        let mut b = v1_token(s.at(1), &u1);
        let mut raw = Client::connect(s.at(1), &format!("/room?token={u1}")).unwrap();
        raw.sync("raw-ready", WAIT).unwrap();
        let mut other = v1_token(s.at(1), &u2);
        for c in [&mut a, &mut b, &mut other] {
            assert_eq!(c.subscribe("room", None).unwrap()["type"], "subscribed");
        }
        other.subscribe("news", None).unwrap();

        // Broadcast: one call, several channels, delivered on every node.
        let (status, r) = s.api(0).broadcast(&["room", "news"], "hello all").unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["results"].as_array().unwrap().len(), 2);
        assert_eq!(r["results"][1]["channel"], "news");
        assert!(r["results"][0]["offset"].is_u64(), "{r}");
        for _ in 0..2 {
            let m = other.next_of("message", WAIT).unwrap();
            assert_eq!(m["data"], "hello all");
        }
        assert_eq!(b.next_of("message", WAIT).unwrap()["data"], "hello all");

        // Channels and their subscribers across nodes (reported within about two seconds).
        wait_for("channels across nodes", WAIT, || {
            let (_, c) = s.api(1).channels(None).unwrap();
            let room = c["channels"]
                .as_array()?
                .iter()
                .find(|x| x["channel"] == "room")?
                .clone();
            (room["subscribers"] == 4).then_some(())
        });
        // Nodes alive, with their connections and version.
        wait_for("every node in info", WAIT, || {
            let (_, i) = s.api(0).info().unwrap();
            let list = i["nodes"].as_array()?.clone();
            (list.len() as u64 == nodes && list.iter().all(|n| n["version"] == env!("CARGO_PKG_VERSION")))
                .then_some(())
        });

        // Unsubscribe a user from a channel on every node: its other subscriptions stay.
        let (status, r) = s.api(0).unsubscribe("u2", "room").unwrap();
        assert_eq!((status, r["nodes"].as_u64()), (200, Some(nodes)), "{r}");
        let n = other.next_of("unsubscribed", WAIT).unwrap();
        assert_eq!(
            (n["channel"].as_str(), n["reason"].as_str()),
            (Some("room"), Some("server"))
        );
        let (status, r) = s.api(1).publish("news", "still on news").unwrap();
        assert_eq!((status, r["type"].as_str()), (200, Some("published")), "{r}");
        assert_eq!(other.next_of("message", WAIT).unwrap()["data"], "still on news");

        // Disconnect a user everywhere, with a close code and reason, within a bounded time.
        let sent = Instant::now();
        let (status, r) = s.api(1).disconnect("u1", 4000, "banned").unwrap();
        assert_eq!((status, r["nodes"].as_u64()), (200, Some(nodes)), "{r}");
        for c in [&mut a.client, &mut b.client, &mut raw] {
            loop {
                match c.recv(WAIT).unwrap() {
                    Received::Closed(f) => {
                        assert_eq!(f, Some((4000, "banned".to_owned())));
                        break;
                    }
                    _ => continue,
                }
            }
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "took {:?}",
            sent.elapsed()
        );
        assert_eq!(
            other.request(json!({"op": "ping"})).unwrap()["type"],
            "pong",
            "u2 stays"
        );

        // Refusals: wrong key, bad bodies, the reserved control channel.
        let (status, _) = Api::new(s.at(0), "a-wrong-api-key-123").info().unwrap();
        assert_eq!(status, 401);
        let (status, r) = s.api(0).disconnect("u1", 1005, "").unwrap();
        assert_eq!((status, r["code"].as_str()), (400, Some("bad_request")));
        for body in [
            json!({"user": "u1", "reason": 5}),
            json!({"user": "u1", "code": "4000"}),
            json!({"user": 7}),
        ] {
            let (status, r) = s.api(0).request("POST", "/api/disconnect", Some(&body)).unwrap();
            assert_eq!(
                (status, r["code"].as_str()),
                (400, Some("bad_request")),
                "{body}: {r}"
            );
        }
        let (status, r) = s
            .api(0)
            .request(
                "POST",
                "/api/unsubscribe",
                Some(&json!({"user": "u1", "channel": 5})),
            )
            .unwrap();
        assert_eq!(status, 400, "{r}");
        let (status, _) = s.api(0).broadcast(&[], "x").unwrap();
        assert_eq!(status, 400);
        let r = other.subscribe("wsrelay:control", None).unwrap();
        assert_eq!(r["code"], "bad_channel", "{r}");
    });
    let n = Node::start(&[]);
    let (status, _) = Api::new(n.addr, KEY).info().unwrap();
    assert_eq!(status, 404, "no --api-key, no server API");
}

#[test]
fn a_token_expires_unless_refreshed_and_a_refresh_replaces_the_grants() {
    both_modes(|redis| {
        let s = Setup::start(redis, &["--token-secret", SECRET, "--token-leeway", "0s"]);
        let soon = now() + 2;
        let short = token("u", &["a:*", "b:*"], soon);
        // One with the token in a `connect` command, one with it in the URL.
        let mut kept = V1::connect_token(s.at(0), None, &short).unwrap();
        let mut lapsed = v1_token(s.at(1), &short);
        let mut raw = Client::connect(s.at(1), &format!("/a:raw?token={short}")).unwrap();
        raw.sync("raw-ready", WAIT).unwrap();
        for c in [&mut kept, &mut lapsed] {
            c.subscribe("a:x", None).unwrap();
            c.subscribe("b:x", None).unwrap();
        }
        // Refusals change nothing.
        let r = kept.refresh("not a token").unwrap();
        assert_eq!(r["code"], "unauthorized", "{r}");
        let r = kept.refresh(&token("someone-else", &["*"], now() + 60)).unwrap();
        assert_eq!(r["code"], "forbidden", "{r}");
        // A fresh token with fewer grants: in effect at once.
        let fresh = token("u", &["a:*"], now() + 600);
        let r = kept.refresh(&fresh).unwrap();
        assert_eq!(
            (r["type"].as_str(), r["expires"].as_u64()),
            (Some("refreshed"), Some(now() + 600))
        );
        let n = kept.next_of("unsubscribed", WAIT).unwrap();
        assert_eq!(
            (n["channel"].as_str(), n["reason"].as_str()),
            (Some("b:x"), Some("forbidden"))
        );
        let r = kept.subscribe("b:y", None).unwrap();
        assert_eq!(r["code"], "forbidden");

        // The others are closed at expiry with 4401; the refreshed one stays.
        for c in [&mut lapsed.client, &mut raw] {
            let f = loop {
                match c.recv(Duration::from_secs(5)).unwrap() {
                    Received::Closed(f) => break f,
                    _ => continue,
                }
            };
            assert_eq!(f, Some((TOKEN_EXPIRED, "token expired".to_owned())));
        }
        assert!(now() >= soon, "closed at expiry, not before");
        let r = kept.publish("a:x", "still here").unwrap();
        assert_eq!(r["type"], "published", "{r}");
        assert_eq!(kept.next_of("message", WAIT).unwrap()["data"], "still here");
        let expired: u64 = s
            .nodes
            .iter()
            .map(|n| n.metric("wsrelay_token_expired_closes_total"))
            .sum();
        assert_eq!(expired, 2);
    });
}
