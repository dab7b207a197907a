//! The layer stack under stress: load shedding, request timeout, header-read timeout (also for
//! silent, idle and HTTP/2 connections), the connection limit, and graceful shutdown of the
//! real binary on SIGTERM. Real sockets; stalled clients are made by
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

/// Connects to `addr`, sends `sent`, and asserts that the server closes the connection after
/// its header-read timeout (300 ms in these tests). Returns what the server answered.
async fn closed_by_the_header_timeout(addr: &str, sent: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(sent).await.expect("write");
    let started = Instant::now();
    let text = read_to_end_within(&mut s, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "{sent:?}: connection held for {took:?}"
    );
    assert!(
        took >= Duration::from_millis(250),
        "{sent:?}: closed too early: {took:?}"
    );
    text
}

#[tokio::test]
async fn silent_slow_and_idle_clients_are_disconnected_by_the_header_timeout() {
    let app = spawn_app_with("[http]\nheader_read_timeout_ms = 300\n").await;
    for addr in [&app.api, &app.public] {
        let addr = addr.trim_start_matches("http://");
        // A head that never ends, and nothing at all.
        for sent in [&b"GET /healthz HTTP/1.1\r\nHost: x\r\n"[..], b""] {
            closed_by_the_header_timeout(addr, sent).await;
        }
        // Idle after a complete request (keep-alive): answered, then closed.
        let text =
            closed_by_the_header_timeout(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
}

#[tokio::test]
async fn an_http2_preface_whole_or_half_is_refused_at_once() {
    let app = spawn_app_with("").await;
    let addr = app.public.trim_start_matches("http://").to_string();
    for sent in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(sent).await.expect("write");
        let started = Instant::now();
        let text = read_to_end_within(&mut s, Duration::from_secs(5)).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{sent:?}: held for {took:?}");
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 "),
            "{sent:?}: not an HTTP/1.1 answer: {text:?}"
        );
    }
}

#[tokio::test]
async fn connections_over_the_limit_wait_until_one_closes() {
    let app = spawn_app_with("[http]\nmax_connections = 2\nheader_read_timeout_ms = 10000\n").await;
    let addr = app.api.trim_start_matches("http://").to_string();
    let idle1 = TcpStream::connect(&addr).await.expect("connect");
    let _idle2 = TcpStream::connect(&addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = app.running().service.metrics().render();
    assert!(
        m.contains("verigate_http_connections{listener=\"api\"} 2"),
        "{m}"
    );
    // The third connection is not accepted (the kernel queues it): no answer.
    let mut third = TcpStream::connect(&addr).await.expect("connect");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered over the limit: {early:?}");
    // A slot frees: the queued connection is served.
    drop(idle1);
    let text = read_to_end_within(&mut third, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
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
