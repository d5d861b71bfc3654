//! A coarse timer wheel keyed by what it times: `TIMER_SLOTS` slots of `TIMER_TICK_MS`.
//! An entry is a [`TimerKey`]: a connection (slot, generation), or a service's own key (a
//! typing state per (connection, target), a call's ring timeout). Whoever owns the key
//! re-checks its own deadline when the entry fires, so cancelling is free (stale entries are
//! skipped) and deadlines past the horizon simply go round again. An entry is 16 bytes;
//! bounded by what the owners schedule: at most one live entry per connection deadline
//! (`Client::deadline_tick` dedups them) and per service key (each service bounds its keys).

use crate::limits::TIMER_SLOTS;

/// What a wheel entry times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKey {
    /// A connection's own deadline (handshake, auth, ping/pong, write stall, token expiry).
    Conn { slot: u32, gen: u32 },
    /// A service's key, interpreted by that service (`service::on_timer`).
    Service { service: u8, key: u64 },
}

pub struct Wheel {
    slots: Vec<Vec<TimerKey>>,
    now: u32,
}

impl Wheel {
    pub fn new(now: u32) -> Wheel {
        Wheel {
            slots: (0..TIMER_SLOTS).map(|_| Vec::new()).collect(),
            now,
        }
    }

    /// Schedule `key` at `tick` (at the earliest the next tick). Returns the tick used.
    pub fn schedule(&mut self, tick: u32, key: TimerKey) -> u32 {
        let tick = tick.max(self.now.wrapping_add(1));
        self.slots[tick as usize % TIMER_SLOTS].push(key);
        tick
    }

    /// Move time to `to`, appending every entry in the passed slots to `out`.
    pub fn advance(&mut self, to: u32, out: &mut Vec<TimerKey>) {
        let steps = to.saturating_sub(self.now).min(TIMER_SLOTS as u32);
        for _ in 0..steps {
            self.now = self.now.wrapping_add(1);
            // Take the Vec so its buffer is freed: a slot that once held a burst of entries
            // must not keep that capacity for every later lap (churn showed steady RSS creep).
            let mut due = std::mem::take(&mut self.slots[self.now as usize % TIMER_SLOTS]);
            out.append(&mut due);
        }
        self.now = self.now.max(to);
    }

    #[cfg(test)]
    pub fn now(&self) -> u32 {
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_small() {
        assert_eq!(std::mem::size_of::<TimerKey>(), 16);
    }

    #[test]
    fn fires_in_order_and_wraps() {
        let conn = |slot| TimerKey::Conn { slot, gen: 0 };
        let svc = TimerKey::Service {
            service: 1,
            key: 42,
        };
        let mut w = Wheel::new(0);
        assert_eq!(w.schedule(0, conn(1)), 1);
        w.schedule(5, conn(2));
        w.schedule(5, svc);
        w.schedule(5 + TIMER_SLOTS as u32, conn(3)); // a lap later: fires early, the owner re-checks
        let mut out = Vec::new();
        w.advance(4, &mut out);
        assert_eq!(out, vec![conn(1)]);
        out.clear();
        w.advance(5, &mut out);
        assert_eq!(out, vec![conn(2), svc, conn(3)]);
        out.clear();
        w.advance(100_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(w.now(), 100_000);
    }
}
