//! The command line: `serve`, `validate`, `config check`, `keys generate`, `probe`, `outbox`. Parses arguments, loads the
//! configuration and runs the chosen command; `main.rs` only calls [`run`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::{Parser, Subcommand};
use ring::rand::{SecureRandom, SystemRandom};

use crate::apps::ApiKey;
use crate::config::{Config, LogFormat, Sources};
use crate::verification::token::SigningKey;

/// Bytes of randomness in a generated API key.
const API_KEY_BYTES: usize = 32;

/// verigate: email-verification gateway.
#[derive(Debug, Parser)]
#[command(name = "verigate", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file (else $VERIGATE_CONFIG, else /etc/verigate/config.toml if present).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Check an address: syntax and normalization (like Python's email-validator), a typo
    /// suggestion, and DNS deliverability.
    Validate {
        /// The address (omit with --jsonl).
        address: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Read `{"input", "options"}` JSON lines on stdin and write one answer line each
        /// (`{"valid", "normalized", "ascii_email", "smtputf8", "reason"}`); syntax only.
        #[arg(long, conflicts_with_all = ["address", "json"])]
        jsonl: bool,
        /// Skip the DNS check.
        #[arg(long)]
        no_dns: bool,
        /// Configuration file (address options and [dns] settings).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Exit 0 when the local daemon answers /readyz with 200 (container health checks).
    Probe {
        /// Configuration file (to find the api listener).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Operate on a running daemon's outbox through its admin API.
    Outbox {
        /// The api listener. Default from the configuration (`listen.api`).
        #[arg(long, global = true, value_name = "URL")]
        url: Option<String>,
        /// API key of the app whose outbox to see (else $VERIGATE_API_KEY).
        #[arg(
            long,
            global = true,
            value_name = "KEY",
            env = "VERIGATE_API_KEY",
            hide_env_values = true
        )]
        key: Option<String>,
        /// Configuration file (to find `listen.api`).
        #[arg(long, global = true, value_name = "FILE")]
        config: Option<PathBuf>,
        /// What to do.
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Key tools.
    Keys {
        /// What to do.
        #[command(subcommand)]
        action: KeysAction,
    },
}

/// `config` actions.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the effective configuration (secrets redacted); fail on unknown keys.
    Check {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// `outbox` actions.
#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// List entries (newest last), optionally of one state.
    List {
        /// scheduled, delivered, failed or dropped.
        #[arg(long)]
        state: Option<String>,
        /// Entries to show (at most 500).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one entry.
    Show {
        /// The entry id (msg_…).
        id: String,
    },
    /// Attempt an entry now, with a fresh attempt budget.
    Retry {
        /// The entry id (msg_…).
        id: String,
    },
    /// Delete an entry: it will not be delivered.
    Drop {
        /// The entry id (msg_…).
        id: String,
    },
}

/// `keys` actions.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Print a new signing key, webhook secret and API key (with its sha256 form for config).
    Generate {
        /// Key id of the signing key.
        #[arg(long, default_value = "k1")]
        kid: String,
    },
}

