//! The message store: threads, messages, per-user read state and notifications, behind one
//! interface with two implementations ([`memory::MemoryStore`], the embedded default, bounded
//! by a byte budget and forgotten on restart; `pg::PgStore`, PostgreSQL, when `database_url`
//! is set).
//!
//! Only the bridge thread calls a store (shards never wait on one): it batches the DMs the
//! shards hand it into one [`Store::append`] call, answers `sync` and the REST API from the
//! read methods, and turns the results into frames and HTTP responses.
//!
//! What every implementation guarantees (checked by the shared test body in [`conformance`],
//! run against both):
//! - **Ids.** Every message and every thread has a numeric id from one store-wide sequence
//!   (shared by all nodes using the store), assigned in commit order, so a message's `id` is
//!   also the user's sync `cursor`: a reader that has seen id N will never later see a
//!   committed message with a smaller id. Within a thread `seq` counts 1, 2, 3, ... with no
//!   gaps. Notification ids come from their own increasing sequence.
//! - **Idempotency.** `(sender, client_msg_id)` is unique: appending it again returns
//!   [`Appended::Duplicate`] with the message as first stored (its ids, its time), in the same
//!   batch or any later one, for as long as the store holds the message (PostgreSQL: forever).
//! - **Threads.** A DM (`to` set) creates its thread on first use, a [`ThreadKind::Direct`]
//!   one with the two users as participants; a later DM goes only into a `direct` thread whose
//!   participants are exactly `{sender, to}` (`{sender}` for a DM to yourself), anything else
//!   (a group thread, another pair's thread) is [`Refusal::NotParticipant`]: nobody can make a
//!   thread that another pair's DMs land in. A message without `to` goes to an existing thread
//!   the sender takes part in. No thread is ever created with an all-digit text id (numeric
//!   ids are the store's, see [`ThreadRef`]).
//! - **Text.** No stored text holds U+0000 (PostgreSQL text cannot): an entry, thread or
//!   notification with a NUL in any of its texts is refused with [`Refusal::InvalidText`],
//!   before anything is written, and never fails the rest of its batch; reads naming a user or
//!   thread with a NUL find nothing.
//! - **Atomic batches.** An `Err` from [`Store::append`] means nothing of the batch is stored;
//!   `Ok` means every `New` and `Duplicate` entry is durable (as durable as the store is).
//! - **Bounds.** Every list is bounded by the `limit` the caller passes, itself at most
//!   [`PAGE_LIMIT_MAX`].

pub mod conformance;
pub mod memory;
pub mod pg;
pub mod reconnect;

use std::sync::Arc;

/// Most entries one list call returns (threads, messages, notifications, a `sync` page).
pub const PAGE_LIMIT_MAX: usize = 200;

/// Most participants of one thread (a group thread created over REST).
pub const THREAD_PARTICIPANTS_MAX: usize = 256;

/// Longest thread title, in bytes.
pub const THREAD_TITLE_BYTES_MAX: usize = 256;

/// Unread counts stop here (a thread with more shows this number); keeps the count query
/// bounded in both stores.
pub const UNREAD_COUNT_MAX: u64 = 10_000;

/// Most messages one `append` batch carries (the bridge's commit batch).
pub const APPEND_BATCH_MAX: usize = 1024;

/// Most message ids one `mark.read` / `mark.delivered` names.
pub const MARK_IDS_MAX: usize = 100;

/// A message to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// Assigned by the shard that accepted it (UUID v7): the id `message.ack` gives the sender
    /// and every device sees as `serverMsgId`.
    pub server_msg_id: u128,
    /// The `eventId` of its `message.create` (UUID v7).
    pub event_id: u128,
    /// The thread's text id (`conversationId`).
    pub thread: Arc<str>,
    pub sender: Arc<str>,
    /// The peer of a DM (creates the thread `{sender, to}` if it does not exist); `None` for a
    /// message into an existing thread (every participant gets it).
    pub to: Option<Arc<str>>,
    /// The sender's idempotency key (`clientMsgId`); the REST API may omit it.
    pub client_msg_id: Option<Arc<str>>,
    pub content: Arc<str>,
    pub attachment_url: Option<Arc<str>>,
    /// Unix milliseconds.
    pub sent_at_ms: u64,
}

