//! The browser tests of `client/wsrelay.js` (owned by the browser-client work of issue 3): a real
//! headless Chromium, driven over the Chrome DevTools Protocol (a WebSocket, through tungstenite),
//! loads a page from wsrelay node A and runs the client there, against two nodes sharing one
//! Redis. The page state is read with `Runtime.evaluate`; every wait polls with a timeout.
//!
//! Chromium is looked up as `$WSRELAY_CHROMIUM`, `/usr/bin/chromium`, then `chromium`,
//! `chromium-browser`, `google-chrome` on PATH. Without it the tests print why and pass, unless
//! `WSRELAY_REQUIRE_BROWSER` is set (`.ci/run` installs Chromium and sets it).

mod common;

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
        let (log, rx) = common::watch_stderr(child.stderr.take().unwrap(), "DevTools listening on ", None);
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
    s.page.wait_true("20 messages from B", "t.received.length >= 21");
    let got = received(&mut s.page);
    let mut want = vec!["hello from the page".to_owned()];
    want.extend(numbers(1, 20));
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
    s.page.eval(&format!(
        "(async () => {{
           const {{ WsRelay }} = await import('/wsrelay.js');
           window.t = {{ received: [], meta: [], recovered: [], subscribed: [], opened: [],
                         states: [], errors: [] }};
           const relay = new WsRelay({{ urls: [{a}, {b}], minDelay: 100, maxDelay: 1000 }});
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
        a = json!(a_ws),
        b = json!(b_ws),
    ));
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
        "t.subscribed.length >= 2 && relay.state === 'open'",
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
    // The reconnect asked for recovery from offset/epoch and got it.
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
