//! Configuration: one validated [`Config`] built from, in order (later wins):
//! built-in defaults, a YAML file (`--config PATH`), the environment (`WEBSOCKET_*` names of the
//! Go module Switchboard replaces, then `SWITCHBOARD_<KEY>` for every key), then CLI flags
//! (`--<key-with-dashes> VALUE`). Invalid values stop the start with a message naming the key.
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
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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
    /// `WEBSOCKET_READ_BUFFER_SIZE`. Per-shard read buffer (bytes read per recv call).
    pub read_buffer_size: usize,
    /// `WEBSOCKET_WRITE_BUFFER_SIZE`. Most bytes handed to one send/sendmsg call.
    pub write_buffer_size: usize,
    /// WebSocket paths (the first is canonical; the rest are aliases for older clients).
    pub ws_paths: Vec<String>,
    /// Path of a plain WebSocket echo endpoint (protocol conformance); None = off.
    pub echo_path: Option<String>,

    // --- limits ---
    /// `WEBSOCKET_MAX_MESSAGE_SIZE`. Largest inbound message; above it close 1009.
    pub max_message_size: usize,
    /// `WEBSOCKET_LIMITS_MAX_CONNECTIONS`. 0 = derived from RLIMIT_NOFILE at start.
    pub max_connections: u64,
    /// `WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM`. 0 = unlimited.
    pub max_connections_per_room: u32,
    /// Rooms one connection may be subscribed to.
    pub max_rooms_per_connection: usize,
    /// Connections (devices) one user may hold on this node.
    pub max_connections_per_user: usize,
    /// Room name globs whose publishes are sequenced by one owner shard (one order everywhere).
    pub ordered_rooms: Vec<String>,
    /// Add the serving shard's index to `connected.data.shard`.
    pub expose_shard: bool,
    /// Longest room name in bytes.
    pub max_room_name_bytes: usize,
    /// Bytes queued for one connection before it is closed with 4008.
    pub send_queue_bytes_max: usize,
    /// Time allowed from TCP accept to a complete upgrade request.
    pub handshake_timeout: Duration,
    /// Largest HTTP upgrade request head in bytes (431 above it).
    pub max_request_header_bytes: usize,
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

    // --- direct messages ---
    /// Same clientMsgId from the same user within this window is acked again, not re-delivered.
    pub dedup_window: Duration,
    /// Most remembered (user, clientMsgId) pairs per node.
    pub dedup_entries_max: usize,
    /// Longest DM `content` in bytes.
    pub max_dm_content_bytes: usize,

    // --- operations ---
    /// Drain deadline after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// tracing EnvFilter directive, e.g. "info" or "switchboard=debug".
    pub log_level: String,
    /// Refuse to start when max_connections cannot be reached with the machine's limits.
    pub strict: bool,
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
            read_buffer_size: 64 * 1024,
            write_buffer_size: 256 * 1024,
            ws_paths: vec![
                "/ws".into(),
                "/socket/connect".into(),
                "/ws/chat".into(),
                "/api/v1/ws".into(),
            ],
            echo_path: None,
            max_message_size: 64 * 1024,
            max_connections: 0,
            max_connections_per_room: 100_000,
            max_rooms_per_connection: 128,
            max_connections_per_user: 64,
            ordered_rooms: Vec::new(),
            expose_shard: false,
            max_room_name_bytes: 256,
            send_queue_bytes_max: 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            max_request_header_bytes: 8 * 1024,
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
            dedup_window: Duration::from_secs(300),
            dedup_entries_max: 1_000_000,
            max_dm_content_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            strict: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and the key table
// ---------------------------------------------------------------------------------------------

