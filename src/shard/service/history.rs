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
//!
//! **In a cluster** (`redis_url` set) the room's offsets and epoch are Redis's
//! ([`crate::bridge::redis::history`]) and this store is the node's cache of them, kept by the same
//! owner shard from the messages the node receives ([`Store::observe`]) and the stream reads
//! it asks for ([`Store::merge`]). Its entries are always one run of consecutive offsets
//! ending at the last offset the node delivered. A run answers a resume only while it is
//! *current* ([`Store::current`]): it was filled under the room channel subscription the
//! bridge holds now (the bridge's `hold` tag, told to the owner in order with the messages)
//! and no push may have been lost since (the bridge's view generation); otherwise the owner
//! reads the stream. While Redis cannot sequence a message the owner does it here under a
//! node-local epoch ([`Store::to_local`]), so a resume from one history never replays
//! another's messages ([`Mode`]).
//!
//! [`Resumes`] is the owner's table of resumes waiting for a stream read: one read per room
//! at a time, shared by every resume it covers.

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

/// Whose offsets a room's history holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// This node's own (single node; in a cluster, a node-local epoch while Redis could not
    /// sequence the room's messages).
    Local,
    /// The cluster's (Redis's offsets and epoch).
    Cluster,
    /// Nothing known yet (a cluster room whose first message or read has not arrived).
    Unknown,
}

struct RoomHistory {
    epoch: String,
    mode: Mode,
    /// Cluster: the bridge's subscription tag now (0: the node does not hold the room's
    /// channel), and the tag and view generation the entries were received under.
    hold: u64,
    run_tag: u64,
    run_gen: u64,
    /// Cluster: a message of this room was sequenced here (Redis was unavailable), so the
    /// next append asks Redis for a new epoch (the histories diverged).
    diverged: bool,
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
                    mode: Mode::Local,
                    hold: 0,
                    run_tag: 0,
                    run_gen: 0,
                    diverged: false,
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

/// What a stream read found (parsed from the read script's reply,
/// [`crate::bridge::redis::history::parse_read`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub epoch: String,
    /// The room's last offset in Redis.
    pub last: u64,
    /// The kept entries from the read's first offset: (offset, Redis ms, frame).
    pub entries: Vec<(u64, u64, Frame)>,
}

/// A read could not be merged with what the node holds (a hole between them): read again.
#[derive(Debug, PartialEq, Eq)]
pub struct NotContiguous;

impl Store {
    fn clear_entries(&mut self, room: &str) {
        let Some(h) = self.rooms.get_mut(room) else {
            return;
        };
        for e in h.entries.drain(..) {
            self.by_age.remove(&e.seq);
            self.bytes -= entry_bytes(&e.frame);
        }
    }

    /// The room's state, created as [`Mode::Unknown`] (a cluster room).
    fn cluster_room_mut(&mut self, room: &Arc<str>) -> &mut RoomHistory {
        let new = !self.rooms.contains_key(&**room);
        let h = self.room_mut(room);
        if new {
            h.mode = Mode::Unknown;
            h.next = 1;
        }
        h
    }

    fn push_entry(&mut self, room: &Arc<str>, offset: u64, at_ms: u64, frame: Frame) {
        let bytes = entry_bytes(&frame);
        self.seq += 1;
        let seq = self.seq;
        let h = self.rooms.get_mut(&**room).expect("the caller created it");
        debug_assert!(h.entries.back().is_none_or(|e| e.offset + 1 == offset));
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
    }

