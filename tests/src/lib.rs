//! Harness for gpulse end-to-end tests: real binaries, real kernel, records injected through
//! /dev/kmsg.
//!
//! Binaries are taken from `$GPULSE_BIN_DIR` (set by `cargo xtask test`) or `target/debug`.
//! Tests that need root (eBPF, /dev/kmsg writes) call [`require_root`] and skip with a message
//! otherwise; CI runs as root, so they run there.
pub mod loadgen;
pub mod mini_agent;
/// Test credentials (their own crate, so the collector's tests use them without building the agent).
pub use gpulse_test_pki as pki;
pub mod soak;

use std::{
    fs::OpenOptions,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gpulse_proto::v1::{
    self, EventFilter, SubscribeRequest, SubscribeResponse, event::Payload,
    subscribe_response::Msg, telemetry_client::TelemetryClient,
};

pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPULSE_BIN_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

pub fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

/// True when the test may run; prints why not otherwise.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (eBPF and /dev/kmsg writes); CI runs it as root");
    false
}

/// Tests that write to the kernel log run one at a time: the log and the agents' view of it are
/// machine-wide.
pub fn kernel_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes one kernel log record through /dev/kmsg. Each write opens the device afresh: the
/// kernel rate-limits each open file to 10 lines per 5 s and silently drops the rest.
pub fn inject(line: &str) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .context("opening /dev/kmsg")?;
    f.write_all(format!("<3>{line}\n").as_bytes())
        .context("writing /dev/kmsg")?;
    Ok(())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_env(name, args, log, &[])
    }

    /// As [`Proc::spawn`], with extra environment variables for the child.
    pub fn spawn_env(
        name: &str,
        args: &[&str],
        log: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let err = std::fs::File::create(log)?;
        // Every agent of a test gets a state directory of its own beside its log, and reads no
        // kernel log backlog (earlier tests' records), unless the test says otherwise.
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if name == "gpulse-agent" {
            if !args.iter().any(|a| a == "--state-dir") {
                args.push("--state-dir".into());
                args.push(log.with_extension("state").display().to_string());
            }
            if !args.iter().any(|a| a == "--backlog") {
                args.extend(["--backlog".into(), "none".into()]);
            }
        }
        let child = Command::new(bin(name))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!(
                    "spawning {} (build it first: cargo build --bins)",
                    bin(name).display()
                )
            })?;
        Ok(Self {
            child,
            name: name.into(),
        })
    }

    /// A program outside this workspace (a system package's), its stderr to `log`.
    pub fn spawn_path(path: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let err = std::fs::File::create(log)?;
        let child = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {}", path.display()))?;
        Ok(Self {
            child,
            name: path.display().to_string(),
        })
    }

    pub fn kill9(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn term(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A collector on loopback with its own data dir.
pub struct Collector {
    pub proc: Proc,
    pub grpc_port: u16,
    pub http_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Collector {
    pub fn start(
        data_dir: &Path,
        grpc_port: u16,
        http_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let grpc = format!("127.0.0.1:{grpc_port}");
        let http = format!("127.0.0.1:{http_port}");
        let dd = data_dir.display().to_string();
        let log = data_dir.with_extension(format!("collector-{grpc_port}.log"));
        let mut args = vec![
            "--grpc-listen",
            &grpc,
            "--http-listen",
            &http,
            "--data-dir",
            &dd,
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn("gpulse-collector", &args, &log)?;
        let c = Self {
            proc,
            grpc_port,
            http_port,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        c.wait_ready(Duration::from_secs(20))?;
        Ok(c)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if http_get(self.http_port, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "collector not ready within {within:?}; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.http_port, "/metrics")?.1)
    }
}

/// A gateway (`gpulse-collector gateway`) on loopback over `upstreams` (name, URL).
pub struct Gateway {
    pub proc: Proc,
    pub grpc_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, upstreams: &[(&str, String)], extra: &[&str]) -> anyhow::Result<Self> {
        let (grpc_port, http_port) = (free_port(), free_port());
        let grpc = format!("127.0.0.1:{grpc_port}");
        let http = format!("127.0.0.1:{http_port}");
        let mut args: Vec<String> = vec![
            "gateway".into(),
            "--grpc-listen".into(),
            grpc,
            "--http-listen".into(),
            http,
        ];
        for (name, url) in upstreams {
            args.push("--upstream".into());
            args.push(format!("{name}={url}"));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = dir.join(format!("gateway-{grpc_port}.log"));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn("gpulse-collector", &argv, &log)?;
        let g = Self {
            proc,
            grpc_port,
            http_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(http_port, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(g);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "gateway not ready within 20s; log:\n{}",
            std::fs::read_to_string(&g.log).unwrap_or_default()
        )
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }
}

/// Sends SIGSTOP (true) or SIGCONT (false) to a child: a frozen process keeps its sockets open
/// and answers nothing.
pub fn freeze(p: &Proc, stop: bool) {
    let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.child.id() as i32, sig) };
}

/// Minimal HTTP/1.0 GET on loopback (no client dependency needed for two endpoints).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: a request line sent in pieces must not depend on the server reading it whole.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let code = body
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let content = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, content))
}

pub fn value_of_metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|v| v.trim().parse().ok())
    })
}

