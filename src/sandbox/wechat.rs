//! The WeChat Official Account endpoints (CHANNELS.md 1.1, 1.3), answered as `api.weixin.qq.com`
//! answers: HTTP 200 with `errcode` and an errmsg ending in ` rid: xxxxxxxx-xxxxxxxx-xxxxxxxx`; the
//! token success envelope has no `errcode` at all.
//!
//! - `GET /cgi-bin/token?grant_type=client_credential&appid=&secret=`: 40002 bad grant_type,
//!   41002 / 41004 appid / secret missing, 40013 unknown appid, 40125 wrong secret; otherwise a new
//!   token (the previous ones work 5 more minutes).
//! - `POST /cgi-bin/message/template/send?access_token=`: 41001 no token, 40001 unknown token,
//!   42001 expired; 47001 body not JSON; 40003 no `touser`; 40037 a `template_id` not among the
//!   account's `[[templates]]`; 47003 a `data` value that is not `{"value": "..."}`; a recipient a
//!   fault fails answers its code (43004 ...). The same `touser` + `client_msg_id` within 10
//!   minutes answers success with the first `msgid` and is logged `duplicate`. The token may be an
//!   authorizer token the open platform issued for the account (48001 when its authorisation did
//!   not grant permission set 7, 群发与通知).
//! - `POST /cgi-bin/wxopen/wxamplinkget?access_token=`: the account's `linked_mini_programs` as
//!   linked items; with an authorizer token only when permission set 33 was granted (else 48001).
//!
//! An account in third-party mode has no AppSecret the sandbox knows: `/cgi-bin/token` answers
//! it 40125; its tokens come from the open platform.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::accounts::OaAuth;
use super::faults::Endpoint;
use super::messages::{Entry, Failed, Kind};
use super::tokens::{Owner, Standing};
use super::{
    Channel, Shared, hex, json_answer, lock, now, open_platform, parse_json, query, receive,
    refuse, same_secret, token_value,
};

/// The content type `api.weixin.qq.com` answers with.
pub(super) const CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// The errmsg text of a code, before its ` rid: ...`.
fn errmsg(code: i64) -> &'static str {
    match code {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40003 => "invalid openid",
        40013 => "invalid appid",
        40014 => "invalid access_token",
        40037 => "invalid template_id",
        40125 => "invalid appsecret",
        40164 => "invalid ip, not in whitelist",
        41001 => "access_token missing",
        41002 => "appid missing",
        41004 => "appsecret missing",
        42001 => "access_token expired",
        43004 => "require subscribe",
        43019 => "require remove blacklist",
        43101 => "user refuse to accept the msg",
        45009 => "reach max api daily quota limit",
        45011 => "api minute-quota reach limit must slower retry next minute",
        47001 => "data format error",
        47003 => "argument invalid!",
        48001 => "api unauthorized",
        61003 => "component is not authorized by this account",
        61004 => "access clientip is not registered",
        61005 => "component ticket is expired",
        61006 => "component ticket is invalid",
        61009 => "code is invalid",
        61010 => "code is expired",
        61011 => "invalid component",
        61023 => "refresh_token is invalid",
        _ => "system error",
    }
}

/// An error answer; `detail` goes after the code's text (`argument invalid! data.x.value invalid`).
fn error_with(entry: &mut Entry, code: i64, detail: &str) -> Response {
    let rid = format!("{}-{}-{}", hex(4), hex(4), hex(4));
    let text = errmsg(code);
    let msg = if detail.is_empty() {
        format!("{text} rid: {rid}")
    } else {
        format!("{text} {detail} rid: {rid}")
    };
    reply(entry, code, &json!({ "errcode": code, "errmsg": msg }))
}

/// An error answer: the code and its text with a request id.
pub(super) fn error(entry: &mut Entry, code: i64) -> Response {
    error_with(entry, code, "")
}

/// An answer of HTTP 200 with `body`, logged with `code`.
pub(super) fn reply(entry: &mut Entry, code: i64, body: &Value) -> Response {
    entry.answer.http_status = 200;
    entry.answer.code = Some(code);
    json_answer(StatusCode::OK, CONTENT_TYPE, body)
}

/// `GET /cgi-bin/token`.
pub(super) async fn token(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let mut entry = Entry::new(Channel::Oa, Kind::Token, "/cgi-bin/token".into(), b"");
    let answer = token_answer(&s, q.as_deref(), &mut entry).await;
    s.record(entry);
    answer
}

async fn token_answer(s: &Shared, q: Option<&str>, entry: &mut Entry) -> Response {
    let q = query(q);
    let given = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let account = given("appid").and_then(|id| s.accounts.oa.iter().position(|a| a.app_id == id));
    entry.touchpoint = account.and_then(|i| s.name(Channel::Oa, i));
    let verdict = s.faults(entry, Endpoint::Token, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45011, error);
    }
    if given("grant_type") != Some("client_credential") {
        return error(entry, 40002);
    }
    if given("appid").is_none() {
        return error(entry, 41002);
    }
    let Some(secret) = given("secret") else {
        return error(entry, 41004);
    };
    let Some(i) = account else {
        return error(entry, 40013);
    };
    match &s.accounts.oa[i].auth {
        OaAuth::Direct { secret: known } if same_secret(secret, known) => {}
        _ => return error(entry, 40125),
    }
    let owner = Owner {
        channel: Channel::Oa,
        account: i,
        contact: false,
    };
    let (token, _) = lock(&s.tokens).issue_oa(owner, now(), s.wechat_ttl, || token_value(96));
    entry.answer.code = Some(0);
    json_answer(
        StatusCode::OK,
        CONTENT_TYPE,
        &json!({ "access_token": token, "expires_in": s.wechat_ttl.as_secs() }),
    )
}

