//! The SMTP transport: hands one message at a time to the configured relay (mail-send 0.7)
//! and answers with one [`Outcome`].
//!
//! Owns: connecting (plain, STARTTLS or implicit TLS), EHLO and AUTH, a small pool of reused
//! sessions, PIPELINING when the relay offers it, a timeout on every network step, and the
//! classification of an attempt. Does not own: rendering the message (the daemon hands over
//! finished RFC 5322 bytes), retry scheduling (`outbox::retry`), DKIM signing (`crate::dkim`).
//!
//! ```text
//! send(mail) --checkout--> pooled session (NOOP first if idle > idle_timeout) | new session
//!            --MAIL FROM, RCPT TO, DATA (command_timeout; one write with PIPELINING)-->
//!            --message + final reply (data_timeout; one write)
//!            --classify--> Delivered | Retry | Reject
//!            --session---> back to the pool (after RSET when the transaction failed)
//!                          | dropped (timeout, I/O, TLS, unparseable reply, 421)
//! ```
//!
//! Invariants:
//! - Outcomes are decided in one place: [`classify`] for errors and [`classify_reply`] for
//!   replies (both go through the private `verdict`/`reply_verdict`, which also decide whether
//!   the session may be reused and which `smtp_replies_total{class}` series counts it).
//! - A pooled session has no open transaction: its last transaction ended with a 2xx, or RSET
//!   answered 2xx afterwards.
//! - A session that saw a timeout, an I/O or TLS error, an unparseable reply or a 421 is never
//!   reused.
//! - Every network step runs under a timeout: opening a session (`connect_timeout_ms`: TCP,
//!   greeting, EHLO, STARTTLS, AUTH), each command or pipelined group (`command_timeout_ms`:
//!   MAIL, RCPT, DATA, RSET, NOOP, QUIT), the message with its final reply (`data_timeout_ms`).
//!   mail-send's own default is one hour and its greeting read has no timeout at all, so
//!   neither is relied on.
//! - One recipient per transaction.
//! - Commands are pipelined only to a relay whose EHLO reply (after STARTTLS, when used) lists
//!   PIPELINING, and DATA always ends the group (RFC 2920): the message waits for the 354.
//!   A pipelined transaction that failed at MAIL or RCPT is judged by that reply; if the relay
//!   nevertheless answered DATA with 354, the session is dropped rather than reset.
//! - Logs carry masked addresses, stages and reply codes only: never the body, and never the
//!   reply text, which often quotes the full address. The reply text does go into the
//!   outcome's `reason` (stored for the operator).
//! - TLS uses the `ring` provider explicitly and never rustls' process-wide default, which
//!   panics when both `ring` and `aws-lc-rs` are compiled in (as in test builds with
//!   mailin-embedded).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_platform_verifier::BuilderVerifierExt;
use serde::{Deserialize, Serialize};
use smtp_proto::{EXT_PIPELINING, EhloResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::address::mask;
use crate::config::SmtpTls;
use crate::outbox::transport::{Outcome, OutgoingMail};

/// Default relay host.
const DEFAULT_HOST: &str = "localhost";
/// Default relay port: submission (RFC 6409), which is where STARTTLS and AUTH live.
const DEFAULT_PORT: u16 = 587;
/// Default for `connect_timeout_ms`: a relay that cannot greet, EHLO, STARTTLS and AUTH within
/// 10 s is better retried later than waited for.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Default for `command_timeout_ms`. RFC 5321 §4.5.3.2 suggests minutes for MAIL and RCPT; a
/// relay that takes more than 30 s is effectively down for a verification mail.
const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 30_000;
/// Default for `data_timeout_ms`: the message is small (a few KiB), but the relay may scan it
/// before the final reply.
const DEFAULT_DATA_TIMEOUT_MS: u64 = 60_000;
/// Default for `pool_size`: matches the daemon's default of four concurrent deliveries.
const DEFAULT_POOL_SIZE: usize = 4;
/// Default for `idle_timeout_ms`. Relays close idle sessions after a while (Postfix: 300 s);
/// a NOOP after 30 s of idleness finds a dead session before a message is risked on it.
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Longest reply text kept in an outcome's `reason`; a relay's multi-line reply can be long and
/// the reason is stored with every outbox entry.
const MAX_REASON_CHARS: usize = 300;
/// Buckets of `smtp_send_duration_seconds`, from a pooled local relay (ms) to a slow remote one.
const SEND_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Reply codes that mean "our credentials or AUTH setup are wrong" rather than "this message
/// is bad": 530 authentication required, 534 mechanism too weak, 535 credentials invalid,
/// 538 encryption required for the mechanism (RFC 4954).
const AUTH_PROBLEM_CODES: [u16; 4] = [530, 534, 535, 538];
/// 421: the relay is closing the session (RFC 5321 §3.8).
const CODE_CLOSING: u16 = 421;
/// "Start mail input": the only right answer to DATA.
const CODE_START_DATA: u16 = 354;

// === config ===

/// `[smtp]` settings of the SMTP transport. The daemon's `config::Smtp` gains these keys;
/// there `password` is a `Secret<String>` (plus `password_file`), here a plain `String`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Relay host name (or IP address). With TLS it is also the name the certificate must
    /// carry. Default `"localhost"`.
    pub host: String,
    /// Relay port. Default 587 (use 465 with `tls = "implicit"`).
    pub port: u16,
    /// `"none"`, `"starttls"` or `"implicit"`. `"starttls"` fails (and retries) when the relay
    /// does not offer STARTTLS: there is no silent downgrade. Default `"starttls"`.
    pub tls: SmtpTls,
    /// AUTH user name; set together with `password`. Default none (no AUTH).
    pub username: Option<String>,
    /// AUTH password; set together with `username`. Never serialized. Default none.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// Name sent in EHLO. Default: this machine's host name (`[127.0.0.1]` when it is not
    /// UTF-8), like most MTAs; some relays refuse a bare `localhost`.
    pub helo_name: Option<String>,
    /// Opening a session: TCP connect, greeting, EHLO, STARTTLS and AUTH together, in
    /// milliseconds. Default 10000.
    pub connect_timeout_ms: u64,
    /// Each of MAIL, RCPT, DATA (to its 354 reply), RSET, NOOP and QUIT, or the three of a
    /// pipelined MAIL/RCPT/DATA together, in milliseconds. Default 30000.
    pub command_timeout_ms: u64,
    /// The message and the final reply together, in milliseconds. Default 60000.
    pub data_timeout_ms: u64,
    /// Idle sessions kept for reuse; 0 opens a session per message. Default 4.
    pub pool_size: usize,
    /// A pooled session idle longer than this gets a NOOP before reuse and is dropped if the
    /// NOOP fails, in milliseconds. Default 30000.
    pub idle_timeout_ms: u64,
    /// Accept any TLS certificate (self-signed, expired, wrong name). For test relays only:
    /// it allows a man in the middle to read every code. Logged as a warning. Default false.
    pub accept_invalid_certs: bool,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            tls: SmtpTls::Starttls,
            username: None,
            password: None,
            helo_name: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            command_timeout_ms: DEFAULT_COMMAND_TIMEOUT_MS,
            data_timeout_ms: DEFAULT_DATA_TIMEOUT_MS,
            pool_size: DEFAULT_POOL_SIZE,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            accept_invalid_certs: false,
        }
    }
}

