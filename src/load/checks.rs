//! Checks the schema cannot express: URL schemes and hosts, mini programs a template may open, the
//! address param a channel needs, duplicate names inside a file, consistent retry settings, and
//! WeCom's audience and message rules (which fields and link each message type's templates take).

use std::collections::BTreeSet;

use super::diagnostic::{Issue, Target};
use super::schema_errors::did_you_mean;
use super::toml_json::{Segment, dotted};
use crate::model::{
    AppPushSpec, DynamicParams, KindSpec, LinkRule, MAX_NOTICE_ITEMS, MessageTemplate,
    NAME_PATTERN, ParamType, SecretError, SecretRef, Touchpoint, WechatAuth, WecomAudience,
    WecomSpec, is_own_variable,
};

fn key(k: &str) -> Segment {
    Segment::Key(k.to_string())
}

fn issue(code: &'static str, at: Vec<Segment>, target: Target, message: String) -> Issue {
    Issue {
        code,
        at,
        target,
        message,
    }
}

/// Every problem the typed touchpoint has beyond its schema.
pub(crate) fn check(tp: &Touchpoint) -> Vec<Issue> {
    let mut out = Vec::new();
    match &tp.spec {
        KindSpec::Custom(s) => {
            check_url(&mut out, vec![key("url")], &s.url, s.allow_insecure, "url");
            if s.retry.backoff.get() > s.retry.max_backoff.get() {
                out.push(issue(
                    "out-of-range",
                    vec![key("retry"), key("backoff")],
                    Target::Value,
                    format!(
                        "`retry.backoff` ({}) is longer than `retry.max_backoff` ({}): lower it or raise max_backoff",
                        s.retry.backoff, s.retry.max_backoff
                    ),
                ));
            }
            let mut seen = BTreeSet::new();
            for (i, p) in s.template_params.iter().enumerate() {
                let at = vec![key("template_params"), Segment::Index(i)];
                if !seen.insert(p.name.as_str()) {
                    let mut at = at.clone();
                    at.push(key("name"));
                    out.push(issue(
                        "duplicate-name",
                        at,
                        Target::Value,
                        format!(
                            "template param `{}` is declared twice: give each param its own name",
                            p.name
                        ),
                    ));
                }
                if p.max_length.is_some() && !matches!(p.kind, ParamType::String | ParamType::Url) {
                    let mut at = at.clone();
                    at.push(key("max_length"));
                    out.push(issue(
                        "invalid-value",
                        at,
                        Target::Key,
                        format!("`max_length` applies to string and url params only; template param `{}` is not one", p.name),
                    ));
                }
            }
            if s.dynamic_params.contains_key("user_id") {
                out.push(issue(
                    "invalid-value",
                    vec![key("dynamic_params"), key("user_id")],
                    Target::Key,
                    "`user_id` is always sent with each recipient: name this param differently"
                        .into(),
                ));
            }
        }
        KindSpec::WechatOfficialAccount(s) => {
            check_api_base(&mut out, s.api_base.as_deref(), s.allow_insecure);
            check_templates(&mut out, &s.templates, &s.linked_mini_programs);
            if let WechatAuth::ThirdParty {
                authorizer_refresh_token: SecretRef::Env { .. },
                ..
            } = &s.auth
            {
                out.push(issue(
                    "invalid-value",
                    vec![key("auth"), key("authorizer_refresh_token")],
                    Target::Key,
                    "`auth.authorizer_refresh_token` must be a file reference (`{ file = \"...\" }`): `touchctl auth wechat` writes the refresh token there and the daemon writes a rotated one back".into(),
                ));
            }
        }
        KindSpec::WechatOpenPlatform(s) => {
            check_api_base(&mut out, s.api_base.as_deref(), s.allow_insecure);
        }
        KindSpec::Wecom(s) => {
            check_api_base(&mut out, s.api_base.as_deref(), s.allow_insecure);
            check_templates(&mut out, &s.templates, &s.linked_mini_programs);
            check_wecom(&mut out, s);
        }
        KindSpec::AppPush(s) => {
            check_api_base(&mut out, s.api_base.as_deref(), s.allow_insecure);
            check_push(&mut out, s);
        }
    }
    check_dynamic_params(&mut out, &tp.spec, tp.spec.dynamic_params());
    check_secret_sources(&mut out, tp);
    out
}

