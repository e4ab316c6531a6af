//! Folding upstream answers into one, as each arrives. Shards own disjoint nodes, so per-node
//! and per-GPU entries concatenate and re-rank; counts add; capped lists are re-capped; the
//! window and its coverage take the widest view. Nothing here waits for every answer.
use std::collections::{BTreeMap, HashMap};

use gpulse_proto::{
    time as ptime,
    v1::{
        GpuHealthRecord, GpuHealthResponse, KindCount, KindStatus, NodeInfo, NodesResponse,
        ProcessInfo, ProcessesResponse, ResolvedWindow, StatusResponse, SummarizeResponse,
        TierStatus, TimeWindow, XidGroup, XidGroupsResponse,
    },
    window,
};
use tonic::Status;

use gpulse_proto::answer::{self, MAX_XID_CODES, TOP_NODES};

const NOTABLE: usize = 10;
const INCIDENTS: usize = 20;
const GROUP_MEMBERS: usize = 10;
/// Hints kept per answer (each upstream's, named).
const MAX_HINTS: usize = 20;

/// The caller's window with relative bounds resolved once, here, so every upstream answers for
/// the same span ("1h" asked of four shards a few ms apart must not become four windows). An
/// empty `since` stays empty: each upstream applies the RPC's default back from the pinned end.
pub fn pin(tw: Option<TimeWindow>) -> Result<Option<TimeWindow>, Status> {
    let Some(tw) = tw else {
        return Ok(None);
    };
    let now = ptime::to_unix_nanos(&ptime::now());
    let w = window::resolve(&tw.since, &tw.until, now, 3_600_000_000_000)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let at = |ns: i128| ptime::rfc3339(&ptime::from_unix_nanos(ns));
    Ok(Some(TimeWindow {
        since: if tw.since.trim().is_empty() {
            String::new()
        } else {
            at(w.start_ns)
        },
        until: at(w.end_ns),
    }))
}

/// A window pinned even when the caller gave none (`until` = now).
pub fn pin_or_now(tw: Option<TimeWindow>) -> Result<TimeWindow, Status> {
    Ok(pin(Some(tw.unwrap_or_default()))?.unwrap_or_default())
}

fn ts_key(t: &Option<prost_types::Timestamp>) -> (i64, i32) {
    t.as_ref().map_or((i64::MIN, 0), |t| (t.seconds, t.nanos))
}

/// The merged window: the first answer's bounds, the oldest data any upstream holds, partial
/// when any upstream's coverage is.
pub fn window(acc: &mut Option<ResolvedWindow>, w: Option<ResolvedWindow>) {
    let Some(w) = w else { return };
    match acc {
        None => *acc = Some(w),
        Some(a) => {
            a.partial |= w.partial;
            if ts_key(&w.oldest_data) < ts_key(&a.oldest_data) || a.oldest_data.is_none() {
                a.oldest_data = w.oldest_data.or(a.oldest_data.take());
            }
        }
    }
}

/// Hints from one upstream, named, up to the cap.
pub fn hints(acc: &mut Vec<String>, upstream: &str, hints: Vec<String>) {
    for h in hints {
        if acc.len() >= MAX_HINTS {
            return;
        }
        acc.push(format!("{upstream}: {h}"));
    }
}

pub fn status(acc: &mut StatusResponse, r: StatusResponse) {
    acc.events_stored += r.events_stored;
    acc.ring_bytes += r.ring_bytes;
    acc.ring_budget_bytes += r.ring_budget_bytes;
    acc.agents_connected += r.agents_connected;
    acc.subscribers += r.subscribers;
    acc.duplicates_dropped += r.duplicates_dropped;
    acc.events_expired += r.events_expired;
    acc.wal_bytes += r.wal_bytes;
    acc.samples_out_of_order += r.samples_out_of_order;
    acc.samples_gpus_refused += r.samples_gpus_refused;
    acc.events_lost_at_recovery += r.events_lost_at_recovery;
    acc.gpus_tracked += r.gpus_tracked;
    if acc.started.is_none() || ts_key(&r.started) < ts_key(&acc.started) {
        acc.started = r.started;
    }
    for k in r.kinds {
        match acc.kinds.iter_mut().find(|a| a.kind == k.kind) {
            Some(a) => add_kind(a, k),
            None => acc.kinds.push(k),
        }
    }
    for t in r.tiers {
        match acc.tiers.iter_mut().find(|a| a.tier == t.tier) {
            Some(a) => add_tier(a, t),
            None => acc.tiers.push(t),
        }
    }
}

