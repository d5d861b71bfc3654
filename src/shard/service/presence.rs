//! Presence (PROTOCOL.md section 4): user presence (`presence.watch`, `presence.unwatch`,
//! `presence.update`, `presence.query {user_ids}`, the events `presence.online`,
//! `presence.offline`, `presence.update`) and room presence (`presence.query {room}`,
//! `presence.join` / `presence.leave` in `join_leave` rooms).
//!
//! Ownership: every user and every room has one owner shard on the node (a fixed hash of the
//! name, [`super::rooms::owner`]). The owner's state is the sans-IO [`state::Owner`]; this
//! module is the glue (parse, check, encode, deliver) and decides nothing the state could.
//! - A shard that sees a user's first local device ([`on_attach`]) or its last one leave
//!   ([`on_detach`]) reports it to the user's owner ([`Msg::Arrive`] / [`Msg::Depart`]). The
//!   owner re-reads the node-wide device count (`dir.users.count`) when it acts, because two
//!   shards' reports may arrive in either order; `presence.offline` waits for
//!   `presence_offline_grace` (a keyed timer on the owner) so a drain or a blip does not flap.
//! - The owner publishes each user's record (status, text, last_seen) in the directory
//!   (`dir.presence`, lock-free), so `presence.query` and the answer to `presence.watch` are
//!   read on the asking shard without a round trip.
//!   Clustered, users the node does not hold are read from Redis through the bridge first
//!   ([`Read`], [`Msg::State`]); room joins, leaves and queries are judged and read there too
//!   ([`RoomRead`], [`Msg::RoomState`]).
//! - Watching a user is joining the topic `presence:<user_id>` ([`Target::Topic`]): a change
//!   costs its owner one delivery plan, and nothing happens per watcher while nothing changes.
//!   No per-connection side table: the shard's topic lists are the watch lists, and detach
//!   leaves them.
//! - Room presence (rooms whose options track presence): the room's owner, which also
//!   sequences the room's messages, keeps room -> user -> devices; joins and leaves reach it
//!   from the members' shards ([`Msg::RoomJoin`] / [`Msg::RoomLeave`]), so `presence.join` /
//!   `presence.leave` are in order with the room's messages.
//!
//! Reports are state, so one that finds the owner's inbox full is not dropped: it waits in
//! `State::owed` (bounded by `PRESENCE_OWED_MAX`, in order) and is retried every tick.
//! Clustered, a room presence change the bridge's full inbox refuses waits the same way
//! (`State::bridge_owed`, bounded by `PRESENCE_ROOM_BRIDGE_OWED_MAX`, [`room_event`]).
//! Requests (`presence.update`, a room query) answer `server busy, retry later` instead.

pub mod state;

pub use state::{Record, Status};

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde::Deserialize;

use super::{identity, parse, Cmd, ServiceMsg};
use crate::limits::{
    ID_BYTES_MAX, PRESENCE_OFFLINE_USERS_MAX, PRESENCE_OWED_MAX, PRESENCE_ROOM_BRIDGE_OWED_MAX,
    PRESENCE_TEXT_BYTES_MAX, TIMER_TICK_MS,
};
use crate::metrics::ErrorReason;
use crate::proto::envelope::non_empty;
use crate::proto::json::{rfc3339_ms, write_str, write_u64};
use crate::proto::Frame;
use crate::route::{ConnRef, Target};
use crate::shard::{Shard, ShardMsg};

/// The service timer key of the owed-report retry (grace timers use keys from 1).
const RETRY_KEY: u64 = 0;

/// Topic names of watched users start with this.
const TOPIC_PREFIX: &str = "presence:";

/// Per-shard presence state: what this shard owns, and reports owed to other owners.
#[derive(Default)]
pub struct State {
    owner: state::Owner,
    /// Reports whose owner's inbox was full, in send order.
    owed: VecDeque<(usize, Msg)>,
    /// Clustered: room presence changes the bridge's full inbox refused, in order
    /// ([`room_event`]; at most `PRESENCE_ROOM_BRIDGE_OWED_MAX`).
    bridge_owed: state::BridgeOwed<crate::bridge::BridgeMsg>,
    retry_scheduled: bool,
}

