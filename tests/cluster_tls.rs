//! Nodes joined through a Redis that speaks only TLS (real processes): `redis-server --port 0
//! --tls-port`, with a throwaway CA and certificates `openssl` makes for the test
//! (`RedisServer::start_tls`). Two nodes over `rediss://` carry a room message across and
//! answer `/ready` 200, and the Redis password is never logged; a node trusting the wrong CA
//! answers `/ready` 503, logs why (the certificate's unknown issuer), and still serves its own
//! clients; a Redis that wants client certificates (mutual TLS) takes a node that presents one
//! and refuses one that does not; a key that is not the certificate's stops the start; the
//! doctor says TLS is on and whether each handshake succeeds. And a Redis Cluster that speaks
//! only TLS (`RedisCluster::start_tls`: clients, bus and replication): two nodes given its
//! `rediss://` seeds carry room messages both ways through sharded pub/sub and are ready; a
//! node trusting the wrong CA is 503 and still delivers locally.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisServer};
use common::{Client, TestServer};
use serde_json::{json, Value};

const PASSWORD: &str = "tls-Pa55word-never-logged";

fn node(url: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_REDIS_URL", url),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
        ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "1s"),
        ("SWITCHBOARD_REDIS_RECONNECT_MAX", "500ms"),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

/// Wait until `/ready` answers `status`, and for a 503 one that blames Redis (the in-memory
/// store says 503 for a moment at start too).
fn wait_ready_is(s: &TestServer, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some((code, body)) = s.try_http_get("/ready") {
            if code == status && (status != 503 || body.contains("redis")) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/ready is not {status} within {within:?}: {:?}; log:\n{}",
            s.try_http_get("/ready"),
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_log(s: &TestServer, what: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = s.logs();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the log never said {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn publish(c: &mut Client, room: &str, data: Value) {
    c.send_json(json!({"type": "publish", "room": room, "data": data}));
}

/// A message published on `from` reaches a subscriber on `to` (retried while the nodes'
/// subscriptions settle: each try is a new message).
fn crosses(from: &TestServer, to: &TestServer, room: &str) {
    let mut reader = to.connect("/ws?user_id=reader");
    reader.subscribe(room);
    let mut writer = from.connect("/ws?user_id=writer");
    // Only a member publishes to a room.
    writer.subscribe(room);
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        publish(&mut writer, room, json!({"n": n}));
        match reader.next_event(Duration::from_millis(500)) {
            common::Event::Json(v) if v["type"] == "message" => {
                assert_eq!(v["room"], room, "{v}");
                return;
            }
            _ => assert!(
                Instant::now() < deadline,
                "no message crossed from node {} to node {}; logs:\n{}\n----\n{}",
                from.port,
                to.port,
                from.logs(),
                to.logs()
            ),
        }
    }
}

fn with_password(url: &str) -> String {
    url.replacen("rediss://", &format!("rediss://:{PASSWORD}@"), 1)
}

#[test]
fn two_nodes_over_rediss_carry_a_room_message_and_are_ready() {
    let redis = RedisServer::start_tls_args(false, &["--requirepass", PASSWORD]);
    let certs = redis.certs();
    let url = with_password(&redis.url());
    let tls = [("SWITCHBOARD_REDIS_TLS_CA_FILE", certs.ca.as_str())];
    let a = node(&url, &tls);
    let b = node(&url, &tls);
    wait_ready_is(&a, 200, Duration::from_secs(10));
    wait_ready_is(&b, 200, Duration::from_secs(10));
    crosses(&a, &b, "tls-lobby");
    crosses(&b, &a, "tls-lobby-back");
    for n in [&a, &b] {
        let log = n.logs();
        assert!(log.contains("redis: TLS (rediss://)"), "{log}");
        assert!(log.contains(&certs.ca), "the log names the CA file:\n{log}");
        assert!(!log.contains(PASSWORD), "the password was logged:\n{log}");
    }
}

#[test]
fn a_wrong_ca_is_503_with_the_reason_logged_and_the_node_serves_locally() {
    let redis = RedisServer::start_tls(false);
    let certs = redis.certs();
    let url = with_password(&redis.url());
    let n = node(
        &url,
        &[("SWITCHBOARD_REDIS_TLS_CA_FILE", certs.other_ca.as_str())],
    );
    wait_ready_is(&n, 503, Duration::from_secs(5));
    // rustls's words for a certificate no trusted CA signed.
    let log = wait_log(&n, "UnknownIssuer", Duration::from_secs(5));
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert!(!log.contains(PASSWORD), "the password was logged:\n{log}");
    // Its own clients are still served, rooms and all.
    n.assert_serving();
    let mut bob = n.connect("/ws?user_id=bob");
    bob.subscribe("local");
    let mut alice = n.connect("/ws?user_id=alice");
    alice.subscribe("local");
    publish(&mut alice, "local", json!({"here": true}));
    let got = bob.expect_type("message");
    assert_eq!(got["data"], json!({"here": true}));
    // It stays 503: a wrong CA does not get better by retrying.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = n.http_get("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
}

#[test]
fn mutual_tls_takes_a_node_with_a_client_certificate_and_refuses_one_without() {
    let redis = RedisServer::start_tls(true);
    let certs = redis.certs();
    let url = redis.url();
    let mtls = [
        ("SWITCHBOARD_REDIS_TLS_CA_FILE", certs.ca.as_str()),
        (
            "SWITCHBOARD_REDIS_TLS_CERT_FILE",
            certs.client_cert.as_str(),
        ),
        ("SWITCHBOARD_REDIS_TLS_KEY_FILE", certs.client_key.as_str()),
    ];
    let a = node(&url, &mtls);
    let b = node(&url, &mtls);
    wait_ready_is(&a, 200, Duration::from_secs(10));
    wait_ready_is(&b, 200, Duration::from_secs(10));
    assert!(
        a.logs()
            .contains(&format!("client certificate {}", certs.client_cert)),
        "{}",
        a.logs()
    );
    crosses(&a, &b, "mtls-room");
    // Without a certificate Redis ends the session; the node says 503 and why.
    let bare = node(
        &url,
        &[("SWITCHBOARD_REDIS_TLS_CA_FILE", certs.ca.as_str())],
    );
    wait_ready_is(&bare, 503, Duration::from_secs(5));
    wait_log(&bare, "cannot connect", Duration::from_secs(5));
    bare.assert_serving();
}

#[test]
fn a_key_that_is_not_the_certificates_stops_the_start() {
    let redis = RedisServer::start_tls(true);
    let certs = redis.certs();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    common::hermetic(&mut cmd);
    let o = cmd
        .env("SWITCHBOARD_HOST", "127.0.0.1")
        .env("SWITCHBOARD_PORT", "1")
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_REDIS_TLS_CA_FILE", &certs.ca)
        .env("SWITCHBOARD_REDIS_TLS_CERT_FILE", &certs.client_cert)
        // The server's key: a real key, not the client certificate's.
        .env("SWITCHBOARD_REDIS_TLS_KEY_FILE", &certs.server_key)
        .output()
        .expect("run switchboard");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "it started:\n{err}");
    assert!(err.contains("redis_tls_key_file"), "{err}");
}

#[test]
fn the_doctor_says_tls_is_on_and_whether_the_handshake_succeeds() {
    let redis = RedisServer::start_tls(false);
    let certs = redis.certs();
    let doctor = |ca: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        common::hermetic(&mut cmd);
        let o = cmd
            .args(["doctor", "--connections", "1000"])
            .env("SWITCHBOARD_REDIS_URL", redis.url())
            .env("SWITCHBOARD_REDIS_TLS_CA_FILE", ca)
            .output()
            .expect("run switchboard doctor");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = doctor(&certs.ca);
    let row = |out: &str, name: &str| {
        out.lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no {name} row:\n{out}"))
            .to_owned()
    };
    let tls = row(&out, "redis TLS");
    assert!(
        tls.starts_with("OK ") && tls.contains("on (rediss://)"),
        "{tls}\n{out}"
    );
    let hs = row(&out, "redis TLS handshake");
    assert!(
        hs.starts_with("OK ") && hs.contains("TLSv1_"),
        "{hs}\n{out}"
    );
    assert_ne!(code, Some(1), "nothing blocks:\n{out}");

    let (code, out) = doctor(&certs.other_ca);
    assert_eq!(code, Some(1), "a wrong CA blocks:\n{out}");
    let hs = row(&out, "redis TLS handshake");
    assert!(
        hs.starts_with("BLOCK") && hs.contains("fails"),
        "{hs}\n{out}"
    );
    assert!(out.contains("UnknownIssuer"), "{out}");
    assert!(
        out.contains(&format!("--tls --cacert {}", certs.other_ca)),
        "{out}"
    );
}

fn cluster_node(seeds: &str, ca: &str) -> TestServer {
    node(
        seeds,
        &[
            ("SWITCHBOARD_REDIS_CLUSTER", "true"),
            ("SWITCHBOARD_REDIS_TLS_CA_FILE", ca),
        ],
    )
}

#[test]
fn two_nodes_over_a_tls_redis_cluster_carry_room_messages_both_ways_and_are_ready() {
    let cluster = RedisCluster::start_tls(3);
    let certs = cluster.certs();
    let seeds = cluster.seeds();
    assert!(seeds.starts_with("rediss://"), "{seeds}");
    let a = cluster_node(&seeds, &certs.ca);
    let b = cluster_node(&seeds, &certs.ca);
    wait_ready_is(&a, 200, Duration::from_secs(20));
    wait_ready_is(&b, 200, Duration::from_secs(20));
    // Several rooms (their channels' slots spread over the masters), each way: the nodes
    // share nothing but the cluster.
    for room in ["tls-c-lobby", "tls-c-news", "tls-c-ops"] {
        crosses(&a, &b, room);
        crosses(&b, &a, &format!("{room}-back"));
    }
    for n in [&a, &b] {
        let log = n.logs();
        assert!(log.contains("redis: TLS (rediss://)"), "{log}");
        assert!(
            log.contains("redis: cluster mode, sharded pub/sub on every master"),
            "{log}"
        );
    }
    // While both nodes hold a room, its channel is a shard channel of both on the master of
    // its slot (over TLS, as the test's client sees it through redis-cli).
    let mut on_a = a.connect("/ws?user_id=ha");
    on_a.subscribe("tls-c-held");
    let mut on_b = b.connect("/ws?user_id=hb");
    on_b.subscribe("tls-c-held");
    let numsub = || -> i64 {
        cluster
            .nodes()
            .iter()
            .filter_map(|n| {
                let out = n
                    .cli(
                        &["PUBSUB", "SHARDNUMSUB", "sb:{room:tls-c-held}"],
                        Duration::from_secs(5),
                    )
                    .ok()?;
                out.lines().nth(1)?.trim().parse::<i64>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while numsub() != 2 {
        assert!(
            Instant::now() < deadline,
            "the cluster never had both nodes on the room's shard channel: {}",
            numsub()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    publish(&mut on_a, "tls-c-held", json!({"n": 1}));
    assert_eq!(on_b.expect_type("message")["data"]["n"], 1);
}

#[test]
fn a_wrong_ca_for_a_tls_redis_cluster_is_503_and_the_node_serves_locally() {
    let cluster = RedisCluster::start_tls(3);
    let certs = cluster.certs();
    let n = cluster_node(&cluster.seeds(), &certs.other_ca);
    wait_ready_is(&n, 503, Duration::from_secs(10));
    let log = wait_log(&n, "UnknownIssuer", Duration::from_secs(10));
    assert!(log.contains("invalid peer certificate"), "{log}");
    n.assert_serving();
    let mut bob = n.connect("/ws?user_id=bob");
    bob.subscribe("local");
    let mut alice = n.connect("/ws?user_id=alice");
    alice.subscribe("local");
    publish(&mut alice, "local", json!({"here": true}));
    assert_eq!(bob.expect_type("message")["data"], json!({"here": true}));
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = n.http_get("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
}
