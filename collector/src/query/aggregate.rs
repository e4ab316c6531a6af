//! `Summarize`, `XidGroups` and `Processes`: aggregations over a window, computed on the store
//! in one pass (each event decoded once and dropped), so no client pages events to count them.
//! Each reads at most [`MAX_READ`] matching events, oldest first, and caps every list it returns.
use std::collections::{BTreeMap, HashMap};

use gpulse_proto::{
    v1::{
        self, EventKind, Incident, KindCount, ProcessInfo, ProcessState, ProcessesRequest,
        ProcessesResponse, SummarizeRequest, SummarizeResponse, XidCount, XidGroup, XidGrouping,
        XidGroupsRequest, XidGroupsResponse, event::Payload,
    },
    window,
};

use super::{HOUR_NS, QueryError, bounded, window_notes, wire_enum, wire_value};
use crate::store::events::{EventStore, Order, event_ms};
use gpulse_proto::answer::{MAX_XID_CODES, ranked_codes, top_nodes};
use gpulse_proto::filter::Filter;

/// Matching events one aggregation reads at most (its work bound per request).
pub const MAX_READ: usize = 20_000;
/// Quiet time that separates two XID incidents on one GPU.
const INCIDENT_QUIET_MS: i64 = 5 * 60_000;
const NOTABLE: usize = 10;
const INCIDENTS: usize = 20;
/// GPUs and nodes listed per XID group.
const GROUP_MEMBERS: usize = 10;
const DEFAULT_PROCESSES: u32 = 100;
const MAX_PROCESSES: u32 = 1000;
const DAY_NS: i128 = 24 * HOUR_NS;

/// The GPU an event is about, for grouping: UUID, else PCI address, else "unknown GPU".
pub fn gpu_key(ev: &v1::Event) -> String {
    let [uuid, pci] = ev.gpu_keys();
    if !uuid.is_empty() {
        uuid.to_string()
    } else if !pci.is_empty() {
        pci.to_string()
    } else {
        "unknown GPU".to_string()
    }
}

/// Matching events of a window, oldest first, visited one at a time: (resolved window, hints,
/// total matched, truncated).
fn each(
    store: &EventStore,
    tw: Option<v1::TimeWindow>,
    filter: Filter,
    default_span_ns: i128,
    now_ns: i128,
    visit: impl FnMut(v1::Event),
) -> Result<(v1::ResolvedWindow, Vec<String>, u64, bool), QueryError> {
    let tw = tw.unwrap_or_default();
    let w = window::resolve(&tw.since, &tw.until, now_ns, default_span_ns)?;
    let lanes = filter.lanes();
    let (total, more, _) = store.window_each(
        w.start_ms(),
        w.end_ms(),
        &lanes,
        Order::OldestFirst,
        None,
        MAX_READ,
        |e| filter.matches(e),
        visit,
    );
    let (resolved, hints) = window_notes(store, &w, &lanes, total);
    Ok((resolved, hints, total, more))
}

/// Every kind but GPU samples when the filter names none.
fn events_by_default(mut f: v1::EventFilter) -> v1::EventFilter {
    if f.kinds.is_empty() {
        f.kinds = EventKind::EVENTS.iter().map(|k| *k as i32).collect();
    }
    f
}

pub fn summarize(
    store: &EventStore,
    req: SummarizeRequest,
    now_ns: i128,
) -> Result<SummarizeResponse, QueryError> {
    let filter = Filter::from_wire(Some(events_by_default(req.filter.unwrap_or_default())))?;
    let mut s = Summary::default();
    let (window, hints, total, truncated) =
        each(store, req.window, filter, HOUR_NS, now_ns, |e| s.add(e))?;
    Ok(s.finish(SummarizeResponse {
        window: Some(window),
        total_matched: total,
        truncated,
        hints,
        ..Default::default()
    }))
}

#[derive(Default)]
struct Summary {
    read: u64,
    kinds: BTreeMap<i32, u64>,
    starts: u64,
    exits: u64,
    nodes: HashMap<String, (u64, u64)>,
    xids: HashMap<u32, u64>,
    /// (severity, cursor, event): the most severe, newest kept.
    notable: Vec<(i32, u64, v1::Event)>,
    incidents: Incidents,
}

