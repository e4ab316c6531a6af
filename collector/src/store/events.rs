//! The in-memory event store: one lane per event kind, each a queue of blocks with a time index
//! (min/max event time per block), all inside one global byte budget.
//!
//! **Events are kept as their encoded bytes**, copied back to back into a block's buffer, next
//! to a small record of what queries filter and sort on (cursor, time, severity, XID code, who
//! sent it). Nothing decoded is retained: an event is decoded again only when a query returns
//! it or a subscriber replays it. A retained decoded event cost several times its encoding (the
//! 696-byte struct, its strings, their allocator headers), and freeing the oldest ones at expiry
//! missed the cache on every piece; a block is two allocations however many events it holds.
//!
//! **Accounting is memory, not payload**: a lane's bytes are the capacities of its blocks'
//! buffers and record vectors plus a fixed overhead per block, so the budget bounds what is
//! really allocated. Expiry is by whole blocks, oldest first, which is also when memory is freed.
//!
//! Budget policy: every kind has a guaranteed share of the global budget and may borrow what
//! other kinds leave unused. When the total goes over, the kind furthest over its share gives up
//! its oldest block first, so a flood of driver log lines or samples cannot expire XIDs that fit
//! in the XID share. The block holding the event just stored is never the one expired.
//!
//! Cursors increase with every stored event, so each lane is sorted by cursor (resume is a binary
//! search) and a window query only visits blocks whose time range meets the window.
use std::{collections::VecDeque, sync::Arc};

use gpulse_proto::{
    time as ptime,
    v1::{self, EventKind, event::Payload},
};
use prost::Message;
use tracing::error;

/// Number of lanes: one per EventKind value 1-8 (index = kind as usize), and lane 0 for
/// `EVENT_KIND_UNKNOWN` (payloads this collector does not know).
pub const KINDS: usize = 9;

/// The lane of a kind.
pub fn lane_of(kind: EventKind) -> usize {
    let k = kind as usize;
    if k < KINDS { k } else { 0 }
}

/// Most events in one block: small enough that a window edge or a resume scans little.
const BLOCK_EVENTS: usize = 256;
/// Bytes of encoded events one block's buffer holds (a larger event gets a block of its own
/// size). Small blocks keep expiry fine-grained in small budgets.
const BLOCK_DATA_BYTES: usize = 8 << 10;
/// Per-block memory beyond its buffers: the block entry, the shared body and its allocator
/// headers.
const BLOCK_OVERHEAD_BYTES: usize = 128;
/// Memory of one record (per stored event, besides its encoding).
pub const RECORD_BYTES: usize = std::mem::size_of::<Rec>();

/// Default guaranteed shares (percent of the global budget) per kind index.
pub const DEFAULT_SHARES: [u32; KINDS] = [
    0,  // unknown payloads (a newer agent's): no guaranteed share
    25, // xid
    5,  // sxid
    15, // driver log
    5,  // agent status
    5,  // gap
    25, // gpu process
    20, // gpu sample (history lives in the series store; the ring keeps the live tail)
    5,  // gpu health (verdict changes: rare, and each GPU's latest is its restart state)
];

/// Event time in ms (the node's time, else when the collector received it).
pub fn event_ms(ev: &v1::Event) -> i64 {
    gpulse_proto::listing::event_ms(ev)
}

/// One bounded step of a replay ([`EventStore::scan_after`]).
#[derive(Debug, Default)]
pub struct Scan {
    pub events: Vec<v1::Event>,
    /// The last cursor looked at: the next step continues after it.
    pub resume: u64,
    /// Nothing is left up to the bound.
    pub done: bool,
}

/// Who sent a batch: the envelope every event of an agent's batches carries, shared by their
/// records instead of copied into each.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub struct Origin {
    pub node: String,
    pub agent_id: String,
}

/// One shared [`Origin`] per (node, agent id), for events restored at start-up (ingest shares
/// one per agent's batches). A lookup allocates nothing once the sender is known.
#[derive(Debug, Default)]
pub struct Senders {
    by_agent: std::collections::HashMap<String, Vec<Arc<Origin>>>,
}

impl Senders {
    pub fn get(&mut self, node: &str, agent_id: &str) -> Arc<Origin> {
        if let Some(o) = self
            .by_agent
            .get(agent_id)
            .and_then(|v| v.iter().find(|o| o.node == node))
        {
            return o.clone();
        }
        let o = Arc::new(Origin {
            node: node.to_string(),
            agent_id: agent_id.to_string(),
        });
        self.by_agent
            .entry(agent_id.to_string())
            .or_default()
            .push(o.clone());
        o
    }
}

