//! The event hub and the `GET /sse/subscribe` stream, byte-compatible with sse-starlette.
//!
//! Framing: every line ends with CRLF, an event is `event: TYPE\r\ndata: JSON\r\n\r\n` (never `id:`
//! or `retry:`), comments are `: text\r\n\r\n`. The body is written by hand (axum's `Sse` type uses
//! LF). Delivery reproduces the upstream's losses (see [`super::faults`]): bounded per-subscription
//! queues that drop the newest event when full, per-worker fan-out, and drop-every-N.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::clock;
use super::faults::Faults;
use super::pyjson::{self, Style};

/// A change event, pre-rendered once and shared by every subscriber it reaches.
#[derive(Clone)]
pub struct ChangeEvent {
    key: String,
    environment: String,
    category: Option<String>,
    frame: Bytes,
}

impl ChangeEvent {
    /// `created` (category of the POST body) or `updated` (category of the PUT body, null when the
    /// body had none, even though the stored category is kept).
    pub fn written(
        kind: &str,
        key: &str,
        environment: &str,
        category: Option<&str>,
        value: &Value,
    ) -> Self {
        Self::render(kind, key, environment, category, json!({ "value": value }))
    }

    /// `deleted`: category is always null and so is `data`.
    pub fn deleted(key: &str, environment: &str) -> Self {
        Self::render("deleted", key, environment, None, Value::Null)
    }

    fn render(
        kind: &str,
        key: &str,
        environment: &str,
        category: Option<&str>,
        data: Value,
    ) -> Self {
        let payload = json!({
            "key": key,
            "environment": environment,
            "category": category,
            "timestamp": clock::local_naive(),
            "node_id": null,
            "data": data,
        });
        Self {
            key: key.to_owned(),
            environment: environment.to_owned(),
            category: category.map(str::to_owned),
            frame: event_frame(kind, &payload),
        }
    }
}

/// `event: TYPE\r\ndata: JSON\r\n\r\n`, JSON as Python's `json.dumps` writes it.
fn event_frame(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!(
        "event: {kind}\r\ndata: {}\r\n\r\n",
        pyjson::to_string(data, Style::Dumps)
    ))
}

fn comment_frame(text: &str) -> Bytes {
    Bytes::from(format!(": {text}\r\n\r\n"))
}

/// Subscription filters: exact match, AND-combined, an absent or empty parameter means "any".
/// They are matched against the event's own fields, so (like upstream) a category filter misses
/// `updated` events whose PUT body had no category, and every `deleted` event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Filters {
    pub key: Option<String>,
    pub environment: Option<String>,
    pub category: Option<String>,
}

impl Filters {
    pub fn matches(&self, event: &ChangeEvent) -> bool {
        fn accepts(filter: &Option<String>, field: Option<&str>) -> bool {
            match filter.as_deref() {
                None | Some("") => true,
                Some(wanted) => field == Some(wanted),
            }
        }
        accepts(&self.key, Some(&event.key))
            && accepts(&self.environment, Some(&event.environment))
            && accepts(&self.category, event.category.as_deref())
    }
}

/// How the hub ends a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Normal end of the chunked body (upstream on SIGTERM).
    Close,
    /// The body fails: no terminating chunk, the client sees a broken connection (SIGKILL).
    Cut,
}

struct Subscriber {
    ordinal: u64,
    filters: Filters,
    queue: mpsc::Sender<ChangeEvent>,
    end: oneshot::Sender<End>,
}

/// Counters answered by `GET /_dev/stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub active_subscriptions: u64,
    /// Events fanned out to subscribers (after the drop-every-N fault).
    pub events_published: u64,
    /// Events written to a stream (one per subscriber reached).
    pub events_delivered: u64,
    /// Events lost to drop-every-N (one per event) plus queue overflows (one per subscriber).
    pub events_dropped: u64,
    /// Successful writes (POST, PUT, DELETE); each produces one event.
    pub writes: u64,
}

/// Stream timing.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ping_interval: Duration,
    pub keepalive_after: Duration,
}

/// Fans events out to the open subscriptions.
pub struct Hub {
    faults: Arc<Faults>,
    timing: Timing,
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_subscription: AtomicU64,
    writes: AtomicU64,
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    closing: AtomicBool,
}