/// A random URL-safe token with a prefix.
///
/// # Errors
/// The OS random source failed.
pub fn random_token(prefix: &str) -> Result<String, ring::error::Unspecified> {
    let mut b = [0u8; API_KEY_BYTES];
    SystemRandom::new().fill(&mut b)?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(b)))
}

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("VERIGATE_LOG").unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Runs the command line.
///
/// # Errors
/// Anything that stops the command, with a message for the operator.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::Validate {
            address,
            json,
            jsonl,
            no_dns,
            config,
        } => {
            if jsonl {
                return validate_jsonl();
            }
            let address = address.context("give an address, or --jsonl to read JSON lines")?;
            validate(&address, json, no_dns, config).await
        }
        Command::Outbox {
            url,
            key,
            config,
            action,
        } => outbox(url, key, config, action),
        Command::Probe { config, timeout } => {
            let cfg =
                Config::load(&Sources::from_cli(config)).context("configuration is not valid")?;
            probe(cfg.listen.api, std::time::Duration::from_secs(timeout))
        }
        Command::Config {
            action: ConfigAction::Check { config },
        } => {
            let sources = Sources::from_cli(config);
            let mut cfg = Config::load(&sources).context("configuration is not valid")?;
            if let Some(f) = &sources.file {
                eprintln!(
                    "# configuration from {} and VERIGATE_* environment",
                    f.display()
                );
            } else {
                eprintln!("# no configuration file: built-in defaults and VERIGATE_* environment");
            }
            // Show what serve would use, without creating anything.
            if cfg.apps.is_empty() {
                eprintln!("# no [[apps]]: serve would run in development mode with an app \"dev\"");
            }
            if cfg.signing.keys.is_empty() {
                eprintln!(
                    "# no signing keys: serve would generate one in {}",
                    cfg.data_dir.join(crate::app::SIGNING_KEYS_FILE).display()
                );
                cfg.signing.keys.clear();
            }
            crate::templates::Templates::load(crate::config::template_dirs(&cfg.apps))
                .context("template overrides are not valid")?;
            print!("{}", cfg.to_redacted_toml()?);
            Ok(())
        }
        Command::Keys {
            action: KeysAction::Generate { kid },
        } => {
            let signing = SigningKey::generate(&kid)
                .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
            SigningKey::parse(&signing).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut w = [0u8; 32];
            SystemRandom::new()
                .fill(&mut w)
                .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
            let webhook = format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(w)
            );
            let api =
                random_token("vg_").map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
            println!("# signing key: put under [signing] keys = [...] (newest first)");
            println!("signing_key = \"{signing}\"");
            println!("# webhook secret: give it to the app, put it in [[apps]] webhook_secret");
            println!("webhook_secret = \"{webhook}\"");
            println!(
                "# API key: give the plain key to the app; put the sha256 form in [[apps]] api_keys"
            );
            println!("api_key = \"{api}\"");
            println!(
                "api_key_config = \"{}\"",
                ApiKey::of(&api).to_config_string()
            );
            Ok(())
        }
    }
}

