//! One callback attempt over HTTP(S): build the signed POST, send it under a deadline, and turn
//! what happened into an [`Outcome`].
//!
//! Owns the HTTP client (hyper 1 + hyper-util's pooled legacy client, rustls through
//! hyper-rustls) and the classification of responses and failures, here and nowhere else
//! ([`classify`] for a response, [`classify_error`] for an attempt without one). Does not decide
//! when to retry or when to give up (the outbox retry policy and [`super::give_up`]).
//!
//! Invariants:
//! - The URL is used as given: it comes from configuration, never from a request (no SSRF).
//!   Only its scheme and host are checked ([`parse_callback_url`]).
//! - Redirects are never followed; a 3xx is a failed attempt.
//! - Connecting, sending and receiving the response head share one deadline
//!   ([`CallbackConfig::timeout_ms`]); at most [`RESPONSE_EXCERPT_BYTES`] of a failed
//!   response's body are read, within what is left of the same deadline, then it is dropped.
//! - TLS uses rustls with the `ring` provider set on the `ClientConfig` itself, never the
//!   process-wide default, so a build that links a second provider cannot make it panic. Trust
//!   roots are the operating system's store (`rustls-native-certs`), the same trust the SMTP
//!   client has through `rustls-platform-verifier`: operators add a private CA for an internal
//!   app the usual way (system store or `SSL_CERT_FILE`), and an image without CA certificates
//!   fails at startup rather than on the first callback.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Body;
use hyper::header::{CONTENT_TYPE, HeaderValue, InvalidHeaderValue, RETRY_AFTER, USER_AGENT};
use hyper::http::uri::{InvalidUri, Scheme};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;

use super::CallbackConfig;
use super::sign::Signer;
use crate::outbox::transport::Outcome;

/// `webhook-id` header: the entry's id, the same on every attempt (the app's idempotency key).
pub const WEBHOOK_ID: &str = "webhook-id";
/// `webhook-timestamp` header: seconds since the Unix epoch of this attempt, not of the event.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// `webhook-signature` header, see [`Signer::sign`].
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Sent as `user-agent` so the app can tell callbacks from other traffic.
pub const DEFAULT_USER_AGENT: &str = concat!("verigate/", env!("CARGO_PKG_VERSION"));

/// Most bytes of a failed response's body kept for the operator's error message. The message
/// is persisted with the entry (`last_error`) and shown in the admin API, and the first
/// kilobyte of an error page is where the useful part is.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// Longest `Retry-After` honoured. A receiver asking for more gets this; the retry policy and
/// the horizon still apply, so a hostile or broken value cannot park an entry for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How long an idle pooled connection is kept. Callbacks to one app come in bursts; this lets a
/// burst reuse connections without holding them open between bursts.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per host. Apps are few, and each receives at most a handful of
/// concurrent callbacks.
const POOL_MAX_IDLE_PER_HOST: usize = 4;

/// Longest accepted `webhook-id`. Ids are generated (`msg_` + 26 characters); this only guards
/// against a corrupted entry.
const MAX_WEBHOOK_ID_LEN: usize = 128;

/// Why a [`CallbackSender`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `timeout_ms` is 0, which would fail every attempt.
    #[error("callbacks.timeout_ms must be at least 1")]
    ZeroTimeout,
    /// rustls refused the configuration (no usable protocol version for the provider).
    #[error("cannot build the TLS client configuration")]
    Tls(#[source] rustls::Error),
    /// The system certificate store yielded no usable certificate.
    #[error(
        "no trusted CA certificates found in the system store ({errors} load errors); \
         install the ca-certificates package or point SSL_CERT_FILE at a PEM bundle"
    )]
    NoTrustRoots {
        /// How many errors the loader reported.
        errors: usize,
    },
}

/// Result of building a sender.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a callback URL is unusable. Checked at configuration load, and again per attempt.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUrl {
    /// Not a URI at all.
    #[error("callback url is not a valid absolute URL")]
    Syntax(#[source] InvalidUri),
    /// Only `http` and `https` are sent to.
    #[error("callback url must start with http:// or https://")]
    Scheme,
    /// No host to connect to.
    #[error("callback url has no host")]
    MissingHost,
    /// `user:password@` is not sent as credentials by this client, so it is refused rather than
    /// silently dropped.
    #[error("callback url must not contain user info (user:password@)")]
    UserInfo,
}

