//! Every error text of PROTOCOL.md sections 2-3 over a real socket, with the exact frame shape,
//! the correlation id copied back, and the server still serving afterwards.

mod common;

use std::collections::HashSet;

use common::TestServer;
use serde_json::{json, Value};

fn keys(v: &Value) -> HashSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// An error frame has exactly type, error, timestamp (and id when given).
fn assert_error_shape(e: &Value, with_id: bool) {
    let mut want: HashSet<String> = ["type", "error", "timestamp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if with_id {
        want.insert("id".into());
    }
    assert_eq!(keys(e), want, "{e}");
}

#[test]
fn invalid_json_format() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    for bad in [
        "{not json",
        "",
        "[1,2,3]",
        "\"just a string\"",
        "42",
        "{\"type\":\"ping\"",
        "{\"type\":5}",
    ] {
        c.send_text(bad);
        let e = c.expect_error("invalid JSON format");
        assert_error_shape(&e, false);
    }
    // The connection is still usable.
    c.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(c.expect_type("pong")["id"], 1);
    server.assert_serving();
}

#[test]
fn unknown_message_type() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "dance", "id": 3}));
    let e = c.expect_error("unknown message type");
    assert_eq!(e["id"], 3);
    assert_error_shape(&e, true);

    c.send_json(json!({"type": "dance", "id": "three"}));
    assert_eq!(c.expect_error("unknown message type")["id"], "three");

    c.send_json(json!({"no_type": true}));
    assert_error_shape(&c.expect_error("unknown message type"), false);

    c.send_json(json!({"type": "SUBSCRIBE", "room": "x"}));
    c.expect_error("unknown message type");
    server.assert_serving();
}

#[test]
fn room_name_is_required() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    for (cmd, id) in [
        (json!({"type": "subscribe", "id": 1}), json!(1)),
        (json!({"type": "subscribe", "room": "", "id": 2}), json!(2)),
        (json!({"type": "unsubscribe", "id": "u"}), json!("u")),
        (
            json!({"type": "publish", "data": {"x": 1}, "id": "p"}),
            json!("p"),
        ),
        (
            json!({"type": "publish", "room": "", "data": {}, "id": 5}),
            json!(5),
        ),
    ] {
        c.send_json(cmd.clone());
        let e = c.expect_error("room name is required");
        assert_eq!(e["id"], id, "for {cmd}: {e}");
        assert_error_shape(&e, true);
    }
    c.send_json(json!({"type": "subscribe"}));
    assert_error_shape(&c.expect_error("room name is required"), false);
    server.assert_serving();
}

#[test]
fn not_subscribed_to_this_room() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "publish", "room": "r", "data": 1, "id": 10}));
    assert_eq!(c.expect_error("not subscribed to this room")["id"], 10);
    c.send_json(json!({"type": "unsubscribe", "room": "r"}));
    assert_error_shape(&c.expect_error("not subscribed to this room"), false);
    server.assert_serving();
}

#[test]
fn room_is_at_maximum_capacity() {
    let server = TestServer::start(&[("SWITCHBOARD_MAX_CONNECTIONS_PER_ROOM", "2")]);
    let mut a = server.connect("/ws");
    let mut b = server.connect("/ws");
    let mut c = server.connect("/ws");
    a.subscribe("small");
    b.subscribe("small");
    c.send_json(json!({"type": "subscribe", "room": "small", "id": "full"}));
    let e = c.expect_error("room is at maximum capacity");
    assert_eq!(e["id"], "full");
    assert_error_shape(&e, true);
    // The refused client is not a member: publishing is refused too, and a, b do not see it.
    c.send_json(json!({"type": "publish", "room": "small", "data": 1}));
    c.expect_error("not subscribed to this room");
    a.expect_silence(200);

    // Another room is unaffected; a freed slot can be taken.
    c.subscribe("other");
    b.send_json(json!({"type": "unsubscribe", "room": "small"}));
    b.expect_type("unsubscribed");
    assert_eq!(c.subscribe("small")["data"]["client_count"], 2);
    server.assert_serving();
}

#[test]
fn too_many_rooms() {
    let server = TestServer::start(&[("SWITCHBOARD_MAX_ROOMS_PER_CONNECTION", "3")]);
    let mut c = server.connect("/ws");
    for r in ["r1", "r2", "r3"] {
        c.subscribe(r);
    }
    c.send_json(json!({"type": "subscribe", "room": "r4", "id": 4}));
    let e = c.expect_error("too many rooms");
    assert_eq!(e["id"], 4);
    assert_error_shape(&e, true);
    // Re-subscribing to a room it already has is not a new room.
    c.subscribe("r2");
    c.send_json(json!({"type": "unsubscribe", "room": "r1"}));
    c.expect_type("unsubscribed");
    c.subscribe("r4");
    // The limit is per connection.
    let mut d = server.connect("/ws");
    for r in ["r1", "r5", "r6"] {
        d.subscribe(r);
    }
    server.assert_serving();
}

