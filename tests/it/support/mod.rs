//! Test support: start the daemon, an HTTP client, mail reading.

pub mod app;
pub mod client;
pub mod fake_dns;
pub mod fake_smtp;
pub mod mail;
pub mod webhook_sink;
