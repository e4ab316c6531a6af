//! Collector self-metrics in an instance registry (no globals), served at /metrics.
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub ingest_events: IntCounter,
    pub ingest_bytes: IntCounter,
    pub ingest_duplicates: IntCounter,
    pub ingest_rejected_batches: IntCounter,
    pub ingest_seq_gap_events: IntCounter,
    pub store_write_errors: IntCounter,
    pub store_sync_errors: IntCounter,
    pub ingest_clock_clamped: IntCounter,
    /// 1 while the store takes writes and makes them durable (what /readyz reports).
    pub store_writable: IntGauge,
    pub subscribers_refused: IntCounter,
    /// Calls refused by authentication or authorization, by reason (`auth::reason`).
    pub auth_refused: IntCounterVec,
    /// Pushes refused as an attempt to take over an agent id, by reason.
    pub ingest_takeover_refused: IntCounterVec,
    /// Reloads of watched files (TLS, token file), by file and result.
    pub reloads: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    /// Connections refused, closed for idling, open (`conn`).
    pub conns: crate::conn::ConnMetrics,
    /// Entries refused past a node's share of a fleet-wide table (`share`).
    pub share: crate::share::ShareRefusals,
    /// Batches that waited for a snapshot to make room in a log over its hard limit.
    pub ingest_log_full_waits: IntCounter,
    /// Remote write: samples by result (sent, queue_full, rejected).
    pub remote_write_samples: IntCounterVec,
    /// Remote write requests by answer (2xx, 4xx, 429, 5xx, error).
    pub remote_write_requests: IntCounterVec,
    pub remote_write_queue_bytes: IntGauge,
    pub remote_write_last_success: IntGauge,
    pub remote_write_exported_until: IntGauge,
    pub ring_bytes: IntGaugeVec,
    pub ring_events: IntGaugeVec,
    pub ring_budget_bytes: IntGauge,
    pub ring_expired: IntCounterVec,
    pub wal_bytes: IntGauge,
    pub wal_corruptions: IntCounter,
    /// Events lost to damaged log frames or a damaged events snapshot, counted at start-up.
    pub recovery_events_lost: IntCounter,
    pub subscribers: IntGauge,
    pub subscriber_dropped: IntCounter,
    pub subscriber_lag_notices: IntCounter,
    pub agents_connected: IntGauge,
    /// Losses agents reported in the stream (Gap events), by node and stage.
    pub agent_reported_drops: IntCounterVec,
    pub xid_events: IntCounterVec,
    pub sxid_events: IntCounterVec,
    pub counter_series_dropped: IntCounter,
    pub ring_share_bytes: IntGaugeVec,
    pub ring_oldest_seconds: IntGaugeVec,
    pub series_bytes: IntGaugeVec,
    pub series_budget_bytes: IntGaugeVec,
    pub series_expired: IntCounterVec,
    pub series_oldest_seconds: IntGaugeVec,
    pub series_rejected: IntCounterVec,
    pub series_gpus: IntGauge,
    /// GPU health: GPUs not judged (table full) and reasons dropped (a GPU with too many).
    pub health_dropped: IntCounterVec,
    pub series_gpus_retired: IntCounter,
    pub agents_retired: IntCounter,
    /// Agent ids forgotten to keep a node within its share (`state::agents`).
    pub agent_ids_evicted: IntCounter,
    pub nodes_retired: IntCounter,
    pub snapshots: IntCounterVec,
    pub snapshot_failures: IntCounterVec,
    pub query_seconds: prometheus::HistogramVec,
    pub scrape_seconds: prometheus::Histogram,
}

