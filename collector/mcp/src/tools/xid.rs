//! `xid_summary` (XIDs of a window grouped, from the collector's XidGroups) and `describe_xid`
//! (NVIDIA's catalog).
use gpulse_proto::{
    names::ShortName,
    v1::{self, XidGrouping, XidGroupsRequest},
};
use gpulse_xid::catalog;
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, one, recommended, stamp, ts, tw, window_of, wire, xid_name};
use crate::{
    GpulseMcp,
    types::Clusters,
    types::{DescribeXidArgs, Sources, XidGroupRow, XidInfo, XidSummary, XidSummaryArgs},
};

/// A group as a row. A code group is named by its code; a GPU or node group by its codes
/// with counts, and advised on by its most frequent code.
fn group_row(g: &v1::XidGroup, by_code: bool) -> XidGroupRow {
    let main = g.codes.iter().max_by_key(|c| c.count).map_or(0, |c| c.code);
    XidGroupRow {
        name: if by_code {
            xid_name(main)
        } else {
            g.codes
                .iter()
                .map(|c| format!("{}x{}", c.code, c.count))
                .collect::<Vec<_>>()
                .join(", ")
        },
        key: g.key.clone(),
        xid: by_code.then_some(main),
        severity: v1::Severity::name_of(g.severity).to_string(),
        count: g.count,
        first_seen: ts(&g.first_seen).unwrap_or_default(),
        last_seen: ts(&g.last_seen).unwrap_or_default(),
        gpus: g.gpus.clone(),
        nodes: g.nodes.clone(),
        recommended_action: recommended(main),
    }
}

#[tool_router(router = xid_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// XIDs in a window grouped by code, GPU or node, with meaning, severity, first/last seen,
    /// the GPUs and nodes involved, and NVIDIA's recommended action.
    #[tool(name = "xid_summary", title = "XID summary")]
    async fn xid_summary(
        &self,
        Parameters(a): Parameters<XidSummaryArgs>,
    ) -> Result<Json<XidSummary>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let top = limit(a.top, 20, 100)?;
        let (w, defaulted) = tw(&a.since, &a.until, "24h");
        let by: XidGrouping = wire(a.group_by);
        let r = src
            .xid_groups(XidGroupsRequest {
                window: Some(w),
                nodes: one(&a.node),
                group_by: by as i32,
                top,
            })
            .await?;
        let mut hints = r.hints.clone();
        if r.total_matched == 0 {
            src.known_nodes(&one(&a.node)).await?;
            hints.push("no XID in this window".to_string());
        }
        if r.truncated {
            hints.push(format!(
                "{} XIDs matched; the first {} were grouped",
                r.total_matched, r.grouped
            ));
        }
        let by_code = by == XidGrouping::Code;
        let mut out = XidSummary {
            window: window_of(&r.window, defaulted),
            total: r.total_matched,
            groups: r.groups.iter().map(|g| group_row(g, by_code)).collect(),
            other_count: r.other_count,
            truncated: r.truncated,
            hints,
            sources: Default::default(),
        };
        if fit(&mut out, |o| o.groups.len(), |o, n| o.groups.truncate(n)).is_some() {
            out.truncated = true;
        }
        stamp(
            Sources::of(&r.upstreams, r.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }

    /// What an XID code means, how severe it is, its typical causes and what to do (NVIDIA's
    /// catalog; no collector data needed). Also served as the resource telemetry://xid-catalog.
    #[tool(name = "describe_xid", title = "Describe an XID")]
    async fn describe_xid(
        &self,
        Parameters(a): Parameters<DescribeXidArgs>,
    ) -> Result<Json<XidInfo>, String> {
        xid_info(a.xid).map(Json)
    }
}

