//! Configuration: built-in defaults → TOML file → `VERIGATE_*` environment (`__` nests).
//!
//! Every struct here denies unknown keys, so a typo is an error that names the key. Secrets are
//! [`Secret`]s: they print as `[redacted]` in `Debug`, in `config check` and in logs, and may be
//! read from files (`*_file` keys) so that Kubernetes and systemd credentials work unchanged.
//! Fields state their unit and default; `config.example.toml` uses the same words, and a test
//! keeps the two in step.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Added to the longest SMTP send for the email lease ([`Config::email_lease`]): that bound
/// already has every network step at its timeout; the margin covers what no timeout bounds,
/// rendering and DKIM signing before the send and the outcome's write after it.
pub const SEND_LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Errors while loading or checking configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sources could not be merged or a value has the wrong type or name.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// A `*_file` secret could not be read.
    #[error("cannot read {key} from {path}: {source}")]
    SecretFile {
        /// The config key that named the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// A value parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The config key.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Result of configuration functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret value: redacted whenever it is printed or serialized.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(v: T) -> Self {
        Secret(v)
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret<String> {
    /// Accepts strings, and also numbers and booleans, because figment parses environment values
    /// like TOML: `VERIGATE_SMTP__PASSWORD=12345` must not fail as "expected a string".
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Loose {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(Secret(match Loose::deserialize(d)? {
            Loose::S(s) => s,
            Loose::I(i) => i.to_string(),
            Loose::U(u) => u.to_string(),
            Loose::F(f) => f.to_string(),
            Loose::B(b) => b.to_string(),
        }))
    }
}

/// The whole configuration tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Folder of the fjall database and generated development secrets. Default `./data`.
    pub data_dir: PathBuf,
    /// Externally visible origin and prefix of the public listener; every link in every email
    /// starts with it. Default `http://127.0.0.1:8025`.
    pub public_base_url: String,
    /// Listener addresses.
    pub listen: Listen,
    /// Link-token and code signing keys.
    pub signing: Signing,
    /// How mail leaves.
    pub delivery: Delivery,
    /// SMTP relay (when `delivery.transport = "smtp"`).
    pub smtp: Smtp,
    /// The `file` transport.
    pub file: FileTransport,
    /// DKIM signing of outgoing mail.
    pub dkim: crate::dkim::DkimConfig,
    /// Accepted address forms and the disposable-domain policy.
    pub address: crate::address::AddressConfig,
    /// DNS deliverability checks.
    pub dns: crate::address::dns::DnsConfig,
    /// Verification policy: codes, lifetimes, attempts.
    pub verification: VerificationPolicy,
    /// HTTP server limits.
    pub http: Http,
    /// Embedded store tuning.
    pub store: StoreConfig,
    /// Logging.
    pub log: Log,
    /// Rate limits (an app may override them in its own `limits` table).
    pub limits: crate::ratelimit::LimitsConfig,
    /// Callback delivery.
    pub callbacks: crate::callbacks::CallbackConfig,
    /// Live-status connections.
    pub watch: crate::watch::WatchConfig,
    /// Tenants sharing this daemon.
    pub apps: Vec<AppConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            public_base_url: "http://127.0.0.1:8025".into(),
            listen: Listen::default(),
            signing: Signing::default(),
            delivery: Delivery::default(),
            smtp: Smtp::default(),
            file: FileTransport::default(),
            dkim: crate::dkim::DkimConfig::default(),
            address: crate::address::AddressConfig::default(),
            dns: crate::address::dns::DnsConfig::default(),
            verification: VerificationPolicy::default(),
            http: Http::default(),
            store: StoreConfig::default(),
            log: Log::default(),
            limits: crate::ratelimit::LimitsConfig::default(),
            callbacks: crate::callbacks::CallbackConfig::default(),
            watch: crate::watch::WatchConfig::default(),
            apps: Vec::new(),
        }
    }
}

/// Listener addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// The api listener (host app, Prometheus, probes). Default `127.0.0.1:8026`.
    pub api: SocketAddr,
    /// The public listener (people's browsers). Default `127.0.0.1:8025`.
    pub public: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            api: SocketAddr::from(([127, 0, 0, 1], 8026)),
            public: SocketAddr::from(([127, 0, 0, 1], 8025)),
        }
    }
}

