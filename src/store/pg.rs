//! The PostgreSQL message store: [`PgStore`], the [`Store`] used when `database_url` is set.
//!
//! Owns: the connection pool (deadpool over tokio-postgres, every timeout set from
//! [`PgConfig`]), the schema migrations (`src/store/migrations/NNNN_name.sql`, applied at
//! [`PgStore::connect`]), and the SQL of every store call. It runs only on the bridge thread's
//! tokio runtime (its futures are not `Send`-bound by the trait; the pool's connection tasks are
//! spawned on that runtime); shards never see it. It must not log per message: errors go back
//! to the caller as [`StoreError`] values, and only start-up (migrations) logs.
//!
//! How the guarantees of [`crate::store`] are kept:
//! - **Ids in commit order.** Message ids and thread numeric ids come from one row,
//!   `switchboard_counters('ids')`. Every transaction that takes ids first locks that row
//!   (`SELECT ... FOR NO KEY UPDATE`) and holds the lock until it commits, so writers, on every
//!   connection of every node, take turns: a writer reads the counter only after the previous
//!   one committed (PostgreSQL releases a transaction's row locks after its commit is visible),
//!   hence a reader that sees id N can never later see a smaller id appear. A SEQUENCE would not
//!   do: `nextval` is not transactional, so a transaction holding a smaller id may commit later.
//!   Isolation is READ COMMITTED: every statement after the lock takes a fresh snapshot, which
//!   includes everything the previous holder committed (REPEATABLE READ would instead fail with
//!   serialization errors on the counter row). Per-thread seqs are assigned under the same lock,
//!   from the thread's newest stored seq, so they have no gaps; `UNIQUE (thread_nid, seq)`
//!   makes any mistake an error instead of a fork.
//! - **Batched appends.** One [`Store::append`] is two round trips whatever its size, both
//!   pipelined: `BEGIN`, the counter lock and the batch's threads (numeric id, newest seq,
//!   participants); then one statement of data-modifying CTEs over `unnest` arrays (new DM
//!   threads, their participants, the messages, the counter) and `COMMIT`. In between the batch
//!   is resolved in order in Rust (`resolve`): dedup within the batch, DM thread creation,
//!   participant checks, seqs; refused entries take no id and no seq. The append only inserts:
//!   a thread's newest message and seq are read from the messages index, never kept in a row
//!   that every append would update. Dedup against stored rows is optimistic: the write's unique
//!   keys `(sender, client_msg_id)` and `server_msg_id` catch a message stored before (a client's
//!   retry), and only then does the append run again, in a new transaction that also reads the
//!   stored copies ([`PgStore::append_retries`] counts it). The threads of the previous batches
//!   are remembered (`ThreadCache`), checked against the counter, so a steady stream of DMs
//!   looks up only new threads. The counter lock is held for one round trip plus the commit.
//! - **Data the server refuses.** PostgreSQL text cannot hold U+0000: every entry, thread and
//!   notification with a NUL is refused in Rust before any SQL ([`Refusal::InvalidText`]), and
//!   a read naming one finds nothing without a query, so one bad DM can never fail the batch
//!   it shares with other senders. Should the server still refuse a batch's data (SQLSTATE
//!   class 22), the append runs once more in a new transaction, entry by entry, each under a
//!   savepoint (one round trip per entry, under the counter lock, bounded by the call's
//!   deadline): the entries it refuses are `InvalidText` and take no id and no seq, the others
//!   commit together, so the batch stays atomic. At most one such split per call.
//! - **DMs only into their pair's thread.** An entry with `to` goes only into a `direct`
//!   thread whose participants are exactly its sender and recipient (`kind` is read with the
//!   batch's threads and kept in the cache); no thread is created with an all-digit id.
//! - **Bounded reads.** Every list stops at `limit` + 1 rows (the extra row says whether a next
//!   page exists) and every query runs on an index; unread counts stop at [`UNREAD_COUNT_MAX`]
//!   (a count over a LIMITed subquery). The price of the insert-only append is paid here: a
//!   user's thread list and `sync` probe each thread the user takes part in (one index probe for
//!   its newest message id, sorted or merged), about 2 ms for a user in 200 threads of a store
//!   of 20,000 threads and 400,000 messages; a thread page is one index range scan (0.15 ms).
//!   A call considers at most [`THREADS_PER_READ_MAX`] (10,000) of the user's threads, their
//!   newest by numeric id, taken from the participants index with a LIMIT: a user in more
//!   threads does not see the older ones in the list or in `sync`.
//! - **Faults.** Every call has a deadline ([`PgConfig::call_timeout`]) over the pool wait and
//!   all its round trips, on top of the server's `statement_timeout`; a call that fails inside
//!   a transaction rolls it back before its connection returns to the pool, and a connection
//!   whose call timed out or was cancelled (the caller dropped the future) is closed instead of
//!   reused, so the server rolls back whatever it held. Pool, connect and server errors become
//!   [`StoreError::Unavailable`], the server's statement timeout (SQLSTATE 57014) and the pool
//!   wait timeout become [`StoreError::Timeout`]; nothing here panics on a database answer.
//!
//! Measured (`bench_append_vs_bare_insert` in tests/store_pg.rs: 2-core VM, PostgreSQL 15 with
//! fsync on, DMs over 1024 existing threads, one batch in flight, three runs): appends of 64,
//! 256 and 1024 messages reach 82, 84-94 and 86-92 % of the messages per second of a bare
//! batched INSERT of the same rows into the same table (32k, 39k and 45k against 39k, 44k and
//! 48k msg/s at best); a batch of one, two round trips against one, 55 %. Before the thread
//! cache and the insert-only schema the large batches reached 25 %.
//!
//! Durability is the server's: an `Ok` from `append` means PostgreSQL answered `COMMIT`, which is
//! on disk (or on a synchronous standby) as the server's `synchronous_commit` says. A connection
//! lost during `COMMIT` leaves the outcome unknown; the caller reports an error, and the client's
//! retry with the same `clientMsgId` is answered with the stored copy if the commit happened.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, QueueMode, RecyclingMethod, Runtime, Status,
    TimeoutType,
};
use tokio::time::{timeout_at, Instant};
use tokio_postgres::config::{ChannelBinding, LoadBalanceHosts, SslMode, TargetSessionAttrs};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{NoTls, Row, Statement};

use super::{
    has_nul, is_numeric_id, Appended, Created, Lookup, Mark, MarkRequest, Marked, Message,
    MessageRef, NewMessage, NewNotification, NewThread, Noted, Notification, Page, Refusal, Result,
    Store, StoreError, SyncPage, ThreadKind, ThreadRef, ThreadView, APPEND_BATCH_MAX, MARK_IDS_MAX,
    PAGE_LIMIT_MAX, THREAD_PARTICIPANTS_MAX, THREAD_TITLE_BYTES_MAX, UNREAD_COUNT_MAX,
};

/// Connections in the pool. The bridge runs one append at a time (group commit) next to a few
/// REST reads and receipts; more connections would only queue on the counter lock.
pub const POOL_SIZE_DEFAULT: usize = 8;
/// TCP connect plus the PostgreSQL start-up exchange, per connection attempt.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Waiting for a free pooled connection when all are busy.
pub const POOL_WAIT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Checking a pooled connection before reuse (no round trip: it only asks whether it closed).
pub const POOL_RECYCLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);
/// The server aborts any one statement after this (waiting for the id counter lock included).
pub const STATEMENT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// The server ends a session that sits idle inside a transaction this long: a node that froze
/// between an append's two round trips cannot hold the id counter lock for longer.
pub const IDLE_IN_TRANSACTION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// The whole of one store call on the client side: pool wait and every round trip. It covers
/// what the server cannot (a silent network, a stopped server that never answers). Must be
/// longer than the statement timeout (checked at start).
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// The schema migrations at start (they may build indexes on large tables), including the wait
/// for another node that is migrating the same database.
pub const MIGRATION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(300);
/// TCP keepalive: idle time before the first probe, time between probes, probes before the
/// connection counts as dead.
pub const KEEPALIVE_IDLE_DEFAULT: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL_DEFAULT: Duration = Duration::from_secs(10);
pub const KEEPALIVE_RETRIES_DEFAULT: u32 = 3;
/// Sent data left unacknowledged by the peer this long closes the connection (TCP_USER_TIMEOUT).
pub const TCP_USER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Shown in `pg_stat_activity`.
pub const APPLICATION_NAME_DEFAULT: &str = "switchboard";

/// Most threads of one user one thread list or `sync` call considers: the user's newest by
/// numeric id (the order they were created in, and the user added: participants join a thread
/// only when it is made), read from the participants index with a LIMIT. Each costs one index
/// probe (its newest message id: no activity column is kept, so that appends only insert), so
/// this bounds the call at 10,000 probes, about 100 ms at the 10 us per probe measured
/// (see the module doc). A user in more threads does not
/// see their older ones in the thread list or in `sync` (they stay readable by id); the
/// in-memory store has no such bound (its per-user activity index makes a page cheap).
pub const THREADS_PER_READ_MAX: usize = 10_000;

/// Threads `ThreadCache` remembers (cleared when full: it is only a guess that saves lookups).
pub const THREAD_CACHE_ENTRIES_MAX: usize = 65_536;

/// After a failed call, the budget of the `ROLLBACK` that cleans its connection for reuse
/// (used when the call's own deadline has already passed); past it the connection is closed.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(1);

/// `pg_advisory_lock` key held while migrating ("SWBD" "MIGR"), so nodes starting together
/// take turns and the second one finds the schema done.
const MIGRATION_LOCK_KEY: i64 = 0x5357_4244_4d49_4752;

/// One schema migration, embedded in the binary.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration in order; a new one is appended here with its file, never edited once
/// released.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "produced",
        sql: include_str!("migrations/0002_produced.sql"),
    },
];

/// The schema version this build migrates to.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Everything [`PgStore::connect`] uses, each field set explicitly (nothing is left to a
/// library default). [`PgConfig::new`] fills in the `*_DEFAULT` constants of this module.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/dbname` (libpq URL form; several `host:port` pairs
    /// are tried in order). Only the host, port, user, password, database, `options` and
    /// `sslmode` are taken from it; every timeout below overrides what it may say. This build
    /// has no TLS client: `sslmode=require` is refused at start, anything else connects in
    /// plain text (use a private network or a local tunnel).
    pub url: String,
    /// Connections in the pool (at least 1).
    pub pool_size: usize,
    /// TCP connect plus start-up, per attempt.
    pub connect_timeout: Duration,
    /// Waiting for a free connection when all `pool_size` are busy ([`StoreError::Timeout`]).
    pub pool_wait_timeout: Duration,
    /// Creating one new pooled connection: connect, start-up and the read-write check
    /// ([`StoreError::Unavailable`] when it passes). `None` (what [`PgConfig::new`] sets):
    /// the same as `connect_timeout`, whatever that is set to later, so the one connect
    /// setting (`database_connect_timeout`) bounds a whole connection attempt; `Some` to set it
    /// apart.
    pub pool_create_timeout: Option<Duration>,
    /// Checking a pooled connection before reuse.
    pub pool_recycle_timeout: Duration,
    /// The server's `statement_timeout` for every session (whole milliseconds, at least 1).
    pub statement_timeout: Duration,
    /// The server's `idle_in_transaction_session_timeout` (whole milliseconds, at least 1).
    pub idle_in_transaction_timeout: Duration,
    /// Client-side deadline of one store call (pool wait and all its round trips); must be
    /// longer than `statement_timeout` so that the server's clean timeout fires first (a
    /// statement cancelled by the server leaves its connection reusable; one cut by this
    /// deadline is closed). [`PgConfig::check`] refuses it otherwise.
    pub call_timeout: Duration,
    /// Deadline of the migrations at start (and the server's `statement_timeout` while they run).
    pub migration_timeout: Duration,
    /// TCP keepalive idle time, probe interval and probe count.
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_retries: u32,
    /// TCP_USER_TIMEOUT of every connection.
    pub tcp_user_timeout: Duration,
    /// `application_name` of every session.
    pub application_name: String,
    /// Most threads of one user a thread list or `sync` considers ([`THREADS_PER_READ_MAX`],
    /// at least 1; tests set it low).
    pub threads_per_read_max: usize,
}

