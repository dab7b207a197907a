//! Email address syntax validation and normalization, ported from Python `email-validator`
//! 2.4.0 (`validate_email(input, check_deliverability=False, **options)`), whose verdicts web
//! apps already rely on.
//!
//! Owns: splitting off a display name, local-part rules (dot-atom, quoted strings, SMTPUTF8,
//! NFC), domain rules (UTS #46 mapping, IDNA 2008, special-use names, global deliverability
//! heuristics), domain literals, length limits, and the normalized forms. Does not own: DNS
//! deliverability (MX lookups) or typo suggestions (see `suggest`).
//!
//! Invariants: [`parse`] never panics; a returned [`EmailAddress`]'s `normalized` form parses
//! again to itself; every check runs in time linear in the input length.
//!
//! The structure follows email-validator's `syntax.py` and `validate_email.py` function by
//! function, and error messages keep its wording, so its documentation and issues apply here.
//! IDNA 2008 label rules live in `idna2008` (a port of the Python `idna` package, with its data
//! tables generated from `idna` 3.20) and domain literals in `literal`.
//!
//! # Deliberate disagreements with the oracle (email-validator 2.4.0 on CPython 3.11)
//!
//! * `adv-0024+l` (`a@[IPv6:::ffff:192.0.2.1]` with `allow_domain_literal`): an IPv4-mapped
//!   IPv6 literal is normalized to `[IPv6:::ffff:192.0.2.1]`, the mixed notation that RFC 5952
//!   section 5 recommends for IPv4-mapped addresses. The oracle (CPython 3.11 `ipaddress`) gives
//!   `[IPv6:::ffff:c000:201]`; CPython 3.13 and later follow RFC 5952 too, so the oracle's own
//!   answer depends on the Python version it runs on. Both forms denote the same address.
//!
//! # Other differences (no corpus case is affected)
//!
//! * A lone surrogate cannot be in a Rust `&str`, so `ev-0139` and `ev-0140` never reach
//!   [`parse`]: whatever decodes the request (JSON, HTTP) rejects them. The oracle rejects them
//!   too.
//! * Unicode data comes from ICU4X, a newer Unicode version than the oracle's (CPython 3.11 has
//!   Unicode 14.0): a character assigned after 14.0 is a letter or symbol here but unassigned,
//!   and so unsafe, for the oracle.
//! * Messages name a character that is not a letter, number, punctuation or symbol by its code
//!   point (`U+0307`), except for a few common ones, where Python prints its Unicode name
//!   (`NO-BREAK SPACE`): the full name table is not worth its size.

mod idna2008;
mod literal;

use std::borrow::Cow;

use icu_normalizer::ComposingNormalizerBorrowed;
use icu_normalizer::uts46::Uts46MapperBorrowed;
use icu_properties::CodePointMapData;
use icu_properties::props::{CanonicalCombiningClass, GeneralCategory};

/// RFC 3696 errata 1690 / RFC 5321 4.5.3.1.3: at most 254 octets in a whole address.
const EMAIL_MAX_LENGTH: usize = 254;
/// RFC 5321 4.5.3.1.1: at most 64 characters before the @-sign (enforced only in strict mode).
const LOCAL_PART_MAX_LENGTH: usize = 64;
/// RFC 1035 2.3.1: at most 63 octets in a DNS label.
const DNS_LABEL_LENGTH_LIMIT: usize = 63;
/// RFC 1035 2.3.4: at most 253 octets in a domain name, without the trailing dot.
const DOMAIN_MAX_LENGTH: usize = 253;
/// How many characters after a special character may combine with it: the character itself,
/// the 30 combining marks in a row that the Unicode Stream-Safe Text Format allows, and one more.
const COMBINING_WINDOW_CHARS: usize = 32;
/// Prefix of an IDNA A-label.
const ACE_PREFIX: &str = "xn--";

/// RFC 2142 mailbox names that must be treated case-insensitively, and so are lowercased.
const CASE_INSENSITIVE_MAILBOX_NAMES: [&str; 15] = [
    "info",
    "marketing",
    "sales",
    "support",
    "abuse",
    "noc",
    "security",
    "postmaster",
    "hostmaster",
    "usenet",
    "news",
    "webmaster",
    "www",
    "uucp",
    "ftp",
];

/// IANA special-use domain names that cannot receive email, as in email-validator's
/// `SPECIAL_USE_DOMAIN_NAMES`; their subdomains are special too. `test` is allowed with
/// `test_environment`.
fn is_special_use_tld(tld: &str) -> bool {
    matches!(
        tld,
        "arpa" | "invalid" | "local" | "localhost" | "onion" | "test"
    )
}
/// The special-use name that `test_environment` allows.
const TEST_DOMAIN: &str = "test";

/// Whether the Unicode decomposition of `c` (Unicode 14.0, as in the oracle) contains a FULL
/// STOP: UTS #46 would turn such a character into a label separator plus more, so
/// email-validator rejects it up front. (U+FF0E FULLWIDTH FULL STOP is one too, but it is
/// accepted as a separator and never gets here.)
fn decomposes_to_full_stop(c: char) -> bool {
    matches!(
        c,
        '\u{2024}'..='\u{2026}'
            | '\u{2488}'..='\u{249B}'
            | '\u{33C2}'
            | '\u{33C7}'
            | '\u{33D8}'
            | '\u{FE52}'
            | '\u{1F100}'
    )
}

