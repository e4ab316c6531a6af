//! `gpulse`: the human's window onto a gpulse collector. See the library for each command.
use clap::{Parser, Subcommand};
use gpulse_cli::{events, health, mcp, nodes, status, tail, trend, xid};

#[derive(Parser, Debug)]
#[command(
    name = "gpulse",
    version,
    about = "gpulse CLI: live GPU node events, XID explanations and collector status"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream live events from a collector (reconnects and resumes where it left off).
    Tail(tail::TailArgs),
    /// XID catalog and parser.
    Xid {
        #[command(subcommand)]
        cmd: xid::XidCmd,
    },
    /// Stored events in a time window (newest first), filtered and paged.
    Events(events::EventsArgs),
    /// A GPU metric over a time window, per GPU, node or fleet.
    Trend(trend::TrendArgs),
    /// Nodes the collector has heard from, with their GPUs' latest samples.
    Nodes(nodes::NodesArgs),
    /// Each GPU's health verdict, unhealthy first: reasons, evidence, what NVIDIA says to do.
    Health(health::HealthArgs),
    /// Collector status.
    Status(status::StatusArgs),
    /// Serve MCP on stdin/stdout over a collector (for MCP clients that launch a command).
    Mcp(mcp::McpArgs),
}

#[tokio::main]
async fn main() {
    let res = match Cli::parse().cmd {
        Cmd::Tail(a) => tail::run(a).await,
        Cmd::Xid { cmd } => xid::run(cmd),
        Cmd::Events(a) => events::run(a).await,
        Cmd::Trend(a) => trend::run(a).await,
        Cmd::Nodes(a) => nodes::run(a).await,
        Cmd::Health(a) => health::run(a).await,
        Cmd::Status(a) => status::run(a).await,
        Cmd::Mcp(a) => mcp::run(a).await,
    };
    if let Err(e) = res {
        eprintln!("gpulse: {e:#}");
        std::process::exit(1);
    }
}
