//! The public, stable error shape of the HTTP API:
//! `{"error": {"code": "<stable_snake_case>", "message": "<for a person>", "field": "<optional>"}}`
//! plus named extras (e.g. `attempts_remaining`). Anything unexpected is logged with the request
//! id and answered with a generic 500: internal errors are never echoed.

use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value};

use crate::verification::service::Error as ServiceError;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// For a person.
    pub message: String,
    /// The request field at fault.
    pub field: Option<String>,
    /// Extra members of the error object.
    pub extra: Map<String, Value>,
    /// `Retry-After`, seconds.
    pub retry_after: Option<u64>,
}

/// The body of an error answer: `{"error": {...}}`.
#[derive(serde::Serialize)]
struct Shape<'a> {
    error: Inner<'a>,
}

#[derive(serde::Serialize)]
struct Inner<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

impl ApiError {
    /// An error with status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds an extra member.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// Sets `Retry-After`.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 500 with a generic message; the cause must already be logged.
    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Something went wrong on our side. Try again; if it persists, tell the operator the request id.",
        )
    }

    /// The JSON response.
    pub fn into_response(self) -> super::Resp {
        let body = self.body();
        let mut r = Response::new(super::Body::from(body));
        *r.status_mut() = self.status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }

    /// The JSON text of the answer.
    fn body(&self) -> String {
        let shape = Shape {
            error: Inner {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
                extra: &self.extra,
            },
        };
        // Strings and JSON values only: serializing cannot fail, but a failure still answers
        // in the same shape.
        serde_json::to_string(&shape).unwrap_or_else(|_| {
            r#"{"error":{"code":"internal","message":"Something went wrong on our side."}}"#
                .to_owned()
        })
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use ServiceError as E;
        match e {
            E::InvalidField { field, message } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message).with_field(field)
            }
            E::InvalidEmail(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_email", m).with_field("email")
            }
            E::InvalidRedirect(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_redirect_url", m)
                    .with_field("redirect_url")
            }
            E::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such verification.")
            }
            E::Expired => ApiError::new(
                StatusCode::GONE,
                "expired",
                "This verification has expired. Start a new one.",
            ),
            E::Locked => ApiError::new(
                StatusCode::LOCKED,
                "locked",
                "Too many wrong codes. Start a new verification.",
            ),
            E::InvalidCode { remaining } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_code",
                "The code is not correct.",
            )
            .with_field("code")
            .with("attempts_remaining", Value::from(remaining)),
            E::Closed(s) => {
                let (code, msg) = match s {
                    crate::verification::Status::Superseded => (
                        "superseded",
                        "A newer verification replaced this one; use the newest code or link.",
                    ),
                    crate::verification::Status::Canceled => {
                        ("canceled", "This verification was canceled.")
                    }
                    crate::verification::Status::Verified => {
                        ("verified", "This verification is already verified.")
                    }
                    crate::verification::Status::Locked => ("locked", "Too many wrong codes."),
                    crate::verification::Status::DeliveryFailed => (
                        "delivery_failed",
                        "The email could not be delivered; start a new verification.",
                    ),
                    crate::verification::Status::Expired => {
                        ("expired", "This verification has expired.")
                    }
                    crate::verification::Status::Pending => {
                        ("pending", "This verification is still pending.")
                    }
                };
                let status = match s {
                    crate::verification::Status::Locked => StatusCode::LOCKED,
                    crate::verification::Status::Expired => StatusCode::GONE,
                    _ => StatusCode::CONFLICT,
                };
                ApiError::new(status, code, msg)
            }
            E::NoCode => ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_code",
                "This verification was sent as a link and has no code.",
            ),
            E::IdempotencyConflict => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "This Idempotency-Key was already used with a different request body.",
            ),
            E::UndeliverableDomain { reason, message } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "undeliverable_domain",
                message,
            )
            .with_field("email")
            .with("reason", Value::from(reason)),
            E::DisposableDomain => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "disposable_domain",
                "Addresses at disposable email domains are not accepted. Use a permanent address.",
            )
            .with_field("email"),
            E::RateLimited {
                limit,
                retry_after_secs,
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("Too many requests ({limit}). Retry in {retry_after_secs} seconds."),
            )
            .with("limit", Value::from(limit))
            .with_retry_after(retry_after_secs),
            E::UnreadableEntry => ApiError::new(
                StatusCode::CONFLICT,
                "unreadable_entry",
                "This outbox entry cannot be decoded, so it cannot be retried; drop it instead (the server log has the cause).",
            ),
            E::Store(e) => {
                tracing::error!(error = %e, "store failure");
                ApiError::internal()
            }
            E::Crypto => {
                tracing::error!("random source or cipher failure");
                ApiError::internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_code_message_field_and_extras_in_one_error_object() {
        let e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_code", "Wrong code.")
            .with_field("code")
            .with("attempts_remaining", Value::from(4));
        let v: Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "code": "invalid_code",
                "message": "Wrong code.",
                "field": "code",
                "attempts_remaining": 4,
            }})
        );
    }

    #[test]
    fn the_body_has_no_field_member_when_no_field_is_at_fault() {
        let v: Value = serde_json::from_str(&ApiError::internal().body()).unwrap();
        let error = v["error"].as_object().unwrap();
        assert_eq!(error.len(), 2, "{error:?}");
        assert_eq!(error["code"], "internal");
    }
}
