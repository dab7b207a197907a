//! The verification service: drives the pure state machine ([`super`]) through the store,
//! writing every state change, its outbox entries and its indexes in one durable operation.
//! Owns request validation for the v1 API; does not know HTTP (see `http`).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::token::{Keyring, TokenError, TokenKind};
use super::{
    CodeCheck, CodeState, Delivery, DeliveryStatus, LinkConfirm, Method, Prefetch, Status,
    Verification,
};
use crate::address;
use crate::address::dns::{Deliverability, DomainChecker, OnFailure};
use crate::apps::{App, Apps};
use crate::clock::{SharedClock, UnixTime};
use crate::config::VerificationPolicy;
use crate::id::{MessageId, VerificationId};
use crate::metrics::Metrics;
use crate::outbox::{CallbackJob, EmailJob, OutboxEntry, Payload};
use crate::ratelimit::{Decision, RateLimiter};
use crate::store::{self, IdempotencyRecord, Store, Tx};
use crate::templates::{self, Templates};

/// Largest `subject`, bytes.
const MAX_SUBJECT_BYTES: usize = 256;
/// Largest `metadata`, bytes of JSON.
const MAX_METADATA_BYTES: usize = 4096;
/// Deepest `metadata`: arrays and objects nested in one another, the metadata object itself
/// counting as 1 (see [`json_depth`]). Callbacks carry the metadata two levels down
/// (`{"data": {"metadata": …}}`), and the outbox stores that body as JSON that serde_json
/// reads back with its limit of 128 levels: without this limit, metadata nested about 126 deep
/// passed the request's own parse but made a callback entry that could never be read. 32 is
/// far beyond what echoing an app's own identifiers needs and far below that limit.
pub const MAX_METADATA_DEPTH: usize = 32;
/// Largest purpose label, characters.
const MAX_PURPOSE_LEN: usize = 32;
/// Largest `Idempotency-Key`, bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Longest locale tag we accept.
const MAX_LOCALE_LEN: usize = 35;
/// Longest redirect URL.
const MAX_REDIRECT_URL_LEN: usize = 2048;
/// Longest User-Agent kept for a prefetch.
const MAX_USER_AGENT_LEN: usize = 256;
/// Expired verifications handled per sweep.
const SWEEP_BATCH: usize = 512;
/// The sweeper resumes behind the time it last swept up to, less this margin (a create whose
/// commit took longer than its ttl is still found); every [`FULL_SWEEP_EVERY`] it starts over.
const SWEEP_MARGIN: Duration = Duration::from_secs(5);
/// How often the sweeper scans the expiry index from its start (it otherwise skips the
/// tombstones of verifications that ended before expiring).
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Where the next expiry sweep starts.
struct SweepPosition {
    after: Option<(UnixTime, VerificationId)>,
    full_at: std::time::Instant,
}

/// Why a request could not be served. The HTTP layer maps each to a status and stable code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field is missing or wrong.
    #[error("{message}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// For a person.
        message: String,
    },
    /// The address is not an address.
    #[error("{0}")]
    InvalidEmail(String),
    /// The redirect URL is not allowed.
    #[error("{0}")]
    InvalidRedirect(String),
    /// No such verification (for this app).
    #[error("no such verification")]
    NotFound,
    /// Past its lifetime.
    #[error("this verification has expired")]
    Expired,
    /// Attempt budget spent.
    #[error("too many wrong codes; start a new verification")]
    Locked,
    /// Wrong code.
    #[error("the code is not correct")]
    InvalidCode {
        /// Attempts left.
        remaining: u32,
    },
    /// No longer usable (superseded, canceled, delivery failed, verified).
    #[error("this verification is {}", .0.as_str())]
    Closed(Status),
    /// The verification was sent as a link and has no code.
    #[error("this verification has no code; it was sent as a link")]
    NoCode,
    /// Same Idempotency-Key, different body.
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyConflict,
    /// DNS says the domain cannot receive mail (or could not say, with `on_failure = reject`).
    #[error("{message}")]
    UndeliverableDomain {
        /// Stable reason code (`no_such_domain`, `null_mx`, …, `dns_unavailable`).
        reason: &'static str,
        /// For a person.
        message: String,
    },
    /// The domain is on the disposable-domain list.
    #[error("addresses at disposable email domains are not accepted")]
    DisposableDomain,
    /// A rate limit refused the request.
    #[error("too many requests ({limit}); retry in {retry_after_secs} s")]
    RateLimited {
        /// Which limit.
        limit: &'static str,
        /// Seconds until the same request could pass that limit.
        retry_after_secs: u64,
    },
    /// An outbox entry cannot be decoded, so the operation cannot act on it (admin retry).
    #[error("this outbox entry cannot be decoded")]
    UnreadableEntry,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The random source or a cipher failed.
    #[error("cryptographic failure")]
    Crypto,
}

/// Result of service calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The 202 answer to a create (fields in the order the JSON has always had: by name).
#[derive(serde::Serialize)]
struct Created<'a> {
    email: &'a str,
    expires_at: String,
    id: VerificationId,
    method: &'static str,
    purpose: &'a str,
    status: &'static str,
    watch_token: &'a str,
}

/// `POST /v1/verifications` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The address.
    pub email: String,
    /// Link, code or both. Default link.
    pub method: Option<Method>,
    /// Purpose label. Default `signup`.
    pub purpose: Option<String>,
    /// The app's id for the person.
    pub subject: Option<String>,
    /// Where the confirm button leads.
    pub redirect_url: Option<String>,
    /// BCP 47 tag.
    pub locale: Option<String>,
    /// Lifetime override.
    pub ttl_seconds: Option<u64>,
    /// The end user's IP.
    pub client_ip: Option<String>,
    /// Echoed to the app.
    pub metadata: Option<Value>,
}

