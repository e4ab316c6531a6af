//! `gpulse mcp --stdio`: the MCP server on stdin/stdout over a collector's (or gateway's)
//! Telemetry API. Logs go to stderr: stdout is the protocol.
use clap::Args;
use gpulse_proto::api::RemoteTelemetry;

use crate::args::CollectorArg;

#[derive(Args, Debug)]
pub struct McpArgs {
    /// Serve on stdin/stdout (the only transport here; the collector serves HTTP at /mcp).
    #[arg(long, required = true)]
    pub stdio: bool,
    #[command(flatten)]
    pub collector: CollectorArg,
}

pub async fn run(a: McpArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Connect lazily: the client may list tools before the collector is up.
    let client = a
        .collector
        .connect_lazy()?
        .max_decoding_message_size(64 << 20);
    gpulse_mcp::serve_stdio(RemoteTelemetry::shared(client)).await
}
