//! Direct-message idempotency: the node-wide `(user, clientMsgId)` claim table.
//!
//! A claim is made before a DM is delivered and holds the ids the ack and every delivery use
//! (`serverMsgId`, `eventId`, `sentAt`), so a retry gets the same ack and devices never see
//! one message under two event ids. A delivery that reached only some shards (a full inbox)
//! keeps its claim and records which shards are still owed: a retry delivers to those only,
//! with the same ids, and acks once nothing is owed. Claims are never released early, so a
//! retried `clientMsgId` never reaches a device twice.
//!
//! Bounded: at most `dedup_entries_max` claims (a claim past it is refused with "server busy,
//! retry later"); each shard keeps the expiry order of the claims it made in a FIFO that is
//! bounded by the same number, and expired claims are dropped once per timer tick.

use std::collections::VecDeque;
use std::sync::Arc;

use papaya::Operation;

/// Shards still owed a DM's `message.create`, per recipient side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owed {
    /// Shards holding devices of the recipient that have not been handed the event.
    pub to: u64,
    /// Shards holding the sender's other devices that have not been handed the event.
    pub from: u64,
}

impl Owed {
    pub fn is_empty(&self) -> bool {
        self.to == 0 && self.from == 0
    }
}

/// What a claim remembers: everything needed to ack again or finish delivering.
#[derive(Clone, Debug)]
pub struct AckRecord {
    pub server_msg_id: u128,
    pub event_id: u128,
    pub conversation_id: Arc<str>,
    pub sent_at_ms: u64,
    pub expires_ms: u64,
    /// Set while an earlier attempt left shards undelivered.
    pub owed: Owed,
}

/// The outcome of [`DedupTable::claim`].
#[derive(Debug)]
pub enum Claim {
    /// First sight: deliver, then [`DedupTable::settle`] what could not be handed on.
    New,
    /// Seen and fully delivered within the window: ack again with this record.
    Duplicate(AckRecord),
    /// Seen, but some shards are still owed: deliver to `record.owed` with these ids.
    Incomplete(AckRecord),
    /// The table is at `dedup_entries_max`.
    Full,
}

pub struct DedupTable {
    map: papaya::HashMap<Box<str>, AckRecord>,
    max: usize,
}

fn key(user: &str, client_msg_id: &str) -> Box<str> {
    let mut k = String::with_capacity(user.len() + 1 + client_msg_id.len());
    k.push_str(user);
    k.push('\0');
    k.push_str(client_msg_id);
    k.into_boxed_str()
}

impl DedupTable {
    pub fn new(max: usize) -> DedupTable {
        DedupTable {
            map: papaya::HashMap::builder()
                .hasher(std::collections::hash_map::RandomState::new())
                .capacity(crate::limits::DIRECTORY_INITIAL_CAPACITY)
                .resize_mode(papaya::ResizeMode::Incremental(
                    crate::limits::DIRECTORY_RESIZE_CHUNK,
                ))
                .collector(
                    seize::Collector::new().batch_size(crate::limits::DIRECTORY_RECLAIM_BATCH),
                )
                .build(),
            max,
        }
    }

    /// Claim (user, clientMsgId) for `record`, or find the earlier one.
    pub fn claim(&self, user: &str, client_msg_id: &str, record: &AckRecord, now_ms: u64) -> Claim {
        let key = key(user, client_msg_id);
        let map = self.map.pin();
        let seen = |prev: &AckRecord| {
            if prev.owed.is_empty() {
                Claim::Duplicate(prev.clone())
            } else {
                Claim::Incomplete(prev.clone())
            }
        };
        if let Some(prev) = map.get(&key) {
            if prev.expires_ms > now_ms {
                return seen(prev);
            }
        }
        if map.len() >= self.max {
            return Claim::Full;
        }
        let mut found = None;
        map.compute(key, |entry| match entry {
            Some((_, prev)) if prev.expires_ms > now_ms => {
                found = Some(seen(prev));
                Operation::Abort(())
            }
            _ => Operation::Insert(record.clone()),
        });
        found.unwrap_or(Claim::New)
    }

    /// Record what is still owed after a delivery attempt (empty = complete).
    pub fn settle(&self, user: &str, client_msg_id: &str, owed: Owed) {
        self.map
            .pin()
            .compute(key(user, client_msg_id), |entry| match entry {
                Some((_, rec)) => {
                    let mut rec = rec.clone();
                    rec.owed = owed;
                    Operation::Insert(rec)
                }
                None => Operation::Abort::<AckRecord, ()>(()),
            });
    }

