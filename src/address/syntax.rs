//! Address syntax (interim): a conservative subset of RFC 5321 dot-atoms with lower-cased ASCII
//! domains. The full email-validator-compatible parser replaces this module.

use serde::Deserialize;

/// Parser options (email-validator names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Allow internationalized local parts.
    pub allow_smtputf8: bool,
    /// Allow quoted local parts.
    pub allow_quoted_local: bool,
    /// Allow `[1.2.3.4]` domains.
    pub allow_domain_literal: bool,
    /// Allow `Name <addr>`.
    pub allow_display_name: bool,
    /// Allow `@domain`.
    pub allow_empty_local: bool,
    /// Require a globally deliverable domain.
    pub globally_deliverable: bool,
    /// Allow `.test`.
    pub test_environment: bool,
    /// Stricter checks.
    pub strict: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
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

/// A parsed, normalized address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress {
    /// The input.
    pub original: String,
    /// Normalized form.
    pub normalized: String,
    /// Local part.
    pub local_part: String,
    /// Domain.
    pub domain: String,
    /// ASCII domain.
    pub ascii_domain: String,
    /// ASCII address, when the local part is ASCII.
    pub ascii_email: Option<String>,
    /// Needs SMTPUTF8.
    pub smtputf8: bool,
    /// Display name.
    pub display_name: Option<String>,
}

/// Why an address was refused, for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    /// The sentence.
    pub message: String,
}

fn err(m: &str) -> SyntaxError {
    SyntaxError {
        message: m.to_string(),
    }
}

/// Parses and normalizes an address.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn parse(input: &str, opts: &Options) -> Result<EmailAddress, SyntaxError> {
    let (local, domain) = input
        .rsplit_once('@')
        .ok_or_else(|| err("The email address is not valid. It must have exactly one @-sign."))?;
    if local.contains('@') {
        return Err(err(
            "The email address is not valid. It must have exactly one @-sign.",
        ));
    }
    if local.is_empty() || local.len() > 64 {
        return Err(err("The part before the @-sign is not valid."));
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(err(
            "The part before the @-sign cannot start or end with a period or have two periods in a row.",
        ));
    }
    if !local.chars().all(|c| {
        c == '.'
            || atext(c)
            || (opts.allow_smtputf8 && !c.is_ascii() && !c.is_control() && !c.is_whitespace())
    }) {
        return Err(err(
            "The part before the @-sign contains invalid characters.",
        ));
    }
    let domain_l = domain.to_ascii_lowercase();
    let labels: Vec<&str> = domain_l.split('.').collect();
    if labels.len() < 2
        || labels.iter().any(|l| {
            l.is_empty()
                || l.len() > 63
                || l.starts_with('-')
                || l.ends_with('-')
                || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    {
        return Err(err("The domain name is not valid."));
    }
    let tld = labels.last().copied().unwrap_or_default();
    if ["localhost", "invalid", "local", "onion", "arpa"].contains(&tld)
        || (tld == "test" && !opts.test_environment)
    {
        return Err(err(
            "The domain name is a special-use or reserved name that cannot be used with email.",
        ));
    }
    let normalized = format!("{local}@{domain_l}");
    if normalized.len() > 254 {
        return Err(err("The email address is too long."));
    }
    let smtputf8 = !local.is_ascii();
    Ok(EmailAddress {
        original: input.to_string(),
        normalized: normalized.clone(),
        local_part: local.to_string(),
        domain: domain_l.clone(),
        ascii_domain: domain_l,
        ascii_email: (!smtputf8).then_some(normalized),
        smtputf8,
        display_name: None,
    })
}
