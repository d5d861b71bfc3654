//! The node-wide directory: which shards hold subscribers of a room and devices of a user.
//! Routing only: it answers "which shards" and reports the node-level transitions (a room's
//! first subscriber on this node and its last one gone; a user's first device on this node and
//! the last one gone), which presence and the bridge's Redis SUBSCRIBE/UNSUBSCRIBE need.
//! Admission (room capacity, devices per user, node connections) lives in [`crate::admission`];
//! DM idempotency in the message store ([`crate::store`]).
//!
//! Lock-free (papaya) because the publish and DM paths read it. Each entry is an `Arc` of
//! atomics updated in place: a subscribe on a shard that already has subscribers of the room
//! touches no map at all (the shard's own table answers), a shard's first/last member sets or
//! clears its bit with one `fetch_or`/`fetch_and`, and the map itself changes only when the
//! node's first shard arrives or its last one leaves. Removing an entry races with another
//! shard adding to it, and a check inside the map's `compute` cannot see atomics change
//! under it, so removal is a tombstone handshake, all in one total order (SeqCst): the
//! remover that finds the entry empty sets `dead`, looks again, and either finds it still
//! empty and takes it out of the map or finds it used and clears `dead`; an adder adds first,
//! then reads `dead`, and when it is set takes its addition back and retries (on the same
//! entry until the remover has decided, then on a new one). An adder that read `dead` clear
//! added before the remover's second look, which therefore sees it and keeps the entry.
//! Transitions are facts at the moment of the atomic operation; consumers that act on them
//! from another thread (the bridge) re-read [`Directory::room_shards`] before acting, because
//! two shards' reports can reach them in either order.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use papaya::Operation;

/// One room's or one user's node-wide entry, updated in place.
#[derive(Debug, Default)]
pub struct Entry {
    /// Bit i set: shard i has at least one local subscriber (room) or device (user).
    pub shards: AtomicU64,
    /// Members (room) or devices (user) on this node; maintained by [`crate::admission`].
    pub count: AtomicU32,
    /// Set by a remover that found the entry empty, before it takes it out of the map (see
    /// [`Names::remove_if_empty`]): whoever then adds to the entry backs out and retries.
    dead: AtomicBool,
}

/// A node-level transition reported by [`Directory::arrive`] / [`Directory::depart`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed at node level (other shards already or still hold it).
    None,
    /// The first shard of the node now holds it.
    FirstOnNode,
    /// No shard of the node holds it any more.
    LastOnNode,
}

/// One map of names to entries (rooms or users).
pub struct Names {
    map: papaya::HashMap<Arc<str>, Arc<Entry>>,
}

/// A directory map with every papaya option set: SipHash with a random key (room and user
/// names come from clients), incremental resizing (no writer stalls on a large copy), and a
/// larger reclamation batch than seize's default (see `DIRECTORY_RECLAIM_BATCH`).
fn new_map<K, V>() -> papaya::HashMap<K, V> {
    papaya::HashMap::builder()
        .hasher(std::collections::hash_map::RandomState::new())
        .capacity(crate::limits::DIRECTORY_INITIAL_CAPACITY)
        .resize_mode(papaya::ResizeMode::Incremental(
            crate::limits::DIRECTORY_RESIZE_CHUNK,
        ))
        .collector(seize::Collector::new().batch_size(crate::limits::DIRECTORY_RECLAIM_BATCH))
        .build()
}

fn bit(shard: usize) -> u64 {
    debug_assert!(shard < crate::limits::SHARDS_MAX);
    1u64 << shard
}

impl Default for Names {
    fn default() -> Self {
        Names { map: new_map() }
    }
}

impl Names {
    /// The entry for `name`, created if absent (used by admission before the shard joins).
    pub fn entry(&self, name: &Arc<str>) -> Arc<Entry> {
        let map = self.map.pin();
        if let Some(e) = map.get(&**name) {
            return e.clone();
        }
        map.get_or_insert_with(name.clone(), Arc::default).clone()
    }

