//! `gpulse-agent`: captures NVIDIA XIDs on this node and streams them to a collector.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use gpulse_agent::{
    client::{self, ClientConfig},
    ebpf::EbpfOptions,
    kmsg::BacklogFrom,
    pipeline::Pipeline,
    pods::{Attributor, PodCache},
    procs::ProcessTracker,
    record::Captured,
    source::{self, SourceChoice},
    spool::{SharedSpool, SpoolLimits},
    stats::AgentStats,
};
use gpulse_proto::v1::{AgentState, AgentStatus};
use gpulse_xid::SeverityPolicy;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "gpulse-agent",
    version,
    about = "gpulse node agent: NVIDIA XID capture (eBPF or /dev/kmsg) streamed to a gpulse collector over gRPC"
)]
struct Args {
    /// Collector gRPC URL, or a comma-separated list of shards' URLs (see --shard-discovery).
    #[arg(
        long,
        env = "GPULSE_COLLECTOR",
        default_value = "http://127.0.0.1:7700"
    )]
    collector: String,
    #[command(flatten)]
    client: gpulse_proto::client::ClientOptions,
    /// How --collector names the collector shards: `list` (its comma-separated URLs) or `dns`
    /// (every address its one host name resolves to, e.g. a headless Service; re-resolved every
    /// 30 s). The node's shard is chosen by rendezvous hashing of the node name; while it is
    /// unreachable the next-ranked one is used, and the agent returns when it is back.
    #[arg(long, env = "GPULSE_SHARD_DISCOVERY", default_value = "list", value_parser = ["list", "dns"])]
    shard_discovery: String,
    /// Node name reported with every event (default: the hostname).
    #[arg(long, env = "GPULSE_NODE")]
    node: Option<String>,
    /// Where XIDs come from: eBPF tracepoints, /dev/kmsg, or eBPF with /dev/kmsg as fallback.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "kmsg"])]
    xid_source: String,
    /// Attach nvidia:nvidia_dev_xid when the driver provides it.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    nvidia_tracepoint: String,
    /// BPF ring buffer size in bytes (rounded up to a power of two). Its pages are mapped twice
    /// into the agent, so this costs twice its size in RSS; 512 KiB holds ~960 XID records.
    /// `--ring-bytes` is its former name, accepted for one release.
    #[arg(long, alias = "ring-bytes", default_value_t = 512 << 10, value_parser = clap::value_parser!(u32).range(4096..=(1 << 30)))]
    bpf_ring_bytes: u32,
    /// Spool bound in bytes while the collector is unreachable.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    spool_bytes: u64,
    /// State directory (a hostPath in the DaemonSet): the agent's id and its spool log, so a
    /// restart loses nothing spooled and knows where the kernel log's backlog resumes.
    /// `none`: nothing persists (a new id per start).
    #[arg(
        long,
        env = "GPULSE_STATE_DIR",
        default_value = "/var/lib/gpulse-agent"
    )]
    state_dir: String,
    /// At start, read the kernel log's backlog for NVIDIA records printed while no agent ran:
    /// `boot` (the whole current boot on a first start or after a reboot, else from where the
    /// previous run stopped) or `none`.
    #[arg(long, default_value = "boot", value_parser = ["boot", "none"])]
    backlog: String,
    /// Spool bound in events.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(16..))]
    spool_events: u64,
    /// Severity overrides, e.g. "13=warning,94=error" (see docs/xid-catalog.md).
    #[arg(long, default_value = "")]
    xid_severity: String,
    /// Report GPU process events (open of a GPU device node, exec, exit) from eBPF.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    process_events: String,
    /// Paths under this prefix are GPU device nodes; a process that opens one is a GPU process.
    #[arg(long, default_value = "/dev/nvidia")]
    gpu_device_prefix: String,
    /// Bound on tracked GPU processes (kernel table and agent table).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    max_tracked_processes: u32,
    /// NVML for GPU samples: `auto` (the driver's libnvidia-ml), `off`, or a path to a
    /// libnvidia-ml.so to load.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(gpulse_agent::nvml::NvmlChoice))]
    nvml: gpulse_agent::nvml::NvmlChoice,
    /// GPU sample interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    sample_interval_ms: u64,
    /// Pod attribution through the Kubernetes API (in-cluster config or KUBECONFIG): `auto` or `off`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    kube: String,
    /// Bound on containers in the pod cache.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    max_pod_containers: u64,
    /// Turn on kernel-side (aya-log) diagnostics.
    #[arg(long)]
    ebpf_log: bool,
    /// /dev/kmsg path for the fallback source.
    #[arg(long, default_value = "/dev/kmsg", hide = true)]
    kmsg_path: String,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Serve /healthz and /readyz (HTTP) here for probes, e.g. 0.0.0.0:7702; off when unset.
    #[arg(long, env = "GPULSE_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-node".to_string())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk, a closed pipe) must not take the process
        // down: tracing-subscriber reports such errors with eprintln!, which panics then.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// GPU samples: optional. No NVML (no driver, no GPU) is said once; everything else goes on.
