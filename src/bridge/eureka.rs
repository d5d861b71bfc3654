//! Service discovery: this node's registration with Eureka (Netflix Eureka's REST API as
//! Spring Cloud's Eureka servers serve it), when `eureka_url` is set. With it empty nothing
//! here runs: no task, no socket, no metric rows.
//!
//! One task on the bridge's runtime ([`run`]) owns the registration:
//!
//! - at start it registers (`POST {eureka}/apps/{APP}`, the instance document of
//!   [`Instance::encode`]: host, address, port, the health-check, status and home page URLs,
//!   the lease), then once removes any status override left by an earlier run of the same
//!   instance id that was killed mid-drain (`DELETE .../status?value=UP`: Eureka would
//!   otherwise keep it `OUT_OF_SERVICE` for as long as it renews), and renews the lease
//!   every `eureka_renewal_interval` (`PUT {eureka}/apps/{APP}/{id}`);
//! - a heartbeat or status change answered 404 means Eureka forgot the instance (it restarted,
//!   or evicted a node that was paused): the task registers again at once;
//! - the moment a drain starts (`BridgeHandle::draining`, called by `Server::shutdown` right
//!   after `/ready` turns 503) it tells Eureka `OUT_OF_SERVICE`
//!   (`PUT .../status?value=OUT_OF_SERVICE`), so clients that discover the node through Eureka
//!   stop picking it while its connections are closed; heartbeats go on;
//! - at exit (`BridgeHandle::shutdown`, after the shards have stopped) it deregisters
//!   (`DELETE {eureka}/apps/{APP}/{id}`), the status first if that had not got through, all
//!   within one `eureka_timeout`: a dead Eureka delays the exit by that much at most.
//!
//! A server that does not answer (down, slow, 5xx) is retried after a capped, jittered backoff
//! (`cluster::Backoff`, capped at `eureka_retry_max`), on the next URL of the list each time.
//! Nothing here delays the start, the drain or `/ready`: Eureka is not needed to serve, so a
//! node whose Eureka is down serves and registers once Eureka answers.
//!
//! Owns: the server URLs and their credentials ([`ServerUrl`]), the instance document
//! (sans-IO, [`Instance`]), the registration state and its counters ([`EurekaStats`], rendered
//! in `/metrics` by [`render`]). Never touches shards, clients or the store. Logs changes of
//! state (registered, unreachable, forgotten, out of service, deregistered), never each
//! heartbeat; never logs a password.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::http_client::{Client, HttpError, Method, Options, Url, URL_BYTES_MAX};
use crate::cluster::Backoff;
use crate::config::Config;
use crate::proto::json;
use crate::shard::Node;

/// Longest app name, instance id or host name accepted (Eureka stores them as strings; 255
/// keeps a request line far below any server's limit).
pub const NAME_BYTES_MAX: usize = 255;
/// Largest answer body read from Eureka (its answers to these requests are empty or one
/// instance document).
pub const ANSWER_BYTES_MAX: usize = 64 * 1024;
/// Largest answer head read from Eureka.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// An idle connection to Eureka older than this is not reused: below Tomcat's 20 s default
/// keep-alive timeout (Spring Cloud's Eureka server runs on Tomcat), so with heartbeats 30 s
/// apart each one opens a new connection, and with short intervals they share one.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Eureka servers whose connections are pooled (one idle connection each).
const HOSTS_MAX: usize = 16;
/// What the bridge thread waits for the task beyond `eureka_timeout` at exit (the task's own
/// deadline is `eureka_timeout`; this covers its scheduling).
pub const EXIT_MARGIN: Duration = Duration::from_millis(250);
/// `User-Agent` of every request.
const USER_AGENT: &str = concat!("switchboard/", env!("CARGO_PKG_VERSION"));

/// Where the node is, as the registration task hears it ([`crate::bridge::BridgeHandle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving: registered `UP`.
    Serving,
    /// A drain has started: `OUT_OF_SERVICE`, heartbeats go on.
    Draining,
    /// The shards have stopped: deregister and end.
    Exiting,
}

/// The instance status this node tells Eureka.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Up,
    OutOfService,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::OutOfService => "OUT_OF_SERVICE",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sans-IO: URLs, names, the instance document
// ---------------------------------------------------------------------------------------------

/// One Eureka server's service URL (`http://[user:password@]host:port/eureka/`, Spring
/// Cloud's `defaultZone` form), split into where requests go and their credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host and port, with the path of the service URL without its trailing `/`.
    base: Url,
    /// `Authorization` header value (`Basic ...`) from the URL's user and password.
    authorization: Option<String>,
    /// The URL as logs may show it (no password).
    pub shown: String,
}

