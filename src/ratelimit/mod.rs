//! Request rate limits (DESIGN §8): keyed token buckets per recipient address, recipient domain,
//! end-user IP, app, and for code checks per end-user IP and per verification.
//!
//! Owns the limit specs (`"N/PERIOD"`), their configuration and per-app overrides, key
//! normalization ([`keys`]), the in-memory bucket state and its cleanup, and the
//! `verigate_ratelimit_*` metrics. Does not answer HTTP (the caller turns a [`Decision::Deny`]
//! into `429` with `Retry-After: `[`Decision::retry_after_secs`]) and does not pace the outbox
//! (`delivery.max_per_second` lives there).
//!
//! # What `N/PERIOD` means
//!
//! Each rate is a GCRA token bucket (governor): a burst of `N`, refilled one cell every
//! `PERIOD / N`. `"5/1h"` allows 5 at once, then one more every 12 minutes; over a long run that is
//! 5 per hour, but any one window of an hour can see up to `2N - 1` (the full burst, then the
//! refills). Several rates on one limit (`["1/60s", "5/1h"]`) must all allow.
//!
//! # Consume order
//!
//! governor has no "peek": a check that allows also takes a cell, and there is no refund. So the
//! buckets of a request are checked one after another, the first refusal stops the walk, and the
//! buckets checked before it keep the cell they gave. The order puts the requester's own budgets
//! first and third parties' last, so that a refused request costs its sender rather than its
//! recipient:
//!
//! ```text
//! create:  per_app -> per_client_ip -> per_address -> per_domain
//! resend:                              per_address -> per_domain
//! code:    code_checks_per_client_ip -> code_checks_per_verification
//! ```
//!
//! - A client over its IP budget is refused before any recipient bucket is touched, so spraying
//!   addresses from one IP does not lock those recipients out.
//! - `per_address` precedes `per_domain`: hammering one address (from many IPs) is refused
//!   before it drains the domain budget every other recipient at that domain shares. The price:
//!   a request refused by `per_domain` has spent one `per_address` cell of its recipient.
//! - Within one limit, rates go shortest period first: a quick repeat is refused by `"1/60s"`
//!   without spending the hourly `"5/1h"`; when the hourly bucket refuses, the minute bucket has
//!   lost one cell, which delays that address by at most one short period beyond a longer refusal.
//!
//! # Memory
//!
//! A bucket stores one entry per key: a 64-bit `SipHash` digest of `(app id, normalized key)` under
//! a per-process random key, plus the 8-byte GCRA state, so an attacker-chosen 254-byte address
//! costs the same as a short one. A digest collision makes two keys share one bucket (odds about
//! `n²/2⁶⁵` for `n` keys, and not aimable without the process key): the worst it does is refuse
//! one of them early. An entry leaves only when [`RateLimiter::cleanup`] (run by
//! [`RateLimiter::spawn_cleanup`]) finds it indistinguishable from a fresh bucket: at the first
//! cleanup at least `PERIOD + PERIOD/N` after its last use (less if it used less than the burst).
//!
//! Each bucket holds at most [`LimitsConfig::max_keys`] keys (plus, under a race, one per thread
//! checking at that instant). A request that would add a key to a bucket at the cap is refused
//! with [`LimitName::Capacity`] before any bucket is touched ("fail closed"); keys already
//! tracked keep working, and cleanup makes room again. Evicting instead would let a flood of
//! fresh keys reset the buckets of the keys it pushes out, which turns every limit off for
//! whoever can send enough distinct keys. Measured (`examples/flood.rs`): 24 to 36 bytes of RSS
//! per key, so the default cap bounds a bucket to 2.5 to 3.6 MB and all seven default buckets
//! to about 25 MB.
//!
//! # Keys
//!
//! Every key includes the app id, so apps never share a bucket. Recipients and domains are
//! lower-cased; an IPv6 client counts as its `/64`, see [`keys`].

pub mod keys;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest `N` of an `"N/PERIOD"` spec.
pub const MAX_COUNT: u32 = 1_000_000;
/// Shortest `PERIOD`: the smallest unit is a millisecond, which also keeps `PERIOD / N` at or
/// above governor's 1 ns resolution for every `N` up to [`MAX_COUNT`].
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// Longest `PERIOD`: 30 days. Keys of a bucket live about one period after last use, so a
/// longer period would pin memory for longer than any sane limit needs.
pub const MAX_PERIOD: Duration = Duration::from_secs(30 * SECS_PER_DAY);
/// Default [`LimitsConfig::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Default [`LimitsConfig::cleanup_interval_seconds`].
pub const DEFAULT_CLEANUP_INTERVAL_SECONDS: u64 = 60;
/// Longest cleanup interval: one day. Beyond it idle keys would outlive every period by far.
pub const MAX_CLEANUP_INTERVAL_SECONDS: u64 = SECS_PER_DAY;
/// Cleanup gives a bucket's table memory back only when its capacity exceeds this many times
/// its length, so a steady key count does not shrink and regrow the table every interval.
const SHRINK_WHEN_CAPACITY_EXCEEDS_LEN_TIMES: usize = 4;

const SECS_PER_MINUTE: u64 = 60;
const SECS_PER_HOUR: u64 = 60 * SECS_PER_MINUTE;
const SECS_PER_DAY: u64 = 24 * SECS_PER_HOUR;

/// Result of this module's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a rate limiter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rate is out of bounds (only possible for a [`Rate`] built in code: parsing checks too).
    #[error("{key}: {source}")]
    Rate {
        /// The config key, e.g. `limits.per_address` or `apps.shop.limits.per_address`.
        key: String,
        /// What is wrong with the rate.
        #[source]
        source: InvalidRate,
    },
    /// `max_keys = 0` would refuse every request.
    #[error("limits.max_keys must be at least 1 (default {DEFAULT_MAX_KEYS})")]
    ZeroMaxKeys,
    /// The cleanup interval is outside `1..=MAX_CLEANUP_INTERVAL_SECONDS`.
    #[error(
        "limits.cleanup_interval_seconds is {0}; use 1 to {MAX_CLEANUP_INTERVAL_SECONDS} (default {DEFAULT_CLEANUP_INTERVAL_SECONDS})"
    )]
    CleanupInterval(u64),
    /// Two overrides name the same app.
    #[error("apps.{0}.limits is given twice; merge the two tables")]
    DuplicateApp(String),
    /// The metrics could not be registered (a bug: a duplicate name).
    #[error("rate-limit metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

// === Rate ===

/// One limit spec `"N/PERIOD"`: at most `count` per `period` on average, in bursts of up to
/// `count` (see the module docs for the exact token-bucket meaning).
///
/// Parsed strictly from `N/PERIOD`, `N` in `1..=1_000_000`, `PERIOD` a whole number followed
/// by one unit of `ms`, `s`, `m`, `h`, `d`, from 1 ms to 30 days: `"1/60s"`, `"5/1h"`,
/// `"2000/1s"`. No spaces, signs or fractions. Serializes to the same form, written in the largest
/// unit that divides the period exactly (`"1/60s"` comes back as `"1/1m"`, an equal `Rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// `N`: cells per period, and the burst size.
    pub count: NonZeroU32,
    /// `PERIOD`.
    pub period: Duration,
}

