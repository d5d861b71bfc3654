//! Rooms over real sockets (PROTOCOL.md sections 0-2): the `connected` welcome, subscribe,
//! unsubscribe, publish, broadcast and ping, with and without correlation ids, across shards.

mod common;

use std::collections::{HashMap, HashSet};

use common::{assert_timestamp, assert_uuid, Client, TestServer};
use serde_json::{json, Value};

fn keys(v: &Value) -> HashSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn connected_welcome_is_verbatim() {
    let server = TestServer::start(&[]);
    let a = server.connect("/ws");
    let w = &a.welcome;
    assert_eq!(keys(w), set(&["type", "data", "timestamp"]), "{w}");
    assert_eq!(
        keys(&w["data"]),
        set(&["client_id", "user_id", "message"]),
        "{w}"
    );
    assert_uuid(&w["data"]["client_id"]);
    assert_eq!(
        w["data"]["user_id"],
        Value::Null,
        "anonymous user_id must be null: {w}"
    );
    assert_eq!(w["data"]["message"], "Connected to WebSocket server");
    assert_timestamp(w);

    let b = server.connect("/ws?user_id=alice");
    assert_eq!(b.welcome["data"]["user_id"], "alice", "{}", b.welcome);
    assert_uuid(&b.welcome["data"]["client_id"]);
    assert_ne!(a.client_id, b.client_id, "client ids must be unique");
}

#[test]
fn websocket_aliases_work() {
    // Every path native (by default /ws/chat speaks the chat hub: tests/dialect_chat_hub.rs).
    let server = TestServer::start(&[("SWITCHBOARD_WS_DIALECTS", "/ws=auto")]);
    for path in ["/ws", "/socket/connect", "/ws/chat", "/api/v1/ws"] {
        let mut c = server.connect(path);
        c.send_json(json!({"type": "ping", "id": path}));
        let pong = c.expect_type("pong");
        assert_eq!(pong["id"], path);
    }
}

#[test]
fn ping_with_and_without_id() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "ping"}));
    let pong = c.expect_type("pong");
    assert_eq!(keys(&pong), set(&["type", "timestamp"]), "{pong}");

    c.send_json(json!({"type": "ping", "id": 42}));
    let pong = c.expect_type("pong");
    assert_eq!(pong["id"], json!(42), "{pong}");

    c.send_json(json!({"type": "ping", "id": "req-1"}));
    let pong = c.expect_type("pong");
    assert_eq!(pong["id"], json!("req-1"), "{pong}");

    c.send_json(json!({"type": "ping", "id": 1.5}));
    assert_eq!(c.expect_type("pong")["id"], json!(1.5));
}

#[test]
fn subscribe_and_unsubscribe_frames() {
    let server = TestServer::start(&[]);
    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");

    a.send_json(json!({"type": "subscribe", "room": "chat"}));
    let s = a.expect_type("subscribed");
    assert_eq!(keys(&s), set(&["type", "room", "data", "timestamp"]), "{s}");
    assert_eq!(s["room"], "chat");
    assert_eq!(s["data"], json!({"room": "chat", "client_count": 1}));

    b.send_json(json!({"type": "subscribe", "room": "chat", "id": 7}));
    let s = b.expect_type("subscribed");
    assert_eq!(s["id"], json!(7));
    assert_eq!(s["data"], json!({"room": "chat", "client_count": 2}));

    // Subscribing again is idempotent: same count.
    b.send_json(json!({"type": "subscribe", "room": "chat", "id": "again"}));
    let s = b.expect_type("subscribed");
    assert_eq!(s["id"], json!("again"));
    assert_eq!(s["data"], json!({"room": "chat", "client_count": 2}));

    b.send_json(json!({"type": "unsubscribe", "room": "chat", "id": "u1"}));
    let u = b.expect_type("unsubscribed");
    assert_eq!(
        keys(&u),
        set(&["type", "id", "room", "data", "timestamp"]),
        "{u}"
    );
    assert_eq!(u["room"], "chat");
    assert_eq!(u["data"], json!({"room": "chat"}));
    assert_eq!(u["id"], json!("u1"));

    b.send_json(json!({"type": "unsubscribe", "room": "chat", "id": 9}));
    let e = b.expect_error("not subscribed to this room");
    assert_eq!(e["id"], json!(9));

    // The unsubscribed client no longer receives the room.
    a.send_json(json!({"type": "publish", "room": "chat", "data": {"n": 1}}));
    assert_eq!(a.expect_type("message")["data"], json!({"n": 1}));
    b.expect_silence(300);

    // A third subscriber sees the count drop back.
    let mut c = server.connect("/ws");
    assert_eq!(c.subscribe("chat")["data"]["client_count"], 2);
}

