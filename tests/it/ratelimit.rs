//! Rate limits over real HTTP (DESIGN §8): 429 JSON with Retry-After, counted by limit.

use hyper::Method;
use serde_json::json;

use crate::support::app::{KEY, spawn_app, spawn_app_with};
use crate::support::mail::wait_for;

#[tokio::test]
async fn a_second_create_for_one_address_within_a_minute_is_refused() {
    let app = spawn_app().await;
    let r = app.create(json!({"email": "rl@example.com"})).await;
    assert_eq!(r.status, 202);
    let r = app.create(json!({"email": "RL@example.com"})).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error_code(), "rate_limited");
    assert_eq!(r.json()["error"]["limit"], "per_address");
    let after: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((59..=60).contains(&after), "{after}");
    // Resends count against the same recipient budget.
    let id = app
        .create(json!({"email": "other-rl@example.com"}))
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = app
        .api_call(
            Method::POST,
            &format!("/v1/verifications/{id}/resend"),
            KEY,
            None,
        )
        .await;
    assert_eq!(r.status, 429);
    // An Idempotency-Key replay is not a new send and spends nothing.
    let url = format!("{}/v1/verifications", app.api);
    let auth = format!("Bearer {KEY}");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", "once"),
    ];
    let body = json!({"email": "idem-rl@example.com"}).to_string();
    assert_eq!(
        app.client
            .send(Method::POST, &url, &h, body.clone())
            .await
            .status,
        202
    );
    assert_eq!(
        app.client.send(Method::POST, &url, &h, body).await.status,
        202
    );
    let m = app.running().service.metrics().render();
    assert!(
        m.contains("verigate_ratelimit_rejections_total{limit=\"per_address\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn an_operator_retry_of_a_mail_counts_against_the_recipient_budget() {
    let app = spawn_app().await;
    let r = app.create(json!({"email": "retry-rl@example.com"})).await;
    assert_eq!(r.status, 202);
    let list = app
        .api_call(Method::GET, "/admin/v1/outbox", KEY, None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text());
    let msg = list.json()["entries"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let path = format!("/admin/v1/outbox/{msg}");
    let before = app.api_call(Method::GET, &path, KEY, None).await.json();
    let r = app
        .api_call(Method::POST, &format!("{path}/retry"), KEY, None)
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["limit"], "per_address");
    assert!(r.header("retry-after").is_some());
    // Refused means untouched: no fresh budget, no new schedule.
    let after = app.api_call(Method::GET, &path, KEY, None).await.json();
    assert_eq!(after["attempts"], before["attempts"], "{after}");
    assert_ne!(after["last_error"], "retry requested by an operator");
}

#[tokio::test]
async fn code_checks_from_one_ip_across_verifications_are_limited() {
    let app = spawn_app_with("[limits]\ncode_checks_per_client_ip = [\"6/1m\"]\n").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .create(json!({"email": format!("ip{i}@example.com"), "method": "code"}))
            .await;
        ids.push(r.json()["id"].as_str().expect("id").to_string());
    }
    wait_for(&app.mail_dir(), 3).await;
    let mut statuses = Vec::new();
    for id in &ids {
        for _ in 0..3 {
            let r = app
                .check(json!({"id": id, "code": "000000", "client_ip": "203.0.113.7"}))
                .await;
            statuses.push(r.status.as_u16());
        }
    }
    // The first six were compared (wrong code: 400, or the rare right one: 200); the rest refused.
    assert!(
        statuses[..6].iter().all(|s| *s == 400 || *s == 200),
        "{statuses:?}"
    );
    assert!(statuses[6..].iter().all(|s| *s == 429), "{statuses:?}");
    // Another IP is not affected; a made-up id is 404 and spends nothing.
    let r = app
        .check(json!({"id": ids[0], "code": "000000", "client_ip": "198.51.100.1"}))
        .await;
    assert_ne!(r.status, 429);
    let r = app.check(json!({"id": "vrf_01M80WFJ0SMS2J0H201QTY9RZA", "code": "1", "client_ip": "198.51.100.2"})).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn an_app_can_override_a_limit_and_buckets_are_per_app() {
    // Appended after the `[[apps]]` list, this table belongs to the last app, `other`.
    let app = spawn_app_with("[apps.limits]\nper_address = []\n").await;
    let other = crate::support::app::OTHER_KEY;
    for _ in 0..2 {
        let r = app
            .api_call(
                Method::POST,
                "/v1/verifications",
                other,
                Some(&json!({"email": "x@example.com"})),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    // `shop` keeps the default 1/60s, in its own bucket for the same address.
    assert_eq!(
        app.create(json!({"email": "x@example.com"})).await.status,
        202
    );
    assert_eq!(
        app.create(json!({"email": "x@example.com"})).await.status,
        429
    );
}
