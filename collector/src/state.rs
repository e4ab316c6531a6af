//! The one task that owns collector state (tokio-console style): ingest, de-duplication, the
//! ring, the WAL, and subscriber fan-out. RPC handlers talk to it over a channel, so no lock is
//! ever held across I/O and ingest order is the store order.
use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use gpulse_proto::{
    names::ShortName,
    time as ptime,
    v1::{
        self, EventKind, GapStage, Lagged, ListEventsRequest, ListEventsResponse, StatusResponse,
        StoreCheckpoint, TimeWindow, TrendRequest, TrendResponse, event::Payload,
    },
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    FastMap,
    counters::Counters,
    filter::Filter,
    health::StoreHealth,
    ingest::{IngestBatch, Wire},
    metrics::Metrics,
    query::{self, QueryError},
    store::{
        events::{EventStore, Origin, Senders, event_ms},
        series::{SeriesBudgets, SeriesStore, Tier},
        snapshot::{self, COUNTERS_FILE, EVENTS_FILE, SERIES_FILE},
        syncer::{SyncDone, Syncer},
        wal::{BatchHeader, Replayed, RotateError, Wal},
    },
};

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub ring_bytes: usize,
    pub wal_segment_bytes: u64,
    /// fdatasync before acknowledging (off only for throw-away data dirs).
    pub fsync: bool,
    pub subscriber_queue: usize,
    /// Events per step of a resuming subscriber's replay: the next step is read only when the
    /// client has taken this one (back-pressure), so no replay holds more than this.
    pub replay_chunk: usize,
    /// Sample history budgets (raw, 1 min, 1 h).
    pub series: SeriesBudgets,
    /// How often the sample history is snapshotted (it outlives the write-ahead log).
    pub snapshot_interval: Duration,
    /// Once the log holds more than this, the event store is snapshotted so old segments can go
    /// (0 = twice the ring budget).
    pub wal_max_bytes: u64,
    /// Most open Subscribe streams; more are refused with RESOURCE_EXHAUSTED.
    pub max_subscribers: usize,
    /// Replaces `fdatasync` (tests: a slow or failing disk).
    pub sync_hook: Option<crate::store::syncer::SyncHook>,
    /// Event times more than this after the received time are replaced by it (and kept in
    /// `reported_time`): a clock ahead must not freeze a GPU's history.
    pub max_clock_skew: Duration,
    /// Agent ids without a connection for this long are forgotten (ids are never reused).
    pub agent_retention: Duration,
    /// Nodes not heard from for this long leave the node and GPU gauges and `Nodes`.
    pub node_retention: Duration,
}

impl StoreConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            ring_bytes: 256 << 20,
            wal_segment_bytes: 16 << 20,
            fsync: true,
            subscriber_queue: 4096,
            replay_chunk: 1024,
            series: SeriesBudgets::default(),
            snapshot_interval: Duration::from_secs(60),
            wal_max_bytes: 0,
            max_subscribers: 1024,
            sync_hook: None,
            max_clock_skew: Duration::from_secs(600),
            agent_retention: Duration::from_secs(86_400),
            node_retention: Duration::from_secs(86_400),
        }
    }
}

/// What a subscriber's channel carries.
#[derive(Clone, Debug)]
pub enum SubMsg {
    Event(Arc<v1::Event>),
    Lagged(Lagged),
}

/// The answer to a Subscribe: the first step of stored events to replay, where the next step
/// starts (ask [`StoreHandle::replay_step`]), then the live channel.
pub struct Subscription {
    pub replay: Vec<SubMsg>,
    pub next: Option<ReplayFrom>,
    pub live: mpsc::Receiver<SubMsg>,
}

/// Where a replay continues: cursors in `(after, upto]` (`upto`: the newest cursor when the
/// subscriber registered; later events reach it live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayFrom {
    pub after: u64,
    pub upto: u64,
}

/// One step of a replay.
pub struct ReplayStep {
    pub events: Vec<SubMsg>,
    pub next: Option<ReplayFrom>,
}

/// Records one replay step looks at, at most: a filter that matches little must not make one
/// step scan the whole store on the state task.
const REPLAY_SCAN: usize = 65_536;

/// Result of storing one batch.
pub struct IngestOutcome {
    pub through_seq: u64,
    pub duplicates: u64,
    pub stored: u64,
    /// Resolves when the stored events are on disk (None when nothing new was written or fsync
    /// is off).
    pub durable: Option<oneshot::Receiver<Result<(), String>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is shutting down")]
    Closed,
    #[error("writing the write-ahead log failed: {0}")]
    Write(String),
    #[error(
        "the store stopped acknowledging after a failed fsync ({0}); it restarts and replays its log"
    )]
    Failed(String),
    #[error("{0} subscribers are open (--max-subscribers); retry later or use another collector")]
    TooManySubscribers(usize),
}

pub enum Command {
    Hello {
        agent_id: String,
        node: String,
        boot_id: String,
        reply: oneshot::Sender<u64>,
    },
    Ingest {
        batch: IngestBatch,
        reply: oneshot::Sender<Result<IngestOutcome, StoreError>>,
    },
    Disconnected {
        agent_id: String,
    },
    Subscribe {
        filter: Filter,
        after: Option<u64>,
        reply: oneshot::Sender<Result<Subscription, StoreError>>,
    },
    ReplayStep {
        filter: Filter,
        from: ReplayFrom,
        reply: oneshot::Sender<ReplayStep>,
    },
    /// Make everything written durable, write the sample snapshot if it changed, and stop.
    Shutdown {
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: oneshot::Sender<StatusResponse>,
    },
    /// Per node and per GPU gauges, rendered when /metrics is scraped.
    Exposition {
        reply: oneshot::Sender<String>,
    },
    Nodes {
        window: Option<TimeWindow>,
        reply: oneshot::Sender<Result<v1::NodesResponse, QueryError>>,
    },
    ListEvents {
        req: ListEventsRequest,
        reply: oneshot::Sender<Result<ListEventsResponse, QueryError>>,
    },
    Trend {
        req: TrendRequest,
        reply: oneshot::Sender<Result<TrendResponse, QueryError>>,
    },
    /// A read-only query of the event store (an aggregation); it sends its own answer.
    ReadEvents {
        rpc: &'static str,
        run: Box<dyn FnOnce(&EventStore) + Send>,
    },
}

/// A snapshot written in the background finished.
struct SnapshotDone {
    kind: SnapKind,
    through: u64,
    result: Result<(), String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapKind {
    Series,
    Events,
}

impl SnapKind {
    fn name(self) -> &'static str {
        match self {
            SnapKind::Series => "series",
            SnapKind::Events => "events",
        }
    }
}

/// Cheap handle for RPC handlers.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
    health: Arc<StoreHealth>,
}

