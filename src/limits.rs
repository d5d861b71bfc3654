//! Every fixed bound of the server, named once, with why it is what it is.
//!
//! Configurable limits live in [`crate::config::Config`]; these are the structural ones that a
//! deployment has no reason to change. Units come last in each name.

/// Most shards per node: the room and user directories keep a `u64` shard bitmap.
pub const SHARDS_MAX: usize = 64;

/// Messages waiting in one shard's inbox from other shards and the bridge. At ~64 B per message
/// this is 4 MiB per shard at worst; a full inbox is a policy decision counted in
/// `switchboard_cross_shard_dropped_total`, never a block.
pub const SHARD_INBOX_CAPACITY: usize = 65_536;

/// Messages waiting for the bridge thread (store jobs; room traffic too once clustered).
pub const BRIDGE_INBOX_CAPACITY: usize = 65_536;

/// mio events fetched per `poll` call.
pub const EVENTS_PER_POLL_MAX: usize = 1024;

/// io_uring backend: submission queue entries per shard ring. Each loop turn submits its
/// receives to arm, polls and cancels at once; a turn that queues more submits early.
pub const URING_SQ_ENTRIES: u32 = 1024;

/// io_uring backend: completion queue entries per shard ring (a receive, an accept or a poll
/// each take one). Past it the kernel keeps completions on its overflow list (no loss); the
/// shard reaps them all every turn.
pub const URING_CQ_ENTRIES: u32 = 16_384;

/// io_uring backend: receive buffers in the shard's provided buffer ring (a power of two,
/// at most 32,768). Every receive completion holds one until the shard has decoded it, in the
/// same turn; when the kernel finds none, the receive ends with ENOBUFS and is armed again
/// after the turn gives buffers back: nothing is lost.
pub const URING_BUFFERS: u16 = 1024;

/// io_uring backend: bytes per receive buffer. 1,024 x 4 KiB = 4 MiB per shard, resident
/// from the start, in place of epoll's single `read_buffer_size` buffer; a frame larger than
/// a buffer arrives in pieces and is reassembled as under epoll (`RxState::partial`).
pub const URING_BUFFER_BYTES: usize = 4096;

/// Connections accepted per listener readiness event before the loop turns (fairness).
pub const ACCEPTS_PER_TURN_MAX: usize = 256;

/// `recv` calls for one connection per readiness event; past this the connection is revisited
/// next turn so one fast sender cannot starve the shard.
pub const READS_PER_EVENT_MAX: usize = 4;

/// Inbox messages handled per loop turn before sockets get a turn again.
pub const INBOX_PER_TURN_MAX: usize = 4096;

/// iovecs gathered into one `sendmsg`. Linux IOV_MAX is 1024; past ~64 the gain is gone.
pub const IOVECS_PER_WRITE_MAX: usize = 64;

/// HTTP request headers parsed per upgrade request.
pub const HTTP_HEADERS_MAX: usize = 48;

/// Timer wheel: tick length and slot count (horizon = 51.2 s; later deadlines go round again).
pub const TIMER_TICK_MS: u64 = 100;
pub const TIMER_SLOTS: usize = 512;

/// Directory maps (papaya): old entries retired per thread before reclamation runs. Each
/// reclamation issues one `membarrier` (an IPI to every core; ~15 us in this VM) and every
/// subscribe, unsubscribe, connect and disconnect retires an entry, so seize's default of 32
/// cost one barrier per 32 of them. At 1024 the retired entries held per thread stay small
/// (a room or user entry is under 100 bytes).
pub const DIRECTORY_RECLAIM_BATCH: usize = 1024;
/// Directory maps: slots allocated up front (they grow, incrementally, past it).
pub const DIRECTORY_INITIAL_CAPACITY: usize = 1024;
/// Directory maps: entries moved per write while a resize is in progress (papaya's default).
pub const DIRECTORY_RESIZE_CHUNK: usize = 64;

