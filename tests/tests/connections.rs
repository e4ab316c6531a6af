//! Connection bounds against the real collector binary (issue 27 #4, #10): one host's half-sent
//! requests, idle sockets and stalled TLS handshakes cannot hold a listener from the others, and
//! a quiet gRPC stream is not mistaken for an idle connection. The flooding host is 127.0.0.2,
//! the legitimate one 127.0.0.1 (Linux routes all of 127/8 to loopback).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)] // tests

use std::time::{Duration, Instant};

use gpulse_e2e::*;
use gpulse_proto::v1::{SubscribeRequest, telemetry_client::TelemetryClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// A connection to `port` from 127.0.0.2.
async fn from_other_host(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind("127.0.0.2:0".parse().unwrap())?;
    s.connect(([127, 0, 0, 1], port).into()).await
}

/// Whether the server closes `s` within `within` (EOF or an error on read).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An answer (a 408 or similar) before closing: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

fn metric(c: &Collector, name: &str) -> f64 {
    value_of_metric(&c.metrics().unwrap(), name).unwrap_or(0.0)
}

#[test]
fn half_requests_and_idle_sockets_cannot_hold_the_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(
        &dir.path().join("data"),
        free_port(),
        free_port(),
        &[
            "--max-connections-per-address",
            "64",
            "--idle-timeout",
            "3s",
            "--keepalive-interval",
            "1s",
        ],
    )
    .unwrap();
    let rt = runtime();
    rt.block_on(async {
        // A quiet Subscribe from the legitimate host, open across the idle timeout.
        let mut sub = TelemetryClient::connect(c.url())
            .await
            .unwrap()
            .subscribe(SubscribeRequest::default())
            .await
            .unwrap()
            .into_inner();

        // 200 half-sent HTTP requests and 200 silent gRPC sockets from one other host.
        let mut http = Vec::new();
        let mut grpc = Vec::new();
        for _ in 0..200 {
            let mut s = from_other_host(c.http_port).await.unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
            http.push(s);
            grpc.push(from_other_host(c.grpc_port).await.unwrap());
        }
        // Past the address's 64, each is closed at once.
        let mut closed_now = 0;
        for s in http.iter_mut().chain(grpc.iter_mut()) {
            if closed_within(s, Duration::from_millis(200)).await {
                closed_now += 1;
            }
        }
        assert!(closed_now >= 2 * (200 - 64), "{closed_now} closed at once");
        // The legitimate host is still served.
        let (code, _) = http_get(c.http_port, "/healthz").unwrap();
        assert_eq!(code, 200);
        let refused = metric(
            &c,
            "gpulse_connections_refused_total{listener=\"http\",reason=\"address_limit\"}",
        );
        assert!(refused >= 136.0, "{refused}");

        // The held ones are closed once silent for the idle timeout (3 s).
        let started = Instant::now();
        let mut held_closed = 0;
        for s in http.iter_mut().chain(grpc.iter_mut()) {
            if closed_within(s, Duration::from_secs(15)).await {
                held_closed += 1;
            }
        }
        assert_eq!(held_closed, 400, "every flooding connection closed");
        assert!(started.elapsed() < Duration::from_secs(15));
        let idle = metric(
            &c,
            "gpulse_connections_idle_closed_total{listener=\"http\"}",
        ) + metric(
            &c,
            "gpulse_connections_idle_closed_total{listener=\"grpc\"}",
        );
        assert!(idle >= 128.0, "{idle} closed for idling");

        // The quiet Subscribe outlived the idle timeout (HTTP/2 pings kept it): an event pushed
        // now reaches it.
        let mut agent =
            gpulse_e2e::mini_agent::MiniAgent::on_node(c.url(), "conn-node/1", "conn-node");
        agent.add(gpulse_e2e::soak::xid_event("after the idle timeout"));
        agent.attempt().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let m = sub
                    .message()
                    .await
                    .expect("stream alive")
                    .expect("not ended");
                if let Some(gpulse_proto::v1::subscribe_response::Msg::Event(e)) = m.msg
                    && let Some(gpulse_proto::v1::event::Payload::Xid(x)) = e.payload
                {
                    return x.message;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, "after the idle timeout");
    });
}

/// #4: idle sockets from one host took every TLS handshake slot; now that host has a few.
#[test]
fn stalled_tls_handshakes_from_one_host_leave_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(dir.path()).unwrap();
    let (_c, grpc, _log) = start_tls_collector(dir.path(), &pki, &[]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        // 600 sockets that never send a ClientHello: more than the listener's 512 slots.
        let mut idle = Vec::new();
        for _ in 0..600 {
            if let Ok(s) = from_other_host(grpc).await {
                idle.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Every legitimate handshake (a new connection each) gets through.
        let opts = gpulse_proto::client::ClientOptions {
            ca_file: Some(pki.ca.clone()),
            ..Default::default()
        };
        let url = format!("https://127.0.0.1:{grpc}");
        let mut ok = 0;
        for _ in 0..20 {
            let ch = opts.endpoint(&url).unwrap().connect().await;
            if let Ok(ch) = ch
                && TelemetryClient::new(ch)
                    .status(gpulse_proto::v1::StatusRequest {})
                    .await
                    .is_ok()
            {
                ok += 1;
            }
        }
        assert_eq!(ok, 20, "legitimate handshakes while one host stalls 600");
        drop(idle);
    });
}

/// A gateway's merged Subscribe streams each hold one stream on every upstream: bounded by the
/// gateway's `--max-subscribers`, refused past it, the slot given back when a stream ends.
#[test]
fn a_gateway_caps_merged_subscribe_streams() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let gw = Gateway::start(dir.path(), &[("s1", c.url())], &["--max-subscribers", "3"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut client = TelemetryClient::connect(gw.url()).await.unwrap();
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(
                client
                    .subscribe(SubscribeRequest::default())
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        let refused = client
            .subscribe(SubscribeRequest::default())
            .await
            .expect_err("a fourth stream");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        drop(open.pop());
        // The dropped stream's slot comes back once the gateway sees it end.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.subscribe(SubscribeRequest::default()).await {
                Ok(s) => {
                    open.push(s.into_inner());
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                    assert!(Instant::now() < deadline, "the slot never came back");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}
