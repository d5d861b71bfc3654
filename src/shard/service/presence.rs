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
//! Requests (`presence.update`, a room query) answer `server busy, retry later` instead.

pub mod state;

pub use state::{Record, Status};

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde::Deserialize;

use super::{identity, parse, Cmd, ServiceMsg};
use crate::limits::{
    ID_BYTES_MAX, PRESENCE_OFFLINE_USERS_MAX, PRESENCE_OWED_MAX, PRESENCE_TEXT_BYTES_MAX,
    TIMER_TICK_MS,
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
    if !st.retry_scheduled {
        st.retry_scheduled = true;
        let tick = sh.now_tick + 1;
        sh.schedule_service(tick, super::id::PRESENCE, RETRY_KEY);
    }
}

fn retry_owed(sh: &mut Shard) {
    sh.svc.presence.retry_scheduled = false;
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
        sh.svc.presence.retry_scheduled = true;
        let tick = sh.now_tick + 1;
        sh.schedule_service(tick, super::id::PRESENCE, RETRY_KEY);
        return;
    }
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
    apply_devices(sh, out);
}

// ------------------------------------------------------------------ the owner

fn handle(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Arrive { user } => {
            let devices = sh.node.dir.users.count(&user);
            let out = sh.svc.presence.owner.arrive(&user, devices);
            apply_devices(sh, out);
        }
        Msg::Depart { user, at_ms } => {
            let grace_ms = sh.node.cfg.presence_offline_grace.as_millis() as u64;
            let out = sh.svc.presence.owner.depart(&user, at_ms, grace_ms);
            apply_devices(sh, out);
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
            if first && crate::room_options::at(&sh.node.cfg.rooms, opts).join_leave {
                // To the room's other members (the joining connection has `subscribed`).
                let f = encode_room_event(sh, "presence.join", &room, &user);
                sh.out.stats.presence_room_events += 1;
                sh.deliver(
                    &Target::Room {
                        room,
                        except: Some(conn),
                    },
                    &f,
                );
            }
        }
        Msg::RoomLeave { room, user, opts } => {
            let last = sh.svc.presence.owner.room_leave(&room, &user);
            if last && crate::room_options::at(&sh.node.cfg.rooms, opts).join_leave {
                let f = encode_room_event(sh, "presence.leave", &room, &user);
                sh.out.stats.presence_room_events += 1;
                sh.deliver(&Target::room(room), &f);
            }
        }
        Msg::RoomQuery { room, to, id } => {
            let cap = sh.node.cfg.max_presence_room_users;
            let (list, count) = sh.svc.presence.owner.room_users(&room, cap);
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
                    .id(id.as_deref())
                    .str("room", &room)
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
        Msg::Contacts {
            to,
            id,
            users,
            truncated,
        } => watch_contacts(sh, to, id.as_deref(), &users, truncated),
    }
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
    send_state(sh, slot, id, &me, &watched, Some(cut));
}

/// Carry out an owner step: directory records, the watchers' event, the grace timer.
fn apply(sh: &mut Shard, out: state::Out) {
    apply_from(sh, out, false);
}

/// [`apply`] for a step driven by this node's devices (a first device here, the grace after
/// the last one): clustered, whether the user came online or went offline is the cluster's
/// question, so the event goes to the bridge, which sends it on only if no other node holds
/// the user ([`crate::bridge::redis::Redis::presence`]).
fn apply_devices(sh: &mut Shard, out: state::Out) {
    apply_from(sh, out, true);
}

fn apply_from(sh: &mut Shard, out: state::Out, devices: bool) {
    for user in &out.forget {
        sh.node.dir.presence.remove(user);
        sh.out.stats.presence_forgotten += 1;
    }
    if let Some((user, rec)) = out.publish {
        if state::is_plain_online(&rec) {
            // The common state needs no record: no record and a device reads online.
            sh.node.dir.presence.remove(&user);
        } else {
            sh.node.dir.presence.set(user.clone(), rec.clone());
        }
        if let Some(ev) = out.event {
            let v = state::view(Some(&rec), 0, false);
            let f = encode_user(sh, ev.type_name(), None, &user, &v);
            sh.out.stats.presence_changes += 1;
            if sh.node.clustered {
                // Every event of the user's goes through the bridge, in order: a change of
                // this node's devices for Redis to judge, anything else told as it is after
                // it (a status change never overtakes the online it follows).
                let online = match ev {
                    state::Event::Online if devices => Some(true),
                    state::Event::Offline if devices => Some(false),
                    _ => None,
                };
                let msg = crate::bridge::BridgeMsg::Presence {
                    user: user.clone(),
                    online,
                    frame: f.clone(),
                };
                if sh.node.bridge_tx.try_send(msg).is_ok() {
                    return finish(sh, out.timer);
                }
                // The bridge is full: this node's judgement, told here as it is.
                sh.out.stats.bridge_dropped += 1;
            }
            let topic = Arc::from(topic(&user));
            sh.deliver(
                &Target::Topic {
                    topic,
                    except: None,
                },
                &f,
            );
        }
    } else {
        debug_assert!(out.event.is_none(), "an event without a record");
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

/// `presence.state {data:{users:[...]}}` for `ids`, read from the directory here (with
/// `truncated` for the `scope` form of `presence.watch`).
fn send_state(
    sh: &mut Shard,
    slot: u32,
    id: Option<&str>,
    me: &str,
    ids: &[&str],
    truncated: Option<bool>,
) {
    let dir = &sh.node.dir;
    let mut users = Vec::with_capacity(2 + ids.len() * 96);
    users.push(b'[');
    for (i, user) in ids.iter().enumerate() {
        let rec = dir.presence.get(user);
        let v = state::view(rec.as_deref(), dir.users.count(user), *user == me);
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
    send_state(sh, slot, id, &me, &ids, None);
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
            send_state(sh, slot, id, &me, &ids, None);
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
