//! The I/O backend a node runs on (issue 16), over real sockets: each backend names itself
//! in the start line and in `/metrics`, io_uring with the shard's own send calls
//! (`io_uring_sends: false`, a path the rest of the suite does not take) delivers fan-out and
//! a slow reader's backlog in order, and a kernel that refuses io_uring (here a seccomp filter
//! that fails `io_uring_setup` with EPERM, as Docker's default profile does) leaves a node
//! that serves on epoll, says so in one log line, and a doctor that says why.
//!
//! On a kernel that refuses io_uring outright, the io_uring tests check the fallback instead
//! and say so; they fail there only with SB_REQUIRE_IO_URING=1 (tests/run-all.sh's rule).

mod common;

use common::TestServer;
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// The `switchboard_io_backend` line of a scrape.
fn backend_metric(s: &TestServer) -> String {
    let (status, text) = s.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("# TYPE switchboard_io_backend gauge"),
        "{text}"
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("switchboard_io_backend{"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].to_string()
}

/// The `switchboard listening` line's `io=` field.
fn logged_backend(s: &TestServer) -> String {
    let logs = s.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("switchboard listening"))
        .unwrap_or_else(|| panic!("no listening line:\n{logs}"));
    let at = line
        .find(" io=\"")
        .unwrap_or_else(|| panic!("no io= field: {line}"));
    let rest = &line[at + 5..];
    rest[..rest.find('"').expect("closing quote")].to_string()
}

/// Whether the node fell back (the kernel refused io_uring); panics when that is not allowed.
fn refused_here(s: &TestServer) -> bool {
    let logs = s.logs();
    let refused = logs.contains("io_backend io_uring:");
    if refused {
        let required = std::env::var("SB_REQUIRE_IO_URING").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "SB_REQUIRE_IO_URING=1 but this kernel refused io_uring:\n{logs}"
        );
        eprintln!("this kernel refuses io_uring: checking the fallback to epoll instead");
    }
    refused
}

#[test]
fn epoll_names_itself_in_the_log_and_the_metrics() {
    let s = TestServer::start(&[("SWITCHBOARD_IO_BACKEND", "epoll")]);
    assert_eq!(logged_backend(&s), "epoll");
    assert_eq!(
        backend_metric(&s),
        "switchboard_io_backend{backend=\"epoll\",sends=\"syscall\"} 1"
    );
    assert!(!s.logs().contains("io_backend io_uring:"), "{}", s.logs());
}

#[test]
fn io_uring_names_itself_and_its_sends() {
    for (sends, label) in [("true", "ring"), ("false", "syscall")] {
        let s = TestServer::start(&[
            ("SWITCHBOARD_IO_BACKEND", "io_uring"),
            ("SWITCHBOARD_IO_URING_SENDS", sends),
        ]);
        if refused_here(&s) {
            assert_eq!(logged_backend(&s), "epoll");
            continue;
        }
        assert_eq!(logged_backend(&s), "io_uring");
        assert_eq!(
            backend_metric(&s),
            format!("switchboard_io_backend{{backend=\"io_uring\",sends=\"{label}\"}} 1")
        );
    }
}