impl Summary {
    fn add(&mut self, e: v1::Event) {
        self.read += 1;
        *self.kinds.entry(e.kind).or_default() += 1;
        let severe = e.severity >= v1::Severity::Error as i32;
        let n = match self.nodes.get_mut(&e.node) {
            Some(n) => n,
            None => self.nodes.entry(e.node.clone()).or_default(),
        };
        n.0 += 1;
        n.1 += u64::from(severe);
        match &e.payload {
            Some(Payload::Xid(x)) => *self.xids.entry(x.code).or_default() += x.records(),
            Some(Payload::GpuProcess(p)) if p.r#type == v1::ProcessEventType::Exit as i32 => {
                self.exits += 1
            }
            Some(Payload::GpuProcess(_)) => self.starts += 1,
            _ => {}
        }
        self.incidents.add(&e);
        if severe || matches!(e.payload, Some(Payload::Gap(_) | Payload::Sxid(_))) {
            self.notable.push((e.severity, e.cursor, e));
            if self.notable.len() >= 4 * NOTABLE {
                self.trim_notable();
            }
        }
    }

    fn trim_notable(&mut self) {
        self.notable
            .sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        self.notable.truncate(NOTABLE);
    }

    fn finish(mut self, mut out: SummarizeResponse) -> SummarizeResponse {
        self.trim_notable();
        out.summarized = self.read;
        out.kinds = self
            .kinds
            .into_iter()
            .map(|(kind, count)| KindCount { kind, count })
            .collect();
        out.process_starts = self.starts;
        out.process_exits = self.exits;
        out.top_nodes = top_nodes(self.nodes);
        out.xids = ranked_codes(self.xids, MAX_XID_CODES);
        out.notable = self.notable.into_iter().map(|n| n.2).collect();
        let incidents = self.incidents.finish();
        out.incidents_total = incidents.len() as u32;
        out.incidents = incidents.into_iter().take(INCIDENTS).collect();
        out
    }
}

/// XID bursts per GPU. Events arrive oldest first by cursor; each GPU's are ordered by time at
/// the end (an agent's clock and the store's order can disagree by a little).
#[derive(Default)]
struct Incidents {
    by_gpu: BTreeMap<(String, String), Vec<XidMark>>,
}

struct XidMark {
    ms: i64,
    cursor: u64,
    code: u32,
    caused_by: Option<u32>,
    severity: i32,
    time: Option<prost_types::Timestamp>,
}

impl Incidents {
    fn add(&mut self, e: &v1::Event) {
        let Some(Payload::Xid(x)) = &e.payload else {
            return;
        };
        self.by_gpu
            .entry((e.node.clone(), gpu_key(e)))
            .or_default()
            .push(XidMark {
                ms: event_ms(e),
                cursor: e.cursor,
                code: x.code,
                caused_by: x.caused_by,
                severity: e.severity,
                time: e.time.or(e.received),
            });
    }

    /// Every incident, newest first.
    fn finish(self) -> Vec<Incident> {
        let mut out = Vec::new();
        for ((node, gpu), mut marks) in self.by_gpu {
            marks.sort_by_key(|m| (m.ms, m.cursor));
            let mut start = 0;
            for i in 1..=marks.len() {
                if i == marks.len() || marks[i].ms - marks[i - 1].ms > INCIDENT_QUIET_MS {
                    out.push(incident(&node, &gpu, &marks[start..i]));
                    start = i;
                }
            }
        }
        // Stable: equal starts keep (node, GPU) order.
        out.sort_by(|a, b| {
            let t = |i: &Incident| i.start.map(|t| (t.seconds, t.nanos));
            t(b).cmp(&t(a))
        });
        out
    }
}

