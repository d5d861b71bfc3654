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

use std::borrow::Cow;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use serde::Deserialize;
use sonic_rs::LazyValue;

use super::Cmd;
use crate::bridge::BridgeMsg;
use crate::directory::Transition;
use crate::metrics::ErrorReason;
use crate::proto::envelope::{non_empty, parse_as, raw_or_null};
use crate::route::{Membership, RoomId, Target};
use crate::shard::Shard;

/// Per-shard state of the rooms service: room -> local members.
#[derive(Default)]
pub struct State {
    pub table: crate::route::RoomTable,
}

/// Rooms messages between shards.
pub enum Msg {
    /// A publish into an ordered room, for its owner shard to encode and deliver.
    Sequence {
        room: Arc<str>,
        client_id: u128,
        user: Option<Arc<str>>,
        data: Box<str>,
    },
}

#[derive(Deserialize)]
struct RoomCmd<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
}

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

fn parse<'a, T: Deserialize<'a>>(sh: &mut Shard, slot: u32, cmd: &Cmd<'a>) -> Option<T> {
    let parsed = parse_as::<T>(cmd.text);
    if parsed.is_none() {
        sh.send_error(
            slot,
            ErrorReason::InvalidJson,
            cmd.id,
            "invalid JSON format",
            None,
        );
    }
    parsed
}

pub fn subscribe(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<RoomCmd>(sh, slot, cmd) else {
        return;
    };
    if let Some(room) = valid_room(sh, slot, non_empty(&c.room), cmd.id) {
        join(sh, slot, room, cmd.id);
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
    sh.out.stats.publishes += 1;
    let opts = crate::room_options::at(&sh.node.cfg.rooms, sh.svc.rooms.table.room(rid).opts);
    if opts.sequenced() {
        let own = owner(room, sh.node.inboxes.len());
        if own != sh.id {
            let msg = crate::shard::ShardMsg::Service(super::ServiceMsg::Rooms(Msg::Sequence {
                room: name,
                client_id,
                user,
                data: raw_or_null(&c.data).into(),
            }));
            if sh.node.inboxes.send(own, msg).is_ok() {
                sh.out.stats.cross_shard_sent += 1;
            } else {
                sh.out.stats.cross_shard_dropped += 1;
                sh.send_error(
                    slot,
                    ErrorReason::Busy,
                    id,
                    "server busy, retry later",
                    None,
                );
            }
            return;
        }
    }
    let f = encode_message(
        sh,
        Some(&name),
        raw_or_null(&c.data),
        client_id,
        user.as_deref(),
    );
    sh.deliver(&Target::room(name), &f);
}

/// The `message` frame of a publish (`room` set) or a broadcast.
fn encode_message(
    sh: &mut Shard,
    room: Option<&str>,
    data: &str,
    client_id: u128,
    user: Option<&str>,
) -> crate::proto::Frame {
    let now_ms = sh.now_ms;
    sh.fb.text(sh.now_us, |o| {
        o.str("type", "message");
        if let Some(room) = room {
            o.str("room", room);
        }
        o.raw("data", data).uuid("client_id", client_id);
        if let Some(u) = user {
            o.str("user_id", u);
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
    let f = encode_message(sh, None, raw_or_null(&c.data), client_id, user.as_deref());
    sh.out.stats.broadcasts += 1;
    sh.deliver(&Target::All, &f);
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Sequence {
            room,
            client_id,
            user,
            data,
        } => {
            let f = encode_message(sh, Some(&room), &data, client_id, user.as_deref());
            sh.deliver(&Target::room(room), &f);
        }
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

/// Subscribe `slot` to `room` (a valid name) and queue `subscribed` or the error.
pub fn join(sh: &mut Shard, slot: u32, room: &str, id: Option<&str>) {
    let c = &sh.clients[slot as usize];
    if !c.allows_room(room) {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    }
    let count = if membership(sh, slot, room).is_some() {
        sh.node.dir.rooms.count(room).max(1)
    } else {
        if c.rooms.len() >= sh.node.cfg.max_rooms_per_connection {
            sh.send_error(slot, ErrorReason::TooManyRooms, id, "too many rooms", None);
            return;
        }
        let name = match sh.svc.rooms.table.lookup(room) {
            Some(rid) => sh.svc.rooms.table.name_of(rid).clone(),
            None => Arc::from(room),
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
        let rooms_cfg = &sh.node.cfg.rooms;
        let joined = sh.svc.rooms.table.join_with(&name, slot, || {
            crate::room_options::index_for(rooms_cfg, &name)
        });
        sh.clients[slot as usize].rooms.push(joined.membership);
        let opts = sh.svc.rooms.table.room(joined.membership.room).opts;
        if joined.first_local {
            let t = sh.node.dir.rooms.arrive(&name, sh.id);
            report_transition(sh, name.clone(), t);
        }
        if tracks_presence(sh, slot, opts) {
            super::on_room_joined(sh, slot, &name, opts);
        }
        count
    };
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "subscribed")
            .id(id)
            .str("room", room)
            .obj("data", |d| {
                d.str("room", room).u64("client_count", count as u64);
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
        let t = sh.node.dir.rooms.depart(&left.name, sh.id);
        report_transition(sh, left.name, t);
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
