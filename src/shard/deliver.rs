//! The delivery seam, executed on a shard: every service hands a [`Target`] and one encoded
//! [`Frame`] to [`Shard::deliver`], which asks the sans-IO plan ([`crate::route::plan`]) where
//! the recipients are, queues the frame on this shard's recipients, hands a clone of it to
//! each other shard that has some (one `ShardMsg::Deliver` each), and to the bridge when other
//! nodes may have some. A frame is encoded once and shared by every recipient on every shard.
//! The inbox side ([`Shard::drain_inbox`]) runs the local part for frames from elsewhere.

use super::*;

/// What a delivery could not reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Missed {
    /// Shards whose inbox was full or dead (their recipients did not get the frame).
    pub shards: u64,
    /// The bridge's inbox was full (other nodes did not get the frame).
    pub bridge: bool,
}

impl Shard {
    /// Hand a job to the message store on the bridge without blocking. False (and counted in
    /// `switchboard_bridge_dropped_total`) when the bridge inbox is full: the caller answers
    /// `server busy, retry later`.
    pub(crate) fn hand_to_store(&mut self, job: crate::bridge::StoreJob) -> bool {
        let msg = crate::bridge::BridgeMsg::Store(Box::new(job));
        if self.node.bridge_tx.try_send(msg).is_err() {
            self.out.stats.bridge_dropped += 1;
            return false;
        }
        true
    }

    /// This shard's reference for connection `slot`.
    pub(crate) fn conn_ref(&self, slot: u32) -> ConnRef {
        ConnRef {
            node: self.node.id,
            shard: self.id as u16,
            slot,
            gen: self.clients[slot as usize].gen,
        }
    }

    /// Deliver `frame` to every recipient of `target`, here, on other shards and (clustered)
    /// on other nodes. Returns what could not be reached (full inboxes, counted).
    pub(crate) fn deliver(&mut self, target: &Target, frame: &Frame) -> Missed {
        let n = self.node.inboxes.len();
        let p = crate::route::plan(
            target,
            &self.node.dir,
            self.node.id,
            self.id,
            n,
            self.node.clustered,
        );
        self.deliver_plan(target, frame, p.local, p.shards, p.bridge)
    }

    /// Deliver `frame` to this node's recipients of `target` only (here and on other shards),
    /// never to the bridge: a cluster history message, which Redis published to every node.
    pub(crate) fn deliver_node(&mut self, target: &Target, frame: &Frame) -> Missed {
        let n = self.node.inboxes.len();
        let p = crate::route::plan(target, &self.node.dir, self.node.id, self.id, n, false);
        self.deliver_plan(target, frame, p.local, p.shards, false)
    }

    fn deliver_plan(
        &mut self,
        target: &Target,
        frame: &Frame,
        local: bool,
        mut shards: u64,
        bridge: bool,
    ) -> Missed {
        let mut missed = Missed::default();
        if local {
            self.deliver_local(target, frame);
        }
        while shards != 0 {
            let shard = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            let msg = ShardMsg::Deliver {
                target: target.clone(),
                frame: frame.clone(),
            };
            if self.node.inboxes.send(shard, msg).is_ok() {
                self.out.stats.cross_shard_sent += 1;
            } else {
                self.out.stats.cross_shard_dropped += 1;
                missed.shards |= 1u64 << shard;
            }
        }
        if bridge {
            // Inside a traced span (a sampled publish, API request, upgrade): the other nodes
            // continue its trace. With tracing off `current` is one atomic load.
            let span = crate::trace::current();
            let msg = if span.is_none() {
                BridgeMsg::Deliver {
                    target: target.clone(),
                    frame: frame.clone(),
                }
            } else {
                BridgeMsg::DeliverTraced(Box::new((target.clone(), frame.clone(), span)))
            };
            if self.node.bridge_tx.try_send(msg).is_err() {
                self.out.stats.bridge_dropped += 1;
                missed.bridge = true;
            }
        }
        missed
    }

