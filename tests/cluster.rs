//! Three nodes and one Redis (real processes): every kind of delivery crosses nodes through
//! the bridge's Redis pub/sub: room messages (one envelope per publish, whatever the number
//! of subscribers), broadcasts, a user's devices on every node (direct messages, typing,
//! read and delivered receipts), room typing,
//! one connection of another node, and the server API from any node. A node subscribes to a
//! room's channel only while it has subscribers, and the cross-node frames are exactly the
//! frames local subscribers get.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{metric, Client, TestServer};
use serde_json::{json, Value};

const API_KEY: &str = "cluster-test-key";

fn node(redis: &RedisServer, extra: &[(&str, &str)]) -> TestServer {
    let url = redis.url();
    let mut env = vec![
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_API_KEY", API_KEY),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "1s"),
    ];
    env.extend_from_slice(extra);
    let s = TestServer::start(&env);
    s.wait_ready();
    s
}

fn wait_numsub(redis: &RedisServer, channel: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub(channel) != n {
        assert!(
            Instant::now() < deadline,
            "{channel}: {} nodes, not {n}",
            redis.numsub(channel)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn publish(c: &mut Client, room: &str, data: Value) {
    c.send_json(json!({"type": "publish", "room": room, "data": data}));
}

/// The frame without its timestamp (set by the origin, the same on every node).
fn same_frame(a: &Value, b: &Value) {
    assert_eq!(a, b, "a node delivered a different frame");
}

#[test]
fn room_messages_cross_nodes_with_one_publish_each() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis, &[])).collect();
    let mut subs: Vec<Client> = nodes
        .iter()
        .map(|n| {
            let mut c = n.connect("/ws?user_id=reader");
            c.subscribe("lobby");
            c
        })
        .collect();
    // A second subscriber on node 2: still one channel subscription per node.
    let mut extra = nodes[2].connect("/ws");
    extra.subscribe("lobby");
    wait_numsub(&redis, "sb:{room:lobby}", 3);

    let before = redis_stat(&redis, "total_commands_processed");
    let mut alice = nodes[0].connect("/ws?user_id=alice");
    alice.subscribe("lobby");
    publish(&mut alice, "lobby", json!({"n": 1}));
    let here = subs[0].expect_type("message");
    same_frame(&here, &alice.expect_type("message"));
    for s in subs.iter_mut().skip(1) {
        same_frame(&here, &s.expect_type("message"));
    }
    same_frame(&here, &extra.expect_type("message"));
    assert_eq!(here["data"], json!({"n": 1}));
    assert_eq!(here["room"], "lobby", "{here}");

    // 50 more: every node gets them in order.
    for n in 2..=51 {
        publish(&mut alice, "lobby", json!({"n": n}));
    }
    for s in subs.iter_mut().chain([&mut extra, &mut alice]) {
        for n in 2..=51 {
            assert_eq!(s.expect_type("message")["data"]["n"], n);
        }
    }
    // One PUBLISH per message (pipelined), plus the canaries and the stats calls: well under
    // one command per message per subscriber.
    let commands = redis_stat(&redis, "total_commands_processed") - before;
    let published = metric(
        &nodes[0].http_get("/metrics").1,
        "switchboard_redis_published_total",
    )
    .unwrap();
    assert!(published >= 51, "{published}");
    assert!(
        commands < 51 * 2 + 60,
        "{commands} commands for 51 publishes"
    );

    // The last subscriber of a node leaves: that node lets go of the channel.
    subs[1].send_json(json!({"type": "unsubscribe", "room": "lobby"}));
    subs[1].expect_type("unsubscribed");
    wait_numsub(&redis, "sb:{room:lobby}", 2);
    publish(&mut alice, "lobby", json!({"n": 52}));
    alice.expect_type("message");
    assert_eq!(subs[2].expect_type("message")["data"]["n"], 52);
    subs[1].expect_silence(300);
}

fn redis_stat(redis: &RedisServer, field: &str) -> u64 {
    let info = redis
        .cmd_value(&["INFO", "stats"])
        .text()
        .expect("INFO is a bulk string");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in INFO stats: {info}"))
}

