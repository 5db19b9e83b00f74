//! The WeCom endpoints (CHANNELS.md 3.1–3.3), answered as `qyapi.weixin.qq.com` answers: HTTP 200
//! with `errcode` (0 on success, `gettoken` included), an errmsg of the form `<text>, hint:
//! [...], from ip: <client>, more info at https://open.work.weixin.qq.com/devtool/query?e=<code>`,
//! and the `error-code` / `error-msg` headers the real server adds.
//!
//! - `GET /cgi-bin/gettoken?corpid=&corpsecret=`: 41002 / 41004 missing, 40013 unknown corp,
//!   40001 a secret that is neither an app's `secret` nor its `contact_secret`; otherwise that
//!   secret's token, the same one while it is valid.
//! - `POST /cgi-bin/message/send?access_token=`: 41001 / 40014 / 42001 for a missing, unknown or
//!   expired token; 47001 body not JSON; 41011 no `agentid`, 40056 an `agentid` that is not the
//!   app of the token's secret; 40008 a `msgtype` other than text, textcard, news or
//!   miniprogram_notice; 44004 its content missing; 40058 more than 1000 ids in `touser`.
//!   Recipients a fault fails come back in `invaliduser` (`unlicenseduser` for code 701016); when
//!   none is left, 81013. Departments and tags are unknown here: they come back in
//!   `invalidparty` / `invalidtag`.
//! - `POST /cgi-bin/externalcontact/add_msg_template?access_token=`: only with the
//!   `contact_secret`'s token (else 48002 `api forbidden`); 40058 more than 10,000
//!   `external_userid`s; 44004 neither `text.content` nor `attachments`; answers a `msgid` and a
//!   `fail_list` of the recipients a fault fails.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::faults::Endpoint;
use super::messages::{Entry, Failed, Kind};
use super::tokens::{Owner, Standing};
use super::{
    Channel, Shared, hex, json_answer, lock, now, parse_json, query, receive, refuse, same_secret,
    token_value,
};

/// The content type `qyapi.weixin.qq.com` answers with.
const CONTENT_TYPE: &str = "application/json; charset=UTF-8";

/// The most user ids in one `message/send` `touser`.
pub const MAX_TOUSER: usize = 1000;

/// The most `external_userid`s in one `add_msg_template`.
pub const MAX_EXTERNAL: usize = 10_000;

/// The code a fault fails a member with to put them in `unlicenseduser` (帐号未激活或者已经过期:
/// no interface licence) rather than `invaliduser`.
pub const UNLICENSED: i64 = 701016;

/// The message types `message/send` takes here.
const MSGTYPES: [&str; 4] = ["text", "textcard", "news", "miniprogram_notice"];

fn errmsg(code: i64) -> &'static str {
    match code {
        -1 => "system busy",
        40001 => "invalid credential",
        40008 => "invalid message type",
        40013 => "invalid corpid",
        40014 => "invalid access_token",
        40031 => "invalid userid list",
        40056 => "invalid agentid",
        40058 => "invalid Request Parameter",
        41001 => "access_token missing",
        41002 => "corpid missing",
        41004 => "corpsecret missing",
        41011 => "missing agentid",
        42001 => "access_token expired",
        44004 => "empty content",
        45009 => "api freq out of limit",
        45033 => "api concurrent out of limit",
        47001 => "data format error",
        48002 => "api forbidden",
        60020 => "not allow to access from your ip",
        81013 => "user & party & tag all invalid",
        _ => "system busy",
    }
}

/// The errmsg of a code, as the real server writes it.
fn errmsg_for(code: i64, ip: IpAddr) -> String {
    let ms = now();
    format!(
        "{}, hint: [{}_{}_{}], from ip: {ip}, more info at https://open.work.weixin.qq.com/devtool/query?e={code}",
        errmsg(code),
        ms / 1000,
        ms % 1000,
        hex(16)
    )
}

