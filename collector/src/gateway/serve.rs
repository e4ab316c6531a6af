//! The gateway on the network, like a collector: Telemetry gRPC (with reflection and health),
//! `/mcp` over the merged API, its own `/metrics`, `/healthz` and `/readyz`, with the same TLS
//! and authentication options. Upstreams are reached with the gateway's own credentials.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use gpulse_proto::{
    api::{RemoteTelemetry, SharedTelemetry},
    client::ClientOptions,
    v1::{StatusRequest, telemetry_client::TelemetryClient, telemetry_server::TelemetryServer},
};
use tonic::service::interceptor::InterceptedService;
use tracing::info;

use super::{CallLimits, Gateway, GatewayMetrics};
use crate::{
    auth::{Auth, AuthConfig, Role, oauth::OAuthConfig},
    http::require_reader,
    listen::{self, Listening, ServerTask},
    shutdown,
    tls::TlsFiles,
};

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// (name, gRPC URL) of each upstream.
    pub upstreams: Vec<(String, String)>,
    /// How upstreams are reached (CA, client certificate, token file).
    pub client: ClientOptions,
    pub limits: CallLimits,
    /// Named on nodes whose collector names no cluster.
    pub cluster: String,
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Connection limits of both listeners (`conn`).
    pub connections: crate::conn::Limits,
    pub mcp: Option<gpulse_mcp::http::HttpOptions>,
    pub tls: Option<TlsFiles>,
    pub auth: AuthConfig,
    pub mcp_oauth: Option<OAuthConfig>,
}

impl GatewayConfig {
    pub fn new(
        grpc_listen: SocketAddr,
        http_listen: SocketAddr,
        upstreams: Vec<(String, String)>,
    ) -> Self {
        Self {
            grpc_listen,
            http_listen,
            upstreams,
            client: ClientOptions::default(),
            limits: CallLimits::default(),
            cluster: String::new(),
            max_message_bytes: 16 << 20,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            connections: crate::conn::Limits::default(),
            mcp: None,
            tls: None,
            auth: AuthConfig::default(),
            mcp_oauth: None,
        }
    }
}

pub struct RunningGateway {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub gateway: Gateway,
    pub grpc: ServerTask<tonic::transport::Error>,
    pub http: ServerTask<std::io::Error>,
}

/// A channel to one upstream: connects lazily (an upstream down at start is an upstream down,
/// not a gateway that will not start), gives up connecting after 2 s, and notices a peer that
/// stopped answering (a frozen shard) by HTTP/2 PINGs within 10 s, which ends its Subscribe
/// stream so the merged one announces it.
pub fn upstream_api(
    client: &ClientOptions,
    url: &str,
    max_message_bytes: usize,
) -> anyhow::Result<SharedTelemetry> {
    let ep = client
        .endpoint(url)
        .with_context(|| format!("upstream {url:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let creds = client
        .credentials()
        .with_context(|| format!("upstream {url:?}"))?;
    let channel = creds.wrap(ep.connect_lazy());
    let c = TelemetryClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    Ok(RemoteTelemetry::shared(c))
}

pub async fn start(
    cfg: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningGateway> {
    anyhow::ensure!(
        !cfg.upstreams.is_empty(),
        "a gateway needs at least one --upstream"
    );
    let names: Vec<String> = cfg.upstreams.iter().map(|(n, _)| n.clone()).collect();
    let metrics = GatewayMetrics::new(&names)?;
    let auth = Auth::new(
        &cfg.auth,
        metrics.auth_refused.clone(),
        metrics.reloads.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("authentication: {e}"))?;
    let tls = match &cfg.tls {
        Some(files) => Some(
            files
                .watch(metrics.reloads.clone())
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let mut apis = Vec::with_capacity(cfg.upstreams.len());
    for (name, url) in &cfg.upstreams {
        apis.push((
            name.clone(),
            upstream_api(&cfg.client, url, cfg.max_message_bytes)?,
        ));
    }
    let (stop_tx, stop_rx) = shutdown::channel();
    let gateway = Gateway::new(
        apis,
        cfg.limits,
        metrics.clone(),
        cfg.cluster.clone(),
        stop_rx.clone(),
    );
    let (grpc_listener, http_listener) = listen::bind(cfg.grpc_listen, cfg.http_listen).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let (reflection_v1, reflection_v1alpha) = listen::reflection()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TelemetryServer<Gateway>>()
        .await;
    let reader = auth.interceptor(Role::Reader);
    let telemetry = TelemetryServer::new(gateway.clone())
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .add_service(InterceptedService::new(telemetry, reader.clone()))
        .add_service(InterceptedService::new(reflection_v1, reader.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, reader))
        .add_service(health);
    tokio::spawn(async move {
        shutdown.await;
        info!("gateway stopping: ending every stream, then the listeners");
        stop_tx.trigger();
        health_reporter
            .set_not_serving::<TelemetryServer<Gateway>>()
            .await;
    });
    let listening = Listening {
        tls,
        handshake_failures: metrics.tls_handshake_failures.clone(),
        keepalive: cfg.keepalive_interval,
        stop: stop_rx.clone(),
        limits: cfg.connections,
        conn_metrics: metrics.conns.clone(),
    };
    let grpc = listening.serve_grpc(router, grpc_listener);
    let mut app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(HttpState {
            gateway: gateway.clone(),
            auth: auth.clone(),
        });
    if let Some(opts) = cfg.mcp.clone() {
        let api: SharedTelemetry = Arc::new(gateway.clone());
        app = app.merge(
            listen::mcp_router(
                api,
                opts,
                &auth,
                cfg.mcp_oauth.as_ref(),
                metrics.reloads.clone(),
            )
            .await?,
        );
    }
    let http = listening.serve_http(app, http_listener, http_addr);
    info!(grpc = %grpc_addr, http = %http_addr, upstreams = ?names, "gpulse gateway serving");
    Ok(RunningGateway {
        grpc_addr,
        http_addr,
        gateway,
        grpc,
        http,
    })
}

#[derive(Clone)]
struct HttpState {
    gateway: Gateway,
    auth: Arc<Auth>,
}

/// Ready while at least one upstream answers Status: a gateway with every upstream gone has
/// nothing to serve (and says which failed how).
async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    use gpulse_proto::v1::telemetry_server::Telemetry;
    match s
        .gateway
        .status(tonic::Request::new(StatusRequest {}))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let ok = r
                .upstreams
                .iter()
                .filter(|u| u.state == 1 && !u.name.contains('/'))
                .count();
            (
                StatusCode::OK,
                format!(
                    "ready: {ok} of {} upstreams answer\n",
                    s.gateway.upstreams().len()
                ),
            )
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", e.message()),
        ),
    }
}

async fn metrics_page(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = require_reader(&s.auth, &headers) {
        return r;
    }
    s.gateway.refresh_gauges();
    match s.gateway.metrics().render() {
        Ok(body) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
