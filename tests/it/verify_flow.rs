//! The verification lifecycle over real HTTP: link and code flows, supersede, cancel, resend,
//! idempotency, expiry, concurrency and key rotation.

use std::time::Duration;

use hyper::Method;
use serde_json::json;

use crate::support::app::{
    KEY, OTHER_KEY, REDIRECT, SIGNING_K1, SIGNING_K2, spawn_app, spawn_app_with, start,
};
use crate::support::mail::{read_all, wait_for};

#[tokio::test]
async fn link_flow_changes_nothing_on_get_and_verifies_on_post() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "Zhang.Wei@Example.COM", "redirect_url": format!("{REDIRECT}/next?x=1")}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    let id = body["id"].as_str().expect("id").to_string();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["email"], "Zhang.Wei@example.com");
    assert_eq!(body["method"], "link");
    assert!(body["watch_token"].as_str().is_some_and(|t| !t.is_empty()));

    let mails = wait_for(&app.mail_dir(), 1).await;
    let mail = &mails[0];
    assert_eq!(
        mail.header("To").as_deref(),
        Some("<Zhang.Wei@example.com>")
    );
    assert!(mail.header("Message-ID").is_some_and(|m| m.contains(&id)));
    assert_eq!(
        mail.header("Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    assert!(mail.raw.contains("multipart/alternative"));
    let link = mail
        .link(crate::support::app::PUBLIC_BASE)
        .expect("link in mail");
    let local = app.local_link(&link);

    // GET and HEAD show the page and change nothing.
    let page = app
        .client
        .send(Method::GET, &local, &[("user-agent", "ScannerBot/1.0")], "")
        .await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("Confirm your email address"),
        "{}",
        page.text()
    );
    assert!(page.text().contains("Zhang.Wei@example.com"));
    assert!(page.header("content-security-policy").is_some());
    let head = app.client.send(Method::HEAD, &local, &[], "").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let v = app.get(&id).await.json();
    assert_eq!(v["status"], "pending");
    assert_eq!(v["delivery"]["status"], "sent");
    let prefetches = v["prefetches"].as_array().expect("prefetches");
    assert_eq!(prefetches.len(), 2);
    assert_eq!(prefetches[0]["user_agent"], "ScannerBot/1.0");

    // POST verifies and redirects with the outcome.
    let post = app.client.send(Method::POST, &local, &[], "").await;
    assert_eq!(post.status, 303, "{}", post.text());
    let loc = post.header("location").expect("location");
    assert_eq!(
        loc,
        format!("{REDIRECT}/next?x=1&verification={id}&status=verified")
    );
    let v = app.get(&id).await.json();
    assert_eq!(v["status"], "verified");
    assert!(v["verified_at"].as_str().is_some());

    // A second POST is harmless and says the same.
    let again = app.client.send(Method::POST, &local, &[], "").await;
    assert_eq!(again.status, 303);
    assert!(
        again
            .header("location")
            .is_some_and(|l| l.ends_with("status=verified"))
    );
}

#[tokio::test]
async fn link_without_redirect_shows_a_localized_result_page() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "li@example.com", "locale": "zh-CN"}))
        .await;
    assert_eq!(r.status, 202);
    let mails = wait_for(&app.mail_dir(), 1).await;
    assert!(
        mails[0].decoded.contains("请确认您的邮箱地址") || mails[0].raw.contains("=?utf-8?"),
        "subject localized"
    );
    assert!(mails[0].decoded.contains("您好"));
    let link = app.local_link(
        &mails[0]
            .link(crate::support::app::PUBLIC_BASE)
            .expect("link"),
    );
    let page = app.client.send(Method::GET, &link, &[], "").await;
    assert!(page.text().contains("确认您的邮箱地址"));
    let post = app.client.send(Method::POST, &link, &[], "").await;
    assert_eq!(post.status, 200);
    assert!(post.text().contains("邮箱地址已确认"), "{}", post.text());
}

#[tokio::test]
async fn code_flow_counts_down_then_locks() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "a@example.com", "method": "code"}))
        .await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().expect("id").to_string();
    let mails = wait_for(&app.mail_dir(), 1).await;
    let code = mails[0].code().expect("code in mail");
    assert_eq!(code.len(), 6);
    assert!(
        mails[0].link(crate::support::app::PUBLIC_BASE).is_none(),
        "code-only mail has no link"
    );
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for left in (0..5).rev() {
        let r = app.check(json!({"id": id, "code": wrong})).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.error_code(), "invalid_code");
        assert_eq!(r.json()["error"]["attempts_remaining"], left);
    }
    let r = app.check(json!({"id": id, "code": code})).await;
    assert_eq!(
        r.status,
        423,
        "the right code after the budget is spent: {}",
        r.text()
    );
    assert_eq!(r.error_code(), "locked");
    assert_eq!(app.status(&id).await, "locked");
}