impl ServerUrl {
    /// Parse a service URL. Errors say what to write instead (and never quote the password).
    pub fn parse(s: &str) -> Result<ServerUrl, String> {
        let Some(rest) = s.strip_prefix("http://") else {
            // Url::parse says why for https and other schemes.
            return Err(Url::parse(s)
                .err()
                .unwrap_or_else(|| "expected http://host:port/eureka/".into()));
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (userinfo, host) = match rest[..authority_end].rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, &rest[..authority_end]),
        };
        let without = format!("http://{host}{}", &rest[authority_end..]);
        let mut base = Url::parse(&without)?;
        if base.path.contains('?') {
            return Err("a service URL takes no query; expected http://host:port/eureka/".into());
        }
        while base.path.ends_with('/') {
            base.path.pop();
        }
        let authorization = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or("bad %-escape in the user name")?;
                let password = percent_decode(password).ok_or("bad %-escape in the password")?;
                if user.is_empty() {
                    return Err("an empty user name before @; drop the @ or name the user".into());
                }
                let mut pair = user;
                pair.push(b':');
                pair.extend_from_slice(&password);
                Some(format!("Basic {}", base64(&pair)))
            }
        };
        Ok(ServerUrl {
            shown: crate::config::url_without_password(s),
            base,
            authorization,
        })
    }

    /// The URL of `tail` (`/apps/...`) on this server.
    pub fn at(&self, tail: &str) -> Url {
        Url {
            host: self.base.host.clone(),
            port: self.base.port,
            path: format!("{}{tail}", self.base.path),
        }
    }
}

/// `%XX` escapes of a URL's user or password decoded; None for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding (RFC 4648), for the Basic credentials.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether `v` may be an app name (`colon` false) or an instance id or host name (`colon`
/// true): it goes into request paths as it is, so only characters that need no escaping.
/// Err completes "app name "x" ...".
pub fn check_name(v: &str, colon: bool) -> Result<(), String> {
    let ok = |b: u8| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || (colon && b == b':')
    };
    if v.is_empty() || v.len() > NAME_BYTES_MAX || !v.bytes().all(ok) {
        return Err(format!(
            "must be 1 to {NAME_BYTES_MAX} bytes of letters, digits, '.', '_', '-'{}",
            if colon { ", ':'" } else { "" }
        ));
    }
    Ok(())
}

/// Whether `v` may be a registered page URL: a path on this node (`/ready`) or an absolute
/// `http://` or `https://` URL (a proxy in front of the node).
pub fn check_page_url(v: &str) -> Result<(), String> {
    if v.len() > URL_BYTES_MAX {
        return Err(format!("a URL is at most {URL_BYTES_MAX} bytes"));
    }
    if v.bytes()
        .any(|b| b <= b' ' || b == 0x7f || b == b'"' || b == b'\\')
    {
        return Err("may not hold spaces, controls, quotes or backslashes".into());
    }
    let absolute = ["http://", "https://"]
        .iter()
        .find_map(|p| v.strip_prefix(p))
        .map(|rest| !rest.is_empty() && !rest.starts_with('/'));
    match absolute {
        Some(true) => Ok(()),
        Some(false) => Err("names no host".into()),
        None if v.starts_with('/') => Ok(()),
        None => Err("expected a path starting with / or an http:// or https:// URL".into()),
    }
}

/// A registered page: a path becomes `http://<host>:<port><path>`, a URL is kept.
pub fn page_url(v: &str, host: &str, port: u16) -> String {
    if !v.starts_with('/') {
        return v.to_owned();
    }
    if host.contains(':') {
        format!("http://[{host}]:{port}{v}")
    } else {
        format!("http://{host}:{port}{v}")
    }
}

/// What this node registers: Eureka's `InstanceInfo`, the fields its server requires and
/// Spring Cloud's clients read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Upper case, as Eureka keeps app names.
    pub app: String,
    pub instance_id: String,
    pub host_name: String,
    pub ip_addr: String,
    pub port: u16,
    /// The TLS listener's port (`tls_port`), registered enabled; None: `securePort` disabled.
    pub secure_port: Option<u16>,
    /// The app name in lower case (what Spring Cloud's load balancers look up).
    pub vip_address: String,
    pub home_page_url: String,
    pub status_page_url: String,
    pub health_check_url: String,
    pub renewal_interval_secs: u64,
    pub duration_secs: u64,
}

impl Instance {
    /// The registration body: `{"instance": {...}}` with `status` and `lastDirtyTimestamp`
    /// (Unix ms of the last change of what is registered; Eureka keeps the newer of two
    /// registrations of one instance by it).
    pub fn encode(&self, status: Status, last_dirty_ms: u64) -> Vec<u8> {
        let mut o = Vec::with_capacity(1024);
        let field = |o: &mut Vec<u8>, name: &str, v: &str| {
            json::write_str(o, name);
            o.push(b':');
            json::write_str(o, v);
            o.push(b',');
        };
        o.extend_from_slice(b"{\"instance\":{");
        field(&mut o, "instanceId", &self.instance_id);
        field(&mut o, "hostName", &self.host_name);
        field(&mut o, "app", &self.app);
        field(&mut o, "ipAddr", &self.ip_addr);
        field(&mut o, "status", status.as_str());
        o.extend_from_slice(b"\"port\":{\"$\":");
        json::write_u64(&mut o, u64::from(self.port));
        o.extend_from_slice(b",\"@enabled\":\"true\"},\"securePort\":{\"$\":");
        // Eureka's own default (443, disabled) when there is no TLS listener.
        json::write_u64(&mut o, u64::from(self.secure_port.unwrap_or(443)));
        o.extend_from_slice(if self.secure_port.is_some() {
            b",\"@enabled\":\"true\"},"
        } else {
            b",\"@enabled\":\"false\"},"
        });
        field(&mut o, "homePageUrl", &self.home_page_url);
        field(&mut o, "statusPageUrl", &self.status_page_url);
        field(&mut o, "healthCheckUrl", &self.health_check_url);
        field(&mut o, "vipAddress", &self.vip_address);
        field(&mut o, "secureVipAddress", &self.vip_address);
        o.extend_from_slice(
            b"\"dataCenterInfo\":{\"@class\":\"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo\",\"name\":\"MyOwn\"},",
        );
        o.extend_from_slice(b"\"leaseInfo\":{\"renewalIntervalInSecs\":");
        json::write_u64(&mut o, self.renewal_interval_secs);
        o.extend_from_slice(b",\"durationInSecs\":");
        json::write_u64(&mut o, self.duration_secs);
        o.extend_from_slice(b"},\"lastDirtyTimestamp\":");
        json::write_str(&mut o, &last_dirty_ms.to_string());
        o.extend_from_slice(b"}}");
        o
    }
}