/// `POST /v1/verifications/check` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The verification, or…
    pub id: Option<String>,
    /// …the address and purpose of the one in force.
    pub email: Option<String>,
    /// Purpose when looking up by address. Default `signup`.
    pub purpose: Option<String>,
    /// The code as typed.
    pub code: String,
    /// The end user's IP (for rate limits).
    pub client_ip: Option<String>,
}

/// An answer to replay for a repeated Idempotency-Key, or a fresh one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

/// What the confirm page should show for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkView {
    /// Not a token of ours.
    Invalid,
    /// Token fine, verification in this state.
    Found {
        /// The verification.
        id: VerificationId,
        /// Effective status.
        status: Status,
        /// Address to show.
        email: String,
        /// Page locale.
        locale: String,
        /// Where to send the person after POST.
        redirect_url: Option<String>,
    },
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Service(Arc<Inner>);

struct Inner {
    store: Store,
    keys: Arc<Keyring>,
    clock: SharedClock,
    policy: VerificationPolicy,
    public_base: String,
    templates: Arc<Templates>,
    metrics: Metrics,
    apps: Apps,
    mail_ready: Arc<Notify>,
    default_from: String,
    dns: Option<DomainChecker>,
    check_dns_on_create: bool,
    on_dns_failure: OnFailure,
    limiter: RateLimiter,
    address_options: address::Options,
    disposable: Option<address::DisposableDomains>,
    dkim: Option<Arc<crate::dkim::Signer>>,
    sweep: std::sync::Mutex<SweepPosition>,
}

/// Everything the service is built from.
pub struct Parts {
    /// The store.
    pub store: Store,
    /// Signing keys.
    pub keys: Arc<Keyring>,
    /// Wall clock.
    pub clock: SharedClock,
    /// Policy.
    pub policy: VerificationPolicy,
    /// `public_base_url`.
    pub public_base_url: String,
    /// Templates.
    pub templates: Arc<Templates>,
    /// Metrics.
    pub metrics: Metrics,
    /// Tenants.
    pub apps: Apps,
    /// Woken when mail is queued.
    pub mail_ready: Arc<Notify>,
    /// `delivery.from`.
    pub default_from: String,
    /// The deliverability checker (None when it could not be built).
    pub dns: Option<DomainChecker>,
    /// `dns.check_on_create`.
    pub check_dns_on_create: bool,
    /// Parser options from `[address]`.
    pub address_options: address::Options,
    /// The disposable-domain list, when configured.
    pub disposable: Option<address::DisposableDomains>,
    /// The DKIM signer, when configured.
    pub dkim: Option<Arc<crate::dkim::Signer>>,
    /// `dns.on_failure`.
    pub on_dns_failure: OnFailure,
    /// Rate limits.
    pub limiter: RateLimiter,
}

fn field(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidField {
        field,
        message: message.into(),
    }
}

/// How deeply arrays and objects nest in `v`: 0 for a scalar, 1 for `{}`, `[]` or `{"a": 1}`,
/// 2 for `{"a": [1]}`. The same count serde_json's recursion limit applies to. Iterative, so a
/// value of any depth is measured without deep recursion.
pub fn json_depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, above)) = stack.pop() {
        let depth = above + 1;
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth))),
            Value::Object(o) => stack.extend(o.values().map(|c| (c, depth))),
            _ => continue,
        }
        deepest = deepest.max(depth);
    }
    deepest
}

fn check_purpose(p: &str) -> Result<()> {
    if p.is_empty()
        || p.len() > MAX_PURPOSE_LEN
        || !p
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(field("purpose", "purpose must match [a-z0-9_]{1,32}"));
    }
    Ok(())
}

fn check_locale(l: &str) -> Result<()> {
    if l.is_empty()
        || l.len() > MAX_LOCALE_LEN
        || !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(field(
            "locale",
            "locale must be a BCP 47 tag such as \"en\" or \"zh-CN\"",
        ));
    }
    Ok(())
}

/// SHA-256 of a request body, hex; the identity of a request for Idempotency-Key.
pub fn body_hash(body: &[u8]) -> String {
    crate::apps::encode_hex(ring::digest::digest(&ring::digest::SHA256, body).as_ref())
}

/// The verification `id` of app `app`, as [`Error::NotFound`] when it is missing or another
/// app's (the two are indistinguishable to a caller by design).
fn owned(tx: &Tx<'_>, id: VerificationId, app: &str) -> Result<Verification> {
    match tx.verification(id)? {
        Some(v) if v.app == app => Ok(v),
        _ => Err(Error::NotFound),
    }
}

/// The `deliverability` object of the validate answer.
pub fn deliverability_json(d: &Deliverability) -> Value {
    match d {
        Deliverability::Deliverable { mx, implicit } => json!({
            "status": "deliverable", "mx": mx, "implicit_mx": implicit, "reason": null,
        }),
        Deliverability::Undeliverable { reason } => json!({
            "status": "undeliverable", "mx": [], "reason": reason.to_string(), "code": reason.code(),
        }),
        Deliverability::Unknown { reason } => json!({
            "status": "unknown", "mx": [], "reason": reason,
        }),
    }
}

fn parse_client_ip(ip: Option<&str>) -> Result<Option<std::net::IpAddr>> {
    ip.map(|s| {
        s.parse()
            .map_err(|_| field("client_ip", "client_ip must be an IPv4 or IPv6 address"))
    })
    .transpose()
}

