//! `xid_summary` (XIDs of a window grouped, from the collector's XidGroups) and `describe_xid`
//! (NVIDIA's catalog).
use gpulse_proto::{
    names::ShortName,
    v1::{self, XidGrouping, XidGroupsRequest},
};
use gpulse_xid::catalog;
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, one, recommended, ts, tw, window_of, wire, xid_name};
use crate::{
    GpulseMcp,
    types::{DescribeXidArgs, XidGroupRow, XidInfo, XidSummary, XidSummaryArgs},
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
        let top = limit(a.top, 20, 100)?;
        let (w, defaulted) = tw(&a.since, &a.until, "24h");
        let by: XidGrouping = wire(a.group_by);
        let r = self
            .source
            .xid_groups(XidGroupsRequest {
                window: Some(w),
                nodes: one(&a.node),
                group_by: by as i32,
                top,
            })
            .await?;
        let mut hints = r.hints.clone();
        if r.total_matched == 0 {
            self.source.known_nodes(&one(&a.node)).await?;
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
        };
        if fit(&mut out, |o| o.groups.len(), |o, n| o.groups.truncate(n)).is_some() {
            out.truncated = true;
        }
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
        return Err(format!(
            "XID {code} is not in the catalog (codes 1-173 are known); newer drivers may define it: check NVIDIA's Xid catalog"
        ));
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
