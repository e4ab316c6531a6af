//! The gpulse MCP server (rmcp): read-only tools, two prompts and the XID catalog as a resource,
//! written against the Telemetry API ([`SharedTelemetry`]) and nothing else. The collector serves
//! it in-process as Streamable HTTP at `/mcp` (feature `http`; both protocol eras: 2025-11-25 with
//! its handshake, and 2026-07-28 stateless); `gpulse mcp --stdio` serves it over stdio with a
//! collector (or gateway) reached over gRPC. The tools only shape answers: counting and grouping
//! happen in the collector's aggregation RPCs.
pub mod complete;
#[cfg(feature = "http")]
pub mod http;
pub mod logging;
pub mod resources;
#[cfg(feature = "http")]
pub mod sessions;
pub mod source;
pub mod tools;
pub mod types;

pub use gpulse_proto::api::SharedTelemetry;
use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    handler::server::{router::prompt::PromptRouter, wrapper::Parameters},
    model::{
        CallToolRequestParams, CallToolResponse, CompleteRequestParams, CompleteResult,
        ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams, PromptMessage,
        ReadResourceRequestParams, ReadResourceResponse, Role, ServerCapabilities, ServerConfig,
    },
    prompt, prompt_handler, prompt_router,
    service::RequestContext,
    tool_handler,
};

use logging::LogLevel;
pub use resources::CATALOG_URI;
use source::Source;
use types::{FleetArgs, TriageArgs};

#[derive(Clone)]
pub struct GpulseMcp {
    source: Source,
    tool_router: tools::Router,
    prompt_router: PromptRouter<GpulseMcp>,
    log_level: LogLevel,
}

impl GpulseMcp {
    /// The MCP server over `api` (a collector's Telemetry service, or a remote one).
    pub fn new(api: SharedTelemetry) -> Self {
        Self {
            source: Source::new(api),
            tool_router: tools::router(),
            prompt_router: Self::prompt_router(),
            log_level: LogLevel::default(),
        }
    }
}

const INSTRUCTIONS: &str = "gpulse: NVIDIA GPU fleet telemetry (XID errors from the kernel, GPU \
processes, NVML samples) held by a collector in a rolling window: events and samples age out as \
budgets fill, so call collector_status to see how far back each kind and sample tier reaches. \
Start with events_summary (\"what happened\"), gpu_health (\"which GPUs to take out of service, \
why, and what NVIDIA says to do\") or list_nodes, then drill down with list_events, xid_summary, \
describe_node, gpu_metric_trend, list_gpu_processes. Windows take since/until as 90s, 15m, 1h, 7d, now-<duration> or RFC 3339. All tools are read-only.";

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
                 1. gpu_health(node=\"{node}\", include_healthy=true) for each GPU's verdict, its reasons, \
                 the evidence (event cursors) and NVIDIA's recommended action.\n\
                 2. describe_node(node=\"{node}\", since=\"{since}\") for its GPUs, agent and recent events.\n\
                 3. xid_summary(node=\"{node}\", since=\"{since}\", group_by=\"gpu\") for which GPUs raised which XIDs.\n\
                 4. For each XID code seen, describe_xid to get its meaning and NVIDIA's recommended action.\n\
                 5. gpu_metric_trend(metric=\"gpu_util_pct\", nodes=[\"{node}\"], group_by=\"gpu\", since=\"{since}\") \
                 and the same for temperature_c and power_w, to see whether a GPU dropped out or ran hot.\n\
                 6. list_events(nodes=[\"{node}\"], since=\"{since}\", min_severity=\"warning\") for the timeline.\n\
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
                 2. gpu_health() for the GPUs to take out of service: each with its reasons, evidence \
                 and NVIDIA's recommended action (escalated ones need hardware inspection).\n\
                 3. list_nodes(since=\"{since}\", only_unhealthy=true) for the nodes that need attention.\n\
                 4. events_summary(since=\"{since}\") for counts, incidents and their root-cause XIDs.\n\
                 5. xid_summary(since=\"{since}\", group_by=\"node\") for where XIDs concentrate.\n\
                 Report: overall health with the counts of healthy, degraded, unhealthy and unknown GPUs, \
                 each unhealthy GPU with its action, each unhealthy node with its incidents and recommended action, \
                 XID trends, and any data gaps (partial windows, disconnected agents, drops)."
            ),
        )]
    }
}

#[tool_handler(router = self.tool_router)]
#[prompt_handler(router = self.prompt_router)]
impl ServerHandler for GpulseMcp {
    #[expect(
        deprecated,
        reason = "logging, deprecated by the 2026-07-28 protocol (SEP-2577), kept for 2025-11-25 clients"
    )]
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .enable_completions()
                .enable_logging()
                .build(),
        )
        .with_server_info(rmcp::model::Implementation::new(
            "gpulse-collector",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS)
    }

    /// Every tool call, timed; a cut answer or a slow call is also logged to the client.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let started = std::time::Instant::now();
        let tool = request.name.to_string();
        let peer = context.peer.clone();
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        let result = self.tool_router.call(tcc).await?;
        let notes = logging::about(&tool, started.elapsed(), &result);
        logging::send(&peer, &self.log_level, notes).await;
        Ok(result)
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let info = complete::complete(&self.source, &request.r#ref, &request.argument).await?;
        Ok(CompleteResult::new(info))
    }

    #[expect(
        deprecated,
        reason = "set_level, deprecated by the 2026-07-28 protocol (SEP-2577), kept for 2025-11-25 clients"
    )]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.log_level.set(request.level);
        Ok(())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(resources::list()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        Ok(resources::read(&request.uri)?.into())
    }
}

