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
use tracing::debug;

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
/// Most handshakes in progress from one address: idle sockets re-opened from one host at
/// 150-400/s took the listener's slots and let 14-24 % of legitimate handshakes through
/// (issue 27 #4); now that host waits on its own few slots.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;

/// A TLS connection as the servers see it: the stream inside is gated (`conn`).
pub type Conn = TlsStream<crate::conn::Guarded<TcpStream>>;

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

/// Accepts connections on `listener` within `gate`'s limits and hands over those whose
/// handshake completed, with the configuration in force when each arrived. Ends when `stop`
/// fires.
pub fn accept(
    listener: TcpListener,
    configs: Arc<Reloading<Configs>>,
    which: Listener,
    failures: IntCounter,
    gate: crate::conn::Gate,
    keepalive: Duration,
    mut stop: Shutdown,
) -> mpsc::Receiver<(Conn, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_address = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        std::net::IpAddr,
        usize,
    >::new()));
    tokio::spawn(async move {
        while let Some((tcp, peer)) = crate::conn::next_connection(&listener, &mut stop).await {
            let Some(permit) = gate.admit(peer.ip()) else {
                continue;
            };
            let Some(mine) = HandshakeSlot::take(&per_address, peer.ip()) else {
                failures.inc();
                debug!(%peer, "too many TLS handshakes in progress from this address; connection closed");
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                failures.inc();
                debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            crate::conn::configure(&tcp, keepalive);
            let config = match which {
                Listener::Grpc => configs.current().grpc.clone(),
                Listener::Http => configs.current().http.clone(),
            };
            let (tx, failures) = (tx.clone(), failures.clone());
            let tcp = crate::conn::Guarded::new(tcp, permit);
            tokio::spawn(async move {
                let _slot = (slot, mine);
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

/// One of an address's handshake slots; given back when dropped. The table holds only
/// addresses with handshakes in progress (at most `MAX_HANDSHAKES` plus the refused).
struct HandshakeSlot {
    table: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    addr: std::net::IpAddr,
}

impl HandshakeSlot {
    fn take(
        table: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        addr: std::net::IpAddr,
    ) -> Option<Self> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(addr).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self {
            table: table.clone(),
            addr,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.addr);
            }
        }
    }
}

/// The gRPC server's incoming connections.
pub fn grpc_incoming<S>(
    rx: mpsc::Receiver<(S, SocketAddr)>,
) -> impl futures::Stream<Item = Result<S, io::Error>> {
    use futures::StreamExt as _;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(|(s, _)| Ok(s))
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
