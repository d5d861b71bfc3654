//! The cluster's sans-IO part: the Redis channel a cross-node delivery goes to, the envelope
//! it travels in, the set of channels a node must hold, and the reconnect backoff. The Redis
//! connections themselves are the bridge's ([`crate::bridge::redis`]).
//!
//! **Channels** (`<p>` is `redis_prefix`, `sb:` by default). Every name carries a hash tag
//! (`{...}`) naming what it is for, so on a Redis Cluster a room's channel and the keys kept
//! for that room later (its history) share a slot, and rooms, users and topics spread over all
//! slots by the CRC16 of their own names:
//!
//! | channel | carries | a node holds it while |
//! |---|---|---|
//! | `<p>{room:<name>}` | a room's messages and events | it has a subscriber of the room |
//! | `<p>{user:<id>}` | whatever goes to every device of a user | it has a device of the user |
//! | `<p>{topic:<name>}` | server-side subscriptions (presence watchers) | it has a member |
//! | `<p>{all}` | broadcasts | always |
//! | `<p>{node:<hex id>}` | one connection of this node; the node's canary | always |
//!
//! **Keys** of room history across nodes ([`crate::bridge::redis::history`]): `<p>{room:<name>}:h`
//! (the room's stream: one entry per message, id `<offset>-0`, fields `d` = the message's
//! JSON head, `t` = Redis time in ms) and `<p>{room:<name>}:e` (a hash: `epoch`, and
//! `offset`, the last one given), in the slot of the room's channel.
//!
//! **Keys** (presence across nodes, [`crate::bridge::redis`]): `<p>{user:<id>}:nodes` (the
//! nodes holding the user present), `<p>{node:<hex>}:users` (the users a node holds),
//! `<p>{node:<hex>}:alive` (a TTL the node's heartbeat renews), `<p>{node:<hex>}:reaper`
//! (the lock of the one node reaping a dead node), `<p>nodes` (every node not reaped); and the
//! `clientMsgId` dedup of direct messages across nodes, `<p>{user:<id>}:cm:<clientMsgId>`.
//!
//! **The envelope** is binary and starts with the version byte [`VERSION`]:
//! `version, origin node (u32 LE), kind, flags, [except ConnRef], [name len u16 LE, name],
//! wire bytes`. A delivery made inside a traced span (tracing on, the trace sampled) is
//! [`VERSION_TRACED`] instead, with `trace id (u128 LE), span id (u64 LE)` after the flags:
//! the receiving node continues that trace (`redis.receive`). A node of a build before it
//! drops such an envelope as of an unknown version (counted), never misreads it. The wire
//! bytes are the encoded WebSocket frame as the origin queued it, so a receiving node wraps
//! them in its shared [`Frame`] as they are (one copy, no re-encoding)
//! and dialect connections re-encode once per dialect per shard, as for local frames.
//! A node hears its own publishes on channels it holds and drops them by the origin id.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::Frame;
use crate::route::{ConnRef, Target};

/// A history envelope (KIND_HISTORY) is written in two parts: the origin writes
/// `version, origin, kind, 0, [trace id, span id], name len u16 LE, name`
/// ([`encode_history_prefix`]; the trace context only in a [`VERSION_TRACED`] one) and the
/// append script, which gives the offset, appends `<offset> <epoch> <head>` (decimal offset,
/// the epoch's text, each followed by one space; `head` is the message's JSON object without
/// its closing brace, [`history_frame`] completes it).
///
/// The envelope's version byte; a node drops (and counts) anything else.
pub const VERSION: u8 = 1;

/// The version byte of a delivery envelope that carries a trace context (see the module).
pub const VERSION_TRACED: u8 = 2;

/// Bytes of the trace context of a [`VERSION_TRACED`] envelope: trace id u128, span id u64.
const TRACE_BYTES: usize = 24;

/// Bytes of a [`ConnRef`] in the envelope: node u32, shard u16, slot u32, gen u32.
const CONN_BYTES: usize = 14;

/// Longest name an envelope carries (room, user and topic names are far shorter: bounded by
/// `max_room_name_bytes` and the id limits).
pub const NAME_BYTES_MAX: usize = u16::MAX as usize;

const KIND_ROOM: u8 = 0;
const KIND_USER: u8 = 1;
const KIND_TOPIC: u8 = 2;
const KIND_ALL: u8 = 3;
const KIND_CONN: u8 = 4;
const KIND_CANARY: u8 = 5;
const KIND_SERVICE: u8 = 6;
const KIND_HISTORY: u8 = 7;

const FLAG_EXCEPT: u8 = 1;
const FLAG_DROPPABLE: u8 = 2;

/// How a `redis_url` reaches Redis: every URL in it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlTls {
    /// `redis://`: plain TCP.
    Plain,
    /// `rediss://`: TLS, the server's certificate checked (against `redis_tls_ca_file`, else
    /// the system's roots) and its name matched to the URL's host.
    Verified,
    /// `rediss://...#insecure`: TLS whose server certificate is not checked at all:
    /// encrypted, but anyone on the path can pose as Redis.
    Insecure,
}

/// The redis URLs of `redis_url`: exactly one `redis://` or `rediss://` URL, or with
/// `cluster` one or more comma-separated seeds, all of one kind ([`url_tls`]): the cluster
/// client connects to every master it discovers the way its first seed says, so a list that
/// mixes `redis://` and `rediss://` (or `#insecure` and not) is refused rather than half used.
pub fn parse_redis_urls(s: &str, cluster: bool) -> Result<Vec<String>, String> {
    let urls: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err("no URL given".into());
    }
    if urls.len() > 1 && !cluster {
        return Err(format!(
            "{} URLs given: a list of seeds is for a Redis Cluster (set redis_cluster true), a single Redis takes one URL",
            urls.len()
        ));
    }
    let mut kind: Option<(UrlTls, String)> = None;
    for u in &urls {
        let shown = redact(u);
        let this =
            one_url_tls(u).ok_or_else(|| format!("{shown} is not a redis:// or rediss:// URL"))?;
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
            return Err(format!("{shown}: {e}"));
        }
        match &kind {
            None => kind = Some((this, shown)),
            Some((first, first_shown)) if *first != this => {
                return Err(format!(
                    "{first_shown} and {shown} reach Redis differently ({first:?} and {this:?}): every node of a Redis Cluster speaks TLS or none, and the client reaches every master the way the first seed says; give every seed as rediss:// (each with #insecure, or none) or every one as redis://"
                ));
            }
            Some(_) => {}
        }
    }
    Ok(urls)
}

/// The kind of one URL by its scheme and fragment; None when it is not a Redis URL.
fn one_url_tls(u: &str) -> Option<UrlTls> {
    if u.starts_with("redis://") {
        Some(UrlTls::Plain)
    } else if u.starts_with("rediss://") {
        // The crate takes `#insecure` as the only fragment (and refuses any other).
        Some(if u.ends_with("#insecure") {
            UrlTls::Insecure
        } else {
            UrlTls::Verified
        })
    } else {
        None
    }
}

