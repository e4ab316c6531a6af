//! What the collector knows of each node, kept current by every stored event: when it was last
//! heard from, its agent's XID source, and each GPU's latest sample. Answers `Nodes` and feeds
//! the node and GPU gauges.
use std::{collections::HashSet, time::Duration};

use gpulse_proto::{
    time as ptime,
    v1::{self, TimeWindow, event::Payload},
};

use super::agents::{Agents, older};
use crate::{
    FastMap,
    query::{self, QueryError},
    store::events::EventStore,
    telemetry::exposition::NodeView,
};

/// Most nodes and GPUs per node remembered for `Nodes` (a node has at most a few dozen GPUs).
const MAX_NODES: usize = 100_000;
const MAX_GPUS_PER_NODE: usize = crate::share::GPUS_PER_NODE;
const HOUR_NS: i128 = 3_600_000_000_000;

#[derive(Default)]
struct NodeState {
    last_seen: Option<prost_types::Timestamp>,
    xid_source: String,
    agent_detail: String,
    /// The latest sample event of each GPU.
    gpus: std::collections::BTreeMap<u32, Box<v1::Event>>,
}

#[derive(Default)]
pub(super) struct Nodes {
    map: FastMap<String, NodeState>,
}

impl Nodes {
    /// Updates the node's state from `ev`. A GPU sample is kept as that GPU's latest; what is
    /// no longer needed (the event, or the sample it replaced) is returned for reuse.
    pub(super) fn note(&mut self, ev: Box<v1::Event>) -> Option<Box<v1::Event>> {
        if !self.map.contains_key(&ev.node) {
            if self.map.len() >= MAX_NODES {
                return Some(ev);
            }
            self.map.insert(ev.node.clone(), NodeState::default());
        }
        let Some(n) = self.map.get_mut(&ev.node) else {
            return Some(ev);
        };
        n.last_seen = ev.received.or(ev.time);
        match &ev.payload {
            Some(Payload::AgentStatus(a)) => {
                n.xid_source.clone_from(&a.xid_source);
                n.agent_detail.clone_from(&a.detail);
                Some(ev)
            }
            Some(Payload::GpuSample(g))
                if n.gpus.contains_key(&g.index) || n.gpus.len() < MAX_GPUS_PER_NODE =>
            {
                n.gpus.insert(g.index, ev)
            }
            _ => Some(ev),
        }
    }

    /// Forgets nodes not heard from for `keep` that have no connected agent; returns them.
    pub(super) fn retire(&mut self, agents: &Agents, now: i128, keep: Duration) -> Vec<String> {
        let connected: HashSet<&str> = agents
            .connected()
            .map(|a| a.progress.node.as_str())
            .collect();
        let mut gone = Vec::new();
        self.map.retain(|name, n| {
            let keep = !older(n.last_seen.as_ref(), now, keep) || connected.contains(name.as_str());
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        gone
    }

    /// Every node by name, as its gauges see it.
    pub(super) fn views<'a>(&'a self, agents: &Agents) -> Vec<NodeView<'a>> {
        let mut v: Vec<NodeView<'a>> = self
            .map
            .iter()
            .map(|(name, n)| NodeView {
                name,
                connected: agents.node_connected(name),
                last_seen: n.last_seen.as_ref(),
                gpus: n.gpus.values().map(|e| &**e).collect(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(b.name));
        v
    }

    /// `Nodes`: every node (heard from in the window, when one is given) with its GPUs' latest
    /// samples and XID counts.
    pub(super) fn query(
        &self,
        agents: &Agents,
        events: &EventStore,
        window: Option<TimeWindow>,
        now_ns: i128,
    ) -> Result<v1::NodesResponse, QueryError> {
        let w = match &window {
            Some(tw) => Some(gpulse_proto::window::resolve(
                &tw.since, &tw.until, now_ns, HOUR_NS,
            )?),
            None => None,
        };
        let (start, end) = w.map_or((i64::MIN, i64::MAX), |w| (w.start_ms(), w.end_ms()));
        let xids = query::xid_counts(events, start, end);
        let seen_in_window = |n: &NodeState| {
            w.is_none_or(|w| {
                n.last_seen
                    .as_ref()
                    .is_some_and(|t| ptime::to_unix_nanos(t) >= w.start_ns)
            })
        };
        let mut nodes: Vec<v1::NodeInfo> = self
            .map
            .iter()
            .filter(|(_, n)| seen_in_window(n))
            .map(|(name, n)| {
                let mut connected_agents: Vec<String> = agents
                    .connected()
                    .filter(|a| a.progress.node == *name)
                    .map(|a| a.progress.agent_id.clone())
                    .collect();
                connected_agents.sort();
                let (xid_count, critical_xid_count) = xids.get(name).copied().unwrap_or_default();
                v1::NodeInfo {
                    node: name.clone(),
                    connected_agents,
                    last_seen: n.last_seen,
                    xid_source: n.xid_source.clone(),
                    agent_detail: n.agent_detail.clone(),
                    gpus: n
                        .gpus
                        .values()
                        .filter_map(|e| match &e.payload {
                            Some(Payload::GpuSample(g)) => Some(g.clone()),
                            _ => None,
                        })
                        .collect(),
                    xid_count,
                    critical_xid_count,
                    cluster: String::new(),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let oldest = events.oldest_ms(None);
        let window = w.map(|w| v1::ResolvedWindow {
            start: Some(ptime::from_unix_nanos(w.start_ns)),
            end: Some(ptime::from_unix_nanos(w.end_ns)),
            defaulted: w.defaulted,
            oldest_data: oldest.map(ptime::from_unix_millis),
            partial: oldest.is_none_or(|o| o > w.start_ms()),
        });
        let mut r = v1::NodesResponse {
            nodes,
            window,
            ..Default::default()
        };
        gpulse_proto::bounds::fit_nodes(&mut r);
        Ok(r)
    }
}
