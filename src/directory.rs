//! The node-wide directory: which shards hold subscribers of a room and devices of a user, how
//! many members a room has, and the direct-message dedup window.
//!
//! Shards read it on the message path (a publish asks which other shards to forward to; a
//! direct message asks which shards hold the recipient), so it is a lock-free map (papaya:
//! reads are a hash lookup under an epoch guard, writes are atomic compare-and-swap updates).
//! Only the owning shard sets or clears its own bit, on its first local member or device and
//! its last, so the bitmaps never disagree with the shards' own tables. A shard sets its bit
//! *before* replying `subscribed`, so any publish that happens after the client saw the reply
//! reaches it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use papaya::{Compute, Operation};

/// A room's node-wide state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomLoc {
    /// Bit i set: shard i has local subscribers.
    pub shards: u64,
    /// Subscribers on this node.
    pub members: u32,
}

/// What a direct message was acked with, kept for the dedup window.
#[derive(Clone, Debug)]
pub struct AckRecord {
    pub server_msg_id: u128,
    pub conversation_id: Arc<str>,
    pub sent_at_ms: u64,
    pub expires_ms: u64,
}

/// The outcome of [`Directory::room_join`].
#[derive(Debug, PartialEq, Eq)]
pub enum JoinResult {
    Joined { members: u32 },
    Full,
}

/// The outcome of [`Directory::dedup_claim`].
pub enum Claim {
    /// First time: the caller delivers and acks.
    New,
    /// Seen within the window: ack again with this record, do not deliver.
    Duplicate(AckRecord),
    /// The dedup table is at `dedup_entries_max`.
    Full,
}

pub struct Directory {
    rooms: papaya::HashMap<Arc<str>, RoomLoc>,
    users: papaya::HashMap<Arc<str>, u64>,
    dedup: papaya::HashMap<Box<str>, AckRecord>,
    dedup_max: usize,
    /// Upgraded WebSocket connections on this node (for max_connections and /health).
    pub connections: AtomicU64,
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

impl Directory {
    pub fn new(dedup_max: usize) -> Directory {
        Directory {
            rooms: new_map(),
            users: new_map(),
            dedup: new_map(),
            dedup_max,
            connections: AtomicU64::new(0),
        }
    }

    /// Count one more member of `room` from `shard`, unless the room is at `max` (0 = no limit).
    pub fn room_join(&self, room: &Arc<str>, shard: usize, max: u32) -> JoinResult {
        let rooms = self.rooms.pin();
        let result = rooms.compute(room.clone(), |entry| match entry {
            Some((_, loc)) if max > 0 && loc.members >= max => Operation::Abort(()),
            Some((_, loc)) => Operation::Insert(RoomLoc {
                shards: loc.shards | bit(shard),
                members: loc.members + 1,
            }),
            None => Operation::Insert(RoomLoc {
                shards: bit(shard),
                members: 1,
            }),
        });
        match result {
            Compute::Inserted(_, loc) | Compute::Updated { new: (_, loc), .. } => {
                JoinResult::Joined {
                    members: loc.members,
                }
            }
            _ => JoinResult::Full,
        }
    }

    /// Count one member of `room` gone from `shard`; `last_local` clears the shard's bit.
    pub fn room_leave(&self, room: &Arc<str>, shard: usize, last_local: bool) {
        let rooms = self.rooms.pin();
        rooms.compute(room.clone(), |entry| match entry {
            Some((_, loc)) => {
                let members = loc.members.saturating_sub(1);
                let shards = if last_local {
                    loc.shards & !bit(shard)
                } else {
                    loc.shards
                };
                if members == 0 {
                    Operation::Remove
                } else {
                    Operation::Insert(RoomLoc { shards, members })
                }
            }
            None => Operation::Abort(()),
        });
    }

    /// The room's node-wide state, if it has members.
    pub fn room(&self, room: &str) -> Option<RoomLoc> {
        self.rooms.pin().get(room).copied()
    }

    /// Rooms with at least one member on this node.
    pub fn rooms_len(&self) -> usize {
        self.rooms.len()
    }

    /// Shard `shard` now has a device of `user`.
    pub fn user_add(&self, user: &Arc<str>, shard: usize) {
        self.users.pin().compute(user.clone(), |entry| match entry {
            Some((_, bits)) => Operation::Insert::<_, ()>(bits | bit(shard)),
            None => Operation::Insert(bit(shard)),
        });
    }

    /// Shard `shard` has no device of `user` any more.
    pub fn user_remove(&self, user: &Arc<str>, shard: usize) {
        self.users.pin().compute(user.clone(), |entry| match entry {
            Some((_, bits)) if bits & !bit(shard) == 0 => Operation::Remove,
            Some((_, bits)) => Operation::Insert(bits & !bit(shard)),
            None => Operation::Abort(()),
        });
    }

