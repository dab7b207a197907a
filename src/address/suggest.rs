//! "Did you mean …?" suggestions for typos in the domains of big mail providers
//! (`gmial.com` → `gmail.com`, `qq.con` → `qq.com`).
//!
//! Owns: the list of suggestable provider domains, the TLD typo table and the distance
//! thresholds. Does not own: syntax validation (see `syntax`) or DNS; a suggestion is only a
//! hint for the person typing, never a reason to reject an address.
//!
//! Policy: suggest only when the domain is not itself a known domain and exactly one provider
//! domain is close. Close means: a fixed TLD typo (`.con` → `.com`), or a Damerau-Levenshtein
//! (optimal string alignment) distance of 1, or 2 for long names whose TLD already matches.
//! Very short provider names (`qq`, `163`, `aol`, `web`) are easy to hit by accident, so for
//! them only a swap of two neighbouring characters counts.

/// Provider domains that may be suggested.
const PROVIDER_DOMAINS: [&str; 30] = [
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "msn.com",
    "yahoo.com",
    "ymail.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "gmx.de",
    "gmx.net",
    "gmx.com",
    "web.de",
    "t-online.de",
    "mail.ru",
    "yandex.ru",
    "qq.com",
    "163.com",
    "126.com",
    "sina.com",
    "sohu.com",
    "foxmail.com",
    "yeah.net",
    "aliyun.com",
    "naver.com",
    "zoho.com",
];

/// Real domains close to a provider domain: never "corrected", and they make a suggestion
/// ambiguous when they are as close to the input as a provider domain.
const OTHER_KNOWN_DOMAINS: [&str; 40] = [
    "mail.com",
    "email.com",
    "gmx.at",
    "gmx.ch",
    "gmx.fr",
    "mac.com",
    "pm.me",
    "protonmail.ch",
    "hotmail.co.uk",
    "hotmail.fr",
    "hotmail.de",
    "hotmail.it",
    "hotmail.es",
    "hotmail.ca",
    "live.ca",
    "live.co.uk",
    "live.de",
    "live.fr",
    "live.nl",
    "outlook.de",
    "outlook.fr",
    "outlook.es",
    "yahoo.ca",
    "yahoo.co.uk",
    "yahoo.co.jp",
    "yahoo.de",
    "yahoo.fr",
    "yahoo.es",
    "yahoo.it",
    "yahoo.com.br",
    "vip.qq.com",
    "vip.163.com",
    "sina.cn",
    "139.com",
    "189.cn",
    "21cn.com",
    "tom.com",
    "aim.com",
    "hanmail.net",
    "daum.net",
];

/// Misspellings of common TLDs and what they almost certainly meant.
const TLD_TYPOS: [(&str, &str); 16] = [
    ("con", "com"),
    ("cmo", "com"),
    ("ocm", "com"),
    ("om", "com"),
    ("co", "com"),
    ("cm", "com"),
    ("comm", "com"),
    ("coom", "com"),
    ("cpm", "com"),
    ("xom", "com"),
    ("vom", "com"),
    ("comn", "com"),
    ("nte", "net"),
    ("ne", "net"),
    ("nett", "net"),
    ("ed", "de"),
];

/// Largest edit distance accepted for a provider domain of at least
/// [`LONG_DOMAIN_LEN`] characters with the same TLD as the input.
const MAX_DISTANCE_LONG: usize = 2;
/// Largest edit distance accepted otherwise.
const MAX_DISTANCE: usize = 1;
/// Provider domains this long or longer tolerate [`MAX_DISTANCE_LONG`] edits.
const LONG_DOMAIN_LEN: usize = 10;
/// Provider names (the part before the TLD) this short only match swapped neighbours.
const SHORT_NAME_LEN: usize = 3;
/// Longest input considered; anything longer is no typo of a provider domain.
const MAX_INPUT_LEN: usize = 64;

