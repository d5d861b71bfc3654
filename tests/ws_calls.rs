//! Calls over real sockets (PROTOCOL.md section 5, docs/protocol/calls.md): offer -> incoming
//! on every callee device, answer -> the caller and `answered_elsewhere`, ICE between the two
//! connections only, hangup and reject, the ring timeout, disconnects, glare, the errors and
//! the call limit. Two shards; the caller and the callee's devices sit on different shards in
//! every case (the call's owner shard is then another shard for at least one of them).

mod common;

use common::{Client, TestServer};
use serde_json::{json, Value};

const EXPOSE: (&str, &str) = ("SWITCHBOARD_EXPOSE_SHARD", "true");

fn start(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![EXPOSE];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

/// alice's device on shard `s`, bob's devices on the other shard and on `s`.
fn parties_on(server: &TestServer, s: u64) -> (Client, Client, Client) {
    let a = server.connect_on_shard("/ws?user_id=alice", s);
    let b1 = server.connect_on_shard("/ws?user_id=bob", 1 - s);
    let b2 = server.connect_on_shard("/ws?user_id=bob", s);
    (a, b1, b2)
}

fn parties(server: &TestServer) -> (Client, Client, Client) {
    parties_on(server, 0)
}

fn offer(c: &mut Client, to: &str, call_id: &str) {
    c.send_json(json!({"type": "call.offer", "to": to, "call_id": call_id,
        "sdp": {"type": "offer", "sdp": "v=0 offer"}}));
}

fn answer(c: &mut Client, to: &str, call_id: &str) {
    c.send_json(json!({"type": "call.answer", "to": to, "call_id": call_id,
        "sdp": {"type": "answer", "sdp": "v=0 answer"}}));
}

fn ice(c: &mut Client, to: &str, call_id: &str, n: u64) {
    c.send_json(json!({"type": "call.ice", "to": to, "call_id": call_id,
        "candidate": {"candidate": format!("candidate:{n}"), "sdpMid": "0", "sdpMLineIndex": 0}}));
}

fn hangup(c: &mut Client, to: &str, call_id: &str) {
    c.send_json(json!({"type": "call.hangup", "to": to, "call_id": call_id}));
}

fn data_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v["data"]
        .as_object()
        .unwrap_or_else(|| panic!("no data in {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn expect_incoming(c: &mut Client, call_id: &str, from: &str) {
    let v = c.expect_type("call.incoming");
    assert_eq!(data_keys(&v), ["call_id", "from", "sdp"], "{v}");
    assert_eq!(v["data"]["call_id"], call_id, "{v}");
    assert_eq!(v["data"]["from"], from, "{v}");
    assert_eq!(
        v["data"]["sdp"],
        json!({"type": "offer", "sdp": "v=0 offer"}),
        "{v}"
    );
}

fn expect_ice(c: &mut Client, call_id: &str, from: &str, n: u64) {
    let v = c.expect_type("call.ice");
    assert_eq!(data_keys(&v), ["call_id", "candidate", "from"], "{v}");
    assert_eq!(v["data"]["call_id"], call_id, "{v}");
    assert_eq!(v["data"]["from"], from, "{v}");
    assert_eq!(
        v["data"]["candidate"]["candidate"],
        format!("candidate:{n}"),
        "{v}"
    );
}

fn expect_ended(c: &mut Client, call_id: &str, reason: &str) {
    let v = c.expect_type("call.ended");
    assert_eq!(data_keys(&v), ["call_id", "reason"], "{v}");
    assert_eq!(v["data"]["call_id"], call_id, "{v}");
    assert_eq!(v["data"]["reason"], reason, "{v}");
}

/// An error with `data.call_id` (and the command's `id` when it had one).
fn expect_call_error(c: &mut Client, text: &str, call_id: &str, id: Option<u64>) {
    let v = c.expect_error(text);
    assert_eq!(v["data"]["call_id"], call_id, "{v}");
    match id {
        Some(id) => assert_eq!(v["id"], id, "{v}"),
        None => assert!(v.get("id").is_none(), "{v}"),
    }
}

#[test]
fn offer_answer_ice_hangup_across_shards() {
    let server = start(&[]);
    // The caller on the owner shard of alice<->bob, then on the other one.
    for s in [0, 1] {
        let (a, b1, b2) = parties_on(&server, s);
        offer_answer_ice_hangup(a, b1, b2);
    }
}

fn offer_answer_ice_hangup(mut a: Client, mut b1: Client, mut b2: Client) {
    offer(&mut a, "bob", "call-1");
    expect_incoming(&mut b1, "call-1", "alice");
    expect_incoming(&mut b2, "call-1", "alice");

    // Before the answer the caller's candidates go to every ringing device; a ringing
    // device's own candidates are refused.
    ice(&mut a, "bob", "call-1", 1);
    expect_ice(&mut b1, "call-1", "alice", 1);
    expect_ice(&mut b2, "call-1", "alice", 1);
    b2.send_json(
        json!({"type": "call.ice", "id": 5, "to": "alice", "call_id": "call-1",
        "candidate": "candidate:x"}),
    );
    expect_call_error(&mut b2, "call not answered", "call-1", Some(5));

    answer(&mut b1, "alice", "call-1");
    let v = a.expect_type("call.answer");
    assert_eq!(data_keys(&v), ["call_id", "from", "sdp"], "{v}");
    assert_eq!(v["data"]["from"], "bob", "{v}");
    assert_eq!(
        v["data"]["sdp"],
        json!({"type": "answer", "sdp": "v=0 answer"})
    );
    expect_ended(&mut b2, "call-1", "answered_elsewhere");

    // From now on only the offering and the answering connection talk.
    ice(&mut a, "bob", "call-1", 2);
    expect_ice(&mut b1, "call-1", "alice", 2);
    ice(&mut b1, "alice", "call-1", 3);
    expect_ice(&mut a, "call-1", "bob", 3);
    b2.send_json(
        json!({"type": "call.ice", "id": 6, "to": "alice", "call_id": "call-1",
        "candidate": "candidate:y"}),
    );
    expect_call_error(&mut b2, "unknown call", "call-1", Some(6));
    b2.send_json(
        json!({"type": "call.answer", "id": 7, "to": "alice", "call_id": "call-1",
        "sdp": "v=0"}),
    );
    expect_call_error(&mut b2, "call already answered", "call-1", Some(7));
    b2.expect_silence(200);

    b1.send_json(
        json!({"type": "call.hangup", "to": "alice", "call_id": "call-1",
        "reason": "bye"}),
    );
    expect_ended(&mut a, "call-1", "bye");
    // Ended: commands about it are unknown calls (answered by the owner shard).
    a.send_json(
        json!({"type": "call.ice", "id": "i-1", "to": "bob", "call_id": "call-1",
        "candidate": "candidate:z"}),
    );
    let v = a.expect_error("unknown call");
    assert_eq!(v["id"], "i-1");
    assert_eq!(v["data"]["call_id"], "call-1");
    b1.expect_silence(200);
    b2.expect_silence(100);
    a.expect_silence(100);
}

#[test]
fn reject_and_cancel_while_ringing() {
    let server = start(&[]);
    let (mut a, mut b1, mut b2) = parties(&server);

    // A ringing device declines: the caller hears `rejected`, the other device stops ringing.
    offer(&mut a, "bob", "r-1");
    expect_incoming(&mut b1, "r-1", "alice");
    expect_incoming(&mut b2, "r-1", "alice");
    hangup(&mut b1, "alice", "r-1");
    expect_ended(&mut a, "r-1", "rejected");
    expect_ended(&mut b2, "r-1", "rejected_elsewhere");
    b1.expect_silence(200);

    // The caller cancels: every ringing device hears it, with the given reason.
    offer(&mut a, "bob", "r-2");
    expect_incoming(&mut b1, "r-2", "alice");
    expect_incoming(&mut b2, "r-2", "alice");
    a.send_json(json!({"type": "call.hangup", "to": "bob", "call_id": "r-2",
        "reason": "cancelled"}));
    expect_ended(&mut b1, "r-2", "cancelled");
    expect_ended(&mut b2, "r-2", "cancelled");
    a.expect_silence(200);

    // A call_id can be used again once its call ended.
    offer(&mut a, "bob", "r-2");
    expect_incoming(&mut b1, "r-2", "alice");
    expect_incoming(&mut b2, "r-2", "alice");
}

#[test]
fn ring_timeout_ends_both_sides() {
    let server = start(&[("SWITCHBOARD_RING_TIMEOUT", "1s")]);
    let (mut a, mut b1, mut b2) = parties(&server);
    offer(&mut a, "bob", "t-1");
    expect_incoming(&mut b1, "t-1", "alice");
    expect_incoming(&mut b2, "t-1", "alice");
    expect_ended(&mut a, "t-1", "timeout");
    expect_ended(&mut b1, "t-1", "timeout");
    expect_ended(&mut b2, "t-1", "timeout");
    answer(&mut b1, "alice", "t-1");
    expect_call_error(&mut b1, "unknown call", "t-1", None);

    // An answered call does not time out.
    offer(&mut a, "bob", "t-2");
    expect_incoming(&mut b1, "t-2", "alice");
    expect_incoming(&mut b2, "t-2", "alice");
    answer(&mut b2, "alice", "t-2");
    a.expect_type("call.answer");
    expect_ended(&mut b1, "t-2", "answered_elsewhere");
    a.expect_silence(1500);
    ice(&mut a, "bob", "t-2", 9);
    expect_ice(&mut b2, "t-2", "alice", 9);
    server.wait_metrics("the timeout counter", |m| {
        m.contains("switchboard_calls_ended_timeout_total 1\n")
    });
}

#[test]
fn disconnect_ends_calls() {
    let server = start(&[]);
    // The callee's answering device goes away mid-call.
    let (mut a, mut b1, mut b2) = parties(&server);
    offer(&mut a, "bob", "d-1");
    expect_incoming(&mut b1, "d-1", "alice");
    expect_incoming(&mut b2, "d-1", "alice");
    answer(&mut b1, "alice", "d-1");
    a.expect_type("call.answer");
    expect_ended(&mut b2, "d-1", "answered_elsewhere");
    drop(b1);
    expect_ended(&mut a, "d-1", "disconnected");

    // The caller goes away mid-call (a close handshake this time).
    let mut b3 = server.connect_on_shard("/ws?user_id=bob", 1);
    offer(&mut a, "bob", "d-2");
    expect_incoming(&mut b2, "d-2", "alice");
    expect_incoming(&mut b3, "d-2", "alice");
    answer(&mut b3, "alice", "d-2");
    a.expect_type("call.answer");
    expect_ended(&mut b2, "d-2", "answered_elsewhere");
    a.close();
    expect_ended(&mut b3, "d-2", "disconnected");

    // The caller goes away while ringing: every ringing device hears it. A ringing device
    // that goes away does not end the call.
    let mut a2 = server.connect_on_shard("/ws?user_id=alice", 1);
    offer(&mut a2, "bob", "d-3");
    expect_incoming(&mut b2, "d-3", "alice");
    expect_incoming(&mut b3, "d-3", "alice");
    drop(b2);
    a2.expect_silence(300);
    drop(a2);
    expect_ended(&mut b3, "d-3", "disconnected");
    server.wait_metrics("the disconnect counter", |m| {
        m.contains("switchboard_calls_ended_disconnected_total 3\n")
    });
}

#[test]
fn glare_keeps_the_offer_of_the_user_that_sorts_first() {
    let server = start(&[]);
    let mut a = server.connect_on_shard("/ws?user_id=alice", 0);
    let mut b = server.connect_on_shard("/ws?user_id=bob", 1);

    // bob rings alice, then alice calls bob: "alice" < "bob", so bob's call ends for both
    // parties that saw it, and alice's rings.
    offer(&mut b, "alice", "from-bob");
    expect_incoming(&mut a, "from-bob", "bob");
    offer(&mut a, "bob", "from-alice");
    expect_ended(&mut b, "from-bob", "glare");
    expect_ended(&mut a, "from-bob", "glare");
    expect_incoming(&mut b, "from-alice", "alice");
    hangup(&mut a, "bob", "from-alice");
    expect_ended(&mut b, "from-alice", "hangup");

    // alice rings bob, then bob calls alice: bob's offer loses; only bob hears of it.
    offer(&mut a, "bob", "a-2");
    expect_incoming(&mut b, "a-2", "alice");
    offer(&mut b, "alice", "b-2");
    expect_ended(&mut b, "b-2", "glare");
    a.expect_silence(200);
    hangup(&mut a, "bob", "a-2");
    expect_ended(&mut b, "a-2", "hangup");

    // Both at once: whatever order the owner sees, alice's call is the one that rings and
    // bob's ends with glare.
    offer(&mut a, "bob", "a-3");
    offer(&mut b, "alice", "b-3");
    let mut seen_b = Vec::new();
    for _ in 0..2 {
        let v = b.recv_json();
        seen_b.push((v["type"].clone(), v["data"]["call_id"].clone()));
    }
    seen_b.sort_by_key(|(t, _)| t.to_string());
    assert_eq!(
        seen_b,
        [
            (json!("call.ended"), json!("b-3")),
            (json!("call.incoming"), json!("a-3"))
        ]
    );
    answer(&mut b, "alice", "a-3");
    // alice may first have seen bob's offer ring and end (if it reached the owner first).
    let mut v = a.recv_json();
    if v["type"] == "call.incoming" {
        expect_ended(&mut a, "b-3", "glare");
        v = a.recv_json();
    }
    assert_eq!(v["type"], "call.answer", "{v}");
    assert_eq!(v["data"]["call_id"], "a-3", "{v}");
}

#[test]
fn errors_carry_the_call_id() {
    let server = start(&[]);
    let mut a = server.connect_on_shard("/ws?user_id=alice", 0);
    let mut b = server.connect_on_shard("/ws?user_id=bob", 1);

    // Unknown calls, answered by the pair's owner shard, whichever it is.
    for kind in ["call.answer", "call.ice", "call.hangup"] {
        a.send_json(
            json!({"type": kind, "id": 1, "to": "bob", "call_id": "nope",
            "sdp": "v=0", "candidate": "c"}),
        );
        expect_call_error(&mut a, "unknown call", "nope", Some(1));
    }
    // Only the callee answers, and only the offering connection speaks for the caller.
    offer(&mut a, "bob", "e-1");
    expect_incoming(&mut b, "e-1", "alice");
    answer(&mut a, "bob", "e-1");
    expect_call_error(&mut a, "unknown call", "e-1", None);
    let mut a2 = server.connect_on_shard("/ws?user_id=alice", 1);
    hangup(&mut a2, "bob", "e-1");
    expect_call_error(&mut a2, "unknown call", "e-1", None);
    let mut carol = server.connect_on_shard("/ws?user_id=carol", 1);
    answer(&mut carol, "alice", "e-1");
    expect_call_error(&mut carol, "unknown call", "e-1", None);
    a.send_json(
        json!({"type": "call.offer", "id": 2, "to": "bob", "call_id": "e-1", "sdp": "v=0"}),
    );
    expect_call_error(&mut a, "call_id already in use", "e-1", Some(2));
    b.expect_silence(200);

    // Checked where the command arrives.
    let cases = [
        (
            json!({"type": "call.offer", "id": 3, "to": "alice", "call_id": "s", "sdp": "v=0"}),
            "not allowed",
            Some("s"),
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "sdp": "v=0"}),
            "call_id is required",
            None,
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "call_id": "", "sdp": "v=0"}),
            "call_id is required",
            None,
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "call_id": "x".repeat(129), "sdp": "v=0"}),
            "call_id too long",
            None,
        ),
        (
            json!({"type": "call.offer", "id": 3, "call_id": "k", "sdp": "v=0"}),
            "to is required",
            Some("k"),
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "call_id": "k"}),
            "sdp is required",
            Some("k"),
        ),
        (
            json!({"type": "call.answer", "id": 3, "to": "bob", "call_id": "k", "sdp": null}),
            "sdp is required",
            Some("k"),
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "call_id": "k", "sdp": "x".repeat(33 * 1024)}),
            "message too large",
            Some("k"),
        ),
        (
            json!({"type": "call.ice", "id": 3, "to": "bob", "call_id": "k"}),
            "candidate is required",
            Some("k"),
        ),
        (
            json!({"type": "call.ice", "id": 3, "to": "bob", "call_id": "k", "candidate": "x".repeat(2100)}),
            "message too large",
            Some("k"),
        ),
        (
            json!({"type": "call.hangup", "id": 3, "to": "bob", "call_id": "k", "reason": "x".repeat(65)}),
            "reason too long",
            Some("k"),
        ),
        (
            json!({"type": "call.offer", "id": 3, "to": "bob", "call_id": 42, "sdp": "v=0"}),
            "invalid JSON format",
            None,
        ),
    ];
    for (cmd, text, call_id) in cases {
        a.send_json(cmd.clone());
        let v = a.expect_error(text);
        assert_eq!(v["id"], 3, "{cmd} -> {v}");
        match call_id {
            Some(c) => assert_eq!(v["data"]["call_id"], c, "{cmd} -> {v}"),
            None => assert!(v.get("data").is_none(), "{cmd} -> {v}"),
        }
    }
    // A field a command does not read may have any type.
    a.send_json(json!({"type": "call.ice", "to": "bob", "call_id": "e-1",
        "candidate": "candidate:1", "sdp": 5, "reason": []}));
    let v = b.expect_type("call.ice");
    assert_eq!(v["data"]["candidate"], "candidate:1");

    // A callee with no device connected: nothing to ring, the offer ends at once.
    offer(&mut a, "nobody", "u-1");
    expect_ended(&mut a, "u-1", "unavailable");
    hangup(&mut a, "nobody", "u-1");
    expect_call_error(&mut a, "unknown call", "u-1", None);

    // Without an identity nothing can be called.
    let mut anon = server.connect_on_shard("/ws", 1);
    anon.send_json(
        json!({"type": "call.offer", "id": 4, "to": "bob", "call_id": "an", "sdp": "v=0"}),
    );
    expect_call_error(&mut anon, "not allowed", "an", Some(4));
    b.expect_silence(200);
}

