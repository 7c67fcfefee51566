//! The raw-protocol client: one channel per connection, named by the URL path; every text or
//! binary frame sent is published on it, and every frame of the channel (the client's own
//! included) is received. A plain `std::net::TcpStream` through tungstenite; every receive has
//! a timeout, so a missing message is an error, never a hang.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// What a receive produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// The server closed the connection, with its close frame if it sent one.
    Closed(Option<(u16, String)>),
}

/// A connected client.
pub struct Client {
    ws: WebSocket<TcpStream>,
}

/// Builds the `ws://` URL for `addr` and `path` (path starts with `/`).
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

impl Client {
    /// Connects to `addr` and upgrades `path` (raw protocol: the path names the channel).
    pub fn connect(addr: SocketAddr, path: &str) -> io::Result<Client> {
        Self::connect_with(addr, path, None)
    }

    /// Connects, offering `protocol` in `Sec-WebSocket-Protocol` if given.
    pub fn connect_with(addr: SocketAddr, path: &str, protocol: Option<&str>) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Self::handshake(stream, addr, path, protocol)
    }

    /// Upgrades an already connected stream (e.g. one with custom socket options).
    pub fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
    ) -> io::Result<Client> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = url(addr, path).into_client_request().map_err(io::Error::other)?;
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().map_err(io::Error::other)?);
        }
        let (ws, _resp) =
            tungstenite::client::client(req, stream).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Client { ws })
    }

    /// Sends a text frame.
    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(Message::text(text))
    }

    /// Sends a binary frame.
    pub fn send_binary(&mut self, data: &[u8]) -> io::Result<()> {
        self.send(Message::binary(data.to_vec()))
    }

    /// Sends any message and flushes it.
    pub fn send(&mut self, msg: Message) -> io::Result<()> {
        self.ws.send(msg).map_err(to_io)
    }

    /// Waits up to `timeout` for the next data frame or the close. Pings are answered and
    /// skipped. A timeout is `ErrorKind::TimedOut`.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no message in time"));
            }
            self.ws.get_ref().set_read_timeout(Some(left))?;
            match self.ws.read() {
                Ok(Message::Text(t)) => return Ok(Received::Text(t.to_string())),
                Ok(Message::Binary(b)) => return Ok(Received::Binary(b.to_vec())),
                Ok(Message::Close(f)) => {
                    return Ok(Received::Closed(
                        f.map(|CloseFrame { code, reason }| (code.into(), reason.to_string())),
                    ));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(Received::Closed(None));
                }
                Err(e) => return Err(to_io(e)),
            }
        }
    }

    /// Waits for the next text frame, failing on anything else.
    pub fn recv_text(&mut self, timeout: Duration) -> io::Result<String> {
        match self.recv(timeout)? {
            Received::Text(t) => Ok(t),
            other => Err(io::Error::other(format!("expected text, got {other:?}"))),
        }
    }

    /// Sends a unique text and reads until it comes back, returning what arrived before it.
    /// On the raw protocol the sender receives its own message, and only once its channel's
    /// subscription is live, so this proves the connection is fully subscribed.
    pub fn sync(&mut self, token: &str, timeout: Duration) -> io::Result<Vec<Received>> {
        self.send_text(token)?;
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Received::Text(t) if t == token => return Ok(before),
                Received::Closed(c) => {
                    return Err(io::Error::other(format!("closed while syncing: {c:?}")));
                }
                other => before.push(other),
            }
        }
    }

    /// Starts a clean close and waits briefly for the server's reply.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.recv(Duration::from_secs(1));
    }

    /// The underlying WebSocket, for tests that need raw access.
    pub fn inner(&mut self) -> &mut WebSocket<TcpStream> {
        &mut self.ws
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e.to_string()),
    }
}
