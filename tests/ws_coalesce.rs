//! `write_coalesce` over real sockets: fan-out frames for a connection written less than
//! `write_coalesce` ago are held and share one write; replies (here a pong) are never held and
//! take the held frames with them, in order; after a quiet period a frame goes out at once.
//! The window is 3 s so that "held" and "not held" are seconds apart, not a race. Holding
//! applies only while a shard queues many frames per second (`write_coalesce_min_rate`); the
//! first test sets that to 0 (always), the last checks that an idle server with the default
//! gate holds nothing.

mod common;

use std::time::{Duration, Instant};

use common::{metric, Event, TestServer};
use serde_json::json;

fn expect_message(c: &mut common::Client, n: u64) {
    let v = c.expect_type("message");
    assert_eq!(v["data"]["n"], n, "{v}");
}

#[test]
fn fan_out_is_held_for_the_window_replies_are_not_and_quiet_connections_are_not() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_WRITE_COALESCE", "3s"),
        ("SWITCHBOARD_WRITE_COALESCE_MIN_RATE", "0"),
    ]);
    let mut sub = server.connect("/ws");
    let mut publ = server.connect("/ws");
    sub.subscribe("co");
    publ.subscribe("co");

    // `subscribed` was just written to `sub`: a fan-out frame now waits for the window.
    publ.send_json(json!({"type": "publish", "room": "co", "data": {"n": 1}}));
    sub.expect_silence(1000);
    expect_message(&mut sub, 1);

    // Written again just now; the next frame is held, but a reply is urgent and carries the
    // held frame out ahead of it.
    publ.send_json(json!({"type": "publish", "room": "co", "data": {"n": 2}}));
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    sub.send_json(json!({"type": "ping"}));
    expect_message(&mut sub, 2);
    sub.expect_type("pong");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the pong waited for the coalescing window ({:?})",
        asked.elapsed()
    );

    // After a quiet period longer than the window, a frame is written at once.
    std::thread::sleep(Duration::from_millis(3300));
    let sent = Instant::now();
    publ.send_json(json!({"type": "publish", "room": "co", "data": {"n": 3}}));
    expect_message(&mut sub, 3);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "a frame after a quiet period was held ({:?})",
        sent.elapsed()
    );

    // The publisher got every frame too, in order.
    for n in 1..=3 {
        expect_message(&mut publ, n);
    }
    match publ.next_event(Duration::from_millis(100)) {
        Event::Timeout => {}
        other => panic!("unexpected frame for the publisher: {other:?}"),
    }
    server.assert_serving();
}

/// Replies to a connection whose fan-out is held must not leave entries behind in the hold
/// queue: each reply used to leave one for a whole window (a leak proportional to the reply
/// rate under load). With a 3 s window, 30 pings after a held frame leave at most one entry
/// per connection.
#[test]
fn replies_do_not_pile_up_in_the_hold_queue() {
    let server = TestServer::start(&[
        ("SWITCHBOARD_WRITE_COALESCE", "3s"),
        ("SWITCHBOARD_WRITE_COALESCE_MIN_RATE", "0"),
        ("SWITCHBOARD_SHARDS", "1"),
    ]);
    let mut sub = server.connect("/ws");
    let mut publ = server.connect("/ws");
    sub.subscribe("co-pile");
    publ.subscribe("co-pile");
    publ.send_json(json!({"type": "publish", "room": "co-pile", "data": {"n": 1}}));
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..30 {
        sub.send_json(json!({"type": "ping"}));
        publ.send_json(json!({"type": "ping"}));
    }
    // The held frame goes out ahead of the first pong.
    expect_message(&mut sub, 1);
    expect_message(&mut publ, 1);
    for _ in 0..30 {
        sub.expect_type("pong");
        publ.expect_type("pong");
    }
    let text = server.wait_metrics("write_coalesce_active=1", |t| {
        metric(t, "switchboard_write_coalesce_active") == Some(1)
    });
    // Stats are published every 250 ms: take a snapshot from after the pings.
    std::thread::sleep(Duration::from_millis(400));
    let (_, text2) = server.http_get("/metrics");
    let held = metric(&text2, "switchboard_write_coalesce_held");
    assert!(
        held.is_some_and(|h| h <= 2),
        "held {held:?}\n{text}\n{text2}"
    );
    server.assert_serving();
}

/// Back-to-back frames to one connection: each must arrive long before a 3 s hold would end.
fn assert_not_held(env: &[(&str, &str)], room: &str) {
    let server = TestServer::start(env);
    let mut sub = server.connect("/ws");
    let mut publ = server.connect("/ws");
    sub.subscribe(room);
    publ.subscribe(room);
    let sent = Instant::now();
    for n in 1..=3 {
        publ.send_json(json!({"type": "publish", "room": room, "data": {"n": n}}));
        expect_message(&mut sub, n);
    }
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "frames were held with {env:?} ({:?})",
        sent.elapsed()
    );
}

#[test]
fn zero_window_holds_nothing() {
    assert_not_held(
        &[
            ("SWITCHBOARD_WRITE_COALESCE", "0"),
            ("SWITCHBOARD_WRITE_COALESCE_MIN_RATE", "0"),
        ],
        "co0",
    );
}

#[test]
fn an_idle_server_holds_nothing_with_the_default_rate_gate() {
    assert_not_held(&[("SWITCHBOARD_WRITE_COALESCE", "3s")], "co-idle");
}
