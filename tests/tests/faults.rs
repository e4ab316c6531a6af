//! Fault tests against the real collector binary: SIGTERM with many open streams, and a data
//! directory that runs out of space (a small tmpfs, as root) and gets it back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)] // tests

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gpulse_e2e::{mini_agent::MiniAgent, *};
use gpulse_proto::v1::{
    self, EventFilter, SubscribeRequest, event::Payload, ingest_client::IngestClient,
    telemetry_client::TelemetryClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn xid(msg: &str) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::Xid as i32,
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

/// Every XID message the collector holds, replayed from its first cursor.
async fn stored_messages(url: &str, want: usize) -> Vec<String> {
    let events = collect_events(
        url,
        EventFilter::default(),
        Some(0),
        Duration::from_secs(10),
        |seen| seen.iter().filter(|e| xid_of(e).is_some()).count() >= want,
    )
    .await
    .unwrap();
    events
        .iter()
        .filter_map(|e| xid_of(e).map(|x| x.message.clone()))
        .collect()
}

#[test]
fn sigterm_with_100_open_streams_exits_within_the_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let url = c.url();
    let rt = runtime();
    let (subs, agents) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut subs = Vec::new();
        for _ in 0..96 {
            subs.push(
                TelemetryClient::new(channel.clone())
                    .subscribe(SubscribeRequest::default())
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        // Four agents with open Push streams (on their own connections, as real agents).
        let mut agents = Vec::new();
        for i in 0..4 {
            let mut a = MiniAgent::new(url.clone(), &format!("term-{i}"));
            a.add(xid("before the stop"));
            a.attempt().await.unwrap();
            let mut client = IngestClient::connect(url.clone()).await.unwrap();
            let (tx, rx) = mpsc::channel(4);
            tx.send(a.batch(0, Vec::new())).await.unwrap();
            let mut acks = client
                .push(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            acks.message().await.unwrap().unwrap();
            agents.push((tx, acks));
        }
        (subs, agents)
    });
    let t = Instant::now();
    let status = c
        .proc
        .term()
        .expect("collector still running 10 s after SIGTERM");
    let took = t.elapsed();
    eprintln!("SIGTERM with 100 open streams: exit {status} after {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("gpulse-collector stopped"), "{log}");
    // Every stream was ended with a status clients act on, not dropped mid-air.
    rt.block_on(async {
        for mut s in subs {
            let end = loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            let st = end.expect_err("subscriber stream ended without a status");
            assert_eq!(st.code(), tonic::Code::Unavailable, "{st}");
        }
        for (_tx, mut acks) in agents {
            let st = acks
                .message()
                .await
                .expect_err("agent stream ended silently");
            assert_eq!(st.code(), tonic::Code::Unavailable, "{st}");
        }
    });
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs: {st}");
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` to the last byte.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut n = 0;
    for chunk in [64 << 10, 4 << 10, 512, 1] {
        let buf = vec![0x5a_u8; chunk];
        while f.write_all(&buf).is_ok() {
            n += chunk as u64;
        }
    }
    let _ = f.sync_all();
    n
}

#[test]
fn a_full_data_dir_loses_no_acked_event_fails_readiness_and_recovers_by_itself() {
    if !require_root("a_full_data_dir_loses_no_acked_event") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The data dir is the mount itself, so the collector's log (beside it) stays writable.
    let data = dir.path().join("full");
    let _mnt = Tmpfs::mount(&data, "8m");
    let args = ["--ring-bytes", "1MiB", "--wal-segment-bytes", "256KiB"];
    let (grpc, http) = (free_port(), free_port());
    let mut c = Collector::start(&data, grpc, http, &args).unwrap();
    let url = c.url();
    let rt = runtime();
    let mut agent = MiniAgent::new(url.clone(), "full-agent");
    rt.block_on(async {
        for i in 0..10 {
            agent.add(xid(&format!("before-{i}")));
            agent.attempt().await.unwrap();
        }
    });
    let filler = data.join("filler");
    let filled = fill(&filler);
    eprintln!("filled the data dir's tmpfs with {filled} bytes");

    // While full: writes fail (a few small frames may still fit in the slack of the log's last
    // page), nothing that failed is acknowledged, and /readyz says why. The resend only grows,
    // so once a write fails it keeps failing until space returns.
    let mut refused = 0;
    rt.block_on(async {
        for i in 0..200 {
            agent.add(xid(&format!("while-full-{i}")));
            if let Err(st) = agent.attempt().await {
                eprintln!("refused while full: {st}");
                assert_eq!(st.code(), tonic::Code::Unavailable, "{st}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    });
    assert_eq!(refused, 3, "a full disk kept taking writes");
    assert!(!agent.spool.is_empty());
    let (code, body) = http_get(http, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot be written"), "{body}");
    let m = c.metrics().unwrap();
    assert_eq!(value_of_metric(&m, "gpulse_store_writable"), Some(0.0));
    assert!(value_of_metric(&m, "gpulse_store_write_errors_total").unwrap_or(0.0) > 0.0);
    assert_eq!(
        http_get(http, "/healthz").unwrap().0,
        200,
        "alive, just not ready"
    );

    // Space returns: the resend goes through by itself and readiness comes back.
    std::fs::remove_file(&filler).unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.spool.is_empty() {
            if agent.attempt().await.is_err() {
                assert!(Instant::now() < deadline, "never recovered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for i in 0..10 {
            agent.add(xid(&format!("after-{i}")));
            agent.attempt().await.unwrap();
        }
    });
    assert_eq!(http_get(http, "/readyz").unwrap().0, 200);
    let total = agent.acked.len();
    assert_eq!(
        total as u64,
        agent.next_seq - 1,
        "everything acknowledged in the end"
    );

    // Every acknowledged event survives kill -9 and a restart, exactly once.
    c.proc.kill9();
    let c2 = Collector::start(&data, free_port(), free_port(), &args).unwrap();
    let stored = rt.block_on(stored_messages(&c2.url(), total));
    let mut want = agent.acked.clone();
    want.sort();
    let mut got = stored.clone();
    got.sort();
    assert_eq!(
        got, want,
        "acknowledged events lost or duplicated after restart"
    );
    let log = std::fs::read_to_string(&c2.log).unwrap();
    assert!(
        !log.contains("WAL damage"),
        "the full disk left a torn frame:\n{log}"
    );
}

#[test]
fn a_log_that_cannot_be_written_does_not_stop_the_collector() {
    // stderr on /dev/full: every log write fails with ENOSPC, as on a full log disk.
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(bin("gpulse-collector"))
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/readyz").is_ok_and(|(c, _)| c == 200) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("collector exited with an unwritable log: {st}");
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{grpc}");
    let rt = runtime();
    let mut agent = MiniAgent::new(url, "log-full");
    agent.add(xid("logged nowhere"));
    rt.block_on(agent.attempt()).unwrap();
    assert_eq!(agent.acked.len(), 1);
    assert!(child.try_wait().unwrap().is_none(), "collector died");
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP relay that can go silent without closing either side: what a node that lost power (or
/// a dropped NAT entry) looks like to the collector.
struct Relay {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(to: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (mut r, mut w, f) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        f.clone(),
                    ),
                    (Box::new(ro), Box::new(wi), f.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Silent, not closed: hold the bytes and both sockets forever.
                            while f.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { port, frozen }
    }
}

#[test]
fn a_half_open_agent_connection_is_dropped_by_keepalive() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(
        &dir.path().join("data"),
        free_port(),
        free_port(),
        &["--keepalive-interval", "1s", "--keepalive-timeout", "1s"],
    )
    .unwrap();
    let connected = || {
        value_of_metric(
            &c.metrics().unwrap(),
            "gpulse_node_agent_connected{node=\"node-full\"}",
        )
    };
    let rt = runtime();
    rt.block_on(async {
        let relay = Relay::start(c.grpc_port).await;
        let mut agent = MiniAgent::new(format!("http://127.0.0.1:{}", relay.port), "half-open");
        agent.add(xid("then the power went"));
        // An open stream, as a real agent keeps: hello and one batch acknowledged.
        let mut client = IngestClient::connect(agent.url.clone()).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(agent.batch(0, Vec::new())).await.unwrap();
        let mut acks = client
            .push(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        acks.message().await.unwrap().unwrap();
        tx.send(agent.batch(1, vec![xid("one")])).await.unwrap();
        acks.message().await.unwrap().unwrap();
        assert_eq!(connected(), Some(1.0));
        relay
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        while connected() != Some(0.0) {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "a silent peer still counts as connected after {:?}",
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "half-open agent marked disconnected after {:?}",
            t.elapsed()
        );
        drop((tx, acks));
    });
}
