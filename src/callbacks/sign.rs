//! Standard Webhooks signatures (symmetric scheme, `v1`): the receiver checks them with any
//! Standard Webhooks library, so the bytes here must match the reference implementations exactly.
//!
//! Owns parsing `whsec_…` secrets and producing the `webhook-signature` header value. Does not
//! send anything (see [`super::dispatch`]) and does not verify: verigate only ever signs.
//!
//! Invariants:
//! - The signed content is `{webhook_id}.{timestamp}.{body}`, with the timestamp in whole
//!   seconds since the Unix epoch, HMAC-SHA256 over it, standard base64 (with padding).
//! - With several secrets (rotation), the header carries one `v1,<sig>` per secret, in
//!   configuration order, separated by single spaces; a receiver holding any one of them accepts.
//! - A secret never appears in `Debug` output or in an error message.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

/// The prefix that marks a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The signature identifier of the symmetric (HMAC-SHA256) scheme.
pub const SIGNATURE_VERSION: &str = "v1";

/// Fewest key bytes accepted. The specification asks for "at least 24 bytes (192 bits)": a
/// shorter key is a configuration mistake, so it is refused rather than used.
pub const MIN_SECRET_BYTES: usize = 24;

/// Why a secret or a signer could not be built. Messages never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text does not start with `whsec_`.
    #[error("webhook secret must start with `{SECRET_PREFIX}` (Standard Webhooks format)")]
    MissingPrefix,
    /// The part after `whsec_` is not standard base64.
    #[error("webhook secret is not valid base64 after `{SECRET_PREFIX}`")]
    Base64(#[source] base64::DecodeError),
    /// The key is shorter than [`MIN_SECRET_BYTES`].
    #[error("webhook secret decodes to {len} bytes; use at least {MIN_SECRET_BYTES} random bytes")]
    TooShort {
        /// Decoded length.
        len: usize,
    },
    /// A signer needs at least one secret.
    #[error("no webhook secret configured")]
    NoSecrets,
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One HMAC key, parsed from `whsec_<base64>`. `Debug` shows no key material.
#[derive(Clone)]
pub struct WebhookSecret {
    key: hmac::Key,
}

impl WebhookSecret {
    /// Parses `whsec_<base64>`; the base64 part decodes to the key bytes.
    ///
    /// The prefix is required (reference libraries make it optional): a secret in the
    /// configuration without it is more likely a different kind of secret pasted by mistake.
    /// The base64 alphabet is the standard one with padding, as in the reference libraries, so a
    /// secret accepted here is accepted by every receiver library.
    ///
    /// # Errors
    ///
    /// [`Error::MissingPrefix`], [`Error::Base64`], or [`Error::TooShort`] when the key has
    /// fewer than [`MIN_SECRET_BYTES`] bytes.
    pub fn parse(text: &str) -> Result<Self> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(Error::MissingPrefix)?;
        let bytes = STANDARD.decode(encoded).map_err(Error::Base64)?;
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::TooShort { len: bytes.len() });
        }
        Ok(WebhookSecret {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// The base64 HMAC-SHA256 of `{id}.{timestamp_secs}.{body}`, without the `v1,` prefix.
    fn signature(&self, id: &str, timestamp_secs: u64, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp_secs.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        STANDARD.encode(ctx.sign().as_ref())
    }
}

impl FromStr for WebhookSecret {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        WebhookSecret::parse(s)
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(whsec_<redacted>)")
    }
}

/// Signs callbacks with every configured secret.
#[derive(Debug, Clone)]
pub struct Signer {
    /// In configuration order; the header lists signatures in the same order. Several secrets
    /// exist only during rotation: the app switches its verifier to the new one while both sign.
    secrets: Vec<WebhookSecret>,
}

impl Signer {
    /// A signer for the given secrets (one, or several during rotation).
    ///
    /// # Errors
    ///
    /// [`Error::NoSecrets`] when `secrets` is empty: an empty `webhook-signature` header would
    /// be rejected by every receiver.
    pub fn try_new(secrets: Vec<WebhookSecret>) -> Result<Self> {
        if secrets.is_empty() {
            return Err(Error::NoSecrets);
        }
        Ok(Signer { secrets })
    }

    /// The `webhook-signature` header value: `v1,<base64>` per secret, space-separated.
    /// `timestamp_secs` must be the `webhook-timestamp` sent with this attempt.
    pub fn sign(&self, id: &str, timestamp_secs: u64, body: &[u8]) -> String {
        let parts: Vec<String> = self
            .secrets
            .iter()
            .map(|s| {
                format!(
                    "{SIGNATURE_VERSION},{}",
                    s.signature(id, timestamp_secs, body)
                )
            })
            .collect();
        parts.join(" ")
    }
}

impl From<WebhookSecret> for Signer {
    fn from(secret: WebhookSecret) -> Self {
        Signer {
            secrets: vec![secret],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secrets: &[&str]) -> Signer {
        let secrets = secrets
            .iter()
            .map(|s| WebhookSecret::parse(s).expect("valid test secret"))
            .collect();
        Signer::try_new(secrets).expect("non-empty")
    }

    /// Published with the Standard Webhooks / Svix reference libraries (their `sign` tests).
    /// Recomputed independently with Python's `hmac` module before being written down here.
    #[test]
    fn the_reference_libraries_test_vector_reproduces_exactly() {
        let s = signer(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// The vector from the Rust `standardwebhooks` library's own `test_sign`.
    #[test]
    fn the_rust_reference_library_vector_reproduces_exactly() {
        let s = signer(&["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]);
        assert_eq!(
            s.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn rotation_signs_with_every_secret_in_order() {
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let a = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let b = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let both = signer(&[a, b]).sign(id, 1_614_265_330, body);
        let expected = format!(
            "{} {}",
            signer(&[a]).sign(id, 1_614_265_330, body),
            signer(&[b]).sign(id, 1_614_265_330, body)
        );
        assert_eq!(both, expected);
        assert_eq!(both.split(' ').count(), 2);
    }

    #[test]
    fn every_part_of_the_signed_content_matters() {
        let s = signer(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let base = s.sign("msg_1", 100, b"{}");
        assert_ne!(base, s.sign("msg_2", 100, b"{}"));
        assert_ne!(base, s.sign("msg_1", 101, b"{}"));
        assert_ne!(base, s.sign("msg_1", 100, b"{ }"));
    }

    #[test]
    fn bad_secrets_are_refused_with_the_cause() {
        // (secret, the error's Debug form starts with)
        let cases = [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MissingPrefix"),
            ("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MissingPrefix"),
            ("whsec_not base64!", "Base64"),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "Base64"),
            ("whsec_", "TooShort { len: 0 }"),
            // 23 bytes: one short of the specification's minimum.
            (
                "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "TooShort { len: 23 }",
            ),
        ];
        for (text, expected) in cases {
            match WebhookSecret::parse(text) {
                Ok(_) => panic!("{text:?} was accepted"),
                Err(e) => assert!(
                    format!("{e:?}").starts_with(expected),
                    "{text:?} gave {e:?}"
                ),
            }
        }
    }

    #[test]
    fn an_empty_signer_is_refused() {
        assert!(matches!(Signer::try_new(vec![]), Err(Error::NoSecrets)));
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let text = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let s = signer(&[text]);
        let shown = format!("{s:?} {:?}", WebhookSecret::parse(text).expect("valid"));
        assert!(!shown.contains("MfKQ9r8G"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn errors_do_not_echo_the_secret() {
        let err = WebhookSecret::parse("whsec_c2VjcmV0").expect_err("too short");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    }
}
