//! Typing indicators: `typing.start` / `typing.stop` (PROTOCOL.md section 12), to a room's other
//! subscribers ([`Target::Room`] without the sender), to a conversation with a user (every
//! device of `to` and the sender's other devices, [`Target::User`] without the sender), or to a
//! stored conversation (`conversationId` alone): the state is kept here like the others, but
//! only the bridge knows the thread's participants, so each event (a start, a stop, a TTL or
//! disconnect stop; never a renewal) is handed to it as a [`ConvJob`], which checks the
//! sender takes part, builds the frame once and delivers it to every participant's devices
//! except the sending connection. A refusal comes back as [`Msg::Refused`]: the state is
//! dropped without a frame and the command's error is sent.
//!
//! State: one [`Table`] per shard, a typing state per (connection, target) with its deadline,
//! at most [`TYPING_TARGETS_PER_CONNECTION_MAX`] per connection; only connections that are
//! typing have an entry, so an idle connection costs nothing here. The table is sans-IO: it
//! takes ticks and returns what happened ([`Start`], [`Fire`]); this module turns that into
//! frames. A renewal inside `typing_ttl` sends nothing (coalesced, counted); an expired state
//! sends `typing.stop` from the server (one keyed wheel entry per state, re-armed when it fires
//! early); a detach ends every state of the connection with a `typing.stop` each.
//!
//! Typing frames are droppable ([`droppable`]): a recipient falling behind loses them first.
//! They are never persisted nor replayed, and a full shard inbox loses them silently (counted
//! in `switchboard_cross_shard_dropped_total`). Typing in a sequenced room is not ordered
//! through the room's owner shard: an indicator has no place in the message order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use slab::Slab;

use super::Cmd;
use crate::bridge::store::{ConvEvent, ConvJob};
use crate::limits::{ID_BYTES_MAX, TYPING_TARGETS_PER_CONNECTION_MAX};
use crate::metrics::ErrorReason;
use crate::proto::envelope::{droppable, non_empty};
use crate::proto::Frame;
use crate::route::{ConnRef, Target};
use crate::shard::timer::SERVICE_KEY_MAX;
use crate::shard::Shard;

/// What a connection types into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypingTarget {
    /// A room (the room table's own name).
    Room(Arc<str>),
    /// A conversation with user `to` (its id given or derived).
    Conversation {
        to: Arc<str>,
        conversation: Arc<str>,
    },
    /// A stored conversation, by the id the client gave (text or numeric: two names of one
    /// thread are two states).
    Thread(Arc<str>),
}

/// A [`TypingTarget`] borrowed from a command (no allocation on a renewal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetRef<'a> {
    Room(&'a str),
    Conversation { to: &'a str, conversation: &'a str },
    Thread(&'a str),
}

impl TypingTarget {
    fn is(&self, r: TargetRef<'_>) -> bool {
        match (self, r) {
            (TypingTarget::Room(a), TargetRef::Room(b)) => **a == *b,
            (
                TypingTarget::Conversation { to, conversation },
                TargetRef::Conversation {
                    to: t,
                    conversation: c,
                },
            ) => **to == *t && **conversation == *c,
            (TypingTarget::Thread(a), TargetRef::Thread(b)) => **a == *b,
            _ => false,
        }
    }

    fn as_ref(&self) -> TargetRef<'_> {
        match self {
            TypingTarget::Room(r) => TargetRef::Room(r),
            TypingTarget::Conversation { to, conversation } => {
                TargetRef::Conversation { to, conversation }
            }
            TypingTarget::Thread(t) => TargetRef::Thread(t),
        }
    }
}

/// One typing state.
#[derive(Debug)]
pub struct Entry {
    pub slot: u32,
    pub gen: u32,
    pub user: Arc<str>,
    pub target: TypingTarget,
    /// The tick at which the state ends unless renewed.
    pub deadline: u32,
    /// Tells a reused slab index's wheel entries from the old ones (24 bits).
    serial: u32,
}

/// A connection's typing states.
#[derive(Debug)]
struct ConnStates {
    gen: u32,
    entries: Vec<u32>,
}

