//! The one task that owns collector state (tokio-console style): RPC handlers talk to it over a
//! channel, so no lock is ever held across I/O and ingest order is the store order. This file
//! holds its messages, its handle and its loop; each concern has its own file: `ingest`,
//! `subscribers` (fan-out, lag notices, replay), `agents`, `nodes`, `durability` (syncs and
//! fsync failure) and `snapshots`. Recovery at start-up is `store::recovery`.
mod agents;
mod durability;
mod ingest;
mod nodes;
mod snapshots;
mod subscribers;

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use gpulse_proto::{
    time as ptime,
    v1::{
        self, EventKind, Lagged, ListEventsRequest, ListEventsResponse, StatusResponse, TimeWindow,
        TrendRequest, TrendResponse,
    },
};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::{
    batch::IngestBatch,
    query::{self, QueryError},
    readiness::StoreHealth,
    store::{
        events::{EventStore, Origin},
        recovery::{self, Restored},
        series::{SeriesBudgets, SeriesStore, Tier},
        syncer::Syncer,
        wal::Wal,
    },
    telemetry::{Metrics, exposition, xid_counters::Counters},
};
use agents::Agents;
use gpulse_proto::filter::Filter;
use nodes::Nodes;
use snapshots::SnapshotDone;
use subscribers::Subscribers;

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub events_bytes: usize,
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
    /// Largest forward jump of a known agent's seqs accepted in one batch: more than any spool
    /// outage explains, so a jump past it is a takeover attempt (the real agent's next events
    /// would be dropped as resends).
    pub max_seq_jump: u64,
    /// Agent ids without a connection for this long are forgotten (ids are never reused).
    pub agent_retention: Duration,
    /// Nodes not heard from for this long leave the node and GPU gauges and `Nodes`.
    pub node_retention: Duration,
    /// This collector's cluster and shard names (`--cluster`, `--shard`; empty when unset):
    /// in Status, on every node it knows, and as remote-write labels.
    pub cluster: String,
    pub shard: String,
    /// GPU health verdicts (`--escalate-after-reboots` and friends).
    pub verdict: crate::verdict::Config,
}

impl StoreConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            events_bytes: 256 << 20,
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
            max_seq_jump: DEFAULT_MAX_SEQ_JUMP,
            agent_retention: Duration::from_secs(86_400),
            node_retention: Duration::from_secs(86_400),
            cluster: String::new(),
            shard: String::new(),
            verdict: crate::verdict::Config::default(),
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

/// Result of storing one batch.
pub struct IngestOutcome {
    pub through_seq: u64,
    pub duplicates: u64,
    pub stored: u64,
    /// Resolves when the stored events are on disk (None when nothing new was written or fsync
    /// is off).
    pub durable: Option<oneshot::Receiver<Result<(), String>>>,
}

/// A billion events: an agent spooling a thousand events a second through a ten-day outage.
pub const DEFAULT_MAX_SEQ_JUMP: u64 = 1_000_000_000;

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
    /// A push that would take over an agent id: refused, nothing stored.
    #[error("{0}")]
    Takeover(String),
}