#[test]
fn publish_reaches_every_subscriber_including_sender() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let mut anon = server.connect("/ws");
    let mut outsider = server.connect("/ws");
    alice.subscribe("room-1");
    anon.subscribe("room-1");
    outsider.subscribe("room-2");

    let (alice_id, anon_id) = (alice.client_id.clone(), anon.client_id.clone());
    let data = json!({"text": "héllo \"world\" 🎉", "n": [1, 2.5, -3], "nested": {"ok": true, "none": null}});
    alice.send_json(json!({"type": "publish", "room": "room-1", "data": data, "id": 5}));
    for c in [&mut alice, &mut anon] {
        let m = c.expect_type("message");
        assert_eq!(
            keys(&m),
            set(&["type", "room", "data", "client_id", "user_id", "timestamp"]),
            "{m}"
        );
        assert_eq!(m["room"], "room-1");
        assert_eq!(m["data"], data);
        assert_eq!(m["client_id"].as_str(), Some(alice_id.as_str()));
        assert_eq!(m["user_id"], "alice");
    }
    outsider.expect_silence(300);

    // An anonymous sender: no user_id field.
    anon.send_json(json!({"type": "publish", "room": "room-1", "data": "plain string"}));
    for c in [&mut alice, &mut anon] {
        let m = c.expect_type("message");
        assert_eq!(
            keys(&m),
            set(&["type", "room", "data", "client_id", "timestamp"]),
            "{m}"
        );
        assert_eq!(m["data"], "plain string");
        assert_eq!(m["client_id"].as_str(), Some(anon_id.as_str()));
    }
}

#[test]
fn publisher_must_be_subscribed() {
    let server = TestServer::start(&[]);
    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");
    b.subscribe("locked");
    a.send_json(json!({"type": "publish", "room": "locked", "data": {"x": 1}, "id": "p1"}));
    let e = a.expect_error("not subscribed to this room");
    assert_eq!(e["id"], "p1");
    assert_eq!(keys(&e), set(&["type", "id", "error", "timestamp"]), "{e}");
    b.expect_silence(300);
}

/// 20 clients (spread over both shards) in one room: every publish reaches all 20, in order per
/// sender.
#[test]
fn publish_fans_out_across_shards() {
    const N: usize = 20;
    const PER_SENDER: usize = 3;
    let server = TestServer::start(&[]);
    let mut clients: Vec<Client> = (0..N)
        .map(|i| server.connect(&format!("/ws?user_id=u{i}")))
        .collect();
    // Both shards hold connections.
    server.wait_metrics("connections on both shards", |t| {
        (0..2).all(|s| {
            t.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "switchboard_websocket_connections{{shard=\"{s}\"}} "
                    ))
                })
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|v| v > 0)
        })
    });
    for c in clients.iter_mut() {
        c.subscribe("big");
    }
    for round in 0..PER_SENDER {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send_json(
                json!({"type": "publish", "room": "big", "data": {"from": i, "seq": round}}),
            );
        }
    }
    let ids: HashMap<String, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.client_id.clone(), i))
        .collect();
    for (r, c) in clients.iter_mut().enumerate() {
        let mut next_seq = [0u64; N];
        for _ in 0..N * PER_SENDER {
            let m = c.expect_type("message");
            assert_eq!(m["room"], "big");
            let from = m["data"]["from"].as_u64().expect("from") as usize;
            assert_eq!(
                ids.get(m["client_id"].as_str().expect("client_id")),
                Some(&from),
                "{m}"
            );
            assert_eq!(m["user_id"], format!("u{from}"));
            assert_eq!(
                m["data"]["seq"].as_u64(),
                Some(next_seq[from]),
                "receiver {r}: out of order {m}"
            );
            next_seq[from] += 1;
        }
        c.expect_silence(50);
    }
}

#[test]
fn broadcast_is_refused_by_default() {
    let server = TestServer::start(&[]);
    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");
    a.send_json(json!({"type": "broadcast", "data": {"x": 1}, "id": 3}));
    let e = a.expect_error("not allowed");
    assert_eq!(e["id"], 3);
    b.expect_silence(300);
}

