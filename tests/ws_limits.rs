//! Limits over real sockets: rate limiting (4029), the global connection limit (503), the send
//! queue limit (4008), the handshake timeout, oversized request heads (431), dead peers
//! (ping/pong), and the Origin allow-list (403).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::{upgrade_request, RawEvent, TestServer, RECV_TIMEOUT};
use serde_json::json;

#[test]
fn rate_limit_errors_then_close_4029() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "1"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "2"),
        ("SWITCHBOARD_RATE_LIMIT_MAX_VIOLATIONS", "3"),
    ]);
    let mut c = server.connect("/ws");
    for i in 0..6 {
        c.send_json(json!({"type": "ping", "id": i}));
    }
    // The burst of 2 is served.
    assert_eq!(c.expect_type("pong")["id"], 0);
    assert_eq!(c.expect_type("pong")["id"], 1);
    // Three violations in a row are answered with an error each.
    for _ in 2..5 {
        c.expect_error("rate limit exceeded");
    }
    // The fourth closes the connection.
    c.expect_close(4029);
    server.assert_serving();
}

/// PROTOCOL.md section 0: the id is copied into the error caused by the command, this one too.
#[test]
fn rate_limit_error_carries_the_command_id() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "1"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "1"),
        ("SWITCHBOARD_RATE_LIMIT_MAX_VIOLATIONS", "5"),
    ]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "ping", "id": "ok"}));
    c.send_json(json!({"type": "ping", "id": "limited"}));
    assert_eq!(c.expect_type("pong")["id"], "ok");
    let e = c.expect_error("rate limit exceeded");
    assert_eq!(
        e["id"], "limited",
        "the rate-limit error must carry the rejected command's id: {e}"
    );
}

#[test]
fn rate_limit_recovers_after_refill() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "1"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "2"),
        ("SWITCHBOARD_RATE_LIMIT_MAX_VIOLATIONS", "3"),
    ]);
    let mut c = server.connect("/ws");
    for _ in 0..2 {
        c.send_json(json!({"type": "ping"}));
        c.expect_type("pong");
    }
    for _ in 0..3 {
        c.send_json(json!({"type": "ping"}));
        c.expect_error("rate limit exceeded");
    }
    std::thread::sleep(Duration::from_millis(1200));
    c.send_json(json!({"type": "ping"}));
    c.expect_type("pong");
    // The strike count was reset by the accepted command: three more violations are tolerated.
    for _ in 0..3 {
        c.send_json(json!({"type": "ping"}));
        c.expect_error("rate limit exceeded");
    }
    c.send_json(json!({"type": "ping"}));
    c.expect_close(4029);
}

#[test]
fn global_connection_limit_is_503_before_upgrade() {
    let server = TestServer::start(&[("SWITCHBOARD_MAX_CONNECTIONS", "2")]);
    let a = server.connect("/ws");
    let _b = server.connect("/ws");
    let r = server.raw_upgrade("/ws", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json(), json!({"error": "server is at maximum capacity"}));
    // Plain HTTP is not a WebSocket connection and still works.
    let (status, body) = server.http_get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["clients"],
        2
    );
    // A freed slot can be taken again.
    a.close();
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        match server.try_connect_with("/ws", &[], None) {
            Ok(_) => break,
            Err(r) => {
                assert_eq!(r.status, 503);
                assert!(Instant::now() < deadline, "slot never freed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn slow_consumer_is_closed_4008_and_others_keep_receiving() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", "64KiB"),
        ("SWITCHBOARD_SO_SNDBUF", "4KiB"),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    let mut slow = server.connect_small_rcvbuf("/ws", 4096);
    let mut publisher = server.connect("/ws");
    let mut reader = server.connect("/ws");
    slow.subscribe("flood");
    publisher.subscribe("flood");
    reader.subscribe("flood");

    // 4 x ~50 KiB = ~200 KiB: far past 64 KiB of queue plus the small socket buffers. Few big
    // messages make the overflow happen within milliseconds of the slow client starting to
    // read, well inside the server's grace for writing the close frame.
    const N: u64 = 4;
    let pad = "p".repeat(50_000);
    for seq in 0..N {
        publisher.send_json(
            json!({"type": "publish", "room": "flood", "data": {"seq": seq, "pad": pad}}),
        );
        for c in [&mut publisher, &mut reader] {
            let m = c.expect_type("message");
            assert_eq!(
                m["data"]["seq"], seq,
                "the fast subscribers get every message in order"
            );
        }
    }
    // The slow client gets what was already on its way, then 4008.
    let got = slow.expect_close_after(4008, N as usize);
    assert!(
        (got.len() as u64) < N,
        "the slow consumer received everything ({}): no limit applied",
        got.len()
    );
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["data"]["seq"], i as u64, "prefix in order: {m}");
    }

    // It is gone from the room; the others still work.
    publisher.send_json(json!({"type": "publish", "room": "flood", "data": {"seq": "after"}}));
    for c in [&mut publisher, &mut reader] {
        assert_eq!(c.expect_type("message")["data"]["seq"], "after");
    }
    let mut d = server.connect("/ws");
    assert_eq!(d.subscribe("flood")["data"]["client_count"], 3);
    server.wait_metrics("one slow-consumer close", |t| {
        t.contains("switchboard_slow_consumer_closes_total 1\n")
    });
}