fn older(a: &mut Option<prost_types::Timestamp>, b: Option<prost_types::Timestamp>) {
    if b.is_some() && (a.is_none() || ts_key(&b) < ts_key(a)) {
        *a = b;
    }
}

fn add_kind(a: &mut KindStatus, k: KindStatus) {
    a.bytes += k.bytes;
    a.share_bytes += k.share_bytes;
    a.events += k.events;
    a.expired += k.expired;
    older(&mut a.oldest, k.oldest);
}

fn add_tier(a: &mut TierStatus, t: TierStatus) {
    a.bytes += t.bytes;
    a.budget_bytes += t.budget_bytes;
    a.expired += t.expired;
    older(&mut a.oldest, t.oldest);
}

/// Nodes by (cluster, name): a node two shards know (its agent failed over) is one entry with
/// both shards' connected agents, the newest sample set, and the XIDs of both.
#[derive(Default)]
pub struct Nodes {
    map: BTreeMap<(String, String), NodeInfo>,
    window: Option<ResolvedWindow>,
    truncated: bool,
    hints: Vec<String>,
}

impl Nodes {
    pub fn add(&mut self, r: NodesResponse, cluster: &str) {
        window(&mut self.window, r.window);
        self.truncated |= r.truncated;
        hints(&mut self.hints, cluster, r.hints);
        for mut n in r.nodes {
            if n.cluster.is_empty() {
                n.cluster = cluster.to_string();
            }
            let key = (n.cluster.clone(), n.node.clone());
            match self.map.get_mut(&key) {
                None => {
                    self.map.insert(key, n);
                }
                Some(a) => {
                    a.xid_count += n.xid_count;
                    a.critical_xid_count += n.critical_xid_count;
                    for c in n.connected_agents {
                        if !a.connected_agents.contains(&c) {
                            a.connected_agents.push(c);
                        }
                    }
                    a.connected_agents.sort();
                    if ts_key(&n.last_seen) > ts_key(&a.last_seen) {
                        a.last_seen = n.last_seen;
                        a.xid_source = n.xid_source;
                        a.agent_detail = n.agent_detail;
                        a.gpus = n.gpus;
                    }
                }
            }
        }
    }

    pub fn finish(self) -> NodesResponse {
        let mut r = NodesResponse {
            nodes: self.map.into_values().collect(),
            window: self.window,
            truncated: self.truncated,
            hints: self.hints,
            ..Default::default()
        };
        gpulse_proto::bounds::fit_nodes(&mut r);
        r
    }
}

/// Summaries added up; the capped lists re-ranked by the collector's own rules.
#[derive(Default)]
pub struct Summary {
    out: SummarizeResponse,
    kinds: BTreeMap<i32, u64>,
    nodes: HashMap<String, (u64, u64)>,
    xids: HashMap<u32, u64>,
}

