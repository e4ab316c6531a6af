//! A load generator that speaks `Ingest` for many simulated GPU nodes, for tests and benchmarks:
//! each node is an agent (its own id, seqs from 1, one Push stream) sending, every period, one
//! GPU sample per GPU (8 by default, shaped like an H100 node's NVML sample), and now and then an
//! XID and a GPU process open/exit. Nodes are spread over a few channels (HTTP/2 connections) so a
//! thousand streams do not queue behind one connection's stream limit. TLS and tokens come from
//! the same `ClientOptions` the real agent uses.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use gpulse_proto::{
    client::{AuthChannel, ClientOptions},
    v1::{self, Batch, EventKind, Severity, event::Payload, ingest_client::IngestClient},
};
use tokio::sync::mpsc;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Load {
    pub nodes: usize,
    pub gpus: u32,
    /// One sample per GPU per period.
    pub period: Duration,
    /// XIDs per node per hour (spread at random over the nodes' periods).
    pub xids_per_node_hour: f64,
    /// GPU process open/exit pairs per node per hour.
    pub processes_per_node_hour: f64,
    /// Node names are `{prefix}-{i}`.
    pub prefix: String,
    /// Simulated nodes per HTTP/2 connection.
    pub nodes_per_channel: usize,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            nodes: 10,
            gpus: 8,
            period: Duration::from_secs(1),
            xids_per_node_hour: 2.0,
            processes_per_node_hour: 60.0,
            prefix: "sim".into(),
            nodes_per_channel: 100,
        }
    }
}

/// What was sent and acknowledged, shared by the simulated nodes.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub xids: AtomicU64,
    pub errors: AtomicU64,
    /// Microseconds from a batch's send to its ack, summed (with `acked_batches`, the mean).
    pub ack_us: AtomicU64,
    pub acked_batches: AtomicU64,
}

/// A small deterministic generator (xorshift), seeded per node: runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

fn uuid(node: usize, gpu: u32) -> String {
    format!(
        "GPU-{node:08x}-{gpu:04x}-4000-8000-{:012x}",
        node * 16 + gpu as usize
    )
}

fn pci(gpu: u32) -> String {
    format!("0000:{:02x}:00.0", 0x18 + gpu * 0x10)
}

