//! `--processes P`: the controller (the process the user started) runs P children of this
//! binary (`switchboard-load child`), each owning every P-th connection with its own
//! RLIMIT_NOFILE, so one run can go past one process's fd limit. The protocol is lines over
//! the children's stdin/stdout:
//!
//! - controller -> child: the plan as one JSON line (with the child's `proc_index`), then
//!   `RUN <start_ns> <end_ns>`, `DRAIN`, `CLOSE`; history-resume adds `BURST <n>` (publishes
//!   the publisher must have made) and `PHASE <phase> <start_ns>` (leave, resume). CLOCK_MONOTONIC is one clock for every
//!   process on the machine, so a start time and the send timestamps mean the same everywhere.
//! - child -> controller: `S n n n ...` (its [`Shared`] counters, every `SNAPSHOT_MS`), and
//!   after `CLOSE` one `R {json}` line with its merged [`WorkerReport`].
//!
//! The controller adds each child's counter changes into its own `Shared`, so every scenario
//! reads the totals exactly as with threads. A child whose stdin closes (the controller died)
//! closes its connections and exits.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::{phase, shared_apply_delta, shared_snapshot, Plan, Shared, WorkerReport};

/// Pids of the running children, for the generator's own CPU and RSS figures.
static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub fn child_pids() -> Vec<u32> {
    CHILD_PIDS.lock().expect("pids lock").clone()
}

/// First argument of a child process.
pub const CHILD_ARG: &str = "child";
/// How often a child reports its counters.
const SNAPSHOT_MS: u64 = 10;
/// How long the controller waits for a child's final report after `CLOSE`.
const REPORT_WAIT_S: u64 = 60;

struct Link {
    child: Child,
    stdin: Mutex<Option<ChildStdin>>,
    reader: Option<JoinHandle<Option<WorkerReport>>>,
}

pub struct Children {
    links: Vec<Link>,
    /// Set by a reader when its child's output ended before the final report.
    lost: Arc<Mutex<Option<String>>>,
}

impl Children {
    pub fn spawn(plan: &Plan, shared: Arc<Shared>) -> Result<Children, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let lost = Arc::new(Mutex::new(None));
        let mut links = Vec::with_capacity(plan.procs);
        for p in 0..plan.procs {
            let mut child = Command::new(&exe)
                .arg(CHILD_ARG)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("spawn child {p}: {e}"))?;
            CHILD_PIDS.lock().expect("pids lock").push(child.id());
            let mut stdin = child.stdin.take().ok_or("child stdin")?;
            let stdout = child.stdout.take().ok_or("child stdout")?;
            let mut v = plan.to_json();
            v["proc_index"] = p.into();
            writeln!(stdin, "{v}").map_err(|e| format!("child {p}: {e}"))?;
            let sh = Arc::clone(&shared);
            let lost2 = Arc::clone(&lost);
            let reader = std::thread::Builder::new()
                .name(format!("child-{p}"))
                .spawn(move || read_child(p, stdout, &sh, &lost2))
                .map_err(|e| format!("spawn reader: {e}"))?;
            links.push(Link {
                child,
                stdin: Mutex::new(Some(stdin)),
                reader: Some(reader),
            });
        }
        Ok(Children { links, lost })
    }

    /// Sends one command line to every child.
    pub fn command(&self, line: &str) {
        for l in &self.links {
            if let Some(w) = l.stdin.lock().expect("stdin lock").as_mut() {
                let _ = writeln!(w, "{line}");
                let _ = w.flush();
            }
        }
    }

    /// A child that went away early, if any.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().expect("lost lock").clone()
    }

    /// `CLOSE` to all, then their reports merged.
    pub fn finish(mut self) -> WorkerReport {
        self.command("CLOSE");
        let mine: Vec<u32> = self.links.iter().map(|l| l.child.id()).collect();
        CHILD_PIDS
            .lock()
            .expect("pids lock")
            .retain(|p| !mine.contains(p));
        let mut total = WorkerReport::empty();
        for (p, l) in self.links.iter_mut().enumerate() {
            let report = l.reader.take().and_then(|h| h.join().ok().flatten());
            match report {
                Some(r) => total.merge(r),
                None => {
                    let mut r = WorkerReport::empty();
                    r.failures
                        .insert(format!("child process {p} gave no report"), 1);
                    total.merge(r);
                }
            }
            // Closing stdin lets a child that missed CLOSE exit; then reap it.
            l.stdin.lock().expect("stdin lock").take();
            let deadline = std::time::Instant::now() + Duration::from_secs(REPORT_WAIT_S);
            loop {
                match l.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = l.child.kill();
                        let _ = l.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        total
    }
}

fn read_child(
    p: usize,
    stdout: std::process::ChildStdout,
    shared: &Shared,
    lost: &Mutex<Option<String>>,
) -> Option<WorkerReport> {
    let mut last: Vec<u64> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.strip_prefix("S ") {
            let now: Vec<u64> = rest.split(' ').filter_map(|t| t.parse().ok()).collect();
            shared_apply_delta(shared, &last, &now);
            last = now;
        } else if let Some(rest) = line.strip_prefix("R ") {
            return match serde_json::from_str::<serde_json::Value>(rest) {
                Ok(v) => Some(WorkerReport::from_json(&v)),
                Err(e) => {
                    *lost.lock().expect("lost lock") =
                        Some(format!("child {p}: unreadable report: {e}"));
                    None
                }
            };
        }
    }
    *lost.lock().expect("lost lock") = Some(format!("child process {p} ended early"));
    None
}

