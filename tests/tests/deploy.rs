//! deploy/: alert rules under `promtool`, manifests against Kubernetes schemas, and a real
//! Prometheus server scraping a collector until an XID alert fires.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gpulse_e2e::*;
use gpulse_proto::v1::{self, EventKind, event::Payload};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool from Debian's `prometheus` package; a clear failure when it is missing.
fn prom_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found: install Debian's prometheus package (apt-get install prometheus); `sudo -E cargo xtask setup` does"
    );
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let promtool = prom_tool("promtool");
    let dir = repo().join("deploy/prometheus");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "gpulse-rules.yaml"])
            .current_dir(&dir),
    );
    let rules = std::fs::read_to_string(dir.join("gpulse-rules.yaml")).unwrap();
    let n = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(n >= 15, "the shipped rule file lost alerts: {n}");
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "tests/gpulse-rules.test.yaml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert in the rule file has at least one unit test.
    let rules = std::fs::read_to_string(dir.join("gpulse-rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("tests/gpulse-rules.test.yaml")).unwrap();
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "alert {line} has no promtool test"
        );
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let python = python_venv("deploy", &["kubernetes-validate==1.37.0", "PyYAML==6.0.2"]).unwrap();
    let mut c = Command::new(python);
    c.arg(repo().join("tests/deploy/validate.py")).arg(repo());
    if let Some(k) = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .iter()
        .find(|p| Path::new(p).exists())
    {
        c.arg(k);
    }
    let out = run_ok(&mut c);
    eprintln!("{out}");
    assert!(out.contains("\"failures\": 0"), "{out}");
}

fn xid_counter_line(metrics: &str, node: &str) -> Option<String> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("gpulse_xid_events_total{") && l.contains(&format!("node=\"{node}\""))
        })
        .map(str::to_string)
}

fn http_json(port: u16, path: &str) -> serde_json::Value {
    let (code, body) = http_get(port, path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// One XID 79 for `node` over gRPC Ingest (when the kernel path is not available).
fn send_xid(url: &str, node: &str) {
    let ev = v1::Event {
        kind: EventKind::Xid as i32,
        severity: v1::Severity::Fatal as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::Xid(v1::Xid {
            code: 79,
            pci: "0000:3b:00.0".into(),
            message: "GPU has fallen off the bus.".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    runtime()
        .block_on(ingest_batches(url, node, [vec![ev]]))
        .unwrap();
}

#[test]
fn prometheus_scrapes_the_collector_and_an_injected_xid_fires_alerts() {
    let prometheus = prom_tool("prometheus");
    let _k = is_root().then(kernel_lock);
    let dir = tempfile::tempdir().unwrap();
    let (g, h, p) = (free_port(), free_port(), free_port());
    let c = Collector::start(&dir.path().join("data"), g, h, &[]).unwrap();
    let node = marker("prom");
    let agent_log = dir.path().join("agent.log");
    let _agent = if is_root() {
        let a = start_agent(&c.url(), &node, "auto", &agent_log, &["--nvml", "off"]).unwrap();
        wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
        Some(a)
    } else {
        None
    };
    let rules = repo().join("deploy/prometheus/gpulse-rules.yaml");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: gpulse-collector\n    static_configs:\n      - targets: ['127.0.0.1:{h}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let _prom = {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(&prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{p}"))
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            child,
            name: "prometheus".into(),
        }
    };
    // Prometheus up and scraping the collector.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = http_get(
            p,
            "/api/v1/query?query=up%7Bjob%3D%22gpulse-collector%22%7D",
        ) && body.contains("\"value\":[")
            && body.contains("\"1\"]")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the collector:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // An XID through the pipeline; how long until its counter is on /metrics.
    let t0 = Instant::now();
    if is_root() {
        inject(&format!(
            "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {}",
            marker("p")
        ))
        .unwrap();
    } else {
        eprintln!("not root: the XID goes over gRPC Ingest instead of /dev/kmsg");
        send_xid(&c.url(), &node);
    }
    let line = loop {
        if let Some(l) = xid_counter_line(&c.metrics().unwrap(), &node) {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "XID counter never appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let visible = t0.elapsed();
    assert!(
        line.contains("xid=\"79\"") && line.contains("severity=\"fatal\"") && line.ends_with(" 1"),
        "{line}"
    );
    assert!(
        visible < Duration::from_secs(1),
        "counter visible after {visible:?}"
    );

    // Both XID 79 alerts fire (for: 0) within a few scrape/evaluation rounds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let firing = loop {
        let v = http_json(p, "/api/v1/alerts");
        let alerts: Vec<serde_json::Value> = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["node"] == node.as_str() && a["state"] == "firing")
            .cloned()
            .collect();
        let names: Vec<&str> = alerts
            .iter()
            .filter_map(|a| a["labels"]["alertname"].as_str())
            .collect();
        if names.contains(&"GpulseXidFatal") && names.contains(&"GpulseGpuFellOffBus") {
            break alerts;
        }
        assert!(Instant::now() < deadline, "alerts never fired: {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let fatal = firing
        .iter()
        .find(|a| a["labels"]["alertname"] == "GpulseXidFatal")
        .unwrap();
    assert_eq!(fatal["labels"]["xid"], "79");
    assert_eq!(fatal["labels"]["pci"], "0000:3b:00.0");
    assert_eq!(fatal["labels"]["severity"], "critical");
    eprintln!(
        "XID counter on /metrics {:.1} ms after injection; alerts firing {:.1} s after injection",
        visible.as_secs_f64() * 1000.0,
        t0.elapsed().as_secs_f64()
    );
    // The collector's scrape stays small and cheap.
    let metrics = c.metrics().unwrap();
    assert!(metrics.contains("gpulse_node_agent_connected") || !is_root());
}
