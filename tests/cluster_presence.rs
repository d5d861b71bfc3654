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

/// `presence.query` on one node for a user whose devices are all on another: wait until a
/// query there says `online` (the user's first device is judged by Redis asynchronously).
fn query_until(c: &mut Client, user: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("q{n}");
        c.send_json(json!({"type": "presence.query", "id": id, "user_ids": [user]}));
        let s = c.expect_type("presence.state");
        assert_eq!(s["id"], id.as_str(), "{s}");
        let u = s["data"]["users"][0].clone();
        if u["status"] == want {
            return u;
        }
        assert!(Instant::now() < deadline, "{user} never read {want}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_query_on_one_node_reads_a_user_held_by_another() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut q = a.connect("/ws?user_id=asker");
    // Never seen anywhere: offline, never seen.
    q.send_json(json!({"type": "presence.query", "id": "q0", "user_ids": ["jo"]}));
    let s = q.expect_type("presence.state");
    assert_eq!(
        s["data"]["users"],
        json!([{"user_id": "jo", "status": "offline", "text": null, "devices": 0, "last_seen": null}]),
        "{s}"
    );
    // jo connects to B only and sets a status there.
    let mut jo = b.connect("/ws?user_id=jo");
    jo.send_json(
        json!({"type": "presence.update", "id": "u1", "status": "busy", "text": "in a call"}),
    );
    assert_eq!(jo.expect_type("presence.update")["id"], "u1");
    let u = query_until(&mut q, "jo", "busy");
    assert_eq!(
        u,
        json!({"user_id": "jo", "status": "busy", "text": "in a call", "devices": 1, "last_seen": null}),
        "devices: the nodes holding jo"
    );
    // Invisible reads offline elsewhere too, last_seen = when it went invisible.
    jo.send_json(json!({"type": "presence.update", "id": "u2", "status": "invisible"}));
    assert_eq!(jo.expect_type("presence.update")["id"], "u2");
    let u = query_until(&mut q, "jo", "offline");
    assert_eq!(u["devices"], 0, "{u}");
    assert_eq!(u["text"], Value::Null, "{u}");
    assert!(u["last_seen"].is_string(), "{u}");
    // Back online, then gone everywhere: after the grace, A reads offline with last_seen.
    jo.send_json(json!({"type": "presence.update", "id": "u3", "status": "online"}));
    assert_eq!(jo.expect_type("presence.update")["id"], "u3");
    query_until(&mut q, "jo", "online");
    let left = common::now_ms();
    jo.close();
    let u = query_until(&mut q, "jo", "offline");
    assert_eq!(u["devices"], 0, "{u}");
    assert_eq!(u["text"], Value::Null, "{u}");
    let seen = common::parse_rfc3339_ms(u["last_seen"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("no last_seen: {u}"));
    assert!(
        seen + 500 >= left && seen <= left + 1_500,
        "{seen} vs {left}"
    );
    // The record outlives the session, with a TTL (PRESENCE_RECORD_TTL).
    let ttl = redis.int(&["PTTL", "sb:{topic:presence:jo}:rec"]);
    assert!(ttl > 0, "{ttl}");
    // B itself agrees (its own state).
    let mut qb = b.connect("/ws?user_id=asker2");
    let ub = query_until(&mut qb, "jo", "offline");
    assert!(ub["last_seen"].is_string(), "{ub}");
}

#[test]
fn a_watch_on_one_node_of_a_user_on_another_starts_online() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut kim = b.connect("/ws?user_id=kim");
    kim.send_json(json!({"type": "presence.update", "id": "u", "status": "away", "text": "lunch"}));
    assert_eq!(kim.expect_type("presence.update")["id"], "u");
    // Wait until Redis has kim's record (the update went through the presence queue).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !redis
        .cmd(&["GET", "sb:{topic:presence:kim}:rec"])
        .starts_with("away")
    {
        assert!(Instant::now() < deadline, "kim's record never written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut w = a.connect("/ws?user_id=watcher");
    w.send_json(json!({"type": "presence.watch", "id": "w", "user_ids": ["kim", "nobody"]}));
    let s = w.expect_type("presence.state");
    assert_eq!(s["id"], "w", "{s}");
    assert_eq!(
        s["data"]["users"],
        json!([
            {"user_id": "kim", "status": "away", "text": "lunch", "devices": 1, "last_seen": null},
            {"user_id": "nobody", "status": "offline", "text": null, "devices": 0, "last_seen": null}
        ]),
        "{s}"
    );
    // And the watch is in place: kim's changes reach it.
    kim.send_json(json!({"type": "presence.update", "status": "busy"}));
    let e = event(&mut w, "presence.update", "kim", Duration::from_secs(3));
    assert_eq!(e["data"]["status"], "busy", "{e}");
}

#[test]
fn an_invisible_users_departure_still_leaves_the_nodes_set() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut w = watcher(&a, &redis, "lou");
    let mut lou = b.connect("/ws?user_id=lou");
    event(&mut w, "presence.online", "lou", Duration::from_secs(3));
    lou.send_json(json!({"type": "presence.update", "id": "u", "status": "invisible"}));
    assert_eq!(lou.expect_type("presence.update")["id"], "u");
    event(&mut w, "presence.offline", "lou", Duration::from_secs(3));
    lou.close();
    // Gone from B after the grace: no node holds lou, and nobody was told twice.
    let key = "sb:{topic:presence:lou}:nodes";
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["SCARD", key]) != 0 {
        assert!(Instant::now() < deadline, "B still holds lou");
        std::thread::sleep(Duration::from_millis(50));
    }
    w.expect_silence(300);
    // A new session on A is online for everyone (status does not outlive the session).
    let _lou = a.connect("/ws?user_id=lou");
    let e = event(&mut w, "presence.online", "lou", Duration::from_secs(3));
    assert_eq!(e["data"]["status"], "online", "{e}");
}

const ROOMS: &str = r#"[{"pattern":"jl-*","join_leave":true},{"pattern":"p-*","presence":true}]"#;

fn room_node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    let s = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_ROOMS", ROOMS),
    ]);
    s.wait_ready();
    s
}