fn limited(d: Decision) -> Result<()> {
    match d {
        Decision::Allow => Ok(()),
        Decision::Deny { limit, .. } => Err(Error::RateLimited {
            limit: limit.as_str(),
            retry_after_secs: d.retry_after_secs().unwrap_or(1),
        }),
    }
}

impl Service {
    /// Builds the service.
    pub fn new(p: Parts) -> Self {
        Service(Arc::new(Inner {
            store: p.store,
            keys: p.keys,
            clock: p.clock,
            policy: p.policy,
            public_base: p.public_base_url.trim_end_matches('/').to_string(),
            templates: p.templates,
            metrics: p.metrics,
            apps: p.apps,
            mail_ready: p.mail_ready,
            default_from: p.default_from,
            dns: p.dns,
            on_dns_failure: p.on_dns_failure,
            limiter: p.limiter,
            check_dns_on_create: p.check_dns_on_create,
            address_options: p.address_options,
            disposable: p.disposable,
            dkim: p.dkim,
            sweep: std::sync::Mutex::new(SweepPosition {
                after: None,
                full_at: std::time::Instant::now(),
            }),
        }))
    }

    /// The current time.
    pub fn now(&self) -> UnixTime {
        self.0.clock.now()
    }

    /// Wakes the outbox workers when `app` takes callbacks (a state change may have queued
    /// one); other apps' confirms and checks queue nothing, so they wake nobody.
    pub fn wake_for_callbacks(&self, app: &str) {
        if self.takes_callbacks(app) {
            self.wake_mail();
        }
    }

    /// Whether `app` has a callback URL (events for it are queued as callbacks).
    fn takes_callbacks(&self, app: &str) -> bool {
        self.0
            .apps
            .get(app)
            .is_some_and(|a| a.config.callback_url.is_some())
    }

