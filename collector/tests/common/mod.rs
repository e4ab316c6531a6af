//! In-process harness: a collector's gRPC services over a tokio duplex pipe (no sockets).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
#![allow(dead_code)]

use std::{path::Path, time::Duration};

use gpulse_collector::{
    grpc::{IngestService, TelemetryService},
    state::{self, StoreConfig, StoreHandle},
    telemetry::Metrics,
};
use gpulse_proto::{
    raw::ingest_server::IngestServer,
    v1::{
        self, Ack, Batch, SubscribeRequest, SubscribeResponse, event::Payload,
        ingest_client::IngestClient, telemetry_client::TelemetryClient,
        telemetry_server::TelemetryServer,
    },
};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};

pub struct Harness {
    pub store: StoreHandle,
    pub metrics: Metrics,
    pub channel: Channel,
}

pub fn store_config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir.to_path_buf());
    c.wal_segment_bytes = 64 << 10;
    c
}

pub async fn start(cfg: StoreConfig) -> Harness {
    start_with_limit(cfg, 4 << 20).await
}

pub async fn start_with_limit(cfg: StoreConfig, max_message: usize) -> Harness {
    let metrics = Metrics::new().unwrap();
    let store = state::start(cfg, metrics.clone()).unwrap();
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let ingest = IngestServer::new(IngestService {
        store: store.clone(),
        auth: gpulse_collector::auth::Auth::off(metrics.auth_refused.clone()),
        metrics: metrics.clone(),
        stop: gpulse_collector::shutdown::Shutdown::never(),
    })
    .max_decoding_message_size(max_message);
    let telemetry = TelemetryServer::new(TelemetryService {
        store: store.clone(),
        stop: gpulse_collector::shutdown::Shutdown::never(),
        history: Default::default(),
    });
    tokio::spawn(
        Server::builder()
            .add_service(ingest)
            .add_service(telemetry)
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io))),
    );
    let mut client_io = Some(client_io);
    let channel = Endpoint::try_from("http://in-process.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("duplex already used"))
            }
        }))
        .await
        .unwrap();
    Harness {
        store,
        metrics,
        channel,
    }
}

/// An open Ingest stream for one agent.
pub struct AgentStream {
    pub tx: mpsc::Sender<Batch>,
    pub acks: tonic::Streaming<Ack>,
    pub agent_id: String,
    pub node: String,
}

impl AgentStream {
    pub async fn open(h: &Harness, agent_id: &str, node: &str) -> (Self, Ack) {
        let (tx, rx) = mpsc::channel(16);
        tx.send(Batch {
            agent_id: agent_id.into(),
            node: node.into(),
            boot_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut acks = IngestClient::new(h.channel.clone())
            .push(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let hello = acks.message().await.unwrap().unwrap();
        (
            Self {
                tx,
                acks,
                agent_id: agent_id.into(),
                node: node.into(),
            },
            hello,
        )
    }

    pub async fn send(
        &mut self,
        first_seq: u64,
        events: Vec<v1::Event>,
    ) -> Result<Ack, tonic::Status> {
        self.tx
            .send(Batch {
                agent_id: self.agent_id.clone(),
                node: self.node.clone(),
                boot_id: "b".into(),
                first_seq,
                events,
                delivered_through: 0,
            })
            .await
            .map_err(|_| tonic::Status::unavailable("closed"))?;
        match self.acks.message().await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(tonic::Status::unavailable("stream ended")),
            Err(s) => Err(s),
        }
    }
}

pub fn xid(code: u32, msg: &str) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::Xid as i32,
        severity: if code == 79 {
            v1::Severity::Fatal
        } else {
            v1::Severity::Error
        } as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::Xid(v1::Xid {
            code,
            pci: "0000:3b:00.0".into(),
            message: msg.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn log(msg: &str) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::DriverLog as i32,
        severity: v1::Severity::Info as i32,
        payload: Some(Payload::DriverLog(v1::DriverLog {
            text: msg.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub async fn subscribe(h: &Harness, req: SubscribeRequest) -> tonic::Streaming<SubscribeResponse> {
    TelemetryClient::new(h.channel.clone())
        .subscribe(req)
        .await
        .unwrap()
        .into_inner()
}

/// Next message within a deadline (tests never hang).
/// The next message of a subscription, past the collector's own GPU verdict events (these
/// tests are about the events agents send; verdicts have tests of their own).
pub async fn next(s: &mut tonic::Streaming<SubscribeResponse>) -> Option<SubscribeResponse> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("timed out waiting for a subscriber message")
            .unwrap();
        if !is_verdict(&m) {
            return m;
        }
    }
}

/// Events stored from agents: the status's total less the collector's own verdict events.
pub fn agent_events(st: &gpulse_proto::v1::StatusResponse) -> u64 {
    let verdicts = st
        .kinds
        .iter()
        .find(|k| k.kind == gpulse_proto::v1::EventKind::GpuHealth as i32)
        .map_or(0, |k| k.events);
    st.events_stored - verdicts
}

/// A gpu_health event (written by the collector when a GPU's verdict changes).
pub fn is_verdict(m: &Option<SubscribeResponse>) -> bool {
    use gpulse_proto::v1::subscribe_response::Msg;
    matches!(
        m.as_ref().and_then(|m| m.msg.as_ref()),
        Some(Msg::Event(e)) if matches!(e.payload, Some(Payload::GpuHealth(_)))
    )
}

pub fn message_of(r: &SubscribeResponse) -> String {
    use gpulse_proto::v1::subscribe_response::Msg;
    match &r.msg {
        Some(Msg::Event(e)) => match &e.payload {
            Some(Payload::Xid(x)) => x.message.clone(),
            Some(Payload::DriverLog(d)) => d.text.clone(),
            other => format!("{other:?}"),
        },
        Some(Msg::Lagged(l)) => format!("lagged {}", l.missed),
        Some(Msg::Upstream(u)) => format!("upstream {} {}", u.name, u.state),
        None => String::new(),
    }
}