fn incident(node: &str, gpu: &str, burst: &[XidMark]) -> Incident {
    let mut codes: Vec<u32> = Vec::new();
    for m in burst {
        if !codes.contains(&m.code) {
            codes.push(m.code);
        }
    }
    Incident {
        node: node.to_string(),
        gpu: gpu.to_string(),
        start: burst[0].time,
        end: burst[burst.len() - 1].time,
        xid_count: burst.len() as u64,
        // A code another XID names as its cause started it; else the first one.
        root_cause: burst
            .iter()
            .find_map(|m| m.caused_by)
            .unwrap_or(burst[0].code),
        severity: burst.iter().map(|m| m.severity).max().unwrap_or(0),
        codes,
    }
}

pub fn xid_groups(
    store: &EventStore,
    req: XidGroupsRequest,
    now_ns: i128,
) -> Result<XidGroupsResponse, QueryError> {
    let top = bounded("top", req.top, 20, 100, "1..=100 (0 = 20)")? as usize;
    let by = wire_enum(
        "group_by",
        req.group_by,
        XidGrouping::Code,
        "0-3 (unspecified, code, gpu, node)",
    )?;
    let filter = Filter::from_wire(Some(v1::EventFilter {
        nodes: req.nodes,
        kinds: vec![EventKind::Xid as i32],
        ..Default::default()
    }))?;
    let mut groups: HashMap<String, XidGroup> = HashMap::new();
    let mut read = 0u64;
    let (window, hints, total, truncated) = each(store, req.window, filter, DAY_NS, now_ns, |e| {
        read += 1;
        add_to_group(&mut groups, by, &e);
    })?;
    let mut list: Vec<XidGroup> = groups.into_values().collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
    let other_count = list.iter().skip(top).map(|g| g.count).sum();
    list.truncate(top);
    Ok(XidGroupsResponse {
        window: Some(window),
        total_matched: total,
        grouped: read,
        truncated,
        groups: list,
        other_count,
        hints,
        partial: Default::default(),
        upstreams: Default::default(),
    })
}

fn add_to_group(groups: &mut HashMap<String, XidGroup>, by: XidGrouping, e: &v1::Event) {
    let Some(Payload::Xid(x)) = &e.payload else {
        return;
    };
    let gpu = format!("{}:{}", e.node, gpu_key(e));
    let key = match by {
        XidGrouping::Gpu => gpu.clone(),
        XidGrouping::Node => e.node.clone(),
        XidGrouping::Code | XidGrouping::Unspecified => x.code.to_string(),
    };
    let time = e.time.or(e.received);
    let g = groups.entry(key.clone()).or_insert_with(|| XidGroup {
        key,
        first_seen: time,
        ..Default::default()
    });
    // Records, not events: a storm summary counts every record it stands for.
    let n = x.records();
    g.count += n;
    g.severity = g.severity.max(e.severity);
    g.last_seen = time;
    match g.codes.binary_search_by_key(&x.code, |c| c.code) {
        Ok(i) => g.codes[i].count += n,
        Err(i) => g.codes.insert(
            i,
            XidCount {
                code: x.code,
                count: n,
            },
        ),
    }
    if g.gpus.len() < GROUP_MEMBERS && !g.gpus.contains(&gpu) {
        g.gpus.push(gpu);
    }
    if g.nodes.len() < GROUP_MEMBERS && !g.nodes.contains(&e.node) {
        g.nodes.push(e.node.clone());
    }
}

pub fn processes(
    store: &EventStore,
    req: ProcessesRequest,
    now_ns: i128,
) -> Result<ProcessesResponse, QueryError> {
    let limit = bounded(
        "limit",
        req.limit,
        DEFAULT_PROCESSES,
        MAX_PROCESSES,
        "1..=1000 (0 = 100)",
    )? as usize;
    let state: ProcessState = wire_value("state", req.state, "0-2 (all, running, exited)")?;
    let filter = Filter::from_wire(Some(v1::EventFilter {
        nodes: req.nodes,
        kinds: vec![EventKind::GpuProcess as i32],
        ..Default::default()
    }))?;
    let mut table = ProcessTable::default();
    let (window, hints, _, truncated) = each(store, req.window, filter, HOUR_NS, now_ns, |e| {
        table.add(&e)
    })?;
    let device = req.device.to_ascii_lowercase();
    let rows: Vec<ProcessInfo> = table
        .rows
        .into_iter()
        .rev()
        .filter(|p| match state {
            ProcessState::Running => p.running,
            ProcessState::Exited => !p.running,
            ProcessState::Unspecified => true,
        })
        .filter(|p| device.is_empty() || p.devices.iter().any(|d| d.to_ascii_lowercase() == device))
        .collect();
    Ok(ProcessesResponse {
        window: Some(window),
        total_matched: rows.len() as u64,
        processes: rows
            .into_iter()
            .skip(req.offset as usize)
            .take(limit)
            .collect(),
        truncated,
        hints,
        partial: Default::default(),
        upstreams: Default::default(),
    })
}

