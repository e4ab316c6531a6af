//! `describe_node`: one node now and recently, from Nodes, XidGroups (per GPU), Processes and
//! ListEvents; nothing is paged or counted here.
use std::collections::HashMap;

use gpulse_proto::v1::{
    self, EventFilter, ListEventsRequest, Order, ProcessState, ProcessesRequest, TimeWindow,
    XidGrouping, XidGroupsRequest,
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{fit, kinds, list_gpu_processes::process_row, opt, row, stamp, ts, tw, window_of};
use crate::{
    GpulseMcp,
    source::{Source, explain},
    types::Clusters,
    types::{AgentInfo, DescribeNode, DescribeNodeArgs, GpuLatest, NodeGpu, ProcessRow, Sources},
};

/// Running processes listed at most.
const PROCESSES: u32 = 50;

/// XIDs per GPU key (lowercase UUID or PCI address) from per-GPU groups keyed `<node>:<gpu>`.
fn xids_by_gpu(r: &v1::XidGroupsResponse, node: &str) -> HashMap<String, u64> {
    r.groups
        .iter()
        .filter_map(|g| {
            let gpu = g.key.strip_prefix(node)?.strip_prefix(':')?;
            Some((gpu.to_ascii_lowercase(), g.count))
        })
        .collect()
}

fn node_gpu(g: &v1::GpuSample, xids: &HashMap<String, u64>) -> NodeGpu {
    let count = [&g.uuid, &g.pci]
        .iter()
        .filter(|k| !k.is_empty())
        .map(|k| xids.get(&k.to_ascii_lowercase()).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    NodeGpu {
        index: g.index,
        uuid: g.uuid.clone(),
        pci: g.pci.clone(),
        model: g.name.clone(),
        latest: GpuLatest {
            util_pct: g.gpu_util_pct,
            mem_used_bytes: g.mem_used_bytes,
            mem_total_bytes: g.mem_total_bytes,
            temp_c: g.temperature_c,
            power_w: g.power_mw.map(|p| f64::from(p) / 1000.0),
            sampled: None,
        },
        health: if count > 0 { "warning" } else { "ok" }.to_string(),
        xid_count_window: count,
        field_errors: g
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.error))
            .collect(),
    }
}

/// The node's newest events of the window (the request asks for at least one; `max` may be 0).
fn recent_request(w: &TimeWindow, node: &str, max: u32) -> ListEventsRequest {
    ListEventsRequest {
        window: Some(w.clone()),
        filter: Some(EventFilter {
            nodes: vec![node.to_string()],
            kinds: kinds(&[]),
            ..Default::default()
        }),
        limit: max.max(1),
        order: Order::NewestFirst as i32,
        ..Default::default()
    }
}

/// `max_events`: 0-50, default 10.
fn max_events(v: Option<u32>) -> Result<u32, String> {
    match v {
        None => Ok(10),
        Some(n) if n <= 50 => Ok(n),
        Some(n) => Err(format!(
            "max_events {n} is out of range: use 0-50 (default 10)"
        )),
    }
}

impl GpulseMcp {
    /// The node's running GPU processes, with the GPU memory NVML last saw them hold.
    async fn running_processes(
        src: &Source,
        w: &TimeWindow,
        n: &v1::NodeInfo,
    ) -> Result<Vec<ProcessRow>, String> {
        let r = src
            .processes(ProcessesRequest {
                window: Some(w.clone()),
                nodes: vec![n.node.clone()],
                state: ProcessState::Running as i32,
                limit: PROCESSES,
                ..Default::default()
            })
            .await?;
        let mut mem_by_pid: HashMap<u32, u64> = HashMap::new();
        for p in n.gpus.iter().flat_map(|g| &g.processes) {
            if let Some(m) = p.used_memory_bytes {
                *mem_by_pid.entry(p.pid).or_default() += m;
            }
        }
        Ok(r.processes
            .iter()
            .map(|p| ProcessRow {
                gpu_mem_bytes: mem_by_pid.get(&p.pid).copied(),
                ..process_row(p)
            })
            .collect())
    }
}

fn hints(n: &v1::NodeInfo, mut hints: Vec<String>) -> Vec<String> {
    if n.connected_agents.is_empty() {
        hints.push(format!(
            "no agent of {} is connected; last heard from {}",
            n.node,
            ts(&n.last_seen).unwrap_or_else(|| "never".into())
        ));
    }
    if n.gpus.is_empty() {
        hints.push(
            "no GPU samples from this node (NVML unavailable or off on its agent)".to_string(),
        );
    }
    hints
}

fn agent(n: &v1::NodeInfo) -> AgentInfo {
    AgentInfo {
        connected_agents: n.connected_agents.clone(),
        xid_source: n.xid_source.clone(),
        detail: n.agent_detail.clone(),
        driver: n.gpus.first().and_then(|g| opt(&g.driver_version)),
        cuda: n.gpus.first().and_then(|g| opt(&g.cuda_driver_version)),
    }
}