/// Presence messages to an owner shard.
#[derive(Clone)]
pub enum Msg {
    /// The user's first device on the sending shard arrived.
    Arrive { user: Arc<str> },
    /// The user's last device on the sending shard left at `at_ms` (Unix ms).
    Depart { user: Arc<str>, at_ms: u64 },
    /// `presence.update` from connection `from` (reply with `id`).
    Update {
        user: Arc<str>,
        status: Status,
        text: Option<Box<str>>,
        from: ConnRef,
        id: Option<Box<str>>,
    },
    /// A device of `user` joined `room` (options `opts`, which track presence).
    RoomJoin {
        room: Arc<str>,
        user: Arc<str>,
        opts: u16,
        conn: ConnRef,
    },
    /// A device of `user` left `room`.
    RoomLeave {
        room: Arc<str>,
        user: Arc<str>,
        opts: u16,
    },
    /// `presence.query {room}` from connection `to`.
    RoomQuery {
        room: Arc<str>,
        to: ConnRef,
        id: Option<Box<str>>,
    },
    /// From the bridge, to the shard of connection `to`: the users who share a stored thread
    /// with it, for its `presence.watch {scope: "conversations"}` (`truncated`: the bridge
    /// left some out, past `max_watched_users_per_connection` or `CONTACT_THREADS_MAX`).
    Contacts {
        to: ConnRef,
        id: Option<Box<str>>,
        users: Vec<Arc<str>>,
        truncated: bool,
    },
    /// From the bridge, to the shard of `read.to`: the users of `read.remote` as Redis has
    /// them (`found`, in that order; None: Redis could not answer in time, read this node's
    /// state instead), for the answer `read` waits for.
    State {
        read: Box<Read>,
        found: Option<Vec<state::Remote>>,
    },
    /// From the bridge, to the room's owner: the room's users on every node for the query
    /// `read` (None: Redis could not answer in time, this node's members are listed).
    RoomState {
        read: Box<RoomRead>,
        found: Option<RoomFound>,
    },
}

/// Clustered: a room query waiting for the bridge to read the room's members on every node.
#[derive(Clone, Debug)]
pub struct RoomRead {
    pub room: Arc<str>,
    pub to: ConnRef,
    pub id: Option<Box<str>>,
    /// The room's owner shard on this node (which answers).
    pub owner: usize,
    /// `max_presence_room_users`.
    pub cap: usize,
}

impl RoomRead {
    pub fn answer(self, found: Option<RoomFound>) -> Msg {
        Msg::RoomState {
            read: Box::new(self),
            found,
        }
    }
}

/// A room's members as Redis has them (`<p>{room:<name>}:present`): at most `cap` users, each
/// with the number of nodes holding it in the room, and the room's number of users.
#[derive(Clone, Debug, Default)]
pub struct RoomFound {
    pub users: Vec<(Box<str>, u32)>,
    pub count: usize,
}

/// Clustered: a `presence.state` answer some of whose users this node does not hold
/// ([`state::held_here`]), waiting for the bridge to read those from Redis
/// ([`crate::bridge::redis::Redis::presence_read`]). Single node: never made.
#[derive(Clone, Debug)]
pub struct Read {
    /// The asking connection.
    pub to: ConnRef,
    pub id: Option<Box<str>>,
    /// Every user of the answer, in order.
    pub users: Vec<Arc<str>>,
    /// Indexes into `users` of the ones to read from Redis.
    pub remote: Vec<u32>,
    /// The first answer of a watch: read once the users' watch channels are held, so that
    /// no event falls between the read and the watch.
    pub watch: bool,
    /// `presence.watch {scope}`: its `truncated`.
    pub truncated: Option<bool>,
}

impl Read {
    /// The users to read from Redis.
    pub fn remote_users(&self) -> impl Iterator<Item = &Arc<str>> {
        self.remote
            .iter()
            .filter_map(|&i| self.users.get(i as usize))
    }

    /// The shard's message with what Redis said (None: nothing; answered from this node).
    pub fn answer(self, found: Option<Vec<state::Remote>>) -> Msg {
        Msg::State {
            read: Box::new(self),
            found,
        }
    }
}

/// The owner shard of a user's presence (the same fixed hash as rooms).
pub fn user_owner(user: &str, shards: usize) -> usize {
    super::rooms::owner(user, shards)
}

/// The topic of `user`'s watchers (the bridge tells them cluster-wide changes).
pub fn watch_topic(user: &str) -> String {
    topic(user)
}

fn topic(user: &str) -> String {
    let mut t = String::with_capacity(TOPIC_PREFIX.len() + user.len());
    t.push_str(TOPIC_PREFIX);
    t.push_str(user);
    t
}

// ------------------------------------------------------------------ reports to owners

/// Hand `msg` to shard `to` (handled here when this shard is the owner). A full inbox keeps
/// the report for the retry, behind any report already waiting, so an owner sees each
/// shard's reports in order.
fn report(sh: &mut Shard, to: usize, msg: Msg) {
    if to == sh.id {
        handle(sh, msg);
        return;
    }
    if !sh.svc.presence.owed.is_empty() {
        owe(sh, to, msg);
        return;
    }
    let copy = msg.clone();
    if sh
        .node
        .inboxes
        .send(to, ShardMsg::service(ServiceMsg::Presence(msg)))
        .is_ok()
    {
        sh.out.stats.cross_shard_sent += 1;
    } else {
        owe(sh, to, copy);
    }
}

fn owe(sh: &mut Shard, to: usize, msg: Msg) {
    let st = &mut sh.svc.presence;
    if st.owed.len() >= PRESENCE_OWED_MAX {
        sh.out.stats.presence_reports_dropped += 1;
        return;
    }
    sh.out.stats.presence_reports_owed += 1;
    st.owed.push_back((to, msg));
    schedule_retry(sh);
}

/// The next tick retries what waits (owed reports, room changes owed to the bridge).
fn schedule_retry(sh: &mut Shard) {
    if !sh.svc.presence.retry_scheduled {
        sh.svc.presence.retry_scheduled = true;
        let tick = sh.now_tick + 1;
        sh.schedule_service(tick, super::id::PRESENCE, RETRY_KEY);
    }
}

