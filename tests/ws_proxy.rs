//! The HTTP backends over real sockets (PROTOCOL.md "Auth modes" and "Custom message types"):
//! `auth_mode: service` against a stub auth service (valid, refused, slow, down, the cache,
//! `?user_id=` clients) and `rpc_routes` against a stub backend (a reply with the command's id,
//! slow, down, garbage, too large, the per-connection bound, unmapped types).

mod common;

use std::time::Duration;

use common::http_stub::{closed_url, Reply, Stub};
use common::{metric, TestServer};
use serde_json::{json, Value};

/// The auth service of these tests: `good-<user>` is that user, `slow` answers after 2 s,
/// `?user_id=` ids starting with `u` are themselves (as a number when all digits), the rest 401.
fn auth_stub() -> Stub {
    Stub::start(|_, body| {
        let v: Value = serde_json::from_str(body).unwrap();
        if let Some(t) = v["token"].as_str() {
            if let Some(user) = t.strip_prefix("good-") {
                return Reply::json(200, &json!({"user_id": user}).to_string());
            }
            if t == "slow" {
                return Reply::json(200, r#"{"user_id":"late"}"#).after(Duration::from_secs(2));
            }
            if t == "broken" {
                return Reply::json(500, "{}");
            }
        }
        if let Some(u) = v["user_id"].as_str() {
            if let Ok(n) = u.parse::<u64>() {
                return Reply::json(200, &json!({"user_id": n}).to_string());
            }
            if u.starts_with('u') {
                return Reply::json(200, &json!({"user_id": u}).to_string());
            }
        }
        Reply::json(401, r#"{"error":"no"}"#)
    })
}

fn service_server(url: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_AUTH_MODE", "service"),
        ("SWITCHBOARD_AUTH_SERVICE_URL", url),
        ("SWITCHBOARD_AUTH_SERVICE_TIMEOUT", "500ms"),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

#[test]
fn a_token_the_service_accepts_connects_as_its_user() {
    let stub = auth_stub();
    // /ws/chat native here (its own dialect is tests/dialect_chat_hub.rs): the frames below
    // are the native ones.
    let server = service_server(
        &stub.url("/auth/check"),
        &[("SWITCHBOARD_WS_DIALECTS", "/ws=auto")],
    );
    let c = server.connect("/ws/chat?token=good-alice");
    assert_eq!(c.welcome["data"]["user_id"], "alice", "{}", c.welcome);
    let c = server.connect_with("/ws", &[("Authorization", "Bearer good-bob")]);
    assert_eq!(c.welcome["data"]["user_id"], "bob", "{}", c.welcome);
    let bodies = stub.bodies();
    let first: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(first["token"], "good-alice");
    assert_eq!(first["path"], "/ws/chat");
    assert!(
        first["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{first}"
    );
    assert_eq!(first.as_object().unwrap().len(), 3, "{first}");
}

#[test]
fn refusals_and_an_unanswering_service() {
    let stub = auth_stub();
    let server = service_server(&stub.url("/"), &[]);
    let r = server.raw_upgrade("/ws?token=bad", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json(), json!({"error": "refused by the auth service"}));
    let r = server.raw_upgrade("/ws", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "token or user_id is required: send ?token=, Authorization: Bearer or ?user_id="})
    );
    let r = server.raw_upgrade("/ws?token=slow", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "auth service timed out, retry later"})
    );
    let r = server.raw_upgrade("/ws?token=broken", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "auth service unavailable, retry later"})
    );
    // A 5xx is not remembered: the next try asks again.
    let before = stub.requests();
    let _ = server.raw_upgrade("/ws?token=broken", &[]);
    assert_eq!(stub.requests(), before + 1);
    let m = server.wait_metrics("auth metrics", |m| {
        metric(m, "switchboard_auth_service_timeouts_total") == Some(1)
    });
    assert_eq!(
        metric(&m, "switchboard_auth_service_refused_total"),
        Some(1)
    );
    assert_eq!(
        metric(&m, "switchboard_auth_service_unavailable_total"),
        Some(2)
    );
}