/// No `received` time (never the case for events the collector stored itself).
const NO_TIME: i64 = i64::MIN;

fn ts_ns(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(NO_TIME, |t| {
        i64::try_from(ptime::to_unix_nanos(t)).unwrap_or(NO_TIME)
    })
}

fn ns_ts(ns: i64) -> Option<prost_types::Timestamp> {
    (ns != NO_TIME).then(|| ptime::from_unix_nanos(i128::from(ns)))
}

/// One stored event: where its encoding lies in the block's buffer, the envelope the collector
/// set on it, and the fields queries filter on without decoding it.
#[derive(Clone, Debug)]
struct Rec {
    cursor: u64,
    /// Event time (ms), see [`event_ms`].
    ms: i64,
    received_ns: i64,
    origin: Arc<Origin>,
    off: u32,
    len: u32,
    /// The XID code of an XID (0 for every other kind).
    code: u32,
    severity: i32,
}

const _: () = assert!(RECORD_BYTES == 48);

/// A block's contents: records and the encoded events they point into. Shared (read-only) with
/// an events snapshot being written in the background.
#[derive(Debug, Default)]
pub struct Body {
    recs: Vec<Rec>,
    data: Vec<u8>,
}

impl Body {
    fn mem(&self) -> usize {
        self.data.capacity() + self.recs.capacity() * RECORD_BYTES
    }

    /// A writable copy with the same capacities (so accounting does not depend on whether a
    /// snapshot happened to share the block).
    fn copy_for_write(&self) -> Body {
        let mut recs = Vec::with_capacity(self.recs.capacity());
        recs.extend_from_slice(&self.recs);
        let mut data = Vec::with_capacity(self.data.capacity());
        data.extend_from_slice(&self.data);
        Body { recs, data }
    }

    fn event(&self, kind: usize, i: usize) -> Option<EventRef<'_>> {
        let rec = self.recs.get(i)?;
        let bytes = self
            .data
            .get(rec.off as usize..rec.off as usize + rec.len as usize)?;
        Some(EventRef { kind, rec, bytes })
    }

    fn events(&self, kind: usize) -> impl Iterator<Item = EventRef<'_>> + '_ {
        (0..self.recs.len()).filter_map(move |i| self.event(kind, i))
    }
}

/// A stored event as queries see it: its indexed fields without decoding, and the whole event
/// decoded on demand.
#[derive(Clone, Copy, Debug)]
pub struct EventRef<'a> {
    kind: usize,
    rec: &'a Rec,
    bytes: &'a [u8],
}

impl<'a> EventRef<'a> {
    pub fn cursor(&self) -> u64 {
        self.rec.cursor
    }
    /// Event time in ms ([`event_ms`]).
    pub fn ms(&self) -> i64 {
        self.rec.ms
    }
    pub fn kind(&self) -> i32 {
        if self.kind == 0 {
            EventKind::Unknown as i32
        } else {
            self.kind as i32
        }
    }
    pub fn severity(&self) -> i32 {
        self.rec.severity
    }
    pub fn node(&self) -> &'a str {
        &self.rec.origin.node
    }
    pub fn agent_id(&self) -> &'a str {
        &self.rec.origin.agent_id
    }
    /// The XID code, for an XID.
    pub fn xid_code(&self) -> Option<u32> {
        (self.kind == EventKind::Xid as usize).then_some(self.rec.code)
    }
    /// The event's encoding as received (the envelope fields in it are not authoritative).
    pub fn encoded(&self) -> &'a [u8] {
        self.bytes
    }
    pub fn received(&self) -> Option<prost_types::Timestamp> {
        ns_ts(self.rec.received_ns)
    }
    /// `received` in ns since the epoch (`i64::MIN` when absent).
    pub fn received_ns(&self) -> i64 {
        self.rec.received_ns
    }
    /// Who sent it (shared by all events of the sender's batches).
    pub fn origin(&self) -> &'a Arc<Origin> {
        &self.rec.origin
    }

    /// The listing order shared by every collector and gateway: (time in ms, agent id, seq).
    /// Within one agent id the cursor grows with the seq (an agent's events are stored in seq
    /// order, duplicates dropped), so the cursor stands in for the seq without decoding.
    pub fn listing_cmp(&self, o: &EventRef<'_>) -> std::cmp::Ordering {
        (self.rec.ms, self.agent_id(), self.rec.cursor).cmp(&(o.rec.ms, o.agent_id(), o.rec.cursor))
    }

    /// The agent's seq, read from the stored bytes (0 if they do not decode, which they did
    /// when the event was stored).
    pub fn seq(&self) -> u64 {
        SeqOnly::decode(self.bytes).map_or(0, |s| s.seq)
    }

    /// The stored event. Its bytes were decoded once already when it was stored, so this does
    /// not fail; if it ever did, the event is reported and left out rather than invented.
    pub fn decode(&self) -> Option<v1::Event> {
        match v1::Event::decode(self.bytes) {
            Ok(mut ev) => {
                if ev.payload.is_none() {
                    gpulse_proto::convert::mark_unknown(&mut ev, self.bytes);
                }
                ev.node.clone_from(&self.rec.origin.node);
                ev.agent_id.clone_from(&self.rec.origin.agent_id);
                ev.cursor = self.rec.cursor;
                ev.received = self.received();
                Some(ev)
            }
            Err(e) => {
                error!(cursor = self.rec.cursor, error = %e, "stored event does not decode; left out");
                None
            }
        }
    }
}

