//! Self-test of the Kafka test harness (`tests/common/kafka.rs`): every helper against a real
//! tansu broker and, where it applies, librdkafka's mock cluster.
#[macro_use]
mod common;

use std::time::Duration;

use common::kafka::{self, Broker, Mock, Tansu};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;

const T: Duration = kafka::READ_TIMEOUT;

/// Records with keys and headers come back exactly, in order, from an idempotent producer.
fn roundtrip(broker: &dyn Broker) {
    let bootstrap = &broker.bootstrap();
    broker.create_topic("rt", 1);
    assert!(kafka::read_all(bootstrap, "rt", 0, T).is_empty());
    let a = kafka::produce(
        bootstrap,
        "rt",
        Some("conv-1"),
        "{\"n\":1}",
        &[("sender", "alice"), ("eventId", "e1")],
    );
    let b = kafka::produce(bootstrap, "rt", None, "two", &[]);
    let c = kafka::produce(bootstrap, "rt", Some("conv-1"), "three", &[("empty", "")]);
    assert_eq!((a.0, b.0, c.0), (0, 0, 0));
    assert_eq!((b.1, c.1), (a.1 + 1, a.1 + 2));
    let got = kafka::read_all(bootstrap, "rt", 3, T);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].key_str(), "conv-1");
    assert_eq!(got[0].value_json(), serde_json::json!({"n": 1}));
    assert_eq!(
        got[0].headers,
        vec![
            ("sender".to_owned(), b"alice".to_vec()),
            ("eventId".to_owned(), b"e1".to_vec())
        ]
    );
    assert_eq!(got[0].header("eventId"), Some("e1"));
    assert_eq!((got[0].partition, got[0].offset), a);
    assert_eq!(got[1].key, None);
    assert_eq!(got[1].value_str(), "two");
    assert!(got[1].headers.is_empty());
    assert_eq!(got[2].header("empty"), Some(""));
    assert_eq!(got[2].offset, c.1);
}

/// A group resumes from its committed offset after its consumer is gone.
fn group_resume(broker: &dyn Broker) {
    let bootstrap = &broker.bootstrap();
    broker.create_topic("grp", 1);
    for i in 0..3 {
        kafka::produce(bootstrap, "grp", Some("k"), &format!("m{i}"), &[]);
    }
    let group = kafka::unique_group("resume");
    assert_eq!(kafka::committed(bootstrap, &group, "grp", 1), vec![None]);
    {
        let c = kafka::group_consumer(bootstrap, &group, "grp");
        let r = kafka::poll_one(&c, T);
        assert_eq!(r.value_str(), "m0");
        kafka::commit(&c, "grp", r.partition, r.offset + 1);
    }
    let first = kafka::read_all(bootstrap, "grp", 3, T)[0].offset;
    assert_eq!(
        kafka::committed(bootstrap, &group, "grp", 1),
        vec![Some(first + 1)]
    );
    let c = kafka::group_consumer(bootstrap, &group, "grp");
    let r = kafka::poll_one(&c, T);
    assert_eq!(r.value_str(), "m1", "resumed after the committed offset");
}

/// Several partitions: read_all gets every record, sorted by (partition, offset).
fn partitions(broker: &dyn Broker) {
    let bootstrap = &broker.bootstrap();
    broker.create_topic("parts", 3);
    let mut sent = Vec::new();
    for i in 0..9 {
        sent.push(kafka::produce(
            bootstrap,
            "parts",
            Some(&format!("key-{i}")),
            &format!("v{i}"),
            &[],
        ));
    }
    sent.sort();
    let got = kafka::read_all(bootstrap, "parts", 9, T);
    let at: Vec<(i32, i64)> = got.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(at, sent);
}

