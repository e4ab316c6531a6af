//! The Telemetry API as a value: whatever answers it (a collector's own service in-process, or
//! a collector or gateway over gRPC) behind one shared handle, so that MCP, the CLI and a
//! gateway are written once against the service trait.
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::client::AuthChannel;

use crate::v1::{
    GpuHealthRequest, GpuHealthResponse, ListEventsRequest, ListEventsResponse, NodesRequest,
    NodesResponse, ProcessesRequest, ProcessesResponse, StatusRequest, StatusResponse,
    SubscribeRequest, SubscribeResponse, SummarizeRequest, SummarizeResponse, TrendRequest,
    TrendResponse, XidGroupsRequest, XidGroupsResponse, telemetry_client::TelemetryClient,
    telemetry_server::Telemetry,
};

/// Request metadata naming the upstreams a gateway should ask: comma-separated names, a nested
/// one as `NAME/INNER` (a cluster, or one shard of it), a gateway's own `--cluster` for all of
/// them. Absent: every upstream. A collector answers for itself whatever it says.
pub const SELECT_UPSTREAMS: &str = "gpulse-upstreams";

/// A request for `msg` carrying the selection header of `from` (a call forwarded upstream keeps
/// the caller's selection, and nothing else of its metadata).
pub fn forwarded<T, U>(from: &Request<U>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(v) = from.metadata().get(SELECT_UPSTREAMS) {
        r.metadata_mut().insert(SELECT_UPSTREAMS, v.clone());
    }
    r
}

/// The stream every shared Telemetry implementation answers Subscribe with.
pub type SubscribeStream = tonic::codegen::BoxStream<SubscribeResponse>;

/// Any Telemetry implementation, shared.
pub type SharedTelemetry = Arc<dyn Telemetry<SubscribeStream = SubscribeStream>>;

/// The Telemetry API of a remote collector (or gateway), reached over a gRPC channel.
#[derive(Clone)]
pub struct RemoteTelemetry {
    client: TelemetryClient<AuthChannel>,
}

impl RemoteTelemetry {
    pub fn new(client: TelemetryClient<AuthChannel>) -> Self {
        Self { client }
    }

    pub fn shared(client: TelemetryClient<AuthChannel>) -> SharedTelemetry {
        Arc::new(Self::new(client))
    }
}

/// Forwards one unary call: the request's message and upstream selection (the rest of the
/// caller's metadata, its credentials included, is its own).
/// Written in the form `#[tonic::async_trait]` expands to, which it cannot do inside a macro.
macro_rules! forward {
    ($name:ident, $req:ty, $resp:ty) => {
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            req: Request<$req>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let mut client = self.client.clone();
            let req = forwarded(&req, req.get_ref().clone());
            Box::pin(async move { client.$name(req).await })
        }
    };
}

#[tonic::async_trait]
impl Telemetry for RemoteTelemetry {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = forwarded(&req, req.get_ref().clone());
        let stream = self.client.clone().subscribe(req).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    forward!(status, StatusRequest, StatusResponse);
    forward!(nodes, NodesRequest, NodesResponse);
    forward!(list_events, ListEventsRequest, ListEventsResponse);
    forward!(trend, TrendRequest, TrendResponse);
    forward!(summarize, SummarizeRequest, SummarizeResponse);
    forward!(xid_groups, XidGroupsRequest, XidGroupsResponse);
    forward!(processes, ProcessesRequest, ProcessesResponse);
    forward!(gpu_health, GpuHealthRequest, GpuHealthResponse);
}
