//! The bridge side: run a [`RestOp`] against the store and say what to answer and what else
//! to do. Sans-IO but for the store calls: no sockets, no clock (`now_ms` is an argument; the
//! new message ids are UUID v7, as `message.send` makes them), no logging.
//!
//! The caller (the bridge) sends [`Executed::body`] with [`Executed::status`] to the waiting
//! connection ([`http_response`]) and carries out every [`Effect`]. One op is not finished
//! here: `POST .../messages` returns [`Effect::Send`], because a message is stored by the
//! bridge's batched DM writer (one `append` for many messages) and delivered to every
//! participant's devices from there; the bridge answers it with [`render_appended`] (or
//! [`store_unavailable`] when the batch failed).
//!
//! Status mapping, the same on every endpoint: a [`StoreError`] is 503 `message store
//! unavailable, retry later` (nothing was changed that a retry would repeat badly: reads are
//! reads, marks only move forward, creates and sends are idempotent by id), `Lookup::NotFound`
//! is 404, `Lookup::Forbidden` 403, a store's refusal of the request's data
//! ([`Created::Refused`], [`Refusal::InvalidText`], [`Refusal::NumericThreadId`]) 400 with the
//! refusal's text. Nothing is 500.

use std::collections::HashSet;
use std::sync::Arc;

use super::{json, parse::too_many_participants, RestError, RestOp};
use crate::http::{json_error_body, CorsHeaders, Response, Status};
use crate::shard::service::dm::derive_conversation_id;
use crate::store::{
    Appended, Created, Lookup, Mark, MarkRequest, Marked, Message, NewMessage, NewThread, Refusal,
    Store, StoreError, ThreadKind, ThreadRef, ThreadView, THREAD_PARTICIPANTS_MAX,
};

/// What the bridge must do besides answering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// `PUT /messages/:id/read` recorded a read: deliver `message.read` (data
    /// `{conversationId, messageIds, by, at}`, as `mark.read` relays it) to the devices of
    /// the senders of `marked.messages` and to `by`'s devices.
    Receipt {
        marked: Marked,
        by: Arc<str>,
        at_ms: u64,
    },
    /// `POST .../messages`: append this message through the DM writer (it is not stored
    /// yet), deliver its `message.create` to every participant's devices, then answer the
    /// connection with [`render_appended`] of its outcome. [`Executed::body`] is empty.
    Send(NewMessage),
}

/// The outcome of [`execute`]: the response and the effects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub status: Status,
    /// JSON (empty only with an [`Effect::Send`], whose answer comes later).
    pub body: Vec<u8>,
    pub effects: Vec<Effect>,
}

impl Executed {
    fn ok(status: Status, body: Vec<u8>) -> Executed {
        Executed {
            status,
            body,
            effects: Vec::new(),
        }
    }

    fn error(status: Status, text: &str) -> Executed {
        Executed::ok(status, json_error_body(text))
    }
}

impl From<RestError> for Executed {
    fn from(e: RestError) -> Executed {
        Executed::ok(e.status, e.body())
    }
}

/// The text of every 503 from the store (the socket's error text too).
pub use crate::bridge::store::STORE_UNAVAILABLE;
const THREAD_NOT_FOUND: &str = "thread not found";
const NOT_PARTICIPANT: &str = "not a participant of this thread";
const MESSAGE_NOT_FOUND: &str = "message not found";

/// 503 `{"error":"message store unavailable, retry later"}` (the store failed or timed out).
pub fn store_unavailable() -> Executed {
    Executed::error(Status::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE)
}

fn lookup<T>(l: Lookup<T>, not_found: &str, f: impl FnOnce(T) -> Executed) -> Executed {
    match l {
        Lookup::Found(t) => f(t),
        Lookup::NotFound => Executed::error(Status::NOT_FOUND, not_found),
        Lookup::Forbidden => Executed::error(Status::FORBIDDEN, NOT_PARTICIPANT),
    }
}

/// A thread body.
fn thread_body(status: Status, v: &ThreadView) -> Executed {
    Executed::ok(status, json::body(|o| json::thread(o, v)))
}

/// The body of one message: [`json::message`].
pub fn render_message(m: &Message) -> Vec<u8> {
    json::body(|o| json::message(o, m))
}

