//! Durable direct messages over a real Kafka-protocol broker (issue 12): `message.ack` only
//! after the record is in the topic (read back), the record's key, value and headers, the
//! error path with no ack (broker down, produce errors), readiness, deduplication of retries,
//! and the loss test: 10,000 DMs from many connections while the broker is stopped and started,
//! then the topic read back.
//!
//! tansu (`common::kafka::Tansu`) is the real broker; librdkafka's mock cluster
//! (`common::kafka::Mock`) injects what tansu cannot (produce errors, a broker taken down).

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::kafka::{self, Mock, Tansu};
use common::{Client, Event, TestServer};
use serde_json::{json, Value};

const TOPIC: &str = "dm-test";

fn server_env(bootstrap: &str, extra: &[(&'static str, &'static str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("SWITCHBOARD_KAFKA_BROKERS".into(), bootstrap.into()),
        ("SWITCHBOARD_KAFKA_DM_TOPIC".into(), TOPIC.into()),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC".into(), "100000".into()),
        ("SWITCHBOARD_RATE_LIMIT_BURST".into(), "100000".into()),
    ];
    for (k, v) in extra {
        env.push(((*k).into(), (*v).into()));
    }
    env
}

fn start(bootstrap: &str, extra: &[(&'static str, &'static str)]) -> TestServer {
    let env = server_env(bootstrap, extra);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let s = TestServer::start(&refs);
    s.wait_ready();
    s
}

fn dm(cmid: &str, to: &str, content: &str) -> Value {
    json!({"type":"message.send","clientMsgId":cmid,"to":to,"content":content})
}

/// The next frame of `c` that is an ack or an error for `cmid` (others are skipped).
fn answer_for(c: &mut Client, cmid: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left) {
            Event::Json(v) => {
                let t = v["type"].as_str().unwrap_or("");
                if (t == "message.ack" || t == "error") && v["data"]["clientMsgId"] == cmid {
                    return v;
                }
            }
            other => panic!("waiting for the answer to {cmid}: {other:?}"),
        }
    }
}

