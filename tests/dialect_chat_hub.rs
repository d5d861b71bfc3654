//! The chat hub (`seeds/002`, `docs/DIALECTS.md`) over real sockets, on its own path
//! `/ws/chat?token=<JWT>` with the default `ws_dialects`: a client that sends exactly the
//! frames of its document (`ping`, `typing`, `mark_read`) and checks every server frame of it
//! (`connected`, `pong`, `new_message`, `message_read`, `typing`) by value; the service-layer
//! flow (a backend sends over the REST API, the hub's clients get `new_message`; a REST read
//! gives them `message_read`); two devices of one user on different shards; the errors; a bad
//! or missing token refused with HTTP 401 on the upgrade; one encode per shard for a message
//! to several hub clients (`switchboard_dialect_encodes_total`). Users are numeric ("5", "6",
//! "7"), as the hub's are, so their ids come out as JSON numbers.

mod common;

use common::{jwt, now_ms, now_s, parse_rfc3339_ms, Client, HttpConn, TestServer};
use serde_json::{json, Value};

fn server() -> TestServer {
    let s = TestServer::start(&[
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
    ]);
    s.wait_ready();
    s
}

fn token(user: &str) -> String {
    jwt::hs256(&json!({"sub": user, "exp": now_s() + 600}))
}

/// The frame's `timestamp` is RFC 3339 UTC in whole seconds (`2025-11-21T13:00:00Z`, the
/// document's form) near now.
fn assert_hub_time(v: &Value, key: &str) {
    let ts = v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"));
    assert!(
        ts.len() == 20 && ts.ends_with('Z'),
        "{key} {ts} is not RFC 3339 in seconds"
    );
    let ms = parse_rfc3339_ms(ts).unwrap_or_else(|| panic!("not RFC 3339: {ts}"));
    let now = now_ms();
    assert!(
        ms < now + 30_000 && ms + 30_000 > now,
        "{ts} is not near now"
    );
}

/// The next frame; it must be a hub frame of `kind` with an RFC 3339 timestamp.
fn expect(c: &mut Client, kind: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], kind, "expected {kind}, got {v}");
    assert_hub_time(&v, "timestamp");
    assert!(v.get("data").is_none(), "native data leaked into {v}");
    v
}

/// `v` without its timestamp (checked by [`expect`]), for exact comparison.
fn body(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("timestamp");
    v
}

/// A hub client of `user` on `/ws/chat?token=` served by `shard`.
fn hub_on(s: &TestServer, user: &str, shard: u64) -> Client {
    let path = format!("/ws/chat?token={}", token(user));
    for _ in 0..64 {
        let (mut c, _) = s
            .try_connect_with(&path, &[], None)
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
        let w = expect(&mut c, "connected");
        let uid: Value = match user.parse::<u64>() {
            Ok(n) => json!(n),
            Err(_) => json!(user),
        };
        // The document's frame; `shard` only because the test server exposes it.
        assert_eq!(
            body(w.clone()),
            json!({"type": "connected", "user_id": uid, "shard": w["shard"]}),
            "{w}"
        );
        if w["shard"] == shard {
            c.welcome = w;
            return c;
        }
        c.close_and_wait();
    }
    panic!("no connection landed on shard {shard}");
}

/// `(status, body)` of one REST request as `user` (a bearer token, as jwt mode wants).
fn rest(s: &TestServer, method: &str, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
    let auth = format!("Bearer {}", token(user));
    common::http_json(
        s,
        method,
        path,
        &[("Authorization", &auth)],
        body.as_ref(),
        false,
    )
}

/// A thread of `creator` and `others` over REST: `(text id, numeric id)`.
fn thread(s: &TestServer, creator: &str, others: &[&str]) -> (String, u64) {
    let (st, t) = rest(
        s,
        "POST",
        "/api/v1/messages/threads",
        creator,
        Some(json!({"participants": others})),
    );
    assert!(st == 201 || st == 200, "{st} {t}");
    (
        t["id"].as_str().unwrap().to_owned(),
        t["numericId"].as_u64().unwrap(),
    )
}