/// Validation options; the defaults are email-validator's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Accept non-ASCII characters before the @-sign (they need the SMTPUTF8 extension).
    /// Non-ASCII domains are accepted either way. Default: true.
    pub allow_smtputf8: bool,
    /// Accept a quoted local part such as `"a b"@example.com`. Default: false.
    pub allow_quoted_local: bool,
    /// Accept a bracketed IP address after the @-sign. Default: false.
    pub allow_domain_literal: bool,
    /// Accept `Display Name <address>`. Default: false.
    pub allow_display_name: bool,
    /// Accept an empty local part (`@example.com`), e.g. for Postfix catch-all aliases.
    /// Default: false.
    pub allow_empty_local: bool,
    /// Require a domain that could be reachable on the public internet: it has a period and
    /// its TLD ends in a letter. Special-use names are rejected either way. Default: true.
    pub globally_deliverable: bool,
    /// Accept the special-use `test` domain and its subdomains. Default: false.
    pub test_environment: bool,
    /// Also enforce the 64-character local-part limit. Default: false.
    pub strict: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            allow_smtputf8: true,
            allow_quoted_local: false,
            allow_domain_literal: false,
            allow_display_name: false,
            allow_empty_local: false,
            globally_deliverable: true,
            test_environment: false,
            strict: false,
        }
    }
}

/// A syntactically valid address and its normalized forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress {
    /// The address as given, without any display name: the original local part (with its
    /// quotes, if any), `@`, and the original domain.
    pub original: String,
    /// The form to store and compare: NFC local part (quotes and escapes minimized, RFC 2142
    /// role names lowercased), `@`, and `domain`.
    pub normalized: String,
    /// The normalized local part.
    pub local_part: String,
    /// The normalized domain: lowercase Unicode (A-labels decoded), or a bracketed literal.
    pub domain: String,
    /// The domain in ASCII: A-labels for internationalized labels; a literal stays as is.
    pub ascii_domain: String,
    /// `local_part@ascii_domain`, or `None` when the local part is not ASCII (or is empty).
    pub ascii_email: Option<String>,
    /// Whether sending to the address needs the SMTPUTF8 extension (non-ASCII local part).
    pub smtputf8: bool,
    /// The unquoted, NFC display name when the input was `Name <address>`; `Some("")` for a bare
    /// `<address>`.
    pub display_name: Option<String>,
}

/// Why an address was rejected. `Display` is a sentence for a person, in email-validator's
/// words (e.g. "An email address must have an @-sign.").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    /// The explanation, a complete sentence. Most messages are fixed text and are not
    /// allocated.
    pub message: Cow<'static, str>,
}

type Result<T, E = SyntaxError> = std::result::Result<T, E>;

fn err(message: impl Into<Cow<'static, str>>) -> SyntaxError {
    SyntaxError {
        message: message.into(),
    }
}

/// Validates the syntax of `input` and returns its normalized forms.
///
/// Nothing is looked up in DNS. Leading or trailing whitespace is not stripped.
///
/// # Errors
///
/// Returns a [`SyntaxError`] explaining the first rule the input breaks, in the order
/// email-validator checks them.
pub fn parse(input: &str, opts: &Options) -> Result<EmailAddress> {
    let split = split_email(input)?;

    // UTS #39 3.3 wants display names in NFC; they are not validated further.
    let display_name = split.display_name.map(|name| nfc(&name).into_owned());

    let first = validate_local_part(&split.unescaped_local, opts, split.quoted)?;
    // SMTPUTF8 is reported for the address as given, before normalization.
    let smtputf8 = first.smtputf8;

    // RFC 6532 3.1: return the NFC form, and make sure it is valid too. The unquoted,
    // unescaped text is normalized so that quoting is decided again afterwards.
    let normalized_local = nfc(&split.unescaped_local);
    let mut local =
        if matches!(normalized_local, Cow::Owned(_)) && normalized_local != split.unescaped_local {
            validate_local_part(&normalized_local, opts, split.quoted)
                .map_err(|e| err(format!("After Unicode normalization: {}", e.message)))?
        } else {
            first
        };

    // Optional features are checked after the mandatory rules, as email-validator does.
    if split.quoted && !opts.allow_quoted_local {
        return Err(err(
            "Quoting the part before the @-sign is not allowed here.",
        ));
    }

    // RFC 2142 role mailboxes are case-insensitive.
    if local.is_ascii
        && CASE_INSENSITIVE_MAILBOX_NAMES
            .iter()
            .any(|name| name.eq_ignore_ascii_case(&local.text))
    {
        local.text.make_ascii_lowercase();
    }

    let (domain, ascii_domain) = if split.domain.is_empty() {
        return Err(err("There must be something after the @-sign."));
    } else if let Some(inner) = split
        .domain
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
    {
        let literal = literal::validate_domain_literal(inner)?;
        if !opts.allow_domain_literal {
            return Err(err(
                "A bracketed IP address after the @-sign is not allowed here.",
            ));
        }
        (literal.clone(), literal)
    } else {
        let info = validate_domain_name(split.domain, opts)?;
        (info.domain, info.ascii_domain)
    };

    let mut normalized = String::with_capacity(local.text.len() + 1 + domain.len());
    normalized.push_str(&local.text);
    normalized.push('@');
    normalized.push_str(&domain);

    let ascii_email = (local.is_ascii && !local.text.is_empty()).then(|| {
        let mut email = String::with_capacity(local.text.len() + 1 + ascii_domain.len());
        email.push_str(&local.text);
        email.push('@');
        email.push_str(&ascii_domain);
        email
    });

    validate_length(
        split.local_part,
        split.domain,
        &normalized,
        local.text.len() + 1 + ascii_domain.len(),
    )?;

    // Display names are an optional parsing feature, so they are checked last.
    if display_name.is_some() && !opts.allow_display_name {
        return Err(err(
            "A display name and angle brackets around the email address are not permitted here.",
        ));
    }

    let mut original = String::with_capacity(split.local_part.len() + 1 + split.domain.len());
    original.push_str(split.local_part);
    original.push('@');
    original.push_str(split.domain);

    Ok(EmailAddress {
        original,
        normalized,
        local_part: local.text,
        domain,
        ascii_domain,
        ascii_email,
        smtputf8,
        display_name,
    })
}

