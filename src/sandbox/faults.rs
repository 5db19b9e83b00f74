//! Injected failures (`POST /_sandbox/faults`): rules read from JSON, checked against the channel
//! and the accounts the sandbox knows, and matched against each request.
//!
//! A rule is `{"channel", "match"?: {"touchpoint"?, "endpoint"?: "token"|"send"}, "action", ...the
//! action's own keys, "count"?}`; the action may also be written as an object of its own
//! (`"action": {"action": "rate_limit", "code": 45011}`). For each request, in the order the rules
//! were posted:
//! - every matching `slow` rule adds its delay;
//! - the first matching `rate_limit` or `error` rule decides the answer (the request is refused);
//! - otherwise every matching `fail_users` rule whose ids the request names fails those
//!   recipients (the first rule naming an id gives its code).
//!
//! `count` is how many requests a rule affects (a `fail_users` rule affects a request only when it
//! names one of its recipients); a rule whose count is used up is removed. `expire_tokens` acts
//! once, when it is posted, and is not kept.
//!
//! The open platform (channel `open_platform`, `match.touchpoint` a platform's id) also takes
//! `grant_only {"permission_ids"}` (kept: each authorisation on the page grants at most these
//! permission sets, and uses up one of its count), and two actions that act once, when posted:
//! `revoke {"app_id"}` (the account withdraws its authorisation) and `expire_ticket` (the current
//! verify tickets are expired). It has no recipients: `fail_users` is refused there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::Channel;

/// The actions a rule may take, as the 400 answer lists them.
pub const ACTIONS: &str = r#"expire_tokens; rate_limit {"code"}; fail_users {"ids", "code"}; error {"code" | "http_status"}; slow {"delay"}; open_platform only: grant_only {"permission_ids"}, revoke {"app_id"}, expire_ticket"#;

/// The longest `slow` delay.
const MAX_DELAY: Duration = Duration::from_secs(600);

/// Which endpoints of a channel a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The token endpoints (`/cgi-bin/token`, `gettoken`, Getui `auth`).
    Token,
    /// Everything else: sends, pushes, webhooks.
    Send,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Token => "token",
            Endpoint::Send => "send",
        }
    }
}

/// What a rule does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Expire every token issued so far (acts when posted).
    ExpireTokens,
    /// Answer this rate-limit code.
    RateLimit {
        /// The platform code (`None` for custom: HTTP 429).
        code: Option<i64>,
    },
    /// Fail these recipients with this code.
    FailUsers {
        /// The recipients.
        ids: HashSet<String>,
        /// The code they fail with.
        code: i64,
    },
    /// Answer an error: a platform code, an HTTP status, or both.
    Error {
        /// The platform code.
        code: Option<i64>,
        /// The HTTP status.
        http_status: Option<u16>,
    },
    /// Answer after a delay.
    Slow {
        /// The delay.
        delay: Duration,
    },
    /// Open platform: an authorisation grants at most these permission sets.
    GrantOnly {
        /// The permission set ids.
        permission_ids: BTreeSet<u32>,
    },
    /// Open platform: the account withdraws its authorisation (acts when posted).
    Revoke {
        /// The Official Account's app id.
        app_id: String,
    },
    /// Open platform: the verify tickets pushed so far are expired (acts when posted).
    ExpireTicket,
}

impl Action {
    /// Whether it acts once, when posted, rather than being kept to match requests.
    pub fn acts_when_posted(&self) -> bool {
        matches!(
            self,
            Action::ExpireTokens | Action::ExpireTicket | Action::Revoke { .. }
        )
    }
}

/// One rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The channel it applies to.
    pub channel: Channel,
    /// Only this touchpoint's requests.
    pub touchpoint: Option<String>,
    /// Only these endpoints.
    pub endpoint: Option<Endpoint>,
    /// What it does.
    pub action: Action,
    /// How many more requests it affects (`None`: until cleared).
    pub remaining: Option<u64>,
}

/// Why a list of rules was refused (the whole list is: none of it is added).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The body is not a JSON list of rules.
    #[error(
        "the body must be a JSON list of rules, e.g. [{{\"channel\": \"oa\", \"action\": \"rate_limit\", \"code\": 45011, \"count\": 2}}]: {0}"
    )]
    NotAList(String),
    /// One rule is wrong.
    #[error("rule {index}: {problem}. Valid actions: {ACTIONS}")]
    Rule {
        /// Its position in the list (from 0).
        index: usize,
        /// What is wrong with it.
        problem: String,
    },
}

