//! Where verification keys come from: a JWKS file (re-read when it changes) or an `https://` URL
//! (the API server's `/openid/v1/jwks`, an OAuth server's `jwks_uri`), fetched at start, every
//! five minutes, and at once (at most every ten seconds) when a token names a key id the set
//! lacks, so a key rotation needs no restart.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use prometheus::IntCounterVec;
use rustls::pki_types::ServerName;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::jwt::{KeySet, MAX_JWKS_BYTES};
use crate::reload::{self, Reloading};

/// How often a JWKS URL is fetched again.
const REFRESH: Duration = Duration::from_secs(300);
/// Fewest seconds between fetches asked for by unknown key ids.
const MIN_REFETCH: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// `--auth-jwks` (a file or an https URL) and, for a URL, the CA that signs its server and a
/// token file to authenticate the fetch with (the API server wants one).
#[derive(Clone, Debug)]
pub struct KeySource {
    pub location: String,
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl KeySource {
    pub fn file(path: PathBuf) -> Self {
        Self {
            location: path.display().to_string(),
            ca: None,
            token_file: None,
        }
    }

    fn is_url(&self) -> bool {
        self.location.starts_with("https://")
    }
}

/// The keys in force, and how to ask for a fresh copy.
#[derive(Clone)]
pub struct Keys {
    pub set: Arc<Reloading<KeySet>>,
    refetch: Option<Arc<Notify>>,
}

impl Keys {
    /// A token named a key id the set lacks: fetch again soon (URLs only).
    pub fn unknown_key(&self) {
        if let Some(n) = &self.refetch {
            n.notify_one();
        }
    }
}

/// Loads the keys now (failing start-up when they cannot be had) and keeps them current.
pub async fn open(
    what: &'static str,
    src: &KeySource,
    reloads: IntCounterVec,
) -> Result<Keys, String> {
    if !src.is_url() {
        let p = PathBuf::from(&src.location);
        let set = reload::watch(
            what,
            vec![p.clone()],
            reload::DEFAULT_INTERVAL,
            reloads,
            move || KeySet::load(&p),
        )?;
        return Ok(Keys { set, refetch: None });
    }
    let first = fetch(src).await?;
    let set = Arc::new(Reloading::new(first));
    let refetch = Arc::new(Notify::new());
    info!(url = %src.location, "verification keys fetched");
    let (weak, n, src) = (Arc::downgrade(&set), refetch.clone(), src.clone());
    tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = n.notified() => {
                    let wait = MIN_REFETCH.saturating_sub(last.elapsed());
                    tokio::time::sleep(wait).await;
                }
            }
            let Some(target) = weak.upgrade() else {
                return;
            };
            last = Instant::now();
            match fetch(&src).await {
                Ok(keys) => {
                    target.replace(keys);
                    reloads.with_label_values(&[what, "ok"]).inc();
                }
                Err(e) => {
                    reloads.with_label_values(&[what, "error"]).inc();
                    warn!(file = what, url = %src.location, error = %e, "JWKS fetch failed; the previous keys stay in force");
                }
            }
        }
    });
    Ok(Keys {
        set,
        refetch: Some(refetch),
    })
}

/// One GET of the JWKS over TLS (HTTP/1.1), bounded in time and size.
async fn fetch(src: &KeySource) -> Result<KeySet, String> {
    let text = tokio::time::timeout(FETCH_TIMEOUT, get(src))
        .await
        .map_err(|_| format!("{}: no answer within {FETCH_TIMEOUT:?}", src.location))??;
    KeySet::parse(&text).map_err(|e| format!("{}: {e}", src.location))
}

async fn get(src: &KeySource) -> Result<String, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", src.location);
    let uri: http::Uri = src.location.parse().map_err(|e| at(&e))?;
    let host = uri.host().ok_or_else(|| at(&"no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let cfg = crate::tls::client_config(src.ca.as_deref()).map_err(|e| at(&e))?;
    let name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| at(&e))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| at(&e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| at(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| at(&e))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = http::Request::get(path)
        .header(http::header::HOST, &host)
        .header(http::header::ACCEPT, "application/json");
    if let Some(t) = &src.token_file {
        let token = std::fs::read_to_string(t).map_err(|e| at(&e))?;
        req = req.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| at(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| at(&e))?;
    if !resp.status().is_success() {
        return Err(at(&format!("HTTP {}", resp.status())));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES as usize)
        .collect()
        .await
        .map_err(|e| at(&e))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|e| at(&e))
}