impl PgConfig {
    /// The defaults of this module for `url`.
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            pool_size: POOL_SIZE_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            pool_wait_timeout: POOL_WAIT_TIMEOUT_DEFAULT,
            pool_create_timeout: None,
            pool_recycle_timeout: POOL_RECYCLE_TIMEOUT_DEFAULT,
            statement_timeout: STATEMENT_TIMEOUT_DEFAULT,
            idle_in_transaction_timeout: IDLE_IN_TRANSACTION_TIMEOUT_DEFAULT,
            call_timeout: CALL_TIMEOUT_DEFAULT,
            migration_timeout: MIGRATION_TIMEOUT_DEFAULT,
            keepalive_idle: KEEPALIVE_IDLE_DEFAULT,
            keepalive_interval: KEEPALIVE_INTERVAL_DEFAULT,
            keepalive_retries: KEEPALIVE_RETRIES_DEFAULT,
            tcp_user_timeout: TCP_USER_TIMEOUT_DEFAULT,
            application_name: APPLICATION_NAME_DEFAULT.to_owned(),
            threads_per_read_max: THREADS_PER_READ_MAX,
        }
    }

    /// The pool create timeout in force: [`PgConfig::pool_create_timeout`], else
    /// `connect_timeout`.
    pub fn pool_create_timeout(&self) -> Duration {
        self.pool_create_timeout.unwrap_or(self.connect_timeout)
    }

    /// The settings that make no sense, said so that the operator can fix them.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.pool_size == 0 {
            return Err("the PostgreSQL pool size must be at least 1".into());
        }
        let positive = [
            ("connect timeout", self.connect_timeout),
            ("pool wait timeout", self.pool_wait_timeout),
            ("pool create timeout", self.pool_create_timeout()),
            ("pool recycle timeout", self.pool_recycle_timeout),
            ("call timeout", self.call_timeout),
            ("migration timeout", self.migration_timeout),
            ("keepalive idle", self.keepalive_idle),
            ("keepalive interval", self.keepalive_interval),
            ("TCP user timeout", self.tcp_user_timeout),
        ];
        for (what, d) in positive {
            if d.is_zero() {
                return Err(format!("the PostgreSQL {what} must be more than 0"));
            }
        }
        // 0 would turn the server-side timeouts off.
        for (what, d) in [
            ("statement timeout", self.statement_timeout),
            (
                "idle-in-transaction timeout",
                self.idle_in_transaction_timeout,
            ),
        ] {
            if d.as_millis() == 0 {
                return Err(format!("the PostgreSQL {what} must be at least 1 ms"));
            }
        }
        if self.keepalive_retries == 0 {
            return Err("the PostgreSQL keepalive retries must be at least 1".into());
        }
        if self.threads_per_read_max == 0 {
            return Err("the PostgreSQL threads per read must be at least 1".into());
        }
        if self.call_timeout <= self.statement_timeout {
            return Err(format!(
                "the PostgreSQL call timeout ({} ms) must be longer than the statement timeout \
                 ({} ms), so that the server cancels a slow statement cleanly before the client \
                 gives up on the call: set it longer (for example the statement timeout plus \
                 500 ms)",
                self.call_timeout.as_millis(),
                self.statement_timeout.as_millis()
            ));
        }
        Ok(())
    }

    /// The tokio-postgres connection settings: the URL's address and credentials, then every
    /// option this module owns.
    fn pg_config(&self) -> std::result::Result<tokio_postgres::Config, String> {
        let mut pg: tokio_postgres::Config = self.url.parse().map_err(|e| {
            format!("database_url is not a valid postgres:// URL ({e}); expected postgres://user:password@host:port/dbname")
        })?;
        match pg.get_ssl_mode() {
            SslMode::Require => {
                return Err(
                    "database_url asks for sslmode=require, but this build has no TLS \
                            client for PostgreSQL: use sslmode=disable over a private network \
                            or a local TLS tunnel"
                        .into(),
                )
            }
            // `prefer` (the URL default) cannot be honoured without TLS: say so by setting it.
            _ => pg.ssl_mode(SslMode::Disable),
        };
        let ms = |d: Duration| d.as_millis();
        // Server settings for every session. The isolation level is also set by every
        // multi-statement transaction here; the session default covers single statements
        // (READ COMMITTED is what the id counter's ordering argument assumes).
        let ours = format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={} \
             -c default_transaction_isolation=read\\ committed",
            ms(self.statement_timeout),
            ms(self.idle_in_transaction_timeout),
        );
        let options = match pg.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        pg.options(options)
            .application_name(self.application_name.clone())
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(self.keepalive_idle)
            .keepalives_interval(self.keepalive_interval)
            .keepalives_retries(self.keepalive_retries)
            .tcp_user_timeout(self.tcp_user_timeout)
            // The store writes: never settle for a read-only standby.
            .target_session_attrs(TargetSessionAttrs::ReadWrite)
            .channel_binding(ChannelBinding::Prefer)
            .load_balance_hosts(LoadBalanceHosts::Disable);
        Ok(pg)
    }
}

impl fmt::Debug for PgConfig {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("pool_create_timeout", &self.pool_create_timeout())
            .field("pool_recycle_timeout", &self.pool_recycle_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("call_timeout", &self.call_timeout)
            .field("migration_timeout", &self.migration_timeout)
            .field("keepalive_idle", &self.keepalive_idle)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_retries", &self.keepalive_retries)
            .field("tcp_user_timeout", &self.tcp_user_timeout)
            .field("application_name", &self.application_name)
            .field("threads_per_read_max", &self.threads_per_read_max)
            .finish()
    }
}

/// The PostgreSQL store. Cheap to share by reference on the bridge thread.
pub struct PgStore {
    pool: Pool,
    cfg: PgConfig,
    cache: Mutex<ThreadCache>,
    /// Appends whose optimistic write met a stored key and ran again (see
    /// [`PgStore::append_retries`]).
    retries: AtomicU64,
}

/// Threads an append remembers from the batches before (most an append otherwise spends, past
/// the message insert itself, is looking its threads up: 10 to 15 us each on the 2-core
/// machine). A guess, checked each time: every change to a thread's seq or participants is
/// made under the id counter lock and moves the counter, so entries are exact while the
/// counter still reads `epoch` (no other writer, such as another node, came in between); an
/// append that finds the counter elsewhere looks its threads up after all (one more round
/// trip, under the lock), and the next ones look everything up until the guess would hold.
///
/// Memory: at most [`THREAD_CACHE_ENTRIES_MAX`] threads; a DM thread costs about 200 bytes
/// (key, table slot, two participant names; group threads more, by their names).
struct ThreadCache {
    /// The counter value up to which `threads` is exact (None: nothing known).
    epoch: Option<i64>,
    threads: HashMap<Arc<str>, Cached>,
    /// Whether the last append found the counter at `epoch`: when not, appends look every
    /// thread up in their first round trip instead of guessing.
    guess: bool,
}

#[derive(Clone)]
struct Cached {
    nid: i64,
    last_seq: i64,
    users: Arc<[Arc<str>]>,
    direct: bool,
}

impl ThreadCache {
    /// What a transaction that found the counter at `start` and committed it at `end` leaves
    /// exact: its threads' states as of `end`, and the rest of the cache when it was exact at
    /// `start` (nobody commits between a writer's lock and its commit).
    fn committed<'a>(
        &mut self,
        start: i64,
        end: i64,
        states: impl Iterator<Item = (&'a str, Cached)>,
    ) {
        match self.epoch {
            // A later commit got here first: it knows better.
            Some(e) if e > end => return,
            Some(e) if e == start => {}
            _ => self.threads.clear(),
        }
        for (text, state) in states {
            match self.threads.get_mut(text) {
                Some(c) => *c = state,
                None => {
                    if self.threads.len() >= THREAD_CACHE_ENTRIES_MAX {
                        self.threads.clear();
                    }
                    self.threads.insert(Arc::from(text), state);
                }
            }
        }
        self.epoch = Some(end);
    }
}

/// Why a call failed, before it becomes a [`StoreError`].
#[derive(Debug)]
enum Fail {
    Db(tokio_postgres::Error),
    /// The database answered something this build cannot use (a broken invariant of its data).
    Bad(String),
}

/// Whether the server refused a statement's data (SQLSTATE class 22, "data exception": a
/// text it cannot hold, a value out of range): the request's fault, not the database's, so
/// retrying the same data fails the same way.
fn is_data_exception(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Db(e)
    }
}

impl Fail {
    fn into_store(self) -> StoreError {
        match self {
            Fail::Db(e) => db_error(&e),
            Fail::Bad(text) => {
                StoreError::Unavailable(format!("unexpected data in the message store: {text}"))
            }
        }
    }
}

/// A server-side statement timeout is [`StoreError::Timeout`]; everything else (connection
/// lost, server shutting down, constraint raced by another node) is worth a retry later.
fn db_error(e: &tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::QUERY_CANCELED) {
        return StoreError::Timeout;
    }
    StoreError::Unavailable(describe(e))
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "PostgreSQL {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        ),
        None => format!("PostgreSQL: {e}"),
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => StoreError::Timeout,
        PoolError::Timeout(TimeoutType::Create) => StoreError::Unavailable(
            "connecting to PostgreSQL timed out (pool create timeout)".into(),
        ),
        PoolError::Timeout(TimeoutType::Recycle) => {
            StoreError::Unavailable("checking a pooled PostgreSQL connection timed out".into())
        }
        PoolError::Backend(e) => db_error(&e),
        PoolError::Closed => StoreError::Unavailable("the PostgreSQL pool is closed".into()),
        PoolError::NoRuntimeSpecified => {
            StoreError::Unavailable("the PostgreSQL pool has no runtime (a bug)".into())
        }
        PoolError::PostCreateHook(e) => {
            StoreError::Unavailable(format!("PostgreSQL connection set-up failed: {e}"))
        }
    }
}

/// A pooled connection for one call: it goes back to the pool only when the call ended
/// cleanly ([`Checkout::keep`]); dropped otherwise (timeout, cancellation) it is closed, which
/// makes the server roll back whatever the call left open.
struct Checkout {
    obj: Option<Object>,
    keep: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.keep {
            if let Some(obj) = self.obj.take() {
                drop(Object::take(obj));
            }
        }
    }
}

/// A statement's text and parameter types (prepared once per connection, then cached).
struct Sql {
    text: &'static str,
    types: &'static [Type],
}

async fn prepare(c: &Object, q: &Sql) -> std::result::Result<Statement, Fail> {
    Ok(c.prepare_typed_cached(q.text, q.types).await?)
}

/// A `uuid` column read in binary (the `with-uuid-1` feature of tokio-postgres is not built).
struct PgUuid(u128);

