//! XID storm benchmark (`cargo xtask bench --storm`, root): how the agent copes when one GPU
//! prints the same XID as fast as the kernel lets it.
//!
//! 1. Through the real kernel: records written to /dev/kmsg (one open per record, the kernel's
//!    rate limit is per open file) as fast as this machine allows, captured by the agent's eBPF
//!    program, coalesced, stored by a collector. Reported: records/s, agent CPU per record,
//!    events stored, whether the collector's counter equals the records written, and how long an
//!    XID of another code on another GPU, written mid-storm, took to reach a subscriber.
//! 2. A longer burst through the agent's decoder directly (no kernel): records/s and CPU per
//!    record of decode + storm control, events out, exact count, and that an XID of another code
//!    in the middle comes out at once.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gpulse_agent::{
    pipeline::Pipeline,
    record::{Captured, RawRecord},
    stats::AgentStats,
};
use gpulse_e2e::*;
use gpulse_proto::v1::{
    self, EventFilter, EventKind, ListEventsRequest, RecordSource, TimeWindow,
    telemetry_client::TelemetryClient,
};

const STORM_LINE: &str = "NVRM: Xid (PCI:0000:3b:00): 95, pid=4242, name=trainer, Uncontained: FBHUB. RST: Yes, D-RST: No";

