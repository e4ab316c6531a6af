//! What `gpulse` prints, compared with the files in `tests/expected/`: each command's renderer
//! over fixed answers, and the offline commands run as a user would. `UPDATE_EXPECTED=1`
//! rewrites the files for a deliberate change (review the diff).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{path::Path, process::Command};

use gpulse_cli::{events, nodes, status, tail, trend, xid};
use gpulse_proto::{
    time::from_unix_nanos,
    v1::{
        self, Event, EventKind, GpuSample, KindStatus, Lagged, ListEventsResponse, NodeInfo,
        NodesResponse, ResolvedWindow, SeriesStats, Severity, StatusResponse, Tier, TierStatus,
        TrendPoint, TrendResponse, TrendSeries, event::Payload,
    },
};

fn expect(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/expected")
        .join(name);
    if std::env::var_os("UPDATE_EXPECTED").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_EXPECTED=1 writes it)", path.display()));
    assert!(
        got == want,
        "{name} differs from {}:\n--- got\n{got}\n--- expected\n{want}",
        path.display()
    );
}

fn at(secs: i64) -> Option<prost_types::Timestamp> {
    Some(from_unix_nanos(
        i128::from(1_764_000_000 + secs) * 1_000_000_000,
    ))
}

fn window() -> ResolvedWindow {
    ResolvedWindow {
        start: at(0),
        end: at(3600),
        defaulted: false,
        oldest_data: at(600),
        partial: true,
    }
}

fn gpu(index: u32) -> GpuSample {
    GpuSample {
        index,
        uuid: format!("GPU-{index}"),
        pci: format!("0000:{:02x}:00.0", 0x3b + index),
        name: "NVIDIA H100 80GB HBM3".into(),
        gpu_util_pct: Some(90 + index),
        mem_used_bytes: Some(40 << 30),
        mem_total_bytes: Some(80 << 30),
        temperature_c: Some(61),
        power_mw: Some(512_000),
        ..Default::default()
    }
}

