//! Typing indicators over real sockets (docs/protocol/typing-receipts.md): the room form (the
//! room's other subscribers, never the sender), the conversation form (every device of `to`
//! and the sender's other devices), renewal coalescing, the server's stop after `typing_ttl`,
//! stops on disconnect, every error, the per-connection limit, `address_policy: claim`, and
//! typing frames dropped first for a reader that falls behind. Senders and recipients sit on
//! different shards.

mod common;

use std::time::{Duration, Instant};

use common::jwt;
use common::{metric, now_s, Client, TestServer};
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

/// A room-form event, checked field by field.
fn assert_room_event(v: &Value, kind: &str, user: &str, room: &str) {
    assert_eq!(
        *v,
        json!({"type": kind, "room": room, "data": {"user_id": user, "room": room},
               "timestamp": v["timestamp"]}),
        "{v}"
    );
}

/// A conversation-form event, checked field by field.
fn assert_conv_event(v: &Value, kind: &str, user: &str, to: &str, conversation: &str) {
    assert_eq!(
        *v,
        json!({"type": kind, "data": {"user_id": user, "to": to, "conversationId": conversation},
               "timestamp": v["timestamp"]}),
        "{v}"
    );
}

fn silent(clients: &mut [&mut Client]) {
    for c in clients {
        c.expect_silence(200);
    }
}

#[test]
fn room_typing_reaches_the_other_subscribers_and_renewals_coalesce() {
    let server = server(&[]);
    let mut alice = on(&server, "alice", 0);
    let mut alice2 = on(&server, "alice", 1);
    let mut bob = on(&server, "bob", 1);
    let mut carol = on(&server, "carol", 0); // not in the room
    for c in [&mut alice, &mut alice2, &mut bob] {
        c.subscribe("chat");
    }

    alice.send_json(json!({"type": "typing.start", "room": "chat", "id": "t1"}));
    for c in [&mut bob, &mut alice2] {
        let v = c.expect_type("typing.start");
        assert_room_event(&v, "typing.start", "alice", "chat");
    }
    // No reply frame to the sender (like publish), nothing outside the room.
    silent(&mut [&mut alice, &mut carol]);

    // A renewal inside the TTL: nothing for anyone.
    alice.send_json(json!({"type": "typing.start", "room": "chat"}));
    silent(&mut [&mut bob, &mut alice2, &mut alice]);

    alice.send_json(json!({"type": "typing.stop", "room": "chat"}));
    for c in [&mut bob, &mut alice2] {
        let v = c.expect_type("typing.stop");
        assert_room_event(&v, "typing.stop", "alice", "chat");
    }
    // A stop with no active state sends nothing.
    alice.send_json(json!({"type": "typing.stop", "room": "chat", "id": 2}));
    silent(&mut [&mut bob, &mut alice2, &mut alice]);

    // bob types back: alice's two devices see it, bob's own connection does not.
    bob.send_json(json!({"type": "typing.start", "room": "chat"}));
    for c in [&mut alice, &mut alice2] {
        assert_room_event(
            &c.expect_type("typing.start"),
            "typing.start",
            "bob",
            "chat",
        );
    }
    silent(&mut [&mut bob, &mut carol]);

    server.wait_metrics("typing counters", |t| {
        metric(t, "switchboard_typing_events_total") == Some(3)
            && metric(t, "switchboard_typing_coalesced_total") == Some(1)
    });
}