impl<'a> FromSql<'a> for PgUuid {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<PgUuid, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 16] = raw.try_into().map_err(|_| "a uuid is 16 bytes")?;
        Ok(PgUuid(u128::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
}

/// A uuid as a parameter: its text form, cast to `uuid` in the SQL.
fn uuid_text(v: u128) -> String {
    uuid::Uuid::from_u128(v).hyphenated().to_string()
}

/// Numbers from the caller into `bigint` (our ids and times never reach 2^63).
fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64, what: &str) -> std::result::Result<u64, Fail> {
    u64::try_from(v).map_err(|_| Fail::Bad(format!("negative {what} {v}")))
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> std::result::Result<T, Fail> {
    Ok(row.try_get(i)?)
}

fn arc(s: String) -> Arc<str> {
    Arc::from(s)
}

fn page_limit(limit: usize) -> usize {
    limit.clamp(1, PAGE_LIMIT_MAX)
}

/// The 12 columns of a [`Message`], message alias `$m`, thread alias `$t` (read by
/// [`message_at`]).
macro_rules! message_columns {
    ($m:literal, $t:literal) => {
        concat!(
            $m,
            ".id, ",
            $m,
            ".seq, ",
            $t,
            ".id, ",
            $m,
            ".thread_nid, ",
            $m,
            ".server_msg_id, ",
            $m,
            ".event_id, ",
            $m,
            ".sender, ",
            $m,
            ".recipient, ",
            $m,
            ".client_msg_id, ",
            $m,
            ".content, ",
            $m,
            ".attachment_url, ",
            $m,
            ".sent_at_ms"
        )
    };
}

/// Columns of [`message_columns`].
const MESSAGE_COLUMNS: usize = 12;

/// The message whose [`message_columns`] start at column `b`.
fn message_at(row: &Row, b: usize) -> std::result::Result<Message, Fail> {
    Ok(Message {
        id: u64_of(get(row, b)?, "message id")?,
        seq: u64_of(get(row, b + 1)?, "seq")?,
        thread: arc(get(row, b + 2)?),
        thread_numeric_id: u64_of(get(row, b + 3)?, "thread id")?,
        server_msg_id: get::<PgUuid>(row, b + 4)?.0,
        event_id: get::<PgUuid>(row, b + 5)?.0,
        sender: arc(get(row, b + 6)?),
        to: get::<Option<String>>(row, b + 7)?.map(arc),
        client_msg_id: get::<Option<String>>(row, b + 8)?.map(arc),
        content: arc(get(row, b + 9)?),
        attachment_url: get::<Option<String>>(row, b + 10)?.map(arc),
        sent_at_ms: u64_of(get(row, b + 11)?, "sent_at_ms")?,
    })
}

/// The columns of a [`ThreadView`] for the viewer `$1`, from `t` (the thread), `p` (the
/// viewer's participant row, possibly NULL) and `lm` (its newest message, possibly NULL), with
/// the unread cap `$4` (read by [`thread_view_at`]).
macro_rules! thread_view_columns {
    () => {
        concat!(
            "t.id, t.numeric_id, t.kind, t.title, t.created_at_ms, COALESCE(lm.seq, 0), ",
            "p.user_id IS NOT NULL, COALESCE(p.read_seq, 0), ",
            "ARRAY(SELECT q.user_id FROM switchboard_participants q ",
            "WHERE q.thread_nid = t.numeric_id ORDER BY q.user_id), ",
            "(SELECT count(*) FROM (SELECT 1 FROM switchboard_messages u ",
            "WHERE u.thread_nid = t.numeric_id AND u.seq > p.read_seq AND u.sender <> $1 ",
            "LIMIT $4) c), ",
            message_columns!("lm", "t")
        )
    };
}

/// Columns of [`thread_view_columns`].
const THREAD_VIEW_COLUMNS: usize = 10 + MESSAGE_COLUMNS;

/// The view of [`thread_view_columns`] and whether the viewer takes part.
fn thread_view_at(row: &Row) -> std::result::Result<(ThreadView, bool), Fail> {
    let kind = match get::<&str>(row, 2)? {
        "direct" => ThreadKind::Direct,
        "group" => ThreadKind::Group,
        other => return Err(Fail::Bad(format!("thread kind {other:?}"))),
    };
    let last_message = match get::<Option<i64>>(row, 10)? {
        Some(_) => Some(message_at(row, 10)?),
        None => None,
    };
    let view = ThreadView {
        id: arc(get(row, 0)?),
        numeric_id: u64_of(get(row, 1)?, "thread id")?,
        kind,
        title: get::<Option<String>>(row, 3)?.map(arc),
        participants: get::<Vec<String>>(row, 8)?.into_iter().map(arc).collect(),
        created_at_ms: u64_of(get(row, 4)?, "created_at_ms")?,
        last_seq: u64_of(get(row, 5)?, "last_seq")?,
        last_message,
        read_seq: u64_of(get(row, 7)?, "read_seq")?,
        unread: u64_of(get(row, 9)?, "unread count")?,
    };
    Ok((view, get(row, 6)?))
}

fn notification_at(row: &Row) -> std::result::Result<Notification, Fail> {
    Ok(Notification {
        id: u64_of(get(row, 0)?, "notification id")?,
        user: arc(get(row, 1)?),
        kind: arc(get(row, 2)?),
        data_json: arc(get(row, 3)?),
        source_key: get::<Option<String>>(row, 4)?.map(arc),
        created_at_ms: u64_of(get(row, 5)?, "created_at_ms")?,
        read: get(row, 6)?,
    })
}

const T_TEXT: Type = Type::TEXT;
const T_INT8: Type = Type::INT8;
const T_TEXTS: Type = Type::TEXT_ARRAY;
const T_INT8S: Type = Type::INT8_ARRAY;

const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// The id counter's row lock, held to commit (see the module doc); returns the last id used.
const LOCK_IDS: Sql = Sql {
    text: "SELECT value FROM switchboard_counters WHERE name = 'ids' FOR NO KEY UPDATE",
    types: &[],
};

/// The batch's existing threads ($1: text ids): numeric id, newest seq (one probe of the
/// (thread_nid, seq) index), participants sorted, whether it is direct.
const APPEND_THREADS: Sql = Sql {
    text: "SELECT t.id, t.numeric_id, \
             COALESCE((SELECT max(m.seq) FROM switchboard_messages m \
                       WHERE m.thread_nid = t.numeric_id), 0), \
             ARRAY(SELECT p.user_id FROM switchboard_participants p \
                   WHERE p.thread_nid = t.numeric_id ORDER BY p.user_id), \
             t.kind = 'direct' \
           FROM unnest($1::text[]) AS k(id) JOIN switchboard_threads t ON t.id = k.id",
    types: &[T_TEXTS],
};

/// Stored messages with the batch's (sender, client_msg_id) keys ($1, $2) or server ids ($3).
/// Asked only after an optimistic write hit a unique key (see [`PgStore::append`]).
const APPEND_STORED: Sql = Sql {
    text: concat!(
        "SELECT ",
        message_columns!("m", "t"),
        " FROM unnest($1::text[], $2::text[]) AS k(sender, cmid) \
         JOIN switchboard_messages m ON m.sender = k.sender AND m.client_msg_id = k.cmid \
         JOIN switchboard_threads t ON t.numeric_id = m.thread_nid \
         UNION ALL SELECT ",
        message_columns!("m", "t"),
        " FROM switchboard_messages m JOIN switchboard_threads t ON t.numeric_id = m.thread_nid \
         WHERE m.server_msg_id = ANY($3::uuid[])"
    ),
    types: &[T_TEXTS, T_TEXTS, T_TEXTS],
};

/// Everything an append writes, as one statement over arrays (see [`WriteSet`] for the
/// parameters): only inserts, and the counter. Data-modifying CTEs all run; the foreign keys
/// of the new participants and messages are checked at the end of the statement, when the new
/// threads are in.
const APPEND_WRITE: Sql = Sql {
    text: "WITH new_threads AS ( \
             INSERT INTO switchboard_threads (id, numeric_id, kind, title, created_at_ms) \
             SELECT u.id, u.nid, 'direct', NULL, u.created \
             FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(id, nid, created) \
           ), new_participants AS ( \
             INSERT INTO switchboard_participants (thread_nid, user_id, read_seq, delivered_seq) \
             SELECT u.nid, u.user_id, 0, 0 \
             FROM unnest($4::int8[], $5::text[]) AS u(nid, user_id) \
           ), new_messages AS ( \
             INSERT INTO switchboard_messages \
               (id, thread_nid, seq, server_msg_id, event_id, sender, recipient, \
                client_msg_id, content, attachment_url, sent_at_ms) \
             SELECT u.id, u.nid, u.seq, u.smid::uuid, u.eid::uuid, u.sender, u.recipient, \
                    u.cmid, u.content, u.attachment, u.sent_at \
             FROM unnest($6::int8[], $7::int8[], $8::int8[], $9::text[], $10::text[], \
                         $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], \
                         $16::int8[]) \
               AS u(id, nid, seq, smid, eid, sender, recipient, cmid, content, attachment, \
                    sent_at) \
           ) \
           UPDATE switchboard_counters SET value = $17 WHERE name = 'ids'",
    types: &[
        T_TEXTS, T_INT8S, T_INT8S, // new threads
        T_INT8S, T_TEXTS, // new participants
        T_INT8S, T_INT8S, T_INT8S, T_TEXTS, T_TEXTS, T_TEXTS, T_TEXTS, T_TEXTS, T_TEXTS, T_TEXTS,
        T_INT8S, // messages
        T_INT8,  // counter
    ],
};

/// A thread ($1 id, $2 title, $3 created_at_ms, $4 participants, $5 kind) with the next id,
/// unless the id is taken (no row then). Runs under the counter lock.
const CREATE_THREAD: Sql = Sql {
    text: "WITH c AS (SELECT value + 1 AS nid FROM switchboard_counters WHERE name = 'ids'), \
           t AS ( \
             INSERT INTO switchboard_threads (id, numeric_id, kind, title, created_at_ms) \
             SELECT $1, c.nid, $5, $2, $3 FROM c \
             ON CONFLICT (id) DO NOTHING RETURNING numeric_id \
           ), p AS ( \
             INSERT INTO switchboard_participants (thread_nid, user_id, read_seq, delivered_seq) \
             SELECT t.numeric_id, u.user_id, 0, 0 \
             FROM t, unnest($4::text[]) AS u(user_id) \
           ), k AS ( \
             UPDATE switchboard_counters SET value = value + 1 \
             WHERE name = 'ids' AND EXISTS (SELECT 1 FROM t) \
           ) \
           SELECT numeric_id FROM t",
    types: &[T_TEXT, T_TEXT, T_INT8, T_TEXTS, T_TEXT],
};

/// The user's threads ($1) with an activity key (store::activity_key) below $2, most recent
/// first, $3 rows, unread cap $4, among the user's newest $5 threads by numeric id (see
/// [`THREADS_PER_READ_MAX`]). Visits each of those (one index probe each for its newest
/// message id), then sorts the keys: the price of an append that updates nothing.
const THREADS: Sql = Sql {
    text: concat!(
        "SELECT ",
        thread_view_columns!(),
        ", p.activity \
         FROM ( \
           SELECT r.thread_nid, r.user_id, r.read_seq, l.last_id, \
                  COALESCE(l.last_id, r.thread_nid) AS activity \
           FROM (SELECT q.thread_nid, q.user_id, q.read_seq FROM switchboard_participants q \
                 WHERE q.user_id = $1 ORDER BY q.thread_nid DESC LIMIT $5) r \
           CROSS JOIN LATERAL (SELECT max(m.id) AS last_id FROM switchboard_messages m \
                               WHERE m.thread_nid = r.thread_nid) l \
         ) p \
         JOIN switchboard_threads t ON t.numeric_id = p.thread_nid \
         LEFT JOIN switchboard_messages lm ON lm.id = p.last_id \
         WHERE p.activity < $2 \
         ORDER BY p.activity DESC LIMIT $3"
    ),
    types: &[T_TEXT, T_INT8, T_INT8, T_INT8, T_INT8],
};

/// The users sharing a thread with $1 among its newest $2 threads, ranked by their most
/// recently active shared thread (then id), $3 of them; `n`: the user's threads, up to $2 + 1.
const CO_PARTICIPANTS: Sql = Sql {
    text: "SELECT o.user_id, max(r.activity) AS act, \
             (SELECT count(*) FROM (SELECT 1 FROM switchboard_participants z \
                                    WHERE z.user_id = $1 LIMIT $2 + 1) x) AS n \
           FROM (SELECT q.thread_nid, \
                        COALESCE((SELECT max(m.id) FROM switchboard_messages m \
                                  WHERE m.thread_nid = q.thread_nid), q.thread_nid) AS activity \
                 FROM switchboard_participants q WHERE q.user_id = $1 \
                 ORDER BY q.thread_nid DESC LIMIT $2) r \
           JOIN switchboard_participants o \
             ON o.thread_nid = r.thread_nid AND o.user_id <> $1 \
           GROUP BY o.user_id \
           ORDER BY act DESC, o.user_id \
           LIMIT $3",
    types: &[T_TEXT, T_INT8, T_INT8],
};

/// One thread for viewer $1: text id $2, else numeric id $3 (NULL: none); unread cap $4.
const THREAD: Sql = Sql {
    text: concat!(
        "SELECT ",
        thread_view_columns!(),
        " FROM switchboard_threads t \
         LEFT JOIN switchboard_participants p ON p.thread_nid = t.numeric_id AND p.user_id = $1 \
         LEFT JOIN LATERAL (SELECT * FROM switchboard_messages m \
                            WHERE m.thread_nid = t.numeric_id ORDER BY m.id DESC LIMIT 1) lm \
           ON true \
         WHERE t.numeric_id = \
           COALESCE((SELECT s.numeric_id FROM switchboard_threads s WHERE s.id = $2), $3)"
    ),
    types: &[T_TEXT, T_TEXT, T_INT8, T_INT8],
};

/// A thread ($2 text id, else $3 number) for viewer $1: one row per message with seq below
/// $4, newest first, $5 of them, each with the viewer's membership; one row with NULL message
/// columns when there is none or the viewer is not a member; no row when no such thread.
const MESSAGES: Sql = Sql {
    text: concat!(
        "WITH th AS ( \
           SELECT t.numeric_id, t.id, EXISTS (SELECT 1 FROM switchboard_participants p \
             WHERE p.thread_nid = t.numeric_id AND p.user_id = $1) AS member \
           FROM switchboard_threads t \
           WHERE t.numeric_id = \
             COALESCE((SELECT s.numeric_id FROM switchboard_threads s WHERE s.id = $2), $3) \
         ) SELECT th.member, ",
        message_columns!("m", "th"),
        " FROM th LEFT JOIN LATERAL ( \
           SELECT * FROM switchboard_messages m \
           WHERE th.member AND m.thread_nid = th.numeric_id AND m.seq < $4 \
           ORDER BY m.seq DESC LIMIT $5 \
         ) m ON true ORDER BY m.seq DESC"
    ),
    types: &[T_TEXT, T_TEXT, T_INT8, T_INT8, T_INT8],
};

/// The messages named by numeric ids ($1) or server ids ($2), each with whether user $3 takes
/// part in its thread.
const MARK_FIND: Sql = Sql {
    text: concat!(
        "SELECT ",
        message_columns!("m", "t"),
        ", EXISTS (SELECT 1 FROM switchboard_participants p \
             WHERE p.thread_nid = m.thread_nid AND p.user_id = $3) \
         FROM switchboard_messages m JOIN switchboard_threads t ON t.numeric_id = m.thread_nid \
         WHERE m.id = ANY($1) OR m.server_msg_id = ANY($2::uuid[])"
    ),
    types: &[T_INT8S, T_TEXTS, T_TEXT],
};

/// Thread $1 by text id, and whether user $2 takes part in it.
const MARK_THREAD: Sql = Sql {
    text: "SELECT t.numeric_id, EXISTS (SELECT 1 FROM switchboard_participants p \
             WHERE p.thread_nid = t.numeric_id AND p.user_id = $2) \
           FROM switchboard_threads t WHERE t.id = $1",
    types: &[T_TEXT, T_TEXT],
};

const MARK_READ: Sql = Sql {
    text: "UPDATE switchboard_participants SET read_seq = GREATEST(read_seq, $3) \
           WHERE thread_nid = $1 AND user_id = $2 RETURNING read_seq",
    types: &[T_INT8, T_TEXT, T_INT8],
};

const MARK_DELIVERED: Sql = Sql {
    text: "UPDATE switchboard_participants SET delivered_seq = GREATEST(delivered_seq, $3) \
           WHERE thread_nid = $1 AND user_id = $2 RETURNING delivered_seq",
    types: &[T_INT8, T_TEXT, T_INT8],
};

/// User $1's messages with id above $2, oldest first, $3 of them: each of the user's newest $4
/// threads by numeric id ([`THREADS_PER_READ_MAX`]) is probed from the cursor on in the
/// (thread_nid, id) index, and the probes merged.
const SYNC_SINCE: Sql = Sql {
    text: concat!(
        "SELECT ",
        message_columns!("m", "t"),
        " FROM (SELECT q.thread_nid FROM switchboard_participants q \
                WHERE q.user_id = $1 ORDER BY q.thread_nid DESC LIMIT $4) p \
         JOIN switchboard_threads t ON t.numeric_id = p.thread_nid \
         CROSS JOIN LATERAL ( \
           SELECT * FROM switchboard_messages m \
           WHERE m.thread_nid = p.thread_nid AND m.id > $2 ORDER BY m.id LIMIT $3 \
         ) m \
         ORDER BY m.id LIMIT $3"
    ),
    types: &[T_TEXT, T_INT8, T_INT8, T_INT8],
};

/// User $1's newest $2 messages, newest first: they lie in the user's $2 threads with the
/// newest last messages (among their newest $3 threads by numeric id), so only those are read
/// past their newest id.
const SYNC_LATEST: Sql = Sql {
    text: concat!(
        "SELECT ",
        message_columns!("m", "t"),
        " FROM ( \
           SELECT r.thread_nid \
           FROM (SELECT q.thread_nid FROM switchboard_participants q \
                 WHERE q.user_id = $1 ORDER BY q.thread_nid DESC LIMIT $3) r \
           CROSS JOIN LATERAL (SELECT max(m.id) AS last_id FROM switchboard_messages m \
                               WHERE m.thread_nid = r.thread_nid) l \
           WHERE l.last_id IS NOT NULL \
           ORDER BY l.last_id DESC LIMIT $2 \
         ) p \
         JOIN switchboard_threads t ON t.numeric_id = p.thread_nid \
         CROSS JOIN LATERAL ( \
           SELECT * FROM switchboard_messages m \
           WHERE m.thread_nid = p.thread_nid ORDER BY m.id DESC LIMIT $2 \
         ) m \
         ORDER BY m.id DESC LIMIT $2"
    ),
    types: &[T_TEXT, T_INT8, T_INT8],
};

macro_rules! notification_columns {
    () => {
        "id, user_id, kind, data, source_key, created_at_ms, read"
    };
}

/// Insert ($1 user, $2 kind, $3 data, $4 source key, $5 created_at_ms), or the stored one with
/// the same (user, source key); the last column says which.
const ADD_NOTIFICATION: Sql = Sql {
    text: concat!(
        "WITH ins AS ( \
           INSERT INTO switchboard_notifications \
             (user_id, kind, data, source_key, created_at_ms, read) \
           VALUES ($1, $2, $3, $4, $5, false) \
           ON CONFLICT (user_id, source_key) DO NOTHING RETURNING ",
        notification_columns!(),
        ") SELECT *, true FROM ins UNION ALL SELECT ",
        notification_columns!(),
        ", false FROM switchboard_notifications \
         WHERE user_id = $1 AND source_key = $4 AND NOT EXISTS (SELECT 1 FROM ins)"
    ),
    types: &[T_TEXT, T_TEXT, T_TEXT, T_TEXT, T_INT8],
};

/// The stored notification of ($1 user, $2 source key): the answer when [`ADD_NOTIFICATION`]
/// lost a race with another node's insert of the same key (its snapshot could not see it).
const NOTIFICATION_BY_KEY: Sql = Sql {
    text: concat!(
        "SELECT ",
        notification_columns!(),
        " FROM switchboard_notifications WHERE user_id = $1 AND source_key = $2"
    ),
    types: &[T_TEXT, T_TEXT],
};

const NOTIFICATIONS: Sql = Sql {
    text: concat!(
        "SELECT ",
        notification_columns!(),
        " FROM switchboard_notifications WHERE user_id = $1 AND id < $2 \
         ORDER BY id DESC LIMIT $3"
    ),
    types: &[T_TEXT, T_INT8, T_INT8],
};

const NOTIFICATIONS_UNREAD: Sql = Sql {
    text: concat!(
        "SELECT ",
        notification_columns!(),
        " FROM switchboard_notifications WHERE user_id = $1 AND id < $2 AND NOT read \
         ORDER BY id DESC LIMIT $3"
    ),
    types: &[T_TEXT, T_INT8, T_INT8],
};

const NOTIFICATION_READ: Sql = Sql {
    text: concat!(
        "UPDATE switchboard_notifications SET read = true WHERE id = $2 AND user_id = $1 \
         RETURNING ",
        notification_columns!()
    ),
    types: &[T_TEXT, T_INT8],
};

const NOTIFICATIONS_READ_ALL: Sql = Sql {
    text: "UPDATE switchboard_notifications SET read = true WHERE user_id = $1 AND NOT read",
    types: &[T_TEXT],
};

const MARK_PRODUCED: Sql = Sql {
    text: "UPDATE switchboard_messages SET produced = true WHERE id = ANY($1) AND NOT produced",
    types: &[T_INT8S],
};

const PRODUCED_OF: Sql = Sql {
    text: "SELECT id FROM switchboard_messages WHERE id = ANY($1) AND produced",
    types: &[T_INT8S],
};

/// A thread as an append sees it while resolving its batch.
#[derive(Clone)]
struct ThreadState<'a> {
    nid: i64,
    /// Its newest seq (0: no message yet).
    last_seq: i64,
    /// Sorted.
    users: Arc<[Arc<str>]>,
    /// `kind = 'direct'`.
    direct: bool,
    /// Created by this batch (a first DM): its participants, to insert, and its time.
    created: Option<(Vec<&'a str>, i64)>,
}

impl ThreadState<'_> {
    fn has(&self, user: &str) -> bool {
        self.users.binary_search_by(|u| (**u).cmp(user)).is_ok()
    }

    /// Whether its users are exactly `{a, b}` (`{a}` when `a == b`).
    fn is_pair(&self, a: &str, b: &str) -> bool {
        let want = if a == b { 1 } else { 2 };
        self.users.len() == want && self.has(a) && self.has(b)
    }
}

