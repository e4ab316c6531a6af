//! `list_nodes`: nodes and their GPUs with health over a window.
use gpulse_proto::v1;
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, next_offset, offset_cursor, ts, tw, window_of};
use crate::{
    GpulseMcp,
    types::{ListNodes, ListNodesArgs, NodeRow},
};

/// `critical` with error or fatal XIDs in the window, `warning` with any XID or no connected
/// agent, else `ok`.
pub(crate) fn node_health(n: &v1::NodeInfo) -> &'static str {
    if n.critical_xid_count > 0 {
        "critical"
    } else if n.xid_count > 0 || n.connected_agents.is_empty() {
        "warning"
    } else {
        "ok"
    }
}

/// Case-insensitive: a substring, or a glob when the pattern has `*`.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    if !p.contains('*') {
        return n.contains(&p);
    }
    let parts: Vec<&str> = p.split('*').collect();
    let mut rest = n.as_str();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        match rest.find(part) {
            Some(0) => rest = &rest[part.len()..],
            Some(k) if i > 0 => rest = &rest[k + part.len()..],
            _ => return false,
        }
    }
    parts.last().is_none_or(|l| l.is_empty() || n.ends_with(l))
}

fn node_row(n: &v1::NodeInfo) -> NodeRow {
    let mut models: Vec<String> = n
        .gpus
        .iter()
        .map(|g| g.name.clone())
        .filter(|m| !m.is_empty())
        .collect();
    models.sort();
    models.dedup();
    let utils: Vec<f64> = n
        .gpus
        .iter()
        .filter_map(|g| g.gpu_util_pct.map(f64::from))
        .collect();
    NodeRow {
        node: n.node.clone(),
        last_seen: ts(&n.last_seen),
        connected: !n.connected_agents.is_empty(),
        gpu_count: n.gpus.len() as u32,
        gpu_models: models,
        xid_count: n.xid_count,
        critical_xid_count: n.critical_xid_count,
        util_avg_pct: (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64),
        health: node_health(n).to_string(),
        xid_source: n.xid_source.clone(),
    }
}

#[tool_router(router = list_nodes_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// Nodes and their GPUs, with health over a window: XID counts, connection, GPU models,
    /// average utilisation. `only_unhealthy` narrows to nodes that need attention.
    #[tool(name = "list_nodes", title = "List nodes")]
    async fn list_nodes(
        &self,
        Parameters(a): Parameters<ListNodesArgs>,
    ) -> Result<Json<ListNodes>, String> {
        let limit = limit(a.limit, 50, 500)? as usize;
        let offset = offset_cursor(&a.cursor)?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let r = self.source.nodes(Some(w)).await?;
        let rows: Vec<NodeRow> = r
            .nodes
            .iter()
            .filter(|n| a.node_match.is_empty() || glob_match(&a.node_match, &n.node))
            .filter(|n| !a.only_unhealthy || node_health(n) != "ok")
            .map(node_row)
            .collect();
        let total = rows.len();
        let mut hints = Vec::new();
        if total == 0 {
            hints.push(if r.nodes.is_empty() {
                "no node reported in this window; widen `since` or check collector_status"
                    .to_string()
            } else {
                format!(
                    "{} node(s) reported but none matched the filters",
                    r.nodes.len()
                )
            });
        }
        let page: Vec<NodeRow> = rows.into_iter().skip(offset).take(limit).collect();
        let next = next_offset(offset, page.len(), total);
        let mut out = ListNodes {
            window: window_of(&r.window, defaulted),
            truncated: next.is_some(),
            nodes: page,
            total_matched: total as u32,
            next_cursor: next,
            hints,
        };
        if fit(&mut out, |o| o.nodes.len(), |o, n| o.nodes.truncate(n)).is_some() {
            out.truncated = true;
            out.next_cursor = Some(format!("o1.{}", offset + out.nodes.len()));
        }
        Ok(Json(out))
    }
}