/// Fan-out on io_uring with syscall sends: every subscriber gets every frame in order, a
/// reader with a 4 KiB receive buffer that reads late included (its backlog waits in the send
/// queue and drains by the shard's own writes as the socket turns writable).
#[test]
fn io_uring_with_syscall_sends_delivers_fan_out_and_a_late_readers_backlog_in_order() {
    // An 8 KiB send buffer (16 KiB as the kernel counts it) on every server socket: the late
    // reader's 400 KiB cannot fit in its socket's buffers, so its backlog can reach it only
    // through the path under test (a send that returns EAGAIN, the one-shot POLLOUT poll,
    // the shard's own writes as room comes), never by the kernel buffering it all.
    let s = TestServer::start(&[
        ("SWITCHBOARD_IO_BACKEND", "io_uring"),
        ("SWITCHBOARD_IO_URING_SENDS", "false"),
        ("SWITCHBOARD_SO_SNDBUF", "8192"),
        ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "100000"),
    ]);
    let refused = refused_here(&s);
    let mut readers: Vec<_> = (0..3).map(|_| s.connect("/ws")).collect();
    let mut late = s.connect_small_rcvbuf("/ws", 4096);
    for r in readers.iter_mut() {
        r.subscribe("u");
    }
    late.subscribe("u");
    let mut publisher = s.connect("/ws");
    publisher.subscribe("u");
    // 200 frames of ~2 KiB: 400 KiB, far past the late reader's socket buffers, under the
    // default send_queue_bytes_max.
    let pad = "x".repeat(2000);
    const FRAMES: u64 = 200;
    for seq in 0..FRAMES {
        publisher
            .send_json(json!({"type": "publish", "room": "u", "data": {"seq": seq, "pad": pad}}));
    }
    let check = |c: &mut common::Client, who: &str| {
        for seq in 0..FRAMES {
            let v: Value = c.expect_type("message");
            assert_eq!(v["room"], "u", "{who}: {v}");
            assert_eq!(v["data"]["seq"], seq, "{who}");
            assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(2000), "{who}");
        }
    };
    check(&mut publisher, "publisher");
    for (i, r) in readers.iter_mut().enumerate() {
        check(r, &format!("reader {i}"));
    }
    // The late reader starts reading only now.
    std::thread::sleep(Duration::from_millis(300));
    check(&mut late, "late reader");
    late.expect_silence(200);
    // Still serving.
    publisher.send_json(json!({"type": "ping"}));
    publisher.expect_type("pong");
    if !refused {
        assert_eq!(
            backend_metric(&s),
            "switchboard_io_backend{backend=\"io_uring\",sends=\"syscall\"} 1"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A kernel that refuses io_uring, for real: a seccomp filter on the server process.

/// io_uring_setup's number: 425 on x86_64, aarch64 and every architecture that shares the
/// common table of the syscalls added since 5.1 (alpha alone differs, 535). The filter does
/// not check `seccomp_data.arch`: on an architecture where 425 is something else, the
/// fallback assertions below fail loudly rather than pass.
const SYS_IO_URING_SETUP: u32 = 425;

/// The refusal the node reports under the filter: the seccomp EPERM, or, on a kernel older
/// than 6.0, the version check that comes before any io_uring_setup (then the filter is not
/// what refuses, and the test says so).
fn expected_refusal() -> (String, bool) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    let major: u32 = release
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(6);
    if major < 6 {
        eprintln!("kernel {release} is older than 6.0: checking its fallback, not seccomp's");
        (
            format!("kernel {release} is older than 6.0 (multishot receive)"),
            false,
        )
    } else {
        (
            "io_uring_setup refused: Operation not permitted (os error 1) (kernel.io_uring_disabled, or a seccomp profile)"
                .to_string(),
            true,
        )
    }
}

/// Put the calling process under a seccomp filter that fails `io_uring_setup` with EPERM and
/// allows every other call (what a container runtime's default profile does).
fn deny_io_uring_setup() -> std::io::Result<()> {
    // Classic BPF over `struct seccomp_data` (nr at offset 0).
    // Opcodes as classic BPF composes them: BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20);
    // BPF_JMP (5) | BPF_JEQ (0x10) | BPF_K (0); BPF_RET (6) | BPF_K (0).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 0,
            jf: 1,
            k: SYS_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with these arguments only reads `prog` (alive for the call) and changes
    // this process's own seccomp state; both calls are async-signal-safe, as pre_exec needs.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn under_seccomp(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only prctl.
    unsafe {
        cmd.pre_exec(deny_io_uring_setup);
    }
}

#[test]
fn a_kernel_that_refuses_io_uring_gets_a_node_on_epoll_and_one_line_saying_so() {
    let s = TestServer::start_with_hook(
        "SWITCHBOARD_PORT",
        &[("SWITCHBOARD_IO_BACKEND", "io_uring")],
        &under_seccomp,
    );
    let logs = s.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("io_backend io_uring:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains(" WARN "), "{}", warnings[0]);
    let (reason, _) = expected_refusal();
    assert!(
        warnings[0].contains(&format!("{reason}; the shards run on epoll")),
        "{}",
        warnings[0]
    );
    assert_eq!(logged_backend(&s), "epoll");
    assert_eq!(
        backend_metric(&s),
        "switchboard_io_backend{backend=\"epoll\",sends=\"syscall\"} 1"
    );
    // And it serves.
    let mut a = s.connect("/ws");
    let mut b = s.connect("/ws");
    a.subscribe("r");
    b.subscribe("r");
    a.send_json(json!({"type": "publish", "room": "r", "data": {"n": 1}}));
    for c in [&mut a, &mut b] {
        let v = c.expect_type("message");
        assert_eq!(v["data"], json!({"n": 1}), "{v}");
    }
    let (status, body) = s.http_get("/ready");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn doctor_under_a_refusing_kernel_says_io_uring_would_fall_back_and_how_to_allow_it() {
    let mut cmd = Command::new(BIN);
    common::hermetic(&mut cmd)
        .env("SWITCHBOARD_IO_BACKEND", "io_uring")
        .args(["doctor", "--json", "--connections", "1000"]);
    under_seccomp(&mut cmd);
    let o = cmd.output().expect("run switchboard doctor");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json is JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let f = v["findings"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "I/O backend"))
        .unwrap_or_else(|| panic!("no I/O backend finding: {v}"))
        .clone();
    assert_eq!(f["severity"], "warn", "{f}");
    let (reason, by_seccomp) = expected_refusal();
    assert_eq!(
        f["current"],
        format!("io_uring (io_backend) refused: {reason}"),
        "{f}"
    );
    if by_seccomp {
        assert!(
            f["fix"].as_str().is_some_and(|x| x.contains("seccomp")),
            "{f}"
        );
    }
    // A refused io_uring never blocks the node: it runs on epoll.
    assert_eq!(o.status.code(), Some(0), "{v}");
}
