//! `gpulse`: the human's window onto a gpulse collector.
#![allow(clippy::print_stdout, clippy::print_stderr)] // stdout is this program's output; stderr its diagnostics
//!
//! stdout carries only results (events, JSON lines, tables); diagnostics go to stderr.
use std::{
    io::{self, BufRead, Write},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use gpulse_collector::json;
use gpulse_proto::v1::{
    EventFilter, EventKind, Severity, StatusRequest, SubscribeRequest, subscribe_response::Msg,
    telemetry_client::TelemetryClient,
};
use gpulse_xid::{Decoder, catalog, parse::strip_rendering};
use serde_json::json;

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
    Tail(TailArgs),
    /// XID catalog and parser.
    Xid {
        #[command(subcommand)]
        cmd: XidCmd,
    },
    /// Nodes the collector has heard from, with their GPUs' latest samples.
    Nodes {
        #[arg(
            long,
            env = "GPULSE_COLLECTOR",
            default_value = "http://127.0.0.1:7700"
        )]
        collector: String,
        #[arg(long)]
        json: bool,
    },
    /// Collector status.
    Status {
        #[arg(
            long,
            env = "GPULSE_COLLECTOR",
            default_value = "http://127.0.0.1:7700"
        )]
        collector: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum XidCmd {
    /// What an XID code means and what to do about it.
    Explain {
        /// XID code (1-173 are catalogued).
        code: u32,
        #[arg(long)]
        json: bool,
    },
    /// Decode kernel log lines from stdin (dmesg, journalctl or /dev/kmsg text) as JSON lines.
    Parse,
}

#[derive(ClapArgs, Debug)]
struct TailArgs {
    /// Collector gRPC URL.
    #[arg(
        long,
        env = "GPULSE_COLLECTOR",
        default_value = "http://127.0.0.1:7700"
    )]
    collector: String,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only these nodes (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Only these kinds: xid, sxid, driver_log, agent_status, gap, gpu_process, gpu_sample (repeatable).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// Only events at least this severe: info, warning, error, fatal.
    #[arg(long)]
    min_severity: Option<String>,
    /// Only these XID codes (repeatable).
    #[arg(long = "xid")]
    xids: Vec<u32>,
    /// Only these GPUs, by UUID or PCI address (repeatable).
    #[arg(long = "gpu")]
    gpus: Vec<String>,
    /// Replay stored events after this cursor before going live (0 = everything retained).
    #[arg(long)]
    after: Option<u64>,
    /// Include GPU samples (many: one per GPU per second); `--kind gpu_sample` alone shows only them.
    #[arg(long)]
    samples: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Exit instead of reconnecting when the stream breaks.
    #[arg(long)]
    no_reconnect: bool,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Tail(a) => tail(a).await,
        Cmd::Xid {
            cmd: XidCmd::Explain { code, json },
        } => explain(code, json),
        Cmd::Xid { cmd: XidCmd::Parse } => parse_stdin(),
        Cmd::Status { collector, json } => status(&collector, json).await,
        Cmd::Nodes { collector, json } => nodes(&collector, json).await,
    };
    if let Err(e) = res {
        eprintln!("gpulse: {e:#}");
        std::process::exit(1);
    }
}

