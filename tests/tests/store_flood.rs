//! The collector binary under a flood stays within its configured memory budgets (plus a fixed
//! overhead), and `gpulse events` / `gpulse trend` answer from what it kept.
//!
//! Figures: `cargo test -p gpulse-e2e --test store_flood -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gpulse_e2e::{Collector, bin, free_port, runtime, value_of_metric};
use gpulse_proto::v1::{self, Batch, EventKind, event::Payload, ingest_client::IngestClient};
use tokio_stream::wrappers::ReceiverStream;

/// Budgets given to the collector (MiB).
const RING_MIB: u64 = 48;
const RAW_MIB: u64 = 8;
const M1_MIB: u64 = 4;
const H1_MIB: u64 = 1;
/// Allowance above the budgets: runtime, allocator slack, WAL write buffers, code, the
/// decoded-timestamp cache, the metrics registry.
const OVERHEAD_MIB: u64 = 64;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn now() -> prost_types::Timestamp {
    gpulse_proto::time::now()
}

fn flood_event(agent: u32, seq: u64) -> v1::Event {
    let node = format!("flood-{agent}");
    let (kind, payload) = match seq % 10 {
        0..6 => (
            EventKind::GpuSample,
            Payload::GpuSample(v1::GpuSample {
                index: (seq % 64) as u32,
                uuid: format!("GPU-{agent:04}-{:04}", seq % 64),
                gpu_util_pct: Some((seq % 101) as u32),
                power_mw: Some(300_000 + (seq % 9973) as u32),
                temperature_c: Some(60 + (seq % 7) as u32),
                mem_used_bytes: Some(40 << 30),
                ..Default::default()
            }),
        ),
        6..9 => (
            EventKind::DriverLog,
            Payload::DriverLog(v1::DriverLog {
                // Big lines: the event ring's budget is what they hit.
                text: format!("NVRM: flood line {seq} {}", "x".repeat(900)),
                ..Default::default()
            }),
        ),
        _ => (
            EventKind::Xid,
            Payload::Xid(v1::Xid {
                code: 13,
                pci: "0000:3b:00.0".into(),
                message: format!("flood xid {seq}"),
                ..Default::default()
            }),
        ),
    };
    v1::Event {
        seq,
        time: Some(now()),
        node,
        kind: kind as i32,
        severity: v1::Severity::Warning as i32,
        payload: Some(payload),
        ..Default::default()
    }
}

