//! The bridge's side of the HTTP backends (`crate::proxy` holds the contracts): the auth
//! service's checks of parked upgrades and the backend calls of routed custom message types.
//!
//! Owns: the one outbound [`Client`] (shared by both), the auth cache, the in-flight counts
//! that bound each kind of call per node, and the counters in `/metrics`. Each call is a task
//! on the bridge's `LocalSet` under its own deadline; its answer goes to the origin's shard as
//! `ServiceMsg::Proxy`. A shard whose inbox stays full is retried for
//! [`ANSWER_RETRY_TOTAL`]; an answer it still cannot take is dropped and counted (the parked
//! upgrade then gets the shard's own 503 at `answer_wait`). Never logs a token or a body.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::http_client::{Client, HttpError, Options, Url};
use crate::proto::FrameBuilder;
use crate::proxy::{
    connect_body, connect_verdict, rpc_answer, AuthCache, ConnectOutcome, Credential, RpcAnswer,
    ShardAnswer, Verdict,
};
use crate::route::ConnRef;
use crate::shard::{service::ServiceMsg, Node, SendFailure, ShardMsg};

/// Idle keep-alive connections kept per backend host.
pub const IDLE_PER_HOST_MAX: usize = 32;
/// An idle backend connection older than this is closed (below Node's 5 s keep-alive).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Distinct backend hosts pooled (the auth service and `rpc_routes` name at most 257).
pub const HOSTS_MAX: usize = 300;
/// Largest backend response head.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Largest auth-service answer body (a user id and a few fields).
pub const AUTH_ANSWER_BYTES_MAX: usize = 16 * 1024;
/// How long an answer is retried against a full shard inbox, in steps of [`ANSWER_RETRY_STEP`].
pub const ANSWER_RETRY_TOTAL: Duration = Duration::from_secs(1);
const ANSWER_RETRY_STEP: Duration = Duration::from_millis(10);

/// What shards hand the bridge (in `BridgeMsg::Proxy`).
pub enum Job {
    /// Check a parked upgrade's credential.
    Connect {
        origin: ConnRef,
        cred: Credential,
        remote_addr: Option<String>,
        path: String,
    },
    /// Post a routed command to `rpc_routes[route]`.
    Call {
        origin: ConnRef,
        route: usize,
        kind: String,
        id: Option<String>,
        body: Vec<u8>,
    },
}

/// Counters of the proxied calls, kept by the bridge, rendered in `/metrics`.
#[derive(Default)]
pub struct ProxyStats {
    pub auth_requests: AtomicU64,
    pub auth_cache_hits: AtomicU64,
    pub auth_allowed: AtomicU64,
    pub auth_refused: AtomicU64,
    pub auth_timeouts: AtomicU64,
    pub auth_unavailable: AtomicU64,
    pub auth_busy: AtomicU64,
    pub rpc_calls: AtomicU64,
    pub rpc_replies: AtomicU64,
    pub rpc_timeouts: AtomicU64,
    pub rpc_unavailable: AtomicU64,
    pub rpc_garbage: AtomicU64,
    pub rpc_busy: AtomicU64,
    pub answers_dropped: AtomicU64,
    pub auth_in_flight: AtomicU64,
    pub rpc_in_flight: AtomicU64,
}