#[test]
fn broadcasts_users_and_the_server_api_cross_nodes() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut bob_a = a.connect("/ws?user_id=bob");
    let mut bob_b = b.connect("/ws?user_id=bob");
    let mut carol_b = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:bob}", 2);
    wait_numsub(&redis, "sb:{user:carol}", 1);

    // A direct message from node A reaches the recipient's device on node B, and the
    // sender's other device on node B; the sender gets its ack.
    let mut alice_a = a.connect("/ws?user_id=alice");
    let mut alice_b = b.connect("/ws?user_id=alice");
    wait_numsub(&redis, "sb:{user:alice}", 2);
    alice_a.send_json(
        json!({"type": "message.send", "to": "carol", "content": "hi", "clientMsgId": "m1"}),
    );
    let ack = alice_a.expect_type("message.ack");
    let on_b = carol_b.expect_type("message.create");
    assert_eq!(on_b["data"]["content"], "hi");
    assert_eq!(on_b["data"]["from"], "alice");
    assert_eq!(ack["data"]["messageId"], on_b["data"]["messageId"]);
    let echo = alice_b.expect_type("message.create");
    same_frame(&on_b, &echo);

    // Typing to a user on another node (droppable frames cross too).
    carol_b.send_json(json!({"type": "typing.start", "to": "alice"}));
    let t = alice_a.expect_type("typing.start");
    assert_eq!(t["data"]["user_id"], "carol", "{t}");
    same_frame(&t, &alice_b.expect_type("typing.start"));

    // The server API on node B: a room publish and a send to a user with devices on both.
    let mut room_a = a.connect("/ws");
    room_a.subscribe("news");
    wait_numsub(&redis, "sb:{room:news}", 1);
    let (status, body) = api(
        &b,
        "POST",
        "/api/publish",
        &json!({"room": "news", "data": {"headline": 1}}),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
    assert_eq!(
        room_a.expect_type("message")["data"],
        json!({"headline": 1})
    );
    let (status, body) = api(
        &b,
        "POST",
        "/api/users/bob/send",
        &json!({"type": "note", "data": {"x": 1}}),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
    let f_a = bob_a.recv_json();
    let f_b = bob_b.recv_json();
    same_frame(&f_a, &f_b);

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
}

/// Receipts and room typing across nodes: a `mark.read` / `mark.delivered` reaches every
/// device of its `to` and the reader's other devices on every node, once each and as the same
/// frame; a room's typing reaches the room's subscribers on the other nodes, and the typist's
/// own connection hears nothing.
#[test]
fn receipts_and_room_typing_cross_nodes() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let c = node(&redis, &[]);
    let mut bob_a = a.connect("/ws?user_id=bob");
    let mut bob_c = c.connect("/ws?user_id=bob");
    let mut alice_b = b.connect("/ws?user_id=alice");
    let mut alice_c = c.connect("/ws?user_id=alice");
    let mut carol_b = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:bob}", 2);
    wait_numsub(&redis, "sb:{user:alice}", 2);
    wait_numsub(&redis, "sb:{user:carol}", 1);

    // bob (node A) read alice's messages: alice's devices on B and C, and bob's device on C.
    let ids = json!(["m-1", 42]);
    bob_a.send_json(
        json!({"type": "mark.read", "to": "alice", "conversationId": "conv-1",
                           "messageIds": ids}),
    );
    let first = alice_b.expect_type("message.read");
    assert_eq!(first["data"]["conversationId"], "conv-1", "{first}");
    assert_eq!(first["data"]["messageIds"], ids, "{first}");
    assert_eq!(first["data"]["by"], "bob", "{first}");
    same_frame(&first, &alice_c.expect_type("message.read"));
    same_frame(&first, &bob_c.expect_type("message.read"));
    // bob's device on C says delivered: alice's two devices and bob's device on A.
    bob_c.send_json(
        json!({"type": "mark.delivered", "to": "alice", "conversationId": "conv-1",
                           "messageIds": [7]}),
    );
    let d = alice_c.expect_type("message.delivered");
    assert_eq!(
        (&d["data"]["messageIds"], &d["data"]["by"]),
        (&json!([7]), &json!("bob")),
        "{d}"
    );
    same_frame(&d, &alice_b.expect_type("message.delivered"));
    same_frame(&d, &bob_a.expect_type("message.delivered"));
    // Once each: nothing more for anyone, and nothing for carol.
    for cl in [
        &mut bob_a,
        &mut bob_c,
        &mut alice_b,
        &mut alice_c,
        &mut carol_b,
    ] {
        cl.expect_silence(300);
    }

    // Room typing: carol (B) types in a room with subscribers on A and C.
    for cl in [&mut bob_a, &mut alice_c, &mut carol_b] {
        cl.subscribe("chat");
    }
    wait_numsub(&redis, "sb:{room:chat}", 3);
    carol_b.send_json(json!({"type": "typing.start", "room": "chat"}));
    let t = bob_a.expect_type("typing.start");
    assert_eq!(t["data"]["user_id"], "carol", "{t}");
    assert_eq!(t["data"]["room"], "chat", "{t}");
    same_frame(&t, &alice_c.expect_type("typing.start"));
    carol_b.send_json(json!({"type": "typing.stop", "room": "chat"}));
    let t = alice_c.expect_type("typing.stop");
    same_frame(&t, &bob_a.expect_type("typing.stop"));
    carol_b.expect_silence(300);
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