// === Splitting ===

/// The parts of an input string, before validation.
struct SplitEmail<'a> {
    /// Unquoted display name, if angle brackets were used.
    display_name: Option<String>,
    /// The local part as written (possibly quoted).
    local_part: &'a str,
    /// The local part without its quotes and backslash escapes.
    unescaped_local: Cow<'a, str>,
    /// Whether the local part was a quoted string.
    quoted: bool,
    /// Everything after the @-sign.
    domain: &'a str,
}

/// Splits `display name <local@domain>` or `local@domain` (email-validator's `split_email`).
///
/// The display name is "in the spirit but not the letter of RFC 5322 3.4": no comments or
/// folding whitespace, optional quoting, spaces before `<` and after `>`.
fn split_email(email: &str) -> Result<SplitEmail<'_>> {
    let (left, right) = split_at_unquoted_special(email, &AT_OR_ANGLE)?;

    let (display_name, local_part, domain) = if right.starts_with('<') {
        let left = left.trim_end_matches(is_python_whitespace);
        let (display_name, quoted) = unquote_quoted_string(left)?;
        // Unquoted display names may only have atext characters and spaces (no periods).
        if !quoted && let Some(bad) = bad_chars(&display_name, |c| !is_atext(c) && c != ' ') {
            return Err(err(format!(
                "The display name contains invalid characters when not quoted: {bad}."
            )));
        }
        check_unsafe_chars(&display_name, true)?;

        if !right.contains('>') {
            return Err(err(
                "An open angle bracket at the start of the email address has to be followed by \
                 a close angle bracket at the end.",
            ));
        }
        let right = right.trim_end_matches(' ');
        let Some(addr_spec) = right.strip_suffix('>').and_then(|r| r.strip_prefix('<')) else {
            return Err(err("There can't be anything after the email address."));
        };
        let (local, domain) = split_at_unquoted_special(addr_spec, &AT_ONLY)?;
        (Some(display_name.into_owned()), local, domain)
    } else {
        (None, left, right)
    };

    let domain = domain.strip_prefix('@').unwrap_or(domain);
    let (unescaped_local, quoted) = unquote_quoted_string(local_part)?;
    Ok(SplitEmail {
        display_name,
        local_part,
        unescaped_local,
        quoted,
        domain,
    })
}

/// Bytes that can change [`split_at_unquoted_special`]'s state when the special characters are
/// the given ones: the specials, quotes and backslashes.
const fn state_bytes(specials: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    let mut i = 0;
    while i < specials.len() {
        table[specials[i] as usize] = true;
        i += 1;
    }
    table
}

/// Splitting before the first unquoted `@` or `<` (an address, maybe with a display name).
const AT_OR_ANGLE: [bool; 256] = state_bytes(b"@<");
/// Splitting before the first unquoted `@` (the address inside angle brackets).
const AT_ONLY: [bool; 256] = state_bytes(b"@");

/// Splits `text` before the first special character (`@`, and `<` if `state` marks it) that is
/// outside a quoted string and does not combine with what follows it (`<` + U+0338 is `≮`, not
/// an angle bracket). `state` is [`AT_OR_ANGLE`] or [`AT_ONLY`].
fn split_at_unquoted_special<'a>(text: &'a str, state: &[bool; 256]) -> Result<(&'a str, &'a str)> {
    let bytes = text.as_bytes();
    let mut inside_quote = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        // Only quotes, backslashes and specials change the state, and any character right
        // after a backslash in quotes; they are all ASCII, so other bytes are skipped whole.
        if !(inside_quote && escaped) {
            while i < bytes.len() && !state[usize::from(bytes[i])] {
                i += 1;
            }
        }
        let Some(rest) = text.get(i..) else {
            break;
        };
        let Some(c) = rest.chars().next() else {
            break;
        };
        if combines_with_following(rest, c) {
            i += c.len_utf8();
            continue;
        }
        if inside_quote {
            if c == '\\' && !escaped {
                escaped = true;
            } else if c == '"' && !escaped {
                // The only way to exit the quote is an unescaped quote.
                inside_quote = false;
                escaped = false;
            } else {
                escaped = false;
            }
        } else if c == '"' {
            inside_quote = true;
        } else if c == '@' || (c == '<' && state[usize::from(b'<')]) {
            return Ok((&text[..i], rest));
        }
        i += c.len_utf8();
    }

    // The specials always include the @-sign, so it is missing. Look-alikes get their own
    // message because they are hard to tell apart.
    if text.contains('\u{FF20}') {
        return Err(err(
            "The email address has the \"full-width\" at-sign (@) character instead of a \
             regular at-sign.",
        ));
    }
    if text.contains('\u{FE6B}') {
        return Err(err(
            "The email address has the \"small commercial at\" character instead of a regular \
             at-sign.",
        ));
    }
    Err(err("An email address must have an @-sign."))
}

