//! The Getui push REST API v2 endpoints (CHANNELS.md 4.1, 4.3, 4.5), answered as
//! `restapi.getui.com/v2/{appId}` answers: `{"code", "msg", "data"?}` with the HTTP status each code
//! has (200 for 0/1/2, 400 for 2xxxx, 401 for 1xxxx, 403 for 3xxxx).
//!
//! - `POST /v2/{appId}/auth` `{"sign", "timestamp", "appkey"}`: the sign is the lowercase hex
//!   sha256 of appkey + timestamp + MasterSecret (timestamp a string or a number). Code 1 (HTTP
//!   200) for a body that is not JSON; 20001 (HTTP 400) `{param} can not be empty` for a missing
//!   field, `appId is invalid` for an app the sandbox does not serve, `appkey is invalid` and
//!   `sign is invalid` for wrong credentials. Otherwise a new token, `expire_time` a string
//!   millisecond timestamp a day ahead.
//! - Every other call carries the header `token`: 10001 (HTTP 401) when it is missing, unknown,
//!   expired, or another app's.
//! - `POST /v2/{appId}/push/list/message`: `request_id` of 10 to 32 characters, `push_message` with
//!   exactly one of notification (its title and body), transmission and revoke; answers a
//!   `taskid`. The same `request_id` again (within a day) answers the first taskid and is logged
//!   `duplicate`.
//! - `POST /v2/{appId}/push/list/cid` `{"audience": {"cid": [...]}, "taskid", "is_async"}`: at most
//!   1000 cids, none twice (20001 `cid size over limit` / `contains duplicate cid`); a taskid of
//!   this app that has not expired (20001 `taskid is invalid`). The sync answer is
//!   `data: {taskid: {cid: status}}` with `successed_online` or `successed_offline`, or `target
//!   user is invalid` for a cid a fault fails; a cid this task was pushed to before is logged
//!   `duplicate` (and answered as before).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::faults::Endpoint;
use super::messages::{Entry, Failed, Kind};
use super::tokens::{Owner, Recent, Standing};
use super::{Channel, DAY, Shared, hex, json_answer, lock, now, receive, refuse};

/// The content type `restapi.getui.com` answers with.
const CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// The most cids in one `push/list/cid`.
pub const MAX_CIDS: usize = 1000;

/// A task's lifetime when its message gives no `settings.ttl` (Getui's default, 2 hours).
const DEFAULT_TASK_TTL_MS: i64 = 7_200_000;

/// The longest `settings.ttl` (3 days).
const MAX_TASK_TTL_MS: i64 = 259_200_000;

/// How long tasks are remembered at most, whatever their ttl.
const TASK_WINDOW: std::time::Duration = std::time::Duration::from_secs(3 * 86_400);

/// A cid a fault fails: its status in the sync answer.
const INVALID_TARGET: &str = "target user is invalid";

/// The `sign` of `auth`: lowercase hex sha256 of app key, timestamp and MasterSecret.
pub fn sign(app_key: &str, timestamp: &str, master_secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(app_key.as_bytes());
    h.update(timestamp.as_bytes());
    h.update(master_secret.as_bytes());
    hex::encode(h.finalize())
}

