//! The in-memory message store: the embedded default when no `database_url` is set, so a node
//! has threads, history, read state, notifications and `sync` with nothing else installed. It
//! forgets everything on restart, and holds at most a byte budget (`store_memory_bytes`), past
//! which it evicts the oldest messages first.
//!
//! It owns only its own tables; it never touches sockets, shards or the runtime. It runs on the
//! bridge thread alone (the single-threaded runtime's `LocalSet`): its state sits behind one
//! `RefCell`, with no lock, and no method awaits anything, so every call (a whole `append`
//! batch included) runs to completion before another starts. That makes batches atomic by
//! construction: an `append` either fails its size check before touching anything, or stores
//! every entry. It is not `Sync` and must not be shared with a shard.
//!
//! ## Layout (what makes each call cheap)
//! - **Messages** live in one log in id order, in chunks of [`MESSAGE_CHUNK`] (no doubling
//!   copy of the whole log, at most two part-filled chunks of slack), addressed by their
//!   *position* (a counter of messages appended): position -> message is O(1). Eviction pops
//!   the front of the log, which is always the oldest message store-wide and, because ids and
//!   `seq` both follow commit order, the oldest held message of its thread and of each of its
//!   participants too. So every per-thread and per-user index is a deque trimmed at its front.
//! - **A thread** holds the positions of its held messages in `seq` order (seq -> message is
//!   O(1): `held[seq - first_seq]`), and per participant the read state, the delivered state,
//!   and how many of the held messages after their read mark they sent themselves, so an
//!   unread count is arithmetic, not a scan (a read mark moving forward walks the messages it
//!   passes once: amortised O(1) per message and reader).
//! - **A user** holds the positions of the held messages of every thread they take part in
//!   (`sync` is a binary search plus `limit` steps, never a scan of the store), their threads
//!   by activity key (see [`activity_key`]; a B-tree, so a page of threads is O(log n + limit)),
//!   their notifications (all and unread), and the id of their newest evicted message (for
//!   [`SyncPage::truncated`]).
//! - Store-wide: `serverMsgId` -> position, `(sender, clientMsgId)` -> position (dedup),
//!   text id -> thread, numeric id -> thread, empty threads by activity key (eviction),
//!   notifications by id, read notifications by id (eviction), `(user, source_key)` ->
//!   notification (dedup). Hash maps use std's `RandomState` (SipHash, randomly keyed) on
//!   purpose: user ids and client ids are peer input.
//!
//! An append of a DM costs six hash lookups (its dedup key, its thread by text id and by
//! number, its two users) and two inserts (its `serverMsgId` and dedup key), a log push, three
//! deque pushes and two B-tree moves (the thread to the top of each participant's activity
//! index); in a full store, the eviction of the oldest message costs about as much again. O(1)
//! per DM, O(participants) per group message, whatever the store holds. Measured (`cargo bench
//! --bench store_memory`, 2 vCPU VM, CPU time of the bridge thread): 1.6 us per DM into a
//! growing store, 2.4 us into a full one (about 400,000 DMs/s, each evicting the oldest);
//! a `sync` page of 50 in 3.2 us, against 1.1 ms for a scan of 128,000 messages.
//!
//! ## Byte budget
//! Every held item is counted when stored and uncounted when evicted, by the functions below
//! ([`message_bytes`], [`thread_bytes`], [`user_bytes`], [`notification_bytes`]): the item's
//! struct, the heap of every string it owns, and its entries in every index. The per-thread
//! and per-user position deques are counted exactly (their capacity, updated as they grow and
//! shrink). Strings shared with another item (a message's sender, recipient and thread id are
//! the thread's own `Arc`s) are counted once, with their owner. Hash map and B-tree entries
//! are counted with the slack of their tables ([`hash_entry_bytes`], [`btree_entry_bytes`]).
//! A unit test recounts everything from scratch and checks it against the running total; the
//! bench `store_memory` checks the total against a counting allocator.
//!
//! Not counted: at most two part-filled log chunks and a spare one (3 x [`MESSAGE_CHUNK`] x
//! 160 B = 120 KiB), and the allocator's own headers and rounding.
//!
//! Per item on x86-64 (string lengths in bytes; struct sizes from `size_of`, checked by the
//! test `the_ledger_is_the_documented_one`):
//!
//! | item | bytes |
//! |------|-------|
//! | message | 160 log slot + 49 `serverMsgId` entry + (16 + content) + (16 + attachment) + (16 + clientMsgId + 61 dedup entry) |
//! | | + its position deque slots, 8 in its thread and 8 per participant (counted by capacity) |
//! | thread | 277 (its struct in the numeric index, the text index entry, the empty-thread index entry) + (16 + id) + (16 + title) + 40 per participant (read state) |
//! | user | 193 + (16 + user id) + their position deque + their B-trees: 192 for up to 11 threads (about 35 per thread past that), 104 each for up to 11 notifications and unread ones |
//! | notification | 201 + (16 + kind) + (16 + data) + (16 + source key + 61 dedup entry) |
//!
//! A DM of 100 bytes of content with a 36-byte `clientMsgId` (ids of 36 bytes) counts 438 B
//! plus its deque slots: 479 B per DM in threads of 100 messages, measured 479 B by a counting
//! allocator; 1,124 B (measured 1,072 B) when every DM thread holds two, its thread and two users
//! spread over them (`cargo bench --bench store_memory`, docs/BENCHMARKS.md). So the default
//! 256 MiB holds about 560,000 DMs.
//!
//! Unread counts and thread pages cover the messages still held; a thread whose messages were
//! all evicted keeps its `last_seq`, its read state and its place in its users' lists.
//!
//! ## Eviction (when a store call would pass the budget)
//! 1. The oldest messages, store-wide, by id (FIFO). Evicting a message also evicts its dedup
//!    key: a retry of that `(sender, clientMsgId)` after it would be stored again as a new
//!    message. That is acceptable: clients retry within minutes (the ack timeout and the
//!    reconnect), while eviction takes the oldest message in the store, which at any useful
//!    budget is hours or days old; a store that evicts what a client is still retrying is
//!    under-sized, and its `evicted_messages` counter says so.
//! 2. The oldest read notifications, then the oldest notifications.
//! 3. Only when nothing else is left: the least recently active threads that hold no message
//!    (their read state and participants go with them, and users left with no thread and no
//!    notification). A thread evicted and then used again starts over: a new numeric id, `seq`
//!    from 1. Threads named by the batch being stored are never evicted by it.
//!
//! Sizes are checked before anything changes: an item that cannot fit even in an empty store
//! (with the threads its batch names) is refused with [`StoreError::Full`], and nothing of its
//! batch is stored. A batch bigger than the whole budget evicts its own oldest messages while
//! it is stored (each message fits; they do not all fit at once).
//!
//! A user the store forgets entirely (their last thread evicted) also forgets their newest
//! evicted id, so a later `sync` from an old cursor reads `truncated: false` for them; only
//! possible when the budget holds nothing but empty threads.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::mem::size_of;
use std::sync::Arc;

use super::{
    activity_key, has_nul, is_numeric_id, Appended, Created, Lookup, Mark, MarkRequest, Marked,
    Message, MessageRef, NewMessage, NewNotification, NewThread, Noted, Notification, Page,
    Refusal, Result, Store, StoreError, SyncPage, ThreadKind, ThreadRef, ThreadView,
    APPEND_BATCH_MAX, MARK_IDS_MAX, PAGE_LIMIT_MAX, THREAD_PARTICIPANTS_MAX,
    THREAD_TITLE_BYTES_MAX, UNREAD_COUNT_MAX,
};

/// The proposed default of `store_memory_bytes`: about 560,000 DMs of 100 bytes (see the
/// module doc's ledger) on a node that has no PostgreSQL.
pub const STORE_MEMORY_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

/// Messages per log chunk. The log grows and shrinks a chunk at a time (40 KiB), so it never
/// copies itself and never holds more than two part-filled chunks it does not use.
pub const MESSAGE_CHUNK: usize = 256;

/// Position deques with at most this many slots are not shrunk when they empty partly (an
/// empty one always gives its memory back).
const DEQUE_SHRINK_SLOTS_MIN: usize = 16;

/// The most a position deque holding one message keeps (what the size checks allow per
/// deque): a deque shrinks to twice its length once a quarter full, and not below
/// [`DEQUE_SHRINK_SLOTS_MIN`] slots.
const DEQUE_RESIDUE_BYTES: usize = DEQUE_SHRINK_SLOTS_MIN * size_of::<u64>();

// ---- The byte ledger -------------------------------------------------------------------

/// Heap bytes of an `Arc<str>` of `len` bytes: its strong and weak counts, then the text.
pub const fn arc_str_bytes(len: usize) -> usize {
    2 * size_of::<usize>() + len
}

/// Bytes of one entry in a store-wide hash map whose `(key, value)` is `kv` bytes: the entry
/// and its control byte, times 3/2 for the buckets left empty (hashbrown fills between 7/16
/// and 7/8 of them, doubling as it grows).
pub const fn hash_entry_bytes(kv: usize) -> usize {
    (kv + 1) * 3 / 2
}

/// Bytes of a leaf node of std's B-tree with keys of `k` and values of `v` bytes: a parent
/// pointer, two `u16`s and room for 11 entries.
pub const fn btree_leaf_bytes(k: usize, v: usize) -> usize {
    (size_of::<usize>() + 4 + 11 * (k + v)).next_multiple_of(size_of::<usize>())
}

