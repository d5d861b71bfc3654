//! Rooms: `subscribe`, `unsubscribe`, `publish`, `broadcast` (PROTOCOL.md section 2), and the
//! per-room sequencer.
//!
//! State: the shard's [`crate::route::RoomTable`] (room -> local members) and, per connection,
//! its memberships inline in `Client::rooms` (8 B per room: this state is on every idle
//! subscribed connection, the memory product, so it is not moved to a side table). Node-wide:
//! the directory's room entry (shards with members, member count for capacity).
//!
//! Order: publishes from two shards into one room could interleave differently on each shard.
//! Sequenced rooms (options `ordered`, history or room presence; see [`crate::room_options`])
//! have one owner shard on the node (a fixed hash of the name):
//! a publish on another shard is handed to the owner ([`Msg::Sequence`]), which encodes it and
//! delivers it to every shard, so every subscriber on every shard sees one order. Other rooms
//! keep the direct path with no extra hop.
//!
//! History (rooms with `history_size` > 0): the owner assigns each message its `offset` and
//! keeps it ([`super::history::Store`]). A subscribe to such a room on another shard asks the
//! owner ([`Msg::Resume`]): the owner answers in its sequence order with the room's position
//! and, given `since`, the missed messages ([`Msg::Resumed`]); the asking shard joins the
//! connection only then, queues the missed messages and then `subscribed`. Messages the owner
//! sequences after answering reach that shard after the answer (one sender, one FIFO inbox),
//! and its directory bit is set before it asks, so the connection misses nothing and gets
//! nothing twice.
//!
//! **In a cluster** (`redis_url` set) Redis sequences the messages of rooms with history
//! ([`crate::bridge::redis::history`]): the owner encodes the frame's head once and hands it
//! to the bridge ([`HistoryJob::Append`]); the offset and epoch come back on the room's
//! channel, to every node's owner shard ([`Msg::Clustered`]), which drops what it delivered
//! already, keeps the message in the node's cache and delivers it to the node's subscribers.
//! A resume goes to the owner as on one node; the owner answers from its cache when it is
//! current ([`super::history::Store::current`]), and otherwise asks the bridge for a stream
//! read ([`HistoryJob::Read`]), one per room at a time, shared by every resume it covers
//! ([`super::history::Resumes`]). A message Redis never saw (or refused, or that the bridge
//! gave up retrying after Redis did not answer) comes back ([`Msg::Fallback`]) and is
//! sequenced here under a node-local epoch. (A message Redis did not answer in time is sent
//! again by the bridge, idempotently, not handed back: it may have run.)

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use serde::Deserialize;
use sonic_rs::LazyValue;

use super::{parse, Cmd};
use crate::bridge::redis::history::HistoryJob;
use crate::bridge::BridgeMsg;
use crate::directory::Transition;
use crate::metrics::ErrorReason;
use crate::proto::envelope::{non_empty, raw_or_null};
use crate::proto::Frame;
use crate::route::{ConnRef, Membership, RoomId, Target};
use crate::shard::{Phase, Shard};

/// Per-shard state of the rooms service.
#[derive(Default)]
pub struct State {
    /// room -> local members.
    pub table: crate::route::RoomTable,
    /// History of the rooms this shard owns.
    pub history: History,
    /// Subscribes waiting for the owner's answer, per room (the shard's directory bit for the
    /// room is held for them) and per connection (counted against max_rooms_per_connection).
    pending_rooms: HashMap<Arc<str>, u32>,
    pending_conns: HashMap<(u32, u32), u32>,
    /// Rooms whose directory bit this shard set for a pending subscribe before it had a member.
    pre_arrived: HashSet<Arc<str>>,
    /// Answers to other shards' subscribes that found their inbox full, retried in order every
    /// tick: a lost answer would leave the subscriber unanswered and its shard's pending state
    /// behind for good. Bounded by [`RESUME_ANSWERS_OWED_MAX`].
    owed: std::collections::VecDeque<(usize, crate::shard::ShardMsg)>,
    retry_scheduled: bool,
    /// Cluster: resumes waiting for a stream read of a room this shard owns.
    resumes: super::history::Resumes<Waiter>,
    reads_sweep_scheduled: bool,
}

/// Cluster: a subscribe to a room with history waiting on its owner for a stream read.
pub struct Waiter {
    room: Arc<str>,
    opts: u16,
    since: Option<(u64, Box<str>)>,
    conn: ConnRef,
    id: Option<Box<str>>,
    count: u32,
}

/// The rooms timer key of the sweep of late stream reads (key 0 is the answers' retry).
const KEY_READS_SWEEP: u64 = 1;

/// Subscribe answers one shard keeps for retry while the asking shard's inbox is full; past
/// it an answer is dropped and counted (`switchboard_cross_shard_dropped_total`).
pub const RESUME_ANSWERS_OWED_MAX: usize = 65_536;

/// The history store, created on first use with the shard's share of `history_bytes_max`.
#[derive(Default)]
pub struct History(Option<super::history::Store>);

/// A server API publish waiting for the owner: where its HTTP response goes.
pub struct ApiReply {
    pub conn: ConnRef,
    pub keep_alive: bool,
    /// The request's `Origin` when `cors_origins` allows it (the answer carries it).
    pub cors_origin: Option<Box<str>>,
}

