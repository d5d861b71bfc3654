//! `rest-read`: reads of one thread's message page over the REST API, under load.
//!
//! The controller first sets up the thread with a blocking client ([`setup_thread`]): user
//! `lt<nonce>a` opens the conversation with `lt<nonce>b` (`POST /api/v1/messages/threads`)
//! and posts `--messages` messages into it, [`SETUP_PIPELINE`] pipelined requests at a time
//! (each with a `clientMsgId`, so a batch resent after the server closed the connection is
//! deduplicated), then checks the thread's `lastSeq`. Then worker threads ([`RestWorker`],
//! one mio `Poll` and one timerfd each, connection `i` on thread `i % T`) hold `--connections`
//! keep-alive HTTP/1.1 connections and send `GET .../messages?limit=L`, one request in flight
//! per connection (the server reads a connection's next request only once it has answered).
//!
//! - **Open loop** (`--rate R`): request `k` is due at `start + k/R` and belongs to worker
//!   `k % T`. A due request goes out on the worker's most recently idle connection, or waits
//!   in the worker's backlog (at most [`BACKLOG_MAX`]; past it requests are dropped and
//!   counted). Latency is taken from the scheduled time, so waiting for a connection counts
//!   (no coordinated omission); `response` is taken from the write.
//! - **Closed loop** (`--closed-loop`): every idle connection sends its next request at once;
//!   the rate is what the server gives.
//!
//! Every answer is judged cheaply ([`http::check_page`] and [`RestPlan::judge`]): status 200,
//! the page's shape, the number of messages the thread must give for that page, and `next`.
//! With `--walk` each connection follows `next` (as `before`) down to the thread's first
//! message and starts again at the newest page. A connection the server closes (its last
//! request under `http_keepalive_requests_max`, or idle past `http_keepalive_timeout`) is
//! reopened; a request that was on it without an answer is sent again, keeping its scheduled
//! time.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::engine::{kind, phase, Shared, TimerFd, WorkerReport, ERROR_SAMPLES_MAX};
use crate::http;
use crate::sys::now_ns;

/// Requests the setup client pipelines in one write.
pub const SETUP_PIPELINE: usize = 64;
/// Requests one worker holds waiting for an idle connection (open loop); past it they are
/// dropped and counted.
pub const BACKLOG_MAX: usize = 100_000;
/// Most messages one run puts in the thread (`--messages`).
pub const MESSAGES_MAX: u64 = 100_000;
/// Bytes read from a socket per `read` call (one buffer per worker).
const READ_BUF_BYTES: usize = 256 * 1024;
/// Events taken from epoll per wait.
const EVENTS_MAX: usize = 1024;
/// Longest epoll wait, so phase changes are seen promptly.
const POLL_WAIT_MS: u64 = 5;
/// Interval of the connect-timeout scan.
const TIMEOUT_SCAN_NS: u64 = 200_000_000;
/// Token of the timerfd in each worker's poll.
const TIMER_TOKEN: Token = Token(usize::MAX - 1);
/// Setup: rounds in a row in which the server closed without answering before giving up.
const SETUP_STALLS_MAX: u32 = 3;
/// Setup: bytes read per `read` call.
const SETUP_READ_BYTES: usize = 64 * 1024;

/// Everything the workers need to know, fixed for a run.
pub struct RestPlan {
    pub addr: SocketAddr,
    pub host: String,
    pub source_ips: Vec<Ipv4Addr>,
    pub connections: usize,
    pub threads: usize,
    pub in_flight_per_thread: usize,
    /// Open loop: nanoseconds between two requests (all workers together).
    pub interval_ns: f64,
    pub closed_loop: bool,
    /// `/api/v1/messages/threads/<id>/messages?limit=L`.
    pub page_path: String,
    pub user: String,
    pub limit: usize,
    /// Messages in the thread (seq 1..=messages).
    pub messages: u64,
    pub walk: bool,
    /// `--get PATH`: GET this instead of the page, and check only the status (a yardstick:
    /// `/health` never leaves the shard, `/api/v1/presence/user/{user}` is REST answered on
    /// the shard, the page goes to the bridge and the store).
    pub other_path: Option<String>,
    pub connect_timeout_ns: u64,
}