fn filter(a: &TailArgs) -> anyhow::Result<EventFilter> {
    let mut kinds = a
        .kinds
        .iter()
        .map(|k| {
            EventKind::from_short_name(k)
                .map(|k| k as i32)
                .with_context(|| {
                    format!("unknown --kind {k:?} (xid, sxid, driver_log, agent_status, gap, gpu_process, gpu_sample)")
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if kinds.is_empty() && !a.samples {
        // Samples are opt-in: everything else by default.
        kinds = [
            EventKind::Xid,
            EventKind::Sxid,
            EventKind::DriverLog,
            EventKind::AgentStatus,
            EventKind::Gap,
            EventKind::GpuProcess,
        ]
        .iter()
        .map(|k| *k as i32)
        .collect();
    }
    let min_severity = match &a.min_severity {
        None => Severity::Unspecified,
        Some(s) => {
            let s: gpulse_xid::Severity = s
                .parse()
                .map_err(|e| anyhow::anyhow!("--min-severity: {e}"))?;
            s.into()
        }
    };
    Ok(EventFilter {
        nodes: a.nodes.clone(),
        kinds,
        min_severity: min_severity as i32,
        xid_codes: a.xids.clone(),
        gpus: a.gpus.clone(),
    })
}

async fn tail(a: TailArgs) -> anyhow::Result<()> {
    let filter = filter(&a)?;
    let mut after = a.after;
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(200);
    let stdout = io::stdout();
    loop {
        let res: anyhow::Result<()> = async {
            let mut client = TelemetryClient::connect(a.collector.clone()).await.with_context(|| format!("connecting to {}", a.collector))?;
            let mut stream = client
                .subscribe(SubscribeRequest { filter: Some(filter.clone()), after_cursor: after })
                .await?
                .into_inner();
            backoff = Duration::from_millis(200);
            while let Some(msg) = stream.message().await? {
                let mut out = stdout.lock();
                match msg.msg {
                    Some(Msg::Event(ev)) => {
                        after = Some(ev.cursor);
                        if a.json {
                            writeln!(out, "{}", json::event(&ev))?;
                        } else {
                            writeln!(out, "{}", json::line(&ev))?;
                        }
                        out.flush()?;
                        seen += 1;
                        if a.count.is_some_and(|c| seen >= c) {
                            return Ok(());
                        }
                    }
                    Some(Msg::Lagged(l)) => {
                        after = Some(after.unwrap_or(0).max(l.resume_cursor));
                        eprintln!("gpulse: fell behind: {} events skipped (resuming after cursor {})", l.missed, l.resume_cursor);
                        if a.json {
                            writeln!(out, "{}", json!({"kind": "lagged", "missed": l.missed, "resume_cursor": l.resume_cursor}))?;
                            out.flush()?;
                        }
                    }
                    None => {}
                }
            }
            bail!("collector closed the stream")
        }
        .await;
        match res {
            Ok(()) => return Ok(()),
            Err(e) if a.no_reconnect => return Err(e),
            Err(e) => {
                // An invalid filter will not get better by retrying.
                if let Some(s) = e.downcast_ref::<tonic::Status>()
                    && s.code() == tonic::Code::InvalidArgument
                {
                    return Err(e);
                }
                eprintln!("gpulse: {e:#}; reconnecting in {} ms", backoff.as_millis());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                // Resume after the last event we printed; live-only tails become resuming ones
                // so nothing is missed across a collector restart.
                after = Some(after.unwrap_or(0));
            }
        }
    }
}

fn explain(code: u32, as_json: bool) -> anyhow::Result<()> {
    let Some(info) = catalog::lookup(code) else {
        bail!(
            "XID {code} is not in the catalog (codes 1-173 are known); newer drivers may define it: check NVIDIA's Xid catalog"
        );
    };
    if as_json {
        println!("{}", serde_json::to_string(info)?);
    } else {
        println!("XID {}: {}", info.code, info.mnemonic);
        println!("  meaning:            {}", info.description);
        println!("  severity (default): {}", info.severity);
        println!(
            "  immediate action:   {}",
            if info.immediate_action.is_empty() {
                "(none given)"
            } else {
                info.immediate_action
            }
        );
        println!(
            "  investigate:        {}",
            if info.investigatory_action.is_empty() {
                "(none given)"
            } else {
                info.investigatory_action
            }
        );
    }
    Ok(())
}

fn parse_stdin() -> anyhow::Result<()> {
    let mut d = Decoder::default();
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        match d.feed(i as u64, strip_rendering(&line)) {
            Some(dec) => writeln!(
                out,
                "{}",
                json!({"severity": dec.severity, "gpu_uuid": dec.gpu_uuid, "record": dec.record})
            )?,
            None => eprintln!("gpulse: line {}: not an NVIDIA driver record", i + 1),
        }
    }
    Ok(())
}

async fn nodes(collector: &str, as_json: bool) -> anyhow::Result<()> {
    let mut client = TelemetryClient::connect(collector.to_string())
        .await
        .with_context(|| format!("connecting to {collector}"))?;
    let r = client
        .nodes(gpulse_proto::v1::NodesRequest {})
        .await?
        .into_inner();
    if as_json {
        for n in &r.nodes {
            let gpus: Vec<serde_json::Value> = n.gpus.iter().map(json::gpu_sample).collect();
            println!(
                "{}",
                json!({
                    "node": n.node,
                    "connected": !n.connected_agents.is_empty(),
                    "connected_agents": n.connected_agents,
                    "last_seen": n.last_seen.as_ref().map(gpulse_proto::time::rfc3339),
                    "xid_source": n.xid_source,
                    "agent_detail": n.agent_detail,
                    "gpus": gpus,
                })
            );
        }
        return Ok(());
    }
    if r.nodes.is_empty() {
        println!("no nodes yet: no agent has sent anything to {collector}");
    }
    for n in &r.nodes {
        println!(
            "{}  {}  last seen {}  source {}  {} GPU(s)",
            n.node,
            if n.connected_agents.is_empty() {
                "disconnected"
            } else {
                "connected"
            },
            n.last_seen
                .as_ref()
                .map(gpulse_proto::time::rfc3339)
                .unwrap_or_else(|| "-".into()),
            if n.xid_source.is_empty() {
                "-"
            } else {
                &n.xid_source
            },
            n.gpus.len()
        );
        for g in &n.gpus {
            let ev = gpulse_proto::v1::Event {
                payload: Some(gpulse_proto::v1::event::Payload::GpuSample(g.clone())),
                ..Default::default()
            };
            let line = json::line(&ev);
            println!(
                "    {} {}",
                g.name,
                line.split("gpu_sample").nth(1).unwrap_or(&line).trim()
            );
        }
    }
    Ok(())
}

async fn status(collector: &str, as_json: bool) -> anyhow::Result<()> {
    let mut client = TelemetryClient::connect(collector.to_string())
        .await
        .with_context(|| format!("connecting to {collector}"))?;
    let s = client.status(StatusRequest {}).await?.into_inner();
    if as_json {
        println!(
            "{}",
            json!({
                "version": s.version, "events_stored": s.events_stored, "ring_bytes": s.ring_bytes, "ring_budget_bytes": s.ring_budget_bytes,
                "last_cursor": s.last_cursor, "oldest_cursor": s.oldest_cursor, "agents_connected": s.agents_connected,
                "subscribers": s.subscribers, "duplicates_dropped": s.duplicates_dropped, "events_expired": s.events_expired,
                "started": s.started.as_ref().map(gpulse_proto::time::rfc3339),
            })
        );
    } else {
        println!(
            "collector {} (started {})",
            s.version,
            s.started
                .as_ref()
                .map(gpulse_proto::time::rfc3339)
                .unwrap_or_default()
        );
        println!(
            "  events stored: {} (cursors {}..={}), {} expired",
            s.events_stored, s.oldest_cursor, s.last_cursor, s.events_expired
        );
        println!("  ring: {} of {} bytes", s.ring_bytes, s.ring_budget_bytes);
        println!(
            "  agents connected: {}, subscribers: {}, duplicates dropped: {}",
            s.agents_connected, s.subscribers, s.duplicates_dropped
        );
    }
    Ok(())
}
