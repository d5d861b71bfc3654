//! The messaging REST API (`/api/v1/...`, docs/API.md): threads, messages, read state,
//! notifications and presence, for the frontends of the service Switchboard replaces.
//!
//! Sans-IO, in three parts that run in two places:
//! - **On the shard** that holds the HTTP connection: [`identify`] (the same JWT rules as the
//!   WebSocket upgrade, or the development identity of auth mode `none`), then [`parse`]
//!   (route, path ids, query, JSON body, every limit) into an [`Op`]. Presence ops are answered
//!   there from the node's directory ([`presence`]); store ops ([`RestOp`]) go to the bridge
//!   as a `StoreJob::Rest` and the connection waits for the answer.
//! - **On the bridge**, the one thread that owns the message store: [`execute`] runs a
//!   [`RestOp`] against a [`crate::store::Store`] and returns the status, the JSON body and the
//!   [`Effect`]s the bridge must carry out (a receipt to deliver, a message to append through
//!   the DM writer). [`http_response`] turns the result into the bytes for the connection.
//!
//! Owns: the route table of `/api/v1/`, request validation, the JSON shapes ([`json`]), the
//! status and text of every error. Must not touch: sockets, the shard's state, the store's
//! internals, the clock (`now` is an argument), logging (requests carry tokens).
//!
//! Every error is JSON `{"error":"<text>"}` with a text that says what to change; nothing here
//! answers 500.

mod auth;
mod exec;
pub mod json;
mod parse;
pub mod presence;

use std::borrow::Cow;
use std::sync::Arc;

use crate::http::{json_error_body, Status};
use crate::store::{MessageRef, ThreadRef};

pub use auth::{identify, Identity};
pub use exec::{
    execute, http_response, render_appended, render_message, store_unavailable, Effect, Executed,
};
pub use parse::{parse, ROUTES};

/// Every path of the REST API starts with this (the shard hands such requests here; the
/// server API for backends keeps the rest of `/api/`).
pub const PREFIX: &str = "/api/v1/";

/// Entries of a list when the request gives no `limit`.
pub const PAGE_LIMIT_DEFAULT: usize = 50;

/// The configured limits [`parse`] checks (the fixed ones are constants in `store` and
/// `limits`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `max_dm_content_bytes`: the longest message `content`, as for `message.send`.
    pub content_bytes_max: usize,
}

/// A parsed request: answered from the store (on the bridge) or from presence (here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Store(RestOp),
    Presence(PresenceOp),
}

/// A request the message store answers: one variant per endpoint, every field checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestOp {
    /// `GET /api/v1/messages/threads`: the user's threads, most recently active first.
    ListThreads { before: Option<u64>, limit: usize },
    /// `GET /api/v1/messages/threads/:threadId`.
    GetThread { thread: ThreadRef },
    /// `GET /api/v1/messages/threads/:threadId/messages`: newest first; `before` is a `seq`.
    ListMessages {
        thread: ThreadRef,
        before: Option<u64>,
        limit: usize,
    },
    /// `POST /api/v1/messages/threads`. `participants`: the others (deduplicated, in order;
    /// the creator may be listed, and is a participant anyway).
    CreateThread {
        id: Option<Arc<str>>,
        participants: Vec<Arc<str>>,
        title: Option<Arc<str>>,
    },
    /// `POST /api/v1/messages/threads/:threadId/messages`.
    SendMessage {
        thread: ThreadRef,
        /// May be empty when `attachment_url` is set.
        content: Arc<str>,
        attachment_url: Option<Arc<str>>,
        client_msg_id: Option<Arc<str>>,
    },
    /// `PUT /api/v1/messages/:messageId/read`.
    MarkRead { message: MessageRef },
    /// `GET /api/v1/notifications` (`?unread=true`: unread only); `before` is an id.
    ListNotifications {
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    },
    /// `PUT /api/v1/notifications/:id/read`.
    NotificationRead { id: u64 },
    /// `PUT /api/v1/notifications/read-all`.
    NotificationsReadAll,
}

/// A request answered from the node's presence state, on the shard that got it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceOp {
    /// `GET /api/v1/presence/online`: users who look online, by user id; `after` is the last
    /// user id of the previous page.
    Online {
        after: Option<Arc<str>>,
        limit: usize,
    },
    /// `GET /api/v1/presence/user/:userId`.
    User { user: Arc<str> },
}

/// A refused request: its status, the error text (JSON body `{"error": text}`), and for a
/// 405 the `Allow` header. The fault is the client's unless the status is 503.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestError {
    pub status: Status,
    pub text: Cow<'static, str>,
    pub allow: Option<String>,
}

impl RestError {
    pub fn new(status: Status, text: impl Into<Cow<'static, str>>) -> RestError {
        RestError {
            status,
            text: text.into(),
            allow: None,
        }
    }

    /// 400 with `text`: the request is malformed; change it as the text says.
    pub fn bad(text: impl Into<Cow<'static, str>>) -> RestError {
        RestError::new(Status::BAD_REQUEST, text)
    }

    /// `{"error":"<text>"}`.
    pub fn body(&self) -> Vec<u8> {
        json_error_body(&self.text)
    }
}
