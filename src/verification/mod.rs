//! Verifications: the record and its state machine. Pure: no I/O, no clock reads; every
//! function takes `now`. The service that drives it through the store is [`service`].
//!
//! ```text
//!            create
//!              │
//!              ▼            link POST / right code
//!          Pending ─────────────────────────────────▶ Verified
//!   ┌──────────┼───────────┬───────────────┬──────────────┐
//!   │ newer    │ DELETE    │ expires_at    │ budget spent  │ permanent
//!   ▼ create   ▼           ▼ passes        ▼ (wrong codes) ▼ delivery failure
//! Superseded Canceled    Expired         Locked       DeliveryFailed
//! ```
//!
//! Every state but `Pending` is final. Attempts are counted before the comparison, and the
//! service commits the count durably before it reveals the answer.

pub mod code;
pub mod service;
pub mod token;

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::id::VerificationId;

/// How the person proves ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// A signed link to a confirm page.
    Link,
    /// A one-time code typed into the app.
    Code,
    /// Both, in one mail.
    LinkAndCode,
}

impl Method {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Link => "link",
            Method::Code => "code",
            Method::LinkAndCode => "link_and_code",
        }
    }

    /// Whether the mail carries a link.
    pub fn has_link(self) -> bool {
        matches!(self, Method::Link | Method::LinkAndCode)
    }

    /// Whether the mail carries a code.
    pub fn has_code(self) -> bool {
        matches!(self, Method::Code | Method::LinkAndCode)
    }

    /// All methods, for pre-setting metric labels.
    pub const ALL: [Method; 3] = [Method::Link, Method::Code, Method::LinkAndCode];
}

/// Where a verification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the person.
    Pending,
    /// Proven.
    Verified,
    /// Lifetime passed.
    Expired,
    /// Canceled by the app.
    Canceled,
    /// Replaced by a newer verification for the same app, address and purpose.
    Superseded,
    /// Too many wrong codes.
    Locked,
    /// The mail could not be delivered.
    DeliveryFailed,
}

impl Status {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Verified => "verified",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
            Status::Superseded => "superseded",
            Status::Locked => "locked",
            Status::DeliveryFailed => "delivery_failed",
        }
    }

    /// Whether no further change can happen.
    pub fn is_final(self) -> bool {
        self != Status::Pending
    }
}

/// Delivery state of the verification's mail, as shown in `GET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// In the outbox, not yet tried.
    Queued,
    /// Tried, failed transiently, will try again.
    Retrying,
    /// Accepted by the relay (or written by the file transport).
    Sent,
    /// Failed for good.
    Failed,
}

/// The mail's delivery record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Where delivery stands.
    pub status: DeliveryStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// The last failure, for people (an SMTP reply, say).
    pub last_error: Option<String>,
    /// When the relay accepted it.
    pub sent_at: Option<UnixTime>,
}

/// The latest callback's delivery, as shown in `GET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackState {
    /// The event, e.g. `verification.verified`.
    pub event: String,
    /// Where its delivery stands (`retrying`, `sent` = delivered, `failed`).
    pub status: DeliveryStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// The last failure, for people.
    pub last_error: Option<String>,
    /// When this was recorded.
    pub updated_at: UnixTime,
}

/// The code part of a verification. The code itself is never stored in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeState {
    /// Key id the MAC and the sealed copy were made with.
    pub kid: String,
    /// `HMAC(code key, id ‖ code)`, hex.
    pub mac: String,
    /// The code encrypted for (re)sending.
    pub sealed: String,
    /// Attempts counted so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
}

/// A fetch of the confirm page before the confirming POST (mail scanners do this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefetch {
    /// When.
    pub at: UnixTime,
    /// `GET` or `HEAD`.
    pub method: String,
    /// The User-Agent, truncated.
    pub user_agent: Option<String>,
    /// The client's network ([`network_prefix`]), not its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// The network a client address belongs to, for telemetry without keeping the address: an
