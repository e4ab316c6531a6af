//! A restart fits in the memory of a running collector: a full event store and a log of twice
//! its size are replayed (after `kill -9`) within the configured budgets + 64 MiB, measured as
//! the restarted process's peak RSS (VmHWM). Before the replay streamed, the same restart
//! decoded every snapshot and log event into one list first (13x the budget, docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)] // tests

use std::time::{Duration, Instant};

use gpulse_e2e::*;
use gpulse_proto::v1::{self, event::Payload};

const MIB: u64 = 1 << 20;

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

fn log_line(i: u64) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::DriverLog as i32,
        severity: v1::Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::DriverLog(v1::DriverLog {
            text: format!("NVRM: restart line {i} {}", "y".repeat(300)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn restart_with_a_full_store_and_log_stays_within_budgets_plus_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ring_mib = 24;
    let ring = format!("{ring_mib}MiB");
    let args = [
        "--events-bytes",
        ring.as_str(),
        "--samples-raw-bytes",
        "1MiB",
        "--samples-1m-bytes",
        "1MiB",
        "--samples-1h-bytes",
        "1MiB",
        "--wal-segment-bytes",
        "4MiB",
        "--fsync",
        "never",
    ];
    let budgets_mib = ring_mib + 3;
    let mut c = Collector::start(&data, free_port(), free_port(), &args).unwrap();
    // ~350 B per event: 250k events are ~3.5x the ring, so the store is full, has expired the
    // oldest, and the log holds about twice the ring (its bound) plus a snapshot.
    let total = 250_000u64;
    let rt = runtime();
    let url = c.url();
    let sent = rt
        .block_on(ingest_batches(
            &url,
            "restart-node",
            (0..total / 1000).map(|b| (b * 1000..(b + 1) * 1000).map(log_line).collect()),
        ))
        .unwrap();
    assert_eq!(sent, total);
    let running_hwm = vm_hwm_kib(c.proc.child.id());
    let wal_bytes: u64 = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    c.proc.kill9();

    let t = Instant::now();
    let c2 = Collector::start(&data, free_port(), free_port(), &args).unwrap();
    let ready = t.elapsed();
    let hwm = vm_hwm_kib(c2.proc.child.id());
    eprintln!(
        "restart: log {:.1} MiB, ready in {ready:?}, peak RSS {:.1} MiB (running peak {:.1} MiB, budgets {budgets_mib} MiB)",
        wal_bytes as f64 / MIB as f64,
        hwm as f64 / 1024.0,
        running_hwm as f64 / 1024.0,
    );
    assert!(
        wal_bytes > ring_mib * MIB,
        "the log should hold more than the ring: {wal_bytes}"
    );
    assert!(
        hwm <= (budgets_mib + 64) * 1024,
        "restart peak RSS {hwm} KiB exceeds budgets {budgets_mib} MiB + 64 MiB"
    );
    // And it restored what it should: the newest event is there.
    let newest = rt
        .block_on(async {
            let mut client = v1::telemetry_client::TelemetryClient::connect(c2.url())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client
                .list_events(v1::ListEventsRequest {
                    window: Some(v1::TimeWindow {
                        since: "1h".into(),
                        until: String::new(),
                    }),
                    limit: 1,
                    ..Default::default()
                })
                .await
        })
        .unwrap()
        .into_inner();
    let text = match newest.events.first().and_then(|e| e.payload.as_ref()) {
        Some(Payload::DriverLog(d)) => d.text.clone(),
        other => panic!("no event restored: {other:?}"),
    };
    assert!(
        text.starts_with(&format!("NVRM: restart line {} ", total - 1)),
        "newest restored event: {text}"
    );
    let st = http_get(c2.http_port, "/readyz").unwrap();
    assert_eq!(st.0, 200, "{}", st.1);
    assert!(ready < Duration::from_secs(60), "ready after {ready:?}");
}
