//! Metrics: each shard counts in plain local integers and publishes them to its own
//! [`ShardStats`] once per `STATS_PUBLISH_MS`; a scrape merges every shard's published values
//! and renders Prometheus text. Nothing is emitted per message.
//!
//! **Adding a counter: one line in `stats!`.** That table generates the [`LocalStats`] field,
//! its published slot, and its render metadata ([`ROWS`]: Prometheus name, help, and whether
//! it is a counter summed over shards, a per-shard gauge, or not rendered). A service module
//! (`rooms`, `dm`, `typing`, `presence`, ...) adds its own rows under its own heading in the
//! table and counts with `out.stats.<field> += 1`; it touches no other module's rows. Labelled
//! families (`errors` by [`ErrorReason`], `closes` by [`CloseKind`]) are arrays beside the table.
//! Tests pin the rendered text byte for byte and check that every row is rendered.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Why an `error` frame was sent (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ErrorReason {
    InvalidJson,
    UnknownType,
    RoomRequired,
    NotSubscribed,
    RoomFull,
    NotAllowed,
    TooManyRooms,
    RateLimited,
    TooLarge,
    Binary,
    BadRequest,
    AuthFailed,
    Busy,
    TooManyDevices,
    Internal,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 15] = [
        ErrorReason::InvalidJson,
        ErrorReason::UnknownType,
        ErrorReason::RoomRequired,
        ErrorReason::NotSubscribed,
        ErrorReason::RoomFull,
        ErrorReason::NotAllowed,
        ErrorReason::TooManyRooms,
        ErrorReason::RateLimited,
        ErrorReason::TooLarge,
        ErrorReason::Binary,
        ErrorReason::BadRequest,
        ErrorReason::AuthFailed,
        ErrorReason::Busy,
        ErrorReason::TooManyDevices,
        ErrorReason::Internal,
    ];
    pub fn label(self) -> &'static str {
        match self {
            ErrorReason::InvalidJson => "invalid_json",
            ErrorReason::UnknownType => "unknown_type",
            ErrorReason::RoomRequired => "room_required",
            ErrorReason::NotSubscribed => "not_subscribed",
            ErrorReason::RoomFull => "room_full",
            ErrorReason::NotAllowed => "not_allowed",
            ErrorReason::TooManyRooms => "too_many_rooms",
            ErrorReason::RateLimited => "rate_limited",
            ErrorReason::TooLarge => "too_large",
            ErrorReason::Binary => "binary",
            ErrorReason::BadRequest => "bad_request",
            ErrorReason::AuthFailed => "auth_failed",
            ErrorReason::Busy => "busy",
            ErrorReason::TooManyDevices => "too_many_devices",
            ErrorReason::Internal => "internal",
        }
    }
}

/// How a connection ended (label `code`: a close code, or what happened without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseKind {
    Normal,
    GoingAway,
    Protocol,
    InvalidData,
    Policy,
    TooBig,
    Internal,
    Unauthorized,
    TokenExpired,
    SlowConsumer,
    RateLimited,
    /// The peer vanished without a close frame (EOF, reset).
    Abnormal,
    /// Dead peer (no traffic within pong_wait) or stalled writes (write_wait).
    Timeout,
    /// An HTTP request that was answered and closed, or a handshake that never completed.
    Http,
    /// The peer closed with a code the server does not use itself (e.g. 3000-4999).
    Other,
}

impl CloseKind {
    pub const ALL: [CloseKind; 15] = [
        CloseKind::Normal,
        CloseKind::GoingAway,
        CloseKind::Protocol,
        CloseKind::InvalidData,
        CloseKind::Policy,
        CloseKind::TooBig,
        CloseKind::Internal,
        CloseKind::Unauthorized,
        CloseKind::TokenExpired,
        CloseKind::SlowConsumer,
        CloseKind::RateLimited,
        CloseKind::Abnormal,
        CloseKind::Timeout,
        CloseKind::Http,
        CloseKind::Other,
    ];
    pub fn from_code(code: u16) -> CloseKind {
        match code {
            1000 => CloseKind::Normal,
            1001 => CloseKind::GoingAway,
            1002 => CloseKind::Protocol,
            1007 => CloseKind::InvalidData,
            1008 => CloseKind::Policy,
            1009 => CloseKind::TooBig,
            4001 => CloseKind::Unauthorized,
            4003 => CloseKind::TokenExpired,
            4008 => CloseKind::SlowConsumer,
            4029 => CloseKind::RateLimited,
            1011 => CloseKind::Internal,
            _ => CloseKind::Other,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            CloseKind::Normal => "1000",
            CloseKind::GoingAway => "1001",
            CloseKind::Protocol => "1002",
            CloseKind::InvalidData => "1007",
            CloseKind::Policy => "1008",
            CloseKind::TooBig => "1009",
            CloseKind::Internal => "1011",
            CloseKind::Unauthorized => "4001",
            CloseKind::TokenExpired => "4003",
            CloseKind::SlowConsumer => "4008",
            CloseKind::RateLimited => "4029",
            CloseKind::Abnormal => "abnormal",
            CloseKind::Timeout => "timeout",
            CloseKind::Http => "http",
            CloseKind::Other => "other",
        }
    }
}

/// How a `stats!` row is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Summed over shards: `# TYPE <name> counter` and one unlabelled line.
    Counter,
    /// A current value, one line per shard: `<name>{shard="<n>"}`.
    ShardGauge,
    /// Published for the shard's own use but not rendered (e.g. `rooms`: the node renders
    /// `switchboard_rooms` from the directory, which counts each room once).
    Hidden,
}