    fn trim_to_budget(&mut self) {
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

    /// The room's mode (`None`: no state).
    pub fn mode(&self, room: &str) -> Option<Mode> {
        self.rooms.get(room).map(|h| h.mode)
    }

    /// Cluster: the bridge's subscription tag for the room's channel is now `tag` (0: not
    /// held). Entries received under another tag stop answering resumes.
    pub fn set_hold(&mut self, room: &Arc<str>, tag: u64) {
        if tag == 0 && !self.rooms.contains_key(&**room) {
            return;
        }
        self.cluster_room_mut(room).hold = tag;
    }

    /// Cluster: whether the room's entries answer a resume: cluster offsets, received under
    /// the subscription held now, with no push lost since (`gen`, the bridge's view
    /// generation now).
    pub fn current(&self, room: &str, gen: u64) -> bool {
        self.rooms.get(room).is_some_and(|h| {
            h.mode == Mode::Cluster && h.hold != 0 && h.run_tag == h.hold && h.run_gen == gen
        })
    }

    /// Cluster: a message the node received (`tag`, `gen`: the subscription and view it came
    /// under). True when it is new here (deliver it); false for one already delivered.
    /// Another epoch starts the room over; a skipped offset starts a new run (`gap` is set).
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        room: &Arc<str>,
        epoch: &str,
        offset: u64,
        at_ms: u64,
        frame: Frame,
        size: u32,
        ttl_ms: u64,
        tag: u64,
        gen: u64,
        gap: &mut bool,
    ) -> bool {
        let h = self.cluster_room_mut(room);
        let same = h.mode == Mode::Cluster && h.epoch == epoch;
        if same && offset < h.next {
            return false;
        }
        // The run stays one of consecutive offsets: another epoch or a skipped offset starts
        // it again. The newest message's subscription and view are the run's: a run ending
        // with a message heard under the subscription held now misses nothing after it.
        *gap = same && offset > h.next;
        h.run_tag = tag;
        h.run_gen = gen;
        if !same || *gap {
            if !same {
                h.epoch = epoch.to_owned();
                h.mode = Mode::Cluster;
            }
            self.clear_entries(room);
        }
        let h = self.rooms.get_mut(&**room).expect("created above");
        h.next = offset + 1;
        self.push_entry(room, offset, at_ms, frame);
        self.trim_room(room, size, ttl_ms, at_ms);
        self.trim_to_budget();
        true
    }

