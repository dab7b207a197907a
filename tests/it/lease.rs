//! Outbox leases against a slow relay: a claim's lease is renewed when its attempt starts (so a
//! batch of slow sends does not outlast the leases of its own entries), claims not started
//! are released when the daemon stops, and the outcome of an attempt whose lease ran out does
//! not overwrite the outcome of the attempt that claimed the entry after it.
//!
//! The relay moves the daemon's clock while a message is in flight: persisted due times (and
//! so leases) run on that clock, and the tests stay fast.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use tokio::sync::Notify;
use verigate::clock::ManualClock;

use crate::support::app::{KEY, SIGNING_K1, TestApp, start};
use crate::support::fake_smtp::{ScriptedHandle, ScriptedSmtp};

/// `delivery.lease_seconds` in these tests. It is above the floor the smtp timeouts below set
/// (1 s connect + 5 s data + 9 x 1 s commands + 5 s), so the lease is exactly this.
const LEASE: Duration = Duration::from_secs(60);
/// How long a relay-side wait for the test may last before the relay answers anyway.
const GATE_LIMIT: Duration = Duration::from_secs(10);

fn config(port: u16, delivery: &str) -> String {
    format!(
        "[delivery]\ntransport = \"smtp\"\nready_requires_transport = false\nlease_seconds = {lease}\n{delivery}\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nhelo_name = \"verigate.test\"\nconnect_timeout_ms = 1000\ncommand_timeout_ms = 1000\ndata_timeout_ms = 5000\n",
        lease = LEASE.as_secs(),
    )
}

async fn spawn(relay: &ScriptedHandle, delivery: &str, clock: ManualClock) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    start(dir, &[SIGNING_K1], &config(relay.port(), delivery), clock).await
}