/// Rooms messages between shards.
pub enum Msg {
    /// A publish into a sequenced room, for its owner shard to encode and deliver.
    Sequence {
        room: Arc<str>,
        opts: u16,
        client_id: u128,
        user: Option<Arc<str>>,
        data: Box<str>,
        /// The frame `type` (`message` for clients; the server API may set another).
        kind: Box<str>,
        /// Set for a server API publish: the owner answers its HTTP request.
        api: Option<ApiReply>,
        /// The publish's span when it is traced: the owner's delivery, and the hand-off to
        /// the bridge, continue it.
        trace: Option<Box<tracing::Span>>,
    },
    /// A subscribe to a room with history on another shard: the position, and what was
    /// missed since `since`, please.
    Resume {
        room: Arc<str>,
        opts: u16,
        since: Option<(u64, Box<str>)>,
        conn: ConnRef,
        id: Option<Box<str>>,
        count: u32,
    },
    /// The owner's answer to [`Msg::Resume`].
    Resumed {
        room: Arc<str>,
        opts: u16,
        conn: ConnRef,
        id: Option<Box<str>>,
        count: u32,
        position: super::history::Position,
        /// `Some` when the subscribe asked to recover; the frames are what it missed.
        recovered: Option<bool>,
        frames: Vec<Frame>,
    },
    /// Cluster, from the bridge: a message of a room with history, sequenced by Redis
    /// (`tag`, `gen`: the subscription and view it was heard under).
    Clustered {
        room: Arc<str>,
        opts: u16,
        offset: u64,
        epoch: Box<str>,
        frame: Frame,
        tag: u64,
        gen: u64,
        /// A traced publish's `shard.deliver` span on this node (the owner's delivery).
        trace: Option<Box<tracing::Span>>,
    },
    /// Cluster, from the bridge: the tag of the room channel's subscription now (0: not
    /// held).
    Hold { room: Arc<str>, tag: u64 },
    /// Cluster, from the bridge: Redis did not sequence this message (never sent, refused,
    /// or given up after its retries); sequence it here.
    Fallback {
        room: Arc<str>,
        opts: u16,
        head: Box<[u8]>,
        api: Option<ApiReply>,
    },
    /// Cluster, from the bridge: a stream read finished (`None`: Redis unavailable).
    Read {
        room: Arc<str>,
        tag: u64,
        gen: u64,
        snap: Option<super::history::Snapshot>,
    },
}

#[derive(Deserialize)]
struct RoomCmd<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    since: Option<Since<'a>>,
    /// A publish's trace context (W3C `traceparent`), continued when tracing is on.
    #[serde(borrow, default)]
    traceparent: Option<Cow<'a, str>>,
}

/// `since: {offset, epoch}` of a resuming subscribe.
#[derive(Deserialize)]
struct Since<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

/// Longest `epoch` accepted in `since` (epochs are 16 hex characters).
const EPOCH_BYTES_MAX: usize = 64;

/// The `client_id` of messages published through the server API (the nil UUID).
pub const API_CLIENT_ID: u128 = 0;

#[derive(Deserialize)]
struct DataCmd<'a> {
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
}

/// The owner shard of an ordered room: a fixed hash (the same on every shard and run).
pub fn owner(room: &str, shards: usize) -> usize {
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(room);
    (h % shards.max(1) as u64) as usize
}

pub fn subscribe(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<RoomCmd>(sh, slot, cmd) else {
        return;
    };
    let since = match &c.since {
        Some(s) if s.epoch.len() > EPOCH_BYTES_MAX => {
            sh.send_error(
                slot,
                ErrorReason::BadRequest,
                cmd.id,
                "epoch too long",
                None,
            );
            return;
        }
        Some(s) => Some((s.offset, &*s.epoch)),
        None => None,
    };
    if let Some(room) = valid_room(sh, slot, non_empty(&c.room), cmd.id) {
        join(sh, slot, room, cmd.id, since);
    }
}

pub fn unsubscribe(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<RoomCmd>(sh, slot, cmd) else {
        return;
    };
    let Some(room) = valid_room(sh, slot, non_empty(&c.room), cmd.id) else {
        return;
    };
    let Some((idx, _)) = subscribed_to(sh, slot, room, cmd.id) else {
        return;
    };
    let m = sh.clients[slot as usize].rooms.swap_remove(idx);
    leave(sh, slot, m);
    send_unsubscribed(sh, slot, room, cmd.id);
}

fn send_unsubscribed(sh: &mut Shard, slot: u32, room: &str, id: Option<&str>) {
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "unsubscribed")
            .id(id)
            .str("room", room)
            .obj("data", |d| {
                d.str("room", room);
            })
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

pub fn publish(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<RoomCmd>(sh, slot, cmd) else {
        return;
    };
    let id = cmd.id;
    let Some(room) = valid_room(sh, slot, non_empty(&c.room), id) else {
        return;
    };
    let Some((_, rid)) = subscribed_to(sh, slot, room, id) else {
        return;
    };
    let client = &sh.clients[slot as usize];
    // A refreshed token may have narrowed the rooms claim since the subscribe.
    if !client.allows_room(room) {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    }
    let (client_id, user) = (client.uuid(), client.user.clone());
    let name = sh.svc.rooms.table.name_of(rid).clone();
    let opts = sh.svc.rooms.table.room(rid).opts;
    sh.out.stats.publishes += 1;
    // Traced (when sampled): the local fan-out and the hand-off to the other shards and the
    // bridge, whose `redis.publish` (and the other nodes' `redis.receive`) are its children.
    // Never per recipient. With tracing off: one atomic load.
    let span = crate::root_span!(
        crate::trace::root_for_field(c.traceparent.as_deref()),
        "room.publish",
        otel.kind = "server",
        shard = sh.id as u64,
        messaging.destination.name = &*name,
        enduser.id = user.as_deref().unwrap_or(""),
    );
    let _entered = span.enter();
    let data = raw_or_null(&c.data);
    if let Routed::Busy = route_publish(sh, name, opts, client_id, user, data, "message", None) {
        sh.send_error(
            slot,
            ErrorReason::Busy,
            id,
            "server busy, retry later",
            None,
        );
    }
}

/// Where a publish went.
pub enum Routed {
    /// Ordered and delivered here; the position where the room has history.
    Here(Option<super::history::Position>),
    /// Handed to the room's owner shard (which answers a server API publish itself).
    Owner,
    /// The owner's inbox was full: nothing was published.
    Busy,
}

/// Publish into `room` from this shard: directly, or through the room's owner when it is
/// sequenced. With `api` set and the owner elsewhere, the owner answers the HTTP request.
#[allow(clippy::too_many_arguments)]
fn route_publish(
    sh: &mut Shard,
    room: Arc<str>,
    opts: u16,
    client_id: u128,
    user: Option<Arc<str>>,
    data: &str,
    kind: &str,
    api: Option<ApiReply>,
) -> Routed {
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    if options.sequenced() {
        let own = owner(&room, sh.node.inboxes.len());
        if own != sh.id {
            let msg = crate::shard::ShardMsg::service(super::ServiceMsg::Rooms(Msg::Sequence {
                room,
                opts,
                client_id,
                user,
                data: data.into(),
                kind: kind.into(),
                api,
                trace: crate::trace::current_traced(),
            }));
            return if sh.node.inboxes.send(own, msg).is_ok() {
                sh.out.stats.cross_shard_sent += 1;
                Routed::Owner
            } else {
                sh.out.stats.cross_shard_dropped += 1;
                Routed::Busy
            };
        }
    }
    if clustered_history(sh, opts) {
        cluster_append(sh, room, opts, client_id, user.as_deref(), data, kind, api);
        return Routed::Owner;
    }
    Routed::Here(sequence(
        sh,
        room,
        opts,
        client_id,
        user.as_deref(),
        data,
        kind,
    ))
}

