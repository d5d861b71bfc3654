//! Command-line parsing for `switchboard-load`: `SUBCOMMAND [--flag value]...`, hand-rolled so
//! the generator builds fast and every default is visible in one place ([`Opts::default`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Most WebSocket connections one generator process opens (the machine's hard RLIMIT_NOFILE is
/// 20,000; the rest is kept for publishers, the epoll fd and stdio).
pub const CONNECTIONS_MAX: usize = 19_500;
/// Generator processes one run may use (`--processes`).
pub const PROCESSES_MAX: usize = 16;
/// Most publisher connections of a fanout run.
pub const PUBLISHERS_MAX: usize = 400;
/// Most worker threads.
pub const THREADS_MAX: usize = 64;
/// Most servers one run spreads its connections over (`--urls`).
pub const URLS_MAX: usize = 16;
/// Most source addresses in `--source-ips`.
pub const SOURCE_IPS_MAX: usize = 256;
/// Longest run phase one invocation may ask for.
pub const DURATION_S_MAX: f64 = 3600.0;
/// Most messages a history-resume run publishes while the subscribers are away (or before, as
/// warm-up).
pub const GAP_MESSAGES_MAX: u64 = 100_000;
/// Most users one presence watcher watches (`--watch`; the server's
/// max_watched_users_per_connection default; sent 100 per frame).
pub const WATCH_MAX: usize = 1000;
/// Shortest time a churner stays connected in one cycle (`--rate` x `--away` must leave it).
pub const CHURN_ONLINE_S_MIN: f64 = 0.2;
/// rest-read: the server's largest page (`store::PAGE_LIMIT_MAX`).
pub const PAGE_LIMIT_MAX: usize = 200;
/// rest-read: most messages the setup posts into the thread.
pub const REST_MESSAGES_MAX: u64 = crate::rest::MESSAGES_MAX;

/// The scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Connect,
    Idle,
    Fanout,
    Dm,
    Churn,
    Echo,
    /// No server: the kernel's cost of accept, epoll_ctl, send and recv on this machine.
    Floor,
    /// Subscribers of a room with history leave, miss `--messages`, and resume at once.
    HistoryResume,
    /// `--typers` of one room's members renew `typing.start` (and sometimes stop).
    TypingStorm,
    /// `--churners` reconnect at `--rate` while the connections watch their presence.
    PresenceChurn,
    /// Keep-alive HTTP connections read one thread's message page over the REST API.
    RestRead,
}

/// Parsed `--url`.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` for the Host header.
    pub host: String,
    pub addr: SocketAddr,
    /// Path of the WebSocket endpoint, e.g. `/ws`.
    pub path: String,
}

