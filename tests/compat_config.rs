//! The replaced services' own configuration, accepted as written (docs/CONFIG.md, "Settings of
//! the services Switchboard replaces"), over the real binary: the messaging service's env and
//! the rooms module's env together start a server on `PORT` that enforces JWT (inferred from
//! `JWT_SECRET`), answers /health with the union of both services' fields, and serves the
//! rooms module's metric names with the right values after traffic. Disagreeing aliases and
//! `WEBSOCKET_ENABLED=false` refuse to start; `switchboard config` names every source.

mod common;

use std::process::Command;

use common::jwt::{self, SECRET};
use common::{metric, now_ms, now_s, parse_rfc3339_ms, TestServer};
use serde_json::{json, Value};

/// The messaging service's environment (its README's table), minus the services it names
/// (DATABASE_URL, REDIS_URL, KAFKA_BROKERS: unit tests in config cover the aliases, and the
/// cluster and store tests the services); the port
/// is given as `PORT` by [`TestServer::start_port_as`].
const MESSAGING_ENV: &[(&str, &str)] = &[
    ("ENVIRONMENT", "production"),
    ("KAFKA_GROUP_ID", "messaging-service"),
    ("JWT_SECRET", SECRET),
];

/// The rooms module's environment (its README's "Environment Variables"), minus
/// WEBSOCKET_PORT (the test's port is random and given as PORT; two aliases of the port
/// that disagree refuse to start, tested below) and WEBSOCKET_HOST=0.0.0.0 (the harness binds
/// 127.0.0.1 natively, which wins; kept here to show that it does).
const ROOMS_ENV: &[(&str, &str)] = &[
    ("WEBSOCKET_ENABLED", "true"),
    ("WEBSOCKET_HOST", "0.0.0.0"),
    ("WEBSOCKET_TIMEOUT", "30s"),
    ("WEBSOCKET_READ_BUFFER_SIZE", "1024"),
    ("WEBSOCKET_WRITE_BUFFER_SIZE", "1024"),
    ("WEBSOCKET_MAX_MESSAGE_SIZE", "512000"),
    ("WEBSOCKET_PING_INTERVAL", "54s"),
    ("WEBSOCKET_PONG_WAIT", "60s"),
    ("WEBSOCKET_WRITE_WAIT", "10s"),
    ("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "10000"),
    ("WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM", "1000"),
];

fn token(sub: &str) -> String {
    jwt::hs256(&json!({"sub": sub, "iat": now_s(), "exp": now_s() + 300}))
}

#[test]
fn the_messaging_and_rooms_env_start_a_jwt_server_on_port() {
    let mut env: Vec<(&str, &str)> = MESSAGING_ENV.to_vec();
    env.extend_from_slice(ROOMS_ENV);
    env.push(("SWITCHBOARD_SERVICE_NAME", "messaging-service"));
    let server = TestServer::start_port_as("PORT", &env);

    // One start-up line per setting without effect; the per-connection buffer sizes did not
    // stop the start.
    let logs = server.logs();
    for line in [
        "config: env WEBSOCKET_ENABLED has no effect here: ",
        "config: env WEBSOCKET_TIMEOUT has no effect here: ",
        "config: env WEBSOCKET_READ_BUFFER_SIZE has no effect here: ",
        "config: env WEBSOCKET_WRITE_BUFFER_SIZE has no effect here: ",
        "config: env ENVIRONMENT has no effect here: ",
        "config: auth_mode jwt (inferred from env JWT_SECRET)",
    ] {
        assert_eq!(logs.matches(line).count(), 1, "{line:?} once in:\n{logs}");
    }
    assert!(
        !logs.contains(SECRET),
        "the secret is never logged:\n{logs}"
    );

    // JWT is enforced: a bad token is refused, a claimed ?user_id= is no identity.
    let r = server.raw_upgrade("/ws?token=not-a-token", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    let anon = server.connect("/ws?user_id=mallory");
    assert_eq!(
        anon.welcome["data"]["user_id"],
        Value::Null,
        "{}",
        anon.welcome
    );
    drop(anon);
    let mut alice = server.connect(&format!("/ws?token={}", token("alice")));
    assert_eq!(
        alice.welcome["data"]["user_id"], "alice",
        "{}",
        alice.welcome
    );
    let mut bob = server.connect(&format!("/ws?token={}", token("bob")));
    assert_eq!(bob.welcome["data"]["user_id"], "bob", "{}", bob.welcome);

    // Traffic: both in one room, one publish, one error frame.
    alice.subscribe("general");
    bob.subscribe("general");
    alice.send_json(json!({"type": "publish", "room": "general", "data": {"n": 1}}));
    bob.expect_type("message");
    bob.send_text("{not json");
    bob.expect_error("invalid JSON format");

    // /health: the rooms module's fields, then the messaging service's, in that order.
    let (status, body) = server.http_get("/health");
    assert_eq!(status, 200, "{body}");
    let head =
        r#"{"status":"healthy","clients":2,"rooms":1,"service":"messaging-service","time":""#;
    assert!(body.starts_with(head), "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let time = v["time"].as_str().expect("time");
    assert!(time.len() == 20 && time.ends_with('Z'), "{time}");
    let ms = parse_rfc3339_ms(time).expect("RFC 3339");
    assert!(now_ms().abs_diff(ms) < 60_000, "{time} is not now");

    // /metrics: the rooms module's names beside the native ones, with the same values.
    let text = server.wait_metrics("the compatibility names after traffic", |t| {
        metric(t, "websocket_clients_total") == Some(2)
            && metric(t, "websocket_rooms_total") == Some(1)
            && metric(t, "switchboard_errors_total{reason=\"invalid_json\"}") == Some(1)
            && metric(t, "websocket_errors_total") == metric(t, "switchboard_errors_total")
            && rate(t) > 0.0
    });
    assert_eq!(metric(&text, "switchboard_clients"), Some(2), "{text}");
    assert_eq!(metric(&text, "switchboard_rooms"), Some(1), "{text}");
    // The error frames: the invalid JSON, and the refused token's (auth_failed).
    assert_eq!(metric(&text, "websocket_errors_total"), Some(2), "{text}");
    assert_eq!(
        metric(&text, "switchboard_errors_total{reason=\"auth_failed\"}"),
        Some(1),
        "{text}"
    );
    // Measured over at least a second, so never more than the frames received in all.
    let frames = metric(&text, "switchboard_frames_in_total").expect("frames_in");
    assert!(rate(&text) <= frames as f64, "{text}");
    for (name, kind) in [
        ("websocket_clients_total", "gauge"),
        ("websocket_rooms_total", "gauge"),
        ("websocket_messages_per_second", "gauge"),
        ("websocket_errors_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name}: {text}"
        );
    }
    let mut carol = server.connect(&format!("/ws?token={}", token("carol")));
    carol.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(carol.expect_type("pong")["id"], 1);
}

fn rate(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("websocket_messages_per_second "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the binary with exactly `env` (nothing inherited) and `args`: (exit code, stdout,
/// stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run switchboard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn settings_that_cannot_mean_anything_here_refuse_to_start() {
    // Two services' names for the port that disagree: both are named.
    let (code, _, err) = run(&[], &[("PORT", "8081"), ("HTTP_PORT", "8086")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("env HTTP_PORT and env PORT") && err.contains("disagree"),
        "{err}"
    );
    // The rooms module turned off.
    let (code, _, err) = run(&[], &[("WEBSOCKET_ENABLED", "false")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("WEBSOCKET_ENABLED") && err.contains("does not start"),
        "{err}"
    );
    // The chat hub's auth on, with nothing to verify tokens with.
    let (code, _, err) = run(&[], &[("AUTH_ENABLED", "true")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("set JWT_SECRET"), "{err}");
}

#[test]
fn switchboard_config_names_where_each_value_came_from() {
    let (code, out, err) = run(
        &["config", "--log-level", "debug"],
        &[
            ("HTTP_PORT", "8086"),
            ("JWT_SECRET", "hunter2-secret"),
            ("AUTH_SERVICE_URL", "http://auth:8080"),
            ("SWITCHBOARD_SHARDS", "2"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "port = 8086  # alias env HTTP_PORT\n",
        "shards = 2  # from env SWITCHBOARD_SHARDS\n",
        "log_level = \"debug\"  # from flag --log-level\n",
        "auth_mode = Jwt  # inferred from env JWT_SECRET\n",
        "jwt_secret = <redacted>  # alias env JWT_SECRET\n",
        "ping_interval = 54s  # default\n",
        "auth_service_url = \"http://auth:8080\"  # alias env AUTH_SERVICE_URL\n",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    assert!(!out.contains("hunter2"), "{out}");
}
