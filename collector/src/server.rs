//! Wiring: store task, gRPC server (ingest, telemetry, reflection, health) and HTTP server.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use gpulse_proto::{raw::ingest_server::IngestServer, v1::telemetry_server::TelemetryServer};
use tonic::service::interceptor::InterceptedService;
use tracing::info;

use crate::{
    auth::{Auth, AuthConfig, Role, oauth::OAuthConfig},
    grpc::{IngestService, TelemetryService},
    http::{self, HttpState},
    listen::{self, Listening},
    shutdown::{self, Shutdown},
    state::{self, StoreConfig, StoreHandle},
    telemetry::Metrics,
    tls::TlsFiles,
};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub store: StoreConfig,
    /// Largest accepted gRPC message (a batch); larger ones are refused with OUT_OF_RANGE.
    pub max_message_bytes: usize,
    /// MCP at `/mcp` on the HTTP address (None: off).
    pub mcp: Option<gpulse_mcp::http::HttpOptions>,
    /// HTTP/2 PING interval on every gRPC connection (and TCP keepalive): a peer that stops
    /// answering (a node that lost power, a dropped NAT entry) is disconnected after
    /// `keepalive_interval + keepalive_timeout` instead of staying "connected" forever.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Connection limits of both listeners (`conn`).
    pub connections: crate::conn::Limits,
    /// TLS on both listeners (None: plaintext, for loopback).
    pub tls: Option<TlsFiles>,
    /// How callers authenticate (nothing configured: every call allowed).
    pub auth: AuthConfig,
    /// `/mcp` as an OAuth protected resource (JWT access tokens from this issuer).
    pub mcp_oauth: Option<OAuthConfig>,
    /// Push 1-minute rollups and the XID counters to a TSDB (None: off).
    pub remote_write: Option<crate::remote_write::RemoteWriteConfig>,
    /// Answer trend windows older than local retention from this TSDB (None: off).
    pub history: Option<crate::history::HistoryConfig>,
}

impl ServerConfig {
    /// Defaults for everything but the listen addresses and the store.
    pub fn new(grpc_listen: SocketAddr, http_listen: SocketAddr, store: StoreConfig) -> Self {
        Self {
            grpc_listen,
            http_listen,
            store,
            max_message_bytes: 4 << 20,
            mcp: None,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            connections: crate::conn::Limits::default(),
            tls: None,
            auth: AuthConfig::default(),
            mcp_oauth: None,
            remote_write: None,
            history: None,
        }
    }
}

/// A started collector: its bound addresses and handles.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub store: StoreHandle,
    pub metrics: Metrics,
    pub grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    pub http: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    /// Fires when `shutdown` resolved and the streams were told to end.
    pub stopping: Shutdown,
}

/// Binds both listeners, restores the store and starts serving. `shutdown` resolving stops both
/// servers gracefully.
pub async fn start(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let metrics = Metrics::new()?;
    let auth = Auth::new(
        &cfg.auth,
        metrics.auth_refused.clone(),
        metrics.reloads.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("authentication: {e}"))?;
    for reason in ["connected", "seq_jump"] {
        metrics.ingest_takeover_refused.with_label_values(&[reason]);
    }
    let tls = match &cfg.tls {
        Some(files) => Some(
            files
                .watch(metrics.reloads.clone())
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let store = state::start(cfg.store.clone(), metrics.clone()).context("opening the store")?;
    let history = match &cfg.history {
        Some(h) => Some(Arc::new(
            crate::history::History::new(
                h,
                crate::remote_write::Place {
                    cluster: cfg.store.cluster.clone(),
                    shard: cfg.store.shard.clone(),
                },
            )
            .context("--history-url")?,
        )),
        None => None,
    };

    let (grpc_listener, http_listener) = listen::bind(cfg.grpc_listen, cfg.http_listen).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let (reflection_v1, reflection_v1alpha) = listen::reflection()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IngestServer<IngestService>>()
        .await;
    health_reporter
        .set_serving::<TelemetryServer<TelemetryService>>()
        .await;

    let (stop_tx, stop_rx) = shutdown::channel();
    let ingest = IngestServer::new(IngestService {
        store: store.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        stop: stop_rx.clone(),
    })
    .max_decoding_message_size(cfg.max_message_bytes);
    let ingest = InterceptedService::new(ingest, auth.interceptor(Role::Agent));
    let reader = auth.interceptor(Role::Reader);
    let telemetry = TelemetryServer::new(TelemetryService {
        store: store.clone(),
        stop: stop_rx.clone(),
        history: history.clone(),
    })
    .max_decoding_message_size(cfg.max_message_bytes)
    .max_encoding_message_size(cfg.max_message_bytes.max(4 << 20));
    let telemetry = InterceptedService::new(telemetry, reader.clone());
    let reflection_v1 = InterceptedService::new(reflection_v1, reader.clone());
    let reflection_v1alpha = InterceptedService::new(reflection_v1alpha, reader);

    let stop_health = health_reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("stopping: ending every stream, then the listeners");
        stop_tx.trigger();
        stop_health
            .set_not_serving::<IngestServer<IngestService>>()
            .await;
        stop_health
            .set_not_serving::<TelemetryServer<TelemetryService>>()
            .await;
    });
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .tcp_keepalive(Some(cfg.keepalive_interval))
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .add_service(ingest)
        .add_service(telemetry)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(health);
    if let Some(rw) = cfg.remote_write.clone() {
        crate::remote_write::start(
            rw,
            &cfg.store.data_dir,
            crate::remote_write::Place {
                cluster: cfg.store.cluster.clone(),
                shard: cfg.store.shard.clone(),
            },
            store.clone(),
            metrics.clone(),
            stop_rx.clone(),
        )
        .context("remote write")?;
    }
    let listening = Listening {
        tls,
        handshake_failures: metrics.tls_handshake_failures.clone(),
        keepalive: cfg.keepalive_interval,
        stop: stop_rx.clone(),
        limits: cfg.connections,
        conn_metrics: metrics.conns.clone(),
    };
    let grpc = listening.serve_grpc(router, grpc_listener);
    let mut app = http::router(HttpState {
        store: store.clone(),
        metrics: metrics.clone(),
        auth: auth.clone(),
    });
    if let Some(opts) = cfg.mcp.clone() {
        // MCP calls the collector's own Telemetry service in-process.
        let api = Arc::new(TelemetryService {
            store: store.clone(),
            stop: stop_rx.clone(),
            history: history.clone(),
        });
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
    info!(grpc = %grpc_addr, http = %http_addr, data_dir = %cfg.store.data_dir.display(), "gpulse-collector serving");
    Ok(Running {
        grpc_addr,
        http_addr,
        store,
        metrics,
        grpc,
        http,
        stopping: stop_rx,
    })
}
