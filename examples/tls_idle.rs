//! What an idle connection costs the server, plain or TLS: opens `--n` WebSocket connections
//! one after the other to a running server (each: TCP connect, for `--tls` a full TLS
//! handshake with resumption off, the upgrade, the `connected` frame), keeps them all open,
//! and reads the server's `/proc/<pid>/status` VmRSS and `/proc/<pid>/stat` utime+stime before
//! and after. Per connection = delta / n: memory per idle connection, and the server CPU of
//! one connection's set-up (for TLS, the handshake's share is the difference with plain).
//!
//! ```text
//! cargo build --release --example tls_idle
//! ./target/release/examples/tls_idle --pid <server pid> --port 8081 --n 5000
//! ./target/release/examples/tls_idle --pid <server pid> --port 8443 --n 5000 --tls --ca ca.crt
//! ```
//! Prints one JSON line: mode, n, rss_before_kb, rss_after_kb, bytes_per_conn, cpu_ms,
//! cpu_us_per_conn, wall_s.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The settle time before the "before" and "after" samples (shards publish and go idle).
const SETTLE: Duration = Duration::from_millis(1500);
/// Per-connection read/write timeout: a stuck connection fails the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    pid: u32,
    port: u16,
    n: usize,
    tls: bool,
    ca: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        pid: 0,
        port: 8081,
        n: 5000,
        tls: false,
        ca: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--pid" => a.pid = v().parse().expect("--pid"),
            "--port" => a.port = v().parse().expect("--port"),
            "--n" => a.n = v().parse().expect("--n"),
            "--tls" => a.tls = true,
            "--ca" => a.ca = Some(v()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.pid != 0, "--pid <server pid> is required");
    a
}

/// VmRSS of `pid` in KiB.
fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// utime + stime of `pid` in ms.
fn cpu_ms(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety conditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 * 1000.0 / hz
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn tls_config(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read --ca") {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every connection a full handshake: the cost measured is the worst case.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Write the upgrade request and read the 101 head and the `connected` frame (raw: no
/// client-side WebSocket library state to keep per connection).
fn upgrade<S: Read + Write>(s: &mut S) {
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("write upgrade");
    s.flush().expect("flush");
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    // The head, then the connected frame (a text frame whose JSON ends with '}').
    loop {
        let n = s.read(&mut buf).expect("read upgrade reply");
        assert!(n > 0, "server closed during the upgrade");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(
                got.starts_with(b"HTTP/1.1 101"),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            if got.len() > end + 4 && got.ends_with(b"}") {
                return;
            }
        }
    }
}

enum Conn {
    Plain(#[allow(dead_code)] TcpStream),
    Tls(#[allow(dead_code)] Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

fn main() {
    let a = parse_args();
    raise_nofile();
    let cfg = a.ca.as_deref().map(tls_config);
    assert!(!a.tls || cfg.is_some(), "--tls needs --ca");
    std::thread::sleep(SETTLE);
    let (rss0, cpu0) = (rss_kb(a.pid), cpu_ms(a.pid));
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(a.n);
    for _ in 0..a.n {
        let sock = TcpStream::connect(("127.0.0.1", a.port)).expect("connect");
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        if a.tls {
            let cfg = cfg.clone().unwrap();
            let conn =
                rustls::ClientConnection::new(cfg, ServerName::try_from("127.0.0.1").unwrap())
                    .unwrap();
            let mut s = Box::new(rustls::StreamOwned::new(conn, sock));
            upgrade(&mut *s);
            conns.push(Conn::Tls(s));
        } else {
            let mut s = sock;
            upgrade(&mut s);
            conns.push(Conn::Plain(s));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let (rss1, cpu1) = (rss_kb(a.pid), cpu_ms(a.pid));
    let n = a.n as f64;
    println!(
        "{{\"mode\":\"{}\",\"n\":{},\"rss_before_kb\":{rss0},\"rss_after_kb\":{rss1},\"bytes_per_conn\":{:.0},\"cpu_ms\":{:.0},\"cpu_us_per_conn\":{:.1},\"wall_s\":{wall:.2}}}",
        if a.tls { "tls" } else { "plain" },
        a.n,
        (rss1 as f64 - rss0 as f64) * 1024.0 / n,
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1000.0 / n
    );
    drop(conns);
}