impl SmtpConfig {
    /// The longest one [`SmtpTransport::send`] can take when every network step runs into its
    /// timeout: NOOP checks of stale pooled sessions (up to `pool_size` of them), MAIL FROM on
    /// a pooled session that turns out dead, a new session (`connect_timeout_ms`), MAIL, RCPT
    /// and DATA one at a time, the message with its final reply (`data_timeout_ms`), and RSET
    /// after a failed transaction. That is `connect + data + (pool_size + 5) x command`:
    /// 340 s with the defaults. The outbox leases a mail at least this long (plus a margin), so
    /// a slow attempt keeps its claim until it ends.
    pub fn longest_send(&self) -> Duration {
        // NOOPs, the dead session's MAIL FROM, MAIL, RCPT, DATA, RSET.
        let commands = u64::try_from(self.pool_size)
            .unwrap_or(u64::MAX)
            .saturating_add(5);
        Duration::from_millis(
            self.connect_timeout_ms
                .saturating_add(self.data_timeout_ms)
                .saturating_add(commands.saturating_mul(self.command_timeout_ms)),
        )
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("helo_name", &self.helo_name)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("data_timeout_ms", &self.data_timeout_ms)
            .field("pool_size", &self.pool_size)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .finish()
    }
}

/// Why the SMTP transport cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `host` is empty or contains whitespace.
    #[error("smtp.host {0:?} is not a host name: set it to the relay's name or IP address")]
    InvalidHost(String),
    /// `helo_name` is empty or contains whitespace or control characters.
    #[error(
        "smtp.helo_name {0:?} is not a host name: use a plain name such as \"mail.example.com\""
    )]
    InvalidHeloName(String),
    /// Only one of `username` and `password` is set.
    #[error("smtp.username and smtp.password must be set together (or both left out for no AUTH)")]
    IncompleteCredentials,
    /// A timeout is zero.
    #[error("smtp.{key} must be greater than 0")]
    ZeroTimeout {
        /// The offending key.
        key: &'static str,
    },
    /// TLS is on and `host` cannot be checked against a certificate.
    #[error("smtp.host {host:?} is not valid as a TLS server name")]
    InvalidTlsName {
        /// The configured host.
        host: String,
        /// What rustls said.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The TLS client could not be set up, e.g. no CA certificates were found on the system.
    #[error("cannot set up TLS for SMTP (is the ca-certificates package installed?): {0}")]
    TlsSetup(#[source] rustls::Error),
}

// === metrics ===

/// How one delivery attempt ended, as counted by `smtp_replies_total{class}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// The relay answered 2xx.
    Positive,
    /// The relay answered 4xx.
    Transient,
    /// The relay answered 5xx.
    Permanent,
    /// A step timed out.
    Timeout,
    /// The connection failed (refused, reset, closed).
    Io,
    /// TLS failed (handshake, certificate, no STARTTLS offered).
    Tls,
    /// The relay spoke something we could not follow (unparseable or out-of-sequence reply,
    /// no usable AUTH mechanism).
    Protocol,
}

