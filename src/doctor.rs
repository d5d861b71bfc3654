//! `switchboard doctor`: can this machine hold N connections, and if not, what exactly to change.
//!
//! Owns: reading the live limits (getrlimit, `/proc/sys`, `/proc/meminfo`), the pure
//! [`check`] that turns limits and a target connection count into findings (each with why and the
//! exact fix command), raising the soft fd limit at server start ([`raise_nofile_limit`]), the
//! `switchboard_limit_*` Prometheus gauges and the `doctor` CLI. Never touches shards; the server
//! calls [`read_limits`], [`raise_nofile_limit`], [`check`] and [`max_connections_for`] once at
//! start and [`prometheus_lines`] when /metrics is scraped. Only the CLI reads the configuration
//! and opens sockets: when `redis_url` is set it adds the findings of [`redis`] (does that Redis
//! answer, and do its limits suit a cluster) to the table.
//!
//! The memory arithmetic uses [`KERNEL_BYTES_PER_IDLE_SOCKET`], measured on this project's VM with
//! `tuning/measure-kernel-socket-mem`, and the user-space design target
//! [`USER_BYTES_PER_CONNECTION`]. `tuning/README.md` explains every number.
//!
//! The only `unsafe` here is three libc calls (getrlimit, setrlimit, sysconf), each with a
//! `// SAFETY:` line: the rlimit is a process-wide setting the server sets before any shard starts.

use std::fmt::Write as _;

use crate::limits::fd_reserve;

pub mod redis;

/// Kernel bytes held by one idle, established TCP socket on the server end: the `TCP` slab
/// object (~2.5 KB), `sock_inode_cache` (~0.86 KB), `dentry` and `filp` for its fd (~0.2 KB each),
/// its epoll registration (~0.2-0.3 KB) and slab overhead. Measured 2026-11-22 on kernel
/// 6.18.44 (2 vCPU VM) with `tuning/measure-kernel-socket-mem --pairs 8000 --rounds 3`: 8000
/// idle loopback pairs, /proc/meminfo `Slab` delta 3892 B per socket without epoll, 4212 B per
/// server end with its epoll entry; rounded up to 4300 B for planning. Idle sockets charge
/// nothing to `tcp_mem` (the sockstat `mem` delta was 0 pages).
pub const KERNEL_BYTES_PER_IDLE_SOCKET: u64 = 4_300;

/// Server user-space bytes per idle connection: the design target (slab entry, generation,
/// timers, partial-frame state, rooms list head), confirmed in docs/BENCHMARKS.md.
pub const USER_BYTES_PER_CONNECTION: u64 = 1_024;

// File descriptors kept back from the connection budget: [`crate::limits::fd_reserve`], the
// same function the server uses; the doctor assumes one shard per core ([`Limits::cores`]).
// Without `--connections` the target is what the server would derive from these limits
// ([`derived_target`]).

/// Largest accepted `--connections` (a typo guard; far above what one node holds).
pub const TARGET_MAX: u64 = 100_000_000;

/// Accept-queue and SYN-queue sizing for a reconnect storm: this fraction (1/100) of the target
/// connecting within one accept round after a deploy or a network blip...
pub const BACKLOG_TARGET_DIVISOR: u64 = 100;
/// ...but never below this floor, which absorbs ordinary bursts on small nodes.
pub const BACKLOG_FLOOR: u64 = 4_096;

/// Headroom (percent of the requirement) under which a met requirement is still a warning:
/// connection counts fluctuate and other processes share these system-wide budgets.
pub const HEADROOM_PERCENT: u64 = 125;

/// Bytes of `tcp_mem` one connection with data in flight charges: the kernel's forward
/// allocation quantum is one page, and a room broadcast to everyone queues at least one skb per
/// socket at the same moment. Idle sockets charge nothing (see [`KERNEL_BYTES_PER_IDLE_SOCKET`]).
pub const TCP_MEM_BYTES_PER_ACTIVE_SOCKET: u64 = 4_096;

/// The fd limit value the fixes propose: at least this (the usual fs.nr_open default), so a
/// node is not re-tuned for every small change of target.
pub const NOFILE_SUGGESTED_MIN: u64 = 1_048_576;

/// The widest ephemeral port range worth setting on a load generator or proxy (below 1024 are
/// privileged ports that services bind).
pub const PORT_RANGE_WIDE: (u16, u16) = (1024, 65535);

/// Where the sysctl fixes persist their settings (installed by tuning/apply.sh).
const SYSCTL_FILE: &str = "/etc/sysctl.d/99-switchboard.conf";

/// Live limits of this machine, read from getrlimit and /proc/sys (a missing file => None, never a panic).
#[derive(Debug, Clone)]
pub struct Limits {
    /// RLIMIT_NOFILE soft (u64::MAX = unlimited).
    pub nofile_soft: u64,
    /// RLIMIT_NOFILE hard (u64::MAX = unlimited).
    pub nofile_hard: u64,
    /// fs.nr_open: the ceiling for any process's RLIMIT_NOFILE.
    pub nr_open: Option<u64>,
    /// fs.file-max: open files system-wide.
    pub file_max: Option<u64>,
    /// First field of fs.file-nr: file handles allocated now, system-wide.
    pub file_nr: Option<u64>,
    /// net.core.somaxconn: cap on every listen(2) backlog.
    pub somaxconn: Option<u64>,
    /// net.ipv4.tcp_max_syn_backlog: half-open connections per listener.
    pub tcp_max_syn_backlog: Option<u64>,
    /// net.ipv4.ip_local_port_range (first, last).
    pub port_range: Option<(u16, u16)>,
    /// net.ipv4.tcp_mem (low, pressure, high) in pages.
    pub tcp_mem_pages: Option<(u64, u64, u64)>,
    /// net.netfilter.nf_conntrack_max; None when the module is not loaded.
    pub conntrack_max: Option<u64>,
    /// MemAvailable from /proc/meminfo, in bytes.
    pub mem_available_bytes: Option<u64>,
    /// Page size in bytes (tcp_mem is in pages).
    pub page_size: u64,
    /// CPUs this process may run on: the server's shard count by default, so the fd reserve.
    pub cores: usize,
    /// Whether this process could raise its own hard RLIMIT_NOFILE; decides what the advice
    /// about the hard limit says.
    pub privilege: Privilege,
}

/// What this process may do to its hard RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Not root and without CAP_SYS_RESOURCE: the hard limit can only go down.
    Unprivileged,
    /// Effective uid 0 but without CAP_SYS_RESOURCE (a container, usually): no raise either.
    RootWithoutCapability,
    /// CAP_SYS_RESOURCE: the hard limit may be raised up to fs.nr_open.
    CanRaiseHardLimit,
}

/// How a finding bears on the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Severity {
    /// Enough, with headroom.
    Ok,
    /// Works, but is tight or degrades under bursts; act before the next growth step.
    Warn,
    /// The target cannot be reached until this is fixed.
    Blocking,
}

impl Severity {
    fn label(&self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warn => "warn",
            Severity::Blocking => "blocking",
        }
    }
}

/// One checked limit.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The limit's name (sysctl key, rlimit name or meminfo field).
    pub name: &'static str,
    /// Its value now.
    pub current: String,
    /// What the target needs.
    pub required: String,
    pub severity: Severity,
    /// What goes wrong when it is too low, with the arithmetic.
    pub why: String,
    /// Exact shell command(s), one per line; empty when nothing needs doing.
    pub fix: String,
}

/// Read one unsigned number from a /proc file (first whitespace-separated field).
fn read_u64(path: &str) -> Option<u64> {
    read_fields(path)?.first().copied()
}

/// Read all whitespace-separated unsigned numbers from a /proc file; None if missing or malformed.
fn read_fields(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().map(|f| f.parse().ok()).collect()
}

