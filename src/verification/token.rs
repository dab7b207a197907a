//! Signed tokens for links (`/v/{token}`) and watchers (`…/watch?token=`).
//!
//! Layout before base64url (no padding), all integers big-endian:
//!
//! ```text
//! version u8 = 1 | kind u8 | kid_len u8 | kid | verification id [16] | expires_at ms u64 | tag [16]
//! ```
//!
//! `tag` is HMAC-SHA256 over everything before it, truncated to 128 bits, under the key named by
//! `kid`. Tokens are checked (shape, key, tag, expiry) before anything touches the store, so a
//! forged token costs one HMAC. Several keys may be configured: the first signs, all verify, so
//! keys rotate without breaking mail in flight. Sub-keys for codes are derived from the same
//! keys with distinct labels, so a token tag can never be replayed as a code MAC.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::clock::UnixTime;
use crate::id::VerificationId;

const VERSION: u8 = 1;
/// Bytes of the truncated HMAC tag.
const TAG_LEN: usize = 16;
/// Bytes of a signing key secret.
pub const KEY_LEN: usize = 32;
/// Longest key id.
const MAX_KID_LEN: usize = 16;
/// Longest token we bother to decode; anything longer is malformed on its face.
const MAX_TOKEN_CHARS: usize = 128;
/// Domain-separation labels for derived keys.
const LABEL_TOKEN: &[u8] = b"verigate/token/v1";
const LABEL_CODE_MAC: &[u8] = b"verigate/code-mac/v1";
const LABEL_CODE_SEAL: &[u8] = b"verigate/code-seal/v1";

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// The confirm link in the mail.
    Link = 1,
    /// Watching a verification's status.
    Watch = 2,
}

/// A verified token's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// What the token grants.
    pub kind: TokenKind,
    /// The verification it is bound to.
    pub verification: VerificationId,
    /// When it stops working.
    pub expires_at: UnixTime,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of ours at all (bad encoding, length or version).
    #[error("malformed token")]
    Malformed,
    /// Signed with a key we do not have (removed, or never ours).
    #[error("token signed with an unknown key")]
    UnknownKey,
    /// The tag does not match: forged or tampered.
    #[error("token signature does not match")]
    BadSignature,
    /// A token for another purpose (a watch token on the confirm page, say).
    #[error("token of the wrong kind")]
    WrongKind,
    /// Genuine but past its expiry; carries the claims so callers may show a useful page.
    #[error("token expired")]
    Expired(VerificationId),
}

/// A malformed signing key in configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSigningKey(String);

/// One signing key with its derived sub-keys.
pub struct SigningKey {
    kid: String,
    token: hmac::Key,
    code_mac: hmac::Key,
    code_seal: aead::LessSafeKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, [redacted])", self.kid)
    }
}

impl SigningKey {
    /// Parses `"id:BASE64URL_32_BYTES"`.
    ///
    /// # Errors
    /// A bad id (`[A-Za-z0-9_-]{1,16}`) or a secret that is not 32 bytes of base64url.
    pub fn parse(s: &str) -> Result<Self, InvalidSigningKey> {
        let (kid, secret) = s
            .split_once(':')
            .ok_or_else(|| InvalidSigningKey("expected \"id:BASE64URL_32_BYTES\"".into()))?;
        if kid.is_empty()
            || kid.len() > MAX_KID_LEN
            || !kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(InvalidSigningKey(
                "the key id must match [A-Za-z0-9_-]{1,16}".into(),
            ));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(secret.trim_end_matches('='))
            .map_err(|_| InvalidSigningKey("the secret is not base64url".into()))?;
        if bytes.len() != KEY_LEN {
            return Err(InvalidSigningKey(format!(
                "the secret must be {KEY_LEN} bytes (43 base64url characters); use `verigate keys generate`"
            )));
        }
        Ok(Self::from_secret(kid, &bytes))
    }

    fn from_secret(kid: &str, secret: &[u8]) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |label: &[u8]| hmac::sign(&master, label);
        let token = hmac::Key::new(hmac::HMAC_SHA256, derive(LABEL_TOKEN).as_ref());
        let code_mac = hmac::Key::new(hmac::HMAC_SHA256, derive(LABEL_CODE_MAC).as_ref());
        let seal_bytes = derive(LABEL_CODE_SEAL);
        // AES-256 takes exactly the 32 bytes of an HMAC-SHA256 output, so this cannot fail.
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, seal_bytes.as_ref())
            .unwrap_or_else(|_| unreachable!("AES-256 key is 32 bytes"));
        SigningKey {
            kid: kid.to_string(),
            token,
            code_mac,
            code_seal: aead::LessSafeKey::new(unbound),
        }
    }

    /// A new random key string `"id:BASE64URL"` for configuration.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn generate(kid: &str) -> Result<String, ring::error::Unspecified> {
        let mut b = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut b)?;
        Ok(format!("{kid}:{}", URL_SAFE_NO_PAD.encode(b)))
    }
}

/// The configured keys: the first signs, all verify.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<SigningKey>,
}

