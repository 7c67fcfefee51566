//! A small blocking client for wsrelay: what the tests, the benchmarks and the load generator
//! speak to a server with, and a starting point for Rust programs that talk to one.
//!
//! - [`Client`]: the raw protocol. The URL path names the channel; every text or binary frame
//!   sent is published on it, and every frame published on it arrives, the client's own too.
//! - [`V1`]: the `wsrelay.v1` envelope protocol (JSON commands with acknowledgements, several
//!   channels per connection, offsets for recovery, sessions), on top of a [`Client`].
//! - [`Api`]: the server API for backends (JSON over HTTP with the API key): publish,
//!   broadcast, disconnect or unsubscribe a user on every node, channels, nodes, history and
//!   presence.
//! - [`wire`]: the client side of the WebSocket wire format byte by byte, for clients that
//!   cannot afford a `WebSocket` per connection (the load generator) or must send what a
//!   well-behaved client never would (the hostile tests).
//!
//! Every receive takes a timeout: a message that does not come is an error, never a hang.
//! Connections are plain TCP (`ws://`); wsrelay expects TLS to end in front of it.
//!
//! # Example
//!
//! Two clients on channel `news`; what one sends, both receive (the sender too):
//!
//! ```
//! # use std::net::TcpListener;
//! # // A stand-in for wsrelay in this example: a one-channel relay for two clients.
//! # let listener = TcpListener::bind("127.0.0.1:0")?;
//! # let addr = listener.local_addr()?;
//! # std::thread::spawn(move || {
//! #     let mut peers: Vec<_> = (0..2)
//! #         .map(|_| tungstenite::accept(listener.accept().unwrap().0).unwrap())
//! #         .collect();
//! #     let msg = peers[0].read().unwrap();
//! #     for p in &mut peers {
//! #         p.send(msg.clone()).unwrap();
//! #     }
//! #     for p in &mut peers {
//! #         let _ = p.read();
//! #     }
//! # });
//! use std::time::Duration;
//! use wsrelay_client::{Client, Received};
//!
//! let mut alice = Client::connect(addr, "/news")?;
//! let mut bob = Client::connect(addr, "/news")?;
//! alice.send_text("hello")?;
//! assert_eq!(bob.recv(Duration::from_secs(5))?, Received::Text("hello".into()));
//! assert_eq!(alice.recv_text(Duration::from_secs(5))?, "hello");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! With `wsrelay.v1`, against a running server:
//!
//! ```no_run
//! use wsrelay_client::V1;
//!
//! # fn main() -> std::io::Result<()> {
//! let mut c = V1::connect("127.0.0.1:9000".parse().unwrap(), None)?;
//! let reply = c.subscribe("news", None)?; // {"type":"subscribed","offset":..,"epoch":..}
//! c.publish("news", "hello")?; // waits for {"type":"published",..}
//! let msg = c.message(std::time::Duration::from_secs(5))?;
//! assert_eq!(msg["data"], "hello");
//! // Later, on another connection: resume the session, or recover the channel from
//! // (reply["offset"], reply["epoch"]).
//! # let _ = reply;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs, rust_2018_idioms)]

mod api;
mod raw;
mod v1;
pub mod wire;

pub use api::Api;
pub use raw::{Client, Received, url};
pub use v1::{TOKEN_EXPIRED, V1};

/// The `Sec-WebSocket-Protocol` name of the envelope protocol, as the server's
/// `envelope::PROTOCOL` (a root test checks that the two agree).
pub const PROTOCOL: &str = "wsrelay.v1";
