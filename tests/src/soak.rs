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
            resume_token: Default::default(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), s.message()).await {
        match m.msg {
            Some(Msg::Event(e)) => out.push(e),
            Some(Msg::Lagged(l)) => anyhow::bail!("replay lagged: {l:?}"),
            Some(Msg::Upstream(_)) | None => {}
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
    let args = ["--events-bytes", "192MiB"];
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
                        resume_token: Default::default(),
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
                        Some(Msg::Upstream(_)) | None => {}
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
                    Some(Msg::Upstream(_)) | None => {}
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
        let status = st.map_or("still running (killed)".to_string(), |s| s.to_string());
        Ok((ok, format!("{status} after {} ms", took.as_millis())))
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
                    .map(|e| gpulse_proto::names::ShortName::short_name(
                        EventKind::try_from(e.kind).unwrap_or_default()
                    ))
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
            "--events-bytes",
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

/// A tmpfs mounted for one row, unmounted on drop.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?;
        anyhow::ensure!(st.success(), "mount tmpfs: {st}");
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system holding `path` to the last byte.
fn fill(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let mut n = 0;
    for chunk in [64 << 10, 4 << 10, 512, 1] {
        let buf = vec![0x5a_u8; chunk];
        while f.write_all(&buf).is_ok() {
            n += chunk as u64;
        }
    }
    let _ = f.sync_all();
    Ok(n)
}

/// A fatal XID 79 on 0000:3b:00.0 with `msg`, timed now.
pub fn xid_event(msg: &str) -> v1::Event {
    v1::Event {
        kind: EventKind::Xid as i32,
        severity: v1::Severity::Fatal as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::Xid(v1::Xid {
            code: 79,
            pci: "0000:3b:00.0".into(),
            message: msg.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Collects problems instead of panicking, so a row reports all of them.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn row(self, row: Row, measured: String) -> Row {
        if self.0.is_empty() {
            row.done(true, measured)
        } else {
            row.done(false, format!("{measured}; FAILED: {}", self.0.join("; ")))
        }
    }
}

/// The data dir fills up (a small tmpfs), then space returns (root).
pub fn data_dir_full() -> Row {
    let row = Row::new(
        "data dir fills up (a tmpfs), then space returns",
        "ingest continues",
        "acked lost 0; `/readyz` false meanwhile; recovers by itself",
    );
    if !crate::is_root() {
        return row;
    }
    match data_dir_full_inner() {
        Ok((checks, m)) => checks.row(row, m),
        Err(e) => row.error(e),
    }
}

fn data_dir_full_inner() -> anyhow::Result<(Checks, String)> {
    let mut c = Checks::default();
    let dir = tempfile::tempdir()?;
    // The data dir is the mount itself, so the collector's log (beside it) stays writable.
    let data = dir.path().join("full");
    let _mnt = Tmpfs::mount(&data, "8m")?;
    let args = ["--events-bytes", "1MiB", "--wal-segment-bytes", "256KiB"];
    let (grpc, http) = (free_port(), free_port());
    let mut col = Collector::start(&data, grpc, http, &args)?;
    let rt = runtime();
    let mut agent = MiniAgent::new(col.url(), "full-agent");
    rt.block_on(async {
        for i in 0..10 {
            agent.add(xid_event(&format!("before-{i}")));
            agent.attempt().await?;
        }
        anyhow::Ok(())
    })?;
    let filler = data.join("filler");
    let filled = fill(&filler)?;
    // While full: writes fail (a few small frames may still fit in the slack of the log's last
    // page), nothing that failed is acknowledged. The resend only grows, so once a write fails
    // it keeps failing until space returns.
    let mut refused = 0;
    let mut codes = Vec::new();
    rt.block_on(async {
        for i in 0..200 {
            agent.add(xid_event(&format!("while-full-{i}")));
            if let Err(st) = agent.attempt().await {
                codes.push(st.code());
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    });
    c.check(refused == 3, || "a full disk kept taking writes".into());
    c.check(codes.iter().all(|k| *k == tonic::Code::Unavailable), || {
        format!("refusals were {codes:?}, not UNAVAILABLE")
    });
    let (code, body) = crate::http_get(http, "/readyz")?;
    c.check(code == 503 && body.contains("cannot be written"), || {
        format!("/readyz answered {code} {body:?} while full")
    });
    let m = col.metrics()?;
    c.check(
        crate::value_of_metric(&m, "gpulse_store_writable") == Some(0.0),
        || "gpulse_store_writable is not 0".into(),
    );
    c.check(crate::http_get(http, "/healthz")?.0 == 200, || {
        "/healthz failed: alive, just not ready".into()
    });
    // Space returns: the resend goes through by itself and readiness comes back.
    std::fs::remove_file(&filler)?;
    let t = Instant::now();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.spool.is_empty() && Instant::now() < deadline {
            if agent.attempt().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for i in 0..10 {
            agent.add(xid_event(&format!("after-{i}")));
            let _ = agent.attempt().await;
        }
    });
    let recovered_in = t.elapsed();
    c.check(crate::http_get(http, "/readyz")?.0 == 200, || {
        "/readyz still failing after space returned".into()
    });
    let total = agent.acked.len();
    c.check(total as u64 == agent.next_seq - 1, || {
        format!(
            "{} of {} acknowledged in the end",
            total,
            agent.next_seq - 1
        )
    });
    // Every acknowledged event survives kill -9 and a restart, exactly once.
    col.proc.kill9();
    let c2 = Collector::start(&data, free_port(), free_port(), &args)?;
    let events = rt.block_on(replay_all(&c2.url(), &["node-full".to_string()]))?;
    let mut got: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::Xid(x)) => Some(x.message.clone()),
            _ => None,
        })
        .collect();
    got.sort();
    let mut want = agent.acked.clone();
    want.sort();
    let lost = want.iter().filter(|w| !got.contains(w)).count();
    let dup = got.len().saturating_sub(want.len() - lost);
    c.check(lost == 0 && dup == 0, || {
        format!("lost {lost}, duplicated {dup}")
    });
    let log = std::fs::read_to_string(&c2.log).unwrap_or_default();
    c.check(!log.contains("WAL damage"), || {
        "the full disk left a torn frame".into()
    });
    Ok((
        c,
        format!(
            "filled {:.1} MiB; {refused} writes refused (UNAVAILABLE), /readyz 503, /healthz 200; recovered {} ms after space returned; {total} acked, after kill -9: lost {lost}, duplicated {dup}",
            filled as f64 / 1048576.0,
            recovered_in.as_millis()
        ),
    ))
}

fn agent_xid_line(m: &str, i: usize) -> String {
    format!(
        "NVRM: Xid (PCI:0000:3b:00): 13, pid={}, name=trainer, Graphics Exception {m} #{i}",
        2000 + i
    )
}

/// XIDs of `node` carrying marker `m` that the collector holds, counted by their `#i` suffix
/// (`want` of them expected), and those events. Waits until each is there or 30 s passed.
pub fn collect_marked(
    url: &str,
    node: &str,
    m: &str,
    want: usize,
) -> anyhow::Result<(Vec<u32>, Vec<v1::Event>)> {
    let f = EventFilter {
        nodes: vec![node.to_string()],
        kinds: vec![EventKind::Xid as i32],
        ..Default::default()
    };
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours = |e: &v1::Event| crate::xid_of(e).is_some_and(|x| x.message.contains(m));
    let count = |events: &[v1::Event]| {
        let mut seen = vec![0u32; want];
        for e in events.iter().filter(|e| ours(e)) {
            let i: Option<usize> = crate::xid_of(e)
                .and_then(|x| x.message.rsplit('#').next()?.parse().ok())
                .filter(|i| *i < want);
            if let Some(i) = i {
                seen[i] += 1;
            }
        }
        seen
    };
    loop {
        let events = rt.block_on(crate::collect_events(
            url,
            f.clone(),
            Some(0),
            Duration::from_secs(2),
            |e| count(e).iter().all(|n| *n > 0),
        ))?;
        if count(&events).iter().all(|n| *n > 0) || Instant::now() > deadline {
            // A moment more, so a duplicate arriving late is seen too.
            std::thread::sleep(Duration::from_millis(300));
            let events: Vec<v1::Event> = rt
                .block_on(crate::collect_events(
                    url,
                    f.clone(),
                    Some(0),
                    Duration::from_secs(1),
                    |_| false,
                ))?
                .into_iter()
                .filter(|e| ours(e))
                .collect();
            return Ok((count(&events), events));
        }
    }
}

/// A real agent of `node` with its state in `state`, live (source attached) when returned.
/// Without `--nvml` in `extra` it samples no GPU; `env` goes to its environment.
#[allow(clippy::too_many_arguments)]
fn real_agent(
    url: &str,
    node: &str,
    state: &std::path::Path,
    log: &std::path::Path,
    backlog: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<crate::Proc> {
    let s = state.display().to_string();
    let mut args = vec![
        "--collector",
        url,
        "--node",
        node,
        "--xid-source",
        "auto",
        "--state-dir",
        &s,
        "--backlog",
        backlog,
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--nvml") {
        args.extend(["--nvml", "off"]);
    }
    let a = crate::Proc::spawn_env("gpulse-agent", &args, log, env)?;
    crate::wait_agent_live(log, Duration::from_secs(20))?;
    Ok(a)
}

/// Agent `kill -9` and restart, XIDs written to the kernel log meanwhile (root).
pub fn agent_kill_restart() -> Row {
    let row = Row::new(
        "agent `kill -9` + restart, XIDs written meanwhile",
        "XIDs before, during and after",
        "0 lost, 0 duplicated",
    );
    if !crate::is_root() {
        return row;
    }
    let _k = crate::kernel_lock();
    let run = || -> anyhow::Result<(Checks, String)> {
        let mut c = Checks::default();
        let dir = tempfile::tempdir()?;
        let col = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
        let node = crate::marker("soak-backlog");
        let state = dir.path().join("agent-state");
        let m = crate::marker("b");
        let mut a = real_agent(
            &col.url(),
            &node,
            &state,
            &dir.path().join("a1.log"),
            "boot",
            &[],
            &[],
        )?;
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..3 {
            crate::inject(&agent_xid_line(&m, i))?;
        }
        let (seen, _) = collect_marked(&col.url(), &node, &m, 3)?;
        c.check(seen == [1, 1, 1], || format!("before the kill: {seen:?}"));
        a.kill9();
        // Printed while no agent runs: only the kernel log has these.
        for i in 3..6 {
            crate::inject(&agent_xid_line(&m, i))?;
        }
        let log2 = dir.path().join("a2.log");
        let _a = real_agent(&col.url(), &node, &state, &log2, "boot", &[], &[])?;
        std::thread::sleep(Duration::from_millis(300));
        for i in 6..8 {
            crate::inject(&agent_xid_line(&m, i))?;
        }
        let (seen, ours) = collect_marked(&col.url(), &node, &m, 8)?;
        let lost = seen.iter().filter(|n| **n == 0).count();
        let dup: u32 = seen.iter().map(|n| n.saturating_sub(1)).sum();
        c.check(lost == 0 && dup == 0, || format!("per XID: {seen:?}"));
        let flags_ok = ours.iter().all(|e| {
            let i: usize = crate::xid_of(e)
                .and_then(|x| x.message.rsplit('#').next()?.parse().ok())
                .unwrap_or(usize::MAX);
            e.backlog == (3..6).contains(&i)
        });
        c.check(flags_ok, || "backlog flags wrong".into());
        let ids: std::collections::BTreeSet<&str> =
            ours.iter().map(|e| e.agent_id.as_str()).collect();
        c.check(ids.len() == 1, || format!("agent ids {ids:?}"));
        Ok((
            c,
            format!(
                "8 XIDs (3 while down, from the backlog, marked backlog): lost {lost}, duplicated {dup}; one agent id"
            ),
        ))
    };
    match run() {
        Ok((c, m)) => c.row(row, m),
        Err(e) => row.error(e),
    }
}

/// The collector down for `outage` while the agent keeps capturing (XIDs every 250 ms, GPU
/// samples from the fake NVML every 100 ms); optionally the agent is killed and restarted
/// during the outage. XIDs lost 0; the agent's peak RSS under the DaemonSet's 128 MiB limit.
pub fn collector_outage(outage: Duration, restart_agent: bool) -> Row {
    let row = if restart_agent {
        Row::new(
            "agent restart during a collector outage",
            "XIDs during the outage",
            "spooled events delivered after both return",
        )
    } else {
        Row::new(
            &format!("collector down {} s", outage.as_secs()),
            "agent keeps running (XIDs every 250 ms, samples every 100 ms)",
            "XIDs lost 0 within the spool bound; agent RSS under its limit",
        )
    };
    if !crate::is_root() {
        return row;
    }
    let _k = crate::kernel_lock();
    let run = || -> anyhow::Result<(Checks, String)> {
        let mut c = Checks::default();
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let (gp, hp) = (free_port(), free_port());
        let mut col = Collector::start(&data, gp, hp, &[])?;
        let url = col.url();
        let node = crate::marker("soak-outage");
        let state = dir.path().join("agent-state");
        let m = crate::marker("o");
        let (lib, scenarios) = crate::fake_nvml();
        let lib_s = lib.display().to_string();
        let scenario = scenarios.join("three-gpus.json").display().to_string();
        let nvml = ["--nvml", lib_s.as_str(), "--sample-interval-ms", "100"];
        let env = [("GPULSE_FAKE_NVML_SCENARIO", scenario.as_str())];
        let spawn = |log: &str| {
            real_agent(
                &url,
                &node,
                &state,
                &dir.path().join(log),
                "none",
                &nvml,
                &env,
            )
        };
        let mut a = spawn("a1.log")?;
        std::thread::sleep(Duration::from_millis(300));
        crate::inject(&agent_xid_line(&m, 0))?;
        let (seen, _) = collect_marked(&url, &node, &m, 1)?;
        c.check(seen == [1], || format!("before the outage: {seen:?}"));
        col.proc.kill9();
        let t = Instant::now();
        let mut n = 1;
        let mut peak_kib = 0;
        while t.elapsed() < outage {
            crate::inject(&agent_xid_line(&m, n))?;
            n += 1;
            peak_kib = peak_kib.max(crate::vm_hwm_kib(a.child.id()));
            if restart_agent && n == 4 {
                std::thread::sleep(Duration::from_millis(300));
                a.kill9();
                a = spawn("a2.log")?;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        peak_kib = peak_kib.max(crate::vm_hwm_kib(a.child.id()));
        col = Collector::start(&data, gp, hp, &[])?;
        let (seen, _) = collect_marked(&col.url(), &node, &m, n)?;
        let lost = seen.iter().filter(|k| **k == 0).count();
        let dup: u32 = seen.iter().map(|k| k.saturating_sub(1)).sum();
        c.check(lost == 0 && dup == 0, || {
            format!("lost {lost}, duplicated {dup}")
        });
        c.check(peak_kib < 128 * 1024, || {
            format!("agent peak RSS {} MiB", peak_kib / 1024)
        });
        drop(a);
        Ok((
            c,
            format!(
                "{n} XIDs over {:.0} s{}: lost {lost}, duplicated {dup}; agent peak RSS {:.1} MiB",
                outage.as_secs_f64(),
                if restart_agent {
                    ", agent killed and restarted midway"
                } else {
                    ""
                },
                peak_kib as f64 / 1024.0
            ),
        ))
    };
    match run() {
        Ok((c, m)) => c.row(row, m),
        Err(e) => row.error(e),
    }
}
