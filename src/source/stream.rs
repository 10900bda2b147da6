//! The event stream: `GET /sse/subscribe?environment=E[&key=K]`, reconnected forever (or up to a limit)
//! with full-jitter backoff, also after a clean end of stream (the upstream ends it cleanly on SIGTERM).
//!
//! Events are only hints: the stream is lossy (several workers, full queues drop the newest events, no
//! replay after a reconnect). This task never keeps a value: from each event it keeps the type and the
//! key, nothing else; the reconcile loop reads the truth over REST.
//!
//! Bounded: one event (all its `data:` lines and the line being read) may hold at most
//! `--max-response-size` bytes, else the connection is dropped and made again with backoff; events wait
//! in a queue of [`QUEUE`] (a full queue stops reading, so a flooding server cannot grow memory); a
//! redirect is not followed; reasons reported hold no server text.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CACHE_CONTROL, RETRY_AFTER};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{Client, display_url, error_of, transport_reason};
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

/// Capacity of the channel from the stream to the reconcile loop, in events.
pub const QUEUE: usize = 1024;

/// A `subscription_id` is kept (for `/status`) only when it looks like the upstream's UUIDs.
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Longest key kept from a change event (the protocol allows 255 characters).
const MAX_KEY: usize = 1024;

/// Run the subscription until cancelled (or until it gives up).
pub async fn run(
    client: Client,
    environment: String,
    opts: StreamOptions,
    tx: Sender<StreamEvent>,
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
        let sent = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tx.send(StreamEvent::Disconnected { reason: reason.clone() }) => r,
        };
        if sent.is_err() {
            return;
        }
        if opts.max_attempts >= 0 && i64::from(failures) > opts.max_attempts {
            warn!(
                attempts = failures,
                "event stream: giving up after {failures} failed attempts"
            );
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tx.send(StreamEvent::GaveUp { attempts: failures }) => {}
            }
            return;
        }
        // A server's Retry-After is honoured up to --reconnect-max-delay.
        let delay = retry_after.map_or_else(|| backoff.next_delay(), |d| d.min(opts.max_delay));
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
    tx: &Sender<StreamEvent>,
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
                format!("cannot connect: {}", transport_reason(&e)),
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
        let err = error_of(response, &url, environment).await;
        return (err.to_string(), retry_after, false);
    }
    debug!(url = %display_url(&url), "event stream open");
    let limit = usize::try_from(client.max_response_size()).unwrap_or(usize::MAX);
    let mut parser = Parser::new(limit);
    let mut connected = false;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return ("the server ended the stream".into(), None, connected),
            Err(e) => {
                let reason = if e.is_timeout() {
                    "no data within the read timeout (dead connection?)".to_owned()
                } else {
                    format!("stream broken: {}", transport_reason(&e))
                };
                return (reason, None, connected);
            }
        };
        let frames = match parser.push(&chunk) {
            Ok(f) => f,
            Err(_) => {
                let reason = format!(
                    "an event is larger than {} allows ({limit} bytes); dropped the connection",
                    crate::config::setting("max-response-size")
                );
                return (reason, None, connected);
            }
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
                                .and_then(|c| c.subscription_id)
                                .filter(|id| plausible_id(id)),
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
                            .and_then(|c| c.key)
                            .filter(|k| k.len() <= MAX_KEY),
                    },
                },
            };
            if tx.send(event).await.is_err() {
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
