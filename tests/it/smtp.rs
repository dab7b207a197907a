//! The SMTP transport against in-process relays: outcomes, connection reuse, faults, TLS.
//! Every timeout is short ([`SHORT_MS`]) so fault tests finish quickly.

use std::time::{Duration, Instant};

use prometheus::Registry;
use verigate::config::SmtpTls;
use verigate::outbox::smtp::{SmtpConfig, SmtpMetrics, SmtpTransport};
use verigate::outbox::transport::{Outcome, OutgoingMail};

use crate::support::fake_smtp::{Captured, FakeSmtp, ScriptedSmtp, SelfSigned};

/// Connect, command and data timeout in these tests, in milliseconds.
const SHORT_MS: u64 = 300;
/// Upper bound for "failed within the timeout": the timeout plus scheduling slack.
const WITHIN: Duration = Duration::from_millis(SHORT_MS * 4);

/// A message whose body has lines starting with "." and "..", ending with CRLF.
const DOTTED: &[u8] = b"From: a@x.test\r\nTo: ok@x.test\r\nSubject: dots\r\n\r\n\
.leading dot\r\n..two dots\r\n.\r\nlast line\r\n";

fn config(port: u16) -> SmtpConfig {
    SmtpConfig {
        host: "127.0.0.1".into(),
        port,
        tls: SmtpTls::None,
        connect_timeout_ms: SHORT_MS,
        command_timeout_ms: SHORT_MS,
        data_timeout_ms: SHORT_MS,
        ..SmtpConfig::default()
    }
}

fn transport(cfg: &SmtpConfig) -> (SmtpTransport, SmtpMetrics) {
    let metrics = SmtpMetrics::register(&Registry::new()).expect("register metrics");
    let t = SmtpTransport::new(cfg, metrics.clone()).expect("transport");
    (t, metrics)
}

fn mail(to: &str) -> OutgoingMail {
    OutgoingMail {
        name: "msg_1".into(),
        envelope_from: "bounces@verigate.test".into(),
        envelope_to: to.into(),
        bytes: b"Subject: hi\r\n\r\nyour code is 123456\r\n".to_vec(),
    }
}

/// `got` is [`DOTTED`] from our envelope sender to `to`, byte for byte.
fn assert_dotted_arrived(got: &Captured, to: &str) {
    assert_eq!(got.from, "bounces@verigate.test");
    assert_eq!(got.to, [to]);
    assert_eq!(
        String::from_utf8_lossy(&got.data),
        String::from_utf8_lossy(DOTTED)
    );
}

fn class(m: &SmtpMetrics, class: &str) -> u64 {
    m.replies.with_label_values(&[class]).get()
}

fn reason(o: &Outcome) -> &str {
    match o {
        Outcome::Retry { reason, .. } | Outcome::Reject { reason } => reason,
        Outcome::Delivered => "",
    }
}

#[tokio::test]
async fn a_250_delivers_and_the_bytes_arrive_intact_dots_included() {
    let relay = FakeSmtp::new().start();
    let (t, m) = transport(&config(relay.port()));
    let out = t
        .send(OutgoingMail {
            bytes: DOTTED.to_vec(),
            ..mail("ok@x.test")
        })
        .await;
    assert_eq!(out, Outcome::Delivered);
    let got = relay.received().lock().expect("inbox").clone();
    assert_eq!(got.len(), 1);
    assert_dotted_arrived(&got[0], "ok@x.test");
    assert_eq!(class(&m, "2xx"), 1);
    assert_eq!(m.send_duration.get_sample_count(), 1);
}

#[tokio::test]
async fn a_451_at_rcpt_is_retried() {
    let relay = FakeSmtp::new().defer("slow@x.test", 451).start();
    let (t, m) = transport(&config(relay.port()));
    let out = t.send(mail("slow@x.test")).await;
    assert!(
        matches!(&out, Outcome::Retry { reason, after: None } if reason.contains("451")),
        "{out:?}"
    );
    assert_eq!(class(&m, "4xx"), 1);
    assert!(relay.messages().is_empty());
}

