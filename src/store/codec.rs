//! Value encoding: one version byte, then the body.
//!
//! - Version 2, binary: the two records written on every request, [`Verification`] and
//!   [`OutboxEntry`]. About a fifth of their JSON size, and every byte counts: each memtable
//!   flush ends in a version change that stalls writes to its keyspace for four fsyncs
//!   (BENCHMARKS.md), so fewer bytes per create mean fewer stalls, and less flush and
//!   compaction work.
//! - Version 1, JSON: everything else (idempotency answers), and any record written before
//!   version 2 existed; [`decode`] reads both, so an upgrade needs no migration.
//!
//! The binary layout is a fixed field order (see `put` and `get` below): integers as LEB128
//! varints, strings as a varint length then UTF-8, an optional value as a 0/1 byte then the
//! value, enums as one tag byte, ids as their 16 raw bytes. A field that usually repeats
//! another (the lower-cased email, the ASCII domain) is stored as "same as" (0) or 1 and its own
//! string. To add a field, append it at the end and default it when the input ends before it.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::UnixTime;
use crate::id::{MessageId, VerificationId};
use crate::outbox::{CallbackJob, EmailJob, Lane, OutboxEntry, Payload, State};
use crate::verification::{
    CallbackState, CodeState, Delivery, DeliveryStatus, Method, Prefetch, Status, Verification,
};

/// JSON body.
const JSON: u8 = 1;
/// Binary body ([`Record::put`]).
const BINARY: u8 = 2;

/// A stored value type. The default is JSON; [`Verification`] and [`OutboxEntry`] have a
/// binary form.
pub trait Record: Serialize + DeserializeOwned {
    /// Writes the binary body; `false` when the type is stored as JSON.
    fn put(&self, _out: &mut Enc) -> bool {
        false
    }

    /// Reads a binary body.
    ///
    /// # Errors
    /// [`DecodeError::Binary`] for a body that does not parse, or a type without a binary form.
    fn get(_d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        Err(DecodeError::Binary("this record type has no binary form"))
    }
}

/// Encodes a record.
///
/// # Errors
/// Only if a JSON value cannot be serialized, which is a bug.
pub fn encode<T: Record>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut e = Enc(Vec::with_capacity(256));
    e.0.push(BINARY);
    if v.put(&mut e) {
        return Ok(e.0);
    }
    let mut out = vec![JSON];
    serde_json::to_writer(&mut out, v)?;
    Ok(out)
}

/// Decodes a record written by [`encode`], in either version.
///
/// # Errors
/// An unknown version byte or a body that does not parse.
pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&JSON, body)) => serde_json::from_slice(body).map_err(DecodeError::Body),
        Some((&BINARY, body)) => {
            let mut d = Dec(body);
            let v = T::get(&mut d)?;
            if d.0.is_empty() {
                Ok(v)
            } else {
                Err(DecodeError::Binary("trailing bytes"))
            }
        }
        Some((&v, _)) => Err(DecodeError::Version(v)),
        None => Err(DecodeError::Empty),
    }
}

/// A stored value that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes.
    #[error("empty value")]
    Empty,
    /// Written by a newer release.
    #[error("unknown value version {0}")]
    Version(u8),
    /// Corrupt JSON body.
    #[error("corrupt value: {0}")]
    Body(#[source] serde_json::Error),
    /// Corrupt binary body.
    #[error("corrupt value: {0}")]
    Binary(&'static str),
}

/// Binary writer.
pub struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }

    fn var(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn str(&mut self, s: &str) {
        self.var(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    fn opt_time(&mut self, t: Option<UnixTime>) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.var(t.0);
            }
        }
    }

    /// `s`, stored as 0 when it equals `base`.
    fn same_as(&mut self, s: &str, base: &str) {
        if s == base {
            self.u8(0);
        } else {
            self.u8(1);
            self.str(s);
        }
    }

    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Binary reader over the body.
