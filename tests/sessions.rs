//! Sessions under stress: what a resumed session may restore (only what the current token
//! grants), whose session a raw id names (its token subject's), and where a resume starts
//! (never after a message the client did not get), in-process and through Redis.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use wsrelay::auth::{Claims, mint};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn token(sub: &str, subscribe: &[&str], publish: &[&str]) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = Claims {
        sub: sub.into(),
        exp: now + 600,
        nbf: None,
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        publish: publish.iter().map(|s| s.to_string()).collect(),
    };
    mint(SECRET.as_bytes(), &claims)
}

/// A node in-process (`None`) or on `redis`, with extra flags; tokens required when `auth`.
fn node(redis: Option<&Redis>, auth: bool, extra: &[&str]) -> Node {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
    cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
    if let Some(r) = redis {
        cmd.args(["--redis", &r.url()]);
    }
    if auth {
        cmd.env("WSRELAY_TOKEN_SECRET", SECRET);
    }
    Node::spawn(&mut cmd)
}

fn both_modes(test: impl Fn(Option<&Redis>)) {
    test(None);
    let redis = Redis::start();
    test(Some(&redis));
}

/// Publishes `data` on `channel` through a fresh v1 connection (with `token` if given) and
/// returns the acknowledgement.
fn publish(n: &Node, token: Option<&str>, channel: &str, data: &str) -> Value {
    let mut p = V1::connect_with(n.addr, None, token).unwrap();
    let ack = p.publish(channel, data).unwrap();
    assert_eq!(ack["type"], "published", "{ack}");
    ack
}

