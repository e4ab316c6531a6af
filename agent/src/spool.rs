//! The agent's bounded spool: every event gets the next sequence number and stays here until the
//! collector acknowledges it (acks mean "durably stored"). While the collector is unreachable the
//! spool fills; past its bounds the oldest events are dropped, counted, and replaced by one
//! `Gap{AGENT_SPOOL}` event so readers know exactly how much is missing.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use gpulse_proto::{
    names::ShortName,
    v1::{self, EventKind, GapStage, event::Payload},
};
use prost::{Message, bytes::Bytes};
use tokio::sync::Notify;

use crate::{
    spool_log::{Recovered, SpoolLog},
    stats::AgentStats,
};

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

/// One spooled event, kept as the bytes it is sent as (a decoded event is 3-4x larger), with
/// what the bounds and the client look at.
#[derive(Clone, Debug)]
struct Entry {
    seq: u64,
    kind: i32,
    /// Set for the spool's own loss notices (`AGENT_SPOOL`, `SAMPLES_SHED`).
    notice: Option<GapStage>,
    bytes: Bytes,
}

/// Memory of one entry besides its bytes (the entry in the queue and the buffer's header).
const ENTRY_OVERHEAD: usize = 64;

impl Entry {
    fn encode(ev: &v1::Event) -> Self {
        Self::with_bytes(ev, Bytes::from(ev.encode_to_vec()))
    }

    /// The entry of `ev`, whose encoding (with its seq) is `bytes`.
    fn with_bytes(ev: &v1::Event, bytes: Bytes) -> Self {
        let notice = match &ev.payload {
            Some(Payload::Gap(g))
                if g.stage == GapStage::AgentSpool as i32
                    || g.stage == GapStage::SamplesShed as i32 =>
            {
                GapStage::try_from(g.stage).ok()
            }
            _ => None,
        };
        Self {
            seq: ev.seq,
            kind: ev.kind,
            notice,
            bytes,
        }
    }

    fn mem(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }

    fn decode(&self) -> Option<v1::Event> {
        v1::Event::decode(self.bytes.as_ref()).ok()
    }
}

/// The index of the first entry at or after seq `from` that `pick` takes, and the seq below
/// which none is (the found entry's, or past every entry when there is none).
fn first_from(
    events: &VecDeque<Entry>,
    from: u64,
    pick: impl Fn(&Entry) -> bool,
) -> (Option<usize>, u64) {
    let start = events.partition_point(|e| e.seq < from);
    match (start..events.len()).find(|&i| pick(&events[i])) {
        Some(k) => (Some(k), events[k].seq),
        None => (None, events.back().map_or(from, |e| e.seq + 1)),
    }
}

/// An event handed to the client: its seq and its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsent {
    pub seq: u64,
    pub bytes: Bytes,
}

#[derive(Debug)]
pub struct Spool {
    events: VecDeque<Entry>,
    /// Memory the entries hold (what `--spool-bytes` bounds).
    bytes: usize,
    limits: SpoolLimits,
    next_seq: u64,
    acked_through: u64,
    /// Highest seq handed to the transport on the current connection.
    sent_through: u64,
    dropped: u64,
    samples_shed: u64,
    /// After a restart from the spool log: the highest seq the log held. Events numbered after
    /// it before the first collector answered may reuse seqs of events the log lost with its
    /// tail (a power loss inside the fsync interval) that the collector already stored: they
    /// are numbered again after the collector's answer ([`Spool::settle`]).
    provisional_after: Option<u64>,
    /// No event to drop has a seq below these: (unsent samples, unsent events). Each search
    /// for one starts there, so a full spool does not scan its whole queue per push (a full
    /// spool without samples looked at every event for a sample on each push: quadratic).
    /// Reset when `sent_through` goes down or seqs are numbered again.
    drop_from: (u64, u64),
}

