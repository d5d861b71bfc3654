//! `switchboard doctor`'s Redis check end to end: the real binary, configured through
//! `SWITCHBOARD_REDIS_URL` like the server, against real `redis-server`s of the harness
//! (`tests/common/redis.rs`): Redis's default pubsub output-buffer limit warns with the remedy,
//! and the remedy applied (or a good limit from the start) passes; an `allkeys-*` eviction
//! policy warns; a CONFIG a managed Redis refuses "could not be read"; an unreachable, frozen or
//! wrongly authenticated Redis blocks (exit 1), within the configured timeout; the password is
//! never printed; with `redis_cluster` every master of a three-master cluster is checked.
mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const PASSWORD: &str = "s3cret-Pa55word";

/// `switchboard doctor --connections 1000 [extra]` with only `env` as its configuration
/// (nothing of the caller's SWITCHBOARD_*, WEBSOCKET_* or the replaced services' variables).
fn doctor(env: &[(&str, &str)], extra: &[&str]) -> (Output, String) {
    let mut cmd = Command::new(BIN);
    common::hermetic(&mut cmd);
    cmd.args(["doctor", "--connections", "1000"]).args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run switchboard doctor");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    (o, out)
}

fn doctor_url(url: &str) -> (Output, String) {
    doctor(&[("SWITCHBOARD_REDIS_URL", url)], &[])
}

/// The table rows of check `name`.
fn rows<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let pat = format!(" {name} ");
    out.lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| l.contains(&pat))
        .collect()
}

/// The one table row of check `name`.
fn row<'a>(out: &'a str, name: &str) -> &'a str {
    match rows(out, name)[..] {
        [r] => r,
        ref other => panic!("{} rows for {name}: {other:?}\n{out}", other.len()),
    }
}

const REMEDY: &str = "CONFIG SET client-output-buffer-limit \"pubsub 256mb 64mb 60\"";
const CONF_LINE: &str =
    "echo 'client-output-buffer-limit pubsub 256mb 64mb 60' >> /etc/redis/redis.conf";

#[test]
fn the_default_pubsub_limit_warns_and_the_remedy_clears_it() {
    let r = RedisServer::start();
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "warnings only:\n{out}");
    assert!(
        out.contains(&format!(
            "redis: redis://127.0.0.1:{} (redis_cluster false",
            r.port()
        )),
        "{out}"
    );
    let addr = format!("127.0.0.1:{}", r.port());
    let obuf = row(&out, "redis client-output-buffer-limit");
    assert!(obuf.starts_with("WARN "), "{obuf}");
    assert!(
        obuf.contains(&format!("{addr}: pubsub 32mb 8mb 60")),
        "{obuf}"
    );
    assert!(
        out.contains("[WARN] redis client-output-buffer-limit: this is Redis's default"),
        "{out}"
    );
    assert!(
        out.contains(&format!("redis-cli -h 127.0.0.1 -p {} {REMEDY}", r.port())),
        "{out}"
    );
    assert!(out.contains(CONF_LINE), "{out}");
    for ok in [
        "redis PING",
        "redis version",
        "redis maxmemory-policy",
        "redis cluster",
    ] {
        assert!(row(&out, ok).starts_with("OK "), "{ok}:\n{out}");
    }
    assert!(row(&out, "redis version").contains(": 7."), "{out}");

    // The remedy as printed, applied: the warning is gone.
    assert_eq!(
        r.cmd(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 256mb 64mb 60"
        ]),
        "OK"
    );
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "{out}");
    let obuf = row(&out, "redis client-output-buffer-limit");
    assert!(obuf.starts_with("OK "), "{obuf}");
    assert!(
        obuf.contains(&format!("{addr}: pubsub 256mb 64mb 60")),
        "{obuf}"
    );
    assert!(!out.contains("[WARN] redis"), "{out}");
    assert!(!out.contains(REMEDY), "{out}");
}

