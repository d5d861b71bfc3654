//! Switchboard nodes on a Redis Cluster of three masters (`redis_cluster: true`, real
//! processes): room messages cross nodes for rooms whose channels land on each master, a
//! user's devices and presence cross nodes, broadcasts reach every node; every channel is a
//! sharded one (`SSUBSCRIBE` on the master of its slot, never classic pub/sub); a master killed
//! with SIGKILL and restarted, a master killed on a cluster with replicas (its replica takes
//! over), and a slot migrated to another master, leave every node delivering again; a node killed has its users reaped by another (commands over many slots).
//! Frames are checked exactly; every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisServer, Resp};
use common::{metric, Client, TestServer};
use serde_json::{json, Value};
use switchboard::cluster::slot;

const API_KEY: &str = "sharded-test-key";

/// Settings that make faults visible quickly in a test (the defaults are seconds).
const FAST: &[(&str, &str)] = &[
    ("SWITCHBOARD_REDIS_CLUSTER", "true"),
    ("SWITCHBOARD_API_KEY", API_KEY),
    ("SWITCHBOARD_REDIS_TIMEOUT", "1s"),
    ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
    ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "1s"),
    ("SWITCHBOARD_REDIS_RECONNECT_MAX", "500ms"),
    ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", "1s"),
];

fn node(cluster: &RedisCluster) -> TestServer {
    let seeds = cluster.seeds();
    let mut env = vec![("SWITCHBOARD_REDIS_URL", seeds.as_str())];
    env.extend_from_slice(FAST);
    let s = TestServer::start(&env);
    s.wait_ready();
    s
}

/// The master of `channel`'s slot.
fn owner(cluster: &RedisCluster, channel: &str) -> usize {
    cluster.master_of_slot(slot(channel.as_bytes()))
}

/// A room whose channel's slot master `m` owns (`<tag>-<n>` for the first such n).
fn room_on(cluster: &RedisCluster, m: usize, tag: &str) -> String {
    (0..10_000)
        .map(|n| format!("{tag}-{n}"))
        .find(|r| owner(cluster, &format!("sb:{{room:{r}}}")) == m)
        .unwrap_or_else(|| panic!("no room of master {m}"))
}

/// Sharded subscribers of `channel` on the master of its slot (`PUBSUB SHARDNUMSUB`).
fn shard_numsub(cluster: &RedisCluster, channel: &str) -> i64 {
    let r = cluster
        .node(owner(cluster, channel))
        .cmd_value(&["PUBSUB", "SHARDNUMSUB", channel]);
    r.array()
        .and_then(|a| a.get(1))
        .and_then(Resp::int)
        .unwrap_or_else(|| panic!("PUBSUB SHARDNUMSUB {channel}: {r:?}"))
}

