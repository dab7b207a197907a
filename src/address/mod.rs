//! Email addresses: parse, normalize and explain ([`syntax`], matching Python's
//! `email-validator`); typo suggestions for big providers ([`suggest`]); can the domain
//! receive mail ([`dns`]); mask for logs ([`mask`]).
//! Parse, don't validate: the rest of the daemon only ever holds an [`EmailAddress`] that came
//! out of [`syntax::parse`].

pub mod dns;
pub mod suggest;
pub mod syntax;

pub use syntax::{EmailAddress, Options, SyntaxError, parse};

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `[address]`: which address forms are accepted, and the disposable-domain policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AddressConfig {
    /// Accept internationalized local parts (SMTPUTF8). Default true.
    pub allow_smtputf8: bool,
    /// Accept quoted local parts (`"john doe"@example.com`). Default false.
    pub allow_quoted_local: bool,
    /// Accept domain literals (`a@[192.0.2.1]`). Default false.
    pub allow_domain_literal: bool,
    /// Accept the special-use `.test` domain (test environments only). Default false.
    pub test_environment: bool,
    /// A file of disposable domains, one per line (`#` comments); addresses at them, or at
    /// their subdomains, get 422 `disposable_domain`. Default none (policy off).
    pub disposable_domains_file: Option<PathBuf>,
}

impl Default for AddressConfig {
    fn default() -> Self {
        AddressConfig {
            allow_smtputf8: true,
            allow_quoted_local: false,
            allow_domain_literal: false,
            test_environment: false,
            disposable_domains_file: None,
        }
    }
}

impl AddressConfig {
    /// Parser options for addresses the daemon accepts.
    pub fn options(&self) -> Options {
        Options {
            allow_smtputf8: self.allow_smtputf8,
            allow_quoted_local: self.allow_quoted_local,
            allow_domain_literal: self.allow_domain_literal,
            test_environment: self.test_environment,
            ..Options::default()
        }
    }
}

/// A set of disposable domains.
#[derive(Debug, Clone, Default)]
pub struct DisposableDomains(HashSet<String>);

impl DisposableDomains {
    /// Reads one domain per line; blank lines and `#` comments are skipped; names are
    /// lower-cased and a trailing dot dropped.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// Parses the file format of [`DisposableDomains::load`].
    pub fn parse(text: &str) -> Self {
        DisposableDomains(
            text.lines()
                .map(|l| {
                    l.split('#')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .trim_end_matches('.')
                        .to_ascii_lowercase()
                })
                .filter(|l| !l.is_empty())
                .collect(),
        )
    }

    /// Whether `ascii_domain` or one of its parent domains is listed.
    pub fn contains(&self, ascii_domain: &str) -> bool {
        let d = ascii_domain.trim_end_matches('.').to_ascii_lowercase();
        let mut rest = d.as_str();
        loop {
            if self.0.contains(rest) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, parent)) if parent.contains('.') => rest = parent,
                _ => return false,
            }
        }
    }

    /// How many domains are listed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Masks an address for logs and admin listings: `zhang.wei@example.com` → `z***@example.com`.
/// Never fails; input without `@` is masked whole.
pub fn mask(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disposable_domains_match_themselves_and_subdomains_only() {
        let d = DisposableDomains::parse("# list\nmailinator.com\n\nTrashMail.de.  # comment\n");
        assert_eq!(d.len(), 2);
        assert!(d.contains("mailinator.com"));
        assert!(d.contains("x.mailinator.com"));
        assert!(d.contains("trashmail.de"));
        assert!(!d.contains("notmailinator.com"));
        assert!(!d.contains("com"));
        assert!(!d.contains("gmail.com"));
    }

    #[test]
    fn addresses_are_masked_for_logs() {
        assert_eq!(mask("zhang.wei@example.com"), "z***@example.com");
        assert_eq!(mask("张伟@例子.中国"), "张***@例子.中国");
        assert_eq!(mask("nonsense"), "***");
        assert_eq!(mask("@x"), "***@x");
    }
}
