//! The sans-IO core of presence: what the owner shard of a user (or of a room) decides, given
//! the node's device counts and the time, with no sockets, no frames and no clock of its own.
//!
//! Owns, for the users this shard owns (a fixed hash of the user id): whether the user is
//! online as watchers see it, the status and text the user chose, `last_seen`, the pending
//! offline grace (one keyed timer per user at most), and the oldest-first list of offline
//! users it still remembers. For the rooms it owns that track presence: room -> user ->
//! devices in the room, node-wide. It returns [`Out`]: a record to publish in the directory,
//! an event for watchers, records to forget, a timer to schedule. The glue in the parent
//! module turns those into frames and deliveries; it must not decide anything itself.
//!
//! Device counts are inputs (`devices`: the directory's node-wide count, read when the owner
//! acts), because reports from two shards can arrive in either order: the owner never counts
//! devices itself, it only re-checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A user's status as the directory record holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// No device connected (after the grace), or never seen.
    Offline,
    Online,
    Away,
    Busy,
    /// Connected, but looks offline to everyone else.
    Invisible,
}

impl Status {
    /// A status a client may set with `presence.update` (`offline` is not one).
    pub fn settable(s: &str) -> Option<Status> {
        match s {
            "online" => Some(Status::Online),
            "away" => Some(Status::Away),
            "busy" => Some(Status::Busy),
            "invisible" => Some(Status::Invisible),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Offline => "offline",
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Invisible => "invisible",
        }
    }

    /// Whether others see the user online.
    pub fn visible(self) -> bool {
        matches!(self, Status::Online | Status::Away | Status::Busy)
    }
}

/// A user's presence as its owner last published it: immutable, replaced whole on change
/// (changes are rare; readers on every shard take an `Arc` clone without a round trip).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub status: Status,
    pub text: Option<Box<str>>,
    /// Unix ms the user was last seen by others: when the last device left (offline) or when
    /// the user went invisible. 0 = never (`null`).
    pub last_seen_ms: u64,
}

/// What one reader sees of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View<'a> {
    pub status: &'static str,
    pub text: Option<&'a str>,
    pub devices: u32,
    /// 0 = `null` (online, or never seen).
    pub last_seen_ms: u64,
}

/// The view of `rec` (None: never seen or forgotten) for a reader; `devices` is the node-wide
/// count; `is_self`: the reader is the user (who sees its own true status, invisible included).
pub fn view(rec: Option<&Record>, devices: u32, is_self: bool) -> View<'_> {
    let Some(r) = rec else {
        if devices > 0 {
            // A connected user in the plain online state has no record (`is_plain_online`).
            return View {
                status: Status::Online.as_str(),
                text: None,
                devices,
                last_seen_ms: 0,
            };
        }
        return View {
            status: Status::Offline.as_str(),
            text: None,
            devices: if is_self { devices } else { 0 },
            last_seen_ms: 0,
        };
    };
    if r.status.visible() || (is_self && r.status == Status::Invisible) {
        View {
            status: r.status.as_str(),
            text: r.text.as_deref(),
            devices,
            last_seen_ms: 0,
        }
    } else {
        View {
            status: Status::Offline.as_str(),
            text: None,
            devices: if is_self { devices } else { 0 },
            last_seen_ms: r.last_seen_ms,
        }
    }
}

/// Whether this node holds `user` present, from its record and its device count here: a
/// device, or a record that is not offline (the offline grace after the last device here).
/// Clustered, users not held here are read from Redis ([`Remote`]).
pub fn held_here(rec: Option<&Record>, devices: u32) -> bool {
    devices > 0 || rec.is_some_and(|r| r.status != Status::Offline)
}

/// A user's presence as the cluster's watchers last heard it, as its owner writes it to Redis
/// (`<p>{topic:presence:<id>}:rec`): `<status> <last_seen ms> <text>`, the status as others
/// see it (`online`, `away`, `busy`, `offline`: invisible is written `offline`), `0` for no
/// `last_seen`, and the text (empty: none) as the rest of the line.
pub fn encode_remote(v: &View<'_>) -> String {
    let text = v.text.unwrap_or("");
    let mut s = String::with_capacity(24 + text.len());
    s.push_str(v.status);
    s.push(' ');
    s.push_str(&v.last_seen_ms.to_string());
    s.push(' ');
    s.push_str(text);
    s
}

/// The record of a user that left every node at `at_ms` (as [`encode_remote`] writes an
/// offline view with that `last_seen` and no text).
pub fn encode_offline(at_ms: u64) -> String {
    format!("offline {at_ms} ")
}

/// A user read from Redis: how many nodes hold it present (`<p>{topic:presence:<id>}:nodes`)
/// and its record there ([`encode_remote`]; None: no record, or one not understood).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub nodes: u32,
    pub status: Status,
    pub text: Option<Box<str>>,
    pub last_seen_ms: u64,
}