impl Hub {
    pub fn new(faults: Arc<Faults>, timing: Timing) -> Self {
        Self {
            faults,
            timing,
            subscribers: Mutex::new(HashMap::new()),
            next_subscription: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    fn subscribers(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the event of one successful write. The write is "handled" by worker
    /// `write_number % workers`; only subscribers on that worker (subscription number
    /// `% workers`) can see it. See [`super::faults::FaultState::workers`].
    pub fn publish(&self, event: ChangeEvent) {
        let write = self.writes.fetch_add(1, Ordering::SeqCst);
        let faults = self.faults.snapshot();
        if faults.drop_every > 0 && (write + 1).is_multiple_of(faults.drop_every) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(write, "drop-every fault: event dropped");
            return;
        }
        self.published.fetch_add(1, Ordering::SeqCst);
        let worker = write % faults.workers;
        let subscribers = self.subscribers();
        for sub in subscribers.values() {
            if sub.ordinal % faults.workers != worker || !sub.filters.matches(&event) {
                continue;
            }
            match sub.queue.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::SeqCst);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Opens a subscription and returns its body stream (starting with the `connected` event), or
    /// `None` when the server is shutting down.
    pub fn subscribe(
        self: &Arc<Self>,
        filters: Filters,
    ) -> Option<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
        if self.closing.load(Ordering::SeqCst) {
            return None;
        }
        let ordinal = self.next_subscription.fetch_add(1, Ordering::SeqCst);
        let capacity = usize::try_from(self.faults.snapshot().queue_size).unwrap_or(usize::MAX);
        let (queue_tx, queue_rx) = mpsc::channel(capacity.max(1));
        let (end_tx, end_rx) = oneshot::channel();
        let connected = event_frame(
            "connected",
            &json!({
                "subscription_id": random_uuid_v4(),
                "filters": &filters,
                "server_time": clock::local_naive(),
            }),
        );
        self.subscribers().insert(
            ordinal,
            Subscriber {
                ordinal,
                filters,
                queue: queue_tx,
                end: end_tx,
            },
        );
        let now = Instant::now();
        let mut ping =
            tokio::time::interval_at(now + self.timing.ping_interval, self.timing.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let stream = SubscriptionStream {
            hub: Arc::clone(self),
            ordinal,
            connected: Some(connected),
            queue: queue_rx,
            end: Some(end_rx),
            paused: self.faults.watch_paused(),
            ping,
            keepalive: Box::pin(tokio::time::sleep_until(now + self.timing.keepalive_after)),
            done: false,
        };
        Some(futures_util::stream::unfold(stream, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Some((chunk, s))
        }))
    }

    /// Ends every open stream (cleanly or abruptly); returns how many.
    fn end_all(&self, how: End) -> usize {
        let subscribers: Vec<Subscriber> = self.subscribers().drain().map(|(_, s)| s).collect();
        let count = subscribers.len();
        for sub in subscribers {
            let _ = sub.end.send(how);
        }
        count
    }

    /// `POST /_dev/streams/close`: end every stream with a clean end of body.
    pub fn close_all(&self) -> usize {
        self.end_all(End::Close)
    }

    /// `POST /_dev/streams/cut`: abort every stream (no terminating chunk).
    pub fn cut_all(&self) -> usize {
        self.end_all(End::Cut)
    }

    /// Server shutdown: refuse new subscriptions, then close every stream cleanly.
    pub fn shut_down(&self) -> usize {
        self.closing.store(true, Ordering::SeqCst);
        self.close_all()
    }

    fn unsubscribe(&self, ordinal: u64) {
        self.subscribers().remove(&ordinal);
    }

    pub fn stats(&self) -> Stats {
        Stats {
            active_subscriptions: self.subscribers().len() as u64,
            events_published: self.published.load(Ordering::SeqCst),
            events_delivered: self.delivered.load(Ordering::SeqCst),
            events_dropped: self.dropped.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
        }
    }
}

/// What woke a stream up.
enum Wake {
    End(Option<End>),
    PauseChanged,
    Event(Option<ChangeEvent>),
    Ping,
    KeepAlive,
}

/// The state of one open stream; it unregisters itself when dropped (client gone).
struct SubscriptionStream {
    hub: Arc<Hub>,
    ordinal: u64,
    connected: Option<Bytes>,
    queue: mpsc::Receiver<ChangeEvent>,
    end: Option<oneshot::Receiver<End>>,
    paused: watch::Receiver<bool>,
    ping: Interval,
    keepalive: Pin<Box<Sleep>>,
    done: bool,
}

impl SubscriptionStream {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        if let Some(connected) = self.connected.take() {
            return Some(Ok(connected));
        }
        loop {
            match self.wake().await {
                Wake::End(how) => {
                    self.end = None;
                    self.done = true;
                    return match how {
                        Some(End::Cut) => Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "stream cut by POST /_dev/streams/cut",
                        ))),
                        // Closed, or the hub let go of us: clean end of body.
                        Some(End::Close) | None => None,
                    };
                }
                Wake::PauseChanged => {}
                Wake::Event(Some(event)) => {
                    self.hub.delivered.fetch_add(1, Ordering::SeqCst);
                    self.reset_keepalive();
                    return Some(Ok(event.frame));
                }
                Wake::Event(None) => {
                    self.done = true;
                    return None;
                }
                Wake::Ping => {
                    return Some(Ok(comment_frame(&format!("ping - {}", clock::utc_ping()))));
                }
                Wake::KeepAlive => {
                    self.reset_keepalive();
                    let text = format!("keep-alive {}", clock::local_naive());
                    return Some(Ok(comment_frame(&text)));
                }
            }
        }
    }

    /// Waits for the next thing that needs the stream's attention; ending wins over everything.
    async fn wake(&mut self) -> Wake {
        let Self {
            end,
            paused,
            queue,
            ping,
            keepalive,
            ..
        } = self;
        let is_paused = *paused.borrow_and_update();
        let end_open = end.is_some();
        tokio::select! {
            biased;
            how = async move {
                match end {
                    Some(rx) => rx.await.ok(),
                    None => None,
                }
            }, if end_open => Wake::End(how),
            changed = paused.changed() => match changed {
                Ok(()) => Wake::PauseChanged,
                // The fault switches are gone: the server is going away.
                Err(_) => Wake::End(None),
            },
            event = queue.recv(), if !is_paused => Wake::Event(event),
            _ = ping.tick() => Wake::Ping,
            () = keepalive.as_mut() => Wake::KeepAlive,
        }
    }

    fn reset_keepalive(&mut self) {
        let deadline = Instant::now() + self.hub.timing.keepalive_after;
        self.keepalive.as_mut().reset(deadline);
    }
}

