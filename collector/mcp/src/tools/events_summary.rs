//! `events_summary`: "what happened in the last hour?", from the collector's Summarize.
use gpulse_proto::{
    names::ShortName,
    render,
    v1::{self, EventFilter, EventKind, SummarizeRequest},
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{clip, fit, kinds, ts, tw, window_of, xid_name};
use crate::{
    GpulseMcp,
    types::{EventsSummary, EventsSummaryArgs, Incident, KindCounts, TopNode, TopXid},
};

const TOP_XIDS: usize = 10;

fn counts(s: &v1::SummarizeResponse) -> KindCounts {
    let of = |k: EventKind| {
        s.kinds
            .iter()
            .find(|c| c.kind == k as i32)
            .map_or(0, |c| c.count)
    };
    KindCounts {
        xid: of(EventKind::Xid),
        sxid: of(EventKind::Sxid),
        driver_log: of(EventKind::DriverLog),
        process_start: s.process_starts,
        process_exit: s.process_exits,
        agent_status: of(EventKind::AgentStatus),
        gap: of(EventKind::Gap),
        gpu_sample: of(EventKind::GpuSample),
    }
}

fn incident(i: &v1::Incident) -> Incident {
    Incident {
        node: i.node.clone(),
        gpu: i.gpu.clone(),
        start: ts(&i.start).unwrap_or_default(),
        end: ts(&i.end).unwrap_or_default(),
        xid_count: i.xid_count,
        xids: i.codes.clone(),
        root_cause_xid: i.root_cause,
        root_cause_name: xid_name(i.root_cause),
        severity: v1::Severity::name_of(i.severity).to_string(),
        summary: format!(
            "{} {}: {} XID(s) {:?} starting with {} ({})",
            i.node,
            i.gpu,
            i.xid_count,
            i.codes,
            i.root_cause,
            xid_name(i.root_cause)
        ),
    }
}

#[tool_router(router = events_summary_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// "What happened in the last hour?": counts per kind, the busiest nodes and XIDs, notable
    /// one-liners, and XID incidents per GPU with the XID that started each. The first call to
    /// make; drill down with list_events.
    #[tool(name = "events_summary", title = "Events summary")]
    async fn events_summary(
        &self,
        Parameters(a): Parameters<EventsSummaryArgs>,
    ) -> Result<Json<EventsSummary>, String> {
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let s = self
            .source
            .summarize(SummarizeRequest {
                window: Some(w),
                filter: Some(EventFilter {
                    nodes: a.nodes.clone(),
                    kinds: kinds(&a.kinds),
                    ..Default::default()
                }),
            })
            .await?;
        let mut hints = s.hints.clone();
        if s.total_matched == 0 {
            hints.push("nothing happened in this window (or nothing was stored): widen `since` or check collector_status".to_string());
        }
        if s.truncated {
            hints.push(format!(
                "{} events matched; the first {} were summarised",
                s.total_matched, s.summarized
            ));
        }
        let mut out = EventsSummary {
            window: window_of(&s.window, defaulted),
            total_events: s.total_matched,
            counts_by_kind: counts(&s),
            top_nodes: s
                .top_nodes
                .iter()
                .map(|n| TopNode {
                    node: n.node.clone(),
                    count: n.count,
                    critical: n.severe,
                })
                .collect(),
            top_xids: s
                .xids
                .iter()
                .take(TOP_XIDS)
                .map(|x| TopXid {
                    xid: x.code,
                    name: xid_name(x.code),
                    count: x.count,
                })
                .collect(),
            notable: s
                .notable
                .iter()
                .map(|e| clip(&render::line(e), 240))
                .collect(),
            incidents: s.incidents.iter().map(incident).collect(),
            truncated: s.truncated,
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
}
