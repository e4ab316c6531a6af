//! Store recovery at start-up: the snapshots, then the write-ahead log after them, streamed into
//! a fresh event store and sample history.
//!
//! Restart memory stays within the running budget: the events snapshot and the log are streamed
//! (one snapshot entry, one log segment at a time) straight into the store, which copies what it
//! keeps into its own blocks and expires as it would at ingest. What the collector builds on top
//! of the events (counters, node state) is handed each restored event through a visitor.
use std::path::Path;

use gpulse_proto::{metric, time as ptime, v1};
use tracing::{info, warn};

use super::{
    events::{EventStore, Senders},
    series::{SeriesBudgets, SeriesStore},
    snapshot::{
        self, COUNTERS_FILE, CounterRow, EVENTS_FILE, EventsReader, SERIES_FILE, SeriesSnapshot,
        SnapKind,
    },
    wal::{Replayed, Wal, WalError, WalReplay},
};
use crate::FastMap;

/// The snapshots and the log, opened; counters are known before any event is replayed.
pub struct Opened {
    wal: WalReplay,
    events: Option<EventsReader>,
    series: Option<SeriesSnapshot>,
    /// XID and SXid counter totals, and the cursor they count through.
    pub counters: Option<(u64, Vec<CounterRow>)>,
    /// Snapshots that were damaged or unreadable (skipped; the log still replays).
    pub damaged: Vec<SnapKind>,
    /// A damaged events snapshot's (through cursor, event count), from its header.
    damaged_events: Option<(u64, u64)>,
}

/// Whether a restored event went back into the event store, or only into the history built
/// from it (an event the events snapshot covers, or one that expired before it was written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restored {
    Stored,
    HistoryOnly,
}

/// The recovered store.
pub struct Recovered {
    pub events: EventStore,
    pub series: SeriesStore,
    pub wal: Wal,
    /// Last cursor the snapshot on disk covers (0 = none).
    pub events_through: u64,
    pub series_through: u64,
    /// Every agent's highest stored seq (with its node, boot and when it was last heard of).
    pub agents: FastMap<String, v1::AgentProgress>,
    /// Log frames skipped as damaged.
    pub corruptions: usize,
    pub damaged: Vec<SnapKind>,
    /// Events lost to damage, counted: those of skipped log frames (from the cursors around
    /// them) and those a damaged events snapshot held that the log did not replay.
    pub events_lost: u64,
}

/// Opens the snapshots and the log in `dir`.
pub fn open(dir: &Path, wal_segment_bytes: u64) -> Result<Opened, WalError> {
    let wal = Wal::replay(dir, wal_segment_bytes)?;
    let mut damaged = Vec::new();
    let mut damaged_events = None;
    let events = EventsReader::open(dir, EVENTS_FILE).unwrap_or_else(|e| {
        damaged_events = snapshot::peek_events_header(dir, EVENTS_FILE);
        warn!(error = %e, held = damaged_events.map(|(_, n)| n), "events snapshot damaged or unreadable; skipped (the write-ahead log still replays what it holds; the loss is counted after the replay)");
        damaged.push(SnapKind::Events);
        None
    });
    // Streamed from its file: a restart never holds the file and the history it decodes to.
    let mut series = snapshot::read_series(dir, SERIES_FILE, &metric::names()).unwrap_or_else(|e| {
        warn!(error = %e, "series snapshot damaged or unreadable; skipped (the write-ahead log still replays)");
        damaged.push(SnapKind::Series);
        None
    });
    // Counter totals: their own file, else inside a series snapshot of an earlier collector.
    let mut counters = series
        .as_mut()
        .and_then(|s| Some((s.through, s.counters.take()?)));
    if let Some(c) = read_counters(dir, &mut damaged) {
        counters = Some(c);
    }
    Ok(Opened {
        wal,
        events,
        series,
        counters,
        damaged,
        damaged_events,
    })
}

fn read_counters(dir: &Path, damaged: &mut Vec<SnapKind>) -> Option<(u64, Vec<CounterRow>)> {
    let data = match snapshot::read(dir, COUNTERS_FILE) {
        Ok(d) => d?,
        Err(e) => {
            warn!(error = %e, "counters snapshot unreadable; starting without it");
            damaged.push(SnapKind::Series);
            return None;
        }
    };
    snapshot::decode_counters(&data)
        .map_err(|reason| {
            let e = snapshot::corrupt(dir, COUNTERS_FILE, reason);
            warn!(error = %e, "counters snapshot damaged; skipped (the write-ahead log still replays)");
            damaged.push(SnapKind::Series);
        })
        .ok()
}

/// Raises `agents`' progress to `p` (keeping the highest seq per agent).
fn merge_progress(agents: &mut FastMap<String, v1::AgentProgress>, p: v1::AgentProgress) {
    match agents.get_mut(&p.agent_id) {
        Some(e) if p.through_seq > e.through_seq => *e = p,
        Some(_) => {}
        None => {
            agents.insert(p.agent_id.clone(), p);
        }
    }
}

