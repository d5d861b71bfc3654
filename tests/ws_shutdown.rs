//! Graceful shutdown over real sockets: after SIGTERM every client receives every frame published
//! before the signal and then close 1001, `/ready` answers 503 while draining, the process exits 0.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use serde_json::json;

const SHUTDOWN_ENV: [(&str, &str); 1] = [("SWITCHBOARD_SHUTDOWN_TIMEOUT", "3s")];

#[test]
fn drain_delivers_queued_frames_then_1001_and_exits_0() {
    const CLIENTS: usize = 10;
    const MESSAGES: u64 = 50;
    let mut server = TestServer::start(&SHUTDOWN_ENV);
    let mut publisher = server.connect("/ws");
    publisher.subscribe("news");
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| server.connect("/ws")).collect();
    for c in clients.iter_mut() {
        c.subscribe("news");
    }
    for seq in 0..MESSAGES {
        publisher.send_json(json!({"type": "publish", "room": "news", "data": {"seq": seq}}));
    }
    // The publisher's own copies prove every publish was handled before the signal.
    for seq in 0..MESSAGES {
        assert_eq!(publisher.expect_type("message")["data"]["seq"], seq);
    }
    // The other clients have not read anything yet.
    server.signal_term();
    for (i, c) in clients
        .iter_mut()
        .chain(std::iter::once(&mut publisher))
        .enumerate()
    {
        let got = c.expect_close_after(1001, MESSAGES as usize);
        let want = if i == CLIENTS { 0 } else { MESSAGES as usize };
        assert_eq!(
            got.len(),
            want,
            "client {i} got {} of {want} frames before 1001",
            got.len()
        );
        for (seq, m) in got.iter().enumerate() {
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["data"]["seq"], seq as u64, "client {i}: {m}");
        }
    }
    let status = server.wait_exit();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.logs()
    );
}

/// GET /ready on a fresh connection: Some(status), or None when the connection was refused or
/// closed without an answer.
fn ready_status(server: &TestServer) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&server.addr(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).and_then(|c| c.parse().ok())
}

#[test]
fn ready_is_503_while_draining() {
    let mut server = TestServer::start(&SHUTDOWN_ENV);
    // /live answers as soon as the shards do; /ready only once the bridge's store is up too
    // (a busy machine shows the gap).
    server.wait_ready();
    assert_eq!(ready_status(&server), Some(200));
    // A client that does not read (and so never answers the close) keeps the drain going for
    // up to the closing grace / shutdown_timeout.
    let _client = server.connect("/ws");
    server.signal_term();
    // Well inside the drain, not in the first instants after the signal.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.is_running(),
        "the drain ended within 300 ms; this test needs it to last"
    );
    let during = ready_status(&server);
    assert!(server.is_running(), "the drain ended during the request");
    assert_eq!(
        during,
        Some(503),
        "/ready 300 ms into the drain: expected 503, got {} (load balancers must see 503, not a refused connection)",
        during.map_or("no HTTP answer (connection refused or closed)".to_owned(), |s| s.to_string())
    );
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn new_upgrades_are_refused_while_draining() {
    let mut server = TestServer::start(&SHUTDOWN_ENV);
    let mut c = server.connect("/ws");
    server.signal_term();
    c.expect_close(1001);
    // After the drain started, no new WebSocket is accepted (refused, 503, or closed).
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&server.addr(), Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(common::upgrade_request("/ws", &[]).as_bytes());
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let head = String::from_utf8_lossy(&buf[..n]);
                assert!(
                    !head.starts_with("HTTP/1.1 101"),
                    "upgrade accepted during drain: {head}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn idle_server_exits_0_on_sigterm() {
    let mut server = TestServer::start(&SHUTDOWN_ENV);
    let started = Instant::now();
    let status = server.sigterm();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "idle drain took {:?}",
        started.elapsed()
    );
}
