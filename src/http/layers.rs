//! The outermost layer: gives each request an id (`x-request-id`, kept from the client when it
//! is sane), opens a tracing span, and counts the final response by listener, route and status.
//! It also turns failures of the inner stack (load shedding, timeouts) into JSON answers, so
//! those are counted and carry the request id too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::Request;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use tower::{BoxError, Service};
use tracing::Instrument;

use super::{Listener, Resp, Route as RouteName, Router};
use crate::metrics::Metrics;

/// Longest client-supplied request id we keep.
const MAX_REQUEST_ID_LEN: usize = 64;

/// The observe middleware.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    kind: Listener,
    metrics: Arc<Metrics>,
    peer: Option<std::net::SocketAddr>,
}

// === impl Observe ===

impl<S> Observe<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, kind: Listener, metrics: Arc<Metrics>) -> Self {
        Observe {
            inner,
            kind,
            metrics,
            peer: None,
        }
    }

    /// The same stack for one connection from `peer`.
    pub fn with_peer(mut self, peer: std::net::SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }
}

fn request_id(req: &Request<Incoming>) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= MAX_REQUEST_ID_LEN
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            // The pid is read once: glibc does not cache getpid(), and it was one system call
            // per request.
            static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
            format!(
                "req-{:x}-{}",
                PID.get_or_init(std::process::id),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )
        })
}

impl<S> Service<Request<Incoming>> for Observe<S>
where
    S: Service<Request<Incoming>, Response = Resp, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Resp, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(p) = self.peer {
            req.extensions_mut().insert(super::Peer(p));
        }
        let id = request_id(&req);
        let span = tracing::info_span!("request", id = %id, listener = self.kind.as_str(), method = %req.method());
        let start = Instant::now();
        let kind = self.kind;
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let mut resp = match fut.await {
                    Ok(r) => r,
                    Err(e) => super::error_response(&e, kind, &metrics),
                };
                let route = resp
                    .extensions()
                    .get::<RouteName>()
                    .map(|r| r.0)
                    .unwrap_or("unmatched");
                let status = resp.status();
                metrics
                    .http_requests
                    .with_label_values(&[kind.as_str(), route, status.as_str()])
                    .inc();
                metrics
                    .http_duration
                    .with_label_values(&[kind.as_str(), route])
                    .observe(start.elapsed().as_secs_f64());
                if status.is_server_error() {
                    tracing::warn!(
                        route,
                        status = status.as_u16(),
                        "request answered with an error"
                    );
                } else {
                    tracing::debug!(route, status = status.as_u16(), "request");
                }
                if let Ok(v) = HeaderValue::from_str(&id) {
                    resp.headers_mut().insert("x-request-id", v);
                }
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

/// The innermost service: calls the router. A named type with a boxed future keeps the
/// layer stack's types simple enough for the compiler to prove `Send`.
#[derive(Clone)]
pub struct Route {
    router: Router,
}

// === impl Route ===

impl Route {
    /// Wraps a router.
    pub fn new(router: Router) -> Self {
        Route { router }
    }
}

impl Service<Request<Incoming>> for Route {
    type Response = Resp;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Resp, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let fut = (self.router)(req);
        Box::pin(async move { Ok(fut.await) })
    }
}
