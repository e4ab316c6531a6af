//! HTTP endpoints: /healthz (the state task alive), /readyz (alive, answering, and able to make
//! writes durable), /metrics (Prometheus). See `health` for what each one checks.
use std::time::Duration;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{state::StoreHandle, telemetry::Metrics};

#[derive(Clone)]
pub struct HttpState {
    pub store: StoreHandle,
    pub metrics: Metrics,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
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
