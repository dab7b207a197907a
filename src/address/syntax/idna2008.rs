//! IDNA 2008 label rules (RFC 5891, 5892, 5893), ported from the Python `idna` package 3.20 that
//! email-validator calls: `alabel`, `ulabel`, `encode`, `decode`, `check_label` and `check_bidi`.
//!
//! Owns: per-label validity (NFC, hyphens, leading combining mark, PVALID / CONTEXTJ / CONTEXTO,
//! the Bidi Rule), Punycode round trips with the canonical-A-label check, label and domain
//! length limits. Does not own: UTS #46 mapping (done by the caller with ICU4X's UTS #46
//! mapper) or any email-specific rule.
//!
//! Code point classes come from the generated `tables` module; Unicode properties (general
//! category, bidi class, combining class) come from ICU4X.

mod tables;

use std::fmt;

use icu_normalizer::uts46::Uts46MapperBorrowed;
use icu_properties::CodePointMapData;
use icu_properties::props::{BidiClass, GeneralCategory};

use super::{general_category, is_nfc};

/// RFC 1035 2.3.1: a label is at most 63 octets.
const MAX_LABEL_OCTETS: usize = 63;
/// RFC 1035 2.3.4 less the root label and its length octet: 253 octets without a trailing dot.
const MAX_DOMAIN_OCTETS: usize = 253;
/// The Python package refuses longer inputs outright, to bound its quadratic Punycode work.
const MAX_INPUT_CHARS: usize = 1024;
/// Prefix of an A-label (RFC 5890 2.3.2.1).
const ACE_PREFIX: &str = "xn--";
/// Characters that `idna` treats as label separators when splitting a domain.
const UNICODE_DOTS: [char; 4] = ['.', '\u{3002}', '\u{FF0E}', '\u{FF61}'];

/// A failed IDNA rule; the message follows the Python `idna` package's wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IdnaError(String);

impl IdnaError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for IdnaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, IdnaError>;