/// How the URLs of [`parse_redis_urls`] (all of one kind) reach Redis.
pub fn url_tls(urls: &[String]) -> UrlTls {
    urls.first()
        .and_then(|u| one_url_tls(u))
        .unwrap_or(UrlTls::Plain)
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// A node's channel names, built from the deployment's prefix.
#[derive(Clone, Debug)]
pub struct Channels {
    prefix: Arc<str>,
}

impl Channels {
    pub fn new(prefix: &str) -> Channels {
        Channels {
            prefix: prefix.into(),
        }
    }

    pub fn room(&self, room: &str) -> Arc<str> {
        format!("{}{{room:{room}}}", self.prefix).into()
    }

    pub fn user(&self, user: &str) -> Arc<str> {
        format!("{}{{user:{user}}}", self.prefix).into()
    }

    pub fn topic(&self, topic: &str) -> Arc<str> {
        format!("{}{{topic:{topic}}}", self.prefix).into()
    }

    /// The room of a room channel (`None` for any other channel).
    pub fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(&*self.prefix)?
            .strip_prefix("{room:")?
            .strip_suffix('}')
    }

    /// A room's history stream (Redis Streams): one entry per message, id `<offset>-0`.
    pub fn history(&self, room: &str) -> String {
        format!("{}{{room:{room}}}:h", self.prefix)
    }

    /// A room's history state (a hash): `epoch` and `offset` (the last one given).
    pub fn history_meta(&self, room: &str) -> String {
        format!("{}{{room:{room}}}:e", self.prefix)
    }

    /// Node `node`'s append mark in a room with history: `<seq> <offset> <epoch>` of its last
    /// message there, expiring (`bridge::redis::history::APPEND_LUA`).
    pub fn history_mark(&self, room: &str, node: u32) -> String {
        format!("{}{{room:{room}}}:n:{node:08x}", self.prefix)
    }

    pub fn all(&self) -> Arc<str> {
        format!("{}{{all}}", self.prefix).into()
    }

    /// Commands for calls whose state may be on another node (every node holds it).
    pub fn calls(&self) -> Arc<str> {
        format!("{}{{calls}}", self.prefix).into()
    }

    pub fn node(&self, node: u32) -> Arc<str> {
        format!("{}{{node:{node:08x}}}", self.prefix).into()
    }

    /// The set of nodes holding `user` present (online, or in its offline grace), as hex
    /// node ids: presence is the cluster's when this set goes from empty to one node, or
    /// from one to empty. Tagged like the channel of the user's presence watchers, so the
    /// script that judges a change can publish it in the same slot (Redis Cluster).
    pub fn user_nodes(&self, user: &str) -> String {
        let watch = crate::shard::service::presence::watch_topic(user);
        format!("{}{{topic:{watch}}}:nodes", self.prefix)
    }

    /// A user's presence as the cluster's readers see it (a string, `status last_seen text`:
    /// [`crate::shard::service::presence::state::encode_remote`]), written with every change
    /// watchers hear; in the slot of [`Channels::user_nodes`].
    pub fn user_record(&self, user: &str) -> String {
        let watch = crate::shard::service::presence::watch_topic(user);
        format!("{}{{topic:{watch}}}:rec", self.prefix)
    }

    /// A room's users on every node (rooms that track presence): a hash, user -> the hex ids
    /// of the nodes holding it in the room, space-separated; in the room's slot.
    pub fn room_present(&self, room: &str) -> String {
        format!("{}{{room:{room}}}:present", self.prefix)
    }

    /// The (room, user) pairs node `node` holds in room presence (for its reaper; members
    /// made by [`crate::shard::service::presence::state::encode_room_member`]).
    pub fn node_rooms(&self, node: u32) -> String {
        format!("{}{{node:{node:08x}}}:rooms", self.prefix)
    }

    /// Set (with a TTL) when node `node` has been reaped: the node, if it is in fact alive,
    /// learns from its next heartbeat that the cluster forgot it, and announces its users
    /// again.
    pub fn node_reaped(&self, node: u32) -> String {
        format!("{}{{node:{node:08x}}}:reaped", self.prefix)
    }

    /// The users node `node` holds present (for the reaper of a node that died).
    pub fn node_users(&self, node: u32) -> String {
        format!("{}{{node:{node:08x}}}:users", self.prefix)
    }

    /// Exists while node `node` is alive (a TTL its heartbeat renews).
    pub fn node_alive(&self, node: u32) -> String {
        format!("{}{{node:{node:08x}}}:alive", self.prefix)
    }

    /// Held by the one node reaping node `node`'s presence.
    pub fn node_reaper(&self, node: u32) -> String {
        format!("{}{{node:{node:08x}}}:reaper", self.prefix)
    }

    /// The cross-node `clientMsgId` claim of `sender`'s message `client_msg_id`
    /// ([`crate::bridge::store`]'s dedup, with `redis_url` and no `database_url`): pending
    /// while the first copy is in flight, then its ack, for `dedup_window`.
    pub fn client_msg(&self, sender: &str, client_msg_id: &str) -> String {
        format!("{}{{user:{sender}}}:cm:{client_msg_id}", self.prefix)
    }

    /// Every node that ever joined and was not reaped.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// Each node's numbers for `/api/stats` (a hash: node id -> `connections max unix_ms`).
    pub fn stats(&self) -> String {
        format!("{}stats", self.prefix)
    }

    /// The channel a delivery to `target` is published on (`None`: a connection of this very
    /// node, which never leaves it).
    pub fn of(&self, target: &Target, me: u32) -> Option<Arc<str>> {
        Some(match target {
            Target::Room { room, .. } => self.room(room),
            Target::User { user, .. } => self.user(user),
            Target::Topic { topic, .. } => self.topic(topic),
            Target::All => self.all(),
            Target::Conn(c) if c.node == me => return None,
            Target::Conn(c) => self.node(c.node),
        })
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, or of the whole key
/// without one, modulo 16384), as Redis computes it.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

/// The hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// Most tags tried for a master's canary channel ([`canary_channel`]): a master owning one
/// slot in 16,384 is found after ~16,384 tries on average; past this bound (a master owning
/// almost nothing) that master gets no canary and counts as deaf.
pub const CANARY_TAG_TRIES_MAX: u32 = 1 << 20;

/// Who masters each hash slot of a Redis Cluster, from `CLUSTER SLOTS`: masters are named by
/// `host:port` and numbered in address order (a stable order for the same topology).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first slot, last slot, master)`, sorted, not overlapping.
    ranges: Vec<(u16, u16, usize)>,
    masters: Vec<String>,
}

impl SlotMap {
    /// Parse a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    /// An empty host (a node that does not know its own address) is `asked_host`, the host the
    /// reply came from. Replicas are ignored (everything here goes to masters).
    pub fn from_cluster_slots(v: &redis::Value, asked_host: &str) -> Result<SlotMap, String> {
        use redis::Value;
        let int = |v: &Value| match v {
            Value::Int(n) => u16::try_from(*n).ok().filter(|n| *n < SLOTS),
            _ => None,
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
            _ => None,
        };
        let Value::Array(items) = v else {
            return Err(format!("CLUSTER SLOTS: not an array: {v:?}"));
        };
        let mut raw: Vec<(u16, u16, String)> = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(f) = item else {
                return Err(format!("CLUSTER SLOTS: not a range: {item:?}"));
            };
            let (Some(start), Some(end), Some(Value::Array(node))) =
                (f.first().and_then(int), f.get(1).and_then(int), f.get(2))
            else {
                return Err(format!("CLUSTER SLOTS: bad range {f:?}"));
            };
            let host = node.first().and_then(text).unwrap_or_default();
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            let port = match node.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok().filter(|p| *p != 0),
                _ => None,
            };
            let Some(port) = port else {
                return Err(format!("CLUSTER SLOTS: bad node {node:?}"));
            };
            if start > end {
                return Err(format!("CLUSTER SLOTS: range {start}-{end}"));
            }
            raw.push((start, end, format!("{host}:{port}")));
        }
        let mut masters: Vec<String> = raw.iter().map(|r| r.2.clone()).collect();
        masters.sort();
        masters.dedup();
        let mut ranges: Vec<(u16, u16, usize)> = raw
            .into_iter()
            .map(|(a, b, m)| (a, b, masters.binary_search(&m).unwrap_or_default()))
            .collect();
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[1].0 <= w[0].1) {
            return Err("CLUSTER SLOTS: overlapping ranges".into());
        }
        Ok(SlotMap { ranges, masters })
    }

    /// The masters, by `host:port`; an index into this is a master's number.
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// The master of `slot`, if any masters it.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.1 < slot);
        self.ranges.get(i).filter(|r| r.0 <= slot).map(|r| r.2)
    }

    /// The master of the slot of `channel` (or key).
    pub fn owner_of(&self, channel: &str) -> Option<usize> {
        self.owner(slot(channel.as_bytes()))
    }

    /// Slots assigned to a master (16,384 when the cluster is covered).
    pub fn covered(&self) -> usize {
        self.ranges.iter().map(|r| usize::from(r.1 - r.0) + 1).sum()
    }

    /// `items` split by the master of each one's channel, in their order: one list per master,
    /// and the ones no master owns (a slot not assigned) last.
    pub fn group<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        channel: impl Fn(&T) -> &str,
    ) -> (Vec<Vec<T>>, Vec<T>) {
        let mut per: Vec<Vec<T>> = (0..self.masters.len()).map(|_| Vec::new()).collect();
        let mut none = Vec::new();
        for it in items {
            match self.owner_of(channel(&it)) {
                Some(m) => per[m].push(it),
                None => none.push(it),
            }
        }
        (per, none)
    }
}

