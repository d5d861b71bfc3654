//! Room history, sans-IO: the messages kept for resume in the rooms a shard owns (rooms with
//! `history_size` > 0 are sequenced by their owner shard, `rooms::owner`, which is the only
//! writer and reader of their history, so no lock and no cross-shard copy).
//!
//! Per room: an epoch (random; a new one whenever the room's history starts over, so a client
//! holding an offset of an older history is told it cannot recover), the next offset (1, 2,
//! ...: strictly increasing in the order every subscriber sees, because the owner assigns it
//! and delivers), and the last `history_size` frames, each younger than `history_ttl`. The
//! stored frame is the encoded `message` frame itself (an `Arc` clone of what subscribers got):
//! replaying it costs no encode and sends the same bytes.
//!
//! Bounded twice: per room by `history_size`/`history_ttl`, per shard by a byte budget (the
//! node's `history_bytes_max` split over its shards), past which the shard's oldest entries,
//! whatever their room, are dropped first (counted). A room whose every entry went keeps its
//! epoch and offset (a resume from before reads `recovered: false`); the room's state is
//! forgotten only when [`ROOMS_WITH_HISTORY_MAX`] is reached, oldest-written room first, and
//! then starts over with a new epoch.
//!
//! Bytes per stored message: the frame's wire bytes plus [`ENTRY_OVERHEAD_BYTES`] (the `Arc`
//! header and born prefix of the frame, the queue entry, the budget index entry).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::proto::Frame;

/// Rooms whose history state (epoch, offset) one shard keeps; past it the room written
/// longest ago is forgotten (its next message starts a new epoch).
pub const ROOMS_WITH_HISTORY_MAX: usize = 100_000;

/// Memory a stored message costs beyond its wire bytes, as measured by `cargo bench --bench
/// history` (heap held per message at 100,000 messages of 213 wire bytes: 349 B): the frame's
/// `Arc` header and born prefix, the queue entry, its budget index entry in a B-tree node, and
/// the allocator's rounding.
pub const ENTRY_OVERHEAD_BYTES: usize = 136;

/// A message kept for resume.
struct Entry {
    offset: u64,
    at_ms: u64,
    /// Position in the shard-wide age order (the budget index key).
    seq: u64,
    frame: Frame,
}

struct RoomHistory {
    epoch: String,
    /// The offset the next message gets.
    next: u64,
    entries: VecDeque<Entry>,
    /// `seq` of the last write (for forgetting rooms oldest-written first).
    last_seq: u64,
}

/// What a resume or a plain subscribe learns from the owner.
#[derive(Debug)]
pub struct Position {
    /// The room's latest offset (0 before any message).
    pub offset: u64,
    pub epoch: String,
}

/// The answer to a resume: the missed frames (oldest first) when recovered.
#[derive(Debug)]
pub struct Recovery {
    pub recovered: bool,
    pub frames: Vec<Frame>,
    pub position: Position,
}

/// One shard's history of the rooms it owns.
pub struct Store {
    rooms: HashMap<Arc<str>, RoomHistory>,
    /// Every stored entry by age: seq -> room (the budget trims from the front).
    by_age: BTreeMap<u64, Arc<str>>,
    /// Every room by its last write (or creation): last_seq -> room, so the room written
    /// longest ago is found in O(log n) when `ROOMS_WITH_HISTORY_MAX` is reached.
    by_last: BTreeMap<u64, Arc<str>>,
    seq: u64,
    bytes: usize,
    budget: usize,
    /// Entries dropped for the byte budget or for `ROOMS_WITH_HISTORY_MAX` (counted by the
    /// shard into its metrics).
    pub trimmed: u64,
}

fn new_epoch() -> String {
    let (hi, _) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{hi:016x}")
}

fn entry_bytes(f: &Frame) -> usize {
    f.wire().len() + ENTRY_OVERHEAD_BYTES
}

impl Store {
    /// A store holding at most `budget` bytes of entries.
    pub fn new(budget: usize) -> Store {
        Store {
            rooms: HashMap::new(),
            by_age: BTreeMap::new(),
            by_last: BTreeMap::new(),
            seq: 0,
            bytes: 0,
            budget,
            trimmed: 0,
        }
    }