/// Prometheus text of `s` (appended to `/metrics` when the auth service or routes are set).
pub fn render(s: &ProxyStats, out: &mut String) {
    let rows: [(&str, &str, &AtomicU64, &str); 16] = [
        (
            "switchboard_auth_service_requests_total",
            "Requests sent to the auth service.",
            &s.auth_requests,
            "counter",
        ),
        (
            "switchboard_auth_service_cache_hits_total",
            "Upgrades answered from the auth cache (accepted or refused).",
            &s.auth_cache_hits,
            "counter",
        ),
        (
            "switchboard_auth_service_allowed_total",
            "Upgrades the auth service accepted (cache hits included).",
            &s.auth_allowed,
            "counter",
        ),
        (
            "switchboard_auth_service_refused_total",
            "Upgrades the auth service refused: 401 (cache hits included).",
            &s.auth_refused,
            "counter",
        ),
        (
            "switchboard_auth_service_timeouts_total",
            "Auth-service requests past auth_service_timeout: 503.",
            &s.auth_timeouts,
            "counter",
        ),
        (
            "switchboard_auth_service_unavailable_total",
            "Auth-service requests that failed (down, 5xx, unreadable): 503.",
            &s.auth_unavailable,
            "counter",
        ),
        (
            "switchboard_auth_service_busy_total",
            "Upgrades refused at auth_service_concurrency_max: 503.",
            &s.auth_busy,
            "counter",
        ),
        (
            "switchboard_auth_service_in_flight",
            "Auth-service requests in flight.",
            &s.auth_in_flight,
            "gauge",
        ),
        (
            "switchboard_rpc_calls_total",
            "Custom-type commands posted to a backend.",
            &s.rpc_calls,
            "counter",
        ),
        (
            "switchboard_rpc_replies_total",
            "Backend replies passed to the client (2xx, or a 4xx error text).",
            &s.rpc_replies,
            "counter",
        ),
        (
            "switchboard_rpc_timeouts_total",
            "Backend calls past rpc_timeout.",
            &s.rpc_timeouts,
            "counter",
        ),
        (
            "switchboard_rpc_unavailable_total",
            "Backend calls that failed (down, 5xx).",
            &s.rpc_unavailable,
            "counter",
        ),
        (
            "switchboard_rpc_garbage_total",
            "Backend replies that were not JSON, too large, or not HTTP.",
            &s.rpc_garbage,
            "counter",
        ),
        (
            "switchboard_rpc_busy_total",
            "Commands refused at rpc_concurrency_max.",
            &s.rpc_busy,
            "counter",
        ),
        (
            "switchboard_rpc_in_flight",
            "Backend calls in flight.",
            &s.rpc_in_flight,
            "gauge",
        ),
        (
            "switchboard_proxy_answers_dropped_total",
            "Auth or backend answers a full shard inbox never took.",
            &s.answers_dropped,
            "counter",
        ),
    ];
    for (name, help, v, kind) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// The bridge's proxy state.
pub struct Proxy {
    node: Arc<Node>,
    client: Client,
    auth_url: Option<Url>,
    routes: Vec<Url>,
    cache: RefCell<AuthCache>,
    auth_in_flight: Cell<usize>,
    rpc_in_flight: Cell<usize>,
    fb: RefCell<FrameBuilder>,
}

impl Proxy {
    /// From the node's (validated) config.
    pub fn new(node: Arc<Node>) -> Proxy {
        let cfg = &node.cfg;
        let auth_url = cfg
            .auth_service_url
            .as_deref()
            .and_then(|u| Url::parse(u).ok());
        let routes = cfg
            .rpc_routes
            .iter()
            .map(|r| Url::parse(&r.url).expect("validated by config"))
            .collect();
        let client = Client::new(Options {
            // Each call runs under its own deadline (auth_service_timeout or rpc_timeout), which
            // bounds the connect too; this only keeps one connect from outlasting the longer.
            connect_timeout: cfg.auth_service_timeout.max(cfg.rpc_timeout),
            idle_per_host_max: IDLE_PER_HOST_MAX,
            idle_timeout: IDLE_TIMEOUT,
            hosts_max: HOSTS_MAX,
            head_bytes_max: HEAD_BYTES_MAX,
            user_agent: concat!("switchboard/", env!("CARGO_PKG_VERSION")),
        });
        let cache = RefCell::new(AuthCache::new(cfg.auth_service_cache_entries_max));
        Proxy {
            node,
            client,
            auth_url,
            routes,
            cache,
            auth_in_flight: Cell::new(0),
            rpc_in_flight: Cell::new(0),
            fb: RefCell::new(FrameBuilder::default()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.node.now_us() / 1000
    }
}

/// Take one job: answered from the cache or refused at a limit at once, else a task.
/// Which per-node in-flight count a call takes.
#[derive(Clone, Copy)]
enum Calls {
    Auth,
    Rpc,
}

/// One call counted in flight (the count and its gauge) from `take` until dropped: also when
/// its task ends early or panics, so a slot is never lost.
struct Slot {
    p: Rc<Proxy>,
    calls: Calls,
}

impl Slot {
    fn take(p: &Rc<Proxy>, calls: Calls) -> Slot {
        let s = Slot {
            p: p.clone(),
            calls,
        };
        s.count(true);
        s
    }

    fn count(&self, up: bool) {
        let stats = &self.p.node.proxy_stats;
        let (n, gauge) = match self.calls {
            Calls::Auth => (&self.p.auth_in_flight, &stats.auth_in_flight),
            Calls::Rpc => (&self.p.rpc_in_flight, &stats.rpc_in_flight),
        };
        n.set(if up { n.get() + 1 } else { n.get() - 1 });
        gauge.store(n.get() as u64, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count(false);
    }
}

pub fn accept(p: &Rc<Proxy>, job: Job) {
    let stats = &p.node.proxy_stats;
    match job {
        Job::Connect {
            origin,
            cred,
            remote_addr,
            path,
        } => {
            if let Some(hit) = p.cache.borrow_mut().get(&cred, p.now_ms()) {
                stats.auth_cache_hits.fetch_add(1, Ordering::Relaxed);
                let outcome = match hit {
                    Some(user) => {
                        stats.auth_allowed.fetch_add(1, Ordering::Relaxed);
                        ConnectOutcome::Allow(user)
                    }
                    None => {
                        stats.auth_refused.fetch_add(1, Ordering::Relaxed);
                        ConnectOutcome::Refused
                    }
                };
                return answer_connect(p, origin, outcome);
            }
            let Some(url) = p.auth_url.clone() else {
                return answer_connect(
                    p,
                    origin,
                    ConnectOutcome::Unavailable(crate::proxy::AUTH_UNAVAILABLE),
                );
            };
            if p.auth_in_flight.get() >= p.node.cfg.auth_service_concurrency_max {
                stats.auth_busy.fetch_add(1, Ordering::Relaxed);
                return answer_connect(
                    p,
                    origin,
                    ConnectOutcome::Unavailable(crate::proxy::AUTH_BUSY),
                );
            }
            let slot = Slot::take(p, Calls::Auth);
            stats.auth_requests.fetch_add(1, Ordering::Relaxed);
            let p = p.clone();
            tokio::task::spawn_local(async move {
                let body = connect_body(&cred, remote_addr.as_deref(), &path);
                let cfg = &p.node.cfg;
                let r = p
                    .client
                    .post_json(
                        &url,
                        &[],
                        &body,
                        cfg.auth_service_timeout,
                        AUTH_ANSWER_BYTES_MAX,
                    )
                    .await;
                drop(slot);
                let stats = &p.node.proxy_stats;
                let outcome = match r {
                    Ok(resp) => {
                        match connect_verdict(
                            resp.status,
                            &resp.body,
                            &cfg.auth_service_user_pointer,
                        ) {
                            Verdict::Allow(user) => {
                                stats.auth_allowed.fetch_add(1, Ordering::Relaxed);
                                let ttl = cfg.auth_service_cache_ttl.as_millis() as u64;
                                p.cache
                                    .borrow_mut()
                                    .put(cred, Some(user.clone()), ttl, p.now_ms());
                                ConnectOutcome::Allow(user)
                            }
                            Verdict::Deny => {
                                stats.auth_refused.fetch_add(1, Ordering::Relaxed);
                                let ttl = cfg.auth_service_negative_cache_ttl.as_millis() as u64;
                                p.cache.borrow_mut().put(cred, None, ttl, p.now_ms());
                                ConnectOutcome::Refused
                            }
                            Verdict::Broken => {
                                stats.auth_unavailable.fetch_add(1, Ordering::Relaxed);
                                ConnectOutcome::Unavailable(crate::proxy::AUTH_UNAVAILABLE)
                            }
                        }
                    }
                    Err(HttpError::Timeout) => {
                        stats.auth_timeouts.fetch_add(1, Ordering::Relaxed);
                        ConnectOutcome::Unavailable(crate::proxy::AUTH_TIMED_OUT)
                    }
                    Err(_) => {
                        stats.auth_unavailable.fetch_add(1, Ordering::Relaxed);
                        ConnectOutcome::Unavailable(crate::proxy::AUTH_UNAVAILABLE)
                    }
                };
                answer_connect(&p, origin, outcome);
            });
        }
        Job::Call {
            origin,
            route,
            kind,
            id,
            body,
        } => {
            let Some(url) = p.routes.get(route).cloned() else {
                return;
            };
            if p.rpc_in_flight.get() >= p.node.cfg.rpc_concurrency_max {
                stats.rpc_busy.fetch_add(1, Ordering::Relaxed);
                let f = error_frame(p, id.as_deref(), crate::proxy::RPC_BUSY);
                return answer_call(p, origin, f);
            }
            let slot = Slot::take(p, Calls::Rpc);
            stats.rpc_calls.fetch_add(1, Ordering::Relaxed);
            let p = p.clone();
            tokio::task::spawn_local(async move {
                let cfg = &p.node.cfg;
                let r = p
                    .client
                    .post_json(&url, &[], &body, cfg.rpc_timeout, cfg.rpc_reply_bytes_max)
                    .await;
                drop(slot);
                let stats = &p.node.proxy_stats;
                let answer = match r {
                    Ok(resp) => rpc_answer(&kind, resp.status, &resp.body),
                    Err(HttpError::Timeout) => RpcAnswer::Error(crate::proxy::RPC_TIMED_OUT.into()),
                    Err(HttpError::Unreachable) => {
                        RpcAnswer::Error(crate::proxy::RPC_UNAVAILABLE.into())
                    }
                    Err(HttpError::TooLarge | HttpError::Malformed) => {
                        RpcAnswer::Error(crate::proxy::RPC_GARBAGE.into())
                    }
                };
                let frame = match &answer {
                    RpcAnswer::Reply { kind, data } => {
                        stats.rpc_replies.fetch_add(1, Ordering::Relaxed);
                        let now_ms = unix_ms();
                        p.fb.borrow_mut().text(p.node.now_us(), |o| {
                            o.str("type", kind)
                                .id(id.as_deref())
                                .raw("data", data)
                                .u64("timestamp", now_ms);
                        })
                    }
                    RpcAnswer::Error(text) => {
                        let counter = match text.as_str() {
                            crate::proxy::RPC_TIMED_OUT => &stats.rpc_timeouts,
                            crate::proxy::RPC_UNAVAILABLE => &stats.rpc_unavailable,
                            crate::proxy::RPC_GARBAGE => &stats.rpc_garbage,
                            _ => &stats.rpc_replies,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        error_frame(&p, id.as_deref(), text)
                    }
                };
                answer_call(&p, origin, frame);
            });
        }
    }
}

/// Unix milliseconds, for frames' `timestamp`.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error_frame(p: &Proxy, id: Option<&str>, text: &str) -> crate::proto::Frame {
    let now_ms = unix_ms();
    p.fb.borrow_mut()
        .error(now_ms, p.node.now_us(), id, text, None)
}

fn answer_connect(p: &Rc<Proxy>, origin: ConnRef, outcome: ConnectOutcome) {
    let msg = ShardAnswer::Connect {
        slot: origin.slot,
        gen: origin.gen,
        outcome,
    };
    to_shard(p, origin.shard as usize, msg);
}

fn answer_call(p: &Rc<Proxy>, origin: ConnRef, frame: crate::proto::Frame) {
    let msg = ShardAnswer::Call {
        slot: origin.slot,
        gen: origin.gen,
        frame,
    };
    to_shard(p, origin.shard as usize, msg);
}

/// Hand `answer` to `shard`, retrying a full inbox for [`ANSWER_RETRY_TOTAL`].
fn to_shard(p: &Rc<Proxy>, shard: usize, answer: ShardAnswer) {
    let msg = ShardMsg::service(ServiceMsg::Proxy(Box::new(answer)));
    let msg = match p.node.inboxes.try_send(shard, msg) {
        Ok(()) => return,
        Err((SendFailure::Dead, _)) => return,
        Err((SendFailure::Full, m)) => m,
    };
    let p = p.clone();
    tokio::task::spawn_local(async move {
        let mut msg = msg;
        let mut waited = Duration::ZERO;
        while waited < ANSWER_RETRY_TOTAL {
            tokio::time::sleep(ANSWER_RETRY_STEP).await;
            waited += ANSWER_RETRY_STEP;
            match p.node.inboxes.try_send(shard, msg) {
                Ok(()) => return,
                Err((SendFailure::Dead, _)) => return,
                Err((SendFailure::Full, m)) => msg = m,
            }
        }
        p.node
            .proxy_stats
            .answers_dropped
            .fetch_add(1, Ordering::Relaxed);
    });
}
