//! Presence across the nodes of a cluster (three nodes, one Redis, real processes): a user
//! is online once and offline once for its watchers on every node, however many nodes hold
//! its devices; a device that moves to another node within the offline grace changes
//! nothing; a node killed without a word has its users offline elsewhere within the
//! documented bound (`NODE_DEAD_AFTER + REAP_INTERVAL`, 12 s; the issue asks for 15 s).

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Client, TestServer};
use serde_json::{json, Value};

const GRACE: &str = "1s";

fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    let s = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
    ]);
    s.wait_ready();
    s
}

fn watcher(s: &TestServer, redis: &RedisServer, user: &str) -> Client {
    let mut w = s.connect("/ws?user_id=watcher");
    w.send_json(json!({"type": "presence.watch", "id": "w", "user_ids": [user]}));
    assert_eq!(w.expect_type("presence.state")["id"], "w");
    // The node holds the watch topic's channel before anything happens.
    let channel = format!("sb:{{topic:presence:{user}}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub(&channel) == 0 {
        assert!(Instant::now() < deadline, "{channel} never held");
        std::thread::sleep(Duration::from_millis(20));
    }
    w
}

fn event(w: &mut Client, kind: &str, user: &str, within: Duration) -> Value {
    match w.next_event(within) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], kind, "{v}");
            assert_eq!(v["data"]["user_id"], user, "{v}");
            v
        }
        other => panic!("no {kind} within {within:?}: {other:?}"),
    }
}

#[test]
fn online_and_offline_once_per_user_across_nodes() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis)).collect();
    let mut watchers: Vec<Client> = nodes.iter().map(|n| watcher(n, &redis, "bob")).collect();

    // First device, on node 1: online once, on every node.
    let bob1 = nodes[1].connect("/ws?user_id=bob");
    for w in &mut watchers {
        let e = event(w, "presence.online", "bob", Duration::from_secs(3));
        assert_eq!(e["data"]["status"], "online", "{e}");
    }
    // A device on node 2 too: no event anywhere.
    let bob2 = nodes[2].connect("/ws?user_id=bob");
    for w in &mut watchers {
        w.expect_silence(300);
    }
    // Node 1's device leaves, its grace passes: bob is still on node 2, no event.
    bob1.close();
    for w in &mut watchers {
        w.expect_silence(1_600);
    }
    // The last device: offline once, after the grace.
    let closed = Instant::now();
    bob2.close();
    for w in &mut watchers {
        let e = event(w, "presence.offline", "bob", Duration::from_secs(4));
        assert_eq!(e["data"]["status"], "offline", "{e}");
    }
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "{:?}",
        closed.elapsed()
    );
    for w in &mut watchers {
        w.expect_silence(300);
    }
}

#[test]
fn a_device_moving_nodes_within_the_grace_does_not_flap() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let c = node(&redis);
    let mut w = watcher(&a, &redis, "carol");
    let carol = b.connect("/ws?user_id=carol");
    event(&mut w, "presence.online", "carol", Duration::from_secs(3));
    // Gone from B, back on C 200 ms later (a drain, a network change).
    carol.close();
    std::thread::sleep(Duration::from_millis(200));
    let _carol = c.connect("/ws?user_id=carol");
    w.expect_silence(2_500);
}

#[test]
fn a_killed_node_has_its_users_offline_elsewhere_within_the_bound() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let mut b = node(&redis);
    let mut w = watcher(&a, &redis, "dave");
    let _dave = b.connect("/ws?user_id=dave");
    event(&mut w, "presence.online", "dave", Duration::from_secs(3));
    let members = |r: &RedisServer| r.int(&["SCARD", "sb:nodes"]);
    assert_eq!(members(&redis), 2);
    let killed = Instant::now();
    b.kill();
    let e = event(&mut w, "presence.offline", "dave", Duration::from_secs(15));
    assert_eq!(e["data"]["status"], "offline", "{e}");
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(15), "{took:?}");
    // Reaped once: nothing more, and the dead node is forgotten.
    w.expect_silence(2_500);
    assert_eq!(members(&redis), 1, "the dead node is forgotten");
}

