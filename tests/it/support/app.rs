//! `spawn_app`: the real daemon in-process on port 0 with a temp data dir.

use std::path::PathBuf;
use std::sync::Arc;

use figment::Figment;
use figment::providers::{Format, Toml};
use hyper::Method;
use serde_json::Value;
use verigate::app::{BuildOptions, Running};
use verigate::clock::ManualClock;
use verigate::config::Config;

use super::client::{Client, Reply};

/// The API key of the test app `shop`.
pub const KEY: &str = "test-key-shop-0123456789";
/// The API key of the second app `other`.
pub const OTHER_KEY: &str = "test-key-other-0123456789";
/// Links in mail start with this; tests map it to the bound public address.
pub const PUBLIC_BASE: &str = "http://verify.example.com/base";
/// A Standard Webhooks secret for tests (32 bytes).
pub const WEBHOOK_SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC10aGlydHktdHdvIQ==";
/// Allowed redirect prefix of `shop`.
pub const REDIRECT: &str = "https://app.example.com/welcome";

/// A fixed signing key so tests can restart on the same data dir.
pub const SIGNING_K1: &str = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
pub const SIGNING_K2: &str = "k2:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA";

pub struct TestApp {
    pub running: Option<Running>,
    pub dir: Arc<tempfile::TempDir>,
    pub clock: ManualClock,
    pub client: Client,
    pub api: String,
    pub public: String,
}

/// The base test configuration; `extra` is appended TOML, except lines starting with `shop.`,
/// which go into the `shop` app's table (`shop.callback_url = "…"`).
pub fn config_toml(data_dir: &std::path::Path, signing: &[&str], extra: &str) -> String {
    let shop: Vec<&str> = extra
        .lines()
        .filter_map(|l| l.strip_prefix("shop."))
        .collect();
    let extra: Vec<&str> = extra.lines().filter(|l| !l.starts_with("shop.")).collect();
    let shop = shop.join("\n");
    let extra = extra.join("\n");
    let keys: Vec<String> = signing.iter().map(|k| format!("{k:?}")).collect();
    format!(
        r#"
data_dir = {dir:?}
public_base_url = "{PUBLIC_BASE}"
[listen]
api = "127.0.0.1:0"
public = "127.0.0.1:0"
[signing]
keys = [{keys}]
[log]
level = "warn"
{dns}
[[apps]]
id = "shop"
api_keys = ["{KEY}"]
redirect_prefixes = ["{REDIRECT}"]
from = "Shop <no-reply@shop.example.com>"
{shop}
[[apps]]
id = "other"
api_keys = ["{OTHER_KEY}"]
{extra}
"#,
        dir = data_dir.display().to_string(),
        keys = keys.join(", "),
        // No network here: DNS checks are off unless a test brings its own server.
        dns = if extra.contains("[dns]") {
            ""
        } else {
            "[dns]\ncheck_on_create = false"
        },
    )
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with("").await
}

pub async fn spawn_app_with(extra: &str) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    start(dir, &[SIGNING_K1], extra, ManualClock::new()).await
}

/// Starts the daemon on `dir` (an existing data dir for restarts).
pub async fn start(
    dir: Arc<tempfile::TempDir>,
    signing: &[&str],
    extra: &str,
    clock: ManualClock,
) -> TestApp {
    let toml = config_toml(dir.path(), signing, extra);
    let cfg =
        Config::from_figment(Figment::from(Toml::string(&toml))).expect("test config is valid");
    let running = verigate::app::build(
        cfg,
        BuildOptions {
            clock: Arc::new(clock.clone()),
        },
    )
    .await
    .expect("daemon starts");
    let api = format!("http://{}", running.api_addr);
    let public = format!("http://{}", running.public_addr);
    TestApp {
        running: Some(running),
        dir,
        clock,
        client: Client::new(),
        api,
        public,
    }
}

impl TestApp {
    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Stops the daemon gracefully; the data dir stays.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Maps a mail link to the bound public listener.
    pub fn local_link(&self, link: &str) -> String {
        link.replacen(PUBLIC_BASE, &self.public, 1)
    }

    pub async fn api_call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&Value>,
    ) -> Reply {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("authorization", auth.as_str())];
        let body = match body {
            Some(b) => {
                headers.push(("content-type", "application/json"));
                b.to_string()
            }
            None => String::new(),
        };
        self.client
            .send(method, &format!("{}{path}", self.api), &headers, body)
            .await
    }

    pub async fn create(&self, body: Value) -> Reply {
        self.api_call(Method::POST, "/v1/verifications", KEY, Some(&body))
            .await
    }

    pub async fn check(&self, body: Value) -> Reply {
        self.api_call(Method::POST, "/v1/verifications/check", KEY, Some(&body))
            .await
    }

    pub async fn get(&self, id: &str) -> Reply {
        self.api_call(Method::GET, &format!("/v1/verifications/{id}"), KEY, None)
            .await
    }

    /// Status string of a verification via the API.
    pub async fn status(&self, id: &str) -> String {
        let r = self.get(id).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["status"].as_str().expect("status").to_string()
    }
}