/// Process lifetimes from GPU process events, oldest first: a new row per (node, pid) unless
/// that pid's latest row is still running.
#[derive(Default)]
struct ProcessTable {
    rows: Vec<ProcessInfo>,
    latest: HashMap<(String, u32), usize>,
}

impl ProcessTable {
    fn add(&mut self, e: &v1::Event) {
        let Some(Payload::GpuProcess(p)) = &e.payload else {
            return;
        };
        let pid = if p.tgid > 0 { p.tgid } else { p.pid };
        let key = (e.node.clone(), pid);
        let idx = match self.latest.get(&key) {
            Some(i) if self.rows[*i].running => *i,
            _ => {
                self.rows.push(ProcessInfo {
                    node: e.node.clone(),
                    pid,
                    name: p.comm.clone(),
                    exe: p.exe.clone(),
                    started: p.start_time.or(e.time),
                    running: true,
                    pod: p.pod.clone(),
                    ..Default::default()
                });
                self.latest.insert(key, self.rows.len() - 1);
                self.rows.len() - 1
            }
        };
        let r = &mut self.rows[idx];
        for d in p.devices.iter().chain(std::iter::once(&p.device)) {
            if !d.is_empty() && !r.devices.contains(d) {
                r.devices.push(d.clone());
            }
        }
        if !p.comm.is_empty() {
            r.name.clone_from(&p.comm);
        }
        if r.pod.is_none() {
            r.pod.clone_from(&p.pod);
        }
        if p.r#type == v1::ProcessEventType::Exit as i32 {
            r.running = false;
            r.ended = p.end_time.or(e.time);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use gpulse_proto::{time as ptime, v1::TimeWindow};
    use prost::Message;

    use super::*;
    use crate::store::events::Origin;

    const NOW_MS: i64 = 1_764_000_000_000;
    const NOW_NS: i128 = NOW_MS as i128 * 1_000_000;

    struct Data(EventStore);

    impl Data {
        fn new() -> Self {
            Self(EventStore::new(16 << 20, 1))
        }

        /// An event `secs_ago` seconds before now on `node`.
        fn push(&mut self, node: &str, secs_ago: i64, sev: v1::Severity, payload: Payload) {
            let kind = match &payload {
                Payload::Xid(_) => EventKind::Xid,
                Payload::Gap(_) => EventKind::Gap,
                Payload::GpuProcess(_) => EventKind::GpuProcess,
                Payload::GpuSample(_) => EventKind::GpuSample,
                _ => EventKind::DriverLog,
            };
            let ev = v1::Event {
                node: node.into(),
                kind: kind as i32,
                severity: sev as i32,
                time: Some(ptime::from_unix_nanos(
                    i128::from(NOW_MS - secs_ago * 1000) * 1_000_000,
                )),
                payload: Some(payload),
                ..Default::default()
            };
            let origin = Arc::new(Origin {
                node: node.into(),
                agent_id: format!("{node}/a"),
            });
            self.0.push(&ev, &ev.encode_to_vec(), &origin);
        }

        fn xid(&mut self, node: &str, gpu: &str, code: u32, secs_ago: i64, caused_by: Option<u32>) {
            let sev = gpulse_xid::catalog::lookup(code)
                .map_or(v1::Severity::Error, |i| i.severity.into());
            self.push(
                node,
                secs_ago,
                sev,
                Payload::Xid(v1::Xid {
                    code,
                    gpu_uuid: gpu.into(),
                    caused_by,
                    ..Default::default()
                }),
            );
        }

        fn process(&mut self, node: &str, pid: u32, exit: bool, device: &str, secs_ago: i64) {
            self.push(
                node,
                secs_ago,
                v1::Severity::Info,
                Payload::GpuProcess(v1::GpuProcess {
                    r#type: if exit {
                        v1::ProcessEventType::Exit
                    } else {
                        v1::ProcessEventType::DeviceOpen
                    } as i32,
                    tgid: pid,
                    pid,
                    comm: format!("p{pid}"),
                    device: device.into(),
                    ..Default::default()
                }),
            );
        }
    }