/// Subscribe and wait until Redis has the room's channel from this node too.
fn member(s: &TestServer, redis: &RedisServer, user: &str, room: &str, subs: i64) -> Client {
    let mut c = s.connect(&format!("/ws?user_id={user}"));
    c.subscribe(room);
    let channel = format!("sb:{{room:{room}}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub(&channel) < subs {
        assert!(Instant::now() < deadline, "{channel} never held");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// Wait until Redis holds `user` present in `room` (its join script ran and published).
fn judged_present(redis: &RedisServer, room: &str, user: &str) {
    let key = format!("sb:{{room:{room}}}:present");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["HEXISTS", &key, user]) != 1 {
        assert!(
            Instant::now() < deadline,
            "{user} never judged present in {room}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn room_event(c: &mut Client, kind: &str, room: &str, user: &str) {
    match c.next_event(Duration::from_secs(3)) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], kind, "{v}");
            assert_eq!(v["room"], room, "{v}");
            assert_eq!(v["data"], json!({"user_id": user}), "{v}");
        }
        other => panic!("no {kind}: {other:?}"),
    }
}

fn room_query(c: &mut Client, room: &str) -> Value {
    c.send_json(json!({"type": "presence.query", "id": "rq", "room": room}));
    let s = c.expect_type("presence.state");
    assert_eq!(s["id"], "rq", "{s}");
    assert_eq!(s["room"], room, "{s}");
    let mut users = s["data"]["users"].as_array().cloned().unwrap_or_default();
    users.sort_by(|a, b| a["user_id"].as_str().cmp(&b["user_id"].as_str()));
    json!({"users": users, "count": s["data"]["count"], "truncated": s["data"]["truncated"]})
}

#[test]
fn room_join_and_leave_fire_once_across_nodes() {
    let redis = RedisServer::start();
    let a = room_node(&redis);
    let b = room_node(&redis);
    let mut wa = member(&a, &redis, "wa", "jl-1", 1);
    // wa's join judged (and published) before B holds the room, or B hears it too.
    judged_present(&redis, "jl-1", "wa");
    let mut wb = member(&b, &redis, "wb", "jl-1", 2);
    room_event(&mut wa, "presence.join", "jl-1", "wb");
    wb.expect_silence(200);
    // mo's first device, on A: one join, on both nodes.
    let mo1 = member(&a, &redis, "mo", "jl-1", 2);
    room_event(&mut wa, "presence.join", "jl-1", "mo");
    room_event(&mut wb, "presence.join", "jl-1", "mo");
    // A second device on B: nothing anywhere.
    let mo2 = member(&b, &redis, "mo", "jl-1", 2);
    wa.expect_silence(400);
    wb.expect_silence(1);
    // A's device leaves: mo is still in the room on B.
    mo1.close();
    wa.expect_silence(400);
    wb.expect_silence(1);
    // The last one: one leave, on both nodes.
    mo2.close();
    room_event(&mut wa, "presence.leave", "jl-1", "mo");
    room_event(&mut wb, "presence.leave", "jl-1", "mo");
    wa.expect_silence(300);
    wb.expect_silence(1);
    assert_eq!(
        redis.int(&["HLEN", "sb:{room:jl-1}:present"]),
        2,
        "wa and wb"
    );
}

