//! The outbox workers, one loop per lane: claim due entries with a lease (a batch per write),
//! deliver them as slots free (mail through the transport, callbacks through the signed HTTP
//! sender), and record the outcome. Claims go through the single store writer, so one entry is
//! never claimed twice within a lease; an entry whose worker died is claimed again when its
//! lease runs out. An attempt that starts late renews its claim's lease first ([`hold`]), claims
//! not started are released when the worker stops ([`release`]), and an outcome is written only
//! while its claim still holds ([`outcome_applies`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::retry::{RetryPolicy, unit_random};
use super::transport::{Outcome, OutgoingMail, Transport};
use super::{Lane, OutboxEntry, Payload, State};
use crate::callbacks::{CallbackSender, Signer, give_up};
use crate::clock::UnixTime;
use crate::id::MessageId;
use crate::mail::{Composed, parse_mailbox};
use crate::store::{self, DuePosition, Tx};
use crate::templates::MailContext;
use crate::verification::service::{Error, Service};
use crate::verification::{CallbackState, DeliveryStatus, Status, Verification};

/// Most entries one worker pass claims (one store write for all of them).
const CLAIM_BATCH: usize = 64;
/// Deliveries whose outcome is still being written, at most. A delivery frees its slot (one of
/// `concurrency`) as soon as the relay or the app has answered, so the next one starts while
/// the outcome waits for its fsync; this bounds how many such writes may wait.
const RECORDING: usize = 1024;
/// Longest idle wait between passes when nothing wakes the worker.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// A safety net: the worker rescans its due index from the start this often. (The position
/// never passes an unclaimed entry: leased entries move to the end of their lease, which is
/// ahead of it, and anything committed behind it moves it back.)
const FULL_SCAN_EVERY: Duration = Duration::from_secs(60);

/// Where the next scan of the due index starts. Claimed entries leave tombstones at the front
/// of the index; resuming after the last entry seen skips them (a drain otherwise rescans
/// every tombstone on every pass: a quarter of the worker's CPU in a 30,000-mail drain).
/// Anything committed before the position moves it back ([`Store::take_due_low`]).
///
/// [`Store::take_due_low`]: crate::store::Store::take_due_low
#[derive(Debug)]
struct Cursor {
    after: Option<DuePosition>,
    since_full: tokio::time::Instant,
}

impl Cursor {
    fn new() -> Self {
        Cursor {
            after: None,
            since_full: tokio::time::Instant::now(),
        }
    }

    /// The start of the next scan, given the earliest due time committed since the last one.
    fn start(&mut self, committed_low: Option<UnixTime>) -> Option<DuePosition> {
        if self.since_full.elapsed() >= FULL_SCAN_EVERY {
            self.after = None;
        }
        if let (Some(after), Some(low)) = (self.after, committed_low)
            && low <= after.at
        {
            self.after = Some(DuePosition::before(low));
        }
        if self.after.is_none() {
            self.since_full = tokio::time::Instant::now();
        }
        self.after
    }

    /// After a scan that returned `seen` (in index order).
    fn advance(&mut self, seen: &[DuePosition]) {
        self.after = seen.last().copied();
    }
}

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How long a claim lasts.
    pub lease: Duration,
    /// Retry schedule.
    pub retry: RetryPolicy,
    /// Concurrent deliveries.
    pub concurrency: usize,
    /// Global pacing toward the relay, messages per second; 0 = unpaced.
    pub max_per_second: u32,
}

/// Paces sends toward the relay: workers wait for a cell instead of requests being refused.
type Pacer = governor::DefaultDirectRateLimiter;

/// How callbacks are delivered.
pub struct CallbackLane {
    /// The HTTP client.
    pub sender: CallbackSender,
    /// Signers per app id (apps with a callback URL).
    pub signers: HashMap<String, Signer>,
    /// Retries stop this long after the entry was created.
    pub horizon: Duration,
}

/// What a lane delivers with.
#[derive(Clone)]
pub enum Deliverer {
    /// Mail through a transport.
    Mail(Transport),
    /// Callbacks to the apps.
    Callbacks(Arc<CallbackLane>),
}

impl Deliverer {
    fn lane(&self) -> Lane {
        match self {
            Deliverer::Mail(_) => Lane::Email,
            Deliverer::Callbacks(_) => Lane::Callback,
        }
    }
}

/// A claimed entry, ready to deliver.
struct Claimed {
    entry: OutboxEntry,
    verification: Option<Verification>,
}

