//! History appends across nodes under faults (real processes): an append Redis did not
//! answer in time is sent again, idempotently, and delivered once on every node.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{metric, Client, TestServer};
use serde_json::json;

const ROOMS: &str = r#"[{"pattern": "h-*", "history_size": 100}]"#;

fn node(redis: &RedisServer, timeout: &str, canary: &str) -> TestServer {
    let url = redis.url();
    let s = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        ("SWITCHBOARD_ROOMS", ROOMS),
        ("SWITCHBOARD_REDIS_CANARY_INTERVAL", canary),
        ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "30s"),
        ("SWITCHBOARD_REDIS_TIMEOUT", timeout),
        ("SWITCHBOARD_REDIS_RECONNECT_MAX", "200ms"),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    s.wait_ready();
    s
}

/// Every `message` frame within `within`: (offset, epoch, n).
fn drain_messages(c: &mut Client, within: Duration) -> Vec<(u64, String, u64)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match c.next_event(left) {
            common::Event::Json(v) if v["type"] == "message" => out.push((
                v["offset"].as_u64().unwrap_or(0),
                v["epoch"].as_str().unwrap_or("").to_owned(),
                v["data"]["n"].as_u64().unwrap_or(0),
            )),
            common::Event::Json(_) => {}
            _ => return out,
        }
    }
}

/// Publish n=1, then stall Redis's writes (scripts) for 1.2 s, longer than `redis_timeout`
/// (300 ms) and shorter than the canary timeout, and publish n=2 on node A. The append
/// pipeline gets no answer in time: it is sent again until Redis answers, and the script
/// runs the message once however often it arrives. Every node delivers n=2 exactly once,
/// under the cluster's epoch, at offset 2, and the stream holds one entry for it.
fn a_stalled_append_is_delivered_once_everywhere(canary: &str) {
    let redis = RedisServer::start();
    let a = node(&redis, "300ms", canary);
    let b = node(&redis, "300ms", canary);
    let mut on_a = a.connect("/ws?user_id=ra");
    let mut on_b = b.connect("/ws?user_id=rb");
    let mut writer = a.connect("/ws?user_id=w");
    on_a.subscribe("h-1");
    on_b.subscribe("h-1");
    writer.subscribe("h-1");
    writer.send_json(json!({"type": "publish", "room": "h-1", "data": {"n": 1}}));
    let first = drain_messages(&mut on_a, Duration::from_millis(800));
    assert_eq!(first.len(), 1, "{first:?}");
    let epoch = first[0].1.clone();
    drain_messages(&mut on_b, Duration::from_millis(300));

    assert_eq!(redis.cmd(&["CLIENT", "PAUSE", "1200", "WRITE"]), "OK");
    writer.send_json(json!({"type": "publish", "room": "h-1", "data": {"n": 2}}));
    let got_a = drain_messages(&mut on_a, Duration::from_secs(3));
    let got_b = drain_messages(&mut on_b, Duration::from_millis(500));
    let m = a.http_get("/metrics").1;
    let fell_back = metric(&m, "switchboard_redis_history_local_total");
    let retried = metric(&m, "switchboard_redis_history_append_retried_total");
    let xlen = redis.cmd(&["XLEN", "sb:{room:h-1}:h"]);
    let offset = redis.cmd(&["HGET", "sb:{room:h-1}:e", "offset"]);
    eprintln!("node A's subscriber got: {got_a:?}");
    eprintln!("node B's subscriber got: {got_b:?}");
    eprintln!("on A: history_local_total {fell_back:?}, append_retried_total {retried:?}");
    eprintln!("redis: XLEN={xlen} offset={offset}");
    let want = vec![(2, epoch, 2)];
    assert_eq!(got_a, want, "the publishing node");
    assert_eq!(got_b, want, "the other node");
    assert_eq!(fell_back.unwrap_or(0), 0, "nothing sequenced on the node");
    assert!(retried.unwrap_or(0) >= 1, "the append was sent again");
    assert_eq!(xlen, "2", "one stream entry per message");
    assert_eq!(offset, "2");
    // The room's state hash keeps the epoch and offset only; the publishing node's mark of
    // its last append is a key of its own that expires (APPEND_MARK_TTL), so the marks of
    // node processes long gone do not pile up in the room.
    let fields = redis.cmd_value(&["HKEYS", "sb:{room:h-1}:e"]).to_string();
    assert!(
        fields.contains("epoch") && fields.contains("offset") && !fields.contains("n:"),
        "{fields}"
    );
    let marks = redis.cmd_value(&["KEYS", "sb:{room:h-1}:n:*"]).to_string();
    assert!(marks.contains("sb:{room:h-1}:n:"), "{marks}");
    let mark = marks
        .split(|c: char| c.is_whitespace() || c == '"' || c == '[' || c == ']' || c == ',')
        .find(|k| k.starts_with("sb:{room:h-1}:n:"))
        .expect("a mark key")
        .to_string();
    assert!(
        redis.cmd(&["GET", &mark]).starts_with("2 2 "),
        "the mark holds <seq> <offset> <epoch> of the last append"
    );
    let pttl: i64 = redis.cmd(&["PTTL", &mark]).parse().expect("PTTL");
    assert!(pttl > 0 && pttl <= 60_000, "PTTL {pttl}");
}

/// No publish in flight during the stall: the shared connection survives, and the first
/// copy, queued at Redis, runs when the stall ends (every later copy is a repeat).
#[test]
fn a_timed_out_history_append_is_delivered_once_on_every_node() {
    a_stalled_append_is_delivered_once_everywhere("10s");
}

/// A canary in flight during the stall: the publisher's timeout drops the shared connection,
/// and the append queued on it with it; the copy sent on the next connection runs.
#[test]
fn a_history_append_cut_by_a_publisher_timeout_reaches_every_node_once() {
    a_stalled_append_is_delivered_once_everywhere("200ms");
}
