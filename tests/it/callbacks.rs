//! Callback delivery against a real receiver that verifies every request with the
//! `standardwebhooks` crate. Timestamps are the real current time because that library checks
//! them against its own clock (±5 min).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use verigate::callbacks::dispatch::RESPONSE_EXCERPT_BYTES;
use verigate::callbacks::{CallbackConfig, CallbackSender, Signer, WebhookSecret};
use verigate::outbox::transport::Outcome;

use crate::support::webhook_sink::WebhookSink;

/// The app's current secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The app's next secret, during a rotation.
const NEXT_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// A secret verigate does not have.
const OTHER_SECRET: &str = "whsec_dW5yZWxhdGVkLXNlY3JldC1rZXktMzItYnl0ZXMh";

const WEBHOOK_ID: &str = "msg_01JD0000000000000000000000";
const BODY: &[u8] = br#"{"type":"verification.verified","timestamp":"2026-11-22T10:10:00Z","data":{"id":"ver_01JD0000000000000000000000","email":"a@example.test"}}"#;

/// Timeout for tests whose receiver answers at once: generous, so a slow CI machine does not
/// turn a delivery into a timeout.
const TIMEOUT_MS: u64 = 10_000;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn config(timeout_ms: u64) -> CallbackConfig {
    CallbackConfig {
        timeout_ms,
        ..CallbackConfig::default()
    }
}

fn sender() -> CallbackSender {
    CallbackSender::new(&config(TIMEOUT_MS)).expect("sender")
}

fn signer(secrets: &[&str]) -> Signer {
    let secrets = secrets
        .iter()
        .map(|s| WebhookSecret::parse(s).expect("test secret"))
        .collect();
    Signer::try_new(secrets).expect("signer")
}

#[tokio::test]
async fn a_2xx_answer_is_delivered_and_the_receiver_verifies_the_signature() {
    let sink = WebhookSink::new(SECRET).respond_with(200).start().await;
    let now = now_secs();

    let outcome = sender()
        .send(&sink.url(), WEBHOOK_ID, BODY, &signer(&[SECRET]), now)
        .await;

    assert_eq!(outcome, Outcome::Delivered);
    let got = sink.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert!(r.verified, "receiver rejected it: {:?}", r.verify_error);
    assert_eq!(r.webhook_id, WEBHOOK_ID);
    assert_eq!(r.timestamp, Some(now));
    assert_eq!(r.body, BODY);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(
        r.user_agent,
        concat!("verigate/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(r.signature.split(' ').count(), 1);
}

#[tokio::test]
async fn a_500_is_retried_and_the_retry_keeps_the_id_with_a_fresh_timestamp() {
    let sink = WebhookSink::new(SECRET).respond([500, 200]).start().await;
    let sender = sender();
    let signer = signer(&[SECRET]);
    let first_at = now_secs();
    let second_at = first_at + 2;

    let first = sender
        .send(&sink.url(), WEBHOOK_ID, BODY, &signer, first_at)
        .await;
    let second = sender
        .send(&sink.url(), WEBHOOK_ID, BODY, &signer, second_at)
        .await;

    assert!(
        matches!(&first, Outcome::Retry { reason, after: None } if reason.contains("500")),
        "{first:?}"
    );
    assert_eq!(second, Outcome::Delivered);
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.webhook_id == WEBHOOK_ID));
    assert_eq!(got[0].timestamp, Some(first_at));
    assert_eq!(got[1].timestamp, Some(second_at));
    assert_ne!(got[0].signature, got[1].signature);
    assert!(got.iter().all(|r| r.verified), "{got:?}");
}

