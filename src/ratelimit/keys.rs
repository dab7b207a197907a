//! Key normalization for rate limits: pure functions that decide which requests share a bucket.
//!
//! Owns the rules "what counts as the same recipient, domain or client"; does not hash keys or
//! touch limiter state (see the parent module). Invariants:
//!
//! - Two spellings of one key normalize to the same value (`A@X.test` and `a@x.test`).
//! - One end user cannot escape a per-IP limit by rotating addresses inside what they normally
//!   own: an IPv6 client is reduced to its `/64` (the smallest prefix a site is assigned), an
//!   IPv4 client stays a single address (`/32`), and an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
//!   is the IPv4 address it carries, so a dual-stack proxy cannot split one client in two.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};

/// Prefix length an IPv6 client is reduced to: one `/64` is the smallest block a site gets, so
/// every address in it is assumed to belong to one end user.
pub const IPV6_CLIENT_PREFIX_LEN: u32 = 64;

/// The per-recipient key of an email address: the address lower-cased.
///
/// Lower-casing the local part is deliberate even though RFC 5321 lets it be case-sensitive:
/// for limits, `Bob@x.test` and `bob@x.test` must share one bucket or an attacker doubles the
/// rate by changing case. Borrows when the address is already lower-case (the verification
/// service already lower-cases its `email_key`), so the hot path does not allocate.
#[must_use]
pub fn email_key(email: &str) -> Cow<'_, str> {
    lower(email)
}

/// The per-domain key of a recipient domain: lower-cased, without a trailing root dot.
///
/// Pass the ASCII (A-label) form so that `bücher.test` and `xn--bcher-kva.test` share a bucket.
#[must_use]
pub fn domain_key(domain: &str) -> Cow<'_, str> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    lower(trimmed)
}

/// The per-client key of an end user's IP address.
///
/// IPv4 stays whole; an IPv4-mapped IPv6 address becomes the IPv4 address it carries; any other
/// IPv6 address is masked to its [`IPV6_CLIENT_PREFIX_LEN`] network.
#[must_use]
pub fn client_ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(
                v6.to_bits() & ipv6_prefix_mask(IPV6_CLIENT_PREFIX_LEN),
            )),
        },
    }
}

/// The network mask of an IPv6 prefix of `len` bits (`len` above 128 means 128).
fn ipv6_prefix_mask(len: u32) -> u128 {
    u128::MAX
        .checked_shl(u128::BITS - len.min(u128::BITS))
        .unwrap_or(0)
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(s.to_ascii_lowercase())
        } else {
            Cow::Borrowed(s)
        }
    } else {
        let lowered = s.to_lowercase();
        if lowered == s {
            Cow::Borrowed(s)
        } else {
            Cow::Owned(lowered)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test literal is an IP address")
    }

    #[test]
    fn email_keys_ignore_case_in_both_parts() {
        let cases = [
            ("bob@example.test", "bob@example.test"),
            ("Bob@Example.TEST", "bob@example.test"),
            ("ÅSA@Bücher.test", "åsa@bücher.test"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(email_key(input), want, "input {input:?}");
        }
    }

    #[test]
    fn an_already_lower_case_email_key_is_borrowed_not_copied() {
        assert!(matches!(email_key("bob@example.test"), Cow::Borrowed(_)));
        assert!(matches!(email_key("åsa@bücher.test"), Cow::Borrowed(_)));
        assert!(matches!(email_key("Bob@example.test"), Cow::Owned(_)));
    }

    #[test]
    fn domain_keys_ignore_case_and_one_trailing_root_dot() {
        let cases = [
            ("example.test", "example.test"),
            ("Example.TEST", "example.test"),
            ("example.test.", "example.test"),
            ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ];
        for (input, want) in cases {
            assert_eq!(domain_key(input), want, "input {input:?}");
        }
    }

    #[test]
    fn ipv4_clients_are_kept_whole() {
        assert_eq!(client_ip_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(
            client_ip_key(ip("192.0.2.7")),
            client_ip_key(ip("192.0.2.8"))
        );
    }

    #[test]
    fn ipv6_clients_are_reduced_to_their_slash_64() {
        let cases = [
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
            ("::1", "::"),
        ];
        for (input, want) in cases {
            assert_eq!(client_ip_key(ip(input)), ip(want), "input {input}");
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_clients_are_treated_as_ipv4() {
        assert_eq!(
            client_ip_key(ip("::ffff:192.0.2.7")),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
        );
        assert_ne!(
            client_ip_key(ip("::ffff:192.0.2.7")),
            client_ip_key(ip("::ffff:192.0.2.8"))
        );
    }

    #[test]
    fn prefix_masks_cover_the_edges() {
        assert_eq!(ipv6_prefix_mask(0), 0);
        assert_eq!(ipv6_prefix_mask(64), u128::MAX << 64);
        assert_eq!(ipv6_prefix_mask(128), u128::MAX);
        assert_eq!(ipv6_prefix_mask(200), u128::MAX);
    }
}