/// Whether the first character of `rest` (which is `c`) changes under NFC together with the
/// characters after it, i.e. it is not really that character. email-validator normalizes a
/// window of [`COMBINING_WINDOW_CHARS`] characters; only the combining marks right after `c`
/// (and, for a non-ASCII `c`, one starter right after it) can change its first character, so
/// only they are normalized here, with the same cap.
fn combines_with_following(rest: &str, c: char) -> bool {
    // No ASCII character combines with an ASCII character after it (or with nothing).
    if c.is_ascii() && rest.as_bytes().get(1).is_none_or(u8::is_ascii) {
        return false;
    }
    let ccc = CodePointMapData::<CanonicalCombiningClass>::new();
    let mut end = c.len_utf8();
    for (count, (i, n)) in (1..).zip(rest.char_indices().skip(1)) {
        if count == COMBINING_WINDOW_CHARS {
            break;
        }
        if ccc.get(n) == CanonicalCombiningClass::NotReordered {
            // A starter composes with `c` only when nothing stands between them, and no
            // ASCII character composes with a starter.
            if count == 1 && !c.is_ascii() {
                end = i + n.len_utf8();
            }
            break;
        }
        end = i + n.len_utf8();
    }
    if end == c.len_utf8() && c.is_ascii() {
        return false;
    }
    !nfc(&rest[..end]).starts_with(c)
}

/// Removes the surrounding quotes and backslash escapes of a quoted string. Escapes are
/// parsed liberally: any character may be escaped. Text that does not start with a quote is
/// returned as is.
fn unquote_quoted_string(text: &str) -> Result<(Cow<'_, str>, bool)> {
    let Some(body) = text.strip_prefix('"') else {
        return Ok((Cow::Borrowed(text), false));
    };
    let mut value = String::with_capacity(body.len());
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        if escaped {
            value.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            let after = &body[i + 1..];
            if !after.is_empty() {
                let extra: Vec<String> = after.chars().map(safe_character_display).collect();
                return Err(err(format!(
                    "Extra character(s) found after close quote: {}",
                    extra.join(", ")
                )));
            }
            break;
        } else {
            value.push(c);
        }
    }
    Ok((Cow::Owned(value), true))
}

// === Local part ===

/// A validated local part.
struct LocalPart {
    /// The normalized text, re-quoted with minimal escapes if it needs quoting.
    text: String,
    /// Whether the text is ASCII (email-validator's `ascii_local_part` is set).
    is_ascii: bool,
    /// Whether it needs SMTPUTF8.
    smtputf8: bool,
}

/// How a non-empty local part passed validation.
#[derive(PartialEq, Eq)]
enum LocalForm {
    DotAtom,
    Quoted,
}

/// Validates an unquoted, unescaped local part (email-validator's `validate_email_local_part`).
fn validate_local_part(local: &str, opts: &Options, quoted: bool) -> Result<LocalPart> {
    if local.is_empty() {
        if !opts.allow_empty_local {
            return Err(err("There must be something before the @-sign."));
        }
        return Ok(LocalPart {
            text: String::new(),
            is_ascii: true,
            smtputf8: false,
        });
    }

    // RFC 5321 4.5.3.1.1, counted in characters; the total length is checked in octets later.
    if opts.strict {
        let len = local.chars().count();
        if len > LOCAL_PART_MAX_LENGTH {
            return Err(err(format!(
                "The email address is too long before the @-sign {}.",
                length_reason(len, LOCAL_PART_MAX_LENGTH)
            )));
        }
    }

    // RFC 5322 3.2.3 dot-atom: most addresses, already normalized. A quoted local part that
    // is a valid dot-atom loses its needless quotes.
    if is_dot_atom(local, false) {
        return Ok(LocalPart {
            text: local.to_owned(),
            is_ascii: true,
            smtputf8: false,
        });
    }

    let mut smtputf8 = false;
    let form = if is_dot_atom(local, true) {
        // RFC 6531 3.3 internationalized dot-atom.
        if !opts.allow_smtputf8 {
            if let Some(bad) = bad_chars(local, |c| !is_atext_or_dot(c)) {
                return Err(err(format!(
                    "Internationalized characters before the @-sign are not supported: {bad}."
                )));
            }
            return Err(err(
                "Internationalized characters before the @-sign are not supported.",
            ));
        }
        smtputf8 = true;
        Some(LocalForm::DotAtom)
    } else if quoted {
        // RFC 5321 4.1.2 qtextSMTP / quoted-pairSMTP, extended by RFC 6531 3.3.
        if let Some(bad) = bad_chars(local, |c| !is_qtext_intl(c)) {
            return Err(err(format!(
                "The email address contains invalid characters in quotes before the @-sign: {bad}."
            )));
        }
        if !local.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            smtputf8 = true;
            if !opts.allow_smtputf8 {
                let bad = bad_chars(local, |c| !(' '..='~').contains(&c)).unwrap_or_default();
                return Err(err(format!(
                    "Internationalized characters before the @-sign are not supported: {bad}."
                )));
            }
        }
        Some(LocalForm::Quoted)
    } else {
        None
    };

    if let Some(form) = form {
        check_unsafe_chars(local, form == LocalForm::Quoted)?;
        // RFC 5321 4.1.2: transmit the form with the minimum quoting possible.
        let text = if form == LocalForm::Quoted {
            let mut quoted_text = String::with_capacity(local.len() + 2);
            quoted_text.push('"');
            for c in local.chars() {
                if c == '"' || c == '\\' {
                    quoted_text.push('\\');
                }
                quoted_text.push(c);
            }
            quoted_text.push('"');
            quoted_text
        } else {
            local.to_owned()
        };
        return Ok(LocalPart {
            text,
            is_ascii: !smtputf8,
            smtputf8,
        });
    }

    // Not valid: find out why.
    if let Some(bad) = bad_chars(local, |c| !(is_atext_intl(c) || c == '.')) {
        return Err(err(format!(
            "The email address contains invalid characters before the @-sign: {bad}."
        )));
    }
    check_dot_atom(
        local,
        "An email address cannot start with a {}.",
        "An email address cannot have a {} immediately before the @-sign.",
        false,
    )?;
    Err(err(
        "The email address contains invalid characters before the @-sign.",
    ))
}