#[tokio::test]
async fn gone_stops_retries() {
    let sink = WebhookSink::new(SECRET).respond_with(410).start().await;

    let outcome = sender()
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert!(
        matches!(&outcome, Outcome::Reject { reason } if reason.contains("410")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_its_location_is_never_fetched() {
    let sink = WebhookSink::new(SECRET).redirect().start().await;

    let outcome = sender()
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert!(
        matches!(&outcome, Outcome::Retry { reason, after: None }
            if reason.contains("302") && reason.contains("not followed")),
        "{outcome:?}"
    );
    assert_eq!(sink.received().len(), 1);
    assert_eq!(sink.moved_hits(), 0);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let sink = WebhookSink::new(SECRET)
        .respond_with(429)
        .retry_after("7")
        .start()
        .await;

    let outcome = sender()
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert!(
        matches!(&outcome, Outcome::Retry { after: Some(d), .. } if *d == Duration::from_secs(7)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_receiver_that_hangs_is_retried_once_the_timeout_passes() {
    let sink = WebhookSink::new(SECRET).hang().start().await;
    let sender = CallbackSender::new(&config(300)).expect("sender");
    let started = Instant::now();

    let outcome = sender
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Outcome::Retry {
            reason: "no response within 300ms".to_string(),
            after: None
        }
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(sink.received().len(), 1, "the request itself got through");
}

#[tokio::test]
async fn during_rotation_a_receiver_holding_either_secret_accepts() {
    let old = WebhookSink::new(SECRET).start().await;
    let new = WebhookSink::new(NEXT_SECRET).start().await;
    let stranger = WebhookSink::new(OTHER_SECRET).start().await;
    let sender = sender();
    let signer = signer(&[SECRET, NEXT_SECRET]);
    let now = now_secs();

    for sink in [&old, &new, &stranger] {
        let outcome = sender
            .send(&sink.url(), WEBHOOK_ID, BODY, &signer, now)
            .await;
        assert_eq!(outcome, Outcome::Delivered);
    }

    let old = &old.received()[0];
    let new = &new.received()[0];
    let stranger = &stranger.received()[0];
    assert_eq!(old.signature.split(' ').count(), 2, "{}", old.signature);
    assert!(
        old.signature.split(' ').all(|s| s.starts_with("v1,")),
        "{}",
        old.signature
    );
    assert!(old.verified, "{:?}", old.verify_error);
    assert!(new.verified, "{:?}", new.verify_error);
    // Negative control: the verifier is not vacuous.
    assert!(!stranger.verified);
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };

    let outcome = sender()
        .send(
            &format!("http://127.0.0.1:{port}/webhook"),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert!(
        matches!(&outcome, Outcome::Retry { reason, after: None }
            if reason.to_lowercase().contains("connection refused")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn only_a_short_excerpt_of_an_error_page_is_kept() {
    let sink = WebhookSink::new(SECRET)
        .respond_with(500)
        .response_body(vec![b'x'; 200_000])
        .start()
        .await;

    let outcome = sender()
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    let Outcome::Retry { reason, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.contains(&"x".repeat(RESPONSE_EXCERPT_BYTES)),
        "{reason}"
    );
    assert!(
        !reason.contains(&"x".repeat(RESPONSE_EXCERPT_BYTES + 1)),
        "excerpt not cut"
    );
}

#[tokio::test]
async fn https_to_a_trusted_receiver_is_delivered() {
    let sink = WebhookSink::new(SECRET).tls().start().await;
    let sender = CallbackSender::with_root_certificates(&config(TIMEOUT_MS), sink.root_store())
        .expect("sender");
    assert!(sink.url().starts_with("https://"));

    let outcome = sender
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert_eq!(outcome, Outcome::Delivered);
    assert!(sink.received()[0].verified);
}

#[tokio::test]
async fn https_to_an_untrusted_certificate_is_retried() {
    let sink = WebhookSink::new(SECRET).tls().start().await;

    // The system store does not know the sink's self-signed certificate.
    let outcome = sender()
        .send(
            &sink.url(),
            WEBHOOK_ID,
            BODY,
            &signer(&[SECRET]),
            now_secs(),
        )
        .await;

    assert!(
        matches!(&outcome, Outcome::Retry { reason, after: None } if reason.contains("certificate")),
        "{outcome:?}"
    );
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn an_unusable_url_is_retried_without_sending() {
    let sink = WebhookSink::new(SECRET).start().await;
    let url = sink.url().replacen("http://", "ftp://", 1);

    let outcome = sender()
        .send(&url, WEBHOOK_ID, BODY, &signer(&[SECRET]), now_secs())
        .await;

    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("http://")),
        "{outcome:?}"
    );
    assert!(sink.received().is_empty());
}
