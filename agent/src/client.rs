//! The Ingest stream to the collector: at-least-once delivery of the spool.
//!
//! On every (re)connect the agent first sends an empty batch (hello); the collector answers with
//! the highest seq it has stored for this agent, so the agent drops what is already safe and
//! resends everything after it. Events are sent as soon as they are spooled (an XID is never held
//! back to fill a batch); when several are waiting they go together, up to the batch limits. The
//! collector drops duplicates by (agent_id, seq), so resends are harmless.
//!
//! A batch the collector refuses (invalid, too large, or holding a payload it does not know) is
//! never resent as it was: the agent halves its batches and sends them one at a time until the
//! refused batch is a single event, sets that event aside as a `Gap{COLLECTOR_REFUSED}` with
//! the collector's reason, and goes on (batches grow back as acks arrive). No answer makes the
//! agent resend the same batch forever.
use std::{sync::Arc, time::Duration};

use gpulse_proto::{client::ClientOptions, raw::RawBatch, v1::Ack};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::{spool::SharedSpool, stats::AgentStats};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub collector: String,
    pub agent_id: String,
    pub boot_id: String,
    pub node: String,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    /// Events sent but not yet acknowledged before the sender waits for acks.
    pub max_in_flight: u64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// TLS, client certificate and token (`--ca-file`, `--tls-client-*`, `--token-file`).
    pub tls: ClientOptions,
}

impl ClientConfig {
    pub fn new(collector: String, agent_id: String, boot_id: String, node: String) -> Self {
        Self {
            collector,
            agent_id,
            boot_id,
            node,
            max_batch_events: 512,
            max_batch_bytes: 1 << 20,
            max_in_flight: 8192,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            tls: ClientOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Options(#[from] gpulse_proto::client::ClientError),
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("collector closed the stream")]
    Closed,
    #[error("collector acknowledged seq {acked} beyond the last sent seq {sent}")]
    BadAck { acked: u64, sent: u64 },
}

impl ClientError {
    /// The collector refused what was sent (not a broken connection): resending the same
    /// batch would be refused again.
    fn refusal(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::OutOfRange
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                Some(s)
            }
            _ => None,
        }
    }
}

/// How many events the next batches carry. Below the configured maximum the client is
/// isolating a refused event: it sends one batch at a time, so a refusal names its batch.
#[derive(Debug)]
struct BatchLimit {
    max: usize,
    now: usize,
}

impl BatchLimit {
    fn probing(&self) -> bool {
        self.now < self.max
    }

    /// A batch of `n` events starting after `acked` was refused with `status`. Returns the
    /// seq to set aside when the batch was a single event.
    fn refused(&mut self, sent_one: bool, acked: u64) -> Option<u64> {
        if sent_one {
            return Some(acked + 1);
        }
        self.now = (self.now / 2).max(1);
        None
    }

    fn acked(&mut self) {
        self.now = (self.now * 2).min(self.max);
    }
}

