//! The server HTTP API over real sockets: publish (plain rooms and rooms with history, whose
//! order is decided on their owner shard: answers with offsets in order, also pipelined),
//! custom and reserved types, broadcast, send to a user's devices on both shards, stats,
//! disconnect, and every error.

mod common;

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use common::{HttpConn, TestServer};
use serde_json::{json, Value};

const KEY: &str = "api-key-1";

fn server() -> TestServer {
    TestServer::start(&[
        ("SWITCHBOARD_API_KEY", KEY),
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        (
            "SWITCHBOARD_ROOMS",
            r#"[{"pattern": "h-*", "history_size": 50}]"#,
        ),
    ])
}

fn post(path: &str, body: &Value) -> Vec<u8> {
    let b = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

fn call(s: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let mut c = HttpConn::open(s);
    c.send(&post(path, body));
    let r = c.response().expect("a response");
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// The owner shard of a sequenced room (the server's own fixed hash).
fn owner(room: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(room) % 2
}

#[test]
fn publish_reaches_subscribers_as_a_client_publish_would() {
    let s = server();
    let mut a = s.connect_on_shard("/ws", 0);
    let mut b = s.connect_on_shard("/ws", 1);
    a.subscribe("news");
    b.subscribe("news");
    let (status, v) = call(
        &s,
        "/api/publish",
        &json!({"room": "news", "data": {"x": 1}}),
    );
    assert_eq!((status, &v), (200, &json!({"ok": true})));
    for c in [&mut a, &mut b] {
        let m = c.expect_type("message");
        assert_eq!(m["room"], "news");
        assert_eq!(m["data"], json!({"x": 1}));
        assert_eq!(m["client_id"], "00000000-0000-0000-0000-000000000000");
        assert!(m.get("user_id").is_none());
    }
    // A backend's own type.
    let (status, _) = call(
        &s,
        "/api/publish",
        &json!({"room": "news", "type": "room_update", "data": {}}),
    );
    assert_eq!(status, 200);
    assert_eq!(a.expect_type("room_update")["room"], "news");
    b.expect_type("room_update");
}

#[test]
fn publish_into_rooms_with_history_answers_offsets_in_order_from_any_shard() {
    let s = server();
    // One room owned by each shard; each request is a fresh connection, so about half are
    // served by the shard that does not own the room and wait for the owner's answer.
    let rooms: Vec<String> = (0..)
        .map(|i| format!("h-{i}"))
        .scan([false, false], |seen, r| {
            let o = owner(&r) as usize;
            let new = !seen[o];
            seen[o] = true;
            Some((new, r))
        })
        .filter_map(|(new, r)| new.then_some(r))
        .take(2)
        .collect();
    for room in &rooms {
        let mut sub = s.connect("/ws");
        let epoch = sub.subscribe(room)["data"]["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
        for n in 1..=10u64 {
            let (status, v) = call(&s, "/api/publish", &json!({"room": room, "data": {"n": n}}));
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["offset"], n, "{room}: {v}");
            assert_eq!(v["epoch"], epoch.as_str());
            let m = sub.expect_type("message");
            assert_eq!(
                (m["offset"].as_u64(), m["data"]["n"].as_u64()),
                (Some(n), Some(n))
            );
        }
    }
    // Pipelined on one kept-alive connection: answers in order, offsets increasing.
    let mut c = HttpConn::open(&s);
    let mut raw = Vec::new();
    for n in 0..5 {
        for room in &rooms {
            raw.extend_from_slice(&post(
                "/api/publish",
                &json!({"room": room, "data": {"p": n}}),
            ));
        }
    }
    c.send(&raw);
    for n in 0..5u64 {
        for _ in &rooms {
            let r = c.response().expect("pipelined answer");
            assert_eq!(r.status, 200, "{}", r.body);
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["offset"], 11 + n, "{v}");
            assert_eq!(r.header("connection"), Some("keep-alive"));
        }
    }
}

#[test]
fn broadcast_send_stats_and_disconnect() {
    let s = server();
    let mut anon = s.connect("/ws");
    let mut bob0 = s.connect_on_shard("/ws?user_id=bob", 0);
    let mut bob1 = s.connect_on_shard("/ws?user_id=bob", 1);
    let (status, _) = call(&s, "/api/broadcast", &json!({"data": {"all": true}}));
    assert_eq!(status, 200);
    for c in [&mut anon, &mut bob0, &mut bob1] {
        assert_eq!(c.expect_type("message")["data"]["all"], true);
    }
    let (status, v) = call(&s, "/api/users/bob/send", &json!({"data": {"kind": "job"}}));
    assert_eq!((status, v["devices"].as_u64()), (200, Some(2)), "{v}");
    for c in [&mut bob0, &mut bob1] {
        let n = c.expect_type("notification");
        assert_eq!(n["data"]["kind"], "job");
        assert!(n["timestamp"].is_u64());
    }
    anon.expect_silence(100);
    let (status, v) = call(
        &s,
        "/api/users/bob/send",
        &json!({"type": "payment.received", "data": 1}),
    );
    assert_eq!(status, 200, "{v}");
    bob0.expect_type("payment.received");
    bob1.expect_type("payment.received");

    let mut c = HttpConn::open(&s);
    c.send(format!("GET /api/stats HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n").as_bytes());
    let r = c.response().unwrap();
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(v["scope"], "node");
    assert_eq!(v["connections"], 3, "{v}");
    assert_eq!(v["users"], 1);
    assert!(v["counters"]["broadcasts"].is_u64(), "{v}");
    assert!(v["gauges"]["ws_connections"].is_u64(), "{v}");

    let (status, v) = call(&s, "/api/users/bob/disconnect", &json!({}));
    assert_eq!((status, v["devices"].as_u64()), (200, Some(2)));
    bob0.expect_close(1008);
    bob1.expect_close(1008);
    anon.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(anon.expect_type("pong")["id"], 1);
}

#[test]
fn api_errors_are_json_with_the_protocol_texts() {
    let s = server();
    for (path, body, status, text) in [
        (
            "/api/publish",
            json!({"data": {}}),
            400,
            "room name is required",
        ),
        (
            "/api/publish",
            json!({"room": "r"}),
            400,
            "data is required",
        ),
        (
            "/api/publish",
            json!({"room": 5, "data": {}}),
            400,
            "invalid JSON format",
        ),
        (
            "/api/publish",
            json!({"room": "r", "type": "connected", "data": {}}),
            400,
            "type is reserved",
        ),
        (
            "/api/publish",
            json!({"room": "r", "type": "a b", "data": {}}),
            400,
            "invalid type",
        ),
        (
            "/api/broadcast",
            json!({"type": "message.ack", "data": {}}),
            400,
            "type is reserved",
        ),
        (
            "/api/users/bob/send",
            json!({"type": "presence.online", "data": {}}),
            400,
            "type is reserved",
        ),
        ("/api/nope", json!({}), 404, "not found"),
    ] {
        let (got, v) = call(&s, path, &body);
        assert_eq!(
            (got, v["error"].as_str()),
            (status, Some(text)),
            "{path} {body}"
        );
    }
    let room = "r".repeat(300);
    let (got, v) = call(&s, "/api/publish", &json!({"room": room, "data": 1}));
    assert_eq!(
        (got, v["error"].as_str()),
        (400, Some("room name too long"))
    );
    let mut c = HttpConn::open(&s);
    c.send(format!("POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Length: 3\r\n\r\n{{x}}").as_bytes());
    let r = c.response().unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, r#"{"error":"invalid JSON format"}"#)
    );
    // Whatever the Content-Type says (curl -d sends form-urlencoded), the body is JSON.
    c.send(format!("POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 24\r\n\r\n{{\"room\":\"r\",\"data\":null}}").as_bytes());
    let r = c.response().unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body, r#"{"error":"data is required"}"#);
    c.send(format!("GET /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n").as_bytes());
    let r = c.response().unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    s.assert_serving();
}
