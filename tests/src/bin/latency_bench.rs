//! Latency benchmark: /dev/kmsg write -> gRPC subscriber receipt through the whole gpulse spine
//! (printk:console -> eBPF ring buffer -> agent decode -> gRPC Ingest -> collector store/WAL ->
//! Subscribe), side by side with a plain blocking /dev/kmsg reader in the same process, on the
//! same records, in the same run. Needs root. Run it with `cargo xtask bench`.
//!
//! Usage: gpulse-latency-bench [--records N] [--interval-us U] [--source ebpf|kmsg] [--fsync always|never]
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gpulse_e2e::*;
use gpulse_proto::v1::{
    EventFilter, EventKind, SubscribeRequest, subscribe_response::Msg,
    telemetry_client::TelemetryClient,
};
use hdrhistogram::Histogram;

struct Opts {
    records: usize,
    interval: Duration,
    source: String,
    fsync: String,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        records: 2000,
        interval: Duration::from_micros(3000),
        source: "ebpf".into(),
        fsync: "always".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--records" => o.records = val()?.parse().context("--records")?,
            "--interval-us" => {
                o.interval = Duration::from_micros(val()?.parse().context("--interval-us")?)
            }
            "--source" => o.source = val()?,
            "--fsync" => o.fsync = val()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.records < 1 {
        bail!("--records must be >= 1");
    }
    Ok(o)
}

