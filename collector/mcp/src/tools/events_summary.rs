//! `events_summary`: "what happened in the last hour?", from the collector's Summarize.
use gpulse_proto::{
    names::ShortName,
    render,
    v1::{self, EventFilter, EventKind, SummarizeRequest},
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{clip, fit, kinds, stamp, ts, tw, window_of, xid_name};
use crate::{
    GpulseMcp,
    types::Clusters,
    types::{EventsSummary, EventsSummaryArgs, Incident, KindCounts, Sources, TopNode, TopXid},
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
        let src = self.source.scoped(&a.clusters()).await?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let s = src
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
            sources: Default::default(),
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
        stamp(
            Sources::of(&s.upstreams, s.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{
        Incident as WireIncident, KindCount, NodeCount, SummarizeResponse, XidCount,
    };
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    fn summary() -> SummarizeResponse {
        SummarizeResponse {
            window: window(),
            total_matched: 30_000,
            summarized: 20_000,
            truncated: true,
            kinds: vec![
                KindCount {
                    kind: EventKind::Xid as i32,
                    count: 12,
                },
                KindCount {
                    kind: EventKind::GpuProcess as i32,
                    count: 3,
                },
            ],
            process_starts: 2,
            process_exits: 1,
            top_nodes: vec![NodeCount {
                node: "gpu-1".into(),
                count: 15,
                severe: 12,
            }],
            xids: (1..=12).map(|code| XidCount { code, count: 1 }).collect(),
            incidents: vec![WireIncident {
                node: "gpu-1".into(),
                gpu: "GPU-0".into(),
                start: at(100),
                end: at(160),
                xid_count: 2,
                codes: vec![119, 154],
                root_cause: 119,
                severity: v1::Severity::Error as i32,
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn shapes_the_collectors_summary() {
        let s = Session::new(Answers {
            summary: summary(),
            ..Default::default()
        })
        .await;
        let v = s
            .ok(
                "events_summary",
                json!({"nodes": ["gpu-1"], "kinds": ["xid"]}),
            )
            .await;
        assert_eq!(v["counts_by_kind"]["xid"], 12);
        assert_eq!(v["counts_by_kind"]["process_start"], 2);
        assert_eq!(v["counts_by_kind"]["gap"], 0);
        assert_eq!(v["top_nodes"][0]["critical"], 12);
        assert_eq!(v["top_xids"].as_array().unwrap().len(), 10, "ten at most");
        assert_eq!(v["incidents"][0]["root_cause_name"], "GSP_RPC_TIMEOUT");
        assert_eq!(v["incidents"][0]["severity"], "error");
        assert!(v["window"]["window_defaulted"].as_bool().unwrap());
        assert!(v["truncated"].as_bool().unwrap());
        let hints = v["hints"].to_string();
        assert!(
            hints.contains("30000 events matched; the first 20000"),
            "{hints}"
        );
        let asked = &s.fake.asked("Summarize")[0];
        assert!(
            asked.contains("nodes: [\"gpu-1\"]") && asked.contains("kinds: [Xid]"),
            "{asked}"
        );
    }

    #[tokio::test]
    async fn default_kinds_exclude_samples_and_an_empty_window_says_so() {
        let s = Session::new(Answers::default()).await;
        let v = s.ok("events_summary", json!({"since": "15m"})).await;
        assert!(v["hints"].to_string().contains("nothing happened"));
        let asked = &s.fake.asked("Summarize")[0];
        assert!(asked.contains("since: \"15m\""), "{asked}");
        assert!(
            asked.contains("Xid") && !asked.contains("GpuSample"),
            "{asked}"
        );
        assert!(
            s.refused("events_summary", json!({"kinds": ["bogus"]}))
                .await
                .contains("bogus")
        );
    }
}