fn in_ranges(table: &[(u32, u32)], c: char) -> bool {
    let cp = u32::from(c);
    table
        .binary_search_by(|&(first, last)| {
            if last < cp {
                std::cmp::Ordering::Less
            } else if first > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn unot(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// Bidi class of `c` (Python's `unicodedata.bidirectional`).
pub(super) fn bidi_class(c: char) -> BidiClass {
    CodePointMapData::<BidiClass>::new().get(c)
}

/// Whether `c` has a right-to-left or Arabic-number bidi class (R, AL or AN).
pub(super) fn is_rtl_or_arabic_number(c: char) -> bool {
    matches!(
        bidi_class(c),
        BidiClass::RightToLeft | BidiClass::ArabicLetter | BidiClass::ArabicNumber
    )
}

/// Applies the Bidi Rule (RFC 5893 section 2) to one label.
///
/// Without `check_ltr` the rule is skipped for labels that have no R, AL or AN character,
/// like `idna.check_bidi`.
pub(super) fn check_bidi(label: &str, check_ltr: bool) -> Result<()> {
    let Some(first) = label.chars().next() else {
        return Ok(());
    };
    if label.len() > MAX_INPUT_CHARS && label.chars().count() > MAX_INPUT_CHARS {
        return Err(IdnaError::new("Label too long"));
    }
    if !check_ltr
        && !label
            .chars()
            .any(|c| !c.is_ascii() && is_rtl_or_arabic_number(c))
    {
        return Ok(());
    }

    // Rule 1: the first character decides the label's direction.
    let rtl = match bidi_class(first) {
        BidiClass::RightToLeft | BidiClass::ArabicLetter => true,
        BidiClass::LeftToRight => false,
        _ => {
            return Err(IdnaError::new(format!(
                "First codepoint in label {} must be directionality L, R or AL",
                super::py_repr(label)
            )));
        }
    };

    let mut valid_ending = false;
    let mut number_type: Option<BidiClass> = None;
    for (idx, c) in label.chars().enumerate() {
        let position = idx + 1;
        let direction = bidi_class(c);
        if rtl {
            // Rule 2: the characters an RTL label may contain.
            let allowed = matches!(
                direction,
                BidiClass::RightToLeft
                    | BidiClass::ArabicLetter
                    | BidiClass::ArabicNumber
                    | BidiClass::EuropeanNumber
                    | BidiClass::EuropeanSeparator
                    | BidiClass::CommonSeparator
                    | BidiClass::EuropeanTerminator
                    | BidiClass::OtherNeutral
                    | BidiClass::BoundaryNeutral
                    | BidiClass::NonspacingMark
            );
            if !allowed {
                return Err(IdnaError::new(format!(
                    "Invalid direction for codepoint at position {position} in a right-to-left label"
                )));
            }
            // Rule 3: the last non-NSM character must be R, AL, EN or AN.
            if matches!(
                direction,
                BidiClass::RightToLeft
                    | BidiClass::ArabicLetter
                    | BidiClass::EuropeanNumber
                    | BidiClass::ArabicNumber
            ) {
                valid_ending = true;
            } else if direction != BidiClass::NonspacingMark {
                valid_ending = false;
            }
            // Rule 4: EN and AN must not both occur.
            if matches!(
                direction,
                BidiClass::ArabicNumber | BidiClass::EuropeanNumber
            ) {
                match number_type {
                    None => number_type = Some(direction),
                    Some(seen) if seen != direction => {
                        return Err(IdnaError::new(
                            "Can not mix numeral types in a right-to-left label",
                        ));
                    }
                    Some(_) => {}
                }
            }
        } else {
            // Rule 5: the characters an LTR label may contain.
            let allowed = matches!(
                direction,
                BidiClass::LeftToRight
                    | BidiClass::EuropeanNumber
                    | BidiClass::EuropeanSeparator
                    | BidiClass::CommonSeparator
                    | BidiClass::EuropeanTerminator
                    | BidiClass::OtherNeutral
                    | BidiClass::BoundaryNeutral
                    | BidiClass::NonspacingMark
            );
            if !allowed {
                return Err(IdnaError::new(format!(
                    "Invalid direction for codepoint at position {position} in a left-to-right label"
                )));
            }
            // Rule 6: the last non-NSM character must be L or EN.
            if matches!(
                direction,
                BidiClass::LeftToRight | BidiClass::EuropeanNumber
            ) {
                valid_ending = true;
            } else if direction != BidiClass::NonspacingMark {
                valid_ending = false;
            }
        }
    }
    if !valid_ending {
        return Err(IdnaError::new(
            "Label ends with illegal codepoint directionality",
        ));
    }
    Ok(())
}

/// Whether `c` has canonical combining class 9 (virama).
fn is_virama(c: char) -> Result<bool> {
    // Python's helper refuses characters without a name, i.e. unassigned ones.
    if general_category(c) == GeneralCategory::Unassigned {
        return Err(IdnaError::new(format!(
            "Unknown codepoint adjacent to joiner {}",
            unot(c)
        )));
    }
    Ok(Uts46MapperBorrowed::new().is_virama(c))
}

/// RFC 5892 Appendix A.1 and A.2 (ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER).
fn valid_contextj(label: &[char], pos: usize) -> Result<bool> {
    let c = label[pos];
    let after_virama = match pos.checked_sub(1) {
        Some(prev) => is_virama(label[prev])?,
        None => false,
    };
    if c == '\u{200D}' {
        return Ok(after_virama);
    }
    if c != '\u{200C}' {
        return Ok(false);
    }
    if after_virama {
        return Ok(true);
    }
    let joins_left = label[..pos]
        .iter()
        .rev()
        .find(|&&x| !in_ranges(tables::JOINING_TYPE_T, x))
        .is_some_and(|&x| {
            in_ranges(tables::JOINING_TYPE_L, x) || in_ranges(tables::JOINING_TYPE_D, x)
        });
    if !joins_left {
        return Ok(false);
    }
    Ok(label[pos + 1..]
        .iter()
        .find(|&&x| !in_ranges(tables::JOINING_TYPE_T, x))
        .is_some_and(|&x| {
            in_ranges(tables::JOINING_TYPE_R, x) || in_ranges(tables::JOINING_TYPE_D, x)
        }))
}

/// RFC 5892 Appendix A.3 to A.9.
fn valid_contexto(label: &[char], pos: usize) -> bool {
    let c = label[pos];
    let next = label.get(pos + 1).copied();
    let prev = pos.checked_sub(1).map(|p| label[p]);
    match c {
        // MIDDLE DOT: only between two l (Catalan l·l).
        '\u{00B7}' => prev == Some('l') && next == Some('l'),
        // GREEK LOWER NUMERAL SIGN (KERAIA): followed by Greek.
        '\u{0375}' => next.is_some_and(|n| in_ranges(tables::SCRIPT_GREEK, n)),
        // HEBREW PUNCTUATION GERESH and GERSHAYIM: preceded by Hebrew.
        '\u{05F3}' | '\u{05F4}' => prev.is_some_and(|p| in_ranges(tables::SCRIPT_HEBREW, p)),
        // KATAKANA MIDDLE DOT: the label has Hiragana, Katakana or Han.
        '\u{30FB}' => label.iter().any(|&x| {
            x != '\u{30FB}'
                && (in_ranges(tables::SCRIPT_HIRAGANA, x)
                    || in_ranges(tables::SCRIPT_KATAKANA, x)
                    || in_ranges(tables::SCRIPT_HAN, x))
        }),
        // ARABIC-INDIC DIGITS: not mixed with EXTENDED ARABIC-INDIC DIGITS, and vice versa.
        '\u{0660}'..='\u{0669}' => !label.iter().any(|x| ('\u{06F0}'..='\u{06F9}').contains(x)),
        '\u{06F0}'..='\u{06F9}' => !label.iter().any(|x| ('\u{0660}'..='\u{0669}').contains(x)),
        _ => false,
    }
}

/// Whether `c` is PVALID; for ASCII that is exactly the lowercase letters, digits and hyphen.
fn is_pvalid(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    }
    in_ranges(tables::PVALID, c)
}

/// All IDNA 2008 checks on one label (`idna.check_label`).
fn check_label(label: &str) -> Result<()> {
    let Some(first) = label.chars().next() else {
        return Err(IdnaError::new("Empty Label"));
    };
    if label.len() > MAX_DOMAIN_OCTETS + 1 {
        let count = label.chars().count();
        if count > MAX_INPUT_CHARS || count > MAX_DOMAIN_OCTETS + 1 {
            return Err(IdnaError::new("Label too long"));
        }
    }
    if !is_nfc(label) {
        return Err(IdnaError::new("Label must be in Normalization Form C"));
    }
    let mut chars = label.chars();
    if chars.nth(2) == Some('-') && chars.next() == Some('-') {
        return Err(IdnaError::new(
            "Label has disallowed hyphens in 3rd and 4th position",
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(IdnaError::new("Label must not start or end with a hyphen"));
    }
    if super::is_mark(first) {
        return Err(IdnaError::new(
            "Label begins with an illegal combining character",
        ));
    }
    // The contextual rules look around a character, so they get the label as a slice; most
    // labels have no such character and skip building it.
    let mut context: Option<Vec<char>> = None;
    for (pos, c) in label.chars().enumerate() {
        if is_pvalid(c) {
            continue;
        }
        let is_contextj = in_ranges(tables::CONTEXTJ, c);
        let is_contexto = !is_contextj && in_ranges(tables::CONTEXTO, c);
        if !is_contextj && !is_contexto {
            return Err(IdnaError::new(format!(
                "Codepoint {} at position {} of {} not allowed",
                unot(c),
                pos + 1,
                super::py_repr(label)
            )));
        }
        let chars = context.get_or_insert_with(|| label.chars().collect());
        if is_contextj {
            if !valid_contextj(chars, pos)? {
                return Err(IdnaError::new(format!(
                    "Joiner {} not allowed at position {} in {}",
                    unot(c),
                    pos + 1,
                    super::py_repr(label)
                )));
            }
        } else if !valid_contexto(chars, pos) {
            return Err(IdnaError::new(format!(
                "Codepoint {} not allowed at position {} in {}",
                unot(c),
                pos + 1,
                super::py_repr(label)
            )));
        }
    }
    check_bidi(label, false)
}

/// Decodes and validates one ASCII label (`idna.ulabel` on bytes): an `xn--` label must be
/// canonical Punycode of a valid U-label; any other label must itself be a valid label.
fn ulabel_ascii(label: &str) -> Result<String> {
    if label.len() > MAX_INPUT_CHARS {
        return Err(IdnaError::new("Label too long"));
    }
    let lower = label.to_ascii_lowercase();
    let Some(encoded) = lower.strip_prefix(ACE_PREFIX) else {
        check_label(&lower)?;
        return Ok(lower);
    };
    if encoded.is_empty() {
        return Err(IdnaError::new(
            "Malformed A-label, no Punycode eligible content found",
        ));
    }
    if encoded.ends_with('-') {
        return Err(IdnaError::new("A-label must not end with a hyphen"));
    }
    let decoded = idna::punycode::decode_to_string(encoded)
        .ok_or_else(|| IdnaError::new("Invalid A-label"))?;
    // RFC 5891 5.3: reject "fake A-labels" that are not the canonical encoding.
    if idna::punycode::encode_str(&decoded).as_deref() != Some(encoded) {
        return Err(IdnaError::new(
            "A-label is not the canonical Punycode encoding of its U-label",
        ));
    }
    check_label(&decoded)?;
    Ok(decoded)
}

/// Converts one label to its A-label (`idna.alabel`), appending it to `ascii`, and appends
/// its U-label to `unicode`: what [`decode`] gives back for that A-label, without decoding it.
pub(super) fn alabel(label: &str, ascii: &mut String, unicode: &mut String) -> Result<()> {
    if label.chars().count() > MAX_INPUT_CHARS {
        return Err(IdnaError::new("Label too long"));
    }
    if label.is_ascii() {
        let ulabel = ulabel_ascii(label)?;
        if label.len() > MAX_LABEL_OCTETS {
            return Err(IdnaError::new("Label too long"));
        }
        ascii.push_str(label);
        unicode.push_str(&ulabel);
        return Ok(());
    }
    check_label(label)?;
    // Punycode keeps every ASCII character and needs at least one more per other character,
    // so a long label is known to be too long without encoding it.
    if ACE_PREFIX.len() + label.chars().count() > MAX_LABEL_OCTETS {
        return Err(IdnaError::new("Label too long"));
    }
    let encoded =
        idna::punycode::encode_str(label).ok_or_else(|| IdnaError::new("Label too long"))?;
    if ACE_PREFIX.len() + encoded.len() > MAX_LABEL_OCTETS {
        return Err(IdnaError::new("Label too long"));
    }
    ascii.push_str(ACE_PREFIX);
    ascii.push_str(&encoded);
    unicode.push_str(label);
    Ok(())
}

/// Splits like `idna.encode`/`idna.decode` (any of the four Unicode full stops), dropping one
/// empty last label that stands for a trailing dot.
fn split_labels(domain: &str) -> Result<(Vec<&str>, bool)> {
    let mut labels: Vec<&str> = domain.split(UNICODE_DOTS).collect();
    if labels.len() == 1 && labels[0].is_empty() {
        return Err(IdnaError::new("Empty domain"));
    }
    let trailing_dot = labels.last().is_some_and(|l| l.is_empty());
    if trailing_dot {
        labels.pop();
    }
    Ok((labels, trailing_dot))
}

/// Converts an ASCII domain that contains A-labels to Unicode (`idna.decode`), validating
/// every label.
pub(super) fn decode(domain: &str) -> Result<String> {
    if !domain.is_ascii() {
        return Err(IdnaError::new("Invalid ASCII in A-label"));
    }
    if domain.len() > MAX_INPUT_CHARS {
        return Err(IdnaError::new("Domain too long"));
    }
    if domain.len() > MAX_DOMAIN_OCTETS + 1 {
        return Err(IdnaError::new("Domain too long"));
    }
    let (labels, trailing_dot) = split_labels(domain)?;
    let mut out = String::with_capacity(domain.len());
    for (i, label) in labels.iter().enumerate() {
        let u = ulabel_ascii(label)?;
        if u.is_empty() {
            return Err(IdnaError::new("Empty label"));
        }
        if i > 0 {
            out.push('.');
        }
        out.push_str(&u);
    }
    if trailing_dot {
        out.push('.');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_and_unicode_labels_convert_like_the_python_package() {
        let (mut ascii, mut unicode) = (String::new(), String::new());
        alabel("bücher", &mut ascii, &mut unicode).unwrap();
        assert_eq!(
            (ascii.as_str(), unicode.as_str()),
            ("xn--bcher-kva", "bücher")
        );
        assert_eq!(decode("xn--bcher-kva.com").unwrap(), "bücher.com");
        // An A-label given as ASCII comes back decoded, as `decode` gives it.
        let (mut ascii, mut unicode) = (String::new(), String::new());
        alabel("xn--bcher-kva", &mut ascii, &mut unicode).unwrap();
        assert_eq!(
            (ascii.as_str(), unicode.as_str()),
            ("xn--bcher-kva", "bücher")
        );
    }

    #[test]
    fn non_canonical_or_malformed_a_labels_are_rejected() {
        assert!(decode("xn---bbk.com").is_err());
        assert!(decode("xn--.com").is_err());
        assert!(decode("xn--abc-.com").is_err());
        assert!(decode("xn--zzzzzzzzzzzzzzzzzzzz.com").is_err());
    }

    #[test]
    fn disallowed_code_points_are_rejected() {
        // U+2603 SNOWMAN is UTS #46 valid but IDNA 2008 DISALLOWED.
        let (mut ascii, mut unicode) = (String::new(), String::new());
        assert!(alabel("\u{2603}", &mut ascii, &mut unicode).is_err());
    }

    #[test]
    fn contexto_rules_follow_rfc_5892() {
        let (mut out, mut unicode) = (String::new(), String::new());
        assert!(alabel("l\u{00B7}l", &mut out, &mut unicode).is_ok());
        assert!(alabel("a\u{00B7}b", &mut out, &mut unicode).is_err());
        assert!(alabel("\u{0628}\u{0660}", &mut out, &mut unicode).is_ok());
        assert!(alabel("\u{0628}\u{0660}\u{06F1}", &mut out, &mut unicode).is_err());
        assert!(alabel("\u{30FB}\u{30A2}", &mut out, &mut unicode).is_ok());
        assert!(alabel("\u{30FB}a", &mut out, &mut unicode).is_err());
    }

    #[test]
    fn bidi_rule_rejects_mixed_direction_labels() {
        assert!(check_bidi("\u{05D0}\u{05D1}", false).is_ok());
        assert!(check_bidi("a\u{05D0}", false).is_err());
        assert!(check_bidi("1", true).is_err());
        assert!(check_bidi("1", false).is_ok());
    }
}
