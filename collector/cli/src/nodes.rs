//! `gpulse nodes`: nodes the collector has heard from, with their GPUs' latest samples.
use std::io::{self, Write};

use clap::Args;
use gpulse_proto::{
    render,
    time::rfc3339,
    v1::{NodeInfo, NodesRequest, NodesResponse, TimeWindow},
};
use serde_json::json;

use crate::args::CollectorArg;

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    /// Only nodes heard from in this window (e.g. 1h, now-30m, RFC 3339), with XID counts.
    #[arg(long, value_parser = crate::args::since)]
    pub since: Option<String>,
    /// One JSON object per node; through a gateway, then one with `upstreams` and `partial`.
    #[arg(long)]
    pub json: bool,
}

pub fn node_json(n: &NodeInfo) -> String {
    json!({
        "node": n.node,
        "cluster": (!n.cluster.is_empty()).then_some(&n.cluster),
        "connected": !n.connected_agents.is_empty(),
        "connected_agents": n.connected_agents,
        "last_seen": n.last_seen.as_ref().map(rfc3339),
        "xid_source": n.xid_source,
        "agent_detail": n.agent_detail,
        "xid_count": n.xid_count,
        "critical_xid_count": n.critical_xid_count,
        "gpus": n.gpus.iter().map(render::gpu_sample).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Through a gateway, the last line: where the answer came from.
pub fn answer_json(r: &NodesResponse) -> String {
    json!({"upstreams": render::upstreams(&r.upstreams), "partial": r.partial}).to_string()
}

pub fn render_text(r: &NodesResponse, collector: &str) -> String {
    if r.nodes.is_empty() {
        return format!("no nodes yet: no agent has sent anything to {collector}\n");
    }
    let mut out = String::new();
    for n in &r.nodes {
        out.push_str(&format!(
            "{}  {}  last seen {}  source {}  {} GPU(s)  {} XID(s), {} error/fatal\n",
            n.node,
            if n.connected_agents.is_empty() {
                "disconnected"
            } else {
                "connected"
            },
            n.last_seen
                .as_ref()
                .map(rfc3339)
                .unwrap_or_else(|| "-".into()),
            if n.xid_source.is_empty() {
                "-"
            } else {
                &n.xid_source
            },
            n.gpus.len(),
            n.xid_count,
            n.critical_xid_count
        ));
        for g in &n.gpus {
            out.push_str(&format!("    {} {}\n", g.name, render::gpu_sample_line(g)));
        }
    }
    out
}

pub async fn run(a: NodesArgs) -> anyhow::Result<()> {
    let mut client = a.collector.connect().await?;
    let r = client
        .nodes(NodesRequest {
            window: a.since.map(|since| TimeWindow {
                since,
                until: String::new(),
            }),
        })
        .await?
        .into_inner();
    let mut out = io::stdout().lock();
    // An answer cut to its byte budget says what it left out (stderr: stdout stays the data).
    for h in &r.hints {
        eprintln!("gpulse: {h}");
    }
    if a.json {
        for n in &r.nodes {
            writeln!(out, "{}", node_json(n))?;
        }
        if !r.upstreams.is_empty() {
            writeln!(out, "{}", answer_json(&r))?;
        }
        return Ok(());
    }
    write!(out, "{}", render_text(&r, &a.collector.url))?;
    if r.partial {
        eprintln!("gpulse: {}", render::partial_note(&r.upstreams));
    }
    Ok(())
}
