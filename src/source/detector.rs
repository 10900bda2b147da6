//! The change detector: notices writes the event stream missed, at a fraction of a list's cost.
//!
//! The upstream server streams each write only to the subscribers of the worker process that handled it
//! (4 workers by default), so one stream hears about a quarter of the writes. Its metadata endpoint,
//! `GET /cluster/configs?environment=E`, reads the shared database without a user key or any key
//! derivation (~3 ms against ~80 ms for a list) and sees every worker's writes. The detector polls it,
//! keeps the set of `(key, category, created_at, updated_at)` of the selected entries, and when that set
//! changes in a way the stream did not announce, asks the live loop for the usual debounced reconcile.
//!
//! Every change the detector finds goes to the live loop, which reconciles unless a list started after
//! the poll's answer already covers it: an announcement by the stream is never a reason to skip (the
//! reconcile it triggered may have run before the write the poll found). Announcements only drive the
//! interval, which adapts (see [`Cadence`]): it starts at `--change-poll-interval` and stays there while
//! the stream is known to miss writes; once the stream has announced [`TRUST_AFTER`] changes in a row,
//! every poll that finds nothing missed doubles it, up to `--change-poll-max`; the first missed change,
//! or a stream reconnect (a new subscription may sit on another worker), drops it back to the minimum.
//!
//! Errors back off like the stream; [`FAILING_AFTER`] failed polls in a row report the detector as not
//! working (the loop then shortens its resync). A 404 before any answer (a server without the route)
//! turns the detector off, said once, and it looks again every [`UNAVAILABLE_RECHECK`]; after the route
//! has answered, a 404 is an error like any other.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::Digests;
use serde_json::value::RawValue;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{Client, EntryMeta};
use crate::backoff::Backoff;
use crate::state::Filter;
use crate::telemetry::Telemetry;
use crate::util::Escaped;

/// Consecutive changes announced by the stream before the interval may grow.
pub const TRUST_AFTER: u32 = 5;

/// How long after a 404 the route is tried again (the server may have been upgraded).
pub const UNAVAILABLE_RECHECK: Duration = Duration::from_secs(600);

/// Failed polls in a row after which the detector counts as not working.
pub const FAILING_AFTER: u32 = 3;

/// Least time between two warnings about failed polls (a flapping server would otherwise fill the log).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long a change the poll found may wait for the stream's own event of the same write before it
/// counts as missed (the stream's event and the database row become visible at nearly the same time).
const ANNOUNCE_GRACE: Duration = Duration::from_millis(100);

/// Most distinct keys remembered from the stream between two polls; beyond it, further announcements
/// are forgotten (their changes then count as missed: the safe side).
const MAX_ANNOUNCED: usize = 10_000;

/// Settings of the detector.
#[derive(Clone, Debug)]
pub struct DetectorOptions {
    /// Shortest interval between polls (`--change-poll-interval`).
    pub min_interval: Duration,
    /// Longest interval between polls (`--change-poll-max`).
    pub max_interval: Duration,
    /// First retry delay after a failed poll; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// The selection (`--include`, `--exclude`, `--category`): changes to other entries are ignored.
    pub filter: Arc<Filter>,
}

/// What the detector tells the live loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectorEvent {
    /// A poll succeeded for the first time, or again after the detector was not working: writes
    /// from the instant `answered` on are noticed (the start reconcile may run).
    Working { answered: Instant },
    /// Entries changed between two polls (the later one answered at `answered`): reconcile, unless a
    /// list started after `answered`. `missed`: the stream had not announced all of them.
    Changed {
        answered: Instant,
        keys: usize,
        missed: bool,
    },
    /// Not working: the server has no `/cluster/configs` (404), the first poll failed, or
    /// [`FAILING_AFTER`] polls failed in a row. The stream and the periodic resync are all there is
    /// until a poll succeeds again.
    NotWorking,
}

/// Keys the event stream announced, recorded by the live loop, read by the detector.
#[derive(Clone, Debug, Default)]
pub struct Announcements(Arc<Mutex<Announced>>);

#[derive(Debug, Default)]
struct Announced {
    keys: BTreeMap<String, Instant>,
    /// The stream (re)connected since the last poll: trust must be earned again.
    reconnected: bool,
}

impl Announcements {
    /// The stream announced a change of `key` now (only `created`, `updated` and `deleted` events
    /// naming a key count: an event without one proves nothing about any key).
    pub fn note(&self, key: &str) {
        let now = Instant::now();
        let mut a = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = a.keys.get_mut(key) {
            *at = now;
        } else if a.keys.len() < MAX_ANNOUNCED {
            a.keys.insert(key.to_owned(), now);
        }
    }

