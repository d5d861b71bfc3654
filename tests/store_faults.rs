//! The message store's faults for real: PostgreSQL stopped the hard way, restarted, frozen
//! (SIGSTOP: connections open, nothing answers) and thawed, under a stream of DMs from many
//! connections. After each: the node keeps serving, `/ready` told the truth, it reconnects on
//! its own, and the database holds every acked message exactly once (read back with psql).
//! Every send got exactly one answer: an ack or an error, never both, never neither.
//!
//! Each test starts its own cluster (it stops it), so it never disturbs the shared one.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{ClusterOptions, PgCluster};
use common::{Event, TestServer};
use serde_json::{json, Value};

const SENDERS: usize = 8;
/// Pause between one sender's messages.
const GAP: Duration = Duration::from_millis(4);

/// What one sender saw: clientMsgIds acked (with their serverMsgId) and refused.
#[derive(Default)]
struct Outcome {
    acked: HashMap<String, String>,
    errors: Vec<(String, String)>,
}

/// Run `SENDERS` senders until `stop`; each sends a DM, waits for its one answer, pauses.
fn stream(server: &TestServer, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Outcome>> {
    (0..SENDERS)
        .map(|i| {
            let mut c = server.connect(&format!("/ws?user_id=s{i}"));
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = Outcome::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let cmid = format!("s{i}-{n}");
                    n += 1;
                    c.send_json(json!({"type": "message.send", "clientMsgId": cmid,
                        "to": format!("r{i}"), "content": format!("m {cmid}")}));
                    // The answer comes within store_timeout (1 s) plus a margin.
                    match c.next_event(Duration::from_secs(5)) {
                        Event::Json(v) if v["type"] == "message.ack" => {
                            assert_eq!(v["data"]["clientMsgId"], cmid.as_str(), "{v}");
                            let sid = v["data"]["serverMsgId"].as_str().unwrap().to_owned();
                            assert!(out.acked.insert(cmid, sid).is_none());
                        }
                        Event::Json(v) if v["type"] == "error" => {
                            assert_eq!(v["data"]["clientMsgId"], cmid.as_str(), "{v}");
                            out.errors
                                .push((cmid, v["error"].as_str().unwrap().to_owned()));
                        }
                        other => panic!("sender {i}: {cmid} got {other:?}"),
                    }
                    std::thread::sleep(GAP);
                }
                // Nothing else is in flight: no second answer to anything.
                match c.next_event(Duration::from_millis(300)) {
                    Event::Timeout => {}
                    other => panic!("sender {i}: an extra frame {other:?}"),
                }
                out
            })
        })
        .collect()
}

