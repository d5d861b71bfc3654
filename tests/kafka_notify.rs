//! Notifications from Kafka topics, end to end: the real binary consuming from a real tansu
//! broker (`common::kafka`), records produced by the test, frames read from real sockets.
//! Covered: a user notification with the target from a JSON pointer and from the key, the
//! exact `data` of each, a room notification, dead-lettering with the reason header (read back
//! from the dead-letter topic) while the partition goes on, consumer lag per partition in
//! `/metrics`, notifications for users and rooms held by another node (through Redis), and a
//! SIGKILLed consumer restarted on the same PostgreSQL store: each
//! notification reaches the user once, and REST lists each once.
//!
//! Needs `tansu` (see `common::kafka::tansu_install_command`) and PostgreSQL binaries for the
//! restart test; a missing one fails the test with how to get it.

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::time::{Duration, Instant};

use common::kafka::{self, Tansu};
use common::{metric, Client, Event, HttpConn, TestServer};
use serde_json::{json, Value};

/// How long the first notification may take: the group join (about 3 s on tansu) and the
/// first fetch come first.
const FIRST_TIMEOUT: Duration = Duration::from_secs(30);

struct Setup {
    group: String,
    dlq: String,
}

fn setup(label: &str) -> Setup {
    Setup {
        group: kafka::unique_group(label),
        dlq: format!("dlq-{}", kafka::unique_group(label)),
    }
}

/// A node consuming `rules` from `broker` (from the beginning, so records produced before the
/// group has joined are read too), with the server API's key and `extra` settings.
fn start(broker: &Tansu, s: &Setup, rules: &Value, extra: &[(&str, &str)]) -> TestServer {
    kafka::create_topic(&broker.bootstrap(), &s.dlq, 1);
    // The DM topic must exist for /ready (the node's producer writes DMs there).
    kafka::create_topic(&broker.bootstrap(), "switchboard.direct-messages", 1);
    let bootstrap = broker.bootstrap();
    let rules = rules.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("SWITCHBOARD_KAFKA_BROKERS", &bootstrap),
        ("SWITCHBOARD_KAFKA_NOTIFICATIONS", &rules),
        ("SWITCHBOARD_KAFKA_GROUP_ID", &s.group),
        ("SWITCHBOARD_KAFKA_DEAD_LETTER_TOPIC", &s.dlq),
        ("SWITCHBOARD_KAFKA_FROM_BEGINNING", "true"),
        ("SWITCHBOARD_KAFKA_SESSION_TIMEOUT", "3s"),
    ];
    env.extend_from_slice(extra);
    let server = TestServer::start(&env);
    server.wait_ready();
    server
}

/// The next JSON frame within `timeout` (a notification may wait for the group join).
fn next(c: &mut Client, timeout: Duration) -> Value {
    match c.next_event(timeout) {
        Event::Json(v) => v,
        other => panic!("expected a frame within {timeout:?}, got {other:?}"),
    }
}