impl ReplyClass {
    /// Every class, for pre-setting the labelled series.
    pub const ALL: [ReplyClass; 7] = [
        ReplyClass::Positive,
        ReplyClass::Transient,
        ReplyClass::Permanent,
        ReplyClass::Timeout,
        ReplyClass::Io,
        ReplyClass::Tls,
        ReplyClass::Protocol,
    ];

    /// The `class` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyClass::Positive => "2xx",
            ReplyClass::Transient => "4xx",
            ReplyClass::Permanent => "5xx",
            ReplyClass::Timeout => "timeout",
            ReplyClass::Io => "io",
            ReplyClass::Tls => "tls",
            ReplyClass::Protocol => "protocol",
        }
    }

    /// The class of an SMTP reply code.
    fn of_code(code: u16) -> ReplyClass {
        match code / 100 {
            2 => ReplyClass::Positive,
            4 => ReplyClass::Transient,
            5 => ReplyClass::Permanent,
            _ => ReplyClass::Protocol,
        }
    }
}

/// Metrics of the SMTP transport. Names carry no `verigate_` prefix: the daemon's registry
/// adds it.
#[derive(Debug, Clone)]
pub struct SmtpMetrics {
    /// `smtp_connections_opened_total`: sessions opened successfully (greeting, EHLO, TLS and
    /// AUTH done), by [`SmtpTransport::send`] and [`SmtpTransport::probe`].
    pub connections_opened: IntCounter,
    /// `smtp_send_duration_seconds`: one [`SmtpTransport::send`], including any connect.
    pub send_duration: Histogram,
    /// `smtp_replies_total{class}`: how each send attempt ended, see [`ReplyClass`].
    pub replies: IntCounterVec,
}

impl SmtpMetrics {
    /// Creates the metrics, registers them with `registry` and pre-sets every `class` series
    /// to 0.
    ///
    /// # Errors
    /// The names are already registered (a bug: register once and clone).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let connections_opened = IntCounter::new(
            "smtp_connections_opened_total",
            "SMTP sessions opened to the relay",
        )?;
        let send_duration = Histogram::with_opts(
            HistogramOpts::new(
                "smtp_send_duration_seconds",
                "Time to hand one message to the relay, including connecting",
            )
            .buckets(SEND_DURATION_BUCKETS.to_vec()),
        )?;
        let replies = IntCounterVec::new(
            Opts::new(
                "smtp_replies_total",
                "SMTP send attempts by how they ended: 2xx, 4xx, 5xx, timeout, io, tls, protocol",
            ),
            &["class"],
        )?;
        registry.register(Box::new(connections_opened.clone()))?;
        registry.register(Box::new(send_duration.clone()))?;
        registry.register(Box::new(replies.clone()))?;
        for class in ReplyClass::ALL {
            replies.with_label_values(&[class.as_str()]);
        }
        Ok(SmtpMetrics {
            connections_opened,
            send_duration,
            replies,
        })
    }
}

// === classification ===

/// What happens to the session after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionFate {
    /// Still in sync with the relay: RSET, then back to the pool.
    Reusable,
    /// Closed, timed out or confused: drop it.
    Broken,
}

/// Everything decided about one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    outcome: Outcome,
    class: ReplyClass,
    session: SessionFate,
    /// The reply code, when the relay answered (for logs).
    code: Option<u16>,
}

impl Verdict {
    fn retry(reason: String, class: ReplyClass, session: SessionFate) -> Self {
        Verdict {
            outcome: Outcome::Retry {
                reason,
                after: None,
            },
            class,
            session,
            code: None,
        }
    }

    /// Prefixes the reason with where it happened.
    fn at(mut self, stage: impl fmt::Display) -> Self {
        match &mut self.outcome {
            Outcome::Delivered => {}
            Outcome::Retry { reason, .. } | Outcome::Reject { reason } => {
                *reason = format!("{stage}: {reason}");
            }
        }
        self
    }
}

/// Classifies a failed attempt. Timeouts, connection, TLS and protocol errors and 4xx
/// replies are retried; 5xx replies are rejected with the reply text in `reason`, except the
/// AUTH family (530, 534, 535, 538), which is retried: a wrong password is the operator's to
/// fix, and every queued mail should go out once they have.
pub fn classify(error: &mail_send::Error) -> Outcome {
    verdict(error).outcome
}

/// Classifies the relay's reply that ended an attempt: 2xx delivered, 4xx retried, 5xx
/// rejected (AUTH-family 5xx retried, see [`classify`]), anything else retried as a protocol
/// error.
pub fn classify_reply(reply: &Response<String>) -> Outcome {
    reply_verdict(reply).outcome
}

