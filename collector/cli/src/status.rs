//! `gpulse status`: what the collector holds.
use std::io::{self, Write};

use clap::Args;
use gpulse_proto::{
    names::ShortName,
    render,
    time::rfc3339,
    v1::{EventKind, StatusRequest, StatusResponse, Tier, UpstreamState},
};
use serde_json::json;

use crate::args::CollectorArg;

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    #[arg(long)]
    pub json: bool,
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(rfc3339)
}

pub fn render_json(s: &StatusResponse) -> String {
    json!({
        "version": s.version, "events_stored": s.events_stored, "ring_bytes": s.ring_bytes,
        "ring_budget_bytes": s.ring_budget_bytes, "last_cursor": s.last_cursor,
        "oldest_cursor": s.oldest_cursor, "agents_connected": s.agents_connected,
        "subscribers": s.subscribers, "duplicates_dropped": s.duplicates_dropped,
        "events_expired": s.events_expired, "started": time(&s.started),
        "wal_bytes": s.wal_bytes, "gpus_tracked": s.gpus_tracked,
        "samples_out_of_order": s.samples_out_of_order, "samples_gpus_refused": s.samples_gpus_refused,
        "kinds": s.kinds.iter().map(|k| json!({
            "kind": EventKind::name_of(k.kind), "bytes": k.bytes, "share_bytes": k.share_bytes,
            "events": k.events, "expired": k.expired, "oldest": time(&k.oldest),
        })).collect::<Vec<_>>(),
        "tiers": s.tiers.iter().map(|t| json!({
            "tier": Tier::name_of(t.tier), "resolution_seconds": t.resolution_seconds,
            "bytes": t.bytes, "budget_bytes": t.budget_bytes, "expired": t.expired,
            "oldest": time(&t.oldest),
        })).collect::<Vec<_>>(),
        "cluster": (!s.cluster.is_empty()).then_some(&s.cluster),
        "shard": (!s.shard.is_empty()).then_some(&s.shard),
        "upstreams": render::upstreams(&s.upstreams),
        "partial": s.partial,
    })
    .to_string()
}

pub fn render_text(s: &StatusResponse) -> String {
    let or_dash = |t: &Option<prost_types::Timestamp>| time(t).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "collector {} (started {})\n  events stored: {} (cursors {}..={}), {} expired\n  \
         ring: {} of {} bytes\n  agents connected: {}, subscribers: {}, duplicates dropped: {}\n",
        s.version,
        time(&s.started).unwrap_or_default(),
        s.events_stored,
        s.oldest_cursor,
        s.last_cursor,
        s.events_expired,
        s.ring_bytes,
        s.ring_budget_bytes,
        s.agents_connected,
        s.subscribers,
        s.duplicates_dropped
    );
    for k in &s.kinds {
        out.push_str(&format!(
            "    {:<13} {:>12} bytes (share {:>12}) {:>9} events, {} expired, oldest {}\n",
            EventKind::name_of(k.kind),
            k.bytes,
            k.share_bytes,
            k.events,
            k.expired,
            or_dash(&k.oldest)
        ));
    }
    out.push_str(&format!(
        "  sample history: {} GPUs, WAL {} bytes\n",
        s.gpus_tracked, s.wal_bytes
    ));
    for t in &s.tiers {
        out.push_str(&format!(
            "    {:<4} {:>12} of {:>12} bytes, {} expired, oldest {}\n",
            Tier::name_of(t.tier),
            t.bytes,
            t.budget_bytes,
            t.expired,
            or_dash(&t.oldest)
        ));
    }
    // Through a gateway: the figures above are sums over these.
    for u in &s.upstreams {
        out.push_str(&format!(
            "  upstream {} {} {} ms{}\n",
            u.name,
            UpstreamState::name_of(u.state),
            u.elapsed_ms,
            if u.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", u.reason)
            }
        ));
    }
    out
}

pub async fn run(a: StatusArgs) -> anyhow::Result<()> {
    let mut client = a.collector.connect().await?;
    let s = client.status(StatusRequest {}).await?.into_inner();
    let mut out = io::stdout().lock();
    if a.json {
        writeln!(out, "{}", render_json(&s))?;
    } else {
        write!(out, "{}", render_text(&s))?;
    }
    Ok(())
}