/// A stored message, as every reader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Numeric id and sync cursor (see the module doc).
    pub id: u64,
    /// Position in its thread, from 1, no gaps.
    pub seq: u64,
    pub thread: Arc<str>,
    pub thread_numeric_id: u64,
    pub server_msg_id: u128,
    pub event_id: u128,
    pub sender: Arc<str>,
    /// The DM's recipient as sent (`None` for a message into a group thread).
    pub to: Option<Arc<str>>,
    pub client_msg_id: Option<Arc<str>>,
    pub content: Arc<str>,
    pub attachment_url: Option<Arc<str>>,
    pub sent_at_ms: u64,
}

/// The outcome of one entry of an [`Store::append`] batch, in batch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored now. `participants` are the thread's users (sender included), who get it live.
    New {
        message: Message,
        participants: Vec<Arc<str>>,
    },
    /// `(sender, client_msg_id)` was stored before: the first copy, not stored again.
    Duplicate(Message),
    /// Not stored, and retrying will not help.
    Refused(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The thread exists and the sender (or, for a DM, `to`) is not one of its participants.
    NotParticipant,
    /// No `to` and no such thread.
    UnknownThread,
    /// A text of the entry (thread id, sender, `to`, `clientMsgId`, content, attachment URL;
    /// for a thread or notification, any of its texts) holds U+0000, which the store cannot
    /// hold (the client must remove it).
    InvalidText,
    /// A new thread's text id is all ASCII digits: numeric ids are the store's (a path
    /// segment of digits names a thread by number once no text id matches it).
    NumericThreadId,
}

impl Refusal {
    /// The error text clients get (PROTOCOL.md).
    pub fn text(self) -> &'static str {
        match self {
            Refusal::NotParticipant => "not a participant of this conversation",
            Refusal::UnknownThread => "conversation not found",
            Refusal::InvalidText => "text must not contain NUL characters",
            Refusal::NumericThreadId => "conversation id must not be all digits",
        }
    }
}

/// Whether `s` holds U+0000 (which no store text may: see the module doc).
pub fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

fn opt_has_nul(s: &Option<Arc<str>>) -> bool {
    s.as_deref().is_some_and(has_nul)
}

/// Whether `id` is all ASCII digits (and not empty): an id no new thread may have.
pub fn is_numeric_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
}

impl NewMessage {
    /// Whether any of its texts holds U+0000 ([`Refusal::InvalidText`]).
    pub fn has_nul(&self) -> bool {
        has_nul(&self.thread)
            || has_nul(&self.sender)
            || has_nul(&self.content)
            || opt_has_nul(&self.to)
            || opt_has_nul(&self.client_msg_id)
            || opt_has_nul(&self.attachment_url)
    }
}

impl NewThread {
    /// Whether any of its texts holds U+0000 ([`Refusal::InvalidText`]).
    pub fn has_nul(&self) -> bool {
        opt_has_nul(&self.id)
            || has_nul(&self.creator)
            || opt_has_nul(&self.title)
            || self.participants.iter().any(|p| has_nul(p))
    }
}

impl NewNotification {
    /// Whether any of its texts holds U+0000 ([`Refusal::InvalidText`]).
    pub fn has_nul(&self) -> bool {
        has_nul(&self.user)
            || has_nul(&self.kind)
            || has_nul(&self.data_json)
            || opt_has_nul(&self.source_key)
    }
}

/// Why a store call failed: the caller answers "retry later" and acks nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot be reached or refused the statement (text for the log).
    Unavailable(String),
    /// The call did not finish within the configured statement timeout.
    Timeout,
    /// The in-memory store's byte budget cannot hold what was asked even after evicting
    /// (a thread or a notification bigger than the whole budget, in practice never).
    Full,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(e) => write!(f, "message store unavailable: {e}"),
            StoreError::Timeout => f.write_str("message store timed out"),
            StoreError::Full => f.write_str("message store full"),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The answer to a read or update of something a user may or may not see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// Does not exist (HTTP 404).
    NotFound,
    /// Exists, and the user does not take part in it (HTTP 403).
    Forbidden,
}