/// Send `cmid` until it is acked (the first produce also sets the producer up: its id from
/// the broker, the topic's metadata, which on a loaded machine can outlast a short ack wait).
/// Retries are harmless: the same clientMsgId is one message.
fn send_until_acked(c: &mut Client, cmid: &str, to: &str) -> Value {
    for _ in 0..20 {
        c.send_json(dm(cmid, to, "warm up"));
        let v = answer_for(c, cmid, Duration::from_secs(30));
        if v["type"] == "message.ack" {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{cmid} never acked");
}

fn ready_reason(s: &TestServer) -> (u16, String) {
    s.http_get("/ready")
}

fn wait_ready_is(s: &TestServer, ok: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = ready_reason(s);
        if (code == 200) == ok {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed {code} {body}; log:\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ack_comes_after_the_record_is_in_the_topic() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 3);
    let s = start(
        &broker.bootstrap(),
        &[("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "20s")],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let mut alice2 = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    alice.send_json(dm("c-1", "bob", "hello"));
    let ack = alice.expect_type("message.ack");
    let create = bob.expect_type("message.create");
    assert_eq!(alice2.expect_type("message.create")["data"], create["data"]);
    assert_eq!(ack["data"]["serverMsgId"], create["data"]["serverMsgId"]);

    let recs = kafka::read_all(&broker.bootstrap(), TOPIC, 1, kafka::READ_TIMEOUT);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    let conv = create["data"]["conversationId"].as_str().unwrap();
    assert_eq!(r.key_str(), conv, "keyed by conversationId");
    let v = r.value_json();
    assert_eq!(v["type"], "message.create");
    assert_eq!(
        v["data"], create["data"],
        "the record is the message.create event"
    );
    assert_eq!(
        v["data"]["conversationNumericId"], ack["data"]["conversationNumericId"],
        "the record carries the conversation's numeric id: {v}"
    );
    assert!(v["data"]["conversationNumericId"].is_u64(), "{v}");
    assert_eq!(r.header("sender"), Some("alice"));
    assert_eq!(r.header("clientMsgId"), Some("c-1"));
    assert_eq!(
        r.header("eventId"),
        create["data"]["eventId"].as_str(),
        "{r:?}"
    );
    assert_eq!(
        r.header("serverMsgId"),
        create["data"]["serverMsgId"].as_str()
    );

    // A broker that does not answer holds the ack back: no ack, no live delivery, until it
    // answers again; then both come, and the record is there.
    broker.freeze();
    alice.send_json(dm("c-2", "bob", "while frozen"));
    alice.expect_silence(1500);
    bob.expect_silence(200);
    broker.thaw();
    let ack2 = answer_for(&mut alice, "c-2", Duration::from_secs(20));
    assert_eq!(ack2["type"], "message.ack", "{ack2}");
    let create2 = bob.expect_type("message.create");
    assert_eq!(create2["data"]["clientMsgId"], "c-2");
    let recs = kafka::read_all(&broker.bootstrap(), TOPIC, 2, kafka::READ_TIMEOUT);
    let c2: Vec<_> = recs
        .iter()
        .filter(|r| r.header("clientMsgId") == Some("c-2"))
        .collect();
    assert_eq!(c2.len(), 1, "{recs:?}");

    // A retry of an acked message: the same ack again, nothing produced twice.
    alice.send_json(dm("c-1", "bob", "hello"));
    let again = answer_for(&mut alice, "c-1", Duration::from_secs(10));
    assert_eq!(again["type"], "message.ack");
    assert_eq!(again["data"]["serverMsgId"], ack["data"]["serverMsgId"]);
    bob.expect_silence(300);
    let m = s.wait_metrics("kafka produced 2", |m| {
        common::metric(m, "switchboard_kafka_dm_produced_total") == Some(2)
    });
    assert_eq!(common::metric(&m, "switchboard_kafka_up"), Some(1));
    let recs = kafka::read_all(&broker.bootstrap(), TOPIC, 2, kafka::READ_TIMEOUT);
    assert_eq!(recs.len(), 2, "{recs:?}");
}

#[test]
fn a_broker_that_is_down_gets_errors_never_acks_and_ready_says_so() {
    let mock = Mock::start(1);
    mock.create_topic(TOPIC, 2);
    let s = start(
        &mock.bootstrap(),
        &[
            ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "1s"),
            ("SWITCHBOARD_KAFKA_MESSAGE_TIMEOUT", "3s"),
        ],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    send_until_acked(&mut alice, "d-1", "bob");
    bob.expect_type("message.create");

    mock.broker_down(1);
    let body = wait_ready_is(&s, false);
    assert!(body.contains("kafka unavailable"), "{body}");
    // Rooms keep working on this node.
    let mut r1 = s.connect("/ws?user_id=r1");
    let mut r2 = s.connect("/ws?user_id=r2");
    r1.subscribe("lobby");
    r2.subscribe("lobby");
    r1.send_json(json!({"type":"publish","room":"lobby","data":{"x":1}}));
    assert_eq!(r2.expect_type("message")["data"]["x"], 1);

    alice.send_json(dm("d-2", "bob", "two"));
    let e = answer_for(&mut alice, "d-2", Duration::from_secs(10));
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"], "kafka unavailable, retry later");
    assert_eq!(e["data"], json!({"clientMsgId":"d-2"}));
    bob.expect_silence(300);

    mock.broker_up(1);
    wait_ready_is(&s, true);
    alice.send_json(dm("d-2", "bob", "two"));
    let ack = answer_for(&mut alice, "d-2", Duration::from_secs(10));
    assert_eq!(ack["type"], "message.ack", "{ack}");
    assert_eq!(bob.expect_type("message.create")["data"]["content"], "two");
    let recs = kafka::read_all(&mock.bootstrap(), TOPIC, 2, kafka::READ_TIMEOUT);
    let ids: Vec<_> = recs
        .iter()
        .filter_map(|r| r.header("clientMsgId"))
        .collect();
    assert_eq!(ids.len(), 2, "{recs:?}");
    assert!(ids.contains(&"d-1") && ids.contains(&"d-2"), "{ids:?}");
}

#[test]
fn produce_errors_answer_the_sender_and_a_retry_is_written_once() {
    let mock = Mock::start(1);
    mock.create_topic(TOPIC, 1);
    let s = start(
        &mock.bootstrap(),
        &[("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "2s")],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    send_until_acked(&mut alice, "e-0", "bob");
    bob.expect_type("message.create");
    // A permanent error: the record is refused, the sender is told, nothing is acked.
    mock.fail_produce(&[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    alice.send_json(dm("e-1", "bob", "refused"));
    let e = answer_for(&mut alice, "e-1", Duration::from_secs(10));
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"], "kafka rejected the message");
    bob.expect_silence(300);
    // Retriable errors are retried by the producer itself: one record, one ack.
    mock.fail_produce(&[
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
    ]);
    alice.send_json(dm("e-2", "bob", "retried inside"));
    assert_eq!(
        answer_for(&mut alice, "e-2", Duration::from_secs(10))["type"],
        "message.ack"
    );
    // The refused one, sent again: produced now, once.
    alice.send_json(dm("e-1", "bob", "refused"));
    let ack = answer_for(&mut alice, "e-1", Duration::from_secs(10));
    assert_eq!(ack["type"], "message.ack", "{ack}");
    // Several retries of one message in flight at once: one record, the same ack to each.
    for _ in 0..3 {
        alice.send_json(dm("e-3", "bob", "thrice"));
    }
    let acks: Vec<Value> = (0..3)
        .map(|_| answer_for(&mut alice, "e-3", Duration::from_secs(10)))
        .collect();
    for a in &acks {
        assert_eq!(a["type"], "message.ack", "{a}");
        assert_eq!(a["data"]["serverMsgId"], acks[0]["data"]["serverMsgId"]);
    }
    let recs = kafka::read_all(&mock.bootstrap(), TOPIC, 4, kafka::READ_TIMEOUT);
    let mut ids: Vec<_> = recs
        .iter()
        .filter_map(|r| r.header("clientMsgId"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["e-0", "e-1", "e-2", "e-3"], "{recs:?}");
}

/// One sender's view of the loss test.
#[derive(Default)]
struct Outcome {
    acked: HashMap<String, String>,
    errored: HashSet<String>,
    sent: usize,
}

/// Sends `n` DMs with a window of unanswered ones; an errored one is retried (same
/// clientMsgId) up to `retries` times, each after a growing pause (as a client backs off).
fn sender(mut c: Client, user: String, n: usize, retries: usize) -> Outcome {
    const WINDOW: usize = 32;
    const RETRY_PAUSE: Duration = Duration::from_millis(400);
    // About 60 new DMs a second per sender: 10,000 take ~8 s, long enough to span the faults.
    const PACE: Duration = Duration::from_millis(16);
    let started = Instant::now();
    let mut fresh_sent = 0u32;
    let mut out = Outcome::default();
    let mut queue: std::collections::VecDeque<(String, usize)> =
        (0..n).map(|i| (format!("{user}-{i}"), 0)).collect();
    let mut later: Vec<(Instant, String, usize)> = Vec::new();
    let mut in_flight: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !queue.is_empty() || !in_flight.is_empty() || !later.is_empty() {
        let now = Instant::now();
        later.retain(|(at, cmid, tries)| {
            if *at <= now {
                queue.push_front((cmid.clone(), *tries));
                false
            } else {
                true
            }
        });
        while in_flight.len() < WINDOW {
            let Some((cmid, tries)) = queue.pop_front() else {
                break;
            };
            if tries == 0 {
                if Instant::now() < started + PACE * fresh_sent {
                    queue.push_front((cmid, tries));
                    break;
                }
                fresh_sent += 1;
            }
            c.send_json(dm(&cmid, "sink", &format!("m {cmid}")));
            out.sent += 1;
            in_flight.insert(cmid, tries);
        }
        assert!(Instant::now() < deadline, "{user}: loss test sender stuck");
        let wait = if queue.is_empty() && later.is_empty() {
            Duration::from_secs(30)
        } else {
            PACE
        };
        match c.next_event(wait) {
            Event::Json(v) => {
                let Some(cmid) = v["data"]["clientMsgId"].as_str() else {
                    continue;
                };
                let Some(tries) = in_flight.remove(cmid) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("message.ack") => {
                        out.errored.remove(cmid);
                        let sid = v["data"]["serverMsgId"].as_str().unwrap().to_owned();
                        out.acked.insert(cmid.to_owned(), sid);
                    }
                    Some("error") => {
                        out.errored.insert(cmid.to_owned());
                        if tries < retries {
                            let at = Instant::now() + RETRY_PAUSE * (tries as u32 + 1);
                            later.push((at, cmid.to_owned(), tries + 1));
                        }
                    }
                    _ => panic!("unexpected answer {v}"),
                }
            }
            Event::Timeout if !(queue.is_empty() && later.is_empty()) => {}
            other => panic!("{user}: {other:?} with {} in flight", in_flight.len()),
        }
    }
    out
}

#[test]
fn loss_test_ten_thousand_dms_through_broker_stops_and_starts() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 4);
    let bootstrap = broker.bootstrap();
    // The broker stops answering (SIGSTOP) three times, each longer than the ack wait.
    loss_test("tansu SIGSTOP/SIGCONT", &bootstrap, || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            broker.freeze();
            std::thread::sleep(Duration::from_millis(2500));
            broker.thaw();
        }
    });
}

#[test]
fn loss_test_ten_thousand_dms_through_mock_broker_outages_and_produce_errors() {
    let mock = Mock::start(1);
    mock.create_topic(TOPIC, 4);
    let bootstrap = mock.bootstrap();
    // The broker goes down (connections refused) twice, and produce requests fail.
    loss_test("mock broker down/up and produce errors", &bootstrap, || {
        use rdkafka::types::RDKafkaRespErr::*;
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(500));
            mock.broker_down(1);
            std::thread::sleep(Duration::from_millis(2000));
            mock.broker_up(1);
        }
        std::thread::sleep(Duration::from_millis(300));
        mock.fail_produce(&[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ]);
    });
}

/// 10,000 DMs from 20 connections over ~8 s (a window of 32 unanswered each; an errored one
/// retried up to 6 times with the same clientMsgId, backing off) while `faults` runs; then the topic is read back.
fn loss_test(label: &str, bootstrap: &str, faults: impl FnOnce()) {
    const SENDERS: usize = 20;
    const PER_SENDER: usize = 500;
    const RETRIES: usize = 6;
    let s = start(
        bootstrap,
        &[
            ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "1s"),
            ("SWITCHBOARD_KAFKA_MESSAGE_TIMEOUT", "60s"),
        ],
    );
    let mut sink = s.connect("/ws?user_id=sink");
    // Read live deliveries as they come (10,000 would overflow its send queue otherwise).
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<usize>();
    let sink_reader = std::thread::spawn(move || {
        let mut live: HashSet<String> = HashSet::new();
        let mut want = usize::MAX;
        let mut give_up: Option<Instant> = None;
        loop {
            if let Ok(n) = stop_rx.try_recv() {
                want = n;
                give_up = Some(Instant::now() + Duration::from_secs(30));
            }
            if live.len() >= want || give_up.is_some_and(|t| Instant::now() > t) {
                return live;
            }
            if let Event::Json(v) = sink.next_event(Duration::from_millis(200)) {
                if v["type"] == "message.create" {
                    let k = format!(
                        "{}/{}",
                        v["data"]["from"].as_str().unwrap(),
                        v["data"]["clientMsgId"].as_str().unwrap()
                    );
                    assert!(live.insert(k.clone()), "{k} delivered live twice");
                }
            }
        }
    });
    let clients: Vec<(Client, String)> = (0..SENDERS)
        .map(|i| {
            let u = format!("u{i}");
            (s.connect(&format!("/ws?user_id={u}")), u)
        })
        .collect();
    let handles: Vec<_> = clients
        .into_iter()
        .map(|(c, u)| std::thread::spawn(move || sender(c, u, PER_SENDER, RETRIES)))
        .collect();
    faults();
    let outcomes: Vec<Outcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let acked: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    let errored_final: usize = outcomes.iter().map(|o| o.errored.len()).sum();
    let sends: usize = outcomes.iter().map(|o| o.sent).sum();
    // Every DM got an answer: an ack, or (finally) an error.
    assert_eq!(acked + errored_final, SENDERS * PER_SENDER);
    // Late records land within kafka_message_timeout; wait until the node has none pending.
    s.wait_metrics("no kafka record pending", |m| {
        common::metric(m, "switchboard_kafka_dm_pending") == Some(0)
    });
    let recs = kafka::read_all(bootstrap, TOPIC, acked, Duration::from_secs(60));
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for r in &recs {
        let key = (
            r.header("sender").unwrap_or("").to_owned(),
            r.header("clientMsgId").unwrap_or("").to_owned(),
        );
        *seen.entry(key).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        dups.is_empty(),
        "records sharing (sender, clientMsgId): {dups:?}"
    );
    for (o, i) in outcomes.iter().zip(0..) {
        let user = format!("u{i}");
        for (cmid, sid) in &o.acked {
            let n = seen
                .get(&(user.clone(), cmid.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(n, 1, "acked {cmid} ({sid}) is in the topic {n} times");
        }
    }
    let m = s.http_get("/metrics").1;
    eprintln!(
        "loss test ({label}): {} DMs, {sends} sends (retries included), {acked} acked, {errored_final} \
         errored after {RETRIES} retries, {} records in the topic; ack timeouts {:?}, written late {:?}, \
         joined {:?}, failed {:?}",
        SENDERS * PER_SENDER,
        recs.len(),
        common::metric(&m, "switchboard_kafka_dm_ack_timeouts_total"),
        common::metric(&m, "switchboard_kafka_dm_written_late_total"),
        common::metric(&m, "switchboard_kafka_dm_joined_total"),
        common::metric(&m, "switchboard_kafka_dm_failed_total"),
    );
    // The sink saw each acked message live, and none twice.
    stop_tx.send(acked).unwrap();
    let live = sink_reader.join().unwrap();
    for (o, i) in outcomes.iter().zip(0..) {
        for cmid in o.acked.keys() {
            assert!(
                live.contains(&format!("u{i}/{cmid}")),
                "acked {cmid} never delivered live"
            );
        }
    }
}

#[test]
fn a_record_written_after_its_ack_wait_is_delivered_then_and_a_retry_acked() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 1);
    let s = start(
        &broker.bootstrap(),
        &[
            // Short, so the retry below comes long before the health check (2 s) could
            // find the frozen broker down and refuse it unstored.
            ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "300ms"),
            ("SWITCHBOARD_KAFKA_MESSAGE_TIMEOUT", "60s"),
        ],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    send_until_acked(&mut alice, "l-0", "bob");
    bob.expect_type("message.create");

    // Counters from here on (the warm-up may have timed out and been written late itself).
    let base = s.wait_metrics("warm-up settled", |m| {
        common::metric(m, "switchboard_kafka_dm_pending") == Some(0)
    });
    let count = |m: &str, name: &str| common::metric(m, name).unwrap_or(0);
    broker.freeze();
    alice.send_json(dm("l-1", "bob", "late"));
    let e = answer_for(&mut alice, "l-1", Duration::from_secs(10));
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"], "kafka did not confirm in time, retry later");
    assert_eq!(e["data"], json!({"clientMsgId":"l-1"}));
    // A retry while that record is still being retried by the producer: told at once to retry
    // later (never held past one ack wait), and not produced a second time.
    alice.send_json(dm("l-1", "bob", "late"));
    let e2 = answer_for(&mut alice, "l-1", Duration::from_secs(10));
    assert_eq!(
        e2["error"], "kafka did not confirm in time, retry later",
        "{e2}"
    );
    bob.expect_silence(200);
    broker.thaw();
    // Written after all: delivered live then.
    let create = bob.expect_type("message.create");
    assert_eq!(create["data"]["clientMsgId"], "l-1");
    let late = "switchboard_kafka_dm_written_late_total";
    let m = s.wait_metrics("written late", |m| count(m, late) == count(&base, late) + 1);
    let t = "switchboard_kafka_dm_ack_timeouts_total";
    assert_eq!(count(&m, t), count(&base, t) + 1, "{t}");
    // The next retry gets the ack of the record that was written.
    let ack = send_until_acked(&mut alice, "l-1", "bob");
    assert_eq!(create["data"]["serverMsgId"], ack["data"]["serverMsgId"]);
    bob.expect_silence(300);
    let recs = kafka::read_all(&broker.bootstrap(), TOPIC, 2, kafka::READ_TIMEOUT);
    assert_eq!(recs.len(), 2, "{recs:?}");
}

#[test]
fn a_sender_that_disconnects_while_pending_loses_nothing() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 1);
    let s = start(
        &broker.bootstrap(),
        &[("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "20s")],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    send_until_acked(&mut alice, "g-0", "bob");
    bob.expect_type("message.create");
    broker.freeze();
    for i in 1..=5 {
        alice.send_json(dm(&format!("g-{i}"), "bob", "pending"));
    }
    alice.expect_silence(500);
    alice.close_and_wait();
    broker.thaw();
    // Written after all: delivered to bob, in order, and in the topic once each.
    for i in 1..=5 {
        let c = bob.expect_type("message.create");
        assert_eq!(c["data"]["clientMsgId"], format!("g-{i}"));
    }
    let recs = kafka::read_all(&broker.bootstrap(), TOPIC, 6, kafka::READ_TIMEOUT);
    assert_eq!(recs.len(), 6, "{recs:?}");
    // A retry from a new connection gets the ack of the record that was written.
    let mut again = s.connect("/ws?user_id=alice");
    again.send_json(dm("g-3", "bob", "pending"));
    let ack = answer_for(&mut again, "g-3", Duration::from_secs(10));
    assert_eq!(ack["type"], "message.ack", "{ack}");
    let m = s.wait_metrics("pending drained", |m| {
        common::metric(m, "switchboard_kafka_dm_pending") == Some(0)
    });
    assert_eq!(
        common::metric(&m, "switchboard_kafka_dm_produced_total"),
        Some(6)
    );
}

#[test]
fn the_pending_table_is_bounded_and_says_kafka_busy() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 1);
    let s = start(
        &broker.bootstrap(),
        &[
            ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "20s"),
            ("SWITCHBOARD_KAFKA_PENDING_MAX", "16"),
        ],
    );
    let mut alice = s.connect("/ws?user_id=alice");
    let _bob = s.connect("/ws?user_id=bob");
    send_until_acked(&mut alice, "p-0", "bob");
    broker.freeze();
    for i in 1..=16 {
        alice.send_json(dm(&format!("p-{i}"), "bob", "fills the table"));
    }
    // Let the 16 be stored and produced (pending) before the 17th comes.
    s.wait_metrics("16 pending", |m| {
        common::metric(m, "switchboard_kafka_dm_pending") == Some(16)
    });
    alice.send_json(dm("p-17", "bob", "one too many"));
    let e = answer_for(&mut alice, "p-17", Duration::from_secs(10));
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"], "kafka busy, retry later");
    broker.thaw();
    for i in 1..=16 {
        let a = answer_for(&mut alice, &format!("p-{i}"), Duration::from_secs(20));
        assert_eq!(a["type"], "message.ack", "{a}");
    }
    let m = s.http_get("/metrics").1;
    assert_eq!(
        common::metric(&m, "switchboard_kafka_dm_busy_total"),
        Some(1)
    );
}

#[test]
fn a_missing_topic_is_not_ready_until_it_is_created() {
    let broker = Tansu::start();
    let s = TestServer::start(&[
        ("SWITCHBOARD_KAFKA_BROKERS", broker.bootstrap().as_str()),
        ("SWITCHBOARD_KAFKA_DM_TOPIC", "not-created-yet"),
        ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "1s"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.logs().contains("the direct-message topic does not exist")
        || !ready_reason(&s).1.contains("kafka unavailable")
    {
        assert!(Instant::now() < deadline, "no log line; log:\n{}", s.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut alice = s.connect("/ws?user_id=alice");
    alice.send_json(dm("t-1", "bob", "nowhere to go"));
    let e = answer_for(&mut alice, "t-1", Duration::from_secs(10));
    assert_eq!(e["error"], "kafka unavailable, retry later", "{e}");
    kafka::create_topic(&broker.bootstrap(), "not-created-yet", 1);
    wait_ready_is(&s, true);
    assert_eq!(
        send_until_acked(&mut alice, "t-1", "bob")["type"],
        "message.ack"
    );
}