/// Runs one lane until `shutdown` turns true.
pub async fn run(
    service: Service,
    transport: Deliverer,
    cfg: WorkerConfig,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sem = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    let recording = Arc::new(tokio::sync::Semaphore::new(RECORDING));
    let pacer: Option<Arc<Pacer>> = std::num::NonZeroU32::new(cfg.max_per_second).map(|n| {
        Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
            n,
        )))
    });
    let mut cursor = Cursor::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let notified = wake.notified();
        let did = match pass(
            &service,
            &transport,
            &cfg,
            (&sem, &recording),
            pacer.as_ref(),
            &shutdown,
            &mut cursor,
        )
        .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "outbox pass failed");
                0
            }
        };
        if did > 0 {
            continue;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(IDLE_POLL) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Let in-flight deliveries finish and their outcomes be written (they hold permits), then
    // say goodbye to the relay.
    let _ = sem.acquire_many(cfg.concurrency.max(1) as u32).await;
    let _ = recording.acquire_many(RECORDING as u32).await;
    if let Deliverer::Mail(Transport::Smtp(t)) = &transport {
        t.close_idle().await;
    }
}

/// One pass: claims what is due (a batch) and starts each delivery as a slot frees. Returns
/// how many due entries it handled (claimed, or taken out of the due index without a
/// delivery): anything but 0 means the next pass may find more due at once.
///
/// A claim's lease is meant to cover one attempt from its start, and entries late in a batch
/// wait for a slot (and the pacer) first: an attempt that starts more than [`RENEW_AFTER`]
/// after its claim renews the lease before it sends ([`hold`]). Otherwise a batch of slow sends
/// would outlast the leases of the entries still waiting, and a later pass would claim and send
/// them again while the first attempt was still running. Entries claimed but not started when
/// the worker stops are released ([`release`]): due again at once, not after their lease.
async fn pass(
    service: &Service,
    transport: &Deliverer,
    cfg: &WorkerConfig,
    (sem, recording): (&Arc<tokio::sync::Semaphore>, &Arc<tokio::sync::Semaphore>),
    pacer: Option<&Arc<Pacer>>,
    shutdown: &watch::Receiver<bool>,
    cursor: &mut Cursor,
) -> Result<usize, Error> {
    let now = service.now();
    let lane = transport.lane();
    let after = cursor.start(service.store().take_due_low(lane));
    let seen = service
        .store()
        .read(move |r| r.due(lane, after, now, CLAIM_BATCH))
        .await;
    let seen = match seen {
        Ok(s) => s,
        Err(e) => {
            cursor.after = None;
            return Err(e.into());
        }
    };
    if seen.is_empty() {
        return Ok(0);
    }
    let resume = cursor.after;
    cursor.advance(&seen);
    let lease = cfg.lease;
    // Unsynced: a claim lost in a crash only makes the entry due again (see write_unsynced).
    let claim = service
        .store()
        .write_unsynced(move |tx| claim(tx, lane, &seen, now, lease))
        .await;
    let Claim {
        claimed,
        dropped,
        failed,
        unreadable,
    } = match claim {
        Ok(c) => c,
        Err(e) => {
            // Nothing was claimed: scan these entries again next time.
            cursor.after = resume;
            return Err(e);
        }
    };
    // Counted and logged once the claim is committed.
    let m = service.metrics();
    m.outbox_attempts
        .with_label_values(&[lane.as_str(), "dropped"])
        .inc_by(u64::try_from(dropped).unwrap_or(u64::MAX));
    for (id, why) in &unreadable {
        tracing::error!(
            entry = %id,
            lane = lane.as_str(),
            error = %why,
            "outbox entry cannot be decoded: taken out of the due index and kept as it is; \
             look at it and drop it with the admin API (verigate outbox show/drop)"
        );
        m.outbox_attempts
            .with_label_values(&[lane.as_str(), "unreadable"])
            .inc();
    }
    for (id, why) in &failed {
        tracing::error!(
            entry = %id,
            lane = lane.as_str(),
            error = %why,
            "outbox entry failed: its verification cannot be decoded"
        );
        m.outbox_attempts
            .with_label_values(&[lane.as_str(), "failed"])
            .inc();
    }
    // Everything taken off the due index counts: a batch of only unreadable or dropped entries
    // is followed by another pass at once, like a batch of deliveries.
    let n = claimed.len() + dropped + failed.len() + unreadable.len();
    let mut waiting = claimed.into_iter();
    while let Some(c) = waiting.next() {
        let Some((slot, record)) = start_slot(sem, recording, pacer, lane, shutdown).await else {
            // Stopping: what was claimed and not started is due again at once.
            release(service, std::iter::once(c).chain(waiting).collect()).await;
            break;
        };
        // Renewed (when it waited) before the pass returns: the next pass must not find this
        // claim's lease run out while its attempt is about to start.
        let Some(c) = hold(service, c, lease).await else {
            continue;
        };
        let service = service.clone();
        let transport = transport.clone();
        let retry = cfg.retry;
        tokio::spawn(async move {
            match &transport {
                Deliverer::Mail(t) => deliver(&service, t, retry, c, slot).await,
                Deliverer::Callbacks(cb) => deliver_callback(&service, cb, retry, c, slot).await,
            }
            drop(record);
        });
    }
    Ok(n)
}