/// From /proc/self/status: CAP_SYS_RESOURCE (bit 24 of `CapEff`) and the effective uid (second
/// field of `Uid:`). Unreadable = unprivileged.
fn read_privilege() -> Privilege {
    const CAP_SYS_RESOURCE: u32 = 24;
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return Privilege::Unprivileged;
    };
    let cap = text
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0);
    let root = text
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    match (cap, root) {
        (true, _) => Privilege::CanRaiseHardLimit,
        (false, true) => Privilege::RootWithoutCapability,
        (false, false) => Privilege::Unprivileged,
    }
}

/// MemAvailable in bytes from /proc/meminfo.
fn read_mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `rlim_t` is u64 on 64-bit Linux and u32 on some 32-bit targets; the cast is a no-op here.
#[allow(clippy::unnecessary_cast)]
const fn rlim_to_u64(v: libc::rlim_t) -> u64 {
    v as u64
}

/// RLIM_INFINITY as the u64 that [`Limits`] holds.
const UNLIMITED: u64 = rlim_to_u64(libc::RLIM_INFINITY);

fn getrlimit_nofile() -> std::io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit struct; getrlimit only writes into it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((rlim_to_u64(rl.rlim_cur), rlim_to_u64(rl.rlim_max)))
}

/// Live limits of this machine, read from getrlimit and /proc/sys (a missing file => None, never a panic).
pub fn read_limits() -> Limits {
    // getrlimit(RLIMIT_NOFILE) cannot fail on Linux with a valid pointer; if it ever does,
    // report 0 so the check says "blocking" rather than guessing a number.
    let (nofile_soft, nofile_hard) = getrlimit_nofile().unwrap_or((0, 0));
    let pair = |v: Vec<u64>| match v.as_slice() {
        [a, b] => Some((u16::try_from(*a).ok()?, u16::try_from(*b).ok()?)),
        _ => None,
    };
    let triple = |v: Vec<u64>| match v.as_slice() {
        [a, b, c] => Some((*a, *b, *c)),
        _ => None,
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Limits {
        nofile_soft,
        nofile_hard,
        nr_open: read_u64("/proc/sys/fs/nr_open"),
        file_max: read_u64("/proc/sys/fs/file-max"),
        file_nr: read_u64("/proc/sys/fs/file-nr"),
        somaxconn: read_u64("/proc/sys/net/core/somaxconn"),
        tcp_max_syn_backlog: read_u64("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        port_range: read_fields("/proc/sys/net/ipv4/ip_local_port_range").and_then(pair),
        tcp_mem_pages: read_fields("/proc/sys/net/ipv4/tcp_mem").and_then(triple),
        conntrack_max: read_u64("/proc/sys/net/netfilter/nf_conntrack_max"),
        mem_available_bytes: read_mem_available(),
        page_size: u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096),
        cores: crate::io::available_cores().clamp(1, crate::limits::SHARDS_MAX),
        privilege: read_privilege(),
    }
}

/// Highest connection count the soft fd limit allows for a node of `shards` shards (soft
/// nofile minus [`fd_reserve`]), as the server derives max_connections.
pub fn max_connections_for(limits: &Limits, shards: usize) -> u64 {
    limits.nofile_soft.saturating_sub(fd_reserve(shards))
}

/// Connections the fd limits allow once the server has raised its soft limit to the hard limit
/// (or to fs.nr_open when the hard limit is unlimited), as [`raise_nofile_limit`] does.
fn max_connections_after_raise(limits: &Limits, reserve: u64) -> u64 {
    let reachable = if limits.nofile_hard == UNLIMITED {
        limits.nr_open.unwrap_or(limits.nofile_soft)
    } else {
        limits.nofile_hard
    };
    reachable.max(limits.nofile_soft).saturating_sub(reserve)
}

/// The target `switchboard doctor` checks without `--connections`: the max_connections a
/// server started here with defaults (one shard per core, `max_connections: 0`) would derive
/// after raising its soft limit. At least 1, at most [`TARGET_MAX`].
pub fn derived_target(limits: &Limits) -> u64 {
    max_connections_after_raise(limits, fd_reserve(limits.cores)).clamp(1, TARGET_MAX)
}

/// setrlimit: raise RLIMIT_NOFILE soft to hard; returns (soft, hard) after.
///
/// An unlimited hard limit is not a valid soft value on Linux (the soft limit may not exceed
/// fs.nr_open), so then the soft limit is raised to fs.nr_open instead.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit_nofile()?;
    let target = if hard == UNLIMITED {
        read_u64("/proc/sys/fs/nr_open").unwrap_or(soft).max(soft)
    } else {
        hard
    };
    if soft < target {
        let rl = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: `rl` is a valid rlimit struct that setrlimit only reads.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    getrlimit_nofile()
}

fn fmt_limit(v: u64) -> String {
    if v == UNLIMITED {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

/// `value` with [`HEADROOM_PERCENT`] added.
fn with_headroom(value: u64) -> u64 {
    value.saturating_mul(HEADROOM_PERCENT) / 100
}

/// `sysctl -w` now plus the line that persists it.
fn sysctl_fix(key: &str, value: &str) -> String {
    format!("sysctl -w {key}='{value}'\necho '{key} = {value}' >> {SYSCTL_FILE}")
}

/// The RLIMIT_NOFILE (and fs.nr_open) value the fixes propose for `target`.
fn nofile_to_set(target: u64, reserve: u64) -> u64 {
    target.saturating_add(reserve).max(NOFILE_SUGGESTED_MIN)
}

fn nofile_fix(target: u64, reserve: u64) -> String {
    let v = nofile_to_set(target, reserve);
    format!(
        "mkdir -p /etc/systemd/system/switchboard.service.d && printf '[Service]\\nLimitNOFILE={v}\\n' > /etc/systemd/system/switchboard.service.d/nofile.conf && systemctl daemon-reload && systemctl restart switchboard   # systemd (tuning/systemd/switchboard.service sets it)\n\
         prlimit --pid \"$(pidof switchboard)\" --nofile={v}:{v}   # a running server, no restart\n\
         ulimit -Hn {v} && ulimit -Sn {v}   # this shell (as root), before starting switchboard by hand\n\
         echo '* - nofile {v}' > /etc/security/limits.d/switchboard.conf   # login sessions (pam_limits)"
    )
}

fn unreadable(name: &'static str, path: &str) -> Finding {
    Finding {
        name,
        current: "unreadable".into(),
        required: "readable".into(),
        severity: Severity::Warn,
        why: format!("{path} could not be read, so this limit was not checked (container or non-Linux /proc?)"),
        fix: format!("cat {path}"),
    }
}

/// Pure: which limits block or threaten `target` connections, with the fd reserve of one shard
/// per core. Memory check uses the kernel bytes per idle socket
/// ([`KERNEL_BYTES_PER_IDLE_SOCKET`]) plus user-space [`USER_BYTES_PER_CONNECTION`] per
/// connection.
pub fn check(limits: &Limits, target: u64) -> Vec<Finding> {
    check_with_fd_reserve(limits, target, fd_reserve(limits.cores))
}

/// [`check`] with a known fd reserve: the server passes [`fd_reserve`] of its shard count.
pub fn check_with_fd_reserve(limits: &Limits, target: u64, fd_reserve: u64) -> Vec<Finding> {
    let mut out = Vec::with_capacity(10);
    let need_fds = target.saturating_add(fd_reserve);
    out.push(check_nofile_soft(limits, target, need_fds, fd_reserve));
    out.push(check_nofile_hard(limits, target, need_fds));
    out.push(check_nr_open(limits, target, need_fds));
    out.push(check_file_max(limits, need_fds));
    let backlog = (target / BACKLOG_TARGET_DIVISOR).max(BACKLOG_FLOOR);
    out.push(check_backlog(
        "net.core.somaxconn",
        limits.somaxconn,
        backlog,
        "caps every listen(2) backlog, including the server's listen_backlog: completed \
         connections wait here until a shard accepts them; when it is full, new connections' \
         final ACKs are dropped and clients retry after 1 s, 3 s, 7 s",
    ));
    out.push(check_backlog(
        "net.ipv4.tcp_max_syn_backlog",
        limits.tcp_max_syn_backlog,
        backlog,
        "bounds half-open connections per listener during a connect storm; past it the kernel \
         falls back to SYN cookies (if net.ipv4.tcp_syncookies=1) or drops SYNs",
    ));
    out.push(check_tcp_mem(limits, target));
    out.push(check_conntrack(limits, target));
    out.push(check_memory(limits, target));
    out.push(check_port_range(limits, target));
    out
}

fn check_nofile_soft(limits: &Limits, target: u64, need: u64, reserve: u64) -> Finding {
    let (severity, why) = if limits.nofile_soft >= need {
        (
            Severity::Ok,
            format!(
                "{target} connections + {} reserved fds fit under the soft limit",
                need - target
            ),
        )
    } else if limits.nofile_hard >= need {
        (
            Severity::Warn,
            format!(
                "soft {} < {need} fds, but the server raises its soft limit to the hard limit ({}) at start",
                fmt_limit(limits.nofile_soft),
                fmt_limit(limits.nofile_hard)
            ),
        )
    } else {
        (
            Severity::Blocking,
            format!(
                "every connection is one fd: the soft limit allows {} connections and cannot be raised past the hard limit ({})",
                limits.nofile_soft.saturating_sub(reserve),
                fmt_limit(limits.nofile_hard)
            ),
        )
    };
    Finding {
        name: "RLIMIT_NOFILE soft",
        current: fmt_limit(limits.nofile_soft),
        required: format!(">= {need}"),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            nofile_fix(target, need - target)
        },
        severity,
        why,
    }
}

fn check_nofile_hard(limits: &Limits, target: u64, need: u64) -> Finding {
    let ok = limits.nofile_hard >= need;
    Finding {
        name: "RLIMIT_NOFILE hard",
        current: fmt_limit(limits.nofile_hard),
        required: format!(">= {need}"),
        severity: if ok { Severity::Ok } else { Severity::Blocking },
        why: if ok {
            "the server can raise its soft limit far enough".into()
        } else {
            let allows = format!(
                "the hard fd limit allows at most {} connections ({} - {} reserved)",
                limits.nofile_hard.saturating_sub(need - target),
                fmt_limit(limits.nofile_hard),
                need - target
            );
            match limits.privilege {
                Privilege::CanRaiseHardLimit => format!(
                    "{allows}; this process has CAP_SYS_RESOURCE, so the limit can be raised here, \
                     but the server only raises its soft limit to the hard one: start it with a \
                     higher hard limit"
                ),
                Privilege::RootWithoutCapability => format!(
                    "{allows}; this process runs as root but without CAP_SYS_RESOURCE (a container?), \
                     so it cannot raise its hard limit: raise it where the process is started \
                     (the container runtime's --ulimit nofile=N:N, systemd LimitNOFILE)"
                ),
                Privilege::Unprivileged => format!(
                    "{allows}; an unprivileged process cannot raise its hard fd limit: raise it as \
                     root for the server's service or login session"
                ),
            }
        },
        fix: if ok {
            String::new()
        } else {
            nofile_fix(target, need - target)
        },
    }
}

fn check_nr_open(limits: &Limits, target: u64, need: u64) -> Finding {
    let name = "fs.nr_open";
    let Some(nr_open) = limits.nr_open else {
        return unreadable(name, "/proc/sys/fs/nr_open");
    };
    let ok = nr_open >= need || limits.nofile_hard >= need;
    Finding {
        name,
        current: nr_open.to_string(),
        required: format!(">= {need}"),
        severity: if ok { Severity::Ok } else { Severity::Blocking },
        why: if ok {
            "no process RLIMIT_NOFILE may exceed fs.nr_open; it is high enough".into()
        } else {
            format!(
                "no process RLIMIT_NOFILE may exceed fs.nr_open ({nr_open}): raise it before LimitNOFILE/prlimit"
            )
        },
        fix: if ok {
            String::new()
        } else {
            sysctl_fix(name, &nofile_to_set(target, need - target).to_string())
        },
    }
}

fn check_file_max(limits: &Limits, need: u64) -> Finding {
    let name = "fs.file-max";
    let Some(file_max) = limits.file_max else {
        return unreadable(name, "/proc/sys/fs/file-max");
    };
    let used = limits.file_nr.unwrap_or(0);
    let free = file_max.saturating_sub(used);
    let severity = if free < need {
        Severity::Blocking
    } else if free < with_headroom(need) {
        Severity::Warn
    } else {
        Severity::Ok
    };
    // Round up to a whole Mi so the suggestion survives small changes of target.
    let suggest = used
        .saturating_add(with_headroom(need))
        .div_ceil(NOFILE_SUGGESTED_MIN)
        .saturating_mul(NOFILE_SUGGESTED_MIN);
    Finding {
        name,
        current: format!("{file_max} ({used} allocated now, {free} free)"),
        required: format!(">= {need} free"),
        why: format!(
            "open files system-wide; past it every open/accept fails with ENFILE for all processes \
             ({need} needed, {free} free)"
        ),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            sysctl_fix(name, &suggest.to_string())
        },
        severity,
    }
}

fn check_backlog(name: &'static str, current: Option<u64>, want: u64, why: &str) -> Finding {
    let Some(v) = current else {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        return unreadable(name, &path);
    };
    let ok = v >= want;
    Finding {
        name,
        current: v.to_string(),
        required: format!(
            ">= {want} (target/{BACKLOG_TARGET_DIVISOR}, floor {BACKLOG_FLOOR})"
        ),
        // A short queue slows a reconnect storm (client retries) but caps no connection count.
        severity: if ok { Severity::Ok } else { Severity::Warn },
        why: format!("{why}; sized for a reconnect storm of 1/{BACKLOG_TARGET_DIVISOR} of the target at once"),
        fix: if ok {
            String::new()
        } else {
            sysctl_fix(name, &want.to_string())
        },
    }
}

fn check_tcp_mem(limits: &Limits, target: u64) -> Finding {
    let name = "net.ipv4.tcp_mem";
    let Some((low, pressure, high)) = limits.tcp_mem_pages else {
        return unreadable(name, "/proc/sys/net/ipv4/tcp_mem");
    };
    let page = limits.page_size.max(1);
    let need = target
        .saturating_mul(TCP_MEM_BYTES_PER_ACTIVE_SOCKET)
        .div_ceil(page);
    let severity = if high < need {
        Severity::Blocking
    } else if pressure < need {
        Severity::Warn
    } else {
        Severity::Ok
    };
    let (s_low, s_pressure) = (low.max(need / 2), pressure.max(need));
    let s_high = high.max(need.saturating_add(need / 2)).max(s_pressure);
    Finding {
        name,
        current: format!(
            "{low} {pressure} {high} pages (high = {})",
            mib(high.saturating_mul(page))
        ),
        required: format!("pressure and high >= {need} pages"),
        why: format!(
            "system-wide budget for TCP socket buffers, in pages: idle sockets charge nothing, \
             but a room broadcast to everyone queues one skb (one {TCP_MEM_BYTES_PER_ACTIVE_SOCKET} B \
             quantum) per socket: {target} x {TCP_MEM_BYTES_PER_ACTIVE_SOCKET} B = {need} pages. Above \
             'pressure' the kernel shrinks buffers; above 'high' sends stall and new buffers fail"
        ),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            sysctl_fix(name, &format!("{s_low} {s_pressure} {s_high}"))
        },
        severity,
    }
}