impl Summary {
    pub fn add(&mut self, upstream: &str, r: SummarizeResponse) {
        let o = &mut self.out;
        window(&mut o.window, r.window);
        o.total_matched += r.total_matched;
        o.summarized += r.summarized;
        o.truncated |= r.truncated;
        o.process_starts += r.process_starts;
        o.process_exits += r.process_exits;
        o.incidents_total += r.incidents_total;
        for k in r.kinds {
            *self.kinds.entry(k.kind).or_default() += k.count;
        }
        for n in r.top_nodes {
            let e = self.nodes.entry(n.node).or_default();
            e.0 += n.count;
            e.1 += n.severe;
        }
        // Each upstream lists only its top nodes; keep the map bounded by re-ranking often.
        if self.nodes.len() > 8 * TOP_NODES {
            self.nodes = answer::top_nodes(std::mem::take(&mut self.nodes))
                .into_iter()
                .map(|n| (n.node, (n.count, n.severe)))
                .collect();
        }
        for x in r.xids {
            *self.xids.entry(x.code).or_default() += x.count;
        }
        o.notable.extend(r.notable);
        o.notable.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then_with(|| gpulse_proto::listing::cmp(b, a))
        });
        o.notable.truncate(NOTABLE);
        o.incidents.extend(r.incidents);
        o.incidents
            .sort_by_key(|i| std::cmp::Reverse(ts_key(&i.start)));
        o.incidents.truncate(INCIDENTS);
        hints(&mut o.hints, upstream, r.hints);
    }

    pub fn finish(mut self) -> SummarizeResponse {
        self.out.kinds = self
            .kinds
            .into_iter()
            .map(|(kind, count)| KindCount { kind, count })
            .collect();
        self.out.top_nodes = answer::top_nodes(self.nodes);
        self.out.xids = answer::ranked_codes(self.xids, MAX_XID_CODES);
        self.out
    }
}

/// XID groups by key: disjoint across shards when grouped by GPU or node; grouped by code the
/// same code's groups add up. Each upstream is asked for its 100 biggest groups so that a group
/// big on one shard and small on another is still counted whole unless it is small everywhere.
#[derive(Default)]
pub struct XidGroups {
    out: XidGroupsResponse,
    groups: HashMap<String, XidGroup>,
    other: u64,
}

impl XidGroups {
    pub fn add(&mut self, upstream: &str, r: XidGroupsResponse) {
        let o = &mut self.out;
        window(&mut o.window, r.window);
        o.total_matched += r.total_matched;
        o.grouped += r.grouped;
        o.truncated |= r.truncated;
        self.other += r.other_count;
        hints(&mut o.hints, upstream, r.hints);
        for g in r.groups {
            match self.groups.get_mut(&g.key) {
                None => {
                    self.groups.insert(g.key.clone(), g);
                }
                Some(a) => merge_group(a, g),
            }
        }
    }

    pub fn finish(mut self, top: usize) -> XidGroupsResponse {
        let mut list: Vec<XidGroup> = self.groups.into_values().collect();
        list.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        self.out.other_count = self.other + list.iter().skip(top).map(|g| g.count).sum::<u64>();
        list.truncate(top);
        self.out.groups = list;
        self.out
    }
}

fn merge_group(a: &mut XidGroup, g: XidGroup) {
    a.count += g.count;
    a.severity = a.severity.max(g.severity);
    older(&mut a.first_seen, g.first_seen);
    if ts_key(&g.last_seen) > ts_key(&a.last_seen) {
        a.last_seen = g.last_seen;
    }
    for x in g.gpus {
        if a.gpus.len() < GROUP_MEMBERS && !a.gpus.contains(&x) {
            a.gpus.push(x);
        }
    }
    for x in g.nodes {
        if a.nodes.len() < GROUP_MEMBERS && !a.nodes.contains(&x) {
            a.nodes.push(x);
        }
    }
    for c in g.codes {
        match a.codes.iter_mut().find(|x| x.code == c.code) {
            Some(x) => x.count += c.count,
            None => a.codes.push(c),
        }
    }
    a.codes.sort_by_key(|c| c.code);
}

/// Process rows, latest started first, keeping only the `keep` (offset + limit) newest as they
/// arrive; the page is cut from them at the end.
pub struct Processes {
    out: ProcessesResponse,
    keep: usize,
}

