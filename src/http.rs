//! HTTP/1.1 on the WebSocket port: parsing a request head, telling a WebSocket upgrade from a
//! plain request, and writing responses. Pure functions over bytes, no sockets: the event loop
//! feeds them what it has read and writes back what they return.
//!
//! tungstenite's `accept_hdr` cannot answer a plain GET, so the upgrade is done here (RFC 6455
//! §4.2) and the socket is then handed to tungstenite as an already-upgraded stream.

use std::fmt::Write as _;

use tungstenite::http::StatusCode;

/// Largest request head accepted, in bytes. Browsers send 0.5-2 KiB; 8 KiB matches common
/// proxies. Longer heads get 431 and a close.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 48;

/// A parsed request head, owning only what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Percent-decoded path without the query, e.g. `/chat`.
    pub path: String,
    /// Raw query string after `?`, if any.
    pub query: Option<String>,
    /// The WebSocket upgrade fields, when the request asks for one.
    pub upgrade: Option<Upgrade>,
    /// `Origin` header, if present.
    pub origin: Option<String>,
    /// `Authorization` header, if present.
    pub authorization: Option<String>,
    /// `Content-Length` of a request body (0 when absent).
    pub content_length: usize,
    /// `Content-Type`, if present.
    pub content_type: Option<String>,
    /// Every `X-Forwarded-For` header, joined with `, ` in order (RFC 9110 §5.3); believed only
    /// from a trusted proxy (`forwarded.rs`).
    pub forwarded_for: Option<String>,
}

/// What a valid WebSocket upgrade request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Subprotocols offered in `Sec-WebSocket-Protocol`, in order.
    pub protocols: Vec<String>,
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// The head is not complete yet: read more.
    Partial,
    /// A complete head of `len` bytes; anything after it belongs to the next layer.
    Complete(Box<Head>, usize),
    /// The request cannot be served: answer with this status and close.
    Invalid(Status),
}

/// The HTTP statuses wsrelay answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200
    Ok,
    /// 400: malformed request.
    BadRequest,
    /// 401: missing or invalid credentials.
    Unauthorized,
    /// 403: refused (e.g. origin not allowed).
    Forbidden,
    /// 404: nothing here.
    NotFound,
    /// 405: method not allowed on this path.
    MethodNotAllowed,
    /// 408: the request took too long to arrive.
    RequestTimeout,
    /// 413: request body too large.
    PayloadTooLarge,
    /// 426: the WebSocket version is not 13.
    UpgradeRequired,
    /// 429: too many requests or connections from this client.
    TooManyRequests,
    /// 431: the request head is too large.
    HeadersTooLarge,
    /// 503: the server cannot take this connection now.
    Unavailable,
    /// 504: the broker did not answer in time.
    GatewayTimeout,
    /// 507: the broker is out of memory and refuses writes.
    InsufficientStorage,
}

impl Status {
    /// Numeric code and reason phrase (the standard one, from the `http` crate).
    pub fn code(self) -> (u16, &'static str) {
        let status = self.status_code();
        (status.as_u16(), status.canonical_reason().unwrap_or("Unknown"))
    }

    fn status_code(self) -> StatusCode {
        match self {
            Status::Ok => StatusCode::OK,
            Status::BadRequest => StatusCode::BAD_REQUEST,
            Status::Unauthorized => StatusCode::UNAUTHORIZED,
            Status::Forbidden => StatusCode::FORBIDDEN,
            Status::NotFound => StatusCode::NOT_FOUND,
            Status::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Status::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Status::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Status::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Status::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Status::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Status::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Status::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Status::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        }
    }
}

/// Parses the request head in `buf`. Never panics on any input.
pub fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Parse::Invalid(Status::HeadersTooLarge);
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::Invalid(Status::HeadersTooLarge),
        Err(_) => return Parse::Invalid(Status::BadRequest),
    };
    if len > MAX_HEAD {
        return Parse::Invalid(Status::HeadersTooLarge);
    }
    // HTTP/1.0 and 1.1 both: load balancers' health checks often send HTTP/1.0 without a
    // `Host` header (HAProxy's `option httpchk`), and every answer here closes the connection
    // anyway. A WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1), checked below.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::Invalid(Status::BadRequest);
    };
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let Some(path) = percent_decode(raw_path).filter(|p| p.starts_with('/')) else {
        return Parse::Invalid(Status::BadRequest);
    };

    let header = |name: &str| header(req.headers, name);
    let content_length = match content_length(req.headers) {
        Ok(n) => n,
        Err(status) => return Parse::Invalid(status),
    };
    let origin = header("origin").map(str::to_owned);
    let authorization = header("authorization").map(str::to_owned);
    let content_type = header("content-type").map(str::to_owned);
    let forwarded: Vec<&str> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
        .collect();
    let forwarded_for = (!forwarded.is_empty()).then(|| forwarded.join(", "));

    let upgrade = match upgrade(req.headers, method, version) {
        Ok(u) => u,
        Err(status) => return Parse::Invalid(status),
    };
    Parse::Complete(
        Box::new(Head {
            method: method.to_owned(),
            path,
            query,
            upgrade,
            origin,
            authorization,
            content_length,
            content_type,
            forwarded_for,
        }),
        len,
    )
}