/// What [`Table::start`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// A new state: send `typing.start`, schedule `key` at `tick`.
    New { key: u64, tick: u32 },
    /// The state existed: its deadline moved, nothing to send.
    Renewed,
    /// The connection is at [`TYPING_TARGETS_PER_CONNECTION_MAX`].
    Full,
}

/// What a wheel entry of this service means when it fires.
#[derive(Debug)]
pub enum Fire {
    /// Its state is gone (stopped, detached, or the index reused): nothing to do.
    Stale,
    /// Renewed since it was scheduled: schedule `key` again at `tick`.
    Rearm { key: u64, tick: u32 },
    /// Not renewed in time: the state is removed; send its `typing.stop`.
    Expired(Entry),
}

const SERIAL_MASK: u32 = (1 << 24) - 1;

/// The typing states of one shard (sans-IO: ticks in, decisions out).
#[derive(Default)]
pub struct Table {
    entries: Slab<Entry>,
    by_conn: HashMap<u32, ConnStates>,
    next_serial: u32,
}

/// A wheel key: slab index in bits 0..32, serial in bits 32..56.
fn key_of(idx: usize, serial: u32) -> u64 {
    debug_assert!(idx <= u32::MAX as usize);
    let key = (idx as u64 & 0xFFFF_FFFF) | ((serial & SERIAL_MASK) as u64) << 32;
    debug_assert!(key <= SERVICE_KEY_MAX);
    key
}

impl Table {
    /// Typing states held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Connection (`slot`, `gen`) starts typing into `target`: a new state ending at tick
    /// `deadline`, or a renewal of the one it has (its deadline moves to `deadline`).
    pub fn start(
        &mut self,
        slot: u32,
        gen: u32,
        user: &Arc<str>,
        target: TargetRef<'_>,
        owned: impl FnOnce() -> TypingTarget,
        deadline: u32,
    ) -> Start {
        self.purge_other_gen(slot, gen);
        if let Some(idx) = self.find(slot, gen, target) {
            self.entries[idx].deadline = deadline;
            return Start::Renewed;
        }
        let conn = self.by_conn.entry(slot).or_insert(ConnStates {
            gen,
            entries: Vec::new(),
        });
        if conn.entries.len() >= TYPING_TARGETS_PER_CONNECTION_MAX {
            return Start::Full;
        }
        let serial = self.next_serial & SERIAL_MASK;
        self.next_serial = self.next_serial.wrapping_add(1);
        let idx = self.entries.insert(Entry {
            slot,
            gen,
            user: user.clone(),
            target: owned(),
            deadline,
            serial,
        });
        conn.entries.push(idx as u32);
        Start::New {
            key: key_of(idx, serial),
            tick: deadline,
        }
    }

    /// Connection (`slot`, `gen`) stops typing into `target`: the removed state, if it had one.
    pub fn stop(&mut self, slot: u32, gen: u32, target: TargetRef<'_>) -> Option<Entry> {
        let idx = self.find(slot, gen, target)?;
        Some(self.remove(idx))
    }

    /// A wheel entry with `key` fired at tick `now`.
    pub fn fire(&mut self, key: u64, now: u32) -> Fire {
        let idx = (key & 0xFFFF_FFFF) as usize;
        let serial = ((key >> 32) as u32) & SERIAL_MASK;
        match self.entries.get(idx) {
            Some(e) if e.serial == serial => {
                if now >= e.deadline {
                    Fire::Expired(self.remove(idx))
                } else {
                    Fire::Rearm {
                        key,
                        tick: e.deadline,
                    }
                }
            }
            _ => Fire::Stale,
        }
    }

    /// Every state of connection `slot`, removed (it is detaching).
    pub fn end_conn(&mut self, slot: u32) -> Vec<Entry> {
        let Some(conn) = self.by_conn.remove(&slot) else {
            return Vec::new();
        };
        conn.entries
            .into_iter()
            .map(|i| self.entries.remove(i as usize))
            .collect()
    }

    fn find(&self, slot: u32, gen: u32, target: TargetRef<'_>) -> Option<usize> {
        let conn = self.by_conn.get(&slot).filter(|c| c.gen == gen)?;
        conn.entries
            .iter()
            .map(|&i| i as usize)
            .find(|&i| self.entries[i].target.is(target))
    }

