//! Templates: built-in mail (subject, text, HTML) and pages (confirm, results) in `en` and
//! `zh-CN`, compiled once at start-up. HTML templates auto-escape; text templates do not.
//! Undefined variables are errors, so a typo fails in tests rather than rendering blanks.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};

/// Locales with built-in templates; the first is the fallback.
pub const LOCALES: [&str; 2] = ["en", "zh-CN"];

/// Template failures (a bug in a template, caught by tests and at start-up).
#[derive(Debug, thiserror::Error)]
#[error("template: {0}")]
pub struct Error(#[from] minijinja::Error);

/// Picks the built-in locale for a requested BCP 47 tag: exact match, then language match
/// (`zh`, `zh-Hans`, `zh-SG` → `zh-CN`), then `default`, then `en`.
pub fn pick_locale(requested: Option<&str>, default: &str) -> &'static str {
    let find = |tag: &str| {
        let tag = tag.trim();
        LOCALES
            .iter()
            .find(|l| l.eq_ignore_ascii_case(tag))
            .or_else(|| {
                let lang = tag.split(['-', '_']).next().unwrap_or_default();
                LOCALES.iter().find(|l| {
                    l.split('-')
                        .next()
                        .is_some_and(|x| x.eq_ignore_ascii_case(lang))
                })
            })
            .copied()
    };
    requested
        .and_then(find)
        .or_else(|| find(default))
        .unwrap_or(LOCALES[0])
}

/// What a verification mail needs.
#[derive(Debug, Clone)]
pub struct MailContext<'a> {
    /// Built-in locale.
    pub locale: &'a str,
    /// Purpose label.
    pub purpose: &'a str,
    /// The recipient.
    pub email: &'a str,
    /// The confirm link, when the method has one.
    pub link: Option<&'a str>,
    /// The code, when the method has one.
    pub code: Option<&'a str>,
    /// Minutes until expiry (rounded up).
    pub expires_minutes: u64,
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    /// Subject line.
    pub subject: String,
    /// Text part.
    pub text: String,
    /// HTML part.
    pub html: String,
}

/// The kinds of page the public listener shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// "Confirm <address>" with one button.
    Confirm,
    /// Confirmed.
    Verified,
    /// Link expired.
    Expired,
    /// Replaced by a newer mail.
    Superseded,
    /// Canceled, locked or failed: no longer usable.
    Closed,
    /// Not a link of ours.
    Invalid,
    /// Something went wrong on our side.
    Error,
}

fn page_text(page: Page, zh: bool) -> (&'static str, &'static str, &'static str) {
    // (title, message, button)
    match (page, zh) {
        (Page::Confirm, false) => (
            "Confirm your email address",
            "Press the button to confirm that this address is yours.",
            "Confirm",
        ),
        (Page::Confirm, true) => (
            "确认您的邮箱地址",
            "请点击下方按钮，确认此邮箱地址属于您。",
            "确认",
        ),
        (Page::Verified, false) => (
            "Email address confirmed",
            "Thank you. You can close this page now.",
            "",
        ),
        (Page::Verified, true) => ("邮箱地址已确认", "谢谢！您现在可以关闭此页面。", ""),
        (Page::Expired, false) => (
            "This link has expired",
            "Go back to the app and ask for a new email.",
            "",
        ),
        (Page::Expired, true) => ("此链接已失效", "请返回应用，重新发送验证邮件。", ""),
        (Page::Superseded, false) => (
            "A newer email was sent",
            "This link was replaced by a newer one. Use the link in the most recent email.",
            "",
        ),
        (Page::Superseded, true) => (
            "已发送更新的邮件",
            "此链接已被新链接取代，请使用最新邮件中的链接。",
            "",
        ),
        (Page::Closed, false) => (
            "This link can no longer be used",
            "Go back to the app to start again.",
            "",
        ),
        (Page::Closed, true) => ("此链接已无法使用", "请返回应用重新开始。", ""),
        (Page::Invalid, false) => (
            "This link is not valid",
            "It may have been copied incompletely. Open the link from the email again, or ask the app for a new email.",
            "",
        ),
        (Page::Invalid, true) => (
            "此链接无效",
            "链接可能复制不完整。请重新打开邮件中的链接，或在应用中重新发送邮件。",
            "",
        ),
        (Page::Error, false) => ("Something went wrong", "Please try again in a moment.", ""),
        (Page::Error, true) => ("出错了", "请稍后再试。", ""),
    }
}

