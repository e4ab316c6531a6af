//! The tools' view of the Telemetry API: one typed call per RPC, failures turned into the text
//! an MCP client is shown (bad arguments it can fix, or an unavailable collector to retry).
use gpulse_proto::api::SELECT_UPSTREAMS;
use gpulse_proto::v1::{
    GpuHealthRequest, GpuHealthResponse, ListEventsRequest, ListEventsResponse, NodeInfo,
    NodesRequest, NodesResponse, ProcessesRequest, ProcessesResponse, StatusRequest,
    StatusResponse, SummarizeRequest, SummarizeResponse, TimeWindow, TrendRequest, TrendResponse,
    XidGroupsRequest, XidGroupsResponse,
};
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue};

use crate::SharedTelemetry;

#[derive(Clone)]
pub struct Source {
    api: SharedTelemetry,
    /// Through a gateway: the clusters (or `cluster/shard`s) every call is limited to.
    scope: Option<AsciiMetadataValue>,
}

/// Most clusters one call may name.
const MAX_CLUSTERS: usize = 64;

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
        Self { api, scope: None }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(v) = &self.scope {
            r.metadata_mut().insert(SELECT_UPSTREAMS, v.clone());
        }
        r
    }

    /// This source limited to `clusters` (none: unchanged). Through a gateway each name is a
    /// cluster it serves (or `cluster/shard`); an unknown one is refused with the known ones. A
    /// single collector serves only its own `--cluster`.
    pub async fn scoped(&self, clusters: &[String]) -> Answer<Source> {
        if clusters.is_empty() {
            return Ok(self.clone());
        }
        if clusters.len() > MAX_CLUSTERS {
            return Err(format!("at most {MAX_CLUSTERS} clusters per call"));
        }
        for c in clusters {
            let ok = !c.is_empty()
                && c.len() <= 255
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-' | '/'));
            if !ok {
                return Err(format!(
                    "invalid cluster {c:?}: letters, digits, '.', '_', '-' (and '/' for cluster/shard)"
                ));
            }
        }
        let value: AsciiMetadataValue = clusters
            .join(",")
            .parse()
            .map_err(|_| "invalid cluster names".to_string())?;
        let scoped = Source {
            api: self.api.clone(),
            scope: Some(value),
        };
        let st = scoped.status().await?;
        if st.upstreams.is_empty() && !clusters.iter().all(|c| *c == st.cluster) {
            return Err(match st.cluster.as_str() {
                "" => {
                    "this server is one collector without a cluster name; leave cluster out".into()
                }
                own => format!("this server is one collector of cluster {own:?}; it has no other"),
            });
        }
        Ok(scoped)
    }
    pub async fn status(&self) -> Answer<StatusResponse> {
        let r = self.api.status(self.req(StatusRequest {})).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn nodes(&self, window: Option<TimeWindow>) -> Answer<NodesResponse> {
        let r = self.api.nodes(self.req(NodesRequest { window })).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    /// ListEvents; the raw status, for tools that word some refusals themselves.
    pub async fn list_events(&self, req: ListEventsRequest) -> Result<ListEventsResponse, Status> {
        let r = self.api.list_events(self.req(req)).await;
        r.map(|r| r.into_inner())
    }

    pub async fn trend(&self, req: TrendRequest) -> Answer<TrendResponse> {
        let r = self.api.trend(self.req(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn summarize(&self, req: SummarizeRequest) -> Answer<SummarizeResponse> {
        let r = self.api.summarize(self.req(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn xid_groups(&self, req: XidGroupsRequest) -> Answer<XidGroupsResponse> {
        let r = self.api.xid_groups(self.req(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn processes(&self, req: ProcessesRequest) -> Answer<ProcessesResponse> {
        let r = self.api.processes(self.req(req)).await;
        r.map(|r| r.into_inner()).map_err(explain)
    }

    pub async fn gpu_health(&self, req: GpuHealthRequest) -> Answer<GpuHealthResponse> {
        let r = self.api.gpu_health(self.req(req)).await;
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

    /// One node as `Nodes` knows it, or "unknown node, nearest known"; a name that several
    /// clusters have is refused with the candidates.
    pub async fn node(&self, name: &str) -> Answer<NodeInfo> {
        let all = self.nodes(None).await?;
        let names: Vec<String> = all.nodes.iter().map(|n| n.node.clone()).collect();
        let mut found: Vec<NodeInfo> = all.nodes.into_iter().filter(|n| n.node == name).collect();
        match found.len() {
            0 => Err(unknown(&[&name.to_string()], &names)),
            1 => Ok(found.remove(0)),
            _ => {
                let clusters: Vec<String> = found.iter().map(|n| n.cluster.clone()).collect();
                Err(format!(
                    "node {name:?} is in {} clusters ({}); pass cluster to pick one",
                    clusters.len(),
                    clusters.join(", ")
                ))
            }
        }
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