/// Signing keys, `"id:BASE64URL_32_BYTES"`; the first signs, all verify.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Signing {
    /// Keys inline. Default none: generated into `data_dir/signing-keys` on first start.
    pub keys: Vec<Secret<String>>,
    /// A file with one key per line, same format (appended after `keys`). Default none.
    pub keys_file: Option<PathBuf>,
}

/// Mail transport choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// An SMTP relay.
    Smtp,
    /// `.eml` files in `file.dir` (development).
    File,
    /// Only log that a message would be sent (development).
    Log,
}

/// Delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// `"smtp"`, `"file"` or `"log"`. Default `"file"`.
    pub transport: Transport,
    /// Default sender; an app may override. Default `verigate <no-reply@localhost>`.
    pub from: String,
    /// Global pacing toward the relay, messages per second; 0 = unpaced. Default 100.
    pub max_per_second: u32,
    /// Deliveries attempted at once. Default 4.
    pub workers: usize,
    /// How long a claimed entry stays leased to a worker before another may take it,
    /// in seconds. Default 60. An attempt renews its entry's lease as it starts (when the claim
    /// waited), so the lease only has to outlast one attempt; each lane raises it to cover its slowest one:
    /// with `transport = "smtp"` the email lease is at least the longest one SMTP send can take
    /// with every step at its `[smtp]` timeout (`connect_timeout_ms + data_timeout_ms +
    /// (pool_size + 5) x command_timeout_ms`) plus 5 s, which is 345 s with the defaults
    /// ([`Config::email_lease`]); the callback lease is at least twice `callbacks.timeout_ms`
    /// ([`Config::callback_lease`]). An entry whose worker died (a crash) waits this long
    /// before another attempt.
    pub lease_seconds: u64,
    /// First retry waits up to this long (full jitter), milliseconds. Default 3000.
    pub retry_base_ms: u64,
    /// Growth of the retry ceiling per attempt. Default 2.
    pub retry_factor: u32,
    /// Largest retry ceiling, seconds. Default 900.
    pub retry_cap_seconds: u64,
    /// Attempts before a mail fails for good (never after its verification expired). Default 12.
    pub max_attempts: u32,
    /// `/readyz` reports not ready until the transport has worked once (the SMTP relay
    /// answered). Default true.
    pub ready_requires_transport: bool,
}

impl Delivery {
    /// The retry schedule these settings describe.
    pub fn retry_policy(&self) -> crate::outbox::retry::RetryPolicy {
        crate::outbox::retry::RetryPolicy {
            base: std::time::Duration::from_millis(self.retry_base_ms),
            factor: self.retry_factor,
            cap: std::time::Duration::from_secs(self.retry_cap_seconds),
            max_attempts: self.max_attempts,
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            transport: Transport::File,
            from: "verigate <no-reply@localhost>".into(),
            max_per_second: 100,
            workers: 4,
            lease_seconds: 60,
            retry_base_ms: 3000,
            retry_factor: 2,
            retry_cap_seconds: 900,
            max_attempts: 12,
            ready_requires_transport: true,
        }
    }
}

/// SMTP TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (test relays only).
    None,
    /// STARTTLS, required.
    Starttls,
    /// TLS from the first byte (SMTPS).
    Implicit,
}

/// SMTP relay settings (see [`crate::outbox::smtp::SmtpConfig`] for the behaviour).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Smtp {
    /// Relay host (also the TLS name). Default `localhost`.
    pub host: String,
    /// Relay port. Default 587.
    pub port: u16,
    /// `"none"`, `"starttls"` (required, no downgrade) or `"implicit"`. Default `"starttls"`.
    pub tls: SmtpTls,
    /// AUTH user name. Default none.
    pub username: Option<String>,
    /// AUTH password. Default none.
    pub password: Option<Secret<String>>,
    /// File holding the AUTH password. Default none.
    pub password_file: Option<PathBuf>,
    /// Name sent in EHLO. Default: this machine's host name.
    pub helo_name: Option<String>,
    /// Opening a session (connect, greeting, EHLO, STARTTLS, AUTH), milliseconds. Default 10000.
    pub connect_timeout_ms: u64,
    /// Each of MAIL, RCPT, DATA (to its 354), RSET, NOOP, QUIT, or a pipelined MAIL/RCPT/DATA
    /// group, milliseconds. Default 30000.
    pub command_timeout_ms: u64,
    /// The message and the final reply, milliseconds. Default 60000.
    pub data_timeout_ms: u64,
    /// Idle sessions kept for reuse; 0 = a session per message. Default 4.
    pub pool_size: usize,
    /// A pooled session idle longer than this gets a NOOP before reuse, milliseconds. Default 30000.
    pub idle_timeout_ms: u64,
    /// Accept any TLS certificate: test relays only. Default false.
    pub accept_invalid_certs: bool,
}