impl RestPlan {
    /// Judges a page asked for with `before` (`None`: the newest page) against the thread the
    /// setup made: seq 1..=messages with no gaps, so the page holds exactly
    /// min(limit, messages below `before`) and has a `next` exactly when more remain.
    pub fn judge(&self, page: &http::Page, before: Option<u64>) -> Result<(), &'static str> {
        let below = match before {
            None => self.messages,
            Some(b) => b.saturating_sub(1).min(self.messages),
        };
        if page.messages as u64 != below.min(self.limit as u64) {
            return Err("the page holds the wrong number of messages");
        }
        if (below > self.limit as u64) != page.next.is_some() {
            return Err("the page's next does not match the thread");
        }
        if let (Some(n), Some(b)) = (page.next, before) {
            if n >= b {
                return Err("next does not go back in the thread");
            }
        }
        Ok(())
    }

    /// The request for the page before `before` (`None`: the newest page).
    fn request(&self, out: &mut Vec<u8>, before: Option<u64>) {
        if let Some(path) = &self.other_path {
            http::request(out, "GET", &self.host, path, &self.user, b"");
            return;
        }
        match before {
            None => http::request(out, "GET", &self.host, &self.page_path, &self.user, b""),
            Some(b) => {
                let path = format!("{}&before={b}", self.page_path);
                http::request(out, "GET", &self.host, &path, &self.user, b"");
            }
        }
    }
}

/// The thread the setup made.
pub struct Thread {
    pub id: String,
    pub user: String,
    /// `/api/v1/messages/threads/<id>/messages` (percent-encoded id).
    pub messages_path: String,
    pub posted: u64,
    pub setup_s: f64,
}

/// A blocking keep-alive client for the setup: pipelined requests, reopened when the server
/// closes.
struct Blocking {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<std::net::TcpStream>,
    buf: Vec<u8>,
}