/// The parameters of [`APPEND_WRITE`], column by column.
#[derive(Default)]
struct WriteSet<'a> {
    t_id: Vec<&'a str>,
    t_nid: Vec<i64>,
    t_created: Vec<i64>,
    p_nid: Vec<i64>,
    p_user: Vec<&'a str>,
    m_id: Vec<i64>,
    m_nid: Vec<i64>,
    m_seq: Vec<i64>,
    m_smid: Vec<String>,
    m_eid: Vec<String>,
    m_sender: Vec<&'a str>,
    m_recipient: Vec<Option<&'a str>>,
    m_cmid: Vec<Option<&'a str>>,
    m_content: Vec<&'a str>,
    m_attachment: Vec<Option<&'a str>>,
    m_sent_at: Vec<i64>,
}

/// What is already stored under a batch's keys (empty on the optimistic first try).
#[derive(Default)]
struct Stored {
    by_key: HashMap<(Arc<str>, Arc<str>), Message>,
    by_server_id: HashMap<u128, Message>,
}

impl Stored {
    /// Forget the copy `resolve` recorded for `m` (its write was rolled back).
    fn forget(&mut self, m: &NewMessage) {
        self.by_server_id.remove(&m.server_msg_id);
        if let Some(c) = &m.client_msg_id {
            self.by_key.remove(&(m.sender.clone(), c.clone()));
        }
    }
}

