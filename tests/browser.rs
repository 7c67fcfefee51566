//! The browser tests of `client/wsrelay.js` (owned by the browser-client work of issue 3): a real
//! headless Chromium, driven over the Chrome DevTools Protocol (a WebSocket, through tungstenite),
//! loads a page from wsrelay node A and runs the client there, against two nodes sharing one
//! Redis. The page state is read with `Runtime.evaluate`; every wait polls with a timeout. One
//! run goes through HAProxy (`deploy/haproxy.cfg`, three nodes) across a node crash and a
//! rolling restart; it also needs `haproxy` (skipped without it unless `WSRELAY_REQUIRE_DEPLOY`).
//!
//! Chromium is looked up as `$WSRELAY_CHROMIUM`, `/usr/bin/chromium`, then `chromium`,
//! `chromium-browser`, `google-chrome` on PATH. Without it the tests print why and pass, unless
//! `WSRELAY_REQUIRE_BROWSER` is set (`.ci/run` installs Chromium and sets it).

mod common;
#[path = "common/lb.rs"]
mod lb;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, Node, Redis};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// Longest time anything in the browser may take (page load, reconnect, delivery).
const BROWSER_WAIT: Duration = Duration::from_secs(20);

/// Finds a Chromium binary, or explains (once per test) why the test is skipped.
fn chromium_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WSRELAY_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let default = Path::new("/usr/bin/chromium");
    if default.exists() {
        return Some(default.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The Chromium to use, or `None` (after saying so) when the test should be skipped.
fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = chromium_binary();
    if found.is_none() {
        assert!(
            std::env::var_os("WSRELAY_REQUIRE_BROWSER").is_none(),
            "{test}: Chromium not found and WSRELAY_REQUIRE_BROWSER is set \
             (apt-get install chromium, or set WSRELAY_CHROMIUM)"
        );
        // Straight to the process's stderr, past the test harness's output capture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: Chromium not found (apt-get install chromium, or set WSRELAY_CHROMIUM; \
             .ci/run installs it)"
        );
    }
    found
}