/// Bytes of an internal node: a leaf's and 12 child pointers.
pub const fn btree_internal_bytes(k: usize, v: usize) -> usize {
    btree_leaf_bytes(k, v) + 12 * size_of::<usize>()
}

/// Bytes of a B-tree of `len` entries: one leaf up to 11; past that about 7 entries per leaf
/// (inserts come at the high end here, where a full leaf splits 6 + 5, and a leaf below 5
/// merges) and an internal node per 6 leaves.
pub const fn btree_bytes(len: usize, k: usize, v: usize) -> usize {
    match len {
        0 => 0,
        1..=11 => btree_leaf_bytes(k, v),
        _ => {
            let leaves = len.div_ceil(7);
            leaves * btree_leaf_bytes(k, v) + leaves.div_ceil(6) * btree_internal_bytes(k, v)
        }
    }
}

/// One entry's share of a large (store-wide) B-tree, as [`btree_bytes`] counts it.
pub const fn btree_entry_bytes(k: usize, v: usize) -> usize {
    (6 * btree_leaf_bytes(k, v) + btree_internal_bytes(k, v)).div_ceil(42)
}

/// A message's fixed bytes: its log slot and its `serverMsgId` index entry.
pub const MESSAGE_FIXED_BYTES: usize =
    size_of::<Option<Message>>() + hash_entry_bytes(size_of::<(u128, u64)>());

/// A `(sender, clientMsgId)` dedup entry (the key's strings are the message's own).
pub const DEDUP_ENTRY_BYTES: usize = hash_entry_bytes(size_of::<((Arc<str>, Arc<str>), u64)>());

/// A thread's fixed bytes: its entry in the numeric and the text index, and its entry in the
/// empty-thread index (counted whether it is empty or not).
pub const THREAD_FIXED_BYTES: usize = hash_entry_bytes(size_of::<(u64, Thread)>())
    + hash_entry_bytes(size_of::<(Arc<str>, u64)>())
    + btree_entry_bytes(size_of::<u64>(), size_of::<u64>());

/// Per participant of a thread: their read state in it (the thread's entry in the
/// participant's activity index is counted with the user, see [`user_trees_bytes`]).
pub const PARTICIPANT_BYTES: usize = size_of::<Participant>();

/// A user's fixed bytes: their entry in the user table (the string, their position deque
/// and their B-trees are counted apart).
pub const USER_FIXED_BYTES: usize = hash_entry_bytes(size_of::<(Arc<str>, User)>());

/// A notification's fixed bytes: its entry in the store's table and in the read set (counted
/// whether it is in it or not; the user's sets are counted with the user).
pub const NOTIFICATION_FIXED_BYTES: usize =
    btree_entry_bytes(size_of::<u64>(), size_of::<Notification>())
        + btree_entry_bytes(size_of::<u64>(), 0);

/// A `(user, source_key)` dedup entry of a notification.
pub const NOTIFICATION_KEY_BYTES: usize =
    hash_entry_bytes(size_of::<((Arc<str>, Arc<str>), u64)>());

fn opt_str_bytes(s: &Option<Arc<str>>) -> usize {
    s.as_ref().map_or(0, |s| arc_str_bytes(s.len()))
}

fn message_bytes_of(
    content: &str,
    attachment: &Option<Arc<str>>,
    cmid: &Option<Arc<str>>,
) -> usize {
    MESSAGE_FIXED_BYTES
        + arc_str_bytes(content.len())
        + opt_str_bytes(attachment)
        + cmid
            .as_ref()
            .map_or(0, |c| arc_str_bytes(c.len()) + DEDUP_ENTRY_BYTES)
}

/// The bytes a stored message is counted at (its position deque slots are counted apart, by
/// the deques' capacity).
pub fn message_bytes(m: &Message) -> usize {
    message_bytes_of(&m.content, &m.attachment_url, &m.client_msg_id)
}

fn thread_bytes_of(id_len: usize, title: &Option<Arc<str>>, participants: usize) -> usize {
    THREAD_FIXED_BYTES
        + arc_str_bytes(id_len)
        + opt_str_bytes(title)
        + participants * PARTICIPANT_BYTES
}

/// The bytes a thread is counted at (its position deque apart).
pub fn thread_bytes(id: &str, title: &Option<Arc<str>>, participants: usize) -> usize {
    thread_bytes_of(id.len(), title, participants)
}

/// The bytes a user is counted at (their position deque apart).
pub fn user_bytes(user: &str) -> usize {
    USER_FIXED_BYTES + arc_str_bytes(user.len())
}

/// The most a user taking part only in the threads a size check keeps, with only the message
/// it checks, is counted at: with their activity index's first leaf and their position deque's
/// residue.
pub fn user_floor_bytes(user: &str) -> usize {
    user_bytes(user) + btree_leaf_bytes(size_of::<u64>(), size_of::<u64>()) + DEQUE_RESIDUE_BYTES
}

/// The bytes a notification is counted at.
pub fn notification_bytes(n: &Notification) -> usize {
    notification_bytes_of(&n.kind, &n.data_json, &n.source_key)
}

fn notification_bytes_of(kind: &str, data: &str, key: &Option<Arc<str>>) -> usize {
    NOTIFICATION_FIXED_BYTES
        + arc_str_bytes(kind.len())
        + arc_str_bytes(data.len())
        + key
            .as_ref()
            .map_or(0, |k| arc_str_bytes(k.len()) + NOTIFICATION_KEY_BYTES)
}

/// A user's three B-trees (their threads by activity, their notifications, the unread
/// ones), by how many entries each holds: small ones cost a whole leaf.
fn user_trees_bytes(u: &User) -> usize {
    btree_bytes(u.threads.len(), size_of::<u64>(), size_of::<u64>())
        + btree_bytes(u.notifications.len(), size_of::<u64>(), 0)
        + btree_bytes(u.unread.len(), size_of::<u64>(), 0)
}

/// Heap bytes of a position deque.
fn deque_bytes(d: &VecDeque<u64>) -> usize {
    d.capacity() * size_of::<u64>()
}

/// Push a position; returns the bytes the deque grew by.
fn push_counted(d: &mut VecDeque<u64>, pos: u64) -> usize {
    let before = deque_bytes(d);
    d.push_back(pos);
    deque_bytes(d) - before
}

/// Pop the front position (which must be `pos`), shrinking a deque left mostly empty; returns
/// the bytes it shrank by.
fn pop_counted(d: &mut VecDeque<u64>, pos: u64) -> usize {
    let before = deque_bytes(d);
    let front = d.pop_front();
    debug_assert_eq!(
        front,
        Some(pos),
        "the evicted message heads every index it is in"
    );
    if d.is_empty() || (d.capacity() > DEQUE_SHRINK_SLOTS_MIN && d.len() * 4 <= d.capacity()) {
        d.shrink_to(d.len() * 2);
    }
    before - deque_bytes(d)
}

// ---- The tables ------------------------------------------------------------------------

/// The top bit of a `by_server_id` value: the message is in the Kafka topic
/// ([`Store::mark_produced`]); positions never reach it. Costs no byte of the ledger.
const PRODUCED: u64 = 1 << 63;

/// The message log: every held message in id order, by position.
#[derive(Default)]
struct Log {
    /// Each holds [`MESSAGE_CHUNK`] slots (all full but the last); evicted slots are `None`.
    chunks: VecDeque<Vec<Option<Message>>>,
    /// Position of `chunks[0][0]`.
    base: u64,
    /// Position of the oldest held message.
    head: u64,
    /// Position the next message gets.
    tail: u64,
    /// The last chunk emptied, kept for the next one needed: in a full store a chunk is
    /// emptied for every one filled, and reusing it spares the allocator a 40 KiB block (and
    /// glibc the consolidation a large request triggers) per [`MESSAGE_CHUNK`] messages.
    spare: Option<Vec<Option<Message>>>,
}

impl Log {
    fn len(&self) -> usize {
        (self.tail - self.head) as usize
    }

    fn get(&self, pos: u64) -> Option<&Message> {
        if pos < self.head || pos >= self.tail {
            return None;
        }
        let off = (pos - self.base) as usize;
        self.chunks
            .get(off / MESSAGE_CHUNK)?
            .get(off % MESSAGE_CHUNK)?
            .as_ref()
    }

    /// A position an index holds (every index holds only held positions).
    fn at(&self, pos: u64) -> &Message {
        self.get(pos).expect("an index names a held message")
    }

    fn push(&mut self, m: Message) -> u64 {
        if self.chunks.back().is_none_or(|c| c.len() == MESSAGE_CHUNK) {
            let chunk = self
                .spare
                .take()
                .unwrap_or_else(|| Vec::with_capacity(MESSAGE_CHUNK));
            self.chunks.push_back(chunk);
        }
        let chunk = self.chunks.back_mut().expect("a chunk was just ensured");
        chunk.push(Some(m));
        let pos = self.tail;
        self.tail += 1;
        pos
    }

    fn pop_front(&mut self) -> Option<(u64, Message)> {
        if self.head == self.tail {
            return None;
        }
        let off = (self.head - self.base) as usize;
        let m = self.chunks[0][off].take().expect("the head slot is held");
        let pos = self.head;
        self.head += 1;
        if off + 1 == MESSAGE_CHUNK {
            let mut chunk = self.chunks.pop_front().expect("the head's chunk");
            chunk.clear();
            self.spare = Some(chunk);
            self.base += MESSAGE_CHUNK as u64;
        }
        Some((pos, m))
    }

