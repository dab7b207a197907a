//! The outbox worker delivering through a real SMTP relay in-process (mailin-embedded, or a
//! scripted relay for faults): headers and parts, backoff, permanent failure, dropped
//! connections, hung relays, and the admin API.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::support::app::{KEY, TestApp, spawn_app_with};
use crate::support::fake_smtp::{FakeSmtp, ScriptedSmtp};
use crate::support::mail::decode_parts;

fn smtp_config(port: u16, extra: &str) -> String {
    // The start-up probe would use up a scripted relay's one faulty connection.
    let ready = if extra.contains("ready_requires_transport") {
        ""
    } else {
        "ready_requires_transport = false\n"
    };
    format!(
        "shop.callback_url = \"http://127.0.0.1:9/hooks\"\nshop.webhook_secret = \"{secret}\"\n[delivery]\ntransport = \"smtp\"\nretry_base_ms = 50\nretry_cap_seconds = 1\n{ready}{extra}\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nhelo_name = \"verigate.test\"\nconnect_timeout_ms = 400\ncommand_timeout_ms = 400\ndata_timeout_ms = 800\n",
        secret = crate::support::app::WEBHOOK_SECRET,
    )
}

/// Polls GET until `pred` holds (bounded).
async fn wait_until(app: &TestApp, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = app.get(id).await.json();
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached; last state: {last}");
}

async fn create(app: &TestApp, body: Value) -> String {
    let r = app.create(body).await;
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn mail_arrives_with_headers_both_parts_and_the_requested_locale() {
    let relay = FakeSmtp::new().start();
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(
        &app,
        json!({"email": "Li.Na@Example.com", "method": "link_and_code", "locale": "zh-CN"}),
    )
    .await;
    let v = wait_until(&app, &id, |v| v["delivery"]["status"] == "sent").await;
    assert_eq!(v["delivery"]["attempts"], 1);
    assert!(v["delivery"]["sent_at"].is_string());
    let msgs = relay.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.from, "no-reply@shop.example.com");
    assert_eq!(m.to, vec!["Li.Na@example.com".to_string()]);
    let raw = String::from_utf8_lossy(&m.data).into_owned();
    let head = raw.split("\r\n\r\n").next().unwrap_or_default().to_string();
    for h in [
        "From: ",
        "To: ",
        "Subject: =?utf-8?",
        "Message-ID: <",
        "Date: ",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
    ] {
        assert!(head.contains(h), "missing {h} in\n{head}");
    }
    assert!(
        head.contains(&id),
        "Message-ID carries the verification id:\n{head}"
    );
    assert!(raw.contains("multipart/alternative"));
    assert!(raw.contains("text/plain") && raw.contains("text/html"));
    let body = decode_parts(&raw);
    assert!(body.contains("您好"), "zh-CN text part:\n{body}");
    assert!(body.contains("/v/"), "link present");
    assert!(body.contains("验证码"), "code present");
    assert!(!head.contains('\u{0}'));
}

