//! The MCP tools, one module each. All are read-only: each turns its arguments into one or two
//! Telemetry calls and shapes the answer into typed structured content, or an `isError` result
//! whose text says how to fix the call. Counting and grouping happen in the collector.
mod describe_node;
mod events_summary;
mod gpu_health;
mod gpu_metric_trend;
mod list_events;
mod list_gpu_processes;
mod list_nodes;
mod status;
mod xid;

use gpulse_proto::{
    names::ShortName,
    render, time as ptime,
    v1::{self, EventKind, TimeWindow, event::Payload},
};
use gpulse_xid::catalog;
use rmcp::{handler::server::router::tool::ToolRouter, model::ToolAnnotations};
use serde::Serialize;

use crate::{
    GpulseMcp,
    types::{EventRow, Kind, Sources, UpstreamRow, Window},
};

pub use xid::xid_info;

pub(crate) type Router = ToolRouter<GpulseMcp>;

/// Largest structured result; past it the longest list is cut and `truncated` set.
pub const MAX_RESULT_BYTES: usize = 64 << 10;

/// Every tool, each annotated the same way: read-only, idempotent, closed world.
pub(crate) fn router() -> Router {
    let mut r = GpulseMcp::status_router()
        + GpulseMcp::list_nodes_router()
        + GpulseMcp::events_summary_router()
        + GpulseMcp::list_events_router()
        + GpulseMcp::xid_router()
        + GpulseMcp::trend_router()
        + GpulseMcp::describe_node_router()
        + GpulseMcp::processes_router()
        + GpulseMcp::gpu_health_router();
    for route in r.map.values_mut() {
        route.attr.annotations = Some(ToolAnnotations::from_raw(
            route.attr.title.clone(),
            Some(true),
            Some(false),
            Some(true),
            Some(false),
        ));
    }
    r
}

impl Sources {
    /// An answer's upstreams and partial flag.
    pub fn of(upstreams: &[v1::UpstreamStatus], partial: bool) -> Self {
        Self {
            partial,
            upstreams: upstreams
                .iter()
                .map(|u| UpstreamRow {
                    name: u.name.clone(),
                    state: v1::UpstreamState::name_of(u.state).to_string(),
                    reason: opt(&u.reason),
                    elapsed_ms: u.elapsed_ms,
                })
                .collect(),
        }
    }

    /// Adds another call's sources (a tool that makes several): partial if any was, each
    /// upstream as it did at worst.
    pub fn add(&mut self, o: Sources) {
        self.partial |= o.partial;
        for u in o.upstreams {
            match self.upstreams.iter_mut().find(|x| x.name == u.name) {
                Some(x) if x.state == "ok" => *x = u,
                Some(_) => {}
                None => self.upstreams.push(u),
            }
        }
    }

    /// The hint a partial answer carries first: which upstreams are missing and why.
    pub fn note(&self, hints: &mut Vec<String>) {
        if self.partial {
            let missing: Vec<String> = self
                .upstreams
                .iter()
                .filter(|u| u.state != "ok")
                .map(|u| match &u.reason {
                    Some(r) => format!("{} ({}: {r})", u.name, u.state),
                    None => format!("{} ({})", u.name, u.state),
                })
                .collect();
            hints.insert(
                0,
                format!(
                    "partial answer: {} did not answer; figures leave them out",
                    missing.join(", ")
                ),
            );
        }
    }
}

/// Sets an answer's sources and puts the partial note first among its hints.
fn stamp(sources: Sources, out_sources: &mut Sources, hints: &mut Vec<String>) {
    sources.note(hints);
    *out_sources = sources;
}

fn ts(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(ptime::rfc3339)
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

/// The window to ask for: `since` or the tool's default, and whether it was defaulted.
fn tw(since: &str, until: &str, default: &str) -> (TimeWindow, bool) {
    let defaulted = since.trim().is_empty();
    let since = if defaulted { default } else { since };
    (
        TimeWindow {
            since: since.into(),
            until: until.into(),
        },
        defaulted,
    )
}

/// The wire enum value an MCP argument names: arguments use the contract's short names, so
/// the mapping is the names table (a test holds every argument enum to it).
fn wire<T: ShortName>(arg: impl Serialize) -> T {
    serde_json::to_value(arg)
        .ok()
        .and_then(|v| v.as_str().and_then(T::from_short_name))
        .unwrap_or_default()
}

/// The argument's own name (its serde spelling).
fn arg_name(arg: impl Serialize) -> String {
    serde_json::to_value(arg)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Requested kinds, or every kind but samples.
fn kinds(k: &[Kind]) -> Vec<i32> {
    if k.is_empty() {
        EventKind::EVENTS.iter().map(|k| *k as i32).collect()
    } else {
        k.iter().map(|k| wire::<EventKind>(k) as i32).collect()
    }
}

/// `v` in `1..=max`, or `default`.
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

fn one(node: &str) -> Vec<String> {
    if node.is_empty() {
        vec![]
    } else {
        vec![node.to_string()]
    }
}

/// An event as a row: envelope, the GPU, XID and process it is about, and its one-line summary.
pub fn row(ev: &v1::Event) -> EventRow {
    let mut r = EventRow {
        ts: ts(&ev.time.or(ev.received)).unwrap_or_default(),
        node: ev.node.clone(),
        kind: EventKind::name_of(ev.kind).to_string(),
        severity: v1::Severity::name_of(ev.severity).to_string(),
        gpu_uuid: None,
        gpu_pci: None,
        xid: None,
        xid_name: None,
        pid: None,
        process: None,
        pod: None,
        message: clip(&render::summary(ev), 200),
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
        }
        Some(Payload::Sxid(x)) => r.gpu_pci = opt(&x.pci),
        Some(Payload::DriverLog(d)) => {
            r.gpu_uuid = opt(&d.gpu_uuid);
            r.gpu_pci = opt(&d.pci);
        }
        Some(Payload::GpuProcess(p)) => {
            r.pid = Some(p.tgid.max(p.pid));
            r.process = opt(&p.comm);
            r.pod = pod_name(&p.pod);
        }
        Some(Payload::GpuSample(g)) => {
            r.gpu_uuid = opt(&g.uuid);
            r.gpu_pci = opt(&g.pci);
        }
        Some(Payload::GpuHealth(h)) => {
            if let Some(rec) = &h.record {
                r.gpu_uuid = opt(&rec.gpu_uuid);
                r.gpu_pci = opt(&rec.pci);
            }
        }
        Some(Payload::AgentStatus(_)) | Some(Payload::Gap(_)) | None => {}
    }
    r
}

/// Cuts `list` until the serialised result fits in [`MAX_RESULT_BYTES`]; says so when it did.
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

/// Offset cursors for lists paged here: `o1.<offset>`.
fn offset_cursor(c: &str) -> Result<usize, String> {
    if c.is_empty() {
        return Ok(0);
    }
    c.strip_prefix("o1.")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "cursor is not one this tool returned; call again without it".to_string())
}

