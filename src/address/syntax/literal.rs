//! Domain literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 4.1.3): parsing with the
//! exact acceptance rules of Python's `ipaddress` module (which email-validator uses), and
//! the normalized text form.
//!
//! Owns: IPv4 and IPv6 text parsing and formatting. Does not own: whether literals are
//! allowed at all (the caller checks `allow_domain_literal`).

use super::{Result, bad_chars, err};

/// The only address-literal tag registered with IANA (RFC 5321 4.1.3); case-insensitive.
const IPV6_TAG: &str = "ipv6:";
/// Number of 16-bit groups in an IPv6 address.
const HEXTET_COUNT: usize = 8;
/// Most characters a decimal IPv4 octet may have.
const MAX_OCTET_DIGITS: usize = 3;
/// Most characters an IPv6 hextet may have.
const MAX_HEXTET_DIGITS: usize = 4;
/// Longest dotted-quad text (`255.255.255.255`).
const MAX_IPV4_TEXT_LEN: usize = 15;
/// Longest IPv6 text this module writes (eight four-digit groups and seven colons).
const MAX_IPV6_TEXT_LEN: usize = 39;
/// Most colon-separated pieces a valid IPv6 text has (`1::2:3:4:5:6:7` style texts have 9;
/// one more is room for an IPv4 suffix split into two).
const MAX_IPV6_PIECES: usize = HEXTET_COUNT + 2;

/// The IPv4-mapped IPv6 prefix `::ffff:0:0/96` (RFC 4291 2.5.5.2), as the first six hextets.
const IPV4_MAPPED_PREFIX: [u16; 6] = [0, 0, 0, 0, 0, 0xFFFF];

/// Validates the text between the brackets of a domain literal and returns the normalized
/// literal with its brackets (`[192.0.2.1]` or `[IPv6:2001:db8::1]`).
pub(super) fn validate_domain_literal(literal: &str) -> Result<String> {
    // email-validator tests `^[0-9\.]+$` with Python's `re`, whose `$` also matches before a
    // final newline; such a literal then fails as an IPv4 address.
    let dotted = literal.strip_suffix('\n').unwrap_or(literal);
    if !dotted.is_empty() && dotted.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match parse_ipv4(literal) {
            Ok(octets) => {
                let mut out = String::with_capacity(MAX_IPV4_TEXT_LEN + 2);
                out.push('[');
                push_ipv4(&mut out, octets);
                out.push(']');
                Ok(out)
            }
            Err(reason) => Err(err(format!(
                "The address in brackets after the @-sign is not valid: It is not an IPv4 \
                 address ({reason}) or is missing an address literal tag."
            ))),
        };
    }

    if let Some(tag) = literal.get(..IPV6_TAG.len())
        && tag.eq_ignore_ascii_case(IPV6_TAG)
    {
        let full = &literal[IPV6_TAG.len()..];
        if full.contains('/') {
            return Err(err(format!(
                "The IPv6 address in brackets after the @-sign is not valid (Unexpected '/' in \
                 {}).",
                super::py_repr(full)
            )));
        }
        let (address, zone) = match full.split_once('%') {
            Some((addr, zone)) => {
                if zone.is_empty() || zone.contains('%') {
                    return Err(err(format!(
                        "The IPv6 address in brackets after the @-sign is not valid (Invalid IPv6 \
                         address: \"{}\").",
                        super::py_repr(full)
                    )));
                }
                (addr, Some(zone))
            }
            None => (full, None),
        };
        let hextets = parse_ipv6(address).map_err(|reason| {
            err(format!(
                "The IPv6 address in brackets after the @-sign is not valid ({reason})."
            ))
        })?;
        if zone.is_some() {
            return Err(err(
                "The IPv6 address in brackets after the @-sign is not valid (It has a zone index).",
            ));
        }
        let mut out = String::with_capacity(IPV6_TAG.len() + MAX_IPV6_TEXT_LEN + 2);
        out.push_str("[IPv6:");
        push_ipv6(&mut out, &hextets);
        out.push(']');
        return Ok(out);
    }

    if !literal.contains(':') {
        return Err(err(
            "The part after the @-sign in brackets is not an IPv4 address and has no address \
             literal tag.",
        ));
    }

    // RFC 5322 dtext; the tag is unregistered anyway, so this only picks the message.
    if let Some(bad) = bad_chars(literal, |c| !('\u{21}'..='\u{FA}').contains(&c)) {
        return Err(err(format!(
            "The part after the @-sign contains invalid characters in brackets: {bad}."
        )));
    }
    Err(err(
        "The part after the @-sign contains an invalid address literal tag in brackets.",
    ))
}

