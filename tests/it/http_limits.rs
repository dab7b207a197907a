//! The layer stack under stress: load shedding, request timeout, header-read timeout, and
//! graceful shutdown of the real binary on SIGTERM. Real sockets; stalled clients are made by
//! sending a request head that promises a body and then withholding it.

use std::time::{Duration, Instant};

use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::app::{KEY, spawn_app_with};

/// Opens a connection and sends a create request whose body never fully arrives.
async fn stalled_create(api: &str) -> TcpStream {
    let addr = api.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/verifications HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"email\":"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s
}

async fn read_to_end_within(s: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_are_shed_with_503_and_retry_after() {
    let app = spawn_app_with("[http]\nmax_concurrency = 1\nrequest_timeout_ms = 5000\n").await;
    let _held = stalled_create(&app.api).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = app
        .client
        .send(Method::GET, &format!("{}/healthz", app.api), &[], "")
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "overloaded");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    let m = app.running().service.metrics().render();
    assert!(
        m.contains("verigate_http_overloaded_total{listener=\"api\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_request_that_takes_too_long_gets_a_json_503() {
    let app = spawn_app_with("[http]\nrequest_timeout_ms = 300\n").await;
    let mut s = stalled_create(&app.api).await;
    let started = Instant::now();
    let text = read_to_end_within(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_app_with("[http]\nheader_read_timeout_ms = 300\n").await;
    let addr = app.api.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let _ = read_to_end_within(&mut s, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "connection held for {took:?}"
    );
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
}

#[test]
fn probe_reports_ready_and_sigterm_drains_and_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        crate::support::app::config_toml(
            &dir.path().join("data"),
            &[crate::support::app::SIGNING_K1],
            "",
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("VERIGATE_CONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut api = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("verigate: api on http://") {
            api = rest.split(',').next().expect("addr").to_string();
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let probe = |api: &str| {
        Command::new(env!("CARGO_BIN_EXE_verigate"))
            .args(["probe", "--config"])
            .arg(&cfg)
            .env_remove("VERIGATE_CONFIG")
            .env("VERIGATE_LISTEN__API", api)
            .output()
            .expect("probe")
    };
    let ready = probe(&api);
    assert!(
        ready.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let pid = child.id().to_string();
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !probe(&api).status.success(),
        "probe fails once the daemon is gone"
    );
}