/// Validates the URL and the TLS files early, so a typo is a clear start-up error, not an
/// endless reconnect loop.
pub fn endpoint(url: &str, opts: &ClientOptions) -> Result<Endpoint, ClientError> {
    let ep = opts.endpoint(url)?;
    // HTTP/2 PINGs even while no batch is in flight, and TCP keepalive under them: a collector
    // that vanished without a FIN (a node or a network path gone) is noticed within ~30 s and
    // the agent reconnects, instead of spooling behind a dead stream.
    Ok(ep
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(20)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Runs until `shutdown` turns true and the spool has been flushed (or the flush timed out).
pub async fn run(
    cfg: ClientConfig,
    spool: Arc<SharedSpool>,
    stats: Arc<AgentStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let ep = endpoint(&cfg.collector, &cfg.tls)?;
    let mut backoff = cfg.backoff_min;
    let mut limit = BatchLimit {
        max: cfg.max_batch_events.max(1),
        now: cfg.max_batch_events.max(1),
    };
    loop {
        if *shutdown.borrow() && spool.lock().is_empty() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let mut last_batch = 0;
        match session(
            &cfg,
            &ep,
            &spool,
            &stats,
            &mut shutdown,
            &mut limit,
            &mut last_batch,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) => {
                // Whatever was in flight on the dead connection is unsent again.
                let acked = {
                    let mut s = spool.lock();
                    let acked = s.acked_through();
                    s.rewind_sent(acked);
                    acked
                };
                // A refusal of the Hello itself (last_batch 0) is no batch's fault: back off.
                if let Some(status) = e.refusal()
                    && last_batch > 0
                {
                    // Probing sends one batch at a time, so the refused batch starts right
                    // after what is acknowledged.
                    let single = limit.probing() && last_batch == 1;
                    if let Some(seq) = limit.refused(single, acked) {
                        let kind = spool.set_aside(seq, status.message());
                        AgentStats::add(&stats.events_refused, 1);
                        warn!(seq, kind = ?kind, reason = %status.message(), "collector refused one event; set aside as a gap, delivering the rest");
                    } else {
                        warn!(reason = %status.message(), batch_events = limit.now, "collector refused a batch; resending in smaller batches to isolate the event");
                    }
                    // Our batch, not the collector, was at fault: go again at once.
                    continue;
                }
                if *shutdown.borrow() {
                    warn!(error = %e, unacked = spool.lock().len(), "collector unreachable during shutdown; unsent events are lost with this process");
                    return Ok(());
                }
                AgentStats::add(&stats.reconnects, 1);
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = cfg.backoff_min;
                }
                if let ClientError::Status(s) = &e
                    && matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    )
                {
                    // Not a network blip: retried (a rotated token or a fixed token file may
                    // cure it) at the longest back-off, and said plainly.
                    AgentStats::add(&stats.auth_refused, 1);
                    backoff = cfg.backoff_max;
                    warn!(code = ?s.code(), reason = %s.message(), collector = %cfg.collector, spooled = spool.lock().len(), "collector refused our credentials; check --token-file / --tls-client-cert and the collector's auth settings");
                } else {
                    warn!(error = %e, collector = %cfg.collector, retry_in_ms = backoff.as_millis() as u64, spooled = spool.lock().len(), "collector stream lost; reconnecting");
                }
                tokio::select! {
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
        }
    }
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    // 75%..125% of the nominal delay, so a fleet of agents does not reconnect in lockstep.
    d.mul_f64(0.75 + f64::from(nanos % 500) / 1000.0)
}

async fn session(
    cfg: &ClientConfig,
    ep: &Endpoint,
    spool: &Arc<SharedSpool>,
    stats: &Arc<AgentStats>,
    shutdown: &mut watch::Receiver<bool>,
    limit: &mut BatchLimit,
    last_batch: &mut usize,
) -> Result<(), ClientError> {
    // The token file is re-read per session: the kubelet rotates projected tokens.
    let creds = cfg.tls.credentials()?;
    let channel = creds.wrap(ep.connect().await?);
    // `gpulse.v1.Ingest/Push` with each event as the bytes the spool keeps (`RawBatch` is
    // wire-identical to `Batch`): nothing is decoded or encoded again to send it.
    let mut client = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(4 << 20)
        .max_encoding_message_size(4 << 20);
    let (tx, rx) = mpsc::channel::<RawBatch>(16);
    let hello = batch(cfg, 0, Vec::new());
    tx.send(hello).await.map_err(|_| ClientError::Closed)?;
    client
        .ready()
        .await
        .map_err(|e| ClientError::Status(tonic::Status::unavailable(format!("not ready: {e}"))))?;
    let mut acks = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/gpulse.v1.Ingest/Push"),
            tonic_prost::ProstCodec::<RawBatch, Ack>::default(),
        )
        .await?
        .into_inner();
    let first = acks.message().await?.ok_or(ClientError::Closed)?;
    let last = spool.lock().last_seq();
    if first.through_seq > last {
        // The collector holds more of this (persistent) agent id than the spool knows: a power
        // loss took the log's newest frames after they were acknowledged. Continue after it.
        warn!(
            collector_through = first.through_seq,
            spool_last = last,
            "collector is ahead of the spool log; continuing after its seq"
        );
        spool.skip_to(first.through_seq);
    } else {
        spool.ack(first.through_seq);
    }
    let mut sent_through = {
        let mut s = spool.lock();
        let resume = s.acked_through().max(first.through_seq);
        s.rewind_sent(resume);
        resume
    };
    info!(collector = %cfg.collector, resume_after = sent_through, spooled = spool.lock().len(), "connected to collector");

    loop {
        // Send everything that is waiting, within the in-flight window.
        loop {
            let (events, acked) = {
                let s = spool.lock();
                let acked = s.acked_through();
                // While isolating a refused event, one batch at a time.
                let window = if limit.probing() {
                    1
                } else {
                    cfg.max_in_flight
                };
                if sent_through.saturating_sub(acked) >= window {
                    (Vec::new(), acked)
                } else {
                    (
                        s.unsent(sent_through, limit.now, cfg.max_batch_bytes),
                        acked,
                    )
                }
            };
            let Some(last) = events.last().map(|e| e.seq) else {
                break;
            };
            let first_seq = events[0].seq;
            let n = events.len() as u64;
            *last_batch = events.len();
            debug!(first_seq, n, acked, "sending batch");
            spool.lock().mark_sent(last);
            tx.send(batch(cfg, first_seq, events))
                .await
                .map_err(|_| ClientError::Closed)?;
            AgentStats::add(&stats.events_sent, n);
            sent_through = last;
        }
        if *shutdown.borrow() && spool.lock().is_empty() {
            return Ok(());
        }
        tokio::select! {
            ack = acks.message() => {
                let ack: Ack = ack?.ok_or(ClientError::Closed)?;
                if ack.through_seq > sent_through {
                    return Err(ClientError::BadAck { acked: ack.through_seq, sent: sent_through });
                }
                let n = spool.ack(ack.through_seq);
                AgentStats::add(&stats.events_acked, n);
                if n > 0 {
                    limit.acked();
                }
            }
            _ = spool.notify.notified() => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn batch(cfg: &ClientConfig, first_seq: u64, events: Vec<crate::spool::Unsent>) -> RawBatch {
    RawBatch {
        agent_id: cfg.agent_id.clone(),
        boot_id: cfg.boot_id.clone(),
        node: cfg.node.clone(),
        first_seq,
        events: events.into_iter().map(|e| e.bytes).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_fail_fast() {
        assert!(matches!(
            endpoint("not a url", &ClientOptions::default()),
            Err(ClientError::Options(
                gpulse_proto::client::ClientError::BadUrl(..)
            ))
        ));
        assert!(endpoint("http://127.0.0.1:7700", &ClientOptions::default()).is_ok());
        let j = jitter(Duration::from_millis(1000));
        assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
    }
}