#[test]
fn a_drained_nodes_users_reconnect_elsewhere_without_a_flap() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let url = redis.url();
    let mut b = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_SHUTDOWN_TIMEOUT", "2s"),
    ]);
    b.wait_ready();
    let c = node(&redis);
    let mut w = watcher(&a, &redis, "erin");
    let mut erin = b.connect("/ws?user_id=erin");
    event(&mut w, "presence.online", "erin", Duration::from_secs(3));

    // SIGTERM: B closes erin with 1001 and a jittered reconnect hint; erin moves to C.
    b.signal_term();
    match erin.next_event(Duration::from_secs(5)) {
        common::Event::Close(Some(1001), reason) => {
            let ms: u64 = reason
                .strip_prefix("server shutdown (reconnect in ")
                .and_then(|r| r.strip_suffix(" ms)"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no reconnect hint in {reason:?}"));
            assert!(ms < 2_000, "{ms}");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    let _erin = c.connect("/ws?user_id=erin");
    assert!(b.wait_exit().success());
    // Neither offline nor online again: B kept erin present for the grace, then was reaped
    // while C held erin (a reaper waits until it has been connected for the heartbeat TTL,
    // so the fresh nodes here reap B 10-12 s after they started).
    w.expect_silence(4_000);
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis.int(&["SCARD", "sb:nodes"]) != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(redis.int(&["SCARD", "sb:nodes"]), 2, "B was reaped");
    w.expect_silence(500);
    assert_eq!(
        redis.int(&["SCARD", "sb:{topic:presence:erin}:nodes"]),
        1,
        "only C holds erin"
    );
}

#[test]
fn a_status_change_never_overtakes_the_online_it_follows() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut wa = watcher(&a, &redis, "gus");
    let mut wb = watcher(&b, &redis, "gus");
    // Online (judged by Redis) and at once a status change: every watcher, on either node,
    // hears them in that order.
    let mut gus = b.connect("/ws?user_id=gus");
    gus.send_json(json!({"type": "presence.update", "status": "away", "text": "brb"}));
    for w in [&mut wa, &mut wb] {
        event(w, "presence.online", "gus", Duration::from_secs(3));
        let u = event(w, "presence.update", "gus", Duration::from_secs(3));
        assert_eq!(u["data"]["status"], "away", "{u}");
        assert_eq!(u["data"]["text"], "brb", "{u}");
    }
}

#[test]
fn a_change_told_while_redis_was_frozen_is_written_when_it_answers() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let b = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "1s"),
        ("SWITCHBOARD_REDIS_TIMEOUT", "500ms"),
    ]);
    b.wait_ready();
    let mut w = watcher(&b, &redis, "hal");
    let hal = b.connect("/ws?user_id=hal");
    event(&mut w, "presence.online", "hal", Duration::from_secs(3));
    let key = "sb:{topic:presence:hal}:nodes";
    assert_eq!(redis.int(&["SCARD", key]), 1);
    // Redis frozen (its data kept): hal leaves; the node tells its own watchers at once, as
    // it judged it, and asks Redis again until it answers (a script that ran judges nothing
    // the second time).
    redis.freeze();
    hal.close();
    event(&mut w, "presence.offline", "hal", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1_500));
    redis.thaw();
    // Written once Redis answers: no node holds hal any more, and no one is told twice.
    let deadline = Instant::now() + Duration::from_secs(8);
    while redis.int(&["SCARD", key]) != 0 {
        assert!(
            Instant::now() < deadline,
            "the node never wrote hal's offline"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = b.wait_metrics("the change told here first", |t| {
        common::metric(t, "switchboard_redis_presence_unchecked_total").unwrap_or(0) >= 1
    });
    assert_eq!(
        common::metric(&m, "switchboard_redis_task_restarts_total"),
        Some(0),
        "{m}"
    );
    w.expect_silence(1_000);
}

#[test]
fn a_paused_node_the_cluster_reaped_announces_its_users_again() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut w = watcher(&a, &redis, "ida");
    let _ida = b.connect("/ws?user_id=ida");
    event(&mut w, "presence.online", "ida", Duration::from_secs(3));
    // B paused past the heartbeat TTL: A reaps it and tells ida offline...
    b.signal(libc::SIGSTOP);
    event(&mut w, "presence.offline", "ida", Duration::from_secs(20));
    // ...B resumes, learns from its heartbeat that it was forgotten, and holds ida again:
    // online once more, with no node dead.
    b.signal(libc::SIGCONT);
    event(&mut w, "presence.online", "ida", Duration::from_secs(8));
    w.expect_silence(2_500);
    assert_eq!(redis.int(&["SCARD", "sb:{topic:presence:ida}:nodes"]), 1);
    let m = b.wait_metrics("forgotten once", |t| {
        common::metric(t, "switchboard_redis_forgotten_total") == Some(1)
    });
    assert_eq!(
        common::metric(&m, "switchboard_redis_task_restarts_total"),
        Some(0)
    );
    // B delivers again: a room message from A reaches a subscriber on B.
    let mut sub = b.connect("/ws?user_id=sub");
    sub.subscribe("after-pause");
    let mut pubr = a.connect("/ws?user_id=pub");
    pubr.subscribe("after-pause");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{room:after-pause}") < 2 {
        assert!(Instant::now() < deadline, "B never held the room");
        std::thread::sleep(Duration::from_millis(20));
    }
    pubr.send_json(json!({"type": "publish", "room": "after-pause", "data": {"n": 1}}));
    let m = sub.expect_type("message");
    assert_eq!(m["data"]["n"], 1, "{m}");
}

#[test]
fn a_user_in_its_grace_when_redis_restarts_empty_still_goes_offline() {
    // The resync writes every user the node holds present, those in their offline grace
    // too, so the grace's end still finds the node in the user's set and tells offline.
    let mut redis = RedisServer::start();
    let url = redis.url();
    let start = || {
        let s = TestServer::start(&[
            ("SWITCHBOARD_REDIS_URL", url.as_str()),
            ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "4s"),
            ("SWITCHBOARD_REDIS_RECONNECT_MAX", "200ms"),
        ]);
        s.wait_ready();
        s
    };
    let (a, b) = (start(), start());
    let mut w = watcher(&b, &redis, "jo");
    let jo = a.connect("/ws?user_id=jo");
    event(&mut w, "presence.online", "jo", Duration::from_secs(3));
    jo.close_and_wait();
    // Within the grace, Redis restarts empty; both nodes reconnect and write themselves again.
    redis.restart();
    a.wait_ready();
    b.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{topic:presence:jo}") == 0 {
        assert!(
            Instant::now() < deadline,
            "B never held the watch channel again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = event(&mut w, "presence.offline", "jo", Duration::from_secs(10));
    assert_eq!(e["data"]["status"], "offline", "{e}");
    w.expect_silence(1_000);
    assert_eq!(redis.int(&["SCARD", "sb:{topic:presence:jo}:nodes"]), 0);
}
