//! The in-memory event store: one lane per event kind, each a queue of small blocks with a time
//! index (min/max event time per block), all inside one global byte budget.
//!
//! Budget policy: every kind has a guaranteed share of the global budget and may borrow what
//! other kinds leave unused. When the total goes over, the kind furthest over its share gives up
//! its oldest events first, so a flood of driver log lines or samples cannot expire XIDs that
//! fit in the XID share.
//!
//! Cursors increase with every stored event, so each lane is sorted by cursor (resume is a binary
//! search) and a window query only visits blocks whose time range meets the window.
use std::{collections::VecDeque, sync::Arc};

use gpulse_proto::{
    time as ptime,
    v1::{self, EventKind, event::Payload},
};
use prost::Message;

/// Per-event memory beyond its encoded bytes, counted against the budget so the budget bounds
/// real memory: the decoded struct (its largest payload variant sets the size), the Arc counts,
/// the slot, and allocator headers of its heap parts. (Strings cost about their encoded length.)
pub const EVENT_OVERHEAD_BYTES: usize = std::mem::size_of::<v1::Event>() + 16 + 16 + 64;
/// Fixed per-block overhead.
const BLOCK_OVERHEAD_BYTES: usize = 64;

/// Number of EventKind values (index = kind as usize).
pub const KINDS: usize = 8;

/// Events per block: small enough that a window edge decodes little, large enough that the time
/// index stays tiny.
const BLOCK_EVENTS: usize = 256;

/// Default guaranteed shares (percent of the global budget) per kind index.
pub const DEFAULT_SHARES: [u32; KINDS] = [
    0,  // unspecified
    25, // xid
    5,  // sxid
    15, // driver log
    5,  // agent status
    5,  // gap
    25, // gpu process
    20, // gpu sample (history lives in the series store; the ring keeps the live tail)
];

/// Event time in ms (the node's time, else when the collector received it).
pub fn event_ms(ev: &v1::Event) -> i64 {
    ev.time
        .as_ref()
        .or(ev.received.as_ref())
        .map_or(0, |t| (ptime::to_unix_nanos(t) / 1_000_000) as i64)
}

#[derive(Debug)]
struct Block {
    events: VecDeque<(Arc<v1::Event>, u32)>,
    min_ms: i64,
    max_ms: i64,
}

impl Block {
    fn first_cursor(&self) -> u64 {
        self.events.front().map_or(u64::MAX, |(e, _)| e.cursor)
    }
    fn last_cursor(&self) -> u64 {
        self.events.back().map_or(0, |(e, _)| e.cursor)
    }
}

#[derive(Debug, Default)]
struct Lane {
    blocks: VecDeque<Block>,
    bytes: usize,
    events: u64,
    expired: u64,
    share: usize,
}

/// How far ahead of the expiry point events are asked into cache (see [`prefetch_event`]).
const PREFETCH_AHEAD: usize = 6;
/// How far ahead their strings are (by then the event itself has arrived).
const PREFETCH_STRINGS_AHEAD: usize = 3;

/// Hints the CPU to load `p`'s cache line; never faults, never changes anything.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it cannot fault or change memory, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Expiry frees the oldest events, long out of cache in a ring of many MiB: every reference
/// count, field and string it touches is a miss, one after another. Asking for the event a few
/// places ahead (and, once it is in, its strings) overlaps those misses.
fn prefetch_event(ev: &Arc<v1::Event>) {
    // The Arc's counts sit just before the event; the event spans several lines.
    let start = Arc::as_ptr(ev).cast::<u8>().wrapping_sub(16);
    for off in (0..16 + std::mem::size_of::<v1::Event>()).step_by(64) {
        prefetch(start.wrapping_add(off));
    }
}