pub struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Binary("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn var(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(DecodeError::Binary("integer too large"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Binary("integer too large"))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.var()?).map_err(|_| DecodeError::Binary("count too large"))
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let n = usize::try_from(self.var()?).map_err(|_| DecodeError::Binary("truncated"))?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Binary("invalid UTF-8"))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Binary("invalid flag")),
        }
    }

    fn opt_str(&mut self) -> Result<Option<String>, DecodeError> {
        self.flag()?.then(|| self.str()).transpose()
    }

    fn time(&mut self) -> Result<UnixTime, DecodeError> {
        self.var().map(UnixTime)
    }

    fn opt_time(&mut self) -> Result<Option<UnixTime>, DecodeError> {
        self.flag()?.then(|| self.time()).transpose()
    }

    fn same_as(&mut self, base: &str) -> Result<String, DecodeError> {
        if self.flag()? {
            self.str()
        } else {
            Ok(base.to_string())
        }
    }

    fn id(&mut self) -> Result<[u8; 16], DecodeError> {
        let mut b = [0u8; 16];
        b.copy_from_slice(self.take(16)?);
        Ok(b)
    }

    fn json(&mut self) -> Result<serde_json::Value, DecodeError> {
        serde_json::from_str(&self.str()?).map_err(DecodeError::Body)
    }

    /// An enum from its tag: `all[tag]`.
    fn tag<T: Copy>(&mut self, all: &[T]) -> Result<T, DecodeError> {
        all.get(usize::from(self.u8()?))
            .copied()
            .ok_or(DecodeError::Binary("unknown tag"))
    }
}

/// Tags, in order: a variant's tag is its index in these tables (decoding), and the exhaustive
/// matches below give the same tags (encoding), so a new variant does not compile until it has
/// a tag; `tag_tables_and_matches_agree` checks that the two agree. Append only.
const METHODS: [Method; 3] = [Method::Link, Method::Code, Method::LinkAndCode];
const STATUSES: [Status; 7] = [
    Status::Pending,
    Status::Verified,
    Status::Expired,
    Status::Canceled,
    Status::Superseded,
    Status::Locked,
    Status::DeliveryFailed,
];
const DELIVERY_STATUSES: [DeliveryStatus; 4] = [
    DeliveryStatus::Queued,
    DeliveryStatus::Retrying,
    DeliveryStatus::Sent,
    DeliveryStatus::Failed,
];
const STATES: [State; 4] = [
    State::Scheduled,
    State::Delivered,
    State::Failed,
    State::Dropped,
];

fn method_tag(m: Method) -> u8 {
    match m {
        Method::Link => 0,
        Method::Code => 1,
        Method::LinkAndCode => 2,
    }
}

fn status_tag(s: Status) -> u8 {
    match s {
        Status::Pending => 0,
        Status::Verified => 1,
        Status::Expired => 2,
        Status::Canceled => 3,
        Status::Superseded => 4,
        Status::Locked => 5,
        Status::DeliveryFailed => 6,
    }
}

fn delivery_tag(s: DeliveryStatus) -> u8 {
    match s {
        DeliveryStatus::Queued => 0,
        DeliveryStatus::Retrying => 1,
        DeliveryStatus::Sent => 2,
        DeliveryStatus::Failed => 3,
    }
}

fn state_tag(s: State) -> u8 {
    match s {
        State::Scheduled => 0,
        State::Delivered => 1,
        State::Failed => 2,
        State::Dropped => 3,
    }
}

/// The domain part of an address ("" without an `@`).
fn domain_of(email: &str) -> &str {
    email.rsplit_once('@').map_or("", |(_, d)| d)
}

