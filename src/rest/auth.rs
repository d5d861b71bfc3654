//! Who sent a REST request: the same rules as the WebSocket upgrade (docs/PROTOCOL.md
//! section 2), with no in-band fallback (a request is answered at once).
//!
//! - Auth mode `jwt` (with a verifier): `Authorization: Bearer <jwt>`, verified by the one
//!   [`Verifier`] the upgrade and `authenticate` use, with `now`. A missing token or one that
//!   does not verify is 401 with the upgrade's texts (`token expired`, ...). `?token=` is not
//!   read here: URLs of API calls end up in proxy and browser logs.
//! - Auth mode `none` (development): the identity is claimed, as `?user_id=` claims it on the
//!   upgrade: the `X-User-Id` header, else the `user_id` query parameter. Without either the
//!   request is 401 (the REST API has no anonymous user); an empty or over-long id is 400
//!   `invalid user_id`, as on the upgrade.
//! - In any mode, a **backend** holding the server API key (`api_key`: `X-API-Key` or
//!   `Authorization: apikey <key>`) acts for the user it names in `X-User-Id` (required): how
//!   a service-layer backend sends a message or marks a read for a user (the chat hub's
//!   `SendMessage` flow), and the only REST access in `auth_mode: service`. A presented key
//!   that is wrong is 401 `invalid API key`, never a fallback to the other rules.
//! - In either mode a user id holding U+0000 (a token's `sub` of `"\u0000"`, a `%00`) is 400
//!   `text must not contain NUL characters`: no store can hold it.

use std::sync::Arc;

use super::RestError;
use crate::auth::{query_param, Verifier};
use crate::config::AuthMode;
use crate::http::{Request, Status};
use crate::limits::ID_BYTES_MAX;

/// The authenticated user of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    /// The token's `allowed_users` claim (`address_policy: claim`); None without a token or
    /// without the claim.
    pub allowed_users: Option<Vec<String>>,
}

/// The error text of a jwt-mode request without a bearer token.
pub const TOKEN_REQUIRED: &str = "token is required: send Authorization: Bearer <token>";
/// The error text of a none-mode request without a claimed identity.
pub const USER_REQUIRED: &str =
    "user id is required: send X-User-Id (auth_mode is none, for development)";

/// The error text of every REST request in `auth_mode: service` (the auth service is asked on
/// WebSocket upgrades only).
pub const SERVICE_MODE: &str =
    "the REST API needs auth_mode jwt or none; with auth_mode service only WebSocket upgrades are authenticated";

/// The error text of a request presenting an API key that is not the configured one.
pub const API_KEY_INVALID: &str = "invalid API key";
/// The error text of a backend request (API key) that names no user.
pub const BACKEND_USER_REQUIRED: &str =
    "user id is required: a backend's request (API key) names the user it acts for in X-User-Id";