/// `POST /cgi-bin/message/template/send`.
pub(super) async fn template_send(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    let endpoint = "/cgi-bin/message/template/send";
    let (mut entry, body) = match receive(&s, Channel::Oa, Kind::Message, endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = send_answer(&s, q.as_deref(), &body, &mut entry).await;
    s.record(entry);
    answer
}

/// The account a token was issued to, or the error code: 41001 missing, 40001 unknown (or
/// another channel's), 42001 expired.
fn account_of(s: &Shared, q: Option<&str>, entry: &mut Entry) -> Result<usize, i64> {
    let q = query(q);
    let Some(token) = q.get("access_token").filter(|t| !t.is_empty()) else {
        return Err(41001);
    };
    match lock(&s.tokens).standing(token, now()) {
        Standing::Valid(o) if o.channel == Channel::Oa => {
            entry.touchpoint = s.name(Channel::Oa, o.account);
            Ok(o.account)
        }
        Standing::Expired(o) if o.channel == Channel::Oa => {
            entry.touchpoint = s.name(Channel::Oa, o.account);
            Err(42001)
        }
        _ => Err(40001),
    }
}

async fn send_answer(s: &Shared, q: Option<&str>, body: &[u8], entry: &mut Entry) -> Response {
    let doc = parse_json(body);
    let touser = doc
        .as_ref()
        .and_then(|d| d.get("touser"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty());
    entry.recipients = touser.map(str::to_string).into_iter().collect();
    let i = match account_of(s, q, entry) {
        Ok(i) => i,
        Err(code) => return error(entry, code),
    };
    let Some(doc) = doc.as_ref() else {
        return error(entry, 47001);
    };
    let recipients = entry.recipients.clone();
    let verdict = s.faults(entry, Endpoint::Send, &recipients).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45011, error);
    }
    if !open_platform::may_send_templates(s, i) {
        return error(entry, 48001);
    }
    let Some(touser) = touser else {
        return error(entry, 40003);
    };
    let account = &s.accounts.oa[i];
    let template_id = doc.get("template_id").and_then(Value::as_str);
    if !template_id.is_some_and(|t| account.templates.iter().any(|k| k.template_id == t)) {
        return error(entry, 40037);
    }
    if let Some(bad) = bad_data_field(doc.get("data")) {
        return error_with(entry, 47003, &format!("{bad} invalid"));
    }
    if let Some(&code) = verdict.failed.get(touser) {
        entry.failed.push(Failed {
            id: touser.to_string(),
            code: Some(code),
        });
        return error(entry, code);
    }
    let msgid = match doc.get("client_msg_id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => {
            let key = (i, touser.to_string(), id.to_string());
            let fresh = s.msgid();
            match lock(&s.oa_sent).first_or_remember(key, fresh, now()) {
                Some(first) => {
                    entry.duplicate = true;
                    first
                }
                None => fresh,
            }
        }
        _ => s.msgid(),
    };
    if !entry.duplicate {
        entry.delivered.push(touser.to_string());
    }
    reply(
        entry,
        0,
        &json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid }),
    )
}

/// `POST /cgi-bin/wxopen/wxamplinkget`.
pub(super) async fn wxamplinkget(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    let endpoint = "/cgi-bin/wxopen/wxamplinkget";
    let (mut entry, _) = match receive(&s, Channel::Oa, Kind::Query, endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = linkget_answer(&s, q.as_deref(), &mut entry).await;
    s.record(entry);
    answer
}

async fn linkget_answer(s: &Shared, q: Option<&str>, entry: &mut Entry) -> Response {
    let i = match account_of(s, q, entry) {
        Ok(i) => i,
        Err(code) => return error(entry, code),
    };
    let verdict = s.faults(entry, Endpoint::Send, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45011, error);
    }
    if !open_platform::may_list_links(s, i) {
        return error(entry, 48001);
    }
    let items = open_platform::linked_items(&s.accounts.oa[i].linked_mini_programs);
    reply(
        entry,
        0,
        &json!({ "errcode": 0, "errmsg": "ok", "wxopens": { "items": items } }),
    )
}

/// The first `data` entry that is not `{"value": <string>, "color"?: <string>}`, as
/// `data.KEY.value`; `data` itself when it is not an object.
fn bad_data_field(data: Option<&Value>) -> Option<String> {
    let data = match data {
        None => return None,
        Some(Value::Object(d)) => d,
        Some(_) => return Some("data".into()),
    };
    data.iter()
        .find(|(_, v)| !v.get("value").is_some_and(Value::is_string))
        .map(|(k, _)| format!("data.{k}.value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_fields_must_hold_string_values() {
        assert_eq!(bad_data_field(None), None);
        assert_eq!(
            bad_data_field(Some(&json!({"first": {"value": "hi", "color": "#173177"}}))),
            None
        );
        assert_eq!(
            bad_data_field(Some(
                &json!({"first": {"value": "hi"}, "thing2": {"value": 3}})
            )),
            Some("data.thing2.value".into())
        );
        assert_eq!(bad_data_field(Some(&json!(["x"]))), Some("data".into()));
    }
}