/// One row of the `stats!` table: the `LocalStats` field, how it renders, its name and help.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub field: &'static str,
    pub kind: Kind,
    /// Prometheus name (empty for [`Kind::Hidden`]).
    pub name: &'static str,
    pub help: &'static str,
}

/// The one table of shard counters and gauges. Each row generates a `pub <field>: u64` in
/// [`LocalStats`], its slot in the published values (table order), and its [`Row`] in [`ROWS`]
/// (rendered in table order within its kind: counters first, then per-shard gauges).
/// Row syntax: `field: Counter("name", "help")`, `field: ShardGauge("name", "help")` or
/// `field: Hidden`, optionally preceded by `///` docs for the field.
macro_rules! stats {
    (@meta) => { ("", "") };
    (@meta $name:literal, $help:literal) => { ($name, $help) };
    ($( $(#[$attr:meta])* $field:ident : $kind:ident $(($name:literal, $help:literal))? ),* $(,)?) => {
        /// Counters a shard keeps locally (plain integers) and publishes once per tick.
        /// Generated by `stats!`, plus the `errors` and `closes` label arrays.
        #[derive(Clone, Debug, Default)]
        pub struct LocalStats {
            $( $(#[$attr])* pub $field: u64, )*
            /// Error frames sent, indexed by [`ErrorReason`] (`switchboard_errors_total`).
            pub errors: [u64; ErrorReason::ALL.len()],
            /// Connections ended, indexed by [`CloseKind`] (`switchboard_closes_total`).
            pub closes: [u64; CloseKind::ALL.len()],
        }

        /// Every row of the `stats!` table, in table (and published-slot) order.
        pub const ROWS: &[Row] = &[ $( {
            let (name, help) = stats!(@meta $($name, $help)?);
            Row { field: stringify!($field), kind: Kind::$kind, name, help }
        } ),* ];

        /// The scalar fields in table order (their published slots).
        fn scalars(s: &LocalStats) -> [u64; SCALARS] {
            [ $( s.$field ),* ]
        }
    };
}

/// Scalar rows in the table; `errors` then `closes` follow them in the published slots.
const SCALARS: usize = ROWS.len();

// Adding a counter: one line here (a service module adds its rows under its own heading;
// `out.stats.<field> += 1` counts it and the scrape renders it).
stats! {
    // ---- connections and HTTP
    accepted: Counter("switchboard_accepted_total", "TCP connections accepted"),
    upgrades: Counter("switchboard_upgrades_total", "WebSocket upgrades completed"),
    upgrade_rejected: Counter("switchboard_upgrades_rejected_total", "Upgrade requests refused (4xx/5xx)"),
    http_requests: Counter("switchboard_http_requests_total", "Plain HTTP requests served"),
    // ---- frames and sockets
    frames_in: Counter("switchboard_frames_in_total", "WebSocket frames received"),
    bytes_in: Counter("switchboard_bytes_in_total", "Bytes received on WebSocket connections"),
    frames_out: Counter("switchboard_frames_out_total", "Frames written to sockets"),
    bytes_out: Counter("switchboard_bytes_out_total", "Bytes written to sockets"),
    writev_calls: Counter("switchboard_writev_calls_total", "send/sendmsg system calls on client sockets"),
    // ---- rooms
    publishes: Counter("switchboard_publishes_total", "Room publishes accepted"),
    deliveries: Counter("switchboard_deliveries_total", "Frames queued to a recipient by fan-out"),
    dialect_encodes: Counter("switchboard_dialect_encodes_total", "Native frames re-encoded for connections of another dialect (once per dialect per frame per shard, never per recipient)"),
    droppable_dropped: Counter("switchboard_droppable_dropped_total", "Droppable frames (typing) not queued because the recipient had over half of send_queue_bytes_max queued"),
    broadcasts: Counter("switchboard_broadcasts_total", "Broadcasts accepted"),
    history_appended: Counter("switchboard_history_appended_total", "Room messages kept in history (rooms with history_size > 0)"),
    history_trimmed: Counter("switchboard_history_trimmed_total", "History entries dropped for the byte budget (history_bytes_max) or the room bound"),
    history_replayed: Counter("switchboard_history_resumes_total", "Subscribes that asked to resume (since) and were answered"),
    // ---- direct messages
    dms: Counter("switchboard_direct_messages_total", "Direct messages accepted"),
    dm_duplicates: Counter("switchboard_direct_message_duplicates_total", "Direct messages answered from the dedup window"),
    // ---- typing and receipts
    typing_sent: Counter("switchboard_typing_events_total", "typing.start / typing.stop events handed to the delivery seam (one per event, however many recipients), the server's own stops included"),
    typing_coalesced: Counter("switchboard_typing_coalesced_total", "typing.start renewals within typing_ttl that sent nothing (coalesced)"),
    typing_ttl_stops: Counter("switchboard_typing_ttl_stops_total", "typing.stop events the server sent because a typing.start was not renewed within typing_ttl"),
    receipts_sent: Counter("switchboard_receipts_total", "message.delivered / message.read receipts handed to the delivery seam"),
    // ---- presence
    presence_changes: Counter("switchboard_presence_changes_total", "User presence events sent to watchers (presence.online, presence.offline, presence.update), one per change"),
    presence_room_events: Counter("switchboard_presence_room_events_total", "Room presence events sent to rooms (presence.join, presence.leave)"),
    presence_queries: Counter("switchboard_presence_queries_total", "presence.query and presence.watch commands answered with presence.state"),
    presence_reports_owed: Counter("switchboard_presence_reports_owed_total", "Presence reports queued for retry because the owner shard's inbox was full"),
    presence_reports_dropped: Counter("switchboard_presence_reports_dropped_total", "Presence reports dropped because PRESENCE_OWED_MAX reports already waited"),
    presence_room_bridge_owed: Counter("switchboard_presence_room_bridge_owed_total", "Clustered: room presence changes (a user's first device in a room on this node, or its last out) the bridge's full inbox refused, held on the shard and handed to it again in order"),
    presence_room_bridge_coalesced: Counter("switchboard_presence_room_bridge_coalesced_total", "Clustered: room presence changes that cancelled one of the same user and room still held for the bridge (a join and its leave): neither was told"),
    presence_room_bridge_lost: Counter("switchboard_presence_room_bridge_lost_total", "Clustered: room presence changes the bridge refused with PRESENCE_ROOM_BRIDGE_OWED_MAX already held: told on this node only, never judged in Redis"),
    presence_forgotten: Counter("switchboard_presence_forgotten_total", "Offline users forgotten at PRESENCE_OFFLINE_USERS_MAX (they read as never seen)"),
    presence_read_local: Counter("switchboard_presence_read_local_total", "Clustered: presence.state answers with users held only by other nodes that were answered from this node's state (Redis down, slow, or the bridge busy)"),
    // ---- cross-shard
    cross_shard_sent: Counter("switchboard_cross_shard_sent_total", "Messages sent to other shards"),
    cross_shard_dropped: Counter("switchboard_cross_shard_dropped_total", "Messages dropped because a shard inbox was full"),
    // ---- the bridge
    bridge_dropped: Counter("switchboard_bridge_dropped_total", "Messages for other nodes or the bridge dropped because its inbox was full"),
    // ---- HTTP keep-alive
    http_keepalive_reuses: Counter("switchboard_http_keepalive_reuses_total", "HTTP requests served on a connection that had already served one"),
    // ---- calls
    calls_offered: Counter("switchboard_calls_offered_total", "Calls offered and ringing (call.offer accepted)"),
    calls_answered: Counter("switchboard_calls_answered_total", "Calls answered (call.answer accepted)"),
    calls_unavailable: Counter("switchboard_calls_unavailable_total", "Offers ended with call.ended unavailable because the callee had no device connected"),
    calls_busy: Counter("switchboard_calls_busy_total", "Offers refused with call.ended busy because the callee was at max_calls_per_user"),
    calls_ended_hangup: Counter("switchboard_calls_ended_hangup_total", "Calls ended by call.hangup (cancel, reject or hang-up)"),
    calls_ended_timeout: Counter("switchboard_calls_ended_timeout_total", "Calls ended unanswered after ring_timeout"),
    calls_ended_disconnected: Counter("switchboard_calls_ended_disconnected_total", "Calls ended because a party connection went away"),
    calls_ended_glare: Counter("switchboard_calls_ended_glare_total", "Offers ended by glare (two users calling each other at once)"),
    calls_remote_unanswered: Counter("switchboard_calls_remote_unanswered_total", "Clustered: call commands sent to the other nodes that no node confirmed within CALL_REMOTE_WAIT (answered unknown call)"),
    calls_remote_late: Counter("switchboard_calls_remote_late_total", "Clustered: call answers another node confirmed after their wait ran out (that call ended there)"),
    // ---- TLS (tls_port)
    tls_handshakes: Counter("switchboard_tls_handshakes_total", "TLS handshakes completed on tls_port"),
    tls_handshake_failures: Counter("switchboard_tls_handshake_failures_total", "TLS connections closed before their handshake completed: not TLS, refused by rustls, timed out (tls_handshake_timeout), or left by the peer"),
    // ---- gauges (current values, not counters)
    connections: ShardGauge("switchboard_connections", "Open TCP connections per shard (any phase)"),
    ws_connections: ShardGauge("switchboard_websocket_connections", "Upgraded WebSocket connections per shard"),
    tls_connections: ShardGauge("switchboard_tls_connections", "Open TLS connections with a completed handshake per shard (any phase: HTTP or WebSocket)"),
    rooms: Hidden,
    queued_bytes: ShardGauge("switchboard_send_queue_bytes", "Bytes queued for clients per shard"),
    /// 1 while `write_coalesce` applies on the shard (its rate gate is on).
    coalesce_on: ShardGauge("switchboard_write_coalesce_active", "1 while write_coalesce holds fan-out frames on the shard (its frame rate is over write_coalesce_min_rate)"),
    /// Entries in the shard's `write_coalesce` hold heap (connections waiting, plus entries
    /// left stale by an urgent write, which expire within one window).
    coalesce_held: ShardGauge("switchboard_write_coalesce_held", "Entries in the shard's write_coalesce hold queue (connections waiting to be written)"),
}

/// Published slots per shard: the table's scalars, then `errors`, then `closes`.
const SLOTS: usize = SCALARS + ErrorReason::ALL.len() + CloseKind::ALL.len();

/// One shard's published values. Written by the shard once per tick, read by scrapes.
pub struct ShardStats {
    values: Vec<AtomicU64>,
    /// Publish-to-flush latency in µs, merged from the shard's local histogram each tick.
    pub latency_us: Mutex<Histogram<u64>>,
}

/// A shard's values in published-slot order (no allocation).
fn flatten(s: &LocalStats) -> impl Iterator<Item = u64> + '_ {
    scalars(s)
        .into_iter()
        .chain(s.errors.iter().copied())
        .chain(s.closes.iter().copied())
}

/// A new latency histogram: 1 µs to 60 s, 2 significant digits.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds are valid")
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            values: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latency_us: Mutex::new(new_latency_histogram()),
        }
    }
}

