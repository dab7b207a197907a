//! `GET /v1/verifications/{id}/watch?token=…` on the public listener (DESIGN §3.5): the
//! "check your inbox" page hears the verification's status at once and at every change.
//!
//! WebSocket when the request asks for an upgrade, Server-Sent Events when it accepts
//! `text/event-stream`, else 426. Messages are [`Snapshot::message`] JSON. After a final status
//! the WebSocket closes with 1000 and the event stream ends. Refusals:
//!
//! | cause | WebSocket close | SSE / plain HTTP |
//! |---|---|---|
//! | no token | 4000 | 401 `token_missing` |
//! | expired token | 4001 | 401 `token_expired` |
//! | forged, tampered, wrong kind, or another verification's | 4002 | 401 `token_invalid` |
//! | verification gone | 4004 | 404 `not_found` |
//! | a bound reached | (503 before the upgrade) | 503 `too_many_watchers` |
//! | daemon shutting down | 1001 | stream ends |
//!
//! The token is checked before any store read; watchers subscribe to the [`Hub`] before
//! reading the current state, so no change can fall in between.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use tokio::sync::mpsc;

use super::{ApiError, Body, Resp};
use crate::clock::UnixTime;
use crate::id::VerificationId;
use crate::verification::Status;
use crate::verification::service::Service;
use crate::verification::token::{Keyring, TokenError, TokenKind};
use crate::watch::{Hub, Refused, Snapshot, Subscription};

/// Largest message a watcher may send us (it has nothing to say; this bounds memory).
const MAX_CLIENT_MESSAGE: usize = 1024;
/// How long the client has to finish the upgrade, and to answer our close frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Keep-alive rounds without any frame from a WebSocket client before it is dropped.
const MAX_MISSED_PONGS: u32 = 2;
/// SSE reconnect hint for EventSource, milliseconds.
const SSE_RETRY_MS: u64 = 3000;

/// Why a watcher is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `token` parameter.
    Missing,
    /// A genuine token past its expiry.
    Expired,
    /// Anything else wrong with the token, including a token of another verification.
    Invalid,
    /// The verification no longer exists.
    NotFound,
}

impl Denied {
    /// The WebSocket close code.
    pub fn close_code(self) -> u16 {
        match self {
            Denied::Missing => 4000,
            Denied::Expired => 4001,
            Denied::Invalid => 4002,
            Denied::NotFound => 4004,
        }
    }

    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            Denied::Missing => "token_missing",
            Denied::Expired => "token_expired",
            Denied::Invalid => "token_invalid",
            Denied::NotFound => "not_found",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Denied::Missing => "Pass the watch token from the create answer as ?token=.",
            Denied::Expired => "The watch token has expired.",
            Denied::Invalid => "The watch token is not valid for this verification.",
            Denied::NotFound => "No such verification.",
        }
    }

    fn into_response(self) -> Resp {
        let status = if self == Denied::NotFound {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNAUTHORIZED
        };
        ApiError::new(status, self.code(), self.message())
            .with("close_code", serde_json::json!(self.close_code()))
            .into_response()
    }
}

/// Checks a watch token against the verification id in the path. Pure: no store read.
///
/// # Errors
/// [`Denied`] with the reason.
pub fn authorize(
    keys: &Keyring,
    token: Option<&str>,
    path_id: &str,
    now: UnixTime,
) -> Result<VerificationId, Denied> {
    let token = token.filter(|t| !t.is_empty()).ok_or(Denied::Missing)?;
    let claims = match keys.verify(token, TokenKind::Watch, now) {
        Ok(c) => c,
        Err(TokenError::Expired(id)) if id.to_string() == path_id => {
            return Err(Denied::Expired);
        }
        Err(_) => return Err(Denied::Invalid),
    };
    if claims.verification.to_string() != path_id {
        return Err(Denied::Invalid);
    }
    Ok(claims.verification)
}

/// The value of query parameter `name`.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn accepts_event_stream<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

