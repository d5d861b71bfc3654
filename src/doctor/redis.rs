//! `switchboard doctor`'s Redis check: does the configured Redis (`redis_url`, with
//! `redis_cluster` every master of the Redis Cluster) answer, and do its limits suit a cluster
//! of Switchboard nodes.
//!
//! Owns: the pure judgement ([`judge`] over one node's [`NodeFacts`], built from the small
//! `check_*` functions and parsers here: `client-output-buffer-limit`, `INFO`, `CLUSTER INFO`,
//! `CLUSTER NODES`) that turns what a Redis node said into doctor [`Finding`]s with the why and
//! the exact fix, and the one IO function ([`check_configured`]) that asks the nodes, with the
//! sync `redis` client, every connect and command bounded by `redis_timeout`. The doctor CLI
//! (`super::cli_main`) calls it when `redis_url` is set; the server never does (its Redis
//! connections are the bridge's).
//!
//! What it checks on every node: PING and its latency; the version (`INFO server`; sharded
//! pub/sub needs 7.0); `client-output-buffer-limit` for the pubsub class (Redis's default
//! `pubsub 32mb 8mb 60` disconnects a node's subscriber connection after a one-minute backlog
//! of 8 MB, or at once at 32 MB: [`PUBSUB_HARD_MIN`], [`PUBSUB_SOFT_MIN`]); `maxmemory` with
//! `maxmemory-policy` (an `allkeys-*` policy may evict presence and history keys); and the
//! cluster state (`INFO cluster`, `CLUSTER INFO`) against `redis_cluster`. A managed Redis that
//! refuses CONFIG gets "could not be read", never a guess. No password is ever printed:
//! addresses are `host:port`, URLs go through [`crate::cluster::redact`], and error texts are
//! scrubbed of the password. `tuning/README.md` ("Redis for a cluster") explains every number.

use std::time::{Duration, Instant};

use super::{Finding, Severity};
use crate::bridge::redis::tls::RedisTls;
use crate::cluster::UrlTls;

/// The smallest pubsub hard limit that does not cut a busy node's subscriber connection: a
/// node receiving 10 MB/s of cross-node traffic that stalls for 25 s (a CPU-starved VM, a long
/// kernel page reclaim, a reconnect storm on the node) queues 250 MB in Redis.
pub const PUBSUB_HARD_MIN: u64 = 256 << 20;

/// The smallest pubsub soft limit (when one is set): past it for `soft seconds` Redis drops
/// the connection, so it bounds the backlog a node may carry for a while.
pub const PUBSUB_SOFT_MIN: u64 = 64 << 20;

/// The pubsub class the fixes propose.
pub const PUBSUB_RECOMMENDED: &str = "pubsub 256mb 64mb 60";

/// Oldest Redis with sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`).
pub const VERSION_MIN: (u64, u64) = (7, 0);

/// Where Debian's redis-server reads its configuration (the persistence lines of the fixes).
const REDIS_CONF: &str = "/etc/redis/redis.conf";

/// How the doctor reaches the nodes, for the fix commands (never the password itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Auth {
    /// ACL user from the URL (not a secret; printed in `redis-cli --user`).
    pub username: Option<String>,
    /// The URL carries a password: the fixes ask for it (`--askpass`).
    pub password: bool,
    /// redis-cli's TLS options for the fixes (`--tls --cacert <file>`...); empty = plain TCP.
    pub tls: String,
}

/// What the doctor checks against: the configuration.
#[derive(Clone, Debug)]
pub struct Setup {
    /// `redis_cluster`.
    pub cluster: bool,
    /// `redis_timeout`: the bound of every connect and command.
    pub timeout: Duration,
    pub auth: Auth,
    /// With `rediss://`: how the nodes are checked ([`RedisTls::describe`]), and whether it is
    /// `#insecure`; None = plain TCP.
    pub tls: Option<(String, bool)>,
}

/// What one Redis node said. `Err` holds why a question got no answer (password-free).
#[derive(Clone, Debug)]
pub struct NodeFacts {
    /// `host:port`.
    pub addr: String,
    /// With `rediss://`: the doctor's own TLS handshake and a PING over it (the protocol and
    /// cipher suite, or why it failed); None over plain TCP.
    pub tls: Option<Result<String, String>>,
    /// Round trip of one PING after connecting; when this failed, nothing else was asked.
    pub ping: Result<Duration, String>,
    /// `INFO server` text.
    pub info_server: Result<String, String>,
    /// `INFO cluster` text (`cluster_enabled:0|1`).
    pub info_cluster: Result<String, String>,
    /// `CLUSTER INFO` text; None when not asked (the node is not cluster-enabled).
    pub cluster_info: Option<Result<String, String>>,
    /// `CONFIG GET client-output-buffer-limit` value.
    pub output_buffer_limit: Result<String, String>,
    /// `CONFIG GET maxmemory` value (bytes).
    pub maxmemory: Result<String, String>,
    /// `CONFIG GET maxmemory-policy` value.
    pub maxmemory_policy: Result<String, String>,
}

/// One class of `client-output-buffer-limit`: `<class> <hard> <soft> <soft seconds>`, bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferLimit {
    pub class: String,
    /// 0 = none.
    pub hard: u64,
    /// 0 = none.
    pub soft: u64,
    pub soft_seconds: u64,
}

/// A Redis memory amount as CONFIG GET prints it (bytes) or redis.conf takes it
/// (`1k` = 1000, `1kb` = 1024, `m`/`mb`, `g`/`gb`, case-insensitive).
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let mul: u64 = match unit {
        "" | "b" => 1,
        "k" => 1_000,
        "kb" => 1 << 10,
        "m" => 1_000_000,
        "mb" => 1 << 20,
        "g" => 1_000_000_000,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Bytes in the unit redis.conf would use for them (`256mb`, `8388608` when not whole).
pub fn format_memory(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    for (shift, unit) in [(30, "gb"), (20, "mb"), (10, "kb")] {
        if bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The classes of a `client-output-buffer-limit` value (`normal 0 0 0 slave 268435456 67108864
/// 60 pubsub 33554432 8388608 60`).
pub fn parse_output_buffer_limit(value: &str) -> Result<Vec<BufferLimit>, String> {
    let words: Vec<&str> = value.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(4) {
        return Err(format!(
            "expected groups of <class> <hard> <soft> <seconds>, got {value:?}"
        ));
    }
    words
        .chunks(4)
        .map(|w| {
            let mem =
                |s: &str| parse_memory(s).ok_or_else(|| format!("bad size {s:?} in {value:?}"));
            Ok(BufferLimit {
                class: w[0].to_ascii_lowercase(),
                hard: mem(w[1])?,
                soft: mem(w[2])?,
                soft_seconds: w[3]
                    .parse()
                    .map_err(|_| format!("bad seconds {:?} in {value:?}", w[3]))?,
            })
        })
        .collect()
}

/// The value of `field` in an `INFO` / `CLUSTER INFO` text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// `(major, minor)` of a `7.0.15`-style version.
fn version_pair(v: &str) -> Option<(u64, u64)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

/// The masters of a `CLUSTER NODES` text, as `(host, port)`: lines whose flags say `master` and
/// not `fail`/`noaddr`/`handshake`, address `ip:port@cport[,hostname]`.
pub fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_id, addr, flags) = (f.next()?, f.next()?, f.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master")
                || flags
                    .iter()
                    .any(|x| matches!(*x, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            (!host.is_empty()).then(|| (host.to_owned(), port))
        })
        .collect()
}

/// `redis-cli` reaching `addr` with the URL's credentials (asking for the password).
fn redis_cli(addr: &str, auth: &Auth) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "6379"));
    let mut s = String::from("redis-cli");
    if let Some(user) = &auth.username {
        s.push_str(&format!(" --user {user}"));
    }
    if auth.password {
        s.push_str(" --askpass");
    }
    s.push_str(&auth.tls);
    s.push_str(&format!(" -h {host} -p {port}"));
    s
}

