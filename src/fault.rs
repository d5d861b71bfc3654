//! Test-only fault injection, so the integration tests can make the rare failures happen on
//! purpose (a full shard inbox, a shard thread dying, a bug inside one command). Set by the
//! environment variable `SWITCHBOARD_TEST_FAULT`, read once at start; unset (every real
//! deployment) it is all `None` and costs one predictable branch where it is checked, never on
//! the per-recipient path. Comma-separated entries:
//! - `refuse_deliveries:S:N`: the first N deliveries queued for shard S fail as if its inbox
//!   were full;
//! - `shard_panic_after:S:MS`: shard S panics MS milliseconds after it starts;
//! - `panic_on_command:TYPE`: handling a client command of type TYPE panics (inside the
//!   command: the connection is closed with 1011, the shard goes on);
//! - `refuse_bridge_presence:N`: the first N presence changes a shard hands the bridge fail as
//!   if the bridge's inbox were full;
//! - `refuse_bridge_room_presence:N`: the same for the first N room presence changes (first
//!   tries only: a change the shard hands again is not refused);
//! - `drop_call_held:N`: the first N call confirmations (`CALL_HELD`) other nodes send this
//!   node are dropped on arrival, as if lost on the way;
//! - `subscriber_panic_on:TEXT`: on a Redis Cluster, a master's subscriber task panics once,
//!   right after that master confirmed a channel whose name contains TEXT (the task's
//!   supervisor starts it again).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The environment variable that carries the faults.
pub const ENV: &str = "SWITCHBOARD_TEST_FAULT";

#[derive(Debug, Default)]
pub struct Faults {
    pub refuse_deliveries: Option<(usize, AtomicU32)>,
    pub shard_panic_after: Option<(usize, u64)>,
    pub panic_on_command: Option<String>,
    pub refuse_bridge_presence: Option<AtomicU32>,
    pub refuse_bridge_room_presence: Option<AtomicU32>,
    pub drop_call_held: Option<AtomicU32>,
    /// The channel text and whether the panic is still to come.
    pub subscriber_panic_on: Option<(String, AtomicBool)>,
}

impl Faults {
    pub fn from_env() -> Faults {
        std::env::var(ENV)
            .map(|v| Faults::parse(&v))
            .unwrap_or_default()
    }

    pub fn parse(spec: &str) -> Faults {
        let mut f = Faults::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let parts: Vec<&str> = entry.split(':').collect();
            match parts.as_slice() {
                ["refuse_deliveries", s, n] => {
                    if let (Ok(s), Ok(n)) = (s.parse(), n.parse()) {
                        f.refuse_deliveries = Some((s, AtomicU32::new(n)));
                    }
                }
                ["shard_panic_after", s, ms] => {
                    if let (Ok(s), Ok(ms)) = (s.parse(), ms.parse()) {
                        f.shard_panic_after = Some((s, ms));
                    }
                }
                ["panic_on_command", t] => f.panic_on_command = Some((*t).to_owned()),
                ["refuse_bridge_presence", n] => {
                    if let Ok(n) = n.parse() {
                        f.refuse_bridge_presence = Some(AtomicU32::new(n));
                    }
                }
                ["subscriber_panic_on", t] => {
                    f.subscriber_panic_on = Some(((*t).to_owned(), AtomicBool::new(true)));
                }
                ["drop_call_held", n] => {
                    if let Ok(n) = n.parse() {
                        f.drop_call_held = Some(AtomicU32::new(n));
                    }
                }
                ["refuse_bridge_room_presence", n] => {
                    if let Ok(n) = n.parse() {
                        f.refuse_bridge_room_presence = Some(AtomicU32::new(n));
                    }
                }
                _ => eprintln!("{ENV}: ignoring unknown fault {entry:?}"),
            }
        }
        f
    }

    /// Whether a delivery queued for `shard` must fail now (and count it).
    pub fn refuse_delivery(&self, shard: usize) -> bool {
        match &self.refuse_deliveries {
            Some((s, left)) if *s == shard => left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok(),
            _ => false,
        }
    }

    /// Whether a presence change for the bridge must fail now (and count it).
    pub fn refuse_bridge_presence(&self) -> bool {
        count_down(&self.refuse_bridge_presence)
    }

    /// Whether a cluster subscriber that just subscribed `channels` must panic now (once).
    pub fn subscriber_panic(&self, channels: &[std::sync::Arc<str>]) -> bool {
        self.subscriber_panic_on.as_ref().is_some_and(|(t, left)| {
            channels.iter().any(|c| c.contains(t.as_str())) && left.swap(false, Ordering::AcqRel)
        })
    }

    /// Whether a call confirmation from another node must be dropped now (and count it).
    pub fn drop_call_held(&self) -> bool {
        count_down(&self.drop_call_held)
    }

    /// Whether a room presence change for the bridge must fail now (and count it).
    pub fn refuse_bridge_room_presence(&self) -> bool {
        count_down(&self.refuse_bridge_room_presence)
    }

    pub fn is_active(&self) -> bool {
        self.refuse_bridge_presence.is_some()
            || self.refuse_bridge_room_presence.is_some()
            || self.drop_call_held.is_some()
            || self.subscriber_panic_on.is_some()
            || self.refuse_deliveries.is_some()
            || self.shard_panic_after.is_some()
            || self.panic_on_command.is_some()
    }
}

/// Take one from `left` (false once it is at zero, or unset).
fn count_down(left: &Option<AtomicU32>) -> bool {
    left.as_ref().is_some_and(|left| {
        left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts_down() {
        let f =
            Faults::parse("refuse_deliveries:1:2, shard_panic_after:0:500,panic_on_command:x.y");
        assert!(f.is_active());
        assert_eq!(f.shard_panic_after, Some((0, 500)));
        assert_eq!(f.panic_on_command.as_deref(), Some("x.y"));
        assert!(!f.refuse_delivery(0));
        assert!(f.refuse_delivery(1));
        assert!(f.refuse_delivery(1));
        assert!(!f.refuse_delivery(1));
        assert!(!Faults::parse("").is_active());
        let f = Faults::parse("refuse_bridge_presence:1");
        assert!(f.is_active());
        assert!(f.refuse_bridge_presence());
        assert!(!f.refuse_bridge_presence());
        let f = Faults::parse("refuse_bridge_room_presence:1");
        assert!(f.is_active() && !f.refuse_bridge_presence());
        assert!(f.refuse_bridge_room_presence());
        assert!(!f.refuse_bridge_room_presence());
        let f = Faults::parse("drop_call_held:1");
        assert!(f.is_active() && f.drop_call_held() && !f.drop_call_held());
        let f = Faults::parse("subscriber_panic_on:boom");
        let (quiet, boom): (Vec<std::sync::Arc<str>>, _) =
            (vec!["a".into()], vec!["x{boom}".into()]);
        assert!(f.is_active() && !f.subscriber_panic(&quiet));
        assert!(f.subscriber_panic(&boom));
        assert!(!f.subscriber_panic(&boom));
    }
}
