//! The messaging service's protocol (`seeds/004`, `docs/DIALECTS.md`, its messaging service section) over real
//! sockets, on its own path `/api/v1/ws?token=<JWT>` with the default `ws_dialects`: a client
//! that sends exactly the frames of its document (`message`, `typing`, `read`, `ping`) and
//! checks every server frame of it (`message` as the REST message object, `typing`, `read`,
//! `presence` to thread co-participants without any watch, `notification` as the REST
//! notification object, `pong` in Unix seconds, and `error`). Threads are created over REST;
//! messages come from messaging clients, native clients and REST. Senders and recipients sit
//! on different shards.

mod common;

use common::{jwt, now_s, Client, TestServer};
use serde_json::{json, Value};

const KEY: &str = "api-key-msg";

fn server() -> TestServer {
    let s = TestServer::start(&[
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
        ("SWITCHBOARD_API_KEY", KEY),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "1s"),
    ]);
    s.wait_ready();
    s
}

fn token(user: &str) -> String {
    jwt::hs256(&json!({"sub": user, "exp": now_s() + 600}))
}

/// `(status, body)` of one REST request as `user` (its token as `Authorization: Bearer`).
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

/// A server API call (`X-API-Key`).
fn api_post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    common::http_json(s, "POST", path, &[("X-API-Key", KEY)], Some(&body), true)
}

/// A thread created over REST by `creator` with `others`: its (text id, numeric id).
fn thread(s: &TestServer, creator: &str, others: &[&str], title: &str) -> (String, u64) {
    let (st, t) = rest(
        s,
        "POST",
        "/api/v1/messages/threads",
        creator,
        Some(json!({"participants": others, "title": title})),
    );
    assert_eq!(st, 201, "{t}");
    (
        t["id"].as_str().unwrap().to_owned(),
        t["numericId"].as_u64().unwrap(),
    )
}

/// The `presence.state` answers so far (the watch each messaging connection makes on open).
fn watches_answered(s: &TestServer) -> u64 {
    let (_, text) = s.http_get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_presence_queries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The next frame must be `{type: kind, payload}` and nothing else; returns the payload.
fn expect(c: &mut Client, kind: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], kind, "expected {kind}, got {v}");
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        keys.len(),
        2,
        "not the service's envelope {{type, payload}}: {v}"
    );
    v["payload"].clone()
}

/// A messaging client of `user` on `shard`, its open-time watch answered (so presence frames
/// come in a known order). `connected` is not a frame of this service: only `expose_shard`
/// (set here) makes the server send one, so the test can place connections.
fn messaging_on(s: &TestServer, user: &str, shard: u64) -> Client {
    for _ in 0..64 {
        let before = watches_answered(s);
        let path = format!("/api/v1/ws?token={}", token(user));
        let (mut c, _) = s
            .try_connect_with(&path, &[], None)
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
        let w = expect(&mut c, "connected");
        let expect_id: Value = match user.parse::<u64>() {
            Ok(n) => json!(n),
            Err(_) => json!(user),
        };
        assert_eq!(w["userId"], expect_id, "{w}");
        s.wait_metrics("the open-time presence watch answered", |_| {
            watches_answered(s) > before
        });
        if w["shard"] == shard {
            return c;
        }
        c.close_and_wait();
    }
    panic!("no connection landed on shard {shard}");
}

fn send(c: &mut Client, kind: &str, payload: Value) {
    c.send_json(json!({"type": kind, "payload": payload}));
}