/// touchctl's own variables are never a secret source, whatever the environment holds; the rest of
/// the confinement depends on the machine and is checked where secrets are read.
fn check_secret_sources(out: &mut Vec<Issue>, tp: &Touchpoint) {
    for (path, r) in tp.secrets() {
        if let SecretRef::Env { env } = r
            && is_own_variable(env)
        {
            let mut at: Vec<Segment> = path.split('.').map(key).collect();
            at.push(key("env"));
            let refused = SecretError::OwnVariable(env.clone());
            out.push(issue(
                refused.code(),
                at,
                Target::Value,
                format!("`{path}`: {refused}"),
            ));
        }
    }
}

/// App push: the API's version is not part of `api_base`, and the default texts go to every
/// recipient alike, so they hold no placeholders.
fn check_push(out: &mut Vec<Issue>, s: &AppPushSpec) {
    if let Some(base) = &s.api_base
        && let Ok(url) = url::Url::parse(base)
        && url
            .path_segments()
            .is_some_and(|mut segments| segments.any(|p| p == "v2"))
    {
        out.push(issue(
            "invalid-url",
            vec![key("api_base")],
            Target::Value,
            "`api_base` holds the API version (`/v2`), which touchctl adds itself (`{api_base}/v2/{app_id}/...`): write only the scheme and host, e.g. https://restapi.getui.com".to_string(),
        ));
    }
    for (field, text) in [("title", &s.title), ("body", &s.body)] {
        let Some(text) = text else { continue };
        if let Some(name) = crate::channel::template::placeholders(text).first() {
            out.push(issue(
                "invalid-value",
                vec![key(field)],
                Target::Value,
                format!(
                    "`{field}` holds the placeholder `{{{{{name}}}}}`, but one push sends the same text to every recipient: write it without placeholders"
                ),
            ));
        }
    }
}

fn check_api_base(out: &mut Vec<Issue>, api_base: Option<&str>, allow_insecure: bool) {
    if let Some(base) = api_base {
        check_url(out, vec![key("api_base")], base, allow_insecure, "api_base");
    }
}

/// `url` must be absolute, with a host, https (or http when `allow_insecure` is set).
fn check_url(out: &mut Vec<Issue>, at: Vec<Segment>, text: &str, allow_insecure: bool, name: &str) {
    let parsed = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            out.push(issue(
                "invalid-url",
                at,
                Target::Value,
                format!(
                    "`{name}` is not a valid absolute URL ({e}): write it as https://host/path"
                ),
            ));
            return;
        }
    };
    if parsed.host_str().is_none_or(str::is_empty) {
        out.push(issue(
            "invalid-url",
            at,
            Target::Value,
            format!("`{name}` has no host: write it as https://host/path"),
        ));
        return;
    }
    match parsed.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        "http" => out.push(issue(
            "insecure-url",
            at,
            Target::Value,
            format!("`{name}` uses http: use https, or set `allow_insecure = true` for local testing"),
        )),
        other => out.push(issue(
            "invalid-url",
            at,
            Target::Value,
            format!("`{name}` has scheme `{other}`: only https (or http with `allow_insecure = true`) is accepted"),
        )),
    }
}

fn check_templates(out: &mut Vec<Issue>, templates: &[MessageTemplate], linked: &[String]) {
    let mut seen = BTreeSet::new();
    for (i, t) in templates.iter().enumerate() {
        let at = |field: &str| vec![key("templates"), Segment::Index(i), key(field)];
        if !seen.insert(t.id.as_str()) {
            out.push(issue(
                "duplicate-name",
                at("id"),
                Target::Value,
                format!(
                    "template `{}` is declared twice: give each template its own id",
                    t.id
                ),
            ));
        }
        if let Some(url) = &t.url {
            let mut link = Vec::new();
            check_url(&mut link, at("url"), url, true, &dotted(&at("url")));
            out.extend(link);
        }
        if let Some(mp) = &t.mini_program
            && !linked.iter().any(|l| l == &mp.app_id)
        {
            let mut where_ = at("mini_program");
            where_.push(key("app_id"));
            out.push(issue(
                    "unlinked-mini-program",
                    where_,
                    Target::Value,
                    format!(
                        "template `{}` opens mini program {} which is not in `linked_mini_programs`: associate the account with the mini program first, then add it there",
                        t.id, mp.app_id
                    ),
                ));
        }
    }
    for (i, app_id) in linked.iter().enumerate() {
        if !is_wechat_app_id(app_id) {
            out.push(issue(
                "invalid-format",
                vec![key("linked_mini_programs"), Segment::Index(i)],
                Target::Value,
                format!("`linked_mini_programs[{i}]` must be a WeChat app id: `wx` and 16 lowercase hex digits, found \"{app_id}\""),
            ));
        }
    }
}