/// What the faults make of one request.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Wait this long before answering.
    pub delay: Duration,
    /// Refuse the request this way.
    pub refuse: Option<Refusal>,
    /// These recipients fail, with these codes.
    pub failed: HashMap<String, i64>,
}

/// How a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A rate-limit code (`None` for custom: HTTP 429).
    RateLimit(Option<i64>),
    /// An error code, HTTP status, or both.
    Error {
        /// The platform code.
        code: Option<i64>,
        /// The HTTP status.
        http_status: Option<u16>,
    },
}

/// The rate-limit codes each channel takes, the default first.
fn rate_limit_codes(channel: Channel) -> &'static [i64] {
    match channel {
        Channel::Oa => &[45011, 45009],
        Channel::Wecom => &[45009, 45033],
        Channel::Getui => &[10005, 30015, 30008],
        Channel::OpenPlatform => &[45009, 45011],
        Channel::Custom => &[],
    }
}

/// The code `fail_users` fails recipients with when the rule gives none.
fn default_fail_code(channel: Channel) -> i64 {
    match channel {
        Channel::Oa => 43004,
        Channel::Wecom => 40031,
        Channel::Getui => 20001,
        // Never used: the open platform's requests name no recipients (fail_users is refused).
        Channel::OpenPlatform => -1,
        Channel::Custom => 404,
    }
}

/// The active rules.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<Rule>,
}

impl Faults {
    /// The active rules as JSON (the answer to `POST` and `DELETE`).
    pub fn to_json(&self) -> Value {
        Value::Array(self.rules.iter().map(Rule::to_json).collect())
    }

    /// Adds the rules that stay; returns those that act once, when posted (`expire_tokens`,
    /// `expire_ticket`, `revoke`), for the caller to act on.
    pub fn add(&mut self, rules: Vec<Rule>) -> Vec<Rule> {
        let (once, keep): (Vec<Rule>, Vec<Rule>) =
            rules.into_iter().partition(|r| r.action.acts_when_posted());
        self.rules.extend(keep);
        once
    }

    /// The permission sets an authorisation of the platform `touchpoint` may grant: the
    /// intersection of every matching `grant_only` rule (each one's count used up), or `None` when
    /// no rule limits it.
    pub fn grant_only(&mut self, channel: Channel, touchpoint: &str) -> Option<BTreeSet<u32>> {
        let mut allowed: Option<BTreeSet<u32>> = None;
        self.rules.retain_mut(|r| {
            let Action::GrantOnly { permission_ids } = &r.action else {
                return true;
            };
            if r.channel != channel || r.touchpoint.as_deref().is_some_and(|t| t != touchpoint) {
                return true;
            }
            allowed = Some(match allowed.take() {
                None => permission_ids.clone(),
                Some(a) => a.intersection(permission_ids).copied().collect(),
            });
            match &mut r.remaining {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    *n > 0
                }
                None => true,
            }
        });
        allowed
    }

    /// Removes every rule.
    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// What the rules make of a request to `channel`'s `endpoint`, from `touchpoint` (if known),
    /// naming `recipients`. Counts are used up here.
    pub fn verdict(
        &mut self,
        channel: Channel,
        touchpoint: Option<&str>,
        endpoint: Endpoint,
        recipients: &[String],
    ) -> Verdict {
        let mut v = Verdict::default();
        if self.rules.is_empty() {
            return v;
        }
        let matches = |r: &Rule| {
            r.channel == channel
                && r.endpoint.is_none_or(|e| e == endpoint)
                && r.touchpoint
                    .as_deref()
                    .is_none_or(|t| Some(t) == touchpoint)
        };
        let mut affected = vec![false; self.rules.len()];
        for (i, r) in self.rules.iter().enumerate() {
            if !matches(r) {
                continue;
            }
            match &r.action {
                Action::Slow { delay } => {
                    v.delay = v.delay.saturating_add(*delay);
                    affected[i] = true;
                }
                Action::RateLimit { code } if v.refuse.is_none() => {
                    v.refuse = Some(Refusal::RateLimit(*code));
                    affected[i] = true;
                }
                Action::Error { code, http_status } if v.refuse.is_none() => {
                    v.refuse = Some(Refusal::Error {
                        code: *code,
                        http_status: *http_status,
                    });
                    affected[i] = true;
                }
                _ => {}
            }
        }
        if v.refuse.is_none() {
            for (i, r) in self.rules.iter().enumerate() {
                if let Action::FailUsers { ids, code } = &r.action
                    && matches(r)
                {
                    for id in recipients.iter().filter(|id| ids.contains(*id)) {
                        v.failed.entry(id.clone()).or_insert(*code);
                        affected[i] = true;
                    }
                }
            }
        }
        let mut i = 0;
        self.rules.retain_mut(|r| {
            let hit = affected[i];
            i += 1;
            if hit && let Some(n) = &mut r.remaining {
                *n = n.saturating_sub(1);
                return *n > 0;
            }
            true
        });
        v
    }
}