impl Default for Smtp {
    fn default() -> Self {
        let d = crate::outbox::smtp::SmtpConfig::default();
        Smtp {
            host: d.host,
            port: d.port,
            tls: d.tls,
            username: None,
            password: None,
            password_file: None,
            helo_name: None,
            connect_timeout_ms: d.connect_timeout_ms,
            command_timeout_ms: d.command_timeout_ms,
            data_timeout_ms: d.data_timeout_ms,
            pool_size: d.pool_size,
            idle_timeout_ms: d.idle_timeout_ms,
            accept_invalid_certs: d.accept_invalid_certs,
        }
    }
}

impl Smtp {
    /// The transport's configuration, with the password resolved.
    pub fn transport_config(&self) -> crate::outbox::smtp::SmtpConfig {
        crate::outbox::smtp::SmtpConfig {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            username: self.username.clone(),
            password: self.password.as_ref().map(|p| p.expose().clone()),
            helo_name: self.helo_name.clone(),
            connect_timeout_ms: self.connect_timeout_ms,
            command_timeout_ms: self.command_timeout_ms,
            data_timeout_ms: self.data_timeout_ms,
            pool_size: self.pool_size,
            idle_timeout_ms: self.idle_timeout_ms,
            accept_invalid_certs: self.accept_invalid_certs,
        }
    }
}

/// The `file` transport.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileTransport {
    /// Folder for `.eml` files. Default `data_dir/mail`.
    pub dir: Option<PathBuf>,
}

/// Verification policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationPolicy {
    /// Characters a code is drawn from. Default `"0123456789"`.
    pub code_alphabet: String,
    /// Code length, characters. Default 6.
    pub code_length: usize,
    /// Wrong codes allowed before the verification locks. Default 5.
    pub max_attempts: u32,
    /// Lifetime of `code` and `link_and_code` verifications, seconds. Default 600.
    pub code_ttl_seconds: u64,
    /// Lifetime of `link` verifications, seconds. Default 86400.
    pub link_ttl_seconds: u64,
    /// Smallest `ttl_seconds` a request may ask for. Default 1.
    pub min_ttl_seconds: u64,
    /// Largest `ttl_seconds` a request may ask for. Default 604800 (7 days).
    pub max_ttl_seconds: u64,
    /// Locale when a request names none or one we lack. Default `"en"`.
    pub default_locale: String,
    /// How often the expiry sweeper runs, milliseconds. Default 1000.
    pub sweep_interval_ms: u64,
    /// How long an Idempotency-Key is remembered, seconds. Default 86400.
    pub idempotency_ttl_seconds: u64,
}

impl Default for VerificationPolicy {
    fn default() -> Self {
        VerificationPolicy {
            code_alphabet: "0123456789".into(),
            code_length: 6,
            max_attempts: 5,
            code_ttl_seconds: 600,
            link_ttl_seconds: 86_400,
            min_ttl_seconds: 1,
            max_ttl_seconds: 7 * 86_400,
            default_locale: "en".into(),
            sweep_interval_ms: 1000,
            idempotency_ttl_seconds: 86_400,
        }
    }
}

/// Largest `http.max_connections`.
const MAX_CONNECTIONS: u32 = 1_000_000;

/// HTTP server limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// Time to produce a response head, milliseconds. Default 10000.
    pub request_timeout_ms: u64,
    /// Time for a client to send its request head, milliseconds. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Requests in flight per listener before new ones get 503 `overloaded`. Default 1024.
    pub max_concurrency: usize,
    /// Open connections per listener; at the limit the listener stops accepting until one
    /// closes (new clients wait in the kernel's backlog). Default 4096.
    pub max_connections: u32,
    /// How long shutdown waits for in-flight requests, milliseconds. Default 10000.
    pub shutdown_grace_ms: u64,
    /// A header a trusted reverse proxy sets to the client's address (`x-forwarded-for`,
    /// `x-real-ip`); its last entry is used. Empty: the TCP peer address. Default empty.
    pub client_ip_header: String,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            request_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            max_concurrency: 1024,
            max_connections: 4096,
            shutdown_grace_ms: 10_000,
            client_ip_header: String::new(),
        }
    }
}