/// The one place that decides what a mail-send error means. mail-send 0.7's `Error` is not
/// `#[non_exhaustive]`, so this match has no catch-all arm: a new variant fails the build.
fn verdict(error: &mail_send::Error) -> Verdict {
    use SessionFate::Broken;
    use mail_send::Error as E;
    match error {
        E::UnexpectedReply(reply) if (200..300).contains(&reply.code) => {
            // A 2xx where another code was due (e.g. 250 to DATA instead of 354): nothing was
            // delivered and the session state is unknown.
            Verdict {
                code: Some(reply.code),
                ..Verdict::retry(
                    format!("unexpected reply {}", describe_reply(reply)),
                    ReplyClass::Protocol,
                    Broken,
                )
            }
        }
        E::UnexpectedReply(reply) => reply_verdict(reply),
        E::AuthenticationFailed(reply) => Verdict {
            code: Some(reply.code),
            ..Verdict::retry(
                format!(
                    "the relay refused our credentials ({}): check smtp.username and smtp.password",
                    describe_reply(reply)
                ),
                ReplyClass::of_code(reply.code),
                Broken,
            )
        },
        E::Timeout => Verdict::retry(
            "timed out waiting for the relay".into(),
            ReplyClass::Timeout,
            Broken,
        ),
        E::Io(e) => Verdict::retry(format!("connection error: {e}"), ReplyClass::Io, Broken),
        E::Tls(e) => Verdict::retry(format!("TLS error: {e}"), ReplyClass::Tls, Broken),
        E::InvalidTLSName => Verdict::retry(
            "smtp.host is not valid as a TLS server name".into(),
            ReplyClass::Tls,
            Broken,
        ),
        E::MissingStartTls => Verdict::retry(
            "the relay does not offer STARTTLS: fix the relay, or use smtp.tls = \"implicit\" \
             (port 465), or \"none\" for a trusted local relay"
                .into(),
            ReplyClass::Tls,
            Broken,
        ),
        E::UnparseableReply => Verdict::retry(
            "unparseable reply, or the relay closed the connection".into(),
            ReplyClass::Protocol,
            Broken,
        ),
        E::Base64(e) => Verdict::retry(
            format!("bad AUTH challenge from the relay: {e}"),
            ReplyClass::Protocol,
            Broken,
        ),
        E::Auth(e) => Verdict::retry(
            format!("AUTH exchange failed: {e}"),
            ReplyClass::Protocol,
            Broken,
        ),
        E::UnsupportedAuthMechanism => Verdict::retry(
            "the relay offers no AUTH mechanism we support (PLAIN, LOGIN)".into(),
            ReplyClass::Protocol,
            Broken,
        ),
        E::MissingCredentials => Verdict::retry(
            "the relay needs credentials: set smtp.username and smtp.password".into(),
            ReplyClass::Protocol,
            Broken,
        ),
        // Only mail-send's message builder reports these; this transport sends its own
        // envelope. A message without an envelope can never be sent.
        E::MissingMailFrom | E::MissingRcptTo => Verdict {
            outcome: Outcome::Reject {
                reason: error.to_string(),
            },
            class: ReplyClass::Protocol,
            session: SessionFate::Reusable,
            code: None,
        },
    }
}

/// The one place that decides what a reply code means (see [`classify_reply`]).
fn reply_verdict(reply: &Response<String>) -> Verdict {
    let class = ReplyClass::of_code(reply.code);
    let text = describe_reply(reply);
    let (outcome, session) = match class {
        ReplyClass::Positive => (Outcome::Delivered, SessionFate::Reusable),
        ReplyClass::Transient => (
            Outcome::Retry {
                reason: text,
                after: None,
            },
            if reply.code == CODE_CLOSING {
                SessionFate::Broken
            } else {
                SessionFate::Reusable
            },
        ),
        ReplyClass::Permanent if AUTH_PROBLEM_CODES.contains(&reply.code) => (
            Outcome::Retry {
                reason: format!(
                    "{text} (an AUTH problem: check smtp.username, smtp.password and smtp.tls)"
                ),
                after: None,
            },
            SessionFate::Reusable,
        ),
        ReplyClass::Permanent => (Outcome::Reject { reason: text }, SessionFate::Reusable),
        ReplyClass::Timeout | ReplyClass::Io | ReplyClass::Tls | ReplyClass::Protocol => (
            Outcome::Retry {
                reason: format!("unexpected reply {text}"),
                after: None,
            },
            SessionFate::Broken,
        ),
    };
    Verdict {
        outcome,
        class,
        session,
        code: Some(reply.code),
    }
}

/// `550 5.1.1 no such user`: code, enhanced status code when there is one, and the text with
/// line breaks and control characters flattened, cut at [`MAX_REASON_CHARS`].
fn describe_reply(reply: &Response<String>) -> String {
    let [class, subject, detail] = reply.esc;
    let mut out = if class == 0 {
        format!("{}", reply.code)
    } else {
        format!("{} {class}.{subject}.{detail}", reply.code)
    };
    let text: String = reply
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect();
    let text = text.trim();
    if !text.is_empty() {
        out.push(' ');
        out.push_str(text);
    }
    out
}

/// Where in a transaction an attempt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    MailFrom,
    RcptTo,
    Data,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::MailFrom => "MAIL FROM",
            Stage::RcptTo => "RCPT TO",
            Stage::Data => "DATA",
        })
    }
}

// === impl SmtpTransport ===

