//! Bad input gets a clear JSON error (or a friendly page), never a 500 or a dropped connection.

use hyper::Method;
use serde_json::json;

use crate::support::app::{KEY, PUBLIC_BASE, spawn_app};
use crate::support::mail::wait_for;

#[tokio::test]
async fn malformed_requests_get_stable_error_codes() {
    let app = spawn_app().await;
    let url = format!("{}/v1/verifications", app.api);
    let auth = format!("Bearer {KEY}");
    let json_h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    // (name, headers, body, status, code, field)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        String,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        ("malformed JSON", json_h.to_vec(), "{\"email\": ".into(), 400, "invalid_json", None),
        ("not an object", json_h.to_vec(), "[1,2]".into(), 400, "invalid_request", None),
        ("empty body", json_h.to_vec(), String::new(), 400, "invalid_json", None),
        ("unknown field", json_h.to_vec(), json!({"email": "a@example.com", "emial": 1}).to_string(), 400, "unknown_field", Some("emial")),
        ("missing email", json_h.to_vec(), json!({"method": "code"}).to_string(), 400, "invalid_request", Some("email")),
        ("wrong type", json_h.to_vec(), json!({"email": 5}).to_string(), 400, "invalid_request", Some("email")),
        ("bad method", json_h.to_vec(), json!({"email": "a@example.com", "method": "sms"}).to_string(), 400, "invalid_request", Some("method")),
        ("bad ttl", json_h.to_vec(), json!({"email": "a@example.com", "ttl_seconds": 0}).to_string(), 400, "invalid_request", Some("ttl_seconds")),
        ("negative ttl", json_h.to_vec(), json!({"email": "a@example.com", "ttl_seconds": -5}).to_string(), 400, "invalid_request", Some("ttl_seconds")),
        ("bad purpose", json_h.to_vec(), json!({"email": "a@example.com", "purpose": "Sign Up"}).to_string(), 400, "invalid_request", Some("purpose")),
        ("metadata not object", json_h.to_vec(), json!({"email": "a@example.com", "metadata": [1]}).to_string(), 400, "invalid_request", Some("metadata")),
        // 33 levels: the metadata object and 32 arrays.
        ("deep metadata", json_h.to_vec(), format!(r#"{{"email": "a@example.com", "metadata": {{"a": {}1{}}}}}"#, "[".repeat(32), "]".repeat(32)), 400, "invalid_request", Some("metadata")),
        ("big metadata", json_h.to_vec(), json!({"email": "a@example.com", "metadata": {"x": "y".repeat(5000)}}).to_string(), 400, "invalid_request", Some("metadata")),
        ("bad client ip", json_h.to_vec(), json!({"email": "a@example.com", "client_ip": "300.1.1.1"}).to_string(), 400, "invalid_request", Some("client_ip")),
        ("bad email", json_h.to_vec(), json!({"email": "not-an-address"}).to_string(), 400, "invalid_email", Some("email")),
        ("redirect outside prefixes", json_h.to_vec(), json!({"email": "a@example.com", "redirect_url": "https://app.example.com.evil.test/welcome"}).to_string(), 400, "invalid_redirect_url", Some("redirect_url")),
        ("javascript redirect", json_h.to_vec(), json!({"email": "a@example.com", "redirect_url": "javascript:alert(1)"}).to_string(), 400, "invalid_redirect_url", Some("redirect_url")),
        ("oversize body", json_h.to_vec(), format!("{{\"email\": \"{}\"}}", "a".repeat(70 * 1024)), 413, "payload_too_large", None),
        ("form content type", vec![("authorization", auth.as_str()), ("content-type", "application/x-www-form-urlencoded")], "email=a@example.com".into(), 415, "unsupported_media_type", None),
        ("no API key", vec![("content-type", "application/json")], json!({"email": "a@example.com"}).to_string(), 401, "unauthorized", None),
        ("wrong API key", vec![("authorization", "Bearer nope-nope-nope-nope"), ("content-type", "application/json")], json!({"email": "a@example.com"}).to_string(), 401, "unauthorized", None),
        ("basic auth", vec![("authorization", "Basic dGVzdDp0ZXN0"), ("content-type", "application/json")], json!({"email": "a@example.com"}).to_string(), 401, "unauthorized", None),
    ];
    for (name, headers, body, status, code, field) in cases {
        let r = app.client.send(Method::POST, &url, &headers, body).await;
        assert_eq!(r.status.as_u16(), status, "{name}: {}", r.text());
        assert_eq!(r.error_code(), code, "{name}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert_eq!(
            r.json()["error"]["field"].as_str(),
            field,
            "{name}: {}",
            r.text()
        );
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{name}"
        );
    }
    // Nothing was created by any of them.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(crate::support::mail::read_all(&app.mail_dir()).is_empty());
}