/// Returns the line the agent's start status carries.
fn start_nvml(args: &Args, tx: &mpsc::Sender<Captured>, stats: &Arc<AgentStats>) -> String {
    let sampler = match gpulse_agent::nvml::open(&args.nvml) {
        Ok(None) => return "GPU samples off (--nvml off)".to_string(),
        Ok(Some(s)) => s,
        Err(e) => {
            warn!(error = %e, "NVML unavailable: no GPU samples; XIDs and process events are unaffected");
            return format!("GPU samples off: NVML unavailable ({e})");
        }
    };
    let driver = sampler.driver_version().to_string();
    let interval = Duration::from_millis(args.sample_interval_ms);
    let xid_events = match gpulse_agent::nvml::spawn_xid_events(&sampler, tx.clone(), stats.clone())
    {
        Ok(n) => format!("NVML XID events on {n} GPUs"),
        Err(e) => format!("NVML XID events off: cannot start their thread: {e}"),
    };
    match gpulse_agent::nvml::spawn(sampler, interval, tx.clone(), stats.clone()) {
        Ok(()) => {
            info!(driver = %driver, interval_ms = args.sample_interval_ms, xid_events = %xid_events, "NVML sampling on");
            format!(
                "GPU samples every {} ms (driver {driver}); {xid_events}",
                args.sample_interval_ms
            )
        }
        Err(e) => format!("GPU samples off: cannot start the sampler thread: {e}"),
    }
}

/// Pod attribution: optional; without Kubernetes it is off, said once. Returns the attributor
/// and the line the agent's start status carries.
async fn start_pods(args: &Args, node: &str) -> (Option<Attributor>, String) {
    if args.kube == "off" {
        return (None, "pod attribution off (--kube off)".to_string());
    }
    let client = kube::Config::infer()
        .await
        .map_err(|e| e.to_string())
        .and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()));
    match client {
        Ok(client) => {
            let cache = Arc::new(std::sync::RwLock::new(PodCache::new(
                args.max_pod_containers as usize,
            )));
            tokio::spawn(gpulse_agent::pods::watch(
                client,
                node.to_string(),
                cache.clone(),
            ));
            info!(node = %node, "pod attribution on: watching this node's pods");
            (
                Some(Attributor::new(cache)),
                "pod attribution on".to_string(),
            )
        }
        Err(e) => {
            info!(reason = %e, "no Kubernetes configuration (not in a cluster, no KUBECONFIG): pod attribution off");
            (None, format!("pod attribution off: {e}"))
        }
    }
}

/// Reads the kernel log's backlog (records printed while no agent ran) into the pipeline. Runs
/// after the live source started: records printed meanwhile are seen twice at most, and the
/// pipeline keeps one.
fn spawn_backlog(
    from: BacklogFrom,
    path: String,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
) {
    tokio::spawn(async move {
        match gpulse_agent::kmsg::read_backlog(&path, from, &tx).await {
            Ok(b) => {
                AgentStats::add(&stats.backlog_records, b.sent);
                info!(from = ?from, records = b.records, nvidia = b.sent, missed = b.missed, "kernel log backlog read");
            }
            Err(e) => {
                warn!(error = %e, path, "cannot read the kernel log's backlog; records printed while no agent ran are not reported")
            }
        }
    });
}

