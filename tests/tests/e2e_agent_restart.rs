//! The agent loses no XID across its own restarts, through the real kernel (root): records
//! printed while it is down come from the kernel log's backlog (marked `backlog`), once; its
//! spool survives `kill -9` during a collector outage and is delivered when both are back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::{
    path::Path,
    time::{Duration, Instant},
};

use gpulse_e2e::*;
use gpulse_proto::v1::{self, EventFilter, EventKind};

fn xid_line(m: &str, i: usize) -> String {
    format!(
        "NVRM: Xid (PCI:0000:3b:00): 13, pid={}, name=trainer, Graphics Exception {m} #{i}",
        2000 + i
    )
}

/// XIDs of `node` carrying marker `m` that the collector holds, counted by their `#i` suffix
/// (`want` of them expected), and those events. Waits until each is there or 30 s passed.
fn collect(url: &str, node: &str, m: &str, want: usize) -> (Vec<u32>, Vec<v1::Event>) {
    let f = EventFilter {
        nodes: vec![node.to_string()],
        kinds: vec![EventKind::Xid as i32],
        ..Default::default()
    };
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours = |e: &v1::Event| xid_of(e).is_some_and(|x| x.message.contains(m));
    let count = |events: &[v1::Event]| {
        let mut seen = vec![0u32; want];
        for e in events.iter().filter(|e| ours(e)) {
            let i: Option<usize> = xid_of(e)
                .and_then(|x| x.message.rsplit('#').next()?.parse().ok())
                .filter(|i| *i < want);
            if let Some(i) = i {
                seen[i] += 1;
            }
        }
        seen
    };
    loop {
        let events: Vec<v1::Event> = rt
            .block_on(collect_events(
                url,
                f.clone(),
                Some(0),
                Duration::from_secs(2),
                |e| count(e).iter().all(|n| *n > 0),
            ))
            .unwrap()
            .into_iter()
            .filter(|e| ours(e))
            .collect();
        let seen = count(&events);
        if seen.iter().all(|n| *n > 0) || Instant::now() > deadline {
            // A moment more, so a duplicate arriving late is seen too.
            std::thread::sleep(Duration::from_millis(300));
            let events: Vec<v1::Event> = rt
                .block_on(collect_events(
                    url,
                    f.clone(),
                    Some(0),
                    Duration::from_secs(1),
                    |_| false,
                ))
                .unwrap()
                .into_iter()
                .filter(|e| ours(e))
                .collect();
            return (count(&events), events);
        }
    }
}

fn agent(url: &str, node: &str, state: &Path, log: &Path, backlog: &str) -> Proc {
    let s = state.display().to_string();
    let a = start_agent(
        url,
        node,
        "auto",
        log,
        &["--state-dir", &s, "--backlog", backlog, "--nvml", "off"],
    )
    .unwrap();
    wait_agent_live(log, Duration::from_secs(20)).unwrap();
    a
}

#[test]
fn xids_printed_while_the_agent_is_down_arrive_once_from_the_backlog() {
    if !require_root("xids_printed_while_the_agent_is_down") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let node = marker("e2e-backlog");
    let state = dir.path().join("agent-state");
    let m = marker("b");
    let log1 = dir.path().join("agent1.log");
    let mut a = agent(&c.url(), &node, &state, &log1, "boot");
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        inject(&xid_line(&m, i)).unwrap();
    }
    let (seen, _) = collect(&c.url(), &node, &m, 3);
    assert_eq!(seen, [1, 1, 1], "delivered live before the kill");
    a.kill9();
    // Printed while no agent runs: only the kernel log has these.
    for i in 3..6 {
        inject(&xid_line(&m, i)).unwrap();
    }
    let log2 = dir.path().join("agent2.log");
    let _a = agent(&c.url(), &node, &state, &log2, "boot");
    std::thread::sleep(Duration::from_millis(300));
    for i in 6..8 {
        inject(&xid_line(&m, i)).unwrap();
    }
    let (seen, ours) = collect(&c.url(), &node, &m, 8);
    let log = std::fs::read_to_string(&log2).unwrap_or_default();
    assert_eq!(seen, [1; 8], "each XID exactly once; agent log:\n{log}");
    assert_eq!(ours.len(), 8);
    for e in &ours {
        let i: usize = xid_of(e)
            .unwrap()
            .message
            .rsplit('#')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(e.backlog, (3..6).contains(&i), "backlog flag of #{i}");
    }
    // One agent id across the restart: the collector saw one sequence, no gap.
    let ids: std::collections::BTreeSet<&str> = ours.iter().map(|e| e.agent_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(log.contains("kernel log backlog read"), "{log}");
}

#[test]
fn an_agent_restart_during_a_collector_outage_delivers_its_spool_after_both_return() {
    if !require_root("an_agent_restart_during_a_collector_outage") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (gp, hp) = (free_port(), free_port());
    let mut c = Collector::start(&data, gp, hp, &[]).unwrap();
    let url = c.url();
    let node = marker("e2e-spool");
    let state = dir.path().join("agent-state");
    let m = marker("s");
    // No backlog: what arrives must come from the spool log.
    let mut a = agent(&url, &node, &state, &dir.path().join("agent1.log"), "none");
    std::thread::sleep(Duration::from_millis(300));
    inject(&xid_line(&m, 0)).unwrap();
    assert_eq!(collect(&url, &node, &m, 1).0, [1]);
    c.proc.kill9();
    for i in 1..6 {
        inject(&xid_line(&m, i)).unwrap();
    }
    // Let the agent spool them (and write its log), then kill it too.
    std::thread::sleep(Duration::from_millis(500));
    a.kill9();
    let log2 = dir.path().join("agent2.log");
    let _a = agent(&url, &node, &state, &log2, "none");
    c = Collector::start(&data, gp, hp, &[]).unwrap();
    let (seen, _) = collect(&c.url(), &node, &m, 6);
    assert_eq!(
        seen,
        [1; 6],
        "spooled XIDs lost or duplicated; agent log:\n{}",
        std::fs::read_to_string(&log2).unwrap_or_default()
    );
}