/// Every option of every scenario.
#[derive(Debug, Clone)]
pub struct Opts {
    pub scenario: Scenario,
    /// The first of `targets`: the server of one-server scenarios and health checks.
    pub target: Target,
    /// Every server of the run (`--urls`; just `target` without it): connection `i` goes to
    /// `targets[i % len]`, publishers included.
    pub targets: Vec<Target>,
    pub connections: usize,
    pub threads: usize,
    pub duration_s: f64,
    pub source_ips: Vec<Ipv4Addr>,
    pub server_pid: Option<u32>,
    /// history-resume: the server the subscribers reconnect to for their resume
    /// (`--resume-url`; None: the one they left).
    pub resume_target: Option<Target>,
    /// Every server's PID, in the order of `targets` (`--server-pids`; `server_pid` alone
    /// without it): CPU and RSS are summed over them, and fanout reports each node's share.
    pub server_pids: Vec<u32>,
    /// A database server's main process (PostgreSQL's postmaster): its CPU and its direct
    /// children's (the backends) is reported beside the server's (dm, rest-read).
    pub db_pid: Option<u32>,
    pub json_only: bool,
    /// Free text copied into the report (run-bench names its runs with it).
    pub label: String,
    /// Connections in the middle of connect/upgrade/subscribe at once (all threads together).
    pub in_flight: usize,
    /// Microseconds a worker sleeps when a non-blocking poll found nothing, instead of
    /// blocking in epoll (0 = block). See the USAGE text.
    pub batch_us: u64,
    /// Subscribers subscribe in the upgrade URL (`?subscribe=`) instead of with a command.
    pub url_subscribe: bool,
    /// Paths the subscribers connect to, round-robin by connection index (empty: the URL's
    /// path): a room whose subscribers speak several dialects (`ws_dialects`).
    pub sub_paths: Vec<String>,
    /// Generator processes sharing the connections (each with its own fd limit).
    pub processes: usize,
    /// Time for all connections to be set up before the run is called failed.
    pub setup_timeout_s: f64,
    /// Time one connection may take from connect() to subscribed.
    pub connect_timeout_s: f64,
    /// fanout: rooms the subscribers are spread over.
    pub rooms: usize,
    /// fanout: publisher connections (0 = automatic: one per room, at least rate/50).
    pub publishers: usize,
    /// fanout/dm/echo: total sends per second, open loop.
    pub rate: f64,
    /// fanout: bytes of the `data` object of each publish; dm: bytes of `content`.
    pub payload_bytes: usize,
    /// fanout: fraction of subscribers that never read their socket.
    pub slow_fraction: f64,
    /// fanout: SO_RCVBUF of slow subscribers, so that the server feels them quickly.
    pub slow_rcvbuf: usize,
    /// Wait after the run for in-flight deliveries.
    pub drain_s: f64,
    /// idle: wait after all are subscribed before the measurement window.
    pub settle_s: f64,
    /// dm: devices per user.
    pub devices: usize,
    /// churn: connect/disconnect cycles.
    pub cycles: usize,
    /// churn: hold time of each cycle before disconnecting.
    pub hold_s: f64,
    /// churn: allowed RSS growth after the cycles, percent of the baseline.
    pub rss_tolerance_pct: f64,
    /// churn: time for /health to come back to the baseline after each cycle.
    pub baseline_timeout_s: f64,
    /// history-resume: messages published while the subscribers are away (the gap).
    pub messages: u64,
    /// history-resume: messages published before they leave (each remembers the last one).
    pub warmup: u64,
    /// typing-storm: connections among `--connections` that type.
    pub typers: usize,
    /// typing-storm: seconds between two typing commands of one typer.
    pub renew_s: f64,
    /// typing-storm: every K-th command of a typer is `typing.stop` (0 = never).
    pub stop_every: u64,
    /// typing-storm: the server's typing_ttl (renewals must come faster).
    pub typing_ttl_s: f64,
    /// presence-churn: users that reconnect (beside the `--connections` watchers).
    pub churners: usize,
    /// presence-churn: users each watcher watches.
    pub watch: usize,
    /// presence-churn: seconds a churner stays away in each cycle.
    pub away_s: f64,
    /// presence-churn: the server's presence_offline_grace.
    pub grace_s: f64,
    /// rest-read: messages per page (`?limit=`).
    pub limit: usize,
    /// rest-read: each connection follows `next` down the thread instead of re-reading the
    /// newest page.
    pub walk: bool,
    /// rest-read: every connection sends its next request as soon as it has the answer
    /// (`--rate` is ignored).
    pub closed_loop: bool,
    /// rest-read: GET this path instead of the page (`{user}` is the reader), checking only
    /// the status.
    pub get_path: Option<String>,
}

impl Opts {
    fn defaults(scenario: Scenario, target: Target) -> Opts {
        Opts {
            scenario,
            targets: vec![target.clone()],
            resume_target: None,
            target,
            connections: 1000,
            threads: 1,
            duration_s: 10.0,
            source_ips: (1..=50).map(|d| Ipv4Addr::new(127, 0, 0, d)).collect(),
            server_pid: None,
            server_pids: Vec::new(),
            db_pid: None,
            json_only: false,
            label: String::new(),
            in_flight: 256,
            batch_us: 0,
            url_subscribe: false,
            sub_paths: Vec::new(),
            processes: 1,
            setup_timeout_s: 90.0,
            connect_timeout_s: 20.0,
            rooms: 1,
            publishers: 0,
            rate: 100.0,
            payload_bytes: 64,
            slow_fraction: 0.0,
            slow_rcvbuf: 4096,
            drain_s: 5.0,
            settle_s: 3.0,
            devices: 2,
            cycles: 6,
            hold_s: 1.0,
            rss_tolerance_pct: 10.0,
            baseline_timeout_s: 15.0,
            messages: 100,
            warmup: 3,
            typers: 0,
            renew_s: 2.0,
            stop_every: 5,
            typing_ttl_s: 6.0,
            churners: 1000,
            watch: 10,
            away_s: 6.0,
            grace_s: 5.0,
            limit: 50,
            walk: false,
            closed_loop: false,
            get_path: None,
        }
    }

