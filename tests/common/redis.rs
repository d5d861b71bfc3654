//! Real Redis servers for the cluster tests, and a plain RESP2 client to look at what they hold.
//!
//! Owns: running a real `redis-server` on a free loopback port in a fresh temporary directory
//! ([`RedisServer`]: no persistence, every option given on the command line; killed, frozen,
//! thawed and restarted on the same port by the fault tests; killed and removed on drop, its log
//! printed when a test fails), a Redis Cluster of N masters made of such servers and joined with
//! `redis-cli --cluster create` ([`RedisCluster`], also one speaking only TLS), and the test's own RESP2 client over a
//! `std::net::TcpStream` ([`RespConn`], [`Resp`]; no redis-cli, no client crate), so a test
//! checks what Redis holds independently of the bridge's `redis` crate. The server under test
//! connects to [`RedisServer::url`] or [`RedisCluster::seeds`] through its environment
//! (`SWITCHBOARD_REDIS_URL`), like to any Redis.
//!
//! A missing `redis-server` (or `redis-cli`, for a cluster) fails the test with the command that
//! installs it: a Redis test never passes by skipping. Every wait here is bounded, and polls.
//! Test processes killed before their drops ran leave servers behind; the first start in a later
//! test process kills those (by the pid files in their directories) and removes the directories.

use std::ffi::OsString;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after spawn (or after a restart).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of one command of [`RedisServer::cmd`] and [`RespConn::call`].
pub const CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`RedisCluster::start`] may take from the first spawn to `cluster_state:ok` on every
/// node, and [`RedisCluster::wait_state`] to see a state.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Cluster node timeout (ms) of [`RedisCluster`] nodes: a node silent this long is failed.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2_000;
/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16_384;
/// The install command named by every "redis-server is missing" failure.
pub const INSTALL: &str = "apt-get install redis-server (tests/run-all.sh installs it)";
/// Spawn attempts when a picked port was taken between the probe and the server's bind.
const START_ATTEMPTS_MAX: usize = 5;
/// One poll of the waits here.
const POLL: Duration = Duration::from_millis(20);
/// Timeout of one readiness probe (PING) while waiting for a server.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Bytes of a server's log printed when a test fails.
const LOG_TAIL_BYTES_MAX: usize = 16 << 10;
/// Largest bulk string, and most array elements, the client accepts in one reply.
const BULK_BYTES_MAX: usize = 64 << 20;
const ARRAY_LEN_MAX: usize = 1 << 20;
/// Deepest nesting of arrays the client accepts (CLUSTER SLOTS nests 3).
const DEPTH_MAX: usize = 32;
/// Prefix of the directories of this harness under the temp dir: `<prefix><pid>-<seq>`.
const DIR_PREFIX: &str = "switchboard-redis-";

static SERVER_SEQ: AtomicUsize = AtomicUsize::new(0);
static CLEAN_STALE: Once = Once::new();

/// Where `name` is: the file named by env `var` (which must exist), else `name` on `path`.
/// Pure (the environment is passed in), so the failure message is testable.
pub fn find_bin(
    name: &str,
    var: &str,
    var_value: Option<OsString>,
    path: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(p) = var_value {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(format!(
            "{var}={} is not a file: point it at a {name} binary or unset it; {name} not found: \
             {INSTALL}",
            p.display()
        ));
    }
    if let Some(path) = path {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!("{name} not found: {INSTALL}"))
}