    /// The position of the held message with this id (ids increase with positions).
    fn find_id(&self, id: u64) -> Option<u64> {
        let (mut lo, mut hi) = (self.head, self.tail);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.at(mid).id < id {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo < self.tail && self.at(lo).id == id).then_some(lo)
    }
}

/// One participant's state in a thread.
struct Participant {
    /// The user table's own `Arc` (shared by every message and thread naming them).
    user: Arc<str>,
    read_seq: u64,
    delivered_seq: u64,
    /// Held messages with `seq > read_seq` that this user sent: unread = held after the read
    /// mark - this.
    own_after_read: u64,
}

struct Thread {
    /// The text-index key's own `Arc` (every message of the thread shares it).
    id: Arc<str>,
    numeric_id: u64,
    kind: ThreadKind,
    title: Option<Arc<str>>,
    created_at_ms: u64,
    /// Sorted by user id.
    participants: Box<[Participant]>,
    /// Positions of the held messages, in `seq` order from `first_seq`.
    held: VecDeque<u64>,
    /// `seq` of `held[0]`; `last_seq + 1` when nothing is held.
    first_seq: u64,
    last_seq: u64,
    /// Id of its newest message, held or not (0: none yet).
    last_message_id: u64,
}

impl Thread {
    fn key(&self) -> u64 {
        activity_key(
            (self.last_message_id != 0).then_some(self.last_message_id),
            self.numeric_id,
        )
    }

    fn participant(&self, user: &str) -> Option<usize> {
        self.participants
            .binary_search_by(|p| (*p.user).cmp(user))
            .ok()
    }

    /// Whether its participants are exactly `{a, b}` (`{a}` when `a == b`).
    fn is_pair(&self, a: &str, b: &str) -> bool {
        let want = if a == b { 1 } else { 2 };
        self.participants.len() == want
            && self.participant(a).is_some()
            && self.participant(b).is_some()
    }

    fn bytes(&self) -> usize {
        thread_bytes(&self.id, &self.title, self.participants.len())
    }

    /// Held messages with `seq > read_seq`.
    fn held_after(&self, read_seq: u64) -> u64 {
        let lo = (read_seq + 1).max(self.first_seq);
        (self.last_seq + 1).saturating_sub(lo)
    }
}

#[derive(Default)]
struct User {
    /// Positions of the held messages of every thread they take part in, ascending.
    messages: VecDeque<u64>,
    /// Their threads: activity key -> numeric id.
    threads: BTreeMap<u64, u64>,
    /// Id of their newest evicted message (0: none).
    evicted_up_to: u64,
    notifications: BTreeSet<u64>,
    unread: BTreeSet<u64>,
}

/// What an eviction must leave in place: the item just stored and, for a batch, every thread
/// it names.
enum Pin<'a> {
    Message { pos: u64, batch: &'a [NewMessage] },
    Notification(u64),
    Thread(u64),
}

/// The store's gauges and counters, for `/metrics` (read once per tick, not per message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub budget_bytes: usize,
    pub bytes_used: usize,
    pub messages: usize,
    pub threads: usize,
    pub users: usize,
    pub notifications: usize,
    pub evicted_messages: u64,
    pub evicted_notifications: u64,
    pub evicted_threads: u64,
}

struct Inner {
    budget: usize,
    bytes: usize,
    /// The last id of the one sequence of message ids and thread numeric ids.
    last_id: u64,
    last_notification_id: u64,
    /// The most a thread with its users (each at [`user_floor_bytes`]) has cost: the size
    /// check's cheap bound.
    thread_side_max: usize,
    log: Log,
    by_server_id: HashMap<u128, u64>,
    dedup: HashMap<(Arc<str>, Arc<str>), u64>,
    threads: HashMap<u64, Thread>,
    by_text: HashMap<Arc<str>, u64>,
    /// Threads holding no message: activity key -> numeric id (thread eviction order).
    empty_threads: BTreeMap<u64, u64>,
    users: HashMap<Arc<str>, User>,
    notifications: BTreeMap<u64, Notification>,
    read_notifications: BTreeSet<u64>,
    notification_keys: HashMap<(Arc<str>, Arc<str>), u64>,
    evicted_messages: u64,
    evicted_notifications: u64,
    evicted_threads: u64,
}

/// The in-memory [`Store`]. See the module doc.
pub struct MemoryStore {
    inner: RefCell<Inner>,
}

impl MemoryStore {
    /// A store that holds at most `budget_bytes` (as counted by the module doc's ledger).
    pub fn new(budget_bytes: usize) -> MemoryStore {
        MemoryStore {
            inner: RefCell::new(Inner {
                budget: budget_bytes,
                bytes: 0,
                last_id: 0,
                last_notification_id: 0,
                thread_side_max: 0,
                log: Log::default(),
                by_server_id: HashMap::new(),
                dedup: HashMap::new(),
                threads: HashMap::new(),
                by_text: HashMap::new(),
                empty_threads: BTreeMap::new(),
                users: HashMap::new(),
                notifications: BTreeMap::new(),
                read_notifications: BTreeSet::new(),
                notification_keys: HashMap::new(),
                evicted_messages: 0,
                evicted_notifications: 0,
                evicted_threads: 0,
            }),
        }
    }

    /// The byte budget it was made with.
    pub fn budget(&self) -> usize {
        self.inner.borrow().budget
    }

    /// Bytes held, as counted by the ledger (at most [`MemoryStore::budget`] after every call).
    pub fn bytes_used(&self) -> usize {
        self.inner.borrow().bytes
    }

    /// Messages evicted for the budget since start.
    pub fn evicted_messages(&self) -> u64 {
        self.inner.borrow().evicted_messages
    }

    /// Notifications evicted for the budget since start.
    pub fn evicted_notifications(&self) -> u64 {
        self.inner.borrow().evicted_notifications
    }

    /// Threads evicted for the budget since start (only when nothing else was left).
    pub fn evicted_threads(&self) -> u64 {
        self.inner.borrow().evicted_threads
    }

    /// Every gauge and counter at once.
    pub fn stats(&self) -> MemoryStats {
        let s = self.inner.borrow();
        MemoryStats {
            budget_bytes: s.budget,
            bytes_used: s.bytes,
            messages: s.log.len(),
            threads: s.threads.len(),
            users: s.users.len(),
            notifications: s.notifications.len(),
            evicted_messages: s.evicted_messages,
            evicted_notifications: s.evicted_notifications,
            evicted_threads: s.evicted_threads,
        }
    }

    /// The bytes every held item is counted at, summed from scratch (the ledger's check).
    #[cfg(test)]
    fn recount(&self) -> usize {
        self.inner.borrow().recount()
    }
}

/// What the DM thread `m` would make costs, its users included, and those users; `None` for a
/// message without `to` (it makes no thread).
fn new_dm_side_bytes(m: &NewMessage) -> Option<(usize, Vec<&str>)> {
    let to = m.to.as_deref()?;
    let users: Vec<&str> = if *m.sender == *to {
        vec![&*m.sender]
    } else {
        vec![&*m.sender, to]
    };
    let bytes = thread_bytes_of(m.thread.len(), &None, users.len())
        + DEQUE_RESIDUE_BYTES
        + users.iter().map(|u| user_floor_bytes(u)).sum::<usize>();
    Some((bytes, users))
}

/// The bound of every list: `limit` within 1..=[`PAGE_LIMIT_MAX`] (as the PostgreSQL store).
fn page_limit(limit: usize) -> usize {
    limit.clamp(1, PAGE_LIMIT_MAX)
}

/// A title cut to [`THREAD_TITLE_BYTES_MAX`] at a character boundary (the REST layer refuses
/// longer ones; the store keeps its bound whatever it is handed, as the PostgreSQL store).
fn bounded_title(title: &Option<Arc<str>>) -> Option<Arc<str>> {
    let t = title.as_ref()?;
    if t.len() <= THREAD_TITLE_BYTES_MAX {
        return Some(t.clone());
    }
    let mut end = THREAD_TITLE_BYTES_MAX;
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    Some(Arc::from(&t[..end]))
}

/// The users of a new group thread: the creator and the others, sorted, without duplicates,
/// at most [`THREAD_PARTICIPANTS_MAX`] (the creator and the first others by id; the REST
/// layer refuses more, the store keeps its bound, as the PostgreSQL store).
fn group_users(new: &NewThread) -> Vec<Arc<str>> {
    let mut others = sorted_unique(new.participants.clone());
    others.retain(|u| *u != new.creator);
    others.truncate(THREAD_PARTICIPANTS_MAX - 1);
    others.push(new.creator.clone());
    sorted_unique(others)
}

/// The users of a new direct thread: the creator and the other, sorted (just the creator
/// for a conversation with yourself); `None` for more than two.
fn direct_users(new: &NewThread) -> Option<Vec<Arc<str>>> {
    let mut users = new.participants.clone();
    users.push(new.creator.clone());
    let users = sorted_unique(users);
    (users.len() <= 2).then_some(users)
}

fn sorted_unique(mut users: Vec<Arc<str>>) -> Vec<Arc<str>> {
    users.sort_unstable();
    users.dedup();
    users
}

impl Inner {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// The user table's `Arc` for `name`, making the user if new.
    fn user_entry(&mut self, name: &Arc<str>) -> Arc<str> {
        if let Some((k, _)) = self.users.get_key_value(&**name) {
            return k.clone();
        }
        self.users.insert(name.clone(), User::default());
        self.bytes += user_bytes(name);
        name.clone()
    }

