//! GPU process events through the real kernel: a process that opens a path under the GPU device
//! prefix (a test prefix here: there is no GPU) is reported with its device, then its exec and
//! its exit; a failed open under the prefix and opens elsewhere are not. Root only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    process::Command,
    time::{Duration, SystemTime},
};

use gpulse_e2e::*;
use gpulse_proto::v1::{EventFilter, EventKind, ProcessEventType, event::Payload};

#[test]
fn gpu_device_open_exec_and_exit_reach_a_subscriber() {
    if !require_root("gpu_device_open_exec_and_exit") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let devdir = dir.path().join("dev");
    std::fs::create_dir_all(&devdir).unwrap();
    std::fs::write(devdir.join("nvidia0"), b"").unwrap();
    std::fs::write(devdir.join("other"), b"").unwrap();
    let prefix = devdir.join("nvidia").display().to_string();

    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let node = marker("e2e-proc");
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(
        &c.url(),
        &node,
        "ebpf",
        &agent_log,
        &["--gpu-device-prefix", &prefix],
    )
    .unwrap();
    let live = wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
    assert!(live.contains("GPU process events on"), "{live}");

    let started = SystemTime::now();
    // Opens the device node (fd 3), fails to open a missing one, opens a non-GPU file, then
    // execs sleep, which exits.
    let script = format!(
        "exec 3<{d}/nvidia0; cat {d}/nvidia7 2>/dev/null; cat {d}/other; exec sleep 0.3",
        d = devdir.display()
    );
    let mut child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let tgid = child.id();
    child.wait().unwrap();

    let rt = runtime();
    let f = EventFilter {
        nodes: vec![node.clone()],
        kinds: vec![EventKind::GpuProcess as i32],
        ..Default::default()
    };
    let events = rt
        .block_on(collect_events(&c.url(), f, Some(0), Duration::from_secs(15), |evs| {
            evs.iter().any(|e| matches!(&e.payload, Some(Payload::GpuProcess(p)) if p.tgid == tgid && p.r#type == ProcessEventType::Exit as i32))
        }))
        .unwrap();
    let mine: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::GpuProcess(p)) if p.tgid == tgid => Some(p.clone()),
            _ => None,
        })
        .collect();
    let types: Vec<i32> = mine.iter().map(|p| p.r#type).collect();
    assert_eq!(
        types,
        vec![
            ProcessEventType::Open as i32,
            ProcessEventType::Exec as i32,
            ProcessEventType::Exit as i32
        ],
        "{mine:?}"
    );
    let open = &mine[0];
    assert_eq!(open.device, format!("{prefix}0"));
    assert_eq!(open.comm, "sh");
    assert_eq!(
        open.ppid,
        std::process::id(),
        "parent read from /proc while the process lived"
    );
    assert!(open.cgroup_id > 0);
    let start = gpulse_proto::time::to_system_time(open.start_time.as_ref().unwrap());
    assert!(
        start
            .duration_since(started)
            .is_ok_and(|d| d < Duration::from_secs(5))
    );
    assert!(
        mine[1].exe.ends_with("/sleep"),
        "exec reports the new executable: {}",
        mine[1].exe
    );
    let exit = &mine[2];
    assert!(!exit.inferred, "the exit was seen directly");
    assert_eq!(
        exit.devices,
        vec![format!("{prefix}0")],
        "the failed open of nvidia7 is not a device"
    );
    let end = gpulse_proto::time::to_system_time(exit.end_time.as_ref().unwrap());
    assert!(
        end.duration_since(start).unwrap() >= Duration::from_millis(250),
        "sleep ran 0.3 s between open and exit"
    );
    // Nothing else on this node (the cat processes never opened a GPU device node).
    assert!(
        events
            .iter()
            .all(|e| matches!(&e.payload, Some(Payload::GpuProcess(p)) if p.tgid == tgid)),
        "{events:?}"
    );
}
