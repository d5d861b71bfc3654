//! Authentication: JWT verification and token extraction from the upgrade request.
//!
//! Owns: turning a token string and `now` into [`Claims`] or an [`AuthError`]; finding the token
//! in the upgrade request; room glob patterns. Pure: no network, no clock (`now` is an
//! argument), no logging (tokens never appear in logs; callers log [`AuthError::as_str`]).
//!
//! jsonwebtoken checks the signature with the algorithms pinned from config (a token whose
//! `alg` is not listed, `none` included, is refused before any key is used; an HMAC token
//! presented to an RSA/EC/Ed key is refused by the list and again by jsonwebtoken's key-family
//! check). Its own time checks are off because they read the system clock; `exp`, `nbf`, `aud`
//! and `iss` are checked here against `now`.

use std::borrow::Cow;
use std::collections::HashSet;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{jwt_algorithm_family, Config, ConfigError};

/// Longest token accepted, in bytes; longer tokens are rejected before any decoding.
pub const TOKEN_BYTES_MAX: usize = 8192;
/// Longest `sub` (user id) accepted, in bytes.
pub const SUB_BYTES_MAX: usize = 256;
/// Largest public key file read, in bytes (an RSA-8192 PEM is about 1.5 KiB).
pub const PUBLIC_KEY_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Latest expiry a [`Claims`] carries, Unix seconds: `u32::MAX` (2106-02-07), the width the
/// shard stores. A token's `exp` beyond it (`u64::MAX`, `1e300`, ...) is clamped here, in
/// [`Verifier::verify`], so that no caller's `exp * 1000` (milliseconds) can overflow: at most
/// 4.3e12, far below `u64::MAX`. Clamping rather than rejecting keeps "a token that never
/// expires" working; the connection is simply re-checked in 2106.
pub const EXP_S_MAX: u64 = u32::MAX as u64;

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The user id (`sub`), 1 to [`SUB_BYTES_MAX`] bytes.
    pub sub: String,
    /// Expiry, Unix seconds, never above [`EXP_S_MAX`] (a larger `exp` claim is clamped), so
    /// `exp * 1000` and `exp as u32` are safe in any caller.
    pub exp: u64,
    /// Glob patterns of the rooms the user may use; None = all rooms.
    pub rooms: Option<Vec<String>>,
    /// `role: "admin"`: may `broadcast`.
    pub admin: bool,
    /// `allowed_users`: the users this one may address with typing, receipts, calls and
    /// presence watches when `address_policy` is `claim`; None = the claim is absent.
    pub allowed_users: Option<Vec<String>>,
}

impl Claims {
    /// Whether the token lets the user subscribe and publish to `room`. Cost: O(patterns *
    /// pattern length * room length) at worst; both are bounded (token size, room name size).
    pub fn allows_room(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, room)),
        }
    }
}

/// Glob match: `*` matches any run of characters (also empty), `?` exactly one character, every
/// other character itself (no escapes, case-sensitive). Iterative with backtracking to the last
/// `*` only: O(len(pattern) * len(s)) in the worst case, no recursion, no allocation.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let p = pattern.as_bytes();
    let t = s.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    // After the last `*` seen: (pattern index just past it, text index it currently covers to).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                star = Some((pi, ti));
            }
            Some(b'?') => {
                pi += 1;
                ti = next_char_boundary(s, ti);
            }
            // Equal bytes that start on a char boundary in both strings keep both on char
            // boundaries once a whole pattern character has matched (UTF-8 is self-synchronising).
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((star_pi, star_ti)) => {
                    // Let the last `*` swallow one more character and retry from there.
                    let next = next_char_boundary(s, star_ti);
                    star = Some((star_pi, next));
                    pi = star_pi;
                    ti = next;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Index of the character after the one starting at `i` (`i < s.len()`).
fn next_char_boundary(s: &str, i: usize) -> usize {
    let mut j = i + 1;
    while j < s.len() && !s.is_char_boundary(j) {
        j += 1;
    }
    j
}

/// Why a token was refused. Every variant means the same to the caller: refuse the upgrade with
/// 401 (or reply `auth.failed` and close 4001; `Expired` on a live connection is close 4003)
/// and send [`AuthError::as_str`] to the client. The fault is the client's (or its issuer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Longer than [`TOKEN_BYTES_MAX`]; nothing was decoded.
    TooLarge,
    /// Not three base64url parts of JSON, or a claim of the wrong type.
    Malformed,
    /// The header's `alg` is not in `jwt_algorithms` (`none` included).
    AlgorithmNotAllowed,
    /// The signature does not match the configured key.
    BadSignature,
    /// No `exp` claim.
    MissingExp,
    /// `now > exp + leeway`.
    Expired,
    /// `nbf > now + leeway`.
    NotYetValid,
    /// `sub` absent, empty or longer than [`SUB_BYTES_MAX`] (a non-string `sub` is `Malformed`).
    MissingSub,
    /// `jwt_audience` is set and the token's `aud` does not contain it.
    BadAudience,
    /// `jwt_issuer` is set and the token's `iss` differs.
    BadIssuer,
}