fn wait_shard_numsub(cluster: &RedisCluster, channel: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard_numsub(cluster, channel) != n {
        assert!(
            Instant::now() < deadline,
            "{channel}: {} nodes hold it, not {n}",
            shard_numsub(cluster, channel)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn publish(c: &mut Client, room: &str, data: Value) {
    c.send_json(json!({"type": "publish", "room": room, "data": data}));
}

fn api(server: &TestServer, method: &str, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = server.http_request(&raw);
    (r.status, r.body.clone())
}

fn ready(s: &TestServer) -> u16 {
    s.try_http_get("/ready").map_or(0, |(status, _)| status)
}

fn wait_ready_is(s: &TestServer, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while ready(s) != status {
        assert!(
            Instant::now() < deadline,
            "/ready is not {status} within {within:?}: {:?}",
            s.try_http_get("/ready")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter(s: &TestServer, name: &str) -> u64 {
    metric(&s.http_get("/metrics").1, name).unwrap_or_else(|| panic!("{name} missing"))
}

fn assert_no_panic(nodes: &[&TestServer]) {
    for n in nodes {
        let logs = n.logs();
        assert!(!logs.contains("panicked"), "a node panicked:\n{logs}");
    }
}

/// A publisher on one node and a subscriber on another, in one room.
struct Pair {
    publisher: Client,
    subscriber: Client,
    room: String,
    n: u64,
}

impl Pair {
    fn new(from: &TestServer, to: &TestServer, room: &str) -> Pair {
        let mut publisher = from.connect("/ws");
        publisher.subscribe(room);
        let mut subscriber = to.connect("/ws");
        subscriber.subscribe(room);
        Pair {
            publisher,
            subscriber,
            room: room.into(),
            n: 0,
        }
    }

    /// Publish numbered messages every 50 ms until one reaches the other node (the exact
    /// frame the publisher got); the time it took.
    fn crossing_within(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            self.n += 1;
            let n = self.n;
            self.publisher
                .send_json(json!({"type": "publish", "room": self.room, "data": {"n": n}}));
            // Its own copy (skipping copies of another pair's messages in the same room).
            let mine = loop {
                let m = self.publisher.expect_type("message");
                if m["data"]["n"] == n {
                    break m;
                }
            };
            let deadline = Instant::now() + Duration::from_millis(50);
            while Instant::now() < deadline {
                match self.subscriber.next_event(Duration::from_millis(10)) {
                    common::Event::Json(v)
                        if v["type"] == "message"
                            && v["data"]["n"] == n
                            && v["client_id"] == mine["client_id"] =>
                    {
                        assert_eq!(v, mine, "the other node delivered a different frame");
                        return start.elapsed();
                    }
                    _ => {}
                }
            }
            assert!(
                start.elapsed() < within,
                "no message crossed nodes in room {} within {within:?}",
                self.room
            );
        }
    }
}

#[test]
fn redis_cluster_true_starts_and_holds_sharded_channels_only() {
    let cluster = RedisCluster::start(3);
    let a = node(&cluster);
    let (status, body) = a.http_get("/ready");
    assert_eq!(status, 200, "{body}");
    let text = a.wait_metrics("every channel held", |t| {
        metric(t, "switchboard_redis_subscriptions_held")
            == metric(t, "switchboard_redis_subscriptions_expected")
    });
    assert_eq!(metric(&text, "switchboard_redis_up"), Some(1));
    // {all}, {calls} and the node's own channel.
    assert_eq!(
        metric(&text, "switchboard_redis_subscriptions_expected"),
        Some(3)
    );
    wait_shard_numsub(&cluster, "sb:{all}", 1);
    wait_shard_numsub(&cluster, "sb:{calls}", 1);
    // Nothing by classic pub/sub, on any master; every master holds this node's canary.
    for m in cluster.nodes() {
        let classic = m.cmd_value(&["PUBSUB", "CHANNELS"]);
        assert_eq!(
            classic,
            Resp::Array(vec![]),
            "classic channels on {}",
            m.port()
        );
        let sharded = m.cmd_value(&["PUBSUB", "SHARDCHANNELS", "sb:{canary:*"]);
        assert_eq!(
            sharded.array().map(<[Resp]>::len),
            Some(1),
            "canaries on {}: {sharded:?}",
            m.port()
        );
    }
    // The key commands went to their slots' masters: the node's alive key and the sets.
    let alive_master = |key: &str| cluster.node(owner(&cluster, key));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = alive_master("sb:nodes").int(&["SCARD", "sb:nodes"]);
        let stats = alive_master("sb:stats").int(&["HLEN", "sb:stats"]);
        if n == 1 && stats == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "sb:nodes {n}, sb:stats {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_no_panic(&[&a]);
}

#[test]
fn room_messages_cross_nodes_on_every_master() {
    let cluster = RedisCluster::start(3);
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&cluster)).collect();
    let rooms: Vec<String> = (0..3).map(|m| room_on(&cluster, m, "room")).collect();
    for room in &rooms {
        let mut subs: Vec<Client> = nodes
            .iter()
            .map(|n| {
                let mut c = n.connect("/ws?user_id=reader");
                c.subscribe(room);
                c
            })
            .collect();
        wait_shard_numsub(&cluster, &format!("sb:{{room:{room}}}"), 3);
        let mut alice = nodes[0].connect("/ws?user_id=alice");
        alice.subscribe(room);
        for n in 1..=20 {
            publish(&mut alice, room, json!({"n": n}));
        }
        for n in 1..=20 {
            let mine = alice.expect_type("message");
            assert_eq!(mine["data"], json!({"n": n}));
            assert_eq!(mine["room"], room.as_str());
            for s in subs.iter_mut() {
                assert_eq!(s.expect_type("message"), mine, "room {room}");
            }
        }
        // The last subscriber of node 1 leaves: node 1 lets go of the channel.
        subs[1].send_json(json!({"type": "unsubscribe", "room": room}));
        subs[1].expect_type("unsubscribed");
        wait_shard_numsub(&cluster, &format!("sb:{{room:{room}}}"), 2);
    }
    let published = counter(&nodes[0], "switchboard_redis_published_total");
    assert!(published >= 60, "{published}");
    assert_eq!(
        counter(&nodes[0], "switchboard_redis_publish_failed_total"),
        0
    );
    assert_no_panic(&nodes.iter().collect::<Vec<_>>());
}

fn watcher(s: &TestServer, cluster: &RedisCluster, user: &str) -> Client {
    let mut w = s.connect("/ws?user_id=watcher");
    w.send_json(json!({"type": "presence.watch", "id": "w", "user_ids": [user]}));
    assert_eq!(w.expect_type("presence.state")["id"], "w");
    let channel = format!("sb:{{topic:presence:{user}}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard_numsub(cluster, &channel) == 0 {
        assert!(Instant::now() < deadline, "{channel} never held");
        std::thread::sleep(Duration::from_millis(20));
    }
    w
}

fn presence_event(w: &mut Client, kind: &str, user: &str) -> Value {
    match w.next_event(Duration::from_secs(4)) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], kind, "{v}");
            assert_eq!(v["data"]["user_id"], user, "{v}");
            v
        }
        other => panic!("no {kind}: {other:?}"),
    }
}

