//! What a gateway costs: one collector and four shards hold the same events (simulated 8-GPU
//! nodes: a sample per GPU every 10 s, a few XIDs and log lines each), and the same queries go to
//! the collector and to a gateway over the shards, interleaved in one run: Summarize 1 h
//! (`events_summary`), a 1 h fleet trend, a 1 h per-GPU trend, a ListEvents page, XID groups,
//! and MCP `events_summary` over `/mcp`. Reports p50/p99 of each side and the gateway's ratio.
//!
//! Usage: gpulse-gateway-bench [--nodes 1000] [--gpus 8] [--minutes 10] [--shards 4] [--runs 30]
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::time::Instant;

use anyhow::{Context as _, bail};
use futures::{StreamExt, stream};
use gpulse_e2e::*;
use gpulse_proto::{
    time as ptime,
    v1::{
        self, Aggregation, EventKind, GroupBy, ListEventsRequest, SummarizeRequest, TimeWindow,
        TrendRequest, XidGroupsRequest, event::Payload, telemetry_client::TelemetryClient,
    },
};
use hdrhistogram::Histogram;

fn at(ms: i64) -> Option<prost_types::Timestamp> {
    Some(ptime::from_unix_millis(ms))
}

/// One node's events over `minutes` up to `end_ms`.
fn node_events(n: usize, gpus: u32, minutes: i64, end_ms: i64) -> Vec<v1::Event> {
    let steps = minutes * 6;
    let mut out = Vec::with_capacity((steps as usize) * gpus as usize + 8);
    for s in 0..steps {
        let t = end_ms - (steps - s) * 10_000 + (n % 1000) as i64;
        for g in 0..gpus {
            out.push(v1::Event {
                kind: EventKind::GpuSample as i32,
                severity: v1::Severity::Info as i32,
                time: at(t),
                payload: Some(Payload::GpuSample(v1::GpuSample {
                    index: g,
                    uuid: format!("GPU-{n}-{g}"),
                    gpu_util_pct: Some(((s as usize * 7 + n * 13 + g as usize * 29) % 101) as u32),
                    power_mw: Some(300_000 + ((s as u32 * 31 + g * 7) % 5000)),
                    temperature_c: Some(40 + (n as u32 + g) % 30),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
    }
    for k in 0..3i64 {
        let code = [79, 13, 48][(n + k as usize) % 3];
        out.push(v1::Event {
            kind: EventKind::Xid as i32,
            severity: v1::Severity::Error as i32,
            time: at(end_ms - 300_000 + k * 60_000 + n as i64),
            payload: Some(Payload::Xid(v1::Xid {
                code,
                pci: "0000:3b:00.0".into(),
                gpu_uuid: format!("GPU-{n}-{k}"),
                message: format!("xid {code}"),
                ..Default::default()
            })),
            ..Default::default()
        });
        out.push(v1::Event {
            kind: EventKind::DriverLog as i32,
            severity: v1::Severity::Info as i32,
            time: at(end_ms - 200_000 + k * 50_000 + n as i64),
            payload: Some(Payload::DriverLog(v1::DriverLog {
                text: format!("log {k}"),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    out.sort_by_key(|e| e.time.as_ref().map(ptime::to_unix_millis));
    out
}

fn window_1h() -> Option<TimeWindow> {
    Some(TimeWindow {
        since: "1h".into(),
        until: String::new(),
    })
}

type Client = TelemetryClient<tonic::transport::Channel>;

/// One query against either side, returning what it cost to answer.
async fn query(c: &mut Client, which: usize) -> anyhow::Result<()> {
    match which {
        0 => {
            c.summarize(SummarizeRequest {
                window: window_1h(),
                filter: None,
            })
            .await?;
        }
        1 => {
            c.trend(TrendRequest {
                metric: "gpu_util_pct".into(),
                window: window_1h(),
                group_by: GroupBy::Fleet as i32,
                aggregation: Aggregation::Avg as i32,
                ..Default::default()
            })
            .await?;
        }
        2 => {
            c.trend(TrendRequest {
                metric: "gpu_util_pct".into(),
                window: window_1h(),
                group_by: GroupBy::Gpu as i32,
                ..Default::default()
            })
            .await?;
        }
        3 => {
            c.list_events(ListEventsRequest {
                window: window_1h(),
                limit: 100,
                ..Default::default()
            })
            .await?;
        }
        _ => {
            c.xid_groups(XidGroupsRequest {
                window: window_1h(),
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}

const QUERIES: [&str; 6] = [
    "Summarize 1 h (events_summary)",
    "Trend 1 h, fleet avg",
    "Trend 1 h, per GPU (20 series)",
    "ListEvents page of 100",
    "XidGroups 1 h by code",
    "MCP events_summary over /mcp",
];

fn main() -> anyhow::Result<()> {
    let (mut nodes, mut gpus, mut minutes, mut shards, mut runs) =
        (1000usize, 8u32, 10i64, 4usize, 30usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => nodes = val()?.parse()?,
            "--gpus" => gpus = val()?.parse()?,
            "--minutes" => minutes = val()?.parse()?,
            "--shards" => shards = val()?.parse()?,
            "--runs" => runs = val()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if nodes == 0 || gpus == 0 || minutes == 0 || shards == 0 || runs == 0 {
        bail!("every count must be >= 1");
    }
    let dir = tempfile::tempdir()?;
    // The shards push their rollups to a VictoriaMetrics that starts only after the queries:
    // meanwhile every request waits on disk, then the drain is timed.
    let vm_port = free_port();
    let rw_url = format!("http://127.0.0.1:{vm_port}/api/v1/write");
    let start = |name: &str, rw: bool| {
        let mut args = vec!["--fsync", "never"];
        if rw {
            args.extend([
                "--remote-write-url",
                rw_url.as_str(),
                "--remote-write-interval",
                "1s",
                "--remote-write-delay",
                "1s",
            ]);
        }
        Collector::start(&dir.path().join(name), free_port(), free_port(), &args)
    };
    let one = start("one", false)?;
    let parts: Vec<Collector> = (0..shards)
        .map(|i| start(&format!("shard-{i}"), true))
        .collect::<anyhow::Result<_>>()?;
    let now = ptime::to_unix_millis(&ptime::now());
    let rt = runtime();
    let fed = Instant::now();
    let (one_url, part_urls) = (
        one.url(),
        parts.iter().map(Collector::url).collect::<Vec<_>>(),
    );
    let total: usize = rt.block_on(async {
        let counts = stream::iter(0..nodes)
            .map(|n| {
                let (one_url, part) = (one_url.clone(), part_urls[n % shards].clone());
                async move {
                    let evs = node_events(n, gpus, minutes, now);
                    let len = evs.len();
                    let node = format!("bench-node-{n:05}");
                    let batches: Vec<Vec<v1::Event>> =
                        evs.chunks(2000).map(<[_]>::to_vec).collect();
                    ingest_batches(&one_url, &node, batches.clone()).await?;
                    ingest_batches(&part, &node, batches).await?;
                    anyhow::Ok(len)
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        counts.into_iter().sum::<anyhow::Result<usize>>()
    })?;
    eprintln!(
        "fed {total} events ({nodes} nodes x {gpus} GPUs, {minutes} min) to one collector and to {shards} shards in {:.1} s",
        fed.elapsed().as_secs_f64()
    );
    let ups: Vec<(String, String)> = parts
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("shard-{i}"), c.url()))
        .collect();
    let ups_ref: Vec<(&str, String)> = ups.iter().map(|(n, u)| (n.as_str(), u.clone())).collect();
    let gw = Gateway::start(dir.path(), &ups_ref, &[])?;
    let (one_http, gw_http) = (one.http_port, gw.http_port);
    let (one_url, gw_url) = (one.url(), gw.url());
    let mut hist: Vec<[Histogram<u64>; 2]> = (0..QUERIES.len())
        .map(|_| Ok([Histogram::new(3)?, Histogram::new(3)?]))
        .collect::<anyhow::Result<_>>()?;
    rt.block_on(async {
        let mut clients = [
            TelemetryClient::connect(one_url)
                .await?
                .max_decoding_message_size(64 << 20),
            TelemetryClient::connect(gw_url)
                .await?
                .max_decoding_message_size(64 << 20),
        ];
        // Warm both sides once, then interleave: each run asks each query of both, alternately
        // first, so drift in the machine's load falls on both.
        for (q, _) in QUERIES.iter().enumerate().take(5) {
            for c in clients.iter_mut() {
                query(c, q).await?;
            }
        }
        for run in 0..runs {
            for (q, h) in hist.iter_mut().enumerate() {
                for k in 0..2 {
                    let side = (k + run) % 2;
                    let t = Instant::now();
                    if q == 5 {
                        let port = [one_http, gw_http][side];
                        tokio::task::spawn_blocking(move || {
                            mcp_raw_call(port, "events_summary", r#"{"since":"1h"}"#)
                        })
                        .await??;
                    } else {
                        query(&mut clients[side], q).await?;
                    }
                    h[side].record(t.elapsed().as_micros() as u64)?;
                }
            }
        }
        anyhow::Ok(())
    })?;
    println!(
        "{nodes} nodes x {gpus} GPUs, {minutes} min of samples every 10 s ({total} events): one collector vs a gateway over {shards} shards, {runs} runs each"
    );
    println!(
        "query                             one p50 / p99 ms    gateway p50 / p99 ms   ratio p50"
    );
    for (q, name) in QUERIES.iter().enumerate() {
        let p = |h: &Histogram<u64>, x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        let [a, b] = &hist[q];
        println!(
            "{name:<33} {:>7.2} / {:>7.2}    {:>7.2} / {:>7.2}      {:>5.2}x",
            p(a, 0.5),
            p(a, 0.99),
            p(b, 0.5),
            p(b, 0.99),
            p(b, 0.5) / p(a, 0.5).max(0.001)
        );
    }
    remote_write_drain(&parts, vm_port, dir.path(), now - now % 60_000)?;
    for (name, pid) in [
        ("one collector", one.proc.child.id()),
        ("gateway", gw.proc.child.id()),
    ] {
        println!(
            "{name}: RSS {:.1} MiB, peak {:.1} MiB",
            proc_status_kib(pid, "VmRSS:")? as f64 / 1024.0,
            proc_status_kib(pid, "VmHWM:")? as f64 / 1024.0
        );
    }
    Ok(())
}

/// A metric's value summed over the shards.
fn sum_of(parts: &[Collector], metric: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for c in parts {
        total += value_of_metric(&c.metrics()?, metric).unwrap_or(0.0);
    }
    Ok(total)
}

/// Waits until every shard has queued its rollups up to `end_ms`, starts VictoriaMetrics, and
/// times the drain: samples per second from the shards' queues into it.
fn remote_write_drain(
    parts: &[Collector],
    vm_port: u16,
    dir: &std::path::Path,
    end_ms: i64,
) -> anyhow::Result<()> {
    let Ok(vm) = system_tool("victoria-metrics", "victoria-metrics") else {
        println!("remote write: victoria-metrics not installed; skipped");
        return Ok(());
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let mut ready = true;
        for c in parts {
            let m = c.metrics()?;
            let until = value_of_metric(&m, "gpulse_remote_write_exported_until_timestamp_seconds")
                .unwrap_or(0.0);
            ready &= until * 1000.0 >= (end_ms - 120_000) as f64;
        }
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("the shards did not queue their rollups within 5 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Let the last tick's requests land in the queues.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let queued = sum_of(parts, "gpulse_remote_write_queue_bytes")?;
    let sent0 = sum_of(parts, "gpulse_remote_write_samples_total{result=\"sent\"}")?;
    let args = vec![
        format!("-storageDataPath={}", dir.join("vm").display()),
        format!("-httpListenAddr=127.0.0.1:{vm_port}"),
    ];
    let _vm = Proc::spawn_path(&vm, &args, &dir.join("vm.log"))?;
    let t = Instant::now();
    loop {
        if sum_of(parts, "gpulse_remote_write_queue_bytes")? == 0.0 {
            break;
        }
        if t.elapsed() > std::time::Duration::from_secs(600) {
            bail!("the queues did not drain within 10 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let secs = t.elapsed().as_secs_f64();
    let sent = sum_of(parts, "gpulse_remote_write_samples_total{result=\"sent\"}")? - sent0;
    println!(
        "remote write: {} shards drained {:.1} MiB of queued requests ({sent:.0} samples) into VictoriaMetrics in {secs:.1} s: {:.0} samples/s",
        parts.len(),
        queued / 1048576.0,
        sent / secs
    );
    Ok(())
}
