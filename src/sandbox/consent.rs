//! The authorisation page (CHANNELS.md §2.4): what an Official Account's administrator sees when
//! they open the link a platform built, at `GET /cgi-bin/componentloginpage` (PC) and
//! `/safe/bindcomponent`, `/wxaopen/safe/bindcomponent` (mobile) on the sandbox's own address.
//!
//! The page takes `component_appid`, `pre_auth_code`, `redirect_uri`, and optionally `auth_type`
//! (1 Official Accounts, 2 mini programs (none here), 3 both), `biz_appid` (only that account) and
//! `category_id_list` (`1|2|3`: the permission sets asked for, by default the eight the console
//! asks for). It is plain HTML, every value escaped: the platform's name, the permission sets by
//! label, and one entry per account the administrator may authorise, each with an
//! "授权 / Authorise" link (`id="authorise-<app_id>"`) to `GET /_sandbox/authorize`.
//!
//! Following the link uses the pre-auth code up, records the authorisation, pushes an `authorized`
//! event to the platform's event URL (best effort, in the background) and redirects (302) to
//! `redirect_uri` with `auth_code` and `expires_in` added to its query. A pre-auth code that is
//! unknown, used or expired answers an error page instead, as WeChat says its link has expired:
//! the platform must ask for a new one.

use std::collections::{BTreeSet, HashMap};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

use super::accounts::{OaAccount, PlatformAccount};
use super::messages::{Entry, Kind};
use super::open_platform::{DEFAULT_CATEGORIES, PreAuthProblem, label};
use super::{Channel, Shared, lock, now, query};
use crate::channel::open_platform::event::Event;

/// The page's title.
const TITLE: &str = "授权 — touchctl sandbox";

/// A page of the sandbox's: its title, then `body` (already escaped HTML).
fn page_with(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"zh-CN\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{TITLE}</title>\n<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em;line-height:1.5}}li{{margin:.4em 0}}a.button{{display:inline-block;margin-left:1em;padding:.2em .9em;border-radius:4px;background:#07c160;color:#fff;text-decoration:none}}.error{{color:#b00020}}</style>\n</head>\n<body>\n<h1>{TITLE}</h1>\n{body}\n<p><small>touchctl sandbox stands in for WeChat here: nothing on this page reaches Tencent.</small></p>\n</body>\n</html>\n"
    );
    let mut r = (status, html).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// An error page: what went wrong, in Chinese and English, and what to do.
fn error_page(status: StatusCode, zh: &str, en: &str) -> Response {
    page_with(
        status,
        &format!(
            "<p class=\"error\" id=\"error\">{}</p>\n<p>{}</p>",
            text(zh),
            text(en)
        ),
    )
}

/// Why a pre-auth code cannot be used, as a page.
fn pre_auth_page(problem: PreAuthProblem) -> Response {
    let (status, en) = match problem {
        PreAuthProblem::Unknown => (
            StatusCode::BAD_REQUEST,
            "This authorisation link is not valid: its pre_auth_code is not one this platform was given. Start the binding again (touchctl auth wechat ID) and open the new link.",
        ),
        PreAuthProblem::Used => (
            StatusCode::GONE,
            "This authorisation link has expired: its pre_auth_code was used already (each link authorises once). Start the binding again (touchctl auth wechat ID) and open the new link.",
        ),
        PreAuthProblem::Expired => (
            StatusCode::GONE,
            "This authorisation link has expired: its pre_auth_code is past its lifetime. Start the binding again (touchctl auth wechat ID) and open the new link.",
        ),
    };
    error_page(status, "授权链接已过期或无效", en)
}

/// What a page or authorise link asks for, checked.
struct Ask<'a> {
    platform: usize,
    account: &'a PlatformAccount,
    pre_auth_code: String,
    redirect: url::Url,
    /// Only this account, when given.
    biz_appid: Option<String>,
    /// Whether Official Accounts may be authorised (`auth_type` is not 2).
    accounts: bool,
    /// The permission set ids asked for, as given.
    categories: Vec<u32>,
}

/// A parameter of the link that is wrong: what the error page says (in English).
struct BadLink(String);

impl BadLink {
    fn page(self) -> Response {
        error_page(StatusCode::BAD_REQUEST, "参数错误", &self.0)
    }
}