fn prefetch_strings(ev: &v1::Event) {
    prefetch(ev.node.as_ptr());
    prefetch(ev.agent_id.as_ptr());
    match &ev.payload {
        Some(Payload::GpuSample(g)) => {
            for s in [
                &g.uuid,
                &g.pci,
                &g.name,
                &g.driver_version,
                &g.cuda_driver_version,
            ] {
                prefetch(s.as_ptr());
            }
        }
        Some(Payload::GpuProcess(p)) => {
            for s in [&p.comm, &p.exe, &p.device] {
                prefetch(s.as_ptr());
            }
        }
        Some(Payload::DriverLog(d)) => prefetch(d.text.as_ptr()),
        Some(Payload::Xid(x)) => {
            for s in [&x.pci, &x.message, &x.raw] {
                prefetch(s.as_ptr());
            }
        }
        _ => {}
    }
}

impl Lane {
    fn pop_oldest(&mut self) -> Option<(Arc<v1::Event>, usize)> {
        let block = self.blocks.front_mut()?;
        let (ev, size) = block.events.pop_front()?;
        if let Some((ahead, _)) = block.events.get(PREFETCH_AHEAD) {
            prefetch_event(ahead);
        }
        if let Some((ahead, _)) = block.events.get(PREFETCH_STRINGS_AHEAD) {
            prefetch_strings(ahead);
        }
        let mut freed = size as usize;
        if block.events.is_empty() {
            self.blocks.pop_front();
            freed += BLOCK_OVERHEAD_BYTES;
        }
        self.bytes -= freed;
        self.events -= 1;
        self.expired += 1;
        Some((ev, freed))
    }

    fn oldest_cursor(&self) -> Option<u64> {
        self.blocks.front().map(Block::first_cursor)
    }

    /// Index of the first block that may hold a cursor > `after`.
    fn block_after(&self, after: u64) -> usize {
        self.blocks.partition_point(|b| b.last_cursor() <= after)
    }
}

/// Which way a window query walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

/// The answer to a window query.
#[derive(Debug, Default)]
pub struct WindowPage {
    pub events: Vec<Arc<v1::Event>>,
    /// All events in the window that match, on every page.
    pub total_matched: u64,
    /// More matching events lie beyond this page.
    pub more: bool,
    /// Blocks visited (the time index skipped the rest).
    pub blocks_scanned: usize,
}

#[derive(Debug)]
pub struct EventStore {
    lanes: [Lane; KINDS],
    bytes: usize,
    budget: usize,
    next_cursor: u64,
}

fn kind_index(ev: &v1::Event) -> usize {
    let k = ev.kind as usize;
    if k < KINDS { k } else { 0 }
}

impl EventStore {
    /// An empty store holding at most `budget` bytes with the default shares; cursors start at
    /// `next_cursor` (>= 1).
    pub fn new(budget: usize, next_cursor: u64) -> Self {
        Self::with_shares(budget, next_cursor, DEFAULT_SHARES)
    }

    /// `shares` are percentages per kind index; they need not sum to 100 (each is a floor).
    pub fn with_shares(budget: usize, next_cursor: u64, shares: [u32; KINDS]) -> Self {
        let mut lanes: [Lane; KINDS] = Default::default();
        for (lane, pct) in lanes.iter_mut().zip(shares) {
            lane.share = budget / 100 * pct as usize;
        }
        Self {
            lanes,
            bytes: 0,
            budget,
            next_cursor: next_cursor.max(1),
        }
    }

    /// The cursor the next stored event gets.
    pub fn next_cursor(&self) -> u64 {
        self.next_cursor
    }

    /// Stores `ev` with the next cursor (overwriting whatever cursor it carried). Returns the
    /// stored event and how many old events were expired to make room.
    pub fn push(&mut self, ev: v1::Event) -> (Arc<v1::Event>, u64) {
        let len = ev.encoded_len();
        self.push_len(Arc::new(ev), len)
    }

    /// [`EventStore::push`] for a caller that already holds the event in its `Arc` (ingest
    /// decodes straight into one, so the event is never moved) and knows its encoded length.
    pub fn push_len(
        &mut self,
        mut ev: Arc<v1::Event>,
        encoded_len: usize,
    ) -> (Arc<v1::Event>, u64) {
        if ev.cursor != self.next_cursor {
            // Copies only if someone else holds the event too (ingest's never is).
            Arc::make_mut(&mut ev).cursor = self.next_cursor;
        }
        self.next_cursor += 1;
        self.insert(ev, encoded_len)
    }