/// The next frame must be a notification; its `data`.
fn notification(c: &mut Client) -> Value {
    let v = next(c, FIRST_TIMEOUT);
    assert_eq!(v["type"], "notification", "{v}");
    common::assert_timestamp(&v);
    assert!(
        v["data"]["createdAt"]
            .as_str()
            .is_some_and(|s| common::parse_rfc3339_ms(s).is_some()),
        "{v}"
    );
    v["data"].clone()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

/// `(status, body)` of one REST request as `user` (auth mode none: `X-User-Id`).
fn rest(s: &TestServer, method: &str, path: &str, user: &str) -> (u16, Value) {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nX-User-Id: {user}\r\n");
    if method != "GET" {
        r.push_str("Content-Type: application/json\r\nContent-Length: 0\r\n");
    }
    r.push_str("\r\n");
    let mut c = HttpConn::open(s);
    c.send(r.as_bytes());
    let resp = c
        .response()
        .unwrap_or_else(|| panic!("no response to {method} {path}"));
    let v = serde_json::from_str(&resp.body)
        .unwrap_or_else(|_| panic!("not JSON ({}): {}", resp.status, resp.body));
    (resp.status, v)
}

fn listed(s: &TestServer, user: &str) -> Vec<Value> {
    let (st, v) = rest(s, "GET", "/api/v1/notifications?limit=100", user);
    assert_eq!(st, 200, "{v}");
    v["notifications"].as_array().unwrap().clone()
}

#[test]
fn user_notifications_from_a_pointer_and_from_the_key_with_their_data() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "jobs.posted", 1);
    kafka::create_topic(&b, "payments.received", 1);
    let s = setup("user");
    let rules = json!([
        {"topic": "jobs.posted", "user": "/client/id", "kind": "job.posted",
         "data": {"jobId": "/jobId", "title": "/title", "missing": "/nope"}},
        {"pattern": "payments.*", "user": "key"},
    ]);
    let server = start(&broker, &s, &rules, &[]);
    let mut bob = server.connect("/ws?user_id=bob");
    let mut bob2 = server.connect("/ws?user_id=bob");
    let mut eve = server.connect("/ws?user_id=eve");

    let (p, o) = kafka::produce(
        &b,
        "jobs.posted",
        Some("job-1"),
        r#"{"jobId":"j1","title":"Fix the roof","client":{"id":"bob"},"secret":"s"}"#,
        &[],
    );
    for c in [&mut bob, &mut bob2] {
        let d = notification(c);
        assert_eq!(
            keys(&d),
            ["createdAt", "data", "id", "kind", "notificationId", "read"],
            "{d}"
        );
        assert_eq!(d["id"], format!("jobs.posted/{p}/{o}"));
        assert_eq!(d["kind"], "job.posted");
        assert_eq!(d["data"], json!({"jobId": "j1", "title": "Fix the roof"}));
        assert_eq!(d["read"], false);
        assert!(d["notificationId"].as_u64().is_some(), "{d}");
    }
    let (p2, o2) = kafka::produce(
        &b,
        "payments.received",
        Some("bob"),
        r#"{"amount":12.5,"currency":"USD"}"#,
        &[],
    );
    let d = notification(&mut bob);
    assert_eq!(d["id"], format!("payments.received/{p2}/{o2}"));
    assert_eq!(
        d["kind"], "payments.received",
        "the topic is the default kind"
    );
    assert_eq!(
        d["data"],
        json!({"amount": 12.5, "currency": "USD"}),
        "no data = the whole value"
    );
    let second_id = d["notificationId"].as_u64().unwrap();
    assert_eq!(notification(&mut bob2)["id"], d["id"]);
    eve.expect_silence(300);

    // Stored: REST lists both (newest first), and the frame's notificationId marks it read.
    let list = listed(&server, "bob");
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["id"], second_id);
    assert_eq!(list[0]["kind"], "payments.received");
    assert_eq!(
        list[1]["data"],
        json!({"jobId": "j1", "title": "Fix the roof"})
    );
    let (st, v) = rest(
        &server,
        "PUT",
        &format!("/api/v1/notifications/{second_id}/read"),
        "bob",
    );
    assert_eq!(st, 200, "{v}");
    assert!(listed(&server, "eve").is_empty());
    let m = server.wait_metrics("two notifications", |t| {
        metric(t, "switchboard_kafka_notifications_total") == Some(2)
    });
    assert_eq!(
        metric(&m, "switchboard_kafka_records_consumed_total"),
        Some(2)
    );
    assert_eq!(metric(&m, "switchboard_kafka_dead_lettered_total"), Some(0));
}

#[test]
fn room_notifications_reach_the_subscribers_and_are_not_stored() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "users.joined", 1);
    let s = setup("room");
    let rules = json!([
        {"topic": "users.joined", "room": "/community", "kind": "user.joined",
         "data": ["/userId", "/profile/name"]},
    ]);
    let server = start(&broker, &s, &rules, &[]);
    let mut ann = server.connect("/ws?user_id=ann");
    let mut cid = server.connect("/ws?user_id=cid");
    let mut out = server.connect("/ws?user_id=out");
    ann.subscribe("c1");
    cid.subscribe("c1");
    out.subscribe("c2");
    let (p, o) = kafka::produce(
        &b,
        "users.joined",
        None,
        r#"{"userId":"dan","community":"c1","profile":{"name":"Dan","age":3}}"#,
        &[],
    );
    for c in [&mut ann, &mut cid] {
        let d = notification(c);
        assert_eq!(keys(&d), ["createdAt", "data", "id", "kind"], "{d}");
        assert_eq!(d["id"], format!("users.joined/{p}/{o}"));
        assert_eq!(d["kind"], "user.joined");
        assert_eq!(d["data"], json!({"userId": "dan", "name": "Dan"}));
    }
    out.expect_silence(300);
    assert!(
        listed(&server, "ann").is_empty(),
        "room notifications are not stored"
    );
}

