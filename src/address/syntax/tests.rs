//! Tests for `syntax`: table tests of representative cases, the agreement test against the
//! email-validator corpus in `shared/corpus`, and property tests.

use super::*;

fn opts() -> Options {
    Options::default()
}

fn valid(input: &str, o: Options) -> EmailAddress {
    match parse(input, &o) {
        Ok(addr) => addr,
        Err(e) => panic!("{input:?} should be valid, got: {e}"),
    }
}

fn invalid(input: &str, o: Options) -> String {
    match parse(input, &o) {
        Ok(addr) => panic!("{input:?} should be invalid, got {addr:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn valid_addresses_normalize_like_email_validator() {
    // (input, normalized, ascii_email, smtputf8)
    let cases: &[(&str, &str, Option<&str>, bool)] = &[
        (
            "Abc@example.tld",
            "Abc@example.tld",
            Some("Abc@example.tld"),
            false,
        ),
        (
            "Abc.123@test-example.com",
            "Abc.123@test-example.com",
            Some("Abc.123@test-example.com"),
            false,
        ),
        (
            "user+mailbox/department=shipping@example.tld",
            "user+mailbox/department=shipping@example.tld",
            Some("user+mailbox/department=shipping@example.tld"),
            false,
        ),
        (
            "!#$%&'*+-/=?^_`.{|}~@example.tld",
            "!#$%&'*+-/=?^_`.{|}~@example.tld",
            Some("!#$%&'*+-/=?^_`.{|}~@example.tld"),
            false,
        ),
        (
            "jeff@臺網中心.tw",
            "jeff@臺網中心.tw",
            Some("jeff@xn--fiqq24b10vi0d.tw"),
            false,
        ),
        (
            "jeff臺網中心@example.tld",
            "jeff臺網中心@example.tld",
            None,
            true,
        ),
        ("ñoñó@example.tld", "ñoñó@example.tld", None, true),
        ("我買@example.tld", "我買@example.tld", None, true),
        ("µ@example.tld", "µ@example.tld", None, true),
        (
            "user@EXAMPLE.COM",
            "user@example.com",
            Some("user@example.com"),
            false,
        ),
        (
            "user@xn--bcher-kva.com",
            "user@bücher.com",
            Some("user@xn--bcher-kva.com"),
            false,
        ),
        (
            "user@BÜCHER.com",
            "user@bücher.com",
            Some("user@xn--bcher-kva.com"),
            false,
        ),
        (
            "user@ｅｘａｍｐｌｅ．com",
            "user@example.com",
            Some("user@example.com"),
            false,
        ),
        (
            "POSTMASTER@example.com",
            "postmaster@example.com",
            Some("postmaster@example.com"),
            false,
        ),
        (
            "Info@example.com",
            "info@example.com",
            Some("info@example.com"),
            false,
        ),
        // NFD input is returned in NFC.
        ("e\u{301}@example.com", "\u{e9}@example.com", None, true),
    ];
    for &(input, normalized, ascii_email, smtputf8) in cases {
        let addr = valid(input, opts());
        assert_eq!(addr.normalized, normalized, "{input}");
        assert_eq!(addr.ascii_email.as_deref(), ascii_email, "{input}");
        assert_eq!(addr.smtputf8, smtputf8, "{input}");
    }
}

#[test]
fn invalid_addresses_are_rejected_with_email_validators_message() {
    let cases: &[(&str, &str)] = &[
        (
            "my@localhost",
            "The part after the @-sign is not valid. It should have a period.",
        ),
        (
            "my@.leadingdot.com",
            "An email address cannot have a period immediately after the @-sign.",
        ),
        (
            "my@twodots..com",
            "An email address cannot have two periods in a row.",
        ),
        (
            "my@trailingdot.com.",
            "An email address cannot end with a period.",
        ),
        (
            "my@-leadingdash",
            "An email address cannot have a hyphen immediately after the @-sign.",
        ),
        (
            "my@trailingdash-",
            "An email address cannot end with a hyphen.",
        ),
        (
            "my@baddash.-.com",
            "An email address cannot have a period and a hyphen next to each other.",
        ),
        (
            "my@ab--cd.com",
            "An email address cannot have two letters followed by two dashes immediately after the @-sign or after a period, except Punycode.",
        ),
        (
            "my@xn--zz.com",
            "The part after the @-sign is not valid IDNA (Invalid A-label).",
        ),
        (
            "my@example.123",
            "The part after the @-sign is not valid. It is not within a valid top-level domain.",
        ),
        (
            "me@⒈wouldbeinvalid.com",
            "The part after the @-sign contains invalid characters: '⒈'.",
        ),
        ("@example.com", "There must be something before the @-sign."),
        (
            "\nmy@example.com",
            "The email address contains invalid characters before the @-sign: U+000A.",
        ),
        (
            "m\ny@example.com",
            "The email address contains invalid characters before the @-sign: U+000A.",
        ),
        (
            "my\n@example.com",
            "The email address contains invalid characters before the @-sign: U+000A.",
        ),
        (
            "test@\n",
            "The part after the @-sign contains invalid characters: U+000A.",
        ),
        (
            "bad\"quotes\"@example.com",
            "The email address contains invalid characters before the @-sign: '\"'.",
        ),
        (
            "obsolete.\"quoted\"@example.com",
            "The email address contains invalid characters before the @-sign: '\"'.",
        ),
        (
            ".leadingdot@domain.com",
            "An email address cannot start with a period.",
        ),
        (
            "twodots..here@domain.com",
            "An email address cannot have two periods in a row.",
        ),
        (
            "trailingdot.@domain.email",
            "An email address cannot have a period immediately before the @-sign.",
        ),
        (
            "me@xn--0.tld",
            "The part after the @-sign is not valid IDNA (Invalid A-label).",
        ),
        (
            "my.long.address@a123456789012345678901234567890123456789012345678901234567890123.com",
            "After the @-sign, periods cannot be separated by so many characters (1 character too many).",
        ),
        (
            "me@\u{1FEF}.com",
            "The part after the @-sign contains invalid characters after Unicode normalization: '`'.",
        ),
        (
            "me@yy--0.tld",
            "An email address cannot have two letters followed by two dashes immediately after the @-sign or after a period, except Punycode.",
        ),
        (
            "me@[127.0.0.1]",
            "A bracketed IP address after the @-sign is not allowed here.",
        ),
        (
            "me@[127.0.0.999]",
            "The address in brackets after the @-sign is not valid: It is not an IPv4 address (Octet 999 (> 255) not permitted in '127.0.0.999') or is missing an address literal tag.",
        ),
        (
            "me@[IPv6:::1]",
            "A bracketed IP address after the @-sign is not allowed here.",
        ),
        (
            "me@[tag:text]",
            "The part after the @-sign contains an invalid address literal tag in brackets.",
        ),
        (
            "\"quoted\"@example.com",
            "Quoting the part before the @-sign is not allowed here.",
        ),
        (
            "\"quoted\"x@example.com",
            "Extra character(s) found after close quote: 'x'",
        ),
        (
            "Display Name <me@example.com>",
            "A display name and angle brackets around the email address are not permitted here.",
        ),
        (
            "me＠example.com",
            "The email address has the \"full-width\" at-sign (@) character instead of a regular at-sign.",
        ),
        (
            "me\u{FE6B}example.com",
            "The email address has the \"small commercial at\" character instead of a regular at-sign.",
        ),
        ("no-at-sign", "An email address must have an @-sign."),
        (
            "me@example.com\u{202E}",
            "The email address contains unsafe characters: RIGHT-TO-LEFT OVERRIDE.",
        ),
        (
            "me@test",
            "The part after the @-sign is not valid. It should have a period.",
        ),
        (
            "me@x.test",
            "The part after the @-sign is a special-use or reserved name that cannot be used with email.",
        ),
        (
            "me@x.onion",
            "The part after the @-sign is a special-use or reserved name that cannot be used with email.",
        ),
        (
            "me@foo.local",
            "The part after the @-sign is a special-use or reserved name that cannot be used with email.",
        ),
        (
            "me@1.0.0.127.in-addr.arpa",
            "The part after the @-sign is a special-use or reserved name that cannot be used with email.",
        ),
        ("me@", "There must be something after the @-sign."),
    ];
    for &(input, message) in cases {
        assert_eq!(invalid(input, opts()), message, "{input:?}");
    }
}

#[test]
fn length_limits_follow_email_validator() {
    let local64 = "a".repeat(64);
    let local65 = "a".repeat(65);
    let strict = Options {
        strict: true,
        ..opts()
    };
    valid(&format!("{local64}@example.com"), strict);
    valid(&format!("{local65}@example.com"), opts());
    assert_eq!(
        invalid(&format!("{local65}@example.com"), strict),
        "The email address is too long before the @-sign (1 character too many)."
    );
    // 64 two-octet characters pass strict mode: the limit counts characters.
    valid(&format!("{}@example.com", "é".repeat(64)), strict);

    // 254 octets in total is the maximum.
    let domain = format!(
        "{}.{}.{}.com",
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(57)
    );
    let ok = format!("{local64}@{domain}");
    assert_eq!(ok.len(), 254);
    valid(&ok, opts());
    assert_eq!(
        invalid(&format!("a{ok}"), opts()),
        "The email address is too long (1 character too many)."
    );
    let label63 = "a".repeat(63);
    valid(&format!("me@{label63}.com"), opts());
}

#[test]
fn options_enable_the_optional_syntax() {
    let quoted = Options {
        allow_quoted_local: true,
        ..opts()
    };
    let cases = [
        (
            "\"unnecessarily.quoted.local.part\"@example.com",
            "unnecessarily.quoted.local.part@example.com",
        ),
        (
            "\"quoted local part\"@example.org",
            "\"quoted local part\"@example.org",
        ),
        (
            "\"de-quoted.local.part\"@example.org",
            "de-quoted.local.part@example.org",
        ),
        (
            "\"unnecessary\\quoted\"@example.org",
            "unnecessaryquoted@example.org",
        ),
        (
            "\"quoted\\\"escaped\"@example.org",
            "\"quoted\\\"escaped\"@example.org",
        ),
        ("\"a@b\"@example.org", "\"a@b\"@example.org"),
        ("\"INFO\"@example.org", "info@example.org"),
    ];
    for (input, normalized) in cases {
        assert_eq!(valid(input, quoted).normalized, normalized, "{input}");
    }

    let literal = Options {
        allow_domain_literal: true,
        ..opts()
    };
    assert_eq!(
        valid("me@[127.0.0.1]", literal).normalized,
        "me@[127.0.0.1]"
    );
    assert_eq!(
        valid("me@[IPv6:2001:db8:0:0:0:0:0:1]", literal).normalized,
        "me@[IPv6:2001:db8::1]"
    );
    assert_eq!(valid("me@[ipv6:::1]", literal).ascii_domain, "[IPv6:::1]");
    invalid("me@[IPv6:fe80::1%eth0]", literal);

    let display = Options {
        allow_display_name: true,
        ..opts()
    };
    let addr = valid("Display Name <me@example.com>", display);
    assert_eq!(addr.display_name.as_deref(), Some("Display Name"));
    assert_eq!(addr.normalized, "me@example.com");
    let addr = valid("\"Display \\\"Name\\\"\" <me@example.com>", display);
    assert_eq!(addr.display_name.as_deref(), Some("Display \"Name\""));
    assert_eq!(
        valid("<me@example.com>", display).display_name.as_deref(),
        Some("")
    );
    invalid("Display.Name <me@example.com>", display);
    invalid("Name <me@example.com> trailing", display);
    invalid("Name <me@example.com", display);

    let empty = Options {
        allow_empty_local: true,
        ..opts()
    };
    let addr = valid("@example.com", empty);
    assert_eq!(addr.normalized, "@example.com");
    assert_eq!(addr.ascii_email, None);

    let test_env = Options {
        test_environment: true,
        ..opts()
    };
    valid("me@test", test_env);
    valid("me@mail.test", test_env);
    invalid("me@localhost", test_env);

    let local_net = Options {
        globally_deliverable: false,
        ..opts()
    };
    valid("me@example", local_net);
    valid("me@example.123", local_net);
    invalid("me@localhost", local_net);

    let ascii_only = Options {
        allow_smtputf8: false,
        ..opts()
    };
    assert_eq!(
        invalid("ñoñó@example.tld", ascii_only),
        "Internationalized characters before the @-sign are not supported: 'ñ', 'ó'."
    );
    valid("me@bücher.com", ascii_only);
}

#[test]
fn idna_2008_rules_apply_to_domains() {
    // Emoji are UTS #46 valid but IDNA 2008 DISALLOWED.
    invalid("me@\u{1F4A9}.com", opts());
    invalid("me@xn--ls8h.com", opts());
    // Catalan l·l is allowed by a CONTEXTO rule; a middle dot elsewhere is not.
    assert_eq!(
        valid("me@col·lecció.cat", opts()).ascii_domain,
        "xn--collecci-ioa91d.cat"
    );
    invalid("me@a·b.cat", opts());
    // Bidi Rule across labels.
    valid("me@\u{5D0}\u{5D1}.com", opts());
    invalid("me@1.\u{5D0}\u{5D1}.com", opts());
    // Non-canonical ("fake") A-labels.
    invalid("me@xn---bbk.com", opts());
    // A combining mark may not start a label or the domain.
    invalid("me@\u{301}a.com", opts());
}

#[test]
fn options_deserialize_with_defaults_and_reject_unknown_keys() {
    let o: Options = serde_json::from_str(r#"{"strict": true}"#).unwrap();
    assert_eq!(
        o,
        Options {
            strict: true,
            ..Options::default()
        }
    );
    assert!(serde_json::from_str::<Options>(r#"{"check_deliverability": false}"#).is_err());
}

#[test]
fn pathological_inputs_do_not_panic() {
    // Large enough to cross every length limit many times over; the release-mode timing of
    // megabyte inputs is in `benches/syntax.rs`.
    let huge = "a".repeat(1 << 14);
    let inputs = [
        String::new(),
        "@".into(),
        "@@".into(),
        "\"".into(),
        "\"\\".into(),
        "<".into(),
        ">".into(),
        "<>".into(),
        "a@[".into(),
        "a@[]".into(),
        "a@]".into(),
        "\u{0}@\u{0}".into(),
        format!("{huge}@{huge}"),
        format!("\"{huge}\"@example.com"),
        format!("{}@example.com", "\u{301}".repeat(2_000)),
        format!("\"{}\"@example.com", "\\\u{301}".repeat(2_000)),
        "<\u{338}".repeat(2_000),
        format!("a@{}", "\u{FDFA}".repeat(200)),
        format!("{}<a@example.com>", "\u{301}".repeat(1000)),
        "<\u{338}a@example.com>".into(),
        "\"\\\u{301}\"@example.com".into(),
    ];
    let all = all_option_sets();
    for input in &inputs {
        for o in &all {
            let _ = parse(input, o);
        }
    }
}

fn all_option_sets() -> Vec<Options> {
    (0u16..256)
        .map(|bits| {
            let bit = |n: u16| bits & (1 << n) != 0;
            Options {
                allow_smtputf8: bit(0),
                allow_quoted_local: bit(1),
                allow_domain_literal: bit(2),
                allow_display_name: bit(3),
                allow_empty_local: bit(4),
                globally_deliverable: bit(5),
                test_environment: bit(6),
                strict: bit(7),
            }
        })
        .collect()
}

// === Corpus agreement ===

mod corpus {
    use super::super::{Options, parse};

    /// Required share of cases where validity and the normalized form both agree.
    const REQUIRED_AGREEMENT: f64 = 0.995;

    #[derive(serde::Deserialize)]
    struct Row {
        id: String,
        input: String,
        #[serde(default)]
        options: Options,
        valid: bool,
        normalized: Option<String>,
    }

    /// Replaces JSON `\uD800`-style escapes of lone surrogates, which a Rust `String` cannot
    /// hold, with U+FFFD. Returns `None` when the line has none.
    fn replace_lone_surrogates(line: &str) -> Option<String> {
        let bytes = line.as_bytes();
        let escape_at = |i: usize| -> Option<u32> {
            let hex = line.get(i + 2..i + 6)?;
            (bytes.get(i) == Some(&b'\\') && bytes.get(i + 1) == Some(&b'u'))
                .then(|| u32::from_str_radix(hex, 16).ok())
                .flatten()
        };
        let mut out = String::with_capacity(line.len());
        let mut changed = false;
        let mut i = 0;
        while i < line.len() {
            if bytes[i] == b'\\' {
                if let Some(unit) = escape_at(i) {
                    let is_high = (0xD800..0xDC00).contains(&unit);
                    let is_low = (0xDC00..0xE000).contains(&unit);
                    let paired =
                        is_high && escape_at(i + 6).is_some_and(|u| (0xDC00..0xE000).contains(&u));
                    if paired {
                        out.push_str(&line[i..i + 12]);
                        i += 12;
                    } else if is_high || is_low {
                        out.push_str("\\ufffd");
                        changed = true;
                        i += 6;
                    } else {
                        out.push_str(&line[i..i + 6]);
                        i += 6;
                    }
                } else {
                    // Any other escape: copy the backslash and the escaped character.
                    let next = line[i + 1..].chars().next().map_or(0, char::len_utf8);
                    out.push_str(&line[i..i + 1 + next]);
                    i += 1 + next;
                }
            } else {
                let len = line[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&line[i..i + len]);
                i += len;
            }
        }
        changed.then_some(out)
    }

    #[test]
    fn lone_surrogate_escapes_are_replaced() {
        assert_eq!(
            replace_lone_surrogates(r#"{"a": "x\ud800y\\ud800\ud83d\ude00"}"#).as_deref(),
            Some(r#"{"a": "x\ufffdy\\ud800\ud83d\ude00"}"#)
        );
        assert_eq!(replace_lone_surrogates(r#"{"a": "\u00e9"}"#), None);
    }

    #[test]
    fn corpus_agreement_is_at_least_99_5_percent() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/corpus/addresses.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let mut total = 0usize;
        let mut agree = 0usize;
        let mut disagreements = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // A lone surrogate cannot reach `parse`: the daemon's JSON decoding rejects it,
            // so such an input counts as rejected.
            let (row, undecodable): (Row, bool) = match serde_json::from_str(line) {
                Ok(row) => (row, false),
                Err(first) => {
                    let fixed = replace_lone_surrogates(line)
                        .unwrap_or_else(|| panic!("bad corpus line ({first}): {line}"));
                    let row = serde_json::from_str(&fixed)
                        .unwrap_or_else(|e| panic!("bad corpus line ({e}): {line}"));
                    (row, true)
                }
            };
            total += 1;
            let got = if undecodable {
                Err("input is not valid Unicode".to_owned())
            } else {
                parse(&row.input, &row.options).map_err(|e| e.to_string())
            };
            let ok = match (&got, row.valid) {
                (Ok(addr), true) => Some(&addr.normalized) == row.normalized.as_ref(),
                (Err(_), false) => true,
                _ => false,
            };
            if ok {
                agree += 1;
            } else {
                disagreements.push(format!(
                    "{} input={:?} options={:?}: expected valid={} normalized={:?}, got {:?}",
                    row.id,
                    row.input,
                    row.options,
                    row.valid,
                    row.normalized,
                    got.map(|a| a.normalized)
                ));
            }
        }
        for d in &disagreements {
            println!("disagreement: {d}");
        }
        let share = agree as f64 / total as f64;
        println!(
            "corpus agreement: {agree}/{total} = {:.2}% ({} disagreements)",
            share * 100.0,
            disagreements.len()
        );
        assert!(total > 0, "empty corpus");
        assert!(
            share >= REQUIRED_AGREEMENT,
            "agreement {agree}/{total} is below {REQUIRED_AGREEMENT}"
        );
    }
}

// === Properties ===

mod properties {
    use proptest::prelude::*;

    use super::super::{Options, parse};
    use super::all_option_sets;

    /// Characters that exercise every branch of the parser.
    const INTERESTING: &[char] = &[
        'a',
        'b',
        'Z',
        '0',
        '9',
        '.',
        '.',
        '@',
        '@',
        '-',
        '_',
        '+',
        '"',
        '\\',
        '<',
        '>',
        '[',
        ']',
        ':',
        ' ',
        '\t',
        '\r',
        '\n',
        '\0',
        '(',
        ')',
        ',',
        ';',
        'é',
        'ß',
        'ü',
        'Ü',
        '\u{301}',
        '\u{338}',
        '\u{37E}',
        '\u{3002}',
        '\u{FF0E}',
        '\u{FF20}',
        '\u{FF41}',
        '\u{200B}',
        '\u{200D}',
        '\u{202E}',
        '\u{5D0}',
        '\u{627}',
        '\u{661}',
        '\u{B7}',
        '\u{2488}',
        '\u{FDFA}',
        '\u{1F4A9}',
        '\u{10FFFF}',
        '臺',
        'x',
        'n',
        'I',
        'P',
        'v',
        '6',
        'f',
    ];

    fn interesting_string() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(INTERESTING), 0..48)
            .prop_map(|chars| chars.into_iter().collect())
    }

    fn option_set() -> impl Strategy<Value = Options> {
        let all = all_option_sets();
        (0..all.len()).prop_map(move |i| all[i])
    }

    /// Addresses that are often valid: a local part and a domain from friendly alphabets.
    fn plausible_address() -> impl Strategy<Value = String> {
        let local = prop::collection::vec(
            prop::sample::select(
                &[
                    "a",
                    "B",
                    "z",
                    "0",
                    ".",
                    "+",
                    "é",
                    "e\u{301}",
                    "\u{37E}",
                    "ß",
                    "Ω",
                    "臺",
                    "\"",
                    " ",
                    "\\\"",
                    "info",
                    "POSTMASTER",
                    "@",
                ][..],
            ),
            1..8,
        )
        .prop_map(|parts| parts.concat());
        let label = prop::collection::vec(
            prop::sample::select(
                &[
                    "a",
                    "b",
                    "Q",
                    "1",
                    "-",
                    "ü",
                    "Ü",
                    "ß",
                    "ς",
                    "ｂ",
                    "xn--bcher-kva",
                    "bücher",
                    "\u{5D0}",
                    "\u{627}",
                    "l\u{B7}l",
                    "\u{FF0E}",
                    "\u{3002}",
                ][..],
            ),
            1..5,
        )
        .prop_map(|parts| parts.concat());
        let domain = (
            prop::collection::vec(label, 1..3),
            prop::sample::select(&["com", "de", "TEST", "org"][..]),
        )
            .prop_map(|(labels, tld)| format!("{}.{tld}", labels.join(".")));
        let literal = prop::sample::select(
            &[
                "[192.0.2.1]",
                "[IPv6:2001:db8::1]",
                "[ipv6:0:0:0:0:0:0:0:1]",
                "[IPv6:::ffff:c000:201]",
            ][..],
        )
        .prop_map(str::to_owned);
        (local, prop_oneof![4 => domain, 1 => literal], any::<bool>()).prop_map(|(l, d, quote)| {
            if quote {
                format!("\"{l}\"@{d}")
            } else {
                format!("{l}@{d}")
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_never_panics_on_any_string(input in any::<String>(), o in option_set()) {
            let _ = parse(&input, &o);
        }

        #[test]
        fn parse_never_panics_on_address_like_strings(input in interesting_string(), o in option_set()) {
            let _ = parse(&input, &o);
        }

        #[test]
        fn a_normalized_address_is_still_valid(input in plausible_address(), o in option_set()) {
            if let Ok(addr) = parse(&input, &o) {
                let again = parse(&addr.normalized, &o);
                prop_assert!(again.is_ok(), "{:?} -> {:?} -> {:?}", input, addr.normalized, again);
            }
        }

        #[test]
        fn normalization_is_idempotent(input in plausible_address(), o in option_set()) {
            if let Ok(addr) = parse(&input, &o) {
                let again = parse(&addr.normalized, &o);
                prop_assert_eq!(again.map(|a| a.normalized).ok(), Some(addr.normalized.clone()));
                if let Some(ascii) = &addr.ascii_email {
                    let from_ascii = parse(ascii, &o);
                    prop_assert_eq!(from_ascii.map(|a| a.normalized).ok(), Some(addr.normalized.clone()));
                }
            }
        }
    }
}
