//! Requests to [`Op`]s: the route table, path ids, query parameters and JSON bodies, with
//! every limit checked and every refusal a [`RestError`] that says what to change.
//!
//! Decisions:
//! - Bodies are read as JSON whatever `Content-Type` says (as the server API does: `curl -d`
//!   sends `application/x-www-form-urlencoded`). A body must be a JSON object; unknown members
//!   are ignored; `null` is the same as an absent member, and so is `""` for the optional
//!   texts (`title`, `id`, `clientMsgId`, `attachmentUrl`).
//! - Each member the endpoint reads is type-checked on its own, so the error names it
//!   (`content must be a string`), rather than one serde message for the whole body.
//! - `HEAD` is not served here (405): the answers are computed per request, often on the
//!   bridge, and a client gains nothing from the headers alone.
//! - One trailing `/` is ignored (`/api/v1/notifications/` is `/api/v1/notifications`).
//! - No text may hold U+0000 (a path id, a query value, a body text, once decoded): 400
//!   [`NUL_TEXT`], the text the stores refuse it with (PostgreSQL text cannot hold it).
//! - A thread `id` chosen by the caller must not be all digits (400 [`NUMERIC_ID`]): numeric
//!   ids are the store's, and a path segment of digits names a thread by number.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::{Limits, Op, PresenceOp, RestError, RestOp, PAGE_LIMIT_DEFAULT};
use crate::auth::query_param;
use crate::http::{route, Request, RouteSpec, Routed, Status};
use crate::limits::{ID_BYTES_MAX, URL_BYTES_MAX};
use crate::store::{
    has_nul, is_numeric_id, MessageRef, Refusal, ThreadRef, PAGE_LIMIT_MAX,
    THREAD_PARTICIPANTS_MAX, THREAD_TITLE_BYTES_MAX,
};

/// The 400 of any text input holding U+0000 (the stores' [`Refusal::InvalidText`] text).
pub const NUL_TEXT: &str = "text must not contain NUL characters";

/// The 400 of a thread `id` of digits only.
pub const NUMERIC_ID: &str = "id must not be all digits";

/// 400 [`NUL_TEXT`] when `s` holds U+0000.
pub(super) fn no_nul(s: &str) -> Result<(), RestError> {
    if has_nul(s) {
        debug_assert_eq!(Refusal::InvalidText.text(), NUL_TEXT);
        return Err(RestError::bad(NUL_TEXT));
    }
    Ok(())
}

/// A path id, checked for NUL.
fn path_id(seg: &str) -> Result<&str, RestError> {
    no_nul(seg)?;
    Ok(seg)
}

/// The endpoints (see [`ROUTES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Threads,
    CreateThread,
    Thread,
    ThreadMessages,
    SendMessage,
    MarkRead,
    Online,
    PresenceUser,
    Notifications,
    NotificationsReadAll,
    NotificationRead,
}

/// The REST API's routes; captures are positional.
pub const ROUTES: &[RouteSpec<Route>] = &[
    ("GET /api/v1/messages/threads", Route::Threads),
    ("POST /api/v1/messages/threads", Route::CreateThread),
    ("GET /api/v1/messages/threads/{threadId}", Route::Thread),
    (
        "GET /api/v1/messages/threads/{threadId}/messages",
        Route::ThreadMessages,
    ),
    (
        "POST /api/v1/messages/threads/{threadId}/messages",
        Route::SendMessage,
    ),
    ("PUT /api/v1/messages/{messageId}/read", Route::MarkRead),
    ("GET /api/v1/presence/online", Route::Online),
    ("GET /api/v1/presence/user/{userId}", Route::PresenceUser),
    ("GET /api/v1/notifications", Route::Notifications),
    (
        "PUT /api/v1/notifications/read-all",
        Route::NotificationsReadAll,
    ),
    (
        "PUT /api/v1/notifications/{id}/read",
        Route::NotificationRead,
    ),
];