/// The parameters of [`APPEND_WRITE`] for `w`, with the counter's new value.
fn write_params<'w>(w: &'w WriteSet<'_>, counter: &'w i64) -> [&'w (dyn ToSql + Sync); 17] {
    [
        &w.t_id,
        &w.t_nid,
        &w.t_created,
        &w.p_nid,
        &w.p_user,
        &w.m_id,
        &w.m_nid,
        &w.m_seq,
        &w.m_smid,
        &w.m_eid,
        &w.m_sender,
        &w.m_recipient,
        &w.m_cmid,
        &w.m_content,
        &w.m_attachment,
        &w.m_sent_at,
        counter,
    ]
}

/// Name of the savepoint [`split_writes`] puts each entry under.
const ENTRY_SAVEPOINT: &str = "switchboard_entry";

/// Write `batch` entry by entry inside the open transaction (the counter lock held, the
/// batch's threads and stored copies in `threads` and `stored`), each entry's rows under a
/// savepoint: an entry the server refuses with a data exception is rolled back to it and
/// refused with [`Refusal::InvalidText`] (it takes no id and no seq), the others are kept;
/// then COMMIT. One round trip per written entry. Returns the outcomes and the counter's new
/// value.
async fn split_writes<'a>(
    c: &Object,
    write_q: &Statement,
    batch: &'a [NewMessage],
    threads: &mut HashMap<&'a str, ThreadState<'a>>,
    stored: &mut Stored,
    last_id: i64,
) -> std::result::Result<(Vec<Appended>, i64), Fail> {
    let save = format!("SAVEPOINT {ENTRY_SAVEPOINT}");
    let release = format!("RELEASE SAVEPOINT {ENTRY_SAVEPOINT}");
    let undo = format!("ROLLBACK TO SAVEPOINT {ENTRY_SAVEPOINT}; {release}");
    let mut out = Vec::with_capacity(batch.len());
    let mut last = last_id;
    for nm in batch {
        let before = threads.get(&*nm.thread).cloned();
        let (mut one, w, next) = resolve(std::slice::from_ref(nm), threads, stored, last)?;
        let outcome = one
            .pop()
            .ok_or_else(|| Fail::Bad("no outcome for an entry".into()))?;
        if w.m_id.is_empty() {
            out.push(outcome);
            continue;
        }
        let params = write_params(&w, &next);
        let (saved, written, released) = tokio::join!(
            biased;
            c.batch_execute(&save),
            c.execute(write_q, &params),
            c.batch_execute(&release),
        );
        saved?;
        match written {
            Ok(_) => {
                released?;
                last = next;
                if let Some(st) = threads.get_mut(&*nm.thread) {
                    st.created = None;
                }
                out.push(outcome);
            }
            Err(e) if is_data_exception(&e) => {
                // The RELEASE behind it failed in the aborted transaction; back to the mark.
                c.batch_execute(&undo).await?;
                match before {
                    Some(st) => {
                        threads.insert(&nm.thread, st);
                    }
                    None => {
                        threads.remove(&*nm.thread);
                    }
                }
                stored.forget(nm);
                out.push(Appended::Refused(Refusal::InvalidText));
            }
            Err(e) => return Err(e.into()),
        }
    }
    c.batch_execute("COMMIT").await?;
    Ok((out, last))
}

/// Resolve a batch in order against what is stored (see the module doc): the outcomes, what to
/// write, and the counter's new value. Pure, so the rules are tested without a database.
fn resolve<'a>(
    batch: &'a [NewMessage],
    threads: &mut HashMap<&'a str, ThreadState<'a>>,
    stored: &mut Stored,
    last_id: i64,
) -> std::result::Result<(Vec<Appended>, WriteSet<'a>, i64), Fail> {
    let mut next = last_id;
    let mut take_id = || -> std::result::Result<i64, Fail> {
        next = next
            .checked_add(1)
            .ok_or_else(|| Fail::Bad("the id sequence is exhausted".into()))?;
        Ok(next)
    };
    let mut out = Vec::with_capacity(batch.len());
    let mut w = WriteSet::default();
    for nm in batch {
        // Checked here, before any SQL: PostgreSQL text cannot hold it, and one such entry
        // would fail the whole batch's statement.
        if nm.has_nul() {
            out.push(Appended::Refused(Refusal::InvalidText));
            continue;
        }
        let key = nm
            .client_msg_id
            .as_ref()
            .map(|c| (nm.sender.clone(), c.clone()));
        if let Some(m) = key.as_ref().and_then(|k| stored.by_key.get(k)) {
            out.push(Appended::Duplicate(m.clone()));
            continue;
        }
        // The shard's id for the message: the same one again is the same message (a retried
        // batch), never a second row.
        if let Some(m) = stored.by_server_id.get(&nm.server_msg_id) {
            out.push(Appended::Duplicate(m.clone()));
            continue;
        }
        let st = match threads.entry(&*nm.thread) {
            Entry::Occupied(e) => {
                let st = e.into_mut();
                let allowed = match &nm.to {
                    // A DM only into the pair's own direct thread (see `store::Store`).
                    Some(to) => st.direct && st.is_pair(&nm.sender, to),
                    None => st.has(&nm.sender),
                };
                if !allowed {
                    out.push(Appended::Refused(Refusal::NotParticipant));
                    continue;
                }
                st
            }
            Entry::Vacant(e) => {
                let Some(to) = &nm.to else {
                    out.push(Appended::Refused(Refusal::UnknownThread));
                    continue;
                };
                if is_numeric_id(&nm.thread) {
                    out.push(Appended::Refused(Refusal::NumericThreadId));
                    continue;
                }
                let mut users: Vec<&'a str> = vec![&*nm.sender, &**to];
                users.sort_unstable();
                users.dedup();
                e.insert(ThreadState {
                    nid: take_id()?,
                    last_seq: 0,
                    users: users.iter().map(|u| Arc::from(*u)).collect(),
                    direct: true,
                    created: Some((users, i64_of(nm.sent_at_ms))),
                })
            }
        };
        let id = take_id()?;
        st.last_seq += 1;
        let message = Message {
            id: id as u64,
            seq: st.last_seq as u64,
            thread: nm.thread.clone(),
            thread_numeric_id: st.nid as u64,
            server_msg_id: nm.server_msg_id,
            event_id: nm.event_id,
            sender: nm.sender.clone(),
            to: nm.to.clone(),
            client_msg_id: nm.client_msg_id.clone(),
            content: nm.content.clone(),
            attachment_url: nm.attachment_url.clone(),
            sent_at_ms: nm.sent_at_ms,
        };
        w.m_id.push(id);
        w.m_nid.push(st.nid);
        w.m_seq.push(st.last_seq);
        w.m_smid.push(uuid_text(nm.server_msg_id));
        w.m_eid.push(uuid_text(nm.event_id));
        w.m_sender.push(&nm.sender);
        w.m_recipient.push(nm.to.as_deref());
        w.m_cmid.push(nm.client_msg_id.as_deref());
        w.m_content.push(&nm.content);
        w.m_attachment.push(nm.attachment_url.as_deref());
        w.m_sent_at.push(i64_of(nm.sent_at_ms));
        let participants = st.users.to_vec();
        if let Some(k) = key {
            stored.by_key.insert(k, message.clone());
        }
        stored
            .by_server_id
            .insert(nm.server_msg_id, message.clone());
        out.push(Appended::New {
            message,
            participants,
        });
    }
    for (text, st) in threads.iter() {
        // A thread is only created with the message that creates it.
        if let Some((users, created_at_ms)) = &st.created {
            w.t_id.push(text);
            w.t_nid.push(st.nid);
            w.t_created.push(*created_at_ms);
            for user in users {
                w.p_nid.push(st.nid);
                w.p_user.push(user);
            }
        }
    }
    Ok((out, w, next))
}