#[tool_router(router = describe_node_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// One node now and recently: connection, agent and driver, each GPU's latest sample and
    /// health, GPU processes, recent events and the XID count in the window.
    #[tool(name = "describe_node", title = "Describe a node")]
    async fn describe_node(
        &self,
        Parameters(a): Parameters<DescribeNodeArgs>,
    ) -> Result<Json<DescribeNode>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let max_events = max_events(a.max_events)?;
        let n = src.node(&a.node).await?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let recent = src
            .list_events(recent_request(&w, &a.node, max_events))
            .await
            .map_err(explain)?;
        let xids = src
            .xid_groups(XidGroupsRequest {
                window: Some(w.clone()),
                nodes: vec![a.node.clone()],
                group_by: XidGrouping::Gpu as i32,
                top: 100,
            })
            .await?;
        let by_gpu = xids_by_gpu(&xids, &a.node);
        let processes = match a.include_processes.unwrap_or(true) {
            true => Self::running_processes(&src, &w, &n).await?,
            false => Vec::new(),
        };
        let recent_events = recent
            .events
            .iter()
            .take(max_events as usize)
            .map(row)
            .collect();
        let mut out = DescribeNode {
            node: n.node.clone(),
            cluster: opt(&n.cluster),
            window: window_of(&recent.window, defaulted),
            connected: !n.connected_agents.is_empty(),
            last_seen: ts(&n.last_seen),
            agent: agent(&n),
            gpus: n.gpus.iter().map(|g| node_gpu(g, &by_gpu)).collect(),
            processes,
            recent_events,
            xid_count_window: xids.total_matched,
            hints: hints(&n, recent.hints),
            sources: Default::default(),
        };
        if fit(
            &mut out,
            |o| o.recent_events.len(),
            |o, k| o.recent_events.truncate(k),
        )
        .is_some()
        {
            fit(
                &mut out,
                |o| o.processes.len(),
                |o, k| o.processes.truncate(k),
            );
        }
        let mut sources = Sources::of(&recent.upstreams, recent.partial);
        sources.add(Sources::of(&xids.upstreams, xids.partial));
        stamp(sources, &mut out.sources, &mut out.hints);
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{
        GpuProcessMemory, GpuSample, NodeInfo, NodesResponse, ProcessInfo, ProcessesResponse,
        XidGroup,
    };
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    fn answers() -> Answers {
        let gpu = |index: u32, uuid: &str, pci: &str, pid: Option<u32>| GpuSample {
            index,
            uuid: uuid.into(),
            pci: pci.into(),
            driver_version: "570.1".into(),
            processes: pid
                .map(|pid| GpuProcessMemory {
                    pid,
                    used_memory_bytes: Some(1 << 30),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        Answers {
            nodes: NodesResponse {
                nodes: vec![NodeInfo {
                    node: "gpu-1".into(),
                    last_seen: at(3000),
                    gpus: vec![
                        gpu(0, "GPU-0", "0000:3b:00.0", Some(42)),
                        gpu(1, "GPU-1", "0000:3c:00.0", None),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            },
            groups: v1::XidGroupsResponse {
                total_matched: 3,
                groups: vec![
                    XidGroup {
                        key: "gpu-1:gpu-0".into(),
                        count: 2,
                        ..Default::default()
                    },
                    XidGroup {
                        key: "gpu-1:0000:3C:00.0".into(),
                        count: 1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            processes: ProcessesResponse {
                processes: vec![ProcessInfo {
                    node: "gpu-1".into(),
                    pid: 42,
                    name: "python3".into(),
                    running: true,
                    ..Default::default()
                }],
                total_matched: 1,
                ..Default::default()
            },
            list: v1::ListEventsResponse {
                window: window(),
                events: (0..3)
                    .map(|i| v1::Event {
                        cursor: 10 - i,
                        node: "gpu-1".into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn per_gpu_xids_processes_and_recent_events() {
        let s = Session::new(answers()).await;
        let v = s
            .ok("describe_node", json!({"node": "gpu-1", "max_events": 2}))
            .await;
        assert_eq!(v["gpus"][0]["xid_count_window"], 2, "by UUID, any case");
        assert_eq!(v["gpus"][1]["xid_count_window"], 1, "by PCI address");
        assert_eq!(v["gpus"][0]["health"], "warning");
        assert_eq!(v["xid_count_window"], 3);
        assert_eq!(v["processes"][0]["gpu_mem_bytes"], 1u64 << 30);
        assert_eq!(v["recent_events"].as_array().unwrap().len(), 2);
        assert_eq!(v["recent_events"][0]["cursor"], 10, "newest first");
        assert_eq!(v["agent"]["driver"], "570.1");
        assert!(
            v["hints"]
                .to_string()
                .contains("no agent of gpu-1 is connected")
        );
        assert!(s.fake.asked("Processes")[0].contains("state: Running"));
        assert!(s.fake.asked("XidGroups")[0].contains("group_by: Gpu"));
    }

    #[tokio::test]
    async fn unknown_node_out_of_range_and_no_processes() {
        let s = Session::new(answers()).await;
        let text = s.refused("describe_node", json!({"node": "gpu-7"})).await;
        assert!(text.contains("nearest known: [\"gpu-1\"]"), "{text}");
        assert!(
            s.refused("describe_node", json!({"node": "gpu-1", "max_events": 51}))
                .await
                .contains("0-50")
        );
        let v = s
            .ok(
                "describe_node",
                json!({"node": "gpu-1", "max_events": 0, "include_processes": false}),
            )
            .await;
        assert_eq!(v["recent_events"], json!([]));
        assert_eq!(v["processes"], json!([]));
        assert!(s.fake.asked("Processes").is_empty());
        let empty = Session::new(Answers::default()).await;
        let text = empty
            .refused("describe_node", json!({"node": "gpu-1"}))
            .await;
        assert!(text.contains("has not heard from any node"), "{text}");
        // Through a gateway over two clusters that both have a gpu-1: say which, and how to pick.
        let mut two = answers();
        let mut other = two.nodes.nodes[0].clone();
        two.nodes.nodes[0].cluster = "c1".into();
        other.cluster = "c2".into();
        two.nodes.nodes.push(other);
        let s = Session::new(two).await;
        let text = s.refused("describe_node", json!({"node": "gpu-1"})).await;
        assert!(
            text.contains("is in 2 clusters (c1, c2); pass cluster"),
            "{text}"
        );
    }
}