/// Whether rooms with options `opts` are sequenced by Redis (clustered, with history).
fn clustered_history(sh: &Shard, opts: u16) -> bool {
    sh.node.clustered && crate::room_options::at(&sh.node.cfg.rooms, opts).history_size > 0
}

/// Cluster: hand a message of a room with history to Redis (through the bridge), or
/// sequence it here when the bridge cannot take it.
#[allow(clippy::too_many_arguments)]
fn cluster_append(
    sh: &mut Shard,
    room: Arc<str>,
    opts: u16,
    client_id: u128,
    user: Option<&str>,
    data: &str,
    kind: &str,
    api: Option<ApiReply>,
) {
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    let (size, ttl_ms) = (options.history_size, options.history_ttl.as_millis() as u64);
    let f = encode_message(sh, Some(&room), data, client_id, user, None, kind);
    let json = f.payload();
    // The head: the object without its closing brace (offset and epoch go after it).
    let head: Box<[u8]> = json[..json.len() - 1].into();
    let restart = history(sh).take_diverged(&room);
    let job = HistoryJob::Append {
        room,
        opts,
        size,
        ttl_ms,
        head,
        restart,
        owner: sh.id,
        api,
        trace: crate::trace::current_traced(),
    };
    if let Err(e) = sh
        .node
        .bridge_tx
        .try_send(BridgeMsg::History(Box::new(job)))
    {
        sh.out.stats.bridge_dropped += 1;
        if let BridgeMsg::History(job) = e.into_inner() {
            if let HistoryJob::Append {
                room,
                opts,
                head,
                api,
                ..
            } = *job
            {
                sequence_here(sh, room, opts, &head, api);
            }
        }
    }
}

/// Cluster: sequence a message on this node under a node-local epoch (Redis could not), and
/// deliver it to this node's subscribers only.
fn sequence_here(sh: &mut Shard, room: Arc<str>, opts: u16, head: &[u8], api: Option<ApiReply>) {
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    let (size, ttl_ms) = (options.history_size, options.history_ttl.as_millis() as u64);
    let (now_ms, now_us) = (sh.now_ms, sh.now_us);
    let store = history(sh);
    store.to_local(&room, true);
    let (offset, epoch) = store.next_offset(&room);
    let f = crate::cluster::history_frame(head, offset, &epoch, now_us);
    let trimmed = store.trimmed;
    store.append(&room, offset, now_ms, f.clone(), size, ttl_ms);
    let newly = store.trimmed - trimmed;
    sh.out.stats.history_trimmed += newly;
    sh.out.stats.history_appended += 1;
    sh.node
        .redis_stats
        .history_local
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sh.deliver_node(&Target::room(room), &f);
    if let Some(api) = api {
        answer_api(sh, &api, Some(&super::history::Position { offset, epoch }));
    }
}

/// Encode and deliver a publish on the shard that orders it (the owner of a sequenced room, or
/// any shard for the others): with history, assign the offset and keep the frame.
fn sequence(
    sh: &mut Shard,
    room: Arc<str>,
    opts: u16,
    client_id: u128,
    user: Option<&str>,
    data: &str,
    kind: &str,
) -> Option<super::history::Position> {
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    let (size, ttl_ms) = (options.history_size, options.history_ttl.as_millis() as u64);
    let position = (size > 0).then(|| {
        let (offset, epoch) = history(sh).next_offset(&room);
        super::history::Position { offset, epoch }
    });
    let offset = position.as_ref().map(|p| p.offset);
    let f = encode_message(sh, Some(&room), data, client_id, user, offset, kind);
    if let Some(offset) = offset {
        let now_ms = sh.now_ms;
        let store = history(sh);
        let trimmed = store.trimmed;
        store.append(&room, offset, now_ms, f.clone(), size, ttl_ms);
        let newly = store.trimmed - trimmed;
        sh.out.stats.history_trimmed += newly;
        sh.out.stats.history_appended += 1;
    }
    sh.deliver(&Target::room(room), &f);
    position
}

/// This shard's history store (created with its share of `history_bytes_max`).
fn history(sh: &mut Shard) -> &mut super::history::Store {
    let shards = sh.node.inboxes.len().max(1);
    let budget = sh.node.cfg.history_bytes_max / shards;
    sh.svc
        .rooms
        .history
        .0
        .get_or_insert_with(|| super::history::Store::new(budget))
}

/// The body of a server API publish's answer: `{"ok":true}`, with `offset` and `epoch` in a
/// room with history.
pub fn api_body(position: Option<&super::history::Position>) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    body.extend_from_slice(b"{\"ok\":true");
    if let Some(p) = position {
        body.extend_from_slice(b",\"offset\":");
        crate::proto::json::write_u64(&mut body, p.offset);
        body.extend_from_slice(b",\"epoch\":");
        crate::proto::json::write_str(&mut body, &p.epoch);
    }
    body.push(b'}');
    body
}

/// The HTTP answer to a server API publish (also built by the bridge, when Redis gave the
/// offset).
pub fn api_answer_frame(
    api: &ApiReply,
    position: Option<&super::history::Position>,
    now_us: u64,
) -> Frame {
    let body = api_body(position);
    let mut r = crate::http::Response::new(crate::http::Status::OK, "application/json", &body);
    r.keep_alive = api.keep_alive;
    if let Some(o) = api.cors_origin.as_deref() {
        r.cors = crate::http::CorsHeaders::Origin(o);
    }
    Frame::from_wire(&r.to_vec(), now_us)
}

/// Answer a server API publish that waited for this (owner) shard.
fn answer_api(sh: &mut Shard, api: &ApiReply, position: Option<&super::history::Position>) {
    let f = api_answer_frame(api, position, sh.now_us);
    // Through the retry queue, not a plain delivery: a lost answer would leave the HTTP
    // client waiting until its keep-alive timeout for a publish that happened.
    let msg = crate::shard::ShardMsg::Deliver {
        target: Target::Conn(api.conn),
        frame: f,
    };
    owe_or_send_msg(sh, api.conn.shard as usize, msg);
}

