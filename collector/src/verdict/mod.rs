//! GPU health verdicts: each GPU's state (healthy, degraded, unhealthy, unknown) judged from the
//! evidence the collector stores (XIDs, NVML samples, process exits, agent boots), with reasons,
//! NVIDIA's recommended action and the evidence behind each. Rules: `rules.rs` and
//! docs/gpu-health.md.
//!
//! The engine lives on the state task. Each ingested batch is judged before it is written: the
//! GPUs whose verdict changed get a `gpu_health` event appended to the batch, so a verdict is
//! durable with the evidence that caused it and a restarted collector resumes from the latest
//! one per GPU (then replays the evidence after it). A failed write rolls the judgement back.
pub mod gpu;
pub mod query;
pub mod rules;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, time::Duration};

use gpulse_proto::{
    time as ptime,
    v1::{self, EventKind, HealthState, ProcessEventType, event::Payload},
};

use crate::FastMap;
use gpu::{GpuEntry, Seen};

/// The engine's settings (collector flags `--escalate-after-reboots` and friends).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The same XID after this many reboots since its first occurrence: hardware inspection.
    pub escalate_after_reboots: u32,
    /// Clean samples after a reset, reboot or vanished condition before a reason clears.
    pub clean_samples: u32,
    /// An application XID without a process clears after this long without recurring.
    pub quiet_period: Duration,
    /// A healthy GPU without a sample for this long is unknown.
    pub stale_after: Duration,
    /// A GPU without a sample this long, while its node's other GPUs sample, vanished.
    pub vanish_after: Duration,
    pub thresholds: rules::Thresholds,
    /// Rules on trial (`--rules-shadow`): recorded, never acted on.
    pub shadow: rules::Shadow,
    /// GPUs judged at most (a table keyed by what agents send).
    pub max_gpus: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            escalate_after_reboots: 2,
            clean_samples: 3,
            quiet_period: Duration::from_secs(15 * 60),
            stale_after: Duration::from_secs(120),
            vanish_after: Duration::from_secs(60),
            thresholds: rules::Thresholds::default(),
            shadow: rules::Shadow::default(),
            max_gpus: 100_000,
        }
    }
}

type Key = (String, String);

/// Every judged GPU, by node then PCI address: looked up by `&str` on the ingest path (no key
/// is allocated per event) and walked per node (vanishing, reboots, process exits).
#[derive(Default)]
struct Gpus {
    by_node: BTreeMap<String, BTreeMap<String, GpuEntry>>,
    len: usize,
}

impl Gpus {
    fn get(&self, node: &str, pci: &str) -> Option<&GpuEntry> {
        self.by_node.get(node)?.get(pci)
    }

    fn get_mut(&mut self, node: &str, pci: &str) -> Option<&mut GpuEntry> {
        self.by_node.get_mut(node)?.get_mut(pci)
    }

