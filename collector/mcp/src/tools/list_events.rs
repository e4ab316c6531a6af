//! `list_events`: the event timeline of a window, filtered and paged.
use gpulse_proto::v1::{self, EventFilter, ListEventsRequest, Order};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};
use tonic::Code;

use super::{fit, kinds, limit, one, opt, row, tw, window_of, wire};
use crate::{
    GpulseMcp,
    source::explain,
    types::{ListEvents, ListEventsArgs},
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
        let limit = limit(a.limit, 50, 500)?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let r = self
            .source
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
            self.source.known_nodes(&a.nodes).await?;
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
}