/// A server API publish (`POST /api/publish`) from the HTTP connection `slot`: the frame
/// a client publish makes (with `client_id` [`API_CLIENT_ID`] and `type` `kind`), taking part
/// in history. The HTTP response (with the offset and epoch where the room has history) is
/// delivered to the connection when the room's order is decided, here or on its owner.
pub fn api_publish(
    sh: &mut Shard,
    slot: u32,
    room: &str,
    data: &str,
    kind: &str,
    keep_alive: bool,
    cors_origin: Option<&str>,
) -> Routed {
    let name: Arc<str> = match sh.svc.rooms.table.lookup(room) {
        Some(rid) => sh.svc.rooms.table.name_of(rid).clone(),
        None => Arc::from(room),
    };
    let opts = crate::room_options::index_for(&sh.node.cfg.rooms, room);
    sh.out.stats.publishes += 1;
    let api = ApiReply {
        conn: sh.conn_ref(slot),
        keep_alive,
        cors_origin: cors_origin.map(Into::into),
    };
    route_publish(sh, name, opts, API_CLIENT_ID, None, data, kind, Some(api))
}

/// The `message` frame of a publish (`room` set) or a broadcast; `offset` in rooms with
/// history; `kind` is the frame type (`message` but for the server API's own types).
pub fn encode_message(
    sh: &mut Shard,
    room: Option<&str>,
    data: &str,
    client_id: u128,
    user: Option<&str>,
    offset: Option<u64>,
    kind: &str,
) -> Frame {
    let now_ms = sh.now_ms;
    sh.fb.text(sh.now_us, |o| {
        o.str("type", kind);
        if let Some(room) = room {
            o.str("room", room);
        }
        o.raw("data", data).uuid("client_id", client_id);
        if let Some(u) = user {
            o.str("user_id", u);
        }
        if let Some(offset) = offset {
            o.u64("offset", offset);
        }
        o.u64("timestamp", now_ms);
    })
}

pub fn broadcast(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<DataCmd>(sh, slot, cmd) else {
        return;
    };
    let client = &sh.clients[slot as usize];
    if !(sh.node.cfg.allow_client_broadcast || client.is_admin()) {
        sh.send_error(slot, ErrorReason::NotAllowed, cmd.id, "not allowed", None);
        return;
    }
    let (client_id, user) = (client.uuid(), client.user.clone());
    let f = encode_message(
        sh,
        None,
        raw_or_null(&c.data),
        client_id,
        user.as_deref(),
        None,
        "message",
    );
    sh.out.stats.broadcasts += 1;
    sh.deliver(&Target::All, &f);
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Sequence {
            room,
            opts,
            client_id,
            user,
            data,
            kind,
            api,
            trace,
        } => {
            // The publisher's span, when traced, goes on here (the owner's fan-out, the
            // append through Redis).
            let _entered = trace.as_deref().map(tracing::Span::enter);
            if clustered_history(sh, opts) {
                cluster_append(
                    sh,
                    room,
                    opts,
                    client_id,
                    user.as_deref(),
                    &data,
                    &kind,
                    api,
                );
                return;
            }
            let position = sequence(sh, room, opts, client_id, user.as_deref(), &data, &kind);
            if let Some(api) = api {
                answer_api(sh, &api, position.as_ref());
            }
        }
        Msg::Resume {
            room,
            opts,
            since,
            conn,
            id,
            count,
        } if sh.node.clustered => cluster_resume(
            sh,
            Waiter {
                room,
                opts,
                since,
                conn,
                id,
                count,
            },
        ),
        Msg::Resume {
            room,
            opts,
            since,
            conn,
            id,
            count,
        } => {
            let (position, recovered, frames) =
                recover(sh, &room, opts, since.as_ref().map(|(o, e)| (*o, &**e)));
            let answer = Msg::Resumed {
                room,
                opts,
                conn,
                id,
                count,
                position,
                recovered,
                frames,
            };
            owe_or_send(sh, conn.shard as usize, answer);
        }
        Msg::Resumed {
            room,
            opts,
            conn,
            id,
            count,
            position,
            recovered,
            frames,
        } => resumed(sh, room, opts, conn, id, count, position, recovered, frames),
        Msg::Clustered {
            room,
            opts,
            offset,
            epoch,
            frame,
            tag,
            gen,
            trace,
        } => match trace {
            None => clustered(sh, room, opts, offset, &epoch, frame, tag, gen),
            Some(span) => {
                {
                    let _entered = span.enter();
                    clustered(sh, room, opts, offset, &epoch, frame, tag, gen);
                }
                // Ended with the turn, after its socket writes (as a bridge delivery's).
                sh.traced.push(*span);
            }
        },
        Msg::Hold { room, tag } => history(sh).set_hold(&room, tag),
        Msg::Fallback {
            room,
            opts,
            head,
            api,
        } => sequence_here(sh, room, opts, &head, api),
        Msg::Read {
            room,
            tag,
            gen,
            snap,
        } => read_done(sh, room, tag, gen, snap),
    }
}

/// The options index of `room` (from the room table when the shard has it).
fn opts_of(sh: &Shard, room: &str) -> u16 {
    match sh.svc.rooms.table.lookup(room) {
        Some(rid) => sh.svc.rooms.table.room(rid).opts,
        None => crate::room_options::index_for(&sh.node.cfg.rooms, room),
    }
}

fn history_bounds(sh: &Shard, opts: u16) -> (u32, u64) {
    let o = crate::room_options::at(&sh.node.cfg.rooms, opts);
    (o.history_size, o.history_ttl.as_millis() as u64)
}

