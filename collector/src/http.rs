//! HTTP endpoints: /healthz (the state task alive), /readyz (alive, answering, and able to make
//! writes durable), /metrics (Prometheus). See `health` for what each one checks.
use std::time::Duration;

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    auth::{Auth, Role, bearer},
    state::StoreHandle,
    telemetry::Metrics,
};

#[derive(Clone)]
pub struct HttpState {
    pub store: StoreHandle,
    pub metrics: Metrics,
    /// With auth on, /metrics needs a reader token (Prometheus: `authorization.credentials_file`);
    /// the probes stay open for the kubelet.
    pub auth: Arc<Auth>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The refusal (401 with a `WWW-Authenticate` challenge, or 403) unless the request carries a
/// reader's token.
pub fn require_reader(auth: &Auth, headers: &HeaderMap) -> Option<Response> {
    if !auth.enabled() {
        return None;
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.authorize(bearer(value), None, Role::Reader) {
        Ok(_) => None,
        Err(status) => {
            let code = if status.code() == tonic::Code::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            Some(
                (
                    code,
                    [(header::WWW_AUTHENTICATE, "Bearer realm=\"gpulse\"")],
                    format!("{}\n", status.message()),
                )
                    .into_response(),
            )
        }
    }
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.store.is_closed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the store's state task has ended\n".to_string(),
        );
    }
    match s.store.health().liveness(std::time::Instant::now()) {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(p) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {p}\n")),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if let Some(p) = s.store.health().readiness(std::time::Instant::now()) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {p}\n"));
    }
    match tokio::time::timeout(Duration::from_secs(2), s.store.status()).await {
        Ok(Ok(st)) => (
            StatusCode::OK,
            format!("ready: {} events stored\n", st.events_stored),
        ),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store did not answer within 2s\n".to_string(),
        ),
    }
}

async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = require_reader(&s.auth, &headers) {
        return r;
    }
    let started = std::time::Instant::now();
    // Node and GPU gauges come from the store; if it does not answer in time the registry's
    // metrics are still served (and the failure is visible as a missing family, not an error).
    let extra = match tokio::time::timeout(Duration::from_secs(2), s.store.exposition()).await {
        Ok(Ok(text)) => text,
        _ => String::new(),
    };
    s.metrics
        .scrape_seconds
        .observe(started.elapsed().as_secs_f64());
    match s.metrics.render() {
        Ok(mut body) => {
            body.push_str(&extra);
            (
                StatusCode::OK,
                [("content-type", "text/plain; version=0.0.4")],
                body,
            )
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
