//! Baseline for `benches/load.sh`: a minimal hyper 1 server doing the same HTTP work as
//! verigate's api listener (hyper-util auto builder with the Tokio timer, TCP_NODELAY, read the
//! whole body, parse it as JSON, answer a small JSON body) minus validation, crypto and storage.
//!
//! ```text
//! cargo run --release --example baseline_server -- [PORT] [--durable DIR]   # PORT 0: any free port
//! ```
//!
//! `--durable DIR` makes it the *durable floor* instead: each `POST` (create, check, confirm)
//! also writes one record (its key: a counter; its value: the request body, or the token) to a
//! fjall database in DIR and answers only once that write is fsynced, through one writer thread
//! that groups waiting writes into one `fdatasync`'d batch, as verigate's store does. That is the
//! least any server on hyper + fjall pays for "answer after the write is on disk": verigate does
//! the same plus its reads, indexes, validation, crypto and outbox on top.
//!
//! Routes:
//! - `POST /v1/verifications` → 202 `{"id", "status": "pending", "email"}`
//! - `POST /v1/verifications/check` → 200 `{"status": "verified", "id"}`
//! - `GET /v1/verifications/{id}` → 200 `{"id", "status": "pending", "method": "link"}`
//! - `POST /v/{token}` (the confirm button) → 200, a short static HTML page; the body, if any,
//!   is read and ignored
//! - `GET /healthz` → 200 `{"status": "ok"}`
//! - a body that is not JSON → 400; anything else → 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// Same body limit as the daemon (DESIGN §3: 64 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Most writes in one batch, and the queue in front of the writer (verigate's defaults).
const MAX_GROUP: usize = 512;
const WRITE_QUEUE: usize = 8192;

/// One durable write: key, value, and where to say it is on disk.
type Write = (Bytes, Bytes, oneshot::Sender<bool>);

/// The writer's queue, set in `--durable` mode only.
static DURABLE: OnceLock<mpsc::Sender<Write>> = OnceLock::new();

/// Opens the database and starts the group-commit writer thread.
fn open_durable(dir: PathBuf) -> std::io::Result<mpsc::Sender<Write>> {
    let io = |e: fjall::Error| std::io::Error::other(e.to_string());
    // verigate's defaults: one engine worker, 16 MiB memtables (its records' keyspaces).
    let db = fjall::Database::builder(dir)
        .worker_threads(1)
        .open()
        .map_err(io)?;
    let ks = db
        .keyspace("requests", || {
            fjall::KeyspaceCreateOptions::default().max_memtable_size(16 << 20)
        })
        .map_err(io)?;
    let (tx, mut rx) = mpsc::channel::<Write>(WRITE_QUEUE);
    std::thread::Builder::new()
        .name("baseline-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(w) => group.push(w),
                        Err(_) => break,
                    }
                }
                let mut batch = db.batch().durability(Some(fjall::PersistMode::SyncData));
                for (key, value, _) in &group {
                    batch.insert(&ks, key.as_ref(), value.as_ref());
                }
                let ok = batch.commit().is_ok();
                for (_, _, done) in group {
                    let _ = done.send(ok);
                }
            }
        })?;
    Ok(tx)
}

/// In `--durable` mode, writes `value` under a fresh key and waits until it is fsynced; `Err` is
/// the response to send instead. Without `--durable`, nothing.
async fn durable_write(value: Bytes) -> Result<(), Response<Full<Bytes>>> {
    let Some(writer) = DURABLE.get() else {
        return Ok(());
    };
    let key = Bytes::copy_from_slice(&NEXT_ID.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let (done, on_disk) = oneshot::channel();
    if writer.send((key, value, done)).await.is_err() || on_disk.await != Ok(true) {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "storage"));
    }
    Ok(())
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    reply(status, &json!({"error": {"code": code, "message": code}}))
}

/// The page `POST /v/{token}` answers with: static, where verigate renders a template.
const CONFIRMED_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>Email address confirmed</title></head><body><p>Your email address is confirmed.</p>\
</body></html>";

/// Reads and parses the body, then (`--durable`) writes it; `Err` is the response to send instead.
async fn json_body(req: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(error(StatusCode::BAD_REQUEST, "invalid_body")),
    };
    let v = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(error(StatusCode::BAD_REQUEST, "invalid_json")),
    };
    durable_write(bytes).await?;
    Ok(v)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            reply(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::POST, "/v1/verifications") => match json_body(req).await {
            Ok(v) => {
                let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                let email = v.get("email").cloned().unwrap_or(Value::Null);
                reply(
                    StatusCode::ACCEPTED,
                    &json!({"id": format!("vrf_{n:026}"), "status": "pending", "email": email}),
                )
            }
            Err(r) => r,
        },
        (&Method::POST, "/v1/verifications/check") => match json_body(req).await {
            Ok(v) => {
                let id = v.get("id").cloned().unwrap_or(Value::Null);
                reply(StatusCode::OK, &json!({"status": "verified", "id": id}))
            }
            Err(r) => r,
        },
        (&Method::GET, p) if p.starts_with("/v1/verifications/") => {
            let id = &p["/v1/verifications/".len()..];
            reply(
                StatusCode::OK,
                &json!({"id": id, "status": "pending", "method": "link"}),
            )
        }
        (&Method::POST, p) if p.starts_with("/v/") => {
            // Read the (empty) form body as a server must, then a fixed page.
            let _ = Limited::new(req.into_body(), MAX_BODY_BYTES)
                .collect()
                .await;
            if let Err(r) = durable_write(Bytes::copy_from_slice(p.as_bytes())).await {
                return Ok(r);
            }
            let mut r = Response::new(Full::new(Bytes::from_static(CONFIRMED_PAGE.as_bytes())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => error(StatusCode::NOT_FOUND, "not_found"),
    };
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let mut port: u16 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--durable" {
            let dir = args
                .next()
                .ok_or_else(|| bad("--durable needs a folder".into()))?;
            let _ = DURABLE.set(open_durable(dir.into())?);
        } else {
            port = a.parse().map_err(|e| bad(format!("port {a:?}: {e}")))?;
        }
    }
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let mode = if DURABLE.get().is_some() {
        "durable floor"
    } else {
        "baseline"
    };
    eprintln!("{mode} listening on http://{}", listener.local_addr()?);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // As the daemon does: HTTP/1.1 with upgrades, a connection future spawned per connection.
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .with_upgrades();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
