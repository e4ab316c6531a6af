//! `list_nodes`: nodes and their GPUs with health over a window.
use gpulse_proto::v1;
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, limit, next_offset, offset_cursor, opt, stamp, ts, tw, window_of};
use crate::{
    GpulseMcp,
    types::Clusters,
    types::{ListNodes, ListNodesArgs, NodeRow, Sources},
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
        cluster: opt(&n.cluster),
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
        let src = self.source.scoped(&a.clusters()).await?;
        let limit = limit(a.limit, 50, 500)? as usize;
        let offset = offset_cursor(&a.cursor)?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let r = src.nodes(Some(w)).await?;
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
        // The collector cut its answer to fit (what was left out is said there).
        hints.extend(r.hints.iter().cloned());
        let page: Vec<NodeRow> = rows.into_iter().skip(offset).take(limit).collect();
        let next = next_offset(offset, page.len(), total);
        let mut out = ListNodes {
            window: window_of(&r.window, defaulted),
            truncated: next.is_some(),
            nodes: page,
            total_matched: total as u32,
            next_cursor: next,
            hints,
            sources: Default::default(),
        };
        if fit(&mut out, |o| o.nodes.len(), |o, n| o.nodes.truncate(n)).is_some() {
            out.truncated = true;
            out.next_cursor = Some(format!("o1.{}", offset + out.nodes.len()));
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
    use gpulse_proto::v1::{GpuSample, NodeInfo, NodesResponse};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, window};

    fn node(name: &str, xids: u64, critical: u64, connected: bool) -> NodeInfo {
        NodeInfo {
            node: name.into(),
            xid_count: xids,
            critical_xid_count: critical,
            connected_agents: if connected {
                vec![format!("{name}/a")]
            } else {
                vec![]
            },
            gpus: vec![
                GpuSample {
                    name: "H100".into(),
                    gpu_util_pct: Some(40),
                    ..Default::default()
                },
                GpuSample {
                    name: "H100".into(),
                    gpu_util_pct: Some(60),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn fleet() -> Answers {
        Answers {
            nodes: NodesResponse {
                nodes: vec![
                    node("gpu-a-1", 0, 0, true),
                    node("gpu-a-2", 2, 1, true),
                    node("gpu-b-1", 1, 0, true),
                    node("cpu-1", 0, 0, false),
                ],
                window: window(),
                partial: Default::default(),
                upstreams: Default::default(),
                truncated: false,
                hints: Vec::new(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn health_and_globs() {
        assert_eq!(node_health(&node("n", 2, 1, true)), "critical");
        assert_eq!(node_health(&node("n", 1, 0, true)), "warning");
        assert_eq!(node_health(&node("n", 0, 0, false)), "warning");
        assert_eq!(node_health(&node("n", 0, 0, true)), "ok");
        assert!(glob_match("gpu-*-1", "GPU-a-1"));
        assert!(!glob_match("gpu-*-1", "gpu-a-2"));
        assert!(glob_match("a-2", "gpu-a-2"), "no star: substring");
        assert!(glob_match("*-1", "cpu-1"));
    }

    #[tokio::test]
    async fn filters_pages_and_summarises_gpus() {
        let s = Session::new(fleet()).await;
        let v = s
            .ok(
                "list_nodes",
                json!({"only_unhealthy": true, "node_match": "gpu-*"}),
            )
            .await;
        let names: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["gpu-a-2", "gpu-b-1"]);
        assert_eq!(v["nodes"][0]["util_avg_pct"], 50.0);
        assert_eq!(v["nodes"][0]["gpu_models"], json!(["H100"]));
        assert!(
            s.fake.asked("Nodes")[0].contains("since: \"1h\""),
            "default window"
        );

        let p1 = s.ok("list_nodes", json!({"limit": 3})).await;
        assert_eq!(p1["nodes"].as_array().unwrap().len(), 3);
        assert_eq!(p1["next_cursor"], "o1.3");
        let p2 = s
            .ok("list_nodes", json!({"limit": 3, "cursor": "o1.3"}))
            .await;
        assert_eq!(p2["nodes"][0]["node"], "cpu-1");
        assert!(p2["next_cursor"].is_null());
    }

    #[tokio::test]
    async fn bad_cursor_and_limit_and_no_match() {
        let s = Session::new(fleet()).await;
        assert!(
            s.refused("list_nodes", json!({"cursor": "x"}))
                .await
                .contains("cursor")
        );
        assert!(
            s.refused("list_nodes", json!({"limit": 0}))
                .await
                .contains("1-500")
        );
        let v = s.ok("list_nodes", json!({"node_match": "tpu"})).await;
        assert!(
            v["hints"][0]
                .as_str()
                .unwrap()
                .contains("4 node(s) reported")
        );
    }
}