/// The compiled templates.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Compiles the built-in templates.
    ///
    /// # Errors
    /// A template does not compile (a bug; tests catch it).
    pub fn builtin() -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.add_template("en/mail.subject.txt", include_str!("en/mail.subject.txt"))?;
        env.add_template("en/mail.txt", include_str!("en/mail.txt"))?;
        env.add_template("en/mail.html", include_str!("en/mail.html"))?;
        env.add_template(
            "zh-CN/mail.subject.txt",
            include_str!("zh-CN/mail.subject.txt"),
        )?;
        env.add_template("zh-CN/mail.txt", include_str!("zh-CN/mail.txt"))?;
        env.add_template("zh-CN/mail.html", include_str!("zh-CN/mail.html"))?;
        env.add_template("page.html", include_str!("page.html"))?;
        Ok(Templates { env })
    }

    /// Renders a verification mail.
    ///
    /// # Errors
    /// A template bug.
    pub fn render_mail(&self, m: &MailContext<'_>) -> Result<RenderedMail, Error> {
        let locale = pick_locale(Some(m.locale), "en");
        let ctx = context! {
            purpose => m.purpose,
            email => m.email,
            link => m.link,
            code => m.code,
            expires_minutes => m.expires_minutes,
        };
        let get = |part: &str| self.env.get_template(&format!("{locale}/mail.{part}"));
        Ok(RenderedMail {
            subject: get("subject.txt")?.render(&ctx)?.trim().to_string(),
            text: get("txt")?.render(&ctx)?,
            html: get("html")?.render(&ctx)?,
        })
    }

    /// Renders a page for people. `action` is the form target of the confirm page.
    ///
    /// # Errors
    /// A template bug.
    pub fn render_page(
        &self,
        page: Page,
        locale: &str,
        email: Option<&str>,
        action: Option<&str>,
    ) -> Result<String, Error> {
        let locale = pick_locale(Some(locale), "en");
        let (title, message, button) = page_text(page, locale == "zh-CN");
        Ok(self.env.get_template("page.html")?.render(context! {
            lang => locale,
            title => title,
            message => message,
            button => button,
            email => email,
            action => action,
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_are_picked_by_tag_then_language_then_default() {
        assert_eq!(pick_locale(Some("zh-CN"), "en"), "zh-CN");
        assert_eq!(pick_locale(Some("zh-Hans"), "en"), "zh-CN");
        assert_eq!(pick_locale(Some("ZH"), "en"), "zh-CN");
        assert_eq!(pick_locale(Some("en-GB"), "en"), "en");
        assert_eq!(pick_locale(Some("fr"), "zh-CN"), "zh-CN");
        assert_eq!(pick_locale(None, "de"), "en");
    }

    #[test]
    fn mails_carry_link_and_code_in_both_locales_and_escape_html() {
        let t = Templates::builtin().expect("compile");
        for locale in LOCALES {
            let m = t
                .render_mail(&MailContext {
                    locale,
                    purpose: "signup",
                    email: "<b>x</b>@example.com",
                    link: Some("https://v.example/v/abc?x=1&y=2"),
                    code: Some("123456"),
                    expires_minutes: 10,
                })
                .expect("render");
            assert!(
                m.text.contains("https://v.example/v/abc?x=1&y=2"),
                "{locale}"
            );
            assert!(m.text.contains("123456"));
            assert!(m.html.contains("123456"));
            assert!(m.html.contains("&amp;y=2"), "{}", m.html);
            assert!(!m.html.contains("<b>x</b>"), "escaped");
            assert!(!m.subject.contains('\n'));
        }
        let zh = t
            .render_mail(&MailContext {
                locale: "zh-CN",
                purpose: "signup",
                email: "a@example.com",
                link: None,
                code: Some("654321"),
                expires_minutes: 10,
            })
            .expect("render");
        assert_eq!(zh.subject, "您的验证码：654321");
        assert!(!zh.text.contains("http"));
    }

    #[test]
    fn pages_render_in_both_locales() {
        let t = Templates::builtin().expect("compile");
        let p = t
            .render_page(
                Page::Confirm,
                "zh-CN",
                Some("a@example.com"),
                Some("/v/tok"),
            )
            .expect("render");
        assert!(p.contains("确认您的邮箱地址"));
        assert!(p.contains("method=\"post\""));
        let p = t
            .render_page(Page::Invalid, "en", None, None)
            .expect("render");
        assert!(p.contains("This link is not valid"));
        assert!(!p.contains("<form"));
    }
}
