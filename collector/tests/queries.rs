//! Windowed queries over the real Ingest path (in-process gRPC over a tokio duplex pipe):
//! paging under expiry, trends from raw samples vs rollups, restarts with snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use gpulse_proto::{
    time as ptime,
    v1::{
        self, Aggregation, EventFilter, EventKind, GroupBy, ListEventsRequest, Order, Tier,
        TimeWindow, TrendRequest, event::Payload, telemetry_client::TelemetryClient,
    },
};

const S: i64 = 1000;

fn now_ms() -> i64 {
    (ptime::to_unix_nanos(&ptime::now()) / 1_000_000) as i64
}

fn at(ms: i64) -> Option<prost_types::Timestamp> {
    Some(ptime::from_unix_nanos(i128::from(ms) * 1_000_000))
}

fn timed_log(msg: &str, ms: i64) -> v1::Event {
    let mut e = log(msg);
    e.time = at(ms);
    e
}

/// A GPU sample whose values are a deterministic function of time and GPU.
fn sample(index: u32, ms: i64) -> v1::Event {
    let k = ms / 1000;
    v1::Event {
        kind: EventKind::GpuSample as i32,
        severity: v1::Severity::Info as i32,
        time: at(ms),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index,
            uuid: format!("GPU-{index:04}"),
            gpu_util_pct: Some(((k * 7 + i64::from(index) * 13) % 101) as u32),
            power_mw: Some(300_000 + ((k * 31) % 5000) as u32),
            temperature_c: Some(40 + (k / 600 % 30) as u32),
            mem_total_bytes: Some(80 << 30),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn window(since: &str) -> Option<TimeWindow> {
    Some(TimeWindow {
        since: since.into(),
        until: String::new(),
    })
}

async fn list(
    c: &mut TelemetryClient<tonic::transport::Channel>,
    req: ListEventsRequest,
) -> v1::ListEventsResponse {
    c.list_events(req).await.unwrap().into_inner()
}

fn logs_only() -> Option<EventFilter> {
    Some(EventFilter {
        kinds: vec![EventKind::DriverLog as i32],
        ..Default::default()
    })
}

#[tokio::test]
async fn pages_never_skip_or_duplicate_while_events_expire() {
    for order in [Order::OldestFirst, Order::NewestFirst] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = store_config(dir.path());
        cfg.events_bytes = 96 << 10; // ~750 log lines
        cfg.fsync = false;
        let h = start(cfg).await;
        let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
        let t0 = now_ms() - 3000 * S;
        let mut seq = 1;
        // 700 lines, one per second, ~50 to ~38 minutes ago.
        for chunk in 0..7 {
            let evs = (0..100)
                .map(|i| {
                    timed_log(
                        &format!("line {}", chunk * 100 + i),
                        t0 + (chunk * 100 + i) * S,
                    )
                })
                .collect();
            a.send(seq, evs).await.unwrap();
            seq += 100;
        }
        let mut c = TelemetryClient::new(h.channel.clone());
        let ceiling = c
            .status(v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .last_cursor;
        let mut delivered: Vec<u64> = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        let mut expired_seen;
        let mut checked = 0;
        loop {
            let r = list(
                &mut c,
                ListEventsRequest {
                    window: window("1h"),
                    filter: logs_only(),
                    limit: 37,
                    page_token: token.clone(),
                    order: order as i32,
                    resume_after: Default::default(),
                },
            )
            .await;
            // What the store holds right now, in one listing.
            let held = list(
                &mut c,
                ListEventsRequest {
                    window: window("2h"),
                    filter: logs_only(),
                    limit: 1000,
                    order: Order::OldestFirst as i32,
                    ..Default::default()
                },
            )
            .await;
            assert!(held.next_page_token.is_empty());
            // No skips: every held event between the previous page's end and this page's end
            // (inside the pinned ceiling) is on this page.
            let page: HashSet<u64> = r.events.iter().map(|e| e.cursor).collect();
            if let Some(end) = r.events.last().map(|e| e.cursor) {
                let prev = delivered.last().copied();
                for e in &held.events {
                    let inside = match order {
                        Order::OldestFirst => e.cursor > prev.unwrap_or(0) && e.cursor <= end,
                        _ => e.cursor < prev.unwrap_or(u64::MAX) && e.cursor >= end,
                    };
                    if inside && e.cursor <= ceiling {
                        checked += 1;
                        assert!(
                            page.contains(&e.cursor),
                            "{order:?}: cursor {} skipped",
                            e.cursor
                        );
                    }
                }
            }
            delivered.extend(r.events.iter().map(|e| e.cursor));
            expired_seen = r.expired_while_paging;
            pages += 1;
            // Between pages: more lines arrive (inside the window), expiring the oldest.
            let evs = (0..60)
                .map(|i| timed_log(&format!("late {pages}/{i}"), t0 + 2500 * S + i * S))
                .collect();
            a.send(seq, evs).await.unwrap();
            seq += 60;
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
            assert!(pages < 100, "paging does not end");
        }
        assert!(
            expired_seen > 0,
            "{order:?}: the test must expire events while paging"
        );
        assert!(checked >= 200, "{order:?}: only {checked} rows checked");
        // Strictly ordered, hence no duplicates; nothing newer than the first page.
        assert!(
            delivered.windows(2).all(|w| match order {
                Order::OldestFirst => w[0] < w[1],
                _ => w[0] > w[1],
            }),
            "{order:?}: pages out of order or repeated"
        );
        assert!(delivered.iter().all(|c| *c <= ceiling));
    }
}

#[tokio::test]
async fn windows_filters_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.fsync = false;
    let h = start(cfg).await;
    let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
    let now = now_ms();
    let mut old = xid(79, "two hours ago");
    old.time = at(now - 7200 * S);
    let mut recent = xid(13, "ten minutes ago");
    recent.time = at(now - 600 * S);
    a.send(1, vec![old, recent, timed_log("noise", now - 60 * S)])
        .await
        .unwrap();
    let mut c = TelemetryClient::new(h.channel.clone());
    let r = list(
        &mut c,
        ListEventsRequest {
            filter: Some(EventFilter {
                kinds: vec![EventKind::Xid as i32],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let w = r.window.unwrap();
    assert!(w.defaulted, "no since: the default hour");
    assert_eq!(r.total_matched, 1);
    assert!(!w.partial, "XIDs are held from two hours back");
    let r = list(
        &mut c,
        ListEventsRequest {
            window: Some(TimeWindow {
                since: "now-3h".into(),
                until: "now-1h".into(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.total_matched, 1);
    match &r.events[0].payload {
        Some(Payload::Xid(x)) => assert_eq!(x.code, 79),
        other => panic!("{other:?}"),
    }
    assert!(r.window.unwrap().partial, "nothing stored 3h back");
    assert!(r.hints.iter().any(|h| h.contains("oldest retained")));
    // XID code filter and RFC 3339 bounds.
    let since = ptime::rfc3339(&ptime::from_unix_nanos(
        i128::from(now - 9000 * S) * 1_000_000,
    ));
    let r = list(
        &mut c,
        ListEventsRequest {
            window: Some(TimeWindow {
                since,
                until: String::new(),
            }),
            filter: Some(EventFilter {
                xid_codes: vec![13],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.total_matched, 1);
    // Bad input: clear INVALID_ARGUMENT, nothing else affected.
    for (req, want) in [
        (
            ListEventsRequest {
                window: window("yesterday"),
                ..Default::default()
            },
            "RFC 3339",
        ),
        (
            ListEventsRequest {
                limit: 5000,
                ..Default::default()
            },
            "limit 5000",
        ),
        (
            ListEventsRequest {
                page_token: "e1.00".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListEventsRequest {
                window: Some(TimeWindow {
                    since: "now-1h".into(),
                    until: "now-2h".into(),
                }),
                ..Default::default()
            },
            "inverted",
        ),
    ] {
        let e = c.list_events(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(want), "{}", e.message());
    }
    // A token is bound to its query.
    let first = list(
        &mut c,
        ListEventsRequest {
            window: window("3h"),
            limit: 1,
            ..Default::default()
        },
    )
    .await;
    assert!(!first.next_page_token.is_empty());
    let e = c
        .list_events(ListEventsRequest {
            limit: 1,
            page_token: first.next_page_token.clone(),
            order: Order::OldestFirst as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("differs"), "{}", e.message());
    // Nodes over a window carry XID counts.
    let n = c
        .nodes(v1::NodesRequest {
            window: window("1h"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.nodes.len(), 1);
    assert_eq!(
        (n.nodes[0].xid_count, n.nodes[0].critical_xid_count),
        (1, 1)
    );
    let n = c
        .nodes(v1::NodesRequest { window: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.nodes[0].xid_count, 2);
}

async fn trend(
    c: &mut TelemetryClient<tonic::transport::Channel>,
    metric: &str,
    since: &str,
    step: u32,
    agg: Aggregation,
    tier: Tier,
    group: GroupBy,
) -> v1::TrendResponse {
    c.trend(TrendRequest {
        metric: metric.into(),
        window: Some(TimeWindow {
            since: since.into(),
            until: String::new(),
        }),
        step_seconds: step,
        max_points: 1000,
        aggregation: agg as i32,
        group_by: group as i32,
        tier: tier as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Sends `hours` of 10-second samples for `gpus` GPUs ending now.
async fn feed_samples(a: &mut AgentStream, gpus: u32, hours: i64, seq: &mut u64) -> i64 {
    let end = now_ms() - 5 * S;
    let start = end - hours * 3600 * S;
    let mut t = start;
    while t < end {
        let mut evs = Vec::new();
        for _ in 0..200 {
            if t >= end {
                break;
            }
            for g in 0..gpus {
                evs.push(sample(g, t));
            }
            t += 10 * S;
        }
        let n = evs.len() as u64;
        a.send(*seq, evs).await.unwrap();
        *seq += n;
    }
    start
}

fn assert_series_agree(a: &v1::TrendResponse, b: &v1::TrendResponse, what: &str) {
    assert_eq!(a.series.len(), b.series.len(), "{what}: series");
    assert_eq!(a.step_seconds, b.step_seconds, "{what}: step");
    for (x, y) in a.series.iter().zip(&b.series) {
        assert_eq!((&x.node, x.gpu_index), (&y.node, y.gpu_index));
        assert_eq!(x.points.len(), y.points.len(), "{what}: points");
        for (p, q) in x.points.iter().zip(&y.points) {
            assert_eq!(p.time, q.time, "{what}");
            assert_eq!(p.samples, q.samples, "{what}: samples per step");
            let tol = 1e-9 * p.value.abs().max(1.0);
            assert!(
                (p.value - q.value).abs() <= tol,
                "{what}: {} vs {}",
                p.value,
                q.value
            );
        }
    }
}

#[tokio::test]
async fn trends_from_raw_and_rollups_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.fsync = false;
    let h = start(cfg).await;
    let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
    let mut seq = 1;
    feed_samples(&mut a, 2, 4, &mut seq).await;
    let mut c = TelemetryClient::new(h.channel.clone());
    for agg in [
        Aggregation::Avg,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::Last,
    ] {
        for metric in ["gpu_util_pct", "power_w", "temperature_c"] {
            let raw = trend(&mut c, metric, "3h", 600, agg, Tier::Raw, GroupBy::Gpu).await;
            let m1 = trend(&mut c, metric, "3h", 600, agg, Tier::Tier1m, GroupBy::Gpu).await;
            assert_eq!(raw.source, Tier::Raw as i32);
            assert_eq!(m1.source, Tier::Tier1m as i32);
            assert_eq!(raw.series.len(), 2);
            assert!(raw.series[0].points.len() >= 18);
            assert_series_agree(&raw, &m1, &format!("{metric} {agg:?} raw vs 1m"));
            let raw_h = trend(&mut c, metric, "3h", 3600, agg, Tier::Raw, GroupBy::Node).await;
            let h1 = trend(&mut c, metric, "3h", 3600, agg, Tier::Tier1h, GroupBy::Node).await;
            assert_series_agree(&raw_h, &h1, &format!("{metric} {agg:?} raw vs 1h"));
        }
    }
    // The collector picks the tier from the step: 10 s steps need raw, 10 min the 1 min tier.
    let auto = trend(
        &mut c,
        "gpu_util_pct",
        "1h",
        10,
        Aggregation::Avg,
        Tier::Unspecified,
        GroupBy::Gpu,
    )
    .await;
    assert_eq!(auto.source, Tier::Raw as i32);
    let auto = trend(
        &mut c,
        "gpu_util_pct",
        "3h",
        600,
        Aggregation::Avg,
        Tier::Unspecified,
        GroupBy::Gpu,
    )
    .await;
    assert_eq!(auto.source, Tier::Tier1m as i32);
    let p95 = trend(
        &mut c,
        "gpu_util_pct",
        "3h",
        600,
        Aggregation::P95,
        Tier::Unspecified,
        GroupBy::Gpu,
    )
    .await;
    assert_eq!(p95.source, Tier::Raw as i32, "p95 prefers raw samples");
    assert!(!p95.approximate);
    // Power is stored in mW and shown in W.
    let p = trend(
        &mut c,
        "power_w",
        "1h",
        0,
        Aggregation::Max,
        Tier::Unspecified,
        GroupBy::Fleet,
    )
    .await;
    assert_eq!(p.unit, "watts");
    let st = p.series[0].stats.unwrap();
    assert!(st.max > 300.0 && st.max < 305.0, "{st:?}");
    assert_eq!(p.series[0].merged_series, 2, "fleet merges both GPUs");
    // Per-entity truth: each GPU's own values, never spread.
    let per_gpu = trend(
        &mut c,
        "gpu_util_pct",
        "1h",
        60,
        Aggregation::Avg,
        Tier::Raw,
        GroupBy::Gpu,
    )
    .await;
    assert_ne!(
        per_gpu.series[0].stats.unwrap().avg,
        per_gpu.series[1].stats.unwrap().avg
    );
    // Caps and hints.
    let capped = c
        .trend(TrendRequest {
            metric: "gpu_util_pct".into(),
            window: window("1h"),
            max_series: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((capped.series.len(), capped.series_total), (1, 2));
    assert!(capped.series[0].other);
    let e = c
        .trend(TrendRequest {
            metric: "gpu_utilisation".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("gpu_util_pct"), "{}", e.message());
    let week = trend(
        &mut c,
        "gpu_util_pct",
        "7d",
        0,
        Aggregation::Avg,
        Tier::Unspecified,
        GroupBy::Gpu,
    )
    .await;
    assert!(week.window.unwrap().partial);
    assert!(week.series[0].points.len() <= 1000);
    assert!(
        week.hints.iter().any(|h| h.contains("oldest")),
        "{:?}",
        week.hints
    );
}

#[tokio::test]
async fn history_survives_restart_from_snapshot_after_the_log_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.fsync = false;
    cfg.events_bytes = 256 << 10;
    cfg.snapshot_interval = std::time::Duration::from_secs(1);
    cfg.wal_max_bytes = 128 << 10;
    let before;
    let xids_before;
    {
        let h = start(cfg.clone()).await;
        let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
        let mut seq = 1;
        a.send(seq, vec![xid(79, "fell off")]).await.unwrap();
        seq += 1;
        feed_samples(&mut a, 2, 6, &mut seq).await;
        // Wait for snapshots to cover everything and the log to be cut.
        let mut c = TelemetryClient::new(h.channel.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let s = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
            let snaps = h.metrics.snapshots.with_label_values(&["series"]).get();
            if snaps > 0 && s.wal_bytes < 1 << 20 && dir.path().join("events.snap").exists() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no snapshot: {s:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // A last snapshot after the final batch.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        before = trend(
            &mut c,
            "gpu_util_pct",
            "6h",
            900,
            Aggregation::Avg,
            Tier::Tier1m,
            GroupBy::Gpu,
        )
        .await;
        xids_before = list(
            &mut c,
            ListEventsRequest {
                window: window("1h"),
                filter: Some(EventFilter {
                    kinds: vec![EventKind::Xid as i32],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(xids_before.total_matched, 1);
    }
    // The raw samples far exceed the log budget: only snapshots can bring this history back.
    let wal: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("wal-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(wal < 2 << 20, "log not cut: {wal}");
    let h = start(cfg.clone()).await;
    let mut c = TelemetryClient::new(h.channel.clone());
    let after = trend(
        &mut c,
        "gpu_util_pct",
        "6h",
        900,
        Aggregation::Avg,
        Tier::Tier1m,
        GroupBy::Gpu,
    )
    .await;
    assert!(before.series[0].points.len() >= 20);
    assert_series_agree(&before, &after, "restart");
    let xids = list(
        &mut c,
        ListEventsRequest {
            window: window("1h"),
            filter: Some(EventFilter {
                kinds: vec![EventKind::Xid as i32],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(xids.events, xids_before.events, "XID kept across restart");
    drop(c);
    drop(h);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // A damaged snapshot is reported and skipped; the collector starts and serves what the log has.
    let p = dir.path().join("series.snap");
    let mut data = std::fs::read(&p).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&p, data).unwrap();
    let h = start(cfg).await;
    assert_eq!(
        h.metrics
            .snapshot_failures
            .with_label_values(&["series", "load"])
            .get(),
        1
    );
    let mut c = TelemetryClient::new(h.channel.clone());
    let s = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert!(s.events_stored > 0);
    let after = trend(
        &mut c,
        "gpu_util_pct",
        "6h",
        900,
        Aggregation::Avg,
        Tier::Tier1m,
        GroupBy::Gpu,
    )
    .await;
    assert!(
        after.series.iter().map(|s| s.points.len()).sum::<usize>()
            < before.series.iter().map(|s| s.points.len()).sum::<usize>(),
        "history beyond the log is gone with the damaged snapshot"
    );
}

#[tokio::test]
async fn xid_counters_survive_restart_after_the_events_expired() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.fsync = false;
    cfg.events_bytes = 64 << 10;
    cfg.wal_max_bytes = 64 << 10;
    cfg.snapshot_interval = std::time::Duration::from_secs(1);
    let labels = ["n1", "", "0000:3b:00.0", "79", "fatal"];
    let n1_xids = |s: &v1::StatusResponse| {
        s.kinds
            .iter()
            .find(|k| k.kind == EventKind::Xid as i32)
            .map_or(0, |k| k.expired)
    };
    {
        let h = start(cfg.clone()).await;
        let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
        a.send(
            1,
            vec![xid(79, "fell off"), xid(79, "again"), sample(0, now_ms())],
        )
        .await
        .unwrap();
        assert_eq!(h.metrics.xid_events.with_label_values(&labels).get(), 2);
        // Another node's XIDs push n1's out of the store (oldest first within the XID share).
        let (mut b, _) = AgentStream::open(&h, "n2/a", "n2").await;
        let mut c = TelemetryClient::new(h.channel.clone());
        let mut seq = 1;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let evs: Vec<v1::Event> = (0..50)
                .map(|i| xid(13, &format!("flood {seq} {i}")))
                .collect();
            b.send(seq, evs).await.unwrap();
            seq += 50;
            let s = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
            if n1_xids(&s) > 100 && h.metrics.snapshots.with_label_values(&["series"]).get() > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{s:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let r = c
            .list_events(ListEventsRequest {
                filter: Some(EventFilter {
                    nodes: vec!["n1".into()],
                    kinds: vec![EventKind::Xid as i32],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.total_matched, 0, "n1's XIDs have expired");
        // One more snapshot after the last batch.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    let h = start(cfg).await;
    assert_eq!(
        h.metrics.xid_events.with_label_values(&labels).get(),
        2,
        "the counter comes back although none of its events is stored any more"
    );
    assert!(
        h.metrics
            .xid_events
            .with_label_values(&["n2", "", "0000:3b:00.0", "13", "error"])
            .get()
            > 100
    );
}

/// Events are listed by time (then agent id and seq), not by arrival: a backlog that arrives
/// late sits where it happened. `resume_after` (a gateway's position, by seq) continues a
/// listing exactly where any event of it left off.
#[tokio::test]
async fn listing_is_by_time_and_resumes_after_any_position() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut a, _) = AgentStream::open(&h, "n1/a", "n1").await;
    let (mut b, _) = AgentStream::open(&h, "n2/b", "n2").await;
    let t0 = now_ms() - 600 * S;
    // a: one per 10 s; b: the backlog, arriving after, interleaved in time (and one tie).
    a.send(
        1,
        (0..20)
            .map(|i| timed_log(&format!("a{i}"), t0 + i * 10 * S))
            .collect(),
    )
    .await
    .unwrap();
    b.send(
        1,
        (0..20)
            .map(|i| timed_log(&format!("b{i}"), t0 + i * 10 * S + 5 * S))
            .collect(),
    )
    .await
    .unwrap();
    b.send(21, vec![timed_log("b-tie", t0 + 50 * S)])
        .await
        .unwrap();
    let mut c = TelemetryClient::new(h.channel.clone());
    let all = list(
        &mut c,
        ListEventsRequest {
            window: window("1h"),
            filter: logs_only(),
            limit: 1000,
            order: Order::OldestFirst as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.events.len(), 41);
    let keys: Vec<_> = all
        .events
        .iter()
        .map(gpulse_proto::listing::position)
        .map(|p| (p.time_ms, p.agent_id, p.seq))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "listed by (time, agent id, seq)");
    for order in [Order::OldestFirst, Order::NewestFirst] {
        let full: Vec<v1::Event> = match order {
            Order::OldestFirst => all.events.clone(),
            _ => all.events.iter().rev().cloned().collect(),
        };
        for cut in [0usize, 10, 11, 39] {
            let r = list(
                &mut c,
                ListEventsRequest {
                    window: window("1h"),
                    filter: logs_only(),
                    limit: 1000,
                    order: order as i32,
                    resume_after: Some(gpulse_proto::listing::position(&full[cut])),
                    ..Default::default()
                },
            )
            .await;
            let got: Vec<u64> = r.events.iter().map(|e| e.cursor).collect();
            let want: Vec<u64> = full[cut + 1..].iter().map(|e| e.cursor).collect();
            assert_eq!(got, want, "{order:?} after #{cut}");
        }
    }
}
