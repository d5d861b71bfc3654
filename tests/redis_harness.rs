//! Self-test of the Redis test harness (`tests/common/redis.rs`) against real `redis-server`
//! processes: the options a server runs with, the RESP2 client on every reply kind, pub/sub
//! over two raw connections, kill and restart on the same port, freeze and thaw, and a Redis
//! Cluster of three masters made with `redis-cli --cluster create` (its slots agree with
//! `switchboard::cluster::slot`). Every wait is bounded: a broken harness fails in seconds.
mod common;

use std::ffi::OsString;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::redis::{self, RedisCluster, RedisServer, Resp};

/// A probe that must not be answered (a frozen server) waits this long.
const SILENT: Duration = Duration::from_millis(300);

fn assert_timed_out(r: std::io::Result<Resp>) {
    match r {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected a read timeout, got {other:?}"),
    }
}

#[test]
fn starts_with_the_harness_options_and_answers_ping() {
    let r = RedisServer::start();
    assert_eq!(r.cmd(&["PING"]), "PONG");
    assert_eq!(r.url(), format!("redis://127.0.0.1:{}", r.port()));
    assert_eq!(r.addr().port(), r.port());
    let config = |name: &str| r.cmd_value(&["CONFIG", "GET", name]).pairs();
    assert_eq!(config("port"), [("port".into(), r.port().to_string())]);
    assert_eq!(config("bind"), [("bind".into(), "127.0.0.1".into())]);
    assert_eq!(config("save"), [("save".into(), String::new())]);
    assert_eq!(config("appendonly"), [("appendonly".into(), "no".into())]);
    assert_eq!(
        config("protected-mode"),
        [("protected-mode".into(), "no".into())]
    );
    assert_eq!(config("loglevel"), [("loglevel".into(), "warning".into())]);
    let dir = std::fs::canonicalize(r.dir()).expect("server dir");
    assert_eq!(
        config("dir"),
        [("dir".into(), dir.display().to_string())],
        "runs in its own temporary directory"
    );
    // Redis's default, which the doctor test relies on.
    assert_eq!(
        config("client-output-buffer-limit"),
        [(
            "client-output-buffer-limit".into(),
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60".into()
        )]
    );
    let info = r.cmd(&["INFO", "server"]);
    let version = redis::info_field(&info, "redis_version").expect("redis_version");
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(
        major >= 7,
        "sharded pub/sub needs Redis 7, this is {version}"
    );
    // The log file is the one named on the command line.
    assert!(r.dir().join("redis.log").is_file());
}

#[test]
fn extra_options_apply() {
    let r = RedisServer::start_with(&[
        ("client-output-buffer-limit", "pubsub 256mb 64mb 60"),
        ("maxmemory", "10mb"),
    ]);
    assert_eq!(
        r.cmd(&["CONFIG", "GET", "client-output-buffer-limit"]),
        "client-output-buffer-limit\nnormal 0 0 0 slave 268435456 67108864 60 pubsub 268435456 67108864 60"
    );
    assert_eq!(
        r.cmd(&["CONFIG", "GET", "maxmemory"]),
        "maxmemory\n10485760"
    );
    // A password: the server is up once it says NOAUTH; a connection authenticates itself.
    let r = RedisServer::start_with(&[("requirepass", "pw-1")]);
    assert!(r.cmd(&["PING"]).starts_with("(error) NOAUTH"));
    let mut c = r.connect();
    assert_eq!(
        c.call(&["AUTH", "pw-1"]).unwrap(),
        Resp::Simple("OK".into())
    );
    assert_eq!(c.call(&["PING"]).unwrap(), Resp::Simple("PONG".into()));
    let r = RedisServer::start_args(&["--maxmemory-policy", "allkeys-lru"]);
    assert_eq!(
        r.cmd(&["CONFIG", "GET", "maxmemory-policy"]),
        "maxmemory-policy\nallkeys-lru"
    );
}

