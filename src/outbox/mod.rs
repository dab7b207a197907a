//! The durable outbox: every mail and every callback is an entry, written in the same batch as
//! the state change that caused it. Owns scheduling and retry decisions; does not render
//! templates (see `templates`) or speak a transport's protocol (see [`transport`]).
//!
//! ```text
//! enqueue ─▶ Scheduled ──claim (lease: due_at = now + lease)──▶ attempt
//!               ▲                                                  │
//!               │        transient failure: due_at = backoff       │
//!               └──────────────────────────────────────────────────┤
//!                                                                  ├─ ok ──────────▶ Delivered
//!                                                                  ├─ permanent ───▶ Failed ─▶ callback
//!                 verification no longer pending / operator drop ─┴────────────────▶ Dropped
//! ```
//!
//! A claimed entry stays `Scheduled` with `due_at` moved to the end of its lease, so an entry
//! whose worker died is claimed again when the lease runs out: delivery is at-least-once, and
//! each mail carries a stable `Message-ID` so a repeat is recognisable.
//!
//! Leases, invariants:
//! - A worker claims due entries in batches; an attempt that starts more than 2 s after its
//!   claim (it waited for a slot or the pacer) renews the lease first, so every attempt has a
//!   whole lease from its start. Entries claimed and not started when the worker stops are
//!   released: due at once, their attempt uncounted.
//! - Each lane's lease outlasts its slowest attempt (`Config::email_lease`: every SMTP timeout
//!   of one send plus a margin; `Config::callback_lease`: twice the callback timeout), so a
//!   live attempt is not claimed again.
//! - An outcome is written only while its claim still holds: the entry is `Scheduled` with the
//!   attempt count and lease end its claim wrote. Otherwise it is dropped and counted as
//!   `verigate_outbox_attempts_total{outcome="stale"}`, except that a stale delivery still
//!   completes a `Scheduled` entry (the mail went out). A finished entry is never changed.

pub mod admin;
pub mod retry;
pub mod smtp;
pub mod transport;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::id::{MessageId, VerificationId};

/// Independent queues; each has its own due index so mail and callbacks never block each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Lane {
    /// Verification mail.
    Email = 1,
    /// Callbacks to the host app.
    Callback = 2,
}

impl Lane {
    /// The metric label and admin `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Email => "email",
            Lane::Callback => "callback",
        }
    }
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for `due_at` (first try, retry, or leased to a worker).
    Scheduled,
    /// Done.
    Delivered,
    /// Failed for good.
    Failed,
    /// Not sent: the verification closed first, or an operator dropped it.
    Dropped,
}

impl State {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Dropped => "dropped",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            State::Scheduled,
            State::Delivered,
            State::Failed,
            State::Dropped,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// All states, for metric labels.
    pub const ALL: [State; 4] = [
        State::Scheduled,
        State::Delivered,
        State::Failed,
        State::Dropped,
    ];
}

/// A verification mail to send. The link and code are not stored here: the worker derives the
/// link from the verification and opens the sealed code, so the outbox holds no bearer secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailJob {
    /// `Message-ID` without brackets, stable for this entry across retries.
    pub message_id: String,
    /// Sender, `"Name <addr>"`.
    pub from: String,
    /// Recipient as shown in the header.
    pub to: String,
    /// Envelope recipient (ASCII form when there is one).
    pub envelope_to: String,
}

/// A callback to POST to the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackJob {
    /// Event type, e.g. `verification.verified`.
    pub event: String,
    /// `webhook-id`, stable across retries.
    pub webhook_id: String,
    /// The JSON body to send.
    pub body: serde_json::Value,
}

/// What an entry carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// A mail.
    Email(EmailJob),
    /// A callback.
    Callback(CallbackJob),
}

/// One outbox entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Its id.
    pub id: MessageId,
    /// The verification it belongs to.
    pub verification: VerificationId,
    /// The app.
    pub app: String,
    /// Where it stands.
    pub state: State,
    /// Created (accepted).
    pub created_at: UnixTime,
    /// Next attempt, or end of the current lease.
    pub due_at: UnixTime,
    /// Attempts started.
    pub attempts: u32,
    /// The last failure, for people.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<UnixTime>,
    /// What to deliver.
    pub payload: Payload,
}

impl OutboxEntry {
    /// A new scheduled entry, due now.
    pub fn new(
        id: MessageId,
        verification: VerificationId,
        app: &str,
        now: UnixTime,
        payload: Payload,
    ) -> Self {
        OutboxEntry {
            id,
            verification,
            app: app.to_string(),
            state: State::Scheduled,
            created_at: now,
            due_at: now,
            attempts: 0,
            last_error: None,
            delivered_at: None,
            payload,
        }
    }

    /// Its queue.
    pub fn lane(&self) -> Lane {
        match self.payload {
            Payload::Email(_) => Lane::Email,
            Payload::Callback(_) => Lane::Callback,
        }
    }

    /// Whether the due index holds it (exactly while scheduled).
    pub fn is_due_indexed(&self) -> bool {
        self.state == State::Scheduled
    }

    /// JSON for the admin API.
    pub fn to_json(&self) -> serde_json::Value {
        let (kind, detail) = match &self.payload {
            Payload::Email(e) => (
                "email",
                serde_json::json!({"message_id": e.message_id, "to": crate::address::mask(&e.to)}),
            ),
            Payload::Callback(c) => (
                "callback",
                serde_json::json!({"event": c.event, "webhook_id": c.webhook_id}),
            ),
        };
        serde_json::json!({
            "id": self.id.to_string(),
            "kind": kind,
            "verification_id": self.verification.to_string(),
            "app": self.app,
            "state": self.state.as_str(),
            "created_at": self.created_at.to_rfc3339(),
            "due_at": self.due_at.to_rfc3339(),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "delivered_at": self.delivered_at.map(UnixTime::to_rfc3339),
            "detail": detail,
        })
    }
}
