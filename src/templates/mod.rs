//! Templates: built-in mail (subject, text, HTML) and pages (confirm, results) in `en` and
//! `zh-CN`, compiled once at start-up. HTML templates auto-escape; text templates do not.
//! Undefined variables are errors, so a typo fails in tests rather than rendering blanks.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};

/// Locales with built-in templates; the first is the fallback.
pub const LOCALES: [&str; 2] = ["en", "zh-CN"];

/// Template failures: a bug in a built-in template (caught by tests), or an operator's override
/// that does not compile, render or fit the layout (caught at start-up and by `config check`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A template does not compile or render.
    #[error("template: {0:#}")]
    Template(#[from] minijinja::Error),
    /// An override file or folder could not be read.
    #[error("template overrides: cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An override is not where the layout expects it (a typo would silently never apply).
    #[error("template overrides: {path}: {problem}")]
    Layout {
        /// The file or folder.
        path: String,
        /// What is wrong and what is expected.
        problem: String,
    },
}

/// Mail parts, the file names of overrides: `<dir>/<purpose>/<locale>/mail.<part>`.
const MAIL_PARTS: [&str; 3] = ["subject.txt", "txt", "html"];

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
    /// The app (its overrides apply).
    pub app: &'a str,
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

    /// The built-in templates plus each app's overrides from its `templates_dir`:
    /// `<dir>/<purpose or "default">/<locale>/mail.{subject.txt,txt,html}`. Every override is
    /// compiled and rendered once with sample data (link and code, and neither), so a broken
    /// override fails here, at start-up, not when a mail is due.
    ///
    /// # Errors
    /// An unreadable folder, a file outside the layout, or an override that does not compile
    /// or render; the message names the file.
    pub fn load<'a>(
        apps: impl IntoIterator<Item = (&'a str, &'a std::path::Path)>,
    ) -> Result<Self, Error> {
        let mut t = Self::builtin()?;
        for (app, dir) in apps {
            t.add_overrides(app, dir)?;
        }
        Ok(t)
    }

    fn add_overrides(&mut self, app: &str, dir: &std::path::Path) -> Result<(), Error> {
        let io = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        let layout = |path: &std::path::Path, problem: &str| Error::Layout {
            path: path.display().to_string(),
            problem: problem.to_string(),
        };
        for purpose in std::fs::read_dir(dir).map_err(io(dir))? {
            let purpose = purpose.map_err(io(dir))?.path();
            let pname = purpose
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let valid_purpose = !pname.is_empty()
                && pname.len() <= 32
                && pname
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !purpose.is_dir() || !valid_purpose {
                return Err(layout(
                    &purpose,
                    "expected a folder named after a purpose ([a-z0-9_]{1,32}) or \"default\"",
                ));
            }
            for locale in std::fs::read_dir(&purpose).map_err(io(&purpose))? {
                let locale = locale.map_err(io(&purpose))?.path();
                let lname = locale
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if !locale.is_dir() || !LOCALES.contains(&lname.as_str()) {
                    return Err(layout(
                        &locale,
                        &format!("expected a locale folder, one of {LOCALES:?}"),
                    ));
                }
                for file in std::fs::read_dir(&locale).map_err(io(&locale))? {
                    let file = file.map_err(io(&locale))?.path();
                    let fname = file
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default()
                        .to_string();
                    let Some(part) = fname
                        .strip_prefix("mail.")
                        .filter(|p| MAIL_PARTS.contains(p))
                    else {
                        return Err(layout(
                            &file,
                            "expected mail.subject.txt, mail.txt or mail.html",
                        ));
                    };
                    let source = std::fs::read_to_string(&file).map_err(io(&file))?;
                    let name = format!("apps/{app}/{pname}/{lname}/mail.{part}");
                    self.env
                        .add_template_owned(name.clone(), source)
                        .map_err(|e| Error::Layout {
                            path: file.display().to_string(),
                            problem: format!("{e:#}"),
                        })?;
                    let tmpl = self.env.get_template(&name)?;
                    for (link, code) in [
                        (Some("https://v.example/v/TOKEN"), Some("123456")),
                        (None, None),
                    ] {
                        tmpl.render(context! {
                            purpose => pname.as_str(), email => "someone@example.com", link => link,
                            code => code, expires_minutes => 10,
                        })
                        .map_err(|e| Error::Layout {
                            path: file.display().to_string(),
                            problem: format!("does not render with sample data: {e:#}"),
                        })?;
                    }
                }
            }
        }
        Ok(())
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
        // An app's override for this purpose, then its `default` purpose, then the built-in.
        let get = |part: &str| {
            let names = [
                format!("apps/{}/{}/{locale}/mail.{part}", m.app, m.purpose),
                format!("apps/{}/default/{locale}/mail.{part}", m.app),
                format!("{locale}/mail.{part}"),
            ];
            let mut last = None;
            for n in &names {
                match self.env.get_template(n) {
                    Ok(t) => return Ok(t),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                minijinja::Error::new(minijinja::ErrorKind::TemplateNotFound, "no template")
            }))
        };
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
                    app: "shop",
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
                app: "shop",
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
    fn app_overrides_apply_per_purpose_and_fall_back_part_by_part() {
        let dir = tempfile::tempdir().expect("tempdir");
        let login = dir.path().join("login/en");
        std::fs::create_dir_all(&login).expect("mkdir");
        std::fs::write(
            login.join("mail.subject.txt"),
            "Sign in to Shop: {{ code }}",
        )
        .expect("write");
        let default = dir.path().join("default/en");
        std::fs::create_dir_all(&default).expect("mkdir");
        std::fs::write(default.join("mail.txt"), "Shop says: {{ link }}").expect("write");
        let t = Templates::load([("shop", dir.path())]).expect("load");
        let ctx = |app, purpose| MailContext {
            app,
            locale: "en",
            purpose,
            email: "a@example.com",
            link: Some("https://v/x"),
            code: Some("123456"),
            expires_minutes: 10,
        };
        let m = t.render_mail(&ctx("shop", "login")).expect("render");
        assert_eq!(m.subject, "Sign in to Shop: 123456");
        assert_eq!(
            m.text, "Shop says: https://v/x",
            "default purpose of the app"
        );
        assert!(m.html.contains("123456"), "built-in html");
        let other = t.render_mail(&ctx("other", "login")).expect("render");
        assert!(
            !other.subject.contains("Shop"),
            "another app keeps the built-ins"
        );
    }

    #[test]
    fn broken_or_misplaced_overrides_fail_at_load_and_name_the_file() {
        for (path, content, words) in [
            ("signup/en/mail.txt", "{{ link ", "mail.txt"),
            ("signup/en/mail.txt", "{{ lnk }}", "does not render"),
            ("signup/fr/mail.txt", "x", "locale"),
            ("Sign Up/en/mail.txt", "x", "purpose"),
            ("signup/en/mail.text", "x", "mail.subject.txt"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(&file, content).expect("write");
            let e = Templates::load([("shop", dir.path())])
                .expect_err(path)
                .to_string();
            assert!(e.contains(words), "{path}: {e}");
        }
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