/// Raises an agent's progress to a replayed event's seq (allocating only for a new agent).
fn merge_event(agents: &mut FastMap<String, v1::AgentProgress>, ev: &v1::Event) {
    match agents.get_mut(&ev.agent_id) {
        Some(e) if ev.seq > e.through_seq => {
            e.through_seq = ev.seq;
            e.last_seen = ev.received;
            if e.node != ev.node {
                e.node.clone_from(&ev.node);
            }
        }
        Some(_) => {}
        None => merge_progress(
            agents,
            v1::AgentProgress {
                agent_id: ev.agent_id.clone(),
                through_seq: ev.seq,
                node: ev.node.clone(),
                boot_id: String::new(),
                last_seen: ev.received,
            },
        ),
    }
}

/// One restored event: the snapshot's or the log's.
type Entry = (Box<v1::Event>, prost::bytes::Bytes);

/// The store being rebuilt, and what the replay learns on the way.
struct Restorer {
    store: EventStore,
    series: SeriesStore,
    agents: FastMap<String, v1::AgentProgress>,
    /// One shared envelope per sender, as at ingest.
    senders: Senders,
    next_cursor: u64,
    events_through: u64,
    series_through: u64,
    restored: u64,
    from_snapshot: u64,
    /// A damaged events snapshot's through cursor, and the log's events at or below it (what
    /// of the snapshot's events the log still had).
    damaged_through: Option<u64>,
    covered_by_log: u64,
}

/// Log checkpoints met during the replay: agents' progress and the next cursor.
struct Checkpoints {
    agents: FastMap<String, v1::AgentProgress>,
    next_cursor: u64,
}

impl Restorer {
    /// Starts from the snapshots: the events snapshot's checkpoint and the sample history.
    fn new(
        events_bytes: usize,
        budgets: SeriesBudgets,
        events: Option<&EventsReader>,
        series: Option<SeriesSnapshot>,
    ) -> Self {
        let mut agents = FastMap::default();
        let (mut next_cursor, mut events_through) = (1, 0);
        if let Some(es) = events {
            for a in &es.checkpoint.agents {
                merge_progress(&mut agents, a.clone());
            }
            next_cursor = es.checkpoint.next_cursor.max(1);
            events_through = es.through;
        }
        let (series_through, series) = match series {
            Some(ss) => {
                if !ss.added.is_empty() || !ss.dropped.is_empty() {
                    info!(added = ?ss.added, dropped = ?ss.dropped, "sample history mapped to this collector's metrics by name");
                }
                (
                    ss.through,
                    SeriesStore::restore(metric::COUNT, budgets, ss.gpus),
                )
            }
            None => (0, SeriesStore::new(metric::COUNT, budgets)),
        };
        Self {
            store: EventStore::new(events_bytes, 1),
            series,
            agents,
            senders: Senders::default(),
            next_cursor,
            events_through,
            series_through,
            restored: 0,
            from_snapshot: 0,
            damaged_through: None,
            covered_by_log: 0,
        }
    }

    /// A log event's seq raises its agent's progress.
    fn count_log(&mut self, ev: &v1::Event) {
        self.restored += 1;
        merge_event(&mut self.agents, ev);
    }

    /// Puts one event back: into the store (unless the events snapshot covers it) and the
    /// sample history (unless its snapshot does); `visit` sees it after.
    fn place(
        &mut self,
        from_snap: bool,
        (ev, encoded): Entry,
        visit: &mut impl FnMut(Box<v1::Event>, Restored),
    ) {
        if from_snap {
            self.from_snapshot += 1;
        } else {
            self.count_log(&ev);
            if self.damaged_through.is_some_and(|t| ev.cursor <= t) {
                self.covered_by_log += 1;
            }
        }
        let history = ev.cursor > self.series_through;
        if !from_snap && ev.cursor <= self.events_through {
            // Covered by the events snapshot (or expired before it): history only.
            if history {
                self.series.add_event(&ev);
            }
            visit(ev, Restored::HistoryOnly);
            return;
        }
        self.next_cursor = self.next_cursor.max(ev.cursor + 1);
        let origin = self.senders.get(&ev.node, &ev.agent_id);
        if self.store.restore(&ev, &encoded, &origin).is_none() {
            return; // a cursor already restored
        }
        drop(encoded);
        if history {
            self.series.add_event(&ev);
        }
        visit(ev, Restored::Stored);
    }