#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let c = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let m = IntCounter::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let g = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let m = IntGauge::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let cv = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
            let m = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let gv = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
            let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        Ok(Self {
            conns: crate::conn::ConnMetrics::new(&registry)?,
            share: crate::share::ShareRefusals::new(cv(
                "gpulse_node_share_refused_total",
                "GPUs, sample histories or XID counter series a node sent past its share of a fleet-wide table (256 GPUs, 4096 counter series per node): refused for that node only.",
                &["node", "table"],
            )?),
            ingest_events: c(
                "gpulse_ingest_events_total",
                "Events stored from agents (duplicates excluded).",
            )?,
            ingest_bytes: c(
                "gpulse_ingest_bytes_total",
                "Bytes of stored events as the agents encoded them (duplicates excluded).",
            )?,
            ingest_duplicates: c(
                "gpulse_ingest_duplicates_total",
                "Resent events dropped because they were already stored.",
            )?,
            ingest_rejected_batches: c(
                "gpulse_ingest_rejected_batches_total",
                "Batches rejected as malformed.",
            )?,
            ingest_seq_gap_events: c(
                "gpulse_ingest_seq_gap_events_total",
                "Events missing from agents' sequences (seen as jumps).",
            )?,
            store_write_errors: c(
                "gpulse_store_write_errors_total",
                "Write-ahead log writes that failed (a full disk, an I/O error): the batch was cut off the log and not acknowledged; the agent resends it.",
            )?,
            ingest_clock_clamped: c(
                "gpulse_ingest_clock_clamped_events_total",
                "Events whose time was more than --max-clock-skew after their arrival; stored at the arrival time, the agent's time kept in reported_time.",
            )?,
            store_sync_errors: c(
                "gpulse_store_sync_errors_total",
                "Write-ahead log fsyncs that failed. Fatal: the collector stops acknowledging and exits so a restart replays the log from disk.",
            )?,
            store_writable: g(
                "gpulse_store_writable",
                "1 while the write-ahead log takes writes and fsyncs (what /readyz reports); 0 while writes fail.",
            )?,
            auth_refused: cv(
                "gpulse_auth_refused_total",
                "Calls refused by authentication (missing_credentials, bad_token, bad_certificate) or authorization (wrong_role, other_node).",
                &["reason"],
            )?,
            ingest_takeover_refused: cv(
                "gpulse_ingest_takeover_refused_total",
                "Pushes refused because their agent id was connected on another stream (connected) or their seqs jumped further than a spool explains (seq_jump).",
                &["reason"],
            )?,
            reloads: cv(
                "gpulse_reloads_total",
                "Reloads of watched files (tls, auth_tokens) after they changed, by result (ok, error: the previous version stays).",
                &["file", "result"],
            )?,
            remote_write_samples: cv(
                "gpulse_remote_write_samples_total",
                "Samples pushed to --remote-write-url, by result: sent, queue_full (the oldest queued requests dropped to stay within --remote-write-queue-bytes), rejected (the receiver refused them with a 4xx).",
                &["result"],
            )?,
            remote_write_requests: cv(
                "gpulse_remote_write_requests_total",
                "Remote write requests by answer: 2xx, 4xx (dropped), 429 and 5xx (retried with back-off), error (unreachable, retried).",
                &["answer"],
            )?,
            remote_write_queue_bytes: g(
                "gpulse_remote_write_queue_bytes",
                "Bytes of remote write requests waiting on disk for the receiver.",
            )?,
            remote_write_last_success: g(
                "gpulse_remote_write_last_success_timestamp_seconds",
                "When the receiver last took a remote write request.",
            )?,
            remote_write_exported_until: g(
                "gpulse_remote_write_exported_until_timestamp_seconds",
                "End of the last minute of rollups put in the remote write queue.",
            )?,
            ingest_log_full_waits: c(
                "gpulse_ingest_log_full_waits_total",
                "Ingest batches that waited for a snapshot to bring the write-ahead log back under --wal-max-bytes plus a segment (agents spool meanwhile).",
            )?,
            tls_handshake_failures: c(
                "gpulse_tls_handshake_failures_total",
                "Connections closed because their TLS handshake failed, timed out, or found too many in progress.",
            )?,
            subscribers_refused: c(
                "gpulse_subscribers_refused_total",
                "Subscribe calls refused with RESOURCE_EXHAUSTED because --max-subscribers streams were open.",
            )?,
            ring_bytes: gv(
                "gpulse_store_ring_bytes",
                "Bytes held in the event ring, by kind.",
                &["kind"],
            )?,
            ring_events: gv(
                "gpulse_store_ring_events",
                "Events held in the event ring, by kind.",
                &["kind"],
            )?,
            ring_budget_bytes: g(
                "gpulse_store_ring_budget_bytes",
                "Configured event ring budget.",
            )?,
            ring_expired: cv(
                "gpulse_store_expired_events_total",
                "Events expired from the ring to stay within budget, by kind.",
                &["kind"],
            )?,
            wal_bytes: g(
                "gpulse_store_wal_bytes",
                "Bytes in write-ahead log segments.",
            )?,
            recovery_events_lost: c(
                "gpulse_store_recovery_events_lost_total",
                "Events lost to damage found at start-up: skipped log frames (counted from the cursors around them) and a damaged events snapshot's events the log did not hold.",
            )?,
            wal_corruptions: c(
                "gpulse_store_wal_corruptions_total",
                "Damaged WAL frames found (and skipped) at start-up.",
            )?,
            subscribers: g("gpulse_subscribers", "Live Subscribe streams.")?,
            subscriber_dropped: c(
                "gpulse_subscriber_dropped_events_total",
                "Events not delivered to slow subscribers (each gets a Lagged notice).",
            )?,
            subscriber_lag_notices: c(
                "gpulse_subscriber_lag_notices_total",
                "Lagged notices sent to slow subscribers.",
            )?,
            agents_connected: g(
                "gpulse_agents_connected",
                "Agents with an open Ingest stream.",
            )?,
            agent_reported_drops: cv(
                "gpulse_agent_reported_dropped_events_total",
                "Events agents reported lost, by node and stage (kernel_ring, agent_spool, kmsg, ...).",
                &["node", "stage"],
            )?,
            xid_events: cv(
                "gpulse_xid_events_total",
                "XID events stored, by node, GPU (UUID and PCI address), code and severity. Survives collector restarts.",
                &["node", "gpu_uuid", "pci", "xid", "severity"],
            )?,
            sxid_events: cv(
                "gpulse_sxid_events_total",
                "NVSwitch SXid events stored, by node, switch (PCI address), code and severity.",
                &["node", "switch", "sxid", "severity"],
            )?,
            counter_series_dropped: c(
                "gpulse_counter_series_dropped_total",
                "XID/SXid increments not exported because the label-set bound was reached.",
            )?,
            ring_share_bytes: gv(
                "gpulse_store_ring_share_bytes",
                "Bytes of the event budget guaranteed to each kind (kinds may borrow unused shares).",
                &["kind"],
            )?,
            ring_oldest_seconds: gv(
                "gpulse_store_ring_oldest_timestamp_seconds",
                "Time of the oldest event held, by kind (Unix seconds).",
                &["kind"],
            )?,
            series_bytes: gv(
                "gpulse_store_series_bytes",
                "Bytes held by the sample history, by tier (raw, 1m, 1h).",
                &["tier"],
            )?,
            series_budget_bytes: gv(
                "gpulse_store_series_budget_bytes",
                "Configured sample history budget, by tier.",
                &["tier"],
            )?,
            series_expired: cv(
                "gpulse_store_series_expired_total",
                "Raw chunks or rollup buckets expired to stay within budget, by tier.",
                &["tier"],
            )?,
            series_oldest_seconds: gv(
                "gpulse_store_series_oldest_timestamp_seconds",
                "Time of the oldest sample data held, by tier (Unix seconds).",
                &["tier"],
            )?,
            series_rejected: cv(
                "gpulse_store_series_rejected_samples_total",
                "GPU samples not added to the history (reason: out_of_order, too_many_gpus).",
                &["reason"],
            )?,
            series_gpus: g("gpulse_store_series_gpus", "GPUs with sample history.")?,
            health_dropped: cv(
                "gpulse_gpu_health_dropped_total",
                "GPU health: GPUs not judged because the table was full (what=gpus), reasons dropped from a GPU that had 32 (what=reasons).",
                &["what"],
            )?,
            series_gpus_retired: c(
                "gpulse_store_series_gpus_retired_total",
                "GPUs silent for over an hour whose history slot went to a new GPU at --max-gpus.",
            )?,
            agent_ids_evicted: c(
                "gpulse_agent_ids_evicted_total",
                "Agent ids forgotten because their node reached its share of 64 (the least recently seen disconnected one goes).",
            )?,
            agents_retired: c(
                "gpulse_agents_retired_total",
                "Agent ids forgotten after --agent-retention without a connection (their de-duplication state leaves the checkpoints).",
            )?,
            nodes_retired: c(
                "gpulse_nodes_retired_total",
                "Nodes dropped from the node and GPU gauges after --node-retention without news.",
            )?,
            snapshots: cv(
                "gpulse_store_snapshots_total",
                "Snapshots written, by kind (series, events).",
                &["kind"],
            )?,
            snapshot_failures: cv(
                "gpulse_store_snapshot_failures_total",
                "Snapshots that failed to write or load (load: damaged and skipped), by kind and stage.",
                &["kind", "stage"],
            )?,
            query_seconds: {
                let h = prometheus::HistogramVec::new(
                    prometheus::HistogramOpts::new(
                        "gpulse_query_duration_seconds",
                        "Time the store spent answering a query, by RPC.",
                    )
                    .buckets(vec![
                        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                    ]),
                    &["rpc"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            scrape_seconds: {
                let h = prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        "gpulse_metrics_scrape_duration_seconds",
                        "Time to render the node and GPU gauges for a /metrics scrape.",
                    )
                    .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05]),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            registry,
        })
    }

    /// Text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}
