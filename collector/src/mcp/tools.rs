//! The MCP tools. All read-only; each answers from the collector's windowed queries and returns
//! typed structured content, or an `isError` result whose text says how to fix the call.
use std::collections::{BTreeMap, HashMap};

use gpulse_proto::{
    names::ShortName,
    time as ptime,
    v1::{
        self, Aggregation, EventFilter, EventKind, GroupBy, ListEventsRequest, Order,
        ProcessEventType, TimeWindow, TrendRequest, event::Payload,
    },
};
use gpulse_xid::catalog;
use rmcp::{
    Json,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    tool, tool_router,
};

use super::{GpulseMcp, backend::BackendError, types::*};

/// Largest structured result; past it the longest list is cut and `truncated` set.
pub const MAX_RESULT_BYTES: usize = 64 << 10;
/// Events an aggregate tool reads at most.
const MAX_SCAN: usize = 20_000;

fn ts(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(ptime::rfc3339)
}

fn bad(e: BackendError) -> String {
    match e {
        BackendError::BadRequest(m) => format!("invalid argument: {m}"),
        BackendError::Unavailable(m) => {
            format!("the collector could not answer ({m}); retry shortly")
        }
    }
}

fn window_of(w: &Option<v1::ResolvedWindow>, defaulted: bool) -> Window {
    let w = (*w).unwrap_or_default();
    Window {
        start: ts(&w.start).unwrap_or_default(),
        end: ts(&w.end).unwrap_or_default(),
        window_defaulted: defaulted || w.defaulted,
        oldest_data: ts(&w.oldest_data),
        partial: w.partial,
    }
}

/// The window to ask for: `since` or the tool's default.
fn tw(since: &str, until: &str, default: &str) -> (TimeWindow, bool) {
    let defaulted = since.trim().is_empty();
    (
        TimeWindow {
            since: if defaulted {
                default.into()
            } else {
                since.into()
            },
            until: until.into(),
        },
        defaulted,
    )
}

pub fn kind_of(k: Kind) -> EventKind {
    match k {
        Kind::Xid => EventKind::Xid,
        Kind::Sxid => EventKind::Sxid,
        Kind::DriverLog => EventKind::DriverLog,
        Kind::AgentStatus => EventKind::AgentStatus,
        Kind::Gap => EventKind::Gap,
        Kind::GpuProcess => EventKind::GpuProcess,
        Kind::GpuSample => EventKind::GpuSample,
        Kind::Unknown => EventKind::Unknown,
    }
}

/// Requested kinds, or every kind but samples.
fn kinds(k: &[Kind]) -> Vec<i32> {
    if k.is_empty() {
        EventKind::EVENTS.iter().map(|k| *k as i32).collect()
    } else {
        k.iter().map(|k| kind_of(*k) as i32).collect()
    }
}

fn sev_name(s: i32) -> String {
    v1::Severity::try_from(s)
        .unwrap_or_default()
        .short_name()
        .to_string()
}

fn limit(v: Option<u32>, default: u32, max: u32) -> Result<u32, String> {
    match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(format!(
            "limit {n} is out of range: use 1-{max} (default {default})"
        )),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('…');
        c
    }
}

