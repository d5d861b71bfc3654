//! Throwaway PostgreSQL clusters for the store tests.
//!
//! Owns: finding the server binaries, `initdb` into a fresh directory under
//! `$TMPDIR/switchboard-test-pg/` (as the `postgres` OS user when the tests run as root, which
//! PostgreSQL refuses to run as), `pg_ctl start` on a free loopback port with its socket in that
//! directory, one database per test ([`PgCluster::database`]), and stopping every cluster when
//! the test process exits (an `atexit` guard; a cluster of a process that died without it, such
//! as a killed run, is stopped and removed by the next run). [`shared`] is the one cluster of a
//! test binary, started on first use; a test that stops its server (the fault tests) or needs
//! `fsync` starts its own with [`PgCluster::start`].
//!
//! Missing binaries fail the test with the command that installs them: a store test never
//! passes by skipping. Every wait here is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// Directory under the temp dir that holds every test cluster, one subdirectory each, named
/// `<pid>-<n>` after the test process that owns it.
const ROOT_DIR_NAME: &str = "switchboard-test-pg";
/// `pg_ctl -t`: most seconds a start or stop may take.
const PG_CTL_WAIT_SECS: u32 = 30;
/// Ports tried before giving up when the picked one was taken between the probe and the bind.
const START_ATTEMPTS_MAX: usize = 5;
/// Connections the test server accepts (each test's store opens a small pool; tests run in
/// parallel threads).
const MAX_CONNECTIONS: u32 = 200;

static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);
static DATABASE_SEQ: AtomicUsize = AtomicUsize::new(0);
/// Data directories of the running clusters of this process (stopped at exit).
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();
static CLEAN_STALE: Once = Once::new();
static SHARED: OnceLock<PgCluster> = OnceLock::new();

#[derive(Clone)]
struct Running {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
}

/// Options of a cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// `fsync=on` (real durability, for measurements) or `off` (tests only: a test cluster
    /// holds nothing worth keeping after a power cut, and fsync would only slow the tests).
    pub fsync: bool,
}

/// One running PostgreSQL cluster (the server stops when this is dropped or the process exits).
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    opts: ClusterOptions,
}

/// The shared cluster of this test binary (fsync off), started on first use.
pub fn shared() -> &'static PgCluster {
    SHARED.get_or_init(|| PgCluster::start(ClusterOptions { fsync: false }))
}

/// A fresh database in the shared cluster: its `postgres://` URL.
pub fn database(label: &str) -> String {
    shared().database(label)
}

/// Where the server binaries are: `SWITCHBOARD_TEST_PG_BIN` (set by tests/run-all.sh), else the
/// directory of `initdb` on PATH, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> PathBuf {
    let usable = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("SWITCHBOARD_TEST_PG_BIN") {
        let d = PathBuf::from(d);
        assert!(
            usable(&d),
            "SWITCHBOARD_TEST_PG_BIN={} has no initdb and pg_ctl: point it at the PostgreSQL \
             server binaries (Debian: /usr/lib/postgresql/<version>/bin, from \
             `apt-get install postgresql`) or unset it",
            d.display()
        );
        return d;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if usable(&d) {
                // Debian links them from elsewhere; pg_ctl finds `postgres` next to itself.
                let initdb = std::fs::canonicalize(d.join("initdb")).unwrap_or(d.join("initdb"));
                return initdb.parent().map(Path::to_path_buf).unwrap_or(d);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let d = e.path().join("bin");
            usable(&d).then_some((v, d))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, d)) => d,
        None => panic!(
            "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: the store tests \
             need them. Install them with `apt-get install postgresql` (Debian; \
             `bash tests/run-all.sh` does it when run as root), or point \
             SWITCHBOARD_TEST_PG_BIN at a directory that has them"
        ),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> (u32, u32) {
    let name = c"postgres";
    // SAFETY: getpwnam takes a NUL-terminated name and returns NULL or a pointer to a static
    // record, read at once on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "the tests run as root, and PostgreSQL refuses to run as root, but there is no \
         `postgres` user to run it as: `apt-get install postgresql` creates it"
    );
    // SAFETY: pw is non-null and points at a valid passwd record (see above).
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown(path: &Path, ids: (u32, u32)) {
    std::os::unix::fs::chown(path, Some(ids.0), Some(ids.1))
        .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
}

/// Run a server binary (as `run_as` through runuser when set); its output.
fn run(bin: &Path, run_as: Option<&str>, tool: &str, args: &[&str]) -> Output {
    let exe = bin.join(tool);
    let mut cmd = match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(args)
        // The cluster is ours: nothing from the caller's libpq environment applies.
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .env("LC_ALL", "C");
    cmd.output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
}

fn root_dir() -> PathBuf {
    std::env::temp_dir().join(ROOT_DIR_NAME)
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Stop and remove the clusters of test processes that are gone.
fn clean_stale(bin: &Path, run_as: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(root_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        stop_dir(&e.path(), bin, run_as);
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// The processes of the server of data directory `data`: the postmaster (from
/// `postmaster.pid`) and its children; empty when it does not run.
fn server_pids(data: &Path) -> Vec<i32> {
    let Ok(pid_file) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return Vec::new();
    };
    let Some(main) = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return Vec::new();
    };
    if !process_alive(main as u32) {
        return Vec::new();
    }
    let mut pids = vec![main];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(main) {
            pids.push(pid);
        }
    }
    pids
}

