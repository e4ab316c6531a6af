//! The fault matrix (`cargo xtask soak`; a short form runs in the test command): each row puts
//! real binaries under one fault and load, measures, and says whether what must hold held.
//! Rows that need the kernel (eBPF, /dev/kmsg writes, tmpfs mounts) run as root only.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gpulse_proto::v1::{
    self, EventFilter, EventKind, SubscribeRequest, event::Payload, subscribe_response::Msg,
    telemetry_client::TelemetryClient,
};

use crate::{Collector, free_port, mini_agent::MiniAgent, runtime};

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub fault: String,
    pub load: String,
    pub must_hold: String,
    pub measured: String,
    /// None: skipped (needs root).
    pub ok: Option<bool>,
}

impl Row {
    fn new(fault: &str, load: &str, must_hold: &str) -> Self {
        Self {
            fault: fault.into(),
            load: load.into(),
            must_hold: must_hold.into(),
            measured: String::new(),
            ok: None,
        }
    }

    fn done(mut self, ok: bool, measured: String) -> Self {
        self.ok = Some(ok);
        self.measured = measured;
        self
    }

    fn error(self, e: impl std::fmt::Display) -> Self {
        self.done(false, format!("error: {e}"))
    }
}

/// The table, markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| fault | load | must hold | measured | result |\n|---|---|---|---|---|\n");
    for r in rows {
        let res = match r.ok {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "skipped (needs root)",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {res} |\n",
            r.fault, r.load, r.must_hold, r.measured
        ));
    }
    out
}