#[tokio::test]
async fn right_code_verifies_by_id_or_by_email_and_repeats_idempotently() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "b@example.com", "method": "link_and_code", "subject": "user-42", "purpose": "email_change"}))
        .await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    let mails = wait_for(&app.mail_dir(), 1).await;
    let code = mails[0].code().expect("code");
    assert!(
        mails[0].link(crate::support::app::PUBLIC_BASE).is_some(),
        "link_and_code carries both"
    );
    // Spaces and dashes are ignored.
    let typed = format!("{}-{} ", &code[..3], &code[3..]);
    let r = app
        .check(json!({"email": "B@example.com", "purpose": "email_change", "code": typed}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], "verified");
    assert_eq!(j["id"], id);
    assert_eq!(j["subject"], "user-42");
    assert_eq!(j["purpose"], "email_change");
    let first_at = j["verified_at"].clone();
    app.clock.advance(Duration::from_secs(5));
    let r = app.check(json!({"id": id, "code": code})).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["verified_at"],
        first_at,
        "idempotent: the first verification time stays"
    );
}

#[tokio::test]
async fn codes_expire_after_their_ttl() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "c@example.com", "method": "code", "ttl_seconds": 60}))
        .await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    let code = wait_for(&app.mail_dir(), 1).await[0].code().expect("code");
    app.clock.advance(Duration::from_secs(61));
    assert_eq!(
        app.status(&id).await,
        "expired",
        "GET reports expiry before the sweeper runs"
    );
    let r = app.check(json!({"id": id, "code": code})).await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert_eq!(r.error_code(), "expired");
}

#[tokio::test]
async fn the_sweeper_marks_expired_verifications() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"email": "d@example.com", "ttl_seconds": 30}))
        .await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    app.clock.advance(Duration::from_secs(31));
    let n = app.running().service.sweep_expired().await.expect("sweep");
    assert_eq!(n, 1);
    assert_eq!(
        app.running().service.sweep_expired().await.expect("sweep"),
        0,
        "index entry removed"
    );
    assert_eq!(app.status(&id).await, "expired");
}

#[tokio::test]
async fn fifty_concurrent_wrong_codes_never_exceed_the_budget() {
    // Rate limits are tested on their own (ratelimit.rs); this test needs repeats.
    let app = spawn_app_with("[limits]\ncode_checks_per_verification = []\n").await;
    let r = app
        .create(json!({"email": "e@example.com", "method": "code"}))
        .await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    let code = wait_for(&app.mail_dir(), 1).await[0].code().expect("code");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = app.client.clone();
        let url = format!("{}/v1/verifications/check", app.api);
        let body = json!({"id": id, "code": wrong}).to_string();
        tasks.push(tokio::spawn(async move {
            client
                .send(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &format!("Bearer {KEY}")),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await
        }));
    }
    let mut invalid = 0;
    let mut locked = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status.as_u16() {
            400 => invalid += 1,
            423 => locked += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(invalid, 5, "exactly the budget of attempts was compared");
    assert_eq!(locked, 45);
    let v = app.get(&id).await.json();
    assert_eq!(v["status"], "locked");
    assert_eq!(v["attempts_remaining"], 0);
    let r = app.check(json!({"id": id, "code": code})).await;
    assert_eq!(r.status, 423);
}

#[tokio::test]
async fn a_new_verification_supersedes_the_pending_one() {
    // Rate limits are tested on their own (ratelimit.rs); this test needs repeats.
    let app = spawn_app_with("[limits]\nper_address = []\n").await;
    let first = app
        .create(json!({"email": "f@example.com", "method": "link_and_code"}))
        .await
        .json();
    let old_mail = wait_for(&app.mail_dir(), 1).await.remove(0);
    let second = app
        .create(json!({"email": "F@example.com", "method": "link_and_code"}))
        .await
        .json();
    let old = first["id"].as_str().expect("id");
    assert_eq!(app.status(old).await, "superseded");
    assert_eq!(
        app.status(second["id"].as_str().expect("id")).await,
        "pending"
    );
    let r = app
        .check(json!({"id": old, "code": old_mail.code().expect("code")}))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "superseded");
    let link = app.local_link(
        &old_mail
            .link(crate::support::app::PUBLIC_BASE)
            .expect("link"),
    );
    let post = app.client.send(Method::POST, &link, &[], "").await;
    assert_eq!(post.status, 410);
    assert!(post.text().contains("A newer email was sent"));
    // Another purpose does not supersede.
    let third = app
        .create(json!({"email": "f@example.com", "purpose": "login"}))
        .await
        .json();
    assert_eq!(
        app.status(second["id"].as_str().expect("id")).await,
        "pending"
    );
    assert_eq!(
        app.status(third["id"].as_str().expect("id")).await,
        "pending"
    );
}