/// Node `node`'s canary channel on `master`: `<p>{canary:<hex node>:<n>}` with the first `n`
/// whose slot `master` owns, so a canary published there proves that master's subscriber
/// connection delivers. None when none was found within [`CANARY_TAG_TRIES_MAX`].
pub fn canary_channel(prefix: &str, node: u32, map: &SlotMap, master: usize) -> Option<Arc<str>> {
    (0..CANARY_TAG_TRIES_MAX).find_map(|n| {
        let tag = format!("canary:{node:08x}:{n}");
        (map.owner(crc16(tag.as_bytes()) % SLOTS) == Some(master))
            .then(|| format!("{prefix}{{{tag}}}").into())
    })
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// What one envelope carries, decoded.
#[derive(Debug, PartialEq)]
pub enum Inbound<'a> {
    /// A delivery from node `origin` to its recipients here; `wire` is the frame as the
    /// origin encoded it.
    Deliver {
        origin: u32,
        target: Target,
        droppable: bool,
        wire: &'a [u8],
        /// The origin's trace id and span id when the delivery was traced.
        trace: Option<(u128, u64)>,
    },
    /// A node's canary (only its own node reads it).
    Canary { origin: u32, nonce: u64 },
    /// A message of a room with history, sequenced by Redis (every node gets it, the origin
    /// too): its cluster-wide `offset` and `epoch`, and `head`, the JSON object of its frame
    /// without the closing brace ([`history_frame`]).
    History {
        origin: u32,
        room: Arc<str>,
        offset: u64,
        epoch: &'a str,
        head: &'a [u8],
        /// Trace id and parent span of a traced publish (a [`VERSION_TRACED`] envelope).
        trace: Option<(u128, u64)>,
    },
    /// A service's message to this node (its body is the service's own encoding).
    Service {
        origin: u32,
        service: u8,
        body: &'a [u8],
    },
}

/// Service ids of [`Inbound::Service`].
pub mod service {
    /// A call command for the node that holds the call (`calls::encode_remote`).
    pub const CALL_INPUT: u8 = 1;
    /// A call's party on this node is no longer one (`calls::encode_untrack`).
    pub const CALL_UNTRACK: u8 = 2;
    /// Close every device of a user on this node (the server API's disconnect); the body is
    /// the user id.
    pub const USER_DISCONNECT: u8 = 3;
    /// A node was reaped (the body: its id, u32 LE): calls with a party there end.
    pub const NODE_GONE: u8 = 4;
    /// The node holding a call ran a command another node forwarded (`CALL_INPUT` with an
    /// ask) and tells that node, which stops waiting (`calls::encode_held`).
    pub const CALL_HELD: u8 = 5;
}

/// The envelope of a service message from node `origin`.
pub fn encode_service(origin: u32, service: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + body.len());
    v.push(VERSION);
    v.extend_from_slice(&origin.to_le_bytes());
    v.push(KIND_SERVICE);
    v.push(service);
    v.extend_from_slice(body);
    v
}

/// The envelope of a delivery of `frame` to `target` from node `origin`.
pub fn encode(origin: u32, target: &Target, frame: &Frame) -> Vec<u8> {
    encode_traced(origin, target, frame, None)
}

/// [`encode`], carrying `trace` (trace id, the span the receiver's span is a child of) when
/// it is Some ([`VERSION_TRACED`]).
pub fn encode_traced(
    origin: u32,
    target: &Target,
    frame: &Frame,
    trace: Option<(u128, u64)>,
) -> Vec<u8> {
    let wire = frame.wire();
    let (kind, name, conn) = match target {
        Target::Room { room, .. } => (KIND_ROOM, Some(&**room), None),
        Target::User { user, .. } => (KIND_USER, Some(&**user), None),
        Target::Topic { topic, .. } => (KIND_TOPIC, Some(&**topic), None),
        Target::All => (KIND_ALL, None, None),
        Target::Conn(c) => (KIND_CONN, None, Some(*c)),
    };
    let except = target.except();
    let mut flags = 0;
    if except.is_some() {
        flags |= FLAG_EXCEPT;
    }
    if frame.is_droppable() {
        flags |= FLAG_DROPPABLE;
    }
    let name = name.map(|n| &n.as_bytes()[..n.len().min(NAME_BYTES_MAX)]);
    let mut v = Vec::with_capacity(
        7 + TRACE_BYTES + CONN_BYTES + 2 + name.map_or(0, <[u8]>::len) + wire.len(),
    );
    v.push(if trace.is_some() {
        VERSION_TRACED
    } else {
        VERSION
    });
    v.extend_from_slice(&origin.to_le_bytes());
    v.push(kind);
    v.push(flags);
    if let Some((trace_id, span_id)) = trace {
        v.extend_from_slice(&trace_id.to_le_bytes());
        v.extend_from_slice(&span_id.to_le_bytes());
    }
    if let Some(c) = except.or(conn) {
        put_conn(&mut v, c);
    }
    if let Some(n) = name {
        v.extend_from_slice(&(n.len() as u16).to_le_bytes());
        v.extend_from_slice(n);
    }
    v.extend_from_slice(wire);
    v
}

