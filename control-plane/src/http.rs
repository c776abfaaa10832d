//! Plain-HTTP endpoints for operators and probes: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::fleet::Fleet;

pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(fleet)
}

async fn metrics(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    if let Err(e) = fleet.refresh_node_gauges().await {
        tracing::warn!(error = %steward_telemetry::chain(&e), "node gauges not refreshed");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        fleet.metrics.encode(),
    )
}

async fn readyz(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    match fleet.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {}\n", steward_telemetry::chain(&e)),
        ),
    }
}