/// The SMTP transport. Cheap to clone: clones share one pool.
#[derive(Clone)]
pub struct SmtpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    builder: SmtpClientBuilder<String>,
    tls: SmtpTls,
    connect_timeout: Duration,
    command_timeout: Duration,
    data_timeout: Duration,
    idle_timeout: Duration,
    pool_size: usize,
    /// Idle sessions, most recently used last.
    pool: Mutex<Vec<Idle>>,
    /// A session has opened at least once (by `send` or `probe`).
    reached: AtomicBool,
    metrics: SmtpMetrics,
}

/// A pooled session and since when it has been idle.
struct Idle {
    session: Session,
    since: Instant,
}

/// An open SMTP session.
struct Session {
    conn: Conn,
    /// The relay offered PIPELINING (RFC 2920) in its EHLO reply: MAIL FROM, RCPT TO and DATA
    /// then go out in one write, and their three replies are read together.
    pipelining: bool,
}

/// The connection under a session; plain and TLS clients are different types.
enum Conn {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

impl fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("relay", &self.inner.builder.addr)
            .field("tls", &self.inner.tls)
            .field("pool_size", &self.inner.pool_size)
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    /// Checks the configuration and sets up TLS. Opens no connection: see [`Self::probe`].
    ///
    /// # Errors
    /// An empty or malformed `host` or `helo_name`, a TLS mode with a `host` that cannot be a
    /// TLS server name, only one of `username`/`password`, a zero timeout, or no usable CA
    /// certificates on the system (when TLS is on and `accept_invalid_certs` is false).
    pub fn new(cfg: &SmtpConfig, metrics: SmtpMetrics) -> Result<Self, Error> {
        if !is_host_name(&cfg.host) {
            return Err(Error::InvalidHost(cfg.host.clone()));
        }
        if let Some(helo) = &cfg.helo_name
            && !is_host_name(helo)
        {
            return Err(Error::InvalidHeloName(helo.clone()));
        }
        for (key, ms) in [
            ("connect_timeout_ms", cfg.connect_timeout_ms),
            ("command_timeout_ms", cfg.command_timeout_ms),
            ("data_timeout_ms", cfg.data_timeout_ms),
        ] {
            if ms == 0 {
                return Err(Error::ZeroTimeout { key });
            }
        }
        let credentials = match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => Some(Credentials::new(user.clone(), password.clone())),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => return Err(Error::IncompleteCredentials),
        };
        let tls_on = match cfg.tls {
            SmtpTls::None => false,
            SmtpTls::Starttls | SmtpTls::Implicit => true,
        };
        if tls_on {
            ServerName::try_from(cfg.host.as_str()).map_err(|source| Error::InvalidTlsName {
                host: cfg.host.clone(),
                source,
            })?;
            if cfg.accept_invalid_certs {
                tracing::warn!(
                    relay = %cfg.host,
                    "smtp.accept_invalid_certs is on: the relay's TLS certificate is not checked; use this for test relays only"
                );
            }
        } else if credentials.is_some() {
            tracing::warn!(
                relay = %cfg.host,
                "smtp.tls is \"none\": the SMTP password is sent in clear text"
            );
        }
        let connector = tls_connector(tls_on, cfg.accept_invalid_certs)?;
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let mut builder =
            SmtpClientBuilder::new_with_tls_connector(cfg.host.clone(), cfg.port, connector)
                .implicit_tls(cfg.tls == SmtpTls::Implicit)
                // `open` sends EHLO itself, to keep the relay's capabilities, and then AUTH.
                .say_ehlo(false)
                .timeout(connect_timeout);
        if let Some(helo) = &cfg.helo_name {
            builder = builder.helo_host(helo.clone());
        }
        if let Some(credentials) = credentials {
            builder = builder.credentials(credentials);
        }
        Ok(SmtpTransport {
            inner: Arc::new(Inner {
                builder,
                tls: cfg.tls,
                connect_timeout,
                command_timeout: Duration::from_millis(cfg.command_timeout_ms),
                data_timeout: Duration::from_millis(cfg.data_timeout_ms),
                idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
                pool_size: cfg.pool_size,
                pool: Mutex::new(Vec::with_capacity(cfg.pool_size)),
                reached: AtomicBool::new(false),
                metrics,
            }),
        })
    }

    /// One delivery: takes a pooled session (or opens one), sends MAIL FROM `envelope_from`,
    /// RCPT TO `envelope_to` and DATA `bytes`, and classifies the result (see [`classify`]).
    ///
    /// A pooled session that turns out to be dead at MAIL FROM is replaced by a new one once,
    /// within this call, so a relay's idle disconnect does not cost a retry delay.
    pub async fn send(&self, mail: OutgoingMail) -> Outcome {
        let to = mask(&mail.envelope_to);
        if let Some(reason) = envelope_problem(&mail) {
            tracing::warn!(%to, entry = %mail.name, %reason, "mail not sent");
            return Outcome::Reject { reason };
        }
        let started = Instant::now();
        let verdict = self.inner.deliver(&mail).await;
        let m = &self.inner.metrics;
        m.send_duration.observe(started.elapsed().as_secs_f64());
        m.replies.with_label_values(&[verdict.class.as_str()]).inc();
        let class = verdict.class.as_str();
        match &verdict.outcome {
            Outcome::Delivered => {
                tracing::debug!(%to, entry = %mail.name, bytes = mail.bytes.len(), "mail handed to the SMTP relay");
            }
            Outcome::Retry { .. } => {
                tracing::info!(%to, entry = %mail.name, class, code = ?verdict.code, "SMTP attempt failed; will retry");
            }
            Outcome::Reject { .. } => {
                tracing::info!(%to, entry = %mail.name, class, code = ?verdict.code, "SMTP relay rejected the mail");
            }
        }
        verdict.outcome
    }

    /// Opens a session (greeting, EHLO, STARTTLS and AUTH as configured) and QUITs; true if
    /// the session opened. Used by `/readyz` ("relay reachable at least once"). Bounded by
    /// `connect_timeout_ms` plus `command_timeout_ms`.
    pub async fn probe(&self) -> bool {
        match self.inner.open().await {
            Ok(session) => {
                if let Err(e) = session.quit(self.inner.command_timeout).await {
                    tracing::debug!(error = %e, "SMTP probe: QUIT failed (the relay is reachable)");
                }
                true
            }
            Err(e) => {
                let reason = match verdict(&e).outcome {
                    Outcome::Retry { reason, .. } | Outcome::Reject { reason } => reason,
                    Outcome::Delivered => String::new(),
                };
                tracing::warn!(relay = %self.inner.builder.addr, %reason, "SMTP relay probe failed");
                false
            }
        }
    }

    /// Whether a session to the relay has opened at least once since start-up (by
    /// [`Self::send`] or [`Self::probe`]): a cheap, synchronous answer for `/readyz` once a
    /// probe has run.
    pub fn has_reached_relay(&self) -> bool {
        self.inner.reached.load(Ordering::Relaxed)
    }

    /// QUITs every idle pooled session (at shutdown). Sessions in use are not touched and
    /// return to the pool as usual.
    pub async fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.inner.lock_pool());
        for i in idle {
            if let Err(e) = i.session.quit(self.inner.command_timeout).await {
                tracing::debug!(error = %e, "SMTP QUIT at shutdown failed");
            }
        }
    }
}

