//! The topic protocol (`seeds/003`, `docs/DIALECTS.md`) over real sockets: a client that
//! sends exactly the frames of its document and checks what comes back, for every client type
//! of its table (ping, authenticate, subscribe, unsubscribe, presence.update, presence.query,
//! typing.start/stop, mark.read/delivered, call.offer/answer/ice/hangup), the server types
//! they cause (connected, auth.success/failed, subscribed, unsubscribed, presence.*,
//! typing.*, message.new/read/delivered, call.*, error), detection on `/ws`, and topic
//! filtering. Senders and recipients sit on different shards.

mod common;

use std::time::Duration;

use common::{jwt, now_ms, parse_rfc3339_ms, Client, Event, TestServer};
use serde_json::{json, Value};

fn server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_WS_PATHS", "/ws,/topic"),
        ("SWITCHBOARD_WS_DIALECTS", "/ws=auto,/topic=topic"),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

/// The frame's `timestamp` is RFC 3339 near now (the topic envelope's, not Unix ms).
fn assert_rfc3339(v: &Value) {
    let ts = v["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no string timestamp in {v}"));
    let ms = parse_rfc3339_ms(ts).unwrap_or_else(|| panic!("not RFC 3339: {ts}"));
    let now = now_ms();
    assert!(
        ms + 30_000 > now && ms < now + 30_000,
        "{ts} is not near now"
    );
}

/// The next frame must be a topic envelope of `kind`; returns it.
fn expect(c: &mut Client, kind: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], kind, "expected {kind}, got {v}");
    assert_rfc3339(&v);
    assert!(v.get("payload").is_some(), "no payload in {v}");
    assert!(v.get("id").is_some(), "no id in {v}");
    assert!(v.get("data").is_none(), "native data leaked into {v}");
    v
}

/// A topic client on `/topic` on `shard`: its `connected` is in the topic shape.
fn topic_on(s: &TestServer, user: &str, shard: u64) -> Client {
    for _ in 0..64 {
        let (mut c, _) = s
            .try_connect_with(&format!("/topic?user_id={user}"), &[], None)
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
        let w = expect(&mut c, "connected");
        common::assert_uuid(&w["id"]);
        assert_eq!(w["payload"]["user_id"], user, "{w}");
        assert_eq!(w["payload"]["message"], "Connected to WebSocket server");
        if w["payload"]["shard"] == shard {
            c.client_id = w["payload"]["client_id"].as_str().unwrap().to_owned();
            c.welcome = w;
            return c;
        }
        c.close_and_wait();
    }
    panic!("no connection landed on shard {shard}");
}

fn send(c: &mut Client, id: &str, kind: &str, payload: Value) {
    c.send_json(json!({"id": id, "type": kind, "payload": payload,
                       "timestamp": "2025-11-21T13:00:00Z"}));
}

fn subscribe(c: &mut Client, id: &str, topics: &[&str], filters: Value) -> Value {
    send(
        c,
        id,
        "subscribe",
        json!({"topics": topics, "filters": filters}),
    );
    let v = expect(c, "subscribed");
    assert_eq!(v["id"], id);
    v
}

/// The document's own client: connects to `/ws?user_id=`, sends its ping and its subscribe
/// (auto-detected: the envelope carries `payload`), and reads the answers in its shape.
#[test]
fn the_documents_client_on_ws() {
    let s = server(&[]);
    let user = "7d9f3c2e-1b4a-4c5d-9e8f-0a1b2c3d4e5f";
    let mut c = s.connect(&format!("/ws?user_id={user}"));
    // Undecided until the first frame: the greeting is the native one.
    assert_eq!(c.welcome["data"]["user_id"], user);
    c.send_json(json!({"id": "msg_1", "type": "ping", "payload": {},
                       "timestamp": "2025-11-21T13:00:00.000Z"}));
    let pong = expect(&mut c, "pong");
    assert_eq!(pong["id"], "msg_1");
    assert_eq!(pong["payload"], json!({}));
    // The document's subscribe, as written.
    c.send_json(json!({"id": "msg_2", "type": "subscribe",
                       "payload": {"topics": ["conversation", "presence"],
                                   "filters": {"conversation_id": "conv-1"}}}));
    let sub = expect(&mut c, "subscribed");
    assert_eq!(sub["id"], "msg_2");
    assert_eq!(
        sub["payload"],
        json!({"topics": ["conversation", "presence"], "active": ["conversation", "presence"]})
    );
    // `presence` without a user filter watches the users this one shares a stored
    // conversation with: none yet, so the watch's answer has no user to report.
    c.expect_silence(300);
    // A native client on the same path stays native.
    let mut n = s.connect("/ws?user_id=native");
    n.send_json(json!({"type": "ping", "id": 1}));
    let p = n.expect_type("pong");
    assert_eq!(p["id"], 1);
    n.send_json(json!({"type": "subscribe", "room": "chat"}));
    assert_eq!(n.expect_type("subscribed")["room"], "chat");
}