/// Why a string is not an `N/PERIOD` rate; the message names the spec and shows the form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {spec:?}: {reason}; write N/PERIOD such as \"5/1h\", N from 1 to 1000000, PERIOD a whole number of ms, s, m, h or d from 1ms to 30d"
)]
pub struct InvalidRate {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Units of a period, largest first (the order [`Rate`]'s `Display` tries them in).
const UNITS: [(&str, Duration); 5] = [
    ("d", Duration::from_secs(SECS_PER_DAY)),
    ("h", Duration::from_secs(SECS_PER_HOUR)),
    ("m", Duration::from_secs(SECS_PER_MINUTE)),
    ("s", Duration::from_secs(1)),
    ("ms", Duration::from_millis(1)),
];

impl Rate {
    /// A rate of `count` per `period`; [`RateLimiter`] constructors check the bounds.
    #[must_use]
    pub const fn new(count: NonZeroU32, period: Duration) -> Self {
        Self { count, period }
    }

    /// Checks the bounds and converts to a governor quota.
    fn quota(&self) -> Result<Quota, InvalidRate> {
        let invalid = |reason: String| InvalidRate {
            spec: self.to_string(),
            reason,
        };
        if self.count.get() > MAX_COUNT {
            return Err(invalid(format!("N is above {MAX_COUNT}")));
        }
        if self.period < MIN_PERIOD || self.period > MAX_PERIOD {
            return Err(invalid("PERIOD is outside 1ms..=30d".into()));
        }
        if !self
            .period
            .subsec_nanos()
            .is_multiple_of(MIN_PERIOD.subsec_nanos())
        {
            return Err(invalid(
                "PERIOD is not a whole number of milliseconds".into(),
            ));
        }
        Quota::with_period(self.period / self.count.get())
            .map(|q| q.allow_burst(self.count))
            .ok_or_else(|| invalid("PERIOD / N is zero".into()))
    }
}

/// The largest unit dividing `period` exactly, with its multiple.
fn whole_units(period: Duration) -> Option<(u128, &'static str)> {
    let nanos = period.as_nanos();
    UNITS.iter().find_map(|&(name, unit)| {
        let unit = unit.as_nanos();
        (nanos != 0 && nanos.is_multiple_of(unit)).then_some((nanos / unit, name))
    })
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match whole_units(self.period) {
            Some((amount, unit)) => write!(f, "{}/{amount}{unit}", self.count),
            // Only for rates built in code with an odd period; shows up in errors, never in
            // a valid config.
            None => write!(f, "{}/{:?}", self.count, self.period),
        }
    }
}

impl FromStr for Rate {
    type Err = InvalidRate;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| InvalidRate {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (count, period) = spec
            .split_once('/')
            .ok_or_else(|| invalid("missing \"/\""))?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("N must be a whole number"));
        }
        let count = count
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_COUNT)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| invalid("N must be from 1 to 1000000"))?;
        let digits = period.bytes().take_while(u8::is_ascii_digit).count();
        let (amount, unit) = period.split_at(digits);
        if amount.is_empty() {
            return Err(invalid("PERIOD must start with a whole number"));
        }
        // All digits, so a parse error can only be an overflow.
        let amount = amount
            .parse::<u32>()
            .map_err(|_| invalid("PERIOD must be at most 30d"))?;
        if amount == 0 {
            return Err(invalid("PERIOD must be at least 1 unit"));
        }
        let unit = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, unit)| unit)
            .ok_or_else(|| invalid("PERIOD unit must be one of ms, s, m, h, d"))?;
        let period = unit
            .checked_mul(amount)
            .filter(|p| *p <= MAX_PERIOD)
            .ok_or_else(|| invalid("PERIOD must be at most 30d"))?;
        Ok(Self { count, period })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(deserializer)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}

/// A default rate; evaluated at compile time, so a zero count fails the build.
const fn rate(count: u32, period: Duration) -> Rate {
    match NonZeroU32::new(count) {
        Some(count) => Rate::new(count, period),
        None => panic!("a default rate has a zero count"),
    }
}

const DEFAULT_PER_ADDRESS: [Rate; 2] = [
    rate(1, Duration::from_secs(60)),
    rate(5, Duration::from_secs(SECS_PER_HOUR)),
];
const DEFAULT_PER_DOMAIN: [Rate; 1] = [rate(600, Duration::from_secs(SECS_PER_MINUTE))];
const DEFAULT_PER_CLIENT_IP: [Rate; 1] = [rate(20, Duration::from_secs(SECS_PER_MINUTE))];
const DEFAULT_PER_APP: [Rate; 1] = [rate(2000, Duration::from_secs(1))];
const DEFAULT_CODE_CHECKS_PER_CLIENT_IP: [Rate; 1] =
    [rate(30, Duration::from_secs(SECS_PER_MINUTE))];
const DEFAULT_CODE_CHECKS_PER_VERIFICATION: [Rate; 1] =
    [rate(10, Duration::from_secs(SECS_PER_MINUTE))];

// === Config ===

/// The `[limits]` table (DESIGN §8). Each limit is a list of rates that must all allow; an empty
/// list turns that limit off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Creates and resends to one recipient address (per app). Default `["1/60s", "5/1h"]`:
    /// a person gets at most one mail a minute and a handful an hour, whatever the app asks.
    pub per_address: Vec<Rate>,
    /// Creates and resends to one recipient domain (per app). Default `["600/1m"]`: keeps one
    /// app from looking like a spam run to a single mailbox provider.
    pub per_domain: Vec<Rate>,
    /// Creates from one end-user IP (per app, when the app passes `client_ip`; IPv6 by `/64`).
    /// Default `["20/1m"]`.
    pub per_client_ip: Vec<Rate>,
    /// All creates of one app. Default `["2000/1s"]`: a ceiling for a leaked API key.
    pub per_app: Vec<Rate>,
    /// Code checks from one end-user IP (per app), across verifications. Default `["30/1m"]`:
    /// bounds guessing spread over many verifications.
    pub code_checks_per_client_ip: Vec<Rate>,
    /// Code checks on one verification. Default `["10/1m"]`: the attempt budget already bounds
    /// guesses; this bounds hammering (and store reads) on one verification, and stays above any
    /// sane attempt budget so a person retyping a code is never the one refused.
    pub code_checks_per_verification: Vec<Rate>,
    /// Most keys one bucket (one rate of one limit) tracks. Default 100000, 2.5 to 3.6 MB of
    /// memory per bucket at the cap. A request that would add a key to a full bucket is refused
    /// as `capacity`; see the module docs.
    pub max_keys: usize,
    /// Seconds between cleanups that drop idle keys, 1 to 86400. Default 60.
    pub cleanup_interval_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_address: DEFAULT_PER_ADDRESS.to_vec(),
            per_domain: DEFAULT_PER_DOMAIN.to_vec(),
            per_client_ip: DEFAULT_PER_CLIENT_IP.to_vec(),
            per_app: DEFAULT_PER_APP.to_vec(),
            code_checks_per_client_ip: DEFAULT_CODE_CHECKS_PER_CLIENT_IP.to_vec(),
            code_checks_per_verification: DEFAULT_CODE_CHECKS_PER_VERIFICATION.to_vec(),
            max_keys: DEFAULT_MAX_KEYS,
            cleanup_interval_seconds: DEFAULT_CLEANUP_INTERVAL_SECONDS,
        }
    }
}

/// An app's `[apps.limits]` table: each given limit replaces the `[limits]` one for that app
/// only (an empty list turns it off for that app); a missing one keeps the default. `max_keys`
/// and `cleanup_interval_seconds` are daemon-wide and cannot be overridden.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsOverride {
    /// Replaces [`LimitsConfig::per_address`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_address: Option<Vec<Rate>>,
    /// Replaces [`LimitsConfig::per_domain`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_domain: Option<Vec<Rate>>,
    /// Replaces [`LimitsConfig::per_client_ip`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_client_ip: Option<Vec<Rate>>,
    /// Replaces [`LimitsConfig::per_app`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_app: Option<Vec<Rate>>,
    /// Replaces [`LimitsConfig::code_checks_per_client_ip`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_checks_per_client_ip: Option<Vec<Rate>>,
    /// Replaces [`LimitsConfig::code_checks_per_verification`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_checks_per_verification: Option<Vec<Rate>>,
}

