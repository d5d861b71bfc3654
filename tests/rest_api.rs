//! The messaging REST API (`/api/v1/`, docs/API.md) over real sockets, for what the shard
//! answers itself: authentication (JWT Bearer, and `X-User-Id` in auth mode none), the
//! refusals decided before a request reaches the store (routes, methods, query bounds,
//! malformed and over-large bodies), the server API key not applying here, CORS, and the
//! presence endpoints (the online list across shards, paging, invisible users, the grace,
//! `address_policy: claim`).
//!
//! The store endpoints' answers come from the bridge; their end-to-end cases live with the
//! bridge's tests once it runs REST jobs.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::jwt::{self, SECRET};
use common::{now_s, Client, HttpConn, HttpResp, TestServer};
use serde_json::{json, Value};

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    r.push_str("\r\n");
    if let Some(b) = body {
        r.push_str(b);
    }
    r.into_bytes()
}

fn call(
    s: &TestServer,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (HttpResp, Value) {
    let mut c = HttpConn::open(s);
    c.send(&request(method, target, headers, body));
    let r = c
        .response()
        .unwrap_or_else(|| panic!("no response to {method} {target}"));
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r, v)
}

/// `(status, error text)` of a request.
fn refused(
    s: &TestServer,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let (r, v) = call(s, method, target, headers, body);
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let text = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {}", r.body));
    (r.status, text.to_owned())
}

fn as_user(u: &str) -> [(&'static str, &str); 1] {
    [("X-User-Id", u)]
}

fn online_ids(v: &Value) -> Vec<String> {
    v["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users in {v}"))
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_owned())
        .collect()
}