/// What an attempt needs before it starts: a delivery slot, a permit to record its outcome
/// (immediate unless outcome writes stall: there are RECORDING of these for `concurrency`
/// slots) and, for mail, a pacing cell. `None` once `shutdown` turns true.
async fn start_slot(
    sem: &Arc<tokio::sync::Semaphore>,
    recording: &Arc<tokio::sync::Semaphore>,
    pacer: Option<&Arc<Pacer>>,
    lane: Lane,
    shutdown: &watch::Receiver<bool>,
) -> Option<(
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let mut stop = shutdown.clone();
    if *stop.borrow_and_update() {
        return None;
    }
    let ready = async {
        let slot = sem.clone().acquire_owned().await.ok()?;
        let record = recording.clone().acquire_owned().await.ok()?;
        if let Some(p) = pacer.filter(|_| lane == Lane::Email) {
            p.until_ready().await;
        }
        Some((slot, record))
    };
    tokio::select! {
        r = ready => r,
        _ = stop.changed() => None,
    }
}

/// An attempt that starts this long after its claim renews its lease first ([`hold`]). Below
/// every lease's margin over the attempt it covers (5 s for mail, a whole timeout for
/// callbacks), so an attempt that starts sooner still has its whole attempt covered.
const RENEW_AFTER: Duration = Duration::from_secs(2);

/// The claim of `c` as it stands in the store: still scheduled, with the attempt count and lease
/// end the claim (or a renewal) wrote.
fn still_held(current: &OutboxEntry, c: &OutboxEntry) -> bool {
    current.state == State::Scheduled
        && current.attempts == c.attempts
        && current.due_at == c.due_at
}

/// Makes sure `c`'s lease covers its attempt from now: a claim older than [`RENEW_AFTER`] gets
/// its lease renewed to `now + lease`. `None` if the claim no longer holds (its lease ran out
/// and another pass claimed the entry, or an operator retried it: that attempt goes ahead, this
/// one is not made) or the renewal could not be written (the entry is attempted again when its
/// lease runs out).
async fn hold(service: &Service, mut c: Claimed, lease: Duration) -> Option<Claimed> {
    let now = service.now();
    if now < c.entry.due_at.minus(lease).plus(RENEW_AFTER) {
        return Some(c);
    }
    let claimed = c.entry.clone();
    // Unsynced, as the claim: a renewal lost in a crash leaves the claim's earlier lease end.
    let renewed = service
        .store()
        .write_unsynced(move |tx| -> Result<Option<UnixTime>, Error> {
            match tx.outbox(claimed.id)? {
                Some(mut e) if still_held(&e, &claimed) => {
                    e.due_at = now.plus(lease);
                    tx.put_outbox(&e)?;
                    Ok(Some(e.due_at))
                }
                _ => Ok(None),
            }
        })
        .await;
    match renewed {
        Ok(Some(until)) => {
            c.entry.due_at = until;
            Some(c)
        }
        Ok(None) => {
            count_attempt(service, &c.entry, STALE, now);
            None
        }
        Err(e) => {
            tracing::warn!(entry = %c.entry.id, error = %e, "could not renew an outbox lease; the entry is attempted again when the lease runs out");
            None
        }
    }
}

