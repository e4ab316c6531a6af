//! Long-term history in a real TSDB: collectors push their 1-minute rollups and XID counters
//! with Prometheus remote-write 1.0 into a real VictoriaMetrics and a real Prometheus (its
//! remote-write receiver), both started here on loopback; PromQL reads back exactly the
//! collector's own 1-minute rollups. A collector whose TSDB is down queues on disk, survives a
//! kill -9, and delivers everything once the TSDB is up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    path::Path,
    time::{Duration, Instant},
};

use gpulse_e2e::*;
use gpulse_proto::{
    time as ptime,
    v1::{
        self, Aggregation, EventKind, GroupBy, Tier, TimeWindow, TrendRequest, event::Payload,
        telemetry_client::TelemetryClient,
    },
};

const RW_ARGS: [&str; 8] = [
    "--remote-write-interval",
    "1s",
    "--remote-write-delay",
    "1s",
    "--cluster",
    "c1",
    "--shard",
    "s0",
];

/// Two GPUs of `node`, a sample every 10 s over the 20 minutes before `end_ms` (a minute
/// boundary), and `xids` XID 79s.
fn history(node: &str, end_ms: i64, xids: u32) -> Vec<v1::Event> {
    let mut out = Vec::new();
    for step in 0..120i64 {
        let t = end_ms - (120 - step) * 10_000;
        for gpu in 0..2u32 {
            out.push(v1::Event {
                kind: EventKind::GpuSample as i32,
                severity: v1::Severity::Info as i32,
                time: Some(ptime::from_unix_millis(t + i64::from(gpu))),
                payload: Some(Payload::GpuSample(v1::GpuSample {
                    index: gpu,
                    uuid: format!("GPU-{node}-{gpu}"),
                    gpu_util_pct: Some(((step * 7 + i64::from(gpu) * 29) % 101) as u32),
                    power_mw: Some(250_000 + (step as u32 * 997) % 50_000),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
    }
    for k in 0..xids {
        out.push(v1::Event {
            kind: EventKind::Xid as i32,
            severity: v1::Severity::Fatal as i32,
            time: Some(ptime::from_unix_millis(end_ms - 60_000 + i64::from(k))),
            payload: Some(Payload::Xid(v1::Xid {
                code: 79,
                pci: "0000:3b:00.0".into(),
                gpu_uuid: format!("GPU-{node}-0"),
                message: "GPU has fallen off the bus.".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    out.sort_by_key(|e| e.time.as_ref().map(ptime::to_unix_millis));
    out
}

fn end_ms() -> i64 {
    let now = ptime::to_unix_millis(&ptime::now());
    now - now % 60_000 - 60_000
}

/// A TSDB on loopback: VictoriaMetrics or Prometheus with its remote-write receiver.
struct Tsdb {
    _proc: Proc,
    port: u16,
    write_path: &'static str,
}

impl Tsdb {
    fn victoria(dir: &Path, port: u16) -> Self {
        let bin = system_tool("victoria-metrics", "victoria-metrics").unwrap();
        let args = vec![
            format!("-storageDataPath={}", dir.join("vm").display()),
            format!("-httpListenAddr=127.0.0.1:{port}"),
            // Data minutes old is what this test writes; the default would also do.
            "-retentionPeriod=1y".into(),
        ];
        let p = Proc::spawn_path(&bin, &args, &dir.join(format!("vm-{port}.log"))).unwrap();
        let t = Self {
            _proc: p,
            port,
            write_path: "/api/v1/write",
        };
        t.wait("/health");
        t
    }

    fn prometheus(dir: &Path) -> Self {
        let bin = system_tool("prometheus", "prometheus").unwrap();
        let port = free_port();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, "global:\n  scrape_interval: 1m\n").unwrap();
        let args = vec![
            format!("--config.file={}", cfg.display()),
            format!("--storage.tsdb.path={}", dir.join("prom").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--web.enable-remote-write-receiver".into(),
        ];
        let p = Proc::spawn_path(&bin, &args, &dir.join("prometheus.log")).unwrap();
        let t = Self {
            _proc: p,
            port,
            write_path: "/api/v1/write",
        };
        t.wait("/-/ready");
        t
    }

    fn wait(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(self.port, path).is_ok_and(|(c, _)| c == 200) {
            assert!(Instant::now() < deadline, "TSDB on {} not up", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.port, self.write_path)
    }

    /// The raw samples of `selector` over the last `range` (time ms, value), oldest first.
    fn samples(&self, selector: &str, range: &str) -> Vec<(i64, f64)> {
        let q = url_encode(&format!("{selector}[{range}]"));
        let Ok((200, body)) = http_get(self.port, &format!("/api/v1/query?query={q}")) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let Some(series) = v["data"]["result"].as_array() else {
            return Vec::new();
        };
        assert!(series.len() <= 1, "{selector}: {body}");
        series
            .first()
            .and_then(|s| s["values"].as_array())
            .map(|vals| {
                vals.iter()
                    .map(|p| {
                        let t = (p[0].as_f64().unwrap() * 1000.0).round() as i64;
                        (t, p[1].as_str().unwrap().parse().unwrap())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `selector` has `n` samples in the last 40 minutes.
    fn wait_samples(&self, selector: &str, n: usize, within: Duration) -> Vec<(i64, f64)> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.samples(selector, "40m");
            if s.len() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{selector}: {} of {n} samples arrived",
                s.len()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn history_events(node: &str, end: i64) -> Vec<v1::Event> {
    history(node, end, 0)
}

/// The 1-minute gpu_util_pct trend per GPU of `node` over the 30 minutes before `end`.
fn trend_1m(url: &str, node: &str, end: i64) -> v1::TrendResponse {
    runtime().block_on(async {
        let mut c = TelemetryClient::connect(url.to_string()).await.unwrap();
        c.trend(TrendRequest {
            metric: "gpu_util_pct".into(),
            window: Some(TimeWindow {
                since: ptime::rfc3339(&ptime::from_unix_millis(end - 30 * 60_000)),
                until: ptime::rfc3339(&ptime::from_unix_millis(end)),
            }),
            step_seconds: 60,
            tier: Tier::Tier1m as i32,
            aggregation: Aggregation::Avg as i32,
            group_by: GroupBy::Gpu as i32,
            nodes: vec![node.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    })
}

/// The collector's own 1-minute rollups of gpu_util_pct for one GPU: (minute start ms, avg).
fn local_rollups(url: &str, node: &str, gpu: u32, end: i64) -> Vec<(i64, f64)> {
    runtime().block_on(async {
        let mut c = TelemetryClient::connect(url.to_string()).await.unwrap();
        let r = c
            .trend(TrendRequest {
                metric: "gpu_util_pct".into(),
                window: Some(TimeWindow {
                    since: ptime::rfc3339(&ptime::from_unix_millis(end - 30 * 60_000)),
                    until: ptime::rfc3339(&ptime::from_unix_millis(end)),
                }),
                step_seconds: 60,
                tier: Tier::Tier1m as i32,
                aggregation: Aggregation::Avg as i32,
                group_by: GroupBy::Gpu as i32,
                nodes: vec![node.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let s = r.series.iter().find(|s| s.gpu_index == Some(gpu)).unwrap();
        s.points
            .iter()
            .map(|p| (ptime::to_unix_millis(p.time.as_ref().unwrap()), p.value))
            .collect()
    })
}

fn assert_same(remote: &[(i64, f64)], local: &[(i64, f64)], what: &str) {
    assert_eq!(remote.len(), local.len(), "{what}: {remote:?} vs {local:?}");
    for (r, l) in remote.iter().zip(local) {
        assert!(
            r.0 == l.0 && (r.1 - l.1).abs() < 1e-9,
            "{what}: {r:?} vs {l:?}"
        );
    }
}

fn feed(url: &str, node: &str, end: i64, xids: u32) {
    runtime()
        .block_on(ingest_batches(url, node, [history(node, end, xids)]))
        .unwrap();
}

#[test]
fn rollups_read_back_from_victoriametrics_and_prometheus_equal_the_local_ones() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Tsdb::victoria(dir.path(), free_port());
    let prom = Tsdb::prometheus(dir.path());
    let end = end_ms();
    let mut pushers: Vec<Collector> = Vec::new();
    for (name, tsdb) in [("vm", &vm), ("prom", &prom)] {
        let url = tsdb.url();
        let mut args = vec!["--fsync", "never", "--remote-write-url", url.as_str()];
        args.extend(RW_ARGS);
        let c = Collector::start(&dir.path().join(name), free_port(), free_port(), &args).unwrap();
        feed(&c.url(), "n1", end, 3);
        for gpu in 0..2 {
            let sel = format!(
                "gpulse_gpu_utilization_percent:avg_1m{{node=\"n1\",index=\"{gpu}\",cluster=\"c1\",shard=\"s0\"}}"
            );
            let remote = tsdb.wait_samples(&sel, 20, Duration::from_secs(60));
            let local = local_rollups(&c.url(), "n1", gpu, end);
            assert_eq!(local.len(), 20, "{name}: {local:?}");
            assert_same(&remote, &local, name);
        }
        // Six samples a minute behind each rollup; power in watts as on /metrics.
        let counts = tsdb.samples(
            "gpulse_gpu_utilization_percent:count_1m{node=\"n1\",index=\"0\"}",
            "40m",
        );
        assert!(counts.iter().all(|(_, n)| *n == 6.0), "{name}: {counts:?}");
        let watts = tsdb.samples(
            "gpulse_gpu_power_watts:max_1m{node=\"n1\",index=\"0\"}",
            "40m",
        );
        assert!(
            watts.iter().all(|(_, w)| (250.0..300.0).contains(w)),
            "{name}: {watts:?}"
        );
        // The XID counter as the collector counts it.
        let x = tsdb.wait_samples(
            "gpulse_xid_events_total{node=\"n1\",xid=\"79\",cluster=\"c1\"}",
            1,
            Duration::from_secs(30),
        );
        assert_eq!(x.last().unwrap().1, 3.0, "{name}");
        let m = c.metrics().unwrap();
        assert!(
            value_of_metric(&m, "gpulse_remote_write_samples_total{result=\"sent\"}").unwrap()
                > 0.0
        );
        assert_eq!(
            value_of_metric(&m, "gpulse_remote_write_samples_total{result=\"rejected\"}"),
            Some(0.0),
            "{m}"
        );
        pushers.push(c);
    }

    // The same shard after losing its disk: it holds the last 5 minutes only, and answers the
    // 20-minute trend from VictoriaMetrics for the rest, saying which part came from where.
    let history = format!("http://127.0.0.1:{}", vm.port);
    let mut args = vec!["--fsync", "never", "--history-url", history.as_str()];
    args.extend(&RW_ARGS[4..]);
    let fresh =
        Collector::start(&dir.path().join("fresh"), free_port(), free_port(), &args).unwrap();
    let recent: Vec<v1::Event> = history_events("n1", end)
        .into_iter()
        .filter(|e| e.time.as_ref().map(ptime::to_unix_millis).unwrap() >= end - 5 * 60_000)
        .collect();
    runtime()
        .block_on(ingest_batches(&fresh.url(), "n1", [recent]))
        .unwrap();
    let want = local_rollups(&pushers[0].url(), "n1", 0, end);
    let r = trend_1m(&fresh.url(), "n1", end);
    let s = r.series.iter().find(|s| s.gpu_index == Some(0)).unwrap();
    let got: Vec<(i64, f64)> = s
        .points
        .iter()
        .map(|p| (ptime::to_unix_millis(p.time.as_ref().unwrap()), p.value))
        .collect();
    assert_same(&got, &want, &format!("history + local: {:?}", r.hints));
    let sources: Vec<&str> = r.sources.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(sources, ["history", "1m"], "{:?}", r.hints);
    let split = ptime::to_unix_millis(r.sources[0].end.as_ref().unwrap());
    assert_eq!(
        split,
        end - 5 * 60_000,
        "the collector answers from its own oldest minute on"
    );
    assert!(
        r.hints.iter().any(|h| h.contains("history store")),
        "{:?}",
        r.hints
    );
    assert!(!r.window.unwrap().partial);
}

#[test]
fn the_queue_survives_a_tsdb_outage_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let vm_port = free_port();
    let url = format!("http://127.0.0.1:{vm_port}/api/v1/write");
    let (g, h) = (free_port(), free_port());
    let data = dir.path().join("c");
    let mut args = vec!["--remote-write-url", url.as_str()];
    args.extend(RW_ARGS);
    let mut c = Collector::start(&data, g, h, &args).unwrap();
    let end = end_ms();
    feed(&c.url(), "n2", end, 1);
    // Nothing listens: the rollups wait on disk.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = c.metrics().unwrap();
        let queued = value_of_metric(&m, "gpulse_remote_write_queue_bytes").unwrap_or(0.0);
        let exported = value_of_metric(&m, "gpulse_remote_write_exported_until_timestamp_seconds")
            .unwrap_or(0.0);
        if queued > 0.0 && exported >= (end / 1000) as f64 {
            assert!(
                value_of_metric(&m, "gpulse_remote_write_requests_total{answer=\"error\"}")
                    .unwrap_or(0.0)
                    >= 1.0,
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "nothing queued: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.proc.kill9();
    let c = Collector::start(&data, g, h, &args).unwrap();
    let vm = Tsdb::victoria(dir.path(), vm_port);
    let sel = "gpulse_gpu_utilization_percent:avg_1m{node=\"n2\",index=\"1\"}";
    let remote = vm.wait_samples(sel, 20, Duration::from_secs(90));
    assert_same(
        &remote,
        &local_rollups(&c.url(), "n2", 1, end),
        "after the outage",
    );
    let m = c.metrics().unwrap();
    assert_eq!(
        value_of_metric(
            &m,
            "gpulse_remote_write_samples_total{result=\"queue_full\"}"
        ),
        Some(0.0)
    );
}