#[test]
fn errors_in_the_envelope() {
    let s = server(&[]);
    let mut c = topic_on(&s, "alice", 0);
    c.send_text("{not json");
    let e = expect(&mut c, "error");
    assert_eq!(e["payload"]["error"], "invalid JSON format");
    send(&mut c, "m3", "weather.report", json!({}));
    let e = expect(&mut c, "error");
    assert_eq!(e["id"], "m3");
    assert_eq!(e["payload"]["error"], "unknown message type");
    send(&mut c, "m4", "subscribe", json!({"topics": ["weather"]}));
    let e = expect(&mut c, "error");
    assert_eq!(e["id"], "m4");
    assert_eq!(
        e["payload"]["error"],
        "unknown topic (one of: user, conversation, presence, typing, calls, notifications)"
    );
    send(&mut c, "m5", "typing.start", json!({}));
    let e = expect(&mut c, "error");
    assert_eq!(e["id"], "m5");
    assert_eq!(
        e["payload"]["error"], "room, to or conversationId is required",
        "{e}"
    );
    // A native command's error keeps its data (here a DM's clientMsgId) in the payload.
    send(
        &mut c,
        "m6",
        "message.send",
        json!({"clientMsgId": "c-9", "content": "x"}),
    );
    let e = expect(&mut c, "error");
    assert_eq!(
        e["payload"],
        json!({"error": "to is required", "clientMsgId": "c-9"})
    );
}

#[test]
fn typing_reaches_only_subscribers_and_honours_the_conversation_filter() {
    let s = server(&[]);
    let mut alice = topic_on(&s, "alice", 0);
    let mut watcher = topic_on(&s, "alice", 1);
    let mut deaf = topic_on(&s, "alice", 1);
    let mut bob = topic_on(&s, "bob", 1);
    subscribe(&mut alice, "s1", &["typing"], json!({}));
    subscribe(
        &mut watcher,
        "s2",
        &["conversation"],
        json!({"conversation_id": ["c-1"]}),
    );
    send(
        &mut bob,
        "t1",
        "typing.start",
        json!({"user_id": "alice", "conversation_id": "c-1"}),
    );
    for c in [&mut alice, &mut watcher] {
        let t = expect(c, "typing.start");
        assert_eq!(
            t["payload"],
            json!({"user_id": "bob", "to": "alice", "conversationId": "c-1"})
        );
        common::assert_uuid(&t["id"]);
    }
    send(
        &mut bob,
        "t2",
        "typing.start",
        json!({"to": "alice", "conversation_id": "c-2"}),
    );
    let t = expect(&mut alice, "typing.start");
    assert_eq!(t["payload"]["conversationId"], "c-2");
    send(
        &mut bob,
        "t3",
        "typing.stop",
        json!({"to": "alice", "conversation_id": "c-1"}),
    );
    assert_eq!(
        expect(&mut alice, "typing.stop")["payload"]["conversationId"],
        "c-1"
    );
    assert_eq!(
        expect(&mut watcher, "typing.stop")["payload"]["conversationId"],
        "c-1"
    );
    // Not subscribed to typing or conversation, or filtered out: nothing.
    deaf.expect_silence(300);
    watcher.expect_silence(200);
    // Unsubscribing stops it.
    send(
        &mut alice,
        "u1",
        "unsubscribe",
        json!({"topics": ["typing"]}),
    );
    let u = expect(&mut alice, "unsubscribed");
    assert_eq!(u["id"], "u1");
    assert_eq!(u["payload"], json!({"topics": ["typing"]}));
    send(
        &mut bob,
        "t4",
        "typing.stop",
        json!({"to": "alice", "conversation_id": "c-2"}),
    );
    alice.expect_silence(300);
}