impl Spool {
    pub fn new(limits: SpoolLimits) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            limits,
            next_seq: 1,
            acked_through: 0,
            sent_through: 0,
            dropped: 0,
            samples_shed: 0,
            provisional_after: None,
            drop_from: (0, 0),
        }
    }

    /// Appends an event, assigning its seq. Returns how many old events were dropped to fit.
    ///
    /// Over the bounds, the oldest events are removed. Their loss is recorded in a
    /// `Gap{AGENT_SPOOL}` notice that takes the place (and the seq) of the last event it replaces,
    /// so seqs stay strictly increasing and the collector sees the jump explained. Notices are
    /// never dropped, and a notice already handed to the client is never changed: later losses
    /// start a new one.
    pub fn push(&mut self, mut ev: v1::Event) -> u64 {
        ev.seq = self.next_seq;
        self.insert(Entry::encode(&ev))
    }

    /// [`Spool::push`] of an event already encoded with its seq (`next_seq`).
    pub fn push_encoded(&mut self, ev: &v1::Event, bytes: Bytes) -> u64 {
        self.insert(Entry::with_bytes(ev, bytes))
    }

    /// The seq the next pushed event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Puts back an event recovered from the spool log, keeping its seq (within the bounds, as
    /// a push would).
    pub fn restore(&mut self, ev: v1::Event) -> u64 {
        if ev.seq < self.next_seq {
            return 0;
        }
        self.insert(Entry::encode(&ev))
    }

    /// After a restart: what the log says was acknowledged and the highest seq ever used.
    pub fn resume_after(&mut self, acked: u64, last_seq: u64) {
        self.ack(acked);
        self.sent_through = self.acked_through;
        self.drop_from = (0, 0);
        self.next_seq = self.next_seq.max(last_seq + 1).max(acked + 1);
        self.provisional_after = Some(self.next_seq - 1);
    }

    /// The first collector answer after a restart says it holds this agent's seqs through
    /// `through`. Events numbered since the restart with a seq it already holds would be taken
    /// for resends and acknowledged away unsent (issue 27 #6: 12 events lost after a power
    /// loss, the restart's AgentStatus among them): they are numbered again after `through`,
    /// in order. Returns the events renumbered (the caller logs them); later answers change
    /// nothing.
    pub fn settle(&mut self, through: u64) -> Vec<v1::Event> {
        let Some(after) = self.provisional_after.take() else {
            return Vec::new();
        };
        if through <= after {
            return Vec::new();
        }
        let mut next = through + 1;
        let mut out = Vec::new();
        for e in self.events.iter_mut().filter(|e| e.seq > after) {
            let Some(mut ev) = e.decode() else { continue };
            ev.seq = next;
            next += 1;
            self.bytes -= e.mem();
            *e = Entry::encode(&ev);
            self.bytes += e.mem();
            out.push(ev);
        }
        self.next_seq = self.next_seq.max(next);
        self.drop_from = (0, 0);
        out
    }

    /// The collector holds more of this agent than the spool knows (acknowledged events whose
    /// log frames a power loss took): everything through `through` is delivered, and new
    /// events continue after it so none is taken for a duplicate.
    pub fn skip_to(&mut self, through: u64) {
        self.ack(through);
        self.sent_through = self.sent_through.max(through);
        self.next_seq = self.next_seq.max(through + 1);
    }

    /// Every spooled event's encoding, oldest first.
    pub fn iter_encoded(&self) -> impl Iterator<Item = &[u8]> {
        self.events.iter().map(|e| e.bytes.as_ref())
    }

    fn insert(&mut self, entry: Entry) -> u64 {
        self.next_seq = entry.seq + 1;
        self.bytes += entry.mem();
        self.events.push_back(entry);
        let mut dropped = 0;
        while self.bytes > self.limits.max_bytes || self.events.len() > self.limits.max_events {
            // Only events not yet handed to the transport may go: an in-flight event is either
            // acknowledged soon or, if the connection drops, unsent again (see rewind_sent).
            let sent = self.sent_through;
            let unsent = |e: &Entry| e.notice.is_none() && e.seq > sent;
            let sample = |e: &Entry| unsent(e) && e.kind == EventKind::GpuSample as i32;
            // Samples are shed before events.
            let (k, from) = first_from(&self.events, self.drop_from.0, sample);
            self.drop_from.0 = from.max(self.drop_from.0);
            let k = match k {
                Some(k) => Some(k),
                None => {
                    let (k, from) = first_from(&self.events, self.drop_from.1, unsent);
                    self.drop_from.1 = from.max(self.drop_from.1);
                    k
                }
            };
            let Some(k) = k else {
                break;
            };
            // Never drop the event just pushed: the newest data is the most valuable.
            if k + 1 == self.events.len() {
                break;
            }
            let Some(old) = self.events.remove(k) else {
                break;
            };
            self.bytes -= old.mem();
            dropped += 1;
            self.record_loss(k, &old);
        }
        self.dropped += dropped;
        dropped
    }

    /// Accounts for `old` (removed from index `k`) in the notice just before `k`, or a new one.
    /// Shed samples and dropped events are counted in separate notices.
    fn record_loss(&mut self, k: usize, old: &Entry) {
        let sent_through = self.sent_through;
        let stage = if old.kind == EventKind::GpuSample as i32 {
            self.samples_shed += 1;
            GapStage::SamplesShed
        } else {
            GapStage::AgentSpool
        };
        if k > 0
            && let Some(prev) = self.events.get_mut(k - 1)
            && prev.notice == Some(stage)
            && prev.seq > sent_through
            && let Some(mut notice) = prev.decode()
        {
            if let Some(Payload::Gap(g)) = &mut notice.payload {
                g.missed += 1;
                g.detail = spool_detail(g.missed);
            }
            notice.seq = old.seq;
            self.bytes -= prev.mem();
            *prev = Entry::encode(&notice);
            self.bytes += prev.mem();
            return;
        }
        // Who the notice is from: the event it replaces says (its node and agent id).
        let (node, agent_id) = old
            .decode()
            .map(|e| (e.node, e.agent_id))
            .unwrap_or_default();
        let gap = v1::Event {
            seq: old.seq,
            time: gpulse_proto::time::now().into(),
            node,
            agent_id,
            kind: EventKind::Gap as i32,
            severity: v1::Severity::Warning as i32,
            payload: Some(Payload::Gap(v1::Gap {
                stage: stage as i32,
                missed: 1,
                detail: spool_detail(1),
            })),
            ..Default::default()
        };
        let entry = Entry::encode(&gap);
        self.bytes += entry.mem();
        self.events.insert(k, entry);
    }

    /// The collector refused the unacknowledged event `seq` on its own: replace it (same seq) by
    /// a `Gap{COLLECTOR_REFUSED}` notice carrying `reason`, so the events behind it can go.
    /// Returns the kind of the event set aside and the notice, or None if `seq` is not spooled.
    pub fn set_aside(&mut self, seq: u64, reason: &str) -> Option<(EventKind, v1::Event)> {
        let acked = self.acked_through;
        let entry = self
            .events
            .iter_mut()
            .find(|e| e.seq == seq && seq > acked)?;
        let kind = EventKind::try_from(entry.kind).unwrap_or(EventKind::Unspecified);
        let ev = entry.decode().unwrap_or_default();
        let mut reason = reason.to_string();
        reason.truncate(reason.floor_char_boundary(512));
        let gap = v1::Event {
            seq,
            time: ev.time.or_else(|| Some(gpulse_proto::time::now())),
            node: ev.node,
            agent_id: ev.agent_id,
            kind: EventKind::Gap as i32,
            severity: v1::Severity::Warning as i32,
            payload: Some(Payload::Gap(v1::Gap {
                stage: GapStage::CollectorRefused as i32,
                missed: 1,
                detail: format!(
                    "collector refused event seq {seq} ({}): {reason}",
                    kind.short_name()
                ),
            })),
            ..Default::default()
        };
        self.bytes -= entry.mem();
        *entry = Entry::encode(&gap);
        self.bytes += entry.mem();
        Some((kind, gap))
    }

    /// The client handed everything up to `seq` to the transport.
    pub fn mark_sent(&mut self, seq: u64) {
        self.sent_through = self.sent_through.max(seq);
    }

    /// A new connection resends from `acked`: only what was acknowledged counts as delivered.
    pub fn rewind_sent(&mut self, acked: u64) {
        self.sent_through = acked;
        self.drop_from = (0, 0);
    }

    /// Forgets everything with seq <= `through` (the collector stored it).
    pub fn ack(&mut self, through: u64) -> u64 {
        let mut n = 0;
        while self.events.front().is_some_and(|e| e.seq <= through) {
            if let Some(e) = self.events.pop_front() {
                self.bytes -= e.mem();
                n += 1;
            }
        }
        self.acked_through = self.acked_through.max(through);
        n
    }

    /// Up to `max_events` / `max_bytes` of events with seq > `after`, in order, as sent.
    pub fn unsent(&self, after: u64, max_events: usize, max_bytes: usize) -> Vec<Unsent> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.events.iter().filter(|e| e.seq > after) {
            let sz = e.bytes.len();
            if !out.is_empty() && (out.len() >= max_events || bytes + sz > max_bytes) {
                break;
            }
            bytes += sz;
            out.push(Unsent {
                seq: e.seq,
                bytes: e.bytes.clone(),
            });
        }
        out
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// Memory the spooled events hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
    /// Events (samples included) dropped to stay within bounds.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Of those, GPU samples.
    pub fn samples_shed(&self) -> u64 {
        self.samples_shed
    }
}

