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
use gpulse_proto::{metric, names::ShortName, render as json};
use gpulse_proto::{
    time::rfc3339,
    v1::{
        Aggregation, EventFilter, EventKind, GroupBy, ListEventsRequest, Order, ResolvedWindow,
        Severity, StatusRequest, SubscribeRequest, Tier, TimeWindow, TrendRequest,
        subscribe_response::Msg, telemetry_client::TelemetryClient,
    },
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
    /// Stored events in a time window (newest first), filtered and paged.
    Events(EventsArgs),
    /// A GPU metric over a time window, per GPU, node or fleet.
    Trend(TrendArgs),
    /// Nodes the collector has heard from, with their GPUs' latest samples.
    Nodes {
        #[command(flatten)]
        collector: CollectorArg,
        /// Only nodes heard from in this window (e.g. 1h, now-30m, RFC 3339), with XID counts.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Collector status.
    Status {
        #[command(flatten)]
        collector: CollectorArg,
        #[arg(long)]
        json: bool,
    },
}

/// `--collector`: where the collector's gRPC port is.
#[derive(ClapArgs, Debug, Clone)]
struct CollectorArg {
    /// Collector gRPC URL.
    #[arg(
        long = "collector",
        env = "GPULSE_COLLECTOR",
        default_value = "http://127.0.0.1:7700"
    )]
    url: String,
}

impl CollectorArg {
    async fn connect(&self) -> anyhow::Result<TelemetryClient<tonic::transport::Channel>> {
        TelemetryClient::connect(self.url.clone())
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }
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
    #[command(flatten)]
    collector: CollectorArg,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    filter: FilterArgs,
    /// Replay stored events after this cursor before going live (0 = everything retained).
    #[arg(long)]
    after: Option<u64>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Exit instead of reconnecting when the stream breaks.
    #[arg(long)]
    no_reconnect: bool,
}

#[derive(ClapArgs, Debug)]
struct EventsArgs {
    #[command(flatten)]
    collector: CollectorArg,
    /// Window start: a duration back from now (90s, 15m, 1h, 7d), now-<duration>, or RFC 3339.
    #[arg(long, default_value = "1h")]
    since: String,
    /// Window end: now, now-<duration> or RFC 3339.
    #[arg(long, default_value = "now")]
    until: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// Events per page (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Follow pages to the end of the window (at most --max-events events).
    #[arg(long)]
    all: bool,
    #[arg(long, default_value_t = 100_000)]
    max_events: u64,
    /// Continue from a previous page's next_page_token.
    #[arg(long)]
    page_token: Option<String>,
    /// Oldest first instead of newest first.
    #[arg(long)]
    oldest_first: bool,
    /// One JSON document: window, coverage, total_matched, events, next_page_token, hints.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs, Debug)]
struct TrendArgs {
    #[command(flatten)]
    collector: CollectorArg,
    /// Metric name (see --list-metrics).
    #[arg(long, required_unless_present = "list_metrics")]
    metric: Option<String>,
    /// Window start: a duration back from now (90s, 15m, 24h, 7d), now-<duration>, or RFC 3339.
    #[arg(long, default_value = "1h")]
    since: String,
    /// Window end: now, now-<duration> or RFC 3339.
    #[arg(long, default_value = "now")]
    until: String,
    /// Step in seconds (default: chosen from --max-points).
    #[arg(long, default_value_t = 0)]
    step: u32,
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_points: u32,
    /// avg, min, max, p95 or last.
    #[arg(long, default_value = "avg", value_parser = ["avg", "min", "max", "p95", "last"])]
    agg: String,
    /// gpu, node or fleet.
    #[arg(long, default_value = "gpu", value_parser = ["gpu", "node", "fleet"])]
    group_by: String,
    /// Only these nodes (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Only these GPUs: UUID or node/index (repeatable).
    #[arg(long = "gpu")]
    gpus: Vec<String>,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    max_series: u32,
    /// Source tier: auto (by step and coverage), raw, 1m or 1h.
    #[arg(long, default_value = "auto", value_parser = ["auto", "raw", "1m", "1h"])]
    tier: String,
    /// List the metrics the collector keeps and exit.
    #[arg(long)]
    list_metrics: bool,
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs, Debug)]
struct FilterArgs {
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
    /// Include GPU samples (many: one per GPU per second); `--kind gpu_sample` alone shows only them.
    #[arg(long)]
    samples: bool,
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
        Cmd::Nodes {
            collector,
            since,
            json,
        } => nodes(&collector, since, json).await,
        Cmd::Events(a) => events(a).await,
        Cmd::Trend(a) => trend(a).await,
    };
    if let Err(e) = res {
        eprintln!("gpulse: {e:#}");
        std::process::exit(1);
    }
}

