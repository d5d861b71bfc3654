//! `switchboard-load`: a cheap load generator for the Switchboard WebSocket server.
//!
//! It shares the machine with the server, so it is built to cost little: mio (epoll) event
//! loops on `--threads` threads, a hand-written client side of RFC 6455 ([`ws`]), and no JSON
//! parse on the hot path (it finds `"seq":` / `"ts":` in the payload). The controller in this
//! file runs one scenario (connect, idle, fanout, dm, churn, echo, issue 10's
//! history-resume, typing-storm, presence-churn, and issue 13's rest-read over HTTP, [`rest`]),
//! samples the server from /proc, prints a table and one JSON line, and exits 1 when the run
//! had failures.

mod args;
mod engine;
mod floor;
mod http;
#[cfg(test)]
mod mock;
mod remote;
mod report;
mod rest;
mod sys;
mod ws;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use args::{Opts, Scenario};
use engine::{kind, phase, Plan, Role, Shared, Traffic, Worker, WorkerReport};
use report::Report;
use sys::{now_ns, ProcSample};

/// Controller polling interval while waiting for the workers.
const CONTROL_TICK_MS: u64 = 10;
/// Delay between arming the run and its first scheduled send, so every worker sees it.
const RUN_LEAD_NS: u64 = 50_000_000;
/// Churn cycles needed to judge RSS growth (the second half of them is compared).
const CHURN_VERDICT_CYCLES_MIN: usize = 4;
/// Grace after the expected end of the run before the watchdog kills the process.
const WATCHDOG_GRACE_S: f64 = 30.0;
/// presence-churn: wait after setup for the watch commands to be taken.
const WATCH_SETTLE_S: f64 = 0.5;
/// presence-churn: how far `--away` must be from `--grace` for the events to be predictable
/// (the server's timers tick every 100 ms).
const GRACE_MARGIN_S: f64 = 0.5;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("summary") {
        std::process::exit(summary(argv.get(1).map(String::as_str)));
    }
    if argv.first().map(String::as_str) == Some(remote::CHILD_ARG) {
        std::process::exit(remote::child_main(start_threads, join_threads));
    }
    let opts = match args::parse(&argv) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprint!("{}", args::USAGE);
            std::process::exit(2);
        }
    };
    let nofile = match sys::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: cannot raise RLIMIT_NOFILE: {e}");
            std::process::exit(2);
        }
    };
    // Each process holds its share of the sockets (`--processes`).
    let sockets = opts.sockets().div_ceil(opts.processes.max(1));
    if opts.scenario != Scenario::Floor && (sockets + 64) as u64 > nofile {
        eprintln!(
            "error: {sockets} sockets per process need more than RLIMIT_NOFILE {nofile} \
             (minus 64 spare); add --processes"
        );
        std::process::exit(2);
    }
    start_watchdog(&opts);
    let mut report = match opts.scenario {
        Scenario::Floor => floor::run(opts.connections, nofile),
        Scenario::Connect => connect(&opts),
        Scenario::Idle => idle(&opts),
        Scenario::Fanout => fanout(&opts),
        Scenario::Dm => dm(&opts),
        Scenario::Churn => churn(&opts),
        Scenario::Echo => echo(&opts),
        Scenario::HistoryResume => history_resume(&opts),
        Scenario::TypingStorm => typing_storm(&opts),
        Scenario::PresenceChurn => presence_churn(&opts),
        Scenario::RestRead => rest_read(&opts),
    };
    if !opts.label.is_empty() {
        report.label = opts.label.clone();
    }
    if !opts.json_only {
        print!("{}", report.table());
    }
    println!("{}", report.json());
    if !report.failures.is_empty() {
        for f in &report.failures {
            eprintln!("FAILURE: {f}");
        }
        std::process::exit(1);
    }
}

/// Kills the process if the scenario overruns its bounded time (a hung server, a bug).
fn start_watchdog(o: &Opts) {
    let cycles = if o.scenario == Scenario::Churn {
        o.cycles as f64
    } else {
        1.0
    };
    // history-resume waits for a second setup (the resume) and three drains.
    let extra = match o.scenario {
        Scenario::HistoryResume => o.setup_timeout_s + 3.0 * o.drain_s,
        Scenario::PresenceChurn => WATCH_SETTLE_S,
        // The thread's messages are posted within a setup timeout of their own.
        Scenario::RestRead => o.setup_timeout_s,
        _ => 0.0,
    };
    let budget = cycles * (o.setup_timeout_s + o.hold_s + o.baseline_timeout_s)
        + extra
        + o.settle_s
        + o.duration_s
        + o.drain_s
        + WATCHDOG_GRACE_S;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(budget));
        eprintln!("FAILURE: hard deadline of {budget:.0} s passed; exiting");
        std::process::exit(3);
    });
}

/// The running workers of one connection set: threads of this process, or (`--processes P`)
/// child processes that each run a share of the workers and report over a pipe.
struct Session {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    workers: Workers,
    started_ns: u64,
}

enum Workers {
    Local(Vec<JoinHandle<WorkerReport>>),
    Remote(remote::Children),
}

impl Session {
    fn start(plan: Plan) -> Result<Session, String> {
        let plan = Arc::new(plan);
        // Latency marks per user: typing (last event-producing command), presence (connect,
        // then disconnect).
        let marks = match plan.traffic {
            Traffic::Typing => plan.user_names.len(),
            Traffic::Presence => 2 * plan.user_names.len(),
            _ => 0,
        };
        let shared = Arc::new(Shared::with_marks(plan.room_names.len(), marks));
        if plan.procs > 1 {
            let started_ns = now_ns();
            let children = remote::Children::spawn(&plan, Arc::clone(&shared))?;
            return Ok(Session {
                plan,
                shared,
                workers: Workers::Remote(children),
                started_ns,
            });
        }
        let (handles, started_ns) = start_threads(&plan, &shared)?;
        Ok(Session {
            plan,
            shared,
            workers: Workers::Local(handles),
            started_ns,
        })
    }

    fn total(&self) -> usize {
        self.plan.roles.len()
    }

    /// Waits until every connection is ready or failed; false on timeout.
    fn wait_setup(&self, timeout_s: f64) -> bool {
        let deadline = now_ns() + (timeout_s * 1e9) as u64;
        loop {
            let done = self.shared.ready.load(Ordering::Relaxed)
                + self.shared.setup_failed.load(Ordering::Relaxed);
            if done >= self.total() {
                return true;
            }
            if now_ns() > deadline {
                return false;
            }
            if let Workers::Remote(c) = &self.workers {
                if let Some(e) = c.lost() {
                    eprintln!("FAILURE: {e}");
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS));
        }
    }

    /// Runs the send schedule for `duration_s`; returns (start, end) in monotonic ns (one
    /// clock for every process on the machine).
    fn run(&self, duration_s: f64) -> (u64, u64) {
        let start = now_ns() + RUN_LEAD_NS;
        let end = start + (duration_s * 1e9) as u64;
        self.shared.run_start_ns.store(start, Ordering::Release);
        self.shared.run_end_ns.store(end, Ordering::Release);
        self.shared.phase.store(phase::RUN, Ordering::Release);
        if let Workers::Remote(c) = &self.workers {
            c.command(&format!("RUN {start} {end}"));
        }
        sleep_until(end);
        self.shared.phase.store(phase::DRAIN, Ordering::Release);
        if let Workers::Remote(c) = &self.workers {
            c.command("DRAIN");
        }
        (start, end)
    }

    /// history-resume: moves every worker to phase `ph`, `start_ns` being its start.
    fn set_phase(&self, ph: u8, start_ns: u64) {
        self.shared.run_start_ns.store(start_ns, Ordering::Release);
        self.shared.phase.store(ph, Ordering::Release);
        if let Workers::Remote(c) = &self.workers {
            c.command(&format!("PHASE {ph} {start_ns}"));
        }
    }

    /// history-resume: the publisher publishes until it has sent `total` in all.
    fn burst(&self, total: u64) {
        self.shared.burst_target.store(total, Ordering::Release);
        if let Workers::Remote(c) = &self.workers {
            c.command(&format!("BURST {total}"));
        }
    }