/// The finding for a CONFIG value Redis would not give (managed Redis renames or forbids CONFIG).
fn config_unreadable(name: &'static str, addr: &str, what: &str, err: &str) -> Finding {
    Finding {
        name,
        current: format!("{addr}: could not be read"),
        required: "readable, or checked by hand".into(),
        severity: Severity::Warn,
        why: format!(
            "CONFIG GET {what} was refused ({err}): a managed Redis often renames or forbids \
             CONFIG, so this limit was not checked. Check it where the provider keeps the Redis \
             parameters (a parameter group, the instance's parameter settings) against \
             tuning/README.md, \"Redis for a cluster\""
        ),
        fix: String::new(),
    }
}

/// PING: Blocking when the node does not answer; Warn when one round trip takes half of
/// `redis_timeout` or more (commands under load will time out).
pub fn check_ping(
    addr: &str,
    ping: &Result<Duration, String>,
    timeout: Duration,
    auth: &Auth,
) -> Finding {
    let name = "redis PING";
    let required = format!("answers within redis_timeout ({timeout:?})");
    match ping {
        Ok(rtt) => {
            let slow = *rtt * 2 >= timeout;
            Finding {
                name,
                current: format!("{addr}: PONG in {:.2} ms", rtt.as_secs_f64() * 1e3),
                required,
                severity: if slow { Severity::Warn } else { Severity::Ok },
                why: if slow {
                    format!(
                        "one round trip took {rtt:?}, half of redis_timeout or more: under load \
                         the bridge's commands will time out and reconnect; put Redis near the \
                         nodes or raise redis_timeout"
                    )
                } else {
                    "Redis answers; the latency is one round trip from this machine".into()
                },
                fix: String::new(),
            }
        }
        Err(e) => Finding {
            name,
            current: format!("{addr}: no answer"),
            required,
            severity: Severity::Blocking,
            why: format!(
                "{e}. A node configured with this Redis cannot reach the others: cross-node \
                 traffic is queued (redis_queue_max) and dropped, and /ready answers 503 \
                 (unless redis_ready_when_degraded)"
            ),
            fix: format!(
                "{} PING   # from this machine: a firewall, a wrong host/port or password, or a \
                 Redis not running",
                redis_cli(addr, auth)
            ),
        },
    }
}

/// The version from `INFO server`: below 7.0 there is no sharded pub/sub, which
/// `redis_cluster` needs (Blocking then, a Warn otherwise).
pub fn check_version(addr: &str, info_server: &Result<String, String>, cluster: bool) -> Finding {
    let name = "redis version";
    let required = format!(">= {}.{} (sharded pub/sub)", VERSION_MIN.0, VERSION_MIN.1);
    let info = match info_server {
        Ok(i) => i,
        Err(e) => {
            return Finding {
                name,
                current: format!("{addr}: could not be read"),
                required,
                severity: Severity::Warn,
                why: format!("INFO server was refused ({e}), so the version was not checked"),
                fix: String::new(),
            }
        }
    };
    let version = info_field(info, "redis_version").unwrap_or("unknown");
    let old = version_pair(version).is_none_or(|v| v < VERSION_MIN);
    let severity = match (old, cluster) {
        (false, _) => Severity::Ok,
        (true, true) => Severity::Blocking,
        (true, false) => Severity::Warn,
    };
    Finding {
        name,
        current: format!("{addr}: {version}"),
        required,
        why: match severity {
            Severity::Ok => {
                "sharded pub/sub (SSUBSCRIBE/SPUBLISH) is there for redis_cluster".into()
            }
            Severity::Blocking => format!(
                "Redis {version} has no SSUBSCRIBE/SPUBLISH, which redis_cluster uses for every \
                 channel: no node could subscribe"
            ),
            Severity::Warn => format!(
                "Redis {version} is older than 7.0: plain pub/sub works, but a move to a Redis \
                 Cluster (sharded pub/sub) needs 7.0, and the cluster is tested against 7.x"
            ),
        },
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            "apt-get install redis-server   # Debian 12 ships 7.0; or your provider's 7.x engine"
                .into()
        },
        severity,
    }
}