    fn last_hour() -> Option<TimeWindow> {
        Some(TimeWindow {
            since: "1h".into(),
            until: String::new(),
        })
    }

    fn fleet() -> Data {
        let mut d = Data::new();
        // GPU-0 of n1: a burst (119 caused 154), then a second burst 10 minutes later.
        d.xid("n1", "GPU-0", 154, 1200, Some(119));
        d.xid("n1", "GPU-0", 119, 1190, None);
        d.xid("n1", "GPU-0", 79, 500, None);
        d.xid("n2", "GPU-9", 79, 400, None);
        d.xid("n2", "GPU-9", 79, 7200, None); // outside the hour
        d.push(
            "n2",
            300,
            v1::Severity::Warning,
            Payload::Gap(v1::Gap::default()),
        );
        d.push(
            "n3",
            200,
            v1::Severity::Info,
            Payload::GpuSample(v1::GpuSample::default()),
        );
        d.process("n1", 42, false, "/dev/nvidia0", 900);
        d.process("n1", 42, true, "/dev/nvidia0", 800);
        d.process("n1", 42, false, "/dev/nvidia1", 700); // pid reused: a new lifetime
        d.process("n2", 7, false, "/dev/nvidia3", 600);
        d
    }

    #[test]
    fn summary_counts_ranks_and_finds_incidents() {
        let d = fleet();
        let s = summarize(
            &d.0,
            SummarizeRequest {
                window: last_hour(),
                filter: None,
            },
            NOW_NS,
        )
        .unwrap();
        assert_eq!(s.total_matched, 9, "every kind but samples, in the hour");
        assert_eq!(s.summarized, 9);
        assert!(!s.truncated);
        let count = |k: EventKind| {
            s.kinds
                .iter()
                .find(|c| c.kind == k as i32)
                .map_or(0, |c| c.count)
        };
        assert_eq!(count(EventKind::Xid), 4);
        assert_eq!(count(EventKind::GpuSample), 0);
        assert_eq!((s.process_starts, s.process_exits), (3, 1));
        assert_eq!(s.top_nodes[0].node, "n1");
        assert_eq!(s.top_nodes[0].severe, 2, "XID 154 is informational");
        assert_eq!(s.xids[0], XidCount { code: 79, count: 2 });
        assert_eq!(s.incidents_total, 3);
        let gpu0: Vec<&Incident> = s.incidents.iter().filter(|i| i.gpu == "GPU-0").collect();
        assert_eq!(gpu0.len(), 2, "10 quiet minutes split the GPU's XIDs");
        let first = gpu0.iter().find(|i| i.xid_count == 2).unwrap();
        assert_eq!(first.root_cause, 119, "154 names 119 as its cause");
        assert_eq!(first.codes, vec![154, 119]);
        let secs = |i: &Incident| i.start.unwrap().seconds;
        assert!(
            secs(&s.incidents[0]) >= secs(&s.incidents[1]),
            "newest first"
        );
        assert_eq!(s.notable.len(), 4, "3 XIDs (error or worse) and the gap");
        assert_eq!(s.notable[0].severity, v1::Severity::Fatal as i32);
    }

