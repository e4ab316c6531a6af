//! A small HTTP/1.1 client for the TSDB: `http://` or `https://` (the system roots or a CA file),
//! one kept-alive connection re-opened when it breaks, every exchange bounded in time and the
//! answer's body in size.
use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;

/// Largest answer body read (an error text, or a PromQL result).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("{0}")]
    Setup(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Http(String),
}

pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

pub struct Client {
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    token_file: Option<PathBuf>,
    timeout: Duration,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(
        url: &str,
        ca: Option<&PathBuf>,
        token_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Self, PostError> {
        let bad = |e: &dyn std::fmt::Display| PostError::Setup(format!("{url}: {e}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&e))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad(&"the URL must be http:// or https://")),
        };
        let host = uri.host().ok_or_else(|| bad(&"no host"))?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let cfg = crate::tls::client_config(ca.map(PathBuf::as_path)).map_err(|e| bad(&e))?;
            let name = ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|e| bad(&e))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        Ok(Self {
            uri,
            host,
            port,
            tls,
            token_file,
            timeout,
            conn: None,
        })
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, PostError> {
        let at = |e: &dyn std::fmt::Display| PostError::Connect(self.host.clone(), e.to_string());
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| at(&e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((c, name)) => {
                let tls = c.connect(name.clone(), tcp).await.map_err(|e| at(&e))?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await
                        .map_err(|e| at(&e))?;
                tokio::spawn(conn);
                Ok(sender)
            }
            None => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await
                        .map_err(|e| at(&e))?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }

    /// One request to `path_and_query` (the URL's own path when None), within the timeout.
    pub async fn send(
        &mut self,
        method: http::Method,
        path_and_query: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, PostError> {
        let timeout = self.timeout;
        match tokio::time::timeout(
            timeout,
            self.exchange(method, path_and_query, headers, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(PostError::Timeout(timeout))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: http::Method,
        path_and_query: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, PostError> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| PostError::Http(e.to_string()))?;
        let path = path_and_query
            .or_else(|| self.uri.path_and_query().map(|p| p.as_str()))
            .unwrap_or("/");
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(
                http::header::USER_AGENT,
                concat!("gpulse/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = &self.token_file {
            let token = std::fs::read_to_string(t)
                .map_err(|e| PostError::Setup(format!("{}: {e}", t.display())))?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| PostError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| PostError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| PostError::Http(e.to_string()))?
            .to_bytes();
        self.conn = Some(sender);
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}