    fn remove(&mut self, idx: usize) -> Entry {
        let e = self.entries.remove(idx);
        if let Some(conn) = self.by_conn.get_mut(&e.slot) {
            conn.entries.retain(|&i| i as usize != idx);
            if conn.entries.is_empty() {
                self.by_conn.remove(&e.slot);
            }
        }
        e
    }

    /// States of an earlier connection in `slot` (its detach should have ended them): drop
    /// them without a frame rather than attribute them to the new connection.
    fn purge_other_gen(&mut self, slot: u32, gen: u32) {
        if self.by_conn.get(&slot).is_some_and(|c| c.gen != gen) {
            debug_assert!(false, "typing states outlived their connection");
            let _ = self.end_conn(slot);
        }
    }
}

#[derive(Deserialize)]
struct TypingCmd<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
}

pub fn start(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    handle(sh, slot, cmd, true);
}

pub fn stop(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    handle(sh, slot, cmd, false);
}

fn handle(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>, starting: bool) {
    let id = cmd.id;
    let Some(c) = super::parse::<TypingCmd>(sh, slot, cmd) else {
        return;
    };
    let Some(user) = super::identity(sh, slot, id) else {
        return;
    };
    let derived;
    let target = match (&c.room, &c.to) {
        (Some(_), Some(_)) => {
            let text = "give room or to, not both";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
        (None, None) => match non_empty(&c.conversation_id) {
            Some(cid) if cid.len() <= ID_BYTES_MAX => TargetRef::Thread(cid),
            Some(_) => {
                let text = "conversationId too long";
                sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
                return;
            }
            None => {
                let text = "room, to or conversationId is required";
                sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
                return;
            }
        },
        (Some(_), None) => {
            let Some(room) = super::rooms::valid_room(sh, slot, non_empty(&c.room), id) else {
                return;
            };
            TargetRef::Room(room)
        }
        (None, Some(_)) => {
            let Some(to) = non_empty(&c.to).filter(|t| t.len() <= ID_BYTES_MAX) else {
                sh.send_error(slot, ErrorReason::BadRequest, id, "to is required", None);
                return;
            };
            let conversation = match non_empty(&c.conversation_id) {
                Some(cid) if cid.len() <= ID_BYTES_MAX => cid,
                Some(_) => {
                    let text = "conversationId too long";
                    sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
                    return;
                }
                None => {
                    derived = super::dm::derive_conversation_id(&user, to);
                    &derived
                }
            };
            TargetRef::Conversation { to, conversation }
        }
    };
    let gen = sh.clients[slot as usize].gen;
    if !starting {
        // An active state ends whatever changed since (an unsubscribe, a narrower claim).
        if let Some(e) = sh.svc.typing.stop(slot, gen, target) {
            send(sh, &e, "typing.stop", Some(id));
            return;
        }
    }
    // The checks of a start; a stop with nothing to end reports them too, then sends nothing.
    let room = match target {
        TargetRef::Room(room) => {
            let rid = sh.svc.rooms.table.lookup(room).filter(|&rid| {
                sh.clients[slot as usize]
                    .rooms
                    .iter()
                    .any(|m| m.room == rid)
            });
            let Some(rid) = rid else {
                let text = "not subscribed to this room";
                sh.send_error(slot, ErrorReason::NotSubscribed, id, text, None);
                return;
            };
            Some(sh.svc.rooms.table.name_of(rid).clone())
        }
        TargetRef::Conversation { to, .. } => {
            if !super::policy::may_address(sh, slot, to) {
                sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
                return;
            }
            None
        }
        // Taking part in the thread is the permission, checked by the bridge on each event;
        // a stop with no state to end sends nothing and asks nobody.
        TargetRef::Thread(_) => None,
    };
    if !starting {
        return;
    }
    let deadline = sh
        .now_tick
        .saturating_add(crate::shard::ticks(sh.node.cfg.typing_ttl));
    let owned = || match (room, target) {
        (Some(room), _) => TypingTarget::Room(room),
        (None, TargetRef::Conversation { to, conversation }) => TypingTarget::Conversation {
            to: Arc::from(to),
            conversation: Arc::from(conversation),
        },
        (None, TargetRef::Room(room)) => TypingTarget::Room(Arc::from(room)),
        (None, TargetRef::Thread(t)) => TypingTarget::Thread(Arc::from(t)),
    };
    match sh
        .svc
        .typing
        .start(slot, gen, &user, target, owned, deadline)
    {
        Start::Renewed => sh.out.stats.typing_coalesced += 1,
        Start::Full => {
            let text = "too many typing targets";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
        }
        Start::New { key, tick } => {
            sh.schedule_service(tick, super::id::TYPING, key);
            let me = ConnRef {
                node: sh.node.id,
                shard: sh.id as u16,
                slot,
                gen,
            };
            if let TargetRef::Thread(t) = target {
                to_thread(sh, me, &user, t, true, Some(id));
                return;
            }
            let f = encode(sh, "typing.start", &user, target);
            deliver(sh, me, &user, target, &f);
        }
    }
}

/// Hand a typing event for stored conversation `thread` to the bridge (`id`: the command's,
/// `None` for a stop the server makes). A full bridge inbox loses it (counted in
/// `switchboard_bridge_dropped_total`), as a full shard inbox loses any typing frame.
fn to_thread(
    sh: &mut Shard,
    me: ConnRef,
    user: &Arc<str>,
    thread: &str,
    start: bool,
    id: Option<Option<&str>>,
) {
    sh.out.stats.typing_sent += 1;
    let job = crate::bridge::StoreJob::Conversation(Box::new(ConvJob {
        origin: me,
        user: user.clone(),
        conversation: Arc::from(thread),
        what: ConvEvent::Typing {
            start,
            id: id.map(|i| i.map(Box::from)),
        },
    }));
    let _ = sh.hand_to_store(job);
}

/// Typing messages from the bridge.
pub enum Msg {
    /// The bridge refused a typing event of connection (`slot`, `gen`) for `conversation`
    /// (`text`: not found, not a participant, store unavailable): drop its state there
    /// without a frame, and answer the command `id` with `text`.
    Refused {
        slot: u32,
        gen: u32,
        conversation: Arc<str>,
        id: Option<Box<str>>,
        text: &'static str,
    },
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Refused {
            slot,
            gen,
            conversation,
            id,
            text,
        } => {
            if !sh.live(slot, gen) {
                return;
            }
            let _ = sh
                .svc
                .typing
                .stop(slot, gen, TargetRef::Thread(&conversation));
            let reason = if text == crate::store::Refusal::NotParticipant.text() {
                ErrorReason::NotAllowed
            } else if text == crate::bridge::store::STORE_UNAVAILABLE {
                ErrorReason::Busy
            } else {
                ErrorReason::BadRequest
            };
            sh.send_error(slot, reason, id.as_deref(), text, None);
        }
    }
}