/// How hard a commit is flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fdatasync after every group commit.
    Data,
    /// fsync after every group commit.
    All,
}

/// Embedded store tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `"data"` (fdatasync) or `"all"` (fsync) for each group commit. Default `"data"`.
    pub sync: SyncMode,
    /// Most write operations grouped into one commit. Default 512.
    pub max_group: usize,
    /// Block cache size, MiB. Default 16.
    pub cache_mib: u64,
    /// Largest in-memory table of each record keyspace (verifications, outbox, idempotency)
    /// before it is flushed to disk, MiB; the three index keyspaces get half. Bounds memory
    /// under a write burst. Default 16.
    pub memtable_mib: u64,
    /// fjall's background threads (memtable flushes, compactions). Default 1: with more, fjall
    /// hands compaction requests back and forth between its workers, which kept a core busy
    /// under a create burst on two cores.
    pub worker_threads: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            sync: SyncMode::Data,
            max_group: 512,
            cache_mib: 16,
            memtable_mib: 16,
            worker_threads: 1,
        }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object a line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `"human"` or `"json"`. Default `"human"`.
    pub format: LogFormat,
    /// A tracing filter such as `"info"` or `"verigate=debug"`; `VERIGATE_LOG` overrides it.
    /// Default `"info,fjall=warn,lsm_tree=warn"`.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Human,
            level: "info,fjall=warn,lsm_tree=warn".into(),
        }
    }
}

/// One tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Stable id, `[a-z0-9_-]{1,64}`. Required.
    pub id: String,
    /// API keys: `"sha256:HEX"` of the key, or the plain key (development only).
    pub api_keys: Vec<Secret<String>>,
    /// A file with more API keys, one per line. Default none.
    pub api_keys_file: Option<PathBuf>,
    /// Where callbacks are POSTed. Default none (no callbacks).
    pub callback_url: Option<String>,
    /// Standard Webhooks secret, `whsec_BASE64`. Default none.
    pub webhook_secret: Option<Secret<String>>,
    /// More secrets that also sign every callback (rotation: add the new one, let the app
    /// accept it, then remove the old one). Default none.
    pub webhook_secrets: Vec<Secret<String>>,
    /// Also call back `verification.sent` when the mail is handed over. Default false.
    pub callback_sent_event: bool,
    /// File holding the webhook secret. Default none.
    pub webhook_secret_file: Option<PathBuf>,
    /// Allowed `redirect_url` prefixes (absolute http(s) URLs). Default none: no redirects.
    pub redirect_prefixes: Vec<String>,
    /// Sender of this app's mail. Default `delivery.from`.
    pub from: Option<String>,
    /// Template overrides: `<dir>/<purpose or "default">/<locale>/mail.{subject.txt,txt,html}`;
    /// checked at start and by `config check`. Default none (built-in templates).
    pub templates_dir: Option<PathBuf>,
    /// This app's rate limits, replacing the `[limits]` entries it names. Default none.
    pub limits: Option<crate::ratelimit::LimitsOverride>,
}

/// The template-override folders of `apps`, for [`crate::templates::Templates::load`].
pub fn template_dirs(apps: &[AppConfig]) -> Vec<(&str, &Path)> {
    apps.iter()
        .filter_map(|a| a.templates_dir.as_deref().map(|d| (a.id.as_str(), d)))
        .collect()
}

impl AppConfig {
    /// Every webhook secret that signs this app's callbacks, `webhook_secret` first.
    pub fn signing_secrets(&self) -> Vec<Secret<String>> {
        self.webhook_secret
            .iter()
            .chain(&self.webhook_secrets)
            .cloned()
            .collect()
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A TOML file; `None` means no file.
    pub file: Option<PathBuf>,
    /// Read `VERIGATE_*` environment variables.
    pub env: bool,
}

impl Sources {
    /// The sources a command line implies: `--config FILE`, else `VERIGATE_CONFIG`, else
    /// `/etc/verigate/config.toml` when it exists; and the environment.
    pub fn from_cli(file: Option<PathBuf>) -> Self {
        let file = file
            .or_else(|| std::env::var_os("VERIGATE_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let etc = Path::new("/etc/verigate/config.toml");
                etc.exists().then(|| etc.to_path_buf())
            });
        Sources { file, env: true }
    }
}

impl Config {
    /// The figment for `sources`, defaults first.
    pub fn figment(sources: &Sources) -> Figment {
        let mut f = Figment::new();
        if let Some(path) = &sources.file {
            f = f.merge(Toml::file_exact(path));
        }
        if sources.env {
            // VERIGATE_CONFIG names the file; VERIGATE_LOG is a tracing filter read by the CLI, not
            // the `[log]` table (VERIGATE_LOG__LEVEL still sets log.level).
            f = f.merge(
                Env::prefixed("VERIGATE_")
                    .split("__")
                    .ignore(&["config", "log"]),
            );
        }
        f
    }