/// Clustered: the node that consumes a record is not where its user or room is. Node A
/// consumes (Kafka and Redis), node B has Redis only: bob's devices on both nodes get the
/// user notification, the room's subscriber on B the room one, each once and the same frame
/// as on A.
#[test]
fn notifications_reach_users_and_rooms_on_other_nodes() {
    use common::redis::RedisServer;
    let redis = RedisServer::start();
    let url = redis.url();
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "jobs.posted", 1);
    kafka::create_topic(&b, "users.joined", 1);
    let s = setup("cluster");
    let rules = json!([
        {"topic": "jobs.posted", "user": "/client/id", "kind": "job.posted",
         "data": {"jobId": "/jobId"}},
        {"topic": "users.joined", "room": "/community", "kind": "user.joined"},
    ]);
    let a = start(&broker, &s, &rules, &[("SWITCHBOARD_REDIS_URL", &url)]);
    let other = TestServer::start(&[("SWITCHBOARD_REDIS_URL", &url)]);
    other.wait_ready();
    let mut bob_a = a.connect("/ws?user_id=bob");
    let mut bob_b = other.connect("/ws?user_id=bob");
    let mut ann_b = other.connect("/ws?user_id=ann");
    let mut ann_a = a.connect("/ws?user_id=ann");
    ann_b.subscribe("c1");
    ann_a.subscribe("c1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{user:bob}") != 2 || redis.numsub("sb:{room:c1}") != 2 {
        assert!(Instant::now() < deadline, "the nodes never held bob and c1");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (p, o) = kafka::produce(
        &b,
        "jobs.posted",
        None,
        r#"{"jobId":"j9","client":{"id":"bob"}}"#,
        &[],
    );
    let here = notification(&mut bob_a);
    assert_eq!(here["id"], format!("jobs.posted/{p}/{o}"));
    assert_eq!(here["data"], json!({"jobId": "j9"}));
    assert_eq!(
        notification(&mut bob_b),
        here,
        "the same notification on node B"
    );
    let (p, o) = kafka::produce(
        &b,
        "users.joined",
        None,
        r#"{"userId":"dan","community":"c1"}"#,
        &[],
    );
    let here = notification(&mut ann_a);
    assert_eq!(here["id"], format!("users.joined/{p}/{o}"));
    assert_eq!(
        notification(&mut ann_b),
        here,
        "the same notification on node B"
    );
    for c in [&mut bob_a, &mut bob_b, &mut ann_a, &mut ann_b] {
        c.expect_silence(300);
    }
}