impl<T> Lookup<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Lookup<U> {
        match self {
            Lookup::Found(t) => Lookup::Found(f(t)),
            Lookup::NotFound => Lookup::NotFound,
            Lookup::Forbidden => Lookup::Forbidden,
        }
    }
}

/// How a thread is named in a request: its text id, or its numeric id. A path segment is
/// tried as text first, then as a number. No thread is created with an all-digit text id any
/// more (the REST API, the socket and both stores refuse one), so for digits the text lookup
/// only finds a thread stored before that rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThreadRef {
    Id(Arc<str>),
    /// Text id first, then this number if no thread has that text id.
    IdOrNumber(Arc<str>, u64),
}

impl ThreadRef {
    pub fn parse(s: &str) -> ThreadRef {
        match s.parse::<u64>() {
            Ok(n) => ThreadRef::IdOrNumber(Arc::from(s), n),
            Err(_) => ThreadRef::Id(Arc::from(s)),
        }
    }
}

/// How a message is named: its `serverMsgId` (a UUID) or its numeric id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageRef {
    ServerId(u128),
    Number(u64),
}

impl MessageRef {
    /// A UUID (any case, with or without hyphens) or a decimal number.
    pub fn parse(s: &str) -> Option<MessageRef> {
        if let Ok(n) = s.parse::<u64>() {
            return Some(MessageRef::Number(n));
        }
        uuid::Uuid::try_parse(s)
            .ok()
            .map(|u| MessageRef::ServerId(u.as_u128()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Two users, created by their first DM.
    Direct,
    /// Created over REST, up to [`THREAD_PARTICIPANTS_MAX`] users.
    Group,
}

impl ThreadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Direct => "direct",
            ThreadKind::Group => "group",
        }
    }
}

/// A thread to create over REST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewThread {
    /// The text id to give it (`None`: the store makes one, a UUID v7). Never all digits
    /// ([`Refusal::NumericThreadId`]).
    pub id: Option<Arc<str>>,
    /// [`ThreadKind::Group`], or [`ThreadKind::Direct`]: the pair's conversation, the same
    /// thread a first DM between them makes (the creator and at most one other user, and the
    /// caller gives the pair's conversation id as `id`). When a thread with the id exists, a
    /// direct create finds it only if it is the pair's `direct` thread
    /// ([`Created::Exists`] `Forbidden` otherwise).
    pub kind: ThreadKind,
    pub creator: Arc<str>,
    /// The other users (the creator is always a participant; duplicates are ignored). For a
    /// direct thread at most one ([`Refusal::NotParticipant`] otherwise).
    pub participants: Vec<Arc<str>>,
    pub title: Option<Arc<str>>,
    pub created_at_ms: u64,
}

/// A thread as one user sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadView {
    pub id: Arc<str>,
    pub numeric_id: u64,
    pub kind: ThreadKind,
    pub title: Option<Arc<str>>,
    /// Sorted by user id.
    pub participants: Vec<Arc<str>>,
    pub created_at_ms: u64,
    /// `seq` of its newest message (0: none yet).
    pub last_seq: u64,
    /// Its newest message, if the store still holds it.
    pub last_message: Option<Message>,
    /// The viewer's read state: the highest `seq` they have read (0: none).
    pub read_seq: u64,
    /// Messages after `read_seq` from other users, at most [`UNREAD_COUNT_MAX`].
    pub unread: u64,
}

/// Creating a thread over REST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    New(ThreadView),
    /// A thread with the asked id exists: it is returned if the creator takes part in it
    /// (idempotent create) and, for a direct create, it is the pair's `direct` thread; else
    /// [`Lookup::Forbidden`] is the caller's answer.
    Exists(Lookup<ThreadView>),
    /// Not created, and asking again will not help ([`Refusal::InvalidText`],
    /// [`Refusal::NumericThreadId`], or [`Refusal::NotParticipant`] for a direct thread of
    /// more than two users): a client error (HTTP 400), not a store failure.
    Refused(Refusal),
}