#[test]
fn conversation_typing_reaches_every_device_of_to_and_the_senders_other_devices() {
    let server = server(&[]);
    let mut alice = on(&server, "alice", 0);
    let mut alice2 = on(&server, "alice", 1);
    let mut bob = on(&server, "bob", 1);
    let mut bob2 = on(&server, "bob", 0);
    let mut carol = on(&server, "carol", 1);

    // Without conversationId: the derived one (the same as direct messages use).
    alice.send_json(json!({"type": "typing.start", "to": "bob", "id": 7}));
    for c in [&mut bob, &mut bob2, &mut alice2] {
        let v = c.expect_type("typing.start");
        assert_conv_event(&v, "typing.start", "alice", "bob", ALICE_BOB);
    }
    silent(&mut [&mut alice, &mut carol]);

    // Given conversationId: copied, and another typing state than the derived one.
    alice.send_json(json!({"type": "typing.start", "to": "bob", "conversationId": "group-7"}));
    for c in [&mut bob, &mut bob2, &mut alice2] {
        let v = c.expect_type("typing.start");
        assert_conv_event(&v, "typing.start", "alice", "bob", "group-7");
    }
    alice.send_json(json!({"type": "typing.start", "to": "bob", "conversationId": "group-7"}));
    silent(&mut [&mut bob, &mut bob2, &mut alice2]);

    alice.send_json(json!({"type": "typing.stop", "to": "bob"}));
    for c in [&mut bob, &mut bob2, &mut alice2] {
        let v = c.expect_type("typing.stop");
        assert_conv_event(&v, "typing.stop", "alice", "bob", ALICE_BOB);
    }
    silent(&mut [&mut alice, &mut carol]);

    // Typing to yourself reaches your other devices once.
    alice.send_json(json!({"type": "typing.start", "to": "alice", "conversationId": "notes"}));
    let v = alice2.expect_type("typing.start");
    assert_conv_event(&v, "typing.start", "alice", "alice", "notes");
    silent(&mut [&mut alice2, &mut alice, &mut bob]);
}

#[test]
fn typing_ends_by_itself_after_the_ttl_and_renewals_extend_it() {
    let server = server(&[("SWITCHBOARD_TYPING_TTL", "1s")]);
    let mut alice = on(&server, "alice", 0);
    let mut bob = on(&server, "bob", 1);
    bob.subscribe("chat");
    alice.subscribe("chat");

    // Not renewed: the server's own typing.stop, about a second later.
    alice.send_json(json!({"type": "typing.start", "to": "bob"}));
    assert_conv_event(
        &bob.expect_type("typing.start"),
        "typing.start",
        "alice",
        "bob",
        ALICE_BOB,
    );
    let v = bob.expect_type("typing.stop");
    assert_conv_event(&v, "typing.stop", "alice", "bob", ALICE_BOB);
    alice.expect_silence(100);

    // Renewed after 600 ms: no stop until about a second after the renewal (at least 900 ms
    // on the 100 ms wheel), so none within 700 ms of it; then the stop.
    alice.send_json(json!({"type": "typing.start", "room": "chat"}));
    assert_room_event(
        &bob.expect_type("typing.start"),
        "typing.start",
        "alice",
        "chat",
    );
    std::thread::sleep(Duration::from_millis(600));
    alice.send_json(json!({"type": "typing.start", "room": "chat"}));
    let renewed = Instant::now();
    bob.expect_silence(700);
    let v = bob.expect_type("typing.stop");
    assert_room_event(&v, "typing.stop", "alice", "chat");
    assert!(renewed.elapsed() >= Duration::from_millis(700));

    // After the TTL stop the state is gone: a new start is sent again.
    alice.send_json(json!({"type": "typing.start", "room": "chat"}));
    bob.expect_type("typing.start");
    server.wait_metrics("TTL stops", |t| {
        metric(t, "switchboard_typing_ttl_stops_total") == Some(2)
            && metric(t, "switchboard_typing_coalesced_total") == Some(1)
    });
}

#[test]
fn disconnect_ends_every_typing_state_of_the_connection() {
    let server = server(&[]);
    let mut alice = on(&server, "alice", 0);
    let mut alice2 = on(&server, "alice", 1);
    let mut bob = on(&server, "bob", 1);
    for c in [&mut alice, &mut bob] {
        c.subscribe("chat");
    }
    alice.send_json(json!({"type": "typing.start", "room": "chat"}));
    alice.send_json(json!({"type": "typing.start", "to": "bob"}));
    for _ in 0..2 {
        bob.expect_type("typing.start");
    }
    assert_conv_event(
        &alice2.expect_type("typing.start"),
        "typing.start",
        "alice",
        "bob",
        ALICE_BOB,
    );

    alice.close();
    let stops: Vec<Value> = (0..2).map(|_| bob.expect_type("typing.stop")).collect();
    let room_stop = stops
        .iter()
        .find(|v| v.get("room").is_some())
        .expect("room stop");
    assert_room_event(room_stop, "typing.stop", "alice", "chat");
    let conv_stop = stops
        .iter()
        .find(|v| v.get("room").is_none())
        .expect("conv stop");
    assert_conv_event(conv_stop, "typing.stop", "alice", "bob", ALICE_BOB);
    // alice's other device is not in the room: it gets the conversation's stop only.
    let v = alice2.expect_type("typing.stop");
    assert_conv_event(&v, "typing.stop", "alice", "bob", ALICE_BOB);
    silent(&mut [&mut bob, &mut alice2]);
}

