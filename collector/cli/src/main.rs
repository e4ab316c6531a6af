//! `gpulse`: the human's window onto a gpulse collector. See the library for each command.
use clap::{CommandFactory as _, Parser, Subcommand, error::ErrorKind};
use gpulse_cli::{
    args::{BadArg, CollectorArg, check_window},
    error_line, events, health, mcp, nodes, status, tail, trend, xid,
};

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

impl Cmd {
    /// Every argument checked before anything connects: a wrong value is refused like clap
    /// refuses a malformed one (the flag named, exit status 2), not after a connection attempt.
    fn name(&self) -> &'static str {
        match self {
            Cmd::Tail(_) => "tail",
            Cmd::Xid { .. } => "xid",
            Cmd::Events(_) => "events",
            Cmd::Trend(_) => "trend",
            Cmd::Nodes(_) => "nodes",
            Cmd::Health(_) => "health",
            Cmd::Status(_) => "status",
            Cmd::Mcp(_) => "mcp",
        }
    }

    fn check(&self) -> Result<(), BadArg> {
        let collector = |c: &CollectorArg| c.check();
        match self {
            Cmd::Xid { .. } => Ok(()),
            Cmd::Tail(a) => collector(&a.collector),
            Cmd::Events(a) => {
                check_window(&a.since, &a.until)?;
                collector(&a.collector)
            }
            Cmd::Trend(a) => {
                check_window(&a.since, &a.until)?;
                collector(&a.collector)
            }
            Cmd::Nodes(a) => collector(&a.collector),
            Cmd::Health(a) => collector(&a.collector),
            Cmd::Status(a) => collector(&a.collector),
            Cmd::Mcp(a) => collector(&a.collector),
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(bad) = cli.cmd.check() {
        let mut command = Cli::command();
        command.build(); // names the subcommands "gpulse <name>" for their usage line
        let name = cli.cmd.name();
        let mut command = match command.find_subcommand_mut(name) {
            Some(sub) => sub.clone(),
            None => command,
        };
        command
            .error(
                ErrorKind::ValueValidation,
                format!("invalid value for '{}': {}", bad.flag, bad.why),
            )
            .exit();
    }
    let res = match cli.cmd {
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
        eprintln!("gpulse: {}", error_line(&e));
        std::process::exit(1);
    }
}