    /// Waits up to `drain_s` until `done()` holds; returns the time waited in seconds.
    fn drain(&self, drain_s: f64, done: impl Fn(&Shared) -> bool) -> f64 {
        let t0 = now_ns();
        let deadline = t0 + (drain_s * 1e9) as u64;
        while !done(&self.shared) && now_ns() < deadline {
            std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS));
        }
        (now_ns() - t0) as f64 / 1e9
    }

    /// Closes every connection and collects the workers' measurements.
    fn finish(self) -> (WorkerReport, Arc<Shared>) {
        self.shared.phase.store(phase::CLOSE, Ordering::Release);
        let total = match self.workers {
            Workers::Local(handles) => join_threads(handles),
            Workers::Remote(children) => children.finish(),
        };
        (total, self.shared)
    }
}

fn start_threads(
    plan: &Arc<Plan>,
    shared: &Arc<Shared>,
) -> Result<(Vec<JoinHandle<WorkerReport>>, u64), String> {
    let mut workers = Vec::new();
    for id in 0..plan.threads {
        workers.push(
            Worker::new(id, Arc::clone(plan), Arc::clone(shared))
                .map_err(|e| format!("worker {id}: {e}"))?,
        );
    }
    let started_ns = now_ns();
    let mut handles = Vec::new();
    for (id, w) in workers.into_iter().enumerate() {
        let h = std::thread::Builder::new()
            .name(format!("load-{id}"))
            .spawn(move || w.run())
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }
    Ok((handles, started_ns))
}

fn join_threads(handles: Vec<JoinHandle<WorkerReport>>) -> WorkerReport {
    let mut total = WorkerReport::empty();
    for h in handles {
        match h.join() {
            Ok(r) => total.merge(r),
            Err(_) => {
                let mut r = WorkerReport::empty();
                r.failures.insert("worker thread panicked".into(), 1);
                total.merge(r);
            }
        }
    }
    total
}

fn sleep_until(at_ns: u64) {
    loop {
        let now = now_ns();
        if now >= at_ns {
            return;
        }
        std::thread::sleep(Duration::from_nanos((at_ns - now).min(100_000_000)));
    }
}

fn base_plan(o: &Opts, roles: Vec<Role>, rooms: usize) -> Plan {
    let nonce = now_ns() % 1_000_000_007;
    let threads = o.threads.min(roles.len()).max(1);
    Plan {
        endpoints: o
            .targets
            .iter()
            .map(|t| engine::Endpoint {
                addr: t.addr,
                host: t.host.clone(),
                path: t.path.clone(),
            })
            .collect(),
        resume_endpoint: o.resume_target.as_ref().map(|t| engine::Endpoint {
            addr: t.addr,
            host: t.host.clone(),
            path: t.path.clone(),
        }),
        source_ips: o.source_ips.clone(),
        roles,
        room_names: (0..rooms).map(|k| format!("lt{nonce}-{k}")).collect(),
        user_names: Vec::new(),
        threads,
        in_flight_per_thread: o.in_flight.div_ceil(threads).max(1),
        batch_ns: o.batch_us * 1000,
        url_subscribe: o.url_subscribe,
        sub_paths: o.sub_paths.clone(),
        proc_index: 0,
        procs: o.processes,
        connect_timeout_ns: (o.connect_timeout_s * 1e9) as u64,
        slow_rcvbuf: o.slow_rcvbuf,
        traffic: Traffic::None,
        senders: Vec::new(),
        interval_ns: 1e9 / o.rate,
        payload_bytes: o.payload_bytes,
        nonce,
        gap: o.messages,
        stop_every: o.stop_every,
        watch: o.watch,
        cycle_ns: (o.churners as f64 / o.rate * 1e9) as u64,
        away_ns: (o.away_s * 1e9) as u64,
    }
}

fn sub_roles(o: &Opts) -> Vec<Role> {
    (0..o.connections)
        .map(|i| Role::Sub {
            room: (i % o.rooms) as u32,
            slow: false,
        })
        .collect()
}

/// The server's CPU and RSS; with `--server-pids` the sum over every server.
fn sample(o: &Opts) -> Option<ProcSample> {
    let mut total: Option<ProcSample> = None;
    for &pid in &o.server_pids {
        let s = sys::sample_proc(pid)?;
        total = Some(match total {
            None => s,
            Some(t) => ProcSample {
                cpu_ns: t.cpu_ns + s.cpu_ns,
                rss_kb: t.rss_kb + s.rss_kb,
                at_ns: s.at_ns,
            },
        });
    }
    total
}

/// Each server of `--server-pids` on its own (fanout's per-node rows).
fn sample_each(o: &Opts) -> Vec<Option<ProcSample>> {
    o.server_pids.iter().map(|&p| sys::sample_proc(p)).collect()
}

/// The generator itself: this process plus its `--processes` children (CPU and RSS summed).
fn own_sample() -> Option<ProcSample> {
    let mut total = sys::sample_proc(std::process::id())?;
    for pid in remote::child_pids() {
        if let Some(c) = sys::sample_proc(pid) {
            total.cpu_ns += c.cpu_ns;
            total.rss_kb += c.rss_kb;
        }
    }
    Some(total)
}

fn own_rss_kb() -> Option<u64> {
    own_sample().map(|s| s.rss_kb)
}

fn failure_rows(r: &mut Report, wr: &WorkerReport) {
    for (why, n) in &wr.failures {
        r.fail(format!("{n} x {why}"));
    }
    r.put("error_frames", wr.error_frames);
    if wr.error_frames > 0 {
        r.fail(format!(
            "{} error frames from the server, e.g. {:?}",
            wr.error_frames, wr.error_samples
        ));
    }
    r.put("unexpected_frames", wr.other_frames);
    if wr.sends_dropped > 0 {
        r.fail(format!(
            "{} scheduled sends not made (connection gone or send buffer over limit)",
            wr.sends_dropped
        ));
    }
}

fn proc_rows(r: &mut Report, label: &str, s: Option<ProcSample>) {
    if let Some(s) = s {
        r.put(&format!("server_rss_{label}_kb"), s.rss_kb);
    }
}

fn threads_sample(o: &Opts) -> Vec<sys::ThreadSample> {
    o.server_pid.map(sys::sample_threads).unwrap_or_default()
}

/// Server, generator (and with `--db-pid` database) CPU in % of one core over the run window,
/// and what the rest of the machine used meanwhile (`other_cpu_pct_run`: other processes, such
/// as builds, and kernel work not charged to them; on a shared machine a run with much of it
/// is suspect).
fn run_cpu_rows(
    r: &mut Report,
    server: (Option<ProcSample>, Option<ProcSample>),
    own: (Option<ProcSample>, Option<ProcSample>),
    machine: (Option<u64>, Option<u64>),
    db: (Option<u64>, Option<u64>),
) {
    let mut ours = 0.0;
    let mut win_ns = 0.0;
    for (key, pair) in [
        ("server_cpu_pct_run", server),
        ("generator_cpu_pct_run", own),
    ] {
        if let (Some(a), Some(b)) = pair {
            let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
            let pct = b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0;
            ours += pct;
            win_ns = win;
            r.put_f(key, pct, 1);
        }
    }
    if let ((Some(a), Some(b)), true) = (db, win_ns > 0.0) {
        let pct = b.saturating_sub(a) as f64 / win_ns * 100.0;
        ours += pct;
        r.put_f("db_cpu_pct_run", pct, 1);
    }
    if let ((Some(a), Some(b)), true) = (machine, win_ns > 0.0) {
        let busy = b.saturating_sub(a) as f64 / win_ns * 100.0;
        r.put_f("machine_busy_pct_run", busy, 1);
        r.put_f("other_cpu_pct_run", (busy - ours).max(0.0), 1);
    }
}

