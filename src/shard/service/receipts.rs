//! Receipts: `mark.delivered` / `mark.read` (PROTOCOL.md section 4). The reader tells the
//! author's devices which of the conversation's messages it got or read: every device of `to`
//! gets `message.delivered` / `message.read` `{conversationId, messageIds, by, at}`, and the
//! reader's other devices get the same frame (to clear their badges); never the sending
//! connection. No state: a receipt is checked, encoded once and handed to the delivery seam
//! ([`Target::User`]); the store records it afterwards ([`record`]). A receipt for an offline
//! user is lost live, and this form is never checked against the messages it names.
//!
//! Without `to`, a receipt names a stored conversation (`conversationId`) or only messages:
//! the bridge, which owns the store, checks it, relays it to the thread's participants and
//! records it (`crate::bridge::store::conv`); only the parse and the checks run here.
//!
//! The parts that need no shard ([`check_message_ids`]) are sans-IO and unit tested.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::Cmd;
use crate::bridge::store::StoreJob;
use crate::limits::ID_BYTES_MAX;
use crate::metrics::ErrorReason;
use crate::proto::envelope::non_empty;
use crate::proto::json::rfc3339_ms;
use crate::route::Target;
use crate::shard::Shard;
use crate::store::{Mark, MarkRequest, MessageRef, MARK_IDS_MAX};

#[derive(Deserialize)]
struct MarkCmd<'a> {
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(rename = "messageIds", borrow, default)]
    message_ids: Option<LazyValue<'a>>,
}

/// Why a `messageIds` value was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum IdsError {
    /// Not an array (the `invalid JSON format` of a field of the wrong type).
    NotArray,
    /// Absent, `null` or `[]`.
    Missing,
    /// More than the configured most.
    TooMany,
    /// An element that is not a string of 1 to 256 bytes nor an integer.
    BadElement,
}

impl IdsError {
    fn reply(&self) -> (ErrorReason, &'static str) {
        match self {
            IdsError::NotArray => (ErrorReason::InvalidJson, "invalid JSON format"),
            IdsError::Missing => (ErrorReason::BadRequest, "messageIds is required"),
            IdsError::TooMany => (ErrorReason::TooLarge, "too many messageIds"),
            IdsError::BadElement => (ErrorReason::BadRequest, BAD_ELEMENT),
        }
    }
}

/// The error text of [`IdsError::BadElement`].
pub const BAD_ELEMENT: &str = "messageIds must be strings of 1 to 256 bytes or integers";

/// Check a `messageIds` value (raw JSON, `None` when absent) holding at most `max` ids; returns
/// the raw array to copy through. Reads at most `max + 1` elements.
pub fn check_message_ids<'a>(
    v: Option<&'a LazyValue<'_>>,
    max: usize,
) -> Result<&'a str, IdsError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Err(IdsError::Missing);
    };
    if !v.is_array() {
        return Err(IdsError::NotArray);
    }
    let raw = v.as_raw_str();
    let mut n = 0usize;
    for item in sonic_rs::to_array_iter(raw) {
        // The whole message was validated as JSON before the handler ran.
        let Ok(item) = item else {
            return Err(IdsError::NotArray);
        };
        n += 1;
        if n > max {
            return Err(IdsError::TooMany);
        }
        let ok = match item.as_str() {
            Some(s) => (1..=ID_BYTES_MAX).contains(&s.len()),
            None => item.is_i64() || item.is_u64(),
        };
        if !ok {
            return Err(IdsError::BadElement);
        }
    }
    if n == 0 {
        return Err(IdsError::Missing);
    }
    Ok(raw)
}

pub fn delivered(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    mark(sh, slot, cmd, "message.delivered");
}

pub fn read(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    mark(sh, slot, cmd, "message.read");
}