impl Record for Verification {
    fn put(&self, e: &mut Enc) -> bool {
        e.raw(self.id.as_bytes());
        e.str(&self.app);
        e.str(&self.email);
        e.same_as(&self.email_key, &self.email);
        e.same_as(&self.ascii_domain, domain_of(&self.email));
        match &self.ascii_email {
            None => e.u8(0),
            Some(a) if *a == self.email => e.u8(1),
            Some(a) => {
                e.u8(2);
                e.str(a);
            }
        }
        e.str(&self.purpose);
        e.opt_str(self.subject.as_deref());
        e.u8(method_tag(self.method));
        e.str(&self.locale);
        e.opt_str(self.redirect_url.as_deref());
        e.opt_str(self.metadata.as_ref().map(|m| m.to_string()).as_deref());
        e.var(self.created_at.0);
        e.var(self.expires_at.0);
        e.opt_time(self.verified_at);
        e.var(self.updated_at.0);
        e.u8(status_tag(self.status));
        match &self.code {
            None => e.u8(0),
            Some(c) => {
                e.u8(1);
                e.str(&c.kid);
                e.str(&c.mac);
                e.str(&c.sealed);
                e.var(c.attempts.into());
                e.var(c.max_attempts.into());
            }
        }
        e.u8(delivery_tag(self.delivery.status));
        e.var(self.delivery.attempts.into());
        e.opt_str(self.delivery.last_error.as_deref());
        e.opt_time(self.delivery.sent_at);
        e.var(self.prefetches.len() as u64);
        for p in &self.prefetches {
            e.var(p.at.0);
            e.str(&p.method);
            e.opt_str(p.user_agent.as_deref());
            e.opt_str(p.network.as_deref());
        }
        match &self.callback {
            None => e.u8(0),
            Some(c) => {
                e.u8(1);
                e.str(&c.event);
                e.u8(delivery_tag(c.status));
                e.var(c.attempts.into());
                e.opt_str(c.last_error.as_deref());
                e.var(c.updated_at.0);
            }
        }
        true
    }

    fn get(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let id = VerificationId::from_bytes(d.id()?);
        let app = d.str()?;
        let email = d.str()?;
        let email_key = d.same_as(&email)?;
        let ascii_domain = d.same_as(domain_of(&email))?;
        let ascii_email = match d.u8()? {
            0 => None,
            1 => Some(email.clone()),
            2 => Some(d.str()?),
            _ => return Err(DecodeError::Binary("unknown tag")),
        };
        let purpose = d.str()?;
        let subject = d.opt_str()?;
        let method = d.tag(&METHODS)?;
        let locale = d.str()?;
        let redirect_url = d.opt_str()?;
        let metadata = d.flag()?.then(|| d.json()).transpose()?;
        let created_at = d.time()?;
        let expires_at = d.time()?;
        let verified_at = d.opt_time()?;
        let updated_at = d.time()?;
        let status = d.tag(&STATUSES)?;
        let code = if d.flag()? {
            Some(CodeState {
                kid: d.str()?,
                mac: d.str()?,
                sealed: d.str()?,
                attempts: d.u32()?,
                max_attempts: d.u32()?,
            })
        } else {
            None
        };
        let delivery = Delivery {
            status: d.tag(&DELIVERY_STATUSES)?,
            attempts: d.u32()?,
            last_error: d.opt_str()?,
            sent_at: d.opt_time()?,
        };
        let n = d.u32()?;
        let mut prefetches = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            prefetches.push(Prefetch {
                at: d.time()?,
                method: d.str()?,
                user_agent: d.opt_str()?,
                network: d.opt_str()?,
            });
        }
        let callback = if d.flag()? {
            Some(CallbackState {
                event: d.str()?,
                status: d.tag(&DELIVERY_STATUSES)?,
                attempts: d.u32()?,
                last_error: d.opt_str()?,
                updated_at: d.time()?,
            })
        } else {
            None
        };
        Ok(Verification {
            id,
            app,
            email,
            email_key,
            ascii_domain,
            ascii_email,
            purpose,
            subject,
            method,
            locale,
            redirect_url,
            metadata,
            created_at,
            expires_at,
            verified_at,
            updated_at,
            status,
            code,
            delivery,
            prefetches,
            callback,
        })
    }
}