impl Inner {
    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The pool holds no invariant a panicking holder could break half-way.
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one transaction; the verdict's reason says at which stage it stopped.
    async fn deliver(&self, mail: &OutgoingMail) -> Verdict {
        let (mut session, mut reused) = match self.checkout().await {
            Ok(s) => s,
            Err(e) => return self.connect_failure(&e),
        };
        loop {
            let Failure {
                stage,
                error,
                out_of_step,
            } = match session.transaction(mail, self).await {
                Ok(reply) => {
                    self.checkin(session);
                    return reply_verdict(&reply);
                }
                Err(failure) => failure,
            };
            let mut judged = verdict(&error).at(stage);
            if out_of_step {
                judged.session = SessionFate::Broken;
            }
            match judged.session {
                SessionFate::Reusable => self.reset_and_checkin(session).await,
                SessionFate::Broken => {
                    drop(session);
                    if reused && stage == Stage::MailFrom {
                        tracing::debug!(error = %error, "pooled SMTP session was dead; opening a new one");
                        match self.open().await {
                            Ok(fresh) => {
                                session = fresh;
                                reused = false;
                                continue;
                            }
                            Err(e) => return self.connect_failure(&e),
                        }
                    }
                }
            }
            return judged;
        }
    }

    fn connect_failure(&self, error: &mail_send::Error) -> Verdict {
        verdict(error).at(format_args!("connecting to {}", self.builder.addr))
    }

    /// A pooled session (checked with NOOP when idle too long), or a new one. The flag says
    /// whether the session was pooled.
    async fn checkout(&self) -> Result<(Session, bool), mail_send::Error> {
        loop {
            let Some(idle) = self.lock_pool().pop() else {
                break;
            };
            let mut session = idle.session;
            if idle.since.elapsed() < self.idle_timeout {
                return Ok((session, true));
            }
            match session.noop(self.command_timeout).await {
                Ok(()) => return Ok((session, true)),
                Err(e) => tracing::debug!(error = %e, "idle SMTP session failed NOOP; dropped"),
            }
        }
        Ok((self.open().await?, false))
    }

    /// Opens a session, all of it (TCP, greeting, EHLO, STARTTLS, AUTH) under
    /// `connect_timeout`: mail-send's `connect_plain` reads the greeting without a timeout.
    /// The builder stops after the greeting (or STARTTLS); the EHLO here keeps the relay's
    /// capabilities, which say whether it takes PIPELINING.
    async fn open(&self) -> Result<Session, mail_send::Error> {
        let connect = async {
            let mut conn = match self.tls {
                SmtpTls::None => Conn::Plain(self.builder.connect_plain().await?),
                SmtpTls::Starttls | SmtpTls::Implicit => {
                    Conn::Tls(Box::new(self.builder.connect().await?))
                }
            };
            let capabilities = conn.ehlo(&self.builder.local_host).await?;
            if let Some(credentials) = &self.builder.credentials {
                conn.authenticate(credentials, &capabilities).await?;
            }
            Ok::<_, mail_send::Error>(Session {
                conn,
                pipelining: capabilities.has_capability(EXT_PIPELINING),
            })
        };
        let mut session = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| mail_send::Error::Timeout)??;
        session.conn.set_timeout(self.command_timeout);
        session.conn.set_nodelay();
        self.metrics.connections_opened.inc();
        self.reached.store(true, Ordering::Relaxed);
        Ok(session)
    }

    /// Returns an idle session to the pool, or drops it when the pool is full.
    fn checkin(&self, session: Session) {
        let mut pool = self.lock_pool();
        if pool.len() < self.pool_size {
            pool.push(Idle {
                session,
                since: Instant::now(),
            });
        }
    }

    /// Ends a failed transaction with RSET; pools the session only if RSET worked.
    async fn reset_and_checkin(&self, mut session: Session) {
        match session.rset(self.command_timeout).await {
            Ok(()) => self.checkin(session),
            Err(e) => tracing::debug!(error = %e, "RSET failed; SMTP session dropped"),
        }
    }
}