    /// The entry for `name` if the node holds it.
    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.map.pin().get(name).cloned()
    }

    /// Shard `shard` got its first local holder of `name`. Call once per shard-local first.
    pub fn arrive(&self, name: &Arc<str>, shard: usize) -> Transition {
        loop {
            let e = self.entry(name);
            let prev = e.shards.fetch_or(bit(shard), Ordering::SeqCst);
            debug_assert!(prev & bit(shard) == 0, "shard arrived twice");
            if e.dead.load(Ordering::SeqCst) {
                // Being removed: take the bit back and retry (a new entry, or this one again
                // if the remover found it in use).
                e.shards.fetch_and(!bit(shard), Ordering::SeqCst);
                std::hint::spin_loop();
                continue;
            }
            return if prev == 0 {
                Transition::FirstOnNode
            } else {
                Transition::None
            };
        }
    }

    /// Shard `shard` lost its last local holder of `name`.
    pub fn depart(&self, name: &Arc<str>, shard: usize) -> Transition {
        let Some(e) = self.get(name) else {
            debug_assert!(false, "depart without arrive");
            return Transition::None;
        };
        let prev = e.shards.fetch_and(!bit(shard), Ordering::SeqCst);
        if prev & !bit(shard) != 0 {
            return Transition::None;
        }
        self.remove_if_empty(name, &e);
        Transition::LastOnNode
    }

    /// Take `e` out of the map if it holds no shard and counts nobody (admission may have
    /// counted a member whose shard has not arrived yet); see the module doc for the handshake.
    pub fn remove_if_empty(&self, name: &Arc<str>, e: &Arc<Entry>) {
        let empty =
            |e: &Entry| e.shards.load(Ordering::SeqCst) == 0 && e.count.load(Ordering::SeqCst) == 0;
        if !empty(e) || e.dead.swap(true, Ordering::SeqCst) {
            return; // in use, or another remover is deciding
        }
        if !empty(e) {
            e.dead.store(false, Ordering::SeqCst);
            return;
        }
        self.map.pin().compute(name.clone(), |cur| match cur {
            Some((_, cur)) if Arc::ptr_eq(cur, e) => Operation::Remove,
            _ => Operation::Abort::<Arc<Entry>, ()>(()),
        });
    }

    /// Count one more holder of `name` unless `max` (0 = none) are counted already. Returns the
    /// new count, or `None` when full.
    pub fn count_up(&self, name: &Arc<str>, max: u32) -> Option<u32> {
        loop {
            let e = self.entry(name);
            let n = e.count.fetch_add(1, Ordering::SeqCst);
            if e.dead.load(Ordering::SeqCst) {
                e.count.fetch_sub(1, Ordering::SeqCst);
                std::hint::spin_loop();
                continue;
            }
            if max > 0 && n >= max {
                self.count_down_entry(name, &e);
                return None;
            }
            return Some(n + 1);
        }
    }

    /// Count one holder of `name` gone (the reverse of a successful [`Names::count_up`]).
    pub fn count_down(&self, name: &Arc<str>) {
        if let Some(e) = self.get(name) {
            self.count_down_entry(name, &e);
        } else {
            debug_assert!(false, "count_down without count_up");
        }
    }

    fn count_down_entry(&self, name: &Arc<str>, e: &Arc<Entry>) {
        let prev = e.count.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev > 0);
        if prev == 1 && e.shards.load(Ordering::SeqCst) == 0 {
            self.remove_if_empty(name, e);
        }
    }

    /// The node-wide count for `name` (0 when absent).
    pub fn count(&self, name: &str) -> u32 {
        self.map
            .pin()
            .get(name)
            .map_or(0, |e| e.count.load(Ordering::Acquire))
    }

    /// Shards holding `name` (0 = none on this node).
    pub fn shards(&self, name: &str) -> u64 {
        self.map
            .pin()
            .get(name)
            .map_or(0, |e| e.shards.load(Ordering::Acquire))
    }

    /// Call `f` with every name in the map, in no particular order: one O(n) pass, for the
    /// rare listings (the REST API's online users), never on a message path. Entries added or
    /// removed during the pass may or may not be seen.
    pub fn for_each_name(&self, mut f: impl FnMut(&Arc<str>)) {
        for (name, _) in self.map.pin().iter() {
            f(name);
        }
    }

    /// Call `f` with at most `max` names and their counts, in no particular order; returns
    /// how many were visited. For the admin page's busiest rooms (bounded so that one request
    /// never holds a shard for a pass over millions of rooms), never on a message path.
    pub fn for_each_count(&self, max: usize, mut f: impl FnMut(&Arc<str>, u32)) -> usize {
        let mut n = 0;
        for (name, e) in self.map.pin().iter().take(max) {
            f(name, e.count.load(Ordering::Relaxed));
            n += 1;
        }
        n
    }

    /// Names held on this node.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// User presence records: user -> the latest immutable record its owner shard published
/// (`service::presence`). One writer per user (its owner shard, a fixed hash of the id), any
/// number of readers (`presence.query` and the answer to `presence.watch` on every shard read
/// it without a round trip). Changes are rare (a session starting or ending, a status set),
/// so a record is replaced whole. Bounded by the owners: users with a device on the node plus
/// at most `PRESENCE_OFFLINE_USERS_MAX` remembered offline users.
pub struct PresenceRecords {
    map: papaya::HashMap<Arc<str>, Arc<crate::shard::service::presence::Record>>,
}

impl Default for PresenceRecords {
    fn default() -> Self {
        PresenceRecords { map: new_map() }
    }
}

impl PresenceRecords {
    /// The user's record (None: never seen on this node, or forgotten).
    pub fn get(&self, user: &str) -> Option<Arc<crate::shard::service::presence::Record>> {
        self.map.pin().get(user).cloned()
    }

    /// Replace the user's record (its owner shard only).
    pub fn set(&self, user: Arc<str>, rec: Arc<crate::shard::service::presence::Record>) {
        self.map.pin().insert(user, rec);
    }