    /// Queue `frame` on this shard's recipients of `target`.
    pub(super) fn deliver_local(&mut self, target: &Target, frame: &Frame) {
        let except = target
            .except()
            .filter(|e| e.node == self.node.id && e.shard as usize == self.id)
            .map(|e| (e.slot, e.gen));
        let Shard {
            svc,
            users,
            topics,
            http_waiting,
            http_resume,
            clients,
            out,
            now_tick,
            ..
        } = self;
        let now_tick = *now_tick;
        let mut n = 0u64;
        let mut urgent = None;
        match target {
            Target::Room { room, .. } => {
                let rooms = &svc.rooms.table;
                let Some(id) = rooms.lookup(room) else {
                    return;
                };
                let members = rooms.members(id);
                match except {
                    // The fan-out inner loop: one Arc clone per member.
                    None => {
                        for &slot in members {
                            if let Some(c) = clients.get_mut(slot as usize) {
                                n += u64::from(out.push(c, slot, frame.clone(), now_tick));
                            }
                        }
                    }
                    Some((xs, xg)) => {
                        for &slot in members {
                            if let Some(c) = clients.get_mut(slot as usize) {
                                if slot != xs || c.gen != xg {
                                    n += u64::from(out.push(c, slot, frame.clone(), now_tick));
                                }
                            }
                        }
                    }
                }
            }
            Target::User { user, .. } => {
                for &slot in users.devices(user) {
                    let Some(c) = clients.get_mut(slot as usize) else {
                        continue;
                    };
                    if except != Some((slot, c.gen)) && c.phase == Phase::Open {
                        n += u64::from(out.push(c, slot, frame.clone(), now_tick));
                    }
                }
            }
            Target::Topic { topic, .. } => {
                for &slot in topics.devices(topic) {
                    let Some(c) = clients.get_mut(slot as usize) else {
                        continue;
                    };
                    if except != Some((slot, c.gen)) && c.phase == Phase::Open {
                        n += u64::from(out.push(c, slot, frame.clone(), now_tick));
                    }
                }
            }
            Target::All => {
                for (slot, c) in clients.iter_mut() {
                    if c.phase == Phase::Open {
                        n += u64::from(out.push(c, slot as u32, frame.clone(), now_tick));
                    }
                }
            }
            Target::Conn(r) => {
                if let Some(c) = clients.get_mut(r.slot as usize) {
                    if c.gen == r.gen && c.phase == Phase::Open {
                        // One connection's answer (an ack, an error, a sync page, a call
                        // signal): a reply, written this turn, never held by write_coalesce.
                        if out.push(c, r.slot, frame.clone(), now_tick) {
                            n += 1;
                            urgent = Some(r.slot);
                        }
                    } else if c.gen == r.gen && c.phase == Phase::Http {
                        // The answer to a server API request that waited for another shard.
                        if let Some(keep) = http_waiting.remove(&(r.slot, r.gen)) {
                            out.push(c, r.slot, frame.clone(), now_tick);
                            http_resume.push((r.slot, keep));
                        }
                    }
                }
            }
        }
        out.stats.deliveries += n;
        if let Some(slot) = urgent {
            self.make_urgent(slot);
        }
    }

    /// The local devices of `user` (slots).
    pub(crate) fn devices_of(&self, user: &str) -> Vec<u32> {
        self.users.devices(user).to_vec()
    }

    /// Join `slot` to `topic` (a server-side subscription delivered with [`Target::Topic`]).
    /// False if it is already a member. The caller bounds how many topics a connection joins.
    pub(crate) fn topic_join(&mut self, slot: u32, topic: &str) -> bool {
        let list = self.topics_of.entry(slot).or_default();
        if list.iter().any(|t| &**t == topic) {
            return false;
        }
        let key = self.topics.key(topic).unwrap_or_else(|| Arc::from(topic));
        list.push(key.clone());
        if self.topics.add(&key, slot) {
            let t = self.node.dir.topics.arrive(&key, self.id);
            self.report_topic(key, t);
        }
        true
    }

    /// Take `slot` out of `topic`. False if it was not a member.
    pub(crate) fn topic_leave(&mut self, slot: u32, topic: &str) -> bool {
        let Some(list) = self.topics_of.get_mut(&slot) else {
            return false;
        };
        let Some(i) = list.iter().position(|t| &**t == topic) else {
            return false;
        };
        let key = list.swap_remove(i);
        if list.is_empty() {
            self.topics_of.remove(&slot);
        }
        if self.topics.remove(&key, slot) {
            let t = self.node.dir.topics.depart(&key, self.id);
            self.report_topic(key, t);
        }
        true
    }

    /// Tell the bridge a topic's node-level first member arrived or its last one left (it
    /// holds the topic's channel only while this node has members).
    fn report_topic(&mut self, topic: Arc<str>, t: crate::directory::Transition) {
        if t != crate::directory::Transition::None && self.node.clustered {
            let msg = BridgeMsg::Topic { topic, t };
            if self.node.bridge_tx.try_send(msg).is_err() {
                self.out.stats.bridge_dropped += 1;
                // The bridge re-reads the directory for it.
                self.node
                    .redis_stats
                    .transitions_lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Topics `slot` is a member of.
    pub(crate) fn topics_joined(&self, slot: u32) -> usize {
        self.topics_of.get(&slot).map_or(0, Vec::len)
    }

    /// Leave every topic (the connection is detaching).
    pub(super) fn leave_all_topics(&mut self, slot: u32) {
        let Some(list) = self.topics_of.remove(&slot) else {
            return;
        };
        for key in list {
            if self.topics.remove(&key, slot) {
                let t = self.node.dir.topics.depart(&key, self.id);
                self.report_topic(key, t);
            }
        }
    }

    pub(super) fn drain_inbox(&mut self) {
        self.node.inboxes.0[self.id]
            .wake_pending
            .store(false, Ordering::SeqCst);
        for _ in 0..INBOX_PER_TURN_MAX {
            let Ok(msg) = self.inbox.try_recv() else {
                break;
            };
            match msg {
                ShardMsg::Deliver { target, frame } => self.deliver_local(&target, &frame),
                ShardMsg::Traced(d) => {
                    let (target, frame, span) = *d;
                    {
                        let _entered = span.enter();
                        self.deliver_local(&target, &frame);
                    }
                    self.traced.push(span);
                }
                ShardMsg::Service(m) => service::on_msg(self, *m),
                ShardMsg::Drain => self.start_drain(),
            }
        }
        if !self.inbox.is_empty() {
            // More than one turn's worth: come back without sleeping.
            let _ = self.node.inboxes.0[self.id].waker.wake();
        }
    }
}