fn mark(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>, kind: &str) {
    let id = cmd.id;
    let Some(m) = super::parse::<MarkCmd>(sh, slot, cmd) else {
        return;
    };
    let Some(user) = super::identity(sh, slot, id) else {
        return;
    };
    if m.to.is_none() {
        stored(sh, slot, cmd, &m, user, kind == "message.read");
        return;
    }
    let Some(to) = non_empty(&m.to).filter(|t| t.len() <= ID_BYTES_MAX) else {
        sh.send_error(slot, ErrorReason::BadRequest, id, "to is required", None);
        return;
    };
    if !super::policy::may_address(sh, slot, to) {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    }
    let derived;
    let conversation = match non_empty(&m.conversation_id) {
        Some(c) if c.len() <= ID_BYTES_MAX => c,
        Some(_) => {
            let text = "conversationId too long";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
        None => {
            derived = super::dm::derive_conversation_id(&user, to);
            &derived
        }
    };
    let ids = match check_message_ids(m.message_ids.as_ref(), sh.node.cfg.max_receipt_message_ids) {
        Ok(raw) => raw,
        Err(e) => {
            let (reason, text) = e.reply();
            sh.send_error(slot, reason, id, text, None);
            return;
        }
    };
    let now_ms = sh.now_ms;
    let at = rfc3339_ms(now_ms);
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", kind)
            .obj("data", |d| {
                d.str("conversationId", conversation)
                    .raw("messageIds", ids)
                    .str("by", &user)
                    .str("at", &at);
            })
            .u64("timestamp", now_ms);
    });
    let me = sh.conn_ref(slot);
    let to_self = *user == *to;
    let mut missed = sh
        .deliver(
            &Target::User {
                user: Arc::from(to),
                except: to_self.then_some(me),
            },
            &f,
        )
        .shards;
    if !to_self {
        missed |= sh
            .deliver(
                &Target::User {
                    user: user.clone(),
                    except: Some(me),
                },
                &f,
            )
            .shards;
    }
    sh.out.stats.receipts_sent += 1;
    record(sh, &user, conversation, ids, kind == "message.read");
    if missed != 0 {
        // Some device could not be reached (a shard inbox full). A receipt is idempotent:
        // the client may send it again, and a device that got it twice changes nothing.
        let text = "server busy, retry later";
        sh.send_error(slot, ErrorReason::Busy, id, text, None);
    }
}

