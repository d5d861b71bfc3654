//! Configuration: one validated [`Config`] built from, in order (later wins):
//! built-in defaults, a YAML file (`--config PATH`), the environment (the variables of the
//! services Switchboard replaces, [`ENV_ALIASES`]: `PORT`, `WEBSOCKET_*`, `JWT_SECRET`, ...,
//! then `SWITCHBOARD_<KEY>` for every key), then CLI flags (`--<key-with-dashes> VALUE`).
//! Invalid values stop the start with a message naming the key; a value that came from a
//! replaced service's name and is out of range is clamped with a line instead (a migration
//! must not stop on it), and its settings without meaning here are accepted with one line each.
//!
//! One table (the `config_keys!` invocation below) drives all of it: YAML keys, env names, CLI
//! flags, `--help` and the table in docs/CONFIG.md (a test keeps that file in sync). Values
//! use one syntax everywhere: see [`parse_duration`] and [`parse_bytes`].
//!
//! Owns: parsing and validation. Never touches sockets or threads; the environment is read
//! through the `env` function given to [`Config::load`], so tests pass a map.

use std::time::Duration;

/// How clients authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Development: a client may claim `?user_id=`; otherwise anonymous.
    None,
    /// JWT verified with pinned algorithms.
    Jwt,
    /// What the client presented (a token, or `?user_id=`) is checked by the HTTP endpoint
    /// `auth_service_url` (a connect proxy; docs/PROTOCOL.md "Auth modes").
    Service,
}

/// The shards' I/O backend (`crate::io`); io_uring by default (the faster here, see
/// docs/BENCHMARKS.md), epoll where the kernel refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// epoll through mio: readiness, then `recv`/`send` per connection.
    Epoll,
    /// io_uring (`crate::io::uring`): multishot accept and receive into a per-shard provided
    /// buffer ring; falls back to epoll with one log line when the kernel refuses it.
    IoUring,
}

impl IoBackend {
    /// The config value.
    pub fn label(self) -> &'static str {
        match self {
            IoBackend::Epoll => "epoll",
            IoBackend::IoUring => "io_uring",
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where finished spans go (`crate::trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceExporter {
    /// No tracing: no span is created, nothing runs.
    Off,
    /// OTLP/HTTP JSON (`POST /v1/traces`): an OpenTelemetry Collector, Jaeger, Tempo.
    Otlp,
    /// Zipkin's v2 JSON API (`POST /api/v2/spans`).
    Zipkin,
}

impl TraceExporter {
    /// The collector URL used when `trace_endpoint` is empty: the exporter's usual port on
    /// this host.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            TraceExporter::Off => "",
            TraceExporter::Otlp => "http://127.0.0.1:4318/v1/traces",
            TraceExporter::Zipkin => "http://127.0.0.1:9411/api/v2/spans",
        }
    }
}

/// Whose "sampled" flag (W3C `traceparent`, B3) decides a trace (`crate::trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceParentSampled {
    /// Callers holding the server API key and Kafka records; a WebSocket client's or a REST
    /// user's flag is not followed (their trace id and parent are kept, the ratio decides),
    /// so no end user can make the node record every one of their messages.
    Api,
    /// Everyone's (a gateway in front sets the flags and clients cannot reach the node
    /// directly).
    All,
    /// Nobody's: `trace_sample_ratio` alone decides, by the trace id when one is given.
    Ignore,
}

/// Who a user may address with typing, receipts, calls and presence watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressPolicy {
    /// Anyone (as direct messages allow).
    Any,
    /// Only the users in the token's `allowed_users` claim (a connection without the claim,
    /// or without a token, may address nobody).
    Claim,
}

/// The whole validated configuration. Field names are the config keys.
#[derive(Clone, Debug)]
pub struct Config {
    // --- listener / runtime ---
    /// `WEBSOCKET_HOST`. Address to bind.
    pub host: String,
    /// `WEBSOCKET_PORT`. TCP port for WebSocket and HTTP.
    pub port: u16,
    /// Shard threads; 0 = one per available core. At most 64.
    pub shards: usize,
    /// Pin each shard thread to a core.
    pub pin_cores: bool,
    /// One SO_REUSEPORT listener per shard (true) or one shared listener polled by every shard.
    pub reuse_port: bool,
    /// listen(2) backlog; the kernel caps it at net.core.somaxconn.
    pub listen_backlog: u32,
    /// TCP_NODELAY on accepted sockets.
    pub tcp_nodelay: bool,
    /// SO_SNDBUF per connection in bytes; 0 = kernel default (autotuned).
    pub so_sndbuf: u32,
    /// SO_RCVBUF per connection in bytes; 0 = kernel default (autotuned).
    pub so_rcvbuf: u32,
    /// The shards' I/O backend.
    pub io_backend: IoBackend,
    /// Under io_uring: sends through the ring (true) or `send`/`sendmsg` calls (false).
    pub io_uring_sends: bool,
    /// Per-shard read buffer (bytes read per recv call).
    pub read_buffer_size: usize,
    /// Most bytes handed to one send/sendmsg call.
    pub write_buffer_size: usize,
    /// WebSocket paths (the first is canonical; the rest are aliases for older clients).
    pub ws_paths: Vec<String>,
    /// `path=dialect` per WebSocket path (`crate::dialect`); a path not listed is native.
    pub ws_dialects: Vec<String>,
    /// Path of a plain WebSocket echo endpoint (protocol conformance); None = off.
    pub echo_path: Option<String>,
    /// TCP port of the TLS listener (the same WebSocket and HTTP service over TLS, beside
    /// `port`); 0 = no TLS listener.
    pub tls_port: u16,
    /// PEM certificate chain of the TLS listener (the server's certificate first).
    pub tls_cert_file: Option<String>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted).
    pub tls_key_file: Option<String>,
    /// Time from TCP accept to a completed TLS handshake on the TLS listener (the upgrade
    /// request then has `handshake_timeout` from the handshake's end).
    pub tls_handshake_timeout: Duration,

    // --- limits ---
    /// `WEBSOCKET_MAX_MESSAGE_SIZE`. Largest inbound message; above it close 1009.
    pub max_message_size: usize,
    /// `WEBSOCKET_LIMITS_MAX_CONNECTIONS`. 0 = derived from RLIMIT_NOFILE at start.
    pub max_connections: u64,
    /// `WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM`. 0 = unlimited.
    pub max_connections_per_room: u32,
    /// Connections (devices) one user may hold on this node, 1 to 65535; above it the upgrade
    /// gets 429 and an in-band `authenticate` gets an error (Centrifugo's `user_connection_limit`).
    pub max_connections_per_user: usize,
    /// Rooms one connection may be subscribed to.
    pub max_rooms_per_connection: usize,
    /// Who a user may address with typing, receipts, calls and presence watches.
    pub address_policy: AddressPolicy,
    /// Bytes of room history one node keeps (split over its shards).
    pub history_bytes_max: usize,
    // ---- typing and receipts
    /// A `typing.start` not renewed within this long ends with a server `typing.stop` (>= 1 s).
    pub typing_ttl: Duration,
    /// Most `messageIds` in one `mark.delivered` / `mark.read` (1 to `RECEIPT_MESSAGE_IDS_LIMIT`).
    pub max_receipt_message_ids: usize,
    // ---- presence
    /// How long a user stays online after its last device left (a reconnect inside it sends
    /// nothing to watchers).
    pub presence_offline_grace: Duration,
    /// Users one connection may watch with `presence.watch`.
    pub max_watched_users_per_connection: usize,
    /// `user_ids` in one `presence.query` / `presence.watch` / `presence.unwatch`.
    pub max_presence_query_users: usize,
    /// Users listed in one room `presence.state` (past it `truncated: true`).
    pub max_presence_room_users: usize,
    // ---- calls
    /// Time a call rings unanswered before both sides get `call.ended` `timeout` (1 s to 1 h).
    pub ring_timeout: Duration,
    /// Calls (ringing or active) one user may be a party to on this node, 1 to 1024.
    pub max_calls_per_user: usize,
    /// Options per room name pattern (`rooms`, a structured key; first match wins).
    pub rooms: Vec<crate::room_options::RoomOptions>,
    /// Longest room name in bytes.
    pub max_room_name_bytes: usize,
    /// Bytes queued for one connection before it is closed with 4008.
    pub send_queue_bytes_max: usize,
    /// Time allowed from TCP accept to a complete upgrade request.
    pub handshake_timeout: Duration,
    /// Largest HTTP upgrade request head in bytes (431 above it).
    pub max_request_header_bytes: usize,
    /// Largest HTTP request body (Content-Length), 1 KiB to 64 MiB; 413 above it.
    pub http_body_bytes_max: usize,
    /// Idle time a kept-alive HTTP connection waits for its next request (at least 1 s).
    pub http_keepalive_timeout: Duration,
    /// Requests served on one HTTP connection before it is closed (at least 1).
    pub http_keepalive_requests_max: u32,
    /// `WEBSOCKET_PING_INTERVAL`. Server ping period on a quiet connection.
    pub ping_interval: Duration,
    /// `WEBSOCKET_PONG_WAIT`. A connection silent this long is dropped.
    pub pong_wait: Duration,
    /// `WEBSOCKET_WRITE_WAIT`. Queued output that makes no progress this long closes the connection.
    pub write_wait: Duration,
    /// Minimum time between two writes to one connection (0 = write as soon as possible).
    /// The first frame after a quiet period and replies to the client's own commands go out at
    /// once; fan-out frames to a connection written less than this ago wait and share a write.
    pub write_coalesce: Duration,
    /// Frames per second queued on one shard from which `write_coalesce` applies (it stops
    /// below half of it); 0 = always. Measured over `LOAD_WINDOW_MS` windows.
    pub write_coalesce_min_rate: u32,
    /// Commands per second a connection may sustain (token bucket refill).
    pub rate_limit_per_sec: u32,
    /// Token bucket size (burst).
    pub rate_limit_burst: u32,
    /// Rejected commands in a row before close 4029.
    pub rate_limit_max_violations: u32,
    /// Allowed `Origin` values; empty = any (and requests without Origin are always allowed).
    pub allowed_origins: Vec<String>,
    /// Let any client `broadcast` (otherwise only `role: admin`).
    pub allow_client_broadcast: bool,

    // --- auth ---
    pub auth_mode: AuthMode,
    /// HMAC secret for HS256/384/512.
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256/ES256/EdDSA.
    pub jwt_public_key_file: Option<String>,
    /// Accepted algorithms, e.g. ["HS256"]. Must all be of one key family.
    pub jwt_algorithms: Vec<String>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    /// Clock leeway for exp/nbf.
    pub jwt_leeway: Duration,
    /// Time for an in-band `authenticate` frame when the upgrade carried no token.
    pub auth_timeout: Duration,
    /// `auth.expiring` is sent this long before `exp`.
    pub token_refresh_window: Duration,
    /// `auth.expired` + close 4003 this long after `exp`.
    pub token_expiry_grace: Duration,

    // --- the auth service (auth_mode service) and custom types through backends ---
    /// The auth service's endpoint, `http://host[:port]/path` (required in service mode).
    pub auth_service_url: Option<String>,
    /// Longest an upgrade waits for the auth service (connect, request and answer).
    pub auth_service_timeout: Duration,
    /// JSON pointer (RFC 6901) of the user id in the auth service's 200 answer.
    pub auth_service_user_pointer: String,
    /// How long an accepted credential is remembered (0 = every upgrade asks).
    pub auth_service_cache_ttl: Duration,
    /// How long a refused credential is remembered (0 = off).
    pub auth_service_negative_cache_ttl: Duration,
    /// Credentials the cache holds at most (oldest out first).
    pub auth_service_cache_entries_max: usize,
    /// Auth-service requests in flight per node; past it an upgrade gets 503 at once.
    pub auth_service_concurrency_max: usize,
    /// Message types (exact, or a prefix ending in `*`) sent to backend endpoints.
    pub rpc_routes: Vec<crate::proxy::RpcRoute>,
    /// Longest a backend call for a custom type may take.
    pub rpc_timeout: Duration,
    /// Backend calls in flight per node; past it `backend busy, retry later`.
    pub rpc_concurrency_max: usize,
    /// Backend calls in flight per connection; past it `too many backend calls in flight`.
    pub rpc_concurrency_per_connection_max: usize,
    /// Largest backend reply body; past it `backend answered garbage`.
    pub rpc_reply_bytes_max: usize,

    // --- direct messages ---
    /// Longest DM `content` in bytes.
    pub max_dm_content_bytes: usize,

    // --- the message store ---
    /// PostgreSQL for the message store (`postgres://user:pass@host:port/db`); None = the
    /// in-memory store. Never logged with its password.
    pub database_url: Option<String>,
    /// PostgreSQL connections the message store's pool holds at most.
    pub database_pool_size: usize,
    /// Longest a new PostgreSQL connection may take to establish.
    pub database_connect_timeout: Duration,
    /// Byte budget of the in-memory store (no `database_url`): past it the oldest messages go.
    pub store_memory_bytes: usize,
    /// Longest a store call may take: a DM past it gets an error and no ack, REST a 503.
    pub store_timeout: Duration,

    // --- Redis (the cluster) ---
    /// Redis for the cluster: one `redis://` (or `rediss://`, TLS) URL, or (with
    /// `redis_cluster`) comma-separated seed URLs of a Redis Cluster; None = this node runs
    /// alone. Never logged with its password.
    pub redis_url: Option<String>,
    /// Sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`) over a Redis Cluster instead of `PUBLISH`.
    pub redis_cluster: bool,
    /// PEM CA certificate(s) that Redis's certificate must chain to (`rediss://`), replacing
    /// the system's roots; None = the system's roots.
    pub redis_tls_ca_file: Option<String>,
    /// PEM client certificate (chain) this node presents to Redis (mutual TLS); with its key.
    pub redis_tls_cert_file: Option<String>,
    /// PEM private key of `redis_tls_cert_file`.
    pub redis_tls_key_file: Option<String>,
    /// Prefix of every Redis channel and key this deployment uses.
    pub redis_prefix: String,
    /// Longest a Redis connection attempt or one command (a pipeline) may take.
    pub redis_timeout: Duration,
    /// How often a canary round trip checks every subscriber connection.
    pub redis_canary_interval: Duration,
    /// A canary not back after this long means the subscription is lost: resubscribe.
    pub redis_canary_timeout: Duration,
    /// Cross-node messages waiting for Redis at most; past it they are dropped and counted.
    pub redis_queue_max: usize,
    /// Bytes of the cross-node messages waiting for Redis at most (same policy).
    pub redis_queue_bytes_max: usize,
    /// Longest wait between two reconnect attempts (the backoff's cap; jittered).
    pub redis_reconnect_max: Duration,
    /// `/ready` stays 200 (saying `redis degraded` in its body) while Redis is unreachable.
    pub redis_ready_when_degraded: bool,
    /// How long Redis remembers a direct message's `clientMsgId` and ack for the other nodes
    /// (`redis_url` set, no `database_url`): a retry within it on any node gets the first ack.
    pub dedup_window: Duration,

    // --- Kafka ---
    /// Kafka bootstrap brokers (`host:port`); empty = no Kafka client runs at all.
    pub kafka_brokers: Vec<String>,
    /// librdkafka's `client.id` (broker logs and quotas name the node by it).
    pub kafka_client_id: String,
    /// Topic every direct message is produced to, keyed by conversationId.
    pub kafka_dm_topic: String,
    /// Longest a DM waits for its delivery report before the sender gets an error (the record
    /// may still be written later: a retry with the same clientMsgId returns its ack).
    pub kafka_ack_timeout: Duration,
    /// librdkafka's `message.timeout.ms`: how long it keeps retrying a record (idempotently)
    /// before it gives up on it.
    pub kafka_message_timeout: Duration,
    /// librdkafka's `linger.ms`: how long the producer waits to fill a batch.
    pub kafka_linger: Duration,
    /// librdkafka's `batch.size`: most bytes of one produce batch (per partition).
    pub kafka_batch_bytes: usize,
    /// librdkafka's `compression.codec`: none, lz4 or snappy (built in; no zlib or zstd).
    pub kafka_compression: KafkaCompression,
    /// DMs produced and waiting for their delivery report, at most; past it a DM gets
    /// `kafka busy, retry later` at once (also librdkafka's queue bound).
    pub kafka_pending_max: usize,
    /// The notification consumer's `group.id` (every node of a deployment shares it, so each
    /// record is consumed by one node).
    pub kafka_group_id: String,
    /// Where records the mapping cannot turn into notifications are produced (same key and
    /// value, the reason and origin in headers).
    pub kafka_dead_letter_topic: String,
    /// Where a group with no committed offset starts: true = the oldest record, false = new
    /// records only.
    pub kafka_from_beginning: bool,
    /// librdkafka's `session.timeout.ms`: how long the group waits for a silent node before
    /// its partitions go to another.
    pub kafka_session_timeout: Duration,
    /// librdkafka's `auto.commit.interval.ms`: how often the consumer commits the offsets of
    /// records it has handed on (a crash replays at most this much; the store dedups it).
    pub kafka_commit_interval: Duration,
    /// The mapping of topics to notifications (`kafka_notifications`, [`crate::notifications`]).
    pub kafka_notifications: Vec<crate::notifications::Rule>,

    // --- Eureka (service discovery, `bridge::eureka`) ---
    /// Eureka servers' service URLs (`http://[user:password@]host:port/eureka/`), tried in
    /// order, the next one after a failure; empty = not registered anywhere.
    pub eureka_url: Vec<String>,
    /// The application name registered (upper-cased, as Eureka keeps it); empty =
    /// `service_name`.
    pub eureka_app_name: String,
    /// The instance id; empty = `<hostname>:<app name, lower case>:<port>`.
    pub eureka_instance_id: String,
    /// The host name registered (and in the health/status URLs); empty = the machine's.
    pub eureka_hostname: String,
    /// The IP address registered; empty = `host` when it is not a wildcard, else the local
    /// address this node reaches Eureka from.
    pub eureka_ip_address: String,
    /// Register the IP address as the host name too (for networks where host names do not
    /// resolve, such as pods).
    pub eureka_prefer_ip_address: bool,
    /// The port registered; 0 = `port`.
    pub eureka_port: u32,
    /// How often the lease is renewed (a heartbeat); whole seconds.
    pub eureka_renewal_interval: Duration,
    /// How long Eureka keeps the instance without a heartbeat; whole seconds.
    pub eureka_lease_duration: Duration,
    /// Longest one request to Eureka may take (connect, send, answer); also bounds the
    /// deregistration at exit.
    pub eureka_timeout: Duration,
    /// Cap of the retry backoff while Eureka does not answer.
    pub eureka_retry_max: Duration,
    /// healthCheckUrl: a path on the registered address, or an absolute URL.
    pub eureka_health_check_url: String,
    /// statusPageUrl: a path on the registered address, or an absolute URL.
    pub eureka_status_page_url: String,
    /// homePageUrl: a path on the registered address, or an absolute URL.
    pub eureka_home_page_url: String,

    // --- distributed tracing (`crate::trace`, exported by `bridge::trace_export`) ---
    /// Where spans go; `Off` = no tracing at all.
    pub trace_exporter: TraceExporter,
    /// The collector's full URL (`http://host:port/path`); empty = the exporter's default.
    pub trace_endpoint: String,
    /// Share of new traces recorded (head sampling at the root), 0.0 to 1.0; a sampled
    /// flag from a trusted caller overrides it (`trace_parent_sampled`).
    pub trace_sample_ratio: f64,
    /// Whose sampled flag is followed.
    pub trace_parent_sampled: TraceParentSampled,
    /// The service name spans carry; empty = `service_name`.
    pub trace_service_name: String,
    /// How often queued spans are sent.
    pub trace_export_interval: Duration,
    /// Most spans in one export request.
    pub trace_export_batch_max: usize,
    /// Longest one export request may take (connect, send, answer).
    pub trace_export_timeout: Duration,

    // --- server HTTP API ---
    /// Key for the server HTTP API (`X-API-Key: <key>` or `Authorization: apikey <key>`);
    /// None = API off. Never logged or echoed in errors.
    pub api_key: Option<String>,
    /// Serve the admin page at `/admin` (it reads `/api/stats` and `/api/admin/activity`
    /// with the API key the operator types in); needs `api_key`.
    pub admin_page: bool,
    /// Origins allowed to call the HTTP API from a browser (CORS, preflight OPTIONS); `*` = any;
    /// empty = no CORS headers.
    pub cors_origins: Vec<String>,

    // --- operations ---
    /// Drain deadline after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// tracing EnvFilter directive, e.g. "info" or "switchboard=debug".
    pub log_level: String,
    /// Refuse to start when max_connections cannot be reached with the machine's limits.
    pub strict: bool,
    /// The `service` field of `/health` (the messaging service answered `messaging-service`).
    pub service_name: String,
    /// Add the serving shard's index to `connected.data.shard` (tests and debugging).
    pub expose_shard: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 8081,
            shards: 0,
            pin_cores: true,
            reuse_port: true,
            listen_backlog: 4096,
            tcp_nodelay: true,
            so_sndbuf: 0,
            so_rcvbuf: 0,
            tls_port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            tls_handshake_timeout: Duration::from_secs(5),
            io_backend: IoBackend::IoUring,
            io_uring_sends: true,
            read_buffer_size: 64 * 1024,
            write_buffer_size: 256 * 1024,
            ws_paths: vec![
                "/ws".into(),
                "/socket/connect".into(),
                "/ws/chat".into(),
                "/api/v1/ws".into(),
            ],
            ws_dialects: vec![
                "/ws=auto".into(),
                "/ws/chat=chat-hub".into(),
                "/api/v1/ws=messaging".into(),
            ],
            echo_path: None,
            max_message_size: 64 * 1024,
            max_connections: 0,
            max_connections_per_room: 100_000,
            max_connections_per_user: 64,
            max_rooms_per_connection: 128,
            address_policy: AddressPolicy::Any,
            history_bytes_max: 64 * 1024 * 1024,
            // ---- typing and receipts
            typing_ttl: Duration::from_secs(6),
            max_receipt_message_ids: 100,
            presence_offline_grace: Duration::from_secs(5),
            max_watched_users_per_connection: 1000,
            max_presence_query_users: 100,
            max_presence_room_users: 1000,
            ring_timeout: Duration::from_secs(45),
            max_calls_per_user: 4,
            rooms: Vec::new(),
            max_room_name_bytes: 256,
            send_queue_bytes_max: 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            max_request_header_bytes: 8 * 1024,
            http_body_bytes_max: 1024 * 1024,
            http_keepalive_timeout: Duration::from_secs(5),
            http_keepalive_requests_max: 1000,
            ping_interval: Duration::from_secs(54),
            pong_wait: Duration::from_secs(60),
            write_wait: Duration::from_secs(10),
            write_coalesce: Duration::from_millis(50),
            write_coalesce_min_rate: 50_000,
            rate_limit_per_sec: 100,
            rate_limit_burst: 200,
            rate_limit_max_violations: 50,
            allowed_origins: Vec::new(),
            allow_client_broadcast: false,
            auth_mode: AuthMode::None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_algorithms: vec!["HS256".into()],
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(10),
            token_refresh_window: Duration::from_secs(60),
            token_expiry_grace: Duration::from_secs(10),
            auth_service_url: None,
            auth_service_timeout: Duration::from_secs(3),
            auth_service_user_pointer: "/user_id".into(),
            auth_service_cache_ttl: Duration::from_secs(30),
            auth_service_negative_cache_ttl: Duration::from_secs(5),
            auth_service_cache_entries_max: 10_000,
            auth_service_concurrency_max: 64,
            rpc_routes: Vec::new(),
            rpc_timeout: Duration::from_secs(5),
            rpc_concurrency_max: 256,
            rpc_concurrency_per_connection_max: 8,
            rpc_reply_bytes_max: 64 * 1024,
            database_url: None,
            database_pool_size: 8,
            database_connect_timeout: Duration::from_secs(5),
            store_memory_bytes: 256 * 1024 * 1024,
            store_timeout: Duration::from_secs(5),
            redis_url: None,
            redis_cluster: false,
            redis_tls_ca_file: None,
            redis_tls_cert_file: None,
            redis_tls_key_file: None,
            redis_prefix: "sb:".into(),
            redis_timeout: Duration::from_secs(2),
            redis_canary_interval: Duration::from_secs(1),
            redis_canary_timeout: Duration::from_secs(3),
            redis_queue_max: 65_536,
            redis_queue_bytes_max: 64 * 1024 * 1024,
            redis_reconnect_max: Duration::from_secs(5),
            redis_ready_when_degraded: false,
            dedup_window: Duration::from_secs(300),
            kafka_brokers: Vec::new(),
            kafka_client_id: "switchboard".into(),
            kafka_dm_topic: "switchboard.direct-messages".into(),
            kafka_ack_timeout: Duration::from_secs(5),
            kafka_message_timeout: Duration::from_secs(300),
            kafka_linger: Duration::from_millis(5),
            kafka_batch_bytes: 1024 * 1024,
            kafka_compression: KafkaCompression::Lz4,
            kafka_pending_max: 65_536,
            kafka_group_id: "messaging-service".into(),
            kafka_dead_letter_topic: "switchboard.dead-letter".into(),
            kafka_from_beginning: false,
            kafka_session_timeout: Duration::from_secs(10),
            kafka_commit_interval: Duration::from_secs(1),
            kafka_notifications: Vec::new(),
            eureka_url: Vec::new(),
            eureka_app_name: String::new(),
            eureka_instance_id: String::new(),
            eureka_hostname: String::new(),
            eureka_ip_address: String::new(),
            eureka_prefer_ip_address: false,
            eureka_port: 0,
            eureka_renewal_interval: Duration::from_secs(30),
            eureka_lease_duration: Duration::from_secs(90),
            eureka_timeout: Duration::from_secs(5),
            eureka_retry_max: Duration::from_secs(30),
            eureka_health_check_url: "/ready".into(),
            eureka_status_page_url: "/health".into(),
            eureka_home_page_url: "/".into(),
            trace_exporter: TraceExporter::Off,
            trace_endpoint: String::new(),
            trace_sample_ratio: 0.01,
            trace_parent_sampled: TraceParentSampled::Api,
            trace_service_name: String::new(),
            trace_export_interval: Duration::from_secs(1),
            trace_export_batch_max: 512,
            trace_export_timeout: Duration::from_secs(5),
            max_dm_content_bytes: 16 * 1024,
            api_key: None,
            admin_page: false,
            cors_origins: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            strict: false,
            service_name: "switchboard".into(),
            expose_shard: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and the key table
// ---------------------------------------------------------------------------------------------

/// A configuration problem. `key` names the offending config key (or flag, or `config` for the
/// file itself); the process should print the error to stderr and exit 2. Two exceptions:
/// [`ConfigError::is_help`] and [`ConfigError::is_version`]: `message` is the text to print to
/// stdout before exiting 0.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    /// `--help`, `-h` or `help`: print `message` (the help) and exit 0.
    pub fn is_help(&self) -> bool {
        self.key == HELP_KEY && self.message.starts_with("Usage: ")
    }

    /// `--version` or `-V`: print `message` and exit 0.
    pub fn is_version(&self) -> bool {
        self.key == VERSION_KEY && self.message.starts_with("switchboard ")
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// One row of the key table that drives the YAML file, the environment, the CLI, `--help` and
/// docs/CONFIG.md.
#[derive(Debug)]
pub struct KeyInfo {
    /// YAML key and [`Config`] field name.
    pub key: &'static str,
    /// `SWITCHBOARD_<KEY>`.
    pub env: &'static str,
    /// The default, in the syntax accepted from the environment and the CLI.
    pub default: &'static str,
    /// One line of meaning.
    pub doc: &'static str,
}

impl KeyInfo {
    /// The CLI flag, e.g. `--read-buffer-size`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

/// Largest config file read, in bytes (a config file is a few KiB; this stops a wrong path such
/// as a device or a log file from being slurped).
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Environment variable naming the YAML file when `--config` is absent.
pub const CONFIG_FILE_ENV: &str = "SWITCHBOARD_CONFIG";

/// Paths served as plain HTTP; WebSocket paths must not shadow them.
const HTTP_PATHS: &[&str] = &[
    "/health",
    "/live",
    "/ready",
    "/metrics",
    "/prometheus/metrics",
];

/// JWT algorithms we accept in `jwt_algorithms`, with their key family.
const JWT_ALGORITHMS: &[(&str, &str)] = &[
    ("HS256", "HMAC"),
    ("HS384", "HMAC"),
    ("HS512", "HMAC"),
    ("RS256", "RSA"),
    ("RS384", "RSA"),
    ("RS512", "RSA"),
    ("PS256", "RSA"),
    ("PS384", "RSA"),
    ("PS512", "RSA"),
    ("ES256", "EC"),
    ("ES384", "EC"),
    ("EdDSA", "Ed25519"),
];

/// Key family of a JWT algorithm name (`HMAC`, `RSA`, `EC`, `Ed25519`), None when unknown.
pub fn jwt_algorithm_family(alg: &str) -> Option<&'static str> {
    JWT_ALGORITHMS
        .iter()
        .find(|(name, _)| *name == alg)
        .map(|(_, family)| *family)
}

/// A value as it arrives from one source, before it is parsed for its key.
enum Raw {
    /// Env var, CLI flag, or a YAML scalar rendered as text.
    Text(String),
    /// A YAML sequence of scalars.
    List(Vec<String>),
    /// YAML `null` / `~` / an empty value.
    Null,
}

impl Raw {
    fn text(&self) -> Result<&str, String> {
        match self {
            Raw::Text(s) => Ok(s),
            Raw::List(_) => Err("expected a single value, not a list".into()),
            Raw::Null => Err("expected a value, not null".into()),
        }
    }

    /// How the value is quoted in an error message. Secrets are never echoed.
    fn shown(&self, key: &str) -> String {
        if matches!(
            key,
            "jwt_secret" | "api_key" | "database_url" | "redis_url" | "eureka_url"
        ) {
            return "<redacted>".into();
        }
        match self {
            Raw::Text(s) => format!("{s:?}"),
            Raw::List(v) => format!("{v:?}"),
            Raw::Null => "null".into(),
        }
    }
}

/// How one kind of value is parsed. Each kind states what it expects, for errors and `--help`.
trait Kind {
    type Out;
    /// Placeholder shown in `--help`, e.g. `<DURATION>`.
    const HINT: &'static str;
    /// A bare `--flag` means true.
    const IS_BOOL: bool = false;
    fn parse(raw: &Raw) -> Result<Self::Out, String>;
}

struct Text;
impl Kind for Text {
    type Out = String;
    const HINT: &'static str = "<TEXT>";
    fn parse(raw: &Raw) -> Result<String, String> {
        raw.text().map(str::to_owned)
    }
}

struct OptText;
impl Kind for OptText {
    type Out = Option<String>;
    const HINT: &'static str = "<TEXT>";
    fn parse(raw: &Raw) -> Result<Option<String>, String> {
        match raw {
            Raw::Null => Ok(None),
            _ => {
                let s = raw.text()?;
                Ok(if s.is_empty() {
                    None
                } else {
                    Some(s.to_owned())
                })
            }
        }
    }
}

struct List;
impl Kind for List {
    type Out = Vec<String>;
    const HINT: &'static str = "<A,B,..>";
    fn parse(raw: &Raw) -> Result<Vec<String>, String> {
        let items: Vec<String> = match raw {
            Raw::Null => Vec::new(),
            Raw::List(v) => v.iter().map(|s| s.trim().to_owned()).collect(),
            Raw::Text(s) if s.trim().is_empty() => Vec::new(),
            Raw::Text(s) => s.split(',').map(|s| s.trim().to_owned()).collect(),
        };
        if items.iter().any(String::is_empty) {
            return Err("expected a comma-separated list without empty entries".into());
        }
        Ok(items)
    }
}

struct Flag;
impl Kind for Flag {
    type Out = bool;
    const HINT: &'static str = "<BOOL>";
    const IS_BOOL: bool = true;
    fn parse(raw: &Raw) -> Result<bool, String> {
        parse_bool(raw.text()?).ok_or_else(|| "expected true or false".into())
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A TCP port or 0 (off).
struct PortOrOff;
impl Kind for PortOrOff {
    type Out = u16;
    const HINT: &'static str = "<PORT>";
    fn parse(raw: &Raw) -> Result<u16, String> {
        raw.text()?
            .trim()
            .parse::<u16>()
            .map_err(|_| "expected an integer 0-65535 (0 = off)".into())
    }
}

struct Port;
impl Kind for Port {
    type Out = u16;
    const HINT: &'static str = "<PORT>";
    fn parse(raw: &Raw) -> Result<u16, String> {
        match raw.text()?.trim().parse::<u16>() {
            Ok(p) if p >= 1 => Ok(p),
            _ => Err("expected an integer 1-65535".into()),
        }
    }
}

fn parse_int<T: std::str::FromStr>(raw: &Raw, max: &str) -> Result<T, String> {
    raw.text()?
        .trim()
        .parse::<T>()
        .map_err(|_| format!("expected an integer 0-{max}"))
}

struct Count;
impl Kind for Count {
    type Out = usize;
    const HINT: &'static str = "<INT>";
    fn parse(raw: &Raw) -> Result<usize, String> {
        parse_int(raw, &usize::MAX.to_string())
    }
}

struct U32;
impl Kind for U32 {
    type Out = u32;
    const HINT: &'static str = "<INT>";
    fn parse(raw: &Raw) -> Result<u32, String> {
        parse_int(raw, &u32::MAX.to_string())
    }
}

struct U64;
impl Kind for U64 {
    type Out = u64;
    const HINT: &'static str = "<INT>";
    fn parse(raw: &Raw) -> Result<u64, String> {
        parse_int(raw, &u64::MAX.to_string())
    }
}

struct Bytes;
impl Kind for Bytes {
    type Out = usize;
    const HINT: &'static str = "<SIZE>";
    fn parse(raw: &Raw) -> Result<usize, String> {
        parse_bytes(raw.text()?)
    }
}

struct BytesU32;
impl Kind for BytesU32 {
    type Out = u32;
    const HINT: &'static str = "<SIZE>";
    fn parse(raw: &Raw) -> Result<u32, String> {
        let n = parse_bytes(raw.text()?)?;
        u32::try_from(n).map_err(|_| format!("expected a size of at most {} bytes", u32::MAX))
    }
}

struct Dur;
impl Kind for Dur {
    type Out = Duration;
    const HINT: &'static str = "<DURATION>";
    fn parse(raw: &Raw) -> Result<Duration, String> {
        parse_duration(raw.text()?)
    }
}

/// Longest DM content with Kafka configured: escaped as JSON (up to 6 bytes per byte) with its
/// envelope, a record stays under `bridge::kafka::RECORD_BYTES_MAX`.
pub const KAFKA_DM_CONTENT_BYTES_MAX: usize = 160 * 1024;

/// Compression of produced Kafka records (the codecs librdkafka carries itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaCompression {
    None,
    Lz4,
    Snappy,
}

impl KafkaCompression {
    /// librdkafka's name of the codec.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Snappy => "snappy",
        }
    }
}

struct KafkaCompressionKind;
impl Kind for KafkaCompressionKind {
    type Out = KafkaCompression;
    const HINT: &'static str = "<none|lz4|snappy>";
    fn parse(raw: &Raw) -> Result<KafkaCompression, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(KafkaCompression::None),
            "lz4" => Ok(KafkaCompression::Lz4),
            "snappy" => Ok(KafkaCompression::Snappy),
            "gzip" | "zstd" => {
                Err("expected none, lz4 or snappy (this build has no zlib or zstd)".into())
            }
            _ => Err("expected none, lz4 or snappy".into()),
        }
    }
}