impl Processes {
    pub fn new(keep: usize) -> Self {
        Self {
            out: ProcessesResponse::default(),
            keep,
        }
    }

    pub fn add(&mut self, upstream: &str, r: ProcessesResponse) {
        let o = &mut self.out;
        window(&mut o.window, r.window);
        o.total_matched += r.total_matched;
        o.truncated |= r.truncated;
        hints(&mut o.hints, upstream, r.hints);
        o.processes.extend(r.processes);
        o.processes.sort_by(newest_started);
        o.processes.truncate(self.keep);
    }

    pub fn finish(mut self, offset: usize, limit: usize) -> ProcessesResponse {
        self.out.processes = self
            .out
            .processes
            .into_iter()
            .skip(offset)
            .take(limit)
            .collect();
        self.out
    }
}

fn newest_started(a: &ProcessInfo, b: &ProcessInfo) -> std::cmp::Ordering {
    ts_key(&b.started)
        .cmp(&ts_key(&a.started))
        .then_with(|| (&a.node, a.pid).cmp(&(&b.node, b.pid)))
}

/// GPU verdicts, worst first, keeping the `limit` worst as they arrive. Counts add per
/// upstream; a GPU listed by two upstreams (its agent failed over between shards) is listed
/// once, with the newer verdict, and counted once.
pub struct Health {
    out: GpuHealthResponse,
    gpus: HashMap<(String, String, String), GpuHealthRecord>,
    limit: usize,
    cluster: String,
}

impl Health {
    pub fn new(limit: usize, cluster: &str) -> Self {
        Self {
            out: GpuHealthResponse::default(),
            gpus: HashMap::new(),
            limit,
            cluster: cluster.to_string(),
        }
    }

    pub fn add(&mut self, upstream: &str, r: GpuHealthResponse) {
        let o = &mut self.out;
        o.healthy += r.healthy;
        o.degraded += r.degraded;
        o.unhealthy += r.unhealthy;
        o.unknown += r.unknown;
        o.truncated |= r.truncated;
        hints(&mut o.hints, upstream, r.hints);
        for mut g in r.gpus {
            if g.cluster.is_empty() {
                g.cluster.clone_from(&self.cluster);
            }
            let key = (g.cluster.clone(), g.node.clone(), g.pci.clone());
            let older = match self.gpus.get_mut(&key) {
                None => {
                    self.gpus.insert(key, g);
                    continue;
                }
                Some(a) if ts_key(&g.updated) > ts_key(&a.updated) => std::mem::replace(a, g),
                Some(_) => g,
            };
            uncount(o, older.state);
        }
        if self.gpus.len() > self.limit {
            let mut all = self.ranked();
            all.truncate(self.limit);
            self.out.truncated = true;
            self.gpus = all
                .into_iter()
                .map(|g| ((g.cluster.clone(), g.node.clone(), g.pci.clone()), g))
                .collect();
        }
    }

    fn ranked(&mut self) -> Vec<GpuHealthRecord> {
        let mut all: Vec<GpuHealthRecord> = self.gpus.drain().map(|(_, g)| g).collect();
        answer::sort_health(&mut all);
        all
    }

    pub fn finish(mut self) -> GpuHealthResponse {
        self.out.gpus = self.ranked();
        answer::fit_health(&mut self.out);
        self.out
    }
}