/// RFC 5322 3.2.3 atext, as a lookup table over bytes (non-ASCII bytes are false).
const ATEXT: [bool; 256] = {
    let mut table = [false; 256];
    let specials = b"!#$%&'*+-/=?^_`{|}~";
    let mut i = 0;
    while i < specials.len() {
        table[specials[i] as usize] = true;
        i += 1;
    }
    let mut b = 0;
    while b < 128 {
        if (b as u8).is_ascii_alphanumeric() {
            table[b] = true;
        }
        b += 1;
    }
    table
};

/// RFC 5322 3.2.3 atext (ASCII).
fn is_atext(c: char) -> bool {
    c.is_ascii() && ATEXT[c as usize]
}

/// atext extended by RFC 6531 3.3 with every non-ASCII code point.
fn is_atext_intl(c: char) -> bool {
    is_atext(c) || !c.is_ascii()
}

fn is_atext_or_dot(c: char) -> bool {
    is_atext(c) || c == '.'
}

/// RFC 5321 qtextSMTP and quoted-pairSMTP characters, plus non-ASCII (RFC 6531).
fn is_qtext_intl(c: char) -> bool {
    (' '..='~').contains(&c) || !c.is_ascii()
}

/// RFC 5322 3.2.3 dot-atom-text: runs of atext separated by single periods. With
/// `allow_non_ascii`, every non-ASCII character counts as atext (RFC 6531 3.3); in UTF-8 those
/// are exactly the bytes from 0x80 up.
fn is_dot_atom(text: &str, allow_non_ascii: bool) -> bool {
    let mut after_dot = true;
    for &b in text.as_bytes() {
        if b == b'.' {
            if after_dot {
                return false;
            }
            after_dot = true;
        } else if ATEXT[usize::from(b)] || (allow_non_ascii && b >= 0x80) {
            after_dot = false;
        } else {
            return false;
        }
    }
    !after_dot
}

/// RFC 5322 3.2.3 period rules, plus RFC 952 hyphen rules for host names. `start` and `end`
/// are message templates with `{}` for the character's name.
fn check_dot_atom(label: &str, start: &str, end: &str, is_hostname: bool) -> Result<()> {
    let message = |template: &str, thing: &str| err(template.replacen("{}", thing, 1));
    if label.ends_with('.') {
        return Err(message(end, "period"));
    }
    if label.starts_with('.') {
        return Err(message(start, "period"));
    }
    if label.contains("..") {
        return Err(err("An email address cannot have two periods in a row."));
    }
    if is_hostname {
        if label.ends_with('-') {
            return Err(message(end, "hyphen"));
        }
        if label.starts_with('-') {
            return Err(message(start, "hyphen"));
        }
        if label.contains(".-") || label.contains("-.") {
            return Err(err(
                "An email address cannot have a period and a hyphen next to each other.",
            ));
        }
    }
    Ok(())
}

// === Unicode helpers ===

fn general_category(c: char) -> GeneralCategory {
    CodePointMapData::<GeneralCategory>::new().get(c)
}

fn is_mark(c: char) -> bool {
    matches!(
        general_category(c),
        GeneralCategory::NonspacingMark
            | GeneralCategory::SpacingMark
            | GeneralCategory::EnclosingMark
    )
}

/// Unicode NFC, borrowing when the text is already normalized.
fn nfc(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    ComposingNormalizerBorrowed::new_nfc().normalize(text)
}

fn is_nfc(text: &str) -> bool {
    text.is_ascii() || ComposingNormalizerBorrowed::new_nfc().is_normalized(text)
}

/// Python's `str.isspace()`: bidi class WS, B or S, or general category Zs.
fn is_python_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{09}'..='\u{0D}'
            | '\u{1C}'..='\u{20}'
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// Rejects characters that are invalid, unsafe or not sensible in an address: controls,
/// format characters (bidi overrides, zero-width characters), private-use, unassigned and
/// separator characters, and a combining mark at the start (it would combine with whatever
/// precedes the address). Spaces are allowed only where `allow_space` (quoted strings,
/// display names).
fn check_unsafe_chars(s: &str, allow_space: bool) -> Result<()> {
    let mut bad: Vec<char> = Vec::new();
    for (i, c) in s.chars().enumerate() {
        let unsafe_char = if c.is_ascii() {
            c.is_ascii_control() || (c == ' ' && !allow_space)
        } else {
            match general_category(c) {
                GeneralCategory::NonspacingMark
                | GeneralCategory::SpacingMark
                | GeneralCategory::EnclosingMark => i == 0,
                GeneralCategory::SpaceSeparator => !allow_space,
                GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
                | GeneralCategory::Unassigned => true,
                _ => false,
            }
        };
        if unsafe_char {
            bad.push(c);
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_unstable();
    bad.dedup();
    let shown: Vec<String> = bad.into_iter().map(safe_character_display).collect();
    Err(err(format!(
        "The email address contains unsafe characters: {}.",
        shown.join(", ")
    )))
}

/// Python's `repr()` of a string, for messages.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            // Printable ASCII needs no Unicode lookup.
            ' '..='~' => out.push(c),
            c if !c.is_ascii() && is_printable(c) => out.push(c),
            c if u32::from(c) <= 0xFF => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if u32::from(c) <= 0xFFFF => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push_str(&format!("\\U{:08x}", u32::from(c))),
        }
    }
    out.push(quote);
    out
}

/// Python's `str.isprintable()` for one character.
fn is_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    !matches!(
        general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Surrogate
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::SpaceSeparator
    )
}

