//! One-time codes: drawn uniformly from the configured alphabet with the system CSPRNG, and
//! normalized before comparison (spaces and dashes removed, letters upper-cased).

/// Draws a code of `len` characters, each uniform over `alphabet` (rejection sampling: bytes at
/// or above the largest multiple of the alphabet size are thrown away, so there is no modulo
/// bias).
///
/// # Errors
/// The OS random source failed.
pub fn draw(alphabet: &[u8], len: usize) -> Result<String, ring::error::Unspecified> {
    draw_with(&mut crate::random::fill, alphabet, len)
}

/// Random bytes source; a function so tests can script it.
type Fill<'a> = dyn FnMut(&mut [u8]) -> Result<(), ring::error::Unspecified> + 'a;

fn draw_with(
    fill: &mut Fill<'_>,
    alphabet: &[u8],
    len: usize,
) -> Result<String, ring::error::Unspecified> {
    let n = alphabet.len();
    if n == 0 || n > 256 {
        return Err(ring::error::Unspecified);
    }
    let limit = 256 - (256 % n); // accept bytes in [0, limit)
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        fill(&mut buf)?;
        for &b in &buf {
            if usize::from(b) < limit {
                out.push(char::from(alphabet[usize::from(b) % n]));
                if out.len() == len {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// A code as typed by a person, made comparable: spaces and dashes dropped, upper-cased.
/// Returns `None` for input that cannot be a code (too long, or characters outside ASCII
/// alphanumerics), so junk never reaches the MAC.
pub fn normalize(input: &str, max_len: usize) -> Option<String> {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        match c {
            ' ' | '-' | '\u{a0}' | '\t' => {}
            c if c.is_ascii_alphanumeric() => out.push(c.to_ascii_uppercase()),
            _ => return None,
        }
        if out.len() > max_len {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_requested_length_and_alphabet() {
        for _ in 0..100 {
            let c = draw(b"0123456789", 6).expect("rng");
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
        let c = draw(b"ABCDEFGHJKMNPQRSTVWXYZ23456789", 8).expect("rng");
        assert_eq!(c.len(), 8);
    }

    #[test]
    fn every_digit_is_drawn_about_equally_often() {
        // 60,000 digits: each expected 6,000 times; a biased draw (e.g. `byte % 10`, which
        // favours 0-5 by 26/25) would still pass this, so also check rejection directly below.
        let s = draw(b"0123456789", 60_000).expect("rng");
        let mut counts = [0u32; 10];
        for b in s.bytes() {
            counts[usize::from(b - b'0')] += 1;
        }
        for (d, &n) in counts.iter().enumerate() {
            assert!((5400..=6600).contains(&n), "digit {d} drawn {n} times");
        }
    }

    /// A scripted source yielding 250..=255 then 0..: a draw with modulo bias would turn
    /// 250..=255 into 0..=5; the uniform draw must skip them.
    fn scripted(dest: &mut [u8]) -> Result<(), ring::error::Unspecified> {
        for (i, b) in dest.iter_mut().enumerate() {
            *b = if i < 6 { 250 + i as u8 } else { (i - 6) as u8 };
        }
        Ok(())
    }

    #[test]
    fn bytes_above_the_last_full_multiple_are_rejected() {
        let c = draw_with(&mut scripted, b"0123456789", 4).expect("draw");
        assert_eq!(c, "0123");
    }

    #[test]
    fn typed_codes_are_normalized() {
        assert_eq!(normalize("123 456", 6).as_deref(), Some("123456"));
        assert_eq!(normalize("123-456", 6).as_deref(), Some("123456"));
        assert_eq!(normalize("abc-DEF", 6).as_deref(), Some("ABCDEF"));
        assert_eq!(normalize("", 6), None);
        assert_eq!(normalize(" - ", 6), None);
        assert_eq!(normalize("1234567", 6), None);
        assert_eq!(normalize("12345\u{663}", 6), None);
        assert_eq!(normalize("12'; DROP", 6), None);
    }
}