/// IPv4 address's `/24`, an IPv6 address's `/48` (a site), an IPv4-mapped IPv6 address as IPv4.
pub fn network_prefix(ip: std::net::IpAddr) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}/24", Ipv4Addr::new(o[0], o[1], o[2], 0))
        }
        IpAddr::V6(v6) => {
            let masked = u128::from(v6) & (u128::MAX << 80);
            format!("{}/48", Ipv6Addr::from(masked))
        }
    }
}

/// Most prefetches kept per verification; older ones are dropped (bounded record size).
pub const MAX_PREFETCHES: usize = 20;

/// One verification, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Its id.
    pub id: VerificationId,
    /// The app that started it.
    pub app: String,
    /// Normalized address, as shown to people.
    pub email: String,
    /// Lower-cased address used as the (app, email, purpose) index key.
    pub email_key: String,
    /// IDNA ASCII form of the domain (rate-limit key, DNS).
    #[serde(default)]
    pub ascii_domain: String,
    /// ASCII form for the SMTP envelope, when there is one.
    pub ascii_email: Option<String>,
    /// What for (`signup`, …).
    pub purpose: String,
    /// The app's id for the person.
    pub subject: Option<String>,
    /// Link, code or both.
    pub method: Method,
    /// Locale of mail and pages.
    pub locale: String,
    /// Where the confirm button sends the person.
    pub redirect_url: Option<String>,
    /// Echoed to the app.
    pub metadata: Option<serde_json::Value>,
    /// Created.
    pub created_at: UnixTime,
    /// Link and code stop working.
    pub expires_at: UnixTime,
    /// When proven.
    pub verified_at: Option<UnixTime>,
    /// Last status change.
    pub updated_at: UnixTime,
    /// Stored status; see [`Verification::status_at`] for the effective one.
    pub status: Status,
    /// The code, when the method has one.
    pub code: Option<CodeState>,
    /// The mail's delivery.
    pub delivery: Delivery,
    /// Pre-click fetches of the confirm page.
    #[serde(default)]
    pub prefetches: Vec<Prefetch>,
    /// The latest callback's delivery.
    #[serde(default)]
    pub callback: Option<CallbackState>,
}

/// Result of checking a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    /// Right code. `first` is false when it was already verified (idempotent repeat).
    Verified {
        /// This call made the transition.
        first: bool,
    },
    /// Wrong code; the attempt was counted.
    Invalid {
        /// Attempts left (0 means it is now locked).
        remaining: u32,
    },
    /// The budget was already spent.
    Locked,
    /// Past its lifetime. `first` when this call made the transition.
    Expired {
        /// This call made the transition.
        first: bool,
    },
    /// Superseded, canceled or failed delivery.
    Closed(Status),
    /// The verification has no code (a link verification).
    NoCode,
}

/// Result of confirming through the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkConfirm {
    /// Verified; `first` when this call made the transition.
    Verified {
        /// This call made the transition.
        first: bool,
    },
    /// Past its lifetime; `first` when this call made the transition.
    Expired {
        /// This call made the transition.
        first: bool,
    },
    /// Superseded, canceled, locked or failed delivery.
    Closed(Status),
}

impl Verification {
    /// The status at `now`: a pending verification past `expires_at` is expired even before
    /// the sweeper has written that down.
    pub fn status_at(&self, now: UnixTime) -> Status {
        if self.status == Status::Pending && now >= self.expires_at {
            Status::Expired
        } else {
            self.status
        }
    }

    fn set(&mut self, status: Status, now: UnixTime) {
        self.status = status;
        self.updated_at = now;
    }

    /// Marks it expired if it is pending and due. Returns whether it changed.
    pub fn expire_if_due(&mut self, now: UnixTime) -> bool {
        if self.status == Status::Pending && now >= self.expires_at {
            self.set(Status::Expired, now);
            true
        } else {
            false
        }
    }