#[tokio::test]
async fn a_550_at_rcpt_is_rejected_with_the_reply_text() {
    let relay = FakeSmtp::new().reject("gone@x.test", 550).start();
    let (t, m) = transport(&config(relay.port()));
    let out = t.send(mail("gone@x.test")).await;
    assert_eq!(
        out,
        Outcome::Reject {
            reason: "RCPT TO: 550 5.1.1 no such user".into()
        }
    );
    assert_eq!(class(&m, "5xx"), 1);
}

#[tokio::test]
async fn two_sends_reuse_one_connection() {
    let relay = FakeSmtp::new().start();
    let (t, m) = transport(&config(relay.port()));
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.clone().send(mail("b@x.test")).await, Outcome::Delivered);
    assert_eq!(m.connections_opened.get(), 1);
    assert_eq!(relay.sessions(), 1);
    assert_eq!(relay.messages().len(), 2);
}

#[tokio::test]
async fn a_relay_offering_pipelining_gets_the_envelope_in_one_write() {
    // The relay answers MAIL and RCPT only once DATA has arrived: a client that waited for
    // each reply would time out here.
    let relay = ScriptedSmtp::new().pipelining().start().await;
    let (t, m) = transport(&config(relay.port()));
    for to in ["a@x.test", "b@x.test"] {
        let out = t
            .send(OutgoingMail {
                bytes: DOTTED.to_vec(),
                ..mail(to)
            })
            .await;
        assert_eq!(out, Outcome::Delivered, "{to}");
    }
    let got = relay.messages();
    assert_eq!(got.len(), 2);
    assert_dotted_arrived(&got[1], "b@x.test");
    assert_eq!(relay.connections(), 1);
    assert_eq!(class(&m, "2xx"), 2);
}

#[tokio::test]
async fn a_relay_without_pipelining_gets_one_command_at_a_time() {
    let relay = ScriptedSmtp::new().start().await;
    let (t, _m) = transport(&config(relay.port()));
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
    assert_eq!(relay.messages().len(), 2);
    assert_eq!(relay.unasked_pipelining(), 0);
}

#[tokio::test]
async fn a_pipelined_rejected_recipient_is_rejected_and_the_session_reset_and_reused() {
    let relay = ScriptedSmtp::new()
        .pipelining()
        .reject("gone@x.test", 550)
        .start()
        .await;
    let (t, m) = transport(&config(relay.port()));
    assert_eq!(
        t.send(mail("gone@x.test")).await,
        Outcome::Reject {
            reason: "RCPT TO: 550 5.1.1 no such user".into()
        }
    );
    assert_eq!(t.send(mail("ok@x.test")).await, Outcome::Delivered);
    assert_eq!(relay.connections(), 1);
    assert_eq!(m.connections_opened.get(), 1);
    assert!(relay.commands().iter().any(|c| c == "RSET"));
    let got = relay.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["ok@x.test"]);
}

#[tokio::test]
async fn a_relay_that_starts_data_after_refusing_the_recipient_loses_the_session() {
    // After 354 the relay reads a message; RSET would be taken as its first line. The
    // session is dropped instead, and the next mail goes out on a new one.
    let relay = ScriptedSmtp::new()
        .pipelining()
        .reject("gone@x.test", 550)
        .data_without_recipients()
        .start()
        .await;
    let (t, _m) = transport(&config(relay.port()));
    let started = Instant::now();
    assert_eq!(
        t.send(mail("gone@x.test")).await,
        Outcome::Reject {
            reason: "RCPT TO: 550 5.1.1 no such user".into()
        }
    );
    // A RSET would get no reply (the relay reads it as message text) until the command
    // timeout; dropping the session answers at once.
    assert!(
        started.elapsed() < Duration::from_millis(SHORT_MS),
        "the send waited {:?}: the session was reset, not dropped",
        started.elapsed()
    );
    assert_eq!(t.send(mail("ok@x.test")).await, Outcome::Delivered);
    assert_eq!(relay.connections(), 2);
    assert!(!relay.commands().iter().any(|c| c == "RSET"));
    assert_eq!(relay.messages().len(), 1);
}

