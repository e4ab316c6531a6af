//! `gpu_health`: each GPU's verdict with its reasons, the evidence and what to do.
use gpulse_proto::{
    names::ShortName,
    v1::{self, GpuHealthRequest, HealthState},
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, opt, stamp, ts};
use crate::{
    GpulseMcp,
    types::{
        Clusters, EvidenceRow, GpuHealth, GpuHealthArgs, GpuHealthRow, HealthReasonRow, Sources,
    },
};

/// NVIDIA's action buckets (and gpulse's own for non-XID rules) in words.
pub fn what_to_do(action: &str) -> &'static str {
    gpulse_xid::action::what_to_do(action)
}

fn row(g: &v1::GpuHealthRecord) -> GpuHealthRow {
    GpuHealthRow {
        node: g.node.clone(),
        cluster: opt(&g.cluster),
        gpu_pci: g.pci.clone(),
        gpu_uuid: opt(&g.gpu_uuid),
        gpu_index: g.index,
        model: opt(&g.model),
        state: HealthState::name_of(g.state).to_string(),
        since: ts(&g.since),
        action: g.reasons.first().map(|r| r.action.clone()),
        reasons: g
            .reasons
            .iter()
            .map(|r| HealthReasonRow {
                rule: r.rule.clone(),
                state: HealthState::name_of(r.state).to_string(),
                action: r.action.clone(),
                what_to_do: what_to_do(&r.action).to_string(),
                summary: r.summary.clone(),
                xid: r.xid,
                since: ts(&r.since),
                last: ts(&r.last),
                occurrences: r.occurrences,
                escalated: r.escalated,
                clears_on: r.clears_on.clone(),
                clearing: r.clearing,
                shadow: r.shadow,
                pod: opt(&r.pod),
                evidence: r
                    .evidence
                    .iter()
                    .map(|e| EvidenceRow {
                        cursor: (e.cursor != 0).then_some(e.cursor),
                        time: ts(&e.time),
                        kind: e.kind.clone(),
                        detail: e.detail.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[tool_router(router = gpu_health_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// Which GPUs to take out of service and why: each GPU's health verdict (healthy, degraded,
    /// unhealthy, unknown), unhealthy first, with every reason, the evidence behind it (event
    /// cursors and NVML readings), NVIDIA's recommended action and what clears it. Verdicts
    /// come from XIDs (catalog actions), NVML readings (row remapping, retired pages, ECC,
    /// NVLink, thermal/power violations, fabric), vanished GPUs, process exits and reboots; an
    /// XID that returns after repeated reboots escalates to hardware inspection.
    #[tool(name = "gpu_health", title = "GPU health verdicts")]
    async fn gpu_health(
        &self,
        Parameters(a): Parameters<GpuHealthArgs>,
    ) -> Result<Json<GpuHealth>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let limit = limit(a.limit, 50, 200)?;
        if !a.node.is_empty() {
            src.node(&a.node).await?;
        }
        let r = src
            .gpu_health(GpuHealthRequest {
                node: a.node.clone(),
                include_healthy: a.include_healthy,
                limit,
            })
            .await?;
        let mut hints = r.hints.clone();
        if r.unhealthy + r.degraded > 0 {
            hints.push(
                "each reason's evidence cursor can be looked up with list_events; act on the first reason's action".to_string(),
            );
        } else if r.healthy + r.unknown > 0 {
            hints.push("no GPU is degraded or unhealthy".to_string());
        }
        if r.unknown > 0 {
            hints.push(format!(
                "{} GPU(s) unknown: no recent NVML sample (agent down or NVML off)",
                r.unknown
            ));
        }
        let mut out = GpuHealth {
            unhealthy: r.unhealthy,
            degraded: r.degraded,
            unknown: r.unknown,
            healthy: r.healthy,
            gpus: r.gpus.iter().map(row).collect(),
            truncated: r.truncated,
            hints,
            sources: Default::default(),
        };
        if fit(&mut out, |o| o.gpus.len(), |o, n| o.gpus.truncate(n)).is_some() {
            out.truncated = true;
        }
        stamp(
            Sources::of(&r.upstreams, r.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{
        GpuHealthRecord, GpuHealthResponse, HealthEvidence, HealthReason, NodeInfo, NodesResponse,
    };
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at};

    #[test]
    fn every_action_is_explained() {
        for info in gpulse_xid::catalog::all() {
            if let Some(v) = crate::tools::gpu_health::tests::verdict_action(info.code) {
                assert!(
                    !what_to_do(v).starts_with("see NVIDIA"),
                    "XID {} action {v}",
                    info.code
                );
            }
        }
    }

    /// The actions the collector's rules give (mirrored here: the MCP crate does not depend on
    /// the collector).
    fn verdict_action(code: u32) -> Option<&'static str> {
        let a = gpulse_xid::catalog::lookup(code)?.immediate_action;
        match a {
            "RESTART_APP"
            | "RESET_GPU"
            | "RESTART_BM"
            | "RESTART_VM"
            | "CONTACT_SUPPORT"
            | "WORKFLOW_NVLINK_ERR"
            | "WORKFLOW_NVLINK5_ERR"
            | "CHECK_MECHANICALS"
            | "CHECK_UVM"
            | "UPDATE_SWFW" => Some(a),
            _ => None,
        }
    }

    #[tokio::test]
    async fn verdicts_with_evidence_and_what_to_do() {
        let s = Session::new(Answers {
            nodes: NodesResponse {
                nodes: vec![NodeInfo {
                    node: "gpu-1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            health: GpuHealthResponse {
                gpus: vec![GpuHealthRecord {
                    node: "gpu-1".into(),
                    pci: "0000:3b:00.0".into(),
                    gpu_uuid: "GPU-0".into(),
                    index: Some(0),
                    state: HealthState::Unhealthy as i32,
                    since: at(10),
                    reasons: vec![HealthReason {
                        rule: "xid".into(),
                        state: HealthState::Unhealthy as i32,
                        action: "RESTART_BM".into(),
                        summary: "XID 79".into(),
                        xid: Some(79),
                        clears_on: "reboot".into(),
                        evidence: vec![HealthEvidence {
                            cursor: 17,
                            time: at(10),
                            kind: "xid".into(),
                            detail: "XID 79 ...".into(),
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                unhealthy: 1,
                healthy: 7,
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s
            .ok("gpu_health", json!({"node": "gpu-1", "limit": 10}))
            .await;
        assert!(
            s.fake.asked("GpuHealth")[0].contains("node: \"gpu-1\""),
            "{:?}",
            s.fake.asked("GpuHealth")
        );
        assert_eq!(
            (v["unhealthy"].clone(), v["healthy"].clone()),
            (json!(1), json!(7))
        );
        let g = &v["gpus"][0];
        assert_eq!(g["state"], "unhealthy");
        assert_eq!(g["action"], "RESTART_BM");
        assert_eq!(
            g["reasons"][0]["what_to_do"],
            "drain the node and reboot it"
        );
        assert_eq!(g["reasons"][0]["evidence"][0]["cursor"], 17);
        assert!(v["hints"].to_string().contains("list_events"));
        // An unknown node is an error naming the nearest known.
        let e = s.refused("gpu_health", json!({"node": "gpu-9"})).await;
        assert!(e.contains("unknown node") && e.contains("gpu-1"), "{e}");
        let e = s.refused("gpu_health", json!({"limit": 0})).await;
        assert!(e.contains("limit"), "{e}");
    }
}