impl Session {
    async fn transaction(
        &mut self,
        mail: &OutgoingMail,
        inner: &Inner,
    ) -> Result<Response<String>, Failure> {
        let pipelining = self.pipelining;
        match &mut self.conn {
            Conn::Plain(c) => transaction(c, mail, inner, pipelining).await,
            Conn::Tls(c) => transaction(c, mail, inner, pipelining).await,
        }
    }

    async fn noop(&mut self, timeout: Duration) -> mail_send::Result<()> {
        self.conn.set_timeout(timeout);
        match &mut self.conn {
            Conn::Plain(c) => c.noop().await,
            Conn::Tls(c) => c.noop().await,
        }
    }

    async fn rset(&mut self, timeout: Duration) -> mail_send::Result<()> {
        self.conn.set_timeout(timeout);
        match &mut self.conn {
            Conn::Plain(c) => c.rset().await,
            Conn::Tls(c) => c.rset().await,
        }
    }

    async fn quit(mut self, timeout: Duration) -> mail_send::Result<()> {
        self.conn.set_timeout(timeout);
        match self.conn {
            Conn::Plain(c) => c.quit().await,
            Conn::Tls(c) => c.quit().await,
        }
    }
}

impl Conn {
    /// Turns Nagle's algorithm off. Each step of a transaction is one write followed by a
    /// wait for the reply; with Nagle on, a small write that follows an unacknowledged one
    /// waits for the relay's delayed ACK (~40 ms on Linux), capping each session at ~23
    /// mails/s (measured with benches/delivery.sh).
    fn set_nodelay(&self) {
        let r = match self {
            Conn::Plain(c) => c.stream.set_nodelay(true),
            Conn::Tls(c) => c.stream.get_ref().0.set_nodelay(true),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on the SMTP connection");
        }
    }

    fn set_timeout(&mut self, timeout: Duration) {
        match self {
            Conn::Plain(c) => c.timeout = timeout,
            Conn::Tls(c) => c.timeout = timeout,
        }
    }

    async fn ehlo(&mut self, host: &str) -> mail_send::Result<EhloResponse<String>> {
        match self {
            Conn::Plain(c) => c.ehlo(host).await,
            Conn::Tls(c) => c.ehlo(host).await,
        }
    }

    async fn authenticate(
        &mut self,
        credentials: &Credentials<String>,
        capabilities: &EhloResponse<String>,
    ) -> mail_send::Result<()> {
        match self {
            Conn::Plain(c) => c.authenticate(credentials, capabilities).await.map(drop),
            Conn::Tls(c) => c.authenticate(credentials, capabilities).await.map(drop),
        }
    }
}

/// Why a transaction stopped: the stage, mail-send's error for it, and whether the session
/// fell out of step with the relay whatever the error says (a pipelined DATA that was
/// accepted after MAIL FROM or RCPT TO failed leaves the relay waiting for a message).
struct Failure {
    stage: Stage,
    error: mail_send::Error,
    out_of_step: bool,
}

impl Failure {
    fn at(stage: Stage) -> impl FnOnce(mail_send::Error) -> Failure {
        move |error| Failure {
            stage,
            error,
            out_of_step: false,
        }
    }
}

/// MAIL FROM, RCPT TO and DATA on one session, then the message and its final reply.
///
/// With PIPELINING, the three commands are one write and their replies are read together
/// (RFC 2920: DATA is the last command of the group); a relay without it gets them one at a
/// time. The envelope takes `command_timeout`, the message with its final reply
/// `data_timeout`.
async fn transaction<S>(
    client: &mut SmtpClient<S>,
    mail: &OutgoingMail,
    inner: &Inner,
    pipelining: bool,
) -> Result<Response<String>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client.timeout = inner.command_timeout;
    let mail_from = format!("MAIL FROM:<{}>\r\n", mail.envelope_from);
    let rcpt_to = format!("RCPT TO:<{}>\r\n", mail.envelope_to);
    if pipelining {
        let group = [mail_from.as_bytes(), rcpt_to.as_bytes(), b"DATA\r\n"].concat();
        let replies = tokio::time::timeout(inner.command_timeout, async {
            client.stream.write_all(&group).await?;
            client.stream.flush().await?;
            client.read_many(3).await
        })
        .await
        .unwrap_or(Err(mail_send::Error::Timeout))
        .map_err(Failure::at(Stage::MailFrom))?;
        envelope_replies(replies)?;
    } else {
        for (stage, command) in [(Stage::MailFrom, mail_from), (Stage::RcptTo, rcpt_to)] {
            let reply = client.cmd(command).await.map_err(Failure::at(stage))?;
            positive(reply).map_err(Failure::at(stage))?;
        }
        let reply = client
            .cmd(b"DATA\r\n")
            .await
            .map_err(Failure::at(Stage::Data))?;
        data_started(reply)?;
    }
    let block = data_block(&mail.bytes);
    client.timeout = inner.data_timeout;
    let reply = tokio::time::timeout(inner.data_timeout, async {
        client.stream.write_all(&block).await?;
        client.stream.flush().await?;
        client.read().await
    })
    .await
    .unwrap_or(Err(mail_send::Error::Timeout));
    client.timeout = inner.command_timeout;
    reply.and_then(positive).map_err(Failure::at(Stage::Data))
}