struct AuthModeKind;
impl Kind for AuthModeKind {
    type Out = AuthMode;
    const HINT: &'static str = "<none|jwt|service>";
    fn parse(raw: &Raw) -> Result<AuthMode, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(AuthMode::None),
            "jwt" => Ok(AuthMode::Jwt),
            "service" => Ok(AuthMode::Service),
            _ => Err("expected none, jwt or service".into()),
        }
    }
}

struct IoBackendKind;
impl Kind for IoBackendKind {
    type Out = IoBackend;
    const HINT: &'static str = "<epoll|io_uring>";
    fn parse(raw: &Raw) -> Result<IoBackend, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "epoll" => Ok(IoBackend::Epoll),
            "io_uring" | "io-uring" | "uring" => Ok(IoBackend::IoUring),
            _ => Err("expected epoll or io_uring".into()),
        }
    }
}

struct LogFormatKind;
impl Kind for LogFormatKind {
    type Out = LogFormat;
    const HINT: &'static str = "<text|json>";
    fn parse(raw: &Raw) -> Result<LogFormat, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

struct TraceExporterKind;
impl Kind for TraceExporterKind {
    type Out = TraceExporter;
    const HINT: &'static str = "<off|otlp|zipkin>";
    fn parse(raw: &Raw) -> Result<TraceExporter, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "" => Ok(TraceExporter::Off),
            "otlp" => Ok(TraceExporter::Otlp),
            "zipkin" => Ok(TraceExporter::Zipkin),
            _ => Err("expected off, otlp or zipkin".into()),
        }
    }
}

struct TraceParentSampledKind;
impl Kind for TraceParentSampledKind {
    type Out = TraceParentSampled;
    const HINT: &'static str = "<api|all|ignore>";
    fn parse(raw: &Raw) -> Result<TraceParentSampled, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "api" => Ok(TraceParentSampled::Api),
            "all" => Ok(TraceParentSampled::All),
            "ignore" | "none" => Ok(TraceParentSampled::Ignore),
            _ => Err("expected api, all or ignore".into()),
        }
    }
}

/// A share between 0 and 1 (`0.25`, or `25%`).
struct Ratio;
impl Kind for Ratio {
    type Out = f64;
    const HINT: &'static str = "<0.0-1.0>";
    fn parse(raw: &Raw) -> Result<f64, String> {
        let t = raw.text()?.trim();
        let v = match t.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
            None => t.parse::<f64>(),
        };
        match v {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err("expected a number from 0.0 to 1.0 (or 0% to 100%)".into()),
        }
    }
}

struct AddressPolicyKind;
impl Kind for AddressPolicyKind {
    type Out = AddressPolicy;
    const HINT: &'static str = "<any|claim>";
    fn parse(raw: &Raw) -> Result<AddressPolicy, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "any" => Ok(AddressPolicy::Any),
            "claim" => Ok(AddressPolicy::Claim),
            _ => Err("expected any or claim".into()),
        }
    }
}

/// The one table: each row names the field, its kind (parser), default text, env names and doc.
/// It generates `KEYS`, `set_key`, `is_bool_key` and `value_hint`, so no field is handled by
/// hand per source.
macro_rules! config_keys {
    ($( $field:ident : $kind:ident = $default:literal, $env:literal, $doc:literal; )*) => {
        static KEYS: &[KeyInfo] = &[$(
            KeyInfo {
                key: stringify!($field),
                env: $env,
                default: $default,
                doc: $doc,
            },
        )*];

        /// Parses `raw` for `key` and stores it. Err is the expectation text; None = no such key.
        fn set_key(cfg: &mut Config, key: &str, raw: &Raw) -> Option<Result<(), String>> {
            match key {
                $( stringify!($field) => Some(<$kind as Kind>::parse(raw).map(|v| cfg.$field = v)), )*
                _ => None,
            }
        }

        fn is_bool_key(key: &str) -> bool {
            match key {
                $( stringify!($field) => <$kind as Kind>::IS_BOOL, )*
                _ => false,
            }
        }

        /// The value `key` holds in `cfg`, as Rust prints it (to compare two sources' values
        /// and for the config dump; secrets are redacted by the callers). None = no such key.
        fn value_debug(cfg: &Config, key: &str) -> Option<String> {
            match key {
                $( stringify!($field) => Some(format!("{:?}", cfg.$field)), )*
                _ => None,
            }
        }

        fn value_hint(key: &str) -> &'static str {
            match key {
                $( stringify!($field) => <$kind as Kind>::HINT, )*
                _ => "<VALUE>",
            }
        }
    };
}

config_keys! {
    host: Text = "0.0.0.0", "SWITCHBOARD_HOST",
        "IP address to bind.";
    port: Port = "8081", "SWITCHBOARD_PORT",
        "TCP port for WebSocket and HTTP.";
    shards: Count = "0", "SWITCHBOARD_SHARDS",
        "Shard threads; 0 = one per available core. At most 64.";
    pin_cores: Flag = "true", "SWITCHBOARD_PIN_CORES",
        "Pin each shard thread to a core.";
    reuse_port: Flag = "true", "SWITCHBOARD_REUSE_PORT",
        "One SO_REUSEPORT listener per shard (true) or one shared listener (false).";
    listen_backlog: U32 = "4096", "SWITCHBOARD_LISTEN_BACKLOG",
        "listen(2) backlog; the kernel caps it at net.core.somaxconn.";
    tcp_nodelay: Flag = "true", "SWITCHBOARD_TCP_NODELAY",
        "Set TCP_NODELAY on accepted sockets.";
    so_sndbuf: BytesU32 = "0", "SWITCHBOARD_SO_SNDBUF",
        "SO_SNDBUF per connection; 0 = kernel default (autotuned).";
    so_rcvbuf: BytesU32 = "0", "SWITCHBOARD_SO_RCVBUF",
        "SO_RCVBUF per connection; 0 = kernel default (autotuned).";
    io_backend: IoBackendKind = "io_uring", "SWITCHBOARD_IO_BACKEND",
        "The shards' I/O: io_uring (multishot accept and receive into a per-shard buffer ring, sends of a loop turn submitted together; kernel 6.0 or newer; falls back to epoll with one log line when the kernel refuses it, and `switchboard doctor` says which would run) or epoll (mio readiness, a recv and a send per connection). The default by measurement: docs/BENCHMARKS.md. TLS connections (tls_port) stay on epoll under either.";
    io_uring_sends: Flag = "true", "SWITCHBOARD_IO_URING_SENDS",
        "With io_backend io_uring: each connection's writes are sendmsg requests in the ring, submitted together once per loop turn, one in flight per connection (true), or send/sendmsg calls as under epoll, with a POLLOUT poll when a socket fills (false).";
    read_buffer_size: Bytes = "64KiB", "SWITCHBOARD_READ_BUFFER_SIZE",
        "Per-shard read buffer (bytes read per recv call). At least 4096.";
    write_buffer_size: Bytes = "256KiB", "SWITCHBOARD_WRITE_BUFFER_SIZE",
        "Most bytes handed to one send/sendmsg call. At least 4096.";
    ws_paths: List = "/ws,/socket/connect,/ws/chat,/api/v1/ws", "SWITCHBOARD_WS_PATHS",
        "WebSocket paths; the first is canonical, the rest are aliases for older clients.";
    ws_dialects: List = "/ws=auto,/ws/chat=chat-hub,/api/v1/ws=messaging", "SWITCHBOARD_WS_DIALECTS",
        "The wire dialect per WebSocket path, as path=dialect: native, topic, chat-hub, messaging, or auto (native, or topic when the first frame has a payload member). A path of ws_paths not listed is native. See docs/DIALECTS.md.";
    echo_path: OptText = "", "SWITCHBOARD_ECHO_PATH",
        "Path of a plain WebSocket echo endpoint (conformance tests); empty = off.";
    tls_port: PortOrOff = "0", "SWITCHBOARD_TLS_PORT",
        "TCP port of a second listener serving the same WebSocket and HTTP endpoints over TLS (wss://, https://), beside port; 0 = off. Needs tls_cert_file and tls_key_file.";
    tls_cert_file: OptText = "", "SWITCHBOARD_TLS_CERT_FILE",
        "With tls_port: PEM certificate chain of the TLS listener, the server's certificate first. Read at start and again on SIGHUP (a reload that fails keeps the certificate in use).";
    tls_key_file: OptText = "", "SWITCHBOARD_TLS_KEY_FILE",
        "With tls_port: the PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted) of tls_cert_file; read at start and on SIGHUP. Keep it readable by this node's user only.";
    tls_handshake_timeout: Dur = "5s", "SWITCHBOARD_TLS_HANDSHAKE_TIMEOUT",
        "Time from TCP accept to a completed TLS handshake on tls_port (the upgrade request then has handshake_timeout from the handshake's end), 100ms to 60s.";
    max_message_size: Bytes = "64KiB", "SWITCHBOARD_MAX_MESSAGE_SIZE",
        "Largest inbound message; above it the connection is closed with 1009. 125 B to 64 MiB.";
    max_connections: U64 = "0", "SWITCHBOARD_MAX_CONNECTIONS",
        "Connection limit per node (503 above it); 0 = derived from RLIMIT_NOFILE at start.";
    max_connections_per_room: U32 = "100000", "SWITCHBOARD_MAX_CONNECTIONS_PER_ROOM",
        "Subscribers per room; 0 = unlimited.";
    max_connections_per_user: Count = "64", "SWITCHBOARD_MAX_CONNECTIONS_PER_USER",
        "Connections (devices) one user may hold on this node, 1 to 65535; above it the upgrade gets 429 / in-band authenticate gets an error.";
    max_rooms_per_connection: Count = "128", "SWITCHBOARD_MAX_ROOMS_PER_CONNECTION",
        "Rooms one connection may be subscribed to. At least 1.";
    address_policy: AddressPolicyKind = "any", "SWITCHBOARD_ADDRESS_POLICY",
        "Who a user may address with typing, receipts, calls and presence watches: any (as direct messages) or claim (only the users in the token's allowed_users claim).";
    history_bytes_max: Bytes = "64MiB", "SWITCHBOARD_HISTORY_BYTES_MAX",
        "Bytes of room history one node keeps, split over its shards; past it the oldest messages go first. 64 KiB to 16 GiB.";
    // ---- typing and receipts
    typing_ttl: Dur = "6s", "SWITCHBOARD_TYPING_TTL",
        "A typing.start not renewed within this long ends with a typing.stop sent by the server. 1s to 24h.";
    max_receipt_message_ids: Count = "100", "SWITCHBOARD_MAX_RECEIPT_MESSAGE_IDS",
        "Most messageIds in one mark.delivered or mark.read (more: error too many messageIds), 1 to 10000.";
    // ---- presence
    presence_offline_grace: Dur = "5s", "SWITCHBOARD_PRESENCE_OFFLINE_GRACE",
        "How long a user stays online after its last device left; a reconnect inside it sends watchers nothing. 1s to 24h.";
    max_watched_users_per_connection: Count = "1000", "SWITCHBOARD_MAX_WATCHED_USERS_PER_CONNECTION",
        "Users one connection may watch (presence.watch), 1 to 100000; past it `too many watched users`.";
    max_presence_query_users: Count = "100", "SWITCHBOARD_MAX_PRESENCE_QUERY_USERS",
        "user_ids in one presence.query, presence.watch or presence.unwatch, 1 to 10000; past it `too many user_ids`.";
    max_presence_room_users: Count = "1000", "SWITCHBOARD_MAX_PRESENCE_ROOM_USERS",
        "Users listed in one room presence.state, 1 to 100000; a bigger room's answer is cut there with truncated: true.";
    // ---- calls
    ring_timeout: Dur = "45s", "SWITCHBOARD_RING_TIMEOUT",
        "Time a call rings unanswered before both sides get call.ended with reason timeout, 1s to 1h.";
    max_calls_per_user: Count = "4", "SWITCHBOARD_MAX_CALLS_PER_USER",
        "Calls (ringing or active) one user may be a party to on this node, 1 to 1024; the caller over it gets too many calls, a callee over it makes the offer end with busy.";
    max_room_name_bytes: Bytes = "256", "SWITCHBOARD_MAX_ROOM_NAME_BYTES",
        "Longest room name in bytes, 1 to 4096.";
    send_queue_bytes_max: Bytes = "1MiB", "SWITCHBOARD_SEND_QUEUE_BYTES_MAX",
        "Bytes queued for one connection before it is closed with 4008. At least 4096.";
    handshake_timeout: Dur = "5s", "SWITCHBOARD_HANDSHAKE_TIMEOUT",
        "Time from TCP accept to a complete upgrade request.";
    max_request_header_bytes: Bytes = "8KiB", "SWITCHBOARD_MAX_REQUEST_HEADER_BYTES",
        "Largest HTTP request head (431 above it), 1 KiB to 1 MiB.";
    http_body_bytes_max: Bytes = "1MiB", "SWITCHBOARD_HTTP_BODY_BYTES_MAX",
        "Largest HTTP request body (Content-Length); 413 above it. 1 KiB to 64 MiB.";
    http_keepalive_timeout: Dur = "5s", "SWITCHBOARD_HTTP_KEEPALIVE_TIMEOUT",
        "Idle time a kept-alive HTTP connection waits for its next request. At least 1s.";
    http_keepalive_requests_max: U32 = "1000", "SWITCHBOARD_HTTP_KEEPALIVE_REQUESTS_MAX",
        "Requests served on one HTTP connection before it is closed. At least 1.";
    ping_interval: Dur = "54s", "SWITCHBOARD_PING_INTERVAL",
        "Server ping period on a quiet connection; must be below pong_wait.";
    pong_wait: Dur = "60s", "SWITCHBOARD_PONG_WAIT",
        "A connection silent this long is dropped.";
    write_wait: Dur = "10s", "SWITCHBOARD_WRITE_WAIT",
        "Queued output that makes no progress this long closes the connection.";
    write_coalesce: Dur = "50ms", "SWITCHBOARD_WRITE_COALESCE",
        "Least time between two writes to one connection, up to 5s; 0 = off. Fan-out frames for a connection written less than this ago wait and share one write (fewer syscalls, up to this much added latency); the first frame after a quiet period and replies go out at once.";
    write_coalesce_min_rate: U32 = "50000", "SWITCHBOARD_WRITE_COALESCE_MIN_RATE",
        "write_coalesce applies only while a shard queues at least this many frames per second (measured over 100 ms; it stops below half of it), so a lightly loaded server never holds a frame. 0 = always.";
    rate_limit_per_sec: U32 = "100", "SWITCHBOARD_RATE_LIMIT_PER_SEC",
        "Commands per second a connection may sustain (token bucket refill). At least 1.";
    rate_limit_burst: U32 = "200", "SWITCHBOARD_RATE_LIMIT_BURST",
        "Token bucket size (burst). At least 1.";
    rate_limit_max_violations: U32 = "50", "SWITCHBOARD_RATE_LIMIT_MAX_VIOLATIONS",
        "Rejected commands in a row before close 4029. 1 to 254.";
    allowed_origins: List = "", "SWITCHBOARD_ALLOWED_ORIGINS",
        "Allowed Origin values; empty = any. Requests without Origin are always allowed.";
    allow_client_broadcast: Flag = "false", "SWITCHBOARD_ALLOW_CLIENT_BROADCAST",
        "Let any client broadcast (otherwise only tokens with role admin).";
    auth_mode: AuthModeKind = "none", "SWITCHBOARD_AUTH_MODE",
        "none (development: ?user_id= or anonymous), jwt, or service (what the client presents is checked by auth_service_url).";
    jwt_secret: OptText = "", "SWITCHBOARD_JWT_SECRET",
        "HMAC secret for HS256/384/512 (prefer the env var: flags show in ps).";
    jwt_public_key_file: OptText = "", "SWITCHBOARD_JWT_PUBLIC_KEY_FILE",
        "PEM public key file for RS*/PS*/ES*/EdDSA.";
    jwt_algorithms: List = "HS256", "SWITCHBOARD_JWT_ALGORITHMS",
        "Accepted JWT algorithms, all of one key family (HS*, RS*/PS*, ES*, EdDSA).";
    jwt_audience: OptText = "", "SWITCHBOARD_JWT_AUDIENCE",
        "Required aud claim; empty = aud not checked.";
    jwt_issuer: OptText = "", "SWITCHBOARD_JWT_ISSUER",
        "Required iss claim; empty = iss not checked.";
    jwt_leeway: Dur = "5s", "SWITCHBOARD_JWT_LEEWAY",
        "Clock leeway for exp and nbf (whole seconds).";
    auth_timeout: Dur = "10s", "SWITCHBOARD_AUTH_TIMEOUT",
        "Time for an in-band authenticate frame when the upgrade carried no token.";
    token_refresh_window: Dur = "60s", "SWITCHBOARD_TOKEN_REFRESH_WINDOW",
        "auth.expiring is sent this long before exp.";
    token_expiry_grace: Dur = "10s", "SWITCHBOARD_TOKEN_EXPIRY_GRACE",
        "auth.expired and close 4003 this long after exp.";
    // ---- the auth service and custom types through backends
    auth_service_url: OptText = "", "SWITCHBOARD_AUTH_SERVICE_URL",
        "auth_mode service: the endpoint (http://host[:port]/path; no https in this build) POSTed the client's token or ?user_id= and address on every upgrade (docs/PROTOCOL.md, Auth modes).";
    auth_service_timeout: Dur = "3s", "SWITCHBOARD_AUTH_SERVICE_TIMEOUT",
        "Longest an upgrade waits for the auth service (connect, request and answer), 10ms to 60s; past it the upgrade gets 503. Not auth_timeout (the in-band authenticate frame).";
    auth_service_user_pointer: Text = "/user_id", "SWITCHBOARD_AUTH_SERVICE_USER_POINTER",
        "JSON pointer (RFC 6901) of the user id (a string or an integer) in the auth service's 200 answer.";
    auth_service_cache_ttl: Dur = "30s", "SWITCHBOARD_AUTH_SERVICE_CACHE_TTL",
        "How long an accepted credential is remembered (the next upgrade with it does not ask), 0 (off) to 1h.";
    auth_service_negative_cache_ttl: Dur = "5s", "SWITCHBOARD_AUTH_SERVICE_NEGATIVE_CACHE_TTL",
        "How long a refused credential is remembered (401 without asking), 0 (off) to 1h. Unanswered requests are never cached.";
    auth_service_cache_entries_max: Count = "10000", "SWITCHBOARD_AUTH_SERVICE_CACHE_ENTRIES_MAX",
        "Credentials the auth-service cache holds at most (oldest out first), 1 to 1000000.";
    auth_service_concurrency_max: Count = "64", "SWITCHBOARD_AUTH_SERVICE_CONCURRENCY_MAX",
        "Auth-service requests in flight per node, 1 to 4096; an upgrade past it gets 503 auth service busy at once.";
    rpc_timeout: Dur = "5s", "SWITCHBOARD_RPC_TIMEOUT",
        "Longest a backend call for a custom message type (rpc_routes) may take, 10ms to 60s; past it the client gets backend timed out, retry later.";
    rpc_concurrency_max: Count = "256", "SWITCHBOARD_RPC_CONCURRENCY_MAX",
        "Backend calls (rpc_routes) in flight per node, 1 to 65536; past it backend busy, retry later.";
    rpc_concurrency_per_connection_max: Count = "8", "SWITCHBOARD_RPC_CONCURRENCY_PER_CONNECTION_MAX",
        "Backend calls (rpc_routes) in flight per connection, 1 to 1024; past it too many backend calls in flight.";
    rpc_reply_bytes_max: Bytes = "64KiB", "SWITCHBOARD_RPC_REPLY_BYTES_MAX",
        "Largest backend reply body (rpc_routes), 1 KiB to 16 MiB; a larger one is backend answered garbage.";
    max_dm_content_bytes: Bytes = "16KiB", "SWITCHBOARD_MAX_DM_CONTENT_BYTES",
        "Longest direct-message content in bytes, 1 B to 64 MiB.";
    // ---- the message store
    database_url: OptText = "", "SWITCHBOARD_DATABASE_URL",
        "PostgreSQL for the message store (postgres://user:password@host:port/database); empty = the in-memory store, which forgets on restart. Prefer the env var: flags show in ps. The password is never logged.";
    database_pool_size: Count = "8", "SWITCHBOARD_DATABASE_POOL_SIZE",
        "PostgreSQL connections the message store holds at most (one writer plus readers), 1 to 256.";
    database_connect_timeout: Dur = "5s", "SWITCHBOARD_DATABASE_CONNECT_TIMEOUT",
        "Longest a new PostgreSQL connection may take; statements, pool waits and idle transactions are bounded by store_timeout.";
    store_memory_bytes: Bytes = "256MiB", "SWITCHBOARD_STORE_MEMORY_BYTES",
        "Byte budget of the in-memory message store (used when database_url is empty): past it the oldest messages are evicted. At least 1 MiB.";
    store_timeout: Dur = "5s", "SWITCHBOARD_STORE_TIMEOUT",
        "Longest a message-store call may take: a direct message past it gets an error and no ack, a REST call 503. At least 100ms.";
    // ---- Redis (the cluster)
    redis_url: OptText = "", "SWITCHBOARD_REDIS_URL",
        "Redis that joins this node to a cluster: a redis:// URL (redis://[:password@]host:port[/db]) or rediss:// for TLS (redis_tls_*; rediss://...#insecure checks no certificate), or with redis_cluster comma-separated seed URLs of a Redis Cluster, all redis:// or all rediss://; empty = this node runs alone, at single-node cost. Prefer the env var. The password is never logged.";
    redis_cluster: Flag = "false", "SWITCHBOARD_REDIS_CLUSTER",
        "redis_url lists seed URLs of a Redis Cluster (7.0 or later): channels go by sharded pub/sub (SPUBLISH/SSUBSCRIBE on the master of each channel's slot, one publisher and one subscriber connection per master) and every key command to the master of its slot.";
    redis_tls_ca_file: OptText = "", "SWITCHBOARD_REDIS_TLS_CA_FILE",
        "With rediss:// in redis_url: PEM file of the CA certificate(s) Redis's certificate must chain to, instead of the system's roots (a private CA); empty = the system's roots. Read once at start.";
    redis_tls_cert_file: OptText = "", "SWITCHBOARD_REDIS_TLS_CERT_FILE",
        "With rediss://: PEM client certificate (chain) this node presents to Redis, for a Redis with tls-auth-clients yes (mutual TLS); needs redis_tls_key_file. Empty = none.";
    redis_tls_key_file: OptText = "", "SWITCHBOARD_REDIS_TLS_KEY_FILE",
        "The PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted) of redis_tls_cert_file; keep it readable by this node's user only.";
    redis_prefix: Text = "sb:", "SWITCHBOARD_REDIS_PREFIX",
        "Prefix of every Redis channel and key of this deployment (two deployments sharing a Redis need different ones), 1 to 64 bytes, no whitespace or braces.";
    redis_timeout: Dur = "2s", "SWITCHBOARD_REDIS_TIMEOUT",
        "Longest a Redis connection attempt, or one command or pipeline, may take; past it the connection is dropped and made again. 100ms to 60s.";
    redis_canary_interval: Dur = "1s", "SWITCHBOARD_REDIS_CANARY_INTERVAL",
        "How often each node publishes a canary to its own channel, to prove its subscriber connection still delivers. 100ms to 60s.";
    redis_canary_timeout: Dur = "3s", "SWITCHBOARD_REDIS_CANARY_TIMEOUT",
        "A canary not back after this long means the subscriber connection delivers nothing (a failover can do that silently): the node resubscribes and /ready says redis degraded until one is back. At least redis_canary_interval, at most 10m.";
    redis_queue_max: Count = "65536", "SWITCHBOARD_REDIS_QUEUE_MAX",
        "Cross-node messages waiting for Redis at most (while it is slow or down); past it the newest are dropped and counted (switchboard_redis_dropped_total). 1024 to 16777216.";
    redis_queue_bytes_max: Bytes = "64MiB", "SWITCHBOARD_REDIS_QUEUE_BYTES_MAX",
        "Bytes of the cross-node messages waiting for Redis at most (envelopes and channel names), beside redis_queue_max: whichever is reached first drops the newest (switchboard_redis_dropped_total). 1MiB to 16GiB.";
    redis_reconnect_max: Dur = "5s", "SWITCHBOARD_REDIS_RECONNECT_MAX",
        "Cap of the reconnect backoff (it starts at 50ms, doubles, and is jittered by up to a half). 100ms to 5m.";
    redis_ready_when_degraded: Flag = "false", "SWITCHBOARD_REDIS_READY_WHEN_DEGRADED",
        "Keep /ready at 200 while a configured Redis is unreachable or degraded (its body still says so): for deployments that prefer a node serving its own clients to one taken out of the load balancer.";
    dedup_window: Dur = "5m", "SWITCHBOARD_DEDUP_WINDOW",
        "With redis_url and no database_url: how long Redis remembers a direct message's clientMsgId and ack for every node, so a retry within it on any node gets the first ack and is not delivered again; later, a retry on another node is a new message (its own node's store still knows it until eviction). 1s to 24h. With database_url the database's key dedups forever and Redis is not asked.";
    // ---- Kafka
    kafka_brokers: List = "", "SWITCHBOARD_KAFKA_BROKERS",
        "Kafka bootstrap brokers, comma-separated host:port; empty = no Kafka: direct messages are acked once stored, no topic is consumed.";
    kafka_client_id: Text = "switchboard", "SWITCHBOARD_KAFKA_CLIENT_ID",
        "client.id of this node's Kafka clients (broker logs and quotas name it).";
    kafka_dm_topic: Text = "switchboard.direct-messages", "SWITCHBOARD_KAFKA_DM_TOPIC",
        "Topic every direct message is produced to (keyed by conversationId; the value is the message.create event). message.ack waits for the broker.";
    kafka_ack_timeout: Dur = "5s", "SWITCHBOARD_KAFKA_ACK_TIMEOUT",
        "Longest a direct message waits for the broker's delivery report before its sender gets an error and no ack, 100ms to kafka_message_timeout.";
    kafka_message_timeout: Dur = "300s", "SWITCHBOARD_KAFKA_MESSAGE_TIMEOUT",
        "How long the producer keeps retrying a record (idempotently, so never twice) before it gives up: librdkafka's message.timeout.ms, 1s to 24h. A record written after its ack timed out is delivered live then; its sender's retry gets the ack.";
    kafka_linger: Dur = "5ms", "SWITCHBOARD_KAFKA_LINGER",
        "linger.ms: how long the producer waits to fill a batch, 0 to 1s (throughput against ack latency).";
    kafka_batch_bytes: Bytes = "1MiB", "SWITCHBOARD_KAFKA_BATCH_BYTES",
        "batch.size: most bytes of one produce batch per partition, 1 KiB to 1 MiB (the record size limit, message.max.bytes, caps it).";
    kafka_compression: KafkaCompressionKind = "lz4", "SWITCHBOARD_KAFKA_COMPRESSION",
        "compression.codec of produced records: none, lz4 or snappy.";
    kafka_pending_max: Count = "65536", "SWITCHBOARD_KAFKA_PENDING_MAX",
        "Direct messages waiting for the broker at most (the pending-ack table, and librdkafka's queue); past it a send gets the error kafka busy, retry later. 16 to 1000000.";
    kafka_group_id: Text = "messaging-service", "SWITCHBOARD_KAFKA_GROUP_ID",
        "Consumer group (group.id) of the notification consumer; every node of a deployment shares it, so each record notifies once.";
    kafka_dead_letter_topic: Text = "switchboard.dead-letter", "SWITCHBOARD_KAFKA_DEAD_LETTER_TOPIC",
        "Topic records that kafka_notifications cannot map are produced to (same key and value; headers dlq-reason, dlq-topic, dlq-partition, dlq-offset).";
    kafka_from_beginning: Flag = "false", "SWITCHBOARD_KAFKA_FROM_BEGINNING",
        "Where the notification group starts on a partition with no committed offset: true = its oldest record (auto.offset.reset=earliest), false = only records written from then on (latest). A committed offset always wins.";
    kafka_session_timeout: Dur = "10s", "SWITCHBOARD_KAFKA_SESSION_TIMEOUT",
        "session.timeout.ms of the notification consumer: a node silent this long loses its partitions to the others (heartbeats every third of it), 3s to 5m.";
    kafka_commit_interval: Dur = "1s", "SWITCHBOARD_KAFKA_COMMIT_INTERVAL",
        "How often the notification consumer commits the offsets of records it has handed on (auto.commit.interval.ms; also on a rebalance and shutdown), 100ms to 1h. After a crash the records since are read again: user notifications are recognised by the store and not shown twice, room ones are sent again.";
    // ---- Eureka (service discovery)
    eureka_url: List = "", "SWITCHBOARD_EUREKA_URL",
        "Eureka servers to register this node with: comma-separated service URLs (http://[user:password@]host:port/eureka/; no https in this build), tried in order, the next after a failure; empty = no registration. Prefer the env var when it holds a password (never logged).";
    eureka_app_name: Text = "", "SWITCHBOARD_EUREKA_APP_NAME",
        "Application name registered (upper-cased, as Eureka keeps it; its lower case is the vipAddress); empty = service_name. Letters, digits, '.', '_', '-'.";
    eureka_instance_id: Text = "", "SWITCHBOARD_EUREKA_INSTANCE_ID",
        "Instance id registered, unique per node; empty = HOSTNAME:app:PORT (eureka_hostname or the machine's host name, the app name in lower case, the registered port: Spring Cloud's default). Letters, digits, '.', '_', '-', ':'.";
    eureka_hostname: Text = "", "SWITCHBOARD_EUREKA_HOSTNAME",
        "Host name registered and used in the health, status and home page URLs; empty = this machine's host name (the IP address with eureka_prefer_ip_address).";
    eureka_ip_address: Text = "", "SWITCHBOARD_EUREKA_IP_ADDRESS",
        "IP address registered (ipAddr); empty = host when it is not 0.0.0.0 or ::, else the local address this node reaches Eureka from.";
    eureka_prefer_ip_address: Flag = "false", "SWITCHBOARD_EUREKA_PREFER_IP_ADDRESS",
        "Register the IP address as the host name too, and use it in the URLs (where host names do not resolve, as between pods).";
    eureka_port: U32 = "0", "SWITCHBOARD_EUREKA_PORT",
        "Port registered (behind a NAT or a port mapping); 0 = port.";
    eureka_renewal_interval: Dur = "30s", "SWITCHBOARD_EUREKA_RENEWAL_INTERVAL",
        "Heartbeat period (leaseInfo.renewalIntervalInSecs), whole seconds, 1s to 5m, below eureka_lease_duration.";
    eureka_lease_duration: Dur = "90s", "SWITCHBOARD_EUREKA_LEASE_DURATION",
        "How long Eureka keeps this instance without a heartbeat (leaseInfo.durationInSecs), whole seconds, up to 1h, above eureka_renewal_interval.";
    eureka_timeout: Dur = "5s", "SWITCHBOARD_EUREKA_TIMEOUT",
        "Longest one request to Eureka may take (connect, send, answer), 100ms to 60s; also the most the deregistration adds to a shutdown.";
    eureka_retry_max: Dur = "30s", "SWITCHBOARD_EUREKA_RETRY_MAX",
        "Cap of the retry backoff while Eureka does not answer (it starts at 50ms, doubles, jittered by up to a half), 100ms to 5m. Never delays the node's start.";
    eureka_health_check_url: Text = "/ready", "SWITCHBOARD_EUREKA_HEALTH_CHECK_URL",
        "healthCheckUrl registered: a path on this node's registered address (http://HOSTNAME:PORT/path), or an absolute http:// or https:// URL (a proxy in front of the node).";
    eureka_status_page_url: Text = "/health", "SWITCHBOARD_EUREKA_STATUS_PAGE_URL",
        "statusPageUrl registered: a path or an absolute URL, as eureka_health_check_url.";
    eureka_home_page_url: Text = "/", "SWITCHBOARD_EUREKA_HOME_PAGE_URL",
        "homePageUrl registered: a path or an absolute URL, as eureka_health_check_url.";
    // ---- distributed tracing
    trace_exporter: TraceExporterKind = "off", "SWITCHBOARD_TRACE_EXPORTER",
        "Distributed tracing: off (no span is made, nothing runs), otlp (OTLP/HTTP JSON to trace_endpoint: an OpenTelemetry Collector, Jaeger, Tempo) or zipkin (Zipkin's v2 JSON API). See docs/OPERATIONS.md, Tracing.";
    trace_endpoint: Text = "", "SWITCHBOARD_TRACE_ENDPOINT",
        "The collector's full URL (http:// only in this build); empty = http://127.0.0.1:4318/v1/traces for otlp, http://127.0.0.1:9411/api/v2/spans for zipkin.";
    trace_sample_ratio: Ratio = "0.01", "SWITCHBOARD_TRACE_SAMPLE_RATIO",
        "Share of new traces recorded, 0.0 to 1.0, decided once at the root span (by the caller's trace id when it sends one, so every service agrees); trace_parent_sampled says whose sampled flag overrides it.";
    trace_parent_sampled: TraceParentSampledKind = "api", "SWITCHBOARD_TRACE_PARENT_SAMPLED",
        "Whose sampled flag (traceparent, B3) decides a trace: api (requests carrying api_key, and Kafka records; a WebSocket client's or REST user's trace id is continued but the ratio decides, so no end user can force every message of theirs to be recorded), all (everyone's: a gateway in front sets the flags) or ignore (the ratio alone).";
    trace_service_name: Text = "", "SWITCHBOARD_TRACE_SERVICE_NAME",
        "service.name of the spans (Zipkin's localEndpoint.serviceName); empty = service_name.";
    trace_export_interval: Dur = "1s", "SWITCHBOARD_TRACE_EXPORT_INTERVAL",
        "How often queued spans are sent to the collector, 10ms to 1m. The queue holds 8192 spans; past it spans are dropped and counted (switchboard_trace_spans_dropped_total).";
    trace_export_batch_max: Count = "512", "SWITCHBOARD_TRACE_EXPORT_BATCH_MAX",
        "Most spans in one export request, 1 to 8192.";
    trace_export_timeout: Dur = "5s", "SWITCHBOARD_TRACE_EXPORT_TIMEOUT",
        "Longest one export request may take (connect, send, answer), 100ms to 60s; a batch that fails is dropped and counted, and the next is tried after a backoff.";
    api_key: OptText = "", "SWITCHBOARD_API_KEY",
        "Key for the server HTTP API (X-API-Key or Authorization: apikey <key>); empty = API off. Prefer the env var: flags show in ps. Never logged.";
    admin_page: Flag = "false", "SWITCHBOARD_ADMIN_PAGE",
        "Serve the admin page at /admin: nodes, connections, rooms, the busiest rooms, deliveries per second and latency as live charts, errors by reason. The page asks for api_key (required with it) and sends it on its own requests; the page itself holds no data.";
    cors_origins: List = "", "SWITCHBOARD_CORS_ORIGINS",
        "Origins allowed to call the HTTP API from a browser (CORS, preflight OPTIONS), e.g. https://app.example; * = any; empty = no CORS headers.";
    shutdown_timeout: Dur = "30s", "SWITCHBOARD_SHUTDOWN_TIMEOUT",
        "Drain deadline after SIGTERM/SIGINT.";
    log_format: LogFormatKind = "text", "SWITCHBOARD_LOG_FORMAT",
        "Log output: text or json.";
    log_level: Text = "info", "SWITCHBOARD_LOG_LEVEL",
        "tracing filter directive, e.g. info or switchboard=debug.";
    strict: Flag = "false", "SWITCHBOARD_STRICT",
        "Refuse to start when max_connections cannot be reached with the machine's limits.";
    service_name: Text = "switchboard", "SWITCHBOARD_SERVICE_NAME",
        "The service field of /health (the messaging service's clients and monitors read it; it answered messaging-service).";
    expose_shard: Flag = "false", "SWITCHBOARD_EXPOSE_SHARD",
        "Add the serving shard's index to connected.data.shard (for tests and debugging).";
}