/// Gives back the claims of entries that were not started (the worker is stopping): each one
/// still held is due now, with its attempt uncounted, so a restart takes it at once instead
/// of after its lease. A failure only leaves the leases to run out.
async fn release(service: &Service, claimed: Vec<Claimed>) {
    if claimed.is_empty() {
        return;
    }
    let now = service.now();
    let entries: Vec<OutboxEntry> = claimed.into_iter().map(|c| c.entry).collect();
    let released = service
        .store()
        .write(move |tx| -> Result<usize, Error> {
            let mut n = 0;
            for c in &entries {
                if let Some(mut e) = tx.outbox(c.id)?
                    && still_held(&e, c)
                {
                    e.attempts = e.attempts.saturating_sub(1);
                    e.due_at = now;
                    tx.put_outbox(&e)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await;
    match released {
        Ok(n) => tracing::debug!(released = n, "released the claims of entries not started"),
        Err(e) => {
            tracing::warn!(error = %e, "could not release claims on shutdown; the entries are attempted again when their leases run out");
        }
    }
}

/// What one claim did.
#[derive(Default)]
struct Claim {
    /// Entries leased to this worker, in due order, with their verifications.
    claimed: Vec<Claimed>,
    /// Mail not sent because its verification closed first.
    dropped: usize,
    /// Entries failed because their verification cannot be decoded: (entry, why).
    failed: Vec<(MessageId, String)>,
    /// Entries that cannot be decoded, taken out of the due index: (entry, why).
    unreadable: Vec<(MessageId, String)>,
}

/// Claims the entries of `lane` at the due-index positions `seen`: each one still scheduled and
/// due gets a lease (`due_at` = `now` + `lease`, one more attempt).
///
/// A stored value that cannot be decoded fails only its own entry, never the batch: decoding
/// the same bytes again fails again, so an error here would fail every later claim of the
/// lane too and stop all of its deliveries. An entry that cannot be decoded loses its due-index
/// key and nothing else: re-encoding it as failed would need the fields that cannot be read,
/// and its bytes stay as they are for an operator to look at (the admin API shows it from
/// what can be read, and drops it). An entry whose verification cannot be decoded is failed
/// (it cannot be sent, nor its outcome recorded on the verification). Engine errors still
/// fail the batch: they may pass, and the entries are claimed again next time.
///
/// # Errors
/// An engine failure, or an entry that cannot be encoded (a bug).
fn claim(
    tx: &mut Tx<'_>,
    lane: Lane,
    seen: &[DuePosition],
    now: UnixTime,
    lease: Duration,
) -> Result<Claim, Error> {
    let mut out = Claim::default();
    for p in seen {
        let mut e = match tx.outbox_record(p.id)? {
            None => continue,
            Some(Ok(e)) => e,
            Some(Err(u)) => {
                tx.unindex_outbox(lane, p.at, p.id)?;
                out.unreadable.push((p.id, u.error.to_string()));
                continue;
            }
        };
        if e.state != State::Scheduled || e.due_at > now {
            continue;
        }
        let v = match tx.verification(e.verification) {
            Ok(v) => v,
            Err(store::Error::Decode(why)) => {
                e.state = State::Failed;
                e.last_error =
                    Some("not sent: its verification cannot be read (see the server log)".into());
                tx.put_outbox(&e)?;
                out.failed.push((e.id, why.to_string()));
                continue;
            }
            Err(other) => return Err(other.into()),
        };
        if lane == Lane::Email {
            // Mail is only worth sending while the verification is open.
            let status = v.as_ref().map(|v| v.status_at(now));
            if status != Some(Status::Pending) {
                e.state = State::Dropped;
                e.last_error = Some(match status {
                    Some(s) => format!("not sent: the verification is {}", s.as_str()),
                    None => "not sent: the verification no longer exists".into(),
                });
                tx.put_outbox(&e)?;
                out.dropped += 1;
                continue;
            }
        }
        e.attempts += 1;
        e.due_at = now.plus(lease);
        // Only the entry is written here; the verification learns the attempt count with the
        // outcome (one record write per claim instead of two).
        tx.put_outbox(&e)?;
        out.claimed.push(Claimed {
            entry: e,
            verification: v,
        });
    }
    Ok(out)
}

/// Renders the mail for a claimed entry. A failure here is permanent (the code's key was
/// removed, or a template is broken): retrying would not help.
fn compose(
    service: &Service,
    e: &OutboxEntry,
    v: &Verification,
    now: UnixTime,
) -> Result<OutgoingMail, String> {
    let Payload::Email(job) = &e.payload else {
        return Err("not an email entry".into());
    };
    let link = v.method.has_link().then(|| service.link_url(v));
    let code = match &v.code {
        Some(c) if v.method.has_code() => Some(
            service
                .keys()
                .open_code(v.id, &c.sealed)
                .ok_or("the code cannot be decrypted (was its signing key removed?)")?,
        ),
        _ => None,
    };
    let minutes = now.until(v.expires_at).as_secs().div_ceil(60).max(1);
    let rendered = service
        .templates()
        .render_mail(&MailContext {
            app: &v.app,
            locale: &v.locale,
            purpose: &v.purpose,
            email: &v.email,
            link: link.as_deref(),
            code: code.as_deref(),
            expires_minutes: minutes,
        })
        .map_err(|e| e.to_string())?;
    let from = parse_mailbox(&job.from).map_err(|e| format!("sender: {e}"))?;
    let envelope_from = from.address.as_str().to_string();
    let bytes = Composed {
        from,
        to: job.to.clone(),
        subject: rendered.subject,
        message_id: job.message_id.clone(),
        date: now,
        text: rendered.text,
        html: rendered.html,
    }
    .to_bytes()
    .map_err(|e| e.to_string())?;
    let bytes = match service.dkim() {
        Some(signer) => signer
            .sign(&bytes, now.as_secs())
            .map_err(|e| e.to_string())?,
        None => bytes,
    };
    Ok(OutgoingMail {
        name: e.id.to_string(),
        envelope_from,
        envelope_to: job.envelope_to.clone(),
        bytes,
    })
}

/// Delivers one mail and records the outcome. `slot` is released once the relay has answered:
/// the outcome's write (and fsync) does not hold up the next delivery.
async fn deliver(
    service: &Service,
    transport: &Transport,
    retry: RetryPolicy,
    c: Claimed,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let now = service.now();
    let outcome = match c
        .verification
        .as_ref()
        .map(|v| compose(service, &c.entry, v, now))
    {
        Some(Ok(mail)) => transport.send(mail).await,
        Some(Err(reason)) => Outcome::Reject { reason },
        None => Outcome::Reject {
            reason: "the verification no longer exists".into(),
        },
    };
    drop(slot);
    let done_at = service.now();
    let id = c.entry.id;
    let svc = service.clone();
    let label = match &outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Reject { .. } => "failed",
    };
    let claimed = c.entry.clone();
    let r = service
        .store()
        .write(move |tx| -> Result<&'static str, Error> {
            let Some(mut e) = tx.outbox(id)? else {
                return Ok(label);
            };
            if !outcome_applies(&claimed, &e, &outcome) {
                return Ok(STALE);
            }
            let mut v = tx.verification(e.verification)?;
            if let Some(v) = v.as_mut() {
                v.delivery.attempts = e.attempts;
            }
            // What is recorded: a retry that is not made is a drop or a failure.
            let recorded = match outcome {
                Outcome::Delivered => {
                    e.state = State::Delivered;
                    e.delivered_at = Some(done_at);
                    e.last_error = None;
                    if let Some(v) = v.as_mut() {
                        v.delivery.status = DeliveryStatus::Sent;
                        v.delivery.sent_at = Some(done_at);
                        v.delivery.last_error = None;
                        tx.put_verification(v)?;
                        if svc
                            .apps()
                            .get(&v.app)
                            .is_some_and(|a| a.config.callback_sent_event)
                        {
                            svc.callback(tx, v, "verification.sent", done_at)?;
                        }
                    }
                    label
                }
                Outcome::Retry { reason, after } => {
                    let expired = v
                        .as_ref()
                        .is_none_or(|v| v.status_at(done_at) != Status::Pending);
                    match retry.delay(e.attempts, unit_random()) {
                        Some(d) if !expired => {
                            e.due_at = done_at.plus(after.map_or(d, |a| a.max(d)));
                            e.last_error = Some(reason.clone());
                            if let Some(v) = v.as_mut() {
                                v.delivery.status = DeliveryStatus::Retrying;
                                v.delivery.last_error = Some(reason);
                                tx.put_verification(v)?;
                            }
                            label
                        }
                        _ if expired => {
                            e.state = State::Dropped;
                            e.last_error = Some(format!(
                                "{reason}; not retried: the verification is no longer pending"
                            ));
                            "dropped"
                        }
                        _ => {
                            e.state = State::Failed;
                            e.last_error =
                                Some(format!("{reason}; giving up after {} attempts", e.attempts));
                            if let Some(v) = v.as_mut() {
                                svc.mark_delivery_failed(tx, v, &reason, done_at)?;
                            }
                            "failed"
                        }
                    }
                }
                Outcome::Reject { reason } => {
                    e.state = State::Failed;
                    e.last_error = Some(reason.clone());
                    if let Some(v) = v.as_mut() {
                        svc.mark_delivery_failed(tx, v, &reason, done_at)?;
                    }
                    label
                }
            };
            tx.put_outbox(&e)?;
            Ok(recorded)
        })
        .await;
    match r {
        Ok(label) => {
            count_attempt(service, &c.entry, label, done_at);
            if label == "failed"
                && let Some(v) = &c.verification
            {
                service.metrics().event("delivery_failed", v.method);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, entry = %id, "cannot record delivery outcome; the lease will expire and it will be retried")
        }
    }
}

/// One callback attempt and its outcome: 2xx delivered; 410 and a missing URL or secret fail
/// for good; everything else is retried with backoff (honouring `Retry-After`) until the
/// horizon has passed since the event. `slot` is released once the app has answered, as in
/// [`deliver`].
async fn deliver_callback(
    service: &Service,
    lane: &CallbackLane,
    retry: RetryPolicy,
    c: Claimed,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let now = service.now();
    let outcome = match &c.entry.payload {
        Payload::Callback(job) => {
            let app = service.apps().get(&c.entry.app);
            let url = app.as_ref().and_then(|a| a.config.callback_url.clone());
            match (url, lane.signers.get(&c.entry.app)) {
                (Some(url), Some(signer)) => match serde_json::to_vec(&job.body) {
                    Ok(body) => {
                        lane.sender
                            .send(&url, &job.webhook_id, &body, signer, now.as_secs())
                            .await
                    }
                    Err(e) => Outcome::Reject {
                        reason: format!("cannot encode the event: {e}"),
                    },
                },
                _ => Outcome::Reject {
                    reason: "the app has no callback_url or webhook secret any more".into(),
                },
            }
        }
        Payload::Email(_) => Outcome::Reject {
            reason: "not a callback entry".into(),
        },
    };
    drop(slot);
    let done_at = service.now();
    let id = c.entry.id;
    let horizon = lane.horizon;
    let label = match &outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Reject { .. } => "failed",
    };
    let claimed = c.entry.clone();
    let r = service
        .store()
        .write(move |tx| -> Result<&'static str, Error> {
            let Some(mut e) = tx.outbox(id)? else {
                return Ok(label);
            };
            if !outcome_applies(&claimed, &e, &outcome) {
                return Ok(STALE);
            }
            let event = match &e.payload {
                Payload::Callback(job) => job.event.clone(),
                Payload::Email(_) => String::new(),
            };
            let mut label = label;
            let status = match outcome {
                Outcome::Delivered => {
                    e.state = State::Delivered;
                    e.delivered_at = Some(done_at);
                    e.last_error = None;
                    DeliveryStatus::Sent
                }
                Outcome::Retry { reason, after } => {
                    let delay = retry.delay(e.attempts, unit_random());
                    match delay {
                        Some(d) if !give_up(e.created_at.0, done_at.0, horizon) => {
                            e.due_at = done_at.plus(after.map_or(d, |a| a.max(d)));
                            e.last_error = Some(reason);
                            DeliveryStatus::Retrying
                        }
                        _ => {
                            e.state = State::Failed;
                            e.last_error =
                                Some(format!("{reason}; giving up after {} attempts", e.attempts));
                            label = "failed";
                            DeliveryStatus::Failed
                        }
                    }
                }
                Outcome::Reject { reason } => {
                    e.state = State::Failed;
                    e.last_error = Some(reason);
                    DeliveryStatus::Failed
                }
            };
            if let Some(mut v) = tx.verification(e.verification)? {
                v.callback = Some(CallbackState {
                    event,
                    status,
                    attempts: e.attempts,
                    last_error: e.last_error.clone(),
                    updated_at: done_at,
                });
                tx.put_verification(&v)?;
            }
            tx.put_outbox(&e)?;
            Ok(label)
        })
        .await;
    match r {
        Ok(label) => {
            count_attempt(service, &c.entry, label, done_at);
        }
        Err(e) => {
            tracing::error!(error = %e, entry = %id, "cannot record callback outcome; the lease will expire and it will be retried")
        }
    }
}

