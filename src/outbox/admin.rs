//! Operator tools over the outbox (DESIGN §3.6): list entries by state, retry one now, drop
//! one. Scoped to the calling app: an app's key never sees another app's entries.
//!
//! An entry that cannot be decoded (see `worker::claim`) is shown as `"state": "unreadable"`
//! from its head, the fields stored before its payload, which name its app: it is listed (when
//! no state is asked for), shown and dropped like any other, and cannot be retried. One whose
//! head cannot be read either belongs to no app as far as anyone can tell, and there is no key
//! above the apps' own: no key sees it or drops it (it is out of the due index, so it harms
//! nothing; the worker's log names it).

use serde_json::{Value, json};

use super::{OutboxEntry, Payload, State};
use crate::clock::UnixTime;
use crate::id::MessageId;
use crate::store::codec::OutboxHead;
use crate::store::{OutboxRecord, Unreadable};
use crate::verification::service::{Error, Result, Service};

/// Most entries one listing returns.
pub const MAX_PAGE: usize = 500;
/// Entries one listing returns by default.
pub const DEFAULT_PAGE: usize = 100;
/// Entries scanned per listing at most (the filter may skip many).
const SCAN_LIMIT: usize = 100_000;

/// Lists `app`'s entries in id (creation) order after `after`, optionally of one state.
///
/// # Errors
/// A store failure.
pub async fn list(
    service: &Service,
    app: &str,
    state: Option<State>,
    after: Option<MessageId>,
    limit: usize,
) -> Result<Value> {
    let app = app.to_string();
    let limit = limit.clamp(1, MAX_PAGE);
    let (page, next) = service
        .store()
        .read(move |r| {
            let mut out: Vec<(MessageId, Value)> = Vec::new();
            let mut cursor = after;
            let mut scanned = 0;
            let mut at_end = false;
            while out.len() < limit && scanned < SCAN_LIMIT {
                let batch = r.outbox_page(cursor, 1000)?;
                let Some(last) = batch.last() else {
                    at_end = true;
                    break;
                };
                scanned += batch.len();
                cursor = Some(record_id(last));
                out.extend(batch.iter().filter_map(|rec| match rec {
                    Ok(e) if e.app == app && state.is_none_or(|s| e.state == s) => {
                        Some((e.id, e.to_json()))
                    }
                    // Its state cannot be read: listed only when no state is asked for.
                    Err(u) if state.is_none() => {
                        owned(u, &app).map(|h| (u.id, unreadable_json(u.id, h)))
                    }
                    _ => None,
                }));
            }
            out.truncate(limit);
            let next = next_after(&out, limit, at_end, cursor);
            Ok((out, next))
        })
        .await?;
    Ok(json!({
        "entries": page.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "next_after": next.map(|id| id.to_string()),
    }))
}

/// Where the next page starts: after the last entry of a full page; after the last entry
/// scanned when the scan limit stopped a page short (the rest of the outbox is not read yet,
/// so a short or even empty page is then not the last); nowhere at the end of the outbox.
fn next_after<T>(
    page: &[(MessageId, T)],
    limit: usize,
    at_end: bool,
    scanned_to: Option<MessageId>,
) -> Option<MessageId> {
    if page.len() >= limit {
        page.last().map(|(id, _)| *id)
    } else if at_end {
        None
    } else {
        scanned_to
    }
}

fn record_id(r: &OutboxRecord) -> MessageId {
    match r {
        Ok(e) => e.id,
        Err(u) => u.id,
    }
}

/// The head of an entry that cannot be decoded, when it can be read and names `app`.
fn owned<'a>(u: &'a Unreadable, app: &str) -> Option<&'a OutboxHead> {
    u.head.as_ref().filter(|h| h.app == app)
}

/// The admin JSON of entry `id`, which cannot be decoded: [`OutboxEntry::to_json`]'s members,
/// from what can be read. The decode error stays in the server log: it may quote stored data.
fn unreadable_json(id: MessageId, h: &OutboxHead) -> Value {
    json!({
        "id": id.to_string(),
        "kind": h.lane.as_str(),
        "verification_id": h.verification.to_string(),
        "app": h.app,
        "state": "unreadable",
        "created_at": h.created_at.to_rfc3339(),
        "due_at": h.due_at.to_rfc3339(),
        "attempts": h.attempts,
        "last_error": "this entry cannot be decoded, so it is not delivered; drop it (the server log has the cause)",
        "delivered_at": Option::<UnixTime>::None,
        "detail": Value::Null,
    })
}

