//! Assembles the daemon from a checked [`Config`]: development defaults, store, service,
//! workers and listeners. [`build`] returns a [`Running`] handle with the bound addresses and a
//! graceful [`Running::shutdown`]. Tests call `build` with port 0 and a temp data dir.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::address::dns::{DnsMetrics, DomainChecker};
use crate::apps::{ApiKey, Apps};
use crate::callbacks::{CallbackSender, Signer, WebhookSecret};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{AppConfig, Config, Secret, Transport as TransportKind};
use crate::http::api::{ApiState, Readiness};
use crate::http::public::PublicState;
use crate::http::{Listener, Server};
use crate::metrics::Metrics;
use crate::outbox::smtp::{SmtpMetrics, SmtpTransport};
use crate::outbox::transport::Transport;
use crate::outbox::worker::{self, CallbackLane, Deliverer, WorkerConfig};
use crate::ratelimit::{RateLimitMetrics, RateLimiter};
use crate::store::Store;
use crate::templates::Templates;
use crate::verification::service::{Parts, Service};
use crate::verification::token::{Keyring, SigningKey};
use crate::watch::{Hub, WatchMetrics};

/// File in the data dir holding generated signing keys.
pub const SIGNING_KEYS_FILE: &str = "signing-keys";
/// File in the data dir holding the development app's API key.
pub const DEV_API_KEY_FILE: &str = "dev-api-key";
/// How often idempotency keys are pruned.
const IDEMPOTENCY_PRUNE_INTERVAL: Duration = Duration::from_secs(300);
/// How often an unreachable relay is probed again at start-up.
const RELAY_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for WebSocket watchers to exchange their 1001 close frames.
const WATCHERS_CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file in the data dir could not be read or written.
    #[error("{what} ({path}): {source}")]
    DataDir {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something else that must be fixed before start.
    #[error("{0}")]
    Setup(String),
}

/// Options that are not configuration (tests inject a clock).
#[derive(Clone)]
pub struct BuildOptions {
    /// Wall clock for persisted instants.
    pub clock: SharedClock,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            clock: Arc::new(SystemClock),
        }
    }
}

/// A running daemon.
pub struct Running {
    /// Bound api listener address.
    pub api_addr: SocketAddr,
    /// Bound public listener address.
    pub public_addr: SocketAddr,
    /// Readiness flags.
    pub ready: Arc<Readiness>,
    /// The service (tests use it to tick the sweeper).
    pub service: Service,
    /// Notes for the operator gathered at start (development mode; no secrets).
    pub notes: Vec<String>,
    /// A development API key created at this start: show it once on the console, never log it.
    pub created_key: Option<String>,
    stop_http: watch::Sender<bool>,
    stop_background: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    store: Store,
    hub: Hub,
}

impl Running {
    /// Graceful shutdown: stop accepting, drain in-flight requests, stop the workers after
    /// their current deliveries, then persist the store.
    pub async fn shutdown(self) {
        self.ready.draining.store(true, Ordering::Relaxed);
        let _ = self.stop_http.send(true);
        for s in self.servers {
            let _ = s.await;
        }
        // WebSocket watchers are not HTTP connections any more: wait for their 1001 closes.
        self.hub.drained(WATCHERS_CLOSE_GRACE).await;
        let _ = self.stop_background.send(true);
        for b in self.background {
            let _ = b.await;
        }
        self.store.close().await;
    }
}

