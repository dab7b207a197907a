//! Value encoding: one version byte, then JSON. The version lets a later release read old
//! records (new fields carry serde defaults) and refuse ones from the future.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The current value format.
const VERSION: u8 = 1;

/// Encodes a record.
///
/// # Errors
/// Only if the value cannot be serialized, which is a bug.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = vec![VERSION];
    serde_json::to_writer(&mut out, v)?;
    Ok(out)
}

/// Decodes a record written by [`encode`].
///
/// # Errors
/// An unknown version byte or a body that does not parse.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&VERSION, body)) => serde_json::from_slice(body).map_err(DecodeError::Body),
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
    /// Corrupt body.
    #[error("corrupt value: {0}")]
    Body(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_unknown_versions_are_refused() {
        let b = encode(&vec![1, 2, 3]).expect("encode");
        assert_eq!(decode::<Vec<i32>>(&b).expect("decode"), vec![1, 2, 3]);
        assert!(matches!(
            decode::<Vec<i32>>(&[9, b'[', b']']),
            Err(DecodeError::Version(9))
        ));
        assert!(matches!(decode::<Vec<i32>>(&[]), Err(DecodeError::Empty)));
    }
}