/// `client-output-buffer-limit`, pubsub class: a hard limit below [`PUBSUB_HARD_MIN`] or a soft
/// one below [`PUBSUB_SOFT_MIN`] closes a busy node's subscriber connection (0 = no limit).
pub fn check_output_buffer_limit(
    addr: &str,
    value: &Result<String, String>,
    auth: &Auth,
) -> Finding {
    let name = "redis client-output-buffer-limit";
    let required = format!(
        "pubsub hard 0 or >= {}, soft 0 or >= {}",
        format_memory(PUBSUB_HARD_MIN),
        format_memory(PUBSUB_SOFT_MIN)
    );
    let value = match value {
        Ok(v) => v,
        Err(e) => return config_unreadable(name, addr, "client-output-buffer-limit", e),
    };
    let parsed = parse_output_buffer_limit(value);
    // A class not listed has no limit (Redis always lists all three, though).
    let pubsub = match &parsed {
        Ok(classes) => classes
            .iter()
            .find(|c| c.class == "pubsub")
            .cloned()
            .unwrap_or(BufferLimit {
                class: "pubsub".into(),
                hard: 0,
                soft: 0,
                soft_seconds: 0,
            }),
        Err(e) => {
            return Finding {
                name,
                current: format!("{addr}: not understood"),
                required,
                severity: Severity::Warn,
                why: format!("CONFIG GET client-output-buffer-limit: {e}"),
                fix: String::new(),
            }
        }
    };
    let hard_low = pubsub.hard != 0 && pubsub.hard < PUBSUB_HARD_MIN;
    let soft_low = pubsub.soft != 0 && pubsub.soft < PUBSUB_SOFT_MIN;
    let current = format!(
        "{addr}: pubsub {} {} {}",
        format_memory(pubsub.hard),
        format_memory(pubsub.soft),
        pubsub.soft_seconds
    );
    if !hard_low && !soft_low {
        let why = if pubsub.hard == 0 && pubsub.soft == 0 {
            "no pubsub limit: a stalled node's subscriber connection is never cut, and its backlog \
             grows in Redis's memory until the node reads again or Redis runs out (watch \
             used_memory and client_recent_max_output_buffer)"
                .to_owned()
        } else {
            "a subscriber connection may fall this far behind before Redis cuts it".to_owned()
        };
        return Finding {
            name,
            current,
            required,
            severity: Severity::Ok,
            why,
            fix: String::new(),
        };
    }
    let mut cuts = Vec::new();
    if hard_low {
        cuts.push(format!(
            "at once when {} queue for it",
            format_memory(pubsub.hard)
        ));
    }
    if soft_low {
        cuts.push(format!(
            "when more than {} stay queued for {} s",
            format_memory(pubsub.soft),
            pubsub.soft_seconds
        ));
    }
    let default = pubsub.hard == 32 << 20 && pubsub.soft == 8 << 20 && pubsub.soft_seconds == 60;
    let hard = if pubsub.hard == 0 {
        0
    } else {
        pubsub.hard.max(PUBSUB_HARD_MIN)
    };
    let soft = if pubsub.soft == 0 {
        0
    } else {
        pubsub.soft.max(PUBSUB_SOFT_MIN)
    };
    let secs = if pubsub.soft_seconds == 0 {
        60
    } else {
        pubsub.soft_seconds
    };
    let set = if (hard, soft, secs) == (PUBSUB_HARD_MIN, PUBSUB_SOFT_MIN, 60) {
        PUBSUB_RECOMMENDED.to_owned()
    } else {
        format!(
            "pubsub {} {} {secs}",
            format_memory(hard),
            format_memory(soft)
        )
    };
    Finding {
        name,
        current,
        required,
        severity: Severity::Warn,
        why: format!(
            "{}every node's subscriber connection carries all cross-node traffic for the rooms \
             and users it holds; Redis closes it {} (a node busy with a reconnect storm, a \
             CPU-starved VM, a slow network). The node then resubscribes, and what was queued \
             is lost. Size it as bytes/s of cross-node traffic x seconds of stall to survive: \
             10 MB/s x 25 s = 250 MB",
            if default {
                "this is Redis's default (pubsub 32mb 8mb 60), sized for an application's \
                 subscriber, not a node's: "
            } else {
                ""
            },
            cuts.join(", or ")
        ),
        fix: format!(
            "{} CONFIG SET client-output-buffer-limit \"{set}\"\n\
             echo 'client-output-buffer-limit {set}' >> {REDIS_CONF}   # keeps it across restarts (or CONFIG REWRITE)",
            redis_cli(addr, auth)
        ),
    }
}

/// `maxmemory` and `maxmemory-policy`: with a limit set, an `allkeys-*` policy evicts keys
/// without a TTL too (history streams, cluster-wide offsets), and presence keys before their
/// TTL; `noeviction` or `volatile-ttl` keep them.
pub fn check_maxmemory(
    addr: &str,
    maxmemory: &Result<String, String>,
    policy: &Result<String, String>,
    auth: &Auth,
) -> Finding {
    let name = "redis maxmemory-policy";
    let required = "noeviction or volatile-ttl when maxmemory is set (no allkeys-*)".to_owned();
    let (max, policy) = match (maxmemory, policy) {
        (Ok(m), Ok(p)) => (m, p.trim().to_ascii_lowercase()),
        (Err(e), _) | (_, Err(e)) => {
            return config_unreadable(name, addr, "maxmemory / maxmemory-policy", e)
        }
    };
    let bytes = parse_memory(max);
    let current = match bytes {
        Some(0) => format!("{addr}: maxmemory 0 (none), {policy}"),
        Some(b) => format!("{addr}: maxmemory {}, {policy}", format_memory(b)),
        None => format!("{addr}: maxmemory {max:?}, {policy}"),
    };
    let limited = bytes != Some(0);
    if limited && policy.starts_with("allkeys-") {
        return Finding {
            name,
            current,
            required,
            severity: Severity::Warn,
            why: format!(
                "when Redis reaches maxmemory, {policy} evicts any key, with or without a TTL: \
                 room history streams and their offsets vanish (clients resuming get a gap), and \
                 presence keys go before their heartbeat TTL (users shown offline while \
                 connected). noeviction makes writes fail loudly instead (the bridge counts \
                 them); volatile-ttl evicts only keys with a TTL, the nearest to expiry first. \
                 Size maxmemory for history (streams are capped) plus presence plus, since \
                 client output buffers count against it, nodes x the pubsub hard limit"
            ),
            fix: format!(
                "{} CONFIG SET maxmemory-policy noeviction\n\
                 echo 'maxmemory-policy noeviction' >> {REDIS_CONF}   # keeps it across restarts (or CONFIG REWRITE)",
                redis_cli(addr, auth)
            ),
        };
    }
    Finding {
        name,
        current,
        required,
        severity: Severity::Ok,
        why: if !limited {
            "no maxmemory: nothing is evicted; Redis grows until the machine runs out, so watch \
             used_memory (history streams are capped, presence keys expire)"
                .into()
        } else if policy == "noeviction" {
            "at maxmemory, writes fail (counted by the bridge) and no key is evicted; client \
             output buffers count against maxmemory, so leave room for nodes x the pubsub hard \
             limit"
                .into()
        } else {
            format!(
                "{policy} evicts only keys with a TTL, never history streams or offsets; client \
                 output buffers count against maxmemory, so leave room for nodes x the pubsub \
                 hard limit"
            )
        },
        fix: String::new(),
    }
}

