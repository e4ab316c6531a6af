//! `gpulse health`: each GPU's health verdict, unhealthy first, with the reasons, NVIDIA's
//! recommended action and the evidence.
use std::io::{self, Write};

use clap::Args;
use gpulse_proto::{
    names::ShortName,
    render,
    time::rfc3339,
    v1::{GpuHealthRecord, GpuHealthRequest, GpuHealthResponse, HealthState},
};
use serde_json::json;

use crate::args::CollectorArg;

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    /// Only this node's GPUs.
    #[arg(long)]
    pub node: Option<String>,
    /// Also list healthy GPUs (they are always counted).
    #[arg(long)]
    pub all: bool,
    /// At most this many GPUs, unhealthy first.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// One JSON object per GPU, then one with the counts (and `upstreams`, `partial`).
    #[arg(long)]
    pub json: bool,
}

/// The last JSON line: counts, and where the answer came from.
pub fn answer_json(r: &GpuHealthResponse) -> String {
    json!({
        "healthy": r.healthy, "degraded": r.degraded, "unhealthy": r.unhealthy, "unknown": r.unknown,
        "truncated": r.truncated, "hints": r.hints,
        "upstreams": render::upstreams(&r.upstreams), "partial": r.partial,
    })
    .to_string()
}

fn gpu_name(g: &GpuHealthRecord) -> String {
    let index = g.index.map(|i| format!("GPU {i} ")).unwrap_or_default();
    let uuid = if g.gpu_uuid.is_empty() {
        String::new()
    } else {
        format!(" {}", g.gpu_uuid)
    };
    let cluster = if g.cluster.is_empty() {
        String::new()
    } else {
        format!("{}/", g.cluster)
    };
    format!("{cluster}{} {index}{}{uuid}", g.node, g.pci)
}

pub fn render_text(r: &GpuHealthResponse) -> String {
    let mut out = format!(
        "{} unhealthy, {} degraded, {} unknown, {} healthy\n",
        r.unhealthy, r.degraded, r.unknown, r.healthy
    );
    for g in &r.gpus {
        let since = g.since.as_ref().map(rfc3339).unwrap_or_default();
        out.push_str(&format!(
            "{:<9} {}  since {since}\n",
            HealthState::name_of(g.state),
            gpu_name(g)
        ));
        for x in &g.reasons {
            let mut notes = Vec::new();
            if x.shadow {
                notes.push("shadow: on trial, changes nothing".to_string());
            }
            if x.escalated {
                notes.push("escalated".to_string());
            }
            if x.occurrences > 1 {
                notes.push(format!("x{}", x.occurrences));
            }
            if !x.pod.is_empty() {
                notes.push(format!("pod {}", x.pod));
            }
            if x.clearing {
                notes.push(format!("clearing, {} clean sample(s)", x.clean_samples));
            } else {
                notes.push(format!("clears on {}", x.clears_on.replace('_', " ")));
            }
            out.push_str(&format!(
                "    {:<16} {}  [{}]\n",
                x.action,
                x.summary,
                notes.join(", ")
            ));
            if let Some(e) = x.evidence.last() {
                let at = e.time.as_ref().map(rfc3339).unwrap_or_default();
                let cursor = if e.cursor == 0 {
                    String::new()
                } else {
                    format!(" (cursor {})", e.cursor)
                };
                out.push_str(&format!("        evidence {at}{cursor}: {}\n", e.detail));
            }
        }
    }
    if r.truncated {
        out.push_str("(more GPUs matched; raise --limit or narrow with --node)\n");
    }
    for h in &r.hints {
        out.push_str(&format!("note: {h}\n"));
    }
    out
}

pub async fn run(a: HealthArgs) -> anyhow::Result<()> {
    let mut client = a.collector.connect().await?;
    let r = client
        .gpu_health(GpuHealthRequest {
            node: a.node.unwrap_or_default(),
            include_healthy: a.all,
            limit: a.limit,
        })
        .await?
        .into_inner();
    let mut out = io::stdout().lock();
    if a.json {
        for g in &r.gpus {
            writeln!(out, "{}", render::gpu_health(g))?;
        }
        writeln!(out, "{}", answer_json(&r))?;
        return Ok(());
    }
    write!(out, "{}", render_text(&r))?;
    if r.partial {
        eprintln!("gpulse: {}", render::partial_note(&r.upstreams));
    }
    Ok(())
}