/// A relay that answers the data of its `i`-th message with `answer(i, clock, go)`: the test's
/// clock and gate, so an answer can move the daemon's time or wait for the test.
async fn relay<F, Fut>(clock: &ManualClock, go: &Arc<Notify>, answer: F) -> ScriptedHandle
where
    F: Fn(usize, ManualClock, Arc<Notify>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = u16> + Send + 'static,
{
    let (clock, go) = (clock.clone(), go.clone());
    ScriptedSmtp::new()
        .on_message(move |i| answer(i, clock.clone(), go.clone()))
        .start()
        .await
}

/// Waits until the test opens the gate (bounded by [`GATE_LIMIT`]).
async fn gate(go: &Notify) {
    let _ = tokio::time::timeout(GATE_LIMIT, go.notified()).await;
}

async fn create(app: &TestApp, email: &str) -> String {
    let r = app.create(json!({ "email": email })).await;
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_string()
}

/// Polls `probe` until `pred` holds (bounded).
async fn wait_for<T: std::fmt::Debug, F: Future<Output = T>>(
    mut probe: impl FnMut() -> F,
    pred: impl Fn(&T) -> bool,
) -> T {
    let mut last = None;
    for _ in 0..400 {
        let v = probe().await;
        if pred(&v) {
            return v;
        }
        last = Some(v);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached; last: {last:?}");
}

/// `verigate_outbox_attempts_total{lane="email",outcome}`.
fn email_attempts(app: &TestApp, outcome: &str) -> u64 {
    let prefix = format!("verigate_outbox_attempts_total{{lane=\"email\",outcome=\"{outcome}\"}} ");
    app.running()
        .service
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {prefix}"))
}

/// The state of the only email entry of the outbox.
async fn email_entry(app: &TestApp) -> Value {
    let list = app
        .api_call(Method::GET, "/admin/v1/outbox", KEY, None)
        .await
        .json();
    let entries = list["entries"].as_array().expect("entries").clone();
    let mut mail = entries.into_iter().filter(|e| e["kind"] == "email");
    let entry = mail.next().expect("an email entry");
    assert!(mail.next().is_none(), "one email entry");
    entry
}

/// A pass claims every due entry (up to 64) in one write, leasing each for `lease_seconds` from
/// then, and then waits for a delivery slot per entry. With one slot and sends that each take
/// 25 s of the daemon's clock, the entries late in a batch are past their lease before their
/// turn comes. Before the fix the next pass claimed the last one again while its first send
/// ran, and the mail went out twice; now an attempt renews its claim's lease as it starts.
#[tokio::test]
async fn each_mail_goes_out_once_when_a_batch_of_slow_sends_outlasts_the_lease() {
    const MAILS: usize = 8;
    const SEND: Duration = Duration::from_secs(25);
    let clock = ManualClock::new();
    let go = Arc::new(Notify::new());
    let relay = relay(&clock, &go, |i, clock, go| async move {
        // The first message waits until every verification exists, so the rest are due
        // together while it holds the only slot.
        if i == 0 {
            gate(&go).await;
        }
        clock.advance(SEND);
        tokio::time::sleep(Duration::from_millis(100)).await;
        250
    })
    .await;
    assert!(
        SEND < LEASE && SEND * 3 > LEASE,
        "one send fits in a lease; a batch of four does not"
    );
    let mut app = spawn(&relay, "workers = 1", clock).await;
    let mut ids = Vec::new();
    for n in 0..MAILS {
        ids.push(create(&app, &format!("m{n}@example.com")).await);
    }
    go.notify_one();
    for id in &ids {
        let v = wait_for(
            || async { app.get(id).await.json() },
            |v| v["delivery"]["status"] == "sent",
        )
        .await;
        assert_eq!(v["delivery"]["attempts"], 1, "claimed once: {v}");
    }
    assert_eq!(email_attempts(&app, "delivered"), MAILS as u64);
    assert_eq!(email_attempts(&app, "stale"), 0);
    // Stopping waits for deliveries in flight: a second copy would be at the relay by now.
    app.stop().await;
    let mut to: Vec<String> = relay.messages().into_iter().flat_map(|m| m.to).collect();
    to.sort();
    let mut want: Vec<String> = (0..MAILS).map(|n| format!("m{n}@example.com")).collect();
    want.sort();
    assert_eq!(to, want, "every mail exactly once");
}

/// Entries claimed in a batch but not started when the daemon stops are released: due again
/// at once, their attempt uncounted. Without that, a restart would wait out their leases (the
/// manual clock here never gets there).
#[tokio::test]
async fn entries_claimed_but_not_started_are_released_when_the_daemon_stops() {
    let clock = ManualClock::new();
    let go = Arc::new(Notify::new());
    let relay = relay(&clock, &go, |i, _, go| async move {
        if i == 0 {
            gate(&go).await;
        }
        250
    })
    .await;
    let mut app = spawn(&relay, "workers = 1", clock.clone()).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(create(&app, &format!("r{n}@example.com")).await);
    }
    // The first mail holds the only slot at the relay; the second is claimed behind it (the
    // pass waits for the slot, so the third is not claimed yet).
    wait_for(
        || async {
            let list = app
                .api_call(Method::GET, "/admin/v1/outbox", KEY, None)
                .await
                .json();
            list["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter(|e| e["kind"] == "email" && e["attempts"] == 1)
                .count()
        },
        |n| *n == 2,
    )
    .await;
    let gate = go.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.notify_one();
    });
    app.stop().await;
    assert_eq!(
        relay.messages().len(),
        1,
        "only the mail in flight went out"
    );
    let app = start(
        app.dir.clone(),
        &[SIGNING_K1],
        &config(relay.port(), "workers = 1"),
        clock,
    )
    .await;
    for id in &ids {
        let v = wait_for(
            || async { app.get(id).await.json() },
            |v| v["delivery"]["status"] == "sent",
        )
        .await;
        assert_eq!(
            v["delivery"]["attempts"], 1,
            "the released claim is not an attempt: {v}"
        );
    }
    assert_eq!(relay.messages().len(), 3);
}