/// Cluster mode against `redis_cluster`: `INFO cluster` says whether the node is
/// cluster-enabled; on a cluster, `CLUSTER INFO` must say `cluster_state:ok` with every slot
/// assigned.
pub fn check_cluster(
    addr: &str,
    info_cluster: &Result<String, String>,
    cluster_info: Option<&Result<String, String>>,
    cluster: bool,
    auth: &Auth,
) -> Finding {
    let name = "redis cluster";
    let required = if cluster {
        "cluster_state:ok, 16384 slots assigned (redis_cluster true)"
    } else {
        "a standalone Redis (redis_cluster false)"
    }
    .to_owned();
    let enabled = match info_cluster {
        Ok(i) => info_field(i, "cluster_enabled") == Some("1"),
        Err(e) => {
            return Finding {
                name,
                current: format!("{addr}: could not be read"),
                required,
                severity: Severity::Warn,
                why: format!("INFO cluster was refused ({e}), so the cluster mode was not checked"),
                fix: String::new(),
            }
        }
    };
    let blocking = |current: String, why: String, fix: String| Finding {
        name,
        current,
        required: required.clone(),
        severity: Severity::Blocking,
        why,
        fix,
    };
    match (cluster, enabled) {
        (false, false) => Finding {
            name,
            current: format!("{addr}: standalone"),
            required: required.clone(),
            severity: Severity::Ok,
            why: "a standalone Redis, as redis_cluster false expects".into(),
            fix: String::new(),
        },
        (false, true) => blocking(
            format!("{addr}: a Redis Cluster node"),
            "this is a Redis Cluster node but redis_cluster is false: keys (presence, history) of \
             slots other nodes own fail with MOVED, and channels go by plain pub/sub through the \
             whole cluster bus"
                .into(),
            "SWITCHBOARD_REDIS_CLUSTER=true   # and list seed URLs of the cluster in SWITCHBOARD_REDIS_URL"
                .into(),
        ),
        (true, false) => blocking(
            format!("{addr}: standalone"),
            "redis_cluster is true but this Redis is not cluster-enabled: CLUSTER and sharded \
             commands fail"
                .into(),
            "SWITCHBOARD_REDIS_CLUSTER=false   # a single Redis; or point redis_url at the cluster's nodes"
                .into(),
        ),
        (true, true) => {
            let info = match cluster_info {
                Some(Ok(i)) => i,
                Some(Err(e)) => {
                    return blocking(
                        format!("{addr}: CLUSTER INFO failed"),
                        format!("CLUSTER INFO: {e}"),
                        format!("{} --cluster check {addr}", redis_cli_base(auth)),
                    )
                }
                None => {
                    return blocking(
                        format!("{addr}: CLUSTER INFO not asked"),
                        "CLUSTER INFO was not asked".into(),
                        String::new(),
                    )
                }
            };
            let state = info_field(info, "cluster_state").unwrap_or("unknown");
            let assigned = info_field(info, "cluster_slots_assigned").unwrap_or("?");
            let size = info_field(info, "cluster_size").unwrap_or("?");
            let current =
                format!("{addr}: {state}, {assigned}/16384 slots, {size} masters with slots");
            if state == "ok" && assigned == "16384" {
                Finding {
                    name,
                    current,
                    required: required.clone(),
                    severity: Severity::Ok,
                    why: "every slot has a master that answers".into(),
                    fix: String::new(),
                }
            } else {
                blocking(
                    current,
                    "slots without an answering master: publishes to their channels and writes \
                     of their keys fail (cluster-require-full-coverage yes stops the whole \
                     cluster)"
                        .into(),
                    format!(
                        "{base} --cluster check {addr}\n{base} --cluster fix {addr}   # assigns uncovered slots",
                        base = redis_cli_base(auth)
                    ),
                )
            }
        }
    }
}

/// TLS for the whole `redis_url`: on (how certificates are checked) or off. Warn for
/// `#insecure` (encrypted, not authenticated); off is fine on a private network.
pub fn check_tls_mode(tls: &Option<(String, bool)>) -> Finding {
    let name = "redis TLS";
    match tls {
        None => Finding {
            name,
            current: "off (redis://, plain TCP)".into(),
            required: "TLS where the network between the nodes and Redis is not private".into(),
            severity: Severity::Ok,
            why: "cross-node messages and the Redis password travel unencrypted: fine on a \
                  private network; give redis_url as rediss:// for TLS (docs/CONFIG.md, TLS to \
                  Redis)"
                .into(),
            fix: String::new(),
        },
        Some((how, false)) => Finding {
            name,
            current: format!("on (rediss://): {how}"),
            required: "the server's certificate checked".into(),
            severity: Severity::Ok,
            why: "every connection to Redis is TLS, and Redis proves who it is".into(),
            fix: String::new(),
        },
        Some((how, true)) => Finding {
            name,
            current: format!("on (rediss://...#insecure): {how}"),
            required: "the server's certificate checked".into(),
            severity: Severity::Warn,
            why: "#insecure checks no certificate: the connections are encrypted, but anyone on \
                  the path can pose as Redis and read or change every cross-node message"
                .into(),
            fix: "set redis_tls_ca_file to the CA that signed Redis's certificate and drop \
                  #insecure from redis_url"
                .into(),
        },
    }
}

/// The doctor's own TLS handshake with one node (and a PING over it): Blocking when it fails,
/// with the reason rustls gave (an unknown issuer is the wrong CA; a name mismatch is a
/// certificate without the host of the URL among its names).
pub fn check_tls_handshake(addr: &str, result: &Result<String, String>, auth: &Auth) -> Finding {
    let name = "redis TLS handshake";
    match result {
        Ok(what) => Finding {
            name,
            current: format!("{addr}: {what}"),
            required: "succeeds".into(),
            severity: Severity::Ok,
            why: "the TLS handshake succeeded and Redis answered PING over it".into(),
            fix: String::new(),
        },
        Err(e) => Finding {
            name,
            current: format!("{addr}: fails"),
            required: "succeeds".into(),
            severity: Severity::Blocking,
            why: format!(
                "{e}. No node can reach this Redis: cross-node traffic is queued and dropped, and \
                 /ready answers 503. UnknownIssuer: redis_tls_ca_file is not the CA that signed \
                 Redis's certificate (or is empty and the system's roots do not have it); \
                 NotValidForName: the URL's host is not among the certificate's names; a \
                 certificate required alert: Redis wants a client certificate \
                 (redis_tls_cert_file, redis_tls_key_file)"
            ),
            fix: format!(
                "{} PING   # the same TLS from this machine",
                redis_cli(addr, auth)
            ),
        },
    }
}

/// `redis-cli` with the URL's credentials, no address.
fn redis_cli_base(auth: &Auth) -> String {
    let mut s = String::from("redis-cli");
    if let Some(user) = &auth.username {
        s.push_str(&format!(" --user {user}"));
    }
    if auth.password {
        s.push_str(" --askpass");
    }
    s.push_str(&auth.tls);
    s
}

