//! Exponential backoff with full jitter (delay drawn uniformly from `[0, min(max, initial·multiplier^n)]`),
//! so a fleet of agents retrying against one server spreads out instead of arriving in waves.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            multiplier: multiplier.max(1.0),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = self.multiplier.powi(self.attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// Next delay (full jitter), advancing the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Number of delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_jitters_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0);
        let mut ceilings = vec![];
        for _ in 0..6 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c);
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
