//! End-to-end through the real kernel: records written to /dev/kmsg fire printk:console, the
//! agent's eBPF program (or its /dev/kmsg reader) captures them, the collector stores them, and
//! a gRPC subscriber / `gpulse tail --json` receives them decoded. Root only (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gpulse_e2e::*;
use gpulse_proto::v1::{self, EventFilter, EventKind, event::Payload};

const UUID: &str = "GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b";

fn xid_reaches_subscriber(source: &str, want_source: &str) {
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let node = marker(&format!("e2e-{source}"));
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(&c.url(), &node, source, &agent_log, &[]).unwrap();
    let live = wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
    assert!(live.contains(&format!("source=\"{source}\"")), "{live}");

    // `gpulse tail --json` as a user would run it, filtered to this node's XIDs.
    let mut tail = Command::new(bin("gpulse"))
        .args([
            "tail",
            "--collector",
            &c.url(),
            "--json",
            "--count",
            "1",
            "--kind",
            "xid",
            "--node",
            &node,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let rt = runtime();
    let url = c.url();
    let n2 = node.clone();
    let sub = rt.spawn(async move {
        let f = EventFilter {
            nodes: vec![n2],
            ..Default::default()
        };
        collect_events(&url, f, None, Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e.kind == EventKind::Xid as i32)
                && evs.iter().any(|e| e.kind == EventKind::Sxid as i32)
        })
        .await
    });
    std::thread::sleep(Duration::from_millis(500));
    let m = marker("m");
    inject(&format!("NVRM: GPU at PCI:0000:91:00: {UUID}")).unwrap();
    inject(&format!("gpulse e2e: an ordinary kernel line {m}")).unwrap();
    let injected_at = std::time::SystemTime::now();
    inject(&format!("NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {m}")).unwrap();
    inject(&format!(
        "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up {m}"
    ))
    .unwrap();

    let events = rt.block_on(sub).unwrap().unwrap();
    let xid = events
        .iter()
        .find_map(xid_of)
        .unwrap_or_else(|| panic!("no XID arrived: {events:?}"));
    assert_eq!(xid.code, 79, "{events:?}");
    assert_eq!(xid.pci, "0000:91:00.0");
    assert_eq!(
        xid.gpu_uuid, UUID,
        "preamble maps the PCI address to the GPU UUID"
    );
    assert_eq!(xid.mnemonic, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
    assert_eq!(xid.pid, None);
    assert!(xid.message.ends_with(&m));
    assert_eq!(
        v1::RecordSource::try_from(xid.source)
            .unwrap()
            .as_str_name(),
        want_source
    );
    let ev = events
        .iter()
        .find(|e| e.kind == EventKind::Xid as i32)
        .unwrap();
    assert_eq!(ev.severity, v1::Severity::Fatal as i32);
    let t = gpulse_proto::time::to_system_time(ev.time.as_ref().unwrap());
    let skew = t
        .duration_since(injected_at)
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(2),
        "event time {t:?} vs injection {injected_at:?}: boot-time conversion is off"
    );
    let sxid = events
        .iter()
        .find_map(|e| match &e.payload {
            Some(Payload::Sxid(s)) => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (sxid.code, sxid.switch_index, sxid.link),
        (20034, Some(1), Some(48))
    );

    // The ordinary line never became an event: give it time to (wrongly) arrive, then check.
    let rt2 = rt;
    let url = c.url();
    let n3 = node.clone();
    let later = rt2
        .block_on(collect_events(
            &url,
            EventFilter {
                nodes: vec![n3],
                ..Default::default()
            },
            Some(0),
            Duration::from_millis(1500),
            |_| false,
        ))
        .unwrap();
    assert!(
        later
            .iter()
            .all(|e| !format!("{e:?}").contains("an ordinary kernel line")),
        "a non-NVIDIA record leaked: {later:?}"
    );
    assert!(
        later
            .iter()
            .any(|e| matches!(&e.payload, Some(Payload::DriverLog(d)) if d.text.contains(UUID))),
        "preamble kept as driver log"
    );

    // And the CLI printed the XID as one JSON object with the documented fields.
    let mut line = String::new();
    BufReader::new(tail.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = tail.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let x = &v["xid"];
    assert_eq!(x["code"], 79);
    assert_eq!(x["pci"], "0000:91:00.0");
    assert!(x["pid"].is_null());
    assert!(x["process_name"].is_null());
    assert_eq!(x["mnemonic"], "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
    assert_eq!(x["severity"], "fatal");
    assert!(x["message"].as_str().unwrap().ends_with(&m));
}

#[test]
fn ebpf_xid_reaches_subscriber_decoded_and_other_records_do_not() {
    if !require_root("ebpf_xid_reaches_subscriber") {
        return;
    }
    xid_reaches_subscriber("ebpf", "RECORD_SOURCE_EBPF_PRINTK");
}

#[test]
fn kmsg_fallback_reaches_subscriber_decoded() {
    if !require_root("kmsg_fallback_reaches_subscriber") {
        return;
    }
    xid_reaches_subscriber("kmsg", "RECORD_SOURCE_KMSG");
}

#[test]
fn collector_kill9_and_restart_loses_no_xid_and_duplicates_none() {
    if !require_root("collector_kill9_and_restart") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (gp, hp) = (free_port(), free_port());
    let mut c = Collector::start(&data, gp, hp, &[]).unwrap();
    let node = marker("e2e-restart");
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(&c.url(), &node, "ebpf", &agent_log, &[]).unwrap();
    wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    const N: usize = 45;
    let m = marker("k");
    // Over 16 GPUs: 40 XIDs a second on one GPU would be a storm, coalesced by design.
    let line = |i: usize| {
        format!(
            "NVRM: Xid (PCI:0000:{:02x}:00): 13, pid={}, name=trainer, Graphics Exception {m} #{i}",
            0x10 + i % 16,
            1000 + i
        )
    };
    for i in 0..N {
        if i == 15 {
            // Mid-stream: the collector dies without warning...
            c.proc.kill9();
        }
        if i == 30 {
            // ...and comes back on the same data dir and ports while XIDs keep coming.
            c = Collector::start(&data, gp, hp, &[]).unwrap();
        }
        inject(&line(i)).unwrap();
        std::thread::sleep(Duration::from_millis(25));
    }

    let rt = runtime();
    let url = c.url();
    let f = EventFilter {
        nodes: vec![node.clone()],
        kinds: vec![EventKind::Xid as i32],
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    while Instant::now() < deadline {
        events = rt
            .block_on(collect_events(
                &url,
                f.clone(),
                Some(0),
                Duration::from_secs(2),
                |e| e.len() > N,
            ))
            .unwrap();
        if events.len() >= N {
            break;
        }
    }
    let mut seen = [0u32; N];
    for e in &events {
        let x = xid_of(e).unwrap();
        let i: usize = x.message.rsplit('#').next().unwrap().parse().unwrap();
        seen[i] += 1;
        assert_eq!(x.pid, Some(1000 + i as u32));
    }
    let missing: Vec<usize> = (0..N).filter(|i| seen[*i] == 0).collect();
    let dup: Vec<usize> = (0..N).filter(|i| seen[*i] > 1).collect();
    assert!(
        missing.is_empty(),
        "lost XIDs {missing:?}; agent log:\n{}",
        std::fs::read_to_string(&agent_log).unwrap_or_default()
    );
    assert!(dup.is_empty(), "duplicated XIDs {dup:?}");
    assert_eq!(events.len(), N);
    assert!(
        events.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "cursors ordered"
    );
    // The restarted collector restored the events stored before the kill (cursors carried over).
    let metrics = c.metrics().unwrap();
    assert!(
        value_of_metric(&metrics, "gpulse_agents_connected").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}