async fn serve(config: Option<PathBuf>) -> Result<()> {
    let sources = Sources::from_cli(config);
    let cfg = Config::load(&sources).context("configuration is not valid")?;
    init_tracing(&cfg);
    let running = crate::app::build(cfg, crate::app::BuildOptions::default())
        .await
        .context("cannot start")?;
    for n in &running.notes {
        tracing::warn!("{n}");
    }
    if let Some(key) = &running.created_key {
        // The console only: logs are shipped and kept, this key must not be.
        eprintln!("verigate: development API key (shown once): {key}");
    }
    tracing::info!(api = %running.api_addr, public = %running.public_addr, "verigate is listening");
    eprintln!(
        "verigate: api on http://{}, public on http://{}",
        running.api_addr, running.public_addr
    );
    wait_for_signal().await;
    tracing::info!("shutting down: draining requests, stopping workers, persisting the store");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Connects to the api listener; an unspecified bind address means this host.
fn local_addr(api: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = api;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// Largest response the command-line tools read.
const MAX_TOOL_RESPONSE: u64 = 4 << 20;

/// One HTTP/1.0 exchange over a plain socket: no HTTP client library needed in the final
/// image, and these tools only talk to the local api listener.
fn http_exchange(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    timeout: std::time::Duration,
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.take(MAX_TOOL_RESPONSE).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET /readyz`: exit 0 when ready.
fn probe(api: std::net::SocketAddr, timeout: std::time::Duration) -> Result<()> {
    let (status, body) = http_exchange(local_addr(api), "GET", "/readyz", None, timeout)?;
    if status == 200 {
        println!("ready");
        Ok(())
    } else {
        anyhow::bail!("not ready ({status}): {body}")
    }
}

fn outbox(
    url: Option<String>,
    key: Option<String>,
    config: Option<PathBuf>,
    action: OutboxAction,
) -> Result<()> {
    let addr = match url {
        Some(u) => {
            let parsed = url::Url::parse(&u).context("--url must be like http://127.0.0.1:8026")?;
            let host = parsed.host_str().context("--url needs a host")?;
            let port = parsed
                .port_or_known_default()
                .context("--url needs a port")?;
            std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?
                .next()
                .context("--url host does not resolve")?
        }
        None => local_addr(
            Config::load(&Sources::from_cli(config))
                .context("configuration is not valid")?
                .listen
                .api,
        ),
    };
    let key = key.context("give the app's API key with --key or $VERIGATE_API_KEY")?;
    let (method, path) = match &action {
        OutboxAction::List { state, limit } => {
            let mut p = format!("/admin/v1/outbox?limit={limit}");
            if let Some(s) = state {
                p.push_str(&format!("&state={}", enc(s)));
            }
            ("GET", p)
        }
        OutboxAction::Show { id } => ("GET", format!("/admin/v1/outbox/{}", enc(id))),
        OutboxAction::Retry { id } => ("POST", format!("/admin/v1/outbox/{}/retry", enc(id))),
        OutboxAction::Drop { id } => ("DELETE", format!("/admin/v1/outbox/{}", enc(id))),
    };
    let (status, body) = http_exchange(
        addr,
        method,
        &path,
        Some(&key),
        std::time::Duration::from_secs(10),
    )?;
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(body);
    println!("{pretty}");
    if (200..300).contains(&status) {
        Ok(())
    } else {
        anyhow::bail!("the daemon answered {status}")
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// One `--jsonl` request line.
#[derive(serde::Deserialize)]
struct JsonlRequest {
    input: String,
    #[serde(default)]
    options: crate::address::Options,
}

/// The corpus protocol of `shared/corpus/check_corpus.py`.
fn validate_jsonl() -> Result<()> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = match serde_json::from_str::<JsonlRequest>(&line) {
            Err(e) => {
                serde_json::json!({"valid": false, "normalized": null, "ascii_email": null, "smtputf8": null, "reason": format!("unusable request: {e}")})
            }
            Ok(req) => match crate::address::parse(&req.input, &req.options) {
                Ok(a) => {
                    serde_json::json!({"valid": true, "normalized": a.normalized, "ascii_email": a.ascii_email, "smtputf8": a.smtputf8, "reason": null})
                }
                Err(e) => {
                    serde_json::json!({"valid": false, "normalized": null, "ascii_email": null, "smtputf8": null, "reason": e.to_string()})
                }
            },
        };
        writeln!(out, "{answer}")?;
    }
    out.flush()?;
    Ok(())
}

async fn validate(
    address: &str,
    as_json: bool,
    no_dns: bool,
    config: Option<PathBuf>,
) -> Result<()> {
    use crate::address::dns::{DnsMetrics, DomainChecker};
    let cfg = Config::load(&Sources::from_cli(config)).context("configuration is not valid")?;
    let opts = cfg.address.options();
    let parsed = crate::address::parse(address, &opts);
    let verdict = match &parsed {
        Ok(a) if !no_dns => {
            let registry = prometheus::Registry::new();
            let checker = DomainChecker::new(&cfg.dns, DnsMetrics::register(&registry)?)?;
            Some(checker.check(&a.ascii_domain).await)
        }
        _ => None,
    };
    let suggestion = match &parsed {
        Ok(a) => crate::address::suggest::suggest_domain(&a.ascii_domain)
            .map(|d| format!("{}@{d}", a.local_part)),
        Err(_) => address.rsplit_once('@').and_then(|(l, d)| {
            crate::address::suggest::suggest_domain(&d.trim().to_ascii_lowercase())
                .map(|s| format!("{}@{s}", l.trim()))
        }),
    };
    let value = match &parsed {
        Ok(a) => serde_json::json!({
            "valid": true,
            "normalized": a.normalized,
            "ascii_email": a.ascii_email,
            "smtputf8": a.smtputf8,
            "local_part": a.local_part,
            "domain": a.domain,
            "deliverability": verdict.as_ref().map(crate::verification::service::deliverability_json),
            "suggestion": suggestion,
        }),
        Err(e) => {
            serde_json::json!({"valid": false, "reason": e.to_string(), "suggestion": suggestion})
        }
    };
    let deliverable = !matches!(
        verdict,
        Some(crate::address::dns::Deliverability::Undeliverable { .. })
    );
    if as_json {
        println!("{value}");
    } else {
        match &parsed {
            Ok(a) => {
                println!("valid: {}", a.normalized);
                if let Some(ascii) = &a.ascii_email
                    && ascii != &a.normalized
                {
                    println!("ascii form: {ascii}");
                }
                match &verdict {
                    Some(crate::address::dns::Deliverability::Deliverable { mx, .. }) => {
                        println!("domain accepts mail: {}", mx.join(", "));
                    }
                    Some(crate::address::dns::Deliverability::Undeliverable { reason }) => {
                        println!("domain does not accept mail: {reason}")
                    }
                    Some(crate::address::dns::Deliverability::Unknown { reason }) => {
                        println!("DNS could not tell: {reason}")
                    }
                    None => {}
                }
            }
            Err(e) => println!("not valid: {e}"),
        }
        if let Some(s) = &suggestion {
            println!("did you mean {s}?");
        }
    }
    if parsed.is_ok() && deliverable {
        Ok(())
    } else {
        // Exit status 1 for scripts; the answer is already printed.
        std::process::exit(1)
    }
}