fn spool_detail(n: u64) -> String {
    format!(
        "{n} events dropped from the agent spool while the collector was unreachable (raise --spool-bytes)"
    )
}

/// The spool shared between the pipeline (producer) and the client (consumer), mirrored to
/// the spool log when the agent has a state directory.
pub struct SharedSpool {
    inner: Mutex<Spool>,
    log: Option<Mutex<SpoolLog>>,
    pub notify: Notify,
    stats: Arc<AgentStats>,
}

impl std::fmt::Debug for SharedSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSpool")
            .field("persistent", &self.log.is_some())
            .finish_non_exhaustive()
    }
}

impl SharedSpool {
    pub fn new(limits: SpoolLimits, stats: Arc<AgentStats>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Spool::new(limits)),
            log: None,
            notify: Notify::new(),
            stats,
        })
    }

    /// A spool mirrored to `log`, holding what it recovered (seqs kept, within the bounds).
    pub fn persistent(
        limits: SpoolLimits,
        stats: Arc<AgentStats>,
        log: SpoolLog,
        recovered: Recovered,
    ) -> Arc<Self> {
        let mut sp = Spool::new(limits);
        for ev in recovered.events {
            sp.restore(ev);
        }
        sp.resume_after(recovered.acked, recovered.last_seq);
        Arc::new(Self {
            inner: Mutex::new(sp),
            log: Some(Mutex::new(log)),
            notify: Notify::new(),
            stats,
        })
    }

    fn log_write(&self, what: &str, f: impl FnOnce(&mut SpoolLog) -> std::io::Result<()>) {
        let Some(log) = &self.log else { return };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f(&mut log) {
            AgentStats::add(&self.stats.spool_log_errors, 1);
            tracing::warn!(error = %e, what, "spool log write failed; the event stays in memory only");
        }
    }

    /// Acknowledged through `through`: forgets those events (and records it in the log).
    pub fn ack(&self, through: u64) -> u64 {
        let mut sp = self.lock();
        let before = sp.acked_through();
        let n = sp.ack(through);
        if through > before {
            self.log_write("ack", |l| l.append_ack(through));
        }
        n
    }

    /// The collector refused the event `seq` alone: replaced by a notice (also in the log).
    pub fn set_aside(&self, seq: u64, reason: &str) -> Option<EventKind> {
        let mut sp = self.lock();
        let (kind, notice) = sp.set_aside(seq, reason)?;
        self.log_write("set aside", |l| l.append_event(&notice));
        Some(kind)
    }

    /// See [`Spool::settle`]; the renumbered events are written to the log again (a later frame
    /// of a seq replaces an earlier one, and the ack that follows drops the reused seqs).
    pub fn settle(&self, through: u64) -> usize {
        let mut sp = self.lock();
        let moved = sp.settle(through);
        for ev in &moved {
            self.log_write("renumbered event", |l| l.append_event(ev));
        }
        moved.len()
    }

    /// See [`Spool::skip_to`]; recorded in the log as an ack.
    pub fn skip_to(&self, through: u64) {
        let mut sp = self.lock();
        sp.skip_to(through);
        self.log_write("ack", |l| l.append_ack(through));
    }

    /// Makes the log durable (called every second, and at shutdown).
    pub fn sync(&self) {
        self.log_write("fsync", SpoolLog::sync);
    }

    pub fn lock(&self) -> MutexGuard<'_, Spool> {
        // A panic while holding the lock leaves the spool consistent (every method completes
        // its bookkeeping before returning), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, mut ev: v1::Event) {
        // Fitted to the collector's bounds (one home: gpulse_proto::bounds), so no event this
        // agent makes is refused for its size; a cut XID or log line says `truncated`.
        if gpulse_proto::bounds::fit(&mut ev) {
            tracing::debug!(kind = ev.kind, "event cut to the collector's bounds");
        }
        let (dropped, shed) = {
            let mut sp = self.lock();
            // Encoded once, with its seq: the spool keeps these bytes, the log writes them, the
            // client sends them. Logged before it is spooled, under the spool's lock, so the
            // log's order is the seq order.
            ev.seq = sp.next_seq();
            let bytes = Bytes::from(ev.encode_to_vec());
            self.log_write("event", |l| l.append_encoded(&bytes, &ev));
            let before = sp.samples_shed();
            let dropped = sp.push_encoded(&ev, bytes);
            let acked = sp.acked_through();
            self.log_write("compaction", |l| {
                if l.needs_compaction() {
                    l.compact(acked, sp.iter_encoded())
                } else {
                    Ok(())
                }
            });
            (dropped, sp.samples_shed() - before)
        };
        if dropped > 0 {
            AgentStats::add(&self.stats.spool_dropped, dropped - shed);
            AgentStats::add(&self.stats.samples_shed, shed);
        }
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(u: Vec<Unsent>) -> Vec<v1::Event> {
        u.iter()
            .map(|u| {
                let e = v1::Event::decode(u.bytes.as_ref()).unwrap();
                assert_eq!(e.seq, u.seq);
                e
            })
            .collect()
    }

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
            decoded(s.unsent(0, 100, 1 << 20))
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(decoded(s.unsent(7, 100, 1 << 20)).len(), 3);
        assert_eq!(decoded(s.unsent(0, 4, 1 << 20)).len(), 4);
        assert_eq!(s.ack(6), 6);
        assert_eq!(s.len(), 4);
        assert_eq!(s.ack(3), 0, "old acks are harmless");
        assert_eq!(s.acked_through(), 6);
    }

    fn gaps(all: &[v1::Event]) -> Vec<u64> {
        all.iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) => Some(g.missed),
                _ => None,
            })
            .collect()
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
        let all = decoded(s.unsent(0, 100, 1 << 20));
        assert_eq!(gaps(&all), vec![16], "{all:?}");
        // The notice stands first, in place of the last dropped event's seq; the newest survive.
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![16, 17, 18, 19, 20]
        );
        assert_eq!(s.dropped(), 16);
    }

    #[test]
    fn in_flight_events_and_sent_notices_are_never_touched() {
        let mut s = Spool::new(SpoolLimits {
            max_bytes: 1 << 20,
            max_events: 4,
        });
        for i in 0..6 {
            s.push(ev(&format!("a{i}")));
        }
        let first = decoded(s.unsent(0, 100, 1 << 20));
        assert_eq!(gaps(&first), vec![3]);
        s.mark_sent(first.last().unwrap().seq);
        for i in 0..3 {
            s.push(ev(&format!("b{i}")));
        }
        let all = decoded(s.unsent(0, 100, 1 << 20));
        // The in-flight events and the delivered notice are as they were; new losses have
        // their own notice.
        assert_eq!(&all[..4], &first[..]);
        assert_eq!(gaps(&all), vec![3, 2]);
        assert_eq!(s.dropped(), 5);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        // The connection drops: nothing is in flight any more, so old events may go too, and
        // every loss is accounted for.
        s.rewind_sent(0);
        s.push(ev("c0"));
        let all = decoded(s.unsent(0, 100, 1 << 20));
        let kept = all
            .iter()
            .filter(|e| e.kind == EventKind::DriverLog as i32)
            .count() as u64;
        assert_eq!(kept + gaps(&all).iter().sum::<u64>(), 10);
        assert_eq!(s.dropped(), gaps(&all).iter().sum::<u64>());
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn samples_are_shed_before_events() {
        let sample = |i: u32| v1::Event {
            kind: EventKind::GpuSample as i32,
            payload: Some(Payload::GpuSample(v1::GpuSample {
                index: i,
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut s = Spool::new(SpoolLimits {
            max_bytes: 1 << 20,
            max_events: 6,
        });
        s.push(ev("xid-like event 1"));
        for i in 0..4 {
            s.push(sample(i));
        }
        s.push(ev("xid-like event 2"));
        for i in 4..8 {
            s.push(sample(i));
        }
        let all = decoded(s.unsent(0, 100, 1 << 20));
        let logs: Vec<_> = all
            .iter()
            .filter(|e| e.kind == EventKind::DriverLog as i32)
            .collect();
        assert_eq!(
            logs.len(),
            2,
            "both events survive while samples can be shed: {all:?}"
        );
        assert_eq!(s.samples_shed(), s.dropped());
        let shed: u64 = all
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) if g.stage == GapStage::SamplesShed as i32 => Some(g.missed),
                _ => None,
            })
            .sum();
        assert_eq!(shed, s.samples_shed());
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn a_refused_event_is_set_aside_as_a_gap_with_its_seq() {
        let mut s = Spool::new(SpoolLimits::default());
        for t in ["a", "poison", "c"] {
            s.push(ev(t));
        }
        let before = s.bytes();
        assert_eq!(
            s.set_aside(2, "events[0] (seq 2) has no payload")
                .map(|(k, _)| k),
            Some(EventKind::DriverLog)
        );
        let all = decoded(s.unsent(0, 10, 1 << 20));
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        match &all[1].payload {
            Some(Payload::Gap(g)) => {
                assert_eq!(g.stage, GapStage::CollectorRefused as i32);
                assert_eq!(g.missed, 1);
                assert!(
                    g.detail.contains("seq 2 (driver_log): events[0]"),
                    "{}",
                    g.detail
                );
            }
            other => panic!("not a gap: {other:?}"),
        }
        assert_eq!(
            s.bytes(),
            all.iter()
                .map(|e| e.encoded_len() + ENTRY_OVERHEAD)
                .sum::<usize>()
        );
        assert_ne!(s.bytes(), before);
        s.ack(1);
        assert_eq!(s.set_aside(1, "acked already"), None);
        assert_eq!(s.set_aside(9, "never spooled"), None);
    }

    /// What a persistent spool wrote comes back after a restart with its seqs, acknowledged
    /// events do not, and new events continue after the highest seq ever used.
    #[test]
    fn a_persistent_spool_comes_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let (log, rec) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
            SharedSpool::persistent(
                SpoolLimits::default(),
                Arc::new(AgentStats::default()),
                log,
                rec,
            )
        };
        {
            let s = open();
            for t in ["a", "b", "c", "d"] {
                s.push(ev(t));
            }
            assert_eq!(s.ack(2), 2);
            s.set_aside(4, "refused");
        }
        let s = open();
        let sp = s.lock();
        let got: Vec<(u64, bool)> = decoded(sp.unsent(0, 100, 1 << 20))
            .iter()
            .map(|e| (e.seq, matches!(e.payload, Some(Payload::Gap(_)))))
            .collect();
        assert_eq!(got, [(3, false), (4, true)]);
        assert_eq!(sp.acked_through(), 2);
        assert_eq!(sp.next_seq(), 5);
        drop(sp);
        s.push(ev("e"));
        assert_eq!(s.lock().last_seq(), 5);
        // The collector holds more than the log (a power loss took acknowledged frames): the
        // event pushed since the restart is numbered after the collector's seq, not acked away
        // (issue 27 #6), as the client does on the first answer.
        assert_eq!(s.settle(9), 1);
        s.ack(9);
        let texts = |s: &SharedSpool| -> Vec<(u64, String)> {
            decoded(s.lock().unsent(0, 100, 1 << 20))
                .into_iter()
                .map(|e| match e.payload {
                    Some(Payload::DriverLog(d)) => (e.seq, d.text),
                    other => (e.seq, format!("{other:?}")),
                })
                .collect()
        };
        assert_eq!(texts(&s), [(10, "e".to_string())]);
        // Only the first answer after a restart renumbers.
        assert_eq!(s.settle(20), 0);
        s.push(ev("f"));
        assert_eq!(s.lock().last_seq(), 11);
        drop(s);
        // The log agrees after another restart.
        let s = open();
        assert_eq!(texts(&s), [(10, "e".to_string()), (11, "f".to_string())]);
        // With nothing new since the restart, the spool continues after the collector.
        s.ack(11);
        assert_eq!(s.settle(15), 0);
        s.skip_to(15);
        s.push(ev("g"));
        assert_eq!(s.lock().last_seq(), 16);
    }

    /// Issue 27: a full spool looked at every queued event for a sample to shed on each push
    /// (quadratic when it holds none). A guard with a wide margin, not a benchmark.
    #[test]
    fn a_full_spool_without_samples_pushes_in_linear_time() {
        let mut s = Spool::new(SpoolLimits {
            max_bytes: 1 << 30,
            max_events: 100_000,
        });
        let started = std::time::Instant::now();
        for i in 0..300_000 {
            s.push(ev(if i % 2 == 0 { "a" } else { "b" }));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        assert!(s.len() <= 100_000);
        // Half sent, then a reconnect rewinds: the oldest unsent still go first, notices stay.
        s.mark_sent(s.last_seq() - 50_000);
        for _ in 0..10 {
            s.push(ev("c"));
        }
        s.rewind_sent(0);
        let before = s.len();
        for _ in 0..10 {
            s.push(ev("d"));
        }
        assert!(s.len() <= before.max(100_000));
        let got = decoded(s.unsent(0, 200_000, 1 << 30));
        let gaps: u64 = got
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) => Some(g.missed),
                _ => None,
            })
            .sum();
        let events = got
            .iter()
            .filter(|e| !matches!(e.payload, Some(Payload::Gap(_))))
            .count() as u64;
        // Every pushed event is held or counted in a notice.
        assert_eq!(events + gaps, 300_020);
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
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