    /// Forget the user (its owner shard only).
    pub fn remove(&self, user: &str) {
        self.map.pin().remove(user);
    }

    /// Call `f` with every record, in no particular order (one O(n) pass; see
    /// [`Names::for_each_name`]).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<str>, &crate::shard::service::presence::Record)) {
        for (name, rec) in self.map.pin().iter() {
            f(name, rec);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Rooms and users of this node.
#[derive(Default)]
pub struct Directory {
    pub rooms: Names,
    pub users: Names,
    /// Server-side subscriptions that are not rooms (e.g. presence watchers of a user).
    pub topics: Names,
    /// User presence (status, text, last_seen) as each user's owner shard published it.
    pub presence: PresenceRecords,
    /// Calls (ringing or active) per user on this node, counted by the calls service's owner
    /// shards against `max_calls_per_user` (`count` only; no shard bits).
    pub calls: Names,
    /// Upgraded WebSocket connections on this node (for max_connections and /health).
    pub connections: AtomicU64,
}

impl Directory {
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Shards with subscribers of `room`.
    pub fn room_shards(&self, room: &str) -> u64 {
        self.rooms.shards(room)
    }

    /// Shards with devices of `user`.
    pub fn user_shards(&self, user: &str) -> u64 {
        self.users.shards(user)
    }

    /// Rooms with at least one member on this node.
    pub fn rooms_len(&self) -> usize {
        self.rooms.len()
    }

    /// Users with at least one device on this node.
    pub fn users_len(&self) -> usize {
        self.users.len()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl crate::route::Locate for Directory {
    fn room_shards(&self, room: &str) -> u64 {
        self.rooms.shards(room)
    }
    fn user_shards(&self, user: &str) -> u64 {
        self.users.shards(user)
    }
    fn topic_shards(&self, topic: &str) -> u64 {
        self.topics.shards(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_first_and_last_on_node() {
        let d = Directory::new();
        let r: Arc<str> = Arc::from("r");
        assert_eq!(d.rooms.arrive(&r, 0), Transition::FirstOnNode);
        assert_eq!(d.rooms.arrive(&r, 3), Transition::None);
        assert_eq!(d.room_shards("r"), 0b1001);
        assert_eq!(d.rooms.depart(&r, 0), Transition::None);
        assert_eq!(d.room_shards("r"), 0b1000);
        assert_eq!(d.rooms.depart(&r, 3), Transition::LastOnNode);
        assert_eq!(d.room_shards("r"), 0);
        assert_eq!(d.rooms_len(), 0);
        // And again after removal: a fresh entry.
        assert_eq!(d.rooms.arrive(&r, 1), Transition::FirstOnNode);
        assert_eq!(d.rooms_len(), 1);
    }

    #[test]
    fn counts_admit_up_to_max_and_keep_the_entry() {
        let d = Directory::new();
        let u: Arc<str> = Arc::from("alice");
        assert_eq!(d.users.count_up(&u, 2), Some(1));
        assert_eq!(d.users.count_up(&u, 2), Some(2));
        assert_eq!(d.users.count_up(&u, 2), None);
        assert_eq!(d.users.count("alice"), 2);
        assert_eq!(d.users.arrive(&u, 0), Transition::FirstOnNode);
        d.users.count_down(&u);
        assert_eq!(d.users.depart(&u, 0), Transition::LastOnNode);
        // Still counted once: the entry stays until the count drops.
        assert_eq!(d.users_len(), 1);
        d.users.count_down(&u);
        assert_eq!(d.users_len(), 0);
        assert_eq!(d.users.count_up(&u, 0), Some(1), "0 = no limit");
    }

    #[test]
    fn concurrent_counts_and_arrivals_never_lose_one() {
        // Two threads count up and down on one name, a third arrives and departs: every
        // count_up is matched, no count is lost to a removal, and the map ends empty.
        let d = Arc::new(Directory::new());
        let name: Arc<str> = Arc::from("hot");
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let d = d.clone();
                let name = name.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        if t == 2 {
                            d.users.arrive(&name, 5);
                            assert!(d.users.shards("hot") & (1 << 5) != 0);
                            d.users.depart(&name, 5);
                        } else {
                            assert!(d.users.count_up(&name, 0).is_some());
                            assert!(d.users.count("hot") >= 1);
                            d.users.count_down(&name);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.users.count("hot"), 0);
        assert_eq!(d.users_len(), 0);
    }

    #[test]
    fn concurrent_arrive_and_depart_never_lose_a_shard() {
        // Two threads flip their own bits on one name many times; at the end both are gone
        // and the map is empty, and at every arrive the bit is visible in the map.
        let d = Arc::new(Directory::new());
        let name: Arc<str> = Arc::from("hot");
        let threads: Vec<_> = (0..2)
            .map(|shard| {
                let d = d.clone();
                let name = name.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        d.rooms.arrive(&name, shard);
                        assert!(d.room_shards("hot") & (1 << shard) != 0);
                        d.rooms.depart(&name, shard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.room_shards("hot"), 0);
        assert_eq!(d.rooms_len(), 0);
    }
}