impl StoreHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    pub async fn hello(
        &self,
        agent_id: String,
        node: String,
        boot_id: String,
    ) -> Result<u64, StoreError> {
        self.call(|reply| Command::Hello {
            agent_id,
            node,
            boot_id,
            reply,
        })
        .await
    }

    pub async fn ingest(&self, batch: IngestBatch) -> Result<IngestOutcome, StoreError> {
        self.call(|reply| Command::Ingest { batch, reply }).await?
    }

    /// What /healthz and /readyz report.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// The state task has ended (stopped, or panicked).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Syncs the log, writes the sample snapshot if it changed, and stops the state task.
    pub async fn shutdown(&self) -> Result<(), String> {
        self.call(|reply| Command::Shutdown { reply })
            .await
            .map_err(|e| e.to_string())?
    }

    pub async fn disconnected(&self, agent_id: String) {
        let _ = self.tx.send(Command::Disconnected { agent_id }).await;
    }

    pub async fn subscribe(
        &self,
        filter: Filter,
        after: Option<u64>,
    ) -> Result<Subscription, StoreError> {
        self.call(|reply| Command::Subscribe {
            filter,
            after,
            reply,
        })
        .await?
    }

    /// The next step of a subscriber's replay.
    pub async fn replay_step(
        &self,
        filter: Filter,
        from: ReplayFrom,
    ) -> Result<ReplayStep, StoreError> {
        self.call(|reply| Command::ReplayStep {
            filter,
            from,
            reply,
        })
        .await
    }

    /// Node and GPU gauges in the Prometheus text format (rendered from the latest samples at
    /// scrape time, so ingest pays nothing per sample for them).
    pub async fn exposition(&self) -> Result<String, StoreError> {
        self.call(|reply| Command::Exposition { reply }).await
    }

    pub async fn status(&self) -> Result<StatusResponse, StoreError> {
        self.call(|reply| Command::Status { reply }).await
    }

    pub async fn nodes(
        &self,
        window: Option<TimeWindow>,
    ) -> Result<Result<v1::NodesResponse, QueryError>, StoreError> {
        self.call(|reply| Command::Nodes { window, reply }).await
    }

    pub async fn list_events(
        &self,
        req: ListEventsRequest,
    ) -> Result<Result<ListEventsResponse, QueryError>, StoreError> {
        self.call(|reply| Command::ListEvents { req, reply }).await
    }

    pub async fn trend(
        &self,
        req: TrendRequest,
    ) -> Result<Result<TrendResponse, QueryError>, StoreError> {
        self.call(|reply| Command::Trend { req, reply }).await
    }

    /// Runs `query` on the state task against the event store (timed as `rpc`).
    pub async fn read_events<T: Send + 'static>(
        &self,
        rpc: &'static str,
        query: impl FnOnce(&EventStore, i128) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(|reply| Command::ReadEvents {
            rpc,
            run: Box::new(move |store| {
                let _ = reply.send(query(store, now_ns()));
            }),
        })
        .await
    }
}

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<SubMsg>,
    /// Events not delivered since the last Lagged notice went out.
    missed: u64,
    last_cursor: u64,
}

/// Most nodes and GPUs per node remembered for `Nodes` (a node has at most a few dozen GPUs).
const MAX_NODES: usize = 100_000;
const MAX_GPUS_PER_NODE: usize = 256;

/// What the collector knows about one node, kept current by every stored event.
#[derive(Default)]
struct NodeState {
    last_seen: Option<prost_types::Timestamp>,
    xid_source: String,
    agent_detail: String,
    /// The latest sample event of each GPU.
    gpus: std::collections::BTreeMap<u32, Box<v1::Event>>,
}

/// Updates the node's state from `ev`. A GPU sample is kept as that GPU's latest; what is no
/// longer needed (the event, or the sample it replaced) is returned for reuse.
fn note_node(nodes: &mut FastMap<String, NodeState>, ev: Box<v1::Event>) -> Option<Box<v1::Event>> {
    if !nodes.contains_key(&ev.node) {
        if nodes.len() >= MAX_NODES {
            return Some(ev);
        }
        nodes.insert(ev.node.clone(), NodeState::default());
    }
    let Some(n) = nodes.get_mut(&ev.node) else {
        return Some(ev);
    };
    n.last_seen = ev.received.or(ev.time);
    match &ev.payload {
        Some(Payload::AgentStatus(a)) => {
            n.xid_source.clone_from(&a.xid_source);
            n.agent_detail.clone_from(&a.detail);
            Some(ev)
        }
        Some(Payload::GpuSample(g))
            if n.gpus.contains_key(&g.index) || n.gpus.len() < MAX_GPUS_PER_NODE =>
        {
            n.gpus.insert(g.index, ev)
        }
        _ => Some(ev),
    }
}

struct AgentEntry {
    progress: v1::AgentProgress,
    /// Highest seq on disk (fsync completed); `progress.through_seq` may be ahead of it while a
    /// sync runs. Every answer to the agent uses this one.
    durable_through: u64,
    connections: u32,
    /// The envelope the store records for this agent's events (node as of its latest batch).
    origin: Option<Arc<Origin>>,
}

impl AgentEntry {
    fn new(progress: v1::AgentProgress) -> Self {
        Self {
            // Restored progress was read back from disk.
            durable_through: progress.through_seq,
            progress,
            connections: 0,
            origin: None,
        }
    }

    /// One shared envelope for every event of this agent's batches from `node`.
    fn origin(&mut self, node: &str) -> Arc<Origin> {
        match &self.origin {
            Some(o) if o.node == node && o.agent_id == self.progress.agent_id => o.clone(),
            _ => {
                let o = Arc::new(Origin {
                    node: node.to_string(),
                    agent_id: self.progress.agent_id.clone(),
                });
                self.origin = Some(o.clone());
                o
            }
        }
    }
}

pub struct State {
    cfg: StoreConfig,
    ring: EventStore,
    series: SeriesStore,
    /// Last cursor covered by the snapshot on disk (0 = none).
    series_snap_through: u64,
    events_snap_through: u64,
    snapshot_in_flight: bool,
    last_series_snapshot: Instant,
    rows_at_last_snapshot: u64,
    snap_tx: mpsc::Sender<SnapshotDone>,
    snap_rx: Option<mpsc::Receiver<SnapshotDone>>,
    wal: Wal,
    syncer: Syncer,
    sync_rx: Option<mpsc::UnboundedReceiver<SyncDone>>,
    /// Generation of the latest log write handed to the syncer.
    write_gen: u64,
    /// Writes waiting for their sync: (generation, agent, seq it makes durable).
    pending_durable: VecDeque<(u64, Arc<Origin>, u64)>,
    /// Set by the first failed fsync: nothing is acknowledged any more.
    failed: Option<String>,
    health: Arc<StoreHealth>,
    last_sweep: Instant,
    agents: FastMap<String, AgentEntry>,
    subscribers: Vec<Subscriber>,
    metrics: Metrics,
    started: prost_types::Timestamp,
    duplicates: u64,
    nodes: FastMap<String, NodeState>,
    counters: Counters,
}

/// Loads a snapshot, reporting (not failing on) a damaged or unreadable one.
fn load_snapshot<T>(
    cfg: &StoreConfig,
    metrics: &Metrics,
    name: &str,
    kind: SnapKind,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Option<T> {
    let data = match snapshot::read(&cfg.data_dir, name) {
        Ok(d) => d?,
        Err(e) => {
            warn!(error = %e, "snapshot unreadable; starting without it");
            metrics
                .snapshot_failures
                .with_label_values(&[kind.name(), "load"])
                .inc();
            return None;
        }
    };
    match decode(&data) {
        Ok(v) => Some(v),
        Err(reason) => {
            let e = snapshot::corrupt(&cfg.data_dir, name, reason);
            warn!(error = %e, "snapshot damaged; skipped (the write-ahead log still replays)");
            metrics
                .snapshot_failures
                .with_label_values(&[kind.name(), "load"])
                .inc();
            None
        }
    }
}

/// Opens the events snapshot for streaming, reporting (not failing on) a damaged one.
fn open_events_snapshot(cfg: &StoreConfig, metrics: &Metrics) -> Option<snapshot::EventsReader> {
    match snapshot::EventsReader::open(&cfg.data_dir, EVENTS_FILE) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "events snapshot damaged or unreadable; skipped (the write-ahead log still replays)");
            metrics
                .snapshot_failures
                .with_label_values(&[SnapKind::Events.name(), "load"])
                .inc();
            None
        }
    }
}

