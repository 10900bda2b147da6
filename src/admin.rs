//! The admin HTTP server: `/healthz` (liveness), `/readyz` (readiness), `/metrics` (Prometheus),
//! `/status` (JSON statistics) and `POST /sync` (reconcile now, at most once per `--sync-min-interval`).
//!
//! The server has no authentication (kubelet probes need plain HTTP): anyone who can reach the port
//! can read `/status` and `/metrics` (no value, key or token is ever in them) and ask for reconciles,
//! which [`OnDemand`] rate-limits. Connections are bounded too: at most [`MAX_CONNECTIONS`] at once
//! (more are closed at once), each closed [`CONNECTION_LIFETIME`] after it was accepted, so idle or
//! trickling clients cannot pile up file descriptors in the agent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::live::{OnDemand, Outcome};
use crate::telemetry::Telemetry;

#[derive(Clone)]
struct AdminState {
    telemetry: Arc<Telemetry>,
    on_demand: Arc<OnDemand>,
    stale_after: Duration,
    stall: Duration,
}

/// Most admin connections open at once; further ones are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// An admin connection is closed this long after it was accepted (probes and scrapes take
/// milliseconds; a keep-alive client reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Bind now (so a taken port is a start-up error), serve until cancelled.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    on_demand: Arc<OnDemand>,
    stale_after: Duration,
    stall: Duration,
    cancel: CancellationToken,
) {
    let state = AdminState {
        telemetry,
        on_demand,
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
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!("admin server stopped: {e}");
    }
}

/// A listener handing out at most [`MAX_CONNECTIONS`] connections at once.
struct Bounded {
    inner: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let conn = Conn {
                        stream,
                        _slot: slot,
                        end: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
                    };
                    return (conn, addr);
                }
                Err(_) => {
                    tracing::debug!(
                        "admin server: {MAX_CONNECTIONS} connections open, closing a new one"
                    );
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One admin connection: holds its slot, and reads fail once its lifetime is over (hyper then closes it).
struct Conn {
    stream: tokio::net::TcpStream,
    _slot: OwnedSemaphorePermit,
    end: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.end.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
    // A POST /sync or SIGHUP waiting for --sync-min-interval: due in N ms (null: none pending).
    doc["sync"]["requested_in_ms"] = json!(s.on_demand.due_at().map(|at| {
        let left = at.saturating_duration_since(std::time::Instant::now());
        u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
    }));
    json_response(StatusCode::OK, doc)
}

/// 202 with when the reconcile will run: `{"status": "sync scheduled", "result": "now" | "delayed" |
/// "coalesced", "runs_in_ms": N}` (`delayed`/`coalesced`: within `--sync-min-interval` of the previous
/// on-demand reconcile). Never refused while the loop runs: requests are merged, not queued.
async fn sync(State(s): State<AdminState>) -> Response {
    match s.on_demand.request("POST /sync") {
        Some(scheduled) => {
            let runs_in = scheduled
                .at
                .saturating_duration_since(std::time::Instant::now());
            let status = match scheduled.outcome {
                Outcome::Coalesced => "sync already scheduled",
                Outcome::Now | Outcome::Delayed => "sync scheduled",
            };
            json_response(
                StatusCode::ACCEPTED,
                json!({
                    "status": status,
                    "result": scheduled.outcome.as_str(),
                    "runs_in_ms": u64::try_from(runs_in.as_millis()).unwrap_or(u64::MAX),
                }),
            )
        }
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "shutting down"}),
        ),
    }
}