/// Pure: the findings for one node. Only PING when it did not answer.
pub fn judge(facts: &NodeFacts, setup: &Setup) -> Vec<Finding> {
    let a = facts.addr.as_str();
    let mut out = Vec::new();
    if let Some(tls) = &facts.tls {
        out.push(check_tls_handshake(a, tls, &setup.auth));
    }
    out.push(check_ping(a, &facts.ping, setup.timeout, &setup.auth));
    if facts.ping.is_err() {
        return out;
    }
    out.push(check_version(a, &facts.info_server, setup.cluster));
    out.push(check_output_buffer_limit(
        a,
        &facts.output_buffer_limit,
        &setup.auth,
    ));
    out.push(check_maxmemory(
        a,
        &facts.maxmemory,
        &facts.maxmemory_policy,
        &setup.auth,
    ));
    out.push(check_cluster(
        a,
        &facts.info_cluster,
        facts.cluster_info.as_ref(),
        setup.cluster,
        &setup.auth,
    ));
    out
}

// ---- IO --------------------------------------------------------------------------------------

/// `text` with `password` replaced (an error text could quote what it was given).
fn scrub(text: String, password: Option<&str>) -> String {
    match password {
        Some(p) if p.len() >= 3 => text.replace(p, "<redacted>"),
        _ => text,
    }
}

/// The value of `CONFIG GET <name>` from a RESP2 array or RESP3 map reply.
fn config_value(v: ::redis::Value, name: &str) -> Result<String, String> {
    use ::redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        other => return Err(format!("unexpected reply {other:?}")),
    };
    pairs
        .iter()
        .find(|(k, _)| text(k).is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .and_then(|(_, v)| text(v))
        .ok_or_else(|| format!("{name} is not in the reply (renamed or hidden?)"))
}

/// Ask one node everything [`judge`] needs; every step bounded by `timeout`.
fn probe(info: &::redis::ConnectionInfo, timeout: Duration, tls: Option<&RedisTls>) -> NodeFacts {
    let addr = info.addr().to_string();
    let password = info.redis_settings().password().map(str::to_owned);
    let pw = password.as_deref();
    let err = |e: ::redis::RedisError| {
        if e.is_timeout() {
            format!("no reply within redis_timeout {timeout:?} (Redis stalled, or the network drops packets)")
        } else {
            scrub(e.to_string().trim().to_owned(), pw)
        }
    };
    let handshake = match (info.addr(), tls) {
        (::redis::ConnectionAddr::TcpTls { host, port, .. }, Some(t)) => {
            Some(t.handshake(host, *port, timeout).map_err(|e| scrub(e, pw)))
        }
        _ => None,
    };
    let mut facts = NodeFacts {
        addr,
        tls: handshake,
        ping: Err(String::new()),
        info_server: Err("not asked".into()),
        info_cluster: Err("not asked".into()),
        cluster_info: None,
        output_buffer_limit: Err("not asked".into()),
        maxmemory: Err("not asked".into()),
        maxmemory_policy: Err("not asked".into()),
    };
    let connected = ::redis::Client::open(info.clone())
        .and_then(|c| c.get_connection_with_timeout(timeout))
        .and_then(|c| {
            c.set_read_timeout(Some(timeout))?;
            c.set_write_timeout(Some(timeout))?;
            Ok(c)
        });
    let mut con = match connected {
        Ok(c) => c,
        Err(e) => {
            facts.ping = Err(format!("cannot connect: {}", err(e)));
            return facts;
        }
    };
    let start = Instant::now();
    facts.ping = match ::redis::cmd("PING").query::<String>(&mut con) {
        Ok(p) if p == "PONG" => Ok(start.elapsed()),
        Ok(other) => Err(format!("PING answered {other:?}")),
        Err(e) => Err(format!("PING: {}", err(e))),
    };
    if facts.ping.is_err() {
        return facts;
    }
    let mut text = |c: &mut ::redis::Cmd| c.query::<String>(&mut con).map_err(err);
    facts.info_server = text(::redis::cmd("INFO").arg("server"));
    facts.info_cluster = text(::redis::cmd("INFO").arg("cluster"));
    if facts
        .info_cluster
        .as_deref()
        .is_ok_and(|i| info_field(i, "cluster_enabled") == Some("1"))
    {
        facts.cluster_info = Some(text(::redis::cmd("CLUSTER").arg("INFO")));
    }
    let mut config = |name: &str| {
        ::redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query::<::redis::Value>(&mut con)
            .map_err(err)
            .and_then(|v| config_value(v, name))
    };
    facts.output_buffer_limit = config("client-output-buffer-limit");
    facts.maxmemory = config("maxmemory");
    facts.maxmemory_policy = config("maxmemory-policy");
    facts
}

