//! Where the MCP tools get their data: the collector's own store (in-process, `/mcp`) or a running
//! collector over gRPC (`gpulse-collector mcp --stdio`). Same queries either way.
use gpulse_proto::v1::{
    self, ListEventsRequest, ListEventsResponse, NodesRequest, NodesResponse, StatusRequest,
    StatusResponse, TimeWindow, TrendRequest, TrendResponse, telemetry_client::TelemetryClient,
};
use tonic::transport::Channel;

use crate::state::StoreHandle;

#[derive(Clone)]
pub enum Backend {
    Local(StoreHandle),
    Remote(TelemetryClient<Channel>),
}

/// A failed query: bad arguments (the caller can fix them) or the collector being unavailable.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the collector could not answer: {0}")]
    Unavailable(String),
}

impl From<tonic::Status> for BackendError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument => Self::BadRequest(s.message().to_string()),
            _ => Self::Unavailable(s.message().to_string()),
        }
    }
}

impl From<crate::state::StoreError> for BackendError {
    fn from(e: crate::state::StoreError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl From<crate::query::QueryError> for BackendError {
    fn from(e: crate::query::QueryError) -> Self {
        tonic::Status::from(e).into()
    }
}

impl Backend {
    pub async fn status(&self) -> Result<StatusResponse, BackendError> {
        match self {
            Backend::Local(s) => Ok(s.status().await?),
            Backend::Remote(c) => Ok(c.clone().status(StatusRequest {}).await?.into_inner()),
        }
    }

    pub async fn nodes(&self, window: Option<TimeWindow>) -> Result<NodesResponse, BackendError> {
        match self {
            Backend::Local(s) => Ok(s.nodes(window).await??),
            Backend::Remote(c) => Ok(c.clone().nodes(NodesRequest { window }).await?.into_inner()),
        }
    }

    pub async fn list_events(
        &self,
        req: ListEventsRequest,
    ) -> Result<ListEventsResponse, BackendError> {
        match self {
            Backend::Local(s) => Ok(s.list_events(req).await??),
            Backend::Remote(c) => Ok(c.clone().list_events(req).await?.into_inner()),
        }
    }

    pub async fn trend(&self, req: TrendRequest) -> Result<TrendResponse, BackendError> {
        match self {
            Backend::Local(s) => Ok(s.trend(req).await??),
            Backend::Remote(c) => Ok(c.clone().trend(req).await?.into_inner()),
        }
    }

    /// Every event of the window matching `filter`, oldest first, at most `max` (pages through
    /// ListEvents). Returns the events, the first page's window, the total matched and whether
    /// `max` cut the scan short.
    pub async fn scan(
        &self,
        window: TimeWindow,
        filter: v1::EventFilter,
        max: usize,
    ) -> Result<Scan, BackendError> {
        let mut token = String::new();
        let mut out = Scan::default();
        loop {
            let r = self
                .list_events(ListEventsRequest {
                    window: Some(window.clone()),
                    filter: Some(filter.clone()),
                    limit: crate::query::MAX_LIMIT,
                    page_token: token,
                    order: v1::Order::OldestFirst as i32,
                })
                .await?;
            if out.window.is_none() {
                out.window = r.window;
                out.total_matched = r.total_matched;
                out.hints = r.hints;
            }
            out.events.extend(r.events);
            if out.events.len() >= max {
                out.truncated = !r.next_page_token.is_empty() || out.events.len() > max;
                out.events.truncate(max);
                return Ok(out);
            }
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }
}

#[derive(Default)]
pub struct Scan {
    pub events: Vec<v1::Event>,
    pub window: Option<v1::ResolvedWindow>,
    pub total_matched: u64,
    pub truncated: bool,
    pub hints: Vec<String>,
}