/// A receipt without `to`: to a stored conversation (`conversationId`, text or numeric id), or
/// (neither) to the conversation of the named messages; the bridge checks it against the store
/// and relays it to the participants ([`crate::bridge::store::conv`]).
fn stored(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>, m: &MarkCmd<'_>, user: Arc<str>, read: bool) {
    let id = cmd.id;
    let conversation = match non_empty(&m.conversation_id) {
        Some(c) if c.len() <= ID_BYTES_MAX => Some(c),
        Some(_) => {
            let text = "conversationId too long";
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
        None => None,
    };
    // Naming only messages, each id is looked up: at most one mark job's worth.
    let max = match conversation {
        Some(_) => sh.node.cfg.max_receipt_message_ids,
        None => sh.node.cfg.max_receipt_message_ids.min(MARK_IDS_MAX),
    };
    let ids = match check_message_ids(m.message_ids.as_ref(), max) {
        Ok(raw) => raw,
        Err(e) => {
            let (reason, text) = e.reply();
            sh.send_error(slot, reason, id, text, None);
            return;
        }
    };
    let origin = sh.conn_ref(slot);
    let job = match conversation {
        Some(c) => StoreJob::Conversation(Box::new(crate::bridge::store::ConvJob {
            origin,
            user,
            conversation: Arc::from(c),
            what: crate::bridge::store::ConvEvent::Receipt {
                read,
                id: id.map(Box::from),
                ids_raw: Box::from(ids),
                at_ms: sh.now_ms,
            },
        })),
        None => StoreJob::MarkByMessages {
            origin,
            id: id.map(Box::from),
            user,
            read,
            ids_raw: Box::from(ids),
            at_ms: sh.now_ms,
        },
    };
    if sh.hand_to_store(job) {
        sh.out.stats.receipts_sent += 1;
    } else {
        let text = "server busy, retry later";
        sh.send_error(slot, ErrorReason::Busy, id, text, None);
    }
}

/// Record the receipt in the message store (its read state and unread counts), in jobs of at
/// most [`MARK_IDS_MAX`] ids. Ids that name no stored message (a client's own ids) are skipped
/// there; a full bridge inbox loses only the stored state, never the live receipt.
fn record(sh: &mut Shard, user: &Arc<str>, conversation: &str, raw_ids: &str, read: bool) {
    let mut refs = Vec::new();
    for item in sonic_rs::to_array_iter(raw_ids).flatten() {
        let r = match item.as_str() {
            Some(s) => MessageRef::parse(s),
            None => item.as_u64().map(MessageRef::Number),
        };
        refs.extend(r);
    }
    let thread: Arc<str> = Arc::from(conversation);
    for chunk in refs.chunks(MARK_IDS_MAX) {
        let job = StoreJob::Mark(MarkRequest {
            user: user.clone(),
            mark: if read { Mark::Read } else { Mark::Delivered },
            thread: Some(thread.clone()),
            messages: chunk.to_vec(),
            at_ms: sh.now_ms,
        });
        // A full inbox loses only the stored state (counted), never the live receipt.
        sh.hand_to_store(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, max: usize) -> Result<String, IdsError> {
        #[derive(Deserialize)]
        struct W<'a> {
            #[serde(borrow, default)]
            ids: Option<LazyValue<'a>>,
        }
        let w: W = sonic_rs::from_str(json).expect("test JSON");
        check_message_ids(w.ids.as_ref(), max).map(str::to_owned)
    }

    #[test]
    fn message_ids_copied_through() {
        assert_eq!(
            check(r#"{"ids":["m1",2,"m-3"]}"#, 3).unwrap(),
            r#"["m1",2,"m-3"]"#
        );
        assert_eq!(
            check(r#"{"ids":[ "a\"b" , -5 ]}"#, 10).unwrap(),
            r#"[ "a\"b" , -5 ]"#
        );
        assert_eq!(
            check(r#"{"ids":[18446744073709551615]}"#, 1).unwrap(),
            "[18446744073709551615]"
        );
        let longest = format!(r#"{{"ids":["{}"]}}"#, "x".repeat(ID_BYTES_MAX));
        assert!(check(&longest, 1).is_ok());
    }

    #[test]
    fn message_ids_refused() {
        assert_eq!(check("{}", 5), Err(IdsError::Missing));
        assert_eq!(check(r#"{"ids":null}"#, 5), Err(IdsError::Missing));
        assert_eq!(check(r#"{"ids":[]}"#, 5), Err(IdsError::Missing));
        assert_eq!(check(r#"{"ids":"m1"}"#, 5), Err(IdsError::NotArray));
        assert_eq!(check(r#"{"ids":{"a":1}}"#, 5), Err(IdsError::NotArray));
        assert_eq!(check(r#"{"ids":[1,2,3]}"#, 2), Err(IdsError::TooMany));
        for bad in [
            r#"[""]"#,
            "[1.5]",
            "[1e3]",
            "[true]",
            "[null]",
            "[[1]]",
            r#"[{"id":1}]"#,
        ] {
            assert_eq!(
                check(&format!(r#"{{"ids":{bad}}}"#), 5),
                Err(IdsError::BadElement),
                "{bad}"
            );
        }
        let too_long = format!(r#"{{"ids":["{}"]}}"#, "x".repeat(ID_BYTES_MAX + 1));
        assert_eq!(check(&too_long, 1), Err(IdsError::BadElement));
        // The count stops the scan: a huge array is refused after max + 1 elements.
        let huge = format!(r#"{{"ids":[{}]}}"#, vec!["1"; 10_000].join(","));
        assert_eq!(check(&huge, 100), Err(IdsError::TooMany));
    }
}
