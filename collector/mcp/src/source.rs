//! The tools' view of the Telemetry API: one typed call per RPC, failures turned into the text
//! an MCP client is shown (bad arguments it can fix, or an unavailable collector to retry).
use gpulse_proto::v1::{
    ListEventsRequest, ListEventsResponse, NodeInfo, NodesRequest, NodesResponse, ProcessesRequest,
    ProcessesResponse, StatusRequest, StatusResponse, SummarizeRequest, SummarizeResponse,
    TimeWindow, TrendRequest, TrendResponse, XidGroupsRequest, XidGroupsResponse,
};
use tonic::{Code, Request, Status};

use crate::SharedTelemetry;

#[derive(Clone)]
pub struct Source {
    api: SharedTelemetry,
}

/// What a tool answers when a call fails.
pub fn explain(s: Status) -> String {
    match s.code() {
        Code::InvalidArgument => format!("invalid argument: {}", s.message()),
        _ => format!(
            "the collector could not answer ({}); retry shortly",
            s.message()
        ),
    }
}

type Answer<T> = Result<T, String>;

impl Source {
    pub fn new(api: SharedTelemetry) -> Self {
        Self { api }
    }

    pub async fn status(&self) -> Answer<StatusResponse> {
        let r = self.api.status(Request::new(StatusRequest {})).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn nodes(&self, window: Option<TimeWindow>) -> Answer<NodesResponse> {
        let r = self.api.nodes(Request::new(NodesRequest { window })).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    /// ListEvents; the raw status, for tools that word some refusals themselves.
    pub async fn list_events(&self, req: ListEventsRequest) -> Result<ListEventsResponse, Status> {
        let r = self.api.list_events(Request::new(req)).await;
        r.map(|r| r.into_inner())
    }

    pub async fn trend(&self, req: TrendRequest) -> Answer<TrendResponse> {
        let r = self.api.trend(Request::new(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn summarize(&self, req: SummarizeRequest) -> Answer<SummarizeResponse> {
        let r = self.api.summarize(Request::new(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn xid_groups(&self, req: XidGroupsRequest) -> Answer<XidGroupsResponse> {
        let r = self.api.xid_groups(Request::new(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn processes(&self, req: ProcessesRequest) -> Answer<ProcessesResponse> {
        let r = self.api.processes(Request::new(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    /// Fails with "unknown node, nearest known" when a name in `nodes` is not one the
    /// collector has heard from (ever, not only in the window).
    pub async fn known_nodes(&self, nodes: &[String]) -> Answer<()> {
        let all = self.nodes(None).await?;
        let names: Vec<String> = all.nodes.into_iter().map(|n| n.node).collect();
        let missing: Vec<&String> = nodes.iter().filter(|n| !names.contains(n)).collect();
        match missing.is_empty() {
            true => Ok(()),
            false => Err(unknown(&missing, &names)),
        }
    }

    /// One node as `Nodes` knows it, or "unknown node, nearest known".
    pub async fn node(&self, name: &str) -> Answer<NodeInfo> {
        let all = self.nodes(None).await?;
        let names: Vec<String> = all.nodes.iter().map(|n| n.node.clone()).collect();
        all.nodes
            .into_iter()
            .find(|n| n.node == name)
            .ok_or_else(|| unknown(&[&name.to_string()], &names))
    }
}

/// "unknown node(s) ...; nearest known: ..." for names not among `names`.
fn unknown(missing: &[&String], names: &[String]) -> String {
    let which = match missing {
        [one] => format!("unknown node {one:?}"),
        many => format!("unknown nodes {many:?}"),
    };
    match missing.first() {
        Some(first) if !names.is_empty() => {
            format!("{which}; nearest known: {:?}", nearest(first, names))
        }
        _ => format!("{which}: the collector has not heard from any node yet"),
    }
}

/// Closest names to `want` (by shared prefix, then length difference), for "did you mean".
pub fn nearest(want: &str, names: &[String]) -> Vec<String> {
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