impl AuthError {
    /// Short lowercase text for the client (HTTP 401 body, `auth.failed` error).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::TooLarge => "token too large",
            AuthError::Malformed => "malformed token",
            AuthError::AlgorithmNotAllowed => "token algorithm not allowed",
            AuthError::BadSignature => "invalid token signature",
            AuthError::MissingExp => "token missing exp",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::MissingSub => "token missing sub",
            AuthError::BadAudience => "invalid token audience",
            AuthError::BadIssuer => "invalid token issuer",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for AuthError {}

/// A NumericDate: RFC 7519 allows non-integer seconds; negative values are clamped to 0.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl NumericDate {
    /// Whole seconds, rounded down (`up == false`) or up.
    fn secs(&self, up: bool) -> u64 {
        match *self {
            NumericDate::Unsigned(n) => n,
            NumericDate::Signed(n) => u64::try_from(n).unwrap_or(0),
            NumericDate::Float(f) if f <= 0.0 => 0,
            // `as` saturates at u64::MAX for huge values.
            NumericDate::Float(f) if up => f.ceil() as u64,
            NumericDate::Float(f) => f.floor() as u64,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// `role` may be anything; only the string "admin" means something here.
#[derive(Deserialize)]
#[serde(untagged)]
enum Role {
    Name(String),
    Other(serde::de::IgnoredAny),
}

/// The claims as they arrive; unknown claims are ignored.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<NumericDate>,
    #[serde(default)]
    nbf: Option<NumericDate>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    allowed_users: Option<Vec<String>>,
}

/// Verifies tokens against the configured key, algorithms, audience, issuer and leeway.
/// Built once at start; `verify` takes `&self` and may be shared by all shards.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway_s: u64,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    // The key (an HMAC secret, perhaps) is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway_s", &self.leeway_s)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier from `jwt_*` settings, reading the PEM file for non-HMAC algorithms.
    /// Errors name the key at fault. Works whatever `auth_mode` says (the caller decides).
    pub fn from_config(cfg: &Config) -> Result<Verifier, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            key: key.to_owned(),
            message,
        };
        if cfg.jwt_algorithms.is_empty() {
            return Err(err(
                "jwt_algorithms",
                "must list at least one algorithm".into(),
            ));
        }
        let mut algorithms = Vec::with_capacity(cfg.jwt_algorithms.len());
        let mut family = None;
        for name in &cfg.jwt_algorithms {
            let (Some(f), Ok(alg)) = (jwt_algorithm_family(name), name.parse::<Algorithm>()) else {
                return Err(err("jwt_algorithms", format!("unknown algorithm {name:?}")));
            };
            if family.is_some_and(|prev| prev != f) {
                return Err(err(
                    "jwt_algorithms",
                    "mixes key families; list algorithms of one family".into(),
                ));
            }
            family = Some(f);
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }

        let key = match family {
            Some("HMAC") => match cfg.jwt_secret.as_deref() {
                Some(secret) if !secret.is_empty() => DecodingKey::from_secret(secret.as_bytes()),
                _ => return Err(err("jwt_secret", "is required for HS* algorithms".into())),
            },
            _ => {
                let key_name = "jwt_public_key_file";
                let path = match cfg.jwt_public_key_file.as_deref() {
                    Some(p) if !p.is_empty() => p,
                    _ => return Err(err(key_name, "is required for this algorithm".into())),
                };
                let pem = read_pem(path).map_err(|m| err(key_name, m))?;
                if pem.contains("PRIVATE KEY") {
                    return Err(err(
                        key_name,
                        format!("{path} holds a private key; configure the public key"),
                    ));
                }
                let parsed = match family {
                    Some("RSA") => DecodingKey::from_rsa_pem(pem.as_bytes()),
                    Some("EC") => DecodingKey::from_ec_pem(pem.as_bytes()),
                    _ => DecodingKey::from_ed_pem(pem.as_bytes()),
                };
                let key = parsed.map_err(|e| {
                    err(
                        key_name,
                        format!(
                            "{path} is not a {} public key in PEM: {e}",
                            family.unwrap_or("?")
                        ),
                    )
                })?;
                // Build a verifier per algorithm once, so a key of the wrong curve or type is
                // reported now rather than as a bad signature on every token. (An RSA key's
                // body is only parsed while verifying; the PEM type was checked above.)
                for alg in &algorithms {
                    if let Err(e) = jsonwebtoken::crypto::verify("", b"probe", &key, *alg) {
                        return Err(err(key_name, format!("{path} does not suit {alg:?}: {e}")));
                    }
                }
                key
            }
        };

