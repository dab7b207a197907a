//! verigate: an email-verification gateway that runs beside any web app.
//!
//! Crate map (one module per domain word):
//!
//! - [`cli`]: the command line (`serve`, `config check`, `keys generate`).
//! - [`config`]: configuration tree, loading (defaults → TOML → `VERIGATE_*`), [`config::Secret`].
//! - [`callbacks`]: Standard Webhooks signing and the callback HTTP client.
//! - [`app`]: assembles and starts the daemon; graceful shutdown.
//! - [`http`]: the two listeners, layers, routers, the JSON error shape.
//! - [`verification`]: the record and state machine; tokens, codes; the service over the store.
//! - [`address`]: email address syntax and normalization.
//! - [`outbox`]: durable delivery queue: entries, retry policy, transports, the mail worker.
//! - [`ratelimit`]: keyed token buckets (governor) for creates, resends and code checks.
//! - [`store`]: the fjall database behind one group-committing writer.
//! - [`templates`]: built-in mail and page templates (en, zh-CN).
//! - [`dkim`]: DKIM signing of outgoing mail (ring; relaxed/relaxed).
//! - [`mail`]: RFC 5322 messages with header safety by construction.
//! - [`apps`]: tenants, API keys, redirect prefixes.
//! - [`watch`]: live status: fan-out of committed changes to WebSocket/SSE watchers.
//! - [`metrics`]: Prometheus metrics.
//! - [`clock`]: wall time for persisted instants; a manual clock for tests.
//! - [`id`]: time-ordered, prefixed identifiers.
//! - [`random`]: random bytes for ids, codes and nonces, a block per system call.

pub mod address;
pub mod app;
pub mod apps;
pub mod callbacks;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dkim;
pub mod http;
pub mod id;
pub mod mail;
pub mod metrics;
pub mod outbox;
pub mod random;
pub mod ratelimit;
pub mod store;
pub mod templates;
pub mod verification;
pub mod watch;
