//! A coarse timer wheel: `TIMER_SLOTS` slots of `TIMER_TICK_MS`. Entries are (slot, generation)
//! pairs; the shard re-checks the client's own deadline when an entry fires, so cancelling is
//! free (stale entries are skipped) and deadlines past the horizon simply go round again.

use crate::limits::TIMER_SLOTS;

pub struct Wheel {
    slots: Vec<Vec<(u32, u32)>>,
    now: u32,
}

impl Wheel {
    pub fn new(now: u32) -> Wheel {
        Wheel {
            slots: (0..TIMER_SLOTS).map(|_| Vec::new()).collect(),
            now,
        }
    }

    /// Schedule `(slot, gen)` at `tick` (at the earliest the next tick). Returns the tick used.
    pub fn schedule(&mut self, tick: u32, slot: u32, gen: u32) -> u32 {
        let tick = tick.max(self.now.wrapping_add(1));
        self.slots[tick as usize % TIMER_SLOTS].push((slot, gen));
        tick
    }

    /// Move time to `to`, appending every entry in the passed slots to `out`.
    pub fn advance(&mut self, to: u32, out: &mut Vec<(u32, u32)>) {
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
    fn fires_in_order_and_wraps() {
        let mut w = Wheel::new(0);
        assert_eq!(w.schedule(0, 1, 0), 1);
        w.schedule(5, 2, 0);
        w.schedule(5 + TIMER_SLOTS as u32, 3, 0); // a lap later: fires early, the shard re-checks
        let mut out = Vec::new();
        w.advance(4, &mut out);
        assert_eq!(out, vec![(1, 0)]);
        out.clear();
        w.advance(5, &mut out);
        assert_eq!(out, vec![(2, 0), (3, 0)]);
        out.clear();
        w.advance(100_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(w.now(), 100_000);
    }
}