#[tokio::test]
async fn a_rejected_recipient_is_reset_and_the_pooled_connection_delivers_the_next_mail() {
    let relay = FakeSmtp::new().reject("gone@x.test", 550).start();
    let (t, m) = transport(&config(relay.port()));
    assert!(matches!(
        t.send(mail("gone@x.test")).await,
        Outcome::Reject { .. }
    ));
    assert_eq!(t.send(mail("ok@x.test")).await, Outcome::Delivered);
    assert_eq!(m.connections_opened.get(), 1);
    assert_eq!(relay.sessions(), 1);
    let got = relay.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["ok@x.test"]);
}

#[tokio::test]
async fn a_failed_transaction_is_reset_before_its_session_is_reused() {
    let relay = ScriptedSmtp::new().reject("gone@x.test", 550).start().await;
    let (t, _) = transport(&config(relay.port()));
    assert!(matches!(
        t.send(mail("gone@x.test")).await,
        Outcome::Reject { .. }
    ));
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
    let verbs: Vec<String> = relay
        .commands()
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        verbs,
        [
            "EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"
        ],
        "RSET after the failure only; a delivered transaction needs none"
    );
    assert_eq!(relay.connections(), 1);
}

#[tokio::test]
async fn probe_is_true_against_a_live_relay() {
    let relay = FakeSmtp::new().start();
    let (t, m) = transport(&config(relay.port()));
    assert!(!t.has_reached_relay());
    assert!(t.probe().await);
    assert!(t.has_reached_relay());
    assert_eq!(m.connections_opened.get(), 1);
}

#[tokio::test]
async fn probe_is_false_against_a_closed_port_within_the_timeout() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (t, m) = transport(&config(port));
    let started = Instant::now();
    assert!(!t.probe().await);
    assert!(started.elapsed() < WITHIN, "{:?}", started.elapsed());
    assert!(!t.has_reached_relay());
    assert_eq!(m.connections_opened.get(), 0);
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (t, m) = transport(&config(port));
    let out = t.send(mail("ok@x.test")).await;
    assert!(
        reason(&out).starts_with(&format!("connecting to 127.0.0.1:{port}: connection error")),
        "{out:?}"
    );
    assert!(matches!(out, Outcome::Retry { .. }));
    assert_eq!(class(&m, "io"), 1);
}

#[tokio::test]
async fn a_relay_that_never_greets_is_retried_within_the_connect_timeout() {
    let relay = ScriptedSmtp::new().never_greet().start().await;
    let (t, m) = transport(&config(relay.port()));
    let started = Instant::now();
    let out = t.send(mail("ok@x.test")).await;
    let took = started.elapsed();
    assert!(matches!(out, Outcome::Retry { .. }), "{out:?}");
    assert!(reason(&out).contains("timed out"), "{out:?}");
    assert!(
        took >= Duration::from_millis(SHORT_MS) && took < WITHIN,
        "{took:?}"
    );
    assert_eq!(class(&m, "timeout"), 1);
    assert!(!t.probe().await);
}

#[tokio::test]
async fn a_connection_dropped_during_data_is_retried_and_not_reused() {
    let relay = ScriptedSmtp::new().drop_during_data().start().await;
    let (t, m) = transport(&config(relay.port()));
    let out = t.send(mail("ok@x.test")).await;
    assert!(
        matches!(&out, Outcome::Retry { reason, .. } if reason.starts_with("DATA: ")),
        "{out:?}"
    );
    assert_eq!(class(&m, "io") + class(&m, "protocol"), 1);
    assert!(matches!(
        t.send(mail("ok@x.test")).await,
        Outcome::Retry { .. }
    ));
    assert_eq!(
        relay.connections(),
        2,
        "the broken session must not be reused"
    );
    assert!(relay.messages().is_empty());
}