#[test]
fn users_presence_and_broadcasts_cross_nodes() {
    let cluster = RedisCluster::start(3);
    let a = node(&cluster);
    let b = node(&cluster);

    // Presence: online once and offline once on both nodes, with devices on both.
    let mut watchers = [watcher(&a, &cluster, "bob"), watcher(&b, &cluster, "bob")];
    let mut bob_a = a.connect("/ws?user_id=bob");
    for w in &mut watchers {
        let e = presence_event(w, "presence.online", "bob");
        assert_eq!(e["data"]["status"], "online", "{e}");
    }
    let mut bob_b = b.connect("/ws?user_id=bob");
    for w in &mut watchers {
        w.expect_silence(300);
    }
    // bob's set is on the master of his watchers' channel's slot, this node's set on {node:..}'s.
    let nodes_key = "sb:{topic:presence:bob}:nodes";
    assert_eq!(
        cluster
            .node(owner(&cluster, nodes_key))
            .int(&["SCARD", nodes_key]),
        2
    );
    wait_shard_numsub(&cluster, "sb:{user:bob}", 2);

    // A direct message from node A to carol on node B; the sender's other device on B.
    let mut carol_b = b.connect("/ws?user_id=carol");
    let mut alice_a = a.connect("/ws?user_id=alice");
    let mut alice_b = b.connect("/ws?user_id=alice");
    wait_shard_numsub(&cluster, "sb:{user:carol}", 1);
    wait_shard_numsub(&cluster, "sb:{user:alice}", 2);
    alice_a.send_json(
        json!({"type": "message.send", "to": "carol", "content": "hi", "clientMsgId": "m1"}),
    );
    let ack = alice_a.expect_type("message.ack");
    let on_b = carol_b.expect_type("message.create");
    assert_eq!(on_b["data"]["content"], "hi");
    assert_eq!(on_b["data"]["from"], "alice");
    assert_eq!(ack["data"]["messageId"], on_b["data"]["messageId"]);
    assert_eq!(alice_b.expect_type("message.create"), on_b);

    // The server API on node A: a send to bob reaches his device on node B.
    let (status, body) = api(
        &a,
        "POST",
        "/api/users/bob/send",
        &json!({"type": "note", "data": {"x": 1}}),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
    let f_a = bob_a.recv_json();
    assert_eq!(bob_b.recv_json(), f_a);
    assert_eq!(f_a["data"], json!({"x": 1}), "{f_a}");

    // A broadcast from node A reaches every connection on node B.
    let (status, body) = api(
        &a,
        "POST",
        "/api/broadcast",
        &json!({"data": {"all": true}}),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
    for c in [&mut bob_b, &mut carol_b, &mut alice_b] {
        let f = c.recv_json();
        assert_eq!(f["data"], json!({"all": true}), "{f}");
    }
    for w in &mut watchers {
        let f = w.recv_json();
        assert_eq!(f["data"], json!({"all": true}), "{f}");
    }

    // bob's devices leave: offline once, on both nodes, after the grace.
    bob_a.close();
    bob_b.close();
    for w in &mut watchers {
        let e = presence_event(w, "presence.offline", "bob");
        assert_eq!(e["data"]["status"], "offline", "{e}");
        w.expect_silence(500);
    }
    assert_eq!(
        cluster
            .node(owner(&cluster, nodes_key))
            .int(&["EXISTS", nodes_key]),
        0
    );
    assert_no_panic(&[&a, &b]);
}

#[test]
fn a_master_killed_and_restarted() {
    let mut cluster = RedisCluster::start(3);
    let a = node(&cluster);
    let b = node(&cluster);
    let mut pairs: Vec<Pair> = (0..3)
        .map(|m| Pair::new(&a, &b, &room_on(&cluster, m, "k")))
        .collect();
    for p in &mut pairs {
        p.crossing_within(Duration::from_secs(3));
    }

    cluster.node_mut(1).kill();
    wait_ready_is(&a, 503, Duration::from_secs(5));
    wait_ready_is(&b, 503, Duration::from_secs(5));
    // Local delivery goes on.
    for p in &mut pairs {
        p.n += 1;
        let n = p.n;
        p.publisher
            .send_json(json!({"type": "publish", "room": p.room, "data": {"n": n}}));
        assert_eq!(p.publisher.expect_type("message")["data"]["n"], n);
    }

    cluster.node_mut(1).restart();
    cluster.wait_ok();
    let back = Instant::now();
    for p in &mut pairs {
        p.crossing_within(Duration::from_secs(3));
    }
    wait_ready_is(&a, 200, Duration::from_secs(3));
    wait_ready_is(&b, 200, Duration::from_secs(3));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    assert!(counter(&a, "switchboard_redis_reconnects_total") >= 2);
    // Key commands work again too: presence through the cluster connection, cluster-wide.
    let mut w = watcher(&a, &cluster, "dora");
    let _dora = b.connect("/ws?user_id=dora");
    let e = presence_event(&mut w, "presence.online", "dora");
    assert_eq!(e["data"]["status"], "online", "{e}");
    assert_no_panic(&[&a, &b]);
}

fn myid(s: &RedisServer) -> String {
    s.cmd(&["CLUSTER", "MYID"])
}

#[test]
fn a_slot_migrated_between_masters_keeps_delivery() {
    let cluster = RedisCluster::start(3);
    let a = node(&cluster);
    let b = node(&cluster);
    let room = room_on(&cluster, 0, "moving");
    let channel = format!("sb:{{room:{room}}}");
    let s = slot(channel.as_bytes()).to_string();
    let mut p = Pair::new(&a, &b, &room);
    wait_shard_numsub(&cluster, &channel, 2);
    p.crossing_within(Duration::from_secs(3));

    // Move the room's slot from master 0 to master 2, as redis-cli --cluster reshard does.
    let (from, to) = (cluster.node(0), cluster.node(2));
    let (from_id, to_id) = (myid(from), myid(to));
    assert_eq!(
        to.cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]),
        "OK"
    );
    assert_eq!(
        from.cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]),
        "OK"
    );
    // (No keys live in a room's slot yet; MIGRATE would move them here.)
    assert_eq!(
        from.cmd_value(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]),
        Resp::Array(vec![])
    );
    // During the migration the channel is still served by its old master.
    p.crossing_within(Duration::from_secs(3));
    for n in cluster.nodes() {
        assert_eq!(n.cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]), "OK");
    }
    assert_eq!(cluster.master_of_slot(slot(channel.as_bytes())), 2);
    // Both nodes hold the channel on its new master, and messages cross again.
    wait_shard_numsub(&cluster, &channel, 2);
    p.crossing_within(Duration::from_secs(3));
    // Both directions.
    let mut back = Pair::new(&b, &a, &room);
    back.crossing_within(Duration::from_secs(3));
    wait_ready_is(&a, 200, Duration::from_secs(3));
    wait_ready_is(&b, 200, Duration::from_secs(3));
    assert_no_panic(&[&a, &b]);
}

