//! `/mcp` over Streamable HTTP: stateless JSON responses for 2026-07-28 clients, sessions for
//! older ones, behind a bearer-token check and rmcp's Host and Origin checks.
use std::sync::Arc;

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::{GpulseMcp, SharedTelemetry, sessions::BoundedSessions};

/// What a bearer check says of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Allowed,
    /// Unknown, expired, for another audience...: 401.
    Invalid,
    /// Valid, without the scope `/mcp` needs: 403 `insufficient_scope`.
    InsufficientScope,
}

/// Other ways a bearer token may open `/mcp` (the collector's reader tokens, OAuth access
/// tokens).
#[derive(Clone)]
pub struct BearerCheck(Arc<dyn Fn(&str) -> Check + Send + Sync>);

impl BearerCheck {
    pub fn new(f: impl Fn(&str) -> Check + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for BearerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerCheck")
    }
}

/// `/mcp` as an OAuth 2.1 protected resource (MCP authorization, RFC 9728): what its Protected
/// Resource Metadata says, and what 401 answers point at.
#[derive(Clone, Debug)]
pub struct OAuthResource {
    /// The canonical URL of `/mcp`, the audience its tokens carry.
    pub resource: String,
    pub authorization_servers: Vec<String>,
    pub scopes: Vec<String>,
}

impl OAuthResource {
    /// RFC 9728 section 3: the well-known path inserted between the host and the resource's path.
    pub fn metadata_url(&self) -> String {
        let (origin, path) = split_origin(&self.resource);
        format!("{origin}/.well-known/oauth-protected-resource{path}")
    }

    fn document(&self) -> serde_json::Value {
        serde_json::json!({
            "resource": self.resource,
            "authorization_servers": self.authorization_servers,
            "scopes_supported": self.scopes,
            "bearer_methods_supported": ["header"],
            "resource_name": "gpulse",
        })
    }
}

/// (`https://host:port`, `/path`) of an absolute URL.
fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => {
            let (o, p) = url.split_at(after_scheme + i);
            (o, p.trim_end_matches('/'))
        }
        None => (url, ""),
    }
}

/// How `/mcp` is exposed.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Accepted as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Tokens accepted besides `token`. With either set, a request needs one of them.
    pub bearer: Option<BearerCheck>,
    /// OAuth protected resource metadata to serve and point 401 answers at.
    pub oauth: Option<OAuthResource>,
    /// Host header values accepted besides loopback names (DNS-rebinding guard).
    pub allowed_hosts: Vec<String>,
    /// Origins accepted; requests with any other Origin get 403. Empty: any Origin is refused
    /// (non-browser clients send none), except local ones on a loopback listener.
    pub allowed_origins: Vec<String>,
    /// The HTTP listener is on loopback: pages served from this machine (`localhost`,
    /// `127.0.0.1`, `[::1]`, any port) may call `/mcp`, as the MCP security guidance asks;
    /// foreign origins are still refused (DNS rebinding).
    pub loopback: bool,
    /// Sessions (older clients') open at once; 0: `sessions::DEFAULT_MAX_SESSIONS`.
    pub max_sessions: usize,
}

/// Origins of pages on this machine (rmcp matches scheme, host and, with `:*`, any port).
const LOOPBACK_ORIGINS: [&str; 6] = [
    "http://localhost:*",
    "http://127.0.0.1:*",
    "http://[::1]:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "https://[::1]:*",
];

/// The `/mcp` Tower service (stateless JSON responses for 2026-07-28 clients, sessions for older
/// ones), wrapped so a missing or wrong bearer token gets 401 before rmcp sees the request.
pub fn router(api: SharedTelemetry, opts: HttpOptions) -> axum::Router {
    router_with_sessions(api, opts).0
}

/// [`router`], and its sessions (tests look at them).
pub fn router_with_sessions(
    api: SharedTelemetry,
    opts: HttpOptions,
) -> (axum::Router, Arc<BoundedSessions>) {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1", "[::1]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    hosts.extend(opts.allowed_hosts.iter().cloned());
    let mut cfg = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_json_response(true)
        .with_max_request_body_bytes(1 << 20);
    let mut origins = opts.allowed_origins.clone();
    if opts.loopback {
        origins.extend(LOOPBACK_ORIGINS.iter().map(|o| o.to_string()));
    }
    cfg = if origins.is_empty() {
        cfg.enforce_origin_validation()
    } else {
        cfg.with_allowed_origins(origins)
    };
    let max = match opts.max_sessions {
        0 => crate::sessions::DEFAULT_MAX_SESSIONS,
        n => n,
    };
    let sessions = Arc::new(BoundedSessions::new(max, crate::sessions::IDLE));
    let svc = StreamableHttpService::new(
        move || Ok(GpulseMcp::new(api.clone())),
        sessions.clone(),
        cfg,
    );
    let oauth = opts.oauth.clone();
    let auth = Arc::new(Bearer {
        token: opts.token,
        check: opts.bearer,
        oauth: opts.oauth,
    });
    let mut router =
        axum::Router::new()
            .nest_service("/mcp", svc)
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let auth = auth.clone();
                    async move { auth.check(req, next).await }
                },
            ));
    if let Some(o) = oauth {
        // Served without a token: clients read it to find where to get one.
        let doc = o.document();
        let get = axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        });
        router = router
            .route("/.well-known/oauth-protected-resource", get.clone())
            .route("/.well-known/oauth-protected-resource/mcp", get);
    }
    (router, sessions)
}