impl Remote {
    /// From `SCARD` of the nodes set and `GET` of the record (never panics on a reply).
    pub fn read(nodes: u64, rec: Option<&str>) -> Remote {
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
        let parsed = rec.and_then(|r| {
            let mut it = r.splitn(3, ' ');
            let status = match it.next()? {
                "online" => Status::Online,
                "away" => Status::Away,
                "busy" => Status::Busy,
                "offline" => Status::Offline,
                _ => return None,
            };
            let last_seen_ms = it.next()?.parse::<u64>().ok()?;
            let text = it.next().filter(|t| !t.is_empty()).map(Box::from);
            Some((status, text, last_seen_ms))
        });
        let (status, text, last_seen_ms) = parsed.unwrap_or((Status::Online, None, 0));
        if nodes == 0 {
            // No node holds the user: offline, whatever the record said last (its
            // `last_seen` kept when it has one).
            return Remote {
                nodes,
                status: Status::Offline,
                text: None,
                last_seen_ms: if status == Status::Offline {
                    last_seen_ms
                } else {
                    0
                },
            };
        }
        if status == Status::Offline {
            // Held somewhere, but invisible: offline to everyone else.
            return Remote {
                nodes,
                status,
                text: None,
                last_seen_ms,
            };
        }
        Remote {
            nodes,
            status,
            text,
            last_seen_ms: 0,
        }
    }

    /// What a reader on this node sees: `devices` is the number of nodes holding the user
    /// (each holds a device or is in its grace; this node holds none), 0 while it looks
    /// offline.
    pub fn view(&self) -> View<'_> {
        let online = self.status.visible();
        View {
            status: self.status.as_str(),
            text: if online { self.text.as_deref() } else { None },
            devices: if online { self.nodes } else { 0 },
            last_seen_ms: if online { 0 } else { self.last_seen_ms },
        }
    }
}

/// A (room, user) pair as a member of a node's set of room presences in Redis
/// (`<p>{node:<hex>}:rooms`, for its reaper): `<room length>:<room><user>`, so that any
/// bytes in either name survive.
pub fn encode_room_member(room: &str, user: &str) -> String {
    format!("{}:{room}{user}", room.len())
}

/// The (room, user) of [`encode_room_member`]; None for anything else.
pub fn decode_room_member(m: &str) -> Option<(&str, &str)> {
    let (len, rest) = m.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if len == 0 || len >= rest.len() || !rest.is_char_boundary(len) {
        return None;
    }
    Some(rest.split_at(len))
}

/// The answer to a room query, clustered: `found` (up to `cap` of the room's users from its
/// hash in Redis, each with the number of nodes holding it there) and `count` (the hash's
/// size) merged with this owner's `local` users (with their devices on this node, which
/// replace the node count). Local users Redis does not list yet (their join still on the
/// way) are added while the list is not cut. Returns the list (at most `cap`) and the count.
pub fn merge_room(
    local: &[(&str, u32)],
    found: &[(Box<str>, u32)],
    count: usize,
    cap: usize,
) -> (Vec<(Box<str>, u32)>, usize) {
    let here: HashMap<&str, u32> = local.iter().copied().collect();
    let mut list: Vec<(Box<str>, u32)> = Vec::with_capacity(found.len().min(cap));
    let mut listed: HashSet<&str> = HashSet::with_capacity(found.len());
    for (u, nodes) in found.iter().take(cap) {
        if !listed.insert(u) {
            continue;
        }
        list.push((u.clone(), here.get(&**u).copied().unwrap_or(*nodes)));
    }
    let mut count = count.max(list.len());
    if list.len() == count {
        // Redis listed the whole room: add the local users it does not know yet.
        for (u, d) in local {
            if !listed.contains(u) {
                count += 1;
                if list.len() < cap {
                    list.push((Box::from(*u), *d));
                }
            }
        }
    }
    (list, count)
}

/// An event for a user's watchers (its data is the published record's public view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Online,
    Offline,
    Update,
}

impl Event {
    pub fn type_name(self) -> &'static str {
        match self {
            Event::Online => "presence.online",
            Event::Offline => "presence.offline",
            Event::Update => "presence.update",
        }
    }
}

/// What the glue must do after one owner step.
#[derive(Debug, Default)]
pub struct Out {
    /// Replace the user's directory record with this one.
    pub publish: Option<(Arc<str>, Arc<Record>)>,
    /// Tell the user's watchers (with the published record).
    pub event: Option<Event>,
    /// Remove these users' records (forgotten, oldest offline first).
    pub forget: Vec<Arc<str>>,
    /// Schedule the grace timer `key` to fire at `due_ms` (Unix ms) or later.
    pub timer: Option<(u64, u64)>,
    /// The node's hold of the user changed (clustered, Redis judges it): true = it holds the
    /// user present now (a first device after offline, or a status set before the arrival
    /// report), false = the grace after its last device ended. Set with or without an event
    /// (an invisible user's departure tells no one, but the cluster must still hear of it).
    pub held: Option<bool>,
}

/// Whether `rec` is the plain online state, which is kept as no record at all (the
/// directory holds records only for users away, busy, invisible, with a text, in their
/// offline grace or offline): most online users then cost no presence record.
pub fn is_plain_online(rec: &Arc<Record>) -> bool {
    Arc::ptr_eq(rec, &ONLINE)
}

/// The record of a connected user in the plain online state (status online, no text).
static ONLINE: std::sync::LazyLock<Arc<Record>> = std::sync::LazyLock::new(|| {
    Arc::new(Record {
        status: Status::Online,
        text: None,
        last_seen_ms: 0,
    })
});