/// The answer to `POST .../messages` once its append has an outcome: 201 and the message
/// when stored now, 200 and the first copy for a repeated `clientMsgId`, 404/403 when the
/// store refused it (the thread went away, or the sender is not a participant).
pub fn render_appended(a: &Appended) -> Executed {
    match a {
        Appended::New { message, .. } => Executed::ok(Status::CREATED, render_message(message)),
        Appended::Duplicate(m) => Executed::ok(Status::OK, render_message(m)),
        Appended::Refused(Refusal::UnknownThread) => {
            Executed::error(Status::NOT_FOUND, THREAD_NOT_FOUND)
        }
        Appended::Refused(Refusal::NotParticipant) => {
            Executed::error(Status::FORBIDDEN, NOT_PARTICIPANT)
        }
        Appended::Refused(r @ (Refusal::InvalidText | Refusal::NumericThreadId)) => {
            Executed::error(Status::BAD_REQUEST, r.text())
        }
    }
}

/// The HTTP response bytes for the waiting connection: JSON, `Connection: keep-alive` when
/// `keep`, the CORS origin echoed when the shard allowed one.
pub fn http_response(status: Status, body: &[u8], keep: bool, cors: Option<&str>) -> Vec<u8> {
    let mut r = Response::new(status, "application/json", body);
    r.keep_alive = keep;
    if let Some(o) = cors {
        r.cors = CorsHeaders::Origin(o);
    }
    r.to_vec()
}

/// Run `op` for `user` at `now_ms` (Unix ms).
pub async fn execute<S: Store>(store: &S, user: &str, op: RestOp, now_ms: u64) -> Executed {
    match run(store, user, op, now_ms).await {
        Ok(e) => e,
        Err(_) => store_unavailable(),
    }
}

async fn run<S: Store>(
    store: &S,
    user: &str,
    op: RestOp,
    now_ms: u64,
) -> Result<Executed, StoreError> {
    Ok(match op {
        RestOp::ListThreads { before, limit } => {
            let p = store.threads(user, before, limit).await?;
            Executed::ok(
                Status::OK,
                json::page("threads", &p.items, |o| next(o, p.next), json::thread),
            )
        }
        RestOp::GetThread { thread } => {
            lookup(store.thread(user, &thread).await?, THREAD_NOT_FOUND, |v| {
                thread_body(Status::OK, &v)
            })
        }
        RestOp::ListMessages {
            thread,
            before,
            limit,
        } => lookup(
            store.messages(user, &thread, before, limit).await?,
            THREAD_NOT_FOUND,
            |p| {
                Executed::ok(
                    Status::OK,
                    json::page("messages", &p.items, |o| next(o, p.next), json::message),
                )
            },
        ),
        RestOp::CreateThread {
            id,
            participants,
            title,
        } => {
            let others: Vec<Arc<str>> = participants.into_iter().filter(|p| **p != *user).collect();
            if others.len() >= THREAD_PARTICIPANTS_MAX {
                return Ok(too_many_participants().into());
            }
            let (id, kind) = match thread_to_create(user, id, &others) {
                Ok(chosen) => chosen,
                Err(e) => return Ok(e.into()),
            };
            let new = NewThread {
                id,
                kind,
                creator: Arc::from(user),
                participants: others,
                title,
                created_at_ms: now_ms,
            };
            match store.create_thread(&new).await? {
                Created::New(v) => thread_body(Status::CREATED, &v),
                Created::Exists(l) => lookup(l, THREAD_NOT_FOUND, |v| thread_body(Status::OK, &v)),
                Created::Refused(r) => Executed::error(Status::BAD_REQUEST, r.text()),
            }
        }
        RestOp::SendMessage {
            thread,
            content,
            attachment_url,
            client_msg_id,
        } => {
            // Resolved first: a numeric id becomes the text id the writer needs, and a thread
            // that does not exist or is not the user's is answered without the writer.
            let view = match store.thread(user, &thread).await? {
                Lookup::Found(v) => v,
                Lookup::NotFound => {
                    return Ok(Executed::error(Status::NOT_FOUND, THREAD_NOT_FOUND))
                }
                Lookup::Forbidden => {
                    return Ok(Executed::error(Status::FORBIDDEN, NOT_PARTICIPANT))
                }
            };
            // Only a direct thread takes a DM (the store refuses `to` anywhere else); into a
            // group thread, even of two, the message goes to every participant.
            let to = match view.kind {
                ThreadKind::Direct => recipient(user, &view.participants),
                ThreadKind::Group => None,
            };
            Executed {
                status: Status::CREATED,
                body: Vec::new(),
                effects: vec![Effect::Send(NewMessage {
                    server_msg_id: uuid::Uuid::now_v7().as_u128(),
                    event_id: uuid::Uuid::now_v7().as_u128(),
                    thread: view.id,
                    sender: Arc::from(user),
                    to,
                    client_msg_id,
                    content,
                    attachment_url,
                    sent_at_ms: now_ms,
                })],
            }
        }
        RestOp::MarkRead { message } => {
            let by: Arc<str> = Arc::from(user);
            let req = MarkRequest {
                user: by.clone(),
                mark: Mark::Read,
                thread: None,
                messages: vec![message],
                at_ms: now_ms,
            };
            let marked = match store.mark(&req).await? {
                Lookup::Found(m) => m,
                Lookup::NotFound => {
                    return Ok(Executed::error(Status::NOT_FOUND, MESSAGE_NOT_FOUND))
                }
                Lookup::Forbidden => {
                    return Ok(Executed::error(Status::FORBIDDEN, NOT_PARTICIPANT))
                }
            };
            let effect = Effect::Receipt {
                marked: marked.clone(),
                by,
                at_ms: now_ms,
            };
            // The answer is the thread as the reader now sees it (readSeq, unreadCount), so a
            // client updates its badge from it. The mark is stored either way: on a failed
            // read the receipt still goes out and the 503 is safe to retry.
            let answer = match store
                .thread(user, &ThreadRef::Id(marked.thread.clone()))
                .await
            {
                Ok(l) => lookup(l, THREAD_NOT_FOUND, |v| thread_body(Status::OK, &v)),
                Err(_) => store_unavailable(),
            };
            Executed {
                effects: vec![effect],
                ..answer
            }
        }
        RestOp::ListNotifications {
            unread_only,
            before,
            limit,
        } => {
            let p = store
                .notifications(user, unread_only, before, limit)
                .await?;
            Executed::ok(
                Status::OK,
                json::page(
                    "notifications",
                    &p.items,
                    |o| next(o, p.next),
                    json::notification,
                ),
            )
        }
        RestOp::NotificationRead { id } => lookup(
            // Another user's notification is NotFound (the store says so): ids are not
            // secrets, but nobody learns anything about another user's.
            store.notification_read(user, id).await?,
            "notification not found",
            |n| Executed::ok(Status::OK, json::body(|o| json::notification(o, &n))),
        ),
        RestOp::NotificationsReadAll => {
            let n = store.notifications_read_all(user).await?;
            Executed::ok(
                Status::OK,
                json::body(|o| {
                    o.u64("updated", n);
                }),
            )
        }
    })
}