    fn finish(
        mut self,
        wal_replay: WalReplay,
        cp: Checkpoints,
        damaged: Vec<SnapKind>,
        snapshot_held: Option<u64>,
    ) -> Result<Recovered, WalError> {
        for p in cp.agents.into_values() {
            merge_progress(&mut self.agents, p);
        }
        // Retention counts from the last time an agent was heard of; one restored without that
        // counts from now.
        let restart = ptime::now();
        for a in self.agents.values_mut() {
            a.last_seen.get_or_insert(restart);
        }
        let mut next_cursor = self.next_cursor.max(cp.next_cursor);
        let (wal, replay) = wal_replay.finish()?;
        // Frames lost to damage may have carried cursors already handed to subscribers: skip
        // past every cursor they could have held (a frame is at least 9 bytes) so none is reused.
        let mut events_lost = 0;
        for c in &replay.corruptions {
            next_cursor += c.skipped_bytes / 9 + 1;
            events_lost += c.events_lost.unwrap_or(0);
            warn!(segment = %c.segment, offset = c.offset, skipped_bytes = c.skipped_bytes, events_lost = c.events_lost, reason = %c.reason, "WAL damage skipped at start-up");
        }
        if let Some(held) = snapshot_held {
            let lost = held.saturating_sub(self.covered_by_log);
            events_lost += lost;
            warn!(
                held,
                replayed_from_log = self.covered_by_log,
                events_lost = lost,
                "events lost with the damaged events snapshot"
            );
        }
        self.store.skip_to(next_cursor);
        info!(
            restored_events = self.restored,
            from_snapshot = self.from_snapshot,
            retained = self.store.len(),
            agents = self.agents.len(),
            segments = replay.segments,
            corruptions = replay.corruptions.len(),
            events_lost,
            next_cursor = self.store.next_cursor(),
            sample_gpus = self.series.gpus().len(),
            "store restored from snapshots and write-ahead log"
        );
        Ok(Recovered {
            events: self.store,
            series: self.series,
            wal,
            events_through: self.events_through,
            series_through: self.series_through,
            agents: self.agents,
            corruptions: replay.corruptions.len(),
            damaged,
            events_lost,
        })
    }
}

impl Opened {
    /// Streams the events snapshot and the log, merged in cursor order, into a new event store
    /// of `events_bytes` and the sample history; `visit` sees every event after it was placed.
    pub fn replay(
        self,
        events_bytes: usize,
        budgets: SeriesBudgets,
        mut visit: impl FnMut(Box<v1::Event>, Restored),
    ) -> Result<Recovered, WalError> {
        let Opened {
            wal: mut wal_replay,
            events: events_snap,
            series: series_snap,
            counters: _,
            mut damaged,
            damaged_events,
        } = self;
        let mut r = Restorer::new(events_bytes, budgets, events_snap.as_ref(), series_snap);
        r.damaged_through = damaged_events.map(|(through, _)| through);
        let mut cp = Checkpoints {
            agents: FastMap::default(),
            next_cursor: 1,
        };
        {
            let damaged = &mut damaged;
            let mut snap_iter = events_snap
                .into_iter()
                .flatten()
                .map_while(|r| match r {
                    Ok((e, b)) => Some((Box::new(e), b)),
                    Err(reason) => {
                        warn!(%reason, "events snapshot ends early; the rest is skipped");
                        damaged.push(SnapKind::Events);
                        None
                    }
                })
                .peekable();
            let mut wal_iter = wal_replay
                .by_ref()
                .filter_map(|item| match item {
                    Replayed::Event(ev, encoded) => Some((ev, encoded)),
                    Replayed::Checkpoint(c) => {
                        cp.next_cursor = cp.next_cursor.max(c.next_cursor);
                        // Bounded by the agents the collector tracks: the highest per agent.
                        for a in c.agents {
                            merge_progress(&mut cp.agents, a);
                        }
                        None
                    }
                })
                .peekable();
            while let Some((from_snap, entry)) = next_in_order(&mut snap_iter, &mut wal_iter) {
                if from_snap
                    && wal_iter
                        .peek()
                        .is_some_and(|(w, _)| w.cursor == entry.0.cursor)
                {
                    // The same event is in the log too: keep one.
                    if let Some((w, _)) = wal_iter.next() {
                        r.count_log(&w);
                    }
                }
                r.place(from_snap, entry, &mut visit);
            }
        }
        r.finish(wal_replay, cp, damaged, damaged_events.map(|(_, n)| n))
    }
}

/// The next entry by cursor from the snapshot or the log, and whether it is the snapshot's.
fn next_in_order(
    snap: &mut std::iter::Peekable<impl Iterator<Item = Entry>>,
    wal: &mut std::iter::Peekable<impl Iterator<Item = Entry>>,
) -> Option<(bool, Entry)> {
    let take_snap = match (snap.peek(), wal.peek()) {
        (Some((a, _)), Some((b, _))) => a.cursor <= b.cursor,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if take_snap {
        snap.next().map(|e| (true, e))
    } else {
        wal.next().map(|e| (false, e))
    }
}