    /// Re-inserts an event read back from disk, keeping its cursor. Events must come in
    /// increasing cursor order; a jump (events lost to a damaged log) is allowed.
    pub fn restore(&mut self, ev: v1::Event) -> Option<(Arc<v1::Event>, u64)> {
        if ev.cursor < self.next_cursor {
            return None;
        }
        self.next_cursor = ev.cursor + 1;
        let len = ev.encoded_len();
        Some(self.insert(Arc::new(ev), len))
    }

    /// Never hand out cursors below `next` (they may have been issued before a crash).
    pub fn skip_to(&mut self, next: u64) {
        self.next_cursor = self.next_cursor.max(next);
    }

    fn insert(&mut self, ev: Arc<v1::Event>, encoded_len: usize) -> (Arc<v1::Event>, u64) {
        let size = encoded_len + EVENT_OVERHEAD_BYTES;
        let kind = kind_index(&ev);
        let ms = event_ms(&ev);
        let lane = &mut self.lanes[kind];
        let new_block = lane
            .blocks
            .back()
            .is_none_or(|b| b.events.len() >= BLOCK_EVENTS);
        if new_block {
            lane.blocks.push_back(Block {
                events: VecDeque::with_capacity(BLOCK_EVENTS),
                min_ms: ms,
                max_ms: ms,
            });
            lane.bytes += BLOCK_OVERHEAD_BYTES;
            self.bytes += BLOCK_OVERHEAD_BYTES;
        }
        if let Some(b) = lane.blocks.back_mut() {
            b.events.push_back((ev.clone(), size as u32));
            b.min_ms = b.min_ms.min(ms);
            b.max_ms = b.max_ms.max(ms);
        }
        lane.bytes += size;
        lane.events += 1;
        self.bytes += size;
        let mut expired = 0;
        while self.bytes > self.budget {
            // The lane furthest over its share gives way; never the event just stored.
            let victim = (0..KINDS)
                .filter(|k| self.lanes[*k].events > u64::from(*k == kind))
                .max_by_key(|k| {
                    let l = &self.lanes[*k];
                    l.bytes as i64 - l.share as i64
                });
            let Some(v) = victim else { break };
            match self.lanes[v].pop_oldest() {
                Some((_, freed)) => {
                    self.bytes -= freed;
                    expired += 1;
                }
                None => break,
            }
        }
        (ev, expired)
    }

    pub fn oldest_cursor(&self) -> Option<u64> {
        self.lanes.iter().filter_map(Lane::oldest_cursor).min()
    }

    pub fn last_cursor(&self) -> Option<u64> {
        self.lanes
            .iter()
            .filter_map(|l| l.blocks.back().map(Block::last_cursor))
            .max()
    }

    /// Oldest event time held (ms), over all kinds or one.
    pub fn oldest_ms(&self, kind: Option<EventKind>) -> Option<i64> {
        self.lanes
            .iter()
            .enumerate()
            .filter(|(k, _)| kind.is_none_or(|want| want as usize == *k))
            .flat_map(|(_, l)| l.blocks.iter().take(2).map(|b| b.min_ms))
            .min()
    }

    /// Events with cursor > `after`, oldest first, that satisfy `keep`, at most `limit`
    /// (a k-way merge of the lanes by cursor).
    pub fn after(
        &self,
        after: u64,
        limit: usize,
        mut keep: impl FnMut(&v1::Event) -> bool,
    ) -> Vec<Arc<v1::Event>> {
        let mut iters: Vec<_> = self
            .lanes
            .iter()
            .map(|l| {
                l.blocks
                    .iter()
                    .skip(l.block_after(after))
                    .flat_map(|b| b.events.iter())
                    .filter(move |(e, _)| e.cursor > after)
                    .peekable()
            })
            .collect();
        let mut out = Vec::new();
        while out.len() < limit {
            let mut best: Option<(usize, u64)> = None;
            for (i, it) in iters.iter_mut().enumerate() {
                if let Some((e, _)) = it.peek()
                    && best.is_none_or(|(_, c)| e.cursor < c)
                {
                    best = Some((i, e.cursor));
                }
            }
            let Some((i, _)) = best else { break };
            if let Some((e, _)) = iters[i].next()
                && keep(e)
            {
                out.push(e.clone());
            }
        }
        out
    }