/// The backend's send: `POST .../threads/:n/messages` as `user`; the stored message.
fn backend_send(s: &TestServer, user: &str, chat: u64, content: &str) -> Value {
    let (st, m) = rest(
        s,
        "POST",
        &format!("/api/v1/messages/threads/{chat}/messages"),
        user,
        Some(json!({"content": content})),
    );
    assert_eq!(st, 201, "{m}");
    m
}

/// The `created_at` a hub client gets for a stored message: its `sentAt` in whole seconds.
fn created_at(m: &Value) -> String {
    let t = m["sentAt"].as_str().unwrap();
    format!("{}Z", &t[..19])
}

fn new_message(m: &Value, chat: u64, sender: Value, receiver: Value, content: &str) -> Value {
    json!({"type": "new_message", "chat_id": chat,
           "message": {"id": m["id"], "chat_id": chat, "sender_id": sender,
                       "receiver_id": receiver, "content": content,
                       "created_at": created_at(m)}})
}

fn silent(clients: &mut [&mut Client]) {
    for c in clients {
        c.expect_silence(200);
    }
}

#[test]
fn connected_ping_and_errors() {
    let s = server();
    let mut c = hub_on(&s, "6", 0);
    c.send_json(json!({"type": "ping"}));
    let p = expect(&mut c, "pong");
    assert_eq!(body(p), json!({"type": "pong"}));
    // A user id that is not a number stays a string.
    let mut a = hub_on(&s, "alice", 1);
    a.send_json(json!({"type": "ping"}));
    expect(&mut a, "pong");
    // Errors in the hub's shape: {type: error, error, timestamp}.
    for (frame, text) in [
        ("{not json", "invalid JSON format"),
        (
            r#"{"type":"typing","is_typing":true}"#,
            "chat_id is required",
        ),
        (
            r#"{"type":"typing","chat_id":1.5,"is_typing":true}"#,
            "chat_id must be a number or a string",
        ),
        (
            r#"{"type":"typing","chat_id":3,"is_typing":"yes"}"#,
            "is_typing must be true or false",
        ),
        (r#"{"type":"mark_read"}"#, "message_id is required"),
        (r#"{"type":"weather"}"#, "unknown message type"),
        // A chat that does not exist, a message that does not exist.
        (
            r#"{"type":"typing","chat_id":999999,"is_typing":true}"#,
            "conversation not found",
        ),
        (
            r#"{"type":"mark_read","message_id":999999}"#,
            "message not found",
        ),
    ] {
        c.send_text(frame);
        let e = expect(&mut c, "error");
        assert_eq!(body(e), json!({"type": "error", "error": text}), "{frame}");
    }
}

#[test]
fn a_bad_token_is_refused_on_the_upgrade() {
    let s = server();
    for (path, text) in [
        ("/ws/chat?token=not-a-jwt".to_owned(), "malformed token"),
        (
            format!(
                "/ws/chat?token={}",
                jwt::hs256(&json!({"sub": "6", "exp": now_s() - 3600}))
            ),
            "token expired",
        ),
        (
            format!(
                "/ws/chat?token={}",
                jwt::hs(
                    jsonwebtoken::Algorithm::HS256,
                    b"another-secret-0123456789abcdef0123",
                    &json!({"sub": "6", "exp": now_s() + 600})
                )
            ),
            "invalid token signature",
        ),
        // No token at all: the hub's clients cannot authenticate in-band.
        (
            "/ws/chat".to_owned(),
            "token is required: send ?token=<jwt>",
        ),
    ] {
        match s.try_connect_with(&path, &[], None) {
            Ok(_) => panic!("{path} was upgraded"),
            Err(r) => {
                assert_eq!(r.status, 401, "{}", r.body);
                assert_eq!(
                    serde_json::from_str::<Value>(&r.body).unwrap(),
                    json!({"error": text})
                );
            }
        }
    }
    // The native path still lets a client without a token authenticate in-band.
    let (mut c, _) = s
        .try_connect_with("/ws", &[], None)
        .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
    assert_eq!(c.expect_type("connected")["data"]["user_id"], Value::Null);
}

/// The service-layer flow of the document: a backend sends a message through the REST API
/// and the hub's clients of the chat get `new_message`; a REST read gives them `message_read`.
#[test]
fn backend_sends_and_reads_over_rest() {
    let s = server();
    let (_, chat) = thread(&s, "5", &["6"]);
    let mut five = hub_on(&s, "5", 0);
    let mut six = hub_on(&s, "6", 1);
    let m = backend_send(&s, "5", chat, "Hello!");
    assert_eq!(m["threadNumericId"], chat);
    let want = new_message(&m, chat, json!(5), json!(6), "Hello!");
    // Every device of every participant, the sender's own included (REST is no device).
    for c in [&mut six, &mut five] {
        let v = expect(c, "new_message");
        assert_eq!(body(v), want);
    }
    // Bob's side reads it over REST: the sender's devices and the reader's get message_read.
    let (st, t) = rest(
        &s,
        "PUT",
        &format!("/api/v1/messages/{}/read", m["id"]),
        "6",
        None,
    );
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["unreadCount"], 0);
    let want = json!({"type": "message_read", "chat_id": chat, "message_id": m["id"],
                      "read_by": 6});
    for c in [&mut five, &mut six] {
        let v = expect(c, "message_read");
        assert_eq!(body(v), want);
    }
    // By its serverMsgId it is the same message, numeric on the hub's side.
    let sid = m["serverMsgId"].as_str().unwrap();
    let (st, _) = rest(
        &s,
        "PUT",
        &format!("/api/v1/messages/{sid}/read"),
        "6",
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(body(expect(&mut five, "message_read")), want);
    assert_eq!(body(expect(&mut six, "message_read")), want);

    // A group chat: no receiver (see docs/DIALECTS.md).
    let (_, group) = thread(&s, "5", &["6", "7"]);
    let mut seven = hub_on(&s, "7", 0);
    let g = backend_send(&s, "6", group, "to everyone");
    let want = new_message(&g, group, json!(6), Value::Null, "to everyone");
    for c in [&mut five, &mut six, &mut seven] {
        assert_eq!(body(expect(c, "new_message")), want);
    }
    silent(&mut [&mut five, &mut six, &mut seven]);
}

/// A native client's DM and a hub client in the same conversation: the hub client gets it in
/// its own shape, and its `typing` and `mark_read` reach the native client natively.
#[test]
fn native_and_hub_clients_share_a_conversation() {
    let s = server();
    let mut native = {
        let path = format!("/ws?token={}", token("5"));
        s.connect_on_shard(&path, 1)
    };
    let mut six = hub_on(&s, "6", 0);
    native.send_json(
        json!({"type": "message.send", "clientMsgId": "c-1", "to": "6",
                            "content": "hi six"}),
    );
    let ack = native.expect_type("message.ack")["data"].clone();
    let chat = ack["conversationNumericId"]
        .as_u64()
        .expect("numeric id in the ack");
    let v = expect(&mut six, "new_message");
    assert_eq!(v["chat_id"], chat);
    assert_eq!(
        v["message"],
        json!({"id": ack["cursor"], "chat_id": chat, "sender_id": 5, "receiver_id": 6,
               "content": "hi six", "created_at": format!("{}Z", &ack["sentAt"].as_str().unwrap()[..19])})
    );
    six.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": true}));
    let t = native.expect_type("typing.start");
    assert_eq!(t["data"]["user_id"], "6");
    assert_eq!(t["data"]["conversationNumericId"], chat);
    six.send_json(json!({"type": "mark_read", "message_id": ack["cursor"]}));
    let r = native.expect_type("message.read");
    assert_eq!(r["data"]["messageIds"], json!([ack["cursor"]]));
    assert_eq!(r["data"]["by"], "6");
    // Native typing and receipts reach the hub client in its shape; delivery receipts, which
    // the hub has no frame for, do not.
    native.send_json(json!({"type": "typing.start", "to": "6"}));
    let t = expect(&mut six, "typing");
    assert_eq!(t["user_id"], 5);
    assert_eq!(t["is_typing"], true);
    assert_eq!(t["chat_id"], ack["conversationId"], "{t}");
    native.send_json(
        json!({"type": "mark.delivered", "conversationId": chat.to_string(),
                            "messageIds": [ack["cursor"]]}),
    );
    native.send_json(
        json!({"type": "mark.read", "conversationId": chat.to_string(),
                            "messageIds": [ack["serverMsgId"]]}),
    );
    let r = expect(&mut six, "message_read");
    assert_eq!(
        body(r),
        json!({"type": "message_read", "chat_id": chat, "message_id": ack["serverMsgId"],
               "read_by": 5})
    );
    silent(&mut [&mut six]);
}

/// Every client frame of the document, from a user with two devices on different shards: the
/// other participant and the user's other device get the events; the sending device does not.
#[test]
fn typing_and_mark_read_across_shards_and_devices() {
    let s = server();
    let (text_id, chat) = thread(&s, "5", &["6"]);
    let mut five = hub_on(&s, "5", 0);
    let mut six_a = hub_on(&s, "6", 1);
    let mut six_b = hub_on(&s, "6", 0);

    // {"type": "typing", "chat_id": 123, "is_typing": true}
    five.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": true}));
    let want = json!({"type": "typing", "chat_id": chat, "user_id": 5, "is_typing": true});
    for c in [&mut six_a, &mut six_b] {
        assert_eq!(body(expect(c, "typing")), want);
    }
    five.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": false}));
    let stop = json!({"type": "typing", "chat_id": chat, "user_id": 5, "is_typing": false});
    for c in [&mut six_a, &mut six_b] {
        assert_eq!(body(expect(c, "typing")), stop);
    }
    // One device of six types: the other participant and six's other device see it.
    six_a.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": true}));
    let want = json!({"type": "typing", "chat_id": chat, "user_id": 6, "is_typing": true});
    for c in [&mut five, &mut six_b] {
        assert_eq!(body(expect(c, "typing")), want);
    }
    // The chat by its text id is the same chat (and the same typing state: no second start).
    six_a.send_json(json!({"type": "typing", "chat_id": text_id, "is_typing": false}));
    six_a.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": false}));
    let stop = json!({"type": "typing", "chat_id": chat, "user_id": 6, "is_typing": false});
    for c in [&mut five, &mut six_b] {
        assert_eq!(body(expect(c, "typing")), stop);
    }
    silent(&mut [&mut five, &mut six_a, &mut six_b]);

    // {"type": "mark_read", "message_id": 456}
    let m = backend_send(&s, "5", chat, "read me");
    for c in [&mut five, &mut six_a, &mut six_b] {
        expect(c, "new_message");
    }
    six_b.send_json(json!({"type": "mark_read", "message_id": m["id"]}));
    let want = json!({"type": "message_read", "chat_id": chat, "message_id": m["id"],
                      "read_by": 6});
    for c in [&mut five, &mut six_a] {
        assert_eq!(body(expect(c, "message_read")), want);
    }
    silent(&mut [&mut six_b]);
    // It is recorded: six has nothing unread.
    let (st, t) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{chat}"),
        "6",
        None,
    );
    assert_eq!((st, &t["unreadCount"]), (200, &json!(0)), "{t}");
    // Somebody outside the chat may neither type nor read in it.
    let mut eight = hub_on(&s, "8", 1);
    eight.send_json(json!({"type": "typing", "chat_id": chat, "is_typing": true}));
    assert_eq!(
        body(expect(&mut eight, "error")),
        json!({"type": "error", "error": "not a participant of this conversation"})
    );
    eight.send_json(json!({"type": "mark_read", "message_id": m["id"]}));
    assert_eq!(
        body(expect(&mut eight, "error")),
        json!({"type": "error", "error": "not a participant of this conversation"})
    );
    silent(&mut [&mut five, &mut six_a, &mut six_b]);
}

/// `switchboard_dialect_encodes_total` once it has stopped moving (published every 250 ms).
fn settled_encodes(s: &TestServer) -> u64 {
    let read = || {
        let (_, text) = s.http_get("/metrics");
        common::metric(&text, "switchboard_dialect_encodes_total").unwrap_or(0)
    };
    let mut last = read();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(600));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A message to three hub clients on two shards is encoded into the hub's shape once per
/// shard, not once per recipient.
#[test]
fn one_encode_per_shard_not_per_recipient() {
    let s = server();
    let (_, group) = thread(&s, "5", &["6", "7"]);
    let mut five = hub_on(&s, "5", 0);
    let mut six = hub_on(&s, "6", 0);
    let mut seven = hub_on(&s, "7", 1);
    let before = settled_encodes(&s);
    let m = backend_send(&s, "5", group, "once");
    let want = new_message(&m, group, json!(5), Value::Null, "once");
    for c in [&mut five, &mut six, &mut seven] {
        assert_eq!(body(expect(c, "new_message")), want);
    }
    assert_eq!(settled_encodes(&s), before + 2);
}

/// The hub's own deployment settings, as its document writes them (`AUTH_ENABLED=true`,
/// `AUTH_SERVICE_URL`, `AUTH_TIMEOUT`, `HTTP_PORT`): every upgrade is checked by its auth
/// service, and its backend, holding the server API key, sends a message for user 5 over REST
/// (`X-API-Key` + `X-User-Id`), which reaches the chat's hub clients as `new_message`.
#[test]
fn the_hubs_own_settings_and_its_backend() {
    use common::http_stub::{Reply, Stub};
    let auth = Stub::start(|_, body| {
        let v: Value = serde_json::from_str(body).unwrap();
        match v["token"].as_str().and_then(|t| t.strip_prefix("tok-")) {
            Some(user) => Reply::json(200, &json!({"user_id": user}).to_string()),
            None => Reply::json(401, r#"{"error":"no"}"#),
        }
    });
    let auth_url = auth.url("/validate");
    let s = TestServer::start_port_as(
        "HTTP_PORT",
        &[
            ("AUTH_ENABLED", "true"),
            ("AUTH_SERVICE_URL", auth_url.as_str()),
            ("AUTH_TIMEOUT", "10s"),
            ("SWITCHBOARD_API_KEY", "backend-key"),
        ],
    );
    s.wait_ready();
    // A bad token never connects.
    let r = s.raw_upgrade("/ws/chat?token=nope", &[]);
    assert_eq!(r.status, 401, "{}", r.body);
    // The backend creates the chat of 5 and 6, as 5.
    let backend = |method: &str, path: &str, body: &str| {
        let body: Value = serde_json::from_str(body).unwrap();
        let headers = [("X-API-Key", "backend-key"), ("X-User-Id", "5")];
        common::http_json(&s, method, path, &headers, Some(&body), true)
    };
    let (st, t) = backend(
        "POST",
        "/api/v1/messages/threads",
        r#"{"participants":["6"]}"#,
    );
    assert_eq!(st, 201, "{t}");
    let chat_id = t["numericId"].as_u64().unwrap();
    let (mut six, _) = s
        .try_connect_with("/ws/chat?token=tok-6", &[], None)
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.body));
    let w = six.recv_json();
    assert_eq!(w["type"], "connected");
    assert_eq!(w["user_id"], 6, "{w}");
    let (st, m) = backend(
        "POST",
        &format!("/api/v1/messages/threads/{chat_id}/messages"),
        r#"{"content":"Hello!"}"#,
    );
    assert_eq!(st, 201, "{m}");
    let n = six.recv_json();
    assert_eq!(n["type"], "new_message", "{n}");
    assert_eq!(n["chat_id"], chat_id);
    assert_eq!(n["message"]["sender_id"], 5);
    assert_eq!(n["message"]["content"], "Hello!");
    assert_eq!(n["message"]["id"], m["id"]);
    // Without the key, REST in service mode is refused.
    let mut c = HttpConn::open(&s);
    c.send(b"GET /api/v1/messages/threads HTTP/1.1\r\nHost: t\r\nX-User-Id: 5\r\n\r\n");
    assert_eq!(c.response().expect("a response").status, 401);
}