fn retry_owed(sh: &mut Shard) {
    sh.svc.presence.retry_scheduled = false;
    if !retry_bridge(sh) {
        schedule_retry(sh);
    }
    while let Some((to, msg)) = sh.svc.presence.owed.pop_front() {
        let copy = msg.clone();
        if sh
            .node
            .inboxes
            .send(to, ShardMsg::service(ServiceMsg::Presence(msg)))
            .is_ok()
        {
            sh.out.stats.cross_shard_sent += 1;
            continue;
        }
        sh.svc.presence.owed.push_front((to, copy));
        schedule_retry(sh);
        return;
    }
}

/// Hand the bridge the room presence changes it refused, in order, until it refuses one
/// again; true when none waits any more. Each one taken is as if taken the first time: its
/// event reaches this node's members from the bridge, once Redis judged it.
fn retry_bridge(sh: &mut Shard) -> bool {
    let st = &mut sh.svc.presence;
    if st.bridge_owed.is_empty() {
        return true;
    }
    let tx = &sh.node.bridge_tx;
    let mut events = 0;
    st.bridge_owed.retry(|msg| {
        let has_frame = matches!(
            &msg,
            crate::bridge::BridgeMsg::RoomPresence { frame: Some(_), .. }
        );
        tx.try_send(msg)
            .map(|()| events += u64::from(has_frame))
            .map_err(|e| e.into_inner())
    });
    sh.out.stats.presence_room_events += events;
    st.bridge_owed.is_empty()
}

/// Send a request to its owner (handled here when this shard owns it); false when the
/// owner's inbox is full (the caller answers `server busy, retry later`).
fn request(sh: &mut Shard, to: usize, msg: Msg) -> bool {
    if to == sh.id {
        handle(sh, msg);
        return true;
    }
    let ok = sh
        .node
        .inboxes
        .send(to, ShardMsg::service(ServiceMsg::Presence(msg)))
        .is_ok();
    if ok {
        sh.out.stats.cross_shard_sent += 1;
    } else {
        sh.out.stats.cross_shard_dropped += 1;
    }
    ok
}

// ------------------------------------------------------------------ hooks

/// A connection got its identity: report the user's first device on this shard.
pub fn on_attach(sh: &mut Shard, slot: u32) {
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        return;
    };
    if sh.users.devices(&user).len() != 1 {
        return; // the owner already heard of this shard's devices
    }
    let to = user_owner(&user, sh.node.inboxes.len());
    report(sh, to, Msg::Arrive { user });
}

/// A connection stops being a participant (its `user` still set): report the user's last
/// device on this shard. Its watches end with the shard's topic lists (`leave_all_topics`).
pub fn on_detach(sh: &mut Shard, slot: u32) {
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        return;
    };
    if sh.users.devices(&user) != [slot] {
        return; // other devices of the user remain on this shard
    }
    let to = user_owner(&user, sh.node.inboxes.len());
    let at_ms = sh.now_ms;
    report(sh, to, Msg::Depart { user, at_ms });
}

/// An identified connection joined a room that tracks presence.
pub fn on_room_joined(sh: &mut Shard, slot: u32, room: &Arc<str>, opts: u16) {
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        return;
    };
    let conn = sh.conn_ref(slot);
    let to = super::rooms::owner(room, sh.node.inboxes.len());
    let room = room.clone();
    report(
        sh,
        to,
        Msg::RoomJoin {
            room,
            user,
            opts,
            conn,
        },
    );
}

/// An identified connection left a room that tracks presence.
pub fn on_room_left(sh: &mut Shard, slot: u32, room: &Arc<str>, opts: u16) {
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        return;
    };
    let to = super::rooms::owner(room, sh.node.inboxes.len());
    let room = room.clone();
    report(sh, to, Msg::RoomLeave { room, user, opts });
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    handle(sh, m);
}

pub fn on_timer(sh: &mut Shard, key: u64) {
    if key == RETRY_KEY {
        retry_owed(sh);
        return;
    }
    let offline_max = PRESENCE_OFFLINE_USERS_MAX / sh.node.inboxes.len().max(1);
    let now_ms = sh.now_ms;
    let node = &sh.node;
    let out = sh
        .svc
        .presence
        .owner
        .fire(key, now_ms, offline_max, |u| node.dir.users.count(u));
    apply(sh, out);
}

// ------------------------------------------------------------------ the owner