/// The registered identity from the configuration: everything but the IP address, which may
/// need Eureka's address to be found ([`local_ip`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub app: String,
    pub instance_id: String,
    /// `eureka_hostname`, else the machine's (None: unknown, the IP address stands in).
    pub host_name: Option<String>,
    pub prefer_ip: bool,
    pub port: u16,
    /// `tls_port` when the TLS listener is on.
    pub secure_port: Option<u16>,
    pub health_check_url: String,
    pub status_page_url: String,
    pub home_page_url: String,
    pub renewal_interval_secs: u64,
    pub duration_secs: u64,
}

impl Identity {
    /// `machine_host`: the machine's host name, if known (not read here: sans-IO).
    pub fn from_config(cfg: &Config, machine_host: Option<String>) -> Identity {
        let app_name = if cfg.eureka_app_name.is_empty() {
            &cfg.service_name
        } else {
            &cfg.eureka_app_name
        };
        let port = match cfg.eureka_port {
            0 => cfg.port,
            p => u16::try_from(p).unwrap_or(cfg.port),
        };
        let host_name = if cfg.eureka_hostname.is_empty() {
            machine_host
        } else {
            Some(cfg.eureka_hostname.clone())
        };
        let instance_id = if cfg.eureka_instance_id.is_empty() {
            let host = host_name.as_deref().unwrap_or("localhost");
            format!("{host}:{}:{port}", app_name.to_ascii_lowercase())
        } else {
            cfg.eureka_instance_id.clone()
        };
        Identity {
            app: app_name.to_ascii_uppercase(),
            instance_id,
            host_name,
            prefer_ip: cfg.eureka_prefer_ip_address,
            port,
            secure_port: (cfg.tls_port != 0).then_some(cfg.tls_port),
            health_check_url: cfg.eureka_health_check_url.clone(),
            status_page_url: cfg.eureka_status_page_url.clone(),
            home_page_url: cfg.eureka_home_page_url.clone(),
            renewal_interval_secs: cfg.eureka_renewal_interval.as_secs(),
            duration_secs: cfg.eureka_lease_duration.as_secs(),
        }
    }

    /// `/apps/{APP}`: where the instance is registered.
    pub fn app_path(&self) -> String {
        format!("/apps/{}", self.app)
    }

    /// `/apps/{APP}/{id}`: heartbeats and the deregistration.
    pub fn instance_path(&self) -> String {
        format!("/apps/{}/{}", self.app, self.instance_id)
    }

    /// `/apps/{APP}/{id}/status?value=...`: the status override.
    pub fn status_path(&self, status: Status) -> String {
        format!("{}/status?value={}", self.instance_path(), status.as_str())
    }

    /// The instance document's fields, with this node's address.
    pub fn instance(&self, ip: IpAddr) -> Instance {
        let ip_addr = ip.to_string();
        let host_name = match (&self.host_name, self.prefer_ip) {
            (Some(h), false) => h.clone(),
            _ => ip_addr.clone(),
        };
        let page = |v: &str| page_url(v, &host_name, self.port);
        Instance {
            app: self.app.clone(),
            instance_id: self.instance_id.clone(),
            health_check_url: page(&self.health_check_url),
            status_page_url: page(&self.status_page_url),
            home_page_url: page(&self.home_page_url),
            host_name,
            ip_addr,
            port: self.port,
            secure_port: self.secure_port,
            vip_address: self.app.to_ascii_lowercase(),
            renewal_interval_secs: self.renewal_interval_secs,
            duration_secs: self.duration_secs,
        }
    }
}