impl Keyring {
    /// A keyring from parsed keys; at least one.
    ///
    /// # Errors
    /// No keys, or two keys with one id.
    pub fn new(keys: Vec<SigningKey>) -> Result<Self, InvalidSigningKey> {
        if keys.is_empty() {
            return Err(InvalidSigningKey("no signing keys".into()));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.kid == k.kid) {
                return Err(InvalidSigningKey(format!(
                    "key id {:?} is used twice",
                    k.kid
                )));
            }
        }
        Ok(Keyring { keys })
    }

    fn current(&self) -> &SigningKey {
        &self.keys[0]
    }

    fn by_kid(&self, kid: &[u8]) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid.as_bytes() == kid)
    }

    /// Signs a token of `kind` for `verification` until `expires_at`.
    pub fn sign(
        &self,
        kind: TokenKind,
        verification: VerificationId,
        expires_at: UnixTime,
    ) -> String {
        let key = self.current();
        let mut buf = Vec::with_capacity(3 + key.kid.len() + 16 + 8 + TAG_LEN);
        buf.push(VERSION);
        buf.push(kind as u8);
        // kid length is bounded by MAX_KID_LEN at parse time.
        buf.push(key.kid.len() as u8);
        buf.extend_from_slice(key.kid.as_bytes());
        buf.extend_from_slice(verification.as_bytes());
        buf.extend_from_slice(&expires_at.0.to_be_bytes());
        let tag = hmac::sign(&key.token, &buf);
        buf.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Checks a token: shape, key, tag, kind, then expiry against `now`.
    ///
    /// # Errors
    /// [`TokenError`], most specific first; `Expired` only for genuine tokens.
    pub fn verify(
        &self,
        token: &str,
        want: TokenKind,
        now: UnixTime,
    ) -> Result<Claims, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let buf = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        let (&version, rest) = buf.split_first().ok_or(TokenError::Malformed)?;
        if version != VERSION {
            return Err(TokenError::Malformed);
        }
        let (&kind, rest) = rest.split_first().ok_or(TokenError::Malformed)?;
        let (&kid_len, rest) = rest.split_first().ok_or(TokenError::Malformed)?;
        let kid_len = usize::from(kid_len);
        if rest.len() != kid_len + 16 + 8 + TAG_LEN {
            return Err(TokenError::Malformed);
        }
        let (kid, rest) = rest.split_at(kid_len);
        let key = self.by_kid(kid).ok_or(TokenError::UnknownKey)?;
        let signed_len = buf.len() - TAG_LEN;
        let expected = hmac::sign(&key.token, &buf[..signed_len]);
        if !crate::apps::constant_time_eq(&expected.as_ref()[..TAG_LEN], &buf[signed_len..]) {
            return Err(TokenError::BadSignature);
        }
        let kind = match kind {
            1 => TokenKind::Link,
            2 => TokenKind::Watch,
            _ => return Err(TokenError::Malformed),
        };
        let mut vid = [0u8; 16];
        vid.copy_from_slice(&rest[..16]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&rest[16..24]);
        let claims = Claims {
            kind,
            verification: VerificationId::from_bytes(vid),
            expires_at: UnixTime(u64::from_be_bytes(exp)),
        };
        if claims.kind != want {
            return Err(TokenError::WrongKind);
        }
        if now >= claims.expires_at {
            return Err(TokenError::Expired(claims.verification));
        }
        Ok(claims)
    }

    /// `HMAC(code key, verification id ‖ code)` under the current key, with that key's id.
    pub fn code_mac(&self, verification: VerificationId, code: &str) -> (String, Vec<u8>) {
        let key = self.current();
        (key.kid.clone(), Self::mac_with(key, verification, code))
    }

    fn mac_with(key: &SigningKey, verification: VerificationId, code: &str) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&key.code_mac);
        ctx.update(verification.as_bytes());
        ctx.update(code.as_bytes());
        ctx.sign().as_ref().to_vec()
    }

    /// Whether `code` matches a stored MAC made under key `kid`, in constant time.
    /// A MAC under a removed key never matches.
    pub fn code_matches(
        &self,
        kid: &str,
        verification: VerificationId,
        code: &str,
        mac: &[u8],
    ) -> bool {
        let Some(key) = self.by_kid(kid.as_bytes()) else {
            return false;
        };
        let mut msg = Vec::with_capacity(16 + code.len());
        msg.extend_from_slice(verification.as_bytes());
        msg.extend_from_slice(code.as_bytes());
        hmac::verify(&key.code_mac, &msg, mac).is_ok()
    }

    /// Encrypts a code for later delivery and resends (AES-256-GCM, the verification id as
    /// associated data). Returns `"kid:BASE64URL(nonce ‖ ciphertext)"`.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn seal_code(
        &self,
        verification: VerificationId,
        code: &str,
    ) -> Result<String, ring::error::Unspecified> {
        let key = self.current();
        let mut nonce = [0u8; aead::NONCE_LEN];
        crate::random::fill(&mut nonce)?;
        let mut in_out = code.as_bytes().to_vec();
        key.code_seal.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(verification.as_bytes()),
            &mut in_out,
        )?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&in_out);
        Ok(format!("{}:{}", key.kid, URL_SAFE_NO_PAD.encode(out)))
    }

    /// Decrypts a code sealed by [`Keyring::seal_code`]; `None` when the key is gone or the
    /// data was altered.
    pub fn open_code(&self, verification: VerificationId, sealed: &str) -> Option<String> {
        let (kid, data) = sealed.split_once(':')?;
        let key = self.by_kid(kid.as_bytes())?;
        let raw = URL_SAFE_NO_PAD.decode(data).ok()?;
        if raw.len() < aead::NONCE_LEN {
            return None;
        }
        let (nonce, ct) = raw.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ct.to_vec();
        let plain = key
            .code_seal
            .open_in_place(nonce, aead::Aad::from(verification.as_bytes()), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: &str, byte: u8) -> SigningKey {
        SigningKey::from_secret(kid, &[byte; KEY_LEN])
    }

    fn ring(keys: Vec<SigningKey>) -> Keyring {
        Keyring::new(keys).expect("keyring")
    }

    const NOW: UnixTime = UnixTime(1_795_342_200_000);

    #[test]
    fn a_signed_token_verifies_and_is_compact() {
        let r = ring(vec![key("k1", 1)]);
        let vid = VerificationId::generate(NOW);
        let exp = NOW.plus(std::time::Duration::from_secs(60));
        let t = r.sign(TokenKind::Link, vid, exp);
        assert!(t.len() < 80, "{}", t.len());
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let c = r.verify(&t, TokenKind::Link, NOW).expect("valid");
        assert_eq!(c.verification, vid);
        assert_eq!(c.expires_at, exp);
    }

    #[test]
    fn expired_wrong_kind_tampered_and_truncated_tokens_are_refused() {
        let r = ring(vec![key("k1", 1)]);
        let vid = VerificationId::generate(NOW);
        let exp = NOW.plus(std::time::Duration::from_secs(60));
        let t = r.sign(TokenKind::Link, vid, exp);
        assert_eq!(
            r.verify(&t, TokenKind::Link, exp),
            Err(TokenError::Expired(vid))
        );
        assert_eq!(
            r.verify(&t, TokenKind::Watch, NOW),
            Err(TokenError::WrongKind)
        );
        // Flip one character in the middle (the verification id).
        let mut chars: Vec<char> = t.chars().collect();
        let i = 10;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(
            r.verify(&tampered, TokenKind::Link, NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            r.verify(&t[..t.len() - 2], TokenKind::Link, NOW),
            Err(TokenError::Malformed)
        );
        for junk in ["", "x", "!!!!", &"A".repeat(500)] {
            assert_eq!(
                r.verify(junk, TokenKind::Link, NOW),
                Err(TokenError::Malformed),
                "{junk}"
            );
        }
    }

    #[test]
    fn rotation_new_key_signs_old_key_verifies_removed_key_fails() {
        let old = ring(vec![key("k1", 1)]);
        let vid = VerificationId::generate(NOW);
        let exp = NOW.plus(std::time::Duration::from_secs(60));
        let t_old = old.sign(TokenKind::Link, vid, exp);
        let rotated = ring(vec![key("k2", 2), key("k1", 1)]);
        assert!(rotated.verify(&t_old, TokenKind::Link, NOW).is_ok());
        let t_new = rotated.sign(TokenKind::Link, vid, exp);
        assert_ne!(t_new, t_old);
        let removed = ring(vec![key("k2", 2)]);
        assert_eq!(
            removed.verify(&t_old, TokenKind::Link, NOW),
            Err(TokenError::UnknownKey)
        );
        // Same id, other secret: a forgery.
        let forged = ring(vec![key("k1", 9)]);
        assert_eq!(
            forged.verify(&t_old, TokenKind::Link, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn code_macs_and_sealed_codes_round_trip_and_bind_to_the_verification() {
        let r = ring(vec![key("k1", 1)]);
        let vid = VerificationId::generate(NOW);
        let other = VerificationId::generate(NOW.plus(std::time::Duration::from_secs(1)));
        let (kid, mac) = r.code_mac(vid, "123456");
        assert!(r.code_matches(&kid, vid, "123456", &mac));
        assert!(!r.code_matches(&kid, vid, "123457", &mac));
        assert!(!r.code_matches(&kid, other, "123456", &mac));
        assert!(!r.code_matches("gone", vid, "123456", &mac));
        let sealed = r.seal_code(vid, "123456").expect("seal");
        assert!(!sealed.contains("123456"));
        assert_eq!(r.open_code(vid, &sealed).as_deref(), Some("123456"));
        assert_eq!(r.open_code(other, &sealed), None);
    }

    #[test]
    fn signing_keys_parse_strictly() {
        let good = SigningKey::generate("k1").expect("random");
        assert!(SigningKey::parse(&good).is_ok());
        for bad in [
            "",
            "k1",
            ":abc",
            "k1:short",
            "bad id!:AAAA",
            &format!("{}:{}", "k".repeat(17), &good[3..]),
        ] {
            assert!(SigningKey::parse(bad).is_err(), "{bad}");
        }
    }
}
