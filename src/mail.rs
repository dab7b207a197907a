//! Building RFC 5322 messages. Owns header safety: every header value passes through
//! [`HeaderText`], which cannot hold CR, LF or other control characters, so no input can add a
//! header (`Bcc:`) or end the header block. Bodies come from [`crate::templates`].

use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;

use crate::clock::UnixTime;

/// Text that is safe in a header: control characters (CR and LF among them) are replaced by
/// spaces and runs of whitespace collapsed. The only way to build one is [`HeaderText::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderText(String);

impl HeaderText {
    /// Sanitizes `s` for use in a header.
    pub fn new(s: &str) -> Self {
        let mut out = String::with_capacity(s.len());
        let mut last_space = false;
        for c in s.chars() {
            let c = if c.is_control() { ' ' } else { c };
            if c.is_whitespace() {
                if !last_space && !out.is_empty() {
                    out.push(' ');
                }
                last_space = true;
            } else {
                out.push(c);
                last_space = false;
            }
        }
        HeaderText(out.trim_end().to_string())
    }

    /// The sanitized text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A sender or recipient: optional display name and an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Display name.
    pub name: Option<HeaderText>,
    /// The address.
    pub address: HeaderText,
}

/// A `from` value that is not a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMailbox(&'static str);

/// The domain for Message-IDs of mail sent from `from`: its address's domain, or
/// `verigate.invalid` when it has none.
pub fn message_id_domain(from: &str) -> String {
    parse_mailbox(from)
        .ok()
        .and_then(|m| {
            m.address
                .as_str()
                .rsplit_once('@')
                .map(|(_, d)| d.to_string())
        })
        .unwrap_or_else(|| "verigate.invalid".into())
}

/// Parses `"Name <addr@host>"` or `"addr@host"` (configuration input).
///
/// # Errors
/// Control characters, a missing or repeated `@`, or unbalanced angle brackets.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, InvalidMailbox> {
    if s.chars().any(char::is_control) {
        return Err(InvalidMailbox("must not contain control characters"));
    }
    let s = s.trim();
    let (name, addr) = match (s.rfind('<'), s.ends_with('>')) {
        (Some(i), true) => {
            let name = s[..i].trim().trim_matches('"').trim();
            (
                (!name.is_empty()).then(|| HeaderText::new(name)),
                &s[i + 1..s.len() - 1],
            )
        }
        (None, false) => (None, s),
        _ => return Err(InvalidMailbox("expected \"Name <address>\" or \"address\"")),
    };
    let addr = addr.trim();
    let at = addr.matches('@').count();
    if at != 1
        || addr.starts_with('@')
        || addr.ends_with('@')
        || addr.contains(char::is_whitespace)
        || addr.contains(['<', '>'])
    {
        return Err(InvalidMailbox(
            "the address must look like name@example.com",
        ));
    }
    Ok(Mailbox {
        name,
        address: HeaderText::new(addr),
    })
}

/// What a message says; bodies already rendered.
#[derive(Debug, Clone)]
pub struct Composed {
    /// Sender.
    pub from: Mailbox,
    /// Recipient address (header form; may be internationalized).
    pub to: String,
    /// Subject, any text (sanitized here).
    pub subject: String,
    /// `Message-ID` without angle brackets, stable per outbox entry.
    pub message_id: String,
    /// The `Date` header.
    pub date: UnixTime,
    /// Plain-text part.
    pub text: String,
    /// HTML part.
    pub html: String,
}

impl Composed {
    /// The message as RFC 5322 bytes, multipart/alternative (text, then HTML).
    ///
    /// # Errors
    /// Only on an I/O error writing to memory, which does not happen.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let from_addr = self.from.address.as_str().to_string();
        let from = match &self.from.name {
            Some(n) => mail_builder::headers::address::Address::new_address(
                Some(n.as_str().to_string()),
                from_addr,
            ),
            None => mail_builder::headers::address::Address::new_address(None::<String>, from_addr),
        };
        MessageBuilder::new()
            .from(from)
            .to(HeaderText::new(&self.to).as_str().to_string())
            .subject(HeaderText::new(&self.subject).as_str().to_string())
            .message_id(HeaderText::new(&self.message_id).as_str().to_string())
            .date(i64::try_from(self.date.as_secs()).unwrap_or(i64::MAX))
            .header("Auto-Submitted", Raw::new("auto-generated"))
            .header("X-Auto-Response-Suppress", Raw::new("All"))
            .text_body(self.text.as_str())
            .html_body(self.html.as_str())
            .write_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_cannot_carry_line_breaks() {
        let h = HeaderText::new("Hello\r\nBcc: victim@example.com\n\n<body>");
        assert!(!h.as_str().contains(['\r', '\n']));
        assert_eq!(h.as_str(), "Hello Bcc: victim@example.com <body>");
    }

    #[test]
    fn mailboxes_parse() {
        let m = parse_mailbox("Example Shop <no-reply@example.com>").expect("ok");
        assert_eq!(
            m.name.as_ref().map(HeaderText::as_str),
            Some("Example Shop")
        );
        assert_eq!(m.address.as_str(), "no-reply@example.com");
        assert!(parse_mailbox("no-reply@example.com").is_ok());
        for bad in ["", "x", "a@b@c", "Name <a@b", "a@b.com\r\nBcc: x@y", "<@b>"] {
            assert!(parse_mailbox(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_ids_take_the_sender_domain_or_a_reserved_one() {
        assert_eq!(
            message_id_domain("Shop <no-reply@mail.example.com>"),
            "mail.example.com"
        );
        assert_eq!(message_id_domain(""), "verigate.invalid");
        assert_eq!(message_id_domain("a@b@c"), "verigate.invalid");
    }

    #[test]
    fn an_injected_subject_stays_one_header() {
        let m = Composed {
            from: parse_mailbox("Shop <no-reply@example.com>").expect("ok"),
            to: "a@example.com\r\nBcc: b@example.com".into(),
            subject: "Hi\r\nBcc: c@example.com".into(),
            message_id: "x@y\r\nBcc: d@example.com".into(),
            date: UnixTime(1_795_342_200_000),
            text: "text".into(),
            html: "<p>html</p>".into(),
        };
        let raw = String::from_utf8(m.to_bytes().expect("bytes")).expect("utf8");
        let head = raw.split("\r\n\r\n").next().unwrap_or_default();
        assert!(
            !head
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
            "{head}"
        );
        assert!(head.contains("Auto-Submitted: auto-generated"));
        assert!(raw.contains("multipart/alternative"));
    }
}