/// WeCom: what the audience needs, and each template against its message type's rules
/// ([`crate::model::WecomMessage::rules`]).
fn check_wecom(out: &mut Vec<Issue>, s: &WecomSpec) {
    let message = s.message.name();
    match s.audience {
        WecomAudience::Customers if s.contact_secret.is_none() => out.push(issue(
            "missing-field",
            vec![key("audience")],
            Target::Value,
            "`audience = \"customers\"` sends 客户联系 mass messages with the customer contact secret: add `contact_secret = { env = \"...\" }` (WeCom admin console: 客户联系 → API → Secret)".into(),
        )),
        WecomAudience::Members if s.sender.is_some() => out.push(issue(
            "invalid-value",
            vec![key("sender")],
            Target::Key,
            "`sender` is the member who sends a 客户联系 mass message: it applies to `audience = \"customers\"` only; remove it, or set the audience".into(),
        )),
        _ => {}
    }
    let Some(rules) = s.rules() else {
        out.push(issue(
            "invalid-value",
            vec![key("message")],
            Target::Value,
            format!("`message = \"{message}\"` cannot be sent to customers: a 客户联系 mass message takes `text` or `news`"),
        ));
        return;
    };
    let takes = |name: &str| rules.required.contains(&name) || rules.optional.contains(&name);
    let listed = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let allowed = if rules.optional.is_empty() {
        listed(rules.required)
    } else {
        format!(
            "{}, and optionally {}",
            listed(rules.required),
            listed(rules.optional)
        )
    };
    for (i, t) in s.templates.iter().enumerate() {
        let at = |field: &str| vec![key("templates"), Segment::Index(i), key(field)];
        let missing: Vec<&str> = rules
            .required
            .iter()
            .copied()
            .filter(|f| !t.fields.iter().any(|g| g == f))
            .collect();
        if !missing.is_empty() {
            out.push(issue(
                "template-fields",
                if t.fields.is_empty() { vec![key("templates"), Segment::Index(i), key("fields")] } else { at("fields") },
                if t.fields.is_empty() { Target::Table } else { Target::Value },
                format!(
                    "template `{}`: a `{message}` message needs the field(s) {}: its fields are {allowed}",
                    t.id,
                    listed(&missing)
                ),
            ));
        }
        let mut items = 0;
        for (j, f) in t.fields.iter().enumerate() {
            if takes(f) {
                continue;
            }
            if rules.items {
                items += 1;
                continue;
            }
            let hint = did_you_mean(f, rules.required.iter().chain(rules.optional).copied())
                .map(|n| format!("did you mean `{n}`? "))
                .unwrap_or_default();
            out.push(issue(
                "template-fields",
                vec![key("templates"), Segment::Index(i), key("fields"), Segment::Index(j)],
                Target::Value,
                format!(
                    "template `{}`: `{f}` is not a part of a `{message}` message; {hint}its fields are {allowed}",
                    t.id
                ),
            ));
        }
        if items > MAX_NOTICE_ITEMS {
            out.push(issue(
                "out-of-range",
                at("fields"),
                Target::Value,
                format!(
                    "template `{}` has {items} fields shown as items besides `title` and `description`; a mini program notice shows at most {MAX_NOTICE_ITEMS}",
                    t.id
                ),
            ));
        }
        check_wecom_link(out, s, i, t, rules.link);
    }
}

