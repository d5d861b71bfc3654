//! The TLS listener (`tls_port`) over real sockets, against the real binary: `wss://` clients
//! (rustls `ClientConnection` over a std `TcpStream`, trusting only the test's CA) get the same
//! frames as plain ones and share rooms with them; the plain port keeps working beside it;
//! what is not TLS on the TLS port (plain HTTP, garbage, a silent socket) is closed and counted
//! without disturbing anyone else; SIGHUP swaps the certificate for new connections while
//! existing ones keep going, and a reload of broken files keeps the certificate in use; bad
//! files stop the start naming their key. Certificates are made by `openssl` for the test
//! (`common::redis::TestCerts`: a CA and a server certificate for 127.0.0.1 signed by it, EC
//! P-256). Every wait is bounded.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::TestCerts;
use common::{metric, Client, TestServer, TlsStream, RECV_TIMEOUT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// Two certificate sets (each its own CA) in a fresh directory, and the `live.crt`/`live.key`
/// the server is pointed at (a copy of set A to begin with).
struct Certs {
    dir: PathBuf,
    a: TestCerts,
    b: TestCerts,
    live_cert: String,
    live_key: String,
}

impl Certs {
    fn new(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("sb-ws-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (da, db) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&da).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let a = TestCerts::generate(&da);
        let b = TestCerts::generate(&db);
        let live_cert = dir.join("live.crt").display().to_string();
        let live_key = dir.join("live.key").display().to_string();
        let c = Certs {
            dir,
            a,
            b,
            live_cert,
            live_key,
        };
        c.install(&c.a.clone());
        c
    }

    /// Copy a set's server certificate and key over the live files.
    fn install(&self, set: &TestCerts) {
        std::fs::copy(&set.server_cert, &self.live_cert).unwrap();
        std::fs::copy(&set.server_key, &self.live_key).unwrap();
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server with the TLS listener on a port of its own.
fn tls_server(c: &Certs, extra: &[(&str, &str)]) -> (TestServer, u16) {
    let port = common::free_port();
    let port_s = port.to_string();
    let mut env = vec![
        ("SWITCHBOARD_TLS_PORT", port_s.as_str()),
        ("SWITCHBOARD_TLS_CERT_FILE", c.live_cert.as_str()),
        ("SWITCHBOARD_TLS_KEY_FILE", c.live_key.as_str()),
    ];
    env.extend_from_slice(extra);
    (TestServer::start(&env), port)
}

fn client_config(ca_file: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read the CA") {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A TLS connection to 127.0.0.1:`port` trusting only `ca_file`, its handshake done; the
/// handshake's error when the server's certificate is not trusted.
fn tls_stream(port: u16, ca_file: &str) -> Result<TlsStream, std::io::Error> {
    tls_stream_rcvbuf(port, ca_file, None)
}

/// [`tls_stream`] over a socket with a `rcvbuf`-byte receive buffer (a slow reader).
fn tls_stream_rcvbuf(
    port: u16,
    ca_file: &str,
    rcvbuf: Option<usize>,
) -> Result<TlsStream, std::io::Error> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(size) = rcvbuf {
        sock.set_recv_buffer_size(size)?;
    }
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let sock: TcpStream = sock.into();
    sock.set_read_timeout(Some(RECV_TIMEOUT))?;
    sock.set_write_timeout(Some(RECV_TIMEOUT))?;
    sock.set_nodelay(true)?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca_file), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A `wss://` client on `path`, its `connected` frame read.
fn wss(port: u16, ca_file: &str, path: &str) -> Client<TlsStream> {
    wss_rcvbuf(port, ca_file, path, None)
}

fn wss_rcvbuf(port: u16, ca_file: &str, path: &str, rcvbuf: Option<usize>) -> Client<TlsStream> {
    let stream = tls_stream_rcvbuf(port, ca_file, rcvbuf).expect("TLS handshake");
    let url = format!("wss://127.0.0.1:{port}{path}");
    let (ws, resp) = tungstenite::client::client_with_config(url.as_str(), stream, None)
        .unwrap_or_else(|e| panic!("wss upgrade of {path}: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    Client::welcomed(ws)
}

/// The DER of the certificate the server presented on `s`.
fn presented(s: &TlsStream) -> Vec<u8> {
    s.conn.peer_certificates().expect("a peer certificate")[0]
        .as_ref()
        .to_vec()
}

fn der_of(pem_file: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_file)
        .expect("certificate PEM")
        .as_ref()
        .to_vec()
}

/// A GET over TLS: status and body.
fn https_get(port: u16, ca_file: &str, path: &str) -> (u16, String) {
    let mut s = tls_stream(port, ca_file).expect("TLS handshake");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // The server closes after the answer (close_notify, or EOF).
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the HTTPS answer: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A request and the client's close_notify in one write (one read on the server), with
/// keep-alive (`close`: false) or `Connection: close`: the answer still arrives, then the
/// server's close_notify.
fn request_then_close_notify(port: u16, ca_file: &str, close: bool) -> String {
    let mut s = tls_stream(port, ca_file).expect("TLS handshake");
    let conn = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}\r\n");
    s.conn.writer().write_all(req.as_bytes()).unwrap();
    s.conn.send_close_notify();
    let mut wire = Vec::new();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut wire).unwrap();
    }
    s.sock.write_all(&wire).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + RECV_TIMEOUT;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => panic!(
                "reading the answer: {e} (so far {:?})",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

/// Metric `name` (summed over its samples) once it satisfies `pred`, within 5 s.
fn metric_becomes(s: &TestServer, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
    let text = s.wait_metrics(name, |t| metric(t, name).is_some_and(&pred));
    metric(&text, name).unwrap()
}

/// The socket is closed by the server (EOF or reset) within `within`, whatever it sent first.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn wss_round_trip_beside_the_plain_port() {
    let certs = Certs::new("round-trip");
    let (server, port) = tls_server(&certs, &[]);
    let ca = certs.a.ca.clone();

    let mut alice = wss(port, &ca, "/ws?user_id=alice");
    let w = alice.welcome.clone();
    assert_eq!(keys(&w), ["data", "timestamp", "type"], "{w}");
    assert_eq!(w["data"]["user_id"], "alice");
    assert_eq!(w["data"]["message"], "Connected to WebSocket server");
    assert_eq!(presented(alice.ws.get_ref()), der_of(&certs.a.server_cert));

    // A plain client on the plain port shares the room.
    let mut bob = server.connect("/ws?user_id=bob");
    let s = alice.subscribe("lobby");
    assert_eq!(s["data"], json!({"room": "lobby", "client_count": 1}));
    let s = bob.subscribe("lobby");
    assert_eq!(s["data"], json!({"room": "lobby", "client_count": 2}));

    let data = json!({"text": "over TLS", "n": [1, 2]});
    alice.send_json(json!({"type": "publish", "room": "lobby", "data": data, "id": 5}));
    for m in [alice.expect_type("message"), bob.expect_type("message")] {
        assert_eq!(
            keys(&m),
            ["client_id", "data", "room", "timestamp", "type", "user_id"],
            "{m}"
        );
        assert_eq!(m["room"], "lobby");
        assert_eq!(m["data"], data);
        assert_eq!(m["user_id"], "alice");
        assert_eq!(m["client_id"].as_str(), Some(alice.client_id.as_str()));
    }
    bob.send_json(json!({"type": "publish", "room": "lobby", "data": "plain"}));
    for m in [alice.expect_type("message"), bob.expect_type("message")] {
        assert_eq!(m["data"], "plain");
        assert_eq!(m["user_id"], "bob");
    }

    // A large message both ways (several TLS records, several reads and writes).
    let big = "x".repeat(60_000);
    alice.send_json(json!({"type": "publish", "room": "lobby", "data": big}));
    assert_eq!(alice.expect_type("message")["data"], big);
    assert_eq!(bob.expect_type("message")["data"], big);

    // The HTTP endpoints answer over TLS too.
    let (status, body) = https_get(port, &ca, "/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"healthy\""), "{body}");

    let n = metric_becomes(&server, "switchboard_tls_handshakes_total", |v| v >= 2);
    assert!(n >= 2, "{n}");
    metric_becomes(&server, "switchboard_tls_connections", |v| v == 1);
    metric_becomes(&server, "switchboard_tls_handshake_failures_total", |v| {
        v == 0
    });

    // Close politely: the server answers the close and closes TLS after it.
    alice.close_and_wait();
    metric_becomes(&server, "switchboard_tls_connections", |v| v == 0);
    bob.send_json(json!({"type": "ping"}));
    bob.expect_type("pong");
}

/// A peer that sends its request and close_notify together (a client done sending) gets its
/// answer before the connection closes, as a plain client that half-closes does.
#[test]
fn an_answer_is_sent_before_the_peers_close_notify_is_honoured() {
    let certs = Certs::new("close-notify");
    let (server, port) = tls_server(&certs, &[]);
    for close in [false, true] {
        let text = request_then_close_notify(port, &certs.a.ca, close);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "Connection: close {close}: {text:?}"
        );
    }
    server.assert_serving();
}

#[test]
fn what_is_not_tls_on_the_tls_port_is_closed_and_counted() {
    let certs = Certs::new("garbage");
    let (server, port) = tls_server(&certs, &[("SWITCHBOARD_TLS_HANDSHAKE_TIMEOUT", "500ms")]);
    let ca = certs.a.ca.clone();
    let mut alice = wss(port, &ca, "/ws?user_id=alice");
    alice.subscribe("r");
    let mut bob = server.connect("/ws?user_id=bob");
    bob.subscribe("r");

    // Plain HTTP on the TLS port.
    let mut http = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert!(
        closed_within(&mut http, RECV_TIMEOUT),
        "plain HTTP not closed"
    );
    // Bytes that look like a TLS record header with an absurd length, then noise.
    let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, 4, 5, 6, 7])
        .unwrap();
    junk.write_all(&[0xAB; 4096]).unwrap();
    assert!(closed_within(&mut junk, RECV_TIMEOUT), "junk not closed");
    // A socket that never says anything: closed at tls_handshake_timeout.
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        closed_within(&mut silent, RECV_TIMEOUT),
        "silent not closed"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "silent socket closed after {took:?}"
    );
    // A client that trusts another CA gives up in the handshake (its alert is a failure too).
    assert!(tls_stream(port, &certs.a.other_ca).is_err());

    let failed = metric_becomes(&server, "switchboard_tls_handshake_failures_total", |v| {
        v >= 4
    });
    assert_eq!(failed, 4);

    // Nobody else noticed.
    alice.send_json(json!({"type": "publish", "room": "r", "data": 1}));
    assert_eq!(alice.expect_type("message")["data"], 1);
    assert_eq!(bob.expect_type("message")["data"], 1);
    let mut carol = wss(port, &ca, "/ws?user_id=carol");
    carol.send_json(json!({"type": "ping", "id": "c"}));
    assert_eq!(carol.expect_type("pong")["id"], "c");
    assert!(
        server.logs().contains("TLS listener on"),
        "{}",
        server.logs()
    );
}

