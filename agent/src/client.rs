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

use crate::{
    shards::{self, Discovery, Shard},
    spool::SharedSpool,
    stats::AgentStats,
};

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
    /// `list` (the URLs in `collector`) or `dns` (every address of its one host name).
    pub shard_discovery: String,
    /// While on a shard other than its first-ranked one, how often the agent checks whether
    /// the first is back.
    pub return_check: Duration,
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
            shard_discovery: "list".into(),
            return_check: Duration::from_secs(10),
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
    #[error(transparent)]
    Shards(#[from] crate::shards::ShardError),
    /// The first-ranked shard is reachable again: leave the fallback for it.
    #[error("the first-ranked collector is back")]
    OwnerBack,
}

impl ClientError {
    /// The collector refused what was sent (not a broken connection): resending the same
    /// batch would be refused again. RESOURCE_EXHAUSTED is not one: any hop (a proxy, a load
    /// balancer) says it when it is busy, and setting an event aside for that would lose it
    /// (issue 27); it is retried after a back-off like an outage. A batch over the collector's
    /// message limit is OUT_OF_RANGE (tonic's decoder).
    fn refusal(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument | tonic::Code::OutOfRange
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

/// Validates the collector list and the TLS files early, so a typo is a clear start-up error,
/// not an endless reconnect loop.
pub fn check(
    cfg_collector: &str,
    discovery: &str,
    opts: &ClientOptions,
) -> Result<(), ClientError> {
    if let Discovery::List(list) = Discovery::parse(cfg_collector, discovery)? {
        for s in &list {
            endpoint(s, opts)?;
        }
    }
    Ok(())
}

/// The endpoint of one shard with the agent's connection settings.
pub fn endpoint(shard: &Shard, opts: &ClientOptions) -> Result<Endpoint, ClientError> {
    let ep = shards::endpoint(shard, opts)?;
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

/// The shards as last found (a DNS name is resolved again every `RESOLVE_EVERY`; a failed
/// resolution keeps the previous answer).
struct Targets {
    discovery: Discovery,
    current: Vec<Shard>,
    resolved: Option<tokio::time::Instant>,
}

impl Targets {
    /// The shards in this node's order, the first its own.
    async fn ranked(&mut self, node: &str) -> Result<Vec<Shard>, ClientError> {
        let due = self
            .resolved
            .is_none_or(|t| t.elapsed() >= shards::RESOLVE_EVERY);
        if due {
            match self.discovery.shards().await {
                Ok(s) => {
                    if s != self.current && !self.current.is_empty() {
                        info!(shards = s.len(), "collector shards changed");
                    }
                    self.current = s;
                    self.resolved = Some(tokio::time::Instant::now());
                }
                Err(e) if !self.current.is_empty() => {
                    warn!(error = %e, "resolving the collector shards failed; keeping the previous list");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(shards::rank(node, &self.current))
    }
}

/// Runs until `shutdown` turns true and the spool has been flushed (or the flush timed out).
pub async fn run(
    cfg: ClientConfig,
    spool: Arc<SharedSpool>,
    stats: Arc<AgentStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let mut targets = Targets {
        discovery: Discovery::parse(&cfg.collector, &cfg.shard_discovery)?,
        current: Vec::new(),
        resolved: None,
    };
    let mut backoff = cfg.backoff_min;
    let mut limit = BatchLimit {
        max: cfg.max_batch_events.max(1),
        now: cfg.max_batch_events.max(1),
    };
    // Which of the ranked shards the next attempt goes to: the first, unless it could not be
    // reached in this round.
    let mut rank = 0;
    loop {
        if *shutdown.borrow() && spool.lock().is_empty() {
            return Ok(());
        }
        let ranked = match targets.ranked(&cfg.node).await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return Err(shards::ShardError::Empty.into()),
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "no collector shards known");
                tokio::select! {
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        let shard = &ranked[rank.min(ranked.len() - 1)];
        // Built per attempt: the CA and certificate files are read again (a rotated Secret). One
        // that cannot be read now is retried after a back-off, never the end of delivery.
        let eps = endpoint(shard, &cfg.tls).and_then(|ep| {
            let owner = (rank > 0)
                .then(|| endpoint(&ranked[0], &cfg.tls))
                .transpose()?;
            Ok((ep, owner))
        });
        let (ep, owner) = match eps {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot set up the connection to the collector");
                tokio::select! {
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        let started = tokio::time::Instant::now();
        let mut last_batch = 0;
        let at = Position {
            shard,
            rank,
            owner: owner.as_ref(),
        };
        match session(
            &cfg,
            &ep,
            at,
            &spool,
            &stats,
            &mut shutdown,
            &mut limit,
            &mut last_batch,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(ClientError::OwnerBack) => {
                let mut s = spool.lock();
                let acked = s.acked_through();
                s.rewind_sent(acked);
                info!(collector = %ranked[0].url, "first-ranked collector is back; returning to it");
                rank = 0;
                continue;
            }
            Err(ClientError::Connect(e)) if rank + 1 < ranked.len() && !*shutdown.borrow() => {
                // Unreachable: the next-ranked shard, at once.
                warn!(collector = %shard.url, error = %e, next = %ranked[rank + 1].url, "collector unreachable; failing over to the next-ranked shard");
                AgentStats::add(&stats.failovers, 1);
                rank += 1;
                continue;
            }
            Err(e) => {
                // The next round starts at the first-ranked shard again.
                rank = 0;
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

/// Which shard a session talks to, and the first-ranked one it should return to.
#[derive(Clone, Copy)]
struct Position<'a> {
    shard: &'a Shard,
    rank: usize,
    /// The first-ranked shard while this one is a fallback.
    owner: Option<&'a Endpoint>,
}

/// The first-ranked shard answers a connection again.
async fn owner_reachable(owner: &Endpoint) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(3), owner.connect()).await,
        Ok(Ok(_))
    )
}

#[expect(
    clippy::too_many_arguments,
    reason = "one session's inputs, each borrowed from its own owner; a struct would only rename them"
)]
async fn session(
    cfg: &ClientConfig,
    ep: &Endpoint,
    at: Position<'_>,
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
    let hello = batch(cfg, 0, Vec::new(), spool.lock().acked_through());
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
    let renumbered = spool.settle(first.through_seq);
    if renumbered > 0 {
        warn!(
            collector_through = first.through_seq,
            renumbered,
            "the spool log lost events the collector already holds (a power loss); events since the restart are numbered after the collector's"
        );
    }
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
    info!(collector = %at.shard.url, rank = at.rank, resume_after = sent_through, spooled = spool.lock().len(), "connected to collector");
    // On a fallback shard: is the first-ranked one back? Checked every `return_check`; when it
    // is, nothing more is sent here and the session ends once the batches in flight are
    // acknowledged (or after a few seconds), so little is sent twice.
    let mut check = tokio::time::interval(cfg.return_check);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut leaving: Option<tokio::time::Instant> = None;

    loop {
        if let Some(since) = leaving
            && (spool.lock().acked_through() >= sent_through
                || since.elapsed() > Duration::from_secs(3))
        {
            return Err(ClientError::OwnerBack);
        }
        // Send everything that is waiting, within the in-flight window.
        while leaving.is_none() {
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
            tx.send(batch(cfg, first_seq, events, acked))
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
            _ = check.tick(), if at.owner.is_some() && leaving.is_none() => {
                if let Some(owner) = at.owner
                    && owner_reachable(owner).await
                {
                    leaving = Some(tokio::time::Instant::now());
                }
            }
            // While leaving, wake to give up waiting for acks.
            _ = tokio::time::sleep(Duration::from_millis(200)), if leaving.is_some() => {}
        }
    }
}

/// A batch; `delivered` is the highest seq any collector has acknowledged (a shard this agent
/// left holds what this one lacks: no loss).
fn batch(
    cfg: &ClientConfig,
    first_seq: u64,
    events: Vec<crate::spool::Unsent>,
    delivered: u64,
) -> RawBatch {
    RawBatch {
        agent_id: cfg.agent_id.clone(),
        boot_id: cfg.boot_id.clone(),
        node: cfg.node.clone(),
        first_seq,
        events: events.into_iter().map(|e| e.bytes).collect(),
        delivered_through: delivered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_fail_fast() {
        let opts = ClientOptions::default();
        assert!(matches!(
            check("not a url", "list", &opts),
            Err(ClientError::Shards(shards::ShardError::BadUrl(..)))
        ));
        assert!(check("http://127.0.0.1:7700", "list", &opts).is_ok());
        assert!(check("http://127.0.0.1:7700,http://127.0.0.1:7710", "list", &opts).is_ok());
        assert!(check("http://127.0.0.1:7700,http://127.0.0.1:7710", "dns", &opts).is_err());
        let j = jitter(Duration::from_millis(1000));
        assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
    }

    #[test]
    fn only_the_collectors_refusals_set_events_aside() {
        let refused = |s: tonic::Status| ClientError::Status(s).refusal().is_some();
        assert!(refused(tonic::Status::invalid_argument("events[0] ...")));
        assert!(refused(tonic::Status::out_of_range("message too large")));
        // A busy proxy or load balancer: retried, never a lost event.
        assert!(!refused(tonic::Status::resource_exhausted("overloaded")));
        assert!(!refused(tonic::Status::unavailable("down")));
    }
}