fn handle(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Arrive { user } => {
            let devices = sh.node.dir.users.count(&user);
            let out = sh.svc.presence.owner.arrive(&user, devices);
            apply(sh, out);
        }
        Msg::Depart { user, at_ms } => {
            let grace_ms = sh.node.cfg.presence_offline_grace.as_millis() as u64;
            let out = sh.svc.presence.owner.depart(&user, at_ms, grace_ms);
            apply(sh, out);
        }
        Msg::Update {
            user,
            status,
            text,
            from,
            id,
        } => {
            let devices = sh.node.dir.users.count(&user);
            let now_ms = sh.now_ms;
            let out = sh
                .svc
                .presence
                .owner
                .set_status(&user, status, text, devices, now_ms);
            apply(sh, out);
            // The user's own devices see the true status (invisible included).
            let rec = sh.node.dir.presence.get(&user);
            let v = state::view(rec.as_deref(), devices, true);
            let reply = encode_user(sh, "presence.update", id.as_deref(), &user, &v);
            sh.deliver(&Target::Conn(from), &reply);
            let others = encode_user(sh, "presence.update", None, &user, &v);
            sh.deliver(
                &Target::User {
                    user,
                    except: Some(from),
                },
                &others,
            );
        }
        Msg::RoomJoin {
            room,
            user,
            opts,
            conn,
        } => {
            let first = sh.svc.presence.owner.room_join(&room, &user);
            if first {
                // To the room's other members (the joining connection has `subscribed`).
                room_event(sh, room, user, opts, true, Some(conn));
            }
        }
        Msg::RoomLeave { room, user, opts } => {
            let last = sh.svc.presence.owner.room_leave(&room, &user);
            if last {
                room_event(sh, room, user, opts, false, None);
            }
        }
        Msg::RoomQuery { room, to, id } => {
            if sh.node.clustered {
                // Every node's members: the bridge reads the room's hash in Redis and hands
                // it back here (Msg::RoomState), merged with this node's then.
                let read = RoomRead {
                    room,
                    to,
                    id,
                    owner: sh.id,
                    cap: sh.node.cfg.max_presence_room_users,
                };
                match sh
                    .node
                    .bridge_tx
                    .try_send(crate::bridge::BridgeMsg::RoomRead(Box::new(read)))
                {
                    Ok(()) => return,
                    Err(e) => {
                        sh.out.stats.bridge_dropped += 1;
                        let crate::bridge::BridgeMsg::RoomRead(read) = e.into_inner() else {
                            return;
                        };
                        return handle(sh, read.answer(None));
                    }
                }
            }
            room_state(sh, &room, to, id.as_deref(), None);
        }
        Msg::RoomState { read, found } => {
            if found.is_none() && sh.node.clustered {
                sh.out.stats.presence_read_local += 1;
            }
            let RoomRead { room, to, id, .. } = *read;
            room_state(sh, &room, to, id.as_deref(), found.as_ref());
        }
        Msg::Contacts {
            to,
            id,
            users,
            truncated,
        } => watch_contacts(sh, to, id.as_deref(), &users, truncated),
        Msg::State { read, found } => {
            let slot = read.to.slot;
            if !sh.live(slot, read.to.gen) {
                return;
            }
            let Some(me) = sh.clients[slot as usize].user.clone() else {
                return;
            };
            if found.is_none() {
                sh.out.stats.presence_read_local += 1;
            }
            let ids: Vec<&str> = read.users.iter().map(|u| &**u).collect();
            let remote = found.as_deref().map(|f| (&read.remote[..], f));
            send_state(
                sh,
                slot,
                read.id.as_deref(),
                &me,
                &ids,
                read.truncated,
                remote,
            );
        }
    }
}

/// `presence.join` (`join`) or `presence.leave` of `user`'s first device in `room` on this
/// node or its last one out (`except`: the joining connection, which has its `subscribed`).
/// On one node, to the room's members at once. Clustered, Redis judges whether it is the
/// cluster's first or last (the room's hash of users, `<p>{room:<name>}:present`) and its
/// script publishes the event, which this node's members hear once the verdict is back
/// ([`crate::bridge::redis::Redis::room_presence`]); rooms with `presence: true` only (no
/// events) are judged all the same, for the room query. A change the bridge's full inbox
/// refuses waits in `State::bridge_owed` (in order, ahead of any newer one, retried every
/// tick; a join and its leave that both wait cancel out) and is then taken as if the first
/// time; past `PRESENCE_ROOM_BRIDGE_OWED_MAX` it is told here as this node judged it, and
/// never reaches Redis (counted).
fn room_event(
    sh: &mut Shard,
    room: Arc<str>,
    user: Arc<str>,
    opts: u16,
    join: bool,
    except: Option<ConnRef>,
) {
    let events = crate::room_options::at(&sh.node.cfg.rooms, opts).join_leave;
    let kind = if join {
        "presence.join"
    } else {
        "presence.leave"
    };
    let frame = events.then(|| encode_room_event(sh, kind, &room, &user));
    if sh.node.clustered {
        let msg = crate::bridge::BridgeMsg::RoomPresence {
            room: room.clone(),
            user: user.clone(),
            join,
            frame: frame.clone(),
            except,
        };
        // Behind the changes the bridge refused before, if any still wait: a pair's changes
        // reach Redis in order.
        let msg = if retry_bridge(sh) {
            if sh.node.faults.refuse_bridge_room_presence() {
                msg
            } else {
                match sh.node.bridge_tx.try_send(msg) {
                    Ok(()) => {
                        if frame.is_some() {
                            sh.out.stats.presence_room_events += 1;
                        }
                        return;
                    }
                    Err(e) => e.into_inner(),
                }
            }
        } else {
            msg
        };
        // The bridge is full: the change waits here and goes at the next tick, judged and
        // told as if taken now (this node's members hear it then, from the bridge).
        let max = PRESENCE_ROOM_BRIDGE_OWED_MAX;
        match sh
            .svc
            .presence
            .bridge_owed
            .push(&room, &user, join, msg, max)
        {
            state::Owed::Queued => {
                sh.out.stats.presence_room_bridge_owed += 1;
                schedule_retry(sh);
                return;
            }
            // A join and its leave (or a leave and the join back) that never reached Redis:
            // neither is told anywhere.
            state::Owed::Coalesced => {
                sh.out.stats.presence_room_bridge_coalesced += 1;
                return;
            }
            // Past the bound: this node's judgement, told here as it is; Redis and the other
            // nodes never hear it.
            state::Owed::Full => {
                sh.out.stats.bridge_dropped += 1;
                sh.out.stats.presence_room_bridge_lost += 1;
            }
        }
    }
    if let Some(f) = frame {
        sh.out.stats.presence_room_events += 1;
        sh.deliver(&Target::Room { room, except }, &f);
    }
}