fn check_conntrack(limits: &Limits, target: u64) -> Finding {
    let name = "net.netfilter.nf_conntrack_max";
    let Some(max) = limits.conntrack_max else {
        return Finding {
            name,
            current: "nf_conntrack not loaded".into(),
            required: format!(">= {target} if loaded"),
            severity: Severity::Ok,
            why: "connection tracking is off, so it caps nothing".into(),
            fix: String::new(),
        };
    };
    let want = with_headroom(target);
    let severity = if max < target {
        Severity::Blocking
    } else if max < want {
        Severity::Warn
    } else {
        Severity::Ok
    };
    Finding {
        name,
        current: max.to_string(),
        required: format!(">= {want} ({target} + {}% for TIME_WAIT/closing entries)", HEADROOM_PERCENT - 100),
        why: "with nf_conntrack loaded every TCP connection is a table entry; when the table is full \
              the kernel drops new connections' packets (dmesg: 'nf_conntrack: table full, dropping packet'). \
              Alternatively exempt the port: iptables -t raw -A PREROUTING -p tcp --dport 8081 -j NOTRACK \
              and iptables -t raw -A OUTPUT -p tcp --sport 8081 -j NOTRACK"
            .into(),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            sysctl_fix(name, &want.max(NOFILE_SUGGESTED_MIN).to_string())
        },
        severity,
    }
}