/// Why one attempt ended without a response.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The configured URL is unusable.
    #[error(transparent)]
    Url(#[from] InvalidUrl),
    /// The entry's `webhook-id` cannot be sent: Standard Webhooks forbids `.` in it (it is the
    /// delimiter of the signed content), and it must be a plain header token.
    #[error("webhook id is not usable (must be 1 to {MAX_WEBHOOK_ID_LEN} of [A-Za-z0-9_-])")]
    WebhookId,
    /// A header value could not be built.
    #[error("cannot build the request")]
    Header(#[source] InvalidHeaderValue),
    /// No response head within the timeout (connect, TLS, send and response head together).
    #[error("no response within {}ms", .0.as_millis())]
    Timeout(Duration),
    /// Connecting, TLS, or the exchange failed (refused, reset, certificate not trusted, ...).
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
}

/// Sends callbacks. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct CallbackSender {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    user_agent: HeaderValue,
}

impl std::fmt::Debug for CallbackSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSender")
            .field("timeout", &self.timeout)
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

// === impl CallbackSender ===

impl CallbackSender {
    /// A sender trusting the operating system's CA certificates. Reads the certificate store,
    /// so build it once at startup.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroTimeout`]; [`Error::NoTrustRoots`] when the store has no usable certificate;
    /// [`Error::Tls`] if rustls rejects the configuration.
    pub fn new(config: &CallbackConfig) -> Result<Self> {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::warn!(error = %e, "callbacks: some system CA certificates could not be loaded");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "callbacks: unparsable system CA certificates ignored"
            );
        }
        if added == 0 {
            return Err(Error::NoTrustRoots {
                errors: loaded.errors.len(),
            });
        }
        Self::with_root_certificates(config, roots)
    }

    /// A sender trusting exactly `roots` (tests, or a deployment pinning a private CA).
    ///
    /// # Errors
    ///
    /// [`Error::ZeroTimeout`]; [`Error::Tls`] if rustls rejects the configuration.
    pub fn with_root_certificates(config: &CallbackConfig, roots: RootCertStore) -> Result<Self> {
        if config.timeout_ms == 0 {
            return Err(Error::ZeroTimeout);
        }
        // The provider is given to this config only; see crates.md §0 for the panic that the
        // process-default provider causes when two providers are linked.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(Error::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        // The https wrapper hands https URLs to this connector too.
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(CallbackSender {
            client,
            timeout: config.timeout(),
            user_agent: HeaderValue::from_static(DEFAULT_USER_AGENT),
        })
    }

    /// Makes one attempt: POSTs `body` to `url`, signed by `signer` for `webhook_id` at
    /// `now_secs` (the `webhook-timestamp` of this attempt), and classifies the result.
    ///
    /// `url` must come from configuration: it is not checked beyond its scheme and host. Never
    /// fails: every problem, including an unusable URL, is an [`Outcome`].
    pub async fn send(
        &self,
        url: &str,
        webhook_id: &str,
        body: &[u8],
        signer: &Signer,
        now_secs: u64,
    ) -> Outcome {
        let now = UNIX_EPOCH
            .checked_add(Duration::from_secs(now_secs))
            .unwrap_or_else(SystemTime::now);
        match self
            .attempt(url, webhook_id, body, signer, now_secs, now)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => classify_error(&e),
        }
    }

    async fn attempt(
        &self,
        url: &str,
        webhook_id: &str,
        body: &[u8],
        signer: &Signer,
        now_secs: u64,
        now: SystemTime,
    ) -> std::result::Result<Outcome, AttemptError> {
        let uri = parse_callback_url(url)?;
        let id = webhook_id_header(webhook_id)?;
        let signature = signer.sign(webhook_id, now_secs, body);
        let signature = HeaderValue::from_str(&signature).map_err(AttemptError::Header)?;

        let mut req = Request::new(Full::new(Bytes::copy_from_slice(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, self.user_agent.clone());
        headers.insert(WEBHOOK_ID, id);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(now_secs));
        headers.insert(WEBHOOK_SIGNATURE, signature);

        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(AttemptError::Request(e)),
            Err(_elapsed) => return Err(AttemptError::Timeout(self.timeout)),
        };
        let (head, body) = response.into_parts();
        let outcome = classify(head.status, head.headers.get(RETRY_AFTER), now);
        Ok(match outcome {
            // The body of a success is of no use; dropping it closes the connection if the
            // receiver sent one, which costs nothing that matters.
            Outcome::Delivered => Outcome::Delivered,
            Outcome::Retry { reason, after } => {
                let excerpt = read_excerpt_until(deadline, body).await;
                Outcome::Retry {
                    reason: with_excerpt(reason, &excerpt),
                    after,
                }
            }
            Outcome::Reject { reason } => {
                let excerpt = read_excerpt_until(deadline, body).await;
                Outcome::Reject {
                    reason: with_excerpt(reason, &excerpt),
                }
            }
        })
    }
}

