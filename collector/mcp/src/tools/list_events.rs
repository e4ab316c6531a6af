//! `list_events`: the event timeline of a window, filtered and paged.
use gpulse_proto::v1::{self, EventFilter, ListEventsRequest, Order};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};
use tonic::Code;

use super::{fit, kinds, limit, one, opt, row, stamp, tw, window_of, wire};
use crate::{
    GpulseMcp,
    source::explain,
    types::Clusters,
    types::{ListEvents, ListEventsArgs, Sources},
};

#[tool_router(router = list_events_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// The event timeline in a window, newest first: XIDs, SXids, driver log lines, GPU process
    /// events, agent status, data-loss gaps. Filter by node, GPU, kind, XID code, severity; page
    /// with `cursor`.
    #[tool(name = "list_events", title = "List events")]
    async fn list_events(
        &self,
        Parameters(a): Parameters<ListEventsArgs>,
    ) -> Result<Json<ListEvents>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let limit = limit(a.limit, 50, 500)?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let r = src
            .list_events(ListEventsRequest {
                window: Some(w),
                filter: Some(EventFilter {
                    nodes: a.nodes.clone(),
                    kinds: kinds(&a.kinds),
                    min_severity: a.min_severity.map_or(0, |s| wire::<v1::Severity>(s) as i32),
                    xid_codes: a.xid.clone(),
                    gpus: one(&a.gpu),
                }),
                limit,
                page_token: a.cursor.clone(),
                order: wire::<Order>(a.order) as i32,
                resume_after: Default::default(),
            })
            .await
            .map_err(|s| match s.code() {
                Code::InvalidArgument if s.message().contains("page_token") => {
                    format!("invalid cursor: {}", s.message())
                }
                _ => explain(s),
            })?;
        let mut hints = r.hints.clone();
        if r.events.is_empty() {
            src.known_nodes(&a.nodes).await?;
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
            sources: Default::default(),
        };
        if let Some(reason) = fit(&mut out, |o| o.events.len(), |o, n| o.events.truncate(n)) {
            // The page token continues after the last event the collector returned; a cut page
            // cannot be resumed exactly, so ask for a smaller limit instead.
            out.truncated = true;
            out.truncated_reason = Some(format!("{reason}; ask again with a smaller limit"));
        }
        stamp(
            Sources::of(&r.upstreams, r.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{Event, EventKind, NodeInfo, NodesResponse, Severity, event::Payload};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    fn xid() -> Event {
        Event {
            cursor: 9,
            node: "gpu-1".into(),
            time: at(5),
            kind: EventKind::Xid as i32,
            severity: Severity::Fatal as i32,
            payload: Some(Payload::Xid(v1::Xid {
                code: 79,
                gpu_uuid: "GPU-0".into(),
                mnemonic: "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS".into(),
                message: "GPU has fallen off the bus.".into(),
                pid: Some(7),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn maps_every_filter_and_shapes_rows() {
        let s = Session::new(Answers {
            list: v1::ListEventsResponse {
                window: window(),
                events: vec![xid()],
                total_matched: 2,
                next_page_token: "e1.ab".into(),
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s
            .ok(
                "list_events",
                json!({"nodes": ["gpu-1"], "gpu": "GPU-0", "kinds": ["xid"], "xid": [79],
                       "min_severity": "error", "order": "oldest_first", "limit": 1}),
            )
            .await;
        let asked = &s.fake.asked("ListEvents")[0];
        for want in [
            "min_severity: Error",
            "xid_codes: [79]",
            "gpus: [\"GPU-0\"]",
            "order: OldestFirst",
            "limit: 1",
        ] {
            assert!(asked.contains(want), "{want} in {asked}");
        }
        let row = &v["events"][0];
        assert_eq!(row["xid"], 79);
        assert_eq!(row["kind"], "xid");
        assert_eq!(row["severity"], "fatal");
        assert_eq!(row["pid"], 7);
        assert!(
            row["message"]
                .as_str()
                .unwrap()
                .starts_with("XID 79 ROBUST_CHANNEL")
        );
        assert_eq!(v["next_cursor"], "e1.ab");
        assert!(v["truncated"].as_bool().unwrap());
    }

    /// Through a gateway with a shard missing: the answer says so in structured output and in
    /// its first hint.
    #[tokio::test]
    async fn a_partial_answer_names_the_missing_upstream() {
        let s = Session::new(Answers {
            list: v1::ListEventsResponse {
                window: window(),
                events: vec![xid()],
                total_matched: 1,
                partial: true,
                upstreams: vec![
                    v1::UpstreamStatus {
                        name: "s0".into(),
                        state: v1::UpstreamState::Ok as i32,
                        reason: String::new(),
                        elapsed_ms: 3,
                    },
                    v1::UpstreamStatus {
                        name: "s1".into(),
                        state: v1::UpstreamState::Timeout as i32,
                        reason: "no answer within 3000 ms".into(),
                        elapsed_ms: 3000,
                    },
                ],
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let v = s.ok("list_events", json!({})).await;
        assert_eq!(v["partial"], true);
        assert_eq!(v["upstreams"][1]["name"], "s1");
        assert_eq!(v["upstreams"][1]["state"], "timeout");
        let first = v["hints"][0].as_str().unwrap();
        assert!(
            first.starts_with("partial answer: s1 (timeout: no answer within 3000 ms)"),
            "{first}"
        );
    }

    /// `cluster`/`clusters` limit every call of a tool through a gateway; a single collector
    /// serves only its own cluster.
    #[tokio::test]
    async fn clusters_scope_the_calls() {
        let through_gateway = Answers {
            status: v1::StatusResponse {
                upstreams: vec![v1::UpstreamStatus {
                    name: "c2".into(),
                    state: v1::UpstreamState::Ok as i32,
                    ..Default::default()
                }],
                ..Default::default()
            },
            list: v1::ListEventsResponse {
                window: window(),
                events: vec![xid()],
                total_matched: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let s = Session::new(through_gateway).await;
        s.ok(
            "list_events",
            json!({"cluster": "c2", "clusters": ["c3/s1"]}),
        )
        .await;
        let asked = s.fake.asked("ListEvents");
        assert!(asked[0].ends_with("[scope=c2,c3/s1]"), "{asked:?}");
        s.ok("list_events", json!({})).await;
        assert!(!s.fake.asked("ListEvents")[1].contains("scope"));
        assert!(
            s.refused("list_events", json!({"cluster": "bad name"}))
                .await
                .contains("invalid cluster")
        );
        let one = Session::new(Answers {
            status: v1::StatusResponse {
                cluster: "c1".into(),
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let text = one.refused("list_events", json!({"cluster": "c2"})).await;
        assert!(text.contains("one collector of cluster \"c1\""), "{text}");
    }

    #[tokio::test]
    async fn refusals_name_the_fix() {
        let s = Session::new(Answers {
            nodes: NodesResponse {
                nodes: vec![NodeInfo {
                    node: "gpu-node-1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        })
        .await;
        let text = s
            .refused("list_events", json!({"nodes": ["gpu-node-7"]}))
            .await;
        assert!(
            text.contains("unknown node \"gpu-node-7\"") && text.contains("gpu-node-1"),
            "{text}"
        );
        assert!(
            s.refused("list_events", json!({"limit": 501}))
                .await
                .contains("1-500")
        );
        assert!(
            s.refused("list_events", json!({"order": "random"}))
                .await
                .contains("random")
        );
        let bad = Session::new(Answers {
            fail: Some(tonic::Status::invalid_argument(
                "page_token is not one this collector issued",
            )),
            ..Default::default()
        })
        .await;
        assert!(
            bad.refused("list_events", json!({"cursor": "x"}))
                .await
                .starts_with("invalid cursor")
        );
    }
}