#[test]
fn a_service_that_is_down_is_503() {
    let server = service_server(&closed_url("/auth"), &[]);
    let r = server.raw_upgrade("/ws?token=good-alice", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "auth service unavailable, retry later"})
    );
    // The node still serves.
    assert_eq!(server.http_get("/live").0, 200);
}

#[test]
fn answers_are_cached_per_credential() {
    let stub = auth_stub();
    let server = service_server(&stub.url("/"), &[]);
    for _ in 0..3 {
        let c = server.connect("/ws?token=good-carol");
        assert_eq!(c.welcome["data"]["user_id"], "carol");
    }
    assert_eq!(stub.requests(), 1, "accepted: asked once");
    for _ in 0..3 {
        assert_eq!(server.raw_upgrade("/ws?token=bad", &[]).status, 401);
    }
    assert_eq!(stub.requests(), 2, "refused: asked once");
    // Another credential is asked for.
    let c = server.connect("/ws?token=good-dave");
    assert_eq!(c.welcome["data"]["user_id"], "dave");
    assert_eq!(stub.requests(), 3);
    let m = server.wait_metrics("cache hits", |m| {
        metric(m, "switchboard_auth_service_cache_hits_total") == Some(4)
    });
    assert_eq!(
        metric(&m, "switchboard_auth_service_requests_total"),
        Some(3)
    );
}

#[test]
fn no_cache_asks_every_time() {
    let stub = auth_stub();
    let server = service_server(
        &stub.url("/"),
        &[
            ("SWITCHBOARD_AUTH_SERVICE_CACHE_TTL", "0s"),
            ("SWITCHBOARD_AUTH_SERVICE_NEGATIVE_CACHE_TTL", "0s"),
        ],
    );
    server.connect("/ws?token=good-erin");
    server.connect("/ws?token=good-erin");
    assert_eq!(server.raw_upgrade("/ws?token=bad", &[]).status, 401);
    assert_eq!(server.raw_upgrade("/ws?token=bad", &[]).status, 401);
    assert_eq!(stub.requests(), 4);
}

#[test]
fn user_id_only_clients_are_checked_by_the_service() {
    let stub = auth_stub();
    let server = service_server(&stub.url("/"), &[]);
    let mut c = server.connect("/ws?user_id=u7");
    assert_eq!(c.welcome["data"]["user_id"], "u7");
    let sent: Value = serde_json::from_str(&stub.bodies()[0]).unwrap();
    assert_eq!(sent["user_id"], "u7");
    assert!(sent.get("token").is_none(), "{sent}");
    // A number at the pointer is the user id written in decimal.
    let n = server.connect("/ws?user_id=42");
    assert_eq!(n.welcome["data"]["user_id"], "42");
    assert_eq!(server.raw_upgrade("/ws?user_id=mallory", &[]).status, 401);
    // The connection works as any other.
    c.send_json(json!({"type": "subscribe", "room": "r1", "id": 1}));
    assert_eq!(c.expect_type("subscribed")["room"], "r1");
}

