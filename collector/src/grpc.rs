//! gRPC services: `Ingest.Push` (agents) and `Telemetry` (clients: Subscribe, Status, Nodes,
//! ListEvents, Trend).
use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt, stream};
use gpulse_proto::{
    raw::{RawBatch, ingest_server::Ingest},
    v1::{
        self, Ack, StatusRequest, StatusResponse, SubscribeRequest, SubscribeResponse,
        subscribe_response::Msg, telemetry_server::Telemetry,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    auth::{self, Auth, Identity},
    batch::IngestBatch,
    query::{QueryError, aggregate},
    shutdown::{STOPPING, Shutdown},
    state::{StoreError, StoreHandle, SubMsg},
    telemetry::Metrics,
};
use gpulse_proto::filter::Filter;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed | StoreError::Write(_) | StoreError::Failed(_) => {
                Status::unavailable(e.to_string())
            }
            StoreError::TooManySubscribers(_) => Status::resource_exhausted(e.to_string()),
            StoreError::Takeover(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

/// Longest an ingest stream waits for room in the log.
const LOG_FULL_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct IngestService {
    pub store: StoreHandle,
    /// Counts and logs pushes for another node.
    pub auth: Arc<Auth>,
    pub metrics: Metrics,
    /// Ends every Push stream (after its pending acks) when the collector stops.
    pub stop: Shutdown,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

/// What the ack task sends next, in batch order.
enum Pending {
    /// An ack, once its batch is durable.
    Ack(
        Ack,
        Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    ),
    /// The stream ends with this status after the acks before it.
    Refused(Status),
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type PushStream = AckStream;

    async fn push(
        &self,
        req: Request<Streaming<RawBatch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let peer = req.remote_addr();
        // Set by the interceptor when auth is on: the node this caller may push for.
        let identity = req.extensions().get::<Identity>().cloned();
        let auth = self.auth.clone();
        let mut inbound = req.into_inner();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let (out_tx, out_rx) = mpsc::channel::<Result<Ack, Status>>(64);
        // Acks go out in batch order, each once its batch is durable; reading the next batch
        // never waits for the previous one's fsync. A refusal queues behind the acks of the
        // batches before it, so the agent knows exactly which batch was refused.
        let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(1024);
        let ack_stop = self.stop.clone();
        tokio::spawn(async move {
            while let Some(p) = pending_rx.recv().await {
                let (ack, durable) = match p {
                    Pending::Ack(ack, durable) => (ack, durable),
                    Pending::Refused(status) => {
                        let _ = out_tx.send(Err(status)).await;
                        return;
                    }
                };
                if let Some(d) = durable {
                    match d.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            let _ = out_tx
                                .send(Err(Status::unavailable(format!("store sync failed: {e}"))))
                                .await;
                            return;
                        }
                        Err(_) => {
                            let _ = out_tx.send(Err(Status::unavailable("store stopped"))).await;
                            return;
                        }
                    }
                }
                if out_tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
            // Every batch read before the stop is acknowledged above; now tell the agent why the
            // stream ends so it reconnects (to this collector's successor) instead of waiting.
            if ack_stop.is_triggered() {
                let _ = out_tx.send(Err(Status::unavailable(STOPPING))).await;
            }
        });
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut agent: Option<String> = None;
            // Sent after the agent is marked disconnected, so that its reconnect (prompted by
            // the refusal) never finds its own old stream still connected.
            let mut refusal: Option<Status> = None;
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.wait() => {
                        debug!(?peer, "collector stopping: ingest stream ends after its pending acks");
                        break;
                    }
                    next = inbound.message() => next,
                };
                let raw = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(status) => {
                        // e.g. a message over --max-message-bytes: tell the agent why.
                        debug!(?peer, %status, "ingest stream ended with an error");
                        refusal = Some(status);
                        break;
                    }
                };
                let raw_agent = raw.agent_id.clone();
                let batch = match IngestBatch::from_raw(raw, agent.as_deref()) {
                    Ok(b) => b,
                    Err(status) => {
                        metrics.ingest_rejected_batches.inc();
                        warn!(?peer, agent = %raw_agent, error = %status.message(), "rejected malformed batch");
                        refusal = Some(status);
                        break;
                    }
                };
                if let Some(id) = &identity
                    && let Err(status) = own_node(id, &batch.node, &batch.agent_id)
                {
                    auth.refuse(auth::reason::OTHER_NODE, &id.name);
                    refusal = Some(status);
                    break;
                }
                if agent.is_none() {
                    match store
                        .hello(
                            batch.agent_id.clone(),
                            batch.node.clone(),
                            batch.boot_id.clone(),
                            peer.map(|p| p.ip()),
                        )
                        .await
                    {
                        Ok(through) => {
                            info!(?peer, agent = %batch.agent_id, node = %batch.node, through_seq = through, "agent connected");
                            agent = Some(batch.agent_id.clone());
                            if batch.events.is_empty() {
                                let _ = pending_tx
                                    .send(Pending::Ack(
                                        Ack {
                                            through_seq: through,
                                            duplicates: 0,
                                        },
                                        None,
                                    ))
                                    .await;
                                continue;
                            }
                        }
                        Err(e) => {
                            if matches!(e, StoreError::Takeover(_)) {
                                warn!(?peer, agent = %batch.agent_id, error = %e, "refused a second stream for a connected agent");
                            }
                            refusal = Some(e.into());
                            break;
                        }
                    }
                }
                // While a snapshot catches up with a log over its hard limit, this stream is
                // not read (HTTP/2 flow control holds the agent back; it spools). Bounded: after
                // LOG_FULL_MAX_WAIT the batch goes in anyway (a snapshot that keeps failing
                // must not stop ingest for good; its failures are counted and logged).
                // A stop ends the wait at once (the batch is then not stored; the agent resends).
                let waited = tokio::select! {
                    biased;
                    () = stop.wait() => break,
                    w = store.health().wait_log_room(LOG_FULL_MAX_WAIT) => w,
                };
                if waited {
                    metrics.ingest_log_full_waits.inc();
                }
                match store.ingest(batch).await {
                    Ok(o) => {
                        let ack = Ack {
                            through_seq: o.through_seq,
                            duplicates: o.duplicates,
                        };
                        if pending_tx.send(Pending::Ack(ack, o.durable)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        if matches!(e, StoreError::Takeover(_)) {
                            warn!(?peer, error = %e, "refused a batch");
                        }
                        refusal = Some(e.into());
                        break;
                    }
                }
            }
            if let Some(a) = agent {
                info!(?peer, agent = %a, "agent disconnected");
                store.disconnected(a).await;
            }
            if let Some(status) = refusal {
                let _ = pending_tx.send(Pending::Refused(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// An agent identity may push only its own node's batches, under an agent id of that node
/// (`NODE/...`, as agents make them).
fn own_node(id: &Identity, node: &str, agent_id: &str) -> Result<(), Status> {
    let Some(own) = id.node.as_deref() else {
        return Err(Status::permission_denied(
            "this identity is bound to no node; it may not push",
        ));
    };
    let id_node = agent_id.split_once('/').map(|(n, _)| n);
    if node != own || id_node != Some(own) {
        return Err(Status::permission_denied(format!(
            "{} may push only for node {own:?} (batch.node {node:?}, agent id {agent_id:?})",
            id.name
        )));
    }
    Ok(())
}

pub struct TelemetryService {
    pub store: StoreHandle,
    /// Ends every Subscribe stream when the collector stops.
    pub stop: Shutdown,
    /// Trends reaching back past local retention are completed from this TSDB.
    pub history: Option<std::sync::Arc<crate::history::History>>,
}

type SubStream = gpulse_proto::api::SubscribeStream;

fn to_response(m: SubMsg) -> Result<SubscribeResponse, Status> {
    Ok(SubscribeResponse {
        msg: Some(match m {
            // One stored before event bounds, too large for a message: its envelope, so the
            // replay goes on past it instead of ending there on every reconnect.
            SubMsg::Event(e) => Msg::Event(
                gpulse_proto::bounds::envelope_if_oversized(&e).unwrap_or_else(|| (*e).clone()),
            ),
            SubMsg::Lagged(l) => Msg::Lagged(l),
        }),
        resume_token: Default::default(),
    })
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type SubscribeStream = SubStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        let filter =
            Filter::from_wire(req.filter).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sub = self
            .store
            .subscribe(filter.clone(), req.after_cursor)
            .await?;
        // The replay continues a step at a time, each read from the store only once the client
        // has taken the one before (the stream is polled on demand): back-pressure, and no
        // replay of any length held in memory.
        let store = self.store.clone();
        let rest = stream::unfold(sub.next, move |next| {
            let (store, filter) = (store.clone(), filter.clone());
            async move {
                let from = next?;
                let step = store.replay_step(filter, from).await.ok()?;
                Some((stream::iter(step.events), step.next))
            }
        })
        .flatten();
        let replay = stream::iter(sub.replay).chain(rest).map(to_response);
        let live = ReceiverStream::new(sub.live).map(to_response);
        let mut stop = self.stop.clone();
        // The stream only ends when the collector stops (or its store task is gone): either way
        // the client is told to reconnect, and resumes after the last cursor it saw.
        let ended = stream::once(async { Err(Status::unavailable(STOPPING)) });
        let stream = replay
            .chain(live)
            .take_until(async move { stop.wait().await })
            .chain(ended);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.store.status().await?))
    }

    async fn nodes(
        &self,
        req: Request<v1::NodesRequest>,
    ) -> Result<Response<v1::NodesResponse>, Status> {
        let r = self.store.nodes(req.into_inner().window).await?;
        Ok(Response::new(r?))
    }

    async fn list_events(
        &self,
        req: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        let r = self.store.list_events(req.into_inner()).await?;
        Ok(Response::new(r?))
    }

    async fn trend(
        &self,
        req: Request<v1::TrendRequest>,
    ) -> Result<Response<v1::TrendResponse>, Status> {
        let req = req.into_inner();
        let r = self.store.trend(req.clone()).await??;
        Ok(Response::new(match &self.history {
            Some(h) => h.complete(&req, r).await,
            None => r,
        }))
    }

    async fn summarize(
        &self,
        req: Request<v1::SummarizeRequest>,
    ) -> Result<Response<v1::SummarizeResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .store
            .read_events("Summarize", move |s, now| aggregate::summarize(s, req, now))
            .await?;
        Ok(Response::new(r?))
    }

    async fn xid_groups(
        &self,
        req: Request<v1::XidGroupsRequest>,
    ) -> Result<Response<v1::XidGroupsResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .store
            .read_events("XidGroups", move |s, now| {
                aggregate::xid_groups(s, req, now)
            })
            .await?;
        Ok(Response::new(r?))
    }

    async fn processes(
        &self,
        req: Request<v1::ProcessesRequest>,
    ) -> Result<Response<v1::ProcessesResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .store
            .read_events("Processes", move |s, now| aggregate::processes(s, req, now))
            .await?;
        Ok(Response::new(r?))
    }

    async fn gpu_health(
        &self,
        req: Request<v1::GpuHealthRequest>,
    ) -> Result<Response<v1::GpuHealthResponse>, Status> {
        Ok(Response::new(
            self.store.gpu_health(req.into_inner()).await?,
        ))
    }
}

impl From<QueryError> for Status {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Decode(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}
