//! Operating-system helpers of the generator: the monotonic clock, the file limit, samples of
//! the server process (/proc/PID), kernel slab usage (/proc/meminfo, /proc/slabinfo) and a
//! blocking `GET /health`.
//!
//! Owns no sockets of the load itself; nothing here is on the per-message hot path except
//! [`now_ns`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest /health response we read.
const HEALTH_RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Time limit of one /health request (connect, write and read each).
const HEALTH_TIMEOUT_MS: u64 = 2000;

/// CLOCK_MONOTONIC in nanoseconds; comparable across the threads of this process.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit with cur <= max.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// CPU time of all the process's threads, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size, KiB.
    pub rss_kb: u64,
    /// When the sample was taken ([`now_ns`]).
    pub at_ns: u64,
}

/// Samples `/proc/PID`: CPU from the per-thread schedstat (ns precision), falling back to
/// utime+stime from `stat` (clock ticks), and VmRSS from `status`.
pub fn sample_proc(pid: u32) -> Option<ProcSample> {
    let at_ns = now_ns();
    let cpu_ns = cpu_from_schedstat(pid).or_else(|| cpu_from_stat(pid))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(ProcSample {
        cpu_ns,
        rss_kb,
        at_ns,
    })
}

fn cpu_from_schedstat(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for entry in dir.flatten() {
        let mut path = entry.path();
        path.push("schedstat");
        if let Ok(s) = std::fs::read_to_string(&path) {
            if let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
    }
    any.then_some(total)
}

fn cpu_from_stat(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / tck)
}

/// CPU time of process `pid` and of its direct children (PostgreSQL's postmaster and its
/// backends), nanoseconds; children that ended between two samples are not counted.
pub fn tree_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = cpu_from_schedstat(pid).or_else(|| cpu_from_stat(pid))?;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Some(total);
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if parent_of(&stat) == Some(pid) {
            total += cpu_from_schedstat(child)
                .or_else(|| cpu_from_stat(child))
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// The parent pid (field 4) of a /proc/PID/stat line.
pub fn parent_of(stat: &str) -> Option<u32> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time the whole machine spent busy (every core, every process, the kernel's interrupt
/// work included; not idle or iowait), nanoseconds, from the `cpu` line of /proc/stat.
pub fn machine_busy_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_stat_busy_ticks(&stat).map(|ticks| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        ticks * 1_000_000_000 / tck
    })
}

/// Busy clock ticks of the `cpu` line: user + nice + system + irq + softirq + steal.
pub fn parse_stat_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, inside user/nice]
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// One thread of a process, from `comm` and `schedstat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSample {
    pub tid: u32,
    pub name: String,
    /// Time on a CPU, ns.
    pub run_ns: u64,
    /// Time runnable but waiting for a CPU (on a run queue), ns: a thread that is always
    /// runnable has run + wait = the window, whatever its CPU share.
    pub wait_ns: u64,
}

/// CPU time of every thread of `pid` (empty when /proc is not readable).
pub fn sample_threads(pid: u32) -> Vec<ThreadSample> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (Some(Some(run_ns)), Some(Some(wait_ns))) = (f.next(), f.next()) else {
            continue;
        };
        let name = std::fs::read_to_string(path.join("comm"))
            .map(|n| n.trim().to_string())
            .unwrap_or_default();
        out.push(ThreadSample {
            tid,
            name,
            run_ns,
            wait_ns,
        });
    }
    out
}

/// Each thread's time on a CPU and waiting for one between two samples, in percent of
/// `window_ns`, busiest first, as `name:run+wait` separated by spaces (`bridge:70.7+28.7`:
/// runnable 99.4 % of the time, so it is the limit, but on a CPU only 70.7 %); threads under
/// 0.5 % on a CPU are left out.
pub fn thread_cpu_pct(before: &[ThreadSample], after: &[ThreadSample], window_ns: u64) -> String {
    let pct = |ns: u64| ns as f64 / window_ns.max(1) as f64 * 100.0;
    let mut rows: Vec<(String, f64, f64)> = after
        .iter()
        .map(|t| {
            let old = before.iter().find(|o| o.tid == t.tid);
            let run = t.run_ns.saturating_sub(old.map_or(0, |o| o.run_ns));
            let wait = t.wait_ns.saturating_sub(old.map_or(0, |o| o.wait_ns));
            (t.name.clone(), pct(run), pct(wait))
        })
        .filter(|(_, run, _)| *run >= 0.5)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.iter()
        .map(|(n, run, wait)| format!("{n}:{run:.1}+{wait:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Kernel slab memory: `Slab:` of /proc/meminfo in KiB, and when /proc/slabinfo is readable,
/// bytes per cache (num_objs * objsize).
#[derive(Debug, Clone, Default)]
pub struct SlabSample {
    pub meminfo_slab_kb: u64,
    pub caches: Vec<(String, u64)>,
}

/// Reads the slab sample; absent files give zeros / no caches.
pub fn sample_slab() -> SlabSample {
    let meminfo_slab_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Slab:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let caches = std::fs::read_to_string("/proc/slabinfo")
        .map(|s| parse_slabinfo(&s))
        .unwrap_or_default();
    SlabSample {
        meminfo_slab_kb,
        caches,
    }
}

/// Parses /proc/slabinfo version 2.1 into (cache, bytes).
pub fn parse_slabinfo(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| !l.starts_with("slabinfo") && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num_objs: u64 = f.get(2)?.parse().ok()?;
            let objsize: u64 = f.get(3)?.parse().ok()?;
            Some((f.first()?.to_string(), num_objs * objsize))
        })
        .collect()
}

/// The caches that grew most between two slabinfo samples: (name, bytes delta), largest first.
pub fn slab_growth(before: &SlabSample, after: &SlabSample, top: usize) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = after
        .caches
        .iter()
        .map(|(name, bytes)| {
            let old = before
                .caches
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, b)| *b);
            (name.clone(), *bytes as i64 - old as i64)
        })
        .filter(|(_, d)| *d != 0)
        .collect();
    out.sort_by_key(|(_, d)| -d.abs());
    out.truncate(top);
    out
}