#[test]
fn a_room_query_lists_the_members_of_every_node() {
    let redis = RedisServer::start();
    let a = room_node(&redis);
    let b = room_node(&redis);
    let mut qa = member(&a, &redis, "ann", "p-1", 1);
    let _b1 = member(&b, &redis, "ben", "p-1", 2);
    let _b2 = member(&b, &redis, "ben", "p-1", 2);
    let _ann2 = member(&b, &redis, "ann", "p-1", 2);
    // Judged through Redis: wait until it holds both users.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["HLEN", "sb:{room:p-1}:present"]) < 2 {
        assert!(
            Instant::now() < deadline,
            "{}",
            redis.cmd(&["HGETALL", "sb:{room:p-1}:present"])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ann: her devices on A; ben (only on B): the nodes holding him there.
    assert_eq!(
        room_query(&mut qa, "p-1"),
        json!({"users": [{"user_id": "ann", "devices": 1}, {"user_id": "ben", "devices": 1}], "count": 2, "truncated": false})
    );
}

#[test]
fn a_killed_node_leaves_its_rooms_everywhere() {
    let redis = RedisServer::start();
    let a = room_node(&redis);
    let mut b = room_node(&redis);
    let mut wa = member(&a, &redis, "wa", "jl-k", 1);
    let _ned = member(&b, &redis, "ned", "jl-k", 2);
    room_event(&mut wa, "presence.join", "jl-k", "ned");
    b.kill();
    match wa.next_event(Duration::from_secs(15)) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], "presence.leave", "{v}");
            assert_eq!(v["data"]["user_id"], "ned", "{v}");
        }
        other => panic!("no leave: {other:?}"),
    }
    assert_eq!(
        room_query(&mut wa, "jl-k"),
        json!({"users": [{"user_id": "wa", "devices": 1}], "count": 1, "truncated": false})
    );
    wa.expect_silence(500);
}

