//! TLS on the gRPC and HTTP listeners (rustls): the certificate and key re-read when the files
//! change (cert-manager rotation), optional client certificates verified against `--client-ca`.
//!
//! Handshakes run off the accept loop, each bounded in time and in number, so a client that
//! opens a connection and never speaks holds neither the listener nor memory; failed handshakes
//! are counted.
use std::{io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use prometheus::{IntCounter, IntCounterVec};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, warn};

use crate::{
    reload::{self, Reloading},
    shutdown::Shutdown,
};

/// `--tls-cert`, `--tls-key`, `--client-ca`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The server configurations of both listeners, built from one read of the files.
pub struct Configs {
    /// gRPC: HTTP/2 only.
    pub grpc: Arc<ServerConfig>,
    /// HTTP: HTTP/2 or HTTP/1.1 (Prometheus, curl, MCP clients).
    pub http: Arc<ServerConfig>,
}

/// A handshake that has not finished within this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress per listener; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 512;

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.cert.clone(), self.key.clone()];
        p.extend(self.client_ca.clone());
        p
    }

    /// Reads the files and builds both configurations.
    pub fn load(&self) -> Result<Configs, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("--tls-cert {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "--tls-cert {}: no certificate in it",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("--tls-key {}: {e}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?
                {
                    let c = c.map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
                }
                // A client without a certificate may still authenticate with a token.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let base = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        let mut grpc = base.clone();
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        let mut http = base;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Configs {
            grpc: Arc::new(grpc),
            http: Arc::new(http),
        })
    }

    /// Loads now (a bad file is a start-up error) and reloads when any file changes.
    pub fn watch(&self, reloads: IntCounterVec) -> Result<Arc<Reloading<Configs>>, String> {
        let me = self.clone();
        reload::watch(
            "tls",
            self.paths(),
            reload::DEFAULT_INTERVAL,
            reloads,
            move || me.load(),
        )
    }
}

/// Which listener a connection is for.
#[derive(Clone, Copy, Debug)]
pub enum Listener {
    Grpc,
    Http,
}

/// Accepts connections on `listener` and hands over those whose handshake completed, with the
/// configuration in force when each arrived. Ends when `stop` fires.
pub fn accept(
    listener: TcpListener,
    configs: Arc<Reloading<Configs>>,
    which: Listener,
    failures: IntCounter,
    keepalive: Duration,
    mut stop: Shutdown,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.wait() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                failures.inc();
                debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive));
            let config = match which {
                Listener::Grpc => configs.current().grpc.clone(),
                Listener::Http => configs.current().http.clone(),
            };
            let (tx, failures) = (tx.clone(), failures.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let acceptor = TlsAcceptor::from(config);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => {
                        failures.inc();
                        debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        failures.inc();
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// The gRPC server's incoming connections.
pub fn grpc_incoming(
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, io::Error>> {
    use futures::StreamExt as _;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(|(s, _)| Ok(s))
}

/// The HTTP server's listener (axum).
pub struct HttpListener {
    pub rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for HttpListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A TLS client configuration trusting `ca` (a PEM bundle), or the system's roots without one:
/// what the collector uses to fetch keys and to reach a TSDB.
pub fn client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
                roots
                    .add(c.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