fn data_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::DataDir {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Writes a secret file readable only by its owner.
fn write_secret(path: &Path, content: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(data_err("cannot create secret file", path))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(data_err("cannot write secret file", path))
}

/// Fills in development defaults: signing keys and a `dev` app, generated once into the data
/// dir.
///
/// # Errors
/// The data dir is not writable.
pub fn prepare(cfg: &mut Config) -> Result<Prepared, Error> {
    let mut notes = Vec::new();
    let mut created_key = None;
    let dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(data_err("cannot create data dir", &dir))?;
    if cfg.signing.keys.is_empty() {
        let path = dir.join(SIGNING_KEYS_FILE);
        if !path.exists() {
            let key = SigningKey::generate("k1")
                .map_err(|_| Error::Setup("the OS random source failed".into()))?;
            write_secret(&path, &format!("{key}\n"))?;
            notes.push(format!("generated a signing key in {}", path.display()));
        }
        let text =
            std::fs::read_to_string(&path).map_err(data_err("cannot read signing keys", &path))?;
        cfg.signing.keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret::new(l.to_string()))
            .collect();
    }
    if cfg.apps.is_empty() {
        let path = dir.join(DEV_API_KEY_FILE);
        if !path.exists() {
            let key = crate::cli::random_token("vg_dev_")
                .map_err(|_| Error::Setup("the OS random source failed".into()))?;
            write_secret(&path, &format!("{key}\n"))?;
            notes.push(format!(
                "development mode: created app \"dev\"; its API key is saved in {}",
                path.display()
            ));
            created_key = Some(key);
        } else {
            notes.push(format!(
                "development mode: app \"dev\", API key in {}",
                path.display()
            ));
        }
        let key = std::fs::read_to_string(&path)
            .map_err(data_err("cannot read the dev API key", &path))?;
        cfg.apps.push(AppConfig {
            id: "dev".into(),
            api_keys: vec![Secret::new(ApiKey::of(key.trim()).to_config_string())],
            redirect_prefixes: vec![
                "http://localhost:3000/".into(),
                "http://127.0.0.1:3000/".into(),
                "http://localhost:8000/".into(),
                "http://127.0.0.1:8000/".into(),
            ],
            ..AppConfig::default()
        });
    }
    cfg.check()?;
    Ok(Prepared { notes, created_key })
}

/// What [`prepare`] did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Notes for the operator (no secrets).
    pub notes: Vec<String>,
    /// The development API key, when it was created just now (to show once, never to log).
    pub created_key: Option<String>,
}

