//! Address validation over HTTP and the command line (DESIGN §3.4, §5).

use std::net::Ipv4Addr;

use hyper::Method;
use serde_json::json;

use crate::support::app::{KEY, spawn_app_with};
use crate::support::fake_dns::FakeDns;

#[tokio::test]
async fn the_validate_endpoint_explains_normalizes_suggests_and_checks_dns() {
    let dns = FakeDns::builder("example.com")
        .mx("mail", 10, "mx1")
        .a("mx1", Ipv4Addr::new(1, 1, 1, 1))
        .mx("nullmx", 0, ".")
        .start()
        .await;
    let app = spawn_app_with(&format!(
        "[dns]\ncheck_on_create = false\nnameservers = [\"{}\"]\ntimeout_ms = 500\n",
        dns.nameserver()
    ))
    .await;
    let call = |body: serde_json::Value| {
        let app = &app;
        async move {
            app.api_call(Method::POST, "/v1/addresses/validate", KEY, Some(&body))
                .await
        }
    };
    let r = call(json!({"email": "Zhang.Wei@MAIL.Example.COM"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["valid"], true);
    assert_eq!(j["normalized"], "Zhang.Wei@mail.example.com");
    assert_eq!(j["local_part"], "Zhang.Wei");
    assert_eq!(j["smtputf8"], false);
    assert_eq!(j["deliverability"]["status"], "deliverable");
    assert_eq!(j["deliverability"]["mx"][0], "10 mx1.example.com");

    let j = call(json!({"email": "a@nullmx.example.com"})).await.json();
    assert_eq!(j["deliverability"]["status"], "undeliverable");
    assert_eq!(j["deliverability"]["code"], "null_mx");

    let j = call(json!({"email": "someone@gmial.com", "check_dns": false}))
        .await
        .json();
    assert_eq!(j["valid"], true);
    assert!(j["deliverability"].is_null());
    assert_eq!(j["suggestion"], "someone@gmail.com");

    let j = call(json!({"email": "张伟@例子.中国", "check_dns": false}))
        .await
        .json();
    assert_eq!(j["valid"], true, "{j}");
    assert_eq!(j["smtputf8"], true);
    assert!(j["ascii_email"].is_null());

    let j = call(json!({"email": "two@@example.com"})).await.json();
    assert_eq!(j["valid"], false);
    assert!(j["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let j = call(json!({"email": "a@localhost"})).await.json();
    assert_eq!(j["valid"], false, "special-use domain");
    let r = call(json!({"mail": "x"})).await;
    assert_eq!(r.error_code(), "unknown_field");
}

#[tokio::test]
async fn disposable_domains_are_refused_when_the_policy_is_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("disposable.txt");
    std::fs::write(&list, "# test list\nmailinator.com\n").expect("write");
    let app = spawn_app_with(&format!(
        "[address]\ndisposable_domains_file = {:?}\n",
        list.display().to_string()
    ))
    .await;
    let r = app.create(json!({"email": "x@sub.mailinator.com"})).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.error_code(), "disposable_domain");
    assert_eq!(
        app.create(json!({"email": "x@example.com"})).await.status,
        202
    );
    let j = app
        .api_call(
            Method::POST,
            "/v1/addresses/validate",
            KEY,
            Some(&json!({"email": "y@mailinator.com", "check_dns": false})),
        )
        .await
        .json();
    assert_eq!(j["disposable"], true);
}

#[tokio::test]
async fn invalid_addresses_on_create_say_why() {
    let app = spawn_app_with("").await;
    for (email, words) in [
        ("no-at-sign", "@-sign"),
        ("a..b@example.com", "period"),
        ("a@example", "should have a period"),
        ("a@[192.0.2.1]", "bracketed"),
        ("\"quoted\"@example.com", "quot"),
        ("a@b.test", "special-use"),
    ] {
        let r = app.create(json!({ "email": email })).await;
        assert_eq!(r.status, 400, "{email}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_email");
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(msg.contains(words), "{email}: {msg}");
    }
}

#[test]
fn the_cli_speaks_the_corpus_protocol() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(["validate", "--jsonl"])
        .env_remove("VERIGATE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"input\": \"Abc@Example.COM\", \"options\": {}}\n{\"input\": \"not valid\", \"options\": {}}\n{\"input\": \"\\\"a b\\\"@example.com\", \"options\": {\"allow_quoted_local\": true}}\nnot json\n")
        .expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["valid"], true);
    assert_eq!(lines[0]["normalized"], "Abc@example.com");
    assert_eq!(lines[1]["valid"], false);
    assert!(lines[1]["reason"].is_string());
    assert_eq!(lines[2]["valid"], true);
    assert_eq!(lines[3]["valid"], false);
}
