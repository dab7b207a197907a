//! The public listener: the confirm page for people (DESIGN §3.5).
//!
//! `GET`/`HEAD /v/{token}` never change a verification's state: mail scanners fetch links (and
//! run their JavaScript), so a GET that verified would let a scanner verify an address for an
//! attacker. The page has one button that POSTs to the same URL. Every answer is a friendly,
//! localized page (or a 303 to the app's redirect URL after POST), never a stack trace.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, LOCATION, REFERRER_POLICY,
    USER_AGENT, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};

use super::{Body, Resp, Router, with_route};
use crate::templates::Page;
use crate::verification::Status;
use crate::verification::service::{LinkView, Service};
use crate::watch::Hub;

/// The browser side of the watch endpoint, served at `/static/verigate-watch.js`.
pub const WATCH_JS: &str = include_str!("../../static/verigate-watch.js");

/// What the public router needs.
#[derive(Clone)]
pub struct PublicState {
    /// The verification service.
    pub service: Service,
    /// Live-status fan-out.
    pub hub: Hub,
    /// `http.client_ip_header`.
    pub client_ip_header: Arc<str>,
}

/// Builds the public router.
pub fn router(state: PublicState) -> Router {
    Arc::new(move |req| {
        let state = state.clone();
        Box::pin(async move { route(state, req).await })
    })
}

async fn route(state: PublicState, req: Request<Incoming>) -> Resp {
    let service = &state.service;
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let lang = accept_language(&req);
    match (segs.as_slice(), req.method()) {
        (["healthz"], &Method::GET | &Method::HEAD) => with_route(
            super::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "healthz",
        ),
        (["v1", "verifications", id, "watch"], &Method::GET) => {
            let id = id.to_string();
            let mut r = super::watch::handle(service, &state.hub, req, &id).await;
            // The page is on the app's origin and the token is the credential (no cookies):
            // any origin may read the stream and its refusals (EventSource).
            r.headers_mut().insert(
                hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            with_route(r, "watch")
        }
        (["static", "verigate-watch.js"], &Method::GET | &Method::HEAD) => {
            let head = req.method() == Method::HEAD;
            let mut r = Response::new(if head {
                Body::empty()
            } else {
                Body::from(Bytes::from_static(WATCH_JS.as_bytes()))
            });
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            h.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            );
            h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            h.insert(
                hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            with_route(r, "static")
        }
        (["v", token], &Method::GET | &Method::HEAD) => {
            let head = req.method() == Method::HEAD;
            let ua = req
                .headers()
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let client = super::client_ip(&req, &state.client_ip_header);
            with_route(
                show(service, token, head, ua.as_deref(), client, &lang).await,
                "confirm_page",
            )
        }
        (["v", token], &Method::POST) => {
            with_route(confirm(service, token, &lang).await, "confirm")
        }
        (["v", _], _) => {
            let mut r = page(
                service,
                StatusCode::METHOD_NOT_ALLOWED,
                Page::Invalid,
                &lang,
                None,
                None,
                false,
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST"),
            );
            with_route(r, "confirm_page")
        }
        _ => with_route(
            page(
                service,
                StatusCode::NOT_FOUND,
                Page::Invalid,
                &lang,
                None,
                None,
                false,
            ),
            "unmatched",
        ),
    }
}

/// The first language tag of `Accept-Language`, for pages shown before we know the
/// verification's locale.
fn accept_language(req: &Request<Incoming>) -> String {
    req.headers()
        .get(hyper::header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|t| t.split(';').next().unwrap_or_default().trim().to_string())
        .filter(|t| !t.is_empty() && t.len() <= 35)
        .unwrap_or_else(|| "en".into())
}

fn page(
    service: &Service,
    status: StatusCode,
    kind: Page,
    locale: &str,
    email: Option<&str>,
    action: Option<&str>,
    head: bool,
) -> Resp {
    let body = match service.templates().render_page(kind, locale, email, action) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot render page");
            "<!doctype html><title>Error</title><p>Something went wrong. Please try again.</p>"
                .into()
        }
    };
    let mut r = Response::new(if head {
        Body::empty()
    } else {
        Body::from(body)
    });
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"),
    );
    r
}

fn status_page(status: Status) -> (StatusCode, Page) {
    match status {
        Status::Pending => (StatusCode::OK, Page::Confirm),
        Status::Verified => (StatusCode::OK, Page::Verified),
        Status::Expired => (StatusCode::GONE, Page::Expired),
        Status::Superseded => (StatusCode::GONE, Page::Superseded),
        Status::Canceled | Status::Locked | Status::DeliveryFailed => {
            (StatusCode::GONE, Page::Closed)
        }
    }
}

async fn show(
    service: &Service,
    token: &str,
    head: bool,
    ua: Option<&str>,
    client: Option<std::net::IpAddr>,
    lang: &str,
) -> Resp {
    match service.link_view(token).await {
        Ok(LinkView::Invalid) => page(
            service,
            StatusCode::NOT_FOUND,
            Page::Invalid,
            lang,
            None,
            None,
            head,
        ),
        Ok(LinkView::Found {
            id,
            status,
            email,
            locale,
            ..
        }) => {
            let (code, kind) = status_page(status);
            if status == Status::Pending {
                service
                    .record_prefetch(id, if head { "HEAD" } else { "GET" }, ua, client)
                    .await;
            }
            // The form posts back to this very URL, whatever prefix an ingress added.
            let action = (kind == Page::Confirm).then_some(token);
            page(service, code, kind, &locale, Some(&email), action, head)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot show confirm page");
            page(
                service,
                StatusCode::INTERNAL_SERVER_ERROR,
                Page::Error,
                lang,
                None,
                None,
                head,
            )
        }
    }
}

/// Appends `verification` and `status` to the app's redirect URL.
fn redirect_to(base: &str, id: &str, status: Status) -> Option<String> {
    let mut u = url::Url::parse(base).ok()?;
    u.query_pairs_mut()
        .append_pair("verification", id)
        .append_pair("status", status.as_str());
    Some(u.to_string())
}

async fn confirm(service: &Service, token: &str, lang: &str) -> Resp {
    match service.confirm(token).await {
        Ok(LinkView::Invalid) => page(
            service,
            StatusCode::NOT_FOUND,
            Page::Invalid,
            lang,
            None,
            None,
            false,
        ),
        Ok(LinkView::Found {
            id,
            status,
            email,
            locale,
            redirect_url,
        }) => {
            if let Some(loc) = redirect_url.and_then(|u| redirect_to(&u, &id.to_string(), status))
                && let Ok(v) = HeaderValue::from_str(&loc)
            {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::SEE_OTHER;
                r.headers_mut().insert(LOCATION, v);
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r.headers_mut()
                    .insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
                return r;
            }
            let (code, kind) = status_page(status);
            // After a POST a pending status cannot happen; show the result page, not the form.
            let kind = if kind == Page::Confirm {
                Page::Error
            } else {
                kind
            };
            page(service, code, kind, &locale, Some(&email), None, false)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot confirm");
            page(
                service,
                StatusCode::INTERNAL_SERVER_ERROR,
                Page::Error,
                lang,
                None,
                None,
                false,
            )
        }
    }
}