/// The `outcome` label of an attempt whose outcome was not recorded (see [`outcome_applies`]).
const STALE: &str = "stale";

/// Whether the outcome of an attempt may be written over the entry as it stands now.
/// `claimed` is the entry as this attempt's claim wrote it, `current` as the outcome's write
/// reads it.
///
/// The attempt still holds its claim when the entry is scheduled with the attempt count and
/// lease end its claim gave it: nothing was written to it since. Otherwise the outcome is
/// stale (a later claim took the entry after this lease ran out, an operator retried it, or
/// another attempt's outcome is already written), and writing it could undo a newer one: a
/// late retry would set a delivered verification back to retrying, a late rejection would fail
/// a verification whose mail went out. Stale outcomes are dropped, with one exception: a
/// stale delivery still completes an entry that is scheduled again (waiting for a retry, or
/// claimed by a newer attempt), because the mail did go out and recording it spares another
/// copy. An entry that is delivered, failed or dropped is never changed.
fn outcome_applies(claimed: &OutboxEntry, current: &OutboxEntry, outcome: &Outcome) -> bool {
    still_held(current, claimed)
        || (current.state == State::Scheduled && matches!(outcome, Outcome::Delivered))
}

/// Counts one attempt of the `claimed` entry by its `outcome` (and its latency, when
/// delivered). A [`STALE`] one, whose claim no longer held (see [`outcome_applies`] and
/// [`hold`]), is logged too.
fn count_attempt(service: &Service, claimed: &OutboxEntry, outcome: &str, done_at: UnixTime) {
    let lane = claimed.lane().as_str();
    if outcome == STALE {
        tracing::warn!(
            entry = %claimed.id,
            lane,
            attempt = claimed.attempts,
            "an attempt's outcome was not recorded: the entry changed since its claim (its lease ran out during the attempt, or an operator retried it); raise delivery.lease_seconds if this repeats"
        );
    }
    let m = service.metrics();
    m.outbox_attempts.with_label_values(&[lane, outcome]).inc();
    if outcome == "delivered" {
        m.delivery_latency
            .with_label_values(&[lane])
            .observe(claimed.created_at.until(done_at).as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::id::{MessageId, VerificationId};
    use crate::outbox::CallbackJob;
    use crate::outbox::EmailJob;
    use crate::store::{Store, codec};

    fn pos(at: u64, b: u8) -> DuePosition {
        DuePosition {
            at: UnixTime(at),
            id: MessageId::from_bytes([b; 16]),
        }
    }

    #[test]
    fn cursor_resumes_after_the_last_seen_entry() {
        let mut c = Cursor::new();
        assert_eq!(c.start(None), None, "first scan from the start");
        c.advance(&[pos(10, 1), pos(20, 2)]);
        assert_eq!(c.start(None), Some(pos(20, 2)));
        // A commit due later than the position changes nothing.
        assert_eq!(c.start(Some(UnixTime(25))), Some(pos(20, 2)));
    }

    #[test]
    fn cursor_moves_back_before_an_earlier_commit() {
        let mut c = Cursor::new();
        c.start(None);
        c.advance(&[pos(100, 1)]);
        let start = c.start(Some(UnixTime(40))).expect("a position");
        assert!(start < pos(40, 0), "{start:?} would skip the key due at 40");
        assert!(start.at == UnixTime(39));
        // Equal due time: the new key may sort before the position by id.
        let mut c = Cursor::new();
        c.start(None);
        c.advance(&[pos(100, 9)]);
        assert_eq!(
            c.start(Some(UnixTime(100))),
            Some(DuePosition::before(UnixTime(100)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cursor_rescans_from_the_start_periodically() {
        let mut c = Cursor::new();
        c.start(None);
        c.advance(&[pos(100, 1)]);
        assert!(c.start(None).is_some());
        tokio::time::advance(FULL_SCAN_EVERY).await;
        assert_eq!(c.start(None), None);
    }

    /// A callback entry of verification `v`, due at `due`; `body` is what it would POST.
    fn callback(
        i: u8,
        v: crate::id::VerificationId,
        due: u64,
        body: serde_json::Value,
    ) -> OutboxEntry {
        let id = MessageId::from_bytes([i; 16]);
        let mut e = OutboxEntry::new(
            id,
            v,
            "shop",
            UnixTime(due),
            Payload::Callback(CallbackJob {
                event: "verification.verified".into(),
                webhook_id: id.to_string(),
                body,
            }),
        );
        e.due_at = UnixTime(due);
        e
    }

    /// Callback metadata nested 126 deep, as a create accepted before the depth limit: the
    /// entry encodes, and its body can never be parsed back.
    fn too_deep() -> serde_json::Value {
        let mut m = serde_json::json!(1);
        for _ in 0..125 {
            m = serde_json::json!([m]);
        }
        serde_json::json!({"type": "verification.verified", "data": {"metadata": {"a": m}}})
    }

    #[tokio::test]
    async fn entries_that_cannot_be_decoded_leave_the_due_index_and_the_rest_of_the_batch_is_claimed()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &StoreConfig::default()).expect("open");
        let v = codec::sample_verification(false);
        let vid = v.id;
        let broken_v = crate::id::VerificationId::from_bytes([0xbb; 16]);
        let body = serde_json::json!({"type": "verification.verified"});
        let good = [
            callback(1, vid, 10, body.clone()),
            callback(2, vid, 40, body.clone()),
        ];
        // Due first, ahead of the good ones: the poison sits at the front of the lane.
        let deep = callback(3, vid, 5, too_deep());
        let deep_bytes = codec::encode(&deep).expect("encodes");
        let garbage = MessageId::from_bytes([4; 16]);
        let orphan = callback(5, broken_v, 20, body.clone());
        let written = good.clone();
        store
            .write(move |tx| -> Result<(), Error> {
                tx.insert_verification(&v)?;
                tx.put_raw_verification(broken_v, b"\x02not a verification".to_vec());
                for e in written.iter().chain([&orphan]) {
                    tx.insert_outbox(e)?;
                }
                tx.put_raw_outbox(Lane::Callback, UnixTime(5), deep.id, deep_bytes);
                tx.put_raw_outbox(Lane::Callback, UnixTime(30), garbage, b"\x02\x01".to_vec());
                Ok(())
            })
            .await
            .expect("write");
        let now = UnixTime(100);
        let lease = Duration::from_secs(60);
        let seen = store
            .read(move |r| r.due(Lane::Callback, None, now, CLAIM_BATCH))
            .await
            .expect("scan");
        assert_eq!(seen.len(), 5);

        let c = store
            .write_unsynced(move |tx| claim(tx, Lane::Callback, &seen, now, lease))
            .await
            .expect("one entry that cannot be decoded does not fail the claim");

        let claimed: Vec<_> = c.claimed.iter().map(|c| c.entry.id).collect();
        assert_eq!(claimed, [good[0].id, good[1].id]);
        assert!(c.claimed.iter().all(|c| c.entry.attempts == 1
            && c.entry.due_at == now.plus(lease)
            && c.verification.as_ref().map(|v| v.id) == Some(vid)));
        let unreadable: Vec<_> = c.unreadable.iter().map(|(id, _)| *id).collect();
        assert_eq!(unreadable, [MessageId::from_bytes([3; 16]), garbage]);
        assert!(
            c.unreadable[0].1.contains("recursion limit"),
            "{:?}",
            c.unreadable
        );
        let failed: Vec<_> = c.failed.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, [MessageId::from_bytes([5; 16])]);

        let r = store.reader();
        // Nothing is due any more but the two leases; a later pass does not meet the poison.
        let due = r
            .due(Lane::Callback, None, UnixTime(u64::MAX), CLAIM_BATCH)
            .expect("scan");
        let due: Vec<_> = due.iter().map(|p| (p.id, p.at)).collect();
        assert_eq!(
            due,
            [(good[0].id, now.plus(lease)), (good[1].id, now.plus(lease))]
        );
        assert_eq!(r.scheduled_count(Lane::Callback).expect("count"), 2);
        // The kept count (for /metrics) agrees with the index, once the count at open is in.
        let mut kept = None;
        for _ in 0..500 {
            kept = store.scheduled(Lane::Callback);
            if kept.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(kept, Some(2));
        // The entries that cannot be decoded are kept, as they were, for an operator.
        match r
            .outbox_record(MessageId::from_bytes([3; 16]))
            .expect("read")
        {
            Some(Err(u)) => {
                let head = u.head.expect("its head reads");
                assert_eq!(
                    (head.app.as_str(), head.lane, head.due_at),
                    ("shop", Lane::Callback, UnixTime(5))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.outbox_record(garbage).expect("read"),
            Some(Err(crate::store::Unreadable { head: None, .. }))
        ));
        let orphan = r
            .outbox(MessageId::from_bytes([5; 16]))
            .expect("read")
            .expect("kept");
        assert_eq!(orphan.state, State::Failed);
        assert!(
            orphan
                .last_error
                .is_some_and(|e| e.contains("verification"))
        );

        // The page lists every record, readable or not, in id order.
        let page = r.outbox_page(None, 10).expect("page");
        let ids: Vec<_> = page
            .iter()
            .map(|rec| rec.as_ref().map(|e| e.id).map_err(|u| u.id))
            .collect();
        assert_eq!(
            ids,
            [
                Ok(good[0].id),
                Ok(good[1].id),
                Err(MessageId::from_bytes([3; 16])),
                Err(garbage),
                Ok(MessageId::from_bytes([5; 16])),
            ]
        );

        // Dropping one removes its record (its due key is already gone).
        let deep = match r
            .outbox_record(MessageId::from_bytes([3; 16]))
            .expect("read")
        {
            Some(Err(u)) => u,
            other => panic!("{other:?}"),
        };
        store
            .write(move |tx| -> Result<(), Error> { Ok(tx.delete_unreadable_outbox(&deep)?) })
            .await
            .expect("drop");
        assert!(
            r.outbox_record(MessageId::from_bytes([3; 16]))
                .expect("read")
                .is_none()
        );
        assert_eq!(r.scheduled_count(Lane::Callback).expect("count"), 2);
    }

    /// An email entry as a claim leaves it: scheduled, `attempts`, leased until `lease_end`.
    fn claimed(attempts: u32, lease_end: u64) -> OutboxEntry {
        let mut e = OutboxEntry::new(
            MessageId::from_bytes([1; 16]),
            VerificationId::from_bytes([2; 16]),
            "shop",
            UnixTime(1_000),
            Payload::Email(EmailJob {
                message_id: "m@x.test".into(),
                from: "Shop <no-reply@shop.test>".into(),
                to: "a@x.test".into(),
                envelope_to: "a@x.test".into(),
            }),
        );
        e.attempts = attempts;
        e.due_at = UnixTime(lease_end);
        e
    }

    #[test]
    fn an_outcome_is_recorded_only_while_its_claim_holds_except_a_late_delivery() {
        let delivered = Outcome::Delivered;
        let retry = Outcome::Retry {
            reason: "451".into(),
            after: None,
        };
        let reject = Outcome::Reject {
            reason: "550".into(),
        };
        let claim = claimed(1, 61_000);
        let finished = |state| OutboxEntry {
            state,
            ..claim.clone()
        };
        // (the entry as the outcome finds it, outcome, recorded?)
        let table = [
            // Untouched since the claim: every outcome is recorded.
            (claim.clone(), &delivered, true),
            (claim.clone(), &retry, true),
            (claim.clone(), &reject, true),
            // Claimed again after the lease ran out: only a delivery is still news.
            (claimed(2, 130_000), &retry, false),
            (claimed(2, 130_000), &reject, false),
            (claimed(2, 130_000), &delivered, true),
            // Retried by an operator (attempts reset, due now), then claimed again at once:
            // same attempt count, another lease.
            (claimed(1, 70_000), &retry, false),
            (claimed(0, 5_000), &reject, false),
            // Another attempt's outcome is already written: nothing changes a finished entry.
            (finished(State::Delivered), &retry, false),
            (finished(State::Delivered), &reject, false),
            (finished(State::Delivered), &delivered, false),
            (finished(State::Failed), &delivered, false),
            (finished(State::Dropped), &delivered, false),
        ];
        for (i, (current, outcome, want)) in table.into_iter().enumerate() {
            assert_eq!(
                outcome_applies(&claim, &current, outcome),
                want,
                "case {i}: {current:?} {outcome:?}"
            );
        }
    }
}