/// Judges the replies to a pipelined MAIL FROM, RCPT TO, DATA: the first one that is not
/// what was due stops the transaction at its stage. A DATA accepted after an earlier
/// failure leaves the session out of step (it is dropped, not reset).
fn envelope_replies(replies: Vec<Response<String>>) -> Result<(), Failure> {
    let mut replies = replies.into_iter();
    let (Some(mail), Some(rcpt), Some(data)) = (replies.next(), replies.next(), replies.next())
    else {
        // read_many(3) returns three replies or an error.
        return Err(Failure::at(Stage::MailFrom)(
            mail_send::Error::UnparseableReply,
        ));
    };
    let out_of_step = data.code == CODE_START_DATA;
    let failed = |stage, reply| Failure {
        stage,
        error: mail_send::Error::UnexpectedReply(reply),
        out_of_step,
    };
    if !is_positive(&mail) {
        return Err(failed(Stage::MailFrom, mail));
    }
    if !is_positive(&rcpt) {
        return Err(failed(Stage::RcptTo, rcpt));
    }
    data_started(data)
}

/// The reply to DATA: 354, or the transaction stops at the DATA stage.
fn data_started(reply: Response<String>) -> Result<(), Failure> {
    if reply.code == CODE_START_DATA {
        Ok(())
    } else {
        Err(Failure::at(Stage::Data)(mail_send::Error::UnexpectedReply(
            reply,
        )))
    }
}

fn is_positive(reply: &Response<String>) -> bool {
    (200..300).contains(&reply.code)
}

/// The reply if it is 2xx, else mail-send's `UnexpectedReply` with it.
fn positive(reply: Response<String>) -> mail_send::Result<Response<String>> {
    if is_positive(&reply) {
        Ok(reply)
    } else {
        Err(mail_send::Error::UnexpectedReply(reply))
    }
}

/// The message as it goes on the wire after DATA: dot-stuffed (RFC 5321 §4.5.2: a line that
/// starts with `.` gets another), then `CRLF . CRLF`, in one buffer so that it leaves in one
/// write. When the message already ends with CRLF, that CRLF is the start of the terminator
/// (§4.1.1.4), so the relay receives the bytes exactly as composed.
fn data_block(bytes: &[u8]) -> Vec<u8> {
    let bytes = bytes.strip_suffix(b"\r\n").unwrap_or(bytes);
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 64 + 5);
    let mut line_start = true;
    for &b in bytes {
        if b == b'.' && line_start {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' || b == b'\r';
    }
    out.extend_from_slice(b"\r\n.\r\n");
    out
}

/// Why an envelope address cannot go into an SMTP command, if it cannot: CR or LF would inject
/// commands, and `<`/`>` or other control characters would break the path syntax.
fn envelope_problem(mail: &OutgoingMail) -> Option<String> {
    for (what, addr) in [
        ("sender", &mail.envelope_from),
        ("recipient", &mail.envelope_to),
    ] {
        if addr.chars().any(|c| c.is_control() || c == '<' || c == '>') {
            return Some(format!(
                "envelope {what} {} contains characters not allowed in SMTP",
                mask(addr)
            ));
        }
    }
    if mail.envelope_to.is_empty() {
        return Some("envelope recipient is empty".into());
    }
    None
}

/// Non-empty, without whitespace or control characters.
fn is_host_name(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

// === TLS ===

/// The TLS connector, on the `ring` provider (never the process default). With TLS off, the
/// connector is never used and trusts nothing.
///
/// # Errors
/// The platform verifier found no CA certificates, or the provider supports no protocol
/// version (neither happens with `ring` on a normal system).
fn tls_connector(tls_on: bool, accept_invalid_certs: bool) -> Result<TlsConnector, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::TlsSetup)?;
    let config = if !tls_on {
        builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
    } else if accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate::new(&provider)))
            .with_no_client_auth()
    } else {
        builder
            .with_platform_verifier()
            .map_err(Error::TlsSetup)?
            .with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `accept_invalid_certs`: skips the certificate chain and name checks, but still verifies
/// the handshake signatures, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AcceptAnyCertificate {
    fn new(provider: &CryptoProvider) -> Self {
        AcceptAnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