#[test]
fn calls_per_user_are_limited_node_wide() {
    // The pairs' calls live on different owner shards, and still add up per user.
    use switchboard::shard::service::calls::owner;
    assert_ne!(owner("alice", "bob", 2), owner("alice", "ivan", 2));
    assert_ne!(owner("alice", "bob", 2), owner("bob", "erin", 2));
    let server = start(&[("SWITCHBOARD_MAX_CALLS_PER_USER", "2")]);
    let mut a = server.connect_on_shard("/ws?user_id=alice", 0);
    let mut bob = server.connect_on_shard("/ws?user_id=bob", 1);
    let mut ivan = server.connect_on_shard("/ws?user_id=ivan", 1);
    let mut dave = server.connect_on_shard("/ws?user_id=dave", 0);

    offer(&mut a, "bob", "l-1");
    expect_incoming(&mut bob, "l-1", "alice");
    offer(&mut a, "ivan", "l-2");
    expect_incoming(&mut ivan, "l-2", "alice");
    a.send_json(
        json!({"type": "call.offer", "id": 8, "to": "dave", "call_id": "l-3", "sdp": "v=0"}),
    );
    expect_call_error(&mut a, "too many calls", "l-3", Some(8));
    dave.expect_silence(200);

    // A callee at its limit: the caller's offer ends with `busy` and nothing rings.
    let mut erin = server.connect_on_shard("/ws?user_id=erin", 0);
    offer(&mut erin, "bob", "l-4");
    expect_incoming(&mut bob, "l-4", "erin");
    let mut frank = server.connect_on_shard("/ws?user_id=frank", 1);
    offer(&mut frank, "bob", "l-5");
    expect_ended(&mut frank, "l-5", "busy");
    bob.expect_silence(200);

    // A call that ends frees its place.
    hangup(&mut a, "ivan", "l-2");
    expect_ended(&mut ivan, "l-2", "hangup");
    offer(&mut a, "dave", "l-3");
    expect_incoming(&mut dave, "l-3", "alice");
    server.wait_metrics("the calls counters", |m| {
        m.contains("switchboard_calls_offered_total 4\n")
            && m.contains("switchboard_calls_busy_total 1\n")
            && m.contains("switchboard_calls_ended_hangup_total 1\n")
    });
}