    /// Shards holding devices of `user` (0 = offline on this node).
    pub fn user_shards(&self, user: &str) -> u64 {
        self.users.pin().get(user).copied().unwrap_or(0)
    }

    /// Users with at least one device on this node.
    pub fn users_len(&self) -> usize {
        self.users.len()
    }

    fn dedup_key(user: &str, client_msg_id: &str) -> Box<str> {
        let mut k = String::with_capacity(user.len() + 1 + client_msg_id.len());
        k.push_str(user);
        k.push('\0');
        k.push_str(client_msg_id);
        k.into_boxed_str()
    }

    /// Claim (user, clientMsgId) for `record`, or find the earlier ack.
    pub fn dedup_claim(
        &self,
        user: &str,
        client_msg_id: &str,
        record: &AckRecord,
        now_ms: u64,
    ) -> Claim {
        let key = Self::dedup_key(user, client_msg_id);
        let map = self.dedup.pin();
        if let Some(prev) = map.get(&key) {
            if prev.expires_ms > now_ms {
                return Claim::Duplicate(prev.clone());
            }
        }
        if map.len() >= self.dedup_max {
            return Claim::Full;
        }
        let mut dup = None;
        map.compute(key, |entry| match entry {
            Some((_, prev)) if prev.expires_ms > now_ms => {
                dup = Some(prev.clone());
                Operation::Abort(())
            }
            _ => Operation::Insert(record.clone()),
        });
        match dup {
            Some(prev) => Claim::Duplicate(prev),
            None => Claim::New,
        }
    }

    /// Forget a claim (delivery failed; the client may retry).
    pub fn dedup_release(&self, user: &str, client_msg_id: &str) {
        self.dedup
            .pin()
            .remove(&*Self::dedup_key(user, client_msg_id));
    }

    /// Drop the entry for (user, clientMsgId) if it has expired. Returns whether it did.
    pub fn dedup_expire(&self, user: &str, client_msg_id: &str, now_ms: u64) -> bool {
        let key = Self::dedup_key(user, client_msg_id);
        matches!(
            self.dedup.pin().compute(key, |entry| match entry {
                Some((_, rec)) if rec.expires_ms <= now_ms => Operation::Remove,
                _ => Operation::Abort::<AckRecord, ()>(()),
            }),
            Compute::Removed(..)
        )
    }

    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_bits_and_capacity() {
        let d = Directory::new(10);
        let r: Arc<str> = Arc::from("r");
        assert_eq!(d.room_join(&r, 0, 2), JoinResult::Joined { members: 1 });
        assert_eq!(d.room_join(&r, 3, 2), JoinResult::Joined { members: 2 });
        assert_eq!(d.room_join(&r, 1, 2), JoinResult::Full);
        assert_eq!(
            d.room("r"),
            Some(RoomLoc {
                shards: 0b1001,
                members: 2
            })
        );
        d.room_leave(&r, 0, true);
        assert_eq!(
            d.room("r"),
            Some(RoomLoc {
                shards: 0b1000,
                members: 1
            })
        );
        d.room_leave(&r, 3, true);
        assert_eq!(d.room("r"), None);
        assert_eq!(d.rooms_len(), 0);
    }

    #[test]
    fn users_and_dedup() {
        let d = Directory::new(2);
        let u: Arc<str> = Arc::from("alice");
        d.user_add(&u, 0);
        d.user_add(&u, 1);
        assert_eq!(d.user_shards("alice"), 0b11);
        d.user_remove(&u, 0);
        d.user_remove(&u, 1);
        assert_eq!(d.user_shards("alice"), 0);
        assert_eq!(d.users_len(), 0);

        let rec = AckRecord {
            server_msg_id: 1,
            conversation_id: Arc::from("c"),
            sent_at_ms: 5,
            expires_ms: 100,
        };
        assert!(matches!(d.dedup_claim("alice", "m1", &rec, 10), Claim::New));
        assert!(
            matches!(d.dedup_claim("alice", "m1", &rec, 20), Claim::Duplicate(r) if r.server_msg_id == 1)
        );
        assert!(matches!(d.dedup_claim("bob", "m1", &rec, 20), Claim::New));
        assert!(matches!(
            d.dedup_claim("carol", "m1", &rec, 20),
            Claim::Full
        ));
        assert!(!d.dedup_expire("alice", "m1", 50));
        assert!(d.dedup_expire("alice", "m1", 100));
        assert!(matches!(
            d.dedup_claim("alice", "m1", &rec, 101),
            Claim::New
        ));
    }
}
