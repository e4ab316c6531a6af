//! MCP and /metrics figures on loopback: a release collector holding 24 h of 1 s samples for 8
//! GPUs plus an hour of XIDs and process events; the official Python `mcp` client calls
//! `events_summary` (1 h) and `gpu_metric_trend` (24 h) over Streamable HTTP; /metrics is scraped
//! repeatedly for its size and render time.
//!
//! `cargo xtask bench --mcp` (builds release binaries and points GPULSE_BIN_DIR at them).
//! `--xid-every-ms N` feeds an XID every N ms of the last hour instead of every 10 s (a busier
//! hour for `events_summary`); `--no-python` skips the Python client's figures.
#![allow(clippy::print_stdout)] // a benchmark report

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use gpulse_e2e::{
    Collector, free_port, http_get, ingest_batches, mcp_raw_call, python_venv, runtime,
};
use gpulse_proto::v1::{self, EventKind, event::Payload};

const GPUS: u32 = 8;
const HOURS: i64 = 24;

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    Some(gpulse_proto::time::from_unix_nanos(
        i128::from(ms) * 1_000_000,
    ))
}

fn sample(gpu: u32, ms: i64) -> v1::Event {
    let k = ms / 1000;
    v1::Event {
        kind: EventKind::GpuSample as i32,
        severity: v1::Severity::Info as i32,
        time: ts(ms),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index: gpu,
            uuid: format!("GPU-0000000{gpu}-1111-2222-3333-444444444444"),
            pci: format!("0000:{:02x}:00.0", 0x18 + gpu * 0x10),
            name: "NVIDIA H100 80GB HBM3".into(),
            gpu_util_pct: Some(((k * 7 + i64::from(gpu) * 13) % 101) as u32),
            mem_util_pct: Some(((k * 3) % 60) as u32),
            mem_used_bytes: Some(60 << 30),
            mem_total_bytes: Some(80 << 30),
            temperature_c: Some(60 + (k / 300 % 15) as u32),
            power_mw: Some(400_000 + ((k * 7919) % 250_000) as u32),
            power_limit_mw: Some(700_000),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            throttle_reasons: Some(0),
            ecc_corrected_volatile: Some(0),
            ecc_uncorrected_volatile: Some(0),
            pcie_replay_count: Some(0),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn xid(gpu: u32, ms: i64, code: u32) -> v1::Event {
    v1::Event {
        kind: EventKind::Xid as i32,
        severity: if code == 79 {
            v1::Severity::Fatal
        } else {
            v1::Severity::Error
        } as i32,
        time: ts(ms),
        payload: Some(Payload::Xid(v1::Xid {
            code,
            pci: format!("0000:{:02x}:00.0", 0x18 + gpu * 0x10),
            gpu_uuid: format!("GPU-0000000{gpu}-1111-2222-3333-444444444444"),
            message: format!("bench xid {code}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// 24 h of samples for every GPU, in time order, with an XID every `xid_every_ms` (a multiple
/// of 1000, or a divisor of it) in the last hour.
fn feed(url: &str, xid_every_ms: i64) -> anyhow::Result<u64> {
    let now = (gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now()) / 1_000_000) as i64;
    let mut t = now - HOURS * 3_600_000;
    let batches = std::iter::from_fn(move || {
        if t >= now {
            return None;
        }
        let mut batch = Vec::with_capacity(2100);
        while t < now && batch.len() < 2000 {
            for g in 0..GPUS {
                batch.push(sample(g, t));
            }
            if now - t < 3_600_000 {
                // Every XID time within this second of samples.
                let mut x = t.div_euclid(xid_every_ms) * xid_every_ms;
                if x < t {
                    x += xid_every_ms;
                }
                while x < t + 1000 {
                    let k = x / xid_every_ms;
                    let code = [13, 31, 43, 48, 79, 94, 119][(k % 7) as usize];
                    batch.push(xid((k % i64::from(GPUS)) as u32, x, code));
                    x += xid_every_ms;
                }
            }
            t += 1000;
        }
        Some(batch)
    });
    runtime().block_on(ingest_batches(url, "bench-node", batches))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let xid_every_ms: i64 = match args.iter().position(|a| a == "--xid-every-ms") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|v| *v > 0)
            .ok_or_else(|| anyhow::anyhow!("--xid-every-ms takes a positive number"))?,
        None => 10_000,
    };
    let dir = tempfile::tempdir()?;
    let (g, h) = (free_port(), free_port());
    let c = Collector::start(&dir.path().join("data"), g, h, &["--fsync", "never"])?;
    let t = Instant::now();
    let n = feed(&c.url(), xid_every_ms)?;
    println!(
        "fed {n} events ({GPUS} GPUs x {HOURS} h of 1 s samples, XIDs in the last hour) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // /metrics: size and render time.
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let (code, body) = http_get(h, "/metrics")?;
        times.push(t.elapsed());
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        size = body.len();
    }
    times.sort();
    let (_, m) = http_get(h, "/metrics")?;
    let render = gpulse_e2e::value_of_metric(&m, "gpulse_metrics_scrape_duration_seconds_sum")
        .zip(gpulse_e2e::value_of_metric(
            &m,
            "gpulse_metrics_scrape_duration_seconds_count",
        ))
        .map_or(0.0, |(s, c)| s / c * 1000.0);
    println!(
        "/metrics for {GPUS} GPUs: {size} bytes; HTTP round trip p50 {:.3} ms p99 {:.3} ms; gauge rendering {render:.3} ms mean",
        times[times.len() / 2].as_secs_f64() * 1000.0,
        times[times.len() * 99 / 100].as_secs_f64() * 1000.0,
    );
    // MCP: the server alone (raw HTTP), then through the Python client.
    println!(
        "MCP over Streamable HTTP, raw stateless 2026-07-28 tools/call on a fresh connection each:"
    );
    for (name, tool, args) in [
        ("events_summary_1h", "events_summary", r#"{"since":"1h"}"#),
        (
            "gpu_metric_trend_24h",
            "gpu_metric_trend",
            r#"{"metric":"gpu_util_pct","since":"24h","group_by":"gpu"}"#,
        ),
        (
            "list_events_50",
            "list_events",
            r#"{"since":"1h","limit":50}"#,
        ),
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..200 {
            let t = Instant::now();
            bytes = mcp_raw_call(h, tool, args)?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "  {name:<22} p50 {:>7.3} ms  p99 {:>7.3} ms  (200 calls, {bytes} bytes)",
            times[100].as_secs_f64() * 1000.0,
            times[198].as_secs_f64() * 1000.0
        );
    }
    if args.iter().any(|a| a == "--no-python") {
        return Ok(());
    }
    let python = python_venv("mcp", &["mcp==2.3.0"])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/mcp_client.py");
    let url = format!("http://127.0.0.1:{h}/mcp");
    let out = Command::new(&python)
        .arg(&script)
        .args([
            "--http", &url, "--mode", "auto", "--node", "-", "--bench", "200",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "mcp client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or("{}"))?;
    println!(
        "MCP over Streamable HTTP, protocol {}, Python mcp 2.3.0 client (round trip incl. its schema validation):",
        v["protocol"]
    );
    for (k, x) in v["latency_ms"].as_object().into_iter().flatten() {
        println!(
            "  {k:<22} p50 {:>7} ms  p99 {:>7} ms  ({} calls, {} bytes)",
            x["p50"], x["p99"], x["n"], x["bytes"]
        );
    }
    let (_, m) = http_get(h, "/metrics")?;
    for rpc in ["ListEvents", "Trend", "Nodes"] {
        let key = |s: &str| format!("gpulse_query_duration_seconds_{s}{{rpc=\"{rpc}\"}}");
        if let (Some(s), Some(c)) = (
            gpulse_e2e::value_of_metric(&m, &key("sum")),
            gpulse_e2e::value_of_metric(&m, &key("count")),
        ) {
            println!(
                "  store time per {rpc}: {:.3} ms mean over {c} queries",
                s / c * 1000.0
            );
        }
    }
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