/// An agent streaming to `collector`.
pub fn start_agent(
    collector: &str,
    node: &str,
    source: &str,
    log: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut args = vec![
        "--collector",
        collector,
        "--node",
        node,
        "--xid-source",
        source,
    ];
    args.extend_from_slice(extra);
    Proc::spawn("gpulse-agent", &args, log)
}

/// The fake libnvidia-ml.so built from tests/fake-nvml, and a scenario file of it.
pub fn fake_nvml() -> (PathBuf, PathBuf) {
    (
        bin("libgpulse_fake_nvml.so"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-nvml/scenarios"),
    )
}

/// An agent on the fake libnvidia-ml.so playing `scenario` (a file in tests/fake-nvml/scenarios),
/// sampling every `interval_ms`; returned once its XID source is live.
pub fn start_nvml_agent(
    collector: &str,
    node: &str,
    scenario: &str,
    interval_ms: u32,
    log: &Path,
) -> anyhow::Result<Proc> {
    let (lib, scenarios) = fake_nvml();
    if !lib.exists() {
        bail!("{} missing (cargo xtask test builds it)", lib.display());
    }
    let scenario = scenarios.join(scenario).display().to_string();
    let lib = lib.display().to_string();
    let interval = interval_ms.to_string();
    let agent = Proc::spawn_env(
        "gpulse-agent",
        &[
            "--collector",
            collector,
            "--node",
            node,
            "--nvml",
            &lib,
            "--sample-interval-ms",
            &interval,
        ],
        log,
        &[("GPULSE_FAKE_NVML_SCENARIO", scenario.as_str())],
    )?;
    wait_agent_live(log, Duration::from_secs(20))?;
    Ok(agent)
}

/// Waits until the agent log says a source is live (so injected records are not missed).
pub fn wait_agent_live(log: &Path, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("XID source live")) {
            return Ok(line.to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "agent did not report a live source within {within:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// A tokio runtime for tests that drive gRPC clients from synchronous test code.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start a tokio runtime: {e}"),
    }
}

