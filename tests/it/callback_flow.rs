//! Callbacks through the daemon: a real HTTP receiver verifies every callback with the
//! independent `standardwebhooks` crate.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use verigate::clock::UnixTime;
use verigate::id::{MessageId, VerificationId};
use verigate::outbox::Lane;

use crate::support::app::{
    KEY, OTHER_KEY, PUBLIC_BASE, SIGNING_K1, TestApp, WEBHOOK_SECRET, spawn_app_with, start,
};
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

/// `{"a": [[…[1]…]]}`: `depth` levels of objects and arrays in all.
fn nested_metadata(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 1..depth {
        v = json!([v]);
    }
    json!({ "a": v })
}

#[tokio::test]
async fn metadata_nested_past_the_limit_is_refused_and_at_the_limit_it_comes_back_in_the_callback()
{
    use verigate::verification::service::MAX_METADATA_DEPTH;
    let sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let app = spawn_app_with(&config(&sink, "")).await;
    // One past the limit, and the reviewer's case: 126 levels in 285 bytes, under 4 KiB and
    // under the request parser's own limit, yet too deep for the callback to be read back.
    for depth in [MAX_METADATA_DEPTH + 1, 126] {
        let r = app
            .create(json!({"email": "deep@example.com", "method": "code", "metadata": nested_metadata(depth)}))
            .await;
        assert_eq!(r.status, 400, "depth {depth}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_request", "depth {depth}");
        assert_eq!(r.json()["error"]["field"], "metadata", "depth {depth}");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(&MAX_METADATA_DEPTH.to_string()),
            "{message}"
        );
    }
    assert!(crate::support::mail::read_all(&app.mail_dir()).is_empty());

    let at_limit = nested_metadata(MAX_METADATA_DEPTH);
    let r = app
        .create(json!({"email": "deep@example.com", "method": "code", "metadata": at_limit}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    assert_eq!(app.get(&id).await.json()["metadata"], at_limit);
    let code = wait_for(&app.mail_dir(), 1).await[0].code().expect("code");
    assert_eq!(app.check(json!({"id": id, "code": code})).await.status, 200);
    let got = wait_callbacks(&sink, 1).await;
    assert!(got[0].verified);
    assert_eq!(body(&got[0])["data"]["metadata"], at_limit);
}

/// Writes outbox records straight into the stopped daemon's store, each due in the callback
/// lane at `due_at`: what a bug or damage leaves behind.
fn write_raw_callback_entries(
    data_dir: &std::path::Path,
    entries: &[(MessageId, Vec<u8>)],
    due_at: UnixTime,
) {
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};
    use verigate::store::keys;
    let db = Database::builder(data_dir.join("db"))
        .open()
        .expect("the store opens");
    let outbox = db
        .keyspace("outbox", KeyspaceCreateOptions::default)
        .expect("outbox keyspace");
    let due = db
        .keyspace("outbox_due", KeyspaceCreateOptions::default)
        .expect("outbox_due keyspace");
    for (id, bytes) in entries {
        outbox
            .insert(keys::outbox(*id), bytes.clone())
            .expect("insert");
        due.insert(
            keys::outbox_due(Lane::Callback as u8, due_at, *id),
            Vec::<u8>::new(),
        )
        .expect("insert");
    }
    db.persist(PersistMode::SyncAll).expect("persist");
}

async fn metric(app: &TestApp, series: &str) -> Option<String> {
    let r = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await;
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().to_string()))
}