fn main() {
    if let Err(e) = run() {
        eprintln!("storm bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let records: u64 = std::env::args()
        .skip_while(|a| a != "--records")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    println!("## XID storm\n");
    println!(
        "| path | records | records/s | agent CPU per record | events stored | counter exact | other XID delivered in |"
    );
    println!("|---|---|---|---|---|---|---|");
    if is_root() {
        through_the_kernel(Duration::from_secs(seconds))?;
    } else {
        eprintln!("not root: the kernel path is skipped (it loads eBPF and writes /dev/kmsg)");
    }
    through_the_decoder(records)?;
    Ok(())
}

/// The collector's `gpulse_xid_events_total` for `xid` on `node`.
fn counter(c: &Collector, node: &str, xid: &str) -> f64 {
    let text = c.metrics().unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("gpulse_xid_events_total{")
                && l.contains(&format!("node=\"{node}\""))
                && l.contains(&format!("xid=\"{xid}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn through_the_kernel(span: Duration) -> anyhow::Result<()> {
    let _k = kernel_lock();
    let dir = tempfile::tempdir()?;
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
    let node = marker("storm");
    let log = dir.path().join("agent.log");
    let agent = start_agent(&c.url(), &node, "ebpf", &log, &["--nvml", "off"])?;
    wait_agent_live(&log, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(300));
    let pid = agent.child.id();
    let rt = runtime();

    // A subscriber waiting for the other XID, to time its delivery.
    let m = marker("other");
    let url = c.url();
    let seen_at = {
        let (url, node, m) = (url.clone(), node.clone(), m.clone());
        rt.spawn(async move {
            let f = EventFilter {
                nodes: vec![node],
                kinds: vec![EventKind::Xid as i32],
                xid_codes: vec![79],
                ..Default::default()
            };
            let evs = collect_events(&url, f, None, Duration::from_secs(120), |e| {
                e.iter()
                    .any(|e| xid_of(e).is_some_and(|x| x.message.ends_with(&m)))
            })
            .await;
            (evs.map(|e| e.len()), Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    let cpu0 = proc_cpu_ns(pid)?;
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut other_sent: Option<Instant> = None;
    while t0.elapsed() < span {
        inject(STORM_LINE)?;
        n += 1;
        if other_sent.is_none() && t0.elapsed() >= span / 2 {
            // Timed from before the write: the record can reach the subscriber before write()
            // returns (the kernel prints to its console inside the call).
            other_sent = Some(Instant::now());
            inject(&format!(
                "NVRM: Xid (PCI:0000:86:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {m}"
            ))?;
        }
    }
    let wrote = t0.elapsed();
    // The storm ends 2 s after its last record; its last summary follows.
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&c, &node, "95") < n as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = proc_cpu_ns(pid)? - cpu0;
    let counted = counter(&c, &node, "95");
    let (found, seen) = rt.block_on(seen_at)?;
    let delivered = match (found, other_sent) {
        (Ok(k), Some(sent)) if k > 0 && seen >= sent => {
            format!("{:.1} ms", (seen - sent).as_secs_f64() * 1e3)
        }
        (found, sent) => {
            eprintln!("other XID: subscriber {found:?}, sent {sent:?}, seen {seen:?}");
            "not delivered".to_string()
        }
    };
    let stored = rt.block_on(async {
        let mut client = TelemetryClient::connect(url.clone()).await?;
        let r = client
            .list_events(ListEventsRequest {
                window: Some(TimeWindow {
                    since: "1h".into(),
                    until: String::new(),
                }),
                filter: Some(EventFilter {
                    nodes: vec![node.clone()],
                    kinds: vec![EventKind::Xid as i32],
                    xid_codes: vec![95],
                    ..Default::default()
                }),
                limit: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::Ok(r.total_matched)
    })?;
    println!(
        "| kernel (/dev/kmsg -> eBPF -> agent -> collector) | {n} | {:.0} | {:.2} µs | {stored} | {} ({counted}) | {delivered} |",
        n as f64 / wrote.as_secs_f64(),
        cpu as f64 / n as f64 / 1e3,
        if counted == n as f64 { "yes" } else { "NO" },
    );
    if counted != n as f64 {
        bail!(
            "the collector counted {counted} XID 95 records, {n} were written; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok(())
}

fn through_the_decoder(records: u64) -> anyhow::Result<()> {
    let stats = Arc::new(AgentStats::default());
    let mut p = Pipeline::new(
        "bench".into(),
        "bench/a".into(),
        gpulse_xid::SeverityPolicy::default(),
        stats.clone(),
    );
    let t_base: i128 = 1_764_000_000_000_000_000;
    let rec = |t: i128, text: &str| {
        Captured::Record(RawRecord {
            unix_ns: t,
            source: RecordSource::EbpfPrintk,
            text: text.to_string(),
            truncated: false,
            dev_xid: None,
        })
    };
    let other = "NVRM: Xid (PCI:0000:86:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.";
    let mut events: Vec<v1::Event> = Vec::new();
    let cpu0 = proc_cpu_ns(std::process::id()).context("own CPU time")?;
    let t0 = Instant::now();
    // 1 µs apart in kernel time: a million records a second from one GPU.
    let mut other_out = false;
    for i in 0..records as i128 {
        let t = t_base + i * 1_000;
        if let Some(ev) = p.process(rec(t, STORM_LINE), t) {
            events.push(ev);
        }
        if i == records as i128 / 2 {
            other_out = p.process(rec(t, other), t).is_some();
        }
        if i % 250_000 == 0 {
            events.extend(p.tick(t));
        }
    }
    events.extend(p.tick(t_base + records as i128 * 1_000 + 10_000_000_000));
    let took = t0.elapsed();
    let cpu = proc_cpu_ns(std::process::id())? - cpu0;
    let counted: u64 = events
        .iter()
        .filter_map(xid_of)
        .filter(|x| x.code == 95)
        .map(v1::Xid::records)
        .sum();
    println!(
        "| decoder + storm control (in process, 1 thread) | {records} | {:.0} | {:.2} µs | {} | {} ({counted}) | {} |",
        records as f64 / took.as_secs_f64(),
        cpu as f64 / records as f64 / 1e3,
        events.len(),
        if counted == records { "yes" } else { "NO" },
        if other_out {
            "at once (same call)"
        } else {
            "HELD"
        },
    );
    if counted != records || !other_out {
        bail!("storm control lost count or held another XID");
    }
    Ok(())
}