    /// Sockets the run opens in all processes together.
    pub fn sockets(&self) -> usize {
        match self.scenario {
            Scenario::PresenceChurn => self.connections + self.churners,
            _ => self.connections + self.publishers,
        }
    }
}

pub const USAGE: &str = "\
usage: switchboard-load SCENARIO [flags]
       switchboard-load summary FILE.jsonl   (one table row per JSON line)

scenarios: connect | idle | fanout | dm | churn | echo | floor
           history-resume | typing-storm | presence-churn | rest-read

common flags:
  --url ws://127.0.0.1:8081/ws   server endpoint (loopback only)
  --urls URL1,URL2,..            connect, idle, fanout: several servers (nodes of one
                                 cluster); connection i (publishers included) goes to URL
                                 i % count; fanout reports latency per node and same-node
                                 against cross-node
  --connections N                connections (<= 19500 per process), default 1000
  --threads T                    event-loop threads, default 1
  --duration S                   run phase seconds, default 10
  --source-ips A-B|A,B,..        source addresses, round-robin, default 127.0.0.1-127.0.0.50
  --server-pid PID               sample the server's CPU and RSS from /proc
  --server-pids P1,P2,..         with --urls: each server's PID, in the same order (CPU and
                                 RSS summed; fanout: CPU per delivery of each node)
  --db-pid PID                   dm, rest-read: also sample a database's CPU (PID and its
                                 direct children: PostgreSQL's postmaster and backends)
  --in-flight N                  concurrent handshakes, default 256
  --processes P                  run P generator processes, each with every P-th connection
                                 and its own fd limit (up to 19,500 connections each); one
                                 report for all, default 1
  --url-subscribe                subscribe in the upgrade URL (?subscribe=ROOM) instead of
                                 sending a subscribe command after `connected`
  --sub-paths P1,P2,..           fanout subscribers connect to these paths in turn (a room
                                 of several dialects, e.g. /ws,/topic with the server's
                                 ws_dialects mapping /topic=topic); needs --url-subscribe
  --batch-us U                   during the run, poll without blocking and sleep U us when
                                 nothing is ready (0: block in epoll, the default); keeps the
                                 server from paying a loopback wake-up per delivered frame,
                                 adds at most U us to each measured latency
  --setup-timeout S              all connections set up within S, default 90
  --connect-timeout S            one connection set up within S, default 20
  --drain S                      wait for in-flight deliveries after the run, default 5
  --json-only                    print only the JSON line
  --label TEXT                   name of this run, copied into the JSON
fanout: --rooms K --publishers P --rate R --payload-bytes B --slow-fraction F --slow-rcvbuf BYTES
dm:     --devices D --rate R --payload-bytes B   (connections = users * devices)
echo:   --rate R
floor:  --connections N (no server is used; the kernel's per-call costs and the floors
        they put under the targets)
idle:   --settle S (window = --duration)
churn:  --cycles C --hold S --rss-tolerance-pct P --baseline-timeout S
history-resume: --connections N subscribers of one room named bench-*, which the server must
        keep history for; --warmup W (3) messages, all leave, --messages G (100) published,
        all resume at once (--in-flight at a time) with since {offset, epoch}; with
        --resume-url URL they resume on that server instead (another node of the cluster,
        which reads the room's history from Redis; --server-pid is then that node's)
typing-storm: --connections S members (?user_id=) of one room, --typers T (S/10) of them
        send typing.start every --renew S (2), every --stop-every K-th (5, 0 = never) is
        typing.stop; --typing-ttl S (6) is the server's TTL; one process only
presence-churn: --connections W watchers, each --watch K (10) of --churners U (1000) users
        that reconnect at --rate R per second in total, each away --away S (6); --grace S (5)
        is the server's presence_offline_grace; one process only
rest-read: one thread of --messages M (100) messages is posted over REST, then
        --connections N keep-alive HTTP/1.1 connections GET its newest page of --limit L (50)
        at --rate R requests/s in total (open loop), or with --closed-loop as fast as the
        server answers; --walk follows next down the thread; needs auth_mode none; --url may
        be http://HOST:PORT; --get PATH reads PATH instead (only the status is checked;
        {user} is the reader, e.g. /health or /api/v1/presence/user/{user}); one process only
";

fn parse_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("--url must start with ws:// or http:// (got {url})"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--url host {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("--url host {hostport} did not resolve"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--url {addr} is not a loopback address; this generator only targets 127.0.0.0/8 or ::1"
        ));
    }
    Ok(Target {
        host: hostport,
        addr,
        path: path.to_string(),
    })
}