/// `message` frames from a messaging client, a native client and REST reach every messaging
/// participant as the REST message object (byte for byte the values REST lists), the
/// messaging sender included (its ack becomes its message).
#[test]
fn messages_reach_everyone_as_the_rest_object() {
    let s = server();
    let (t, n) = thread(&s, "1", &["2", "3"], "Logo redesign");
    let mut m1 = messaging_on(&s, "1", 0);
    let mut m2 = messaging_on(&s, "2", 1);
    // Presence comes too: everyone here shares the thread.
    assert_eq!(
        expect(&mut m1, "presence"),
        json!({"userId": 2, "isOnline": true})
    );
    assert_eq!(
        expect(&mut m2, "presence"),
        json!({"userId": 1, "isOnline": true})
    );
    let mut m3 = messaging_on(&s, "3", 0);
    assert_eq!(
        expect(&mut m1, "presence"),
        json!({"userId": 3, "isOnline": true})
    );
    assert_eq!(
        expect(&mut m2, "presence"),
        json!({"userId": 3, "isOnline": true})
    );
    assert_eq!(
        expect(&mut m3, "presence"),
        json!({"userId": 1, "isOnline": true})
    );
    assert_eq!(
        expect(&mut m3, "presence"),
        json!({"userId": 2, "isOnline": true})
    );

    // The document's frame, exactly.
    m1.send_text(&format!(
        r#"{{"type": "message", "payload": {{"threadId": "{t}", "body": "Hello!"}}}}"#
    ));
    let own = expect(&mut m1, "message");
    let at2 = expect(&mut m2, "message");
    let at3 = expect(&mut m3, "message");
    assert_eq!(own, at2);
    assert_eq!(own, at3);
    let (st, list) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{t}/messages"),
        "2",
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(list["messages"][0], own, "the REST object, field for field");
    assert_eq!(own["threadId"], t.as_str());
    assert_eq!(own["threadNumericId"], n);
    assert_eq!(own["senderId"], "1");
    assert_eq!(own["recipientId"], Value::Null);
    assert_eq!(own["content"], "Hello!");
    assert_eq!(own["seq"], 1);
    common::assert_uuid(&own["clientMsgId"]);

    // With the client's own clientMsgId. (By the numeric thread id a `message` is refused
    // today: native `message.send` does not resolve an all-digit conversationId; see
    // docs/DIALECTS.md, the messaging service.)
    send(
        &mut m2,
        "message",
        json!({"threadId": t, "body": "by number", "clientMsgId": "m2-1"}),
    );
    let own = expect(&mut m2, "message");
    assert_eq!(own["threadId"], t.as_str());
    assert_eq!(own["clientMsgId"], "m2-1");
    assert_eq!(own["seq"], 2);
    assert_eq!(expect(&mut m1, "message"), own);
    assert_eq!(expect(&mut m3, "message"), own);

    // From REST: every participant's socket, the sender's own included.
    let (st, body) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{t}/messages"),
        "3",
        Some(json!({"content": "from rest"})),
    );
    assert_eq!(st, 201, "{body}");
    for c in [&mut m1, &mut m2, &mut m3] {
        assert_eq!(expect(c, "message"), body);
    }

    // From a native client of user 2 (another device of m2's user).
    let mut native = s.connect_on_shard(&format!("/ws?token={}", token("2")), 1);
    native.send_json(json!({"type": "message.send", "clientMsgId": "n-1",
                            "conversationId": t, "content": "native"}));
    let ack = native.expect_type("message.ack");
    assert_eq!(ack["data"]["from"], "2");
    assert_eq!(ack["data"]["to"], Value::Null);
    let at1 = expect(&mut m1, "message");
    assert_eq!(at1["content"], "native");
    assert_eq!(at1["serverMsgId"], ack["data"]["serverMsgId"]);
    assert_eq!(expect(&mut m2, "message"), at1);
    assert_eq!(expect(&mut m3, "message"), at1);
    let (_, list) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{t}/messages?limit=1"),
        "1",
        None,
    );
    assert_eq!(list["messages"][0], at1);
    m1.expect_silence(200);
}

/// A two-person thread: both sides get the same object. (`recipientId` is `null` for a
/// message sent by thread id: native `message.send` without `to` does not fill it in a direct
/// thread as REST does; see docs/DIALECTS.md, the messaging service.)
#[test]
fn direct_threads() {
    let s = server();
    let (t, _) = thread(&s, "alice", &["bob"], "");
    let mut a = messaging_on(&s, "alice", 0);
    let mut b = messaging_on(&s, "bob", 1);
    assert_eq!(
        expect(&mut a, "presence"),
        json!({"userId": "bob", "isOnline": true})
    );
    assert_eq!(
        expect(&mut b, "presence"),
        json!({"userId": "alice", "isOnline": true})
    );
    send(&mut a, "message", json!({"threadId": t, "body": "hi bob"}));
    let own = expect(&mut a, "message");
    assert_eq!(own["senderId"], "alice");
    assert_eq!(own["content"], "hi bob");
    assert_eq!(expect(&mut b, "message"), own);
    // bob answers over REST, which names alice as the recipient.
    let (st, body) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{t}/messages"),
        "bob",
        Some(json!({"content": "hi alice"})),
    );
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["recipientId"], "alice");
    assert_eq!(expect(&mut a, "message"), body);
    assert_eq!(expect(&mut b, "message"), body);
}