fn check_memory(limits: &Limits, target: u64) -> Finding {
    let name = "MemAvailable";
    let Some(avail) = limits.mem_available_bytes else {
        return unreadable(name, "/proc/meminfo");
    };
    let per_conn = KERNEL_BYTES_PER_IDLE_SOCKET + USER_BYTES_PER_CONNECTION;
    let need = target.saturating_mul(per_conn);
    let severity = if avail < need {
        Severity::Blocking
    } else if avail < with_headroom(need) {
        Severity::Warn
    } else {
        Severity::Ok
    };
    Finding {
        name,
        current: mib(avail),
        required: format!(">= {} ({}% of {})", mib(with_headroom(need)), HEADROOM_PERCENT, mib(need)),
        why: format!(
            "idle connections cost {target} x ({KERNEL_BYTES_PER_IDLE_SOCKET} B kernel + \
             {USER_BYTES_PER_CONNECTION} B server) = {}; send queues under slow consumers come on top \
             (tuning/README.md). This memory holds {} idle connections",
            mib(need),
            avail / per_conn
        ),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            format!(
                "free -m   # see what holds memory; add RAM or plan at most {} connections per node: switchboard doctor --connections {}",
                avail / per_conn * 100 / HEADROOM_PERCENT,
                avail / per_conn * 100 / HEADROOM_PERCENT
            )
        },
        severity,
    }
}

fn check_port_range(limits: &Limits, target: u64) -> Finding {
    let name = "net.ipv4.ip_local_port_range";
    let Some((first, last)) = limits.port_range else {
        return unreadable(name, "/proc/sys/net/ipv4/ip_local_port_range");
    };
    let ports = u64::from(last.saturating_sub(first)) + 1;
    let source_ips = target.div_ceil(ports);
    // Worth acting on only when the range is narrower than the widest usual one.
    let ok = ports >= target || (first <= PORT_RANGE_WIDE.0 && last >= PORT_RANGE_WIDE.1);
    Finding {
        name,
        current: format!("{first}-{last} ({ports} ports)"),
        required: "load generators and proxies only: one port per connection per (source IP, server ip:port)".into(),
        // The server only accepts: its port range never limits inbound connections.
        severity: if ok { Severity::Ok } else { Severity::Warn },
        why: format!(
            "not a server limit: a client machine or proxy opening {target} connections to one server \
             ip:port needs ceil({target} / {ports}) = {source_ips} source IP(s) at this range"
        ),
        fix: if ok {
            String::new()
        } else {
            format!(
                "# on load generators and proxies in front (not needed on the server):\n{}\n\
                 # and spread the connections over {source_ips} source IPs: ip addr add 10.0.0.N/24 dev eth0 (one per N)",
                sysctl_fix(name, &format!("{} {}", PORT_RANGE_WIDE.0, PORT_RANGE_WIDE.1))
            )
        },
    }
}

/// Append Prometheus gauges (# HELP/# TYPE lines, names switchboard_limit_*) for the limits of
/// a node of `shards` shards. Limits that could not be read are left out.
pub fn prometheus_lines(limits: &Limits, shards: usize, out: &mut String) {
    let mut gauge = |name: &str, help: &str, samples: &[(&str, Option<u64>)]| {
        if samples.iter().all(|(_, v)| v.is_none()) {
            return;
        }
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP switchboard_limit_{name} {help}");
        let _ = writeln!(out, "# TYPE switchboard_limit_{name} gauge");
        for (labels, v) in samples {
            if let Some(v) = v {
                let _ = writeln!(out, "switchboard_limit_{name}{labels} {v}");
            }
        }
    };
    let finite = |v: u64| (v != UNLIMITED).then_some(v);
    gauge(
        "nofile_soft",
        "RLIMIT_NOFILE soft limit of this process (absent when unlimited).",
        &[("", finite(limits.nofile_soft))],
    );
    gauge(
        "nofile_hard",
        "RLIMIT_NOFILE hard limit of this process (absent when unlimited).",
        &[("", finite(limits.nofile_hard))],
    );
    gauge(
        "max_connections",
        "Connections the soft fd limit allows (soft nofile minus the fd reserve of this node's shards).",
        &[("", Some(max_connections_for(limits, shards)))],
    );
    gauge(
        "nr_open",
        "fs.nr_open: ceiling for any RLIMIT_NOFILE.",
        &[("", limits.nr_open)],
    );
    gauge(
        "file_max",
        "fs.file-max: open files system-wide.",
        &[("", limits.file_max)],
    );
    gauge(
        "file_nr",
        "fs.file-nr: file handles allocated system-wide.",
        &[("", limits.file_nr)],
    );
    gauge(
        "somaxconn",
        "net.core.somaxconn: cap on listen backlogs.",
        &[("", limits.somaxconn)],
    );
    gauge(
        "tcp_max_syn_backlog",
        "net.ipv4.tcp_max_syn_backlog: half-open connections per listener.",
        &[("", limits.tcp_max_syn_backlog)],
    );
    let (pf, pl) = match limits.port_range {
        Some((f, l)) => (Some(u64::from(f)), Some(u64::from(l))),
        None => (None, None),
    };
    gauge(
        "ip_local_port_range",
        "net.ipv4.ip_local_port_range bounds.",
        &[("{bound=\"first\"}", pf), ("{bound=\"last\"}", pl)],
    );
    let (lo, pr, hi) = match limits.tcp_mem_pages {
        Some((a, b, c)) => (Some(a), Some(b), Some(c)),
        None => (None, None, None),
    };
    gauge(
        "tcp_mem_pages",
        "net.ipv4.tcp_mem thresholds in pages.",
        &[
            ("{level=\"low\"}", lo),
            ("{level=\"pressure\"}", pr),
            ("{level=\"high\"}", hi),
        ],
    );
    gauge(
        "conntrack_max",
        "net.netfilter.nf_conntrack_max (absent when conntrack is not loaded).",
        &[("", limits.conntrack_max)],
    );
    gauge(
        "mem_available_bytes",
        "MemAvailable from /proc/meminfo.",
        &[("", limits.mem_available_bytes)],
    );
    gauge(
        "page_size_bytes",
        "Page size.",
        &[("", Some(limits.page_size))],
    );
}

const USAGE: &str = "usage: switchboard doctor [--connections N] [--json]\n\
  Checks this machine's limits for N connections (default: what the server would derive from\n\
  the current fd limits, one shard per core), and when the configuration (environment,\n\
  SWITCHBOARD_CONFIG) sets redis_url, that Redis: PING, version, client-output-buffer-limit,\n\
  maxmemory-policy, cluster state.\n\
  Exit status: 0 nothing blocks N, 1 something blocks N (or the configured Redis does not\n\
  answer), 2 bad usage.";

enum Parsed {
    /// `target` None = [`derived_target`].
    Run {
        target: Option<u64>,
        json: bool,
    },
    Help,
}

fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut target = None;
    let mut json = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = match arg.as_str() {
            "--json" => {
                json = true;
                continue;
            }
            "-h" | "--help" => return Ok(Parsed::Help),
            "--connections" => it
                .next()
                .ok_or_else(|| "--connections needs a value".to_string())?
                .as_str(),
            other => match other.strip_prefix("--connections=") {
                Some(v) => v,
                None => return Err(format!("unknown argument '{other}'")),
            },
        };
        target = Some(
            value
                .replace('_', "")
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=TARGET_MAX).contains(n))
                .ok_or_else(|| {
                    format!("--connections must be an integer 1..={TARGET_MAX}, got '{value}'")
                })?,
        );
    }
    Ok(Parsed::Run { target, json })
}

/// Append `s` as a JSON string literal.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_opt(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
}

fn verdict(findings: &[Finding]) -> Severity {
    if findings.iter().any(|f| f.severity == Severity::Blocking) {
        Severity::Blocking
    } else if findings.iter().any(|f| f.severity == Severity::Warn) {
        Severity::Warn
    } else {
        Severity::Ok
    }
}

fn render_json(limits: &Limits, plan: &Plan, findings: &[Finding]) -> String {
    let mut o = String::with_capacity(4096);
    let reserve = fd_reserve(limits.cores);
    let _ = write!(
        o,
        "{{\"connections\":{},\"connections_derived\":{},\"verdict\":\"{}\",\"max_connections_by_fd\":{},\"max_connections_by_fd_after_raise\":{},",
        plan.target,
        plan.derived,
        verdict(findings).label(),
        max_connections_for(limits, limits.cores),
        max_connections_after_raise(limits, reserve)
    );
    let _ = write!(
        o,
        "\"kernel_bytes_per_idle_socket\":{KERNEL_BYTES_PER_IDLE_SOCKET},\"user_bytes_per_connection\":{USER_BYTES_PER_CONNECTION},\"fd_reserve\":{reserve},\"shards\":{},",
        limits.cores
    );
    o.push_str("\"redis\":");
    match &plan.redis {
        Some(r) => json_str(&mut o, r),
        None => o.push_str("null"),
    }
    o.push(',');
    o.push_str("\"limits\":{");
    let finite = |v: u64| (v != UNLIMITED).then_some(v);
    let fields: [(&str, Option<u64>); 9] = [
        ("nofile_soft", finite(limits.nofile_soft)),
        ("nofile_hard", finite(limits.nofile_hard)),
        ("nr_open", limits.nr_open),
        ("file_max", limits.file_max),
        ("file_nr", limits.file_nr),
        ("somaxconn", limits.somaxconn),
        ("tcp_max_syn_backlog", limits.tcp_max_syn_backlog),
        ("conntrack_max", limits.conntrack_max),
        ("mem_available_bytes", limits.mem_available_bytes),
    ];
    for (k, v) in fields {
        let _ = write!(o, "\"{k}\":");
        json_opt(&mut o, v);
        o.push(',');
    }
    o.push_str("\"port_range\":");
    match limits.port_range {
        Some((a, b)) => {
            let _ = write!(o, "[{a},{b}]");
        }
        None => o.push_str("null"),
    }
    o.push_str(",\"tcp_mem_pages\":");
    match limits.tcp_mem_pages {
        Some((a, b, c)) => {
            let _ = write!(o, "[{a},{b},{c}]");
        }
        None => o.push_str("null"),
    }
    let _ = write!(o, ",\"page_size\":{}}},\"findings\":[", limits.page_size);
    for (i, f) in findings.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let fields = [
            ("name", f.name),
            ("severity", f.severity.label()),
            ("current", &f.current),
            ("required", &f.required),
            ("why", &f.why),
            ("fix", &f.fix),
        ];
        o.push('{');
        for (j, (k, v)) in fields.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let _ = write!(o, "\"{k}\":");
            json_str(&mut o, v);
        }
        o.push('}');
    }
    o.push_str("]}");
    o
}

/// What the doctor checks: the target and whether it was derived (no `--connections`).
struct Plan {
    target: u64,
    derived: bool,
    /// The Redis checked (password redacted) and how, when `redis_url` is set.
    redis: Option<String>,
}

fn render_table(limits: &Limits, plan: &Plan, findings: &[Finding]) -> String {
    let mut o = String::with_capacity(4096);
    let target = plan.target;
    let reserve = fd_reserve(limits.cores);
    let _ = writeln!(
        o,
        "switchboard doctor: can this machine hold {target} connections?"
    );
    let _ = writeln!(
        o,
        "fd reserve: {reserve} (64 + 4 per shard x {} shards, one per core)",
        limits.cores
    );
    if plan.derived {
        let _ = writeln!(
            o,
            "({target} is what the server derives here with max_connections: 0, from the fd limit \
             after raising soft to hard, minus the fd reserve; plan for more with --connections N)"
        );
    }
    match &plan.redis {
        Some(r) => {
            let _ = writeln!(o, "redis: {r}");
        }
        None => {
            let _ = writeln!(
                o,
                "redis: none configured here (redis_url is empty in this environment): the node \
                 runs alone; run the doctor with the server's environment to check its Redis"
            );
        }
    }
    let name_w = findings.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let cur_w = findings.iter().map(|f| f.current.len()).max().unwrap_or(0);
    let _ = writeln!(
        o,
        "{:<9} {:<name_w$}  {:<cur_w$}  required",
        "status", "check", "current"
    );
    for f in findings {
        let _ = writeln!(
            o,
            "{:<9} {:<name_w$}  {:<cur_w$}  {}",
            f.severity.label().to_uppercase(),
            f.name,
            f.current,
            f.required
        );
    }
    // The same fix (the fd limit's, for soft and hard) is printed once, at its first finding.
    let mut printed: Vec<(&str, &str)> = Vec::new();
    for f in findings.iter().filter(|f| f.severity != Severity::Ok) {
        let _ = writeln!(
            o,
            "\n[{}] {}: {}",
            f.severity.label().to_uppercase(),
            f.name,
            f.why
        );
        if f.fix.is_empty() {
            continue;
        }
        if let Some((first, _)) = printed.iter().find(|(_, fix)| *fix == f.fix) {
            let _ = writeln!(o, "  fix: the same as for {first} above");
            continue;
        }
        printed.push((f.name, &f.fix));
        let _ = writeln!(o, "  fix:");
        for line in f.fix.lines() {
            let _ = writeln!(o, "    {line}");
        }
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let blocking = count(Severity::Blocking);
    let warn = count(Severity::Warn);
    let head = match verdict(findings) {
        Severity::Blocking => "BLOCKED",
        Severity::Warn => "OK with warnings",
        Severity::Ok => "OK",
    };
    let _ = writeln!(
        o,
        "\nverdict: {head} for {target} connections ({blocking} blocking, {warn} warning); \
         fd limits allow {} connections now, {} once the server raises soft to hard; \
         memory model {KERNEL_BYTES_PER_IDLE_SOCKET} B kernel + {USER_BYTES_PER_CONNECTION} B server \
         per idle connection",
        max_connections_for(limits, limits.cores),
        max_connections_after_raise(limits, reserve)
    );
    o
}

/// The Redis of the configuration (environment, `SWITCHBOARD_CONFIG`, the replaced services'
/// `REDIS_URL`), as the header shows it (password redacted), and the findings of checking it;
/// (None, nothing) when `redis_url` is not set. A configuration that does not load is one warning
/// (the server would refuse it; the Redis check needs it).
fn configured_redis() -> (Option<String>, Vec<Finding>) {
    let cfg = match crate::config::Config::load(&[], &|k| std::env::var(k).ok()) {
        Ok(cfg) => cfg,
        Err(e) => {
            return (
                None,
                vec![Finding {
                    name: "config",
                    current: "does not load".into(),
                    required: "loads".into(),
                    severity: Severity::Warn,
                    why: format!(
                        "{e}: the server would refuse to start with this configuration, and the \
                         Redis check (redis_url) was not run"
                    ),
                    fix: "switchboard config   # every setting and where it came from".into(),
                }],
            )
        }
    };
    let Some(url) = cfg.redis_url.as_deref() else {
        return (None, Vec::new());
    };
    let shown: Vec<String> = url
        .split(',')
        .map(|u| crate::cluster::redact(u.trim()))
        .collect();
    let header = format!(
        "{} (redis_cluster {}; every connect and command bounded by redis_timeout {:?})",
        shown.join(","),
        cfg.redis_cluster,
        cfg.redis_timeout
    );
    (
        Some(header),
        redis::check_configured(
            url,
            cfg.redis_cluster,
            cfg.redis_timeout,
            crate::bridge::redis::tls::RedisTls::from_config(&cfg),
        ),
    )
}

/// The TLS listener of the configuration (`tls_port`): one finding when it is set, from
/// reading and checking `tls_cert_file` and `tls_key_file` as the server does at start and on
/// SIGHUP (Blocking when they would stop the start); nothing when it is off or the
/// configuration does not load (that is [`configured_redis`]'s finding).
fn configured_tls() -> Vec<Finding> {
    let Ok(cfg) = crate::config::Config::load(&[], &|k| std::env::var(k).ok()) else {
        return Vec::new();
    };
    check_tls_listener(&cfg).into_iter().collect()
}

/// The `TLS listener` finding of `cfg` (None when `tls_port` is 0).
pub fn check_tls_listener(cfg: &crate::config::Config) -> Option<Finding> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
        return None;
    };
    if cfg.tls_port == 0 {
        return None;
    }
    let name = "TLS listener";
    Some(match crate::tls::load(cert, key) {
        Ok(_) => Finding {
            name,
            current: format!("tls_port {}: {cert} with {key}", cfg.tls_port),
            required: "a PEM certificate chain and its private key".into(),
            severity: Severity::Ok,
            why: "both files read and the key suits the certificate; SIGHUP reads them again                   (a reload that fails keeps the certificate in use). Each idle TLS connection                   costs more memory than a plain one (docs/OPERATIONS.md, TLS)"
                .into(),
            fix: String::new(),
        },
        Err((k, e)) => Finding {
            name,
            current: format!("tls_port {}: {k}: {e}", cfg.tls_port),
            required: "a PEM certificate chain and its private key".into(),
            severity: Severity::Blocking,
            why: "the server would refuse to start with these files".into(),
            fix: format!(
                "openssl x509 -in {cert} -noout -subject -enddate   # the certificate
                 openssl pkey -in {key} -noout   # the key"
            ),
        },
    })
}