/// Returns the provider domain that `ascii_domain` is most likely a typo of, or `None` when the
/// domain is a known domain, is not close to any provider domain, or is equally close to two.
///
/// `ascii_domain` is compared case-insensitively; pass the ASCII (A-label) form.
pub fn suggest_domain(ascii_domain: &str) -> Option<&'static str> {
    let trimmed = ascii_domain.strip_suffix('.').unwrap_or(ascii_domain);
    if trimmed.is_empty() || trimmed.len() > MAX_INPUT_LEN || !trimmed.is_ascii() {
        return None;
    }
    let lower = trimmed.to_ascii_lowercase();
    if is_known(&lower) {
        return None;
    }
    let (name, tld) = lower.rsplit_once('.')?;

    // A misspelt TLD on an otherwise exact provider name.
    let fixed_tld = TLD_TYPOS
        .iter()
        .find(|(typo, _)| *typo == tld)
        .map(|&(_, correct)| correct);
    let candidate = match fixed_tld {
        Some(correct) => {
            let fixed = format!("{name}.{correct}");
            if let Some(provider) = PROVIDER_DOMAINS.iter().find(|d| **d == fixed) {
                return Some(provider);
            }
            if OTHER_KNOWN_DOMAINS.contains(&fixed.as_str()) {
                return None;
            }
            fixed
        }
        None => lower,
    };

    closest_provider(&candidate)
}

fn is_known(domain: &str) -> bool {
    PROVIDER_DOMAINS.contains(&domain) || OTHER_KNOWN_DOMAINS.contains(&domain)
}

/// The single provider domain within the allowed distance of `domain`, if exactly one is
/// closest and no other known domain is as close.
fn closest_provider(domain: &str) -> Option<&'static str> {
    let tld = domain.rsplit_once('.').map_or("", |(_, tld)| tld);
    let mut best: Option<(&'static str, usize)> = None;
    let mut tied = false;
    for &provider in &PROVIDER_DOMAINS {
        let Some(distance) = allowed_distance(domain, tld, provider) else {
            continue;
        };
        match best {
            Some((_, d)) if distance > d => {}
            Some((_, d)) if distance == d => tied = true,
            _ => {
                best = Some((provider, distance));
                tied = false;
            }
        }
    }
    let (provider, distance) = best?;
    let other_as_close = OTHER_KNOWN_DOMAINS
        .iter()
        .any(|known| osa_distance(domain, known, distance) <= distance);
    (!tied && !other_as_close).then_some(provider)
}

/// The distance from `domain` to `provider` if it is within the policy's limit for them.
fn allowed_distance(domain: &str, tld: &str, provider: &'static str) -> Option<usize> {
    let (provider_name, provider_tld) = provider.rsplit_once('.')?;
    if provider_name.len() <= SHORT_NAME_LEN {
        // Only a swap of two neighbouring characters, e.g. "oal.com" for "aol.com".
        return is_adjacent_swap(domain, provider).then_some(1);
    }
    let limit = if provider.len() >= LONG_DOMAIN_LEN && provider_tld == tld {
        MAX_DISTANCE_LONG
    } else {
        MAX_DISTANCE
    };
    let distance = osa_distance(domain, provider, limit);
    (distance >= 1 && distance <= limit).then_some(distance)
}

fn is_adjacent_swap(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diffs: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    matches!(diffs.as_slice(), [i, j] if *j == i + 1 && a[*i] == b[*j] && a[*j] == b[*i])
}

