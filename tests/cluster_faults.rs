//! Faults between the nodes of a cluster and their Redis, injected for real: Redis killed
//! with SIGKILL and restarted, Redis stopped (SIGSTOP) for 5 s, the path to Redis cut and
//! made to swallow traffic by a TCP proxy, a node killed. After each: local delivery went on
//! throughout, `/ready` said 503 while Redis could not serve the node and 200 again after,
//! every node delivers across nodes again within 3 s of Redis answering, the counters match
//! what was dropped, and no node panicked.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis::RedisServer;
use common::{metric, Client, TestServer};
use serde_json::json;

/// Settings that make faults visible quickly in a test (the defaults are seconds).
const FAST: &[(&str, &str)] = &[
    ("SWITCHBOARD_REDIS_TIMEOUT", "1s"),
    ("SWITCHBOARD_REDIS_CANARY_INTERVAL", "200ms"),
    ("SWITCHBOARD_REDIS_CANARY_TIMEOUT", "1s"),
    ("SWITCHBOARD_REDIS_RECONNECT_MAX", "500ms"),
];

fn node(url: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("SWITCHBOARD_REDIS_URL", url)];
    env.extend_from_slice(FAST);
    env.extend_from_slice(extra);
    let s = TestServer::start(&env);
    s.wait_ready();
    s
}

fn ready(s: &TestServer) -> u16 {
    s.try_http_get("/ready").map_or(0, |(status, _)| status)
}

fn wait_ready_is(s: &TestServer, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while ready(s) != status {
        assert!(
            Instant::now() < deadline,
            "/ready is not {status} within {within:?}: {:?}",
            s.try_http_get("/ready")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter(s: &TestServer, name: &str) -> u64 {
    metric(&s.http_get("/metrics").1, name).unwrap_or_else(|| panic!("{name} missing"))
}

/// A publisher on `from` and a subscriber on `to` of room `room`.
struct Pair {
    publisher: Client,
    subscriber: Client,
    room: String,
    n: u64,
}

impl Pair {
    fn new(from: &TestServer, to: &TestServer, room: &str) -> Pair {
        let mut publisher = from.connect("/ws");
        publisher.subscribe(room);
        let mut subscriber = to.connect("/ws");
        subscriber.subscribe(room);
        Pair {
            publisher,
            subscriber,
            room: room.into(),
            n: 0,
        }
    }

    /// Publish numbered messages every 50 ms until one reaches the other node; the time it
    /// took. Messages that did not cross are skipped (each publish is seen by its own
    /// publisher, so nothing piles up unread).
    fn crossing_within(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            self.n += 1;
            let n = self.n;
            self.publisher
                .send_json(json!({"type": "publish", "room": self.room, "data": {"n": n}}));
            assert_eq!(self.publisher.expect_type("message")["data"]["n"], n);
            let deadline = Instant::now() + Duration::from_millis(50);
            while Instant::now() < deadline {
                match self.subscriber.next_event(Duration::from_millis(10)) {
                    common::Event::Json(v) if v["type"] == "message" && v["data"]["n"] == n => {
                        return start.elapsed();
                    }
                    _ => {}
                }
            }
            assert!(
                start.elapsed() < within,
                "no message crossed nodes within {within:?}"
            );
        }
    }

    /// A message published now reaches the publisher (local delivery never stops).
    fn local_still_delivers(&mut self) {
        self.n += 1;
        let n = self.n;
        self.publisher
            .send_json(json!({"type": "publish", "room": self.room, "data": {"n": n}}));
        assert_eq!(self.publisher.expect_type("message")["data"]["n"], n);
    }
}

fn assert_no_panic(nodes: &[&TestServer]) {
    for n in nodes {
        let logs = n.logs();
        assert!(!logs.contains("panicked"), "a node panicked:\n{logs}");
    }
}

#[test]
fn redis_killed_and_restarted() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = node(&url, &[]);
    let b = node(&url, &[]);
    let mut p = Pair::new(&a, &b, "k");
    p.crossing_within(Duration::from_secs(3));

    redis.kill();
    wait_ready_is(&a, 503, Duration::from_secs(5));
    wait_ready_is(&b, 503, Duration::from_secs(5));
    p.local_still_delivers();

    redis.restart();
    let back = Instant::now();
    wait_ready_is(&a, 200, Duration::from_secs(3));
    wait_ready_is(&b, 200, Duration::from_secs(3));
    p.crossing_within(Duration::from_secs(3));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    assert!(counter(&a, "switchboard_redis_reconnects_total") >= 2);
    assert_no_panic(&[&a, &b]);
}

#[test]
fn redis_stopped_for_five_seconds() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = node(&url, &[]);
    let b = node(&url, &[]);
    let mut p = Pair::new(&a, &b, "s");
    p.crossing_within(Duration::from_secs(3));

    redis.freeze();
    let frozen = Instant::now();
    // Traffic while frozen: the publisher's pipeline times out, the canary stays away.
    p.local_still_delivers();
    wait_ready_is(&a, 503, Duration::from_secs(4));
    wait_ready_is(&b, 503, Duration::from_secs(4));
    p.local_still_delivers();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(frozen.elapsed()));

    redis.thaw();
    let back = Instant::now();
    p.crossing_within(Duration::from_secs(3));
    wait_ready_is(&a, 200, Duration::from_secs(3));
    wait_ready_is(&b, 200, Duration::from_secs(3));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    assert_no_panic(&[&a, &b]);
}