impl Rule {
    fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("channel".into(), json!(self.channel.name()));
        let mut matcher = Map::new();
        if let Some(t) = &self.touchpoint {
            matcher.insert("touchpoint".into(), json!(t));
        }
        if let Some(e) = self.endpoint {
            matcher.insert("endpoint".into(), json!(e.name()));
        }
        if !matcher.is_empty() {
            out.insert("match".into(), Value::Object(matcher));
        }
        match &self.action {
            Action::ExpireTokens => {
                out.insert("action".into(), json!("expire_tokens"));
            }
            Action::RateLimit { code } => {
                out.insert("action".into(), json!("rate_limit"));
                out.insert("code".into(), json!(code));
            }
            Action::FailUsers { ids, code } => {
                let mut ids: Vec<&String> = ids.iter().collect();
                ids.sort();
                out.insert("action".into(), json!("fail_users"));
                out.insert("ids".into(), json!(ids));
                out.insert("code".into(), json!(code));
            }
            Action::Error { code, http_status } => {
                out.insert("action".into(), json!("error"));
                if let Some(c) = code {
                    out.insert("code".into(), json!(c));
                }
                if let Some(s) = http_status {
                    out.insert("http_status".into(), json!(s));
                }
            }
            Action::Slow { delay } => {
                out.insert("action".into(), json!("slow"));
                out.insert(
                    "delay".into(),
                    json!(humantime::format_duration(*delay).to_string()),
                );
            }
            Action::GrantOnly { permission_ids } => {
                out.insert("action".into(), json!("grant_only"));
                out.insert("permission_ids".into(), json!(permission_ids));
            }
            Action::Revoke { app_id } => {
                out.insert("action".into(), json!("revoke"));
                out.insert("app_id".into(), json!(app_id));
            }
            Action::ExpireTicket => {
                out.insert("action".into(), json!("expire_ticket"));
            }
        }
        if let Some(n) = self.remaining {
            out.insert("count".into(), json!(n));
        }
        Value::Object(out)
    }
}

