//! Integration-test harness: runs the real `switchboard` binary on a free loopback port and
//! talks to it over real sockets.
//!
//! Owns: starting and stopping one server per test ([`TestServer`]), a WebSocket client on
//! tungstenite with read timeouts ([`Client`], over TCP or, for `wss://`, rustls over TCP:
//! [`TlsStream`]), a raw-socket client for what tungstenite will not
//! send ([`RawWs`], [`HttpReply`]), JWT minting ([`jwt`]), throwaway PostgreSQL clusters for
//! the message store tests ([`pg`]), and real Redis servers and Redis Clusters for the cluster
//! tests ([`redis`]). Every wait here is bounded, so a missing frame fails the test instead of
//! hanging it. Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

/// Run each named test body `fn name(env: &[(&str, &str)])` twice: `memory::name` against the
/// in-memory message store, `postgres::name` against a fresh database of the shared
/// PostgreSQL cluster (`pg::database`). Use with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $name() { super::$name(&[]); })*
        }
        mod postgres {
            $(#[test] fn $name() {
                let url = super::common::pg::database(stringify!($name));
                super::$name(&[("SWITCHBOARD_DATABASE_URL", &url)]);
            })*
        }
    };
}

pub mod http_stub;
pub mod kafka;
pub mod pg;
pub mod proxy;
pub mod redis;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// How long a client waits for an expected frame before the test fails.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to answer `GET /live` after spawn. It answers within
/// milliseconds; a CI run on a loaded 2-core machine once saw a debug-build server write its
/// first log line more than 10 s after spawn (three tests failed on it), so the bound is
/// generous: it only matters when something is wrong.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Spawn attempts when the picked port was taken between the probe and the server's bind.
const START_ATTEMPTS_MAX: usize = 5;
/// Largest HTTP response read by the raw helpers.
const HTTP_RESPONSE_BYTES_MAX: usize = 1 << 20;
/// Largest frame payload accepted by [`RawWs::read_frame`].
const RAW_FRAME_BYTES_MAX: u64 = 16 << 20;
/// Shards every test server runs, so that cross-shard paths are exercised.
pub const SHARDS: &str = "2";

/// Ports handed out in this test process; SO_REUSEPORT would let two servers share one.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static SERVER_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Unix time in seconds.
pub fn now_s() -> u64 {
    now_ms() / 1000
}

/// Path of a file in `tests/keys/`.
pub fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nothing listens on now, never handed out twice in this test process.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        drop(l);
        let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// One running server process, killed on drop.
/// Connections tried before giving up on landing one on a given shard (each lands on a given
/// one of 2 shards with probability ~1/2).
const SHARD_PLACEMENT_ATTEMPTS_MAX: usize = 64;

/// Take every variable that configures the server out of `cmd`'s environment
/// (`SWITCHBOARD_*`, `WEBSOCKET_*`, the replaced services' names): a test's server or
/// `doctor` run sees only what the test sets.
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_")
            || k.starts_with("WEBSOCKET_")
            || ALIAS_ENV.contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
    // The suite's second pass (tests/run-all.sh) runs every server on the other I/O backend;
    // a test that sets SWITCHBOARD_IO_BACKEND itself still wins (its env comes later).
    if let Ok(backend) = std::env::var(IO_BACKEND_ENV) {
        cmd.env("SWITCHBOARD_IO_BACKEND", backend);
    }
    cmd
}

/// The variable tests/run-all.sh sets to run the whole suite on one I/O backend
/// (`epoll` or `io_uring`); unset = the server's default.
pub const IO_BACKEND_ENV: &str = "SB_TEST_IO_BACKEND";

/// The env variables of the replaced services the server reads as aliases (config.rs
/// `ENV_ALIASES`, besides `WEBSOCKET_*`): removed from a test server's environment, so a
/// `PORT` or `DATABASE_URL` of the machine running the tests configures nothing.
pub const ALIAS_ENV: &[&str] = &[
    "HTTP_HOST",
    "HTTP_PORT",
    "PORT",
    "AUTH_ENABLED",
    "AUTH_SERVICE_URL",
    "AUTH_TIMEOUT",
    "ENVIRONMENT",
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BROKERS",
    "KAFKA_GROUP_ID",
    "JWT_SECRET",
];