fn configured_io() -> Finding {
    let backend = crate::config::Config::load(&[], &|k| std::env::var(k).ok())
        .map_or(crate::config::Config::default().io_backend, |c| {
            c.io_backend
        });
    check_io_backend(backend, crate::io::uring::probe())
}

/// The `I/O backend` finding: which backend the shards would run on, and why.
pub fn check_io_backend(backend: crate::config::IoBackend, uring: Result<(), String>) -> Finding {
    use crate::config::IoBackend;
    let name = "I/O backend";
    let required = "io_backend epoll, or io_uring on a kernel that allows it".to_string();
    match (backend, uring) {
        (IoBackend::Epoll, Ok(())) => Finding {
            name,
            current: "epoll (io_backend); io_uring is available here too".into(),
            required,
            severity: Severity::Ok,
            why: "the shards run on epoll; io_backend io_uring would run on this kernel".into(),
            fix: String::new(),
        },
        (IoBackend::Epoll, Err(why)) => Finding {
            name,
            current: format!("epoll (io_backend); io_uring is not available: {why}"),
            required,
            severity: Severity::Ok,
            why: "the shards run on epoll".into(),
            fix: String::new(),
        },
        (IoBackend::IoUring, Ok(())) => Finding {
            name,
            current: "io_uring (io_backend)".into(),
            required,
            severity: Severity::Ok,
            why: "the kernel set up a ring with a provided buffer ring: the shards run on io_uring"
                .into(),
            fix: String::new(),
        },
        (IoBackend::IoUring, Err(why)) => Finding {
            name,
            current: format!("io_uring (io_backend) refused: {why}"),
            required,
            severity: Severity::Warn,
            why: "the shards would run on epoll instead (one log line at start says so)".into(),
            fix: "sysctl -w kernel.io_uring_disabled=0   # or allow io_uring_setup/io_uring_enter/io_uring_register in the seccomp profile".into(),
        },
    }
}