/// The spool log is written at once and made durable every second (and at the stop).
fn spawn_spool_sync(spool: Arc<SharedSpool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let s = spool.clone();
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
        }
    });
}

/// Captured items through the pipeline into the spool; every 5 s, exits of GPU processes that
/// vanished without a reported exit; every 250 ms, NVML XIDs no kernel record matched and XID
/// storm summaries. Ends when every sender is gone.
fn spawn_pipeline(
    mut rx: mpsc::Receiver<Captured>,
    mut pipeline: Pipeline,
    spool: Arc<SharedSpool>,
) -> tokio::task::JoinHandle<()> {
    let now = || gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
    tokio::spawn(async move {
        let mut gc = tokio::time::interval(Duration::from_secs(5));
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // NVML XIDs wait here for the kernel record of the same XID (see Pipeline::release_held).
        let mut held = tokio::time::interval(Duration::from_millis(250));
        held.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else { break };
                    if let Some(ev) = pipeline.process(item, now()) {
                        spool.push(ev);
                    }
                }
                _ = gc.tick() => {
                    for ev in pipeline.collect(now()) {
                        spool.push(ev);
                    }
                }
                _ = held.tick() => {
                    for ev in pipeline.tick(now()) {
                        spool.push(ev);
                    }
                }
            }
        }
    })
}

/// Every counter, once a minute, so drops are visible on the node even without a collector.
fn spawn_counter_log(stats: Arc<AgentStats>, spool: Arc<SharedSpool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let (spooled, spool_bytes) = {
                let s = spool.lock();
                (s.len(), s.bytes())
            };
            let get = |c: &std::sync::atomic::AtomicU64| AgentStats::get(c);
            info!(
                captured = get(&stats.records_captured),
                xids = get(&stats.xids),
                dual_path_duplicates = get(&stats.dual_path_duplicates),
                nvml_xid_events = get(&stats.nvml_xid_events),
                nvml_xid_duplicates = get(&stats.nvml_xid_duplicates),
                storm_coalesced = get(&stats.storm_coalesced),
                kernel_ring_dropped = get(&stats.kernel_ring_dropped),
                kmsg_missed = get(&stats.kmsg_missed),
                malformed = get(&stats.malformed_records),
                spool_dropped = get(&stats.spool_dropped),
                samples_shed = get(&stats.samples_shed),
                spooled,
                spool_bytes,
                sent = get(&stats.events_sent),
                acked = get(&stats.events_acked),
                reconnects = get(&stats.reconnects),
                auth_refused = get(&stats.auth_refused),
                failovers = get(&stats.failovers),
                refused = get(&stats.events_refused),
                "agent counters"
            );
        }
    });
}

/// What the agent needs to stop: the capture task, the channel into the pipeline (with the
/// stopping status to send), the pipeline task and the client.
struct Stop {
    capture: tokio::task::JoinHandle<()>,
    tx: mpsc::Sender<Captured>,
    stopping: Captured,
    pipe: tokio::task::JoinHandle<()>,
    shutdown_tx: watch::Sender<bool>,
    client: tokio::task::JoinHandle<Result<(), client::ClientError>>,
    spool: Arc<SharedSpool>,
    stats: Arc<AgentStats>,
}

impl Stop {
    /// Stops capturing, lets the pipeline drain what was captured, gives the client 5 s to have
    /// everything acknowledged, and makes the spool durable.
    async fn run(self) {
        info!("stopping: flushing the spool to the collector");
        self.tx.send(self.stopping).await.ok();
        self.capture.abort();
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.pipe).await;
        self.shutdown_tx.send(true).ok();
        if tokio::time::timeout(Duration::from_secs(5), self.client)
            .await
            .is_err()
        {
            warn!(
                unacked = self.spool.lock().len(),
                "collector did not acknowledge everything before the stop deadline"
            );
        }
        self.spool.sync();
        let s = &self.stats;
        info!(
            xids = AgentStats::get(&s.xids),
            sent = AgentStats::get(&s.events_sent),
            acked = AgentStats::get(&s.events_acked),
            spool_dropped = AgentStats::get(&s.spool_dropped),
            kernel_ring_dropped = AgentStats::get(&s.kernel_ring_dropped),
            "gpulse-agent stopped"
        );
    }
}

