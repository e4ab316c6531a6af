//! Ingest throughput through the real path: an agent's `Ingest.Push` stream (tonic over an
//! in-process tokio duplex pipe) -> batch validation -> the state task (de-dup, WAL append,
//! event store, sample history, fan-out) -> acks. The collector runs alone on one
//! current-thread runtime in its own thread and the agent side on another, so the figure is
//! events per CPU-second of the collector's thread: events/s per core. (With `fsync` on, the
//! group-commit thread's fdatasync time is not in it; the wall-clock rate is printed too.)
//!
//! Two mixes of 1000-event batches (see `Mix`): with GPU samples (70 %) and events only. Four
//! batches in flight, as an agent with a backlog sends them. Events carry what the agent puts
//! in them (node, agent id, GPU identity strings on samples). The batches are encoded before
//! each round (`RawBatch` is `Batch` on the wire), so the client thread only frames and copies
//! bytes: on a small machine it would otherwise compete with the collector for the same core
//! while encoding, which a real agent does on its own node.
//! `cargo bench -p gpulse-collector --bench ingest`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

/// The allocator the `gpulse-collector` binary uses (see its main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::store_config;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpulse_proto::{
    raw::RawBatch,
    v1::{self, Ack, EventKind, event::Payload},
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

const BATCH: u64 = 1000;
const IN_FLIGHT: u64 = 4;

/// Which events a batch carries.
#[derive(Clone, Copy, Debug)]
enum Mix {
    /// 70 % GPU samples, 20 % process events, 9 % driver log lines, 1 % XIDs.
    WithSamples,
    /// No samples: 60 % process events, 36 % driver log lines, 4 % XIDs.
    EventsOnly,
}

fn event(seq: u64, mix: Mix) -> v1::Event {
    let t = Some(gpulse_proto::time::now());
    let bucket = match mix {
        Mix::WithSamples => seq % 100,
        // Map onto the process/log/XID ranges below.
        Mix::EventsOnly => match seq % 100 {
            0..60 => 70 + seq % 20,
            60..96 => 90 + seq % 9,
            _ => 99,
        },
    };
    let (kind, payload) = match bucket {
        0..70 => (
            EventKind::GpuSample,
            Payload::GpuSample(v1::GpuSample {
                index: (seq % 8) as u32,
                uuid: format!("GPU-{:08x}-0000-0000-0000-000000000000", seq % 8),
                pci: format!("0000:{:02x}:00.0", seq % 8),
                name: "NVIDIA H100 80GB HBM3".into(),
                driver_version: "570.124.06".into(),
                cuda_driver_version: "12.8".into(),
                gpu_util_pct: Some((seq % 101) as u32),
                mem_util_pct: Some(40),
                mem_used_bytes: Some(61 << 30),
                mem_total_bytes: Some(80 << 30),
                temperature_c: Some(66),
                power_mw: Some(612_345),
                power_limit_mw: Some(700_000),
                sm_clock_mhz: Some(1980),
                mem_clock_mhz: Some(2619),
                throttle_reasons: Some(0),
                ecc_corrected_volatile: Some(0),
                ecc_uncorrected_volatile: Some(0),
                pcie_replay_count: Some(0),
                ..Default::default()
            }),
        ),
        70..90 => (
            EventKind::GpuProcess,
            Payload::GpuProcess(v1::GpuProcess {
                r#type: v1::ProcessEventType::Open as i32,
                pid: (seq % 30_000) as u32,
                tgid: (seq % 30_000) as u32,
                comm: "python3".into(),
                exe: "/usr/bin/python3.11".into(),
                device: "/dev/nvidia3".into(),
                ..Default::default()
            }),
        ),
        90..99 => (
            EventKind::DriverLog,
            Payload::DriverLog(v1::DriverLog {
                text: format!("NVRM: GPU at PCI:0000:3b:00: GPU-{seq:08x} loaded"),
                ..Default::default()
            }),
        ),
        _ => (
            EventKind::Xid,
            Payload::Xid(v1::Xid {
                code: 13,
                pci: "0000:3b:00.0".into(),
                message: "Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0)".into(),
                raw: "NVRM: Xid (PCI:0000:3b:00): 13, pid=1234, name=python3, Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0)".into(),
                ..Default::default()
            }),
        ),
    };
    // As the agent sends them: node and agent id on every event, the GPU's identity strings
    // on every sample.
    v1::Event {
        seq,
        time: t,
        node: "bench-node".into(),
        agent_id: "bench/agent".into(),
        kind: kind as i32,
        severity: v1::Severity::Info as i32,
        payload: Some(payload),
        ..Default::default()
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Run {
    /// The client side (the "agent"): its own runtime on the bench thread.
    rt: tokio::runtime::Runtime,
    agent: RawAgent,
    /// Asks the collector's thread for its CPU time.
    cpu: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Duration>>,
    next_seq: u64,
    _dir: tempfile::TempDir,
}

/// Starts the collector (gRPC services + state task) alone on one current-thread runtime in its
/// own thread, so its CPU time can be read apart from the client's.
fn setup(fsync: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.fsync = fsync;
    cfg.wal_segment_bytes = 64 << 20;
    // Small enough that the first round fills it: later rounds measure the steady state, where
    // every stored event expires an old one.
    cfg.events_bytes = 48 << 20;
    cfg.snapshot_interval = Duration::from_secs(3600);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("collector".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client_io, cpu_tx) = serve(cfg).await;
                ready_tx.send((client_io, cpu_tx)).unwrap();
                std::future::pending::<()>().await
            })
        });
    let (client_io, cpu) = ready_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agent = rt.block_on(async {
        let mut io = Some(client_io);
        let channel = tonic::transport::Endpoint::try_from("http://in-process.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let io = io.take();
                async move {
                    io.map(hyper_util::rt::TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("duplex already used"))
                }
            }))
            .await
            .unwrap();
        RawAgent::open(channel).await
    });
    Run {
        rt,
        agent,
        cpu,
        next_seq: 1,
        _dir: dir,
    }
}

