//! Serving the two listeners (gRPC and HTTP), plain or TLS, and the pieces of the HTTP side that
//! a collector and a gateway share (/mcp with its authentication, reflection), so both are put on
//! the network the same way.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use gpulse_proto::{api::SharedTelemetry, v1::FILE_DESCRIPTOR_SET};
use prometheus::{IntCounter, IntCounterVec};
use tokio::net::TcpListener;
use tonic::transport::server::Router;

use crate::{
    auth::{
        Auth,
        oauth::{self, OAuthConfig, OAuthVerifier},
    },
    reload::Reloading,
    shutdown::Shutdown,
    tls::{self, Configs},
};

pub type ServerTask<E> = tokio::task::JoinHandle<Result<(), E>>;

/// What both listeners need to know about TLS, connection limits and stopping.
#[derive(Clone)]
pub struct Listening {
    pub tls: Option<Arc<Reloading<Configs>>>,
    pub handshake_failures: IntCounter,
    pub keepalive: Duration,
    pub stop: Shutdown,
    /// The connection limits of each listener (`conn`).
    pub limits: crate::conn::Limits,
    pub conn_metrics: crate::conn::ConnMetrics,
}

/// gRPC reflection (v1 and v1alpha) for the gpulse protocol and gRPC health.
pub fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;
    Ok((v1, v1alpha))
}

impl Listening {
    fn gate(&self, which: tls::Listener) -> crate::conn::Gate {
        let name = match which {
            tls::Listener::Grpc => "grpc",
            tls::Listener::Http => "http",
        };
        crate::conn::Gate::new(name, self.limits, self.conn_metrics.clone())
    }

    fn accept(
        &self,
        listener: TcpListener,
        which: tls::Listener,
        t: &Arc<Reloading<Configs>>,
    ) -> tokio::sync::mpsc::Receiver<(tls::Conn, SocketAddr)> {
        tls::accept(
            listener,
            Arc::clone(t),
            which,
            self.handshake_failures.clone(),
            self.gate(which),
            self.keepalive,
            self.stop.clone(),
        )
    }

    fn accept_plain(
        &self,
        listener: TcpListener,
        which: tls::Listener,
    ) -> tokio::sync::mpsc::Receiver<(crate::conn::Guarded<tokio::net::TcpStream>, SocketAddr)>
    {
        crate::conn::accept_plain(
            listener,
            self.gate(which),
            self.keepalive,
            self.stop.clone(),
        )
    }

    /// Serves `router` on `listener` until the stop fires.
    pub fn serve_grpc(
        &self,
        router: Router,
        listener: TcpListener,
    ) -> ServerTask<tonic::transport::Error> {
        let mut stop = self.stop.clone();
        let stopped = async move { stop.wait().await };
        match &self.tls {
            Some(t) => {
                let rx = self.accept(listener, tls::Listener::Grpc, t);
                tokio::spawn(router.serve_with_incoming_shutdown(tls::grpc_incoming(rx), stopped))
            }
            // The builder's nodelay and keepalive settings apply only to listeners tonic binds
            // itself: they are set on the accepted sockets (without nodelay an ack waited on
            // Nagle and the peer's delayed ACK, up to 40 ms, and one stream's throughput fell
            // 5x).
            None => {
                let rx = self.accept_plain(listener, tls::Listener::Grpc);
                tokio::spawn(router.serve_with_incoming_shutdown(tls::grpc_incoming(rx), stopped))
            }
        }
    }

    /// Serves `app` on `listener` until the stop fires.
    pub fn serve_http(
        &self,
        app: axum::Router,
        listener: TcpListener,
        local: SocketAddr,
    ) -> ServerTask<std::io::Error> {
        let mut stop = self.stop.clone();
        let stopped = async move { stop.wait().await };
        match &self.tls {
            Some(t) => {
                let rx = self.accept(listener, tls::Listener::Http, t);
                let listener = crate::conn::ChannelListener { rx, local };
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                })
            }
            None => {
                let rx = self.accept_plain(listener, tls::Listener::Http);
                let listener = crate::conn::ChannelListener { rx, local };
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                })
            }
        }
    }
}

/// `/mcp` over `api`: reader tokens and OAuth access tokens open it (beside `--mcp-token`).
pub async fn mcp_router(
    api: SharedTelemetry,
    mut opts: gpulse_mcp::http::HttpOptions,
    auth: &Arc<Auth>,
    mcp_oauth: Option<&OAuthConfig>,
    reloads: IntCounterVec,
) -> anyhow::Result<axum::Router> {
    let oauth = match mcp_oauth {
        Some(o) => Some(Arc::new(
            OAuthVerifier::new(o, reloads)
                .await
                .map_err(|e| anyhow::anyhow!("--mcp-oauth-jwks: {e}"))?,
        )),
        None => None,
    };
    if auth.enabled() || oauth.is_some() {
        opts.bearer = Some(oauth::mcp_check(
            auth.enabled().then(|| auth.clone()),
            oauth,
        ));
    }
    opts.oauth = mcp_oauth.map(OAuthConfig::resource);
    Ok(gpulse_mcp::http::router(api, opts))
}

/// Binds both listeners.
pub async fn bind(
    grpc: SocketAddr,
    http: SocketAddr,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let g = TcpListener::bind(grpc)
        .await
        .with_context(|| format!("binding gRPC on {grpc}"))?;
    let h = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding HTTP on {http}"))?;
    Ok((g, h))
}