/// The masters of the cluster `info` belongs to (`CLUSTER NODES`), as connection infos with the
/// same credentials; empty when it cannot say.
fn masters_of(info: &::redis::ConnectionInfo, timeout: Duration) -> Vec<::redis::ConnectionInfo> {
    let nodes = ::redis::Client::open(info.clone())
        .and_then(|c| c.get_connection_with_timeout(timeout))
        .and_then(|mut c| {
            c.set_read_timeout(Some(timeout))?;
            c.set_write_timeout(Some(timeout))?;
            ::redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut c)
        });
    match nodes {
        Ok(text) => cluster_masters(&text)
            .into_iter()
            .map(|(host, port)| crate::bridge::redis::tls::at_addr(info, host, port))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// redis-cli's options for the TLS of `t` (file names only).
fn cli_tls_flags(t: &RedisTls) -> String {
    let mut s = String::from(" --tls");
    if t.verify == UrlTls::Insecure {
        s.push_str(" --insecure");
    }
    if let Some(ca) = &t.ca_file {
        s.push_str(&format!(" --cacert {ca}"));
    }
    if let (Some(c), Some(k)) = (&t.cert_file, &t.key_file) {
        s.push_str(&format!(" --cert {c} --key {k}"));
    }
    s
}

/// Check the Redis of `redis_url` (already validated by the config): every seed, and with
/// `cluster` every master `CLUSTER NODES` of the first answering seed names.
/// `tls` is what the server would use ([`RedisTls::from_config`]; its error is a Blocking
/// finding on the key at fault and nothing is asked).
pub fn check_configured(
    url: &str,
    cluster: bool,
    timeout: Duration,
    tls: Result<Option<RedisTls>, (&'static str, String)>,
) -> Vec<Finding> {
    let urls = match crate::cluster::parse_redis_urls(url, cluster) {
        Ok(u) => u,
        Err(e) => {
            return vec![Finding {
                name: "redis_url",
                current: crate::cluster::redact(url),
                required: "a redis:// URL (or, with redis_cluster, seed URLs)".into(),
                severity: Severity::Blocking,
                why: e,
                fix: String::new(),
            }]
        }
    };
    let tls = match tls {
        Ok(t) => t,
        Err((key, e)) => {
            return vec![Finding {
                name: "redis TLS",
                current: format!("{key}: does not load"),
                required: "loads".into(),
                severity: Severity::Blocking,
                why: format!("{e}: the server would refuse to start"),
                fix: String::new(),
            }]
        }
    };
    let mut infos: Vec<::redis::ConnectionInfo> = Vec::new();
    for u in &urls {
        match crate::bridge::redis::tls::connection_info(u, tls.as_ref()) {
            Ok(i) => infos.push(i),
            Err(e) => {
                return vec![Finding {
                    name: "redis_url",
                    current: crate::cluster::redact(u),
                    required: "a redis:// URL".into(),
                    severity: Severity::Blocking,
                    why: e.to_string(),
                    fix: String::new(),
                }]
            }
        }
    }
    let auth = infos
        .first()
        .map(|i| Auth {
            username: i.redis_settings().username().map(str::to_owned),
            password: i.redis_settings().password().is_some(),
            tls: tls.as_ref().map(cli_tls_flags).unwrap_or_default(),
        })
        .unwrap_or_default();
    let setup = Setup {
        cluster,
        timeout,
        auth,
        tls: tls
            .as_ref()
            .map(|t| (t.describe(), t.verify == UrlTls::Insecure)),
    };
    let mut findings = vec![check_tls_mode(&setup.tls)];
    let mut seen: Vec<String> = Vec::new();
    let mut masters = Vec::new();
    for info in &infos {
        let facts = probe(info, timeout, tls.as_ref());
        seen.push(facts.addr.clone());
        if cluster && masters.is_empty() && facts.cluster_info.is_some() {
            masters = masters_of(info, timeout);
        }
        findings.extend(judge(&facts, &setup));
    }
    for m in masters {
        if seen.contains(&m.addr().to_string()) {
            continue;
        }
        let facts = probe(&m, timeout, tls.as_ref());
        seen.push(facts.addr.clone());
        findings.extend(judge(&facts, &setup));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_LIMITS: &str =
        "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60";
    const A: &str = "10.0.0.5:6379";

    fn ok(s: &str) -> Result<String, String> {
        Ok(s.to_owned())
    }

    fn no_auth() -> Auth {
        Auth::default()
    }

    fn healthy() -> NodeFacts {
        NodeFacts {
            addr: A.into(),
            tls: None,
            ping: Ok(Duration::from_micros(400)),
            info_server: ok("# Server\r\nredis_version:7.2.4\r\nredis_mode:standalone\r\n"),
            info_cluster: ok("# Cluster\r\ncluster_enabled:0\r\n"),
            cluster_info: None,
            output_buffer_limit: ok(
                "normal 0 0 0 slave 268435456 67108864 60 pubsub 268435456 67108864 60",
            ),
            maxmemory: ok("0"),
            maxmemory_policy: ok("noeviction"),
        }
    }

    fn setup(cluster: bool) -> Setup {
        Setup {
            cluster,
            timeout: Duration::from_secs(2),
            auth: no_auth(),
            tls: None,
        }
    }

    #[test]
    fn memory_sizes_parse_and_format_as_redis_does() {
        assert_eq!(parse_memory("33554432"), Some(32 << 20));
        assert_eq!(parse_memory("256mb"), Some(256 << 20));
        assert_eq!(parse_memory("256MB"), Some(256 << 20));
        assert_eq!(parse_memory("1m"), Some(1_000_000));
        assert_eq!(parse_memory("2gb"), Some(2 << 30));
        assert_eq!(parse_memory("4k"), Some(4_000));
        assert_eq!(parse_memory("4kb"), Some(4_096));
        assert_eq!(parse_memory("0"), Some(0));
        assert_eq!(parse_memory("lots"), None);
        assert_eq!(parse_memory("12tb"), None);
        assert_eq!(parse_memory(""), None);
        assert_eq!(format_memory(256 << 20), "256mb");
        assert_eq!(format_memory(8 << 20), "8mb");
        assert_eq!(format_memory(1 << 30), "1gb");
        assert_eq!(format_memory(1536), "1536");
        assert_eq!(format_memory(4096), "4kb");
        assert_eq!(format_memory(0), "0");
        assert_eq!(format_memory(1_000_001), "1000001");
    }

    #[test]
    fn output_buffer_limits_parse_by_class() {
        let c = parse_output_buffer_limit(DEFAULT_LIMITS).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[2],
            BufferLimit {
                class: "pubsub".into(),
                hard: 32 << 20,
                soft: 8 << 20,
                soft_seconds: 60
            }
        );
        assert_eq!(c[1].class, "slave");
        assert!(parse_output_buffer_limit("").is_err());
        assert!(parse_output_buffer_limit("pubsub 1 2").is_err());
        assert!(parse_output_buffer_limit("pubsub x 2 3").is_err());
        assert!(parse_output_buffer_limit("pubsub 1 2 soon").is_err());
        assert_eq!(
            parse_output_buffer_limit("pubsub 256mb 64mb 60").unwrap()[0].hard,
            256 << 20
        );
    }

    #[test]
    fn redis_default_pubsub_limit_warns_with_the_exact_remedy() {
        let f = check_output_buffer_limit(A, &ok(DEFAULT_LIMITS), &no_auth());
        assert_eq!(f.severity, Severity::Warn);
        assert_eq!(f.current, "10.0.0.5:6379: pubsub 32mb 8mb 60");
        assert!(
            f.why.contains("Redis's default (pubsub 32mb 8mb 60)"),
            "{}",
            f.why
        );
        assert!(
            f.why.contains("at once when 32mb queue for it"),
            "{}",
            f.why
        );
        assert!(
            f.why.contains("when more than 8mb stay queued for 60 s"),
            "{}",
            f.why
        );
        assert!(f.why.contains("10 MB/s x 25 s = 250 MB"), "{}", f.why);
        assert_eq!(
            f.fix,
            "redis-cli -h 10.0.0.5 -p 6379 CONFIG SET client-output-buffer-limit \"pubsub 256mb 64mb 60\"\n\
             echo 'client-output-buffer-limit pubsub 256mb 64mb 60' >> /etc/redis/redis.conf   # keeps it across restarts (or CONFIG REWRITE)"
        );
    }

    #[test]
    fn good_or_unlimited_pubsub_limits_pass() {
        for v in [
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 268435456 67108864 60",
            "pubsub 1gb 0 0",
            "pubsub 0 0 0",
            "normal 0 0 0",
        ] {
            let f = check_output_buffer_limit(A, &ok(v), &no_auth());
            assert_eq!(f.severity, Severity::Ok, "{v}: {f:?}");
            assert!(f.fix.is_empty());
        }
        let f = check_output_buffer_limit(A, &ok("pubsub 0 0 0"), &no_auth());
        assert!(f.why.contains("never cut"), "{}", f.why);
    }

    #[test]
    fn a_low_hard_or_soft_limit_alone_warns_and_keeps_what_is_good() {
        // Only the soft limit is low: the hard one (512mb) is kept.
        let f = check_output_buffer_limit(A, &ok("pubsub 512mb 8mb 30"), &no_auth());
        assert_eq!(f.severity, Severity::Warn);
        assert!(!f.why.contains("at once"), "{}", f.why);
        assert!(
            f.why.contains("more than 8mb stay queued for 30 s"),
            "{}",
            f.why
        );
        assert!(f.fix.contains("\"pubsub 512mb 64mb 30\""), "{}", f.fix);
        assert!(!f.why.contains("Redis's default"), "{}", f.why);
        // Only the hard limit is low, no soft limit: none is added.
        let f = check_output_buffer_limit(A, &ok("pubsub 100mb 0 0"), &no_auth());
        assert_eq!(f.severity, Severity::Warn);
        assert!(f.fix.contains("\"pubsub 256mb 0 60\""), "{}", f.fix);
        // 256mb is enough; 255mb is not.
        let f = check_output_buffer_limit(A, &ok("pubsub 267386880 64mb 60"), &no_auth());
        assert_eq!(f.severity, Severity::Warn);
    }

    #[test]
    fn fixes_ask_for_the_password_and_never_contain_it() {
        let auth = Auth {
            username: Some("sb".into()),
            password: true,
            tls: String::new(),
        };
        let f = check_output_buffer_limit(A, &ok(DEFAULT_LIMITS), &auth);
        assert!(
            f.fix
                .starts_with("redis-cli --user sb --askpass -h 10.0.0.5 -p 6379 CONFIG SET"),
            "{}",
            f.fix
        );
        assert_eq!(
            scrub("WRONGPASS for hunter22".into(), Some("hunter22")),
            "WRONGPASS for <redacted>"
        );
        assert_eq!(scrub("a b".into(), Some("a")), "a b", "too short to tell");
    }

    #[test]
    fn config_refused_says_it_could_not_be_read() {
        let refused: Result<String, String> =
            Err("ERR unknown command 'CONFIG', with args beginning with: 'GET'".into());
        let f = check_output_buffer_limit(A, &refused, &no_auth());
        assert_eq!(f.severity, Severity::Warn);
        assert_eq!(f.current, "10.0.0.5:6379: could not be read");
        assert!(f.why.contains("unknown command 'CONFIG'"), "{}", f.why);
        assert!(f.why.contains("parameter group"), "{}", f.why);
        let f = check_maxmemory(A, &refused, &ok("noeviction"), &no_auth());
        assert_eq!(f.current, "10.0.0.5:6379: could not be read");
        assert_eq!(f.severity, Severity::Warn);
        let garbled = check_output_buffer_limit(A, &ok("pubsub 1 2"), &no_auth());
        assert_eq!(garbled.severity, Severity::Warn);
        assert_eq!(garbled.current, "10.0.0.5:6379: not understood");
    }

    #[test]
    fn allkeys_eviction_with_maxmemory_warns() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "ALLKEYS-LRU",
        ] {
            let f = check_maxmemory(A, &ok("1073741824"), &ok(policy), &no_auth());
            assert_eq!(f.severity, Severity::Warn, "{policy}");
            assert!(f.current.contains("maxmemory 1gb"), "{}", f.current);
            assert!(f.why.contains("history streams"), "{}", f.why);
            assert!(f.why.contains("presence keys"), "{}", f.why);
            assert!(
                f.fix.contains("CONFIG SET maxmemory-policy noeviction"),
                "{}",
                f.fix
            );
            assert!(f
                .fix
                .contains("echo 'maxmemory-policy noeviction' >> /etc/redis/redis.conf"));
        }
        for (max, policy) in [
            ("0", "allkeys-lru"),
            ("1073741824", "noeviction"),
            ("1073741824", "volatile-ttl"),
            ("1073741824", "volatile-lru"),
            ("0", "noeviction"),
        ] {
            let f = check_maxmemory(A, &ok(max), &ok(policy), &no_auth());
            assert_eq!(f.severity, Severity::Ok, "{max} {policy}: {f:?}");
            assert!(f.fix.is_empty());
        }
        let f = check_maxmemory(A, &ok("0"), &ok("allkeys-lru"), &no_auth());
        assert_eq!(f.current, "10.0.0.5:6379: maxmemory 0 (none), allkeys-lru");
    }

    #[test]
    fn versions_below_seven_warn_and_block_sharded_pub_sub() {
        let info = |v: &str| ok(&format!("# Server\r\nredis_version:{v}\r\n"));
        assert_eq!(
            check_version(A, &info("7.0.15"), true).severity,
            Severity::Ok
        );
        assert_eq!(
            check_version(A, &info("7.2.4"), true).severity,
            Severity::Ok
        );
        assert_eq!(
            check_version(A, &info("8.0.0"), false).severity,
            Severity::Ok
        );
        let old = check_version(A, &info("6.2.14"), false);
        assert_eq!(old.severity, Severity::Warn);
        assert_eq!(old.current, "10.0.0.5:6379: 6.2.14");
        assert!(old.why.contains("older than 7.0"));
        assert_eq!(
            check_version(A, &info("6.2.14"), true).severity,
            Severity::Blocking
        );
        assert_eq!(
            check_version(A, &ok("# Server\r\n"), false).severity,
            Severity::Warn
        );
        assert_eq!(
            check_version(A, &Err("NOPERM".into()), false).current,
            "10.0.0.5:6379: could not be read"
        );
        assert_eq!(version_pair("7"), Some((7, 0)));
        assert_eq!(version_pair("x.1"), None);
    }

    #[test]
    fn ping_blocks_when_unanswered_and_warns_when_slow() {
        let t = Duration::from_secs(2);
        let a = no_auth();
        let f = check_ping(A, &Ok(Duration::from_micros(350)), t, &a);
        assert_eq!(f.severity, Severity::Ok);
        assert_eq!(f.current, "10.0.0.5:6379: PONG in 0.35 ms");
        assert_eq!(
            check_ping(A, &Ok(Duration::from_secs(1)), t, &a).severity,
            Severity::Warn
        );
        let f = check_ping(A, &Err("Connection refused (os error 111)".into()), t, &a);
        assert_eq!(f.severity, Severity::Blocking);
        assert_eq!(f.current, "10.0.0.5:6379: no answer");
        assert!(f.why.starts_with("Connection refused"), "{}", f.why);
        assert!(
            f.fix.starts_with("redis-cli -h 10.0.0.5 -p 6379 PING"),
            "{}",
            f.fix
        );
        let auth = Auth {
            username: None,
            password: true,
            tls: String::new(),
        };
        let f = check_ping(A, &Err("WRONGPASS".into()), t, &auth);
        assert!(
            f.fix.starts_with("redis-cli --askpass -h 10.0.0.5"),
            "{}",
            f.fix
        );
    }

    #[test]
    fn cluster_mode_must_match_redis_cluster() {
        let standalone = ok("# Cluster\r\ncluster_enabled:0\r\n");
        let enabled = ok("# Cluster\r\ncluster_enabled:1\r\n");
        let good = ok("cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_size:3\r\n");
        let bad = ok("cluster_state:fail\r\ncluster_slots_assigned:10923\r\ncluster_size:2\r\n");
        let a = no_auth();
        assert_eq!(
            check_cluster(A, &standalone, None, false, &a).severity,
            Severity::Ok
        );
        let f = check_cluster(A, &enabled, Some(&good), false, &a);
        assert_eq!(f.severity, Severity::Blocking);
        assert!(f.fix.contains("SWITCHBOARD_REDIS_CLUSTER=true"));
        let f = check_cluster(A, &standalone, None, true, &a);
        assert_eq!(f.severity, Severity::Blocking);
        assert!(f.fix.contains("SWITCHBOARD_REDIS_CLUSTER=false"));
        let f = check_cluster(A, &enabled, Some(&good), true, &a);
        assert_eq!(f.severity, Severity::Ok, "{f:?}");
        assert_eq!(
            f.current,
            "10.0.0.5:6379: ok, 16384/16384 slots, 3 masters with slots"
        );
        let f = check_cluster(A, &enabled, Some(&bad), true, &a);
        assert_eq!(f.severity, Severity::Blocking);
        assert!(f.current.contains("fail, 10923/16384"), "{}", f.current);
        assert!(
            f.fix.contains("redis-cli --cluster check 10.0.0.5:6379"),
            "{}",
            f.fix
        );
        assert_eq!(
            check_cluster(A, &Err("NOPERM".into()), None, true, &a).severity,
            Severity::Warn
        );
    }

    #[test]
    fn judge_asks_nothing_more_of_a_node_that_does_not_answer() {
        let f = judge(&healthy(), &setup(false));
        let names: Vec<&str> = f.iter().map(|x| x.name).collect();
        assert_eq!(
            names,
            [
                "redis PING",
                "redis version",
                "redis client-output-buffer-limit",
                "redis maxmemory-policy",
                "redis cluster"
            ]
        );
        assert!(f.iter().all(|x| x.severity == Severity::Ok), "{f:?}");
        let down = NodeFacts {
            ping: Err("timed out".into()),
            ..healthy()
        };
        let f = judge(&down, &setup(false));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Blocking);
        let defaults = NodeFacts {
            output_buffer_limit: ok(DEFAULT_LIMITS),
            ..healthy()
        };
        let f = judge(&defaults, &setup(false));
        assert_eq!(
            f.iter().filter(|x| x.severity == Severity::Warn).count(),
            1,
            "{f:?}"
        );
    }

    #[test]
    fn cluster_nodes_lists_the_answering_masters() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-a slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238316232 5 disconnected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 :0@0 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(
            cluster_masters(text),
            [
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30003),
                ("127.0.0.1".to_owned(), 30001)
            ]
        );
        assert!(cluster_masters("").is_empty());
        assert!(cluster_masters("garbage").is_empty());
    }

    #[test]
    fn config_values_come_from_resp2_arrays_and_resp3_maps() {
        use ::redis::Value;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let arr = Value::Array(vec![bulk("maxmemory"), bulk("0")]);
        assert_eq!(config_value(arr, "maxmemory"), Ok("0".into()));
        let map = Value::Map(vec![(bulk("maxmemory-policy"), bulk("noeviction"))]);
        assert_eq!(
            config_value(map, "maxmemory-policy"),
            Ok("noeviction".into())
        );
        assert!(config_value(Value::Array(vec![]), "maxmemory").is_err());
        assert!(config_value(Value::Nil, "maxmemory").is_err());
    }

    #[test]
    fn info_fields_are_found_by_whole_name() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_version_extra:x\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field(info, "redis"), None);
    }

    #[test]
    fn a_bad_url_is_blocking_and_redacted() {
        let f = check_configured(
            "redis://:pw@a:1,redis://b:2",
            false,
            Duration::from_secs(1),
            Ok(None),
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Blocking);
        assert!(!format!("{f:?}").contains(":pw@"), "{f:?}");
    }

    #[test]
    fn tls_is_reported_on_or_off_and_a_failed_handshake_blocks() {
        let off = check_tls_mode(&None);
        assert_eq!(off.severity, Severity::Ok);
        assert!(off.current.contains("off"), "{off:?}");
        let on = check_tls_mode(&Some(("checked against /ca.pem".into(), false)));
        assert_eq!(on.severity, Severity::Ok);
        assert!(
            on.current.contains("on") && on.current.contains("/ca.pem"),
            "{on:?}"
        );
        let insecure = check_tls_mode(&Some(("NOT checked".into(), true)));
        assert_eq!(insecure.severity, Severity::Warn);
        assert!(insecure.fix.contains("redis_tls_ca_file"), "{insecure:?}");

        let auth = Auth {
            username: None,
            password: true,
            tls: " --tls --cacert /ca.pem".into(),
        };
        let good = check_tls_handshake(A, &Ok("TLSv1_3 TLS13_AES_256_GCM_SHA384".into()), &auth);
        assert_eq!(good.severity, Severity::Ok);
        assert!(good.current.contains("TLSv1_3"), "{good:?}");
        let bad = check_tls_handshake(
            A,
            &Err("TLS handshake: invalid peer certificate: UnknownIssuer".into()),
            &auth,
        );
        assert_eq!(bad.severity, Severity::Blocking);
        assert!(bad.why.contains("UnknownIssuer"), "{bad:?}");
        assert!(
            bad.fix
                .contains("--askpass --tls --cacert /ca.pem -h 10.0.0.5 -p 6379"),
            "{bad:?}"
        );
        // The handshake's finding comes first, then the rest as over plain TCP.
        let facts = NodeFacts {
            tls: Some(Ok("TLSv1_3".into())),
            ..healthy()
        };
        let f = judge(&facts, &setup(false));
        assert_eq!(f[0].name, "redis TLS handshake");
        assert_eq!(f[1].name, "redis PING");
    }
}