/// Subscribes and collects events until `done` says so or `within` passes.
pub async fn collect_events(
    url: &str,
    filter: EventFilter,
    after: Option<u64>,
    within: Duration,
    mut done: impl FnMut(&[v1::Event]) -> bool,
) -> anyhow::Result<Vec<v1::Event>> {
    let mut client = TelemetryClient::connect(url.to_string()).await?;
    let mut stream = client
        .subscribe(SubscribeRequest {
            filter: Some(filter),
            after_cursor: after,
            resume_token: Default::default(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !done(&out) {
        let msg: Option<SubscribeResponse> =
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(m) => m?,
                Err(_) => break,
            };
        match msg.and_then(|m| m.msg) {
            Some(Msg::Event(e)) => out.push(e),
            Some(Msg::Lagged(l)) => bail!("subscriber lagged: {l:?}"),
            // A gateway's note that an upstream left or came back.
            Some(Msg::Upstream(_)) => {}
            None => break,
        }
    }
    Ok(out)
}

/// Events a collector stored from agents: its total less its own verdict events (gpu_health).
pub fn agent_events(st: &v1::StatusResponse) -> u64 {
    st.events_stored - verdict_events(st)
}

/// The collector's own verdict events (gpu_health) among those it stores.
pub fn verdict_events(st: &v1::StatusResponse) -> u64 {
    st.kinds
        .iter()
        .find(|k| k.kind == v1::EventKind::GpuHealth as i32)
        .map_or(0, |k| k.events)
}

/// The XID payload of an event, if it is one.
pub fn xid_of(e: &v1::Event) -> Option<&v1::Xid> {
    match &e.payload {
        Some(Payload::Xid(x)) => Some(x),
        _ => None,
    }
}

/// A marker unique to this run, so concurrent or earlier kernel log lines never match.
pub fn marker(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// Runs a command; its output becomes the error when it fails.
fn run_quiet(c: &mut Command) -> anyhow::Result<()> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `target/<kind>/<name>` with `packages` installed by `install`, done once per package list
/// (a stamp remembers it) while `ready` holds; concurrent callers wait on a lock file.
fn installed_once(
    kind: &str,
    name: &str,
    packages: &[&str],
    ready: impl Fn(&Path) -> bool,
    install: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let root = bin_dir()
        .parent()
        .map(|p| p.join(kind))
        .unwrap_or_else(|| PathBuf::from("target").join(kind));
    std::fs::create_dir_all(&root)?;
    let dir = root.join(name);
    let stamp = dir.join(".installed");
    let want = packages.join("\n");
    let lock = std::fs::File::create(root.join(format!("{name}.lock")))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && ready(&dir) {
        return Ok(dir);
    }
    install(&dir)?;
    std::fs::write(&stamp, want)?;
    Ok(dir)
}

/// npm `packages` installed once into `target/npm/<name>` (needs the npm registry): returns that
/// prefix (executables are in `node_modules/.bin`).
pub fn npm_packages(name: &str, packages: &[&str]) -> anyhow::Result<PathBuf> {
    installed_once(
        "npm",
        name,
        packages,
        |_| true,
        |dir| {
            std::fs::create_dir_all(dir)?;
            run_quiet(
                Command::new("npm")
                    .args([
                        "install",
                        "--no-audit",
                        "--no-fund",
                        "--loglevel",
                        "error",
                        "--prefix",
                    ])
                    .arg(dir)
                    .args(packages),
            )
        },
    )
}

/// A Python virtual environment under `target/py/<name>` with `packages` installed (pinned
/// specs), created on first use (needs PyPI): returns its python.
pub fn python_venv(name: &str, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let python = |dir: &Path| dir.join("bin/python");
    let dir = installed_once(
        "py",
        name,
        packages,
        |d| python(d).exists(),
        |dir| {
            run_quiet(
                Command::new("python3")
                    .args(["-m", "venv", "--clear"])
                    .arg(dir),
            )?;
            run_quiet(
                Command::new(python(dir))
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .args(packages),
            )
        },
    )?;
    Ok(python(&dir))
}

/// Sends `batches` for `node` over one Ingest stream (as an agent would), waiting for each ack.
/// Seqs are assigned here. For tests and benchmarks that feed a collector without the kernel.
pub async fn ingest_batches(
    url: &str,
    node: &str,
    batches: impl IntoIterator<Item = Vec<v1::Event>>,
) -> anyhow::Result<u64> {
    let mut client = v1::ingest_client::IngestClient::connect(url.to_string()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let batch = |first_seq, events| v1::Batch {
        agent_id: format!("{node}/ingest"),
        node: node.to_string(),
        boot_id: "b".into(),
        first_seq,
        events,
        delivered_through: 0,
    };
    tx.send(batch(0, vec![])).await?;
    let mut acks = client
        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    acks.message().await?.context("no hello ack")?;
    let mut seq = 1;
    for events in batches {
        let n = events.len() as u64;
        tx.send(batch(seq, events)).await?;
        seq += n;
        acks.message()
            .await?
            .context("stream closed before the ack")?;
    }
    Ok(seq - 1)
}

/// Peak RSS (VmHWM, KiB) of a process.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Pushes events as raw bytes (as a newer agent would: fields this collector may not know
/// survive) for agent `<node>/raw` with seqs from 1; returns the acknowledged seq.
pub async fn push_raw(url: &str, node: &str, events: Vec<Vec<u8>>) -> anyhow::Result<u64> {
    use gpulse_proto::{raw::RawBatch, v1::Ack};
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let batch = |first_seq, events: Vec<Vec<u8>>| RawBatch {
        agent_id: format!("{node}/raw"),
        node: node.to_string(),
        boot_id: "b".into(),
        first_seq,
        events: events.into_iter().map(Into::into).collect(),
        delivered_through: 0,
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/gpulse.v1.Ingest/Push");
    let codec = tonic_prost::ProstCodec::<RawBatch, Ack>::default();
    let mut acks = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![batch(0, vec![]), batch(1, events)])),
            path,
            codec,
        )
        .await?
        .into_inner();
    acks.message().await?.context("no hello ack")?;
    Ok(acks.message().await?.context("no ack")?.through_seq)
}

/// Waits until a collector's log says it serves (its readiness endpoint may be HTTPS).
/// A collector on loopback with TLS from `pki` and `extra` flags (a token file, limits), started
/// in `dir`; waits until it serves (readiness is over HTTPS, so its log says when). Returns it,
/// its gRPC port and its log.
pub fn start_tls_collector(
    dir: &Path,
    pki: &pki::Pki,
    extra: &[&str],
) -> anyhow::Result<(Proc, u16, PathBuf)> {
    let (grpc, http) = (free_port(), free_port());
    let log = dir.join("collector.log");
    let data = dir.join("data").display().to_string();
    let (g, h) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{http}"));
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let mut args = vec![
        "--grpc-listen",
        &g,
        "--http-listen",
        &h,
        "--data-dir",
        &data,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn("gpulse-collector", &args, &log)?;
    wait_serving(&log, Duration::from_secs(20))?;
    Ok((proc, grpc, log))
}

pub fn wait_serving(log: &Path, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("gpulse-collector serving")
    {
        if Instant::now() > deadline {
            bail!(
                "collector did not start within {within:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// CPU time (user + system) a process has used, in nanoseconds.
pub fn proc_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: trivial libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(ticks * 1_000_000_000 / hz.max(1))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} missing"))
}

/// Sends a GPU sample and an XID 79 for `node` over gRPC (what the MCP client checks for, without
/// the kernel).
pub fn feed_over_grpc(url: &str, node: &str) -> anyhow::Result<()> {
    let now = gpulse_proto::time::now();
    let sample = gpulse_proto::v1::Event {
        kind: gpulse_proto::v1::EventKind::GpuSample as i32,
        severity: gpulse_proto::v1::Severity::Info as i32,
        time: Some(now),
        payload: Some(gpulse_proto::v1::event::Payload::GpuSample(
            gpulse_proto::v1::GpuSample {
                index: 0,
                uuid: "GPU-11111111-2222-3333-4444-555555555555".into(),
                pci: "0000:3b:00.0".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                gpu_util_pct: Some(97),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let info = gpulse_xid::catalog::lookup(79).context("XID 79 not in the catalog")?;
    let xid = gpulse_proto::v1::Event {
        kind: gpulse_proto::v1::EventKind::Xid as i32,
        severity: gpulse_proto::v1::Severity::Fatal as i32,
        time: Some(now),
        payload: Some(gpulse_proto::v1::event::Payload::Xid(
            gpulse_proto::v1::Xid {
                code: 79,
                pci: "0000:3b:00.0".into(),
                gpu_uuid: "GPU-11111111-2222-3333-4444-555555555555".into(),
                message: "GPU has fallen off the bus.".into(),
                mnemonic: info.mnemonic.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    runtime().block_on(ingest_batches(url, node, [vec![sample, xid]]))?;
    Ok(())
}

/// One stateless (2026-07-28) `tools/call` over a raw HTTP/1.1 connection: what the server
/// costs without any client library. Returns the response body length.
pub fn mcp_raw_call(port: u16, tool: &str, args: &str) -> anyhow::Result<usize> {
    Ok(mcp_raw_answer(port, tool, args)?.len())
}

/// [`mcp_raw_call`], returning the whole HTTP response (headers and body).
pub fn mcp_raw_answer(port: u16, tool: &str, args: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{args},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: {tool}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 200") || resp.contains("\"isError\":true") {
        bail!("{tool}: {}", resp.chars().take(400).collect::<String>());
    }
    Ok(resp)
}

/// A program from a Debian package, with a clear error naming the package when it is missing
/// (`cargo xtask setup` installs them as root; the list is xtask/src/host.rs).
pub fn system_tool(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found: install Debian's {package} package (apt-get install {package}); `sudo -E cargo xtask setup` does"
    )
}

/// Percent-encodes a query-string value (a PromQL expression).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