pub struct TestServer {
    child: Child,
    pub port: u16,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl TestServer {
    /// Spawn the server with `SWITCHBOARD_*` settings `env` (on top of host, port, 2 shards, no
    /// core pinning) and wait until `GET /live` answers 200.
    pub fn start(env: &[(&str, &str)]) -> TestServer {
        TestServer::start_port_as("SWITCHBOARD_PORT", env)
    }

    /// [`TestServer::start`], giving the port through the variable `port_var` (e.g. the
    /// messaging service's `PORT`) instead of `SWITCHBOARD_PORT`.
    pub fn start_port_as(port_var: &str, env: &[(&str, &str)]) -> TestServer {
        TestServer::start_with_hook(port_var, env, &|_| {})
    }

    /// [`TestServer::start_port_as`], with `hook` applied to the command last (e.g. a
    /// `pre_exec` that puts the server under a seccomp filter).
    pub fn start_with_hook(
        port_var: &str,
        env: &[(&str, &str)],
        hook: &dyn Fn(&mut Command),
    ) -> TestServer {
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS_MAX {
            let port = free_port();
            let seq = SERVER_SEQ.fetch_add(1, Ordering::Relaxed);
            let log_path = std::env::temp_dir().join(format!(
                "switchboard-itest-{}-{seq}-{port}.log",
                std::process::id()
            ));
            let log = std::fs::File::create(&log_path).expect("create server log file");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
            // Hermetic: nothing from the caller's environment configures the server.
            hermetic(&mut cmd);
            cmd.env("SWITCHBOARD_HOST", "127.0.0.1")
                .env(port_var, port.to_string())
                .env("SWITCHBOARD_SHARDS", SHARDS)
                .env("SWITCHBOARD_PIN_CORES", "false")
                .env("SWITCHBOARD_LOG_LEVEL", "info")
                .env("NO_COLOR", "1");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            hook(&mut cmd);
            let child = cmd.spawn().expect("spawn switchboard");
            let mut server = TestServer {
                child,
                port,
                log_path,
                exit: None,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = server.child.try_wait() {
                    server.exit = Some(status);
                    last_log = server.logs();
                    break; // port taken after all, or a config error: try again, then report
                }
                if let Some((200, _)) = server.try_http_get("/live") {
                    return server;
                }
                if Instant::now() > deadline {
                    panic!(
                        "server did not answer /live within {START_TIMEOUT:?}; log:\n{}",
                        server.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("server failed to start {START_ATTEMPTS_MAX} times; last log:\n{last_log}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A TCP connection with read and write timeouts.
    pub fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).expect("connect to server");
        s.set_read_timeout(Some(RECV_TIMEOUT))
            .expect("set read timeout");
        s.set_write_timeout(Some(RECV_TIMEOUT))
            .expect("set write timeout");
        s.set_nodelay(true).expect("set nodelay");
        s
    }

    /// `GET path` over a fresh connection: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let r = self.http_request(&format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ));
        (r.status, r.body)
    }

    pub fn try_http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
        let r = read_http_reply(&mut s).ok()?;
        Some((r.status, r.body))
    }

    /// Send a raw request (head and body) and read the whole reply.
    pub fn http_request(&self, raw: &str) -> HttpReply {
        let mut s = self.tcp();
        s.write_all(raw.as_bytes()).expect("write request");
        read_http_reply(&mut s).unwrap_or_else(|e| panic!("reading reply to {raw:?}: {e}"))
    }

    /// Send an upgrade request for `path_and_query` with extra headers over a raw socket and
    /// return the reply head (and body, when it is not 101).
    pub fn raw_upgrade(&self, path_and_query: &str, headers: &[(&str, &str)]) -> HttpReply {
        let mut s = self.tcp();
        s.write_all(upgrade_request(path_and_query, headers).as_bytes())
            .expect("write upgrade");
        read_http_reply(&mut s)
            .unwrap_or_else(|e| panic!("reading upgrade reply for {path_and_query}: {e}"))
    }

    /// A raw WebSocket connection after a successful upgrade (the `connected` frame unread).
    pub fn raw_ws(&self, path_and_query: &str) -> RawWs {
        let mut s = self.tcp();
        s.write_all(upgrade_request(path_and_query, &[]).as_bytes())
            .expect("write upgrade");
        let (status, _, rest) = read_http_head(&mut s).expect("upgrade reply head");
        assert_eq!(status, 101, "raw upgrade refused; log:\n{}", self.logs());
        RawWs { s, buf: rest }
    }

    /// Connect a WebSocket client and read its `connected` frame.
    pub fn connect(&self, path_and_query: &str) -> Client {
        self.connect_with(path_and_query, &[])
    }

    /// Connect with extra request headers and read the `connected` frame.
    pub fn connect_with(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Client {
        let (mut c, _) = self
            .try_connect_with(path_and_query, headers, None)
            .unwrap_or_else(|r| {
                panic!(
                    "upgrade of {path_and_query} refused: {} {}",
                    r.status, r.body
                )
            });
        c.read_welcome();
        c
    }

    /// Connect until the kernel's SO_REUSEPORT hash lands the connection on `shard` (the
    /// server must run with `SWITCHBOARD_EXPOSE_SHARD=true`, which puts the serving shard in
    /// `connected.data.shard`), so cross-shard cases are tested on purpose, not by luck.
    pub fn connect_on_shard(&self, path_and_query: &str, shard: u64) -> Client {
        for _ in 0..SHARD_PLACEMENT_ATTEMPTS_MAX {
            let c = self.connect(path_and_query);
            let got = c.welcome["data"]["shard"].as_u64().unwrap_or_else(|| {
                panic!(
                    "connected has no data.shard (start the server with SWITCHBOARD_EXPOSE_SHARD=true): {}",
                    c.welcome
                )
            });
            if got == shard {
                return c;
            }
            // Wait for the server's close reply: it detaches a connection (rooms, devices,
            // presence counts) before it answers, so the next step sees it gone.
            c.close_and_wait();
        }
        panic!("no connection landed on shard {shard} in {SHARD_PLACEMENT_ATTEMPTS_MAX} attempts");
    }

    /// Connect a client whose socket receive buffer is `rcvbuf` bytes (a slow reader).
    pub fn connect_small_rcvbuf(&self, path_and_query: &str, rcvbuf: usize) -> Client {
        let (mut c, _) = self
            .try_connect_with(path_and_query, &[], Some(rcvbuf))
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
        c.read_welcome();
        c
    }

    /// Upgrade; on success the client (welcome unread) and the response headers, else the
    /// HTTP refusal.
    pub fn try_connect_with(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
        rcvbuf: Option<usize>,
    ) -> Result<(Client, Vec<(String, String)>), HttpReply> {
        let stream = match rcvbuf {
            None => self.tcp(),
            Some(size) => {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                sock.set_recv_buffer_size(size).expect("SO_RCVBUF");
                sock.connect(&self.addr().into()).expect("connect");
                let s: TcpStream = sock.into();
                s.set_read_timeout(Some(RECV_TIMEOUT))
                    .expect("set read timeout");
                s.set_write_timeout(Some(RECV_TIMEOUT))
                    .expect("set write timeout");
                s.set_nodelay(true).expect("set nodelay");
                s
            }
        };
        let url = format!("ws://127.0.0.1:{}{path_and_query}", self.port);
        let mut req = url.as_str().into_client_request().expect("client request");
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        match tungstenite::client::client_with_config(req, stream, Some(client_config())) {
            Ok((ws, resp)) => {
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                Ok((
                    Client {
                        ws,
                        welcome: Value::Null,
                        client_id: String::new(),
                    },
                    headers,
                ))
            }
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                Err(HttpReply {
                    status,
                    headers,
                    body,
                })
            }
            Err(e) => panic!(
                "handshake with {path_and_query} failed: {e}; log:\n{}",
                self.logs()
            ),
        }
    }

    /// A fresh client still gets served (after some other client misbehaved).
    /// Wait (at most 20 s) until `/ready` answers 200: the message store is set up (a
    /// PostgreSQL store connects and migrates in the background after start).
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, _)) = self.try_http_get("/ready") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/ready never answered 200; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn assert_serving(&self) {
        let mut c = self.connect("/ws");
        c.send_json(json!({"type": "ping", "id": "still-serving"}));
        let pong = c.expect_type("pong");
        assert_eq!(pong["id"], "still-serving");
        c.close();
    }

    /// Poll `/metrics` until `pred(text)` holds (metrics are published every 250 ms).
    pub fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let (status, text) = self.http_get("/metrics");
            assert_eq!(status, 200, "/metrics status");
            if pred(&text) {
                return text;
            }
            if Instant::now() > deadline {
                panic!("metrics never showed {what}; last:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send SIGTERM and wait (bounded) for the process to exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal_term();
        self.wait_exit()
    }

    /// Send SIGTERM without waiting.
    /// SIGKILL the server (a node that dies without a word) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
    }

    pub fn signal_term(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Send `sig` to the server (SIGSTOP and SIGCONT pause and resume a whole node).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exit = Some(status);
                false
            }
            None => true,
        }
    }

    /// Wait (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "server did not exit within {EXIT_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- switchboard log (port {}) ----\n{}",
                self.port,
                self.logs()
            );
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// The tungstenite settings of the test client, every one set explicitly.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .write_buffer_size(0) // write each message at once
        .max_write_buffer_size(16 << 20)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
        .accept_unmasked_frames(false)
}