/// Answer a room query from this owner's members, merged with every node's (`found`,
/// clustered) when Redis answered.
fn room_state(
    sh: &mut Shard,
    room: &str,
    to: ConnRef,
    id: Option<&str>,
    found: Option<&RoomFound>,
) {
    let cap = sh.node.cfg.max_presence_room_users;
    let owner = &sh.svc.presence.owner;
    let (list, count): (Vec<(Box<str>, u32)>, usize) = match found {
        Some(f) => {
            let (local, _) = owner.room_users(room, usize::MAX);
            state::merge_room(&local, &f.users, f.count, cap)
        }
        None => {
            let (local, count) = owner.room_users(room, cap);
            let list = local.iter().map(|(u, d)| (Box::from(*u), *d)).collect();
            (list, count)
        }
    };
    let truncated = list.len() < count;
    let mut users = Vec::with_capacity(2 + list.len() * 32);
    users.push(b'[');
    for (i, (user, devices)) in list.iter().enumerate() {
        if i > 0 {
            users.push(b',');
        }
        users.extend_from_slice(b"{\"user_id\":");
        write_str(&mut users, user);
        users.extend_from_slice(b",\"devices\":");
        write_u64(&mut users, u64::from(*devices));
        users.push(b'}');
    }
    users.push(b']');
    let users = String::from_utf8(users).expect("JSON written from str is UTF-8");
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "presence.state")
            .id(id)
            .str("room", room)
            .obj("data", |d| {
                d.raw("users", &users)
                    .u64("count", count as u64)
                    .raw("truncated", if truncated { "true" } else { "false" });
            })
            .u64("timestamp", now_ms);
    });
    sh.out.stats.presence_queries += 1;
    sh.deliver(&Target::Conn(to), &f);
}

/// Watch the users the bridge found for `presence.watch {scope: "conversations"}` of
/// connection `to` (still the same connection), as many as its watch list has room for (users
/// it already watches count once; users `address_policy` refuses are skipped), and answer
/// `presence.state` for those, with `truncated` when some were left out.
fn watch_contacts(
    sh: &mut Shard,
    to: ConnRef,
    id: Option<&str>,
    users: &[Arc<str>],
    truncated: bool,
) {
    let slot = to.slot;
    if !sh.live(slot, to.gen) {
        return;
    }
    let Some(me) = sh.clients[slot as usize].user.clone() else {
        return;
    };
    let max = sh.node.cfg.max_watched_users_per_connection;
    let mut cut = truncated;
    let mut watched: Vec<&str> = Vec::with_capacity(users.len());
    for u in users {
        if !super::policy::may_address(sh, slot, u) {
            continue;
        }
        let t = topic(u);
        let held = sh
            .topics_of
            .get(&slot)
            .is_some_and(|l| l.iter().any(|x| **x == *t));
        if !held {
            if sh.topics_joined(slot) >= max {
                cut = true;
                continue;
            }
            sh.topic_join(slot, &t);
        }
        watched.push(u);
    }
    answer_state(sh, slot, id, &me, &watched, true, Some(cut));
}

