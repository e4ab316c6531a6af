//! The gpulse MCP server (rmcp): read-only tools, two prompts and the XID catalog as a resource,
//! written against the Telemetry API ([`SharedTelemetry`]) and nothing else. The collector serves
//! it in-process as Streamable HTTP at `/mcp` (feature `http`; both protocol eras: 2025-11-25 with
//! its handshake, and 2026-07-28 stateless); `gpulse mcp --stdio` serves it over stdio with a
//! collector (or gateway) reached over gRPC. The tools only shape answers: counting and grouping
//! happen in the collector's aggregation RPCs.
#[cfg(feature = "http")]
pub mod http;
pub mod source;
pub mod tools;
pub mod types;

pub use gpulse_proto::api::SharedTelemetry;
use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    handler::server::{router::prompt::PromptRouter, wrapper::Parameters},
    model::{
        ListResourcesResult, PaginatedRequestParams, PromptMessage, ReadResourceRequestParams,
        ReadResourceResponse, ReadResourceResult, Resource, ResourceContents, Role,
        ServerCapabilities, ServerConfig,
    },
    prompt, prompt_handler, prompt_router,
    service::RequestContext,
    tool_handler,
};

use source::Source;
use types::{FleetArgs, TriageArgs};

pub const CATALOG_URI: &str = "telemetry://xid-catalog";

#[derive(Clone)]
pub struct GpulseMcp {
    source: Source,
    tool_router: tools::Router,
    prompt_router: PromptRouter<GpulseMcp>,
}

impl GpulseMcp {
    /// The MCP server over `api` (a collector's Telemetry service, or a remote one).
    pub fn new(api: SharedTelemetry) -> Self {
        Self {
            source: Source::new(api),
            tool_router: tools::router(),
            prompt_router: Self::prompt_router(),
        }
    }
}

const INSTRUCTIONS: &str = "gpulse: NVIDIA GPU fleet telemetry (XID errors from the kernel, GPU \
processes, NVML samples) held by a collector in a rolling window: events and samples age out as \
budgets fill, so call collector_status to see how far back each kind and sample tier reaches. \
Start with events_summary (\"what happened\") or list_nodes (\"what is unhealthy\"), then drill \
down with list_events, xid_summary, describe_node, gpu_metric_trend, list_gpu_processes. Windows \
take since/until as 90s, 15m, 1h, 7d, now-<duration> or RFC 3339. All tools are read-only.";

#[prompt_router]
impl GpulseMcp {
    /// Triage one node: what is wrong with it now and over the window, and what to do.
    #[prompt(name = "triage_node")]
    async fn triage_node(&self, Parameters(a): Parameters<TriageArgs>) -> Vec<PromptMessage> {
        let since = a.since.unwrap_or_else(|| "1h".into());
        vec![PromptMessage::new_text(
            Role::User,
            format!(
                "Triage GPU node {node} over the last {since}. Use the gpulse tools in this order:\n\
                 1. describe_node(node=\"{node}\", since=\"{since}\") for its GPUs, agent and recent events.\n\
                 2. xid_summary(node=\"{node}\", since=\"{since}\", group_by=\"gpu\") for which GPUs raised which XIDs.\n\
                 3. For each XID code seen, describe_xid to get its meaning and NVIDIA's recommended action.\n\
                 4. gpu_metric_trend(metric=\"gpu_util_pct\", nodes=[\"{node}\"], group_by=\"gpu\", since=\"{since}\") \
                 and the same for temperature_c and power_w, to see whether a GPU dropped out or ran hot.\n\
                 5. list_events(nodes=[\"{node}\"], since=\"{since}\", min_severity=\"warning\") for the timeline.\n\
                 Then report: the affected GPUs (UUID and PCI), the root-cause XID of each incident, the \
                 workloads (pods) running on them, and the action to take (reset, drain, RMA) with the evidence.",
                node = a.node
            ),
        )]
    }

    /// A fleet health report: what is unhealthy, what happened, which XIDs dominate.
    #[prompt(name = "fleet_health_report")]
    async fn fleet_health_report(
        &self,
        Parameters(a): Parameters<FleetArgs>,
    ) -> Vec<PromptMessage> {
        let since = a.since.unwrap_or_else(|| "24h".into());
        vec![PromptMessage::new_text(
            Role::User,
            format!(
                "Write a GPU fleet health report for the last {since}. Use the gpulse tools in this order:\n\
                 1. collector_status, to state how fresh the data is and how far back it reaches.\n\
                 2. list_nodes(since=\"{since}\", only_unhealthy=true) for the nodes that need attention.\n\
                 3. events_summary(since=\"{since}\") for counts, incidents and their root-cause XIDs.\n\
                 4. xid_summary(since=\"{since}\", group_by=\"node\") for where XIDs concentrate.\n\
                 Report: overall health, each unhealthy node with its incidents and recommended action, \
                 XID trends, and any data gaps (partial windows, disconnected agents, drops)."
            ),
        )]
    }
}

#[tool_handler(router = self.tool_router)]
#[prompt_handler(router = self.prompt_router)]
impl ServerHandler for GpulseMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
        .with_server_info(rmcp::model::Implementation::new(
            "gpulse-collector",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(CATALOG_URI, "xid-catalog")
                .with_title("NVIDIA XID catalog")
                .with_description(
                    "Every XID code gpulse knows (1-173): mnemonic, meaning, default severity, NVIDIA's actions",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        if request.uri != CATALOG_URI {
            return Err(ErrorData::resource_not_found(
                format!("no resource {}; the server has {CATALOG_URI}", request.uri),
                None,
            ));
        }
        let body = serde_json::to_string(gpulse_xid::catalog::all())
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(body, CATALOG_URI).with_mime_type("application/json"),
        ])
        .into())
    }
}

/// Serves MCP on stdin/stdout until the client closes it. Logs must go to stderr.
pub async fn serve_stdio(api: SharedTelemetry) -> anyhow::Result<()> {
    use rmcp::ServiceExt;
    let running = GpulseMcp::new(api).serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}
