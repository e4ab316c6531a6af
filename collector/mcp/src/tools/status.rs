//! `collector_status`: what the collector holds and how fresh it is.
use gpulse_proto::{
    names::ShortName,
    time as ptime,
    v1::{EventKind, Tier},
};
use rmcp::{Json, tool, tool_router};

use super::ts;
use crate::{
    GpulseMcp,
    types::{CollectorStatus, DroppedEvents, KindUse, RingUse, TierUse},
};

#[tool_router(router = status_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// What the collector holds and how fresh it is: agents connected, nodes, store use per event
    /// kind, sample history tiers with their oldest data, drops. Call first to know how far back
    /// questions can reach.
    #[tool(name = "collector_status", title = "Collector status")]
    async fn collector_status(&self) -> Result<Json<CollectorStatus>, String> {
        let s = self.source.status().await?;
        let nodes = self.source.nodes(None).await?;
        let mut hints = Vec::new();
        if s.agents_connected == 0 {
            hints.push("no agent is connected: data is not being refreshed".to_string());
        }
        let oldest = s
            .kinds
            .iter()
            .filter_map(|k| k.oldest)
            .min_by_key(|t| (t.seconds, t.nanos));
        Ok(Json(CollectorStatus {
            server_time: ptime::rfc3339(&ptime::now()),
            version: s.version.clone(),
            started: ts(&s.started),
            agents_connected: s.agents_connected,
            nodes_known: nodes.nodes.len() as u32,
            gpus_tracked: s.gpus_tracked,
            ring: RingUse {
                capacity_bytes: s.ring_budget_bytes,
                used_bytes: s.ring_bytes,
                events: s.events_stored,
                oldest: ts(&oldest),
                newest_cursor: s.last_cursor,
            },
            kinds: s
                .kinds
                .iter()
                .map(|k| KindUse {
                    kind: EventKind::name_of(k.kind).to_string(),
                    bytes: k.bytes,
                    share_bytes: k.share_bytes,
                    events: k.events,
                    expired: k.expired,
                    oldest: ts(&k.oldest),
                })
                .collect(),
            history_tiers: s
                .tiers
                .iter()
                .map(|t| TierUse {
                    tier: Tier::name_of(t.tier).to_string(),
                    resolution_s: t.resolution_seconds,
                    bytes: t.bytes,
                    budget_bytes: t.budget_bytes,
                    expired: t.expired,
                    oldest: ts(&t.oldest),
                })
                .collect(),
            dropped_events: DroppedEvents {
                expired: s.events_expired,
                duplicates: s.duplicates_dropped,
                samples_out_of_order: s.samples_out_of_order,
                samples_gpus_refused: s.samples_gpus_refused,
            },
            hints,
        }))
    }
}