/// Names of characters that commonly turn up in rejected addresses, for messages (Python
/// prints `unicodedata.name`; the full name table is not worth its size here).
const CHARACTER_NAMES: [(char, &str); 16] = [
    (' ', "SPACE"),
    ('\u{A0}', "NO-BREAK SPACE"),
    ('\u{AD}', "SOFT HYPHEN"),
    ('\u{300}', "COMBINING GRAVE ACCENT"),
    ('\u{301}', "COMBINING ACUTE ACCENT"),
    ('\u{2005}', "FOUR-PER-EM SPACE"),
    ('\u{200B}', "ZERO WIDTH SPACE"),
    ('\u{200C}', "ZERO WIDTH NON-JOINER"),
    ('\u{200D}', "ZERO WIDTH JOINER"),
    ('\u{2028}', "LINE SEPARATOR"),
    ('\u{2029}', "PARAGRAPH SEPARATOR"),
    ('\u{202D}', "LEFT-TO-RIGHT OVERRIDE"),
    ('\u{202E}', "RIGHT-TO-LEFT OVERRIDE"),
    ('\u{2060}', "WORD JOINER"),
    ('\u{3000}', "IDEOGRAPHIC SPACE"),
    ('\u{FEFF}', "ZERO WIDTH NO-BREAK SPACE"),
];

/// How a character is shown in a message: quoted if it is a letter, number, punctuation or
/// symbol, otherwise by name or code point.
fn safe_character_display(c: char) -> String {
    if c == '\\' {
        return "\"\\\"".to_owned();
    }
    let visible = if c.is_ascii() {
        c.is_ascii_graphic()
    } else {
        !matches!(
            general_category(c),
            GeneralCategory::NonspacingMark
                | GeneralCategory::SpacingMark
                | GeneralCategory::EnclosingMark
                | GeneralCategory::SpaceSeparator
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
                | GeneralCategory::Unassigned
        )
    };
    if visible {
        // Python's repr() of a printable character: quoted, with double quotes for a quote.
        let quote = if c == '\'' { '"' } else { '\'' };
        let mut shown = String::with_capacity(c.len_utf8() + 2);
        shown.push(quote);
        shown.push(c);
        shown.push(quote);
        return shown;
    }
    if let Some((_, name)) = CHARACTER_NAMES.iter().find(|(n, _)| *n == c) {
        return (*name).to_owned();
    }
    let cp = u32::from(c);
    if cp < 0xFFFF {
        format!("U+{cp:04X}")
    } else {
        format!("U+{cp:08X}")
    }
}

/// The characters of `text` for which `is_bad` holds, shown for a message, sorted and
/// de-duplicated like Python's `", ".join(sorted({safe_character_display(c) for c in text if
/// ...}))`; `None` when there are none.
fn bad_chars(text: &str, is_bad: impl Fn(char) -> bool) -> Option<String> {
    if !text.chars().any(&is_bad) {
        return None;
    }
    let mut chars: Vec<char> = text.chars().filter(|&c| is_bad(c)).collect();
    chars.sort_unstable();
    chars.dedup();
    Some(sorted_displays(
        chars.into_iter().map(safe_character_display),
    ))
}

/// Sorts and de-duplicates character displays and joins them with ", ".
fn sorted_displays(displays: impl Iterator<Item = String>) -> String {
    let mut all: Vec<String> = displays.collect();
    all.sort_unstable();
    all.dedup();
    all.join(", ")
}

/// "(N character(s) too many)".
fn length_reason(len: usize, limit: usize) -> String {
    let diff = len.saturating_sub(limit);
    let suffix = if diff > 1 { "s" } else { "" };
    format!("({diff} character{suffix} too many)")
}

// === Domain ===

/// A validated domain name.
struct DomainInfo {
    /// Unicode form (A-labels decoded).
    domain: String,
    /// ASCII form (A-labels).
    ascii_domain: String,
}

/// email-validator's `uts46_valid_char`: rejects, with a clear message, characters that UTS #46
/// mapping would reject or turn into a label separator.
fn uts46_valid_char(c: char) -> bool {
    let cp = u32::from(c);
    if (0x80..=0x9F).contains(&cp) {
        return false;
    }
    let permitted = ((0x2010..=0x2060).contains(&cp)
        && !(0x2024..=0x2026).contains(&cp)
        && !(0x2028..=0x202E).contains(&cp))
        || matches!(cp, 0xAD | 0x2064 | 0xFF0E)
        || (0x200B..=0x200D).contains(&cp)
        || (0x1BCA0..=0x1BCA3).contains(&cp);
    if permitted {
        return true;
    }
    if c.is_ascii() {
        return true;
    }
    if matches!(
        general_category(c),
        GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
            | GeneralCategory::SpaceSeparator
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) {
        return false;
    }
    !decomposes_to_full_stop(c)
}

/// RFC 952 / RFC 1123 2.1 host name characters, plus non-ASCII (RFC 6531 3.3).
fn is_hostname_char_intl(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '.' || !c.is_ascii()
}

/// Dot-separated LDH labels that start and end with a letter or digit (email-validator's
/// `DOT_ATOM_TEXT_HOSTNAME`).
fn is_ascii_hostname(domain: &str) -> bool {
    let mut prev = b'.';
    for &b in domain.as_bytes() {
        let ok = match b {
            b'.' => prev != b'.' && prev != b'-',
            b'-' => prev != b'.',
            _ => b.is_ascii_alphanumeric(),
        };
        if !ok {
            return false;
        }
        prev = b;
    }
    prev.is_ascii_alphanumeric()
}

