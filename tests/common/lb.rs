//! Load balancers for the tests (included with `#[path = "common/lb.rs"] mod lb;` next to
//! `mod common;`): HAProxy and nginx started from the committed configurations in
//! `deploy/`, rendered with only addresses, ports and (nginx) the test's file paths changed.
//! Each substitution must match exactly once, so a change to a committed file that the tests
//! would silently stop exercising fails here instead.
//!
//! The binaries come from Debian's `haproxy` and `nginx-light`. Without them a test prints
//! `SKIPPED` and passes, unless `WSRELAY_REQUIRE_DEPLOY` is set (`.ci/run` installs both and sets
//! it); then a missing binary fails the test.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Echo, WAIT, http_request, unused_port, wait_for, watch_stderr};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Finds `name` on PATH or in the sbin directories (where Debian puts haproxy and nginx).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The binary `name` (Debian package `package`), or `None` after printing why the test is
/// skipped; a missing binary fails the test when `WSRELAY_REQUIRE_DEPLOY` is set.
pub fn binary_or_skip(name: &str, package: &str, test: &str) -> Option<PathBuf> {
    let found = find_binary(name);
    if found.is_none() {
        assert!(
            std::env::var_os("WSRELAY_REQUIRE_DEPLOY").is_none(),
            "{test}: {name} not found and WSRELAY_REQUIRE_DEPLOY is set (apt-get install {package})"
        );
        // Straight to the process's stderr, past the test harness's output capture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {name} not found (apt-get install {package}; .ci/run installs it)"
        );
    }
    found
}

/// Replaces each `(from, to)` in `text`, requiring `from` to occur exactly once.
#[track_caller]
pub fn render(text: &str, substitutions: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in substitutions {
        assert_eq!(
            out.matches(from).count(),
            1,
            "{from:?} must occur exactly once in the committed file"
        );
        out = out.replace(from, to);
    }
    out
}