impl ShardStats {
    /// Publish a shard's local counters (called by the owning shard only).
    pub fn publish(&self, s: &LocalStats) {
        for (slot, v) in self.values.iter().zip(flatten(s)) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    fn load(&self) -> Vec<u64> {
        self.values
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }
}

/// Every rendered row's value summed over the shards, in table order: (field name, kind,
/// value); a counter is a total since start, a gauge the node's current value. For
/// `/api/stats`.
pub fn totals(shards: &[ShardStats]) -> Vec<(&'static str, Kind, u64)> {
    let per_shard: Vec<Vec<u64>> = shards.iter().map(ShardStats::load).collect();
    ROWS.iter()
        .enumerate()
        .filter(|(_, r)| r.kind != Kind::Hidden)
        .map(|(i, r)| (r.field, r.kind, per_shard.iter().map(|v| v[i]).sum()))
        .collect()
}

/// Node-level facts the renderer needs besides shard stats.
pub struct NodeView<'a> {
    pub shards: &'a [ShardStats],
    pub rooms: u64,
    pub users: u64,
    pub connections: u64,
    pub max_connections: u64,
    pub draining: bool,
    /// The message store's counters (kept by the bridge).
    pub store: Option<&'a crate::bridge::store::StoreStats>,
    /// The Kafka clients' counters (rendered only when Kafka is configured).
    pub kafka: Option<&'a crate::bridge::kafka::KafkaStats>,
    pub limits: Option<&'a crate::doctor::Limits>,
    /// With it, the rooms module's metric names are rendered too ([`render_compat`]).
    pub compat: Option<&'a MessageRate>,
}