/// Reads the parameters the page and the authorise link share.
fn ask<'a>(s: &'a Shared, q: &HashMap<String, String>) -> Result<Ask<'a>, BadLink> {
    let given = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let bad = BadLink;
    let Some(app_id) = given("component_appid") else {
        return Err(bad(
            "The link has no component_appid: it must name the third-party platform.".into(),
        ));
    };
    let Some(platform) = s
        .accounts
        .platforms
        .iter()
        .position(|p| p.component_app_id == app_id)
    else {
        return Err(bad(format!(
            "component_appid {app_id} is not a platform the sandbox plays: it plays the wechat_open_platform files of its --dir."
        )));
    };
    let Some(pre_auth_code) = given("pre_auth_code") else {
        return Err(bad(
            "The link has no pre_auth_code: the platform gets one from api_create_preauthcode."
                .into(),
        ));
    };
    let redirect = given("redirect_uri")
        .and_then(|r| url::Url::parse(r).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"));
    let Some(redirect) = redirect else {
        return Err(bad(
            "The link's redirect_uri is missing or not an http(s) URL: it is where the browser goes back with the auth_code."
                .into(),
        ));
    };
    let accounts = given("auth_type") != Some("2");
    let categories = match given("category_id_list") {
        None => DEFAULT_CATEGORIES.to_vec(),
        Some(list) => {
            let parsed: Result<Vec<u32>, _> = list.split('|').map(str::parse::<u32>).collect();
            match parsed {
                Ok(ids) => ids,
                Err(_) => {
                    return Err(bad(format!(
                        "category_id_list `{list}` is not permission set ids joined by | (e.g. 1|2|3|4|7|11|15|24)."
                    )));
                }
            }
        }
    };
    Ok(Ask {
        platform,
        account: &s.accounts.platforms[platform],
        pre_auth_code: pre_auth_code.to_string(),
        redirect,
        biz_appid: given("biz_appid").map(str::to_string),
        accounts,
        categories,
    })
}

impl Ask<'_> {
    /// The accounts this link lets the administrator authorise, with their indexes.
    fn choices<'s>(&self, s: &'s Shared) -> Vec<(usize, &'s OaAccount)> {
        if !self.accounts {
            return Vec::new();
        }
        s.accounts
            .authorisable(self.platform)
            .filter(|(_, a)| self.biz_appid.as_deref().is_none_or(|b| b == a.app_id))
            .collect()
    }

    /// The permission sets an authorisation through this link grants, before faults: those asked
    /// for that an Official Account can grant.
    fn grantable(&self) -> BTreeSet<u32> {
        self.categories
            .iter()
            .copied()
            .filter(|id| label(*id).is_some())
            .collect()
    }
}

/// `GET /cgi-bin/componentloginpage`, `/safe/bindcomponent`, `/wxaopen/safe/bindcomponent`.
pub(super) async fn page(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let q = query(q.as_deref());
    let ask = match ask(&s, &q) {
        Ok(a) => a,
        Err(e) => return e.page(),
    };
    if let Err(p) = lock(&s.open).check_pre_auth(ask.platform, &ask.pre_auth_code, now()) {
        return pre_auth_page(p);
    }
    let choices = ask.choices(&s);
    if let Some(b) = &ask.biz_appid
        && choices.is_empty()
        && ask.accounts
    {
        return error_page(
            StatusCode::BAD_REQUEST,
            "该帐号不能授权给此第三方平台",
            &format!(
                "biz_appid {b} is not an Official Account the sandbox can authorise to {}: those are the wechat_official_account files in third-party mode naming it.",
                ask.account.id
            ),
        );
    }
    let mut body = format!(
        "<p>第三方平台 <strong id=\"platform\">{}</strong>（{}）请求获得以下权限 / asks for these permission sets:</p>\n<ul id=\"permissions\">\n",
        text(&ask.account.name),
        text(&ask.account.component_app_id)
    );
    for id in &ask.categories {
        match label(*id) {
            Some(l) => body.push_str(&format!("<li>{} ({id})</li>\n", text(l))),
            None => body.push_str(&format!(
                "<li>{id}: not an Official Account permission set, not granted</li>\n"
            )),
        }
    }
    body.push_str("</ul>\n");
    if choices.is_empty() {
        body.push_str(&format!(
            "<p id=\"no-accounts\">没有可授权的公众号 / No Official Account can be authorised here{}.</p>\n",
            if ask.accounts {
                format!(
                    ": no wechat_official_account file in third-party mode names {}",
                    text(&ask.account.id)
                )
            } else {
                " (auth_type=2 asks for mini programs only, and the sandbox knows none)".to_string()
            }
        ));
    } else {
        body.push_str("<p>选择要授权的公众号 / Choose the Official Account to authorise:</p>\n<ul id=\"accounts\">\n");
        for (_, a) in &choices {
            let mut link = url::form_urlencoded::Serializer::new(String::new());
            link.append_pair("component_appid", &ask.account.component_app_id)
                .append_pair("pre_auth_code", &ask.pre_auth_code)
                .append_pair("redirect_uri", ask.redirect.as_str())
                .append_pair("app_id", &a.app_id)
                .append_pair(
                    "category_id_list",
                    &ask.categories
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join("|"),
                );
            if let Some(b) = &ask.biz_appid {
                link.append_pair("biz_appid", b);
            }
            body.push_str(&format!(
                "<li>{} ({}) <a class=\"button\" id=\"{}\" href=\"{}\">授权 / Authorise</a></li>\n",
                text(&a.name),
                text(&a.app_id),
                attr(&format!("authorise-{}", a.app_id)),
                attr(&format!("/_sandbox/authorize?{}", link.finish()))
            ));
        }
        body.push_str("</ul>\n");
    }
    page_with(StatusCode::OK, &body)
}