#[test]
fn every_error_carries_the_id() {
    let server = server(&[]);
    let mut anon = server.connect_on_shard("/ws", 0);
    let mut alice = on(&server, "alice", 1);
    let mut bob = on(&server, "bob", 0);
    alice.subscribe("chat");
    bob.subscribe("chat");

    for kind in ["typing.start", "typing.stop"] {
        anon.send_json(json!({"type": kind, "to": "bob", "id": "a1"}));
        assert_eq!(anon.expect_error("not allowed")["id"], "a1");
        anon.send_json(json!({"type": kind, "room": "chat", "id": "a2"}));
        assert_eq!(anon.expect_error("not allowed")["id"], "a2");

        let long = "x".repeat(257);
        let cases: Vec<(Value, &str)> = vec![
            (json!({}), "room, to or conversationId is required"),
            (
                json!({"room": null, "to": null}),
                "room, to or conversationId is required",
            ),
            (
                json!({"room": "chat", "to": "bob"}),
                "give room or to, not both",
            ),
            (json!({"room": ""}), "room name is required"),
            (json!({"room": long}), "room name too long"),
            (json!({"room": "elsewhere"}), "not subscribed to this room"),
            (json!({"to": ""}), "to is required"),
            (json!({"to": long}), "to is required"),
            (
                json!({"to": "bob", "conversationId": long}),
                "conversationId too long",
            ),
            (json!({"room": 5}), "invalid JSON format"),
            (json!({"to": ["bob"]}), "invalid JSON format"),
            (
                json!({"to": "bob", "conversationId": 1}),
                "invalid JSON format",
            ),
        ];
        for (i, (mut cmd, text)) in cases.into_iter().enumerate() {
            cmd["type"] = json!(kind);
            cmd["id"] = json!(i);
            alice.send_json(cmd.clone());
            let e = alice.expect_error(text);
            assert_eq!(e["id"], i, "{cmd} -> {e}");
        }
    }
    // Nothing reached anybody.
    silent(&mut [&mut bob, &mut alice, &mut anon]);
}

#[test]
fn typing_targets_per_connection_are_bounded() {
    const MAX: usize = 16; // TYPING_TARGETS_PER_CONNECTION_MAX
    let server = server(&[]);
    let mut alice = on(&server, "alice", 0);
    let mut bob = on(&server, "bob", 1);
    for i in 0..MAX {
        alice.send_json(
            json!({"type": "typing.start", "to": "bob", "conversationId": format!("c{i}")}),
        );
        bob.expect_type("typing.start");
    }
    alice.send_json(
        json!({"type": "typing.start", "to": "bob", "conversationId": "one-more", "id": "x"}),
    );
    assert_eq!(alice.expect_error("too many typing targets")["id"], "x");
    // Renewing a held target is no new target; ending one makes room.
    alice.send_json(json!({"type": "typing.start", "to": "bob", "conversationId": "c0"}));
    alice.send_json(json!({"type": "typing.stop", "to": "bob", "conversationId": "c3"}));
    assert_eq!(
        bob.expect_type("typing.stop")["data"]["conversationId"],
        "c3"
    );
    alice.send_json(json!({"type": "typing.start", "to": "bob", "conversationId": "one-more"}));
    assert_eq!(
        bob.expect_type("typing.start")["data"]["conversationId"],
        "one-more"
    );
    alice.expect_silence(100);
    // Another connection of the same user has its own budget.
    let mut alice2 = on(&server, "alice", 1);
    alice2.send_json(json!({"type": "typing.start", "to": "bob", "conversationId": "c0"}));
    assert_eq!(
        bob.expect_type("typing.start")["data"]["conversationId"],
        "c0"
    );
}

