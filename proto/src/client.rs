//! How every client (the agent, `gpulse`, `gpulse-collector mcp --stdio`, a gateway) reaches a
//! collector: `https://` with a CA file or the system roots, an optional client certificate
//! (mutual TLS), and a bearer token read from a file and re-read when it changes (the kubelet
//! rotates projected service account tokens).
//!
//! Tokens travel as the standard `authorization: Bearer <token>` metadata, so any gRPC client can
//! send them; a token is never sent in clear to a host off loopback.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// A channel that carries the client's credentials on every call.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// Largest token file read (a Kubernetes service account token is ~1 KiB).
const MAX_TOKEN_BYTES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid collector URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
    #[error("TLS settings: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error(
        "{0} is plain http:// to a host off loopback: the token would travel in clear; use https://"
    )]
    TokenInClear(String),
    #[error("--tls-client-cert and --tls-client-key go together")]
    HalfIdentity,
}

/// TLS and credential settings of a client (`--ca-file`, `--tls-client-cert`,
/// `--tls-client-key`, `--token-file`).
///
/// With the `clap` feature these are command-line flags every client flattens into its own.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ClientOptions {
    /// CA bundle (PEM) that signs the collector's certificate for https:// URLs; the system
    /// roots when unset.
    #[cfg_attr(feature = "clap", arg(long, env = "GPULSE_CA_FILE"))]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; goes with --tls-client-key.
    #[cfg_attr(
        feature = "clap",
        arg(long = "tls-client-cert", env = "GPULSE_TLS_CLIENT_CERT")
    )]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[cfg_attr(
        feature = "clap",
        arg(long = "tls-client-key", env = "GPULSE_TLS_CLIENT_KEY")
    )]
    pub key_file: Option<PathBuf>,
    /// File holding the bearer token every call carries (re-read when it changes, as the
    /// kubelet rotates projected tokens). Refused with http:// off loopback.
    #[cfg_attr(feature = "clap", arg(long, env = "GPULSE_TOKEN_FILE"))]
    pub token_file: Option<PathBuf>,
}

impl ClientOptions {
    /// An endpoint for `url` with TLS set up for `https://` URLs. Checks the files now, so a
    /// wrong path is a start-up error rather than an endless reconnect loop.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ClientError> {
        self.endpoint_named(url, None)
    }

    /// As [`Self::endpoint`] for a URL that names an address, checking the server certificate
    /// against `tls_name` (a shard found by resolving that name).
    pub fn endpoint_for(&self, url: &str, tls_name: &str) -> Result<Endpoint, ClientError> {
        self.endpoint_named(url, Some(tls_name))
    }

    fn endpoint_named(&self, url: &str, tls_name: Option<&str>) -> Result<Endpoint, ClientError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| ClientError::BadUrl(url.into(), e.to_string()))?;
        let https = ep.uri().scheme_str() == Some("https");
        if !https {
            if self.token_file.is_some() && !host_is_loopback(ep.uri().host().unwrap_or("")) {
                return Err(ClientError::TokenInClear(url.into()));
            }
            return Ok(ep);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(host) = tls_name.or(ep.uri().host()) {
            tls = tls.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
        }
        tls = match &self.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read_pem(ca)?)),
            None => tls.with_native_roots(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                tls = tls.identity(Identity::from_pem(read_pem(c)?, read_pem(k)?));
            }
            (None, None) => {}
            _ => return Err(ClientError::HalfIdentity),
        }
        Ok(ep.tls_config(tls)?)
    }

    /// What every call carries: the bearer token from `token_file`, if any (read now to check it).
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        let Some(path) = &self.token_file else {
            return Ok(Credentials::none());
        };
        let file = TokenFile::new(path.clone());
        file.current()?;
        Ok(Credentials {
            token: Some(Arc::new(file)),
        })
    }

    /// A lazily connecting channel to `url` that carries the credentials.
    pub fn connect_lazy(&self, url: &str) -> Result<AuthChannel, ClientError> {
        let creds = self.credentials()?;
        Ok(InterceptedService::new(
            self.endpoint(url)?.connect_lazy(),
            creds,
        ))
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ClientError> {
    let bytes = std::fs::read(path).map_err(|e| ClientError::Read(path.into(), e))?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(ClientError::Invalid(path.into(), "not a PEM file".into()));
    }
    Ok(bytes)
}

/// `localhost`, `127.0.0.0/8`, `::1`.
pub fn host_is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The interceptor that adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<Arc<TokenFile>>,
}

impl Credentials {
    /// No credentials (loopback, or a collector without auth).
    pub fn none() -> Self {
        Self::default()
    }

    /// Wraps a channel so that every call carries these credentials.
    pub fn wrap(self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self)
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.token {
            let value = t
                .current()
                .map_err(|e| Status::unauthenticated(e.to_string()))?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

/// A token file, re-read when its modification time or size changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<((SystemTime, u64), AsciiMetadataValue)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The `Bearer <token>` value as of the file's current contents.
    pub fn current(&self) -> Result<AsciiMetadataValue, ClientError> {
        let meta =
            std::fs::metadata(&self.path).map_err(|e| ClientError::Read(self.path.clone(), e))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, v)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(v.clone());
        }
        if meta.len() > MAX_TOKEN_BYTES {
            return Err(self.invalid(format!("larger than {MAX_TOKEN_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| ClientError::Read(self.path.clone(), e))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(self.invalid("empty".into()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.invalid("the token must be printable ASCII without spaces".into()));
        }
        let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| self.invalid(e.to_string()))?;
        *cached = Some((stamp, value.clone()));
        Ok(value)
    }

    fn invalid(&self, why: String) -> ClientError {
        ClientError::Invalid(self.path.clone(), why)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("gpulse-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let f = TokenFile::new(path.clone());
        assert_eq!(f.current().unwrap(), "Bearer first-token");
        std::fs::write(&path, "second-token-longer\n").unwrap();
        assert_eq!(f.current().unwrap(), "Bearer second-token-longer");
        std::fs::write(&path, "two words").unwrap();
        assert!(f.current().is_err(), "spaces refused");
        std::fs::write(&path, "\n").unwrap();
        assert!(f.current().is_err(), "empty refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_token_in_clear_off_loopback() {
        let opts = ClientOptions {
            token_file: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(matches!(
            opts.endpoint("http://collector.example:7700"),
            Err(ClientError::TokenInClear(_))
        ));
        assert!(opts.endpoint("http://127.0.0.1:7700").is_ok());
        assert!(opts.endpoint("http://[::1]:7700").is_ok());
        assert!(opts.endpoint("http://localhost:7700").is_ok());
        let half = ClientOptions {
            cert_file: Some("/x".into()),
            ..Default::default()
        };
        assert!(matches!(
            half.endpoint("https://c:7700"),
            Err(ClientError::HalfIdentity)
        ));
    }
}
