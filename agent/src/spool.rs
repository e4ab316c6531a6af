//! The agent's bounded spool: every event gets the next sequence number and stays here until the
//! collector acknowledges it (acks mean "durably stored"). While the collector is unreachable the
//! spool fills; past its bounds the oldest events are dropped, counted, and replaced by one
//! `Gap{AGENT_SPOOL}` event so readers know exactly how much is missing.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use gpulse_proto::v1::{self, EventKind, GapStage, event::Payload};
use prost::Message;
use tokio::sync::Notify;

use crate::stats::AgentStats;

#[derive(Clone, Copy, Debug)]
pub struct SpoolLimits {
    pub max_bytes: usize,
    pub max_events: usize,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_events: 1 << 20,
        }
    }
}

#[derive(Debug)]
pub struct Spool {
    events: VecDeque<(v1::Event, usize)>,
    bytes: usize,
    limits: SpoolLimits,
    next_seq: u64,
    acked_through: u64,
    dropped: u64,
}

impl Spool {
    pub fn new(limits: SpoolLimits) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            limits,
            next_seq: 1,
            acked_through: 0,
            dropped: 0,
        }
    }

    /// Appends an event, assigning its seq. Returns how many old events were dropped to fit.
    pub fn push(&mut self, mut ev: v1::Event) -> u64 {
        ev.seq = self.next_seq;
        self.next_seq += 1;
        let size = ev.encoded_len();
        self.events.push_back((ev, size));
        self.bytes += size;
        let mut dropped = 0;
        // Missing counts of dropped gap notices: carried into the new notice, not re-counted.
        let mut carried = 0;
        // When trimming, leave room for the gap notice itself so the bounds hold after it.
        let over = |sp: &Self, extra_bytes: usize, extra_events: usize| {
            sp.bytes + extra_bytes > sp.limits.max_bytes
                || sp.events.len() + extra_events > sp.limits.max_events
        };
        let trimming = over(self, 0, 0);
        while trimming && over(self, GAP_RESERVE_BYTES, 1) && self.events.len() > 1 {
            let Some((old, sz)) = self.events.pop_front() else {
                break;
            };
            self.bytes -= sz;
            match &old.payload {
                Some(Payload::Gap(g)) if g.stage == GapStage::AgentSpool as i32 => {
                    carried += g.missed
                }
                _ => dropped += 1,
            }
        }
        if dropped + carried > 0 {
            self.dropped += dropped;
            self.note_gap(dropped + carried);
        }
        dropped
    }

    fn note_gap(&mut self, dropped: u64) {
        // Coalesce into the newest spool gap notice that has not been sent yet.
        if let Some((last, sz)) = self.events.back_mut()
            && let Some(Payload::Gap(g)) = &mut last.payload
            && g.stage == GapStage::AgentSpool as i32
        {
            g.missed += dropped;
            g.detail = spool_detail(g.missed);
            self.bytes -= *sz;
            *sz = last.encoded_len();
            self.bytes += *sz;
            return;
        }
        let template = self
            .events
            .back()
            .map(|(e, _)| e.clone())
            .unwrap_or_default();
        let gap = v1::Event {
            seq: self.next_seq,
            time: gpulse_proto::time::now().into(),
            node: template.node,
            agent_id: template.agent_id,
            kind: EventKind::Gap as i32,
            severity: v1::Severity::Warning as i32,
            payload: Some(Payload::Gap(v1::Gap {
                stage: GapStage::AgentSpool as i32,
                missed: dropped,
                detail: spool_detail(dropped),
            })),
            ..Default::default()
        };
        self.next_seq += 1;
        let size = gap.encoded_len();
        self.bytes += size;
        self.events.push_back((gap, size));
    }

    /// Forgets everything with seq <= `through` (the collector stored it).
    pub fn ack(&mut self, through: u64) -> u64 {
        let mut n = 0;
        while self.events.front().is_some_and(|(e, _)| e.seq <= through) {
            if let Some((_, sz)) = self.events.pop_front() {
                self.bytes -= sz;
                n += 1;
            }
        }
        self.acked_through = self.acked_through.max(through);
        n
    }

    /// Up to `max_events` / `max_bytes` of events with seq > `after`, in order.
    pub fn unsent(&self, after: u64, max_events: usize, max_bytes: usize) -> Vec<v1::Event> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (e, sz) in self.events.iter().filter(|(e, _)| e.seq > after) {
            if !out.is_empty() && (out.len() >= max_events || bytes + sz > max_bytes) {
                break;
            }
            bytes += sz;
            out.push(e.clone());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Upper bound on the encoded size of a spool gap notice.
const GAP_RESERVE_BYTES: usize = 512;

fn spool_detail(n: u64) -> String {
    format!(
        "{n} events dropped from the agent spool while the collector was unreachable (raise --spool-bytes)"
    )
}

/// The spool shared between the pipeline (producer) and the client (consumer).
#[derive(Debug)]
pub struct SharedSpool {
    inner: Mutex<Spool>,
    pub notify: Notify,
    stats: Arc<AgentStats>,
}

impl SharedSpool {
    pub fn new(limits: SpoolLimits, stats: Arc<AgentStats>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Spool::new(limits)),
            notify: Notify::new(),
            stats,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Spool> {
        // A panic while holding the lock leaves the spool consistent (every method completes
        // its bookkeeping before returning), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, ev: v1::Event) {
        let dropped = self.lock().push(ev);
        if dropped > 0 {
            AgentStats::add(&self.stats.spool_dropped, dropped);
        }
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(text: &str) -> v1::Event {
        v1::Event {
            node: "n".into(),
            kind: EventKind::DriverLog as i32,
            payload: Some(Payload::DriverLog(v1::DriverLog {
                text: text.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn assigns_contiguous_seqs_and_acks() {
        let mut s = Spool::new(SpoolLimits::default());
        for i in 0..10 {
            s.push(ev(&format!("e{i}")));
        }
        assert_eq!(s.last_seq(), 10);
        assert_eq!(
            s.unsent(0, 100, 1 << 20)
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(s.unsent(7, 100, 1 << 20).len(), 3);
        assert_eq!(s.unsent(0, 4, 1 << 20).len(), 4);
        assert_eq!(s.ack(6), 6);
        assert_eq!(s.len(), 4);
        assert_eq!(s.ack(3), 0, "old acks are harmless");
        assert_eq!(s.acked_through(), 6);
    }

    #[test]
    fn overflow_drops_oldest_and_reports_one_coalesced_gap() {
        let mut s = Spool::new(SpoolLimits {
            max_bytes: 1 << 20,
            max_events: 5,
        });
        for i in 0..20 {
            s.push(ev(&format!("e{i}")));
        }
        assert!(s.len() <= 6);
        let all = s.unsent(0, 100, 1 << 20);
        let gaps: Vec<_> = all
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) => Some(g.missed),
                _ => None,
            })
            .collect();
        assert_eq!(gaps.len(), 1, "{all:?}");
        // Everything not in the spool is accounted for by the gap.
        let kept = all
            .iter()
            .filter(|e| e.kind == EventKind::DriverLog as i32)
            .count() as u64;
        assert_eq!(kept + gaps[0], 20);
        assert_eq!(s.dropped(), gaps[0]);
        // Seqs stay strictly increasing.
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn byte_bound_holds() {
        let mut s = Spool::new(SpoolLimits {
            max_bytes: 2000,
            max_events: 1 << 20,
        });
        for i in 0..1000 {
            s.push(ev(&format!("event number {i} with some text")));
        }
        assert!(s.bytes() <= 2000, "{}", s.bytes());
        assert!(s.dropped() > 900);
    }
}