/// Where a value came from, for error messages and cross-field checks.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A YAML file; `at` is the dotted path when the key was not written flat at the top level.
    File {
        path: &'a str,
        at: Option<&'a str>,
    },
    Env(&'a str),
    Flag(&'a str),
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path, at: None } => write!(f, "in {path}"),
            Source::File { path, at: Some(at) } => write!(f, "in {path} at {at}"),
            Source::Env(name) => write!(f, "from env {name}"),
            Source::Flag(flag) => write!(f, "from flag {flag}"),
        }
    }
}

/// Which source set each key last; a key absent here holds its default. Cross-field errors
/// quote it so the operator knows which file line, env var or flag to change.
#[derive(Default)]
struct Sources(std::collections::HashMap<String, String>);

impl Sources {
    fn of(&self, key: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| "default".to_owned())
    }
}

fn apply(cfg: &mut Config, key: &str, raw: &Raw, source: Source<'_>) -> Result<(), ConfigError> {
    match set_key(cfg, key, raw) {
        Some(Ok(())) => Ok(()),
        Some(Err(expected)) => Err(ConfigError::new(
            key,
            format!("invalid value {} {source}: {expected}", raw.shown(key)),
        )),
        None => Err(ConfigError::new(key, format!("unknown key {source}"))),
    }
}

/// A key whose value is structured (a list of maps, a map of lists): the loader hands the raw
/// YAML value to `apply` instead of flattening it. This is how keys such as room patterns or
/// topic mappings are added: one row here with a parser into the key's own typed field.
///
/// The same key is accepted at `key` (flat) or nested (`a: {b: ...}` for `a_b`) in the file,
/// from `SWITCHBOARD_<KEY>` and from `--key-with-dashes`; env and flag values are parsed as
/// YAML flow text (so JSON works: `[{"pattern": "chat.*", "max": 10}]`).
pub(crate) struct StructuredKey {
    /// Flat key name, as for [`KeyInfo::key`].
    pub key: &'static str,
    /// `SWITCHBOARD_<KEY>`.
    pub env: &'static str,
    /// Parses the value and stores it in its field; Err is what was expected.
    pub apply: fn(&mut Config, &serde_norway::Value) -> Result<(), String>,
    /// One line of meaning, for `--help` and docs/CONFIG.md (listed after [`KEYS`]; the
    /// default of a structured key is always "none").
    pub doc: &'static str,
}

impl StructuredKey {
    fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

/// The structured keys of the product: `rooms` (see [`crate::room_options`]). A unit test with a test-only
/// key (`test_paths` in the tests below) keep the path working. Adding one: a typed field in
/// [`Config`] with its default, a row here with a parser into it, and its range checks in
/// `validate_from`; `--help` and docs/CONFIG.md list it after the scalar keys.
static STRUCTURED: &[StructuredKey] = &[
    StructuredKey {
        key: "rooms",
        env: "SWITCHBOARD_ROOMS",
        apply: |cfg, v| {
            cfg.rooms = crate::room_options::parse(v)?;
            Ok(())
        },
        doc: "Options per room name pattern, first match wins: a list of {pattern, ordered, history_size, history_ttl, join_leave, presence} (docs/CONFIG.md#rooms). Rooms no pattern matches have everything off.",
    },
    StructuredKey {
        key: "kafka_notifications",
        env: "SWITCHBOARD_KAFKA_NOTIFICATIONS",
        apply: |cfg, v| {
            cfg.kafka_notifications = crate::notifications::parse(v)?;
            Ok(())
        },
        doc: "Kafka topics turned into notifications, first match wins: a list of {topic or pattern, user or room (key or a JSON pointer), kind, data} (docs/CONFIG.md#notifications-from-kafka-topics; example: docs/examples/notifications.yaml). Empty = no consumer runs.",
    },
    StructuredKey {
        key: "rpc_routes",
        env: "SWITCHBOARD_RPC_ROUTES",
        apply: |cfg, v| {
            cfg.rpc_routes = crate::proxy::parse_routes(v)?;
            Ok(())
        },
        doc: "Custom message types sent to backends: a map from a type (exact, or a prefix ending in *) to an http:// endpoint; in env also type=url,type2=url. The longest match wins; native types are never routed (docs/PROTOCOL.md, Custom message types).",
    },
];

/// What a setting of one of the services Switchboard replaces does here.
#[derive(Clone, Copy)]
enum Legacy {
    /// Same meaning as this native key (its value is parsed as that key's).
    Key(&'static str),
    /// Same meaning as this native key, and, without an explicit `auth_mode`, it turns JWT
    /// authentication on (a migrated deployment never falls back to trusting `?user_id=`).
    AuthKey(&'static str),
    /// Accepted for compatibility, with one start-up line giving this reason.
    NoEffect(&'static str),
    /// `enabled` of the rooms module: `true` is always so here; `false` refuses to start.
    Enabled,
    /// `AUTH_ENABLED` of the chat hub: `true` turns JWT auth on (see [`Legacy::AuthKey`]) and
    /// needs a secret; `false` has no effect (see `auth_enabled`).
    AuthEnabled,
}

/// The services Switchboard replaces, as docs/CONFIG.md names them.
const ROOMS: &str = "rooms module";
const CHAT_HUB: &str = "chat hub";
const TOPIC: &str = "topic service";
const MESSAGING: &str = "messaging service";
const ROOMS_AND_TOPIC: &str = "rooms module, topic service";

/// Reasons shared by the env and the YAML spelling of a setting.
const WHY_TIMEOUT: &str = "the rooms module's single timeout is split here into \
    handshake_timeout, auth_timeout, pong_wait and write_wait; set those instead";
const WHY_READ_BUFFER: &str = "it sized a per-connection read buffer there; here one read buffer \
    per shard (read_buffer_size, at least 4096 bytes) serves every connection, so the old \
    per-connection value does not apply";
const WHY_WRITE_BUFFER: &str = "it sized a per-connection write buffer there; here output is \
    queued per connection up to send_queue_bytes_max and written in chunks of write_buffer_size \
    per shard, so the old per-connection value does not apply";
const WHY_CLIENT_BUFFER: &str = "it counted messages in a connection's send channel there; here \
    a connection's queue is bounded in bytes by send_queue_bytes_max (close 4008 past it)";
const WHY_CLEANUP: &str = "there a sweep looked for dead connections every interval; here each \
    connection has its own timer (pong_wait, write_wait), so there is no sweep";
const WHY_STALE: &str = "here a connection silent for pong_wait is dropped (pong_wait of the same \
    block applies)";
const WHY_HUB_CHANNEL: &str = "it sized a channel of the topic service's hub goroutine; \
    Switchboard has no hub: shards talk over bounded inboxes whose sizes are fixed in \
    src/limits.rs";
const WHY_ENVIRONMENT: &str = "Switchboard has no development or production mode: every \
    setting is explicit (for JSON logs set log_format json)";

/// The `websocket:` YAML blocks of the rooms module (with `limits:` inside) and of the topic
/// service, as written there, and what each key does here. A native key written in the same
/// file beats the block's key (whatever the order in the file).
static LEGACY_YAML: &[(&str, &str, Legacy)] = &[
    ("websocket.enabled", ROOMS, Legacy::Enabled),
    ("websocket.host", ROOMS, Legacy::Key("host")),
    ("websocket.port", ROOMS, Legacy::Key("port")),
    ("websocket.timeout", ROOMS, Legacy::NoEffect(WHY_TIMEOUT)),
    (
        "websocket.read_buffer_size",
        ROOMS_AND_TOPIC,
        Legacy::NoEffect(WHY_READ_BUFFER),
    ),
    (
        "websocket.write_buffer_size",
        ROOMS_AND_TOPIC,
        Legacy::NoEffect(WHY_WRITE_BUFFER),
    ),
    (
        "websocket.max_message_size",
        ROOMS_AND_TOPIC,
        Legacy::Key("max_message_size"),
    ),
    (
        "websocket.ping_interval",
        ROOMS,
        Legacy::Key("ping_interval"),
    ),
    ("websocket.ping_period", TOPIC, Legacy::Key("ping_interval")),
    (
        "websocket.pong_wait",
        ROOMS_AND_TOPIC,
        Legacy::Key("pong_wait"),
    ),
    (
        "websocket.write_wait",
        ROOMS_AND_TOPIC,
        Legacy::Key("write_wait"),
    ),
    (
        "websocket.client_buffer_size",
        TOPIC,
        Legacy::NoEffect(WHY_CLIENT_BUFFER),
    ),
    (
        "websocket.cleanup_interval",
        TOPIC,
        Legacy::NoEffect(WHY_CLEANUP),
    ),
    (
        "websocket.stale_connection_timeout",
        TOPIC,
        Legacy::NoEffect(WHY_STALE),
    ),
    (
        "websocket.register_buffer",
        TOPIC,
        Legacy::NoEffect(WHY_HUB_CHANNEL),
    ),
    (
        "websocket.unregister_buffer",
        TOPIC,
        Legacy::NoEffect(WHY_HUB_CHANNEL),
    ),
    (
        "websocket.broadcast_buffer",
        TOPIC,
        Legacy::NoEffect(WHY_HUB_CHANNEL),
    ),
    (
        "websocket.limits.max_connections",
        ROOMS,
        Legacy::Key("max_connections"),
    ),
    (
        "websocket.limits.max_connections_per_room",
        ROOMS,
        Legacy::Key("max_connections_per_room"),
    ),
];

/// The environment variables of the services Switchboard replaces, and what each does here.
/// They rank just below the native `SWITCHBOARD_*` variable of the same key and above the
/// config file. Two of them naming one key with different values refuse the start (naming
/// both); the same value twice is fine.
static ENV_ALIASES: &[(&str, &str, Legacy)] = &[
    ("WEBSOCKET_ENABLED", ROOMS, Legacy::Enabled),
    ("WEBSOCKET_HOST", ROOMS, Legacy::Key("host")),
    ("HTTP_HOST", CHAT_HUB, Legacy::Key("host")),
    ("WEBSOCKET_PORT", ROOMS, Legacy::Key("port")),
    ("HTTP_PORT", CHAT_HUB, Legacy::Key("port")),
    ("PORT", MESSAGING, Legacy::Key("port")),
    ("WEBSOCKET_TIMEOUT", ROOMS, Legacy::NoEffect(WHY_TIMEOUT)),
    (
        "WEBSOCKET_READ_BUFFER_SIZE",
        ROOMS,
        Legacy::NoEffect(WHY_READ_BUFFER),
    ),
    (
        "WEBSOCKET_WRITE_BUFFER_SIZE",
        ROOMS,
        Legacy::NoEffect(WHY_WRITE_BUFFER),
    ),
    (
        "WEBSOCKET_MAX_MESSAGE_SIZE",
        ROOMS,
        Legacy::Key("max_message_size"),
    ),
    (
        "WEBSOCKET_PING_INTERVAL",
        ROOMS,
        Legacy::Key("ping_interval"),
    ),
    ("WEBSOCKET_PONG_WAIT", ROOMS, Legacy::Key("pong_wait")),
    ("WEBSOCKET_WRITE_WAIT", ROOMS, Legacy::Key("write_wait")),
    (
        "WEBSOCKET_LIMITS_MAX_CONNECTIONS",
        ROOMS,
        Legacy::Key("max_connections"),
    ),
    (
        "WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM",
        ROOMS,
        Legacy::Key("max_connections_per_room"),
    ),
    ("AUTH_ENABLED", CHAT_HUB, Legacy::AuthEnabled),
    // AUTH_TIMEOUT is the chat hub's timeout for calling its auth service, not the in-band
    // `auth_timeout`.
    (
        "AUTH_SERVICE_URL",
        CHAT_HUB,
        Legacy::Key("auth_service_url"),
    ),
    (
        "AUTH_TIMEOUT",
        CHAT_HUB,
        Legacy::Key("auth_service_timeout"),
    ),
    ("ENVIRONMENT", MESSAGING, Legacy::NoEffect(WHY_ENVIRONMENT)),
    ("DATABASE_URL", MESSAGING, Legacy::Key("database_url")),
    ("REDIS_URL", MESSAGING, Legacy::Key("redis_url")),
    ("KAFKA_BROKERS", MESSAGING, Legacy::Key("kafka_brokers")),
    ("KAFKA_GROUP_ID", MESSAGING, Legacy::Key("kafka_group_id")),
    ("JWT_SECRET", MESSAGING, Legacy::AuthKey("jwt_secret")),
];

/// `websocket.limits.max_connections` -> `WEBSOCKET_LIMITS_MAX_CONNECTIONS` (the rooms
/// module's env spelling of its YAML path; also what dedups a no-effect line between the two).
fn legacy_env_name(path: &str) -> String {
    path.replace('.', "_").to_ascii_uppercase()
}

/// The env aliases of `key`, in table order (for `--help` and docs/CONFIG.md).
fn env_aliases_of(key: &str) -> impl Iterator<Item = &'static str> + '_ {
    ENV_ALIASES.iter().filter_map(move |(name, _, l)| match l {
        Legacy::Key(k) | Legacy::AuthKey(k) if *k == key => Some(*name),
        _ => None,
    })
}

/// Env variables with the `SWITCHBOARD_` prefix that are not settings but are read elsewhere
/// (so they draw no "unknown variable" warning).
const ENV_NOT_SETTINGS: &[&str] = &[CONFIG_FILE_ENV, "SWITCHBOARD_BLESS_DOCS", crate::fault::ENV];

/// Largest edit distance at which a name is offered as "did you mean".
const SUGGEST_DISTANCE_MAX: usize = 3;

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely typo.
fn closest<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= SUGGEST_DISTANCE_MAX)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// The key closest to `name` by edit distance, if it is close enough to be a likely typo.
fn suggest(name: &str) -> Option<&'static str> {
    closest(name, KEYS.iter().map(|k| k.key))
}

/// Levenshtein distance; inputs are short config names (bounded by the caller's input).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diag = above;
        }
    }
    row[b.len()]
}

fn unknown(what: &str, name: &str, dashes: bool) -> String {
    match suggest(&name.replace('-', "_")) {
        Some(k) if dashes => format!("unknown {what}; did you mean --{}?", k.replace('_', "-")),
        Some(k) => format!("unknown {what}; did you mean `{k}`?"),
        None => format!("unknown {what}; see --help for the list"),
    }
}

