//! A static route table: `(method, path)` to a route value and captured segments.

use std::borrow::Cow;

use crate::limits::{HTTP_PATH_PARAM_BYTES_MAX, HTTP_ROUTE_PARAMS_MAX};

/// A table row: `"POST /api/users/{id}/send"` and the value to return. A `{name}` segment
/// captures one non-empty path segment; the name documents it (captures are positional).
pub type RouteSpec<R> = (&'static str, R);

/// The captured segments of a match, percent-decoded, in pattern order.
#[derive(Debug, PartialEq, Eq)]
pub struct Params<'a> {
    values: [Cow<'a, str>; HTTP_ROUTE_PARAMS_MAX],
    len: usize,
}

impl<'a> Params<'a> {
    fn new() -> Params<'a> {
        Params {
            values: std::array::from_fn(|_| Cow::Borrowed("")),
            len: 0,
        }
    }

    /// The `i`th captured segment.
    pub fn get(&self, i: usize) -> Option<&str> {
        self.values[..self.len].get(i).map(|c| c.as_ref())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What [`route`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed<'a, R> {
    /// Serve `R` with these captures.
    Found(R, Params<'a>),
    /// A captured segment is not valid percent-encoded UTF-8 or is longer than
    /// [`HTTP_PATH_PARAM_BYTES_MAX`] decoded (client): answer 400 with this text.
    BadRequest(&'static str),
    /// The path exists for other methods: answer 405 with `Allow: <this>`.
    MethodNotAllowed(String),
    /// No pattern matches the path: answer 404.
    NotFound,
}

enum Seg<'a> {
    No,
    Yes(Params<'a>),
    Bad(&'static str),
}

fn match_path<'a>(pattern: &str, path: &'a str) -> Seg<'a> {
    let mut params = Params::new();
    let mut bad = None;
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => break,
            (Some(p), Some(g)) if p.starts_with('{') && p.ends_with('}') => {
                if g.is_empty() {
                    return Seg::No;
                }
                if params.len == HTTP_ROUTE_PARAMS_MAX {
                    debug_assert!(false, "pattern {pattern} has too many captures");
                    return Seg::No;
                }
                match percent_decode(g) {
                    Ok(v) => params.values[params.len] = v,
                    Err(why) => bad = bad.or(Some(why)),
                }
                params.len += 1;
            }
            (Some(p), Some(g)) if p == g => {}
            _ => return Seg::No,
        }
    }
    match bad {
        Some(why) => Seg::Bad(why),
        None => Seg::Yes(params),
    }
}

/// Percent-decode one path segment, bounded by [`HTTP_PATH_PARAM_BYTES_MAX`].
pub fn percent_decode(seg: &str) -> Result<Cow<'_, str>, &'static str> {
    const TOO_LONG: &str = "path segment too long";
    if !seg.contains('%') {
        return if seg.len() > HTTP_PATH_PARAM_BYTES_MAX {
            Err(TOO_LONG)
        } else {
            Ok(Cow::Borrowed(seg))
        };
    }
    // Each decoded byte takes 1 or 3 input bytes: past 3x the bound it cannot fit.
    if seg.len() > 3 * HTTP_PATH_PARAM_BYTES_MAX {
        return Err(TOO_LONG);
    }
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err("bad percent-encoding in path");
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.len() > HTTP_PATH_PARAM_BYTES_MAX {
        return Err(TOO_LONG);
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| "path segment is not UTF-8")
}

/// Match `(method, path)` against `table`, first match wins. `HEAD` matches `GET` rows (send
/// the GET answer without its body). Cost: O(rows x segments), no allocation unless a
/// capture is percent-encoded or the answer is 405.
pub fn route<'a, R: Copy>(table: &[RouteSpec<R>], method: &str, path: &'a str) -> Routed<'a, R> {
    let mut allow: Vec<&'static str> = Vec::new();
    for &(spec, value) in table {
        let Some((m, pattern)) = spec.split_once(' ') else {
            debug_assert!(false, "route {spec:?} is not \"METHOD /path\"");
            continue;
        };
        let captured = match match_path(pattern, path) {
            Seg::No => continue,
            Seg::Yes(p) => Ok(p),
            Seg::Bad(why) => Err(why),
        };
        if m == method || (method == "HEAD" && m == "GET") {
            return match captured {
                Ok(p) => Routed::Found(value, p),
                Err(why) => Routed::BadRequest(why),
            };
        }
        for m in [Some(m), (m == "GET").then_some("HEAD")]
            .into_iter()
            .flatten()
        {
            if !allow.contains(&m) {
                allow.push(m);
            }
        }
    }
    if allow.is_empty() {
        Routed::NotFound
    } else {
        Routed::MethodNotAllowed(allow.join(", "))
    }
}

/// Check a table (for a unit test next to it): every row is `METHOD /path`, has at most
/// [`HTTP_ROUTE_PARAMS_MAX`] captures, and no two rows share method and pattern.
pub fn check_table<R>(table: &[RouteSpec<R>]) -> Result<(), String> {
    for (i, (spec, _)) in table.iter().enumerate() {
        let Some((m, p)) = spec.split_once(' ') else {
            return Err(format!("{spec:?}: want \"METHOD /path\""));
        };
        if m.is_empty() || !p.starts_with('/') {
            return Err(format!("{spec:?}: want \"METHOD /path\""));
        }
        let captures = p.split('/').filter(|s| s.starts_with('{')).count();
        if captures > HTTP_ROUTE_PARAMS_MAX {
            return Err(format!("{spec:?}: over {HTTP_ROUTE_PARAMS_MAX} captures"));
        }
        if table[..i].iter().any(|(s, _)| s == spec) {
            return Err(format!("{spec:?} twice"));
        }
    }
    Ok(())
}