/// An lz4-compressed batch of an idempotent producer comes back whole.
fn lz4_batch(broker: &dyn Broker) {
    let bootstrap = &broker.bootstrap();
    broker.create_topic("lz4", 1);
    let p: FutureProducer = kafka::base_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("message.timeout.ms", T.as_millis().to_string())
        .create()
        .expect("producer");
    let rt = runtime();
    let sent: Vec<_> = (0..10)
        .map(|i| {
            let value = format!("{{\"i\":{i},\"pad\":\"{}\"}}", "a".repeat(100));
            p.send_result(FutureRecord::to("lz4").key("k").payload(&value))
                .map_err(|(e, _)| e)
                .expect("enqueue")
        })
        .collect();
    for f in sent {
        rt.block_on(f)
            .expect("delivery future")
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
    let got = kafka::read_all(bootstrap, "lz4", 10, T);
    let is: Vec<i64> = got
        .iter()
        .map(|r| r.value_json()["i"].as_i64().unwrap())
        .collect();
    assert_eq!(is, (0..10).collect::<Vec<_>>());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

mod tansu {
    use super::*;

    #[test]
    fn lz4_batch() {
        let t = Tansu::start();
        super::lz4_batch(&t);
    }

    /// A request in flight while the broker is frozen past the socket timeout is sent again;
    /// the broker keeps one copy (idempotence), and the delivery report is a success whose
    /// offset may be unknown (-1).
    #[test]
    fn retried_request_kept_once() {
        let mut t = Tansu::start();
        let b = t.bootstrap();
        kafka::create_topic(&b, "dup", 1);
        let p: FutureProducer = kafka::base_config(&b)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("socket.timeout.ms", "1500")
            .set("linger.ms", "0")
            .set("message.timeout.ms", T.as_millis().to_string())
            .create()
            .expect("producer");
        let rt = runtime();
        rt.block_on(p.send(FutureRecord::to("dup").key("k").payload("first"), T))
            .map_err(|(e, _)| e)
            .expect("first delivered");
        t.freeze();
        let f = p
            .send_result(FutureRecord::to("dup").key("k").payload("retried"))
            .map_err(|(e, _)| e)
            .expect("enqueue");
        // Past socket.timeout.ms: librdkafka gives up on the connection and retries.
        std::thread::sleep(Duration::from_secs(3));
        t.thaw();
        let d = rt
            .block_on(f)
            .expect("delivery future")
            .map_err(|(e, _)| e)
            .expect("retried delivered");
        assert_eq!(d.partition, 0);
        let got = kafka::read_all(&b, "dup", 2, T);
        let values: Vec<&str> = got.iter().map(|r| r.value_str()).collect();
        assert_eq!(values, ["first", "retried"]);
    }

    #[test]
    fn roundtrip() {
        let t = Tansu::start();
        super::roundtrip(&t);
    }

    #[test]
    fn group_resume() {
        let t = Tansu::start();
        super::group_resume(&t);
    }

    #[test]
    fn partitions() {
        let t = Tansu::start();
        super::partitions(&t);
    }

    /// A frozen broker times requests out; thawed, it serves again. A killed one refuses;
    /// restarted on the same port, it serves again (memory storage: empty again).
    #[test]
    fn freeze_thaw_kill_restart() {
        let mut t = Tansu::start();
        let b = t.bootstrap();
        kafka::create_topic(&b, "ft", 1);
        t.freeze();
        let e = kafka::try_produce(&b, "ft", None, "frozen", &[], Duration::from_secs(2));
        assert!(e.is_err(), "a frozen broker acked: {e:?}");
        t.thaw();
        kafka::produce(&b, "ft", None, "thawed", &[]);
        t.kill();
        assert!(!t.running());
        let e = kafka::try_produce(&b, "ft", None, "dead", &[], Duration::from_secs(2));
        assert!(e.is_err(), "a killed broker acked: {e:?}");
        t.restart();
        assert_eq!(t.bootstrap(), b);
        kafka::create_topic(&b, "ft2", 1);
        kafka::produce(&b, "ft2", None, "back", &[]);
        assert_eq!(kafka::read_all(&b, "ft2", 1, T)[0].value_str(), "back");
    }
}

mod mock {
    use super::*;

    #[test]
    fn lz4_batch() {
        let m = Mock::start(1);
        super::lz4_batch(&m);
    }

    #[test]
    fn roundtrip() {
        let m = Mock::start(1);
        super::roundtrip(&m);
    }

    #[test]
    fn group_resume() {
        let m = Mock::start(1);
        super::group_resume(&m);
    }

    #[test]
    fn partitions() {
        let m = Mock::start(3);
        super::partitions(&m);
    }

    /// Retriable Produce errors are retried by the idempotent producer without duplicates; a
    /// fatal one fails the delivery.
    #[test]
    fn produce_errors() {
        let m = Mock::start(1);
        let b = m.bootstrap();
        m.create_topic("pe", 1);
        m.fail_produce(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2]);
        kafka::produce(&b, "pe", Some("k"), "once", &[]);
        let got = kafka::read_all(&b, "pe", 1, T);
        assert_eq!(got.len(), 1, "{got:?}");
        m.fail_produce(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
        let e = kafka::try_produce(&b, "pe", None, "big", &[], T);
        assert!(e.is_err(), "{e:?}");
        m.clear_produce_errors();
        kafka::produce(&b, "pe", None, "after", &[]);
    }

    /// A down broker holds deliveries back; up again, they complete.
    #[test]
    fn broker_down_up() {
        let m = Mock::start(1);
        let b = m.bootstrap();
        m.create_topic("du", 1);
        kafka::produce(&b, "du", None, "before", &[]);
        m.broker_down(1);
        let e = kafka::try_produce(&b, "du", None, "down", &[], Duration::from_secs(2));
        assert!(e.is_err(), "a down broker acked: {e:?}");
        m.broker_up(1);
        kafka::produce(&b, "du", None, "up", &[]);
        let got = kafka::read_all(&b, "du", 2, T);
        let values: Vec<&str> = got.iter().map(|r| r.value_str()).collect();
        assert!(
            values.contains(&"before") && values.contains(&"up"),
            "{values:?}"
        );
    }
}

/// Through a proxy: swallowed, produce times out; cut, it fails; healed, it works again.
#[test]
fn tansu_behind_proxy() {
    let (t, p) = Tansu::start_proxied();
    let b = p.addr();
    assert_ne!(b, t.bootstrap());
    kafka::create_topic(&b, "px", 1);
    kafka::produce(&b, "px", None, "direct", &[]);
    assert!(p.accepted() > 0, "the client did not go through the proxy");
    p.swallow();
    let e = kafka::try_produce(&b, "px", None, "swallowed", &[], Duration::from_secs(2));
    assert!(e.is_err(), "acked through a swallowing proxy: {e:?}");
    p.heal();
    kafka::produce(&b, "px", None, "healed", &[]);
    p.cut();
    assert_eq!(p.connections(), 0);
    assert!(
        std::net::TcpStream::connect(&b).is_err(),
        "a cut proxy accepted"
    );
    let e = kafka::try_produce(&b, "px", None, "cut", &[], Duration::from_secs(2));
    assert!(e.is_err(), "acked through a cut proxy: {e:?}");
    p.heal();
    kafka::produce(&b, "px", None, "healed again", &[]);
    let values: Vec<String> = kafka::read_all(&b, "px", 3, T)
        .iter()
        .map(|r| r.value_str().to_owned())
        .collect();
    for v in ["direct", "healed", "healed again"] {
        assert!(values.iter().any(|x| x == v), "{v} missing: {values:?}");
    }
}
