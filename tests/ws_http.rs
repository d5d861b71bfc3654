//! The plain HTTP endpoints on the WebSocket port (PROTOCOL.md section 0): /health with real
//! counts, /live, /ready, Prometheus metrics that follow traffic, and 404 for anything else.

mod common;

use std::time::{Duration, Instant};

use common::{metric, now_ms, parse_rfc3339_ms, TestServer, RECV_TIMEOUT};
use serde_json::{json, Value};

/// /health's counts (`status`, `clients`, `rooms`), after checking the messaging service's
/// fields that follow them (`service`, and `time`: RFC 3339 UTC to the second, near now).
fn health(server: &TestServer) -> Value {
    let (status, body) = server.http_get("/health");
    assert_eq!(status, 200, "{body}");
    let mut v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON ({e}): {body}"));
    let o = v.as_object_mut().expect("an object");
    assert_eq!(o.remove("service"), Some(json!("switchboard")), "{body}");
    let time = o.remove("time").expect("time");
    assert_health_time(&time);
    v
}

/// `time` of /health: `YYYY-MM-DDTHH:MM:SSZ` and within a minute of this machine's clock.
fn assert_health_time(time: &Value) {
    let t = time.as_str().expect("time is a string");
    assert!(t.len() == 20 && t.ends_with('Z'), "{t}");
    let ms = parse_rfc3339_ms(t).unwrap_or_else(|| panic!("not RFC 3339: {t}"));
    assert!(now_ms().abs_diff(ms) < 60_000, "{t} is not now");
}

/// Poll /health until it equals `want`.
fn wait_health(server: &TestServer, want: Value) {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let h = health(server);
        if h == want {
            return;
        }
        assert!(Instant::now() < deadline, "/health is {h}, expected {want}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn health_reports_real_counts() {
    let server = TestServer::start(&[]);
    assert_eq!(
        health(&server),
        json!({"status": "healthy", "clients": 0, "rooms": 0})
    );
    // Verbatim: the rooms module's body, then the messaging service's fields, in this order.
    let (_, body) = server.http_get("/health");
    let head = r#"{"status":"healthy","clients":0,"rooms":0,"service":"switchboard","time":""#;
    assert!(body.starts_with(head), "{body}");
    assert_eq!(body.len(), head.len() + 22, "{body}");
    assert!(body.ends_with("Z\"}"), "{body}");

    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");
    let c = server.connect("/ws");
    a.subscribe("one");
    a.subscribe("two");
    b.subscribe("two");
    wait_health(
        &server,
        json!({"status": "healthy", "clients": 3, "rooms": 2}),
    );

    a.close();
    wait_health(
        &server,
        json!({"status": "healthy", "clients": 2, "rooms": 1}),
    );
    b.send_json(json!({"type": "unsubscribe", "room": "two"}));
    b.expect_type("unsubscribed");
    wait_health(
        &server,
        json!({"status": "healthy", "clients": 2, "rooms": 0}),
    );
    drop((b, c));
    wait_health(
        &server,
        json!({"status": "healthy", "clients": 0, "rooms": 0}),
    );
}

#[test]
fn health_content_type_is_json() {
    let server = TestServer::start(&[]);
    let r = server.http_request("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{r:?}"
    );
}

#[test]
fn live_and_ready() {
    let server = TestServer::start(&[]);
    let (status, _) = server.http_get("/live");
    assert_eq!(status, 200);
    // Ready once the bridge's store is up as well (a moment after /live on a busy machine).
    server.wait_ready();
    let (status, body) = server.http_get("/ready");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
}

#[test]
fn unknown_paths_are_404() {
    let server = TestServer::start(&[]);
    for path in ["/", "/nope", "/health/extra", "/wss", "/metrics2"] {
        let (status, body) = server.http_get(path);
        assert_eq!(status, 404, "{path}: {body}");
    }
    // A plain GET on a WebSocket path (no upgrade) is refused, not served as a page.
    let (status, _) = server.http_get("/ws");
    assert!(
        (400..500).contains(&status),
        "GET /ws without upgrade: {status}"
    );
}

#[test]
fn metrics_follow_traffic() {
    let server = TestServer::start(&[]);
    for path in ["/metrics", "/prometheus/metrics"] {
        let r = server.http_request(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("text/plain")),
            "{path}: {r:?}"
        );
        assert!(
            r.body
                .contains("# TYPE switchboard_publishes_total counter"),
            "{path}:\n{}",
            r.body
        );
        assert_eq!(
            metric(&r.body, "switchboard_publishes_total"),
            Some(0),
            "{path}"
        );
        assert_eq!(
            metric(&r.body, "switchboard_direct_messages_total"),
            Some(0),
            "{path}"
        );
    }

    let mut a = server.connect("/ws?user_id=alice");
    let mut b = server.connect("/ws?user_id=bob");
    a.subscribe("m");
    b.subscribe("m");
    for i in 0..3 {
        a.send_json(json!({"type": "publish", "room": "m", "data": i}));
        a.expect_type("message");
        b.expect_type("message");
    }
    a.send_json(json!({"type": "message.send", "clientMsgId": "x", "to": "bob", "content": "hi"}));
    a.expect_type("message.ack");
    b.expect_type("message.create");
    a.send_json(json!({"type": "bogus"}));
    a.expect_error("unknown message type");

    let text = server.wait_metrics("publishes=3, dms=1, upgrades=2", |t| {
        metric(t, "switchboard_publishes_total") == Some(3)
            && metric(t, "switchboard_direct_messages_total") == Some(1)
            && metric(t, "switchboard_upgrades_total") == Some(2)
    });
    assert!(
        metric(&text, "switchboard_deliveries_total").is_some_and(|d| d >= 7),
        "{text}"
    );
    assert!(
        metric(&text, "switchboard_frames_in_total").is_some_and(|d| d >= 7),
        "{text}"
    );
    assert!(
        metric(&text, "switchboard_errors_total").is_some_and(|d| d >= 1),
        "{text}"
    );
    assert_eq!(metric(&text, "switchboard_clients"), Some(2), "{text}");
    assert_eq!(metric(&text, "switchboard_rooms"), Some(1), "{text}");
    // Both paths serve the same registry.
    let (_, prom) = server.http_get("/prometheus/metrics");
    assert_eq!(metric(&prom, "switchboard_publishes_total"), Some(3));
}