/// Route and check one request (already authenticated: see [`super::identify`]).
pub fn parse(req: &Request, limits: &Limits) -> Result<Op, RestError> {
    let path = match req.path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => req.path,
    };
    let (r, params) = match route(ROUTES, req.method, path) {
        Routed::Found(_, _) if req.method == "HEAD" => {
            return Err(method_not_allowed(allowed_methods(path)))
        }
        Routed::Found(r, p) => (r, p),
        Routed::MethodNotAllowed(allow) => return Err(method_not_allowed(without_head(&allow))),
        Routed::BadRequest(text) => return Err(RestError::bad(text)),
        Routed::NotFound => return Err(RestError::new(Status::NOT_FOUND, "not found")),
    };
    let seg = || params.get(0).unwrap_or("");
    let thread = || path_id(seg()).map(ThreadRef::parse);
    let q = req.query;
    Ok(match r {
        Route::Threads => Op::Store(RestOp::ListThreads {
            before: number_param(q, "before")?,
            limit: limit(q)?,
        }),
        Route::CreateThread => Op::Store(create_thread(req.body)?),
        Route::Thread => Op::Store(RestOp::GetThread { thread: thread()? }),
        Route::ThreadMessages => Op::Store(RestOp::ListMessages {
            thread: thread()?,
            before: number_param(q, "before")?,
            limit: limit(q)?,
        }),
        Route::SendMessage => Op::Store(send_message(thread()?, req.body, limits)?),
        Route::MarkRead => Op::Store(RestOp::MarkRead {
            message: MessageRef::parse(path_id(seg())?).ok_or_else(|| {
                RestError::bad("messageId must be a serverMsgId (a UUID) or a numeric message id")
            })?,
        }),
        Route::Online => Op::Presence(PresenceOp::Online {
            after: query_param(q.unwrap_or(""), "after")
                .filter(|a| !a.is_empty())
                .map(|a| {
                    no_nul(&a)?;
                    if a.len() > ID_BYTES_MAX {
                        Err(RestError::bad(
                            "after must be the next value of the previous page (a user id)",
                        ))
                    } else {
                        Ok(Arc::from(a.as_ref()))
                    }
                })
                .transpose()?,
            limit: limit(q)?,
        }),
        Route::PresenceUser => Op::Presence(PresenceOp::User {
            user: Arc::from(path_id(seg())?),
        }),
        Route::Notifications => Op::Store(RestOp::ListNotifications {
            unread_only: flag(q, "unread")?,
            before: number_param(q, "before")?,
            limit: limit(q)?,
        }),
        Route::NotificationsReadAll => Op::Store(RestOp::NotificationsReadAll),
        Route::NotificationRead => Op::Store(RestOp::NotificationRead {
            id: path_id(seg())?
                .parse()
                .map_err(|_| RestError::bad("notification id must be a number"))?,
        }),
    })
}

fn method_not_allowed(allow: String) -> RestError {
    RestError {
        allow: Some(allow),
        ..RestError::new(Status::METHOD_NOT_ALLOWED, "method not allowed")
    }
}

/// The methods served on `path` (which exists), for `Allow`.
fn allowed_methods(path: &str) -> String {
    match route(ROUTES, "", path) {
        Routed::MethodNotAllowed(allow) => without_head(&allow),
        _ => String::new(),
    }
}

/// The router lists `HEAD` beside every `GET`; this API does not serve it.
fn without_head(allow: &str) -> String {
    allow
        .split(", ")
        .filter(|m| *m != "HEAD")
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------ query

/// `limit`: 1 to [`PAGE_LIMIT_MAX`], default [`PAGE_LIMIT_DEFAULT`].
fn limit(q: Option<&str>) -> Result<usize, RestError> {
    let Some(v) = q.and_then(|q| query_param(q, "limit")) else {
        return Ok(PAGE_LIMIT_DEFAULT);
    };
    match v.parse::<usize>() {
        Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => Ok(n),
        _ => Err(RestError::bad(format!(
            "limit must be an integer from 1 to {PAGE_LIMIT_MAX}"
        ))),
    }
}

/// A cursor parameter (`before`): the `next` of the previous page.
fn number_param(q: Option<&str>, name: &'static str) -> Result<Option<u64>, RestError> {
    let Some(v) = q.and_then(|q| query_param(q, name)) else {
        return Ok(None);
    };
    v.parse::<u64>().map(Some).map_err(|_| {
        RestError::bad(format!(
            "{name} must be the next value of the previous page (a number)"
        ))
    })
}

/// A boolean parameter: `true`/`1` or `false`/`0` (absent: false).
fn flag(q: Option<&str>, name: &'static str) -> Result<bool, RestError> {
    match q.and_then(|q| query_param(q, name)).as_deref() {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(_) => Err(RestError::bad(format!("{name} must be true or false"))),
    }
}

// ------------------------------------------------------------------ bodies

/// The body as `T` (whose members are `LazyValue`s, checked one by one after).
fn object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, RestError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(RestError::bad("a JSON object body is required")),
        Some(b'{') => {}
        Some(_) => return Err(RestError::bad("the body must be a JSON object")),
    }
    sonic_rs::from_slice::<T>(body).map_err(|e| {
        if e.to_string().contains("duplicate field") {
            RestError::bad("a member is given twice")
        } else {
            RestError::bad("invalid JSON format")
        }
    })
}

/// An optional string member: absent or `null` is `None`.
fn opt_str<'v>(
    v: &'v Option<LazyValue<'_>>,
    name: &'static str,
) -> Result<Option<&'v str>, RestError> {
    match v {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| RestError::bad(format!("{name} must be a string"))),
    }
}