/// Handles one watch request.
pub async fn handle(service: &Service, hub: &Hub, mut req: Request<Incoming>, id: &str) -> Resp {
    let websocket = hyper_tungstenite::is_upgrade_request(&req);
    if !websocket && !accepts_event_stream(&req) {
        let mut r = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "Open this URL as a WebSocket, or as Server-Sent Events (Accept: text/event-stream).",
        )
        .into_response();
        r.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    let token = query_param(req.uri().query(), "token");
    let now = service.now();
    let vid = match authorize(service.keys(), token.as_deref(), id, now) {
        Ok(v) => v,
        Err(denied) => return refuse(&mut req, websocket, denied),
    };
    let sub = match hub.subscribe(vid) {
        Ok(s) => s,
        Err(refused) => {
            hub.metrics()
                .refused
                .with_label_values(&[refused.as_str()])
                .inc();
            return too_many(refused);
        }
    };
    let current = match service.store().lookup(move |r| r.verification(vid)).await {
        Ok(Some(v)) => Snapshot {
            status: v.status,
            delivery: v.delivery.status,
            expires_at: v.expires_at,
        },
        Ok(None) => return refuse(&mut req, websocket, Denied::NotFound),
        Err(e) => {
            tracing::error!(error = %e, "cannot read verification for a watcher");
            return ApiError::internal().into_response();
        }
    };
    let feed = Feed::new(service.clone(), hub, sub, current);
    if websocket {
        match hyper_tungstenite::upgrade(&mut req, Some(ws_config())) {
            Ok((resp, upgrade)) => {
                let hub = hub.clone();
                tokio::spawn(async move { run_websocket(upgrade, feed, hub).await });
                resp.map(Body::Full)
            }
            Err(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_upgrade",
                format!("Invalid WebSocket upgrade: {e}."),
            )
            .into_response(),
        }
    } else {
        let (tx, rx) = mpsc::channel(4);
        let hub = hub.clone();
        tokio::spawn(async move { run_sse(tx, feed, hub).await });
        let mut r = Response::new(Body::Stream(rx));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // Access-Control-Allow-Origin is set on every watch answer by the public router.
        // Tell nginx-style proxies not to buffer the stream.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

/// Our side of every watch socket: client messages are bounded (they have nothing to say).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

fn too_many(refused: Refused) -> Resp {
    let msg = match refused {
        Refused::ShuttingDown => "The server is shutting down; reconnect shortly.",
        Refused::Total | Refused::PerVerification => {
            "Too many watchers are open; close one or retry later."
        }
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_watchers", msg)
        .with_retry_after(5)
        .into_response()
}

/// A refusal: for a WebSocket, complete the upgrade and close with the code (browsers cannot
/// read an HTTP status of a failed handshake); for SSE, a JSON error.
fn refuse(req: &mut Request<Incoming>, websocket: bool, denied: Denied) -> Resp {
    if !websocket {
        return denied.into_response();
    }
    match hyper_tungstenite::upgrade(req, Some(ws_config())) {
        Ok((resp, upgrade)) => {
            tokio::spawn(async move {
                if let Ok(Ok(ws)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
                    close(ws, denied.close_code(), denied.code()).await;
                }
            });
            resp.map(Body::Full)
        }
        Err(_) => denied.into_response(),
    }
}

/// What the watcher loop does next.
enum Next {
    /// Send this message; `true` when the status is final.
    Send(String, bool),
    /// Keep-alive.
    Ping,
    /// The daemon is shutting down.
    Shutdown,
}

/// The transport-independent part of a watcher: the latest snapshot, dedup, expiry timer,
/// keep-alive timer, shutdown.
struct Feed {
    service: Service,
    sub: Subscription,
    last: Snapshot,
    sent: Option<(Status, crate::verification::DeliveryStatus)>,
    ping: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Feed {
    fn new(service: Service, hub: &Hub, sub: Subscription, current: Snapshot) -> Self {
        let every = hub.config().ping_interval();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Feed {
            service,
            sub,
            last: current,
            sent: None,
            ping,
            shutdown: hub.shutdown_signal(),
        }
    }

    /// The first message: the state read from the store, or a newer one already published.
    fn first(&mut self) -> (String, bool) {
        if let Some(newer) = *self.sub.rx.borrow_and_update() {
            self.last = newer;
        }
        let now = self.service.now();
        let status = self.last.status_at(now);
        self.sent = Some((status, self.last.delivery));
        (self.last.message(self.sub.id(), now), status.is_final())
    }

    /// `Some` message when `s` differs from what was sent last.
    fn emit(&mut self, s: Snapshot) -> Option<Next> {
        let now = self.service.now();
        let status = s.status_at(now);
        self.last = s;
        if self.sent == Some((status, s.delivery)) {
            return None;
        }
        self.sent = Some((status, s.delivery));
        Some(Next::Send(s.message(self.sub.id(), now), status.is_final()))
    }

    async fn next(&mut self) -> Next {
        loop {
            let until_expiry = (self.last.status == Status::Pending).then(|| {
                Duration::from_millis(self.last.expires_at.0.saturating_sub(self.service.now().0))
            });
            let expiry = async {
                match until_expiry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.shutdown.changed() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        return Next::Shutdown;
                    }
                }
                r = self.sub.rx.changed() => {
                    if r.is_err() {
                        return Next::Shutdown;
                    }
                    let latest = *self.sub.rx.borrow_and_update();
                    if let Some(m) = latest.and_then(|s| self.emit(s)) {
                        return m;
                    }
                }
                () = expiry => {
                    if let Some(m) = self.emit(self.last) {
                        return m;
                    }
                }
                _ = self.ping.tick() => return Next::Ping,
            }
        }
    }
}

/// Counts one open connection of `transport` while alive.
struct Open {
    gauge: prometheus::IntGauge,
}

impl Open {
    fn new(hub: &Hub, transport: &str) -> Self {
        let gauge = hub.metrics().connections.with_label_values(&[transport]);
        gauge.inc();
        Open { gauge }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn run_websocket(upgrade: HyperWebsocket, mut feed: Feed, hub: Hub) {
    let Ok(Ok(ws)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await else {
        return;
    };
    let _open = Open::new(&hub, "websocket");
    let sent = hub.metrics().messages.with_label_values(&["websocket"]);
    let mut ws = ws;
    let (first, done) = feed.first();
    if send(&mut ws, Message::text(first)).await.is_err() {
        return;
    }
    sent.inc();
    if done {
        return close(ws, 1000, "final").await;
    }
    let mut missed = 0u32;
    loop {
        tokio::select! {
            next = feed.next() => match next {
                Next::Send(m, done) => {
                    if send(&mut ws, Message::text(m)).await.is_err() {
                        return;
                    }
                    sent.inc();
                    if done {
                        return close(ws, 1000, "final").await;
                    }
                }
                Next::Ping => {
                    if missed >= MAX_MISSED_PONGS {
                        tracing::debug!("watcher stopped answering pings");
                        return;
                    }
                    missed += 1;
                    if send(&mut ws, Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
                Next::Shutdown => return close(ws, 1001, "server shutting down").await,
            },
            incoming = ws.next() => match incoming {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the reply to the client's close; flush it.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                    return;
                }
                // Pongs (and anything else) prove the peer is alive.
                Some(Ok(_)) => missed = 0,
            },
        }
    }
}

/// Sends one frame, giving up on a peer that does not read.
async fn send<S>(sink: &mut S, m: Message) -> Result<(), ()>
where
    S: futures_util::Sink<Message> + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.send(m)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends a close frame with `code` and waits briefly for the client's answer.
async fn close(mut ws: HyperWebsocketStream, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    if send(&mut ws, Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn run_sse(tx: mpsc::Sender<Bytes>, mut feed: Feed, hub: Hub) {
    let _open = Open::new(&hub, "sse");
    let sent = hub.metrics().messages.with_label_values(&["sse"]);
    let wait = hub.config().ping_interval();
    let push = |chunk: String| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(wait, tx.send(Bytes::from(chunk))).await,
                Ok(Ok(()))
            )
        }
    };
    let (first, done) = feed.first();
    if !push(format!("retry: {SSE_RETRY_MS}\ndata: {first}\n\n")).await {
        return;
    }
    sent.inc();
    if done {
        return;
    }
    loop {
        tokio::select! {
            () = tx.closed() => return,
            next = feed.next() => match next {
                Next::Send(m, done) => {
                    if !push(format!("data: {m}\n\n")).await {
                        return;
                    }
                    sent.inc();
                    if done {
                        return;
                    }
                }
                Next::Ping => {
                    if !push(": ping\n\n".to_string()).await {
                        return;
                    }
                }
                // Ending the stream lets the connection drain; EventSource reconnects later.
                Next::Shutdown => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verification::token::SigningKey;

    fn keys() -> Keyring {
        let k = SigningKey::generate("k1").expect("key");
        Keyring::new(vec![SigningKey::parse(&k).expect("parse")]).expect("ring")
    }

    #[test]
    fn authorize_maps_each_token_problem_to_its_close_code() {
        let keys = keys();
        let id = VerificationId::from_bytes([3; 16]);
        let other = VerificationId::from_bytes([4; 16]);
        let now = UnixTime(1_000_000);
        let good = keys.sign(TokenKind::Watch, id, UnixTime(2_000_000));
        let sid = id.to_string();
        assert_eq!(authorize(&keys, Some(&good), &sid, now), Ok(id));
        let check = |t: Option<&str>, path: &str| {
            authorize(&keys, t, path, now)
                .map_err(Denied::close_code)
                .err()
        };
        assert_eq!(check(None, &sid), Some(4000));
        assert_eq!(check(Some(""), &sid), Some(4000));
        let expired = keys.sign(TokenKind::Watch, id, UnixTime(999_999));
        assert_eq!(check(Some(&expired), &sid), Some(4001));
        // An expired token of another verification is invalid here, not "expired".
        assert_eq!(check(Some(&expired), &other.to_string()), Some(4002));
        assert_eq!(check(Some(&good), &other.to_string()), Some(4002));
        let link = keys.sign(TokenKind::Link, id, UnixTime(2_000_000));
        assert_eq!(check(Some(&link), &sid), Some(4002));
        let mut tampered = good.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert_eq!(check(Some(&tampered), &sid), Some(4002));
        assert_eq!(check(Some("garbage"), &sid), Some(4002));
    }

    #[test]
    fn query_param_decodes_and_finds_by_name() {
        assert_eq!(
            query_param(Some("a=1&token=x%2By&b=2"), "token").as_deref(),
            Some("x+y")
        );
        assert_eq!(query_param(Some("a=1"), "token"), None);
        assert_eq!(query_param(None, "token"), None);
    }

    #[test]
    fn event_stream_is_recognized_among_other_types() {
        let req = |accept: &str| {
            Request::builder()
                .header(ACCEPT, accept)
                .body(())
                .expect("request")
        };
        assert!(accepts_event_stream(&req("text/event-stream")));
        assert!(accepts_event_stream(&req(
            "text/html, Text/Event-Stream;q=0.9"
        )));
        assert!(!accepts_event_stream(&req("application/json")));
    }
}