#[tokio::test]
async fn a_421_at_mail_is_retried_and_the_connection_dropped() {
    let relay = ScriptedSmtp::new().close_with_421_at_mail().start().await;
    let (t, m) = transport(&config(relay.port()));
    let out = t.send(mail("ok@x.test")).await;
    assert_eq!(
        out,
        Outcome::Retry {
            reason: "MAIL FROM: 421 4.4.2 closing".into(),
            after: None
        }
    );
    assert_eq!(class(&m, "4xx"), 1);
    assert!(matches!(
        t.send(mail("ok@x.test")).await,
        Outcome::Retry { .. }
    ));
    assert_eq!(relay.connections(), 2);
    assert_eq!(m.connections_opened.get(), 2);
}

#[tokio::test]
async fn a_pooled_session_the_relay_closed_is_replaced_within_the_same_send() {
    let relay = ScriptedSmtp::new().close_after_messages(1).start().await;
    let (t, m) = transport(&config(relay.port()));
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
    assert_eq!(relay.connections(), 2);
    assert_eq!(m.connections_opened.get(), 2);
    assert_eq!(relay.messages().len(), 2);
    assert_eq!(class(&m, "2xx"), 2);
}

#[tokio::test]
async fn an_idle_pooled_session_is_checked_with_noop_before_reuse() {
    let relay = ScriptedSmtp::new().start().await;
    let (t, m) = transport(&SmtpConfig {
        idle_timeout_ms: 0,
        ..config(relay.port())
    });
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
    assert_eq!(m.connections_opened.get(), 1);
    let cmds = relay.commands();
    let noop_at = cmds.iter().position(|c| c == "NOOP").expect("a NOOP");
    let second_mail = cmds
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with("MAIL"))
        .nth(1)
        .map(|(i, _)| i)
        .expect("two MAIL");
    assert!(noop_at < second_mail, "{cmds:?}");
}

#[tokio::test]
async fn with_a_pool_of_zero_every_send_opens_its_own_connection() {
    let relay = FakeSmtp::new().start();
    let (t, m) = transport(&SmtpConfig {
        pool_size: 0,
        ..config(relay.port())
    });
    assert_eq!(t.send(mail("a@x.test")).await, Outcome::Delivered);
    assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
    assert_eq!(m.connections_opened.get(), 2);
}

#[tokio::test]
async fn a_refused_password_is_retried_with_a_hint_for_the_operator() {
    let relay = ScriptedSmtp::new().refuse_auth().start().await;
    let (t, m) = transport(&SmtpConfig {
        username: Some("apikey".into()),
        password: Some("wrong".into()),
        ..config(relay.port())
    });
    let out = t.send(mail("ok@x.test")).await;
    assert!(matches!(out, Outcome::Retry { .. }), "{out:?}");
    assert!(reason(&out).contains("535 5.7.8"), "{out:?}");
    assert!(reason(&out).contains("smtp.password"), "{out:?}");
    assert_eq!(class(&m, "5xx"), 1);
    assert!(!t.probe().await);
}

#[tokio::test]
async fn credentials_are_sent_when_configured() {
    let relay = ScriptedSmtp::new().start().await;
    let (t, _) = transport(&SmtpConfig {
        username: Some("apikey".into()),
        password: Some("secret".into()),
        ..config(relay.port())
    });
    assert_eq!(t.send(mail("ok@x.test")).await, Outcome::Delivered);
    assert!(relay.commands().iter().any(|c| c == "AUTH PLAIN"));
}