/// The event pipeline: decode, policy, process tracking and pod attribution, and what was
/// delivered before a restart (so the kernel log's backlog does not repeat it).
fn pipeline(
    args: &Args,
    state: &State,
    node: &str,
    policy: SeverityPolicy,
    attributor: Option<Attributor>,
    stats: &Arc<AgentStats>,
) -> Pipeline {
    let mut tracker = ProcessTracker::new(args.max_tracked_processes as usize);
    let mut pipeline = Pipeline::new(
        node.to_string(),
        state.agent_id.clone(),
        policy,
        stats.clone(),
    );
    pipeline.remember_delivered(&state.delivered);
    if let Some(a) = attributor {
        tracker = tracker.with_attributor(a.clone());
        pipeline = pipeline.with_attributor(a);
    }
    pipeline.with_process_tracker(tracker)
}

fn check_args(args: &Args) -> anyhow::Result<()> {
    client::check(&args.collector, &args.shard_discovery, &args.client).context("--collector")?;
    anyhow::ensure!(
        !args.gpu_device_prefix.is_empty()
            && args.gpu_device_prefix.len() <= gpulse_ebpf_common::DEVICE_PREFIX_MAX,
        "--gpu-device-prefix must be 1..={} bytes",
        gpulse_ebpf_common::DEVICE_PREFIX_MAX
    );
    Ok(())
}

// Two workers: the agent's work is a few event-driven tasks; more threads only cost memory.
#[tokio::main(worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // One malloc arena: the agent allocates little and per-thread arenas mostly hold empty pages.
    // SAFETY: glibc tunable, set before the agent allocates from other threads.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args = Args::parse();
    init_tracing(&args.log_format);
    let policy = SeverityPolicy::parse(&args.xid_severity).context("--xid-severity")?;
    check_args(&args)?;
    let choice: SourceChoice = args.xid_source.parse().map_err(anyhow::Error::msg)?;
    let node = args.node.clone().unwrap_or_else(hostname);
    anyhow::ensure!(!node.trim().is_empty(), "--node must not be empty");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let stats = Arc::new(AgentStats::default());
    let limits = SpoolLimits {
        max_bytes: args.spool_bytes as usize,
        max_events: args.spool_events as usize,
    };
    let state = open_state(&args, &node, &boot_id, limits, &stats)?;
    let (agent_id, spool) = (state.agent_id.clone(), state.spool.clone());
    let (tx, rx) = mpsc::channel::<Captured>(8192);
    let opts = EbpfOptions {
        ring_bytes: args.bpf_ring_bytes,
        nvidia_tracepoint: args.nvidia_tracepoint == "auto",
        debug_log: args.ebpf_log,
        device_prefix: (args.process_events == "on").then(|| args.gpu_device_prefix.clone()),
        max_tracked: args.max_tracked_processes,
    };
    let running = source::start(choice, &opts, &args.kmsg_path, tx.clone(), stats.clone())?;
    let nvml_state = start_nvml(&args, &tx, &stats);
    let (attributor, kube_state) = start_pods(&args, &node).await;
    let status = |state: AgentState, detail: String| {
        Captured::Status(AgentStatus {
            state: state as i32,
            xid_source: running.name.to_string(),
            detail,
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: boot_id.clone(),
        })
    };
    let started = format!("{}; {nvml_state}; {kube_state}", running.why);
    tx.send(status(AgentState::Started, started)).await.ok();
    if let Some(from) = state.backlog {
        spawn_backlog(from, args.kmsg_path.clone(), tx.clone(), stats.clone());
    }
    spawn_spool_sync(spool.clone());
    let pipeline = pipeline(&args, &state, &node, policy, attributor, &stats);
    let pipe = spawn_pipeline(rx, pipeline, spool.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut cfg = ClientConfig::new(
        args.collector.clone(),
        agent_id.clone(),
        boot_id.clone(),
        node.clone(),
    );
    cfg.tls = args.client.clone();
    cfg.shard_discovery = args.shard_discovery.clone();
    let client = tokio::spawn(client::run(cfg, spool.clone(), stats.clone(), shutdown_rx));
    // Start-up (BTF parsing, object relocation, TLS set-up) leaves freed heap behind; hand it back
    // so the steady-state footprint is what the agent actually uses.
    // SAFETY: glibc call with no preconditions.
    unsafe { libc::malloc_trim(0) };
    if let Some(addr) = args.health_listen {
        gpulse_agent::health::serve(addr, running.name, stats.clone())
            .await
            .with_context(|| format!("binding --health-listen {addr}"))?;
    }
    info!(node = %node, agent_id = %agent_id, collector = %args.collector, source = running.name, "gpulse-agent running");
    spawn_counter_log(stats.clone(), spool.clone());
    wait_for_signal().await;
    Stop {
        capture: running.task,
        stopping: status(AgentState::Stopping, "agent stopping".into()),
        tx,
        pipe,
        shutdown_tx,
        client,
        spool,
        stats,
    }
    .run()
    .await;
    Ok(())
}