#[test]
fn resp_client_reads_every_reply_kind() {
    let r = RedisServer::start();
    assert_eq!(
        r.cmd_value(&["SET", "k", "a\r\nb"]),
        Resp::Simple("OK".into())
    );
    // A bulk string holding CRLF comes back whole.
    assert_eq!(r.cmd_value(&["GET", "k"]), Resp::Bulk(b"a\r\nb".to_vec()));
    assert_eq!(r.cmd_value(&["GET", "missing"]), Resp::Nil);
    assert_eq!(r.cmd(&["GET", "missing"]), "(nil)");
    assert_eq!(r.cmd_value(&["INCR", "n"]), Resp::Int(1));
    assert_eq!(r.cmd_value(&["INCRBY", "n", "-5"]), Resp::Int(-4));
    let e = r.cmd_value(&["NOSUCHCOMMAND"]);
    assert!(e.is_error(), "{e:?}");
    assert!(r
        .cmd(&["NOSUCHCOMMAND"])
        .starts_with("(error) ERR unknown command"));
    // Nested arrays, with integers and a nil inside.
    let reply = r.cmd_value(&["EVAL", "return {1, 'two', {3, false}}", "0"]);
    assert_eq!(
        reply,
        Resp::Array(vec![
            Resp::Int(1),
            Resp::Bulk(b"two".to_vec()),
            Resp::Array(vec![Resp::Int(3), Resp::Nil]),
        ])
    );
    assert_eq!(reply.to_string(), "1\ntwo\n3\n(nil)");
    assert_eq!(
        r.cmd_value(&["LRANGE", "nolist", "0", "-1"]),
        Resp::Array(vec![])
    );
    // A large reply arrives in many reads.
    let big = "x".repeat(1 << 20);
    r.cmd(&["SET", "big", &big]);
    assert_eq!(r.cmd_value(&["GET", "big"]), Resp::Bulk(big.into_bytes()));
    // Pipelined replies on one connection come back in order.
    let mut c = r.connect();
    for i in 0..100 {
        c.send(&["ECHO", &i.to_string()]).unwrap();
    }
    for i in 0..100 {
        assert_eq!(c.read().unwrap(), Resp::Bulk(i.to_string().into_bytes()));
    }
    // Partial input is "not yet", not an error; garbage is an error.
    assert_eq!(redis::parse(b"$5\r\nab", 0).unwrap(), None);
    assert_eq!(redis::parse(b"*2\r\n:1\r\n", 0).unwrap(), None);
    assert!(redis::parse(b"?what\r\n", 0).is_err());
    assert!(redis::parse(b"$3\r\nabcd\r\n", 0).is_err());
    assert_eq!(
        redis::encode_command(&[b"SET", b"k", b""]),
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    );
}

#[test]
fn publish_reaches_a_subscriber_on_another_connection() {
    let r = RedisServer::start();
    let mut sub = r.connect();
    assert_eq!(
        sub.call(&["SUBSCRIBE", "sb:{room:lobby}"]).unwrap(),
        Resp::Array(vec![
            Resp::Bulk(b"subscribe".to_vec()),
            Resp::Bulk(b"sb:{room:lobby}".to_vec()),
            Resp::Int(1),
        ])
    );
    assert_eq!(
        r.cmd_value(&["PUBSUB", "NUMSUB", "sb:{room:lobby}", "other"])
            .pairs(),
        [
            ("sb:{room:lobby}".into(), "1".into()),
            ("other".into(), "0".into())
        ]
    );
    let mut publisher = r.connect();
    assert_eq!(
        publisher
            .call(&["PUBLISH", "sb:{room:lobby}", "hello"])
            .unwrap(),
        Resp::Int(1),
        "one subscriber received it"
    );
    assert_eq!(
        sub.read().unwrap(),
        Resp::Array(vec![
            Resp::Bulk(b"message".to_vec()),
            Resp::Bulk(b"sb:{room:lobby}".to_vec()),
            Resp::Bulk(b"hello".to_vec()),
        ])
    );
    assert_eq!(
        publisher.call(&["PUBLISH", "nobody", "x"]).unwrap(),
        Resp::Int(0)
    );
    sub.set_timeout(SILENT).unwrap();
    assert_timed_out(sub.read());
    let clients = r.cmd(&["CLIENT", "LIST"]);
    assert!(clients.contains("cmd=subscribe"), "{clients}");
}

/// Publish `count` messages of `size` bytes to `channel` (one round trip each), as a busy node's
/// peers would while it stops reading.
fn flood(r: &RedisServer, channel: &str, count: usize, size: usize) {
    let payload = "x".repeat(size);
    let mut publisher = r.connect();
    for _ in 0..count {
        publisher.call(&["PUBLISH", channel, &payload]).unwrap();
    }
}