#[test]
fn a_killed_nodes_users_go_offline_elsewhere_through_the_reaper() {
    // The reaper's commands span slots (sb:nodes, the dead node's {node:..} keys, each user's
    // presence set): every one routed to its own master.
    let cluster = RedisCluster::start(3);
    let a = node(&cluster);
    let mut b = node(&cluster);
    let mut w = watcher(&a, &cluster, "erin");
    let _erin = b.connect("/ws?user_id=erin");
    let e = presence_event(&mut w, "presence.online", "erin");
    assert_eq!(e["data"]["status"], "online", "{e}");
    b.kill();
    // NODE_DEAD_AFTER + REAP_INTERVAL = 12 s, and a pipeline.
    match w.next_event(Duration::from_secs(16)) {
        common::Event::Json(v) => {
            assert_eq!(v["type"], "presence.offline", "{v}");
            assert_eq!(v["data"]["user_id"], "erin", "{v}");
        }
        other => panic!("no presence.offline: {other:?}"),
    }
    // The dead node is forgotten after its users (the last pipeline of the reap).
    a.wait_metrics("one node reaped", |t| {
        metric(t, "switchboard_redis_nodes_reaped_total") == Some(1)
    });
    let nodes_key = "sb:{topic:presence:erin}:nodes";
    assert_eq!(
        cluster
            .node(owner(&cluster, nodes_key))
            .int(&["EXISTS", nodes_key]),
        0
    );
    let m = cluster.node(owner(&cluster, "sb:nodes"));
    assert_eq!(m.int(&["SCARD", "sb:nodes"]), 1);
    assert_no_panic(&[&a]);
}

