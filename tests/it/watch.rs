//! Live status over real sockets: WebSocket (tokio-tungstenite) and Server-Sent Events
//! watchers of `GET /v1/verifications/{id}/watch`, the close codes, isolation between
//! verifications, bounds, graceful shutdown, and scanner prefetch telemetry.

use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::Method;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::app::{PUBLIC_BASE, TestApp, spawn_app, spawn_app_with};
use crate::support::mail::wait_for;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Creates a verification and returns `(id, watch_token)`.
async fn create(app: &TestApp, body: Value) -> (String, String) {
    let r = app.create(body).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let b = r.json();
    (
        b["id"].as_str().expect("id").to_string(),
        b["watch_token"].as_str().expect("watch_token").to_string(),
    )
}

fn watch_url(app: &TestApp, scheme: &str, id: &str, token: Option<&str>) -> String {
    let base = app.public.replacen("http", scheme, 1);
    match token {
        Some(t) => format!("{base}/v1/verifications/{id}/watch?token={t}"),
        None => format!("{base}/v1/verifications/{id}/watch"),
    }
}

async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    assert_eq!(resp.status(), 101);
    ws
}

/// The next status message, skipping pings; panics on a close or after 10 s.
async fn next_status(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("frame");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a status message, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close within 10 s");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("error before close: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// Waits until the verification's mail is sent, so no delivery update arrives later.
async fn wait_sent(app: &TestApp, id: &str) {
    for _ in 0..200 {
        if app.get(id).await.json()["delivery"]["status"] == "sent" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("mail of {id} never sent");
}

/// The confirm link of the `n`-th mail (1-based count to wait for), mapped to the listener.
async fn link_of(app: &TestApp, n: usize, email: &str) -> String {
    let mails = wait_for(&app.mail_dir(), n).await;
    let m = mails
        .iter()
        .find(|m| m.header("To").is_some_and(|t| t.contains(email)))
        .expect("mail to the address");
    app.local_link(&m.link(PUBLIC_BASE).expect("link"))
}

/// A Server-Sent Events client over a real socket: yields `data:` payloads.
struct Sse {
    body: hyper::body::Incoming,
    buf: String,
}

impl Sse {
    async fn open(url: &str) -> Result<Sse, (u16, Value)> {
        let client: HyperClient<_, http_body_util::Empty<bytes::Bytes>> =
            HyperClient::builder(TokioExecutor::new()).build_http();
        let req = hyper::Request::get(url)
            .header("accept", "text/event-stream")
            .body(http_body_util::Empty::new())
            .expect("request");
        let resp = client.request(req).await.expect("sse request");
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            return Err((status, serde_json::from_slice(&body).expect("json error")));
        }
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        assert_eq!(
            resp.headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("*")
        );
        Ok(Sse {
            body: resp.into_body(),
            buf: String::new(),
        })
    }

    /// The next `data:` event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return Some(serde_json::from_str(data).expect("event json"));
                }
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("sse frame within 10 s")?;
            let frame = frame.expect("sse body");
            if let Ok(data) = frame.into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
    }
}

#[tokio::test]
async fn websocket_hears_pending_then_verified_on_link_post_and_closes_1000() {
    let app = spawn_app().await;
    let (id, token) = create(&app, json!({"email": "wang.fang@example.com"})).await;
    let link = link_of(&app, 1, "wang.fang@example.com").await;
    wait_sent(&app, &id).await;
    let mut ws = connect(&watch_url(&app, "ws", &id, Some(&token))).await;
    let first = next_status(&mut ws).await;
    assert_eq!(first["id"], id.as_str());
    assert_eq!(first["status"], "pending");
    assert_eq!(first["final"], false);
    assert_eq!(first["delivery"], "sent");

    // The person opens the link elsewhere: GET (a prefetch) changes nothing, POST verifies.
    let page = app.client.send(Method::GET, &link, &[], "").await;
    assert_eq!(page.status, 200);
    let post = app.client.send(Method::POST, &link, &[], "").await;
    assert_eq!(post.status, 200, "{}", post.text());
    let second = next_status(&mut ws).await;
    assert_eq!(second["status"], "verified", "{second}");
    assert_eq!(second["final"], true);
    assert_eq!(close_code(&mut ws).await, 1000);
}

#[tokio::test]
async fn sse_hears_verified_on_code_check_and_the_stream_ends() {
    let app = spawn_app().await;
    let (id, token) = create(
        &app,
        json!({"email": "chen.jing@example.com", "method": "code"}),
    )
    .await;
    let mails = wait_for(&app.mail_dir(), 1).await;
    let code = mails[0].code().expect("code in mail");
    wait_sent(&app, &id).await;
    let mut sse = Sse::open(&watch_url(&app, "http", &id, Some(&token)))
        .await
        .expect("sse opens");
    let first = sse.next().await.expect("first event");
    assert_eq!(first["status"], "pending");

    // A wrong code changes nothing a watcher cares about; the right one verifies.
    let wrong = app.check(json!({"id": id, "code": "000000x"})).await;
    assert_ne!(wrong.status, 200);
    let ok = app.check(json!({"id": id, "code": code})).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let second = sse.next().await.expect("verified event");
    assert_eq!(second["status"], "verified");
    assert_eq!(second["final"], true);
    assert!(
        sse.next().await.is_none(),
        "stream ends after a final status"
    );
}