fn reply(entry: &mut Entry, code: i64, msg: &str, body: &Value) -> Response {
    entry.answer.http_status = 200;
    entry.answer.code = Some(code);
    let mut r = json_answer(StatusCode::OK, CONTENT_TYPE, body);
    let h = r.headers_mut();
    h.insert("error-code", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(msg) {
        h.insert("error-msg", v);
    }
    r
}

fn error(entry: &mut Entry, ip: IpAddr, code: i64) -> Response {
    let msg = errmsg_for(code, ip);
    reply(
        entry,
        code,
        &msg,
        &json!({ "errcode": code, "errmsg": msg }),
    )
}

/// `GET /cgi-bin/gettoken`.
pub(super) async fn token(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let mut entry = Entry::new(Channel::Wecom, Kind::Token, "/cgi-bin/gettoken".into(), b"");
    let answer = token_answer(&s, peer.ip(), q.as_deref(), &mut entry).await;
    s.record(entry);
    answer
}

async fn token_answer(s: &Shared, ip: IpAddr, q: Option<&str>, entry: &mut Entry) -> Response {
    let q = query(q);
    let given = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let corp: Vec<usize> = given("corpid")
        .map(|c| {
            (0..s.accounts.wecom.len())
                .filter(|&i| s.accounts.wecom[i].corp_id == c)
                .collect()
        })
        .unwrap_or_default();
    // The secret says which app of the corp (and which of its secrets).
    let owner = given("corpsecret").and_then(|secret| {
        corp.iter().find_map(|&i| {
            let a = &s.accounts.wecom[i];
            let contact = if same_secret(secret, &a.secret) {
                false
            } else if a
                .contact_secret
                .as_ref()
                .is_some_and(|c| same_secret(secret, c))
            {
                true
            } else {
                return None;
            };
            Some(Owner {
                channel: Channel::Wecom,
                account: i,
                contact,
            })
        })
    });
    let account = owner
        .map(|o| o.account)
        .or_else(|| (corp.len() == 1).then(|| corp[0]));
    entry.touchpoint = account.and_then(|i| s.name(Channel::Wecom, i));
    let verdict = s.faults(entry, Endpoint::Token, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45009, |e, c| error(e, ip, c));
    }
    if given("corpid").is_none() {
        return error(entry, ip, 41002);
    }
    if given("corpsecret").is_none() {
        return error(entry, ip, 41004);
    }
    if corp.is_empty() {
        return error(entry, ip, 40013);
    }
    let Some(owner) = owner else {
        return error(entry, ip, 40001);
    };
    let now = now();
    let (token, expires) =
        lock(&s.tokens).current_or_issue(owner, now, s.wechat_ttl, || token_value(128));
    let expires_in = (expires.saturating_sub(now).max(0) / 1000).max(1);
    reply(
        entry,
        0,
        "ok",
        &json!({ "errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": expires_in }),
    )
}

/// The owner of the request's token, or the error code: 41001 missing, 40014 unknown (or another
/// channel's), 42001 expired.
fn owner_of(s: &Shared, q: Option<&str>, entry: &mut Entry) -> Result<Owner, i64> {
    let q = query(q);
    let Some(token) = q.get("access_token").filter(|t| !t.is_empty()) else {
        return Err(41001);
    };
    match lock(&s.tokens).standing(token, now()) {
        Standing::Valid(o) if o.channel == Channel::Wecom => {
            entry.touchpoint = s.name(Channel::Wecom, o.account);
            Ok(o)
        }
        Standing::Expired(o) if o.channel == Channel::Wecom => {
            entry.touchpoint = s.name(Channel::Wecom, o.account);
            Err(42001)
        }
        _ => Err(40014),
    }
}