/// Storing a notification ([`Store::store_notification`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Noted {
    /// Stored now (deliver it).
    New(Notification),
    /// The same `(user, source_key)` was stored before: the first one, not stored again.
    Exists(Notification),
    /// Not stored ([`Refusal::InvalidText`]): a client error (HTTP 400), not a store failure.
    Refused(Refusal),
}

/// One page of a listing. `next` is the value to pass as `before` for the page after this
/// one (`None`: this was the last page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// Which receipt a mark records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Delivered,
    Read,
}

/// A read or delivered receipt to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkRequest {
    pub user: Arc<str>,
    pub mark: Mark,
    /// The thread the ids must belong to (`None`: take it from the first id that exists, as
    /// `PUT /api/v1/messages/:id/read` does).
    pub thread: Option<Arc<str>>,
    /// At most [`MARK_IDS_MAX`]; ids that do not exist or are in another thread are ignored.
    pub messages: Vec<MessageRef>,
    pub at_ms: u64,
}

/// What a mark changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marked {
    pub thread: Arc<str>,
    pub thread_numeric_id: u64,
    /// The marker's state for the thread after the mark: it only moves forward.
    pub up_to_seq: u64,
    /// The named messages that exist in the thread (their senders get the receipt live).
    pub messages: Vec<Message>,
}

/// A notification to store (and then deliver).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNotification {
    pub user: Arc<str>,
    pub kind: Arc<str>,
    /// The `data` object's JSON text (already validated as a JSON object).
    pub data_json: Arc<str>,
    /// Idempotency key from the source (Kafka `topic/partition/offset`, or an API caller's
    /// id): storing the same key for the same user again returns the first notification.
    pub source_key: Option<Arc<str>>,
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Numeric id, increasing per store.
    pub id: u64,
    pub user: Arc<str>,
    pub kind: Arc<str>,
    pub data_json: Arc<str>,
    pub source_key: Option<Arc<str>>,
    pub created_at_ms: u64,
    pub read: bool,
}

/// [`Store::co_participants`]: the users, and whether some were left out (past `limit`, or
/// threads past `threads_max`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoParticipants {
    pub users: Vec<Arc<str>>,
    pub truncated: bool,
}

/// One `sync` page: the user's messages after the cursor, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPage {
    pub messages: Vec<Message>,
    /// The cursor to pass next time: the id of the last message returned, or the `since` that
    /// was passed when nothing was newer.
    pub cursor: u64,
    /// More messages follow: call again with `cursor`.
    pub more: bool,
    /// The in-memory store evicted messages the user had not synced yet (`since` is older than
    /// the oldest message it still holds for them): the client missed some for good.
    pub truncated: bool,
}

