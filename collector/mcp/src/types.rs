//! MCP tool arguments and results. Keys are snake_case and stable; every result is an object
//! (so 2025-11-25 clients get `structuredContent` too) and carries its resolved window.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Event kinds a tool can filter on.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Xid,
    Sxid,
    DriverLog,
    AgentStatus,
    Gap,
    GpuProcess,
    GpuSample,
    /// A GPU's health verdict changed (written by the collector).
    GpuHealth,
    /// A payload this collector does not know (sent by a newer agent), kept as received.
    Unknown,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Fatal,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventOrder {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// A GPU metric the collector keeps: a name of the contract's catalog
/// (`gpulse_proto::metric::METRICS`, also `gpulse trend --list-metrics`). The schema and the
/// accepted names come from the catalog, so a metric added there is offered here unchanged.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Metric(&'static str);

impl Metric {
    pub fn name(self) -> &'static str {
        self.0
    }

    pub fn from_name(name: &str) -> Option<Self> {
        gpulse_proto::metric::by_name(name).map(|(_, def)| Self(def.name))
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown metric {name:?}; expected one of: {}",
                gpulse_proto::metric::names().join(", ")
            ))
        })
    }
}

impl JsonSchema for Metric {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Metric".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let defs = gpulse_proto::metric::METRICS;
        let described: Vec<String> = defs
            .iter()
            .map(|m| format!("{} ({}, {})", m.name, m.help, m.unit))
            .collect();
        schemars::json_schema!({
            "type": "string",
            "enum": defs.iter().map(|m| m.name).collect::<Vec<_>>(),
            "description": format!("The GPU metric: {}.", described.join("; ")),
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TrendGroup {
    Fleet,
    #[default]
    Node,
    Gpu,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    #[default]
    Avg,
    Min,
    Max,
    P95,
    Last,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XidGroup {
    #[default]
    Xid,
    Gpu,
    Node,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    Running,
    Exited,
    #[default]
    All,
}

// ----------------------------------------------------------------------------------------------
// Arguments

/// Tools whose arguments may name clusters.
pub trait Clusters {
    /// `cluster` and `clusters` together.
    fn clusters(&self) -> Vec<String>;
}

macro_rules! clusters {
    ($($t:ty),+) => {$(
        impl Clusters for $t {
            fn clusters(&self) -> Vec<String> {
                self.cluster.iter().chain(&self.clusters).cloned().collect()
            }
        }
    )+};
}

clusters!(
    ListNodesArgs,
    EventsSummaryArgs,
    ListEventsArgs,
    XidSummaryArgs,
    TrendArgs,
    DescribeNodeArgs,
    ListProcessesArgs,
    GpuHealthArgs
);

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListNodesArgs {
    /// Window start: a duration back from now (90s, 15m, 1h, 7d), now-<duration>, or RFC 3339. Default 1h.
    #[serde(default)]
    pub since: String,
    /// Only nodes whose name contains this (case-insensitive), or matches it as a glob with `*`.
    #[serde(default)]
    pub node_match: String,
    /// Only nodes with XIDs in the window or no connected agent.
    #[serde(default)]
    pub only_unhealthy: bool,
    /// 1-500, default 50.
    pub limit: Option<u32>,
    /// next_cursor of a previous call.
    #[serde(default)]
    pub cursor: String,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsSummaryArgs {
    /// Window start (90s, 15m, 1h, 7d, now-<duration>, RFC 3339). Default 1h.
    #[serde(default)]
    pub since: String,
    /// Window end: now (default), now-<duration> or RFC 3339.
    #[serde(default)]
    pub until: String,
    /// Only these nodes (exact names).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Only these kinds; default every kind except gpu_sample.
    #[serde(default)]
    pub kinds: Vec<Kind>,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListEventsArgs {
    /// Window start (90s, 15m, 1h, 7d, now-<duration>, RFC 3339). Default 1h.
    #[serde(default)]
    pub since: String,
    /// Window end: now (default), now-<duration> or RFC 3339.
    #[serde(default)]
    pub until: String,
    /// Only these nodes (exact names).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Only this GPU: UUID or PCI address.
    #[serde(default)]
    pub gpu: String,
    /// Only these kinds; default every kind except gpu_sample.
    #[serde(default)]
    pub kinds: Vec<Kind>,
    /// Only these XID codes.
    #[serde(default)]
    pub xid: Vec<u32>,
    /// Only events at least this severe.
    pub min_severity: Option<Severity>,
    /// 1-500, default 50.
    pub limit: Option<u32>,
    /// next_cursor of a previous call (same filters).
    #[serde(default)]
    pub cursor: String,
    #[serde(default)]
    pub order: EventOrder,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XidSummaryArgs {
    /// Only this node (exact name); all nodes when empty.
    #[serde(default)]
    pub node: String,
    /// Window start (90s, 15m, 1h, 7d, now-<duration>, RFC 3339). Default 24h.
    #[serde(default)]
    pub since: String,
    /// Window end: now (default), now-<duration> or RFC 3339.
    #[serde(default)]
    pub until: String,
    #[serde(default)]
    pub group_by: XidGroup,
    /// Groups returned, 1-100, default 20.
    pub top: Option<u32>,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DescribeXidArgs {
    /// The XID code, e.g. 79.
    pub xid: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrendArgs {
    pub metric: Metric,
    /// Window start (90s, 15m, 1h, 24h, 7d, now-<duration>, RFC 3339). Default 1h.
    #[serde(default)]
    pub since: String,
    /// Window end: now (default), now-<duration> or RFC 3339.
    #[serde(default)]
    pub until: String,
    /// Only these nodes (exact names).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Only these GPUs: UUID or node/index.
    #[serde(default)]
    pub gpus: Vec<String>,
    #[serde(default)]
    pub group_by: TrendGroup,
    #[serde(default)]
    pub aggregate: Aggregate,
    /// Points per series, 1-1000, default 120; the step follows.
    pub max_points: Option<u32>,
    /// Series returned, 1-200, default 20; the rest are merged into one "other" series.
    pub max_series: Option<u32>,
    /// Default true; false returns only per-series stats.
    pub include_points: Option<bool>,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DescribeNodeArgs {
    /// The node's name (exact).
    pub node: String,
    /// Window for XID counts and recent events (90s, 15m, 1h, 7d, now-<duration>, RFC 3339). Default 1h.
    #[serde(default)]
    pub since: String,
    /// Recent events returned, 0-50, default 10.
    pub max_events: Option<u32>,
    /// Default true.
    pub include_processes: Option<bool>,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListProcessesArgs {
    /// Only this node (exact name).
    #[serde(default)]
    pub node: String,
    /// Only processes that opened this GPU: device path (/dev/nvidia3), UUID, or index.
    #[serde(default)]
    pub gpu: String,
    /// Window start (90s, 15m, 1h, 7d, now-<duration>, RFC 3339). Default 1h.
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub state: ProcState,
    /// 1-500, default 50.
    pub limit: Option<u32>,
    /// next_cursor of a previous call.
    #[serde(default)]
    pub cursor: String,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuHealthArgs {
    /// Only this node's GPUs (exact name).
    #[serde(default)]
    pub node: String,
    /// Also list healthy GPUs (they are always counted). Default false.
    #[serde(default)]
    pub include_healthy: bool,
    /// 1-200, default 50: GPUs listed, unhealthy first.
    pub limit: Option<u32>,
    /// Through a gateway: only this cluster (or "cluster/shard"). Default: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Through a gateway: only these clusters.
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct TriageArgs {
    /// The node to triage.
    pub node: String,
    /// Window, default 1h.
    pub since: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FleetArgs {
    /// Window, default 24h.
    pub since: Option<String>,
}

// ----------------------------------------------------------------------------------------------
// Results

/// The window as the collector resolved it, and what its data covers.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
pub struct Window {
    pub start: String,
    pub end: String,
    /// No `since` was given; the tool's default was used.
    pub window_defaulted: bool,
    /// Oldest data the answer could draw on.
    pub oldest_data: Option<String>,
    /// The window reaches past the oldest data: part of it is not covered.
    pub partial: bool,
}

/// Where an answer came from. Through a gateway: every upstream asked (a shard, or a cluster as
/// `cluster` and its shards as `cluster/shard`) and how it did; `partial` when any is missing,
/// and then the figures leave it out. From a collector: not partial, no upstreams.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
pub struct Sources {
    pub partial: bool,
    pub upstreams: Vec<UpstreamRow>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct UpstreamRow {
    pub name: String,
    /// ok, error, timeout or circuit_open.
    pub state: String,
    pub reason: Option<String>,
    pub elapsed_ms: u32,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KindUse {
    pub kind: String,
    pub bytes: u64,
    pub share_bytes: u64,
    pub events: u64,
    pub expired: u64,
    pub oldest: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TierUse {
    pub tier: String,
    pub resolution_s: u32,
    pub bytes: u64,
    pub budget_bytes: u64,
    pub expired: u64,
    pub oldest: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RingUse {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub events: u64,
    pub oldest: Option<String>,
    pub newest_cursor: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CollectorStatus {
    pub server_time: String,
    pub version: String,
    pub started: Option<String>,
    pub agents_connected: u32,
    pub nodes_known: u32,
    pub gpus_tracked: u32,
    pub ring: RingUse,
    pub kinds: Vec<KindUse>,
    pub history_tiers: Vec<TierUse>,
    pub dropped_events: DroppedEvents,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DroppedEvents {
    /// Expired from the store to stay within budget (data aged out, not lost on arrival).
    pub expired: u64,
    /// Resent by agents and dropped as duplicates (not a loss).
    pub duplicates: u64,
    pub samples_out_of_order: u64,
    pub samples_gpus_refused: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct NodeRow {
    pub node: String,
    /// The node's cluster, when its collector names one.
    pub cluster: Option<String>,
    pub last_seen: Option<String>,
    pub connected: bool,
    pub gpu_count: u32,
    pub gpu_models: Vec<String>,
    pub xid_count: u64,
    pub critical_xid_count: u64,
    /// Mean of the GPUs' latest utilisation samples.
    pub util_avg_pct: Option<f64>,
    /// ok, warning (XIDs or no agent connected) or critical (error/fatal XIDs).
    pub health: String,
    pub xid_source: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ListNodes {
    pub window: Window,
    pub nodes: Vec<NodeRow>,
    pub total_matched: u32,
    pub truncated: bool,
    pub next_cursor: Option<String>,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct KindCounts {
    pub xid: u64,
    pub sxid: u64,
    pub driver_log: u64,
    pub process_start: u64,
    pub process_exit: u64,
    pub agent_status: u64,
    pub gap: u64,
    pub gpu_sample: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TopNode {
    pub node: String,
    pub count: u64,
    /// Error or fatal events.
    pub critical: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TopXid {
    pub xid: u32,
    pub name: String,
    pub count: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Incident {
    pub node: String,
    pub gpu: String,
    pub start: String,
    pub end: String,
    pub xid_count: u64,
    /// Distinct codes in order of first appearance.
    pub xids: Vec<u32>,
    /// The XID that most likely started the burst: one another names as its cause, else the first.
    pub root_cause_xid: u32,
    pub root_cause_name: String,
    pub severity: String,
    pub summary: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventsSummary {
    pub window: Window,
    pub total_events: u64,
    pub counts_by_kind: KindCounts,
    pub top_nodes: Vec<TopNode>,
    pub top_xids: Vec<TopXid>,
    /// One-line highlights, most severe first.
    pub notable: Vec<String>,
    /// XID bursts per GPU (quiet gaps over 5 minutes split them).
    pub incidents: Vec<Incident>,
    /// More events matched than were summarised (the first 20,000).
    pub truncated: bool,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventRow {
    pub ts: String,
    pub node: String,
    pub kind: String,
    pub severity: String,
    pub gpu_uuid: Option<String>,
    pub gpu_pci: Option<String>,
    pub xid: Option<u32>,
    pub xid_name: Option<String>,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub pod: Option<String>,
    /// At most 200 characters.
    pub message: String,
    pub cursor: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ListEvents {
    pub window: Window,
    pub events: Vec<EventRow>,
    pub total_matched: u64,
    pub truncated: bool,
    pub truncated_reason: Option<String>,
    pub next_cursor: Option<String>,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct XidGroupRow {
    pub key: String,
    pub xid: Option<u32>,
    pub name: String,
    pub severity: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// At most 10.
    pub gpus: Vec<String>,
    /// At most 10.
    pub nodes: Vec<String>,
    pub recommended_action: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct XidSummary {
    pub window: Window,
    pub total: u64,
    pub groups: Vec<XidGroupRow>,
    /// XIDs in groups beyond `top`.
    pub other_count: u64,
    pub truncated: bool,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct XidInfo {
    pub xid: u32,
    pub name: String,
    pub description: String,
    /// gpulse's default severity (configurable on the agent).
    pub severity: String,
    pub typical_causes: Vec<String>,
    pub immediate_action: String,
    pub investigatory_action: String,
    pub recommended_action: String,
    pub docs_hint: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Stats {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    pub p95: Option<f64>,
    pub last: Option<f64>,
    pub samples: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TrendSeriesOut {
    pub node: Option<String>,
    pub gpu_uuid: Option<String>,
    pub gpu_index: Option<u32>,
    /// This series merges the ones past max_series.
    pub other: bool,
    pub merged_series: u32,
    pub stats: Stats,
    /// [unix_seconds, value] at the start of each step.
    pub points: Vec<(i64, f64)>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MetricTrend {
    pub metric: String,
    pub unit: String,
    pub window: Window,
    pub step_seconds: u32,
    /// raw, 1m or 1h.
    pub source: String,
    pub aggregate: String,
    /// p95 from a rollup tier is the p95 of bucket averages.
    pub approximate: bool,
    pub series: Vec<TrendSeriesOut>,
    pub series_total: u32,
    pub series_aggregated: bool,
    pub truncated: bool,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GpuLatest {
    pub util_pct: Option<u32>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub temp_c: Option<u32>,
    pub power_w: Option<f64>,
    pub sampled: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct NodeGpu {
    pub index: u32,
    pub uuid: String,
    pub pci: String,
    pub model: String,
    pub latest: GpuLatest,
    pub health: String,
    pub xid_count_window: u64,
    pub field_errors: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentInfo {
    pub connected_agents: Vec<String>,
    pub xid_source: String,
    pub detail: String,
    pub driver: Option<String>,
    pub cuda: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ProcessRow {
    pub node: String,
    pub pid: u32,
    pub name: String,
    pub exe: Option<String>,
    /// GPU device nodes it opened.
    pub devices: Vec<String>,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub running: bool,
    pub pod: Option<String>,
    /// GPU memory NVML reported for this pid in the latest samples.
    pub gpu_mem_bytes: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DescribeNode {
    pub node: String,
    pub cluster: Option<String>,
    pub window: Window,
    pub connected: bool,
    pub last_seen: Option<String>,
    pub agent: AgentInfo,
    pub gpus: Vec<NodeGpu>,
    pub processes: Vec<ProcessRow>,
    pub recent_events: Vec<EventRow>,
    pub xid_count_window: u64,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GpuHealth {
    pub unhealthy: u64,
    pub degraded: u64,
    pub unknown: u64,
    pub healthy: u64,
    /// Unhealthy first, then degraded, unknown, healthy.
    pub gpus: Vec<GpuHealthRow>,
    pub truncated: bool,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct GpuHealthRow {
    pub node: String,
    pub cluster: Option<String>,
    pub gpu_pci: String,
    pub gpu_uuid: Option<String>,
    pub gpu_index: Option<u32>,
    pub model: Option<String>,
    /// healthy, degraded, unhealthy or unknown.
    pub state: String,
    pub since: Option<String>,
    /// What NVIDIA recommends first (the worst reason's action), e.g. RESET_GPU, RESTART_BM,
    /// CONTACT_SUPPORT; none when healthy.
    pub action: Option<String>,
    pub reasons: Vec<HealthReasonRow>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct HealthReasonRow {
    /// The rule (docs/gpu-health.md): xid, fallen_off_bus, row_remap_failure, ...
    pub rule: String,
    pub state: String,
    pub action: String,
    /// What the action means, in words.
    pub what_to_do: String,
    pub summary: String,
    pub xid: Option<u32>,
    pub since: Option<String>,
    pub last: Option<String>,
    pub occurrences: u64,
    /// The same XID came back after repeated reboots: hardware inspection.
    pub escalated: bool,
    /// What clears it: process_exit, quiet_period, reset_or_reboot, reboot, replacement,
    /// evidence.
    pub clears_on: String,
    /// The reset/reboot happened; clean samples are being counted.
    pub clearing: bool,
    /// The rule is on trial (`--rules-shadow`): recorded, but it changes no state or action.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    pub pod: Option<String>,
    /// The latest evidence: the event's cursor (for list_events), its time and what it showed.
    pub evidence: Vec<EvidenceRow>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EvidenceRow {
    pub cursor: Option<u64>,
    pub time: Option<String>,
    pub kind: String,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ListProcesses {
    pub window: Window,
    pub processes: Vec<ProcessRow>,
    pub total_matched: u32,
    pub truncated: bool,
    pub next_cursor: Option<String>,
    pub hints: Vec<String>,
    #[serde(flatten)]
    pub sources: Sources,
}