    /// Loads, reads `*_file` secrets and checks the result.
    ///
    /// # Errors
    /// An unknown key (named), a wrong type, an unreadable secret file, or a value that makes
    /// no sense ([`Config::check`]).
    pub fn load(sources: &Sources) -> Result<Self> {
        Self::from_figment(Self::figment(sources))
    }

    /// Like [`Config::load`], from any figment (tests use TOML strings).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_figment(f: Figment) -> Result<Self> {
        let mut cfg: Config = f.extract().map_err(Box::new)?;
        cfg.read_secret_files()?;
        cfg.check()?;
        Ok(cfg)
    }

    fn read_secret_files(&mut self) -> Result<()> {
        if let Some(path) = &self.signing.keys_file {
            let text = read_secret("signing.keys_file", path)?;
            self.signing.keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| Secret(l.to_string())),
            );
        }
        if let Some(path) = &self.smtp.password_file {
            let text = read_secret("smtp.password_file", path)?;
            self.smtp.password = Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()));
        }
        for (i, app) in self.apps.iter_mut().enumerate() {
            if let Some(path) = &app.api_keys_file {
                let text = read_secret(&format!("apps[{i}].api_keys_file"), path)?;
                app.api_keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(|l| Secret(l.to_string())),
                );
            }
            if let Some(path) = &app.webhook_secret_file {
                let text = read_secret(&format!("apps[{i}].webhook_secret_file"), path)?;
                app.webhook_secret = Some(Secret(text.trim().to_string()));
            }
        }
        Ok(())
    }

    /// How long the email lane's claims last: `delivery.lease_seconds`, raised with the smtp
    /// transport to the longest one send can take
    /// ([`SmtpConfig::longest_send`](crate::outbox::smtp::SmtpConfig::longest_send)) plus
    /// [`SEND_LEASE_MARGIN`]. A lease that runs out while its attempt is still sending lets
    /// another worker pass send the same mail again.
    pub fn email_lease(&self) -> Duration {
        let lease = Duration::from_secs(self.delivery.lease_seconds);
        match self.delivery.transport {
            Transport::Smtp => lease.max(
                self.smtp
                    .transport_config()
                    .longest_send()
                    .saturating_add(SEND_LEASE_MARGIN),
            ),
            Transport::File | Transport::Log => lease,
        }
    }

    /// How long the callback lane's claims last: `delivery.lease_seconds`, at least twice
    /// `callbacks.timeout_ms` (the deadline of one callback attempt).
    pub fn callback_lease(&self) -> Duration {
        Duration::from_secs(self.delivery.lease_seconds)
            .max(self.callbacks.timeout().saturating_mul(2))
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the key and what to do.
    pub fn check(&self) -> Result<()> {
        let base = url::Url::parse(&self.public_base_url)
            .map_err(|e| invalid("public_base_url", format!("not an absolute URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(invalid(
                "public_base_url",
                "must be an http:// or https:// URL",
            ));
        }
        let v = &self.verification;
        if v.code_length < 4 || v.code_length > 32 {
            return Err(invalid(
                "verification.code_length",
                "must be between 4 and 32",
            ));
        }
        let alphabet: Vec<char> = v.code_alphabet.chars().collect();
        if alphabet.len() < 2 || alphabet.len() > 64 {
            return Err(invalid(
                "verification.code_alphabet",
                "must have between 2 and 64 characters",
            ));
        }
        if alphabet
            .iter()
            .any(|c| !c.is_ascii_alphanumeric() || c.is_ascii_lowercase())
        {
            return Err(invalid(
                "verification.code_alphabet",
                "use digits and upper-case ASCII letters only (codes are compared case-insensitively)",
            ));
        }
        let mut sorted = alphabet.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != alphabet.len() {
            return Err(invalid(
                "verification.code_alphabet",
                "has a repeated character",
            ));
        }
        if v.max_attempts == 0 {
            return Err(invalid("verification.max_attempts", "must be at least 1"));
        }
        if v.min_ttl_seconds == 0 || v.min_ttl_seconds > v.max_ttl_seconds {
            return Err(invalid(
                "verification.min_ttl_seconds",
                "must be at least 1 and not above verification.max_ttl_seconds",
            ));
        }
        for (key, ttl) in [
            ("verification.code_ttl_seconds", v.code_ttl_seconds),
            ("verification.link_ttl_seconds", v.link_ttl_seconds),
        ] {
            if ttl < v.min_ttl_seconds || ttl > v.max_ttl_seconds {
                return Err(invalid(
                    key,
                    "must lie within [min_ttl_seconds, max_ttl_seconds]",
                ));
            }
        }
        if self.http.max_concurrency == 0 {
            return Err(invalid("http.max_concurrency", "must be at least 1"));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.http.max_connections) {
            return Err(invalid(
                "http.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        self.callbacks
            .validate()
            .map_err(|e| invalid(format!("callbacks.{}", e.field), e.problem))?;
        if self.store.max_group == 0 {
            return Err(invalid("store.max_group", "must be at least 1"));
        }
        if self.delivery.workers == 0 {
            return Err(invalid("delivery.workers", "must be at least 1"));
        }
        if self.delivery.retry_base_ms == 0
            || self.delivery.retry_factor == 0
            || self.delivery.max_attempts == 0
        {
            return Err(invalid(
                "delivery.retry_base_ms",
                "retry_base_ms, retry_factor and max_attempts must be at least 1",
            ));
        }
        if self.delivery.lease_seconds == 0 {
            return Err(invalid("delivery.lease_seconds", "must be at least 1"));
        }
        crate::mail::parse_mailbox(&self.delivery.from)
            .map_err(|e| invalid("delivery.from", e.to_string()))?;
        for (i, key) in self.signing.keys.iter().enumerate() {
            crate::verification::token::SigningKey::parse(key.expose())
                .map_err(|e| invalid(format!("signing.keys[{i}]"), e.to_string()))?;
        }
        let mut ids = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let key = |k: &str| format!("apps[{i}].{k}");
            let id_ok = !app.id.is_empty()
                && app.id.len() <= 64
                && app.id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !id_ok {
                return Err(invalid(key("id"), "must match [a-z0-9_-]{1,64}"));
            }
            if !ids.insert(app.id.as_str()) {
                return Err(invalid(
                    key("id"),
                    format!("app id {:?} is used twice", app.id),
                ));
            }
            if app.api_keys.is_empty() {
                return Err(invalid(
                    key("api_keys"),
                    "an app needs at least one API key",
                ));
            }
            for (j, k) in app.api_keys.iter().enumerate() {
                crate::apps::ApiKey::parse(k.expose())
                    .map_err(|e| invalid(key(&format!("api_keys[{j}]")), e))?;
            }
            for (j, p) in app.redirect_prefixes.iter().enumerate() {
                crate::apps::RedirectPrefix::parse(p)
                    .map_err(|e| invalid(key(&format!("redirect_prefixes[{j}]")), e))?;
            }
            if let Some(url) = &app.callback_url {
                let u = url::Url::parse(url).map_err(|e| {
                    invalid(key("callback_url"), format!("not an absolute URL: {e}"))
                })?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(invalid(key("callback_url"), "must be http:// or https://"));
                }
            }
            if let Some(from) = &app.from {
                crate::mail::parse_mailbox(from)
                    .map_err(|e| invalid(key("from"), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Folder of the `file` transport.
    pub fn mail_dir(&self) -> PathBuf {
        self.file
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("mail"))
    }

    /// The effective configuration as TOML, secrets redacted (for `config check`).
    ///
    /// # Errors
    /// Only if serialization fails, which would be a bug.
    pub fn to_redacted_toml(&self) -> Result<String> {
        toml_string(self).map_err(|e| invalid("(all)", e))
    }
}

fn toml_string(cfg: &Config) -> std::result::Result<String, String> {
    // figment re-exports a TOML serializer through its value model; go through serde_json to a
    // figment Value and print it as TOML-like `key = value` lines, stable and sorted.
    let v = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let mut out = String::new();
    write_toml(&mut out, "", &v);
    Ok(out)
}

fn write_toml(out: &mut String, prefix: &str, v: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = v else { return };
    let mut tables = Vec::new();
    for (k, val) in map {
        match val {
            Value::Object(_) => tables.push((k, val)),
            Value::Array(items) if items.iter().any(Value::is_object) => tables.push((k, val)),
            Value::Null => {}
            other => out.push_str(&format!("{k} = {other}\n")),
        }
    }
    for (k, val) in tables {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match val {
            Value::Array(items) => {
                for item in items {
                    out.push_str(&format!("\n[[{name}]]\n"));
                    write_toml(out, &name, item);
                }
            }
            _ => {
                out.push_str(&format!("\n[{name}]\n"));
                write_toml(out, &name, val);
            }
        }
    }
}

fn read_secret(key: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::SecretFile {
        key: key.into(),
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> Result<Config> {
        Config::from_figment(Figment::from(Toml::string(s)))
    }

    #[test]
    fn empty_config_gives_the_embedded_defaults() {
        let c = from_toml("").expect("defaults are valid");
        assert_eq!(c.listen.api.to_string(), "127.0.0.1:8026");
        assert_eq!(c.listen.public.to_string(), "127.0.0.1:8025");
        assert_eq!(c.delivery.transport, Transport::File);
        assert_eq!(c.verification.max_attempts, 5);
    }

    #[test]
    fn the_email_lease_covers_the_slowest_smtp_send_and_the_callback_lease_two_timeouts() {
        let d = from_toml("").expect("defaults");
        assert_eq!(d.email_lease(), Duration::from_secs(60), "file transport");
        assert_eq!(
            d.callback_lease(),
            Duration::from_secs(60),
            "2 x 15 s is less"
        );
        let smtp = from_toml("[delivery]\ntransport = \"smtp\"\n").expect("smtp");
        // 340 s of timeouts (SmtpConfig::longest_send) + the margin.
        assert_eq!(smtp.email_lease(), Duration::from_secs(345));
        let quick = from_toml(
            "[delivery]\ntransport = \"smtp\"\nlease_seconds = 1\n[smtp]\nconnect_timeout_ms = 1000\ncommand_timeout_ms = 1000\ndata_timeout_ms = 1000\npool_size = 0\n[callbacks]\ntimeout_ms = 40000\n",
        )
        .expect("short timeouts");
        assert_eq!(
            quick.email_lease(),
            Duration::from_secs(7) + SEND_LEASE_MARGIN
        );
        assert_eq!(quick.callback_lease(), Duration::from_secs(80));
        let long = from_toml("[delivery]\ntransport = \"smtp\"\nlease_seconds = 3600\n")
            .expect("long lease");
        assert_eq!(
            long.email_lease(),
            Duration::from_secs(3600),
            "never lowered"
        );
        assert_eq!(long.callback_lease(), Duration::from_secs(3600));
    }

    #[test]
    fn unknown_key_is_an_error_that_names_it() {
        let e = from_toml("[smtp]\nhots = \"x\"\n").expect_err("unknown key");
        assert!(e.to_string().contains("hots"), "{e}");
        let e = from_toml("data_dirr = \"x\"\n").expect_err("unknown key");
        assert!(e.to_string().contains("data_dirr"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = from_toml("[listen]\napi = 5\n").expect_err("wrong type");
        assert!(e.to_string().to_lowercase().contains("api"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_in_config_check() {
        let c = from_toml(
            "[smtp]\npassword = \"hunter2-very-secret\"\n[[apps]]\nid = \"shop\"\napi_keys = [\"plain-key-123456\"]\nwebhook_secret = \"whsec_c2VjcmV0\"\n",
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        let toml = c.to_redacted_toml().expect("serializes");
        for s in [&dbg, &toml] {
            assert!(!s.contains("hunter2"), "{s}");
            assert!(!s.contains("plain-key-123456"), "{s}");
            assert!(!s.contains("c2VjcmV0"), "{s}");
            assert!(s.contains("[redacted]"));
        }
        assert!(toml.contains("[[apps]]"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn numeric_secrets_from_the_environment_are_strings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("VERIGATE_SMTP__PASSWORD", "12345");
            jail.set_env("VERIGATE_SMTP__PORT", "2525");
            let c = Config::load(&Sources {
                file: None,
                env: true,
            })
            .map_err(|e| e.to_string())?;
            assert_eq!(
                c.smtp.password.as_ref().map(|p| p.expose().as_str()),
                Some("12345")
            );
            assert_eq!(c.smtp.port, 2525);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn verigate_log_is_a_filter_not_the_log_table() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("VERIGATE_LOG", "debug,fjall=warn");
            jail.set_env("VERIGATE_LOG__FORMAT", "json");
            let c = Config::load(&Sources {
                file: None,
                env: true,
            })
            .map_err(|e| e.to_string())?;
            assert_eq!(c.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn secret_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").expect("write");
        let c = from_toml(&format!(
            "[smtp]\npassword_file = {:?}\n",
            p.display().to_string()
        ))
        .expect("valid");
        assert_eq!(
            c.smtp.password.as_ref().map(|p| p.expose().as_str()),
            Some("s3cret")
        );
        let e = from_toml("[smtp]\npassword_file = \"/nonexistent/pw\"\n").expect_err("missing");
        assert!(e.to_string().contains("smtp.password_file"), "{e}");
    }

    #[test]
    fn nonsense_values_are_named() {
        for (toml, key) in [
            ("public_base_url = \"ftp://x\"", "public_base_url"),
            (
                "[verification]\ncode_length = 2",
                "verification.code_length",
            ),
            (
                "[verification]\ncode_alphabet = \"aa\"",
                "verification.code_alphabet",
            ),
            ("[http]\nmax_connections = 0", "http.max_connections"),
            ("[http]\nmax_connections = 1000001", "http.max_connections"),
            ("[[apps]]\nid = \"Shop!\"\napi_keys=[\"k\"]", "apps[0].id"),
            ("[[apps]]\nid = \"shop\"", "apps[0].api_keys"),
            (
                "[[apps]]\nid = \"shop\"\napi_keys=[\"kkkkkkkkkkkkkkkk\"]\nredirect_prefixes=[\"javascript:alert(1)\"]",
                "apps[0].redirect_prefixes[0]",
            ),
        ] {
            let e = from_toml(toml).expect_err(toml);
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    //! Keeps `config.example.toml` in step with the code.

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    /// The example with every `# key = value` and `# [table]` line uncommented.
    fn uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if !l.starts_with("## ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Keys per table header (`""` for the top level) as the example documents them.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut table = String::new();
        for line in uncommented().lines() {
            let l = line.trim();
            if l.starts_with('[') {
                table = l.trim_matches(['[', ']']).to_string();
            } else if let Some((k, _)) = l.split_once('=')
                && !l.starts_with('#')
            {
                out.entry(table.clone())
                    .or_default()
                    .insert(k.trim().to_string());
            }
        }
        out
    }

    /// Keys per table as the code knows them.
    fn known() -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut cfg = Config::default();
        cfg.apps.push(AppConfig::default());
        let serde_json::Value::Object(top) = serde_json::to_value(&cfg).expect("serializes") else {
            panic!("config is an object")
        };
        for (k, v) in top {
            match v {
                serde_json::Value::Object(inner) => {
                    out.entry(k).or_default().extend(inner.keys().cloned());
                }
                serde_json::Value::Array(items) if k == "apps" => {
                    for item in items {
                        if let serde_json::Value::Object(inner) = item {
                            out.entry(k.clone())
                                .or_default()
                                .extend(inner.keys().cloned());
                        }
                    }
                }
                _ => {
                    out.entry(String::new()).or_default().insert(k);
                }
            }
        }
        out
    }

    #[test]
    fn the_example_documents_every_key_the_code_knows_and_no_other() {
        assert_eq!(documented(), known());
    }

    #[test]
    fn the_example_with_every_setting_uncommented_is_a_valid_config() {
        // Extract only: names and types. `*_file` paths in the example do not exist here.
        let cfg: Config = Figment::from(Toml::string(&uncommented()))
            .extract()
            .unwrap_or_else(|e| panic!("config.example.toml uncommented: {e}"));
        assert_eq!(cfg.apps.len(), 1);
        assert_eq!(cfg.signing.keys.len(), 2);
        for k in &cfg.signing.keys {
            crate::verification::token::SigningKey::parse(k.expose())
                .expect("example signing keys parse");
        }
    }

    #[test]
    fn the_example_as_shipped_is_the_defaults() {
        let cfg = Config::from_figment(Figment::from(Toml::string(EXAMPLE))).expect("valid");
        assert_eq!(
            serde_json::to_value(&cfg).expect("json"),
            serde_json::to_value(Config::default()).expect("json")
        );
    }
}