#[tokio::test]
async fn a_final_verification_is_sent_once_and_closed() {
    let app = spawn_app().await;
    let (id, token) = create(&app, json!({"email": "zhou.min@example.com"})).await;
    let del = app
        .api_call(
            Method::DELETE,
            &format!("/v1/verifications/{id}"),
            crate::support::app::KEY,
            None,
        )
        .await;
    assert_eq!(del.status, 200);
    let mut ws = connect(&watch_url(&app, "ws", &id, Some(&token))).await;
    let m = next_status(&mut ws).await;
    assert_eq!(m["status"], "canceled");
    assert_eq!(m["final"], true);
    assert_eq!(close_code(&mut ws).await, 1000);
}

#[tokio::test]
async fn each_token_problem_has_its_close_code_and_sse_status() {
    let app = spawn_app().await;
    let (id, token) = create(&app, json!({"email": "sun.li@example.com"})).await;
    let (other_id, other_token) = create(&app, json!({"email": "zhao.lei@example.com"})).await;
    let mut tampered = token.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");

    let cases: [(Option<&str>, &str, u16, &str); 4] = [
        (None, &id, 4000, "token_missing"),
        (Some(&tampered), &id, 4002, "token_invalid"),
        // A genuine token of another verification is not a key to this one.
        (Some(&other_token), &id, 4002, "token_invalid"),
        (Some("not-a-token"), &other_id, 4002, "token_invalid"),
    ];
    for (tok, vid, code, name) in cases {
        let mut ws = connect(&watch_url(&app, "ws", vid, tok)).await;
        assert_eq!(close_code(&mut ws).await, code, "{name}");
        let (status, body) = Sse::open(&watch_url(&app, "http", vid, tok))
            .await
            .err()
            .expect("sse refused");
        assert_eq!(status, 401, "{name}");
        assert_eq!(body["error"]["code"], name);
        assert_eq!(body["error"]["close_code"], code);
    }

    // The watch token expires with the verification.
    app.clock.advance(Duration::from_secs(3 * 24 * 3600));
    let mut ws = connect(&watch_url(&app, "ws", &id, Some(&token))).await;
    assert_eq!(close_code(&mut ws).await, 4001);
    let (status, body) = Sse::open(&watch_url(&app, "http", &id, Some(&token)))
        .await
        .err()
        .expect("sse refused");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "token_expired");
    assert_eq!(body["error"]["close_code"], 4001);

    // Neither WebSocket nor SSE asked for: 426 with the JSON error shape.
    let plain = app
        .client
        .send(
            Method::GET,
            &watch_url(&app, "http", &id, Some(&token)),
            &[],
            "",
        )
        .await;
    assert_eq!(plain.status, 426);
    assert_eq!(plain.error_code(), "upgrade_required");
}

#[tokio::test]
async fn a_watcher_of_another_verification_hears_nothing() {
    let app = spawn_app().await;
    let (a, _) = create(&app, json!({"email": "a.liu@example.com"})).await;
    let (b, b_token) = create(&app, json!({"email": "b.liu@example.com"})).await;
    let link_a = link_of(&app, 2, "a.liu@example.com").await;
    let link_b = link_of(&app, 2, "b.liu@example.com").await;
    wait_sent(&app, &a).await;
    wait_sent(&app, &b).await;
    let mut ws = connect(&watch_url(&app, "ws", &b, Some(&b_token))).await;
    assert_eq!(next_status(&mut ws).await["status"], "pending");

    let post = app.client.send(Method::POST, &link_a, &[], "").await;
    assert_eq!(post.status, 200);
    assert_eq!(app.status(&a).await, "verified");
    let quiet = tokio::time::timeout(Duration::from_millis(700), ws.next()).await;
    assert!(quiet.is_err(), "watcher of b heard {quiet:?}");

    // The channel works: b's own change arrives.
    let post = app.client.send(Method::POST, &link_b, &[], "").await;
    assert_eq!(post.status, 200);
    assert_eq!(next_status(&mut ws).await["status"], "verified");
}