impl Record for OutboxEntry {
    fn put(&self, e: &mut Enc) -> bool {
        e.raw(self.id.as_bytes());
        e.raw(self.verification.as_bytes());
        e.str(&self.app);
        e.u8(state_tag(self.state));
        e.var(self.created_at.0);
        e.var(self.due_at.0);
        e.var(self.attempts.into());
        e.opt_str(self.last_error.as_deref());
        e.opt_time(self.delivered_at);
        match &self.payload {
            Payload::Email(m) => {
                e.u8(0);
                e.str(&m.message_id);
                e.str(&m.from);
                e.str(&m.to);
                e.same_as(&m.envelope_to, &m.to);
            }
            Payload::Callback(c) => {
                e.u8(1);
                e.str(&c.event);
                e.str(&c.webhook_id);
                e.str(&c.body.to_string());
            }
        }
        true
    }

    fn get(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let (head, last_error, delivered_at) = get_outbox_head(d)?;
        let payload = match head.lane {
            Lane::Email => {
                let message_id = d.str()?;
                let from = d.str()?;
                let to = d.str()?;
                let envelope_to = d.same_as(&to)?;
                Payload::Email(EmailJob {
                    message_id,
                    from,
                    to,
                    envelope_to,
                })
            }
            Lane::Callback => Payload::Callback(CallbackJob {
                event: d.str()?,
                webhook_id: d.str()?,
                body: d.json()?,
            }),
        };
        Ok(OutboxEntry {
            id: head.id,
            verification: head.verification,
            app: head.app,
            state: head.state,
            created_at: head.created_at,
            due_at: head.due_at,
            attempts: head.attempts,
            last_error,
            delivered_at,
            payload,
        })
    }
}

/// Reads the binary form of an outbox entry up to its payload's fields: the head, and the two
/// fields between it and the payload's tag (`last_error`, `delivered_at`).
fn get_outbox_head(
    d: &mut Dec<'_>,
) -> Result<(OutboxHead, Option<String>, Option<UnixTime>), DecodeError> {
    let id = MessageId::from_bytes(d.id()?);
    let verification = VerificationId::from_bytes(d.id()?);
    let app = d.str()?;
    let state = d.tag(&STATES)?;
    let created_at = d.time()?;
    let due_at = d.time()?;
    let attempts = d.u32()?;
    let last_error = d.opt_str()?;
    let delivered_at = d.opt_time()?;
    let lane = match d.u8()? {
        0 => Lane::Email,
        1 => Lane::Callback,
        _ => return Err(DecodeError::Binary("unknown tag")),
    };
    let head = OutboxHead {
        id,
        verification,
        app,
        state,
        created_at,
        due_at,
        attempts,
        lane,
    };
    Ok((head, last_error, delivered_at))
}

impl Record for super::IdempotencyRecord {}

/// What can be read of an outbox entry whose whole record cannot be (a payload that no longer
/// parses): the fields before the payload, which say whose it is and where its due-index key
/// is. Lets the worker and the admin API deal with such an entry without its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxHead {
    /// Its id.
    pub id: MessageId,
    /// The verification it belongs to.
    pub verification: VerificationId,
    /// The app that owns it.
    pub app: String,
    /// Its stored state.
    pub state: State,
    /// Created.
    pub created_at: UnixTime,
    /// Its due time (the due-index key's, while scheduled).
    pub due_at: UnixTime,
    /// Attempts started.
    pub attempts: u32,
    /// Its queue (from the payload's kind, which precedes the payload's fields).
    pub lane: Lane,
}

impl OutboxHead {
    /// Whether the due index holds a key for it (as [`OutboxEntry::is_due_indexed`]).
    pub fn is_due_indexed(&self) -> bool {
        self.state == State::Scheduled
    }
}

/// The head of an outbox entry in the JSON form (version 1): serde skips the fields it does not
/// name (the payload's body among them) without building them.
#[derive(serde::Deserialize)]
struct JsonHead {
    id: MessageId,
    verification: VerificationId,
    app: String,
    state: State,
    created_at: UnixTime,
    due_at: UnixTime,
    attempts: u32,
    payload: JsonKind,
}