#[test]
fn sighup_swaps_the_certificate_for_new_connections_only() {
    let certs = Certs::new("reload");
    let (server, port) = tls_server(&certs, &[]);
    let mut old = wss(port, &certs.a.ca, "/ws?user_id=old");
    old.subscribe("r");
    assert_eq!(presented(old.ws.get_ref()), der_of(&certs.a.server_cert));

    // New files, then SIGHUP.
    certs.install(&certs.b);
    server.signal(libc::SIGHUP);
    metric_becomes(&server, "switchboard_tls_reloads_total", |v| v == 1);

    // The old connection keeps its session and keeps working.
    let mut new = wss(port, &certs.b.ca, "/ws?user_id=new");
    assert_eq!(presented(new.ws.get_ref()), der_of(&certs.b.server_cert));
    new.subscribe("r");
    old.send_json(json!({"type": "publish", "room": "r", "data": "still here"}));
    assert_eq!(old.expect_type("message")["data"], "still here");
    assert_eq!(new.expect_type("message")["data"], "still here");
    // A client that trusts only the old CA no longer gets in.
    assert!(tls_stream(port, &certs.a.ca).is_err());

    // Broken files: the reload fails, the certificate in use stays.
    std::fs::write(&certs.live_cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    server.signal(libc::SIGHUP);
    metric_becomes(&server, "switchboard_tls_reload_failures_total", |v| v == 1);
    let again = tls_stream(port, &certs.b.ca).expect("the kept certificate still works");
    assert_eq!(presented(&again), der_of(&certs.b.server_cert));
    let mut third = wss(port, &certs.b.ca, "/ws?user_id=third");
    third.send_json(json!({"type": "ping"}));
    third.expect_type("pong");
    old.send_json(json!({"type": "publish", "room": "r", "data": 2}));
    assert_eq!(new.expect_type("message")["data"], 2);
    assert_eq!(old.expect_type("message")["data"], 2);
    let logs = server.logs();
    assert!(logs.contains("TLS reload failed"), "{logs}");
    assert!(logs.contains("tls_cert_file"), "{logs}");
    assert_eq!(
        metric_becomes(&server, "switchboard_tls_reloads_total", |_| true),
        1
    );
}

/// Run the binary with `env` until it exits (at most 10 s): (success, stderr).
fn start_fails(env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    common::hermetic(&mut cmd);
    cmd.env("SWITCHBOARD_HOST", "127.0.0.1")
        .env("SWITCHBOARD_PORT", common::free_port().to_string())
        .env("SWITCHBOARD_SHARDS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn switchboard");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.success(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard started with {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_files_stop_the_start_naming_the_key() {
    let certs = Certs::new("bad-files");
    let port = common::free_port().to_string();
    let garbage = certs.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file").unwrap();
    let garbage = garbage.display().to_string();
    let missing = Path::new(&certs.dir)
        .join("missing.pem")
        .display()
        .to_string();
    for (cert, key, named) in [
        (
            garbage.as_str(),
            certs.a.server_key.as_str(),
            "tls_cert_file",
        ),
        (
            missing.as_str(),
            certs.a.server_key.as_str(),
            "tls_cert_file",
        ),
        (
            certs.a.server_cert.as_str(),
            garbage.as_str(),
            "tls_key_file",
        ),
        // A real key, not this certificate's.
        (
            certs.a.server_cert.as_str(),
            certs.b.server_key.as_str(),
            "tls_key_file",
        ),
    ] {
        let (ok, err) = start_fails(&[
            ("SWITCHBOARD_TLS_PORT", &port),
            ("SWITCHBOARD_TLS_CERT_FILE", cert),
            ("SWITCHBOARD_TLS_KEY_FILE", key),
        ]);
        assert!(!ok, "started with {cert} {key}:\n{err}");
        assert!(err.contains(named), "{cert} {key}: {err}");
    }
    // tls_port without the files is a configuration error (exit 2) naming the key.
    let (ok, err) = start_fails(&[("SWITCHBOARD_TLS_PORT", &port)]);
    assert!(!ok && err.contains("tls_cert_file"), "{err}");
}

#[test]
fn a_slow_tls_reader_is_closed_4008_and_others_keep_receiving() {
    // As ws_limits' slow consumer, over TLS: the send queue's limit holds (rustls encrypts
    // at most 32 KiB ahead of the socket), the close frame still gets through the TLS
    // session, and the other subscribers miss nothing.
    let certs = Certs::new("slow");
    let (server, port) = tls_server(
        &certs,
        &[
            ("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", "64KiB"),
            ("SWITCHBOARD_SO_SNDBUF", "4KiB"),
            ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
            ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
        ],
    );
    let ca = certs.a.ca.clone();
    let mut slow = wss_rcvbuf(port, &ca, "/ws", Some(4096));
    let mut publisher = wss(port, &ca, "/ws");
    let mut reader = server.connect("/ws");
    slow.subscribe("flood");
    publisher.subscribe("flood");
    reader.subscribe("flood");
    const N: u64 = 6;
    let pad = "p".repeat(50_000);
    for seq in 0..N {
        publisher.send_json(
            json!({"type": "publish", "room": "flood", "data": {"seq": seq, "pad": pad}}),
        );
        assert_eq!(publisher.expect_type("message")["data"]["seq"], seq);
        assert_eq!(reader.expect_type("message")["data"]["seq"], seq);
    }
    let got = slow.expect_close_after(4008, N as usize);
    assert!(
        (got.len() as u64) < N,
        "no limit applied: got all {}",
        got.len()
    );
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["data"]["seq"], i as u64, "prefix in order: {m}");
    }
    publisher.send_json(json!({"type": "publish", "room": "flood", "data": {"seq": "after"}}));
    assert_eq!(publisher.expect_type("message")["data"]["seq"], "after");
    assert_eq!(reader.expect_type("message")["data"]["seq"], "after");
    server.wait_metrics("one slow-consumer close", |t| {
        t.contains("switchboard_slow_consumer_closes_total 1\n")
    });
}