/// "unknown key" for a YAML path, suggesting the closest path that would be accepted there.
fn unknown_path(path: &str, structured: &[StructuredKey]) -> String {
    let parent = path.rsplit_once('.').map(|(p, _)| p);
    let flat_names = KEYS
        .iter()
        .map(|k| k.key)
        .chain(structured.iter().map(|s| s.key));
    let mut candidates: Vec<String> = Vec::new();
    for name in flat_names {
        candidates.push(name.to_owned());
        if let Some(p) = parent {
            let head = format!("{}_", p.replace('.', "_"));
            if let Some(rest) = name.strip_prefix(&head) {
                candidates.push(format!("{p}.{rest}"));
            }
        }
    }
    candidates.extend(LEGACY_YAML.iter().map(|(p, _, _)| (*p).to_owned()));
    match closest(path, candidates.iter().map(String::as_str)) {
        Some(c) => format!("unknown key; did you mean `{c}`?"),
        None => "unknown key; see --help for the list".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// What a CLI flag sets.
enum FlagTarget {
    Key(&'static str),
    Structured(&'static str),
}

/// Flags parsed from the command line, applied last.
struct CliArgs {
    config_path: Option<String>,
    /// (target, value, flag as typed) in command-line order.
    values: Vec<(FlagTarget, String, String)>,
}

fn parse_args(args: &[String], structured: &[StructuredKey]) -> Result<CliArgs, ConfigError> {
    let mut out = CliArgs {
        config_path: None,
        values: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if matches!(arg.as_str(), "--help" | "-h" | "help") || arg.starts_with("--help=") {
            return Err(ConfigError::new(HELP_KEY, Config::help_text()));
        }
        if matches!(arg.as_str(), "--version" | "-V") || arg.starts_with("--version=") {
            return Err(ConfigError::new(VERSION_KEY, version_text()));
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ConfigError::new(
                arg.as_str(),
                "unexpected argument; settings are given as --key value, and the only \
                 subcommands are `doctor`, `config` and `help`",
            ));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let flag = format!("--{name}");
        let target = if name == "config" || name.contains('_') {
            None
        } else {
            let key = name.replace('-', "_");
            KEYS.iter()
                .find(|k| k.key == key)
                .map(|k| FlagTarget::Key(k.key))
                .or_else(|| {
                    structured
                        .iter()
                        .find(|s| s.key == key)
                        .map(|s| FlagTarget::Structured(s.key))
                })
        };
        let bool_flag = matches!(target, Some(FlagTarget::Key(k)) if is_bool_key(k));
        if name != "config" && target.is_none() {
            return Err(ConfigError::new(flag, unknown("flag", name, true)));
        }
        let value = match inline {
            Some(v) => v,
            None if bool_flag => match args.get(i).and_then(|next| parse_bool(next)) {
                Some(b) => {
                    i += 1;
                    b.to_string()
                }
                None => "true".to_owned(),
            },
            None => match args.get(i) {
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    next.clone()
                }
                _ => return Err(ConfigError::new(flag, "missing value")),
            },
        };
        match target {
            Some(t) => out.values.push((t, value, flag)),
            None => out.config_path = Some(value),
        }
    }
    Ok(out)
}

/// Turns one YAML value into a [`Raw`] for a key that takes one value or a list of values.
fn yaml_raw(value: &serde_norway::Value) -> Result<Raw, String> {
    use serde_norway::Value;
    let scalar = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    match value {
        Value::Null => Ok(Raw::Null),
        Value::Sequence(items) => items
            .iter()
            .map(|v| scalar(v).ok_or_else(|| "expected a list of plain values".to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map(Raw::List),
        Value::Mapping(_) => Err("expected a plain value or a list, not a map".into()),
        v => scalar(v)
            .map(Raw::Text)
            .ok_or_else(|| "expected a plain value or a list".into()),
    }
}

fn read_config_file(path: &str) -> Result<String, ConfigError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError::new("config", format!("cannot open {path}: {e}")))?;
    let mut text = String::new();
    file.take(CONFIG_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| ConfigError::new("config", format!("cannot read {path}: {e}")))?;
    if text.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::new(
            "config",
            format!("{path} is larger than {CONFIG_FILE_BYTES_MAX} bytes"),
        ));
    }
    Ok(text)
}

/// `scheme://user:password@host/...` as `scheme://user:<redacted>@host/...` (a URL without
/// credentials as it is), for the config dump.
pub fn url_without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!(
                "{scheme}://{user}:<redacted>@{host}{}",
                &rest[authority_end..]
            )
        }
        None => url.to_owned(),
    }
}

/// A loaded configuration and the warnings to log once logging is up (one line each).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Accepted-but-odd input: settings of the replaced services without effect here, values
    /// clamped into range, auth inferred, misspelled-looking env variables. Never contains a
    /// secret value.
    pub warnings: Vec<String>,
    /// Where each key's value came from (`in app.yaml`, `from env SWITCHBOARD_PORT`,
    /// `alias env PORT`, `alias websocket.port in app.yaml`); a key absent here is the default.
    pub sources: std::collections::HashMap<String, String>,
}

impl Loaded {
    /// Every key with its value and where it came from, one `key = value  # source` line each
    /// (`switchboard config`). Secrets (jwt_secret, api_key, database_url) are never shown.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for k in KEYS {
            let value = match k.key {
                // The URLs, without their passwords.
                "eureka_url" => format!(
                    "{:?}",
                    self.config
                        .eureka_url
                        .iter()
                        .map(|u| url_without_password(u))
                        .collect::<Vec<_>>()
                ),
                "jwt_secret" | "api_key" | "database_url" | "redis_url" => {
                    match value_debug(&self.config, k.key).as_deref() {
                        Some("None") => "None".to_owned(),
                        _ => "<redacted>".to_owned(),
                    }
                }
                key => {
                    let v = value_debug(&self.config, key).unwrap_or_default();
                    // An optional value that is set prints as the value itself.
                    match v.strip_prefix("Some(").and_then(|s| s.strip_suffix(')')) {
                        Some(inner) => inner.to_owned(),
                        None => v,
                    }
                }
            };
            let source = self
                .sources
                .get(k.key)
                .map(String::as_str)
                .unwrap_or("default");
            out.push_str(&format!("{} = {value}  # {source}\n", k.key));
        }
        for s in STRUCTURED {
            let source = self
                .sources
                .get(s.key)
                .map(String::as_str)
                .unwrap_or("default");
            out.push_str(&format!("{} = <structured>  # {source}\n", s.key));
        }
        out
    }
}

/// One load in progress: the values so far, which source set each, and the warnings.
struct Loader<'s> {
    cfg: Config,
    sources: Sources,
    warnings: Vec<String>,
    /// Settings already warned about as having no effect (one line each however many sources
    /// set them; a YAML path counts as its env spelling).
    no_effect_warned: Vec<String>,
    /// Keys whose current value came from an alias (a later native source removes them):
    /// only these are clamped into range instead of refused.
    alias_set: Vec<&'static str>,
    /// What turned JWT auth on without an explicit `auth_mode` (`env JWT_SECRET`).
    auth_inferred: Option<String>,
    /// `AUTH_ENABLED=true` was given (it needs a key to verify tokens with).
    auth_enabled: bool,
    structured: &'s [StructuredKey],
}

/// A boolean of an old service (`enabled`, `AUTH_ENABLED`), or an error naming it.
fn legacy_bool(raw: &Raw, label: &str) -> Result<bool, ConfigError> {
    raw.text()
        .ok()
        .and_then(parse_bool)
        .ok_or_else(|| ConfigError::new(label, "expected true or false"))
}

/// A key of the `websocket:` block, held until the whole file is read (a native key of the
/// same file wins over it).
struct BlockValue {
    path: String,
    key: &'static str,
    raw: Raw,
    /// The value as parsed for `key` (to compare with a native key or a sibling alias).
    parsed: String,
}

