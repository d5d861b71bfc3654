//! The HTTP side over real sockets: keep-alive and pipelining, bounded bodies (413, 411),
//! bytes after a request never taken for WebSocket frames, CORS, and the API-key door.

mod common;

use std::time::{Duration, Instant};

use common::{HttpConn as Conn, TestServer};

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection_and_pipelines_in_order() {
    let server = TestServer::start(&[]);
    // /ready answers 200 once the store's first health check ran (a loaded machine may
    // not have run it by the time /live answers).
    server.wait_ready();
    let mut c = Conn::open(&server);
    c.send(get("/live").as_bytes());
    let r = c.response().expect("first response");
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"alive"}"#));
    assert_eq!(r.header("connection"), Some("keep-alive"));
    // Two requests in one write: two responses, in order.
    c.send(format!("{}{}", get("/ready"), get("/nope")).as_bytes());
    assert_eq!(c.response().unwrap().status, 200);
    assert_eq!(c.response().unwrap().status, 404);
    // `Connection: close` ends it after the response.
    c.send(b"GET /live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(3)));
    let m = server.wait_metrics("keep-alive reuses counted", |t| {
        common::metric(t, "switchboard_http_keepalive_reuses_total").unwrap_or(0) >= 3
    });
    assert!(m.contains("switchboard_http_keepalive_reuses_total"));
}

#[test]
fn http_1_0_closes_unless_asked_and_the_request_bound_closes_too() {
    let server = TestServer::start(&[("SWITCHBOARD_HTTP_KEEPALIVE_REQUESTS_MAX", "2")]);
    let mut c = Conn::open(&server);
    c.send(b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(c.response().unwrap().header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(3)));

    let mut c = Conn::open(&server);
    c.send(get("/live").as_bytes());
    assert_eq!(
        c.response().unwrap().header("connection"),
        Some("keep-alive")
    );
    c.send(get("/live").as_bytes());
    assert_eq!(c.response().unwrap().header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(3)));
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() {
    let server = TestServer::start(&[("SWITCHBOARD_HTTP_KEEPALIVE_TIMEOUT", "1s")]);
    let mut c = Conn::open(&server);
    c.send(get("/live").as_bytes());
    assert_eq!(c.response().unwrap().status, 200);
    let t0 = Instant::now();
    assert!(c.closed_within(Duration::from_secs(4)), "still open");
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn bodies_are_bounded_and_chunked_is_refused() {
    let server = TestServer::start(&[("SWITCHBOARD_HTTP_BODY_BYTES_MAX", "1KiB")]);
    // A body within the bound is read whole; a POST to a GET endpoint is 405 with Allow, and
    // the connection goes on.
    let mut c = Conn::open(&server);
    c.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    let r = c.response().unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.body, r#"{"error":"method not allowed"}"#);
    c.send(get("/live").as_bytes());
    assert_eq!(c.response().unwrap().status, 200);

    // Over the bound: 413 from the head alone, then close.
    let mut c = Conn::open(&server);
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 413);
    assert!(r.body.contains("error"), "{}", r.body);
    assert!(c.closed_within(Duration::from_secs(3)));

    let mut c = Conn::open(&server);
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 411);
    assert!(c.closed_within(Duration::from_secs(3)));
    server.assert_serving();
}

#[test]
fn bytes_after_a_plain_request_are_never_websocket_frames() {
    let server = TestServer::start(&[]);
    let mut c = Conn::open(&server);
    // A masked text frame {"type":"ping"} right behind a plain GET: it is the next
    // "request", which is not HTTP: 400 and close; never a pong.
    let payload = br#"{"type":"ping"}"#;
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    let mut raw = get("/live").into_bytes();
    raw.extend_from_slice(&frame);
    c.send(&raw);
    assert_eq!(c.response().unwrap().status, 200);
    let r = c.response().expect("a reply to the garbage");
    assert_eq!(r.status, 400);
    assert!(!r.body.contains("pong"));
    assert!(c.closed_within(Duration::from_secs(3)));
}

#[test]
fn cors_preflight_and_headers_for_configured_origins_only() {
    let server = TestServer::start(&[("SWITCHBOARD_CORS_ORIGINS", "https://app.example")]);
    let mut c = Conn::open(&server);
    c.send(b"OPTIONS /api/publish HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: x-api-key\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("X-API-Key"));
    assert_eq!(r.header("vary"), Some("Origin"));
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    // Another origin: the preflight is refused and ordinary responses carry no CORS header.
    c.send(b"OPTIONS /api/publish HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 403);
    let mut c = Conn::open(&server);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\n\r\n");
    assert!(c
        .response()
        .unwrap()
        .header("access-control-allow-origin")
        .is_none());
}

#[test]
fn without_cors_origins_no_cors_header_is_sent() {
    let server = TestServer::start(&[]);
    let mut c = Conn::open(&server);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\r\n");
    let r = c.response().unwrap();
    assert!(r.header("access-control-allow-origin").is_none(), "{r:?}");
}

#[test]
fn the_api_door_is_off_without_a_key_and_checks_the_key_when_set() {
    let server = TestServer::start(&[]);
    let mut c = Conn::open(&server);
    c.send(get("/api/stats").as_bytes());
    let r = c.response().unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body,
        r#"{"error":"the server API is off (no api_key configured)"}"#
    );

    let server = TestServer::start(&[("SWITCHBOARD_API_KEY", "k-123")]);
    let mut c = Conn::open(&server);
    for (headers, status) in [
        ("", 401),
        ("X-API-Key: wrong\r\n", 401),
        ("Authorization: Bearer k-123\r\n", 401),
        ("X-API-Key: k-123\r\n", 200),
        ("Authorization: apikey k-123\r\n", 200),
        ("Authorization: ApiKey k-123\r\n", 200),
    ] {
        c.send(format!("GET /api/stats HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes());
        let r = c.response().unwrap();
        assert_eq!(r.status, status, "{headers:?}: {}", r.body);
        if status == 401 {
            assert_eq!(r.body, r#"{"error":"invalid or missing API key"}"#);
        }
    }
    // The key never reaches the log.
    assert!(!server.logs().contains("k-123"));
}

#[test]
fn an_upgrade_after_kept_alive_requests_works() {
    let server = TestServer::start(&[]);
    let mut c = Conn::open(&server);
    c.send(get("/live").as_bytes());
    assert_eq!(c.response().unwrap().status, 200);
    c.send(common::upgrade_request("/ws", &[]).as_bytes());
    let r = c.response().unwrap();
    assert_eq!(r.status, 101);
}