fn log_event(agent: &str, i: u64) -> v1::Event {
    v1::Event {
        kind: EventKind::DriverLog as i32,
        severity: v1::Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::DriverLog(v1::DriverLog {
            text: format!("NVRM: soak {agent} #{i}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Every event of `nodes` the collector holds, replayed from its first cursor (until `quiet`
/// passes without a new one).
async fn replay_all(url: &str, nodes: &[String]) -> anyhow::Result<Vec<v1::Event>> {
    let mut client = TelemetryClient::connect(url.to_string()).await?;
    let mut s = client
        .subscribe(SubscribeRequest {
            filter: Some(EventFilter {
                nodes: nodes.to_vec(),
                ..Default::default()
            }),
            after_cursor: Some(0),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), s.message()).await {
        match m.msg {
            Some(Msg::Event(e)) => out.push(e),
            Some(Msg::Lagged(l)) => anyhow::bail!("replay lagged: {l:?}"),
            None => {}
        }
    }
    Ok(out)
}

/// Per agent: the seqs stored (with how often), against what the agent saw acknowledged.
fn check_seqs(events: &[v1::Event], agents: &[(String, u64)]) -> (u64, u64) {
    let mut by_agent: BTreeMap<&str, BTreeMap<u64, u32>> = BTreeMap::new();
    for e in events {
        if matches!(e.payload, Some(Payload::DriverLog(_))) {
            *by_agent
                .entry(e.agent_id.as_str())
                .or_default()
                .entry(e.seq)
                .or_default() += 1;
        }
    }
    let (mut lost, mut dup) = (0, 0);
    for (id, acked) in agents {
        let seen = by_agent.get(id.as_str());
        for seq in 1..=*acked {
            match seen.and_then(|m| m.get(&seq)) {
                None => lost += 1,
                Some(n) if *n > 1 => dup += u64::from(*n - 1),
                _ => {}
            }
        }
    }
    (lost, dup)
}

/// `kill -9` of the collector every `every` for `total`, under `agents` pushing `rate` events/s
/// in all, with `subs` subscribers resuming by cursor. Acked events lost 0, duplicates 0.
pub fn kill9_loop(every: Duration, total: Duration, agents: usize, rate: u64, subs: usize) -> Row {
    let row = Row::new(
        &format!(
            "`kill -9` of the collector every {} s for {} s",
            every.as_secs(),
            total.as_secs()
        ),
        &format!("{agents} agents, ~{rate} events/s, {subs} subscribers"),
        "acked events lost 0, duplicates 0",
    );
    match kill9_loop_inner(every, total, agents, rate, subs) {
        Ok((ok, m)) => row.done(ok, m),
        Err(e) => row.error(e),
    }
}

fn kill9_loop_inner(
    every: Duration,
    total: Duration,
    agents: usize,
    rate: u64,
    subs: usize,
) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (gp, hp) = (free_port(), free_port());
    let args = ["--ring-bytes", "192MiB"];
    let collector = Arc::new(Mutex::new(Collector::start(&data, gp, hp, &args)?));
    let url = format!("http://127.0.0.1:{gp}");
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime();
    let tag = crate::marker("soak");
    let nodes: Vec<String> = (0..agents).map(|i| format!("{tag}-{i}")).collect();
    // Agents: each tick adds its share and delivers (resending after a failure).
    let per_tick = (rate / agents as u64 / 10).max(1);
    let mut agent_tasks = Vec::new();
    for node in &nodes {
        let (url, stop, node) = (url.clone(), stop.clone(), node.clone());
        agent_tasks.push(rt.spawn(async move {
            let mut a = MiniAgent::on_node(url, &format!("{node}/a"), &node);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0;
            let mut failures = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..per_tick {
                    a.add(log_event(&node, n));
                    n += 1;
                }
                if a.attempt().await.is_err() {
                    failures += 1;
                }
            }
            // Drain what is left once the collector is up for good.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !a.spool.is_empty() && Instant::now() < deadline {
                if a.attempt().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            (a.id.clone(), a.acked_through, a.spool.len(), failures)
        }));
    }
    // Subscribers: resume after the last cursor seen; a cursor must never go backwards.
    let seen = Arc::new(AtomicU64::new(0));
    let regressions = Arc::new(AtomicU64::new(0));
    for _ in 0..subs {
        let (url, stop, seen, regressions) =
            (url.clone(), stop.clone(), seen.clone(), regressions.clone());
        rt.spawn(async move {
            let mut after = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = TelemetryClient::connect(url.clone()).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(s) = c
                    .subscribe(SubscribeRequest {
                        filter: None,
                        after_cursor: Some(after),
                    })
                    .await
                else {
                    continue;
                };
                let mut s = s.into_inner();
                while let Ok(Some(m)) = s.message().await {
                    match m.msg {
                        Some(Msg::Event(e)) => {
                            if e.cursor <= after {
                                regressions.fetch_add(1, Ordering::Relaxed);
                            }
                            after = e.cursor;
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Msg::Lagged(l)) => after = after.max(l.resume_cursor),
                        None => {}
                    }
                }
            }
        });
    }
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < total {
        std::thread::sleep(every.min(total.saturating_sub(started.elapsed())));
        if started.elapsed() >= total {
            break;
        }
        let mut c = collector.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        c.proc.kill9();
        kills += 1;
        *c = Collector::start(&data, gp, hp, &args)?;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut unacked = 0;
    let mut failures = 0;
    for t in agent_tasks {
        let (id, through, left, f) = rt.block_on(t)?;
        acked.push((id, through));
        unacked += left;
        failures += f;
    }
    let events = rt.block_on(replay_all(&url, &nodes))?;
    let (lost, dup) = check_seqs(&events, &acked);
    let total_acked: u64 = acked.iter().map(|(_, t)| t).sum();
    let regress = regressions.load(Ordering::Relaxed);
    let ok = lost == 0 && dup == 0 && unacked == 0 && regress == 0 && total_acked > 0;
    Ok((
        ok,
        format!(
            "{kills} kills; {total_acked} events acked, lost {lost}, duplicated {dup}, left unacked {unacked}; {failures} failed attempts (retried); subscribers received {}, cursor regressions {regress}",
            seen.load(Ordering::Relaxed)
        ),
    ))
}

/// p99 of latencies (µs).
fn p99(v: &mut [u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// `subs` subscribers under ~`rate` events/s, first all reading, then with one `gpulse tail`
/// process stopped (SIGSTOP). Ingest loses nothing; the others' p99 stays within 2x.
pub fn stalled_subscriber(subs: usize, rate: u64, phase: Duration) -> Row {
    let row = Row::new(
        &format!("{subs} subscribers, one SIGSTOPped"),
        &format!("~{rate} events/s"),
        "ingest drops 0; the others' p99 <= 2x without the stalled one",
    );
    match stalled_inner(subs, rate, phase) {
        Ok((ok, m)) => row.done(ok, m),
        Err(e) => row.error(e),
    }
}

fn stalled_inner(subs: usize, rate: u64, phase: Duration) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
    let url = c.url();
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let lagged = Arc::new(AtomicU64::new(0));
    // The readers (one fewer in the second phase, when the stopped process takes the slot).
    let mut readers = Vec::new();
    for _ in 0..subs - 1 {
        let (url, stop, lat, lagged) = (url.clone(), stop.clone(), lat.clone(), lagged.clone());
        readers.push(rt.spawn(async move {
            let mut c = TelemetryClient::connect(url).await?;
            let mut s = c.subscribe(SubscribeRequest::default()).await?.into_inner();
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(Some(m))) =
                    tokio::time::timeout(Duration::from_millis(200), s.message()).await
                else {
                    continue;
                };
                match m.msg {
                    Some(Msg::Event(e)) => {
                        let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
                        if let Some(r) = e.received.as_ref() {
                            let us = (now - gpulse_proto::time::to_unix_nanos(r)) / 1000;
                            if let Ok(mut l) = lat.lock() {
                                l.push(us.max(0) as u64);
                            }
                        }
                    }
                    Some(Msg::Lagged(_)) => {
                        lagged.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            anyhow::Ok(())
        }));
    }
    // A 64th subscriber in phase one, in-process and reading.
    let extra_stop = Arc::new(AtomicBool::new(false));
    {
        let (url, stop) = (url.clone(), extra_stop.clone());
        rt.spawn(async move {
            let mut c = TelemetryClient::connect(url).await?;
            let mut s = c.subscribe(SubscribeRequest::default()).await?.into_inner();
            while !stop.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(200), s.message()).await;
            }
            anyhow::Ok(())
        });
    }
    let push_failures = Arc::new(AtomicU64::new(0));
    let pusher = {
        let (url, stop, failures) = (url.clone(), stop.clone(), push_failures.clone());
        rt.spawn(async move {
            let mut a = MiniAgent::on_node(url, "stall/a", "stall-node");
            let per_tick = (rate / 20).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..per_tick {
                    a.add(log_event("stall", n));
                    n += 1;
                }
                if a.attempt().await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            while !a.spool.is_empty() {
                if a.attempt().await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            (a.acked_through, a.spool.len())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let take = |lat: &Arc<Mutex<Vec<u64>>>| {
        lat.lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    };
    take(&lat);
    std::thread::sleep(phase);
    let mut base = take(&lat);
    // Phase two: the 64th is a real `gpulse tail` process, stopped.
    extra_stop.store(true, Ordering::Relaxed);
    let mut tail = std::process::Command::new(crate::bin("gpulse"))
        .args(["tail", "--collector", &url, "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tail.id() as i32, libc::SIGSTOP) };
    take(&lat);
    std::thread::sleep(phase);
    let mut stalled = take(&lat);
    stop.store(true, Ordering::Relaxed);
    let (acked, left) = rt.block_on(pusher)?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tail.id() as i32, libc::SIGKILL) };
    let _ = tail.wait();
    let (b, s) = (p99(&mut base), p99(&mut stalled));
    let failures = push_failures.load(Ordering::Relaxed);
    let lag = lagged.load(Ordering::Relaxed);
    // 1 ms floor: below it the comparison is noise on a loaded 2-core machine.
    let ok = failures == 0 && left == 0 && lag == 0 && s <= 2 * b.max(1000) && acked > 0;
    Ok((
        ok,
        format!(
            "{acked} events acked, push failures {failures}; readers lagged {lag}; p99 {:.2} ms with all reading, {:.2} ms with one stopped ({} / {} samples)",
            b as f64 / 1000.0,
            s as f64 / 1000.0,
            base.len(),
            stalled.len()
        ),
    ))
}

/// SIGTERM with `streams` open streams: exit within 5 s.
pub fn sigterm_streams(streams: usize) -> Row {
    let row = Row::new(
        &format!("SIGTERM with {streams} open streams"),
        "",
        "exit <= 5 s",
    );
    let run = || -> anyhow::Result<(bool, String)> {
        let dir = tempfile::tempdir()?;
        let mut c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
        let url = c.url();
        let rt = runtime();
        let open = rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(url)?
                .connect()
                .await?;
            let mut v = Vec::new();
            for _ in 0..streams {
                v.push(
                    TelemetryClient::new(ch.clone())
                        .subscribe(SubscribeRequest::default())
                        .await?
                        .into_inner(),
                );
            }
            anyhow::Ok(v)
        })?;
        let t = Instant::now();
        let st = c.proc.term();
        let took = t.elapsed();
        drop(open);
        let ok = st.is_some_and(|s| s.success()) && took < Duration::from_secs(5);
        Ok((ok, format!("exit {st:?} after {} ms", took.as_millis())))
    };
    match run() {
        Ok((ok, m)) => row.done(ok, m),
        Err(e) => row.error(e),
    }
}

/// An event with a payload the collector does not know, between two others, pushed raw.
pub fn unknown_payload() -> Row {
    let row = Row::new(
        "event with an unknown payload in a batch",
        "",
        "stored as `unknown`; the events after it delivered",
    );
    let run = || -> anyhow::Result<(bool, String)> {
        use prost::Message as _;
        let dir = tempfile::tempdir()?;
        let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
        let rt = runtime();
        let node = crate::marker("unknown");
        let x = |m: &str| {
            let mut e = log_event(m, 0);
            e.node.clone_from(&node);
            e.encode_to_vec()
        };
        let mut newer = v1::Event {
            kind: 9,
            severity: v1::Severity::Warning as i32,
            time: Some(gpulse_proto::time::now()),
            ..Default::default()
        }
        .encode_to_vec();
        newer.extend_from_slice(&[0x9a, 0x06, 3, 0x0a, 1, b'x']);
        let url = c.url();
        let ack = rt.block_on(crate::push_raw(
            &url,
            &node,
            vec![x("before"), newer, x("after")],
        ))?;
        let events = rt.block_on(replay_all(&url, std::slice::from_ref(&node)))?;
        let kinds: Vec<(i32, Vec<u32>)> = events
            .iter()
            .map(|e| (e.kind, e.unknown_fields.clone()))
            .collect();
        let ok = ack == 3
            && kinds
                == [
                    (EventKind::DriverLog as i32, vec![]),
                    (EventKind::Unknown as i32, vec![99]),
                    (EventKind::DriverLog as i32, vec![]),
                ];
        Ok((
            ok,
            format!(
                "acked through {ack}; stored kinds {:?}",
                events
                    .iter()
                    .map(|e| EventKind::try_from(e.kind).map_or("?", |k| k.short_name()))
                    .collect::<Vec<_>>()
            ),
        ))
    };
    match run() {
        Ok((ok, m)) => row.done(ok, m),
        Err(e) => row.error(e),
    }
}

/// Restart after `kill -9` with a full store of `ring_mib` and a log of up to `wal_mib`: peak
/// RSS within the budgets + 64 MiB; seconds to ready.
pub fn restart_memory(ring_mib: u64, wal_mib: u64) -> Row {
    let row = Row::new(
        &format!("restart with a full {ring_mib} MiB ring and {wal_mib} MiB of WAL"),
        "",
        "peak RSS <= budgets + 64 MiB; seconds to ready",
    );
    let run = || -> anyhow::Result<(bool, String)> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let (ring, wal) = (format!("{ring_mib}MiB"), format!("{wal_mib}MiB"));
        let args = [
            "--ring-bytes",
            ring.as_str(),
            "--wal-max-bytes",
            wal.as_str(),
            "--samples-raw-bytes",
            "1MiB",
            "--samples-1m-bytes",
            "1MiB",
            "--samples-1h-bytes",
            "1MiB",
            "--fsync",
            "never",
        ];
        let budgets = ring_mib + 3;
        let mut c = Collector::start(&data, free_port(), free_port(), &args)?;
        let rt = runtime();
        // ~350-byte events: enough that the store is full and the log holds about `wal_mib`
        // (the log is bounded by --wal-max-bytes: an events snapshot lets old segments go).
        let n_batches = ((wal_mib << 20) / 350 / 1000).max(1);
        let batches = (0..n_batches).map(|b| {
            (0..1000)
                .map(|i| {
                    let mut e = log_event("restart", b * 1000 + i);
                    if let Some(Payload::DriverLog(d)) = &mut e.payload {
                        d.text.push_str(&"z".repeat(280));
                    }
                    e
                })
                .collect()
        });
        rt.block_on(crate::ingest_batches(&c.url(), "restart-node", batches))?;
        let wal: u64 = std::fs::read_dir(&data)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        c.proc.kill9();
        let t = Instant::now();
        let c2 = Collector::start(&data, free_port(), free_port(), &args)?;
        let ready = t.elapsed();
        let hwm = crate::vm_hwm_kib(c2.proc.child.id());
        let ok = hwm <= (budgets + 64) * 1024;
        Ok((
            ok,
            format!(
                "log {:.0} MiB; peak RSS {:.0} MiB (budgets {budgets} MiB); ready in {:.1} s ({:.1} s per GB of log)",
                wal as f64 / 1048576.0,
                hwm as f64 / 1024.0,
                ready.as_secs_f64(),
                ready.as_secs_f64() / (wal as f64 / 1e9).max(1e-9)
            ),
        ))
    };
    match run() {
        Ok((ok, m)) => row.done(ok, m),
        Err(e) => row.error(e),
    }
}