impl Loader<'_> {
    fn new(structured: &[StructuredKey]) -> Loader<'_> {
        Loader {
            cfg: Config::default(),
            sources: Sources::default(),
            warnings: Vec::new(),
            no_effect_warned: Vec::new(),
            alias_set: Vec::new(),
            auth_inferred: None,
            auth_enabled: false,
            structured,
        }
    }

    fn set(&mut self, key: &str, raw: &Raw, source: Source<'_>) -> Result<(), ConfigError> {
        apply(&mut self.cfg, key, raw, source)?;
        self.sources.0.insert(key.to_owned(), source.to_string());
        self.alias_set.retain(|k| *k != key);
        Ok(())
    }

    /// Sets `key` from an alias; `label` says which (`env PORT`, `websocket.port in f.yaml`).
    fn set_alias(
        &mut self,
        key: &'static str,
        raw: &Raw,
        source: Source<'_>,
        label: &str,
    ) -> Result<(), ConfigError> {
        self.set(key, raw, source)?;
        self.sources
            .0
            .insert(key.to_owned(), format!("alias {label}"));
        self.alias_set.push(key);
        Ok(())
    }

    fn set_structured(
        &mut self,
        s: &StructuredKey,
        value: &serde_norway::Value,
        source: Source<'_>,
    ) -> Result<(), ConfigError> {
        (s.apply)(&mut self.cfg, value)
            .map_err(|m| ConfigError::new(s.key, format!("invalid value {source}: {m}")))?;
        self.sources.0.insert(s.key.to_owned(), source.to_string());
        Ok(())
    }

    /// Structured values from env and flags arrive as YAML flow (or JSON) text.
    fn set_structured_text(
        &mut self,
        s: &StructuredKey,
        text: &str,
        source: Source<'_>,
    ) -> Result<(), ConfigError> {
        let value: serde_norway::Value = match serde_norway::from_str(text) {
            Ok(v) => v,
            // Not YAML and not a map or list: the key's parser gets the text itself (the
            // `type=url,type2=url` form of `rpc_routes`, whose `*` YAML reads as an alias).
            Err(_) if !text.trim_start().starts_with(['{', '[']) => {
                serde_norway::Value::String(text.to_owned())
            }
            Err(e) => {
                return Err(ConfigError::new(
                    s.key,
                    format!("invalid value {source}: expected YAML or JSON: {e}"),
                ))
            }
        };
        self.set_structured(s, &value, source)
    }

    /// One line per setting without effect, however many sources set it.
    fn no_effect(&mut self, id: String, label: &str, why: &str) {
        if self.no_effect_warned.contains(&id) {
            return;
        }
        self.no_effect_warned.push(id);
        self.warnings
            .push(format!("{label} has no effect here: {why}"));
    }

    /// Handles every kind of legacy setting but a key mapping, which it returns for the caller
    /// to apply (at once for env, after the file for the `websocket:` block).
    fn legacy(
        &mut self,
        id: String,
        label: &str,
        legacy: Legacy,
        raw: Raw,
    ) -> Result<Option<(&'static str, Raw)>, ConfigError> {
        match legacy {
            Legacy::Key(key) => return Ok(Some((key, raw))),
            Legacy::AuthKey(key) => {
                if matches!(&raw, Raw::Text(t) if !t.is_empty()) && self.auth_inferred.is_none() {
                    self.auth_inferred = Some(label.to_owned());
                }
                return Ok(Some((key, raw)));
            }
            Legacy::NoEffect(why) => self.no_effect(id, label, why),
            Legacy::Enabled => {
                if !legacy_bool(&raw, label)? {
                    return Err(ConfigError::new(
                        label,
                        "is false: the rooms module's WebSocket server was turned off, but \
                         Switchboard is that WebSocket server, so it does not start; unset it \
                         (or set it to true) to run Switchboard",
                    ));
                }
                self.no_effect(
                    id,
                    label,
                    "Switchboard is the WebSocket server itself, so it is always on",
                );
            }
            Legacy::AuthEnabled => {
                if legacy_bool(&raw, label)? {
                    self.auth_enabled = true;
                    if self.auth_inferred.is_none() {
                        self.auth_inferred = Some(label.to_owned());
                    }
                } else {
                    self.no_effect(
                        id,
                        label,
                        "false does not turn authentication off here: auth_mode decides (set \
                         auth_mode none explicitly for a server without authentication)",
                    );
                }
            }
        }
        Ok(None)
    }

    /// `raw` parsed as `key`, printed (to compare two sources of one key).
    fn parsed(key: &str, raw: &Raw, source: Source<'_>) -> Result<String, ConfigError> {
        let mut scratch = Config::default();
        apply(&mut scratch, key, raw, source)?;
        Ok(value_debug(&scratch, key).unwrap_or_default())
    }

    /// Applies a YAML document (nested maps allowed) on top of what is loaded. The keys of a
    /// `websocket:` block are applied last, and only where the same file sets no native key.
    fn apply_yaml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        use serde_norway::Value;
        let doc: Value = serde_norway::from_str(text)
            .map_err(|e| ConfigError::new("config", format!("{origin}: invalid YAML: {e}")))?;
        let mut block = Vec::new();
        let mut native = Vec::new();
        match doc {
            Value::Null => return Ok(()),
            Value::Mapping(map) => self.walk(&map, "", origin, &mut block, &mut native)?,
            _ => {
                return Err(ConfigError::new(
                    "config",
                    format!("{origin}: expected a mapping of key: value at the top level"),
                ))
            }
        }
        for (i, b) in block.iter().enumerate() {
            let label = format!("{} in {origin}", b.path);
            if native.contains(&b.key) {
                let now = value_debug(&self.cfg, b.key).unwrap_or_default();
                if now != b.parsed {
                    self.warnings.push(format!(
                        "{label} is overridden by {} of the same file (a native key beats the \
                         websocket: block)",
                        b.key
                    ));
                }
                continue;
            }
            if let Some(other) = block[..i].iter().find(|o| o.key == b.key) {
                if other.parsed != b.parsed {
                    return Err(ConfigError::new(
                        b.key,
                        format!(
                            "{} and {} in {origin} both mean {} and disagree ({} against {}): \
                             keep one of them",
                            other.path, b.path, b.key, other.parsed, b.parsed
                        ),
                    ));
                }
            }
            let source = Source::File {
                path: origin,
                at: Some(&b.path),
            };
            self.set_alias(b.key, &b.raw, source, &label)?;
        }
        Ok(())
    }

    /// One map of the file. A path names a key when, with dots read as `_`, it is a key
    /// (`jwt: {secret: s}` is `jwt_secret`), or when it is a key of a replaced service's
    /// `websocket:` block (collected into `block`, applied by `apply_yaml`); a structured key
    /// takes its whole value; any other map is walked into when some key lies below it.
    /// Anything else is refused, naming the full path. `native` collects the keys set.
    fn walk(
        &mut self,
        map: &serde_norway::Mapping,
        prefix: &str,
        origin: &str,
        block: &mut Vec<BlockValue>,
        native: &mut Vec<&'static str>,
    ) -> Result<(), ConfigError> {
        use serde_norway::Value;
        for (k, v) in map {
            let Value::String(name) = k else {
                return Err(ConfigError::new(
                    format!("{prefix}{k:?}"),
                    format!("{origin}: keys must be strings"),
                ));
            };
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let at = (!prefix.is_empty()).then_some(path.as_str());
            let source = Source::File { path: origin, at };
            let flat = path.replace('.', "_");
            let structured = self.structured;
            if let Some(s) = structured.iter().find(|s| s.key == flat) {
                self.set_structured(s, v, source)?;
                continue;
            }
            if let Some((_, _, legacy)) = LEGACY_YAML.iter().find(|(p, _, _)| *p == path) {
                let raw = yaml_raw(v)
                    .map_err(|m| ConfigError::new(path.as_str(), format!("in {origin}: {m}")))?;
                let label = format!("{path} in {origin}");
                if let Some((key, raw)) =
                    self.legacy(legacy_env_name(&path), &label, *legacy, raw)?
                {
                    let parsed = Self::parsed(key, &raw, source)?;
                    block.push(BlockValue {
                        path: path.clone(),
                        key,
                        raw,
                        parsed,
                    });
                }
                continue;
            }
            // A map where keys lie below is walked into, even when the path is itself a key
            // (`max_connections: {per_user: 3}` is max_connections_per_user).
            if let Value::Mapping(inner) = v {
                if self.is_parent(&path) {
                    self.walk(inner, &path, origin, block, native)?;
                    continue;
                }
            }
            if let Some(info) = KEYS.iter().find(|k| k.key == flat) {
                let raw = yaml_raw(v).map_err(|m| {
                    ConfigError::new(
                        path.as_str(),
                        format!("in {origin}: {m} (`{flat}` takes one value)"),
                    )
                })?;
                self.set(info.key, &raw, source)?;
                native.push(info.key);
                continue;
            }
            return Err(ConfigError::new(
                path.as_str(),
                format!("{origin}: {}", unknown_path(&path, self.structured)),
            ));
        }
        Ok(())
    }

    /// Some accepted path lies below `path`.
    fn is_parent(&self, path: &str) -> bool {
        let head = format!("{}_", path.replace('.', "_"));
        let dotted = format!("{path}.");
        KEYS.iter().any(|k| k.key.starts_with(&head))
            || self.structured.iter().any(|s| s.key.starts_with(&head))
            || LEGACY_YAML.iter().any(|(p, _, _)| p.starts_with(&dotted))
    }

    /// The env variables of the replaced services, in [`ENV_ALIASES`] order. Two naming one key
    /// with different values refuse the start, naming both.
    fn apply_env_aliases(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut seen: Vec<(&'static str, &'static str, String)> = Vec::new();
        for (name, service, legacy) in ENV_ALIASES {
            let Some(v) = env(name) else { continue };
            let label = format!("env {name}");
            let source = Source::Env(name);
            let Some((key, raw)) =
                self.legacy((*name).to_owned(), &label, *legacy, Raw::Text(v))?
            else {
                continue;
            };
            let parsed = Self::parsed(key, &raw, source)?;
            let native_env = KEYS.iter().find(|k| k.key == key).map_or("", |k| k.env);
            if let Some((_, other, before)) = seen.iter().find(|(k, _, _)| *k == key) {
                // The native variable decides when it is set (the aliases are then unused).
                if *before != parsed && env(native_env).is_none() {
                    let secret = matches!(key, "jwt_secret" | "database_url" | "redis_url");
                    let values = if secret {
                        String::new()
                    } else {
                        format!(" ({before} against {parsed})")
                    };
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "env {other} and env {name} (the {service}'s name) both set {key} \
                             and disagree{values}: unset one, or set {native_env} to decide"
                        ),
                    ));
                }
            }
            seen.push((key, name, parsed));
            self.set_alias(key, &raw, source, &label)?;
        }
        Ok(())
    }

    /// A value that came from an alias and lies outside the native range is brought into it
    /// with one line (a migration must not stop on it); a native source keeps being refused.
    fn clamp_aliases(&mut self) {
        let aliased: Vec<&'static str> = self.alias_set.clone();
        for key in aliased {
            let from = self.sources.of(key);
            if !from.starts_with("alias") {
                // A native source overrode the alias: its value is checked, never clamped.
                continue;
            }
            match key {
                "max_message_size" => {
                    let v = self.cfg.max_message_size;
                    let c = v.clamp(MESSAGE_SIZE_MIN, MESSAGE_SIZE_MAX);
                    if c != v {
                        self.cfg.max_message_size = c;
                        self.warnings.push(format!(
                            "max_message_size {v} ({from}) is outside {MESSAGE_SIZE_MIN} bytes to \
                             64MiB here, so {c} is used (set max_message_size to silence this)"
                        ));
                    }
                }
                "max_connections" => {
                    let v = self.cfg.max_connections;
                    if v == 0 {
                        self.warnings.push(format!(
                            "max_connections 0 ({from}) meant unlimited there; here 0 means as \
                             many as the file-descriptor limit allows (derived at start)"
                        ));
                    } else if v > CONNECTIONS_MAX {
                        self.cfg.max_connections = CONNECTIONS_MAX;
                        self.warnings.push(format!(
                            "max_connections {v} ({from}) is above {CONNECTIONS_MAX}, so \
                             {CONNECTIONS_MAX} is used"
                        ));
                    }
                }
                "ping_interval" | "pong_wait" | "write_wait" => {
                    let field = match key {
                        "ping_interval" => &mut self.cfg.ping_interval,
                        "pong_wait" => &mut self.cfg.pong_wait,
                        _ => &mut self.cfg.write_wait,
                    };
                    if *field > DURATION_MAX {
                        let v = *field;
                        *field = DURATION_MAX;
                        self.warnings.push(format!(
                            "{key} {v:?} ({from}) is over the 24h maximum, so 24h is used"
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    /// `JWT_SECRET` or `AUTH_ENABLED=true` without an explicit `auth_mode` means JWT auth; an
    /// explicit `auth_mode none` beside them is kept, with a line.
    fn infer_auth(&mut self) -> Result<(), ConfigError> {
        let Some(by) = self.auth_inferred.clone() else {
            return Ok(());
        };
        if self.sources.0.contains_key("auth_mode") {
            if self.cfg.auth_mode == AuthMode::None {
                self.warnings.push(format!(
                    "{by} is set, but auth_mode none ({}) wins: clients are not authenticated",
                    self.sources.of("auth_mode")
                ));
            }
            return Ok(());
        }
        if self.auth_enabled
            && self
                .cfg
                .auth_service_url
                .as_deref()
                .is_some_and(|u| !u.is_empty())
        {
            // The chat hub validated tokens through its auth service (AUTH_ENABLED with
            // AUTH_SERVICE_URL): that service stays the authority. JWT_SECRET without
            // AUTH_ENABLED (the messaging service's) checks tokens here, as it did.
            self.cfg.auth_mode = AuthMode::Service;
            self.sources.0.insert(
                "auth_mode".into(),
                format!("inferred from {by} and auth_service_url"),
            );
            self.warnings.push(format!(
                "auth_mode service (inferred from {by} and auth_service_url): every upgrade is \
                 checked by the auth service; set auth_mode explicitly to silence this"
            ));
            return Ok(());
        }
        self.cfg.auth_mode = AuthMode::Jwt;
        self.sources
            .0
            .insert("auth_mode".into(), format!("inferred from {by}"));
        let has_key = self
            .cfg
            .jwt_secret
            .as_deref()
            .is_some_and(|s| !s.is_empty())
            || self.cfg.jwt_public_key_file.is_some();
        if self.auth_enabled && !has_key {
            return Err(ConfigError::new(
                "auth_mode",
                "AUTH_ENABLED=true turns JWT authentication on, but no key to verify tokens is \
                 set: set JWT_SECRET (or SWITCHBOARD_JWT_SECRET) to the HMAC secret the tokens \
                 are signed with, or jwt_public_key_file, or AUTH_SERVICE_URL (the auth service \
                 that checks them)",
            ));
        }
        self.warnings.push(format!(
            "auth_mode jwt (inferred from {by}): clients must present a valid token; set \
             auth_mode explicitly to silence this"
        ));
        Ok(())
    }

    /// Warns about `SWITCHBOARD_*` variables that are no setting (naming the closest one) and
    /// `WEBSOCKET_*` ones close to a name the rooms module had.
    fn check_env_names(&mut self, env_names: &[String]) {
        for name in env_names {
            if let Some(rest) = name.strip_prefix("SWITCHBOARD_") {
                let known = KEYS.iter().any(|k| k.env == name)
                    || self.structured.iter().any(|s| s.env == name)
                    || ENV_NOT_SETTINGS.contains(&name.as_str());
                if known || rest.is_empty() {
                    continue;
                }
                let envs = KEYS
                    .iter()
                    .map(|k| k.env)
                    .chain(self.structured.iter().map(|s| s.env));
                self.warnings.push(match closest(name, envs) {
                    Some(env) => format!(
                        "env {name} is not a setting and is ignored; did you mean {env}?"
                    ),
                    None => format!(
                        "env {name} is not a setting and is ignored; `switchboard --help` lists them"
                    ),
                });
            } else if name.starts_with("WEBSOCKET_") {
                let legacy = ENV_ALIASES
                    .iter()
                    .map(|(n, _, _)| *n)
                    .filter(|n| n.starts_with("WEBSOCKET_"));
                if legacy.clone().any(|l| l == name) {
                    continue;
                }
                if let Some(l) = closest(name, legacy) {
                    self.warnings.push(format!(
                        "env {name} is not a setting of the old service and is ignored; did you mean {l}?"
                    ));
                }
            }
        }
    }

    fn load(
        mut self,
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
        env_names: &[String],
    ) -> Result<Loaded, ConfigError> {
        let cli = parse_args(args, self.structured)?;

        let path = cli.config_path.clone().or_else(|| env(CONFIG_FILE_ENV));
        if let Some(path) = path {
            if path.is_empty() {
                return Err(ConfigError::new("config", "empty config file path"));
            }
            let text = read_config_file(&path)?;
            self.apply_yaml(&text, &path)?;
        }

        self.apply_env_aliases(env)?;
        for info in KEYS {
            if let Some(v) = env(info.env) {
                self.set(info.key, &Raw::Text(v), Source::Env(info.env))?;
            }
        }
        let structured = self.structured;
        for s in structured {
            if let Some(v) = env(s.env) {
                self.set_structured_text(s, &v, Source::Env(s.env))?;
            }
        }
        self.check_env_names(env_names);
        for (target, value, flag) in cli.values {
            match target {
                FlagTarget::Key(key) => self.set(key, &Raw::Text(value), Source::Flag(&flag))?,
                FlagTarget::Structured(key) => {
                    if let Some(s) = structured.iter().find(|s| s.key == key) {
                        self.set_structured_text(s, &value, Source::Flag(&flag))?;
                    }
                }
            }
        }
        self.clamp_aliases();
        self.infer_auth()?;

        self.cfg.validate_from(Some(&self.sources))?;
        Ok(Loaded {
            config: self.cfg,
            warnings: self.warnings,
            sources: self.sources.0,
        })
    }
}

/// `switchboard <version>`, as `--version` prints it.
pub fn version_text() -> String {
    format!("switchboard {}", env!("CARGO_PKG_VERSION"))
}

impl Config {
    /// defaults <- YAML file (`--config PATH` in args, else env SWITCHBOARD_CONFIG) <- WEBSOCKET_*
    /// env <- SWITCHBOARD_* env <- CLI flags; then validate(). Warnings are dropped: the server
    /// uses [`Config::load_with_warnings`].
    /// `args` are the CLI args after the program name (no subcommand). `env` looks up an
    /// environment variable.
    pub fn load(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::load_with_warnings(args, env, &[]).map(|l| l.config)
    }

    /// [`Config::load`], plus the warnings to log once logging is up. `env_names` are the names
    /// of the variables in the environment (values are read through `env`), checked for
    /// misspelled `SWITCHBOARD_*` / `WEBSOCKET_*` names.
    pub fn load_with_warnings(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
        env_names: &[String],
    ) -> Result<Loaded, ConfigError> {
        Loader::new(STRUCTURED).load(args, env, env_names)
    }

    /// Applies a YAML document on top of `self` (tests and the docs example).
    #[cfg(test)]
    fn apply_yaml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let mut loader = Loader::new(STRUCTURED);
        loader.cfg = std::mem::take(self);
        let out = loader.apply_yaml(text, origin);
        *self = loader.cfg;
        out
    }

    /// Checks every range and cross-field rule. Every error names its key.
    /// What WebSocket path `path` speaks (`ws_dialects`; a path not listed is native).
    pub fn path_dialect(&self, path: &str) -> crate::dialect::PathDialect {
        use crate::dialect::{Dialect, PathDialect};
        self.ws_dialects
            .iter()
            .filter_map(|e| e.split_once('='))
            .find(|(p, _)| *p == path)
            .and_then(|(_, name)| PathDialect::parse(name))
            .unwrap_or(PathDialect::Fixed(Dialect::Native))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_from(None)
    }

    /// [`Config::validate`]; with `sources`, a cross-field error says which source set each
    /// value it names.
    fn validate_from(&self, sources: Option<&Sources>) -> Result<(), ConfigError> {
        fn fail(key: &str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError::new(key, message))
        }
        // " (from env X)" after a value in a cross-field error; nothing without sources.
        let from = |key: &str| match sources {
            Some(s) => format!(" ({})", s.of(key)),
            None => String::new(),
        };
        fn check_path(key: &str, p: &str) -> Result<(), ConfigError> {
            if !p.starts_with('/') {
                return fail(key, format!("path {p:?} must start with '/'"));
            }
            if p.chars().any(|c| c == '?' || c == '#' || c.is_whitespace()) {
                return fail(
                    key,
                    format!("path {p:?} must not contain '?', '#' or spaces"),
                );
            }
            if HTTP_PATHS.contains(&p) {
                return fail(
                    key,
                    format!("path {p:?} is reserved for the HTTP endpoints"),
                );
            }
            Ok(())
        }
        fn nonzero(key: &str, d: Duration) -> Result<(), ConfigError> {
            if d.is_zero() {
                return fail(key, "must be greater than 0".into());
            }
            Ok(())
        }
        fn at_least(key: &str, v: u64, min: u64) -> Result<(), ConfigError> {
            if v < min {
                return fail(key, format!("must be at least {min}, got {v}"));
            }
            Ok(())
        }
        fn between(key: &str, v: u64, min: u64, max: u64, why: &str) -> Result<(), ConfigError> {
            if !(min..=max).contains(&v) {
                return fail(
                    key,
                    format!("must be between {min} and {max}{why}, got {v}"),
                );
            }
            Ok(())
        }
        fn at_most(key: &str, v: u64, max: u64, why: &str) -> Result<(), ConfigError> {
            between(key, v, 0, max, why)
        }
        let size = |v: usize| v as u64;

        if self.port == 0 {
            fail("port", "must be 1-65535, got 0".into())?;
        }
        // ---- TLS listener
        if self.tls_port == 0 {
            for (key, set) in [
                ("tls_cert_file", &self.tls_cert_file),
                ("tls_key_file", &self.tls_key_file),
            ] {
                if set.is_some() {
                    fail(
                        key,
                        "is set but tls_port is 0 (no TLS listener): the file would not be used; set tls_port or leave the key empty".into(),
                    )?;
                }
            }
        } else {
            if self.tls_port == self.port {
                fail(
                    "tls_port",
                    format!(
                        "is {} like port: the TLS listener needs a port of its own",
                        self.tls_port
                    ),
                )?;
            }
            for (key, set) in [
                ("tls_cert_file", &self.tls_cert_file),
                ("tls_key_file", &self.tls_key_file),
            ] {
                if set.is_none() {
                    fail(
                        key,
                        "is empty while tls_port is set: the TLS listener needs tls_cert_file (PEM certificate chain) and tls_key_file (its PEM private key)".into(),
                    )?;
                }
            }
        }
        dur_between(
            "tls_handshake_timeout",
            self.tls_handshake_timeout,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        if self.shards > SHARDS_MAX {
            fail(
                "shards",
                format!("must be at most {SHARDS_MAX}, got {}", self.shards),
            )?;
        }
        if self.host.parse::<std::net::IpAddr>().is_err() {
            fail("host", format!("{:?} is not an IP address", self.host))?;
        }
        if self.ws_paths.is_empty() {
            fail("ws_paths", "must list at least one path".into())?;
        }
        for (i, p) in self.ws_paths.iter().enumerate() {
            check_path("ws_paths", p)?;
            if self.ws_paths[..i].contains(p) {
                fail("ws_paths", format!("path {p:?} is listed twice"))?;
            }
        }
        for (i, entry) in self.ws_dialects.iter().enumerate() {
            let Some((path, name)) = entry.split_once('=') else {
                fail(
                    "ws_dialects",
                    format!("{entry:?} must be path=dialect, e.g. /ws=auto"),
                )?;
                continue;
            };
            // The default names /ws; a deployment that drops /ws from ws_paths drops that too.
            let default = self.ws_dialects == Config::default().ws_dialects;
            if !default && !self.ws_paths.iter().any(|p| p == path) {
                fail(
                    "ws_dialects",
                    format!(
                        "path {path:?}{} is not in ws_paths{}",
                        from("ws_dialects"),
                        from("ws_paths")
                    ),
                )?;
            }
            if crate::dialect::PathDialect::parse(name).is_none() {
                fail(
                    "ws_dialects",
                    format!(
                        "{name:?} is not a dialect (one of: {})",
                        crate::dialect::PATH_DIALECT_NAMES
                    ),
                )?;
            }
            if self.ws_dialects[..i]
                .iter()
                .any(|e| e.split_once('=').is_some_and(|(p, _)| p == path))
            {
                fail("ws_dialects", format!("path {path:?} is listed twice"))?;
            }
        }
        if let Some(p) = &self.echo_path {
            check_path("echo_path", p)?;
            if self.ws_paths.contains(p) {
                fail(
                    "echo_path",
                    format!(
                        "path {p:?}{} is also in ws_paths{}",
                        from("echo_path"),
                        from("ws_paths")
                    ),
                )?;
            }
        }
        if !(MESSAGE_SIZE_MIN..=MESSAGE_SIZE_MAX).contains(&self.max_message_size) {
            fail(
                "max_message_size",
                format!(
                    "must be between {MESSAGE_SIZE_MIN} bytes and 64MiB, got {}",
                    self.max_message_size
                ),
            )?;
        }
        let buffer_why = " bytes (one buffer per shard)";
        for (key, v) in [
            ("read_buffer_size", self.read_buffer_size),
            ("write_buffer_size", self.write_buffer_size),
        ] {
            between(
                key,
                size(v),
                BUFFER_SIZE_MIN as u64,
                BUFFER_SIZE_MAX as u64,
                buffer_why,
            )?;
        }
        between(
            "send_queue_bytes_max",
            size(self.send_queue_bytes_max),
            BUFFER_SIZE_MIN as u64,
            SEND_QUEUE_BYTES_CEILING as u64,
            " (the queued byte count per connection is a u32)",
        )?;
        for (key, v) in [("so_sndbuf", self.so_sndbuf), ("so_rcvbuf", self.so_rcvbuf)] {
            at_most(
                key,
                u64::from(v),
                SOCKET_BUFFER_BYTES_MAX as u64,
                " (setsockopt takes a C int and the kernel doubles it)",
            )?;
        }
        at_most(
            "listen_backlog",
            u64::from(self.listen_backlog),
            LISTEN_BACKLOG_MAX as u64,
            " (listen(2) takes a C int)",
        )?;
        at_most(
            "max_connections",
            self.max_connections,
            CONNECTIONS_MAX,
            " (every connection is one file descriptor, a C int)",
        )?;
        between(
            "max_connections_per_user",
            size(self.max_connections_per_user),
            1,
            CONNECTIONS_PER_USER_MAX as u64,
            "",
        )?;
        at_least(
            "max_rooms_per_connection",
            size(self.max_rooms_per_connection),
            1,
        )?;
        between(
            "max_room_name_bytes",
            size(self.max_room_name_bytes),
            1,
            4096,
            "",
        )?;
        between(
            "history_bytes_max",
            size(self.history_bytes_max),
            64 * 1024,
            16 << 30,
            " (64KiB to 16GiB)",
        )?;
        between(
            "max_request_header_bytes",
            size(self.max_request_header_bytes),
            1024,
            1024 * 1024,
            " (1KiB to 1MiB)",
        )?;
        between(
            "http_body_bytes_max",
            size(self.http_body_bytes_max),
            HTTP_BODY_BYTES_MIN as u64,
            HTTP_BODY_BYTES_LIMIT as u64,
            " (1KiB to 64MiB)",
        )?;
        at_least(
            "http_keepalive_requests_max",
            u64::from(self.http_keepalive_requests_max),
            1,
        )?;
        between(
            "max_dm_content_bytes",
            size(self.max_dm_content_bytes),
            1,
            MESSAGE_SIZE_MAX as u64,
            " (a DM travels in one message)",
        )?;
        at_least("store_memory_bytes", size(self.store_memory_bytes), 1 << 20)?;
        if let Some(url) = &self.database_url {
            // Only the URL form: its password has one place, which the log never prints (the
            // key=value form is refused rather than risk printing it).
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return fail(
                    "database_url",
                    "must be a postgres://user:password@host:port/database URL".into(),
                );
            }
        }
        between(
            "database_pool_size",
            size(self.database_pool_size),
            1,
            256,
            "",
        )?;
        nonzero("database_connect_timeout", self.database_connect_timeout)?;
        // ---- Redis
        let url_tls = match &self.redis_url {
            Some(url) => crate::cluster::url_tls(
                &crate::cluster::parse_redis_urls(url, self.redis_cluster)
                    .map_err(|e| ConfigError::new("redis_url", e))?,
            ),
            None => crate::cluster::UrlTls::Plain,
        };
        for (key, set) in [
            ("redis_tls_ca_file", &self.redis_tls_ca_file),
            ("redis_tls_cert_file", &self.redis_tls_cert_file),
            ("redis_tls_key_file", &self.redis_tls_key_file),
        ] {
            if set.is_some() && url_tls == crate::cluster::UrlTls::Plain {
                return fail(
                    key,
                    "is set but redis_url is not rediss://: the file would not be used; give redis_url as rediss://host:port (TLS) or leave the key empty".into(),
                );
            }
        }
        if self.redis_tls_ca_file.is_some() && url_tls == crate::cluster::UrlTls::Insecure {
            return fail(
                "redis_tls_ca_file",
                "is set but redis_url ends in #insecure, which checks no certificate at all: drop #insecure to check Redis's certificate against this CA".into(),
            );
        }
        match (&self.redis_tls_cert_file, &self.redis_tls_key_file) {
            (Some(_), None) => {
                return fail(
                    "redis_tls_key_file",
                    "is empty while redis_tls_cert_file is set: a client certificate needs its key"
                        .into(),
                )
            }
            (None, Some(_)) => {
                return fail(
                    "redis_tls_cert_file",
                    "is empty while redis_tls_key_file is set: a client key needs its certificate"
                        .into(),
                )
            }
            _ => {}
        }
        if self.redis_prefix.is_empty()
            || self.redis_prefix.len() > 64
            || self
                .redis_prefix
                .bytes()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control() || c == b'{' || c == b'}')
        {
            fail(
                "redis_prefix",
                format!(
                    "{:?} must be 1 to 64 bytes with no whitespace or braces (braces would change the keys' hash slots)",
                    self.redis_prefix
                ),
            )?;
        }
        fn dur_between(
            key: &str,
            d: Duration,
            min: Duration,
            max: Duration,
        ) -> Result<(), ConfigError> {
            if d < min || d > max {
                return fail(
                    key,
                    format!("must be between {min:?} and {max:?}, got {d:?}"),
                );
            }
            Ok(())
        }
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        dur_between("redis_timeout", self.redis_timeout, ms(100), secs(60))?;
        dur_between(
            "redis_canary_interval",
            self.redis_canary_interval,
            ms(100),
            secs(60),
        )?;
        dur_between(
            "redis_canary_timeout",
            self.redis_canary_timeout,
            self.redis_canary_interval,
            secs(600),
        )?;
        dur_between("dedup_window", self.dedup_window, secs(1), secs(86_400))?;
        dur_between(
            "redis_reconnect_max",
            self.redis_reconnect_max,
            ms(100),
            secs(300),
        )?;
        between(
            "redis_queue_max",
            size(self.redis_queue_max),
            1024,
            16 * 1024 * 1024,
            "",
        )?;
        between(
            "redis_queue_bytes_max",
            size(self.redis_queue_bytes_max),
            1 << 20,
            16 << 30,
            " (1MiB to 16GiB)",
        )?;
        // ---- Kafka
        for b in &self.kafka_brokers {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                fail("kafka_brokers", format!("{b:?} is not host:port"))?;
            }
        }
        if self.kafka_dm_topic.is_empty()
            || self.kafka_dm_topic.len() > 249
            || !self
                .kafka_dm_topic
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            fail(
                "kafka_dm_topic",
                format!(
                    "{:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)",
                    self.kafka_dm_topic
                ),
            )?;
        }
        if !crate::notifications::is_topic_name(&self.kafka_dead_letter_topic) {
            fail(
                "kafka_dead_letter_topic",
                format!(
                    "{:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)",
                    self.kafka_dead_letter_topic
                ),
            )?;
        }
        if self
            .kafka_notifications
            .iter()
            .any(|r| r.matches(&self.kafka_dead_letter_topic))
        {
            fail(
                "kafka_notifications",
                format!(
                    "a rule maps the dead-letter topic {:?}: a record it cannot map would loop",
                    self.kafka_dead_letter_topic
                ),
            )?;
        }
        if self.kafka_group_id.is_empty() || self.kafka_group_id.len() > 255 {
            fail("kafka_group_id", "must be 1 to 255 bytes".into())?;
        }
        if self.kafka_session_timeout < Duration::from_secs(3)
            || self.kafka_session_timeout > Duration::from_secs(300)
        {
            fail(
                "kafka_session_timeout",
                format!(
                    "must be between 3s and 5m, got {:?}",
                    self.kafka_session_timeout
                ),
            )?;
        }
        if self.kafka_commit_interval < Duration::from_millis(100)
            || self.kafka_commit_interval > Duration::from_secs(3600)
        {
            fail(
                "kafka_commit_interval",
                format!(
                    "must be between 100ms and 1h, got {:?}",
                    self.kafka_commit_interval
                ),
            )?;
        }
        if self.kafka_client_id.is_empty() {
            fail("kafka_client_id", "must not be empty".into())?;
        }
        if self.kafka_message_timeout < Duration::from_secs(1) {
            fail(
                "kafka_message_timeout",
                format!("{:?} is under the 1s minimum", self.kafka_message_timeout),
            )?;
        }
        if self.kafka_ack_timeout < Duration::from_millis(100)
            || self.kafka_ack_timeout > self.kafka_message_timeout
        {
            fail(
                "kafka_ack_timeout",
                format!(
                    "must be between 100ms and kafka_message_timeout ({:?}), got {:?}",
                    self.kafka_message_timeout, self.kafka_ack_timeout
                ),
            )?;
        }
        if self.kafka_linger >= self.kafka_message_timeout {
            fail(
                "kafka_linger",
                format!(
                    "must be less than kafka_message_timeout ({:?}), got {:?}",
                    self.kafka_message_timeout, self.kafka_linger
                ),
            )?;
        }
        if self.kafka_linger > Duration::from_secs(1) {
            fail(
                "kafka_linger",
                format!("{:?} is over the 1s maximum", self.kafka_linger),
            )?;
        }
        between(
            "kafka_batch_bytes",
            size(self.kafka_batch_bytes),
            1024,
            1 << 20,
            " (librdkafka caps a batch at message.max.bytes, 1 MiB here)",
        )?;
        if !self.kafka_brokers.is_empty() && self.max_dm_content_bytes > KAFKA_DM_CONTENT_BYTES_MAX
        {
            fail(
                "max_dm_content_bytes",
                format!(
                    "{} is over {KAFKA_DM_CONTENT_BYTES_MAX} with kafka_brokers set: a direct message's record (its content JSON-escaped) must fit the producer's 1 MiB record limit",
                    self.max_dm_content_bytes
                ),
            )?;
        }
        between(
            "kafka_pending_max",
            size(self.kafka_pending_max),
            16,
            1_000_000,
            "",
        )?;
        // ---- typing and receipts
        if self.typing_ttl < Duration::from_secs(1) || self.typing_ttl > DURATION_MAX {
            fail(
                "typing_ttl",
                format!("must be between 1s and 24h, got {:?}", self.typing_ttl),
            )?;
        }
        between(
            "max_receipt_message_ids",
            size(self.max_receipt_message_ids),
            1,
            RECEIPT_MESSAGE_IDS_LIMIT as u64,
            "",
        )?;
        // ---- presence
        between(
            "max_watched_users_per_connection",
            size(self.max_watched_users_per_connection),
            1,
            100_000,
            "",
        )?;
        between(
            "max_presence_query_users",
            size(self.max_presence_query_users),
            1,
            10_000,
            "",
        )?;
        between(
            "max_presence_room_users",
            size(self.max_presence_room_users),
            1,
            100_000,
            "",
        )?;
        if self.presence_offline_grace < Duration::from_secs(1) {
            fail(
                "presence_offline_grace",
                format!("must be at least 1s, got {:?}", self.presence_offline_grace),
            )?;
        }
        // ---- calls
        between(
            "max_calls_per_user",
            size(self.max_calls_per_user),
            1,
            crate::shard::service::calls::CALLS_PER_USER_LIMIT as u64,
            "",
        )?;
        if self.ring_timeout < Duration::from_secs(1)
            || self.ring_timeout > Duration::from_secs(3600)
        {
            fail(
                "ring_timeout",
                format!("must be between 1s and 1h, got {:?}", self.ring_timeout),
            )?;
        }

        for (key, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("ping_interval", self.ping_interval),
            ("pong_wait", self.pong_wait),
            ("write_wait", self.write_wait),
            ("http_keepalive_timeout", self.http_keepalive_timeout),
            ("jwt_leeway", self.jwt_leeway),
            ("auth_timeout", self.auth_timeout),
            ("token_refresh_window", self.token_refresh_window),
            ("token_expiry_grace", self.token_expiry_grace),
            ("store_timeout", self.store_timeout),
            ("kafka_ack_timeout", self.kafka_ack_timeout),
            ("kafka_message_timeout", self.kafka_message_timeout),
            ("database_connect_timeout", self.database_connect_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("presence_offline_grace", self.presence_offline_grace),
        ] {
            if d > DURATION_MAX {
                fail(
                    key,
                    format!("{d:?} is over the 24h maximum for any duration"),
                )?;
            }
        }
        nonzero("ping_interval", self.ping_interval)?;
        nonzero("pong_wait", self.pong_wait)?;
        if self.ping_interval >= self.pong_wait {
            fail(
                "ping_interval",
                format!(
                    "must be less than pong_wait: ping_interval {:?}{} >= pong_wait {:?}{}",
                    self.ping_interval,
                    from("ping_interval"),
                    self.pong_wait,
                    from("pong_wait"),
                ),
            )?;
        }
        nonzero("handshake_timeout", self.handshake_timeout)?;
        nonzero("write_wait", self.write_wait)?;
        if self.http_keepalive_timeout < Duration::from_secs(1) {
            fail(
                "http_keepalive_timeout",
                format!("must be at least 1s, got {:?}", self.http_keepalive_timeout),
            )?;
        }
        if self.write_coalesce > Duration::from_secs(5) {
            return fail(
                "write_coalesce",
                format!("{:?} is over the 5s maximum", self.write_coalesce),
            );
        }
        nonzero("auth_timeout", self.auth_timeout)?;
        nonzero("shutdown_timeout", self.shutdown_timeout)?;
        if self.store_timeout < Duration::from_millis(100) {
            return fail(
                "store_timeout",
                format!("{:?} is under the 100ms minimum", self.store_timeout),
            );
        }

        for (key, v) in [
            ("rate_limit_per_sec", self.rate_limit_per_sec),
            ("rate_limit_burst", self.rate_limit_burst),
            ("rate_limit_max_violations", self.rate_limit_max_violations),
        ] {
            at_least(key, u64::from(v), 1)?;
        }
        if self.rate_limit_max_violations > 254 {
            // A connection's strike count is one byte (the per-connection ledger).
            fail(
                "rate_limit_max_violations",
                format!("{} is over the 254 maximum", self.rate_limit_max_violations),
            )?;
        }
        if self.log_level.trim().is_empty() {
            fail("log_level", "must not be empty".into())?;
        }
        if let Some(k) = &self.api_key {
            // A header value: visible ASCII only. The key itself is never echoed.
            if !k.bytes().all(|b| b.is_ascii_graphic()) {
                fail(
                    "api_key",
                    "must be visible ASCII without spaces (it travels in an HTTP header)".into(),
                )?;
            }
        }
        if self.admin_page && self.api_key.is_none() {
            fail(
                "admin_page",
                "needs api_key: the page reads the server API with it".into(),
            )?;
        }
        for o in &self.cors_origins {
            if o == "*" {
                if self.cors_origins.len() > 1 {
                    fail(
                        "cors_origins",
                        "`*` allows every origin; list it alone".into(),
                    )?;
                }
                continue;
            }
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            if !matches!(rest, Some(r) if !r.is_empty() && !r.contains('/')) {
                fail(
                    "cors_origins",
                    format!(
                        "{o:?} is not an origin; expected scheme://host[:port] without a path, e.g. https://app.example, or *"
                    ),
                )?;
            }
        }

        if self.auth_mode == AuthMode::Jwt {
            self.validate_jwt(&from)?;
        }
        self.validate_proxy(&from)?;
        self.validate_eureka(&from)?;
        self.validate_trace(&from)?;
        Ok(())
    }

    /// Distributed tracing's keys (`crate::trace`), checked whether or not it is on.
    fn validate_trace(&self, from: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let fail = |key: &str, why: String| Err(ConfigError::new(key, why));
        if !self.trace_endpoint.is_empty() {
            if let Err(e) = crate::bridge::http_client::Url::parse(&self.trace_endpoint) {
                return fail("trace_endpoint", format!("{e}{}", from("trace_endpoint")));
            }
        }
        let d = self.trace_export_interval;
        if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
            return fail(
                "trace_export_interval",
                format!(
                    "must be between 10ms and 1m, got {d:?}{}",
                    from("trace_export_interval")
                ),
            );
        }
        let d = self.trace_export_timeout;
        if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
            return fail(
                "trace_export_timeout",
                format!(
                    "must be between 100ms and 60s, got {d:?}{}",
                    from("trace_export_timeout")
                ),
            );
        }
        let n = self.trace_export_batch_max;
        if n == 0 || n > crate::limits::TRACE_QUEUE_SPANS_MAX {
            return fail(
                "trace_export_batch_max",
                format!(
                    "must be 1 to {}, got {n}{}",
                    crate::limits::TRACE_QUEUE_SPANS_MAX,
                    from("trace_export_batch_max")
                ),
            );
        }
        Ok(())
    }

    /// The collector URL spans are sent to (`trace_endpoint`, or the exporter's default).
    pub fn trace_url(&self) -> &str {
        if self.trace_endpoint.is_empty() {
            self.trace_exporter.default_endpoint()
        } else {
            &self.trace_endpoint
        }
    }

    /// The service name spans carry.
    pub fn trace_service(&self) -> &str {
        if self.trace_service_name.is_empty() {
            &self.service_name
        } else {
            &self.trace_service_name
        }
    }

    /// Service discovery's keys (`crate::bridge::eureka`). The identity keys are checked
    /// whether or not `eureka_url` is set; what is derived from other keys only when it is.
    fn validate_eureka(&self, from: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        use crate::bridge::eureka;
        let fail = |key: &str, why: String| Err(ConfigError::new(key, why));
        let between = |key: &str, d: Duration, lo: Duration, hi: Duration| {
            if d < lo || d > hi {
                return fail(
                    key,
                    format!("must be between {lo:?} and {hi:?}, got {d:?}{}", from(key)),
                );
            }
            Ok(())
        };
        let whole = |key: &str, d: Duration| {
            if d.subsec_nanos() != 0 {
                return fail(
                    key,
                    format!(
                        "must be whole seconds (Eureka's lease is in seconds), got {d:?}{}",
                        from(key)
                    ),
                );
            }
            Ok(())
        };
        for u in &self.eureka_url {
            if let Err(e) = eureka::ServerUrl::parse(u) {
                // The URL may hold a password: only its redacted form is quoted.
                return fail(
                    "eureka_url",
                    format!("{}: {e}{}", url_without_password(u), from("eureka_url")),
                );
            }
        }
        let name_check = |key: &str, v: &str, what: &str, colon: bool| {
            if let Err(e) = eureka::check_name(v, colon) {
                return fail(key, format!("{what} {v:?} {e}{}", from(key)));
            }
            Ok(())
        };
        if !self.eureka_app_name.is_empty() {
            name_check("eureka_app_name", &self.eureka_app_name, "app name", false)?;
        } else if !self.eureka_url.is_empty() {
            if let Err(e) = eureka::check_name(&self.service_name, false) {
                return fail(
                    "eureka_app_name",
                    format!(
                        "is empty, so service_name {:?} would be the app name, and it {e}{}; set eureka_app_name",
                        self.service_name,
                        from("service_name")
                    ),
                );
            }
        }
        if !self.eureka_instance_id.is_empty() {
            name_check(
                "eureka_instance_id",
                &self.eureka_instance_id,
                "instance id",
                true,
            )?;
        }
        if !self.eureka_hostname.is_empty() {
            name_check("eureka_hostname", &self.eureka_hostname, "host name", true)?;
        }
        if !self.eureka_ip_address.is_empty()
            && self.eureka_ip_address.parse::<std::net::IpAddr>().is_err()
        {
            return fail(
                "eureka_ip_address",
                format!(
                    "{:?} is not an IP address{}",
                    self.eureka_ip_address,
                    from("eureka_ip_address")
                ),
            );
        }
        if self.eureka_port > u32::from(u16::MAX) {
            return fail(
                "eureka_port",
                format!(
                    "must be 0 (= port) or 1-65535, got {}{}",
                    self.eureka_port,
                    from("eureka_port")
                ),
            );
        }
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        whole("eureka_renewal_interval", self.eureka_renewal_interval)?;
        whole("eureka_lease_duration", self.eureka_lease_duration)?;
        between(
            "eureka_renewal_interval",
            self.eureka_renewal_interval,
            s(1),
            s(300),
        )?;
        between(
            "eureka_lease_duration",
            self.eureka_lease_duration,
            s(2),
            s(3600),
        )?;
        if self.eureka_lease_duration <= self.eureka_renewal_interval {
            return fail(
                "eureka_lease_duration",
                format!(
                    "must be longer than eureka_renewal_interval ({:?}{}), or the lease lapses between two heartbeats; got {:?}{}",
                    self.eureka_renewal_interval,
                    from("eureka_renewal_interval"),
                    self.eureka_lease_duration,
                    from("eureka_lease_duration")
                ),
            );
        }
        between("eureka_timeout", self.eureka_timeout, ms(100), s(60))?;
        between("eureka_retry_max", self.eureka_retry_max, ms(100), s(300))?;
        for (key, v) in [
            ("eureka_health_check_url", &self.eureka_health_check_url),
            ("eureka_status_page_url", &self.eureka_status_page_url),
            ("eureka_home_page_url", &self.eureka_home_page_url),
        ] {
            if let Err(e) = eureka::check_page_url(v) {
                return fail(key, format!("{v:?}: {e}{}", from(key)));
            }
        }
        Ok(())
    }

    /// The auth service's and the custom-type backends' keys (`crate::proxy`).
    fn validate_proxy(&self, from: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let fail = |key: &str, why: String| Err(ConfigError::new(key, why));
        let between = |key: &str, d: Duration, lo: Duration, hi: Duration| {
            if d < lo || d > hi {
                return fail(
                    key,
                    format!("must be between {lo:?} and {hi:?}, got {d:?}{}", from(key)),
                );
            }
            Ok(())
        };
        let count = |key: &str, n: usize, lo: usize, hi: usize| {
            if n < lo || n > hi {
                return fail(
                    key,
                    format!("must be between {lo} and {hi}, got {n}{}", from(key)),
                );
            }
            Ok(())
        };
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        between(
            "auth_service_timeout",
            self.auth_service_timeout,
            ms(10),
            s(60),
        )?;
        between(
            "auth_service_cache_ttl",
            self.auth_service_cache_ttl,
            s(0),
            s(3600),
        )?;
        between(
            "auth_service_negative_cache_ttl",
            self.auth_service_negative_cache_ttl,
            s(0),
            s(3600),
        )?;
        count(
            "auth_service_cache_entries_max",
            self.auth_service_cache_entries_max,
            1,
            1_000_000,
        )?;
        count(
            "auth_service_concurrency_max",
            self.auth_service_concurrency_max,
            1,
            4096,
        )?;
        between("rpc_timeout", self.rpc_timeout, ms(10), s(60))?;
        count("rpc_concurrency_max", self.rpc_concurrency_max, 1, 65_536)?;
        count(
            "rpc_concurrency_per_connection_max",
            self.rpc_concurrency_per_connection_max,
            1,
            1024,
        )?;
        count(
            "rpc_reply_bytes_max",
            self.rpc_reply_bytes_max,
            1024,
            16 << 20,
        )?;
        if let Err(e) = crate::proxy::parse_pointer(&self.auth_service_user_pointer) {
            return fail(
                "auth_service_user_pointer",
                format!("{e}{}", from("auth_service_user_pointer")),
            );
        }
        match (&self.auth_service_url, self.auth_mode) {
            (Some(url), _) => {
                if let Err(e) = crate::bridge::http_client::Url::parse(url) {
                    return fail(
                        "auth_service_url",
                        format!("{e}{}", from("auth_service_url")),
                    );
                }
            }
            (None, AuthMode::Service) => {
                return fail(
                    "auth_service_url",
                    format!(
                        "is required with auth_mode service{}: set it to the auth service's http:// endpoint",
                        from("auth_mode")
                    ),
                );
            }
            (None, _) => {}
        }
        Ok(())
    }

    fn validate_jwt(&self, from: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let key = "jwt_algorithms";
        if self.jwt_algorithms.is_empty() {
            return Err(ConfigError::new(
                key,
                format!(
                    "must list at least one algorithm in jwt mode (auth_mode jwt{}, jwt_algorithms{})",
                    from("auth_mode"),
                    from("jwt_algorithms")
                ),
            ));
        }
        let mut family = None;
        for alg in &self.jwt_algorithms {
            let Some(f) = jwt_algorithm_family(alg) else {
                let known: Vec<&str> = JWT_ALGORITHMS.iter().map(|(n, _)| *n).collect();
                return Err(ConfigError::new(
                    key,
                    format!(
                        "unknown algorithm {alg:?}; expected one of {}",
                        known.join(" ")
                    ),
                ));
            };
            match family {
                None => family = Some(f),
                Some(prev) if prev != f => {
                    return Err(ConfigError::new(
                        key,
                        format!("mixes key families {prev} and {f}; list algorithms of one family"),
                    ))
                }
                Some(_) => {}
            }
        }
        if family == Some("HMAC") {
            if !matches!(self.jwt_secret.as_deref(), Some(s) if !s.is_empty()) {
                return Err(ConfigError::new(
                    "jwt_secret",
                    format!(
                        "is required for {} in jwt mode (auth_mode jwt{}, jwt_algorithms{})",
                        self.jwt_algorithms.join("/"),
                        from("auth_mode"),
                        from("jwt_algorithms")
                    ),
                ));
            }
        } else if !matches!(self.jwt_public_key_file.as_deref(), Some(s) if !s.is_empty()) {
            return Err(ConfigError::new(
                "jwt_public_key_file",
                format!(
                    "is required for {} in jwt mode (auth_mode jwt{}, jwt_algorithms{})",
                    self.jwt_algorithms.join("/"),
                    from("auth_mode"),
                    from("jwt_algorithms")
                ),
            ));
        }
        Ok(())
    }

    /// The key table (one row per field).
    pub fn keys() -> &'static [KeyInfo] {
        KEYS
    }

    /// Usage plus every key with its flag, env vars, default and meaning.
    pub fn help_text() -> String {
        let mut out = String::from(
            "Usage: switchboard [--config PATH] [--<key> VALUE]...\n       \
             switchboard doctor [--connections N] [--json]   check this machine's limits\n       \
             switchboard config [--config PATH] [--<key> VALUE]...   print every setting and its source\n       \
             switchboard help | --help | --version\n\
             \n\
             Thread-per-core WebSocket messaging server.\n\
             `switchboard doctor` says whether this machine can hold N connections and prints\n\
             the exact fix for each limit that is too low (see `switchboard doctor --help`).\n\
             \n\
             Settings, later wins: built-in defaults, the YAML file given by --config PATH (or env\n\
             SWITCHBOARD_CONFIG), the env vars of the services Switchboard replaces (PORT,\n\
             WEBSOCKET_*, ...: listed after SWITCHBOARD_* below), SWITCHBOARD_* env vars, flags.\n\
             Flags: --key-name VALUE or --key-name=VALUE; a bare boolean flag means true.\n\
             Durations: 54s, 100ms, 5m, 1h, 1m30s; a bare integer is seconds.\n\
             Sizes: 65536, 64KiB, 1MiB, 1GiB, 64KB (=64000), 64k (=65536).\n\
             Lists: comma-separated. An empty value turns an optional setting off.\n\
             \n\
             Options:\n  \
             --config <PATH>\n      YAML file of `key: value` lines (keys as below; nested maps\n      \
             join with `_`: `jwt: {secret: s}` is jwt_secret; the old `websocket:` block is\n      \
             accepted as documented, see docs/CONFIG.md).\n  \
             -h, --help\n      Print this help.\n  \
             -V, --version\n      Print the version.\n",
        );
        for k in KEYS {
            let default = if k.default.is_empty() {
                "(none)"
            } else {
                k.default
            };
            out.push_str(&format!(
                "  {} {}   [default: {}]\n      {}\n      env: {}",
                k.flag(),
                value_hint(k.key),
                default,
                k.doc,
                k.env
            ));
            for alias in env_aliases_of(k.key) {
                out.push_str(&format!(", {alias}"));
            }
            out.push('\n');
        }
        for s in STRUCTURED {
            out.push_str(&format!(
                "  {} <YAML>   [default: (none)]\n      {}\n      env: {}\n",
                s.flag(),
                s.doc,
                s.env
            ));
        }
        out
    }
}

