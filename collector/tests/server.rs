//! The assembled server on loopback: gRPC reflection (so any gRPC client can discover and call
//! Subscribe), gRPC health, and the HTTP endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::io::{Read, Write};

use gpulse_collector::{
    server::{self, ServerConfig},
    state::StoreConfig,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut b = String::new();
    s.read_to_string(&mut b).unwrap();
    let code = b.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        b.split_once("\r\n\r\n")
            .map(|(_, x)| x.to_string())
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_health_and_http_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        StoreConfig::new(dir.path().to_path_buf()),
    );
    cfg.mcp = Some(gpulse_mcp::http::HttpOptions::default());
    let running = server::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let url = format!("http://{}", running.grpc_addr);

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "gpulse.v1.Ingest",
        "gpulse.v1.Telemetry",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "gpulse.v1.Telemetry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let http = running.http_addr;
    let (code, body) = tokio::task::spawn_blocking(move || http_get(http, "/healthz"))
        .await
        .unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = tokio::task::spawn_blocking(move || http_get(http, "/readyz"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("gpulse_store_ring_budget_bytes 268435456"),
        "{body}"
    );
    let (code, _) = tokio::task::spawn_blocking(move || http_get(http, "/nope"))
        .await
        .unwrap();
    assert_eq!(code, 404);

    stop_tx.send(()).unwrap();
    running.grpc.await.unwrap().unwrap();
    running.http.await.unwrap().unwrap();
}
