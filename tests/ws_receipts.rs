//! Receipts over real sockets (docs/protocol/typing-receipts.md): `mark.delivered` and
//! `mark.read` reach every device of `to` and the reader's other devices (spread over both
//! shards), never the sending connection; `messageIds` copied through; every error; the
//! `max_receipt_message_ids` limit; `address_policy: claim`.

mod common;

use common::jwt;
use common::{metric, now_ms, now_s, parse_rfc3339_ms, Client, TestServer};
use serde_json::{json, Value};

/// alice <-> bob, as docs/PROTOCOL.md section 6 derives it.
const ALICE_BOB: &str = "db10e5d3-7550-5919-8bef-ae4480064bd4";

fn server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("SWITCHBOARD_EXPOSE_SHARD", "true")];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

fn on(server: &TestServer, user: &str, shard: u64) -> Client {
    server.connect_on_shard(&format!("/ws?user_id={user}"), shard)
}

/// Checks a receipt event and returns its `at` in Unix ms.
fn assert_receipt(v: &Value, kind: &str, conversation: &str, ids: &Value, by: &str) -> u64 {
    let at = v["data"]["at"]
        .as_str()
        .unwrap_or_else(|| panic!("no at: {v}"));
    assert_eq!(
        *v,
        json!({"type": kind,
               "data": {"conversationId": conversation, "messageIds": ids, "by": by, "at": at},
               "timestamp": v["timestamp"]}),
        "{v}"
    );
    assert!(at.ends_with('Z') && at.len() == 24, "RFC 3339 ms UTC: {at}");
    let ms = parse_rfc3339_ms(at).unwrap_or_else(|| panic!("at is not RFC 3339: {at}"));
    let now = now_ms();
    assert!(
        ms + 30_000 > now && ms < now + 30_000,
        "at {ms} far from {now}"
    );
    ms
}

#[test]
fn receipts_reach_every_device_of_to_and_the_readers_other_devices() {
    let server = server(&[]);
    let mut bob = on(&server, "bob", 0);
    let mut bob2 = on(&server, "bob", 1);
    let mut alice = on(&server, "alice", 1);
    let mut alice2 = on(&server, "alice", 0);
    let mut carol = on(&server, "carol", 1);

    // bob read alice's messages: alice's devices and bob's other device learn it.
    let ids = json!(["01a201a5-32a9-77b2-a173-3f47b1ef19fb", 42, "m\"3"]);
    bob.send_json(json!({"type": "mark.read", "id": "r1", "to": "alice",
                          "conversationId": "conv-1", "messageIds": ids}));
    for c in [&mut alice, &mut alice2, &mut bob2] {
        let v = c.expect_type("message.read");
        assert_receipt(&v, "message.read", "conv-1", &ids, "bob");
    }
    // No reply frame to the reader; nothing for others.
    bob.expect_silence(200);
    carol.expect_silence(100);

    // Delivered, without conversationId: the derived one.
    bob2.send_json(json!({"type": "mark.delivered", "to": "alice", "messageIds": [7]}));
    for c in [&mut alice, &mut alice2, &mut bob] {
        let v = c.expect_type("message.delivered");
        assert_receipt(&v, "message.delivered", ALICE_BOB, &json!([7]), "bob");
    }
    bob2.expect_silence(200);

    // A receipt to yourself reaches your other devices once.
    bob.send_json(
        json!({"type": "mark.read", "to": "bob", "conversationId": "notes",
                          "messageIds": ["n1"]}),
    );
    let v = bob2.expect_type("message.read");
    assert_receipt(&v, "message.read", "notes", &json!(["n1"]), "bob");
    for c in [&mut bob2, &mut bob, &mut alice] {
        c.expect_silence(200);
    }
    carol.expect_silence(100);
    server.wait_metrics("receipts counted", |t| {
        metric(t, "switchboard_receipts_total") == Some(3)
    });
}