/// One owned user.
#[derive(Debug)]
struct User {
    /// Online as watchers were told (a device arrived; not yet offline after the grace).
    connected: bool,
    /// The chosen status while connected (Online, Away, Busy, Invisible).
    status: Status,
    text: Option<Box<str>>,
    last_seen_ms: u64,
    /// When the latest device left (Unix ms), for `last_seen`.
    left_ms: u64,
    /// The offline grace ends at this time (a device left; re-checked when due).
    due_ms: Option<u64>,
    /// The live wheel entry's key (at most one per user).
    timer: Option<u64>,
    /// Position in the offline list while offline.
    offline_seq: Option<u64>,
}

impl User {
    /// A user with no state yet: offline, never seen.
    fn offline() -> User {
        User {
            connected: false,
            status: Status::Offline,
            text: None,
            last_seen_ms: 0,
            left_ms: 0,
            due_ms: None,
            timer: None,
            offline_seq: None,
        }
    }

    fn record(&self) -> Record {
        Record {
            status: if self.connected {
                self.status
            } else {
                Status::Offline
            },
            text: if self.connected {
                self.text.clone()
            } else {
                None
            },
            // Shown only while the user looks offline (see `view`).
            last_seen_ms: if self.connected && self.status.visible() {
                0
            } else {
                self.last_seen_ms
            },
        }
    }
}

/// The presence state one shard owns.
#[derive(Debug, Default)]
pub struct Owner {
    users: HashMap<Arc<str>, User>,
    /// Connected users in the plain online state (online, no text, no grace running), who
    /// need no `User` state at all: a name in a set (~28 B a user, the name shared with the
    /// user table) instead of a map entry (~180 B a user at 19,000 users, measured). A user
    /// leaves the set for `users` when it departs or sets a status.
    plain: HashSet<Arc<str>>,
    /// Offline users still remembered, oldest first (seq -> user).
    offline: BTreeMap<u64, Arc<str>>,
    next_seq: u64,
    /// Live grace timer keys -> user.
    timers: HashMap<u64, Arc<str>>,
    /// Grace timer keys start at 1 (0 is the glue's retry timer).
    next_key: u64,
    /// Rooms that track presence: room -> user -> devices in the room (node-wide).
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
}

/// Largest grace timer key (the wheel takes 56-bit service keys).
const KEY_MAX: u64 = (1 << 56) - 1;

impl Owner {
    fn publish(out: &mut Out, user: &Arc<str>, u: &User) {
        let rec = u.record();
        // Most online users are in the plain online state: they share one record, so an
        // online user costs no allocation of its own for it.
        let rec = if rec == **ONLINE {
            ONLINE.clone()
        } else {
            Arc::new(rec)
        };
        out.publish = Some((user.clone(), rec));
    }

    /// A shard reported a user's first local device. `devices`: the node-wide count now.
    pub fn arrive(&mut self, user: &Arc<str>, devices: u32) -> Out {
        let mut out = Out::default();
        if devices == 0 {
            // The device came and went; its departure follows (or the user is still offline).
            return out;
        }
        if self.plain.contains(user) {
            return out; // another shard's first device: already online
        }
        if !self.users.contains_key(user) {
            // Never seen or forgotten: online, and nothing to keep but the name.
            self.plain.insert(user.clone());
            out.publish = Some((user.clone(), ONLINE.clone()));
            out.event = Some(Event::Online);
            out.held = Some(true);
            return out;
        }
        let u = self.users.get_mut(user).expect("checked above");
        if u.connected {
            // Back inside the grace (or another shard's first device): no event; the grace
            // record, if any, goes back to the connected one.
            if u.due_ms.take().is_some() {
                Self::publish(&mut out, user, u);
            }
            return out;
        }
        u.connected = true;
        u.status = Status::Online;
        u.text = None;
        if let Some(seq) = u.offline_seq.take() {
            self.offline.remove(&seq);
        }
        Self::publish(&mut out, user, u);
        out.event = Some(Event::Online);
        out.held = Some(true);
        if u.timer.is_none() && u.due_ms.is_none() {
            // Back from offline in the plain state: the name is all it needs.
            self.users.remove(user);
            self.plain.insert(user.clone());
        }
        out
    }

    /// Take a plain online user into `users` (it departs or sets a status).
    fn unplain(&mut self, user: &Arc<str>) {
        if self.plain.remove(user) {
            self.users.insert(
                user.clone(),
                User {
                    connected: true,
                    status: Status::Online,
                    ..User::offline()
                },
            );
        }
    }

    /// A shard reported a user's last local device gone at `at_ms`: offline after `grace_ms`
    /// unless a device is back by then.
    pub fn depart(&mut self, user: &Arc<str>, at_ms: u64, grace_ms: u64) -> Out {
        let mut out = Out::default();
        self.unplain(user);
        let Some(u) = self.users.get_mut(user) else {
            return out;
        };
        if !u.connected {
            return out;
        }
        u.left_ms = u.left_ms.max(at_ms);
        if u.status.visible() && u.due_ms.is_none() {
            // In the grace the user still reads online (with 0 devices): an explicit record,
            // since no record and no device reads offline.
            out.publish = Some((
                user.clone(),
                Arc::new(Record {
                    status: u.status,
                    text: u.text.clone(),
                    last_seen_ms: u.left_ms.max(1),
                }),
            ));
        }
        let due = at_ms.saturating_add(grace_ms);
        u.due_ms = Some(u.due_ms.map_or(due, |d| d.max(due)));
        if u.timer.is_none() {
            self.next_key = if self.next_key >= KEY_MAX {
                1
            } else {
                self.next_key + 1
            };
            let key = self.next_key;
            u.timer = Some(key);
            self.timers.insert(key, user.clone());
            out.timer = Some((key, due));
        }
        out
    }