/// The state behind `websocket_messages_per_second`: the frame count and time of the last
/// measurement, and the rate it gave. Touched by scrapes only (never by a shard's loop).
pub struct MessageRate(Mutex<RateSample>);

struct RateSample {
    at: std::time::Instant,
    frames: u64,
    rate: f64,
}

impl MessageRate {
    /// The first measurement runs from `start` (the node's start, when it had received nothing).
    pub fn new(start: std::time::Instant) -> MessageRate {
        MessageRate(Mutex::new(RateSample {
            at: start,
            frames: 0,
            rate: 0.0,
        }))
    }

    /// Frames per second received between the last measurement and `now`, given the node's
    /// total `frames` at `now`. Within `MESSAGE_RATE_WINDOW_MIN_MS` of the last measurement it
    /// answers that measurement again.
    pub fn observe(&self, now: std::time::Instant, frames: u64) -> f64 {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dt = now.saturating_duration_since(s.at);
        if dt.as_millis() >= u128::from(crate::limits::MESSAGE_RATE_WINDOW_MIN_MS) {
            s.rate = frames.saturating_sub(s.frames) as f64 / dt.as_secs_f64();
            s.at = now;
            s.frames = frames;
        }
        s.rate
    }
}

/// The metric names of the rooms module Switchboard replaces (its guide tells operators to
/// alert on them), computed from what the scrape already gathered: `websocket_clients_total`
/// = `switchboard_clients`, `websocket_rooms_total` = `switchboard_rooms` (gauges, despite the
/// `_total` the module gave them), `websocket_errors_total` = the sum of
/// `switchboard_errors_total` over its reasons, and `websocket_messages_per_second` = WebSocket
/// frames received per second since the previous measurement (see [`MessageRate::observe`]).
fn render_compat(out: &mut String, view: &NodeView, rate: &MessageRate, frames: u64, errors: u64) {
    let per_second = rate.observe(std::time::Instant::now(), frames);
    let lines: [(&str, &str, &str, String); 4] = [
        (
            "websocket_clients_total",
            "Compatibility name of switchboard_clients: upgraded WebSocket connections on this node",
            "gauge",
            view.connections.to_string(),
        ),
        (
            "websocket_rooms_total",
            "Compatibility name of switchboard_rooms: rooms with at least one subscriber on this node",
            "gauge",
            view.rooms.to_string(),
        ),
        (
            "websocket_messages_per_second",
            "WebSocket frames received per second since the previous measurement (at least 1 s apart)",
            "gauge",
            format!("{per_second:.3}"),
        ),
        (
            "websocket_errors_total",
            "Compatibility name of the sum of switchboard_errors_total: error frames sent",
            "counter",
            errors.to_string(),
        ),
    ];
    for (name, help, kind, v) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

/// Render the Prometheus text exposition.
pub fn render(view: &NodeView) -> String {
    let per_shard: Vec<Vec<u64>> = view.shards.iter().map(ShardStats::load).collect();
    let mut out = String::with_capacity(8192);
    let sum = |i: usize| per_shard.iter().map(|v| v[i]).sum::<u64>();
    let rows = |kind: Kind| ROWS.iter().enumerate().filter(move |(_, r)| r.kind == kind);
    for (i, Row { name, help, .. }) in rows(Kind::Counter) {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            sum(i)
        );
    }
    for (i, Row { name, help, .. }) in rows(Kind::ShardGauge) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (shard, v) in per_shard.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", v[i]);
        }
    }
    let gauges = [
        (
            "switchboard_clients",
            "Upgraded WebSocket connections on this node",
            view.connections,
        ),
        (
            "switchboard_max_connections",
            "Configured (or derived) connection limit",
            view.max_connections,
        ),
        (
            "switchboard_rooms",
            "Rooms with at least one subscriber on this node",
            view.rooms,
        ),
        (
            "switchboard_users",
            "Users with at least one device on this node",
            view.users,
        ),
        (
            "switchboard_draining",
            "1 while the node drains for shutdown",
            view.draining as u64,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_errors_total Error frames sent, by reason\n# TYPE switchboard_errors_total counter"
    );
    for (k, r) in ErrorReason::ALL.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_errors_total{{reason=\"{}\"}} {}",
            r.label(),
            sum(SCALARS + k)
        );
    }
    let base = SCALARS + ErrorReason::ALL.len();
    let _ = writeln!(
        out,
        "# HELP switchboard_closes_total Connections ended, by close code or cause\n# TYPE switchboard_closes_total counter"
    );
    for (k, c) in CloseKind::ALL.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_closes_total{{code=\"{}\"}} {}",
            c.label(),
            sum(base + k)
        );
    }
    if let Some(rate) = view.compat {
        let frames = ROWS
            .iter()
            .position(|r| r.field == "frames_in")
            .map_or(0, sum);
        let errors = (0..ErrorReason::ALL.len()).map(|k| sum(SCALARS + k)).sum();
        render_compat(&mut out, view, rate, frames, errors);
    }
    let slow = sum(base + CloseKind::SlowConsumer as usize);
    let _ = writeln!(
        out,
        "# HELP switchboard_slow_consumer_closes_total Connections closed 4008 for exceeding send_queue_bytes_max\n# TYPE switchboard_slow_consumer_closes_total counter\nswitchboard_slow_consumer_closes_total {slow}"
    );
    if let Some(s) = view.store {
        crate::bridge::store::prometheus_lines(s, &mut out);
    }
    if let Some(k) = view.kafka {
        crate::bridge::kafka::prometheus_lines(k, &mut out);
    }
    render_latency(&mut out, view.shards);
    if let Some(limits) = view.limits {
        crate::doctor::prometheus_lines(limits, view.shards.len(), &mut out);
    }
    out
}