/// Reads a list of rules. `known(channel, id)` says whether a touchpoint of that channel is served
/// (a rule naming another could never match: it is refused as a typo).
pub fn parse(body: &[u8], known: impl Fn(Channel, &str) -> bool) -> Result<Vec<Rule>, FaultError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| FaultError::NotAList(e.to_string()))?;
    let list = match doc {
        Value::Array(list) => list,
        // A single rule is taken as a list of one.
        Value::Object(o) => vec![Value::Object(o)],
        other => return Err(FaultError::NotAList(format!("got {}", kind(&other)))),
    };
    list.into_iter()
        .enumerate()
        .map(|(index, v)| rule(v, &known).map_err(|problem| FaultError::Rule { index, problem }))
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn rule(v: Value, known: &impl Fn(Channel, &str) -> bool) -> Result<Rule, String> {
    let Value::Object(mut o) = v else {
        return Err(format!("a rule is an object, not {}", kind(&v)));
    };
    // The nested form: the action's keys move up beside the rule's.
    if let Some(Value::Object(inner)) = o.get("action").cloned() {
        o.remove("action");
        for (k, v) in inner {
            if o.contains_key(&k) {
                return Err(format!("`{k}` is given both in the rule and in its action"));
            }
            o.insert(k, v);
        }
    }
    let channel = match o.remove("channel") {
        Some(Value::String(c)) => Channel::parse(&c).ok_or_else(|| {
            format!("unknown channel `{c}`: use one of oa, wecom, getui, custom, open_platform")
        })?,
        Some(other) => return Err(format!("`channel` is {}, not a string", kind(&other))),
        None => {
            return Err("`channel` is missing (oa, wecom, getui, custom or open_platform)".into());
        }
    };
    let (touchpoint, endpoint) = matcher(o.remove("match"), channel, known)?;
    let action = match o.remove("action") {
        Some(Value::String(a)) => a,
        Some(other) => return Err(format!("`action` is {}, not a string", kind(&other))),
        None => return Err("`action` is missing".into()),
    };
    let count = match o.remove("count") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) if n > 0 => Some(n),
            _ => return Err(format!("`count` must be a whole number from 1, not {n}")),
        },
        Some(other) => return Err(format!("`count` is {}, not a number", kind(&other))),
    };
    let open_platform_only = ["grant_only", "revoke", "expire_ticket"];
    if open_platform_only.contains(&action.as_str()) && channel != Channel::OpenPlatform {
        return Err(format!(
            "`{action}` is an open platform fault: give it with \"channel\": \"open_platform\""
        ));
    }
    let action = match action.as_str() {
        "expire_tokens" => Action::ExpireTokens,
        "expire_ticket" => Action::ExpireTicket,
        "grant_only" => {
            let ids = match o.remove("permission_ids") {
                Some(Value::Array(ids)) => ids
                    .into_iter()
                    .map(|id| {
                        id.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                format!(
                                    "`permission_ids` must hold permission set ids such as 1 or 24, not {id}"
                                )
                            })
                    })
                    .collect::<Result<BTreeSet<u32>, _>>()?,
                Some(other) => {
                    return Err(format!(
                        "`permission_ids` is {}, not a list of permission set ids",
                        kind(&other)
                    ));
                }
                None => {
                    return Err(
                        "grant_only needs `permission_ids`, the permission sets an authorisation grants (e.g. [1, 2, 3, 7, 11, 15]; [] grants none)"
                            .into(),
                    );
                }
            };
            Action::GrantOnly {
                permission_ids: ids,
            }
        }
        "revoke" => match o.remove("app_id") {
            Some(Value::String(a)) if !a.is_empty() => Action::Revoke { app_id: a },
            Some(other) => {
                return Err(format!(
                    "`app_id` is {}, not the app id of an Official Account",
                    kind(&other)
                ));
            }
            None => {
                return Err(
                    "revoke needs `app_id`, the Official Account that withdraws its authorisation"
                        .into(),
                );
            }
        },
        "rate_limit" => {
            let allowed = rate_limit_codes(channel);
            let code = match take_code(&mut o)? {
                None => allowed.first().copied(),
                Some(c) if allowed.contains(&c) => Some(c),
                Some(c) if allowed.is_empty() => {
                    return Err(format!(
                        "a custom endpoint is rate-limited with HTTP 429 and takes no code (got {c})"
                    ));
                }
                Some(c) => {
                    return Err(format!(
                        "{} rate limits answer {}, not {c}",
                        channel.name(),
                        list(allowed)
                    ));
                }
            };
            Action::RateLimit { code }
        }
        "fail_users" if channel == Channel::OpenPlatform => {
            return Err(
                "the open platform's requests name no recipients: fail_users does not apply (use error, rate_limit, grant_only or revoke)"
                    .into(),
            );
        }
        "fail_users" => {
            let ids = match o.remove("ids") {
                Some(Value::Array(ids)) if !ids.is_empty() => ids
                    .into_iter()
                    .map(|id| match id {
                        Value::String(s) if !s.is_empty() => Ok(s),
                        other => Err(format!(
                            "`ids` must hold non-empty strings, not {}",
                            kind(&other)
                        )),
                    })
                    .collect::<Result<HashSet<_>, _>>()?,
                Some(_) => return Err("`ids` must be a non-empty list of recipient ids".into()),
                None => return Err("fail_users needs `ids`, the recipients to fail".into()),
            };
            let code = take_code(&mut o)?.unwrap_or_else(|| default_fail_code(channel));
            Action::FailUsers { ids, code }
        }
        "error" => {
            let code = take_code(&mut o)?;
            let http_status = match o.remove("http_status") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(s @ 100..=599) => Some(s as u16),
                    _ => return Err(format!("`http_status` must be from 100 to 599, not {n}")),
                },
                Some(other) => {
                    return Err(format!("`http_status` is {}, not a number", kind(&other)));
                }
            };
            match (code, http_status) {
                (None, None) => return Err("error needs `code`, `http_status` or both".into()),
                (Some(0), _) => return Err("`code` 0 is success, not an error".into()),
                (Some(c), _) if channel == Channel::Custom => {
                    return Err(format!(
                        "a custom endpoint answers HTTP statuses, not codes: give `http_status` instead of `code` {c}"
                    ));
                }
                _ => {}
            }
            Action::Error { code, http_status }
        }
        "slow" => {
            let delay = match o.remove("delay") {
                Some(Value::String(d)) => humantime::parse_duration(&d)
                    .map_err(|e| format!("`delay` {d:?} is not a duration ({e}; e.g. \"2s\")"))?,
                Some(other) => {
                    return Err(format!(
                        "`delay` is {}, not a duration such as \"2s\"",
                        kind(&other)
                    ));
                }
                None => return Err("slow needs `delay`, e.g. \"2s\"".into()),
            };
            if delay.is_zero() || delay > MAX_DELAY {
                return Err(format!(
                    "`delay` must be more than 0s and at most {}",
                    humantime::format_duration(MAX_DELAY)
                ));
            }
            Action::Slow { delay }
        }
        other => return Err(format!("unknown action `{other}`")),
    };
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "unknown key `{k}` for action `{action_name}`",
            action_name = name_of(&action)
        ));
    }
    Ok(Rule {
        channel,
        touchpoint,
        endpoint,
        action,
        remaining: count,
    })
}