/// Parses `127.0.0.1-127.0.0.50` or `127.0.0.1,127.0.0.2`.
pub fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || (b - a) as usize >= SOURCE_IPS_MAX {
                return Err(format!(
                    "--source-ips range {part} is empty or over {SOURCE_IPS_MAX}"
                ));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.trim().parse().map_err(|e| format!("{part}: {e}"))?);
        }
    }
    if out.is_empty() || out.len() > SOURCE_IPS_MAX {
        return Err(format!("--source-ips needs 1..={SOURCE_IPS_MAX} addresses"));
    }
    if let Some(bad) = out.iter().find(|ip| !IpAddr::V4(**ip).is_loopback()) {
        return Err(format!("--source-ips {bad} is not a loopback address"));
    }
    Ok(out)
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: cannot parse '{v}' as a number"))
}

/// Parses the command line (without argv[0]).
pub fn parse(args: &[String]) -> Result<Opts, String> {
    let Some(first) = args.first() else {
        return Err("missing scenario".into());
    };
    let scenario = match first.as_str() {
        "connect" => Scenario::Connect,
        "idle" => Scenario::Idle,
        "fanout" => Scenario::Fanout,
        "dm" => Scenario::Dm,
        "churn" => Scenario::Churn,
        "echo" => Scenario::Echo,
        "floor" => Scenario::Floor,
        "history-resume" => Scenario::HistoryResume,
        "typing-storm" => Scenario::TypingStorm,
        "presence-churn" => Scenario::PresenceChurn,
        "rest-read" => Scenario::RestRead,
        "-h" | "--help" | "help" => return Err(String::new()),
        other => return Err(format!("unknown scenario '{other}'")),
    };
    let mut url = "ws://127.0.0.1:8081/ws".to_string();
    let mut urls: Option<String> = None;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut json_only = false;
    let mut url_subscribe = false;
    let mut walk = false;
    let mut closed_loop = false;
    let mut i = 1;
    while i < args.len() {
        let flag = args[i].as_str();
        if flag == "--json-only" {
            json_only = true;
            i += 1;
            continue;
        }
        if flag == "--url-subscribe" {
            url_subscribe = true;
            i += 1;
            continue;
        }
        if flag == "--walk" {
            walk = true;
            i += 1;
            continue;
        }
        if flag == "--closed-loop" {
            closed_loop = true;
            i += 1;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if !flag.starts_with("--") {
            return Err(format!("unexpected argument '{flag}'"));
        }
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = args
                    .get(i + 1)
                    .ok_or_else(|| format!("{flag} needs a value"))?;
                i += 1;
                (flag.to_string(), v.clone())
            }
        };
        if name == "--url" {
            url = value;
        } else if name == "--urls" {
            urls = Some(value);
        } else {
            pairs.push((name, value));
        }
        i += 1;
    }
    let mut o = Opts::defaults(scenario, parse_target(&url)?);
    if let Some(list) = urls {
        o.targets = list
            .split(',')
            .filter(|u| !u.is_empty())
            .map(parse_target)
            .collect::<Result<_, _>>()?;
        if o.targets.is_empty() || o.targets.len() > URLS_MAX {
            return Err(format!("--urls needs 1..={URLS_MAX} URLs"));
        }
        o.target = o.targets[0].clone();
    }
    o.json_only = json_only;
    o.url_subscribe = url_subscribe;
    o.walk = walk;
    o.closed_loop = closed_loop;
    for (name, v) in pairs {
        let f = name.as_str();
        match f {
            "--connections" => o.connections = num(f, &v)?,
            "--threads" => o.threads = num(f, &v)?,
            "--duration" => o.duration_s = num(f, &v)?,
            "--source-ips" => o.source_ips = parse_source_ips(&v)?,
            "--server-pid" => o.server_pid = Some(num(f, &v)?),
            "--server-pids" => {
                o.server_pids = v
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| num(f, p))
                    .collect::<Result<_, _>>()?;
            }
            "--db-pid" => o.db_pid = Some(num(f, &v)?),
            "--label" => o.label = v,
            "--resume-url" => o.resume_target = Some(parse_target(&v)?),
            "--in-flight" => o.in_flight = num(f, &v)?,
            "--sub-paths" => {
                o.sub_paths = v.split(',').map(str::to_owned).collect();
                if o.sub_paths.iter().any(|p| !p.starts_with('/')) {
                    return Err(format!("{f}: every path must start with '/': {v}"));
                }
            }
            "--batch-us" => o.batch_us = num(f, &v)?,
            "--processes" => o.processes = num(f, &v)?,
            "--setup-timeout" => o.setup_timeout_s = num(f, &v)?,
            "--connect-timeout" => o.connect_timeout_s = num(f, &v)?,
            "--rooms" => o.rooms = num(f, &v)?,
            "--publishers" => o.publishers = num(f, &v)?,
            "--rate" => o.rate = num(f, &v)?,
            "--payload-bytes" => o.payload_bytes = num(f, &v)?,
            "--slow-fraction" => o.slow_fraction = num(f, &v)?,
            "--slow-rcvbuf" => o.slow_rcvbuf = num(f, &v)?,
            "--drain" => o.drain_s = num(f, &v)?,
            "--settle" => o.settle_s = num(f, &v)?,
            "--devices" => o.devices = num(f, &v)?,
            "--cycles" => o.cycles = num(f, &v)?,
            "--hold" => o.hold_s = num(f, &v)?,
            "--rss-tolerance-pct" => o.rss_tolerance_pct = num(f, &v)?,
            "--baseline-timeout" => o.baseline_timeout_s = num(f, &v)?,
            "--messages" => o.messages = num(f, &v)?,
            "--warmup" => o.warmup = num(f, &v)?,
            "--typers" => o.typers = num(f, &v)?,
            "--renew" => o.renew_s = num(f, &v)?,
            "--stop-every" => o.stop_every = num(f, &v)?,
            "--typing-ttl" => o.typing_ttl_s = num(f, &v)?,
            "--churners" => o.churners = num(f, &v)?,
            "--watch" => o.watch = num(f, &v)?,
            "--away" => o.away_s = num(f, &v)?,
            "--grace" => o.grace_s = num(f, &v)?,
            "--limit" => o.limit = num(f, &v)?,
            "--get" => o.get_path = Some(v),
            _ => return Err(format!("unknown flag {f}")),
        }
    }
    validate(&mut o)?;
    validate_servers(&mut o)?;
    if !o.sub_paths.is_empty() && !o.url_subscribe {
        return Err("--sub-paths needs --url-subscribe (a subscriber of another dialect does not speak the native subscribe command)".into());
    }
    Ok(o)
}

