//! The delivery seam and the defects fixed with it, over real sockets, with connections placed
//! on chosen shards (`SWITCHBOARD_EXPOSE_SHARD`) and rare faults made to happen on purpose
//! (`SWITCHBOARD_TEST_FAULT`).

mod common;

use std::time::{Duration, Instant};

use common::jwt::{self, SECRET};
use common::{now_s, Event, TestServer};
use serde_json::json;

const EXPOSE: (&str, &str) = ("SWITCHBOARD_EXPOSE_SHARD", "true");

#[test]
fn a_dead_shard_takes_the_node_down_cleanly() {
    let mut server = TestServer::start(&[
        EXPOSE,
        ("SWITCHBOARD_SHUTDOWN_TIMEOUT", "4s"),
        // Long enough after start for the connection below to land on shard 0 even on a
        // loaded machine (shard 1's listener dies with it).
        ("SWITCHBOARD_TEST_FAULT", "shard_panic_after:1:3000"),
    ]);
    let mut c = server.connect_on_shard("/ws", 0);
    // /ready turns red with the reason while the live shard drains.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_red = false;
    while Instant::now() < deadline {
        match server.try_http_get("/ready") {
            Some((503, body)) if body.contains("shard failed") => {
                saw_red = true;
                break;
            }
            // Before the fault, or a connection that raced the dead shard's listener.
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert!(
        saw_red,
        "/ready never said the shard failed; log:\n{}",
        server.logs()
    );
    // The live shard's client is closed as in a drain, and the process exits non-zero.
    c.expect_close(1001);
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", server.logs());
    let logs = server.logs();
    assert_eq!(logs.matches("a shard died").count(), 1, "{logs}");
    assert!(logs.contains("shard 1 panicked"), "{logs}");
}

#[test]
fn a_panic_inside_one_command_closes_that_connection_with_1011_only() {
    let server = TestServer::start(&[
        EXPOSE,
        ("SWITCHBOARD_TEST_FAULT", "panic_on_command:publish"),
    ]);
    let mut bad = server.connect_on_shard("/ws", 0);
    let mut good = server.connect_on_shard("/ws", 0);
    bad.subscribe("r");
    good.subscribe("r");
    bad.send_json(json!({"type": "publish", "room": "r", "data": {}}));
    bad.expect_close(1011);
    good.expect_silence(200);
    // The shard goes on, and the closed connection left the room.
    good.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(good.expect_type("pong")["id"], 1);
    let mut other = server.connect_on_shard("/ws", 0);
    assert_eq!(other.subscribe("r")["data"]["client_count"], 2);
    let m = server.wait_metrics("internal errors counted", |t| {
        t.contains("switchboard_errors_total{reason=\"internal\"} 1")
    });
    assert!(m.contains("internal"));
}

#[test]
fn ordered_rooms_are_seen_in_one_order_on_every_shard() {
    let server = TestServer::start(&[
        EXPOSE,
        (
            "SWITCHBOARD_ROOMS",
            r#"[{"pattern": "ord-*", "ordered": true}]"#,
        ),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    const N: usize = 300;
    let mut subs = [
        server.connect_on_shard("/ws", 0),
        server.connect_on_shard("/ws", 1),
    ];
    for s in &mut subs {
        s.subscribe("ord-1");
    }
    let pubs: Vec<_> = (0..2u64)
        .map(|shard| {
            let mut p = server.connect_on_shard("/ws", shard);
            p.subscribe("ord-1");
            std::thread::spawn(move || {
                for n in 0..N {
                    p.send_json(
                        json!({"type": "publish", "room": "ord-1", "data": {"p": shard, "n": n}}),
                    );
                }
                p
            })
        })
        .collect();
    let seen: Vec<Vec<(u64, u64)>> = subs
        .iter_mut()
        .map(|s| {
            (0..2 * N)
                .map(|_| {
                    let m = s.expect_type("message");
                    (
                        m["data"]["p"].as_u64().unwrap(),
                        m["data"]["n"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    for p in pubs {
        p.join().unwrap();
    }
    assert_eq!(
        seen[0], seen[1],
        "subscribers on two shards saw different orders"
    );
    // Each publisher's own messages keep their order.
    for p in 0..2 {
        let ns: Vec<u64> = seen[0]
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(ns, (0..N as u64).collect::<Vec<_>>());
    }
}

#[test]
fn devices_per_user_are_limited_on_upgrade() {
    let server = TestServer::start(&[("SWITCHBOARD_MAX_CONNECTIONS_PER_USER", "2")]);
    let a = server.connect("/ws?user_id=u");
    let _b = server.connect("/ws?user_id=u");
    let refused = match server.try_connect_with("/ws?user_id=u", &[], None) {
        Err(r) => r,
        Ok(_) => panic!("a third device was admitted"),
    };
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.json()["error"],
        "too many connections for this user"
    );
    // Another user is not affected; a device leaving frees its place.
    let _v = server.connect("/ws?user_id=v");
    a.close();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match server.try_connect_with("/ws?user_id=u", &[], None) {
            Ok(_) => break,
            Err(r) if r.status == 429 && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(r) => panic!("still refused after a device left: {r:?}"),
        }
    }
}

fn hs_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
    ]
}

#[test]
fn devices_per_user_are_limited_in_band_with_1008() {
    let mut env = hs_env();
    env.push(("SWITCHBOARD_MAX_CONNECTIONS_PER_USER", "1"));
    let server = TestServer::start(&env);
    let token = jwt::hs256(&json!({"sub": "alice", "exp": now_s() + 300}));
    let _first = server.connect(&format!("/ws?token={token}"));
    let mut second = server.connect("/ws");
    second.send_json(json!({"type": "authenticate", "token": token, "id": 5}));
    let failed = second.expect_type("auth.failed");
    assert_eq!(failed["error"], "too many connections for this user");
    assert_eq!(failed["id"], 5);
    second.expect_close(1008);
}

#[test]
fn a_refresh_with_a_narrower_rooms_claim_leaves_those_rooms() {
    let server = TestServer::start(&hs_env());
    let wide = jwt::hs256(&json!({"sub": "alice", "exp": now_s() + 300, "rooms": ["a*"]}));
    let narrow = jwt::hs256(&json!({"sub": "alice", "exp": now_s() + 300, "rooms": ["ab"]}));
    let mut c = server.connect(&format!("/ws?token={wide}"));
    c.subscribe("ab");
    c.subscribe("ac");
    c.send_json(json!({"type": "authenticate", "token": narrow}));
    let left = c.expect_type("unsubscribed");
    assert_eq!(left["room"], "ac");
    c.expect_type("auth.success");
    c.send_json(json!({"type": "publish", "room": "ac", "data": {}}));
    c.expect_error("not subscribed to this room");
    c.send_json(json!({"type": "publish", "room": "ab", "data": {"ok": 1}}));
    assert_eq!(c.expect_type("message")["data"]["ok"], 1);
}

#[test]
fn a_frame_larger_than_the_send_queue_bound_reaches_a_fast_reader() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_ECHO_PATH", "/echo"),
        ("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", "8KiB"),
        ("SWITCHBOARD_MAX_MESSAGE_SIZE", "64KiB"),
    ]);
    let (mut c, _) = server
        .try_connect_with("/echo", &[], None)
        .unwrap_or_else(|r| panic!("echo upgrade refused: {r:?}"));
    let big = json!({"x": "y".repeat(32 * 1024)});
    c.send_json(big.clone());
    match c.next_event(Duration::from_secs(5)) {
        Event::Json(v) => assert_eq!(v, big),
        other => panic!("expected the 32 KiB echo, got {other:?}"),
    }
    // A backlog past the bound still closes with 4008: the bound is on queued bytes.
    server.assert_serving();
}

#[test]
fn a_wrong_type_in_a_field_a_command_does_not_use_is_ignored() {
    let server = TestServer::start(&[]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "ping", "id": 1, "room": 5, "to": [1], "token": {}}));
    assert_eq!(c.expect_type("pong")["id"], 1);
    // In a field it uses, it is still refused.
    c.send_json(json!({"type": "publish", "room": 5, "data": {}}));
    c.expect_error("invalid JSON format");
    c.send_json(json!({"type": "subscribe", "room": "r", "data": 5, "to": false}));
    c.expect_type("subscribed");
}
