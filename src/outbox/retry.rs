//! Retry timing: exponential backoff with full jitter (AWS architecture blog, "Exponential
//! Backoff And Jitter"): the n-th retry waits a uniform random time in `[0, min(cap, base·2ⁿ⁻¹)]`.
//! Full jitter spreads a burst of failures (a relay that was down) instead of retrying them in
//! lock-step.

use std::time::Duration;

/// The schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First ceiling. Default 3 s.
    pub base: Duration,
    /// Growth per attempt. Default 2.
    pub factor: u32,
    /// Largest ceiling. Default 15 min.
    pub cap: Duration,
    /// Attempts before giving up. Default 12.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(3),
            factor: 2,
            cap: Duration::from_secs(15 * 60),
            max_attempts: 12,
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the wait after `attempts` failed attempts (1 = after the first).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let mult = u64::from(self.factor).checked_pow(exp).unwrap_or(u64::MAX);
        let ms = u64::try_from(self.base.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(mult);
        Duration::from_millis(ms).min(self.cap)
    }

    /// The wait after `attempts` failed attempts, given a uniform random `unit` in `[0, 1)`;
    /// `None` when the attempts are spent.
    pub fn delay(&self, attempts: u32, unit: f64) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Some(self.ceiling(attempts).mul_f64(unit))
    }
}

/// A uniform random number in `[0, 1)` from the system CSPRNG (0.5 if it fails: jitter is a
/// courtesy, not a security property).
pub fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if crate::random::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_from_three_seconds_up_to_fifteen_minutes() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=11).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(secs, vec![3, 6, 12, 24, 48, 96, 192, 384, 768, 900, 900]);
        assert_eq!(p.ceiling(1000), Duration::from_secs(900));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling_and_stop_after_the_budget() {
        let p = RetryPolicy::default();
        for n in 1..p.max_attempts {
            for u in [0.0, 0.25, 0.999, 7.0, f64::NAN] {
                let d = p.delay(n, u).expect("within budget");
                assert!(d <= p.ceiling(n), "{n} {u}");
            }
        }
        assert_eq!(p.delay(1, 0.5), Some(Duration::from_millis(1500)));
        assert_eq!(p.delay(p.max_attempts, 0.5), None);
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
