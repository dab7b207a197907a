use super::*;

fn reply(code: u16, esc: [u8; 3], text: &str) -> Response<String> {
    Response::new(code, esc[0], esc[1], esc[2], text.to_string())
}

fn retry(reason: &str) -> Outcome {
    Outcome::Retry {
        reason: reason.into(),
        after: None,
    }
}

/// Reply code, enhanced status code, text → outcome, metric class, session fate.
type ReplyCase = (u16, [u8; 3], &'static str, Outcome, ReplyClass, SessionFate);

#[test]
fn replies_are_classified_by_their_first_digit_with_the_text_kept() {
    use SessionFate::{Broken, Reusable};
    let table: [ReplyCase; 8] = [
        (
            250,
            [2, 0, 0],
            "queued",
            Outcome::Delivered,
            ReplyClass::Positive,
            Reusable,
        ),
        (
            451,
            [4, 3, 0],
            "try later",
            retry("451 4.3.0 try later"),
            ReplyClass::Transient,
            Reusable,
        ),
        (
            421,
            [4, 4, 2],
            "closing",
            retry("421 4.4.2 closing"),
            ReplyClass::Transient,
            Broken,
        ),
        (
            550,
            [5, 1, 1],
            "no such user",
            Outcome::Reject {
                reason: "550 5.1.1 no such user".into(),
            },
            ReplyClass::Permanent,
            Reusable,
        ),
        (
            554,
            [0, 0, 0],
            "no",
            Outcome::Reject {
                reason: "554 no".into(),
            },
            ReplyClass::Permanent,
            Reusable,
        ),
        (
            535,
            [5, 7, 8],
            "bad credentials",
            retry(
                "535 5.7.8 bad credentials (an AUTH problem: check smtp.username, smtp.password and smtp.tls)",
            ),
            ReplyClass::Permanent,
            Reusable,
        ),
        (
            354,
            [0, 0, 0],
            "go on",
            retry("unexpected reply 354 go on"),
            ReplyClass::Protocol,
            Broken,
        ),
        (
            199,
            [0, 0, 0],
            "",
            retry("unexpected reply 199"),
            ReplyClass::Protocol,
            Broken,
        ),
    ];
    for (code, esc, text, outcome, class, session) in table {
        let v = reply_verdict(&reply(code, esc, text));
        assert_eq!(
            (v.outcome, v.class, v.session, v.code),
            (outcome, class, session, Some(code)),
            "{code}"
        );
    }
}

#[test]
fn errors_are_classified_and_connection_failures_break_the_session() {
    use mail_send::Error as E;
    use std::io;
    let cases: Vec<(E, &str, ReplyClass, SessionFate)> = vec![
        (
            E::Timeout,
            "retry",
            ReplyClass::Timeout,
            SessionFate::Broken,
        ),
        (
            E::Io(io::Error::from(io::ErrorKind::ConnectionRefused)),
            "retry",
            ReplyClass::Io,
            SessionFate::Broken,
        ),
        (
            E::Io(io::Error::from(io::ErrorKind::ConnectionReset)),
            "retry",
            ReplyClass::Io,
            SessionFate::Broken,
        ),
        (
            E::Tls(Box::new(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))),
            "retry",
            ReplyClass::Tls,
            SessionFate::Broken,
        ),
        (
            E::InvalidTLSName,
            "retry",
            ReplyClass::Tls,
            SessionFate::Broken,
        ),
        (
            E::MissingStartTls,
            "retry",
            ReplyClass::Tls,
            SessionFate::Broken,
        ),
        (
            E::UnparseableReply,
            "retry",
            ReplyClass::Protocol,
            SessionFate::Broken,
        ),
        (
            E::Auth(mail_send::smtp::auth::Error::InvalidChallenge),
            "retry",
            ReplyClass::Protocol,
            SessionFate::Broken,
        ),
        (
            E::UnsupportedAuthMechanism,
            "retry",
            ReplyClass::Protocol,
            SessionFate::Broken,
        ),
        (
            E::MissingCredentials,
            "retry",
            ReplyClass::Protocol,
            SessionFate::Broken,
        ),
        (
            E::AuthenticationFailed(reply(535, [5, 7, 8], "no")),
            "retry",
            ReplyClass::Permanent,
            SessionFate::Broken,
        ),
        (
            E::AuthenticationFailed(reply(454, [4, 7, 0], "later")),
            "retry",
            ReplyClass::Transient,
            SessionFate::Broken,
        ),
        (
            E::UnexpectedReply(reply(550, [5, 1, 1], "no such user")),
            "reject",
            ReplyClass::Permanent,
            SessionFate::Reusable,
        ),
        (
            E::UnexpectedReply(reply(452, [4, 5, 3], "too many")),
            "retry",
            ReplyClass::Transient,
            SessionFate::Reusable,
        ),
        (
            E::UnexpectedReply(reply(250, [2, 0, 0], "ok")),
            "retry",
            ReplyClass::Protocol,
            SessionFate::Broken,
        ),
        (
            E::MissingRcptTo,
            "reject",
            ReplyClass::Protocol,
            SessionFate::Reusable,
        ),
        (
            E::MissingMailFrom,
            "reject",
            ReplyClass::Protocol,
            SessionFate::Reusable,
        ),
    ];
    for (error, kind, class, session) in cases {
        let v = verdict(&error);
        let got = match &v.outcome {
            Outcome::Delivered => "delivered",
            Outcome::Retry { after: None, .. } => "retry",
            Outcome::Retry { after: Some(_), .. } => "retry-after",
            Outcome::Reject { .. } => "reject",
        };
        assert_eq!((got, v.class, v.session), (kind, class, session), "{error}");
        assert_eq!(classify(&error), v.outcome);
    }
}