/// `GET /health` -> (clients, rooms).
pub fn get_health(addr: SocketAddr, host: &str) -> Result<(u64, u64), String> {
    let timeout = Duration::from_millis(HEALTH_TIMEOUT_MS);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("health: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("health: {e}"))?;
    let mut body = Vec::new();
    s.take(HEALTH_RESPONSE_BYTES_MAX as u64)
        .read_to_end(&mut body)
        .map_err(|e| format!("health: {e}"))?;
    parse_health(&body)
}

/// Parses a /health HTTP response (Content-Length or read-to-close body).
pub fn parse_health(resp: &[u8]) -> Result<(u64, u64), String> {
    let end = memchr::memmem::find(resp, b"\r\n\r\n").ok_or("health: no HTTP head")?;
    if !resp.starts_with(b"HTTP/1.1 200") && !resp.starts_with(b"HTTP/1.0 200") {
        let line = resp.split(|b| *b == b'\r').next().unwrap_or(&[]);
        return Err(format!("health: {}", String::from_utf8_lossy(line)));
    }
    let v: serde_json::Value = serde_json::from_slice(&resp[end + 4..])
        .map_err(|e| format!("health: body is not JSON: {e}"))?;
    let clients = v["clients"].as_u64().ok_or("health: no clients")?;
    let rooms = v["rooms"].as_u64().ok_or("health: no rooms")?;
    Ok((clients, rooms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        assert!(a > 0);
    }

    #[test]
    fn own_process_sample_has_cpu_and_rss() {
        let s = sample_proc(std::process::id()).expect("own /proc");
        assert!(s.rss_kb > 0);
        assert!(cpu_from_stat(std::process::id()).is_some());
    }

    #[test]
    fn a_process_tree_counts_its_children() {
        assert_eq!(parent_of("42 (post gres) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("garbage"), None);
        // Sampled first: this process's CPU only grows, and the tree holds at least it.
        let alone = cpu_from_schedstat(std::process::id()).unwrap_or(0);
        let tree = tree_cpu_ns(std::process::id()).expect("own /proc");
        assert!(tree >= alone, "{tree} < {alone}");
    }

    #[test]
    fn machine_busy_ticks_leave_idle_and_iowait_out() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 5 0 2 500 3 1 1 2 0 0\n";
        assert_eq!(parse_stat_busy_ticks(stat), Some(25));
        assert_eq!(parse_stat_busy_ticks("intr 1 2\n"), None);
        assert!(machine_busy_ns().is_some());
    }

    #[test]
    fn thread_cpu_is_reported_per_thread_busiest_first() {
        let own = sample_threads(std::process::id());
        assert!(!own.is_empty());
        let t = |tid, name: &str, run_ns, wait_ns| ThreadSample {
            tid,
            name: name.into(),
            run_ns,
            wait_ns,
        };
        let a = vec![t(1, "bridge", 100, 0), t(2, "shard", 0, 10)];
        let b = vec![
            t(1, "bridge", 300, 700),
            t(2, "shard", 500, 110),
            t(3, "new", 1, 0),
        ];
        assert_eq!(
            thread_cpu_pct(&a, &b, 1000),
            "shard:50.0+10.0 bridge:20.0+70.0"
        );
    }

    #[test]
    fn slabinfo_parse_and_growth() {
        let a = "slabinfo - version: 2.1\n# name <active_objs> ...\nTCP 10 20 2000 16 8 : tunables 0 0 0 : slabdata 1 1 0\nfoo 1 1 100 1 1\n";
        let b = "slabinfo - version: 2.1\nTCP 10 30 2000 16 8 : x\nfoo 1 1 100 1 1\n";
        let before = SlabSample {
            meminfo_slab_kb: 0,
            caches: parse_slabinfo(a),
        };
        let after = SlabSample {
            meminfo_slab_kb: 0,
            caches: parse_slabinfo(b),
        };
        assert_eq!(before.caches[0], ("TCP".to_string(), 40_000));
        assert_eq!(
            slab_growth(&before, &after, 5),
            vec![("TCP".to_string(), 20_000)]
        );
    }

    #[test]
    fn health_parse() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\":\"healthy\",\"clients\":3,\"rooms\":1}";
        assert_eq!(parse_health(ok), Ok((3, 1)));
        assert!(parse_health(b"HTTP/1.1 503 X\r\n\r\n{}").is_err());
        assert!(parse_health(b"HTTP/1.1 200 OK\r\n\r\nnope").is_err());
    }
}