fn validate(o: &mut Opts) -> Result<(), String> {
    if o.processes == 0 || o.processes > PROCESSES_MAX {
        return Err(format!("--processes must be 1..={PROCESSES_MAX}"));
    }
    if o.connections == 0 || o.connections > CONNECTIONS_MAX * o.processes {
        return Err(format!(
            "--connections {} refused: one process opens 1..={CONNECTIONS_MAX} connections \
             (RLIMIT_NOFILE); add --processes for more (each takes every P-th connection)",
            o.connections
        ));
    }
    if o.threads == 0 || o.threads > THREADS_MAX {
        return Err(format!("--threads must be 1..={THREADS_MAX}"));
    }
    let finite_pos = |v: f64| v.is_finite() && v > 0.0;
    if !finite_pos(o.duration_s) || o.duration_s > DURATION_S_MAX {
        return Err(format!("--duration must be in (0, {DURATION_S_MAX}]"));
    }
    for (name, v) in [
        ("--setup-timeout", o.setup_timeout_s),
        ("--connect-timeout", o.connect_timeout_s),
        ("--hold", o.hold_s),
        ("--baseline-timeout", o.baseline_timeout_s),
    ] {
        if !finite_pos(v) || v > DURATION_S_MAX {
            return Err(format!("{name} must be in (0, {DURATION_S_MAX}]"));
        }
    }
    for (name, v) in [("--drain", o.drain_s), ("--settle", o.settle_s)] {
        if !v.is_finite() || !(0.0..=DURATION_S_MAX).contains(&v) {
            return Err(format!("{name} must be in [0, {DURATION_S_MAX}]"));
        }
    }
    if o.in_flight == 0 {
        return Err("--in-flight must be at least 1".into());
    }
    if !o.rate.is_finite() || o.rate <= 0.0 || o.rate > 1_000_000.0 {
        return Err("--rate must be in (0, 1000000]".into());
    }
    if !(0.0..1.0).contains(&o.slow_fraction) {
        return Err("--slow-fraction must be in [0, 1)".into());
    }
    if o.payload_bytes > 60_000 {
        return Err("--payload-bytes must be <= 60000".into());
    }
    if o.rooms == 0 || o.rooms > o.connections {
        return Err("--rooms must be 1..=connections".into());
    }
    if o.scenario == Scenario::Fanout {
        if o.publishers == 0 {
            o.publishers = o.rooms.max((o.rate / 50.0).ceil() as usize);
        }
        if o.publishers > PUBLISHERS_MAX {
            return Err(format!("--publishers must be <= {PUBLISHERS_MAX}"));
        }
    }
    if o.scenario == Scenario::Dm {
        if o.devices == 0 || o.devices > 16 {
            return Err("--devices must be 1..=16".into());
        }
        let per_pair = 2 * o.devices;
        if o.connections < per_pair {
            return Err(format!(
                "dm needs --connections >= 2 * --devices ({per_pair})"
            ));
        }
        // Whole pairs of users only.
        o.connections -= o.connections % per_pair;
    }
    match o.scenario {
        Scenario::HistoryResume => validate_history(o)?,
        Scenario::TypingStorm => validate_typing(o)?,
        Scenario::PresenceChurn => validate_presence(o)?,
        Scenario::RestRead => validate_rest(o)?,
        _ => {}
    }
    if o.cycles == 0 || o.cycles > 1000 {
        return Err("--cycles must be 1..=1000".into());
    }
    if o.target.addr.is_ipv6() {
        // Source addresses are IPv4 loopback; with an IPv6 target the kernel picks.
        o.source_ips.clear();
    }
    Ok(())
}

