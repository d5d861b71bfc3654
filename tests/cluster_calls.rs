//! Calls whose parties are on different nodes (three nodes, one Redis, real processes): the
//! call's state lives on the node its offer reached, and commands from the callee's devices
//! on other nodes reach it through Redis: ringing on every node, an answer elsewhere,
//! candidates both ways, a hangup, the ring timeout, and a party's disconnect.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Client, TestServer};
use serde_json::{json, Value};

fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    let s = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_RING_TIMEOUT", "2s"),
    ]);
    s.wait_ready();
    s
}

/// Wait until `n` nodes hold the user's channel.
fn held(redis: &RedisServer, user: &str, n: i64) {
    let channel = format!("sb:{{user:{user}}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub(&channel) != n {
        assert!(Instant::now() < deadline, "{channel} not held by {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(c: &mut Client, kind: &str, to: &str, call_id: &str, extra: Value) {
    let mut v = json!({"type": kind, "to": to, "call_id": call_id});
    for (k, x) in extra.as_object().expect("object") {
        v[k] = x.clone();
    }
    c.send_json(v);
}

fn expect(c: &mut Client, kind: &str, call_id: &str) -> Value {
    let v = c.expect_type(kind);
    assert_eq!(v["data"]["call_id"], call_id, "{v}");
    v
}

#[test]
fn a_call_across_three_nodes_rings_is_answered_elsewhere_and_ends() {
    let redis = RedisServer::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let mut alice = a.connect("/ws?user_id=alice");
    let mut bob_b = b.connect("/ws?user_id=bob");
    let mut bob_c = c.connect("/ws?user_id=bob");
    held(&redis, "bob", 2);
    held(&redis, "alice", 1);

    send(
        &mut alice,
        "call.offer",
        "bob",
        "k1",
        json!({"sdp": {"type": "offer", "sdp": "v=0"}}),
    );
    for bob in [&mut bob_b, &mut bob_c] {
        let v = expect(bob, "call.incoming", "k1");
        assert_eq!(v["data"]["from"], "alice");
        assert_eq!(v["data"]["sdp"], json!({"type": "offer", "sdp": "v=0"}));
    }
    // The caller's candidates ring every callee device until the answer.
    send(
        &mut alice,
        "call.ice",
        "bob",
        "k1",
        json!({"candidate": {"candidate": "c0"}}),
    );
    expect(&mut bob_b, "call.ice", "k1");
    expect(&mut bob_c, "call.ice", "k1");

    // Bob answers on node B: alice (node A) gets the answer, bob's device on C stops ringing.
    send(
        &mut bob_b,
        "call.answer",
        "alice",
        "k1",
        json!({"sdp": {"type": "answer", "sdp": "v=0"}}),
    );
    let v = expect(&mut alice, "call.answer", "k1");
    assert_eq!(v["data"]["from"], "bob");
    let v = expect(&mut bob_c, "call.ended", "k1");
    assert_eq!(v["data"]["reason"], "answered_elsewhere");
    // A second answer (from C) is refused by the node holding the call.
    send(
        &mut bob_c,
        "call.answer",
        "alice",
        "k1",
        json!({"sdp": "x", "id": 5}),
    );
    let e = bob_c.expect_type("error");
    assert_eq!(e["error"], "call already answered", "{e}");

    // Candidates both ways, now only between the two parties.
    send(
        &mut bob_b,
        "call.ice",
        "alice",
        "k1",
        json!({"candidate": {"candidate": "b1"}}),
    );
    let v = expect(&mut alice, "call.ice", "k1");
    assert_eq!(v["data"]["candidate"], json!({"candidate": "b1"}));
    send(
        &mut alice,
        "call.ice",
        "bob",
        "k1",
        json!({"candidate": {"candidate": "a1"}}),
    );
    expect(&mut bob_b, "call.ice", "k1");
    bob_c.expect_silence(200);

    // Bob hangs up on B: alice's call ends.
    send(&mut bob_b, "call.hangup", "alice", "k1", json!({}));
    let v = expect(&mut alice, "call.ended", "k1");
    assert_eq!(v["data"]["reason"], "hangup", "{v}");
    // The call is gone everywhere: the id may be used again.
    send(
        &mut alice,
        "call.offer",
        "bob",
        "k1",
        json!({"sdp": "again"}),
    );
    expect(&mut bob_b, "call.incoming", "k1");
    expect(&mut bob_c, "call.incoming", "k1");
}

#[test]
fn across_nodes_the_ring_times_out_and_a_party_leaving_ends_the_call() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut alice = a.connect("/ws?user_id=alice");
    let mut bob = b.connect("/ws?user_id=bob");
    held(&redis, "bob", 1);
    held(&redis, "alice", 1);

    // Unanswered: both sides hear the timeout, from node A's ring timer.
    send(&mut alice, "call.offer", "bob", "t1", json!({"sdp": "o"}));
    expect(&mut bob, "call.incoming", "t1");
    let v = expect(&mut alice, "call.ended", "t1");
    assert_eq!(v["data"]["reason"], "timeout", "{v}");
    let v = expect(&mut bob, "call.ended", "t1");
    assert_eq!(v["data"]["reason"], "timeout", "{v}");

    // Answered on B, then bob's connection goes: alice hears `disconnected`.
    send(&mut alice, "call.offer", "bob", "t2", json!({"sdp": "o"}));
    expect(&mut bob, "call.incoming", "t2");
    send(&mut bob, "call.answer", "alice", "t2", json!({"sdp": "a"}));
    expect(&mut alice, "call.answer", "t2");
    bob.close();
    let v = expect(&mut alice, "call.ended", "t2");
    assert_eq!(v["data"]["reason"], "disconnected", "{v}");
}

#[test]
fn the_answering_partys_node_dying_ends_the_call() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let mut b = node(&redis);
    let mut alice = a.connect("/ws?user_id=alice");
    let mut bob = b.connect("/ws?user_id=bob");
    held(&redis, "bob", 1);
    held(&redis, "alice", 1);
    send(&mut alice, "call.offer", "bob", "d1", json!({"sdp": "o"}));
    expect(&mut bob, "call.incoming", "d1");
    send(&mut bob, "call.answer", "alice", "d1", json!({"sdp": "a"}));
    expect(&mut alice, "call.answer", "d1");
    // B dies without a word; once it is reaped (within 12 s), alice's call ends.
    b.kill();
    match alice.next_event(Duration::from_secs(15)) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], "call.ended", "{v}");
            assert_eq!(v["data"]["reason"], "disconnected", "{v}");
        }
        other => panic!("no call.ended: {other:?}"),
    }
}