#[test]
fn typing_read_and_ping() {
    let s = server();
    let (t, n) = thread(&s, "1", &["2", "3"], "");
    let mut m1 = messaging_on(&s, "1", 0);
    let mut m2 = messaging_on(&s, "2", 1);
    expect(&mut m1, "presence");
    expect(&mut m2, "presence");
    let mut m3 = messaging_on(&s, "3", 1);
    for c in [&mut m1, &mut m2] {
        expect(c, "presence");
    }
    expect(&mut m3, "presence");
    expect(&mut m3, "presence");

    m1.send_text(&format!(
        r#"{{"type": "typing", "payload": {{"threadId": "{t}", "isTyping": true}}}}"#
    ));
    for c in [&mut m2, &mut m3] {
        assert_eq!(
            expect(c, "typing"),
            json!({"threadId": t, "userId": 1, "isTyping": true})
        );
    }
    // By numeric id: the same thread, named by its text id.
    send(&mut m1, "typing", json!({"threadId": n, "isTyping": false}));
    // (a start by text id and a stop by numeric id are two states: the stop has none to end)
    send(&mut m1, "typing", json!({"threadId": t, "isTyping": false}));
    for c in [&mut m2, &mut m3] {
        assert_eq!(
            expect(c, "typing"),
            json!({"threadId": t, "userId": 1, "isTyping": false})
        );
    }
    m1.expect_silence(200);

    send(
        &mut m1,
        "message",
        json!({"threadId": t, "body": "read me"}),
    );
    let msg = expect(&mut m1, "message");
    expect(&mut m2, "message");
    expect(&mut m3, "message");
    m2.send_text(&format!(
        r#"{{"type": "read", "payload": {{"threadId": "{t}", "messageId": {}}}}}"#,
        msg["serverMsgId"]
    ));
    for c in [&mut m1, &mut m3] {
        assert_eq!(
            expect(c, "read"),
            json!({"threadId": t, "messageId": msg["serverMsgId"], "userId": 2})
        );
    }
    // The numeric id, as a number, without the thread.
    send(&mut m3, "read", json!({"messageId": msg["id"]}));
    for c in [&mut m1, &mut m2] {
        assert_eq!(
            expect(c, "read"),
            json!({"threadId": t, "messageId": msg["id"], "userId": 3})
        );
    }
    let (_, th) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{t}"),
        "2",
        None,
    );
    assert_eq!(th["readSeq"], 1, "the read is stored: {th}");

    m1.send_text(r#"{"type": "ping", "payload": null}"#);
    let pong = expect(&mut m1, "pong");
    let secs = pong
        .as_u64()
        .unwrap_or_else(|| panic!("pong payload {pong}"));
    assert!(secs + 30 > now_s() && secs < now_s() + 30, "{secs}");
}

/// Presence goes to the users who share a thread, without any watch; others hear nothing.
#[test]
fn presence_to_thread_co_participants() {
    let s = server();
    thread(&s, "1", &["2"], "");
    let mut m1 = messaging_on(&s, "1", 0);
    let mut lone = messaging_on(&s, "9", 1);
    let m2 = messaging_on(&s, "2", 1);
    assert_eq!(
        expect(&mut m1, "presence"),
        json!({"userId": 2, "isOnline": true})
    );
    m2.close_and_wait();
    assert_eq!(
        expect(&mut m1, "presence"),
        json!({"userId": 2, "isOnline": false})
    );
    lone.expect_silence(300);
    m1.expect_silence(200);
}

