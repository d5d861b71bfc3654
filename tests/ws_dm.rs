//! Direct messages over real sockets (PROTOCOL.md section 3): ack, delivery to every device of
//! the recipient and every other device of the sender (spread over both shards), the derived
//! conversation id, and clientMsgId deduplication.

mod common;

use common::{assert_uuid, now_ms, parse_rfc3339_ms, Client, TestServer};
use serde_json::{json, Value};

const DEVICES: usize = 4;

fn devices(server: &TestServer, user: &str) -> Vec<Client> {
    (0..DEVICES)
        .map(|_| server.connect(&format!("/ws?user_id={user}")))
        .collect()
}

fn assert_ack(ack: &Value, client_msg_id: &str) -> Value {
    let d = &ack["data"];
    let mut fields: Vec<&str> = d
        .as_object()
        .expect("ack data")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "clientMsgId",
            "conversationId",
            "conversationNumericId",
            "cursor",
            "sentAt",
            "seq",
            "serverMsgId"
        ],
        "{ack}"
    );
    assert!(d["cursor"].as_u64().is_some_and(|c| c > 0), "{ack}");
    assert!(d["seq"].as_u64().is_some_and(|c| c > 0), "{ack}");
    assert_eq!(d["clientMsgId"], client_msg_id);
    assert_uuid(&d["serverMsgId"]);
    assert!(
        d["conversationId"].as_str().is_some_and(|c| !c.is_empty()),
        "{ack}"
    );
    let sent = parse_rfc3339_ms(d["sentAt"].as_str().expect("sentAt string"))
        .unwrap_or_else(|| panic!("sentAt is not RFC 3339: {ack}"));
    let now = now_ms();
    assert!(
        sent + 30_000 > now && sent < now + 30_000,
        "sentAt {sent} far from now {now}"
    );
    d.clone()
}

/// Checks a `message.create` against the ack it belongs to.
fn assert_create(
    m: &Value,
    ack: &Value,
    from: &str,
    to: &str,
    content: &str,
    attachment: Option<&str>,
) {
    assert_eq!(m["type"], "message.create", "{m}");
    let d = &m["data"];
    assert_uuid(&d["eventId"]);
    assert_eq!(d["clientMsgId"], ack["clientMsgId"], "{m}");
    assert_eq!(d["from"], from, "{m}");
    assert_eq!(d["to"], to, "{m}");
    assert_eq!(d["conversationId"], ack["conversationId"], "{m}");
    assert!(d["conversationNumericId"].as_u64().is_some(), "{m}");
    assert_eq!(
        d["conversationNumericId"], ack["conversationNumericId"],
        "{m}"
    );
    assert_eq!(d["content"], content, "{m}");
    match attachment {
        Some(a) => assert_eq!(d["attachmentUrl"], a, "{m}"),
        None => assert!(d["attachmentUrl"].is_null(), "{m}"),
    }
    assert_eq!(d["sentAt"], ack["sentAt"], "{m}");
    assert_eq!(d["serverMsgId"], ack["serverMsgId"], "{m}");
    assert_eq!(d["cursor"], ack["cursor"], "{m}");
    assert_eq!(d["seq"], ack["seq"], "{m}");
}

#[test]
fn message_send_acks_and_reaches_all_devices() {
    let server = TestServer::start(&[]);
    let mut alice = devices(&server, "alice");
    let mut bob = devices(&server, "bob");
    let mut carol = server.connect("/ws?user_id=carol");

    alice[0].send_json(json!({
        "type": "message.send", "id": "req-9", "clientMsgId": "c-1", "to": "bob",
        "content": "hi bob ✓", "attachmentUrl": "https://files.example/a.png"
    }));
    let ack = alice[0].expect_type("message.ack");
    assert_eq!(ack["id"], "req-9", "{ack}");
    let ack = assert_ack(&ack, "c-1");

    let mut event_ids = std::collections::HashSet::new();
    for c in bob.iter_mut().chain(alice[1..].iter_mut()) {
        let m = c.expect_type("message.create");
        assert_create(
            &m,
            &ack,
            "alice",
            "bob",
            "hi bob ✓",
            Some("https://files.example/a.png"),
        );
        event_ids.insert(m["data"]["eventId"].clone());
    }
    assert_eq!(event_ids.len(), 1, "one event, one eventId on every device");
    // Not to the sending device, not to strangers.
    alice[0].expect_silence(200);
    carol.expect_silence(100);
}

