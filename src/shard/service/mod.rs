//! Service modules: one per capability (`rooms`, `dm`, `session` today), each owning its
//! state in side tables keyed by connection, each with the same small set of entry points:
//! - commands: rows of [`COMMANDS`] (a type name and a handler that parses its own typed
//!   struct from the message text);
//! - `on_msg`: a [`ServiceMsg`] from another shard or the bridge;
//! - `on_timer`: a wheel entry with the service's own key ([`Shard::schedule_service`]);
//! - `on_attach` / `on_detach`: a connection got its identity / stops being a participant.
//!
//! Everything a service sends goes through the delivery seam ([`Shard::deliver`] with a
//! [`Target`]) or is a reply ([`Shard::reply`], [`Shard::send_error`]).
//!
//! Adding a relayed command type: write its handler in its service module (parse, check,
//! encode once, `deliver`), add one row to [`COMMANDS`], document it in docs/PROTOCOL.md.

pub mod api;
pub mod calls;
pub mod dm;
pub mod history;
pub mod policy;
pub mod presence;
pub mod receipts;
pub mod rooms;
pub mod session;
pub mod typing;

use std::collections::HashMap;
use std::sync::LazyLock;

use super::Shard;

/// A command as the dispatcher hands it to a handler.
pub struct Cmd<'a> {
    /// The `type` value.
    pub kind: &'a str,
    /// The correlation id (raw JSON), copied into the reply or error.
    pub id: Option<&'a str>,
    /// The whole message text, for the handler's own typed parse.
    pub text: &'a [u8],
}

/// A command's own fields parsed from its text, or `invalid JSON format` sent (a field the
/// command reads has the wrong JSON type) and `None`.
pub fn parse<'a, T: serde::Deserialize<'a>>(sh: &mut Shard, slot: u32, cmd: &Cmd<'a>) -> Option<T> {
    let parsed = crate::proto::envelope::parse_as::<T>(cmd.text);
    if parsed.is_none() {
        sh.send_error(
            slot,
            crate::metrics::ErrorReason::InvalidJson,
            cmd.id,
            "invalid JSON format",
            None,
        );
    }
    parsed
}

/// The connection's user id, or `not allowed` sent and `None` (for the commands between
/// identified users: direct messages, typing, receipts, presence, calls).
pub fn identity(sh: &mut Shard, slot: u32, id: Option<&str>) -> Option<std::sync::Arc<str>> {
    let user = sh.clients[slot as usize].user.clone();
    if user.is_none() {
        sh.send_error(
            slot,
            crate::metrics::ErrorReason::NotAllowed,
            id,
            "not allowed",
            None,
        );
    }
    user
}

/// A command handler: `(shard, connection slot, command)`.
pub type Handler = fn(&mut Shard, u32, &Cmd<'_>);

/// The command table: `type` -> handler. One row per client command type.
pub static COMMANDS: &[(&str, Handler)] = &[
    // ---- rooms
    ("subscribe", rooms::subscribe),
    ("unsubscribe", rooms::unsubscribe),
    ("publish", rooms::publish),
    ("broadcast", rooms::broadcast),
    // ---- direct messages
    ("message.send", dm::send),
    ("sync", dm::sync),
    // ---- session
    ("ping", session::ping),
    ("authenticate", session::authenticate),
    // ---- typing and receipts
    ("typing.start", typing::start),
    ("typing.stop", typing::stop),
    ("mark.delivered", receipts::delivered),
    ("mark.read", receipts::read),
    // ---- presence
    ("presence.update", presence::update),
    ("presence.watch", presence::watch),
    ("presence.unwatch", presence::unwatch),
    ("presence.query", presence::query),
    // ---- calls
    ("call.offer", calls::offer),
    ("call.answer", calls::answer),
    ("call.ice", calls::ice),
    ("call.hangup", calls::hangup),
];

static TABLE: LazyLock<HashMap<&'static str, Handler>> = LazyLock::new(|| {
    let map: HashMap<_, _> = COMMANDS.iter().copied().collect();
    assert_eq!(map.len(), COMMANDS.len(), "a command type is listed twice");
    map
});