#[tokio::test]
async fn a_451_then_250_is_delivered_once_after_a_backoff() {
    let relay = FakeSmtp::new()
        .defer_times("slow@example.com", 451, 1)
        .start();
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(&app, json!({"email": "slow@example.com"})).await;
    let v = wait_until(&app, &id, |v| v["delivery"]["status"] == "sent").await;
    assert_eq!(v["delivery"]["attempts"], 2, "{v}");
    assert_eq!(relay.messages().len(), 1, "delivered exactly once");
    let m = app.running().service.metrics().render();
    assert!(
        m.contains("verigate_outbox_attempts_total{lane=\"email\",outcome=\"retry\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("verigate_outbox_attempts_total{lane=\"email\",outcome=\"delivered\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("verigate_smtp_replies_total{class=\"4xx\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn the_last_deferral_is_counted_as_a_failure_not_a_retry() {
    let relay = FakeSmtp::new()
        .defer_times("tired@example.com", 451, 10)
        .start();
    let app = spawn_app_with(&smtp_config(relay.port(), "max_attempts = 2")).await;
    let id = create(&app, json!({"email": "tired@example.com"})).await;
    let v = wait_until(&app, &id, |v| v["status"] == "delivery_failed").await;
    assert_eq!(v["delivery"]["attempts"], 2, "{v}");
    let m = app.running().service.metrics().render();
    for (series, n) in [
        (
            "verigate_outbox_attempts_total{lane=\"email\",outcome=\"retry\"}",
            1,
        ),
        (
            "verigate_outbox_attempts_total{lane=\"email\",outcome=\"failed\"}",
            1,
        ),
        (
            "verigate_verifications_total{event=\"delivery_failed\",method=\"link\"}",
            1,
        ),
    ] {
        assert!(m.contains(&format!("{series} {n}\n")), "{series} {n}:\n{m}");
    }
}

#[tokio::test]
async fn a_550_fails_for_good_and_queues_the_delivery_failed_callback() {
    let relay = FakeSmtp::new().reject("gone@example.com", 550).start();
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(&app, json!({"email": "gone@example.com"})).await;
    let v = wait_until(&app, &id, |v| v["status"] == "delivery_failed").await;
    assert_eq!(v["delivery"]["status"], "failed");
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("550")),
        "{v}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.get(&id).await.json()["delivery"]["attempts"],
        1,
        "no further attempts"
    );
    let list = app
        .api_call(Method::GET, "/admin/v1/outbox", KEY, None)
        .await
        .json();
    let entries = list["entries"].as_array().expect("entries");
    let mail = entries
        .iter()
        .find(|e| e["kind"] == "email")
        .expect("email entry");
    assert_eq!(mail["state"], "failed");
    let cb = entries
        .iter()
        .find(|e| e["kind"] == "callback")
        .expect("callback entry");
    assert_eq!(cb["detail"]["event"], "verification.delivery_failed");
    assert_eq!(cb["verification_id"], id.as_str());
    // An unknown entry is named as an outbox entry, not a verification.
    let missing = app
        .api_call(
            Method::GET,
            "/admin/v1/outbox/msg_01M814RRFAPFKDHXYJC8B5NE78",
            KEY,
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["message"], "No such outbox entry.");
}

#[tokio::test]
async fn a_connection_dropped_in_the_middle_of_data_is_retried_and_delivered() {
    let relay = ScriptedSmtp::new()
        .drop_during_data()
        .fault_first(1)
        .start()
        .await;
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(&app, json!({"email": "drop@example.com"})).await;
    let v = wait_until(&app, &id, |v| v["delivery"]["status"] == "sent").await;
    assert_eq!(
        v["delivery"]["attempts"],
        2,
        "{v} connections={} commands={:?}",
        relay.connections(),
        relay.commands()
    );
    assert_eq!(relay.messages().len(), 1);
}

#[tokio::test]
async fn a_relay_that_never_answers_times_out_and_is_retried() {
    let relay = ScriptedSmtp::new().never_greet().start().await;
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(&app, json!({"email": "hang@example.com"})).await;
    let v = wait_until(&app, &id, |v| {
        v["delivery"]["attempts"].as_u64().is_some_and(|n| n >= 2)
    })
    .await;
    assert_eq!(v["delivery"]["status"], "retrying", "{v}");
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("tim")),
        "{v}"
    );
    assert_eq!(
        v["status"], "pending",
        "a transient failure does not fail the verification"
    );
}