fn view_gen(sh: &Shard) -> u64 {
    sh.node
        .redis_stats
        .history_gen
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn count(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Cluster, on the owner: a message Redis sequenced, heard by this node: keep and deliver it
/// here unless it was delivered already.
#[allow(clippy::too_many_arguments)]
fn clustered(
    sh: &mut Shard,
    room: Arc<str>,
    opts: u16,
    offset: u64,
    epoch: &str,
    frame: Frame,
    tag: u64,
    gen: u64,
) {
    let (size, ttl_ms) = history_bounds(sh, opts);
    if size == 0 {
        return;
    }
    let now_ms = sh.now_ms;
    let store = history(sh);
    let trimmed = store.trimmed;
    let mut gap = false;
    let new = store.observe(
        &room,
        epoch,
        offset,
        now_ms,
        frame.clone(),
        size,
        ttl_ms,
        tag,
        gen,
        &mut gap,
    );
    let newly = store.trimmed - trimmed;
    sh.out.stats.history_trimmed += newly;
    if gap {
        count(&sh.node.redis_stats.history_gaps, 1);
    }
    if new {
        sh.out.stats.history_appended += 1;
        sh.deliver_node(&Target::room(room), &frame);
    }
}

/// What an owner answers a resume with: the position, `recovered` when it asked, the frames.
type Answer = (super::history::Position, Option<bool>, Vec<Frame>);

/// Cluster: the answer the owner's cache gives now, when it can (otherwise a stream read).
fn answer_here(sh: &mut Shard, w: &Waiter) -> Option<Answer> {
    use super::history::Mode;
    let (size, ttl_ms) = history_bounds(sh, w.opts);
    let (gen, now_ms) = (view_gen(sh), sh.now_ms);
    let store = history(sh);
    let since = w.since.as_ref().map(|(o, e)| (*o, &**e));
    match store.mode(&w.room) {
        Some(Mode::Cluster) if store.current(&w.room, gen) => {
            let position = store.peek(&w.room)?;
            let Some((offset, epoch)) = since else {
                return Some((position, None, Vec::new()));
            };
            if epoch != position.epoch {
                // Another history: nothing to recover, whatever Redis holds of this one.
                return Some((position, Some(false), Vec::new()));
            }
            let r = store.since(&w.room, offset, epoch, size, ttl_ms, now_ms);
            // Not kept here (older, or ahead of what arrived yet): the stream may have it.
            r.recovered.then_some((r.position, Some(true), r.frames))
        }
        Some(Mode::Local) => {
            let (offset, epoch) = since?;
            let position = store.peek(&w.room)?;
            if epoch != position.epoch {
                return None;
            }
            let r = store.since(&w.room, offset, epoch, size, ttl_ms, now_ms);
            Some((r.position, Some(r.recovered), r.frames))
        }
        _ => None,
    }
}

/// Cluster, on the owner: a subscribe to a room with history.
fn cluster_resume(sh: &mut Shard, w: Waiter) {
    if let Some(a) = answer_here(sh, &w) {
        if w.since.is_some() {
            count(&sh.node.redis_stats.history_resumes_local, 1);
        }
        answer(sh, w, a);
        return;
    }
    let room = w.room.clone();
    let opts = w.opts;
    let since = w.since.as_ref().map(|(o, _)| *o);
    let now_ms = sh.now_ms;
    match sh.svc.rooms.resumes.wait(&room, since, w, now_ms) {
        Ok(Some(req)) => {
            send_read(sh, room, opts, req.from);
            schedule_reads_sweep(sh);
        }
        Ok(None) => count(&sh.node.redis_stats.history_resumes_shared, 1),
        Err(w) => {
            // The table is full: nothing to replay, and the position this node knows.
            sh.out.stats.cross_shard_dropped += 1;
            let position = history(sh)
                .peek(&w.room)
                .unwrap_or(super::history::Position {
                    offset: 0,
                    epoch: String::new(),
                });
            let recovered = w.since.as_ref().map(|_| false);
            answer(sh, w, (position, recovered, Vec::new()));
        }
    }
}

/// Ask the bridge for a stream read of `room` from `from` (`None`: the position; then from
/// the node's own next offset, so a node behind gets what it missed).
fn send_read(sh: &mut Shard, room: Arc<str>, opts: u16, from: Option<u64>) {
    let (size, ttl_ms) = history_bounds(sh, opts);
    let from = from.or_else(|| {
        let store = history(sh);
        (store.mode(&room) == Some(super::history::Mode::Cluster))
            .then(|| store.peek(&room).map(|p| p.offset + 1))
            .flatten()
    });
    let job = HistoryJob::Read {
        room: room.clone(),
        owner: sh.id,
        from,
        size,
        ttl_ms,
    };
    if sh
        .node
        .bridge_tx
        .try_send(BridgeMsg::History(Box::new(job)))
        .is_err()
    {
        sh.out.stats.bridge_dropped += 1;
        read_done(sh, room, 0, 0, None);
    }
}

/// Cluster, on the owner: a stream read of `room` finished.
fn read_done(
    sh: &mut Shard,
    room: Arc<str>,
    tag: u64,
    gen: u64,
    snap: Option<super::history::Snapshot>,
) {
    use super::history::Mode;
    let opts = opts_of(sh, &room);
    let (size, ttl_ms) = history_bounds(sh, opts);
    let now_ms = sh.now_ms;
    let Some(snap) = snap else {
        // Redis unavailable: answer from what this node has. A room that is not the
        // cluster's here continues under a node-local epoch.
        let waiters = sh.svc.rooms.resumes.abandon(&room);
        let store = history(sh);
        if store.mode(&room) != Some(Mode::Cluster) {
            store.to_local(&room, false);
        }
        for w in waiters {
            let a = answer_here(sh, &w).unwrap_or_else(|| {
                let position = history(sh).position(&w.room);
                (position, w.since.as_ref().map(|_| false), Vec::new())
            });
            answer(sh, w, a);
        }
        return;
    };
    let (epoch, last) = (snap.epoch.clone(), snap.last);
    // Usable only if taken under the subscription held now, with nothing lost since: then
    // every message after it reaches this node live.
    let usable = tag != 0 && gen == view_gen(sh) && history(sh).holding(&room) == tag;
    let merged = if usable {
        let store = history(sh);
        let trimmed = store.trimmed;
        let r = store.merge(&room, snap, tag, gen, size, ttl_ms, now_ms);
        let newly = store.trimmed - trimmed;
        sh.out.stats.history_trimmed += newly;
        r.ok()
    } else {
        None
    };
    let Some(fresh) = merged else {
        let d = sh.svc.rooms.resumes.done(&room, true, now_ms);
        if d.attempts >= super::history::READ_ATTEMPTS_MAX {
            let waiters = sh.svc.rooms.resumes.abandon(&room);
            for w in waiters {
                let position = super::history::Position {
                    offset: last,
                    epoch: epoch.clone(),
                };
                let recovered = w.since.as_ref().map(|_| false);
                answer(sh, w, (position, recovered, Vec::new()));
            }
        } else if let Some(req) = d.next {
            send_read(sh, room, opts, req.from);
        }
        return;
    };
    // What the node had not delivered yet (lost on the way, or still on its way).
    let target = Target::room(room.clone());
    for f in &fresh {
        sh.deliver_node(&target, f);
    }
    let d = sh.svc.rooms.resumes.done(&room, false, now_ms);
    for w in d.covered {
        let store = history(sh);
        let a = match &w.since {
            None => (store.position(&w.room), None, Vec::new()),
            Some((offset, e)) => {
                let r = store.since(&w.room, *offset, e, size, ttl_ms, now_ms);
                (r.position, Some(r.recovered), r.frames)
            }
        };
        if w.since.is_some() {
            count(&sh.node.redis_stats.history_resumes_read, 1);
        }
        answer(sh, w, a);
    }
    if let Some(req) = d.next {
        send_read(sh, room, opts, req.from);
    }
}

/// Send a resume's answer to the shard of its connection (this one: at once).
fn answer(sh: &mut Shard, w: Waiter, (position, recovered, frames): Answer) {
    if w.conn.shard as usize == sh.id {
        resumed(
            sh, w.room, w.opts, w.conn, w.id, w.count, position, recovered, frames,
        );
        return;
    }
    let shard = w.conn.shard as usize;
    owe_or_send(
        sh,
        shard,
        Msg::Resumed {
            room: w.room,
            opts: w.opts,
            conn: w.conn,
            id: w.id,
            count: w.count,
            position,
            recovered,
            frames,
        },
    );
}

fn schedule_reads_sweep(sh: &mut Shard) {
    if !sh.svc.rooms.reads_sweep_scheduled {
        sh.svc.rooms.reads_sweep_scheduled = true;
        let next = sh.now_tick + crate::shard::ticks(sh.node.cfg.redis_timeout);
        sh.schedule_service(next, super::id::ROOMS, KEY_READS_SWEEP);
    }
}

/// How long an owner waits for a stream read before answering from what it has: the bridge
/// parks a read up to `redis_timeout` for the subscription and gives Redis as long again.
fn read_deadline_ms(sh: &Shard) -> u64 {
    3 * sh.node.cfg.redis_timeout.as_millis() as u64
}

/// The sweep of reads that never came back (a message lost between bridge and shard).
fn sweep_reads(sh: &mut Shard) {
    sh.svc.rooms.reads_sweep_scheduled = false;
    let before = sh.now_ms.saturating_sub(read_deadline_ms(sh));
    for room in sh.svc.rooms.resumes.late(before) {
        read_done(sh, room, 0, 0, None);
    }
    if !sh.svc.rooms.resumes.is_empty() {
        schedule_reads_sweep(sh);
    }
}

/// Send a subscribe's answer to the asking shard, or keep it for the retry when its inbox is
/// full (answers stay in order: once one is owed, the later ones queue behind it).
fn owe_or_send(sh: &mut Shard, shard: usize, answer: Msg) {
    let msg = crate::shard::ShardMsg::service(super::ServiceMsg::Rooms(answer));
    owe_or_send_msg(sh, shard, msg);
}

/// [`owe_or_send`] for any answer the rooms service owes another shard (also the HTTP answer
/// to a server API publish).
fn owe_or_send_msg(sh: &mut Shard, shard: usize, msg: crate::shard::ShardMsg) {
    let msg = if sh.svc.rooms.owed.is_empty() {
        match sh.node.inboxes.try_send(shard, msg) {
            Ok(()) | Err((crate::shard::SendFailure::Dead, _)) => return,
            Err((crate::shard::SendFailure::Full, msg)) => msg,
        }
    } else {
        msg
    };
    if sh.svc.rooms.owed.len() >= RESUME_ANSWERS_OWED_MAX {
        sh.out.stats.cross_shard_dropped += 1;
        return;
    }
    sh.svc.rooms.owed.push_back((shard, msg));
    schedule_retry(sh);
}

fn schedule_retry(sh: &mut Shard) {
    if !sh.svc.rooms.retry_scheduled {
        sh.svc.rooms.retry_scheduled = true;
        let next = sh.now_tick + 1;
        sh.schedule_service(next, super::id::ROOMS, 0);
    }
}

/// The retry tick: send the owed answers in order, as far as the inboxes take them (or the
/// sweep of late stream reads).
pub fn on_timer(sh: &mut Shard, key: u64) {
    if key == KEY_READS_SWEEP {
        sweep_reads(sh);
        return;
    }
    sh.svc.rooms.retry_scheduled = false;
    while let Some((shard, msg)) = sh.svc.rooms.owed.pop_front() {
        match sh.node.inboxes.try_send(shard, msg) {
            Ok(()) | Err((crate::shard::SendFailure::Dead, _)) => {}
            Err((crate::shard::SendFailure::Full, msg)) => {
                sh.svc.rooms.owed.push_front((shard, msg));
                schedule_retry(sh);
                return;
            }
        }
    }
}

/// On the owner: the room's position and, given `since`, what was missed.
fn recover(
    sh: &mut Shard,
    room: &Arc<str>,
    opts: u16,
    since: Option<(u64, &str)>,
) -> (super::history::Position, Option<bool>, Vec<Frame>) {
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    let (size, ttl_ms) = (options.history_size, options.history_ttl.as_millis() as u64);
    let now_ms = sh.now_ms;
    let store = history(sh);
    match since {
        None => (store.position(room), None, Vec::new()),
        Some((offset, epoch)) => {
            let r = store.since(room, offset, epoch, size, ttl_ms, now_ms);
            (r.position, Some(r.recovered), r.frames)
        }
    }
}

/// On the asking shard: the owner answered a subscribe to a room with history.
#[allow(clippy::too_many_arguments)]
fn resumed(
    sh: &mut Shard,
    room: Arc<str>,
    opts: u16,
    conn: ConnRef,
    id: Option<Box<str>>,
    count: u32,
    position: super::history::Position,
    recovered: Option<bool>,
    frames: Vec<Frame>,
) {
    let st = &mut sh.svc.rooms;
    if let Some(n) = st.pending_rooms.get_mut(&room) {
        *n -= 1;
        if *n == 0 {
            st.pending_rooms.remove(&room);
        }
    }
    if let Some(n) = st.pending_conns.get_mut(&(conn.slot, conn.gen)) {
        *n -= 1;
        if *n == 0 {
            st.pending_conns.remove(&(conn.slot, conn.gen));
        }
    }
    let slot = conn.slot;
    let live = sh
        .clients
        .get(slot as usize)
        .is_some_and(|c| c.gen == conn.gen && c.phase == Phase::Open);
    // A refresh may have narrowed the rooms claim while the owner answered.
    if live && !sh.clients[slot as usize].allows_room(&room) {
        crate::admission::room_leave(&sh.node, &room);
        release_pre_arrival(sh, &room);
        sh.send_error(
            slot,
            ErrorReason::NotAllowed,
            id.as_deref(),
            "not allowed",
            None,
        );
        return;
    }
    if !live || membership(sh, slot, &room).is_some() {
        // Gone while the owner answered (or joined meanwhile): undo the admission count and
        // release the directory bit held for it.
        crate::admission::room_leave(&sh.node, &room);
        release_pre_arrival(sh, &room);
        if live {
            send_subscribed(
                sh,
                slot,
                &room,
                id.as_deref(),
                count,
                Some((&position, recovered)),
            );
        }
        return;
    }
    attach(sh, slot, room.clone(), opts);
    for f in frames {
        sh.reply(slot, f);
    }
    sh.out.stats.history_replayed += u64::from(recovered.is_some());
    send_subscribed(
        sh,
        slot,
        &room,
        id.as_deref(),
        count,
        Some((&position, recovered)),
    );
}

/// A pending subscribe ended without joining: if nothing else holds the room on this shard,
/// clear the directory bit that was set for it.
fn release_pre_arrival(sh: &mut Shard, room: &Arc<str>) {
    let st = &mut sh.svc.rooms;
    if st.pending_rooms.contains_key(room) || st.table.lookup(room).is_some() {
        return;
    }
    if st.pre_arrived.remove(room) {
        let t = sh.node.dir.rooms.depart(room, sh.id);
        report_transition(sh, room.clone(), t);
    }
}

/// Leave every room (the connection is closing or closed).
pub fn on_detach(sh: &mut Shard, slot: u32) {
    let memberships = std::mem::take(&mut sh.clients[slot as usize].rooms);
    for m in memberships {
        leave(sh, slot, m);
    }
}

/// After a token refresh: leave (with `unsubscribed`) every room the new `rooms` claim no
/// longer allows.
pub fn on_grants_changed(sh: &mut Shard, slot: u32) {
    let mut i = 0;
    while i < sh.clients[slot as usize].rooms.len() {
        let m = sh.clients[slot as usize].rooms[i];
        let name = sh.svc.rooms.table.name_of(m.room).clone();
        if sh.clients[slot as usize].allows_room(&name) {
            i += 1;
            continue;
        }
        sh.clients[slot as usize].rooms.swap_remove(i);
        leave(sh, slot, m);
        send_unsubscribed(sh, slot, &name, None);
    }
}

/// A usable room name, or the error sent.
pub fn valid_room<'r>(
    sh: &mut Shard,
    slot: u32,
    room: Option<&'r str>,
    id: Option<&str>,
) -> Option<&'r str> {
    let Some(room) = room.filter(|r| !r.is_empty()) else {
        sh.send_error(
            slot,
            ErrorReason::RoomRequired,
            id,
            "room name is required",
            None,
        );
        return None;
    };
    if room.len() > sh.node.cfg.max_room_name_bytes {
        sh.send_error(
            slot,
            ErrorReason::BadRequest,
            id,
            "room name too long",
            None,
        );
        return None;
    }
    Some(room)
}