#[derive(Debug)]
struct Block {
    body: Arc<Body>,
    min_ms: i64,
    max_ms: i64,
    /// Memory counted for this block (buffers + overhead).
    mem: usize,
}

impl Block {
    fn first_cursor(&self) -> u64 {
        self.body.recs.first().map_or(u64::MAX, |r| r.cursor)
    }
    fn last_cursor(&self) -> u64 {
        self.body.recs.last().map_or(0, |r| r.cursor)
    }
    fn len(&self) -> usize {
        self.body.recs.len()
    }
    fn meets(&self, start_ms: i64, end_ms: i64) -> bool {
        self.max_ms >= start_ms && self.min_ms < end_ms
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

impl Lane {
    fn pop_oldest_block(&mut self) -> Option<(usize, u64)> {
        let b = self.blocks.pop_front()?;
        let n = b.len() as u64;
        self.bytes -= b.mem;
        self.events -= n;
        self.expired += n;
        Some((b.mem, n))
    }

    fn oldest_cursor(&self) -> Option<u64> {
        self.blocks.front().map(Block::first_cursor)
    }

    /// Index of the first block that may hold a cursor > `after`.
    fn block_after(&self, after: u64) -> usize {
        self.blocks.partition_point(|b| b.last_cursor() <= after)
    }

    /// Events with cursor > `after`, oldest first.
    fn after(&self, kind: usize, after: u64) -> impl Iterator<Item = EventRef<'_>> + '_ {
        self.blocks
            .iter()
            .skip(self.block_after(after))
            .flat_map(move |b| {
                let from = b.body.recs.partition_point(|r| r.cursor <= after);
                (from..b.len()).filter_map(move |i| b.body.event(kind, i))
            })
    }
}

/// The `seq` field of an encoded event alone (prost skips the rest without allocating).
#[derive(Clone, PartialEq, prost::Message)]
struct SeqOnly {
    #[prost(uint64, tag = "1")]
    seq: u64,
}

/// Where a listing stopped: the last event listed, as (time in ms, agent id) and either this
/// collector's cursor (its own page tokens) or the agent's seq (a position from a gateway,
/// the same on every collector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListKey {
    pub ms: i64,
    pub agent_id: String,
    pub at: KeyAt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAt {
    Cursor(u64),
    Seq(u64),
}

impl ListKey {
    /// How this position compares with `e` in listing order.
    pub fn cmp_event(&self, e: &EventRef<'_>) -> std::cmp::Ordering {
        (self.ms, self.agent_id.as_str())
            .cmp(&(e.ms(), e.agent_id()))
            .then_with(|| match self.at {
                KeyAt::Cursor(c) => c.cmp(&e.cursor()),
                KeyAt::Seq(s) => s.cmp(&e.seq()),
            })
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
    pub events: Vec<v1::Event>,
    /// All events in the window that match, on every page.
    pub total_matched: u64,
    /// More matching events lie beyond this page.
    pub more: bool,
    /// Blocks visited (the time index skipped the rest).
    pub blocks_scanned: usize,
}

/// What an events snapshot is written from: each lane's blocks, shared with the store (no
/// event is copied), walked in cursor order off the state task.
#[derive(Debug, Default)]
pub struct EventsView {
    lanes: Vec<(usize, VecDeque<Arc<Body>>)>,
    events: u64,
}

impl EventsView {
    pub fn len(&self) -> u64 {
        self.events
    }
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Every event, oldest cursor first (a merge of the lanes). Each block is let go as soon as
    /// the walk is past it, so blocks the store expired meanwhile are freed during the walk
    /// rather than after it: a snapshot holds on to at most what expires while it is written.
    pub fn drain(mut self, mut f: impl FnMut(EventRef<'_>)) {
        let mut pos = vec![0usize; self.lanes.len()];
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (i, (_, q)) in self.lanes.iter_mut().enumerate() {
                while q.front().is_some_and(|b| pos[i] >= b.recs.len()) {
                    q.pop_front();
                    pos[i] = 0;
                }
                if let Some(r) = q.front().and_then(|b| b.recs.get(pos[i]))
                    && best.is_none_or(|(_, c)| r.cursor < c)
                {
                    best = Some((i, r.cursor));
                }
            }
            let Some((i, _)) = best else { break };
            let (kind, q) = &self.lanes[i];
            if let Some(e) = q.front().and_then(|b| b.event(*kind, pos[i])) {
                f(e);
            }
            pos[i] += 1;
        }
    }
}

#[derive(Debug)]
pub struct EventStore {
    lanes: [Lane; KINDS],
    bytes: usize,
    budget: usize,
    next_cursor: u64,
}

fn kind_index(ev: &v1::Event) -> usize {
    if ev.payload.is_none() {
        return 0;
    }
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

    /// Stores an event with the next cursor: `ev` decoded (for its indexed fields and
    /// `received`; its own cursor, node and agent id are ignored), `bytes` its encoding, `origin`
    /// who sent it. Returns the cursor and how many old events were expired to make room.
    pub fn push(&mut self, ev: &v1::Event, bytes: &[u8], origin: &Arc<Origin>) -> (u64, u64) {
        let cursor = self.next_cursor;
        self.next_cursor += 1;
        (cursor, self.insert(cursor, ev, bytes, origin))
    }

    /// Re-inserts an event read back from disk with its cursor (`ev.cursor`). Events must come in
    /// increasing cursor order; a jump (events lost to a damaged log) is allowed. Returns how many
    /// events were expired, or None for a cursor already used.
    pub fn restore(&mut self, ev: &v1::Event, bytes: &[u8], origin: &Arc<Origin>) -> Option<u64> {
        if ev.cursor < self.next_cursor {
            return None;
        }
        self.next_cursor = ev.cursor + 1;
        Some(self.insert(ev.cursor, ev, bytes, origin))
    }

    /// Never hand out cursors below `next` (they may have been issued before a crash).
    pub fn skip_to(&mut self, next: u64) {
        self.next_cursor = self.next_cursor.max(next);
    }

    fn insert(&mut self, cursor: u64, ev: &v1::Event, bytes: &[u8], origin: &Arc<Origin>) -> u64 {
        let kind = kind_index(ev);
        let ms = event_ms(ev);
        let lane = &mut self.lanes[kind];
        let fits = |b: &Body| {
            b.recs.len() < BLOCK_EVENTS && b.data.capacity() - b.data.len() >= bytes.len()
        };
        if lane.blocks.back().is_none_or(|b| !fits(&b.body)) {
            // As many records as the block before held (events of a kind are much alike), so
            // the record vector rarely grows and wastes little.
            let body = Body {
                recs: Vec::with_capacity(lane.blocks.back().map_or(0, Block::len)),
                data: Vec::with_capacity(BLOCK_DATA_BYTES.max(bytes.len())),
            };
            let mem = body.mem() + BLOCK_OVERHEAD_BYTES;
            lane.blocks.push_back(Block {
                body: Arc::new(body),
                min_ms: ms,
                max_ms: ms,
                mem,
            });
            lane.bytes += mem;
            self.bytes += mem;
        }
        if let Some(b) = lane.blocks.back_mut() {
            if Arc::get_mut(&mut b.body).is_none() {
                // An events snapshot is reading this block: write into a copy.
                b.body = Arc::new(b.body.copy_for_write());
            }
            if let Some(body) = Arc::get_mut(&mut b.body) {
                let before = body.mem();
                body.recs.push(Rec {
                    cursor,
                    ms,
                    received_ns: ts_ns(ev.received.as_ref()),
                    origin: origin.clone(),
                    off: body.data.len() as u32,
                    len: bytes.len() as u32,
                    code: match &ev.payload {
                        Some(Payload::Xid(x)) => x.code,
                        _ => 0,
                    },
                    severity: ev.severity,
                });
                body.data.extend_from_slice(bytes);
                let grown = body.mem() - before;
                b.mem += grown;
                lane.bytes += grown;
                self.bytes += grown;
            }
            b.min_ms = b.min_ms.min(ms);
            b.max_ms = b.max_ms.max(ms);
        }
        lane.events += 1;
        let mut expired = 0;
        while self.bytes > self.budget {
            // The lane furthest over its share gives way; never the block just written to.
            let victim = (0..KINDS)
                .filter(|k| self.lanes[*k].blocks.len() > usize::from(*k == kind))
                .max_by_key(|k| {
                    let l = &self.lanes[*k];
                    l.bytes as i64 - l.share as i64
                });
            let Some(v) = victim else { break };
            match self.lanes[v].pop_oldest_block() {
                Some((freed, n)) => {
                    self.bytes -= freed;
                    expired += n;
                }
                None => break,
            }
        }
        expired
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
            .filter(|(k, _)| kind.is_none_or(|want| lane_of(want) == *k))
            .flat_map(|(_, l)| l.blocks.iter().take(2).map(|b| b.min_ms))
            .min()
    }

    /// Events with cursor > `after`, oldest first, that satisfy `keep`, at most `limit`, decoded
    /// (a k-way merge of the lanes by cursor).
    pub fn after(
        &self,
        after: u64,
        limit: usize,
        keep: impl FnMut(&EventRef<'_>) -> bool,
    ) -> Vec<v1::Event> {
        self.scan_after(after, u64::MAX, limit, usize::MAX, keep)
            .events
    }

    /// Like [`EventStore::after`] for cursors in `(after, upto]`, looking at no more than
    /// `max_scan` records: one bounded step of a long replay. The answer says where the next
    /// step starts.
    pub fn scan_after(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&EventRef<'_>) -> bool,
    ) -> Scan {
        let mut iters: Vec<_> = self
            .lanes
            .iter()
            .enumerate()
            .map(|(k, l)| l.after(k, after).peekable())
            .collect();
        let mut out = Scan {
            events: Vec::new(),
            resume: after,
            done: false,
        };
        let mut scanned = 0;
        while out.events.len() < limit && scanned < max_scan {
            let mut best: Option<(usize, u64)> = None;
            for (i, it) in iters.iter_mut().enumerate() {
                if let Some(e) = it.peek()
                    && best.is_none_or(|(_, c)| e.cursor() < c)
                {
                    best = Some((i, e.cursor()));
                }
            }
            let Some((i, cursor)) = best.filter(|(_, c)| *c <= upto) else {
                out.done = true;
                return out;
            };
            scanned += 1;
            out.resume = cursor;
            if let Some(e) = iters[i].next()
                && keep(&e)
                && let Some(ev) = e.decode()
            {
                out.events.push(ev);
            }
        }
        out
    }

    /// Events whose time lies in `[start_ms, end_ms)`, of the given kinds (all when empty),
    /// matching `keep`, in listing order ([`EventRef::listing_cmp`]), strictly beyond `key` in
    /// the walking direction, at
    /// most `limit` (decoded). Only blocks whose time range meets the window are visited, and
    /// only the returned events are decoded.
    #[expect(
        clippy::too_many_arguments,
        reason = "a window query's parts, each a plain value the caller already holds"
    )]
    pub fn window(
        &self,
        start_ms: i64,
        end_ms: i64,
        kinds: &[EventKind],
        order: Order,
        key: Option<&ListKey>,
        limit: usize,
        keep: impl FnMut(&EventRef<'_>) -> bool,
    ) -> WindowPage {
        let mut events = Vec::new();
        let (total_matched, more, blocks_scanned) =
            self.window_each(start_ms, end_ms, kinds, order, key, limit, keep, |e| {
                events.push(e)
            });
        WindowPage {
            events,
            total_matched,
            more,
            blocks_scanned,
        }
    }

    /// [`EventStore::window`] handing each decoded event to `visit` instead of collecting them,
    /// so an aggregation over many events holds one at a time. Returns (total matched, more
    /// beyond `limit`, blocks visited).
    #[expect(
        clippy::too_many_arguments,
        reason = "a window query's parts, each a plain value the caller already holds"
    )]
    pub fn window_each(
        &self,
        start_ms: i64,
        end_ms: i64,
        kinds: &[EventKind],
        order: Order,
        key: Option<&ListKey>,
        limit: usize,
        mut keep: impl FnMut(&EventRef<'_>) -> bool,
        mut visit: impl FnMut(v1::Event),
    ) -> (u64, bool, usize) {
        let (mut total, mut blocks) = (0, 0);
        let mut matches: Vec<EventRef<'_>> = Vec::new();
        for (k, lane) in self.lanes.iter().enumerate() {
            if !kinds.is_empty() && !kinds.iter().any(|want| lane_of(*want) == k) {
                continue;
            }
            for b in lane.blocks.iter().filter(|b| b.meets(start_ms, end_ms)) {
                blocks += 1;
                for e in b.body.events(k) {
                    if e.ms() < start_ms || e.ms() >= end_ms || !keep(&e) {
                        continue;
                    }
                    total += 1;
                    let beyond = match (order, key) {
                        (_, None) => true,
                        (Order::OldestFirst, Some(k)) => k.cmp_event(&e).is_lt(),
                        (Order::NewestFirst, Some(k)) => k.cmp_event(&e).is_gt(),
                    };
                    if beyond {
                        matches.push(e);
                    }
                }
            }
        }
        let cmp = |a: &EventRef<'_>, b: &EventRef<'_>| match order {
            Order::OldestFirst => a.listing_cmp(b),
            Order::NewestFirst => b.listing_cmp(a),
        };
        // Only the first `limit` are returned: select them (linear) before sorting them, rather
        // than sorting a window of hundreds of thousands for a page of a hundred.
        let more = matches.len() > limit;
        if more && limit > 0 {
            matches.select_nth_unstable_by(limit - 1, cmp);
            matches.truncate(limit);
        }
        matches.sort_unstable_by(cmp);
        matches
            .iter()
            .take(limit)
            .filter_map(EventRef::decode)
            .for_each(&mut visit);
        (total, more, blocks)
    }

    /// Visits every stored event whose time lies in `[start_ms, end_ms)` of the given kinds (all
    /// when empty), in no particular order, without decoding any.
    pub fn scan(
        &self,
        start_ms: i64,
        end_ms: i64,
        kinds: &[EventKind],
        mut f: impl FnMut(&EventRef<'_>),
    ) {
        for (k, lane) in self.lanes.iter().enumerate() {
            if !kinds.is_empty() && !kinds.iter().any(|want| lane_of(*want) == k) {
                continue;
            }
            for b in lane.blocks.iter().filter(|b| b.meets(start_ms, end_ms)) {
                for e in b.body.events(k) {
                    if e.ms() >= start_ms && e.ms() < end_ms {
                        f(&e);
                    }
                }
            }
        }
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
        self.lanes[lane_of(kind)].share
    }
    pub fn bytes_by_kind(&self, kind: EventKind) -> usize {
        self.lanes[lane_of(kind)].bytes
    }
    pub fn events_by_kind(&self, kind: EventKind) -> u64 {
        self.lanes[lane_of(kind)].events
    }
    pub fn expired_by_kind(&self, kind: EventKind) -> u64 {
        self.lanes[lane_of(kind)].expired
    }
    pub fn expired_total(&self) -> u64 {
        self.lanes.iter().map(|l| l.expired).sum()
    }

    /// Every retained event, shared block by block, for a snapshot written off the state task.
    pub fn view(&self) -> EventsView {
        EventsView {
            lanes: self
                .lanes
                .iter()
                .enumerate()
                .map(|(k, l)| (k, l.blocks.iter().map(|b| b.body.clone()).collect()))
                .collect(),
            events: self.len() as u64,
        }
    }
}

/// A stored event is matched by the contract's filter without decoding, but for GPU identities.
impl gpulse_proto::filter::Subject for EventRef<'_> {
    fn node(&self) -> &str {
        EventRef::node(self)
    }
    fn kind(&self) -> i32 {
        EventRef::kind(self)
    }
    fn severity(&self) -> i32 {
        EventRef::severity(self)
    }
    fn xid_code(&self) -> Option<u32> {
        EventRef::xid_code(self)
    }
    fn gpu_keys_match(&self, f: &mut dyn FnMut([&str; 2]) -> bool) -> bool {
        self.decode().is_some_and(|ev| f(ev.gpu_keys()))
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
            received: Some(ptime::from_unix_nanos(1_764_000_000_123_456_789)),
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

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            node: "n1".into(),
            agent_id: "n1/a".into(),
        })
    }