#[tokio::test]
async fn watchers_beyond_the_bounds_get_503() {
    let app = spawn_app_with("[watch]\nmax_per_verification = 2\nmax_connections = 3").await;
    let (a, a_token) = create(&app, json!({"email": "ma.chao@example.com"})).await;
    let (b, b_token) = create(&app, json!({"email": "ma.yun@example.com"})).await;
    let mut w1 = connect(&watch_url(&app, "ws", &a, Some(&a_token))).await;
    let mut w2 = connect(&watch_url(&app, "ws", &a, Some(&a_token))).await;
    next_status(&mut w1).await;
    next_status(&mut w2).await;
    match tokio_tungstenite::connect_async(watch_url(&app, "ws", &a, Some(&a_token))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
        }
        other => panic!("third watcher of one verification admitted: {other:?}"),
    }
    let mut w3 = connect(&watch_url(&app, "ws", &b, Some(&b_token))).await;
    next_status(&mut w3).await;
    let (status, body) = Sse::open(&watch_url(&app, "http", &b, Some(&b_token)))
        .await
        .err()
        .expect("fourth watcher refused");
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "too_many_watchers");

    // Leaving frees a place.
    w1.close(None).await.expect("close");
    drop(w1);
    let mut again = None;
    for _ in 0..50 {
        if let Ok((ws, _)) =
            tokio_tungstenite::connect_async(watch_url(&app, "ws", &a, Some(&a_token))).await
        {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = again.expect("a place frees up after a watcher leaves");
    assert_eq!(next_status(&mut again).await["status"], "pending");
    let metrics = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await
        .text();
    // At least the refusals above (a retry racing the close may add more).
    let refused = |reason: &str| -> u64 {
        let series = format!("verigate_watch_refused_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(refused("per_verification") >= 1, "{metrics}");
    assert!(refused("total") >= 1, "{metrics}");
}

#[tokio::test]
async fn shutdown_closes_websocket_watchers_with_1001_and_ends_sse() {
    let mut app = spawn_app().await;
    let (id, token) = create(&app, json!({"email": "guo.jing@example.com"})).await;
    // No delivery update may arrive between the first event and the shutdown.
    wait_sent(&app, &id).await;
    let mut ws = connect(&watch_url(&app, "ws", &id, Some(&token))).await;
    next_status(&mut ws).await;
    let mut sse = Sse::open(&watch_url(&app, "http", &id, Some(&token)))
        .await
        .expect("sse opens");
    sse.next().await.expect("first event");
    let reader = tokio::spawn(async move {
        let code = close_code(&mut ws).await;
        // Answer the close like a browser does.
        let _ = ws.close(None).await;
        code
    });
    let started = std::time::Instant::now();
    app.stop().await;
    assert_eq!(reader.await.expect("join"), u16::from(CloseCode::Away));
    assert!(sse.next().await.is_none(), "sse stream ends at shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for watchers",
        started.elapsed()
    );
}

#[tokio::test]
async fn prefetches_never_change_state_and_are_recorded_with_network() {
    let app = spawn_app().await;
    let (id, token) = create(&app, json!({"email": "he.ping@example.com"})).await;
    let link = link_of(&app, 1, "he.ping@example.com").await;
    wait_sent(&app, &id).await;
    let mut ws = connect(&watch_url(&app, "ws", &id, Some(&token))).await;
    assert_eq!(next_status(&mut ws).await["status"], "pending");

    let get = app
        .client
        .send(
            Method::GET,
            &link,
            &[("user-agent", "Mozilla/5.0 (compatible; SafeLinksScanner)")],
            "",
        )
        .await;
    assert_eq!(get.status, 200);
    let head = app
        .client
        .send(Method::HEAD, &link, &[("user-agent", "curl/8.5.0")], "")
        .await;
    assert_eq!(head.status, 200);

    let v = app.get(&id).await.json();
    assert_eq!(v["status"], "pending");
    let p = v["prefetches"].as_array().expect("prefetches");
    assert_eq!(p.len(), 2, "{v}");
    assert_eq!(p[0]["method"], "GET");
    assert_eq!(
        p[0]["user_agent"],
        "Mozilla/5.0 (compatible; SafeLinksScanner)"
    );
    assert_eq!(p[1]["method"], "HEAD");
    assert_eq!(p[1]["user_agent"], "curl/8.5.0");
    for x in p {
        assert_eq!(x["network"], "127.0.0.0/24");
        assert!(x["at"].as_str().is_some());
    }
    // Prefetches are not status changes: the watcher hears nothing.
    let quiet = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(quiet.is_err(), "watcher heard {quiet:?}");
    let metrics = app
        .client
        .send(Method::GET, &format!("{}/metrics", app.api), &[], "")
        .await
        .text();
    assert!(
        metrics.contains("verigate_confirm_prefetches_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_trusted_proxy_header_names_the_client_network() {
    let app = spawn_app_with("[http]\nclient_ip_header = \"X-Forwarded-For\"").await;
    let (id, _) = create(&app, json!({"email": "lu.xun@example.com"})).await;
    let link = link_of(&app, 1, "lu.xun@example.com").await;
    let get = app
        .client
        .send(
            Method::GET,
            &link,
            &[("x-forwarded-for", "198.51.100.7, 2001:db8:aa:bb::1")],
            "",
        )
        .await;
    assert_eq!(get.status, 200);
    let v = app.get(&id).await.json();
    assert_eq!(v["prefetches"][0]["network"], "2001:db8:aa::/48", "{v}");
}

#[tokio::test]
async fn the_watch_script_is_served() {
    let app = spawn_app().await;
    let r = app
        .client
        .send(
            Method::GET,
            &format!("{}/static/verigate-watch.js", app.public),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/javascript"))
    );
    assert!(r.text().contains("VerigateWatch"));
    assert!(r.text().contains("EventSource"));
}
