//! The event stream: `GET /sse/subscribe?environment=E[&key=K]`, reconnected forever (or up to a limit)
//! with full-jitter backoff, also after a clean end of stream (the upstream ends it cleanly on SIGTERM).
//!
//! Events are only hints: the stream is lossy (several workers, full queues drop the newest events, no
//! replay after a reconnect). This task never keeps a value: from each event it keeps the type and the
//! key, nothing else; the reconcile loop reads the truth over REST.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CACHE_CONTROL, RETRY_AFTER};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{Client, status_error};
use super::sse::{Frame, Parser};
use crate::backoff::Backoff;

/// Reconnect policy of the stream (mirrors the official client's options).
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub initial_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    /// Consecutive failed attempts before giving up; negative = forever.
    pub max_attempts: i64,
    /// Subscribe to one key only (when exactly one literal key is selected).
    pub key: Option<String>,
}

/// Type of a change event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
    Sync,
    Other,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Updated => "updated",
            ChangeKind::Deleted => "deleted",
            ChangeKind::Sync => "sync",
            ChangeKind::Other => "other",
        }
    }
}

/// What the stream task reports. Carries no value, ever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The server's `connected` event: a new subscription (after every (re)connect).
    Connected { subscription_id: Option<String> },
    /// A change hint for one key.
    Change {
        kind: ChangeKind,
        key: Option<String>,
    },
    /// A `: ping` or `: keep-alive` comment.
    KeepAlive,
    /// The connection ended (cleanly or not) or could not be made; a retry follows.
    Disconnected { reason: String },
    /// `max_attempts` consecutive attempts failed; the task stopped.
    GaveUp { attempts: u32 },
}

#[derive(serde::Deserialize)]
struct Connected {
    subscription_id: Option<String>,
}

/// Only the key of a change event; the value in `data` is skipped without being kept.
#[derive(serde::Deserialize)]
struct Change {
    key: Option<String>,
}

const MAX_LINE: usize = 32 * 1024 * 1024;

/// Run the subscription until cancelled (or until it gives up).
pub async fn run(
    client: Client,
    environment: String,
    opts: StreamOptions,
    tx: UnboundedSender<StreamEvent>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(opts.initial_delay, opts.max_delay, opts.multiplier);
    let mut failures: u32 = 0;
    loop {
        let (reason, retry_after, connected) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect_and_read(&client, &environment, &opts, &tx) => r,
        };
        if connected {
            backoff.reset();
            failures = 0;
        } else {
            failures += 1;
        }
        if tx
            .send(StreamEvent::Disconnected {
                reason: reason.clone(),
            })
            .is_err()
        {
            return;
        }
        if opts.max_attempts >= 0 && i64::from(failures) > opts.max_attempts {
            warn!(
                attempts = failures,
                "event stream: giving up after {failures} failed attempts"
            );
            let _ = tx.send(StreamEvent::GaveUp { attempts: failures });
            return;
        }
        let delay = retry_after.unwrap_or_else(|| backoff.next_delay());
        info!(reason = %reason, retry_in_ms = delay.as_millis() as u64, "event stream disconnected, reconnecting");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: returns why it ended, an optional server-requested delay, and whether a
/// `connected` event was seen (then the backoff starts over).
async fn connect_and_read(
    client: &Client,
    environment: &str,
    opts: &StreamOptions,
    tx: &UnboundedSender<StreamEvent>,
) -> (String, Option<Duration>, bool) {
    let mut query = vec![("environment", environment)];
    if let Some(k) = &opts.key {
        query.push(("key", k.as_str()));
    }
    let url = client.url("sse/subscribe", &query);
    let headers = match client.headers(false) {
        Ok(h) => h,
        Err(e) => return (e.to_string(), None, false),
    };
    let response = client
        .http()
        .get(url.clone())
        .headers(headers)
        .header(ACCEPT, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .send()
        .await;
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            return (
                format!("cannot connect: {}", crate::util::error_chain(&e)),
                None,
                false,
            );
        }
    };
    let status = response.status();
    if !status.is_success() {
        let retry_after = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then(|| retry_after(response.headers()))
        .flatten();
        let body = response.bytes().await.unwrap_or_default();
        let err = status_error(status, &body, format!("GET {url}"), environment);
        return (err.to_string(), retry_after, false);
    }
    debug!("event stream open");
    let mut parser = Parser::new(MAX_LINE);
    let mut connected = false;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return ("the server ended the stream".into(), None, connected),
            Err(e) => {
                let reason = if e.is_timeout() {
                    "no data within the read timeout (dead connection?)".to_owned()
                } else {
                    format!("stream broken: {}", crate::util::error_chain(&e))
                };
                return (reason, None, connected);
            }
        };
        let frames = match parser.push(&chunk) {
            Ok(f) => f,
            Err(e) => return (e.to_string(), None, connected),
        };
        for frame in frames {
            let event = match frame {
                Frame::Comment => StreamEvent::KeepAlive,
                Frame::Event { name, data } => match name.as_str() {
                    "connected" => {
                        connected = true;
                        StreamEvent::Connected {
                            subscription_id: serde_json::from_str::<Connected>(&data)
                                .ok()
                                .and_then(|c| c.subscription_id),
                        }
                    }
                    other => StreamEvent::Change {
                        kind: match other {
                            "created" => ChangeKind::Created,
                            "updated" => ChangeKind::Updated,
                            "deleted" => ChangeKind::Deleted,
                            "sync" => ChangeKind::Sync,
                            _ => ChangeKind::Other,
                        },
                        key: serde_json::from_str::<Change>(&data)
                            .ok()
                            .and_then(|c| c.key),
                    },
                },
            };
            if tx.send(event).is_err() {
                return ("stopped".into(), None, connected);
            }
        }
    }
}

/// `Retry-After: <seconds>` (the HTTP-date form is rare for SSE servers; it falls back to backoff).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}
