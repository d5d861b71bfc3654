//! `switchboard doctor` end to end: the real binary on this machine's real limits, plus limits
//! lowered with `prlimit` to show the blocking path. Exit codes: 0 nothing blocks, 1 something
//! blocks, 2 bad usage.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Hard RLIMIT_NOFILE of this test process from /proc/self/limits (None = unlimited/unknown).
fn nofile_hard() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

fn doctor(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("doctor")
        .args(args)
        .output()
        .expect("run switchboard doctor")
}

/// Run doctor under `prlimit --nofile=soft:hard` (util-linux), as an operator would.
fn doctor_with_nofile(soft: u64, hard: u64, args: &[&str]) -> Output {
    Command::new("prlimit")
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
    assert!(out.contains("fd limits allow 0 connections now"), "{out}");
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
    assert_eq!(findings.len(), 10);
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
    assert_eq!(v["max_connections_by_fd"], 0);
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
