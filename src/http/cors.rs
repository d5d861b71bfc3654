//! CORS for configured origins: the allow-origin echo and the preflight answer.

use crate::limits::HTTP_CORS_ORIGINS_MAX;

use super::{CorsHeaders, Request, Response, Status};

/// Methods a preflight allows (every method the API routes use).
pub const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";
/// Request headers a preflight allows (`X-User-Id`: the REST API's identity in auth mode
/// `none`).
pub const ALLOW_HEADERS: &str = "Authorization, Content-Type, X-API-Key, X-User-Id";

/// The configured allowed origins. Empty = CORS off (no CORS header is ever sent); `*` in
/// the list = any origin. The allowed origin is echoed (never a literal `*`) with `Vary:
/// Origin`, so caches keep answers per origin. No `Access-Control-Allow-Credentials`: API
/// clients authenticate with headers, not cookies. Origins compare ASCII case-insensitively
/// and exactly otherwise (configure `https://app.example`, no path, no trailing slash).
#[derive(Clone, Debug, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

/// The preflight answer of [`Cors::preflight`].
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight<'a> {
    /// Not a preflight (not `OPTIONS` with Origin and Access-Control-Request-Method), or CORS
    /// is off: route the request as usual.
    NotPreflight,
    /// Answer 204 with these headers ([`Cors::preflight_response`]).
    Allowed(CorsHeaders<'a>),
    /// The origin is not allowed: answer 403 ([`Cors::preflight_response`]).
    Refused,
}

impl Cors {
    /// From the configured list. Errors (for the config key's message) when longer than
    /// [`HTTP_CORS_ORIGINS_MAX`] or holding an empty entry.
    pub fn new<S: AsRef<str>>(origins: &[S]) -> Result<Cors, String> {
        if origins.len() > HTTP_CORS_ORIGINS_MAX {
            return Err(format!(
                "lists {} origins; at most {HTTP_CORS_ORIGINS_MAX} (use \"*\" for any)",
                origins.len()
            ));
        }
        let mut cors = Cors::default();
        for o in origins {
            let o = o.as_ref().trim();
            if o.is_empty() {
                return Err("holds an empty origin; remove it".into());
            }
            if o == "*" {
                cors.any = true;
            } else {
                cors.origins.push(o.to_owned());
            }
        }
        Ok(cors)
    }

    /// Whether CORS is on (the list is not empty).
    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The headers for an ordinary response to a request with this `Origin`.
    pub fn headers<'a>(&self, origin: Option<&'a str>) -> CorsHeaders<'a> {
        match origin {
            Some(o) if self.allows(o) => CorsHeaders::Origin(o),
            _ => CorsHeaders::Off,
        }
    }

    fn allows(&self, origin: &str) -> bool {
        !origin.is_empty()
            && (self.any || self.origins.iter().any(|a| a.eq_ignore_ascii_case(origin)))
    }

    /// Decide a CORS preflight.
    pub fn preflight<'a>(&self, req: &Request<'a>) -> Preflight<'a> {
        match (req.method, req.origin, req.ac_request_method) {
            ("OPTIONS", Some(origin), Some(_)) if self.enabled() => {
                if self.allows(origin) {
                    Preflight::Allowed(CorsHeaders::Preflight(origin))
                } else {
                    Preflight::Refused
                }
            }
            _ => Preflight::NotPreflight,
        }
    }

    /// The preflight answer bytes, or None when `req` is not a preflight (route it).
    pub fn preflight_response(&self, req: &Request, keep_alive: bool) -> Option<Vec<u8>> {
        match self.preflight(req) {
            Preflight::NotPreflight => None,
            Preflight::Allowed(cors) => {
                let mut r = Response::new(Status::NO_CONTENT, "", b"");
                r.keep_alive = keep_alive;
                r.cors = cors;
                Some(r.to_vec())
            }
            Preflight::Refused => {
                let body = super::json_error_body("origin not allowed");
                let mut r = Response::new(Status::FORBIDDEN, "application/json", &body);
                r.keep_alive = keep_alive;
                Some(r.to_vec())
            }
        }
    }
}
