//! The mail worker: claims due entries of the email lane with a lease, renders and hands them to
//! the transport, and records the outcome. Several workers may run; claims go through the
//! single store writer, so one entry is never claimed twice within a lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::retry::{RetryPolicy, unit_random};
use super::transport::{Outcome, OutgoingMail, Transport};
use super::{Lane, OutboxEntry, Payload, State};
use crate::clock::UnixTime;
use crate::mail::{Composed, parse_mailbox};
use crate::templates::MailContext;
use crate::verification::service::{Error, Service};
use crate::verification::{DeliveryStatus, Status, Verification};

/// Entries one worker pass looks at.
const CLAIM_BATCH: usize = 64;
/// Longest idle wait between passes when nothing wakes the worker.
const IDLE_POLL: Duration = Duration::from_millis(500);

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

/// A claimed entry, ready to send.
struct Claimed {
    entry: OutboxEntry,
    verification: Verification,
}

/// Runs the email lane until `shutdown` turns true.
pub async fn run(
    service: Service,
    transport: Transport,
    cfg: WorkerConfig,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sem = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    let pacer: Option<Arc<Pacer>> = std::num::NonZeroU32::new(cfg.max_per_second).map(|n| {
        Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
            n,
        )))
    });
    loop {
        if *shutdown.borrow() {
            break;
        }
        let notified = wake.notified();
        let did = match pass(&service, &transport, &cfg, &sem, pacer.as_ref()).await {
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
    // Let in-flight deliveries finish (they hold permits), then say goodbye to the relay.
    let _ = sem.acquire_many(cfg.concurrency.max(1) as u32).await;
    if let Transport::Smtp(t) = &transport {
        t.close_idle().await;
    }
}

/// One pass: claims what is due and delivers it. Returns how many were claimed.
async fn pass(
    service: &Service,
    transport: &Transport,
    cfg: &WorkerConfig,
    sem: &Arc<tokio::sync::Semaphore>,
    pacer: Option<&Arc<Pacer>>,
) -> Result<usize, Error> {
    let now = service.now();
    let ids = service
        .store()
        .read(move |r| r.due(Lane::Email, now, CLAIM_BATCH))
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let lease = cfg.lease;
    let svc = service.clone();
    let claimed = service
        .store()
        .write(move |tx| -> Result<Vec<Claimed>, Error> {
            let mut out = Vec::new();
            for id in ids {
                let Some(mut e) = tx.outbox(id)? else {
                    continue;
                };
                if e.state != State::Scheduled || e.due_at > now {
                    continue;
                }
                let v = tx.verification(e.verification)?;
                let open = v.as_ref().map(|v| v.status_at(now));
                match (v, open) {
                    (Some(mut v), Some(Status::Pending)) => {
                        e.attempts += 1;
                        e.due_at = now.plus(lease);
                        tx.put_outbox(&e)?;
                        v.delivery.attempts += 1;
                        tx.put_verification(&v)?;
                        out.push(Claimed {
                            entry: e,
                            verification: v,
                        });
                    }
                    (_, status) => {
                        e.state = State::Dropped;
                        e.last_error = Some(match status {
                            Some(s) => format!("not sent: the verification is {}", s.as_str()),
                            None => "not sent: the verification no longer exists".into(),
                        });
                        tx.put_outbox(&e)?;
                        svc.metrics()
                            .outbox_attempts
                            .with_label_values(&["email", "dropped"])
                            .inc();
                    }
                }
            }
            Ok(out)
        })
        .await?;
    let n = claimed.len();
    for c in claimed {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let service = service.clone();
        let transport = transport.clone();
        let retry = cfg.retry;
        let pacer = pacer.cloned();
        tokio::spawn(async move {
            if let Some(p) = pacer {
                p.until_ready().await;
            }
            deliver(&service, &transport, retry, c).await;
            drop(permit);
        });
    }
    Ok(n)
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
    Ok(OutgoingMail {
        name: e.id.to_string(),
        envelope_from,
        envelope_to: job.envelope_to.clone(),
        bytes,
    })
}

async fn deliver(service: &Service, transport: &Transport, retry: RetryPolicy, c: Claimed) {
    let now = service.now();
    let outcome = match compose(service, &c.entry, &c.verification, now) {
        Ok(mail) => transport.send(mail).await,
        Err(reason) => Outcome::Reject { reason },
    };
    let done_at = service.now();
    let id = c.entry.id;
    let created_at = c.entry.created_at;
    let svc = service.clone();
    let label = match &outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Reject { .. } => "failed",
    };
    let r = service
        .store()
        .write(move |tx| -> Result<(), Error> {
            let Some(mut e) = tx.outbox(id)? else {
                return Ok(());
            };
            let mut v = tx.verification(e.verification)?;
            match outcome {
                Outcome::Delivered => {
                    e.state = State::Delivered;
                    e.delivered_at = Some(done_at);
                    e.last_error = None;
                    if let Some(v) = v.as_mut() {
                        v.delivery.status = DeliveryStatus::Sent;
                        v.delivery.sent_at = Some(done_at);
                        v.delivery.last_error = None;
                        tx.put_verification(v)?;
                    }
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
                        }
                        _ if expired => {
                            e.state = State::Dropped;
                            e.last_error = Some(format!(
                                "{reason}; not retried: the verification is no longer pending"
                            ));
                        }
                        _ => {
                            e.state = State::Failed;
                            e.last_error =
                                Some(format!("{reason}; giving up after {} attempts", e.attempts));
                            if let Some(v) = v.as_mut() {
                                svc.mark_delivery_failed(tx, v, &reason, done_at)?;
                            }
                        }
                    }
                }
                Outcome::Reject { reason } => {
                    e.state = State::Failed;
                    e.last_error = Some(reason.clone());
                    if let Some(v) = v.as_mut() {
                        svc.mark_delivery_failed(tx, v, &reason, done_at)?;
                    }
                }
            }
            tx.put_outbox(&e)?;
            Ok(())
        })
        .await;
    match r {
        Ok(()) => {
            let m = service.metrics();
            m.outbox_attempts.with_label_values(&["email", label]).inc();
            if label == "delivered" {
                m.delivery_latency
                    .with_label_values(&["email"])
                    .observe(created_at.until(done_at).as_secs_f64());
            }
            if label == "failed" {
                m.event("delivery_failed", c.verification.method);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, entry = %id, "cannot record delivery outcome; the lease will expire and it will be retried")
        }
    }
}