/// Notifications: a stored one (the server API's, as Kafka's are) as the REST notification
/// object; a backend's own `notification` frame with its data as written.
#[test]
fn notifications() {
    let s = server();
    let mut m2 = messaging_on(&s, "2", 1);
    let (st, n) = api_post(
        &s,
        "/api/users/2/notifications",
        json!({"kind": "proposals.submitted", "data": {"proposalId": 5512, "jobId": 731}}),
    );
    assert_eq!(st, 201, "{n}");
    let got = expect(&mut m2, "notification");
    let (_, list) = rest(&s, "GET", "/api/v1/notifications", "2", None);
    assert_eq!(got, list["notifications"][0], "the REST object");
    assert_eq!(got["id"], n["notificationId"]);
    assert_eq!(got["kind"], "proposals.submitted");
    assert_eq!(got["read"], false);
    let (st, _) = api_post(
        &s,
        "/api/users/2/send",
        json!({"type": "notification", "data": {"kind": "job.posted", "id": 42}}),
    );
    assert_eq!(st, 200);
    assert_eq!(
        expect(&mut m2, "notification"),
        json!({"kind": "job.posted", "id": 42})
    );
}

#[test]
fn errors_in_the_services_envelope() {
    let s = server();
    let (t, _) = thread(&s, "1", &["2"], "");
    let (other, _) = thread(&s, "5", &["6"], "");
    let mut m1 = messaging_on(&s, "1", 0);
    let err = |c: &mut Client| expect(c, "error");
    m1.send_text("{not json");
    assert_eq!(err(&mut m1), json!({"error": "invalid JSON format"}));
    send(&mut m1, "weather", json!({}));
    assert_eq!(err(&mut m1), json!({"error": "unknown message type"}));
    send(&mut m1, "message", json!({"body": "x"}));
    assert_eq!(err(&mut m1), json!({"error": "threadId is required"}));
    send(
        &mut m1,
        "message",
        json!({"threadId": "nope", "body": "x", "clientMsgId": "e-1"}),
    );
    assert_eq!(
        err(&mut m1),
        json!({"error": "conversation not found", "clientMsgId": "e-1"})
    );
    send(
        &mut m1,
        "message",
        json!({"threadId": other, "body": "x", "clientMsgId": "e-2"}),
    );
    assert_eq!(
        err(&mut m1),
        json!({"error": "not a participant of this conversation", "clientMsgId": "e-2"})
    );
    send(&mut m1, "message", json!({"threadId": t, "body": ""}));
    let e = err(&mut m1);
    assert_eq!(e["error"], "content is required", "{e}");
    send(
        &mut m1,
        "typing",
        json!({"threadId": "nope", "isTyping": true}),
    );
    assert_eq!(err(&mut m1), json!({"error": "conversation not found"}));
    send(
        &mut m1,
        "read",
        json!({"threadId": other, "messageId": "x"}),
    );
    assert_eq!(
        err(&mut m1),
        json!({"error": "not a participant of this conversation"})
    );
    // After every refusal the connection still sends.
    send(
        &mut m1,
        "message",
        json!({"threadId": t, "body": "still here"}),
    );
    assert_eq!(expect(&mut m1, "message")["content"], "still here");
    // A bad token is refused at the upgrade.
    let r = s
        .try_connect_with("/api/v1/ws?token=nope", &[], None)
        .err()
        .expect("refused");
    assert_eq!(r.status, 401);
}

/// Without a token on the upgrade, an in-band `authenticate` (a lifted native command) gives
/// the connection its user, and the open-time watch runs then.
#[test]
fn the_watch_runs_after_in_band_authentication() {
    let s = server();
    thread(&s, "1", &["2"], "");
    let mut m2 = messaging_on(&s, "2", 1);
    let (mut c, _) = s
        .try_connect_with("/api/v1/ws", &[], None)
        .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
    assert_eq!(expect(&mut c, "connected")["userId"], Value::Null);
    send(&mut c, "authenticate", json!({"token": token("1")}));
    let ok = expect(&mut c, "auth.success");
    assert_eq!(ok["user_id"], "1");
    assert_eq!(
        expect(&mut c, "presence"),
        json!({"userId": 2, "isOnline": true})
    );
    assert_eq!(
        expect(&mut m2, "presence"),
        json!({"userId": 1, "isOnline": true})
    );
}