/// An outbox entry that cannot be decoded (here: a callback whose metadata a create accepted
/// 126 levels deep, before the depth limit) used to fail every claim of its lane: no app got
/// a callback again, and the admin API answered 500 for the whole listing.
#[tokio::test]
async fn an_unreadable_callback_entry_does_not_stop_the_lane_and_its_app_can_drop_it() {
    use verigate::clock::Clock;
    use verigate::outbox::{CallbackJob, OutboxEntry, Payload};
    let sink = WebhookSink::new(WEBHOOK_SECRET).start().await;
    let mut app = spawn_app_with(&config(&sink, "")).await;
    let (id, code) = code_verification(&app, "after-poison@example.com").await;
    app.stop().await;

    let now = app.clock.now();
    let vid: VerificationId = id.parse().expect("verification id");
    let poison = MessageId::generate(now);
    let mut deep = json!(1);
    for _ in 0..125 {
        deep = json!([deep]);
    }
    let entry = OutboxEntry::new(
        poison,
        vid,
        "shop",
        now,
        Payload::Callback(CallbackJob {
            event: "verification.verified".into(),
            webhook_id: poison.to_string(),
            body: json!({"type": "verification.verified", "data": {"metadata": {"a": deep}}}),
        }),
    );
    let bytes = verigate::store::codec::encode(&entry).expect("it encodes; it cannot be read back");
    // A record of which not even the owner can be read.
    let headless = MessageId::generate(now);
    write_raw_callback_entries(
        app.dir.path(),
        &[(poison, bytes), (headless, vec![2, 1, 2, 3])],
        now,
    );
    let app = start(
        app.dir.clone(),
        &[SIGNING_K1],
        &config(&sink, ""),
        app.clock.clone(),
    )
    .await;

    // The verified callback is due behind them, and is delivered.
    assert_eq!(app.check(json!({"id": id, "code": code})).await.status, 200);
    let got = wait_callbacks(&sink, 1).await;
    assert_eq!(body(&got[0])["data"]["id"], id.as_str());
    assert_eq!(
        metric(
            &app,
            "verigate_outbox_attempts_total{lane=\"callback\",outcome=\"unreadable\"}"
        )
        .await
        .as_deref(),
        Some("2")
    );

    // The owner's listing shows it from what can be read; nobody's shows the headless one.
    let list = |key: &'static str| {
        let app = &app;
        async move {
            let r = app
                .api_call(Method::GET, "/admin/v1/outbox", key, None)
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["entries"].as_array().expect("entries").clone()
        }
    };
    let listed = list(KEY).await;
    let shown: Vec<_> = listed
        .iter()
        .filter(|e| e["id"] != poison.to_string())
        .map(|e| e["state"].clone())
        .collect();
    assert!(
        !shown.is_empty() && shown.iter().all(|s| s != "unreadable"),
        "{listed:?}"
    );
    let row = listed
        .iter()
        .find(|e| e["id"] == poison.to_string())
        .expect("the unreadable entry is listed");
    assert_eq!(
        (
            &row["state"],
            &row["kind"],
            &row["app"],
            &row["verification_id"]
        ),
        (
            &json!("unreadable"),
            &json!("callback"),
            &json!("shop"),
            &json!(id)
        )
    );
    assert!(!listed.iter().any(|e| e["id"] == headless.to_string()));
    assert!(
        !list(OTHER_KEY)
            .await
            .iter()
            .any(|e| e["id"] == poison.to_string())
    );
    // Its state cannot be read: a listing of one state leaves it out.
    let scheduled = app
        .api_call(Method::GET, "/admin/v1/outbox?state=scheduled", KEY, None)
        .await;
    assert_eq!(scheduled.status, 200);
    assert!(!scheduled.text().contains(&poison.to_string()));

    let path = format!("/admin/v1/outbox/{poison}");
    let r = app.api_call(Method::GET, &path, KEY, None).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["state"].clone()),
        (200, json!("unreadable"))
    );
    let r = app
        .api_call(Method::POST, &format!("{path}/retry"), KEY, None)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (409, "unreadable_entry")
    );
    // Another app's key neither sees nor drops it; its owner's key does.
    for method in [Method::GET, Method::DELETE] {
        let r = app.api_call(method, &path, OTHER_KEY, None).await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    let r = app.api_call(Method::DELETE, &path, KEY, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(
        app.api_call(Method::GET, &path, KEY, None).await.status,
        404
    );
    let headless = format!("/admin/v1/outbox/{headless}");
    assert_eq!(
        app.api_call(Method::DELETE, &headless, KEY, None)
            .await
            .status,
        404
    );
    assert_eq!(
        app.api_call(Method::GET, &headless, KEY, None).await.status,
        404
    );
}