/// The HTTP status Getui answers a code with.
fn http_status(code: i64) -> StatusCode {
    match code {
        0 | 1 | 2 | 301 => StatusCode::OK,
        10_000..=19_999 => StatusCode::UNAUTHORIZED,
        20_000..=29_999 => StatusCode::BAD_REQUEST,
        30_000..=39_999 => StatusCode::FORBIDDEN,
        404 => StatusCode::NOT_FOUND,
        405 => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The `msg` of a code a fault answers (Getui's own texts for these are not documented).
fn fault_msg(code: i64) -> &'static str {
    match code {
        2 => "service is starting",
        10001 => "token is invalid or expired",
        10002 => "appId or ip is in blacklist",
        10003 => "auth frequency limit exceeded",
        10005 => "frequency limit exceeded, retry next minute",
        20001 => "param is invalid",
        30008 => "push list daily limit exceeded",
        30015 => "push list frequency limit exceeded, retry next minute",
        30019 => "system is busy",
        _ => "error",
    }
}

fn answer(entry: &mut Entry, code: i64, msg: &str, data: Option<Value>) -> Response {
    let status = http_status(code);
    entry.answer.http_status = status.as_u16();
    entry.answer.code = Some(code);
    let mut body = json!({ "code": code, "msg": msg });
    if let Some(d) = data {
        body["data"] = d;
    }
    json_answer(status, CONTENT_TYPE, &body)
}

fn error(entry: &mut Entry, code: i64) -> Response {
    answer(entry, code, fault_msg(code), None)
}

fn invalid(entry: &mut Entry, msg: &str) -> Response {
    answer(entry, 20001, msg, None)
}

/// What Getui remembers between calls: tasks, request ids, and the cids each task was pushed to.
#[derive(Debug)]
pub struct Tasks {
    /// taskid → (account, expires at).
    tasks: Recent<String, (usize, i64)>,
    /// (account, request_id) → taskid.
    requests: Recent<(usize, String), String>,
    /// (taskid, cid) → the status first answered.
    pushed: Recent<(String, String), &'static str>,
}

impl Tasks {
    /// Remembers `cap` of each at most.
    pub fn new(cap: usize) -> Self {
        Self {
            tasks: Recent::new(TASK_WINDOW, cap),
            requests: Recent::new(DAY, cap),
            pushed: Recent::new(TASK_WINDOW, cap),
        }
    }
}

/// The answer to a body that is not a JSON object: code 1.
fn not_json(entry: &mut Entry) -> Response {
    answer(entry, 1, "request body is not json", None)
}

/// `POST /v2/{appId}/auth`.
pub(super) async fn auth(
    State(s): State<Shared>,
    Path(app_id): Path<String>,
    body: Body,
) -> Response {
    let endpoint = format!("/v2/{app_id}/auth");
    let (mut entry, body) = match receive(&s, Channel::Getui, Kind::Token, &endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = auth_answer(&s, &app_id, &body, &mut entry).await;
    s.record(entry);
    answer
}

async fn auth_answer(s: &Shared, app_id: &str, body: &[u8], entry: &mut Entry) -> Response {
    let account = s.accounts.getui.iter().position(|a| a.app_id == app_id);
    entry.touchpoint = account.and_then(|i| s.name(Channel::Getui, i));
    let verdict = s.faults(entry, Endpoint::Token, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 10005, error);
    }
    let Some(doc) = super::parse_json(body) else {
        return not_json(entry);
    };
    let text = |k: &str| match doc.get(k) {
        Some(Value::String(v)) if !v.is_empty() => Some(v.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (Some(sign_given), Some(timestamp), Some(app_key)) =
        (text("sign"), text("timestamp"), text("appkey"))
    else {
        let missing = ["sign", "timestamp", "appkey"]
            .into_iter()
            .find(|k| text(k).is_none())
            .unwrap_or("sign");
        return invalid(entry, &format!("{missing} can not be empty"));
    };
    if !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return invalid(entry, "timestamp is invalid");
    }
    let Some(i) = account else {
        return invalid(entry, "appId is invalid");
    };
    let a = &s.accounts.getui[i];
    if app_key != a.app_key {
        return invalid(entry, "appkey is invalid");
    }
    let expected = sign(&a.app_key, &timestamp, a.master_secret.expose());
    let ok: bool = {
        use subtle::ConstantTimeEq;
        sign_given
            .to_ascii_lowercase()
            .as_bytes()
            .ct_eq(expected.as_bytes())
            .into()
    };
    if !ok {
        return invalid(entry, "sign is invalid");
    }
    let owner = Owner {
        channel: Channel::Getui,
        account: i,
        contact: false,
    };
    let (token, expires) = lock(&s.tokens).issue_getui(owner, now(), s.getui_ttl, || hex(16));
    answer(
        entry,
        0,
        "",
        Some(json!({ "expire_time": expires.to_string(), "token": token })),
    )
}

/// The account of the request's `token` header, when it is valid and of the path's app (else
/// the answer is 10001).
fn account_of(s: &Shared, app_id: &str, headers: &HeaderMap, entry: &mut Entry) -> Option<usize> {
    let path_account = s.accounts.getui.iter().position(|a| a.app_id == app_id);
    entry.touchpoint = path_account.and_then(|i| s.name(Channel::Getui, i));
    let token = headers.get("token").and_then(|v| v.to_str().ok());
    let standing = token.map_or(Standing::Unknown, |t| lock(&s.tokens).standing(t, now()));
    match standing {
        Standing::Valid(o) if o.channel == Channel::Getui && Some(o.account) == path_account => {
            Some(o.account)
        }
        _ => None,
    }
}

/// `POST /v2/{appId}/push/list/message`.
pub(super) async fn list_message(
    State(s): State<Shared>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = format!("/v2/{app_id}/push/list/message");
    let (mut entry, body) = match receive(&s, Channel::Getui, Kind::Message, &endpoint, body).await
    {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = message_answer(&s, &app_id, &headers, &body, &mut entry).await;
    s.record(entry);
    answer
}

/// What is wrong with a `push_message`, if anything.
fn bad_push_message(doc: &Map<String, Value>) -> Option<String> {
    let Some(Value::Object(pm)) = doc.get("push_message") else {
        return Some("push_message can not be empty".into());
    };
    let kinds = ["notification", "transmission", "revoke"];
    if kinds.iter().filter(|k| pm.contains_key(**k)).count() != 1 {
        return Some("please choose one of notification and transmission and revoke".into());
    }
    if let Some(n) = pm.get("notification") {
        for field in ["title", "body"] {
            if n.get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Some(format!("notification.{field} can not be empty"));
            }
        }
    }
    None
}

/// The task's lifetime in milliseconds: `settings.ttl`, or the default.
fn task_ttl(doc: &Map<String, Value>) -> Result<i64, ()> {
    match doc.get("settings").and_then(|s| s.get("ttl")) {
        None | Some(Value::Null) => Ok(DEFAULT_TASK_TTL_MS),
        Some(v) => match v.as_i64() {
            Some(-1) => Ok(MAX_TASK_TTL_MS),
            Some(t) if (0..=MAX_TASK_TTL_MS).contains(&t) => Ok(t),
            _ => Err(()),
        },
    }
}

async fn message_answer(
    s: &Shared,
    app_id: &str,
    headers: &HeaderMap,
    body: &[u8],
    entry: &mut Entry,
) -> Response {
    let Some(i) = account_of(s, app_id, headers, entry) else {
        return error(entry, 10001);
    };
    let verdict = s.faults(entry, Endpoint::Send, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 10005, error);
    }
    let Some(doc) = super::parse_json(body) else {
        return not_json(entry);
    };
    let request_id = match doc.get("request_id") {
        None | Some(Value::Null) => return invalid(entry, "request_id can not be empty"),
        Some(Value::String(r)) if (10..=32).contains(&r.chars().count()) => r.clone(),
        Some(_) => return invalid(entry, "request_id is invalid"),
    };
    if let Some(bad) = bad_push_message(&doc) {
        return invalid(entry, &bad);
    }
    let Ok(ttl) = task_ttl(&doc) else {
        return invalid(entry, "settings.ttl is invalid");
    };
    let now = now();
    let fresh = format!("RASL_{}", hex(16));
    let mut tasks = lock(&s.getui);
    let taskid = match tasks
        .requests
        .first_or_remember((i, request_id), fresh.clone(), now)
    {
        Some(first) => {
            entry.duplicate = true;
            first
        }
        None => {
            tasks
                .tasks
                .first_or_remember(fresh.clone(), (i, now.saturating_add(ttl)), now);
            fresh
        }
    };
    drop(tasks);
    answer(entry, 0, "", Some(json!({ "taskid": taskid })))
}

/// `POST /v2/{appId}/push/list/cid`.
pub(super) async fn list_cid(
    State(s): State<Shared>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = format!("/v2/{app_id}/push/list/cid");
    let (mut entry, body) = match receive(&s, Channel::Getui, Kind::Message, &endpoint, body).await
    {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = cid_answer(&s, &app_id, &headers, &body, &mut entry).await;
    s.record(entry);
    answer
}

/// The cids of `audience.cid`, or what is wrong with them.
fn cids(doc: &Map<String, Value>) -> Result<Vec<String>, &'static str> {
    let list = match doc.get("audience").and_then(|a| a.get("cid")) {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) | None | Some(Value::Null) => return Err("cid can not be empty"),
        Some(_) => return Err("cid is invalid"),
    };
    if list.len() > MAX_CIDS {
        return Err("cid size over limit");
    }
    let mut out = Vec::with_capacity(list.len());
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    for v in list {
        let Some(c) = v.as_str().filter(|c| !c.is_empty()) else {
            return Err("cid is invalid");
        };
        if !seen.insert(c) {
            return Err("contains duplicate cid");
        }
        out.push(c.to_string());
    }
    Ok(out)
}

/// Whether a device is online, as far as the sandbox says: fixed per cid, some of each.
fn status_of(cid: &str) -> &'static str {
    if cid.bytes().fold(0u8, |a, b| a ^ b) % 2 == 0 {
        "successed_online"
    } else {
        "successed_offline"
    }
}

