//! Room history across nodes (real processes, one Redis): Redis sequences the messages of
//! rooms with history, so every node delivers one offset sequence with one epoch; a client
//! resumes on any node (from the node's cache or the Redis stream); a trimmed stream, or a
//! Redis that lost its data, reads `recovered: false`; concurrent resumes of one room on one
//! node share one stream read; with Redis down, local delivery goes on under a node-local
//! epoch that no resume mixes with the cluster's.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{metric, Client, TestServer};
use serde_json::json;

const API_KEY: &str = "cluster-history-key";

const ROOMS: &str =
    r#"[{"pattern": "h-*", "history_size": 100}, {"pattern": "s-*", "history_size": 3}]"#;

fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    let s = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_ROOMS", ROOMS),
        ("SWITCHBOARD_API_KEY", API_KEY),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "1s"),
        ("SWITCHBOARD_REDIS_TIMEOUT", "1s"),
        ("SWITCHBOARD_REDIS_RECONNECT_MAX", "200ms"),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    s.wait_ready();
    s
}

fn publish(c: &mut Client, room: &str, n: u64) {
    c.send_json(json!({"type": "publish", "room": room, "data": {"n": n}}));
}

/// The next `count` messages: (offset, epoch, n).
fn messages(c: &mut Client, count: usize) -> Vec<(u64, String, u64)> {
    (0..count)
        .map(|_| {
            let m = c.expect_type("message");
            (
                m["offset"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no offset: {m}")),
                m["epoch"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no epoch: {m}"))
                    .to_owned(),
                m["data"]["n"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn resume(c: &mut Client, room: &str, offset: u64, epoch: &str) {
    c.send_json(
        json!({"type": "subscribe", "room": room, "since": {"offset": offset, "epoch": epoch}}),
    );
}

/// `POST /api/publish` on `server`: (status, body).
fn api_publish(server: &TestServer, room: &str, n: u64) -> (u16, serde_json::Value) {
    let body = json!({"room": room, "data": {"n": n}}).to_string();
    let raw = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = server.http_request(&raw);
    (r.status, serde_json::from_str(&r.body).unwrap_or_default())
}

fn counter(s: &TestServer, name: &str) -> u64 {
    metric(&s.http_get("/metrics").1, name).unwrap_or(0)
}

fn xrange_calls(redis: &RedisServer) -> u64 {
    let info = redis
        .cmd_value(&["INFO", "commandstats"])
        .text()
        .expect("INFO is a bulk string");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xrange:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The room's epoch as Redis keeps it.
fn redis_epoch(redis: &RedisServer, room: &str) -> Option<String> {
    redis
        .cmd_value(&["HGET", &format!("sb:{{room:{room}}}:e"), "epoch"])
        .text()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_node_delivers_one_offset_sequence_and_a_client_resumes_on_another_node() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..3).map(|_| node(&redis)).collect();
    let mut a = nodes[0].connect("/ws");
    let mut b = nodes[1].connect("/ws");
    let sa = a.subscribe("h-1");
    let sb = b.subscribe("h-1");
    // One epoch cluster-wide, at offset 0 before any message.
    assert_eq!(sa["data"]["offset"], 0, "{sa}");
    assert_eq!(sa["data"]["epoch"], sb["data"]["epoch"], "{sa} {sb}");
    let epoch = sa["data"]["epoch"].as_str().unwrap().to_owned();

    for n in 1..=3 {
        publish(&mut a, "h-1", n);
    }
    let on_a = messages(&mut a, 3);
    let on_b = messages(&mut b, 3);
    assert_eq!(on_a, on_b, "two nodes saw different offsets");
    let want: Vec<(u64, String, u64)> = (1..=3).map(|n| (n, epoch.clone(), n)).collect();
    assert_eq!(on_a, want);

    // B's client goes; five more are published; it comes back on C with what it saw last.
    b.close();
    for n in 4..=8 {
        publish(&mut a, "h-1", n);
    }
    messages(&mut a, 5);
    let mut c = nodes[2].connect("/ws");
    resume(&mut c, "h-1", 3, &epoch);
    let replay = messages(&mut c, 5);
    let want: Vec<(u64, String, u64)> = (4..=8).map(|n| (n, epoch.clone(), n)).collect();
    assert_eq!(replay, want, "not exactly the missed messages");
    let sub = c.expect_type("subscribed");
    assert_eq!(sub["data"]["recovered"], true, "{sub}");
    assert_eq!(sub["data"]["offset"], 8);
    assert_eq!(sub["data"]["epoch"], epoch.as_str());
    // Then live, nothing twice.
    publish(&mut a, "h-1", 9);
    assert_eq!(messages(&mut c, 1), [(9, epoch.clone(), 9)]);
    c.expect_silence(200);
    messages(&mut a, 1);
    assert!(counter(&nodes[2], "switchboard_redis_history_resumes_read_total") >= 1);

    // A second resume on A is answered from A's own cache (no stream read).
    let reads = counter(&nodes[0], "switchboard_redis_history_reads_total");
    let mut again = nodes[0].connect("/ws");
    resume(&mut again, "h-1", 6, &epoch);
    assert_eq!(messages(&mut again, 3).len(), 3);
    assert_eq!(again.expect_type("subscribed")["data"]["recovered"], true);
    assert_eq!(
        counter(&nodes[0], "switchboard_redis_history_reads_total"),
        reads
    );
    assert!(counter(&nodes[0], "switchboard_redis_history_resumes_local_total") >= 1);

    // The server API on B (no subscriber there): its answer carries the cluster offset, and
    // the subscribers on A and C get that offset.
    let (status, body) = api_publish(&nodes[1], "h-1", 10);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 10, "{body}");
    assert_eq!(body["epoch"], epoch.as_str(), "{body}");
    assert_eq!(messages(&mut a, 1), [(10, epoch.clone(), 10)]);
    assert_eq!(messages(&mut c, 1), [(10, epoch.clone(), 10)]);
}

#[test]
fn interleaved_publishers_on_two_nodes_make_one_increasing_sequence() {
    let redis = RedisServer::start();
    let nodes: Vec<TestServer> = (0..2).map(|_| node(&redis)).collect();
    let mut readers: Vec<Client> = nodes
        .iter()
        .map(|n| {
            let mut c = n.connect("/ws");
            c.subscribe("h-mix");
            c
        })
        .collect();
    const N: u64 = 100;
    let pubs: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut p = n.connect("/ws");
            p.subscribe("h-mix");
            std::thread::spawn(move || {
                for k in 0..N {
                    publish(&mut p, "h-mix", i as u64 * 1000 + k);
                }
                p
            })
        })
        .collect();
    let seen: Vec<Vec<(u64, String, u64)>> = readers
        .iter_mut()
        .map(|c| messages(c, 2 * N as usize))
        .collect();
    for p in pubs {
        p.join().unwrap();
    }
    assert_eq!(seen[0], seen[1], "the nodes disagree on the order");
    let offsets: Vec<u64> = seen[0].iter().map(|m| m.0).collect();
    assert_eq!(offsets, (1..=2 * N).collect::<Vec<_>>());
    // Each publisher's own messages keep their order.
    for i in 0..2u64 {
        let mine: Vec<u64> = seen[0]
            .iter()
            .filter(|m| m.2 / 1000 == i)
            .map(|m| m.2 % 1000)
            .collect();
        assert_eq!(mine, (0..N).collect::<Vec<_>>());
    }
}

#[test]
fn a_trimmed_stream_and_a_redis_that_lost_its_data_read_recovered_false() {
    let mut redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut p = a.connect("/ws");
    let epoch = p.subscribe("s-1")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 1..=10 {
        publish(&mut p, "s-1", n);
    }
    messages(&mut p, 10);
    // history_size 3 keeps 8, 9, 10: from 7 it recovers on B, from 6 it cannot.
    let mut c = b.connect("/ws");
    resume(&mut c, "s-1", 7, &epoch);
    assert_eq!(
        messages(&mut c, 3).iter().map(|m| m.0).collect::<Vec<_>>(),
        [8, 9, 10]
    );
    assert_eq!(c.expect_type("subscribed")["data"]["recovered"], true);
    let mut c = b.connect("/ws");
    resume(&mut c, "s-1", 6, &epoch);
    let sub = c.expect_type("subscribed");
    assert_eq!(sub["data"]["recovered"], false, "{sub}");
    assert_eq!(sub["data"]["offset"], 10);

    // Redis restarts without persistence: the room's history and epoch are gone.
    redis.restart();
    wait_until("both nodes ready again", || {
        a.http_get("/ready").0 == 200 && b.http_get("/ready").0 == 200
    });
    // A's subscriber is still there; the next message Redis sequences starts a new epoch
    // (messages sequenced on A while it was reconnecting carry A's own epoch: skipped).
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_epoch = loop {
        publish(&mut p, "s-1", 100);
        let m = p.expect_type("message");
        let e = m["epoch"].as_str().unwrap().to_owned();
        if Some(&e) == redis_epoch(&redis, "s-1").as_ref() {
            assert_eq!(m["offset"], 1, "{m}");
            break e;
        }
        assert!(Instant::now() < deadline, "no new cluster epoch: {m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(new_epoch, epoch);
    // A resume from the old epoch on the other node: recovered false, always; once B's
    // connections noticed the restart too, with the new position.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = b.connect("/ws");
        resume(&mut c, "s-1", 10, &epoch);
        let sub = c.expect_type("subscribed");
        assert_eq!(sub["data"]["recovered"], false, "{sub}");
        if sub["data"]["epoch"] == new_epoch.as_str() {
            assert_eq!(sub["data"]["offset"], 1, "{sub}");
            break;
        }
        if Instant::now() >= deadline {
            let m = b.http_get("/metrics").1;
            let h: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("switchboard_redis"))
                .collect();
            panic!(
                "B never saw the new epoch: {sub}\n{}\n{}",
                h.join("\n"),
                b.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn concurrent_resumes_on_one_node_share_one_stream_read() {
    let mut redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut p = a.connect("/ws");
    let epoch = p.subscribe("h-storm")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 1..=20 {
        publish(&mut p, "h-storm", n);
    }
    messages(&mut p, 20);
    // 200 clients reconnect to B at once (B holds nothing of the room yet).
    const CLIENTS: usize = 200;
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| b.connect("/ws")).collect();
    let before = xrange_calls(&redis);
    // Hold Redis for a moment so every resume arrives before the first read is answered.
    redis.freeze();
    for c in clients.iter_mut() {
        resume(c, "h-storm", 10, &epoch);
    }
    std::thread::sleep(Duration::from_millis(300));
    redis.thaw();
    for c in clients.iter_mut() {
        let got: Vec<u64> = messages(c, 10).iter().map(|m| m.0).collect();
        assert_eq!(got, (11..=20).collect::<Vec<_>>());
        let sub = c.expect_type("subscribed");
        assert_eq!(sub["data"]["recovered"], true, "{sub}");
    }
    let calls = xrange_calls(&redis) - before;
    assert_eq!(
        calls, 1,
        "{calls} XRANGE for {CLIENTS} resumes of one room on one node"
    );
    assert!(counter(&b, "switchboard_redis_history_resumes_shared_total") >= CLIENTS as u64 - 1);
}

#[test]
fn with_redis_down_local_delivery_goes_on_and_no_resume_mixes_histories() {
    let mut redis = RedisServer::start();
    let a = node(&redis);
    let mut sub = a.connect("/ws");
    let mut p = a.connect("/ws");
    let cluster_epoch = sub.subscribe("h-down")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    p.subscribe("h-down");
    publish(&mut p, "h-down", 1);
    assert_eq!(messages(&mut sub, 1)[0].0, 1);
    messages(&mut p, 1);

    redis.kill();
    wait_until("the node sees Redis down", || a.http_get("/ready").0 == 503);
    // Delivered here, sequenced here under a node-local epoch.
    publish(&mut p, "h-down", 2);
    let m = messages(&mut sub, 1).remove(0);
    messages(&mut p, 1);
    assert_ne!(m.1, cluster_epoch, "{m:?}");
    assert_eq!(m.2, 2);
    let local_epoch = m.1.clone();
    assert!(counter(&a, "switchboard_redis_history_local_total") >= 1);
    // A resume in the local epoch on this node recovers from here; one from the cluster's
    // offset 1 cannot be told it missed nothing.
    let mut c = a.connect("/ws");
    resume(&mut c, "h-down", 0, &local_epoch);
    assert_eq!(messages(&mut c, 1)[0].2, 2);
    assert_eq!(c.expect_type("subscribed")["data"]["recovered"], true);
    let mut c = a.connect("/ws");
    resume(&mut c, "h-down", 1, &cluster_epoch);
    let s = c.expect_type("subscribed");
    assert_eq!(s["data"]["recovered"], false, "{s}");

    // Redis back (empty): the next message has a cluster epoch again, neither old one.
    redis.restart();
    wait_until("the node sees Redis up", || a.http_get("/ready").0 == 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        publish(&mut p, "h-down", 3);
        let m = messages(&mut sub, 1).remove(0);
        messages(&mut p, 1);
        if Some(&m.1) == redis_epoch(&redis, "h-down").as_ref() {
            assert_ne!(m.1, cluster_epoch);
            assert_ne!(m.1, local_epoch);
            assert_eq!(m.0, 1, "{m:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still local: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_that_let_go_of_a_room_reads_the_stream_instead_of_its_stale_cache() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    let mut p = a.connect("/ws");
    let epoch = p.subscribe("h-stale")["data"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // B has a subscriber and caches 1..3.
    let mut on_b = b.connect("/ws");
    on_b.subscribe("h-stale");
    for n in 1..=3 {
        publish(&mut p, "h-stale", n);
    }
    messages(&mut p, 3);
    assert_eq!(messages(&mut on_b, 3).len(), 3);
    // B's last subscriber leaves: B lets go of the channel, and misses 4..6.
    on_b.send_json(json!({"type": "unsubscribe", "room": "h-stale"}));
    on_b.expect_type("unsubscribed");
    wait_until("B unsubscribed", || redis.numsub("sb:{room:h-stale}") == 1);
    for n in 4..=6 {
        publish(&mut p, "h-stale", n);
    }
    messages(&mut p, 3);
    // A resume on B from 2 must bring 3..6 (the stream), not 3 alone (the stale cache).
    let mut c = b.connect("/ws");
    resume(&mut c, "h-stale", 2, &epoch);
    let got: Vec<u64> = messages(&mut c, 4).iter().map(|m| m.0).collect();
    assert_eq!(got, [3, 4, 5, 6]);
    let sub = c.expect_type("subscribed");
    assert_eq!(sub["data"]["recovered"], true, "{sub}");
    assert_eq!(sub["data"]["offset"], 6);
    c.expect_silence(200);
}