/// Carry out an owner step: directory records, the watchers' event, the grace timer.
/// Clustered, every event of the user's goes through the bridge, in order, with the record
/// the cluster's readers see ([`crate::bridge::redis::Redis::presence`]): a change of this
/// node's hold of the user (`out.held`: a first device here, the grace after the last one) is
/// for Redis to judge (whether it is the cluster's, not only this node's), anything else is
/// told as it is after it (a status change never overtakes the online it follows).
fn apply(sh: &mut Shard, out: state::Out) {
    for user in &out.forget {
        sh.node.dir.presence.remove(user);
        sh.out.stats.presence_forgotten += 1;
    }
    let Some((user, rec)) = out.publish else {
        debug_assert!(out.event.is_none(), "an event without a record");
        return finish(sh, out.timer);
    };
    if state::is_plain_online(&rec) {
        // The common state needs no record: no record and a device reads online.
        sh.node.dir.presence.remove(&user);
    } else {
        sh.node.dir.presence.set(user.clone(), rec.clone());
    }
    let v = state::view(Some(&rec), 0, false);
    let frame = out.event.map(|ev| {
        sh.out.stats.presence_changes += 1;
        encode_user(sh, ev.type_name(), None, &user, &v)
    });
    if sh.node.clustered && (frame.is_some() || out.held.is_some()) {
        let msg = crate::bridge::BridgeMsg::Presence {
            user: user.clone(),
            online: out.held,
            frame: frame.clone(),
            record: state::encode_remote(&v).into(),
        };
        if !sh.node.faults.refuse_bridge_presence() && sh.node.bridge_tx.try_send(msg).is_ok() {
            return finish(sh, out.timer);
        }
        // The bridge is full: this node's judgement, told here as it is; the bridge re-reads
        // the directory for the users this node holds and tells the other nodes what they
        // missed (`Redis::held_from_directory`).
        sh.out.stats.bridge_dropped += 1;
        sh.node
            .redis_stats
            .presence_lost
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(f) = frame {
        let topic = Arc::from(topic(&user));
        // This node's watchers only: clustered, the other nodes hear it from the bridge's
        // resync, as Redis judges it (once).
        sh.deliver_node(
            &Target::Topic {
                topic,
                except: None,
            },
            &f,
        );
    }
    finish(sh, out.timer);
}

/// Schedule an owner step's grace timer, if it has one.
fn finish(sh: &mut Shard, timer: Option<(u64, u64)>) {
    if let Some((key, due_ms)) = timer {
        let wait_ms = due_ms.saturating_sub(sh.now_ms);
        let ticks = wait_ms
            .div_ceil(TIMER_TICK_MS)
            .clamp(1, u64::from(u32::MAX / 2)) as u32;
        let tick = sh.now_tick.saturating_add(ticks);
        sh.schedule_service(tick, super::id::PRESENCE, key);
    }
}

/// `{"type":kind,"id":..,"data":{user_id,status,text,last_seen},"timestamp":..}`.
fn encode_user(
    sh: &mut Shard,
    kind: &str,
    id: Option<&str>,
    user: &str,
    v: &state::View<'_>,
) -> Frame {
    let last_seen = (v.last_seen_ms > 0).then(|| rfc3339_ms(v.last_seen_ms));
    let now_ms = sh.now_ms;
    sh.fb.text(sh.now_us, |o| {
        o.str("type", kind)
            .id(id)
            .obj("data", |d| {
                d.str("user_id", user)
                    .str("status", v.status)
                    .opt_str("text", v.text)
                    .opt_str("last_seen", last_seen.as_deref());
            })
            .u64("timestamp", now_ms);
    })
}

fn encode_room_event(sh: &mut Shard, kind: &str, room: &str, user: &str) -> Frame {
    let now_ms = sh.now_ms;
    sh.fb.text(sh.now_us, |o| {
        o.str("type", kind)
            .str("room", room)
            .obj("data", |d| {
                d.str("user_id", user);
            })
            .u64("timestamp", now_ms);
    })
}

// ------------------------------------------------------------------ commands

#[derive(Deserialize)]
struct UpdateCmd<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UsersCmd<'a> {
    #[serde(default)]
    user_ids: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    /// `presence.watch` only: `"conversations"`.
    #[serde(borrow, default)]
    scope: Option<Cow<'a, str>>,
}

/// The one `scope` of `presence.watch`: every user sharing a stored thread with the caller.
pub const SCOPE_CONVERSATIONS: &str = "conversations";

/// The error text for a `user_ids` entry that is not a usable id.
const BAD_USER_ID: &str = "user_ids must be non-empty strings of at most 256 bytes";

/// `user_ids` checked (present, at most `max_presence_query_users`, each a usable id and,
/// with `policy`, one the connection may address) and deduplicated in order; or the error sent.
fn checked_ids<'c>(
    sh: &mut Shard,
    slot: u32,
    id: Option<&str>,
    ids: Option<&'c [Cow<'_, str>]>,
    me: &str,
    policy: bool,
) -> Option<Vec<&'c str>> {
    let Some(ids) = ids else {
        sh.send_error(
            slot,
            ErrorReason::BadRequest,
            id,
            "user_ids is required",
            None,
        );
        return None;
    };
    if ids.len() > sh.node.cfg.max_presence_query_users {
        sh.send_error(slot, ErrorReason::TooLarge, id, "too many user_ids", None);
        return None;
    }
    if ids.iter().any(|u| u.is_empty() || u.len() > ID_BYTES_MAX) {
        sh.send_error(slot, ErrorReason::BadRequest, id, BAD_USER_ID, None);
        return None;
    }
    if policy
        && !ids
            .iter()
            .all(|u| &**u == me || super::policy::may_address(sh, slot, u))
    {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return None;
    }
    let mut seen = HashSet::with_capacity(ids.len());
    Some(
        ids.iter()
            .map(|u| &**u)
            .filter(|u| seen.insert(*u))
            .collect(),
    )
}

