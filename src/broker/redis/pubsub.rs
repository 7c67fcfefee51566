//! The subscriber's Pub/Sub connection to one Redis. Every message Redis delivers passes
//! through here, so a message (`*3`, `message`, channel, payload) is parsed in place in one
//! read buffer and handed over as two slices: no value tree, no allocation per message.
//! Anything else Redis sends on the connection (subscription confirmations, PING answers,
//! errors) is rare and parsed by redis-rs. The connection speaks RESP2 whatever the URL asks
//! (Pub/Sub needs nothing newer) and authenticates as the URL says; a database number does not
//! matter to Pub/Sub.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, Value};

/// Read buffer size; it grows for a larger message and shrinks back after it.
const BUFFER: usize = 64 << 10;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
        }
    }
}

/// What Redis sent: a message on a subscribed channel, or anything else.
pub(super) enum Frame<'a> {
    Message { channel: &'a [u8], payload: &'a [u8] },
    Other(Value),
}

/// See the module documentation.
pub(super) struct PubSub {
    stream: Stream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl PubSub {
    /// Connects (within `connect`) and authenticates, with `timeout` for every write, and for
    /// answers until [`PubSub::set_read_timeout`].
    pub(super) fn open(info: &ConnectionInfo, connect: Duration, timeout: Duration) -> io::Result<PubSub> {
        let stream = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let mut last = io::Error::other(format!("{host}:{port} has no address"));
                let mut connected = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, connect) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = connected.ok_or(last)?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Tcp(s)
            }
            ConnectionAddr::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Unix(s)
            }
            _ => return Err(io::Error::other("TLS connections to Redis are not supported")),
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut ps = PubSub {
            stream,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
        };
        if let Some(auth) = auth_command(info) {
            ps.send(&auth)?;
            match ps.next()? {
                Some(Frame::Other(Value::Okay | Value::SimpleString(_))) => {}
                Some(Frame::Other(Value::ServerError(e))) => {
                    return Err(io::Error::other(format!("AUTH refused: {e:?}")));
                }
                Some(_) => return Err(io::Error::other("unexpected answer to AUTH")),
                None => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        Ok(ps)
    }

    pub(super) fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }

    /// Writes a packed command.
    pub(super) fn send(&mut self, packed: &[u8]) -> io::Result<()> {
        self.stream.write_all(packed)
    }

    /// The next thing Redis sent, waiting at most the read timeout for it (`None`: nothing
    /// came). An error is the connection's end.
    pub(super) fn next(&mut self) -> io::Result<Option<Frame<'_>>> {
        loop {
            if let Some(len) = value_len(&self.buf[self.start..self.end]) {
                let at = self.start;
                self.start += len;
                return Ok(Some(frame(&self.buf[at..at + len])?));
            }
            match self.fill() {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads more: moves what is unparsed to the front (and gives back room a large message
    /// took once it is parsed), grows the buffer when it is full.
    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() > BUFFER && self.end < BUFFER {
                self.buf.truncate(BUFFER);
                self.buf.shrink_to_fit();
            }
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        match self.stream.read(&mut self.buf[self.end..])? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }
}

/// The AUTH command the URL of `info` asks for (with its ACL user, if any), packed; none
/// without a password.
pub(super) fn auth_command(info: &ConnectionInfo) -> Option<Vec<u8>> {
    let settings = info.redis_settings();
    let password = settings.password()?;
    let mut auth = redis::cmd("AUTH");
    if let Some(user) = settings.username() {
        auth.arg(user);
    }
    auth.arg(password);
    Some(auth.get_packed_command())
}

/// One whole RESP2 value: a message as slices, anything else through redis-rs.
fn frame(v: &[u8]) -> io::Result<Frame<'_>> {
    const MESSAGE: &[u8] = b"*3\r\n$7\r\nmessage\r\n";
    if let Some(rest) = v.strip_prefix(MESSAGE) {
        let (channel, rest) = bulk(rest).ok_or_else(malformed)?;
        let (payload, _) = bulk(rest).ok_or_else(malformed)?;
        return Ok(Frame::Message { channel, payload });
    }
    redis::parse_redis_value(v)
        .map(Frame::Other)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed message from redis")
}

/// A bulk string at the start of `b`, and what follows it.
fn bulk(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, at) = header(b, b'$')?;
    let len = usize::try_from(len).ok()?;
    let data = b.get(at..at + len)?;
    Some((data, b.get(at + len + 2..)?))
}

/// `<lead><number>\r\n` at the start of `b`: the number and where what follows starts.
fn header(b: &[u8], lead: u8) -> Option<(i64, usize)> {
    if b.first() != Some(&lead) {
        return None;
    }
    let end = b.windows(2).position(|w| w == b"\r\n")?;
    let n = std::str::from_utf8(&b[1..end]).ok()?.parse().ok()?;
    Some((n, end + 2))
}

/// The length of the whole RESP2 value at the start of `b`, or `None` while it is incomplete.
/// Bytes that are not RESP2 are taken as a value of their own so that parsing them fails.
fn value_len(b: &[u8]) -> Option<usize> {
    let line_end = b.windows(2).position(|w| w == b"\r\n")? + 2;
    match b[0] {
        b'+' | b'-' | b':' => Some(line_end),
        b'$' => match header(b, b'$')? {
            (n, at) if n >= 0 => {
                let end = at + usize::try_from(n).ok()? + 2;
                (b.len() >= end).then_some(end)
            }
            _ => Some(line_end),
        },
        b'*' => {
            let (n, mut at) = header(b, b'*')?;
            for _ in 0..n.max(0) {
                at += value_len(&b[at..])?;
            }
            Some(at)
        }
        _ => Some(b.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_slices_and_the_rest_is_parsed_by_redis_rs() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$5\r\nhe\r\nl\r\n\
                     *3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n\
                     *2\r\n$4\r\npong\r\n$0\r\n\r\n\
                     -ERR no\r\n";
        let mut at = 0;
        let mut frames = Vec::new();
        while at < wire.len() {
            let len = value_len(&wire[at..]).expect("complete");
            frames.push(&wire[at..at + len]);
            at += len;
        }
        assert_eq!(frames.len(), 4);
        match frame(frames[0]).unwrap() {
            Frame::Message { channel, payload } => {
                assert_eq!(channel, b"room");
                assert_eq!(payload, b"he\r\nl");
            }
            Frame::Other(v) => panic!("{v:?}"),
        }
        for f in &frames[1..3] {
            assert!(matches!(frame(f).unwrap(), Frame::Other(Value::Array(_))));
        }
        assert!(matches!(
            frame(frames[3]).unwrap(),
            Frame::Other(Value::ServerError(_))
        ));
    }

    #[test]
    fn an_incomplete_value_waits_for_more() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$5\r\nhello\r\n";
        for cut in 0..wire.len() {
            assert_eq!(value_len(&wire[..cut]), None, "cut at {cut}");
        }
        assert_eq!(value_len(wire), Some(wire.len()));
        assert_eq!(value_len(b"$-1\r\n"), Some(5));
        assert_eq!(value_len(b"*-1\r\n"), Some(5));
    }

    #[test]
    fn bytes_that_are_not_resp_fail_instead_of_waiting() {
        let len = value_len(b"HTTP/1.1 400\r\n").unwrap();
        assert!(frame(&b"HTTP/1.1 400\r\n"[..len]).is_err());
    }
}