#[test]
fn claim_policy_limits_conversation_typing_to_allowed_users() {
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
    let alice_t = token("alice", Some(&["bob"]));
    let mut alice = server.connect_on_shard(&format!("/ws?token={alice_t}"), 0);
    let mut bob = server.connect_on_shard(&format!("/ws?token={}", token("bob", None)), 1);
    let mut carol = server.connect_on_shard(&format!("/ws?token={}", token("carol", None)), 1);

    alice.send_json(json!({"type": "typing.start", "to": "bob"}));
    assert_conv_event(
        &bob.expect_type("typing.start"),
        "typing.start",
        "alice",
        "bob",
        ALICE_BOB,
    );
    alice.send_json(json!({"type": "typing.start", "to": "carol", "id": 1}));
    assert_eq!(alice.expect_error("not allowed")["id"], 1);
    carol.expect_silence(200);
    // No claim: nobody may be addressed.
    bob.send_json(json!({"type": "typing.start", "to": "alice", "id": 2}));
    assert_eq!(bob.expect_error("not allowed")["id"], 2);
    // The room form is governed by room membership, not by the address policy.
    carol.subscribe("chat");
    bob.subscribe("chat");
    bob.send_json(json!({"type": "typing.start", "room": "chat"}));
    assert_room_event(
        &carol.expect_type("typing.start"),
        "typing.start",
        "bob",
        "chat",
    );
}

/// A connection whose socket receive buffer is small, on `shard`.
fn slow_on(server: &TestServer, path: &str, shard: u64) -> Client {
    for _ in 0..64 {
        let c = server.connect_small_rcvbuf(path, 4096);
        if c.welcome["data"]["shard"].as_u64() == Some(shard) {
            return c;
        }
        c.close();
    }
    panic!("no slow connection landed on shard {shard}");
}

#[test]
fn typing_is_dropped_first_for_a_reader_that_falls_behind() {
    // 12 x 16 KiB queued for a reader that does not read: its sockets hold a few tens of KiB,
    // so over 128 KiB (half the queue bound) stays queued, under the 256 KiB that closes it.
    let server = server(&[
        ("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", "256KiB"),
        ("SWITCHBOARD_SO_SNDBUF", "4KiB"),
    ]);
    let mut alice = on(&server, "alice", 0);
    let mut fast = on(&server, "fast", 1);
    let mut slow = slow_on(&server, "/ws?user_id=slow", 1);
    for c in [&mut alice, &mut fast, &mut slow] {
        c.subscribe("flood");
    }
    const N: usize = 12;
    let pad = "p".repeat(16 * 1024);
    for seq in 0..N {
        alice.send_json(
            json!({"type": "publish", "room": "flood", "data": {"seq": seq, "pad": pad}}),
        );
    }
    for c in [&mut alice, &mut fast] {
        for seq in 0..N {
            assert_eq!(c.expect_type("message")["data"]["seq"], seq);
        }
    }
    // Same sender shard as the publishes: slow's shard has queued them before this arrives.
    alice.send_json(json!({"type": "typing.start", "room": "flood"}));
    assert_room_event(
        &fast.expect_type("typing.start"),
        "typing.start",
        "alice",
        "flood",
    );
    server.wait_metrics("a dropped typing frame", |t| {
        metric(t, "switchboard_droppable_dropped_total") == Some(1)
    });
    // The slow reader gets every message, in order, and no typing.start.
    for seq in 0..N {
        let m = slow.expect_type("message");
        assert_eq!(m["data"]["seq"], seq);
    }
    slow.expect_silence(300);
    // Caught up: the next typing frame reaches it.
    alice.send_json(json!({"type": "typing.stop", "room": "flood"}));
    assert_room_event(
        &slow.expect_type("typing.stop"),
        "typing.stop",
        "alice",
        "flood",
    );
    assert_room_event(
        &fast.expect_type("typing.stop"),
        "typing.stop",
        "alice",
        "flood",
    );
}
