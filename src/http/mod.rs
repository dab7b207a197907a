//! HTTP: two listeners on hyper 1 + tower, each with the same layer stack.
//!
//! api listener (bearer key on `/v1/*` and `/admin/*`):
//!
//! | method | path | handler |
//! |---|---|---|
//! | POST | `/v1/verifications` | start a verification |
//! | POST | `/v1/verifications/check` | check a code |
//! | GET | `/v1/verifications/{id}` | read one |
//! | POST | `/v1/verifications/{id}/resend` | queue the mail again |
//! | DELETE | `/v1/verifications/{id}` | cancel |
//! | POST | `/v1/addresses/validate` | syntax, suggestion, DNS verdict |
//! | GET | `/admin/v1/outbox?state=&after=&limit=` | list the app's outbox entries |
//! | GET | `/admin/v1/outbox/{id}` | one entry |
//! | POST | `/admin/v1/outbox/{id}/retry` | attempt now, fresh budget |
//! | DELETE | `/admin/v1/outbox/{id}` | drop an entry |
//! | GET | `/healthz` `/readyz` `/metrics` | probes and Prometheus (open) |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document (open) |
//!
//! public listener (signed tokens only):
//!
//! | method | path | handler |
//! |---|---|---|
//! | GET, HEAD | `/v/{token}` | confirm page; never changes state |
//! | POST | `/v/{token}` | the confirm button |
//! | GET | `/v1/verifications/{id}/watch?token=` | live status: WebSocket or SSE ([`watch`]) |
//! | GET | `/static/verigate-watch.js` | the browser side of the watch endpoint |
//! | GET | `/healthz` | probe |
//!
//! Layers, outer to inner: request id + trace + metrics + error-to-response mapping
//! ([`layers::Observe`]), load shedding, concurrency limit, timeout, router. Bodies are limited to 64 KiB
//! while reading (413). The header-read timeout is hyper's, with its timer set. HTTP/1.1 only;
//! connections per listener are capped ([`Server::run`]).

pub mod api;
pub mod error;
pub mod layers;
pub mod public;
pub mod watch;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch as signal};
use tower::{BoxError, ServiceBuilder};

pub use error::ApiError;

use crate::config::Http as HttpConfig;
use crate::metrics::Metrics;

/// Largest request body, bytes (contract: DESIGN §3).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Turns a failure of the inner stack (overload, timeout, anything else) into a JSON answer.
pub fn error_response(e: &BoxError, kind: Listener, metrics: &Metrics) -> Resp {
    if e.is::<tower::load_shed::error::Overloaded>() {
        metrics.http_shed.with_label_values(&[kind.as_str()]).inc();
        return with_route(
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "The server is busy; retry shortly.",
            )
            .with_retry_after(1)
            .into_response(),
            "overloaded",
        );
    }
    if e.is::<tower::timeout::error::Elapsed>() {
        return with_route(
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "The request took too long; retry shortly.",
            )
            .with_retry_after(1)
            .into_response(),
            "timeout",
        );
    }
    tracing::error!(error = %e, "request failed");
    ApiError::internal().into_response()
}

/// Response type of every handler.
pub type Resp = Response<Body>;

/// A response body: one buffer, or chunks as they come (Server-Sent Events).
#[derive(Debug)]
pub enum Body {
    /// The whole body.
    Full(Full<Bytes>),
    /// A stream that ends when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body::Full(Full::new(Bytes::new()))
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Full(Full::new(b))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::from(Bytes::from(s))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(f) => Pin::new(f).poll_frame(cx),
            Body::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// The TCP peer of a request (a request extension set by [`layers::Observe`]).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The client's address: the last entry of `header` when one is configured (a trusted proxy
/// sets it), else the TCP peer.
pub fn client_ip<B>(req: &Request<B>, header: &str) -> Option<IpAddr> {
    if !header.is_empty() {
        let forwarded = req
            .headers()
            .get_all(header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| parse_forwarded_ip(s.trim()))
            .next_back();
        if forwarded.is_some() {
            return forwarded;
        }
    }
    req.extensions().get::<Peer>().map(|p| p.0.ip())
}

/// One entry of a forwarding header: an address, maybe with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// Which listener a request came in on (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The api listener.
    Api,
    /// The public listener.
    Public,
}

impl Listener {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Api => "api",
            Listener::Public => "public",
        }
    }
}

/// Route labels of the api listener (pre-set in metrics so dashboards show zeros, not gaps).
pub const API_ROUTES: [&str; 15] = [
    "healthz",
    "readyz",
    "metrics",
    "openapi",
    "create",
    "check",
    "get",
    "cancel",
    "resend",
    "validate_address",
    "admin_outbox_list",
    "admin_outbox_show",
    "admin_outbox_drop",
    "admin_outbox_retry",
    "unmatched",
];
/// Route labels of the public listener.
pub const PUBLIC_ROUTES: [&str; 6] = [
    "healthz",
    "confirm_page",
    "confirm",
    "watch",
    "static",
    "unmatched",
];

