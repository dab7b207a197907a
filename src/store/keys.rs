//! Store key layouts. Keys sort as raw bytes, so integers are big-endian and text parts are
//! separated by `\0` (which no part may contain: app ids, purposes and normalized addresses
//! cannot).

use crate::clock::UnixTime;
use crate::id::{MessageId, VerificationId};

/// `verifications`: id.
pub fn verification(id: VerificationId) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// `current`: app `\0` purpose `\0` email key → the verification now in force.
pub fn current(app: &str, purpose: &str, email_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(app.len() + purpose.len() + email_key.len() + 2);
    k.extend_from_slice(app.as_bytes());
    k.push(0);
    k.extend_from_slice(purpose.as_bytes());
    k.push(0);
    k.extend_from_slice(email_key.as_bytes());
    k
}

/// `expiry`: be_u64 expires_at ‖ id.
pub fn expiry(at: UnixTime, id: VerificationId) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Splits an `expiry` key.
pub fn parse_expiry(k: &[u8]) -> Option<(UnixTime, VerificationId)> {
    let at: [u8; 8] = k.get(..8)?.try_into().ok()?;
    let id: [u8; 16] = k.get(8..24)?.try_into().ok()?;
    Some((
        UnixTime(u64::from_be_bytes(at)),
        VerificationId::from_bytes(id),
    ))
}

/// `idempotency`: app `\0` key.
pub fn idempotency(app: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(app.len() + key.len() + 1);
    k.extend_from_slice(app.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// First byte of the pruner's index keys in the `idempotency` keyspace. Record keys start with
/// an app id (`[a-z0-9_-]{1,64}`, checked at config load), never with this byte.
pub const IDEMPOTENCY_BY_TIME: u8 = 0;

/// `idempotency` (the pruner's index): `\0` ‖ be_u64 created_at ‖ record key.
pub fn idempotency_by_time(at: UnixTime, record: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + record.len());
    k.push(IDEMPOTENCY_BY_TIME);
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(record);
    k
}

/// Splits an index key of [`idempotency_by_time`] into its time and record key.
pub fn parse_idempotency_by_time(k: &[u8]) -> Option<(UnixTime, &[u8])> {
    let (&first, rest) = k.split_first()?;
    if first != IDEMPOTENCY_BY_TIME {
        return None;
    }
    let at: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let record = rest.get(8..).filter(|r| !r.is_empty())?;
    Some((UnixTime(u64::from_be_bytes(at)), record))
}

/// `outbox`: message id.
pub fn outbox(id: MessageId) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// Reads an `outbox` key back into its id.
pub fn parse_outbox(k: &[u8]) -> Option<MessageId> {
    <[u8; 16]>::try_from(k).ok().map(MessageId::from_bytes)
}

/// `outbox_due`: lane u8 ‖ be_u64 due_at ‖ message id.
pub fn outbox_due(lane: u8, at: UnixTime, id: MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(lane);
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Splits an `outbox_due` key.
pub fn parse_outbox_due(k: &[u8]) -> Option<(u8, UnixTime, MessageId)> {
    let lane = *k.first()?;
    let at: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    let id: [u8; 16] = k.get(9..25)?.try_into().ok()?;
    Some((
        lane,
        UnixTime(u64::from_be_bytes(at)),
        MessageId::from_bytes(id),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_sort_by_time_and_round_trip() {
        let a = VerificationId::generate(UnixTime(5));
        let k1 = expiry(UnixTime(1000), a);
        let k2 = expiry(UnixTime(256), a);
        assert!(k2 < k1, "big-endian keeps numeric order");
        assert_eq!(parse_expiry(&k1), Some((UnixTime(1000), a)));
        let m = MessageId::generate(UnixTime(5));
        let d = outbox_due(1, UnixTime(77), m);
        assert_eq!(parse_outbox_due(&d), Some((1, UnixTime(77), m)));
        assert_eq!(parse_outbox_due(&d[..10]), None);
        assert_eq!(parse_outbox(&outbox(m)), Some(m));
        assert_eq!(parse_outbox(&d), None);
    }

    #[test]
    fn idempotency_index_keys_sort_by_time_before_every_record_key() {
        let record = idempotency("app", "k1");
        let late = idempotency_by_time(UnixTime(1000), &record);
        let early = idempotency_by_time(UnixTime(256), &record);
        assert!(early < late);
        // The smallest possible app id ("-", 0x2d) still sorts after every index key.
        assert!(late < idempotency("-", ""));
        assert!(idempotency_by_time(UnixTime(u64::MAX), b"zzz") < idempotency("-", ""));
        assert_eq!(
            parse_idempotency_by_time(&late),
            Some((UnixTime(1000), record.as_slice()))
        );
        // A record key, a cut index key and one without its record key are not index keys.
        assert_eq!(parse_idempotency_by_time(&record), None);
        assert_eq!(parse_idempotency_by_time(&late[..5]), None);
        assert_eq!(parse_idempotency_by_time(&late[..9]), None);
    }
}