/// Answer `presence.state` for `ids` (`watch`: the first answer of a watch). On one node, or
/// clustered when this node holds every user listed, at once from the directory here;
/// otherwise the bridge reads the others from Redis first ([`Read`]), and with the bridge's
/// inbox full they are answered from here (counted).
fn answer_state(
    sh: &mut Shard,
    slot: u32,
    id: Option<&str>,
    me: &str,
    ids: &[&str],
    watch: bool,
    truncated: Option<bool>,
) {
    if sh.node.clustered {
        let dir = &sh.node.dir;
        let remote: Vec<u32> = ids
            .iter()
            .enumerate()
            .filter(|(_, u)| {
                **u != me && !state::held_here(dir.presence.get(u).as_deref(), dir.users.count(u))
            })
            .map(|(i, _)| i as u32)
            .collect();
        if !remote.is_empty() {
            let read = Read {
                to: sh.conn_ref(slot),
                id: id.map(Box::from),
                users: ids.iter().map(|u| Arc::from(*u)).collect(),
                remote,
                watch,
                truncated,
            };
            let msg = crate::bridge::BridgeMsg::PresenceRead(Box::new(read));
            if sh.node.bridge_tx.try_send(msg).is_ok() {
                return;
            }
            sh.out.stats.bridge_dropped += 1;
            sh.out.stats.presence_read_local += 1;
        }
    }
    send_state(sh, slot, id, me, ids, truncated, None);
}

/// `presence.state {data:{users:[...]}}` for `ids`, read from the directory here (with
/// `truncated` for the `scope` form of `presence.watch`); `remote`: users (indexes into `ids`)
/// read from Redis, used for those this node still does not hold.
fn send_state(
    sh: &mut Shard,
    slot: u32,
    id: Option<&str>,
    me: &str,
    ids: &[&str],
    truncated: Option<bool>,
    remote: Option<(&[u32], &[state::Remote])>,
) {
    let dir = &sh.node.dir;
    let mut users = Vec::with_capacity(2 + ids.len() * 96);
    users.push(b'[');
    let mut from_redis =
        remote.map(|(idx, found)| idx.iter().copied().zip(found.iter()).peekable());
    for (i, user) in ids.iter().enumerate() {
        let rec = dir.presence.get(user);
        let devices = dir.users.count(user);
        let mut found = None;
        if let Some(it) = from_redis.as_mut() {
            if it.peek().is_some_and(|(j, _)| *j as usize == i) {
                found = it.next().map(|(_, r)| r);
            }
        }
        let v = match found {
            // Still held elsewhere only (a device that arrived here since is fresher).
            Some(r) if !state::held_here(rec.as_deref(), devices) => r.view(),
            _ => state::view(rec.as_deref(), devices, *user == me),
        };
        if i > 0 {
            users.push(b',');
        }
        users.extend_from_slice(b"{\"user_id\":");
        write_str(&mut users, user);
        users.extend_from_slice(b",\"status\":");
        write_str(&mut users, v.status);
        users.extend_from_slice(b",\"text\":");
        match v.text {
            Some(t) => write_str(&mut users, t),
            None => users.extend_from_slice(b"null"),
        }
        users.extend_from_slice(b",\"devices\":");
        write_u64(&mut users, u64::from(v.devices));
        users.extend_from_slice(b",\"last_seen\":");
        if v.last_seen_ms > 0 {
            write_str(&mut users, &rfc3339_ms(v.last_seen_ms));
        } else {
            users.extend_from_slice(b"null");
        }
        users.push(b'}');
    }
    users.push(b']');
    let users = String::from_utf8(users).expect("JSON written from str is UTF-8");
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "presence.state")
            .id(id)
            .obj("data", |d| {
                d.raw("users", &users);
                if let Some(t) = truncated {
                    d.bool("truncated", t);
                }
            })
            .u64("timestamp", now_ms);
    });
    sh.out.stats.presence_queries += 1;
    sh.reply(slot, f);
}

/// `presence.update {status, text?}`: set the user's own status on every device. The owner
/// answers (`presence.update` with the true status to this connection, without `id` to the
/// user's other devices) after applying it, so a query right after sees it.
pub fn update(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<UpdateCmd>(sh, slot, cmd) else {
        return;
    };
    let id = cmd.id;
    let Some(user) = identity(sh, slot, id) else {
        return;
    };
    let Some(status) = c.status.as_deref().and_then(Status::settable) else {
        sh.send_error(
            slot,
            ErrorReason::BadRequest,
            id,
            "status must be online, away, busy or invisible",
            None,
        );
        return;
    };
    let text = non_empty(&c.text);
    if text.is_some_and(|t| t.len() > PRESENCE_TEXT_BYTES_MAX) {
        sh.send_error(
            slot,
            ErrorReason::TooLarge,
            id,
            "presence text too long",
            None,
        );
        return;
    }
    let to = user_owner(&user, sh.node.inboxes.len());
    let msg = Msg::Update {
        user,
        status,
        text: text.map(Box::from),
        from: sh.conn_ref(slot),
        id: id.map(Box::from),
    };
    if !request(sh, to, msg) {
        sh.send_error(
            slot,
            ErrorReason::Busy,
            id,
            "server busy, retry later",
            None,
        );
    }
}