    /// The grace timer `key` fired at `now_ms`. `devices` gives the node-wide count of a user;
    /// `offline_max`: offline users this owner remembers at most.
    pub fn fire(
        &mut self,
        key: u64,
        now_ms: u64,
        offline_max: usize,
        devices: impl FnOnce(&str) -> u32,
    ) -> Out {
        let mut out = Out::default();
        let Some(user) = self.timers.get(&key).cloned() else {
            return out;
        };
        let Some(u) = self.users.get_mut(&user).filter(|u| u.timer == Some(key)) else {
            self.timers.remove(&key);
            return out;
        };
        match u.due_ms {
            Some(due) if due > now_ms => {
                out.timer = Some((key, due));
                return out;
            }
            Some(_) => {}
            None => {
                u.timer = None;
                self.timers.remove(&key);
                return out;
            }
        }
        u.timer = None;
        u.due_ms = None;
        self.timers.remove(&key);
        if devices(&user) > 0 {
            return out; // back within the grace
        }
        let was_visible = u.status.visible();
        u.connected = false;
        if was_visible {
            u.last_seen_ms = u.left_ms;
        } // an invisible user has looked offline since it went invisible: keep that time
        u.status = Status::Offline;
        u.text = None;
        let seq = self.next_seq;
        self.next_seq += 1;
        u.offline_seq = Some(seq);
        self.offline.insert(seq, user.clone());
        Self::publish(&mut out, &user, u);
        out.held = Some(false);
        if was_visible {
            out.event = Some(Event::Offline);
        }
        while self.offline.len() > offline_max.max(1) {
            let Some((_, old)) = self.offline.pop_first() else {
                break;
            };
            self.users.remove(&old);
            out.forget.push(old);
        }
        out
    }

    /// The user chose `status` (and `text`, None = none) at `now_ms`; `devices`: node-wide.
    pub fn set_status(
        &mut self,
        user: &Arc<str>,
        status: Status,
        text: Option<Box<str>>,
        devices: u32,
        now_ms: u64,
    ) -> Out {
        debug_assert!(status != Status::Offline);
        let mut out = Out::default();
        self.unplain(user);
        let known_connected = self.users.get(user).is_some_and(|u| u.connected);
        if !known_connected && devices == 0 {
            // Every device left before this arrived: nothing to set (no departure would end it).
            return out;
        }
        let u = self.users.entry(user.clone()).or_insert_with(User::offline);
        let before = u.record();
        let was_visible = u.connected && u.status.visible();
        if !u.connected {
            out.held = Some(true);
        }
        u.connected = true;
        if let Some(seq) = u.offline_seq.take() {
            self.offline.remove(&seq);
        }
        u.status = status;
        u.text = text;
        let now_visible = status.visible();
        if was_visible && !now_visible {
            u.last_seen_ms = now_ms;
        }
        let after = u.record();
        if after != before {
            Self::publish(&mut out, user, u);
        }
        out.event = match (was_visible, now_visible) {
            (false, true) => Some(Event::Online),
            (true, false) => Some(Event::Offline),
            (true, true) if after != before => Some(Event::Update),
            _ => None,
        };
        out
    }

    /// A device of `user` joined `room` (a room that tracks presence): true when it is the
    /// user's first device in the room on the node.
    pub fn room_join(&mut self, room: &Arc<str>, user: &Arc<str>) -> bool {
        let users = self.rooms.entry(room.clone()).or_default();
        let n = users.entry(user.clone()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// A device of `user` left `room`: true when it was the user's last device in the room.
    pub fn room_leave(&mut self, room: &str, user: &str) -> bool {
        // A join may be missing: its report was dropped past PRESENCE_OWED_MAX (counted).
        let Some(users) = self.rooms.get_mut(room) else {
            return false;
        };
        let Some(n) = users.get_mut(user) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        users.remove(user);
        if users.is_empty() {
            self.rooms.remove(room);
        }
        true
    }

    /// Up to `cap` of `room`'s users with their device counts (in no particular order), and
    /// the room's total number of users.
    pub fn room_users(&self, room: &str, cap: usize) -> (Vec<(&str, u32)>, usize) {
        let Some(users) = self.rooms.get(room) else {
            return (Vec::new(), 0);
        };
        let list = users.iter().take(cap).map(|(u, n)| (&**u, *n)).collect();
        (list, users.len())
    }

    /// Owned users (online, in the grace, or remembered offline).
    pub fn users_len(&self) -> usize {
        self.users.len() + self.plain.len()
    }

    /// Live grace timers.
    pub fn timers_len(&self) -> usize {
        self.timers.len()
    }
}

/// What [`BridgeOwed::push`] did with a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed {
    /// It waits, behind the changes queued before it.
    Queued,
    /// It undid the change of the same (room, user) still waiting (a join and its leave, or
    /// a leave and the join back): both are gone, and Redis keeps what it had.
    Coalesced,
    /// `max` changes wait already: it is the caller's to tell as it is.
    Full,
}

type RoomUser = (Arc<str>, Arc<str>);

/// A waiting change: its pair, join or leave, the message.
type OwedEntry<T> = (RoomUser, bool, T);

/// Clustered: room presence changes (a user's first device in a room on this node, or its
/// last one out) the bridge refused because its inbox was full, in the order they happened,
/// to hand to it again before any newer one (the glue retries every tick). Each entry is
/// `T` (the bridge message) under its (room, user) pair. Sans-IO: [`BridgeOwed::retry`]
/// is given the send.
///
/// A pair's changes alternate (join, leave, join...), so a change of a pair that still has
/// one waiting is always its opposite: the two cancel out ([`Owed::Coalesced`]) and neither
/// reaches Redis, whose state of the pair was the one before both. A cancelled entry stays
/// as a hole until it reaches the front (or the back); holes count against `max`.
pub struct BridgeOwed<T> {
    q: std::collections::VecDeque<Option<OwedEntry<T>>>,
    /// The sequence number of `q[0]`.
    head: u64,
    /// The sequence number of each pair's waiting change.
    last: HashMap<RoomUser, u64>,
}

impl<T> Default for BridgeOwed<T> {
    fn default() -> Self {
        BridgeOwed {
            q: Default::default(),
            head: 0,
            last: HashMap::new(),
        }
    }
}

impl<T> BridgeOwed<T> {
    /// Changes waiting (not holes).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Queue `item`, the change `join` of (`room`, `user`), behind the others; at most `max`
    /// entries (holes included) wait.
    pub fn push(
        &mut self,
        room: &Arc<str>,
        user: &Arc<str>,
        join: bool,
        item: T,
        max: usize,
    ) -> Owed {
        let key = (room.clone(), user.clone());
        if let Some(seq) = self.last.remove(&key) {
            let slot = &mut self.q[(seq - self.head) as usize];
            debug_assert!(
                slot.as_ref().is_some_and(|(_, j, _)| *j != join),
                "a pair's changes alternate"
            );
            *slot = None;
            while matches!(self.q.back(), Some(None)) {
                self.q.pop_back();
            }
            self.trim_front();
            return Owed::Coalesced;
        }
        if self.q.len() >= max {
            return Owed::Full;
        }
        self.last
            .insert(key.clone(), self.head + self.q.len() as u64);
        self.q.push_back(Some((key, join, item)));
        Owed::Queued
    }

