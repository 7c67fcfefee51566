//! The fan-out fixture shared by `benches/fanout.rs` and `examples/deliver_count.rs`: open
//! raw-protocol connections on one channel, each on a real mio socket (one loopback TCP pair,
//! its server side `try_clone`d once per connection; those descriptors are never written).

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;
use tungstenite::protocol::{Role, WebSocketContext};

use wsrelay::bridge::Delivery;
use wsrelay::channels::Members;
use wsrelay::conn::{Conn, Open, Phase, Protocol, Sub};
use wsrelay::fanout::Turn;
use wsrelay::frame::Kind;

/// `n` open raw-protocol connections on channel `bench`, and the channel's member set.
pub struct Fixture {
    /// The connections, as a loop holds them.
    pub conns: Slab<Conn>,
    /// The channel's members: every connection.
    pub members: Members,
    _peer: TcpStream,
}

/// `n` connections (the soft open-file limit is raised to the hard one for them).
pub fn fixture(n: usize) -> Fixture {
    wsrelay::listener::raise_fd_limit().expect("open-file limit");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, peer) = listener.accept().unwrap();
    let channel: Arc<str> = Arc::from("bench");
    let now = Instant::now();
    let mut conns = Slab::with_capacity(n);
    let mut members = Members::default();
    for serial in 0..n as u64 {
        let sock = mio::net::TcpStream::from_std(server.try_clone().expect("dup a socket"));
        let mut conn = Conn::new(sock, peer, serial, now, now);
        // A plain raw-protocol subscriber: no session, no token, no offset tracking, which is
        // what the event loop builds for `GET /bench` with no options.
        let mut open = Open::new(WebSocketContext::new(Role::Server, None), Protocol::Raw, now);
        open.subs.push(Sub::live(channel.clone()));
        conn.phase = Phase::Open(Box::new(open));
        members.insert(conns.insert(conn));
    }
    Fixture {
        conns,
        members,
        _peer: client,
    }
}

/// One 64-byte text message on channel `bench`.
pub fn delivery() -> Arc<Delivery> {
    Delivery::new(Arc::from("bench"), Kind::Text, Bytes::from(vec![b'x'; 64]), None)
}

/// Undoes a delivery: empty buffers, nothing dirty, so every iteration starts alike.
pub fn reset(f: &mut Fixture, turn: &mut Turn) {
    for key in turn.dirty.drain(..) {
        let conn = &mut f.conns[key];
        conn.dirty = false;
        conn.out.discard();
    }
    turn.gaps.clear();
}
