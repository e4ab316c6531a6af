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
    pub ring_bytes: IntGaugeVec,
    pub ring_events: IntGaugeVec,
    pub ring_budget_bytes: IntGauge,
    pub ring_expired: IntCounterVec,
    pub wal_bytes: IntGauge,
    pub wal_corruptions: IntCounter,
    pub subscribers: IntGauge,
    pub subscriber_dropped: IntCounter,
    pub subscriber_lag_notices: IntCounter,
    pub agents_connected: IntGauge,
    /// Losses agents reported in the stream (Gap events), by node and stage.
    pub agent_reported_drops: IntCounterVec,
    pub xid_events: IntCounterVec,
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
            ingest_events: c(
                "gpulse_ingest_events_total",
                "Events stored from agents (duplicates excluded).",
            )?,
            ingest_bytes: c(
                "gpulse_ingest_bytes_total",
                "Encoded bytes of stored events.",
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
                "Write-ahead log write or sync failures (batches not acknowledged).",
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
                "XID events stored, by node, GPU and code.",
                &["node", "gpu_uuid", "pci", "xid", "severity"],
            )?,
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
