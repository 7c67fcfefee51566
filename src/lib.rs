//! wsrelay: a WebSocket pub/sub fan-out server.
//!
//! Modules are declared in the order data flows through them: flags and configuration, the
//! listeners that accept, the HTTP handshake, frames, connections, the channel index, the
//! bridge between loops and the broker, the brokers (in-process and Redis), fan-out and the
//! policies it applies (backpressure, recovery), the event loop that ties a core's connections
//! together, and the server that starts it all. They depend on each other without cycles
//! (`tests/structure.rs`).
#![deny(missing_docs, rust_2018_idioms)]

pub mod cli;
pub mod config;
pub mod listener;
pub mod proxy;
pub mod http;
pub mod forwarded;
pub mod frame;
pub mod conn;
pub mod channels;
pub mod position;
pub mod bridge;
pub mod envelope;
pub mod presence;
pub mod broker;
pub mod fanout;
pub mod backpressure;
pub mod recovery;
pub mod event_loop;
pub mod backoff;
pub mod log_throttle;
pub mod metrics;
pub mod shared;
pub mod server;
pub mod trim;
pub mod wildcard;
pub mod auth;
pub mod origin;
pub mod ratelimit;