/// RFC 5890 reserves labels with `--` in the third and fourth positions (R-LDH) for encodings;
/// only Punycode's `xn--` is in use.
fn has_reserved_ldh_label(domain: &str) -> bool {
    labels(domain).any(|label| {
        let mut chars = label.chars();
        let (a, b, c, d) = (chars.next(), chars.next(), chars.next(), chars.next());
        matches!((a, b, c, d), (Some(a), Some(b), Some('-'), Some('-'))
            if !(a.eq_ignore_ascii_case(&'x') && b.eq_ignore_ascii_case(&'n')))
    })
}

/// The labels of a domain. A plain loop: labels are short, and splitting at a `char` pattern
/// sets up a `memchr` search for each one.
#[expect(
    clippy::manual_pattern_char_comparison,
    reason = "a closure pattern is the plain loop"
)]
fn labels(domain: &str) -> impl Iterator<Item = &str> {
    domain.split(|c: char| c == '.')
}

/// UTS #46 mapping without validation, like `idna.uts46_remap(d, std3_rules=False,
/// transitional=False)`: case folding, compatibility mappings, ignored characters dropped,
/// NFC.
fn uts46_remap(domain: &str) -> Result<Cow<'_, str>> {
    if domain.is_ascii() {
        if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            return Ok(Cow::Owned(domain.to_ascii_lowercase()));
        }
        return Ok(Cow::Borrowed(domain));
    }
    let mapper = Uts46MapperBorrowed::new();
    let mapped: String = mapper.map_normalize(domain.chars()).collect();
    // Disallowed characters come back as U+FFFD, which is disallowed itself.
    if mapped.contains('\u{FFFD}') {
        let (position, bad) = domain
            .chars()
            .enumerate()
            .find(|&(_, c)| {
                mapper
                    .map_normalize(std::iter::once(c))
                    .any(|m| m == '\u{FFFD}')
            })
            .unwrap_or((0, '\u{FFFD}'));
        return Err(err(format!(
            "The part after the @-sign contains invalid characters (Codepoint U+{:04X} not \
             allowed at position {} in {}).",
            u32::from(bad),
            position + 1,
            py_repr(domain)
        )));
    }
    Ok(Cow::Owned(mapped))
}

/// The character checks on a domain that is not all LDH labels, and its UTS #46 mapping.
fn check_domain_chars(domain: &str) -> Result<Cow<'_, str>> {
    if let Some(bad) = bad_chars(domain, |c| !is_hostname_char_intl(c)) {
        return Err(err(format!(
            "The part after the @-sign contains invalid characters: {bad}."
        )));
    }
    // An ASCII domain that passed the check above has no unsafe characters, and UTS #46
    // accepts every ASCII character.
    if !domain.is_ascii() {
        check_unsafe_chars(domain, false)?;
        if let Some(bad) = bad_chars(domain, |c| !uts46_valid_char(c)) {
            return Err(err(format!(
                "The part after the @-sign contains invalid characters: {bad}."
            )));
        }
    }

    // UTS #46 comes before the period checks because it can create periods (fullwidth and
    // ideographic full stops) and hyphens.
    let mapped = uts46_remap(domain)?;
    if let Some(bad) = bad_chars(&mapped, |c| !is_hostname_char_intl(c)) {
        return Err(err(format!(
            "The part after the @-sign contains invalid characters after Unicode \
             normalization: {bad}."
        )));
    }
    Ok(mapped)
}