impl Blocking {
    /// Sends `reqs` pipelined and returns (status, body) of each, in order. Requests the server
    /// did not answer before closing are sent again on a new connection.
    fn exchange(&mut self, reqs: &[Vec<u8>]) -> Result<Vec<(u16, Vec<u8>)>, String> {
        let mut got: Vec<(u16, Vec<u8>)> = Vec::with_capacity(reqs.len());
        let mut stalls = 0;
        let mut tmp = vec![0u8; SETUP_READ_BYTES];
        while got.len() < reqs.len() {
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => {
                    let s = std::net::TcpStream::connect_timeout(&self.addr, self.timeout)
                        .map_err(|e| format!("connect {}: {e}", self.addr))?;
                    s.set_nodelay(true).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(self.timeout))
                        .map_err(|e| e.to_string())?;
                    s.set_write_timeout(Some(self.timeout))
                        .map_err(|e| e.to_string())?;
                    self.buf.clear();
                    self.stream.insert(s)
                }
            };
            let bytes: Vec<u8> = reqs[got.len()..].concat();
            stream
                .write_all(&bytes)
                .map_err(|e| format!("setup write: {e}"))?;
            let before = got.len();
            let mut closed = false;
            while got.len() < reqs.len() && !closed {
                while let Some(resp) = http::parse_response(&self.buf)? {
                    got.push((resp.status, resp.body(&self.buf).to_vec()));
                    self.buf.drain(..resp.total());
                    if resp.close {
                        closed = true;
                        break;
                    }
                    if got.len() == reqs.len() {
                        break;
                    }
                }
                if closed || got.len() == reqs.len() {
                    break;
                }
                match stream.read(&mut tmp) {
                    Ok(0) => closed = true,
                    Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("setup read: {e}")),
                }
            }
            if closed {
                self.stream = None;
            }
            if got.len() == before {
                stalls += 1;
                if stalls >= SETUP_STALLS_MAX {
                    return Err(format!(
                        "the server closed the connection {SETUP_STALLS_MAX} times without \
                         answering"
                    ));
                }
            } else {
                stalls = 0;
            }
        }
        Ok(got)
    }
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// The body of setup message `i`: `content` padded with `x` to `payload_bytes` (no quotes or
/// keys, so [`http::check_page`] counts exactly), and a `clientMsgId` unique to the run.
pub fn message_body(nonce: u64, i: u64, payload_bytes: usize) -> String {
    let mut content = format!("m{i} ");
    while content.len() < payload_bytes {
        content.push('x');
    }
    format!(r#"{{"content":"{content}","clientMsgId":"lt{nonce}-{i}"}}"#)
}

/// Creates the thread and posts `messages` messages into it; checks `lastSeq` at the end.
pub fn setup_thread(
    addr: SocketAddr,
    host: &str,
    nonce: u64,
    messages: u64,
    payload_bytes: usize,
    timeout: Duration,
) -> Result<Thread, String> {
    let t0 = now_ns();
    let deadline = t0 + timeout.as_nanos() as u64;
    let user = format!("lt{nonce}a");
    let peer = format!("lt{nonce}b");
    let mut c = Blocking {
        addr,
        timeout,
        stream: None,
        buf: Vec::new(),
    };
    let mut req = Vec::new();
    let create = format!(r#"{{"participants":["{peer}"]}}"#);
    http::request(
        &mut req,
        "POST",
        host,
        "/api/v1/messages/threads",
        &user,
        create.as_bytes(),
    );
    let (status, body) = c.exchange(&[req])?.swap_remove(0);
    if status != 201 && status != 200 {
        return Err(format!(
            "POST /api/v1/messages/threads answered {status} {}: the server must serve the REST \
             API with auth_mode none (X-User-Id)",
            text(&body)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("POST /api/v1/messages/threads: body is not JSON: {e}"))?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| format!("POST /api/v1/messages/threads: no id in {}", text(&body)))?
        .to_string();
    let base = format!("/api/v1/messages/threads/{}", http::encode_segment(&id));
    let messages_path = format!("{base}/messages");
    let mut i = 0u64;
    while i < messages {
        let n = (messages - i).min(SETUP_PIPELINE as u64);
        let reqs: Vec<Vec<u8>> = (i..i + n)
            .map(|k| {
                let mut r = Vec::new();
                let b = message_body(nonce, k, payload_bytes);
                http::request(&mut r, "POST", host, &messages_path, &user, b.as_bytes());
                r
            })
            .collect();
        for (k, (status, body)) in c.exchange(&reqs)?.into_iter().enumerate() {
            // 201 stored; 200 a resent request the store deduplicated.
            if status != 201 && status != 200 {
                return Err(format!(
                    "POST {messages_path} (message {}) answered {status} {}",
                    i + k as u64,
                    text(&body)
                ));
            }
        }
        i += n;
        if now_ns() > deadline {
            return Err(format!(
                "setup: {i} of {messages} messages posted in --setup-timeout {:.0} s",
                timeout.as_secs_f64()
            ));
        }
    }
    let mut req = Vec::new();
    http::request(&mut req, "GET", host, &base, &user, b"");
    let (status, body) = c.exchange(&[req])?.swap_remove(0);
    let last = crate::ws::find_u64(&body, b"\"lastSeq\":");
    if status != 200 || last != Some(messages) {
        return Err(format!(
            "GET {base} answered {status} with lastSeq {last:?}, expected {messages}: {}",
            text(&body)
        ));
    }
    Ok(Thread {
        id,
        user,
        messages_path,
        posted: messages,
        setup_s: (now_ns() - t0) as f64 / 1e9,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HState {
    Connecting,
    Idle,
    Busy,
}

struct HConn {
    sock: TcpStream,
    state: HState,
    /// Opened in the setup phase (counted in `ready` / `setup_failed`).
    setup: bool,
    t_start: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_at: usize,
    /// The request in flight: its scheduled time and when it was written.
    sched_ns: u64,
    sent_ns: u64,
    /// `--walk`: `before` of this connection's next request.
    before: Option<u64>,
    /// `before` of the request in flight.
    asked: Option<u64>,
}

/// How a connection's socket ended.
enum End {
    /// EOF or a reset.
    Closed,
    Fail(String),
}

/// One event-loop thread of `rest-read`.
pub struct RestWorker {
    plan: Arc<RestPlan>,
    shared: Arc<Shared>,
    poll: Poll,
    timer: TimerFd,
    conns: Vec<Option<HConn>>,
    /// Global indices of this worker's connections.
    mine: Vec<usize>,
    next_connect: usize,
    connecting: usize,
    /// Idle connections, the most recently used last.
    idle: Vec<usize>,
    /// Scheduled times of due requests waiting for an idle connection.
    backlog: VecDeque<u64>,
    /// Open loop: the next request index this worker owns.
    next_req: u64,
    report: WorkerReport,
    rbuf: Vec<u8>,
    counts: [u64; kind::SLOTS],
    sent: u64,
    scratch: Vec<u8>,
    /// Why the first request was sent again (reported once, not a failure).
    retry_reason: Option<String>,
}

impl RestWorker {
    pub fn new(id: usize, plan: Arc<RestPlan>, shared: Arc<Shared>) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let timer = TimerFd::new()?;
        poll.registry()
            .register(&mut SourceFd(&timer.raw()), TIMER_TOKEN, Interest::READABLE)?;
        let mine: Vec<usize> = (id..plan.connections).step_by(plan.threads).collect();
        Ok(RestWorker {
            conns: (0..mine.len()).map(|_| None).collect(),
            mine,
            plan,
            shared,
            poll,
            timer,
            next_connect: 0,
            connecting: 0,
            idle: Vec::new(),
            backlog: VecDeque::new(),
            next_req: id as u64,
            report: WorkerReport::empty(),
            rbuf: vec![0; READ_BUF_BYTES],
            counts: [0; kind::SLOTS],
            sent: 0,
            scratch: Vec::with_capacity(512),
            retry_reason: None,
        })
    }

    /// Runs until the controller sets the close phase; returns the measurements and why the
    /// first request that had to be sent again was (a note, not a failure).
    pub fn run(mut self) -> (WorkerReport, Option<String>) {
        let mut events = Events::with_capacity(EVENTS_MAX);
        let mut armed_for = 0u64;
        let mut last_scan = now_ns();
        loop {
            let ph = self.shared.phase.load(Ordering::Acquire);
            if ph == phase::CLOSE {
                break;
            }
            if ph == phase::SETUP {
                self.start_connects();
            }
            if ph == phase::RUN && !self.plan.closed_loop {
                let next = self.schedule_due();
                if next != 0 && next != armed_for {
                    self.timer.arm(next);
                    armed_for = next;
                }
            }
            if ph == phase::RUN || ph == phase::DRAIN {
                self.dispatch(ph);
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(POLL_WAIT_MS)))
            {
                if e.kind() != ErrorKind::Interrupted {
                    self.report.fail(&format!("epoll: {e}"));
                    break;
                }
            }
            for ev in events.iter() {
                if ev.token() == TIMER_TOKEN {
                    self.timer.clear();
                    armed_for = 0;
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                self.on_event(ev.token().0, readable, ev.is_writable());
            }
            let now = now_ns();
            if now - last_scan > TIMEOUT_SCAN_NS {
                last_scan = now;
                self.scan_timeouts(now);
            }
            self.flush_counters();
        }
        self.conns.clear();
        self.flush_counters();
        (self.report, self.retry_reason)
    }

    fn flush_counters(&mut self) {
        for (slot, n) in self.counts.iter_mut().enumerate() {
            if slot != kind::REST_BACKLOG_PEAK && *n > 0 {
                self.shared.kind[slot].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        self.shared.kind[kind::REST_BACKLOG_PEAK]
            .fetch_max(self.counts[kind::REST_BACKLOG_PEAK], Ordering::Relaxed);
        if self.sent > 0 {
            self.shared.sent.fetch_add(self.sent, Ordering::Relaxed);
            self.sent = 0;
        }
    }

    fn start_connects(&mut self) {
        while self.connecting < self.plan.in_flight_per_thread
            && self.next_connect < self.mine.len()
        {
            let local = self.next_connect;
            self.next_connect += 1;
            match self.open(local, true) {
                Ok(c) => {
                    self.conns[local] = Some(c);
                    self.connecting += 1;
                }
                Err(e) => {
                    self.report.fail(&format!("connect: {e}"));
                    self.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn open(&mut self, local: usize, setup: bool) -> std::io::Result<HConn> {
        let plan = &self.plan;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(plan.addr),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if !plan.source_ips.is_empty() {
            let ip = plan.source_ips[self.mine[local] % plan.source_ips.len()];
            let one: libc::c_int = 1;
            // SAFETY: valid socket fd, option value is a c_int of the given size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            sock.bind(&SocketAddr::new(ip.into(), 0).into())?;
        }
        match sock.connect(&plan.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
        self.poll.registry().register(
            &mut stream,
            Token(local),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(HConn {
            sock: stream,
            state: HState::Connecting,
            setup,
            t_start: now_ns(),
            inbuf: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            sched_ns: 0,
            sent_ns: 0,
            before: None,
            asked: None,
        })
    }

    /// Replaces the connection `local` with a new one (the server closed it, or said close).
    fn reopen(&mut self, local: usize) {
        if let Some(mut old) = self.conns[local].take() {
            let _ = self.poll.registry().deregister(&mut old.sock);
        }
        self.idle.retain(|l| *l != local);
        self.counts[kind::REST_RECONNECTS] += 1;
        match self.open(local, false) {
            Ok(c) => self.conns[local] = Some(c),
            Err(e) => {
                self.report.fail(&format!("reconnect: {e}"));
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes a connection that failed for good.
    fn lose(&mut self, local: usize, why: &str) {
        let Some(mut c) = self.conns[local].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.idle.retain(|l| *l != local);
        self.report.fail(why);
        if c.setup {
            self.connecting -= 1;
            self.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn scan_timeouts(&mut self, now: u64) {
        for local in 0..self.conns.len() {
            let late = self.conns[local].as_ref().is_some_and(|c| {
                c.state == HState::Connecting
                    && now.saturating_sub(c.t_start) > self.plan.connect_timeout_ns
            });
            if late {
                self.lose(local, "connect: timed out");
            }
        }
    }

    /// Open loop: moves the requests due by now into the backlog; returns the next due time
    /// (0: none before the end).
    fn schedule_due(&mut self) -> u64 {
        let start = self.shared.run_start_ns.load(Ordering::Acquire);
        let end = self.shared.run_end_ns.load(Ordering::Acquire);
        let now = now_ns();
        loop {
            let at = start + (self.next_req as f64 * self.plan.interval_ns) as u64;
            if at >= end {
                return 0;
            }
            if at > now {
                return at;
            }
            if self.backlog.len() >= BACKLOG_MAX {
                self.counts[kind::REST_BACKLOG_DROPPED] += 1;
            } else {
                self.backlog.push_back(at);
                self.counts[kind::REST_SCHEDULED] += 1;
                let depth = self.backlog.len() as u64;
                let peak = &mut self.counts[kind::REST_BACKLOG_PEAK];
                *peak = (*peak).max(depth);
            }
            self.next_req += self.plan.threads as u64;
        }
    }

    /// Sends waiting requests (retries first) on idle connections; closed loop, a fresh one on
    /// every idle connection while the run lasts.
    fn dispatch(&mut self, ph: u8) {
        while let Some(&local) = self.idle.last() {
            let sched = if let Some(at) = self.backlog.pop_front() {
                at
            } else if self.plan.closed_loop
                && ph == phase::RUN
                && now_ns() < self.shared.run_end_ns.load(Ordering::Acquire)
            {
                self.counts[kind::REST_SCHEDULED] += 1;
                now_ns()
            } else {
                break;
            };
            self.idle.pop();
            self.send(local, sched);
        }
    }

    fn send(&mut self, local: usize, sched: u64) {
        let plan = Arc::clone(&self.plan);
        let Some(c) = self.conns[local].as_mut() else {
            self.backlog.push_front(sched);
            return;
        };
        let mut req = std::mem::take(&mut self.scratch);
        req.clear();
        let before = if plan.walk { c.before } else { None };
        plan.request(&mut req, before);
        if c.out_at == c.out.len() {
            c.out.clear();
            c.out_at = 0;
        }
        c.out.extend_from_slice(&req);
        self.scratch = req;
        c.state = HState::Busy;
        c.sched_ns = sched;
        c.sent_ns = now_ns();
        c.asked = before;
        self.sent += 1;
        if let Err(e) = flush(c) {
            self.closed_busy(local, e);
        }
    }

    fn on_event(&mut self, local: usize, readable: bool, writable: bool) {
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        if c.state == HState::Connecting {
            if !readable && !writable {
                return;
            }
            match c.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let why = format!("connect: {e}");
                    self.lose(local, &why);
                    return;
                }
            }
            match c.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => {
                    let why = format!("connect: {e}");
                    self.lose(local, &why);
                    return;
                }
            }
            c.state = HState::Idle;
            if c.setup {
                c.setup = false;
                self.connecting -= 1;
                self.shared.ready.fetch_add(1, Ordering::Relaxed);
            }
            self.idle.push(local);
        }
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        if writable && c.out_at < c.out.len() {
            if let Err(e) = flush(c) {
                self.closed_busy(local, e);
                return;
            }
        }
        if readable {
            self.read(local);
        }
    }

    fn read(&mut self, local: usize) {
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        let mut end = None;
        loop {
            match c.sock.read(&mut self.rbuf) {
                Ok(0) => {
                    end = Some(End::Closed);
                    break;
                }
                Ok(n) => c.inbuf.extend_from_slice(&self.rbuf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    end = Some(End::Closed);
                    break;
                }
                Err(e) => {
                    end = Some(End::Fail(format!("read: {e}")));
                    break;
                }
            }
        }
        // The answer (at most one: one request in flight), then what the end means.
        if !c.inbuf.is_empty() {
            if c.state != HState::Busy {
                let why = format!(
                    "{} bytes from the server with no request in flight",
                    c.inbuf.len()
                );
                self.lose(local, &why);
                return;
            }
            match http::parse_response(&c.inbuf) {
                Ok(None) => {}
                Ok(Some(resp)) => {
                    if !self.answered(local, resp) {
                        return;
                    }
                }
                Err(e) => {
                    self.counts[kind::REST_ERRORS] += 1;
                    self.counts[kind::REST_DONE] += 1;
                    self.lose(local, &format!("bad response: {e}"));
                    return;
                }
            }
        }
        let Some(end) = end else {
            return;
        };
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        match (c.state, end) {
            (HState::Idle, End::Closed) => {
                // Idle past the server's http_keepalive_timeout: reopen quietly.
                self.counts[kind::REST_IDLE_CLOSES] += 1;
                self.reopen(local);
            }
            (HState::Busy, End::Closed) if c.inbuf.is_empty() => {
                self.closed_busy(local, "closed before answering".into());
            }
            (HState::Busy, End::Closed) => {
                self.counts[kind::REST_ERRORS] += 1;
                self.counts[kind::REST_DONE] += 1;
                self.report
                    .fail("the server closed a connection in the middle of a response");
                self.reopen(local);
            }
            (_, End::Fail(why)) => {
                if c.state == HState::Busy {
                    self.counts[kind::REST_ERRORS] += 1;
                    self.counts[kind::REST_DONE] += 1;
                }
                self.lose(local, &why);
            }
            (HState::Connecting, End::Closed) => self.lose(local, "connect: closed"),
        }
    }

    /// A kept-alive connection was closed (or its write failed) with a request on it and no
    /// byte of the answer: the request goes back to the front of the backlog with its
    /// scheduled time, and the connection is reopened.
    fn closed_busy(&mut self, local: usize, why: String) {
        let Some(c) = self.conns[local].as_ref() else {
            return;
        };
        let sched = c.sched_ns;
        self.counts[kind::REST_RETRIED] += 1;
        self.backlog.push_front(sched);
        if self.retry_reason.is_none() {
            self.retry_reason = Some(why);
        }
        self.reopen(local);
    }

    /// Handles the complete response at the start of the connection's input; false when the
    /// connection is gone.
    fn answered(&mut self, local: usize, resp: http::Response) -> bool {
        let now = now_ns();
        let plan = Arc::clone(&self.plan);
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return false;
        };
        self.report
            .latency
            .saturating_record(now.saturating_sub(c.sched_ns).max(1));
        self.report.rec("response", now.saturating_sub(c.sent_ns));
        self.counts[kind::REST_DONE] += 1;
        let body = resp.body(&c.inbuf);
        let judged = if resp.status == 200 && plan.other_path.is_some() {
            Ok(http::Page {
                messages: 0,
                next: None,
            })
        } else if resp.status == 200 {
            http::check_page(body).and_then(|p| plan.judge(&p, c.asked).map(|()| p))
        } else {
            Err("")
        };
        match judged {
            Ok(page) => {
                self.counts[kind::REST_OK] += 1;
                self.counts[kind::REST_BODY_BYTES] += body.len() as u64;
                c.before = page.next;
            }
            Err(why) => {
                self.counts[kind::REST_ERRORS] += 1;
                self.report.error_frames += 1;
                let what = if resp.status == 200 {
                    format!("HTTP 200 with a bad page: {why}")
                } else {
                    format!("HTTP {}", resp.status)
                };
                if self.report.error_samples.len() < ERROR_SAMPLES_MAX {
                    self.report
                        .error_samples
                        .push(format!("{what}: {}", text(body)));
                }
                self.report.fail(&what);
                c.before = None;
            }
        }
        if c.inbuf.len() > resp.total() {
            let why = format!(
                "{} bytes after a response with one request in flight",
                c.inbuf.len() - resp.total()
            );
            self.lose(local, &why);
            return false;
        }
        c.inbuf.clear();
        if resp.close {
            // The server's last request on this connection (http_keepalive_requests_max).
            self.reopen(local);
            return false;
        }
        c.state = HState::Idle;
        self.idle.push(local);
        true
    }
}

/// Writes what the connection has queued; WouldBlock leaves the rest for the next writable
/// event.
fn flush(c: &mut HConn) -> Result<(), String> {
    while c.out_at < c.out.len() {
        match c.sock.write(&c.out[c.out_at..]) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => c.out_at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

/// A running worker thread.
pub type Worker = JoinHandle<(WorkerReport, Option<String>)>;

/// Starts the worker threads.
pub fn start(plan: &Arc<RestPlan>, shared: &Arc<Shared>) -> Result<Vec<Worker>, String> {
    let mut workers = Vec::new();
    for id in 0..plan.threads {
        workers.push(
            RestWorker::new(id, Arc::clone(plan), Arc::clone(shared))
                .map_err(|e| format!("worker {id}: {e}"))?,
        );
    }
    let mut handles = Vec::new();
    for (id, w) in workers.into_iter().enumerate() {
        handles.push(
            std::thread::Builder::new()
                .name(format!("rest-{id}"))
                .spawn(move || w.run())
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(messages: u64, limit: usize, walk: bool) -> RestPlan {
        RestPlan {
            addr: "127.0.0.1:1".parse().unwrap(),
            host: "127.0.0.1:1".into(),
            source_ips: Vec::new(),
            connections: 1,
            threads: 1,
            in_flight_per_thread: 1,
            interval_ns: 1e6,
            closed_loop: false,
            page_path: "/api/v1/messages/threads/t/messages?limit=50".into(),
            user: "u".into(),
            limit,
            messages,
            walk,
            other_path: None,
            connect_timeout_ns: 1,
        }
    }

    fn page(messages: usize, next: Option<u64>) -> http::Page {
        http::Page { messages, next }
    }

    #[test]
    fn pages_are_judged_against_the_thread() {
        let p = plan(120, 50, true);
        // The newest page: 50 of 120, more below.
        assert_eq!(p.judge(&page(50, Some(71)), None), Ok(()));
        assert!(p.judge(&page(49, Some(71)), None).is_err());
        assert!(p.judge(&page(50, None), None).is_err());
        // Below seq 71: 70 remain, a full page and more.
        assert_eq!(p.judge(&page(50, Some(21)), Some(71)), Ok(()));
        assert!(p.judge(&page(50, Some(71)), Some(71)).is_err());
        // Below seq 21: the last 20, no next.
        assert_eq!(p.judge(&page(20, None), Some(21)), Ok(()));
        assert!(p.judge(&page(20, Some(1)), Some(21)).is_err());
        // Exactly a page left: no next.
        assert_eq!(p.judge(&page(50, None), Some(51)), Ok(()));
        // A thread shorter than a page.
        let small = plan(3, 50, false);
        assert_eq!(small.judge(&page(3, None), None), Ok(()));
        assert_eq!(plan(0, 50, false).judge(&page(0, None), None), Ok(()));
    }

    #[test]
    fn requests_name_the_page() {
        let p = plan(10, 50, true);
        let mut v = Vec::new();
        p.request(&mut v, Some(42));
        let s = String::from_utf8(v).unwrap();
        assert!(
            s.starts_with(
                "GET /api/v1/messages/threads/t/messages?limit=50&before=42 HTTP/1.1\r\n"
            ),
            "{s}"
        );
        assert!(s.contains("\r\nX-User-Id: u\r\n"), "{s}");
    }

    #[test]
    fn another_path_replaces_the_page() {
        let mut p = plan(10, 50, true);
        p.other_path = Some("/health".into());
        let mut v = Vec::new();
        p.request(&mut v, Some(3));
        assert!(v.starts_with(b"GET /health HTTP/1.1\r\n"));
    }

    #[test]
    fn setup_bodies_are_json_of_the_asked_size() {
        let b = message_body(7, 12, 64);
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(v["content"].as_str().map(str::len), Some(64));
        assert_eq!(v["clientMsgId"], "lt7-12");
        let short = message_body(7, 123_456, 2);
        let v: serde_json::Value = serde_json::from_str(&short).expect("json");
        assert_eq!(v["content"], "m123456 ");
    }
}