/// The I/O backend the shards run on, as an info gauge (always 1): `backend` is the one in use
/// after the start-up probe (a refused io_uring reads `epoll` here), `sends` says who writes
/// (`ring`: io_uring send operations; `syscall`: the shard's own sendmsg/writev, as on epoll).
/// Node-wide: a shard whose own ring then fails to set up runs on epoll and says so in the log
/// (`this shard runs on epoll`), not here.
pub fn render_io_backend(backend: crate::config::IoBackend, ring_sends: bool, out: &mut String) {
    let sends = match backend {
        crate::config::IoBackend::IoUring if ring_sends => "ring",
        _ => "syscall",
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP switchboard_io_backend The I/O backend this node's shards run on (the value is always 1)\n\
         # TYPE switchboard_io_backend gauge\n\
         switchboard_io_backend{{backend=\"{}\",sends=\"{sends}\"}} 1",
        backend.label()
    );
}

/// Bucket bounds in seconds for the publish-to-flush histogram.
const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

/// The node's publish-to-flush histogram: every shard's merged.
fn merged_latency(shards: &[ShardStats]) -> Histogram<u64> {
    let mut merged = new_latency_histogram();
    for s in shards {
        if let Ok(h) = s.latency_us.lock() {
            let _ = merged.add(&*h);
        }
    }
    merged
}

/// Cumulative counts of the node's publish-to-flush histogram at [`LATENCY_BUCKETS_US`]
/// (`(le_us, count)`), then the total count and the sum in µs. For `/metrics` and the admin
/// page (which takes quantiles of the difference between two reads).
pub fn latency_buckets(shards: &[ShardStats]) -> (Vec<(u64, u64)>, u64, u64) {
    let merged = merged_latency(shards);
    let buckets = LATENCY_BUCKETS_US
        .iter()
        .map(|&b| {
            let count = merged
                .iter_recorded()
                .filter(|v| v.value_iterated_to() <= b)
                .map(|v| v.count_at_value())
                .sum();
            (b, count)
        })
        .collect();
    let sum_us = merged
        .iter_recorded()
        .map(|v| v.value_iterated_to().saturating_mul(v.count_at_value()))
        .fold(0u64, u64::saturating_add);
    (buckets, merged.len(), sum_us)
}