/// The part of a history envelope the origin writes; the append script adds
/// `<offset> <epoch> <head>` (see [`VERSION`]). With `trace` (a traced publish: its trace id
/// and the `redis.publish` span) it is [`VERSION_TRACED`], the trace context after the flags
/// as in a delivery envelope.
pub fn encode_history_prefix(origin: u32, room: &str, trace: Option<(u128, u64)>) -> Vec<u8> {
    let name = &room.as_bytes()[..room.len().min(NAME_BYTES_MAX)];
    let mut v = Vec::with_capacity(9 + TRACE_BYTES + name.len());
    v.push(if trace.is_some() {
        VERSION_TRACED
    } else {
        VERSION
    });
    v.extend_from_slice(&origin.to_le_bytes());
    v.push(KIND_HISTORY);
    v.push(0);
    if let Some((trace_id, span_id)) = trace {
        v.extend_from_slice(&trace_id.to_le_bytes());
        v.extend_from_slice(&span_id.to_le_bytes());
    }
    v.extend_from_slice(&(name.len() as u16).to_le_bytes());
    v.extend_from_slice(name);
    v
}

/// Longest epoch text accepted from Redis (the nodes write 16 hex digits).
pub const EPOCH_BYTES_MAX: usize = 64;

/// The frame of a history message: `head` (a JSON object without its closing brace) with
/// `,"offset":N,"epoch":"E"}` appended. Every node builds the same bytes from the same head,
/// offset and epoch, whether it came live or from the stream.
pub fn history_frame(head: &[u8], offset: u64, epoch: &str, born: u64) -> Frame {
    let mut json = Vec::with_capacity(head.len() + 48 + epoch.len());
    json.extend_from_slice(head);
    json.extend_from_slice(b",\"offset\":");
    crate::proto::json::write_u64(&mut json, offset);
    json.extend_from_slice(b",\"epoch\":");
    crate::proto::json::write_str(&mut json, epoch);
    json.push(b'}');
    Frame::text_from_json(&json, born)
}

/// A canary envelope of node `origin`.
pub fn encode_canary(origin: u32, nonce: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(15);
    v.push(VERSION);
    v.extend_from_slice(&origin.to_le_bytes());
    v.push(KIND_CANARY);
    v.push(0);
    v.extend_from_slice(&nonce.to_le_bytes());
    v
}

/// Append a connection reference (for a service body).
pub fn put_conn(v: &mut Vec<u8>, c: ConnRef) {
    v.extend_from_slice(&c.node.to_le_bytes());
    v.extend_from_slice(&c.shard.to_le_bytes());
    v.extend_from_slice(&c.slot.to_le_bytes());
    v.extend_from_slice(&c.gen.to_le_bytes());
}

/// Why an envelope was refused (counted; the sender is another node of a different version or
/// something else publishing on our channels).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// Decode an envelope. Never panics on any input.
pub fn decode(b: &[u8]) -> Result<Inbound<'_>, Malformed> {
    let mut r = Reader { b, at: 0 };
    let version = r.u8()?;
    if version != VERSION && version != VERSION_TRACED {
        return Err(Malformed("unknown envelope version"));
    }
    let origin = r.u32()?;
    let kind = r.u8()?;
    let flags = r.u8()?;
    let trace = if version == VERSION_TRACED {
        if !matches!(
            kind,
            KIND_ROOM | KIND_USER | KIND_TOPIC | KIND_ALL | KIND_CONN | KIND_HISTORY
        ) {
            return Err(Malformed("a trace context on a kind that carries none"));
        }
        // The trace id's 16 LE bytes are its low then its high 64 bits.
        let (lo, hi, span_id) = (r.u64()?, r.u64()?, r.u64()?);
        Some((u128::from(hi) << 64 | u128::from(lo), span_id))
    } else {
        None
    };
    if kind == KIND_CANARY {
        return Ok(Inbound::Canary {
            origin,
            nonce: r.u64()?,
        });
    }
    if kind == KIND_HISTORY {
        let n = r.u16()? as usize;
        let room = std::str::from_utf8(r.take(n)?)
            .map(Arc::from)
            .map_err(|_| Malformed("name is not UTF-8"))?;
        let rest = &b[r.at..];
        let (offset, rest) = split_space(rest)?;
        let (epoch, head) = split_space(rest)?;
        let offset = std::str::from_utf8(offset)
            .ok()
            .and_then(|o| o.parse::<u64>().ok())
            .ok_or(Malformed("bad offset"))?;
        let epoch = std::str::from_utf8(epoch)
            .ok()
            .filter(|e| !e.is_empty() && e.len() <= EPOCH_BYTES_MAX)
            .ok_or(Malformed("bad epoch"))?;
        if head.first() != Some(&b'{') {
            return Err(Malformed("no frame"));
        }
        return Ok(Inbound::History {
            origin,
            room,
            offset,
            epoch,
            head,
            trace,
        });
    }
    if kind == KIND_SERVICE {
        return Ok(Inbound::Service {
            origin,
            service: flags,
            body: &b[r.at..],
        });
    }
    let except = if flags & FLAG_EXCEPT != 0 || kind == KIND_CONN {
        Some(r.conn()?)
    } else {
        None
    };
    let mut name = || -> Result<Arc<str>, Malformed> {
        let n = r.u16()? as usize;
        let s = r.take(n)?;
        std::str::from_utf8(s)
            .map(Arc::from)
            .map_err(|_| Malformed("name is not UTF-8"))
    };
    let target = match kind {
        KIND_ROOM => Target::Room {
            room: name()?,
            except,
        },
        KIND_USER => Target::User {
            user: name()?,
            except,
        },
        KIND_TOPIC => Target::Topic {
            topic: name()?,
            except,
        },
        KIND_ALL => Target::All,
        KIND_CONN => Target::Conn(except.ok_or(Malformed("no connection"))?),
        _ => return Err(Malformed("unknown target kind")),
    };
    let wire = &b[r.at..];
    if wire.len() < 2 {
        return Err(Malformed("no frame"));
    }
    Ok(Inbound::Deliver {
        origin,
        target,
        droppable: flags & FLAG_DROPPABLE != 0,
        wire,
        trace,
    })
}

/// `b` split at its first space: (before, after).
fn split_space(b: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let i = b
        .iter()
        .position(|&c| c == b' ')
        .ok_or(Malformed("truncated"))?;
    Ok((&b[..i], &b[i + 1..]))
}

/// Append a length-prefixed (u32 LE) string, for a service body.
pub fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// Reads what [`put_conn`] and [`put_str`] wrote; every read checks bounds.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }

    /// A string written by [`put_str`].
    pub fn str(&mut self) -> Result<&'a str, Malformed> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| Malformed("not UTF-8"))
    }

    /// Whether everything was read.
    pub fn done(&self) -> bool {
        self.at == self.b.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).ok_or(Malformed("truncated"))?;
        let s = self.b.get(self.at..end).ok_or(Malformed("truncated"))?;
        self.at = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn conn(&mut self) -> Result<ConnRef, Malformed> {
        Ok(ConnRef {
            node: self.u32()?,
            shard: self.u16()?,
            slot: self.u32()?,
            gen: self.u32()?,
        })
    }
}