/// The client's membership of `room`, if any: (index in its list, room id).
fn membership(sh: &Shard, slot: u32, room: &str) -> Option<(usize, RoomId)> {
    let rid = sh.svc.rooms.table.lookup(room)?;
    let c = &sh.clients[slot as usize];
    c.rooms.iter().position(|m| m.room == rid).map(|i| (i, rid))
}

/// The client's membership of `room`, or the `not subscribed to this room` error sent.
fn subscribed_to(
    sh: &mut Shard,
    slot: u32,
    room: &str,
    id: Option<&str>,
) -> Option<(usize, RoomId)> {
    let found = membership(sh, slot, room);
    if found.is_none() {
        sh.send_error(
            slot,
            ErrorReason::NotSubscribed,
            id,
            "not subscribed to this room",
            None,
        );
    }
    found
}

/// Subscribe `slot` to `room` (a valid name) and queue `subscribed` or the error. In a room
/// with history, `since` asks for what was missed (replayed before `subscribed`).
pub fn join(sh: &mut Shard, slot: u32, room: &str, id: Option<&str>, since: Option<(u64, &str)>) {
    let c = &sh.clients[slot as usize];
    if !c.allows_room(room) {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    }
    if membership(sh, slot, room).is_some() {
        // Already subscribed: the answer again, nothing replayed.
        let count = sh.node.dir.rooms.count(room).max(1);
        send_subscribed(sh, slot, room, id, count, None);
        return;
    }
    let key = (slot, c.gen);
    let pending = sh.svc.rooms.pending_conns.get(&key).copied().unwrap_or(0) as usize;
    if c.rooms.len() + pending >= sh.node.cfg.max_rooms_per_connection {
        sh.send_error(slot, ErrorReason::TooManyRooms, id, "too many rooms", None);
        return;
    }
    let (name, opts) = match sh.svc.rooms.table.lookup(room) {
        Some(rid) => (
            sh.svc.rooms.table.name_of(rid).clone(),
            sh.svc.rooms.table.room(rid).opts,
        ),
        None => (
            Arc::from(room),
            crate::room_options::index_for(&sh.node.cfg.rooms, room),
        ),
    };
    let Some(count) = crate::admission::room_join(&sh.node, &name) else {
        sh.send_error(
            slot,
            ErrorReason::RoomFull,
            id,
            "room is at maximum capacity",
            None,
        );
        return;
    };
    let options = crate::room_options::at(&sh.node.cfg.rooms, opts);
    if options.history_size == 0 {
        attach(sh, slot, name.clone(), opts);
        // `since` on a room without history: nothing can be recovered.
        let history = since.map(|_| {
            (
                super::history::Position {
                    offset: 0,
                    epoch: String::new(),
                },
                Some(false),
            )
        });
        let h = history.as_ref().map(|(p, r)| (p, *r));
        send_subscribed_with(sh, slot, room, id, count, h, false);
        return;
    }
    let own = owner(&name, sh.node.inboxes.len());
    if own == sh.id && !sh.node.clustered {
        attach(sh, slot, name.clone(), opts);
        let (position, recovered, frames) = recover(sh, &name, opts, since);
        for f in frames {
            sh.reply(slot, f);
        }
        sh.out.stats.history_replayed += u64::from(recovered.is_some());
        send_subscribed(sh, slot, room, id, count, Some((&position, recovered)));
        return;
    }
    // Ask the owner. Hold the room's directory bit now, so what the owner sequences after it
    // answers is delivered to this shard too.
    let st = &mut sh.svc.rooms;
    let first_here = st.table.lookup(&name).is_none() && !st.pending_rooms.contains_key(&name);
    if first_here && !st.pre_arrived.contains(&name) {
        st.pre_arrived.insert(name.clone());
        let t = sh.node.dir.rooms.arrive(&name, sh.id);
        report_transition(sh, name.clone(), t);
    }
    let conn = sh.conn_ref(slot);
    let resume = Msg::Resume {
        room: name.clone(),
        opts,
        since: since.map(|(o, e)| (o, e.into())),
        conn,
        id: id.map(Into::into),
        count,
    };
    if own == sh.id {
        // Clustered, on the owner: as if it came from another shard (it may wait for Redis).
        let st = &mut sh.svc.rooms;
        *st.pending_rooms.entry(name).or_default() += 1;
        *st.pending_conns.entry(key).or_default() += 1;
        on_msg(sh, resume);
        return;
    }
    let msg = crate::shard::ShardMsg::service(super::ServiceMsg::Rooms(resume));
    if sh.node.inboxes.send(own, msg).is_err() {
        sh.out.stats.cross_shard_dropped += 1;
        crate::admission::room_leave(&sh.node, &name);
        release_pre_arrival(sh, &name);
        sh.send_error(
            slot,
            ErrorReason::Busy,
            id,
            "server busy, retry later",
            None,
        );
        return;
    }
    let st = &mut sh.svc.rooms;
    *st.pending_rooms.entry(name).or_default() += 1;
    *st.pending_conns.entry(key).or_default() += 1;
}