/// Checks that `url` is an absolute `http`/`https` URL with a host and no user info.
/// Run it when the configuration is loaded so a typo fails at startup, not per callback.
///
/// # Errors
///
/// [`InvalidUrl`] naming the problem.
pub fn parse_callback_url(url: &str) -> std::result::Result<Uri, InvalidUrl> {
    let uri: Uri = url.parse().map_err(InvalidUrl::Syntax)?;
    match uri.scheme() {
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => {}
        Some(_) | None => return Err(InvalidUrl::Scheme),
    }
    let Some(authority) = uri.authority() else {
        return Err(InvalidUrl::MissingHost);
    };
    if authority.as_str().contains('@') {
        return Err(InvalidUrl::UserInfo);
    }
    if authority.host().is_empty() {
        return Err(InvalidUrl::MissingHost);
    }
    Ok(uri)
}

/// The `webhook-id` header, refusing ids the signature scheme cannot carry.
fn webhook_id_header(id: &str) -> std::result::Result<HeaderValue, AttemptError> {
    let usable = !id.is_empty()
        && id.len() <= MAX_WEBHOOK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !usable {
        return Err(AttemptError::WebhookId);
    }
    HeaderValue::from_str(id).map_err(AttemptError::Header)
}

/// What a response means for the entry. Every status lands in exactly one arm.
///
/// - 2xx: delivered.
/// - 410 Gone: the receiver asks us to stop: never retried.
/// - 429, 502, 503, 504: the receiver is overloaded; retried, no sooner than its `Retry-After`
///   (delay-seconds or HTTP-date, capped at [`MAX_RETRY_AFTER`], ignored when malformed).
/// - Any other 3xx: a failure, since redirects are not followed; the operator should configure
///   the final URL.
/// - Any other 4xx or 5xx, and anything outside 200–599: retried (Standard Webhooks treats
///   them as failed attempts, and a receiver's bug or outage is usually fixed in time).
pub fn classify(status: StatusCode, retry_after: Option<&HeaderValue>, now: SystemTime) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Reject {
            reason: "receiver said 410 Gone: stop sending callbacks".to_string(),
        },
        429 | 502 | 503 | 504 => Outcome::Retry {
            reason: format!("receiver answered {status}"),
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        300..=399 => Outcome::Retry {
            reason: format!(
                "receiver answered {status}; redirects are not followed, \
                 set the callback URL to the final location"
            ),
            after: None,
        },
        400..=409 | 411..=428 | 430..=499 | 500 | 501 | 505..=599 => Outcome::Retry {
            reason: format!("receiver answered {status}"),
            after: None,
        },
        0..=199 | 600..=u16::MAX => Outcome::Retry {
            reason: format!("receiver answered unexpected status {code}"),
            after: None,
        },
    }
}

/// What an attempt that got no usable response means for the entry.
///
/// A bad URL is retried: the URL comes from the configuration, and the next attempt uses the
/// corrected one once an operator has fixed it (the horizon ends it otherwise). An unusable
/// webhook id or header cannot change between attempts, so it is rejected. Timeouts and
/// connection failures (refused, reset, DNS, TLS) are retried.
pub fn classify_error(error: &AttemptError) -> Outcome {
    match error {
        AttemptError::Url(_) | AttemptError::Timeout(_) | AttemptError::Request(_) => {
            Outcome::Retry {
                reason: error_chain(error),
                after: None,
            }
        }
        AttemptError::WebhookId | AttemptError::Header(_) => Outcome::Reject {
            reason: error_chain(error),
        },
    }
}

