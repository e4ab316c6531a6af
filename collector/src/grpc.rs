//! gRPC services: `Ingest.Push` (agents) and `Telemetry` (clients: Subscribe, Status, Nodes,
//! ListEvents, Trend).
use std::pin::Pin;

use futures::{Stream, StreamExt, stream};
use gpulse_proto::v1::{
    self, Ack, Batch, EventKind, StatusRequest, StatusResponse, SubscribeRequest,
    SubscribeResponse, ingest_server::Ingest, subscribe_response::Msg, telemetry_server::Telemetry,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    filter::Filter,
    metrics::Metrics,
    query::QueryError,
    state::{StoreError, StoreHandle, SubMsg},
};

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
const MAX_ID_LEN: usize = 256;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => Status::unavailable(e.to_string()),
            StoreError::Write(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Checks a batch's structure; fills in seqs and kinds an agent left at zero.
pub fn validate_batch(batch: &mut Batch, stream_agent: Option<&str>) -> Result<(), Status> {
    if batch.agent_id.is_empty() || batch.agent_id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "batch.agent_id must be 1..={MAX_ID_LEN} bytes"
        )));
    }
    if let Some(a) = stream_agent
        && a != batch.agent_id
    {
        return Err(Status::invalid_argument(format!(
            "batch.agent_id changed within one stream ({a:?} -> {:?}); open a new stream per agent",
            batch.agent_id
        )));
    }
    if batch.node.is_empty() || batch.node.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "batch.node must be 1..={MAX_ID_LEN} bytes"
        )));
    }
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(Status::invalid_argument(format!(
            "batch has {} events; at most {MAX_BATCH_EVENTS} are allowed",
            batch.events.len()
        )));
    }
    if !batch.events.is_empty() && batch.first_seq == 0 {
        return Err(Status::invalid_argument(
            "batch.first_seq must be >= 1 when the batch has events",
        ));
    }
    let first = batch.first_seq;
    for (i, ev) in batch.events.iter_mut().enumerate() {
        let want = first + i as u64;
        if ev.seq == 0 {
            ev.seq = want;
        } else if ev.seq != want {
            return Err(Status::invalid_argument(format!(
                "events[{i}].seq is {} but batch.first_seq {first} + {i} = {want}: seqs must be contiguous",
                ev.seq
            )));
        }
        let payload_kind = ev.payload_kind();
        if payload_kind == EventKind::Unspecified {
            return Err(Status::invalid_argument(format!(
                "events[{i}] (seq {want}) has no payload"
            )));
        }
        if ev.kind == EventKind::Unspecified as i32 {
            ev.kind = payload_kind as i32;
        } else if ev.kind != payload_kind as i32 {
            return Err(Status::invalid_argument(format!(
                "events[{i}] (seq {want}) kind {} does not match its {} payload",
                ev.kind,
                payload_kind.short_name()
            )));
        }
        if gpulse_proto::v1::Severity::try_from(ev.severity).is_err() {
            return Err(Status::invalid_argument(format!(
                "events[{i}] (seq {want}) has unknown severity {}",
                ev.severity
            )));
        }
    }
    Ok(())
}

pub struct IngestService {
    pub store: StoreHandle,
    pub metrics: Metrics,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type PushStream = AckStream;

