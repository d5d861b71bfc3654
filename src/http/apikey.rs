//! The server API's key check.

use crate::limits::HTTP_API_KEY_BYTES_MAX;

use super::Request;

/// Whether `req` presents the API key `key`, as `X-API-Key: <key>` or `Authorization: apikey
/// <key>` (scheme case-insensitive). Every presented key must match: a request carrying both
/// headers with different keys is refused. `Authorization: Bearer ...` is not an API key (it
/// is a user's JWT) and neither passes nor fails this check on its own. An empty `key` (not
/// configured) never matches. The comparison is constant-time in the key's content; a
/// presented key over [`HTTP_API_KEY_BYTES_MAX`] is refused unread. Keys are never logged.
pub fn api_key_ok(req: &Request, key: &str) -> bool {
    if key.is_empty() {
        return false;
    }
    let from_auth = req.authorization.and_then(apikey_credential);
    let mut presented = 0;
    let mut ok = true;
    for k in [req.api_key, from_auth].into_iter().flatten() {
        presented += 1;
        // `&` not `&&`: compare every presented key, whatever the first gave.
        ok &= k.len() <= HTTP_API_KEY_BYTES_MAX && ct_eq(k.as_bytes(), key.as_bytes());
    }
    presented > 0 && ok
}

/// The credential of `Authorization: apikey <credential>`, if that is the scheme.
fn apikey_credential(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("apikey")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

/// Constant-time equality: the time depends on `presented.len()` only, never on where the
/// bytes differ nor on the secret's bytes. (The secret's length can be learned from timing;
/// its content cannot.) `subtle` is only a transitive dependency here, so not used.
pub fn ct_eq(presented: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return presented.is_empty();
    }
    let mut diff = (presented.len() != secret.len()) as u8;
    for (i, &p) in presented.iter().enumerate() {
        diff |= p ^ secret[i % secret.len()];
    }
    std::hint::black_box(diff) == 0
}