    /// Events whose time lies in `[start_ms, end_ms)`, of the given kinds (all when empty),
    /// matching `keep`, ordered by cursor, strictly beyond `key` in the walking direction, at
    /// most `limit`. Only blocks whose time range meets the window are visited.
    #[allow(clippy::too_many_arguments)]
    pub fn window(
        &self,
        start_ms: i64,
        end_ms: i64,
        kinds: &[EventKind],
        order: Order,
        key: Option<u64>,
        limit: usize,
        mut keep: impl FnMut(&v1::Event) -> bool,
    ) -> WindowPage {
        let mut page = WindowPage::default();
        let mut matches: Vec<&Arc<v1::Event>> = Vec::new();
        for (k, lane) in self.lanes.iter().enumerate() {
            if !kinds.is_empty() && !kinds.iter().any(|want| *want as usize == k) {
                continue;
            }
            for b in &lane.blocks {
                if b.max_ms < start_ms || b.min_ms >= end_ms {
                    continue;
                }
                page.blocks_scanned += 1;
                for (e, _) in &b.events {
                    let ms = event_ms(e);
                    if ms < start_ms || ms >= end_ms || !keep(e) {
                        continue;
                    }
                    page.total_matched += 1;
                    let beyond = match (order, key) {
                        (_, None) => true,
                        (Order::OldestFirst, Some(k)) => e.cursor > k,
                        (Order::NewestFirst, Some(k)) => e.cursor < k,
                    };
                    if beyond {
                        matches.push(e);
                    }
                }
            }
        }
        match order {
            Order::OldestFirst => matches.sort_unstable_by_key(|e| e.cursor),
            Order::NewestFirst => matches.sort_unstable_by_key(|e| std::cmp::Reverse(e.cursor)),
        }
        page.more = matches.len() > limit;
        page.events = matches.into_iter().take(limit).cloned().collect();
        page
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.events as usize).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    pub fn share(&self, kind: EventKind) -> usize {
        self.lanes[kind as usize].share
    }
    pub fn bytes_by_kind(&self, kind: EventKind) -> usize {
        self.lanes[kind as usize].bytes
    }
    pub fn events_by_kind(&self, kind: EventKind) -> u64 {
        self.lanes[kind as usize].events
    }
    pub fn expired_by_kind(&self, kind: EventKind) -> u64 {
        self.lanes[kind as usize].expired
    }
    pub fn expired_total(&self) -> u64 {
        self.lanes.iter().map(|l| l.expired).sum()
    }
    /// Every retained event, oldest cursor first (for snapshots).
    pub fn all(&self) -> Vec<Arc<v1::Event>> {
        self.after(0, usize::MAX, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::event::Payload;

    fn ev(i: u64, kind: EventKind) -> v1::Event {
        v1::Event {
            seq: i,
            kind: kind as i32,
            time: Some(ptime::from_unix_nanos(
                (1_764_000_000_000 + i as i128 * 1000) * 1_000_000,
            )),
            payload: Some(match kind {
                EventKind::Xid => Payload::Xid(v1::Xid {
                    code: 79,
                    message: format!("m{i}"),
                    ..Default::default()
                }),
                _ => Payload::DriverLog(v1::DriverLog {
                    text: format!("log line {i}"),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cursors_are_contiguous_and_resumable_across_lanes() {
        let mut r = EventStore::new(1 << 20, 1);
        for i in 0..1000 {
            r.push(ev(
                i,
                if i % 3 == 0 {
                    EventKind::Xid
                } else {
                    EventKind::DriverLog
                },
            ));
        }
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(1), Some(1000)));
        let got: Vec<u64> = r
            .after(990, 100, |_| true)
            .iter()
            .map(|e| e.cursor)
            .collect();
        assert_eq!(got, (991..=1000).collect::<Vec<_>>());
        let xids = r.after(0, 5, |e| e.kind == EventKind::Xid as i32);
        assert_eq!(
            xids.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 4, 7, 10, 13]
        );
        assert!(r.after(1000, 10, |_| true).is_empty());
        assert_eq!(r.events_by_kind(EventKind::Xid), 334);
        assert_eq!(r.all().len(), 1000);
    }

    #[test]
    fn a_flood_of_one_kind_does_not_expire_another_within_its_share() {
        let mut r = EventStore::new(200_000, 1);
        for i in 0..100 {
            r.push(ev(i, EventKind::Xid));
        }
        let mut expired = 0;
        for i in 100..20_000 {
            expired += r.push(ev(i, EventKind::DriverLog)).1;
        }
        assert!(r.bytes() <= r.budget());
        assert_eq!(r.events_by_kind(EventKind::Xid), 100, "XIDs kept");
        assert_eq!(r.expired_by_kind(EventKind::Xid), 0);
        assert_eq!(expired, r.expired_by_kind(EventKind::DriverLog));
        // Driver logs borrowed the unused shares: they use far more than their own 15 %.
        assert!(r.bytes_by_kind(EventKind::DriverLog) > r.share(EventKind::DriverLog) * 3);
        // Once XIDs grow past their share and the budget is full, they expire oldest first.
        for i in 20_000..30_000 {
            r.push(ev(i, EventKind::Xid));
        }
        assert!(r.bytes() <= r.budget());
        assert!(r.expired_by_kind(EventKind::Xid) > 0);
        let oldest_xid = r.after(0, 1, |e| e.kind == EventKind::Xid as i32)[0].seq;
        assert!(oldest_xid > 99, "oldest XIDs went first");
        let sum: usize = [EventKind::DriverLog, EventKind::Xid]
            .iter()
            .map(|k| r.bytes_by_kind(*k))
            .sum();
        assert_eq!(sum, r.bytes());
    }

    #[test]
    fn window_visits_only_blocks_in_range() {
        let mut r = EventStore::new(64 << 20, 1);
        for i in 0..100_000 {
            r.push(ev(i, EventKind::DriverLog));
        }
        // 10 minutes in the middle: 600 events, 3-4 blocks of 256.
        let start = 1_764_000_000_000 + 50_000 * 1000;
        let page = r.window(
            start,
            start + 600_000,
            &[],
            Order::OldestFirst,
            None,
            50,
            |_| true,
        );
        assert_eq!(page.total_matched, 600);
        assert!(page.more);
        assert!(page.blocks_scanned <= 4, "{}", page.blocks_scanned);
        assert_eq!(page.events[0].seq, 50_000);
        let newest = r.window(
            start,
            start + 600_000,
            &[],
            Order::NewestFirst,
            None,
            2,
            |_| true,
        );
        assert_eq!(newest.events[0].seq, 50_599);
        let none = r.window(
            start,
            start + 600_000,
            &[EventKind::Xid],
            Order::OldestFirst,
            None,
            5,
            |_| true,
        );
        assert_eq!((none.total_matched, none.blocks_scanned), (0, 0));
    }

    #[test]
    fn restore_keeps_cursors_and_rejects_old_ones() {
        let mut r = EventStore::new(1 << 20, 1);
        let mut e = ev(1, EventKind::Xid);
        e.cursor = 5;
        assert!(r.restore(e.clone()).is_some());
        assert!(r.restore(e).is_none(), "duplicate cursor");
        let mut e = ev(2, EventKind::DriverLog);
        e.cursor = 9;
        r.restore(e);
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(5), Some(9)));
        assert_eq!(r.push(ev(3, EventKind::Xid)).0.cursor, 10);
        assert_eq!(
            r.after(6, 10, |_| true)
                .iter()
                .map(|e| e.cursor)
                .collect::<Vec<_>>(),
            vec![9, 10]
        );
        r.skip_to(20);
        assert_eq!(r.push(ev(4, EventKind::Xid)).0.cursor, 20);
        r.skip_to(3);
        assert_eq!(r.next_cursor(), 21, "never backwards");
    }
}