    /// Wakes the outbox workers (new or rescheduled entries in either lane).
    pub fn wake_mail(&self) {
        self.0.mail_ready.notify_waiters();
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The DKIM signer, when configured.
    pub fn dkim(&self) -> Option<&crate::dkim::Signer> {
        self.0.dkim.as_deref()
    }

    /// The keyring.
    pub fn keys(&self) -> &Keyring {
        &self.0.keys
    }

    /// The templates.
    pub fn templates(&self) -> &Templates {
        &self.0.templates
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Tenants.
    pub fn apps(&self) -> &Apps {
        &self.0.apps
    }

    /// Policy.
    pub fn policy(&self) -> &VerificationPolicy {
        &self.0.policy
    }

    /// The confirm link for a verification.
    pub fn link_url(&self, v: &Verification) -> String {
        let token = self.0.keys.sign(TokenKind::Link, v.id, v.expires_at);
        format!("{}/v/{token}", self.0.public_base)
    }

    /// Starts a verification (DESIGN §3.1). `idempotency` is the key and the body's hash.
    ///
    /// # Errors
    /// Invalid input, an idempotency conflict, or a store failure.
    pub async fn create(
        &self,
        app: &App,
        req: CreateRequest,
        idempotency: Option<(String, String)>,
    ) -> Result<Reply> {
        let now = self.now();
        let policy = &self.0.policy;
        let method = req.method.unwrap_or(Method::Link);
        let purpose = req.purpose.unwrap_or_else(|| "signup".into());
        check_purpose(&purpose)?;
        if let Some(s) = &req.subject
            && s.len() > MAX_SUBJECT_BYTES
        {
            return Err(field(
                "subject",
                format!("subject must be at most {MAX_SUBJECT_BYTES} bytes"),
            ));
        }
        if let Some(m) = &req.metadata {
            if !m.is_object() {
                return Err(field("metadata", "metadata must be a JSON object"));
            }
            if serde_json::to_vec(m).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_METADATA_BYTES {
                return Err(field(
                    "metadata",
                    format!("metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"),
                ));
            }
            if json_depth(m) > MAX_METADATA_DEPTH {
                return Err(field(
                    "metadata",
                    format!(
                        "metadata must be nested at most {MAX_METADATA_DEPTH} levels deep (objects and arrays)"
                    ),
                ));
            }
        }
        let client_ip = parse_client_ip(req.client_ip.as_deref())?;
        if let Some(l) = &req.locale {
            check_locale(l)?;
        }
        let redirect_url = match &req.redirect_url {
            Some(u) if u.len() > MAX_REDIRECT_URL_LEN => {
                return Err(Error::InvalidRedirect(format!(
                    "redirect_url must be at most {MAX_REDIRECT_URL_LEN} bytes"
                )));
            }
            Some(u) => Some(app.check_redirect(u).map_err(Error::InvalidRedirect)?),
            None => None,
        };
        let ttl = match req.ttl_seconds {
            Some(t) if t < policy.min_ttl_seconds || t > policy.max_ttl_seconds => {
                return Err(field(
                    "ttl_seconds",
                    format!(
                        "ttl_seconds must be between {} and {}",
                        policy.min_ttl_seconds, policy.max_ttl_seconds
                    ),
                ));
            }
            Some(t) => t,
            None if method.has_code() => policy.code_ttl_seconds,
            None => policy.link_ttl_seconds,
        };
        let addr = address::parse(&req.email, &self.0.address_options)
            .map_err(|e| Error::InvalidEmail(e.to_string()))?;
        if self
            .0
            .disposable
            .as_ref()
            .is_some_and(|d| d.contains(&addr.ascii_domain))
        {
            return Err(Error::DisposableDomain);
        }
        let email_key = addr.normalized.to_lowercase();
        // A replay of an Idempotency-Key answers without spending rate-limit cells or DNS
        // lookups; the writer checks again for races.
        if let Some(reply) = self
            .idempotent_replay(&app.id, idempotency.as_ref())
            .await?
        {
            return Ok(reply);
        }
        limited(
            self.0
                .limiter
                .check_create(&app.id, &email_key, &addr.ascii_domain, client_ip),
        )?;
        if self.0.check_dns_on_create {
            self.check_domain(&addr.ascii_domain).await?;
        }
        let locale =
            templates::pick_locale(req.locale.as_deref(), &policy.default_locale).to_string();

        let id = VerificationId::generate(now);
        let expires_at = now.plus(Duration::from_secs(ttl));
        let code = if method.has_code() {
            let alphabet = policy.code_alphabet.as_bytes();
            let code =
                super::code::draw(alphabet, policy.code_length).map_err(|_| Error::Crypto)?;
            let (kid, mac) = self.0.keys.code_mac(id, &code);
            let sealed = self
                .0
                .keys
                .seal_code(id, &code)
                .map_err(|_| Error::Crypto)?;
            Some(CodeState {
                kid,
                mac: crate::apps::encode_hex(&mac),
                sealed,
                attempts: 0,
                max_attempts: policy.max_attempts,
            })
        } else {
            None
        };
        let v = Verification {
            id,
            app: app.id.clone(),
            email: addr.normalized.clone(),
            email_key,
            ascii_domain: addr.ascii_domain.clone(),
            ascii_email: addr.ascii_email.clone(),
            purpose,
            subject: req.subject,
            method,
            locale,
            redirect_url,
            metadata: req.metadata,
            created_at: now,
            expires_at,
            verified_at: None,
            updated_at: now,
            status: Status::Pending,
            code,
            delivery: Delivery {
                status: DeliveryStatus::Queued,
                attempts: 0,
                last_error: None,
                sent_at: None,
            },
            prefetches: Vec::new(),
            callback: None,
        };
        let watch_token = self.0.keys.sign(TokenKind::Watch, id, expires_at);
        let body = serde_json::to_string(&Created {
            email: &v.email,
            expires_at: expires_at.to_rfc3339(),
            id,
            method: method.as_str(),
            purpose: &v.purpose,
            status: "pending",
            watch_token: &watch_token,
        })
        .map_err(store::Error::from)?;
        let mail = self.email_entry(app, &v, now);
        let this = self.clone();
        let (reply, superseded) = self
            .0
            .store
            .write(move |tx| -> Result<(Reply, Option<Method>)> {
                if let Some((key, hash)) = &idempotency
                    && let Some(prev) = tx.idempotency(&v.app, key)?
                    && prev
                        .created_at
                        .plus(Duration::from_secs(this.0.policy.idempotency_ttl_seconds))
                        > now
                {
                    if &prev.request_hash != hash {
                        return Err(Error::IdempotencyConflict);
                    }
                    return Ok((
                        Reply {
                            status: prev.status,
                            body: prev.body,
                        },
                        None,
                    ));
                }
                let mut superseded = None;
                if let Some(old_id) = tx.current(&v.app, &v.purpose, &v.email_key)?
                    && let Some(mut old) = tx.verification(old_id)?
                {
                    old.expire_if_due(now);
                    if old.supersede(now) {
                        superseded = Some(old.method);
                        tx.put_verification(&old)?;
                    }
                }
                tx.insert_verification(&v)?;
                tx.set_current(&v.app, &v.purpose, &v.email_key, v.id);
                tx.insert_outbox(&mail)?;
                if let Some((key, hash)) = &idempotency {
                    tx.put_idempotency(
                        &v.app,
                        key,
                        &IdempotencyRecord {
                            request_hash: hash.clone(),
                            status: 202,
                            body: body.clone(),
                            created_at: now,
                        },
                    )?;
                }
                Ok((Reply { status: 202, body }, superseded))
            })
            .await?;
        if let Some(m) = superseded {
            self.0.metrics.event("superseded", m);
        }
        self.0.metrics.event("created", method);
        self.0.mail_ready.notify_waiters();
        Ok(reply)
    }

    /// The remembered answer for a repeated Idempotency-Key, if there is one.
    ///
    /// # Errors
    /// [`Error::IdempotencyConflict`] for the same key with another body; a store failure.
    async fn idempotent_replay(
        &self,
        app: &str,
        idempotency: Option<&(String, String)>,
    ) -> Result<Option<Reply>> {
        let Some((key, hash)) = idempotency.cloned() else {
            return Ok(None);
        };
        let app = app.to_string();
        let ttl = Duration::from_secs(self.0.policy.idempotency_ttl_seconds);
        let now = self.now();
        let prev = self
            .0
            .store
            .lookup(move |r| r.idempotency(&app, &key))
            .await?;
        match prev {
            Some(p) if p.created_at.plus(ttl) > now => {
                if p.request_hash == hash {
                    Ok(Some(Reply {
                        status: p.status,
                        body: p.body,
                    }))
                } else {
                    Err(Error::IdempotencyConflict)
                }
            }
            _ => Ok(None),
        }
    }

    /// `POST /v1/addresses/validate` (DESIGN §3.4): syntax, normalization, typo suggestion,
    /// disposable flag and, when asked, DNS deliverability. Invalid syntax is an answer
    /// (`"valid": false`), not an error.
    pub async fn validate_address(&self, email: &str, check_dns: bool) -> Value {
        let suggest = |local: &str, domain: &str| {
            address::suggest::suggest_domain(domain).map(|d| format!("{local}@{d}"))
        };
        let addr = match address::parse(email, &self.0.address_options) {
            Ok(a) => a,
            Err(e) => {
                let suggestion = email
                    .rsplit_once('@')
                    .and_then(|(l, d)| suggest(l.trim(), &d.trim().to_ascii_lowercase()));
                return json!({"valid": false, "reason": e.to_string(), "suggestion": suggestion});
            }
        };
        let deliverability = if check_dns {
            Some(match &self.0.dns {
                Some(checker) => deliverability_json(&checker.check(&addr.ascii_domain).await),
                None => {
                    json!({"status": "unknown", "mx": [], "reason": "DNS checks are not available on this daemon"})
                }
            })
        } else {
            None
        };
        json!({
            "valid": true,
            "normalized": addr.normalized,
            "ascii_email": addr.ascii_email,
            "smtputf8": addr.smtputf8,
            "local_part": addr.local_part,
            "domain": addr.domain,
            "disposable": self.0.disposable.as_ref().is_some_and(|d| d.contains(&addr.ascii_domain)),
            "deliverability": deliverability,
            "suggestion": suggest(&addr.local_part, &addr.ascii_domain),
        })
    }

    /// Applies the DNS deliverability policy to a domain, when checks are on.
    ///
    /// # Errors
    /// [`Error::UndeliverableDomain`].
    pub async fn check_domain(&self, ascii_domain: &str) -> Result<()> {
        let Some(checker) = &self.0.dns else {
            return Ok(());
        };
        match checker.check(ascii_domain).await {
            Deliverability::Deliverable { .. } => Ok(()),
            Deliverability::Undeliverable { reason } => Err(Error::UndeliverableDomain {
                reason: reason.code(),
                message: reason.to_string(),
            }),
            Deliverability::Unknown { reason } => {
                if self.0.on_dns_failure == OnFailure::Accept {
                    tracing::debug!(
                        domain = ascii_domain,
                        reason,
                        "DNS could not decide; accepting"
                    );
                    Ok(())
                } else {
                    Err(Error::UndeliverableDomain {
                        reason: "dns_unavailable",
                        message: "We could not check that the domain name accepts email. Try again later.".into(),
                    })
                }
            }
        }
    }

    fn email_entry(&self, app: &App, v: &Verification, now: UnixTime) -> OutboxEntry {
        let msg_id = MessageId::generate(now);
        let (from, domain) = if app.from.is_empty() {
            let from = &self.0.default_from;
            (from.clone(), crate::mail::message_id_domain(from))
        } else {
            (app.from.clone(), app.message_id_domain.clone())
        };
        OutboxEntry::new(
            msg_id,
            v.id,
            &v.app,
            now,
            Payload::Email(EmailJob {
                message_id: format!("{}.{}@{}", v.id, msg_id, domain),
                from,
                to: v.email.clone(),
                envelope_to: v.ascii_email.clone().unwrap_or_else(|| v.email.clone()),
            }),
        )
    }

    /// Writes the callback entry for `event` if the app has a callback URL.
    pub(crate) fn callback(
        &self,
        tx: &mut Tx<'_>,
        v: &Verification,
        event: &str,
        now: UnixTime,
    ) -> store::Result<()> {
        if !self.takes_callbacks(&v.app) {
            return Ok(());
        }
        let id = MessageId::generate(now);
        let body = json!({
            "type": event,
            "timestamp": now.to_rfc3339(),
            "data": self.data_json(v, now),
        });
        tx.insert_outbox(&OutboxEntry::new(
            id,
            v.id,
            &v.app,
            now,
            Payload::Callback(CallbackJob {
                event: event.to_string(),
                webhook_id: id.to_string(),
                body,
            }),
        ))
    }

    fn data_json(&self, v: &Verification, now: UnixTime) -> Value {
        json!({
            "id": v.id.to_string(),
            "email": v.email,
            "purpose": v.purpose,
            "subject": v.subject,
            "metadata": v.metadata,
            "status": v.status_at(now).as_str(),
            "method": v.method.as_str(),
            "verified_at": v.verified_at.map(UnixTime::to_rfc3339),
        })
    }

    /// The JSON of `GET /v1/verifications/{id}`.
    pub fn view_json(&self, v: &Verification) -> Value {
        let now = self.now();
        json!({
            "id": v.id.to_string(),
            "status": v.status_at(now).as_str(),
            "email": v.email,
            "purpose": v.purpose,
            "subject": v.subject,
            "method": v.method.as_str(),
            "locale": v.locale,
            "created_at": v.created_at.to_rfc3339(),
            "expires_at": v.expires_at.to_rfc3339(),
            "verified_at": v.verified_at.map(UnixTime::to_rfc3339),
            "metadata": v.metadata,
            "attempts_remaining": v.code.as_ref().map(|c| c.max_attempts.saturating_sub(c.attempts)),
            "delivery": {
                "status": v.delivery.status,
                "attempts": v.delivery.attempts,
                "last_error": v.delivery.last_error,
                "sent_at": v.delivery.sent_at.map(UnixTime::to_rfc3339),
            },
            "callback": v.callback.as_ref().map(|c| json!({
                "event": c.event,
                "status": match c.status { DeliveryStatus::Sent => "delivered", DeliveryStatus::Queued => "queued", DeliveryStatus::Retrying => "retrying", DeliveryStatus::Failed => "failed" },
                "attempts": c.attempts,
                "last_error": c.last_error,
                "updated_at": c.updated_at.to_rfc3339(),
            })),
            "prefetches": v.prefetches.iter().map(|p| json!({
                "at": p.at.to_rfc3339(), "method": p.method, "user_agent": p.user_agent, "network": p.network,
            })).collect::<Vec<_>>(),
        })
    }

    /// Reads a verification of `app`.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a malformed id, a missing one or another app's.
    pub async fn get(&self, app: &App, id: &str) -> Result<Verification> {
        let id: VerificationId = id.parse().map_err(|_| Error::NotFound)?;
        let v = self.0.store.lookup(move |r| r.verification(id)).await?;
        match v {
            Some(v) if v.app == app.id => Ok(v),
            _ => Err(Error::NotFound),
        }
    }

    async fn resolve(
        &self,
        app: &App,
        id: Option<&str>,
        email: Option<&str>,
        purpose: Option<&str>,
    ) -> Result<VerificationId> {
        match (id, email) {
            (Some(id), None) => id.parse().map_err(|_| Error::NotFound),
            (None, Some(email)) => {
                let purpose = purpose.unwrap_or("signup").to_string();
                check_purpose(&purpose)?;
                let addr = address::parse(email, &self.0.address_options)
                    .map_err(|e| Error::InvalidEmail(e.to_string()))?;
                let key = addr.normalized.to_lowercase();
                let app_id = app.id.clone();
                self.0
                    .store
                    .lookup(move |r| r.current(&app_id, &purpose, &key))
                    .await?
                    .ok_or(Error::NotFound)
            }
            (Some(_), Some(_)) => Err(field("id", "give either id or email, not both")),
            (None, None) => Err(field("id", "give id, or email and purpose")),
        }
    }

    /// Checks a code (DESIGN §3.2). The attempt is counted in the same durable write that
    /// decides the answer, and the answer is released only after that write is synced.
    ///
    /// # Errors
    /// Wrong code, expired, locked, closed, not found, invalid input, or a store failure.
    pub async fn check(&self, app: &App, req: CheckRequest) -> Result<Value> {
        let client_ip = parse_client_ip(req.client_ip.as_deref())?;
        let id = match self
            .resolve(
                app,
                req.id.as_deref(),
                req.email.as_deref(),
                req.purpose.as_deref(),
            )
            .await
        {
            Ok(id) => id,
            Err(Error::NotFound) => return Err(self.check_not_found()),
            Err(e) => return Err(e),
        };
        let now = self.now();
        // Junk that cannot be a code is still an attempt; it just never matches.
        let code = super::code::normalize(&req.code, self.0.policy.code_length.saturating_mul(2));
        let app_id = app.id.clone();
        let this = self.clone();
        let checked = self
            .0
            .store
            .write(move |tx| -> Result<(CodeCheck, Verification)> {
                let mut v = owned(tx, id, &app_id)?;
                // Limits apply once the verification is known to exist for this app, so made-up
                // ids cannot fill the limiter's tables; checking here (in-memory, sub-µs) saves
                // a separate store read.
                limited(
                    this.0
                        .limiter
                        .check_code(&app_id, &id.to_string(), client_ip),
                )?;
                let was_pending = v.status == Status::Pending;
                let keys = &this.0.keys;
                let outcome = v.check_code(now, |c: &CodeState| {
                    let Some(code) = code.as_deref() else {
                        return false;
                    };
                    let Some(mac) = crate::apps::decode_hex(&c.mac) else {
                        return false;
                    };
                    keys.code_matches(&c.kid, id, code, &mac)
                });
                // A pending verification always changed (the attempt was counted, or its status
                // moved); a final one never does, so repeats cost no write.
                if was_pending {
                    tx.put_verification(&v)?;
                }
                match outcome {
                    CodeCheck::Verified { first: true } => {
                        this.callback(tx, &v, "verification.verified", now)?;
                    }
                    CodeCheck::Invalid { remaining: 0 }
                        if was_pending && v.status == Status::Locked =>
                    {
                        this.callback(tx, &v, "verification.locked", now)?;
                    }
                    CodeCheck::Expired { first: true } => {
                        this.callback(tx, &v, "verification.expired", now)?;
                    }
                    _ => {}
                }
                Ok((outcome, v))
            })
            .await;
        let (outcome, v) = match checked {
            Ok(x) => x,
            Err(Error::NotFound) => return Err(self.check_not_found()),
            Err(e) => return Err(e),
        };
        self.wake_for_callbacks(&v.app);
        let m = &self.0.metrics;
        let result = |r: &str| m.code_checks.with_label_values(&[r]).inc();
        match outcome {
            CodeCheck::Verified { first } => {
                result("verified");
                if first {
                    m.event("verified", v.method);
                }
                Ok(json!({
                    "status": "verified",
                    "id": v.id.to_string(),
                    "email": v.email,
                    "subject": v.subject,
                    "purpose": v.purpose,
                    "verified_at": v.verified_at.map(UnixTime::to_rfc3339),
                }))
            }
            CodeCheck::Invalid { remaining } => {
                result("invalid");
                if remaining == 0 && v.status == Status::Locked {
                    m.event("locked", v.method);
                }
                Err(Error::InvalidCode { remaining })
            }
            CodeCheck::Locked => {
                result("locked");
                Err(Error::Locked)
            }
            CodeCheck::Expired { first } => {
                result("expired");
                if first {
                    m.event("expired", v.method);
                }
                Err(Error::Expired)
            }
            CodeCheck::Closed(s) => {
                result("closed");
                Err(Error::Closed(s))
            }
            CodeCheck::NoCode => Err(Error::NoCode),
        }
    }

    fn check_not_found(&self) -> Error {
        self.0
            .metrics
            .code_checks
            .with_label_values(&["not_found"])
            .inc();
        Error::NotFound
    }

    /// Charges the recipient's mail limits (`per_address`, `per_domain`) for sending `v`'s mail
    /// again, when it is still pending (a closed verification gets no mail).
    ///
    /// # Errors
    /// [`Error::RateLimited`].
    pub(crate) fn charge_resend(&self, v: &Verification) -> Result<()> {
        if v.status_at(self.now()) == Status::Pending {
            limited(
                self.0
                    .limiter
                    .check_resend(&v.app, &v.email_key, &v.ascii_domain),
            )?;
        }
        Ok(())
    }

    /// Queues the mail again (DESIGN §3.3): same code and link.
    ///
    /// # Errors
    /// Not found, expired, closed, or a store failure.
    pub async fn resend(&self, app: &App, id: &str) -> Result<Value> {
        let current = self.get(app, id).await?;
        self.charge_resend(&current)?;
        let id = current.id;
        let now = self.now();
        let app_id = app.id.clone();
        let app = self.0.apps.get(&app_id).ok_or(Error::NotFound)?;
        let this = self.clone();
        let v = self
            .0
            .store
            .write(move |tx| -> Result<Verification> {
                let mut v = owned(tx, id, &app_id)?;
                if v.expire_if_due(now) {
                    tx.put_verification(&v)?;
                    this.callback(tx, &v, "verification.expired", now)?;
                    return Ok(v);
                }
                match v.status {
                    Status::Pending => {}
                    Status::Expired => return Err(Error::Expired),
                    s => return Err(Error::Closed(s)),
                }
                v.delivery.status = DeliveryStatus::Queued;
                tx.put_verification(&v)?;
                tx.insert_outbox(&this.email_entry(&app, &v, now))?;
                Ok(v)
            })
            .await?;
        if v.status == Status::Expired {
            self.0.metrics.event("expired", v.method);
            return Err(Error::Expired);
        }
        self.0.metrics.event("resent", v.method);
        self.0.mail_ready.notify_waiters();
        Ok(json!({"id": v.id.to_string(), "status": "pending"}))
    }

    /// Cancels a pending verification (DESIGN §3.3).
    ///
    /// # Errors
    /// Not found, already final, or a store failure.
    pub async fn cancel(&self, app: &App, id: &str) -> Result<Value> {
        let id: VerificationId = id.parse().map_err(|_| Error::NotFound)?;
        let now = self.now();
        let app_id = app.id.clone();
        let this = self.clone();
        let (v, res) = self
            .0
            .store
            .write(
                move |tx| -> Result<(Verification, std::result::Result<(), Status>)> {
                    let mut v = owned(tx, id, &app_id)?;
                    let was_pending = v.status == Status::Pending;
                    let res = v.cancel(now);
                    if was_pending {
                        tx.put_verification(&v)?;
                        if v.status == Status::Expired {
                            this.callback(tx, &v, "verification.expired", now)?;
                        }
                    }
                    Ok((v, res))
                },
            )
            .await?;
        match res {
            Ok(()) => {
                self.0.metrics.event("canceled", v.method);
                Ok(json!({"id": v.id.to_string(), "status": "canceled"}))
            }
            Err(Status::Expired) => Err(Error::Expired),
            Err(s) => Err(Error::Closed(s)),
        }
    }

    /// What the confirm page shows for `token` (no state change).
    ///
    /// # Errors
    /// A store failure.
    pub async fn link_view(&self, token: &str) -> Result<LinkView> {
        let now = self.now();
        let id = match self.0.keys.verify(token, TokenKind::Link, now) {
            Ok(c) => c.verification,
            Err(TokenError::Expired(id)) => id,
            Err(_) => return Ok(LinkView::Invalid),
        };
        let v = self.0.store.lookup(move |r| r.verification(id)).await?;
        Ok(match v {
            Some(v) => LinkView::Found {
                id: v.id,
                status: v.status_at(now),
                email: v.email.clone(),
                locale: v.locale.clone(),
                redirect_url: v.redirect_url.clone(),
            },
            None => LinkView::Invalid,
        })
    }

    /// Records a pre-click fetch of the confirm page (scanner telemetry). Best effort.
    pub async fn record_prefetch(
        &self,
        id: VerificationId,
        method: &str,
        user_agent: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) {
        let now = self.now();
        let p = Prefetch {
            at: now,
            method: method.to_string(),
            user_agent: user_agent.map(|u| u.chars().take(MAX_USER_AGENT_LEN).collect()),
            network: client.map(crate::verification::network_prefix),
        };
        self.0.metrics.prefetches.inc();
        let r = self
            .0
            .store
            .write(move |tx| -> Result<()> {
                if let Some(mut v) = tx.verification(id)?
                    && v.status_at(now) == Status::Pending
                {
                    v.record_prefetch(p);
                    tx.put_verification(&v)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot record prefetch");
        }
    }

    /// The confirm button (DESIGN §3.5). Returns the view after the attempt.
    ///
    /// # Errors
    /// A store failure.
    pub async fn confirm(&self, token: &str) -> Result<LinkView> {
        let now = self.now();
        let id = match self.0.keys.verify(token, TokenKind::Link, now) {
            Ok(c) => c.verification,
            // A genuine but expired token: show the state (expired) without writing.
            Err(TokenError::Expired(_)) => return self.link_view(token).await,
            Err(_) => return Ok(LinkView::Invalid),
        };
        let this = self.clone();
        let r = self
            .0
            .store
            .write(move |tx| -> Result<Option<(Verification, LinkConfirm)>> {
                let Some(mut v) = tx.verification(id)? else {
                    return Ok(None);
                };
                let r = v.confirm_link(now);
                match r {
                    LinkConfirm::Verified { first: true } => {
                        tx.put_verification(&v)?;
                        this.callback(tx, &v, "verification.verified", now)?;
                    }
                    LinkConfirm::Expired { first: true } => {
                        tx.put_verification(&v)?;
                        this.callback(tx, &v, "verification.expired", now)?;
                    }
                    _ => {}
                }
                Ok(Some((v, r)))
            })
            .await?;
        let Some((v, r)) = r else {
            return Ok(LinkView::Invalid);
        };
        self.wake_for_callbacks(&v.app);
        match r {
            LinkConfirm::Verified { first: true } => self.0.metrics.event("verified", v.method),
            LinkConfirm::Expired { first: true } => self.0.metrics.event("expired", v.method),
            _ => {}
        }
        Ok(LinkView::Found {
            id: v.id,
            status: v.status_at(now),
            email: v.email.clone(),
            locale: v.locale.clone(),
            redirect_url: v.redirect_url.clone(),
        })
    }

    /// The sweeper's resume position (it holds no invariant a panicking holder could break).
    fn sweep_position(&self) -> std::sync::MutexGuard<'_, SweepPosition> {
        self.0
            .sweep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks due verifications expired and queues their callbacks. Returns how many.
    ///
    /// # Errors
    /// A store failure.
    pub async fn sweep_expired(&self) -> Result<usize> {
        let now = self.now();
        let after = {
            let mut p = self.sweep_position();
            if p.full_at.elapsed() >= FULL_SWEEP_EVERY {
                p.after = None;
                p.full_at = std::time::Instant::now();
            }
            p.after
        };
        let found = self
            .0
            .store
            .read(move |r| r.expired_by(after, now, SWEEP_BATCH))
            .await?;
        {
            let mut p = self.sweep_position();
            p.after = if found.len() >= SWEEP_BATCH {
                found.last().copied()
            } else {
                // Everything due by `now` was seen: resume near it, not at the start.
                let mark = (
                    now.minus(SWEEP_MARGIN),
                    VerificationId::from_bytes([0xff; 16]),
                );
                // Never back: the margin must not undo the position of a full batch.
                Some(after.map_or(mark, |a| a.max(mark)))
            };
        }
        let ids: Vec<VerificationId> = found.into_iter().map(|(_, id)| id).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let this = self.clone();
        let expired = self
            .0
            .store
            .write(move |tx| -> Result<Vec<Method>> {
                let mut out = Vec::new();
                for id in ids {
                    if let Some(mut v) = tx.verification(id)?
                        && v.expire_if_due(now)
                    {
                        tx.put_verification(&v)?;
                        this.callback(tx, &v, "verification.expired", now)?;
                        out.push(v.method);
                    }
                }
                Ok(out)
            })
            .await?;
        for m in &expired {
            self.0.metrics.event("expired", *m);
        }
        self.wake_mail();
        Ok(expired.len())
    }

    /// Forgets Idempotency-Keys older than their retention. Returns how many.
    ///
    /// # Errors
    /// A store failure.
    pub async fn prune_idempotency(&self) -> Result<usize> {
        let ttl = Duration::from_secs(self.0.policy.idempotency_ttl_seconds);
        let cutoff = self.now().minus(ttl);
        Ok(self.0.store.prune_idempotency(cutoff, SWEEP_BATCH).await?)
    }

    /// Writes the delivery-failed transition and its callback (used by the outbox worker).
    pub(crate) fn mark_delivery_failed(
        &self,
        tx: &mut Tx<'_>,
        v: &mut Verification,
        reason: &str,
        now: UnixTime,
    ) -> store::Result<bool> {
        v.delivery.status = DeliveryStatus::Failed;
        v.delivery.last_error = Some(reason.to_string());
        let changed = v.status == Status::Pending;
        if changed {
            v.status = Status::DeliveryFailed;
            v.updated_at = now;
            self.callback(tx, v, "verification.delivery_failed", now)?;
        }
        tx.put_verification(v)?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{MAX_METADATA_DEPTH, json_depth};

    /// `{"a": [[…[1]…]]}` with `depth` levels of objects and arrays in all.
    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 1..depth {
            v = json!([v]);
        }
        json!({ "a": v })
    }

    #[test]
    fn json_depth_counts_nested_arrays_and_objects() {
        let cases = [
            (json!(null), 0),
            (json!("text"), 0),
            (json!({}), 1),
            (json!([]), 1),
            (json!({"a": 1, "b": "x"}), 1),
            (json!({"a": [1]}), 2),
            (json!({"a": {"b": {}}}), 3),
            // The deepest branch counts, wherever it is.
            (json!({"a": 1, "b": [[{"c": []}]], "c": {"d": 1}}), 5),
            (json!([[], [[[]]], []]), 4),
        ];
        for (v, depth) in cases {
            assert_eq!(json_depth(&v), depth, "{v}");
        }
        for d in [1, 2, 31, 32, 33, 126, 1000] {
            assert_eq!(json_depth(&nested(d)), d);
        }
    }

    /// The limit leaves room for the two levels a callback adds and for serde_json's 128.
    #[test]
    fn metadata_at_the_limit_still_reads_back_inside_a_callback_body() {
        let body = json!({"type": "t", "data": {"metadata": nested(MAX_METADATA_DEPTH)}});
        assert_eq!(json_depth(&body), MAX_METADATA_DEPTH + 2);
        let back: Result<Value, _> = serde_json::from_str(&body.to_string());
        assert_eq!(back.ok(), Some(body));
        // What the limit prevents: accepted by the request's parse, unreadable as a callback.
        let deep = nested(126);
        let request = json!({"email": "a@example.com", "metadata": deep});
        assert!(serde_json::from_str::<Value>(&request.to_string()).is_ok());
        let body = json!({"type": "t", "data": {"metadata": deep}});
        assert!(serde_json::from_str::<Value>(&body.to_string()).is_err());
    }
}