    /// Hand the waiting changes to `send` in order until it refuses one (which stays at the
    /// front, to be tried first next time). Returns how many it took.
    pub fn retry(&mut self, mut send: impl FnMut(T) -> Result<(), T>) -> usize {
        let mut sent = 0;
        loop {
            self.trim_front();
            let Some(Some((key, join, item))) = self.q.pop_front() else {
                return sent;
            };
            match send(item) {
                Ok(()) => {
                    // A live entry is its pair's waiting change (a newer one would have
                    // cancelled it).
                    self.head += 1;
                    self.last.remove(&key);
                    sent += 1;
                }
                Err(item) => {
                    self.q.push_front(Some((key, join, item)));
                    return sent;
                }
            }
        }
    }

    fn trim_front(&mut self) {
        while matches!(self.q.front(), Some(None)) {
            self.q.pop_front();
            self.head += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 5_000;

    fn u(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn status(out: &Out) -> Option<Status> {
        out.publish.as_ref().map(|(_, r)| r.status)
    }

    #[test]
    fn first_device_is_online_and_a_second_is_silent() {
        let mut o = Owner::default();
        let bob = u("bob");
        let out = o.arrive(&bob, 1);
        assert_eq!(out.event, Some(Event::Online));
        assert_eq!(status(&out), Some(Status::Online));
        let out = o.arrive(&bob, 2);
        assert!(out.event.is_none() && out.publish.is_none());
    }

    #[test]
    fn arrival_with_no_device_left_changes_nothing() {
        let mut o = Owner::default();
        let out = o.arrive(&u("bob"), 0);
        assert!(out.event.is_none() && out.publish.is_none());
        assert!(o.depart(&u("bob"), 10, GRACE).timer.is_none());
        assert_eq!(o.users_len(), 0);
    }

    #[test]
    fn offline_only_after_the_grace_and_with_no_device() {
        let mut o = Owner::default();
        let bob = u("bob");
        o.arrive(&bob, 1);
        let out = o.depart(&bob, 1_000, GRACE);
        let (key, due) = out.timer.expect("a grace timer");
        assert_eq!(due, 6_000);
        // Fired early (a wheel lap or a stale entry): rescheduled, no event.
        let out = o.fire(key, 2_000, 10, |_| 0);
        assert_eq!(out.timer, Some((key, 6_000)));
        assert!(out.event.is_none());
        let out = o.fire(key, 6_000, 10, |_| 0);
        assert_eq!(out.event, Some(Event::Offline));
        let rec = out.publish.unwrap().1;
        assert_eq!(rec.status, Status::Offline);
        assert_eq!(
            rec.last_seen_ms, 1_000,
            "last_seen is when the last device left"
        );
        assert_eq!(o.timers_len(), 0);
    }

    #[test]
    fn plain_online_users_keep_only_their_name_until_they_depart_or_set_a_status() {
        let mut o = Owner::default();
        let cy = u("cy");
        assert_eq!(o.arrive(&cy, 1).event, Some(Event::Online));
        assert!(o.plain.contains(&cy) && !o.users.contains_key(&cy));
        // Another shard's first device: nothing new.
        let out = o.arrive(&cy, 2);
        assert!(out.event.is_none() && out.publish.is_none());
        // A status moves it to full state; the change is announced.
        let out = o.set_status(&cy, Status::Away, None, 2, 10);
        assert_eq!(out.event, Some(Event::Update));
        assert!(!o.plain.contains(&cy) && o.users.contains_key(&cy));
        // A plain user that departs gets its grace as usual.
        let dee = u("dee");
        o.arrive(&dee, 1);
        let (key, _) = o.depart(&dee, 1_000, GRACE).timer.unwrap();
        let out = o.fire(key, 1_000 + GRACE, 10, |_| 0);
        assert_eq!(out.event, Some(Event::Offline));
        assert_eq!(o.users_len(), 2);
        // And back from offline, plain again.
        assert_eq!(o.arrive(&dee, 1).event, Some(Event::Online));
        assert!(o.plain.contains(&dee));
    }

    #[test]
    fn plain_online_users_need_no_record() {
        let mut o = Owner::default();
        let ann = u("ann");
        let out = o.arrive(&ann, 1);
        assert!(is_plain_online(&out.publish.unwrap().1));
        // No record and a device: online; no record and none: offline, never seen.
        assert_eq!(view(None, 2, false).status, "online");
        assert_eq!(view(None, 2, false).devices, 2);
        assert_eq!(view(None, 0, false).status, "offline");
        assert_eq!(view(None, 0, false).last_seen_ms, 0);
    }

    #[test]
    fn back_inside_the_grace_does_not_flap() {
        let mut o = Owner::default();
        let bob = u("bob");
        o.arrive(&bob, 1);
        let out = o.depart(&bob, 1_000, GRACE);
        // In the grace bob reads online with 0 devices: an explicit record.
        let (_, rec) = out.publish.clone().unwrap();
        assert_eq!(view(Some(&rec), 0, false).status, "online");
        let (key, _) = out.timer.unwrap();
        let out = o.arrive(&bob, 1);
        // Back: no event, and the record goes back to the plain online one (none kept).
        assert!(out.event.is_none());
        assert!(is_plain_online(&out.publish.unwrap().1));
        let out = o.fire(key, 6_000, 10, |_| 1);
        assert!(out.event.is_none() && out.timer.is_none());
        assert_eq!(o.timers_len(), 0);
    }

    #[test]
    fn reports_in_either_order_are_rechecked_against_the_count() {
        // Two shards: shard A's device leaves while shard B's arrives; B's arrival is
        // processed first (count 1), then A's departure: the timer finds B's device.
        let mut o = Owner::default();
        let bob = u("bob");
        assert_eq!(o.arrive(&bob, 1).event, Some(Event::Online));
        assert!(o.arrive(&bob, 1).event.is_none());
        let (key, _) = o.depart(&bob, 1_000, GRACE).timer.unwrap();
        let out = o.fire(key, 6_000, 10, |_| 1);
        assert!(out.event.is_none());
        // A later departure extends one pending timer instead of adding one.
        let (key, _) = o.depart(&bob, 7_000, GRACE).timer.unwrap();
        assert!(o.depart(&bob, 8_000, GRACE).timer.is_none());
        assert_eq!(o.timers_len(), 1);
        let out = o.fire(key, 12_000, 10, |_| 0);
        assert_eq!(out.timer, Some((key, 13_000)));
        let out = o.fire(key, 13_000, 10, |_| 0);
        assert_eq!(out.event, Some(Event::Offline));
        assert_eq!(out.publish.unwrap().1.last_seen_ms, 8_000);
    }

    #[test]
    fn stale_timer_keys_do_nothing() {
        let mut o = Owner::default();
        assert!(o.fire(99, 0, 10, |_| 0).event.is_none());
    }

    #[test]
    fn updates_and_invisible() {
        let mut o = Owner::default();
        let bob = u("bob");
        o.arrive(&bob, 1);
        let out = o.set_status(&bob, Status::Away, Some("lunch".into()), 1, 100);
        assert_eq!(out.event, Some(Event::Update));
        let rec = out.publish.unwrap().1;
        assert_eq!(
            (rec.status, rec.text.as_deref()),
            (Status::Away, Some("lunch"))
        );
        // The same again: no event, nothing published.
        let out = o.set_status(&bob, Status::Away, Some("lunch".into()), 1, 200);
        assert!(out.event.is_none() && out.publish.is_none());
        // Invisible looks like going offline, with last_seen = then.
        let out = o.set_status(&bob, Status::Invisible, None, 1, 300);
        assert_eq!(out.event, Some(Event::Offline));
        let rec = out.publish.unwrap().1;
        assert_eq!(rec.status, Status::Invisible);
        let v = view(Some(&rec), 1, false);
        assert_eq!((v.status, v.devices, v.last_seen_ms), ("offline", 0, 300));
        let v = view(Some(&rec), 1, true);
        assert_eq!((v.status, v.devices), ("invisible", 1));
        // Leaving while invisible: offline silently, last_seen stays the invisible time.
        let (key, _) = o.depart(&bob, 1_000, GRACE).timer.unwrap();
        let out = o.fire(key, 6_000, 10, |_| 0);
        assert!(out.event.is_none());
        assert_eq!(out.publish.unwrap().1.last_seen_ms, 300);
        // A new session starts online (status and text do not outlive the session).
        let out = o.arrive(&bob, 1);
        assert_eq!(out.event, Some(Event::Online));
        let rec = out.publish.unwrap().1;
        assert_eq!((rec.status, rec.text.as_deref()), (Status::Online, None));
    }

    #[test]
    fn back_from_invisible_is_online() {
        let mut o = Owner::default();
        let bob = u("bob");
        o.arrive(&bob, 1);
        o.set_status(&bob, Status::Invisible, None, 1, 10);
        let out = o.set_status(&bob, Status::Busy, None, 1, 20);
        assert_eq!(out.event, Some(Event::Online));
        assert_eq!(status(&out), Some(Status::Busy));
    }

    #[test]
    fn an_update_before_the_arrival_report_counts_as_arrival() {
        let mut o = Owner::default();
        let bob = u("bob");
        let out = o.set_status(&bob, Status::Invisible, None, 1, 10);
        assert!(
            out.event.is_none(),
            "never seen online, invisible: nothing to tell"
        );
        assert!(o.arrive(&bob, 1).event.is_none());
        // With no device left, an update is ignored (no departure would ever end it).
        let out = o.set_status(&u("carol"), Status::Online, None, 0, 10);
        assert!(out.publish.is_none());
        assert_eq!(o.users_len(), 1);
    }

    #[test]
    fn forgets_the_oldest_offline_users_past_the_limit() {
        let mut o = Owner::default();
        let mut forgotten = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let user = u(name);
            o.arrive(&user, 1);
            let (key, due) = o.depart(&user, i as u64, GRACE).timer.unwrap();
            forgotten.extend(o.fire(key, due, 2, |_| 0).forget);
        }
        assert_eq!(forgotten, vec![u("a")]);
        assert_eq!(o.users_len(), 2);
        // Coming back online takes a user off the offline list.
        o.arrive(&u("b"), 1);
        let user = u("d");
        o.arrive(&user, 1);
        let (key, due) = o.depart(&user, 10, GRACE).timer.unwrap();
        assert!(o.fire(key, due, 2, |_| 0).forget.is_empty());
    }

    #[test]
    fn never_seen_reads_offline() {
        let v = view(None, 0, false);
        assert_eq!(
            v,
            View {
                status: "offline",
                text: None,
                devices: 0,
                last_seen_ms: 0
            }
        );
    }

    #[test]
    fn the_nodes_hold_changes_with_or_without_an_event() {
        let mut o = Owner::default();
        let bob = u("bob");
        assert_eq!(o.arrive(&bob, 1).held, Some(true));
        assert_eq!(o.arrive(&bob, 2).held, None, "a second device");
        // Invisible, then gone: no one is told, but the cluster must hear this node let go.
        assert_eq!(o.set_status(&bob, Status::Invisible, None, 1, 5).held, None);
        let (key, due) = o.depart(&bob, 10, GRACE).timer.unwrap();
        let out = o.fire(key, due, 10, |_| 0);
        assert_eq!((out.event, out.held), (None, Some(false)));
        // A status set before the arrival report holds the user (the report then says nothing).
        let cy = u("cy");
        let out = o.set_status(&cy, Status::Away, None, 1, 20);
        assert_eq!((out.event, out.held), (Some(Event::Online), Some(true)));
        assert_eq!(o.arrive(&cy, 1).held, None);
        // Back inside the grace: nothing for the cluster.
        let (key, _) = o.depart(&cy, 30, GRACE).timer.unwrap();
        assert_eq!(o.arrive(&cy, 1).held, None);
        assert_eq!(o.fire(key, 30 + GRACE, 10, |_| 1).held, None);
    }

    #[test]
    fn remote_records_round_trip_and_read_with_the_nodes_set() {
        let away = Record {
            status: Status::Away,
            text: Some("gone fishing".into()),
            last_seen_ms: 0,
        };
        let line = encode_remote(&view(Some(&away), 1, false));
        assert_eq!(line, "away 0 gone fishing");
        let r = Remote::read(2, Some(&line));
        assert_eq!(
            r.view(),
            View {
                status: "away",
                text: Some("gone fishing"),
                devices: 2,
                last_seen_ms: 0
            }
        );
        // Invisible is written as offline (with when it went invisible) and reads so.
        let inv = Record {
            status: Status::Invisible,
            text: Some("secret".into()),
            last_seen_ms: 77,
        };
        let line = encode_remote(&view(Some(&inv), 1, false));
        assert_eq!(line, "offline 77 ");
        let r = Remote::read(1, Some(&line));
        let v = r.view();
        assert_eq!(
            (v.status, v.text, v.devices, v.last_seen_ms),
            ("offline", None, 0, 77)
        );
        // No node holds the user: offline whatever the record, last_seen only from an
        // offline one.
        let r = Remote::read(0, Some("away 0 x"));
        let v = r.view();
        assert_eq!((v.status, v.text, v.last_seen_ms), ("offline", None, 0));
        assert_eq!(Remote::read(0, Some("offline 99 ")).view().last_seen_ms, 99);
        assert_eq!(Remote::read(0, None).view(), view(None, 0, false));
        // Held with no record (written before records existed, or lost): plain online.
        assert_eq!(Remote::read(1, None).view().status, "online");
        // Records not understood never panic: read as none.
        for bad in ["", "online", "online x y", "dancing 0 ", "away -1 "] {
            assert_eq!(Remote::read(1, Some(bad)).view().status, "online", "{bad}");
        }
        assert_eq!(Remote::read(u64::MAX, None).nodes, u32::MAX);
    }

    #[test]
    fn held_here_means_a_device_or_a_grace() {
        assert!(!held_here(None, 0));
        assert!(held_here(None, 1));
        let mut o = Owner::default();
        let bob = u("bob");
        o.arrive(&bob, 1);
        let rec = o.depart(&bob, 10, GRACE).publish.unwrap().1;
        assert!(held_here(Some(&rec), 0), "in the grace");
        let off = Record {
            status: Status::Offline,
            text: None,
            last_seen_ms: 10,
        };
        assert!(!held_here(Some(&off), 0));
    }

    #[test]
    fn room_members_survive_any_names() {
        for (r, u) in [
            ("chat-1", "bob"),
            ("a:b", ":c"),
            ("é", "1:x"),
            ("r", "u\nv"),
        ] {
            let m = encode_room_member(r, u);
            assert_eq!(decode_room_member(&m), Some((r, u)), "{m}");
        }
        for bad in ["", "x", "3:ab", "0:ab", "-1:ab", "2:é"] {
            assert_eq!(decode_room_member(bad), None, "{bad}");
        }
    }

    #[test]
    fn room_answers_merge_redis_with_this_node() {
        let found = vec![(Box::from("a"), 2), (Box::from("b"), 1)];
        // a is here too (its devices here win), c joined here and Redis does not list it yet.
        let (list, count) = merge_room(&[("a", 3), ("c", 1)], &found, 2, 10);
        assert_eq!(
            list,
            vec![
                (Box::from("a"), 3),
                (Box::from("b"), 1),
                (Box::from("c"), 1)
            ]
        );
        assert_eq!(count, 3);
        // Cut at cap: the count stays Redis's.
        let (list, count) = merge_room(&[("c", 1)], &found[..1], 2, 1);
        assert_eq!((list.len(), count), (1, 2));
        // Nothing in Redis: this node's users.
        let (list, count) = merge_room(&[("c", 1)], &[], 0, 10);
        assert_eq!((list, count), (vec![(Box::from("c"), 1)], 1));
    }

    #[test]
    fn room_presence_counts_devices_per_user() {
        let mut o = Owner::default();
        let (r, a, b) = (u("r"), u("a"), u("b"));
        assert!(o.room_join(&r, &a));
        assert!(!o.room_join(&r, &a));
        assert!(o.room_join(&r, &b));
        let (mut list, count) = o.room_users("r", 10);
        list.sort_unstable();
        assert_eq!((list, count), (vec![("a", 2), ("b", 1)], 2));
        let (list, count) = o.room_users("r", 1);
        assert_eq!((list.len(), count), (1, 2), "capped, count stays the total");
        assert!(!o.room_leave("r", "a"));
        assert!(o.room_leave("r", "a"));
        assert!(o.room_leave("r", "b"));
        assert_eq!(o.room_users("r", 10), (Vec::new(), 0));
        assert!(o.rooms.is_empty());
    }

    #[test]
    fn refused_room_changes_are_retried_in_order_and_a_pairs_opposites_cancel() {
        let mut q: BridgeOwed<&str> = BridgeOwed::default();
        let (r, s) = (u("r"), u("s"));
        let (ann, bob) = (u("ann"), u("bob"));
        assert_eq!(q.push(&r, &ann, true, "r ann +", 4), Owed::Queued);
        assert_eq!(q.push(&r, &bob, true, "r bob +", 4), Owed::Queued);
        assert_eq!(q.push(&s, &ann, true, "s ann +", 4), Owed::Queued);
        // bob leaves before his join reached Redis: neither goes.
        assert_eq!(q.push(&r, &bob, false, "r bob -", 4), Owed::Coalesced);
        assert_eq!(q.len(), 2);
        // The hole counts against the bound until it reaches the front.
        assert_eq!(q.push(&s, &bob, true, "s bob +", 4), Owed::Queued);
        assert_eq!(q.push(&r, &u("cy"), true, "r cy +", 4), Owed::Full);
        // The send refuses the second: it stays first.
        let mut sent = Vec::new();
        let mut budget = 1;
        let n = q.retry(|m| {
            if budget == 0 {
                return Err(m);
            }
            budget -= 1;
            sent.push(m);
            Ok(())
        });
        assert_eq!((n, &sent[..]), (1, &["r ann +"][..]));
        // ann leaves r after her join went: her leave is queued (nothing to cancel).
        assert_eq!(q.push(&r, &ann, false, "r ann -", 4), Owed::Queued);
        let n = q.retry(|m| {
            sent.push(m);
            Ok(())
        });
        assert_eq!(n, 3);
        assert_eq!(sent, ["r ann +", "s ann +", "s bob +", "r ann -"]);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        // A cancelled change at the back leaves no hole; nor at the front.
        assert_eq!(q.push(&r, &bob, true, "j", 1), Owed::Queued);
        assert_eq!(q.push(&r, &bob, false, "l", 1), Owed::Coalesced);
        assert!(q.is_empty());
        assert_eq!(q.push(&r, &bob, true, "j", 2), Owed::Queued);
        assert_eq!(q.push(&s, &bob, true, "k", 2), Owed::Queued);
        assert_eq!(q.push(&r, &bob, false, "l", 2), Owed::Coalesced);
        assert_eq!(q.push(&r, &ann, true, "m", 2), Owed::Queued);
        let mut sent = Vec::new();
        q.retry(|m| {
            sent.push(m);
            Ok(())
        });
        assert_eq!(sent, ["k", "m"]);
    }
}
