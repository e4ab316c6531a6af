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
    /// The node whose share of agent ids this one counts against (the node it first named).
    home: String,
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
            home: String::new(),
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

/// Agent ids one node may hold: a node runs one agent, and one without a state dir takes a new
/// id per restart (forgotten after `--agent-retention`). Past the share the node's least
/// recently seen disconnected id is forgotten, so ids one credential makes up (issue 27 #9:
/// 30,000 Hello-only ids) cost a bounded table, never another node's entries.
pub const MAX_IDS_PER_NODE: usize = 64;

/// Every agent the collector has heard of, by agent id.
#[derive(Default)]
pub(super) struct Agents {
    pub(super) map: FastMap<String, AgentEntry>,
    /// The ids counted against each node's share.
    by_node: FastMap<String, Vec<String>>,
    /// Ids forgotten to keep a node within its share (`gpulse_agent_ids_evicted_total`).
    pub(super) evicted: u64,
}

impl Agents {
    /// From progress recovered at start-up (all of it durable: it was read back).
    pub(super) fn restored(progress: FastMap<String, v1::AgentProgress>) -> Self {
        let mut a = Self::default();
        for (id, p) in progress {
            let home = p.node.clone();
            let mut e = AgentEntry::new(p);
            e.home.clone_from(&home);
            a.by_node.entry(home).or_default().push(id.clone());
            a.map.insert(id, e);
        }
        a
    }

    /// The entry of `agent_id`, created (with `node`) for a new one within the node's share;
    /// Err when every id of the node's share has an open stream.
    pub(super) fn entry(&mut self, agent_id: &str, node: &str) -> Result<&mut AgentEntry, String> {
        if !self.map.contains_key(agent_id) {
            self.make_room(node)?;
            let mut e = AgentEntry::new(v1::AgentProgress {
                agent_id: agent_id.to_string(),
                node: node.to_string(),
                ..Default::default()
            });
            e.home = node.to_string();
            self.by_node
                .entry(node.to_string())
                .or_default()
                .push(agent_id.to_string());
            self.map.insert(agent_id.to_string(), e);
        }
        self.map
            .get_mut(agent_id)
            .ok_or_else(|| format!("agent id {agent_id:?} vanished"))
    }

    /// Forgets `node`'s least recently seen disconnected id when the node is at its share.
    fn make_room(&mut self, node: &str) -> Result<(), String> {
        let Some(ids) = self.by_node.get_mut(node) else {
            return Ok(());
        };
        if ids.len() < MAX_IDS_PER_NODE {
            return Ok(());
        }
        let map = &self.map;
        let oldest = ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| map.get(id).map(|e| (i, e)))
            .filter(|(_, e)| e.connections == 0)
            .min_by_key(|(_, e)| {
                e.progress
                    .last_seen
                    .as_ref()
                    .map_or(i128::MIN, ptime::to_unix_nanos)
            })
            .map(|(i, _)| i);
        let Some(i) = oldest else {
            return Err(format!(
                "node {node:?} has {MAX_IDS_PER_NODE} agent ids with open streams; no more are taken"
            ));
        };
        let id = ids.swap_remove(i);
        self.map.remove(&id);
        self.evicted += 1;
        Ok(())
    }

    /// Removes `id` from its node's share (it was forgotten).
    fn unshare(by_node: &mut FastMap<String, Vec<String>>, home: &str, id: &str) {
        if let Some(ids) = by_node.get_mut(home) {
            ids.retain(|x| x != id);
            if ids.is_empty() {
                by_node.remove(home);
            }
        }
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
        let e = self.entry(agent_id, &node)?;
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

    /// The progress of every agent that stored an event, for a log checkpoint. An id that only
    /// said Hello has nothing to resume from, and is left out: 30,000 of them made every batch
    /// rotate the log (212 MB of WAL for 24 KB of events, issue 27 #9).
    pub(super) fn progress(&self) -> Vec<v1::AgentProgress> {
        self.map
            .values()
            .filter(|a| a.progress.through_seq > 0)
            .map(|a| a.progress.clone())
            .collect()
    }

    /// Forgets agents without a stream whose last sign of life is older than `keep` (`now`
    /// in Unix ns); returns how many.
    pub(super) fn retire(&mut self, now: i128, keep: Duration) -> usize {
        let before = self.map.len();
        let by_node = &mut self.by_node;
        self.map.retain(|id, a| {
            let keep = a.connections > 0 || !older(a.progress.last_seen.as_ref(), now, keep);
            if !keep {
                Self::unshare(by_node, &a.home, id);
            }
            keep
        });
        before - self.map.len()
    }
}

/// `t` lies more than `keep` before `now` (Unix ns).
pub(super) fn older(t: Option<&prost_types::Timestamp>, now: i128, keep: Duration) -> bool {
    t.is_some_and(|t| now - ptime::to_unix_nanos(t) > keep.as_nanos() as i128)
}
