//! wsrelay behind load balancers (README "Deploying"): the plain HTTP that balancers' health
//! checks speak, and the committed configurations in `deploy/` run for real.

mod common;

use common::*;

/// Every plain endpoint answers HTTP/1.0 without a `Host` header, as HAProxy's `option httpchk`
/// sends it; a WebSocket upgrade still needs HTTP/1.1.
#[test]
fn plain_http_answers_http_1_0_without_host() {
    let node = Node::start(&["--api-key", "0123456789abcdef0123"]);
    for (request, want) in [
        ("GET /healthz HTTP/1.0\r\n\r\n", "ok\n"),
        ("GET /metrics HTTP/1.0\r\n\r\n", "wsrelay_accepted_total"),
        ("GET / HTTP/1.0\r\n\r\n", "<html"),
        ("GET /wsrelay.js HTTP/1.0\r\n\r\n", "export class WsRelay"),
        ("GET /healthz HTTP/1.1\r\n\r\n", "ok\n"),
        (
            "POST /publish?channel=c HTTP/1.0\r\nAuthorization: Bearer 0123456789abcdef0123\r\n\
             Content-Length: 2\r\n\r\nhi",
            "\"published\"",
        ),
    ] {
        let (status, body) = http_request(node.addr, request);
        assert_eq!(status, 200, "{request:?}: {body}");
        assert!(body.contains(want), "{request:?}: {body}");
    }
    let (status, _) = http_request(
        node.addr,
        "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, 400, "a WebSocket upgrade needs HTTP/1.1");
}