#[test]
fn history_rooms_are_sequenced_on_their_master_and_resume_on_another_node() {
    // The append and read scripts keep every key of a room in its slot and publish with
    // SPUBLISH from inside the script: rooms on every master sequence and resume.
    let cluster = RedisCluster::start(3);
    let rooms = r#"[{"pattern": "hist-*", "history_size": 50}]"#;
    let seeds = cluster.seeds();
    let start = || {
        let mut env = vec![
            ("SWITCHBOARD_REDIS_URL", seeds.as_str()),
            ("SWITCHBOARD_ROOMS", rooms),
        ];
        env.extend_from_slice(FAST);
        let s = TestServer::start(&env);
        s.wait_ready();
        s
    };
    let (a, b) = (start(), start());
    for m in 0..3 {
        let room = room_on(&cluster, m, "hist");
        let mut on_b = b.connect("/ws?user_id=reader");
        on_b.subscribe(&room);
        let mut writer = a.connect("/ws?user_id=writer");
        writer.subscribe(&room);
        wait_shard_numsub(&cluster, &format!("sb:{{room:{room}}}"), 2);
        for n in 1..=3u64 {
            writer.send_json(json!({"type": "publish", "room": room, "data": {"n": n}}));
        }
        let mut epoch = String::new();
        for c in [&mut writer, &mut on_b] {
            for n in 1..=3u64 {
                let msg = c.expect_type("message");
                assert_eq!(msg["offset"], n, "{msg}");
                assert_eq!(msg["data"]["n"], n, "{msg}");
                epoch = msg["epoch"].as_str().expect("epoch").to_owned();
            }
        }
        // The stream is on the room's master.
        let key = format!("sb:{{room:{room}}}:h");
        assert_eq!(cluster.node(m).int(&["XLEN", &key]), 3);
        // Back on node A after offset 1: exactly 2 and 3, recovered.
        let mut again = a.connect("/ws?user_id=reader");
        again.send_json(json!({"type": "subscribe", "room": room,
            "since": {"offset": 1, "epoch": epoch}}));
        // The missed messages, then `subscribed` saying they were all there.
        for n in 2..=3u64 {
            let msg = again.expect_type("message");
            assert_eq!(msg["offset"], n, "{msg}");
            assert_eq!(msg["epoch"], epoch.as_str(), "{msg}");
        }
        let sub = again.expect_type("subscribed");
        assert_eq!(sub["data"]["recovered"], true, "{sub}");
        assert_eq!(sub["data"]["epoch"], epoch.as_str(), "{sub}");
    }
}