/// The route a response came from, for metrics; set by routers as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct Route(pub &'static str);

/// A router: request in, response out (errors are responses too).
pub type Router =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync>;

/// A JSON response.
pub fn json(status: StatusCode, body: &serde_json::Value) -> Resp {
    json_text(status, body.to_string())
}

/// A JSON response from already-serialized text.
pub fn json_text(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Sets the route label on a response.
pub fn with_route(mut r: Resp, route: &'static str) -> Resp {
    r.extensions_mut().insert(Route(route));
    r
}

/// Reads a body of at most [`MAX_BODY_BYTES`].
///
/// # Errors
/// 413 `payload_too_large`, or 400 when the client stops mid-body.
pub async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The request body is larger than {MAX_BODY_BYTES} bytes."),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "The request body could not be read.",
        )),
    }
}

/// Parses a JSON body into `T`, rejecting unknown fields, with errors that name the field.
///
/// # Errors
/// 400 `invalid_json`, `unknown_field` or `invalid_request`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "The request body is empty; send a JSON object.",
        ));
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be a JSON object.",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        Ok(v) => de.end().map(|()| v).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("The request body is not valid JSON: {e}."),
            )
        }),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.to_string();
            use serde_json::error::Category;
            match inner.classify() {
                Category::Syntax | Category::Eof | Category::Io => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("The request body is not valid JSON: {msg}."),
                )),
                Category::Data => {
                    if let Some(rest) = msg.strip_prefix("unknown field `") {
                        let name = rest.split('`').next().unwrap_or_default().to_string();
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "unknown_field",
                            format!("Unknown field \"{name}\"."),
                        )
                        .with_field(name));
                    }
                    if let Some(rest) = msg.strip_prefix("missing field `") {
                        let name = rest.split('`').next().unwrap_or_default().to_string();
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            format!("The field \"{name}\" is required."),
                        )
                        .with_field(name));
                    }
                    let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    let mut err = ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        if path == "." {
                            format!("Invalid request: {clean}.")
                        } else {
                            format!("Invalid value for \"{path}\": {clean}.")
                        },
                    );
                    if path != "." {
                        err = err.with_field(path);
                    }
                    Err(err)
                }
            }
        }
    }
}

/// Checks that a request with a body says it is JSON.
///
/// # Errors
/// 415 `unsupported_media_type`.
pub fn require_json(req: &Request<Incoming>) -> Result<(), ApiError> {
    let ok = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        ))
    }
}

/// A bound listener ready to serve.
pub struct Server {
    listener: TcpListener,
    kind: Listener,
    router: Router,
    cfg: HttpConfig,
    metrics: Metrics,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn bind(
        addr: SocketAddr,
        kind: Listener,
        router: Router,
        cfg: HttpConfig,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server {
            listener,
            kind,
            router,
            cfg,
            metrics,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket has no local address (does not happen for a bound TCP socket).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true, then stops accepting and drains in-flight requests
    /// for at most `http.shutdown_grace_ms`.
    ///
    /// HTTP/1.1 only (WebSocket upgrades included). Each connection holds one of
    /// `http.max_connections` slots; with none free the listener stops accepting until one
    /// closes. A connection that sends nothing, or stops between requests, is closed by hyper's
    /// header-read timeout, which runs from the moment a request head is awaited.
    pub async fn run(self, mut shutdown: signal::Receiver<bool>) {
        let Server {
            listener,
            kind,
            router,
            cfg,
            metrics,
        } = self;
        let metrics = Arc::new(metrics);
        let inner = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(cfg.max_concurrency)
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .service(layers::Route::new(router));
        // One Arc per listener: the layer is cloned per connection and per request.
        let svc = layers::Observe::new(inner, kind, metrics.clone());
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms));
        let slots = Arc::new(Semaphore::new(cfg.max_connections as usize));
        let open = metrics.http_connections.with_label_values(&[kind.as_str()]);
        // Turned true once: every connection then finishes its request in flight and closes.
        let (close, closing) = signal::channel(false);
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s,
                _ = shutdown.changed() => break,
            };
            // The semaphore is never closed.
            let Ok(slot) = slot else { break };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let conn = http
                .serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(svc.clone().with_peer(peer)),
                )
                .with_upgrades();
            let mut closing = closing.clone();
            let open = open.clone();
            open.inc();
            tokio::spawn(async move {
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    // (The watch's guard must not live across the await below.)
                    () = async { let _ = closing.wait_for(|c| *c).await; } => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                open.dec();
                drop(slot);
            });
        }
        drop(listener);
        let _ = close.send(true);
        // Every slot back means every connection is closed.
        tokio::select! {
            _ = slots.acquire_many(cfg.max_connections) => {}
            _ = tokio::time::sleep(Duration::from_millis(cfg.shutdown_grace_ms)) => {
                tracing::warn!(listener = kind.as_str(), "shutdown grace period over; closing remaining connections");
            }
        }
    }
}

/// A handler future that cannot fail.
pub type Handled = Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>>;