    /// Drop the claim for (user, clientMsgId) if it has expired. Returns whether it did.
    fn expire(&self, user: &str, client_msg_id: &str, now_ms: u64) -> bool {
        matches!(
            self.map
                .pin()
                .compute(key(user, client_msg_id), |entry| match entry {
                    Some((_, rec)) if rec.expires_ms <= now_ms => Operation::Remove,
                    _ => Operation::Abort::<AckRecord, ()>(()),
                }),
            papaya::Compute::Removed(..)
        )
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One shard's claims in expiry order, bounded by the table's maximum.
#[derive(Default)]
pub struct Expiry {
    fifo: VecDeque<(u64, Arc<str>, Box<str>)>,
}

impl Expiry {
    /// Remember a new claim made by this shard. False when the FIFO is at the table's bound
    /// (the caller refuses the DM as busy; cannot happen while claims are only made through
    /// [`DedupTable::claim`], which is bounded the same way, but the bound is kept here too).
    pub fn push(
        &mut self,
        table: &DedupTable,
        expires_ms: u64,
        user: Arc<str>,
        cmid: &str,
    ) -> bool {
        if self.fifo.len() >= table.max() {
            return false;
        }
        self.fifo.push_back((expires_ms, user, cmid.into()));
        true
    }

    /// Drop every claim of this shard that has expired by `now_ms`.
    pub fn run(&mut self, table: &DedupTable, now_ms: u64) {
        while let Some((exp, _, _)) = self.fifo.front() {
            if *exp > now_ms {
                break;
            }
            if let Some((_, user, cmid)) = self.fifo.pop_front() {
                table.expire(&user, &cmid, now_ms);
            }
        }
        if self.fifo.is_empty() && self.fifo.capacity() > 65_536 {
            self.fifo = VecDeque::new();
        }
    }

    pub fn len(&self) -> usize {
        self.fifo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fifo.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u128, expires_ms: u64) -> AckRecord {
        AckRecord {
            server_msg_id: id,
            event_id: id + 1000,
            conversation_id: Arc::from("c"),
            sent_at_ms: 5,
            expires_ms,
            owed: Owed::default(),
        }
    }

    #[test]
    fn claims_duplicates_full_and_expiry() {
        let d = DedupTable::new(2);
        let mut fifo = Expiry::default();
        assert!(matches!(
            d.claim("alice", "m1", &rec(1, 100), 10),
            Claim::New
        ));
        assert!(fifo.push(&d, 100, Arc::from("alice"), "m1"));
        assert!(
            matches!(d.claim("alice", "m1", &rec(2, 100), 20), Claim::Duplicate(r) if r.server_msg_id == 1 && r.event_id == 1001)
        );
        assert!(matches!(d.claim("bob", "m1", &rec(3, 100), 20), Claim::New));
        assert!(fifo.push(&d, 100, Arc::from("bob"), "m1"));
        assert!(matches!(
            d.claim("carol", "m1", &rec(4, 100), 20),
            Claim::Full
        ));
        // The FIFO is bounded by the same maximum.
        assert!(!fifo.push(&d, 100, Arc::from("carol"), "m1"));
        fifo.run(&d, 50);
        assert_eq!(d.len(), 2);
        fifo.run(&d, 100);
        assert_eq!(d.len(), 0);
        assert!(fifo.is_empty());
        assert!(matches!(
            d.claim("alice", "m1", &rec(5, 300), 101),
            Claim::New
        ));
    }

    #[test]
    fn incomplete_claims_keep_their_ids_until_settled() {
        let d = DedupTable::new(10);
        assert!(matches!(
            d.claim("alice", "m1", &rec(1, 100), 10),
            Claim::New
        ));
        d.settle("alice", "m1", Owed { to: 0b10, from: 0 });
        match d.claim("alice", "m1", &rec(9, 100), 20) {
            Claim::Incomplete(r) => {
                assert_eq!((r.server_msg_id, r.event_id), (1, 1001));
                assert_eq!(r.owed, Owed { to: 0b10, from: 0 });
            }
            other => panic!("{other:?}"),
        }
        d.settle("alice", "m1", Owed::default());
        assert!(
            matches!(d.claim("alice", "m1", &rec(9, 100), 30), Claim::Duplicate(r) if r.server_msg_id == 1)
        );
    }
}