#[test]
fn a_node_without_redis_serves_alone_and_readiness_tells_the_truth() {
    // Redis configured but not there: the node serves its own clients, /ready says why.
    let redis = RedisServer::start();
    let url = redis.url();
    drop(redis);
    let s = TestServer::start(&[("SWITCHBOARD_REDIS_URL", url.as_str())]);
    // (The store comes up a moment after /live; then only Redis keeps the node unready.)
    let (status, body) = ready_settled(&s);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis unavailable"), "{body}");
    let mut a = s.connect("/ws");
    let mut b = s.connect("/ws");
    a.subscribe("r");
    b.subscribe("r");
    publish(&mut a, "r", json!(1));
    assert_eq!(b.expect_type("message")["data"], 1);
    // Configured to stay ready while degraded: 200, and the body still says so.
    let s2 = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_REDIS_READY_WHEN_DEGRADED", "true"),
    ]);
    let (status, body) = ready_settled(&s2);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"degraded\":\"redis unavailable\""),
        "{body}"
    );
}

/// `/ready` once the message store is up (it starts a moment after `/live`).
fn ready_settled(s: &TestServer) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = s.http_get("/ready");
        if !body.contains("message store unavailable") || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_server_api_disconnect_closes_a_users_devices_on_every_node() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut eve_a = a.connect("/ws?user_id=eve");
    let mut eve_b = b.connect("/ws?user_id=eve");
    let mut other = b.connect("/ws?user_id=frank");
    wait_numsub(&redis, "sb:{user:eve}", 2);
    let (status, body) = api(&a, "POST", "/api/users/eve/disconnect", &json!({}));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["devices"], 1, "devices counts this node's: {v}");
    eve_a.expect_close(1008);
    eve_b.expect_close(1008);
    other.send_json(json!({"type": "ping"}));
    other.expect_type("pong");
}

#[test]
fn api_stats_says_what_is_this_nodes_and_what_is_the_clusters() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let _on_a: Vec<Client> = (0..2).map(|_| a.connect("/ws")).collect();
    let _on_b: Vec<Client> = (0..3).map(|_| b.connect("/ws")).collect();
    // Heartbeats every 2 s carry each node's numbers.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (status, body) = api(&a, "GET", "/api/stats", &json!({}));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["scope"], "node", "{v}");
        assert_eq!(v["connections"], 2, "{v}");
        let c = &v["cluster"];
        assert_eq!(c["scope"], "cluster", "{v}");
        if c["nodes"] == 2 && c["connections"] == 5 {
            assert!(c["as_of_ms"].as_u64().unwrap() > 0, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster numbers never right: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nodes_sharing_postgresql_share_the_client_msg_id_dedup_and_sync() {
    let redis = RedisServer::start();
    let db = common::pg::database("cluster_dedup");
    let a = node(&redis, &[("SWITCHBOARD_DATABASE_URL", db.as_str())]);
    let b = node(&redis, &[("SWITCHBOARD_DATABASE_URL", db.as_str())]);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    // Sent on node A; the client loses the ack, reconnects to node B and retries.
    let mut alice_a = a.connect("/ws?user_id=alice");
    alice_a.send_json(
        json!({"type": "message.send", "to": "carol", "content": "once", "clientMsgId": "retry-1"}),
    );
    let first = alice_a.expect_type("message.ack");
    alice_a.close();
    let mut alice_b = b.connect("/ws?user_id=alice");
    alice_b.send_json(
        json!({"type": "message.send", "to": "carol", "content": "once", "clientMsgId": "retry-1"}),
    );
    // alice's new device may hear the first copy's message.create first (it is her own
    // message, sent to her other devices through Redis, racing her subscription on B).
    let mut again = alice_b.recv_json();
    if again["type"] == "message.create" {
        assert_eq!(again["data"]["clientMsgId"], "retry-1", "{again}");
        again = alice_b.recv_json();
    }
    assert_eq!(again["type"], "message.ack", "{again}");
    assert_eq!(
        first["data"]["serverMsgId"], again["data"]["serverMsgId"],
        "{first} {again}"
    );
    // Carol saw it once, and sync on either node has it once.
    carol.expect_type("message.create");
    carol.expect_silence(300);
    for n in [&a, &b] {
        let mut c = n.connect("/ws?user_id=carol");
        c.send_json(json!({"type": "sync", "since": 0}));
        let m = c.expect_type("message.create");
        assert_eq!(m["data"]["content"], "once");
        c.expect_type("sync.done");
    }
}