    /// Cluster: merge a stream read taken under subscription `tag` and view `gen` (both
    /// current: the caller checked). Returns the entries that are new to this node (to deliver
    /// to its subscribers, oldest first); afterwards the room's run is current, ends at the
    /// read's last offset or later, and covers the read where it joins the run. Another epoch
    /// (or a room in another mode) takes the read as it is.
    #[allow(clippy::too_many_arguments)]
    pub fn merge(
        &mut self,
        room: &Arc<str>,
        mut snap: Snapshot,
        tag: u64,
        gen: u64,
        size: u32,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<Frame>, NotContiguous> {
        // Only the consecutive run of entries that ends the read counts.
        let keep_from = snap
            .entries
            .windows(2)
            .rposition(|w| w[0].0 + 1 != w[1].0)
            .map_or(0, |i| i + 1);
        snap.entries.drain(..keep_from);
        let h = self.cluster_room_mut(room);
        let mut fresh = Vec::new();
        if h.mode == Mode::Cluster && h.epoch == snap.epoch {
            // Keep the run (delivered here, consecutive) and put the read around it: what is
            // older than the run in front, what is newer at the back (and to deliver).
            let first = h.entries.front().map_or(h.next, |e| e.offset);
            let next = h.next;
            let older: Vec<(u64, u64, Frame)> = snap
                .entries
                .iter()
                .filter(|e| e.0 < first)
                .cloned()
                .collect();
            let newer: Vec<(u64, u64, Frame)> =
                snap.entries.into_iter().filter(|e| e.0 >= next).collect();
            if older.last().is_some_and(|e| e.0 + 1 != first)
                || newer.first().is_some_and(|e| e.0 != next)
            {
                return Err(NotContiguous);
            }
            if !older.is_empty() {
                let run: Vec<(u64, u64, Frame)> = self.rooms[&**room]
                    .entries
                    .iter()
                    .map(|e| (e.offset, e.at_ms, e.frame.clone()))
                    .collect();
                self.clear_entries(room);
                for (o, t, f) in older.into_iter().chain(run) {
                    self.push_entry(room, o, t, f);
                }
            }
            for (o, t, f) in newer {
                fresh.push(f.clone());
                self.push_entry(room, o, t, f);
            }
            let h = self.rooms.get_mut(&**room).expect("created above");
            let end = h.entries.back().map_or(h.next - 1, |e| e.offset);
            h.next = end + 1;
            if snap.last > end {
                // Redis has more than the read brought (a position-only read): the run no
                // longer ends at the room's last offset.
                h.next = snap.last + 1;
                self.clear_entries(room);
            }
        } else {
            h.epoch = snap.epoch;
            h.mode = Mode::Cluster;
            h.next = snap.last + 1;
            self.clear_entries(room);
            if snap.entries.last().is_some_and(|e| e.0 == snap.last) {
                for (o, t, f) in snap.entries {
                    self.push_entry(room, o, t, f);
                }
            }
        }
        let h = self.rooms.get_mut(&**room).expect("created above");
        h.run_tag = tag;
        h.run_gen = gen;
        self.trim_room(room, size, ttl_ms, now_ms);
        self.trim_to_budget();
        Ok(fresh)
    }

    /// Cluster: Redis cannot sequence the room (or tell its position) now; it continues
    /// under a node-local epoch (a new one unless it is local already), so no resume mixes
    /// the two histories. `diverged`: a message is about to be sequenced here, so the next
    /// append asks Redis for a new epoch too.
    pub fn to_local(&mut self, room: &Arc<str>, diverged: bool) {
        let h = self.room_mut(room);
        if h.mode != Mode::Local {
            h.mode = Mode::Local;
            h.epoch = new_epoch();
            h.next = 1;
            h.run_tag = 0;
            self.clear_entries(room);
        }
        if diverged {
            if let Some(h) = self.rooms.get_mut(&**room) {
                h.diverged = true;
            }
        }
    }

    /// Cluster: the subscription tag the bridge told for the room (0: none).
    pub fn holding(&self, room: &str) -> u64 {
        self.rooms.get(room).map_or(0, |h| h.hold)
    }

    /// Cluster: whether a message was sequenced here since the last append went to Redis
    /// (cleared: the next append asks for a new epoch).
    pub fn take_diverged(&mut self, room: &str) -> bool {
        self.rooms
            .get_mut(room)
            .is_some_and(|h| std::mem::take(&mut h.diverged))
    }

    /// The room's position without creating it.
    pub fn peek(&self, room: &str) -> Option<Position> {
        self.rooms.get(room).map(|h| Position {
            offset: h.next - 1,
            epoch: h.epoch.clone(),
        })
    }
}

/// Resumes one owner shard keeps waiting for a stream read; past it a resume is refused
/// (`server busy, retry later`). A reconnect storm of 10,000 clients into one room on one
/// node waits here and is answered by one read.
pub const RESUMES_WAITING_MAX: usize = 65_536;

/// Reads a room may need for one resume before it is answered `recovered: false` (a read
/// that found a subscription change or a hole is made again).
pub const READ_ATTEMPTS_MAX: u8 = 3;

/// The owner's resumes waiting for stream reads, per room: one read in flight per room,
/// shared by every waiter it covers (one that asks from an offset before the read's start
/// waits for the next read).
pub struct Resumes<W> {
    rooms: HashMap<Arc<str>, RoomReads<W>>,
    waiting: usize,
}

struct RoomReads<W> {
    /// (since, waiter).
    waiters: Vec<(Option<u64>, W)>,
    /// The read in flight: its first offset (`None`: position only), when it was sent, how
    /// many reads this room made in a row.
    from: Option<u64>,
    sent_ms: u64,
    attempts: u8,
}

/// A read to send: the room's entries from `from` (`None`: its position only).
#[derive(Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub from: Option<u64>,
}

/// The first offset a waiter needs (`None`: only the position).
fn need(since: Option<u64>) -> Option<u64> {
    // Saturating: `since` is the client's (u64::MAX must not overflow).
    since.map(|s| s.saturating_add(1))
}

/// Whether a read from `from` answers a waiter with `since`.
fn covers(from: Option<u64>, since: Option<u64>) -> bool {
    match (from, need(since)) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(f), Some(n)) => f <= n,
    }
}

impl<W> Default for Resumes<W> {
    fn default() -> Self {
        Resumes {
            rooms: HashMap::new(),
            waiting: 0,
        }
    }
}