#[tokio::test]
async fn cancel_and_resend() {
    // Rate limits are tested on their own (ratelimit.rs); this test needs repeats.
    let app = spawn_app_with("[limits]\nper_address = []\n").await;
    let id = app
        .create(json!({"email": "g@example.com", "method": "code"}))
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_for(&app.mail_dir(), 1).await;
    let r = app
        .api_call(
            Method::POST,
            &format!("/v1/verifications/{id}/resend"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let mails = wait_for(&app.mail_dir(), 2).await;
    assert_eq!(
        mails[0].code(),
        mails[1].code(),
        "a resend carries the same code"
    );
    assert_ne!(mails[0].header("Message-ID"), mails[1].header("Message-ID"));
    let r = app
        .api_call(
            Method::DELETE,
            &format!("/v1/verifications/{id}"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "canceled");
    let r = app
        .api_call(
            Method::DELETE,
            &format!("/v1/verifications/{id}"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "canceled");
    let r = app
        .check(json!({"id": id, "code": mails[0].code().expect("code")}))
        .await;
    assert_eq!(r.error_code(), "canceled");
    let r = app
        .api_call(
            Method::POST,
            &format!("/v1/verifications/{id}/resend"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 409);
}

#[tokio::test]
async fn idempotency_key_replays_and_detects_conflicts() {
    let app = spawn_app().await;
    let body = json!({"email": "h@example.com"}).to_string();
    let url = format!("{}/v1/verifications", app.api);
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", "k-1"),
    ];
    let a = app
        .client
        .send(Method::POST, &url, &headers, body.clone())
        .await;
    let b = app.client.send(Method::POST, &url, &headers, body).await;
    assert_eq!(a.status, 202);
    assert_eq!(b.status, 202);
    assert_eq!(a.json()["id"], b.json()["id"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_all(&app.mail_dir()).len(), 1, "one mail only");
    let c = app
        .client
        .send(
            Method::POST,
            &url,
            &headers,
            json!({"email": "other@example.com"}).to_string(),
        )
        .await;
    assert_eq!(c.status, 409);
    assert_eq!(c.error_code(), "idempotency_conflict");
    // Keys are per app.
    let other = format!("Bearer {OTHER_KEY}");
    let d = app
        .client
        .send(
            Method::POST,
            &url,
            &[
                ("authorization", other.as_str()),
                ("content-type", "application/json"),
                ("idempotency-key", "k-1"),
            ],
            json!({"email": "other@example.com"}).to_string(),
        )
        .await;
    assert_eq!(d.status, 202);
}

#[tokio::test]
async fn apps_cannot_see_each_others_verifications() {
    let app = spawn_app().await;
    let id = app.create(json!({"email": "i@example.com"})).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = app
        .api_call(
            Method::GET,
            &format!("/v1/verifications/{id}"),
            OTHER_KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .api_call(
            Method::DELETE,
            &format!("/v1/verifications/{id}"),
            OTHER_KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(app.status(&id).await, "pending");
}

#[tokio::test]
async fn link_tokens_survive_rotation_and_die_with_their_key() {
    let mut app = spawn_app().await;
    let id = app.create(json!({"email": "j@example.com"})).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mail = wait_for(&app.mail_dir(), 1).await.remove(0);
    let link = mail.link(crate::support::app::PUBLIC_BASE).expect("link");
    app.stop().await;

    // Rotated: k2 signs, k1 still verifies.
    let mut rotated = start(
        app.dir.clone(),
        &[SIGNING_K2, SIGNING_K1],
        "",
        app.clock.clone(),
    )
    .await;
    let page = rotated
        .client
        .send(Method::GET, &rotated.local_link(&link), &[], "")
        .await;
    assert_eq!(page.status, 200, "old link still works after rotation");
    rotated.stop().await;

    // k1 removed: the old link is refused, and nothing is changed.
    let removed = start(app.dir.clone(), &[SIGNING_K2], "", app.clock.clone()).await;
    let post = removed
        .client
        .send(Method::POST, &removed.local_link(&link), &[], "")
        .await;
    assert_eq!(post.status, 404);
    assert!(post.text().contains("This link is not valid"));
    assert_eq!(removed.status(&id).await, "pending");
}

#[tokio::test]
async fn metrics_count_requests_and_verifications() {
    let app = spawn_app().await;
    let m = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await;
    assert_eq!(m.status, 200);
    assert!(
        m.text()
            .contains("verigate_verifications_total{event=\"verified\",method=\"code\"} 0"),
        "pre-set series"
    );
    app.create(json!({"email": "k@example.com"})).await;
    let m = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await
        .text();
    assert!(
        m.contains("verigate_verifications_total{event=\"created\",method=\"link\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "verigate_http_requests_total{listener=\"api\",route=\"create\",status=\"202\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("verigate_store_commits_total"));
}

#[tokio::test]
async fn probes_answer_and_graceful_shutdown_keeps_data() {
    let mut app = spawn_app().await;
    let h = app
        .client
        .send(Method::GET, &format!("{}/healthz", app.api), &[], "")
        .await;
    assert_eq!(h.status, 200);
    let r = app
        .client
        .send(Method::GET, &format!("{}/readyz", app.api), &[], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = app.create(json!({"email": "l@example.com"})).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    app.stop().await;
    let again = start(app.dir.clone(), &[SIGNING_K1], "", app.clock.clone()).await;
    assert_eq!(again.status(&id).await, "pending");
}

#[tokio::test]
async fn an_apps_template_override_is_used_for_its_purpose() {
    let dir = tempfile::tempdir().expect("tempdir");
    let login = dir.path().join("login/en");
    std::fs::create_dir_all(&login).expect("mkdir");
    std::fs::write(login.join("mail.subject.txt"), "Your Shop sign-in link").expect("write");
    let app = spawn_app_with(&format!(
        "shop.templates_dir = {:?}\n",
        dir.path().display().to_string()
    ))
    .await;
    app.create(json!({"email": "t@example.com", "purpose": "login"}))
        .await;
    app.create(json!({"email": "u@example.com", "purpose": "signup"}))
        .await;
    let mails = wait_for(&app.mail_dir(), 2).await;
    let subjects: Vec<String> = mails.iter().filter_map(|m| m.header("Subject")).collect();
    assert!(
        subjects.contains(&"Your Shop sign-in link".to_string()),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&"Confirm your email address".to_string()),
        "{subjects:?}"
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exposed_from_start_up() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../dashboards/verigate.json"))
            .expect("dashboard is JSON");
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("verigate_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name.trim_end_matches("_bucket").to_string());
                rest = &rest[i + 9..];
            }
        }
    }
    assert!(names.len() >= 12, "{names:?}");
    // DNS checks on, so their series exist too (no lookups happen).
    let app =
        spawn_app_with("[dns]\ncheck_on_create = false\nnameservers = [\"127.0.0.1:9\"]\n").await;
    let m = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await
        .text();
    let smtp_free: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with("verigate_smtp_"))
        .collect();
    for n in smtp_free {
        assert!(m.contains(n.as_str()), "{n} missing from /metrics");
    }
    // SMTP series exist when the SMTP transport is configured.
    let relay = crate::support::fake_smtp::FakeSmtp::new().start();
    let smtp = spawn_app_with(&format!(
        "[delivery]\ntransport = \"smtp\"\nready_requires_transport = false\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
        relay.port()
    ))
    .await;
    let m = smtp
        .client
        .send(Method::GET, &format!("{}/metrics", smtp.api), &[], "")
        .await
        .text();
    for n in names.iter().filter(|n| n.starts_with("verigate_smtp_")) {
        assert!(m.contains(n.as_str()), "{n} missing from /metrics");
    }
}

#[tokio::test]
async fn the_openapi_document_is_served_and_names_every_route() {
    let app = spawn_app().await;
    let r = app
        .client
        .send(Method::GET, &format!("{}/openapi.json", app.api), &[], "")
        .await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let on_disk: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json"),
    )
    .expect("valid JSON");
    assert_eq!(doc, on_disk, "served document differs from the file");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/verifications",
        "/v1/verifications/check",
        "/v1/verifications/{id}",
        "/v1/verifications/{id}/resend",
        "/v1/verifications/{id}/watch",
        "/v1/addresses/validate",
        "/admin/v1/outbox",
        "/admin/v1/outbox/{id}",
        "/admin/v1/outbox/{id}/retry",
        "/v/{token}",
        "/static/verigate-watch.js",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
}