    /// The stream has a new subscription (possibly on another worker of the server).
    pub fn reconnected(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).reconnected = true;
    }

    fn take_reconnected(&self) -> bool {
        std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).reconnected)
    }

    /// How many of `changed` were not announced at or after `since`; forgets announcements older
    /// than `since`.
    fn unannounced(&self, changed: &BTreeSet<String>, since: Instant) -> usize {
        let mut a = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let missed = changed
            .iter()
            .filter(|k| a.keys.get(*k).is_none_or(|t| *t < since))
            .count();
        a.keys.retain(|_, t| *t >= since);
        missed
    }
}

/// What one poll found, for the cadence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Quiet,
    /// Something changed, and the stream had announced all of it.
    Heard,
    /// Something changed that the stream had not announced.
    Missed,
}

/// The adaptive poll interval: the minimum while the stream is known to miss writes (or nothing is
/// known yet); doubling per poll, up to the maximum, once the stream has announced [`TRUST_AFTER`]
/// changes in a row; back to the minimum at the first miss.
#[derive(Clone, Debug)]
pub struct Cadence {
    min: Duration,
    max: Duration,
    current: Duration,
    heard_in_a_row: u32,
}

impl Cadence {
    pub fn new(min: Duration, max: Duration) -> Cadence {
        Cadence {
            min,
            max: max.max(min),
            current: min,
            heard_in_a_row: 0,
        }
    }

    /// The interval before the next poll, after one that found `verdict`.
    pub fn after(&mut self, verdict: Verdict) -> Duration {
        match verdict {
            Verdict::Missed => {
                self.heard_in_a_row = 0;
                self.current = self.min;
            }
            Verdict::Heard | Verdict::Quiet => {
                if verdict == Verdict::Heard {
                    self.heard_in_a_row = self.heard_in_a_row.saturating_add(1);
                }
                if self.heard_in_a_row >= TRUST_AFTER {
                    self.current = (self.current * 2).min(self.max);
                }
            }
        }
        self.current
    }

    pub fn current(&self) -> Duration {
        self.current
    }

    /// Back to the minimum, trust to be earned again (the stream reconnected).
    pub fn reset(&mut self) {
        self.heard_in_a_row = 0;
        self.current = self.min;
    }
}

/// The metadata of the selected entries: key → a 64-bit hash (hex) of its category, `created_at` and
/// `updated_at`. Kept from one poll to the next in one buffer ([`Digests`]), not three strings per key
/// (10,000 keys: 30,000 allocations every poll otherwise). A hash collision can only hide one change
/// from the detector until the next write or resync.
type Fingerprint = Digests;

fn fingerprint(mut rows: Vec<EntryMeta<'_>>, filter: &Filter) -> Fingerprint {
    use std::hash::{Hash, Hasher};
    rows.retain(|r| filter.matches_key(&r.key, r.category.as_deref()));
    // A key listed twice: the last row counts, as in a list (reversed, the stable sort puts it first,
    // and `push` keeps the first).
    rows.reverse();
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    let mut fp = Digests::with_capacity(rows.len());
    for r in &rows {
        let mut h = std::hash::DefaultHasher::new();
        (
            &r.category,
            r.created_at.map(RawValue::get),
            r.updated_at.map(RawValue::get),
        )
            .hash(&mut h);
        fp.push(&r.key, &format!("{:016x}", h.finish()));
    }
    fp.shrink_to_fit();
    fp
}