/// Most shard threads (the room -> shard bitmap is a u64).
pub const SHARDS_MAX: usize = 64;
/// Smallest `max_message_size`: a control-frame payload (125 bytes).
pub const MESSAGE_SIZE_MIN: usize = 125;
/// Largest `max_message_size`: 64 MiB.
pub const MESSAGE_SIZE_MAX: usize = 64 * 1024 * 1024;
/// Smallest `read_buffer_size` / `write_buffer_size` / `send_queue_bytes_max`: one page, below
/// which every frame header and HTTP head would need several calls.
pub const BUFFER_SIZE_MIN: usize = 4096;
/// Largest `read_buffer_size` / `write_buffer_size` (one buffer per shard): 64 MiB, the
/// largest message; more only costs memory.
pub const BUFFER_SIZE_MAX: usize = 64 * 1024 * 1024;
/// Largest `send_queue_bytes_max`: 1 GiB. A connection's queued byte count is a u32; 1 GiB plus
/// one largest message (64 MiB) stays far below u32::MAX, so the 4008 check never wraps.
pub const SEND_QUEUE_BYTES_CEILING: usize = 1 << 30;
/// Largest `so_sndbuf` / `so_rcvbuf`: 1 GiB. setsockopt takes a C int and the kernel doubles
/// the value, so anything above i32::MAX / 2 would wrap.
pub const SOCKET_BUFFER_BYTES_MAX: u32 = 1 << 30;
/// Largest `listen_backlog`: listen(2) takes a C int.
pub const LISTEN_BACKLOG_MAX: u32 = i32::MAX as u32;
/// Largest `max_connections`: every connection is one fd, and an fd is a C int.
pub const CONNECTIONS_MAX: u64 = i32::MAX as u64;
/// Largest `max_connections_per_user`: far above any person's devices; bounds the per-user
/// device list that is scanned when one device leaves.
pub const CONNECTIONS_PER_USER_MAX: usize = 65_535;
/// Smallest and largest `http_body_bytes_max`.
pub const HTTP_BODY_BYTES_MIN: usize = 1024;
pub const HTTP_BODY_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// Largest `max_receipt_message_ids`: a receipt is one frame fanned out to every device of two
/// users; 10,000 ids of 256 bytes is ~2.6 MB per copy, far past what a client marks at once.
pub const RECEIPT_MESSAGE_IDS_LIMIT: usize = 10_000;
/// Longest accepted duration (all duration keys but `write_coalesce`, capped at 5 s): 24 h.
/// Token windows are kept as u32 seconds, deadlines as milliseconds added to now and
/// timers as u32 ticks of 100 ms; 24 h keeps every one of them far from overflow.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// [`ConfigError::key`] of the "print the help and exit 0" outcome of [`Config::load`].
pub const HELP_KEY: &str = "help";
/// [`ConfigError::key`] of the "print the version and exit 0" outcome of [`Config::load`].
pub const VERSION_KEY: &str = "version";

// ---------------------------------------------------------------------------------------------
// Value syntax
// ---------------------------------------------------------------------------------------------