/// Add `slot` to the room's local members (admission is done): the room table, the client's
/// memberships, the directory on the shard's first member, room presence.
fn attach(sh: &mut Shard, slot: u32, name: Arc<str>, opts: u16) {
    let joined = sh.svc.rooms.table.join_with(&name, slot, || opts);
    sh.clients[slot as usize].rooms.push(joined.membership);
    let opts = sh.svc.rooms.table.room(joined.membership.room).opts;
    if joined.first_local && !sh.svc.rooms.pre_arrived.remove(&name) {
        let t = sh.node.dir.rooms.arrive(&name, sh.id);
        report_transition(sh, name.clone(), t);
    }
    if tracks_presence(sh, slot, opts) {
        super::on_room_joined(sh, slot, &name, opts);
    }
}

fn send_subscribed(
    sh: &mut Shard,
    slot: u32,
    room: &str,
    id: Option<&str>,
    count: u32,
    history: Option<(&super::history::Position, Option<bool>)>,
) {
    send_subscribed_with(sh, slot, room, id, count, history, true);
}

/// `subscribed` with `client_count`; in a room with history `offset` and `epoch` (the room's
/// position), and `recovered` when the subscribe asked to resume.
fn send_subscribed_with(
    sh: &mut Shard,
    slot: u32,
    room: &str,
    id: Option<&str>,
    count: u32,
    history: Option<(&super::history::Position, Option<bool>)>,
    with_position: bool,
) {
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "subscribed")
            .id(id)
            .str("room", room)
            .obj("data", |d| {
                d.str("room", room).u64("client_count", count as u64);
                if let Some((p, recovered)) = history {
                    if with_position {
                        d.u64("offset", p.offset).str("epoch", &p.epoch);
                    }
                    if let Some(r) = recovered {
                        d.raw("recovered", if r { "true" } else { "false" });
                    }
                }
            })
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

