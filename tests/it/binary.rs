//! Tests of the real binary: crash durability (SIGKILL mid-burst) and `config check`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde_json::json;

use crate::support::app::{KEY, SIGNING_K1, config_toml};
use crate::support::client::Client;

const BIN: &str = env!("CARGO_BIN_EXE_verigate");

/// Starts `verigate serve --config FILE` and reads the bound api address from its stderr.
fn serve(config: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("VERIGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verigate");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let api = loop {
        let line = lines
            .next()
            .expect("daemon exited before listening")
            .expect("read stderr");
        if let Some(rest) = line.strip_prefix("verigate: api on ") {
            break rest.split(',').next().expect("addr").to_string();
        }
    };
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_verification_survives_sigkill_mid_burst() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        config_toml(&dir.path().join("data"), &[SIGNING_K1], ""),
    )
    .expect("config");
    let (mut child, api) = serve(&cfg_path);
    let client = Client::new();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let client = client.clone();
        let url = format!("{api}/v1/verifications");
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"email": format!("user{i}@example.com")}).to_string();
            let auth = format!("Bearer {KEY}");
            let headers = [
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            let req = client.try_send(Method::POST, &url, &headers, body);
            // The kill makes some requests fail; only 202s count.
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), req).await
                && r.status == 202
            {
                let id = r.json()["id"].as_str().expect("id").to_string();
                accepted.lock().expect("lock").push(id);
            }
        }));
    }
    // Kill once a good share of the burst has been answered.
    for _ in 0..1000 {
        if accepted.lock().expect("lock").len() >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    for t in tasks {
        let _ = t.await;
    }
    let ids = accepted.lock().expect("lock").clone();
    assert!(
        ids.len() >= 100,
        "only {} accepted before the kill",
        ids.len()
    );

    let (mut child, api) = serve(&cfg_path);
    let mut missing = Vec::new();
    for id in &ids {
        let r = client
            .send(
                Method::GET,
                &format!("{api}/v1/verifications/{id}"),
                &[("authorization", &format!("Bearer {KEY}"))],
                "",
            )
            .await;
        if r.status != 200 {
            missing.push(id.clone());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        missing.is_empty(),
        "{} of {} accepted verifications lost: {missing:?}",
        missing.len(),
        ids.len()
    );
    eprintln!(
        "durability: {} verifications accepted before SIGKILL, all found after restart",
        ids.len()
    );
}

#[test]
fn config_check_names_an_unknown_key_and_never_prints_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[smtp]\nhots = \"x\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&bad)
        .env_remove("VERIGATE_CONFIG")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hots"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[smtp]\npassword = \"hunter2-smtp\"\n[signing]\nkeys = [\"{SIGNING_K1}\"]\n[[apps]]\nid = \"shop\"\napi_keys = [\"plain-api-key-123456789\"]\nwebhook_secret = \"whsec_c2VjcmV0LXdlYmhvb2s=\"\n"
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&good)
        .env_remove("VERIGATE_CONFIG")
        .env("VERIGATE_SMTP__USERNAME", "envuser")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        "hunter2-smtp",
        "plain-api-key-123456789",
        "c2VjcmV0LXdlYmhvb2s",
        &SIGNING_K1[3..],
    ] {
        assert!(!all.contains(secret), "secret {secret} printed:\n{all}");
    }
    assert!(all.contains("[redacted]"));
    assert!(all.contains("envuser"), "environment applied:\n{all}");
}

/// The Message-ID header of a captured message.
fn message_id(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next()?;
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
        .map(|l| l["message-id:".len()..].trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_sigkill_and_every_message_is_delivered_after_restart() {
    use crate::support::fake_smtp::FakeSmtp;
    const MAILS: usize = 1000;
    let relay = FakeSmtp::new().start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("config.toml");
    // A slow relay: pacing at 150/s keeps most of the queue pending when the kill comes. Short
    // leases so that entries claimed by the killed process are claimed again soon: the email
    // lease covers the longest send, so the SMTP timeouts are short too (1 s each: a lease of
    // 16 s with the default pool of 4).
    let extra = format!(
        "[delivery]\ntransport = \"smtp\"\nmax_per_second = 150\nlease_seconds = 2\nretry_base_ms = 100\nready_requires_transport = false\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nhelo_name = \"verigate.test\"\nconnect_timeout_ms = 1000\ncommand_timeout_ms = 1000\ndata_timeout_ms = 1000\n[limits]\nper_address = []\nper_domain = []\nper_app = []\n",
        relay.port()
    );
    std::fs::write(
        &cfg_path,
        config_toml(&dir.path().join("data"), &[SIGNING_K1], &extra),
    )
    .expect("config");
    let (mut child, api) = serve(&cfg_path);
    let client = Client::new();
    let auth = format!("Bearer {KEY}");
    let mut accepted = 0;
    for chunk in 0..(MAILS / 50) {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let client = client.clone();
            let url = format!("{api}/v1/verifications");
            let auth = auth.clone();
            let body = json!({"email": format!("q{}@example.com", chunk * 50 + i)}).to_string();
            tasks.push(tokio::spawn(async move {
                let h = [
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ];
                client.try_send(Method::POST, &url, &h, body).await
            }));
        }
        for t in tasks {
            if let Ok(Ok(r)) = t.await
                && r.status == 202
            {
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted, MAILS, "every create accepted before the kill");
    // Kill once some, but not all, mail went out.
    for _ in 0..2000 {
        if relay.messages().len() >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let before_restart = relay.messages().len();
    assert!(
        before_restart < MAILS,
        "the kill came too late to test anything"
    );

    let (mut child, _api) = serve(&cfg_path);
    let mut distinct = std::collections::HashSet::new();
    let mut total = 0;
    for _ in 0..600 {
        let msgs = relay.messages();
        total = msgs.len();
        distinct = msgs.iter().filter_map(|m| message_id(&m.data)).collect();
        if distinct.len() >= MAILS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "crash safety: {MAILS} queued, {before_restart} delivered before SIGKILL, {} distinct after restart, {} sent twice",
        distinct.len(),
        total - distinct.len()
    );
    assert_eq!(
        distinct.len(),
        MAILS,
        "every queued mail delivered at least once"
    );
    assert!(
        total - distinct.len() <= 20,
        "duplicates are bounded by in-flight sends: {}",
        total - distinct.len()
    );
}

#[test]
fn config_check_rejects_a_broken_template_override() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tpl = dir.path().join("tpl/signup/en");
    std::fs::create_dir_all(&tpl).expect("mkdir");
    std::fs::write(tpl.join("mail.html"), "<p>{{ link }</p>").expect("write");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[signing]\nkeys = [\"{SIGNING_K1}\"]\n[[apps]]\nid = \"shop\"\napi_keys = [\"plain-api-key-123456789\"]\ntemplates_dir = {:?}\n",
            dir.path().join("tpl").display().to_string()
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env_remove("VERIGATE_CONFIG")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mail.html"), "{err}");
}