#[test]
fn a_good_limit_from_the_start_passes() {
    let r = RedisServer::start_with(&[("client-output-buffer-limit", "pubsub 512mb 128mb 120")]);
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        row(&out, "redis client-output-buffer-limit").starts_with("OK "),
        "{out}"
    );
    assert!(out.contains("pubsub 512mb 128mb 120"), "{out}");
    assert!(!out.contains("[WARN] redis"), "{out}");
}

#[test]
fn allkeys_eviction_under_maxmemory_warns() {
    let r = RedisServer::start_with(&[
        ("client-output-buffer-limit", "pubsub 256mb 64mb 60"),
        ("maxmemory", "64mb"),
        ("maxmemory-policy", "allkeys-lru"),
    ]);
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "{out}");
    let mm = row(&out, "redis maxmemory-policy");
    assert!(mm.starts_with("WARN "), "{mm}");
    assert!(mm.contains("maxmemory 64mb, allkeys-lru"), "{mm}");
    assert!(out.contains("history streams"), "{out}");
    assert!(
        out.contains(&format!(
            "redis-cli -h 127.0.0.1 -p {} CONFIG SET maxmemory-policy noeviction",
            r.port()
        )),
        "{out}"
    );
    r.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-ttl"]);
    let (_, out) = doctor_url(&r.url());
    assert!(
        row(&out, "redis maxmemory-policy").starts_with("OK "),
        "{out}"
    );
}

#[test]
fn a_refused_config_could_not_be_read() {
    // As a managed Redis does: CONFIG renamed away.
    let r = RedisServer::start_args(&["--rename-command", "CONFIG", ""]);
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "{out}");
    for name in ["redis client-output-buffer-limit", "redis maxmemory-policy"] {
        let line = row(&out, name);
        assert!(line.starts_with("WARN "), "{line}");
        assert!(line.contains("could not be read"), "{line}");
    }
    assert!(out.contains("unknown command 'CONFIG'"), "{out}");
    assert!(row(&out, "redis PING").starts_with("OK "), "{out}");
}

