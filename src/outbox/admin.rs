//! Operator tools over the outbox (DESIGN §3.6): list entries by state, retry one now, drop
//! one. Scoped to the calling app: an app's key never sees another app's entries.

use serde_json::{Value, json};

use super::{OutboxEntry, State};
use crate::id::MessageId;
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
    let page = service
        .store()
        .read(move |r| {
            let mut out: Vec<OutboxEntry> = Vec::new();
            let mut cursor = after;
            let mut scanned = 0;
            while out.len() < limit && scanned < SCAN_LIMIT {
                let batch = r.outbox_page(cursor, 1000)?;
                if batch.is_empty() {
                    break;
                }
                scanned += batch.len();
                cursor = batch.last().map(|e| e.id);
                out.extend(
                    batch
                        .into_iter()
                        .filter(|e| e.app == app && state.is_none_or(|s| e.state == s)),
                );
            }
            out.truncate(limit);
            Ok(out)
        })
        .await?;
    let next = (page.len() == limit)
        .then(|| page.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(json!({
        "entries": page.iter().map(OutboxEntry::to_json).collect::<Vec<_>>(),
        "next_after": next,
    }))
}

/// One of `app`'s entries.
///
/// # Errors
/// [`Error::NotFound`], or a store failure.
pub async fn show(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    match service.store().lookup(move |r| r.outbox(id)).await? {
        Some(e) if e.app == app => Ok(e.to_json()),
        _ => Err(Error::NotFound),
    }
}

/// Schedules one of `app`'s entries for an attempt now, with a fresh attempt budget.
///
/// # Errors
/// [`Error::NotFound`], or a store failure.
pub async fn retry(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    let now = service.now();
    let app = app.to_string();
    let e = service
        .store()
        .write(move |tx| -> Result<OutboxEntry> {
            let mut e = match tx.outbox(id)? {
                Some(e) if e.app == app => e,
                _ => return Err(Error::NotFound),
            };
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

/// Deletes one of `app`'s entries: it will not be delivered.
///
/// # Errors
/// [`Error::NotFound`], or a store failure.
pub async fn drop_entry(service: &Service, app: &str, id: &str) -> Result<Value> {
    let id: MessageId = id.parse().map_err(|_| Error::NotFound)?;
    let app = app.to_string();
    service
        .store()
        .write(move |tx| -> Result<()> {
            match tx.outbox(id)? {
                Some(e) if e.app == app => {
                    tx.delete_outbox(id)?;
                    Ok(())
                }
                _ => Err(Error::NotFound),
            }
        })
        .await?;
    Ok(json!({"id": id.to_string(), "deleted": true}))
}