/// One of `app`'s entries.
///
/// # Errors
/// [`Error::NotFound`], or a store failure.
pub async fn show(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    match service.store().lookup(move |r| r.outbox_record(id)).await? {
        Some(Ok(e)) if e.app == app => Ok(e.to_json()),
        Some(Err(u)) => owned(&u, app)
            .map(|h| unreadable_json(id, h))
            .ok_or(Error::NotFound),
        _ => Err(Error::NotFound),
    }
}

/// Schedules one of `app`'s entries for an attempt now, with a fresh attempt budget. A mail
/// whose verification is still pending is charged to the recipient's limits, as a resend is.
///
/// # Errors
/// [`Error::NotFound`], [`Error::UnreadableEntry`] for an entry that cannot be decoded,
/// [`Error::RateLimited`], or a store failure.
pub async fn retry(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    let now = service.now();
    let app = app.to_string();
    let svc = service.clone();
    let e = service
        .store()
        .write(move |tx| -> Result<OutboxEntry> {
            let mut e = match tx.outbox_record(id)? {
                Some(Ok(e)) if e.app == app => e,
                // Nothing to schedule: its payload cannot be read (or re-encoded).
                Some(Err(u)) if owned(&u, &app).is_some() => return Err(Error::UnreadableEntry),
                _ => return Err(Error::NotFound),
            };
            // Mail again is mail again: it costs the recipient's budget, as a resend does.
            if matches!(e.payload, Payload::Email(_))
                && let Some(v) = tx.verification(e.verification)?
            {
                svc.charge_resend(&v)?;
            }
            e.state = State::Scheduled;
            e.due_at = now;
            e.attempts = 0;
            e.last_error = Some("retry requested by an operator".into());
            tx.put_outbox(&e)?;
            Ok(e)
        })
        .await?;
    service.wake_mail();
    Ok(e.to_json())
}

/// Deletes one of `app`'s entries: it will not be delivered. An entry that cannot be decoded is
/// deleted from its head (its app, its due-index key).
///
/// # Errors
/// [`Error::NotFound`], or a store failure.
pub async fn drop_entry(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    let owner = app.to_string();
    // The decode error of an entry that could not be decoded, for the log.
    let unreadable = service
        .store()
        .write(move |tx| -> Result<Option<String>> {
            match tx.outbox_record(id)? {
                Some(Ok(e)) if e.app == owner => {
                    tx.delete_outbox(id)?;
                    Ok(None)
                }
                Some(Err(u)) => match owned(&u, &owner) {
                    Some(_) => {
                        tx.delete_unreadable_outbox(&u)?;
                        Ok(Some(u.error.to_string()))
                    }
                    None => {
                        if u.head.is_none() {
                            tracing::warn!(
                                entry = %id,
                                error = %u.error,
                                "an outbox entry that cannot be decoded names no app: no app's key can drop it"
                            );
                        }
                        Err(Error::NotFound)
                    }
                },
                _ => Err(Error::NotFound),
            }
        })
        .await?;
    if let Some(error) = unreadable {
        tracing::warn!(entry = %id, app, %error, "dropped an outbox entry that cannot be decoded");
    }
    Ok(json!({"id": id.to_string(), "deleted": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> MessageId {
        MessageId::from_bytes([b; 16])
    }

    #[test]
    fn a_page_cut_short_by_the_scan_limit_still_says_where_to_go_on() {
        let two = [(id(1), ()), (id(2), ())];
        // A full page goes on after its last entry, even if the scan went further.
        assert_eq!(next_after(&two, 2, false, Some(id(9))), Some(id(2)));
        // Short because the outbox ended: the last page.
        assert_eq!(next_after(&two, 3, true, Some(id(9))), None);
        assert_eq!(next_after::<()>(&[], 3, true, None), None);
        // Short (or empty) because the scan limit stopped it: go on after what was scanned.
        assert_eq!(next_after(&two, 3, false, Some(id(9))), Some(id(9)));
        assert_eq!(next_after::<()>(&[], 3, false, Some(id(9))), Some(id(9)));
    }
}