/// One verification whose first attempt stalls at the relay past its lease (the relay moves
/// the clock 120 s while it holds its reply to the data): the entry is claimed and sent
/// again, the relay answers that second attempt with `second` at once, and only once the
/// daemon has recorded that outcome does it answer the first attempt with `first`. Returns
/// when both outcomes have been dealt with.
async fn first_attempt_answered_after_the_second(
    first: u16,
    second: u16,
) -> (TestApp, ScriptedHandle, String) {
    let clock = ManualClock::new();
    let go = Arc::new(Notify::new());
    let relay = relay(&clock, &go, move |i, clock, go| async move {
        if i > 0 {
            return second;
        }
        clock.advance(LEASE * 2);
        gate(&go).await;
        first
    })
    .await;
    // Two slots, so the second claim need not wait for the stalled attempt; a retry waits
    // far longer than the test.
    let app = spawn(&relay, "workers = 2\nretry_base_ms = 600000", clock).await;
    let id = create(&app, "late@example.com").await;
    let after_second = if (200..300).contains(&second) {
        "sent"
    } else {
        "retrying"
    };
    wait_for(
        || async { app.get(&id).await.json() },
        |v| v["delivery"]["status"] == after_second && v["delivery"]["attempts"] == 2,
    )
    .await;
    go.notify_one();
    wait_for(
        || async {
            ["delivered", "retry", "failed", "stale"]
                .map(|o| email_attempts(&app, o))
                .iter()
                .sum::<u64>()
        },
        |n| *n == 2,
    )
    .await;
    (app, relay, id)
}

#[tokio::test]
async fn a_late_retry_of_a_stalled_attempt_does_not_undo_the_newer_delivery() {
    let (app, relay, id) = first_attempt_answered_after_the_second(451, 250).await;
    let v = app.get(&id).await.json();
    assert_eq!(v["delivery"]["status"], "sent", "{v}");
    assert_eq!(v["delivery"]["attempts"], 2, "{v}");
    assert_eq!(v["status"], "pending", "{v}");
    assert_eq!(email_entry(&app).await["state"], "delivered");
    assert_eq!(email_attempts(&app, "stale"), 1, "the 451 was dropped");
    assert_eq!(email_attempts(&app, "retry"), 0);
    assert_eq!(email_attempts(&app, "delivered"), 1);
    assert_eq!(relay.messages().len(), 1, "one accepted copy");
}

#[tokio::test]
async fn a_late_rejection_of_a_stalled_attempt_does_not_fail_a_verification_whose_mail_went_out() {
    let (app, _relay, id) = first_attempt_answered_after_the_second(554, 250).await;
    let v = app.get(&id).await.json();
    assert_eq!(v["status"], "pending", "not delivery_failed: {v}");
    assert_eq!(v["delivery"]["status"], "sent", "{v}");
    assert_eq!(email_entry(&app).await["state"], "delivered");
    assert_eq!(email_attempts(&app, "stale"), 1, "the 554 was dropped");
    assert_eq!(email_attempts(&app, "failed"), 0);
}

#[tokio::test]
async fn a_late_delivery_of_a_stalled_attempt_still_completes_an_entry_waiting_for_a_retry() {
    let (app, relay, id) = first_attempt_answered_after_the_second(250, 451).await;
    let v = app.get(&id).await.json();
    assert_eq!(v["delivery"]["status"], "sent", "{v}");
    let entry = email_entry(&app).await;
    assert_eq!(entry["state"], "delivered", "no further copy: {entry}");
    assert_eq!(email_attempts(&app, "delivered"), 1);
    assert_eq!(email_attempts(&app, "retry"), 1);
    assert_eq!(email_attempts(&app, "stale"), 0);
    assert_eq!(relay.messages().len(), 1);
}