/// Python's `IPv4Address` parser: four decimal octets, no leading zeros, each at most 255.
fn parse_ipv4(text: &str) -> std::result::Result<[u8; 4], String> {
    if text.is_empty() {
        return Err("Address cannot be empty".into());
    }
    let mut octets = [0u8; 4];
    if text.split('.').count() != octets.len() {
        return Err(format!("Expected 4 octets in {}", super::py_repr(text)));
    }
    for (octet, part) in octets.iter_mut().zip(text.split('.')) {
        *octet =
            parse_octet(part).map_err(|reason| format!("{reason} in {}", super::py_repr(text)))?;
    }
    Ok(octets)
}

fn parse_octet(part: &str) -> std::result::Result<u8, String> {
    if part.is_empty() {
        return Err("Empty octet not permitted".into());
    }
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "Only decimal digits permitted in {}",
            super::py_repr(part)
        ));
    }
    if part.len() > MAX_OCTET_DIGITS {
        return Err(format!(
            "At most 3 characters permitted in {}",
            super::py_repr(part)
        ));
    }
    if part != "0" && part.starts_with('0') {
        return Err(format!(
            "Leading zeros are not permitted in {}",
            super::py_repr(part)
        ));
    }
    let value: u16 = part
        .parse()
        .map_err(|_| format!("Only decimal digits permitted in {}", super::py_repr(part)))?;
    u8::try_from(value).map_err(|_| format!("Octet {value} (> 255) not permitted"))
}

fn parse_hextet(part: &str) -> std::result::Result<u16, String> {
    if !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "Only hex digits permitted in {}",
            super::py_repr(part)
        ));
    }
    if part.len() > MAX_HEXTET_DIGITS {
        return Err(format!(
            "At most 4 characters permitted in {}",
            super::py_repr(part)
        ));
    }
    u16::from_str_radix(part, 16).map_err(|_| {
        format!(
            "invalid literal for int() with base 16: {}",
            super::py_repr(part)
        )
    })
}

/// One colon-separated piece of an IPv6 address: text, or a hextet already computed from an
/// IPv4-style suffix.
#[derive(Clone, Copy)]
enum Piece<'a> {
    Text(&'a str),
    Value(u16),
}

impl Piece<'_> {
    fn is_empty(self) -> bool {
        matches!(self, Piece::Text(""))
    }

    fn value(self) -> std::result::Result<u16, String> {
        match self {
            Piece::Text(text) => parse_hextet(text),
            Piece::Value(v) => Ok(v),
        }
    }
}