fn pod_name(p: &Option<v1::PodRef>) -> Option<String> {
    p.as_ref().map(|p| format!("{}/{}", p.namespace, p.name))
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn row(ev: &v1::Event) -> EventRow {
    let mut r = EventRow {
        ts: ts(&ev.time.or(ev.received)).unwrap_or_default(),
        node: ev.node.clone(),
        kind: EventKind::try_from(ev.kind)
            .unwrap_or_default()
            .short_name()
            .to_string(),
        severity: sev_name(ev.severity),
        gpu_uuid: None,
        gpu_pci: None,
        xid: None,
        xid_name: None,
        pid: None,
        process: None,
        pod: None,
        message: String::new(),
        cursor: ev.cursor,
    };
    match &ev.payload {
        Some(Payload::Xid(x)) => {
            r.gpu_uuid = opt(&x.gpu_uuid);
            r.gpu_pci = opt(&x.pci);
            r.xid = Some(x.code);
            r.xid_name = opt(&x.mnemonic);
            r.pid = x.pid;
            r.process = opt(&x.process_name);
            r.pod = pod_name(&x.pod);
            r.message = clip(&x.message, 200);
        }
        Some(Payload::Sxid(x)) => {
            r.gpu_pci = opt(&x.pci);
            r.message = clip(&format!("SXid {}: {}", x.code, x.message), 200);
        }
        Some(Payload::DriverLog(d)) => {
            r.gpu_uuid = opt(&d.gpu_uuid);
            r.gpu_pci = opt(&d.pci);
            r.message = clip(&d.text, 200);
        }
        Some(Payload::GpuProcess(p)) => {
            r.pid = Some(p.tgid.max(p.pid));
            r.process = opt(&p.comm);
            r.pod = pod_name(&p.pod);
            let what = ProcessEventType::try_from(p.r#type)
                .map(|t| {
                    t.as_str_name()
                        .trim_start_matches("PROCESS_EVENT_TYPE_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            r.message = clip(&format!("{what} {} {}", p.comm, p.device), 200);
        }
        Some(Payload::AgentStatus(a)) => {
            r.message = clip(&format!("agent: source {} {}", a.xid_source, a.detail), 200);
        }
        Some(Payload::Gap(g)) => {
            r.message = clip(&format!("{} events lost: {}", g.missed, g.detail), 200);
        }
        Some(Payload::GpuSample(g)) => {
            r.gpu_uuid = opt(&g.uuid);
            r.gpu_pci = opt(&g.pci);
            r.message = format!("sample GPU {} util {:?}%", g.index, g.gpu_util_pct);
        }
        None => {}
    }
    r
}

/// Cuts `list` until the serialised result fits in [`MAX_RESULT_BYTES`].
fn fit<T: serde::Serialize>(
    out: &mut T,
    list: impl Fn(&mut T) -> usize,
    cut: impl Fn(&mut T, usize),
) -> Option<String> {
    let size = |o: &T| serde_json::to_vec(o).map_or(0, |v| v.len());
    let mut n = list(out);
    let mut cutted = false;
    while size(out) > MAX_RESULT_BYTES && n > 0 {
        n -= (n / 8).max(1);
        cut(out, n);
        cutted = true;
    }
    cutted.then(|| {
        format!(
            "result cut to {n} items to stay under {} KiB",
            MAX_RESULT_BYTES >> 10
        )
    })
}

/// Offset cursors for lists built here: `o1.<offset>`.
fn offset_cursor(c: &str) -> Result<usize, String> {
    if c.is_empty() {
        return Ok(0);
    }
    c.strip_prefix("o1.")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "cursor is not one this tool returned; call again without it".to_string())
}

fn gpu_key(ev: &v1::Event) -> String {
    let [uuid, pci] = ev.gpu_keys();
    if !uuid.is_empty() {
        uuid.to_string()
    } else if !pci.is_empty() {
        pci.to_string()
    } else {
        "unknown GPU".to_string()
    }
}

fn xid_name(code: u32) -> String {
    catalog::lookup(code).map_or_else(
        || format!("XID {code} (not in the catalog)"),
        |i| i.mnemonic.to_string(),
    )
}

fn recommended(code: u32) -> String {
    match catalog::lookup(code) {
        Some(i) if !i.immediate_action.is_empty() => format!(
            "{}{}",
            i.immediate_action,
            if i.investigatory_action.is_empty() {
                String::new()
            } else {
                format!("; investigate: {}", i.investigatory_action)
            }
        ),
        Some(_) => "no action in NVIDIA's catalog; watch for repeats".to_string(),
        None => "not in the catalog: check NVIDIA's Xid documentation for this driver".to_string(),
    }
}

/// Groups each GPU's XIDs into bursts separated by quiet gaps.
pub fn incidents(events: &[v1::Event], quiet_ms: i64) -> Vec<Incident> {
    let mut by_gpu: BTreeMap<(String, String), Vec<&v1::Event>> = BTreeMap::new();
    for e in events {
        if matches!(e.payload, Some(Payload::Xid(_))) {
            by_gpu
                .entry((e.node.clone(), gpu_key(e)))
                .or_default()
                .push(e);
        }
    }
    let ms = |e: &v1::Event| crate::store::events::event_ms(e);
    let mut out = Vec::new();
    for ((node, gpu), mut evs) in by_gpu {
        evs.sort_by_key(|e| (ms(e), e.cursor));
        let mut burst: Vec<&v1::Event> = Vec::new();
        let mut flush = |burst: &mut Vec<&v1::Event>| {
            if burst.is_empty() {
                return;
            }
            let xids: Vec<&v1::Xid> = burst
                .iter()
                .filter_map(|e| match &e.payload {
                    Some(Payload::Xid(x)) => Some(x),
                    _ => None,
                })
                .collect();
            let mut codes: Vec<u32> = Vec::new();
            for x in &xids {
                if !codes.contains(&x.code) {
                    codes.push(x.code);
                }
            }
            // A code another XID names as its cause started it; else the first one.
            let root = xids
                .iter()
                .find_map(|x| x.caused_by)
                .unwrap_or(xids[0].code);
            let worst = burst.iter().map(|e| e.severity).max().unwrap_or(0);
            let first = burst[0];
            let last = burst[burst.len() - 1];
            out.push(Incident {
                node: node.clone(),
                gpu: gpu.clone(),
                start: ts(&first.time.or(first.received)).unwrap_or_default(),
                end: ts(&last.time.or(last.received)).unwrap_or_default(),
                xid_count: burst.len() as u64,
                xids: codes.clone(),
                root_cause_xid: root,
                root_cause_name: xid_name(root),
                severity: sev_name(worst),
                summary: format!(
                    "{node} {gpu}: {} XID(s) {:?} starting with {} ({})",
                    burst.len(),
                    codes,
                    root,
                    xid_name(root)
                ),
            });
            burst.clear();
        };
        for e in evs {
            if burst.last().is_some_and(|l| ms(e) - ms(l) > quiet_ms) {
                flush(&mut burst);
            }
            burst.push(e);
        }
        flush(&mut burst);
    }
    out.sort_by(|a, b| b.start.cmp(&a.start));
    out
}

/// GPU processes seen in the events: one row per (node, pid, start), latest first.
pub fn processes(events: &[v1::Event]) -> Vec<ProcessRow> {
    let mut rows: Vec<ProcessRow> = Vec::new();
    let mut open: HashMap<(String, u32), usize> = HashMap::new();
    for e in events {
        let Some(Payload::GpuProcess(p)) = &e.payload else {
            continue;
        };
        let pid = if p.tgid > 0 { p.tgid } else { p.pid };
        let key = (e.node.clone(), pid);
        let t = ProcessEventType::try_from(p.r#type).unwrap_or_default();
        let idx = match open.get(&key) {
            Some(i) if rows[*i].running => *i,
            _ => {
                rows.push(ProcessRow {
                    node: e.node.clone(),
                    pid,
                    name: p.comm.clone(),
                    exe: opt(&p.exe),
                    devices: Vec::new(),
                    started: ts(&p.start_time).or_else(|| ts(&e.time)),
                    ended: None,
                    running: true,
                    pod: pod_name(&p.pod),
                    gpu_mem_bytes: None,
                });
                open.insert(key, rows.len() - 1);
                rows.len() - 1
            }
        };
        let r = &mut rows[idx];
        for d in p.devices.iter().chain(std::iter::once(&p.device)) {
            if !d.is_empty() && !r.devices.contains(d) {
                r.devices.push(d.clone());
            }
        }
        if !p.comm.is_empty() {
            r.name.clone_from(&p.comm);
        }
        if r.pod.is_none() {
            r.pod = pod_name(&p.pod);
        }
        if t == ProcessEventType::Exit {
            r.running = false;
            r.ended = ts(&p.end_time).or_else(|| ts(&e.time));
        }
    }
    rows.reverse();
    rows
}

fn node_health(n: &v1::NodeInfo) -> &'static str {
    if n.critical_xid_count > 0 {
        "critical"
    } else if n.xid_count > 0 || n.connected_agents.is_empty() {
        "warning"
    } else {
        "ok"
    }
}

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

/// Closest names to `want` (by shared prefix, then length difference), for "did you mean".
fn nearest(want: &str, names: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, usize, &String)> = names
        .iter()
        .map(|n| {
            let common = n
                .chars()
                .zip(want.chars())
                .take_while(|(a, b)| a == b)
                .count();
            (usize::MAX - common, n.len().abs_diff(want.len()), n)
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(5)
        .map(|(_, _, n)| n.clone())
        .collect()
}

#[tool_router(router = tool_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// What the collector holds and how fresh it is: agents connected, nodes, store use per event
    /// kind, sample history tiers with their oldest data, drops. Call first to know how far back
    /// questions can reach.
    #[tool(
        name = "collector_status",
        annotations(
            title = "Collector status",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn collector_status(&self) -> Result<Json<CollectorStatus>, String> {
        let s = self.backend.status().await.map_err(bad)?;
        let nodes = self.backend.nodes(None).await.map_err(bad)?;
        let mut hints = Vec::new();
        if s.agents_connected == 0 {
            hints.push("no agent is connected: data is not being refreshed".to_string());
        }
        let oldest = s
            .kinds
            .iter()
            .filter_map(|k| k.oldest)
            .min_by_key(|t| (t.seconds, t.nanos));
        Ok(Json(CollectorStatus {
            server_time: ptime::rfc3339(&ptime::now()),
            version: s.version.clone(),
            started: ts(&s.started),
            agents_connected: s.agents_connected,
            nodes_known: nodes.nodes.len() as u32,
            gpus_tracked: s.gpus_tracked,
            ring: RingUse {
                capacity_bytes: s.ring_budget_bytes,
                used_bytes: s.ring_bytes,
                events: s.events_stored,
                oldest: ts(&oldest),
                newest_cursor: s.last_cursor,
            },
            kinds: s
                .kinds
                .iter()
                .map(|k| KindUse {
                    kind: EventKind::try_from(k.kind)
                        .unwrap_or_default()
                        .short_name()
                        .to_string(),
                    bytes: k.bytes,
                    share_bytes: k.share_bytes,
                    events: k.events,
                    expired: k.expired,
                    oldest: ts(&k.oldest),
                })
                .collect(),
            history_tiers: s
                .tiers
                .iter()
                .map(|t| TierUse {
                    tier: match t.resolution_seconds {
                        0 => "raw",
                        60 => "1m",
                        _ => "1h",
                    }
                    .to_string(),
                    resolution_s: t.resolution_seconds,
                    bytes: t.bytes,
                    budget_bytes: t.budget_bytes,
                    expired: t.expired,
                    oldest: ts(&t.oldest),
                })
                .collect(),
            dropped_events: DroppedEvents {
                expired: s.events_expired,
                duplicates: s.duplicates_dropped,
                samples_out_of_order: s.samples_out_of_order,
                samples_gpus_refused: s.samples_gpus_refused,
            },
            hints,
        }))
    }

    /// Nodes and their GPUs, with health over a window: XID counts, connection, GPU models,
    /// average utilisation. `only_unhealthy` narrows to nodes that need attention.
    #[tool(
        name = "list_nodes",
        annotations(
            title = "List nodes",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_nodes(
        &self,
        Parameters(a): Parameters<ListNodesArgs>,
    ) -> Result<Json<ListNodes>, String> {
        let limit = limit(a.limit, 50, 500)? as usize;
        let offset = offset_cursor(&a.cursor)?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let r = self.backend.nodes(Some(w)).await.map_err(bad)?;
        let mut rows: Vec<NodeRow> = r
            .nodes
            .iter()
            .filter(|n| a.node_match.is_empty() || glob_match(&a.node_match, &n.node))
            .filter(|n| !a.only_unhealthy || node_health(n) != "ok")
            .map(|n| {
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
                    util_avg_pct: (!utils.is_empty())
                        .then(|| utils.iter().sum::<f64>() / utils.len() as f64),
                    health: node_health(n).to_string(),
                    xid_source: n.xid_source.clone(),
                }
            })
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
        let page: Vec<NodeRow> = rows.drain(..).skip(offset).take(limit).collect();
        let next = (offset + page.len() < total).then(|| format!("o1.{}", offset + page.len()));
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

    /// "What happened in the last hour?": counts per kind, the busiest nodes and XIDs, notable
    /// one-liners, and XID incidents per GPU with the XID that started each. The first call to
    /// make; drill down with list_events.
    #[tool(
        name = "events_summary",
        annotations(
            title = "Events summary",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn events_summary(
        &self,
        Parameters(a): Parameters<EventsSummaryArgs>,
    ) -> Result<Json<EventsSummary>, String> {
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let scan = self
            .backend
            .scan(
                w,
                EventFilter {
                    nodes: a.nodes.clone(),
                    kinds: kinds(&a.kinds),
                    ..Default::default()
                },
                MAX_SCAN,
            )
            .await
            .map_err(bad)?;
        let mut counts = KindCounts::default();
        let mut nodes: HashMap<String, (u64, u64)> = HashMap::new();
        let mut xids: HashMap<u32, u64> = HashMap::new();
        let mut notable: Vec<(i32, u64, String)> = Vec::new();
        for e in &scan.events {
            let n = nodes.entry(e.node.clone()).or_default();
            n.0 += 1;
            if e.severity >= v1::Severity::Error as i32 {
                n.1 += 1;
            }
            match &e.payload {
                Some(Payload::Xid(x)) => {
                    counts.xid += 1;
                    *xids.entry(x.code).or_default() += 1;
                }
                Some(Payload::Sxid(_)) => counts.sxid += 1,
                Some(Payload::DriverLog(_)) => counts.driver_log += 1,
                Some(Payload::AgentStatus(_)) => counts.agent_status += 1,
                Some(Payload::Gap(_)) => counts.gap += 1,
                Some(Payload::GpuSample(_)) => counts.gpu_sample += 1,
                Some(Payload::GpuProcess(p)) => {
                    if p.r#type == ProcessEventType::Exit as i32 {
                        counts.process_exit += 1;
                    } else {
                        counts.process_start += 1;
                    }
                }
                None => {}
            }
            let interesting = e.severity >= v1::Severity::Error as i32
                || matches!(e.payload, Some(Payload::Gap(_)) | Some(Payload::Sxid(_)));
            if interesting {
                let r = row(e);
                let what = match (r.xid, &r.xid_name) {
                    (Some(c), Some(n)) => format!("XID {c} {n}"),
                    (Some(c), None) => format!("XID {c}"),
                    _ => r.kind.clone(),
                };
                notable.push((
                    e.severity,
                    e.cursor,
                    format!(
                        "{} {} {} {}: {}",
                        r.ts,
                        r.severity,
                        r.node,
                        r.gpu_uuid
                            .or(r.gpu_pci)
                            .map(|g| format!("{what} on {g}"))
                            .unwrap_or(what),
                        clip(&r.message, 120)
                    ),
                ));
            }
        }
        notable.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        let mut top_nodes: Vec<TopNode> = nodes
            .into_iter()
            .map(|(node, (count, critical))| TopNode {
                node,
                count,
                critical,
            })
            .collect();
        top_nodes.sort_by(|a, b| {
            b.critical
                .cmp(&a.critical)
                .then(b.count.cmp(&a.count))
                .then(a.node.cmp(&b.node))
        });
        top_nodes.truncate(10);
        let mut top_xids: Vec<TopXid> = xids
            .into_iter()
            .map(|(xid, count)| TopXid {
                xid,
                name: xid_name(xid),
                count,
            })
            .collect();
        top_xids.sort_by(|a, b| b.count.cmp(&a.count).then(a.xid.cmp(&b.xid)));
        top_xids.truncate(10);
        let mut hints = scan.hints.clone();
        if scan.events.is_empty() {
            hints.push("nothing happened in this window (or nothing was stored): widen `since` or check collector_status".to_string());
        }
        if scan.truncated {
            hints.push(format!(
                "{} events matched; the first {MAX_SCAN} were summarised",
                scan.total_matched
            ));
        }
        let mut incidents = incidents(&scan.events, 5 * 60_000);
        incidents.truncate(20);
        let mut out = EventsSummary {
            window: window_of(&scan.window, defaulted),
            total_events: scan.total_matched,
            counts_by_kind: counts,
            top_nodes,
            top_xids,
            notable: notable.into_iter().take(10).map(|n| n.2).collect(),
            incidents,
            truncated: scan.truncated,
            hints,
        };
        if fit(
            &mut out,
            |o| o.incidents.len(),
            |o, n| o.incidents.truncate(n),
        )
        .is_some()
        {
            out.truncated = true;
        }
        Ok(Json(out))
    }

    /// The event timeline in a window, newest first: XIDs, SXids, driver log lines, GPU process
    /// events, agent status, data-loss gaps. Filter by node, GPU, kind, XID code, severity; page
    /// with `cursor`.
    #[tool(
        name = "list_events",
        annotations(
            title = "List events",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_events(
        &self,
        Parameters(a): Parameters<ListEventsArgs>,
    ) -> Result<Json<ListEvents>, String> {
        let limit = limit(a.limit, 50, 500)?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let min_severity = match a.min_severity {
            None => v1::Severity::Unspecified,
            Some(Severity::Info) => v1::Severity::Info,
            Some(Severity::Warning) => v1::Severity::Warning,
            Some(Severity::Error) => v1::Severity::Error,
            Some(Severity::Fatal) => v1::Severity::Fatal,
        };
        let r = self
            .backend
            .list_events(ListEventsRequest {
                window: Some(w),
                filter: Some(EventFilter {
                    nodes: a.nodes.clone(),
                    kinds: kinds(&a.kinds),
                    min_severity: min_severity as i32,
                    xid_codes: a.xid.clone(),
                    gpus: if a.gpu.is_empty() {
                        vec![]
                    } else {
                        vec![a.gpu.clone()]
                    },
                }),
                limit,
                page_token: a.cursor.clone(),
                order: match a.order {
                    EventOrder::NewestFirst => Order::NewestFirst,
                    EventOrder::OldestFirst => Order::OldestFirst,
                } as i32,
            })
            .await
            .map_err(|e| match e {
                BackendError::BadRequest(m) if m.contains("page_token") => {
                    format!("invalid cursor: {m}")
                }
                e => bad(e),
            })?;
        let mut hints = r.hints.clone();
        if r.events.is_empty() && !a.nodes.is_empty() {
            let known = self.backend.nodes(None).await.map_err(bad)?;
            let names: Vec<String> = known.nodes.iter().map(|n| n.node.clone()).collect();
            let missing: Vec<&String> = a.nodes.iter().filter(|n| !names.contains(n)).collect();
            if !missing.is_empty() {
                return Err(format!(
                    "unknown node(s) {missing:?}; nearest known: {:?}",
                    nearest(missing[0], &names)
                ));
            }
        }
        if r.events.is_empty() {
            hints.push(
                "no event matched: widen `since`, drop filters, or check events_summary"
                    .to_string(),
            );
        }
        let mut out = ListEvents {
            window: window_of(&r.window, defaulted),
            events: r.events.iter().map(row).collect(),
            total_matched: r.total_matched,
            truncated: !r.next_page_token.is_empty(),
            truncated_reason: None,
            next_cursor: opt(&r.next_page_token),
            hints,
        };
        if let Some(reason) = fit(&mut out, |o| o.events.len(), |o, n| o.events.truncate(n)) {
            // The page token continues after the last event the collector returned; a cut page
            // cannot be resumed exactly, so ask for a smaller limit instead.
            out.truncated = true;
            out.truncated_reason = Some(format!("{reason}; ask again with a smaller limit"));
        }
        Ok(Json(out))
    }

    /// XIDs in a window grouped by code, GPU or node, with meaning, severity, first/last seen,
    /// the GPUs and nodes involved, and NVIDIA's recommended action.
    #[tool(
        name = "xid_summary",
        annotations(
            title = "XID summary",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn xid_summary(
        &self,
        Parameters(a): Parameters<XidSummaryArgs>,
    ) -> Result<Json<XidSummary>, String> {
        let top = limit(a.top, 20, 100)? as usize;
        let (w, defaulted) = tw(&a.since, &a.until, "24h");
        let scan = self
            .backend
            .scan(
                w,
                EventFilter {
                    nodes: if a.node.is_empty() {
                        vec![]
                    } else {
                        vec![a.node.clone()]
                    },
                    kinds: vec![EventKind::Xid as i32],
                    ..Default::default()
                },
                MAX_SCAN,
            )
            .await
            .map_err(bad)?;
        let mut hints = scan.hints.clone();
        if scan.events.is_empty() && !a.node.is_empty() {
            let known = self.backend.nodes(None).await.map_err(bad)?;
            let names: Vec<String> = known.nodes.iter().map(|n| n.node.clone()).collect();
            if !names.contains(&a.node) {
                return Err(format!(
                    "unknown node {:?}; nearest known: {:?}",
                    a.node,
                    nearest(&a.node, &names)
                ));
            }
        }
        struct G {
            xid: Option<u32>,
            severity: i32,
            count: u64,
            first: Option<prost_types::Timestamp>,
            last: Option<prost_types::Timestamp>,
            gpus: Vec<String>,
            nodes: Vec<String>,
            codes: BTreeMap<u32, u64>,
        }
        let mut groups: HashMap<String, G> = HashMap::new();
        for e in &scan.events {
            let Some(Payload::Xid(x)) = &e.payload else {
                continue;
            };
            let gpu = format!("{}:{}", e.node, gpu_key(e));
            let key = match a.group_by {
                XidGroup::Xid => x.code.to_string(),
                XidGroup::Gpu => gpu.clone(),
                XidGroup::Node => e.node.clone(),
            };
            let g = groups.entry(key).or_insert(G {
                xid: (a.group_by == XidGroup::Xid).then_some(x.code),
                severity: 0,
                count: 0,
                first: e.time,
                last: e.time,
                gpus: Vec::new(),
                nodes: Vec::new(),
                codes: BTreeMap::new(),
            });
            g.count += 1;
            g.severity = g.severity.max(e.severity);
            g.last = e.time.or(e.received);
            *g.codes.entry(x.code).or_default() += 1;
            if g.gpus.len() < 10 && !g.gpus.contains(&gpu) {
                g.gpus.push(gpu);
            }
            if g.nodes.len() < 10 && !g.nodes.contains(&e.node) {
                g.nodes.push(e.node.clone());
            }
        }
        let total = scan.events.len() as u64;
        let mut list: Vec<(String, G)> = groups.into_iter().collect();
        list.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        let other_count: u64 = list.iter().skip(top).map(|(_, g)| g.count).sum();
        let groups: Vec<XidGroupRow> = list
            .into_iter()
            .take(top)
            .map(|(key, g)| {
                // For GPU/node groups, name the most frequent code.
                let main = g.xid.unwrap_or_else(|| {
                    g.codes
                        .iter()
                        .max_by_key(|(_, n)| **n)
                        .map_or(0, |(c, _)| *c)
                });
                XidGroupRow {
                    name: if g.xid.is_some() {
                        xid_name(main)
                    } else {
                        g.codes
                            .iter()
                            .map(|(c, n)| format!("{c}x{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    key,
                    xid: g.xid,
                    severity: sev_name(g.severity),
                    count: g.count,
                    first_seen: ts(&g.first).unwrap_or_default(),
                    last_seen: ts(&g.last).unwrap_or_default(),
                    gpus: g.gpus,
                    nodes: g.nodes,
                    recommended_action: recommended(main),
                }
            })
            .collect();
        if total == 0 {
            hints.push("no XID in this window".to_string());
        }
        if scan.truncated {
            hints.push(format!(
                "{} XIDs matched; the first {MAX_SCAN} were grouped",
                scan.total_matched
            ));
        }
        let mut out = XidSummary {
            window: window_of(&scan.window, defaulted),
            total: scan.total_matched,
            groups,
            other_count,
            truncated: scan.truncated,
            hints,
        };
        if fit(&mut out, |o| o.groups.len(), |o, n| o.groups.truncate(n)).is_some() {
            out.truncated = true;
        }
        Ok(Json(out))
    }

    /// What an XID code means, how severe it is, its typical causes and what to do (NVIDIA's
    /// catalog; no collector data needed). Also served as the resource telemetry://xid-catalog.
    #[tool(
        name = "describe_xid",
        annotations(
            title = "Describe an XID",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn describe_xid(
        &self,
        Parameters(a): Parameters<DescribeXidArgs>,
    ) -> Result<Json<XidInfo>, String> {
        xid_info(a.xid).map(Json)
    }

    /// A GPU metric over a window per fleet, node or GPU, downsampled to at most max_points per
    /// series (the collector picks raw samples or a 1 min / 1 h rollup by the step), with
    /// min/max/avg/p95/last per series.
    #[tool(
        name = "gpu_metric_trend",
        annotations(
            title = "GPU metric trend",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn gpu_metric_trend(
        &self,
        Parameters(a): Parameters<TrendArgs>,
    ) -> Result<Json<MetricTrend>, String> {
        let max_points =
            limit(a.max_points, 120, 1000).map_err(|e| e.replace("limit", "max_points"))?;
        let max_series =
            limit(a.max_series, 20, 200).map_err(|e| e.replace("limit", "max_series"))?;
        let metric = serde_json::to_value(a.metric)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let r = self
            .backend
            .trend(TrendRequest {
                metric,
                window: Some(w),
                step_seconds: 0,
                max_points,
                aggregation: match a.aggregate {
                    Aggregate::Avg => Aggregation::Avg,
                    Aggregate::Min => Aggregation::Min,
                    Aggregate::Max => Aggregation::Max,
                    Aggregate::P95 => Aggregation::P95,
                    Aggregate::Last => Aggregation::Last,
                } as i32,
                group_by: match a.group_by {
                    TrendGroup::Fleet => GroupBy::Fleet,
                    TrendGroup::Node => GroupBy::Node,
                    TrendGroup::Gpu => GroupBy::Gpu,
                } as i32,
                nodes: a.nodes.clone(),
                gpus: a.gpus.clone(),
                max_series,
                tier: 0,
            })
            .await
            .map_err(bad)?;
        let include = a.include_points.unwrap_or(true);
        let num = |v: f64| v.is_finite().then_some(v);
        let series: Vec<TrendSeriesOut> = r
            .series
            .iter()
            .map(|s| {
                let st = s.stats.unwrap_or_default();
                TrendSeriesOut {
                    node: opt(&s.node),
                    gpu_uuid: opt(&s.gpu_uuid),
                    gpu_index: s.gpu_index,
                    other: s.other,
                    merged_series: s.merged_series,
                    stats: Stats {
                        min: num(st.min),
                        max: num(st.max),
                        avg: num(st.avg),
                        p95: num(st.p95),
                        last: num(st.last),
                        samples: st.samples,
                    },
                    points: if include {
                        s.points
                            .iter()
                            .filter(|p| p.value.is_finite())
                            .map(|p| (p.time.map_or(0, |t| t.seconds), p.value))
                            .collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let mut hints = r.hints.clone();
        if series.is_empty() {
            hints.push("no samples for this selection: check list_nodes (GPUs report once NVML is available)".to_string());
        }
        let source = match v1::Tier::try_from(r.source).unwrap_or_default() {
            v1::Tier::Tier1m => "1m",
            v1::Tier::Tier1h => "1h",
            _ => "raw",
        };
        let mut out = MetricTrend {
            metric: r.metric.clone(),
            unit: r.unit.clone(),
            window: window_of(&r.window, defaulted),
            step_seconds: r.step_seconds,
            source: source.to_string(),
            aggregate: serde_json::to_value(a.aggregate)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            approximate: r.approximate,
            series_aggregated: r.series.iter().any(|s| s.other),
            series_total: r.series_total,
            series,
            truncated: false,
            hints,
        };
        if let Some(reason) = fit(&mut out, |o| o.series.len(), |o, n| o.series.truncate(n)) {
            out.truncated = true;
            out.hints
                .push(format!("{reason}; lower max_points or max_series"));
        }
        Ok(Json(out))
    }

    /// One node now and recently: connection, agent and driver, each GPU's latest sample and
    /// health, GPU processes, recent events and the XID count in the window.
    #[tool(
        name = "describe_node",
        annotations(
            title = "Describe a node",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn describe_node(
        &self,
        Parameters(a): Parameters<DescribeNodeArgs>,
    ) -> Result<Json<DescribeNode>, String> {
        let max_events = match a.max_events {
            None => 10,
            Some(n) if n <= 50 => n as usize,
            Some(n) => {
                return Err(format!(
                    "max_events {n} is out of range: use 0-50 (default 10)"
                ));
            }
        };
        let all = self.backend.nodes(None).await.map_err(bad)?;
        let names: Vec<String> = all.nodes.iter().map(|n| n.node.clone()).collect();
        let Some(n) = all.nodes.iter().find(|n| n.node == a.node) else {
            return Err(if names.is_empty() {
                format!(
                    "unknown node {:?}: the collector has not heard from any node yet",
                    a.node
                )
            } else {
                format!(
                    "unknown node {:?}; nearest known: {:?}",
                    a.node,
                    nearest(&a.node, &names)
                )
            });
        };
        let (w, defaulted) = tw(&a.since, "", "1h");
        let scan = self
            .backend
            .scan(
                w,
                EventFilter {
                    nodes: vec![a.node.clone()],
                    kinds: kinds(&[]),
                    ..Default::default()
                },
                MAX_SCAN,
            )
            .await
            .map_err(bad)?;
        let mut xid_by_gpu: HashMap<String, u64> = HashMap::new();
        let mut xid_count = 0;
        for e in &scan.events {
            if let Some(Payload::Xid(x)) = &e.payload {
                xid_count += 1;
                for k in [&x.gpu_uuid, &x.pci] {
                    if !k.is_empty() {
                        *xid_by_gpu.entry(k.to_ascii_lowercase()).or_default() += 1;
                    }
                }
            }
        }
        let mut mem_by_pid: HashMap<u32, u64> = HashMap::new();
        let gpus: Vec<NodeGpu> = n
            .gpus
            .iter()
            .map(|g| {
                for p in &g.processes {
                    if let Some(m) = p.used_memory_bytes {
                        *mem_by_pid.entry(p.pid).or_default() += m;
                    }
                }
                let xids = [&g.uuid, &g.pci]
                    .iter()
                    .filter(|k| !k.is_empty())
                    .map(|k| {
                        xid_by_gpu
                            .get(&k.to_ascii_lowercase())
                            .copied()
                            .unwrap_or(0)
                    })
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
                    health: if xids > 0 { "warning" } else { "ok" }.to_string(),
                    xid_count_window: xids,
                    field_errors: g
                        .errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.error))
                        .collect(),
                }
            })
            .collect();
        let mut procs = if a.include_processes.unwrap_or(true) {
            processes(&scan.events)
                .into_iter()
                .filter(|p| p.running)
                .take(50)
                .collect()
        } else {
            Vec::new()
        };
        for p in &mut procs {
            p.gpu_mem_bytes = mem_by_pid.get(&p.pid).copied();
        }
        let recent: Vec<EventRow> = scan.events.iter().rev().take(max_events).map(row).collect();
        let mut hints = scan.hints.clone();
        if n.connected_agents.is_empty() {
            hints.push(format!(
                "no agent of {} is connected; last heard from {}",
                a.node,
                ts(&n.last_seen).unwrap_or_else(|| "never".into())
            ));
        }
        if gpus.is_empty() {
            hints.push(
                "no GPU samples from this node (NVML unavailable or off on its agent)".to_string(),
            );
        }
        let driver = n.gpus.first().and_then(|g| opt(&g.driver_version));
        let cuda = n.gpus.first().and_then(|g| opt(&g.cuda_driver_version));
        let mut out = DescribeNode {
            node: n.node.clone(),
            window: window_of(&scan.window, defaulted),
            connected: !n.connected_agents.is_empty(),
            last_seen: ts(&n.last_seen),
            agent: AgentInfo {
                connected_agents: n.connected_agents.clone(),
                xid_source: n.xid_source.clone(),
                detail: n.agent_detail.clone(),
                driver,
                cuda,
            },
            gpus,
            processes: procs,
            recent_events: recent,
            xid_count_window: xid_count,
            hints,
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
        Ok(Json(out))
    }

    /// GPU processes seen in a window (from the kernel: opens of GPU devices, exec, exit), with
    /// their pod, devices, start and end. `state` picks running, exited or all.
    #[tool(
        name = "list_gpu_processes",
        annotations(
            title = "List GPU processes",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_gpu_processes(
        &self,
        Parameters(a): Parameters<ListProcessesArgs>,
    ) -> Result<Json<ListProcesses>, String> {
        let limit = limit(a.limit, 50, 500)? as usize;
        let offset = offset_cursor(&a.cursor)?;
        let (w, defaulted) = tw(&a.since, "", "1h");
        let scan = self
            .backend
            .scan(
                w,
                EventFilter {
                    nodes: if a.node.is_empty() {
                        vec![]
                    } else {
                        vec![a.node.clone()]
                    },
                    kinds: vec![EventKind::GpuProcess as i32],
                    ..Default::default()
                },
                MAX_SCAN,
            )
            .await
            .map_err(bad)?;
        let gpu = a.gpu.to_ascii_lowercase();
        let device = if gpu.chars().all(|c| c.is_ascii_digit()) && !gpu.is_empty() {
            format!("/dev/nvidia{gpu}")
        } else {
            gpu.clone()
        };
        let mut rows: Vec<ProcessRow> = processes(&scan.events)
            .into_iter()
            .filter(|p| match a.state {
                ProcState::Running => p.running,
                ProcState::Exited => !p.running,
                ProcState::All => true,
            })
            .filter(|p| {
                gpu.is_empty() || p.devices.iter().any(|d| d.to_ascii_lowercase() == device)
            })
            .collect();
        let total = rows.len();
        let mut hints = scan.hints.clone();
        if total == 0 {
            hints.push("no GPU process in this window matched; process events need the agent's eBPF source".to_string());
        }
        if gpu.starts_with("gpu-") {
            hints.push("processes are tracked by the device node they open (/dev/nvidiaN); pass the GPU index".to_string());
        }
        let page: Vec<ProcessRow> = rows.drain(..).skip(offset).take(limit).collect();
        let next = (offset + page.len() < total).then(|| format!("o1.{}", offset + page.len()));
        let mut out = ListProcesses {
            window: window_of(&scan.window, defaulted),
            truncated: next.is_some() || scan.truncated,
            processes: page,
            total_matched: total as u32,
            next_cursor: next,
            hints,
        };
        if fit(
            &mut out,
            |o| o.processes.len(),
            |o, n| o.processes.truncate(n),
        )
        .is_some()
        {
            out.truncated = true;
            out.next_cursor = Some(format!("o1.{}", offset + out.processes.len()));
        }
        Ok(Json(out))
    }
}

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

/// Keeps `ToolRouter` referenced for the handler macro.
pub type Router = ToolRouter<GpulseMcp>;