#[test]
fn the_user_pointer_is_configurable() {
    let stub = Stub::start(|_, _| Reply::json(200, r#"{"result":{"user":{"id":"zed"}}}"#));
    let server = service_server(
        &stub.url("/"),
        &[("SWITCHBOARD_AUTH_SERVICE_USER_POINTER", "/result/user/id")],
    );
    let c = server.connect("/ws?token=anything");
    assert_eq!(c.welcome["data"]["user_id"], "zed");
}

#[test]
fn over_the_concurrency_limit_is_503_at_once() {
    let stub = auth_stub();
    let server = service_server(
        &stub.url("/"),
        &[
            ("SWITCHBOARD_AUTH_SERVICE_CONCURRENCY_MAX", "1"),
            ("SWITCHBOARD_AUTH_SERVICE_TIMEOUT", "3s"),
        ],
    );
    let mut slow = server.tcp();
    use std::io::Write;
    slow.write_all(common::upgrade_request("/ws?token=slow", &[]).as_bytes())
        .unwrap();
    // Wait until the slow one is at the service, then the next one finds no room.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stub.requests() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow request never arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = server.raw_upgrade("/ws?token=good-fay", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json(), json!({"error": "auth service busy, retry later"}));
    assert_eq!(stub.requests(), 1);
}

// ------------------------------------------------------------ custom types

/// The backend of these tests, by the command's `data.mode`.
fn rpc_stub() -> Stub {
    Stub::start(|path, body| {
        let v: Value = serde_json::from_str(body).unwrap();
        let mode = v["data"]["mode"].as_str().unwrap_or("");
        match mode {
            "slow" => Reply::json(200, "{}").after(Duration::from_secs(2)),
            "garbage" => Reply::json(200, "<html>oops</html>"),
            "huge" => Reply::json(200, &format!("{{\"data\":\"{}\"}}", "x".repeat(4096))),
            "not-http" => Reply {
                raw: Some(b"SSH-2.0-OpenSSH_9\r\n".to_vec()),
                ..Reply::json(200, "")
            },
            "refuse" => Reply::json(422, r#"{"error":"email is required"}"#),
            "fail" => Reply::json(500, "{}"),
            "bare" => Reply::json(200, &json!({"path": path, "seen": v}).to_string()),
            _ => Reply::json(
                200,
                &json!({"type": "user_response", "data": {"email": v["data"]["email"], "by": v["user_id"]}})
                    .to_string(),
            ),
        }
    })
}

fn rpc_server(routes: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_RPC_ROUTES", routes),
        ("SWITCHBOARD_RPC_TIMEOUT", "500ms"),
        ("SWITCHBOARD_RPC_REPLY_BYTES_MAX", "1KiB"),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

#[test]
fn a_routed_type_gets_the_backends_reply_with_its_id() {
    let stub = rpc_stub();
    let routes = format!(
        "get_user={},orders.*={}",
        stub.url("/users"),
        stub.url("/orders")
    );
    let server = rpc_server(&routes, &[]);
    let mut c = server.connect("/ws?user_id=alice");
    c.send_json(json!({"type": "get_user", "id": 7, "data": {"email": "a@b.c"}}));
    let v = c.expect_type("user_response");
    let ts = v["timestamp"].clone();
    assert_eq!(
        v,
        json!({"type": "user_response", "id": 7, "data": {"email": "a@b.c", "by": "alice"}, "timestamp": ts})
    );
    let sent: Value = serde_json::from_str(&stub.bodies()[0]).unwrap();
    let client_id = c.welcome["data"]["client_id"].clone();
    assert_eq!(
        sent,
        json!({
            "type": "get_user", "id": 7, "user_id": "alice", "client_id": client_id,
            "data": {"email": "a@b.c"},
            "command": {"type": "get_user", "id": 7, "data": {"email": "a@b.c"}}
        })
    );
    // A prefix route; a body without type/data is the data of `<type>.result`.
    c.send_json(json!({"type": "orders.create", "id": "o1", "data": {"mode": "bare"}}));
    let v = c.expect_type("orders.create.result");
    assert_eq!(v["id"], "o1");
    assert_eq!(v["data"]["path"], "/orders");
    assert_eq!(v["data"]["seen"]["type"], "orders.create");
    // A backend's own 4xx error text reaches the client.
    c.send_json(json!({"type": "get_user", "id": 8, "data": {"mode": "refuse"}}));
    let e = c.expect_error("email is required");
    assert_eq!(e["id"], 8);
}

#[test]
fn slow_down_and_garbage_backends_are_errors_with_the_id() {
    let stub = rpc_stub();
    let routes = format!(
        "get_user={},gone={}",
        stub.url("/users"),
        closed_url("/gone")
    );
    let server = rpc_server(&routes, &[]);
    let mut c = server.connect("/ws?user_id=alice");
    let cases = [
        ("get_user", "slow", "backend timed out, retry later"),
        ("gone", "", "backend unavailable, retry later"),
        ("get_user", "fail", "backend unavailable, retry later"),
        ("get_user", "garbage", "backend answered garbage"),
        ("get_user", "huge", "backend answered garbage"),
        ("get_user", "not-http", "backend answered garbage"),
    ];
    for (i, (kind, mode, text)) in cases.iter().enumerate() {
        c.send_json(json!({"type": kind, "id": i, "data": {"mode": mode}}));
        let e = c.expect_error(text);
        let ts = e["timestamp"].clone();
        assert_eq!(
            e,
            json!({"type": "error", "id": i, "error": text, "timestamp": ts}),
            "{mode}"
        );
    }
    // Still serving, and the backend still answers.
    c.send_json(json!({"type": "get_user", "id": "ok", "data": {"email": "x"}}));
    assert_eq!(c.expect_type("user_response")["id"], "ok");
    let m = server.wait_metrics("rpc metrics", |m| {
        metric(m, "switchboard_rpc_garbage_total") == Some(3)
    });
    assert_eq!(metric(&m, "switchboard_rpc_timeouts_total"), Some(1));
    assert_eq!(metric(&m, "switchboard_rpc_unavailable_total"), Some(2));
}

#[test]
fn calls_per_connection_are_bounded() {
    let stub =
        Stub::start(|_, _| Reply::json(200, r#"{"data":1}"#).after(Duration::from_millis(600)));
    let server = rpc_server(
        &format!("get_user={}", stub.url("/")),
        &[
            ("SWITCHBOARD_RPC_CONCURRENCY_PER_CONNECTION_MAX", "2"),
            ("SWITCHBOARD_RPC_TIMEOUT", "5s"),
        ],
    );
    let mut c = server.connect("/ws?user_id=alice");
    for id in 1..=3 {
        c.send_json(json!({"type": "get_user", "id": id}));
    }
    // The third is refused at once, before the two in flight answer.
    let e = c.expect_error("too many backend calls in flight");
    assert_eq!(e["id"], 3);
    let mut ids = vec![
        c.expect_type("get_user.result")["id"].as_u64().unwrap(),
        c.expect_type("get_user.result")["id"].as_u64().unwrap(),
    ];
    ids.sort();
    assert_eq!(ids, [1, 2]);
    // Once answered, the connection may call again; another connection was never limited.
    c.send_json(json!({"type": "get_user", "id": 4}));
    assert_eq!(c.expect_type("get_user.result")["id"], 4);
}

#[test]
fn unmapped_unknown_types_are_still_unknown() {
    let stub = rpc_stub();
    let server = rpc_server(&format!("get_user={}", stub.url("/")), &[]);
    let mut c = server.connect("/ws?user_id=alice");
    c.send_json(json!({"type": "create_order", "id": 1}));
    assert_eq!(c.expect_error("unknown message type")["id"], 1);
    // Native types are never routed, even under a catch-all prefix.
    let server = rpc_server(&format!("*={}", stub.url("/")), &[]);
    let mut c = server.connect("/ws?user_id=alice");
    c.send_json(json!({"type": "subscribe", "room": "r", "id": 2}));
    assert_eq!(c.expect_type("subscribed")["id"], 2);
    c.send_json(json!({"type": "anything", "id": 3}));
    assert_eq!(c.expect_type("user_response")["id"], 3);
    assert_eq!(stub.requests(), 1);
}

#[test]
fn a_native_type_in_the_routes_stops_the_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .env("SWITCHBOARD_RPC_ROUTES", "publish=http://127.0.0.1:1/")
        .env("SWITCHBOARD_PORT", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rpc_routes") && err.contains("native"),
        "{err}"
    );
}

#[test]
fn frames_sent_behind_a_parked_upgrade_run_after_it() {
    use std::io::{Read, Write};
    let stub = Stub::start(|_, _| {
        Reply::json(200, r#"{"user_id":"gus"}"#).after(Duration::from_millis(200))
    });
    let server = service_server(&stub.url("/"), &[]);
    let mut s = server.tcp();
    let payload = br#"{"type":"ping","id":"p1"}"#;
    let mask = [1u8, 2, 3, 4];
    let mut bytes = common::upgrade_request("/ws?token=t", &[]).into_bytes();
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&bytes).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(r#""type":"pong""#) {
        assert!(
            std::time::Instant::now() < deadline,
            "no pong: {}",
            String::from_utf8_lossy(&got)
        );
        if let Ok(n) = s.read(&mut chunk) {
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let connected = text.find(r#""user_id":"gus""#).expect("connected as gus");
    let pong = text
        .find(r#""type":"pong","id":"p1""#)
        .expect("pong with the id");
    assert!(connected < pong, "{text}");
}

#[test]
fn calls_per_node_are_bounded() {
    let stub =
        Stub::start(|_, _| Reply::json(200, r#"{"data":1}"#).after(Duration::from_millis(500)));
    let server = rpc_server(
        &format!("get_user={}", stub.url("/")),
        &[
            ("SWITCHBOARD_RPC_CONCURRENCY_MAX", "1"),
            ("SWITCHBOARD_RPC_TIMEOUT", "5s"),
        ],
    );
    let mut a = server.connect("/ws?user_id=alice");
    let mut b = server.connect("/ws?user_id=bob");
    a.send_json(json!({"type": "get_user", "id": 1}));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stub.requests() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first call never arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    b.send_json(json!({"type": "get_user", "id": 2}));
    assert_eq!(b.expect_error("backend busy, retry later")["id"], 2);
    assert_eq!(a.expect_type("get_user.result")["id"], 1);
    assert_eq!(stub.requests(), 1);
    let m = server.wait_metrics("busy", |m| {
        metric(m, "switchboard_rpc_busy_total") == Some(1)
    });
    assert_eq!(metric(&m, "switchboard_rpc_in_flight"), Some(0));
}

#[test]
fn the_rest_api_never_trusts_a_claimed_user_in_service_mode() {
    let stub = auth_stub();
    let server = service_server(&stub.url("/"), &[]);
    let r = server.http_request(
        "GET /api/v1/messages/threads HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "the REST API needs auth_mode jwt or none; with auth_mode service only WebSocket upgrades are authenticated"})
    );
    assert_eq!(stub.requests(), 0);
}

/// A custom type from clients of other dialects reaches the backend as a native command does,
/// and the backend's reply reaches the client: the chat hub's (its frames have no id) as the
/// backend wrote it, the messaging service's in its `{type, payload}` envelope with the id the
/// client gave, the topic protocol's likewise with `id` and the payload lifted.
#[test]
fn backend_replies_reach_clients_of_every_dialect() {
    let stub = rpc_stub();
    let routes = format!("get_user={}", stub.url("/users"));
    let server = rpc_server(&routes, &[("SWITCHBOARD_EXPOSE_SHARD", "false")]);
    let (mut hub, _) = server
        .try_connect_with("/ws/chat?user_id=5", &[], None)
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.body));
    assert_eq!(hub.recv_json()["type"], "connected");
    hub.send_json(json!({"type": "get_user", "data": {"email": "hub@x"}}));
    let v = hub.recv_json();
    assert_eq!(v["type"], "user_response", "{v}");
    assert_eq!(v["data"], json!({"email": "hub@x", "by": "5"}));
    let (mut msg, _) = server
        .try_connect_with("/api/v1/ws?user_id=6", &[], None)
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.body));
    msg.send_json(json!({"type": "get_user", "id": "r1", "payload": {"data": {"email": "m@x"}}}));
    let v = msg.recv_json();
    assert_eq!(
        v,
        json!({"type": "user_response", "payload": {"email": "m@x", "by": "6"}, "id": "r1"})
    );
    let mut topic = server.connect("/ws?user_id=7");
    topic.send_json(json!({"id": "t1", "type": "get_user", "payload": {"data": {"email": "t@x"}}}));
    let v = topic.recv_json();
    assert_eq!(v["type"], "user_response", "{v}");
    assert_eq!(v["id"], "t1");
    assert_eq!(v["payload"], json!({"email": "t@x", "by": "7"}));
}