/// Raises `agents`' progress to `p` (restored progress counts as durable: it was read back).
fn merge_progress(agents: &mut FastMap<String, AgentEntry>, p: &v1::AgentProgress) {
    match agents.get_mut(&p.agent_id) {
        Some(e) if p.through_seq > e.progress.through_seq => {
            e.progress = p.clone();
            e.durable_through = p.through_seq;
        }
        Some(_) => {}
        None => {
            agents.insert(p.agent_id.clone(), AgentEntry::new(p.clone()));
        }
    }
}

/// Raises an agent's progress to a replayed event's seq (allocating only for a new agent).
fn merge_event_progress(agents: &mut FastMap<String, AgentEntry>, ev: &v1::Event) {
    match agents.get_mut(&ev.agent_id) {
        Some(e) => {
            if ev.seq > e.progress.through_seq {
                e.progress.through_seq = ev.seq;
                e.durable_through = ev.seq;
                e.progress.last_seen = ev.received;
                if e.progress.node != ev.node {
                    e.progress.node.clone_from(&ev.node);
                }
            }
        }
        None => merge_progress(
            agents,
            &v1::AgentProgress {
                agent_id: ev.agent_id.clone(),
                through_seq: ev.seq,
                node: ev.node.clone(),
                boot_id: String::new(),
                last_seen: ev.received,
            },
        ),
    }
}

/// Opens the store (snapshots, then the WAL after them) and starts the state task.
///
/// Restart memory stays within the running budget: the events snapshot and the log are
/// streamed (one snapshot entry, one log segment at a time) straight into the store, which
/// copies what it keeps into its own blocks and expires as it would at ingest.
pub fn start(cfg: StoreConfig, metrics: Metrics) -> Result<StoreHandle, anyhow::Error> {
    let mut wal_replay = Wal::replay(&cfg.data_dir, cfg.wal_segment_bytes)?;
    let n_metrics = query::metric_count();
    let events_snap = open_events_snapshot(&cfg, &metrics);
    let names = gpulse_proto::metric::names();
    // Streamed from its file: a restart never holds the file and the history it decodes to.
    let series_snap = match snapshot::read_series(&cfg.data_dir, SERIES_FILE, &names) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "series snapshot damaged or unreadable; skipped (the write-ahead log still replays)");
            metrics
                .snapshot_failures
                .with_label_values(&[SnapKind::Series.name(), "load"])
                .inc();
            None
        }
    };
    let counters_snap = load_snapshot(&cfg, &metrics, COUNTERS_FILE, SnapKind::Series, |d| {
        snapshot::decode_counters(d)
    });
    let mut ring = EventStore::new(cfg.ring_bytes, 1);
    let mut agents: FastMap<String, AgentEntry> = FastMap::default();
    let mut next_cursor = 1;
    let events_through = match &events_snap {
        Some(es) => {
            for a in &es.checkpoint.agents {
                merge_progress(&mut agents, a);
            }
            next_cursor = next_cursor.max(es.checkpoint.next_cursor);
            es.through
        }
        None => 0,
    };
    let mut counters = Counters::default();
    // XID/SXid totals: their own file, else inside a series snapshot of an earlier collector.
    let mut counters_through = 0;
    let (series_through, mut series) = match series_snap {
        Some(ss) => {
            if !ss.added.is_empty() || !ss.dropped.is_empty() {
                info!(added = ?ss.added, dropped = ?ss.dropped, "sample history mapped to this collector's metrics by name");
            }
            if let Some(rows) = ss.counters {
                counters.restore(&metrics, rows);
                counters_through = ss.through;
            }
            (
                ss.through,
                SeriesStore::restore(n_metrics, cfg.series, ss.gpus),
            )
        }
        None => (0, SeriesStore::new(n_metrics, cfg.series)),
    };
    if let Some((through, rows)) = counters_snap {
        counters = Counters::default();
        counters.restore(&metrics, rows);
        counters_through = through;
    }
    let mut from_snapshot = 0;
    let mut restored = 0;
    let mut nodes = FastMap::default();
    // Checkpoints met in the log: agents' progress and the next cursor, merged after the loop.
    let mut cp_agents: FastMap<String, v1::AgentProgress> = FastMap::default();
    let mut cp_next_cursor = 1;
    {
        // Snapshot events (cursor <= events_through) and log events, merged in cursor order. Log
        // events the events snapshot covers feed counters and samples (they may have expired
        // from the store before it was written) but are not put back into the store.
        let snap_metrics = metrics.clone();
        let mut snap_iter = events_snap
            .into_iter()
            .flatten()
            .map_while(|r| match r {
                Ok((e, b)) => Some((Box::new(e), b)),
                Err(reason) => {
                    warn!(%reason, "events snapshot ends early; the rest is skipped");
                    snap_metrics
                        .snapshot_failures
                        .with_label_values(&[SnapKind::Events.name(), "load"])
                        .inc();
                    None
                }
            })
            .peekable();
        let mut wal_iter = wal_replay
            .by_ref()
            .filter_map(|item| match item {
                Replayed::Event(ev, encoded) => Some((ev, encoded)),
                Replayed::Checkpoint(cp) => {
                    cp_next_cursor = cp_next_cursor.max(cp.next_cursor);
                    // Bounded by the agents the collector tracks: keep the highest per agent.
                    for a in cp.agents {
                        match cp_agents.get_mut(&a.agent_id) {
                            Some(p) if a.through_seq > p.through_seq => *p = a,
                            Some(_) => {}
                            None => {
                                cp_agents.insert(a.agent_id.clone(), a);
                            }
                        }
                    }
                    None
                }
            })
            .peekable();
        // One shared envelope per sender, as at ingest.
        let mut senders = Senders::default();
        loop {
            let take_snap = match (snap_iter.peek(), wal_iter.peek()) {
                (Some((a, _)), Some((b, _))) => a.cursor <= b.cursor,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let ((ev, encoded), from_snap) = match if take_snap {
                snap_iter.next()
            } else {
                wal_iter.next()
            } {
                Some(e) => (e, take_snap),
                None => break,
            };
            if from_snap {
                from_snapshot += 1;
            } else {
                restored += 1;
                merge_event_progress(&mut agents, &ev);
            }
            if !from_snap && ev.cursor <= events_through {
                // Covered by the events snapshot (or expired before it): history only.
                if ev.cursor > counters_through {
                    counters.count(&metrics, &ev);
                }
                if ev.cursor > series_through {
                    add_sample(&mut series, &ev);
                }
                continue;
            }
            if from_snap && wal_iter.peek().is_some_and(|(w, _)| w.cursor == ev.cursor) {
                // The same event is in the log too: keep one.
                if let Some((w, _)) = wal_iter.next() {
                    restored += 1;
                    merge_event_progress(&mut agents, &w);
                }
            }
            next_cursor = next_cursor.max(ev.cursor + 1);
            let origin = senders.get(&ev.node, &ev.agent_id);
            if ring.restore(&ev, &encoded, &origin).is_none() {
                continue;
            }
            drop(encoded);
            if ev.cursor > counters_through {
                counters.count(&metrics, &ev);
            }
            if ev.cursor > series_through {
                add_sample(&mut series, &ev);
            }
            note_node(&mut nodes, ev);
        }
    }
    for p in cp_agents.values() {
        merge_progress(&mut agents, p);
    }
    // Retention counts from the last time an agent was heard of; one restored without that
    // counts from now.
    let restart = ptime::now();
    for a in agents.values_mut() {
        a.progress.last_seen.get_or_insert(restart);
    }
    next_cursor = next_cursor.max(cp_next_cursor);
    let (wal, replay) = wal_replay.finish()?;
    metrics
        .wal_corruptions
        .inc_by(replay.corruptions.len() as u64);
    // Frames lost to damage may have carried cursors already handed to subscribers: skip past
    // every cursor they could have held (a frame is at least 9 bytes) so none is ever reused.
    for c in &replay.corruptions {
        next_cursor += c.skipped_bytes / 9 + 1;
    }
    ring.skip_to(next_cursor);
    info!(
        restored_events = restored,
        from_snapshot,
        retained = ring.len(),
        agents = agents.len(),
        segments = replay.segments,
        corruptions = replay.corruptions.len(),
        next_cursor = ring.next_cursor(),
        sample_gpus = series.gpus().len(),
        data_dir = %cfg.data_dir.display(),
        "store restored from snapshots and write-ahead log"
    );
    for c in &replay.corruptions {
        warn!(segment = %c.segment, offset = c.offset, skipped_bytes = c.skipped_bytes, reason = %c.reason, "WAL damage skipped at start-up");
    }
    metrics.ring_budget_bytes.set(cfg.ring_bytes as i64);
    let (tx, rx) = mpsc::channel(1024);
    let (snap_tx, snap_rx) = mpsc::channel(4);
    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
    let rows = series.rows();
    let health = Arc::new(StoreHealth::default());
    health.beat();
    metrics.store_writable.set(1);
    let mut state = State {
        syncer: match &cfg.sync_hook {
            Some(h) => Syncer::start_with(sync_tx, h.sync_fn())?,
            None => Syncer::start(sync_tx)?,
        },
        sync_rx: Some(sync_rx),
        write_gen: 0,
        pending_durable: VecDeque::new(),
        failed: None,
        health: health.clone(),
        last_sweep: Instant::now(),
        cfg,
        ring,
        series,
        series_snap_through: series_through,
        events_snap_through: events_through,
        snapshot_in_flight: false,
        last_series_snapshot: Instant::now(),
        rows_at_last_snapshot: rows,
        snap_tx,
        snap_rx: Some(snap_rx),
        wal,
        agents,
        subscribers: Vec::new(),
        metrics,
        started: ptime::now(),
        duplicates: 0,
        nodes,
        counters,
    };
    state.truncate_wal();
    state.update_gauges();
    tokio::spawn(state.run(rx));
    Ok(StoreHandle { tx, health })
}