/// The value of header `name` (the first one), trimmed, if it is UTF-8.
fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// The body's length from `Content-Length` (0 without one).
///
/// Framing headers are checked on raw bytes and strictly (RFC 9112 §6.3): a header that is
/// ignored because it is not UTF-8, or a length read two ways, is how requests get smuggled.
/// Chunked bodies are not needed by any endpoint; refusing them avoids request smuggling.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, Status> {
    let raw = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    if raw("transfer-encoding").next().is_some() {
        return Err(Status::BadRequest);
    }
    let mut length = None;
    for h in raw("content-length") {
        let v = h.value.trim_ascii();
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return Err(Status::BadRequest);
        }
        let Some(n) = std::str::from_utf8(v).ok().and_then(|v| v.parse::<usize>().ok()) else {
            return Err(Status::BadRequest);
        };
        if length.is_some_and(|m| m != n) {
            return Err(Status::BadRequest);
        }
        length = Some(n);
    }
    Ok(length.unwrap_or(0))
}

/// The WebSocket upgrade the request asks for, if any; a malformed one is refused (RFC 6455
/// §4.1: GET, HTTP/1.1, `Connection: upgrade`, version 13, a valid key).
fn upgrade(headers: &[httparse::Header<'_>], method: &str, version: u8) -> Result<Option<Upgrade>, Status> {
    if !header(headers, "upgrade").is_some_and(|u| has_token(u, "websocket")) {
        return Ok(None);
    }
    if method != "GET"
        || version != 1
        || !header(headers, "connection").is_some_and(|c| has_token(c, "upgrade"))
    {
        return Err(Status::BadRequest);
    }
    if header(headers, "sec-websocket-version") != Some("13") {
        return Err(Status::UpgradeRequired);
    }
    let Some(key) = header(headers, "sec-websocket-key").filter(|k| valid_key(k)) else {
        return Err(Status::BadRequest);
    };
    let protocols = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(Some(Upgrade {
        key: key.to_owned(),
        protocols,
    }))
}

/// The value of `name` in a query string like `a=1&b=2`, with `+` as a space and
/// percent-decoded; `None` when absent or when its value is not strictly encoded (see
/// [`percent_decode`]). Keys are compared as sent, not decoded.
///
/// Not `form_urlencoded::parse`: it decodes keys, passes bad escapes through and replaces
/// invalid UTF-8, where a malformed value must be refused, not reinterpreted.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| percent_decode(&v.replace('+', " ")))
}

