//! DKIM signing (RFC 6376, relaxed/relaxed; RSA-SHA256 and Ed25519-SHA256 per RFC 8463) with
//! ring. mail-send's own `dkim` feature needs a newer rustc (notes/crates.md §0), so signing is
//! done here, before the message reaches the transport. Owns canonicalization and the
//! `DKIM-Signature` header; does not publish keys (the operator puts the public key in DNS at
//! `<selector>._domainkey.<domain>`).

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde::{Deserialize, Serialize};

/// Headers signed when present, in this order.
const SIGNED_HEADERS: [&str; 8] = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "auto-submitted",
];

/// `[dkim]`: sign every outgoing mail when `private_key_file` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DkimConfig {
    /// Signing domain (`d=`); should be the sender's domain for DMARC alignment. Default none.
    pub domain: Option<String>,
    /// Selector (`s=`): the key is published at `<selector>._domainkey.<domain>`. Default none.
    pub selector: Option<String>,
    /// PEM file with a PKCS#8 private key, RSA (2048+ bits) or Ed25519. Default none: no signing.
    pub private_key_file: Option<PathBuf>,
}

/// A DKIM setup that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file could not be read.
    #[error("dkim.private_key_file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key is not a PKCS#8 RSA or Ed25519 key.
    #[error("dkim.private_key_file: not a PKCS#8 RSA or Ed25519 private key in PEM")]
    Key,
    /// domain or selector missing or malformed.
    #[error("dkim.{0}: required with private_key_file, letters, digits, dots and hyphens only")]
    Missing(&'static str),
    /// Signing failed.
    #[error("dkim signing failed")]
    Sign,
}

enum Key {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A loaded signer.
pub struct Signer {
    domain: String,
    selector: String,
    key: Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dkim::Signer(d={}, s={})", self.domain, self.selector)
    }
}

fn dns_label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Decodes the base64 body of a PEM block.
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    STANDARD.decode(body).ok()
}

impl Signer {
    /// Loads the signer `cfg` describes; `None` when DKIM is off.
    ///
    /// # Errors
    /// An unreadable or unsupported key, or a missing domain/selector.
    pub fn load(cfg: &DkimConfig) -> Result<Option<Self>, Error> {
        let Some(path) = &cfg.private_key_file else {
            return Ok(None);
        };
        let domain = cfg
            .domain
            .clone()
            .filter(|d| dns_label_ok(d))
            .ok_or(Error::Missing("domain"))?;
        let selector = cfg
            .selector
            .clone()
            .filter(|s| dns_label_ok(s))
            .ok_or(Error::Missing("selector"))?;
        let pem = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Some(Self::from_pkcs8(
            &domain,
            &selector,
            &pem_to_der(&pem).ok_or(Error::Key)?,
        )?))
    }

    /// A signer from a PKCS#8 DER key.
    ///
    /// # Errors
    /// Not an RSA or Ed25519 PKCS#8 key.
    pub fn from_pkcs8(domain: &str, selector: &str, der: &[u8]) -> Result<Self, Error> {
        let key = if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
            Key::Rsa(k)
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Key::Ed25519(k)
        } else {
            return Err(Error::Key);
        };
        Ok(Signer {
            domain: domain.to_string(),
            selector: selector.to_string(),
            key,
        })
    }

    /// The DNS TXT value to publish at `<selector>._domainkey.<domain>`.
    pub fn dns_record(&self) -> String {
        match &self.key {
            Key::Rsa(k) => {
                // ring exposes the RSAPublicKey (PKCS#1); DKIM wants SubjectPublicKeyInfo.
                let spki = rsa_spki(k.public().as_ref());
                format!("v=DKIM1; k=rsa; p={}", STANDARD.encode(spki))
            }
            Key::Ed25519(k) => format!(
                "v=DKIM1; k=ed25519; p={}",
                STANDARD.encode(k.public_key().as_ref())
            ),
        }
    }

    /// Returns `message` with a `DKIM-Signature` header prepended.
    ///
    /// # Errors
    /// The signature could not be made (does not happen with a valid key).
    pub fn sign(&self, message: &[u8], now_secs: u64) -> Result<Vec<u8>, Error> {
        let (head, body) = split(message);
        let headers = parse_headers(head);
        let mut names = Vec::new();
        let mut signed = Vec::new();
        for want in SIGNED_HEADERS {
            // The last instance of a header is the one signed first (RFC 6376 §5.4.2).
            if let Some((name, value)) = headers
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(want))
            {
                names.push(want);
                signed.extend_from_slice(canon_header(name, value).as_bytes());
            }
        }
        let bh = STANDARD.encode(digest(&SHA256, &canon_body(body)));
        let a = match self.key {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        };
        let unsigned = format!(
            "v=1; a={a}; c=relaxed/relaxed; d={}; s={}; t={now_secs}; h={}; bh={bh}; b=",
            self.domain,
            self.selector,
            names.join(":")
        );
        let canon_sig = canon_header("DKIM-Signature", &unsigned);
        signed.extend_from_slice(canon_sig.trim_end_matches("\r\n").as_bytes());
        let b = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    &signed,
                    &mut sig,
                )
                .map_err(|_| Error::Sign)?;
                sig
            }
            // RFC 8463: Ed25519 signs the SHA-256 hash of the data.
            Key::Ed25519(k) => k.sign(digest(&SHA256, &signed).as_ref()).as_ref().to_vec(),
        };
        let mut out = format!("DKIM-Signature: {unsigned}{}\r\n", STANDARD.encode(b)).into_bytes();
        out.extend_from_slice(message);
        Ok(out)
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bitstring = vec![0u8];
    bitstring.extend_from_slice(pkcs1);
    let mut inner = ALG.to_vec();
    inner.extend(der_tlv(0x03, &bitstring));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Splits at the first empty line.
