//! A coarse timer wheel keyed by what it times: `TIMER_SLOTS` slots of `TIMER_TICK_MS`.
//! An entry is a [`TimerKey`]: a connection (slot, generation), or a service's own key (a
//! typing state per (connection, target), a call's ring timeout). Whoever owns the key
//! re-checks its own deadline when the entry fires, so cancelling is free (stale entries are
//! skipped) and deadlines past the horizon simply go round again. An entry is 8 bytes, as
//! the (slot, generation) pair it replaced: every connection keeps one or two entries in the
//! wheel, so 16-byte entries measured +16 B of RSS per idle connection at 19,500. Bounded by
//! what the owners schedule: at most one live entry per connection deadline
//! (`Client::deadline_tick` dedups them) and per service key (each service bounds its keys).

use crate::limits::TIMER_SLOTS;

/// What a wheel entry times, packed in 8 bytes: bit 63 clear = a connection (slot in bits
/// 32..63, generation in bits 0..32), set = a service (id in bits 56..63, key in bits 0..56).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TimerKey(u64);

/// A [`TimerKey`] unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A connection's own deadline (handshake, auth, ping/pong, write stall, token expiry).
    Conn { slot: u32, gen: u32 },
    /// A service's key, interpreted by that service (`service::on_timer`).
    Service { service: u8, key: u64 },
}

const SERVICE_BIT: u64 = 1 << 63;
/// Largest connection slot a timer key holds (the shard refuses slots above it).
pub const SLOT_MAX: u32 = (1 << 31) - 1;
/// Largest service key (56 bits: e.g. a 32-bit slab index and a 24-bit generation).
pub const SERVICE_KEY_MAX: u64 = (1 << 56) - 1;

impl TimerKey {
    pub fn conn(slot: u32, gen: u32) -> TimerKey {
        debug_assert!(slot <= SLOT_MAX);
        TimerKey(((slot as u64 & SLOT_MAX as u64) << 32) | gen as u64)
    }

    /// `service` < 128; `key` <= [`SERVICE_KEY_MAX`] (higher bits are dropped).
    pub fn service(service: u8, key: u64) -> TimerKey {
        debug_assert!(service < 128 && key <= SERVICE_KEY_MAX);
        TimerKey(SERVICE_BIT | ((service as u64 & 0x7f) << 56) | (key & SERVICE_KEY_MAX))
    }

    pub fn get(self) -> Timer {
        if self.0 & SERVICE_BIT == 0 {
            Timer::Conn {
                slot: (self.0 >> 32) as u32,
                gen: self.0 as u32,
            }
        } else {
            Timer::Service {
                service: ((self.0 >> 56) & 0x7f) as u8,
                key: self.0 & SERVICE_KEY_MAX,
            }
        }
    }
}

impl std::fmt::Debug for TimerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
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
    fn keys_pack_into_eight_bytes() {
        assert_eq!(std::mem::size_of::<TimerKey>(), 8);
        for (slot, gen) in [(0, 0), (SLOT_MAX, u32::MAX), (12345, 1)] {
            assert_eq!(TimerKey::conn(slot, gen).get(), Timer::Conn { slot, gen });
        }
        for (service, key) in [(0, 0), (127, SERVICE_KEY_MAX), (3, 42)] {
            assert_eq!(
                TimerKey::service(service, key).get(),
                Timer::Service { service, key }
            );
        }
    }

    #[test]
    fn fires_in_order_and_wraps() {
        let conn = |slot| TimerKey::conn(slot, 0);
        let svc = TimerKey::service(1, 42);
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