#[test]
fn binary_frames_are_not_supported() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    c.send_binary(b"\x00\x01binary");
    let e = c.expect_error("binary frames are not supported");
    assert_error_shape(&e, false);
    c.send_json(json!({"type": "ping"}));
    c.expect_type("pong");
    server.assert_serving();
}

#[test]
fn oversized_message_gets_error_then_1009() {
    let server = TestServer::start(&[("SWITCHBOARD_MAX_MESSAGE_SIZE", "1KiB")]);
    let mut c = server.connect("/ws");
    c.subscribe("r");
    // Just under the limit is fine.
    let small = json!({"type": "publish", "room": "r", "data": "x".repeat(900)});
    assert!(small.to_string().len() <= 1024);
    c.send_json(small);
    c.expect_type("message");

    c.send_json(json!({"type": "publish", "room": "r", "data": "x".repeat(2000)}));
    let e = c.expect_error("message too large");
    assert_error_shape(&e, false);
    c.expect_close(1009);
    server.assert_serving();
}

#[test]
fn invalid_utf8_text_closes_1007() {
    let server = TestServer::start(&[]);
    let mut raw = server.raw_ws("/ws");
    let welcome = raw.read_frame(common::RECV_TIMEOUT);
    assert!(
        matches!(welcome, common::RawEvent::Frame { opcode: 1, .. }),
        "{welcome:?}"
    );
    raw.write_frame(
        true,
        0x1,
        b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}",
        Some([1, 2, 3, 4]),
    );
    let texts = raw.expect_close(1007);
    assert!(
        texts.is_empty(),
        "no frame expected before the close: {texts:?}"
    );
    server.assert_serving();
}

#[test]
fn unmasked_client_frame_closes_1002() {
    let server = TestServer::start(&[]);
    let mut raw = server.raw_ws("/ws");
    let welcome = raw.read_frame(common::RECV_TIMEOUT);
    assert!(
        matches!(welcome, common::RawEvent::Frame { opcode: 1, .. }),
        "{welcome:?}"
    );
    raw.write_frame(true, 0x1, br#"{"type":"ping"}"#, None);
    let texts = raw.expect_close(1002);
    assert!(
        texts.is_empty(),
        "no pong expected for an unmasked frame: {texts:?}"
    );
    server.assert_serving();
}

#[test]
fn fragmented_message_is_reassembled() {
    let server = TestServer::start(&[]);
    let mut raw = server.raw_ws("/ws");
    raw.read_frame(common::RECV_TIMEOUT);
    let msg = br#"{"type":"ping","id":"frag"}"#;
    raw.write_frame(false, 0x1, &msg[..5], Some([9, 8, 7, 6]));
    // A control frame between fragments is allowed.
    raw.write_frame(true, 0x9, b"hi", Some([1, 1, 1, 1]));
    raw.write_frame(false, 0x0, &msg[5..12], Some([2, 2, 2, 2]));
    raw.write_frame(true, 0x0, &msg[12..], Some([3, 3, 3, 3]));
    let mut got_pong_ctrl = false;
    loop {
        match raw.read_frame(common::RECV_TIMEOUT) {
            common::RawEvent::Frame {
                opcode: 0xA,
                payload,
                ..
            } => {
                assert_eq!(payload, b"hi");
                got_pong_ctrl = true;
            }
            common::RawEvent::Frame {
                opcode: 0x1,
                payload,
                ..
            } => {
                let v: Value = serde_json::from_slice(&payload).expect("JSON");
                assert_eq!(v["type"], "pong", "{v}");
                assert_eq!(v["id"], "frag");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        got_pong_ctrl,
        "the ping control frame was not answered before the reply"
    );
}

#[test]
fn direct_message_errors() {
    let server = TestServer::start(&[]);
    // Anonymous clients cannot send direct messages.
    let mut anon = server.connect("/ws");
    anon.send_json(
        json!({"type": "message.send", "clientMsgId": "m1", "to": "bob", "content": "hi", "id": 1}),
    );
    let e = anon.expect_error("not allowed");
    assert_eq!(e["id"], 1);
    assert_eq!(e["data"], json!({"clientMsgId": "m1"}), "{e}");

    let mut alice = server.connect("/ws?user_id=alice");
    alice.send_json(json!({"type": "message.send", "to": "bob", "content": "hi"}));
    alice.expect_error("clientMsgId is required");
    alice.send_json(json!({"type": "message.send", "clientMsgId": "m2", "content": "hi"}));
    assert_eq!(
        alice.expect_error("to is required")["data"]["clientMsgId"],
        "m2"
    );
    alice.send_json(json!({"type": "message.send", "clientMsgId": "m3", "to": "bob"}));
    assert_eq!(
        alice.expect_error("content is required")["data"]["clientMsgId"],
        "m3"
    );
    server.assert_serving();
}