#[test]
fn every_error_carries_the_id() {
    let server = server(&[("SWITCHBOARD_MAX_RECEIPT_MESSAGE_IDS", "3")]);
    let mut anon = server.connect_on_shard("/ws", 0);
    let mut bob = on(&server, "bob", 1);
    let mut alice = on(&server, "alice", 0);
    let long = "x".repeat(257);
    let longest = "x".repeat(256);

    for kind in ["mark.delivered", "mark.read"] {
        anon.send_json(json!({"type": kind, "id": "a", "to": "alice", "messageIds": [1]}));
        assert_eq!(anon.expect_error("not allowed")["id"], "a");

        let cases: Vec<(Value, &str)> = vec![
            (json!({"messageIds": [1]}), "message not found"),
            (json!({"to": "", "messageIds": [1]}), "to is required"),
            (json!({"to": long, "messageIds": [1]}), "to is required"),
            (
                json!({"to": "alice", "conversationId": long, "messageIds": [1]}),
                "conversationId too long",
            ),
            (json!({"to": "alice"}), "messageIds is required"),
            (
                json!({"to": "alice", "messageIds": null}),
                "messageIds is required",
            ),
            (
                json!({"to": "alice", "messageIds": []}),
                "messageIds is required",
            ),
            (
                json!({"to": "alice", "messageIds": [1, 2, 3, 4]}),
                "too many messageIds",
            ),
            (
                json!({"to": "alice", "messageIds": "m1"}),
                "invalid JSON format",
            ),
            (json!({"to": 5, "messageIds": [1]}), "invalid JSON format"),
            (
                json!({"to": "alice", "conversationId": {}, "messageIds": [1]}),
                "invalid JSON format",
            ),
        ];
        let bad = "messageIds must be strings of 1 to 256 bytes or integers";
        let mut cases = cases;
        for ids in [
            json!([""]),
            json!([long]),
            json!([1.5]),
            json!([true]),
            json!([null]),
            json!([{"id": 1}]),
            json!([[1]]),
        ] {
            cases.push((json!({"to": "alice", "messageIds": ids}), bad));
        }
        for (i, (mut cmd, text)) in cases.into_iter().enumerate() {
            cmd["type"] = json!(kind);
            cmd["id"] = json!(i);
            bob.send_json(cmd.clone());
            let e = bob.expect_error(text);
            assert_eq!(e["id"], i, "{cmd} -> {e}");
        }
        alice.expect_silence(100);

        // The edges pass: three ids (the configured most), a 256-byte id.
        bob.send_json(json!({"type": kind, "to": "alice", "messageIds": [1, "b", longest]}));
        let v = alice.expect_type(&kind.replace("mark.", "message."));
        assert_eq!(v["data"]["messageIds"], json!([1, "b", longest]));
    }
    bob.expect_silence(100);
}

#[test]
fn claim_policy_limits_receipts_to_allowed_users() {
    let server = server(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
        ("SWITCHBOARD_ADDRESS_POLICY", "claim"),
    ]);
    let token = |sub: &str, allowed: Option<&[&str]>| {
        let mut claims = json!({"sub": sub, "iat": now_s(), "exp": now_s() + 300});
        if let Some(a) = allowed {
            claims["allowed_users"] = json!(a);
        }
        jwt::hs256(&claims)
    };
    let mut bob =
        server.connect_on_shard(&format!("/ws?token={}", token("bob", Some(&["alice"]))), 0);
    let mut alice = server.connect_on_shard(&format!("/ws?token={}", token("alice", None)), 1);
    let mut carol = server.connect_on_shard(&format!("/ws?token={}", token("carol", None)), 1);

    bob.send_json(json!({"type": "mark.read", "to": "alice", "messageIds": ["m1"]}));
    let v = alice.expect_type("message.read");
    assert_receipt(&v, "message.read", ALICE_BOB, &json!(["m1"]), "bob");

    bob.send_json(json!({"type": "mark.read", "id": 1, "to": "carol", "messageIds": ["m1"]}));
    assert_eq!(bob.expect_error("not allowed")["id"], 1);
    carol.expect_silence(200);
    // Without the claim nobody may be addressed.
    alice.send_json(json!({"type": "mark.delivered", "id": 2, "to": "bob", "messageIds": [1]}));
    assert_eq!(alice.expect_error("not allowed")["id"], 2);
    bob.expect_silence(200);
}
