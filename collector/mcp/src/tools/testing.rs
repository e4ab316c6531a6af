//! For the per-tool tests: a Telemetry API with canned answers that records what each tool
//! asked, and an rmcp client talking to the server over a tokio duplex pipe.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::{Arc, Mutex};

use gpulse_proto::{
    api::SubscribeStream,
    time::from_unix_nanos,
    v1::{
        GpuHealthRequest, GpuHealthResponse, ListEventsRequest, ListEventsResponse, NodesRequest,
        NodesResponse, ProcessesRequest, ProcessesResponse, ResolvedWindow, StatusRequest,
        StatusResponse, SubscribeRequest, SummarizeRequest, SummarizeResponse, TrendRequest,
        TrendResponse, XidGroupsRequest, XidGroupsResponse, telemetry_server::Telemetry,
    },
};
use rmcp::{ServiceExt, model::CallToolRequestParams, service::RunningService};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::GpulseMcp;

/// What the fake answers; `fail` makes every call fail with that status.
#[derive(Clone, Default)]
pub struct Answers {
    pub status: StatusResponse,
    pub nodes: NodesResponse,
    pub list: ListEventsResponse,
    pub trend: TrendResponse,
    pub summary: SummarizeResponse,
    pub groups: XidGroupsResponse,
    pub processes: ProcessesResponse,
    pub health: GpuHealthResponse,
    pub fail: Option<Status>,
}

#[derive(Default)]
pub struct Fake {
    pub answers: Answers,
    /// Every request, as `Rpc Debug-of-request`.
    pub asked: Mutex<Vec<String>>,
}

impl Fake {
    fn answer<Q: std::fmt::Debug, T: Clone>(
        &self,
        rpc: &str,
        req: Request<Q>,
        pick: impl Fn(&Answers) -> &T,
    ) -> Result<Response<T>, Status> {
        let scope = req
            .metadata()
            .get(gpulse_proto::api::SELECT_UPSTREAMS)
            .map(|v| format!(" [scope={}]", v.to_str().unwrap()))
            .unwrap_or_default();
        self.asked
            .lock()
            .unwrap()
            .push(format!("{rpc} {:?}{scope}", req.get_ref()));
        match &self.answers.fail {
            Some(s) => Err(s.clone()),
            None => Ok(Response::new(pick(&self.answers).clone())),
        }
    }

    /// The requests made to `rpc`.
    pub fn asked(&self, rpc: &str) -> Vec<String> {
        let prefix = format!("{rpc} ");
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl Telemetry for Fake {
    type SubscribeStream = SubscribeStream;
    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        Err(Status::unimplemented("no tool subscribes"))
    }
    async fn status(&self, r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.answer("Status", r, |a| &a.status)
    }
    async fn nodes(&self, r: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        self.answer("Nodes", r, |a| &a.nodes)
    }
    async fn list_events(
        &self,
        r: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        self.answer("ListEvents", r, |a| &a.list)
    }
    async fn trend(&self, r: Request<TrendRequest>) -> Result<Response<TrendResponse>, Status> {
        self.answer("Trend", r, |a| &a.trend)
    }
    async fn summarize(
        &self,
        r: Request<SummarizeRequest>,
    ) -> Result<Response<SummarizeResponse>, Status> {
        self.answer("Summarize", r, |a| &a.summary)
    }
    async fn xid_groups(
        &self,
        r: Request<XidGroupsRequest>,
    ) -> Result<Response<XidGroupsResponse>, Status> {
        self.answer("XidGroups", r, |a| &a.groups)
    }
    async fn processes(
        &self,
        r: Request<ProcessesRequest>,
    ) -> Result<Response<ProcessesResponse>, Status> {
        self.answer("Processes", r, |a| &a.processes)
    }
    async fn gpu_health(
        &self,
        r: Request<GpuHealthRequest>,
    ) -> Result<Response<GpuHealthResponse>, Status> {
        self.answer("GpuHealth", r, |a| &a.health)
    }
}

pub fn at(secs: i64) -> Option<prost_types::Timestamp> {
    Some(from_unix_nanos(
        i128::from(1_764_000_000 + secs) * 1_000_000_000,
    ))
}

pub fn window() -> Option<ResolvedWindow> {
    Some(ResolvedWindow {
        start: at(0),
        end: at(3600),
        ..Default::default()
    })
}

/// A server over `answers` and a client connected to it.
pub struct Session {
    pub fake: Arc<Fake>,
    pub client: RunningService<rmcp::RoleClient, ()>,
}

impl Session {
    pub async fn new(answers: Answers) -> Self {
        let fake = Arc::new(Fake {
            answers,
            ..Default::default()
        });
        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let server = GpulseMcp::new(fake.clone());
        tokio::spawn(async move {
            let s = server.serve(server_io).await.unwrap();
            let _ = s.waiting().await;
        });
        let client = ().serve(client_io).await.unwrap();
        Self { fake, client }
    }

    /// (isError, structured content, first text block).
    pub async fn call(&self, tool: &str, args: Value) -> (bool, Value, String) {
        let r = self
            .client
            .call_tool(
                CallToolRequestParams::new(tool.to_string())
                    .with_arguments(args.as_object().cloned().unwrap_or_default()),
            )
            .await
            .unwrap();
        let text = r
            .content
            .first()
            .and_then(|c| c.as_text().map(|t| t.text.clone()))
            .unwrap_or_default();
        let err = r.is_error.unwrap_or(false);
        (err, r.structured_content.unwrap_or(Value::Null), text)
    }

    /// A call that must succeed: its structured content.
    pub async fn ok(&self, tool: &str, args: Value) -> Value {
        let (err, v, text) = self.call(tool, args).await;
        assert!(!err, "{tool}: {text}");
        v
    }

    /// A call that must fail: its text.
    pub async fn refused(&self, tool: &str, args: Value) -> String {
        let (err, _, text) = self.call(tool, args).await;
        assert!(err, "{tool}: expected isError, got {text}");
        text
    }
}