// === Decision ===

/// Which limit said no: a metrics label and part of the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitName {
    /// [`LimitsConfig::per_address`].
    PerAddress,
    /// [`LimitsConfig::per_domain`].
    PerDomain,
    /// [`LimitsConfig::per_client_ip`].
    PerClientIp,
    /// [`LimitsConfig::per_app`].
    PerApp,
    /// [`LimitsConfig::code_checks_per_client_ip`].
    CodeChecksPerClientIp,
    /// [`LimitsConfig::code_checks_per_verification`].
    CodeChecksPerVerification,
    /// A bucket is at [`LimitsConfig::max_keys`] and this request would add a key.
    Capacity,
}

impl LimitName {
    /// Every name, in metrics label order.
    pub const ALL: [Self; 7] = [
        Self::PerAddress,
        Self::PerDomain,
        Self::PerClientIp,
        Self::PerApp,
        Self::CodeChecksPerClientIp,
        Self::CodeChecksPerVerification,
        Self::Capacity,
    ];

    /// The config key and metrics label: `"per_address"`, …, `"capacity"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PerAddress => "per_address",
            Self::PerDomain => "per_domain",
            Self::PerClientIp => "per_client_ip",
            Self::PerApp => "per_app",
            Self::CodeChecksPerClientIp => "code_checks_per_client_ip",
            Self::CodeChecksPerVerification => "code_checks_per_verification",
            Self::Capacity => "capacity",
        }
    }
}

impl fmt::Display for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a Deny must be answered with 429 and Retry-After"]
pub enum Decision {
    /// Go ahead; one cell was taken from every bucket of the request.
    Allow,
    /// Refuse with `429`.
    Deny {
        /// The limit that refused.
        limit: LimitName,
        /// The earliest time the same request could pass that limit (other limits may still
        /// refuse then). For [`LimitName::Capacity`], the cleanup interval.
        retry_after: Duration,
    },
}

impl Decision {
    /// Whether the request may go ahead.
    #[must_use]
    pub const fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow)
    }

    /// The `Retry-After` header value: whole seconds rounded up (at least 1), or `None` for
    /// [`Decision::Allow`].
    #[must_use]
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Allow => None,
            Self::Deny { retry_after, .. } => Some(
                retry_after
                    .as_secs()
                    .saturating_add(u64::from(retry_after.subsec_nanos() > 0))
                    .max(1),
            ),
        }
    }
}

// === Metrics ===

/// `ratelimit_rejections_total{limit}` and `ratelimit_tracked_keys`, registered without the
/// `verigate_` prefix (the daemon's registry adds it).
#[derive(Debug, Clone)]
pub struct RateLimitMetrics {
    /// Refused requests by [`LimitName`].
    rejections: IntCounterVec,
    /// Keys held in all buckets, refreshed by every cleanup.
    tracked_keys: IntGauge,
}

impl RateLimitMetrics {
    /// Creates the metrics, registers them in `registry` and pre-sets every `limit` label to 0.
    ///
    /// # Errors
    /// A metric of the same name is already registered (a bug).
    pub fn register(registry: &Registry) -> Result<Self> {
        let rejections = IntCounterVec::new(
            Opts::new(
                "ratelimit_rejections_total",
                "Requests refused by a rate limit, by limit",
            ),
            &["limit"],
        )?;
        let tracked_keys = IntGauge::new(
            "ratelimit_tracked_keys",
            "Keys held by all rate-limit buckets at the last cleanup",
        )?;
        for name in LimitName::ALL {
            rejections.get_metric_with_label_values(&[name.as_str()])?;
        }
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(tracked_keys.clone()))?;
        Ok(Self {
            rejections,
            tracked_keys,
        })
    }

    fn rejected(&self, limit: LimitName) {
        self.rejections.with_label_values(&[limit.as_str()]).inc();
    }
}

// === KeyStore ===

/// A governor state store: key digest → GCRA state, with an O(1) length for the cap check.
///
/// Replaces governor's `DashMapStateStore` only to count insertions (its `len()` locks every
/// shard) and to expose `contains`; the GCRA state itself is governor's [`InMemoryState`].
#[derive(Clone, Default)]
struct KeyStore(Arc<KeyMap>);

#[derive(Default)]
struct KeyMap {
    map: DashMap<u64, InMemoryState, PrehashedBuilder>,
    /// Entries in `map`; changed under the shard lock that inserts or removes.
    len: AtomicUsize,
}

impl KeyStore {
    fn contains(&self, key: u64) -> bool {
        self.0.map.contains_key(&key)
    }

    /// The GCRA "theoretical arrival time" of a state, without changing it.
    fn tat(state: &InMemoryState) -> Option<Nanos> {
        state
            .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
            .err()
            .flatten()
    }
}