#[tokio::test]
async fn starttls_with_a_self_signed_certificate_works_when_invalid_certs_are_accepted() {
    for pipelining in [false, true] {
        let mut relay = ScriptedSmtp::new().starttls(&SelfSigned::localhost());
        if pipelining {
            relay = relay.pipelining();
        }
        let relay = relay.start().await;
        let (t, m) = transport(&SmtpConfig {
            tls: SmtpTls::Starttls,
            accept_invalid_certs: true,
            ..config(relay.port())
        });
        let out = t
            .send(OutgoingMail {
                bytes: DOTTED.to_vec(),
                ..mail("ok@x.test")
            })
            .await;
        assert_eq!(out, Outcome::Delivered, "pipelining {pipelining}");
        assert_eq!(relay.messages()[0].data, DOTTED);
        assert!(relay.commands().iter().any(|c| c == "STARTTLS"));
        assert_eq!(t.send(mail("b@x.test")).await, Outcome::Delivered);
        assert_eq!(m.connections_opened.get(), 1, "TLS sessions are pooled too");
        // EHLO again inside TLS (RFC 3207): what was offered in clear text is forgotten.
        let ehlos = relay
            .commands()
            .iter()
            .filter(|c| c.starts_with("EHLO"))
            .count();
        assert_eq!(ehlos, 2);
        assert!(t.probe().await);
    }
}

#[tokio::test]
async fn starttls_with_a_self_signed_certificate_is_a_tls_retry_when_certificates_are_verified() {
    let relay = ScriptedSmtp::new()
        .starttls(&SelfSigned::localhost())
        .start()
        .await;
    let (t, m) = transport(&SmtpConfig {
        tls: SmtpTls::Starttls,
        ..config(relay.port())
    });
    let out = t.send(mail("ok@x.test")).await;
    assert!(matches!(out, Outcome::Retry { .. }), "{out:?}");
    assert!(reason(&out).contains("TLS error"), "{out:?}");
    assert_eq!(class(&m, "tls"), 1);
    assert!(relay.messages().is_empty());
}

#[tokio::test]
async fn starttls_required_but_not_offered_is_a_tls_retry() {
    let relay = ScriptedSmtp::new().start().await;
    let (t, m) = transport(&SmtpConfig {
        tls: SmtpTls::Starttls,
        accept_invalid_certs: true,
        ..config(relay.port())
    });
    let out = t.send(mail("ok@x.test")).await;
    assert!(reason(&out).contains("STARTTLS"), "{out:?}");
    assert!(matches!(out, Outcome::Retry { .. }));
    assert_eq!(class(&m, "tls"), 1);
    assert!(!relay.commands().iter().any(|c| c.starts_with("MAIL")));
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let relay = ScriptedSmtp::new()
        .implicit_tls(&SelfSigned::localhost())
        .start()
        .await;
    let (t, _) = transport(&SmtpConfig {
        tls: SmtpTls::Implicit,
        accept_invalid_certs: true,
        ..config(relay.port())
    });
    assert_eq!(t.send(mail("ok@x.test")).await, Outcome::Delivered);
    assert_eq!(relay.messages().len(), 1);
}

#[tokio::test]
async fn an_envelope_with_a_line_break_is_rejected_without_touching_the_relay() {
    let relay = ScriptedSmtp::new().start().await;
    let (t, m) = transport(&config(relay.port()));
    let out = t.send(mail("ok@x.test>\r\nRCPT TO:<evil@x.test")).await;
    assert!(matches!(out, Outcome::Reject { .. }), "{out:?}");
    assert_eq!(relay.connections(), 0);
    assert_eq!(m.connections_opened.get(), 0);
}

#[tokio::test]
async fn metrics_exist_from_the_start_without_the_daemon_prefix() {
    let registry = Registry::new();
    let _m = SmtpMetrics::register(&registry).expect("register");
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for n in [
        "smtp_connections_opened_total",
        "smtp_send_duration_seconds",
        "smtp_replies_total",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let replies = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "smtp_replies_total")
        .expect("replies");
    assert_eq!(replies.get_metric().len(), 7, "all classes pre-set to 0");
    assert!(
        SmtpMetrics::register(&registry).is_err(),
        "double registration"
    );
}