/// Adds a GPU sample event to the sample history.
fn add_sample(series: &mut SeriesStore, ev: &v1::Event) -> bool {
    let Some((g, row)) = query::sample_row(ev) else {
        return false;
    };
    series
        .push(&ev.node, g.index, &g.uuid, event_ms(ev), &row)
        .is_ok()
}

/// A loss notice from the agent's own spool: it explains the seq jump it sits at.
fn is_spool_gap(ev: &v1::Event) -> bool {
    matches!(&ev.payload, Some(Payload::Gap(g)) if g.stage == GapStage::AgentSpool as i32)
}

const KIND_LIST: [EventKind; 8] = EventKind::ALL;

/// At most how long between looks for agents and nodes past their retention.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Brings a counter up to a total kept elsewhere (counters only go up).
fn raise(c: &prometheus::IntCounter, total: u64) {
    if total > c.get() {
        c.inc_by(total - c.get());
    }
}

fn now_ns() -> i128 {
    ptime::to_unix_nanos(&ptime::now())
}

fn ms_ts(ms: i64) -> prost_types::Timestamp {
    ptime::from_unix_millis(ms)
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (Some(mut snap_rx), Some(mut sync_rx)) = (self.snap_rx.take(), self.sync_rx.take())
        else {
            return;
        };
        loop {
            tokio::select! {
                // Sync results first: they release acks and Hello answers.
                biased;
                Some(done) = sync_rx.recv() => self.synced(done),
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        let _ = reply.send(self.shut_down());
                        return;
                    }
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                Some(done) = snap_rx.recv() => self.snapshot_done(done),
                _ = tick.tick() => {
                    self.flush_lag_notices();
                    self.maybe_snapshot();
                    if self.last_sweep.elapsed() >= self.sweep_every() {
                        self.last_sweep = Instant::now();
                        self.sweep(now_ns());
                    }
                }
            }
            self.health.beat();
        }
    }

    /// A quarter of the shorter retention, at most [`SWEEP_EVERY`].
    fn sweep_every(&self) -> Duration {
        (self.cfg.agent_retention.min(self.cfg.node_retention) / 4).min(SWEEP_EVERY)
    }

    /// Forgets agents and nodes past their retention (`now` in Unix ns). An agent with an open
    /// stream, or a node with one, is never forgotten.
    fn sweep(&mut self, now: i128) {
        let old = |t: Option<&prost_types::Timestamp>, keep: Duration| {
            t.is_some_and(|t| now - ptime::to_unix_nanos(t) > keep.as_nanos() as i128)
        };
        let before = self.agents.len();
        let keep = self.cfg.agent_retention;
        self.agents
            .retain(|_, a| a.connections > 0 || !old(a.progress.last_seen.as_ref(), keep));
        let agents_gone = before - self.agents.len();
        let before = self.nodes.len();
        let keep = self.cfg.node_retention;
        let connected: std::collections::HashSet<&str> = self
            .agents
            .values()
            .filter(|a| a.connections > 0)
            .map(|a| a.progress.node.as_str())
            .collect();
        self.nodes.retain(|name, n| {
            !old(n.last_seen.as_ref(), keep) || connected.contains(name.as_str())
        });
        let nodes_gone = before - self.nodes.len();
        if agents_gone + nodes_gone > 0 {
            self.metrics.agents_retired.inc_by(agents_gone as u64);
            self.metrics.nodes_retired.inc_by(nodes_gone as u64);
            info!(
                agents = agents_gone,
                nodes = nodes_gone,
                "forgot agents and nodes past their retention"
            );
            self.update_gauges();
        }
    }

    /// A round of fsyncs finished: advance each agent's durable seq, or fail the store.
    fn synced(&mut self, done: SyncDone) {
        while let Some((generation, _, _)) = self.pending_durable.front()
            && *generation <= done.through_gen
        {
            let Some((_, origin, through)) = self.pending_durable.pop_front() else {
                break;
            };
            if let Some(a) = self.agents.get_mut(&origin.agent_id) {
                a.durable_through = a.durable_through.max(through);
            }
        }
        if let Some(e) = done.error {
            self.fail(e);
        }
    }

    /// An fsync failed. The dirty pages may be gone while the file system reports later syncs
    /// as fine, so nothing written since the last good sync can be vouched for: stop
    /// acknowledging for good (the process exits and its successor replays the log).
    fn fail(&mut self, error: String) {
        if self.failed.is_some() {
            return;
        }
        self.metrics.store_sync_errors.inc();
        self.metrics.store_writable.set(0);
        self.syncer.poison(error.clone());
        self.health.sync_failed(&error);
        self.pending_durable.clear();
        warn!(error = %error, "fsync failed: the store stops acknowledging; restart to replay the log");
        self.failed = Some(error);
    }

    /// Final sync of the log and a sample snapshot, so a restart replays little.
    fn shut_down(&mut self) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(format!("store failed earlier: {e}"));
        }
        if let Err(e) = self.wal.sync_handle().sync_data() {
            self.fail(e.to_string());
            return Err(format!("final fsync: {e}"));
        }
        if self.series.rows() != self.rows_at_last_snapshot || self.series_snap_through == 0 {
            let through = self.ring.next_cursor() - 1;
            self.series_snapshot_job(through)(&self.cfg.data_dir)
                .map_err(|e| format!("final series snapshot: {e}"))?;
        }
        info!(
            events = self.ring.len(),
            wal_bytes = self.wal.bytes(),
            "store synced and stopped"
        );
        Ok(())
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Hello {
                agent_id,
                node,
                boot_id,
                reply,
            } => {
                let e = self.agents.entry(agent_id.clone()).or_insert_with(|| {
                    AgentEntry::new(v1::AgentProgress {
                        agent_id,
                        ..Default::default()
                    })
                });
                e.connections += 1;
                e.progress.node = node;
                e.progress.boot_id = boot_id;
                e.progress.last_seen = Some(ptime::now());
                // Only what is on disk: the agent resends the rest (duplicates are dropped).
                let _ = reply.send(e.durable_through);
                self.update_gauges();
            }
            Command::Disconnected { agent_id } => {
                if let Some(e) = self.agents.get_mut(&agent_id) {
                    e.connections = e.connections.saturating_sub(1);
                    e.progress.last_seen = Some(ptime::now());
                }
                self.update_gauges();
            }
            Command::Ingest { batch, reply } => {
                let _ = reply.send(self.ingest(batch));
            }
            Command::Subscribe {
                filter,
                after,
                reply,
            } => {
                let r = if self.live_subscribers() >= self.cfg.max_subscribers {
                    self.metrics.subscribers_refused.inc();
                    Err(StoreError::TooManySubscribers(self.cfg.max_subscribers))
                } else {
                    Ok(self.subscribe(filter, after))
                };
                let _ = reply.send(r);
            }
            Command::ReplayStep {
                filter,
                from,
                reply,
            } => {
                let _ = reply.send(self.replay_step(&filter, from));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Exposition { reply } => {
                let _ = reply.send(self.exposition());
            }
            Command::Nodes { window, reply } => {
                let t = Instant::now();
                let _ = reply.send(self.nodes(window));
                self.observe("Nodes", t);
            }
            Command::ListEvents { req, reply } => {
                let t = Instant::now();
                let _ = reply.send(query::list_events(&self.ring, req, now_ns()));
                self.observe("ListEvents", t);
            }
            Command::Trend { req, reply } => {
                let t = Instant::now();
                let _ = reply.send(query::trend(&self.series, req, now_ns()));
                self.observe("Trend", t);
            }
            Command::ReadEvents { rpc, run } => {
                let t = Instant::now();
                run(&self.ring);
                self.observe(rpc, t);
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(self.shut_down());
            }
        }
    }

    /// Subscribers whose streams are still open (closed ones are only swept at fan-out).
    fn live_subscribers(&mut self) -> usize {
        self.subscribers.retain(|s| !s.tx.is_closed());
        self.subscribers.len()
    }

    fn snapshot_done(&mut self, done: SnapshotDone) {
        let SnapshotDone {
            kind,
            through,
            result,
        } = done;
        self.snapshot_in_flight = false;
        match result {
            Ok(()) => {
                self.metrics
                    .snapshots
                    .with_label_values(&[kind.name()])
                    .inc();
                match kind {
                    SnapKind::Series => self.series_snap_through = through,
                    SnapKind::Events => self.events_snap_through = through,
                }
                info!(
                    kind = kind.name(),
                    through_cursor = through,
                    "snapshot written"
                );
                self.truncate_wal();
                self.update_gauges();
            }
            Err(e) => {
                self.metrics
                    .snapshot_failures
                    .with_label_values(&[kind.name(), "write"])
                    .inc();
                warn!(kind = kind.name(), error = %e, "snapshot failed; the write-ahead log keeps the data");
            }
        }
    }

    fn ingest(&mut self, batch: IngestBatch) -> Result<IngestOutcome, StoreError> {
        if let Some(e) = &self.failed {
            return Err(StoreError::Failed(e.clone()));
        }
        let received = ptime::now();
        let entry = self
            .agents
            .entry(batch.agent_id.clone())
            .or_insert_with(|| {
                AgentEntry::new(v1::AgentProgress {
                    agent_id: batch.agent_id.clone(),
                    node: batch.node.clone(),
                    ..Default::default()
                })
            });
        let origin = entry.origin(&batch.node);
        let mut through = entry.progress.through_seq;
        let mut duplicates = 0;
        let mut events = batch.events;
        // (position, first missing seq, last missing seq) where the agent's sequence jumped.
        let mut gaps: Vec<(usize, u64, u64)> = Vec::new();
        let contiguous = events.iter().enumerate().all(|(i, w)| {
            events
                .first()
                .is_some_and(|f| w.ev.seq == f.ev.seq + i as u64)
        });
        let mut fresh = if contiguous {
            // The usual shape (validated batches are contiguous): drop the resent prefix and
            // keep the vector, so events are not moved one by one.
            let first = events.first().map_or(0, |w| w.ev.seq);
            let dup = (through + 1).saturating_sub(first).min(events.len() as u64) as usize;
            events.drain(..dup);
            duplicates = dup as u64;
            if let Some(w) = events.first()
                && w.ev.seq > through + 1
                && !is_spool_gap(&w.ev)
            {
                gaps.push((0, through + 1, w.ev.seq - 1));
            }
            if let Some(last) = events.last() {
                through = last.ev.seq;
            }
            events
        } else {
            let mut fresh = Vec::with_capacity(events.len());
            for w in events {
                if w.ev.seq <= through {
                    duplicates += 1;
                    continue;
                }
                if w.ev.seq > through + 1 && !is_spool_gap(&w.ev) {
                    gaps.push((fresh.len(), through + 1, w.ev.seq - 1));
                }
                through = w.ev.seq;
                fresh.push(w);
            }
            fresh
        };
        for (k, (at, from, to)) in gaps.into_iter().enumerate() {
            let missed = to - from + 1;
            self.metrics.ingest_seq_gap_events.inc_by(missed);
            fresh.insert(
                at + k,
                Wire::encode(v1::Event {
                    seq: 0,
                    time: Some(received),
                    kind: EventKind::Gap as i32,
                    severity: v1::Severity::Warning as i32,
                    payload: Some(Payload::Gap(v1::Gap {
                        stage: GapStage::CollectorSeq as i32,
                        missed,
                        detail: format!("agent {} skipped seqs {from}..={to}", batch.agent_id),
                    })),
                    ..Default::default()
                }),
            );
        }
        self.duplicates += duplicates;
        self.metrics.ingest_duplicates.inc_by(duplicates);
        if fresh.is_empty() {
            // All resent. They may be written but not yet synced (an earlier stream's batch):
            // the answer waits for a sync like any other, never vouching for the page cache.
            let durable = (through > entry_durable(&self.agents, &batch.agent_id))
                .then(|| self.request_sync(origin, through));
            return Ok(IngestOutcome {
                through_seq: through,
                duplicates,
                stored: 0,
                durable,
            });
        }

        self.clamp_times(&mut fresh, received);
        // Cursors are assigned in order from the store's next one. Write, then make visible: a
        // failed write stores nothing (the agent keeps the events and resends). The log gets the
        // bytes as received plus one header with what the collector sets on every event.
        let header = BatchHeader {
            node: batch.node.clone(),
            agent_id: batch.agent_id.clone(),
            received: Some(received),
            first_cursor: self.ring.next_cursor(),
        };
        if let Err(e) = self
            .wal
            .append_batch(&header, fresh.iter().map(|w| w.bytes.as_ref()))
        {
            self.metrics.store_write_errors.inc();
            self.metrics.store_writable.set(0);
            if !self.health.is_write_failing() {
                warn!(error = %e, agent = %batch.agent_id, "WAL append failed; batch cut off the log and not acknowledged (agents resend); /readyz fails until a write succeeds");
            }
            self.health.write_failed(&e.to_string());
            return Err(StoreError::Write(e.to_string()));
        }
        if self.health.is_write_failing() {
            info!("WAL writes succeed again");
            self.health.write_ok();
            self.metrics.store_writable.set(1);
        }
        let stored = fresh.len() as u64;
        self.metrics.ingest_events.inc_by(stored);
        let mut wire_bytes = 0;
        let mut done = Vec::with_capacity(fresh.len());
        for (i, Wire { mut ev, bytes }) in fresh.into_iter().enumerate() {
            wire_bytes += bytes.len() as u64;
            // The batch envelope is authoritative for who sent it. The store keeps the bytes as
            // received and the envelope in its record; the decoded event carries it for
            // subscribers. (Agents put their own node and id on every event, so nothing is
            // allocated here.)
            let e = &mut *ev;
            if e.node != batch.node {
                e.node.clone_from(&batch.node);
            }
            if e.agent_id != batch.agent_id {
                e.agent_id.clone_from(&batch.agent_id);
            }
            e.received = Some(received);
            e.cursor = header.first_cursor + i as u64;
            // Same cursor as written above: the store hands out cursors in the same order.
            self.ring.push(&ev, &bytes, &origin);
            drop(bytes);
            self.counters.count(&self.metrics, &ev);
            if let Some(Payload::Gap(g)) = &ev.payload
                && g.stage != GapStage::CollectorSeq as i32
            {
                self.metrics
                    .agent_reported_drops
                    .with_label_values(&[ev.node.as_str(), GapStage::name_of(g.stage)])
                    .inc_by(g.missed);
            }
            add_sample(&mut self.series, &ev);
            self.fan_out(&ev);
            done.extend(note_node(&mut self.nodes, ev));
        }
        crate::recycle::give_back(done);
        self.metrics.ingest_bytes.inc_by(wire_bytes);
        if let Some(e) = self.agents.get_mut(&batch.agent_id) {
            e.progress.through_seq = through;
            e.progress.last_seen = Some(received);
            e.progress.node.clone_from(&batch.node);
        }
        let durable = Some(self.request_sync(origin, through));
        // The checkpoint copies every agent's progress: build it only when a segment starts.
        if self.wal.needs_rotation() {
            let checkpoint = self.checkpoint();
            match self.wal.maybe_rotate(self.ring.next_cursor(), &checkpoint) {
                Ok(_) => {}
                Err(RotateError::Sync(e)) => self.fail(e.to_string()),
                Err(e @ RotateError::Write(_)) => {
                    self.metrics.store_write_errors.inc();
                    warn!(error = %e, "WAL rotation failed; continuing in the current segment");
                }
            }
        }
        self.truncate_wal();
        self.update_gauges();
        Ok(IngestOutcome {
            through_seq: through,
            duplicates,
            stored,
            durable,
        })
    }

    /// Replaces event times more than `--max-clock-skew` after `received` by `received`,
    /// keeping the agent's in `reported_time`. Such an event is encoded again (rare) so the log
    /// and the store keep the corrected time. Times in the past are kept: an agent delivering
    /// its spool after an outage, or the kernel log's backlog, legitimately sends old events.
    fn clamp_times(&self, fresh: &mut [Wire], received: prost_types::Timestamp) {
        let skew = self.cfg.max_clock_skew.as_nanos() as i128;
        let now = ptime::to_unix_nanos(&received);
        let mut clamped = 0;
        for w in fresh.iter_mut() {
            let Some(t) = w.ev.time else { continue };
            if ptime::to_unix_nanos(&t) - now <= skew {
                continue;
            }
            w.ev.reported_time = Some(t);
            w.ev.time = Some(received);
            w.bytes = prost::bytes::Bytes::from(prost::Message::encode_to_vec(&*w.ev));
            clamped += 1;
        }
        if clamped > 0 {
            self.metrics.ingest_clock_clamped.inc_by(clamped);
            debug!(
                clamped,
                "event times beyond --max-clock-skew replaced by the received time"
            );
        }
    }

    /// Asks the syncer to make everything written so far durable; `origin`'s agent is durable
    /// through `through` once it did. Without fsync, a write counts as durable at once.
    fn request_sync(
        &mut self,
        origin: Arc<Origin>,
        through: u64,
    ) -> oneshot::Receiver<Result<(), String>> {
        if !self.cfg.fsync {
            if let Some(a) = self.agents.get_mut(&origin.agent_id) {
                a.durable_through = a.durable_through.max(through);
            }
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            return rx;
        }
        self.write_gen += 1;
        self.pending_durable
            .push_back((self.write_gen, origin, through));
        self.syncer.request(self.wal.sync_handle(), self.write_gen)
    }

    fn observe(&self, rpc: &str, t: Instant) {
        self.metrics
            .query_seconds
            .with_label_values(&[rpc])
            .observe(t.elapsed().as_secs_f64());
    }

    /// Deletes log segments nothing needs: the event store needs cursors from its oldest
    /// retained event (or after its snapshot), the sample history from after its snapshot.
    fn truncate_wal(&mut self) {
        let ring_from = self
            .ring
            .oldest_cursor()
            .unwrap_or(self.ring.next_cursor())
            .max(self.events_snap_through + 1);
        let keep_from = ring_from.min(self.series_snap_through + 1);
        self.wal.truncate_before(keep_from);
    }

    fn wal_max_bytes(&self) -> u64 {
        if self.cfg.wal_max_bytes > 0 {
            self.cfg.wal_max_bytes
        } else {
            (self.cfg.ring_bytes as u64 * 2).max(self.cfg.wal_segment_bytes * 4)
        }
    }

    /// Starts a background snapshot when one is due: the sample history every
    /// `snapshot_interval` (if it changed), the event store when old events pin too much log.
    fn maybe_snapshot(&mut self) {
        if self.snapshot_in_flight {
            return;
        }
        let through = self.ring.next_cursor() - 1;
        let over = self.wal.bytes() > self.wal_max_bytes();
        let ring_from = self
            .ring
            .oldest_cursor()
            .unwrap_or(self.ring.next_cursor())
            .max(self.events_snap_through + 1);
        let events_due =
            over && ring_from <= self.series_snap_through && through > self.events_snap_through;
        let series_due = (self.last_series_snapshot.elapsed() >= self.cfg.snapshot_interval
            && self.series.rows() != self.rows_at_last_snapshot)
            || (over && through > self.series_snap_through);
        if events_due {
            // Only the blocks are shared here; writing streams them to disk off this task.
            let events = self.ring.view();
            let checkpoint = self.checkpoint();
            self.spawn_snapshot(SnapKind::Events, through, move |dir| {
                snapshot::write_atomic_with(dir, EVENTS_FILE, |w| {
                    snapshot::write_events(w, through, &checkpoint, events)
                })
            });
        } else if series_due {
            let job = self.series_snapshot_job(through);
            self.last_series_snapshot = Instant::now();
            self.rows_at_last_snapshot = self.series.rows();
            self.spawn_snapshot(SnapKind::Series, through, job);
        }
    }

    /// The sample history and the counter totals as of `through`, encoded here (compressed
    /// chunks are shared, the rest is small) and written by the returned job: the counters
    /// first, so their file is never older than the history's.
    fn series_snapshot_job(
        &self,
        through: u64,
    ) -> impl FnOnce(&std::path::Path) -> Result<(), snapshot::SnapshotError> + Send + 'static {
        let counters = snapshot::encode_counters(through, &self.counters.rows());
        let series =
            snapshot::encode_series(through, &gpulse_proto::metric::names(), self.series.gpus());
        move |dir| {
            snapshot::write_atomic(dir, COUNTERS_FILE, &counters)?;
            snapshot::write_atomic(dir, SERIES_FILE, &series)
        }
    }

    fn spawn_snapshot(
        &mut self,
        kind: SnapKind,
        through: u64,
        job: impl FnOnce(&std::path::Path) -> Result<(), snapshot::SnapshotError> + Send + 'static,
    ) {
        self.snapshot_in_flight = true;
        let dir = self.cfg.data_dir.clone();
        let me = self.snap_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = job(&dir).map_err(|e| e.to_string());
            let _ = me.blocking_send(SnapshotDone {
                kind,
                through,
                result,
            });
        });
    }

    fn checkpoint(&self) -> StoreCheckpoint {
        StoreCheckpoint {
            agents: self.agents.values().map(|a| a.progress.clone()).collect(),
            next_cursor: self.ring.next_cursor(),
        }
    }

    /// Hands one event to every matching subscriber without ever waiting: a full queue counts a
    /// miss, reported to that subscriber as `Lagged` as soon as it has room again.
    fn fan_out(&mut self, ev: &v1::Event) {
        if self.subscribers.is_empty() {
            return;
        }
        let metrics = &self.metrics;
        // One copy shared by every subscriber that wants the event, made only if one does.
        let mut shared: Option<Arc<v1::Event>> = None;
        self.subscribers.retain_mut(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !s.filter.matches(ev) {
                return true;
            }
            if s.missed > 0 {
                let lag = Lagged {
                    missed: s.missed,
                    resume_cursor: s.last_cursor,
                };
                match s.tx.try_send(SubMsg::Lagged(lag)) {
                    Ok(()) => {
                        metrics.subscriber_lag_notices.inc();
                        s.missed = 0;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.missed += 1;
                        metrics.subscriber_dropped.inc();
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            let ev = shared.get_or_insert_with(|| Arc::new(ev.clone())).clone();
            let cursor = ev.cursor;
            match s.tx.try_send(SubMsg::Event(ev)) {
                Ok(()) => {
                    s.last_cursor = cursor;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.missed += 1;
                    metrics.subscriber_dropped.inc();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.metrics.subscribers.set(self.subscribers.len() as i64);
    }

    /// Sends pending Lagged notices even when no new event arrives to carry them.
    fn flush_lag_notices(&mut self) {
        let metrics = &self.metrics;
        self.subscribers.retain_mut(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if s.missed > 0 {
                let lag = Lagged {
                    missed: s.missed,
                    resume_cursor: s.last_cursor,
                };
                if s.tx.try_send(SubMsg::Lagged(lag)).is_ok() {
                    metrics.subscriber_lag_notices.inc();
                    s.missed = 0;
                }
            }
            true
        });
        self.metrics.subscribers.set(self.subscribers.len() as i64);
    }

    fn subscribe(&mut self, filter: Filter, after: Option<u64>) -> Subscription {
        let (tx, live) = mpsc::channel(self.cfg.subscriber_queue.max(1));
        let last = self.ring.next_cursor() - 1;
        let step = match after {
            Some(after) => self.replay_step(&filter, ReplayFrom { after, upto: last }),
            None => ReplayStep {
                events: Vec::new(),
                next: None,
            },
        };
        self.subscribers.push(Subscriber {
            filter,
            tx,
            missed: 0,
            last_cursor: last,
        });
        self.metrics.subscribers.set(self.subscribers.len() as i64);
        Subscription {
            replay: step.events,
            next: step.next,
            live,
        }
    }

    /// One bounded step of a replay: at most `replay_chunk` events and [`REPLAY_SCAN`] records
    /// looked at. Events that expired before the step could reach them are announced with
    /// `Lagged` (how many cursors are gone and where the replay goes on).
    fn replay_step(&self, filter: &Filter, from: ReplayFrom) -> ReplayStep {
        let mut events = Vec::new();
        let mut after = from.after;
        let oldest = self.ring.oldest_cursor().unwrap_or(self.ring.next_cursor());
        if after + 1 < oldest && after < from.upto {
            events.push(SubMsg::Lagged(Lagged {
                missed: oldest.min(from.upto + 1) - after - 1,
                resume_cursor: oldest - 1,
            }));
            self.metrics.subscriber_lag_notices.inc();
            after = oldest - 1;
        }
        let scan = self.ring.scan_after(
            after,
            from.upto,
            self.cfg.replay_chunk.max(1),
            REPLAY_SCAN,
            |e| filter.matches(e),
        );
        events.extend(scan.events.into_iter().map(|e| SubMsg::Event(Arc::new(e))));
        let next = (!scan.done && scan.resume < from.upto).then_some(ReplayFrom {
            after: scan.resume,
            upto: from.upto,
        });
        ReplayStep { events, next }
    }

    fn nodes(&self, window: Option<TimeWindow>) -> Result<v1::NodesResponse, QueryError> {
        let w = match &window {
            Some(tw) => Some(gpulse_proto::window::resolve(
                &tw.since,
                &tw.until,
                now_ns(),
                3_600_000_000_000,
            )?),
            None => None,
        };
        let (start, end) = w.map_or((i64::MIN, i64::MAX), |w| (w.start_ms(), w.end_ms()));
        let xids = query::xid_counts(&self.ring, start, end);
        let mut nodes: Vec<v1::NodeInfo> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                w.is_none_or(|w| {
                    n.last_seen
                        .as_ref()
                        .is_some_and(|t| ptime::to_unix_nanos(t) >= w.start_ns)
                })
            })
            .map(|(name, n)| {
                let mut connected_agents: Vec<String> = self
                    .agents
                    .values()
                    .filter(|a| a.connections > 0 && a.progress.node == *name)
                    .map(|a| a.progress.agent_id.clone())
                    .collect();
                connected_agents.sort();
                v1::NodeInfo {
                    node: name.clone(),
                    connected_agents,
                    last_seen: n.last_seen,
                    xid_source: n.xid_source.clone(),
                    agent_detail: n.agent_detail.clone(),
                    gpus: n
                        .gpus
                        .values()
                        .filter_map(|e| match &e.payload {
                            Some(Payload::GpuSample(g)) => Some(g.clone()),
                            _ => None,
                        })
                        .collect(),
                    xid_count: xids.get(name).map_or(0, |c| c.0),
                    critical_xid_count: xids.get(name).map_or(0, |c| c.1),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let window = w.map(|w| v1::ResolvedWindow {
            start: Some(ptime::from_unix_nanos(w.start_ns)),
            end: Some(ptime::from_unix_nanos(w.end_ns)),
            defaulted: w.defaulted,
            oldest_data: self.ring.oldest_ms(None).map(ms_ts),
            partial: self.ring.oldest_ms(None).is_none_or(|o| o > w.start_ms()),
        });
        Ok(v1::NodesResponse { nodes, window })
    }

    fn exposition(&self) -> String {
        use crate::counters::gauge_family;
        let mut names: Vec<&String> = self.nodes.keys().collect();
        names.sort();
        let mut connected = Vec::new();
        let mut last_seen = Vec::new();

        // One gauge family per stored metric, from the same readers the sample history uses.
        let families = gpulse_proto::metric::METRICS;
        let mut gpu_samples: Vec<Vec<crate::counters::GaugeSample<'_>>> =
            vec![Vec::new(); families.len()];
        let mut sample_time = Vec::new();
        let mut index_strings: Vec<String> = Vec::new();
        for name in &names {
            for e in self.nodes[*name].gpus.values() {
                if let Some(Payload::GpuSample(g)) = &e.payload {
                    index_strings.push(g.index.to_string());
                }
            }
        }
        let mut k = 0;
        for name in &names {
            let n = &self.nodes[*name];
            let up = self
                .agents
                .values()
                .any(|a| a.connections > 0 && a.progress.node == **name);
            connected.push((vec![("node", name.as_str())], f64::from(u8::from(up))));
            if let Some(t) = &n.last_seen {
                last_seen.push((
                    vec![("node", name.as_str())],
                    (ptime::to_unix_nanos(t) / 1_000_000) as f64 / 1000.0,
                ));
            }
            for e in n.gpus.values() {
                let Some(Payload::GpuSample(g)) = &e.payload else {
                    continue;
                };
                let labels = vec![
                    ("node", name.as_str()),
                    ("gpu_uuid", g.uuid.as_str()),
                    ("pci", g.pci.as_str()),
                    ("index", index_strings[k].as_str()),
                    ("model", g.name.as_str()),
                ];
                k += 1;
                for (i, def) in families.iter().enumerate() {
                    if let Some(v) = def.value(g) {
                        gpu_samples[i].push((labels.clone(), v));
                    }
                }
                if let Some(t) = e.time.or(e.received) {
                    sample_time.push((
                        labels.clone(),
                        (ptime::to_unix_nanos(&t) / 1_000_000) as f64 / 1000.0,
                    ));
                }
            }
        }
        let mut out = String::new();
        gauge_family(
            &mut out,
            "gpulse_node_agent_connected",
            "1 while an agent of the node has an open Ingest stream.",
            &connected,
        );
        gauge_family(
            &mut out,
            "gpulse_node_last_seen_timestamp_seconds",
            "When the collector last received anything from the node.",
            &last_seen,
        );
        for (i, def) in families.iter().enumerate() {
            let help = format!("{} ({}), latest sample.", def.help, def.unit);
            gauge_family(&mut out, def.prom, &help, &gpu_samples[i]);
        }
        gauge_family(
            &mut out,
            "gpulse_gpu_last_sample_timestamp_seconds",
            "Time of the GPU's latest sample.",
            &sample_time,
        );
        out
    }

    fn status(&self) -> StatusResponse {
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            events_stored: self.ring.len() as u64,
            ring_bytes: self.ring.bytes() as u64,
            ring_budget_bytes: self.ring.budget() as u64,
            last_cursor: self.ring.next_cursor() - 1,
            oldest_cursor: self.ring.oldest_cursor().unwrap_or(0),
            agents_connected: self.agents.values().filter(|a| a.connections > 0).count() as u32,
            subscribers: self.subscribers.len() as u32,
            duplicates_dropped: self.duplicates,
            events_expired: self.ring.expired_total(),
            started: Some(self.started),
            kinds: KIND_LIST
                .iter()
                .map(|k| v1::KindStatus {
                    kind: *k as i32,
                    bytes: self.ring.bytes_by_kind(*k) as u64,
                    share_bytes: self.ring.share(*k) as u64,
                    events: self.ring.events_by_kind(*k),
                    expired: self.ring.expired_by_kind(*k),
                    oldest: self.ring.oldest_ms(Some(*k)).map(ms_ts),
                })
                .collect(),
            tiers: Tier::ALL
                .iter()
                .map(|t| {
                    let st = self.series.tier_stats(*t);
                    v1::TierStatus {
                        tier: match t {
                            Tier::Raw => v1::Tier::Raw,
                            Tier::Minute => v1::Tier::Tier1m,
                            Tier::Hour => v1::Tier::Tier1h,
                        } as i32,
                        resolution_seconds: (t.resolution_ms() / 1000) as u32,
                        bytes: st.bytes as u64,
                        budget_bytes: st.budget as u64,
                        expired: st.expired,
                        oldest: st.oldest_ms.map(ms_ts),
                    }
                })
                .collect(),
            wal_bytes: self.wal.bytes(),
            samples_out_of_order: self.series.rejected().0,
            samples_gpus_refused: self.series.rejected().1,
            gpus_tracked: self.series.gpus().len() as u32,
        }
    }

    fn update_gauges(&self) {
        for t in Tier::ALL {
            let st = self.series.tier_stats(t);
            let l = [t.name()];
            self.metrics
                .series_bytes
                .with_label_values(&l)
                .set(st.bytes as i64);
            self.metrics
                .series_budget_bytes
                .with_label_values(&l)
                .set(st.budget as i64);
            raise(
                &self.metrics.series_expired.with_label_values(&l),
                st.expired,
            );
            if let Some(o) = st.oldest_ms {
                self.metrics
                    .series_oldest_seconds
                    .with_label_values(&l)
                    .set(o.div_euclid(1000));
            }
        }
        let (ooo, refused) = self.series.rejected();
        raise(
            &self
                .metrics
                .series_rejected
                .with_label_values(&["out_of_order"]),
            ooo,
        );
        raise(
            &self
                .metrics
                .series_rejected
                .with_label_values(&["too_many_gpus"]),
            refused,
        );
        self.metrics
            .series_gpus
            .set(self.series.gpus().len() as i64);
        raise(
            &self.metrics.series_gpus_retired,
            self.series.retired_gpus(),
        );
        raise(
            &self
                .metrics
                .series_rejected
                .with_label_values(&["clock_stepped_back"]),
            self.series.restarted(),
        );
        for kind in KIND_LIST {
            let k = kind.short_name();
            self.metrics
                .ring_share_bytes
                .with_label_values(&[k])
                .set(self.ring.share(kind) as i64);
            if let Some(o) = self.ring.oldest_ms(Some(kind)) {
                self.metrics
                    .ring_oldest_seconds
                    .with_label_values(&[k])
                    .set(o.div_euclid(1000));
            }
            self.metrics
                .ring_bytes
                .with_label_values(&[k])
                .set(self.ring.bytes_by_kind(kind) as i64);
            self.metrics
                .ring_events
                .with_label_values(&[k])
                .set(self.ring.events_by_kind(kind) as i64);
            raise(
                &self.metrics.ring_expired.with_label_values(&[k]),
                self.ring.expired_by_kind(kind),
            );
        }
        self.metrics.wal_bytes.set(self.wal.bytes() as i64);
        self.metrics
            .agents_connected
            .set(self.agents.values().filter(|a| a.connections > 0).count() as i64);
    }
}

fn entry_durable(agents: &FastMap<String, AgentEntry>, agent_id: &str) -> u64 {
    agents.get(agent_id).map_or(0, |a| a.durable_through)
}
