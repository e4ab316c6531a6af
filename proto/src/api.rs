//! The Telemetry API as a value: whatever answers it (a collector's own service in-process, or
//! a collector or gateway over gRPC) behind one shared handle, so that MCP, the CLI and a
//! gateway are written once against the service trait.
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::client::AuthChannel;

use crate::v1::{
    ListEventsRequest, ListEventsResponse, NodesRequest, NodesResponse, ProcessesRequest,
    ProcessesResponse, StatusRequest, StatusResponse, SubscribeRequest, SubscribeResponse,
    SummarizeRequest, SummarizeResponse, TrendRequest, TrendResponse, XidGroupsRequest,
    XidGroupsResponse, telemetry_client::TelemetryClient, telemetry_server::Telemetry,
};

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

/// Forwards one unary call: the request's message only (the caller's metadata is its own).
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
            Box::pin(async move { client.$name(req.into_inner()).await })
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
        let stream = self
            .client
            .clone()
            .subscribe(req.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    forward!(status, StatusRequest, StatusResponse);
    forward!(nodes, NodesRequest, NodesResponse);
    forward!(list_events, ListEventsRequest, ListEventsResponse);
    forward!(trend, TrendRequest, TrendResponse);
    forward!(summarize, SummarizeRequest, SummarizeResponse);
    forward!(xid_groups, XidGroupsRequest, XidGroupsResponse);
    forward!(processes, ProcessesRequest, ProcessesResponse);
}