/// `--urls` and `--server-pids`: several servers only where every connection stands alone
/// (connect, idle, fanout), one PID per URL.
fn validate_servers(o: &mut Opts) -> Result<(), String> {
    if o.resume_target.is_some() && o.scenario != Scenario::HistoryResume {
        return Err("--resume-url is for history-resume only".into());
    }
    let several = o.targets.len() > 1;
    if several
        && !matches!(
            o.scenario,
            Scenario::Connect | Scenario::Idle | Scenario::Fanout
        )
    {
        return Err(format!(
            "--urls with {} servers is for connect, idle and fanout only ({:?} talks to one server)",
            o.targets.len(),
            o.scenario
        ));
    }
    if o.server_pids.is_empty() {
        o.server_pids.extend(o.server_pid);
        return Ok(());
    }
    if o.server_pid.is_some() {
        return Err("give --server-pid or --server-pids, not both".into());
    }
    if o.server_pids.len() != o.targets.len() {
        return Err(format!(
            "--server-pids names {} PIDs for {} servers: one per URL of --urls, in order",
            o.server_pids.len(),
            o.targets.len()
        ));
    }
    o.server_pid = o.server_pids.first().copied();
    Ok(())
}

fn validate_history(o: &mut Opts) -> Result<(), String> {
    if o.messages == 0 || o.messages > GAP_MESSAGES_MAX || o.warmup > GAP_MESSAGES_MAX {
        return Err(format!(
            "--messages must be 1..={GAP_MESSAGES_MAX} and --warmup 0..={GAP_MESSAGES_MAX}"
        ));
    }
    // One publisher connection sends the warm-up and the gap.
    o.publishers = 1;
    o.rooms = 1;
    Ok(())
}

fn one_process(o: &Opts) -> Result<(), String> {
    if o.processes != 1 {
        return Err(format!(
            "{:?} runs in one process (its latencies read the senders' times from memory); \
             drop --processes",
            o.scenario
        ));
    }
    Ok(())
}

fn validate_typing(o: &mut Opts) -> Result<(), String> {
    one_process(o)?;
    if o.typers == 0 {
        o.typers = (o.connections / 10).max(1);
    }
    if o.typers > o.connections || o.connections < 2 {
        return Err("--typers must be 1..=--connections, and --connections at least 2".into());
    }
    let finite_pos = |v: f64| v.is_finite() && v > 0.0;
    if !finite_pos(o.typing_ttl_s) || !finite_pos(o.renew_s) || o.renew_s >= o.typing_ttl_s {
        return Err(format!(
            "--renew {} must be shorter than --typing-ttl {} (the server's typing_ttl), or \
             every renewal would start a new typing state",
            o.renew_s, o.typing_ttl_s
        ));
    }
    o.rate = o.typers as f64 / o.renew_s;
    o.rooms = 1;
    Ok(())
}

