//! Coalescing change hints, like consul-template's `wait {min, max}`: reconcile once the stream has been
//! quiet for `min`, but no later than `max` after the first hint of a burst.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Debounce {
    min: Duration,
    max: Duration,
    first: Option<Instant>,
    deadline: Option<Instant>,
}

impl Debounce {
    pub fn new(min: Duration, max: Duration) -> Debounce {
        Debounce {
            min,
            max: max.max(min),
            first: None,
            deadline: None,
        }
    }

    /// A hint arrived at `now`.
    pub fn note(&mut self, now: Instant) {
        let first = *self.first.get_or_insert(now);
        self.deadline = Some((now + self.min).min(first + self.max));
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// True (and reset) when the deadline has passed.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.deadline.is_some_and(|d| d <= now) {
            self.clear();
            true
        } else {
            false
        }
    }

    pub fn clear(&mut self) {
        self.first = None;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_period_and_cap() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debounce::new(ms(250), ms(2000));
        d.note(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(250)));
        d.note(t0 + ms(200));
        assert_eq!(d.deadline(), Some(t0 + ms(450)));
        d.note(t0 + ms(1900));
        assert_eq!(d.deadline(), Some(t0 + ms(2000)), "capped at first + max");
        assert!(!d.take_due(t0 + ms(1999)));
        assert!(d.take_due(t0 + ms(2000)));
        assert_eq!(d.deadline(), None);
    }
}