/// How often a shard publishes its local counters to the shared metrics.
pub const STATS_PUBLISH_MS: u64 = 250;
/// Least time `websocket_messages_per_second` is measured over: a scrape sooner than this after
/// the last measurement repeats it (several scrapers, or a scrape right after start, would
/// otherwise divide a few frames by a few milliseconds).
pub const MESSAGE_RATE_WINDOW_MIN_MS: u64 = 1000;
/// Entries the `write_coalesce` heap may hold per client of the shard (stale ones included)
/// before frames are written at once instead of held.
pub const DEFERRED_PER_CLIENT_MAX: usize = 2;
/// Window over which a shard measures how busy it is (the `write_coalesce_min_rate` gate).
pub const LOAD_WINDOW_MS: u64 = 100;

/// Longest `clientMsgId`, `to`, `conversationId` and user id accepted, in bytes.
pub const ID_BYTES_MAX: usize = 256;

/// Longest `attachmentUrl`, in bytes.
pub const URL_BYTES_MAX: usize = 2048;

/// Longest `id` correlation value copied back to the client, in bytes of JSON.
pub const CORRELATION_ID_BYTES_MAX: usize = 128;

/// fds kept free when deriving max_connections, whatever the shard count: stdio, logs, the
/// HTTP probes in flight and backend sockets. Used only through [`fd_reserve`].
pub const FD_RESERVE: u64 = 64;
/// fds each shard holds besides its connections: listener, epoll, waker eventfd, and one
/// spare (the TLS listener's, when `tls_port` is set).
pub const FD_PER_SHARD: u64 = 4;

/// The one fd reserve: file descriptors that are not connections, for a node of `shards`
/// shards (`FD_RESERVE + FD_PER_SHARD * shards`; 72 for 2 shards). The server derives
/// max_connections as the soft RLIMIT_NOFILE minus this, `switchboard doctor` plans with it
/// (assuming one shard per core), and `switchboard_limit_max_connections` reports it.
pub fn fd_reserve(shards: usize) -> u64 {
    FD_RESERVE + FD_PER_SHARD * shards.clamp(1, SHARDS_MAX) as u64
}

/// A connection's receive state buffer is released once idle and larger than this.
pub const RX_RETAIN_BYTES_MAX: usize = 4096;

/// Send-queue slots retained after the queue drains (capacity above this is released).
pub const SEND_QUEUE_RETAIN_SLOTS: usize = 8;

/// Largest HTTP request body the server API reads by default, in bytes (an API call carries
/// one message or one small JSON command; a message is bounded far below this). Callers pass
/// it to `http::parse_request` as `body_max`; a larger Content-Length is answered 413 before
/// the body is read.
pub const HTTP_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest captured path segment (`{id}` in a route), decoded, in bytes: an id.
pub const HTTP_PATH_PARAM_BYTES_MAX: usize = ID_BYTES_MAX;
/// Captured segments per route pattern.
pub const HTTP_ROUTE_PARAMS_MAX: usize = 4;
/// Longest API key accepted for comparison, in bytes; longer ones are refused unread.
pub const HTTP_API_KEY_BYTES_MAX: usize = 256;
/// Configured CORS origins (each request compares against all of them).
pub const HTTP_CORS_ORIGINS_MAX: usize = 64;
/// `Access-Control-Max-Age` of a preflight answer: browsers cache it this long, in seconds.
pub const HTTP_CORS_MAX_AGE_S: u64 = 600;