/// The machine's host name (Linux: `/proc/sys/kernel/hostname`), with any character an
/// instance id cannot hold replaced by `-`; None when it cannot be read.
fn machine_host_name() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name: String = raw
        .trim()
        .chars()
        .take(NAME_BYTES_MAX)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    (!name.is_empty()).then_some(name)
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// The registration's state and counters, kept by the task, rendered in `/metrics` when
/// `eureka_url` is set.
#[derive(Default)]
pub struct EurekaStats {
    /// 1 while Eureka holds this instance (registered, and no 404 since).
    pub registered: AtomicU64,
    /// 1 once Eureka has taken `OUT_OF_SERVICE` (a drain started).
    pub out_of_service: AtomicU64,
    /// Registrations Eureka took (the first, and every one after it forgot the instance).
    pub registrations: AtomicU64,
    /// Registrations Eureka did not take (unreachable, timed out, refused).
    pub registration_failures: AtomicU64,
    /// Registrations after a heartbeat or status change answered 404 (Eureka forgot us).
    pub reregistrations: AtomicU64,
    /// Heartbeats answered 200.
    pub heartbeats: AtomicU64,
    /// Heartbeats not answered 200 or 404 (unreachable, timed out, 5xx).
    pub heartbeat_failures: AtomicU64,
}