/// The 101 response completing a WebSocket handshake, choosing `protocol` if given.
pub fn upgrade_response(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut s = String::with_capacity(160);
    s.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
    let _ = write!(s, "Sec-WebSocket-Accept: {accept}\r\n");
    if let Some(p) = protocol {
        let _ = write!(s, "Sec-WebSocket-Protocol: {p}\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// A complete response that closes the connection after the body.
pub fn response(status: Status, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_with(status, content_type, &[], body)
}

/// Like [`response`], with extra header lines (`Name: value`, no CRLF).
pub fn response_with(status: Status, content_type: &str, extra: &[&str], body: &[u8]) -> Vec<u8> {
    let (code, reason) = status.code();
    let mut s = String::with_capacity(128 + body.len());
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    for h in extra {
        let _ = write!(s, "{h}\r\n");
    }
    if status == Status::UpgradeRequired {
        s.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    s.push_str("\r\n");
    let mut out = s.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A plain-text error response whose body is the reason phrase.
pub fn error_response(status: Status) -> Vec<u8> {
    let (_, reason) = status.code();
    response(
        status,
        "text/plain; charset=utf-8",
        format!("{reason}\n").as_bytes(),
    )
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A Sec-WebSocket-Key is 16 random bytes in base64: 24 characters.
fn valid_key(key: &str) -> bool {
    key.len() == 24
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

/// Decodes `%XX` escapes; `None` for a bad escape or a result that is not UTF-8.
///
/// Stricter than `percent_encoding::percent_decode_str`, which passes a `%` without two hex
/// digits through as it is: here every `%` must be followed by exactly two hex digits (RFC 3986
/// `pct-encoded`; `%+2` and `%zz` are refused), so a path or value reads one way only.
pub fn percent_decode(s: &str) -> Option<String> {
    let escapes_valid = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_valid {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_req(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn upgrade_is_recognised_with_path_query_and_protocols() {
        let req = upgrade_req(
            "/room%201?session=abc",
            "Sec-WebSocket-Protocol: wsrelay.v1, other\r\n",
        );
        let Parse::Complete(head, len) = parse(req.as_bytes()) else {
            panic!("not complete");
        };
        assert_eq!(len, req.len());
        assert_eq!(head.path, "/room 1");
        assert_eq!(
            query_param(head.query.as_deref(), "session").as_deref(),
            Some("abc")
        );
        let up = head.upgrade.unwrap();
        assert_eq!(up.key, KEY);
        assert_eq!(up.protocols, vec!["wsrelay.v1", "other"]);
    }

    #[test]
    fn partial_then_complete() {
        let req = upgrade_req("/", "");
        assert_eq!(parse(&req.as_bytes()[..20]), Parse::Partial);
        assert!(matches!(parse(req.as_bytes()), Parse::Complete(..)));
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let Parse::Complete(head, _) = parse(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") else {
            panic!()
        };
        assert!(head.upgrade.is_none());
        assert_eq!(head.path, "/healthz");
    }

    #[test]
    fn plain_requests_may_be_http_1_0_and_lack_host() {
        // What HAProxy's `option httpchk GET /healthz` sends.
        for req in [
            &b"GET /healthz HTTP/1.0\r\n\r\n"[..],
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"HEAD /metrics HTTP/1.0\r\nUser-Agent: x\r\n\r\n",
        ] {
            let Parse::Complete(head, len) = parse(req) else {
                panic!("{:?} refused", String::from_utf8_lossy(req));
            };
            assert_eq!(len, req.len());
            assert!(head.upgrade.is_none());
        }
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        assert_eq!(
            parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Parse::Invalid(Status::BadRequest)
        );
        let upgrade_10 = upgrade_req("/", "").replace("HTTP/1.1", "HTTP/1.0");
        assert_eq!(parse(upgrade_10.as_bytes()), Parse::Invalid(Status::BadRequest));
        assert_eq!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Parse::Invalid(Status::BadRequest)
        );
        let no_key = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(parse(no_key.as_bytes()), Parse::Invalid(Status::BadRequest));
        let v8 = upgrade_req("/", "").replace("Version: 13", "Version: 8");
        assert_eq!(parse(v8.as_bytes()), Parse::Invalid(Status::UpgradeRequired));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(huge.as_bytes()), Parse::Invalid(Status::HeadersTooLarge));
        assert_eq!(
            parse(b"GET /%zz HTTP/1.1\r\n\r\n"),
            Parse::Invalid(Status::BadRequest)
        );
    }

    #[test]
    fn escapes_are_exactly_two_hex_digits() {
        assert_eq!(percent_decode("/a%20b%2Fc").as_deref(), Some("/a b/c"));
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Some("\u{20ac}"));
        for bad in ["%", "%2", "%+2", "%-2", "%zz", "%%41", "a%2", "%c3%28"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
        let q = Some("a=1&session=x%2By+z&flag&bad=%+1");
        assert_eq!(query_param(q, "session").as_deref(), Some("x+y z"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad"), None);
        assert_eq!(query_param(q, "missing"), None);
        // Keys are compared as sent.
        assert_eq!(query_param(Some("sess%69on=x"), "session"), None);
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let resp = String::from_utf8(upgrade_response(KEY, None)).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    #[test]
    fn status_lines_are_the_standard_ones() {
        for (status, line) in [
            (Status::RequestTimeout, "HTTP/1.1 408 Request Timeout\r\n"),
            (Status::PayloadTooLarge, "HTTP/1.1 413 Payload Too Large\r\n"),
            (
                Status::HeadersTooLarge,
                "HTTP/1.1 431 Request Header Fields Too Large\r\n",
            ),
            (Status::Unavailable, "HTTP/1.1 503 Service Unavailable\r\n"),
        ] {
            assert!(
                String::from_utf8(error_response(status))
                    .unwrap()
                    .starts_with(line)
            );
        }
    }

    #[test]
    fn responses_have_length_and_close() {
        let r = String::from_utf8(error_response(Status::NotFound)).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Length: 10\r\n"));
        assert!(r.contains("Connection: close\r\n"));
    }
}