/// Parses `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. A date in the past
/// means no wait; anything else that does not parse is ignored.
fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let delay = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail, and an overflowing delay is "very long".
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// `error: cause: cause`, for the persisted reason. hyper's own messages name the kind only
/// ("client error (Connect)"); the useful part ("Connection refused", "UnknownIssuer") is in
/// the sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Reads at most [`RESPONSE_EXCERPT_BYTES`] of `body` before `deadline`, then drops the rest.
/// Whatever arrived before a timeout or an error is kept.
async fn read_excerpt_until<B>(deadline: tokio::time::Instant, body: B) -> Vec<u8>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut excerpt = Vec::new();
    let _ = tokio::time::timeout_at(deadline, read_excerpt(body, &mut excerpt)).await;
    excerpt
}

async fn read_excerpt<B>(mut body: B, excerpt: &mut Vec<u8>)
where
    B: Body<Data = Bytes> + Unpin,
{
    while excerpt.len() < RESPONSE_EXCERPT_BYTES {
        let Some(Ok(frame)) = body.frame().await else {
            return;
        };
        if let Ok(data) = frame.into_data() {
            let room = RESPONSE_EXCERPT_BYTES - excerpt.len();
            excerpt.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
}

/// Appends the body excerpt, quoted and escaped so it stays on one line in logs.
fn with_excerpt(reason: String, excerpt: &[u8]) -> String {
    if excerpt.is_empty() {
        return reason;
    }
    format!("{reason}; body: {:?}", String::from_utf8_lossy(excerpt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn retry(after: Option<u64>) -> impl Fn(&Outcome) -> bool {
        move |o| matches!(o, Outcome::Retry { after: a, .. } if *a == after.map(Duration::from_secs))
    }

    #[test]
    fn classify_covers_every_status_class() {
        // 2023-11-14T22:13:20Z; the HTTP-date below is 120 s later.
        let now = at(1_700_000_000);
        let date_in_2_min = "Tue, 14 Nov 2023 22:15:20 GMT";
        let date_in_past = "Tue, 14 Nov 2023 22:00:00 GMT";
        let date_in_a_day = "Wed, 15 Nov 2023 22:13:20 GMT";
        type Check = Box<dyn Fn(&Outcome) -> bool>;
        let delivered: fn() -> Check = || Box::new(|o| *o == Outcome::Delivered);
        let reject: fn() -> Check = || Box::new(|o| matches!(o, Outcome::Reject { .. }));
        let cases: Vec<(u16, Option<&str>, Check)> = vec![
            (200, None, delivered()),
            (201, None, delivered()),
            (204, Some("5"), delivered()),
            (299, None, delivered()),
            (410, None, reject()),
            (410, Some("5"), reject()),
            (429, Some("7"), Box::new(retry(Some(7)))),
            (429, None, Box::new(retry(None))),
            (503, Some(" 30 "), Box::new(retry(Some(30)))),
            (502, Some(date_in_2_min), Box::new(retry(Some(120)))),
            (504, Some(date_in_past), Box::new(retry(Some(0)))),
            (503, Some(date_in_a_day), Box::new(retry(Some(3600)))),
            (429, Some("86400"), Box::new(retry(Some(3600)))),
            (
                429,
                Some("99999999999999999999999"),
                Box::new(retry(Some(3600))),
            ),
            (429, Some("-5"), Box::new(retry(None))),
            (429, Some("1.5"), Box::new(retry(None))),
            (429, Some("soon"), Box::new(retry(None))),
            (429, Some(""), Box::new(retry(None))),
            // Retry-After is honoured only where the spec says the receiver is overloaded.
            (500, Some("7"), Box::new(retry(None))),
            (301, None, Box::new(retry(None))),
            (302, Some("7"), Box::new(retry(None))),
            (307, None, Box::new(retry(None))),
            (308, None, Box::new(retry(None))),
            (304, None, Box::new(retry(None))),
            (400, None, Box::new(retry(None))),
            (401, None, Box::new(retry(None))),
            (404, None, Box::new(retry(None))),
            (409, None, Box::new(retry(None))),
            (411, None, Box::new(retry(None))),
            (428, None, Box::new(retry(None))),
            (430, None, Box::new(retry(None))),
            (499, None, Box::new(retry(None))),
            (500, None, Box::new(retry(None))),
            (501, None, Box::new(retry(None))),
            (505, None, Box::new(retry(None))),
            (599, None, Box::new(retry(None))),
            (101, None, Box::new(retry(None))),
            (199, None, Box::new(retry(None))),
            (600, None, Box::new(retry(None))),
            (999, None, Box::new(retry(None))),
        ];
        for (code, retry_after, check) in cases {
            let status = StatusCode::from_u16(code).expect("valid status");
            let value = retry_after.map(|v| HeaderValue::from_str(v).expect("header"));
            let outcome = classify(status, value.as_ref(), now);
            assert!(check(&outcome), "{code} {retry_after:?} gave {outcome:?}");
        }
    }

    #[test]
    fn redirects_say_they_are_not_followed() {
        let o = classify(StatusCode::FOUND, None, at(0));
        let Outcome::Retry { reason, .. } = o else {
            panic!("{o:?}")
        };
        assert!(reason.contains("not followed"), "{reason}");
    }

    #[test]
    fn gone_says_stop() {
        assert_eq!(
            classify(StatusCode::GONE, None, at(0)),
            Outcome::Reject {
                reason: "receiver said 410 Gone: stop sending callbacks".to_string()
            }
        );
    }

    #[test]
    fn a_non_ascii_retry_after_is_ignored() {
        let v = HeaderValue::from_bytes(b"\xff7").expect("opaque header");
        assert_eq!(parse_retry_after(&v, at(0)), None);
    }

    #[test]
    fn attempt_errors_are_classified() {
        let url = parse_callback_url("ftp://x").expect_err("bad scheme");
        assert!(matches!(
            classify_error(&AttemptError::Url(url)),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify_error(&AttemptError::Timeout(Duration::from_millis(300))),
            Outcome::Retry { ref reason, after: None } if reason == "no response within 300ms"
        ));
        assert!(matches!(
            classify_error(&AttemptError::WebhookId),
            Outcome::Reject { .. }
        ));
        let bad = HeaderValue::from_str("a\nb").expect_err("newline");
        assert!(matches!(
            classify_error(&AttemptError::Header(bad)),
            Outcome::Reject { .. }
        ));
        // `Request` needs a real hyper error; the integration tests cover it (refused, TLS).
    }

    #[test]
    fn callback_urls_must_be_absolute_http_or_https() {
        let ok = [
            "http://127.0.0.1:8080/hook",
            "https://app.example/callbacks/verigate?tenant=1",
            "HTTPS://app.example",
            "https://[::1]:8443/x",
        ];
        for url in ok {
            assert!(parse_callback_url(url).is_ok(), "{url}");
        }
        // (url, the error's Debug form starts with)
        let bad = [
            ("ftp://app.example/x", "Scheme"),
            ("file:///etc/passwd", "Syntax"),
            ("/relative/path", "Scheme"),
            ("app.example/hook", "Syntax"),
            ("https://user:pw@app.example/x", "UserInfo"),
            ("https:// spaces.example", "Syntax"),
            ("", "Syntax"),
        ];
        for (url, expected) in bad {
            match parse_callback_url(url) {
                Ok(u) => panic!("{url:?} was accepted as {u}"),
                Err(e) => assert!(format!("{e:?}").starts_with(expected), "{url:?} gave {e:?}"),
            }
        }
    }

    #[test]
    fn webhook_ids_must_be_plain_tokens_without_dots() {
        assert!(webhook_id_header("msg_01JD0000000000000000000000").is_ok());
        assert!(webhook_id_header("a-b_C9").is_ok());
        for bad in [
            "",
            "msg.1",
            "msg 1",
            "msg,1",
            "msg\n1",
            "é",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(webhook_id_header(bad), Err(AttemptError::WebhookId)),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_excerpt_is_bounded_and_stays_on_one_line() {
        let big = Full::new(Bytes::from(vec![b'x'; 10 * RESPONSE_EXCERPT_BYTES]));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        assert_eq!(
            read_excerpt_until(deadline, big).await.len(),
            RESPONSE_EXCERPT_BYTES
        );
        let reason = with_excerpt("receiver answered 500".into(), b"line 1\nline 2\xff");
        assert_eq!(
            reason,
            "receiver answered 500; body: \"line 1\\nline 2\u{fffd}\""
        );
        assert_eq!(with_excerpt("r".into(), b""), "r");
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        let cfg = CallbackConfig {
            timeout_ms: 0,
            ..CallbackConfig::default()
        };
        assert!(matches!(
            CallbackSender::with_root_certificates(&cfg, RootCertStore::empty()),
            Err(Error::ZeroTimeout)
        ));
    }

    #[test]
    fn the_system_store_has_roots_on_this_machine() {
        // Guards the deployment assumption documented above (ca-certificates installed).
        CallbackSender::new(&CallbackConfig::default()).expect("system CA store");
    }
}