/// Authenticate `req`. `verifier` is the node's (present when `mode` is jwt and a key is
/// configured; otherwise the development rules apply, as on the upgrade); `api_key` the
/// server API key, if configured.
pub fn identify(
    req: &Request,
    mode: AuthMode,
    verifier: Option<&Verifier>,
    api_key: Option<&str>,
    now_unix_s: u64,
) -> Result<Identity, RestError> {
    let presents_key = req.api_key.is_some()
        || req.authorization.is_some_and(|a| {
            a.trim()
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("apikey "))
        });
    if presents_key {
        let ok = api_key.is_some_and(|k| crate::http::api_key_ok(req, k));
        if !ok {
            return Err(RestError::new(Status::UNAUTHORIZED, API_KEY_INVALID));
        }
        let Some(user) = req.user_id else {
            return Err(RestError::new(Status::UNAUTHORIZED, BACKEND_USER_REQUIRED));
        };
        if user.is_empty() || user.len() > ID_BYTES_MAX {
            return Err(RestError::bad("invalid user_id"));
        }
        super::parse::no_nul(user)?;
        return Ok(Identity {
            user: Arc::from(user),
            allowed_users: None,
        });
    }
    match (mode, verifier) {
        (AuthMode::Jwt, Some(verifier)) => {
            let token = req
                .authorization
                .and_then(bearer)
                .ok_or_else(|| RestError::new(Status::UNAUTHORIZED, TOKEN_REQUIRED))?;
            let claims = verifier
                .verify(token, now_unix_s)
                .map_err(|e| RestError::new(Status::UNAUTHORIZED, e.as_str()))?;
            super::parse::no_nul(&claims.sub)?;
            Ok(Identity {
                user: Arc::from(claims.sub),
                allowed_users: claims.allowed_users,
            })
        }
        (AuthMode::Service, _) => Err(RestError::new(Status::UNAUTHORIZED, SERVICE_MODE)),
        _ => {
            let claimed = match req.user_id {
                Some(u) => Some(std::borrow::Cow::Borrowed(u)),
                None => req.query.and_then(|q| query_param(q, "user_id")),
            };
            let Some(user) = claimed else {
                return Err(RestError::new(Status::UNAUTHORIZED, USER_REQUIRED));
            };
            if user.is_empty() || user.len() > ID_BYTES_MAX {
                return Err(RestError::bad("invalid user_id"));
            }
            super::parse::no_nul(&user)?;
            Ok(Identity {
                user: Arc::from(user.as_ref()),
                allowed_users: None,
            })
        }
    }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive; another scheme is absent).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once([' ', '\t'])?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "rest-test-secret-0123456789abcdef";

    fn verifier() -> Verifier {
        let cfg = Config {
            auth_mode: AuthMode::Jwt,
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        };
        Verifier::from_config(&cfg).unwrap()
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn req<'a>(auth: Option<&'a str>, user: Option<&'a str>, q: Option<&'a str>) -> Request<'a> {
        Request {
            method: "GET",
            path: "/api/v1/notifications",
            authorization: auth,
            user_id: user,
            query: q,
            ..Request::default()
        }
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn jwt_mode_takes_a_verified_bearer_token_only() {
        let v = verifier();
        let t = token(serde_json::json!({"sub": "alice", "exp": NOW + 60,
            "allowed_users": ["bob"]}));
        let h = format!("Bearer {t}");
        let id = identify(
            &req(Some(&h), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(&*id.user, "alice");
        assert_eq!(id.allowed_users, Some(vec!["bob".to_string()]));
        let h = format!("bearer   {t} ");
        assert!(identify(
            &req(Some(&h), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW
        )
        .is_ok());
        // Missing, another scheme, an empty token, or only the dev identity: 401.
        for auth in [None, Some("Bearer "), Some("Basic YTpi")] {
            let e = identify(
                &req(auth, Some("alice"), Some("user_id=alice&token=x")),
                AuthMode::Jwt,
                Some(&v),
                None,
                NOW,
            )
            .unwrap_err();
            assert_eq!(
                (e.status, &*e.text),
                (Status::UNAUTHORIZED, TOKEN_REQUIRED),
                "{auth:?}"
            );
        }
        // A backend with the server API key acts for X-User-Id, in every mode; a wrong key
        // or no key configured is refused, never a fallback to the other rules.
        for mode in [AuthMode::Jwt, AuthMode::None, AuthMode::Service] {
            let id = identify(
                &req(Some("apikey k-1"), Some("6"), None),
                mode,
                Some(&v),
                Some("k-1"),
                NOW,
            )
            .unwrap();
            assert_eq!(&*id.user, "6");
            for (auth, key) in [("apikey nope", Some("k-1")), ("apikey k-1", None)] {
                let e = identify(&req(Some(auth), Some("6"), None), mode, Some(&v), key, NOW)
                    .unwrap_err();
                assert_eq!(
                    (e.status, &*e.text),
                    (Status::UNAUTHORIZED, API_KEY_INVALID)
                );
            }
            let e = identify(
                &req(Some("apikey k-1"), None, None),
                mode,
                Some(&v),
                Some("k-1"),
                NOW,
            )
            .unwrap_err();
            assert_eq!(&*e.text, BACKEND_USER_REQUIRED);
        }
        // The upgrade's texts.
        let old = format!(
            "Bearer {}",
            token(serde_json::json!({"sub": "a", "exp": NOW - 60}))
        );
        let e = identify(
            &req(Some(&old), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            (e.status, &*e.text),
            (Status::UNAUTHORIZED, "token expired")
        );
        let e = identify(
            &req(Some("Bearer a.b.c"), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            (e.status, &*e.text),
            (Status::UNAUTHORIZED, "malformed token")
        );
        let nosub = format!("Bearer {}", token(serde_json::json!({"exp": NOW + 60})));
        let e = identify(
            &req(Some(&nosub), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!(&*e.text, "token missing sub");
        // A verified `sub` no store can hold.
        let nul = format!(
            "Bearer {}",
            token(serde_json::json!({"sub": "a\u{0}", "exp": NOW + 60}))
        );
        let e = identify(
            &req(Some(&nul), None, None),
            AuthMode::Jwt,
            Some(&v),
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            (e.status, &*e.text),
            (Status::BAD_REQUEST, "text must not contain NUL characters")
        );
    }

    #[test]
    fn none_mode_takes_the_claimed_identity() {
        let id = identify(
            &req(None, Some("bob"), Some("user_id=carol")),
            AuthMode::None,
            None,
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(&*id.user, "bob", "the header wins");
        let id = identify(
            &req(None, None, Some("limit=2&user_id=car%20ol")),
            AuthMode::None,
            None,
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(&*id.user, "car ol");
        assert_eq!(id.allowed_users, None);
        // A token is not read in none mode.
        let e = identify(
            &req(Some("Bearer x.y.z"), None, None),
            AuthMode::None,
            None,
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!((e.status, &*e.text), (Status::UNAUTHORIZED, USER_REQUIRED));
        let e = identify(
            &req(None, None, Some("user_id=al%00")),
            AuthMode::None,
            None,
            None,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            (e.status, &*e.text),
            (Status::BAD_REQUEST, "text must not contain NUL characters")
        );
        let long = "u".repeat(ID_BYTES_MAX + 1);
        for bad in ["", long.as_str()] {
            let e =
                identify(&req(None, Some(bad), None), AuthMode::None, None, None, NOW).unwrap_err();
            assert_eq!(
                (e.status, &*e.text),
                (Status::BAD_REQUEST, "invalid user_id")
            );
        }
        // jwt mode without a verifier falls back as the upgrade does.
        assert!(identify(
            &req(None, Some("bob"), None),
            AuthMode::Jwt,
            None,
            None,
            NOW
        )
        .is_ok());
    }
}