/// `GET /_sandbox/authorize`: the administrator authorised `app_id`.
pub(super) async fn authorize(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let mut entry = Entry::new(
        Channel::OpenPlatform,
        Kind::Query,
        "/_sandbox/authorize".into(),
        b"",
    );
    let answer = authorize_answer(&s, q.as_deref(), &mut entry);
    entry.answer.http_status = answer.status().as_u16();
    s.record(entry);
    answer
}

fn authorize_answer(s: &Shared, q: Option<&str>, entry: &mut Entry) -> Response {
    let q = query(q);
    let ask = match ask(s, &q) {
        Ok(a) => a,
        Err(e) => return e.page(),
    };
    entry.touchpoint = s.name(Channel::OpenPlatform, ask.platform);
    let app_id = q.get("app_id").map(String::as_str).unwrap_or_default();
    entry.recipients = vec![app_id.to_string()];
    let Some((oa, account)) = ask.choices(s).into_iter().find(|(_, a)| a.app_id == app_id) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "该帐号不能授权给此第三方平台",
            &format!(
                "app_id {app_id} is not an Official Account this link can authorise to {}.",
                ask.account.id
            ),
        );
    };
    let mut granted = ask.grantable();
    if let Some(only) = lock(&s.faults).grant_only(Channel::OpenPlatform, &ask.account.id) {
        granted.retain(|id| only.contains(id));
    }
    let granted: Vec<u32> = granted.into_iter().collect();
    let auth_code = format!("queryauthcode@@@{}", super::token_value(48));
    let refresh_token = format!("refreshtoken@@@{}", super::token_value(48));
    let now_ms = now();
    let done = lock(&s.open).authorise(
        ask.platform,
        oa,
        &ask.pre_auth_code,
        granted,
        auth_code.clone(),
        refresh_token,
        now_ms,
        s.auth_code_ttl,
    );
    if let Err(p) = done {
        return pre_auth_page(p);
    }
    entry.delivered = vec![app_id.to_string()];
    let expires_in = s.auth_code_ttl.as_secs();
    super::push::event(
        s,
        ask.platform,
        Event::Authorized {
            authorizer_app_id: account.app_id.clone(),
            auth_code: auth_code.clone(),
            auth_code_expires_at: (now_ms / 1000)
                .saturating_add(i64::try_from(expires_in).unwrap_or(i64::MAX)),
            pre_auth_code: Some(ask.pre_auth_code.clone()),
            create_time: now_ms / 1000,
        },
    );
    let mut back = ask.redirect.clone();
    back.query_pairs_mut()
        .append_pair("auth_code", &auth_code)
        .append_pair("expires_in", &expires_in.to_string());
    let mut r = StatusCode::FOUND.into_response();
    match HeaderValue::from_str(back.as_str()) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => error_page(
            StatusCode::BAD_REQUEST,
            "参数错误",
            "The redirect_uri cannot be sent back as a Location header.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        let r = error_page(StatusCode::BAD_REQUEST, "错", "a <script>x</script> & b");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body = rt.block_on(async {
            use http_body_util::BodyExt;
            r.into_body().collect().await.unwrap().to_bytes()
        });
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            html.contains("a &lt;script&gt;x&lt;/script&gt; &amp; b"),
            "{html}"
        );
        assert!(
            html.contains("<title>授权 — touchctl sandbox</title>"),
            "{html}"
        );
    }

    #[test]
    fn a_used_or_expired_code_says_the_link_expired() {
        for p in [PreAuthProblem::Used, PreAuthProblem::Expired] {
            assert_eq!(pre_auth_page(p).status(), StatusCode::GONE);
        }
        assert_eq!(
            pre_auth_page(PreAuthProblem::Unknown).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