/// A WeCom template's `url` and `mini_program` against what its message type opens.
fn check_wecom_link(
    out: &mut Vec<Issue>,
    s: &WecomSpec,
    i: usize,
    t: &MessageTemplate,
    rule: LinkRule,
) {
    let message = s.message.name();
    let at = |field: &str| vec![key("templates"), Segment::Index(i), key(field)];
    let (url_ok, mini_ok) = match rule {
        LinkRule::None => (false, false),
        LinkRule::Url => (true, false),
        LinkRule::UrlOrMiniProgram => (true, true),
        LinkRule::MiniProgram => (false, true),
    };
    let opens = match rule {
        LinkRule::None => "nothing",
        LinkRule::Url => "a web page",
        LinkRule::UrlOrMiniProgram => "a web page or a mini program page",
        LinkRule::MiniProgram => "a mini program page",
    };
    let whom = if s.audience == WecomAudience::Customers {
        " sent to customers (a link attachment)"
    } else {
        ""
    };
    if t.url.is_some() && !url_ok {
        out.push(issue(
            "invalid-value",
            at("url"),
            Target::Key,
            format!(
                "template `{}`: a `{message}` message{whom} opens {opens}, not `url`: remove it",
                t.id
            ),
        ));
    }
    if t.mini_program.is_some() && !mini_ok {
        out.push(issue(
            "invalid-value",
            at("mini_program"),
            Target::Key,
            format!("template `{}`: a `{message}` message{whom} opens {opens}, not `mini_program`: remove it", t.id),
        ));
    }
    let needed = match rule {
        LinkRule::None => None,
        LinkRule::Url if t.url.is_none() => Some("add `url = \"https://...\"`"),
        LinkRule::UrlOrMiniProgram if t.url.is_none() && t.mini_program.is_none() => Some(
            "add `url = \"https://...\"` or `mini_program = { app_id = \"wx...\", page = \"...\" }`",
        ),
        LinkRule::MiniProgram if t.mini_program.is_none() => Some(
            "add `mini_program = { app_id = \"wx...\", page = \"...\" }`, a mini program of `linked_mini_programs`",
        ),
        _ => None,
    };
    if let Some(what) = needed {
        out.push(issue(
            "missing-field",
            vec![key("templates"), Segment::Index(i), key("url")],
            Target::Table,
            format!(
                "template `{}`: a `{message}` message{whom} opens {opens}: {what}",
                t.id
            ),
        ));
    }
}

fn is_wechat_app_id(s: &str) -> bool {
    s.len() == 18
        && s.starts_with("wx")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_dynamic_params(out: &mut Vec<Issue>, spec: &KindSpec, params: &DynamicParams) {
    debug_assert_eq!(NAME_PATTERN, r"^[A-Za-z_][A-Za-z0-9_]*$");
    for name in params.keys() {
        if !is_name(name) {
            out.push(issue(
                "invalid-format",
                vec![key("dynamic_params"), key(name)],
                Target::Key,
                format!("dynamic param `{name}` must be a name of letters, digits and `_`, not starting with a digit"),
            ));
        }
    }
    if let Some(address) = spec.address_param() {
        match params.get(address) {
            None => {
                let hint = did_you_mean(address, params.keys().map(String::as_str))
                    .map(|s| format!(" (found `{s}`: did you mean `{address}`?)"))
                    .unwrap_or_default();
                out.push(issue(
                    "missing-address-param",
                    if params.is_empty() { vec![] } else { vec![key("dynamic_params")] },
                    if params.is_empty() { Target::Table } else { Target::Key },
                    format!(
                        "a touchpoint of kind `{}`{} addresses users by `{address}`: add `{address} = \"user.{address}\"` to [dynamic_params]{hint}",
                        spec.name(),
                        match spec {
                            KindSpec::Wecom(s) => format!(" sending to {}", s.audience.name()),
                            _ => String::new(),
                        }
                    ),
                ));
            }
            Some(source) if source.optional() => out.push(issue(
                "missing-address-param",
                vec![key("dynamic_params"), key(address)],
                Target::Key,
                format!("`{address}` is the recipient's address and cannot be optional"),
            )),
            Some(_) => {}
        }
    }
}