fn sample(node: usize, gpu: u32, rng: &mut Rng) -> v1::Event {
    let util = (rng.next() % 101) as u32;
    v1::Event {
        kind: EventKind::GpuSample as i32,
        severity: Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index: gpu,
            uuid: uuid(node, gpu),
            pci: pci(gpu),
            name: "NVIDIA H100 80GB HBM3".into(),
            driver_version: "570.86.15".into(),
            gpu_util_pct: Some(util),
            mem_util_pct: Some(util / 2),
            mem_used_bytes: Some((rng.next() % 80) << 30),
            mem_total_bytes: Some(80 << 30),
            temperature_c: Some(40 + (rng.next() % 40) as u32),
            power_mw: Some(100_000 + (rng.next() % 600_000) as u32),
            power_limit_mw: Some(700_000),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            ecc_corrected_volatile: Some(0),
            ecc_uncorrected_volatile: Some(0),
            pcie_replay_count: Some(0),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn xid(gpu: u32, rng: &mut Rng) -> v1::Event {
    let (code, severity, text) = match rng.next() % 4 {
        0 => (79, Severity::Fatal, "GPU has fallen off the bus."),
        1 => (48, Severity::Error, "DBE (Double Bit Error) ECC Error"),
        2 => (
            31,
            Severity::Warning,
            "MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted",
        ),
        _ => (
            13,
            Severity::Warning,
            "Graphics Exception: ESR 0x404600=0x80000001",
        ),
    };
    v1::Event {
        kind: EventKind::Xid as i32,
        severity: severity as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::Xid(v1::Xid {
            code,
            pci: pci(gpu),
            message: text.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn process(gpu: u32, pid: u32, open: bool) -> v1::Event {
    let kind = if open {
        v1::ProcessEventType::Open
    } else {
        v1::ProcessEventType::Exit
    };
    v1::Event {
        kind: EventKind::GpuProcess as i32,
        severity: Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::GpuProcess(v1::GpuProcess {
            r#type: kind as i32,
            pid,
            tgid: pid,
            comm: "python3".into(),
            exe: "/usr/bin/python3.11".into(),
            device: format!("/dev/nvidia{gpu}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// One period's events of simulated node `i`.
fn period_events(i: usize, load: &Load, rng: &mut Rng, per_period: (f64, f64)) -> Vec<v1::Event> {
    let mut evs: Vec<v1::Event> = (0..load.gpus).map(|g| sample(i, g, rng)).collect();
    if rng.chance(per_period.0) {
        evs.push(xid((rng.next() % u64::from(load.gpus)) as u32, rng));
    }
    if rng.chance(per_period.1) {
        let (gpu, pid) = (
            (rng.next() % u64::from(load.gpus)) as u32,
            1000 + (rng.next() % 60_000) as u32,
        );
        evs.push(process(gpu, pid, true));
        evs.push(process(gpu, pid, false));
    }
    evs
}

/// Runs simulated node `i` against `channel` until `until`: one Push stream, a batch per period,
/// each acknowledged before the next.
async fn node(
    i: usize,
    load: Load,
    channel: AuthChannel,
    counts: Arc<Counts>,
    until: Instant,
) -> anyhow::Result<()> {
    let name = format!("{}-{i}", load.prefix);
    let agent_id = format!("{name}/loadgen");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let hours = load.period.as_secs_f64() / 3600.0;
    let per_period = (
        load.xids_per_node_hour * hours,
        load.processes_per_node_hour * hours,
    );
    let batch = |first_seq, events| Batch {
        agent_id: agent_id.clone(),
        node: name.clone(),
        boot_id: "loadgen".into(),
        first_seq,
        events,
        delivered_through: 0,
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(batch(0, vec![])).await?;
    let mut acks = IngestClient::new(channel)
        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let hello = acks.message().await?.context("no hello answer")?;
    let mut seq = hello.through_seq + 1;
    // Spread the nodes over the period so their batches do not arrive in one burst.
    let offset = load.period.mul_f64((i % 1000) as f64 / 1000.0);
    let mut next = tokio::time::Instant::now() + offset;
    while Instant::now() < until {
        tokio::time::sleep_until(next).await;
        next += load.period;
        let evs = period_events(i, &load, &mut rng, per_period);
        let n = evs.len() as u64;
        let xids = evs
            .iter()
            .filter(|e| e.kind == EventKind::Xid as i32)
            .count() as u64;
        let sent_at = Instant::now();
        tx.send(batch(seq, evs)).await?;
        counts.sent.fetch_add(n, Relaxed);
        let ack = acks.message().await?.context("stream ended")?;
        counts
            .ack_us
            .fetch_add(sent_at.elapsed().as_micros() as u64, Relaxed);
        counts.acked_batches.fetch_add(1, Relaxed);
        counts.acked.fetch_add(ack.through_seq + 1 - seq, Relaxed);
        counts.xids.fetch_add(xids, Relaxed);
        seq = ack.through_seq + 1;
    }
    Ok(())
}

/// Runs `load` against the collector (or gateway) at `url` for `duration`; returns the counts.
/// A node whose stream fails is counted in `errors` and stops (the others go on).
pub async fn run(
    url: &str,
    opts: &ClientOptions,
    load: &Load,
    duration: Duration,
) -> anyhow::Result<Arc<Counts>> {
    run_sharded(&[url.to_string()], opts, load, duration).await
}

/// As [`run`], node `i` sending to `urls[i % urls.len()]` (shards, each with its share).
pub async fn run_sharded(
    urls: &[String],
    opts: &ClientOptions,
    load: &Load,
    duration: Duration,
) -> anyhow::Result<Arc<Counts>> {
    anyhow::ensure!(!urls.is_empty(), "no collector URL");
    let counts = Arc::new(Counts::default());
    let until = Instant::now() + duration;
    let per = load.nodes_per_channel.max(1);
    // Channels per URL, each carrying up to `per` nodes.
    let mut channels: Vec<Vec<AuthChannel>> = Vec::new();
    for (k, url) in urls.iter().enumerate() {
        let nodes = (k..load.nodes).step_by(urls.len()).count();
        let mut v = Vec::new();
        for _ in 0..nodes.div_ceil(per).max(1) {
            let ch = opts.endpoint(url)?.connect().await?;
            v.push(opts.credentials()?.wrap(ch));
        }
        channels.push(v);
    }
    let mut tasks = Vec::new();
    for i in 0..load.nodes {
        let (k, j) = (i % urls.len(), i / urls.len());
        let ch = channels[k][j / per].clone();
        let (l, c) = (load.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            if node(i, l, ch, c.clone(), until).await.is_err() {
                c.errors.fetch_add(1, Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_is_a_sample_per_gpu_plus_occasional_events() {
        let load = Load::default();
        let mut rng = Rng(7);
        let evs = period_events(3, &load, &mut rng, (1.0, 1.0));
        let count = |k: EventKind| evs.iter().filter(|e| e.kind == k as i32).count();
        assert_eq!(count(EventKind::GpuSample), 8);
        assert_eq!(count(EventKind::Xid), 1);
        assert_eq!(count(EventKind::GpuProcess), 2);
        let quiet = period_events(3, &load, &mut rng, (0.0, 0.0));
        assert_eq!(quiet.len(), 8);
        // Distinct GPUs, stable identities.
        assert_eq!(uuid(3, 1), uuid(3, 1));
        assert_ne!(uuid(3, 1), uuid(4, 1));
    }
}