    /// Counts one attempt, then compares with `matches`, in that order.
    pub fn check_code(
        &mut self,
        now: UnixTime,
        matches: impl FnOnce(&CodeState) -> bool,
    ) -> CodeCheck {
        if self.code.is_none() {
            return CodeCheck::NoCode;
        }
        match self.status {
            Status::Verified => {
                // Idempotent: the right code again answers verified; a wrong one is refused
                // without counting, since nothing is left to protect.
                return match self.code.as_ref() {
                    Some(c) if matches(c) => CodeCheck::Verified { first: false },
                    _ => CodeCheck::Invalid { remaining: 0 },
                };
            }
            Status::Locked => return CodeCheck::Locked,
            Status::Expired => return CodeCheck::Expired { first: false },
            s @ (Status::Superseded | Status::Canceled | Status::DeliveryFailed) => {
                return CodeCheck::Closed(s);
            }
            Status::Pending => {}
        }
        if self.expire_if_due(now) {
            return CodeCheck::Expired { first: true };
        }
        let Some(code) = self.code.as_mut() else {
            return CodeCheck::NoCode;
        };
        if code.attempts >= code.max_attempts {
            self.set(Status::Locked, now);
            return CodeCheck::Locked;
        }
        code.attempts += 1;
        let remaining = code.max_attempts - code.attempts;
        if matches(code) {
            self.verified_at = Some(now);
            self.set(Status::Verified, now);
            CodeCheck::Verified { first: true }
        } else {
            if remaining == 0 {
                self.set(Status::Locked, now);
            }
            CodeCheck::Invalid { remaining }
        }
    }

    /// Confirms through the link button.
    pub fn confirm_link(&mut self, now: UnixTime) -> LinkConfirm {
        match self.status {
            Status::Verified => LinkConfirm::Verified { first: false },
            Status::Expired => LinkConfirm::Expired { first: false },
            Status::Pending => {
                if self.expire_if_due(now) {
                    LinkConfirm::Expired { first: true }
                } else {
                    self.verified_at = Some(now);
                    self.set(Status::Verified, now);
                    LinkConfirm::Verified { first: true }
                }
            }
            s => LinkConfirm::Closed(s),
        }
    }

    /// Cancels a pending verification.
    ///
    /// # Errors
    /// The status it already has when that is final (an expired-by-time one is expired first).
    pub fn cancel(&mut self, now: UnixTime) -> Result<(), Status> {
        self.expire_if_due(now);
        if self.status == Status::Pending {
            self.set(Status::Canceled, now);
            Ok(())
        } else {
            Err(self.status)
        }
    }

    /// Marks a pending verification superseded by a newer one. Returns whether it changed.
    pub fn supersede(&mut self, now: UnixTime) -> bool {
        if self.status == Status::Pending {
            self.set(Status::Superseded, now);
            true
        } else {
            false
        }
    }

