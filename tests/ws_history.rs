//! Room history and resume over real sockets with 2 shards: offsets in one order on every
//! shard, resume exact (missed messages before `subscribed`, then live), `recovered: false`
//! for another epoch, a gap older than the history, an expired history and a room without
//! history.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

const EXPOSE: (&str, &str) = ("SWITCHBOARD_EXPOSE_SHARD", "true");

fn server(rooms: &str) -> TestServer {
    TestServer::start(&[
        EXPOSE,
        ("SWITCHBOARD_ROOMS", rooms),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ])
}

fn publish(c: &mut common::Client, room: &str, n: u64) {
    c.send_json(json!({"type": "publish", "room": room, "data": {"n": n}}));
}

/// Read `count` messages of `room`, returning (offset, n).
fn messages(c: &mut common::Client, count: usize) -> Vec<(u64, u64)> {
    (0..count)
        .map(|_| {
            let m = c.expect_type("message");
            (
                m["offset"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no offset: {m}")),
                m["data"]["n"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn offsets_increase_in_the_order_every_shard_sees() {
    let s = server(r#"[{"pattern": "h-*", "history_size": 1000}]"#);
    let mut subs = [s.connect_on_shard("/ws", 0), s.connect_on_shard("/ws", 1)];
    for c in &mut subs {
        let sub = c.subscribe("h-1");
        assert_eq!(sub["data"]["offset"], 0, "{sub}");
        assert!(
            sub["data"]["epoch"].as_str().is_some_and(|e| !e.is_empty()),
            "{sub}"
        );
        assert!(sub["data"].get("recovered").is_none(), "{sub}");
    }
    const N: u64 = 200;
    let pubs: Vec<_> = (0..2u64)
        .map(|shard| {
            let mut p = s.connect_on_shard("/ws", shard);
            p.subscribe("h-1");
            std::thread::spawn(move || {
                for n in 0..N {
                    publish(&mut p, "h-1", shard * 1000 + n);
                }
                p
            })
        })
        .collect();
    let seen: Vec<Vec<(u64, u64)>> = subs
        .iter_mut()
        .map(|c| messages(c, 2 * N as usize))
        .collect();
    for p in pubs {
        p.join().unwrap();
    }
    assert_eq!(seen[0], seen[1], "two shards saw different orders");
    let offsets: Vec<u64> = seen[0].iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=2 * N).collect::<Vec<_>>(),
        "offsets not 1..=400 in order"
    );
}

#[test]
fn a_resume_replays_exactly_what_was_missed_before_subscribed_then_goes_live() {
    let s = server(r#"[{"pattern": "h-*", "history_size": 100}]"#);
    let mut publisher = s.connect_on_shard("/ws", 0);
    publisher.subscribe("h-r");
    let mut sub = s.connect_on_shard("/ws", 1);
    let first = sub.subscribe("h-r");
    let epoch = first["data"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&mut publisher, "h-r", n);
    }
    assert_eq!(messages(&mut sub, 3), [(1, 1), (2, 2), (3, 3)]);
    sub.close();
    for n in 4..=7 {
        publish(&mut publisher, "h-r", n);
    }
    messages(&mut publisher, 7);
    // Back on either shard: from offset 3, every missed one, oldest first, then subscribed.
    let mut latest = 7;
    for shard in [1, 0] {
        let mut back = s.connect_on_shard("/ws", shard);
        back.send_json(json!({"type": "subscribe", "room": "h-r", "id": 9,
            "since": {"offset": 3, "epoch": epoch}}));
        let want: Vec<(u64, u64)> = (4..=latest).map(|n| (n, n)).collect();
        assert_eq!(messages(&mut back, want.len()), want);
        let sub = back.expect_type("subscribed");
        assert_eq!(sub["id"], 9);
        assert_eq!(sub["data"]["recovered"], true, "{sub}");
        assert_eq!(sub["data"]["offset"], latest);
        assert_eq!(sub["data"]["epoch"], epoch.as_str());
        back.expect_silence(100);
        // Live from here, nothing twice.
        latest += 1;
        publish(&mut publisher, "h-r", latest);
        assert_eq!(messages(&mut back, 1), [(latest, latest)]);
        back.expect_silence(100);
        back.close();
        messages(&mut publisher, 1);
    }
}

#[test]
fn recovered_false_for_another_epoch_a_gap_past_history_and_no_history() {
    let s = server(
        r#"[{"pattern": "h-*", "history_size": 3}, {"pattern": "t-*", "history_size": 10, "history_ttl": "1s"}]"#,
    );
    let mut p = s.connect_on_shard("/ws", 0);
    let epoch = p.subscribe("h-g")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 1..=6 {
        publish(&mut p, "h-g", n);
    }
    messages(&mut p, 6);
    let resume = |c: &mut common::Client, room: &str, offset: u64, epoch: &str| -> Value {
        c.send_json(
            json!({"type": "subscribe", "room": room, "since": {"offset": offset, "epoch": epoch}}),
        );
        c.expect_type("subscribed")
    };
    // History keeps 4, 5, 6: from 3 it recovers; from 2 offset 3 is gone.
    let mut c = s.connect_on_shard("/ws", 1);
    c.send_json(
        json!({"type": "subscribe", "room": "h-g", "since": {"offset": 3, "epoch": epoch}}),
    );
    assert_eq!(messages(&mut c, 3), [(4, 4), (5, 5), (6, 6)]);
    assert_eq!(c.expect_type("subscribed")["data"]["recovered"], true);
    let mut c = s.connect_on_shard("/ws", 1);
    let sub = resume(&mut c, "h-g", 2, &epoch);
    assert_eq!(sub["data"]["recovered"], false, "{sub}");
    assert_eq!(sub["data"]["offset"], 6);
    let mut c = s.connect_on_shard("/ws", 0);
    assert_eq!(
        resume(&mut c, "h-g", 5, "not-the-epoch")["data"]["recovered"],
        false
    );
    // An offset ahead of the room.
    let mut c = s.connect_on_shard("/ws", 1);
    assert_eq!(
        resume(&mut c, "h-g", 60, &epoch)["data"]["recovered"],
        false
    );

    // A room without history: subscribed says it could not recover, and carries no position.
    let mut c = s.connect("/ws");
    let sub = resume(&mut c, "plain", 1, "x");
    assert_eq!(sub["data"]["recovered"], false);
    assert!(sub["data"].get("offset").is_none(), "{sub}");

    // history_ttl: a message older than it is gone.
    let mut p = s.connect_on_shard("/ws", 1);
    let epoch = p.subscribe("t-1")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    publish(&mut p, "t-1", 1);
    messages(&mut p, 1);
    std::thread::sleep(Duration::from_millis(1300));
    let mut c = s.connect_on_shard("/ws", 0);
    assert_eq!(resume(&mut c, "t-1", 0, &epoch)["data"]["recovered"], false);
}

#[test]
fn rooms_without_history_carry_no_offset() {
    let s = server(r#"[{"pattern": "h-*", "history_size": 10}]"#);
    let mut c = s.connect("/ws");
    let sub = c.subscribe("plain");
    assert!(sub["data"].get("offset").is_none(), "{sub}");
    publish(&mut c, "plain", 1);
    let m = c.expect_type("message");
    assert!(m.get("offset").is_none(), "{m}");
}