    /// Bytes held (wire bytes plus overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rooms with history state.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn room_mut(&mut self, room: &Arc<str>) -> &mut RoomHistory {
        if !self.rooms.contains_key(&**room) {
            if self.rooms.len() >= ROOMS_WITH_HISTORY_MAX {
                self.forget_oldest_room();
            }
            self.seq += 1;
            self.by_last.insert(self.seq, room.clone());
            self.rooms.insert(
                room.clone(),
                RoomHistory {
                    epoch: new_epoch(),
                    next: 1,
                    entries: VecDeque::new(),
                    last_seq: self.seq,
                },
            );
        }
        self.rooms.get_mut(&**room).expect("inserted above")
    }

    fn forget_oldest_room(&mut self) {
        let Some((_, oldest)) = self.by_last.pop_first() else {
            return;
        };
        if let Some(h) = self.rooms.remove(&oldest) {
            for e in h.entries {
                self.by_age.remove(&e.seq);
                self.bytes -= entry_bytes(&e.frame);
                self.trimmed += 1;
            }
        }
    }

    /// Allocate the next offset of `room` (creating its history: offset 1, a new epoch).
    pub fn next_offset(&mut self, room: &Arc<str>) -> (u64, String) {
        let h = self.room_mut(room);
        let offset = h.next;
        h.next += 1;
        (offset, h.epoch.clone())
    }

    /// Keep `frame` (the message with `offset`, written at `at_ms`), then trim the room to
    /// `size` entries and `ttl_ms` of age (0 = no age limit) and the shard to its budget.
    pub fn append(
        &mut self,
        room: &Arc<str>,
        offset: u64,
        at_ms: u64,
        frame: Frame,
        size: u32,
        ttl_ms: u64,
    ) {
        let bytes = entry_bytes(&frame);
        self.room_mut(room);
        self.seq += 1;
        let seq = self.seq;
        let h = self.rooms.get_mut(&**room).expect("room_mut created it");
        debug_assert!(h.entries.back().is_none_or(|e| e.offset < offset));
        h.entries.push_back(Entry {
            offset,
            at_ms,
            seq,
            frame,
        });
        self.by_last.remove(&h.last_seq);
        h.last_seq = seq;
        self.by_last.insert(seq, room.clone());
        self.by_age.insert(seq, room.clone());
        self.bytes += bytes;
        self.trim_room(room, size, ttl_ms, at_ms);
        while self.bytes > self.budget {
            let Some((_, oldest_room)) = self.by_age.pop_first() else {
                break;
            };
            if let Some(h) = self.rooms.get_mut(&oldest_room) {
                if let Some(e) = h.entries.pop_front() {
                    self.bytes -= entry_bytes(&e.frame);
                    self.trimmed += 1;
                }
            }
        }
    }

    /// Drop the room's entries past `size` and older than `ttl_ms` at `now_ms`.
    fn trim_room(&mut self, room: &str, size: u32, ttl_ms: u64, now_ms: u64) {
        let Some(h) = self.rooms.get_mut(room) else {
            return;
        };
        while let Some(front) = h.entries.front() {
            let too_many = h.entries.len() > size as usize;
            let too_old = ttl_ms > 0 && front.at_ms.saturating_add(ttl_ms) <= now_ms;
            if !(too_many || too_old) {
                break;
            }
            if let Some(e) = h.entries.pop_front() {
                self.by_age.remove(&e.seq);
                self.bytes -= entry_bytes(&e.frame);
            }
        }
    }

    /// The room's position (creating its history if it has none, so the epoch a subscriber
    /// is told is the one its later messages belong to).
    pub fn position(&mut self, room: &Arc<str>) -> Position {
        let h = self.room_mut(room);
        Position {
            offset: h.next - 1,
            epoch: h.epoch.clone(),
        }
    }

    /// What a subscriber that last saw `offset` of `epoch` missed: every kept message after
    /// it, oldest first, when that is all it missed (same epoch, nothing older than the kept
    /// history missing, not ahead of the room); otherwise `recovered: false` and nothing.
    pub fn since(
        &mut self,
        room: &Arc<str>,
        offset: u64,
        epoch: &str,
        size: u32,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Recovery {
        self.trim_room(room, size, ttl_ms, now_ms);
        let position = self.position(room);
        let Some(h) = self.rooms.get(&**room) else {
            unreachable!("position() created it");
        };
        let oldest_kept = h.entries.front().map_or(h.next, |e| e.offset);
        let recovered = epoch == h.epoch && offset <= position.offset && offset + 1 >= oldest_kept;
        let frames = if recovered {
            h.entries
                .iter()
                .filter(|e| e.offset > offset)
                .map(|e| e.frame.clone())
                .collect()
        } else {
            Vec::new()
        };
        Recovery {
            recovered,
            frames,
            position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64) -> Frame {
        Frame::from_wire(format!("m{n}").as_bytes(), n)
    }

    fn publish(s: &mut Store, room: &Arc<str>, at_ms: u64, size: u32, ttl: u64) -> u64 {
        let (offset, _) = s.next_offset(room);
        s.append(room, offset, at_ms, frame(offset), size, ttl);
        offset
    }

    fn wires(r: &Recovery) -> Vec<String> {
        r.frames
            .iter()
            .map(|f| String::from_utf8_lossy(f.wire()).into_owned())
            .collect()
    }

    #[test]
    fn offsets_increase_and_a_resume_gets_exactly_what_was_missed() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        for i in 1..=5 {
            assert_eq!(publish(&mut s, &r, 1000, 10, 0), i);
        }
        let epoch = s.position(&r).epoch;
        let got = s.since(&r, 2, &epoch, 10, 0, 1000);
        assert!(got.recovered);
        assert_eq!(wires(&got), ["m3", "m4", "m5"]);
        assert_eq!(got.position.offset, 5);
        // Up to date: recovered, nothing to send.
        let got = s.since(&r, 5, &epoch, 10, 0, 1000);
        assert!(got.recovered && got.frames.is_empty());
        // From the start of history (offset 0): everything kept.
        assert_eq!(wires(&s.since(&r, 0, &epoch, 10, 0, 1000)).len(), 5);
    }

    #[test]
    fn not_recovered_on_another_epoch_a_gap_past_history_or_an_offset_ahead() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        for _ in 0..10 {
            publish(&mut s, &r, 1000, 3, 0);
        }
        let epoch = s.position(&r).epoch;
        // Kept: 8, 9, 10. From 7 the client misses nothing that is gone.
        assert!(s.since(&r, 7, &epoch, 3, 0, 1000).recovered);
        let gap = s.since(&r, 6, &epoch, 3, 0, 1000);
        assert!(!gap.recovered && gap.frames.is_empty());
        assert!(!s.since(&r, 9, "other", 3, 0, 1000).recovered);
        assert!(!s.since(&r, 11, &epoch, 3, 0, 1000).recovered);
        // A room never written: a new history, position 0.
        let fresh: Arc<str> = Arc::from("fresh");
        let p = s.position(&fresh);
        assert_eq!(p.offset, 0);
        assert!(s.since(&fresh, 0, &p.epoch, 3, 0, 1000).recovered);
        assert_ne!(p.epoch, epoch);
    }

    #[test]
    fn rooms_are_forgotten_oldest_written_first() {
        let mut s = Store::new(1 << 20);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        publish(&mut s, &a, 1, 10, 0);
        publish(&mut s, &b, 2, 10, 0);
        publish(&mut s, &a, 3, 10, 0);
        s.forget_oldest_room();
        assert_eq!(s.rooms(), 1);
        assert!(s.rooms.contains_key("a"), "b was written longest ago");
        assert_eq!(s.by_last.len(), 1);
    }

    #[test]
    fn ttl_and_the_byte_budget_trim_oldest_first() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        publish(&mut s, &r, 1000, 10, 500);
        publish(&mut s, &r, 1400, 10, 500);
        let epoch = s.position(&r).epoch;
        // At 1600 the first (written at 1000) is older than 500 ms.
        let got = s.since(&r, 1, &epoch, 10, 500, 1600);
        assert!(got.recovered);
        assert_eq!(wires(&got), ["m2"]);
        assert!(!s.since(&r, 0, &epoch, 10, 500, 1600).recovered);

        // Budget for exactly two entries of "mN" frames: a third drops the oldest, in any room.
        let one = 2 + ENTRY_OVERHEAD_BYTES;
        let mut s = Store::new(2 * one);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        publish(&mut s, &a, 1, 10, 0);
        publish(&mut s, &b, 2, 10, 0);
        publish(&mut s, &b, 3, 10, 0);
        assert_eq!(s.bytes(), 2 * one);
        assert_eq!(s.trimmed, 1);
        let ea = s.position(&a).epoch;
        let got = s.since(&a, 0, &ea, 10, 0, 4);
        // a's only message went: a resume from before it cannot recover, the epoch stays.
        assert!(!got.recovered);
        assert_eq!(got.position.offset, 1);
        assert_eq!(s.position(&a).epoch, ea);
    }
}