impl PgStore {
    /// Connect (the pool opens connections as calls need them; this one checks the database is
    /// reachable), then apply the schema migrations this build knows and the database lacks.
    /// Errors say what to fix: a bad URL or setting, an unreachable server, a schema newer
    /// than this build.
    pub async fn connect(cfg: PgConfig) -> Result<PgStore> {
        cfg.check().map_err(StoreError::Unavailable)?;
        let pg = cfg.pg_config().map_err(StoreError::Unavailable)?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // Only "is it closed": a broken connection fails its first statement and is
                // not returned (see Checkout); a test query per checkout would cost a round
                // trip per batch.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .wait_timeout(Some(cfg.pool_wait_timeout))
            .create_timeout(Some(cfg.pool_create_timeout()))
            .recycle_timeout(Some(cfg.pool_recycle_timeout))
            .queue_mode(QueueMode::Fifo)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL pool: {e}")))?;
        let store = PgStore {
            pool,
            cfg,
            cache: Mutex::new(ThreadCache {
                epoch: None,
                threads: HashMap::new(),
                guess: false,
            }),
            retries: AtomicU64::new(0),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// How many appends met a stored copy of one of their messages (a client's retry) and ran a
    /// second transaction to find it, since start (a metric: a high rate costs throughput).
    pub fn append_retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// [`PgConfig::threads_per_read_max`] as a parameter.
    fn threads_per_read(&self) -> i64 {
        i64::try_from(self.cfg.threads_per_read_max).unwrap_or(i64::MAX)
    }

    /// The pool's size, idle connections and waiting callers (for `/ready` and metrics).
    pub fn pool_status(&self) -> Status {
        self.pool.status()
    }

    /// Apply the missing migrations, one transaction each, under the migration advisory lock.
    async fn migrate(&self) -> Result<()> {
        let deadline = Instant::now() + self.cfg.migration_timeout;
        let obj = match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => return Err(pool_error(e)),
            Err(_) => return Err(StoreError::Timeout),
        };
        // On any failure the connection is closed rather than pooled: that releases the
        // session's advisory lock and whatever transaction was open.
        let mut checkout = Checkout {
            obj: Some(obj),
            keep: false,
        };
        let Some(c) = checkout.obj.as_ref() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        let ms = self.cfg.migration_timeout.as_millis().max(1);
        let applied = match timeout_at(deadline, migrate_on(c, ms)).await {
            Ok(Ok(applied)) => applied,
            Ok(Err(e)) => return Err(e.into_store()),
            Err(_) => return Err(StoreError::Timeout),
        };
        checkout.keep = true;
        for m in applied {
            tracing::info!(
                version = m.version,
                name = m.name,
                "message store: applied PostgreSQL schema migration"
            );
        }
        Ok(())
    }

    /// Run one call on a pooled connection within [`PgConfig::call_timeout`] (see
    /// [`Checkout`] for what happens to the connection when it fails).
    async fn run<R>(
        &self,
        f: impl AsyncFnOnce(&Object) -> std::result::Result<R, Fail>,
    ) -> Result<R> {
        let deadline = Instant::now() + self.cfg.call_timeout;
        let obj = match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => return Err(pool_error(e)),
            Err(_) => return Err(StoreError::Timeout),
        };
        let mut checkout = Checkout {
            obj: Some(obj),
            keep: false,
        };
        let Some(c) = checkout.obj.as_ref() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        match timeout_at(deadline, f(c)).await {
            Ok(Ok(r)) => {
                checkout.keep = true;
                Ok(r)
            }
            Ok(Err(fail)) => {
                let err = fail.into_store();
                // The failure may have left a transaction open (aborted): end it before the
                // connection is reused; outside one, ROLLBACK only warns.
                if !c.is_closed() {
                    let until = deadline.max(Instant::now() + ROLLBACK_TIMEOUT);
                    if let Ok(Ok(())) = timeout_at(until, c.batch_execute("ROLLBACK")).await {
                        checkout.keep = true;
                    }
                }
                Err(err)
            }
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

/// The migrations, on one connection; returns those it applied.
async fn migrate_on(
    c: &Object,
    timeout_ms: u128,
) -> std::result::Result<Vec<&'static Migration>, Fail> {
    c.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
        .await?;
    c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await?;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS switchboard_schema_migrations ( \
           version integer PRIMARY KEY, \
           name text NOT NULL, \
           applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let rows = c
        .query(
            "SELECT version, name FROM switchboard_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut done = HashSet::new();
    for row in &rows {
        let version: i32 = get(row, 0)?;
        let name: &str = get(row, 1)?;
        match MIGRATIONS.iter().find(|m| m.version == version) {
            Some(m) if m.name == name => {
                done.insert(version);
            }
            Some(m) => {
                return Err(Fail::Bad(format!(
                    "schema migration {version} is recorded as {name:?} but this build calls \
                     it {:?}: the database was migrated by another program",
                    m.name
                )))
            }
            None => {
                return Err(Fail::Bad(format!(
                    "the database schema has migration {version} ({name:?}), newer than this \
                     build knows (up to {SCHEMA_VERSION}): run a newer switchboard"
                )))
            }
        }
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        c.batch_execute(BEGIN).await?;
        c.batch_execute(m.sql).await?;
        c.execute(
            "INSERT INTO switchboard_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        c.batch_execute("COMMIT").await?;
        applied.push(m);
    }
    c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await?;
    c.batch_execute("RESET statement_timeout").await?;
    Ok(applied)
}

/// A numeric thread id for SQL: `None` when it cannot exist.
fn thread_number(r: &ThreadRef) -> (&str, Option<i64>) {
    match r {
        ThreadRef::Id(id) => (id, None),
        ThreadRef::IdOrNumber(id, n) => (id, i64::try_from(*n).ok()),
    }
}

fn empty_page<T>() -> Page<T> {
    Page {
        items: Vec::new(),
        next: None,
    }
}

/// A page's items and the `next` key of its last item, from `limit + 1` fetched rows.
fn paged<T>(mut items: Vec<T>, limit: usize, key: impl Fn(&T) -> u64) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next }
}

/// The batch's dedup keys as parameters of [`APPEND_STORED`]: senders and client ids of the
/// entries that have one, and every server id.
fn stored_keys(batch: &[NewMessage]) -> (Vec<&str>, Vec<&str>, Vec<String>) {
    let (mut senders, mut cmids) = (Vec::new(), Vec::new());
    // An entry with a NUL is refused before any lookup (and its texts are no parameter).
    for m in batch.iter().filter(|m| !m.has_nul()) {
        if let Some(c) = &m.client_msg_id {
            senders.push(&*m.sender);
            cmids.push(&**c);
        }
    }
    let server_ids = batch.iter().map(|m| uuid_text(m.server_msg_id)).collect();
    (senders, cmids, server_ids)
}

/// The rows of [`APPEND_THREADS`], keyed by the batch's own copy of each id (`thread_ids`,
/// sorted), which the writes borrow.
fn thread_states<'a>(
    thread_ids: &[&'a str],
    rows: Vec<Row>,
) -> std::result::Result<HashMap<&'a str, ThreadState<'a>>, Fail> {
    let mut threads = HashMap::with_capacity(thread_ids.len());
    for row in rows {
        let text: &str = get(&row, 0)?;
        let Ok(i) = thread_ids.binary_search(&text) else {
            return Err(Fail::Bad(format!("thread {text:?} was not asked for")));
        };
        let users: Vec<String> = get(&row, 3)?;
        let mut users: Vec<Arc<str>> = users.into_iter().map(arc).collect();
        users.sort_unstable();
        threads.insert(
            thread_ids[i],
            ThreadState {
                nid: get(&row, 1)?,
                last_seq: get(&row, 2)?,
                users: users.into(),
                direct: get(&row, 4)?,
                created: None,
            },
        );
    }
    Ok(threads)
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// Optimistic first: the batch is resolved without asking for stored copies of its keys
    /// (a retried send is rare), and the write's unique keys catch one; only then is the batch
    /// resolved again, in a second transaction, with the stored copies. Threads the
    /// `ThreadCache` knows are not looked up when its guess holds (see the module doc).
    ///
    /// Entries with a NUL are refused in Rust before any SQL ([`Refusal::InvalidText`]). Should
    /// the server still refuse the batch's data (SQLSTATE class 22), the batch runs once more,
    /// entry by entry in one transaction (each under a savepoint, one round trip each): the
    /// entries it refuses are [`Refusal::InvalidText`], the others commit together. At most
    /// one such split per call, so the call stays atomic and bounded.
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        debug_assert!(
            batch.len() <= APPEND_BATCH_MAX,
            "the bridge batches at most APPEND_BATCH_MAX"
        );
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // An entry with a NUL is refused before any lookup: its texts are no parameter.
        let mut thread_ids: Vec<&str> = batch
            .iter()
            .filter(|m| !m.has_nul())
            .map(|m| &*m.thread)
            .collect();
        thread_ids.sort_unstable();
        thread_ids.dedup();
        self.run(async |c| {
            let lock = prepare(c, &LOCK_IDS).await?;
            let threads_q = prepare(c, &APPEND_THREADS).await?;
            let write_q = prepare(c, &APPEND_WRITE).await?;
            let mut probe = false;
            let mut split = false;
            loop {
                let (senders, cmids, server_ids) = if probe {
                    stored_keys(batch)
                } else {
                    Default::default()
                };
                let stored_q = match probe {
                    true => Some(prepare(c, &APPEND_STORED).await?),
                    false => None,
                };
                // The cache's guess: its epoch, the batch's threads it holds, the others.
                let (guess, hits, misses) = {
                    let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    let mut hits: Vec<(&str, Cached)> = Vec::new();
                    let mut misses: Vec<&str> = Vec::new();
                    let guess = cache.epoch.filter(|_| cache.guess);
                    for id in &thread_ids {
                        match cache.threads.get(*id).filter(|_| guess.is_some()) {
                            Some(hit) => hits.push((id, hit.clone())),
                            None => misses.push(id),
                        }
                    }
                    (guess, hits, misses)
                };
                // Round trip 1, pipelined in this order (`biased` polls them in order, and each
                // sends its request on its first poll).
                let threads_p: [&(dyn ToSql + Sync); 1] = [&misses];
                let stored_p: [&(dyn ToSql + Sync); 3] = [&senders, &cmids, &server_ids];
                let (begun, counter, thread_rows, stored_rows) = tokio::join!(
                    biased;
                    c.batch_execute(BEGIN),
                    c.query_one(&lock, &[]),
                    c.query(&threads_q, &threads_p),
                    async {
                        match &stored_q {
                            Some(q) => c.query(q, &stored_p).await,
                            None => Ok(Vec::new()),
                        }
                    },
                );
                begun?;
                let last_id: i64 = get(&counter?, 0)?;
                let mut threads = thread_states(&thread_ids, thread_rows?)?;
                let held = {
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    cache.guess = cache.epoch == Some(last_id);
                    guess == Some(last_id)
                };
                if held {
                    threads.extend(hits.into_iter().map(|(id, h)| {
                        let state = ThreadState {
                            nid: h.nid,
                            last_seq: h.last_seq,
                            users: h.users,
                            direct: h.direct,
                            created: None,
                        };
                        (id, state)
                    }));
                } else if !hits.is_empty() {
                    // Another writer came in between: look the remembered ones up too.
                    let ids: Vec<&str> = hits.iter().map(|(id, _)| *id).collect();
                    let rows = c.query(&threads_q, &[&ids]).await?;
                    threads.extend(thread_states(&thread_ids, rows)?);
                }
                let mut stored = Stored::default();
                for row in stored_rows? {
                    let m = message_at(&row, 0)?;
                    if let Some(cmid) = &m.client_msg_id {
                        stored
                            .by_key
                            .insert((m.sender.clone(), cmid.clone()), m.clone());
                    }
                    stored.by_server_id.insert(m.server_msg_id, m);
                }
                let (out, counter) = if split {
                    // Entry by entry (see the doc above); commits.
                    split_writes(c, &write_q, batch, &mut threads, &mut stored, last_id).await?
                } else {
                    let (out, w, counter) = resolve(batch, &mut threads, &mut stored, last_id)?;
                    if w.m_id.is_empty() {
                        c.batch_execute("COMMIT").await?;
                        return Ok(out);
                    }
                    // Round trip 2: the writes and the commit, pipelined.
                    let params = write_params(&w, &counter);
                    let (written, committed) = tokio::join!(
                        biased;
                        c.execute(&write_q, &params),
                        c.batch_execute("COMMIT"),
                    );
                    match written {
                        // A key is stored already: the COMMIT behind it rolled back; again,
                        // asking.
                        Err(e) if !probe && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                            committed?;
                            probe = true;
                            self.retries.fetch_add(1, Ordering::Relaxed);
                            // Mostly a retried send; if it was a (thread, seq) clash instead,
                            // the cache misled, so the second try looks everything up.
                            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                            cache.epoch = None;
                            continue;
                        }
                        // The server refused some entry's data (rolled back): once more, entry
                        // by entry, asking for stored keys (a retried send may be among them).
                        Err(e) if is_data_exception(&e) => {
                            committed?;
                            split = true;
                            probe = true;
                            continue;
                        }
                        written => {
                            written?;
                            committed?;
                        }
                    }
                    (out, counter)
                };
                let states = threads.iter().map(|(id, st)| {
                    let state = Cached {
                        nid: st.nid,
                        last_seq: st.last_seq,
                        users: st.users.clone(),
                        direct: st.direct,
                    };
                    (*id, state)
                });
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .committed(last_id, counter, states);
                return Ok(out);
            }
        })
        .await
    }

    async fn create_thread(&self, new: &NewThread) -> Result<Created> {
        // Before any SQL, as the in-memory store checks them.
        if new.has_nul() {
            return Ok(Created::Refused(Refusal::InvalidText));
        }
        if new.id.as_deref().is_some_and(is_numeric_id) {
            return Ok(Created::Refused(Refusal::NumericThreadId));
        }
        let id: Arc<str> = match &new.id {
            Some(id) => id.clone(),
            None => Arc::from(uuid_text(uuid::Uuid::now_v7().as_u128())),
        };
        let mut users: Vec<Arc<str>> = new.participants.clone();
        users.push(new.creator.clone());
        users.sort_unstable();
        users.dedup();
        if new.kind == ThreadKind::Direct && users.len() > 2 {
            return Ok(Created::Refused(Refusal::NotParticipant));
        }
        // The REST layer refuses more; a store keeps its bound whatever it is handed (the
        // creator always stays).
        if users.len() > THREAD_PARTICIPANTS_MAX {
            users.retain(|u| *u == new.creator);
            let others = new
                .participants
                .iter()
                .filter(|u| **u != new.creator)
                .collect::<std::collections::BTreeSet<_>>();
            users.extend(
                others
                    .into_iter()
                    .take(THREAD_PARTICIPANTS_MAX - 1)
                    .cloned(),
            );
            users.sort_unstable();
        }
        let title: Option<Arc<str>> = new.title.as_ref().map(|t| {
            if t.len() <= THREAD_TITLE_BYTES_MAX {
                return t.clone();
            }
            let mut end = THREAD_TITLE_BYTES_MAX;
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            Arc::from(&t[..end])
        });
        let user_texts: Vec<&str> = users.iter().map(|u| &**u).collect();
        let created_at = i64_of(new.created_at_ms);
        let kind_text = new.kind.as_str();
        let nid = self
            .run(async |c| {
                let lock = prepare(c, &LOCK_IDS).await?;
                let create = prepare(c, &CREATE_THREAD).await?;
                let (id_text, title_text) = (&*id, title.as_deref());
                let params: [&(dyn ToSql + Sync); 5] =
                    [&id_text, &title_text, &created_at, &user_texts, &kind_text];
                let (begun, locked, created, committed) = tokio::join!(
                    biased;
                    c.batch_execute(BEGIN),
                    c.query_one(&lock, &[]),
                    c.query_opt(&create, &params),
                    c.batch_execute("COMMIT"),
                );
                begun?;
                let start: i64 = get(&locked?, 0)?;
                let created = match created {
                    // The server refused its data (the checks above make this unlikely): the
                    // request's fault; the COMMIT behind it rolled back.
                    Err(e) if is_data_exception(&e) => {
                        committed?;
                        return Ok(Err(Refusal::InvalidText));
                    }
                    created => created?,
                };
                committed?;
                let Some(row) = created else {
                    return Ok(Ok(None));
                };
                let nid: i64 = get(&row, 0)?;
                let state = Cached {
                    nid,
                    last_seq: 0,
                    users: users.iter().cloned().collect(),
                    direct: new.kind == ThreadKind::Direct,
                };
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .committed(start, nid, std::iter::once((&*id, state)));
                Ok(Ok(Some(u64_of(nid, "thread id")?)))
            })
            .await?;
        let nid = match nid {
            Ok(nid) => nid,
            Err(refusal) => return Ok(Created::Refused(refusal)),
        };
        match nid {
            Some(numeric_id) => Ok(Created::New(ThreadView {
                id,
                numeric_id,
                kind: new.kind,
                title,
                participants: users,
                created_at_ms: new.created_at_ms,
                last_seq: 0,
                last_message: None,
                read_seq: 0,
                unread: 0,
            })),
            None => {
                let found = self.thread(&new.creator, &ThreadRef::Id(id)).await?;
                Ok(Created::Exists(match found {
                    // A direct create finds only the pair's own direct thread.
                    Lookup::Found(v)
                        if new.kind == ThreadKind::Direct
                            && (v.kind != ThreadKind::Direct || v.participants != users) =>
                    {
                        Lookup::Forbidden
                    }
                    other => other,
                }))
            }
        }
    }

    async fn threads(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<ThreadView>> {
        // No stored text holds a NUL (nor can a parameter): nothing to find.
        if has_nul(user) {
            return Ok(empty_page());
        }
        let limit = page_limit(limit);
        let before = before.map_or(i64::MAX, i64_of);
        let fetch = (limit + 1) as i64;
        let unread_max = UNREAD_COUNT_MAX as i64;
        let threads_max = self.threads_per_read();
        self.run(async |c| {
            let q = prepare(c, &THREADS).await?;
            let rows = c
                .query(&q, &[&user, &before, &fetch, &unread_max, &threads_max])
                .await?;
            let mut items = Vec::with_capacity(rows.len());
            for row in &rows {
                let (view, _) = thread_view_at(row)?;
                let activity = u64_of(get(row, THREAD_VIEW_COLUMNS)?, "activity")?;
                items.push((view, activity));
            }
            let page = paged(items, limit, |(_, activity)| *activity);
            Ok(Page {
                items: page.items.into_iter().map(|(v, _)| v).collect(),
                next: page.next,
            })
        })
        .await
    }

    async fn co_participants(
        &self,
        user: &str,
        threads_max: usize,
        limit: usize,
    ) -> Result<crate::store::CoParticipants> {
        if has_nul(user) {
            return Ok(crate::store::CoParticipants {
                users: Vec::new(),
                truncated: false,
            });
        }
        let threads = i64::try_from(threads_max).unwrap_or(i64::MAX - 1);
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        self.run(async |c| {
            let q = prepare(c, &CO_PARTICIPANTS).await?;
            let rows = c.query(&q, &[&user, &threads, &fetch]).await?;
            let mut users = Vec::with_capacity(rows.len().min(limit));
            let mut truncated = false;
            for row in &rows {
                let n: i64 = get(row, 2)?;
                truncated |= n > threads;
                if users.len() == limit {
                    truncated = true;
                    break;
                }
                users.push(arc(get::<String>(row, 0)?));
            }
            Ok(crate::store::CoParticipants { users, truncated })
        })
        .await
    }

    async fn thread(&self, user: &str, thread: &ThreadRef) -> Result<Lookup<ThreadView>> {
        let (text, number) = thread_number(thread);
        if has_nul(user) || has_nul(text) {
            return Ok(Lookup::NotFound);
        }
        let unread_max = UNREAD_COUNT_MAX as i64;
        self.run(async |c| {
            let q = prepare(c, &THREAD).await?;
            let row = c
                .query_opt(&q, &[&user, &text, &number, &unread_max])
                .await?;
            let Some(row) = row else {
                return Ok(Lookup::NotFound);
            };
            match thread_view_at(&row)? {
                (view, true) => Ok(Lookup::Found(view)),
                (_, false) => Ok(Lookup::Forbidden),
            }
        })
        .await
    }

    async fn messages(
        &self,
        user: &str,
        thread: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Lookup<Page<Message>>> {
        let limit = page_limit(limit);
        let (text, number) = thread_number(thread);
        if has_nul(user) || has_nul(text) {
            return Ok(Lookup::NotFound);
        }
        let before = before.map_or(i64::MAX, i64_of);
        let fetch = (limit + 1) as i64;
        self.run(async |c| {
            let q = prepare(c, &MESSAGES).await?;
            let rows = c
                .query(&q, &[&user, &text, &number, &before, &fetch])
                .await?;
            let Some(first) = rows.first() else {
                return Ok(Lookup::NotFound);
            };
            if !get::<bool>(first, 0)? {
                return Ok(Lookup::Forbidden);
            }
            let mut items = Vec::with_capacity(rows.len());
            for row in &rows {
                if get::<Option<i64>>(row, 1)?.is_some() {
                    items.push(message_at(row, 1)?);
                }
            }
            Ok(Lookup::Found(paged(items, limit, |m| m.seq)))
        })
        .await
    }

    async fn mark(&self, req: &MarkRequest) -> Result<Lookup<Marked>> {
        if has_nul(&req.user) || req.thread.as_deref().is_some_and(has_nul) {
            return Ok(Lookup::NotFound);
        }
        let named = &req.messages[..req.messages.len().min(MARK_IDS_MAX)];
        let mut numbers = Vec::new();
        let mut server_ids = Vec::new();
        for r in named {
            match *r {
                MessageRef::Number(n) => {
                    if let Ok(n) = i64::try_from(n) {
                        numbers.push(n);
                    }
                }
                MessageRef::ServerId(s) => server_ids.push(uuid_text(s)),
            }
        }
        let user: &str = &req.user;
        let named_thread: Option<&str> = req.thread.as_deref();
        let update = match req.mark {
            Mark::Read => &MARK_READ,
            Mark::Delivered => &MARK_DELIVERED,
        };
        self.run(async |c| {
            let find = prepare(c, &MARK_FIND).await?;
            let by_text = prepare(c, &MARK_THREAD).await?;
            let update = prepare(c, update).await?;
            let find_p: [&(dyn ToSql + Sync); 3] = [&numbers, &server_ids, &user];
            let (found, thread_row) = tokio::join!(
                biased;
                c.query(&find, &find_p),
                async {
                    match named_thread {
                        Some(t) => c.query_opt(&by_text, &[&t, &user]).await,
                        None => Ok(None),
                    }
                },
            );
            let mut stored = Vec::new();
            for row in found? {
                let member: bool = get(&row, MESSAGE_COLUMNS)?;
                stored.push((message_at(&row, 0)?, member));
            }
            // The named messages in request order, once each.
            let mut in_order: Vec<&(Message, bool)> = Vec::new();
            for r in named {
                let hit = stored.iter().find(|(m, _)| match *r {
                    MessageRef::Number(n) => m.id == n,
                    MessageRef::ServerId(s) => m.server_msg_id == s,
                });
                if let Some(hit) = hit {
                    if !in_order.iter().any(|(m, _)| m.id == hit.0.id) {
                        in_order.push(hit);
                    }
                }
            }
            let (nid, member) = match named_thread {
                Some(_) => match thread_row? {
                    Some(row) => (get::<i64>(&row, 0)?, get::<bool>(&row, 1)?),
                    None => return Ok(Lookup::NotFound),
                },
                None => match in_order.first() {
                    Some((m, member)) => (i64_of(m.thread_numeric_id), *member),
                    None => return Ok(Lookup::NotFound),
                },
            };
            if !member {
                return Ok(Lookup::Forbidden);
            }
            let messages: Vec<Message> = in_order
                .into_iter()
                .filter(|(m, _)| i64_of(m.thread_numeric_id) == nid)
                .map(|(m, _)| m.clone())
                .collect();
            let (Some(up_to), Some(first)) =
                (messages.iter().map(|m| m.seq).max(), messages.first())
            else {
                return Ok(Lookup::NotFound);
            };
            let (thread, thread_numeric_id) = (first.thread.clone(), first.thread_numeric_id);
            let row = c.query_opt(&update, &[&nid, &user, &i64_of(up_to)]).await?;
            let Some(row) = row else {
                // Not a participant after all (cannot happen: participants are never removed).
                return Ok(Lookup::Forbidden);
            };
            Ok(Lookup::Found(Marked {
                thread,
                thread_numeric_id,
                up_to_seq: u64_of(get(&row, 0)?, "read state")?,
                messages,
            }))
        })
        .await
    }

    async fn sync(&self, user: &str, since: Option<u64>, limit: usize) -> Result<SyncPage> {
        if has_nul(user) {
            return Ok(SyncPage {
                messages: Vec::new(),
                cursor: since.unwrap_or(0),
                more: false,
                truncated: false,
            });
        }
        let limit = page_limit(limit);
        let threads_max = self.threads_per_read();
        self.run(async |c| match since {
            Some(since) => {
                let q = prepare(c, &SYNC_SINCE).await?;
                let fetch = (limit + 1) as i64;
                let rows = c
                    .query(&q, &[&user, &i64_of(since), &fetch, &threads_max])
                    .await?;
                let mut messages = rows
                    .iter()
                    .map(|r| message_at(r, 0))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let more = messages.len() > limit;
                messages.truncate(limit);
                Ok(SyncPage {
                    cursor: messages.last().map_or(since, |m| m.id),
                    messages,
                    more,
                    truncated: false,
                })
            }
            None => {
                let q = prepare(c, &SYNC_LATEST).await?;
                let rows = c.query(&q, &[&user, &(limit as i64), &threads_max]).await?;
                let mut messages = rows
                    .iter()
                    .map(|r| message_at(r, 0))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                messages.reverse();
                Ok(SyncPage {
                    cursor: messages.last().map_or(0, |m| m.id),
                    messages,
                    more: false,
                    truncated: false,
                })
            }
        })
        .await
    }

    async fn store_notification(&self, n: &NewNotification) -> Result<Noted> {
        // Before any SQL, as the in-memory store checks it.
        if n.has_nul() {
            return Ok(Noted::Refused(Refusal::InvalidText));
        }
        let params = (
            &*n.user,
            &*n.kind,
            &*n.data_json,
            n.source_key.as_deref(),
            i64_of(n.created_at_ms),
        );
        self.run(async |c| {
            let q = prepare(c, &ADD_NOTIFICATION).await?;
            let rows = match c
                .query(&q, &[&params.0, &params.1, &params.2, &params.3, &params.4])
                .await
            {
                // The server refused its data (the check above makes this unlikely).
                Err(e) if is_data_exception(&e) => return Ok(Noted::Refused(Refusal::InvalidText)),
                rows => rows?,
            };
            if let Some(row) = rows.first() {
                let stored = notification_at(row)?;
                return Ok(match get::<bool>(row, 7)? {
                    true => Noted::New(stored),
                    false => Noted::Exists(stored),
                });
            }
            // Another node inserted the same key while this statement ran: read it now.
            let q = prepare(c, &NOTIFICATION_BY_KEY).await?;
            match c.query_opt(&q, &[&params.0, &params.3]).await? {
                Some(row) => Ok(Noted::Exists(notification_at(&row)?)),
                None => Err(Fail::Bad(
                    "a notification key conflicted but is not stored".into(),
                )),
            }
        })
        .await
    }

    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        if has_nul(user) {
            return Ok(empty_page());
        }
        let limit = page_limit(limit);
        let before = before.map_or(i64::MAX, i64_of);
        let fetch = (limit + 1) as i64;
        let sql = if unread_only {
            &NOTIFICATIONS_UNREAD
        } else {
            &NOTIFICATIONS
        };
        self.run(async |c| {
            let q = prepare(c, sql).await?;
            let rows = c.query(&q, &[&user, &before, &fetch]).await?;
            let items = rows
                .iter()
                .map(notification_at)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(paged(items, limit, |n| n.id))
        })
        .await
    }

    async fn notification_read(&self, user: &str, id: u64) -> Result<Lookup<Notification>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(Lookup::NotFound);
        };
        if has_nul(user) {
            return Ok(Lookup::NotFound);
        }
        self.run(async |c| {
            let q = prepare(c, &NOTIFICATION_READ).await?;
            match c.query_opt(&q, &[&user, &id]).await? {
                Some(row) => Ok(Lookup::Found(notification_at(&row)?)),
                None => Ok(Lookup::NotFound),
            }
        })
        .await
    }