type StartFn = fn(&Arc<Plan>, &Arc<Shared>) -> Result<(Vec<JoinHandle<WorkerReport>>, u64), String>;
type JoinFn = fn(Vec<JoinHandle<WorkerReport>>) -> WorkerReport;

/// Entry point of a child: read the plan, run the workers, follow the commands.
pub fn child_main(start: StartFn, join: JoinFn) -> i32 {
    if let Err(e) = crate::sys::raise_nofile() {
        eprintln!("child: cannot raise RLIMIT_NOFILE: {e}");
        return 2;
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let plan = match lines.next() {
        Some(Ok(l)) => match serde_json::from_str::<serde_json::Value>(&l)
            .map_err(|e| e.to_string())
            .and_then(|v| Plan::from_json(&v))
        {
            Ok(p) => Arc::new(p),
            Err(e) => {
                eprintln!("child: bad plan: {e}");
                return 2;
            }
        },
        _ => return 2,
    };
    let shared = Arc::new(Shared::new(plan.room_names.len()));
    let handles = match start(&plan, &shared) {
        Ok((h, _)) => h,
        Err(e) => {
            eprintln!("child {}: {e}", plan.proc_index);
            return 2;
        }
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = {
        let sh = Arc::clone(&shared);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let out = std::io::stdout();
            while !done.load(Ordering::Acquire) {
                let snap = shared_snapshot(&sh);
                let text: Vec<String> = snap.iter().map(u64::to_string).collect();
                let mut o = out.lock();
                if writeln!(o, "S {}", text.join(" ")).is_err() || o.flush().is_err() {
                    return;
                }
                drop(o);
                std::thread::sleep(Duration::from_millis(SNAPSHOT_MS));
            }
            // One last snapshot so the controller sees the final counts.
            let snap = shared_snapshot(&sh);
            let text: Vec<String> = snap.iter().map(u64::to_string).collect();
            let mut o = out.lock();
            let _ = writeln!(o, "S {}", text.join(" "));
            let _ = o.flush();
        })
    };
    for line in lines {
        let Ok(line) = line else { break };
        let mut it = line.split(' ');
        match it.next() {
            Some("RUN") => {
                let start_ns = it.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                let end_ns = it.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                shared.run_start_ns.store(start_ns, Ordering::Release);
                shared.run_end_ns.store(end_ns, Ordering::Release);
                shared.phase.store(phase::RUN, Ordering::Release);
            }
            Some("DRAIN") => shared.phase.store(phase::DRAIN, Ordering::Release),
            Some("PHASE") => {
                let ph = it
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(phase::CLOSE);
                if let Some(start_ns) = it.next().and_then(|t| t.parse().ok()) {
                    shared.run_start_ns.store(start_ns, Ordering::Release);
                }
                shared.phase.store(ph, Ordering::Release);
            }
            Some("BURST") => {
                let n = it.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                shared.burst_target.store(n, Ordering::Release);
            }
            Some("CLOSE") => break,
            _ => {}
        }
    }
    // CLOSE, or the controller is gone: close everything and report.
    shared.phase.store(phase::CLOSE, Ordering::Release);
    let report = join(handles);
    done.store(true, Ordering::Release);
    let _ = reporter.join();
    let out = std::io::stdout();
    let mut o = out.lock();
    let _ = writeln!(o, "R {}", report.to_json());
    let _ = o.flush();
    0
}