    /// Records a pre-click fetch of the confirm page, keeping the newest [`MAX_PREFETCHES`].
    pub fn record_prefetch(&mut self, p: Prefetch) {
        if self.prefetches.len() >= MAX_PREFETCHES {
            self.prefetches.remove(0);
        }
        self.prefetches.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: UnixTime = UnixTime(1_795_342_200_000);

    fn pending(method: Method) -> Verification {
        Verification {
            id: VerificationId::generate(T0),
            app: "shop".into(),
            email: "a@example.com".into(),
            email_key: "a@example.com".into(),
            ascii_domain: "example.com".into(),
            ascii_email: Some("a@example.com".into()),
            purpose: "signup".into(),
            subject: None,
            method,
            locale: "en".into(),
            redirect_url: None,
            metadata: None,
            created_at: T0,
            expires_at: T0.plus(Duration::from_secs(600)),
            verified_at: None,
            updated_at: T0,
            status: Status::Pending,
            code: method.has_code().then(|| CodeState {
                kid: "k".into(),
                mac: "m".into(),
                sealed: "s".into(),
                attempts: 0,
                max_attempts: 5,
            }),
            delivery: Delivery {
                status: DeliveryStatus::Queued,
                attempts: 0,
                last_error: None,
                sent_at: None,
            },
            prefetches: Vec::new(),
            callback: None,
        }
    }

    #[test]
    fn wrong_codes_count_down_then_lock() {
        let mut v = pending(Method::Code);
        for left in (0..5).rev() {
            assert_eq!(
                v.check_code(T0, |_| false),
                CodeCheck::Invalid { remaining: left }
            );
        }
        assert_eq!(v.status, Status::Locked);
        // Even the right code is refused once locked.
        assert_eq!(v.check_code(T0, |_| true), CodeCheck::Locked);
    }

    #[test]
    fn the_right_code_verifies_once_and_repeats_idempotently() {
        let mut v = pending(Method::Code);
        assert_eq!(
            v.check_code(T0, |_| false),
            CodeCheck::Invalid { remaining: 4 }
        );
        assert_eq!(
            v.check_code(T0, |_| true),
            CodeCheck::Verified { first: true }
        );
        assert_eq!(v.verified_at, Some(T0));
        assert_eq!(
            v.check_code(T0, |_| true),
            CodeCheck::Verified { first: false }
        );
        assert_eq!(v.code.as_ref().map(|c| c.attempts), Some(2));
    }

    #[test]
    fn the_attempt_is_counted_before_the_comparison() {
        let mut v = pending(Method::Code);
        let r = v.check_code(T0, |c| {
            assert_eq!(c.attempts, 1, "counted before compare");
            true
        });
        assert_eq!(r, CodeCheck::Verified { first: true });
    }

    #[test]
    fn expiry_wins_over_a_right_code() {
        let mut v = pending(Method::Code);
        let late = v.expires_at;
        assert_eq!(
            v.check_code(late, |_| true),
            CodeCheck::Expired { first: true }
        );
        assert_eq!(v.status, Status::Expired);
        assert_eq!(
            v.check_code(late, |_| true),
            CodeCheck::Expired { first: false }
        );
    }

    #[test]
    fn link_confirmation_transitions() {
        let mut v = pending(Method::Link);
        assert_eq!(v.check_code(T0, |_| true), CodeCheck::NoCode);
        assert_eq!(v.confirm_link(T0), LinkConfirm::Verified { first: true });
        assert_eq!(v.confirm_link(T0), LinkConfirm::Verified { first: false });
        let mut s = pending(Method::Link);
        assert!(s.supersede(T0));
        assert_eq!(s.confirm_link(T0), LinkConfirm::Closed(Status::Superseded));
        let mut c = pending(Method::LinkAndCode);
        assert_eq!(c.cancel(T0), Ok(()));
        assert_eq!(c.cancel(T0), Err(Status::Canceled));
        assert_eq!(
            c.check_code(T0, |_| true),
            CodeCheck::Closed(Status::Canceled)
        );
    }

    #[test]
    fn status_at_reports_expiry_before_the_sweeper() {
        let v = pending(Method::Link);
        assert_eq!(v.status_at(T0), Status::Pending);
        assert_eq!(v.status_at(v.expires_at), Status::Expired);
    }

    #[test]
    fn prefetches_are_bounded() {
        let mut v = pending(Method::Link);
        for i in 0..(MAX_PREFETCHES as u64 + 5) {
            v.record_prefetch(Prefetch {
                at: UnixTime(i),
                method: "GET".into(),
                user_agent: None,
                network: None,
            });
        }
        assert_eq!(v.prefetches.len(), MAX_PREFETCHES);
        assert_eq!(v.prefetches[0].at, UnixTime(5));
    }

    #[test]
    fn network_prefix_keeps_the_network_not_the_address() {
        let p = |s: &str| network_prefix(s.parse().expect("ip"));
        assert_eq!(p("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(p("2001:db8:1234:5678::9"), "2001:db8:1234::/48");
        assert_eq!(p("::ffff:198.51.100.9"), "198.51.100.0/24");
        assert_eq!(p("::1"), "::/48");
    }
}