/// `POST /cgi-bin/message/send`.
pub(super) async fn message_send(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    let endpoint = "/cgi-bin/message/send";
    let (mut entry, body) = match receive(&s, Channel::Wecom, Kind::Message, endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = send_answer(&s, peer.ip(), q.as_deref(), &body, &mut entry).await;
    s.record(entry);
    answer
}

/// The ids of a `a|b|c` list.
fn ids(doc: &Map<String, Value>, key: &str) -> Vec<String> {
    doc.get(key)
        .and_then(Value::as_str)
        .map(|v| {
            v.split('|')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The `agentid`, a number or a string of digits.
fn agent_id(doc: &Map<String, Value>) -> Option<u64> {
    match doc.get("agentid")? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Whether the message of type `msgtype` has its content.
fn has_content(doc: &Map<String, Value>, msgtype: &str) -> bool {
    let part = doc.get(msgtype);
    let text = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .is_some_and(|t| !t.trim().is_empty())
    };
    match msgtype {
        "text" => text(part, "content"),
        "textcard" => text(part, "title") && text(part, "description") && text(part, "url"),
        "news" => part
            .and_then(|p| p.get("articles"))
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty() && a.iter().all(|art| text(Some(art), "title"))),
        "miniprogram_notice" => text(part, "appid") && text(part, "title"),
        _ => false,
    }
}

async fn send_answer(
    s: &Shared,
    ip: IpAddr,
    q: Option<&str>,
    body: &[u8],
    entry: &mut Entry,
) -> Response {
    let doc = parse_json(body);
    entry.recipients = doc.as_ref().map(|d| ids(d, "touser")).unwrap_or_default();
    let owner = match owner_of(s, q, entry) {
        Ok(o) => o,
        Err(code) => return error(entry, ip, code),
    };
    let Some(doc) = doc else {
        return error(entry, ip, 47001);
    };
    let recipients = entry.recipients.clone();
    let verdict = s.faults(entry, Endpoint::Send, &recipients).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45009, |e, c| error(e, ip, c));
    }
    let Some(agent) = agent_id(&doc) else {
        return error(entry, ip, 41011);
    };
    let account = &s.accounts.wecom[owner.account];
    if owner.contact || agent != u64::from(account.agent_id) {
        return error(entry, ip, 40056);
    }
    let msgtype = doc.get("msgtype").and_then(Value::as_str).unwrap_or("");
    if !MSGTYPES.contains(&msgtype) {
        return error(entry, ip, 40008);
    }
    if !has_content(&doc, msgtype) {
        return error(entry, ip, 44004);
    }
    if recipients.len() > MAX_TOUSER {
        return error(entry, ip, 40058);
    }
    let (mut invalid, mut unlicensed) = (Vec::new(), Vec::new());
    for id in &recipients {
        match verdict.failed.get(id) {
            Some(&code) => {
                // The real service lower-cases the ids it returns.
                let shown = id.to_lowercase();
                if code == UNLICENSED {
                    unlicensed.push(shown);
                } else {
                    invalid.push(shown);
                }
                entry.failed.push(Failed {
                    id: id.clone(),
                    code: Some(code),
                });
            }
            None => entry.delivered.push(id.clone()),
        }
    }
    let (parties, tags) = (ids(&doc, "toparty"), ids(&doc, "totag"));
    if entry.delivered.is_empty() {
        let msg = errmsg_for(81013, ip);
        return reply(
            entry,
            81013,
            &msg,
            &json!({
                "errcode": 81013, "errmsg": msg,
                "invaliduser": invalid.join("|"), "invalidparty": parties.join("|"),
                "invalidtag": tags.join("|"), "unlicenseduser": unlicensed.join("|"),
            }),
        );
    }
    reply(
        entry,
        0,
        "ok",
        &json!({
            "errcode": 0, "errmsg": "ok",
            "invaliduser": invalid.join("|"), "invalidparty": parties.join("|"),
            "invalidtag": tags.join("|"), "unlicenseduser": unlicensed.join("|"),
            "msgid": hex(16), "response_code": hex(24),
        }),
    )
}

/// `POST /cgi-bin/externalcontact/add_msg_template`.
pub(super) async fn add_msg_template(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    let endpoint = "/cgi-bin/externalcontact/add_msg_template";
    let (mut entry, body) = match receive(&s, Channel::Wecom, Kind::Message, endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = template_answer(&s, peer.ip(), q.as_deref(), &body, &mut entry).await;
    s.record(entry);
    answer
}

async fn template_answer(
    s: &Shared,
    ip: IpAddr,
    q: Option<&str>,
    body: &[u8],
    entry: &mut Entry,
) -> Response {
    let doc = parse_json(body);
    entry.recipients = doc
        .as_ref()
        .and_then(|d| d.get("external_userid"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let owner = match owner_of(s, q, entry) {
        Ok(o) => o,
        Err(code) => return error(entry, ip, code),
    };
    let Some(doc) = doc else {
        return error(entry, ip, 47001);
    };
    let recipients = entry.recipients.clone();
    let verdict = s.faults(entry, Endpoint::Send, &recipients).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45009, |e, c| error(e, ip, c));
    }
    if !owner.contact {
        return error(entry, ip, 48002);
    }
    if recipients.len() > MAX_EXTERNAL {
        return error(entry, ip, 40058);
    }
    let text = doc
        .get("text")
        .and_then(|t| t.get("content"))
        .and_then(Value::as_str)
        .is_some_and(|t| !t.trim().is_empty());
    let attachments = doc
        .get("attachments")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if !text && !attachments {
        return error(entry, ip, 44004);
    }
    let mut fail_list = Vec::new();
    for id in &recipients {
        match verdict.failed.get(id) {
            Some(&code) => {
                fail_list.push(id.clone());
                entry.failed.push(Failed {
                    id: id.clone(),
                    code: Some(code),
                });
            }
            None => entry.delivered.push(id.clone()),
        }
    }
    reply(
        entry,
        0,
        "ok",
        &json!({
            "errcode": 0, "errmsg": "ok",
            "fail_list": fail_list, "msgid": format!("msg{}", hex(12)),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!("test documents are objects"),
        }
    }

    #[test]
    fn touser_lists_split_on_bars() {
        let d = doc(json!({"touser": "a|B| |c", "toparty": ""}));
        assert_eq!(ids(&d, "touser"), ["a", "B", "c"]);
        assert!(ids(&d, "toparty").is_empty());
        assert!(ids(&d, "totag").is_empty());
    }

    #[test]
    fn agentid_is_a_number_or_digits() {
        assert_eq!(agent_id(&doc(json!({"agentid": 1000005}))), Some(1000005));
        assert_eq!(agent_id(&doc(json!({"agentid": "1000005"}))), Some(1000005));
        assert_eq!(agent_id(&doc(json!({"agentid": "x"}))), None);
        assert_eq!(agent_id(&doc(json!({}))), None);
    }

    #[test]
    fn each_message_type_needs_its_content() {
        let ok = [
            json!({"text": {"content": "hi"}}),
            json!({"textcard": {"title": "t", "description": "d", "url": "https://x"}}),
            json!({"news": {"articles": [{"title": "t", "url": "https://x"}]}}),
            json!({"miniprogram_notice": {"appid": "wx1", "title": "t"}}),
        ];
        for (v, t) in ok.into_iter().zip(MSGTYPES) {
            assert!(has_content(&doc(v), t), "{t}");
        }
        assert!(!has_content(
            &doc(json!({"text": {"content": " "}})),
            "text"
        ));
        assert!(!has_content(
            &doc(json!({"textcard": {"title": "t"}})),
            "textcard"
        ));
        assert!(!has_content(
            &doc(json!({"news": {"articles": []}})),
            "news"
        ));
        assert!(!has_content(&doc(json!({})), "miniprogram_notice"));
    }

    #[test]
    fn errmsgs_carry_the_hint_ip_and_doc_link() {
        let msg = errmsg_for(40001, "127.0.0.1".parse().unwrap());
        assert!(msg.starts_with("invalid credential, hint: ["), "{msg}");
        assert!(
            msg.ends_with(
                "], from ip: 127.0.0.1, more info at https://open.work.weixin.qq.com/devtool/query?e=40001"
            ),
            "{msg}"
        );
    }
}
