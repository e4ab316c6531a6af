//! Fault tests against the real collector binary: SIGTERM with many open streams, and a data
//! directory that runs out of space (a small tmpfs, as root) and gets it back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)] // tests

use std::{
    process::Command,
    time::{Duration, Instant},
};

use gpulse_e2e::{mini_agent::MiniAgent, *};
use gpulse_proto::v1::{
    SubscribeRequest, ingest_client::IngestClient, telemetry_client::TelemetryClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use gpulse_e2e::soak::xid_event as xid;

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

/// A full data dir: refusals, `/readyz` 503, recovery by itself, every acked event once after
/// `kill -9` (the row of the fault matrix, as root).
#[test]
fn a_full_data_dir_loses_no_acked_event_fails_readiness_and_recovers_by_itself() {
    if !require_root("a_full_data_dir_loses_no_acked_event") {
        return;
    }
    let row = gpulse_e2e::soak::data_dir_full();
    eprintln!("{}", row.measured);
    assert_eq!(row.ok, Some(true), "{}", row.measured);
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