/// A GET upgrade request with a fixed valid key.
pub fn upgrade_request(path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let mut r = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Response headers: (lowercased name, value).
pub type Headers = Vec<(String, String)>;

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Read a response head: (status, headers, bytes after the head).
fn read_http_head(s: &mut TcpStream) -> std::io::Result<(u16, Headers, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > HTTP_RESPONSE_BYTES_MAX {
            return Err(std::io::Error::other("response head too large"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a complete head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, buf[end..].to_vec()))
}

/// Read a whole response (head, then the body by Content-Length or to EOF). A 101 returns at
/// the end of its head.
fn read_http_reply(s: &mut TcpStream) -> std::io::Result<HttpReply> {
    let (status, headers, mut body) = read_http_head(s)?;
    if status != 101 {
        let len: Option<usize> = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok());
        let mut chunk = [0u8; 4096];
        while len.is_none_or(|l| body.len() < l) && body.len() < HTTP_RESPONSE_BYTES_MAX {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// What one read from a client produced.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Binary(Vec<u8>),
    /// A close frame: code (None when the frame had no payload) and reason.
    Close(Option<u16>, String),
    /// The TCP connection ended without (or after) a close frame.
    Closed(String),
    /// Nothing within the timeout.
    Timeout,
}

/// A client's stream whose reads can be given a timeout (a `TcpStream`, or TLS over one).
pub trait ReadTimeout {
    fn set_read_timeout_to(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl ReadTimeout for TcpStream {
    fn set_read_timeout_to(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(d)
    }
}

/// A `wss://` client's stream: rustls over a blocking `TcpStream`.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl ReadTimeout for TlsStream {
    fn set_read_timeout_to(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

/// A WebSocket client (tungstenite over a blocking `TcpStream` with timeouts, or over TLS).
pub struct Client<S = TcpStream> {
    pub ws: WebSocket<S>,
    /// The `connected` frame.
    pub welcome: Value,
    /// `welcome.data.client_id`.
    pub client_id: String,
}

impl<S: Read + Write + ReadTimeout> Client<S> {
    /// A client over an upgraded `ws`, after reading its `connected` frame.
    pub fn welcomed(ws: WebSocket<S>) -> Client<S> {
        let mut c = Client {
            ws,
            welcome: Value::Null,
            client_id: String::new(),
        };
        c.read_welcome();
        c
    }

    fn read_welcome(&mut self) {
        let w = self.expect_type("connected");
        self.client_id = w["data"]["client_id"]
            .as_str()
            .expect("connected.data.client_id is a string")
            .to_owned();
        self.welcome = w;
    }

    pub fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("send {text:.200}: {e}"));
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .expect("send binary");
    }

    /// Send without failing when the server has already closed (for flooding tests).
    pub fn try_send_json(&mut self, v: &Value) -> bool {
        self.ws.send(Message::text(v.to_string())).is_ok()
    }

    /// The next application event within `timeout`; pings are answered (by tungstenite on the
    /// next read) and skipped.
    pub fn next_event(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::Timeout;
            }
            self.ws
                .get_mut()
                .set_read_timeout_to(Some(left))
                .expect("set read timeout");
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("server sent a text frame that is not JSON ({e}): {t}")
                    });
                    return Event::Json(v);
                }
                Ok(Message::Binary(b)) => return Event::Binary(b.to_vec()),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => continue,
                Ok(Message::Close(f)) => {
                    return match f {
                        Some(f) => {
                            Event::Close(Some(u16::from(f.code)), f.reason.as_str().to_owned())
                        }
                        None => Event::Close(None, String::new()),
                    }
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue; // the loop re-checks the deadline
                }
                Err(e) => return Event::Closed(e.to_string()),
            }
        }
    }

    /// The next JSON frame; fails on timeout, close or a non-JSON frame.
    pub fn recv_json(&mut self) -> Value {
        match self.next_event(RECV_TIMEOUT) {
            Event::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame must have `"type": t`; checks its timestamp and returns it.
    pub fn expect_type(&mut self, t: &str) -> Value {
        let v = self.recv_json();
        assert_eq!(v["type"], t, "expected a {t:?} frame, got {v}");
        assert_timestamp(&v);
        v
    }

    /// The next frame must be exactly `{"type":"error","error":text,"timestamp":..}` (plus `id`
    /// when the command had one, checked by the caller).
    pub fn expect_error(&mut self, text: &str) -> Value {
        let v = self.expect_type("error");
        assert_eq!(v["error"], text, "wrong error text in {v}");
        v
    }

    /// The next event must be a close frame with `code`.
    pub fn expect_close(&mut self, code: u16) {
        match self.next_event(RECV_TIMEOUT) {
            Event::Close(Some(c), reason) => assert_eq!(c, code, "close code (reason {reason:?})"),
            other => panic!("expected close {code}, got {other:?}"),
        }
    }

    /// Skip JSON frames (at most `skip_max`, returned) until a close frame with `code`.
    pub fn expect_close_after(&mut self, code: u16, skip_max: usize) -> Vec<Value> {
        let mut skipped = Vec::new();
        loop {
            match self.next_event(RECV_TIMEOUT) {
                Event::Json(v) if skipped.len() < skip_max => skipped.push(v),
                Event::Close(Some(c), reason) => {
                    assert_eq!(
                        c,
                        code,
                        "close code (reason {reason:?}) after {} frames",
                        skipped.len()
                    );
                    return skipped;
                }
                other => panic!(
                    "expected close {code} after {} frames, got {other:?}",
                    skipped.len()
                ),
            }
        }
    }

    /// No application frame (nor close) arrives within `ms`.
    pub fn expect_silence(&mut self, ms: u64) {
        match self.next_event(Duration::from_millis(ms)) {
            Event::Timeout => {}
            other => panic!("expected silence for {ms} ms, got {other:?}"),
        }
    }

    /// Subscribe and return the `subscribed` frame.
    pub fn subscribe(&mut self, room: &str) -> Value {
        self.send_json(json!({"type": "subscribe", "room": room}));
        let v = self.expect_type("subscribed");
        assert_eq!(v["room"], room, "{v}");
        v
    }

    /// Close politely (best effort).
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }

    /// Close and read until the server's close frame (or the end of the stream) arrives.
    pub fn close_and_wait(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
        let deadline = Instant::now() + RECV_TIMEOUT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// `v.timestamp` is Unix milliseconds close to now.
pub fn assert_timestamp(v: &Value) {
    let ts = v["timestamp"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer timestamp in {v}"));
    let now = now_ms();
    assert!(
        ts + 30_000 > now && ts < now + 30_000,
        "timestamp {ts} is not Unix ms near {now}: {v}"
    );
}

/// `s` is a hyphenated UUID.
pub fn assert_uuid(s: &Value) {
    let text = s.as_str().unwrap_or_else(|| panic!("not a string: {s}"));
    let ok = text.len() == 36
        && text.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    assert!(ok, "not a UUID: {text:?}");
}

/// Parse an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) to Unix ms.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match s.get(i..)? {
        "Z" | "z" => 0,
        rest if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let m = rest[1..3].parse::<i64>().ok()? * 60 + rest[4..6].parse::<i64>().ok()?;
            if rest.starts_with('-') {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

/// A raw WebSocket connection for frames tungstenite will not produce.
pub struct RawWs {
    pub s: TcpStream,
    buf: Vec<u8>,
}

/// What [`RawWs::read_frame`] saw.
#[derive(Debug, PartialEq)]
pub enum RawEvent {
    Frame {
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    },
    /// EOF or reset.
    Eof,
    Timeout,
}

impl RawWs {
    /// Write one frame; `mask: None` sends it unmasked (a protocol violation from a client).
    pub fn write_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(m) => {
                out.extend_from_slice(&m);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        self.s.write_all(&out).expect("write raw frame");
    }

    /// Read one server frame within `timeout`.
    pub fn read_frame(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((fin, opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame {
                    fin,
                    opcode,
                    payload,
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawEvent::Timeout;
            }
            self.s
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            let mut chunk = [0u8; 16 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return RawEvent::Eof,
            }
        }
    }

    /// Read frames until a close frame; returns its code and the JSON text frames before it.
    pub fn expect_close(&mut self, code: u16) -> Vec<Value> {
        let mut texts = Vec::new();
        loop {
            match self.read_frame(RECV_TIMEOUT) {
                RawEvent::Frame {
                    opcode: 0x8,
                    payload,
                    ..
                } => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    let got = u16::from_be_bytes([payload[0], payload[1]]);
                    assert_eq!(
                        got,
                        code,
                        "close code; reason {:?}",
                        String::from_utf8_lossy(&payload[2..])
                    );
                    return texts;
                }
                RawEvent::Frame {
                    opcode: 0x1,
                    payload,
                    ..
                } => {
                    texts.push(serde_json::from_slice(&payload).expect("text frame is JSON"));
                }
                RawEvent::Frame { .. } => {}
                other => panic!("expected close {code}, got {other:?} after {texts:?}"),
            }
        }
    }
}

/// One unmasked server frame at the start of `buf`: (fin, opcode, payload, bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, mut off) = match buf[1] & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    assert!(len <= RAW_FRAME_BYTES_MAX, "server frame of {len} bytes");
    let end = off + len as usize;
    if buf.len() < end {
        return None;
    }
    let payload = buf[off..end].to_vec();
    off = end;
    Some((buf[0] & 0x80 != 0, buf[0] & 0x0F, payload, off))
}

/// JWT minting for the auth tests.
pub mod jwt {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::Value;

    /// The HMAC secret the HS256 test servers use.
    pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

    pub fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret))
            .expect("encode HS token")
    }

    pub fn hs256(claims: &Value) -> String {
        hs(Algorithm::HS256, SECRET.as_bytes(), claims)
    }

    /// Sign with a PEM private key from `tests/keys/`.
    pub fn pem(alg: Algorithm, key_file: &str, claims: &Value) -> String {
        let pem = std::fs::read(super::key_path(key_file)).expect("read test key");
        let key = match alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
                EncodingKey::from_rsa_pem(&pem)
            }
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("no PEM key for {other:?}"),
        }
        .expect("parse test key");
        encode(&Header::new(alg), claims, &key).expect("encode token")
    }

    /// An unsigned token with `alg: none`.
    pub fn alg_none(claims: &Value) -> String {
        format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(claims.to_string().as_bytes())
        )
    }

    /// Unpadded base64url.
    pub fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