/// Keys added, removed or with other metadata.
fn changed_keys(old: &Fingerprint, new: &Fingerprint) -> BTreeSet<String> {
    crate::sync::changed_keys(Some(old), new)
        .into_iter()
        .collect()
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// Poll until cancelled (or until `events` is closed).
pub async fn run(
    client: Client,
    environment: String,
    options: DetectorOptions,
    announcements: Announcements,
    events: mpsc::UnboundedSender<DetectorEvent>,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) {
    let mut cadence = Cadence::new(options.min_interval, options.max_interval);
    let mut failures = Backoff::new(options.retry_initial, options.retry_max, 2.0);
    let mut known: Option<Fingerprint> = None;
    // Whether the loop was last told `Working` (false: `NotWorking`, or nothing yet).
    let mut working = false;
    let mut told_unavailable = false;
    let mut last_warning: Option<Instant> = None;
    let mut previous_poll: Option<Instant> = None;
    let mut delay = Duration::ZERO;
    telemetry.set_detector_state("starting", None);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let started = Instant::now();
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.entry_metadata(&environment, |rows| fingerprint(rows, &options.filter)) => r,
        };
        let answered = Instant::now();
        // A poll of many entries reuses the heap's free pages for its response and rows: give them back,
        // or an idle agent's memory stays at its polls' size (README "Footprint").
        let _ = tokio::task::spawn_blocking(crate::util::release_freed_memory).await;
        let polled = match polled {
            // Once the route has answered, a 404 is a failure like any other (a proxy, a rolling
            // deploy), not a server without the route.
            Ok(None) if known.is_some() => Err("the server answered 404 to GET /cluster/configs, \
                                                 which answered before"
                .to_owned()),
            Err(e) => Err(e.to_string()),
            Ok(current) => Ok(current),
        };
        match polled {
            Ok(Some(current)) => {
                failures.reset();
                if told_unavailable {
                    told_unavailable = false;
                    info!("change detector: GET /cluster/configs answers again");
                }
                if announcements.take_reconnected() {
                    cadence.reset();
                }
                let verdict = match &known {
                    None => {
                        debug!(entries = current.len(), "change detector: baseline taken");
                        Verdict::Quiet
                    }
                    Some(old) => {
                        let changed = changed_keys(old, &current);
                        if changed.is_empty() {
                            Verdict::Quiet
                        } else {
                            // The stream's event of the same write may still be on its way.
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(ANNOUNCE_GRACE) => {}
                            }
                            let since = previous_poll
                                .unwrap_or(started)
                                .checked_sub(ANNOUNCE_GRACE)
                                .unwrap_or(started);
                            let missed = announcements.unannounced(&changed, since);
                            telemetry.on_detector_change(missed > 0);
                            debug!(
                                changed = changed.len(),
                                missed, "change detector: entries changed"
                            );
                            let event = DetectorEvent::Changed {
                                answered,
                                keys: changed.len(),
                                missed: missed > 0,
                            };
                            if events.send(event).is_err() {
                                return;
                            }
                            if missed > 0 {
                                Verdict::Missed
                            } else {
                                Verdict::Heard
                            }
                        }
                    }
                };
                if verdict == Verdict::Quiet {
                    // Keep the announcements of this window only.
                    let since = started.checked_sub(ANNOUNCE_GRACE).unwrap_or(started);
                    announcements.unannounced(&BTreeSet::new(), since);
                }
                known = Some(current);
                previous_poll = Some(started);
                if !working {
                    working = true;
                    if events.send(DetectorEvent::Working { answered }).is_err() {
                        return;
                    }
                }
                delay = cadence.after(verdict);
                telemetry.set_detector_state("polling", None);
                telemetry.on_detector_poll("ok", delay);
                delay = jittered(delay);
            }
            Ok(None) => {
                if !told_unavailable {
                    told_unavailable = true;
                    warn!(
                        "change detector unavailable: the server answered 404 to GET /cluster/configs \
                         (an older OpenSecureConf?); changes arrive through the event stream and the \
                         periodic resync only. Asked again every {}s",
                        UNAVAILABLE_RECHECK.as_secs()
                    );
                }
                telemetry.set_detector_state(
                    "unavailable",
                    Some("the server answered 404 to GET /cluster/configs".into()),
                );
                telemetry.on_detector_poll("unavailable", UNAVAILABLE_RECHECK);
                working = false;
                if events.send(DetectorEvent::NotWorking).is_err() {
                    return;
                }
                delay = jittered(UNAVAILABLE_RECHECK);
            }
            Err(reason) => {
                let retry = failures.next_delay();
                let now = Instant::now();
                if last_warning.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                    last_warning = Some(now);
                    warn!(
                        retry_in_ms = retry.as_millis() as u64,
                        "change detector: {}",
                        Escaped(&reason)
                    );
                } else {
                    debug!(
                        retry_in_ms = retry.as_millis() as u64,
                        attempt = failures.attempts(),
                        "change detector: {}",
                        Escaped(&reason)
                    );
                }
                telemetry.set_detector_state("failing", Some(reason));
                telemetry.on_detector_poll("error", retry);
                // Not working: before any answer at once (the start need not wait), later after a
                // few failures in a row (the loop then shortens its resync).
                let report = known.is_none() || (working && failures.attempts() >= FAILING_AFTER);
                if report {
                    working = false;
                    if events.send(DetectorEvent::NotWorking).is_err() {
                        return;
                    }
                }
                delay = retry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, cat: Option<&str>, updated: &str) -> EntryMeta<'static> {
        let raw = |t: &str| {
            let json = serde_json::to_string(t).expect("json");
            &*Box::leak(RawValue::from_string(json).expect("raw"))
        };
        EntryMeta {
            key: key.to_owned().into(),
            category: cat.map(Into::into),
            created_at: Some(raw("2026-11-30 17:22:26.925663")),
            updated_at: Some(raw(updated)),
        }
    }

    fn all() -> Filter {
        Filter::new(&crate::config::Selection::default()).expect("filter")
    }

    #[test]
    fn every_kind_of_metadata_change_is_a_change() {
        let f = all();
        let old = fingerprint(
            vec![
                meta("a", None, "1"),
                meta("b", Some("db"), "1"),
                meta("c", None, "1"),
            ],
            &f,
        );
        let new = fingerprint(
            vec![
                meta("a", None, "2"),          // identical-value PUT: new updated_at
                meta("b", Some("cache"), "1"), // category moved
                meta("d", None, "1"),          // created
            ],
            &f,
        ); // c deleted
        let changed: Vec<String> = changed_keys(&old, &new).into_iter().collect();
        assert_eq!(changed, ["a", "b", "c", "d"]);
        assert!(changed_keys(&new, &new.clone()).is_empty());
    }

    #[test]
    fn a_key_listed_twice_counts_by_its_last_row_like_a_list() {
        let f = all();
        let twice = fingerprint(vec![meta("a", None, "1"), meta("a", None, "2")], &f);
        assert!(changed_keys(&twice, &fingerprint(vec![meta("a", None, "2")], &f)).is_empty());
        assert!(!changed_keys(&twice, &fingerprint(vec![meta("a", None, "1")], &f)).is_empty());
        // Category and timestamps are distinct fields: moving text between them is a change.
        let moved = fingerprint(vec![meta("a", Some("2"), "1")], &f);
        assert!(
            !changed_keys(&moved, &fingerprint(vec![meta("a", Some("1"), "2")], &f)).is_empty()
        );
    }

    #[test]
    fn entries_outside_the_selection_are_ignored() {
        let sel = crate::config::Selection {
            include: vec!["app.*".into()],
            ..Default::default()
        };
        let f = Filter::new(&sel).expect("filter");
        let old = fingerprint(vec![meta("app.x", None, "1"), meta("other", None, "1")], &f);
        let new = fingerprint(vec![meta("app.x", None, "1"), meta("other", None, "2")], &f);
        assert!(changed_keys(&old, &new).is_empty());
    }

    #[test]
    fn the_interval_grows_only_after_the_stream_proved_complete_and_drops_at_a_miss() {
        let (min, max) = (Duration::from_secs(2), Duration::from_secs(30));
        let mut c = Cadence::new(min, max);
        // Nothing known: idle polls stay at the minimum.
        for _ in 0..10 {
            assert_eq!(c.after(Verdict::Quiet), min);
        }
        // A lossy stream (one write in four heard) never earns trust.
        for _ in 0..20 {
            for v in [
                Verdict::Heard,
                Verdict::Missed,
                Verdict::Missed,
                Verdict::Missed,
            ] {
                assert_eq!(c.after(v), min);
            }
        }
        // A complete stream: after TRUST_AFTER heard changes, every poll doubles up to the maximum.
        for _ in 1..TRUST_AFTER {
            assert_eq!(c.after(Verdict::Heard), min);
        }
        assert_eq!(c.after(Verdict::Heard), min * 2);
        assert_eq!(c.after(Verdict::Quiet), min * 4);
        assert_eq!(c.after(Verdict::Quiet), min * 8);
        assert_eq!(
            c.after(Verdict::Quiet),
            max,
            "16 s doubled is over the 30 s maximum"
        );
        assert_eq!(c.after(Verdict::Quiet), max);
        assert_eq!(c.after(Verdict::Heard), max);
        // The first miss: back to the minimum, and trust has to be earned again.
        assert_eq!(c.after(Verdict::Missed), min);
        assert_eq!(c.after(Verdict::Quiet), min);
    }

    #[test]
    fn announcements_count_only_since_the_previous_poll_and_stay_bounded() {
        let a = Announcements::default();
        let t0 = Instant::now();
        a.note("x");
        let changed: BTreeSet<String> = ["x".to_owned(), "y".to_owned()].into();
        assert_eq!(a.unannounced(&changed, t0), 1, "y was not announced");
        // Announced before `since`: does not count, and is forgotten.
        let later = Instant::now() + Duration::from_millis(1);
        assert_eq!(a.unannounced(&changed, later), 2);
        assert!(a.0.lock().expect("lock").keys.is_empty());
        for i in 0..MAX_ANNOUNCED + 10 {
            a.note(&format!("k{i}"));
        }
        assert!(a.0.lock().expect("lock").keys.len() <= MAX_ANNOUNCED);
        // A reconnect is reported once.
        a.reconnected();
        assert!(a.take_reconnected());
        assert!(!a.take_reconnected());
    }
}