/// Poll `GET path` as `me` until `pred` holds (the presence owner publishes asynchronously).
fn wait_for(
    s: &TestServer,
    me: &str,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (r, v) = call(s, "GET", path, &as_user(me), None);
        assert_eq!(r.status, 200, "{}", r.body);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jwt_mode_needs_a_valid_bearer_token() {
    let s = TestServer::start(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
    ]);
    let path = "/api/v1/presence/user/bob";
    let good = jwt::hs256(&json!({"sub": "alice", "exp": now_s() + 60}));
    let (r, v) = call(
        &s,
        "GET",
        path,
        &[("Authorization", &format!("Bearer {good}"))],
        None,
    );
    assert_eq!(
        (r.status, &v["userId"], &v["status"]),
        (200, &json!("bob"), &json!("offline"))
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let required = "token is required: send Authorization: Bearer <token>";
    assert_eq!(refused(&s, "GET", path, &[], None), (401, required.into()));
    // The development identity and the query token are not read in jwt mode.
    assert_eq!(
        refused(
            &s,
            "GET",
            &format!("{path}?user_id=alice&token={good}"),
            &as_user("alice"),
            None
        ),
        (401, required.into())
    );
    assert_eq!(
        refused(
            &s,
            "GET",
            path,
            &[("Authorization", &format!("apikey {good}"))],
            None
        ),
        // An API key presented is a backend's claim, checked as such (none is configured).
        (401, "invalid API key".into())
    );
    let expired = jwt::hs256(&json!({"sub": "alice", "exp": now_s() - 60}));
    assert_eq!(
        refused(
            &s,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {expired}"))],
            None
        ),
        (401, "token expired".into())
    );
    let forged = jwt::hs(
        jsonwebtoken::Algorithm::HS256,
        b"another-secret-0123456789abcdefgh",
        &json!({"sub": "alice", "exp": now_s() + 60}),
    );
    assert_eq!(
        refused(
            &s,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {forged}"))],
            None
        ),
        (401, "invalid token signature".into())
    );
    let none = jwt::alg_none(&json!({"sub": "alice", "exp": now_s() + 60}));
    assert_eq!(
        refused(
            &s,
            "GET",
            path,
            &[("Authorization", &format!("Bearer {none}"))],
            None
        ),
        (401, "token algorithm not allowed".into())
    );
    // Authentication comes before routing: an unknown path without a token is 401 too.
    assert_eq!(
        refused(&s, "GET", "/api/v1/nope", &[], None),
        (401, required.into())
    );
}

#[test]
fn none_mode_takes_x_user_id_or_user_id_and_is_separate_from_the_server_api_key() {
    let s = TestServer::start(&[("SWITCHBOARD_API_KEY", "k-1")]);
    let path = "/api/v1/presence/online";
    let (r, _) = call(&s, "GET", path, &as_user("alice"), None);
    assert_eq!(r.status, 200);
    let (r, _) = call(&s, "GET", &format!("{path}?user_id=alice"), &[], None);
    assert_eq!(r.status, 200);
    let required = "user id is required: send X-User-Id (auth_mode is none, for development)";
    assert_eq!(refused(&s, "GET", path, &[], None), (401, required.into()));
    // The server API key is not an identity here, and /api/v1 needs no key; a backend with
    // the key acts for the user it names in X-User-Id (docs/API.md, Backends).
    assert_eq!(
        refused(&s, "GET", path, &[("X-API-Key", "k-1")], None),
        (
            401,
            "user id is required: a backend's request (API key) names the user it acts for in X-User-Id"
                .into()
        )
    );
    let (r, _) = call(
        &s,
        "GET",
        path,
        &[("X-API-Key", "k-1"), ("X-User-Id", "bob")],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        refused(
            &s,
            "GET",
            path,
            &[("X-API-Key", "k-2"), ("X-User-Id", "bob")],
            None
        ),
        (401, "invalid API key".into())
    );
    assert_eq!(
        refused(&s, "GET", path, &as_user(""), None),
        (400, "invalid user_id".into())
    );
    let long = "u".repeat(257);
    assert_eq!(
        refused(&s, "GET", path, &as_user(&long), None),
        (400, "invalid user_id".into())
    );
    // The server API keeps its key.
    assert_eq!(
        refused(&s, "GET", "/api/stats", &as_user("alice"), None),
        (401, "invalid or missing API key".into())
    );
}

#[test]
fn refusals_before_the_store() {
    let s = TestServer::start(&[
        ("SWITCHBOARD_HTTP_BODY_BYTES_MAX", "4KiB"),
        ("SWITCHBOARD_MAX_DM_CONTENT_BYTES", "64"),
    ]);
    let me = as_user("alice");
    let r = |m: &str, t: &str, b: Option<&str>| refused(&s, m, t, &me, b);
    assert_eq!(r("GET", "/api/v1/nothing", None), (404, "not found".into()));
    let (resp, v) = call(&s, "DELETE", "/api/v1/messages/threads", &me, None);
    assert_eq!(
        (resp.status, resp.header("allow"), &v["error"]),
        (405, Some("GET, POST"), &json!("method not allowed"))
    );
    // HEAD: not served (the answer to it has no body, so read the head only).
    let mut t = s.tcp();
    t.write_all(&request("HEAD", "/api/v1/notifications", &me, None))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && t.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 405 ") && head.contains("\r\nAllow: GET\r\n"),
        "{head}"
    );
    assert_eq!(
        r("GET", "/api/v1/notifications?limit=0", None),
        (400, "limit must be an integer from 1 to 200".into())
    );
    assert_eq!(
        r("GET", "/api/v1/messages/threads?limit=201", None),
        (400, "limit must be an integer from 1 to 200".into())
    );
    assert_eq!(
        r("GET", "/api/v1/messages/threads?before=x", None),
        (
            400,
            "before must be the next value of the previous page (a number)".into()
        )
    );
    assert_eq!(
        r("GET", "/api/v1/notifications?unread=maybe", None),
        (400, "unread must be true or false".into())
    );
    assert_eq!(
        r("PUT", "/api/v1/messages/not-an-id/read", None),
        (
            400,
            "messageId must be a serverMsgId (a UUID) or a numeric message id".into()
        )
    );
    assert_eq!(
        r("PUT", "/api/v1/notifications/x/read", None),
        (400, "notification id must be a number".into())
    );
    let long = "t".repeat(257);
    assert_eq!(
        r("GET", &format!("/api/v1/messages/threads/{long}"), None),
        (400, "path segment too long".into())
    );
    assert_eq!(
        r("GET", "/api/v1/messages/threads/%zz", None),
        (400, "bad percent-encoding in path".into())
    );
    assert_eq!(
        r(
            "POST",
            "/api/v1/messages/threads",
            Some("{\"participants\":")
        ),
        (400, "invalid JSON format".into())
    );
    assert_eq!(
        r("POST", "/api/v1/messages/threads", Some("[]")),
        (400, "the body must be a JSON object".into())
    );
    assert_eq!(
        r(
            "POST",
            "/api/v1/messages/threads",
            Some("{\"participants\":\"bob\"}")
        ),
        (
            400,
            "participants must be an array of user ids (strings of 1 to 256 bytes, or integers)"
                .into()
        )
    );
    assert_eq!(
        r(
            "POST",
            "/api/v1/messages/threads",
            Some("{\"title\":\"x\"}")
        ),
        (400, "participants is required".into())
    );
    assert_eq!(
        r(
            "POST",
            "/api/v1/messages/threads/t/messages",
            Some("{\"content\":5}")
        ),
        (400, "content must be a string".into())
    );
    assert_eq!(
        r("POST", "/api/v1/messages/threads/t/messages", Some("{}")),
        (400, "content is required".into())
    );
    let big = format!("{{\"content\":\"{}\"}}", "x".repeat(65));
    assert_eq!(
        r("POST", "/api/v1/messages/threads/t/messages", Some(&big)),
        (413, "message too large".into())
    );
    // A body over http_body_bytes_max is refused from the head, and the connection closes.
    let huge = format!("{{\"content\":\"{}\"}}", "x".repeat(5000));
    let mut c = HttpConn::open(&s);
    c.send(&request(
        "POST",
        "/api/v1/messages/threads/t/messages",
        &me,
        Some(&huge),
    ));
    let resp = c.response().expect("413");
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (413, r#"{"error":"request body too large"}"#)
    );
    assert!(c.closed_within(Duration::from_secs(3)));
    // Refusals keep the connection: several on one, in order.
    let mut c = HttpConn::open(&s);
    let mut raw = request("GET", "/api/v1/nope", &me, None);
    raw.extend(request("GET", "/api/v1/presence/user/bob", &me, None));
    c.send(&raw);
    assert_eq!(c.response().unwrap().status, 404);
    let resp = c.response().unwrap();
    assert_eq!(
        (resp.status, resp.header("connection")),
        (200, Some("keep-alive"))
    );
}