#[test]
fn the_path_to_redis_cut_then_swallowing() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&format!("127.0.0.1:{}", redis.port()));
    let a = node(&redis.url(), &[]);
    let via = format!("redis://{}", proxy.addr());
    // A command timeout longer than the canary's: the deaf subscription is found by the
    // canary, not by a publish timing out.
    let b = node(&via, &[("SWITCHBOARD_REDIS_TIMEOUT", "3s")]);
    let mut ab = Pair::new(&a, &b, "p1");
    let mut ba = Pair::new(&b, &a, "p2");
    ab.crossing_within(Duration::from_secs(3));
    ba.crossing_within(Duration::from_secs(3));

    // Cut: B's connections are reset and reconnects refused.
    proxy.cut();
    wait_ready_is(&b, 503, Duration::from_secs(3));
    assert_eq!(ready(&a), 200, "A's own path is fine");
    ba.local_still_delivers();
    proxy.heal();
    let back = Instant::now();
    ab.crossing_within(Duration::from_secs(3));
    ba.crossing_within(Duration::from_secs(3));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    wait_ready_is(&b, 200, Duration::from_secs(3));

    // Swallow: B's connections stay open and deliver nothing. The canary notices (B's
    // subscription is deaf) even while no room traffic flows.
    let missed = counter(&b, "switchboard_redis_canary_missed_total");
    proxy.swallow();
    wait_ready_is(&b, 503, Duration::from_secs(4));
    assert!(counter(&b, "switchboard_redis_canary_missed_total") > missed);
    ba.local_still_delivers();
    proxy.heal();
    let back = Instant::now();
    ab.crossing_within(Duration::from_secs(3));
    ba.crossing_within(Duration::from_secs(3));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    wait_ready_is(&b, 200, Duration::from_secs(3));
    assert_no_panic(&[&a, &b]);
}