/// Who may call `/mcp`: the static token, or whoever `check` admits; anyone when neither is set.
struct Bearer {
    token: Option<String>,
    check: Option<BearerCheck>,
    oauth: Option<OAuthResource>,
}

impl Bearer {
    async fn check(&self, req: Request, next: Next) -> Response {
        if self.token.is_none() && self.check.is_none() {
            return next.run(req).await;
        }
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim();
        let by_token = self
            .token
            .as_deref()
            .is_some_and(|want| constant_time_eq(got.as_bytes(), want.as_bytes()));
        let verdict = if by_token {
            Check::Allowed
        } else if got.is_empty() {
            Check::Invalid
        } else {
            self.check.as_ref().map_or(Check::Invalid, |c| (c.0)(got))
        };
        match verdict {
            Check::Allowed => next.run(req).await,
            Check::Invalid => self.refusal(StatusCode::UNAUTHORIZED, None),
            Check::InsufficientScope => {
                self.refusal(StatusCode::FORBIDDEN, Some("insufficient_scope"))
            }
        }
    }

    /// 401/403 with the challenge: `resource_metadata` (and the scope) when OAuth is on.
    fn refusal(&self, code: StatusCode, error: Option<&str>) -> Response {
        let mut challenge = String::from("Bearer realm=\"gpulse\"");
        if let Some(e) = error {
            challenge.push_str(&format!(", error=\"{e}\""));
        }
        if let Some(o) = &self.oauth {
            challenge.push_str(&format!(
                ", resource_metadata=\"{}\", scope=\"{}\"",
                o.metadata_url(),
                o.scopes.join(" ")
            ));
        }
        let body = match error {
            Some(_) => "the token lacks the scope /mcp needs\n",
            None => "missing or wrong bearer token for /mcp\n",
        };
        let mut r = (code, body).into_response();
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use axum::{body::Body, http::Request as HttpRequest};
    use tower::ServiceExt;

    use super::*;
    use crate::tools::testing::Fake;

    const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

    /// The status `/mcp` answers an initialize with these headers.
    async fn status(opts: HttpOptions, headers: &[(&str, &str)]) -> u16 {
        let app = router(Arc::new(Fake::default()), opts);
        let mut req = HttpRequest::post("/mcp")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .oneshot(req.body(Body::from(INIT)).unwrap())
            .await
            .unwrap();
        resp.status().as_u16()
    }

    fn loopback() -> HttpOptions {
        HttpOptions {
            loopback: true,
            ..Default::default()
        }
    }

    /// Issue 27 #11: 20,000 `initialize` calls kept 20,000 sessions (1.5 GB).
    #[tokio::test]
    async fn sessions_are_capped_least_recently_used_first() {
        let (app, sessions) = router_with_sessions(
            Arc::new(Fake::default()),
            HttpOptions {
                max_sessions: 8,
                ..loopback()
            },
        );
        let mut ids = Vec::new();
        for _ in 0..30 {
            let resp = app
                .clone()
                .oneshot(
                    HttpRequest::post("/mcp")
                        .header("content-type", "application/json")
                        .header("accept", "application/json, text/event-stream")
                        .header("host", "127.0.0.1:7701")
                        .body(Body::from(INIT))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let id = resp
                .headers()
                .get("mcp-session-id")
                .expect("a session")
                .to_str()
                .unwrap()
                .to_string();
            ids.push(id);
            assert!(sessions.open() <= 8, "{} open", sessions.open());
        }
        assert_eq!(sessions.open(), 8);
        assert_eq!(
            sessions.closed.load(std::sync::atomic::Ordering::Relaxed),
            22
        );
        // The oldest session is gone (404), the newest still answers.
        let ping = |id: &str| {
            HttpRequest::post("/mcp")
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("host", "127.0.0.1:7701")
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", "2025-11-25")
                .body(Body::from(r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#))
                .unwrap()
        };
        let old = app.clone().oneshot(ping(&ids[0])).await.unwrap();
        assert_eq!(old.status(), 404);
        let new = app.clone().oneshot(ping(&ids[29])).await.unwrap();
        assert_ne!(new.status(), 404);
    }

    #[tokio::test]
    async fn origins_and_hosts_on_loopback() {
        let host = ("host", "127.0.0.1:7701");
        assert_eq!(
            status(loopback(), &[host]).await,
            200,
            "no Origin (not a browser)"
        );
        for origin in [
            "http://localhost:5173",
            "http://127.0.0.1:7701",
            "https://[::1]:8443",
        ] {
            assert_eq!(
                status(loopback(), &[host, ("origin", origin)]).await,
                200,
                "{origin}"
            );
        }
        for origin in [
            "http://evil.example",
            "http://127.0.0.1.evil.example",
            "null",
        ] {
            assert_eq!(
                status(loopback(), &[host, ("origin", origin)]).await,
                403,
                "{origin}"
            );
        }
        // DNS rebinding: a foreign name that resolves to this machine.
        assert_eq!(
            status(loopback(), &[("host", "evil.example:7701")]).await,
            403
        );
    }

    #[tokio::test]
    async fn off_loopback_only_the_allow_lists_and_the_token_count() {
        let opts = HttpOptions {
            token: Some("a-token-of-at-least-16".into()),
            allowed_hosts: vec!["collector.example".into()],
            allowed_origins: vec!["https://dash.example".into()],
            loopback: false,
            bearer: None,
            oauth: None,
            max_sessions: 0,
        };
        let auth = ("authorization", "Bearer a-token-of-at-least-16");
        let host = ("host", "collector.example");
        assert_eq!(status(opts.clone(), &[host]).await, 401, "no token");
        assert_eq!(status(opts.clone(), &[host, auth]).await, 200);
        let dash = ("origin", "https://dash.example");
        assert_eq!(
            status(opts.clone(), &[host, auth, dash]).await,
            200,
            "allow-listed"
        );
        let local = ("origin", "http://localhost:5173");
        assert_eq!(
            status(opts.clone(), &[host, auth, local]).await,
            403,
            "not loopback"
        );
        assert_eq!(status(opts, &[("host", "other.example"), auth]).await, 403);
    }

    /// Admits the one reader token "reader-token-from-the-file".
    fn reader_check() -> BearerCheck {
        BearerCheck::new(|t| {
            if t == "reader-token-from-the-file" {
                Check::Allowed
            } else {
                Check::Invalid
            }
        })
    }

    #[tokio::test]
    async fn reader_tokens_open_mcp_beside_the_static_token() {
        let opts = HttpOptions {
            token: Some("a-token-of-at-least-16".into()),
            bearer: Some(reader_check()),
            ..loopback()
        };
        let host = ("host", "127.0.0.1:7701");
        let with = |t: &'static str| ("authorization", t);
        assert_eq!(status(opts.clone(), &[host]).await, 401, "no token");
        assert_eq!(
            status(opts.clone(), &[host, with("Bearer a-token-of-at-least-16")]).await,
            200
        );
        assert_eq!(
            status(
                opts.clone(),
                &[host, with("Bearer reader-token-from-the-file")]
            )
            .await,
            200
        );
        assert_eq!(
            status(opts.clone(), &[host, with("Bearer someone-else")]).await,
            401
        );
        assert_eq!(status(opts, &[host, with("Bearer ")]).await, 401, "empty");
        let only_check = HttpOptions {
            bearer: Some(reader_check()),
            ..loopback()
        };
        assert_eq!(status(only_check.clone(), &[host]).await, 401);
        assert_eq!(
            status(
                only_check,
                &[host, with("Bearer reader-token-from-the-file")]
            )
            .await,
            200
        );
    }

    #[tokio::test]
    async fn oauth_resource_metadata_and_challenges() {
        let oauth = OAuthResource {
            resource: "https://gpulse.example/mcp".into(),
            authorization_servers: vec!["https://issuer.example".into()],
            scopes: vec!["gpulse:read".into()],
        };
        assert_eq!(
            oauth.metadata_url(),
            "https://gpulse.example/.well-known/oauth-protected-resource/mcp"
        );
        let opts = HttpOptions {
            bearer: Some(BearerCheck::new(|t| match t {
                "good.jwt.token" => Check::Allowed,
                "noscope.jwt.token" => Check::InsufficientScope,
                _ => Check::Invalid,
            })),
            oauth: Some(oauth),
            allowed_hosts: vec!["gpulse.example".into()],
            ..Default::default()
        };
        let app = router(Arc::new(Fake::default()), opts.clone());
        for path in [
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/mcp",
        ] {
            let resp = app
                .clone()
                .oneshot(HttpRequest::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["resource"], "https://gpulse.example/mcp");
            assert_eq!(doc["authorization_servers"][0], "https://issuer.example");
            assert_eq!(doc["scopes_supported"][0], "gpulse:read");
        }
        let challenge = |token: Option<&'static str>| {
            let app = app.clone();
            async move {
                let mut req = HttpRequest::post("/mcp")
                    .header("host", "gpulse.example")
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream");
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let resp = app
                    .oneshot(req.body(Body::from(INIT)).unwrap())
                    .await
                    .unwrap();
                let h = resp
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                (resp.status().as_u16(), h)
            }
        };
        let (code, h) = challenge(None).await;
        assert_eq!(code, 401);
        assert!(
            h.contains("resource_metadata=\"https://gpulse.example/.well-known/oauth-protected-resource/mcp\""),
            "{h}"
        );
        assert!(h.contains("scope=\"gpulse:read\""), "{h}");
        assert_eq!(challenge(Some("forged.jwt.token")).await.0, 401);
        let (code, h) = challenge(Some("noscope.jwt.token")).await;
        assert_eq!(code, 403);
        assert!(h.contains("error=\"insufficient_scope\""), "{h}");
        assert_eq!(challenge(Some("good.jwt.token")).await.0, 200);
    }
}