fn psql(cluster: &PgCluster, url: &str, sql: &str) -> String {
    let db = url.rsplit('/').next().unwrap();
    let out = std::process::Command::new(common::pg::bin_dir().join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-At",
            "-F",
            ",",
            "-c",
            sql,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Poll /ready until it answers `status` (bounded).
fn wait_ready(server: &TestServer, status: u16, why: &str) -> Duration {
    let start = Instant::now();
    loop {
        if let Some((s, body)) = server.try_http_get("/ready") {
            if s == status {
                if status == 503 {
                    assert!(body.contains("message store unavailable"), "{body}");
                }
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "/ready never answered {status} ({why}); log:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dms_while_postgres_stops_restarts_and_freezes_lose_nothing_acked() {
    let cluster = PgCluster::start(ClusterOptions { fsync: true });
    let url = cluster.database("faults");
    let server = TestServer::start(&[
        ("SWITCHBOARD_DATABASE_URL", &url),
        ("SWITCHBOARD_STORE_TIMEOUT", "1s"),
        // The retries at the end go back to back.
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    wait_ready(&server, 200, "at start");
    let stop = Arc::new(AtomicBool::new(false));
    let senders = stream(&server, stop.clone());

    std::thread::sleep(Duration::from_millis(800));
    cluster.stop_immediate();
    let red = wait_ready(&server, 503, "after pg_ctl stop -m immediate");
    std::thread::sleep(Duration::from_millis(1200));
    cluster.restart();
    let green = wait_ready(&server, 200, "after restart");
    std::thread::sleep(Duration::from_millis(800));
    cluster.freeze();
    let frozen_red = wait_ready(&server, 503, "while frozen");
    std::thread::sleep(Duration::from_millis(1500));
    cluster.thaw();
    let thawed_green = wait_ready(&server, 200, "after thaw");
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);

    let outcomes: Vec<Outcome> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    let acked: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    let errors: usize = outcomes.iter().map(|o| o.errors.len()).sum();
    eprintln!(
        "acked {acked}, errors {errors}; /ready 503 after {red:?}, 200 after {green:?}, 503 after {frozen_red:?} frozen, 200 after {thawed_green:?}"
    );
    assert!(acked > 100, "too few acks to mean anything: {acked}");
    assert!(errors > 0, "the faults produced no errors: were they real?");
    for o in &outcomes {
        for (_, text) in &o.errors {
            assert!(
                text == "message store unavailable, retry later"
                    || text == "server busy, retry later",
                "{text}"
            );
        }
    }

    // Every acked message is stored exactly once, under the serverMsgId its ack named.
    let rows = psql(
        &cluster,
        &url,
        "SELECT client_msg_id, server_msg_id FROM switchboard_messages",
    );
    let mut stored: HashMap<String, String> = HashMap::new();
    for line in rows.lines() {
        let (cmid, sid) = line.split_once(',').unwrap();
        assert!(
            stored.insert(cmid.to_owned(), sid.to_owned()).is_none(),
            "{cmid} stored twice"
        );
    }
    for o in &outcomes {
        for (cmid, sid) in &o.acked {
            assert_eq!(
                stored.get(cmid),
                Some(sid),
                "acked {cmid} is not stored as acked"
            );
        }
    }

    // The refused ones, retried now with the same clientMsgId: each is acked once; one that had
    // been stored although its sender got an error (a commit whose answer was lost) gets the
    // stored copy's ack, and none is stored twice.
    let mut retried = HashSet::new();
    for (i, o) in outcomes.iter().enumerate() {
        let mut c = server.connect(&format!("/ws?user_id=s{i}"));
        for (cmid, _) in &o.errors {
            c.send_json(json!({"type": "message.send", "clientMsgId": cmid,
                "to": format!("r{i}"), "content": format!("m {cmid}")}));
            let ack = c.expect_type("message.ack");
            let sid = ack["data"]["serverMsgId"].as_str().unwrap();
            if let Some(was) = stored.get(cmid) {
                assert_eq!(was, sid, "a retry of a stored message got a new id");
            }
            retried.insert(cmid.clone());
        }
    }
    let count: Value = psql(
        &cluster,
        &url,
        "SELECT count(*), count(DISTINCT (sender, client_msg_id)) FROM switchboard_messages",
    )
    .trim()
    .split(',')
    .map(|n| n.parse::<u64>().unwrap())
    .collect::<Vec<_>>()
    .into();
    assert_eq!(count[0], count[1], "no (sender, clientMsgId) twice");
    let expected = stored.len() + retried.iter().filter(|c| !stored.contains_key(*c)).count();
    assert_eq!(count[0].as_u64().unwrap() as usize, expected);
    let m = server.http_get("/metrics").1;
    let failed = m
        .lines()
        .find(|l| l.starts_with("switchboard_store_failed_total "))
        .unwrap();
    eprintln!(
        "{failed}; stored {}; retried {}",
        stored.len(),
        retried.len()
    );
    server.assert_serving();
}

#[test]
fn a_node_started_while_postgres_is_down_serves_and_connects_when_it_comes_up() {
    let cluster = PgCluster::start(ClusterOptions { fsync: false });
    let url = cluster.database("late");
    cluster.stop_immediate();
    let server = TestServer::start(&[
        ("SWITCHBOARD_DATABASE_URL", &url),
        ("SWITCHBOARD_STORE_TIMEOUT", "1s"),
    ]);
    wait_ready(&server, 503, "database down at start");
    // Rooms work without the store; DMs and REST say the store is down.
    let mut a = server.connect("/ws?user_id=a");
    a.subscribe("r");
    a.send_json(json!({"type": "publish", "room": "r", "data": {"x": 1}}));
    a.expect_type("message");
    a.send_json(
        json!({"type": "message.send", "clientMsgId": "late-1", "to": "b", "content": "x"}),
    );
    let e = a.expect_error("message store unavailable, retry later");
    assert_eq!(e["data"]["clientMsgId"], "late-1");
    let raw = "GET /api/v1/messages/threads HTTP/1.1\r\nHost: t\r\nX-User-Id: a\r\n\r\n";
    let mut h = common::HttpConn::open(&server);
    h.send(raw.as_bytes());
    let r = h.response().unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("message store unavailable"), "{}", r.body);

    cluster.restart();
    wait_ready(&server, 200, "database up");
    a.send_json(
        json!({"type": "message.send", "clientMsgId": "late-1", "to": "b", "content": "x"}),
    );
    a.expect_type("message.ack");
    assert!(
        server.logs().contains("message store set up"),
        "{}",
        server.logs()
    );
}