/// Send `kind` for a state (a stop: asked for, with the command's `id`; expired, or ended by
/// a detach, `None`).
fn send(sh: &mut Shard, e: &Entry, kind: &str, id: Option<Option<&str>>) {
    let me = ConnRef {
        node: sh.node.id,
        shard: sh.id as u16,
        slot: e.slot,
        gen: e.gen,
    };
    if let TypingTarget::Thread(t) = &e.target {
        to_thread(sh, me, &e.user, t, kind == "typing.start", id);
        return;
    }
    let f = encode(sh, kind, &e.user, e.target.as_ref());
    deliver(sh, me, &e.user, e.target.as_ref(), &f);
}

/// The event frame: droppable, never carrying the command's `id` (it goes to others).
fn encode(sh: &mut Shard, kind: &str, user: &str, target: TargetRef<'_>) -> Frame {
    let now_ms = sh.now_ms;
    sh.fb.text(droppable(sh.now_us), |o| {
        o.str("type", kind);
        match target {
            TargetRef::Room(room) => {
                o.str("room", room).obj("data", |d| {
                    d.str("user_id", user).str("room", room);
                });
            }
            TargetRef::Conversation { to, conversation } => {
                o.obj("data", |d| {
                    d.str("user_id", user)
                        .str("to", to)
                        .str("conversationId", conversation);
                });
            }
            TargetRef::Thread(_) => debug_assert!(false, "stored conversations: the bridge"),
        }
        o.u64("timestamp", now_ms);
    })
}