/// Python's `IPv6Address` parser (3.11), without the zone index.
fn parse_ipv6(text: &str) -> std::result::Result<[u16; HEXTET_COUNT], String> {
    if text.is_empty() {
        return Err("Address cannot be empty".into());
    }
    let repr = || super::py_repr(text);
    // One pass: keep the first pieces (more than fit means too many anyway) and the last.
    let mut pieces = [Piece::Value(0); MAX_IPV6_PIECES];
    let mut raw_count = 0;
    let mut last_text = "";
    for part in text.split(':') {
        if let Some(slot) = pieces.get_mut(raw_count) {
            *slot = Piece::Text(part);
        }
        raw_count += 1;
        last_text = part;
    }
    let min_parts = 3;
    if raw_count < min_parts {
        return Err(format!("At least {min_parts} parts expected in {}", repr()));
    }
    // An IPv4-style suffix becomes two hextets.
    let ipv4_suffix = if last_text.contains('.') {
        Some(parse_ipv4(last_text).map_err(|e| format!("{e} in {}", repr()))?)
    } else {
        None
    };
    let count = raw_count + usize::from(ipv4_suffix.is_some());
    let max_parts = HEXTET_COUNT + 1;
    if count > max_parts {
        return Err(format!(
            "At most {} colons permitted in {}",
            max_parts - 1,
            repr()
        ));
    }
    if let Some([a, b, c, d]) = ipv4_suffix {
        pieces[raw_count - 1] = Piece::Value(u16::from_be_bytes([a, b]));
        pieces[raw_count] = Piece::Value(u16::from_be_bytes([c, d]));
    }
    let parts = &pieces[..count];

    // An empty part strictly inside marks the '::'.
    let mut skip_index = None;
    for (i, part) in parts.iter().enumerate().take(parts.len() - 1).skip(1) {
        if part.is_empty() {
            if skip_index.is_some() {
                return Err(format!("At most one '::' permitted in {}", repr()));
            }
            skip_index = Some(i);
        }
    }

    let last = parts.len() - 1;
    let (parts_hi, parts_lo, parts_skipped) = if let Some(skip) = skip_index {
        let mut hi = skip;
        let mut lo = parts.len() - skip - 1;
        if parts[0].is_empty() {
            hi -= 1;
            if hi > 0 {
                return Err(format!(
                    "Leading ':' only permitted as part of '::' in {}",
                    repr()
                ));
            }
        }
        if parts[last].is_empty() {
            lo -= 1;
            if lo > 0 {
                return Err(format!(
                    "Trailing ':' only permitted as part of '::' in {}",
                    repr()
                ));
            }
        }
        let skipped = HEXTET_COUNT.saturating_sub(hi + lo);
        if skipped < 1 {
            return Err(format!(
                "Expected at most {} other parts with '::' in {}",
                HEXTET_COUNT - 1,
                repr()
            ));
        }
        (hi, lo, skipped)
    } else {
        if parts.len() != HEXTET_COUNT {
            return Err(format!(
                "Exactly {HEXTET_COUNT} parts expected without '::' in {}",
                repr()
            ));
        }
        if parts[0].is_empty() {
            return Err(format!(
                "Leading ':' only permitted as part of '::' in {}",
                repr()
            ));
        }
        if parts[last].is_empty() {
            return Err(format!(
                "Trailing ':' only permitted as part of '::' in {}",
                repr()
            ));
        }
        (parts.len(), 0, 0)
    };

    let mut hextets = [0u16; HEXTET_COUNT];
    let mut n = 0;
    for part in &parts[..parts_hi] {
        hextets[n] = part.value().map_err(|e| format!("{e} in {}", repr()))?;
        n += 1;
    }
    n += parts_skipped;
    for part in &parts[parts.len() - parts_lo..] {
        hextets[n] = part.value().map_err(|e| format!("{e} in {}", repr()))?;
        n += 1;
    }
    Ok(hextets)
}

/// Appends a dotted-quad IPv4 address.
fn push_ipv4(out: &mut String, octets: [u8; 4]) {
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(out, octet);
    }
}

fn push_decimal(out: &mut String, value: u8) {
    let (hundreds, tens, ones) = (value / 100, value / 10 % 10, value % 10);
    if hundreds > 0 {
        out.push(char::from(b'0' + hundreds));
    }
    if hundreds > 0 || tens > 0 {
        out.push(char::from(b'0' + tens));
    }
    out.push(char::from(b'0' + ones));
}

