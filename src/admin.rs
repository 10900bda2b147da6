//! The admin HTTP server: `/healthz` (liveness), `/readyz` (readiness), `/metrics` (Prometheus),
//! `/status` (JSON statistics) and `POST /sync` (reconcile now).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::live::Trigger;
use crate::telemetry::Telemetry;

#[derive(Clone)]
struct AdminState {
    telemetry: Arc<Telemetry>,
    triggers: UnboundedSender<Trigger>,
    stale_after: Duration,
    stall: Duration,
}

/// Bind now (so a taken port is a start-up error), serve until cancelled.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    triggers: UnboundedSender<Trigger>,
    stale_after: Duration,
    stall: Duration,
    cancel: CancellationToken,
) {
    let state = AdminState {
        telemetry,
        triggers,
        stale_after,
        stall,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/sync", post(sync))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!("admin server stopped: {e}");
    }
}

fn json_response(code: StatusCode, body: serde_json::Value) -> Response {
    (code, axum::Json(body)).into_response()
}

async fn healthz(State(s): State<AdminState>) -> Response {
    let h = s.telemetry.health(s.stale_after, s.stall);
    let code = if h.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        code,
        json!({"status": if h.ok { "ok" } else { "unhealthy" }, "reason": h.reason}),
    )
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.telemetry.ready() {
        json_response(StatusCode::OK, json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "reason": s.telemetry.not_ready_reason()}),
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.telemetry.metrics_text(),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>) -> Response {
    let mut doc = s.telemetry.status_json();
    let h = s.telemetry.health(s.stale_after, s.stall);
    doc["healthy"] = json!(h.ok);
    // A tripped restart-loop breaker degrades the agent without failing liveness: a restart would reset
    // the breaker and resume the loop it stopped.
    let breaker = doc["actions"]["breaker"].as_str().map(str::to_owned);
    let (state, reason) = match (h.ok, breaker) {
        (false, _) => ("unhealthy", h.reason),
        (true, Some(b)) => ("degraded", format!("{}; actions stopped: {b}", h.reason)),
        (true, None) => ("ok", h.reason),
    };
    doc["status"] = json!(state);
    doc["health_reason"] = json!(reason);
    json_response(StatusCode::OK, doc)
}

async fn sync(State(s): State<AdminState>) -> Response {
    match s.triggers.send(Trigger::Sync("POST /sync")) {
        Ok(()) => json_response(StatusCode::ACCEPTED, json!({"status": "sync scheduled"})),
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "shutting down"}),
        ),
    }
}