/// (dropped, failed, queued) since `before` once they account for all `sent` envelopes, or
/// after 5 s. A pipeline the publisher wrote before it saw Redis go is counted (failed) only
/// when its error or `redis_timeout` (2 s) arrives: until then its envelopes are in none of
/// the three.
fn accounted(a: &TestServer, before: (u64, u64, u64), sent: u64) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dropped = counter(a, "switchboard_redis_dropped_total") - before.0;
        let failed = counter(a, "switchboard_redis_publish_failed_total") - before.1;
        let queued = counter(a, "switchboard_redis_queued");
        if dropped + failed + queued.saturating_sub(before.2) == sent || Instant::now() > deadline {
            return (dropped, failed, queued);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_queue_for_redis_is_bounded_and_its_drops_counted() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = node(
        &url,
        &[
            ("SWITCHBOARD_REDIS_QUEUE_MAX", "1024"),
            ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
            ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
        ],
    );
    let mut publisher = a.connect("/ws");
    publisher.subscribe("q");
    redis.kill();
    wait_ready_is(&a, 503, Duration::from_secs(5));
    let dropped_before = counter(&a, "switchboard_redis_dropped_total");
    let failed_before = counter(&a, "switchboard_redis_publish_failed_total");
    let queued_before = counter(&a, "switchboard_redis_queued");
    const SENT: u64 = 3000;
    for n in 0..SENT {
        publisher.send_json(json!({"type": "publish", "room": "q", "data": n}));
        assert_eq!(publisher.expect_type("message")["data"], n);
    }
    // Every publish was queued (up to the bound), or dropped and counted, or in the pipeline
    // that found the connection dead (counted as failed).
    let (dropped, failed, queued) =
        accounted(&a, (dropped_before, failed_before, queued_before), SENT);
    assert_eq!(queued, 1024, "queued {queued}");
    assert_eq!(
        dropped + failed + (queued - queued_before),
        SENT,
        "dropped {dropped}, failed {failed}"
    );
    // Once Redis is back the queue drains.
    redis.restart();
    wait_ready_is(&a, 200, Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while counter(&a, "switchboard_redis_queued") != 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_panic(&[&a]);
}

#[test]
fn a_node_killed_leaves_the_others_serving() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = node(&url, &[]);
    let b = node(&url, &[]);
    let mut c = node(&url, &[]);
    let mut p = Pair::new(&a, &b, "n");
    let mut on_c = c.connect("/ws");
    on_c.subscribe("n");
    p.crossing_within(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !redis
        .cmd(&["PUBSUB", "NUMSUB", "sb:{room:n}"])
        .trim_end()
        .ends_with('3')
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill();
    // Its subscriptions go with its connections; the others go on.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !redis
        .cmd(&["PUBSUB", "NUMSUB", "sb:{room:n}"])
        .trim_end()
        .ends_with('2')
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    p.crossing_within(Duration::from_secs(3));
    assert_eq!((ready(&a), ready(&b)), (200, 200));
    assert_no_panic(&[&a, &b]);
}

#[test]
fn the_queue_for_redis_is_bounded_in_bytes_too() {
    // 1 MiB of queue and 16 KiB messages: about 64 wait while Redis is away, the rest are
    // dropped and counted; the count bound (65,536) is never reached.
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = node(
        &url,
        &[
            ("SWITCHBOARD_REDIS_QUEUE_BYTES_MAX", "1MiB"),
            ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
            ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
        ],
    );
    let mut publisher = a.connect("/ws");
    publisher.subscribe("qb");
    redis.kill();
    wait_ready_is(&a, 503, Duration::from_secs(5));
    let dropped_before = counter(&a, "switchboard_redis_dropped_total");
    let failed_before = counter(&a, "switchboard_redis_publish_failed_total");
    let big = "x".repeat(16 * 1024);
    const SENT: u64 = 200;
    for n in 0..SENT {
        publisher.send_json(json!({"type": "publish", "room": "qb", "data": {"n": n, "pad": big}}));
        assert_eq!(publisher.expect_type("message")["data"]["n"], n);
    }
    let (dropped, failed, queued) = accounted(&a, (dropped_before, failed_before, 0), SENT);
    assert!((50..=64).contains(&queued), "queued {queued}");
    assert_eq!(
        dropped + failed + queued,
        SENT,
        "dropped {dropped}, failed {failed}"
    );
    redis.restart();
    wait_ready_is(&a, 200, Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while counter(&a, "switchboard_redis_queued") != 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_panic(&[&a]);
}