/// Hand an event to the seam: the room without the sender, or every device of `to` and the
/// sender's other devices (once when they are the same user).
fn deliver(sh: &mut Shard, me: ConnRef, user: &Arc<str>, target: TargetRef<'_>, f: &Frame) {
    sh.out.stats.typing_sent += 1;
    match target {
        TargetRef::Room(room) => {
            let room = match sh.svc.rooms.table.lookup(room) {
                Some(rid) => sh.svc.rooms.table.name_of(rid).clone(),
                None => Arc::from(room),
            };
            sh.deliver(
                &Target::Room {
                    room,
                    except: Some(me),
                },
                f,
            );
        }
        TargetRef::Conversation { to, .. } => {
            let to_self = **user == *to;
            let to_target = Target::User {
                user: Arc::from(to),
                except: to_self.then_some(me),
            };
            sh.deliver(&to_target, f);
            if !to_self {
                let from_target = Target::User {
                    user: user.clone(),
                    except: Some(me),
                };
                sh.deliver(&from_target, f);
            }
        }
        TargetRef::Thread(_) => debug_assert!(false, "stored conversations: the bridge"),
    }
}

/// A wheel entry of this service fired.
pub fn on_timer(sh: &mut Shard, key: u64) {
    match sh.svc.typing.fire(key, sh.now_tick) {
        Fire::Stale => {}
        Fire::Rearm { key, tick } => {
            sh.schedule_service(tick, super::id::TYPING, key);
        }
        Fire::Expired(e) => {
            sh.out.stats.typing_ttl_stops += 1;
            send(sh, &e, "typing.stop", None);
        }
    }
}