/// Damerau-Levenshtein distance in its optimal-string-alignment form (insertions, deletions,
/// substitutions, and swaps of neighbouring characters) between two ASCII strings. Returns
/// `limit + 1` as soon as the distance is known to exceed `limit`.
fn osa_distance(a: &str, b: &str, limit: usize) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > limit {
        return limit + 1;
    }
    let width = b.len() + 1;
    // Three rows of the dynamic-programming table: two rows back, previous, current.
    let mut before: Vec<usize> = vec![0; width];
    let mut previous: Vec<usize> = (0..width).collect();
    let mut current: Vec<usize> = vec![0; width];
    for i in 1..=a.len() {
        current[0] = i;
        let mut row_min = current[0];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut value = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                value = value.min(before[j - 2] + 1);
            }
            current[j] = value;
            row_min = row_min.min(value);
        }
        if row_min > limit {
            return limit + 1;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()].min(limit + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_typos_get_the_provider_domain() {
        let cases = [
            ("gmial.com", "gmail.com"),
            ("gmai.com", "gmail.com"),
            ("gmaill.com", "gmail.com"),
            ("gamil.com", "gmail.com"),
            ("gmail.co", "gmail.com"),
            ("gmail.con", "gmail.com"),
            ("gmail.cmo", "gmail.com"),
            ("gmail.om", "gmail.com"),
            ("GMIAL.COM", "gmail.com"),
            ("gmial.con", "gmail.com"),
            ("hotmial.com", "hotmail.com"),
            ("hotmal.com", "hotmail.com"),
            ("hotmail.con", "hotmail.com"),
            ("outlok.com", "outlook.com"),
            ("outlook.co", "outlook.com"),
            ("yaho.com", "yahoo.com"),
            ("yahooo.com", "yahoo.com"),
            ("iclod.com", "icloud.com"),
            ("icloud.cm", "icloud.com"),
            ("qq.con", "qq.com"),
            ("qq.co", "qq.com"),
            ("163.con", "163.com"),
            ("oal.com", "aol.com"),
            ("aol.con", "aol.com"),
            ("protonmial.com", "protonmail.com"),
            ("proton.mee", "proton.me"),
            ("gmx.ed", "gmx.de"),
            ("foxmial.com", "foxmail.com"),
            ("yeah.nte", "yeah.net"),
            ("googlemial.com", "googlemail.com"),
        ];
        for (input, expected) in cases {
            assert_eq!(suggest_domain(input), Some(expected), "{input}");
        }
    }

    #[test]
    fn known_domains_get_no_suggestion() {
        for domain in PROVIDER_DOMAINS.iter().chain(OTHER_KNOWN_DOMAINS.iter()) {
            assert_eq!(suggest_domain(domain), None, "{domain}");
        }
    }

    #[test]
    fn domains_far_from_every_provider_get_no_suggestion() {
        for domain in [
            "example.org",
            "example.com",
            "mycompany.com",
            "university.edu",
            "gmail",
            "",
            ".",
            "g.com",
            "qa.com",
            "123.com",
            "168.com",
            "we.de",
            "webb.de",
            "gmx.at",
            "gmail.com.",
            "GMAIL.COM",
            "hotmail.ca",
            "yahoo.ca",
            "protonmail.ch",
            "bücher.de",
            "xn--bcher-kva.de",
        ] {
            assert_eq!(suggest_domain(domain), None, "{domain:?}");
        }
    }

    #[test]
    fn ambiguous_or_known_neighbours_get_no_suggestion() {
        // "hotmai.com" is one edit from "hotmail.com" only; "mail.co" fixes to the real
        // "mail.com", which is not a typo; "gmx.ne" and "me.co" are TLD typos.
        assert_eq!(suggest_domain("hotmai.com"), Some("hotmail.com"));
        assert_eq!(suggest_domain("mail.co"), None);
        assert_eq!(suggest_domain("gmx.ne"), Some("gmx.net"));
        assert_eq!(suggest_domain("me.co"), Some("me.com"));
        assert_eq!(suggest_domain("ymial.com"), Some("ymail.com"));
        // One edit from both "gmail.com" and "ymail.com".
        assert_eq!(suggest_domain("xmail.com"), None);
        // One edit from "mail.com", a real provider that is not suggested.
        assert_eq!(suggest_domain("mall.com"), None);
    }

    #[test]
    fn osa_distance_counts_swaps_as_one_edit() {
        assert_eq!(osa_distance("gmial.com", "gmail.com", 5), 1);
        assert_eq!(osa_distance("gmail.co", "gmail.com", 5), 1);
        assert_eq!(osa_distance("abc", "abc", 5), 0);
        assert_eq!(osa_distance("kitten", "sitting", 5), 3);
        assert_eq!(osa_distance("kitten", "sitting", 1), 2);
        assert_eq!(osa_distance("", "abc", 5), 3);
    }
}