fn split(message: &[u8]) -> (&[u8], &[u8]) {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&message[..i + 2], &message[i + 4..]),
        None => (message, &[]),
    }
}

/// Header fields as (name, raw value including folding).
fn parse_headers(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push_str("\r\n");
                last.1.push_str(line);
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.to_string(), v.to_string()));
        }
    }
    out
}

/// Relaxed header canonicalization (RFC 6376 §3.4.2), with the trailing CRLF.
fn canon_header(name: &str, value: &str) -> String {
    let unfolded = value.replace("\r\n", "");
    let mut v = String::with_capacity(unfolded.len());
    let mut ws = false;
    for c in unfolded.chars() {
        if c == ' ' || c == '\t' {
            ws = true;
        } else {
            if ws && !v.is_empty() {
                v.push(' ');
            }
            ws = false;
            v.push(c);
        }
    }
    format!("{}:{}\r\n", name.trim().to_ascii_lowercase(), v)
}

/// Relaxed body canonicalization (RFC 6376 §3.4.4).
fn canon_body(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let mut lines: Vec<String> = text
        .split("\r\n")
        .map(|l| {
            let mut out = String::with_capacity(l.len());
            let mut ws = false;
            for c in l.chars() {
                if c == ' ' || c == '\t' {
                    ws = true;
                } else {
                    if ws {
                        out.push(' ');
                    }
                    ws = false;
                    out.push(c);
                }
            }
            out
        })
        .collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    if lines.is_empty() {
        return Vec::new();
    }
    let mut out = lines.join("\r\n");
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relaxed_canonicalization_follows_the_rfc_examples() {
        // RFC 6376 §3.4.5.
        assert_eq!(canon_header("A", " X"), "a:X\r\n");
        assert_eq!(canon_header("B ", " Y\t\r\n\tZ  "), "b:Y Z\r\n");
        assert_eq!(
            canon_body(b" C \r\nD \t E\r\n\r\n\r\n"),
            b" C\r\nD E\r\n".to_vec()
        );
        assert_eq!(canon_body(b""), Vec::<u8>::new());
        assert_eq!(canon_body(b"\r\n\r\n"), Vec::<u8>::new());
    }

    #[test]
    fn ed25519_signatures_verify_with_the_published_key() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let s = Signer::from_pkcs8("example.com", "s1", pkcs8.as_ref()).expect("signer");
        let msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
        let signed = String::from_utf8(s.sign(msg, 1_700_000_000).expect("sign")).expect("utf8");
        assert!(signed.starts_with(
            "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=s1;"
        ));
        assert!(signed.contains("h=from:to:subject;"));
        assert!(s.dns_record().starts_with("v=DKIM1; k=ed25519; p="));
        // Verify: rebuild the signed data and check with ring's verifier.
        let sig_line = signed.lines().next().expect("line");
        let (unsigned, b) = sig_line["DKIM-Signature: ".len()..]
            .rsplit_once("b=")
            .expect("b=");
        let mut data = Vec::new();
        for (n, v) in [
            ("From", " a@example.com"),
            ("To", " b@example.org"),
            ("Subject", " hi"),
        ] {
            data.extend_from_slice(canon_header(n, v).as_bytes());
        }
        data.extend_from_slice(
            canon_header("DKIM-Signature", &format!("{unsigned}b="))
                .trim_end_matches("\r\n")
                .as_bytes(),
        );
        let pk = STANDARD
            .decode(s.dns_record().rsplit_once("p=").expect("p").1)
            .expect("b64");
        let sig = STANDARD.decode(b).expect("b64");
        signature::UnparsedPublicKey::new(&signature::ED25519, pk)
            .verify(digest(&SHA256, &data).as_ref(), &sig)
            .expect("signature verifies");
    }

    #[test]
    fn a_bad_key_or_missing_selector_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k.pem");
        std::fs::write(
            &p,
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let cfg = DkimConfig {
            domain: Some("example.com".into()),
            selector: Some("s1".into()),
            private_key_file: Some(p.clone()),
        };
        assert!(matches!(Signer::load(&cfg), Err(Error::Key)));
        let cfg = DkimConfig {
            selector: None,
            ..cfg
        };
        assert!(matches!(
            Signer::load(&cfg),
            Err(Error::Missing("selector"))
        ));
        assert!(Signer::load(&DkimConfig::default()).expect("off").is_none());
    }
}