/// The channels a node must hold and the ones Redis has confirmed, with what changed since
/// the last flush. Bounded by what the node holds locally (rooms, users and topics with
/// local members, each bounded by the connection limits) plus the two fixed channels.
#[derive(Default)]
pub struct Subscriptions {
    /// Channels wanted now.
    desired: HashSet<Arc<str>>,
    /// Channels Redis has confirmed on the current subscriber connection.
    held: HashSet<Arc<str>>,
    /// Channels whose wanted state changed since the last [`Subscriptions::changes`].
    dirty: HashSet<Arc<str>>,
}

/// What to send to bring Redis in line with what is wanted.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub subscribe: Vec<Arc<str>>,
    pub unsubscribe: Vec<Arc<str>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

impl Subscriptions {
    /// Want `channel` held (`want`) or not.
    pub fn set(&mut self, channel: Arc<str>, want: bool) {
        let changed = if want {
            self.desired.insert(channel.clone())
        } else {
            self.desired.remove(&channel)
        };
        if changed {
            self.dirty.insert(channel);
        }
    }

    /// The subscriber connection was made again: Redis holds nothing; everything wanted must
    /// be subscribed again.
    pub fn reset(&mut self) {
        self.held.clear();
        self.dirty.clear();
        for c in &self.desired {
            self.dirty.insert(c.clone());
        }
    }

    /// What to subscribe and unsubscribe now (at most `max` channels of each), clearing them
    /// from the dirty set; the caller reports the outcome with [`Subscriptions::confirm`] or
    /// [`Subscriptions::failed`].
    pub fn changes(&mut self, max: usize) -> Changes {
        let mut c = Changes::default();
        let mut done = Vec::new();
        for ch in &self.dirty {
            if c.subscribe.len() >= max && c.unsubscribe.len() >= max {
                break;
            }
            let want = self.desired.contains(ch);
            let held = self.held.contains(ch);
            if want && !held {
                if c.subscribe.len() < max {
                    c.subscribe.push(ch.clone());
                    done.push(ch.clone());
                }
            } else if !want && held {
                if c.unsubscribe.len() < max {
                    c.unsubscribe.push(ch.clone());
                    done.push(ch.clone());
                }
            } else {
                done.push(ch.clone());
            }
        }
        for ch in done {
            self.dirty.remove(&ch);
        }
        c
    }

    /// Redis confirmed `c`.
    pub fn confirm(&mut self, c: &Changes) {
        for ch in &c.subscribe {
            self.held.insert(ch.clone());
        }
        for ch in &c.unsubscribe {
            self.held.remove(ch);
        }
    }