fn index_of(text: &str, m: &str) -> Option<usize> {
    let at = text.find(m)? + m.len();
    let rest = text[at..].strip_prefix('#')?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    if !is_root() {
        bail!(
            "the latency benchmark writes /dev/kmsg and loads eBPF: run it as root (sudo cargo xtask bench)"
        );
    }
    let dir = tempfile::tempdir()?;
    let c = Collector::start(
        &dir.path().join("data"),
        free_port(),
        free_port(),
        &["--fsync", &o.fsync],
    )?;
    let node = marker("bench");
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(&c.url(), &node, &o.source, &agent_log, &[])?;
    let live = wait_agent_live(&agent_log, Duration::from_secs(20))?;
    let m = marker("lat");
    let n = o.records;

    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let plain: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let via: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));

    // The baseline: a plain blocking /dev/kmsg reader thread.
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kmsg")?;
    // SAFETY: lseek on our own fd; SEEK_END skips the existing buffer.
    unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&kmsg), 0, libc::SEEK_END) };
    let (pm, pp) = (m.clone(), plain.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match kmsg.read(&mut buf) {
                Ok(k) => {
                    let now = Instant::now();
                    if let Some(i) = index_of(&String::from_utf8_lossy(&buf[..k]), &pm)
                        && let Ok(mut p) = pp.lock()
                        && i < p.len()
                    {
                        p[i].get_or_insert(now);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => return,
            }
        }
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (url, vm, vv, vnode) = (c.url(), m.clone(), via.clone(), node.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sub = rt.spawn(async move {
        let mut client = TelemetryClient::connect(url).await?;
        let f = EventFilter {
            nodes: vec![vnode],
            kinds: vec![EventKind::Xid as i32],
            ..Default::default()
        };
        let mut stream = client
            .subscribe(SubscribeRequest {
                filter: Some(f),
                after_cursor: None,
                resume_token: Default::default(),
            })
            .await?
            .into_inner();
        let _ = ready_tx.send(());
        let mut lagged = 0;
        while let Some(msg) = stream.message().await? {
            let now = Instant::now();
            match msg.msg {
                Some(Msg::Event(e)) => {
                    if let Some(x) = xid_of(&e)
                        && let Some(i) = index_of(&x.message, &vm)
                        && let Ok(mut v) = vv.lock()
                        && i < v.len()
                    {
                        v[i].get_or_insert(now);
                    }
                }
                Some(Msg::Lagged(l)) => lagged += l.missed,
                Some(Msg::Upstream(_)) | None => {}
            }
        }
        anyhow::Ok(lagged)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("subscriber did not connect")?;
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    for i in 0..n {
        let line = format!(
            "<3>NVRM: Xid (PCI:0000:3b:00): 13, pid={i}, name=bench, Graphics Exception {m}#{i}\n"
        );
        let mut f = OpenOptions::new().write(true).open("/dev/kmsg")?;
        let t0 = Instant::now();
        f.write_all(line.as_bytes())?;
        if let Ok(mut s) = sent.lock() {
            s[i] = Some(t0);
        }
        let next = started + o.interval * (i as u32 + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let done = via
            .lock()
            .map(|v| v.iter().all(Option::is_some))
            .unwrap_or(false)
            && plain
                .lock()
                .map(|v| v.iter().all(Option::is_some))
                .unwrap_or(false);
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sub.abort();

    let sent = sent
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let plain = plain
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let via = via.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut h_plain = Histogram::<u64>::new(3)?;
    let mut h_via = Histogram::<u64>::new(3)?;
    let mut deltas: Vec<i64> = Vec::with_capacity(n);
    let mut missing: HashMap<&str, usize> = HashMap::new();
    for i in 0..n {
        let Some(t0) = sent[i] else { continue };
        match plain[i] {
            Some(t) => h_plain.record(t.duration_since(t0).as_micros() as u64)?,
            None => {
                *missing.entry("plain").or_default() += 1;
                eprintln!("plain reader never saw record #{i}");
            }
        }
        match via[i] {
            Some(t) => h_via.record(t.duration_since(t0).as_micros() as u64)?,
            None => {
                *missing.entry("gpulse").or_default() += 1;
                eprintln!("gpulse never delivered record #{i}");
            }
        }
        if let (Some(a), Some(b)) = (plain[i], via[i]) {
            let d = if b >= a {
                b.duration_since(a).as_micros() as i64
            } else {
                -(a.duration_since(b).as_micros() as i64)
            };
            deltas.push(d);
        }
    }
    let row = |name: &str, h: &Histogram<u64>| {
        format!(
            "{name:<34} n={:<5} p50={:>7.3} ms  p90={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
            h.len(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        )
    };
    println!(
        "gpulse latency benchmark: {n} records, one every {:?}, source {}, collector --fsync {}",
        o.interval, o.source, o.fsync
    );
    println!(
        "agent: {}",
        live.split("why=").nth(1).unwrap_or(&live).trim()
    );
    println!("{}", row("plain blocking /dev/kmsg reader", &h_plain));
    println!("{}", row("gpulse (kmsg write -> subscriber)", &h_via));
    deltas.sort_unstable();
    let q = |p: f64| {
        deltas
            .get(((deltas.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "{:<34} n={:<5} p50={:>+7.3} ms  p90={:>+7.3} ms  p99={:>+7.3} ms  (negative: gpulse delivered first)",
        "gpulse minus plain, per record",
        deltas.len(),
        q(0.5),
        q(0.9),
        q(0.99)
    );
    println!(
        "missing: plain {} gpulse {}",
        missing.get("plain").unwrap_or(&0),
        missing.get("gpulse").unwrap_or(&0)
    );
    let p99_ok = h_via.value_at_quantile(0.99) <= 5000;
    let delta = h_via.value_at_quantile(0.99) as i64 - h_plain.value_at_quantile(0.99) as i64;
    println!(
        "targets: p99 <= 5 ms: {} ({:.3} ms); p99 within 1 ms of plain reader: {} ({:+.3} ms)",
        if p99_ok { "met" } else { "MISSED" },
        h_via.value_at_quantile(0.99) as f64 / 1000.0,
        if delta <= 1000 { "met" } else { "MISSED" },
        delta as f64 / 1000.0
    );
    if !missing.is_empty() {
        bail!("records went missing: {missing:?}");
    }
    Ok(())
}