#[test]
fn a_rejection_keeps_the_relays_words_for_the_operator() {
    let e = mail_send::Error::UnexpectedReply(reply(550, [5, 1, 1], "no such user"));
    assert_eq!(
        verdict(&e).at(Stage::RcptTo).outcome,
        Outcome::Reject {
            reason: "RCPT TO: 550 5.1.1 no such user".into()
        }
    );
    assert_eq!(
        classify_reply(&reply(550, [5, 1, 1], "no such user")),
        Outcome::Reject {
            reason: "550 5.1.1 no such user".into()
        }
    );
}

#[test]
fn long_or_multi_line_reply_text_is_flattened_and_cut() {
    let text = format!("line one\nline\rtwo {}", "x".repeat(2 * MAX_REASON_CHARS));
    let d = describe_reply(&reply(550, [5, 7, 1], &text));
    assert!(d.starts_with("550 5.7.1 line one line two x"), "{d}");
    assert!(!d.contains(['\r', '\n']));
    assert!(d.chars().count() <= MAX_REASON_CHARS + "550 5.7.1 ".len());
}

#[test]
fn the_data_block_is_dot_stuffed_and_terminated_once() {
    // The final CRLF of the message is the start of the terminator, not an extra empty line.
    assert_eq!(data_block(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n");
    assert_eq!(data_block(b"a\r\nb"), b"a\r\nb\r\n.\r\n");
    assert_eq!(data_block(b""), b"\r\n.\r\n");
    // A dot that starts a line gets another, the first line included; other dots stay.
    assert_eq!(
        data_block(b".a\r\n..b\r\nc.d\r\n.\r\ne"),
        b"..a\r\n...b\r\nc.d\r\n..\r\ne\r\n.\r\n"
    );
    // A message that is only a dot line cannot end the data early.
    assert_eq!(data_block(b".\r\n"), b"..\r\n.\r\n");
}

#[test]
fn envelope_addresses_that_could_inject_commands_are_refused() {
    let m = |from: &str, to: &str| OutgoingMail {
        name: "m".into(),
        envelope_from: from.into(),
        envelope_to: to.into(),
        bytes: vec![],
    };
    assert_eq!(envelope_problem(&m("a@x.test", "b@y.test")), None);
    assert_eq!(
        envelope_problem(&m("", "b@y.test")),
        None,
        "null sender is allowed"
    );
    assert!(envelope_problem(&m("a@x.test", "b@y.test>\r\nDATA")).is_some());
    assert!(envelope_problem(&m("a@x.test\n", "b@y.test")).is_some());
    assert!(envelope_problem(&m("a@x.test", "")).is_some());
    let reason = envelope_problem(&m("a@x.test", "zhang<@y.test")).unwrap_or_default();
    assert!(
        reason.contains("z***@y.test") && !reason.contains("zhang"),
        "{reason}"
    );
}

#[test]
fn the_config_has_documented_defaults() {
    let c: SmtpConfig = serde_json::from_str("{}").expect("empty config");
    assert_eq!(c.host, "localhost");
    assert_eq!(c.port, 587);
    assert_eq!(c.tls, SmtpTls::Starttls);
    assert_eq!((c.username, c.password, c.helo_name), (None, None, None));
    assert_eq!(
        (
            c.connect_timeout_ms,
            c.command_timeout_ms,
            c.data_timeout_ms
        ),
        (10_000, 30_000, 60_000)
    );
    assert_eq!((c.pool_size, c.idle_timeout_ms), (4, 30_000));
    assert!(!c.accept_invalid_certs);
}

#[test]
fn the_longest_send_adds_up_every_timeout_one_send_can_run_into() {
    let d = SmtpConfig::default();
    // 10 s connect + 60 s data + (4 NOOPs + dead MAIL FROM + MAIL + RCPT + DATA + RSET) x 30 s.
    assert_eq!(d.longest_send(), Duration::from_secs(340));
    let c = SmtpConfig {
        connect_timeout_ms: 1_000,
        command_timeout_ms: 100,
        data_timeout_ms: 2_000,
        pool_size: 0,
        ..SmtpConfig::default()
    };
    assert_eq!(c.longest_send(), Duration::from_millis(3_500));
    let huge = SmtpConfig {
        connect_timeout_ms: u64::MAX,
        command_timeout_ms: u64::MAX,
        pool_size: usize::MAX,
        ..SmtpConfig::default()
    };
    assert_eq!(
        huge.longest_send(),
        Duration::from_millis(u64::MAX),
        "saturates"
    );
}

#[test]
fn an_unknown_config_key_is_an_error_that_names_it() {
    let e = serde_json::from_str::<SmtpConfig>(r#"{"hostname": "x"}"#)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("hostname"), "{e}");
    let tls: SmtpConfig = serde_json::from_str(r#"{"tls": "implicit"}"#).expect("tls");
    assert_eq!(tls.tls, SmtpTls::Implicit);
    assert!(serde_json::from_str::<SmtpConfig>(r#"{"tls": "ssl"}"#).is_err());
}

#[test]
fn the_password_is_neither_debug_printed_nor_serialized() {
    let c = SmtpConfig {
        username: Some("apikey".into()),
        password: Some("hunter2".into()),
        ..SmtpConfig::default()
    };
    assert!(!format!("{c:?}").contains("hunter2"));
    let json = serde_json::to_string(&c).expect("serialize");
    assert!(
        !json.contains("hunter2") && !json.contains("password"),
        "{json}"
    );
}

fn metrics() -> SmtpMetrics {
    SmtpMetrics::register(&Registry::new()).expect("metrics")
}

#[test]
fn bad_configurations_are_refused_with_the_key_named() {
    let bad = [
        SmtpConfig {
            host: String::new(),
            ..SmtpConfig::default()
        },
        SmtpConfig {
            host: "smtp example".into(),
            ..SmtpConfig::default()
        },
        SmtpConfig {
            helo_name: Some("a\r\nMAIL".into()),
            ..SmtpConfig::default()
        },
        SmtpConfig {
            username: Some("u".into()),
            ..SmtpConfig::default()
        },
        SmtpConfig {
            password: Some("p".into()),
            ..SmtpConfig::default()
        },
        SmtpConfig {
            command_timeout_ms: 0,
            ..SmtpConfig::default()
        },
        SmtpConfig {
            host: "bad_name!".into(),
            tls: SmtpTls::Implicit,
            ..SmtpConfig::default()
        },
    ];
    for cfg in bad {
        let e = SmtpTransport::new(&cfg, metrics()).err();
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("smtp."), "{cfg:?}: {msg:?}");
    }
    let plain_odd_host = SmtpConfig {
        host: "bad_name!".into(),
        tls: SmtpTls::None,
        ..SmtpConfig::default()
    };
    assert!(SmtpTransport::new(&plain_odd_host, metrics()).is_ok());
}

#[test]
fn every_tls_mode_builds_without_a_process_default_crypto_provider() {
    // The test build has both `ring` and `aws-lc-rs` in rustls (via mailin-embedded), so any
    // use of the process default would panic here.
    for (tls, accept_invalid_certs) in [
        (SmtpTls::None, false),
        (SmtpTls::Starttls, false),
        (SmtpTls::Starttls, true),
        (SmtpTls::Implicit, false),
    ] {
        let cfg = SmtpConfig {
            tls,
            accept_invalid_certs,
            ..SmtpConfig::default()
        };
        assert!(SmtpTransport::new(&cfg, metrics()).is_ok(), "{tls:?}");
    }
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
}

#[test]
fn the_transport_and_its_futures_can_move_between_threads() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<SmtpTransport>();
    let t = SmtpTransport::new(&SmtpConfig::default(), metrics()).expect("default config");
    assert!(!t.has_reached_relay());
    let send = t.send(OutgoingMail {
        name: "m".into(),
        envelope_from: "a@x.test".into(),
        envelope_to: "b@y.test".into(),
        bytes: vec![],
    });
    assert_send(&send);
    assert_send(&t.probe());
    assert_send(&t.close_idle());
}