/// `(label, total)` rows of a labelled family.
pub type LabelTotals = Vec<(&'static str, u64)>;

/// Error frames sent by reason and connections ended by kind, summed over the shards, as
/// `(label, total)` in the order `switchboard_errors_total` / `switchboard_closes_total`
/// render them.
pub fn labelled_totals(shards: &[ShardStats]) -> (LabelTotals, LabelTotals) {
    let per_shard: Vec<Vec<u64>> = shards.iter().map(ShardStats::load).collect();
    let sum = |i: usize| per_shard.iter().map(|v| v[i]).sum::<u64>();
    let errors = ErrorReason::ALL
        .iter()
        .enumerate()
        .map(|(k, r)| (r.label(), sum(SCALARS + k)))
        .collect();
    let base = SCALARS + ErrorReason::ALL.len();
    let closes = CloseKind::ALL
        .iter()
        .enumerate()
        .map(|(k, c)| (c.label(), sum(base + k)))
        .collect();
    (errors, closes)
}

fn render_latency(out: &mut String, shards: &[ShardStats]) {
    let (buckets, total, sum_us) = latency_buckets(shards);
    let name = "switchboard_publish_to_flush_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a frame's creation (publish, DM, reply) to its write to a recipient socket\n# TYPE {name} histogram"
    );
    for (b, count) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {count}", b as f64 / 1e6);
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {total}\n{name}_sum {}\n{name}_count {total}",
        sum_us as f64 / 1e6 + 0.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_merged_counters_and_histogram() {
        let shards = [ShardStats::default(), ShardStats::default()];
        let mut a = LocalStats {
            deliveries: 5,
            connections: 2,
            ..Default::default()
        };
        a.errors[ErrorReason::RateLimited as usize] = 3;
        a.closes[CloseKind::SlowConsumer as usize] = 1;
        shards[0].publish(&a);
        shards[1].publish(&LocalStats {
            deliveries: 7,
            ..Default::default()
        });
        shards[1].latency_us.lock().unwrap().record(300).unwrap();
        let text = render(&NodeView {
            shards: &shards,
            rooms: 1,
            users: 0,
            connections: 2,
            max_connections: 10,
            draining: false,
            store: None,
            kafka: None,
            limits: None,
            compat: None,
        });
        assert!(text.contains("switchboard_deliveries_total 12\n"));
        assert!(text.contains("switchboard_connections{shard=\"0\"} 2\n"));
        assert!(text.contains("switchboard_errors_total{reason=\"rate_limited\"} 3\n"));
        assert!(text.contains("switchboard_closes_total{code=\"4008\"} 1\n"));
        assert!(text.contains("switchboard_slow_consumer_closes_total 1\n"));
        assert!(text.contains("switchboard_publish_to_flush_seconds_bucket{le=\"0.00025\"} 0\n"));
        assert!(text.contains("switchboard_publish_to_flush_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("switchboard_publish_to_flush_seconds_count 1\n"));
    }

    /// Two shards with a distinct value in every field, and one latency sample.
    fn sample_text() -> String {
        let shards = [ShardStats::default(), ShardStats::default()];
        for (k, shard) in shards.iter().enumerate() {
            let base = 1000 * (k as u64 + 1);
            let mut s = LocalStats {
                accepted: base + 1,
                upgrades: base + 2,
                upgrade_rejected: base + 3,
                http_requests: base + 4,
                frames_in: base + 5,
                bytes_in: base + 6,
                frames_out: base + 7,
                bytes_out: base + 8,
                writev_calls: base + 9,
                publishes: base + 10,
                deliveries: base + 11,
                broadcasts: base + 12,
                dms: base + 13,
                dm_duplicates: base + 14,
                cross_shard_sent: base + 15,
                cross_shard_dropped: base + 16,
                connections: base + 17,
                ws_connections: base + 18,
                rooms: base + 19,
                queued_bytes: base + 20,
                coalesce_on: base + 21,
                coalesce_held: base + 22,
                ..Default::default()
            };
            for (i, e) in s.errors.iter_mut().enumerate() {
                *e = base + 100 + i as u64;
            }
            for (i, c) in s.closes.iter_mut().enumerate() {
                *c = base + 200 + i as u64;
            }
            shard.publish(&s);
        }
        shards[1].latency_us.lock().unwrap().record(300).unwrap();
        render(&NodeView {
            shards: &shards,
            rooms: 31,
            users: 32,
            connections: 33,
            max_connections: 34,
            draining: true,
            store: None,
            kafka: None,
            limits: None,
            compat: None,
        })
    }

    /// The text rendered by the hand-indexed tables before `stats!` (commit 310a268), byte
    /// for byte: names, labels, help, order and values must not change.
    const SAMPLE_BEFORE_TABLE: &str = r#"# HELP switchboard_accepted_total TCP connections accepted
# TYPE switchboard_accepted_total counter
switchboard_accepted_total 3002
# HELP switchboard_upgrades_total WebSocket upgrades completed
# TYPE switchboard_upgrades_total counter
switchboard_upgrades_total 3004
# HELP switchboard_upgrades_rejected_total Upgrade requests refused (4xx/5xx)
# TYPE switchboard_upgrades_rejected_total counter
switchboard_upgrades_rejected_total 3006
# HELP switchboard_http_requests_total Plain HTTP requests served
# TYPE switchboard_http_requests_total counter
switchboard_http_requests_total 3008
# HELP switchboard_frames_in_total WebSocket frames received
# TYPE switchboard_frames_in_total counter
switchboard_frames_in_total 3010
# HELP switchboard_bytes_in_total Bytes received on WebSocket connections
# TYPE switchboard_bytes_in_total counter
switchboard_bytes_in_total 3012
# HELP switchboard_frames_out_total Frames written to sockets
# TYPE switchboard_frames_out_total counter
switchboard_frames_out_total 3014
# HELP switchboard_bytes_out_total Bytes written to sockets
# TYPE switchboard_bytes_out_total counter
switchboard_bytes_out_total 3016
# HELP switchboard_writev_calls_total send/sendmsg system calls on client sockets
# TYPE switchboard_writev_calls_total counter
switchboard_writev_calls_total 3018
# HELP switchboard_publishes_total Room publishes accepted
# TYPE switchboard_publishes_total counter
switchboard_publishes_total 3020
# HELP switchboard_deliveries_total Frames queued to a recipient by fan-out
# TYPE switchboard_deliveries_total counter
switchboard_deliveries_total 3022
# HELP switchboard_broadcasts_total Broadcasts accepted
# TYPE switchboard_broadcasts_total counter
switchboard_broadcasts_total 3024
# HELP switchboard_direct_messages_total Direct messages accepted
# TYPE switchboard_direct_messages_total counter
switchboard_direct_messages_total 3026
# HELP switchboard_direct_message_duplicates_total Direct messages answered from the dedup window
# TYPE switchboard_direct_message_duplicates_total counter
switchboard_direct_message_duplicates_total 3028
# HELP switchboard_cross_shard_sent_total Messages sent to other shards
# TYPE switchboard_cross_shard_sent_total counter
switchboard_cross_shard_sent_total 3030
# HELP switchboard_cross_shard_dropped_total Messages dropped because a shard inbox was full
# TYPE switchboard_cross_shard_dropped_total counter
switchboard_cross_shard_dropped_total 3032
# HELP switchboard_connections Open TCP connections per shard (any phase)
# TYPE switchboard_connections gauge
switchboard_connections{shard="0"} 1017
switchboard_connections{shard="1"} 2017
# HELP switchboard_websocket_connections Upgraded WebSocket connections per shard
# TYPE switchboard_websocket_connections gauge
switchboard_websocket_connections{shard="0"} 1018
switchboard_websocket_connections{shard="1"} 2018
# HELP switchboard_send_queue_bytes Bytes queued for clients per shard
# TYPE switchboard_send_queue_bytes gauge
switchboard_send_queue_bytes{shard="0"} 1020
switchboard_send_queue_bytes{shard="1"} 2020
# HELP switchboard_write_coalesce_active 1 while write_coalesce holds fan-out frames on the shard (its frame rate is over write_coalesce_min_rate)
# TYPE switchboard_write_coalesce_active gauge
switchboard_write_coalesce_active{shard="0"} 1021
switchboard_write_coalesce_active{shard="1"} 2021
# HELP switchboard_write_coalesce_held Entries in the shard's write_coalesce hold queue (connections waiting to be written)
# TYPE switchboard_write_coalesce_held gauge
switchboard_write_coalesce_held{shard="0"} 1022
switchboard_write_coalesce_held{shard="1"} 2022
# HELP switchboard_clients Upgraded WebSocket connections on this node
# TYPE switchboard_clients gauge
switchboard_clients 33
# HELP switchboard_max_connections Configured (or derived) connection limit
# TYPE switchboard_max_connections gauge
switchboard_max_connections 34
# HELP switchboard_rooms Rooms with at least one subscriber on this node
# TYPE switchboard_rooms gauge
switchboard_rooms 31
# HELP switchboard_users Users with at least one device on this node
# TYPE switchboard_users gauge
switchboard_users 32
# HELP switchboard_draining 1 while the node drains for shutdown
# TYPE switchboard_draining gauge
switchboard_draining 1
# HELP switchboard_errors_total Error frames sent, by reason
# TYPE switchboard_errors_total counter
switchboard_errors_total{reason="invalid_json"} 3200
switchboard_errors_total{reason="unknown_type"} 3202
switchboard_errors_total{reason="room_required"} 3204
switchboard_errors_total{reason="not_subscribed"} 3206
switchboard_errors_total{reason="room_full"} 3208
switchboard_errors_total{reason="not_allowed"} 3210
switchboard_errors_total{reason="too_many_rooms"} 3212
switchboard_errors_total{reason="rate_limited"} 3214
switchboard_errors_total{reason="too_large"} 3216
switchboard_errors_total{reason="binary"} 3218
switchboard_errors_total{reason="bad_request"} 3220
switchboard_errors_total{reason="auth_failed"} 3222
switchboard_errors_total{reason="busy"} 3224
# HELP switchboard_closes_total Connections ended, by close code or cause
# TYPE switchboard_closes_total counter
switchboard_closes_total{code="1000"} 3400
switchboard_closes_total{code="1001"} 3402
switchboard_closes_total{code="1002"} 3404
switchboard_closes_total{code="1007"} 3406
switchboard_closes_total{code="1008"} 3408
switchboard_closes_total{code="1009"} 3410
switchboard_closes_total{code="1011"} 3412
switchboard_closes_total{code="4001"} 3414
switchboard_closes_total{code="4003"} 3416
switchboard_closes_total{code="4008"} 3418
switchboard_closes_total{code="4029"} 3420
switchboard_closes_total{code="abnormal"} 3422
switchboard_closes_total{code="timeout"} 3424
switchboard_closes_total{code="http"} 3426
switchboard_closes_total{code="other"} 3428
# HELP switchboard_slow_consumer_closes_total Connections closed 4008 for exceeding send_queue_bytes_max
# TYPE switchboard_slow_consumer_closes_total counter
switchboard_slow_consumer_closes_total 3418
# HELP switchboard_publish_to_flush_seconds Time from a frame's creation (publish, DM, reply) to its write to a recipient socket
# TYPE switchboard_publish_to_flush_seconds histogram
switchboard_publish_to_flush_seconds_bucket{le="0.00005"} 0
switchboard_publish_to_flush_seconds_bucket{le="0.0001"} 0
switchboard_publish_to_flush_seconds_bucket{le="0.00025"} 0
switchboard_publish_to_flush_seconds_bucket{le="0.0005"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.001"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.0025"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.005"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.01"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.025"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.05"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.1"} 1
switchboard_publish_to_flush_seconds_bucket{le="0.25"} 1
switchboard_publish_to_flush_seconds_bucket{le="1"} 1
switchboard_publish_to_flush_seconds_bucket{le="5"} 1
switchboard_publish_to_flush_seconds_bucket{le="+Inf"} 1
switchboard_publish_to_flush_seconds_sum 0.000301
switchboard_publish_to_flush_seconds_count 1
"#;

    #[test]
    fn renders_every_line_it_rendered_before_the_table() {
        // Every line the hand-written renderer produced is still produced, in the same order
        // and with the same bytes: rows added since (the bridge, HTTP keep-alive, new error
        // reasons and close kinds) add lines and change none.
        let text = sample_text();
        let mut lines = text.lines();
        for want in SAMPLE_BEFORE_TABLE.lines() {
            assert!(lines.any(|l| l == want), "missing or out of order: {want}");
        }
    }

    #[test]
    fn every_table_row_is_rendered() {
        let mut names = std::collections::HashSet::new();
        let mut fields = std::collections::HashSet::new();
        for r in ROWS {
            assert!(fields.insert(r.field), "field {} twice", r.field);
            if r.kind != Kind::Hidden {
                assert!(names.insert(r.name), "metric {} twice", r.name);
                assert!(r.name.starts_with("switchboard_") && !r.help.is_empty());
                assert_eq!(
                    r.kind == Kind::Counter,
                    r.name.ends_with("_total"),
                    "{}: counters and only counters end in _total",
                    r.name
                );
            } else {
                assert!(r.name.is_empty() && r.help.is_empty());
            }
        }
        // Give slot i the value 7_000 + i on one shard and check each row's own line.
        let shards = [ShardStats::default()];
        for (i, slot) in shards[0].values.iter().enumerate() {
            slot.store(7_000 + i as u64, Ordering::Relaxed);
        }
        let text = render(&NodeView {
            shards: &shards,
            rooms: 0,
            users: 0,
            connections: 0,
            max_connections: 0,
            draining: false,
            store: None,
            kafka: None,
            limits: None,
            compat: None,
        });
        for (i, r) in ROWS.iter().enumerate() {
            let (name, v) = (r.name, 7_000 + i);
            let want = match r.kind {
                Kind::Counter => format!(
                    "# HELP {name} {}\n# TYPE {name} counter\n{name} {v}\n",
                    r.help
                ),
                Kind::ShardGauge => format!(
                    "# HELP {name} {}\n# TYPE {name} gauge\n{name}{{shard=\"0\"}} {v}\n",
                    r.help
                ),
                Kind::Hidden => {
                    assert!(
                        !text.contains(&format!(" {v}\n")),
                        "hidden {} rendered",
                        r.field
                    );
                    continue;
                }
            };
            assert!(
                text.contains(&want),
                "row {} not rendered as\n{want}",
                r.field
            );
        }
        for (k, e) in ErrorReason::ALL.iter().enumerate() {
            let line = format!(
                "switchboard_errors_total{{reason=\"{}\"}} {}\n",
                e.label(),
                7_000 + SCALARS + k
            );
            assert!(text.contains(&line), "{line}");
        }
        for (k, c) in CloseKind::ALL.iter().enumerate() {
            let v = 7_000 + SCALARS + ErrorReason::ALL.len() + k;
            let line = format!("switchboard_closes_total{{code=\"{}\"}} {v}\n", c.label());
            assert!(text.contains(&line), "{line}");
        }
        assert_eq!(shards[0].values.len(), SLOTS);
    }

    #[test]
    fn local_stats_fields_land_in_their_slots() {
        let s = LocalStats {
            rooms: 5,
            coalesce_held: 9,
            ..Default::default()
        };
        let v: Vec<u64> = flatten(&s).collect();
        assert_eq!(v.len(), SLOTS);
        let at = |f: &str| v[ROWS.iter().position(|r| r.field == f).unwrap()];
        assert_eq!(
            (at("rooms"), at("coalesce_held"), at("accepted")),
            (5, 9, 0)
        );
    }

    #[test]
    fn compatibility_names_follow_the_native_values() {
        let shards = [ShardStats::default(), ShardStats::default()];
        let mut a = LocalStats {
            frames_in: 30,
            ..Default::default()
        };
        a.errors[ErrorReason::RateLimited as usize] = 3;
        a.errors[ErrorReason::InvalidJson as usize] = 2;
        shards[0].publish(&a);
        shards[1].publish(&LocalStats {
            frames_in: 12,
            ..Default::default()
        });
        // Started two seconds ago: the first scrape measures 42 frames over those 2 s.
        let start = std::time::Instant::now() - std::time::Duration::from_secs(2);
        let rate = MessageRate::new(start);
        let view = |compat| NodeView {
            shards: &shards,
            rooms: 4,
            users: 0,
            connections: 5,
            max_connections: 10,
            draining: false,
            store: None,
            kafka: None,
            limits: None,
            compat,
        };
        let text = render(&view(Some(&rate)));
        for line in [
            "# TYPE websocket_clients_total gauge\nwebsocket_clients_total 5\n",
            "# TYPE websocket_rooms_total gauge\nwebsocket_rooms_total 4\n",
            "# TYPE websocket_errors_total counter\nwebsocket_errors_total 5\n",
            "# TYPE websocket_messages_per_second gauge\nwebsocket_messages_per_second ",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let v: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("websocket_messages_per_second "))
            .and_then(|v| v.parse().ok())
            .expect("a rate");
        assert!(v > 0.0 && v <= 21.0, "{v}");
        // Without the compat view (tests, benches) nothing of it is rendered.
        assert!(!render(&view(None)).contains(" websocket_"));
    }

    #[test]
    fn message_rate_is_measured_over_at_least_the_window() {
        let t0 = std::time::Instant::now();
        let rate = MessageRate::new(t0);
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        // Too soon after start: the previous measurement (none yet: 0) is repeated.
        assert_eq!(rate.observe(at(10), 500), 0.0);
        assert_eq!(rate.observe(at(2_000), 500), 250.0);
        assert_eq!(rate.observe(at(2_500), 900), 250.0);
        assert_eq!(rate.observe(at(4_000), 1_100), 300.0);
        // A counter that went backwards (never, but) reads as 0, not a wrap.
        assert_eq!(rate.observe(at(5_000), 10), 0.0);
    }
}