    #[test]
    fn summary_reads_at_most_its_bound_and_says_so() {
        let mut d = Data::new();
        for i in 0..(MAX_READ as i64 + 5) {
            d.push(
                "n1",
                1000 - i / 100,
                v1::Severity::Info,
                Payload::DriverLog(v1::DriverLog::default()),
            );
        }
        let s = summarize(
            &d.0,
            SummarizeRequest {
                window: last_hour(),
                filter: None,
            },
            NOW_NS,
        )
        .unwrap();
        assert_eq!(s.total_matched, MAX_READ as u64 + 5);
        assert_eq!(s.summarized, MAX_READ as u64);
        assert!(s.truncated);
        let bad = summarize(
            &d.0,
            SummarizeRequest {
                window: Some(TimeWindow {
                    since: "yesterday".into(),
                    until: String::new(),
                }),
                filter: None,
            },
            NOW_NS,
        );
        assert!(matches!(bad, Err(QueryError::Window(_))));
    }

    #[test]
    fn xid_groups_by_code_gpu_and_node() {
        let d = fleet();
        let req = |by: XidGrouping, top: u32| XidGroupsRequest {
            window: last_hour(),
            nodes: vec![],
            group_by: by as i32,
            top,
        };
        let by_code = xid_groups(&d.0, req(XidGrouping::Unspecified, 0), NOW_NS).unwrap();
        assert_eq!(by_code.total_matched, 4);
        assert_eq!(by_code.groups[0].key, "79");
        assert_eq!(by_code.groups[0].count, 2);
        assert_eq!(by_code.groups[0].nodes, vec!["n1", "n2"]);
        let by_gpu = xid_groups(&d.0, req(XidGrouping::Gpu, 1), NOW_NS).unwrap();
        assert_eq!(by_gpu.groups.len(), 1);
        assert_eq!(by_gpu.groups[0].key, "n1:GPU-0");
        assert_eq!(
            by_gpu.groups[0].codes,
            vec![
                XidCount { code: 79, count: 1 },
                XidCount {
                    code: 119,
                    count: 1
                },
                XidCount {
                    code: 154,
                    count: 1
                }
            ]
        );
        assert_eq!(by_gpu.other_count, 1, "n2's XID past top");
        let mut only_n2 = req(XidGrouping::Node, 0);
        only_n2.nodes = vec!["n2".into()];
        let r = xid_groups(&d.0, only_n2, NOW_NS).unwrap();
        assert_eq!(r.groups.len(), 1);
        assert_eq!(r.groups[0].key, "n2");
        assert!(xid_groups(&d.0, req(XidGrouping::Code, 101), NOW_NS).is_err());
        let mut bad = req(XidGrouping::Code, 0);
        bad.group_by = 9;
        assert!(xid_groups(&d.0, bad, NOW_NS).is_err());
    }

    #[test]
    fn processes_pair_opens_with_exits() {
        let d = fleet();
        let req = |state: ProcessState, device: &str| ProcessesRequest {
            window: last_hour(),
            nodes: vec![],
            state: state as i32,
            device: device.into(),
            offset: 0,
            limit: 0,
        };
        let all = processes(&d.0, req(ProcessState::Unspecified, ""), NOW_NS).unwrap();
        assert_eq!(
            all.total_matched, 3,
            "pid 42 twice (reused after exit), pid 7"
        );
        assert_eq!(all.processes[0].pid, 7, "latest started first");
        let running = processes(&d.0, req(ProcessState::Running, ""), NOW_NS).unwrap();
        assert_eq!(running.total_matched, 2);
        let exited = processes(&d.0, req(ProcessState::Exited, "/DEV/NVIDIA0"), NOW_NS).unwrap();
        assert_eq!(exited.total_matched, 1);
        assert_eq!(exited.processes[0].devices, vec!["/dev/nvidia0"]);
        assert!(exited.processes[0].ended.is_some());
        let mut paged = req(ProcessState::Unspecified, "");
        paged.offset = 2;
        paged.limit = 5;
        let r = processes(&d.0, paged, NOW_NS).unwrap();
        assert_eq!((r.processes.len(), r.total_matched), (1, 3));
        let mut big = req(ProcessState::Unspecified, "");
        big.limit = 1001;
        assert!(processes(&d.0, big, NOW_NS).is_err());
    }
}
