//! `gpulse-agent`: captures NVIDIA XIDs on this node and streams them to a collector.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use gpulse_agent::{
    client::{self, ClientConfig},
    ebpf::EbpfOptions,
    pipeline::Pipeline,
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
    /// Collector gRPC URL.
    #[arg(
        long,
        env = "GPULSE_COLLECTOR",
        default_value = "http://127.0.0.1:7700"
    )]
    collector: String,
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

// Two workers: the agent's work is a few event-driven tasks; more threads only cost memory.
#[tokio::main(worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // One malloc arena: the agent allocates little and per-thread arenas mostly hold empty pages.
    // SAFETY: glibc tunable, set before the agent allocates from other threads.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args = Args::parse();
    init_tracing(&args.log_format);
    let policy = SeverityPolicy::parse(&args.xid_severity).context("--xid-severity")?;
    client::endpoint(&args.collector).context("--collector")?;
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
    let (tx, mut rx) = mpsc::channel::<Captured>(8192);
    let opts = EbpfOptions {
        ring_bytes: args.bpf_ring_bytes,
        nvidia_tracepoint: args.nvidia_tracepoint == "auto",
        debug_log: args.ebpf_log,
        device_prefix: (args.process_events == "on").then(|| args.gpu_device_prefix.clone()),
        max_tracked: args.max_tracked_processes,
    };
    anyhow::ensure!(
        !args.gpu_device_prefix.is_empty()
            && args.gpu_device_prefix.len() <= gpulse_ebpf_common::DEVICE_PREFIX_MAX,
        "--gpu-device-prefix must be 1..={} bytes",
        gpulse_ebpf_common::DEVICE_PREFIX_MAX
    );
    let running = source::start(choice, &opts, &args.kmsg_path, tx.clone(), stats.clone())?;

    // GPU samples: optional. No NVML (no driver, no GPU) is said once; everything else goes on.
    let nvml_state = match gpulse_agent::nvml::open(&args.nvml) {
        Ok(None) => "GPU samples off (--nvml off)".to_string(),
        Ok(Some(sampler)) => {
            let driver = sampler.driver_version().to_string();
            match gpulse_agent::nvml::spawn(
                sampler,
                Duration::from_millis(args.sample_interval_ms),
                tx.clone(),
                stats.clone(),
            ) {
                Ok(()) => {
                    info!(driver = %driver, interval_ms = args.sample_interval_ms, "NVML sampling on");
                    format!(
                        "GPU samples every {} ms (driver {driver})",
                        args.sample_interval_ms
                    )
                }
                Err(e) => format!("GPU samples off: cannot start the sampler thread: {e}"),
            }
        }
        Err(e) => {
            warn!(error = %e, "NVML unavailable: no GPU samples; XIDs and process events are unaffected");
            format!("GPU samples off: NVML unavailable ({e})")
        }
    };
    // Pod attribution: optional; without Kubernetes it is off, said once.
    let (attributor, kube_state) = if args.kube == "off" {
        (None, "pod attribution off (--kube off)".to_string())
    } else {
        match kube::Config::infer()
            .await
            .map_err(|e| e.to_string())
            .and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()))
        {
            Ok(client) => {
                let cache = std::sync::Arc::new(std::sync::RwLock::new(
                    gpulse_agent::pods::PodCache::new(args.max_pod_containers as usize),
                ));
                tokio::spawn(gpulse_agent::pods::watch(
                    client,
                    node.clone(),
                    cache.clone(),
                ));
                info!(node = %node, "pod attribution on: watching this node's pods");
                (
                    Some(gpulse_agent::pods::Attributor::new(cache)),
                    "pod attribution on".to_string(),
                )
            }
            Err(e) => {
                info!(reason = %e, "no Kubernetes configuration (not in a cluster, no KUBECONFIG): pod attribution off");
                (None, format!("pod attribution off: {e}"))
            }
        }
    };
    let mut tracker = gpulse_agent::procs::ProcessTracker::new(args.max_tracked_processes as usize);
    let mut pipeline = Pipeline::new(node.clone(), agent_id.clone(), policy, stats.clone());
    pipeline.remember_delivered(&state.delivered);
    if let Some(a) = &attributor {
        tracker = tracker.with_attributor(a.clone());
        pipeline = pipeline.with_attributor(a.clone());
    }
    let mut pipeline = pipeline.with_process_tracker(tracker);
    let status = |state: AgentState, detail: String| {
        Captured::Status(AgentStatus {
            state: state as i32,
            xid_source: running.name.to_string(),
            detail,
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: boot_id.clone(),
        })
    };
    tx.send(status(
        AgentState::Started,
        format!("{}; {nvml_state}; {kube_state}", running.why),
    ))
    .await
    .ok();

    if let Some(from) = state.backlog {
        // After the live source started: records printed meanwhile are seen twice at most,
        // and the pipeline keeps one.
        let (tx, path, stats) = (tx.clone(), args.kmsg_path.clone(), stats.clone());
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
    // The spool log is written at once and made durable every second (and at the stop).
    let sync_spool = spool.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let s = sync_spool.clone();
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
        }
    });

    let pipe_spool = spool.clone();
    let pipe = tokio::spawn(async move {
        // Every 5 s: report exits of GPU processes that vanished without a reported exit.
        let mut gc = tokio::time::interval(Duration::from_secs(5));
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else { break };
                    let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
                    if let Some(ev) = pipeline.process(item, now) {
                        pipe_spool.push(ev);
                    }
                }
                _ = gc.tick() => {
                    let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
                    for ev in pipeline.collect(now) {
                        pipe_spool.push(ev);
                    }
                }
            }
        }
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cfg = ClientConfig::new(
        args.collector.clone(),
        agent_id.clone(),
        boot_id.clone(),
        node.clone(),
    );
    let client_task = tokio::spawn(client::run(cfg, spool.clone(), stats.clone(), shutdown_rx));
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
    let (stats_log, spool_log) = (stats.clone(), spool.clone());
    tokio::spawn(async move {
        // Every counter, once a minute, so drops are visible on the node even without a collector.
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let (spooled, spool_bytes) = {
                let s = spool_log.lock();
                (s.len(), s.bytes())
            };
            info!(
                captured = AgentStats::get(&stats_log.records_captured),
                xids = AgentStats::get(&stats_log.xids),
                dual_path_duplicates = AgentStats::get(&stats_log.dual_path_duplicates),
                kernel_ring_dropped = AgentStats::get(&stats_log.kernel_ring_dropped),
                kmsg_missed = AgentStats::get(&stats_log.kmsg_missed),
                malformed = AgentStats::get(&stats_log.malformed_records),
                spool_dropped = AgentStats::get(&stats_log.spool_dropped),
                samples_shed = AgentStats::get(&stats_log.samples_shed),
                spooled,
                spool_bytes,
                sent = AgentStats::get(&stats_log.events_sent),
                acked = AgentStats::get(&stats_log.events_acked),
                reconnects = AgentStats::get(&stats_log.reconnects),
                refused = AgentStats::get(&stats_log.events_refused),
                "agent counters"
            );
        }
    });

    wait_for_signal().await;
    info!("stopping: flushing the spool to the collector");
    tx.send(status(AgentState::Stopping, "agent stopping".into()))
        .await
        .ok();
    running.task.abort();
    drop(tx);
    // Let the pipeline drain what was captured, then tell the client to finish.
    let _ = tokio::time::timeout(Duration::from_secs(1), pipe).await;
    shutdown_tx.send(true).ok();
    match tokio::time::timeout(Duration::from_secs(5), client_task).await {
        Ok(_) => {}
        Err(_) => warn!(
            unacked = spool.lock().len(),
            "collector did not acknowledge everything before the stop deadline"
        ),
    }
    spool.sync();
    info!(
        xids = AgentStats::get(&stats.xids),
        sent = AgentStats::get(&stats.events_sent),
        acked = AgentStats::get(&stats.events_acked),
        spool_dropped = AgentStats::get(&stats.spool_dropped),
        kernel_ring_dropped = AgentStats::get(&stats.kernel_ring_dropped),
        "gpulse-agent stopped"
    );
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