fn xid_event() -> Event {
    Event {
        cursor: 42,
        seq: 7,
        time: at(1800),
        received: at(1801),
        node: "gpu-node-1".into(),
        agent_id: "gpu-node-1/a1".into(),
        kind: EventKind::Xid as i32,
        severity: Severity::Fatal as i32,
        payload: Some(Payload::Xid(v1::Xid {
            code: 79,
            pci: "0000:3b:00.0".into(),
            gpu_uuid: "GPU-0".into(),
            pid: Some(4242),
            process_name: "python3".into(),
            message: "GPU has fallen off the bus.".into(),
            mnemonic: "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS".into(),
            pod: Some(v1::PodRef {
                namespace: "ml".into(),
                name: "trainer-0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn gap_event() -> Event {
    Event {
        cursor: 43,
        time: at(1900),
        node: "gpu-node-2".into(),
        kind: EventKind::Gap as i32,
        severity: Severity::Warning as i32,
        payload: Some(Payload::Gap(v1::Gap {
            stage: v1::GapStage::KernelRing as i32,
            missed: 3,
            detail: "BPF ring buffer full".into(),
        })),
        ..Default::default()
    }
}

#[test]
fn events_text_and_json() {
    let pages = events::Pages {
        head: ListEventsResponse {
            window: Some(window()),
            total_matched: 3,
            hints: vec!["the window starts before the oldest retained event".into()],
            ..Default::default()
        },
        events: vec![gap_event(), xid_event()],
        next_page_token: "e1.0011".into(),
    };
    expect("events.txt", &events::render_text(&pages));
    expect("events.json", &(events::render_json(&pages) + "\n"));
    // Through a gateway with one shard down.
    let mut partial = pages;
    partial.head.partial = true;
    partial.head.upstreams = upstreams();
    expect(
        "events-partial.json",
        &(events::render_json(&partial) + "\n"),
    );
}

fn upstreams() -> Vec<v1::UpstreamStatus> {
    vec![
        v1::UpstreamStatus {
            name: "shard-0".into(),
            state: v1::UpstreamState::Ok as i32,
            reason: String::new(),
            elapsed_ms: 4,
        },
        v1::UpstreamStatus {
            name: "shard-1".into(),
            state: v1::UpstreamState::Timeout as i32,
            reason: "no answer within 3000 ms".into(),
            elapsed_ms: 3000,
        },
    ]
}

#[test]
fn tail_lines() {
    let mut s = String::new();
    for ev in [xid_event(), gap_event()] {
        s.push_str(&tail::event_line(&ev, false));
        s.push('\n');
        s.push_str(&tail::event_line(&ev, true));
        s.push('\n');
    }
    s.push_str(&tail::lagged_line(&Lagged {
        missed: 12,
        resume_cursor: 55,
    }));
    s.push('\n');
    expect("tail.txt", &s);
}

#[test]
fn nodes_text_and_json() {
    let r = NodesResponse {
        nodes: vec![
            NodeInfo {
                node: "gpu-node-1".into(),
                last_seen: at(3500),
                connected_agents: vec!["gpu-node-1/a1".into()],
                xid_source: "ebpf_printk".into(),
                xid_count: 2,
                critical_xid_count: 1,
                gpus: vec![gpu(0), gpu(1)],
                ..Default::default()
            },
            NodeInfo {
                node: "gpu-node-2".into(),
                last_seen: at(100),
                cluster: "eu-1".into(),
                ..Default::default()
            },
        ],
        window: None,
        partial: true,
        upstreams: upstreams(),
        truncated: false,
        hints: Vec::new(),
    };
    let mut s = nodes::render_text(&r, "http://127.0.0.1:7700");
    s.push_str(&nodes::render_text(
        &NodesResponse::default(),
        "http://127.0.0.1:7700",
    ));
    expect("nodes.txt", &s);
    let mut json: String = r.nodes.iter().map(|n| nodes::node_json(n) + "\n").collect();
    json.push_str(&(nodes::answer_json(&r) + "\n"));
    expect("nodes.json", &json);
}

#[test]
fn trend_text() {
    let series = |node: &str, index: Option<u32>, values: &[f64]| TrendSeries {
        node: node.into(),
        gpu_index: index,
        gpu_uuid: index.map(|i| format!("GPU-{i}")).unwrap_or_default(),
        points: values
            .iter()
            .enumerate()
            .map(|(i, v)| TrendPoint {
                time: at(i as i64 * 60),
                value: *v,
                samples: 60,
                last_time: Default::default(),
            })
            .collect(),
        stats: Some(SeriesStats {
            min: 10.0,
            max: 95.0,
            avg: 52.5,
            p95: 95.0,
            last: 95.0,
            samples: 240,
            last_time: Default::default(),
        }),
        ..Default::default()
    };
    let r = TrendResponse {
        metric: "gpu_util_pct".into(),
        unit: "percent".into(),
        window: Some(window()),
        step_seconds: 60,
        source: Tier::Tier1m as i32,
        aggregation: v1::Aggregation::P95 as i32,
        group_by: v1::GroupBy::Gpu as i32,
        series: vec![
            series("gpu-node-1", Some(0), &[10.0, 40.0, 70.0, 95.0]),
            series("", None, &[95.0, f64::NAN, 10.0]),
        ],
        ..Default::default()
    };
    let mut s = trend::render_text(&r);
    s.push_str(&trend::render_text(&TrendResponse::default()));
    s.push_str(&trend::render_metrics());
    expect("trend.txt", &s);
}

#[test]
fn status_text_and_json() {
    let s = StatusResponse {
        version: "0.1.0".into(),
        events_stored: 1200,
        ring_bytes: 1 << 20,
        ring_budget_bytes: 256 << 20,
        last_cursor: 1300,
        oldest_cursor: 101,
        agents_connected: 2,
        subscribers: 1,
        started: at(0),
        kinds: vec![KindStatus {
            kind: EventKind::Xid as i32,
            bytes: 4096,
            share_bytes: 64 << 20,
            events: 30,
            oldest: at(5),
            ..Default::default()
        }],
        tiers: vec![
            TierStatus {
                tier: Tier::Raw as i32,
                bytes: 1000,
                budget_bytes: 5000,
                oldest: at(10),
                ..Default::default()
            },
            TierStatus {
                tier: Tier::Tier1h as i32,
                resolution_seconds: 3600,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    expect("status.txt", &status::render_text(&s));
    expect("status.json", &(status::render_json(&s) + "\n"));
    // Through a gateway: sums over the upstreams, each named.
    let g = StatusResponse {
        cluster: "eu-1".into(),
        partial: true,
        upstreams: upstreams(),
        ..s
    };
    expect("status-gateway.txt", &status::render_text(&g));
}

#[test]
fn xid_explain_renders_the_catalog() {
    let info = gpulse_xid::catalog::lookup(79).unwrap();
    expect("xid-explain-79.txt", &xid::render_explain(info));
}

/// The binary itself: offline commands and argument errors, as a user sees them.
#[test]
fn the_binary_offline() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpulse"))
            .args(args)
            .output()
            .unwrap();
        format!(
            "$ gpulse {}\nexit {}\n{}{}",
            args.join(" "),
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let mut s = String::new();
    for args in [
        &["xid", "explain", "48", "--json"][..],
        &["xid", "explain", "999"],
        &["trend", "--agg", "median", "--metric", "power_w"],
        &["trend", "--tier", "5m", "--metric", "power_w"],
        &["events", "--kind", "bogus"],
        &["events", "--min-severity", "loud"],
        &["mcp"],
    ] {
        s.push_str(&run(args));
        s.push('\n');
    }
    expect("offline.txt", &s);
}

#[test]
fn health_text_and_json() {
    use gpulse_cli::health;
    use gpulse_proto::v1::{
        GpuHealthRecord, GpuHealthResponse, HealthEvidence, HealthReason, HealthState,
    };
    let reason = |rule: &str, action: &str, summary: &str| HealthReason {
        rule: rule.into(),
        state: HealthState::Unhealthy as i32,
        action: action.into(),
        summary: summary.into(),
        since: at(100),
        last: at(200),
        occurrences: 1,
        clears_on: "reboot".into(),
        evidence: vec![HealthEvidence {
            cursor: 42,
            time: at(200),
            kind: "xid".into(),
            detail: "XID 79 ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS: GPU has fallen off the bus."
                .into(),
        }],
        ..Default::default()
    };
    let r = GpuHealthResponse {
        gpus: vec![
            GpuHealthRecord {
                node: "gpu-node-1".into(),
                pci: "0000:3b:00.0".into(),
                gpu_uuid: "GPU-0".into(),
                index: Some(0),
                state: HealthState::Unhealthy as i32,
                since: at(200),
                reasons: vec![
                    HealthReason {
                        escalated: true,
                        clears_on: "replacement".into(),
                        occurrences: 3,
                        ..reason(
                            "xid",
                            "CONTACT_SUPPORT",
                            "XID 48 DBE came back after 2 reboots: hardware inspection",
                        )
                    },
                    HealthReason {
                        clearing: true,
                        clean_samples: 2,
                        ..reason("fallen_off_bus", "RESTART_BM", "XID 79")
                    },
                ],
                ..Default::default()
            },
            GpuHealthRecord {
                node: "gpu-node-2".into(),
                cluster: "eu-1".into(),
                pci: "0000:86:00.0".into(),
                state: HealthState::Degraded as i32,
                since: at(300),
                reasons: vec![HealthReason {
                    state: HealthState::Degraded as i32,
                    pod: "ml/train-0".into(),
                    pid: Some(4242),
                    clears_on: "process_exit".into(),
                    ..reason("xid", "RESTART_APP", "XID 13 GRAPHICS_ENGINE_EXCEPTION")
                }],
                ..Default::default()
            },
        ],
        healthy: 14,
        degraded: 1,
        unhealthy: 1,
        unknown: 0,
        truncated: true,
        partial: true,
        upstreams: upstreams(),
        hints: vec![],
    };
    expect("health.txt", &health::render_text(&r));
    let mut json: String = r
        .gpus
        .iter()
        .map(|g| gpulse_proto::render::gpu_health(g).to_string() + "\n")
        .collect();
    json.push_str(&(health::answer_json(&r) + "\n"));
    expect("health.json", &json);
}
