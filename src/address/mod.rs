//! Email addresses: parse, normalize and explain ([`syntax`]); can the domain receive mail
//! ([`dns`]); mask for logs ([`mask`]).
//! Parse, don't validate: the rest of the daemon only ever holds an [`EmailAddress`] that came
//! out of [`syntax::parse`].

pub mod dns;
pub mod syntax;

pub use syntax::{EmailAddress, Options, SyntaxError, parse};

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
    fn addresses_are_masked_for_logs() {
        assert_eq!(mask("zhang.wei@example.com"), "z***@example.com");
        assert_eq!(mask("张伟@例子.中国"), "张***@例子.中国");
        assert_eq!(mask("nonsense"), "***");
        assert_eq!(mask("@x"), "***@x");
    }
}