/// What [`Resumes::done`] hands back.
pub struct Done<W> {
    /// The waiters the read answers.
    pub covered: Vec<W>,
    /// A read to send now for the others.
    pub next: Option<ReadRequest>,
    /// Reads made for this room in a row (the one that finished included).
    pub attempts: u8,
}

impl<W> Resumes<W> {
    /// Waiters now.
    pub fn len(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Wait for a read of `room` (`since`: the waiter's last offset, `None` for the
    /// position only). `Ok(Some)`: no read is in flight, send this one; `Ok(None)`: the read
    /// in flight (or the one after it) answers it; `Err`: the table is full.
    pub fn wait(
        &mut self,
        room: &Arc<str>,
        since: Option<u64>,
        w: W,
        now_ms: u64,
    ) -> Result<Option<ReadRequest>, W> {
        if self.waiting >= RESUMES_WAITING_MAX {
            return Err(w);
        }
        self.waiting += 1;
        if let Some(r) = self.rooms.get_mut(&**room) {
            r.waiters.push((since, w));
            return Ok(None);
        }
        self.rooms.insert(
            room.clone(),
            RoomReads {
                waiters: vec![(since, w)],
                from: need(since),
                sent_ms: now_ms,
                attempts: 1,
            },
        );
        Ok(Some(ReadRequest { from: need(since) }))
    }

    /// The read of `room` finished: the waiters it covers, and the read to send for the
    /// rest (`retry`: the read was unusable, every waiter needs another).
    pub fn done(&mut self, room: &str, retry: bool, now_ms: u64) -> Done<W> {
        let Some(mut r) = self.rooms.remove(room) else {
            return Done {
                covered: Vec::new(),
                next: None,
                attempts: 0,
            };
        };
        let attempts = r.attempts;
        let (covered, rest): (Vec<_>, Vec<_>) = if retry {
            (Vec::new(), std::mem::take(&mut r.waiters))
        } else {
            std::mem::take(&mut r.waiters)
                .into_iter()
                .partition(|(s, _)| covers(r.from, *s))
        };
        self.waiting -= covered.len();
        let covered = covered.into_iter().map(|(_, w)| w).collect();
        if rest.is_empty() {
            return Done {
                covered,
                next: None,
                attempts,
            };
        }
        let from = rest
            .iter()
            .map(|(s, _)| need(*s))
            .min_by(|a, b| match (a, b) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, _) => std::cmp::Ordering::Greater,
                (_, None) => std::cmp::Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
            .flatten();
        let room_key: Arc<str> = Arc::from(room);
        self.rooms.insert(
            room_key,
            RoomReads {
                waiters: rest,
                from,
                sent_ms: now_ms,
                attempts: if retry { attempts + 1 } else { 1 },
            },
        );
        Done {
            covered,
            next: Some(ReadRequest { from }),
            attempts,
        }
    }

    /// Give up on `room`'s read: every waiter of it.
    pub fn abandon(&mut self, room: &str) -> Vec<W> {
        let Some(r) = self.rooms.remove(room) else {
            return Vec::new();
        };
        self.waiting -= r.waiters.len();
        r.waiters.into_iter().map(|(_, w)| w).collect()
    }

    /// Rooms whose read was sent before `before_ms` (lost, or Redis too slow).
    pub fn late(&self, before_ms: u64) -> Vec<Arc<str>> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.sent_ms < before_ms)
            .map(|(k, _)| k.clone())
            .collect()
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

    fn observe(s: &mut Store, r: &Arc<str>, epoch: &str, offset: u64, tag: u64) -> (bool, bool) {
        let mut gap = false;
        let new = s.observe(
            r,
            epoch,
            offset,
            1000,
            frame(offset),
            10,
            0,
            tag,
            0,
            &mut gap,
        );
        (new, gap)
    }

    fn snap(epoch: &str, last: u64, offsets: std::ops::RangeInclusive<u64>) -> Snapshot {
        Snapshot {
            epoch: epoch.into(),
            last,
            entries: offsets.map(|o| (o, 1000, frame(o))).collect(),
        }
    }

    #[test]
    fn a_cluster_cache_answers_only_while_current_and_drops_what_it_delivered() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        // Nothing held yet: nothing is current.
        assert!(!s.current(&r, 0));
        s.set_hold(&r, 7);
        assert_eq!(observe(&mut s, &r, "E", 5, 7), (true, false));
        assert_eq!(observe(&mut s, &r, "E", 6, 7), (true, false));
        // An echo of one already delivered (a read brought it first): dropped.
        assert_eq!(observe(&mut s, &r, "E", 6, 7), (false, false));
        assert!(s.current(&r, 0));
        assert!(!s.current(&r, 1), "the bridge's view moved");
        let got = s.since(&r, 5, "E", 10, 0, 1000);
        assert!(got.recovered);
        assert_eq!(wires(&got), ["m6"]);
        // From before the run: not kept here (the stream may have it).
        assert!(!s.since(&r, 3, "E", 10, 0, 1000).recovered);
        // A skipped offset starts a new run.
        assert_eq!(observe(&mut s, &r, "E", 9, 7), (true, true));
        assert!(!s.since(&r, 6, "E", 10, 0, 1000).recovered);
        assert_eq!(s.peek(&r).unwrap().offset, 9);
        // The channel let go: the run no longer answers, even though it is kept.
        s.set_hold(&r, 0);
        assert!(!s.current(&r, 0));
        // Held again: current only once a message of the new subscription arrived.
        s.set_hold(&r, 8);
        assert!(!s.current(&r, 0));
        assert_eq!(observe(&mut s, &r, "E", 10, 8), (true, false));
        assert!(s.current(&r, 0));
        // 10 follows 9: nothing was missed between the two subscriptions.
        assert_eq!(wires(&s.since(&r, 8, "E", 10, 0, 1000)), ["m9", "m10"]);
        // Another epoch (Redis lost its data): the room starts over.
        assert_eq!(observe(&mut s, &r, "F", 1, 8), (true, false));
        assert_eq!(s.peek(&r).unwrap().epoch, "F");
        assert!(s.since(&r, 0, "F", 10, 0, 1000).recovered);
    }