fn signal_all(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: kill has no memory preconditions; a process gone since the scan is ESRCH.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stop the server of a cluster directory, if it runs: `pg_ctl stop -m immediate` (after a
/// SIGCONT, in case a test froze it), then SIGKILL if that did not do it.
fn stop_dir(dir: &Path, bin: &Path, run_as: Option<&str>) {
    let data = dir.join("data");
    let pids = server_pids(&data);
    if pids.is_empty() {
        return;
    }
    signal_all(&pids, libc::SIGCONT);
    let wait = PG_CTL_WAIT_SECS.to_string();
    let data_arg = data.to_string_lossy().into_owned();
    let out = run(
        bin,
        run_as,
        "pg_ctl",
        &[
            "stop",
            "-D",
            &data_arg,
            "-m",
            "immediate",
            "-w",
            "-t",
            &wait,
        ],
    );
    if !out.status.success() {
        signal_all(&server_pids(&data), libc::SIGKILL);
    }
}

extern "C" fn stop_all_at_exit() {
    let running = match RUNNING.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for r in running {
        stop_dir(&r.dir, &r.bin, r.run_as.as_deref());
        let _ = std::fs::remove_dir_all(&r.dir);
    }
}

impl PgCluster {
    /// initdb and start a cluster on a free loopback port; panics with the server's log when
    /// it cannot.
    pub fn start(opts: ClusterOptions) -> PgCluster {
        let bin = bin_dir();
        let run_as = is_root().then(|| "postgres".to_owned());
        CLEAN_STALE.call_once(|| clean_stale(&bin, run_as.as_deref()));
        AT_EXIT.call_once(|| {
            // SAFETY: registers a plain extern "C" function with no captured state.
            let rc = unsafe { libc::atexit(stop_all_at_exit) };
            assert_eq!(rc, 0, "atexit");
        });
        let root = root_dir();
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let n = CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sock"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        if run_as.is_some() {
            let ids = postgres_ids();
            chown(&dir, ids);
            chown(&dir.join("sock"), ids);
        }
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Running {
                dir: dir.clone(),
                bin: bin.clone(),
                run_as: run_as.clone(),
            });
        let data = dir.join("data").to_string_lossy().into_owned();
        let out = run(
            &bin,
            run_as.as_deref(),
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                // initdb's own fsync of the new files: a crash right now loses nothing we need.
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = PgCluster {
            port: 0,
            dir,
            bin,
            run_as,
            opts,
        };
        for _ in 0..START_ATTEMPTS_MAX {
            cluster.port = super::free_port();
            if cluster.try_start() {
                return cluster;
            }
            if !cluster.log().contains("could not bind") {
                break;
            }
        }
        panic!(
            "PostgreSQL did not start (bin {}); its log:\n{}",
            cluster.bin.display(),
            cluster.log()
        );
    }

    /// `pg_ctl start` on this cluster's port; whether the server came up.
    fn try_start(&self) -> bool {
        let o = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync={} -c max_connections={}",
            self.port,
            self.dir.join("sock").display(),
            if self.opts.fsync { "on" } else { "off" },
            MAX_CONNECTIONS,
        );
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        let wait = PG_CTL_WAIT_SECS.to_string();
        run(
            &self.bin,
            self.run_as.as_deref(),
            "pg_ctl",
            &[
                "start", "-D", &data, "-l", &log, "-w", "-t", &wait, "-o", &o,
            ],
        )
        .status
        .success()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a fresh, empty database (named after `label`, unique in this process); its URL.
    pub fn database(&self, label: &str) -> String {
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        let name = format!(
            "t{}_{}_{clean}",
            std::process::id(),
            DATABASE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let port = self.port.to_string();
        let out = run(
            &self.bin,
            None,
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name],
        );
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Stop the server the hard way (`pg_ctl stop -m immediate`: no shutdown checkpoint,
    /// clients cut off), as a crash would.
    pub fn stop_immediate(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let wait = PG_CTL_WAIT_SECS.to_string();
        let out = run(
            &self.bin,
            self.run_as.as_deref(),
            "pg_ctl",
            &["stop", "-D", &data, "-m", "immediate", "-w", "-t", &wait],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start the server again on the same port (after [`PgCluster::stop_immediate`]; it
    /// recovers from its WAL).
    pub fn restart(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not start again on port {}; its log:\n{}",
            self.port,
            self.log()
        );
    }
}

impl PgCluster {
    fn signal(&self, sig: i32) {
        let pids = server_pids(&self.dir.join("data"));
        assert!(!pids.is_empty(), "the server is not running");
        signal_all(&pids, sig);
    }

    /// Freeze the server (SIGSTOP to it and its backends): connections stay open and nothing
    /// answers, as with a silent network. [`PgCluster::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop_dir(&self.dir, &self.bin, self.run_as.as_deref());
        let _ = std::fs::remove_dir_all(&self.dir);
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r.dir != self.dir);
    }
}
