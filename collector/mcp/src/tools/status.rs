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
    types::{CollectorStatus, DroppedEvents, KindUse, RingUse, Sources, TierUse},
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
        let mut sources = Sources::of(&s.upstreams, s.partial);
        sources.add(Sources::of(&nodes.upstreams, nodes.partial));
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
            hints: {
                sources.note(&mut hints);
                hints
            },
            sources,
        }))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{KindStatus, NodeInfo, NodesResponse, StatusResponse, TierStatus};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at};

    #[tokio::test]
    async fn names_kinds_and_tiers_and_says_when_no_agent_is_connected() {
        let s = Session::new(Answers {
            status: StatusResponse {
                version: "9.9.9".into(),
                kinds: vec![
                    KindStatus {
                        kind: EventKind::Gap as i32,
                        oldest: at(50),
                        ..Default::default()
                    },
                    KindStatus {
                        kind: EventKind::Xid as i32,
                        oldest: at(10),
                        ..Default::default()
                    },
                ],
                tiers: vec![TierStatus {
                    tier: Tier::Tier1m as i32,
                    resolution_seconds: 60,
                    ..Default::default()
                }],
                ..Default::default()
            },
            nodes: NodesResponse {
                nodes: vec![NodeInfo::default(), NodeInfo::default()],
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s.ok("collector_status", json!({})).await;
        assert_eq!(v["version"], "9.9.9");
        assert_eq!(v["nodes_known"], 2);
        assert_eq!(v["kinds"][0]["kind"], "gap");
        assert_eq!(v["history_tiers"][0]["tier"], "1m");
        assert_eq!(
            v["ring"]["oldest"],
            gpulse_proto::time::rfc3339(&at(10).unwrap()),
            "the oldest of any kind"
        );
        assert!(v["hints"][0].as_str().unwrap().contains("no agent"));
    }

    #[tokio::test]
    async fn an_unavailable_collector_is_an_error_to_retry() {
        let s = Session::new(Answers {
            fail: Some(tonic::Status::unavailable("connection refused")),
            ..Default::default()
        })
        .await;
        let text = s.refused("collector_status", json!({})).await;
        assert!(
            text.contains("connection refused") && text.contains("retry"),
            "{text}"
        );
    }
}
