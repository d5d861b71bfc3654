//! Wiring: build the node (config, verifier, directory, limits), start the bridge and one
//! pinned shard thread per core, then wait for SIGTERM/SIGINT and drain.
//!
//! Drain: /ready turns 503, every shard stops accepting, flushes what is queued and closes its
//! clients with 1001 in staggered batches over half of `shutdown_timeout`; whatever is left at
//! the deadline is dropped. The process exits 0.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;
use mio::{Poll, Waker};

use crate::auth::Verifier;
use crate::bridge::BridgeHandle;
use crate::config::{AuthMode, Config};
use crate::directory::Directory;
use crate::limits::{fd_reserve, SHARDS_MAX, SHARD_INBOX_CAPACITY};
use crate::metrics::ShardStats;
use crate::shard::{Inbox, Inboxes, Node, SendFailure, Shard, ShardMsg};

/// Start-up failure, said in words an operator can act on.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running node: its shards, bridge and the handle to stop it.
pub struct Server {
    node: Arc<Node>,
    shards: Vec<std::thread::JoinHandle<()>>,
    bridge: BridgeHandle,
    pub addr: SocketAddr,
}

impl Server {
    /// Bind, spawn every thread and return; the node serves until [`Server::shutdown`].
    pub fn start(cfg: Config) -> Result<Server, StartError> {
        let mut cfg = cfg;
        if cfg.io_backend == crate::config::IoBackend::IoUring {
            if let Err(why) = crate::io::uring::probe() {
                // One line, and the node serves on epoll: io_uring is a speed choice, never
                // a reason not to serve.
                tracing::warn!("io_backend io_uring: {why}; the shards run on epoll");
                cfg.io_backend = crate::config::IoBackend::Epoll;
            }
        }
        // Limits first: the fd limit decides how many connections are possible.
        let (soft, hard) = crate::doctor::raise_nofile_limit()
            .map_err(|e| StartError(format!("cannot read or raise RLIMIT_NOFILE: {e}")))?;
        let limits = crate::doctor::read_limits();
        let n = if cfg.shards == 0 {
            crate::io::available_cores()
        } else {
            cfg.shards
        };
        let n = n.clamp(1, SHARDS_MAX);
        let reachable = soft.saturating_sub(fd_reserve(n));
        let max_connections = if cfg.max_connections == 0 {
            reachable.max(1)
        } else {
            cfg.max_connections
        };
        if max_connections > reachable {
            let msg = format!(
                "max_connections {max_connections} cannot be reached: RLIMIT_NOFILE soft {soft} hard {hard} allows about {reachable}; run `switchboard doctor --connections {max_connections}` for the fixes"
            );
            if cfg.strict {
                return Err(StartError(msg));
            }
            tracing::warn!("{msg}");
        }
        for f in crate::doctor::check_with_fd_reserve(&limits, max_connections, fd_reserve(n)) {
            if f.severity == crate::doctor::Severity::Blocking {
                tracing::warn!(
                    limit = f.name,
                    current = %f.current,
                    required = %f.required,
                    "kernel limit too low for max_connections; `switchboard doctor --connections {max_connections}` prints the fix"
                );
            }
        }

        let verifier = match cfg.auth_mode {
            AuthMode::Jwt => {
                Some(Verifier::from_config(&cfg).map_err(|e| StartError(e.to_string()))?)
            }
            AuthMode::Service => {
                tracing::info!(
                    timeout_ms = cfg.auth_service_timeout.as_millis() as u64,
                    "auth mode is service: every upgrade's token or ?user_id= is checked by auth_service_url"
                );
                None
            }
            AuthMode::None => {
                tracing::warn!("auth mode is none: clients are anonymous or claim ?user_id= (development only; set SWITCHBOARD_AUTH_MODE=jwt in production)");
                None
            }
        };

        // rediss:// in redis_url: its files and the system's trust store, read once now so a
        // bad one stops the start instead of failing every connect.
        let redis_tls = crate::bridge::redis::tls::RedisTls::from_config(&cfg)
            .map_err(|(key, e)| StartError(format!("config key `{key}`: {e}")))?;
        match &redis_tls {
            Some(t) if t.verify == crate::cluster::UrlTls::Insecure => tracing::warn!(
                tls = %t.describe(),
                "redis: TLS WITHOUT CERTIFICATE CHECKS (#insecure in redis_url): the connections to Redis are encrypted, but anyone on the path can pose as Redis and read and change every cross-node message; use redis_tls_ca_file and drop #insecure"
            ),
            Some(t) => tracing::info!(tls = %t.describe(), "redis: TLS (rediss://)"),
            None => {}
        }

        // tls_port: the certificate and key, read and checked now (a bad one stops the start).
        let tls = crate::tls::ServerTls::from_config(&cfg)
            .map_err(|(key, e)| StartError(format!("config key `{key}`: {e}")))?;

        let host: IpAddr = cfg.host.parse().map_err(|_| {
            StartError(format!(
                "config key `host`: not an IP address: {}",
                cfg.host
            ))
        })?;
        let addr = SocketAddr::new(host, cfg.port);
        let tls_addr = tls.as_ref().map(|_| SocketAddr::new(host, cfg.tls_port));

        let mut polls = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        let mut listeners = Vec::with_capacity(n);
        let mut tls_listeners = Vec::with_capacity(n);
        let stream_opts = crate::io::StreamOptions::from_config(&cfg);
        let shared_listener = if cfg.reuse_port {
            None
        } else {
            Some(
                crate::io::std_listener(addr, false, cfg.listen_backlog, stream_opts)
                    .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?,
            )
        };
        // The TLS listener: the same shards and the same accept distribution as the plain one.
        let shared_tls_listener = match tls_addr {
            Some(a) if !cfg.reuse_port => Some(
                crate::io::std_listener(a, false, cfg.listen_backlog, stream_opts)
                    .map_err(|e| StartError(format!("cannot listen on {a} (tls_port): {e}")))?,
            ),
            _ => None,
        };
        for i in 0..n {
            let poll = Poll::new().map_err(|e| StartError(format!("epoll_create failed: {e}")))?;
            let waker = Waker::new(poll.registry(), mio::Token(usize::MAX - 1))
                .map_err(|e| StartError(format!("eventfd failed: {e}")))?;
            let (tx, rx) = bounded::<ShardMsg>(SHARD_INBOX_CAPACITY);
            inboxes.push(Inbox {
                tx,
                waker,
                wake_pending: AtomicBool::new(false),
            });
            receivers.push(rx);
            polls.push(poll);
            let l = match &shared_listener {
                None => crate::io::std_listener(addr, true, cfg.listen_backlog, stream_opts),
                Some(l) => l.try_clone(),
            }
            .map(mio::net::TcpListener::from_std)
            .map_err(|e| StartError(format!("cannot listen on {addr} (shard {i}): {e}")))?;
            listeners.push(l);
            let tl = match (tls_addr, &shared_tls_listener) {
                (None, _) => None,
                (Some(a), None) => Some(
                    crate::io::std_listener(a, true, cfg.listen_backlog, stream_opts)
                        .map(mio::net::TcpListener::from_std)
                        .map_err(|e| {
                            StartError(format!("cannot listen on {a} (tls_port, shard {i}): {e}"))
                        })?,
                ),
                (Some(a), Some(l)) => Some(
                    l.try_clone()
                        .map(mio::net::TcpListener::from_std)
                        .map_err(|e| {
                            StartError(format!("cannot listen on {a} (tls_port, shard {i}): {e}"))
                        })?,
                ),
            };
            tls_listeners.push(tl);
        }

        // The bridge is built with the shard inboxes, so it can deliver what other nodes send.
        let faults = Arc::new(crate::fault::Faults::from_env());
        if faults.is_active() {
            tracing::warn!(
                faults = ?faults,
                "test fault injection is on ({}); never set it in production",
                crate::fault::ENV
            );
        }
        let inboxes = Arc::new(Inboxes(inboxes, faults.clone()));
        let node_id: u32 = rand_node_id();
        let (bridge_tx, bridge_rx) = crate::bridge::inbox();

        let node = Arc::new(Node {
            id: node_id,
            dir: Directory::new(),
            failed: std::sync::OnceLock::new(),
            verifier,
            inboxes,
            stats: (0..n).map(|_| ShardStats::default()).collect(),
            draining: AtomicBool::new(false),
            bridge_healthy: Arc::new(AtomicBool::new(true)),
            bridge_tx,
            clustered: cfg.redis_url.is_some(),
            redis_tls,
            tls,
            redis_stats: Default::default(),
            store_stats: Default::default(),
            kafka_stats: Default::default(),
            proxy_stats: Default::default(),
            eureka_stats: Default::default(),
            max_connections,
            epoch: Instant::now(),
            message_rate: crate::metrics::MessageRate::new(Instant::now()),
            limits,
            faults,
            cfg,
        });

        // The bridge starts before the shards, so the store is being set up while they start.
        let bridge = BridgeHandle::start(node.clone(), bridge_rx)
            .map_err(|e| StartError(format!("cannot start the bridge thread: {e}")))?;

        // Said before the shards start: the sockets already listen, and a client the node
        // answers (a test's /live poll included) can count on these lines being in the log.
        if node.cfg.api_key.is_some() {
            tracing::info!("server API on: /api/publish, /api/broadcast, /api/users/{{id}}/send, /api/users/{{id}}/disconnect, /api/stats (X-API-Key or Authorization: apikey)");
        } else {
            tracing::info!("server API off: no api_key configured (SWITCHBOARD_API_KEY)");
        }
        if let (Some(a), Some(t)) = (tls_addr, node.tls.as_ref()) {
            tracing::info!(
                addr = %a,
                cert = %t.cert_file,
                key = %t.key_file,
                "TLS listener on (wss://, https://); SIGHUP reloads the certificate and key"
            );
        }
        tracing::info!(
            %addr,
            shards = n,
            io = node.cfg.io_backend.label(),
            max_connections,
            auth = ?node.cfg.auth_mode,
            echo_path = node.cfg.echo_path.as_deref().unwrap_or("off"),
            "switchboard listening"
        );
        let mut shards = Vec::with_capacity(n);
        for (i, (((poll, listener), tls_listener), rx)) in polls
            .into_iter()
            .zip(listeners)
            .zip(tls_listeners)
            .zip(receivers)
            .enumerate()
        {
            let shard = Shard::new(i, node.clone(), poll, listener, tls_listener, rx)
                .map_err(|e| StartError(format!("shard {i} setup failed: {e}")))?;
            let pin = node.cfg.pin_cores;
            let shard_node = node.clone();
            let handle = std::thread::Builder::new()
                .name(format!("switchboard-shard-{i}"))
                .spawn(move || {
                    if pin && !crate::io::pin_to_core(i) {
                        tracing::warn!(shard = i, "could not pin to a core");
                    }
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run()));
                    let cause = match outcome {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => format!("shard {i} stopped: {e}"),
                        Err(p) => format!("shard {i} panicked: {}", panic_text(&p)),
                    };
                    shard_died(&shard_node, cause);
                })
                .map_err(|e| StartError(format!("cannot spawn shard {i}: {e}")))?;
            shards.push(handle);
        }
        Ok(Server {
            node,
            shards,
            bridge,
            addr,
        })
    }

    /// Drain and stop: /ready turns 503, every client gets 1001, threads end. Returns
    /// whether the node stopped because a shard died (the process then exits non-zero).
    pub fn shutdown(mut self) -> bool {
        let started = Instant::now();
        self.node.draining.store(true, Ordering::SeqCst);
        // Service discovery hears of it at once (the instance turns OUT_OF_SERVICE while
        // the clients are closed), not after the drain.
        self.bridge.draining();
        let deadline = started + self.node.cfg.shutdown_timeout;
        for i in 0..self.node.inboxes.len() {
            // Drain must get through: retry while an inbox is full, but not past the drain
            // deadline, and never for a shard that has died (its inbox is disconnected).
            loop {
                match self.node.inboxes.send(i, ShardMsg::Drain) {
                    Ok(()) | Err(SendFailure::Dead) => break,
                    Err(SendFailure::Full) if Instant::now() >= deadline => {
                        tracing::error!(shard = i, "inbox full until the drain deadline");
                        break;
                    }
                    Err(SendFailure::Full) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                }
            }
        }
        for h in self.shards.drain(..) {
            let _ = h.join();
        }
        self.bridge.shutdown();
        let failed = self.node.failed.get().is_some();
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            failed,
            "drained; exiting"
        );
        failed
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// SIGHUP: read `tls_cert_file` and `tls_key_file` again. New TLS connections get the new
    /// certificate, existing ones keep theirs; a reload that fails keeps the one in use. Logged
    /// and counted either way (`switchboard_tls_reloads_total`, `..._reload_failures_total`).
    pub fn reload_tls(&self) {
        let Some(t) = self.node.tls.as_ref() else {
            tracing::info!("SIGHUP: no TLS listener (tls_port 0), nothing to reload");
            return;
        };
        match t.reload() {
            Ok(()) => tracing::info!(
                cert = %t.cert_file,
                key = %t.key_file,
                "SIGHUP: TLS certificate and key reloaded; new connections use them"
            ),
            Err((key, e)) => tracing::error!(
                key,
                error = %e,
                "SIGHUP: TLS reload failed; the certificate in use is kept"
            ),
        }
    }
}

/// A random node id for [`crate::route::ConnRef`] (not 0, so a zeroed reference never matches).
fn rand_node_id() -> u32 {
    let (hi, _) = uuid::Uuid::new_v4().as_u64_pair();
    (hi as u32).max(1)
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// A shard thread ended by a fault (a programmer error): the node is half-alive, so it goes
/// down. `/ready` turns red at once, the cause is logged once, and the process is asked to
/// stop as on SIGTERM: the live shards drain within `shutdown_timeout` and the process exits
/// non-zero, for the service manager to restart it.
fn shard_died(node: &Node, cause: String) {
    if node.failed.set(cause.clone()).is_ok() {
        tracing::error!(cause = %cause, "a shard died: the node stops (drain, then exit 1)");
        // SAFETY: raising a signal on our own process has no memory-safety conditions; the
        // handler installed by main (signal-hook) turns it into the drain.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
    }
}