/// Whether the peer closed `s` within the read timeout set on it.
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false, // data (e.g. an error response); keep going
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

#[test]
fn handshake_timeout_closes_slowloris() {
    let server = TestServer::start(&[("SWITCHBOARD_HANDSHAKE_TIMEOUT", "1s")]);
    let started = Instant::now();
    let mut s = server.tcp();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("partial head");
    let mut closed_after = None;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(5) {
        if closed_by_peer(&mut s) {
            closed_after = Some(started.elapsed());
            break;
        }
        // Dribble one header line every ~200 ms, as a slowloris does.
        n += 1;
        if n % 2 == 0
            && s.write_all(format!("X-Slow-{n}: a\r\n").as_bytes())
                .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let t =
        closed_after.expect("the server never closed a connection that dribbled its head for 5 s");
    assert!(t >= Duration::from_millis(800), "closed too early: {t:?}");
    assert!(
        t <= Duration::from_millis(2500),
        "closed too late for a 1 s handshake timeout: {t:?}"
    );

    // A silent connection is closed too.
    let started = Instant::now();
    let mut idle = server.tcp();
    idle.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    assert!(closed_by_peer(&mut idle), "idle connection not closed");
    assert!(
        started.elapsed() <= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    server.assert_serving();
}

#[test]
fn oversized_request_head_is_431() {
    let server = TestServer::start(&[]);
    let big = "a".repeat(10 * 1024);
    let r = server.http_request(&upgrade_request("/ws", &[("X-Big", &big)]));
    assert_eq!(r.status, 431, "{r:?}");
    assert!(r.json()["error"].is_string(), "{r:?}");
    // Also for a plain HTTP request.
    let r = server.http_request(&format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
    ));
    assert_eq!(r.status, 431, "{r:?}");
    // A large head under the 8 KiB default still upgrades.
    let medium = "b".repeat(6 * 1024);
    let r = server.raw_upgrade("/ws", &[("X-Medium", &medium)]);
    assert_eq!(r.status, 101, "{r:?}");
    server.assert_serving();
}

#[test]
fn dead_peer_is_dropped_after_pong_wait() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_PING_INTERVAL", "1s"),
        ("SWITCHBOARD_PONG_WAIT", "2s"),
    ]);
    let mut raw = server.raw_ws("/ws");
    let upgraded = Instant::now();
    let mut pinged_at = None;
    let gone_at = loop {
        match raw.read_frame(Duration::from_secs(6)) {
            RawEvent::Frame { opcode: 0x9, .. } => {
                pinged_at = pinged_at.or(Some(upgraded.elapsed()))
            }
            RawEvent::Frame { opcode: 0x1, .. } => {} // connected
            RawEvent::Frame { opcode: 0x8, .. } | RawEvent::Eof => break upgraded.elapsed(),
            other => panic!("unexpected {other:?}"),
        }
    };
    let pinged = pinged_at.expect("the server never pinged a quiet connection");
    assert!(
        pinged >= Duration::from_millis(800) && pinged <= Duration::from_millis(1800),
        "ping at {pinged:?}"
    );
    assert!(
        gone_at >= Duration::from_millis(1800),
        "dropped before pong_wait: {gone_at:?}"
    );
    assert!(
        gone_at <= Duration::from_millis(3500),
        "not dropped near pong_wait: {gone_at:?}"
    );
    server.assert_serving();
}

#[test]
fn peer_answering_pings_stays_connected() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_PING_INTERVAL", "1s"),
        ("SWITCHBOARD_PONG_WAIT", "2s"),
    ]);
    let mut c = server.connect("/ws");
    // Reading answers the server's pings (tungstenite replies on the next read).
    c.expect_silence(4500);
    c.send_json(json!({"type": "ping", "id": "alive"}));
    assert_eq!(c.expect_type("pong")["id"], "alive");
}

#[test]
fn origin_allow_list() {
    let server = TestServer::start(&[("SWITCHBOARD_ALLOWED_ORIGINS", "https://good.example")]);
    let r = server.raw_upgrade("/ws", &[("Origin", "https://evil.example")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.json()["error"].is_string(), "{r:?}");
    let r = server.raw_upgrade("/ws", &[("Origin", "https://good.example.evil.example")]);
    assert_eq!(r.status, 403, "prefix match is not a match: {r:?}");
    let r = server.raw_upgrade("/ws", &[("Origin", "https://good.example")]);
    assert_eq!(r.status, 101, "{r:?}");
    let r = server.raw_upgrade("/ws", &[]);
    assert_eq!(
        r.status, 101,
        "no Origin (non-browser client) is allowed: {r:?}"
    );
    let mut c = server.connect_with("/ws", &[("Origin", "https://good.example")]);
    c.send_json(json!({"type": "ping"}));
    c.expect_type("pong");
}
