//! Identifiers: 128-bit, time-ordered (ULID layout: 48-bit milliseconds, 80 random bits), shown
//! as a type prefix and 26 Crockford base32 characters (`vrf_01JD…`). Time order makes store
//! keys cluster by creation time; the random part makes them unguessable.

use std::fmt;
use std::str::FromStr;

use crate::clock::UnixTime;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Length of the base32 body of an id.
const ENCODED_LEN: usize = 26;

/// The raw 16 bytes of an id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawId(pub [u8; 16]);

impl RawId {
    /// A new id for the instant `now`.
    pub fn generate(now: UnixTime) -> Self {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&now.0.to_be_bytes()[2..]);
        // The random source only fails when the OS has no entropy source; a zero tail would
        // still be unique enough within one millisecond for one process only by chance, so fall
        // back to a process counter mixed with the clock rather than panic.
        if crate::random::fill(&mut b[6..]).is_err() {
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(1);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            b[8..].copy_from_slice(&n.to_be_bytes());
        }
        RawId(b)
    }

    fn encode(&self) -> String {
        let v = u128::from_be_bytes(self.0);
        let mut out = [0u8; ENCODED_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (ENCODED_LEN - 1 - i);
            *slot = CROCKFORD[((v >> shift) & 0x1f) as usize];
        }
        out.iter().map(|&c| c as char).collect()
    }

    fn decode(s: &str) -> Option<Self> {
        if s.len() != ENCODED_LEN {
            return None;
        }
        let mut v: u128 = 0;
        for (i, c) in s.bytes().enumerate() {
            let d = CROCKFORD
                .iter()
                .position(|&x| x == c.to_ascii_uppercase())? as u128;
            // The first character carries only 3 bits (26 * 5 = 130 > 128).
            if i == 0 && d > 7 {
                return None;
            }
            v = (v << 5) | d;
        }
        Some(RawId(v.to_be_bytes()))
    }
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub RawId);

        impl $name {
            /// The type prefix in the text form.
            pub const PREFIX: &'static str = $prefix;

            /// A new id for the instant `now`.
            pub fn generate(now: UnixTime) -> Self {
                $name(RawId::generate(now))
            }

            /// The 16 raw bytes, for store keys and tokens.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0 .0
            }

            /// From the 16 raw bytes.
            pub fn from_bytes(b: [u8; 16]) -> Self {
                $name(RawId(b))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0.encode())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                s.strip_prefix($prefix)
                    .and_then(RawId::decode)
                    .map($name)
                    .ok_or(InvalidId)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// Identifies one verification (`vrf_…`).
    VerificationId,
    "vrf_"
);
prefixed_id!(
    /// Identifies one outbox entry (`msg_…`).
    MessageId,
    "msg_"
);

/// A string that is not an id of the expected kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id")]
pub struct InvalidId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = VerificationId::generate(UnixTime(1_795_342_200_000));
        let s = id.to_string();
        assert!(s.starts_with("vrf_"));
        assert_eq!(s.len(), 4 + ENCODED_LEN);
        assert_eq!(s.parse::<VerificationId>(), Ok(id));
        assert_eq!(s.to_lowercase()[4..].len(), ENCODED_LEN);
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = VerificationId::generate(UnixTime(1000));
        let b = VerificationId::generate(UnixTime(2000));
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "vrf_",
            "msg_01JD0000000000000000000000",
            "vrf_8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "vrf_01JD00000000000000000000U",
            "vrf_01JD",
        ] {
            assert_eq!(bad.parse::<VerificationId>(), Err(InvalidId), "{bad}");
        }
    }
}