#[test]
fn cors_applies_to_the_rest_api() {
    let s = TestServer::start(&[("SWITCHBOARD_CORS_ORIGINS", "https://app.example")]);
    let origin = ("Origin", "https://app.example");
    let (r, _) = call(
        &s,
        "GET",
        "/api/v1/presence/online",
        &[origin, ("X-User-Id", "al")],
        None,
    );
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (200, Some("https://app.example"))
    );
    let (r, _) = call(&s, "GET", "/api/v1/presence/online", &[origin], None);
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (401, Some("https://app.example"))
    );
    let mut c = HttpConn::open(&s);
    c.send(&request(
        "OPTIONS",
        "/api/v1/messages/threads",
        &[
            origin,
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, x-user-id, content-type",
            ),
        ],
        None,
    ));
    let r = c.response().unwrap();
    assert_eq!(r.status, 204);
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("X-User-Id"));
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("PUT"));
}

fn server() -> TestServer {
    TestServer::start(&[
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "3s"),
    ])
}

fn device(s: &TestServer, user: &str, shard: u64) -> Client {
    s.connect_on_shard(&format!("/ws?user_id={user}"), shard)
}

fn set_status(c: &mut Client, status: &str, text: Option<&str>) {
    c.send_json(json!({"type": "presence.update", "id": "u", "status": status, "text": text}));
    let r = c.expect_type("presence.update");
    assert_eq!(r["data"]["status"], status, "{r}");
}