#[test]
fn the_password_is_used_and_never_printed() {
    let r = RedisServer::start_with(&[("requirepass", PASSWORD)]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", r.port());
    let (o, out) = doctor_url(&url);
    let all = format!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{all}");
    assert!(!all.contains(PASSWORD), "{all}");
    assert!(
        out.contains(&format!("redis: redis://<redacted>@127.0.0.1:{}", r.port())),
        "{out}"
    );
    assert!(row(&out, "redis PING").starts_with("OK "), "{out}");
    // The fix asks for the password instead of printing it.
    assert!(
        out.contains(&format!(
            "redis-cli --askpass -h 127.0.0.1 -p {} {REMEDY}",
            r.port()
        )),
        "{out}"
    );
    let (o, out) = doctor(&[("SWITCHBOARD_REDIS_URL", &url)], &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json is JSON");
    assert!(!out.contains(PASSWORD), "{out}");
    assert!(
        v["redis"]
            .as_str()
            .is_some_and(|s| s.starts_with("redis://<redacted>@127.0.0.1:")),
        "{v}"
    );
    let names: Vec<&str> = v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .filter(|n| n.starts_with("redis "))
        .collect();
    assert_eq!(
        names,
        [
            // Whether TLS is on (here: off, redis://), once for the whole redis_url.
            "redis TLS",
            "redis PING",
            "redis version",
            "redis client-output-buffer-limit",
            "redis maxmemory-policy",
            "redis cluster"
        ]
    );

    // A wrong password blocks, and neither password is printed.
    let wrong = format!("redis://:not-{PASSWORD}@127.0.0.1:{}", r.port());
    let (o, out) = doctor_url(&wrong);
    let all = format!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(!all.contains(PASSWORD), "{all}");
    assert!(row(&out, "redis PING").starts_with("BLOCKING "), "{out}");
    assert!(
        out.contains("[BLOCKING] redis PING: cannot connect"),
        "{out}"
    );
}

#[test]
fn an_unreachable_redis_blocks() {
    let mut r = RedisServer::start();
    let url = r.url();
    r.kill();
    let started = Instant::now();
    let (o, out) = doctor_url(&url);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let ping = row(&out, "redis PING");
    assert!(ping.starts_with("BLOCKING "), "{ping}");
    assert!(ping.contains(": no answer"), "{ping}");
    assert!(out.contains("Connection refused"), "{out}");
    assert!(out.contains("verdict: BLOCKED"), "{out}");
    // Nothing else is asked of a Redis that does not answer.
    assert!(rows(&out, "redis version").is_empty(), "{out}");
}

#[test]
fn a_frozen_redis_blocks_within_redis_timeout() {
    let mut r = RedisServer::start();
    r.freeze();
    let started = Instant::now();
    let (o, out) = doctor(
        &[
            ("SWITCHBOARD_REDIS_URL", &r.url()),
            ("SWITCHBOARD_REDIS_TIMEOUT", "300ms"),
        ],
        &[],
    );
    let took = started.elapsed();
    r.thaw();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(row(&out, "redis PING").starts_with("BLOCKING "), "{out}");
    assert!(out.contains("no reply within redis_timeout 300ms"), "{out}");
}

#[test]
fn without_redis_url_nothing_is_checked() {
    let (o, out) = doctor(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("redis: none configured here"), "{out}");
    assert!(!out.contains("redis PING"), "{out}");
}

#[test]
fn with_redis_cluster_every_master_is_checked() {
    let c = RedisCluster::start(3);
    // One seed is enough: the others come from CLUSTER NODES.
    let (o, out) = doctor(
        &[
            ("SWITCHBOARD_REDIS_URL", &c.node(0).url()),
            ("SWITCHBOARD_REDIS_CLUSTER", "true"),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{out}");
    let cluster = rows(&out, "redis cluster");
    assert_eq!(cluster.len(), 3, "{out}");
    for n in c.nodes() {
        let line = cluster
            .iter()
            .find(|l| l.contains(&format!("127.0.0.1:{}:", n.port())))
            .unwrap_or_else(|| panic!("no row for port {}:\n{out}", n.port()));
        assert!(line.starts_with("OK "), "{line}");
        assert!(line.contains("ok, 16384/16384 slots, 3 masters"), "{line}");
        // Each master has its own limit, and its own fix.
        assert!(
            out.contains(&format!("redis-cli -h 127.0.0.1 -p {} {REMEDY}", n.port())),
            "{out}"
        );
    }
    assert_eq!(rows(&out, "redis client-output-buffer-limit").len(), 3);

    // A cluster node given to a node configured for a single Redis blocks.
    let (o, out) = doctor_url(&c.node(1).url());
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = row(&out, "redis cluster");
    assert!(line.starts_with("BLOCKING "), "{line}");
    assert!(out.contains("SWITCHBOARD_REDIS_CLUSTER=true"), "{out}");
}

/// `tuning/redis.conf`, the fragment the docs give, on a real Redis: every line is accepted and
/// the doctor finds nothing to warn about.
#[test]
fn the_tuning_fragment_passes_the_doctor() {
    let path = format!("{}/tuning/redis.conf", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("tuning/redis.conf");
    let options: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_owned(), v.trim().trim_matches('"').to_owned())
        })
        .collect();
    assert!(options.len() >= 7, "{options:?}");
    let opts: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = RedisServer::start_with(&opts);
    for (k, v) in &options {
        let got = r.cmd(&["CONFIG", "GET", k]);
        let want = match k.as_str() {
            "client-output-buffer-limit" => "pubsub 268435456 67108864 60".to_owned(),
            _ => v.clone(),
        };
        assert!(got.ends_with(&want), "{k}: {got:?}, want {want:?}");
    }
    let (o, out) = doctor_url(&r.url());
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("[WARN] redis"), "{out}");
    assert!(!out.contains("[BLOCKING] redis"), "{out}");
}