/// The server's CPU per thread over the run window, with its time waiting for a CPU (which
/// thread is the limit: a shard, or the bridge that runs the message store; a thread whose
/// run + wait is near 100 % is always runnable).
fn thread_rows(
    r: &mut Report,
    before: &[sys::ThreadSample],
    after: &[sys::ThreadSample],
    a: Option<ProcSample>,
    b: Option<ProcSample>,
) {
    if let (Some(a), Some(b), false) = (a, b, after.is_empty()) {
        r.put(
            "server_threads_cpu_pct_run",
            sys::thread_cpu_pct(before, after, b.at_ns.saturating_sub(a.at_ns)),
        );
    }
}

fn cpu_us(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    Some((b?.cpu_ns.saturating_sub(a?.cpu_ns)) as f64 / 1000.0)
}

fn setup_error(scenario: &'static str, e: String) -> Report {
    let mut r = Report::new(scenario);
    r.fail(e);
    r
}

fn connect(o: &Opts) -> Report {
    let mut r = Report::new("connect");
    let before = sample(o);
    let plan = base_plan(o, sub_roles(o), o.rooms);
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error("connect", e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    let after = sample(o);
    let started = s.started_ns;
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, _) = s.finish();
    r.put("rooms", o.rooms);
    r.put("in_flight", o.in_flight);
    r.put("upgrades", wr.upgrades);
    let first = wr.first_start_ns.min(started);
    if wr.last_upgrade_ns > first {
        r.put_f(
            "upgrades_per_s",
            wr.upgrades as f64 / ((wr.last_upgrade_ns - first) as f64 / 1e9),
            0,
        );
    }
    if wr.last_ready_ns > first {
        r.put_f(
            "time_to_all_subscribed_s",
            (wr.last_ready_ns - first) as f64 / 1e9,
            3,
        );
    }
    r.put_hist("handshake", &wr.handshake);
    r.put_hist("subscribe", &wr.subscribe);
    if let (Some(cpu), true) = (cpu_us(before, after), ready > 0) {
        r.put_f("server_cpu_us_per_conn", cpu / ready as f64, 1);
    }
    proc_rows(&mut r, "before", before);
    proc_rows(&mut r, "after", after);
    r.put("connections", o.connections);
    r.put("ready", ready);
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready after {} s",
            o.connections, o.setup_timeout_s
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

fn idle(o: &Opts) -> Report {
    let mut r = Report::new("idle");
    let before = sample(o);
    let slab_before = sys::sample_slab();
    let own_before = own_rss_kb();
    let plan = base_plan(o, sub_roles(o), o.rooms);
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error("idle", e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    std::thread::sleep(Duration::from_secs_f64(o.settle_s));
    let mid = sample(o);
    let slab_mid = sys::sample_slab();
    let own_mid = own_rss_kb();
    std::thread::sleep(Duration::from_secs_f64(o.duration_s));
    let after = sample(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let n = ready.max(1) as f64;
    r.put("rooms", o.rooms);
    r.put_f("settle_s", o.settle_s, 1);
    r.put_f("window_s", o.duration_s, 1);
    if let (Some(b), Some(a)) = (before, after) {
        r.put("server_rss_before_kb", b.rss_kb);
        r.put("server_rss_after_kb", a.rss_kb);
        r.put_f(
            "server_rss_bytes_per_conn",
            (a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / n,
            0,
        );
    }
    if let (Some(m), Some(a)) = (mid, after) {
        let window_ns = a.at_ns.saturating_sub(m.at_ns).max(1) as f64;
        r.put_f(
            "server_cpu_pct_idle",
            a.cpu_ns.saturating_sub(m.cpu_ns) as f64 / window_ns * 100.0,
            3,
        );
    }
    r.put_f(
        "kernel_slab_bytes_per_conn_both_ends",
        (slab_mid.meminfo_slab_kb as f64 - slab_before.meminfo_slab_kb as f64) * 1024.0 / n,
        0,
    );
    if !slab_mid.caches.is_empty() {
        let total_b: u64 = slab_before.caches.iter().map(|c| c.1).sum();
        let total_m: u64 = slab_mid.caches.iter().map(|c| c.1).sum();
        r.put_f(
            "slabinfo_bytes_per_conn_both_ends",
            (total_m as f64 - total_b as f64) / n,
            0,
        );
        let top: Vec<String> = sys::slab_growth(&slab_before, &slab_mid, 6)
            .into_iter()
            .map(|(name, d)| format!("{name}:{:.0}", d as f64 / n))
            .collect();
        r.put("slab_top_growth_bytes_per_conn", top.join(" "));
    }
    // With --processes the children's whole RSS would count: reported for one process only.
    if let (Some(b), Some(m), 1) = (own_before, own_mid, o.processes) {
        r.put_f(
            "generator_rss_bytes_per_conn",
            (m as f64 - b as f64) * 1024.0 / n,
            0,
        );
    }
    let (wr, _) = s.finish();
    r.put("connections", o.connections);
    r.put("ready", ready);
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready after {} s",
            o.connections, o.setup_timeout_s
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

fn fanout(o: &Opts) -> Report {
    let mut r = Report::new("fanout");
    let k = o.rooms;
    let mut roles = Vec::with_capacity(o.connections + o.publishers);
    let mut slow = 0usize;
    for i in 0..o.connections {
        let is_slow =
            ((i + 1) as f64 * o.slow_fraction).floor() > (i as f64 * o.slow_fraction).floor();
        let room = i % k;
        if is_slow {
            slow += 1;
        }
        roles.push(Role::Sub {
            room: room as u32,
            slow: is_slow,
        });
    }
    let mut senders = Vec::new();
    for p in 0..o.publishers {
        let room = p % k;
        senders.push(roles.len());
        roles.push(Role::Pub { room: room as u32 });
    }
    let mut plan = base_plan(o, roles, k);
    plan.traffic = Traffic::Publish;
    plan.senders = senders;
    let before = sample(o);
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error("fanout", e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    // Deliveries are expected at the connections that were ready when the run started; a
    // connection that failed setup is reported as such, not as losses.
    let counted_members: Vec<u64> = s
        .shared
        .members
        .iter()
        .map(|m| m.load(Ordering::Relaxed))
        .collect();
    let after_setup = sample(o);
    let each_setup = sample_each(o);
    let own_setup = own_sample();
    let (start, end) = s.run(o.duration_s);
    let after_run = sample(o);
    let each_run = sample_each(o);
    let own_run = own_sample();
    let expected = |sh: &Shared| -> u64 {
        sh.published
            .iter()
            .zip(&counted_members)
            .map(|(p, m)| p.load(Ordering::Relaxed) * m)
            .sum()
    };
    let drained_s = s.drain(o.drain_s, |sh| {
        sh.received.load(Ordering::Relaxed) >= expected(sh)
    });
    let after_drain = sample(o);
    let each_drain = sample_each(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, shared) = s.finish();
    let published: u64 = shared
        .published
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .sum();
    let exp = expected(&shared);
    let got = shared.received.load(Ordering::Relaxed);
    let run_s = (end - start) as f64 / 1e9;
    r.put("rooms", k);
    r.put("subscribers", o.connections);
    r.put("publishers", o.publishers);
    r.put("slow_subscribers", slow);
    r.put_f("rate_per_s", o.rate, 1);
    r.put("payload_bytes", o.payload_bytes);
    r.put_f("run_s", run_s, 2);
    r.put("published", published);
    r.put("expected_deliveries", exp);
    r.put("received_deliveries", got);
    r.put("lost", exp.saturating_sub(got));
    r.put("extra", got.saturating_sub(exp));
    r.put_f("deliveries_per_s", got as f64 / run_s, 0);
    r.put_f("drain_waited_s", drained_s, 2);
    r.put_hist("latency", &wr.latency);
    if let Some(cpu) = cpu_us(after_setup, after_drain) {
        if got > 0 {
            r.put_f("server_cpu_us_per_delivery", cpu / got as f64, 3);
        }
        if let (Some(a), Some(b)) = (after_setup, after_run) {
            let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
            r.put_f(
                "server_cpu_pct_run",
                b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
                1,
            );
        }
    }
    if let (Some(a), Some(b)) = (own_setup, own_run) {
        let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
        r.put_f(
            "generator_cpu_pct_run",
            b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
            1,
        );
    }
    proc_rows(&mut r, "before", before);
    proc_rows(&mut r, "after_setup", after_setup);
    proc_rows(&mut r, "after_run", after_run);
    if o.targets.len() > 1 {
        node_rows(&mut r, o, &wr, (&each_setup, &each_run, &each_drain));
    }
    if slow > 0 {
        r.put("slow_closed_4008", wr.slow_closed_4008);
        r.put("slow_closed_other", wr.slow_closed_other);
        r.put("slow_still_open", wr.slow_open);
    }
    r.put("connections", o.connections + o.publishers);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready after {} s",
            o.connections + o.publishers,
            o.setup_timeout_s
        ));
    }
    if got < exp {
        r.fail(format!("lost {} of {exp} deliveries", exp - got));
    }
    if got > exp {
        r.fail(format!(
            "{} deliveries more than expected (duplicates?)",
            got - exp
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

/// Each server's CPU samples at the end of setup, of the run, and of the drain.
type NodeSamples<'a> = (
    &'a [Option<ProcSample>],
    &'a [Option<ProcSample>],
    &'a [Option<ProcSample>],
);

/// fanout over several servers (`--urls`): per node (in `--urls` order) the deliveries its
/// connections received, their latency, and with `--server-pids` its CPU per delivery and
/// its CPU % during the run; then the latency of deliveries whose publisher was on the
/// receiver's node (`latency_same_node`) and on another (`latency_cross_node`).
fn node_rows(r: &mut Report, o: &Opts, wr: &WorkerReport, (setup, run, drain): NodeSamples<'_>) {
    r.put("nodes", o.targets.len());
    for (k, t) in o.targets.iter().enumerate() {
        let h = wr.hist(&format!("latency_node{k}"));
        let p = format!("node{k}");
        r.put(&format!("{p}_url"), format!("ws://{}{}", t.host, t.path));
        r.put(&format!("{p}_received_deliveries"), h.len());
        if let (Some(&a), Some(&b)) = (setup.get(k), drain.get(k)) {
            if let (Some(cpu), false) = (cpu_us(a, b), h.is_empty()) {
                r.put_f(
                    &format!("{p}_server_cpu_us_per_delivery"),
                    cpu / h.len() as f64,
                    3,
                );
            }
        }
        if let (Some(Some(a)), Some(Some(b))) = (setup.get(k), run.get(k)) {
            let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
            r.put_f(
                &format!("{p}_server_cpu_pct_run"),
                b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
                1,
            );
        }
        r.put_hist(&format!("{p}_latency"), &h);
    }
    r.put_hist("latency_same_node", &wr.hist("latency_same_node"));
    r.put_hist("latency_cross_node", &wr.hist("latency_cross_node"));
}

fn dm(o: &Opts) -> Report {
    let mut r = Report::new("dm");
    let d = o.devices;
    let users = o.connections / d;
    let roles: Vec<Role> = (0..o.connections)
        .map(|i| Role::Dm {
            user: (i / d) as u32,
            device: (i % d) as u32,
        })
        .collect();
    let mut plan = base_plan(o, roles, 0);
    plan.user_names = (0..users)
        .map(|u| format!("lt{}u{u}", plan.nonce))
        .collect();
    plan.traffic = Traffic::Dm;
    plan.senders = (0..users).map(|u| u * d).collect();
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error("dm", e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    let before = sample(o);
    let threads_before = threads_sample(o);
    let own_before = own_sample();
    let busy_before = sys::machine_busy_ns();
    let db_before = o.db_pid.and_then(sys::tree_cpu_ns);
    let (start, end) = s.run(o.duration_s);
    let after_run = sample(o);
    let threads_after = threads_sample(o);
    let own_run = own_sample();
    let busy_run = sys::machine_busy_ns();
    let db_run = o.db_pid.and_then(sys::tree_cpu_ns);
    let per_send = (2 * d - 1) as u64;
    let drained_s = s.drain(o.drain_s, |sh| {
        let sent = sh.sent.load(Ordering::Relaxed);
        sh.acks.load(Ordering::Relaxed) >= sent
            && sh.received.load(Ordering::Relaxed) >= sent * per_send
    });
    let after = sample(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, shared) = s.finish();
    let sent = shared.sent.load(Ordering::Relaxed);
    let acks = shared.acks.load(Ordering::Relaxed);
    let creates = shared.received.load(Ordering::Relaxed);
    let run_s = (end - start) as f64 / 1e9;
    r.put("users", users);
    r.put("devices_per_user", d);
    r.put_f("rate_per_s", o.rate, 1);
    r.put_f("run_s", run_s, 2);
    r.put("sent", sent);
    r.put("acks", acks);
    r.put("expected_creates", sent * per_send);
    r.put("received_creates", creates);
    r.put_f("drain_waited_s", drained_s, 2);
    r.put_hist("ack", &wr.ack);
    r.put_hist("create", &wr.latency);
    if let (Some(cpu), true) = (cpu_us(before, after), sent > 0) {
        r.put_f("server_cpu_us_per_message", cpu / sent as f64, 2);
    }
    run_cpu_rows(
        &mut r,
        (before, after_run),
        (own_before, own_run),
        (busy_before, busy_run),
        (db_before, db_run),
    );
    thread_rows(&mut r, &threads_before, &threads_after, before, after_run);
    proc_rows(&mut r, "after", after);
    r.put("connections", o.connections);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready",
            o.connections
        ));
    }
    if acks != sent {
        r.fail(format!("{sent} message.send but {acks} message.ack"));
    }
    if creates != sent * per_send {
        r.fail(format!(
            "expected {} message.create, received {creates}",
            sent * per_send
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

fn echo(o: &Opts) -> Report {
    let mut r = Report::new("echo");
    let roles = vec![Role::Plain; o.connections];
    let mut plan = base_plan(o, roles, 0);
    plan.traffic = Traffic::Ping;
    plan.senders = (0..o.connections).collect();
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error("echo", e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    let before = sample(o);
    let (start, end) = s.run(o.duration_s);
    let drained_s = s.drain(o.drain_s, |sh| {
        sh.received.load(Ordering::Relaxed) >= sh.sent.load(Ordering::Relaxed)
    });
    let after = sample(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, shared) = s.finish();
    let sent = shared.sent.load(Ordering::Relaxed);
    let got = shared.received.load(Ordering::Relaxed);
    let run_s = (end - start) as f64 / 1e9;
    r.put_f("rate_per_s", o.rate, 1);
    r.put_f("run_s", run_s, 2);
    r.put("pings", sent);
    r.put("pongs", got);
    r.put_f("drain_waited_s", drained_s, 2);
    r.put_hist("rtt", &wr.latency);
    if let (Some(cpu), true) = (cpu_us(before, after), sent > 0) {
        r.put_f("server_cpu_us_per_ping", cpu / sent as f64, 2);
    }
    r.put("connections", o.connections);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready",
            o.connections
        ));
    }
    if got != sent {
        r.fail(format!("{sent} pings but {got} pongs"));
    }
    failure_rows(&mut r, &wr);
    r
}

fn churn(o: &Opts) -> Report {
    let mut r = Report::new("churn");
    let health = |r: &mut Report| -> Option<u64> {
        match sys::get_health(o.target.addr, &o.target.host) {
            Ok((c, _)) => Some(c),
            Err(e) => {
                r.fail(e);
                None
            }
        }
    };
    let Some(base_clients) = health(&mut r) else {
        return r;
    };
    let before = sample(o);
    let mut peak_rss = 0u64;
    let mut connect_s = Vec::new();
    let mut back_ms = Vec::new();
    let mut rss_after_cycle = Vec::new();
    let mut total = WorkerReport::empty();
    for cycle in 0..o.cycles {
        let plan = base_plan(o, sub_roles(o), o.rooms);
        let s = match Session::start(plan) {
            Ok(s) => s,
            Err(e) => {
                r.fail(e);
                break;
            }
        };
        let complete = s.wait_setup(o.setup_timeout_s);
        let ready = s.shared.ready.load(Ordering::Relaxed);
        connect_s.push((now_ns() - s.started_ns) as f64 / 1e9);
        if !complete || ready != o.connections {
            r.fail(format!(
                "cycle {cycle}: {ready} of {} connections ready",
                o.connections
            ));
        }
        if let Some(c) = health(&mut r) {
            if c < base_clients + ready as u64 {
                r.fail(format!(
                    "cycle {cycle}: /health clients {c} < baseline {base_clients} + {ready} ready"
                ));
            }
        }
        std::thread::sleep(Duration::from_secs_f64(o.hold_s));
        if let Some(s) = sample(o) {
            peak_rss = peak_rss.max(s.rss_kb);
        }
        let (wr, _) = s.finish();
        total.merge(wr);
        let t0 = now_ns();
        let deadline = t0 + (o.baseline_timeout_s * 1e9) as u64;
        let mut last = None;
        while now_ns() < deadline {
            last = sys::get_health(o.target.addr, &o.target.host)
                .ok()
                .map(|h| h.0);
            if last == Some(base_clients) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if last != Some(base_clients) {
            r.fail(format!(
                "cycle {cycle}: /health clients {last:?} did not return to {base_clients} within {} s",
                o.baseline_timeout_s
            ));
        }
        back_ms.push(((now_ns() - t0) as f64 / 1e6).round());
        if let Some(s) = sample(o) {
            rss_after_cycle.push(s.rss_kb);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = sample(o);
    let final_clients = sys::get_health(o.target.addr, &o.target.host)
        .ok()
        .map(|h| h.0);
    r.put("cycles", o.cycles);
    r.put("connections_per_cycle", o.connections);
    r.put("baseline_clients", base_clients);
    r.put("final_clients", final_clients);
    r.put("cycle_setup_s", format!("{connect_s:.2?}"));
    r.put("cycle_back_to_baseline_ms", format!("{back_ms:?}"));
    if let (Some(b), Some(a)) = (before, after) {
        r.put("server_rss_before_kb", b.rss_kb);
        r.put("server_rss_peak_kb", peak_rss);
        r.put("server_rss_after_kb", a.rss_kb);
        r.put(
            "server_rss_after_each_cycle_kb",
            format!("{rss_after_cycle:?}"),
        );
        let growth = (a.rss_kb as f64 - b.rss_kb as f64) / b.rss_kb.max(1) as f64 * 100.0;
        r.put_f("server_rss_growth_pct", growth, 1);
        // What one cycle of connections costs, and how much of it later cycles keep adding:
        // allocators keep some memory after the first cycle; a leak keeps growing.
        let footprint = peak_rss.saturating_sub(b.rss_kb).max(1) as f64;
        r.put_f(
            "server_rss_retained_pct_of_peak",
            (a.rss_kb as f64 - b.rss_kb as f64) / footprint * 100.0,
            1,
        );
        r.put_f("rss_tolerance_pct", o.rss_tolerance_pct, 1);
        if let (Some(first), Some(last)) = (rss_after_cycle.first(), rss_after_cycle.last()) {
            let creep = (*last as f64 - *first as f64) / footprint * 100.0;
            r.put_f("server_rss_creep_pct_of_footprint", creep, 1);
            // The verdict reads the second half of the cycles: the allocator settles over the
            // first few (growth that shrinks each cycle), a leak keeps adding the same amount.
            let n = rss_after_cycle.len();
            if n >= CHURN_VERDICT_CYCLES_MIN {
                let mid = rss_after_cycle[n / 2 - 1];
                let late = (*last as f64 - mid as f64) / footprint * 100.0;
                r.put_f("server_rss_late_creep_pct_of_footprint", late, 1);
                if late > o.rss_tolerance_pct {
                    r.fail(format!(
                        "server RSS kept growing in the second half of the cycles: {mid} -> {last} KiB \
                         after cycles {}..{n}, {late:.1}% of one cycle's footprint ({footprint:.0} KiB), \
                         over the {}% tolerance",
                        n / 2,
                        o.rss_tolerance_pct
                    ));
                }
            } else {
                r.fail(format!(
                    "{n} cycles are too few for a leak verdict (need {CHURN_VERDICT_CYCLES_MIN}: \
                     the second half is compared)"
                ));
            }
        }
    }
    failure_rows(&mut r, &total);
    r
}

fn history_resume(o: &Opts) -> Report {
    const NAME: &str = "history-resume";
    let mut r = Report::new(NAME);
    let n = o.connections;
    let mut roles: Vec<Role> = (0..n)
        .map(|_| Role::Sub {
            room: 0,
            slow: false,
        })
        .collect();
    roles.push(Role::Pub { room: 0 });
    let mut plan = base_plan(o, roles, 1);
    // `bench-*` is the pattern the server is started with (history on).
    plan.room_names = vec![format!("bench-{}-0", plan.nonce)];
    plan.traffic = Traffic::History;
    let before = sample(o);
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error(NAME, e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    if !complete || ready < n + 1 {
        // Nothing to resume from: report the setup and stop here.
        let (wr, _) = s.finish();
        r.put("connections", n + 1);
        r.put("ready", ready);
        r.fail(format!(
            "setup incomplete: {ready} of {} ready after {} s",
            n + 1,
            o.setup_timeout_s
        ));
        failure_rows(&mut r, &wr);
        return r;
    }
    let subs = ready.saturating_sub(1) as u64;
    // Warm-up: every subscriber gets a few messages and remembers the last offset.
    let w = o.warmup;
    s.burst(w);
    let warm_s = s.drain(o.drain_s, |sh| {
        sh.k(kind::PUB_GOT) >= w && sh.received.load(Ordering::Relaxed) >= w * subs
    });
    let warm_got = s.shared.received.load(Ordering::Relaxed);
    let clients_before = sys::get_health(o.target.addr, &o.target.host).ok();
    s.set_phase(phase::LEAVE, now_ns());
    s.drain(o.drain_s, |sh| sh.k(kind::LEFT) >= subs);
    let left = s.shared.k(kind::LEFT);
    // The server must have seen them go before the gap, or some would get it live.
    let mut gone_s = None;
    if let Some((c0, _)) = clients_before {
        let t0 = now_ns();
        let deadline = t0 + (o.baseline_timeout_s * 1e9) as u64;
        while now_ns() < deadline {
            match sys::get_health(o.target.addr, &o.target.host) {
                Ok((c, _)) if c + left <= c0 => {
                    gone_s = Some((now_ns() - t0) as f64 / 1e9);
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS)),
            }
        }
    }
    let g = o.messages;
    s.burst(w + g);
    let gap_s = s.drain(o.drain_s, |sh| sh.k(kind::PUB_GOT) >= w + g);
    let stored = s.shared.k(kind::PUB_GOT).saturating_sub(w);
    let at_resume = sample(o);
    let own_resume = own_sample();
    let t0 = now_ns();
    s.set_phase(phase::RESUME, t0);
    let resumed_all = {
        let deadline = t0 + (o.setup_timeout_s * 1e9) as u64;
        loop {
            let done = s.shared.again_ready.load(Ordering::Relaxed)
                + s.shared.again_failed.load(Ordering::Relaxed);
            if done as u64 >= left {
                break true;
            }
            if now_ns() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS));
        }
    };
    let after = sample(o);
    let own_after = own_sample();
    let (wr, shared) = s.finish();
    let resumed = shared.again_ready.load(Ordering::Relaxed) as u64;
    let failed = shared.again_failed.load(Ordering::Relaxed) as u64;
    let replayed = shared.k(kind::REPLAYED);
    let recovered = shared.k(kind::RECOVERED);
    let not_recovered = shared.k(kind::NOT_RECOVERED);
    let missing = shared.k(kind::MISSING);
    let duplicates = shared.k(kind::DUPLICATE);
    let expected = left * g;
    r.put("subscribers", n);
    if let Some(t) = &o.resume_target {
        r.put("resume_url", format!("ws://{}{}", t.host, t.path));
    }
    r.put("messages", g);
    r.put("warmup", w);
    r.put("in_flight", o.in_flight);
    r.put("warmup_deliveries", warm_got);
    r.put_f("warmup_waited_s", warm_s, 2);
    r.put("left", left);
    if let Some(t) = gone_s {
        r.put_f("server_saw_all_leave_s", t, 2);
    }
    r.put("gap_stored", stored);
    r.put_f("gap_waited_s", gap_s, 3);
    r.put("resumed", resumed);
    r.put("resume_failed", failed);
    r.put("recovered", recovered);
    r.put("not_recovered", not_recovered);
    r.put("expected_replayed", expected);
    r.put("replayed", replayed);
    r.put("missing", missing);
    r.put("duplicates", duplicates);
    let all_s = wr.last_again_ns.saturating_sub(t0) as f64 / 1e9;
    if resumed > 0 {
        r.put_f("time_to_all_recovered_s", all_s, 3);
        r.put_f("resumes_per_s", resumed as f64 / all_s.max(1e-9), 0);
    }
    // Per subscriber: its reconnect -> recovered; the resume's start -> its recovered (queued
    // behind --in-flight); subscribe with since -> subscribed (the server's replay).
    r.put_hist("resume", &wr.hist("resume"));
    r.put_hist("resume_wait", &wr.hist("resume_wait"));
    r.put_hist("replay", &wr.hist("replay"));
    r.put_hist("handshake", &wr.handshake);
    if let Some(cpu) = cpu_us(at_resume, after) {
        if resumed > 0 {
            r.put_f("server_cpu_us_per_resume", cpu / resumed as f64, 1);
        }
        if replayed > 0 {
            r.put_f(
                "server_cpu_us_per_replayed_message",
                cpu / replayed as f64,
                3,
            );
        }
        if let (Some(a), Some(b)) = (at_resume, after) {
            let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
            r.put_f(
                "server_cpu_pct_resume",
                b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
                1,
            );
        }
    }
    if let (Some(a), Some(b)) = (own_resume, own_after) {
        let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
        r.put_f(
            "generator_cpu_pct_resume",
            b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
            1,
        );
    }
    proc_rows(&mut r, "before", before);
    proc_rows(&mut r, "at_resume", at_resume);
    proc_rows(&mut r, "after", after);
    r.put("connections", n + 1);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if warm_got < w * subs {
        r.fail(format!(
            "warm-up: {warm_got} of {} deliveries within {} s",
            w * subs,
            o.drain_s
        ));
    }
    if left < subs {
        r.fail(format!("only {left} of {subs} subscribers left"));
    }
    if clients_before.is_some() && gone_s.is_none() {
        r.fail(format!(
            "/health still counted the subscribers that left after {} s",
            o.baseline_timeout_s
        ));
    }
    if stored < g {
        r.fail(format!(
            "the publisher got {stored} of its {g} gap messages back within {} s",
            o.drain_s
        ));
    }
    if !resumed_all {
        r.fail(format!(
            "resume incomplete: {resumed} of {left} resumed after {} s",
            o.setup_timeout_s
        ));
    }
    if not_recovered > 0 {
        r.fail(format!(
            "{not_recovered} subscribed without recovered: true"
        ));
    }
    if missing > 0 || duplicates > 0 {
        r.fail(format!(
            "replay: {missing} offsets missing, {duplicates} duplicate or out of order"
        ));
    }
    if replayed != expected {
        r.fail(format!(
            "replayed {replayed} messages, expected {expected} ({left} x {g})"
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

fn typing_storm(o: &Opts) -> Report {
    const NAME: &str = "typing-storm";
    let mut r = Report::new(NAME);
    let members_n = o.connections;
    let t = o.typers;
    let roles: Vec<Role> = (0..members_n)
        .map(|u| Role::Member {
            user: u as u32,
            room: 0,
        })
        .collect();
    let mut plan = base_plan(o, roles, 1);
    plan.user_names = (0..members_n)
        .map(|u| format!("lt{}t{u}", plan.nonce))
        .collect();
    plan.traffic = Traffic::Typing;
    // Typers spread evenly over the members (and so over the threads).
    plan.senders = (0..t).map(|k| k * members_n / t).collect();
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error(NAME, e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    let members = s.shared.members[0].load(Ordering::Relaxed);
    let others = members.saturating_sub(1);
    let before = sample(o);
    let own_before = own_sample();
    let (start, end) = s.run(o.duration_s);
    let own_run = own_sample();
    let drained_s = s.drain(o.drain_s, |sh| {
        sh.k(kind::START_EVENTS) >= sh.k(kind::FIRST_STARTS) * others
            && sh.k(kind::STOP_EVENTS) >= sh.k(kind::STOPS) * others
    });
    let after = sample(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, shared) = s.finish();
    let sent = shared.sent.load(Ordering::Relaxed);
    let first = shared.k(kind::FIRST_STARTS);
    let renewals = shared.k(kind::RENEWALS);
    let stops = shared.k(kind::STOPS);
    let start_ev = shared.k(kind::START_EVENTS);
    let stop_ev = shared.k(kind::STOP_EVENTS);
    let (exp_start, exp_stop) = (first * others, stops * others);
    let events = start_ev + stop_ev;
    // Without coalescing every renewal would reach every other member too.
    let saved = renewals * others;
    let run_s = (end - start) as f64 / 1e9;
    r.put("members", members_n);
    r.put("typers", t);
    r.put_f("renew_s", o.renew_s, 2);
    r.put("stop_every", o.stop_every);
    r.put_f("typing_ttl_s", o.typing_ttl_s, 1);
    r.put_f("commands_per_s", o.rate, 1);
    r.put_f("run_s", run_s, 2);
    r.put("commands_sent", sent);
    r.put("first_starts", first);
    r.put("renewals", renewals);
    r.put("stops", stops);
    r.put("expected_start_events", exp_start);
    r.put("start_events", start_ev);
    r.put("expected_stop_events", exp_stop);
    r.put("stop_events", stop_ev);
    r.put("events_received", events);
    r.put_f("events_per_s", events as f64 / run_s, 0);
    r.put("frames_saved_by_coalescing", saved);
    if events > 0 {
        r.put_f(
            "coalescing_saved_pct",
            saved as f64 / (saved + events) as f64 * 100.0,
            1,
        );
    }
    r.put_f("drain_waited_s", drained_s, 2);
    r.put_hist("typing_start", &wr.hist("typing_start"));
    r.put_hist("typing_stop", &wr.hist("typing_stop"));
    if let (Some(cpu), true) = (cpu_us(before, after), events > 0) {
        r.put_f("server_cpu_us_per_typing_event", cpu / events as f64, 3);
        r.put_f("server_cpu_us_per_command", cpu / sent.max(1) as f64, 2);
    }
    if let (Some(a), Some(b)) = (own_before, own_run) {
        let win = b.at_ns.saturating_sub(a.at_ns).max(1) as f64;
        r.put_f(
            "generator_cpu_pct_run",
            b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / win * 100.0,
            1,
        );
    }
    proc_rows(&mut r, "after", after);
    r.put("connections", members_n);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {members_n} ready after {} s",
            o.setup_timeout_s
        ));
    }
    if start_ev != exp_start {
        r.fail(format!(
            "{start_ev} typing.start events, expected {exp_start} ({first} first starts x \
             {others} other members); the server drops typing first under backpressure \
             (see its counters)"
        ));
    }
    if stop_ev < exp_stop {
        r.fail(format!(
            "{stop_ev} typing.stop events, expected at least {exp_stop} ({stops} stops x {others})"
        ));
    }
    failure_rows(&mut r, &wr);
    r
}

fn presence_churn(o: &Opts) -> Report {
    const NAME: &str = "presence-churn";
    let mut r = Report::new(NAME);
    let w = o.connections;
    let u = o.churners;
    let mut roles: Vec<Role> = (0..w)
        .map(|i| Role::Watcher {
            first: ((i * o.watch) % u) as u32,
        })
        .collect();
    roles.extend((0..u).map(|k| Role::Churner { user: k as u32 }));
    let mut plan = base_plan(o, roles, 0);
    plan.user_names = (0..u).map(|k| format!("lt{}p{k}", plan.nonce)).collect();
    plan.traffic = Traffic::Presence;
    let s = match Session::start(plan) {
        Ok(s) => s,
        Err(e) => return setup_error(NAME, e),
    };
    let complete = s.wait_setup(o.setup_timeout_s);
    std::thread::sleep(Duration::from_secs_f64(WATCH_SETTLE_S));
    let before = sample(o);
    let (start, end) = s.run(o.duration_s);
    // Does a leave outlast the grace (offline, then online on return), or is it a blip the
    // grace hides (no event at all)? Too close to the grace to tell: not judged.
    let mode = if o.away_s >= o.grace_s + GRACE_MARGIN_S {
        "events"
    } else if o.away_s + GRACE_MARGIN_S <= o.grace_s {
        "blips"
    } else {
        "unjudged"
    };
    let received = |sh: &Shared| sh.k(kind::ONLINE_EVENTS) + sh.k(kind::OFFLINE_EVENTS);
    let drained_s = match mode {
        "events" => s.drain(o.drain_s, |sh| {
            received(sh) >= sh.k(kind::EXPECTED_EVENTS)
                && sh.again_ready.load(Ordering::Relaxed) as u64
                    + sh.again_failed.load(Ordering::Relaxed) as u64
                    >= sh.k(kind::RECONNECTS)
        }),
        // Long enough for an offline that should not come.
        _ => s.drain(o.drain_s.min(o.grace_s + GRACE_MARGIN_S), |_| false),
    };
    let after = sample(o);
    let ready = s.shared.ready.load(Ordering::Relaxed);
    let (wr, shared) = s.finish();
    let disconnects = shared.k(kind::DISCONNECTS);
    let reconnects = shared.k(kind::RECONNECTS);
    let back = shared.again_ready.load(Ordering::Relaxed) as u64;
    let back_failed = shared.again_failed.load(Ordering::Relaxed) as u64;
    let online = shared.k(kind::ONLINE_EVENTS);
    let offline = shared.k(kind::OFFLINE_EVENTS);
    let events = online + offline;
    let expected = match mode {
        "events" => Some(shared.k(kind::EXPECTED_EVENTS)),
        "blips" => Some(0),
        _ => None,
    };
    let run_s = (end - start) as f64 / 1e9;
    let changes = if mode == "events" {
        disconnects + reconnects
    } else {
        0
    };
    r.put("watchers", w);
    r.put("churners", u);
    r.put("watch_per_watcher", o.watch);
    r.put_f("watchers_per_churner", (w * o.watch) as f64 / u as f64, 1);
    r.put_f("reconnects_per_s_target", o.rate, 1);
    r.put_f("away_s", o.away_s, 2);
    r.put_f("grace_s", o.grace_s, 2);
    r.put_f("cycle_s", u as f64 / o.rate, 2);
    r.put("mode", mode);
    r.put_f("run_s", run_s, 2);
    r.put("disconnects", disconnects);
    r.put("reconnects", reconnects);
    r.put("reconnected", back);
    r.put("reconnect_failed", back_failed);
    r.put("presence_changes", changes);
    r.put("expected_events", expected);
    r.put("online_events", online);
    r.put("offline_events", offline);
    r.put_f("events_per_s", events as f64 / run_s, 0);
    r.put("events_at_watch_time", shared.k(kind::EARLY_EVENTS));
    r.put("watch_states", shared.k(kind::WATCH_STATES));
    r.put_f("drain_waited_s", drained_s, 2);
    // From the churner's connect() (online) or close (offline, so grace included) to the
    // watcher's event.
    r.put_hist("online", &wr.hist("online"));
    r.put_hist("offline", &wr.hist("offline"));
    let off = wr.hist("offline");
    if !off.is_empty() {
        // The same percentiles less the grace: what the server adds to it (timer ticks).
        let grace_us = o.grace_s * 1e6;
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            r.put_f(
                &format!("offline_{name}_past_grace_us"),
                off.value_at_quantile(q) as f64 / 1000.0 - grace_us,
                1,
            );
        }
    }
    if let Some(cpu) = cpu_us(before, after) {
        if changes > 0 {
            r.put_f("server_cpu_us_per_change", cpu / changes as f64, 2);
        }
        if events > 0 {
            r.put_f("server_cpu_us_per_event", cpu / events as f64, 3);
        }
        if reconnects > 0 {
            r.put_f("server_cpu_us_per_reconnect", cpu / reconnects as f64, 2);
        }
    }
    proc_rows(&mut r, "after", after);
    r.put("connections", w + u);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} ready after {} s",
            w + u,
            o.setup_timeout_s
        ));
    }
    if back + back_failed < reconnects || back_failed > 0 {
        r.fail(format!(
            "{reconnects} reconnects: {back} back, {back_failed} failed"
        ));
    }
    if let Some(exp) = expected {
        if events != exp {
            r.fail(format!(
                "{events} presence events ({online} online, {offline} offline), expected {exp} \
                 (mode {mode}: --away {} s against --grace {} s)",
                o.away_s, o.grace_s
            ));
        }
    }
    failure_rows(&mut r, &wr);
    r
}

fn rest_read(o: &Opts) -> Report {
    const NAME: &str = "rest-read";
    let mut r = Report::new(NAME);
    let nonce = now_ns() % 1_000_000_007;
    let setup_timeout = Duration::from_secs_f64(o.setup_timeout_s);
    let thread = match rest::setup_thread(
        o.target.addr,
        &o.target.host,
        nonce,
        o.messages,
        o.payload_bytes,
        setup_timeout,
    ) {
        Ok(t) => t,
        Err(e) => return setup_error(NAME, format!("setup: {e}")),
    };
    let threads = o.threads.min(o.connections).max(1);
    let plan = Arc::new(rest::RestPlan {
        addr: o.target.addr,
        host: o.target.host.clone(),
        source_ips: o.source_ips.clone(),
        connections: o.connections,
        threads,
        in_flight_per_thread: o.in_flight.div_ceil(threads).max(1),
        interval_ns: 1e9 / o.rate,
        closed_loop: o.closed_loop,
        page_path: format!("{}?limit={}", thread.messages_path, o.limit),
        user: thread.user.clone(),
        limit: o.limit,
        messages: thread.posted,
        walk: o.walk,
        other_path: o
            .get_path
            .as_ref()
            .map(|p| p.replace("{user}", &thread.user)),
        connect_timeout_ns: (o.connect_timeout_s * 1e9) as u64,
    });
    let shared = Arc::new(Shared::new(0));
    let handles = match rest::start(&plan, &shared) {
        Ok(h) => h,
        Err(e) => return setup_error(NAME, e),
    };
    let deadline = now_ns() + (o.setup_timeout_s * 1e9) as u64;
    let complete = loop {
        let done =
            shared.ready.load(Ordering::Relaxed) + shared.setup_failed.load(Ordering::Relaxed);
        if done >= o.connections {
            break true;
        }
        if now_ns() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS));
    };
    let ready = shared.ready.load(Ordering::Relaxed);
    let before = sample(o);
    let threads_before = threads_sample(o);
    let own_before = own_sample();
    let busy_before = sys::machine_busy_ns();
    let db_before = o.db_pid.and_then(sys::tree_cpu_ns);
    let start = now_ns() + RUN_LEAD_NS;
    let end = start + (o.duration_s * 1e9) as u64;
    shared.run_start_ns.store(start, Ordering::Release);
    shared.run_end_ns.store(end, Ordering::Release);
    shared.phase.store(phase::RUN, Ordering::Release);
    sleep_until(end);
    let ok_in_run = shared.k(kind::REST_OK);
    let after_run = sample(o);
    let threads_after = threads_sample(o);
    let own_run = own_sample();
    let busy_run = sys::machine_busy_ns();
    let db_run = o.db_pid.and_then(sys::tree_cpu_ns);
    shared.phase.store(phase::DRAIN, Ordering::Release);
    let settled = |sh: &Shared| {
        sh.k(kind::REST_DONE) + sh.k(kind::REST_BACKLOG_DROPPED) >= sh.k(kind::REST_SCHEDULED)
    };
    let t0 = now_ns();
    let drain_deadline = t0 + (o.drain_s * 1e9) as u64;
    while !settled(&shared) && now_ns() < drain_deadline {
        std::thread::sleep(Duration::from_millis(CONTROL_TICK_MS));
    }
    let drained_s = (now_ns() - t0) as f64 / 1e9;
    let after = sample(o);
    shared.phase.store(phase::CLOSE, Ordering::Release);
    let mut wr = WorkerReport::empty();
    let mut retry_reason = None;
    for h in handles {
        match h.join() {
            Ok((w, why)) => {
                wr.merge(w);
                retry_reason = retry_reason.or(why);
            }
            Err(_) => r.fail("worker thread panicked"),
        }
    }
    let k = |slot| shared.k(slot);
    let scheduled = k(kind::REST_SCHEDULED);
    let done = k(kind::REST_DONE);
    let okn = k(kind::REST_OK);
    let errors = k(kind::REST_ERRORS);
    let dropped_backlog = k(kind::REST_BACKLOG_DROPPED);
    let in_flight = scheduled.saturating_sub(done + dropped_backlog);
    let run_s = (end - start) as f64 / 1e9;
    r.put("thread_id", thread.id.as_str());
    r.put("user", thread.user.as_str());
    r.put("messages", thread.posted);
    r.put_f("setup_s", thread.setup_s, 2);
    if thread.setup_s > 0.0 {
        r.put_f(
            "setup_posts_per_s",
            thread.posted as f64 / thread.setup_s,
            0,
        );
    }
    r.put("limit", o.limit);
    r.put("walk", o.walk);
    if let Some(p) = &plan.other_path {
        r.put("get", p.as_str());
    }
    r.put("mode", if o.closed_loop { "closed" } else { "open" });
    if !o.closed_loop {
        r.put_f("rate_per_s", o.rate, 1);
    }
    r.put("threads", threads);
    r.put_f("run_s", run_s, 2);
    r.put("requests_scheduled", scheduled + dropped_backlog);
    r.put("requests_sent", shared.sent.load(Ordering::Relaxed));
    r.put("responses_ok", okn);
    r.put("errors", errors);
    r.put_f("requests_per_s", ok_in_run as f64 / run_s, 0);
    r.put("retried", k(kind::REST_RETRIED));
    if let Some(why) = retry_reason {
        r.put("first_retry_reason", why);
    }
    r.put("reconnects", k(kind::REST_RECONNECTS));
    r.put("idle_closes", k(kind::REST_IDLE_CLOSES));
    r.put("backlog_peak", k(kind::REST_BACKLOG_PEAK));
    r.put("backlog_dropped", dropped_backlog);
    r.put("in_flight_at_end", in_flight);
    if okn > 0 {
        r.put_f(
            "body_bytes_mean",
            k(kind::REST_BODY_BYTES) as f64 / okn as f64,
            0,
        );
    }
    r.put_f("drain_waited_s", drained_s, 2);
    // From the scheduled time (open loop: waiting for a connection included), and from the
    // write of the request.
    r.put_hist("latency", &wr.latency);
    r.put_hist("response", &wr.hist("response"));
    if let (Some(cpu), true) = (cpu_us(before, after), okn > 0) {
        r.put_f("server_cpu_us_per_request", cpu / okn as f64, 2);
    }
    run_cpu_rows(
        &mut r,
        (before, after_run),
        (own_before, own_run),
        (busy_before, busy_run),
        (db_before, db_run),
    );
    thread_rows(&mut r, &threads_before, &threads_after, before, after_run);
    proc_rows(&mut r, "after", after);
    r.put("connections", o.connections);
    r.put("ready", ready);
    r.put(
        "dropped_after_ready",
        shared.dropped.load(Ordering::Relaxed),
    );
    if !complete {
        r.fail(format!(
            "setup incomplete: {ready} of {} connections after {} s",
            o.connections, o.setup_timeout_s
        ));
    }
    if errors > 0 {
        r.fail(format!(
            "{errors} requests failed, e.g. {:?}",
            wr.error_samples
        ));
    }
    if dropped_backlog > 0 {
        r.fail(format!(
            "{dropped_backlog} requests dropped: the backlog of {} per worker was full (the \
             server answers slower than --rate; try --closed-loop for its rate)",
            rest::BACKLOG_MAX
        ));
    }
    if in_flight > 0 {
        r.fail(format!(
            "{in_flight} requests unanswered after --drain {} s",
            o.drain_s
        ));
    }
    if okn == 0 {
        r.fail("no request was answered with a good page");
    }
    for (why, n) in &wr.failures {
        r.fail(format!("{n} x {why}"));
    }
    r
}

/// Prints one table row per JSON line of a results file; returns the exit code.
fn summary(path: Option<&str>) -> i32 {
    let Some(path) = path else {
        eprintln!("usage: switchboard-load summary FILE.jsonl");
        return 2;
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            return 2;
        }
    };
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => rows.push(report::summary_row(&v)),
            Err(e) => rows.push(("?".into(), "?".into(), format!("unparsable line: {e}"))),
        }
    }
    print!("{}", report::summary_table(&rows));
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(line: &str) -> Opts {
        let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
        args::parse(&argv).expect("valid arguments")
    }

    fn get(r: &Report, key: &str) -> serde_json::Value {
        r.json()[key].clone()
    }

    #[test]
    fn typing_storm_counts_coalesced_renewals_against_a_mock_server() {
        let url = mock::start(Duration::from_secs(1), Duration::from_millis(100));
        let r = typing_storm(&opts(&format!(
            "typing-storm --url {url} --connections 12 --typers 3 --renew 0.2 --typing-ttl 1 \
             --stop-every 3 --duration 1.3 --drain 2 --source-ips 127.0.0.1"
        )));
        assert!(r.failures.is_empty(), "{:?}\n{}", r.failures, r.table());
        let first = get(&r, "first_starts").as_u64().unwrap();
        let renewals = get(&r, "renewals").as_u64().unwrap();
        let stops = get(&r, "stops").as_u64().unwrap();
        assert!(first >= 3 && renewals >= 3 && stops >= 3, "{}", r.table());
        assert_eq!(get(&r, "start_events").as_u64(), Some(first * 11));
        assert_eq!(
            get(&r, "frames_saved_by_coalescing").as_u64(),
            Some(renewals * 11)
        );
        assert!(get(&r, "typing_start_count").as_u64().unwrap() > 0);
    }

    #[test]
    fn presence_churn_expects_offline_and_online_per_cycle_against_a_mock_server() {
        let url = mock::start(Duration::from_secs(6), Duration::from_millis(100));
        let r = presence_churn(&opts(&format!(
            "presence-churn --url {url} --connections 8 --churners 4 --watch 2 --rate 4 \
             --away 0.6 --grace 0.1 --duration 2 --drain 2 --source-ips 127.0.0.1"
        )));
        assert!(r.failures.is_empty(), "{:?}\n{}", r.failures, r.table());
        assert_eq!(get(&r, "mode"), "events");
        let cycles = get(&r, "disconnects").as_u64().unwrap();
        assert!(cycles >= 4, "{}", r.table());
        // 8 watchers x 2 users over 4 churners: 4 watchers each, an offline and an online.
        assert_eq!(get(&r, "expected_events").as_u64(), Some(cycles * 8));
        assert_eq!(get(&r, "offline_events").as_u64(), Some(cycles * 4));
        assert!(get(&r, "online_count").as_u64().unwrap() > 0);
        assert_eq!(get(&r, "watch_states").as_u64(), Some(8));
        assert_eq!(get(&r, "unexpected_frames").as_u64(), Some(0));
    }

    #[test]
    fn presence_churn_blips_inside_the_grace_give_no_event() {
        let url = mock::start(Duration::from_secs(6), Duration::from_millis(1200));
        let r = presence_churn(&opts(&format!(
            "presence-churn --url {url} --connections 4 --churners 2 --watch 1 --rate 4 \
             --away 0.2 --grace 1.2 --duration 1 --drain 2 --source-ips 127.0.0.1"
        )));
        assert!(r.failures.is_empty(), "{:?}\n{}", r.failures, r.table());
        assert_eq!(get(&r, "mode"), "blips");
        assert!(get(&r, "disconnects").as_u64().unwrap() >= 2);
        assert_eq!(get(&r, "online_events").as_u64(), Some(0));
        assert_eq!(get(&r, "offline_events").as_u64(), Some(0));
    }
}