/// `switchboard doctor [--connections N] [--json]` (args after "doctor"). Human table by default,
/// --json one JSON object. Exit 0 when nothing blocks N, 1 when something blocks, 2 on bad usage.
/// Default N: [`derived_target`].
pub fn cli_main(args: &[String]) -> i32 {
    let (target, json) = match parse_args(args) {
        Ok(Parsed::Run { target, json }) => (target, json),
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return 0;
        }
        Err(msg) => {
            eprintln!("switchboard doctor: {msg}\n{USAGE}");
            return 2;
        }
    };
    let limits = read_limits();
    let (redis, redis_findings) = configured_redis();
    let plan = Plan {
        target: target.unwrap_or_else(|| derived_target(&limits)),
        derived: target.is_none(),
        redis,
    };
    let mut findings = check(&limits, plan.target);
    findings.extend(redis_findings);
    findings.extend(configured_tls());
    findings.push(configured_io());
    if json {
        println!("{}", render_json(&limits, &plan, &findings));
    } else {
        print!("{}", render_table(&limits, &plan, &findings));
    }
    if verdict(&findings) == Severity::Blocking {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A big, well-tuned machine: 64 GiB available, everything at 4M.
    fn roomy() -> Limits {
        Limits {
            nofile_soft: 4_194_304,
            nofile_hard: 4_194_304,
            nr_open: Some(4_194_304),
            file_max: Some(10_000_000),
            file_nr: Some(2_000),
            somaxconn: Some(65_535),
            tcp_max_syn_backlog: Some(65_535),
            port_range: Some((1024, 65535)),
            tcp_mem_pages: Some((1_000_000, 2_000_000, 4_000_000)),
            conntrack_max: None,
            mem_available_bytes: Some(64 << 30),
            page_size: 4096,
            cores: 4,
            privilege: Privilege::Unprivileged,
        }
    }

    #[test]
    fn the_io_backend_finding_says_what_runs_and_why() {
        use crate::config::IoBackend;
        let f = check_io_backend(IoBackend::IoUring, Ok(()));
        assert_eq!(
            (f.severity, f.current.as_str()),
            (Severity::Ok, "io_uring (io_backend)")
        );
        let f = check_io_backend(
            IoBackend::IoUring,
            Err("io_uring_setup refused: EPERM".into()),
        );
        assert_eq!(f.severity, Severity::Warn);
        assert!(
            f.current.contains("refused: io_uring_setup refused: EPERM"),
            "{}",
            f.current
        );
        assert!(f.why.contains("epoll"), "{}", f.why);
        assert!(f.fix.contains("kernel.io_uring_disabled=0"), "{}", f.fix);
        let f = check_io_backend(IoBackend::Epoll, Err("old kernel".into()));
        assert_eq!(f.severity, Severity::Ok);
        assert!(
            f.current.contains("not available: old kernel"),
            "{}",
            f.current
        );
    }

    /// fd_reserve of [`roomy`]'s 4 cores: 64 + 4 x 4.
    const RESERVE4: u64 = 80;

    fn find<'a>(f: &'a [Finding], name: &str) -> &'a Finding {
        f.iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no finding named {name}"))
    }

    #[test]
    fn tls_listener_row_only_with_tls_port_and_blocking_on_bad_files() {
        let mut cfg = crate::config::Config::default();
        assert!(check_tls_listener(&cfg).is_none());
        cfg.tls_port = 8443;
        cfg.tls_cert_file = Some("/nonexistent/cert.pem".into());
        cfg.tls_key_file = Some("/nonexistent/key.pem".into());
        let f = check_tls_listener(&cfg).expect("a row with tls_port");
        assert_eq!(f.name, "TLS listener");
        assert_eq!(f.severity, Severity::Blocking);
        assert!(f.current.contains("tls_cert_file"), "{}", f.current);
    }

    #[test]
    fn roomy_machine_is_ok_for_one_million() {
        let f = check(&roomy(), 1_000_000);
        assert_eq!(f.len(), 10);
        for x in &f {
            assert_eq!(x.severity, Severity::Ok, "{x:?}");
            assert!(x.fix.is_empty(), "{x:?}");
        }
        assert_eq!(verdict(&f), Severity::Ok);
    }

    #[test]
    fn soft_below_target_but_hard_enough_is_a_warning() {
        let l = Limits {
            nofile_soft: 1024,
            ..roomy()
        };
        let f = check(&l, 100_000);
        assert_eq!(find(&f, "RLIMIT_NOFILE soft").severity, Severity::Warn);
        assert_eq!(find(&f, "RLIMIT_NOFILE hard").severity, Severity::Ok);
        assert_eq!(verdict(&f), Severity::Warn);
    }

    #[test]
    fn hard_below_target_blocks_with_fix() {
        let l = Limits {
            nofile_soft: 20_000,
            nofile_hard: 20_000,
            ..roomy()
        };
        let f = check(&l, 100_000);
        let hard = find(&f, "RLIMIT_NOFILE hard");
        assert_eq!(hard.severity, Severity::Blocking);
        assert!(hard.fix.contains("LimitNOFILE=1048576"), "{}", hard.fix);
        assert!(hard.fix.contains("prlimit"), "{}", hard.fix);
        assert!(hard.why.contains("19920"), "{}", hard.why);
        assert!(hard.why.contains("unprivileged"), "{}", hard.why);
        for (privilege, says) in [
            (Privilege::CanRaiseHardLimit, "has CAP_SYS_RESOURCE"),
            (Privilege::RootWithoutCapability, "runs as root but without"),
        ] {
            let f = check(
                &Limits {
                    privilege,
                    ..l.clone()
                },
                100_000,
            );
            let why = &find(&f, "RLIMIT_NOFILE hard").why;
            assert!(!why.contains("unprivileged"), "{why}");
            assert!(why.contains(says), "{why}");
        }
        assert_eq!(find(&f, "RLIMIT_NOFILE soft").severity, Severity::Blocking);
        // nr_open is high enough, so only the rlimit needs raising.
        assert_eq!(find(&f, "fs.nr_open").severity, Severity::Ok);
    }

    #[test]
    fn fd_budget_edge_is_exact() {
        let l = Limits {
            nofile_soft: 100_000 + RESERVE4,
            nofile_hard: 100_000 + RESERVE4,
            ..roomy()
        };
        assert_eq!(fd_reserve(4), RESERVE4);
        assert_eq!(max_connections_for(&l, 4), 100_000);
        assert_eq!(
            find(&check(&l, 100_000), "RLIMIT_NOFILE hard").severity,
            Severity::Ok
        );
        assert_eq!(
            find(&check(&l, 100_001), "RLIMIT_NOFILE hard").severity,
            Severity::Blocking
        );
        let tiny = Limits {
            nofile_soft: 80,
            ..roomy()
        };
        assert_eq!(max_connections_for(&tiny, 4), 0);
    }

    #[test]
    fn nr_open_blocks_five_million_when_hard_is_too_low() {
        let l = Limits {
            nofile_hard: 1_048_576,
            nr_open: Some(1_048_576),
            ..roomy()
        };
        let f = check(&l, 5_000_000);
        let nr = find(&f, "fs.nr_open");
        assert_eq!(nr.severity, Severity::Blocking);
        assert!(
            nr.fix.starts_with("sysctl -w fs.nr_open='5000080'"),
            "{}",
            nr.fix
        );
        assert!(nr.fix.contains("/etc/sysctl.d/99-switchboard.conf"));
    }

    #[test]
    fn file_max_counts_what_is_already_allocated() {
        let l = Limits {
            file_max: Some(150_000),
            file_nr: Some(60_000),
            ..roomy()
        };
        // 90_000 free < 100_080 needed.
        assert_eq!(
            find(&check(&l, 100_000), "fs.file-max").severity,
            Severity::Blocking
        );
        // 90_000 free >= 75_080 needed but < 125 % of it.
        assert_eq!(
            find(&check(&l, 75_000), "fs.file-max").severity,
            Severity::Warn
        );
        assert_eq!(
            find(&check(&l, 10_000), "fs.file-max").severity,
            Severity::Ok
        );
    }

    #[test]
    fn backlogs_scale_with_target_and_never_block() {
        let l = Limits {
            somaxconn: Some(4096),
            tcp_max_syn_backlog: Some(2048),
            ..roomy()
        };
        let small = check(&l, 1000);
        assert_eq!(find(&small, "net.core.somaxconn").severity, Severity::Ok);
        let syn = find(&small, "net.ipv4.tcp_max_syn_backlog");
        assert_eq!(syn.severity, Severity::Warn);
        assert!(
            syn.fix.contains("net.ipv4.tcp_max_syn_backlog='4096'"),
            "{}",
            syn.fix
        );
        let big = check(&l, 1_000_000);
        let som = find(&big, "net.core.somaxconn");
        assert_eq!(som.severity, Severity::Warn);
        assert!(som.required.contains("10000"), "{}", som.required);
        assert_ne!(verdict(&big), Severity::Blocking);
    }

    #[test]
    fn tcp_mem_pressure_warns_and_high_blocks() {
        let l = Limits {
            tcp_mem_pages: Some((50_000, 80_000, 120_000)),
            ..roomy()
        };
        assert_eq!(
            find(&check(&l, 50_000), "net.ipv4.tcp_mem").severity,
            Severity::Ok
        );
        assert_eq!(
            find(&check(&l, 100_000), "net.ipv4.tcp_mem").severity,
            Severity::Warn
        );
        let f = check(&l, 200_000);
        let t = find(&f, "net.ipv4.tcp_mem");
        assert_eq!(t.severity, Severity::Blocking);
        assert!(
            t.fix.contains("net.ipv4.tcp_mem='100000 200000 300000'"),
            "{}",
            t.fix
        );
        // 16 KiB pages: a quarter of the pages.
        let big_pages = Limits {
            page_size: 16_384,
            ..l
        };
        assert_eq!(
            find(&check(&big_pages, 200_000), "net.ipv4.tcp_mem").severity,
            Severity::Ok
        );
    }

    #[test]
    fn conntrack_only_matters_when_loaded() {
        assert_eq!(
            find(
                &check(&roomy(), 5_000_000),
                "net.netfilter.nf_conntrack_max"
            )
            .severity,
            Severity::Ok
        );
        let l = Limits {
            conntrack_max: Some(262_144),
            ..roomy()
        };
        assert_eq!(
            find(&check(&l, 100_000), "net.netfilter.nf_conntrack_max").severity,
            Severity::Ok
        );
        assert_eq!(
            find(&check(&l, 250_000), "net.netfilter.nf_conntrack_max").severity,
            Severity::Warn
        );
        let f = check(&l, 500_000);
        let c = find(&f, "net.netfilter.nf_conntrack_max");
        assert_eq!(c.severity, Severity::Blocking);
        assert!(
            c.fix.contains("net.netfilter.nf_conntrack_max='1048576'"),
            "{}",
            c.fix
        );
    }

    #[test]
    fn memory_uses_kernel_plus_user_bytes() {
        let per = KERNEL_BYTES_PER_IDLE_SOCKET + USER_BYTES_PER_CONNECTION;
        let l = Limits {
            mem_available_bytes: Some(1_000_000 * per),
            ..roomy()
        };
        assert_eq!(
            find(&check(&l, 1_000_000), "MemAvailable").severity,
            Severity::Warn
        );
        assert_eq!(
            find(&check(&l, 1_000_001), "MemAvailable").severity,
            Severity::Blocking
        );
        assert_eq!(
            find(&check(&l, 800_000), "MemAvailable").severity,
            Severity::Ok
        );
        assert!(find(&check(&l, 1_000_001), "MemAvailable")
            .fix
            .contains("800000"));
    }

    #[test]
    fn port_range_is_never_blocking_and_shows_the_arithmetic() {
        let l = Limits {
            port_range: Some((32768, 60999)),
            ..roomy()
        };
        let f = check(&l, 5_000_000);
        let p = find(&f, "net.ipv4.ip_local_port_range");
        assert_eq!(p.severity, Severity::Warn);
        assert!(p.current.contains("28232 ports"), "{}", p.current);
        // ceil(5_000_000 / 28_232) = 178 source IPs.
        assert!(p.why.contains("178 source IP"), "{}", p.why);
        assert!(
            p.fix.contains("net.ipv4.ip_local_port_range='1024 65535'"),
            "{}",
            p.fix
        );
        assert_eq!(
            find(&check(&l, 20_000), "net.ipv4.ip_local_port_range").severity,
            Severity::Ok
        );
        // Already the widest range: nothing to tune, the arithmetic stays in `why`.
        let wide = check(&roomy(), 5_000_000);
        let p = find(&wide, "net.ipv4.ip_local_port_range");
        assert_eq!(p.severity, Severity::Ok);
        assert!(
            p.why.contains("ceil(5000000 / 64512) = 78 source IP"),
            "{}",
            p.why
        );
    }

    #[test]
    fn missing_proc_files_warn_and_do_not_panic() {
        let l = Limits {
            nr_open: None,
            file_max: None,
            file_nr: None,
            somaxconn: None,
            tcp_max_syn_backlog: None,
            port_range: None,
            tcp_mem_pages: None,
            conntrack_max: None,
            mem_available_bytes: None,
            ..roomy()
        };
        let f = check(&l, 100_000);
        assert_eq!(f.len(), 10);
        assert_eq!(find(&f, "fs.file-max").severity, Severity::Warn);
        assert_eq!(find(&f, "net.core.somaxconn").current, "unreadable");
        assert_eq!(verdict(&f), Severity::Warn);
        let mut prom = String::new();
        prometheus_lines(&l, 2, &mut prom);
        assert!(!prom.contains("switchboard_limit_file_max"));
        assert!(prom.contains("switchboard_limit_nofile_soft 4194304"));
    }

    #[test]
    fn huge_targets_saturate_instead_of_overflowing() {
        let f = check(&roomy(), u64::MAX);
        assert_eq!(verdict(&f), Severity::Blocking);
    }

    #[test]
    fn prometheus_has_help_type_and_labels() {
        let mut out = String::new();
        let l = Limits {
            conntrack_max: Some(262_144),
            ..roomy()
        };
        prometheus_lines(&l, 2, &mut out);
        assert!(out.contains("# HELP switchboard_limit_nofile_hard "));
        assert!(out.contains(
            "# TYPE switchboard_limit_nofile_hard gauge\nswitchboard_limit_nofile_hard 4194304\n"
        ));
        assert!(out.contains("switchboard_limit_tcp_mem_pages{level=\"pressure\"} 2000000\n"));
        assert!(out.contains("switchboard_limit_ip_local_port_range{bound=\"first\"} 1024\n"));
        assert!(out.contains("switchboard_limit_conntrack_max 262144\n"));
        // The server's reserve for its 2 shards: 4194304 - (64 + 4 x 2).
        assert!(out.contains("switchboard_limit_max_connections 4194232\n"));
        // Every sample line belongs to a declared gauge.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let metric = line.split(['{', ' ']).next().unwrap_or("");
            assert!(out.contains(&format!("# TYPE {metric} gauge")), "{line}");
        }
    }

    #[test]
    fn args_parse_and_reject() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            parse_args(&s(&[])),
            Ok(Parsed::Run {
                target: None,
                json: false
            })
        ));
        assert!(matches!(
            parse_args(&s(&["--json", "--connections", "1_000_000"])),
            Ok(Parsed::Run {
                target: Some(1_000_000),
                json: true
            })
        ));
        assert!(matches!(
            parse_args(&s(&["--connections=5"])),
            Ok(Parsed::Run {
                target: Some(5),
                json: false
            })
        ));
        assert!(parse_args(&s(&["--connections"])).is_err());
        assert!(parse_args(&s(&["--connections", "0"])).is_err());
        assert!(parse_args(&s(&["--connections", "-3"])).is_err());
        assert!(parse_args(&s(&["--connections", "many"])).is_err());
        assert!(parse_args(&s(&["--frobnicate"])).is_err());
    }

    #[test]
    fn default_target_is_what_the_server_derives() {
        // A dev box: soft 1024, hard 20000, 2 cores. The server raises soft to 20000 and
        // derives 20000 - (64 + 4 x 2) = 19928; that is what the doctor checks, and it passes.
        let l = Limits {
            nofile_soft: 1024,
            nofile_hard: 20_000,
            cores: 2,
            mem_available_bytes: Some(4 << 30),
            ..roomy()
        };
        assert_eq!(derived_target(&l), 19_928);
        assert_ne!(verdict(&check(&l, derived_target(&l))), Severity::Blocking);
        let plan = Plan {
            target: derived_target(&l),
            derived: true,
            redis: None,
        };
        let out = render_table(&l, &plan, &check(&l, plan.target));
        assert!(
            out.contains("can this machine hold 19928 connections?"),
            "{out}"
        );
        assert!(out.contains("is what the server derives here"), "{out}");
        assert!(out.contains("fd reserve: 72"), "{out}");
        // Unlimited hard: fs.nr_open is the ceiling, as in raise_nofile_limit.
        let l = Limits {
            nofile_hard: UNLIMITED,
            nr_open: Some(1_048_576),
            cores: 1,
            ..l
        };
        assert_eq!(derived_target(&l), 1_048_576 - 68);
        let l = Limits {
            nofile_soft: 10,
            nofile_hard: 10,
            ..l
        };
        assert_eq!(derived_target(&l), 1);
    }

    #[test]
    fn the_fd_fix_is_printed_once() {
        let l = Limits {
            nofile_soft: 256,
            nofile_hard: 256,
            ..roomy()
        };
        let plan = Plan {
            target: 1000,
            derived: false,
            redis: None,
        };
        let f = check(&l, 1000);
        assert_eq!(
            find(&f, "RLIMIT_NOFILE soft").fix,
            find(&f, "RLIMIT_NOFILE hard").fix
        );
        let out = render_table(&l, &plan, &f);
        assert_eq!(out.matches("LimitNOFILE=").count(), 1, "{out}");
        assert!(
            out.contains("fix: the same as for RLIMIT_NOFILE soft above"),
            "{out}"
        );
        assert!(!out.contains("is what the server derives"), "{out}");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut o = String::new();
        json_str(&mut o, "a\"b\\c\nd\u{1}");
        assert_eq!(o, "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn raise_nofile_limit_lifts_a_lowered_soft_limit_to_hard() {
        let (_, hard) = getrlimit_nofile().expect("getrlimit");
        if hard == UNLIMITED || hard < 64 {
            // Nothing meaningful to lower and raise on such a machine.
            return;
        }
        let lowered = libc::rlimit {
            rlim_cur: (hard / 2) as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: `lowered` is a valid rlimit struct that setrlimit only reads; lowering the soft
        // limit is always permitted.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(getrlimit_nofile().expect("getrlimit").0, hard / 2);
        assert_eq!(raise_nofile_limit().expect("raise"), (hard, hard));
        assert_eq!(read_limits().nofile_soft, hard);
    }

    #[test]
    fn read_limits_on_this_machine_is_sane() {
        let l = read_limits();
        assert!(l.nofile_soft <= l.nofile_hard);
        assert!(l.nofile_soft > 0);
        assert!(l.page_size >= 4096);
    }
}