        // Every field set here on purpose: no library default is inherited, and a field added
        // by a later jsonwebtoken release fails the build instead of changing behaviour.
        let validation = Validation {
            // Presence and time are checked in `verify` against the caller's `now`.
            required_spec_claims: HashSet::new(),
            leeway: 0,
            reject_tokens_expiring_in_less_than: 0,
            validate_exp: false,
            validate_nbf: false,
            // aud/iss are checked in `verify` (jsonwebtoken rejects any `aud` when none is set).
            validate_aud: false,
            aud: None,
            iss: None,
            sub: None,
            algorithms,
        };
        Ok(Verifier {
            key,
            validation,
            leeway_s: cfg.jwt_leeway.as_secs(),
            audience: cfg.jwt_audience.clone().filter(|s| !s.is_empty()),
            issuer: cfg.jwt_issuer.clone().filter(|s| !s.is_empty()),
        })
    }

    /// Verifies `token` at `now_unix_s` and returns its claims.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::TooLarge);
        }
        match jsonwebtoken::decode_header(token) {
            Ok(header) if !self.validation.algorithms.contains(&header.alg) => {
                return Err(AuthError::AlgorithmNotAllowed)
            }
            Ok(_) => {}
            Err(_) => return Err(classify_bad_header(token)),
        }
        let raw = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::MissingAlgorithm
                | ErrorKind::UnsupportedAlgorithm
                | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
                // The key was checked at start; if it still does not fit, no token verifies.
                ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => AuthError::BadSignature,
                _ => AuthError::Malformed,
            })?
            .claims;

        // Clamped at the source: peer input must not overflow a caller's arithmetic.
        let exp = raw
            .exp
            .as_ref()
            .ok_or(AuthError::MissingExp)?
            .secs(false)
            .min(EXP_S_MAX);
        if now_unix_s > exp.saturating_add(self.leeway_s) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = &raw.nbf {
            if nbf.secs(true) > now_unix_s.saturating_add(self.leeway_s) {
                return Err(AuthError::NotYetValid);
            }
        }
        if let Some(want) = &self.issuer {
            if raw.iss.as_deref() != Some(want.as_str()) {
                return Err(AuthError::BadIssuer);
            }
        }
        if let Some(want) = &self.audience {
            let ok = match &raw.aud {
                Some(Audience::One(a)) => a == want,
                Some(Audience::Many(list)) => list.iter().any(|a| a == want),
                None => false,
            };
            if !ok {
                return Err(AuthError::BadAudience);
            }
        }
        let sub = match raw.sub {
            Some(s) if !s.is_empty() && s.len() <= SUB_BYTES_MAX => s,
            _ => return Err(AuthError::MissingSub),
        };
        Ok(Claims {
            sub,
            exp,
            rooms: raw.rooms,
            admin: matches!(raw.role, Some(Role::Name(r)) if r == "admin"),
            allowed_users: raw.allowed_users,
        })
    }
}

fn read_pem(path: &str) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut text = String::new();
    file.take(PUBLIC_KEY_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if text.len() as u64 > PUBLIC_KEY_FILE_BYTES_MAX {
        return Err(format!(
            "{path} is larger than {PUBLIC_KEY_FILE_BYTES_MAX} bytes"
        ));
    }
    Ok(text)
}

/// The header did not decode as jsonwebtoken's `Header`. If it is JSON with an `alg` that
/// jsonwebtoken does not know (`none`, `HS1`, ...), say so; anything else is malformed.
fn classify_bad_header(token: &str) -> AuthError {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let Some((header_b64, _)) = token.split_once('.') else {
        return AuthError::Malformed;
    };
    let Some(header) = b64url_decode(header_b64) else {
        return AuthError::Malformed;
    };
    match sonic_rs::from_slice::<AlgOnly>(&header) {
        Ok(h) if h.alg.parse::<Algorithm>().is_err() => AuthError::AlgorithmNotAllowed,
        _ => AuthError::Malformed,
    }
}

/// Decodes unpadded (or padded) base64url; None on any other byte.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Where the upgrade request carried the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// `?token=<jwt>`.
    Query,
    /// A `Sec-WebSocket-Protocol` entry `bearer.<jwt>` (never echo it back).
    Subprotocol,
}

/// First found wins: `Authorization: Bearer <jwt>`, `?token=` in the query, then a
/// `Sec-WebSocket-Protocol` entry `bearer.<jwt>`. Empty tokens count as absent; an
/// `Authorization` header with another scheme is ignored.
pub fn token_from_upgrade<'a>(
    authorization: Option<&'a str>,
    query: Option<&'a str>,
    protocols: Option<&'a str>,
) -> Option<(Cow<'a, str>, TokenSource)> {
    if let Some(token) = authorization.and_then(bearer_token) {
        return Some((Cow::Borrowed(token), TokenSource::Header));
    }
    if let Some(token) = query.and_then(|q| query_param(q, "token")) {
        if !token.is_empty() {
            return Some((token, TokenSource::Query));
        }
    }
    let from_protocol = protocols.and_then(|list| {
        list.split(',')
            .filter_map(|p| p.trim().strip_prefix("bearer."))
            .find(|t| !t.is_empty())
    });
    from_protocol.map(|t| (Cow::Borrowed(t), TokenSource::Subprotocol))
}

