//! The api listener's router and handlers (DESIGN §3.1–3.3, §3.6).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use super::{
    ApiError, Resp, Router, json, json_text, parse_json, read_body, require_json, with_route,
};
use crate::apps::App;
use crate::outbox::{Lane, State, admin};
use crate::verification::service::{
    CheckRequest, CreateRequest, MAX_IDEMPOTENCY_KEY_BYTES, Service, body_hash,
};

/// What `/readyz` looks at.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The mail worker is running.
    pub worker_running: AtomicBool,
    /// The transport has been usable at least once since start.
    pub transport_seen: AtomicBool,
    /// Shutdown has begun.
    pub draining: AtomicBool,
}

/// Shared state of the api router.
#[derive(Clone)]
pub struct ApiState {
    /// The verification service.
    pub service: Service,
    /// Readiness flags.
    pub ready: Arc<Readiness>,
}

/// Builds the api router.
pub fn router(state: ApiState) -> Router {
    Arc::new(move |req| {
        let state = state.clone();
        Box::pin(async move { route(state, req).await })
    })
}

/// Errors of the admin outbox endpoints: a missing entry is named as such.
fn outbox_error(e: crate::verification::service::Error) -> ApiError {
    match e {
        crate::verification::service::Error::NotFound => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such outbox entry.")
        }
        other => ApiError::from(other),
    }
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("This path accepts {allow}."),
    )
    .with("allow", json!(allow))
}

/// The OpenAPI 3.1 document of both listeners, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi/openapi.json");

