//! Tenants. Each app has API keys, an allowed set of redirect prefixes, a sender and (later) a
//! callback endpoint. Owns authentication of the api listener's bearer keys and the check that
//! a `redirect_url` stays inside an app's prefixes (no open redirect).

use std::sync::Arc;

use ring::digest::{SHA256, digest};

use crate::config::{AppConfig, Config};

/// Length of an SHA-256 digest in bytes.
const DIGEST_LEN: usize = 32;
/// Plain (development) keys shorter than this are refused: they are guessable.
const MIN_PLAIN_KEY_LEN: usize = 16;

/// A configured API key, kept only as its SHA-256 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey([u8; DIGEST_LEN]);

impl ApiKey {
    /// Parses `sha256:HEX` (the digest of the key) or a plain key.
    ///
    /// # Errors
    /// A malformed digest, or a plain key shorter than 16 characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(hex) = s.strip_prefix("sha256:") {
            let bytes = decode_hex(hex).ok_or("sha256: must be followed by 64 hex digits")?;
            let arr: [u8; DIGEST_LEN] = bytes
                .try_into()
                .map_err(|_| "sha256: must be followed by 64 hex digits".to_string())?;
            return Ok(ApiKey(arr));
        }
        if s.len() < MIN_PLAIN_KEY_LEN {
            return Err(format!(
                "a plain API key must have at least {MIN_PLAIN_KEY_LEN} characters; use `verigate keys generate`"
            ));
        }
        Ok(ApiKey::of(s))
    }

    /// The key whose plain text is `s`.
    pub fn of(s: &str) -> Self {
        let d = digest(&SHA256, s.as_bytes());
        let mut arr = [0u8; DIGEST_LEN];
        arr.copy_from_slice(d.as_ref());
        ApiKey(arr)
    }

    /// `sha256:HEX`, the form to put in configuration.
    pub fn to_config_string(&self) -> String {
        format!("sha256:{}", encode_hex(&self.0))
    }

    fn ct_eq(&self, other: &ApiKey) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of lower- or upper-case hex; `None` if it is not hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An allowed prefix for redirect URLs: scheme, host and port must match exactly and the path
/// must start with the prefix's path. Comparing parsed URLs, not strings, is what stops
/// `https://app.example.com.evil.test/` from matching `https://app.example.com`.
#[derive(Debug, Clone)]
pub struct RedirectPrefix {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl RedirectPrefix {
    /// Parses an absolute http(s) URL without query, fragment or credentials.
    ///
    /// # Errors
    /// Anything else, with a sentence saying what.
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("not an absolute URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not contain credentials".into());
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err("must not contain a query or fragment".into());
        }
        let host = u.host_str().ok_or("must have a host")?.to_string();
        Ok(RedirectPrefix {
            scheme: u.scheme().into(),
            host,
            port: u.port_or_known_default(),
            path: u.path().into(),
        })
    }

    /// Whether `u` is inside this prefix.
    pub fn allows(&self, u: &url::Url) -> bool {
        u.scheme() == self.scheme
            && u.host_str() == Some(self.host.as_str())
            && u.port_or_known_default() == self.port
            && u.username().is_empty()
            && u.password().is_none()
            && u.path().starts_with(&self.path)
    }
}