/// An optional text: absent, `null` and `""` are `None`; longer than `max` bytes is refused.
fn opt_text(
    v: &Option<LazyValue<'_>>,
    name: &'static str,
    max: usize,
) -> Result<Option<Arc<str>>, RestError> {
    match opt_str(v, name)? {
        None | Some("") => Ok(None),
        Some(s) if s.len() > max => Err(RestError::bad(format!(
            "{name} must be at most {max} bytes"
        ))),
        Some(s) => {
            no_nul(s)?;
            Ok(Some(Arc::from(s)))
        }
    }
}

#[derive(Deserialize)]
struct CreateThreadBody<'a> {
    #[serde(borrow, default)]
    participants: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    title: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    id: Option<LazyValue<'a>>,
}

const BAD_PARTICIPANTS: &str =
    "participants must be an array of user ids (strings of 1 to 256 bytes, or integers)";

fn create_thread(body: &[u8]) -> Result<RestOp, RestError> {
    let b: CreateThreadBody = object(body)?;
    let list = match &b.participants {
        None => return Err(RestError::bad("participants is required")),
        Some(v) if v.is_null() => return Err(RestError::bad("participants is required")),
        Some(v) if !v.is_array() => return Err(RestError::bad(BAD_PARTICIPANTS)),
        Some(v) => sonic_rs::from_str::<Vec<LazyValue>>(v.as_raw_str())
            .map_err(|_| RestError::bad(BAD_PARTICIPANTS))?,
    };
    if list.is_empty() {
        return Err(RestError::bad("participants is required"));
    }
    if list.len() > THREAD_PARTICIPANTS_MAX {
        return Err(too_many_participants());
    }
    let mut seen = HashSet::with_capacity(list.len());
    let mut participants = Vec::with_capacity(list.len());
    for v in &list {
        let id: Cow<str> = if let Some(s) = v.as_str() {
            Cow::Borrowed(s)
        } else if let Some(n) = v.as_u64().filter(|_| v.is_number()) {
            Cow::Owned(n.to_string())
        } else {
            return Err(RestError::bad(BAD_PARTICIPANTS));
        };
        if id.is_empty() || id.len() > ID_BYTES_MAX {
            return Err(RestError::bad(BAD_PARTICIPANTS));
        }
        no_nul(&id)?;
        if seen.insert(id.clone()) {
            participants.push(Arc::from(id.as_ref()));
        }
    }
    let id = opt_text(&b.id, "id", ID_BYTES_MAX)?;
    if id.as_deref().is_some_and(is_numeric_id) {
        return Err(RestError::bad(NUMERIC_ID));
    }
    Ok(RestOp::CreateThread {
        id,
        participants,
        title: opt_text(&b.title, "title", THREAD_TITLE_BYTES_MAX)?,
    })
}

/// The error for a thread over [`THREAD_PARTICIPANTS_MAX`] (the creator included).
pub(super) fn too_many_participants() -> RestError {
    RestError::bad(format!(
        "too many participants: a thread has at most {THREAD_PARTICIPANTS_MAX}, you included"
    ))
}

#[derive(Deserialize)]
struct SendBody<'a> {
    #[serde(borrow, default)]
    content: Option<LazyValue<'a>>,
    /// The old service's WebSocket name for `content`.
    #[serde(borrow, default)]
    body: Option<LazyValue<'a>>,
    #[serde(rename = "attachmentUrl", borrow, default)]
    attachment_url: Option<LazyValue<'a>>,
    #[serde(rename = "clientMsgId", borrow, default)]
    client_msg_id: Option<LazyValue<'a>>,
}

/// The checks of `message.send` (docs/PROTOCOL.md section 6), in its order.
fn send_message(thread: ThreadRef, body: &[u8], limits: &Limits) -> Result<RestOp, RestError> {
    let b: SendBody = object(body)?;
    let content = match (opt_str(&b.content, "content")?, opt_str(&b.body, "body")?) {
        (Some(_), Some(_)) => return Err(RestError::bad("give content or body, not both")),
        (c, b) => c.or(b).unwrap_or(""),
    };
    let client_msg_id = opt_text(&b.client_msg_id, "clientMsgId", ID_BYTES_MAX)?;
    let attachment = opt_str(&b.attachment_url, "attachmentUrl")?.filter(|a| !a.is_empty());
    if content.len() > limits.content_bytes_max
        || attachment.is_some_and(|a| a.len() > URL_BYTES_MAX)
    {
        return Err(RestError::new(
            Status::PAYLOAD_TOO_LARGE,
            "message too large",
        ));
    }
    if content.is_empty() && attachment.is_none() {
        return Err(RestError::bad("content is required"));
    }
    no_nul(content)?;
    if let Some(a) = attachment {
        no_nul(a)?;
    }
    Ok(RestOp::SendMessage {
        thread,
        content: Arc::from(content),
        attachment_url: attachment.map(Arc::from),
        client_msg_id,
    })
}

#[cfg(test)]
mod tests;