#[test]
fn broadcast_reaches_every_client_when_allowed() {
    let server = TestServer::start(&[("SWITCHBOARD_ALLOW_CLIENT_BROADCAST", "true")]);
    let mut clients: Vec<Client> = (0..8).map(|_| server.connect("/ws")).collect();
    clients[3].subscribe("some-room");
    let sender = clients[0].client_id.clone();
    clients[0].send_json(json!({"type": "broadcast", "data": {"alert": "all hands"}}));
    for c in clients.iter_mut() {
        let m = c.expect_type("message");
        assert_eq!(
            keys(&m),
            set(&["type", "data", "client_id", "timestamp"]),
            "{m}"
        );
        assert_eq!(m["data"], json!({"alert": "all hands"}));
        assert_eq!(m["client_id"].as_str(), Some(sender.as_str()));
    }
    for c in clients.iter_mut() {
        c.expect_silence(50);
    }
}

#[test]
fn unsubscribe_on_disconnect_frees_the_room() {
    let server = TestServer::start(&[]);
    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");
    a.subscribe("r");
    assert_eq!(b.subscribe("r")["data"]["client_count"], 2);
    a.close();
    // The departed client is no longer counted.
    let deadline = std::time::Instant::now() + common::RECV_TIMEOUT;
    loop {
        let mut c = server.connect("/ws");
        let n = c.subscribe("r")["data"]["client_count"].as_u64();
        if n == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "room count stuck at {n:?}"
        );
        c.close();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn subscribe_in_the_url_replies_after_connected_in_order() {
    let server = TestServer::start(&[]);
    let mut a = server.connect("/ws?subscribe=url-a&subscribe=url%20b&subscribe=url-a");
    let s1 = a.expect_type("subscribed");
    assert_eq!(s1["room"], "url-a", "{s1}");
    assert_eq!(
        s1["data"],
        json!({"room": "url-a", "client_count": 1}),
        "{s1}"
    );
    assert!(s1.get("id").is_none(), "no command, no id: {s1}");
    let s2 = a.expect_type("subscribed");
    assert_eq!(
        s2["data"],
        json!({"room": "url b", "client_count": 1}),
        "{s2}"
    );
    // A repeated room is a repeated subscribe: answered again, joined once.
    let s3 = a.expect_type("subscribed");
    assert_eq!(
        s3["data"],
        json!({"room": "url-a", "client_count": 1}),
        "{s3}"
    );

    // It is a real subscription: another client's publish arrives.
    let mut b = server.connect("/ws");
    let joined = b.subscribe("url b");
    assert_eq!(joined["data"]["client_count"], 2, "{joined}");
    b.send_json(json!({"type": "publish", "room": "url b", "data": {"k": 1}}));
    let m = a.expect_type("message");
    assert_eq!(m["room"], "url b", "{m}");
    assert_eq!(m["data"], json!({"k": 1}), "{m}");
    a.expect_silence(100);
}

#[test]
fn subscribe_in_the_url_reports_each_bad_room_like_the_command() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_MAX_ROOMS_PER_CONNECTION", "1"),
        ("SWITCHBOARD_MAX_ROOM_NAME_BYTES", "8"),
    ]);
    let mut a = server.connect("/ws?subscribe=&subscribe=much-too-long&subscribe=ok&subscribe=two");
    a.expect_error("room name is required");
    a.expect_error("room name too long");
    let s = a.expect_type("subscribed");
    assert_eq!(s["room"], "ok", "{s}");
    a.expect_error("too many rooms");
    a.expect_silence(100);
    server.assert_serving();
}

#[test]
fn subscribe_in_the_url_follows_the_token_and_needs_one_on_the_upgrade() {
    use common::jwt::{self, SECRET};
    let server = TestServer::start(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
    ]);
    let token =
        jwt::hs256(&json!({"sub": "u1", "exp": common::now_s() + 300, "rooms": ["team-*"]}));
    let mut a = server.connect(&format!(
        "/ws?token={token}&subscribe=team-1&subscribe=secret"
    ));
    let s = a.expect_type("subscribed");
    assert_eq!(s["room"], "team-1", "{s}");
    a.expect_error("not allowed");

    // Without a token on the upgrade the grants are unknown until `authenticate`.
    let r = server.raw_upgrade("/ws?subscribe=team-1", &[]);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "subscribe in the URL needs a token on the upgrade"})
    );
    // The refusal touched nobody else.
    a.send_json(json!({"type": "ping"}));
    a.expect_type("pong");
}
