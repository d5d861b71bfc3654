//! Calls whose parties are on different nodes (three nodes, one Redis, real processes): the
//! call's state lives on the node its offer reached, and commands from the callee's devices
//! on other nodes reach it through Redis: ringing on every node, an answer elsewhere,
//! candidates both ways, a hangup, the ring timeout, and a party's disconnect; commands for
//! a call no node holds get `unknown call`, as on one node.

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

/// A frame without its `timestamp` (which differs from run to run).
fn untimed(mut v: Value) -> Value {
    let o = v.as_object_mut().expect("an object");
    assert!(o.remove("timestamp").is_some_and(|t| t.is_u64()), "{v}");
    v
}

/// The exact `unknown call` error for command `id` about `call_id`.
fn unknown(id: &str, call_id: &str) -> Value {
    json!({"type": "error", "id": id, "error": "unknown call", "data": {"call_id": call_id}})
}

/// Within the wait for the node holding the call (`CALL_REMOTE_WAIT`, 2 s) and some slack.
const UNKNOWN_WITHIN: Duration = Duration::from_secs(4);

#[test]
fn late_commands_across_nodes_get_unknown_call_and_release_the_answers_entry() {
    const MAX: usize = 2;
    let max = MAX.to_string();
    let redis = RedisServer::start();
    let url = redis.url();
    let env = [
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_RING_TIMEOUT", "2s"),
        ("SWITCHBOARD_MAX_CALLS_PER_USER", max.as_str()),
    ];
    let nodes: Vec<TestServer> = (0..3).map(|_| TestServer::start(&env)).collect();
    for n in &nodes {
        n.wait_ready();
    }
    let mut alice = nodes[0].connect("/ws?user_id=alice");
    let mut bob_b = nodes[1].connect("/ws?user_id=bob");
    let mut bob_c = nodes[2].connect("/ws?user_id=bob");
    held(&redis, "bob", 2);
    held(&redis, "alice", 1);

    // What one node answers to an answer for a call that does not exist.
    let one = TestServer::start(&env[1..]);
    one.wait_ready();
    let mut bob_one = one.connect("/ws?user_id=bob");
    send(
        &mut bob_one,
        "call.answer",
        "alice",
        "late-0",
        json!({"id": "late-0", "sdp": "a"}),
    );
    assert_eq!(
        untimed(bob_one.expect_error("unknown call")),
        unknown("late-0", "late-0")
    );

    // The caller on A hangs up before bob's answer on B: no node holds the call any more.
    // More such late answers than bob may be in calls: each one's entry is released.
    for n in 0..=MAX {
        let id = format!("late-{n}");
        send(&mut alice, "call.offer", "bob", &id, json!({"sdp": "o"}));
        expect(&mut bob_b, "call.incoming", &id);
        expect(&mut bob_c, "call.incoming", &id);
        send(&mut alice, "call.hangup", "bob", &id, json!({}));
        for bob in [&mut bob_b, &mut bob_c] {
            let v = expect(bob, "call.ended", &id);
            assert_eq!(v["data"]["reason"], "hangup", "{v}");
        }
        let asked = Instant::now();
        send(
            &mut bob_b,
            "call.answer",
            "alice",
            &id,
            json!({"id": id, "sdp": "a"}),
        );
        assert_eq!(
            untimed(bob_b.expect_error("unknown call")),
            unknown(&id, &id)
        );
        assert!(asked.elapsed() < UNKNOWN_WITHIN, "{:?}", asked.elapsed());
    }
    // ICE for the ended call and a hangup for a made-up one: `unknown call` too.
    send(
        &mut bob_b,
        "call.ice",
        "alice",
        "late-0",
        json!({"id": "i", "candidate": "c"}),
    );
    send(
        &mut bob_c,
        "call.hangup",
        "alice",
        "made-up",
        json!({"id": "h"}),
    );
    assert_eq!(
        untimed(bob_b.expect_error("unknown call")),
        unknown("i", "late-0")
    );
    assert_eq!(
        untimed(bob_c.expect_error("unknown call")),
        unknown("h", "made-up")
    );
    alice.expect_silence(200);

    // The same connection answers a real call: not `too many calls`.
    send(&mut alice, "call.offer", "bob", "real", json!({"sdp": "o"}));
    expect(&mut bob_b, "call.incoming", "real");
    expect(&mut bob_c, "call.incoming", "real");
    send(
        &mut bob_b,
        "call.answer",
        "alice",
        "real",
        json!({"id": "r", "sdp": "a"}),
    );
    let v = expect(&mut alice, "call.answer", "real");
    assert_eq!(v["data"]["from"], "bob", "{v}");
    let v = expect(&mut bob_c, "call.ended", "real");
    assert_eq!(v["data"]["reason"], "answered_elsewhere", "{v}");
    send(
        &mut bob_b,
        "call.ice",
        "alice",
        "real",
        json!({"candidate": "b1"}),
    );
    expect(&mut alice, "call.ice", "real");
    send(&mut bob_b, "call.hangup", "alice", "real", json!({}));
    let v = expect(&mut alice, "call.ended", "real");
    assert_eq!(v["data"]["reason"], "hangup", "{v}");
    // A confirmed each of them: no `unknown call` once their wait is over.
    bob_b.expect_silence(2500);
    alice.expect_silence(100);
}

#[test]
fn an_answer_whose_confirmation_is_lost_ends_the_call_on_both_nodes() {
    // Bob's node drops the first confirmation it gets (`CALL_HELD`): his answer, accepted on
    // alice's node, looks unknown to his after the wait. Both must then agree the call is over.
    let redis = RedisServer::start();
    let a = node(&redis);
    let url = redis.url();
    let b = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_RING_TIMEOUT", "10s"),
        ("SWITCHBOARD_TEST_FAULT", "drop_call_held:1"),
    ]);
    b.wait_ready();
    let mut alice = a.connect("/ws?user_id=alice");
    let mut bob = b.connect("/ws?user_id=bob");
    held(&redis, "bob", 1);
    held(&redis, "alice", 1);
    send(&mut alice, "call.offer", "bob", "lost", json!({"sdp": "o"}));
    expect(&mut bob, "call.incoming", "lost");
    let asked = Instant::now();
    send(
        &mut bob,
        "call.answer",
        "alice",
        "lost",
        json!({"id": "ans", "sdp": "a"}),
    );
    // Accepted where the call is held: alice hears the answer.
    let v = expect(&mut alice, "call.answer", "lost");
    assert_eq!(v["data"]["from"], "bob", "{v}");
    // No confirmation reached B: bob is told `unknown call` after the wait...
    assert_eq!(
        untimed(bob.expect_error("unknown call")),
        unknown("ans", "lost")
    );
    assert!(asked.elapsed() < UNKNOWN_WITHIN, "{:?}", asked.elapsed());
    // ...and the call ends on A too, as if bob had left.
    let v = expect(&mut alice, "call.ended", "lost");
    assert_eq!(v["data"]["reason"], "disconnected", "{v}");
    assert!(asked.elapsed() < UNKNOWN_WITHIN, "{:?}", asked.elapsed());
    // Gone everywhere: the id rings again, and bob's answer is confirmed this time.
    send(
        &mut alice,
        "call.offer",
        "bob",
        "lost",
        json!({"sdp": "o2"}),
    );
    expect(&mut bob, "call.incoming", "lost");
    send(
        &mut bob,
        "call.answer",
        "alice",
        "lost",
        json!({"id": "ans2", "sdp": "a2"}),
    );
    expect(&mut alice, "call.answer", "lost");
    bob.expect_silence(2_500);
    alice.expect_silence(100);
}