    fn insert(&mut self, node: &str, pci: &str, e: GpuEntry) {
        let gpus = match self.by_node.get_mut(node) {
            Some(g) => g,
            None => self.by_node.entry(node.to_string()).or_default(),
        };
        if gpus.insert(pci.to_string(), e).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, node: &str, pci: &str) {
        if let Some(gpus) = self.by_node.get_mut(node) {
            if gpus.remove(pci).is_some() {
                self.len -= 1;
            }
            if gpus.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The node's GPUs.
    fn of(&self, node: &str) -> impl Iterator<Item = (&String, &GpuEntry)> {
        self.by_node.get(node).into_iter().flatten()
    }

    /// The PCI addresses of the node's GPUs that `pick` selects (allocated only for those).
    fn pick(&self, node: &str, pick: impl Fn(&GpuEntry) -> bool) -> Vec<String> {
        self.of(node)
            .filter(|(_, e)| pick(e))
            .map(|(pci, _)| pci.clone())
            .collect()
    }

    fn values(&self) -> impl Iterator<Item = &GpuEntry> {
        self.by_node.values().flat_map(BTreeMap::values)
    }
}

/// What the engine knows of a node besides its GPUs.
#[derive(Clone, Debug, Default)]
struct NodeBoot {
    boot_id: String,
    /// When this boot's (or this agent run's) first sample came: vanishing is judged only once
    /// every GPU had the chance to sample.
    sampling_since: Option<i128>,
}

/// The pre-images of what one batch's judgement touched, to undo it when the write fails.
/// Looked up by key through the indexes: a batch of 10,000 XIDs on distinct GPUs searched the
/// list for each (O(touched^2): the state task held 2-3 s, issue 27 #12).
#[derive(Default)]
struct Journal {
    gpus: Vec<(Key, Option<GpuEntry>)>,
    /// node -> PCI address -> position in `gpus` (looked up by borrowed strings).
    gpu_index: FastMap<String, FastMap<String, usize>>,
    nodes: Vec<(String, Option<NodeBoot>)>,
    node_index: std::collections::HashSet<String>,
}

#[derive(Default)]
pub struct Engine {
    cfg: Config,
    gpus: Gpus,
    nodes: FastMap<String, NodeBoot>,
    journal: Option<Journal>,
    /// Counts GPUs refused past their node's share (None: counted nowhere, e.g. in tests).
    share: Option<crate::share::ShareRefusals>,
    /// GPUs not judged because the table was full.
    pub dropped_gpus: u64,
}

/// The event time of an event in unix ns (when the node saw it; else when it was received).
fn event_ns(ev: &v1::Event) -> i128 {
    ev.time
        .as_ref()
        .or(ev.received.as_ref())
        .map_or(0, ptime::to_unix_nanos)
}

impl Engine {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Judges a batch about to be written (events with the cursors they will get). Returns the
    /// gpu_health events to append to it; [`Engine::commit`] or [`Engine::rollback`] follows.
    /// `node` is the batch's (authenticated) node, whatever the events' envelopes say.
    pub fn judge<'a>(
        &mut self,
        node: &str,
        events: impl IntoIterator<Item = (&'a v1::Event, u64)>,
    ) -> Vec<v1::Event> {
        self.journal = Some(Journal::default());
        for (ev, cursor) in events {
            self.observe(node, ev, cursor);
        }
        let touched: Vec<(Key, (i32, bool))> = self
            .journal
            .as_ref()
            .map(|j| {
                j.gpus
                    .iter()
                    .map(|(k, e)| {
                        let before = e
                            .as_ref()
                            .map(|e| (e.rec.state, is_plain(e)))
                            .unwrap_or((HealthState::Healthy as i32, true));
                        (k.clone(), before)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (key, (before, was_plain)) in touched {
            let Some(e) = self.gpus.get_mut(&key.0, &key.1) else {
                continue;
            };
            let sig = e.signature();
            if sig == e.written {
                continue;
            }
            e.written = sig;
            // A healthy GPU with nothing against it, before and after (first seen, rebooted):
            // nothing worth an event; its record is derived again from its samples.
            if was_plain && is_plain(e) {
                continue;
            }
            out.push(health_event(e, before));
        }
        out
    }

    /// The batch was written: its judgement stands.
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// The batch was not written: forget its judgement (the agent resends it).
    pub fn rollback(&mut self) {
        let Some(j) = self.journal.take() else {
            return;
        };
        for ((node, pci), before) in j.gpus.into_iter().rev() {
            match before {
                Some(e) => self.gpus.insert(&node, &pci, e),
                None => self.gpus.remove(&node, &pci),
            }
        }
        for (node, before) in j.nodes.into_iter().rev() {
            match before {
                Some(b) => {
                    self.nodes.insert(node, b);
                }
                None => {
                    self.nodes.remove(&node);
                }
            }
        }
    }

    /// One restored event, in cursor order: a gpu_health event sets its GPU's verdict (what
    /// the collector had judged), anything else is evidence judged again after it.
    pub fn restore(&mut self, ev: &v1::Event) {
        if let Some(Payload::GpuHealth(h)) = &ev.payload {
            if let Some(rec) = &h.record {
                let known = self.gpus.get(&rec.node, &rec.pci).is_some();
                if known
                    || (self.gpus.len < self.cfg.max_gpus
                        && self.node_gpus(&rec.node) < crate::share::GPUS_PER_NODE)
                {
                    self.gpus
                        .insert(&rec.node, &rec.pci, GpuEntry::restored(rec.clone()));
                }
            }
            return;
        }
        self.observe(&ev.node, ev, ev.cursor);
    }

    /// Remembers the pre-image of a GPU's entry the first time a judged batch touches it.
    fn touch(&mut self, node: &str, pci: &str) {
        if let Some(j) = &mut self.journal {
            if j.gpu_index.get(node).is_some_and(|m| m.contains_key(pci)) {
                return;
            }
            let before = self.gpus.get(node, pci).cloned();
            let at = j.gpus.len();
            j.gpu_index
                .entry(node.to_string())
                .or_default()
                .insert(pci.to_string(), at);
            j.gpus.push(((node.to_string(), pci.to_string()), before));
        }
    }

    fn touch_node(&mut self, node: &str) {
        if let Some(j) = &mut self.journal
            && !j.node_index.contains(node)
        {
            j.node_index.insert(node.to_string());
            j.nodes
                .push((node.to_string(), self.nodes.get(node).cloned()));
        }
    }

    /// Where GPUs refused past their node's share are counted.
    pub fn count_share_refusals(&mut self, share: crate::share::ShareRefusals) {
        self.share = Some(share);
    }

    /// GPUs of `node` judged now.
    fn node_gpus(&self, node: &str) -> usize {
        self.gpus.by_node.get(node).map_or(0, BTreeMap::len)
    }

    /// The entry of a GPU, created when there is room in the table and in its node's share.
    fn entry(&mut self, node: &str, pci: &str) -> Option<&mut GpuEntry> {
        let known = self.gpus.get(node, pci).is_some();
        if !known && self.node_gpus(node) >= crate::share::GPUS_PER_NODE {
            self.dropped_gpus += 1;
            if let Some(s) = &self.share {
                s.refused(node, crate::share::table::VERDICTS, 1);
            }
            return None;
        }
        if !known && self.gpus.len >= self.cfg.max_gpus {
            self.dropped_gpus += 1;
            return None;
        }
        self.touch(node, pci);
        if !known {
            let boot = self.nodes.get(node).map_or("", |b| b.boot_id.as_str());
            let e = GpuEntry::new(node, pci, boot);
            self.gpus.insert(node, pci, e);
        }
        self.gpus.get_mut(node, pci)
    }

    fn observe(&mut self, node: &str, ev: &v1::Event, cursor: u64) {
        let t = event_ns(ev);
        match &ev.payload {
            Some(Payload::Xid(x)) => {
                let pci = if x.pci.is_empty() { &x.pci_raw } else { &x.pci };
                if pci.is_empty() {
                    return;
                }
                let cfg = self.cfg;
                let who = match (x.pid, &x.pod) {
                    (Some(p), Some(pod)) => format!(" pid={p} pod={}/{}", pod.namespace, pod.name),
                    (Some(p), None) => format!(" pid={p}"),
                    _ => String::new(),
                };
                let seen = Seen {
                    t,
                    cursor,
                    kind: "xid",
                    detail: format!("XID {} {}{who}: {}", x.code, x.mnemonic, x.message),
                };
                if let Some(e) = self.entry(node, pci) {
                    e.xid(x, ev.severity, &seen, &cfg);
                    e.settle(t, cfg.shadow);
                }
            }
            Some(Payload::GpuSample(s)) => self.sample(node, s, t, cursor),
            Some(Payload::AgentStatus(a)) => self.agent_status(node, a),
            Some(Payload::Gap(g)) if g.stage == v1::GapStage::SamplesShed as i32 => {
                // Samples were shed unevenly: give every GPU the chance to sample again
                // before judging one vanished.
                self.touch_node(node);
                if let Some(b) = self.nodes.get_mut(node) {
                    b.sampling_since = None;
                }
            }
            Some(Payload::GpuProcess(p)) if p.r#type == ProcessEventType::Exit as i32 => {
                let pid = p.tgid.max(p.pid);
                // Only GPUs with a reason naming the process: exits are frequent, reasons rare.
                let named = |e: &GpuEntry| e.rec.reasons.iter().any(|r| r.pid == Some(pid));
                let shadow = self.cfg.shadow;
                for pci in self.gpus.pick(node, named) {
                    self.touch(node, &pci);
                    if let Some(e) = self.gpus.get_mut(node, &pci) {
                        e.process_exit(pid);
                        e.settle(t, shadow);
                    }
                }
            }
            _ => {}
        }
    }

    /// An agent said which boot its node is in: a new one is a reboot for each of its GPUs.
    fn agent_status(&mut self, node: &str, a: &v1::AgentStatus) {
        if a.state == v1::AgentState::Started as i32 || !a.boot_id.is_empty() {
            self.touch_node(node);
            let b = self.nodes.entry(node.to_string()).or_default();
            // A (re)started agent: its GPUs resume sampling now.
            b.sampling_since = None;
            if !a.boot_id.is_empty() {
                b.boot_id.clone_from(&a.boot_id);
            }
        }
        if a.boot_id.is_empty() {
            return;
        }
        for pci in self.gpus.pick(node, |e| e.rec.boot_id != a.boot_id) {
            self.touch(node, &pci);
            if let Some(e) = self.gpus.get_mut(node, &pci) {
                if e.rec.boot_id.is_empty() {
                    e.rec.boot_id.clone_from(&a.boot_id);
                } else {
                    e.reboot(&a.boot_id);
                }
            }
        }
    }

    fn sample(&mut self, node: &str, s: &v1::GpuSample, t: i128, cursor: u64) {
        if s.pci.is_empty() {
            return;
        }
        let cfg = self.cfg;
        let seen = Seen {
            t,
            cursor,
            kind: "gpu_sample",
            detail: String::new(),
        };
        let previous = match self.entry(node, &s.pci) {
            Some(e) => {
                let previous = e.rec.last_sample.as_ref().map(ptime::to_unix_nanos);
                e.sample(s, &seen, &cfg);
                e.settle(t, cfg.shadow);
                previous
            }
            None => return,
        };
        let window = cfg.vanish_after.as_nanos() as i128;
        if previous.is_none_or(|p| t - p > window) {
            // This GPU's own samples paused (agent or node down, samples shed): the node's
            // sampling starts over, and every GPU gets its chance again.
            self.touch_node(node);
            self.nodes
                .entry(node.to_string())
                .or_default()
                .sampling_since = Some(t);
            return;
        }
        self.judge_vanished(node, &s.pci, s.index, t, cursor);
    }

    /// GPUs of the node that stopped sampling while this one goes on.
    fn judge_vanished(&mut self, node: &str, reporter: &str, index: u32, t: i128, cursor: u64) {
        let window = self.cfg.vanish_after.as_nanos() as i128;
        let since = match self.nodes.get(node).and_then(|b| b.sampling_since) {
            Some(s) => s,
            None => {
                self.touch_node(node);
                self.nodes
                    .entry(node.to_string())
                    .or_default()
                    .sampling_since = Some(t);
                return;
            }
        };
        if t - since <= window {
            return;
        }
        // Per sample: a scan of the node's few GPUs that allocates only for a silent one.
        let last_of = |e: &GpuEntry| e.rec.last_sample.as_ref().map(ptime::to_unix_nanos);
        let silent = self
            .gpus
            .pick(node, |e| last_of(e).is_some_and(|l| t - l > window));
        let shadow = self.cfg.shadow;
        for pci in silent {
            if pci == reporter {
                continue;
            }
            let Some(last) = self.gpus.get(node, &pci).and_then(last_of) else {
                continue;
            };
            self.touch(node, &pci);
            if let Some(e) = self.gpus.get_mut(node, &pci) {
                let seen = Seen {
                    t,
                    cursor,
                    kind: "gpu_sample",
                    detail: format!(
                        "no sample since {} while GPU {index} samples",
                        ptime::rfc3339(&ptime::from_unix_nanos(last))
                    ),
                };
                e.vanished(&seen);
                e.settle(t, shadow);
            }
        }
    }

    /// Every GPU's record and the state shown now.
    pub fn records(&self, now: i128) -> impl Iterator<Item = (&v1::GpuHealthRecord, HealthState)> {
        self.gpus
            .values()
            .map(move |e| (&e.rec, e.state_at(now, &self.cfg)))
    }

    /// Forgets a node past its retention: its GPUs' verdicts leave the answers and gauges.
    pub fn forget_node(&mut self, node: &str) {
        if let Some(gone) = self.gpus.by_node.remove(node) {
            self.gpus.len -= gone.len();
        }
        self.nodes.remove(node);
    }

    pub fn len(&self) -> usize {
        self.gpus.len
    }

    pub fn is_empty(&self) -> bool {
        self.gpus.len == 0
    }

    /// Reasons dropped across GPUs because one had too many.
    pub fn dropped_reasons(&self) -> u64 {
        self.gpus.values().map(|e| e.dropped_reasons).sum()
    }
}

/// Healthy, no reasons, no XID history.
fn is_plain(e: &GpuEntry) -> bool {
    e.rec.state == HealthState::Healthy as i32
        && e.rec.reasons.is_empty()
        && e.rec.xid_history.is_empty()
}

/// A verdict event's severity follows the state it announces, so `--min-severity error`
/// subscribers and alerting on severity see a GPU taken out of service: unhealthy is an error,
/// or the worst severity of the XIDs behind its unhealthy reasons (an XID 79 makes it fatal);
/// degraded is a warning; healthy and unknown are info.
pub fn health_severity(rec: &v1::GpuHealthRecord) -> v1::Severity {
    match HealthState::try_from(rec.state).unwrap_or_default() {
        HealthState::Unhealthy => rec
            .reasons
            .iter()
            .filter(|r| r.state == HealthState::Unhealthy as i32 && !r.shadow)
            .filter_map(|r| v1::Severity::try_from(r.severity).ok())
            .fold(v1::Severity::Error, |worst, s| {
                if (s as i32) > (worst as i32) {
                    s
                } else {
                    worst
                }
            }),
        HealthState::Degraded => v1::Severity::Warning,
        _ => v1::Severity::Info,
    }
}

/// The gpu_health event for a GPU whose verdict changed.
fn health_event(e: &GpuEntry, previous: i32) -> v1::Event {
    v1::Event {
        time: e.rec.updated,
        node: e.rec.node.clone(),
        kind: EventKind::GpuHealth as i32,
        severity: health_severity(&e.rec) as i32,
        payload: Some(Payload::GpuHealth(v1::GpuHealth {
            change: e.change_line(previous),
            previous,
            record: Some(e.rec.clone()),
        })),
        ..Default::default()
    }
}