    /// Change a user's B-trees with `f`, counting what they grow or shrink by.
    fn update_user<R>(&mut self, name: &str, f: impl FnOnce(&mut User) -> R) -> Option<R> {
        let u = self.users.get_mut(name)?;
        let before = user_trees_bytes(u);
        let r = f(u);
        self.bytes = self.bytes - before + user_trees_bytes(u);
        Some(r)
    }

    /// Forget a user left with no thread and no notification.
    fn forget_user_if_unused(&mut self, name: &str) {
        let Some(u) = self.users.get(name) else {
            return;
        };
        if u.threads.is_empty() && u.notifications.is_empty() {
            debug_assert!(u.messages.is_empty());
            self.bytes -= user_bytes(name) + deque_bytes(&u.messages) + user_trees_bytes(u);
            self.users.remove(name);
        }
    }

    fn insert_thread(
        &mut self,
        id: Arc<str>,
        kind: ThreadKind,
        title: Option<Arc<str>>,
        users: Vec<Arc<str>>,
        created_at_ms: u64,
    ) -> u64 {
        let numeric_id = self.next_id();
        let mut participants = Vec::with_capacity(users.len());
        let mut users_bytes = 0;
        for u in &users {
            let user = self.user_entry(u);
            users_bytes += user_floor_bytes(u);
            self.update_user(&user, |u| u.threads.insert(numeric_id, numeric_id));
            participants.push(Participant {
                user,
                read_seq: 0,
                delivered_seq: 0,
                own_after_read: 0,
            });
        }
        let t = Thread {
            id: id.clone(),
            numeric_id,
            kind,
            title,
            created_at_ms,
            participants: participants.into_boxed_slice(),
            held: VecDeque::new(),
            first_seq: 1,
            last_seq: 0,
            last_message_id: 0,
        };
        self.bytes += t.bytes();
        let side = t.bytes() + DEQUE_RESIDUE_BYTES + users_bytes;
        self.thread_side_max = self.thread_side_max.max(side);
        self.empty_threads.insert(t.key(), numeric_id);
        self.by_text.insert(id, numeric_id);
        self.threads.insert(numeric_id, t);
        numeric_id
    }

    fn resolve_thread(&self, r: &ThreadRef) -> Option<u64> {
        match r {
            ThreadRef::Id(s) => self.by_text.get(&**s).copied(),
            ThreadRef::IdOrNumber(s, n) => self
                .by_text
                .get(&**s)
                .copied()
                .or_else(|| self.threads.contains_key(n).then_some(*n)),
        }
    }

    fn view(&self, t: &Thread, viewer: &str) -> ThreadView {
        let (read_seq, unread) = match t.participant(viewer) {
            Some(i) => {
                let p = &t.participants[i];
                let unread = t.held_after(p.read_seq) - p.own_after_read;
                (p.read_seq, unread.min(UNREAD_COUNT_MAX))
            }
            None => (0, 0),
        };
        ThreadView {
            id: t.id.clone(),
            numeric_id: t.numeric_id,
            kind: t.kind,
            title: t.title.clone(),
            participants: t.participants.iter().map(|p| p.user.clone()).collect(),
            created_at_ms: t.created_at_ms,
            last_seq: t.last_seq,
            last_message: t.held.back().map(|&pos| self.log.at(pos).clone()),
            read_seq,
            unread,
        }
    }

    // ---- Size checks (before anything changes) ----

    /// Refuse a batch holding an entry that cannot fit even in a store emptied of everything
    /// but the threads the batch names (and their users).
    fn check_batch_fits(&self, batch: &[NewMessage]) -> Result<()> {
        // A cheap bound first, with no lookup: each entry's thread counted at the most any
        // thread has cost, or at what its new DM thread would.
        let mut sum = 0usize;
        let mut item_max = 0usize;
        for m in batch {
            let side = new_dm_side_bytes(m).map_or(0, |(bytes, _)| bytes);
            sum = sum.saturating_add(side.max(self.thread_side_max));
            item_max = item_max.max(message_bytes_of(
                &m.content,
                &m.attachment_url,
                &m.client_msg_id,
            ));
        }
        if sum.saturating_add(item_max) <= self.budget {
            return Ok(());
        }
        // Exact: each thread and each user once.
        let mut seen_threads: HashSet<&str> = HashSet::new();
        let mut seen_users: HashSet<&str> = HashSet::new();
        let mut pinned = 0usize;
        for m in batch {
            if seen_threads.insert(&m.thread) {
                pinned = pinned.saturating_add(self.thread_side_bytes(m, &mut seen_users));
            }
        }
        if pinned.saturating_add(item_max) > self.budget {
            return Err(StoreError::Full);
        }
        Ok(())
    }