/// One tenant, ready to use.
#[derive(Debug)]
pub struct App {
    /// The app's id.
    pub id: String,
    keys: Vec<ApiKey>,
    redirect_prefixes: Vec<RedirectPrefix>,
    /// Sender of this app's mail.
    pub from: String,
    /// The domain of `from`, for Message-IDs (see [`crate::mail::message_id_domain`]).
    pub message_id_domain: String,
    /// The app's configuration as loaded.
    pub config: AppConfig,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl App {
    /// Checks `redirect_url` against the app's prefixes and returns it normalized.
    ///
    /// # Errors
    /// A sentence for the caller when it is not an absolute URL inside an allowed prefix.
    pub fn check_redirect(&self, redirect_url: &str) -> Result<String, String> {
        let u = url::Url::parse(redirect_url)
            .map_err(|_| "redirect_url must be an absolute URL".to_string())?;
        if self.redirect_prefixes.iter().any(|p| p.allows(&u)) {
            Ok(u.to_string())
        } else {
            Err("redirect_url is not inside one of this app's allowed redirect prefixes".into())
        }
    }
}

/// All tenants, looked up by API key.
#[derive(Debug, Clone)]
pub struct Apps(Arc<Vec<Arc<App>>>);

impl Apps {
    /// Builds the tenant list from checked configuration.
    ///
    /// # Errors
    /// A key or prefix that does not parse (already caught by `Config::check`).
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let mut apps = Vec::new();
        for a in &cfg.apps {
            let keys = a
                .api_keys
                .iter()
                .map(|k| ApiKey::parse(k.expose()))
                .collect::<Result<Vec<_>, _>>()?;
            let redirect_prefixes = a
                .redirect_prefixes
                .iter()
                .map(|p| RedirectPrefix::parse(p))
                .collect::<Result<Vec<_>, _>>()?;
            let from = a.from.clone().unwrap_or_else(|| cfg.delivery.from.clone());
            apps.push(Arc::new(App {
                id: a.id.clone(),
                keys,
                redirect_prefixes,
                message_id_domain: crate::mail::message_id_domain(&from),
                from,
                config: a.clone(),
            }));
        }
        Ok(Apps(Arc::new(apps)))
    }

    /// The app owning the bearer key `presented`, comparing every configured key in constant
    /// time (no early exit on a match, so timing tells nothing about which app matched).
    pub fn authenticate(&self, presented: &str) -> Option<Arc<App>> {
        let k = ApiKey::of(presented);
        let mut found = None;
        for app in self.0.iter() {
            for key in &app.keys {
                if key.ct_eq(&k) && found.is_none() {
                    found = Some(app.clone());
                }
            }
        }
        found
    }

    /// The app with this id.
    pub fn get(&self, id: &str) -> Option<Arc<App>> {
        self.0.iter().find(|a| a.id == id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(prefixes: &[&str]) -> App {
        App {
            id: "shop".into(),
            keys: vec![ApiKey::of("plain-key-0123456789")],
            redirect_prefixes: prefixes
                .iter()
                .map(|p| RedirectPrefix::parse(p).expect("prefix"))
                .collect(),
            from: "x@example.com".into(),
            message_id_domain: "example.com".into(),
            config: AppConfig::default(),
        }
    }

    #[test]
    fn redirects_must_stay_inside_a_prefix() {
        let a = app(&["https://app.example.com/welcome", "http://localhost:3000/"]);
        for ok in [
            "https://app.example.com/welcome",
            "https://app.example.com/welcome/next?x=1",
            "https://APP.example.com:443/welcome",
            "http://localhost:3000/x",
        ] {
            assert!(a.check_redirect(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://app.example.com.evil.test/welcome",
            "https://app.example.com@evil.test/welcome",
            "https://evil.test/https://app.example.com/welcome",
            "http://app.example.com/welcome",
            "https://app.example.com/other",
            "https://app.example.com:8443/welcome",
            "javascript:alert(1)",
            "//evil.test/",
            "/welcome",
            "http://localhost:3001/x",
        ] {
            assert!(a.check_redirect(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_keys_match_plain_and_hashed_forms() {
        let hashed = ApiKey::of("plain-key-0123456789").to_config_string();
        assert_eq!(
            ApiKey::parse(&hashed).expect("parses"),
            ApiKey::of("plain-key-0123456789")
        );
        assert!(ApiKey::parse("sha256:zz").is_err());
        assert!(ApiKey::parse("short").is_err());
        let apps = Apps(Arc::new(vec![Arc::new(app(&[]))]));
        assert!(apps.authenticate("plain-key-0123456789").is_some());
        assert!(apps.authenticate("plain-key-0123456788").is_none());
        assert!(apps.authenticate("").is_none());
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