#[test]
fn unmappable_records_go_to_the_dead_letter_topic_with_the_reason_and_the_partition_goes_on() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "contracts.signed", 1);
    let s = setup("dlq");
    let rules = json!([{"topic": "contracts.signed", "user": "/userId"}]);
    let server = start(&broker, &s, &rules, &[]);
    let mut bob = server.connect("/ws?user_id=bob");
    let bad = [
        ("not json", "value is not JSON: "),
        (r#"["a"]"#, "value is not a JSON object"),
        (r#"{"contractId":"c1"}"#, "no target: /userId is missing"),
        (r#"{"userId":""}"#, "bad target: empty"),
    ];
    let mut at = Vec::new();
    for (v, _) in bad {
        at.push(kafka::produce(
            &b,
            "contracts.signed",
            Some("k"),
            v,
            &[("trace", "t1")],
        ));
    }
    let good = kafka::produce(
        &b,
        "contracts.signed",
        None,
        r#"{"userId":"bob","contractId":"c2"}"#,
        &[],
    );
    // The good record after the bad ones is delivered: they did not stall the partition.
    let d = notification(&mut bob);
    assert_eq!(d["id"], format!("contracts.signed/{}/{}", good.0, good.1));
    assert_eq!(d["data"], json!({"userId": "bob", "contractId": "c2"}));

    let dl = kafka::read_all(&b, &s.dlq, bad.len(), kafka::READ_TIMEOUT);
    assert_eq!(dl.len(), bad.len(), "{dl:?}");
    for ((r, (value, reason)), (p, o)) in dl.iter().zip(bad).zip(at) {
        assert_eq!(r.value_str(), value, "the value is copied");
        assert_eq!(r.key_str(), "k", "the key is copied");
        assert_eq!(
            r.header("trace"),
            Some("t1"),
            "the record's headers are kept"
        );
        let got = r.header("dlq-reason").expect("dlq-reason header");
        assert!(
            got.starts_with(reason),
            "reason {got:?}, expected {reason:?}"
        );
        assert_eq!(r.header("dlq-topic"), Some("contracts.signed"));
        assert_eq!(r.header("dlq-partition"), Some(p.to_string().as_str()));
        assert_eq!(r.header("dlq-offset"), Some(o.to_string().as_str()));
    }
    server.wait_metrics("dead-lettered records", |t| {
        metric(t, "switchboard_kafka_dead_lettered_total") == Some(bad.len() as u64)
            && metric(t, "switchboard_kafka_notifications_total") == Some(1)
    });
}

/// `/metrics` once `pred` holds (panics with the last text after `timeout`).
fn wait_metrics(
    s: &TestServer,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, text) = s.http_get("/metrics");
        assert_eq!(status, 200, "/metrics status");
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what} within {timeout:?}; last:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lag line of one partition, if `/metrics` has it.
fn lag(text: &str, topic: &str, partition: i32) -> Option<i64> {
    let prefix =
        format!("switchboard_kafka_consumer_lag{{topic=\"{topic}\",partition=\"{partition}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn consumer_lag_is_reported_per_partition() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "jobs.updated", 2);
    let s = setup("lag");
    let rules = json!([{"topic": "jobs.updated", "user": "/clientId"}]);
    // Records on both partitions (keys spread over them).
    let mut per_partition = [0usize; 2];
    let mut k = 0;
    while per_partition.contains(&0) {
        let (p, _) = kafka::produce(
            &b,
            "jobs.updated",
            Some(&format!("job-{k}")),
            r#"{"clientId":"bob"}"#,
            &[],
        );
        per_partition[p as usize] += 1;
        k += 1;
        assert!(k < 200, "200 keys all landed on one partition");
    }
    let server = start(&broker, &s, &rules, &[]);
    // Consumed, stored, committed: both partitions report, and lag drops to zero.
    let m = wait_metrics(
        &server,
        "lag of both partitions at zero",
        FIRST_TIMEOUT,
        |t| lag(t, "jobs.updated", 0) == Some(0) && lag(t, "jobs.updated", 1) == Some(0),
    );
    assert!(
        m.contains("# TYPE switchboard_kafka_consumer_lag gauge"),
        "{m}"
    );
    assert_eq!(
        metric(&m, "switchboard_kafka_notifications_total"),
        Some(k as u64)
    );
}

#[test]
fn a_consumer_killed_before_or_after_its_commit_never_shows_a_notification_twice() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "certificates.issued", 1);
    let s = setup("restart");
    let db = common::pg::database("kafka_notify_restart");
    let rules = json!([{"topic": "certificates.issued", "user": "/userId", "data": ["/n"]}]);
    // Round 0 commits every minute (so never before its kill), round 1 every 100 ms.
    let extras = [
        [
            ("SWITCHBOARD_DATABASE_URL", db.as_str()),
            ("SWITCHBOARD_KAFKA_COMMIT_INTERVAL", "60s"),
        ],
        [
            ("SWITCHBOARD_DATABASE_URL", db.as_str()),
            ("SWITCHBOARD_KAFKA_COMMIT_INTERVAL", "100ms"),
        ],
    ];
    let produce = |n: usize| {
        kafka::produce(
            &b,
            "certificates.issued",
            None,
            &format!(r#"{{"userId":"bob","n":{n}}}"#),
            &[],
        );
    };
    let mut seen: Vec<Value> = Vec::new();
    let mut n = 0;
    // Round 0: killed right after the records were shown, before any commit. Round 1: killed
    // once everything is committed.
    for (round, extra) in extras.iter().enumerate() {
        let server = start(&broker, &s, &rules, extra);
        let mut bob = server.connect("/ws?user_id=bob");
        for _ in 0..5 {
            produce(n);
            n += 1;
        }
        for _ in 0..5 {
            let d = notification(&mut bob);
            seen.push(d["data"]["n"].clone());
        }
        if round == 1 {
            let deadline = Instant::now() + FIRST_TIMEOUT;
            while kafka::committed(&b, &s.group, "certificates.issued", 1) != vec![Some(n as i64)] {
                assert!(Instant::now() < deadline, "offsets never committed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        drop(bob);
        drop(server); // SIGKILL
        let committed = kafka::committed(&b, &s.group, "certificates.issued", 1)[0].unwrap_or(0);
        // The next node reads from the committed offset: what was shown after it comes again
        // and must be recognised as a duplicate.
        let replayed = n as i64 - committed;
        if round == 0 {
            assert_eq!(replayed, 5, "round 0 must die before its commit");
        }
        let server = start(&broker, &s, &rules, extra);
        let mut bob = server.connect("/ws?user_id=bob");
        let m = wait_metrics(
            &server,
            "the replayed records handled",
            FIRST_TIMEOUT,
            // Counted as read, then as handled (shown or recognised): wait for the second.
            |t| {
                let handled = metric(t, "switchboard_kafka_notification_duplicates_total")
                    .unwrap_or(0)
                    + metric(t, "switchboard_kafka_notifications_total").unwrap_or(0);
                handled == replayed as u64
            },
        );
        assert_eq!(
            metric(&m, "switchboard_kafka_records_consumed_total"),
            Some(replayed as u64)
        );
        assert_eq!(
            metric(&m, "switchboard_kafka_notification_duplicates_total"),
            Some(replayed as u64),
            "round {round}: committed {committed} of {n}"
        );
        assert_eq!(metric(&m, "switchboard_kafka_notifications_total"), Some(0));
        bob.expect_silence(300);
        // And it goes on with the next record.
        produce(n);
        n += 1;
        seen.push(notification(&mut bob)["data"]["n"].clone());
        eprintln!(
            "round {round}: committed {committed} of {}, replayed {replayed} as duplicates",
            n - 1
        );
        let list = listed(&server, "bob");
        let mut ns: Vec<u64> = list
            .iter()
            .map(|x| x["data"]["n"].as_u64().unwrap())
            .collect();
        ns.sort_unstable();
        assert_eq!(
            ns,
            (0..n as u64).collect::<Vec<_>>(),
            "REST lists each once"
        );
        drop(server);
    }
    let expected: Vec<Value> = (0..n).map(|i| json!(i)).collect();
    assert_eq!(seen, expected, "each notification shown once, in order");
}

#[test]
fn a_store_that_is_down_holds_its_records_and_their_offsets_but_not_other_partitions() {
    let broker = Tansu::start();
    let b = broker.bootstrap();
    kafka::create_topic(&b, "courses.completed", 1);
    kafka::create_topic(&b, "users.joined", 1);
    let s = setup("store-down");
    // Its own cluster: this test stops it.
    let pg = common::pg::PgCluster::start(common::pg::ClusterOptions { fsync: false });
    let db = pg.database("kafka_notify_store_down");
    let rules = json!([
        {"topic": "courses.completed", "user": "/userId", "data": ["/n"]},
        {"topic": "users.joined", "room": "/community", "data": ["/userId"]},
    ]);
    let extra = [
        ("SWITCHBOARD_DATABASE_URL", db.as_str()),
        ("SWITCHBOARD_KAFKA_COMMIT_INTERVAL", "100ms"),
    ];
    let server = start(&broker, &s, &rules, &extra);
    let mut bob = server.connect("/ws?user_id=bob");
    let mut ann = server.connect("/ws?user_id=ann");
    ann.subscribe("c1");
    let course = |n: u32| {
        kafka::produce(
            &b,
            "courses.completed",
            None,
            &format!(r#"{{"userId":"bob","n":{n}}}"#),
            &[],
        )
    };
    course(0);
    assert_eq!(notification(&mut bob)["data"], json!({"n": 0}));
    let committed = || kafka::committed(&b, &s.group, "courses.completed", 1);
    let deadline = Instant::now() + FIRST_TIMEOUT;
    while committed() != vec![Some(1)] {
        assert!(
            Instant::now() < deadline,
            "offset 1 never committed: {:?}",
            committed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    pg.stop_immediate();
    course(1);
    // Another partition is not held up by the store: a room notification goes out meanwhile.
    kafka::produce(
        &b,
        "users.joined",
        None,
        r#"{"userId":"dan","community":"c1"}"#,
        &[],
    );
    assert_eq!(notification(&mut ann)["data"], json!({"userId": "dan"}));
    wait_metrics(&server, "both records consumed", FIRST_TIMEOUT, |t| {
        metric(t, "switchboard_kafka_records_consumed_total") == Some(3)
    });
    bob.expect_silence(1500);
    assert_eq!(
        committed(),
        vec![Some(1)],
        "the record the store did not take is not committed"
    );

    pg.restart();
    // Retried, never skipped: it arrives once the store is back, then its offset is committed.
    assert_eq!(notification(&mut bob)["data"], json!({"n": 1}));
    let deadline = Instant::now() + FIRST_TIMEOUT;
    while committed() != vec![Some(2)] {
        assert!(
            Instant::now() < deadline,
            "offset 2 never committed: {:?}",
            committed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bob.expect_silence(300);
    let mut ns: Vec<u64> = listed(&server, "bob")
        .iter()
        .map(|x| x["data"]["n"].as_u64().unwrap())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, [0, 1]);
}

/// A burst far over a partition's queue (`PARTITION_QUEUE_MAX`) and librdkafka's prefetch:
/// every record reaches its user exactly once and in order (a consumer that paused partitions
/// was measured to skip records under such a burst).
#[test]
fn a_burst_bigger_than_every_queue_reaches_every_user_once_in_order() {
    const USERS: usize = 4;
    const PER_USER: usize = 5_000;
    let broker = Tansu::start();
    let topic = "burst.events";
    kafka::create_topic(&broker.bootstrap(), topic, 2);
    let s = setup("burst");
    let rules = json!([{"topic": topic, "user": "/userId", "kind": "burst", "data": {"n": "/n"}}]);
    let server = start(&broker, &s, &rules, &[]);
    let mut clients: Vec<Client> = (0..USERS)
        .map(|u| server.connect(&format!("/ws?user_id=burst{u}")))
        .collect();
    // Produced before the group has joined and as fast as the producer goes: the consumer
    // meets a backlog of 20,000 records at once.
    {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let p: ThreadedProducer<DefaultProducerContext> = kafka::base_config(&broker.bootstrap())
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "100000")
            .create()
            .expect("producer");
        for n in 0..PER_USER {
            for u in 0..USERS {
                let key = format!("burst{u}");
                let value = json!({"userId": key, "n": n}).to_string();
                let mut rec = BaseRecord::<str, str>::to(topic).key(&key).payload(&value);
                loop {
                    match p.send(rec) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            rec = r;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
        }
        p.flush(Duration::from_secs(60)).expect("flush");
    }
    for (u, c) in clients.iter_mut().enumerate() {
        for n in 0..PER_USER {
            let d = notification(c);
            assert_eq!(d["data"]["n"], n, "user burst{u}: {d}");
        }
        c.expect_silence(200);
    }
    let m = server.http_get("/metrics").1;
    assert_eq!(
        metric(&m, "switchboard_kafka_notifications_total"),
        Some((USERS * PER_USER) as u64)
    );
}