/// The 400 of a caller-chosen thread `id` that is a UUID v5 other than the pair's own
/// conversation id.
pub const RESERVED_ID: &str = "id is reserved for direct conversations";

/// The id and kind of the thread `POST /threads` makes for `user` with `others` (the user
/// not among them): two people (or the user alone) without an `id`, or with exactly their
/// conversation id, make their direct conversation, the thread `message.send` derives, so REST
/// and the WebSocket name one conversation; anything else is a group. A UUID v5 `id` is the
/// namespace of derived conversation ids: only the pair's own is accepted, so nobody can
/// create (and read) a thread another pair's DMs would use.
fn thread_to_create(
    user: &str,
    id: Option<Arc<str>>,
    others: &[Arc<str>],
) -> Result<(Option<Arc<str>>, ThreadKind), RestError> {
    let pair = match others {
        [] => Some(derive_conversation_id(user, user)),
        [peer] => Some(derive_conversation_id(user, peer)),
        _ => None,
    };
    match (id, pair) {
        (None, Some(conv)) => Ok((Some(Arc::from(conv)), ThreadKind::Direct)),
        (Some(id), Some(conv)) if *id == *conv => Ok((Some(id), ThreadKind::Direct)),
        (Some(id), _) if is_v5(&id) => Err(RestError::bad(RESERVED_ID)),
        (id, _) => Ok((id, ThreadKind::Group)),
    }
}

/// Whether `id` parses as a UUID (any form the `uuid` crate reads) of version 5.
fn is_v5(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.get_version_num() == 5)
}

fn next(o: &mut crate::proto::envelope::Obj, next: Option<u64>) {
    o.opt_u64("next", next);
}

/// The `to` of a message into a direct thread: the other participant of a two-person thread,
/// the user of a thread with only themselves (as a DM to yourself).
fn recipient(user: &str, participants: &[Arc<str>]) -> Option<Arc<str>> {
    let distinct: HashSet<&str> = participants.iter().map(|p| &**p).collect();
    match participants {
        [only] if **only == *user => Some(only.clone()),
        [a, b] if distinct.len() == 2 && (**a == *user || **b == *user) => {
            Some(if **a == *user { b.clone() } else { a.clone() })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