/// The cursor after `offset + shown` of `total`, if any remain.
fn next_offset(offset: usize, shown: usize, total: usize) -> Option<String> {
    (offset + shown < total).then(|| format!("o1.{}", offset + shown))
}

fn xid_name(code: u32) -> String {
    catalog::lookup(code).map_or_else(
        || format!("XID {code} (not in the catalog)"),
        |i| i.mnemonic.to_string(),
    )
}

/// NVIDIA's recommended action for a code, in one line.
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

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{
        Aggregation, GroupBy, Order, ProcessState, Severity as WireSeverity, XidGrouping,
    };

    use super::*;
    use crate::types::{Aggregate, EventOrder, ProcState, Severity, TrendGroup, XidGroup};

    /// Every MCP argument enum maps to a wire value through the names table (a new variant
    /// without a short name would silently become "unspecified").
    #[test]
    fn argument_enums_map_through_the_names_table() {
        use Kind::*;
        for k in [
            Xid,
            Sxid,
            DriverLog,
            AgentStatus,
            Gap,
            GpuProcess,
            GpuSample,
            Unknown,
        ] {
            assert_ne!(wire::<EventKind>(k), EventKind::Unspecified, "{k:?}");
        }
        for s in [
            Severity::Info,
            Severity::Warning,
            Severity::Error,
            Severity::Fatal,
        ] {
            assert_ne!(wire::<WireSeverity>(s), WireSeverity::Unspecified, "{s:?}");
        }
        for o in [EventOrder::NewestFirst, EventOrder::OldestFirst] {
            assert_ne!(wire::<Order>(o), Order::Unspecified, "{o:?}");
        }
        for a in [
            Aggregate::Avg,
            Aggregate::Min,
            Aggregate::Max,
            Aggregate::P95,
            Aggregate::Last,
        ] {
            assert_ne!(wire::<Aggregation>(a), Aggregation::Unspecified, "{a:?}");
        }
        for g in [TrendGroup::Fleet, TrendGroup::Node, TrendGroup::Gpu] {
            assert_ne!(wire::<GroupBy>(g), GroupBy::Unspecified, "{g:?}");
        }
        for g in [XidGroup::Xid, XidGroup::Gpu, XidGroup::Node] {
            assert_ne!(wire::<XidGrouping>(g), XidGrouping::Unspecified, "{g:?}");
        }
        assert_eq!(
            wire::<ProcessState>(ProcState::Running),
            ProcessState::Running
        );
        assert_eq!(
            wire::<ProcessState>(ProcState::Exited),
            ProcessState::Exited
        );
        assert_eq!(
            wire::<ProcessState>(ProcState::All),
            ProcessState::Unspecified,
            "all"
        );
        // The metric schema is the contract's metric catalog, in order, each name accepted.
        let schema = serde_json::to_value(schemars::schema_for!(crate::types::Metric)).unwrap();
        let names: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names, gpulse_proto::metric::names());
        for m in gpulse_proto::metric::METRICS {
            let parsed: crate::types::Metric =
                serde_json::from_value(serde_json::json!(m.name)).unwrap();
            assert_eq!(parsed.name(), m.name);
            assert!(schema["description"].as_str().unwrap().contains(m.help));
        }
    }

    #[test]
    fn rows_clip_and_fit_cuts() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        let mut v: Vec<String> = (0..10_000).map(|i| format!("item {i}")).collect();
        let note = fit(&mut v, |v| v.len(), |v, n| v.truncate(n)).unwrap();
        assert!(serde_json::to_vec(&v).unwrap().len() <= MAX_RESULT_BYTES);
        assert!(note.contains("result cut to"), "{note}");
        assert_eq!(next_offset(0, 3, 3), None);
        assert_eq!(next_offset(3, 3, 7).as_deref(), Some("o1.6"));
        assert!(offset_cursor("o1.x").is_err());
    }
}
