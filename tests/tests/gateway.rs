//! A gateway over three collector shards, as processes on loopback. With every shard up its
//! answers equal those of one collector holding the same data (listings event for event,
//! counts, XID groups, fleet trends); with a shard killed or frozen (SIGSTOP) every answer comes
//! back within the deadline, partial, naming that shard and why; a frozen shard's circuit opens
//! and closes again once it answers. The CLI shows where the answer came from.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use gpulse_e2e::*;
use gpulse_proto::{
    time as ptime,
    v1::{
        self, Aggregation, EventKind, GroupBy, ListEventsRequest, NodesRequest, Order,
        StatusRequest, SummarizeRequest, TimeWindow, TrendRequest, UpstreamState, XidGrouping,
        XidGroupsRequest, event::Payload, telemetry_client::TelemetryClient,
    },
};

type Client = TelemetryClient<tonic::transport::Channel>;

const XIDS: [u32; 4] = [79, 13, 48, 31];

fn at(ms: i64) -> Option<prost_types::Timestamp> {
    Some(ptime::from_unix_millis(ms))
}

/// One node's last two minutes: two GPUs sampled every 10 s, a few XIDs and log lines.
fn node_events(node: &str, n: usize, end_ms: i64) -> Vec<v1::Event> {
    let mut out = Vec::new();
    for step in 0..12i64 {
        let t = end_ms - (12 - step) * 10_000;
        for gpu in 0..2u32 {
            out.push(v1::Event {
                kind: EventKind::GpuSample as i32,
                severity: v1::Severity::Info as i32,
                // Distinct times across the fleet: "last" has one answer.
                time: at(t + i64::from(gpu) + 2 * n as i64),
                payload: Some(Payload::GpuSample(v1::GpuSample {
                    index: gpu,
                    uuid: format!("GPU-{node}-{gpu}"),
                    gpu_util_pct: Some(
                        ((step as usize * 7 + n * 13 + gpu as usize * 29) % 101) as u32,
                    ),
                    temperature_c: Some(40 + (n as u32 + gpu) % 30),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
    }
    for k in 0..(2 + n % 3) {
        let code = XIDS[(n + k) % XIDS.len()];
        let info = gpulse_xid::catalog::lookup(code).unwrap();
        out.push(v1::Event {
            kind: EventKind::Xid as i32,
            severity: info.severity as i32,
            time: at(end_ms - 100_000 + (k as i64) * 7_000 + n as i64 * 13),
            payload: Some(Payload::Xid(v1::Xid {
                code,
                pci: format!("0000:{:02x}:00.0", 0x3b + k % 2),
                gpu_uuid: format!("GPU-{node}-{}", k % 2),
                message: format!("xid {code} on {node}"),
                mnemonic: info.mnemonic.into(),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    for k in 0..5 {
        out.push(v1::Event {
            kind: EventKind::DriverLog as i32,
            severity: v1::Severity::Info as i32,
            time: at(end_ms - 90_000 + k * 11_000 + n as i64),
            payload: Some(Payload::DriverLog(v1::DriverLog {
                text: format!("log {k} of {node}"),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    out.sort_by_key(|e| e.time.as_ref().map(ptime::to_unix_millis));
    out
}

struct Fleet {
    _dir: tempfile::TempDir,
    shards: Vec<Collector>,
    reference: Collector,
    gateway: Gateway,
    /// Nodes per shard.
    nodes: Vec<Vec<String>>,
    window: TimeWindow,
}

/// Three shards (cluster c1), one reference collector fed the same events, and a gateway.
fn fleet(rt: &tokio::runtime::Runtime, gateway_args: &[&str]) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Collector> = (0..3)
        .map(|i| {
            let shard = format!("s{i}");
            Collector::start(
                &dir.path().join(&shard),
                free_port(),
                free_port(),
                &["--fsync", "never", "--cluster", "c1", "--shard", &shard],
            )
            .unwrap()
        })
        .collect();
    let reference = Collector::start(
        &dir.path().join("all"),
        free_port(),
        free_port(),
        &["--fsync", "never"],
    )
    .unwrap();
    let now = ptime::to_unix_millis(&ptime::now());
    let end = now - now % 60_000;
    let mut nodes = vec![Vec::new(); 3];
    for n in 0..7usize {
        let node = format!("gpu-node-{n}");
        let evs = node_events(&node, n, end);
        let shard = n % 3;
        rt.block_on(ingest_batches(&shards[shard].url(), &node, [evs.clone()]))
            .unwrap();
        rt.block_on(ingest_batches(&reference.url(), &node, [evs]))
            .unwrap();
        nodes[shard].push(node);
    }
    let upstreams: Vec<(&str, String)> = vec![
        ("s0", shards[0].url()),
        ("s1", shards[1].url()),
        ("s2", shards[2].url()),
    ];
    let gateway = Gateway::start(dir.path(), &upstreams, gateway_args).unwrap();
    let window = TimeWindow {
        since: ptime::rfc3339(&ptime::from_unix_millis(end - 600_000)),
        until: ptime::rfc3339(&ptime::from_unix_millis(end + 60_000)),
    };
    Fleet {
        _dir: dir,
        shards,
        reference,
        gateway,
        nodes,
        window,
    }
}

async fn client(url: &str) -> Client {
    TelemetryClient::connect(url.to_string()).await.unwrap()
}

/// Every event in the window, paging `limit` at a time: (agent id, seq) in listing order.
async fn listing(
    c: &mut Client,
    w: &TimeWindow,
    order: Order,
    limit: u32,
) -> (Vec<(String, u64)>, bool) {
    let mut out = Vec::new();
    let mut token = String::new();
    let mut partial = false;
    loop {
        // The agents' events: a collector's verdicts (seq 0, at their evidence's millisecond)
        // follow their evidence in that collector's cursor order, which a merged listing cannot
        // reproduce among events of the same agent and millisecond.
        let r = c
            .list_events(ListEventsRequest {
                window: Some(w.clone()),
                limit,
                page_token: token.clone(),
                order: order as i32,
                filter: Some(gpulse_proto::v1::EventFilter {
                    kinds: gpulse_proto::v1::EventKind::ALL
                        .iter()
                        .filter(|k| **k != gpulse_proto::v1::EventKind::GpuHealth)
                        .map(|k| *k as i32)
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        partial |= r.partial;
        out.extend(r.events.iter().map(|e| (e.agent_id.clone(), e.seq)));
        if r.next_page_token.is_empty() {
            return (out, partial);
        }
        token = r.next_page_token;
        assert!(out.len() < 100_000, "paging does not end");
    }
}

fn states(u: &[v1::UpstreamStatus]) -> Vec<(String, UpstreamState)> {
    u.iter()
        .map(|u| (u.name.clone(), UpstreamState::try_from(u.state).unwrap()))
        .collect()
}

fn trend_req(w: &TimeWindow, agg: Aggregation, group: GroupBy) -> TrendRequest {
    TrendRequest {
        metric: "gpu_util_pct".into(),
        window: Some(w.clone()),
        aggregation: agg as i32,
        group_by: group as i32,
        max_series: 200,
        ..Default::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0) || (a.is_nan() && b.is_nan())
}

#[test]
fn gateway_answers_equal_one_collector_and_degrade_to_partial_within_the_deadline() {
    let rt = runtime();
    let mut f = fleet(
        &rt,
        &[
            "--upstream-timeout",
            "1s",
            "--breaker-failures",
            "2",
            "--breaker-cooldown",
            "1s",
        ],
    );
    let w = f.window.clone();
    rt.block_on(async {
        let mut g = client(&f.gateway.url()).await;
        let mut r = client(&f.reference.url()).await;

        // Status: every upstream ok, figures summed.
        let gs = g.status(StatusRequest {}).await.unwrap().into_inner();
        let rs = r.status(StatusRequest {}).await.unwrap().into_inner();
        assert!(!gs.partial);
        assert_eq!(
            states(&gs.upstreams),
            [
                ("s0".into(), UpstreamState::Ok),
                ("s1".into(), UpstreamState::Ok),
                ("s2".into(), UpstreamState::Ok)
            ]
        );
        assert_eq!(gs.events_stored, rs.events_stored);

        // Listings: the same events in the same order, whatever the page size and direction.
        for order in [Order::NewestFirst, Order::OldestFirst] {
            let (want, _) = listing(&mut r, &w, order, 1000).await;
            assert!(want.len() > 200, "{}", want.len());
            for limit in [1000, 13, 1] {
                let (got, partial) = listing(&mut g, &w, order, limit).await;
                assert!(!partial);
                assert_eq!(got, want, "{order:?} limit {limit}");
            }
        }

        // Nodes: every node once, named with its cluster.
        let nodes = g.nodes(NodesRequest::default()).await.unwrap().into_inner();
        let names: BTreeSet<String> = nodes.nodes.iter().map(|n| n.node.clone()).collect();
        assert_eq!(names.len(), 7);
        assert!(nodes.nodes.iter().all(|n| n.cluster == "c1"));

        // Summaries and XID groups count the same.
        let req = SummarizeRequest {
            window: Some(w.clone()),
            filter: None,
        };
        let gsum = g.summarize(req.clone()).await.unwrap().into_inner();
        let rsum = r.summarize(req).await.unwrap().into_inner();
        assert_eq!(gsum.total_matched, rsum.total_matched);
        assert_eq!(gsum.kinds, rsum.kinds);
        assert_eq!(gsum.xids, rsum.xids);
        assert_eq!(gsum.top_nodes, rsum.top_nodes);
        assert_eq!(gsum.incidents_total, rsum.incidents_total);
        for by in [XidGrouping::Code, XidGrouping::Node, XidGrouping::Gpu] {
            let req = XidGroupsRequest {
                window: Some(w.clone()),
                group_by: by as i32,
                top: 5,
                ..Default::default()
            };
            let a = g.xid_groups(req.clone()).await.unwrap().into_inner();
            let b = r.xid_groups(req).await.unwrap().into_inner();
            let key = |x: &v1::XidGroupsResponse| -> Vec<(String, u64)> {
                x.groups.iter().map(|g| (g.key.clone(), g.count)).collect()
            };
            assert_eq!(key(&a), key(&b), "{by:?}");
            assert_eq!(a.other_count, b.other_count, "{by:?}");
        }

        // Trends: per GPU and fleet-wide, avg/min/max/last exactly as one collector has them.
        for group in [GroupBy::Gpu, GroupBy::Node, GroupBy::Fleet] {
            for agg in [
                Aggregation::Avg,
                Aggregation::Min,
                Aggregation::Max,
                Aggregation::Last,
            ] {
                let a = g
                    .trend(trend_req(&w, agg, group))
                    .await
                    .unwrap()
                    .into_inner();
                let b = r
                    .trend(trend_req(&w, agg, group))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(a.step_seconds, b.step_seconds);
                assert_eq!(a.series.len(), b.series.len(), "{group:?} {agg:?}");
                for (x, y) in a.series.iter().zip(&b.series) {
                    assert_eq!((&x.node, x.gpu_index), (&y.node, y.gpu_index));
                    let pts = |s: &v1::TrendSeries| -> Vec<(i64, f64, u64)> {
                        s.points
                            .iter()
                            .map(|p| {
                                (
                                    p.time.as_ref().map(ptime::to_unix_millis).unwrap(),
                                    p.value,
                                    p.samples,
                                )
                            })
                            .collect()
                    };
                    let (px, py) = (pts(x), pts(y));
                    assert_eq!(px.len(), py.len(), "{group:?} {agg:?} {}", x.node);
                    for (p, q) in px.iter().zip(&py) {
                        assert!(
                            p.0 == q.0 && p.2 == q.2 && close(p.1, q.1),
                            "{group:?} {agg:?}: {p:?} vs {q:?}"
                        );
                    }
                    let (sx, sy) = (x.stats.unwrap(), y.stats.unwrap());
                    assert!(
                        close(sx.avg, sy.avg)
                            && sx.min == sy.min
                            && sx.max == sy.max
                            && sx.last == sy.last
                            && sx.samples == sy.samples,
                        "{group:?} {agg:?}: {sx:?} vs {sy:?}"
                    );
                }
                assert!(!a.approximate, "{group:?} {agg:?}");
            }
        }
    });

    // The CLI through the gateway says where the answer came from.
    let out = Command::new(bin("gpulse"))
        .args([
            "events",
            "--collector",
            &f.gateway.url(),
            "--json",
            "--since",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["partial"], false);
    assert_eq!(v["upstreams"].as_array().unwrap().len(), 3);

    // One shard killed: answers from the other two, partial, the dead one named as an error.
    f.shards[2].proc.kill9();
    let on_s2: u64 = f.nodes[2].len() as u64;
    rt.block_on(async {
        let mut g = client(&f.gateway.url()).await;
        let t = Instant::now();
        let nodes = g.nodes(NodesRequest::default()).await.unwrap().into_inner();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert!(nodes.partial);
        assert_eq!(nodes.nodes.len() as u64, 7 - on_s2);
        let st = states(&nodes.upstreams);
        assert_eq!(
            st[2],
            ("s2".into(), UpstreamState::Error),
            "{:?}",
            nodes.upstreams
        );
        assert!(!nodes.upstreams[2].reason.is_empty());
        let (events, partial) = listing(&mut g, &w, Order::NewestFirst, 50).await;
        assert!(partial);
        assert!(
            events
                .iter()
                .all(|(a, _)| !f.nodes[2].iter().any(|n| a.starts_with(n.as_str())))
        );
    });
    let out = Command::new(bin("gpulse"))
        .args(["nodes", "--collector", &f.gateway.url(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["partial"], true);
    // By now s2 failed often enough for its circuit to open.
    let s2 = last["upstreams"][2]["state"].as_str().unwrap().to_string();
    assert!(s2 == "error" || s2 == "circuit_open", "{last}");

    // One shard frozen: its calls time out at the deadline, then its circuit opens (answers
    // come at once), and closes again once it answers.
    freeze(&f.shards[1].proc, true);
    rt.block_on(async {
        let mut g = client(&f.gateway.url()).await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let t = Instant::now();
            let s = g
                .summarize(SummarizeRequest {
                    window: Some(w.clone()),
                    filter: None,
                })
                .await
                .unwrap()
                .into_inner();
            let took = t.elapsed();
            assert!(
                took < Duration::from_millis(2500),
                "{took:?}: a frozen shard held the answer"
            );
            assert!(s.partial);
            let st = states(&s.upstreams)[1].1;
            seen.push((st, took));
            assert!(s.total_matched > 0, "the other shards answered");
        }
        assert_eq!(seen[0].0, UpstreamState::Timeout, "{seen:?}");
        assert!(seen[0].1 >= Duration::from_millis(900), "{seen:?}");
        assert_eq!(seen[3].0, UpstreamState::CircuitOpen, "{seen:?}");
        assert!(seen[3].1 < Duration::from_millis(500), "{seen:?}");
    });
    freeze(&f.shards[1].proc, false);
    rt.block_on(async {
        let mut g = client(&f.gateway.url()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = g.status(StatusRequest {}).await.unwrap().into_inner();
            if states(&s.upstreams)[1].1 == UpstreamState::Ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "s1 did not come back: {:?}",
                s.upstreams
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let metrics = http_get(f.gateway.http_port, "/metrics").unwrap().1;
    assert!(
        value_of_metric(&metrics, "gpulse_gateway_upstream_calls_total{result=\"circuit_open\",rpc=\"Summarize\",upstream=\"s1\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    assert!(
        value_of_metric(
            &metrics,
            "gpulse_gateway_partial_answers_total{rpc=\"Nodes\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // Every upstream gone: the call fails as a whole, saying why for each.
    f.shards[0].proc.kill9();
    f.shards[1].proc.kill9();
    rt.block_on(async {
        let mut g = client(&f.gateway.url()).await;
        let e = g.nodes(NodesRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message().contains("s0") && e.message().contains("s2"),
            "{}",
            e.message()
        );
    });
    assert_eq!(http_get(f.gateway.http_port, "/readyz").unwrap().0, 503);
    assert!(f.gateway.proc.term().is_some_and(|s| s.success()));
}

fn logs(n: usize, tag: &str) -> Vec<v1::Event> {
    (0..n)
        .map(|i| v1::Event {
            kind: EventKind::DriverLog as i32,
            severity: v1::Severity::Info as i32,
            time: Some(ptime::now()),
            payload: Some(Payload::DriverLog(v1::DriverLog {
                text: format!("{tag} {i}"),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect()
}

/// Reads a merged stream until `want` events arrived (or `within` passed): the events' (agent
/// id, seq), the upstream notes, and the last resume token.
async fn read_stream(
    s: &mut tonic::Streaming<v1::SubscribeResponse>,
    want: usize,
    within: Duration,
) -> (Vec<(String, u64)>, Vec<(String, UpstreamState)>, String) {
    let (mut events, mut notes, mut token) = (Vec::new(), Vec::new(), String::new());
    let deadline = tokio::time::Instant::now() + within;
    while events.len() < want {
        let m = match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(m))) => m,
            _ => break,
        };
        token = m.resume_token.clone();
        match m.msg {
            Some(v1::subscribe_response::Msg::Event(e)) => events.push((e.agent_id, e.seq)),
            Some(v1::subscribe_response::Msg::Upstream(u)) => {
                notes.push((u.name, UpstreamState::try_from(u.state).unwrap()))
            }
            _ => {}
        }
    }
    (events, notes, token)
}

#[test]
fn subscribe_through_the_gateway_across_a_shard_restart_and_resume() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut shards: Vec<Collector> = (0..3)
        .map(|i| {
            Collector::start(
                &dir.path().join(format!("s{i}")),
                free_port(),
                free_port(),
                &[],
            )
            .unwrap()
        })
        .collect();
    let ups: Vec<(&str, String)> = vec![
        ("s0", shards[0].url()),
        ("s1", shards[1].url()),
        ("s2", shards[2].url()),
    ];
    let gw = Gateway::start(dir.path(), &ups, &["--upstream-timeout", "1s"]).unwrap();
    rt.block_on(async {
        let mut g = client(&gw.url()).await;
        let mut stream = g
            .subscribe(v1::SubscribeRequest::default())
            .await
            .unwrap()
            .into_inner();
        // The stream is open on every shard before anything is sent (each follower starts
        // after its shard's newest cursor).
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, s) in shards.iter().enumerate() {
            ingest_batches(&s.url(), &format!("live-{i}"), [logs(10, "first")])
                .await
                .unwrap();
        }
        let (mut seen, _, _) = read_stream(&mut stream, 30, Duration::from_secs(10)).await;
        assert_eq!(seen.len(), 30, "{seen:?}");

        // s1 restarts: the stream says it left and came back, and what s1 stores after (and
        // while the gateway had not yet reconnected) arrives, once.
        let s1_dir = shards[1].data_dir.clone();
        let (gp, hp) = (shards[1].grpc_port, shards[1].http_port);
        shards[1].proc.term();
        let (_, notes, _) = read_stream(&mut stream, 1, Duration::from_secs(3)).await;
        assert!(
            notes.contains(&("s1".into(), UpstreamState::Error)),
            "{notes:?}"
        );
        shards[1] = Collector::start(&s1_dir, gp, hp, &[]).unwrap();
        ingest_batches(&shards[1].url(), "after-restart", [logs(10, "second")])
            .await
            .unwrap();
        let (more, notes, token) = read_stream(&mut stream, 10, Duration::from_secs(15)).await;
        assert_eq!(more.len(), 10, "{more:?} {notes:?}");
        assert!(
            more.iter().all(|(a, _)| a == "after-restart/ingest"),
            "{more:?}"
        );
        seen.extend(more);
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "an event came twice");
        assert!(!token.is_empty());

        // Gone for a while, back with the last token: exactly what was missed.
        drop(stream);
        ingest_batches(&shards[0].url(), "while-away-0", [logs(5, "away")])
            .await
            .unwrap();
        ingest_batches(&shards[2].url(), "while-away-2", [logs(5, "away")])
            .await
            .unwrap();
        let mut stream = g
            .subscribe(v1::SubscribeRequest {
                resume_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (missed, _, _) = read_stream(&mut stream, 11, Duration::from_secs(3)).await;
        assert_eq!(missed.len(), 10, "{missed:?}");
        assert!(
            missed.iter().all(|(a, _)| a.starts_with("while-away-")),
            "{missed:?}"
        );
        // A collector's cursor means nothing through a gateway (0 = everything retained).
        let e = g
            .subscribe(v1::SubscribeRequest {
                after_cursor: Some(5),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
    // SIGTERM ends the merged streams and the gateway within seconds.
    let t = Instant::now();
    let mut gw = gw;
    assert!(gw.proc.term().is_some_and(|s| s.success()));
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

#[test]
fn a_gateway_of_gateways_names_every_level_and_serves_mcp() {
    let python = python_venv("mcp", &["mcp==2.3.0"]).unwrap();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut c1: Vec<Collector> = (0..2)
        .map(|i| {
            let shard = format!("s{i}");
            Collector::start(
                &dir.path().join(format!("c1-{shard}")),
                free_port(),
                free_port(),
                &["--cluster", "c1", "--shard", &shard],
            )
            .unwrap()
        })
        .collect();
    let c2 = Collector::start(
        &dir.path().join("c2"),
        free_port(),
        free_port(),
        &["--cluster", "c2"],
    )
    .unwrap();
    for (i, c) in c1.iter().enumerate() {
        rt.block_on(ingest_batches(&c.url(), &format!("a-{i}"), [logs(3, "c1")]))
            .unwrap();
    }
    feed_over_grpc(&c2.url(), "b-0").unwrap();
    let g1 = Gateway::start(
        dir.path(),
        &[("s0", c1[0].url()), ("s1", c1[1].url())],
        &["--upstream-timeout", "1s"],
    )
    .unwrap();
    let top = Gateway::start(
        dir.path(),
        &[("c1", g1.url()), ("c2", c2.url())],
        &["--upstream-timeout", "3s"],
    )
    .unwrap();
    rt.block_on(async {
        let mut g = client(&top.url()).await;
        let r = g.nodes(NodesRequest::default()).await.unwrap().into_inner();
        let got: Vec<(String, String)> = r
            .nodes
            .iter()
            .map(|n| (n.cluster.clone(), n.node.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("c1".into(), "a-0".into()),
                ("c1".into(), "a-1".into()),
                ("c2".into(), "b-0".into())
            ]
        );
        let names: Vec<String> = r.upstreams.iter().map(|u| u.name.clone()).collect();
        assert_eq!(names, ["c1", "c1/s0", "c1/s1", "c2"]);
        assert!(!r.partial);
        // Selecting upstreams (what MCP's cluster argument sends): a cluster, one shard of
        // it, and an unknown name refused with the known ones.
        for (select, want) in [
            ("c2", vec!["b-0"]),
            ("c1/s0", vec!["a-0"]),
            ("c1/s1,c2", vec!["a-1", "b-0"]),
        ] {
            let mut req = tonic::Request::new(NodesRequest::default());
            req.metadata_mut()
                .insert(gpulse_proto::api::SELECT_UPSTREAMS, select.parse().unwrap());
            let r = g.nodes(req).await.unwrap().into_inner();
            let got: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
            assert_eq!(got, want, "{select}");
        }
        let mut req = tonic::Request::new(NodesRequest::default());
        req.metadata_mut()
            .insert(gpulse_proto::api::SELECT_UPSTREAMS, "c9".parse().unwrap());
        let e = g.nodes(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("c1, c2"), "{}", e.message());
        let (events, _) = listing(
            &mut g,
            &TimeWindow {
                since: "1h".into(),
                until: String::new(),
            },
            Order::OldestFirst,
            2,
        )
        .await;
        assert_eq!(events.len(), 3 + 3 + 2, "{events:?}");
    });
    // MCP against the top gateway, with the official Python client.
    let http = format!("http://127.0.0.1:{}/mcp", top.http_port);
    let out = Command::new(&python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/mcp_client.py"))
        .args(["--http", &http, "--mode", "auto", "--node", "b-0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mcp_client.py against the gateway:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A shard of the inner gateway down: the outer answer is partial and names it by its path.
    c1[1].proc.kill9();
    rt.block_on(async {
        let mut g = client(&top.url()).await;
        let r = g.nodes(NodesRequest::default()).await.unwrap().into_inner();
        assert!(r.partial);
        let st = states(&r.upstreams);
        assert_eq!(st[0], ("c1".into(), UpstreamState::Ok));
        assert_eq!(st[2].0, "c1/s1");
        assert_ne!(st[2].1, UpstreamState::Ok);
        assert_eq!(r.nodes.len(), 2);
    });
}

/// Logs for `node` with times `t0 + i` ms.
fn timed_logs(n: usize, t0: i64, tag: &str) -> Vec<v1::Event> {
    let mut v = logs(n, tag);
    for (i, e) in v.iter_mut().enumerate() {
        e.time = at(t0 + i as i64 * 3);
    }
    v
}

#[test]
fn paging_through_the_gateway_while_shards_expire_data() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Collector> = (0..3)
        .map(|i| {
            Collector::start(
                &dir.path().join(format!("s{i}")),
                free_port(),
                free_port(),
                &["--fsync", "never", "--events-bytes", "64KiB"],
            )
            .unwrap()
        })
        .collect();
    let ups: Vec<(&str, String)> = vec![
        ("s0", shards[0].url()),
        ("s1", shards[1].url()),
        ("s2", shards[2].url()),
    ];
    let gw = Gateway::start(dir.path(), &ups, &[]).unwrap();
    let t0 = ptime::to_unix_millis(&ptime::now()) - 600_000;
    rt.block_on(async {
        for (i, s) in shards.iter().enumerate() {
            ingest_batches(
                &s.url(),
                &format!("old-{i}"),
                [timed_logs(400, t0 + i as i64, "old")],
            )
            .await
            .unwrap();
        }
        let w = TimeWindow {
            since: "1h".into(),
            until: String::new(),
        };
        let mut g = client(&gw.url()).await;
        let mut listed: Vec<v1::Event> = Vec::new();
        let mut token = String::new();
        let mut expired = false;
        let mut round = 0;
        loop {
            let r = g
                .list_events(ListEventsRequest {
                    window: Some(w.clone()),
                    limit: 25,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!r.partial);
            listed.extend(r.events);
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
            // Between pages every shard takes more (newer) events and expires its oldest.
            round += 1;
            for (i, s) in shards.iter().enumerate() {
                let node = format!("new-{i}-{round}");
                ingest_batches(
                    &s.url(),
                    &node,
                    [timed_logs(20, t0 + 500_000 + round * 100, "new")],
                )
                .await
                .unwrap();
            }
            assert!(round < 200, "paging does not end");
            if !expired {
                let st = g.status(StatusRequest {}).await.unwrap().into_inner();
                expired = st.events_expired > 0;
            }
        }
        assert!(expired, "the test must expire events while paging");
        let keys: Vec<(i64, String, u64)> = listed
            .iter()
            .map(gpulse_proto::listing::position)
            .map(|p| (p.time_ms, p.agent_id, p.seq))
            .collect();
        assert!(
            keys.windows(2).all(|k| k[0] > k[1]),
            "out of order or listed twice"
        );
        assert!(
            keys.iter().all(|k| k.1.starts_with("old-")),
            "later arrivals are not listed"
        );
        // Nothing still held that the listing passed over is missing from it.
        let (first, last) = (keys.first().unwrap().clone(), keys.last().unwrap().clone());
        let listed_ids: BTreeSet<(String, u64)> = keys.iter().map(|k| (k.1.clone(), k.2)).collect();
        let mut held: Vec<v1::Event> = Vec::new();
        let mut token = String::new();
        loop {
            let r = g
                .list_events(ListEventsRequest {
                    window: Some(w.clone()),
                    limit: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            held.extend(r.events);
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let mut checked = 0;
        for e in &held {
            let p = gpulse_proto::listing::position(e);
            let k = (p.time_ms, p.agent_id.clone(), p.seq);
            if k <= first && k >= last {
                checked += 1;
                assert!(listed_ids.contains(&(p.agent_id, p.seq)), "skipped {k:?}");
            }
        }
        assert!(
            checked > 100,
            "only {checked} checked of {} held",
            held.len()
        );
    });
}