    /// The bytes of the thread `m` goes to (made if it would be; 0 if `m` would be refused)
    /// and of its users not yet in `seen`, each at least [`user_floor_bytes`].
    fn thread_side_bytes<'a>(&'a self, m: &'a NewMessage, seen: &mut HashSet<&'a str>) -> usize {
        let (thread, users): (usize, Vec<&'a str>) = match self.by_text.get(&*m.thread) {
            Some(nid) => {
                let t = &self.threads[nid];
                let thread = t.bytes() + DEQUE_RESIDUE_BYTES;
                (thread, t.participants.iter().map(|p| &*p.user).collect())
            }
            None => match new_dm_side_bytes(m) {
                None => return 0,
                Some((_, users)) => {
                    let thread = thread_bytes_of(m.thread.len(), &None, users.len());
                    (thread + DEQUE_RESIDUE_BYTES, users)
                }
            },
        };
        let users: usize = users
            .into_iter()
            .filter(|u| seen.insert(u))
            .map(user_floor_bytes)
            .sum();
        thread + users
    }

    // ---- Writes ----

    fn append(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        debug_assert!(
            batch.len() <= APPEND_BATCH_MAX,
            "the bridge batches at most APPEND_BATCH_MAX"
        );
        self.check_batch_fits(batch)?;
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            out.push(self.append_one(m, batch));
        }
        Ok(out)
    }

    fn append_one(&mut self, m: &NewMessage, batch: &[NewMessage]) -> Appended {
        // As the PostgreSQL store, which cannot hold it: the two refuse the same entries.
        if m.has_nul() {
            return Appended::Refused(Refusal::InvalidText);
        }
        if let Some(c) = &m.client_msg_id {
            if let Some(&pos) = self.dedup.get(&(m.sender.clone(), c.clone())) {
                return Appended::Duplicate(self.log.at(pos).clone());
            }
        }
        let nid = match self.by_text.get(&*m.thread) {
            Some(&nid) => {
                let t = &self.threads[&nid];
                let allowed = match &m.to {
                    // A DM only into the pair's own direct thread (see the trait's doc).
                    Some(to) => t.kind == ThreadKind::Direct && t.is_pair(&m.sender, to),
                    None => t.participant(&m.sender).is_some(),
                };
                if !allowed {
                    return Appended::Refused(Refusal::NotParticipant);
                }
                nid
            }
            None => match &m.to {
                None => return Appended::Refused(Refusal::UnknownThread),
                Some(_) if is_numeric_id(&m.thread) => {
                    return Appended::Refused(Refusal::NumericThreadId)
                }
                Some(to) => self.insert_thread(
                    m.thread.clone(),
                    ThreadKind::Direct,
                    None,
                    sorted_unique(vec![m.sender.clone(), to.clone()]),
                    m.sent_at_ms,
                ),
            },
        };
        let id = self.next_id();
        let Inner {
            threads,
            users,
            log,
            bytes,
            empty_threads,
            by_server_id,
            dedup,
            ..
        } = self;
        let t = threads.get_mut(&nid).expect("resolved above");
        let old_key = t.key();
        if t.held.is_empty() {
            empty_threads.remove(&old_key);
        }
        t.last_seq += 1;
        t.last_message_id = id;
        let si = t.participant(&m.sender).expect("checked above");
        t.participants[si].own_after_read += 1;
        let sender = t.participants[si].user.clone();
        let to = m.to.as_ref().map(|to| {
            let i = t.participant(to).expect("checked above");
            t.participants[i].user.clone()
        });
        let message = Message {
            id,
            seq: t.last_seq,
            thread: t.id.clone(),
            thread_numeric_id: nid,
            server_msg_id: m.server_msg_id,
            event_id: m.event_id,
            sender: sender.clone(),
            to,
            client_msg_id: m.client_msg_id.clone(),
            content: m.content.clone(),
            attachment_url: m.attachment_url.clone(),
            sent_at_ms: m.sent_at_ms,
        };
        let pos = log.push(message.clone());
        *bytes += push_counted(&mut t.held, pos);
        let mut participants = Vec::with_capacity(t.participants.len());
        for p in t.participants.iter() {
            let u = users.get_mut(&*p.user).expect("participants are users");
            *bytes += push_counted(&mut u.messages, pos);
            u.threads.remove(&old_key);
            u.threads.insert(id, nid);
            participants.push(p.user.clone());
        }
        by_server_id.insert(m.server_msg_id, pos);
        if let Some(c) = &message.client_msg_id {
            dedup.insert((sender, c.clone()), pos);
        }
        *bytes += message_bytes(&message);
        self.evict_to_budget(&Pin::Message { pos, batch });
        Appended::New {
            message,
            participants,
        }
    }

    fn create_thread(&mut self, new: &NewThread) -> Result<Created> {
        if new.has_nul() {
            return Ok(Created::Refused(Refusal::InvalidText));
        }
        if new.id.as_deref().is_some_and(is_numeric_id) {
            return Ok(Created::Refused(Refusal::NumericThreadId));
        }
        let users = match new.kind {
            ThreadKind::Group => group_users(new),
            ThreadKind::Direct => match direct_users(new) {
                Some(users) => users,
                None => return Ok(Created::Refused(Refusal::NotParticipant)),
            },
        };
        if let Some(id) = &new.id {
            if let Some(&nid) = self.by_text.get(&**id) {
                let t = &self.threads[&nid];
                let found = t.participant(&new.creator).is_some()
                    && match new.kind {
                        ThreadKind::Group => true,
                        ThreadKind::Direct => {
                            t.kind == ThreadKind::Direct
                                && t.is_pair(&users[0], users.last().expect("not empty"))
                        }
                    };
                return Ok(Created::Exists(if found {
                    Lookup::Found(self.view(t, &new.creator))
                } else {
                    Lookup::Forbidden
                }));
            }
        }
        let title = bounded_title(&new.title);
        let id: Arc<str> = match &new.id {
            Some(id) => id.clone(),
            None => loop {
                let id = uuid::Uuid::now_v7().hyphenated().to_string();
                if !self.by_text.contains_key(id.as_str()) {
                    break Arc::from(id);
                }
            },
        };
        let need = thread_bytes(&id, &title, users.len())
            + DEQUE_RESIDUE_BYTES
            + users.iter().map(|u| user_floor_bytes(u)).sum::<usize>();
        if need > self.budget {
            return Err(StoreError::Full);
        }
        let nid = self.insert_thread(id, new.kind, title, users, new.created_at_ms);
        self.evict_to_budget(&Pin::Thread(nid));
        Ok(Created::New(self.view(&self.threads[&nid], &new.creator)))
    }

    fn mark(&mut self, req: &MarkRequest) -> Lookup<Marked> {
        let refs = &req.messages[..req.messages.len().min(MARK_IDS_MAX)];
        let Inner {
            threads,
            by_text,
            by_server_id,
            log,
            ..
        } = self;
        let resolve = |r: &MessageRef| match r {
            MessageRef::ServerId(s) => by_server_id.get(s).map(|p| p & !PRODUCED),
            MessageRef::Number(n) => log.find_id(*n),
        };
        let nid = match &req.thread {
            Some(t) => match by_text.get(&**t) {
                Some(&nid) => nid,
                None => return Lookup::NotFound,
            },
            None => match refs.iter().find_map(resolve) {
                Some(pos) => log.at(pos).thread_numeric_id,
                None => return Lookup::NotFound,
            },
        };
        let t = threads.get_mut(&nid).expect("indexed threads are held");
        let Some(pi) = t.participant(&req.user) else {
            return Lookup::Forbidden;
        };
        let mut positions: Vec<u64> = Vec::with_capacity(refs.len());
        for r in refs {
            if let Some(pos) = resolve(r) {
                if log.at(pos).thread_numeric_id == nid && !positions.contains(&pos) {
                    positions.push(pos);
                }
            }
        }
        let Some(max_seq) = positions.iter().map(|&pos| log.at(pos).seq).max() else {
            return Lookup::NotFound;
        };
        let up_to_seq = match req.mark {
            Mark::Delivered => {
                let p = &mut t.participants[pi];
                p.delivered_seq = p.delivered_seq.max(max_seq);
                p.delivered_seq
            }
            Mark::Read => {
                let old = t.participants[pi].read_seq;
                if max_seq > old {
                    // The reader's own messages the mark passes are no longer after it.
                    let own = ((old + 1).max(t.first_seq)..=max_seq)
                        .filter(|q| {
                            let pos = t.held[(q - t.first_seq) as usize];
                            *log.at(pos).sender == *req.user
                        })
                        .count() as u64;
                    let p = &mut t.participants[pi];
                    p.own_after_read -= own;
                    p.read_seq = max_seq;
                }
                t.participants[pi].read_seq
            }
        };
        Lookup::Found(Marked {
            thread: t.id.clone(),
            thread_numeric_id: nid,
            up_to_seq,
            messages: positions.iter().map(|&pos| log.at(pos).clone()).collect(),
        })
    }

    fn add_notification(&mut self, n: &NewNotification) -> Result<Noted> {
        if n.has_nul() {
            return Ok(Noted::Refused(Refusal::InvalidText));
        }
        if let Some(k) = &n.source_key {
            if let Some(id) = self.notification_keys.get(&(n.user.clone(), k.clone())) {
                return Ok(Noted::Exists(self.notifications[id].clone()));
            }
        }
        let need = notification_bytes_of(&n.kind, &n.data_json, &n.source_key)
            + user_bytes(&n.user)
            + 2 * btree_leaf_bytes(size_of::<u64>(), 0);
        if need > self.budget {
            return Err(StoreError::Full);
        }
        let user = self.user_entry(&n.user);
        self.last_notification_id += 1;
        let id = self.last_notification_id;
        let stored = Notification {
            id,
            user: user.clone(),
            kind: n.kind.clone(),
            data_json: n.data_json.clone(),
            source_key: n.source_key.clone(),
            created_at_ms: n.created_at_ms,
            read: false,
        };
        self.notifications.insert(id, stored.clone());
        self.update_user(&user, |u| {
            u.notifications.insert(id);
            u.unread.insert(id);
        });
        if let Some(k) = &stored.source_key {
            self.notification_keys.insert((user, k.clone()), id);
        }
        self.bytes += notification_bytes(&stored);
        self.evict_to_budget(&Pin::Notification(id));
        Ok(Noted::New(stored))
    }

    fn notification_read(&mut self, user: &str, id: u64) -> Lookup<Notification> {
        let Some(n) = self.notifications.get_mut(&id) else {
            return Lookup::NotFound;
        };
        if *n.user != *user {
            return Lookup::NotFound;
        }
        let was_read = std::mem::replace(&mut n.read, true);
        let found = n.clone();
        if !was_read {
            self.read_notifications.insert(id);
            self.update_user(user, |u| u.unread.remove(&id));
        }
        Lookup::Found(found)
    }

    fn notifications_read_all(&mut self, user: &str) -> u64 {
        let Some(unread) = self.update_user(user, |u| std::mem::take(&mut u.unread)) else {
            return 0;
        };
        for id in &unread {
            if let Some(n) = self.notifications.get_mut(id) {
                n.read = true;
            }
            self.read_notifications.insert(*id);
        }
        unread.len() as u64
    }

    // ---- Eviction ----

    fn evict_to_budget(&mut self, pin: &Pin) {
        while self.bytes > self.budget {
            let freed = self.evict_message(pin)
                || self.evict_read_notification()
                || self.evict_notification(pin)
                || self.evict_thread(pin);
            if !freed {
                // Only the pinned items are left, which the size checks made sure fit: not
                // reached (the tests check `bytes_used() <= budget()` after every call).
                break;
            }
        }
    }

    fn evict_message(&mut self, pin: &Pin) -> bool {
        if self.log.len() == 0 {
            return false;
        }
        if let Pin::Message { pos, .. } = pin {
            if self.log.head == *pos {
                return false;
            }
        }
        let (pos, m) = self.log.pop_front().expect("not empty");
        let Inner {
            threads,
            users,
            bytes,
            empty_threads,
            by_server_id,
            dedup,
            ..
        } = self;
        let t = threads
            .get_mut(&m.thread_numeric_id)
            .expect("a held message's thread is held");
        *bytes -= pop_counted(&mut t.held, pos);
        t.first_seq += 1;
        if let Some(i) = t.participant(&m.sender) {
            let p = &mut t.participants[i];
            if m.seq > p.read_seq {
                p.own_after_read -= 1;
            }
        }
        for p in t.participants.iter() {
            let u = users.get_mut(&*p.user).expect("participants are users");
            *bytes -= pop_counted(&mut u.messages, pos);
            u.evicted_up_to = m.id;
        }
        if t.held.is_empty() {
            empty_threads.insert(t.key(), t.numeric_id);
        }
        *bytes -= message_bytes(&m);
        // Guarded: a later message with the same key would own the entry (never for
        // `(sender, clientMsgId)`, which is deduplicated; a `serverMsgId` is a fresh UUID).
        if let Entry::Occupied(e) = by_server_id.entry(m.server_msg_id) {
            if *e.get() & !PRODUCED == pos {
                e.remove();
            }
        }
        if let Some(c) = m.client_msg_id {
            if let Entry::Occupied(e) = dedup.entry((m.sender, c)) {
                if *e.get() == pos {
                    e.remove();
                }
            }
        }
        self.evicted_messages += 1;
        true
    }

    fn evict_read_notification(&mut self) -> bool {
        match self.read_notifications.first().copied() {
            Some(id) => {
                self.remove_notification(id);
                true
            }
            None => false,
        }
    }

    fn evict_notification(&mut self, pin: &Pin) -> bool {
        let Some(&id) = self.notifications.keys().next() else {
            return false;
        };
        if matches!(pin, Pin::Notification(p) if *p == id) {
            return false;
        }
        self.remove_notification(id);
        true
    }

    fn remove_notification(&mut self, id: u64) {
        let Some(n) = self.notifications.remove(&id) else {
            return;
        };
        self.read_notifications.remove(&id);
        self.update_user(&n.user, |u| {
            u.notifications.remove(&id);
            u.unread.remove(&id);
        });
        if let Some(k) = &n.source_key {
            self.notification_keys.remove(&(n.user.clone(), k.clone()));
        }
        self.bytes -= notification_bytes(&n);
        self.evicted_notifications += 1;
        self.forget_user_if_unused(&n.user);
    }

    fn evict_thread(&mut self, pin: &Pin) -> bool {
        let pinned = |t: &Thread| match pin {
            Pin::Thread(nid) => t.numeric_id == *nid,
            Pin::Message { batch, .. } => batch.iter().any(|m| *m.thread == *t.id),
            Pin::Notification(_) => false,
        };
        let victim = self
            .empty_threads
            .values()
            .find(|nid| !pinned(&self.threads[*nid]))
            .copied();
        let Some(nid) = victim else {
            return false;
        };
        let t = self.threads.remove(&nid).expect("indexed threads are held");
        debug_assert!(t.held.is_empty());
        self.by_text.remove(&*t.id);
        self.empty_threads.remove(&t.key());
        for p in t.participants.iter() {
            self.update_user(&p.user, |u| u.threads.remove(&t.key()));
        }
        self.bytes -= t.bytes() + deque_bytes(&t.held);
        for p in t.participants.iter() {
            self.forget_user_if_unused(&p.user);
        }
        self.evicted_threads += 1;
        true
    }

    // ---- Reads ----

    fn threads_page(&self, user: &str, before: Option<u64>, limit: usize) -> Page<ThreadView> {
        let limit = page_limit(limit);
        let Some(u) = self.users.get(user) else {
            return Page {
                items: Vec::new(),
                next: None,
            };
        };
        let mut it = u.threads.range(..before.unwrap_or(u64::MAX)).rev();
        let mut items = Vec::with_capacity(limit.min(u.threads.len()));
        let mut last_key = None;
        for (&key, nid) in it.by_ref().take(limit) {
            items.push(self.view(&self.threads[nid], user));
            last_key = Some(key);
        }
        let next = it.next().and(last_key);
        Page { items, next }
    }

    fn messages_page(
        &self,
        user: &str,
        r: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> Lookup<Page<Message>> {
        let limit = page_limit(limit) as u64;
        let Some(nid) = self.resolve_thread(r) else {
            return Lookup::NotFound;
        };
        let t = &self.threads[&nid];
        if t.participant(user).is_none() {
            return Lookup::Forbidden;
        }
        let top = match before {
            Some(b) => b.saturating_sub(1).min(t.last_seq),
            None => t.last_seq,
        };
        if t.held.is_empty() || top < t.first_seq {
            return Lookup::Found(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let bottom = (top + 1).saturating_sub(limit).max(t.first_seq);
        let items = (bottom..=top)
            .rev()
            .map(|q| self.log.at(t.held[(q - t.first_seq) as usize]).clone())
            .collect();
        Lookup::Found(Page {
            items,
            next: (bottom > t.first_seq).then_some(bottom),
        })
    }

    fn sync(&self, user: &str, since: Option<u64>, limit: usize) -> SyncPage {
        let limit = page_limit(limit);
        let Some(u) = self.users.get(user) else {
            return SyncPage {
                messages: Vec::new(),
                cursor: since.unwrap_or(0),
                more: false,
                truncated: false,
            };
        };
        let held = &u.messages;
        let (start, end, more) = match since {
            Some(s) => {
                let start = held.partition_point(|&pos| self.log.at(pos).id <= s);
                let end = (start + limit).min(held.len());
                (start, end, end < held.len())
            }
            None => (held.len().saturating_sub(limit), held.len(), false),
        };
        let messages: Vec<Message> = held
            .range(start..end)
            .map(|&pos| self.log.at(pos).clone())
            .collect();
        // Nothing newer: keep the cursor passed (or, for the latest page of a user whose
        // every message went, the newest evicted id, so the next call is not `truncated`).
        let cursor = messages
            .last()
            .map_or(since.unwrap_or(u.evicted_up_to), |m| m.id);
        SyncPage {
            messages,
            cursor,
            more,
            truncated: since.is_some_and(|s| s < u.evicted_up_to),
        }
    }

    fn notifications_page(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Page<Notification> {
        let limit = page_limit(limit);
        let Some(u) = self.users.get(user) else {
            return Page {
                items: Vec::new(),
                next: None,
            };
        };
        let set = if unread_only {
            &u.unread
        } else {
            &u.notifications
        };
        let mut it = set.range(..before.unwrap_or(u64::MAX)).rev();
        let items: Vec<Notification> = it
            .by_ref()
            .take(limit)
            .map(|id| self.notifications[id].clone())
            .collect();
        let next = match it.next() {
            Some(_) => items.last().map(|n| n.id),
            None => None,
        };
        Page { items, next }
    }

    // ---- The ledger's check ----

    #[cfg(test)]
    fn recount(&self) -> usize {
        let mut sum = 0;
        for pos in self.log.head..self.log.tail {
            sum += message_bytes(self.log.at(pos));
        }
        for t in self.threads.values() {
            sum += t.bytes() + deque_bytes(&t.held);
            assert_eq!(t.held.len() as u64, t.last_seq + 1 - t.first_seq);
            assert_eq!(t.held.is_empty(), self.empty_threads.contains_key(&t.key()));
            for p in t.participants.iter() {
                let u = &self.users[&p.user];
                assert_eq!(u.threads.get(&t.key()), Some(&t.numeric_id));
                let own = t
                    .held
                    .iter()
                    .filter(|&&pos| {
                        let m = self.log.at(pos);
                        m.seq > p.read_seq && m.sender == p.user
                    })
                    .count() as u64;
                assert_eq!(own, p.own_after_read, "own messages after the read mark");
            }
        }
        for (name, u) in &self.users {
            sum += user_bytes(name) + deque_bytes(&u.messages) + user_trees_bytes(u);
            let expect: usize = u
                .threads
                .values()
                .map(|nid| self.threads[nid].held.len())
                .sum();
            assert_eq!(u.messages.len(), expect, "{name}'s sync index");
            assert!(u
                .messages
                .iter()
                .zip(u.messages.iter().skip(1))
                .all(|(a, b)| a < b));
        }
        for n in self.notifications.values() {
            sum += notification_bytes(n);
        }
        sum
    }
}

impl Store for MemoryStore {
    fn memory_stats(&self) -> Option<MemoryStats> {
        Some(self.stats())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        self.inner.borrow_mut().append(batch)
    }

    async fn create_thread(&self, new: &NewThread) -> Result<Created> {
        self.inner.borrow_mut().create_thread(new)
    }

    async fn threads(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<ThreadView>> {
        Ok(self.inner.borrow().threads_page(user, before, limit))
    }

    async fn thread(&self, user: &str, thread: &ThreadRef) -> Result<Lookup<ThreadView>> {
        // No stored user has a NUL: found nowhere, as the PostgreSQL store answers.
        if has_nul(user) {
            return Ok(Lookup::NotFound);
        }
        let s = self.inner.borrow();
        Ok(match s.resolve_thread(thread) {
            None => Lookup::NotFound,
            Some(nid) => {
                let t = &s.threads[&nid];
                match t.participant(user) {
                    Some(_) => Lookup::Found(s.view(t, user)),
                    None => Lookup::Forbidden,
                }
            }
        })
    }

    async fn messages(
        &self,
        user: &str,
        thread: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Lookup<Page<Message>>> {
        if has_nul(user) {
            return Ok(Lookup::NotFound);
        }
        Ok(self
            .inner
            .borrow()
            .messages_page(user, thread, before, limit))
    }

    async fn mark(&self, req: &MarkRequest) -> Result<Lookup<Marked>> {
        if has_nul(&req.user) {
            return Ok(Lookup::NotFound);
        }
        Ok(self.inner.borrow_mut().mark(req))
    }

    async fn sync(&self, user: &str, since: Option<u64>, limit: usize) -> Result<SyncPage> {
        Ok(self.inner.borrow().sync(user, since, limit))
    }

    async fn store_notification(&self, n: &NewNotification) -> Result<Noted> {
        self.inner.borrow_mut().add_notification(n)
    }

    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        Ok(self
            .inner
            .borrow()
            .notifications_page(user, unread_only, before, limit))
    }

    async fn notification_read(&self, user: &str, id: u64) -> Result<Lookup<Notification>> {
        Ok(self.inner.borrow_mut().notification_read(user, id))
    }

    async fn notifications_read_all(&self, user: &str) -> Result<u64> {
        Ok(self.inner.borrow_mut().notifications_read_all(user))
    }

    async fn mark_produced(&self, ids: &[u64]) -> Result<()> {
        let mut i = self.inner.borrow_mut();
        let Inner {
            log, by_server_id, ..
        } = &mut *i;
        for &id in ids {
            if let Some(pos) = log.find_id(id) {
                if let Some(v) = by_server_id.get_mut(&log.at(pos).server_msg_id) {
                    *v |= PRODUCED;
                }
            }
        }
        Ok(())
    }

    async fn produced(&self, ids: &[u64]) -> Result<Vec<bool>> {
        let i = self.inner.borrow();
        Ok(ids
            .iter()
            .map(|&id| {
                i.log.find_id(id).is_some_and(|pos| {
                    i.by_server_id
                        .get(&i.log.at(pos).server_msg_id)
                        .is_some_and(|v| v & PRODUCED != 0)
                })
            })
            .collect())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::store::conformance::{self, dm};

    /// Run a store call to completion with one poll: the memory store never waits, and this
    /// checks it.
    fn now<F: Future>(f: F) -> F::Output {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the memory store never waits"),
        }
    }

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// A 36-byte id, like a UUID.
    fn id36(tag: &str, i: usize) -> String {
        format!("{tag:-<24}{i:012}")
    }

    fn held_ids(s: &MemoryStore) -> Vec<u64> {
        let i = s.inner.borrow();
        (i.log.head..i.log.tail).map(|p| i.log.at(p).id).collect()
    }

    fn check(s: &MemoryStore) {
        assert_eq!(
            s.recount(),
            s.bytes_used(),
            "the running total is the recount"
        );
    }

    #[test]
    fn conformance_on_a_current_thread_runtime() {
        let s = MemoryStore::new(STORE_MEMORY_BYTES_DEFAULT);
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
            .block_on(conformance::run_all(&s, "mem-"));
        check(&s);
        assert_eq!(s.evicted_messages(), 0);
        assert_eq!(s.kind(), "memory");
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_ledger_is_the_documented_one() {
        // The module doc's table (x86-64); update both together.
        assert_eq!(size_of::<Option<Message>>(), 160);
        assert_eq!(MESSAGE_FIXED_BYTES, 160 + 49);
        assert_eq!(DEDUP_ENTRY_BYTES, 61);
        assert_eq!(THREAD_FIXED_BYTES, 277);
        assert_eq!(PARTICIPANT_BYTES, 40);
        assert_eq!(btree_leaf_bytes(8, 8), 192);
        assert_eq!(btree_leaf_bytes(8, 0), 104);
        assert_eq!(btree_entry_bytes(8, 8), 35);
        assert_eq!(USER_FIXED_BYTES, 193);
        assert_eq!(NOTIFICATION_FIXED_BYTES, 201);
        assert_eq!(NOTIFICATION_KEY_BYTES, 61);
        // A DM: 100 bytes of content, a 36-byte clientMsgId, 24 B of deque slots.
        let dm_bytes = MESSAGE_FIXED_BYTES + 16 + 100 + 16 + 36 + DEDUP_ENTRY_BYTES + 3 * 8;
        assert_eq!(dm_bytes, 462);
    }

    #[test]
    fn accounting_is_strings_plus_the_fixed_overhead() {
        let s = MemoryStore::new(usize::MAX);
        let (al, bo, t) = (id36("al", 0), id36("bo", 0), id36("t", 0));
        let content = "x".repeat(100);
        const N: usize = 1000;
        for chunk in 0..N / 100 {
            let batch: Vec<NewMessage> = (0..100)
                .map(|i| dm(&t, &al, &bo, &id36("c", chunk * 100 + i), &content))
                .collect();
            now(s.append(&batch)).unwrap();
        }
        let deques = {
            let i = s.inner.borrow();
            let nid = i.by_text[t.as_str()];
            deque_bytes(&i.threads[&nid].held)
                + deque_bytes(&i.users[al.as_str()].messages)
                + deque_bytes(&i.users[bo.as_str()].messages)
        };
        let per_message = MESSAGE_FIXED_BYTES + (16 + 100) + (16 + 36) + DEDUP_ENTRY_BYTES;
        // Each user's activity index holds one thread: one B-tree leaf.
        let expect = 2 * (USER_FIXED_BYTES + 16 + 36 + btree_leaf_bytes(8, 8))
            + (THREAD_FIXED_BYTES + 16 + 36 + 2 * PARTICIPANT_BYTES)
            + N * per_message
            + deques;
        assert_eq!(s.bytes_used(), expect);
        check(&s);
        // The deques are three slots per message, within their doubling.
        assert!((3 * 8 * N..=2 * 3 * 8 * N).contains(&deques), "{deques}");
    }

    /// A store with room for about `n` DMs of 100 bytes in one thread.
    fn small(n: usize) -> MemoryStore {
        MemoryStore::new(2_000 + n * 500)
    }

    fn content() -> String {
        "x".repeat(100)
    }

    fn append1(s: &MemoryStore, m: NewMessage) -> Appended {
        let mut out = now(s.append(&[m])).unwrap();
        out.remove(0)
    }

    fn new_id(out: &Appended) -> u64 {
        match out {
            Appended::New { message, .. } => message.id,
            other => panic!("expected New, got {other:?}"),
        }
    }

    #[test]
    fn the_oldest_messages_go_first_with_their_dedup_keys() {
        let s = small(10);
        let mut ids = Vec::new();
        for i in 0..40 {
            let (t, peer) = if i % 3 == 0 {
                ("t-b", "cy")
            } else {
                ("t-a", "bo")
            };
            ids.push(new_id(&append1(
                &s,
                dm(t, "al", peer, &format!("c{i}"), &content()),
            )));
            check(&s);
            assert!(s.bytes_used() <= s.budget());
        }
        let held = held_ids(&s);
        assert!(s.evicted_messages() > 0);
        assert_eq!(s.evicted_messages() as usize + held.len(), 40);
        assert_eq!(held, ids[ids.len() - held.len()..], "a suffix: FIFO by id");
        // A held message's key still deduplicates; an evicted one's is gone.
        assert!(matches!(
            append1(&s, dm("t-a", "al", "bo", "c39", "again")),
            Appended::Duplicate(m) if m.id == ids[39]
        ));
        let again = append1(&s, dm("t-b", "al", "cy", "c0", "again"));
        assert!(new_id(&again) > ids[39], "stored again after its eviction");
        // The thread's pages end at its oldest held message.
        let page = now(s.messages("al", &ThreadRef::Id(a("t-a")), None, 200)).unwrap();
        let Lookup::Found(page) = page else {
            panic!("{page:?}")
        };
        assert_eq!(page.next, None);
        let last = page.items.last().unwrap();
        assert!(held.contains(&last.id));
        check(&s);
    }

    #[test]
    fn sync_says_truncated_when_it_missed_an_evicted_message() {
        let s = small(5);
        let ids: Vec<u64> = (0..20)
            .map(|i| {
                new_id(&append1(
                    &s,
                    dm("t", "bo", "al", &format!("c{i}"), &content()),
                ))
            })
            .collect();
        let held = held_ids(&s);
        let first_held = held[0];
        let newest_evicted = ids[ids.iter().position(|&i| i == first_held).unwrap() - 1];
        let p = now(s.sync("al", Some(0), 200)).unwrap();
        assert!(p.truncated);
        assert_eq!(p.messages[0].id, first_held);
        let p = now(s.sync("al", Some(newest_evicted - 1), 200)).unwrap();
        assert!(p.truncated, "missed the newest evicted one");
        let p = now(s.sync("al", Some(newest_evicted), 200)).unwrap();
        assert!(!p.truncated, "saw everything evicted");
        assert_eq!(p.messages.len(), held.len());
        let p = now(s.sync("al", None, 200)).unwrap();
        assert!(!p.truncated, "the latest page asks for no history");
        // A user none of whose messages went is never truncated.
        append1(&s, dm("t2", "cy", "dee", "x", "hi"));
        assert!(!now(s.sync("dee", Some(0), 10)).unwrap().truncated);
    }

    fn note(user: &str, i: u32) -> NewNotification {
        NewNotification {
            user: a(user),
            kind: a("jobs.posted"),
            data_json: Arc::from(format!(r#"{{"pad":"{}","n":{i}}}"#, "p".repeat(200))),
            source_key: Some(Arc::from(format!("k/{i}"))),
            created_at_ms: 1_700_000_000_000,
        }
    }

    fn note_ids(s: &MemoryStore, user: &str) -> Vec<u64> {
        let p = now(s.notifications(user, false, None, 200)).unwrap();
        p.items.iter().rev().map(|n| n.id).collect()
    }

    #[test]
    fn notifications_go_after_messages_read_ones_first() {
        let one = notification_bytes_of("jobs.posted", &note("me", 0).data_json, &Some(a("k/0")));
        let s = MemoryStore::new(4_000 + 6 * one);
        let m1 = new_id(&append1(&s, dm("t", "me", "bo", "m1", &content())));
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(now(s.add_notification(&note("me", i))).unwrap().0.id);
        }
        assert!(matches!(
            now(s.notification_read("me", ids[1])).unwrap(),
            Lookup::Found(n) if n.read
        ));
        let mut i = 3;
        while s.evicted_messages() == 0 {
            ids.push(now(s.add_notification(&note("me", i))).unwrap().0.id);
            i += 1;
            check(&s);
        }
        assert_eq!(s.evicted_notifications(), 0, "the message went first");
        assert!(!held_ids(&s).contains(&m1));
        assert_eq!(note_ids(&s, "me"), ids);
        // Next: the read one, although older ones are unread.
        while s.evicted_notifications() == 0 {
            ids.push(now(s.add_notification(&note("me", i))).unwrap().0.id);
            i += 1;
        }
        let left = note_ids(&s, "me");
        assert!(!left.contains(&ids[1]));
        assert!(left.contains(&ids[0]));
        // Then the oldest.
        while s.evicted_notifications() == 1 {
            now(s.add_notification(&note("me", i))).unwrap();
            i += 1;
        }
        let left = note_ids(&s, "me");
        assert!(!left.contains(&ids[0]));
        assert!(left.contains(&ids[2]));
        // An evicted notification's source key is free again.
        let (_, fresh) = now(s.add_notification(&note("me", 0))).unwrap();
        assert!(fresh);
        check(&s);
        assert!(s.bytes_used() <= s.budget());
        assert_eq!(s.evicted_threads(), 0);
    }

    fn group(id: &str, users: &[&str]) -> NewThread {
        NewThread {
            id: Some(a(id)),
            kind: ThreadKind::Group,
            creator: a(users[0]),
            participants: users[1..].iter().map(|u| a(u)).collect(),
            title: None,
            created_at_ms: 1_700_000_000_000,
        }
    }

    fn exists(s: &MemoryStore, user: &str, id: &str) -> bool {
        now(s.thread(user, &ThreadRef::Id(a(id)))).unwrap() != Lookup::NotFound
    }

    #[test]
    fn threads_go_last_least_recently_active_empty_first() {
        // Every thread below costs the same (5-byte ids, two users), so once the budget is
        // reached each new one evicts exactly one.
        let one = thread_bytes("g-001", &None, 2);
        let s = MemoryStore::new(3_000 + 8 * one);
        append1(&s, dm("dm-01", "al", "bo", "1", &content()));
        for g in ["g-001", "g-002"] {
            assert!(matches!(
                now(s.create_thread(&group(g, &["al", "cy"]))).unwrap(),
                Created::New(_)
            ));
        }
        // The DM thread is now the most recently active.
        append1(&s, dm("dm-01", "bo", "al", "2", "hi"));
        let mut order = Vec::new();
        let mut alive = vec!["g-001", "g-002", "dm-01"];
        let mut n = 0;
        while !alive.is_empty() {
            now(s.create_thread(&group(&format!("h-{n:03}"), &["zed", "yan"]))).unwrap();
            n += 1;
            check(&s);
            assert!(s.bytes_used() <= s.budget());
            let gone: Vec<&str> = alive
                .iter()
                .copied()
                .filter(|t| !exists(&s, "al", t) && !exists(&s, "cy", t))
                .collect();
            assert!(gone.len() <= 1, "one at a time: {gone:?}");
            if let Some(g) = gone.first() {
                assert_eq!(s.stats().messages, 0, "every message went before a thread");
                order.push(*g);
                alive.retain(|t| t != g);
                if *g == "g-002" {
                    assert!(
                        !s.inner.borrow().users.contains_key("cy"),
                        "cy has nothing left"
                    );
                }
            }
        }
        assert_eq!(
            order,
            ["g-001", "g-002", "dm-01"],
            "least recently active first"
        );
        assert!(!s.inner.borrow().users.contains_key("al"));
        assert_eq!(s.evicted_threads(), 3);
        assert!(exists(&s, "zed", "h-000"), "the newer ones are still there");
    }

    #[test]
    fn an_item_bigger_than_the_budget_is_full_and_nothing_is_stored() {
        let s = MemoryStore::new(2_000);
        let huge = "x".repeat(5_000);
        assert_eq!(
            now(s.append(&[dm("t", "al", "bo", "1", &huge)])),
            Err(StoreError::Full)
        );
        assert_eq!(s.bytes_used(), 0);
        // One small, one too big: neither is stored.
        let batch = [
            dm("t", "al", "bo", "1", "hi"),
            dm("t", "al", "bo", "2", &huge),
        ];
        assert_eq!(now(s.append(&batch)), Err(StoreError::Full));
        assert_eq!(
            s.stats(),
            MemoryStats {
                budget_bytes: 2_000,
                ..MemoryStats::default()
            }
        );
        let mut n = note("al", 1);
        n.data_json = Arc::from(huge.as_str());
        assert_eq!(now(s.add_notification(&n)), Err(StoreError::Full));
        let many: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
        let refs: Vec<&str> = many.iter().map(|u| u.as_str()).collect();
        assert_eq!(
            now(s.create_thread(&group("big", &refs))),
            Err(StoreError::Full)
        );
        assert_eq!(s.bytes_used(), 0);
        // What fits is stored.
        assert!(matches!(
            append1(&s, dm("t", "al", "bo", "1", "hi")),
            Appended::New { .. }
        ));
        check(&s);
    }

    #[test]
    fn a_batch_bigger_than_the_budget_evicts_its_own_oldest() {
        let s = small(5);
        let batch: Vec<NewMessage> = (0..30)
            .map(|i| dm("t", "al", "bo", &format!("c{i}"), &content()))
            .collect();
        let out = now(s.append(&batch)).unwrap();
        assert!(out.iter().all(|o| matches!(o, Appended::New { .. })));
        let ids: Vec<u64> = out.iter().map(new_id).collect();
        let held = held_ids(&s);
        assert!(held.len() < 30 && !held.is_empty());
        assert_eq!(held, ids[30 - held.len()..]);
        assert!(s.bytes_used() <= s.budget());
        check(&s);
    }

    #[test]
    fn unread_counts_stop_at_the_cap() {
        let s = MemoryStore::new(usize::MAX);
        let total = UNREAD_COUNT_MAX as usize + 5;
        let mut sent = 0;
        while sent < total {
            let batch: Vec<NewMessage> = (sent..total.min(sent + 1024))
                .map(|i| dm("t", "al", "bo", &format!("c{i}"), "m"))
                .collect();
            sent += batch.len();
            now(s.append(&batch)).unwrap();
        }
        let view = |u: &str| match now(s.thread(u, &ThreadRef::Id(a("t")))).unwrap() {
            Lookup::Found(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(view("bo").unread, UNREAD_COUNT_MAX);
        assert_eq!(view("al").unread, 0);
        assert_eq!(view("bo").last_seq, total as u64);
    }

    /// A small xorshift, so the mixed workload below is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn a_mixed_workload_under_a_small_budget_keeps_the_ledger_and_the_indexes() {
        let s = MemoryStore::new(60_000);
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
        now(s.create_thread(&group("grp", &["user-0", "user-1", "user-2", "user-3"]))).unwrap();
        let mut sent: Vec<Message> = Vec::new();
        for step in 0..3_000 {
            let (x, y) = (r.below(8) as usize, r.below(8) as usize);
            let (ux, uy) = (&users[x], &users[y]);
            match r.below(10) {
                0..=4 => {
                    let n = 1 + r.below(6) as usize;
                    let batch: Vec<NewMessage> = (0..n)
                        .map(|k| {
                            let (lo, hi) = if ux < uy { (ux, uy) } else { (uy, ux) };
                            let mut m = dm(
                                &format!("dm:{lo}:{hi}"),
                                ux,
                                uy,
                                &format!("c{step}-{k}"),
                                &"y".repeat(r.below(300) as usize),
                            );
                            if r.below(5) == 0 {
                                m.thread = a("grp");
                                m.to = None;
                            }
                            if r.below(7) == 0 {
                                m.client_msg_id = None;
                            }
                            m
                        })
                        .collect();
                    for o in now(s.append(&batch)).unwrap() {
                        if let Appended::New { message, .. } = o {
                            sent.push(message);
                        }
                    }
                }
                5 | 6 => {
                    if let Some(m) = sent.get(r.below(sent.len().max(1) as u64) as usize) {
                        let req = MarkRequest {
                            user: a(ux),
                            mark: if r.below(2) == 0 {
                                Mark::Read
                            } else {
                                Mark::Delivered
                            },
                            thread: None,
                            messages: vec![MessageRef::Number(m.id)],
                            at_ms: 0,
                        };
                        now(s.mark(&req)).unwrap();
                    }
                }
                7 => {
                    now(s.add_notification(&note(ux, step))).unwrap();
                }
                8 => {
                    if let Some(&id) = note_ids(&s, ux).first() {
                        now(s.notification_read(ux, id)).unwrap();
                    }
                }
                _ => {
                    let p = now(s.sync(ux, Some(r.below(step as u64 + 1)), 50)).unwrap();
                    assert!(p.messages.windows(2).all(|w| w[0].id < w[1].id));
                    let t = now(s.threads(ux, None, 3)).unwrap();
                    for v in &t.items {
                        assert!(v.unread <= v.last_seq);
                    }
                }
            }
            check(&s);
            assert!(s.bytes_used() <= s.budget(), "step {step}");
        }
        assert!(s.evicted_messages() > 0);
        // Every held message is still found by both its ids.
        let held = held_ids(&s);
        let i = s.inner.borrow();
        for &id in &held {
            let pos = i.log.find_id(id).unwrap();
            assert_eq!(
                i.by_server_id[&i.log.at(pos).server_msg_id] & !PRODUCED,
                pos
            );
        }
    }

    #[test]
    fn an_emptied_thread_gives_its_deque_back() {
        let s = small(3);
        append1(&s, dm("old", "al", "bo", "1", &content()));
        for i in 0..10 {
            append1(&s, dm("new", "cy", "dee", &format!("c{i}"), &content()));
        }
        let i = s.inner.borrow();
        let nid = i.by_text["old"];
        assert_eq!(i.threads[&nid].held.capacity(), 0);
        assert_eq!(i.users["al"].messages.capacity(), 0);
    }

    #[test]
    fn a_group_keeps_its_bounds_whatever_it_is_handed() {
        let s = MemoryStore::new(STORE_MEMORY_BYTES_DEFAULT);
        let mut others: Vec<Arc<str>> = (0..THREAD_PARTICIPANTS_MAX + 10)
            .map(|i| Arc::from(format!("u{i:04}")))
            .collect();
        others.reverse();
        let new = NewThread {
            id: None,
            kind: ThreadKind::Group,
            creator: a("zz-creator"),
            participants: others,
            title: Some(Arc::from("é".repeat(THREAD_TITLE_BYTES_MAX))),
            created_at_ms: 0,
        };
        let Created::New(v) = now(s.create_thread(&new)).unwrap() else {
            panic!("a new thread");
        };
        assert_eq!(v.participants.len(), THREAD_PARTICIPANTS_MAX);
        assert!(v.participants.contains(&a("zz-creator")));
        assert_eq!(&*v.participants[0], "u0000", "the first others by id");
        let title = v.title.unwrap();
        assert_eq!(title.len(), THREAD_TITLE_BYTES_MAX);
        assert!(title.chars().all(|c| c == 'é'));
        check(&s);
    }
}