    async fn notifications_read_all(&self, user: &str) -> Result<u64> {
        if has_nul(user) {
            return Ok(0);
        }
        self.run(async |c| {
            let q = prepare(c, &NOTIFICATIONS_READ_ALL).await?;
            Ok(c.execute(&q, &[&user]).await?)
        })
        .await
    }

    async fn mark_produced(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        self.run(async |c| {
            let q = prepare(c, &MARK_PRODUCED).await?;
            c.execute(&q, &[&ids]).await?;
            Ok(())
        })
        .await
    }

    async fn produced(&self, ids: &[u64]) -> Result<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let found: Vec<i64> = self
            .run(async |c| {
                let q = prepare(c, &PRODUCED_OF).await?;
                let rows = c.query(&q, &[&wanted]).await?;
                Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            })
            .await?;
        let found: std::collections::HashSet<i64> = found.into_iter().collect();
        Ok(ids.iter().map(|&i| found.contains(&(i as i64))).collect())
    }

    async fn ping(&self) -> Result<()> {
        self.run(async |c| Ok(c.batch_execute("SELECT 1").await?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm(thread: &str, from: &str, to: Option<&str>, cmid: Option<&str>, sid: u128) -> NewMessage {
        NewMessage {
            server_msg_id: sid,
            event_id: sid + 1_000_000,
            thread: Arc::from(thread),
            sender: Arc::from(from),
            to: to.map(Arc::from),
            client_msg_id: cmid.map(Arc::from),
            content: Arc::from("x"),
            attachment_url: None,
            sent_at_ms: 5,
        }
    }

    #[test]
    fn resolve_orders_dedups_and_refuses_in_batch_order() {
        let batch = vec![
            dm("t", "al", Some("bo"), Some("1"), 1),
            dm("t", "cy", Some("al"), Some("2"), 2),
            dm("t", "bo", Some("al"), Some("1"), 3),
            dm("t", "al", Some("bo"), Some("1"), 4),
            dm("u", "al", None, None, 5),
            dm("t", "al", Some("bo"), None, 1),
        ];
        let (out, w, last) =
            resolve(&batch, &mut HashMap::new(), &mut Stored::default(), 10).unwrap();
        // Thread 11, then messages 12 and 13; the refusals and duplicates take nothing.
        let new: Vec<(u64, u64)> = out
            .iter()
            .filter_map(|o| match o {
                Appended::New { message, .. } => Some((message.id, message.seq)),
                _ => None,
            })
            .collect();
        assert_eq!(new, [(12, 1), (13, 2)]);
        assert_eq!(out[1], Appended::Refused(Refusal::NotParticipant));
        assert!(matches!(&out[3], Appended::Duplicate(m) if m.id == 12));
        assert_eq!(out[4], Appended::Refused(Refusal::UnknownThread));
        assert!(
            matches!(&out[5], Appended::Duplicate(m) if m.id == 12),
            "same server id"
        );
        assert_eq!(last, 13);
        assert_eq!((w.t_id.clone(), w.t_nid.clone()), (vec!["t"], vec![11]));
        assert_eq!(
            (w.p_nid.clone(), w.p_user.clone()),
            (vec![11, 11], vec!["al", "bo"])
        );
        assert_eq!(w.m_seq, [1, 2]);
    }

    #[test]
    fn resolve_continues_stored_threads() {
        let mut threads = HashMap::new();
        threads.insert(
            "t",
            ThreadState {
                nid: 3,
                last_seq: 7,
                users: vec![Arc::from("al"), Arc::from("bo")].into(),
                direct: true,
                created: None,
            },
        );
        let batch = vec![
            dm("t", "bo", None, None, 1),
            dm("t", "al", Some("bo"), None, 2),
        ];
        let (out, w, last) = resolve(&batch, &mut threads, &mut Stored::default(), 20).unwrap();
        assert!(
            matches!(&out[1], Appended::New { message, .. } if message.seq == 9 && message.id == 22)
        );
        assert_eq!(last, 22);
        assert!(w.t_id.is_empty() && w.p_nid.is_empty());
        assert_eq!(
            (w.m_nid, w.m_seq, w.m_id),
            (vec![3, 3], vec![8, 9], vec![21, 22])
        );
    }

    #[test]
    fn cache_keeps_only_what_commits_prove() {
        let st = |seq| Cached {
            nid: 1,
            last_seq: seq,
            users: vec![Arc::from("al")].into(),
            direct: false,
        };
        let mut c = ThreadCache {
            epoch: None,
            threads: HashMap::new(),
            guess: false,
        };
        c.committed(5, 7, [("a", st(1))].into_iter());
        assert_eq!(c.epoch, Some(7));
        // Continues from its own epoch: keeps the rest.
        c.committed(7, 9, [("b", st(1))].into_iter());
        assert_eq!((c.epoch, c.threads.len()), (Some(9), 2));
        // Someone else committed in between (10..12): only this commit's threads are known.
        c.committed(12, 13, [("a", st(5))].into_iter());
        assert_eq!((c.epoch, c.threads.len()), (Some(13), 1));
        assert_eq!(c.threads["a"].last_seq, 5);
        // A commit that lands after a later one was recorded changes nothing.
        c.committed(8, 11, [("a", st(2))].into_iter());
        assert_eq!((c.epoch, c.threads["a"].last_seq), (Some(13), 5));
    }

    #[test]
    fn thread_lists_and_sync_read_a_bounded_set_of_threads() {
        // Each read takes the user's threads from a LIMITed scan of the participants index,
        // never all of them.
        for (q, param) in [(&THREADS, "$5"), (&SYNC_SINCE, "$4"), (&SYNC_LATEST, "$3")] {
            let bounded = format!(
                "FROM switchboard_participants q WHERE q.user_id = $1 ORDER BY q.thread_nid DESC LIMIT {param}"
            );
            let text: String = q.text.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(text.contains(&bounded), "{text}");
            assert_eq!(text.matches("switchboard_participants").count(), {
                // THREADS reads the participants again for each listed thread's members.
                if std::ptr::eq(q, &THREADS) {
                    2
                } else {
                    1
                }
            });
        }
        assert_eq!(
            PgConfig::new("postgres://h/db").threads_per_read_max,
            THREADS_PER_READ_MAX
        );
    }

    #[test]
    fn config_checks_and_urls() {
        let cfg = PgConfig::new("postgres://u:secret@127.0.0.1:5432/db");
        assert!(cfg.check().is_ok());
        let pg = cfg.pg_config().unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Disable);
        assert!(pg.get_options().unwrap().contains("statement_timeout=5000"));
        assert!(!format!("{cfg:?}").contains("secret"));
        let mut bad = cfg.clone();
        bad.statement_timeout = Duration::from_micros(10);
        assert!(bad.check().is_err());
        bad = cfg.clone();
        bad.pool_size = 0;
        assert!(bad.check().is_err());
        // The call deadline must outlast the server's statement timeout.
        bad = cfg.clone();
        bad.call_timeout = bad.statement_timeout;
        let why = bad.check().unwrap_err();
        assert!(
            why.contains(
                "call timeout (5000 ms) must be longer than the statement timeout (5000 ms)"
            ),
            "{why}"
        );
        bad.call_timeout = bad.statement_timeout + Duration::from_millis(500);
        assert!(bad.check().is_ok());
        // The pool's create timeout follows the connect timeout unless set apart.
        let mut c = cfg.clone();
        c.connect_timeout = Duration::from_millis(1500);
        assert_eq!(c.pool_create_timeout(), Duration::from_millis(1500));
        c.pool_create_timeout = Some(Duration::from_secs(7));
        assert_eq!(c.pool_create_timeout(), Duration::from_secs(7));
        c.pool_create_timeout = Some(Duration::ZERO);
        assert!(c.check().is_err());
        assert!(PgConfig::new("postgres://u@h/db?sslmode=require")
            .pg_config()
            .is_err());
        assert!(PgConfig::new("nonsense://").pg_config().is_err());
    }
}