    async fn push(
        &self,
        req: Request<Streaming<Batch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let (out_tx, out_rx) = mpsc::channel::<Result<Ack, Status>>(64);
        // Acks go out in batch order, each once its batch is durable; reading the next batch
        // never waits for the previous one's fsync.
        let (pending_tx, mut pending_rx) = mpsc::channel::<(
            Ack,
            Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
        )>(1024);
        let ack_out = out_tx.clone();
        tokio::spawn(async move {
            while let Some((ack, durable)) = pending_rx.recv().await {
                if let Some(d) = durable {
                    match d.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            let _ = ack_out
                                .send(Err(Status::unavailable(format!("store sync failed: {e}"))))
                                .await;
                            return;
                        }
                        Err(_) => {
                            let _ = ack_out
                                .send(Err(Status::unavailable("store stopped")))
                                .await;
                            return;
                        }
                    }
                }
                if ack_out.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut agent: Option<String> = None;
            loop {
                let mut batch = match inbound.message().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(status) => {
                        // e.g. a message over --max-message-bytes: tell the agent why.
                        debug!(?peer, %status, "ingest stream ended with an error");
                        let _ = out_tx.send(Err(status)).await;
                        break;
                    }
                };
                if let Err(status) = validate_batch(&mut batch, agent.as_deref()) {
                    metrics.ingest_rejected_batches.inc();
                    warn!(?peer, agent = %batch.agent_id, error = %status.message(), "rejected malformed batch");
                    let _ = out_tx.send(Err(status)).await;
                    break;
                }
                if agent.is_none() {
                    match store
                        .hello(
                            batch.agent_id.clone(),
                            batch.node.clone(),
                            batch.boot_id.clone(),
                        )
                        .await
                    {
                        Ok(through) => {
                            info!(?peer, agent = %batch.agent_id, node = %batch.node, through_seq = through, "agent connected");
                            agent = Some(batch.agent_id.clone());
                            if batch.events.is_empty() {
                                let _ = pending_tx
                                    .send((
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
                            let _ = out_tx.send(Err(e.into())).await;
                            break;
                        }
                    }
                }
                match store.ingest(batch).await {
                    Ok(o) => {
                        let ack = Ack {
                            through_seq: o.through_seq,
                            duplicates: o.duplicates,
                        };
                        if pending_tx.send((ack, o.durable)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = out_tx.send(Err(e.into())).await;
                        break;
                    }
                }
            }
            if let Some(a) = agent {
                info!(?peer, agent = %a, "agent disconnected");
                store.disconnected(a).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

pub struct TelemetryService {
    pub store: StoreHandle,
}

type SubStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

fn to_response(m: SubMsg) -> Result<SubscribeResponse, Status> {
    Ok(SubscribeResponse {
        msg: Some(match m {
            SubMsg::Event(e) => Msg::Event((*e).clone()),
            SubMsg::Lagged(l) => Msg::Lagged(l),
        }),
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
        let sub = self.store.subscribe(filter, req.after_cursor).await?;
        let replay = stream::iter(sub.replay).map(to_response);
        let live = ReceiverStream::new(sub.live).map(to_response);
        Ok(Response::new(Box::pin(replay.chain(live))))
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
        let r = self.store.trend(req.into_inner()).await?;
        Ok(Response::new(r?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::{self, event::Payload};

    fn batch(events: Vec<v1::Event>) -> Batch {
        Batch {
            agent_id: "n/a".into(),
            node: "n".into(),
            first_seq: 1,
            events,
            ..Default::default()
        }
    }

    fn log_ev(seq: u64) -> v1::Event {
        v1::Event {
            seq,
            payload: Some(Payload::DriverLog(v1::DriverLog::default())),
            ..Default::default()
        }
    }

    #[test]
    fn validation_accepts_and_fills() {
        let mut b = batch(vec![log_ev(0), log_ev(0)]);
        validate_batch(&mut b, None).unwrap();
        assert_eq!(b.events[1].seq, 2);
        assert_eq!(b.events[0].kind, EventKind::DriverLog as i32);
    }

    #[test]
    fn validation_rejects_with_clear_messages() {
        let cases: Vec<(Batch, &str)> = vec![
            (
                Batch {
                    agent_id: String::new(),
                    ..batch(vec![])
                },
                "agent_id",
            ),
            (
                Batch {
                    node: String::new(),
                    ..batch(vec![])
                },
                "node",
            ),
            (batch(vec![log_ev(1), log_ev(3)]), "contiguous"),
            (
                Batch {
                    first_seq: 0,
                    ..batch(vec![log_ev(0)])
                },
                "first_seq",
            ),
            (batch(vec![v1::Event::default()]), "no payload"),
            (
                batch(vec![v1::Event {
                    kind: EventKind::Xid as i32,
                    ..log_ev(1)
                }]),
                "does not match",
            ),
            (
                batch(vec![v1::Event {
                    severity: 77,
                    ..log_ev(1)
                }]),
                "severity",
            ),
            (
                batch(
                    (0..MAX_BATCH_EVENTS as u64 + 1)
                        .map(|_| log_ev(0))
                        .collect(),
                ),
                "at most",
            ),
        ];
        for (mut b, want) in cases {
            let err = validate_batch(&mut b, None).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().contains(want),
                "{} should mention {want}",
                err.message()
            );
        }
        let mut b = batch(vec![]);
        assert!(
            validate_batch(&mut b, Some("other"))
                .unwrap_err()
                .message()
                .contains("changed")
        );
    }
}
