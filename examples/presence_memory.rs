//! Redis memory per presence entry: one channel's presence filled with `wsrelay.v1`
//! subscribers, measured with `MEMORY USAGE` on its two keys and with `INFO memory`'s
//! `used_memory`, at several sizes. Starts its own `redis-server` (on a free port) and wsrelay
//! (the debug or release binary next to this example), like the tests.
//!
//! ```sh
//! cargo build --release && cargo run --release --example presence_memory -- 100 1000 5000
//! ```
//!
//! Each subscriber's `info` is `{"name":"user-00042"}`, so an entry is about 70 bytes of JSON
//! (`{"client":"<node>-0-<serial>","info":{"name":"user-00042"}}`). `tuning.md` has the numbers.

use std::time::Duration;

use serde_json::json;
use wsrelay_testkit::{Node, Redis, V1, wait_for};

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are numbers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000, 5000]
    } else {
        sizes
    };
    wsrelay::listener::raise_fd_limit().expect("open-file limit");
    let redis = Redis::start();
    let url = redis.url();
    let max = sizes.iter().max().copied().unwrap_or(1).to_string();
    let node = Node::start(&[
        "--redis",
        &url,
        "--presence",
        "room",
        "--presence-max",
        &max,
        "--threads",
        "1",
    ]);
    let mut con = redis.con();
    let used = |con: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("memory").query(con).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let key_usage = |con: &mut redis::Connection, key: &str| -> u64 {
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query::<Option<u64>>(con)
            .unwrap()
            .unwrap_or(0)
    };
    let mut watcher = V1::connect(node.addr, None).unwrap();
    let before = used(&mut con);
    let mut clients = Vec::new();
    println!(
        "entries | MEMORY USAGE of the hash + the sorted set | per entry | used_memory growth | per entry | entry JSON"
    );
    for &n in &sizes {
        while clients.len() < n {
            let mut c = V1::connect(node.addr, None).unwrap();
            let name = format!("user-{:05}", clients.len());
            let r = c.subscribe_with_info("room", json!({ "name": name })).unwrap();
            assert_eq!(r["type"], "subscribed", "{r}");
            clients.push(c);
        }
        wait_for("every subscriber listed", Duration::from_secs(60), || {
            let st = watcher.presence_stats("room").unwrap();
            (st["clients"].as_u64() == Some(n as u64)).then_some(())
        });
        let keys = key_usage(&mut con, "wsrelay:{room}:presence")
            + key_usage(&mut con, "wsrelay:{room}:presence-exp");
        let grown = used(&mut con).saturating_sub(before);
        let sample: Option<String> = redis::cmd("HRANDFIELD")
            .arg("wsrelay:{room}:presence")
            .query(&mut con)
            .unwrap();
        let entry: String = redis::cmd("HGET")
            .arg("wsrelay:{room}:presence")
            .arg(sample.unwrap_or_default())
            .query(&mut con)
            .unwrap();
        println!(
            "{n} | {keys} B | {} B | {grown} B | {} B | {} B ({entry})",
            keys / n as u64,
            grown / n as u64,
            entry.len()
        );
    }
}
