//! wsrelay's own connections to one Redis for its two hot paths: the subscriber's Pub/Sub
//! connection and the publisher's pipeline. Every message Redis delivers and every publish's
//! answer passes through here, so values are framed in one read buffer instead of redis-rs's
//! combinator parser: a Pub/Sub message (`*3`, `message`, channel, payload) is handed over as
//! two slices (no allocation), any other value is parsed by a small RESP2 parser into a
//! redis-rs [`Value`] (the same values redis-rs gives; errors through redis-rs itself). The
//! connections speak RESP2 whatever the URL asks (nothing here needs newer), authenticate and
//! select the database as the URL says, over TCP or a Unix socket.

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
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// What Redis sent on a Pub/Sub connection: a message on a subscribed channel, or anything
/// else.
pub(super) enum Frame<'a> {
    Message { channel: &'a [u8], payload: &'a [u8] },
    Other(Value),
}

/// See the module documentation.
pub(super) struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Conn {
    /// Connects (within `connect`), authenticates and selects the database, with `timeout`
    /// for every write, and for answers until [`Conn::set_read_timeout`].
    pub(super) fn open(info: &ConnectionInfo, connect: Duration, timeout: Duration) -> io::Result<Conn> {
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
        let mut con = Conn {
            stream,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
        };
        if let Some(auth) = auth_command(info) {
            con.command(&auth, "AUTH")?;
        }
        let db = info.redis_settings().db();
        if db != 0 {
            con.command(&redis::cmd("SELECT").arg(db).get_packed_command(), "SELECT")?;
        }
        Ok(con)
    }

    /// Sends a packed command and waits for its answer; an error answer is an error.
    pub(super) fn command(&mut self, packed: &[u8], what: &str) -> io::Result<Value> {
        self.send(packed)?;
        match self.value()? {
            Value::ServerError(e) => Err(io::Error::other(format!("{what} refused: {e:?}"))),
            v => Ok(v),
        }
    }

    /// Whether the other end has closed or reset the connection, without waiting (a peek at
    /// the socket; answers waiting to be read do not count).
    pub(super) fn closed(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv(2) into one byte we own, on our own open socket; MSG_PEEK leaves the
        // data where it is and MSG_DONTWAIT keeps the call from blocking.
        let n = unsafe {
            libc::recv(
                self.stream.fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
    }

    pub(super) fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }

    /// Writes a packed command (or a pipeline of them).
    pub(super) fn send(&mut self, packed: &[u8]) -> io::Result<()> {
        self.stream.write_all(packed)
    }

    /// The next value, waiting at most the read timeout for it (`TimedOut` when none came;
    /// the connection is then of no further use for commands). Any other error is the
    /// connection's end.
    pub(super) fn value(&mut self) -> io::Result<Value> {
        match self.next_whole()? {
            Some((at, len)) => parse(&self.buf[at..at + len]),
            None => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Like [`Conn::value`] for an answer whose content does not matter unless it is or holds
    /// an error (an array's element): such an answer is parsed, anything else is `Value::Okay`
    /// without being built. (A bulk string holding `\r\n-` is parsed too, harmlessly.)
    pub(super) fn value_unless_ok(&mut self) -> io::Result<Value> {
        match self.next_whole()? {
            Some((at, len)) if has_error(&self.buf[at..at + len]) => parse(&self.buf[at..at + len]),
            Some(_) => Ok(Value::Okay),
            None => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// The next thing Redis sent on a Pub/Sub connection, waiting at most the read timeout
    /// for it (`None`: nothing came). An error is the connection's end.
    pub(super) fn frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        match self.next_whole()? {
            Some((at, len)) => frame(&self.buf[at..at + len]).map(Some),
            None => Ok(None),
        }
    }

    /// Where the next whole value is in the buffer, reading until one is there or the read
    /// timeout passes (`None`).
    fn next_whole(&mut self) -> io::Result<Option<(usize, usize)>> {
        loop {
            if let Some(len) = value_len(&self.buf[self.start..self.end]) {
                let at = self.start;
                self.start += len;
                return Ok(Some((at, len)));
            }
            match self.fill() {
                Ok(()) => {}
                Err(e) if timed_out(&e) => {
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

/// Whether a whole RESP2 value may be or hold an error: an error line starts the value or a
/// line of it.
fn has_error(v: &[u8]) -> bool {
    v.first() == Some(&b'-') || v.windows(3).any(|w| w == b"\r\n-")
}

/// Whether a read waited out its timeout (Redis stalled, or nothing to read yet), as opposed
/// to a lost connection.
pub(super) fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
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

/// One whole RESP2 value: a message as slices, anything else as a value.
fn frame(v: &[u8]) -> io::Result<Frame<'_>> {
    const MESSAGE: &[u8] = b"*3\r\n$7\r\nmessage\r\n";
    if let Some(rest) = v.strip_prefix(MESSAGE) {
        let (channel, rest) = bulk(rest).ok_or_else(malformed)?;
        let (payload, _) = bulk(rest).ok_or_else(malformed)?;
        return Ok(Frame::Message { channel, payload });
    }
    parse(v).map(Frame::Other)
}

/// One whole RESP2 value (as framed by [`value_len`]) as the value redis-rs would give.
fn parse(v: &[u8]) -> io::Result<Value> {
    let mut at = 0;
    match parse_at(v, &mut at) {
        Some(value) if at == v.len() => Ok(value),
        _ => {
            redis::parse_redis_value(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
    }
}

/// The value at `b[*at..]`, moving `at` past it; `None` for anything this parser leaves to
/// redis-rs (which then gives the error, or the value).
fn parse_at(b: &[u8], at: &mut usize) -> Option<Value> {
    let rest = b.get(*at..)?;
    let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let line = &rest[1..line_end];
    let next = *at + line_end + 2;
    let number = || -> Option<i64> { std::str::from_utf8(line).ok()?.parse().ok() };
    let v = match rest.first()? {
        b'+' if line == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(std::str::from_utf8(line).ok()?.to_owned()),
        b'-' => redis::parse_redis_value(&rest[..line_end + 2]).ok()?,
        b':' => Value::Int(number()?),
        b'$' => match usize::try_from(number()?) {
            Err(_) => Value::Nil,
            Ok(n) => {
                let data = b.get(next..next.checked_add(n)?)?;
                *at = next + n + 2;
                return Some(Value::BulkString(data.to_vec()));
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => Value::Nil,
            Ok(n) => {
                *at = next;
                let mut items = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    items.push(parse_at(b, at)?);
                }
                return Some(Value::Array(items));
            }
        },
        _ => return None,
    };
    *at = next;
    Some(v)
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
    fn values_are_the_ones_redis_rs_gives() {
        let wires: [&[u8]; 13] = [
            b"+OK\r\n",
            b"+PONG\r\n",
            b":-42\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"$0\r\n\r\n",
            b"$5\r\nhe\r\nl\r\n",
            b"*2\r\n:7\r\n$10\r\nabcdefghij\r\n",
            b"*0\r\n",
            b"*2\r\n*1\r\n+x\r\n$-1\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
            b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
            b"-ERR wrong number of arguments\r\n",
        ];
        for wire in wires {
            assert_eq!(value_len(wire), Some(wire.len()));
            assert_eq!(
                parse(wire).unwrap(),
                redis::parse_redis_value(wire).unwrap(),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        // A NOSCRIPT answer keeps its kind (the publisher reloads the script on it).
        let Value::ServerError(e) = parse(wires[11]).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(e.kind(), Some(redis::ServerErrorKind::NoScript));
    }

    #[test]
    fn answers_read_for_errors_only_keep_their_errors_and_framing() {
        let (ours, mut redis) = UnixStream::pair().unwrap();
        let mut con = Conn {
            stream: Stream::Unix(ours),
            buf: vec![0; 16],
            start: 0,
            end: 0,
        };
        redis
            .write_all(b"*2\r\n:1\r\n$10\r\nabcdefghij\r\n-NOSCRIPT No matching script\r\n:5\r\n")
            .unwrap();
        assert_eq!(con.value_unless_ok().unwrap(), Value::Okay);
        let Value::ServerError(e) = con.value_unless_ok().unwrap() else {
            panic!("not an error")
        };
        assert_eq!(e.kind(), Some(redis::ServerErrorKind::NoScript));
        assert_eq!(con.value().unwrap(), Value::Int(5));
        // An error among an array's elements (one publish of a script call refused) is kept.
        redis
            .write_all(b"*2\r\n*2\r\n:1\r\n$2\r\nep\r\n-WRONGTYPE Operation\r\n")
            .unwrap();
        let Value::Array(items) = con.value_unless_ok().unwrap() else {
            panic!("not parsed")
        };
        assert!(matches!(&items[1], Value::ServerError(e) if e.code() == "WRONGTYPE"));
    }

    #[test]
    fn a_connection_the_other_end_closed_is_seen_closed_without_waiting() {
        let (ours, mut redis) = UnixStream::pair().unwrap();
        let con = Conn {
            stream: Stream::Unix(ours),
            buf: vec![0; 16],
            start: 0,
            end: 0,
        };
        assert!(!con.closed());
        // An answer waiting to be read is not the end.
        redis.write_all(b"+OK\r\n").unwrap();
        assert!(!con.closed());
        drop(redis);
        assert!(!con.closed(), "answers still to read");
        let (ours, redis) = UnixStream::pair().unwrap();
        let con = Conn {
            stream: Stream::Unix(ours),
            buf: vec![0; 16],
            start: 0,
            end: 0,
        };
        drop(redis);
        assert!(con.closed());
    }

    #[test]
    fn bytes_that_are_not_resp_fail_instead_of_waiting() {
        let len = value_len(b"HTTP/1.1 400\r\n").unwrap();
        assert!(frame(&b"HTTP/1.1 400\r\n"[..len]).is_err());
    }
}