#[test]
fn derived_conversation_id_is_stable_and_symmetric() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let mut bob = server.connect("/ws?user_id=bob");
    let mut carol = server.connect("/ws?user_id=carol");

    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "a1", "to": "bob", "content": "1"}),
    );
    let c1 = assert_ack(&alice.expect_type("message.ack"), "a1")["conversationId"].clone();
    bob.expect_type("message.create");
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "a2", "to": "bob", "content": "2"}),
    );
    let c2 = assert_ack(&alice.expect_type("message.ack"), "a2")["conversationId"].clone();
    bob.expect_type("message.create");
    bob.send_json(
        json!({"type": "message.send", "clientMsgId": "b1", "to": "alice", "content": "3"}),
    );
    let c3 = assert_ack(&bob.expect_type("message.ack"), "b1")["conversationId"].clone();
    let m = alice.expect_type("message.create");
    assert_eq!(m["data"]["conversationId"], c3);
    assert_eq!(c1, c2, "stable");
    assert_eq!(c1, c3, "symmetric");

    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "a3", "to": "carol", "content": "4"}),
    );
    let c4 = assert_ack(&alice.expect_type("message.ack"), "a3")["conversationId"].clone();
    carol.expect_type("message.create");
    assert_ne!(c1, c4, "another pair has another conversation");

    // An explicit conversationId is kept.
    alice.send_json(json!({"type": "message.send", "clientMsgId": "a4", "to": "bob", "content": "5", "conversationId": "conv-explicit"}));
    assert_eq!(
        assert_ack(&alice.expect_type("message.ack"), "a4")["conversationId"],
        "conv-explicit"
    );
    assert_eq!(
        bob.expect_type("message.create")["data"]["conversationId"],
        "conv-explicit"
    );

    // The same derivation on a fresh server (not a random per-process value).
    drop((alice, bob, carol));
    let server2 = TestServer::start(&[]);
    let mut alice = server2.connect("/ws?user_id=alice");
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "z", "to": "bob", "content": "x"}),
    );
    assert_eq!(
        assert_ack(&alice.expect_type("message.ack"), "z")["conversationId"],
        c1
    );
}

#[test]
fn duplicate_client_msg_id_is_acked_again_not_redelivered() {
    let server = TestServer::start(&[]);
    let mut alice = devices(&server, "alice");
    let mut bob = devices(&server, "bob");

    let send =
        json!({"type": "message.send", "clientMsgId": "dup-1", "to": "bob", "content": "once"});
    alice[0].send_json(send.clone());
    let first = assert_ack(&alice[0].expect_type("message.ack"), "dup-1");
    for c in bob.iter_mut().chain(alice[1..].iter_mut()) {
        assert_create(
            &c.expect_type("message.create"),
            &first,
            "alice",
            "bob",
            "once",
            None,
        );
    }

    // Resent from the same device and from another device of the same user.
    alice[0].send_json(send.clone());
    let again = assert_ack(&alice[0].expect_type("message.ack"), "dup-1");
    assert_eq!(again, first, "a duplicate gets the identical ack");
    alice[2].send_json(send.clone());
    let again = assert_ack(&alice[2].expect_type("message.ack"), "dup-1");
    assert_eq!(
        again, first,
        "a duplicate from another device gets the identical ack"
    );
    for c in bob.iter_mut().chain(alice.iter_mut()) {
        c.expect_silence(150);
    }

    // Another user may use the same clientMsgId: a new message.
    let mut dave = server.connect("/ws?user_id=dave");
    dave.send_json(send);
    let other = assert_ack(&dave.expect_type("message.ack"), "dup-1");
    assert_ne!(other["serverMsgId"], first["serverMsgId"]);
    for c in bob.iter_mut() {
        assert_create(
            &c.expect_type("message.create"),
            &other,
            "dave",
            "bob",
            "once",
            None,
        );
    }
}

#[test]
fn message_to_self_reaches_other_devices_once() {
    let server = TestServer::start(&[]);
    let mut alice = devices(&server, "alice");
    alice[1].send_json(
        json!({"type": "message.send", "clientMsgId": "self-1", "to": "alice", "content": "note"}),
    );
    let ack = assert_ack(&alice[1].expect_type("message.ack"), "self-1");
    for (i, c) in alice.iter_mut().enumerate() {
        if i != 1 {
            assert_create(
                &c.expect_type("message.create"),
                &ack,
                "alice",
                "alice",
                "note",
                None,
            );
        }
    }
    for c in alice.iter_mut() {
        c.expect_silence(150);
    }
}

#[test]
fn message_to_offline_user_is_acked() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("/ws?user_id=alice");
    alice.send_json(json!({"type": "message.send", "clientMsgId": "off-1", "to": "nobody", "content": "hello?"}));
    assert_ack(&alice.expect_type("message.ack"), "off-1");
}

/// The harness's RFC 3339 parser, which the sentAt checks above rely on.
#[test]
fn harness_rfc3339_parser_known_instants() {
    assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(
        parse_rfc3339_ms("2000-02-29T00:00:00.123Z"),
        Some(951_782_400_123)
    );
    assert_eq!(
        parse_rfc3339_ms("2000-02-29T01:00:00.123+01:00"),
        Some(951_782_400_123)
    );
    assert_eq!(parse_rfc3339_ms("2000-02-29 00:00:00Z"), None);
}
