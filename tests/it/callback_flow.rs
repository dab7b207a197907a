//! Callbacks through the daemon: a real HTTP receiver verifies every callback with the
//! independent `standardwebhooks` crate.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::support::app::{PUBLIC_BASE, TestApp, WEBHOOK_SECRET, spawn_app_with};
use crate::support::mail::wait_for;
use crate::support::webhook_sink::{Received, RunningSink, WebhookSink};

fn config(sink: &RunningSink, extra: &str) -> String {
    format!(
        "shop.callback_url = \"{}\"\nshop.webhook_secret = \"{WEBHOOK_SECRET}\"\n[delivery]\nretry_base_ms = 50\nretry_cap_seconds = 1\n{extra}",
        sink.url()
    )
}

async fn wait_callbacks(sink: &RunningSink, n: usize) -> Vec<Received> {
    for _ in 0..400 {
        let r = sink.received();
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {n} callbacks, got {}", sink.received().len());
}

fn body(r: &Received) -> Value {
    serde_json::from_slice(&r.body).expect("callback body is JSON")
}

async fn code_verification(app: &TestApp, email: &str) -> (String, String) {
    let r = app.create(json!({"email": email, "method": "code", "subject": "user-7", "metadata": {"plan": "pro"}})).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    let mails = wait_for(&app.mail_dir(), 1).await;
    let code = mails.last().and_then(|m| m.code()).expect("code");
    (id, code)
}

#[tokio::test]
async fn one_signed_verified_callback_per_verification_after_a_code_check() {
    let sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let app = spawn_app_with(&config(&sink, "")).await;
    let (id, code) = code_verification(&app, "cb@example.com").await;
    assert_eq!(app.check(json!({"id": id, "code": code})).await.status, 200);
    assert_eq!(
        app.check(json!({"id": id, "code": code})).await.status,
        200,
        "idempotent repeat"
    );
    let got = wait_callbacks(&sink, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_after = sink.received();
    assert_eq!(got_after.len(), 1, "no second callback: {got_after:?}");
    let r = &got[0];
    assert!(
        r.verified,
        "standardwebhooks rejected it: {:?}",
        r.verify_error
    );
    assert!(r.signature.starts_with("v1,"));
    let b = body(r);
    assert_eq!(b["type"], "verification.verified");
    assert_eq!(b["data"]["id"], id.as_str());
    assert_eq!(b["data"]["email"], "cb@example.com");
    assert_eq!(b["data"]["subject"], "user-7");
    assert_eq!(b["data"]["metadata"]["plan"], "pro");
    assert_eq!(b["data"]["status"], "verified");
    // GET shows the callback's delivery.
    let mut v = Value::Null;
    for _ in 0..100 {
        v = app.get(&id).await.json();
        if v["callback"]["status"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(v["callback"]["status"], "delivered", "{v}");
    assert_eq!(v["callback"]["event"], "verification.verified");
}

#[tokio::test]
async fn one_verified_callback_after_a_link_post() {
    let sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let app = spawn_app_with(&config(&sink, "")).await;
    let r = app.create(json!({"email": "link-cb@example.com"})).await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    let link = app.local_link(
        &wait_for(&app.mail_dir(), 1).await[0]
            .link(PUBLIC_BASE)
            .expect("link"),
    );
    app.client.send(Method::GET, &link, &[], "").await;
    app.client.send(Method::POST, &link, &[], "").await;
    app.client.send(Method::POST, &link, &[], "").await;
    let got = wait_callbacks(&sink, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received().len(), 1);
    assert!(got[0].verified);
    assert_eq!(body(&got[0])["data"]["id"], id.as_str());
}

#[tokio::test]
async fn a_500_is_retried_with_the_same_webhook_id() {
    let sink = WebhookSink::new(WEBHOOK_SECRET)
        .respond([500, 200])
        .start()
        .await;
    let app = spawn_app_with(&config(&sink, "")).await;
    let (id, code) = code_verification(&app, "retry-cb@example.com").await;
    app.check(json!({"id": id, "code": code})).await;
    let got = wait_callbacks(&sink, 2).await;
    assert_eq!(
        got[0].webhook_id, got[1].webhook_id,
        "webhook-id is stable across retries"
    );
    assert!(got.iter().all(|r| r.verified));
}

#[tokio::test]
async fn a_410_stops_and_the_entry_fails() {
    let sink = WebhookSink::new(WEBHOOK_SECRET)
        .respond_with(410)
        .start()
        .await;
    let app = spawn_app_with(&config(&sink, "")).await;
    let (id, code) = code_verification(&app, "gone-cb@example.com").await;
    app.check(json!({"id": id, "code": code})).await;
    wait_callbacks(&sink, 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink.received().len(), 1, "no retry after 410");
    let v = app.get(&id).await.json();
    assert_eq!(v["callback"]["status"], "failed", "{v}");
}

#[tokio::test]
async fn two_secrets_sign_twice_and_a_receiver_holding_either_accepts() {
    let new_secret = "whsec_bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldw==";
    let old_sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let new_sink = WebhookSink::new(new_secret).start().await;
    for sink in [&old_sink, &new_sink] {
        let app = spawn_app_with(&format!(
            "shop.webhook_secrets = [\"{new_secret}\"]\n{}",
            config(sink, "")
        ))
        .await;
        let (id, code) = code_verification(&app, "rot@example.com").await;
        app.check(json!({"id": id, "code": code})).await;
        let got = wait_callbacks(sink, 1).await;
        assert_eq!(
            got[0].signature.split(' ').count(),
            2,
            "{}",
            got[0].signature
        );
        assert!(got[0].verified, "{:?}", got[0].verify_error);
    }
}

#[tokio::test]
async fn expiry_and_locking_are_called_back() {
    let sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let app = spawn_app_with(&config(
        &sink,
        "[limits]\ncode_checks_per_verification = []\n",
    ))
    .await;
    let (locked, code) = code_verification(&app, "lock-cb@example.com").await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        app.check(json!({"id": locked, "code": wrong})).await;
    }
    let r = app
        .create(json!({"email": "exp-cb@example.com", "ttl_seconds": 30}))
        .await;
    let expired = r.json()["id"].as_str().expect("id").to_string();
    app.clock.advance(Duration::from_secs(31));
    app.running().service.sweep_expired().await.expect("sweep");
    let got = wait_callbacks(&sink, 2).await;
    let events: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            let b = body(r);
            (
                b["type"].as_str().unwrap_or_default().to_string(),
                b["data"]["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        events.contains(&("verification.locked".to_string(), locked)),
        "{events:?}"
    );
    assert!(
        events.contains(&("verification.expired".to_string(), expired)),
        "{events:?}"
    );
}
