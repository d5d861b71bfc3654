//! Kafka and PostgreSQL configured together (issues 12 and 13): one `message.ack` after both
//! sinks have the message (a stalled database or a stalled broker each hold it back), and the
//! `(sender, clientMsgId)` dedup key shared by both, durable across a restart: a retry after
//! the restart is acked with the first `serverMsgId` and never produced twice.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::kafka::{self, Tansu};
use common::pg::{ClusterOptions, PgCluster};
use common::{Client, Event, TestServer};
use serde_json::{json, Value};

const TOPIC: &str = "dm-store";

fn start(bootstrap: &str, db: &str) -> TestServer {
    let s = TestServer::start(&[
        ("SWITCHBOARD_KAFKA_BROKERS", bootstrap),
        ("SWITCHBOARD_KAFKA_DM_TOPIC", TOPIC),
        ("SWITCHBOARD_KAFKA_ACK_TIMEOUT", "20s"),
        ("SWITCHBOARD_DATABASE_URL", db),
        ("SWITCHBOARD_STORE_TIMEOUT", "20s"),
    ]);
    s.wait_ready();
    s
}

fn dm(cmid: &str, to: &str, content: &str) -> Value {
    json!({"type":"message.send","clientMsgId":cmid,"to":to,"content":content})
}

fn answer(c: &mut Client, cmid: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.next_event(deadline.saturating_duration_since(Instant::now())) {
            Event::Json(v) if v["data"]["clientMsgId"] == cmid => {
                if v["type"] == "message.ack" || v["type"] == "error" {
                    return v;
                }
            }
            Event::Json(_) => {}
            other => panic!("waiting for the answer to {cmid}: {other:?}"),
        }
    }
}

fn records_with(bootstrap: &str, at_least: usize, cmid: &str) -> usize {
    kafka::read_all(bootstrap, TOPIC, at_least, kafka::READ_TIMEOUT)
        .iter()
        .filter(|r| r.header("clientMsgId") == Some(cmid))
        .count()
}

#[test]
fn one_ack_after_both_sinks_and_the_dedup_key_survives_a_restart() {
    let mut broker = Tansu::start();
    kafka::create_topic(&broker.bootstrap(), TOPIC, 2);
    let pg = PgCluster::start(ClusterOptions { fsync: false });
    let db = pg.database("kafka_store");
    let mut s = start(&broker.bootstrap(), &db);
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");

    alice.send_json(dm("k-1", "bob", "both"));
    let ack = answer(&mut alice, "k-1");
    assert_eq!(ack["type"], "message.ack", "{ack}");
    let create = bob.expect_type("message.create");
    assert_eq!(create["data"]["serverMsgId"], ack["data"]["serverMsgId"]);
    assert_eq!(records_with(&broker.bootstrap(), 1, "k-1"), 1);

    // A stalled database holds the ack back although the broker is up (the store commits
    // first: nothing is produced that is not stored).
    pg.freeze();
    alice.send_json(dm("k-2", "bob", "db stalled"));
    alice.expect_silence(1500);
    pg.thaw();
    assert_eq!(answer(&mut alice, "k-2")["type"], "message.ack");
    assert_eq!(
        bob.expect_type("message.create")["data"]["clientMsgId"],
        "k-2"
    );

    // A stalled broker holds it back although the database has committed it.
    broker.freeze();
    alice.send_json(dm("k-3", "bob", "broker stalled"));
    alice.expect_silence(1500);
    bob.expect_silence(100);
    broker.thaw();
    assert_eq!(answer(&mut alice, "k-3")["type"], "message.ack");
    assert_eq!(
        bob.expect_type("message.create")["data"]["clientMsgId"],
        "k-3"
    );

    // Restart the node: the dedup key is in PostgreSQL, the produced mark too.
    drop((alice, bob));
    let _ = s.sigterm();
    let s = start(&broker.bootstrap(), &db);
    let mut alice = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    alice.send_json(dm("k-1", "bob", "both"));
    let again = answer(&mut alice, "k-1");
    assert_eq!(again["type"], "message.ack", "{again}");
    assert_eq!(again["data"]["serverMsgId"], ack["data"]["serverMsgId"]);
    bob.expect_silence(300);
    assert_eq!(
        records_with(&broker.bootstrap(), 3, "k-1"),
        1,
        "produced once"
    );

    // The message store saw each message once: sync returns k-1..k-3.
    bob.send_json(json!({"type":"sync"}));
    let mut seen = Vec::new();
    loop {
        let v = bob.recv_json();
        match v["type"].as_str() {
            Some("message.create") => {
                seen.push(v["data"]["clientMsgId"].as_str().unwrap().to_owned())
            }
            Some("sync.done") => break,
            _ => panic!("{v}"),
        }
    }
    assert_eq!(seen, ["k-1", "k-2", "k-3"]);
}