/// A headless Chromium in its own process group with a fresh profile; the whole group is killed
/// and the profile removed on drop.
struct Chromium {
    child: Child,
    profile: PathBuf,
    /// `ws://127.0.0.1:PORT/devtools/browser/ID`
    devtools: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Chromium {
    fn start(bin: &Path) -> Chromium {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let profile = std::env::temp_dir().join(format!("wsrelay-chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let (log, rx) = common::watch_stderr(
            child.stderr.take().unwrap(),
            "DevTools listening on ",
            common::Echo::Nothing,
        );
        let mut browser = Chromium {
            child,
            profile,
            devtools: String::new(),
            log,
        };
        match rx.recv_timeout(BROWSER_WAIT) {
            Ok(url) => browser.devtools = url,
            Err(_) => panic!(
                "Chromium printed no DevTools URL: {:?}",
                browser.log.lock().unwrap()
            ),
        }
        browser
    }

    /// `127.0.0.1:PORT` of the DevTools endpoint.
    fn devtools_host(&self) -> &str {
        let rest = self.devtools.strip_prefix("ws://").expect("ws:// DevTools URL");
        rest.split('/').next().unwrap()
    }

    /// Opens a new tab and connects to it.
    fn new_page(&self) -> Cdp {
        let mut browser = Cdp::connect(&self.devtools);
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let id = target["targetId"].as_str().expect("targetId");
        Cdp::connect(&format!("ws://{}/devtools/page/{id}", self.devtools_host()))
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for our own child (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A child may still be writing to the profile for a moment after the kill.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One DevTools Protocol connection (to the browser or to one page).
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let host = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .expect("ws:// URL");
        let stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
        stream.set_read_timeout(Some(BROWSER_WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(url, stream)
            .unwrap_or_else(|e| panic!("DevTools handshake with {url}: {e}"));
        Cdp { ws, next_id: 1 }
    }

    /// Sends a command and returns its `result`; panics on an error or a timeout. Events that
    /// arrive in between are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let cmd = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(cmd.to_string())).unwrap();
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let msg = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("waiting for {method}: {e}"));
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(err) = v.get("error") {
                panic!("{method} failed: {err}");
            }
            return v["result"].clone();
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value as JSON.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("page threw evaluating {expr:?}: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it returns something other than `false`/`null`, or panics.
    #[track_caller]
    fn wait_true(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let v = self.eval(expr);
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Navigates from `about:blank` to `http://{host}{path}` and waits until the document has
    /// loaded (the page may rewrite its query string, so only the origin is compared).
    fn navigate(&mut self, host: &str, path: &str) {
        let url = format!("http://{host}{path}");
        let r = self.call("Page.navigate", json!({"url": url}));
        if let Some(err) = r.get("errorText") {
            panic!("navigating to {url}: {err}");
        }
        self.wait_true(
            &format!("{url} to load"),
            &format!(
                "location.origin === {} && document.readyState === 'complete'",
                json!(format!("http://{host}"))
            ),
        );
    }
}

/// One Redis, two nodes, Chromium with a page loaded from node A.
struct Setup {
    // Field order is drop order: the browser goes first.
    page: Cdp,
    _browser: Chromium,
    a: Node,
    b: Node,
    _redis: Redis,
}

fn setup(bin: &Path) -> Setup {
    setup_with(bin, &[], "/")
}

/// Like `setup`, with extra node flags and the page at `path` on node A.
fn setup_with(bin: &Path, flags: &[&str], path: &str) -> Setup {
    let redis = Redis::start();
    let url = redis.url();
    let mut args = vec!["--redis", &url];
    args.extend_from_slice(flags);
    let a = Node::start(&args);
    let b = Node::start(&args);
    let browser = Chromium::start(bin);
    let mut page = browser.new_page();
    let path = path
        .replace("{A}", &a.addr.to_string())
        .replace("{B}", &b.addr.to_string());
    page.navigate(&a.addr.to_string(), &path);
    Setup {
        page,
        _browser: browser,
        a,
        b,
        _redis: redis,
    }
}

/// Publishes `from..=to` as raw text frames through `client`.
fn publish_range(client: &mut Client, from: u32, to: u32) {
    for i in from..=to {
        client.send_text(&i.to_string()).unwrap();
    }
}

/// The page's received list as strings.
fn received(page: &mut Cdp) -> Vec<String> {
    let v = page.eval("JSON.stringify(window.t.received)");
    serde_json::from_str(v.as_str().unwrap()).unwrap()
}

fn numbers(from: u32, to: u32) -> Vec<String> {
    (from..=to).map(|i| i.to_string()).collect()
}

/// Starts the served client (`/wsrelay.js`, from the page's origin) in the page with `urls`,
/// subscribed to channel `browser`; what it sees goes to `window.t`.
fn start_relay(page: &mut Cdp, urls: &[&str]) {
    page.eval(&format!(
        "(async () => {{
           const {{ WsRelay }} = await import('/wsrelay.js');
           window.t = {{ received: [], meta: [], recovered: [], subscribed: [], opened: [],
                         states: [], errors: [] }};
           const relay = new WsRelay({{ urls: {urls}, minDelay: 100, maxDelay: 1000 }});
           window.relay = relay;
           relay.on('state', (st) => t.states.push(st));
           relay.on('open', ({{ url }}) => t.opened.push(url));
           relay.on('error', (e) => t.errors.push(String(e && (e.code || e.message))));
           relay.subscribe('browser', {{
             onMessage(data, meta) {{ t.received.push(data); t.meta.push(meta); }},
             onSubscribed(info) {{ t.subscribed.push(info); }},
             onRecovered(ok, info) {{ t.recovered.push([ok, info.reason || null]); }},
           }});
           return true;
         }})()",
        urls = json!(urls),
    ));
}

/// The CDP harness itself, on the raw protocol: a plain `WebSocket` in a page served by node A
/// receives what a client of node B sends.
#[test]
fn raw_websocket_in_page_on_a_receives_from_b() {
    let Some(bin) = chromium_or_skip("raw_websocket_in_page_on_a_receives_from_b") else {
        return;
    };
    let mut s = setup(&bin);
    let a_ws = format!("ws://{}/browser-raw", s.a.addr);
    s.page.eval(&format!(
        "window.t = {{ received: [], open: false }};
         const ws = new WebSocket({});
         ws.onopen = () => {{ t.open = true; ws.send('hello from the page'); }};
         ws.onmessage = (e) => t.received.push(e.data);
         true",
        json!(a_ws)
    ));
    // The page's own message coming back proves its subscription is live on A.
    s.page.wait_true(
        "the page to be subscribed",
        "t.received.includes('hello from the page')",
    );
    let mut pubb = s.b.client("/browser-raw");
    publish_range(&mut pubb, 1, 20);
    // A last message proves nothing else (a late duplicate) is on its way.
    pubb.send_text("end").unwrap();
    s.page
        .wait_true("20 messages from B, then the end", "t.received.at(-1) === 'end'");
    let got = received(&mut s.page);
    let mut want = vec!["hello from the page".to_owned()];
    want.extend(numbers(1, 20));
    want.push("end".to_owned());
    assert_eq!(got, want);
}

/// The scenario: the client on a page from node A receives from node B; A dies; the page
/// reconnects to B and ends with every message exactly once, in order.
#[test]
fn v1_client_survives_node_a_dying_without_loss_or_duplicates() {
    let test = "v1_client_survives_node_a_dying_without_loss_or_duplicates";
    let Some(bin) = chromium_or_skip(test) else {
        return;
    };
    let mut s = setup(&bin);
    let (a_ws, b_ws) = (format!("ws://{}", s.a.addr), format!("ws://{}", s.b.addr));

    // The module as the server serves it, from the page's own origin (node A).
    start_relay(&mut s.page, &[&a_ws, &b_ws]);
    s.page
        .wait_true("the page to subscribe on A", "t.subscribed.length === 1");
    assert_eq!(s.page.eval("t.opened"), json!([a_ws]));

    // 1..20 from a raw client on B reach the page on A.
    let mut pubb = s.b.client("/browser");
    publish_range(&mut pubb, 1, 20);
    s.page.wait_true("1..20 on A", "t.received.length >= 20");
    assert_eq!(received(&mut s.page), numbers(1, 20));

    // A dies; 21..40 are published while the page is reconnecting.
    s.a.kill();
    publish_range(&mut pubb, 21, 40);
    s.page.wait_true(
        "the page to resubscribe on B",
        "t.subscribed.length === 2 && relay.state === 'open'",
    );
    assert_eq!(s.page.eval("t.opened.at(-1)"), json!(b_ws));
    // 41..60 after the reconnect.
    publish_range(&mut pubb, 41, 60);
    s.page.wait_true("1..60 on B", "t.received.length >= 60");
    // A last message proves nothing else (no late duplicate) is on its way.
    pubb.send_text("end").unwrap();
    s.page.wait_true("the end marker", "t.received.at(-1) === 'end'");

    let mut want = numbers(1, 60);
    want.push("end".to_owned());
    assert_eq!(
        received(&mut s.page),
        want,
        "every message exactly once, in order"
    );
    // Subscribed once on A and once on B; the reconnect asked for recovery from offset/epoch
    // and got it.
    assert_eq!(s.page.eval("t.subscribed.length"), json!(2));
    assert_eq!(s.page.eval("t.recovered"), json!([[true, null]]));
    let offsets = s.page.eval("t.meta.map((m) => m.offset)");
    let offsets: Vec<u64> = serde_json::from_value(offsets).unwrap();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless offsets: {offsets:?}"
    );
    let states = s.page.eval("t.states");
    assert!(
        states.as_array().unwrap().contains(&json!("connecting")),
        "the page saw the disconnect: {states}"
    );
}

/// The demo page served at `/`: it connects, sends and shows messages, and shows a visible
/// notice when a reconnect could not recover what was missed (history of 3 messages, 300 missed:
/// Redis trims in whole stream nodes every 64 publishes, so it may keep up to about 164 more).
#[test]
fn demo_page_chats_and_shows_when_history_was_lost() {
    let Some(bin) = chromium_or_skip("demo_page_chats_and_shows_when_history_was_lost") else {
        return;
    };
    let mut s = setup_with(
        &bin,
        &["--history-size", "3"],
        "/?channel=demo&urls=ws://{A},ws://{B}",
    );
    let p = &mut s.page;
    p.wait_true(
        "the demo to connect and join",
        "document.getElementById('state').textContent === 'open' \
         && window.wsrelayDemo.subscription.active",
    );
    let log_has = |text: &str| {
        format!(
            "[...document.querySelectorAll('#log li')].some((li) => li.textContent.includes({}))",
            json!(text)
        )
    };
    // Sending from the page's form.
    p.eval(
        "document.getElementById('text').value = 'hi from the demo';
         document.getElementById('send').requestSubmit(); true",
    );
    p.wait_true("the page's own message", &log_has(": hi from the demo"));
    // Receiving from node B.
    let mut pubb = s.b.client("/demo");
    pubb.send_text("hello from B").unwrap();
    p.wait_true("B's message", &log_has("hello from B"));
    assert_eq!(
        p.eval("document.getElementById('notice').classList.contains('show')"),
        json!(false)
    );

    // A dies and 300 messages pass while the page is away: more than the history keeps.
    s.a.kill();
    publish_range(&mut pubb, 1, 300);
    p.wait_true(
        "the lost-history notice",
        "document.getElementById('notice').classList.contains('show')",
    );
    let notice = p.eval("document.getElementById('notice-text').textContent");
    assert!(notice.as_str().unwrap().contains("missed"), "{notice}");
    p.wait_true(
        "the demo to reconnect",
        "document.getElementById('state').textContent === 'open'",
    );
    pubb.send_text("after the reconnect").unwrap();
    p.wait_true(
        "live messages after the reconnect",
        &log_has("after the reconnect"),
    );
}

/// Publishes `text` on channel `browser` through `node`'s `POST /publish`, once stored.
fn post(node: &Node, key: &str, text: &str) {
    let (status, body) = common::http_request(
        node.addr,
        &format!(
            "POST /publish?channel=browser HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: {}\r\n\r\n{text}",
            text.len()
        ),
    );
    assert_eq!(status, 200, "{body}");
}

/// The page through the balancer (deploy/haproxy.cfg in front of three nodes on one Redis),
/// with `urls` naming only HAProxy: it stays subscribed while the node it is on is killed, and
/// then while every node is restarted in turn (SIGTERM, exit, start again), and ends with every
/// message once, in order, every reconnect recovered.
#[test]
fn v1_client_through_haproxy_survives_a_crash_and_a_rolling_restart() {
    let test = "v1_client_through_haproxy_survives_a_crash_and_a_rolling_restart";
    let Some(bin) = chromium_or_skip(test) else {
        return;
    };
    let Some(haproxy_bin) = lb::binary_or_skip("haproxy", "haproxy", test) else {
        return;
    };
    const KEY: &str = "browser-test-api-key-0123";
    let redis = Redis::start();
    let url = redis.url();
    let args = [
        "--redis",
        url.as_str(),
        "--threads",
        "1",
        "--api-key",
        KEY,
        "--drain-delay",
        "2s",
        "--drain-period",
        "500ms",
    ];
    let start = |listen: &str, proxy: &str| {
        let mut a = args.to_vec();
        a.extend(["--proxy-listen", proxy]);
        Node::start_on(listen, &a)
    };
    let mut nodes: Vec<Node> = (0..3).map(|_| start("127.0.0.1:0", "127.0.0.1:0")).collect();
    let listen: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let proxy: Vec<String> = nodes.iter().map(|n| n.proxy_addr().to_string()).collect();
    let servers = [0, 1, 2].map(|i| proxy[i].parse().unwrap());
    let h = lb::Haproxy::start(&haproxy_bin, servers);
    h.wait_all_up();

    // The page and its client both come through HAProxy.
    let browser = Chromium::start(&bin);
    let mut page = browser.new_page();
    page.navigate(&h.addr.to_string(), "/");
    let lb_ws = format!("ws://{}", h.addr);
    start_relay(&mut page, &[&lb_ws]);
    page.wait_true("the page to subscribe", "t.subscribed.length === 1");
    let mut sent = Vec::new();
    let mut publish = |node: &Node, n: usize| {
        for _ in 0..n {
            let text = format!("m{}", sent.len() + 1);
            post(node, KEY, &text);
            sent.push(text);
        }
    };
    publish(&nodes[0], 10);
    page.wait_true("the first 10", "t.received.length >= 10");

    // Kill the node the page is on; publish while it reconnects; start the node again.
    let on = (0..3)
        .find(|&i| nodes[i].metric("wsrelay_websockets") == 1)
        .expect("the page's node");
    nodes[on].kill();
    publish(&nodes[(on + 1) % 3], 10);
    page.wait_true(
        "the page to resubscribe after the crash",
        "t.subscribed.length >= 2 && relay.state === 'open'",
    );
    nodes[on] = start(&listen[on], &proxy[on]);
    h.wait_status(lb::HAPROXY_SERVERS[on], "UP", BROWSER_WAIT);
    publish(&nodes[on], 5);

    // Rolling restart: every node drains and comes back, publishing all along.
    for i in 0..3 {
        let other = (i + 1) % 3;
        nodes[i].signal(libc::SIGTERM);
        publish(&nodes[other], 5);
        assert_eq!(nodes[i].wait_exit(BROWSER_WAIT).code(), Some(0));
        publish(&nodes[other], 5);
        nodes[i] = start(&listen[i], &proxy[i]);
        h.wait_status(lb::HAPROXY_SERVERS[i], "UP", BROWSER_WAIT);
        publish(&nodes[i], 5);
    }
    post(&nodes[0], KEY, "end");
    sent.push("end".to_owned());
    page.wait_true("the end marker", "t.received.at(-1) === 'end'");

    assert_eq!(received(&mut page), sent, "every message exactly once, in order");
    let offsets: Vec<u64> = serde_json::from_value(page.eval("t.meta.map((m) => m.offset)")).unwrap();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless offsets: {offsets:?}"
    );
    let recovered = page.eval("t.recovered");
    let recovered = recovered.as_array().unwrap();
    assert!(recovered.len() >= 2, "the page reconnected: {recovered:?}");
    assert!(
        recovered.iter().all(|r| r[0] == json!(true)),
        "every reconnect recovered: {recovered:?}"
    );
}

/// The demo page shows who is online in its room: itself (by the name it was given), a client
/// of the other node joining, and that client leaving (presence read, then join/leave events).
#[test]
fn demo_page_shows_who_is_online() {
    let Some(bin) = chromium_or_skip("demo_page_shows_who_is_online") else {
        return;
    };
    let mut s = setup_with(
        &bin,
        &["--join-leave", "*"],
        "/?channel=lobby&name=Ada&urls=ws://{A},ws://{B}",
    );
    let p = &mut s.page;
    let online = "[...document.querySelectorAll('#online-list li')].map((li) => li.textContent)";
    let shows = |names: &[&str]| {
        format!(
            "JSON.stringify({online}.sort()) === {}",
            json!(json!(names).to_string())
        )
    };
    p.wait_true("the page to list itself", &shows(&["Ada"]));
    let mut rusty = common::V1::connect(s.b.addr, None).unwrap();
    let r = rusty
        .subscribe_with_info("lobby", json!({"name": "Rusty"}))
        .unwrap();
    assert_eq!(r["type"], "subscribed", "{r}");
    p.wait_true("the other node's client to join", &shows(&["Ada", "Rusty"]));
    assert_eq!(
        p.eval("document.querySelector('#online-list li.me').textContent"),
        json!("Ada")
    );
    rusty.client.close();
    p.wait_true("the other node's client to leave", &shows(&["Ada"]));
    assert_eq!(
        p.eval("document.getElementById('online-count').textContent"),
        json!("(1)")
    );
}

/// The browser client with `getToken` keeps one connection open past many token lifetimes: it
/// authenticates with a `connect` command and refreshes each 3-second token before it expires
/// (the server closes an expired one with 4401), receiving all along.
#[test]
fn browser_client_refreshes_its_token_by_itself() {
    let Some(bin) = chromium_or_skip("browser_client_refreshes_its_token_by_itself") else {
        return;
    };
    const SECRET: &str = "browser-test-secret-of-32-bytes-or-more";
    let mut s = setup_with(&bin, &["--token-secret", SECRET, "--token-leeway", "0s"], "/");
    let a_ws = format!("ws://{}", s.a.addr);
    // Tokens are minted in the page (WebCrypto HMAC-SHA256), each valid for 3 seconds.
    s.page.eval(&format!(
        "(async () => {{
           const {{ WsRelay }} = await import('/wsrelay.js');
           const enc = new TextEncoder();
           const b64u = (b) => btoa(String.fromCharCode(...new Uint8Array(b)))
             .replace(/\\+/g, '-').replace(/\\//g, '_').replace(/=+$/, '');
           const key = await crypto.subtle.importKey('raw', enc.encode({secret}),
             {{ name: 'HMAC', hash: 'SHA-256' }}, false, ['sign']);
           window.t = {{ minted: 0, refreshed: [], opened: [], received: [], closes: [], errors: [] }};
           async function getToken() {{
             const head = b64u(enc.encode(JSON.stringify({{ alg: 'HS256', typ: 'JWT' }})));
             const body = b64u(enc.encode(JSON.stringify({{ sub: 'ada',
               exp: Math.floor(Date.now() / 1000) + 3, subscribe: ['*'], publish: ['*'] }})));
             const sig = await crypto.subtle.sign('HMAC', key, enc.encode(head + '.' + body));
             t.minted++;
             return head + '.' + body + '.' + b64u(sig);
           }}
           const relay = new WsRelay({{ urls: [{url}], getToken, minDelay: 100, maxDelay: 1000 }});
           window.relay = relay;
           relay.on('open', ({{ url }}) => t.opened.push(url));
           relay.on('refreshed', (r) => t.refreshed.push(r.expires));
           relay.on('disconnect', (d) => t.closes.push(d.code));
           relay.on('error', (e) => t.errors.push(String(e && (e.code || e.message))));
           relay.subscribe('browser', {{ onMessage(data) {{ t.received.push(data); }} }});
           return true;
         }})()",
        secret = json!(SECRET),
        url = json!(a_ws),
    ));
    s.page
        .wait_true("the page to connect with its token", "t.opened.length === 1");
    // Past three token lifetimes: refreshed (at least) four times, on one connection.
    s.page.wait_true("four refreshes", "t.refreshed.length >= 4");
    let token = wsrelay::auth::mint(
        SECRET.as_bytes(),
        &wsrelay::auth::Claims {
            sub: "backend".into(),
            exp: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600,
            nbf: None,
            subscribe: vec!["*".into()],
            publish: vec!["*".into()],
        },
    );
    let mut pubb = s.b.client(&format!("/browser?token={token}"));
    pubb.sync("sync", BROWSER_WAIT).unwrap();
    publish_range(&mut pubb, 1, 5);
    s.page.wait_true("the messages", "t.received.at(-1) === '5'");
    assert_eq!(
        s.page.eval("t.opened.length"),
        json!(1),
        "one connection all along"
    );
    assert_eq!(s.page.eval("t.closes"), json!([]), "never closed (no 4401)");
    assert_eq!(s.a.metric("wsrelay_token_expired_closes_total"), 0);
    assert!(s.page.eval("t.minted").as_u64().unwrap() >= 5);
}