/// The callback lane, when any app has a callback URL.
fn callback_lane(cfg: &Config) -> Result<Option<CallbackLane>, Error> {
    let mut signers = std::collections::HashMap::new();
    for app in cfg.apps.iter().filter(|a| a.callback_url.is_some()) {
        let secrets = app
            .signing_secrets()
            .iter()
            .map(|s| WebhookSecret::parse(s.expose()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Setup(format!("apps {}: webhook secret: {e}", app.id)))?;
        let signer =
            Signer::try_new(secrets).map_err(|e| Error::Setup(format!("apps {}: {e}", app.id)))?;
        signers.insert(app.id.clone(), signer);
    }
    if signers.is_empty() {
        return Ok(None);
    }
    let sender = match CallbackSender::new(&cfg.callbacks) {
        Ok(s) => s,
        Err(e) => {
            // No system CA store: http callbacks still work; https ones fail (and retry) until
            // the operator installs ca-certificates.
            tracing::warn!(error = %e, "callbacks: no usable system CA certificates; https callbacks will fail");
            CallbackSender::with_root_certificates(&cfg.callbacks, rustls::RootCertStore::empty())
                .map_err(|e| Error::Setup(format!("callbacks: {e}")))?
        }
    };
    Ok(Some(CallbackLane {
        sender,
        signers,
        horizon: cfg.callbacks.horizon(),
    }))
}

/// Builds and starts the daemon.
///
/// # Errors
/// Bad configuration, an unopenable store, or an unbindable address.
pub async fn build(mut cfg: Config, opts: BuildOptions) -> Result<Running, Error> {
    let Prepared { notes, created_key } = prepare(&mut cfg)?;
    let keys = cfg
        .signing
        .keys
        .iter()
        .map(|k| SigningKey::parse(k.expose()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Setup(format!("signing key: {e}")))?;
    let keys = Arc::new(Keyring::new(keys).map_err(|e| Error::Setup(e.to_string()))?);
    let store = {
        let dir = cfg.data_dir.clone();
        let scfg = cfg.store.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir, &scfg))
            .await
            .map_err(|e| Error::Setup(format!("store open task failed: {e}")))??
    };
    let metrics = Metrics::new().map_err(|e| Error::Setup(e.to_string()))?;
    for (listener, routes) in [
        ("api", &crate::http::API_ROUTES[..]),
        ("public", &crate::http::PUBLIC_ROUTES[..]),
    ] {
        for route in routes {
            metrics.http_duration.with_label_values(&[listener, route]);
            let ok = if matches!(*route, "create" | "resend") {
                "202"
            } else {
                "200"
            };
            metrics
                .http_requests
                .with_label_values(&[listener, route, ok]);
        }
    }
    let templates = Arc::new(
        Templates::load(crate::config::template_dirs(&cfg.apps))
            .map_err(|e| Error::Setup(e.to_string()))?,
    );
    let apps = Apps::from_config(&cfg).map_err(Error::Setup)?;
    let mail_ready = Arc::new(Notify::new());
    let limiter = RateLimiter::with_overrides(
        &cfg.limits,
        cfg.apps
            .iter()
            .filter_map(|a| a.limits.as_ref().map(|l| (a.id.as_str(), l))),
        RateLimitMetrics::register(metrics.registry()).map_err(|e| Error::Setup(e.to_string()))?,
    )
    .map_err(|e| Error::Setup(e.to_string()))?;
    let dm = DnsMetrics::register(metrics.registry()).map_err(|e| Error::Setup(e.to_string()))?;
    let dns = match DomainChecker::new(&cfg.dns, dm) {
        Ok(c) => Some(c),
        // Without a resolver the daemon still serves; creates fail closed only if checks are on.
        Err(e) if !cfg.dns.check_on_create => {
            tracing::warn!(error = %e, "DNS checks unavailable");
            None
        }
        Err(e) => return Err(Error::Setup(e.to_string())),
    };
    let disposable = match &cfg.address.disposable_domains_file {
        Some(path) => Some(
            crate::address::DisposableDomains::load(path).map_err(data_err(
                "cannot read address.disposable_domains_file",
                path,
            ))?,
        ),
        None => None,
    };
    let service = Service::new(Parts {
        store: store.clone(),
        keys,
        clock: opts.clock.clone(),
        policy: cfg.verification.clone(),
        public_base_url: cfg.public_base_url.clone(),
        templates,
        metrics: metrics.clone(),
        apps,
        mail_ready: mail_ready.clone(),
        default_from: cfg.delivery.from.clone(),
        dns,
        check_dns_on_create: cfg.dns.check_on_create,
        address_options: cfg.address.options(),
        disposable,
        dkim: crate::dkim::Signer::load(&cfg.dkim)
            .map_err(|e| Error::Setup(e.to_string()))?
            .map(Arc::new),
        on_dns_failure: cfg.dns.on_failure,
        limiter: limiter.clone(),
    });
    let transport = match cfg.delivery.transport {
        TransportKind::File => {
            let dir = cfg.mail_dir();
            std::fs::create_dir_all(&dir)
                .map_err(data_err("cannot create the mail folder", &dir))?;
            Transport::File { dir }
        }
        TransportKind::Log => Transport::Log,
        TransportKind::Smtp => {
            let sm = SmtpMetrics::register(metrics.registry())
                .map_err(|e| Error::Setup(e.to_string()))?;
            let t = SmtpTransport::new(&cfg.smtp.transport_config(), sm)
                .map_err(|e| Error::Setup(format!("smtp: {e}")))?;
            Transport::Smtp(t)
        }
    };
    let ready = Arc::new(Readiness::default());
    ready.transport_seen.store(
        transport.is_ready() || !cfg.delivery.ready_requires_transport,
        Ordering::Relaxed,
    );

    let (stop_http, http_rx) = watch::channel(false);
    let (stop_background, bg_rx) = watch::channel(false);
    // Bind before starting any worker: a taken port fails the start cleanly.
    let api = Server::bind(
        cfg.listen.api,
        Listener::Api,
        crate::http::api::router(ApiState {
            service: service.clone(),
            ready: ready.clone(),
        }),
        cfg.http.clone(),
        metrics.clone(),
    )
    .await
    .map_err(|source| Error::Bind {
        addr: cfg.listen.api,
        source,
    })?;
    let hub = Hub::new(
        cfg.watch.clone(),
        WatchMetrics::register(metrics.registry()).map_err(|e| Error::Setup(e.to_string()))?,
        http_rx.clone(),
    );
    {
        let hub = hub.clone();
        store.on_commit(Arc::new(move |changes| hub.publish(changes)));
    }
    let public = Server::bind(
        cfg.listen.public,
        Listener::Public,
        crate::http::public::router(PublicState {
            service: service.clone(),
            hub: hub.clone(),
            client_ip_header: Arc::from(cfg.http.client_ip_header.to_ascii_lowercase()),
        }),
        cfg.http.clone(),
        metrics.clone(),
    )
    .await
    .map_err(|source| Error::Bind {
        addr: cfg.listen.public,
        source,
    })?;
    let api_addr = api.local_addr().map_err(|source| Error::Bind {
        addr: cfg.listen.api,
        source,
    })?;
    let public_addr = public.local_addr().map_err(|source| Error::Bind {
        addr: cfg.listen.public,
        source,
    })?;
    let mut background = Vec::new();
    {
        let service = service.clone();
        let ready = ready.clone();
        let worker_transport = transport.clone();
        let mail_ready = mail_ready.clone();
        let wcfg = WorkerConfig {
            lease: cfg.email_lease(),
            retry: cfg.delivery.retry_policy(),
            max_per_second: cfg.delivery.max_per_second,
            concurrency: cfg.delivery.workers,
        };
        let rx = bg_rx.clone();
        background.push(tokio::spawn(async move {
            ready.worker_running.store(true, Ordering::Relaxed);
            worker::run(
                service,
                Deliverer::Mail(worker_transport),
                wcfg,
                mail_ready,
                rx,
            )
            .await;
            ready.worker_running.store(false, Ordering::Relaxed);
        }));
    }
    background.push(limiter.spawn_cleanup(bg_rx.clone()));
    if let Some(lane) = callback_lane(&cfg)? {
        let service = service.clone();
        let wcfg = WorkerConfig {
            lease: cfg.callback_lease(),
            retry: crate::outbox::retry::RetryPolicy {
                max_attempts: u32::MAX,
                ..cfg.delivery.retry_policy()
            },
            concurrency: cfg.delivery.workers,
            max_per_second: 0,
        };
        let rx = bg_rx.clone();
        // One notify wakes both lanes: whatever wrote an entry wakes them.
        let wake = mail_ready.clone();
        background.push(tokio::spawn(async move {
            worker::run(
                service,
                Deliverer::Callbacks(Arc::new(lane)),
                wcfg,
                wake,
                rx,
            )
            .await;
        }));
    }
    if let Transport::Smtp(t) = &transport
        && !ready.transport_seen.load(Ordering::Relaxed)
    {
        // /readyz stays "not ready" until the relay has answered once.
        let t = t.clone();
        let ready = ready.clone();
        let mut rx = bg_rx.clone();
        background.push(tokio::spawn(async move {
            loop {
                if t.probe().await || t.has_reached_relay() {
                    ready.transport_seen.store(true, Ordering::Relaxed);
                    tracing::info!("SMTP relay reachable");
                    break;
                }
                tracing::warn!("SMTP relay not reachable yet; /readyz reports not ready");
                tokio::select! {
                    _ = tokio::time::sleep(RELAY_PROBE_INTERVAL) => {}
                    _ = rx.changed() => break,
                }
            }
        }));
    }
    {
        let service = service.clone();
        let mut rx = bg_rx.clone();
        let every = Duration::from_millis(cfg.verification.sweep_interval_ms.max(10));
        background.push(tokio::spawn(async move {
            let mut last_prune = tokio::time::Instant::now();
            loop {
                if let Err(e) = service.sweep_expired().await {
                    tracing::error!(error = %e, "expiry sweep failed");
                }
                if last_prune.elapsed() >= IDEMPOTENCY_PRUNE_INTERVAL {
                    last_prune = tokio::time::Instant::now();
                    if let Err(e) = service.prune_idempotency().await {
                        tracing::error!(error = %e, "idempotency prune failed");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = rx.changed() => break,
                }
            }
        }));
    }

    let servers = vec![
        tokio::spawn(api.run(http_rx.clone())),
        tokio::spawn(public.run(http_rx)),
    ];
    Ok(Running {
        api_addr,
        public_addr,
        ready,
        service,
        notes,
        created_key,
        stop_http,
        stop_background,
        servers,
        background,
        store,
        hub,
    })
}