/// Appends a hextet in lowercase hex without leading zeros.
fn push_hextet(out: &mut String, value: u16) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12u16, 8, 4, 0] {
        let digit = usize::from((value >> shift) & 0xF);
        if digit != 0 || started || shift == 0 {
            out.push(char::from(DIGITS[digit]));
            started = true;
        }
    }
}

fn push_hextets(out: &mut String, hextets: &[u16]) {
    for (i, &h) in hextets.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        push_hextet(out, h);
    }
}

/// Appends an IPv6 address formatted per RFC 5952: lowercase hex without leading zeros, the
/// first longest run of two or more zero groups compressed to `::`, and (section 5) mixed
/// notation for IPv4-mapped addresses.
fn push_ipv6(out: &mut String, hextets: &[u16; HEXTET_COUNT]) {
    if hextets
        .iter()
        .zip(IPV4_MAPPED_PREFIX)
        .all(|(&h, prefix)| h == prefix)
    {
        let [a, b] = hextets[6].to_be_bytes();
        let [c, d] = hextets[7].to_be_bytes();
        out.push_str("::ffff:");
        push_ipv4(out, [a, b, c, d]);
        return;
    }

    let (mut best_start, mut best_len) = (0, 0);
    let (mut run_start, mut run_len) = (0, 0);
    for (i, &h) in hextets.iter().enumerate() {
        if h == 0 {
            if run_len == 0 {
                run_start = i;
            }
            run_len += 1;
            if run_len > best_len {
                best_start = run_start;
                best_len = run_len;
            }
        } else {
            run_len = 0;
        }
    }

    if best_len < 2 {
        push_hextets(out, hextets);
        return;
    }
    push_hextets(out, &hextets[..best_start]);
    out.push_str("::");
    push_hextets(out, &hextets[best_start + best_len..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_literals_follow_python_ipaddress() {
        assert_eq!(validate_domain_literal("192.0.2.1").unwrap(), "[192.0.2.1]");
        for bad in [
            "192.0.2.01",
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "1.2.3.4\n",
        ] {
            assert!(validate_domain_literal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipv6_literals_are_compressed() {
        let cases = [
            (
                "IPv6:2001:0db8:0000:0000:0000:0000:0000:0001",
                "[IPv6:2001:db8::1]",
            ),
            ("ipv6:::1", "[IPv6:::1]"),
            ("IPv6:1:0:0:2:0:0:0:3", "[IPv6:1:0:0:2::3]"),
            ("IPv6:1:0:2:3:4:5:6:7", "[IPv6:1:0:2:3:4:5:6:7]"),
            ("IPv6:::", "[IPv6:::]"),
            ("IPv6:1::", "[IPv6:1::]"),
            ("IPv6:::ffff:192.0.2.1", "[IPv6:::ffff:192.0.2.1]"),
            ("IPv6:::ffff:c000:0201", "[IPv6:::ffff:192.0.2.1]"),
            ("IPv6:1:2:3:4:5:6:1.2.3.4", "[IPv6:1:2:3:4:5:6:102:304]"),
        ];
        for (input, expected) in cases {
            assert_eq!(validate_domain_literal(input).unwrap(), expected, "{input}");
        }
    }

    #[test]
    fn malformed_ipv6_literals_are_rejected() {
        for bad in [
            "IPv6:",
            "IPv6:1:2",
            "IPv6:1::2::3",
            "IPv6::1:2:3:4:5:6:7",
            "IPv6:1:2:3:4:5:6:7:",
            "IPv6:1:2:3:4:5:6:7:8:9",
            "IPv6:1::2:3:4:5:6:7:8",
            "IPv6:12345::",
            "IPv6:fe80::1%eth0",
            "IPv6:fe80::1%",
            "IPv6:g::",
            "IPv6:1:2:3:4:5:6:7:1.2.3.4",
            "IPv6:::1/64",
            "foo:bar",
            "x",
        ] {
            assert!(validate_domain_literal(bad).is_err(), "{bad:?}");
        }
    }
}
