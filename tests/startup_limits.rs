//! The server's start-up limit check: it raises its soft fd limit to the hard limit, warns when
//! max_connections cannot be reached, refuses to start with `--strict`, and exports the limits
//! as `switchboard_limit_*` metrics.

mod common;

use std::process::Command;
use std::time::Duration;

use common::TestServer;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn strict_refuses_a_max_connections_the_fd_limit_cannot_reach() {
    let port = free_port().to_string();
    let out = Command::new("prlimit")
        .args([
            "--nofile=256:256",
            "--",
            BIN,
            "--strict",
            "--max-connections",
            "1000",
        ])
        .env("SWITCHBOARD_HOST", "127.0.0.1")
        .env("SWITCHBOARD_PORT", &port)
        .env("SWITCHBOARD_SHARDS", "2")
        .output()
        .expect("run prlimit (util-linux) with switchboard");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("max_connections 1000 cannot be reached"),
        "{err}"
    );
    assert!(err.contains("RLIMIT_NOFILE soft 256 hard 256"), "{err}");
    assert!(
        err.contains("switchboard doctor --connections 1000"),
        "{err}"
    );
}

#[test]
fn without_strict_it_warns_and_serves() {
    let port = free_port().to_string();
    let child = Command::new("prlimit")
        .args(["--nofile=256:256", "--", BIN, "--max-connections", "1000"])
        .env("SWITCHBOARD_HOST", "127.0.0.1")
        .env("SWITCHBOARD_PORT", &port)
        .env("SWITCHBOARD_SHARDS", "2")
        .env("SWITCHBOARD_PIN_CORES", "false")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run prlimit (util-linux) with switchboard");
    // Wait until it answers, then stop it and read its warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    sigterm(child.id());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("max_connections 1000 cannot be reached"),
        "{err}"
    );
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn soft_limit_is_raised_to_hard_and_limits_are_metrics() {
    let server = TestServer::start(&[]);
    let (status, body) = server.http_get("/metrics");
    assert_eq!(status, 200);
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap();
    let soft_line = body
        .lines()
        .find(|l| l.starts_with("switchboard_limit_nofile_soft "))
        .unwrap_or_else(|| panic!("no switchboard_limit_nofile_soft in:\n{body}"));
    if hard != "unlimited" {
        assert_eq!(
            soft_line,
            format!("switchboard_limit_nofile_soft {hard}"),
            "soft was not raised to hard"
        );
    }
    assert!(body.contains("switchboard_max_connections "), "{body}");
}

/// One fd reserve everywhere: the derived max_connections the server uses and logs is the
/// `switchboard_limit_max_connections` gauge, soft limit minus `limits::fd_reserve(shards)`.
#[test]
fn one_fd_reserve_for_the_limit_and_the_gauge() {
    let server = TestServer::start(&[]);
    let (status, body) = server.http_get("/metrics");
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    };
    let soft = value("switchboard_limit_nofile_soft");
    let shards: usize = common::SHARDS.parse().unwrap();
    let expected = soft - switchboard::limits::fd_reserve(shards);
    assert_eq!(value("switchboard_max_connections"), expected);
    assert_eq!(value("switchboard_limit_max_connections"), expected);
}