/// The handler for a command type.
pub fn handler(kind: &str) -> Option<Handler> {
    TABLE.get(kind).copied()
}

/// Messages for one service from another shard or the bridge.
pub enum ServiceMsg {
    Rooms(rooms::Msg),
    Api(api::Msg),
    // ---- typing and receipts
    Typing(typing::Msg),
    // ---- presence
    Presence(presence::Msg),
    // ---- calls
    Calls(Box<calls::Msg>),
}

/// Service ids in wheel keys ([`super::TimerKey::Service`]): one constant per service that
/// schedules timers (none of today's services does; typing TTLs and call ring timeouts will).
pub mod id {
    /// Rooms: the retry of subscribe answers an inbox could not take.
    pub const ROOMS: u8 = 4;
    // ---- typing and receipts
    /// Typing states' TTLs (key: [`super::typing::Table`]'s slab index and serial).
    pub const TYPING: u8 = 1;
    // ---- presence
    /// Offline grace timers (key = the owner's per-user key) and the owed-report retry (key 0).
    pub const PRESENCE: u8 = 2;
    // ---- calls
    /// Call ring timeouts (key: the call's slab index and generation on its owner shard).
    pub const CALLS: u8 = 3;
}

pub fn on_msg(sh: &mut Shard, m: ServiceMsg) {
    match m {
        ServiceMsg::Rooms(m) => rooms::on_msg(sh, m),
        ServiceMsg::Api(m) => api::on_msg(sh, m),
        // ---- typing and receipts
        ServiceMsg::Typing(m) => typing::on_msg(sh, m),
        // ---- presence
        ServiceMsg::Presence(m) => presence::on_msg(sh, m),
        // ---- calls
        ServiceMsg::Calls(m) => calls::on_msg(sh, *m),
    }
}

pub fn on_timer(sh: &mut Shard, service: u8, key: u64) {
    #[allow(clippy::match_single_binding)]
    match service {
        id::ROOMS => rooms::on_timer(sh, key),
        // ---- typing and receipts
        id::TYPING => typing::on_timer(sh, key),
        // ---- presence
        id::PRESENCE => presence::on_timer(sh, key),
        // ---- calls
        id::CALLS => calls::on_timer(sh, key),
        _ => {
            let _ = (sh, key);
            debug_assert!(false, "timer for unknown service {service}");
        }
    }
}

/// A connection got its identity (user id set; the directory knows the device).
pub fn on_attach(sh: &mut Shard, slot: u32) {
    // ---- presence
    presence::on_attach(sh, slot);
}

/// A connection stops being a participant (closing or closed): end its service state.
pub fn on_detach(sh: &mut Shard, slot: u32) {
    rooms::on_detach(sh, slot);
    // ---- typing and receipts
    typing::on_detach(sh, slot);
    // ---- presence
    presence::on_detach(sh, slot);
    // ---- calls
    calls::on_detach(sh, slot);
}

/// A connection with an identity joined `room` (`opts`: the room's options index). Rooms
/// that track presence (`room_options::RoomOptions::tracks_presence`) are what presence acts on.
pub fn on_room_joined(sh: &mut Shard, slot: u32, room: &std::sync::Arc<str>, opts: u16) {
    // ---- presence
    presence::on_room_joined(sh, slot, room, opts);
}

/// A connection with an identity left `room` (unsubscribe, a narrower claim, or detach).
pub fn on_room_left(sh: &mut Shard, slot: u32, room: &std::sync::Arc<str>, opts: u16) {
    // ---- presence
    presence::on_room_left(sh, slot, room, opts);
}

/// The side tables of every service on one shard.
#[derive(Default)]
pub struct Services {
    pub rooms: rooms::State,
    // ---- typing and receipts
    pub typing: typing::Table,
    // ---- presence
    pub presence: presence::State,
    // ---- calls
    pub calls: calls::State,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_one_row() {
        for (kind, _) in COMMANDS {
            assert!(handler(kind).is_some(), "{kind}");
        }
        assert!(handler("dance").is_none());
        assert_eq!(TABLE.len(), COMMANDS.len());
    }
}