#[test]
fn a_redis_restarted_empty_gets_every_nodes_room_presence_back() {
    let mut redis = RedisServer::start();
    let a = room_node(&redis);
    let b = room_node(&redis);
    let mut qa = member(&a, &redis, "ann", "p-2", 1);
    let _ben = member(&b, &redis, "ben", "p-2", 2);
    let until_both = |redis: &RedisServer| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.int(&["HLEN", "sb:{room:p-2}:present"]) < 2 {
            assert!(
                Instant::now() < deadline,
                "{}",
                redis.cmd(&["HGETALL", "sb:{room:p-2}:present"])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until_both(&redis);
    redis.restart();
    assert_eq!(redis.int(&["HLEN", "sb:{room:p-2}:present"]), 0, "empty");
    a.wait_ready();
    b.wait_ready();
    // Each node's resync writes its pairs again, silently.
    until_both(&redis);
    assert_eq!(
        room_query(&mut qa, "p-2"),
        json!({"users": [{"user_id": "ann", "devices": 1}, {"user_id": "ben", "devices": 1}], "count": 2, "truncated": false})
    );
    // And each node's rooms set, for its reaper.
    let sets = redis.cmd_value(&["KEYS", "sb:{node:*}:rooms"]);
    let sets: Vec<String> = sets
        .array()
        .unwrap_or_default()
        .iter()
        .filter_map(|k| k.text())
        .collect();
    assert_eq!(sets.len(), 2, "{sets:?}");
    for k in &sets {
        assert_eq!(redis.int(&["SCARD", k]), 1, "{k}");
    }
}

#[test]
fn a_room_join_while_redis_is_frozen_is_told_here_at_once_and_elsewhere_once() {
    let mut redis = RedisServer::start();
    let a = room_node(&redis);
    let b = room_node(&redis);
    let mut wa = member(&a, &redis, "wa", "jl-f", 1);
    // wa's join judged (and published) before B holds the room: B must not hear it later.
    judged_present(&redis, "jl-f", "wa");
    let mut wb = member(&b, &redis, "wb", "jl-f", 2);
    room_event(&mut wa, "presence.join", "jl-f", "wb");
    redis.freeze();
    // A already holds the room's channel: mo's subscription needs nothing of Redis.
    let mut mo = a.connect("/ws?user_id=mo");
    mo.subscribe("jl-f");
    room_event(&mut wa, "presence.join", "jl-f", "mo");
    wb.expect_silence(500);
    redis.thaw();
    room_event(&mut wb, "presence.join", "jl-f", "mo");
    // Judged once Redis answered: told on B, never a second time on A.
    wa.expect_silence(1_500);
    wb.expect_silence(1);
    assert_eq!(
        redis.int(&["HLEN", "sb:{room:jl-f}:present"]),
        3,
        "wa, wb and mo"
    );
}

#[test]
fn an_online_the_bridge_never_got_reaches_the_other_nodes_within_a_heartbeat() {
    // A's first two presence changes for the bridge (its watcher's online, then lu's) are
    // refused as if its inbox were full: A's own watchers hear them at once from the shard, and A's bridge, told of the loss, reads
    // the users it holds from the directory and resyncs, telling the other nodes (once).
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_TEST_FAULT", "refuse_bridge_presence:2"),
    ]);
    a.wait_ready();
    let b = node(&redis);
    let mut wa = watcher(&a, &redis, "lu");
    let mut wb = b.connect("/ws?user_id=watcher-b");
    wb.send_json(json!({"type": "presence.watch", "id": "w", "user_ids": ["lu"]}));
    assert_eq!(wb.expect_type("presence.state")["id"], "w");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{topic:presence:lu}") < 2 {
        assert!(Instant::now() < deadline, "B never held lu's watch channel");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lu = a.connect("/ws?user_id=lu");
    // A hears it from its shard at once; B within a heartbeat (2 s) and a resync.
    event(&mut wa, "presence.online", "lu", Duration::from_secs(1));
    let e = event(&mut wb, "presence.online", "lu", Duration::from_secs(5));
    assert_eq!(e["data"]["status"], "online", "{e}");
    assert_eq!(redis.int(&["SCARD", "sb:{topic:presence:lu}:nodes"]), 1);
    // Once each: A's watchers are not told again by the resync.
    wa.expect_silence(1_000);
    wb.expect_silence(1);
    // The offline takes the normal path.
    lu.close_and_wait();
    event(&mut wa, "presence.offline", "lu", Duration::from_secs(4));
    event(&mut wb, "presence.offline", "lu", Duration::from_secs(4));
    wa.expect_silence(500);
    wb.expect_silence(1);
}

#[test]
fn a_room_change_the_bridge_refused_reaches_the_other_nodes_once() {
    // A's first two room presence changes for the bridge (wa's join, then mo's) are refused
    // as if its inbox were full: each waits on the shard and is handed to the bridge again at
    // the next tick, then judged in Redis and told everywhere once, A's members included.
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_ROOMS", ROOMS),
        ("SWITCHBOARD_TEST_FAULT", "refuse_bridge_room_presence:2"),
    ]);
    a.wait_ready();
    let b = room_node(&redis);
    let mut wb = member(&b, &redis, "wb", "jl-r", 1);
    judged_present(&redis, "jl-r", "wb");
    let mut wa = member(&a, &redis, "wa", "jl-r", 2);
    room_event(&mut wb, "presence.join", "jl-r", "wa");
    judged_present(&redis, "jl-r", "wa");
    let mo = member(&a, &redis, "mo", "jl-r", 2);
    room_event(&mut wa, "presence.join", "jl-r", "mo");
    room_event(&mut wb, "presence.join", "jl-r", "mo");
    judged_present(&redis, "jl-r", "mo");
    assert_eq!(
        room_query(&mut wb, "jl-r"),
        json!({"users": [{"user_id": "mo", "devices": 1}, {"user_id": "wa", "devices": 1}, {"user_id": "wb", "devices": 1}], "count": 3, "truncated": false})
    );
    // Once each.
    wa.expect_silence(500);
    wb.expect_silence(1);
    let text = a.http_get("/metrics").1;
    assert_eq!(
        common::metric(&text, "switchboard_presence_room_bridge_owed_total"),
        Some(2),
        "{text}"
    );
    // mo's leave takes the normal path.
    mo.close_and_wait();
    room_event(&mut wa, "presence.leave", "jl-r", "mo");
    room_event(&mut wb, "presence.leave", "jl-r", "mo");
    wa.expect_silence(500);
    wb.expect_silence(1);
    assert_eq!(redis.int(&["HEXISTS", "sb:{room:jl-r}:present", "mo"]), 0);
}