/// A configuration problem. `key` names the offending config key (or flag, or `config` for the
/// file itself); the process should print the error and exit non-zero. The one exception is
/// `key == "help"`: `message` is the help text, to be printed before exiting 0.
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
    /// The `WEBSOCKET_*` name used by the Go module, if it had this setting.
    pub legacy_env: Option<&'static str>,
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
        if key == "jwt_secret" {
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

struct AuthModeKind;
impl Kind for AuthModeKind {
    type Out = AuthMode;
    const HINT: &'static str = "<none|jwt>";
    fn parse(raw: &Raw) -> Result<AuthMode, String> {
        match raw.text()?.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(AuthMode::None),
            "jwt" => Ok(AuthMode::Jwt),
            _ => Err("expected none or jwt".into()),
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

/// The one table: each row names the field, its kind (parser), default text, env names and doc.
/// It generates `KEYS`, `set_key`, `is_bool_key` and `value_hint`, so no field is handled by
/// hand per source.
macro_rules! config_keys {
    ($( $field:ident : $kind:ident = $default:literal, $env:literal, $legacy:expr, $doc:literal; )*) => {
        static KEYS: &[KeyInfo] = &[$(
            KeyInfo {
                key: stringify!($field),
                env: $env,
                legacy_env: $legacy,
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

        fn value_hint(key: &str) -> &'static str {
            match key {
                $( stringify!($field) => <$kind as Kind>::HINT, )*
                _ => "<VALUE>",
            }
        }
    };
}

config_keys! {
    host: Text = "0.0.0.0", "SWITCHBOARD_HOST", Some("WEBSOCKET_HOST"),
        "IP address to bind.";
    port: Port = "8081", "SWITCHBOARD_PORT", Some("WEBSOCKET_PORT"),
        "TCP port for WebSocket and HTTP.";
    shards: Count = "0", "SWITCHBOARD_SHARDS", None,
        "Shard threads; 0 = one per available core. At most 64.";
    pin_cores: Flag = "true", "SWITCHBOARD_PIN_CORES", None,
        "Pin each shard thread to a core.";
    reuse_port: Flag = "true", "SWITCHBOARD_REUSE_PORT", None,
        "One SO_REUSEPORT listener per shard (true) or one shared listener (false).";
    listen_backlog: U32 = "4096", "SWITCHBOARD_LISTEN_BACKLOG", None,
        "listen(2) backlog; the kernel caps it at net.core.somaxconn.";
    tcp_nodelay: Flag = "true", "SWITCHBOARD_TCP_NODELAY", None,
        "Set TCP_NODELAY on accepted sockets.";
    so_sndbuf: BytesU32 = "0", "SWITCHBOARD_SO_SNDBUF", None,
        "SO_SNDBUF per connection; 0 = kernel default (autotuned).";
    so_rcvbuf: BytesU32 = "0", "SWITCHBOARD_SO_RCVBUF", None,
        "SO_RCVBUF per connection; 0 = kernel default (autotuned).";
    read_buffer_size: Bytes = "64KiB", "SWITCHBOARD_READ_BUFFER_SIZE", Some("WEBSOCKET_READ_BUFFER_SIZE"),
        "Per-shard read buffer (bytes read per recv call). At least 4096.";
    write_buffer_size: Bytes = "256KiB", "SWITCHBOARD_WRITE_BUFFER_SIZE", Some("WEBSOCKET_WRITE_BUFFER_SIZE"),
        "Most bytes handed to one send/sendmsg call. At least 4096.";
    ws_paths: List = "/ws,/socket/connect,/ws/chat,/api/v1/ws", "SWITCHBOARD_WS_PATHS", None,
        "WebSocket paths; the first is canonical, the rest are aliases for older clients.";
    echo_path: OptText = "", "SWITCHBOARD_ECHO_PATH", None,
        "Path of a plain WebSocket echo endpoint (conformance tests); empty = off.";
    max_message_size: Bytes = "64KiB", "SWITCHBOARD_MAX_MESSAGE_SIZE", Some("WEBSOCKET_MAX_MESSAGE_SIZE"),
        "Largest inbound message; above it the connection is closed with 1009. 125 B to 64 MiB.";
    max_connections: U64 = "0", "SWITCHBOARD_MAX_CONNECTIONS", Some("WEBSOCKET_LIMITS_MAX_CONNECTIONS"),
        "Connection limit per node (503 above it); 0 = derived from RLIMIT_NOFILE at start.";
    max_connections_per_room: U32 = "100000", "SWITCHBOARD_MAX_CONNECTIONS_PER_ROOM", Some("WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM"),
        "Subscribers per room; 0 = unlimited.";
    max_rooms_per_connection: Count = "128", "SWITCHBOARD_MAX_ROOMS_PER_CONNECTION", None,
        "Rooms one connection may be subscribed to. At least 1.";
    max_connections_per_user: Count = "64", "SWITCHBOARD_MAX_CONNECTIONS_PER_USER", None,
        "Connections (devices) one user may hold on this node; above it the upgrade gets 429 and an in-band authenticate closes with 1008. 1 to 65535.";
    ordered_rooms: List = "", "SWITCHBOARD_ORDERED_ROOMS", None,
        "Room name globs whose publishes go through one owner shard, so every subscriber on every shard sees one order (one extra hop for publishers on other shards); empty = none.";
    expose_shard: Flag = "false", "SWITCHBOARD_EXPOSE_SHARD", None,
        "Add the serving shard's index to connected.data.shard (tests and debugging).";
    max_room_name_bytes: Bytes = "256", "SWITCHBOARD_MAX_ROOM_NAME_BYTES", None,
        "Longest room name in bytes, 1 to 4096.";
    send_queue_bytes_max: Bytes = "1MiB", "SWITCHBOARD_SEND_QUEUE_BYTES_MAX", None,
        "Bytes queued for one connection before it is closed with 4008. At least 4096.";
    handshake_timeout: Dur = "5s", "SWITCHBOARD_HANDSHAKE_TIMEOUT", None,
        "Time from TCP accept to a complete upgrade request.";
    max_request_header_bytes: Bytes = "8KiB", "SWITCHBOARD_MAX_REQUEST_HEADER_BYTES", None,
        "Largest HTTP request head (431 above it), 1 KiB to 1 MiB.";
    ping_interval: Dur = "54s", "SWITCHBOARD_PING_INTERVAL", Some("WEBSOCKET_PING_INTERVAL"),
        "Server ping period on a quiet connection; must be below pong_wait.";
    pong_wait: Dur = "60s", "SWITCHBOARD_PONG_WAIT", Some("WEBSOCKET_PONG_WAIT"),
        "A connection silent this long is dropped.";
    write_wait: Dur = "10s", "SWITCHBOARD_WRITE_WAIT", Some("WEBSOCKET_WRITE_WAIT"),
        "Queued output that makes no progress this long closes the connection.";
    write_coalesce: Dur = "50ms", "SWITCHBOARD_WRITE_COALESCE", None,
        "Least time between two writes to one connection, up to 5s; 0 = off. Fan-out frames for a connection written less than this ago wait and share one write (fewer syscalls, up to this much added latency); the first frame after a quiet period and replies go out at once.";
    write_coalesce_min_rate: U32 = "50000", "SWITCHBOARD_WRITE_COALESCE_MIN_RATE", None,
        "write_coalesce applies only while a shard queues at least this many frames per second (measured over 100 ms; it stops below half of it), so a lightly loaded server never holds a frame. 0 = always.";
    rate_limit_per_sec: U32 = "100", "SWITCHBOARD_RATE_LIMIT_PER_SEC", None,
        "Commands per second a connection may sustain (token bucket refill). At least 1.";
    rate_limit_burst: U32 = "200", "SWITCHBOARD_RATE_LIMIT_BURST", None,
        "Token bucket size (burst). At least 1.";
    rate_limit_max_violations: U32 = "50", "SWITCHBOARD_RATE_LIMIT_MAX_VIOLATIONS", None,
        "Rejected commands in a row before close 4029. At least 1.";
    allowed_origins: List = "", "SWITCHBOARD_ALLOWED_ORIGINS", None,
        "Allowed Origin values; empty = any. Requests without Origin are always allowed.";
    allow_client_broadcast: Flag = "false", "SWITCHBOARD_ALLOW_CLIENT_BROADCAST", None,
        "Let any client broadcast (otherwise only tokens with role admin).";
    auth_mode: AuthModeKind = "none", "SWITCHBOARD_AUTH_MODE", None,
        "none (development: ?user_id= or anonymous) or jwt.";
    jwt_secret: OptText = "", "SWITCHBOARD_JWT_SECRET", None,
        "HMAC secret for HS256/384/512 (prefer the env var: flags show in ps).";
    jwt_public_key_file: OptText = "", "SWITCHBOARD_JWT_PUBLIC_KEY_FILE", None,
        "PEM public key file for RS*/PS*/ES*/EdDSA.";
    jwt_algorithms: List = "HS256", "SWITCHBOARD_JWT_ALGORITHMS", None,
        "Accepted JWT algorithms, all of one key family (HS*, RS*/PS*, ES*, EdDSA).";
    jwt_audience: OptText = "", "SWITCHBOARD_JWT_AUDIENCE", None,
        "Required aud claim; empty = aud not checked.";
    jwt_issuer: OptText = "", "SWITCHBOARD_JWT_ISSUER", None,
        "Required iss claim; empty = iss not checked.";
    jwt_leeway: Dur = "5s", "SWITCHBOARD_JWT_LEEWAY", None,
        "Clock leeway for exp and nbf (whole seconds).";
    auth_timeout: Dur = "10s", "SWITCHBOARD_AUTH_TIMEOUT", None,
        "Time for an in-band authenticate frame when the upgrade carried no token.";
    token_refresh_window: Dur = "60s", "SWITCHBOARD_TOKEN_REFRESH_WINDOW", None,
        "auth.expiring is sent this long before exp.";
    token_expiry_grace: Dur = "10s", "SWITCHBOARD_TOKEN_EXPIRY_GRACE", None,
        "auth.expired and close 4003 this long after exp.";
    dedup_window: Dur = "5m", "SWITCHBOARD_DEDUP_WINDOW", None,
        "A repeated clientMsgId from the same user within this window is acked, not re-delivered.";
    dedup_entries_max: Count = "1000000", "SWITCHBOARD_DEDUP_ENTRIES_MAX", None,
        "Most remembered (user, clientMsgId) pairs per node. At least 1.";
    max_dm_content_bytes: Bytes = "16KiB", "SWITCHBOARD_MAX_DM_CONTENT_BYTES", None,
        "Longest direct-message content in bytes. At least 1.";
    shutdown_timeout: Dur = "30s", "SWITCHBOARD_SHUTDOWN_TIMEOUT", None,
        "Drain deadline after SIGTERM/SIGINT.";
    log_format: LogFormatKind = "text", "SWITCHBOARD_LOG_FORMAT", None,
        "Log output: text or json.";
    log_level: Text = "info", "SWITCHBOARD_LOG_LEVEL", None,
        "tracing filter directive, e.g. info or switchboard=debug.";
    strict: Flag = "false", "SWITCHBOARD_STRICT", None,
        "Refuse to start when max_connections cannot be reached with the machine's limits.";
}

/// Where a value came from, for error messages.
enum Source<'a> {
    File(&'a str),
    Env(&'a str),
    Flag(&'a str),
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "in {path}"),
            Source::Env(name) => write!(f, "from env {name}"),
            Source::Flag(flag) => write!(f, "from flag {flag}"),
        }
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

/// The key closest to `name` by edit distance, if it is close enough to be a likely typo.
fn suggest(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (edit_distance(name, k.key), k.key))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
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

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Flags parsed from the command line, applied last.
struct CliArgs {
    config_path: Option<String>,
    /// (key, value, flag as typed) in command-line order.
    values: Vec<(&'static str, String, String)>,
}

fn parse_args(args: &[String]) -> Result<CliArgs, ConfigError> {
    let mut out = CliArgs {
        config_path: None,
        values: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--help" || arg == "-h" {
            return Err(ConfigError::new("help", Config::help_text()));
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ConfigError::new(
                arg.as_str(),
                "unexpected argument; settings are given as --key value",
            ));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let flag = format!("--{name}");
        let info = if name == "config" || name.contains('_') {
            None
        } else {
            let key = name.replace('-', "_");
            KEYS.iter().find(|k| k.key == key)
        };
        let bool_flag = info.is_some_and(|k| is_bool_key(k.key));
        if name != "config" && info.is_none() {
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
        match info {
            Some(k) => out.values.push((k.key, value, flag)),
            None => out.config_path = Some(value),
        }
    }
    Ok(out)
}

/// Turns one YAML value into a [`Raw`]; flat files only.
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
        v => scalar(v).map(Raw::Text).ok_or_else(|| {
            "expected a plain value or a list (the file is flat, no nesting)".into()
        }),
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

impl Config {
    /// defaults <- YAML file (`--config PATH` in args, else env SWITCHBOARD_CONFIG) <- WEBSOCKET_*
    /// env <- SWITCHBOARD_* env <- CLI flags; then validate().
    /// `args` are the CLI args after the program name (no subcommand). `env` looks up an
    /// environment variable.
    pub fn load(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cli = parse_args(args)?;
        let mut cfg = Config::default();

        let path = cli.config_path.clone().or_else(|| env(CONFIG_FILE_ENV));
        if let Some(path) = path {
            if path.is_empty() {
                return Err(ConfigError::new("config", "empty config file path"));
            }
            let text = read_config_file(&path)?;
            cfg.apply_yaml(&text, &path)?;
        }

        for info in KEYS {
            if let Some(legacy) = info.legacy_env {
                if let Some(v) = env(legacy) {
                    apply(&mut cfg, info.key, &Raw::Text(v), Source::Env(legacy))?;
                }
            }
        }
        for info in KEYS {
            if let Some(v) = env(info.env) {
                apply(&mut cfg, info.key, &Raw::Text(v), Source::Env(info.env))?;
            }
        }
        for (key, value, flag) in cli.values {
            apply(&mut cfg, key, &Raw::Text(value), Source::Flag(&flag))?;
        }

        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies a flat YAML document on top of `self`. `origin` names the file in errors.
    fn apply_yaml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        use serde_norway::Value;
        let doc: Value = serde_norway::from_str(text)
            .map_err(|e| ConfigError::new("config", format!("{origin}: invalid YAML: {e}")))?;
        let map = match doc {
            Value::Null => return Ok(()),
            Value::Mapping(map) => map,
            _ => {
                return Err(ConfigError::new(
                    "config",
                    format!("{origin}: expected a mapping of key: value at the top level"),
                ))
            }
        };
        for (k, v) in &map {
            let Value::String(key) = k else {
                return Err(ConfigError::new(
                    format!("{k:?}"),
                    format!("{origin}: keys must be strings"),
                ));
            };
            if !KEYS.iter().any(|info| info.key == key) {
                return Err(ConfigError::new(
                    key.as_str(),
                    format!("{origin}: {}", unknown("key", key, false)),
                ));
            }
            let raw = yaml_raw(v)
                .map_err(|m| ConfigError::new(key.as_str(), format!("in {origin}: {m}")))?;
            apply(self, key, &raw, Source::File(origin))?;
        }
        Ok(())
    }

    /// Checks every cross-field and range rule. Every error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn fail(key: &str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError::new(key, message))
        }
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
        fn at_least(key: &str, v: usize, min: usize) -> Result<(), ConfigError> {
            if v < min {
                return fail(key, format!("must be at least {min}, got {v}"));
            }
            Ok(())
        }

        if self.port == 0 {
            fail("port", "must be 1-65535, got 0".into())?;
        }
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
        if let Some(p) = &self.echo_path {
            check_path("echo_path", p)?;
            if self.ws_paths.contains(p) {
                fail("echo_path", format!("path {p:?} is also in ws_paths"))?;
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
        at_least("read_buffer_size", self.read_buffer_size, 4096)?;
        at_least("write_buffer_size", self.write_buffer_size, 4096)?;
        at_least("send_queue_bytes_max", self.send_queue_bytes_max, 4096)?;
        at_least("max_rooms_per_connection", self.max_rooms_per_connection, 1)?;
        at_least("max_connections_per_user", self.max_connections_per_user, 1)?;
        if self.max_connections_per_user > 65_535 {
            return fail(
                "max_connections_per_user",
                format!("{} is above 65535", self.max_connections_per_user),
            );
        }
        if !(1..=4096).contains(&self.max_room_name_bytes) {
            fail(
                "max_room_name_bytes",
                format!(
                    "must be between 1 and 4096, got {}",
                    self.max_room_name_bytes
                ),
            )?;
        }
        if !(1024..=1024 * 1024).contains(&self.max_request_header_bytes) {
            fail(
                "max_request_header_bytes",
                format!(
                    "must be between 1024 and 1MiB, got {}",
                    self.max_request_header_bytes
                ),
            )?;
        }
        at_least("max_dm_content_bytes", self.max_dm_content_bytes, 1)?;
        at_least("dedup_entries_max", self.dedup_entries_max, 1)?;

        nonzero("ping_interval", self.ping_interval)?;
        nonzero("pong_wait", self.pong_wait)?;
        if self.ping_interval >= self.pong_wait {
            fail(
                "ping_interval",
                format!(
                    "must be less than pong_wait ({:?}), got {:?}",
                    self.pong_wait, self.ping_interval
                ),
            )?;
        }
        nonzero("handshake_timeout", self.handshake_timeout)?;
        nonzero("write_wait", self.write_wait)?;
        if self.write_coalesce > Duration::from_secs(5) {
            return fail(
                "write_coalesce",
                format!("{:?} is over the 5s maximum", self.write_coalesce),
            );
        }
        nonzero("auth_timeout", self.auth_timeout)?;
        nonzero("shutdown_timeout", self.shutdown_timeout)?;
        nonzero("dedup_window", self.dedup_window)?;

        for (key, v) in [
            ("rate_limit_per_sec", self.rate_limit_per_sec),
            ("rate_limit_burst", self.rate_limit_burst),
            ("rate_limit_max_violations", self.rate_limit_max_violations),
        ] {
            at_least(key, v as usize, 1)?;
        }
        if self.log_level.trim().is_empty() {
            fail("log_level", "must not be empty".into())?;
        }

        if self.auth_mode == AuthMode::Jwt {
            self.validate_jwt()?;
        }
        Ok(())
    }

    fn validate_jwt(&self) -> Result<(), ConfigError> {
        let key = "jwt_algorithms";
        if self.jwt_algorithms.is_empty() {
            return Err(ConfigError::new(
                key,
                "must list at least one algorithm in jwt mode",
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
                    "is required for HS256/HS384/HS512 in jwt mode",
                ));
            }
        } else if !matches!(self.jwt_public_key_file.as_deref(), Some(s) if !s.is_empty()) {
            return Err(ConfigError::new(
                "jwt_public_key_file",
                format!(
                    "is required for {} in jwt mode",
                    self.jwt_algorithms.join("/")
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
            "Usage: switchboard [--config PATH] [--<key> VALUE]...\n\
             \n\
             Thread-per-core WebSocket messaging server.\n\
             \n\
             Settings, later wins: built-in defaults, the YAML file given by --config PATH (or env\n\
             SWITCHBOARD_CONFIG), legacy WEBSOCKET_* env vars, SWITCHBOARD_* env vars, flags.\n\
             Flags: --key-name VALUE or --key-name=VALUE; a bare boolean flag means true.\n\
             Durations: 54s, 100ms, 5m, 1h, 1m30s; a bare integer is seconds.\n\
             Sizes: 65536, 64KiB, 1MiB, 1GiB, 64KB (=64000), 64k (=65536).\n\
             Lists: comma-separated. An empty value turns an optional setting off.\n\
             \n\
             Options:\n  \
             --config <PATH>\n      YAML file of flat `key: value` lines (keys as below).\n  \
             -h, --help\n      Print this help.\n",
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
            if let Some(legacy) = k.legacy_env {
                out.push_str(&format!(", {legacy}"));
            }
            out.push('\n');
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
        let keys: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
        assert_eq!(
            fields, keys,
            "KEYS must list every Config field, in field order"
        );
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
    fn legacy_env_names_are_the_go_ones() {
        let legacy: Vec<(&str, &str)> = KEYS
            .iter()
            .filter_map(|k| k.legacy_env.map(|l| (l, k.key)))
            .collect();
        assert_eq!(
            legacy,
            vec![
                ("WEBSOCKET_HOST", "host"),
                ("WEBSOCKET_PORT", "port"),
                ("WEBSOCKET_READ_BUFFER_SIZE", "read_buffer_size"),
                ("WEBSOCKET_WRITE_BUFFER_SIZE", "write_buffer_size"),
                ("WEBSOCKET_MAX_MESSAGE_SIZE", "max_message_size"),
                ("WEBSOCKET_LIMITS_MAX_CONNECTIONS", "max_connections"),
                (
                    "WEBSOCKET_LIMITS_MAX_CONNECTIONS_PER_ROOM",
                    "max_connections_per_room"
                ),
                ("WEBSOCKET_PING_INTERVAL", "ping_interval"),
                ("WEBSOCKET_PONG_WAIT", "pong_wait"),
                ("WEBSOCKET_WRITE_WAIT", "write_wait"),
            ]
        );
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
        assert!(e.message.contains("flat"), "{e}");
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
        assert_eq!(cfg.read_buffer_size, 8192);
        assert_eq!(cfg.write_buffer_size, 16384);
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
            if let Some(l) = k.legacy_env {
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
            ("dedup_entries_max", Box::new(|c| c.dedup_entries_max = 0)),
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
                "dedup_window",
                Box::new(|c| c.dedup_window = Duration::ZERO),
            ),
            ("rate_limit_per_sec", Box::new(|c| c.rate_limit_per_sec = 0)),
            ("rate_limit_burst", Box::new(|c| c.rate_limit_burst = 0)),
            (
                "rate_limit_max_violations",
                Box::new(|c| c.rate_limit_max_violations = 0),
            ),
            ("log_level", Box::new(|c| c.log_level = " ".into())),
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
            Box::new(|c| *c = jwt_cfg(&["HS256", "HS384", "HS512"])),
            Box::new(|c| *c = jwt_cfg(&["RS256", "RS512", "PS256", "PS384"])),
            Box::new(|c| *c = jwt_cfg(&["ES256", "ES384"])),
            Box::new(|c| *c = jwt_cfg(&["EdDSA"])),
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
            let env = match k.legacy_env {
                Some(l) => format!("`{}`, `{l}`", k.env),
                None => format!("`{}`", k.env),
            };
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
    fn config_md_example_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md");
        let doc = std::fs::read_to_string(path).expect("docs/CONFIG.md exists");
        let start = doc.find("```yaml\n").expect("an example yaml block") + "```yaml\n".len();
        let len = doc[start..].find("```").expect("end of the yaml block");
        let mut cfg = Config::default();
        cfg.apply_yaml(&doc[start..start + len], "CONFIG.md")
            .expect("example parses");
        cfg.validate().expect("example validates");
        assert_eq!(cfg.auth_mode, AuthMode::Jwt);
        assert_eq!(cfg.max_connections, 500_000);
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
}
