//! Reading `.eml` files written by the file transport.

use std::path::Path;
use std::time::Duration;

/// Decodes quoted-printable (soft breaks and `=XX`).
pub fn decode_qp(s: &str) -> String {
    let s = s.replace("=\r\n", "").replace("=\n", "");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes every MIME part (quoted-printable or base64) and joins them.
pub fn decode_parts(raw: &str) -> String {
    use base64::Engine;
    let Some(b) = raw.find("boundary=\"") else {
        return decode_qp(raw);
    };
    let rest = &raw[b + "boundary=\"".len()..];
    let boundary = format!("--{}", &rest[..rest.find('"').unwrap_or(0)]);
    let mut out = String::new();
    for part in raw.split(&boundary).skip(1) {
        let Some((head, body)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let head_l = head.to_ascii_lowercase();
        if head_l.contains("content-transfer-encoding: base64") {
            let clean: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(clean.trim_end_matches("--"))
                .unwrap_or_default();
            out.push_str(&String::from_utf8_lossy(&bytes));
        } else if head_l.contains("quoted-printable") {
            out.push_str(&decode_qp(body));
        } else {
            out.push_str(body);
        }
        out.push('\n');
    }
    out
}

/// A delivered mail.
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: String,
    pub decoded: String,
}

impl Mail {
    /// The first `/v/` link in the text part.
    pub fn link(&self, base: &str) -> Option<String> {
        let start = self.decoded.find(&format!("{base}/v/"))?;
        let rest = &self.decoded[start..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '<' || c == '"')
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    }

    /// The code after "code: " (English text part).
    pub fn code(&self) -> Option<String> {
        let i = self.decoded.find("this code: ")?;
        Some(
            self.decoded[i + "this code: ".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect(),
        )
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next()?;
        head.lines()
            .find(|l| {
                l.to_ascii_lowercase()
                    .starts_with(&format!("{}:", name.to_ascii_lowercase()))
            })
            .map(|l| l[name.len() + 1..].trim().to_string())
    }
}

/// All mails in `dir`, oldest first (names are time-ordered ids).
pub fn read_all(dir: &Path) -> Vec<Mail> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let raw = std::fs::read_to_string(&p).expect("read eml");
            Mail {
                decoded: decode_parts(&raw),
                raw,
            }
        })
        .collect()
}

/// Waits (polling, bounded) until `dir` holds at least `n` mails.
pub async fn wait_for(dir: &Path, n: usize) -> Vec<Mail> {
    for _ in 0..500 {
        let all = read_all(dir);
        if all.len() >= n {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} mails in {}, found {}",
        dir.display(),
        read_all(dir).len()
    );
}