/// Sends a ping and waits for its pong. A raw connection is read only once its subscription
/// is in effect, so the pong proves the connection is subscribed.
#[track_caller]
fn ping_pong(c: &mut Client) {
    use tungstenite::Message;
    let ws = c.inner();
    ws.send(Message::Ping("p".into())).unwrap();
    ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
    loop {
        match ws.read().unwrap() {
            Message::Pong(_) => return,
            Message::Ping(_) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn a_resumed_session_keeps_only_what_the_current_token_grants() {
    both_modes(|redis| {
        let n = node(redis, true, &[]);
        let broad = token("alice", &["private:*", "public"], &[]);
        let narrow = token("alice", &["public"], &[]);
        let admin = token("ops", &[], &["*"]);

        let mut a = V1::connect_with(n.addr, None, Some(&broad)).unwrap();
        assert_eq!(
            a.subscribe("private:payroll", None).unwrap()["type"],
            "subscribed"
        );
        assert_eq!(a.subscribe("public", None).unwrap()["type"], "subscribed");
        let id = a.session.clone();
        a.client.close();

        // The narrower token may not subscribe to the private channel directly...
        let mut b = V1::connect_with(n.addr, None, Some(&narrow)).unwrap();
        assert_eq!(b.subscribe("private:payroll", None).unwrap()["code"], "forbidden");
        b.client.close();
        // ...nor through the session: it is dropped and announced, the rest is restored.
        let mut b = V1::connect_with(n.addr, Some(&id), Some(&narrow)).unwrap();
        assert!(b.resumed);
        let mut announced: Vec<Value> = (0..2).map(|_| b.next(WAIT).unwrap()).collect();
        announced.sort_by_key(|v| v["channel"].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            (announced[0]["type"].as_str(), announced[0]["channel"].as_str()),
            (Some("unsubscribed"), Some("private:payroll")),
            "{announced:?}"
        );
        assert_eq!(announced[0]["reason"], "forbidden");
        assert_eq!(
            (announced[1]["type"].as_str(), announced[1]["channel"].as_str()),
            (Some("subscribed"), Some("public")),
            "{announced:?}"
        );
        publish(&n, Some(&admin), "private:payroll", "salaries");
        publish(&n, Some(&admin), "public", "news");
        assert_eq!(b.message(WAIT).unwrap()["data"], "news");
        b.client.close();

        // The stored session no longer holds it, even for the token that could have it.
        let mut a = V1::connect_with(n.addr, Some(&id), Some(&broad)).unwrap();
        assert!(a.resumed);
        let restored = a.next(WAIT).unwrap();
        assert_eq!(
            (restored["type"].as_str(), restored["channel"].as_str()),
            (Some("subscribed"), Some("public")),
            "{restored}"
        );
        publish(&n, Some(&admin), "private:payroll", "more salaries");
        publish(&n, Some(&admin), "public", "more news");
        assert_eq!(a.message(WAIT).unwrap()["data"], "more news");
    });
}

#[test]
fn raw_session_ids_belong_to_their_token_subject() {
    both_modes(|redis| {
        let n = node(redis, true, &[]);
        let alice = token("alice", &["room"], &["room"]);
        let bob = token("bob", &["room"], &["room"]);
        let path = |t: &str| format!("/room?session=alices-own-id-0001&token={t}");

        // Bob takes Alice's chosen id first.
        let mut b = Client::connect(n.addr, &path(&bob)).unwrap();
        b.sync("bob was here", WAIT).unwrap();
        b.close();
        // Alice's session under that id is still hers.
        let mut a = Client::connect(n.addr, &path(&alice)).unwrap();
        a.sync("alice is here", WAIT).unwrap();
        a.close();
        for i in 0..3 {
            publish(&n, Some(&alice), "room", &format!("missed-{i}"));
        }
        // Each resumes their own session: Bob also missed Alice's first message.
        for (who, t, missed) in [("alice", &alice, 0), ("bob", &bob, 1)] {
            let mut c = Client::connect(n.addr, &path(t)).unwrap();
            if missed == 1 {
                assert_eq!(c.recv_text(WAIT).unwrap(), "alice is here");
            }
            for i in 0..3 {
                assert_eq!(c.recv_text(WAIT).unwrap(), format!("missed-{i}"), "{who}");
            }
            c.sync(&format!("{who} is back"), WAIT).unwrap();
            c.close();
        }
    });
}

#[test]
fn a_raw_session_that_received_nothing_resumes_without_loss() {
    both_modes(|redis| {
        let n = node(redis, false, &[]);
        let mut c = Client::connect(n.addr, "/quiet?session=quiet-session-0001").unwrap();
        ping_pong(&mut c);
        c.close();
        for i in 0..3 {
            publish(&n, None, "quiet", &format!("missed-{i}"));
        }
        let mut c = Client::connect(n.addr, "/quiet?session=quiet-session-0001").unwrap();
        for i in 0..3 {
            assert_eq!(c.recv_text(WAIT).unwrap(), format!("missed-{i}"));
        }
        c.sync("live", WAIT).unwrap();
    });
}

/// The messages of `c` until `stop` arrives (inclusive), as (offset, data).
fn messages_until(c: &mut V1, stop: &str) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    loop {
        let m = c.next(WAIT).unwrap();
        if m["type"] != "message" {
            continue;
        }
        let data = m["data"].as_str().unwrap().to_owned();
        got.push((m["offset"].as_u64().unwrap(), data.clone()));
        if data == stop {
            return got;
        }
    }
}

#[test]
fn a_new_subscription_is_stored_before_its_reply_so_a_crash_loses_nothing() {
    let redis = Redis::start();
    // Flushes are rare: only storing the position at once can save the client.
    let flags = ["--session-flush", "30s"];
    let mut a = node(Some(&redis), false, &flags);
    let mut b = node(Some(&redis), false, &flags);
    let c_node = node(Some(&redis), false, &flags);
    for i in 1..=3 {
        publish(&b, None, "s", &i.to_string());
    }
    let mut c = V1::connect(a.addr, None).unwrap();
    let id = c.session.clone();
    let sub = c.subscribe("s", None).unwrap();
    assert_eq!(sub["offset"], 3, "{sub}");
    a.kill();
    for i in 4..=6 {
        publish(&b, None, "s", &i.to_string());
    }
    let mut c = V1::connect(b.addr, Some(&id)).unwrap();
    assert!(c.resumed);
    let sub = c.next(WAIT).unwrap();
    assert_eq!(
        (sub["type"].as_str(), &sub["recovered"]),
        (Some("subscribed"), &json!(true)),
        "{sub}"
    );
    let got = messages_until(&mut c, "6");
    assert_eq!(got, vec![(4, "4".into()), (5, "5".into()), (6, "6".into())]);

    // The node that restored it dies as well: the next resume still starts early enough.
    b.kill();
    for i in 7..=8 {
        publish(&c_node, None, "s", &i.to_string());
    }
    let mut c = V1::connect(c_node.addr, Some(&id)).unwrap();
    assert!(c.resumed);
    let sub = c.next(WAIT).unwrap();
    assert_eq!(sub["recovered"], true, "{sub}");
    let got = messages_until(&mut c, "8");
    let new: Vec<u64> = got.iter().map(|(o, _)| *o).filter(|&o| o > 6).collect();
    assert_eq!(new, vec![7, 8], "{got:?}");
    assert!(got.iter().all(|(o, d)| *d == o.to_string()), "{got:?}");
}

#[test]
fn output_a_client_never_got_is_not_counted_as_delivered() {
    both_modes(|redis| {
        let n = node(redis, false, &["--max-output", "8388608"]);
        let mut c = V1::connect(n.addr, None).unwrap();
        // A small receive buffer keeps what the client does not read on the server's side.
        socket2::SockRef::from(c.client.inner().get_ref())
            .set_recv_buffer_size(4096)
            .unwrap();
        let id = c.session.clone();
        c.subscribe("big", None).unwrap();
        let body = "x".repeat(8 * 1024);
        let mut p = V1::connect(n.addr, None).unwrap();
        for i in 1..=100 {
            let ack = p.publish("big", &format!("{i}:{body}")).unwrap();
            assert_eq!(ack["type"], "published");
        }
        // The client reads five messages, then its connection breaks (reset).
        let mut last = 0;
        for _ in 0..5 {
            let m = c.message(WAIT).unwrap();
            last = m["offset"].as_u64().unwrap();
        }
        let stream: &TcpStream = c.client.inner().get_ref();
        socket2::SockRef::from(stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        // Resuming starts at or before the first message the client did not get.
        let mut c = V1::connect(n.addr, Some(&id)).unwrap();
        assert!(c.resumed);
        let sub = c.next(WAIT).unwrap();
        assert_eq!(sub["recovered"], true, "{sub}");
        let first = c.message(WAIT).unwrap()["offset"].as_u64().unwrap();
        assert!(
            first <= last + 1,
            "resumed at {first}, the client had only up to {last}"
        );
    });
}

#[test]
fn one_user_keeps_at_most_its_cap_of_sessions() {
    both_modes(|redis| {
        let n = node(redis, true, &["--max-sessions-per-subject", "3"]);
        let mallory = token("mallory", &["*"], &[]);
        let alice = token("alice", &["*"], &[]);
        let mut a = V1::connect_with(n.addr, None, Some(&alice)).unwrap();
        a.subscribe("room", None).unwrap();
        let alices = a.session.clone();
        a.client.close();
        // One user opening connection after connection (each a session of its own).
        let mut ids = Vec::new();
        for _ in 0..5 {
            let mut m = V1::connect_with(n.addr, None, Some(&mallory)).unwrap();
            m.subscribe("room", None).unwrap();
            ids.push(m.session.clone());
            m.client.close();
        }
        // Newest first: resuming a kept session saves it again, and presenting a dropped id
        // starts a new session (which counts against the cap): so the dropped ones last.
        let resumed: Vec<bool> = ids
            .iter()
            .rev()
            .map(|id| {
                V1::connect_with(n.addr, Some(id), Some(&mallory))
                    .unwrap()
                    .resumed
            })
            .collect();
        assert_eq!(resumed, [true, true, true, false, false]);
        assert!(
            V1::connect_with(n.addr, Some(&alices), Some(&alice))
                .unwrap()
                .resumed
        );
        if let Some(r) = redis {
            // Three of mallory's (the two presented again made new ones that pushed out two
            // more) and alice's. The sessions a save pushes out are deleted by the node right
            // after the save (a command of its own), and the connections above are still
            // being closed and saved: wait for the count to settle at the cap.
            let mut con = r.con();
            wait_for("the session count to settle at 4", Duration::from_secs(5), || {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("wsrelay:session:*")
                    .query(&mut con)
                    .unwrap();
                (keys.len() == 4).then_some(())
            });
        }
    });
}
