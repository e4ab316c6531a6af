//! Shard sizing: N collector shards (release binaries, `--fsync always`) under simulated GPU
//! nodes (`gpulse_e2e::loadgen`: 8 GPUs sampled at 1 Hz, XIDs and process events now and then),
//! each node sending to one shard. Reports per shard: ingest events/s, CPU (% of one core),
//! resident and peak memory; the ack latency the nodes saw; and, with the data in place, the
//! latency of the queries behind `events_summary` (1 h) and a 1 h fleet trend on one shard.
//!
//! Usage: gpulse-capacity-bench [--nodes 1000] [--gpus 8] [--shards 1] [--seconds 60]
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use gpulse_e2e::{
    loadgen::{self, Load},
    *,
};
use gpulse_proto::{
    client::ClientOptions,
    v1::{SummarizeRequest, TimeWindow, TrendRequest, telemetry_client::TelemetryClient},
};
use hdrhistogram::Histogram;

fn window_1h() -> Option<TimeWindow> {
    Some(TimeWindow {
        since: "1h".into(),
        until: String::new(),
    })
}

/// p50 and p99 in ms of `n` runs of `call`.
async fn timed<F, Fut>(n: usize, mut call: F) -> anyhow::Result<(f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..n {
        let t = Instant::now();
        call().await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok((
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

fn main() -> anyhow::Result<()> {
    let (mut nodes, mut gpus, mut shards, mut seconds) = (1000usize, 8u32, 1usize, 60u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => nodes = val()?.parse()?,
            "--gpus" => gpus = val()?.parse()?,
            "--shards" => shards = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if nodes == 0 || gpus == 0 || shards == 0 || seconds == 0 {
        bail!("every count must be >= 1");
    }
    let dir = tempfile::tempdir()?;
    let collectors: Vec<Collector> = (0..shards)
        .map(|i| {
            Collector::start(
                &dir.path().join(format!("shard-{i}")),
                free_port(),
                free_port(),
                &[],
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let urls: Vec<String> = collectors.iter().map(Collector::url).collect();
    let pids: Vec<u32> = collectors.iter().map(|c| c.proc.child.id()).collect();
    let cpu0: Vec<u64> = pids
        .iter()
        .map(|p| proc_cpu_ns(*p))
        .collect::<anyhow::Result<_>>()?;
    let load = Load {
        nodes,
        gpus,
        period: Duration::from_secs(1),
        ..Load::default()
    };
    let rt = runtime();
    let started = Instant::now();
    let counts = rt.block_on(loadgen::run_sharded(
        &urls,
        &ClientOptions::default(),
        &load,
        Duration::from_secs(seconds),
    ))?;
    let secs = started.elapsed().as_secs_f64();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{nodes} nodes x {gpus} GPUs at 1 Hz over {shards} shard(s) for {secs:.0} s: acked {} events \
         ({:.0}/s), mean ack {:.2} ms, failed node streams {}",
        get(&counts.acked),
        get(&counts.acked) as f64 / secs,
        get(&counts.ack_us) as f64 / get(&counts.acked_batches).max(1) as f64 / 1000.0,
        get(&counts.errors)
    );
    println!("shard  nodes  events/s  CPU % of a core  RSS MiB  peak RSS MiB");
    for (i, pid) in pids.iter().enumerate() {
        let cpu = (proc_cpu_ns(*pid)? - cpu0[i]) as f64 / 1e9 / secs * 100.0;
        let share = (i..nodes).step_by(shards).count();
        println!(
            "{i:>5}  {share:>5}  {:>8.0}  {cpu:>15.1}  {:>7.1}  {:>12.1}",
            get(&counts.acked) as f64 / secs / shards as f64,
            proc_status_kib(*pid, "VmRSS:")? as f64 / 1024.0,
            proc_status_kib(*pid, "VmHWM:")? as f64 / 1024.0,
        );
    }
    let url = urls[0].clone();
    let (summary, trend) = rt.block_on(async move {
        let c = TelemetryClient::connect(url).await?;
        let c2 = c.clone();
        let summary = timed(20, || {
            let mut c = c.clone();
            async move {
                c.summarize(SummarizeRequest {
                    window: window_1h(),
                    ..Default::default()
                })
                .await?;
                Ok(())
            }
        })
        .await?;
        let trend = timed(20, || {
            let mut c = c2.clone();
            async move {
                c.trend(TrendRequest {
                    metric: "gpu_util_pct".into(),
                    window: window_1h(),
                    ..Default::default()
                })
                .await?;
                Ok(())
            }
        })
        .await?;
        let st = c2
            .clone()
            .status(gpulse_proto::v1::StatusRequest {})
            .await?
            .into_inner();
        let mib = |b: u64| b as f64 / 1048576.0;
        let tiers: Vec<String> = st
            .tiers
            .iter()
            .map(|t| {
                format!(
                    "{} {:.1} of {:.0} MiB",
                    gpulse_proto::names::ShortName::short_name(
                        gpulse_proto::v1::Tier::try_from(t.tier).unwrap_or_default()
                    ),
                    mib(t.bytes),
                    mib(t.budget_bytes)
                )
            })
            .collect();
        println!(
            "shard 0 store: events {:.1} of {:.0} MiB; samples {}; {} GPUs",
            mib(st.ring_bytes),
            mib(st.ring_budget_bytes),
            tiers.join(", "),
            st.gpus_tracked
        );
        anyhow::Ok((summary, trend))
    })?;
    println!(
        "shard 0 with that data: Summarize 1 h p50 {:.1} ms p99 {:.1} ms; Trend 1 h (fleet) p50 {:.1} ms p99 {:.1} ms",
        summary.0, summary.1, trend.0, trend.1
    );
    Ok(())
}