impl StateStore for KeyStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.0.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = self.0.map.entry(*key).or_insert_with(|| {
            self.0.len.fetch_add(1, Ordering::Relaxed);
            InMemoryState::default()
        });
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyStore {
    /// Same rule as governor's own stores: drop a key once its bucket is full again.
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.map.retain(|_, state| {
            let keep = Self::tat(state).is_some_and(|tat| tat > drop_below);
            if !keep {
                self.0.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        let map = &self.0.map;
        if map.capacity()
            > map
                .len()
                .saturating_mul(SHRINK_WHEN_CAPACITY_EXCEEDS_LEN_TIMES)
        {
            map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hashes the `u64` digests a [`KeyStore`] holds by taking them as they are: they are already
/// keyed `SipHash` output, so hashing them again would only cost time.
#[derive(Clone, Copy, Default)]
struct PrehashedBuilder;

#[derive(Default)]
struct PrehashedHasher(u64);

impl BuildHasher for PrehashedBuilder {
    type Hasher = PrehashedHasher;

    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher::default()
    }
}

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Not reached (keys are `u64`); folds bytes in so that it would still spread them.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

// === Limits ===

type Keyed<C> = governor::RateLimiter<u64, KeyStore, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One rate of one limit: a governor keyed limiter over its own [`KeyStore`].
struct Bucket<C: Clock> {
    store: KeyStore,
    limiter: Keyed<C>,
}

impl<C: Clock> Bucket<C> {
    /// Whether `key` would be a new key in a bucket already at the cap.
    fn is_full_for(&self, key: u64, max_keys: usize) -> bool {
        self.store.len() >= max_keys && !self.store.contains(key)
    }

    /// Takes a cell for `key`, or says how long until one is free.
    fn take(&self, key: u64) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// One configured limit: its rates, shortest period first. No buckets means off.
struct Limit<C: Clock> {
    name: LimitName,
    buckets: Vec<Bucket<C>>,
}

impl<C: Clock + Clone> Limit<C> {
    fn build(name: LimitName, key: &str, rates: &[Rate], clock: &C) -> Result<Arc<Self>> {
        let mut rates = rates.to_vec();
        rates.sort_by_key(|r| r.period);
        let buckets = rates
            .iter()
            .map(|rate| {
                let quota = rate.quota().map_err(|source| Error::Rate {
                    key: key.to_owned(),
                    source,
                })?;
                let store = KeyStore::default();
                let limiter = governor::RateLimiter::new(quota, store.clone(), clock.clone());
                Ok(Bucket { store, limiter })
            })
            .collect::<Result<_>>()?;
        Ok(Arc::new(Self { name, buckets }))
    }
}

impl<C: Clock> Limit<C> {
    fn is_off(&self) -> bool {
        self.buckets.is_empty()
    }

    fn tracked_keys(&self) -> usize {
        self.buckets.iter().map(|b| b.store.len()).sum()
    }
}

/// The limits that apply to one app.
struct LimitSet<C: Clock> {
    per_address: Arc<Limit<C>>,
    per_domain: Arc<Limit<C>>,
    per_client_ip: Arc<Limit<C>>,
    per_app: Arc<Limit<C>>,
    code_checks_per_client_ip: Arc<Limit<C>>,
    code_checks_per_verification: Arc<Limit<C>>,
}

impl<C: Clock + Clone> LimitSet<C> {
    /// Builds the default set (`base` = `None`) or an app's set, sharing every limit the
    /// override leaves alone with `base`. New limits are pushed onto `all`.
    fn build(
        rates: [Option<&[Rate]>; 6],
        base: Option<&Self>,
        prefix: &str,
        clock: &C,
        all: &mut Vec<Arc<Limit<C>>>,
    ) -> Result<Self> {
        let [addr, domain, ip, app, code_ip, code_v] = rates;
        let mut one = |name: LimitName,
                       given: Option<&[Rate]>,
                       inherited: Option<&Arc<Limit<C>>>|
         -> Result<Arc<Limit<C>>> {
            match (given, inherited) {
                (None, Some(limit)) => Ok(Arc::clone(limit)),
                (given, _) => {
                    let key = format!("{prefix}limits.{name}");
                    let limit = Limit::build(name, &key, given.unwrap_or_default(), clock)?;
                    all.push(Arc::clone(&limit));
                    Ok(limit)
                }
            }
        };
        Ok(Self {
            per_address: one(LimitName::PerAddress, addr, base.map(|b| &b.per_address))?,
            per_domain: one(LimitName::PerDomain, domain, base.map(|b| &b.per_domain))?,
            per_client_ip: one(LimitName::PerClientIp, ip, base.map(|b| &b.per_client_ip))?,
            per_app: one(LimitName::PerApp, app, base.map(|b| &b.per_app))?,
            code_checks_per_client_ip: one(
                LimitName::CodeChecksPerClientIp,
                code_ip,
                base.map(|b| &b.code_checks_per_client_ip),
            )?,
            code_checks_per_verification: one(
                LimitName::CodeChecksPerVerification,
                code_v,
                base.map(|b| &b.code_checks_per_verification),
            )?,
        })
    }
}

// === RateLimiter ===

/// All rate limits of the daemon. Cheap to clone (one `Arc`); generic over governor's clock
/// so tests drive time with [`governor::clock::FakeRelativeClock`].
pub struct RateLimiter<C: Clock = DefaultClock>(Arc<Inner<C>>);

struct Inner<C: Clock> {
    defaults: LimitSet<C>,
    apps: HashMap<Box<str>, LimitSet<C>>,
    /// Every distinct limit once, for cleanup and counting.
    all: Vec<Arc<Limit<C>>>,
    /// Keys the digests; random per process, so collisions cannot be aimed.
    hasher: RandomState,
    max_keys: usize,
    cleanup_interval: Duration,
    metrics: RateLimitMetrics,
}

impl<C: Clock> Clone for RateLimiter<C> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("apps_with_overrides", &self.0.apps.len())
            .field("tracked_keys", &self.tracked_keys())
            .finish_non_exhaustive()
    }
}

impl RateLimiter<DefaultClock> {
    /// Builds the limits of `cfg` for every app alike.
    ///
    /// # Errors
    /// A rate out of bounds, `max_keys = 0`, or a cleanup interval outside 1 s..=1 day.
    pub fn new(cfg: &LimitsConfig, metrics: RateLimitMetrics) -> Result<Self> {
        Self::with_overrides(cfg, std::iter::empty(), metrics)
    }

    /// Builds the limits of `cfg`, with `(app id, override)` pairs for apps that carry their own
    /// `[apps.limits]` table.
    ///
    /// # Errors
    /// As [`RateLimiter::new`], or an app named twice.
    pub fn with_overrides<'a>(
        cfg: &LimitsConfig,
        overrides: impl IntoIterator<Item = (&'a str, &'a LimitsOverride)>,
        metrics: RateLimitMetrics,
    ) -> Result<Self> {
        Self::with_clock(cfg, overrides, metrics, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    /// As [`RateLimiter::with_overrides`], on the given clock (a `FakeRelativeClock` in tests;
    /// its clones share one time).
    ///
    /// # Errors
    /// As [`RateLimiter::with_overrides`].
    pub fn with_clock<'a>(
        cfg: &LimitsConfig,
        overrides: impl IntoIterator<Item = (&'a str, &'a LimitsOverride)>,
        metrics: RateLimitMetrics,
        clock: C,
    ) -> Result<Self> {
        if cfg.max_keys == 0 {
            return Err(Error::ZeroMaxKeys);
        }
        if !(1..=MAX_CLEANUP_INTERVAL_SECONDS).contains(&cfg.cleanup_interval_seconds) {
            return Err(Error::CleanupInterval(cfg.cleanup_interval_seconds));
        }
        let mut all = Vec::new();
        let defaults = LimitSet::build(
            [
                Some(&cfg.per_address[..]),
                Some(&cfg.per_domain[..]),
                Some(&cfg.per_client_ip[..]),
                Some(&cfg.per_app[..]),
                Some(&cfg.code_checks_per_client_ip[..]),
                Some(&cfg.code_checks_per_verification[..]),
            ],
            None,
            "",
            &clock,
            &mut all,
        )?;
        let mut apps = HashMap::new();
        for (app, ov) in overrides {
            let set = LimitSet::build(
                [
                    ov.per_address.as_deref(),
                    ov.per_domain.as_deref(),
                    ov.per_client_ip.as_deref(),
                    ov.per_app.as_deref(),
                    ov.code_checks_per_client_ip.as_deref(),
                    ov.code_checks_per_verification.as_deref(),
                ],
                Some(&defaults),
                &format!("apps.{app}."),
                &clock,
                &mut all,
            )?;
            match apps.entry(Box::<str>::from(app)) {
                Entry::Occupied(_) => return Err(Error::DuplicateApp(app.to_owned())),
                Entry::Vacant(v) => {
                    v.insert(set);
                }
            }
        }
        Ok(Self(Arc::new(Inner {
            defaults,
            apps,
            all,
            hasher: RandomState::new(),
            max_keys: cfg.max_keys,
            cleanup_interval: Duration::from_secs(cfg.cleanup_interval_seconds),
            metrics,
        })))
    }
}

/// One limit of a request with the request's key in it; `None` when the limit is off or does
/// not apply (no client IP).
type Step<'a, C> = Option<(&'a Limit<C>, u64)>;

/// Refusal: the limit and how long until the same request could pass it.
type Refused = (LimitName, Duration);

impl<C: Clock> Limit<C> {
    /// This limit with its key, hashing only when the limit is on.
    fn step(&self, key: impl FnOnce() -> u64) -> Step<'_, C> {
        (!self.is_off()).then(|| (self, key()))
    }
}

impl<C: Clock> RateLimiter<C> {
    /// Checks a create: `per_app`, `per_client_ip` (when given), `per_address`, `per_domain`, in
    /// that order (see "Consume order" in the module docs).
    ///
    /// `email_key` is the recipient address, `domain` its ASCII domain; both are normalized
    /// here ([`keys`]).
    pub fn check_create(
        &self,
        app: &str,
        email_key: &str,
        domain: &str,
        client_ip: Option<IpAddr>,
    ) -> Decision {
        let set = self.set_for(app);
        let h = &self.0.hasher;
        let [per_address, per_domain] = self.recipient_steps(set, app, email_key, domain);
        self.decide(&[
            set.per_app.step(|| h.hash_one(app)),
            client_ip.and_then(|ip| {
                set.per_client_ip
                    .step(|| h.hash_one((app, keys::client_ip_key(ip))))
            }),
            per_address,
            per_domain,
        ])
    }

    /// Checks a resend: `per_address` then `per_domain`, the same buckets creates use.
    /// `per_app` counts creates only (DESIGN §8), and a resend has no end-user IP.
    pub fn check_resend(&self, app: &str, email_key: &str, domain: &str) -> Decision {
        let set = self.set_for(app);
        self.decide(&self.recipient_steps(set, app, email_key, domain))
    }

    /// Checks a code check: `code_checks_per_client_ip` (when given), then
    /// `code_checks_per_verification`.
    ///
    /// Call it once the verification is known to exist for this app, so that made-up ids do
    /// not add keys.
    pub fn check_code(
        &self,
        app: &str,
        verification_id: &str,
        client_ip: Option<IpAddr>,
    ) -> Decision {
        let set = self.set_for(app);
        let h = &self.0.hasher;
        self.decide(&[
            client_ip.and_then(|ip| {
                set.code_checks_per_client_ip
                    .step(|| h.hash_one((app, keys::client_ip_key(ip))))
            }),
            set.code_checks_per_verification
                .step(|| h.hash_one((app, verification_id))),
        ])
    }

    /// Drops every key whose bucket is full again, gives back table memory after a flood, and
    /// refreshes the `ratelimit_tracked_keys` gauge. [`RateLimiter::spawn_cleanup`] calls it
    /// every `cleanup_interval_seconds`.
    pub fn cleanup(&self) {
        for bucket in self.0.all.iter().flat_map(|l| &l.buckets) {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
        self.0
            .metrics
            .tracked_keys
            .set(i64::try_from(self.tracked_keys()).unwrap_or(i64::MAX));
    }

    /// Keys held by all buckets together.
    #[must_use]
    pub fn tracked_keys(&self) -> usize {
        self.0.all.iter().map(|l| l.tracked_keys()).sum()
    }

    fn set_for(&self, app: &str) -> &LimitSet<C> {
        if self.0.apps.is_empty() {
            return &self.0.defaults;
        }
        self.0.apps.get(app).unwrap_or(&self.0.defaults)
    }

    fn recipient_steps<'s>(
        &self,
        set: &'s LimitSet<C>,
        app: &str,
        email_key: &str,
        domain: &str,
    ) -> [Step<'s, C>; 2] {
        let h = &self.0.hasher;
        [
            set.per_address
                .step(|| h.hash_one((app, &*keys::email_key(email_key)))),
            set.per_domain
                .step(|| h.hash_one((app, &*keys::domain_key(domain)))),
        ]
    }

    /// Runs the steps of one request and counts a refusal.
    fn decide(&self, steps: &[Step<'_, C>]) -> Decision {
        match self.walk(steps) {
            Ok(()) => Decision::Allow,
            Err((limit, retry_after)) => {
                self.0.metrics.rejected(limit);
                Decision::Deny { limit, retry_after }
            }
        }
    }

    /// First refuses, without taking anything, if a bucket at the cap would have to add a key;
    /// then takes a cell from every bucket in order, stopping at the first that has none.
    fn walk(&self, steps: &[Step<'_, C>]) -> Result<(), Refused> {
        let max_keys = self.0.max_keys;
        let full = steps
            .iter()
            .flatten()
            .any(|(limit, key)| limit.buckets.iter().any(|b| b.is_full_for(*key, max_keys)));
        if full {
            return Err((LimitName::Capacity, self.0.cleanup_interval));
        }
        for (limit, key) in steps.iter().flatten() {
            for bucket in &limit.buckets {
                bucket.take(*key).map_err(|wait| (limit.name, wait))?;
            }
        }
        Ok(())
    }
}

impl<C> RateLimiter<C>
where
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Spawns the task that runs [`RateLimiter::cleanup`] every `cleanup_interval_seconds`
    /// until `shutdown` turns `true` or its sender is dropped.
    ///
    /// A cleanup walks every key, 1 to 2 ms per 100 000 keys (measured with
    /// `examples/flood.rs`; about 15 ms for the 700 000 keys of seven full default buckets),
    /// short enough to run on the runtime rather than in `spawn_blocking`.
    pub fn spawn_cleanup(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = self.clone();
        let every = this.0.cleanup_interval;
        tokio::spawn(async move {
            if *shutdown.borrow_and_update() {
                return;
            }
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => this.cleanup(),
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow_and_update() {
                            return;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(SECS_PER_MINUTE);
    const HOUR: Duration = Duration::from_secs(SECS_PER_HOUR);

    fn rates(specs: &[&str]) -> Vec<Rate> {
        specs
            .iter()
            .map(|s| s.parse().expect("test spec is valid"))
            .collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("test literal is an IP address"))
    }

    /// Every limit off: tests turn on the ones they are about.
    fn all_off() -> LimitsConfig {
        LimitsConfig {
            per_address: vec![],
            per_domain: vec![],
            per_client_ip: vec![],
            per_app: vec![],
            code_checks_per_client_ip: vec![],
            code_checks_per_verification: vec![],
            ..LimitsConfig::default()
        }
    }

    fn build(
        cfg: &LimitsConfig,
        overrides: &[(&str, LimitsOverride)],
    ) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock, Registry) {
        let registry = Registry::new();
        let metrics = RateLimitMetrics::register(&registry).expect("fresh registry");
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(
            cfg,
            overrides.iter().map(|(app, ov)| (*app, ov)),
            metrics,
            clock.clone(),
        )
        .expect("valid limits");
        (limiter, clock, registry)
    }

    fn denied_by(d: Decision) -> Option<LimitName> {
        match d {
            Decision::Allow => None,
            Decision::Deny { limit, .. } => Some(limit),
        }
    }

    fn rejections(registry: &Registry, limit: LimitName) -> Option<u64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "ratelimit_rejections_total")
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == limit.as_str()))
            .map(|m| m.get_counter().get_value() as u64)
    }

    // --- parsing ---

    #[test]
    fn documented_specs_parse() {
        let cases = [
            ("1/60s", 1, Duration::from_secs(60)),
            ("5/1h", 5, HOUR),
            ("600/1m", 600, MINUTE),
            ("2000/1s", 2000, Duration::from_secs(1)),
            ("1/1d", 1, Duration::from_secs(SECS_PER_DAY)),
            ("2/500ms", 2, Duration::from_millis(500)),
            ("1000000/1ms", 1_000_000, Duration::from_millis(1)),
            ("1/30d", 1, MAX_PERIOD),
        ];
        for (spec, count, period) in cases {
            let rate: Rate = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(rate.count.get(), count, "{spec}");
            assert_eq!(rate.period, period, "{spec}");
            assert!(rate.quota().is_ok(), "{spec}");
        }
    }

    #[test]
    fn malformed_specs_are_rejected_with_a_message_naming_the_spec() {
        let cases = [
            "0/1m",
            "1/0s",
            "x/1m",
            "1/1y",
            "1/",
            "",
            "1/m",
            "/1m",
            "1//1m",
            " 1/1m",
            "1/1m ",
            "+1/1m",
            "-1/1m",
            "1/1.5s",
            "1.5/1m",
            "01/1M",
            "1000001/1m",
            "4294967296/1m",
            "1/31d",
            "1/99999999999d",
            "1/1sec",
        ];
        for spec in cases {
            let err = spec
                .parse::<Rate>()
                .expect_err(&format!("{spec:?} should be rejected"));
            let message = err.to_string();
            assert!(
                message.contains(&format!("{spec:?}")),
                "{spec:?}: message does not name the spec: {message}"
            );
            assert_eq!(err.spec, spec);
        }
    }

    #[test]
    fn rates_print_in_the_largest_exact_unit_and_parse_back_equal() {
        let cases = [
            ("1/60s", "1/1m"),
            ("5/1h", "5/1h"),
            ("600/1m", "600/1m"),
            ("2/90s", "2/90s"),
            ("3/1500ms", "3/1500ms"),
            ("1/24h", "1/1d"),
        ];
        for (spec, shown) in cases {
            let rate: Rate = spec.parse().expect("valid");
            assert_eq!(rate.to_string(), shown, "{spec}");
            assert_eq!(shown.parse::<Rate>(), Ok(rate), "{spec}");
        }
    }

    #[test]
    fn a_rate_built_in_code_out_of_bounds_is_refused_naming_its_config_key() {
        let zero_period = Rate::new(NonZeroU32::MIN, Duration::ZERO);
        let cfg = LimitsConfig {
            per_domain: vec![zero_period],
            ..LimitsConfig::default()
        };
        let err = RateLimiter::new(&cfg, metrics_unregistered()).expect_err("zero period");
        assert!(err.to_string().starts_with("limits.per_domain: "), "{err}");

        let ov = LimitsOverride {
            per_app: Some(vec![Rate::new(NonZeroU32::MAX, MINUTE)]),
            ..LimitsOverride::default()
        };
        let err = RateLimiter::with_overrides(
            &LimitsConfig::default(),
            [("shop", &ov)],
            metrics_unregistered(),
        )
        .expect_err("count too large");
        assert!(
            err.to_string().starts_with("apps.shop.limits.per_app: "),
            "{err}"
        );
    }

    fn metrics_unregistered() -> RateLimitMetrics {
        RateLimitMetrics::register(&Registry::new()).expect("fresh registry")
    }

    // --- config ---

    #[test]
    fn defaults_are_the_ones_in_the_design() {
        let json = r#"{
            "per_address": ["1/60s", "5/1h"],
            "per_domain": ["600/1m"],
            "per_client_ip": ["20/1m"],
            "per_app": ["2000/1s"],
            "code_checks_per_client_ip": ["30/1m"],
            "code_checks_per_verification": ["10/1m"],
            "max_keys": 100000,
            "cleanup_interval_seconds": 60
        }"#;
        let parsed: LimitsConfig = serde_json::from_str(json).expect("valid");
        assert_eq!(parsed, LimitsConfig::default());
        let empty: LimitsConfig = serde_json::from_str("{}").expect("valid");
        assert_eq!(empty, LimitsConfig::default());
    }

    #[test]
    fn config_round_trips_through_serialization() {
        let cfg = LimitsConfig::default();
        let text = serde_json::to_string(&cfg).expect("serializes");
        assert!(text.contains(r#""per_address":["1/1m","5/1h"]"#), "{text}");
        let back: LimitsConfig = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, cfg);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = serde_json::from_str::<LimitsConfig>(r#"{"per_adress": []}"#).expect_err("typo");
        assert!(err.to_string().contains("per_adress"), "{err}");
        let err = serde_json::from_str::<LimitsOverride>(r#"{"max_keys": 5}"#)
            .expect_err("not overridable");
        assert!(err.to_string().contains("max_keys"), "{err}");
    }

    #[test]
    fn a_bad_spec_in_config_is_an_error_naming_the_spec() {
        let err = serde_json::from_str::<LimitsConfig>(r#"{"per_domain": ["600/1 m"]}"#)
            .expect_err("space");
        assert!(err.to_string().contains(r#""600/1 m""#), "{err}");
    }

    #[test]
    fn nonsense_daemon_wide_settings_are_refused() {
        let zero_keys = LimitsConfig {
            max_keys: 0,
            ..LimitsConfig::default()
        };
        assert!(matches!(
            RateLimiter::new(&zero_keys, metrics_unregistered()),
            Err(Error::ZeroMaxKeys)
        ));
        for secs in [0, MAX_CLEANUP_INTERVAL_SECONDS + 1, u64::MAX] {
            let cfg = LimitsConfig {
                cleanup_interval_seconds: secs,
                ..LimitsConfig::default()
            };
            assert!(matches!(
                RateLimiter::new(&cfg, metrics_unregistered()),
                Err(Error::CleanupInterval(s)) if s == secs
            ));
        }
        let ov = LimitsOverride::default();
        let err = RateLimiter::with_overrides(
            &LimitsConfig::default(),
            [("shop", &ov), ("shop", &ov)],
            metrics_unregistered(),
        )
        .expect_err("duplicate");
        assert!(matches!(err, Error::DuplicateApp(app) if app == "shop"));
    }

    // --- decisions ---

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let deny = |retry_after| Decision::Deny {
            limit: LimitName::PerAddress,
            retry_after,
        };
        assert_eq!(Decision::Allow.retry_after_secs(), None);
        assert_eq!(deny(Duration::from_secs(60)).retry_after_secs(), Some(60));
        assert_eq!(
            deny(Duration::from_millis(58_500)).retry_after_secs(),
            Some(59)
        );
        assert_eq!(deny(Duration::from_nanos(1)).retry_after_secs(), Some(1));
        assert_eq!(deny(Duration::ZERO).retry_after_secs(), Some(1));
        assert_eq!(deny(Duration::MAX).retry_after_secs(), Some(u64::MAX));
    }

    #[test]
    fn a_second_create_for_one_address_within_a_minute_is_denied_for_about_a_minute() {
        let (rl, clock, registry) = build(&LimitsConfig::default(), &[]);
        let create = || rl.check_create("shop", "bob@example.test", "example.test", None);
        assert_eq!(create(), Decision::Allow);
        assert_eq!(
            create(),
            Decision::Deny {
                limit: LimitName::PerAddress,
                retry_after: MINUTE
            }
        );
        clock.advance(Duration::from_millis(1500));
        let later = create();
        assert_eq!(denied_by(later), Some(LimitName::PerAddress));
        assert_eq!(later.retry_after_secs(), Some(59));
        assert_eq!(rejections(&registry, LimitName::PerAddress), Some(2));

        clock.advance(Duration::from_millis(58_500));
        assert_eq!(create(), Decision::Allow);
    }

    #[test]
    fn the_sixth_create_for_one_address_within_an_hour_is_denied_by_the_hourly_bucket() {
        let (rl, clock, _) = build(&LimitsConfig::default(), &[]);
        for _ in 0..5 {
            assert_eq!(
                rl.check_create("shop", "bob@example.test", "example.test", None),
                Decision::Allow
            );
            clock.advance(MINUTE);
        }
        let sixth = rl.check_create("shop", "bob@example.test", "example.test", None);
        assert_eq!(denied_by(sixth), Some(LimitName::PerAddress));
        // The burst of 5 refills one cell every 12 minutes: the 6th may go at minute 12, and
        // it is minute 5 now.
        assert_eq!(sixth.retry_after_secs(), Some(7 * 60));
    }

    #[test]
    fn quick_repeats_refused_by_the_minute_bucket_do_not_spend_the_hourly_one() {
        let (rl, clock, _) = build(&LimitsConfig::default(), &[]);
        for _ in 0..5 {
            assert!(
                rl.check_create("shop", "bob@x.test", "x.test", None)
                    .is_allowed()
            );
            for _ in 0..10 {
                clock.advance(Duration::from_secs(5));
                assert_eq!(
                    denied_by(rl.check_create("shop", "bob@x.test", "x.test", None)),
                    Some(LimitName::PerAddress)
                );
            }
            clock.advance(Duration::from_secs(10));
        }
    }

    #[test]
    fn addresses_differing_only_in_case_share_a_bucket() {
        let (rl, _, _) = build(&LimitsConfig::default(), &[]);
        assert!(
            rl.check_create("shop", "Bob@Example.test", "Example.TEST", None)
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "bob@example.test", "example.test", None)),
            Some(LimitName::PerAddress)
        );
    }

    #[test]
    fn a_resend_spends_the_same_address_bucket_as_a_create() {
        let (rl, clock, _) = build(&LimitsConfig::default(), &[]);
        assert!(
            rl.check_create("shop", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_resend("shop", "bob@x.test", "x.test")),
            Some(LimitName::PerAddress)
        );
        clock.advance(MINUTE);
        assert!(rl.check_resend("shop", "bob@x.test", "x.test").is_allowed());
        assert_eq!(
            denied_by(rl.check_create("shop", "bob@x.test", "x.test", None)),
            Some(LimitName::PerAddress)
        );
    }

    #[test]
    fn apps_do_not_share_buckets() {
        let (rl, _, _) = build(&LimitsConfig::default(), &[]);
        assert!(
            rl.check_create("shop", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        assert!(
            rl.check_create("blog", "bob@x.test", "x.test", None)
                .is_allowed()
        );
    }

    #[test]
    fn a_create_refused_by_the_ip_limit_does_not_spend_the_recipient_bucket() {
        let cfg = LimitsConfig {
            per_client_ip: rates(&["1/1m"]),
            per_address: rates(&["1/1m"]),
            ..all_off()
        };
        let (rl, _, _) = build(&cfg, &[]);
        assert!(
            rl.check_create("shop", "a@x.test", "x.test", ip("192.0.2.1"))
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "b@x.test", "x.test", ip("192.0.2.1"))),
            Some(LimitName::PerClientIp)
        );
        assert!(
            rl.check_create("shop", "b@x.test", "x.test", ip("192.0.2.2"))
                .is_allowed()
        );
    }

    #[test]
    fn the_domain_limit_counts_creates_to_all_addresses_at_the_domain() {
        let cfg = LimitsConfig {
            per_domain: rates(&["3/1m"]),
            ..LimitsConfig::default()
        };
        let (rl, _, _) = build(&cfg, &[]);
        for i in 0..3 {
            let email = format!("user{i}@x.test");
            assert!(rl.check_create("shop", &email, "x.test", None).is_allowed());
        }
        assert_eq!(
            denied_by(rl.check_create("shop", "user3@x.test", "X.test.", None)),
            Some(LimitName::PerDomain)
        );
        assert!(
            rl.check_create("shop", "user3@y.test", "y.test", None)
                .is_allowed()
        );
    }

    #[test]
    fn the_app_limit_counts_all_creates_of_one_app() {
        let cfg = LimitsConfig {
            per_app: rates(&["2/1s"]),
            ..all_off()
        };
        let (rl, _, _) = build(&cfg, &[]);
        assert!(
            rl.check_create("shop", "a@x.test", "x.test", None)
                .is_allowed()
        );
        assert!(
            rl.check_create("shop", "b@y.test", "y.test", None)
                .is_allowed()
        );
        let third = rl.check_create("shop", "c@z.test", "z.test", None);
        assert_eq!(
            third,
            Decision::Deny {
                limit: LimitName::PerApp,
                retry_after: Duration::from_millis(500)
            }
        );
        assert_eq!(third.retry_after_secs(), Some(1));
        assert!(
            rl.check_create("blog", "c@z.test", "z.test", None)
                .is_allowed()
        );
    }

    #[test]
    fn the_31st_code_check_from_one_ip_across_verifications_within_a_minute_is_denied() {
        let (rl, clock, registry) = build(&LimitsConfig::default(), &[]);
        for i in 0..30 {
            let verification = format!("ver_{}", i % 5);
            // 30/1m refills one cell every 2 s: stay inside that so the burst is what counts.
            clock.advance(Duration::from_millis(50));
            assert_eq!(
                rl.check_code("shop", &verification, ip("203.0.113.9")),
                Decision::Allow,
                "check {i}"
            );
        }
        let d = rl.check_code("shop", "ver_new", ip("203.0.113.9"));
        assert_eq!(denied_by(d), Some(LimitName::CodeChecksPerClientIp));
        assert_eq!(
            rejections(&registry, LimitName::CodeChecksPerClientIp),
            Some(1)
        );
        assert!(
            rl.check_code("shop", "ver_new", ip("203.0.113.10"))
                .is_allowed()
        );
    }

    #[test]
    fn the_11th_code_check_on_one_verification_within_a_minute_is_denied() {
        let (rl, _, _) = build(&LimitsConfig::default(), &[]);
        for i in 0..10 {
            let client = format!("198.51.100.{i}");
            assert!(rl.check_code("shop", "ver_1", ip(&client)).is_allowed());
        }
        assert_eq!(
            denied_by(rl.check_code("shop", "ver_1", ip("198.51.100.200"))),
            Some(LimitName::CodeChecksPerVerification)
        );
        assert!(rl.check_code("shop", "ver_2", None).is_allowed());
    }

    #[test]
    fn ipv6_clients_in_one_slash_64_share_a_bucket_and_other_slash_64s_do_not() {
        let cfg = LimitsConfig {
            code_checks_per_client_ip: rates(&["2/1m"]),
            per_client_ip: rates(&["1/1m"]),
            ..all_off()
        };
        let (rl, _, _) = build(&cfg, &[]);
        assert!(
            rl.check_code("shop", "v1", ip("2001:db8:0:1::1"))
                .is_allowed()
        );
        assert!(
            rl.check_code("shop", "v2", ip("2001:db8:0:1:ffff::2"))
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_code("shop", "v3", ip("2001:db8:0:1:abcd:1:2:3"))),
            Some(LimitName::CodeChecksPerClientIp)
        );
        assert!(
            rl.check_code("shop", "v3", ip("2001:db8:0:2::1"))
                .is_allowed()
        );

        assert!(
            rl.check_create("shop", "a@x.test", "x.test", ip("2001:db8::1"))
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "b@x.test", "x.test", ip("2001:db8::2"))),
            Some(LimitName::PerClientIp)
        );
        assert!(
            rl.check_create("shop", "b@x.test", "x.test", ip("2001:db8:0:9::2"))
                .is_allowed()
        );
    }

    #[test]
    fn an_ipv4_mapped_client_shares_the_bucket_of_its_ipv4_address() {
        let cfg = LimitsConfig {
            per_client_ip: rates(&["1/1m"]),
            ..all_off()
        };
        let (rl, _, _) = build(&cfg, &[]);
        assert!(
            rl.check_create("shop", "a@x.test", "x.test", ip("192.0.2.1"))
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "b@x.test", "x.test", ip("::ffff:192.0.2.1"))),
            Some(LimitName::PerClientIp)
        );
    }

    #[test]
    fn an_app_override_replaces_the_default_for_that_app_only() {
        let generous = LimitsOverride {
            per_address: Some(rates(&["3/1m"])),
            ..LimitsOverride::default()
        };
        let (rl, _, _) = build(&LimitsConfig::default(), &[("bulk", generous)]);
        for _ in 0..3 {
            assert!(
                rl.check_create("bulk", "bob@x.test", "x.test", None)
                    .is_allowed()
            );
        }
        assert_eq!(
            denied_by(rl.check_create("bulk", "bob@x.test", "x.test", None)),
            Some(LimitName::PerAddress)
        );
        assert!(
            rl.check_create("shop", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "bob@x.test", "x.test", None)),
            Some(LimitName::PerAddress)
        );
    }

    #[test]
    fn an_override_keeps_the_defaults_it_does_not_name() {
        let ov = LimitsOverride {
            per_address: Some(vec![]),
            ..LimitsOverride::default()
        };
        let cfg = LimitsConfig {
            per_domain: rates(&["2/1m"]),
            ..LimitsConfig::default()
        };
        let (rl, _, _) = build(&cfg, &[("bulk", ov)]);
        assert!(
            rl.check_create("bulk", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        assert!(
            rl.check_create("bulk", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("bulk", "bob@x.test", "x.test", None)),
            Some(LimitName::PerDomain)
        );
    }

    #[test]
    fn an_empty_list_turns_a_limit_off() {
        let cfg = LimitsConfig {
            per_address: vec![],
            ..LimitsConfig::default()
        };
        let (rl, _, _) = build(&cfg, &[]);
        for _ in 0..100 {
            assert!(
                rl.check_create("shop", "bob@x.test", "x.test", None)
                    .is_allowed()
            );
        }
        let (rl, _, _) = build(&all_off(), &[]);
        for _ in 0..10_000 {
            assert!(
                rl.check_create("shop", "bob@x.test", "x.test", ip("192.0.2.1"))
                    .is_allowed()
            );
            assert!(rl.check_code("shop", "v", ip("192.0.2.1")).is_allowed());
        }
        assert_eq!(rl.tracked_keys(), 0);
    }

    // --- memory ---

    fn flood(rl: &RateLimiter<FakeRelativeClock>, clock: &FakeRelativeClock, n: usize) {
        for i in 0..n {
            let email = format!("user{i}@d{}.test", i % 1000);
            let domain = format!("d{}.test", i % 1000);
            let _ = rl.check_create("shop", &email, &domain, None);
            clock.advance(Duration::from_millis(1));
        }
    }

    #[test]
    fn idle_keys_are_dropped_by_cleanup_after_a_flood_of_100k_addresses() {
        let (rl, clock, registry) = build(&LimitsConfig::default(), &[]);
        flood(&rl, &clock, 100_000);
        // Two per_address buckets hold every address; per_domain 1000 domains; per_app one.
        assert_eq!(rl.tracked_keys(), 2 * 100_000 + 1000 + 1);

        clock.advance(2 * HOUR);
        rl.cleanup();
        assert_eq!(rl.tracked_keys(), 0);
        let gauge = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "ratelimit_tracked_keys")
            .map(|f| f.get_metric()[0].get_gauge().get_value());
        assert_eq!(gauge, Some(0.0));
    }

    #[test]
    fn cleanup_keeps_keys_whose_buckets_are_not_full_again() {
        let (rl, clock, _) = build(&LimitsConfig::default(), &[]);
        assert!(
            rl.check_create("shop", "bob@x.test", "x.test", None)
                .is_allowed()
        );
        clock.advance(10 * MINUTE);
        rl.cleanup();
        // The hourly bucket still remembers bob (refill 12 min, plus one interval of slack);
        // the minute, domain and app buckets are full again.
        assert_eq!(rl.tracked_keys(), 1);
        assert!(
            rl.check_create("shop", "bob@x.test", "x.test", None)
                .is_allowed()
        );
    }

    #[test]
    fn with_a_key_cap_a_flood_of_distinct_keys_never_grows_a_bucket_past_it() {
        const CAP: usize = 1000;
        let cfg = LimitsConfig {
            max_keys: CAP,
            ..LimitsConfig::default()
        };
        let (rl, clock, registry) = build(&cfg, &[]);
        assert!(
            rl.check_create("shop", "early@x.test", "x.test", None)
                .is_allowed()
        );
        for i in 0..100_000 {
            let email = format!("user{i}@d{}.test", i % 5000);
            let domain = format!("d{}.test", i % 5000);
            let ip = IpAddr::from(std::net::Ipv4Addr::from_bits(0x0a00_0000 + i));
            let _ = rl.check_create("shop", &email, &domain, Some(ip));
            let _ = rl.check_code("shop", &email, Some(ip));
            clock.advance(Duration::from_millis(1));
            for bucket in rl.0.all.iter().flat_map(|l| &l.buckets) {
                assert!(bucket.store.len() <= CAP);
            }
        }
        let buckets: usize = rl.0.all.iter().map(|l| l.buckets.len()).sum();
        assert!(rl.tracked_keys() <= CAP * buckets);

        let refused = rl.check_create("shop", "new@x.test", "x.test", None);
        assert_eq!(
            refused,
            Decision::Deny {
                limit: LimitName::Capacity,
                retry_after: Duration::from_secs(DEFAULT_CLEANUP_INTERVAL_SECONDS)
            }
        );
        assert!(rejections(&registry, LimitName::Capacity) > Some(0));

        // A key tracked before the flood is still served by its bucket.
        clock.advance(MINUTE);
        assert!(
            rl.check_create("shop", "early@x.test", "x.test", None)
                .is_allowed()
        );

        clock.advance(2 * HOUR);
        rl.cleanup();
        assert!(
            rl.check_create("shop", "new@x.test", "x.test", None)
                .is_allowed()
        );
    }

    #[test]
    fn a_capacity_refusal_spends_no_bucket() {
        let cfg = LimitsConfig {
            per_client_ip: rates(&["2/1h"]),
            per_address: rates(&["1/1m"]),
            max_keys: 1,
            ..all_off()
        };
        let (rl, clock, _) = build(&cfg, &[]);
        let client = ip("192.0.2.1");
        assert!(
            rl.check_create("shop", "a@x.test", "x.test", client)
                .is_allowed()
        );
        assert_eq!(
            denied_by(rl.check_create("shop", "b@x.test", "x.test", client)),
            Some(LimitName::Capacity)
        );
        // The client's second cell of the hour is still there for a known address.
        clock.advance(MINUTE);
        assert!(
            rl.check_create("shop", "a@x.test", "x.test", client)
                .is_allowed()
        );
    }

    #[test]
    fn concurrent_floods_overshoot_the_cap_by_at_most_one_key_per_thread() {
        const CAP: usize = 1000;
        const THREADS: u32 = 4;
        let cfg = LimitsConfig {
            per_address: rates(&["1/1m"]),
            max_keys: CAP,
            ..all_off()
        };
        let (rl, _, _) = build(&cfg, &[]);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let rl = &rl;
                scope.spawn(move || {
                    for i in 0..10_000 {
                        let _ = rl.check_resend("shop", &format!("t{t}u{i}@x.test"), "x.test");
                    }
                });
            }
        });
        assert!(
            rl.tracked_keys() <= CAP + THREADS as usize,
            "{}",
            rl.tracked_keys()
        );
    }

    #[test]
    fn the_limiter_can_be_shared_across_threads_and_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<RateLimiter>();
        shareable::<RateLimiter<FakeRelativeClock>>();
    }

    #[test]
    fn every_rejection_label_starts_at_zero() {
        let (_, _, registry) = build(&LimitsConfig::default(), &[]);
        for name in LimitName::ALL {
            assert_eq!(rejections(&registry, name), Some(0), "{name}");
        }
        assert!(
            RateLimitMetrics::register(&registry).is_err(),
            "registered twice"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_cleanup_task_drops_idle_keys_every_interval_and_stops_on_shutdown() {
        let (rl, clock, _) = build(&LimitsConfig::default(), &[]);
        let (stop, shutdown) = watch::channel(false);
        let task = rl.spawn_cleanup(shutdown);
        flood(&rl, &clock, 100);
        assert!(rl.tracked_keys() > 0);

        clock.advance(2 * HOUR);
        tokio::time::sleep(Duration::from_secs(DEFAULT_CLEANUP_INTERVAL_SECONDS - 1)).await;
        assert!(
            rl.tracked_keys() > 0,
            "no cleanup before the first interval"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rl.tracked_keys(), 0);

        stop.send(true).expect("task is listening");
        task.await.expect("task ends cleanly");
    }
}
