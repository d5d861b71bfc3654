//! Per-room options by name pattern (Centrifugo calls these namespaces): the `rooms` config key,
//! a list of `{pattern, ordered, history_size, history_ttl, join_leave, presence}` maps. The
//! first pattern (a glob: `*` any run, `?` one character) that matches a room's name gives its
//! options; a room no pattern matches gets the defaults (everything off), so a `pattern: "*"`
//! entry last is the configurable default.
//!
//! ```yaml
//! rooms:
//!   - pattern: "chat-*"
//!     history_size: 100
//!     history_ttl: 10m
//!     join_leave: true
//!   - pattern: "ticker.*"
//!     ordered: true
//! ```
//!
//! Looked up once per room per shard (when the shard's first subscriber joins), never per
//! message: the shard keeps the index in its room table.

use std::time::Duration;

use serde_norway::Value;

/// Most entries in `rooms` (a lookup walks them in order once per new room on a shard).
pub const ROOM_PATTERNS_MAX: usize = 256;
/// Most messages kept per room (`history_size`).
pub const HISTORY_SIZE_MAX: u32 = 100_000;
/// Longest `history_ttl` (30 days; beyond it a room's history is bounded by its size anyway).
pub const HISTORY_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// The options of the rooms one pattern matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomOptions {
    pub pattern: String,
    /// Publishes go through the room's owner shard, so every shard sees one order. Implied by
    /// history (offsets are assigned there) and by room presence.
    pub ordered: bool,
    /// Messages kept for resume; 0 = no history, no `offset` on messages.
    pub history_size: u32,
    /// How long a message stays in history; zero = until pushed out by `history_size`.
    pub history_ttl: Duration,
    /// Send `presence.join` / `presence.leave` on a user's first device in / last out.
    pub join_leave: bool,
    /// Answer `presence.query {room}` (room presence is tracked). Implied by `join_leave`.
    pub presence: bool,
}

impl RoomOptions {
    /// Whether publishes into these rooms are sequenced by the owner shard.
    pub fn sequenced(&self) -> bool {
        self.ordered || self.history_size > 0 || self.tracks_presence()
    }

    /// Whether room presence (who is in the room) is tracked.
    pub fn tracks_presence(&self) -> bool {
        self.presence || self.join_leave
    }
}

/// The options for rooms no pattern matches: everything off.
pub static DEFAULT: RoomOptions = RoomOptions {
    pattern: String::new(),
    ordered: false,
    history_size: 0,
    history_ttl: Duration::ZERO,
    join_leave: false,
    presence: false,
};

/// The index of the options for `room`: 0 = [`DEFAULT`], i + 1 = `list[i]`.
pub fn index_for(list: &[RoomOptions], room: &str) -> u16 {
    list.iter()
        .position(|o| crate::auth::glob_match(&o.pattern, room))
        .map_or(0, |i| (i + 1) as u16)
}

/// The options at `index` (from [`index_for`]).
pub fn at(list: &[RoomOptions], index: u16) -> &RoomOptions {
    match index {
        0 => &DEFAULT,
        i => list.get(i as usize - 1).unwrap_or(&DEFAULT),
    }
}

/// Parse the `rooms` value: a list of maps.
pub fn parse(v: &Value) -> Result<Vec<RoomOptions>, String> {
    const EXPECTED: &str = "a list of maps with `pattern` and any of ordered, history_size, history_ttl, join_leave, presence";
    let items = match v {
        Value::Sequence(items) => items,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(EXPECTED.into()),
    };
    if items.len() > ROOM_PATTERNS_MAX {
        return Err(format!(
            "at most {ROOM_PATTERNS_MAX} entries, got {}",
            items.len()
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Mapping(map) = item else {
            return Err(format!("entry {i}: {EXPECTED}"));
        };
        let mut o = RoomOptions::default();
        let mut has_pattern = false;
        for (k, val) in map {
            let Value::String(k) = k else {
                return Err(format!("entry {i}: keys must be strings"));
            };
            let at = |what: &str| format!("entry {i} ({k}): expected {what}");
            match k.as_str() {
                "pattern" => match val {
                    Value::String(p) if !p.is_empty() && p.len() <= 256 => {
                        o.pattern = p.clone();
                        has_pattern = true;
                    }
                    _ => return Err(at("a glob of 1 to 256 bytes")),
                },
                "ordered" => o.ordered = bool_of(val).ok_or_else(|| at("true or false"))?,
                "join_leave" => o.join_leave = bool_of(val).ok_or_else(|| at("true or false"))?,
                "presence" => o.presence = bool_of(val).ok_or_else(|| at("true or false"))?,
                "history_size" => {
                    let n = val
                        .as_u64()
                        .filter(|n| *n <= HISTORY_SIZE_MAX as u64)
                        .ok_or_else(|| at(&format!("a count from 0 to {HISTORY_SIZE_MAX}")))?;
                    o.history_size = n as u32;
                }
                "history_ttl" => {
                    o.history_ttl = match val {
                        Value::String(s) => {
                            crate::config::parse_duration(s).map_err(|e| at(&e))?
                        }
                        Value::Number(n) => Duration::from_secs(
                            n.as_u64().ok_or_else(|| at("a duration such as 10m"))?,
                        ),
                        _ => return Err(at("a duration such as 10m")),
                    };
                    if o.history_ttl > HISTORY_TTL_MAX {
                        return Err(at("a duration of at most 30 days"));
                    }
                }
                other => {
                    return Err(format!(
                        "entry {i}: unknown key `{other}` (known: pattern, ordered, history_size, history_ttl, join_leave, presence)"
                    ))
                }
            }
        }
        if !has_pattern {
            return Err(format!("entry {i}: `pattern` is required"));
        }
        out.push(o);
    }
    Ok(out)
}

fn bool_of(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_norway::from_str(s).unwrap()
    }

    #[test]
    fn first_match_wins_and_unmatched_rooms_get_the_defaults() {
        let list = parse(&yaml(
            "- pattern: chat-*\n  history_size: 100\n  history_ttl: 10m\n  join_leave: true\n- pattern: '*'\n  ordered: true\n",
        ))
        .unwrap();
        let i = index_for(&list, "chat-1");
        let o = at(&list, i);
        assert_eq!(o.history_size, 100);
        assert_eq!(o.history_ttl, Duration::from_secs(600));
        assert!(o.join_leave && o.tracks_presence() && o.sequenced());
        let o = at(&list, index_for(&list, "other"));
        assert!(o.ordered && o.sequenced() && !o.tracks_presence());
        assert_eq!(at(&[], index_for(&[], "x")), &DEFAULT);
        assert!(!DEFAULT.sequenced());
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for (bad, why) in [
            ("- history_size: 3", "pattern"),
            (
                "- pattern: a\n  histroy_size: 3",
                "unknown key `histroy_size`",
            ),
            ("- pattern: a\n  history_size: -1", "history_size"),
            ("- pattern: a\n  history_size: 100001", "history_size"),
            ("- pattern: a\n  join_leave: maybe", "join_leave"),
            ("- pattern: a\n  history_ttl: soon", "history_ttl"),
            ("- pattern: a\n  history_ttl: 800h", "at most 30 days"),
            ("pattern: a", "list of maps"),
        ] {
            let e = parse(&yaml(bad)).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