/// Prometheus text of `s` (appended to `/metrics` when `eureka_url` is set).
pub fn render(s: &EurekaStats, out: &mut String) {
    let rows: [(&str, &str, &AtomicU64, &str); 7] = [
        (
            "switchboard_eureka_registered",
            "1 while Eureka holds this instance (registered, and no heartbeat answered 404 since).",
            &s.registered,
            "gauge",
        ),
        (
            "switchboard_eureka_out_of_service",
            "1 once Eureka has taken OUT_OF_SERVICE for this instance (a drain started).",
            &s.out_of_service,
            "gauge",
        ),
        (
            "switchboard_eureka_registrations_total",
            "Registrations Eureka took (the first, and each after it forgot the instance).",
            &s.registrations,
            "counter",
        ),
        (
            "switchboard_eureka_registration_failures_total",
            "Registrations Eureka did not take (unreachable, timed out, or refused).",
            &s.registration_failures,
            "counter",
        ),
        (
            "switchboard_eureka_reregistrations_total",
            "Registrations made because Eureka answered 404 (it had forgotten the instance).",
            &s.reregistrations,
            "counter",
        ),
        (
            "switchboard_eureka_heartbeats_total",
            "Heartbeats (lease renewals) Eureka answered 200.",
            &s.heartbeats,
            "counter",
        ),
        (
            "switchboard_eureka_heartbeat_failures_total",
            "Heartbeats that failed (unreachable, timed out, or an error status other than 404).",
            &s.heartbeat_failures,
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

// ---------------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------------

/// What one request came back with.
enum Answer {
    /// A status below 500 (2xx, 404, a refusal).
    Status(u16),
    /// No usable answer: unreachable, timed out, malformed, or 5xx. The next request goes to
    /// the next server of the list.
    Failed(String),
}

/// The registration task's state (one per node, on the bridge's `LocalSet`).
struct Eureka {
    node: Arc<Node>,
    client: Client,
    servers: Vec<ServerUrl>,
    /// The server requests go to now (the next after a failure).
    current: usize,
    identity: Identity,
    /// This node's address, once found.
    ip: Option<IpAddr>,
    backoff: Backoff,
    timeout: Duration,
    renewal: Duration,
    /// Eureka holds the instance (a registration was answered, no 404 since).
    registered: bool,
    /// A registration was sent at least once (so a deregistration may be due at exit).
    attempted: bool,
    /// A 404 made the instance unregistered: the next registration is a re-registration.
    forgotten: bool,
    /// The status Eureka holds (meaningful while `registered`).
    told: Status,
    /// First registered `UP`: a status override Eureka may still hold for this instance id
    /// (from an earlier run killed between its `OUT_OF_SERVICE` and its deregistration) is to
    /// be removed, or Eureka would keep the instance out of service for as long as it renews.
    /// (A drain starting while that removal is in flight cuts it short and sends
    /// `OUT_OF_SERVICE` after it; only a server that applied the two out of order could undo
    /// the drain's status, and only in the first moments of a run.)
    clear_override: bool,
    /// When the next heartbeat is due.
    next_beat: Instant,
    /// Requests are failing (logged once until one succeeds).
    failing: bool,
    /// Unix ms of the last change of what is registered (`lastDirtyTimestamp`).
    last_dirty_ms: u64,
}

/// Run the registration until the node exits (`phase` turns [`Phase::Exiting`], or its sender
/// is dropped), then deregister within `eureka_timeout`. Only spawned when `eureka_url` is set.
pub async fn run(node: Arc<Node>, mut phase: watch::Receiver<Phase>) {
    let mut e = Eureka::new(node);
    tracing::info!(
        app = %e.identity.app,
        instance_id = %e.identity.instance_id,
        servers = %e.servers.iter().map(|s| s.shown.as_str()).collect::<Vec<_>>().join(","),
        renewal_interval_s = e.renewal.as_secs(),
        "eureka: registering this node"
    );
    loop {
        let p = *phase.borrow_and_update();
        if p == Phase::Exiting {
            break;
        }
        let want = match p {
            Phase::Serving => Status::Up,
            _ => Status::OutOfService,
        };
        // A phase change cuts short whatever the step waits on (a backoff, the next
        // heartbeat, a request in flight): the drain's status goes out at once.
        tokio::select! {
            biased;
            changed = phase.changed() => if changed.is_err() {
                break;
            },
            () = e.step(want) => {}
        }
    }
    e.farewell().await;
}

/// Wait for the task at exit: at most `eureka_timeout` plus [`EXIT_MARGIN`] (its own deadline
/// is `eureka_timeout`), then stop it.
pub async fn finish(task: tokio::task::JoinHandle<()>, timeout: Duration) {
    let abort = task.abort_handle();
    if tokio::time::timeout(timeout + EXIT_MARGIN, task)
        .await
        .is_err()
    {
        abort.abort();
        tracing::warn!("eureka: deregistration unfinished at its deadline; exiting anyway");
    }
}

impl Eureka {
    fn new(node: Arc<Node>) -> Eureka {
        let cfg = &node.cfg;
        // Validated with the config.
        let servers: Vec<ServerUrl> = cfg
            .eureka_url
            .iter()
            .filter_map(|u| ServerUrl::parse(u).ok())
            .collect();
        let identity = Identity::from_config(cfg, machine_host_name());
        let client = Client::new(Options {
            connect_timeout: cfg.eureka_timeout,
            idle_per_host_max: 1,
            idle_timeout: IDLE_TIMEOUT,
            hosts_max: HOSTS_MAX,
            head_bytes_max: HEAD_BYTES_MAX,
            user_agent: USER_AGENT,
        });
        let seed = u64::from(node.id) << 32 | u64::from(node.id.rotate_left(7));
        Eureka {
            client,
            servers,
            current: 0,
            identity,
            ip: None,
            backoff: Backoff::new(cfg.eureka_retry_max, seed),
            timeout: cfg.eureka_timeout,
            renewal: cfg.eureka_renewal_interval,
            registered: false,
            attempted: false,
            forgotten: false,
            told: Status::Up,
            clear_override: false,
            next_beat: Instant::now(),
            failing: false,
            last_dirty_ms: unix_ms(),
            node,
        }
    }

    fn stats(&self) -> &EurekaStats {
        &self.node.eureka_stats
    }

    /// One step towards what Eureka should hold: registered, with status `want`, lease renewed.
    async fn step(&mut self, want: Status) {
        if !self.registered {
            if self.register(want).await {
                self.backoff.reset();
            } else {
                tokio::time::sleep(self.backoff.wait()).await;
            }
            return;
        }
        if self.told != want {
            if self.put_status(want, self.timeout).await {
                self.backoff.reset();
            } else if self.registered {
                tokio::time::sleep(self.backoff.wait()).await;
            }
            return;
        }
        // Only while serving: during a drain the override is the node's own OUT_OF_SERVICE.
        if self.clear_override && want == Status::Up {
            if self.remove_override().await {
                self.backoff.reset();
            } else if self.registered {
                tokio::time::sleep(self.backoff.wait()).await;
            }
            return;
        }
        tokio::time::sleep_until(self.next_beat).await;
        self.heartbeat().await;
    }

    /// Register with status `status`; true when Eureka took it.
    async fn register(&mut self, status: Status) -> bool {
        let Some(ip) = self.address().await else {
            self.stats()
                .registration_failures
                .fetch_add(1, Ordering::Relaxed);
            self.failed(
                "register",
                "cannot find this node's IP address (set eureka_ip_address)".into(),
            );
            return false;
        };
        let instance = self.identity.instance(ip);
        if status != self.told {
            self.last_dirty_ms = unix_ms();
        }
        let body = instance.encode(status, self.last_dirty_ms);
        self.attempted = true;
        let answer = self
            .send(
                Method::Post,
                &self.identity.app_path(),
                Some(&body),
                self.timeout,
            )
            .await;
        match answer {
            Answer::Status(s) if (200..300).contains(&s) => {
                let again = std::mem::take(&mut self.forgotten);
                self.registered = true;
                self.told = status;
                // Once, after the first registration: a Eureka that forgot the instance
                // (restarted, or evicted it) dropped its override with it.
                self.clear_override =
                    status == Status::Up && self.stats().registrations.load(Ordering::Relaxed) == 0;
                self.next_beat = Instant::now() + self.renewal;
                let stats = self.stats();
                stats.registrations.fetch_add(1, Ordering::Relaxed);
                stats.registered.store(1, Ordering::Relaxed);
                stats
                    .out_of_service
                    .store(u64::from(status == Status::OutOfService), Ordering::Relaxed);
                if again {
                    stats.reregistrations.fetch_add(1, Ordering::Relaxed);
                }
                self.recovered();
                tracing::info!(
                    server = %self.servers[self.current].shown,
                    app = %instance.app,
                    instance_id = %instance.instance_id,
                    status = status.as_str(),
                    again,
                    "eureka: registered"
                );
                true
            }
            Answer::Status(s) => {
                self.stats()
                    .registration_failures
                    .fetch_add(1, Ordering::Relaxed);
                // A refusal (400: a body the server cannot read, 401/403: credentials) is
                // not transient, but retrying is all a node can do; say so loudly once.
                self.failed("register", format!("answered {s}"));
                false
            }
            Answer::Failed(why) => {
                self.stats()
                    .registration_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.failed("register", why);
                false
            }
        }
    }

    /// Renew the lease. A 404 means Eureka forgot the instance: register again next step.
    async fn heartbeat(&mut self) {
        let path = self.identity.instance_path();
        match self.send(Method::Put, &path, None, self.timeout).await {
            Answer::Status(200..=299) => {
                self.stats().heartbeats.fetch_add(1, Ordering::Relaxed);
                self.next_beat = Instant::now() + self.renewal;
                self.backoff.reset();
                self.recovered();
            }
            Answer::Status(404) => self.forgot("heartbeat"),
            other => {
                self.stats()
                    .heartbeat_failures
                    .fetch_add(1, Ordering::Relaxed);
                let why = match other {
                    Answer::Status(s) => format!("answered {s}"),
                    Answer::Failed(why) => why,
                };
                self.failed("heartbeat", why);
                // Sooner than the interval, never later: the lease has a few intervals' slack.
                self.next_beat = Instant::now() + self.backoff.wait().min(self.renewal);
            }
        }
    }

    /// Set the status override within `timeout`; true when Eureka took it.
    async fn put_status(&mut self, status: Status, timeout: Duration) -> bool {
        let path = self.identity.status_path(status);
        match self.send(Method::Put, &path, None, timeout).await {
            Answer::Status(200..=299) => {
                self.told = status;
                // Our own override now: never removed.
                self.clear_override = false;
                self.last_dirty_ms = unix_ms();
                self.stats()
                    .out_of_service
                    .store(u64::from(status == Status::OutOfService), Ordering::Relaxed);
                self.recovered();
                tracing::info!(status = status.as_str(), "eureka: status changed");
                true
            }
            Answer::Status(404) => {
                self.forgot("status change");
                false
            }
            Answer::Status(s) => {
                self.failed("status change", format!("answered {s}"));
                false
            }
            Answer::Failed(why) => {
                self.failed("status change", why);
                false
            }
        }
    }

    /// Remove any status override (`DELETE .../status?value=UP`: Eureka drops the override
    /// and keeps `UP`); true when Eureka answered.
    async fn remove_override(&mut self) -> bool {
        let path = self.identity.status_path(Status::Up);
        match self.send(Method::Delete, &path, None, self.timeout).await {
            Answer::Status(200..=299) => {
                self.clear_override = false;
                self.recovered();
                true
            }
            Answer::Status(404) => {
                self.forgot("status override removal");
                false
            }
            Answer::Status(s) => {
                self.failed("status override removal", format!("answered {s}"));
                false
            }
            Answer::Failed(why) => {
                self.failed("status override removal", why);
                false
            }
        }
    }

    /// At exit: `OUT_OF_SERVICE` if Eureka does not have it yet, then the deregistration, all
    /// within one `eureka_timeout`.
    async fn farewell(&mut self) {
        if !self.attempted {
            return;
        }
        let deadline = Instant::now() + self.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        if self.registered && self.told != Status::OutOfService {
            self.put_status(Status::OutOfService, left()).await;
        }
        let path = self.identity.instance_path();
        // Each server of the list in turn while time is left: the one that answers holds it.
        for _ in 0..self.servers.len() {
            let t = left();
            if t.is_zero() {
                break;
            }
            match self.send(Method::Delete, &path, None, t).await {
                Answer::Status(s) if (200..300).contains(&s) || s == 404 => {
                    let stats = self.stats();
                    stats.registered.store(0, Ordering::Relaxed);
                    tracing::info!(
                        server = %self.servers[self.current].shown,
                        answered = s,
                        "eureka: deregistered"
                    );
                    return;
                }
                Answer::Status(s) => {
                    self.failed("deregister", format!("answered {s}"));
                    return;
                }
                Answer::Failed(why) => self.failed("deregister", why),
            }
        }
        tracing::warn!(
            lease_s = self.identity.duration_secs,
            "eureka: could not deregister; Eureka drops the instance when its lease runs out"
        );
    }

    /// A 404: Eureka does not hold the instance (it restarted, or evicted it).
    fn forgot(&mut self, what: &str) {
        self.registered = false;
        self.forgotten = true;
        self.stats().registered.store(0, Ordering::Relaxed);
        tracing::warn!(
            server = %self.servers[self.current].shown,
            "eureka: {what} answered 404 (Eureka forgot this instance); registering again"
        );
    }

    /// This node's IP address: `eureka_ip_address`, else `host` when it is one address, else
    /// the local address of a route to Eureka (found once).
    async fn address(&mut self) -> Option<IpAddr> {
        if self.ip.is_none() {
            let cfg = &self.node.cfg;
            self.ip = match (
                cfg.eureka_ip_address.parse::<IpAddr>(),
                cfg.host.parse::<IpAddr>(),
            ) {
                (Ok(ip), _) => Some(ip),
                (_, Ok(ip)) if !ip.is_unspecified() => Some(ip),
                _ => local_ip(&self.servers, self.timeout).await,
            };
        }
        self.ip
    }

    /// One request to the current server; a failure moves on to the next server.
    async fn send(
        &mut self,
        method: Method,
        tail: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Answer {
        let server = &self.servers[self.current];
        let url = server.at(tail);
        let auth;
        let headers: &[(&str, &str)] = match &server.authorization {
            Some(a) => {
                auth = [("Authorization", a.as_str())];
                &auth
            }
            None => &[],
        };
        let r = self
            .client
            .request(method, &url, headers, body, timeout, ANSWER_BYTES_MAX)
            .await;
        let answer = match r {
            Ok(resp) if resp.status < 500 => return Answer::Status(resp.status),
            Ok(resp) => Answer::Failed(format!("answered {}", resp.status)),
            Err(HttpError::Timeout) => {
                Answer::Failed(format!("no answer within {} ms", timeout.as_millis()))
            }
            Err(HttpError::Unreachable) => Answer::Failed("unreachable".into()),
            Err(HttpError::TooLarge) => Answer::Failed("answer too large".into()),
            Err(HttpError::Malformed) => Answer::Failed("not an HTTP answer".into()),
        };
        self.current = (self.current + 1) % self.servers.len();
        answer
    }

    /// Log a failure: the first after a success as a warning, the rest at debug (a down
    /// Eureka costs one line, not one per retry).
    fn failed(&mut self, what: &str, why: String) {
        if self.failing {
            tracing::debug!(what, why = %why, "eureka: still failing");
        } else {
            self.failing = true;
            tracing::warn!(
                what,
                why = %why,
                "eureka: request failed; retrying with backoff (the node serves regardless)"
            );
        }
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(
                server = %self.servers[self.current].shown,
                "eureka: answering again"
            );
        }
    }
}

/// The local address of this machine's route to the first Eureka server that resolves (a UDP
/// socket "connected" to it: no packet is sent).
async fn local_ip(servers: &[ServerUrl], timeout: Duration) -> Option<IpAddr> {
    for s in servers {
        let host = (s.base.host.as_str(), s.base.port);
        let Ok(Ok(addrs)) = tokio::time::timeout(timeout, tokio::net::lookup_host(host)).await
        else {
            continue;
        };
        for addr in addrs {
            let bind: std::net::SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(addr).await.is_ok() {
                if let Ok(local) = sock.local_addr() {
                    return Some(local.ip());
                }
            }
        }
    }
    None
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        let mut cfg = Config {
            port: 8081,
            service_name: "chat-gateway".into(),
            eureka_url: vec!["http://eureka:8761/eureka/".into()],
            ..Config::default()
        };
        cfg.eureka_hostname = "node-a.internal".into();
        Identity::from_config(&cfg, Some("ignored".into())).instance("10.1.2.3".parse().unwrap())
    }

    #[test]
    fn registration_body_has_every_field_eureka_reads() {
        let body = instance().encode(Status::Up, 1_700_000_000_123);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let i = &v["instance"];
        assert_eq!(v.as_object().unwrap().len(), 1);
        assert_eq!(i["instanceId"], "node-a.internal:chat-gateway:8081");
        assert_eq!(i["hostName"], "node-a.internal");
        assert_eq!(i["app"], "CHAT-GATEWAY");
        assert_eq!(i["ipAddr"], "10.1.2.3");
        assert_eq!(i["status"], "UP");
        assert_eq!(i["port"]["$"], 8081);
        assert_eq!(i["port"]["@enabled"], "true");
        assert_eq!(i["securePort"]["@enabled"], "false");
        assert_eq!(i["healthCheckUrl"], "http://node-a.internal:8081/ready");
        assert_eq!(i["statusPageUrl"], "http://node-a.internal:8081/health");
        assert_eq!(i["homePageUrl"], "http://node-a.internal:8081/");
        assert_eq!(i["vipAddress"], "chat-gateway");
        assert_eq!(i["secureVipAddress"], "chat-gateway");
        assert_eq!(
            i["dataCenterInfo"]["@class"],
            "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
        );
        assert_eq!(i["dataCenterInfo"]["name"], "MyOwn");
        assert_eq!(i["leaseInfo"]["renewalIntervalInSecs"], 30);
        assert_eq!(i["leaseInfo"]["durationInSecs"], 90);
        assert_eq!(i["lastDirtyTimestamp"], "1700000000123");
        let oos = instance().encode(Status::OutOfService, 1);
        let v: serde_json::Value = serde_json::from_slice(&oos).unwrap();
        assert_eq!(v["instance"]["status"], "OUT_OF_SERVICE");
    }

    #[test]
    fn a_tls_listener_is_registered_as_the_enabled_secure_port() {
        let mut cfg = Config {
            port: 8081,
            tls_port: 8443,
            service_name: "chat-gateway".into(),
            ..Config::default()
        };
        cfg.eureka_hostname = "node-a.internal".into();
        let body = Identity::from_config(&cfg, None)
            .instance("10.1.2.3".parse().unwrap())
            .encode(Status::Up, 1);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["instance"]["securePort"]["$"], 8443);
        assert_eq!(v["instance"]["securePort"]["@enabled"], "true");
        assert_eq!(v["instance"]["port"]["$"], 8081);
        assert_eq!(v["instance"]["port"]["@enabled"], "true");
        // Without one, Eureka's own default: 443, disabled.
        assert_eq!(instance().secure_port, None);
    }

    #[test]
    fn registration_body_bytes() {
        let body = instance().encode(Status::Up, 5);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            concat!(
                r#"{"instance":{"instanceId":"node-a.internal:chat-gateway:8081","#,
                r#""hostName":"node-a.internal","app":"CHAT-GATEWAY","ipAddr":"10.1.2.3","#,
                r#""status":"UP","port":{"$":8081,"@enabled":"true"},"#,
                r#""securePort":{"$":443,"@enabled":"false"},"#,
                r#""homePageUrl":"http://node-a.internal:8081/","#,
                r#""statusPageUrl":"http://node-a.internal:8081/health","#,
                r#""healthCheckUrl":"http://node-a.internal:8081/ready","#,
                r#""vipAddress":"chat-gateway","secureVipAddress":"chat-gateway","#,
                r#""dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},"#,
                r#""leaseInfo":{"renewalIntervalInSecs":30,"durationInSecs":90},"#,
                r#""lastDirtyTimestamp":"5"}}"#
            )
        );
    }

    #[test]
    fn identity_defaults_and_overrides() {
        let base = Config {
            port: 7200,
            ..Config::default()
        };
        let ip: IpAddr = "192.168.0.9".parse().unwrap();
        // Defaults: service_name, the machine's host name, Spring Cloud's instance id.
        let i = Identity::from_config(&base, Some("box".into())).instance(ip);
        assert_eq!(
            (i.app.as_str(), i.instance_id.as_str(), i.host_name.as_str()),
            ("SWITCHBOARD", "box:switchboard:7200", "box")
        );
        assert_eq!(i.health_check_url, "http://box:7200/ready");
        // prefer_ip: the address is the host name and in the URLs; the id stays the name's.
        let cfg = Config {
            eureka_prefer_ip_address: true,
            eureka_port: 443,
            eureka_health_check_url: "https://lb.example/sb/ready".into(),
            ..base.clone()
        };
        let i = Identity::from_config(&cfg, Some("box".into())).instance(ip);
        assert_eq!(i.host_name, "192.168.0.9");
        assert_eq!(i.instance_id, "box:switchboard:443");
        assert_eq!(i.status_page_url, "http://192.168.0.9:443/health");
        assert_eq!(i.health_check_url, "https://lb.example/sb/ready");
        // An IPv6 host in a URL is bracketed; explicit names win.
        let cfg = Config {
            eureka_app_name: "ws".into(),
            eureka_instance_id: "ws-1".into(),
            ..base.clone()
        };
        let id = Identity::from_config(&cfg, None);
        let i = id.instance("fd00::1".parse().unwrap());
        assert_eq!(
            (i.app.as_str(), i.instance_id.as_str(), i.host_name.as_str()),
            ("WS", "ws-1", "fd00::1")
        );
        assert_eq!(i.home_page_url, "http://[fd00::1]:7200/");
        assert_eq!(id.app_path(), "/apps/WS");
        assert_eq!(id.instance_path(), "/apps/WS/ws-1");
        assert_eq!(
            id.status_path(Status::OutOfService),
            "/apps/WS/ws-1/status?value=OUT_OF_SERVICE"
        );
    }

    #[test]
    fn server_urls() {
        let s = ServerUrl::parse("http://eureka:8761/eureka/").unwrap();
        assert_eq!(s.at("/apps/A").path, "/eureka/apps/A");
        assert_eq!(s.at("/apps/A").authority(), "eureka:8761");
        assert_eq!(s.authorization, None);
        assert_eq!(
            ServerUrl::parse("http://e").unwrap().at("/apps/A").path,
            "/apps/A"
        );
        // Spring's user:password@ form: Basic credentials, never shown.
        let s = ServerUrl::parse("http://user:p%40ss@eureka:8761/eureka").unwrap();
        assert_eq!(s.authorization.as_deref(), Some("Basic dXNlcjpwQHNz"));
        assert_eq!(s.shown, "http://user:<redacted>@eureka:8761/eureka");
        assert_eq!(s.at("/apps/A").path, "/eureka/apps/A");
        assert!(ServerUrl::parse("https://e/eureka")
            .unwrap_err()
            .contains("https"));
        assert!(ServerUrl::parse("eureka:8761").is_err());
        assert!(ServerUrl::parse("http://e/eureka?x=1").is_err());
        assert!(ServerUrl::parse("http://:p@e/").is_err());
        assert!(ServerUrl::parse("http://u:%zz@e/").is_err());
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn names_and_page_urls() {
        assert!(check_name("chat-gateway_1.x", false).is_ok());
        assert!(check_name("a:b", false).is_err());
        assert!(check_name("a:b", true).is_ok());
        assert!(check_name("", true).is_err());
        assert!(check_name("a/b", true).is_err());
        assert!(check_name(&"a".repeat(256), true).is_err());
        assert!(check_page_url("/ready").is_ok());
        assert!(check_page_url("https://lb/x").is_ok());
        assert!(check_page_url("ready").is_err());
        assert!(check_page_url("http:///x").is_err());
        assert!(check_page_url("/a b").is_err());
        assert!(check_page_url("/a\"b").is_err());
    }
}