#[tokio::test]
async fn operators_can_list_retry_and_drop_entries() {
    let relay = FakeSmtp::new().reject("ops@example.com", 550).start();
    let app = spawn_app_with(&smtp_config(relay.port(), "")).await;
    let id = create(&app, json!({"email": "ops@example.com"})).await;
    wait_until(&app, &id, |v| v["delivery"]["status"] == "failed").await;
    let failed = app
        .api_call(Method::GET, "/admin/v1/outbox?state=failed", KEY, None)
        .await;
    assert_eq!(failed.status, 200, "{}", failed.text());
    let entries = failed.json()["entries"]
        .as_array()
        .expect("entries")
        .clone();
    assert_eq!(entries.len(), 1);
    let msg = entries[0]["id"].as_str().expect("id").to_string();
    assert!(
        entries[0]["detail"]["to"]
            .as_str()
            .is_some_and(|t| t.starts_with("o***@")),
        "addresses are masked"
    );
    // Another app sees nothing of it.
    let other = app
        .api_call(
            Method::GET,
            &format!("/admin/v1/outbox/{msg}"),
            crate::support::app::OTHER_KEY,
            None,
        )
        .await;
    assert_eq!(other.status, 404);
    let r = app
        .api_call(
            Method::POST,
            &format!("/admin/v1/outbox/{msg}/retry"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The verification failed, so the retried entry is dropped rather than sent.
    for _ in 0..100 {
        if app
            .api_call(Method::GET, &format!("/admin/v1/outbox/{msg}"), KEY, None)
            .await
            .json()["state"]
            == "dropped"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.api_call(Method::GET, &format!("/admin/v1/outbox/{msg}"), KEY, None)
            .await
            .json()["state"],
        "dropped"
    );
    let r = app
        .api_call(
            Method::DELETE,
            &format!("/admin/v1/outbox/{msg}"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = app
        .api_call(Method::GET, &format!("/admin/v1/outbox/{msg}"), KEY, None)
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .api_call(Method::GET, "/admin/v1/outbox?state=bogus", KEY, None)
        .await;
    assert_eq!(r.error_code(), "invalid_request");
}

#[tokio::test]
async fn readyz_waits_for_the_relay() {
    // Nothing listens on this port (bound then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let app = spawn_app_with(&smtp_config(port, "ready_requires_transport = true")).await;
    let r = app
        .client
        .send(Method::GET, &format!("{}/readyz", app.api), &[], "")
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["checks"]["transport"], false);
    let relay = FakeSmtp::new().start();
    let ok = spawn_app_with(&smtp_config(
        relay.port(),
        "ready_requires_transport = true",
    ))
    .await;
    let mut status = 0;
    for _ in 0..100 {
        status = ok
            .client
            .send(Method::GET, &format!("{}/readyz", ok.api), &[], "")
            .await
            .status
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

/// Verifies `message` with dkimpy (an independent implementation), the DNS answer given
/// directly. `None` when Python's dkimpy is not installed (`.ci/run` installs it).
fn dkimpy_verify(message: &[u8], selector_domain: &str, record: &str) -> Option<bool> {
    use std::io::Write;
    let script = format!(
        "import sys, dkim\nmsg = sys.stdin.buffer.read()\ndef dns(name, timeout=5):\n    return {record:?}.encode() if name.decode().rstrip('.') == {selector_domain:?} else None\nprint('PASS' if dkim.verify(msg, dnsfunc=dns) else 'FAIL')\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(message).ok()?;
    let out = child.wait_with_output().ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("PASS") {
        Some(true)
    } else if stdout.contains("FAIL") {
        Some(false)
    } else {
        eprintln!(
            "dkimpy unavailable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        None
    }
}

#[tokio::test]
async fn mail_is_dkim_signed_and_an_independent_verifier_accepts_it() {
    use base64::Engine;
    let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .expect("key");
    let ed_pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(ed.as_ref())
    );
    // A test-only RSA key (ring cannot generate RSA keys): `openssl genpkey -algorithm RSA`.
    let rsa_pem = include_str!("support/dkim-test-rsa.pem").to_string();
    for (alg, pem_text) in [("ed25519-sha256", ed_pem), ("rsa-sha256", rsa_pem)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = dir.path().join("dkim.pem");
        std::fs::write(&pem, &pem_text).expect("write");
        let cfg = verigate::dkim::DkimConfig {
            domain: Some("shop.example.com".into()),
            selector: Some("s1".into()),
            private_key_file: Some(pem.clone()),
        };
        let signer = verigate::dkim::Signer::load(&cfg)
            .expect("load")
            .expect("on");
        let relay = FakeSmtp::new().start();
        let app = spawn_app_with(&smtp_config(
            relay.port(),
            &format!("[dkim]\ndomain = \"shop.example.com\"\nselector = \"s1\"\nprivate_key_file = {:?}\n", pem.display().to_string()),
        ))
        .await;
        let id = create(
            &app,
            json!({"email": "dkim@example.com", "method": "link_and_code", "locale": "zh-CN"}),
        )
        .await;
        wait_until(&app, &id, |v| v["delivery"]["status"] == "sent").await;
        let data = relay.messages()[0].data.clone();
        let text = String::from_utf8_lossy(&data).into_owned();
        let prefix =
            format!("DKIM-Signature: v=1; a={alg}; c=relaxed/relaxed; d=shop.example.com; s=s1;");
        assert!(text.starts_with(&prefix), "{text}");
        match dkimpy_verify(
            &data,
            "s1._domainkey.shop.example.com",
            &signer.dns_record(),
        ) {
            Some(ok) => assert!(ok, "dkimpy rejected the {alg} signature:\n{text}"),
            None => assert!(
                std::env::var_os("CI").is_none(),
                "CI must install dkimpy and pynacl"
            ),
        }
        // A tampered header fails, so the check above is meaningful.
        let tampered = text.replacen("dkim@example.com", "dkix@example.com", 1);
        assert_ne!(tampered, text);
        assert_ne!(
            dkimpy_verify(
                tampered.as_bytes(),
                "s1._domainkey.shop.example.com",
                &signer.dns_record()
            ),
            Some(true)
        );
    }
}