/// A private directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("wsrelay-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop, its output collected.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command, echo: &'static str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let echo = std::env::var_os("WSRELAY_TEST_LOG").is_some().then_some(echo);
        let shown = echo.map_or(Echo::Nothing, Echo::All);
        let (log, _) = watch_stderr(child.stderr.take().unwrap(), "\u{0}", shown);
        let stdout = child.stdout.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = echo {
                    eprintln!("{prefix}{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    #[track_caller]
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{what} exited ({status}): {:?}", self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`.
#[track_caller]
fn wait_listening(what: &str, addr: SocketAddr) {
    wait_for(&format!("{what} listening on {addr}"), WAIT, || {
        TcpStream::connect(addr).ok().map(|_| ())
    });
}

/// HAProxy running `deploy/haproxy.cfg` in front of three nodes.
pub struct Haproxy {
    /// The `websockets` frontend.
    pub addr: SocketAddr,
    /// The stats page.
    pub stats: SocketAddr,
    proc: Proc,
    _dir: TempDir,
}

/// The server names in `deploy/haproxy.cfg`, in order.
pub const HAPROXY_SERVERS: [&str; 3] = ["node1", "node2", "node3"];

impl Haproxy {
    /// Starts HAProxy with the committed configuration, its three servers at `servers` (the
    /// nodes' `--proxy-listen` addresses: the configuration sends PROXY v2).
    pub fn start(bin: &Path, servers: [SocketAddr; 3]) -> Haproxy {
        let addr: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
        let stats: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
        let committed = std::fs::read_to_string(deploy_dir().join("haproxy.cfg")).unwrap();
        let cfg = render(
            &committed,
            &[
                ("    bind :80\n", format!("    bind {addr}\n")),
                ("10.0.0.11:9001", servers[0].to_string()),
                ("10.0.0.12:9001", servers[1].to_string()),
                ("10.0.0.13:9001", servers[2].to_string()),
                ("bind 127.0.0.1:8404", format!("bind {stats}")),
            ],
        );
        let dir = TempDir::new("haproxy");
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let check = Command::new(bin).arg("-c").arg("-f").arg(&path).output().unwrap();
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut proc = Proc::spawn(Command::new(bin).arg("-db").arg("-f").arg(&path), "[haproxy] ");
        wait_listening("haproxy", stats);
        proc.assert_running("haproxy");
        Haproxy {
            addr,
            stats,
            proc,
            _dir: dir,
        }
    }

    /// Each server's status as the stats page says (`UP`, `DOWN`, `UP 1/2`, `MAINT`, ...).
    pub fn statuses(&self) -> Vec<(String, String)> {
        let (code, body) = http_request(self.stats, "GET /stats;csv HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200, "{body}");
        // HAProxy answers in chunks even to HTTP/1.0.
        let body = dechunk(&body);
        let mut lines = body.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv, status) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > status && f[px] == "wsrelay" && HAPROXY_SERVERS.contains(&f[sv]))
            .map(|f| (f[sv].to_owned(), f[status].to_owned()))
            .collect()
    }

    /// The status of one server.
    pub fn status(&self, server: &str) -> String {
        self.statuses()
            .into_iter()
            .find(|(s, _)| s == server)
            .map(|(_, st)| st)
            .unwrap_or_default()
    }

    /// Waits until `server`'s status is `want` (exactly: `UP` does not match `UP 1/2`).
    #[track_caller]
    pub fn wait_status(&self, server: &str, want: &str, timeout: Duration) {
        wait_for(&format!("haproxy: {server} {want}"), timeout, || {
            (self.status(server) == want).then_some(())
        });
    }

    /// Waits until every server is UP.
    #[track_caller]
    pub fn wait_all_up(&self) {
        for s in HAPROXY_SERVERS {
            self.wait_status(s, "UP", WAIT);
        }
    }

    /// HAProxy's log so far.
    pub fn log(&self) -> Vec<String> {
        self.proc.log()
    }
}

/// nginx running `deploy/nginx.conf` (a site file) inside a minimal main configuration that
/// only points its pid, logs and temporary files at a private directory.
pub struct Nginx {
    /// The `server` block's listen address.
    pub addr: SocketAddr,
    proc: Proc,
    _dir: TempDir,
}

impl Nginx {
    /// Starts nginx with the committed site, its three upstream servers at `servers` (the
    /// nodes' `--listen` addresses).
    pub fn start(bin: &Path, servers: [SocketAddr; 3]) -> Nginx {
        let addr: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
        let committed = std::fs::read_to_string(deploy_dir().join("nginx.conf")).unwrap();
        let site = render(
            &committed,
            &[
                ("    listen 80;\n", format!("    listen {addr};\n")),
                ("10.0.0.11:9000", servers[0].to_string()),
                ("10.0.0.12:9000", servers[1].to_string()),
                ("10.0.0.13:9000", servers[2].to_string()),
            ],
        );
        let dir = TempDir::new("nginx");
        let d = dir.0.display();
        std::fs::write(dir.0.join("wsrelay.conf"), site).unwrap();
        // What Debian's /etc/nginx/nginx.conf provides around conf.d/*.conf, minus root-only
        // paths; `daemon off` and no master so the test owns the one process.
        let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr notice;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/wsrelay.conf;\n}}\n"
        );
        let main_path = dir.0.join("nginx.conf");
        std::fs::write(&main_path, main).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&main_path)
            .args(["-e", "stderr"]);
        let test = Command::new(bin)
            .arg("-t")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&main_path)
            .args(["-e", "stderr"])
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&test.stderr)
        );
        let mut proc = Proc::spawn(&mut cmd, "[nginx] ");
        wait_listening("nginx", addr);
        proc.assert_running("nginx");
        Nginx {
            addr,
            proc,
            _dir: dir,
        }
    }

    /// nginx's error log so far.
    pub fn log(&self) -> Vec<String> {
        self.proc.log()
    }
}

/// The body of a `Transfer-Encoding: chunked` response (`size CRLF data CRLF ... 0 CRLF`).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