/// The agent's identity, its spool (recovered from the log when there is a state directory),
/// and where the kernel log's backlog starts.
struct State {
    agent_id: String,
    spool: Arc<SharedSpool>,
    backlog: Option<gpulse_agent::kmsg::BacklogFrom>,
    /// Kernel-record events the previous run delivered on this boot (not reported twice).
    delivered: Vec<gpulse_proto::v1::Event>,
    /// Held for the life of the process.
    _lock: Option<gpulse_agent::state_dir::DirLock>,
}

/// The backlog resumes this long before the newest record the previous run delivered: the
/// kernel log's time for a record and the time a run stamped on it differ by a little.
const BACKLOG_MARGIN_NS: i128 = 5_000_000_000;

fn open_state(
    args: &Args,
    node: &str,
    boot_id: &str,
    limits: SpoolLimits,
    stats: &Arc<AgentStats>,
) -> anyhow::Result<State> {
    use gpulse_agent::{kmsg::BacklogFrom, spool_log::SpoolLog, state_dir};
    let fresh =
        || std::fs::read_to_string("/proc/sys/kernel/random/uuid").map(|s| s.trim().to_string());
    let want_backlog = args.backlog == "boot";
    if args.state_dir == "none" {
        // Nothing persists: a new id, and every start is a first start.
        let agent_id = format!("{node}/{}", fresh().context("reading a random uuid")?);
        return Ok(State {
            agent_id,
            spool: SharedSpool::new(limits, stats.clone()),
            backlog: want_backlog.then_some(BacklogFrom::Boot),
            delivered: Vec::new(),
            _lock: None,
        });
    }
    let dir = std::path::Path::new(&args.state_dir);
    let lock = state_dir::lock(dir).with_context(|| {
        format!(
            "--state-dir {} (needs a writable directory; --state-dir none runs without one)",
            dir.display()
        )
    })?;
    let id = state_dir::identity(dir, node, boot_id, fresh)
        .with_context(|| format!("--state-dir {}", dir.display()))?;
    // The log may hold twice the spool's bound before it is rewritten.
    let (log, recovered) = SpoolLog::open(dir, 2 * limits.max_bytes as u64)
        .with_context(|| format!("spool log in --state-dir {}", dir.display()))?;
    let same_boot = id.previous_boot.as_deref() == Some(boot_id);
    let delivered = if same_boot {
        recovered.history.clone()
    } else {
        Vec::new()
    };
    let newest = delivered
        .iter()
        .filter_map(|e| e.time.as_ref().map(gpulse_proto::time::to_unix_nanos))
        .max();
    let backlog = want_backlog.then(|| match newest {
        Some(t) => BacklogFrom::Since(t - BACKLOG_MARGIN_NS),
        None => BacklogFrom::Boot,
    });
    info!(
        agent_id = %id.agent_id,
        state_dir = %dir.display(),
        spooled = recovered.events.len(),
        acked_through = recovered.acked,
        same_boot,
        backlog = ?backlog,
        "agent state loaded"
    );
    Ok(State {
        agent_id: id.agent_id,
        spool: SharedSpool::persistent(limits, stats.clone(), log, recovered),
        backlog,
        delivered,
        _lock: Some(lock),
    })
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