async fn route(state: ApiState, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let m = req.method().clone();
    let (name, result): (&'static str, Result<Resp, ApiError>) = match (segs.as_slice(), &m) {
        (["healthz"], &Method::GET | &Method::HEAD) => (
            "healthz",
            Ok(json(StatusCode::OK, &json!({"status": "ok"}))),
        ),
        (["readyz"], &Method::GET | &Method::HEAD) => ("readyz", Ok(readyz(&state))),
        (["metrics"], &Method::GET) => ("metrics", Ok(metrics(&state).await)),
        (["openapi.json"], &Method::GET | &Method::HEAD) => (
            "openapi",
            Ok(json_text(StatusCode::OK, OPENAPI.to_string())),
        ),
        (["v1", "verifications"], &Method::POST) => (
            "create",
            match authed(&state, &req) {
                Ok(app) => create(&state, app, req).await,
                Err(e) => Err(e),
            },
        ),
        (["v1", "verifications"], _) => ("create", Err(method_not_allowed("POST"))),
        (["v1", "verifications", "check"], &Method::POST) => (
            "check",
            match authed(&state, &req) {
                Ok(app) => check(&state, app, req).await,
                Err(e) => Err(e),
            },
        ),
        (["v1", "verifications", "check"], _) => ("check", Err(method_not_allowed("POST"))),
        (["v1", "verifications", id], &Method::GET) => (
            "get",
            match authed(&state, &req) {
                Ok(app) => state
                    .service
                    .get(&app, id)
                    .await
                    .map(|v| json(StatusCode::OK, &state.service.view_json(&v)))
                    .map_err(ApiError::from),
                Err(e) => Err(e),
            },
        ),
        (["v1", "verifications", id], &Method::DELETE) => (
            "cancel",
            match authed(&state, &req) {
                Ok(app) => state
                    .service
                    .cancel(&app, id)
                    .await
                    .map(|b| json(StatusCode::OK, &b))
                    .map_err(ApiError::from),
                Err(e) => Err(e),
            },
        ),
        (["v1", "verifications", _], _) => ("get", Err(method_not_allowed("GET, DELETE"))),
        (["v1", "verifications", id, "resend"], &Method::POST) => (
            "resend",
            match authed(&state, &req) {
                Ok(app) => state
                    .service
                    .resend(&app, id)
                    .await
                    .map(|b| json(StatusCode::ACCEPTED, &b))
                    .map_err(ApiError::from),
                Err(e) => Err(e),
            },
        ),
        (["v1", "verifications", _, "resend"], _) => ("resend", Err(method_not_allowed("POST"))),
        (["v1", "addresses", "validate"], &Method::POST) => (
            "validate_address",
            match authed(&state, &req) {
                Ok(_) => validate_address(&state, req).await,
                Err(e) => Err(e),
            },
        ),
        (["v1", "addresses", "validate"], _) => {
            ("validate_address", Err(method_not_allowed("POST")))
        }
        (["admin", "v1", "outbox"], &Method::GET) => (
            "admin_outbox_list",
            match authed(&state, &req) {
                Ok(app) => admin_list(&state, &app, req.uri().query()).await,
                Err(e) => Err(e),
            },
        ),
        (["admin", "v1", "outbox"], _) => ("admin_outbox_list", Err(method_not_allowed("GET"))),
        (["admin", "v1", "outbox", id], &Method::GET) => (
            "admin_outbox_show",
            match authed(&state, &req) {
                Ok(app) => admin::show(&state.service, &app.id, id)
                    .await
                    .map(|b| json(StatusCode::OK, &b))
                    .map_err(outbox_error),
                Err(e) => Err(e),
            },
        ),
        (["admin", "v1", "outbox", id], &Method::DELETE) => (
            "admin_outbox_drop",
            match authed(&state, &req) {
                Ok(app) => admin::drop_entry(&state.service, &app.id, id)
                    .await
                    .map(|b| json(StatusCode::OK, &b))
                    .map_err(outbox_error),
                Err(e) => Err(e),
            },
        ),
        (["admin", "v1", "outbox", _], _) => {
            ("admin_outbox_show", Err(method_not_allowed("GET, DELETE")))
        }
        (["admin", "v1", "outbox", id, "retry"], &Method::POST) => (
            "admin_outbox_retry",
            match authed(&state, &req) {
                Ok(app) => admin::retry(&state.service, &app.id, id)
                    .await
                    .map(|b| json(StatusCode::OK, &b))
                    .map_err(outbox_error),
                Err(e) => Err(e),
            },
        ),
        (["admin", "v1", "outbox", _, "retry"], _) => {
            ("admin_outbox_retry", Err(method_not_allowed("POST")))
        }
        _ => (
            "unmatched",
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "No such endpoint.",
            )),
        ),
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            let allow = e
                .extra
                .get("allow")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            let mut r = e.into_response();
            if let Some(a) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
                r.headers_mut().insert(hyper::header::ALLOW, a);
            }
            r
        }
    };
    with_route(resp, name)
}

/// The app whose bearer key the request carries.
fn authed(state: &ApiState, req: &Request<Incoming>) -> Result<Arc<App>, ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Send a valid API key as \"Authorization: Bearer <key>\".",
        )
    };
    let value = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let (scheme, key) = value.split_once(' ').ok_or_else(unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized());
    }
    state
        .service
        .apps()
        .authenticate(key.trim())
        .ok_or_else(unauthorized)
}

async fn create(state: &ApiState, app: Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    require_json(&req)?;
    let idem_key = match req.headers().get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    "Idempotency-Key must be visible ASCII.",
                )
            })?;
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes."),
                ));
            }
            Some(k.to_string())
        }
        None => None,
    };
    let body = read_body(req.into_body()).await?;
    let parsed: CreateRequest = parse_json(&body)?;
    let idem = idem_key.map(|k| (k, body_hash(&body)));
    let reply = state.service.create(&app, parsed, idem).await?;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::ACCEPTED);
    Ok(json_text(status, reply.body))
}

/// `POST /v1/addresses/validate` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateRequest {
    email: String,
    #[serde(default = "default_true")]
    check_dns: bool,
}

fn default_true() -> bool {
    true
}