#[tokio::test]
async fn unknown_routes_ids_and_methods_are_clear() {
    let app = spawn_app().await;
    let r = app.api_call(Method::GET, "/v1/nothing", KEY, None).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "not_found")
    );
    let r = app
        .api_call(Method::GET, "/v1/verifications/vrf_nonsense", KEY, None)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "not_found")
    );
    let r = app
        .api_call(
            Method::GET,
            "/v1/verifications/vrf_01M80WFJ0SMS2J0H201QTY9RZA",
            KEY,
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "not_found")
    );
    let r = app
        .api_call(Method::PUT, "/v1/verifications", KEY, None)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    let r = app.check(json!({"code": "123456"})).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "invalid_request")
    );
    let r = app
        .check(json!({"id": "vrf_x", "email": "a@example.com", "code": "1"}))
        .await;
    assert_eq!(r.status, 400);
    let r = app
        .check(json!({"email": "nobody@example.com", "code": "123456"}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "not_found")
    );
    // A link verification has no code to check.
    let id = app.create(json!({"email": "m@example.com"})).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = app.check(json!({"id": id, "code": "123456"})).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "no_code")
    );
}

#[tokio::test]
async fn forged_truncated_tampered_and_expired_tokens_get_a_friendly_page() {
    let app = spawn_app().await;
    let r = app.create(json!({"email": "n@example.com", "ttl_seconds": 60, "redirect_url": "https://app.example.com/welcome"})).await;
    let id = r.json()["id"].as_str().expect("id").to_string();
    let link = app.local_link(
        &wait_for(&app.mail_dir(), 1).await[0]
            .link(PUBLIC_BASE)
            .expect("link"),
    );
    let token = link.rsplit('/').next().expect("token").to_string();
    let mut tampered: Vec<char> = token.chars().collect();
    tampered[12] = if tampered[12] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let base = format!("{}/v/", app.public);
    for bad in [
        "AAAA".to_string(),
        token[..token.len() - 3].to_string(),
        tampered,
        "%00%ff".into(),
        "x".repeat(5000),
        "..%2F..%2Fetc%2Fpasswd".into(),
    ] {
        for m in [Method::GET, Method::POST] {
            let r = app
                .client
                .send(m.clone(), &format!("{base}{bad}"), &[], "")
                .await;
            assert_eq!(r.status, 404, "{m} {bad}: {}", r.text());
            assert!(r.text().contains("This link is not valid"), "{}", r.text());
            assert!(
                r.header("content-type")
                    .is_some_and(|c| c.starts_with("text/html"))
            );
        }
    }
    assert_eq!(app.status(&id).await, "pending", "nothing changed");
    let r = app
        .client
        .send(
            Method::GET,
            &format!("{}/elsewhere", app.public),
            &[("accept-language", "zh-CN,zh;q=0.9")],
            "",
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("此链接无效"));

    // Expired: a clear page, and the app's redirect learns it.
    app.clock.advance(std::time::Duration::from_secs(61));
    let r = app.client.send(Method::GET, &link, &[], "").await;
    assert_eq!(r.status, 410);
    assert!(r.text().contains("This link has expired"));
    let r = app.client.send(Method::POST, &link, &[], "").await;
    assert_eq!(r.status, 303);
    assert_eq!(
        r.header("location"),
        Some(format!(
            "https://app.example.com/welcome?verification={id}&status=expired"
        ))
    );
}