    /// `c` was not confirmed (the connection failed): it is tried again after the reconnect
    /// ([`Subscriptions::reset`] marks everything).
    pub fn failed(&mut self, c: &Changes) {
        for ch in c.subscribe.iter().chain(&c.unsubscribe) {
            self.dirty.insert(ch.clone());
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Want exactly `want` (re-read from the directory, the fixed channels included):
    /// whatever a lost report left wrong is marked to subscribe or unsubscribe. Returns how
    /// many channels were wrong.
    pub fn reconcile(&mut self, want: HashSet<Arc<str>>) -> usize {
        let mut wrong = 0;
        for ch in self.desired.symmetric_difference(&want) {
            self.dirty.insert(ch.clone());
            wrong += 1;
        }
        self.desired = want;
        wrong
    }

    /// Channels wanted now (a Redis Cluster re-routes them when slots move).
    pub fn desired(&self) -> impl Iterator<Item = &Arc<str>> {
        self.desired.iter()
    }

    /// Whether `channel` is wanted.
    pub fn wants(&self, channel: &str) -> bool {
        self.desired.contains(channel)
    }

    /// Whether Redis confirmed `channel`.
    pub fn holds(&self, channel: &str) -> bool {
        self.held.contains(channel)
    }

    /// Drop `channel` altogether without sending anything (a Redis Cluster master that lost
    /// its slot let go of it by itself; another master holds it now).
    pub fn forget(&mut self, channel: &Arc<str>) {
        self.desired.remove(channel);
        self.held.remove(channel);
        self.dirty.remove(channel);
    }

    /// Redis let go of `channel` by itself (a Redis Cluster's `sunsubscribe` push when its slot
    /// moved to another master): not held any more, and subscribed again if still wanted.
    pub fn lost(&mut self, channel: &Arc<str>) {
        self.held.remove(channel);
        if self.desired.contains(channel) {
            self.dirty.insert(channel.clone());
        }
    }

    /// Channels wanted.
    pub fn expected(&self) -> usize {
        self.desired.len()
    }

    /// Channels Redis confirmed.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// Capped exponential backoff with jitter: `BACKOFF_START`, doubling, capped at `cap`, each
/// wait drawn from its upper half (so many nodes that lost Redis together do not come back
/// in step).
pub struct Backoff {
    next: Duration,
    cap: Duration,
    seed: u64,
}

/// The first wait of [`Backoff`].
pub const BACKOFF_START: Duration = Duration::from_millis(50);

impl Backoff {
    pub fn new(cap: Duration, seed: u64) -> Backoff {
        Backoff {
            next: BACKOFF_START.min(cap),
            cap,
            seed: seed | 1,
        }
    }

    /// The wait before the next attempt.
    pub fn wait(&mut self) -> Duration {
        // xorshift64: jitter needs no quality, only to differ between nodes.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = d / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64 + 1))
    }

    /// A connection was made: start from the beginning next time.
    pub fn reset(&mut self) {
        self.next = BACKOFF_START.min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(node: u32) -> ConnRef {
        ConnRef {
            node,
            shard: 3,
            slot: 77,
            gen: 9,
        }
    }

    #[test]
    fn envelopes_round_trip_every_target() {
        let frame = Frame::text_from_json(br#"{"type":"message"}"#, 5);
        let typing = Frame::text_from_json(
            br#"{"type":"typing"}"#,
            crate::proto::envelope::droppable(5),
        );
        let targets = [
            Target::room("lobby".into()),
            Target::Room {
                room: "lobby".into(),
                except: Some(conn(1)),
            },
            Target::User {
                user: "alice".into(),
                except: None,
            },
            Target::User {
                user: "alice".into(),
                except: Some(conn(1)),
            },
            Target::Topic {
                topic: "presence:bob".into(),
                except: None,
            },
            Target::All,
            Target::Conn(conn(2)),
        ];
        for t in &targets {
            for f in [&frame, &typing] {
                // Without and with a trace context (version 2, the rest unchanged).
                let traced = Some((
                    0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                    0xb7ad_6b71_6920_3331,
                ));
                for ctx in [None, traced] {
                    let env = encode_traced(7, t, f, ctx);
                    assert_eq!(
                        env[0],
                        if ctx.is_some() {
                            VERSION_TRACED
                        } else {
                            VERSION
                        }
                    );
                    if ctx.is_none() {
                        assert_eq!(env, encode(7, t, f));
                    }
                    match decode(&env) {
                        Ok(Inbound::Deliver {
                            origin,
                            target,
                            droppable,
                            wire,
                            trace,
                        }) => {
                            assert_eq!(origin, 7);
                            assert_eq!(&target, t);
                            assert_eq!(droppable, f.is_droppable());
                            assert_eq!(wire, f.wire());
                            assert_eq!(trace, ctx);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        assert_eq!(
            decode(&encode_canary(7, 42)),
            Ok(Inbound::Canary {
                origin: 7,
                nonce: 42
            })
        );
    }

    #[test]
    fn malformed_envelopes_are_refused_never_panic() {
        let env = encode(
            7,
            &Target::User {
                user: "alice".into(),
                except: Some(conn(1)),
            },
            &Frame::text_from_json(b"{}", 0),
        );
        let traced = encode_traced(
            7,
            &Target::Room {
                room: "lobby".into(),
                except: Some(conn(1)),
            },
            &Frame::text_from_json(b"{}", 0),
            Some((1, 2)),
        );
        // Every truncation is refused or decodes to a shorter frame, and no byte flip panics.
        for env in [&env, &traced] {
            for n in 0..env.len() {
                let _ = decode(&env[..n]);
            }
            for i in 0..env.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut e = env.clone();
                    e[i] ^= x;
                    let _ = decode(&e);
                }
            }
        }
        assert_eq!(decode(&traced[..20]), Err(Malformed("truncated")));
        assert_eq!(decode(b""), Err(Malformed("truncated")));
        assert_eq!(
            decode(&[3, 0, 0, 0, 0, 0, 0]),
            Err(Malformed("unknown envelope version"))
        );
        assert_eq!(
            decode(&[VERSION_TRACED, 0, 0, 0, 0, KIND_CANARY, 0, 0, 0]),
            Err(Malformed("a trace context on a kind that carries none"))
        );
        assert_eq!(
            decode(&[VERSION, 0, 0, 0, 0, 9, 0, 0x81, 0]),
            Err(Malformed("unknown target kind"))
        );
    }

    #[test]
    fn channels_name_their_target_and_carry_a_hash_tag() {
        let c = Channels::new("sb:");
        assert_eq!(&*c.room("lobby"), "sb:{room:lobby}");
        assert_eq!(&*c.user("alice"), "sb:{user:alice}");
        assert_eq!(&*c.topic("presence:bob"), "sb:{topic:presence:bob}");
        assert_eq!(&*c.all(), "sb:{all}");
        assert_eq!(&*c.node(0xab), "sb:{node:000000ab}");
        assert_eq!(c.user_nodes("alice"), "sb:{topic:presence:alice}:nodes");
        assert_eq!(c.node_reaped(0xab), "sb:{node:000000ab}:reaped");
        assert_eq!(
            slot(c.node_reaped(0xab).as_bytes()),
            slot(c.node(0xab).as_bytes())
        );
        assert_eq!(c.node_users(0xab), "sb:{node:000000ab}:users");
        // A node's keys share its channel's slot; a user's presence set shares its watchers' channel's.
        assert_eq!(
            slot(c.node_alive(0xab).as_bytes()),
            slot(c.node(0xab).as_bytes())
        );
        assert_eq!(
            slot(c.user_nodes("alice").as_bytes()),
            slot(c.topic("presence:alice").as_bytes())
        );
        assert_eq!(c.room_present("lobby"), "sb:{room:lobby}:present");
        assert_eq!(
            slot(c.room_present("lobby").as_bytes()),
            slot(c.room("lobby").as_bytes())
        );
        assert_eq!(c.node_rooms(0xab), "sb:{node:000000ab}:rooms");
        assert_eq!(
            slot(c.node_rooms(0xab).as_bytes()),
            slot(c.node(0xab).as_bytes())
        );
        assert_eq!(c.user_record("alice"), "sb:{topic:presence:alice}:rec");
        assert_eq!(
            slot(c.user_record("alice").as_bytes()),
            slot(c.user_nodes("alice").as_bytes())
        );
        assert_eq!(c.client_msg("alice", "c-1"), "sb:{user:alice}:cm:c-1");
        assert_eq!(
            slot(c.client_msg("alice", "c-1").as_bytes()),
            slot(c.user("alice").as_bytes())
        );
        assert_eq!(c.of(&Target::Conn(conn(5)), 5), None);
        assert_eq!(
            c.of(&Target::Conn(conn(5)), 6).as_deref(),
            Some("sb:{node:00000005}")
        );
        // The room's channel and a key tagged the same way share a slot.
        assert_eq!(slot(b"sb:{room:lobby}"), slot(b"sb:{room:lobby}:h"));
        // Known slots (redis-cli CLUSTER KEYSLOT).
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
    }

    #[test]
    fn history_envelopes_carry_offset_epoch_and_head_and_keys_share_the_slot() {
        let c = Channels::new("sb:");
        assert_eq!(c.history("lobby"), "sb:{room:lobby}:h");
        assert_eq!(c.history_meta("lobby"), "sb:{room:lobby}:e");
        assert_eq!(c.history_mark("lobby", 0xab), "sb:{room:lobby}:n:000000ab");
        assert_eq!(
            slot(c.history_mark("lobby", 0xab).as_bytes()),
            slot(c.room("lobby").as_bytes())
        );
        assert_eq!(
            slot(c.history("lobby").as_bytes()),
            slot(c.room("lobby").as_bytes())
        );
        assert_eq!(
            slot(c.history_meta("lobby").as_bytes()),
            slot(c.room("lobby").as_bytes())
        );
        assert_eq!(c.room_of("sb:{room:lobby}"), Some("lobby"));
        assert_eq!(c.room_of("sb:{room:a}b}"), Some("a}b"));
        assert_eq!(c.room_of("sb:{user:lobby}"), None);
        assert_eq!(c.room_of("xx{room:lobby}"), None);

        // What the append script publishes: the prefix, then `<offset> <epoch> <head>`.
        let head = br#"{"type":"message","room":"lobby","data":{"a":" b "},"timestamp":5"#;
        let mut env = encode_history_prefix(3, "lobby", None);
        env.extend_from_slice(b"42 00ff00ff00ff00ff ");
        env.extend_from_slice(head);
        match decode(&env) {
            Ok(Inbound::History {
                origin,
                room,
                offset,
                epoch,
                head: h,
                trace,
            }) => {
                assert_eq!(
                    (origin, &*room, offset, epoch),
                    (3, "lobby", 42, "00ff00ff00ff00ff")
                );
                assert_eq!(h, head);
                assert_eq!(trace, None);
            }
            other => panic!("{other:?}"),
        }
        // A traced publish's prefix: version 2, the trace context after the flags, the rest
        // as before.
        let ctx = (
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128,
            0xb7ad_6b71_6920_3331,
        );
        let mut traced = encode_history_prefix(3, "lobby", Some(ctx));
        assert_eq!(traced[0], VERSION_TRACED);
        assert_eq!(
            traced.len(),
            encode_history_prefix(3, "lobby", None).len() + TRACE_BYTES
        );
        traced.extend_from_slice(b"42 00ff00ff00ff00ff ");
        traced.extend_from_slice(head);
        match decode(&traced) {
            Ok(Inbound::History {
                origin,
                room,
                offset,
                head: h,
                trace,
                ..
            }) => {
                assert_eq!((origin, &*room, offset, h), (3, "lobby", 42, &head[..]));
                assert_eq!(trace, Some(ctx));
            }
            other => panic!("{other:?}"),
        }
        for n in 0..traced.len() {
            let _ = decode(&traced[..n]);
        }
        let f = history_frame(head, 42, "00ff00ff00ff00ff", 0);
        let v: serde_json::Value = serde_json::from_slice(f.payload()).unwrap();
        assert_eq!(v["offset"], 42);
        assert_eq!(v["epoch"], "00ff00ff00ff00ff");
        assert_eq!(v["data"]["a"], " b ");
        assert!(f.is_text());
        // Truncated or garbled history envelopes are refused, never panic.
        for n in 0..env.len() {
            let _ = decode(&env[..n]);
        }
        let mut bad = encode_history_prefix(3, "lobby", None);
        bad.extend_from_slice(b"x1 e {}");
        assert_eq!(decode(&bad), Err(Malformed("bad offset")));
        let mut bad = encode_history_prefix(3, "lobby", None);
        bad.extend_from_slice(b"1 e nope");
        assert_eq!(decode(&bad), Err(Malformed("no frame")));
    }

    #[test]
    fn room_channels_spread_evenly_over_slots_and_masters() {
        // 100,000 room names over 3 and 16 equal masters: every master within 3 % of its share
        // (docs/CONFIG.md records the spread).
        let c = Channels::new("sb:");
        for masters in [3usize, 16] {
            let mut per = vec![0usize; masters];
            for i in 0..100_000 {
                let s = slot(c.room(&format!("room-{i}")).as_bytes()) as usize;
                per[s * masters / 16384] += 1;
            }
            let share = 100_000 / masters;
            for n in &per {
                assert!(n.abs_diff(share) * 100 < share * 3, "{masters}: {per:?}");
            }
        }
    }

    /// A `CLUSTER SLOTS` reply as Redis 7 sends it: `[start, end, [host, port, id, {}]]`.
    fn slots_reply(ranges: &[(i64, i64, &str, i64)]) -> redis::Value {
        use redis::Value;
        Value::Array(
            ranges
                .iter()
                .map(|(a, b, host, port)| {
                    Value::Array(vec![
                        Value::Int(*a),
                        Value::Int(*b),
                        Value::Array(vec![
                            Value::BulkString(host.as_bytes().to_vec()),
                            Value::Int(*port),
                            Value::BulkString(b"0123abcd".to_vec()),
                            Value::Array(vec![]),
                        ]),
                        // A replica: ignored.
                        Value::Array(vec![
                            Value::BulkString(b"10.0.0.9".to_vec()),
                            Value::Int(7000),
                            Value::BulkString(b"ffff".to_vec()),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    #[test]
    fn slot_maps_parse_cluster_slots_and_find_each_slot_master() {
        // Masters are numbered by address, whatever order the ranges come in; a master may own
        // several ranges; an empty host is the host that answered.
        let v = slots_reply(&[
            (10923, 16383, "10.0.0.3", 6379),
            (0, 5460, "10.0.0.1", 6379),
            (5461, 10000, "", 6380),
            (10001, 10922, "10.0.0.1", 6379),
        ]);
        let m = SlotMap::from_cluster_slots(&v, "10.0.0.2").unwrap();
        assert_eq!(
            m.masters(),
            ["10.0.0.1:6379", "10.0.0.2:6380", "10.0.0.3:6379"]
        );
        assert_eq!(m.covered(), 16384);
        for (slot, master) in [
            (0, 0),
            (5460, 0),
            (5461, 1),
            (10000, 1),
            (10001, 0),
            (10922, 0),
            (10923, 2),
            (16383, 2),
        ] {
            assert_eq!(m.owner(slot), Some(master), "slot {slot}");
        }
        assert_eq!(m.owner(16384), None);
        assert_eq!(m.owner_of("foo"), Some(2)); // slot 12182
                                                // Uncovered slots have no master.
        let part = SlotMap::from_cluster_slots(&slots_reply(&[(100, 200, "h", 1)]), "x").unwrap();
        assert_eq!(
            (part.owner(99), part.owner(100), part.owner(201)),
            (None, Some(0), None)
        );
        assert_eq!(part.covered(), 101);
        // Refused, never a panic: not an array, a bad range, overlapping ranges, a bad port.
        for bad in [
            redis::Value::Nil,
            slots_reply(&[(5, 4, "h", 1)]),
            slots_reply(&[(0, 10, "h", 1), (10, 20, "h", 2)]),
            slots_reply(&[(0, 10, "h", 0)]),
            slots_reply(&[(0, 16384, "h", 1)]),
            redis::Value::Array(vec![redis::Value::Array(vec![redis::Value::Int(0)])]),
        ] {
            assert!(SlotMap::from_cluster_slots(&bad, "h").is_err(), "{bad:?}");
        }
        assert_eq!(SlotMap::default().owner(0), None);
    }

    #[test]
    fn channels_are_grouped_by_the_master_of_their_slot_in_order() {
        let map = SlotMap::from_cluster_slots(
            &slots_reply(&[
                (0, 5460, "a", 1),
                (5461, 10922, "b", 1),
                (10923, 16000, "c", 1),
            ]),
            "x",
        )
        .unwrap();
        let c = Channels::new("sb:");
        let items: Vec<(Arc<str>, usize)> = (0..300)
            .map(|i| (c.room(&format!("r{i}")), i))
            .chain([("foo".into(), 1000), (c.all(), 1001)])
            .collect();
        let (per, none) = map.group(items.clone(), |(ch, _)| ch);
        assert_eq!(per.len(), 3);
        for (m, list) in per.iter().enumerate() {
            assert!(!list.is_empty());
            assert!(list.windows(2).all(|w| w[0].1 < w[1].1), "order kept");
            for (ch, _) in list {
                assert_eq!(map.owner_of(ch), Some(m));
            }
        }
        // Slots 16001-16383 have no master.
        for (ch, _) in &none {
            assert!(slot(ch.as_bytes()) > 16000, "{ch}");
        }
        assert_eq!(
            per.iter().map(Vec::len).sum::<usize>() + none.len(),
            items.len()
        );
    }

    #[test]
    fn every_master_gets_a_canary_channel_on_a_slot_it_owns() {
        let map = SlotMap::from_cluster_slots(
            &slots_reply(&[
                (0, 5460, "a", 1),
                (5461, 16382, "b", 1),
                (16383, 16383, "c", 1),
            ]),
            "x",
        )
        .unwrap();
        let mut seen = HashSet::new();
        for m in 0..3 {
            let ch = canary_channel("sb:", 0xab, &map, m).unwrap();
            assert!(ch.starts_with("sb:{canary:000000ab:"), "{ch}");
            assert_eq!(map.owner_of(&ch), Some(m), "{ch}");
            assert!(seen.insert(ch));
        }
        // Another node's canaries are its own channels.
        assert_ne!(
            canary_channel("sb:", 0xac, &map, 0),
            canary_channel("sb:", 0xab, &map, 0)
        );
        // A master with no slot gets none.
        assert_eq!(canary_channel("sb:", 0xab, &map, 3), None);
    }

    #[test]
    fn subscriptions_forget_moved_channels_and_resubscribe_lost_ones() {
        let mut s = Subscriptions::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        s.set(a.clone(), true);
        s.set(b.clone(), true);
        let c = s.changes(10);
        s.confirm(&c);
        assert!(s.holds("a") && s.wants("a"));
        // The master let go of a (its slot moved): subscribed again while wanted.
        s.lost(&a);
        assert!(!s.holds("a"));
        assert_eq!(s.changes(10).subscribe, vec![a.clone()]);
        // b moved to another master: dropped here without an unsubscribe.
        s.forget(&b);
        assert!(!s.wants("b") && !s.holds("b"));
        assert!(s.changes(10).is_empty());
        assert_eq!(s.desired().count(), 1);
        // A channel not wanted is not subscribed again when lost.
        let x: Arc<str> = "x".into();
        s.lost(&x);
        assert!(!s.has_changes());
    }

    #[test]
    fn room_spread_over_slots_and_three_masters() {
        // The numbers of docs/BENCHMARKS.md ("Hash-tag spread"): 100,000 room names over the
        // 16,384 slots and over the three masters `redis-cli --cluster create` makes.
        let map = SlotMap::from_cluster_slots(
            &slots_reply(&[
                (0, 5460, "a", 1),
                (5461, 10922, "b", 1),
                (10923, 16383, "c", 1),
            ]),
            "x",
        )
        .unwrap();
        let c = Channels::new("sb:");
        let mut per_slot = vec![0u32; 16384];
        let mut per_master = [0usize; 3];
        for i in 0..100_000 {
            let ch = c.room(&format!("room-{i}"));
            let s = slot(ch.as_bytes());
            per_slot[usize::from(s)] += 1;
            per_master[map.owner(s).unwrap()] += 1;
        }
        let used = per_slot.iter().filter(|n| **n > 0).count();
        let (min, max) = (
            per_slot.iter().min().copied().unwrap_or(0),
            per_slot.iter().max().copied().unwrap_or(0),
        );
        let share = 100_000.0 / 3.0;
        let worst = per_master
            .iter()
            .map(|n| (*n as f64 - share).abs() / share * 100.0)
            .fold(0.0, f64::max);
        println!(
            "slots used {used}/16384, per slot min {min} max {max} (mean 6.10); per master {per_master:?}, worst {worst:.2} % off its share"
        );
        assert!(used > 16_000, "{used}");
        assert!(worst < 3.0, "{per_master:?}");
    }

    #[test]
    fn subscriptions_converge_over_flushes_and_reconnects() {
        let mut s = Subscriptions::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        s.set(a.clone(), true);
        s.set(b.clone(), true);
        let c = s.changes(1);
        assert_eq!(c.subscribe.len(), 1);
        s.confirm(&c);
        let c2 = s.changes(10);
        assert_eq!(c2.subscribe.len(), 1);
        s.confirm(&c2);
        assert_eq!((s.expected(), s.held()), (2, 2));
        // Wanted then unwanted before a flush: nothing to send.
        let x: Arc<str> = "x".into();
        s.set(x.clone(), true);
        s.set(x.clone(), false);
        assert!(s.changes(10).is_empty());
        // Unwanted: unsubscribed.
        s.set(a.clone(), false);
        let c3 = s.changes(10);
        assert_eq!(c3.unsubscribe, vec![a.clone()]);
        // The connection failed before the confirmation: after the reconnect only b is sent.
        s.failed(&c3);
        s.reset();
        let c4 = s.changes(10);
        assert_eq!(c4.subscribe, vec![b.clone()]);
        assert!(c4.unsubscribe.is_empty());
        s.confirm(&c4);
        assert_eq!((s.expected(), s.held()), (1, 1));
        assert!(!s.has_changes());
        // A report lost on the way: re-reading the directory puts it right.
        let want: HashSet<Arc<str>> = ["x", "z"].into_iter().map(Arc::from).collect();
        let before: HashSet<Arc<str>> = s.desired.clone();
        let wrong = s.reconcile(want.clone());
        assert_eq!(wrong, before.symmetric_difference(&want).count());
        let c = s.changes(10);
        s.confirm(&c);
        assert_eq!(s.held, want);
        assert_eq!(s.reconcile(want), 0);
        assert!(!s.has_changes());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), 99);
        let waits: Vec<Duration> = (0..8).map(|_| b.wait()).collect();
        assert!(waits[0] >= Duration::from_millis(25) && waits[0] <= Duration::from_millis(50));
        for w in &waits[5..] {
            assert!(
                *w >= Duration::from_millis(500) && *w <= Duration::from_secs(1),
                "{w:?}"
            );
        }
        b.reset();
        assert!(b.wait() <= Duration::from_millis(50));
        let mut other = Backoff::new(Duration::from_secs(1), 100);
        let theirs: Vec<Duration> = (0..8).map(|_| other.wait()).collect();
        assert_ne!(waits, theirs);
    }

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert_eq!(
            parse_redis_urls("redis://127.0.0.1:6379", false).unwrap(),
            vec!["redis://127.0.0.1:6379"]
        );
        assert_eq!(
            parse_redis_urls("redis://a:1, redis://b:2", true)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_redis_urls("redis://a:1,redis://b:2", false)
            .unwrap_err()
            .contains("redis_cluster"));
        let e = parse_redis_urls("ftp://:hunter2@host:6380", false).unwrap_err();
        assert!(e.contains("rediss://") && !e.contains("hunter2"), "{e}");
        let e = parse_redis_urls("http://:hunter2@host", false).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://<redacted>@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn rediss_urls_are_accepted_and_say_how_they_verify() {
        let one = parse_redis_urls("rediss://:hunter2@cache.example:6380/2", false).unwrap();
        assert_eq!(url_tls(&one), UrlTls::Verified);
        let insecure = parse_redis_urls("rediss://127.0.0.1:6380#insecure", false).unwrap();
        assert_eq!(url_tls(&insecure), UrlTls::Insecure);
        assert_eq!(
            url_tls(&parse_redis_urls("redis://h:1", false).unwrap()),
            UrlTls::Plain
        );
        // A cluster's seeds, all TLS.
        let seeds = parse_redis_urls("rediss://a:1, rediss://b:2", true).unwrap();
        assert_eq!(url_tls(&seeds), UrlTls::Verified);
        // The crate takes #insecure as the only fragment.
        let e = parse_redis_urls("rediss://:hunter2@h:1#verify", false).unwrap_err();
        assert!(e.contains("insecure") && !e.contains("hunter2"), "{e}");
        assert_eq!(
            redact("rediss://:pw@h:1#insecure"),
            "rediss://<redacted>@h:1#insecure"
        );
        assert_eq!(redact("rediss://user:p@ss@h:1"), "rediss://<redacted>@h:1");
    }

    #[test]
    fn a_seed_list_mixing_tls_and_plain_is_refused_without_its_passwords() {
        for list in [
            "rediss://:hunter2@a:1,redis://:hunter2@b:2",
            "redis://:hunter2@a:1,rediss://:hunter2@b:2",
            "rediss://:hunter2@a:1,rediss://:hunter2@b:2#insecure",
        ] {
            let e = parse_redis_urls(list, true).unwrap_err();
            assert!(
                e.contains("every seed") && !e.contains("hunter2"),
                "{list}: {e}"
            );
        }
    }
}