#[test]
fn a_master_killed_fails_over_to_its_replica_and_every_node_delivers_again() {
    let mut cluster = RedisCluster::start_replicated(3, 1);
    let a = node(&cluster);
    let b = node(&cluster);
    let room = "fo-0".to_string();
    let channel = format!("sb:{{room:{room}}}");
    let s = slot(channel.as_bytes());
    let mut p = Pair::new(&a, &b, &room);
    wait_shard_numsub(&cluster, &channel, 2);
    p.crossing_within(Duration::from_secs(3));
    let mut back = Pair::new(&b, &a, &room);
    back.crossing_within(Duration::from_secs(3));

    let old = cluster.master_of_slot(s);
    cluster.node_mut(old).kill();
    // The replica takes over once the others judge the master failed (the cluster node
    // timeout) and it wins the election.
    let deadline = Instant::now() + Duration::from_secs(20);
    let promoted = loop {
        let m = cluster.master_of_slot(s);
        if m != old {
            break m;
        }
        assert!(Instant::now() < deadline, "no replica took over slot {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let at = Instant::now();
    // Every node finds the new master, subscribes there, and messages cross both ways.
    let one = p.crossing_within(Duration::from_secs(10));
    let two = back.crossing_within(Duration::from_secs(10));
    let took = at.elapsed();
    eprintln!("failover: master {old} -> {promoted}; crossing again after {one:?} / {two:?} ({took:?} from the promotion)");
    assert!(
        took < Duration::from_secs(3),
        "delivery came back {took:?} after the replica took over (goal: within 3 s)"
    );
    assert_eq!(
        cluster
            .node(promoted)
            .cmd_value(&["PUBSUB", "SHARDNUMSUB", &channel])
            .array()
            .and_then(|a| a.get(1))
            .and_then(Resp::int),
        Some(2),
        "both nodes hold the channel on the new master"
    );
    wait_ready_is(&a, 200, Duration::from_secs(5));
    wait_ready_is(&b, 200, Duration::from_secs(5));
    // Key commands follow the new master too: presence, cluster-wide.
    let mut w = watcher(&a, &cluster, "fay");
    let _fay = b.connect("/ws?user_id=fay");
    let e = presence_event(&mut w, "presence.online", "fay");
    assert_eq!(e["data"]["status"], "online", "{e}");
    assert_no_panic(&[&a, &b]);
}

#[test]
fn a_masters_subscriber_that_panics_is_counted_and_started_again() {
    let cluster = RedisCluster::start(3);
    let seeds = cluster.seeds();
    let mut env = vec![
        ("SWITCHBOARD_REDIS_URL", seeds.as_str()),
        ("SWITCHBOARD_TEST_FAULT", "subscriber_panic_on:boom"),
    ];
    env.extend_from_slice(FAST);
    let a = TestServer::start(&env);
    a.wait_ready();
    let b = node(&cluster);
    // Rooms on every master, read on A, before anything goes wrong.
    let mut pairs: Vec<Pair> = (0..3)
        .map(|m| Pair::new(&b, &a, &room_on(&cluster, m, "sup")))
        .collect();
    for p in &mut pairs {
        p.crossing_within(Duration::from_secs(3));
    }
    assert_eq!(counter(&a, "switchboard_redis_task_restarts_total"), 0);
    // A room on master 0 makes A's subscriber of master 0 panic once it is held there.
    let boom = room_on(&cluster, 0, "boom");
    let mut c = a.connect("/ws");
    c.subscribe(&boom);
    a.wait_metrics("the subscriber's restart", |t| {
        metric(t, "switchboard_redis_task_restarts_total") == Some(1)
    });
    // Started again on a new connection, with every channel it held: each master delivers
    // to A again, the room that was held before the panic included.
    for p in &mut pairs {
        p.crossing_within(Duration::from_secs(5));
    }
    wait_ready_is(&a, 200, Duration::from_secs(5));
    let mut boom_pair = Pair::new(&b, &a, &boom);
    boom_pair.crossing_within(Duration::from_secs(3));
    let logs = a.logs();
    assert!(
        logs.contains("a bridge task panicked") && logs.contains("cluster subscriber"),
        "{logs}"
    );
    assert_eq!(counter(&a, "switchboard_redis_task_restarts_total"), 1);
    assert_no_panic(&[&b]);
}