/// The agent side of one `Ingest.Push` stream, sending pre-encoded batches.
struct RawAgent {
    tx: tokio::sync::mpsc::Sender<RawBatch>,
    acks: tonic::Streaming<Ack>,
}

impl RawAgent {
    async fn open(channel: tonic::transport::Channel) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(RawBatch {
            agent_id: "bench/agent".into(),
            node: "bench-node".into(),
            boot_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let mut acks = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                tonic::codegen::http::uri::PathAndQuery::from_static("/gpulse.v1.Ingest/Push"),
                tonic_prost::ProstCodec::<RawBatch, Ack>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        acks.message().await.unwrap().unwrap(); // the hello's ack
        Self { tx, acks }
    }
}

type CpuTx = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Duration>>;

async fn serve(cfg: gpulse_collector::state::StoreConfig) -> (tokio::io::DuplexStream, CpuTx) {
    use gpulse_collector::grpc::{IngestService, TelemetryService};
    use gpulse_proto::{raw::ingest_server::IngestServer, v1::telemetry_server::TelemetryServer};
    let metrics = gpulse_collector::telemetry::Metrics::new().unwrap();
    let store = gpulse_collector::state::start(cfg, metrics.clone()).unwrap();
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(IngestService {
                store: store.clone(),
                auth: gpulse_collector::auth::Auth::off(metrics.auth_refused.clone()),
                metrics,
                stop: gpulse_collector::shutdown::Shutdown::never(),
            }))
            .add_service(TelemetryServer::new(TelemetryService {
                store,
                stop: gpulse_collector::shutdown::Shutdown::never(),
                history: Default::default(),
            }))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io))),
    );
    let (cpu_tx, mut cpu_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<Duration>>(1);
    tokio::spawn(async move {
        while let Some(reply) = cpu_rx.recv().await {
            let _ = reply.send(thread_cpu());
        }
    });
    (client_io, cpu_tx)
}

fn collector_cpu(run: &Run) -> Duration {
    run.rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        run.cpu.send(tx).await.unwrap();
        rx.await.unwrap()
    })
}

/// Sends `batches` pre-built batches with IN_FLIGHT outstanding and waits for the last ack.
fn push(run: &mut Run, batches: Vec<RawBatch>) -> Duration {
    let Run { rt, agent, .. } = run;
    rt.block_on(async {
        let t = Instant::now();
        let n = batches.len() as u64;
        let mut acked = 0;
        let mut sent = 0;
        let mut it = batches.into_iter();
        while acked < n {
            while sent < n && sent - acked < IN_FLIGHT {
                agent.tx.send(it.next().unwrap()).await.unwrap();
                sent += 1;
            }
            agent.acks.message().await.unwrap().unwrap();
            acked += 1;
        }
        t.elapsed()
    })
}

fn batches(run: &mut Run, count: u64, mix: Mix) -> Vec<RawBatch> {
    (0..count)
        .map(|_| {
            let first = run.next_seq;
            run.next_seq += BATCH;
            RawBatch {
                agent_id: "bench/agent".into(),
                boot_id: "b".into(),
                node: "bench-node".into(),
                first_seq: first,
                events: (first..first + BATCH)
                    .map(|s| event(s, mix).encode_to_vec().into())
                    .collect(),
                delivered_through: 0,
            }
        })
        .collect()
}

const ROUNDS: usize = 10;
const ROUND_BATCHES: u64 = 200;

fn bench(c: &mut Criterion) {
    for (mix, fsync) in [
        (Mix::WithSamples, false),
        (Mix::EventsOnly, false),
        (Mix::WithSamples, true),
    ] {
        let mut run = setup(fsync);
        let mut steady = Vec::new();
        let events = (ROUND_BATCHES * BATCH) as f64;
        for round in 0..=ROUNDS {
            let b = batches(&mut run, ROUND_BATCHES, mix);
            let cpu0 = collector_cpu(&run);
            let d = push(&mut run, b);
            let cpu = collector_cpu(&run) - cpu0;
            let per_cpu = events / cpu.as_secs_f64();
            if round > 0 {
                steady.push(per_cpu);
            }
            println!(
                "ingest {mix:?} fsync {} round {round}{}: {:>9.0} events per collector CPU-second, {:>9.0} events/s wall",
                if fsync { "on " } else { "off" },
                if round == 0 { " (filling)" } else { "" },
                per_cpu,
                events / d.as_secs_f64(),
            );
        }
        steady.sort_by(f64::total_cmp);
        println!(
            "ingest {mix:?} fsync {}: median {:.0} events/s per core (best {:.0}) over {} steady rounds",
            if fsync { "on " } else { "off" },
            steady[steady.len() / 2],
            steady[steady.len() - 1],
            steady.len(),
        );
    }
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(BATCH * 16));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    let mut run = setup(false);
    g.bench_function("real_ingest_path_wall", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let b = batches(&mut run, 16, Mix::WithSamples);
                total += push(&mut run, b);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