impl Drop for SubscriptionStream {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.ordinal);
    }
}

/// A random UUID in version-4 format (like Python's `uuid.uuid4()`).
fn random_uuid_v4() -> String {
    let mut bytes: [u8; 16] = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devserver::faults::FaultState;

    fn event(key: &str, env: &str, category: Option<&str>) -> ChangeEvent {
        ChangeEvent::written("updated", key, env, category, &json!(1))
    }

    #[test]
    fn filters_are_exact_and_combined() {
        let all = Filters::default();
        let by_env = Filters {
            environment: Some("prod".into()),
            ..Filters::default()
        };
        let by_cat = Filters {
            category: Some("db".into()),
            ..Filters::default()
        };
        let empty = Filters {
            key: Some(String::new()),
            environment: Some(String::new()),
            category: Some(String::new()),
        };
        let full = Filters {
            key: Some("a".into()),
            environment: Some("prod".into()),
            category: Some("db".into()),
        };
        let with_cat = event("a", "prod", Some("db"));
        let without_cat = event("a", "prod", None);
        let deleted = ChangeEvent::deleted("a", "prod");
        assert!(all.matches(&with_cat) && empty.matches(&deleted));
        assert!(by_env.matches(&deleted) && !by_env.matches(&event("a", "production", None)));
        assert!(by_cat.matches(&with_cat));
        assert!(
            !by_cat.matches(&without_cat),
            "category filter misses PUT without category"
        );
        assert!(!by_cat.matches(&deleted), "category filter misses deletes");
        assert!(full.matches(&with_cat) && !full.matches(&event("b", "prod", Some("db"))));
    }

    #[test]
    fn event_frames_are_python_dumps_with_crlf() {
        let ev = ChangeEvent::written(
            "created",
            "db.url",
            "prod",
            Some("database"),
            &json!({"host": "caf\u{e9}", "port": 5432}),
        );
        let text = String::from_utf8(ev.frame.to_vec()).unwrap();
        let prefix = "event: created\r\ndata: {\"key\": \"db.url\", \"environment\": \"prod\", \"category\": \"database\", \"timestamp\": \"";
        assert!(text.starts_with(prefix), "{text}");
        assert!(
            text.ends_with("\", \"node_id\": null, \"data\": {\"value\": {\"host\": \"caf\\u00e9\", \"port\": 5432}}}\r\n\r\n"),
            "{text}"
        );
        let deleted = String::from_utf8(ChangeEvent::deleted("k", "e").frame.to_vec()).unwrap();
        assert!(
            deleted.contains("\"category\": null")
                && deleted.ends_with("\"node_id\": null, \"data\": null}\r\n\r\n")
        );
    }

    #[test]
    fn uuid_format() {
        let id = random_uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert!(
            matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
    }

    #[tokio::test]
    async fn drop_every_and_stats() {
        let faults = Faults::new(FaultState {
            drop_every: 2,
            workers: 1,
            queue_size: 10,
            paused: false,
            cluster_configs: true,
            unavailable: false,
        })
        .unwrap();
        let hub = Arc::new(Hub::new(
            Arc::new(faults),
            Timing {
                ping_interval: Duration::from_secs(60),
                keepalive_after: Duration::from_secs(60),
            },
        ));
        let stream = hub.subscribe(Filters::default()).unwrap();
        for _ in 0..4 {
            hub.publish(event("a", "prod", None));
        }
        let stats = hub.stats();
        assert_eq!(
            (
                stats.writes,
                stats.events_published,
                stats.events_dropped,
                stats.active_subscriptions
            ),
            (4, 2, 2, 1)
        );
        drop(stream);
        assert_eq!(hub.stats().active_subscriptions, 0);
    }
}