/// Parses "54s", "100ms", "5m", "1h", "1m30s", "1.5s", "250us", "10ns"; a bare integer is
/// seconds. Units may repeat in any order ("1h30m"); the total must fit a Duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str =
        "expected a duration like 54s, 100ms, 5m, 1h or 1m30s (a bare integer is seconds)";
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| EXPECTED.to_owned());
    }
    let mut rest = s;
    let mut total_ns: u128 = 0;
    if rest.is_empty() {
        return Err(EXPECTED.into());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| EXPECTED.to_owned())?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(EXPECTED.into()),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(EXPECTED.into());
        }
        if !frac_part.bytes().all(|b| b.is_ascii_digit()) || frac_part.len() > 9 {
            return Err(EXPECTED.into());
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| EXPECTED.to_owned())?
        };
        let mut part = int
            .checked_mul(unit_ns)
            .ok_or_else(|| EXPECTED.to_owned())?;
        if !frac_part.is_empty() {
            let frac: u128 = frac_part.parse().map_err(|_| EXPECTED.to_owned())?;
            let scale = 10u128.pow(frac_part.len() as u32);
            part += frac * unit_ns / scale;
        }
        total_ns = total_ns
            .checked_add(part)
            .ok_or_else(|| EXPECTED.to_owned())?;
        rest = tail;
    }
    let secs = u64::try_from(total_ns / 1_000_000_000).map_err(|_| EXPECTED.to_owned())?;
    // The remainder is below 1e9 and fits u32.
    let nanos = (total_ns % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Parses a byte size: "65536", "64KiB", "1MiB", "1GiB" (binary), "64KB", "1MB", "1GB" (decimal),
/// and the shorthands "64k", "1m", "1g" (binary). Units are case-insensitive; "B" is bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    const EXPECTED: &str = "expected a size like 65536, 64KiB, 1MiB, 1GiB, 64KB or 64k";
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return Err(EXPECTED.into());
    }
    let n: usize = num.parse().map_err(|_| EXPECTED.to_owned())?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(EXPECTED.into()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} does not fit in memory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// A YAML file in the temp dir, removed on drop.
    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "switchboard-cfg-{}-{name}.yaml",
                std::process::id()
            ));
            std::fs::write(&path, text).expect("write temp config");
            TempFile(path)
        }
        fn path(&self) -> String {
            self.0.to_string_lossy().into_owned()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load_err(a: &[&str], env: &[(&str, &str)]) -> ConfigError {
        match Config::load(&args(a), &env_of(env)) {
            Ok(cfg) => panic!("expected an error, got {cfg:?}"),
            Err(e) => e,
        }
    }

    fn yaml_err(text: &str) -> ConfigError {
        let mut cfg = Config::default();
        match cfg.apply_yaml(text, "test.yaml") {
            Ok(()) => panic!("expected an error for {text:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn table_covers_every_field_once() {
        let debug = format!("{:#?}", Config::default());
        let fields: Vec<&str> = debug
            .lines()
            .filter_map(|l| l.strip_prefix("    "))
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split_once(':').map(|(name, _)| name))
            .collect();
        // Structured keys are fields too, declared in STRUCTURED instead of KEYS.
        let fields: Vec<&str> = fields
            .into_iter()
            .filter(|f| !STRUCTURED.iter().any(|s| s.key == *f))
            .collect();
        let keys: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
        assert_eq!(
            fields, keys,
            "KEYS must list every Config field, in field order"
        );
        for s in STRUCTURED {
            assert_eq!(s.env, format!("SWITCHBOARD_{}", s.key.to_ascii_uppercase()));
            assert!(!s.doc.is_empty(), "{} has no doc", s.key);
            assert!(!KEYS.iter().any(|k| k.key == s.key), "{} twice", s.key);
        }
        for k in KEYS {
            assert_eq!(k.env, format!("SWITCHBOARD_{}", k.key.to_ascii_uppercase()));
            assert!(!k.doc.is_empty(), "{} has no doc", k.key);
        }
    }

    #[test]
    fn table_defaults_equal_default_impl() {
        let expected = format!("{:?}", Config::default());
        let mut cfg = Config::default();
        // Perturb first so that a default string that parses to nothing would show.
        cfg.apply_yaml(
            "port: 1\nhost: 127.0.0.9\nws_paths: [/x]\njwt_secret: s\nstrict: true\n",
            "t",
        )
        .expect("perturb");
        for k in KEYS {
            apply(
                &mut cfg,
                k.key,
                &Raw::Text(k.default.to_owned()),
                Source::Flag("t"),
            )
            .unwrap_or_else(|e| panic!("default of {} does not parse: {e}", k.key));
        }
        assert_eq!(format!("{cfg:?}"), expected);
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn env_aliases_map_to_their_keys() {
        // Every alias of a key, one at a time, sets that key and says so as its source.
        let cases: &[(&str, &str, &str, &str)] = &[
            ("WEBSOCKET_HOST", "127.0.0.1", "host", "\"127.0.0.1\""),
            ("HTTP_HOST", "127.0.0.1", "host", "\"127.0.0.1\""),
            ("WEBSOCKET_PORT", "8081", "port", "8081"),
            ("HTTP_PORT", "8086", "port", "8086"),
            ("PORT", "9000", "port", "9000"),
            (
                "WEBSOCKET_MAX_MESSAGE_SIZE",
                "512000",
                "max_message_size",
                "512000",
            ),
            ("WEBSOCKET_PING_INTERVAL", "30s", "ping_interval", "30s"),
            ("WEBSOCKET_PONG_WAIT", "70s", "pong_wait", "70s"),
            ("WEBSOCKET_WRITE_WAIT", "3s", "write_wait", "3s"),
            (
                "WEBSOCKET_LIMITS_MAX_CONNECTIONS",
                "10000",
                "max_connections",
                "10000",
            ),
            (
                "WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM",
                "1000",
                "max_connections_per_room",
                "1000",
            ),
            (
                "DATABASE_URL",
                "postgres://u:p@db:5432/m",
                "database_url",
                "Some(\"postgres://u:p@db:5432/m\")",
            ),
            (
                "KAFKA_BROKERS",
                "k1:9092,k2:9092",
                "kafka_brokers",
                "[\"k1:9092\", \"k2:9092\"]",
            ),
            (
                "KAFKA_GROUP_ID",
                "messaging-service",
                "kafka_group_id",
                "\"messaging-service\"",
            ),
            ("JWT_SECRET", "s3cret", "jwt_secret", "Some(\"s3cret\")"),
        ];
        for (name, value, key, want) in cases {
            let loaded = load_warn(&[], &[(name, value)]);
            assert_eq!(
                value_debug(&loaded.config, key).as_deref(),
                Some(*want),
                "{name}"
            );
            assert_eq!(
                loaded.sources.get(*key).map(String::as_str),
                Some(format!("alias env {name}").as_str()),
                "{name}"
            );
        }
        // The table covers exactly the variables of the four services' documents.
        let names: Vec<&str> = ENV_ALIASES.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(
            names,
            [
                "WEBSOCKET_ENABLED",
                "WEBSOCKET_HOST",
                "HTTP_HOST",
                "WEBSOCKET_PORT",
                "HTTP_PORT",
                "PORT",
                "WEBSOCKET_TIMEOUT",
                "WEBSOCKET_READ_BUFFER_SIZE",
                "WEBSOCKET_WRITE_BUFFER_SIZE",
                "WEBSOCKET_MAX_MESSAGE_SIZE",
                "WEBSOCKET_PING_INTERVAL",
                "WEBSOCKET_PONG_WAIT",
                "WEBSOCKET_WRITE_WAIT",
                "WEBSOCKET_LIMITS_MAX_CONNECTIONS",
                "WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM",
                "AUTH_ENABLED",
                "AUTH_SERVICE_URL",
                "AUTH_TIMEOUT",
                "ENVIRONMENT",
                "DATABASE_URL",
                "REDIS_URL",
                "KAFKA_BROKERS",
                "KAFKA_GROUP_ID",
                "JWT_SECRET",
            ]
        );
        // Every mapped key exists.
        for (_, _, l) in ENV_ALIASES.iter().chain(LEGACY_YAML) {
            if let Legacy::Key(k) | Legacy::AuthKey(k) = l {
                assert!(KEYS.iter().any(|i| i.key == *k), "{k}");
            }
        }
    }

    #[test]
    fn aliases_rank_below_native_env_and_above_the_file() {
        let file = TempFile::new("alias-rank", "port: 1001\nkafka_group_id: file\n");
        let path = file.path();
        let a = ["--config", path.as_str()];
        let loaded = load_warn(&a, &[("PORT", "1002")]);
        assert_eq!(loaded.config.port, 1002);
        assert_eq!(loaded.sources["port"], "alias env PORT");
        assert_eq!(loaded.config.kafka_group_id, "file");
        assert_eq!(loaded.sources["kafka_group_id"], format!("in {path}"));
        let loaded = load_warn(&a, &[("PORT", "1002"), ("SWITCHBOARD_PORT", "1003")]);
        assert_eq!(loaded.config.port, 1003);
        assert_eq!(loaded.sources["port"], "from env SWITCHBOARD_PORT");
        let loaded = load_warn(&["--config", &path, "--port", "1004"], &[("PORT", "1002")]);
        assert_eq!(loaded.config.port, 1004);
        assert_eq!(loaded.sources["port"], "from flag --port");
        // Two aliases of one key: the same value is fine, different values refuse, naming both.
        let loaded = load_warn(&[], &[("PORT", "8081"), ("WEBSOCKET_PORT", "8081")]);
        assert_eq!(loaded.config.port, 8081);
        let e = load_err(&[], &[("PORT", "8081"), ("HTTP_PORT", "8086")]);
        assert_eq!(e.key, "port");
        assert!(
            e.message.contains("env HTTP_PORT and env PORT")
                && e.message.contains("(8086 against 8081)")
                && e.message.contains("SWITCHBOARD_PORT"),
            "{e}"
        );
        // Equal durations in two spellings are the same value.
        let loaded = load_warn(
            &[],
            &[("WEBSOCKET_HOST", "0.0.0.0"), ("HTTP_HOST", "0.0.0.0")],
        );
        assert_eq!(loaded.config.host, "0.0.0.0");
        // The native variable beside disagreeing aliases decides (they are unused then).
        let loaded = load_warn(
            &[],
            &[
                ("HTTP_HOST", "127.0.0.1"),
                ("WEBSOCKET_HOST", "0.0.0.0"),
                ("SWITCHBOARD_HOST", "::1"),
            ],
        );
        assert_eq!(loaded.config.host, "::1");
        assert_eq!(
            load_err(
                &[],
                &[("HTTP_HOST", "127.0.0.1"), ("WEBSOCKET_HOST", "0.0.0.0")]
            )
            .key,
            "host"
        );
        // A bad alias value names the alias.
        let e = load_err(&[], &[("PORT", "http")]);
        assert_eq!(e.key, "port");
        assert!(e.message.contains("from env PORT"), "{e}");
    }

    #[test]
    fn settings_without_effect_log_one_line_each() {
        let env = [
            ("WEBSOCKET_ENABLED", "true"),
            ("WEBSOCKET_TIMEOUT", "30s"),
            ("WEBSOCKET_READ_BUFFER_SIZE", "1024"),
            ("WEBSOCKET_WRITE_BUFFER_SIZE", "1024"),
            ("ENVIRONMENT", "production"),
        ];
        let loaded = load_warn(&[], &env);
        let w = &loaded.warnings;
        assert_eq!(w.len(), env.len(), "{w:#?}");
        for ((name, _), line) in env.iter().zip(w) {
            assert!(
                line.starts_with(&format!("env {name} has no effect here: ")),
                "{line}"
            );
        }
        assert!(w[0].ends_with("so it is always on"), "{}", w[0]);
        assert!(w[2].contains("one read buffer per shard"), "{}", w[2]);
        // REDIS_URL joins the cluster now.
        let redis = load_warn(&[], &[("REDIS_URL", "redis://127.0.0.1:6379")]);
        assert!(redis.warnings.is_empty(), "{:?}", redis.warnings);
        assert_eq!(
            redis.config.redis_url.as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        // The per-connection buffers of the old service do not touch the per-shard ones, and
        // never stop the start (they are below the native 4096 floor).
        let cfg = &loaded.config;
        assert_eq!(
            (cfg.read_buffer_size, cfg.write_buffer_size),
            (64 * 1024, 256 * 1024)
        );
        assert_eq!(cfg.auth_mode, AuthMode::None);
        // Native names keep refusing a buffer below the floor.
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_READ_BUFFER_SIZE", "1024")]).key,
            "read_buffer_size"
        );
        // WEBSOCKET_ENABLED=false refuses to start; a non-boolean is an error too.
        let e = load_err(&[], &[("WEBSOCKET_ENABLED", "false")]);
        assert_eq!(e.key, "env WEBSOCKET_ENABLED");
        assert!(e.message.contains("does not start"), "{e}");
        assert_eq!(
            load_err(&[], &[("WEBSOCKET_ENABLED", "maybe")]).key,
            "env WEBSOCKET_ENABLED"
        );
    }

    #[test]
    fn alias_values_out_of_range_are_clamped_native_ones_refused() {
        let loaded = load_warn(&[], &[("WEBSOCKET_MAX_MESSAGE_SIZE", "100MiB")]);
        assert_eq!(loaded.config.max_message_size, MESSAGE_SIZE_MAX);
        assert_eq!(
            loaded.warnings,
            vec![format!(
                "max_message_size 104857600 (alias env WEBSOCKET_MAX_MESSAGE_SIZE) is outside \
                 125 bytes to 64MiB here, so {MESSAGE_SIZE_MAX} is used (set max_message_size \
                 to silence this)"
            )]
        );
        let loaded = load_warn(&[], &[("WEBSOCKET_MAX_MESSAGE_SIZE", "10")]);
        assert_eq!(loaded.config.max_message_size, MESSAGE_SIZE_MIN);
        // The native key set explicitly wins and is checked as always.
        let e = load_err(
            &[],
            &[
                ("WEBSOCKET_MAX_MESSAGE_SIZE", "100MiB"),
                ("SWITCHBOARD_MAX_MESSAGE_SIZE", "100MiB"),
            ],
        );
        assert_eq!(e.key, "max_message_size");
        // Also when the alias alone would be in range: the native value is never clamped.
        let e = load_err(
            &[],
            &[
                ("WEBSOCKET_MAX_MESSAGE_SIZE", "1024"),
                ("SWITCHBOARD_MAX_MESSAGE_SIZE", "100MiB"),
            ],
        );
        assert_eq!(e.key, "max_message_size");
        let loaded = load_warn(
            &["--max-message-size", "1MiB"],
            &[("WEBSOCKET_MAX_MESSAGE_SIZE", "100MiB")],
        );
        assert_eq!(loaded.config.max_message_size, 1 << 20);
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
        // 0 = unlimited in the rooms module: the node's own maximum here, said once.
        let loaded = load_warn(
            &[],
            &[
                ("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "0"),
                ("WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM", "0"),
            ],
        );
        assert_eq!(loaded.config.max_connections, 0);
        assert_eq!(loaded.config.max_connections_per_room, 0);
        assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("file-descriptor limit"));
        let loaded = load_warn(&[], &[("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "99999999999")]);
        assert_eq!(loaded.config.max_connections, CONNECTIONS_MAX);
        let loaded = load_warn(
            &[],
            &[
                ("WEBSOCKET_PONG_WAIT", "48h"),
                ("WEBSOCKET_WRITE_WAIT", "30h"),
            ],
        );
        assert_eq!(loaded.config.pong_wait, DURATION_MAX);
        assert_eq!(loaded.config.write_wait, DURATION_MAX);
        assert_eq!(loaded.warnings.len(), 2, "{:#?}", loaded.warnings);
    }

    #[test]
    fn jwt_secret_or_auth_enabled_turns_jwt_on() {
        let loaded = load_warn(&[], &[("JWT_SECRET", "s3cret")]);
        assert_eq!(loaded.config.auth_mode, AuthMode::Jwt);
        assert_eq!(loaded.sources["auth_mode"], "inferred from env JWT_SECRET");
        assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
        assert!(!loaded.warnings[0].contains("s3cret"));
        // AUTH_ENABLED=true with a native secret.
        let loaded = load_warn(
            &[],
            &[("AUTH_ENABLED", "true"), ("SWITCHBOARD_JWT_SECRET", "s")],
        );
        assert_eq!(loaded.config.auth_mode, AuthMode::Jwt);
        assert_eq!(
            loaded.sources["auth_mode"],
            "inferred from env AUTH_ENABLED"
        );
        // The chat hub's AUTH_ENABLED with AUTH_SERVICE_URL: its auth service decides.
        let loaded = load_warn(
            &[],
            &[
                ("AUTH_ENABLED", "true"),
                ("AUTH_SERVICE_URL", "http://127.0.0.1:8080/validate"),
                ("AUTH_TIMEOUT", "10s"),
            ],
        );
        assert_eq!(loaded.config.auth_mode, AuthMode::Service);
        assert_eq!(
            loaded.config.auth_service_url.as_deref(),
            Some("http://127.0.0.1:8080/validate")
        );
        assert_eq!(loaded.config.auth_service_timeout, Duration::from_secs(10));
        assert_eq!(
            loaded.sources["auth_mode"],
            "inferred from env AUTH_ENABLED and auth_service_url"
        );
        // AUTH_ENABLED=true without any key refuses, saying what to set.
        let e = load_err(&[], &[("AUTH_ENABLED", "true")]);
        assert_eq!(e.key, "auth_mode");
        assert!(e.message.contains("set JWT_SECRET"), "{e}");
        // An explicit auth_mode wins, with a line when it leaves clients unauthenticated.
        let loaded = load_warn(&["--auth-mode", "none"], &[("JWT_SECRET", "s3cret")]);
        assert_eq!(loaded.config.auth_mode, AuthMode::None);
        assert!(
            loaded.warnings[0].contains("auth_mode none (from flag --auth-mode) wins"),
            "{:#?}",
            loaded.warnings
        );
        // AUTH_ENABLED=false is one line and leaves auth_mode as it is.
        let loaded = load_warn(&[], &[("AUTH_ENABLED", "false")]);
        assert_eq!(loaded.config.auth_mode, AuthMode::None);
        assert_eq!(loaded.warnings.len(), 1);
        let loaded = load_warn(&[], &[("AUTH_ENABLED", "false"), ("JWT_SECRET", "s")]);
        assert_eq!(loaded.config.auth_mode, AuthMode::Jwt);
        // A native secret alone changes nothing (native behaviour is unchanged).
        let loaded = load_warn(&[], &[("SWITCHBOARD_JWT_SECRET", "s")]);
        assert_eq!(loaded.config.auth_mode, AuthMode::None);
        // Disagreeing secrets are refused without echoing either.
        let loaded = load_warn(&[], &[("JWT_SECRET", "a"), ("SWITCHBOARD_JWT_SECRET", "b")]);
        assert_eq!(loaded.config.jwt_secret.as_deref(), Some("b"));
        assert_eq!(loaded.config.auth_mode, AuthMode::Jwt);
    }

    #[test]
    fn the_dump_names_every_source_and_hides_secrets() {
        let file = TempFile::new("dump", "shards: 2\nwebsocket:\n  pong_wait: 70s\n");
        let path = file.path();
        let loaded = load_warn(
            &["--config", &path, "--log-level", "debug"],
            &[
                ("PORT", "9000"),
                ("JWT_SECRET", "hunter2"),
                ("DATABASE_URL", "postgres://u:pw@h/d"),
            ],
        );
        let dump = loaded.dump();
        for line in [
            "port = 9000  # alias env PORT\n".to_owned(),
            format!("shards = 2  # in {path}\n"),
            format!("pong_wait = 70s  # alias websocket.pong_wait in {path}\n"),
            "log_level = \"debug\"  # from flag --log-level\n".to_owned(),
            "auth_mode = Jwt  # inferred from env JWT_SECRET\n".to_owned(),
            "jwt_secret = <redacted>  # alias env JWT_SECRET\n".to_owned(),
            "api_key = None  # default\n".to_owned(),
            "host = \"0.0.0.0\"  # default\n".to_owned(),
        ] {
            assert!(dump.contains(&line), "{line:?} not in\n{dump}");
        }
        assert!(!dump.contains("hunter2") && !dump.contains("pw@"), "{dump}");
        assert_eq!(dump.lines().count(), KEYS.len() + STRUCTURED.len());
    }

    #[test]
    fn precedence_file_legacy_env_env_cli() {
        let file = TempFile::new(
            "precedence",
            "port: 1001\nshards: 2\nmax_connections: 10\nlog_level: debug\nmax_message_size: 1KiB\n",
        );
        let path = file.path();
        // Only the file.
        let cfg = Config::load(&args(&["--config", &path]), &no_env).expect("file only");
        assert_eq!((cfg.port, cfg.shards, cfg.max_connections), (1001, 2, 10));
        assert_eq!(cfg.max_message_size, 1024);
        assert_eq!(cfg.log_level, "debug");
        // WEBSOCKET_* beats the file.
        let env = [
            ("WEBSOCKET_PORT", "1002"),
            ("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "20"),
        ];
        let cfg = Config::load(&args(&["--config", &path]), &env_of(&env)).expect("legacy");
        assert_eq!((cfg.port, cfg.max_connections, cfg.shards), (1002, 20, 2));
        // SWITCHBOARD_* beats WEBSOCKET_*.
        let env = [
            ("WEBSOCKET_PORT", "1002"),
            ("SWITCHBOARD_PORT", "1003"),
            ("SWITCHBOARD_SHARDS", "3"),
        ];
        let cfg = Config::load(&args(&["--config", &path]), &env_of(&env)).expect("env");
        assert_eq!((cfg.port, cfg.shards, cfg.max_connections), (1003, 3, 10));
        // CLI beats everything.
        let cfg = Config::load(
            &args(&["--config", &path, "--port", "1004", "--shards=4"]),
            &env_of(&env),
        )
        .expect("cli");
        assert_eq!((cfg.port, cfg.shards, cfg.max_connections), (1004, 4, 10));
        assert_eq!(cfg.log_level, "debug");
    }

    #[test]
    fn config_path_from_env_and_flag_wins() {
        let a = TempFile::new("env-path-a", "port: 2001\n");
        let b = TempFile::new("env-path-b", "port: 2002\n");
        let env = [(CONFIG_FILE_ENV, a.path())];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let cfg = Config::load(&[], &env_of(&env)).expect("env path");
        assert_eq!(cfg.port, 2001);
        let cfg = Config::load(&args(&[&format!("--config={}", b.path())]), &env_of(&env))
            .expect("flag path");
        assert_eq!(cfg.port, 2002);
        let e = load_err(&["--config", "/nonexistent/switchboard.yaml"], &[]);
        assert_eq!(e.key, "config");
        assert!(e.message.contains("/nonexistent/switchboard.yaml"), "{e}");
    }

    #[test]
    fn yaml_values_of_every_shape() {
        let mut cfg = Config::default();
        cfg.apply_yaml(
            "host: 127.0.0.1\nport: 9000\npin_cores: false\nstrict: yes\n\
             ws_paths: [/a, /b]\nallowed_origins:\n  - https://x.example\n  - https://y.example\n\
             echo_path: /echo\njwt_audience: ~\nping_interval: 1m30s\npong_wait: 100\n\
             so_sndbuf: 64k\nauth_mode: jwt\nlog_format: json\njwt_algorithms: RS256, PS256\n",
            "t.yaml",
        )
        .expect("valid yaml");
        assert_eq!(cfg.host, "127.0.0.1");
        assert_eq!(cfg.port, 9000);
        assert!(!cfg.pin_cores);
        assert!(cfg.strict);
        assert_eq!(cfg.ws_paths, vec!["/a", "/b"]);
        assert_eq!(
            cfg.allowed_origins,
            vec!["https://x.example", "https://y.example"]
        );
        assert_eq!(cfg.echo_path.as_deref(), Some("/echo"));
        assert_eq!(cfg.jwt_audience, None);
        assert_eq!(cfg.ping_interval, Duration::from_secs(90));
        assert_eq!(cfg.pong_wait, Duration::from_secs(100));
        assert_eq!(cfg.so_sndbuf, 65536);
        assert_eq!(cfg.auth_mode, AuthMode::Jwt);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.jwt_algorithms, vec!["RS256", "PS256"]);
        // Empty document = nothing set.
        let mut cfg = Config::default();
        cfg.apply_yaml("# only a comment\n", "t")
            .expect("empty doc");
        assert_eq!(format!("{cfg:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn yaml_unknown_key_is_named_with_a_suggestion() {
        let e = yaml_err("port: 80\nmax_mesage_size: 1000\n");
        assert_eq!(e.key, "max_mesage_size");
        assert!(e.message.contains("did you mean `max_message_size`"), "{e}");
        let e = yaml_err("completely_unrelated_thing: 1\n");
        assert_eq!(e.key, "completely_unrelated_thing");
        assert!(e.message.contains("unknown key"), "{e}");
    }

    #[test]
    fn yaml_shape_errors() {
        let e = yaml_err("limits:\n  max_connections: 5\n");
        assert_eq!(e.key, "limits");
        let e = yaml_err("port:\n  nested: 1\n");
        assert_eq!(e.key, "port");
        assert!(e.message.contains("not a map"), "{e}");
        assert_eq!(yaml_err("- a\n- b\n").key, "config");
        assert_eq!(yaml_err("port: [1, 2\n").key, "config");
        assert_eq!(yaml_err("port: 1\nport: 2\n").key, "config");
        let e = yaml_err("port: [1, 2]\n");
        assert_eq!(e.key, "port");
        assert!(e.message.contains("not a list"), "{e}");
        let e = yaml_err("port: 70000\n");
        assert_eq!(e.key, "port");
        assert!(e.message.contains("in test.yaml"), "{e}");
        assert_eq!(yaml_err("host: ~\n").key, "host");
        assert_eq!(yaml_err("ws_paths: [[/a]]\n").key, "ws_paths");
    }

    #[test]
    fn env_values() {
        let env = [
            ("SWITCHBOARD_ECHO_PATH", "/echo"),
            (
                "SWITCHBOARD_ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
            ("SWITCHBOARD_JWT_ISSUER", ""),
            ("SWITCHBOARD_PIN_CORES", "off"),
            ("WEBSOCKET_PING_INTERVAL", "20s"),
            ("WEBSOCKET_PONG_WAIT", "30s"),
            ("WEBSOCKET_READ_BUFFER_SIZE", "8192"),
            ("WEBSOCKET_WRITE_BUFFER_SIZE", "16KiB"),
            ("WEBSOCKET_MAX_MESSAGE_SIZE", "1MiB"),
            ("WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM", "7"),
            ("WEBSOCKET_WRITE_WAIT", "2s"),
            ("WEBSOCKET_HOST", "::1"),
        ];
        let cfg = Config::load(&[], &env_of(&env)).expect("env config");
        assert_eq!(cfg.echo_path.as_deref(), Some("/echo"));
        assert_eq!(
            cfg.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(cfg.jwt_issuer, None);
        assert!(!cfg.pin_cores);
        assert_eq!(cfg.ping_interval, Duration::from_secs(20));
        assert_eq!(cfg.pong_wait, Duration::from_secs(30));
        // The rooms module's per-connection buffers have no effect on the per-shard ones.
        assert_eq!(cfg.read_buffer_size, 64 * 1024);
        assert_eq!(cfg.write_buffer_size, 256 * 1024);
        assert_eq!(cfg.max_message_size, 1 << 20);
        assert_eq!(cfg.max_connections_per_room, 7);
        assert_eq!(cfg.write_wait, Duration::from_secs(2));
        assert_eq!(cfg.host, "::1");
        // An empty list env var empties the list.
        let cfg = Config::load(&[], &env_of(&[("SWITCHBOARD_JWT_ALGORITHMS", "")]))
            .expect("empty list is fine outside jwt mode");
        assert!(cfg.jwt_algorithms.is_empty());
    }

    #[test]
    fn bad_values_name_key_and_source() {
        let e = load_err(&[], &[("WEBSOCKET_PORT", "abc")]);
        assert_eq!(e.key, "port");
        assert_eq!(
            e.to_string(),
            "config key `port`: invalid value \"abc\" from env WEBSOCKET_PORT: expected an integer 1-65535"
        );
        let e = load_err(&["--ping-interval", "soon"], &[]);
        assert_eq!(e.key, "ping_interval");
        assert!(e.message.contains("from flag --ping-interval"), "{e}");
        let e = load_err(&[], &[("SWITCHBOARD_STRICT", "maybe")]);
        assert_eq!(e.key, "strict");
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_AUTH_MODE", "oauth")]).key,
            "auth_mode"
        );
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_LOG_FORMAT", "xml")]).key,
            "log_format"
        );
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_SO_RCVBUF", "8GiB")]).key,
            "so_rcvbuf"
        );
        assert_eq!(load_err(&[], &[("SWITCHBOARD_SHARDS", "-1")]).key, "shards");
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_WS_PATHS", "/a,,/b")]).key,
            "ws_paths"
        );
        assert_eq!(load_err(&[], &[("SWITCHBOARD_PORT", "")]).key, "port");
    }

    #[test]
    fn cli_forms() {
        let cfg = Config::load(
            &args(&[
                "--port=9001",
                "--host",
                "127.0.0.1",
                "--strict",
                "--pin-cores",
                "false",
                "--tcp-nodelay=no",
                "--reuse-port",
                "--ws-paths",
                "/a,/b",
                "--echo-path=",
                "--max-message-size",
                "1MiB",
            ]),
            &no_env,
        )
        .expect("cli");
        assert_eq!(cfg.port, 9001);
        assert_eq!(cfg.host, "127.0.0.1");
        assert!(cfg.strict);
        assert!(!cfg.pin_cores);
        assert!(!cfg.tcp_nodelay);
        assert!(cfg.reuse_port);
        assert_eq!(cfg.ws_paths, vec!["/a", "/b"]);
        assert_eq!(cfg.echo_path, None);
        assert_eq!(cfg.max_message_size, 1 << 20);
        // A bare bool flag does not swallow the next flag.
        let cfg = Config::load(&args(&["--strict", "--port", "7"]), &no_env).expect("bare");
        assert!(cfg.strict);
        assert_eq!(cfg.port, 7);
        // Later flag wins.
        let cfg = Config::load(&args(&["--port", "7", "--port", "8"]), &no_env).expect("twice");
        assert_eq!(cfg.port, 8);
    }

    #[test]
    fn cli_errors_name_the_flag() {
        let e = load_err(&["--prot", "1"], &[]);
        assert_eq!(e.key, "--prot");
        assert!(e.message.contains("did you mean --port?"), "{e}");
        let e = load_err(&["--max_message_size", "1"], &[]);
        assert_eq!(e.key, "--max_message_size");
        assert!(e.message.contains("--max-message-size"), "{e}");
        let e = load_err(&["--port"], &[]);
        assert_eq!(
            (e.key.as_str(), e.message.as_str()),
            ("--port", "missing value")
        );
        let e = load_err(&["--host", "--port", "1"], &[]);
        assert_eq!(e.key, "--host");
        let e = load_err(&["serve"], &[]);
        assert_eq!(e.key, "serve");
        let e = load_err(&["--config"], &[]);
        assert_eq!(e.key, "--config");
        let e = load_err(&["--config="], &[]);
        assert_eq!(e.key, "config");
    }

    #[test]
    fn help_lists_every_key() {
        for flag in ["--help", "-h"] {
            let e = load_err(&["--port", "1", flag, "--bogus"], &[]);
            assert_eq!(e.key, "help");
            assert_eq!(e.message, Config::help_text());
        }
        let help = Config::help_text();
        assert!(help.starts_with("Usage: switchboard"));
        for k in KEYS {
            assert!(help.contains(&k.flag()), "help lacks {}", k.flag());
            assert!(help.contains(k.env), "help lacks {}", k.env);
            assert!(help.contains(k.doc), "help lacks doc of {}", k.key);
            for l in env_aliases_of(k.key) {
                assert!(help.contains(l), "help lacks {l}");
            }
        }
    }

    #[test]
    fn secret_is_never_echoed() {
        let mut cfg = Config::default();
        let e = apply(
            &mut cfg,
            "jwt_secret",
            &Raw::List(vec!["hunter2".into()]),
            Source::Env("X"),
        )
        .expect_err("a list is not a secret");
        assert!(!e.message.contains("hunter2"), "{e}");
        assert!(e.message.contains("<redacted>"), "{e}");
    }

    #[test]
    fn durations() {
        let ok = [
            ("54s", Duration::from_secs(54)),
            ("100ms", Duration::from_millis(100)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("54", Duration::from_secs(54)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (" 7s ", Duration::from_secs(7)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("1.000000001s", Duration::new(1, 1)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s:?}");
        }
        for s in [
            "",
            " ",
            "s",
            "5",
            "5x",
            "1d",
            "-5s",
            "5 s",
            "1.2.3s",
            ".s",
            "1.0000000001s",
            "99999999999999999999",
            "999999999999999999999h",
            "5s5",
            "abc",
            "1e3s",
        ] {
            if s == "5" {
                continue; // a bare integer is valid; kept in the list to mark the boundary
            }
            assert!(parse_duration(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn byte_sizes() {
        let ok = [
            ("65536", 65536),
            ("0", 0),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("1GiB", 1 << 30),
            ("64KB", 64_000),
            ("1MB", 1_000_000),
            ("1GB", 1_000_000_000),
            ("64k", 65536),
            ("64K", 65536),
            ("2m", 2 << 20),
            ("1g", 1 << 30),
            ("64kib", 65536),
            ("64 KiB", 65536),
            ("512B", 512),
            (" 1k ", 1024),
        ];
        for (s, n) in ok {
            assert_eq!(parse_bytes(s), Ok(n), "{s:?}");
        }
        for s in [
            "",
            "KiB",
            "-1",
            "1.5MiB",
            "64 Ki B",
            "1TiB",
            "1x",
            "99999999999999999999999",
        ] {
            assert!(parse_bytes(s).is_err(), "{s:?} should be rejected");
        }
        assert!(parse_bytes(&format!("{}GiB", usize::MAX / 2)).is_err());
    }

    type Mutation = Box<dyn FnOnce(&mut Config)>;

    fn invalid(mutate: impl FnOnce(&mut Config)) -> ConfigError {
        let mut cfg = Config::default();
        mutate(&mut cfg);
        match cfg.validate() {
            Ok(()) => panic!("expected a validation error for {cfg:?}"),
            Err(e) => e,
        }
    }

    fn jwt_cfg(algs: &[&str]) -> Config {
        Config {
            auth_mode: AuthMode::Jwt,
            jwt_algorithms: algs.iter().map(|s| (*s).to_owned()).collect(),
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            jwt_public_key_file: Some("/keys/pub.pem".into()),
            ..Config::default()
        }
    }

    #[test]
    fn every_validation_error_names_its_key() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("port", Box::new(|c| c.port = 0)),
            ("shards", Box::new(|c| c.shards = 65)),
            ("host", Box::new(|c| c.host = "localhost".into())),
            ("host", Box::new(|c| c.host = String::new())),
            ("ws_paths", Box::new(|c| c.ws_paths.clear())),
            ("ws_paths", Box::new(|c| c.ws_paths.push("ws".into()))),
            ("ws_paths", Box::new(|c| c.ws_paths.push("/ws".into()))),
            ("ws_paths", Box::new(|c| c.ws_paths.push("/health".into()))),
            ("ws_paths", Box::new(|c| c.ws_paths.push("/a b".into()))),
            ("echo_path", Box::new(|c| c.echo_path = Some("echo".into()))),
            ("echo_path", Box::new(|c| c.echo_path = Some("/ws".into()))),
            ("max_message_size", Box::new(|c| c.max_message_size = 124)),
            (
                "max_message_size",
                Box::new(|c| c.max_message_size = MESSAGE_SIZE_MAX + 1),
            ),
            ("read_buffer_size", Box::new(|c| c.read_buffer_size = 4095)),
            (
                "write_buffer_size",
                Box::new(|c| c.write_buffer_size = 4095),
            ),
            (
                "send_queue_bytes_max",
                Box::new(|c| c.send_queue_bytes_max = 4095),
            ),
            (
                "max_rooms_per_connection",
                Box::new(|c| c.max_rooms_per_connection = 0),
            ),
            (
                "max_room_name_bytes",
                Box::new(|c| c.max_room_name_bytes = 0),
            ),
            (
                "max_room_name_bytes",
                Box::new(|c| c.max_room_name_bytes = 4097),
            ),
            (
                "max_request_header_bytes",
                Box::new(|c| c.max_request_header_bytes = 1023),
            ),
            (
                "max_dm_content_bytes",
                Box::new(|c| c.max_dm_content_bytes = 0),
            ),
            (
                "store_memory_bytes",
                Box::new(|c| c.store_memory_bytes = (1 << 20) - 1),
            ),
            (
                "ping_interval",
                Box::new(|c| c.ping_interval = Duration::ZERO),
            ),
            ("ping_interval", Box::new(|c| c.ping_interval = c.pong_wait)),
            ("pong_wait", Box::new(|c| c.pong_wait = Duration::ZERO)),
            (
                "handshake_timeout",
                Box::new(|c| c.handshake_timeout = Duration::ZERO),
            ),
            ("write_wait", Box::new(|c| c.write_wait = Duration::ZERO)),
            (
                "write_coalesce",
                Box::new(|c| c.write_coalesce = Duration::from_millis(5001)),
            ),
            (
                "auth_timeout",
                Box::new(|c| c.auth_timeout = Duration::ZERO),
            ),
            (
                "shutdown_timeout",
                Box::new(|c| c.shutdown_timeout = Duration::ZERO),
            ),
            (
                "store_timeout",
                Box::new(|c| c.store_timeout = Duration::from_millis(99)),
            ),
            ("rate_limit_per_sec", Box::new(|c| c.rate_limit_per_sec = 0)),
            ("rate_limit_burst", Box::new(|c| c.rate_limit_burst = 0)),
            (
                "rate_limit_max_violations",
                Box::new(|c| c.rate_limit_max_violations = 0),
            ),
            ("log_level", Box::new(|c| c.log_level = " ".into())),
            (
                "send_queue_bytes_max",
                Box::new(|c| c.send_queue_bytes_max = SEND_QUEUE_BYTES_CEILING + 1),
            ),
            (
                "write_buffer_size",
                Box::new(|c| c.write_buffer_size = BUFFER_SIZE_MAX + 1),
            ),
            (
                "so_rcvbuf",
                Box::new(|c| c.so_rcvbuf = SOCKET_BUFFER_BYTES_MAX + 1),
            ),
            (
                "max_connections_per_user",
                Box::new(|c| c.max_connections_per_user = 0),
            ),
            (
                "max_connections_per_user",
                Box::new(|c| c.max_connections_per_user = 65_536),
            ),
            (
                "http_body_bytes_max",
                Box::new(|c| c.http_body_bytes_max = 1023),
            ),
            (
                "http_body_bytes_max",
                Box::new(|c| c.http_body_bytes_max = HTTP_BODY_BYTES_LIMIT + 1),
            ),
            (
                "http_keepalive_timeout",
                Box::new(|c| c.http_keepalive_timeout = Duration::from_millis(999)),
            ),
            (
                "http_keepalive_requests_max",
                Box::new(|c| c.http_keepalive_requests_max = 0),
            ),
            (
                "max_dm_content_bytes",
                Box::new(|c| c.max_dm_content_bytes = MESSAGE_SIZE_MAX + 1),
            ),
            (
                "shutdown_timeout",
                Box::new(|c| c.shutdown_timeout = DURATION_MAX + Duration::from_secs(1)),
            ),
            ("api_key", Box::new(|c| c.api_key = Some("a b".into()))),
            (
                "cors_origins",
                Box::new(|c| c.cors_origins = vec!["app.example".into()]),
            ),
            (
                "cors_origins",
                Box::new(|c| c.cors_origins = vec!["https://app.example/".into()]),
            ),
            (
                "cors_origins",
                Box::new(|c| c.cors_origins = vec!["*".into(), "https://a.example".into()]),
            ),
            ("jwt_algorithms", Box::new(|c| *c = jwt_cfg(&[]))),
            ("jwt_algorithms", Box::new(|c| *c = jwt_cfg(&["none"]))),
            ("jwt_algorithms", Box::new(|c| *c = jwt_cfg(&["hs256"]))),
            (
                "jwt_algorithms",
                Box::new(|c| *c = jwt_cfg(&["HS256", "RS256"])),
            ),
            (
                "jwt_algorithms",
                Box::new(|c| *c = jwt_cfg(&["ES256", "EdDSA"])),
            ),
            (
                "jwt_secret",
                Box::new(|c| {
                    *c = jwt_cfg(&["HS256", "HS512"]);
                    c.jwt_secret = None;
                }),
            ),
            (
                "jwt_secret",
                Box::new(|c| {
                    *c = jwt_cfg(&["HS384"]);
                    c.jwt_secret = Some(String::new());
                }),
            ),
            (
                "jwt_public_key_file",
                Box::new(|c| {
                    *c = jwt_cfg(&["RS256", "PS256"]);
                    c.jwt_public_key_file = None;
                }),
            ),
            (
                "jwt_public_key_file",
                Box::new(|c| {
                    *c = jwt_cfg(&["EdDSA"]);
                    c.jwt_public_key_file = None;
                }),
            ),
            // ---- presence
            (
                "presence_offline_grace",
                Box::new(|c| c.presence_offline_grace = Duration::from_millis(999)),
            ),
            (
                "max_watched_users_per_connection",
                Box::new(|c| c.max_watched_users_per_connection = 0),
            ),
            (
                "max_presence_query_users",
                Box::new(|c| c.max_presence_query_users = 10_001),
            ),
            (
                "max_presence_room_users",
                Box::new(|c| c.max_presence_room_users = 0),
            ),
        ];
        for (key, mutate) in cases {
            let e = invalid(mutate);
            assert_eq!(e.key, key, "wrong key in {e}");
            assert!(
                e.to_string().starts_with(&format!("config key `{key}`: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn valid_edges_pass() {
        let ok: Vec<Mutation> = vec![
            Box::new(|c| c.port = 65535),
            Box::new(|c| c.shards = 64),
            Box::new(|c| c.host = "::".into()),
            Box::new(|c| c.max_message_size = 125),
            Box::new(|c| c.max_message_size = MESSAGE_SIZE_MAX),
            Box::new(|c| c.read_buffer_size = 4096),
            Box::new(|c| c.max_room_name_bytes = 4096),
            Box::new(|c| c.echo_path = Some("/echo".into())),
            Box::new(|c| c.ping_interval = c.pong_wait - Duration::from_millis(1)),
            Box::new(|c| c.jwt_algorithms.clear()), // not in jwt mode
            Box::new(|c| c.send_queue_bytes_max = SEND_QUEUE_BYTES_CEILING),
            Box::new(|c| c.max_connections_per_user = 65_535),
            Box::new(|c| c.http_body_bytes_max = HTTP_BODY_BYTES_MIN),
            Box::new(|c| c.http_body_bytes_max = HTTP_BODY_BYTES_LIMIT),
            Box::new(|c| c.http_keepalive_timeout = Duration::from_secs(1)),
            Box::new(|c| c.store_timeout = DURATION_MAX),
            Box::new(|c| c.store_memory_bytes = 1 << 20),
            Box::new(|c| c.cors_origins = vec!["*".into()]),
            Box::new(|c| {
                c.cors_origins = vec!["https://a.example".into(), "http://b.example:8080".into()]
            }),
            Box::new(|c| c.api_key = Some("k-0123456789".into())),
            Box::new(|c| *c = jwt_cfg(&["HS256", "HS384", "HS512"])),
            Box::new(|c| *c = jwt_cfg(&["RS256", "RS512", "PS256", "PS384"])),
            Box::new(|c| *c = jwt_cfg(&["ES256", "ES384"])),
            Box::new(|c| *c = jwt_cfg(&["EdDSA"])),
            // ---- presence
            Box::new(|c| c.presence_offline_grace = Duration::from_secs(1)),
            Box::new(|c| c.max_watched_users_per_connection = 100_000),
            Box::new(|c| c.max_presence_query_users = 1),
            Box::new(|c| c.max_presence_room_users = 1),
        ];
        for mutate in ok {
            let mut cfg = Config::default();
            mutate(&mut cfg);
            cfg.validate()
                .unwrap_or_else(|e| panic!("{cfg:?} rejected: {e}"));
        }
    }

    #[test]
    fn load_runs_validate() {
        let e = load_err(&["--ping-interval", "60s"], &[]);
        assert_eq!(e.key, "ping_interval");
        let e = load_err(&["--auth-mode", "jwt"], &[]);
        assert_eq!(e.key, "jwt_secret");
    }

    /// The key table in docs/CONFIG.md, between the markers, as generated from [`KEYS`].
    fn markdown_table() -> String {
        let mut out = String::from(
            "| YAML key | env var(s) | CLI flag | default | meaning |\n|---|---|---|---|---|\n",
        );
        for k in KEYS {
            let mut env = format!("`{}`", k.env);
            for alias in env_aliases_of(k.key) {
                env.push_str(&format!(", `{alias}`"));
            }
            let default = if k.default.is_empty() {
                "(none)".to_owned()
            } else {
                format!("`{}`", k.default)
            };
            out.push_str(&format!(
                "| `{}` | {env} | `{} {}` | {default} | {} |\n",
                k.key,
                k.flag(),
                value_hint(k.key).replace('|', "\\|"),
                k.doc
            ));
        }
        for s in STRUCTURED {
            out.push_str(&format!(
                "| `{}` | `{}` | `{} <YAML>` | (none) | {} |\n",
                s.key,
                s.env,
                s.flag(),
                s.doc
            ));
        }
        out
    }

    #[test]
    fn config_md_is_generated_from_the_table() {
        const BEGIN: &str = "<!-- keys:begin (generated by config::tests; do not edit) -->\n";
        const END: &str = "<!-- keys:end -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md");
        let doc = std::fs::read_to_string(path).expect("docs/CONFIG.md exists");
        let start = doc.find(BEGIN).expect("begin marker") + BEGIN.len();
        let end = doc.find(END).expect("end marker");
        let table = markdown_table();
        if doc[start..end] != table && std::env::var_os("SWITCHBOARD_BLESS_DOCS").is_some() {
            let updated = format!("{}{table}{}", &doc[..start], &doc[end..]);
            std::fs::write(path, updated).expect("rewrite docs/CONFIG.md");
            return;
        }
        assert!(
            doc[start..end] == table,
            "docs/CONFIG.md is stale; run SWITCHBOARD_BLESS_DOCS=1 cargo test config_md"
        );
        for k in KEYS {
            assert!(
                doc.contains(&format!("`{}`", k.key)),
                "CONFIG.md lacks {}",
                k.key
            );
        }
    }

    #[test]
    fn config_md_examples_are_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md");
        let doc = std::fs::read_to_string(path).expect("docs/CONFIG.md exists");
        let example_at = doc.find("## Example").expect("an Example section");
        let mut blocks = 0;
        let mut rest = 0;
        while let Some(found) = doc[rest..].find("```yaml\n") {
            let start = rest + found + "```yaml\n".len();
            let len = doc[start..].find("```").expect("end of the yaml block");
            let mut cfg = Config::default();
            cfg.apply_yaml(&doc[start..start + len], "CONFIG.md")
                .unwrap_or_else(|e| panic!("block at byte {start} does not parse: {e}"));
            cfg.validate().expect("example validates");
            if start > example_at {
                assert_eq!(cfg.auth_mode, AuthMode::Jwt);
                assert_eq!(cfg.max_connections, 500_000);
            }
            blocks += 1;
            rest = start + len;
        }
        assert!(blocks >= 3, "CONFIG.md has {blocks} yaml blocks");
    }

    #[test]
    fn trace_keys_parse_and_validate() {
        let ok = Config::load(
            &[],
            &env_of(&[
                ("SWITCHBOARD_TRACE_EXPORTER", "Zipkin"),
                ("SWITCHBOARD_TRACE_SAMPLE_RATIO", "25%"),
                ("SWITCHBOARD_TRACE_ENDPOINT", "http://z:9411/api/v2/spans"),
            ]),
        )
        .expect("valid");
        assert_eq!(ok.trace_exporter, TraceExporter::Zipkin);
        assert!((ok.trace_sample_ratio - 0.25).abs() < 1e-9);
        assert_eq!(ok.trace_url(), "http://z:9411/api/v2/spans");
        assert_eq!(ok.trace_service(), "switchboard");
        let d = Config::load(&[], &env_of(&[("SWITCHBOARD_TRACE_EXPORTER", "otlp")])).unwrap();
        assert_eq!(d.trace_url(), "http://127.0.0.1:4318/v1/traces");
        assert!((d.trace_sample_ratio - 0.01).abs() < 1e-9);
        assert_eq!(Config::default().trace_exporter, TraceExporter::Off);
        assert_eq!(d.trace_parent_sampled, TraceParentSampled::Api);
        let all =
            Config::load(&[], &env_of(&[("SWITCHBOARD_TRACE_PARENT_SAMPLED", "ALL")])).unwrap();
        assert_eq!(all.trace_parent_sampled, TraceParentSampled::All);
        for (env, v, key) in [
            (
                "SWITCHBOARD_TRACE_SAMPLE_RATIO",
                "1.5",
                "trace_sample_ratio",
            ),
            (
                "SWITCHBOARD_TRACE_SAMPLE_RATIO",
                "-0.1",
                "trace_sample_ratio",
            ),
            ("SWITCHBOARD_TRACE_EXPORTER", "jaeger", "trace_exporter"),
            (
                "SWITCHBOARD_TRACE_PARENT_SAMPLED",
                "yes",
                "trace_parent_sampled",
            ),
            ("SWITCHBOARD_TRACE_ENDPOINT", "https://x/", "trace_endpoint"),
            (
                "SWITCHBOARD_TRACE_EXPORT_INTERVAL",
                "1ms",
                "trace_export_interval",
            ),
            (
                "SWITCHBOARD_TRACE_EXPORT_BATCH_MAX",
                "0",
                "trace_export_batch_max",
            ),
            (
                "SWITCHBOARD_TRACE_EXPORT_BATCH_MAX",
                "9000",
                "trace_export_batch_max",
            ),
            (
                "SWITCHBOARD_TRACE_EXPORT_TIMEOUT",
                "2m",
                "trace_export_timeout",
            ),
        ] {
            let e = Config::load(&[], &env_of(&[(env, v)])).expect_err(v);
            assert_eq!(e.key, key, "{e:?}");
        }
    }

    #[test]
    fn write_coalesce_keys_parse() {
        let ok = Config::load(
            &[],
            &env_of(&[
                ("SWITCHBOARD_WRITE_COALESCE_MIN_RATE", "0"),
                ("SWITCHBOARD_WRITE_COALESCE", "20ms"),
            ]),
        )
        .expect("valid");
        assert_eq!(ok.write_coalesce_min_rate, 0);
        assert_eq!(ok.write_coalesce, Duration::from_millis(20));
        let e = Config::load(
            &[],
            &env_of(&[("SWITCHBOARD_WRITE_COALESCE_MIN_RATE", "-1")]),
        )
        .expect_err("negative");
        assert_eq!(e.key, "write_coalesce_min_rate", "{e:?}");
    }

    fn load_warn(a: &[&str], env: &[(&str, &str)]) -> Loaded {
        let names: Vec<String> = env.iter().map(|(k, _)| (*k).to_owned()).collect();
        Config::load_with_warnings(&args(a), &env_of(env), &names)
            .unwrap_or_else(|e| panic!("load failed: {e}"))
    }

    #[test]
    fn nested_yaml_joins_the_path_with_underscores() {
        let mut cfg = Config::default();
        cfg.apply_yaml(
            "jwt:\n  secret: s3cret\n  algorithms: [HS384]\nrate_limit:\n  per_sec: 5\n  burst: 9\n\
             max:\n  connections:\n    per_user: 3\nhttp: {keepalive_timeout: 2s}\n",
            "t.yaml",
        )
        .expect("nested native keys");
        assert_eq!(cfg.jwt_secret.as_deref(), Some("s3cret"));
        assert_eq!(cfg.jwt_algorithms, vec!["HS384"]);
        assert_eq!((cfg.rate_limit_per_sec, cfg.rate_limit_burst), (5, 9));
        assert_eq!(cfg.max_connections_per_user, 3);
        assert_eq!(cfg.http_keepalive_timeout, Duration::from_secs(2));
        // A bad nested value names the key and where it was written.
        let e = yaml_err("jwt:\n  leeway: soon\n");
        assert_eq!(e.key, "jwt_leeway");
        assert!(e.message.contains("in test.yaml at jwt.leeway"), "{e}");
    }

    /// The rooms module's documented block, verbatim (its README, "Full Configuration Example").
    const ROOMS_SERVICE_BLOCK: &str = r#"websocket:
  enabled: true
  host: "0.0.0.0"
  port: 8081
  timeout: "30s"
  read_buffer_size: 1024
  write_buffer_size: 1024
  max_message_size: 512000  # 500KB
  ping_interval: "54s"
  pong_wait: "60s"
  write_wait: "10s"
  
  limits:
    max_connections: 10000       # 0 = unlimited
    max_connections_per_room: 1000  # 0 = unlimited
"#;

    /// The topic service's block, verbatim (its README, "Configuration").
    const TOPIC_SERVICE_BLOCK: &str = r#"websocket:
  write_wait: 10s
  pong_wait: 60s
  ping_period: 54s
  read_buffer_size: 1024
  write_buffer_size: 1024
  max_message_size: 10485760  # 10MB
  client_buffer_size: 256
  cleanup_interval: 30s
  stale_connection_timeout: 90s
  register_buffer: 256
  unregister_buffer: 256
  broadcast_buffer: 1024
"#;

    #[test]
    fn rooms_service_block_is_accepted_as_written() {
        let file = TempFile::new("rooms-block", ROOMS_SERVICE_BLOCK);
        let path = file.path();
        let loaded = load_warn(&["--config", &path], &[]);
        let cfg = &loaded.config;
        assert_eq!((cfg.host.as_str(), cfg.port), ("0.0.0.0", 8081));
        assert_eq!(cfg.max_message_size, 512_000);
        assert_eq!(
            (cfg.ping_interval, cfg.pong_wait, cfg.write_wait),
            (
                Duration::from_secs(54),
                Duration::from_secs(60),
                Duration::from_secs(10)
            )
        );
        assert_eq!(cfg.max_connections, 10_000);
        assert_eq!(cfg.max_connections_per_room, 1_000);
        // The old per-connection buffers leave the per-shard ones alone.
        assert_eq!(cfg.read_buffer_size, 64 * 1024);
        assert_eq!(cfg.write_buffer_size, 256 * 1024);
        assert_eq!(
            loaded.sources["max_connections"],
            format!("alias websocket.limits.max_connections in {path}")
        );
        let w = &loaded.warnings;
        assert_eq!(w.len(), 4, "{w:#?}");
        assert_eq!(
            w[0],
            format!(
                "websocket.enabled in {path} has no effect here: Switchboard is the WebSocket \
                 server itself, so it is always on"
            )
        );
        assert!(w[1].starts_with(&format!("websocket.timeout in {path} has no effect here")));
        assert!(w[1].contains("pong_wait"), "{w:#?}");
        assert!(
            w[2].starts_with(&format!(
                "websocket.read_buffer_size in {path} has no effect here: it sized a \
                 per-connection read buffer there"
            )),
            "{w:#?}"
        );
        assert!(
            w[3].starts_with("websocket.write_buffer_size in "),
            "{w:#?}"
        );
        // The same settings from the old env names add no second line.
        let loaded = load_warn(
            &["--config", &path],
            &[
                ("WEBSOCKET_ENABLED", "true"),
                ("WEBSOCKET_TIMEOUT", "30s"),
                ("WEBSOCKET_READ_BUFFER_SIZE", "1024"),
            ],
        );
        assert_eq!(loaded.warnings.len(), 4, "{:#?}", loaded.warnings);
        // `enabled: false` refuses to start.
        let off = TempFile::new("rooms-off", "websocket:\n  enabled: false\n");
        let e = load_err(&["--config", &off.path()], &[]);
        assert!(e.key.starts_with("websocket.enabled in "), "{e}");
        // The "production" snippet of the same README: limits only.
        let mut cfg = Config::default();
        cfg.apply_yaml(
            "websocket:\n  limits:\n    max_connections: 50000\n    max_connections_per_room: 5000\n",
            "t",
        )
        .expect("limits block");
        assert_eq!(
            (cfg.max_connections, cfg.max_connections_per_room),
            (50_000, 5_000)
        );
    }

    #[test]
    fn topic_service_block_is_accepted_as_written() {
        let file = TempFile::new("topic-block", TOPIC_SERVICE_BLOCK);
        let path = file.path();
        let loaded = load_warn(&["--config", &path], &[]);
        let cfg = &loaded.config;
        assert_eq!(cfg.ping_interval, Duration::from_secs(54));
        assert_eq!(cfg.pong_wait, Duration::from_secs(60));
        assert_eq!(cfg.write_wait, Duration::from_secs(10));
        assert_eq!(cfg.max_message_size, 10_485_760);
        assert_eq!(
            loaded.sources["ping_interval"],
            format!("alias websocket.ping_period in {path}")
        );
        let no_effect: Vec<&str> = loaded
            .warnings
            .iter()
            .map(|w| w.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            no_effect,
            [
                "websocket.read_buffer_size",
                "websocket.write_buffer_size",
                "websocket.client_buffer_size",
                "websocket.cleanup_interval",
                "websocket.stale_connection_timeout",
                "websocket.register_buffer",
                "websocket.unregister_buffer",
                "websocket.broadcast_buffer",
            ],
            "{:#?}",
            loaded.warnings
        );
        for w in &loaded.warnings {
            assert!(w.contains(" has no effect here: "), "{w}");
        }
        // Both blocks' keys in one file (the union): ping_interval and ping_period agree here.
        let both = format!(
            "{ROOMS_SERVICE_BLOCK}{}",
            TOPIC_SERVICE_BLOCK.trim_start_matches("websocket:\n")
        )
        .replace("  read_buffer_size: 1024\n  write_buffer_size: 1024\n  max_message_size: 10485760  # 10MB\n", "")
        .replace("  write_wait: 10s\n  pong_wait: 60s\n", "");
        let file = TempFile::new("union-block", &both);
        let loaded = load_warn(&["--config", &file.path()], &[]);
        assert_eq!(loaded.config.ping_interval, Duration::from_secs(54));
        assert_eq!(loaded.config.max_message_size, 512_000);
        // When they disagree, the start is refused naming both.
        let e = yaml_load_err("websocket:\n  ping_interval: 30s\n  ping_period: 54s\n");
        assert_eq!(e.key, "ping_interval");
        assert!(
            e.message
                .contains("websocket.ping_interval and websocket.ping_period"),
            "{e}"
        );
    }

    fn yaml_load_err(text: &str) -> ConfigError {
        let file = TempFile::new("yaml-load-err", text);
        load_err(&["--config", &file.path()], &[])
    }

    #[test]
    fn a_native_key_in_the_file_beats_the_block_and_aliases_beat_both() {
        let file = TempFile::new(
            "native-vs-block",
            "websocket:\n  port: 8081\n  pong_wait: 60s\nport: 9000\npong_wait: 60s\n",
        );
        let path = file.path();
        let loaded = load_warn(&["--config", &path], &[]);
        assert_eq!(loaded.config.port, 9000);
        assert_eq!(loaded.sources["port"], format!("in {path}"));
        // A line only where the two differ.
        assert_eq!(
            loaded.warnings,
            vec![format!(
                "websocket.port in {path} is overridden by port of the same file (a native key \
                 beats the websocket: block)"
            )]
        );
        // An env alias beats the file's native key and its block.
        let loaded = load_warn(&["--config", &path], &[("HTTP_PORT", "8086")]);
        assert_eq!(loaded.config.port, 8086);
        // A block value out of range is clamped like an env alias; a native one is refused.
        let file = TempFile::new("block-clamp", "websocket:\n  max_message_size: 1GiB\n");
        let loaded = load_warn(&["--config", &file.path()], &[]);
        assert_eq!(loaded.config.max_message_size, MESSAGE_SIZE_MAX);
        assert_eq!(loaded.warnings.len(), 1);
        assert_eq!(
            yaml_load_err("max_message_size: 1GiB\n").key,
            "max_message_size"
        );
    }

    #[test]
    fn unknown_nested_keys_name_the_full_path() {
        let e = yaml_err("websocket:\n  limits:\n    max_conections: 5\n");
        assert_eq!(e.key, "websocket.limits.max_conections");
        assert!(
            e.message
                .contains("unknown key; did you mean `websocket.limits.max_connections`?"),
            "{e}"
        );
        let e = yaml_err("websocket:\n  prot: 1\n");
        assert_eq!(e.key, "websocket.prot");
        assert!(e.message.contains("`websocket.port`"), "{e}");
        let e = yaml_err("jwt:\n  secrte: x\n");
        assert_eq!(e.key, "jwt.secrte");
        assert!(e.message.contains("`jwt.secret`"), "{e}");
        let e = yaml_err("websocket:\n  limits: 5\n");
        assert_eq!(e.key, "websocket.limits");
        let e = yaml_err("nothing:\n  here: 1\n");
        assert_eq!(e.key, "nothing");
        assert!(e.message.contains("see --help"), "{e}");
    }

    /// A structured key for this test only: `test_paths: [{path: /a}, ...]` sets ws_paths.
    fn test_paths(cfg: &mut Config, v: &serde_norway::Value) -> Result<(), String> {
        use serde_norway::Value;
        let Value::Sequence(items) = v else {
            return Err("expected a list of maps with `path`".into());
        };
        let mut paths = Vec::with_capacity(items.len());
        for item in items {
            match item.get("path") {
                Some(Value::String(p)) => paths.push(p.clone()),
                _ => return Err("expected a list of maps with `path`".into()),
            }
        }
        cfg.ws_paths = paths;
        Ok(())
    }

    const TEST_STRUCTURED: &[StructuredKey] = &[StructuredKey {
        key: "test_paths",
        env: "SWITCHBOARD_TEST_PATHS",
        apply: test_paths,
        doc: "Test only: WebSocket paths as a list of maps with `path`.",
    }];

    fn load_structured(a: &[&str], env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let names: Vec<String> = env.iter().map(|(k, _)| (*k).to_owned()).collect();
        Loader::new(TEST_STRUCTURED).load(&args(a), &env_of(env), &names)
    }

    #[test]
    fn structured_keys_take_a_list_of_maps_from_every_source() {
        let flat = TempFile::new("structured", "test_paths:\n  - path: /a\n  - path: /b\n");
        let cfg = load_structured(&["--config", &flat.path()], &[])
            .expect("flat")
            .config;
        assert_eq!(cfg.ws_paths, vec!["/a", "/b"]);
        let nested = TempFile::new("structured-nested", "test:\n  paths: [{path: /n}]\n");
        let cfg = load_structured(&["--config", &nested.path()], &[])
            .expect("nested")
            .config;
        assert_eq!(cfg.ws_paths, vec!["/n"]);
        let loaded = load_structured(&[], &[("SWITCHBOARD_TEST_PATHS", r#"[{"path": "/e"}]"#)])
            .expect("env JSON");
        assert_eq!(loaded.config.ws_paths, vec!["/e"]);
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
        let cfg = load_structured(&["--test-paths", "[{path: /f}]"], &[])
            .expect("flag")
            .config;
        assert_eq!(cfg.ws_paths, vec!["/f"]);
        let Err(e) = load_structured(&["--test-paths", "/f"], &[]) else {
            panic!("a scalar is not a list of maps");
        };
        assert_eq!(e.key, "test_paths");
        assert!(e.message.contains("from flag --test-paths"), "{e}");
        // Validation still runs on what the structured key set.
        let bad = TempFile::new("structured-bad", "test_paths: [{path: nope}]\n");
        let Err(e) = load_structured(&["--config", &bad.path()], &[]) else {
            panic!("relative path accepted");
        };
        assert_eq!(e.key, "ws_paths");
        // Without the declaration the same file is an unknown key.
        assert_eq!(load_err(&["--config", &flat.path()], &[]).key, "test_paths");
    }

    #[test]
    fn misspelled_env_names_warn_with_the_closest_key() {
        let loaded = load_warn(
            &[],
            &[
                ("SWITCHBOARD_PROT", "1"),
                ("SWITCHBOARD_PORT", "9000"),
                ("SWITCHBOARD_CONFIG_DIR_OF_SOMETHING_ELSE", "x"),
                ("WEBSOCKET_PROT", "1"),
                ("WEBSOCKET_TOTALLY_UNRELATED_THING", "1"),
                ("WEBSOCKET_PONG_WAIT", "61s"),
            ],
        );
        assert_eq!(loaded.config.port, 9000);
        let w = &loaded.warnings;
        assert_eq!(w.len(), 3, "{w:#?}");
        assert_eq!(
            w[0],
            "env SWITCHBOARD_PROT is not a setting and is ignored; did you mean SWITCHBOARD_PORT?"
        );
        assert!(
            w[1].contains("SWITCHBOARD_CONFIG_DIR_OF_SOMETHING_ELSE"),
            "{w:#?}"
        );
        assert!(w[1].contains("--help"), "{w:#?}");
        assert!(w[2].contains("did you mean WEBSOCKET_PORT?"), "{w:#?}");
        // Known names, including the config file and the no-effect legacy ones, are quiet.
        let loaded = load_warn(
            &[],
            &[
                ("SWITCHBOARD_BLESS_DOCS", "1"),
                ("SWITCHBOARD_API_KEY", "k"),
                ("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "5"),
            ],
        );
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    }

    #[test]
    fn cross_field_errors_say_where_each_value_came_from() {
        let e = load_err(&["--ping-interval", "60s"], &[]);
        assert_eq!(e.key, "ping_interval");
        assert_eq!(
            e.message,
            "must be less than pong_wait: ping_interval 60s (from flag --ping-interval) >= pong_wait 60s (default)"
        );
        let file = TempFile::new("cross", "websocket:\n  pong_wait: 10s\n");
        let e = load_err(
            &["--config", &file.path()],
            &[("SWITCHBOARD_PING_INTERVAL", "20s")],
        );
        assert!(
            e.message
                .contains("ping_interval 20s (from env SWITCHBOARD_PING_INTERVAL)"),
            "{e}"
        );
        assert!(
            e.message.contains(&format!(
                "pong_wait 10s (alias websocket.pong_wait in {})",
                file.path()
            )),
            "{e}"
        );
        let e = load_err(&["--auth-mode", "jwt"], &[]);
        assert_eq!(e.key, "jwt_secret");
        assert!(
            e.message.contains("auth_mode jwt (from flag --auth-mode)"),
            "{e}"
        );
        assert!(e.message.contains("jwt_algorithms (default)"), "{e}");
        let e = load_err(&[], &[("SWITCHBOARD_ECHO_PATH", "/ws")]);
        assert_eq!(e.key, "echo_path");
        assert!(
            e.message.contains("(from env SWITCHBOARD_ECHO_PATH)"),
            "{e}"
        );
        assert!(e.message.contains("ws_paths (default)"), "{e}");
        // validate() on a config built in code names no source.
        let e = invalid(|c| c.ping_interval = c.pong_wait);
        assert!(!e.message.contains("default"), "{e}");
    }

    #[test]
    fn size_keys_are_bounded_by_their_types() {
        // send_queue_bytes_max: the per-connection count is a u32.
        let ok = Config::load(
            &[],
            &env_of(&[("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", "1GiB")]),
        )
        .expect("1 GiB");
        assert_eq!(ok.send_queue_bytes_max, SEND_QUEUE_BYTES_CEILING);
        for v in ["1073741825", "4GiB", "4100000000", "5GiB"] {
            let e = load_err(&[], &[("SWITCHBOARD_SEND_QUEUE_BYTES_MAX", v)]);
            assert_eq!(e.key, "send_queue_bytes_max", "{v}");
            assert!(e.message.contains("u32"), "{e}");
        }
        const { assert!(SEND_QUEUE_BYTES_CEILING + MESSAGE_SIZE_MAX < u32::MAX as usize) };
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_SO_SNDBUF", "2GiB")]).key,
            "so_sndbuf"
        );
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_LISTEN_BACKLOG", "4294967295")]).key,
            "listen_backlog"
        );
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_MAX_CONNECTIONS", "4294967296")]).key,
            "max_connections"
        );
        assert_eq!(
            load_err(&[], &[("SWITCHBOARD_READ_BUFFER_SIZE", "1GiB")]).key,
            "read_buffer_size"
        );
        // Durations: token windows are u32 seconds, deadlines are ms added to now.
        for key in [
            "TOKEN_REFRESH_WINDOW",
            "TOKEN_EXPIRY_GRACE",
            "STORE_TIMEOUT",
            "JWT_LEEWAY",
        ] {
            let name = format!("SWITCHBOARD_{key}");
            let e = load_err(&[], &[(&name, "1193047h")]);
            assert_eq!(e.key, key.to_ascii_lowercase(), "{e}");
            assert!(e.message.contains("24h maximum"), "{e}");
        }
    }

    #[test]
    fn new_http_and_user_keys_parse() {
        let cfg = Config::load(
            &args(&[
                "--max-connections-per-user",
                "3",
                "--http-body-bytes-max",
                "2MiB",
                "--http-keepalive-timeout",
                "7s",
                "--http-keepalive-requests-max",
                "9",
                "--cors-origins",
                "https://a.example,http://b.example:8080",
                "--expose-shard",
            ]),
            &env_of(&[("SWITCHBOARD_API_KEY", "k-123")]),
        )
        .expect("valid");
        assert_eq!(cfg.max_connections_per_user, 3);
        assert_eq!(cfg.http_body_bytes_max, 2 << 20);
        assert_eq!(cfg.http_keepalive_timeout, Duration::from_secs(7));
        assert_eq!(cfg.http_keepalive_requests_max, 9);
        assert_eq!(cfg.api_key.as_deref(), Some("k-123"));
        assert_eq!(
            cfg.cors_origins,
            vec!["https://a.example", "http://b.example:8080"]
        );
        assert!(cfg.expose_shard);
        let cfg = Config::load(&[], &env_of(&[("SWITCHBOARD_API_KEY", "")])).expect("empty");
        assert_eq!(cfg.api_key, None);
        // The key is never echoed, even when refused.
        let e = load_err(&[], &[("SWITCHBOARD_API_KEY", "hunter2 with space")]);
        assert_eq!(e.key, "api_key");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let mut cfg = Config::default();
        let e = apply(
            &mut cfg,
            "api_key",
            &Raw::List(vec!["hunter2".into()]),
            Source::Env("X"),
        )
        .expect_err("a list is not a key");
        assert!(!e.message.contains("hunter2"), "{e}");
    }

    #[test]
    fn help_and_version_and_stray_arguments() {
        let e = load_err(&["help"], &[]);
        assert!(e.is_help(), "{e}");
        assert_eq!(e.message, Config::help_text());
        assert!(Config::help_text().contains("switchboard doctor"));
        assert!(Config::help_text().contains("--version"));
        for a in ["--version", "-V"] {
            let e = load_err(&[a], &[]);
            assert!(e.is_version(), "{e}");
            assert_eq!(
                e.message,
                format!("switchboard {}", env!("CARGO_PKG_VERSION"))
            );
        }
        for a in ["serve", "version", "helpme"] {
            let e = load_err(&[a], &[]);
            assert!(!e.is_help() && !e.is_version(), "{a}: {e}");
            assert_eq!(e.key, a);
            assert!(e.message.contains("unexpected argument"), "{e}");
        }
    }

    // ---- typing and receipts
    #[test]
    fn typing_and_receipt_keys_parse_and_validate() {
        let cfg = Config::load(
            &args(&["--typing-ttl", "1s"]),
            &env_of(&[("SWITCHBOARD_MAX_RECEIPT_MESSAGE_IDS", "7")]),
        )
        .expect("valid");
        assert_eq!(cfg.typing_ttl, Duration::from_secs(1));
        assert_eq!(cfg.max_receipt_message_ids, 7);
        for (key, mutate) in [
            (
                "typing_ttl",
                Box::new(|c: &mut Config| c.typing_ttl = Duration::from_millis(999)) as Mutation,
            ),
            (
                "typing_ttl",
                Box::new(|c: &mut Config| c.typing_ttl = DURATION_MAX + Duration::from_secs(1)),
            ),
            (
                "max_receipt_message_ids",
                Box::new(|c: &mut Config| c.max_receipt_message_ids = 0),
            ),
            (
                "max_receipt_message_ids",
                Box::new(|c: &mut Config| {
                    c.max_receipt_message_ids = RECEIPT_MESSAGE_IDS_LIMIT + 1
                }),
            ),
        ] {
            assert_eq!(invalid(mutate).key, key);
        }
        let cfg = Config {
            typing_ttl: DURATION_MAX,
            max_receipt_message_ids: RECEIPT_MESSAGE_IDS_LIMIT,
            ..Config::default()
        };
        cfg.validate().expect("edges are valid");
    }

    #[test]
    fn redis_tls_keys_need_rediss_and_come_in_pairs() {
        let tls = |url: &str| {
            let url = url.to_owned();
            move |c: &mut Config| c.redis_url = Some(url)
        };
        for key in [
            "redis_tls_ca_file",
            "redis_tls_cert_file",
            "redis_tls_key_file",
        ] {
            // Without a rediss:// URL, a TLS file would be ignored: refused by name.
            let e = invalid(|c| {
                c.redis_url = Some("redis://127.0.0.1:6379".into());
                let f = Some("/etc/x.pem".to_owned());
                match key {
                    "redis_tls_ca_file" => c.redis_tls_ca_file = f,
                    "redis_tls_cert_file" => {
                        c.redis_tls_cert_file = f.clone();
                        c.redis_tls_key_file = f;
                    }
                    _ => {
                        c.redis_tls_cert_file = f.clone();
                        c.redis_tls_key_file = f;
                    }
                }
            });
            assert!(e.message.contains("rediss://"), "{key}: {e:?}");
        }
        let e = invalid(|c| {
            tls("rediss://h:6380")(c);
            c.redis_tls_cert_file = Some("/c.pem".into());
        });
        assert_eq!(e.key, "redis_tls_key_file");
        let e = invalid(|c| {
            tls("rediss://h:6380")(c);
            c.redis_tls_key_file = Some("/k.pem".into());
        });
        assert_eq!(e.key, "redis_tls_cert_file");
        let e = invalid(|c| {
            tls("rediss://h:6380#insecure")(c);
            c.redis_tls_ca_file = Some("/ca.pem".into());
        });
        assert_eq!(e.key, "redis_tls_ca_file");
        assert!(e.message.contains("#insecure"), "{e:?}");
        let e = invalid(|c| {
            tls("rediss://:hunter2@a:1,redis://:hunter2@b:2")(c);
            c.redis_cluster = true;
        });
        assert_eq!(e.key, "redis_url");
        assert!(!e.message.contains("hunter2"), "{e:?}");
        // What is accepted (files are read at start, not here).
        for ok in [
            Config {
                redis_url: Some("rediss://:pw@h:6380".into()),
                ..Config::default()
            },
            Config {
                redis_url: Some("rediss://a:1,rediss://b:2".into()),
                redis_cluster: true,
                redis_tls_ca_file: Some("/ca.pem".into()),
                redis_tls_cert_file: Some("/c.pem".into()),
                redis_tls_key_file: Some("/k.pem".into()),
                ..Config::default()
            },
            Config {
                redis_url: Some("rediss://h:6380#insecure".into()),
                redis_tls_cert_file: Some("/c.pem".into()),
                redis_tls_key_file: Some("/k.pem".into()),
                ..Config::default()
            },
        ] {
            assert!(ok.validate().is_ok(), "{ok:?}: {:?}", ok.validate());
        }
    }
}

/// The auth service's and `rpc_routes`' keys (`crate::proxy`), apart from the main tests.
#[cfg(test)]
mod proxy_key_tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(&[], &move |k| map.get(k).cloned())
    }

    fn err(env: &[(&str, &str)]) -> String {
        load(env).expect_err("expected an error").to_string()
    }

    #[test]
    fn service_mode_needs_an_http_url() {
        let e = err(&[("SWITCHBOARD_AUTH_MODE", "service")]);
        assert!(
            e.contains("auth_service_url") && e.contains("required"),
            "{e}"
        );
        let e = err(&[
            ("SWITCHBOARD_AUTH_MODE", "service"),
            ("SWITCHBOARD_AUTH_SERVICE_URL", "https://auth/check"),
        ]);
        assert!(e.contains("https is not supported"), "{e}");
        let cfg = load(&[
            ("SWITCHBOARD_AUTH_MODE", "service"),
            ("SWITCHBOARD_AUTH_SERVICE_URL", "http://auth:9000/check"),
            ("SWITCHBOARD_AUTH_SERVICE_TIMEOUT", "10s"),
        ])
        .unwrap();
        assert_eq!(cfg.auth_mode, AuthMode::Service);
        assert_eq!(cfg.auth_service_timeout, Duration::from_secs(10));
        assert_eq!(
            cfg.auth_timeout,
            Duration::from_secs(10),
            "in-band: unchanged"
        );
        assert_eq!(cfg.auth_service_user_pointer, "/user_id");
    }

    #[test]
    fn ranges_name_the_key() {
        for (k, v, key) in [
            (
                "SWITCHBOARD_AUTH_SERVICE_TIMEOUT",
                "0s",
                "auth_service_timeout",
            ),
            (
                "SWITCHBOARD_AUTH_SERVICE_CACHE_TTL",
                "2h",
                "auth_service_cache_ttl",
            ),
            (
                "SWITCHBOARD_AUTH_SERVICE_CONCURRENCY_MAX",
                "0",
                "auth_service_concurrency_max",
            ),
            (
                "SWITCHBOARD_AUTH_SERVICE_USER_POINTER",
                "user_id",
                "auth_service_user_pointer",
            ),
            ("SWITCHBOARD_RPC_TIMEOUT", "61s", "rpc_timeout"),
            (
                "SWITCHBOARD_RPC_CONCURRENCY_PER_CONNECTION_MAX",
                "0",
                "rpc_concurrency_per_connection_max",
            ),
            (
                "SWITCHBOARD_RPC_REPLY_BYTES_MAX",
                "100",
                "rpc_reply_bytes_max",
            ),
        ] {
            let e = err(&[(k, v)]);
            assert!(e.contains(key), "{k}={v}: {e}");
        }
    }

    #[test]
    fn rpc_routes_from_env_text_json_and_the_file() {
        let cfg = load(&[(
            "SWITCHBOARD_RPC_ROUTES",
            "get_user=http://users/rpc,orders.*=http://orders:81/rpc",
        )])
        .unwrap();
        assert_eq!(cfg.rpc_routes.len(), 2);
        assert!(cfg.rpc_routes[1].prefix);
        let cfg = load(&[("SWITCHBOARD_RPC_ROUTES", r#"{"*": "http://all/"}"#)]).unwrap();
        assert_eq!(cfg.rpc_routes[0].pattern, "");
        let mut cfg = Config::default();
        cfg.apply_yaml(
            "rpc_routes:\n  get_user: http://users/rpc\n  create_order: http://orders/rpc\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(cfg.rpc_routes[1].pattern, "create_order");
        let e = err(&[("SWITCHBOARD_RPC_ROUTES", "ping=http://a/")]);
        assert!(e.contains("native"), "{e}");
    }
}

/// Service discovery's keys (`crate::bridge::eureka`), apart from the main tests.
#[cfg(test)]
mod eureka_key_tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(&[], &move |k| map.get(k).cloned())
    }

    fn err(env: &[(&str, &str)]) -> ConfigError {
        load(env).expect_err("expected an error")
    }

    const URL: (&str, &str) = ("SWITCHBOARD_EUREKA_URL", "http://e1:8761/eureka/");

    #[test]
    fn off_by_default_and_a_list_of_urls() {
        let cfg = load(&[]).unwrap();
        assert!(cfg.eureka_url.is_empty());
        assert_eq!(cfg.eureka_renewal_interval, Duration::from_secs(30));
        assert_eq!(cfg.eureka_lease_duration, Duration::from_secs(90));
        let cfg = load(&[(
            "SWITCHBOARD_EUREKA_URL",
            "http://e1:8761/eureka/, http://u:pw@e2:8761/eureka/",
        )])
        .unwrap();
        assert_eq!(
            cfg.eureka_url,
            ["http://e1:8761/eureka/", "http://u:pw@e2:8761/eureka/"]
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (env, key, says) in [
            (
                ("SWITCHBOARD_EUREKA_URL", "https://e/eureka"),
                "eureka_url",
                "https",
            ),
            (
                ("SWITCHBOARD_EUREKA_URL", "e:8761"),
                "eureka_url",
                "http://",
            ),
            (
                ("SWITCHBOARD_EUREKA_APP_NAME", "chat gateway"),
                "eureka_app_name",
                "letters",
            ),
            (
                ("SWITCHBOARD_EUREKA_INSTANCE_ID", "a/b"),
                "eureka_instance_id",
                "letters",
            ),
            (
                ("SWITCHBOARD_EUREKA_IP_ADDRESS", "node-a"),
                "eureka_ip_address",
                "IP address",
            ),
            (("SWITCHBOARD_EUREKA_PORT", "70000"), "eureka_port", "65535"),
            (
                ("SWITCHBOARD_EUREKA_RENEWAL_INTERVAL", "1500ms"),
                "eureka_renewal_interval",
                "whole seconds",
            ),
            (
                ("SWITCHBOARD_EUREKA_RENEWAL_INTERVAL", "10m"),
                "eureka_renewal_interval",
                "between",
            ),
            (
                ("SWITCHBOARD_EUREKA_LEASE_DURATION", "30s"),
                "eureka_lease_duration",
                "longer than eureka_renewal_interval",
            ),
            (
                ("SWITCHBOARD_EUREKA_TIMEOUT", "10ms"),
                "eureka_timeout",
                "between",
            ),
            (
                ("SWITCHBOARD_EUREKA_RETRY_MAX", "1h"),
                "eureka_retry_max",
                "between",
            ),
            (
                ("SWITCHBOARD_EUREKA_HEALTH_CHECK_URL", "ready"),
                "eureka_health_check_url",
                "path",
            ),
        ] {
            let e = err(&[URL, env]);
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn service_name_stands_in_for_the_app_name_only_when_it_can() {
        let e = err(&[URL, ("SWITCHBOARD_SERVICE_NAME", "my service")]);
        assert_eq!(e.key, "eureka_app_name", "{e}");
        assert!(e.message.contains("service_name"), "{e}");
        // Without Eureka, service_name is only /health's field.
        assert!(load(&[("SWITCHBOARD_SERVICE_NAME", "my service")]).is_ok());
        assert!(load(&[
            URL,
            ("SWITCHBOARD_SERVICE_NAME", "my service"),
            ("SWITCHBOARD_EUREKA_APP_NAME", "my-service"),
        ])
        .is_ok());
    }

    #[test]
    fn passwords_in_urls_are_never_shown() {
        let e = err(&[("SWITCHBOARD_EUREKA_URL", "http://u:hunter2@e/eureka?x")]);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let loaded = Config::load_with_warnings(
            &[],
            &|k| (k == "SWITCHBOARD_EUREKA_URL").then(|| "http://u:hunter2@e:8761/eureka/".into()),
            &[],
        )
        .unwrap();
        let dump = loaded.dump();
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(
            dump.contains(r#"eureka_url = ["http://u:<redacted>@e:8761/eureka/"]"#),
            "{dump}"
        );
        assert_eq!(
            url_without_password("http://e:1/x@y"),
            "http://e:1/x@y",
            "an @ in the path is not a password"
        );
    }
}
