//! One conversation, four dialects: the participants of a stored group thread connect as a
//! native client (`/ws`), a topic-protocol client (`/topic`), a chat hub client (`/ws/chat`)
//! and a messaging-service client (`/api/v1/ws`), and each sees the same message and the same
//! typing indicator in its own shape, with the same ids (docs/DIALECTS.md). Connections sit on
//! both shards.

mod common;

use common::{jwt, now_s, Client, TestServer};
use serde_json::{json, Value};

fn token(user: &str) -> String {
    jwt::hs256(&json!({"sub": user, "exp": now_s() + 600}))
}

/// Upgrade on `path_and_query` and read the first frame, whatever its shape.
fn open(s: &TestServer, path_and_query: &str) -> (Client, Value) {
    let (mut c, _) = s
        .try_connect_with(path_and_query, &[], None)
        .unwrap_or_else(|r| {
            panic!(
                "upgrade of {path_and_query} refused: {} {}",
                r.status, r.body
            )
        });
    let first = c.recv_json();
    (c, first)
}

#[test]
fn one_message_four_shapes() {
    let s = TestServer::start(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_WS_PATHS", "/ws,/topic,/ws/chat,/api/v1/ws"),
        (
            "SWITCHBOARD_WS_DIALECTS",
            "/ws=auto,/topic=topic,/ws/chat=chat-hub,/api/v1/ws=messaging",
        ),
    ]);
    s.wait_ready();
    // A group thread of users 1 (native, two devices), 2 (topic), 3 (chat hub), 4 (messaging).
    let auth = format!("Bearer {}", token("1"));
    let body = json!({"participants": ["2", "3", "4"], "title": "mixed"});
    let (st, t) = common::http_json(
        &s,
        "POST",
        "/api/v1/messages/threads",
        &[("Authorization", &auth)],
        Some(&body),
        false,
    );
    assert_eq!(st, 201, "{t}");
    let (thread, nid) = (
        t["id"].as_str().unwrap().to_owned(),
        t["numericId"].as_u64().unwrap(),
    );

    let (mut native, w) = open(&s, &format!("/ws?token={}", token("1")));
    assert_eq!(w["type"], "connected");
    let (mut sender, _) = open(&s, &format!("/ws?token={}", token("1")));
    let (mut topic, w) = open(&s, &format!("/topic?token={}", token("2")));
    assert_eq!(w["payload"]["user_id"], "2", "{w}");
    topic.send_json(json!({"id": "s", "type": "subscribe", "payload": {"topics": ["typing"]}}));
    assert_eq!(topic.recv_json()["type"], "subscribed");
    let (mut hub, w) = open(&s, &format!("/ws/chat?token={}", token("3")));
    assert_eq!(w["user_id"], 3, "{w}");
    let (mut msg, w) = open(&s, &format!("/api/v1/ws?token={}", token("4")));
    assert_eq!(w["type"], "connected", "{w}");
    // The messaging client's open-time presence watch answers with who is online.
    let skip_presence = |c: &mut Client| loop {
        let v = c.recv_json();
        if v["type"] != "presence" {
            break v;
        }
    };

    // One native send into the thread.
    sender.send_json(json!({"type": "message.send", "clientMsgId": "mix-1",
                            "conversationId": thread, "content": "one message"}));
    let ack = sender.expect_type("message.ack");
    let cursor = ack["data"]["cursor"].as_u64().unwrap();
    let smid = ack["data"]["serverMsgId"].clone();

    let n = native.expect_type("message.create");
    assert_eq!(n["data"]["content"], "one message");
    assert_eq!(n["data"]["conversationId"], thread);
    assert_eq!(n["data"]["conversationNumericId"], nid);
    assert_eq!(n["data"]["serverMsgId"], smid);

    let tp = topic.recv_json();
    assert_eq!(tp["type"], "message.new", "{tp}");
    assert_eq!(
        tp["payload"], n["data"],
        "the topic payload is the native data"
    );

    let h = hub.recv_json();
    assert_eq!(h["type"], "new_message", "{h}");
    assert_eq!(h["chat_id"], nid);
    assert_eq!(h["message"]["id"], cursor);
    assert_eq!(h["message"]["chat_id"], nid);
    assert_eq!(h["message"]["sender_id"], 1);
    assert_eq!(h["message"]["content"], "one message");
    assert!(h["timestamp"].is_string(), "{h}");

    let m = skip_presence(&mut msg);
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["payload"]["id"], cursor);
    assert_eq!(m["payload"]["serverMsgId"], smid);
    assert_eq!(m["payload"]["threadId"], thread);
    assert_eq!(m["payload"]["threadNumericId"], nid);
    assert_eq!(m["payload"]["senderId"], "1");
    assert_eq!(m["payload"]["content"], "one message");

    // The messaging client types; the three others see it in their shapes.
    msg.send_json(json!({"type": "typing", "payload": {"threadId": thread, "isTyping": true}}));
    let n = native.expect_type("typing.start");
    assert_eq!(
        n["data"],
        json!({"user_id": "4", "conversationId": thread, "conversationNumericId": nid})
    );
    let tp = topic.recv_json();
    assert_eq!(tp["type"], "typing.start", "{tp}");
    assert_eq!(tp["payload"], n["data"]);
    let h = hub.recv_json();
    assert_eq!(
        h,
        json!({"type": "typing", "chat_id": nid, "user_id": 4, "is_typing": true,
               "timestamp": h["timestamp"]})
    );
    assert_eq!(sender.expect_type("typing.start")["data"], n["data"]);
    // The hub client reads the message: the others get the receipt in their shapes.
    hub.send_json(json!({"type": "mark_read", "message_id": cursor}));
    let r = sender.expect_type("message.read");
    assert_eq!(r["data"]["by"], "3");
    assert_eq!(r["data"]["conversationId"], thread);
    let r = skip_presence(&mut msg);
    assert_eq!(r["type"], "read", "{r}");
    assert_eq!(r["payload"]["threadId"], thread);
    assert_eq!(r["payload"]["userId"], 3);
}