/// The `redis-server` binary: `SWITCHBOARD_TEST_REDIS_SERVER` (set by tests/run-all.sh), else
/// PATH. Panics with the install command when there is none.
pub fn server_bin() -> PathBuf {
    const VAR: &str = "SWITCHBOARD_TEST_REDIS_SERVER";
    find_bin(
        "redis-server",
        VAR,
        std::env::var_os(VAR),
        std::env::var_os("PATH"),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The `redis-cli` binary (Debian's redis-tools, a dependency of redis-server):
/// `SWITCHBOARD_TEST_REDIS_CLI`, else PATH. Panics with the install command when there is none.
pub fn cli_bin() -> PathBuf {
    const VAR: &str = "SWITCHBOARD_TEST_REDIS_CLI";
    find_bin(
        "redis-cli",
        VAR,
        std::env::var_os(VAR),
        std::env::var_os("PATH"),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

// ---- RESP2 ----------------------------------------------------------------------------------

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (the whole line after `-`)
    Error(String),
    /// `:42`
    Int(i64),
    /// `$3\r\nabc` (binary safe)
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Nil,
    /// `*N` followed by N replies
    Array(Vec<Resp>),
}

impl Resp {
    /// The text of a simple string or bulk string (lossy UTF-8); None for the other kinds.
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn array(&self) -> Option<&[Resp]> {
        match self {
            Resp::Array(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Resp::Error(_))
    }

    /// An array of (name, value) pairs, as `CONFIG GET` and `PUBSUB NUMSUB` reply, as text
    /// pairs (integers as decimal text).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let items = self.array().unwrap_or_default();
        items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((k.to_string(), v.to_string())),
                _ => None,
            })
            .collect()
    }
}

/// Readable text: strings as they are, errors as `(error) ...`, nil as `(nil)`, arrays one
/// element per line (nested arrays flattened).
impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resp::Simple(s) => f.write_str(s),
            Resp::Error(e) => write!(f, "(error) {e}"),
            Resp::Int(n) => write!(f, "{n}"),
            Resp::Bulk(b) => f.write_str(&String::from_utf8_lossy(b)),
            Resp::Nil => f.write_str("(nil)"),
            Resp::Array(v) => {
                for (i, r) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
        }
    }
}

/// `args` as a RESP array of bulk strings (how every client sends a command).
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// One connection speaking RESP2, with read and write timeouts: commands, and for pub/sub the
/// pushed messages ([`RespConn::read`]).
pub struct RespConn {
    s: TcpStream,
    /// Bytes read and not parsed yet.
    buf: Vec<u8>,
}

impl RespConn {
    /// Connect within `timeout`; reads and writes time out after `timeout` too.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<RespConn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(RespConn { s, buf: Vec::new() })
    }

    /// Change the read timeout (e.g. a short one to show nothing arrives).
    pub fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.s.set_read_timeout(Some(timeout))
    }

    /// Send one command (not waiting for its reply).
    pub fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        let raw: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.s.write_all(&encode_command(&raw))
    }

    /// Send one command and read its reply.
    pub fn call(&mut self, args: &[&str]) -> std::io::Result<Resp> {
        self.send(args)?;
        self.read()
    }

    /// Read one reply (or one pushed pub/sub message); a timeout is an error of kind
    /// `WouldBlock` or `TimedOut`. What was read of a partial reply is kept for the next call.
    pub fn read(&mut self) -> std::io::Result<Resp> {
        loop {
            if let Some((r, used)) = parse(&self.buf, 0)? {
                self.buf.drain(..used);
                return Ok(r);
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Parse one reply from the start of `buf`: the reply and the bytes it used, None when `buf`
/// holds only part of one, an error when it is not RESP2.
pub fn parse(buf: &[u8], depth: usize) -> std::io::Result<Option<(Resp, usize)>> {
    if depth > DEPTH_MAX {
        return Err(bad("RESP arrays nested too deep"));
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = buf[..eol].split_first() else {
        return Err(bad("empty RESP line"));
    };
    let line = std::str::from_utf8(line).map_err(|_| bad("RESP line is not UTF-8"))?;
    let after = eol + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|_| bad(format!("bad RESP number {line:?}")))
    };
    match kind {
        b'+' => Ok(Some((Resp::Simple(line.to_owned()), after))),
        b'-' => Ok(Some((Resp::Error(line.to_owned()), after))),
        b':' => Ok(Some((Resp::Int(number()?), after))),
        b'$' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((Resp::Nil, after)));
            }
            let n = usize::try_from(n).map_err(|_| bad("bulk length"))?;
            if n > BULK_BYTES_MAX {
                return Err(bad(format!("bulk string of {n} bytes")));
            }
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err(bad("bulk string not followed by CRLF"));
            }
            Ok(Some((
                Resp::Bulk(buf[after..after + n].to_vec()),
                after + n + 2,
            )))
        }
        b'*' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((Resp::Nil, after)));
            }
            let n = usize::try_from(n).map_err(|_| bad("array length"))?;
            if n > ARRAY_LEN_MAX {
                return Err(bad(format!("array of {n} elements")));
            }
            let mut items = Vec::with_capacity(n.min(1024));
            let mut at = after;
            for _ in 0..n {
                match parse(&buf[at..], depth + 1)? {
                    Some((r, used)) => {
                        items.push(r);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(items), at)))
        }
        other => Err(bad(format!(
            "RESP2 type byte {:?} not understood (a RESP3 reply?)",
            other as char
        ))),
    }
}