#[derive(serde::Deserialize)]
struct JsonKind {
    kind: JsonLane,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum JsonLane {
    Email,
    Callback,
}

/// Reads the [`OutboxHead`] of a stored outbox entry, whether or not its payload reads.
///
/// # Errors
/// The head itself cannot be read (an unknown version, a truncated or corrupt record).
pub fn decode_outbox_head(bytes: &[u8]) -> Result<OutboxHead, DecodeError> {
    match bytes.split_first() {
        Some((&JSON, body)) => {
            let h: JsonHead = serde_json::from_slice(body).map_err(DecodeError::Body)?;
            Ok(OutboxHead {
                id: h.id,
                verification: h.verification,
                app: h.app,
                state: h.state,
                created_at: h.created_at,
                due_at: h.due_at,
                attempts: h.attempts,
                lane: match h.payload.kind {
                    JsonLane::Email => Lane::Email,
                    JsonLane::Callback => Lane::Callback,
                },
            })
        }
        Some((&BINARY, body)) => get_outbox_head(&mut Dec(body)).map(|(head, ..)| head),
        Some((&v, _)) => Err(DecodeError::Version(v)),
        None => Err(DecodeError::Empty),
    }
}

/// A verification for tests: `full` sets every optional field and non-ASCII addresses.
#[cfg(test)]
pub(crate) fn sample_verification(full: bool) -> Verification {
    let t = |ms: u64| UnixTime(1_795_345_271_573 + ms);
    Verification {
        id: VerificationId::generate(t(0)),
        app: "shop".into(),
        email: if full {
            "Zoë@Bücher.example"
        } else {
            "someone@example.com"
        }
        .into(),
        email_key: if full {
            "zoë@bücher.example"
        } else {
            "someone@example.com"
        }
        .into(),
        ascii_domain: if full {
            "xn--bcher-kva.example"
        } else {
            "example.com"
        }
        .into(),
        ascii_email: Some(
            if full {
                "a@xn--bcher-kva.example"
            } else {
                "someone@example.com"
            }
            .into(),
        ),
        purpose: "signup".into(),
        subject: full.then(|| "user-42".into()),
        method: if full {
            Method::LinkAndCode
        } else {
            Method::Link
        },
        locale: "zh-CN".into(),
        redirect_url: full.then(|| "https://app.example/welcome?x=1".into()),
        metadata: full.then(|| serde_json::json!({"plan": "pro", "n": [1, 2.5, null]})),
        created_at: t(0),
        expires_at: t(600_000),
        verified_at: full.then(|| t(5_000)),
        updated_at: t(5_000),
        status: if full {
            Status::DeliveryFailed
        } else {
            Status::Pending
        },
        code: full.then(|| CodeState {
            kid: "k1".into(),
            mac: "ab".repeat(32),
            sealed: "k1:f8SZG7eIfovM22RDgMXkqz".into(),
            attempts: 3,
            max_attempts: u32::MAX,
        }),
        delivery: Delivery {
            status: if full {
                DeliveryStatus::Failed
            } else {
                DeliveryStatus::Queued
            },
            attempts: if full { 7 } else { 0 },
            last_error: full.then(|| "550 5.1.1 no such user".into()),
            sent_at: full.then(|| t(1_000)),
        },
        prefetches: if full {
            vec![
                Prefetch {
                    at: t(2_000),
                    method: "HEAD".into(),
                    user_agent: None,
                    network: Some("2001:db8:aa::/48".into()),
                },
                Prefetch {
                    at: t(3_000),
                    method: "GET".into(),
                    user_agent: Some("Mozilla/5.0 (scanner)".into()),
                    network: None,
                },
            ]
        } else {
            Vec::new()
        },
        callback: full.then(|| CallbackState {
            event: "verification.verified".into(),
            status: DeliveryStatus::Retrying,
            attempts: 2,
            last_error: Some("HTTP 502".into()),
            updated_at: t(6_000),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain(Vec<i32>);
    impl Record for Plain {}

    fn entries() -> Vec<OutboxEntry> {
        let now = UnixTime(1_795_345_271_573);
        let vid = VerificationId::generate(now);
        let mut email = OutboxEntry::new(
            MessageId::generate(now),
            vid,
            "shop",
            now,
            Payload::Email(EmailJob {
                message_id: format!("{vid}.m@localhost"),
                from: "verigate <no-reply@localhost>".into(),
                to: "someone@example.com".into(),
                envelope_to: "someone@example.com".into(),
            }),
        );
        let mut idn = email.clone();
        idn.payload = Payload::Email(EmailJob {
            message_id: "x@y".into(),
            from: "a@b".into(),
            to: "Zoë <zoë@bücher.example>".into(),
            envelope_to: "zoë@xn--bcher-kva.example".into(),
        });
        idn.state = State::Dropped;
        email.attempts = 4;
        email.last_error = Some("421 try later".into());
        email.delivered_at = Some(now.plus(std::time::Duration::from_secs(9)));
        email.state = State::Delivered;
        let mut callback = email.clone();
        callback.state = State::Failed;
        callback.payload = Payload::Callback(CallbackJob {
            event: "verification.verified".into(),
            webhook_id: "msg_x".into(),
            body: serde_json::json!({"type": "verification.verified", "data": {"id": "vrf_x"}}),
        });
        vec![email, idn, callback]
    }

    fn json_v1<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = vec![JSON];
        serde_json::to_writer(&mut out, v).expect("json");
        out
    }

    #[test]
    fn records_round_trip_in_binary_and_old_json_records_still_read() {
        for v in [sample_verification(true), sample_verification(false)] {
            let b = encode(&v).expect("encode");
            assert_eq!(b[0], BINARY);
            assert_eq!(decode::<Verification>(&b).expect("binary"), v);
            assert_eq!(decode::<Verification>(&json_v1(&v)).expect("json"), v);
        }
        for e in entries() {
            let b = encode(&e).expect("encode");
            assert_eq!(b[0], BINARY);
            assert_eq!(decode::<OutboxEntry>(&b).expect("binary"), e);
            assert_eq!(decode::<OutboxEntry>(&json_v1(&e)).expect("json"), e);
        }
    }

    #[test]
    fn the_binary_form_is_a_fraction_of_the_json() {
        let v = sample_verification(false);
        let (bin, json) = (encode(&v).expect("encode").len(), json_v1(&v).len());
        assert!(
            bin * 4 < json,
            "verification: {bin} bytes binary, {json} JSON"
        );
        let e = &entries()[0];
        let (bin, json) = (encode(e).expect("encode").len(), json_v1(e).len());
        assert!(
            bin * 2 < json,
            "outbox entry: {bin} bytes binary, {json} JSON"
        );
    }

    #[test]
    fn every_truncation_and_trailing_bytes_are_errors_not_panics() {
        let mut values = vec![encode(&sample_verification(true)).expect("encode")];
        values.extend(entries().iter().map(|e| encode(e).expect("encode")));
        for (i, b) in values.iter().enumerate() {
            for cut in 1..b.len() {
                let r = if i == 0 {
                    decode::<Verification>(&b[..cut]).map(drop)
                } else {
                    decode::<OutboxEntry>(&b[..cut]).map(drop)
                };
                assert!(r.is_err(), "value {i} cut at {cut} decoded");
            }
            let mut long = b.clone();
            long.push(0);
            let r = if i == 0 {
                decode::<Verification>(&long).map(drop)
            } else {
                decode::<OutboxEntry>(&long).map(drop)
            };
            assert!(matches!(r, Err(DecodeError::Binary("trailing bytes"))));
        }
    }

    #[test]
    fn bad_tags_flags_and_integers_are_refused() {
        let b = encode(&sample_verification(false)).expect("encode");
        // The ascii_email tag follows id (16), app, email and two "same as" bytes.
        let at = 1 + 16 + 1 + 4 + 1 + 19 + 2;
        assert_eq!(b[at], 1, "layout changed: fix the offset");
        let mut bad = b.clone();
        bad[at] = 9;
        assert!(matches!(
            decode::<Verification>(&bad),
            Err(DecodeError::Binary("unknown tag"))
        ));
        let mut bad = b.clone();
        bad[at - 1] = 7; // the ascii_domain "same as" flag
        assert!(matches!(
            decode::<Verification>(&bad),
            Err(DecodeError::Binary("invalid flag"))
        ));
        let mut d = Dec(&[0xff; 11]);
        assert!(matches!(
            d.var(),
            Err(DecodeError::Binary("integer too large"))
        ));
        let mut d = Dec(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(d.var().expect("u64::MAX"), u64::MAX);
        let mut e = Enc(Vec::new());
        e.str("héllo");
        let mut bad = e.0.clone();
        bad[2] = 0xff;
        assert!(matches!(
            Dec(&bad).str(),
            Err(DecodeError::Binary("invalid UTF-8"))
        ));
    }

    #[test]
    fn tag_tables_and_matches_agree() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(all: &[T], tag: fn(T) -> u8) {
            for (i, v) in all.iter().enumerate() {
                assert_eq!(usize::from(tag(*v)), i, "{v:?}");
                assert_eq!(Dec(&[tag(*v)]).tag(all).expect("decodes"), *v);
            }
        }
        check(&METHODS, method_tag);
        check(&STATUSES, status_tag);
        check(&DELIVERY_STATUSES, delivery_tag);
        check(&STATES, state_tag);
        assert_eq!(METHODS.len(), Method::ALL.len());
        assert_eq!(STATES.len(), State::ALL.len());
    }

    #[test]
    fn json_records_and_unknown_versions() {
        let b = encode(&Plain(vec![1, 2, 3])).expect("encode");
        assert_eq!(b[0], JSON, "types without a binary form stay JSON");
        assert_eq!(decode::<Plain>(&b).expect("decode"), Plain(vec![1, 2, 3]));
        assert!(matches!(
            decode::<Plain>(&[9, b'[', b']']),
            Err(DecodeError::Version(9))
        ));
        assert!(matches!(
            decode::<Plain>(&[BINARY, 1]),
            Err(DecodeError::Binary(_))
        ));
        assert!(matches!(decode::<Plain>(&[]), Err(DecodeError::Empty)));
    }

    /// A JSON value `depth` arrays deep: serializing has no depth limit, parsing stops at 128.
    fn deep(depth: usize) -> serde_json::Value {
        let mut v = serde_json::json!(1);
        for _ in 0..depth {
            v = serde_json::json!([v]);
        }
        v
    }

    fn head_of(e: &OutboxEntry) -> OutboxHead {
        OutboxHead {
            id: e.id,
            verification: e.verification,
            app: e.app.clone(),
            state: e.state,
            created_at: e.created_at,
            due_at: e.due_at,
            attempts: e.attempts,
            lane: e.lane(),
        }
    }

    #[test]
    fn the_head_of_an_entry_reads_in_both_forms() {
        for e in entries() {
            for b in [encode(&e).expect("encode"), json_v1(&e)] {
                assert_eq!(decode_outbox_head(&b).expect("head"), head_of(&e));
            }
        }
    }

    #[test]
    fn an_entry_whose_body_is_too_deep_to_parse_still_shows_its_head() {
        let mut e = entries().remove(2);
        e.state = State::Scheduled;
        e.payload = Payload::Callback(CallbackJob {
            event: "verification.verified".into(),
            webhook_id: "msg_x".into(),
            body: serde_json::json!({"type": "t", "data": {"metadata": {"a": deep(126)}}}),
        });
        for b in [encode(&e).expect("encode"), json_v1(&e)] {
            let whole = decode::<OutboxEntry>(&b);
            assert!(
                matches!(&whole, Err(DecodeError::Body(err)) if err.to_string().contains("recursion limit")),
                "{whole:?}"
            );
            assert_eq!(decode_outbox_head(&b).expect("head"), head_of(&e));
        }
        // A head cut short, or of an unknown version, is an error, not a guess.
        let b = encode(&e).expect("encode");
        for n in 0..40 {
            assert!(decode_outbox_head(&b[..n]).is_err(), "{n} bytes");
        }
        assert!(matches!(
            decode_outbox_head(&[9, 1, 2]),
            Err(DecodeError::Version(9))
        ));
    }
}
