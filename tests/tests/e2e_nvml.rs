//! GPU samples end to end: the agent loads the fake libnvidia-ml.so (the real nvml-wrapper path),
//! samples three GPUs, and the collector's subscribers receive them; NVML's PCI -> UUID map
//! enriches an XID for one of those GPUs. Root only (the agent captures XIDs with eBPF).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::time::Duration;

use gpulse_e2e::*;
use gpulse_proto::v1::{EventFilter, EventKind, event::Payload};

#[test]
fn samples_stream_and_nvml_enriches_xids() {
    if !require_root("samples_stream_and_nvml_enriches_xids") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let node = marker("e2e-nvml");
    let agent_log = dir.path().join("agent.log");
    let url = c.url();
    let _agent = start_nvml_agent(&url, &node, "three-gpus.json", 100, &agent_log).unwrap();

    let rt = runtime();
    let f = EventFilter {
        nodes: vec![node.clone()],
        kinds: vec![EventKind::GpuSample as i32],
        ..Default::default()
    };
    let samples = rt
        .block_on(collect_events(
            &url,
            f,
            Some(0),
            Duration::from_secs(15),
            |e| e.len() >= 9,
        ))
        .unwrap();
    assert!(samples.len() >= 9, "{} samples", samples.len());
    let mut uuids: Vec<String> = samples
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::GpuSample(g)) if !g.uuid.is_empty() => Some(g.uuid.clone()),
            _ => None,
        })
        .collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 3, "{uuids:?}");

    // An XID on the first GPU's PCI address gets the UUID NVML reported (no log preamble).
    let m = marker("nv");
    inject(&format!(
        "NVRM: Xid (PCI:0000:3b:00): 94, pid=12, name=trainer, Contained ECC error {m}"
    ))
    .unwrap();
    let node_name = node.clone();
    let f = EventFilter {
        nodes: vec![node],
        kinds: vec![EventKind::Xid as i32],
        ..Default::default()
    };
    let xids = rt
        .block_on(collect_events(
            &url,
            f,
            Some(0),
            Duration::from_secs(10),
            |e| !e.is_empty(),
        ))
        .unwrap();
    let x = xid_of(&xids[0]).unwrap();
    assert_eq!(x.code, 94);
    assert_eq!(x.gpu_uuid, "GPU-11111111-2222-3333-4444-555555555555");
    let agent = std::fs::read_to_string(&agent_log).unwrap();
    assert!(agent.contains("NVML sampling on"), "{agent}");

    // `gpulse nodes --json` shows this node, connected, with its three GPUs' latest samples.
    let out = std::process::Command::new(bin("gpulse"))
        .args(["nodes", "--json", "--collector", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.contains(&node_name))
        .map(str::to_string)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["connected"], true);
    assert_eq!(v["gpus"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["gpus"][0]["uuid"],
        "GPU-11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(v["gpus"][0]["pci"], "0000:3b:00.0");
}

#[test]
fn agent_without_nvml_says_so_once_and_keeps_streaming() {
    if !require_root("agent_without_nvml_says_so_once") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let node = marker("e2e-nonvml");
    let agent_log = dir.path().join("agent.log");
    let url = c.url();
    let _agent = start_agent(
        &url,
        &node,
        "ebpf",
        &agent_log,
        &["--nvml", "/nonexistent/libnvidia-ml.so.1"],
    )
    .unwrap();
    wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
    let m = marker("nonvml");
    inject(&format!(
        "NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception {m}"
    ))
    .unwrap();
    let rt = runtime();
    let f = EventFilter {
        nodes: vec![node],
        ..Default::default()
    };
    let evs = rt
        .block_on(collect_events(
            &url,
            f,
            Some(0),
            Duration::from_secs(10),
            // Both: the agent queues its Started status after its source is live, so an XID
            // injected at once may be stored before it.
            |e| {
                e.iter().any(|e| xid_of(e).is_some())
                    && e.iter()
                        .any(|e| matches!(e.payload, Some(Payload::AgentStatus(_))))
            },
        ))
        .unwrap();
    assert!(
        evs.iter()
            .any(|e| xid_of(e).is_some_and(|x| x.message.ends_with(&m)))
    );
    let status = evs
        .iter()
        .find_map(|e| match &e.payload {
            Some(Payload::AgentStatus(s)) => Some(s.detail.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        status.contains("GPU samples off: NVML unavailable"),
        "{status}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert_eq!(
        log.matches("NVML unavailable").count(),
        1,
        "said once: {log}"
    );
}