/// Take one membership out of the room table (fixing up the member moved into its place),
/// the node count and the directory. The caller has removed it from the client's own list.
fn leave(sh: &mut Shard, slot: u32, m: Membership) {
    let opts = sh.svc.rooms.table.room(m.room).opts;
    let left = sh.svc.rooms.table.leave(m);
    if let Some((moved, pos)) = left.moved {
        if let Some(mm) = sh
            .clients
            .get_mut(moved as usize)
            .and_then(|mc| mc.rooms.iter_mut().find(|x| x.room == m.room))
        {
            mm.pos = pos;
        }
    }
    crate::admission::room_leave(&sh.node, &left.name);
    if tracks_presence(sh, slot, opts) {
        super::on_room_left(sh, slot, &left.name, opts);
    }
    if left.last_local {
        if sh.svc.rooms.pending_rooms.contains_key(&left.name) {
            // A subscribe still waits for the owner: keep the shard's directory bit for it
            // (its answer attaches or releases it), or the owner's next messages skip this
            // shard and that subscriber misses them.
            sh.svc.rooms.pre_arrived.insert(left.name);
        } else {
            let t = sh.node.dir.rooms.depart(&left.name, sh.id);
            report_transition(sh, left.name, t);
        }
    }
}

/// Whether a join or leave of `slot` in a room with options `opts` concerns room presence: an
/// identified connection in a room that tracks presence (one lookup; nothing else otherwise).
fn tracks_presence(sh: &Shard, slot: u32, opts: u16) -> bool {
    opts != 0
        && sh.clients[slot as usize].user.is_some()
        && crate::room_options::at(&sh.node.cfg.rooms, opts).tracks_presence()
}

/// Tell the bridge a room's node-level first subscriber arrived or its last one left (it
/// subscribes to the room's channel only while this node has subscribers).
fn report_transition(sh: &mut Shard, room: Arc<str>, t: Transition) {
    if t != Transition::None && sh.node.clustered {
        let msg = BridgeMsg::Room { room, t };
        if sh.node.bridge_tx.try_send(msg).is_err() {
            sh.out.stats.bridge_dropped += 1;
            // The bridge re-reads the directory for it.
            sh.node
                .redis_stats
                .transitions_lost
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_stable_and_spread() {
        assert_eq!(owner("chat", 2), owner("chat", 2));
        assert_eq!(owner("anything", 1), 0);
        let on_zero = (0..1000)
            .filter(|i| owner(&format!("room-{i}"), 2) == 0)
            .count();
        assert!((400..600).contains(&on_zero), "{on_zero}");
    }
}