pub enum Command {
    Hello {
        agent_id: String,
        node: String,
        boot_id: String,
        peer: Option<std::net::IpAddr>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
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
    GpuHealth {
        req: v1::GpuHealthRequest,
        reply: oneshot::Sender<v1::GpuHealthResponse>,
    },
    /// A read-only query of the event store (an aggregation); it sends its own answer.
    ReadEvents {
        rpc: &'static str,
        run: Box<dyn FnOnce(&EventStore) + Send>,
    },
    ReadSeries {
        rpc: &'static str,
        run: Box<dyn FnOnce(&SeriesStore) + Send>,
    },
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
        peer: Option<std::net::IpAddr>,
    ) -> Result<u64, StoreError> {
        self.call(|reply| Command::Hello {
            agent_id,
            node,
            boot_id,
            peer,
            reply,
        })
        .await?
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

    pub async fn gpu_health(
        &self,
        req: v1::GpuHealthRequest,
    ) -> Result<v1::GpuHealthResponse, StoreError> {
        self.call(|reply| Command::GpuHealth { req, reply }).await
    }

    /// Runs `query` on the state task against the sample history (timed as `rpc`).
    pub async fn read_series<T: Send + 'static>(
        &self,
        rpc: &'static str,
        query: impl FnOnce(&SeriesStore) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(|reply| Command::ReadSeries {
            rpc,
            run: Box::new(move |series| {
                let _ = reply.send(query(series));
            }),
        })
        .await
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

pub struct State {
    cfg: StoreConfig,
    events: EventStore,
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
    sync_rx: Option<mpsc::UnboundedReceiver<crate::store::syncer::SyncDone>>,
    /// Generation of the latest log write handed to the syncer.
    write_gen: u64,
    /// Writes waiting for their sync: (generation, agent, seq it makes durable).
    pending_durable: VecDeque<(u64, Arc<Origin>, u64)>,
    /// Set by the first failed fsync: nothing is acknowledged any more.
    failed: Option<String>,
    /// Events lost to damage found at start-up (`Recovered::events_lost`), for Status.
    events_lost_at_recovery: u64,
    health: Arc<StoreHealth>,
    last_sweep: Instant,
    agents: Agents,
    subscribers: Subscribers,
    metrics: Metrics,
    started: prost_types::Timestamp,
    duplicates: u64,
    nodes: Nodes,
    counters: Counters,
    verdict: crate::verdict::Engine,
}

/// Opens the store (`store::recovery`: snapshots, then the log after them), rebuilds what is
/// kept on top of the events (counters, node state), and starts the state task.
pub fn start(cfg: StoreConfig, metrics: Metrics) -> Result<StoreHandle, anyhow::Error> {
    let opened = recovery::open(&cfg.data_dir, cfg.wal_segment_bytes)?;
    let mut counters = Counters::default();
    let counters_through = match &opened.counters {
        Some((through, rows)) => {
            counters.restore(&metrics, rows.clone());
            *through
        }
        None => 0,
    };
    let mut nodes = Nodes::default();
    let mut verdict = crate::verdict::Engine::new(cfg.verdict);
    verdict.count_share_refusals(metrics.share.clone());
    let rec = opened.replay(cfg.events_bytes, cfg.series, |ev, how| {
        if ev.cursor > counters_through {
            counters.count(&metrics, &ev);
        }
        verdict.restore(&ev);
        if how == Restored::Stored {
            nodes.note(ev);
        }
    })?;
    for kind in &rec.damaged {
        metrics
            .snapshot_failures
            .with_label_values(&[kind.name(), "load"])
            .inc();
    }
    metrics.wal_corruptions.inc_by(rec.corruptions as u64);
    metrics.recovery_events_lost.inc_by(rec.events_lost);
    info!(data_dir = %cfg.data_dir.display(), "store opened");
    let (tx, rx) = mpsc::channel(1024);
    let (snap_tx, snap_rx) = mpsc::channel(4);
    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
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
        events_lost_at_recovery: rec.events_lost,
        health: health.clone(),
        last_sweep: Instant::now(),
        rows_at_last_snapshot: rec.series.rows(),
        subscribers: Subscribers::new(cfg.subscriber_queue, cfg.replay_chunk, metrics.clone()),
        cfg,
        events: rec.events,
        series: rec.series,
        series_snap_through: rec.series_through,
        events_snap_through: rec.events_through,
        snapshot_in_flight: false,
        last_series_snapshot: Instant::now(),
        snap_tx,
        snap_rx: Some(snap_rx),
        wal: rec.wal,
        agents: Agents::restored(rec.agents),
        metrics,
        started: ptime::now(),
        duplicates: 0,
        nodes,
        counters,
        verdict,
    };
    state
        .series
        .count_share_refusals(state.metrics.share.clone());
    state.truncate_wal();
    state.publish_store_gauges();
    tokio::spawn(state.run(rx));
    Ok(StoreHandle { tx, health })
}

/// At most how long between looks for agents and nodes past their retention.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

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
                    self.subscribers.flush_lag_notices();
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

    /// Exports the agent ids forgotten for their node's share since the last call.
    pub(super) fn count_evicted(&mut self) {
        let n = std::mem::take(&mut self.agents.evicted);
        if n > 0 {
            self.metrics.agent_ids_evicted.inc_by(n);
        }
    }