/// The connection is detaching: end every typing state it has, a `typing.stop` each.
pub fn on_detach(sh: &mut Shard, slot: u32) {
    for e in sh.svc.typing.end_conn(slot) {
        send(sh, &e, "typing.stop", None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: fn() -> Arc<str> = || Arc::from("alice");

    fn room(name: &str) -> (TargetRef<'_>, impl FnOnce() -> TypingTarget + '_) {
        (TargetRef::Room(name), move || {
            TypingTarget::Room(Arc::from(name))
        })
    }

    fn start(t: &mut Table, slot: u32, gen: u32, name: &str, now: u32) -> Start {
        let (r, owned) = room(name);
        t.start(slot, gen, &ALICE(), r, owned, now + 10)
    }

    #[test]
    fn renewal_extends_and_fires_rearm_then_expire() {
        let mut t = Table::default();
        let Start::New { key, tick } = start(&mut t, 3, 1, "chat", 100) else {
            panic!("first start is new");
        };
        assert_eq!(tick, 110);
        assert_eq!(start(&mut t, 3, 1, "chat", 105), Start::Renewed);
        // The wheel entry fires at the first deadline: renewed, so it goes again at 115.
        match t.fire(key, 110) {
            Fire::Rearm { key: k, tick } => {
                assert_eq!((k, tick), (key, 115));
            }
            other => panic!("{other:?}"),
        }
        match t.fire(key, 115) {
            Fire::Expired(e) => {
                assert_eq!((e.slot, e.gen, &*e.user), (3, 1, "alice"));
                assert_eq!(e.target, TypingTarget::Room(Arc::from("chat")));
            }
            other => panic!("{other:?}"),
        }
        assert!(t.is_empty());
        assert!(t.by_conn.is_empty());
        assert!(matches!(t.fire(key, 200), Fire::Stale));
    }

    #[test]
    fn stop_removes_and_stale_keys_stay_stale_after_reuse() {
        let mut t = Table::default();
        let Start::New { key: old, .. } = start(&mut t, 1, 1, "a", 0) else {
            panic!()
        };
        assert!(t.stop(1, 1, TargetRef::Room("b")).is_none());
        assert!(t.stop(1, 2, TargetRef::Room("a")).is_none(), "another gen");
        let e = t.stop(1, 1, TargetRef::Room("a")).expect("active");
        assert_eq!(e.target, TypingTarget::Room(Arc::from("a")));
        assert!(t.stop(1, 1, TargetRef::Room("a")).is_none(), "stopped once");
        // The slab index is reused by the next state; the old key must not reach it.
        let Start::New { key: new, .. } = start(&mut t, 1, 1, "a", 0) else {
            panic!()
        };
        assert_ne!(old, new);
        assert!(matches!(t.fire(old, 50), Fire::Stale));
        assert!(matches!(t.fire(new, 50), Fire::Expired(_)));
    }

    #[test]
    fn bounded_per_connection() {
        let mut t = Table::default();
        for i in 0..TYPING_TARGETS_PER_CONNECTION_MAX {
            assert!(matches!(
                start(&mut t, 7, 1, &format!("r{i}"), 0),
                Start::New { .. }
            ));
        }
        assert_eq!(start(&mut t, 7, 1, "one-more", 0), Start::Full);
        // A renewal of a held target still works at the limit; other connections are apart.
        assert_eq!(start(&mut t, 7, 1, "r0", 1), Start::Renewed);
        assert!(matches!(
            start(&mut t, 8, 1, "one-more", 0),
            Start::New { .. }
        ));
        assert!(t.stop(7, 1, TargetRef::Room("r3")).is_some());
        assert!(matches!(
            start(&mut t, 7, 1, "one-more", 0),
            Start::New { .. }
        ));
    }

    #[test]
    fn rooms_and_conversations_are_distinct_targets() {
        let mut t = Table::default();
        let conv = |to: &'static str, c: &'static str| {
            (
                TargetRef::Conversation {
                    to,
                    conversation: c,
                },
                move || TypingTarget::Conversation {
                    to: Arc::from(to),
                    conversation: Arc::from(c),
                },
            )
        };
        let (r, o) = conv("bob", "c1");
        assert!(matches!(
            t.start(1, 1, &ALICE(), r, o, 10),
            Start::New { .. }
        ));
        let (r, o) = conv("bob", "c2");
        assert!(matches!(
            t.start(1, 1, &ALICE(), r, o, 10),
            Start::New { .. }
        ));
        let (r, o) = conv("bob", "c1");
        assert_eq!(t.start(1, 1, &ALICE(), r, o, 10), Start::Renewed);
        // A room named like the user is another target.
        assert!(matches!(start(&mut t, 1, 1, "bob", 0), Start::New { .. }));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn end_conn_takes_every_state_of_that_connection_only() {
        let mut t = Table::default();
        start(&mut t, 1, 1, "a", 0);
        start(&mut t, 1, 1, "b", 0);
        start(&mut t, 2, 1, "a", 0);
        let mut ended: Vec<TypingTarget> = t.end_conn(1).into_iter().map(|e| e.target).collect();
        ended.sort_by_key(|t| format!("{t:?}"));
        assert_eq!(
            ended,
            [
                TypingTarget::Room(Arc::from("a")),
                TypingTarget::Room(Arc::from("b"))
            ]
        );
        assert!(t.end_conn(1).is_empty(), "idempotent");
        assert_eq!(t.len(), 1);
        assert!(t.stop(2, 1, TargetRef::Room("a")).is_some());
    }

    #[test]
    fn entry_budget() {
        // Per typing state: the entry in the slab, plus its index in the connection's list;
        // per typing connection: one map entry (slot, gen, Vec). Idle connections: nothing.
        // A third kind of target (a stored thread) took the enum's niche: a tag word more.
        assert_eq!(std::mem::size_of::<TypingTarget>(), 40);
        assert_eq!(std::mem::size_of::<Entry>(), 72);
        assert_eq!(std::mem::size_of::<ConnStates>(), 32);
    }

    #[test]
    fn keys_fit_the_wheel_and_serials_wrap() {
        assert!(key_of(u32::MAX as usize, u32::MAX) <= SERVICE_KEY_MAX);
        let mut t = Table {
            next_serial: u32::MAX,
            ..Table::default()
        };
        let Start::New { key, .. } = start(&mut t, 1, 1, "a", 0) else {
            panic!()
        };
        assert!(key <= SERVICE_KEY_MAX);
        assert!(matches!(t.fire(key, 10), Fire::Expired(_)));
    }
}
