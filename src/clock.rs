//! Time. Persisted instants are [`UnixTime`] (milliseconds since the Unix epoch, wall clock);
//! sleeps use tokio time. A [`Clock`] is injected everywhere a persisted instant is taken, so
//! tests can jump over long waits with [`ManualClock`] instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// An instant as milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixTime(pub u64);

impl UnixTime {
    /// The instant `d` after this one (saturating).
    pub fn plus(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixTime(self.0.saturating_add(ms))
    }

    /// The instant `d` before this one (saturating at the epoch).
    pub fn minus(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixTime(self.0.saturating_sub(ms))
    }

    /// How long from `self` until `later` (zero if `later` is not later).
    pub fn until(self, later: UnixTime) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }

    /// Whole seconds since the epoch.
    pub fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// RFC 3339 in UTC with second precision, e.g. `2026-11-22T10:10:00Z`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.as_secs();
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }

    /// RFC 5322 date for mail headers, e.g. `Sun, 22 Nov 2026 10:10:00 +0000`.
    pub fn to_rfc5322(self) -> String {
        const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let secs = self.as_secs();
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        let weekday = WEEKDAYS[(days % 7) as usize];
        let month = MONTHS[(m - 1) as usize];
        format!(
            "{weekday}, {d:02} {month} {y:04} {:02}:{:02}:{:02} +0000",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Source of wall-clock time for persisted instants.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> UnixTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        UnixTime(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The system clock plus an offset that tests move forward: time passes as usual (so retry
/// backoffs and leases elapse), and `advance` jumps over long waits such as expiry.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that starts at the system time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        UnixTime(
            SystemClock
                .now()
                .0
                .saturating_add(self.0.load(Ordering::SeqCst)),
        )
    }
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(UnixTime(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        // 2026-11-22T10:10:00Z
        assert_eq!(
            UnixTime(1_795_342_200_000).to_rfc3339(),
            "2026-11-22T10:10:00Z"
        );
        assert_eq!(
            UnixTime(1_795_342_200_000).to_rfc5322(),
            "Sun, 22 Nov 2026 10:10:00 +0000"
        );
        assert_eq!(
            UnixTime(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn manual_clock_jumps_when_advanced() {
        let c = ManualClock::new();
        let a = c.now();
        c.advance(Duration::from_secs(5));
        let d = a.until(c.now());
        assert!(
            d >= Duration::from_secs(5) && d < Duration::from_secs(6),
            "{d:?}"
        );
    }

    #[test]
    fn plus_and_minus_saturate() {
        let t = UnixTime(10_000);
        assert_eq!(
            t.plus(Duration::from_secs(5)).minus(Duration::from_secs(5)),
            t
        );
        assert_eq!(t.minus(Duration::from_secs(11)), UnixTime(0));
        assert_eq!(
            UnixTime(u64::MAX).plus(Duration::from_millis(1)),
            UnixTime(u64::MAX)
        );
    }
}
