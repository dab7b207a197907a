//! Callbacks to the host app: a signed HTTP POST per event, delivered through the outbox.
//!
//! Owns the wire format of a callback (Standard Webhooks headers and signature, [`sign`]), one
//! delivery attempt and its classification ([`dispatch`]), and the callback configuration.
//! Does not own scheduling, backoff or persistence (the outbox's `callback` lane and
//! `outbox::retry`), nor the payload, which `verification::service` writes into the entry.
//!
//! Every attempt ends in one [`Outcome`](crate::outbox::transport::Outcome).
//! Delivery rules (DESIGN.md §7, Standard Webhooks "Delivery success and failure"):
//!
//! | attempt result                                  | `Outcome`                            |
//! |-------------------------------------------------|--------------------------------------|
//! | 2xx                                             | `Delivered`                          |
//! | 410 Gone                                        | `Reject`: the app asked us to stop   |
//! | 429, 502, 503, 504                              | `Retry`, not before `Retry-After` (≤ 1 h) |
//! | other 3xx (redirects are not followed)          | `Retry`                              |
//! | other 4xx / 5xx                                 | `Retry`                              |
//! | timeout, refused, reset, DNS or TLS failure     | `Retry`                              |
//!
//! - Every attempt of one entry carries the same `webhook-id` (the app's idempotency key) and
//!   a fresh `webhook-timestamp` and signature, so a receiver's replay window never rejects a
//!   late retry.
//! - Retries stop for good once [`give_up`] says the entry is older than
//!   [`CallbackConfig::horizon_seconds`]; the outbox then marks it failed.
//! - The callback URL comes from the app's configuration, never from a request (no SSRF).

pub mod dispatch;
pub mod sign;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dispatch::{CallbackSender, classify, classify_error, parse_callback_url};
pub use sign::{Signer, WebhookSecret};

/// Default [`CallbackConfig::timeout_ms`]: 15 s, the low end of the 15–30 s Standard Webhooks
/// recommends, since the receiver should acknowledge and process later.
pub const DEFAULT_TIMEOUT_MS: u64 = 15_000;

/// Default [`CallbackConfig::horizon_seconds`]: one day. Verifications live minutes to days;
/// an event older than a day is of little use to the app, and its outage should be noticed in
/// the admin API (failed entries) rather than hidden by retries.
pub const DEFAULT_HORIZON_SECONDS: u64 = 86_400;

/// `[callbacks]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackConfig {
    /// Time one attempt may take, milliseconds: connect, TLS, sending, and the response head
    /// together. Default 15000.
    pub timeout_ms: u64,
    /// How long an event is retried, seconds since it was created; after that it is marked
    /// failed. Default 86400 (one day).
    pub horizon_seconds: u64,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            horizon_seconds: DEFAULT_HORIZON_SECONDS,
        }
    }
}

/// A `[callbacks]` value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("callbacks.{field}: {problem}")]
pub struct InvalidCallbackConfig {
    /// The key, without the `callbacks.` prefix.
    pub field: &'static str,
    /// What to change.
    pub problem: &'static str,
}

impl CallbackConfig {
    /// [`Self::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// [`Self::horizon_seconds`] as a duration.
    pub fn horizon(&self) -> Duration {
        Duration::from_secs(self.horizon_seconds)
    }

    /// Checks the values; call it when loading the configuration.
    ///
    /// # Errors
    ///
    /// [`InvalidCallbackConfig`] when `timeout_ms` or `horizon_seconds` is 0.
    pub fn validate(&self) -> Result<(), InvalidCallbackConfig> {
        if self.timeout_ms == 0 {
            return Err(InvalidCallbackConfig {
                field: "timeout_ms",
                problem: "must be at least 1",
            });
        }
        if self.horizon_seconds == 0 {
            return Err(InvalidCallbackConfig {
                field: "horizon_seconds",
                problem: "must be at least 1 (0 would fail every callback before its first try)",
            });
        }
        Ok(())
    }
}

/// Whether an entry created at `created_at_ms` (ms since the Unix epoch) is past its retry
/// horizon at `now_ms`: true once `horizon` or more has passed. A clock that went backwards
/// counts as no time passed.
pub fn give_up(created_at_ms: u64, now_ms: u64, horizon: Duration) -> bool {
    let age = Duration::from_millis(now_ms.saturating_sub(created_at_ms));
    age >= horizon
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_gives_the_defaults() {
        let cfg: CallbackConfig = serde_json::from_str("{}").expect("parse");
        assert_eq!(cfg, CallbackConfig::default());
        assert_eq!(cfg.timeout(), Duration::from_secs(15));
        assert_eq!(cfg.horizon(), Duration::from_secs(86_400));
        cfg.validate().expect("defaults are valid");
    }

    #[test]
    fn every_key_parses() {
        let cfg: CallbackConfig =
            serde_json::from_str(r#"{"timeout_ms": 300, "horizon_seconds": 60}"#).expect("parse");
        assert_eq!(
            cfg,
            CallbackConfig {
                timeout_ms: 300,
                horizon_seconds: 60,
            }
        );
    }

    #[test]
    fn an_unknown_key_fails() {
        let err =
            serde_json::from_str::<CallbackConfig>(r#"{"timeout": 300}"#).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn zero_values_are_refused() {
        for (cfg, field) in [
            (
                CallbackConfig {
                    timeout_ms: 0,
                    ..CallbackConfig::default()
                },
                "timeout_ms",
            ),
            (
                CallbackConfig {
                    horizon_seconds: 0,
                    ..CallbackConfig::default()
                },
                "horizon_seconds",
            ),
        ] {
            assert_eq!(cfg.validate().map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn give_up_once_the_horizon_has_passed() {
        let day = Duration::from_secs(86_400);
        let created = 1_700_000_000_000;
        let cases = [
            (created, false),
            (created + 1, false),
            (created + 86_399_999, false),
            (created + 86_400_000, true),
            (created + 86_400_001, true),
            (u64::MAX, true),
            // Clock moved backwards: not a reason to drop the event.
            (created - 5_000, false),
            (0, false),
        ];
        for (now, expected) in cases {
            assert_eq!(give_up(created, now, day), expected, "now = {now}");
        }
        assert!(give_up(created, created, Duration::ZERO));
    }
}