/// The catalog entry of `code`, shaped for `describe_xid`.
pub fn xid_info(code: u32) -> Result<XidInfo, String> {
    let Some(i) = catalog::lookup(code) else {
        return Err(catalog::not_catalogued(code));
    };
    let mut causes: Vec<String> = i
        .description
        .split([';', '/'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    causes.truncate(5);
    Ok(XidInfo {
        xid: code,
        name: i.mnemonic.to_string(),
        description: i.description.to_string(),
        severity: i.severity.to_string(),
        typical_causes: causes,
        immediate_action: i.immediate_action.to_string(),
        investigatory_action: i.investigatory_action.to_string(),
        recommended_action: recommended(code),
        docs_hint: "https://docs.nvidia.com/deploy/xid-errors/ (NVIDIA Xid catalog)".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{NodeInfo, NodesResponse, XidCount};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    fn group(key: &str, codes: &[(u32, u64)]) -> v1::XidGroup {
        v1::XidGroup {
            key: key.into(),
            severity: v1::Severity::Fatal as i32,
            count: codes.iter().map(|c| c.1).sum(),
            first_seen: at(1),
            last_seen: at(2),
            gpus: vec!["gpu-1:GPU-0".into()],
            nodes: vec!["gpu-1".into()],
            codes: codes
                .iter()
                .map(|&(code, count)| XidCount { code, count })
                .collect(),
        }
    }

    #[tokio::test]
    async fn groups_by_gpu_name_their_codes_and_advise_on_the_commonest() {
        let s = Session::new(Answers {
            groups: v1::XidGroupsResponse {
                window: window(),
                total_matched: 5,
                grouped: 5,
                groups: vec![group("gpu-1:GPU-0", &[(79, 1), (119, 4)])],
                other_count: 0,
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s
            .ok(
                "xid_summary",
                json!({"group_by": "gpu", "node": "gpu-1", "top": 5}),
            )
            .await;
        let g = &v["groups"][0];
        assert_eq!(g["name"], "79x1, 119x4");
        assert!(g["xid"].is_null());
        assert_eq!(
            g["recommended_action"],
            "RESET_GPU; investigate: INVESTIGATE_SW"
        );
        assert_eq!(g["severity"], "fatal");
        assert_eq!(v["window"]["window_defaulted"], true, "24h default");
        let asked = &s.fake.asked("XidGroups")[0];
        assert!(
            asked.contains("group_by: Gpu") && asked.contains("top: 5"),
            "{asked}"
        );
        assert!(asked.contains("since: \"24h\""), "{asked}");
    }

    #[tokio::test]
    async fn code_groups_are_named_by_the_catalog() {
        let s = Session::new(Answers {
            groups: v1::XidGroupsResponse {
                total_matched: 1,
                groups: vec![group("48", &[(48, 1)])],
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s.ok("xid_summary", json!({})).await;
        assert_eq!(v["groups"][0]["xid"], 48);
        assert_eq!(v["groups"][0]["name"], "ROBUST_CHANNEL_GPU_ECC_DBE");
        assert!(s.fake.asked("XidGroups")[0].contains("group_by: Code"));
    }

    #[tokio::test]
    async fn unknown_node_and_out_of_range_top() {
        let s = Session::new(Answers {
            nodes: NodesResponse {
                nodes: vec![NodeInfo {
                    node: "gpu-1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        assert!(
            s.refused("xid_summary", json!({"node": "nope"}))
                .await
                .contains("unknown node")
        );
        assert!(
            s.refused("xid_summary", json!({"top": 101}))
                .await
                .contains("1-100")
        );
        let v = s.ok("xid_summary", json!({"node": "gpu-1"})).await;
        assert!(v["hints"].to_string().contains("no XID"));
    }

    #[tokio::test]
    async fn describe_xid_reads_the_catalog() {
        let s = Session::new(Answers::default()).await;
        let v = s.ok("describe_xid", json!({"xid": 79})).await;
        assert_eq!(v["name"], "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
        assert_eq!(v["severity"], "fatal");
        assert!(
            s.refused("describe_xid", json!({"xid": 999}))
                .await
                .contains("not in the catalog")
        );
        assert!(s.fake.asked.lock().unwrap().is_empty(), "no collector call");
    }
}