async fn cid_answer(
    s: &Shared,
    app_id: &str,
    headers: &HeaderMap,
    body: &[u8],
    entry: &mut Entry,
) -> Response {
    let doc = super::parse_json(body);
    let listed = doc.as_ref().map(cids);
    if let Some(Ok(c)) = &listed {
        entry.recipients = c.clone();
    }
    let Some(i) = account_of(s, app_id, headers, entry) else {
        return error(entry, 10001);
    };
    let recipients = entry.recipients.clone();
    let verdict = s.faults(entry, Endpoint::Send, &recipients).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 10005, error);
    }
    let (Some(doc), Some(listed)) = (doc, listed) else {
        return not_json(entry);
    };
    let cids = match listed {
        Ok(c) => c,
        Err(msg) => return invalid(entry, msg),
    };
    let taskid = match doc.get("taskid") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return invalid(entry, "taskid can not be empty"),
    };
    let is_async = match doc.get("is_async") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return invalid(entry, "is_async is invalid"),
    };
    let now = now();
    let mut tasks = lock(&s.getui);
    match tasks.tasks.get(&taskid, now) {
        Some((owner, expires)) if owner == i && expires > now => {}
        _ => {
            drop(tasks);
            return invalid(entry, "taskid is invalid");
        }
    }
    let mut statuses = Map::with_capacity(cids.len());
    for cid in cids {
        let status = match verdict.failed.get(&cid) {
            Some(&code) => {
                entry.failed.push(Failed {
                    id: cid.clone(),
                    code: Some(code),
                });
                INVALID_TARGET
            }
            None => {
                let status = status_of(&cid);
                match tasks
                    .pushed
                    .first_or_remember((taskid.clone(), cid.clone()), status, now)
                {
                    Some(first) => {
                        entry.duplicate = true;
                        first
                    }
                    None => {
                        entry.delivered.push(cid.clone());
                        status
                    }
                }
            }
        };
        statuses.insert(cid, Value::from(status));
    }
    drop(tasks);
    let data = (!is_async).then(|| json!({ taskid: statuses }));
    answer(entry, 0, "", data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_is_the_hex_sha256_of_key_timestamp_and_secret() {
        // python3 -c 'import hashlib; print(hashlib.sha256(b"Ab4Cd6Ef8Gh0Ij2Kl4Mn61608172111917master").hexdigest())'
        assert_eq!(
            sign("Ab4Cd6Ef8Gh0Ij2Kl4Mn6", "1608172111917", "master"),
            "2ae60a095947910c793eb8a7b64c055b6dbd00f29f2036fdb0b69d54768e446e"
        );
    }

    #[test]
    fn codes_answer_with_their_http_status() {
        assert_eq!(http_status(0), StatusCode::OK);
        assert_eq!(http_status(10001), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(10005), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(20001), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(30015), StatusCode::FORBIDDEN);
        assert_eq!(http_status(-1), StatusCode::INTERNAL_SERVER_ERROR);
    }

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!("test documents are objects"),
        }
    }

    #[test]
    fn cid_lists_are_checked() {
        let many: Vec<String> = (0..=MAX_CIDS).map(|i| format!("c{i}")).collect();
        assert_eq!(
            cids(&doc(json!({"audience": {"cid": ["a", "b"]}}))),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            cids(&doc(json!({"audience": {"cid": many}}))),
            Err("cid size over limit")
        );
        assert_eq!(
            cids(&doc(json!({"audience": {"cid": ["a", "a"]}}))),
            Err("contains duplicate cid")
        );
        assert_eq!(
            cids(&doc(json!({"audience": {"cid": []}}))),
            Err("cid can not be empty")
        );
        assert_eq!(
            cids(&doc(json!({"audience": {"cid": [1]}}))),
            Err("cid is invalid")
        );
    }

    #[test]
    fn a_push_message_has_exactly_one_kind() {
        let ok = doc(json!({"push_message": {"notification": {"title": "t", "body": "b"}}}));
        assert_eq!(bad_push_message(&ok), None);
        let two = doc(json!({"push_message": {"transmission": "x", "revoke": {}}}));
        assert!(
            bad_push_message(&two)
                .unwrap()
                .starts_with("please choose one")
        );
        let untitled = doc(json!({"push_message": {"notification": {"body": "b"}}}));
        assert_eq!(
            bad_push_message(&untitled).as_deref(),
            Some("notification.title can not be empty")
        );
        assert_eq!(
            task_ttl(&doc(json!({"settings": {"ttl": 3_600_000}}))),
            Ok(3_600_000)
        );
        assert_eq!(task_ttl(&doc(json!({}))), Ok(DEFAULT_TASK_TTL_MS));
        assert_eq!(task_ttl(&doc(json!({"settings": {"ttl": -5}}))), Err(()));
    }
}