#[test]
fn presence_online_lists_visible_users_of_every_shard_in_id_order() {
    let s = server();
    let _a = device(&s, "ann", 0);
    let _a2 = device(&s, "ann", 1);
    let mut b = device(&s, "ben", 1);
    let mut c = device(&s, "cat", 0);
    let _d = device(&s, "dov", 1);
    set_status(&mut b, "away", Some("lunch"));
    set_status(&mut c, "invisible", None);
    let v = wait_for(
        &s,
        "zoe",
        "/api/v1/presence/online",
        "cat hidden, ben away",
        |v| online_ids(v) == ["ann", "ben", "dov"] && v["users"][1]["status"] == "away",
    );
    assert_eq!(v["next"], Value::Null);
    assert_eq!(
        v["users"][0],
        json!({"userId": "ann", "status": "online", "isOnline": true, "text": null, "devices": 2, "lastSeen": null})
    );
    assert_eq!(v["users"][1]["text"], "lunch");
    // Pages of two, then the rest; `next` is the last id of a page.
    let (_, p1) = call(
        &s,
        "GET",
        "/api/v1/presence/online?limit=2",
        &as_user("zoe"),
        None,
    );
    assert_eq!(
        (online_ids(&p1), &p1["next"]),
        (vec!["ann".to_string(), "ben".into()], &json!("ben"))
    );
    let (_, p2) = call(
        &s,
        "GET",
        "/api/v1/presence/online?limit=2&after=ben",
        &as_user("zoe"),
        None,
    );
    assert_eq!(
        (online_ids(&p2), &p2["next"]),
        (vec!["dov".to_string()], &Value::Null)
    );
    // One user: as presence.query answers, the invisible user seeing itself truly.
    let (_, v) = call(
        &s,
        "GET",
        "/api/v1/presence/user/cat",
        &as_user("zoe"),
        None,
    );
    assert_eq!(
        (&v["status"], &v["isOnline"], &v["devices"]),
        (&json!("offline"), &json!(false), &json!(0))
    );
    assert!(v["lastSeen"].is_string(), "{v}");
    let (_, v) = call(
        &s,
        "GET",
        "/api/v1/presence/user/cat",
        &as_user("cat"),
        None,
    );
    assert_eq!(
        (&v["status"], &v["devices"]),
        (&json!("invisible"), &json!(1))
    );
    let (_, v) = call(
        &s,
        "GET",
        "/api/v1/presence/user/nobody%20here",
        &as_user("zoe"),
        None,
    );
    assert_eq!(
        v,
        json!({"userId": "nobody here", "status": "offline", "isOnline": false, "text": null, "devices": 0, "lastSeen": null})
    );
    // A user whose last device left stays listed (0 devices) through the grace, then goes.
    drop(b);
    wait_for(
        &s,
        "zoe",
        "/api/v1/presence/online",
        "ben in the grace",
        |v| {
            v["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["userId"] == "ben" && u["devices"] == 0)
        },
    );
    wait_for(
        &s,
        "zoe",
        "/api/v1/presence/online",
        "ben gone after the grace",
        |v| !online_ids(v).contains(&"ben".to_string()),
    );
    let (_, v) = call(
        &s,
        "GET",
        "/api/v1/presence/user/ben",
        &as_user("zoe"),
        None,
    );
    assert_eq!(v["status"], "offline");
    assert!(v["lastSeen"].is_string(), "{v}");
}

#[test]
fn presence_follows_address_policy_claim() {
    let s = TestServer::start(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
        ("SWITCHBOARD_ADDRESS_POLICY", "claim"),
    ]);
    let token = |sub: &str, allowed: &[&str]| {
        jwt::hs256(&json!({"sub": sub, "exp": now_s() + 60, "allowed_users": allowed}))
    };
    let ws = |sub: &str| s.connect(&format!("/ws?token={}", token(sub, &[])));
    let (_a, _b, _c) = (ws("ann"), ws("ben"), ws("cat"));
    let bearer = format!("Bearer {}", token("zoe", &["ben", "cat", "dan"]));
    let auth = [("Authorization", bearer.as_str())];
    let (r, v) = call(&s, "GET", "/api/v1/presence/online", &auth, None);
    assert_eq!(r.status, 200);
    assert_eq!(online_ids(&v), ["ben", "cat"], "only allowed users");
    let (r, v) = call(&s, "GET", "/api/v1/presence/user/ben", &auth, None);
    assert_eq!((r.status, &v["status"]), (200, &json!("online")));
    assert_eq!(
        refused(&s, "GET", "/api/v1/presence/user/ann", &auth, None),
        (403, "not allowed".into())
    );
    let (r, _) = call(&s, "GET", "/api/v1/presence/user/zoe", &auth, None);
    assert_eq!(r.status, 200, "yourself is always allowed");
}