/// What `switchboard doctor` warns about, shown on Redis itself: with Redis's default
/// `pubsub 32mb 8mb 60` a subscriber that stops reading while 50 MB are published to it is
/// disconnected (what was queued for it is lost); with `pubsub 256mb 64mb 60` it is not, and
/// gets every message once it reads again.
#[test]
fn the_default_pubsub_limit_cuts_a_subscriber_that_stops_reading() {
    const COUNT: usize = 800;
    const SIZE: usize = 64 << 10;
    let numsub = |r: &RedisServer| {
        r.cmd_value(&["PUBSUB", "NUMSUB", "ch"]).pairs()[0]
            .1
            .clone()
    };

    let r = RedisServer::start();
    let mut sub = r.connect();
    sub.call(&["SUBSCRIBE", "ch"]).unwrap();
    flood(&r, "ch", COUNT, SIZE);
    assert_eq!(numsub(&r), "0", "the subscriber was cut");
    assert!(
        r.logs()
            .contains("scheduled to be closed ASAP for overcoming of output buffer limits"),
        "{}",
        r.logs()
    );
    // What the kernel buffers held arrives; then the connection ends, short of 800.
    let mut got = 0;
    while let Ok(Resp::Array(_)) = sub.read() {
        got += 1;
    }
    assert!(got < COUNT, "{got}");

    let r = RedisServer::start_with(&[("client-output-buffer-limit", "pubsub 256mb 64mb 60")]);
    let mut sub = r.connect();
    sub.call(&["SUBSCRIBE", "ch"]).unwrap();
    flood(&r, "ch", COUNT, SIZE);
    assert_eq!(numsub(&r), "1", "the subscriber is still there");
    for i in 0..COUNT {
        match sub.read() {
            Ok(Resp::Array(m)) if m.len() == 3 => {}
            other => panic!("message {i}: {other:?}"),
        }
    }
}

#[test]
fn kill_then_restart_on_the_same_port() {
    let mut r = RedisServer::start();
    let port = r.port();
    let url = r.url();
    r.cmd(&["SET", "k", "v"]);
    let pid = redis::info_field(&r.cmd(&["INFO", "server"]), "process_id").unwrap();
    // A connection open across the kill sees it closed.
    let mut held = r.connect();
    r.kill();
    assert!(!r.running());
    let refused = r.try_cmd(&["PING"], SILENT).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(held.call(&["PING"]).is_err());
    let started = Instant::now();
    r.restart();
    assert!(started.elapsed() < redis::START_TIMEOUT);
    assert!(r.running());
    assert_eq!((r.port(), r.url()), (port, url));
    assert_eq!(r.cmd(&["PING"]), "PONG");
    let new_pid = redis::info_field(&r.cmd(&["INFO", "server"]), "process_id").unwrap();
    assert_ne!(pid, new_pid, "a new process");
    assert_eq!(r.cmd(&["GET", "k"]), "(nil)", "nothing persisted");
    // A second restart while running: kill and start again.
    r.restart();
    assert_eq!(r.cmd(&["PING"]), "PONG");
}

#[test]
fn freeze_times_out_and_thaw_answers_what_waited() {
    let mut r = RedisServer::start();
    let mut c = r.connect();
    assert_eq!(c.call(&["PING"]).unwrap(), Resp::Simple("PONG".into()));
    r.freeze();
    assert!(r.frozen() && r.running());
    // A new connection is accepted by the kernel, but nothing answers.
    assert_timed_out(r.try_cmd(&["PING"], SILENT));
    c.set_timeout(SILENT).unwrap();
    c.send(&["ECHO", "waited"]).unwrap();
    assert_timed_out(c.read());
    r.thaw();
    assert!(!r.frozen());
    c.set_timeout(redis::CMD_TIMEOUT).unwrap();
    assert_eq!(c.read().unwrap(), Resp::Bulk(b"waited".to_vec()));
    assert_eq!(r.cmd(&["PING"]), "PONG");
}

#[test]
fn dropping_a_frozen_server_removes_it() {
    let mut r = RedisServer::start();
    let dir = r.dir().to_path_buf();
    let addr = r.addr();
    r.freeze();
    drop(r);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(redis::command(addr, &["PING"], SILENT).is_err());
}

#[test]
fn a_missing_binary_fails_with_the_install_command() {
    let none =
        redis::find_bin("redis-server", "SWITCHBOARD_TEST_REDIS_SERVER", None, None).unwrap_err();
    assert_eq!(
        none,
        "redis-server not found: apt-get install redis-server (tests/run-all.sh installs it)"
    );
    let empty_path = Some(OsString::from("/nonexistent-dir"));
    assert!(redis::find_bin("redis-server", "X", None, empty_path).is_err());
    let bad = redis::find_bin(
        "redis-server",
        "SWITCHBOARD_TEST_REDIS_SERVER",
        Some("/nonexistent/redis-server".into()),
        std::env::var_os("PATH"),
    )
    .unwrap_err();
    assert!(
        bad.starts_with("SWITCHBOARD_TEST_REDIS_SERVER=/nonexistent/redis-server is not a file"),
        "{bad}"
    );
    assert!(bad.contains("apt-get install redis-server"), "{bad}");
    // The env variable wins over PATH; PATH is searched in order.
    let found = redis::server_bin();
    assert_eq!(
        redis::find_bin("redis-server", "X", Some(found.clone().into()), None),
        Ok(found.clone())
    );
    let dir = found.parent().unwrap().as_os_str().to_owned();
    let mut path = OsString::from("/nonexistent-dir:");
    path.push(&dir);
    assert_eq!(
        redis::find_bin("redis-server", "X", None, Some(path)),
        Ok(found)
    );
    assert!(redis::cli_bin().is_file());
}