/// Sum of every sample of metric `name` (all label sets).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(r) = rest.strip_prefix('{') {
            r.split_once("} ").map(|(_, v)| v)
        } else {
            rest.strip_prefix(' ')
        };
        if let Some(v) = value.and_then(|v| v.trim().parse::<f64>().ok()) {
            *found.get_or_insert(0) += v as u64;
        }
    }
    found
}

/// One raw HTTP/1.1 connection that reads responses exactly (keeps what follows one).
pub struct HttpConn {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl HttpConn {
    pub fn open(server: &TestServer) -> HttpConn {
        let s = TcpStream::connect(server.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        HttpConn { s, buf: Vec::new() }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).expect("write");
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response, or None when the connection closed first.
    pub fn response(&mut self) -> Option<HttpResp> {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < end + len {
            if !self.fill() {
                return None;
            }
        }
        let body = String::from_utf8_lossy(&self.buf[end..end + len]).into_owned();
        self.buf.drain(..end + len);
        Some(HttpResp {
            status,
            headers,
            body,
        })
    }

    /// True when the server closes the connection within `within`.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        self.s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 64];
        matches!(self.s.read(&mut b), Ok(0))
    }
}

/// `(status, JSON body)` of one HTTP request with `headers` and a JSON `body` (none: no body,
/// and no content headers on a GET), on a fresh connection. A body that is not JSON reads as
/// `null` when `lenient`, and fails the test otherwise.
pub fn http_json(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    lenient: bool,
) -> (u16, Value) {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    let b = body.map(|b| b.to_string()).unwrap_or_default();
    if !b.is_empty() || method != "GET" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(&b);
    let mut c = HttpConn::open(s);
    c.send(r.as_bytes());
    let resp = c
        .response()
        .unwrap_or_else(|| panic!("no response to {method} {path}"));
    let v = match serde_json::from_str(&resp.body) {
        Ok(v) => v,
        Err(_) if lenient => Value::Null,
        Err(_) => panic!("not JSON ({}): {}", resp.status, resp.body),
    };
    (resp.status, v)
}