/// `presence.watch {user_ids}`: join their topics, answer `presence.state` for them.
pub fn watch(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<UsersCmd>(sh, slot, cmd) else {
        return;
    };
    let id = cmd.id;
    let Some(me) = identity(sh, slot, id) else {
        return;
    };
    if let Some(scope) = &c.scope {
        if c.user_ids.is_some() {
            let text = "give user_ids or scope, not both";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
        if scope != SCOPE_CONVERSATIONS {
            let text = "scope must be conversations";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
        // The store knows who shares a thread with the caller: the bridge reads them and
        // hands them back here (Msg::Contacts), where they are watched and answered.
        let job = crate::bridge::StoreJob::Contacts {
            origin: sh.conn_ref(slot),
            id: id.map(Box::from),
            user: me,
            limit: sh.node.cfg.max_watched_users_per_connection,
        };
        if !sh.hand_to_store(job) {
            let text = "server busy, retry later";
            sh.send_error(slot, ErrorReason::Busy, id, text, None);
        }
        return;
    }
    let Some(ids) = checked_ids(sh, slot, id, c.user_ids.as_deref(), &me, true) else {
        return;
    };
    let mut joined = Vec::new();
    for user in &ids {
        let t = topic(user);
        if sh.topic_join(slot, &t) {
            joined.push(t);
        }
    }
    if sh.topics_joined(slot) > sh.node.cfg.max_watched_users_per_connection {
        // All or nothing: take back what this frame added.
        for t in &joined {
            sh.topic_leave(slot, t);
        }
        sh.send_error(
            slot,
            ErrorReason::TooLarge,
            id,
            "too many watched users",
            None,
        );
        return;
    }
    // Joined before reading: a change published from now on reaches this connection, and one
    // published before is in the records read here.
    answer_state(sh, slot, id, &me, &ids, true, None);
}

/// `presence.unwatch {user_ids}`: leave their topics (users not watched are ignored); answers
/// `presence.unwatched {data:{user_ids}}`.
pub fn unwatch(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<UsersCmd>(sh, slot, cmd) else {
        return;
    };
    let id = cmd.id;
    let Some(me) = identity(sh, slot, id) else {
        return;
    };
    let Some(ids) = checked_ids(sh, slot, id, c.user_ids.as_deref(), &me, false) else {
        return;
    };
    let mut list = Vec::with_capacity(2 + ids.len() * 16);
    list.push(b'[');
    for (i, user) in ids.iter().enumerate() {
        sh.topic_leave(slot, &topic(user));
        if i > 0 {
            list.push(b',');
        }
        write_str(&mut list, user);
    }
    list.push(b']');
    let list = String::from_utf8(list).expect("JSON written from str is UTF-8");
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "presence.unwatched")
            .id(id)
            .obj("data", |d| {
                d.raw("user_ids", &list);
            })
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

/// `presence.query {user_ids}` (answered here from the directory) or `presence.query {room}`
/// (answered by the room's owner).
pub fn query(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<UsersCmd>(sh, slot, cmd) else {
        return;
    };
    let id = cmd.id;
    match (&c.room, &c.user_ids) {
        (Some(_), Some(_)) => {
            sh.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "give either room or user_ids, not both",
                None,
            );
        }
        (Some(_), None) => room_query(sh, slot, id, c.room.as_deref()),
        (None, Some(_)) => {
            let Some(me) = identity(sh, slot, id) else {
                return;
            };
            let Some(ids) = checked_ids(sh, slot, id, c.user_ids.as_deref(), &me, true) else {
                return;
            };
            answer_state(sh, slot, id, &me, &ids, false, None);
        }
        (None, None) => {
            sh.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "user_ids or room is required",
                None,
            );
        }
    }
}

fn room_query(sh: &mut Shard, slot: u32, id: Option<&str>, room: Option<&str>) {
    let Some(room) = super::rooms::valid_room(sh, slot, room, id) else {
        return;
    };
    let cfg = &sh.node.cfg;
    let opts = crate::room_options::index_for(&cfg.rooms, room);
    if !crate::room_options::at(&cfg.rooms, opts).tracks_presence() {
        sh.send_error(
            slot,
            ErrorReason::BadRequest,
            id,
            "presence is not enabled for this room",
            None,
        );
        return;
    }
    let table = &sh.svc.rooms.table;
    let member = table.lookup(room).filter(|rid| {
        sh.clients[slot as usize]
            .rooms
            .iter()
            .any(|m| m.room == *rid)
    });
    let Some(rid) = member else {
        sh.send_error(
            slot,
            ErrorReason::NotSubscribed,
            id,
            "not subscribed to this room",
            None,
        );
        return;
    };
    let name = table.name_of(rid).clone();
    let to = super::rooms::owner(&name, sh.node.inboxes.len());
    let msg = Msg::RoomQuery {
        room: name,
        to: sh.conn_ref(slot),
        id: id.map(Box::from),
    };
    if !request(sh, to, msg) {
        sh.send_error(
            slot,
            ErrorReason::Busy,
            id,
            "server busy, retry later",
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_prefixed_user_ids() {
        assert_eq!(topic("bob"), "presence:bob");
        assert_eq!(user_owner("bob", 2), super::super::rooms::owner("bob", 2));
    }
}