/// Serves MCP on stdin/stdout until the client closes it. Logs must go to stderr.
pub async fn serve_stdio(api: SharedTelemetry) -> anyhow::Result<()> {
    use rmcp::ServiceExt;
    let running = GpulseMcp::new(api).serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, deprecated)]
    use gpulse_proto::v1::{NodeInfo, NodesResponse};
    use rmcp::model::{LoggingLevel, SetLevelRequestParams};

    use crate::tools::testing::{Answers, Session};

    /// completion/complete, logging/setLevel and the resource templates over the protocol.
    #[tokio::test]
    async fn completions_logging_and_templates() {
        let node = |n: &str| NodeInfo {
            node: n.into(),
            ..Default::default()
        };
        let s = Session::new(Answers {
            nodes: NodesResponse {
                nodes: vec![node("gpu-b-1"), node("gpu-a-1"), node("cpu-gpu-1")],
                window: None,
                partial: Default::default(),
                upstreams: Default::default(),
                truncated: false,
                hints: Vec::new(),
            },
            ..Default::default()
        })
        .await;
        let info = s.client.peer_info().unwrap();
        assert!(info.capabilities.completions.is_some());
        assert!(info.capabilities.logging.is_some());
        let c = s
            .client
            .complete_prompt_argument("triage_node", "node", "gpu", None)
            .await
            .unwrap();
        assert_eq!(c.values, vec!["gpu-a-1", "gpu-b-1", "cpu-gpu-1"]);
        let c = s
            .client
            .complete_prompt_argument("fleet_health_report", "since", "now", None)
            .await
            .unwrap();
        assert_eq!(c.values, vec!["now-1h", "now-24h"]);
        let c = s
            .client
            .complete_resource_argument(crate::complete::METRIC_TEMPLATE, "name", "power", None)
            .await
            .unwrap();
        assert_eq!(c.values, vec!["power_w", "power_limit_w"]);
        let c = s
            .client
            .complete_resource_argument(crate::complete::XID_TEMPLATE, "code", "79", None)
            .await
            .unwrap();
        assert_eq!(c.values, vec!["79"]);
        for (prompt, arg) in [("triage_node", "color"), ("no_such_prompt", "node")] {
            let c = s
                .client
                .complete_prompt_argument(prompt, arg, "", None)
                .await
                .unwrap();
            assert!(
                c.values.is_empty(),
                "{prompt}/{arg}: nothing to suggest, no error"
            );
        }
        s.client
            .set_level(SetLevelRequestParams::new(LoggingLevel::Debug))
            .await
            .unwrap();
        let t = s.client.list_all_resource_templates().await.unwrap();
        assert_eq!(t.len(), 2);
    }

    /// A client that keeps the log notifications it receives.
    struct Listener(
        tokio::sync::mpsc::UnboundedSender<rmcp::model::LoggingMessageNotificationParam>,
    );

    impl rmcp::ClientHandler for Listener {
        async fn on_logging_message(
            &self,
            params: rmcp::model::LoggingMessageNotificationParam,
            _context: rmcp::service::NotificationContext<rmcp::RoleClient>,
        ) {
            let _ = self.0.send(params);
        }
    }

    /// A cut answer is logged to a client that asked for warnings; a client that asked for
    /// errors only hears nothing.
    #[tokio::test]
    async fn a_cut_answer_is_logged_to_the_client() {
        use rmcp::ServiceExt;
        let node = |n: &str| NodeInfo {
            node: n.into(),
            ..Default::default()
        };
        let fake = std::sync::Arc::new(crate::tools::testing::Fake {
            answers: Answers {
                nodes: NodesResponse {
                    nodes: vec![node("a"), node("b")],
                    window: None,
                    partial: Default::default(),
                    upstreams: Default::default(),
                    truncated: false,
                    hints: Vec::new(),
                },
                ..Default::default()
            },
            ..Default::default()
        });
        let (server_io, client_io) = tokio::io::duplex(1 << 16);
        let server = crate::GpulseMcp::new(fake);
        tokio::spawn(async move {
            let s = server.serve(server_io).await.unwrap();
            let _ = s.waiting().await;
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let client = Listener(tx).serve(client_io).await.unwrap();
        let call = || {
            rmcp::model::CallToolRequestParams::new("list_nodes").with_arguments(
                serde_json::json!({"limit": 1})
                    .as_object()
                    .cloned()
                    .unwrap(),
            )
        };
        client
            .set_level(SetLevelRequestParams::new(LoggingLevel::Error))
            .await
            .unwrap();
        client.call_tool(call()).await.unwrap();
        client
            .set_level(SetLevelRequestParams::new(LoggingLevel::Warning))
            .await
            .unwrap();
        client.call_tool(call()).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.level, LoggingLevel::Warning);
        assert_eq!(got.data["tool"], "list_nodes");
        assert!(
            rx.try_recv().is_err(),
            "only one: the first call was below the level"
        );
    }
}
