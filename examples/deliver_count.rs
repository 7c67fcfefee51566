//! A fixed amount of fan-out work, for counting instructions instead of timing them (times on a
//! shared 2-core machine are noise; instruction counts are repeatable): 10,000 plain raw
//! subscribers, 200 deliveries of 64 bytes each. Run it under callgrind, counting only
//! `fanout::deliver`:
//!
//! ```sh
//! cargo build --release --example deliver_count
//! valgrind --tool=callgrind --toggle-collect='wsrelay::fanout::deliver*' \
//!     target/release/examples/deliver_count
//! ```
//!
//! `tuning.md` compares the count across versions (older versions took a `max_output`
//! argument in `fanout::deliver` and had `Turn::slow`).

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;
use tungstenite::protocol::{Role, WebSocketContext};
use wsrelay::bridge::Delivery;
use wsrelay::channels::Members;
use wsrelay::conn::{Conn, Open, Phase, Protocol, Sub};
use wsrelay::fanout::{self, Turn};
use wsrelay::frame::Kind;

fn main() {
    let n = 10_000;
    wsrelay::listener::raise_fd_limit().expect("open-file limit");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, peer) = listener.accept().unwrap();
    let channel: Arc<str> = Arc::from("bench");
    let now = Instant::now();
    let mut conns = Slab::with_capacity(n);
    let mut members = Members::default();
    for serial in 0..n as u64 {
        let sock = mio::net::TcpStream::from_std(server.try_clone().expect("dup a socket"));
        let mut conn = Conn::new(sock, peer, serial, now, now);
        let mut open = Open::new(WebSocketContext::new(Role::Server, None), Protocol::Raw, now);
        open.subs.push(Sub::live(channel.clone()));
        conn.phase = Phase::Open(Box::new(open));
        members.insert(conns.insert(conn));
    }
    let d = Delivery::new(Arc::from("bench"), Kind::Text, Bytes::from(vec![b'x'; 64]), None);
    let mut turn = Turn::default();
    let mut total = 0;
    for _ in 0..200 {
        total += fanout::deliver(&d, &members, &mut conns, &mut turn);
        for key in turn.dirty.drain(..) {
            let c = &mut conns[key];
            c.dirty = false;
            c.out.discard();
        }
        turn.gaps.clear();
    }
    println!("{total} deliveries");
}