    /// Forgets agents and nodes past their retention (`now` in Unix ns). An agent with an open
    /// stream, or a node with one, is never forgotten.
    fn sweep(&mut self, now: i128) {
        self.count_evicted();
        let agents_gone = self.agents.retire(now, self.cfg.agent_retention);
        let gone = self
            .nodes
            .retire(&self.agents, now, self.cfg.node_retention);
        // A forgotten node's GPUs leave the verdicts too (their gpu_health events stay stored).
        for node in &gone {
            self.verdict.forget_node(node);
        }
        let nodes_gone = gone.len();
        if agents_gone + nodes_gone > 0 {
            self.metrics.agents_retired.inc_by(agents_gone as u64);
            self.metrics.nodes_retired.inc_by(nodes_gone as u64);
            info!(
                agents = agents_gone,
                nodes = nodes_gone,
                "forgot agents and nodes past their retention"
            );
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Hello {
                agent_id,
                node,
                boot_id,
                peer,
                reply,
            } => {
                // Only what is on disk: the agent resends the rest (duplicates are dropped).
                let r = self.agents.hello(&agent_id, node, boot_id, peer);
                self.count_evicted();
                let r = r.map_err(|e| {
                    self.metrics
                        .ingest_takeover_refused
                        .with_label_values(&["connected"])
                        .inc();
                    StoreError::Takeover(e)
                });
                let _ = reply.send(r);
            }
            Command::Disconnected { agent_id } => self.agents.disconnected(&agent_id),
            Command::Ingest { batch, reply } => {
                let _ = reply.send(self.ingest(batch));
            }
            Command::Subscribe {
                filter,
                after,
                reply,
            } => {
                let r = if self.subscribers.live() >= self.cfg.max_subscribers {
                    self.metrics.subscribers_refused.inc();
                    Err(StoreError::TooManySubscribers(self.cfg.max_subscribers))
                } else {
                    Ok(self.subscribers.subscribe(&self.events, filter, after))
                };
                let _ = reply.send(r);
            }
            Command::ReplayStep {
                filter,
                from,
                reply,
            } => {
                let _ = reply.send(self.subscribers.replay_step(&self.events, &filter, from));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Exposition { reply } => {
                self.publish_store_gauges();
                exposition::health_counters(&self.metrics, &self.verdict);
                let mut text = exposition::node_gauges(&self.nodes.views(&self.agents));
                exposition::health_gauges(&mut text, &self.verdict, now_ns());
                let _ = reply.send(text);
            }
            Command::Nodes { window, reply } => {
                let t = Instant::now();
                let mut r = self
                    .nodes
                    .query(&self.agents, &self.events, window, now_ns());
                if let Ok(r) = &mut r {
                    for n in &mut r.nodes {
                        n.cluster.clone_from(&self.cfg.cluster);
                    }
                }
                let _ = reply.send(r);
                self.observe("Nodes", t);
            }
            Command::ListEvents { req, reply } => {
                let t = Instant::now();
                let _ = reply.send(query::list_events(&self.events, req, now_ns()));
                self.observe("ListEvents", t);
            }
            Command::Trend { req, reply } => {
                let t = Instant::now();
                let _ = reply.send(query::trend(&self.series, req, now_ns()));
                self.observe("Trend", t);
            }
            Command::GpuHealth { req, reply } => {
                let t = Instant::now();
                let mut r = crate::verdict::query::answer(&self.verdict, &req, now_ns());
                for g in &mut r.gpus {
                    g.cluster.clone_from(&self.cfg.cluster);
                }
                let _ = reply.send(r);
                self.observe("GpuHealth", t);
            }
            Command::ReadEvents { rpc, run } => {
                let t = Instant::now();
                run(&self.events);
                self.observe(rpc, t);
            }
            Command::ReadSeries { rpc, run } => {
                let t = Instant::now();
                run(&self.series);
                self.observe(rpc, t);
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(self.shut_down());
            }
        }
    }

    fn observe(&self, rpc: &str, t: Instant) {
        self.metrics
            .query_seconds
            .with_label_values(&[rpc])
            .observe(t.elapsed().as_secs_f64());
    }

    /// The store's gauges, from the stores (at scrape time).
    fn publish_store_gauges(&self) {
        exposition::store_gauges(
            &self.metrics,
            &self.events,
            &self.series,
            self.wal.bytes(),
            self.agents.connected().count(),
        );
    }

    fn status(&self) -> StatusResponse {
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            events_stored: self.events.len() as u64,
            ring_bytes: self.events.bytes() as u64,
            ring_budget_bytes: self.events.budget() as u64,
            last_cursor: self.events.next_cursor() - 1,
            oldest_cursor: self.events.oldest_cursor().unwrap_or(0),
            agents_connected: self.agents.connected().count() as u32,
            subscribers: self.subscribers.len() as u32,
            duplicates_dropped: self.duplicates,
            events_expired: self.events.expired_total(),
            started: Some(self.started),
            kinds: EventKind::ALL
                .iter()
                .map(|k| v1::KindStatus {
                    kind: *k as i32,
                    bytes: self.events.bytes_by_kind(*k) as u64,
                    share_bytes: self.events.share(*k) as u64,
                    events: self.events.events_by_kind(*k),
                    expired: self.events.expired_by_kind(*k),
                    oldest: self.events.oldest_ms(Some(*k)).map(ms_ts),
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
            cluster: self.cfg.cluster.clone(),
            partial: false,
            shard: self.cfg.shard.clone(),
            upstreams: Default::default(),
            events_lost_at_recovery: self.events_lost_at_recovery,
        }
    }
}