async fn validate_address(state: &ApiState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    require_json(&req)?;
    let body = read_body(req.into_body()).await?;
    let parsed: ValidateRequest = parse_json(&body)?;
    Ok(json(
        StatusCode::OK,
        &state
            .service
            .validate_address(&parsed.email, parsed.check_dns)
            .await,
    ))
}

async fn check(state: &ApiState, app: Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    require_json(&req)?;
    let body = read_body(req.into_body()).await?;
    let parsed: CheckRequest = parse_json(&body)?;
    let v = state.service.check(&app, parsed).await?;
    Ok(json(StatusCode::OK, &v))
}

async fn admin_list(state: &ApiState, app: &App, query: Option<&str>) -> Result<Resp, ApiError> {
    let mut st = None;
    let mut after = None;
    let mut limit = admin::DEFAULT_PAGE;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "state" => {
                st = Some(State::parse(&v).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "state must be scheduled, delivered, failed or dropped.",
                    )
                    .with_field("state")
                })?);
            }
            "after" => {
                after = Some(v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "after must be an outbox entry id (msg_…).",
                    )
                    .with_field("after")
                })?);
            }
            "limit" => {
                limit = v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("limit must be 1 to {}.", admin::MAX_PAGE),
                    )
                    .with_field("limit")
                })?;
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_field",
                    format!("Unknown query parameter \"{other}\"."),
                )
                .with_field(other.to_string()));
            }
        }
    }
    let body = admin::list(&state.service, &app.id, st, after, limit).await?;
    Ok(json(StatusCode::OK, &body))
}

fn readyz(state: &ApiState) -> Resp {
    let r = &state.ready;
    let worker = r.worker_running.load(Ordering::Relaxed);
    let transport = r.transport_seen.load(Ordering::Relaxed);
    let draining = r.draining.load(Ordering::Relaxed);
    let ok = worker && transport && !draining;
    json(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({
            "status": if ok { "ready" } else { "not_ready" },
            "checks": {"store": true, "worker": worker, "transport": transport, "draining": draining},
        }),
    )
}

async fn metrics(state: &ApiState) -> Resp {
    let service = state.service.clone();
    let m = service.metrics().clone();
    let now = service.now();
    // Gauges that describe the store are computed at scrape time.
    let counts = [Lane::Email, Lane::Callback].map(|l| service.store().scheduled(l));
    let depth = service
        .store()
        .read(move |r| {
            let mut out = Vec::new();
            for (i, (lane, label)) in [(Lane::Email, "email"), (Lane::Callback, "callback")]
                .into_iter()
                .enumerate()
            {
                // The live count; a scan only while the count taken at open is running.
                let n = match counts[i] {
                    Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
                    None => r.scheduled_count(lane)?,
                };
                // With nothing scheduled there is no oldest entry, and no need to walk the
                // tombstones a drain leaves at the front of the due index (32 ms of a scrape
                // after 167k deliveries).
                let oldest = if n == 0 {
                    0
                } else {
                    r.next_due(lane)?
                        .map(|at| at.until(now).as_secs())
                        .unwrap_or(0)
                };
                out.push((label, n, oldest));
            }
            Ok(out)
        })
        .await;
    match depth {
        Ok(rows) => {
            for (label, n, oldest) in rows {
                m.outbox_depth
                    .with_label_values(&[label])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
                m.outbox_oldest_due
                    .with_label_values(&[label])
                    .set(i64::try_from(oldest).unwrap_or(i64::MAX));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read outbox depth for metrics"),
    }
    let stats = service.store().stats();
    let commits = stats.commits.load(Ordering::Relaxed);
    let ops = stats.ops.load(Ordering::Relaxed);
    m.store_commits
        .inc_by(commits.saturating_sub(m.store_commits.get()));
    m.store_ops.inc_by(ops.saturating_sub(m.store_ops.get()));
    let mut r = hyper::Response::new(super::Body::from(m.render()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
