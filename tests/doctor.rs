//! `switchboard doctor` end to end: the real binary on this machine's real limits, plus limits
//! lowered with `prlimit` to show the blocking path. Exit codes: 0 nothing blocks, 1 something
//! blocks, 2 bad usage. Also the binary's other first-run entry points: `help`, `--help`,
//! `--version` and a stray argument.

mod common;

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Hard RLIMIT_NOFILE of this test process from /proc/self/limits (None = unlimited/unknown).
fn nofile_hard() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

fn doctor(args: &[&str]) -> Output {
    common::hermetic(&mut Command::new(BIN))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run switchboard doctor")
}

/// Run doctor under `prlimit --nofile=soft:hard` (util-linux), as an operator would.
fn doctor_with_nofile(soft: u64, hard: u64, args: &[&str]) -> Output {
    common::hermetic(&mut Command::new("prlimit"))
        .arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(BIN)
        .arg("doctor")
        .args(args)
        .output()
        .expect("run prlimit (util-linux) with switchboard doctor")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one fd reserve for one shard per core, as the server and the doctor compute it.
fn reserve_here() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    switchboard::limits::fd_reserve(cores)
}

/// This process holds CAP_SYS_RESOURCE (from /proc/self/status).
fn can_raise_hard_limit() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

#[test]
fn a_thousand_connections_fit_here() {
    let o = doctor(&["--connections", "1000"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("can this machine hold 1000 connections?"),
        "{out}"
    );
    assert!(out.contains("RLIMIT_NOFILE hard"), "{out}");
    assert!(out.contains("verdict: OK"), "{out}");
}

#[test]
fn half_a_million_is_blocked_by_the_fd_limit() {
    // This machine's hard limit is 20000; on a machine allowing more, cap it the same way.
    let o = match nofile_hard() {
        Some(h) if h < 500_000 => doctor(&["--connections", "500000"]),
        _ => doctor_with_nofile(20_000, 20_000, &["--connections", "500000"]),
    };
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("BLOCKING  RLIMIT_NOFILE hard"), "{out}");
    assert!(out.contains("[BLOCKING] RLIMIT_NOFILE hard"), "{out}");
    assert!(out.contains("LimitNOFILE=1048576"), "{out}");
    assert!(
        out.contains("verdict: BLOCKED for 500000 connections"),
        "{out}"
    );
    // The advice fits the privileges it runs with.
    assert_eq!(
        out.contains("an unprivileged process cannot raise its hard fd limit"),
        !can_raise_hard_limit() && !out.contains("runs as root"),
        "{out}"
    );
}

#[test]
fn without_connections_it_checks_what_the_server_would_derive() {
    let o = doctor(&[]);
    let out = stdout(&o);
    assert!(out.contains("is what the server derives here"), "{out}");
    let Some(hard) = nofile_hard().filter(|h| *h < 100_000_000) else {
        return; // unlimited: the target comes from fs.nr_open
    };
    let target = hard - reserve_here();
    assert!(
        out.contains(&format!("can this machine hold {target} connections?")),
        "{out}"
    );
    // The server starts here without a limit warning, so the doctor must not say BLOCKED.
    assert_eq!(o.status.code(), Some(0), "{out}");
}

#[test]
fn a_low_prlimit_blocks_even_a_thousand_and_names_the_fix() {
    let o = doctor_with_nofile(256, 256, &["--connections", "1000"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("[BLOCKING] RLIMIT_NOFILE soft"), "{out}");
    assert!(out.contains("[BLOCKING] RLIMIT_NOFILE hard"), "{out}");
    assert!(
        out.contains("prlimit --pid \"$(pidof switchboard)\" --nofile=1048576:1048576"),
        "{out}"
    );
    // The same fix for soft and hard is printed once.
    assert_eq!(out.matches("LimitNOFILE=").count(), 1, "{out}");
    assert!(
        out.contains("fix: the same as for RLIMIT_NOFILE soft above"),
        "{out}"
    );
    // The reserve is the server's: 64 + 4 per shard, one shard per core.
    let now = 256 - reserve_here();
    assert!(
        out.contains(&format!("fd limits allow {now} connections now")),
        "{out}"
    );
}

#[test]
fn soft_below_target_with_enough_hard_only_warns() {
    let Some(hard) = nofile_hard().filter(|h| *h >= 2_000) else {
        return; // cannot show the difference below 2000 fds
    };
    let o = doctor_with_nofile(256, hard, &["--connections", "1000"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("WARN      RLIMIT_NOFILE soft"), "{out}");
    assert!(
        out.contains("raises its soft limit to the hard limit"),
        "{out}"
    );
}

#[test]
fn json_carries_the_verdicts() {
    let o = doctor(&["--json", "--connections", "1000"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json is JSON");
    assert_eq!(v["connections"], 1000);
    assert_ne!(v["verdict"], "blocking");
    assert!(v["limits"]["nofile_hard"].as_u64().is_some_and(|h| h > 0));
    let findings = v["findings"].as_array().expect("findings array");
    // The limits' ten findings and the I/O backend's.
    assert_eq!(findings.len(), 11);
    assert!(
        findings.iter().any(|f| f["name"] == "I/O backend"),
        "{findings:?}"
    );
    for f in findings {
        assert!(f["name"].is_string(), "{f}");
        let sev = f["severity"].as_str().expect("severity string");
        assert!(["ok", "warn", "blocking"].contains(&sev), "{f}");
        assert!(f["why"].as_str().is_some_and(|w| !w.is_empty()), "{f}");
    }

    let blocked = doctor_with_nofile(256, 256, &["--json", "--connections", "1000"]);
    assert_eq!(blocked.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&blocked.stdout).expect("JSON");
    assert_eq!(v["verdict"], "blocking");
    assert_eq!(v["max_connections_by_fd"], 256 - reserve_here());
    assert_eq!(v["fd_reserve"], reserve_here());
    let hard = v["findings"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == "RLIMIT_NOFILE hard"))
        .expect("RLIMIT_NOFILE hard finding");
    assert_eq!(hard["severity"], "blocking");
    assert!(hard["fix"]
        .as_str()
        .is_some_and(|f| f.contains("LimitNOFILE=")));
}

#[test]
fn bad_usage_exits_two() {
    for args in [
        &["--connections"][..],
        &["--connections", "lots"],
        &["--connections", "0"],
        &["--frobnicate"],
    ] {
        let o = doctor(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("usage: switchboard doctor"),
            "{args:?}"
        );
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    let help = doctor(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("usage: switchboard doctor"));
}

#[test]
fn help_version_and_stray_arguments() {
    let run = |args: &[&str]| {
        common::hermetic(&mut Command::new(BIN))
            .args(args)
            .output()
            .expect("run switchboard")
    };
    for args in [&["help"][..], &["--help"], &["-h"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = stdout(&o);
        assert!(out.starts_with("Usage: switchboard"), "{args:?}: {out}");
        assert!(out.contains("switchboard doctor"), "{out}");
        assert!(o.stderr.is_empty(), "{args:?}");
    }
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o),
        format!("switchboard {}\n", env!("CARGO_PKG_VERSION"))
    );
    for args in [&["serve"][..], &["version"], &["--port", "1", "extra"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("unexpected argument"), "{args:?}: {err}");
    }
}