/// Validates the part after the @-sign (email-validator's `validate_email_domain_name`).
fn validate_domain_name(domain: &str, opts: &Options) -> Result<DomainInfo> {
    // Checked up front because the input may be used as is, and to bound the IDNA work.
    let len = domain.chars().count();
    if len > DOMAIN_MAX_LENGTH {
        return Err(err(format!(
            "The email address is too long after the @-sign {}.",
            length_reason(len, DOMAIN_MAX_LENGTH)
        )));
    }

    // Most domains are ASCII LDH labels: they pass every character check below, and UTS #46
    // only lowercases them, so the checks up to the dot-atom rules are skipped for them.
    let is_hostname = is_ascii_hostname(domain);
    let mapped = if is_hostname {
        uts46_remap(domain)?
    } else {
        check_domain_chars(domain)?
    };

    // RFC 952, RFC 1123 2.1, RFC 5322 3.2.3. A domain of LDH labels passes these rules.
    let is_hostname = is_hostname || is_ascii_hostname(&mapped);
    if !is_hostname {
        check_dot_atom(
            &mapped,
            "An email address cannot have a {} immediately after the @-sign.",
            "An email address cannot end with a {}.",
            true,
        )?;
    }
    if has_reserved_ldh_label(&mapped) {
        return Err(err(
            "An email address cannot have two letters followed by two dashes immediately after \
             the @-sign or after a period, except Punycode.",
        ));
    }

    // The Unicode form is known once the labels are converted; for an ASCII host name it is
    // decoded from the A-labels further on, if there are any.
    let (ascii_domain, unicode_domain) = if is_hostname {
        (mapped.into_owned(), None)
    } else {
        // Internationalized: convert each label to an A-label (IDNA 2008 validation included).
        let mut ascii = String::with_capacity(mapped.len() * 2);
        let mut unicode = String::with_capacity(mapped.len());
        for (i, label) in mapped.split('.').enumerate() {
            if i > 0 {
                ascii.push('.');
                unicode.push('.');
            }
            idna2008::alabel(label, &mut ascii, &mut unicode)
                .map_err(|e| err(format!("The part after the @-sign is invalid ({e}).")))?;
        }
        if !is_ascii_hostname(&ascii) {
            return Err(err(
                "The email address contains invalid characters after the @-sign after IDNA \
                 encoding.",
            ));
        }
        (ascii, Some(unicode))
    };

    // RFC 1035 2.3.4 and RFC 5321 4.5.3.1.2, in octets of the ASCII form.
    if ascii_domain.len() > DOMAIN_MAX_LENGTH {
        let diff = ascii_domain.len() - DOMAIN_MAX_LENGTH;
        if ascii_domain == domain {
            return Err(err(format!(
                "The email address is too long after the @-sign {}.",
                length_reason(ascii_domain.len(), DOMAIN_MAX_LENGTH)
            )));
        }
        let s = if diff == 1 { "" } else { "s" };
        return Err(err(format!(
            "The email address is too long after the @-sign ({diff} byte{s} too many after IDNA \
             encoding)."
        )));
    }

    // RFC 1035 2.3.1.
    if let Some(label) = labels(&ascii_domain).find(|l| l.len() > DNS_LABEL_LENGTH_LIMIT) {
        return Err(err(format!(
            "After the @-sign, periods cannot be separated by so many characters {}.",
            length_reason(label.len(), DNS_LABEL_LENGTH_LIMIT)
        )));
    }

    if opts.globally_deliverable {
        // Dotless domains are prohibited for gTLDs (ICANN, 2013), so a period is required.
        let allowed_dotless = ascii_domain == TEST_DOMAIN && opts.test_environment;
        if !ascii_domain.contains('.') && !allowed_dotless {
            return Err(err(
                "The part after the @-sign is not valid. It should have a period.",
            ));
        }
        // Every TLD ends with a letter.
        if !ascii_domain
            .as_bytes()
            .last()
            .is_some_and(u8::is_ascii_alphabetic)
        {
            return Err(err(
                "The part after the @-sign is not valid. It is not within a valid top-level \
                 domain.",
            ));
        }
    }

    // Every special-use name is a single label, so only the TLD needs comparing.
    let tld = ascii_domain.rsplit('.').next().unwrap_or_default();
    if is_special_use_tld(tld) && !(tld == TEST_DOMAIN && opts.test_environment) {
        return Err(err(
            "The part after the @-sign is a special-use or reserved name that cannot be used with \
             email.",
        ));
    }

    // Without A-labels the Unicode form is the ASCII form.
    if !ascii_domain.contains(ACE_PREFIX) {
        return Ok(DomainInfo {
            domain: ascii_domain.clone(),
            ascii_domain,
        });
    }

    // The domain may have been given as A-labels: check that they are real IDNA, and get the
    // canonical Unicode form for the normalized address. (`alabel` has already checked and
    // decoded every label it converted.)
    let domain_i18n = match unicode_domain {
        Some(unicode) => unicode,
        None => idna2008::decode(&ascii_domain).map_err(|e| {
            err(format!(
                "The part after the @-sign is not valid IDNA ({e})."
            ))
        })?,
    };

    if let Some(bad) = bad_chars(&domain_i18n, |c| !is_hostname_char_intl(c)) {
        return Err(err(format!(
            "The part after the @-sign contains invalid characters: {bad}."
        )));
    }
    check_unsafe_chars(&domain_i18n, false)?;

    // If any label is right-to-left, the Bidi Rule applies to every label (RFC 5893 1.4 and 2),
    // so that e.g. 1.אב.com and אב.1.com cannot look alike.
    if domain_i18n.chars().any(idna2008::is_rtl_or_arabic_number) {
        for label in domain_i18n.split('.') {
            idna2008::check_bidi(label, true).map_err(|e| {
                err(format!(
                    "The part after the @-sign is not valid IDNA ({e})."
                ))
            })?;
        }
    }

    // email-validator encodes the Unicode form once more here ("became invalid after
    // normalizing to international characters"). That cannot fail: every label of it was
    // checked by `check_label`, and its A-label is the one already in `ascii_domain`, which
    // fits the length limits (Punycode never has fewer characters than its U-label).

    Ok(DomainInfo {
        domain: domain_i18n,
        ascii_domain,
    })
}

// === Length ===

/// Checks the 254-octet limit (RFC 3696 errata 1690) on the address as given, as normalized,
/// and with the ASCII domain, in that order, like email-validator's `validate_email_length`.
fn validate_length(
    original_local: &str,
    original_domain: &str,
    normalized: &str,
    ascii_len: usize,
) -> Result<()> {
    let original_len = original_local.len() + 1 + original_domain.len();
    if original_len > EMAIL_MAX_LENGTH {
        let diff = original_len - EMAIL_MAX_LENGTH;
        let original = format!("{original_local}@{original_domain}");
        let chars = original.chars().count();
        let reason = if chars == original_len {
            length_reason(chars, EMAIL_MAX_LENGTH)
        } else {
            let max_bytes_per_char = original.chars().map(char::len_utf8).max().unwrap_or(1);
            let min_chars = (diff / max_bytes_per_char).max(1);
            let suffix = if diff > 1 { "s" } else { "" };
            if min_chars == diff {
                format!("({diff} character{suffix} too many)")
            } else {
                format!("({min_chars}-{diff} character{suffix} too many)")
            }
        };
        return Err(err(format!("The email address is too long {reason}.")));
    }
    for (len, when) in [
        (normalized.len(), "after normalization"),
        (
            ascii_len,
            "when the part after the @-sign is converted to IDNA ASCII",
        ),
    ] {
        if len > EMAIL_MAX_LENGTH {
            let diff = len - EMAIL_MAX_LENGTH;
            let suffix = if diff > 1 { "s" } else { "" };
            return Err(err(format!(
                "The email address is too long {when} ({diff} byte{suffix} too many)."
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