    fn push(r: &mut EventStore, e: v1::Event) -> (u64, u64) {
        r.push(&e, &e.encode_to_vec(), &origin())
    }

    #[test]
    fn stored_events_decode_with_their_envelope() {
        let mut r = EventStore::new(1 << 20, 1);
        let mut e = ev(7, EventKind::Xid);
        // What the agent put in the envelope fields is not what is stored.
        e.node = "liar".into();
        e.cursor = 99;
        let bytes = e.encode_to_vec();
        let (cursor, _) = r.push(&e, &bytes, &origin());
        assert_eq!(cursor, 1);
        let got = r.after(0, 10, |_| true);
        assert_eq!(got.len(), 1);
        let mut want = e.clone();
        want.node = "n1".into();
        want.agent_id = "n1/a".into();
        want.cursor = 1;
        assert_eq!(got[0], want);
        let mut seen = Vec::new();
        r.scan(i64::MIN, i64::MAX, &[], |e| {
            seen.push((
                e.node().to_string(),
                e.xid_code(),
                e.severity(),
                e.encoded().len(),
            ))
        });
        assert_eq!(seen, vec![("n1".to_string(), Some(79), 0, bytes.len())]);
    }

    #[test]
    fn cursors_are_contiguous_and_resumable_across_lanes() {
        let mut r = EventStore::new(1 << 20, 1);
        for i in 0..1000 {
            push(
                &mut r,
                ev(
                    i,
                    if i % 3 == 0 {
                        EventKind::Xid
                    } else {
                        EventKind::DriverLog
                    },
                ),
            );
        }
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(1), Some(1000)));
        let got: Vec<u64> = r
            .after(990, 100, |_| true)
            .iter()
            .map(|e| e.cursor)
            .collect();
        assert_eq!(got, (991..=1000).collect::<Vec<_>>());
        let xids = r.after(0, 5, |e| e.kind() == EventKind::Xid as i32);
        assert_eq!(
            xids.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 4, 7, 10, 13]
        );
        assert!(r.after(1000, 10, |_| true).is_empty());
        assert_eq!(r.events_by_kind(EventKind::Xid), 334);
        let mut all = Vec::new();
        r.view().drain(|e| all.push(e.cursor()));
        assert_eq!(all, (1..=1000).collect::<Vec<_>>());
    }

    #[test]
    fn accounting_is_the_memory_of_the_blocks() {
        let mut r = EventStore::new(64 << 20, 1);
        for i in 0..10_000 {
            push(&mut r, ev(i, EventKind::DriverLog));
        }
        let lane = &r.lanes[EventKind::DriverLog as usize];
        let real: usize = lane
            .blocks
            .iter()
            .map(|b| b.body.data.capacity() + b.body.recs.capacity() * RECORD_BYTES)
            .sum::<usize>()
            + lane.blocks.len() * BLOCK_OVERHEAD_BYTES;
        assert_eq!(r.bytes(), real);
        assert_eq!(r.bytes_by_kind(EventKind::DriverLog), real);
        // ~30-byte events: far below the ~900 bytes a retained decoded event cost.
        let per_event = real / 10_000;
        assert!(
            (60..120).contains(&per_event),
            "{per_event} bytes per event"
        );
    }

    #[test]
    fn a_flood_of_one_kind_does_not_expire_another_within_its_share() {
        let mut r = EventStore::new(400_000, 1);
        for i in 0..100 {
            push(&mut r, ev(i, EventKind::Xid));
        }
        let mut expired = 0;
        for i in 100..40_000 {
            expired += push(&mut r, ev(i, EventKind::DriverLog)).1;
        }
        assert!(r.bytes() <= r.budget());
        assert_eq!(r.events_by_kind(EventKind::Xid), 100, "XIDs kept");
        assert_eq!(r.expired_by_kind(EventKind::Xid), 0);
        assert_eq!(expired, r.expired_by_kind(EventKind::DriverLog));
        // Driver logs borrowed the unused shares: they use far more than their own 15 %.
        assert!(r.bytes_by_kind(EventKind::DriverLog) > r.share(EventKind::DriverLog) * 3);
        // Once XIDs grow past their share and the budget is full, they expire oldest first.
        for i in 40_000..60_000 {
            push(&mut r, ev(i, EventKind::Xid));
        }
        assert!(r.bytes() <= r.budget());
        assert!(r.expired_by_kind(EventKind::Xid) > 0);
        let oldest_xid = r.after(0, 1, |e| e.kind() == EventKind::Xid as i32)[0].seq;
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
            push(&mut r, ev(i, EventKind::DriverLog));
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
        assert_eq!(page.events.len(), 50);
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

    /// A replay step stops at its scan budget, its event limit or its upper cursor, and says
    /// where to go on; steps chained from there see every match once.
    #[test]
    fn scan_after_is_bounded_and_resumable() {
        let mut r = EventStore::new(1 << 20, 1);
        for i in 0..100u64 {
            let kind = if i % 10 == 0 {
                EventKind::Xid
            } else {
                EventKind::DriverLog
            };
            push(&mut r, ev(i + 1, kind));
        }
        let xid = |e: &EventRef<'_>| e.kind() == EventKind::Xid as i32;
        // Scan budget: 15 records hold two XIDs (cursors 1 and 11).
        let s = r.scan_after(0, 100, 50, 15, xid);
        assert_eq!(
            s.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            [1, 11]
        );
        assert_eq!((s.resume, s.done), (15, false));
        // Event limit.
        let s = r.scan_after(0, 100, 3, usize::MAX, xid);
        assert_eq!((s.events.len(), s.resume, s.done), (3, 21, false));
        // Upper bound.
        let s = r.scan_after(0, 30, 50, usize::MAX, xid);
        assert_eq!(
            s.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            [1, 11, 21]
        );
        assert!(s.done);
        // Chained steps of 7 records: every XID once, in order.
        let (mut after, mut seen) = (0, Vec::new());
        loop {
            let s = r.scan_after(after, 100, 50, 7, xid);
            seen.extend(s.events.iter().map(|e| e.cursor));
            if s.done || s.resume >= 100 {
                break;
            }
            after = s.resume;
        }
        assert_eq!(seen, (0..10).map(|i| i * 10 + 1).collect::<Vec<u64>>());
    }

    #[test]
    fn restore_keeps_cursors_and_rejects_old_ones() {
        let mut r = EventStore::new(1 << 20, 1);
        let o = origin();
        let mut e = ev(1, EventKind::Xid);
        e.cursor = 5;
        let b = e.encode_to_vec();
        assert!(r.restore(&e, &b, &o).is_some());
        assert!(r.restore(&e, &b, &o).is_none(), "duplicate cursor");
        let mut e = ev(2, EventKind::DriverLog);
        e.cursor = 9;
        r.restore(&e, &e.encode_to_vec(), &o);
        assert_eq!((r.oldest_cursor(), r.last_cursor()), (Some(5), Some(9)));
        assert_eq!(push(&mut r, ev(3, EventKind::Xid)).0, 10);
        assert_eq!(
            r.after(6, 10, |_| true)
                .iter()
                .map(|e| e.cursor)
                .collect::<Vec<_>>(),
            vec![9, 10]
        );
        r.skip_to(20);
        assert_eq!(push(&mut r, ev(4, EventKind::Xid)).0, 20);
        r.skip_to(3);
        assert_eq!(r.next_cursor(), 21, "never backwards");
    }

    #[test]
    fn a_snapshot_view_is_unchanged_by_later_writes_and_expiry() {
        let mut r = EventStore::new(200_000, 1);
        for i in 0..100 {
            push(&mut r, ev(i, EventKind::DriverLog));
        }
        let bytes = r.bytes();
        let view = r.view();
        // The open block is shared with the view: the next write copies it, at the same size.
        push(&mut r, ev(100, EventKind::DriverLog));
        assert_eq!(r.bytes(), bytes, "the copy keeps the capacities");
        for i in 101..20_000 {
            push(&mut r, ev(i, EventKind::DriverLog));
        }
        assert!(r.expired_total() > 100);
        assert_eq!(view.len(), 100);
        let mut seen = Vec::new();
        view.drain(|e| seen.push(e.decode().map(|d| d.seq)));
        assert_eq!(seen, (0..100).map(Some).collect::<Vec<_>>());
    }
}