    #[test]
    fn reads_merge_around_the_run_and_deliver_what_the_node_missed() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        s.set_hold(&r, 3);
        // A fresh node: the read is taken as it is.
        let fresh = s.merge(&r, snap("E", 4, 2..=4), 3, 0, 10, 0, 1000).unwrap();
        assert!(
            fresh.is_empty(),
            "nothing was delivered here before: nothing to catch up"
        );
        assert!(s.current(&r, 0));
        assert_eq!(wires(&s.since(&r, 1, "E", 10, 0, 1000)), ["m2", "m3", "m4"]);
        assert!(!s.since(&r, 0, "E", 10, 0, 1000).recovered, "1 is not kept");
        // Live 5, 6 arrive; a read from 1 that also brought 5..7: 7 is new here.
        observe(&mut s, &r, "E", 5, 3);
        observe(&mut s, &r, "E", 6, 3);
        let fresh = s.merge(&r, snap("E", 7, 1..=7), 3, 0, 10, 0, 1000).unwrap();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].wire(), b"m7");
        let all = s.since(&r, 0, "E", 10, 0, 1000);
        assert!(all.recovered);
        assert_eq!(wires(&all), ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
        // The echo of 7 comes later: dropped.
        assert_eq!(observe(&mut s, &r, "E", 7, 3), (false, false));
        // A read older than the run with a hole before it cannot be merged.
        let mut t = Store::new(1 << 20);
        t.set_hold(&r, 3);
        observe(&mut t, &r, "E", 8, 3);
        assert_eq!(
            t.merge(&r, snap("E", 8, 2..=5), 3, 0, 10, 0, 1000).err(),
            Some(NotContiguous)
        );
        // A position-only read that shows the node is behind: the run cannot answer.
        let mut u = Store::new(1 << 20);
        u.set_hold(&r, 3);
        observe(&mut u, &r, "E", 1, 3);
        let fresh = u
            .merge(
                &r,
                Snapshot {
                    epoch: "E".into(),
                    last: 4,
                    entries: Vec::new(),
                },
                3,
                0,
                10,
                0,
                1000,
            )
            .unwrap();
        assert!(fresh.is_empty());
        assert_eq!(u.peek(&r).unwrap().offset, 4);
        assert!(!u.since(&r, 1, "E", 10, 0, 1000).recovered);
        assert!(u.since(&r, 4, "E", 10, 0, 1000).recovered);
        // Size bounds the merged history too.
        let mut v = Store::new(1 << 20);
        v.set_hold(&r, 3);
        v.merge(&r, snap("E", 9, 1..=9), 3, 0, 3, 0, 1000).unwrap();
        assert!(v.since(&r, 6, "E", 3, 0, 1000).recovered);
        assert!(!v.since(&r, 5, "E", 3, 0, 1000).recovered);
    }

    #[test]
    fn a_local_epoch_never_mixes_with_the_clusters() {
        let mut s = Store::new(1 << 20);
        let r: Arc<str> = Arc::from("r");
        s.set_hold(&r, 1);
        observe(&mut s, &r, "E", 41, 1);
        s.to_local(&r, true);
        assert_eq!(s.mode(&r), Some(Mode::Local));
        let local = s.peek(&r).unwrap();
        assert_ne!(local.epoch, "E");
        assert_eq!(local.offset, 0);
        let (o, _) = s.next_offset(&r);
        s.append(&r, o, 1000, frame(o), 10, 0);
        assert!(s.take_diverged(&r));
        assert!(!s.take_diverged(&r));
        // Redis is back: its next message switches the room back to the cluster's epoch.
        assert_eq!(observe(&mut s, &r, "G", 1, 1), (true, false));
        assert_eq!(s.mode(&r), Some(Mode::Cluster));
        assert!(!s.since(&r, 1, &local.epoch, 10, 0, 1000).recovered);
    }

    #[test]
    fn concurrent_resumes_of_a_room_share_one_read() {
        let mut t: Resumes<u32> = Resumes::default();
        let r: Arc<str> = Arc::from("r");
        // The first asks for a read from its offset; the next 9,999 wait for it.
        assert_eq!(
            t.wait(&r, Some(10), 0, 0),
            Ok(Some(ReadRequest { from: Some(11) }))
        );
        for i in 1..10_000 {
            assert_eq!(t.wait(&r, Some(10 + (i % 5) as u64), i, 0), Ok(None));
        }
        // A plain subscribe is answered by any read; one from before the read's start
        // waits for the next.
        assert_eq!(t.wait(&r, None, 10_000, 0), Ok(None));
        assert_eq!(t.wait(&r, Some(3), 10_001, 0), Ok(None));
        assert_eq!(t.len(), 10_002);
        let d = t.done(&r, false, 5);
        assert_eq!(d.covered.len(), 10_001);
        assert_eq!(d.next, Some(ReadRequest { from: Some(4) }));
        assert_eq!(t.late(5), Vec::<Arc<str>>::new());
        assert_eq!(t.late(6), vec![r.clone()]);
        // An unusable read: everyone waits for the next, counted as another attempt.
        let d = t.done(&r, true, 6);
        assert!(d.covered.is_empty());
        assert_eq!(d.next, Some(ReadRequest { from: Some(4) }));
        let d = t.done(&r, true, 7);
        assert_eq!(d.attempts, 2);
        assert_eq!(t.abandon(&r), vec![10_001]);
        assert!(t.is_empty());
        // A position-only first read.
        assert_eq!(t.wait(&r, None, 1, 0), Ok(Some(ReadRequest { from: None })));
        assert_eq!(t.wait(&r, Some(0), 2, 0), Ok(None));
        let d = t.done(&r, false, 1);
        assert_eq!(d.covered, vec![1]);
        assert_eq!(d.next, Some(ReadRequest { from: Some(1) }));
        // A client's offset at the top of the range does not overflow.
        let big: Arc<str> = Arc::from("big");
        assert_eq!(
            t.wait(&big, Some(u64::MAX), 3, 0),
            Ok(Some(ReadRequest {
                from: Some(u64::MAX)
            }))
        );
    }
}