/// The message store. Implementations are used from the bridge thread's single-threaded
/// runtime: futures need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// `"memory"` or `"postgres"` (logged at start, reported by `/ready` and `/api/stats`).
    fn kind(&self) -> &'static str;

    /// Store a batch of messages atomically (see the module doc); one outcome per entry, in
    /// order.
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>>;

    /// Create a thread over REST.
    async fn create_thread(&self, new: &NewThread) -> Result<Created>;

    /// The user's threads, most recently active first (by the id of their last message, then
    /// by creation for threads without messages). `before`: the `next` of the previous page.
    /// `PgStore` considers only the user's newest `pg::THREADS_PER_READ_MAX` threads (by
    /// numeric id) here and in [`Store::sync`].
    async fn threads(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<ThreadView>>;

    /// One thread as `user` sees it.
    async fn thread(&self, user: &str, thread: &ThreadRef) -> Result<Lookup<ThreadView>>;

    /// A thread's messages, newest first; `before`: a `seq` (the `next` of the previous page).
    async fn messages(
        &self,
        user: &str,
        thread: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Lookup<Page<Message>>>;

    /// Record a read or delivered receipt. `NotFound` when no named message exists (or the
    /// thread does not), `Forbidden` when the user does not take part in the thread.
    async fn mark(&self, req: &MarkRequest) -> Result<Lookup<Marked>>;

    /// The user's messages (in every thread they take part in, their own included) with
    /// `id > since`, oldest first; without `since`, the newest `limit` of them, oldest first.
    async fn sync(&self, user: &str, since: Option<u64>, limit: usize) -> Result<SyncPage>;

    /// Store a notification; the same `(user, source_key)` again returns the first one
    /// ([`Noted::Exists`]); a NUL in any of its texts is [`Noted::Refused`].
    async fn store_notification(&self, n: &NewNotification) -> Result<Noted>;

    /// [`Store::store_notification`] as `(notification, new)`, for callers that have already
    /// checked the texts (tests): a refusal comes back as [`StoreError::Unavailable`] with the
    /// refusal's text. The bridge calls `store_notification` and answers a refusal with 400.
    async fn add_notification(&self, n: &NewNotification) -> Result<(Notification, bool)> {
        match self.store_notification(n).await? {
            Noted::New(stored) => Ok((stored, true)),
            Noted::Exists(stored) => Ok((stored, false)),
            Noted::Refused(r) => Err(StoreError::Unavailable(r.text().into())),
        }
    }

    /// The user's notifications, newest first; `before`: a notification id.
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Notification>>;

    /// Mark one notification read (`NotFound` also for another user's notification: ids are
    /// not secrets, but a user learns nothing about others').
    async fn notification_read(&self, user: &str, id: u64) -> Result<Lookup<Notification>>;

    /// Mark all the user's notifications read; returns how many changed.
    async fn notifications_read_all(&self, user: &str) -> Result<u64>;

    /// Record that these messages (by id) are in the Kafka topic of direct messages, so that a
    /// retry of one of them ([`Appended::Duplicate`]) is acked without producing it again.
    /// Ids of messages no longer held are ignored.
    async fn mark_produced(&self, ids: &[u64]) -> Result<()>;

    /// For each id, whether [`Store::mark_produced`] recorded it (false for an id not held).
    async fn produced(&self, ids: &[u64]) -> Result<Vec<bool>>;

    /// The users who share a thread with `user` (never `user`), each once, most recently
    /// active shared thread first (then by user id), at most `limit`; considering at most
    /// `threads_max` of the user's threads (this default: the most recently active ones, read
    /// with [`Store::threads`]; `PgStore`: the newest by numeric id, in one query).
    async fn co_participants(
        &self,
        user: &str,
        threads_max: usize,
        limit: usize,
    ) -> Result<CoParticipants> {
        let mut seen = std::collections::HashSet::new();
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut before = None;
        let mut threads = 0usize;
        loop {
            let page = self.threads(user, before, PAGE_LIMIT_MAX).await?;
            let room = threads_max.saturating_sub(threads);
            let cut = page.items.len() > room;
            for t in page.items.iter().take(room) {
                threads += 1;
                for p in &t.participants {
                    if **p != *user && seen.insert(p.clone()) {
                        users.push(p.clone());
                    }
                }
            }
            if users.len() > limit {
                users.truncate(limit);
                return Ok(CoParticipants {
                    users,
                    truncated: true,
                });
            }
            match page.next {
                _ if cut => {
                    return Ok(CoParticipants {
                        users,
                        truncated: true,
                    })
                }
                Some(n) if threads < threads_max => before = Some(n),
                Some(_) => {
                    return Ok(CoParticipants {
                        users,
                        truncated: true,
                    })
                }
                None => {
                    return Ok(CoParticipants {
                        users,
                        truncated: false,
                    })
                }
            }
        }
    }

    /// A cheap round trip (PostgreSQL: `SELECT 1`), for `/ready` and reconnects.
    async fn ping(&self) -> Result<()>;

    /// The in-memory store's occupancy, for `/metrics` (read once per health check).
    fn memory_stats(&self) -> Option<memory::MemoryStats> {
        None
    }
}

/// The sort key of a thread in [`Store::threads`] (most recent activity first), which `before`
/// values name: the id of its newest message, or its own numeric id while it has none. Thread
/// numeric ids and message ids come from the same sequence, so the key orders creation and
/// messages as they happened.
pub fn activity_key(last_message_id: Option<u64>, numeric_id: u64) -> u64 {
    last_message_id.unwrap_or(numeric_id)
}