fn validate_rest(o: &mut Opts) -> Result<(), String> {
    one_process(o)?;
    if o.limit == 0 || o.limit > PAGE_LIMIT_MAX {
        return Err(format!(
            "--limit must be 1..={PAGE_LIMIT_MAX} (the server's page limit)"
        ));
    }
    if o.messages > REST_MESSAGES_MAX {
        return Err(format!("--messages must be 0..={REST_MESSAGES_MAX}"));
    }
    if let Some(p) = &o.get_path {
        if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "--get {p:?} must be a path starting with / without spaces or controls"
            ));
        }
    }
    if o.payload_bytes == 0 {
        return Err(
            "--payload-bytes must be at least 1 for rest-read (a message needs content)".into(),
        );
    }
    o.rooms = 1;
    Ok(())
}

fn validate_presence(o: &mut Opts) -> Result<(), String> {
    one_process(o)?;
    if o.churners == 0 || o.watch == 0 || o.watch > WATCH_MAX.min(o.churners) {
        return Err(format!(
            "--churners must be at least 1 and --watch 1..={WATCH_MAX} and <= --churners"
        ));
    }
    if o.sockets() > CONNECTIONS_MAX {
        return Err(format!(
            "--connections {} watchers + --churners {} are over {CONNECTIONS_MAX} sockets for \
             one process",
            o.connections, o.churners
        ));
    }
    let finite_pos = |v: f64| v.is_finite() && v > 0.0;
    if !finite_pos(o.away_s) || !finite_pos(o.grace_s) {
        return Err("--away and --grace must be > 0".into());
    }
    // Each churner reconnects once per cycle; the cycle must hold the time away and a short
    // time online.
    let cycle = o.churners as f64 / o.rate;
    if cycle < o.away_s + CHURN_ONLINE_S_MIN {
        return Err(format!(
            "{} churners at --rate {}/s reconnect each every {cycle:.2} s, too short for \
             --away {} s plus {CHURN_ONLINE_S_MIN} s online: raise --churners to at least {} \
             or lower --rate or --away",
            o.churners,
            o.rate,
            o.away_s,
            ((o.away_s + CHURN_ONLINE_S_MIN) * o.rate).ceil()
        ));
    }
    if o.duration_s < cycle {
        return Err(format!(
            "--duration {} is shorter than one churn cycle ({cycle:.2} s): no churner would \
             come back",
            o.duration_s
        ));
    }
    o.rooms = 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_fanout_flags() {
        let o = parse(&args(
            "fanout --url ws://127.0.0.1:9000/chat --connections 500 --rooms 5 --rate 200 --slow-fraction 0.1 --json-only",
        ))
        .expect("valid");
        assert_eq!(o.scenario, Scenario::Fanout);
        assert_eq!(o.target.addr.port(), 9000);
        assert_eq!(o.target.path, "/chat");
        assert_eq!(o.connections, 500);
        assert_eq!(o.publishers, 5);
        assert!(o.json_only);
        let o = parse(&args("fanout --rate=1000")).expect("valid");
        assert_eq!(o.publishers, 20);
    }

    #[test]
    fn refuses_too_many_connections_and_non_loopback() {
        let e = parse(&args("connect --connections 19501")).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(parse(&args("connect --url ws://10.0.0.1:80/ws")).is_err());
        assert!(parse(&args("connect --source-ips 10.0.0.1")).is_err());
        assert!(parse(&args("connect --bogus 1")).is_err());
        assert!(parse(&args("connect --connections")).is_err());
        assert!(parse(&args("nope")).is_err());
    }

    #[test]
    fn parses_several_servers() {
        let o = parse(&args(
            "fanout --urls ws://127.0.0.1:9001/ws,ws://127.0.0.1:9002/ws --server-pids 11,12",
        ))
        .expect("valid");
        assert_eq!(o.targets.len(), 2);
        assert_eq!(o.target.addr.port(), 9001);
        assert_eq!(o.targets[1].addr.port(), 9002);
        assert_eq!(
            (o.server_pid, o.server_pids.clone()),
            (Some(11), vec![11, 12])
        );
        let o = parse(&args("idle --server-pid 7")).expect("valid");
        assert_eq!((o.targets.len(), o.server_pids.clone()), (1, vec![7]));
        for bad in [
            "fanout --urls ws://127.0.0.1:1/ws,ws://10.0.0.1:2/ws",
            "fanout --urls ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws --server-pids 1",
            "fanout --urls ws://127.0.0.1:1/ws --server-pids 1 --server-pid 1",
            "dm --urls ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn source_ip_ranges() {
        let v = parse_source_ips("127.0.0.1-127.0.0.3,127.0.1.1").expect("valid");
        assert_eq!(v.len(), 4);
        assert_eq!(v[2], Ipv4Addr::new(127, 0, 0, 3));
        assert!(parse_source_ips("127.0.0.5-127.0.0.1").is_err());
    }

    #[test]
    fn parses_the_issue_10_scenarios() {
        let o = parse(&args(
            "history-resume --connections 10000 --messages 100 --warmup 2 --processes 2",
        ))
        .expect("valid");
        assert_eq!(o.scenario, Scenario::HistoryResume);
        assert_eq!((o.messages, o.warmup, o.publishers), (100, 2, 1));
        assert_eq!(o.sockets(), 10_001);
        assert!(parse(&args("history-resume --messages 0")).is_err());
        let o = parse(&args(
            "history-resume --url ws://127.0.0.1:9001/ws --resume-url ws://127.0.0.1:9002/ws",
        ))
        .expect("valid");
        assert_eq!(o.target.addr.port(), 9001);
        assert_eq!(o.resume_target.map(|t| t.addr.port()), Some(9002));
        assert!(parse(&args("fanout --resume-url ws://127.0.0.1:9002/ws")).is_err());
        assert!(parse(&args("history-resume --resume-url ws://10.0.0.1:9002/ws")).is_err());

        let o = parse(&args(
            "typing-storm --connections 5000 --typers 1000 --renew 2",
        ))
        .expect("valid");
        assert_eq!(o.scenario, Scenario::TypingStorm);
        assert_eq!(o.rate, 500.0);
        assert_eq!(o.stop_every, 5);
        let o = parse(&args("typing-storm --connections 50")).expect("valid");
        assert_eq!(o.typers, 5);
        let e = parse(&args("typing-storm --renew 6")).unwrap_err();
        assert!(e.contains("shorter than --typing-ttl"), "{e}");
        assert!(parse(&args("typing-storm --processes 2 --connections 100")).is_err());
        assert!(parse(&args("typing-storm --connections 10 --typers 11")).is_err());

        let o = parse(&args(
            "presence-churn --connections 10000 --churners 7000 --rate 1000 --away 6 --watch 20",
        ))
        .expect("valid");
        assert_eq!(o.scenario, Scenario::PresenceChurn);
        assert_eq!(o.sockets(), 17_000);
        assert_eq!((o.watch, o.away_s, o.grace_s), (20, 6.0, 5.0));
        let e = parse(&args("presence-churn --churners 1000 --rate 1000 --away 6")).unwrap_err();
        assert!(e.contains("at least 6200"), "{e}");
        assert!(parse(&args("presence-churn --connections 19000 --churners 1000")).is_err());
        assert!(parse(&args("presence-churn --watch 0")).is_err());
        assert!(parse(&args(
            "presence-churn --churners 100 --rate 10 --duration 5"
        ))
        .is_err());
    }

    #[test]
    fn parses_rest_read() {
        let o = parse(&args(
            "rest-read --url http://127.0.0.1:9000 --connections 64 --rate 5000 --messages 1000 --limit 50 --walk",
        ))
        .expect("valid");
        assert_eq!(o.scenario, Scenario::RestRead);
        assert_eq!(o.target.addr.port(), 9000);
        assert_eq!((o.connections, o.messages, o.limit), (64, 1000, 50));
        assert!(o.walk && !o.closed_loop);
        let o = parse(&args("rest-read --closed-loop --limit=200")).expect("valid");
        assert!(o.closed_loop && !o.walk);
        assert_eq!((o.limit, o.messages), (200, 100));
        assert_eq!(o.target.addr.port(), 8081);
        let o = parse(&args("rest-read --get /api/v1/presence/user/{user}")).expect("valid");
        assert_eq!(o.get_path.as_deref(), Some("/api/v1/presence/user/{user}"));
        for bad in [
            "rest-read --limit 0",
            "rest-read --limit 201",
            "rest-read --messages 100001",
            "rest-read --processes 2",
            "rest-read --payload-bytes 0",
            "rest-read --url https://127.0.0.1:1",
            "rest-read --get health",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn dm_rounds_to_whole_pairs() {
        let o = parse(&args("dm --connections 10 --devices 2")).expect("valid");
        assert_eq!(o.connections, 8);
    }
}