#[test]
fn receipts_messages_and_calls_always_reach_the_user() {
    let s = server(&[]);
    let mut alice = topic_on(&s, "alice", 0);
    let mut bob = topic_on(&s, "bob", 1);
    // A DM from a native client arrives as message.new, without any subscription.
    let mut native = s.connect_on_shard("/ws?user_id=carol", 1);
    native.send_json(
        json!({"type": "message.send", "clientMsgId": "c-1", "to": "alice",
                            "content": "hi alice"}),
    );
    native.expect_type("message.ack");
    let m = expect(&mut alice, "message.new");
    assert_eq!(m["payload"]["content"], "hi alice");
    assert_eq!(m["payload"]["from"], "carol");
    let server_msg_id = m["payload"]["serverMsgId"].clone();
    // mark.read / mark.delivered from a topic client, with the protocol's snake_case names.
    send(
        &mut alice,
        "r1",
        "mark.read",
        json!({"to": "carol", "message_ids": [server_msg_id.clone()]}),
    );
    let r = native.expect_type("message.read");
    assert_eq!(r["data"]["by"], "alice");
    assert_eq!(r["data"]["messageIds"], json!([server_msg_id]));
    send(
        &mut alice,
        "r2",
        "mark.delivered",
        json!({"user_id": "carol", "message_ids": ["m-1"]}),
    );
    assert_eq!(
        native.expect_type("message.delivered")["data"]["messageIds"],
        json!(["m-1"])
    );
    native.send_json(json!({"type": "mark.read", "to": "alice", "messageIds": ["x"]}));
    let r = expect(&mut alice, "message.read");
    assert_eq!(r["payload"]["by"], "carol");
    native.send_json(json!({"type": "mark.delivered", "to": "alice", "messageIds": ["y"]}));
    assert_eq!(
        expect(&mut alice, "message.delivered")["payload"]["messageIds"],
        json!(["y"])
    );
    // A call between two topic clients, every signal of the table.
    send(
        &mut alice,
        "c1",
        "call.offer",
        json!({"to": "bob", "call_id": "k-1", "sdp": "v=0"}),
    );
    let inc = expect(&mut bob, "call.incoming");
    assert_eq!(
        inc["payload"],
        json!({"call_id": "k-1", "from": "alice", "sdp": "v=0"})
    );
    send(
        &mut alice,
        "c2",
        "call.ice",
        json!({"to": "bob", "call_id": "k-1", "candidate": "a"}),
    );
    assert_eq!(expect(&mut bob, "call.ice")["payload"]["candidate"], "a");
    send(
        &mut bob,
        "c3",
        "call.answer",
        json!({"to": "alice", "call_id": "k-1", "sdp": "v=1"}),
    );
    assert_eq!(expect(&mut alice, "call.answer")["payload"]["sdp"], "v=1");
    send(
        &mut bob,
        "c4",
        "call.hangup",
        json!({"to": "alice", "call_id": "k-1"}),
    );
    let end = expect(&mut alice, "call.ended");
    assert_eq!(
        end["payload"],
        json!({"call_id": "k-1", "reason": "hangup"})
    );
}

#[test]
fn presence_update_query_and_subscription() {
    // A grace below the client's 5 s receive timeout: the offline event must come within it.
    let s = server(&[("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "1s")]);
    let mut alice = topic_on(&s, "alice", 0);
    subscribe(
        &mut alice,
        "p1",
        &["presence"],
        json!({"user_ids": ["bob"]}),
    );
    // The watch answers with the watched users' state, one presence.update each.
    let st = expect(&mut alice, "presence.update");
    assert_eq!(st["payload"]["user_id"], "bob");
    assert_eq!(st["payload"]["status"], "offline");
    let mut bob = topic_on(&s, "bob", 1);
    let on = expect(&mut alice, "presence.online");
    assert_eq!(on["payload"]["user_id"], "bob");
    send(
        &mut bob,
        "p2",
        "presence.update",
        json!({"status": "busy", "text": "in a call"}),
    );
    let up = expect(&mut alice, "presence.update");
    assert_eq!(up["payload"]["status"], "busy");
    assert_eq!(up["payload"]["text"], "in a call");
    send(
        &mut alice,
        "q1",
        "presence.query",
        json!({"user_ids": ["bob", "nobody"]}),
    );
    let a = expect(&mut alice, "presence.update");
    let b = expect(&mut alice, "presence.update");
    assert_eq!(a["id"], "q1");
    assert_eq!(a["payload"]["user_id"], "bob");
    assert_eq!(a["payload"]["status"], "busy");
    assert_eq!(b["payload"]["user_id"], "nobody");
    bob.close_and_wait();
    let off = expect(&mut alice, "presence.offline");
    assert_eq!(off["payload"]["user_id"], "bob");
}

#[test]
fn authenticate_in_band() {
    let s = server(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
    ]);
    let (mut c, _) = s.try_connect_with("/topic", &[], None).unwrap_or_else(|r| {
        panic!("upgrade refused: {} {}", r.status, r.body);
    });
    expect(&mut c, "connected");
    // A subscription waits for authentication like every command.
    let token = jwt::hs256(&json!({"sub": "alice", "exp": common::now_s() + 600}));
    send(&mut c, "a1", "authenticate", json!({"token": token}));
    let ok = expect(&mut c, "auth.success");
    assert_eq!(ok["id"], "a1");
    assert_eq!(ok["payload"]["user_id"], "alice");
    subscribe(&mut c, "s1", &["typing"], json!({}));
    let (mut d, _) = s.try_connect_with("/topic", &[], None).unwrap();
    expect(&mut d, "connected");
    send(&mut d, "s2", "subscribe", json!({"topics": ["typing"]}));
    match d.next_event(Duration::from_secs(5)) {
        Event::Json(v) => {
            assert_eq!(v["type"], "auth.failed", "{v}");
            assert_eq!(v["payload"]["error"], "authentication required");
        }
        other => panic!("expected auth.failed, got {other:?}"),
    }
    d.expect_close(4001);
}