fn filter(a: &FilterArgs) -> anyhow::Result<EventFilter> {
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
        kinds = EventKind::EVENTS.iter().map(|k| *k as i32).collect();
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
    let filter = filter(&a.filter)?;
    let mut after = a.after;
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(200);
    let stdout = io::stdout();
    loop {
        let res: anyhow::Result<()> = async {
            let mut client = a.collector.connect().await?;
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

async fn nodes(
    collector: &CollectorArg,
    since: Option<String>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut client = collector.connect().await?;
    let r = client
        .nodes(gpulse_proto::v1::NodesRequest {
            window: since.map(|since| TimeWindow {
                since,
                until: String::new(),
            }),
        })
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
                    "xid_count": n.xid_count,
                    "critical_xid_count": n.critical_xid_count,
                    "gpus": gpus,
                })
            );
        }
        return Ok(());
    }
    if r.nodes.is_empty() {
        println!(
            "no nodes yet: no agent has sent anything to {}",
            collector.url
        );
    }
    for n in &r.nodes {
        println!(
            "{}  {}  last seen {}  source {}  {} GPU(s)  {} XID(s), {} error/fatal",
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
            n.gpus.len(),
            n.xid_count,
            n.critical_xid_count
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

fn window_line(w: Option<&ResolvedWindow>) -> String {
    let Some(w) = w else {
        return String::new();
    };
    let t = |x: &Option<prost_types::Timestamp>| x.as_ref().map(rfc3339).unwrap_or_default();
    let mut s = format!("window {} .. {}", t(&w.start), t(&w.end));
    if w.partial {
        s.push_str(&format!(
            " (partial: data from {})",
            w.oldest_data
                .as_ref()
                .map(rfc3339)
                .unwrap_or_else(|| "nothing stored".into())
        ));
    }
    s
}

async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let filter = filter(&a.filter)?;
    let mut client = a.collector.connect().await?;
    let mut token = a.page_token.clone().unwrap_or_default();
    let mut all = Vec::new();
    let mut first = None;
    let mut last_token;
    loop {
        let r = client
            .list_events(ListEventsRequest {
                window: Some(TimeWindow {
                    since: a.since.clone(),
                    until: a.until.clone(),
                }),
                filter: Some(filter.clone()),
                limit: a.limit,
                page_token: token.clone(),
                order: if a.oldest_first {
                    Order::OldestFirst
                } else {
                    Order::NewestFirst
                } as i32,
            })
            .await?
            .into_inner();
        last_token = r.next_page_token.clone();
        all.extend(r.events.iter().cloned());
        let done = r.next_page_token.is_empty() || !a.all || all.len() as u64 >= a.max_events;
        if first.is_none() {
            first = Some(r);
        } else if let Some(f) = &mut first {
            f.hints.extend(r.hints);
            f.expired_while_paging = r.expired_while_paging;
        }
        if done {
            break;
        }
        token = last_token.clone();
    }
    let Some(head) = first else { return Ok(()) };
    let mut out = io::stdout().lock();
    if a.json {
        let evs: Vec<serde_json::Value> = all.iter().map(json::event).collect();
        let mut hints = head.hints.clone();
        hints.dedup();
        writeln!(
            out,
            "{}",
            json!({
                "window": head.window.as_ref().map(json::window),
                "total_matched": head.total_matched,
                "returned": evs.len(),
                "events": evs,
                "next_page_token": if last_token.is_empty() { None } else { Some(last_token) },
                "expired_while_paging": head.expired_while_paging,
                "hints": hints,
            })
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} matching, showing {}",
        window_line(head.window.as_ref()),
        head.total_matched,
        all.len()
    )?;
    for ev in &all {
        writeln!(out, "{}", json::line(ev))?;
    }
    if !last_token.is_empty() {
        writeln!(out, "more: --page-token {last_token}  (or --all)")?;
    }
    for h in head.hints {
        eprintln!("gpulse: note: {h}");
    }
    Ok(())
}

/// Eight-level bar for one value between lo and hi.
fn spark(v: f64, lo: f64, hi: f64) -> char {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if !v.is_finite() || hi <= lo {
        return BARS[0];
    }
    let i = ((v - lo) / (hi - lo) * 7.0).round().clamp(0.0, 7.0) as usize;
    BARS[i]
}

async fn trend(a: TrendArgs) -> anyhow::Result<()> {
    if a.list_metrics {
        for m in metric::METRICS {
            println!("{:<18} {:<10} {}", m.name, m.unit, m.help);
        }
        return Ok(());
    }
    let metric = a.metric.clone().unwrap_or_default();
    let agg = match a.agg.as_str() {
        "min" => Aggregation::Min,
        "max" => Aggregation::Max,
        "p95" => Aggregation::P95,
        "last" => Aggregation::Last,
        _ => Aggregation::Avg,
    };
    let group = match a.group_by.as_str() {
        "node" => GroupBy::Node,
        "fleet" => GroupBy::Fleet,
        _ => GroupBy::Gpu,
    };
    let mut client = a.collector.connect().await?;
    let r = client
        .trend(TrendRequest {
            metric,
            window: Some(TimeWindow {
                since: a.since.clone(),
                until: a.until.clone(),
            }),
            step_seconds: a.step,
            max_points: a.max_points,
            aggregation: agg as i32,
            group_by: group as i32,
            nodes: a.nodes.clone(),
            gpus: a.gpus.clone(),
            max_series: a.max_series,
            tier: match a.tier.as_str() {
                "raw" => Tier::Raw,
                "1m" => Tier::Tier1m,
                "1h" => Tier::Tier1h,
                _ => Tier::Unspecified,
            } as i32,
        })
        .await?
        .into_inner();
    let mut out = io::stdout().lock();
    if a.json {
        writeln!(out, "{}", json::trend(&r))?;
        return Ok(());
    }
    let j = json::trend(&r);
    writeln!(
        out,
        "{} ({}), {} per {}, step {}s from {}{}; {}",
        r.metric,
        r.unit,
        j["aggregation"].as_str().unwrap_or(""),
        j["group_by"].as_str().unwrap_or(""),
        r.step_seconds,
        j["source"].as_str().unwrap_or(""),
        if r.approximate { " (approximate)" } else { "" },
        window_line(r.window.as_ref())
    )?;
    if r.series.is_empty() {
        writeln!(out, "no data")?;
    }
    for s in &r.series {
        let name = if s.other {
            format!("other ({} series)", s.merged_series)
        } else if s.node.is_empty() {
            "fleet".to_string()
        } else if let Some(i) = s.gpu_index {
            format!("{}/{}", s.node, i)
        } else {
            s.node.clone()
        };
        let st = s.stats.unwrap_or_default();
        let line: String = s
            .points
            .iter()
            .map(|p| spark(p.value, st.min, st.max))
            .collect();
        writeln!(
            out,
            "{name:<24} min {:.1} avg {:.1} max {:.1} last {:.1}  {line}",
            st.min, st.avg, st.max, st.last
        )?;
    }
    for h in &r.hints {
        eprintln!("gpulse: note: {h}");
    }
    Ok(())
}

async fn status(collector: &CollectorArg, as_json: bool) -> anyhow::Result<()> {
    let mut client = collector.connect().await?;
    let s = client.status(StatusRequest {}).await?.into_inner();
    if as_json {
        println!(
            "{}",
            json!({
                "version": s.version, "events_stored": s.events_stored, "ring_bytes": s.ring_bytes, "ring_budget_bytes": s.ring_budget_bytes,
                "last_cursor": s.last_cursor, "oldest_cursor": s.oldest_cursor, "agents_connected": s.agents_connected,
                "subscribers": s.subscribers, "duplicates_dropped": s.duplicates_dropped, "events_expired": s.events_expired,
                "started": s.started.as_ref().map(gpulse_proto::time::rfc3339),
                "wal_bytes": s.wal_bytes, "gpus_tracked": s.gpus_tracked,
                "samples_out_of_order": s.samples_out_of_order, "samples_gpus_refused": s.samples_gpus_refused,
                "kinds": s.kinds.iter().map(|k| json!({
                    "kind": EventKind::name_of(k.kind), "bytes": k.bytes, "share_bytes": k.share_bytes,
                    "events": k.events, "expired": k.expired, "oldest": k.oldest.as_ref().map(rfc3339),
                })).collect::<Vec<_>>(),
                "tiers": s.tiers.iter().map(|t| json!({
                    "resolution_seconds": t.resolution_seconds, "bytes": t.bytes, "budget_bytes": t.budget_bytes,
                    "expired": t.expired, "oldest": t.oldest.as_ref().map(rfc3339),
                })).collect::<Vec<_>>(),
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
        for k in &s.kinds {
            println!(
                "    {:<13} {:>12} bytes (share {:>12}) {:>9} events, {} expired, oldest {}",
                EventKind::name_of(k.kind),
                k.bytes,
                k.share_bytes,
                k.events,
                k.expired,
                k.oldest.as_ref().map(rfc3339).unwrap_or_else(|| "-".into())
            );
        }
        println!(
            "  sample history: {} GPUs, WAL {} bytes",
            s.gpus_tracked, s.wal_bytes
        );
        for t in &s.tiers {
            println!(
                "    {:<4} {:>12} of {:>12} bytes, {} expired, oldest {}",
                if t.resolution_seconds == 0 {
                    "raw".to_string()
                } else if t.resolution_seconds == 60 {
                    "1m".to_string()
                } else {
                    "1h".to_string()
                },
                t.bytes,
                t.budget_bytes,
                t.expired,
                t.oldest.as_ref().map(rfc3339).unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(())
}