#[test]
fn a_three_master_cluster_covers_every_slot() {
    let started = Instant::now();
    let c = RedisCluster::start(3);
    assert!(started.elapsed() < redis::CLUSTER_TIMEOUT);
    assert_eq!(c.len(), 3);
    for n in c.nodes() {
        let info = n.cmd(&["CLUSTER", "INFO"]);
        assert_eq!(
            redis::info_field(&info, "cluster_state").as_deref(),
            Some("ok"),
            "{info}"
        );
        assert_eq!(
            redis::info_field(&info, "cluster_slots_assigned").as_deref(),
            Some("16384"),
            "{info}"
        );
        assert_eq!(
            redis::info_field(&info, "cluster_known_nodes").as_deref(),
            Some("3")
        );
        assert_eq!(
            redis::info_field(&info, "cluster_size").as_deref(),
            Some("3")
        );
    }
    let seeds = c.seeds();
    assert_eq!(seeds.split(',').count(), 3, "{seeds}");
    assert!(seeds
        .split(',')
        .all(|s| s.starts_with("redis://127.0.0.1:")));
    assert_eq!(c.node(0).cmd(&["CLUSTER", "KEYSLOT", "foo"]), "12182");
    // The master of foo's slot takes the key; the others redirect to it.
    let owner = c.master_of_slot(12182);
    assert_eq!(c.node(owner).cmd(&["SET", "foo", "bar"]), "OK");
    for i in (0..3).filter(|&i| i != owner) {
        assert_eq!(
            c.node(i).cmd(&["GET", "foo"]),
            format!("(error) MOVED 12182 127.0.0.1:{}", c.node(owner).port())
        );
    }
    // Every node masters about a third of the slots.
    let mut counts = [0u32; 3];
    for slot in (0..16384).step_by(97) {
        counts[c.master_of_slot(slot)] += 1;
    }
    assert!(counts.iter().all(|&n| n > 40), "{counts:?}");
    // Our CRC16 agrees with Redis on the channel names of src/cluster.rs.
    let channels = switchboard::cluster::Channels::new("sb:");
    for name in [
        channels.room("lobby").to_string(),
        channels.user("u-42").to_string(),
        channels.topic("presence").to_string(),
        channels.all().to_string(),
        channels.node(0xdead_beef).to_string(),
        "no-tag".to_owned(),
        "{}empty-tag".to_owned(),
    ] {
        assert_eq!(
            c.node(0).cmd(&["CLUSTER", "KEYSLOT", &name]),
            switchboard::cluster::slot(name.as_bytes()).to_string(),
            "{name}"
        );
    }
    // Sharded pub/sub: SPUBLISH on the slot's master reaches an SSUBSCRIBE there.
    let ch = channels.room("lobby").to_string();
    let m = c.master_of_slot(switchboard::cluster::slot(ch.as_bytes()));
    let mut sub = c.node(m).connect();
    let reply = sub.call(&["SSUBSCRIBE", &ch]).unwrap();
    assert_eq!(reply.array().map(<[Resp]>::len), Some(3), "{reply:?}");
    assert_eq!(c.node(m).cmd(&["SPUBLISH", &ch, "hi"]), "1");
    assert_eq!(
        sub.read().unwrap(),
        Resp::Array(vec![
            Resp::Bulk(b"smessage".to_vec()),
            Resp::Bulk(ch.clone().into_bytes()),
            Resp::Bulk(b"hi".to_vec()),
        ])
    );
}

#[test]
fn a_killed_cluster_node_fails_the_cluster_and_rejoins_on_restart() {
    let mut c = RedisCluster::start(3);
    c.node_mut(2).kill();
    // After the node timeout the others mark it failed and, without replicas, stop serving.
    c.wait_state(
        "fail",
        Instant::now() + Duration::from_millis(redis::CLUSTER_NODE_TIMEOUT_MS * 5),
    );
    // It comes back on its port and bus port with its nodes.conf; the others clear its FAIL
    // flag after twice the node timeout (Redis's rule for a master with slots).
    c.node_mut(2).restart();
    c.wait_ok();
    // It serves its slots again: a key of one of them is written there.
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| c.master_of_slot(switchboard::cluster::slot(k.as_bytes())) == 2)
        .unwrap();
    assert_eq!(c.node(2).cmd(&["SET", &key, "v"]), "OK");
    assert_eq!(c.node(2).cmd(&["GET", &key]), "v");
}
