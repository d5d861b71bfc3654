//! Two nodes and one Redis, no PostgreSQL (real processes): the `clientMsgId` dedup of direct
//! messages holds across nodes. A retry on another node gets the first copy's ack and is not
//! delivered again; senders are independent; the claim lives `dedup_window`; a retry of a
//! message in flight elsewhere waits for it; a first attempt that failed releases its claim;
//! with Redis frozen, messages are still acked within a bound (deduplicated per node only,
//! counted); and with Kafka (librdkafka's mock broker) a retry on another node is not
//! produced again, nor is a record still being retried past its ack wait.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{metric, Client, TestServer};
use serde_json::{json, Value};

fn node(redis: &RedisServer, extra: &[(&str, &str)]) -> TestServer {
    let url = redis.url();
    let mut env = vec![
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
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

fn send(c: &mut Client, to: &str, cmid: &str, content: &str, id: u64) {
    c.send_json(json!({
        "type": "message.send", "to": to, "clientMsgId": cmid, "content": content, "id": id
    }));
}

/// The ack of command `id`.
fn ack(c: &mut Client, id: u64) -> Value {
    let a = c.expect_type("message.ack");
    assert_eq!(a["id"], id, "{a}");
    a
}

fn metric_of(s: &TestServer, name: &str) -> u64 {
    let (_, text) = s.http_get("/metrics");
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Wait until the claim key of `key` holds a recorded ack, and return it (without `a:`).
fn recorded(redis: &RedisServer, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = redis.cmd_value(&["GET", key]).text().unwrap_or_default();
        if let Some(json) = v.strip_prefix("a:") {
            return json.to_owned();
        }
        assert!(Instant::now() < deadline, "{key} never held an ack: {v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_retry_on_another_node_gets_the_first_ack_and_is_delivered_once() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    // The recipient has a device on each node, the sender one on each.
    let mut carol_a = a.connect("/ws?user_id=carol");
    let mut carol_b = b.connect("/ws?user_id=carol");
    let mut alice_a = a.connect("/ws?user_id=alice");
    let mut alice_b = b.connect("/ws?user_id=alice");
    wait_numsub(&redis, "sb:{user:carol}", 2);
    wait_numsub(&redis, "sb:{user:alice}", 2);

    send(&mut alice_a, "carol", "c-1", "once", 1);
    let first = ack(&mut alice_a, 1);
    let on_a = carol_a.expect_type("message.create");
    let on_b = carol_b.expect_type("message.create");
    assert_eq!(on_a["data"], on_b["data"]);
    assert_eq!(on_a["data"]["serverMsgId"], first["data"]["serverMsgId"]);
    let echo = alice_b.expect_type("message.create");
    assert_eq!(echo["data"]["eventId"], on_a["data"]["eventId"]);

    // The ack is in Redis, under the sender's hash tag, for dedup_window (5 min).
    let key = "sb:{user:alice}:cm:c-1";
    let kept: Value = serde_json::from_str(&recorded(&redis, key)).expect("the ack's data");
    assert_eq!(kept, first["data"]);
    let ttl = redis.int(&["PTTL", key]);
    assert!(ttl > 290_000 && ttl <= 300_000, "PTTL {ttl}");

    // The client lost the ack and retries on node B (whatever the repeat contains): the first
    // copy's ack, field for field, with this command's id; nothing is delivered again.
    send(&mut alice_b, "carol", "c-1", "twice?", 2);
    let again = ack(&mut alice_b, 2);
    assert_eq!(again["data"], first["data"], "{first} {again}");
    // And once more on node A (its own store knows it too).
    send(&mut alice_a, "carol", "c-1", "thrice?", 3);
    assert_eq!(ack(&mut alice_a, 3)["data"], first["data"]);
    for c in [&mut carol_a, &mut carol_b, &mut alice_a, &mut alice_b] {
        c.expect_silence(400);
    }
    assert_eq!(metric_of(&b, "switchboard_redis_dedup_repeats_total"), 1);
    assert_eq!(metric_of(&a, "switchboard_redis_dedup_claims_total"), 1);
    assert_eq!(metric_of(&b, "switchboard_redis_dedup_claims_total"), 0);
    assert_eq!(metric_of(&b, "switchboard_store_messages_total"), 0);
    assert_eq!(metric_of(&a, "switchboard_redis_dedup_unchecked_total"), 0);
}

#[test]
fn different_senders_with_the_same_client_msg_id_are_independent() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    let mut alice = a.connect("/ws?user_id=alice");
    let mut dave = b.connect("/ws?user_id=dave");
    send(&mut alice, "carol", "same", "from alice", 1);
    let from_alice = ack(&mut alice, 1);
    assert_eq!(
        carol.expect_type("message.create")["data"]["content"],
        "from alice"
    );
    send(&mut dave, "carol", "same", "from dave", 1);
    let from_dave = ack(&mut dave, 1);
    assert_eq!(
        carol.expect_type("message.create")["data"]["content"],
        "from dave"
    );
    assert_ne!(
        from_alice["data"]["serverMsgId"],
        from_dave["data"]["serverMsgId"]
    );
    assert_eq!(from_dave["data"]["from"], "dave");
    assert_eq!(redis.int(&["EXISTS", "sb:{user:alice}:cm:same"]), 1);
    assert_eq!(redis.int(&["EXISTS", "sb:{user:dave}:cm:same"]), 1);
}

#[test]
fn a_retry_after_the_dedup_window_is_a_new_message_on_another_node() {
    let redis = RedisServer::start();
    let window = [("SWITCHBOARD_DEDUP_WINDOW", "1s")];
    let a = node(&redis, &window);
    let b = node(&redis, &window);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    let mut alice_a = a.connect("/ws?user_id=alice");
    send(&mut alice_a, "carol", "late-1", "first", 1);
    let first = ack(&mut alice_a, 1);
    carol.expect_type("message.create");
    let key = "sb:{user:alice}:cm:late-1";
    recorded(&redis, key);
    let ttl = redis.int(&["PTTL", key]);
    assert!(ttl > 0 && ttl <= 1000, "PTTL {ttl}");

    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["EXISTS", key]) == 1 {
        assert!(Instant::now() < deadline, "the claim never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the window, node B has never heard of it: a new message, delivered.
    let mut alice_b = b.connect("/ws?user_id=alice");
    send(&mut alice_b, "carol", "late-1", "second", 2);
    let second = ack(&mut alice_b, 2);
    assert_ne!(second["data"]["serverMsgId"], first["data"]["serverMsgId"]);
    let m = carol.expect_type("message.create");
    assert_eq!(m["data"]["content"], "second");
    // The sender's device on A is another device of the sender: it gets the new one too.
    assert_eq!(alice_a.expect_type("message.create")["data"], m["data"]);
    // Within the new copy's window Redis answers for it on every node, A included (whose
    // own store also holds the first copy).
    recorded(&redis, key);
    send(&mut alice_a, "carol", "late-1", "third", 3);
    assert_eq!(ack(&mut alice_a, 3)["data"], second["data"]);
    carol.expect_silence(300);
}

#[test]
fn a_retry_of_a_message_in_flight_on_another_node_waits_for_it() {
    let redis = RedisServer::start();
    // A retry waits half of store_timeout: 1 s.
    let a = node(&redis, &[("SWITCHBOARD_STORE_TIMEOUT", "2s")]);
    let mut carol = a.connect("/ws?user_id=carol");
    let mut alice = a.connect("/ws?user_id=alice");
    let pending = format!("p:deadbeef:{:032x}", 1);

    // Another node holds the first copy and never answers: "retry later", nothing stored.
    let key = "sb:{user:alice}:cm:f-1";
    redis.cmd(&["SET", key, &pending, "PX", "60000"]);
    let t0 = Instant::now();
    send(&mut alice, "carol", "f-1", "x", 1);
    let e = alice.expect_error("message still in flight, retry later");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(e["id"], 1);
    assert_eq!(e["data"]["clientMsgId"], "f-1");
    assert_eq!(redis.cmd_value(&["GET", key]).text(), Some(pending.clone()));
    assert_eq!(metric_of(&a, "switchboard_redis_dedup_in_flight_total"), 1);

    // The other node acks while the retry waits: the retry gets that ack.
    send(&mut alice, "carol", "f-1", "x", 2);
    std::thread::sleep(Duration::from_millis(300));
    let theirs = json!({
        "clientMsgId": "f-1", "serverMsgId": "01a234fb-8b72-77cb-8120-6f506651f1cf",
        "conversationId": "c", "conversationNumericId": 4, "sentAt": "2026-12-02T04:20:30.194Z",
        "cursor": 9, "seq": 1, "from": "alice", "to": "carol"
    });
    let value = format!("a:{theirs}");
    redis.cmd(&["SET", key, &value, "PX", "60000"]);
    assert_eq!(ack(&mut alice, 2)["data"], theirs);

    // The other node's first copy fails and releases its claim: the waiting retry claims the
    // key and is a new message.
    let key2 = "sb:{user:alice}:cm:f-2";
    redis.cmd(&["SET", key2, &pending, "PX", "60000"]);
    send(&mut alice, "carol", "f-2", "mine", 3);
    std::thread::sleep(Duration::from_millis(300));
    redis.cmd(&["DEL", key2]);
    let mine = ack(&mut alice, 3);
    assert_eq!(mine["data"]["clientMsgId"], "f-2");
    assert_eq!(
        carol.expect_type("message.create")["data"]["content"],
        "mine"
    );
    let kept: Value = serde_json::from_str(&recorded(&redis, key2)).unwrap();
    assert_eq!(kept, mine["data"]);
    carol.expect_silence(200);
    assert!(metric_of(&a, "switchboard_redis_dedup_waited_total") >= 3);
}

#[test]
fn a_first_attempt_answered_with_an_error_releases_its_claim() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    let mut alice_a = a.connect("/ws?user_id=alice");
    // No such conversation: an error, no ack.
    alice_a.send_json(json!({
        "type": "message.send", "clientMsgId": "r-1", "conversationId": "no-such-thread",
        "content": "lost?", "id": 1
    }));
    alice_a.expect_error("conversation not found");
    let key = "sb:{user:alice}:cm:r-1";
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["EXISTS", key]) == 1 {
        assert!(Instant::now() < deadline, "the claim was never released");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The retry (now with a recipient) on node B is stored, delivered and acked.
    let mut alice_b = b.connect("/ws?user_id=alice");
    send(&mut alice_b, "carol", "r-1", "found", 2);
    let acked = ack(&mut alice_b, 2);
    assert_eq!(
        carol.expect_type("message.create")["data"]["content"],
        "found"
    );
    let kept: Value = serde_json::from_str(&recorded(&redis, key)).unwrap();
    assert_eq!(kept, acked["data"]);
}

#[test]
fn with_redis_frozen_messages_are_acked_within_a_bound_and_counted_unchecked() {
    let mut redis = RedisServer::start();
    let fast = [
        ("SWITCHBOARD_REDIS_TIMEOUT", "500ms"),
        ("SWITCHBOARD_REDIS_RECONNECT_MAX", "500ms"),
    ];
    let a = node(&redis, &fast);
    let b = node(&redis, &fast);
    let mut carol = a.connect("/ws?user_id=carol");
    let mut alice_a = a.connect("/ws?user_id=alice");
    wait_numsub(&redis, "sb:{user:carol}", 1);

    redis.freeze();
    for i in 0..3u64 {
        let t0 = Instant::now();
        send(&mut alice_a, "carol", &format!("z-{i}"), "while frozen", i);
        ack(&mut alice_a, i);
        let took = t0.elapsed();
        // At most one redis_timeout for the claim (then claims are skipped a while).
        assert!(took < Duration::from_millis(2_000), "ack {i} took {took:?}");
        assert_eq!(
            carol.expect_type("message.create")["data"]["clientMsgId"],
            format!("z-{i}")
        );
    }
    a.wait_metrics("unchecked dedup counted", |t| {
        metric(t, "switchboard_redis_dedup_unchecked_total").is_some_and(|n| n >= 3)
    });
    // Node A's own store still dedups while Redis is away.
    send(&mut alice_a, "carol", "z-0", "again", 9);
    ack(&mut alice_a, 9);
    carol.expect_silence(300);

    // Redis back: the acks are recorded once it answers, so a retry on B is a repeat.
    redis.thaw();
    let first: Value = serde_json::from_str(&recorded(&redis, "sb:{user:alice}:cm:z-1")).unwrap();
    let mut alice_b = b.connect("/ws?user_id=alice");
    send(&mut alice_b, "carol", "z-1", "again", 10);
    assert_eq!(ack(&mut alice_b, 10)["data"], first);
    carol.expect_silence(300);
}

const TOPIC: &str = "dm-dedup";

/// The answer (ack or error) to `cmid` on `c`, skipping other frames.
fn answer_for(c: &mut Client, cmid: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left) {
            common::Event::Json(v) => {
                let t = v["type"].as_str().unwrap_or("");
                if (t == "message.ack" || t == "error") && v["data"]["clientMsgId"] == cmid {
                    return v;
                }
            }
            other => panic!("waiting for the answer to {cmid}: {other:?}"),
        }
    }
}

/// Send until acked (the first produce sets the producer up); retries are one message.
fn send_until_acked(c: &mut Client, to: &str, cmid: &str) -> Value {
    for _ in 0..20 {
        c.send_json(json!({"type": "message.send", "to": to, "clientMsgId": cmid, "content": "k"}));
        let v = answer_for(c, cmid, Duration::from_secs(30));
        if v["type"] == "message.ack" {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{cmid} never acked");
}

#[test]
fn with_kafka_a_retry_on_another_node_is_acked_and_not_produced_again() {
    let redis = RedisServer::start();
    let mock = common::kafka::Mock::start(1);
    mock.create_topic(TOPIC, 1);
    let bootstrap = mock.bootstrap();
    let kafka = [
        ("SWITCHBOARD_KAFKA_BROKERS", bootstrap.as_str()),
        ("SWITCHBOARD_KAFKA_DM_TOPIC", TOPIC),
    ];
    let a = node(&redis, &kafka);
    let b = node(&redis, &kafka);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    let mut alice_a = a.connect("/ws?user_id=alice");
    let first = send_until_acked(&mut alice_a, "carol", "k-1");
    let create = carol.expect_type("message.create");
    assert_eq!(create["data"]["serverMsgId"], first["data"]["serverMsgId"]);
    recorded(&redis, "sb:{user:alice}:cm:k-1");

    let mut alice_b = b.connect("/ws?user_id=alice");
    alice_b.send_json(
        json!({"type": "message.send", "to": "carol", "clientMsgId": "k-1", "content": "k"}),
    );
    let again = answer_for(&mut alice_b, "k-1", Duration::from_secs(10));
    assert_eq!(again["type"], "message.ack", "{again}");
    assert_eq!(again["data"], first["data"]);
    carol.expect_silence(300);
    let recs = common::kafka::read_all(&bootstrap, TOPIC, 1, common::kafka::READ_TIMEOUT);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(metric_of(&b, "switchboard_kafka_dm_produced_total"), 0);
}

#[test]
fn with_kafka_a_record_past_its_ack_wait_keeps_its_claim_and_no_node_stores_it_again() {
    let redis = RedisServer::start();
    let mock = common::kafka::Mock::start(1);
    mock.create_topic(TOPIC, 1);
    let bootstrap = mock.bootstrap();
    let env = [
        ("SWITCHBOARD_KAFKA_BROKERS", bootstrap.as_str()),
        ("SWITCHBOARD_KAFKA_DM_TOPIC", TOPIC),
        ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "300ms"),
        ("SWITCHBOARD_KAFKA_MESSAGE_TIMEOUT", "60s"),
        // A retry on another node waits 1 s.
        ("SWITCHBOARD_STORE_TIMEOUT", "2s"),
    ];
    let a = node(&redis, &env);
    let b = node(&redis, &env);
    let mut carol = b.connect("/ws?user_id=carol");
    wait_numsub(&redis, "sb:{user:carol}", 1);
    let mut alice_a = a.connect("/ws?user_id=alice");
    send_until_acked(&mut alice_a, "carol", "warm-up");
    carol.expect_type("message.create");
    a.wait_metrics("warm-up settled", |m| {
        metric(m, "switchboard_kafka_dm_pending") == Some(0)
    });

    mock.broker_down(1);
    alice_a.send_json(
        json!({"type": "message.send", "to": "carol", "clientMsgId": "l-1", "content": "late"}),
    );
    let e = answer_for(&mut alice_a, "l-1", Duration::from_secs(10));
    assert_eq!(
        e["error"], "kafka did not confirm in time, retry later",
        "{e}"
    );
    // The claim is held (extended) while librdkafka retries the record: a retry on node B is
    // not stored or produced a second time.
    // The extension is the bridge's next command after the answer: wait for it (bounded).
    let key = "sb:{user:alice}:cm:l-1";
    let held = redis.cmd_value(&["GET", key]).text().unwrap_or_default();
    assert!(held.starts_with("p:"), "{held:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.int(&["PTTL", key]) <= 30_000 {
        assert!(
            Instant::now() < deadline,
            "not extended to the message timeout: PTTL {}",
            redis.int(&["PTTL", key])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut alice_b = b.connect("/ws?user_id=alice");
    alice_b.send_json(
        json!({"type": "message.send", "to": "carol", "clientMsgId": "l-1", "content": "late"}),
    );
    let e2 = answer_for(&mut alice_b, "l-1", Duration::from_secs(10));
    assert_eq!(e2["error"], "message still in flight, retry later", "{e2}");
    carol.expect_silence(200);

    // Node B neither stored nor produced it; the claim is still node A's.
    assert_eq!(metric_of(&b, "switchboard_store_messages_total"), 0);
    assert_eq!(metric_of(&b, "switchboard_kafka_dm_produced_total"), 0);
    let still = redis.cmd_value(&["GET", key]).text().unwrap_or_default();
    assert_eq!(still, held);
    // (That the record, once written, records its ack is not tested here: librdkafka's mock
    // broker, taken down and up again while two nodes' producers use it, takes neither back
    // within 15 s, with or without Redis, though one producer alone is back at once; tansu,
    // whose freeze would do, is not installed on every machine. `kafka_dm.rs` tests the late
    // write on one node.)
}