/// The credentials of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer_token(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// Percent-decoded value of a query parameter (`+` is a space). `query` is the part after `?`
/// (a leading `?` is tolerated). The first occurrence wins; `name` without `=` has the value "".
/// Invalid `%` escapes are kept as written; invalid UTF-8 becomes U+FFFD.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// Every value of `name` in a query string, in order, percent-decoded (`?a=1&a=2`).
pub fn query_params<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .filter(move |(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMode;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn key_path(name: &str) -> String {
        format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn key_bytes(name: &str) -> Vec<u8> {
        std::fs::read(key_path(name)).expect("test key file")
    }

    fn cfg(algs: &[&str], public_key: Option<&str>) -> Config {
        Config {
            auth_mode: AuthMode::Jwt,
            jwt_algorithms: algs.iter().map(|s| (*s).to_owned()).collect(),
            jwt_secret: Some(SECRET.into()),
            jwt_public_key_file: public_key.map(key_path),
            jwt_leeway: Duration::from_secs(5),
            ..Config::default()
        }
    }

    fn verifier(algs: &[&str], public_key: Option<&str>) -> Verifier {
        Verifier::from_config(&cfg(algs, public_key)).expect("verifier")
    }

    fn hs256() -> Verifier {
        verifier(&["HS256"], None)
    }

    fn claims() -> Value {
        json!({"sub": "alice", "exp": NOW + 3600})
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
    }

    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    fn rsa(name: &str) -> EncodingKey {
        EncodingKey::from_rsa_pem(&key_bytes(name)).expect("rsa private key")
    }

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, &b| acc << 8 | u32::from(b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn raw_token(header: &str, claims: &Value, sig: &str) -> String {
        format!(
            "{}.{}.{sig}",
            b64(header.as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn error_texts() {
        use AuthError::*;
        let all = [
            (TooLarge, "token too large"),
            (Malformed, "malformed token"),
            (AlgorithmNotAllowed, "token algorithm not allowed"),
            (BadSignature, "invalid token signature"),
            (MissingExp, "token missing exp"),
            (Expired, "token expired"),
            (NotYetValid, "token not yet valid"),
            (MissingSub, "token missing sub"),
            (BadAudience, "invalid token audience"),
            (BadIssuer, "invalid token issuer"),
        ];
        for (e, text) in all {
            assert_eq!(e.as_str(), text);
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn accepts_hmac_family() {
        let v = verifier(&["HS256", "HS384", "HS512"], None);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let token = sign(alg, &EncodingKey::from_secret(SECRET.as_bytes()), &claims());
            let c = v
                .verify(&token, NOW)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(
                c,
                Claims {
                    sub: "alice".into(),
                    exp: NOW + 3600,
                    rooms: None,
                    admin: false,
                    allowed_users: None,
                }
            );
        }
        // HS384 not configured: refused.
        let token = sign(
            Algorithm::HS384,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims(),
        );
        assert_eq!(
            hs256().verify(&token, NOW),
            Err(AuthError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn accepts_rsa_ec_ed() {
        let token = sign(Algorithm::RS256, &rsa("rsa_private.pem"), &claims());
        for public in ["rsa_public.pem", "rsa_public_pkcs1.pem"] {
            let v = verifier(&["RS256", "PS256"], Some(public));
            assert_eq!(
                v.verify(&token, NOW).map(|c| c.sub),
                Ok("alice".into()),
                "{public}"
            );
        }
        let ps = sign(Algorithm::PS256, &rsa("rsa_private.pem"), &claims());
        let v = verifier(&["RS256", "PS256"], Some("rsa_public.pem"));
        assert!(v.verify(&ps, NOW).is_ok());

        let ec = EncodingKey::from_ec_pem(&key_bytes("ec_private.pem")).expect("ec key");
        let token = sign(Algorithm::ES256, &ec, &claims());
        let v = verifier(&["ES256"], Some("ec_public.pem"));
        assert_eq!(v.verify(&token, NOW).map(|c| c.sub), Ok("alice".into()));

        let ed = EncodingKey::from_ed_pem(&key_bytes("ed_private.pem")).expect("ed key");
        let token = sign(Algorithm::EdDSA, &ed, &claims());
        let v = verifier(&["EdDSA"], Some("ed_public.pem"));
        assert_eq!(v.verify(&token, NOW).map(|c| c.sub), Ok("alice".into()));
    }

    #[test]
    fn optional_claims() {
        let v = hs256();
        let token = hs(&json!({
            "sub": "bob", "exp": NOW + 10, "rooms": ["team-*", "lobby"], "role": "admin",
            "extra": {"nested": [1, 2]}
        }));
        let c = v.verify(&token, NOW).expect("valid");
        assert_eq!(c.rooms, Some(vec!["team-*".to_owned(), "lobby".to_owned()]));
        assert!(c.admin);
        assert!(c.allows_room("team-red") && c.allows_room("lobby") && !c.allows_room("lobby2"));
        for role in [json!("user"), json!(["admin"]), json!(1), Value::Null] {
            let token = hs(&json!({"sub": "bob", "exp": NOW + 10, "role": role}));
            assert!(!v.verify(&token, NOW).expect("valid").admin, "role {role}");
        }
        // Fractional NumericDate: exp rounds down.
        let token = hs(&json!({"sub": "bob", "exp": (NOW + 10) as f64 + 0.9}));
        assert_eq!(v.verify(&token, NOW).map(|c| c.exp), Ok(NOW + 10));
        // rooms of the wrong type is malformed, not "all rooms".
        let token = hs(&json!({"sub": "bob", "exp": NOW + 10, "rooms": "lobby"}));
        assert_eq!(v.verify(&token, NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn exp_and_leeway_edges() {
        let v = hs256(); // leeway 5 s
        let at = |exp: Value, now: u64| v.verify(&hs(&json!({"sub": "a", "exp": exp})), now);
        assert!(at(json!(NOW), NOW).is_ok());
        assert!(
            at(json!(NOW - 5), NOW).is_ok(),
            "now == exp + leeway is still valid"
        );
        assert_eq!(at(json!(NOW - 6), NOW), Err(AuthError::Expired));
        assert_eq!(at(json!(NOW - 5), NOW + 1), Err(AuthError::Expired));
        assert_eq!(at(json!(0), NOW), Err(AuthError::Expired));
        assert_eq!(at(json!(-5), NOW), Err(AuthError::Expired));
        assert!(at(json!(u64::MAX), NOW).is_ok(), "no overflow at the top");
        assert_eq!(at(json!("tomorrow"), NOW), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&hs(&json!({"sub": "a"})), NOW),
            Err(AuthError::MissingExp)
        );
        assert_eq!(
            v.verify(&hs(&json!({"sub": "a", "exp": null})), NOW),
            Err(AuthError::MissingExp)
        );

        let mut c = cfg(&["HS256"], None);
        c.jwt_leeway = Duration::ZERO;
        let strict = Verifier::from_config(&c).expect("verifier");
        assert!(strict
            .verify(&hs(&json!({"sub": "a", "exp": NOW})), NOW)
            .is_ok());
        assert_eq!(
            strict.verify(&hs(&json!({"sub": "a", "exp": NOW - 1})), NOW),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn huge_exp_is_clamped_so_callers_cannot_overflow() {
        let v = hs256();
        let exp_of = |exp: Value| {
            v.verify(&hs(&json!({"sub": "a", "exp": exp})), NOW)
                .map(|c| c.exp)
        };
        for huge in [
            json!(u64::MAX),
            json!(i64::MAX),
            json!(1e300),
            json!(f64::MAX),
            json!(EXP_S_MAX + 1),
        ] {
            let exp = exp_of(huge.clone()).expect("a far-future token is valid");
            assert_eq!(exp, EXP_S_MAX, "{huge}");
            // What the shard does with it (cmd_authenticate): must not overflow.
            assert!(exp.checked_mul(1000).is_some());
            assert_eq!(u32::try_from(exp), Ok(u32::MAX));
        }
        assert_eq!(exp_of(json!(EXP_S_MAX)), Ok(EXP_S_MAX));
        assert_eq!(
            exp_of(json!(NOW + 10)),
            Ok(NOW + 10),
            "ordinary exp untouched"
        );
        // Past the clamp, a token is expired like any other.
        assert_eq!(
            v.verify(&hs(&json!({"sub": "a", "exp": u64::MAX})), EXP_S_MAX + 6),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn nbf_edges() {
        let v = hs256();
        let at = |nbf: Value| v.verify(&hs(&json!({"sub": "a", "exp": NOW + 60, "nbf": nbf})), NOW);
        assert!(at(json!(NOW - 100)).is_ok());
        assert!(at(json!(NOW + 5)).is_ok(), "nbf == now + leeway is valid");
        assert_eq!(at(json!(NOW + 6)), Err(AuthError::NotYetValid));
        assert_eq!(
            at(json!((NOW + 5) as f64 + 0.5)),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(at(json!(u64::MAX)), Err(AuthError::NotYetValid));
    }

    #[test]
    fn sub_rules() {
        let v = hs256();
        let with_sub = |sub: Value| v.verify(&hs(&json!({"sub": sub, "exp": NOW + 60})), NOW);
        assert_eq!(with_sub(json!("")), Err(AuthError::MissingSub));
        assert_eq!(with_sub(Value::Null), Err(AuthError::MissingSub));
        assert_eq!(
            with_sub(json!("x".repeat(SUB_BYTES_MAX + 1))),
            Err(AuthError::MissingSub)
        );
        assert_eq!(
            with_sub(json!("x".repeat(SUB_BYTES_MAX))).map(|c| c.sub.len()),
            Ok(SUB_BYTES_MAX)
        );
        assert_eq!(with_sub(json!(42)), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&hs(&json!({"exp": NOW + 60})), NOW),
            Err(AuthError::MissingSub)
        );
    }

    #[test]
    fn wrong_key_and_tampering() {
        let v = verifier(&["RS256"], Some("rsa_public.pem"));
        let other = sign(Algorithm::RS256, &rsa("rsa2_private.pem"), &claims());
        assert_eq!(v.verify(&other, NOW), Err(AuthError::BadSignature));

        let wrong_secret = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!!"),
            &claims(),
        );
        assert_eq!(
            hs256().verify(&wrong_secret, NOW),
            Err(AuthError::BadSignature)
        );

        // A valid signature moved onto another payload.
        let good = hs(&claims());
        let forged_payload = b64(json!({"sub": "mallory", "exp": NOW + 3600})
            .to_string()
            .as_bytes());
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(hs256().verify(&forged, NOW), Err(AuthError::BadSignature));
        let no_sig = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(hs256().verify(&no_sig, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_and_unlisted_algorithms() {
        let v = hs256();
        for alg in ["none", "None", "NONE", "nOnE", "HS1", ""] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            let token = raw_token(&header, &claims(), "");
            assert_eq!(
                v.verify(&token, NOW),
                Err(AuthError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
        // alg none with a signature attached, for good measure.
        let token = raw_token(r#"{"alg":"none"}"#, &claims(), "c2ln");
        assert_eq!(v.verify(&token, NOW), Err(AuthError::AlgorithmNotAllowed));
        // A header without alg is malformed.
        let token = raw_token(r#"{"typ":"JWT"}"#, &claims(), "");
        assert_eq!(v.verify(&token, NOW), Err(AuthError::Malformed));
        // RS256 token at an HS256 server.
        let token = sign(Algorithm::RS256, &rsa("rsa_private.pem"), &claims());
        assert_eq!(v.verify(&token, NOW), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn rsa_hmac_confusion_is_refused() {
        // The classic attack: HS256 keyed with the server's RSA public key PEM.
        let pem = key_bytes("rsa_public.pem");
        let token = sign(Algorithm::HS256, &EncodingKey::from_secret(&pem), &claims());
        let v = verifier(&["RS256"], Some("rsa_public.pem"));
        assert_eq!(v.verify(&token, NOW), Err(AuthError::AlgorithmNotAllowed));

        // jsonwebtoken itself refuses even when HS256 is (wrongly) listed next to an RSA key:
        // the HMAC verifier will not take an RSA-family key (and `decode` also checks that every
        // listed algorithm matches the key's family) before any signature is computed.
        let key = DecodingKey::from_rsa_pem(&pem).expect("rsa public key");
        let mut validation = v.validation.clone();
        validation.algorithms = vec![Algorithm::RS256, Algorithm::HS256];
        let err = jsonwebtoken::decode::<RawClaims>(&token, &key, &validation)
            .err()
            .expect("must be refused");
        assert!(
            matches!(
                err.kind(),
                ErrorKind::InvalidKeyFormat | ErrorKind::InvalidAlgorithm
            ),
            "{err:?}"
        );
        // And such a config is refused by us at start.
        let e = Verifier::from_config(&cfg(&["RS256", "HS256"], Some("rsa_public.pem")))
            .expect_err("mixed families");
        assert_eq!(e.key, "jwt_algorithms");
    }

    #[test]
    fn garbage_is_malformed() {
        let v = hs256();
        let garbage = [
            "",
            "abc",
            "a.b",
            "a.b.c",
            "..",
            "a.b.c.d",
            "!!!.???.***",
            "eyJhbGciOiJIUzI1NiJ9",
            "bm90IGpzb24.e30.c2ln", // header "not json"
            "W10.e30.c2ln",         // header []
            "ɐ.ɐ.ɐ",
        ];
        for token in garbage {
            assert_eq!(v.verify(token, NOW), Err(AuthError::Malformed), "{token:?}");
        }
        // Valid header and signature over a payload that is not JSON.
        let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64(b"not json");
        let msg = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .expect("sign");
        assert_eq!(
            v.verify(&format!("{msg}.{sig}"), NOW),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn size_limit() {
        let v = hs256();
        assert_eq!(
            v.verify(&"a".repeat(TOKEN_BYTES_MAX + 1), NOW),
            Err(AuthError::TooLarge)
        );
        // The largest valid token under the limit is accepted; one more claim byte is not.
        let padded = |n: usize| hs(&json!({"sub": "a", "exp": NOW + 60, "pad": "x".repeat(n)}));
        // Token length grows with n: binary search the largest n that fits.
        let (mut lo, mut hi) = (0, TOKEN_BYTES_MAX);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if padded(mid).len() <= TOKEN_BYTES_MAX {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        assert!(padded(lo).len() <= TOKEN_BYTES_MAX && padded(hi).len() > TOKEN_BYTES_MAX);
        assert!(v.verify(&padded(lo), NOW).is_ok());
        assert_eq!(v.verify(&padded(hi), NOW), Err(AuthError::TooLarge));
    }

    #[test]
    fn audience_and_issuer() {
        let mut c = cfg(&["HS256"], None);
        c.jwt_audience = Some("switchboard".into());
        c.jwt_issuer = Some("https://auth.example".into());
        let v = Verifier::from_config(&c).expect("verifier");
        let base = |extra: Value| {
            let mut claims = claims();
            if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
                map.extend(extra);
            }
            v.verify(&hs(&claims), NOW)
        };
        let iss = "https://auth.example";
        assert!(base(json!({"aud": "switchboard", "iss": iss})).is_ok());
        assert!(base(json!({"aud": ["other", "switchboard"], "iss": iss})).is_ok());
        assert_eq!(
            base(json!({"aud": "other", "iss": iss})),
            Err(AuthError::BadAudience)
        );
        assert_eq!(
            base(json!({"aud": ["a", "b"], "iss": iss})),
            Err(AuthError::BadAudience)
        );
        assert_eq!(
            base(json!({"aud": [], "iss": iss})),
            Err(AuthError::BadAudience)
        );
        assert_eq!(base(json!({"iss": iss})), Err(AuthError::BadAudience));
        assert_eq!(
            base(json!({"aud": "switchboard"})),
            Err(AuthError::BadIssuer)
        );
        assert_eq!(
            base(json!({"aud": "switchboard", "iss": "https://evil.example"})),
            Err(AuthError::BadIssuer)
        );
        assert_eq!(
            base(json!({"aud": 5, "iss": iss})),
            Err(AuthError::Malformed)
        );
        // Unconfigured: aud and iss are not checked (jsonwebtoken alone would refuse any aud).
        let token = hs(&json!({"sub": "a", "exp": NOW + 60, "aud": "x", "iss": "y"}));
        assert!(hs256().verify(&token, NOW).is_ok());
    }

    #[test]
    fn from_config_errors_name_the_key() {
        let cases: [(Config, &str); 8] = [
            (cfg(&[], None), "jwt_algorithms"),
            (cfg(&["none"], None), "jwt_algorithms"),
            (
                Config {
                    jwt_secret: None,
                    ..cfg(&["HS256"], None)
                },
                "jwt_secret",
            ),
            (cfg(&["RS256"], None), "jwt_public_key_file"),
            (
                cfg(&["RS256"], Some("does_not_exist.pem")),
                "jwt_public_key_file",
            ),
            (
                cfg(&["RS256"], Some("rsa_private.pem")),
                "jwt_public_key_file",
            ),
            (
                cfg(&["RS256"], Some("ec_public.pem")),
                "jwt_public_key_file",
            ),
            (
                cfg(&["EdDSA"], Some("ec_public.pem")),
                "jwt_public_key_file",
            ),
        ];
        for (c, key) in cases {
            let e = Verifier::from_config(&c).expect_err("must fail");
            assert_eq!(e.key, key, "{e}");
        }
        let e =
            Verifier::from_config(&cfg(&["ES256"], Some("rsa_public.pem"))).expect_err("rsa as ec");
        assert_eq!(e.key, "jwt_public_key_file");
        let e = Verifier::from_config(&cfg(&["ES384"], Some("ec_public.pem")))
            .expect_err("P-256 key for ES384");
        assert!(e.message.contains("ES384"), "{e}");
        // The secret never shows in Debug.
        assert!(!format!("{:?}", hs256()).contains(SECRET));
    }

    #[test]
    fn token_sources_in_order() {
        let all = token_from_upgrade(
            Some("Bearer h.h.h"),
            Some("token=q.q.q"),
            Some("bearer.p.p.p"),
        );
        assert_eq!(all, Some((Cow::Borrowed("h.h.h"), TokenSource::Header)));
        let q = token_from_upgrade(
            Some("Basic dXNlcjpwdw=="),
            Some("a=1&token=q.q.q"),
            Some("bearer.p"),
        );
        assert_eq!(q, Some((Cow::Borrowed("q.q.q"), TokenSource::Query)));
        let p = token_from_upgrade(None, Some("token="), Some("switchboard, bearer.p.p.p"));
        assert_eq!(p, Some((Cow::Borrowed("p.p.p"), TokenSource::Subprotocol)));
        assert_eq!(
            token_from_upgrade(Some("bearer   x.y.z  "), None, None),
            Some((Cow::Borrowed("x.y.z"), TokenSource::Header))
        );
        assert_eq!(
            token_from_upgrade(Some("BEARER\tx"), None, None),
            Some((Cow::Borrowed("x"), TokenSource::Header))
        );
        assert_eq!(
            token_from_upgrade(Some("Bearer "), None, Some("bearer.")),
            None
        );
        assert_eq!(
            token_from_upgrade(Some("Bearerx.y.z"), Some("user_id=7"), Some("switchboard")),
            None
        );
        assert_eq!(token_from_upgrade(None, None, None), None);
        let decoded = token_from_upgrade(None, Some("?token=a%2Eb.c%2bd"), None);
        assert_eq!(
            decoded,
            Some((Cow::Owned("a.b.c+d".into()), TokenSource::Query))
        );
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param("token=abc", "token"),
            Some(Cow::Borrowed("abc"))
        );
        assert!(matches!(
            query_param("token=abc", "token"),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(
            query_param("?a=1&token=x&token=y", "token").as_deref(),
            Some("x")
        );
        assert_eq!(query_param("a=1&b=2", "token"), None);
        assert_eq!(query_param("", "token"), None);
        assert_eq!(query_param("token", "token").as_deref(), Some(""));
        assert_eq!(
            query_param("tokens=1&token=2", "token").as_deref(),
            Some("2")
        );
        assert_eq!(query_param("q=a+b%20c", "q").as_deref(), Some("a b c"));
        assert_eq!(query_param("q=%C3%A9t%C3%A9", "q").as_deref(), Some("été"));
        assert_eq!(query_param("q=%zz%4", "q").as_deref(), Some("%zz%4"));
        assert_eq!(query_param("q=100%", "q").as_deref(), Some("100%"));
        assert_eq!(query_param("q=%FF", "q").as_deref(), Some("\u{FFFD}"));
        assert_eq!(query_param("to%6Ben=z", "token").as_deref(), Some("z"));
        assert_eq!(query_param("q=a=b", "q").as_deref(), Some("a=b"));
    }

    #[test]
    fn glob_cases() {
        let yes = [
            ("", ""),
            ("*", ""),
            ("*", "anything"),
            ("lobby", "lobby"),
            ("team-*", "team-"),
            ("team-*", "team-red"),
            ("*-red", "team-red"),
            ("a*b*c", "abc"),
            ("a*b*c", "aXXbYYc"),
            ("a*b*c", "abcbc"),
            ("?", "x"),
            ("?", "é"),
            ("caf?", "café"),
            ("??", "日本"),
            ("*本", "日本"),
            ("*?", "x"),
            ("**a**", "a"),
            ("a?c*", "abcdef"),
            ("*aab", "aaaab"),
        ];
        for (p, s) in yes {
            assert!(glob_match(p, s), "{p:?} should match {s:?}");
        }
        let no = [
            ("", "a"),
            ("lobby", "lobby2"),
            ("lobby", "lobb"),
            ("team-*", "team"),
            ("?", ""),
            ("?", "ab"),
            ("??", "é"),
            ("caf?", "cafés"),
            ("a*b*c", "acb"),
            ("*x", "abc"),
            ("é", "è"),
            ("*é", "è"),
            ("Lobby", "lobby"),
        ];
        for (p, s) in no {
            assert!(!glob_match(p, s), "{p:?} should not match {s:?}");
        }
    }

    #[test]
    fn glob_pathological_patterns_stay_polynomial() {
        // Exponential in the number of stars for a naive recursive matcher.
        let text = "a".repeat(4096);
        let pattern = format!("{}b", "a*".repeat(200));
        assert!(!glob_match(&pattern, &text));
        let pattern = "*".repeat(1000) + "b";
        assert!(!glob_match(&pattern, &text));
        let pattern = "*?".repeat(300) + "a";
        assert!(glob_match(&pattern, &text));
        assert!(!glob_match(&"?".repeat(4097), &text));
        assert!(glob_match(&"?".repeat(4096), &text));
    }

    /// Reference matcher: textbook DP over chars, O(n*m) memory; compared on generated inputs.
    fn glob_reference(p: &str, s: &str) -> bool {
        let p: Vec<char> = p.chars().collect();
        let s: Vec<char> = s.chars().collect();
        let mut dp = vec![vec![false; s.len() + 1]; p.len() + 1];
        dp[0][0] = true;
        for i in 1..=p.len() {
            dp[i][0] = dp[i - 1][0] && p[i - 1] == '*';
            for j in 1..=s.len() {
                dp[i][j] = match p[i - 1] {
                    '*' => dp[i - 1][j] || dp[i][j - 1],
                    '?' => dp[i - 1][j - 1],
                    c => dp[i - 1][j - 1] && c == s[j - 1],
                };
            }
        }
        dp[p.len()][s.len()]
    }

    #[test]
    fn glob_agrees_with_reference() {
        let alphabet = ['a', 'b', 'é', '*', '?'];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..20_000 {
            let p: String = (0..next(7)).map(|_| alphabet[next(5)]).collect();
            let s: String = (0..next(9)).map(|_| alphabet[next(3)]).collect();
            assert_eq!(glob_match(&p, &s), glob_reference(&p, &s), "{p:?} vs {s:?}");
        }
    }

    #[test]
    fn rooms_claim() {
        let all = Claims {
            sub: "a".into(),
            exp: 1,
            rooms: None,
            admin: false,
            allowed_users: None,
        };
        assert!(all.allows_room("anything"));
        let none = Claims {
            rooms: Some(Vec::new()),
            ..all.clone()
        };
        assert!(!none.allows_room("lobby"));
        let some = Claims {
            rooms: Some(vec!["dm:alice:*".into(), "lobby".into()]),
            ..all
        };
        assert!(some.allows_room("dm:alice:bob"));
        assert!(some.allows_room("lobby"));
        assert!(!some.allows_room("dm:bob:alice"));
    }

    #[test]
    fn base64url() {
        assert_eq!(b64url_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(b64url_decode("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(b64url_decode("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(b64url_decode("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(b64url_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(b64url_decode("-_8").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(b64url_decode("a+b/"), None);
        for data in [&b"x"[..], b"xy", b"xyz", b"\x00\xff\x10\x80"] {
            assert_eq!(b64url_decode(&b64(data)).as_deref(), Some(data));
        }
    }
}