// ---- typing and receipts
/// Typing states (room or conversation) one connection holds at once. A person types in one
/// place at a time; 16 covers a client that shows several drafts and bounds the per-connection
/// list the service scans on every `typing.*` command. Past it: `too many typing targets`.
pub const TYPING_TARGETS_PER_CONNECTION_MAX: usize = 16;
// ---- presence
/// Longest `text` of `presence.update`, in bytes (a status line, shown beside a name; every
/// watcher's copy of every change carries it).
pub const PRESENCE_TEXT_BYTES_MAX: usize = 256;
/// Offline users whose presence a node remembers (`last_seen`), shared out between the owner
/// shards; past it the oldest offline users are forgotten and read as never seen (`offline`,
/// `last_seen: null`). About 200 B each: 20 MB at the bound.
pub const PRESENCE_OFFLINE_USERS_MAX: usize = 100_000;
/// Presence reports (a user's first/last device on a shard, a device in or out of a room that
/// tracks presence) waiting on one shard for an owner whose inbox was full, retried every
/// tick in order; past it a report is dropped and counted (`switchboard_presence_reports_dropped_total`).
pub const PRESENCE_OWED_MAX: usize = 65_536;
/// Clustered: room presence changes (a user's first device in a room on this node, or its last
/// one out) waiting on one shard for the bridge, whose inbox was full, retried every tick in
/// order (a join and its leave that both wait cancel out). An entry is its bridge message (the
/// event frame shared, ~150 B) and a map entry, ~300 B: ~5 MiB per shard at the bound. Past it
/// a change is told on this node only, as this node judged it, and counted
/// (`switchboard_presence_room_bridge_lost_total`): Redis and the other nodes never hear it.
pub const PRESENCE_ROOM_BRIDGE_OWED_MAX: usize = 16_384;
// ---- the REST API
/// How long a shard reuses its sorted list of the node's online users for
/// `GET /api/v1/presence/online`, in ms. Building it is one pass over the node's users plus a
/// sort (11-15 ms at 100,000 users online, measured: `rest::presence`); reusing it makes a
/// page cost ~30 us, so clients paging or polling cost a shard at most one build a second.
/// Statuses are read fresh for every page; only who is in the list can be this old.
pub const REST_ONLINE_SNAPSHOT_MS: u64 = 1000;

// ---- the admin page (`admin_page`, `GET /api/admin/activity`)
/// Rooms listed as the busiest (most members on this node) in `/api/admin/activity`.
pub const ADMIN_BUSIEST_ROOMS: usize = 10;
/// Rooms one `/api/admin/activity` request looks at at most, so that a request (the page asks
/// once a second) never holds its shard for a pass over millions of rooms; past it the answer
/// says `"rooms_scanned"` < `"rooms"` and the list is the busiest of those seen.
pub const ADMIN_ROOMS_SCAN_MAX: usize = 100_000;

// ---- TLS on the listener (`tls_port`; `crate::tls`, `shard::tls`)
/// rustls' buffers of outgoing data per TLS connection (`set_buffer_limit`: plaintext written
/// before the handshake ends, and encrypted records not yet taken by the socket), in bytes.
/// The connection's own send queue holds the backlog under `send_queue_bytes_max`; this only
/// bounds what is encrypted ahead of the socket: two full records. rustls' default is 64 KiB.
pub const TLS_SEND_BUFFER_BYTES_MAX: usize = 32 * 1024;
/// Plaintext one TLS connection hands to the HTTP/WebSocket decoding per readiness event, in
/// bytes; past it the connection is revisited next turn (as `READS_PER_EVENT_MAX` does for
/// `recv`), so decrypting one fast sender cannot starve the shard. The bound is checked after
/// each `recv`, so one read more (`read_buffer_size`) may pass it.
pub const TLS_PLAINTEXT_PER_EVENT_BYTES_MAX: usize = 256 * 1024;
/// Sessions the TLS listener remembers for resumption (rustls' in-memory cache, node-wide,
/// one lock per handshake that stores or finds one); ~ 100-200 B each. Oldest out first.
pub const TLS_SESSION_CACHE_ENTRIES: usize = 4096;
/// TLS 1.3 session tickets (ids into the cache above) sent per full handshake. rustls'
/// default is 2; a WebSocket client reconnects one connection at a time.
pub const TLS_TLS13_TICKETS: usize = 1;

// ---- distributed tracing
/// Finished spans waiting for the exporter (`crate::trace`). A span is ~200 B with its
/// attributes, so the queue holds ~1.6 MiB at the bound (its slots are allocated at start, only
/// when tracing is on). At the default 1 s export interval this covers 8,192 sampled spans a
/// second; past it a span is dropped and counted (`switchboard_trace_spans_dropped_total`),
/// never waited for.
pub const TRACE_QUEUE_SPANS_MAX: usize = 8192;
/// Attributes kept per span; more are dropped (a span carries a handful).
pub const TRACE_ATTRIBUTES_PER_SPAN_MAX: usize = 16;
/// Longest text attribute kept, in bytes (cut on a character boundary past it).
pub const TRACE_ATTRIBUTE_BYTES_MAX: usize = 256;