/// A duplicate verdict leaves the count of its state.
fn uncount(o: &mut GpuHealthResponse, state: i32) {
    use gpulse_proto::v1::HealthState;
    let c = match HealthState::try_from(state).unwrap_or_default() {
        HealthState::Healthy => &mut o.healthy,
        HealthState::Degraded => &mut o.degraded,
        HealthState::Unhealthy => &mut o.unhealthy,
        HealthState::Unknown | HealthState::Unspecified => &mut o.unknown,
    };
    *c = c.saturating_sub(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::{Event, Incident, NodeCount, Severity, XidCount};

    fn ts(s: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn summaries_add_counts_and_rerank_capped_lists() {
        let mut m = Summary::default();
        let part = |nodes: &[(&str, u64, u64)], codes: &[(u32, u64)], sev: Severity, t: i64| {
            SummarizeResponse {
                total_matched: 10,
                summarized: 10,
                kinds: vec![KindCount { kind: 1, count: 10 }],
                top_nodes: nodes
                    .iter()
                    .map(|(n, c, s)| NodeCount {
                        node: n.to_string(),
                        count: *c,
                        severe: *s,
                    })
                    .collect(),
                xids: codes
                    .iter()
                    .map(|(code, count)| XidCount {
                        code: *code,
                        count: *count,
                    })
                    .collect(),
                notable: vec![Event {
                    severity: sev as i32,
                    time: ts(t),
                    ..Default::default()
                }],
                incidents: vec![Incident {
                    start: ts(t),
                    ..Default::default()
                }],
                incidents_total: 1,
                hints: vec!["h".into()],
                ..Default::default()
            }
        };
        m.add(
            "a",
            part(
                &[("n1", 4, 0), ("n2", 6, 1)],
                &[(79, 3), (13, 7)],
                Severity::Error,
                5,
            ),
        );
        m.add("b", part(&[("n3", 10, 0)], &[(79, 5)], Severity::Fatal, 1));
        let s = m.finish();
        assert_eq!(
            (s.total_matched, s.summarized, s.incidents_total),
            (20, 20, 2)
        );
        assert_eq!(s.kinds, vec![KindCount { kind: 1, count: 20 }]);
        let nodes: Vec<_> = s.top_nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, ["n2", "n3", "n1"], "severe first, then count");
        assert_eq!((s.xids[0].code, s.xids[0].count), (79, 8));
        assert_eq!(s.notable[0].severity, Severity::Fatal as i32);
        assert_eq!(
            ts_key(&s.incidents[0].start),
            (5, 0),
            "newest incident first"
        );
        assert_eq!(s.hints, ["a: h", "b: h"]);
    }

    #[test]
    fn xid_groups_merge_by_key_and_count_the_rest() {
        let g = |key: &str, count: u64| XidGroup {
            key: key.into(),
            count,
            first_seen: ts(count as i64),
            last_seen: ts(count as i64),
            codes: vec![XidCount { code: 79, count }],
            ..Default::default()
        };
        let mut m = XidGroups::default();
        m.add(
            "a",
            XidGroupsResponse {
                groups: vec![g("79", 5), g("13", 2)],
                other_count: 1,
                ..Default::default()
            },
        );
        m.add(
            "b",
            XidGroupsResponse {
                groups: vec![g("79", 4), g("48", 3)],
                ..Default::default()
            },
        );
        let r = m.finish(2);
        assert_eq!(r.groups[0].key, "79");
        assert_eq!(r.groups[0].count, 9);
        assert_eq!(ts_key(&r.groups[0].first_seen), (4, 0));
        assert_eq!(ts_key(&r.groups[0].last_seen), (5, 0));
        assert_eq!(r.groups[0].codes, vec![XidCount { code: 79, count: 9 }]);
        assert_eq!(r.groups[1].key, "48");
        assert_eq!(r.other_count, 1 + 2);
    }

    #[test]
    fn processes_keep_only_the_page_window_newest_first() {
        let p = |node: &str, started: i64| ProcessInfo {
            node: node.into(),
            started: ts(started),
            ..Default::default()
        };
        let mut m = Processes::new(3);
        m.add(
            "a",
            ProcessesResponse {
                processes: vec![p("a", 9), p("a", 5), p("a", 1)],
                total_matched: 3,
                ..Default::default()
            },
        );
        m.add(
            "b",
            ProcessesResponse {
                processes: vec![p("b", 7), p("b", 2)],
                total_matched: 2,
                ..Default::default()
            },
        );
        let r = m.finish(1, 2);
        assert_eq!(r.total_matched, 5);
        let got: Vec<_> = r.processes.iter().map(|p| ts_key(&p.started).0).collect();
        assert_eq!(got, [7, 5]);
    }

    #[test]
    fn nodes_known_to_two_shards_are_one() {
        let n = |agent: &str, seen: i64, xids: u64| NodeInfo {
            node: "n1".into(),
            connected_agents: vec![agent.into()],
            last_seen: ts(seen),
            xid_source: agent.into(),
            xid_count: xids,
            ..Default::default()
        };
        let mut m = Nodes::default();
        m.add(
            NodesResponse {
                nodes: vec![n("n1/a", 5, 2)],
                ..Default::default()
            },
            "c1",
        );
        m.add(
            NodesResponse {
                nodes: vec![n("n1/b", 9, 1)],
                ..Default::default()
            },
            "c1",
        );
        let r = m.finish();
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].connected_agents, ["n1/a", "n1/b"]);
        assert_eq!(r.nodes[0].xid_count, 3);
        assert_eq!(r.nodes[0].xid_source, "n1/b", "the newest report wins");
        assert_eq!(r.nodes[0].cluster, "c1");
    }

    #[test]
    fn pinned_windows_are_absolute() {
        let w = pin(Some(TimeWindow {
            since: "1h".into(),
            until: String::new(),
        }))
        .unwrap()
        .unwrap();
        assert!(w.since.ends_with('Z') && w.until.ends_with('Z'), "{w:?}");
        let d = pin(Some(TimeWindow::default())).unwrap().unwrap();
        assert!(d.since.is_empty(), "the RPC's default stays the upstream's");
        assert!(
            pin(Some(TimeWindow {
                since: "bogus".into(),
                until: String::new()
            }))
            .is_err()
        );
    }

    #[test]
    fn health_verdicts_merge_worst_first_once_each_within_the_limit() {
        use gpulse_proto::v1::{GpuHealthRecord, HealthState};
        let gpu = |node: &str, pci: &str, state: HealthState, updated: i64| GpuHealthRecord {
            node: node.into(),
            pci: pci.into(),
            state: state as i32,
            updated: ts(updated),
            ..Default::default()
        };
        let mut h = Health::new(3, "eu-1");
        h.add(
            "shard-0",
            GpuHealthResponse {
                gpus: vec![
                    gpu("n1", "0000:3b:00.0", HealthState::Degraded, 10),
                    gpu("n2", "0000:3b:00.0", HealthState::Unknown, 10),
                ],
                degraded: 1,
                unknown: 1,
                healthy: 6,
                ..Default::default()
            },
        );
        h.add(
            "shard-1",
            GpuHealthResponse {
                gpus: vec![
                    // n1's GPU again (its agent failed over): the newer verdict wins, counted once.
                    gpu("n1", "0000:3b:00.0", HealthState::Unhealthy, 20),
                    gpu("n3", "0000:86:00.0", HealthState::Unhealthy, 5),
                    gpu("n4", "0000:86:00.0", HealthState::Degraded, 5),
                ],
                unhealthy: 2,
                degraded: 1,
                hints: vec!["x".into()],
                ..Default::default()
            },
        );
        let r = h.finish();
        let listed: Vec<(&str, i32)> = r.gpus.iter().map(|g| (g.node.as_str(), g.state)).collect();
        assert_eq!(
            listed,
            vec![
                ("n1", HealthState::Unhealthy as i32),
                ("n3", HealthState::Unhealthy as i32),
                ("n4", HealthState::Degraded as i32),
            ]
        );
        assert!(r.truncated, "n2's unknown GPU did not fit the limit");
        assert_eq!(
            (r.unhealthy, r.degraded, r.unknown, r.healthy),
            (2, 1, 1, 6)
        );
        assert!(r.gpus.iter().all(|g| g.cluster == "eu-1"));
        assert_eq!(r.hints, vec!["shard-1: x"]);
    }
}