/// One command over a fresh connection to `addr`, bounded by `timeout` for connect, write and
/// read.
pub fn command(addr: SocketAddr, args: &[&str], timeout: Duration) -> std::io::Result<Resp> {
    RespConn::connect(addr, timeout)?.call(args)
}

/// The value of `field` in an `INFO`/`CLUSTER INFO` text (`field:value` lines).
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

// ---- one server -----------------------------------------------------------------------------

fn root_dir() -> PathBuf {
    std::env::temp_dir()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kill the servers of test processes that are gone (by the pid files in their directories,
/// when that pid still runs redis-server) and remove their directories.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir(root_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || process_alive(owner) {
            continue;
        }
        if let Ok(pid) = std::fs::read_to_string(e.path().join("redis.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("redis-server") {
                    // SAFETY: kill has no memory preconditions; the pid runs redis-server.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// A fresh directory of this harness (removed by its owner; by a later test process's
/// [`clean_stale`] if this one dies first).
fn new_dir() -> PathBuf {
    CLEAN_STALE.call_once(clean_stale);
    let seq = SERVER_SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = root_dir().join(format!("{DIR_PREFIX}{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// One `redis-server` process on a loopback port, in its own temporary directory (killed and
/// removed on drop; its log is printed when the test is failing).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// Options after the fixed ones, the same on every (re)start.
    extra: Vec<String>,
    frozen: bool,
    /// TLS only ([`RedisServer::start_tls`]): `--tls-auth-clients` yes (mutual TLS) or no.
    tls: Option<bool>,
    /// TLS only: the directory of its [`TestCerts`] (its own, or a TLS cluster's shared one).
    certs_dir: PathBuf,
}

impl RedisServer {
    /// A server with the harness's options only (Redis's defaults for everything else, e.g.
    /// `client-output-buffer-limit pubsub 32mb 8mb 60`).
    pub fn start() -> RedisServer {
        RedisServer::start_args(&[])
    }

    /// A server with extra `redis.conf` options, `(name, value)`:
    /// `start_with(&[("client-output-buffer-limit", "pubsub 256mb 64mb 60")])`.
    pub fn start_with(options: &[(&str, &str)]) -> RedisServer {
        let args: Vec<String> = options
            .iter()
            .flat_map(|(k, v)| [format!("--{k}"), (*v).to_owned()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        RedisServer::start_args(&args)
    }

    /// A server with extra command-line arguments after the harness's own, e.g.
    /// `["--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru"]` (a later option wins
    /// over an earlier one, so these may override the harness's).
    pub fn start_args(args: &[&str]) -> RedisServer {
        let extra: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        RedisServer::launch(&|_| extra.clone())
    }

    /// A server speaking only TLS (`--port 0 --tls-port <port>`), with a throwaway CA and a
    /// server certificate for 127.0.0.1 made in its directory by `openssl` ([`TestCerts`]);
    /// with `auth_clients` it also wants a client certificate signed by that CA (mutual
    /// TLS). [`RedisServer::url`] is `rediss://`; the test's plain RESP client
    /// ([`RedisServer::cmd`] and the rest) cannot talk to it.
    pub fn start_tls(auth_clients: bool) -> RedisServer {
        RedisServer::start_tls_args(auth_clients, &[])
    }

    /// [`RedisServer::start_tls`] with extra command-line arguments (`--requirepass`, ...).
    pub fn start_tls_args(auth_clients: bool, args: &[&str]) -> RedisServer {
        let extra: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        RedisServer::launch_tls(Some(auth_clients), &|_| extra.clone())
    }

    /// The throwaway certificates of a [`RedisServer::start_tls`] server.
    pub fn certs(&self) -> TestCerts {
        assert!(self.tls.is_some(), "certs: not a TLS server");
        TestCerts::at(&self.certs_dir)
    }

    /// Start on a free port; `extra(dir)` gives the options after the fixed ones (called once
    /// per attempt, so it may pick ports of its own).
    fn launch(extra: &dyn Fn(&Path) -> Vec<String>) -> RedisServer {
        RedisServer::launch_tls(None, extra)
    }

    fn launch_tls(tls: Option<bool>, extra: &dyn Fn(&Path) -> Vec<String>) -> RedisServer {
        RedisServer::launch_tls_with(tls, None, extra)
    }

    /// [`RedisServer::launch_tls`]; a TLS server uses the certificates in `certs_dir` when
    /// given (a TLS cluster's, one CA for every node), else makes its own.
    fn launch_tls_with(
        tls: Option<bool>,
        certs_dir: Option<&Path>,
        extra: &dyn Fn(&Path) -> Vec<String>,
    ) -> RedisServer {
        let bin = server_bin();
        let dir = new_dir();
        let mut server = RedisServer {
            child: None,
            port: 0,
            extra: Vec::new(),
            certs_dir: certs_dir.unwrap_or(&dir).to_owned(),
            dir,
            bin,
            frozen: false,
            tls,
        };
        if tls.is_some() && certs_dir.is_none() {
            TestCerts::generate(&server.dir);
        }
        for _ in 0..START_ATTEMPTS_MAX {
            server.port = super::free_port();
            server.extra = extra(&server.dir);
            if server.spawn_and_wait() {
                return server;
            }
            if !server.logs().contains("Address already in use") {
                break;
            }
        }
        panic!(
            "redis-server ({}) did not start; its log:\n{}",
            server.bin.display(),
            server.logs()
        );
    }

    /// The full command line after the binary.
    fn args(&self) -> Vec<String> {
        let d = self.dir.display();
        let mut a: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &d.to_string(),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            &format!("{d}/redis.log"),
            "--pidfile",
            &format!("{d}/redis.pid"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(auth_clients) = self.tls {
            let c = TestCerts::at(&self.certs_dir);
            // Later options win: no plain port, TLS on the port picked.
            a.extend([
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                self.port.to_string(),
                "--tls-cert-file".to_owned(),
                c.server_cert,
                "--tls-key-file".to_owned(),
                c.server_key,
                "--tls-ca-cert-file".to_owned(),
                c.ca,
                "--tls-auth-clients".to_owned(),
                if auth_clients { "yes" } else { "no" }.to_owned(),
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Spawn on `self.port` and wait until it answers PING (PONG, or NOAUTH with
    /// `requirepass`); false if it exited first.
    fn spawn_and_wait(&mut self) -> bool {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.stderr_path().display()));
        let err = out.try_clone().expect("clone log file");
        let child = Command::new(&self.bin)
            .args(self.args())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.frozen = false;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            // A TLS-only server is up once its port takes connections (it has nothing to
            // load; the test's client speaks no TLS).
            if self.tls.is_some() {
                if TcpStream::connect_timeout(&self.addr(), PROBE_TIMEOUT).is_ok() {
                    return true;
                }
            } else {
                // Up: PONG, or NOAUTH from a server started with `requirepass`.
                match command(self.addr(), &["PING"], PROBE_TIMEOUT) {
                    Ok(Resp::Simple(s)) if s == "PONG" => return true,
                    Ok(Resp::Error(e)) if e.starts_with("NOAUTH") => return true,
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "redis-server did not answer PING on {} within {START_TIMEOUT:?}; its \
                     log:\n{}",
                    self.addr(),
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.join("redis.stderr")
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a TLS server), for `SWITCHBOARD_REDIS_URL`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's directory (its log, pid file and, in a cluster, `nodes.conf`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log so far (every start appends to it), then whatever it wrote to
    /// stdout/stderr (start-up errors come before the log file is open).
    pub fn logs(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        if stderr.trim().is_empty() {
            log
        } else {
            format!("{log}---- stdout/stderr:\n{stderr}")
        }
    }

    /// One command over a fresh connection; the reply as text ([`Resp`]'s `Display`: errors
    /// as `(error) ...`). Panics, with the log, when Redis does not answer within
    /// [`CMD_TIMEOUT`]. (A server with `requirepass` says NOAUTH: use
    /// [`RedisServer::connect`] and AUTH first.)
    pub fn cmd(&self, args: &[&str]) -> String {
        self.cmd_value(args).to_string()
    }

    /// [`RedisServer::cmd`], the reply as a [`Resp`].
    pub fn cmd_value(&self, args: &[&str]) -> Resp {
        command(self.addr(), args, CMD_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "redis {} {args:?}: {e}; its log:\n{}",
                self.addr(),
                self.logs()
            )
        })
    }

    /// Subscribers of `channel` (`PUBSUB NUMSUB`): in a cluster test, the nodes holding it.
    pub fn numsub(&self, channel: &str) -> i64 {
        let r = self.cmd_value(&["PUBSUB", "NUMSUB", channel]);
        r.array()
            .and_then(|a| a.get(1))
            .and_then(Resp::int)
            .unwrap_or_else(|| panic!("PUBSUB NUMSUB {channel}: {r:?}"))
    }

    /// An integer reply (`SCARD`, `EXISTS`, ...).
    pub fn int(&self, args: &[&str]) -> i64 {
        let r = self.cmd_value(args);
        r.int().unwrap_or_else(|| panic!("{args:?}: {r:?}"))
    }

    /// One command over a fresh connection, bounded by `timeout`; an error when Redis does
    /// not answer (refused, frozen, closed).
    pub fn try_cmd(&self, args: &[&str], timeout: Duration) -> std::io::Result<Resp> {
        command(self.addr(), args, timeout)
    }

    /// `redis-cli` against this server (with `--tls --cacert` for a TLS one, which the test's
    /// own RESP client cannot reach), bounded by `timeout`: its output, or an error when it
    /// failed or did not finish.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> std::io::Result<String> {
        let mut cmd = Command::new(cli_bin());
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.tls.is_some() {
            cmd.args(["--tls", "--cacert", &self.certs().ca]);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("redis-cli {args:?} did not finish within {timeout:?}"),
                ));
            }
            std::thread::sleep(POLL);
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(bad(format!(
                "redis-cli {args:?}: {}: {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(text)
    }

    /// A connection of the test's own (subscriptions, pipelining, a request left waiting).
    pub fn connect(&self) -> RespConn {
        RespConn::connect(self.addr(), CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to redis {}: {e}", self.addr()))
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL the server and reap it (a crash: connections reset, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.frozen = false;
    }

    /// SIGSTOP: the server keeps its sockets (connects still complete, in the kernel) but
    /// answers nothing, so requests time out instead of failing.
    pub fn freeze(&mut self) {
        assert!(self.child.is_some(), "freeze: redis is not running");
        self.signal(libc::SIGSTOP);
        self.frozen = true;
    }

    /// SIGCONT after [`RedisServer::freeze`]: requests sent meanwhile are answered now.
    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
        self.frozen = false;
    }

    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Whether the process is running (not killed, not exited; a frozen one runs).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kill the server if it runs, then start it again on the same port with the same options
    /// (and directory: a cluster node keeps its `nodes.conf`) and wait until it answers PING.
    /// While the kernel still holds the port (TIME_WAIT, a listener not yet gone) it retries.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.spawn_and_wait() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}; its log:\n{}",
                self.port,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Throwaway PEM files for TLS tests, made by `/usr/bin/openssl` (or `openssl` on PATH) in a
/// server's directory: a CA, a server certificate for `127.0.0.1` and `localhost` signed by it,
/// a client certificate signed by it, and a second CA that signed nothing here (a wrong CA).
/// EC P-256 keys (fast to make), valid for two days, unencrypted.
#[derive(Clone, Debug)]
pub struct TestCerts {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
    pub other_ca: String,
}

impl TestCerts {
    fn at(dir: &Path) -> TestCerts {
        let f = |n: &str| dir.join(n).display().to_string();
        TestCerts {
            ca: f("ca.crt"),
            server_cert: f("server.crt"),
            server_key: f("server.key"),
            client_cert: f("client.crt"),
            client_key: f("client.key"),
            other_ca: f("other-ca.crt"),
        }
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let bin = if Path::new("/usr/bin/openssl").is_file() {
            PathBuf::from("/usr/bin/openssl")
        } else {
            PathBuf::from("openssl")
        };
        let out = Command::new(&bin)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("{} {args:?}: {e} (apt-get install openssl)", bin.display())
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Make every file in `dir`.
    pub fn generate(dir: &Path) -> TestCerts {
        const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
        for (ca, key, cn) in [
            ("ca.crt", "ca.key", "sb-test-ca"),
            ("other-ca.crt", "other-ca.key", "sb-other-ca"),
        ] {
            let subj = format!("/CN={cn}");
            let mut a = vec!["req", "-x509", "-nodes", "-days", "2", "-subj", &subj];
            a.extend(EC);
            a.extend([
                "-keyout",
                key,
                "-out",
                ca,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            TestCerts::openssl(dir, &a);
        }
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
            ),
            ("client", "sb-test-node", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, crt, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            std::fs::write(
                dir.join(&extfile),
                format!(
                    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"
                ),
            )
            .expect("write the extensions file");
            let subj = format!("/CN={cn}");
            let mut a = vec![
                "req", "-new", "-nodes", "-subj", &subj, "-keyout", &key, "-out", &csr,
            ];
            a.extend(EC);
            TestCerts::openssl(dir, &a);
            TestCerts::openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &extfile,
                    "-out",
                    &crt,
                ],
            );
        }
        TestCerts::at(dir)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.frozen {
            self.thaw();
        }
        self.kill();
        if std::thread::panicking() {
            let log = self.logs();
            let start = log.len().saturating_sub(LOG_TAIL_BYTES_MAX);
            let start = (start..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            eprintln!(
                "---- redis-server on port {} ({}), log tail:\n{}",
                self.port,
                self.dir.display(),
                &log[start..]
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- a cluster ------------------------------------------------------------------------------

/// A Redis Cluster of N masters (no replicas) on loopback, created with
/// `redis-cli --cluster create`; every node a [`RedisServer`] (kill, freeze, thaw and restart
/// it through [`RedisCluster::node_mut`]; a restarted node rejoins from its `nodes.conf`).
/// [`RedisCluster::start_tls`] makes one that speaks only TLS, clients, bus and replication.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// A TLS cluster's certificates, one CA for every node (removed after the nodes).
    certs: Option<CertsDir>,
}

/// The directory of a TLS cluster's [`TestCerts`], removed on drop.
struct CertsDir(PathBuf);

impl Drop for CertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisCluster {
    /// Start `masters` (at least 3, as `redis-cli --cluster create` wants) cluster-enabled
    /// servers, join them with all 16384 slots spread over them, and wait until every node says
    /// `cluster_state:ok` with every slot assigned.
    pub fn start(masters: usize) -> RedisCluster {
        RedisCluster::start_replicated(masters, 0)
    }

    /// [`RedisCluster::start`] with `replicas` replicas of every master (`--cluster-replicas`):
    /// `masters * (1 + replicas)` servers, which `redis-cli` pairs up itself (find a slot's
    /// master with [`RedisCluster::master_of_slot`], not by index). Killing a master makes its
    /// replica take over after [`CLUSTER_NODE_TIMEOUT_MS`].
    pub fn start_replicated(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::launch(masters, replicas, false)
    }

    /// [`RedisCluster::start`] speaking only TLS: every node `--port 0 --tls-port <port>`
    /// with `--tls-cluster yes` (the bus) and `--tls-replication yes`, its server
    /// certificate signed by one throwaway CA ([`RedisCluster::certs`]; clients are asked
    /// for no certificate, the nodes present the client one to each other on the bus),
    /// joined with `redis-cli --tls --cacert <ca> --cluster create`.
    /// [`RedisCluster::seeds`] are `rediss://`. The test's plain RESP client cannot reach
    /// the nodes ([`RedisCluster::master_of_slot`] neither): use [`RedisServer::cli`].
    pub fn start_tls(masters: usize) -> RedisCluster {
        RedisCluster::launch(masters, 0, true)
    }

    /// The certificates of a [`RedisCluster::start_tls`] cluster.
    pub fn certs(&self) -> TestCerts {
        let d = self.certs.as_ref().expect("certs: not a TLS cluster");
        TestCerts::at(&d.0)
    }

    fn launch(masters: usize, replicas: usize, tls: bool) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs at least 3 masters, got {masters}"
        );
        let cli = cli_bin();
        let timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
        let certs = tls.then(|| {
            let d = CertsDir(new_dir());
            TestCerts::generate(&d.0);
            d
        });
        let certs_dir = certs.as_ref().map(|d| d.0.as_path());
        // The bus always wants a client certificate (Redis accepts bus connections with
        // TLS_CLIENT_AUTH_YES whatever tls-auth-clients says), and the server certificate is
        // for serverAuth only: nodes present the client one on their bus and replication
        // connections.
        let tls_args: Vec<String> = match certs_dir {
            Some(d) => {
                let c = TestCerts::at(d);
                [
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-client-cert-file",
                    &c.client_cert,
                    "--tls-client-key-file",
                    &c.client_key,
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
            }
            None => Vec::new(),
        };
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::launch_tls_with(tls.then_some(false), certs_dir, &|dir| {
                    // The bus port: its own free port, not port + 10000 (which may not exist).
                    let bus = super::free_port().to_string();
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &dir.join("nodes.conf").display().to_string(),
                        "--cluster-node-timeout",
                        &timeout,
                        "--cluster-port",
                        &bus,
                        // A replica takes over however long it was cut off from its master
                        // (a test's replica may have synced only just before the kill).
                        "--cluster-replica-validity-factor",
                        "0",
                    ]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .chain(tls_args.iter().cloned())
                    .collect()
                })
            })
            .collect();
        let cluster = RedisCluster { nodes, certs };
        let mut cmd = Command::new(&cli);
        if tls {
            cmd.args(["--tls", "--cacert", &cluster.certs().ca]);
        }
        cmd.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out_path = cluster.nodes[0].dir().join("cluster-create.out");
        let out = std::fs::File::create(&out_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", out_path.display()));
        let err = out.try_clone().expect("clone output file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", cli.display()));
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-cli --cluster create did not finish within {CLUSTER_TIMEOUT:?}:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "redis-cli --cluster create failed ({status}):\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
        cluster.wait_state("ok", deadline);
        cluster
    }

    /// Wait until every running, unfrozen node's `CLUSTER INFO` says `cluster_state:<state>`
    /// (for "ok": with all slots assigned and every node known), panicking at `deadline`.
    pub fn wait_state(&self, state: &str, deadline: Instant) {
        let n = self.nodes.len().to_string();
        let slots = SLOTS.to_string();
        loop {
            let infos: Vec<String> = self
                .nodes
                .iter()
                .filter(|s| s.child.is_some() && !s.frozen)
                .map(|s| {
                    let info = if s.tls.is_some() {
                        s.cli(&["CLUSTER", "INFO"], CMD_TIMEOUT)
                    } else {
                        s.try_cmd(&["CLUSTER", "INFO"], PROBE_TIMEOUT)
                            .map(|r| r.to_string())
                    };
                    info.unwrap_or_else(|e| format!("({e})"))
                })
                .collect();
            let done = infos.iter().all(|i| {
                info_field(i, "cluster_state").as_deref() == Some(state)
                    && (state != "ok"
                        || (info_field(i, "cluster_slots_assigned").as_deref()
                            == Some(slots.as_str())
                            && info_field(i, "cluster_known_nodes").as_deref() == Some(n.as_str())))
            });
            if done {
                return;
            }
            if Instant::now() > deadline {
                panic!("the cluster did not reach cluster_state:{state}; CLUSTER INFO of the nodes:\n{}",
                    infos.join("\n----\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`RedisCluster::wait_state`] with a deadline [`CLUSTER_TIMEOUT`] from now.
    pub fn wait_ok(&self) {
        self.wait_state("ok", Instant::now() + CLUSTER_TIMEOUT);
    }

    /// Comma-separated `redis://` URLs of every node (`rediss://` for a TLS cluster), for
    /// `SWITCHBOARD_REDIS_URL` with `SWITCHBOARD_REDIS_CLUSTER=true`.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// A node to kill, freeze, thaw or restart.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The index of the node that masters `slot`, from `CLUSTER SLOTS` of the first node that
    /// answers.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        let slot = i64::from(slot);
        for s in self.nodes.iter().filter(|s| s.child.is_some() && !s.frozen) {
            let Ok(Resp::Array(ranges)) = s.try_cmd(&["CLUSTER", "SLOTS"], CMD_TIMEOUT) else {
                continue;
            };
            for r in &ranges {
                let Some([start, end, master, ..]) = r.array() else {
                    continue;
                };
                if !(start.int().unwrap_or(-1)..=end.int().unwrap_or(-1)).contains(&slot) {
                    continue;
                }
                let port = master
                    .array()
                    .and_then(|m| m.get(1))
                    .and_then(Resp::int)
                    .unwrap_or_else(|| panic!("CLUSTER SLOTS entry without a port: {r:?}"));
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port()) == port)
                    .unwrap_or_else(|| panic!("slot {slot} is served by port {port}, not ours"));
            }
            panic!("no node masters slot {slot}: CLUSTER SLOTS {ranges:?}");
        }
        panic!("no node of the cluster answered CLUSTER SLOTS");
    }
}