fn name_of(a: &Action) -> &'static str {
    match a {
        Action::ExpireTokens => "expire_tokens",
        Action::RateLimit { .. } => "rate_limit",
        Action::FailUsers { .. } => "fail_users",
        Action::Error { .. } => "error",
        Action::Slow { .. } => "slow",
        Action::GrantOnly { .. } => "grant_only",
        Action::Revoke { .. } => "revoke",
        Action::ExpireTicket => "expire_ticket",
    }
}

fn list(codes: &[i64]) -> String {
    let codes: Vec<String> = codes.iter().map(i64::to_string).collect();
    codes.join(" or ")
}

fn take_code(o: &mut Map<String, Value>) -> Result<Option<i64>, String> {
    match o.remove("code") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("`code` must be a whole number, not {n}")),
        Some(other) => Err(format!("`code` is {}, not a number", kind(&other))),
    }
}

type Matcher = (Option<String>, Option<Endpoint>);

fn matcher(
    v: Option<Value>,
    channel: Channel,
    known: &impl Fn(Channel, &str) -> bool,
) -> Result<Matcher, String> {
    let o = match v {
        None | Some(Value::Null) => return Ok((None, None)),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(format!("`match` is {}, not an object", kind(&other))),
    };
    let mut o: BTreeMap<String, Value> = o.into_iter().collect();
    let touchpoint = match o.remove("touchpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if known(channel, &t) => Some(t),
        Some(Value::String(t)) => {
            return Err(format!(
                "the sandbox serves no {} touchpoint `{t}` (see the accounts it listed when it started)",
                channel.name()
            ));
        }
        Some(other) => {
            return Err(format!(
                "`match.touchpoint` is {}, not a string",
                kind(&other)
            ));
        }
    };
    let endpoint = match o.remove("endpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) if e == "token" => Some(Endpoint::Token),
        Some(Value::String(e)) if e == "send" => Some(Endpoint::Send),
        Some(other) => {
            return Err(format!(
                "`match.endpoint` must be \"token\" or \"send\", not {other}"
            ));
        }
    };
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "unknown key `match.{k}` (a match takes `touchpoint` and `endpoint`)"
        ));
    }
    Ok((touchpoint, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<Vec<Rule>, FaultError> {
        parse(text.as_bytes(), |c, id| {
            (c == Channel::Oa && id == "wechat-oa") || (c == Channel::Wecom && id == "wecom")
        })
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rules_read_in_the_flat_and_the_nested_form() {
        let flat =
            rules(r#"[{"channel":"oa","action":"rate_limit","code":45009,"count":2}]"#).unwrap();
        let nested =
            rules(r#"[{"channel":"oa","action":{"action":"rate_limit","code":45009},"count":2}]"#)
                .unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat[0].action, Action::RateLimit { code: Some(45009) });
        assert_eq!(flat[0].remaining, Some(2));
        let default = rules(r#"{"channel":"getui","action":"rate_limit"}"#).unwrap();
        assert_eq!(default[0].action, Action::RateLimit { code: Some(10005) });
    }

    #[test]
    fn bad_rules_name_the_problem_and_the_valid_actions() {
        let cases = [
            (
                r#"[{"channel":"sms","action":"slow","delay":"1s"}]"#,
                "unknown channel `sms`",
            ),
            (
                r#"[{"channel":"oa","action":"explode"}]"#,
                "unknown action `explode`",
            ),
            (
                r#"[{"channel":"oa","action":"rate_limit","code":45033}]"#,
                "45011 or 45009, not 45033",
            ),
            (r#"[{"channel":"oa","action":"fail_users"}]"#, "needs `ids`"),
            (
                r#"[{"channel":"oa","action":"error"}]"#,
                "`code`, `http_status` or both",
            ),
            (
                r#"[{"channel":"custom","action":"error","code":-1}]"#,
                "give `http_status`",
            ),
            (
                r#"[{"channel":"oa","action":"slow","delay":"soon"}]"#,
                "not a duration",
            ),
            (
                r#"[{"channel":"oa","action":"slow","delay":"2h"}]"#,
                "at most 10m",
            ),
            (
                r#"[{"channel":"oa","action":"slow","delay":"1s","colour":1}]"#,
                "unknown key `colour`",
            ),
            (
                r#"[{"channel":"oa","match":{"touchpoint":"nope"},"action":"expire_tokens"}]"#,
                "no oa touchpoint `nope`",
            ),
            (
                r#"[{"channel":"oa","match":{"endpoint":"refund"},"action":"expire_tokens"}]"#,
                "\"token\" or \"send\"",
            ),
            (
                r#"[{"channel":"oa","action":"expire_tokens","count":0}]"#,
                "from 1",
            ),
        ];
        for (text, problem) in cases {
            let e = rules(text).unwrap_err().to_string();
            assert!(e.contains(problem), "{text}: {e}");
            assert!(
                e.contains("Valid actions: expire_tokens; rate_limit"),
                "{e}"
            );
        }
        let e = rules("42").unwrap_err().to_string();
        assert!(e.contains("JSON list of rules"), "{e}");
    }

    #[test]
    fn a_count_limits_how_many_requests_a_rule_affects() {
        let mut f = Faults::default();
        f.add(rules(r#"[{"channel":"oa","match":{"endpoint":"send"},"action":"error","code":-1,"count":2}]"#).unwrap());
        let refused = Some(Refusal::Error {
            code: Some(-1),
            http_status: None,
        });
        // Another channel and the token endpoint do not use it up.
        assert_eq!(
            f.verdict(Channel::Wecom, None, Endpoint::Send, &[]).refuse,
            None
        );
        assert_eq!(
            f.verdict(Channel::Oa, None, Endpoint::Token, &[]).refuse,
            None
        );
        assert_eq!(
            f.verdict(Channel::Oa, None, Endpoint::Send, &[]).refuse,
            refused
        );
        assert_eq!(
            f.verdict(Channel::Oa, None, Endpoint::Send, &[]).refuse,
            refused
        );
        assert_eq!(
            f.verdict(Channel::Oa, None, Endpoint::Send, &[]).refuse,
            None
        );
        assert_eq!(f.to_json(), json!([]));
    }

    #[test]
    fn fail_users_counts_only_requests_naming_its_ids() {
        let mut f = Faults::default();
        f.add(rules(r#"[{"channel":"wecom","match":{"touchpoint":"wecom"},"action":"fail_users","ids":["u2"],"code":81013,"count":1}]"#).unwrap());
        let v = f.verdict(Channel::Wecom, Some("wecom"), Endpoint::Send, &ids(&["u1"]));
        assert!(v.failed.is_empty());
        let v = f.verdict(Channel::Wecom, Some("other"), Endpoint::Send, &ids(&["u2"]));
        assert!(v.failed.is_empty(), "another touchpoint");
        let v = f.verdict(
            Channel::Wecom,
            Some("wecom"),
            Endpoint::Send,
            &ids(&["u1", "u2"]),
        );
        assert_eq!(v.failed, HashMap::from([("u2".to_string(), 81013)]));
        let v = f.verdict(Channel::Wecom, Some("wecom"), Endpoint::Send, &ids(&["u2"]));
        assert!(v.failed.is_empty(), "the count is used up");
    }

    #[test]
    fn slow_adds_up_and_the_first_refusal_wins() {
        let mut f = Faults::default();
        f.add(
            rules(
                r#"[
            {"channel":"getui","action":"slow","delay":"1s"},
            {"channel":"getui","action":"slow","delay":"500ms","count":1},
            {"channel":"getui","action":"rate_limit","code":30015},
            {"channel":"getui","action":"error","http_status":503},
            {"channel":"getui","action":"fail_users","ids":["c1"]}
        ]"#,
            )
            .unwrap(),
        );
        let v = f.verdict(Channel::Getui, None, Endpoint::Send, &ids(&["c1"]));
        assert_eq!(v.delay, Duration::from_millis(1500));
        assert_eq!(v.refuse, Some(Refusal::RateLimit(Some(30015))));
        assert!(
            v.failed.is_empty(),
            "a refused request fails no one in particular"
        );
        let v = f.verdict(Channel::Getui, None, Endpoint::Send, &[]);
        assert_eq!(v.delay, Duration::from_secs(1));
        assert_eq!(f.to_json().as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn expire_tokens_is_handed_back_not_kept() {
        let mut f = Faults::default();
        let expire = f.add(rules(r#"[{"channel":"oa","action":"expire_tokens"},{"channel":"oa","action":"slow","delay":"1s"}]"#).unwrap());
        assert_eq!(expire.len(), 1);
        assert_eq!(
            f.to_json(),
            json!([{"channel": "oa", "action": "slow", "delay": "1s"}])
        );
        f.clear();
        assert_eq!(f.to_json(), json!([]));
    }

    fn open_rules(text: &str) -> Result<Vec<Rule>, FaultError> {
        parse(text.as_bytes(), |c, id| {
            c == Channel::OpenPlatform && id == "open-platform"
        })
    }

    #[test]
    fn open_platform_faults_read_and_are_refused_elsewhere() {
        let r = open_rules(
            r#"[{"channel":"open_platform","action":"grant_only","permission_ids":[1,2,7]},
                {"channel":"open_platform","action":"revoke","app_id":"wx8a7c3e1f5b2d4690"},
                {"channel":"open_platform","match":{"touchpoint":"open-platform"},"action":"expire_ticket"}]"#,
        )
        .unwrap();
        assert_eq!(
            r[0].action,
            Action::GrantOnly {
                permission_ids: BTreeSet::from([1, 2, 7])
            }
        );
        assert!(!r[0].action.acts_when_posted());
        assert!(r[1].action.acts_when_posted() && r[2].action.acts_when_posted());
        let cases = [
            (
                r#"{"channel":"oa","action":"revoke","app_id":"wx1"}"#,
                "open platform fault",
            ),
            (
                r#"{"channel":"open_platform","action":"grant_only"}"#,
                "needs `permission_ids`",
            ),
            (
                r#"{"channel":"open_platform","action":"grant_only","permission_ids":[0]}"#,
                "permission set ids",
            ),
            (
                r#"{"channel":"open_platform","action":"revoke"}"#,
                "needs `app_id`",
            ),
            (
                r#"{"channel":"open_platform","action":"fail_users","ids":["u"]}"#,
                "no recipients",
            ),
        ];
        for (text, problem) in cases {
            let e = open_rules(text).unwrap_err().to_string();
            assert!(e.contains(problem), "{text}: {e}");
        }
    }

    #[test]
    fn grant_only_rules_intersect_and_use_up_their_count() {
        let mut f = Faults::default();
        let once = f.add(
            open_rules(
                r#"[{"channel":"open_platform","action":"grant_only","permission_ids":[1,2,7],"count":1},
                    {"channel":"open_platform","action":"grant_only","permission_ids":[2,7,24]},
                    {"channel":"open_platform","action":"expire_ticket"}]"#,
            )
            .unwrap(),
        );
        assert_eq!(once.len(), 1, "expire_ticket acts once and is not kept");
        // Requests to the API do not use them up.
        assert_eq!(
            f.verdict(
                Channel::OpenPlatform,
                Some("open-platform"),
                Endpoint::Send,
                &[]
            ),
            Verdict::default()
        );
        assert_eq!(
            f.grant_only(Channel::OpenPlatform, "open-platform"),
            Some(BTreeSet::from([2, 7]))
        );
        assert_eq!(
            f.grant_only(Channel::OpenPlatform, "open-platform"),
            Some(BTreeSet::from([2, 7, 24])),
            "the first rule's count is used up"
        );
        assert_eq!(f.grant_only(Channel::Oa, "open-platform"), None);
        assert_eq!(
            f.to_json(),
            json!([{"channel": "open_platform", "action": "grant_only", "permission_ids": [2, 7, 24]}])
        );
    }
}
