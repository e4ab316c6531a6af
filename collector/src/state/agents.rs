//! What the collector knows of each agent: its progress (the highest seq stored), what of it is
//! durable, its open streams, and the shared envelope of its events.
use std::{net::IpAddr, sync::Arc, time::Duration};

use gpulse_proto::{time as ptime, v1};

use crate::{FastMap, store::events::Origin};

pub(super) struct AgentEntry {
    pub(super) progress: v1::AgentProgress,
    /// Highest seq on disk (fsync completed); `progress.through_seq` may be ahead of it while a
    /// sync runs. Every answer to the agent uses this one.
    pub(super) durable_through: u64,
    pub(super) connections: u32,
    /// Where its open stream comes from (None: in-process, or not known).
    peer: Option<IpAddr>,
    /// The envelope the store records for this agent's events (node as of its latest batch).
    origin: Option<Arc<Origin>>,
}

impl AgentEntry {
    pub(super) fn new(progress: v1::AgentProgress) -> Self {
        Self {
            // Restored progress was read back from disk.
            durable_through: progress.through_seq,
            progress,
            connections: 0,
            peer: None,
            origin: None,
        }
    }

    /// One shared envelope for every event of this agent's batches from `node`.
    pub(super) fn origin(&mut self, node: &str) -> Arc<Origin> {
        match &self.origin {
            Some(o) if o.node == node && o.agent_id == self.progress.agent_id => o.clone(),
            _ => {
                let o = Arc::new(Origin {
                    node: node.to_string(),
                    agent_id: self.progress.agent_id.clone(),
                });
                self.origin = Some(o.clone());
                o
            }
        }
    }
}

/// Every agent the collector has heard of, by agent id.
#[derive(Default)]
pub(super) struct Agents {
    pub(super) map: FastMap<String, AgentEntry>,
}

impl Agents {
    /// From progress recovered at start-up (all of it durable: it was read back).
    pub(super) fn restored(progress: FastMap<String, v1::AgentProgress>) -> Self {
        Self {
            map: progress
                .into_iter()
                .map(|(id, p)| (id, AgentEntry::new(p)))
                .collect(),
        }
    }

    /// The entry of `agent_id`, created (with `node`) for a new one.
    pub(super) fn entry(&mut self, agent_id: &str, node: &str) -> &mut AgentEntry {
        self.map.entry(agent_id.to_string()).or_insert_with(|| {
            AgentEntry::new(v1::AgentProgress {
                agent_id: agent_id.to_string(),
                node: node.to_string(),
                ..Default::default()
            })
        })
    }

    /// An agent opened a stream: what of its events is durable (it resends the rest).
    ///
    /// Refused while the id is connected on another stream from another address: one agent
    /// runs one stream, so that is someone else speaking for it. From the same address it is
    /// the agent itself reconnecting before the collector noticed its old connection die (a
    /// half-open TCP connection lasts until keepalive gives up), and it goes ahead.
    pub(super) fn hello(
        &mut self,
        agent_id: &str,
        node: String,
        boot_id: String,
        peer: Option<IpAddr>,
    ) -> Result<u64, String> {
        let e = self.entry(agent_id, &node);
        if e.connections > 0
            && let (Some(old), Some(new)) = (e.peer, peer)
            && old != new
        {
            return Err(format!(
                "agent id {agent_id:?} is connected on another stream from another address; one agent, one stream"
            ));
        }
        e.peer = peer;
        e.connections += 1;
        e.progress.node = node;
        e.progress.boot_id = boot_id;
        e.progress.last_seen = Some(ptime::now());
        Ok(e.durable_through)
    }

    pub(super) fn disconnected(&mut self, agent_id: &str) {
        if let Some(e) = self.map.get_mut(agent_id) {
            e.connections = e.connections.saturating_sub(1);
            e.progress.last_seen = Some(ptime::now());
        }
    }

    pub(super) fn durable_through(&self, agent_id: &str) -> u64 {
        self.map.get(agent_id).map_or(0, |a| a.durable_through)
    }

    /// Raises the agent's durable seq (its write is on disk).
    pub(super) fn made_durable(&mut self, agent_id: &str, through: u64) {
        if let Some(a) = self.map.get_mut(agent_id) {
            a.durable_through = a.durable_through.max(through);
        }
    }

    /// Agents with an open stream.
    pub(super) fn connected(&self) -> impl Iterator<Item = &AgentEntry> {
        self.map.values().filter(|a| a.connections > 0)
    }

    /// A node has a connected agent.
    pub(super) fn node_connected(&self, node: &str) -> bool {
        self.connected().any(|a| a.progress.node == node)
    }

    /// Every agent's progress, for a log checkpoint.
    pub(super) fn progress(&self) -> Vec<v1::AgentProgress> {
        self.map.values().map(|a| a.progress.clone()).collect()
    }

    /// Forgets agents without a stream whose last sign of life is older than `keep` (`now`
    /// in Unix ns); returns how many.
    pub(super) fn retire(&mut self, now: i128, keep: Duration) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, a| a.connections > 0 || !older(a.progress.last_seen.as_ref(), now, keep));
        before - self.map.len()
    }
}

/// `t` lies more than `keep` before `now` (Unix ns).
pub(super) fn older(t: Option<&prost_types::Timestamp>, now: i128, keep: Duration) -> bool {
    t.is_some_and(|t| now - ptime::to_unix_nanos(t) > keep.as_nanos() as i128)
}
