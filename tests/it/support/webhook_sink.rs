//! A real webhook receiver for callback tests: a hyper server on `127.0.0.1:0`, plain HTTP or
//! HTTPS with a throwaway self-signed certificate.
//!
//! Every request to `/webhook` is checked with the `standardwebhooks` crate (the Standard
//! Webhooks project's Rust library, an implementation independent of ours, including its
//! ±5 min timestamp tolerance, so tests pass the real current time) and recorded with the
//! verdict. The answer follows a script set with the builder:
//!
//! ```ignore
//! let sink = WebhookSink::new(SECRET).respond([500, 200]).start().await;
//! let sink = WebhookSink::new(SECRET).respond_with(429).retry_after("7").start().await;
//! let sink = WebhookSink::new(SECRET).redirect().start().await; // 302 to /moved, hits counted
//! let sink = WebhookSink::new(SECRET).hang().start().await;     // records, never answers
//! let sink = WebhookSink::new(SECRET).tls().start().await;      // trust sink.root_store()
//! ```

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Path that callbacks are sent to.
pub const WEBHOOK_PATH: &str = "/webhook";

/// Where [`WebhookSink::redirect`] points; hits are counted, never recorded as callbacks.
pub const MOVED_PATH: &str = "/moved";

/// How the sink answers one callback.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    Redirect,
    Hang,
}

/// One request the sink received on [`WEBHOOK_PATH`].
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub webhook_id: String,
    /// `webhook-timestamp`, if it was an integer.
    pub timestamp: Option<u64>,
    /// `webhook-signature` as sent.
    pub signature: String,
    /// `content-type`.
    pub content_type: String,
    /// `user-agent`.
    pub user_agent: String,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// Whether `standardwebhooks::Webhook::verify` accepted the request.
    pub verified: bool,
    /// Its error, when it did not.
    pub verify_error: Option<String>,
}

/// Builder for a receiver; [`WebhookSink::start`] runs it.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    secret: String,
    script: Vec<Reply>,
    retry_after: Option<String>,
    body: Bytes,
    tls: bool,
}

impl WebhookSink {
    /// A receiver holding `secret` (`whsec_…`) that answers 200 to everything.
    pub fn new(secret: &str) -> Self {
        WebhookSink {
            secret: secret.to_string(),
            script: Vec::new(),
            retry_after: None,
            body: Bytes::new(),
            tls: false,
        }
    }

    /// Answers the n-th callback with the n-th status; the last one repeats.
    pub fn respond(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.script = statuses.into_iter().map(Reply::Status).collect();
        self
    }

    /// Answers every callback with `status`.
    pub fn respond_with(self, status: u16) -> Self {
        self.respond([status])
    }

    /// Adds `Retry-After: value` to every answer.
    pub fn retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.to_string());
        self
    }

    /// Sends `body` with every answer.
    pub fn response_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Answers every callback with `302 Found` to [`MOVED_PATH`] on this sink.
    pub fn redirect(mut self) -> Self {
        self.script = vec![Reply::Redirect];
        self
    }

    /// Reads and records every callback, then never answers.
    pub fn hang(mut self) -> Self {
        self.script = vec![Reply::Hang];
        self
    }

    /// Serves HTTPS with a fresh self-signed certificate for `127.0.0.1`.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Binds `127.0.0.1:0` and serves until the returned handle is dropped.
    pub async fn start(self) -> RunningSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = listener.local_addr().expect("sink address");
        let (acceptor, cert) = if self.tls {
            let (acceptor, cert) = tls_acceptor();
            (Some(acceptor), Some(cert))
        } else {
            (None, None)
        };
        let scheme = if self.tls { "https" } else { "http" };
        let shared = Arc::new(Shared {
            sink: self,
            base: format!("{scheme}://{addr}"),
            state: Mutex::new(State::default()),
        });
        let task = tokio::spawn(serve(listener, acceptor, shared.clone()));
        RunningSink { shared, cert, task }
    }
}

#[derive(Debug, Default)]
struct State {
    received: Vec<Received>,
    moved_hits: usize,
}

struct Shared {
    sink: WebhookSink,
    base: String,
    state: Mutex<State>,
}

/// A running receiver. Dropping it stops the server and every open connection.
pub struct RunningSink {
    shared: Arc<Shared>,
    cert: Option<CertificateDer<'static>>,
    task: JoinHandle<()>,
}

impl RunningSink {
    /// The callback URL.
    pub fn url(&self) -> String {
        format!("{}{WEBHOOK_PATH}", self.shared.base)
    }

    /// Callbacks received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .state
            .lock()
            .expect("sink state")
            .received
            .clone()
    }

    /// Requests to [`MOVED_PATH`] (a followed redirect would land there).
    pub fn moved_hits(&self) -> usize {
        self.shared.state.lock().expect("sink state").moved_hits
    }

    /// Roots trusting this sink's certificate (empty for a plain HTTP sink).
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        if let Some(cert) = &self.cert {
            roots
                .add(cert.clone())
                .expect("sink certificate is a valid root");
        }
        roots
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_acceptor() -> (TlsAcceptor, CertificateDer<'static>) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("test cert");
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server cert");
    (TlsAcceptor::from(Arc::new(config)), cert)
}

async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, shared: Arc<Shared>) {
    // Dropped with this task on abort, which aborts every connection (including hung ones).
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                Some(acceptor) => {
                    // A client that rejects our certificate ends the handshake here.
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == MOVED_PATH {
        shared.state.lock().expect("sink state").moved_hits += 1;
        return Ok(answer(StatusCode::OK, Bytes::new()));
    }
    let (head, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, Bytes::new())),
    };
    let header = |name| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let verdict = standardwebhooks::Webhook::new(&shared.sink.secret)
        .and_then(|wh| wh.verify(&body, &head.headers));
    let reply = {
        let mut state = shared.state.lock().expect("sink state");
        let n = state.received.len();
        state.received.push(Received {
            webhook_id: header("webhook-id"),
            timestamp: header("webhook-timestamp").parse().ok(),
            signature: header("webhook-signature"),
            content_type: header(CONTENT_TYPE.as_str()),
            user_agent: header(USER_AGENT.as_str()),
            body: body.to_vec(),
            verified: verdict.is_ok(),
            verify_error: verdict.err().map(|e| e.to_string()),
        });
        let script = &shared.sink.script;
        script
            .get(n)
            .or(script.last())
            .copied()
            .unwrap_or(Reply::Status(200))
    };
    let mut response = match reply {
        Reply::Status(code) => answer(
            StatusCode::from_u16(code).expect("scripted status"),
            shared.sink.body.clone(),
        ),
        Reply::Redirect => {
            let mut r = answer(StatusCode::FOUND, shared.sink.body.clone());
            let location = format!("{}{MOVED_PATH}", shared.base);
            r.headers_mut()
                .insert(LOCATION, location.parse().expect("location"));
            r
        }
        Reply::Hang => std::future::pending().await,
    };
    if let Some(value) = &shared.sink.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, value.parse().expect("retry-after"));
    }
    Ok(response)
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r
}