async fn agent(url: String, id: u32, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut client = IngestClient::connect(url).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let agent_id = format!("flood-{id}/agent");
    let node = format!("flood-{id}");
    tx.send(Batch {
        agent_id: agent_id.clone(),
        node: node.clone(),
        boot_id: "b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = client
        .push(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    acks.message().await.unwrap().unwrap();
    let mut seq = 1;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<v1::Event> = (seq..seq + 500).map(|s| flood_event(id, s)).collect();
        tx.send(Batch {
            agent_id: agent_id.clone(),
            node: node.clone(),
            boot_id: "b".into(),
            first_seq: seq,
            events,
            delivered_through: 0,
        })
        .await
        .unwrap();
        seq += 500;
        acks.message().await.unwrap().unwrap();
        sent.fetch_add(500, Ordering::Relaxed);
    }
}

#[test]
fn memory_stays_within_budget_under_flood() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (g, h) = (free_port(), free_port());
    let ring = format!("{RING_MIB}MiB");
    let raw = format!("{RAW_MIB}MiB");
    let m1 = format!("{M1_MIB}MiB");
    let h1 = format!("{H1_MIB}MiB");
    let c = Collector::start(
        &data,
        g,
        h,
        &[
            "--events-bytes",
            &ring,
            "--samples-raw-bytes",
            &raw,
            "--samples-1m-bytes",
            &m1,
            "--samples-1h-bytes",
            &h1,
            "--fsync",
            "never",
            "--snapshot-interval",
            "2s",
            // Below the log the flood writes, so the event store gets snapshotted too.
            "--wal-max-bytes",
            "32MiB",
        ],
    )
    .unwrap();
    let pid = c.proc.child.id();
    let idle = rss_kib(pid);
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut peak = 0;
    rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|i| tokio::spawn(agent(c.url(), i, stop.clone(), sent.clone())))
            .collect();
        while start.elapsed() < Duration::from_secs(12) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(rss_kib(pid));
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    let n = sent.load(Ordering::Relaxed);
    let metrics = c.metrics().unwrap();
    let m = |name: &str| value_of_metric(&metrics, name).unwrap_or(0.0);
    let ring_used: f64 = [
        "xid",
        "driver_log",
        "gpu_sample",
        "gap",
        "sxid",
        "agent_status",
        "gpu_process",
    ]
    .iter()
    .map(|k| m(&format!("gpulse_store_ring_bytes{{kind=\"{k}\"}}")))
    .sum();
    let budget_kib = (RING_MIB + RAW_MIB + M1_MIB + H1_MIB) << 10;
    eprintln!(
        "flood: {n} events in {:.1} s ({:.0}/s) from 4 agents; RSS idle {idle} KiB, peak {peak} KiB; \
         budgets {budget_kib} KiB (ring {RING_MIB} MiB + samples {RAW_MIB}/{M1_MIB}/{H1_MIB} MiB); \
         ring used {:.0} KiB, expired {:.0} driver log lines; raw tier {:.0} KiB",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64(),
        ring_used / 1024.0,
        m("gpulse_store_expired_events_total{kind=\"driver_log\"}"),
        m("gpulse_store_series_bytes{tier=\"raw\"}") / 1024.0,
    );
    eprintln!(
        "snapshots: events {:.0}, series {:.0}; WAL {:.0} KiB; batches that waited for log room {:.0}",
        m("gpulse_store_snapshots_total{kind=\"events\"}"),
        m("gpulse_store_snapshots_total{kind=\"series\"}"),
        m("gpulse_store_wal_bytes") / 1024.0,
        m("gpulse_ingest_log_full_waits_total")
    );
    assert!(n > 100_000, "the flood must be a flood: {n} events");
    assert!(m("gpulse_store_snapshots_total{kind=\"events\"}") >= 1.0);
    // The log stays bounded: its limit, plus a segment being written and one being snapshotted.
    assert!(m("gpulse_store_wal_bytes") <= ((32 + 16 + 16) << 20) as f64);
    assert!(
        m("gpulse_store_expired_events_total{kind=\"driver_log\"}") > 0.0,
        "the ring must have filled"
    );
    assert!(ring_used <= (RING_MIB << 20) as f64);
    for (tier, mib) in [("raw", RAW_MIB), ("1m", M1_MIB), ("1h", H1_MIB)] {
        let used = m(&format!("gpulse_store_series_bytes{{tier=\"{tier}\"}}"));
        assert!(used <= (mib << 20) as f64, "{tier}: {used}");
    }
    assert!(
        peak <= budget_kib + (OVERHEAD_MIB << 10),
        "peak RSS {peak} KiB exceeds budgets {budget_kib} KiB + {OVERHEAD_MIB} MiB"
    );

    // The CLI answers from what was kept: newest events first, JSON documents.
    let out = Command::new(bin("gpulse"))
        .args([
            "events",
            "--collector",
            &c.url(),
            "--since",
            "5m",
            "--kind",
            "xid",
            "--limit",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 5);
    assert!(v["total_matched"].as_u64().unwrap() >= 5);
    assert!(v["next_page_token"].is_string());
    assert_eq!(v["window"]["defaulted"], false);
    let out = Command::new(bin("gpulse"))
        .args([
            "trend",
            "--collector",
            &c.url(),
            "--metric",
            "gpu_util_pct",
            "--since",
            "10m",
            "--group-by",
            "node",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["series"].as_array().unwrap().len(), 4, "{t}");
    assert_eq!(t["source"], "raw");
    let out = Command::new(bin("gpulse"))
        .args(["trend", "--collector", &c.url(), "--metric", "nope"])
        .output()
        .unwrap();
    // Refused by the CLI before it calls (clap's exit status 2, the flag named).
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--metric <METRIC>'"));
    let out = Command::new(bin("gpulse"))
        .args(["events", "--collector", &c.url(), "--since", "last tuesday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RFC 3339") && err.contains("--since"), "{err}");
}
