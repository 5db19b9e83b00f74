//! The WeChat Official Account (公众号) channel (CHANNELS.md 1.1, 1.3, 1.5): template messages,
//! one `POST /cgi-bin/message/template/send?access_token=` per recipient. The access token comes
//! from the account's AppSecret (direct mode) or through an open platform (third-party mode);
//! everything else is one code path.
//!
//! # Third-party mode
//! The account's platform is found by id in [`super::Shared::platforms`] (absent: the touchpoint
//! is unavailable until the platform's file is applied), and the token comes from
//! `api_authorizer_token` (CHANNELS.md §2.6) with the refresh token of the file
//! `auth.authorizer_refresh_token` names. The file is read again whenever it changes (a binding
//! writes a new one; the token of the old binding is then dropped); a refresh token WeChat
//! returns in place of the one sent is written back (atomically, 0600) and, if that fails, kept
//! in memory and written on the next batch. The authorizer token is cached in
//! [`super::Shared::tokens`] like a direct one, keyed by the platform and the account.
//!
//! | the platform says | the touchpoint |
//! |---|---|
//! | no refresh token file | held (`not_bound`): "not bound yet: run `touchctl auth wechat ID`" |
//! | 61023 | held: "authorisation revoked or refresh token invalid (61023): re-authorise with `touchctl auth wechat ID`" |
//! | no ticket yet, 61005, 61006 | waits a minute (the next push ends it by itself) |
//! | 61004, 40125, 41004, 61011 | held: the platform's whitelist, secret or app id is wrong |
//!
//! `plan --refresh` checks a bound account's granted permissions against
//! `required_permissions`, and, when permission set 33 lets the platform list them
//! (`/cgi-bin/wxopen/wxamplinkget`), that the templates' mini programs and
//! `linked_mini_programs` are linked.
//!
//! # Access tokens
//! A token comes from `GET /cgi-bin/token` (client_credential, the account's app id and AppSecret)
//! and is shared by every worker through [`super::Shared::tokens`], keyed by the API base URL, the
//! app id and the secret (a rotated secret is a new credential): the first batch that needs it
//! fetches it, the others wait for that fetch. It is used until shortly before its `expires_in`
//! ends (five minutes before, for WeChat's two hours). Each call of `/cgi-bin/token` issues a new token and leaves the previous one
//! working for five more minutes only, so tokens are fetched no more than that: when WeChat refuses
//! one (40001, 40014, 42001) it is dropped — once, however many requests were refused together —
//! and the request is sent again once with a new one. `plan --refresh` ([`Channel::probe`]) uses
//! the cached token when it is fresh; run in another process than the daemon it fetches one of its
//! own, which leaves the daemon's five more minutes, after which the daemon's next request is
//! refused, fetches a new token and is sent again: nothing is lost, one token fetch is spent.
//!
//! # Batches
//! A stored batch holds up to [`BATCH_SIZE`] recipients. They are sent [`IN_FLIGHT`] at a time
//! (on top of the daemon's per-touchpoint `--concurrency` batches). As soon as an answer speaks
//! for the whole touchpoint (a rate limit, a daily quota, a refused configuration) or the platform
//! cannot be reached, no more requests of the batch are started: the recipients not sent are
//! retried (after the wait, once released, or under the retry policy).
//!
//! # `client_msg_id`
//! Each message carries `client_msg_id` = `tc` followed by the first 15 bytes, in hex, of
//! SHA-256(batch id, NUL, user id): 32 characters. The batch id is the same on every attempt, after
//! a restart and on a replay, so a message sent again within ten minutes (after a timeout, a crash,
//! a lost answer) is not a second message: WeChat answers it with the first one's `msgid`.
//!
//! # Answers
//! | errcode | outcome |
//! |---|---|
//! | 0 | delivered |
//! | 40001, 40014, 42001 | token refused: a new token, the request sent once more (again refused: that recipient retried later) |
//! | 40003, 43004, 43019, 43101, 45047, 50005 | that recipient failed for good (not following, blocked, refused, not of this account) |
//! | 47003 naming a field filled from the recipient's own params | that recipient failed for good (its value breaks the template's rules) |
//! | -1 and any code not listed | that recipient retried later, under the retry policy |
//! | 45011 | the touchpoint waits until the next minute |
//! | 45009 | the touchpoint waits until the daily quota resets, 00:00 China Standard Time (UTC+8) |
//! | 40013, 40125, 40164, 61004, 40243, 41002, 41004, 40002 (and 40001 from `/cgi-bin/token`) | held: the app id, secret or IP whitelist is wrong |
//! | 40036, 40037, 47003 (other fields), 48001, 61007 | held: the template or the account's permissions are wrong |
//!
//! An answer that is not WeChat's JSON (an HTTP error status, a body that is not a JSON object,
//! one longer than [`MAX_ANSWER`]), a timeout or a network error retries that recipient and stops
//! the batch. Nothing here prints a token, a secret or a URL (the token is in its query).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::answer::{describe, excerpt, read_capped, to_next_minute, to_quota_reset};
use super::open_platform::{PlatformError, client::write_refresh_token};
use super::token::{CredentialKey, Token};
use super::{
    Channel, Message, Miss, Outgoing, Report, Rest, Shared, Signal, Unavailable, template,
};
use crate::model::{
    DynamicParams, MessageTemplate, Permission, Secret, SecretError, SecretPolicy, SecretRef,
    WechatAuth, WechatOaSpec,
};

/// The real service's base URL.
pub const DEFAULT_API_BASE: &str = "https://api.weixin.qq.com";

/// Recipients per stored batch (each is one request).
pub const BATCH_SIZE: usize = 100;

/// Requests of one batch in flight at once.
pub const IN_FLIGHT: usize = 4;

/// How long one request may take.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// The most of an answer read (WeChat's are well under 1 KiB).
pub const MAX_ANSWER: usize = 64 * 1024;

/// A token's lifetime when the answer gives none (WeChat's is 7200 s), and the longest believed.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(7200);
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// The longest platform message kept in a reason.
const MAX_ERRMSG: usize = 200;

/// A live Official Account: its settings and where its access token comes from.
pub struct WechatChannel {
    app_id: String,
    credential: Credential,
    base: String,
    send_url: url::Url,
    templates: Vec<MessageTemplate>,
    dynamic: DynamicParams,
    /// `linked_mini_programs`, checked by `plan --refresh`.
    linked: Vec<String>,
    /// `required_permissions`, checked by `plan --refresh` in third-party mode.
    required: Vec<Permission>,
    shared: Arc<Shared>,
}

impl WechatChannel {
    /// The channel of the touchpoint `id`: in direct mode its AppSecret resolved (file references
    /// relative to `base`); in third-party mode its platform found in [`Shared::platforms`] and its
    /// refresh token file read (it must exist: the account is bound).
    pub fn open(
        id: &str,
        spec: &WechatOaSpec,
        base: &std::path::Path,
        policy: &SecretPolicy,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        match &spec.auth {
            WechatAuth::Direct { app_secret } => {
                let secret = app_secret.resolve(base, policy).map_err(|e| {
                    Unavailable(format!("cannot read `auth.app_secret` {app_secret}: {e}"))
                })?;
                Self::new(spec, secret, shared)
            }
            WechatAuth::ThirdParty {
                platform,
                authorizer_refresh_token,
            } => {
                let Some(found) = shared.platforms.get(platform) else {
                    return Err(Unavailable(not_live(platform)));
                };
                let refresh = RefreshFile {
                    touchpoint: id.to_string(),
                    reference: authorizer_refresh_token.clone(),
                    base: base.to_path_buf(),
                    policy: policy.clone(),
                    read: Mutex::default(),
                };
                refresh.current().map_err(|f| Unavailable(f.to_string()))?;
                let key = CredentialKey::of(&[
                    b"wechat_authorizer",
                    found.api_base().as_bytes(),
                    found.component_app_id().as_bytes(),
                    spec.app_id.as_bytes(),
                ]);
                Self::with_credential(
                    spec,
                    Credential::ThirdParty(Box::new(ThirdParty {
                        platform: platform.clone(),
                        refresh,
                        key,
                    })),
                    shared,
                )
            }
        }
    }

    /// A channel in direct mode with its AppSecret already resolved.
    pub fn new(
        spec: &WechatOaSpec,
        secret: Secret,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        let base = api_base(spec);
        let token_url =
            url::Url::parse(&format!("{base}/cgi-bin/token")).map_err(|e| bad_base(&base, e))?;
        let key = CredentialKey::of(&[
            b"wechat_official_account",
            base.as_bytes(),
            spec.app_id.as_bytes(),
            secret.expose().as_bytes(),
        ]);
        Self::with_credential(
            spec,
            Credential::Direct {
                secret,
                token_url,
                key,
            },
            shared,
        )
    }

    fn with_credential(
        spec: &WechatOaSpec,
        credential: Credential,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        let base = api_base(spec);
        let send_url = url::Url::parse(&format!("{base}/cgi-bin/message/template/send"))
            .map_err(|e| bad_base(&base, e))?;
        Ok(Self {
            app_id: spec.app_id.clone(),
            credential,
            base,
            send_url,
            templates: spec.templates.clone(),
            dynamic: spec.dynamic_params.clone(),
            linked: spec.linked_mini_programs.clone(),
            required: spec.required_permissions.clone(),
            shared: shared.clone(),
        })
    }

    /// The key of the cached token.
    fn key(&self) -> CredentialKey {
        match &self.credential {
            Credential::Direct { key, .. } => *key,
            Credential::ThirdParty(tp) => tp.key,
        }
    }

    /// The cached token, or a new one.
    async fn token(&self, client: &reqwest::Client) -> Result<Arc<Token>, Failure> {
        let tp = match &self.credential {
            Credential::Direct {
                secret,
                token_url,
                key,
            } => {
                return self
                    .shared
                    .tokens
                    .get(*key, || self.fetch_token(client, token_url, secret))
                    .await;
            }
            Credential::ThirdParty(tp) => tp,
        };
        let asked = Instant::now();
        let (refresh, rebound) = tp.refresh.current()?;
        let fetch = || self.fetch_authorizer_token(tp, refresh.clone());
        let token = self.shared.tokens.get(tp.key, fetch).await?;
        if rebound && token.fetched < asked {
            // The account was bound again since: the token of the old binding is dropped.
            self.shared.tokens.invalidate(tp.key, &token).await;
            let fetch = || self.fetch_authorizer_token(tp, refresh);
            return self.shared.tokens.get(tp.key, fetch).await;
        }
        Ok(token)
    }

    /// `GET /cgi-bin/token`: a new token and its lifetime.
    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        token_url: &url::Url,
        secret: &Secret,
    ) -> Result<(Secret, Duration), Failure> {
        let mut url = token_url.clone();
        url.query_pairs_mut()
            .append_pair("grant_type", "client_credential")
            .append_pair("appid", &self.app_id)
            .append_pair("secret", secret.expose());
        let response = client.get(url).timeout(TIMEOUT).send().await;
        let (_, answer) = read_answer(response).await?;
        token_answer(&answer)
    }

    /// `api_authorizer_token` through the platform: a new token and its lifetime; a refresh
    /// token WeChat rotated is written back to the file.
    async fn fetch_authorizer_token(
        &self,
        tp: &ThirdParty,
        refresh: Secret,
    ) -> Result<(Secret, Duration), Failure> {
        let Some(platform) = self.shared.platforms.get(&tp.platform) else {
            return Err(Failure::Said(Signal::Hold {
                code: "platform_not_live".into(),
                reason: not_live(&tp.platform),
            }));
        };
        let answer = platform
            .authorizer_token(&self.app_id, &refresh)
            .await
            .map_err(|e| platform_failure(&tp.refresh.touchpoint, e))?;
        if let Some(rotated) = answer.refresh_token
            && rotated != refresh
        {
            tp.refresh.rotated(rotated);
        }
        Ok((answer.access_token, answer.expires_in))
    }

    /// `plan --refresh` of a bound account: its permissions against `required_permissions`, and
    /// its linked mini programs (when permission 33 lets the platform read them) against the
    /// file's.
    async fn probe_binding(
        &self,
        client: &reqwest::Client,
        tp: &ThirdParty,
        token: &Token,
        found: String,
    ) -> Result<String, String> {
        let Some(platform) = self.shared.platforms.get(&tp.platform) else {
            return Err(not_live(&tp.platform));
        };
        let info = platform
            .authorizer_info(&self.app_id)
            .await
            .map_err(|e| format!("bound, but its permissions cannot be read: {e}"))?;
        let mut problems = Vec::new();
        if let Some(missing) = missing_permissions(&self.required, &info.granted) {
            problems.push(missing);
        }
        let mut linked_note = String::new();
        if info.granted.contains(&LINK_PERMISSION) {
            match self.linked_mini_programs(client, token).await {
                Ok(linked) => {
                    problems.extend(unlinked(&self.linked, &self.templates, &linked));
                    linked_note = if linked.is_empty() {
                        "; linked mini programs: none".into()
                    } else {
                        format!("; linked mini programs: {}", linked.join(", "))
                    };
                }
                Err(e) => problems.push(format!("its linked mini programs cannot be read: {e}")),
            }
        }
        if let Some(why) = tp.refresh.unwritten() {
            problems.push(format!(
                "WeChat rotated the refresh token, and it is not written yet ({why}): it is kept in memory meanwhile"
            ));
        }
        if problems.is_empty() {
            let granted: Vec<String> = info.granted.iter().map(|id| permission_name(*id)).collect();
            Ok(format!(
                "{found}; granted: {}{linked_note}",
                granted.join(", ")
            ))
        } else {
            Err(problems.join("; "))
        }
    }

    /// `wxamplinkget`: the app ids of the mini programs linked to the account (status 1).
    async fn linked_mini_programs(
        &self,
        client: &reqwest::Client,
        token: &Token,
    ) -> Result<Vec<String>, String> {
        let mut url = url::Url::parse(&format!("{}/cgi-bin/wxopen/wxamplinkget", self.base))
            .map_err(|e| e.to_string())?;
        url.query_pairs_mut()
            .append_pair("access_token", token.value.expose());
        let response = client
            .post(url)
            .timeout(TIMEOUT)
            .header("content-type", "application/json; charset=utf-8")
            .body("{}")
            .send()
            .await;
        let (_, answer) = read_answer(response).await.map_err(|f| f.to_string())?;
        match errcode(&answer) {
            None | Some(0) => {}
            Some(code) => return Err(format!("{code} {}", errmsg_of(&answer))),
        }
        Ok(answer
            .get("wxopens")
            .and_then(|w| w.get("items"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| i.get("status").and_then(Value::as_i64) == Some(1))
            .filter_map(|i| i.get("appid").and_then(Value::as_str))
            .map(str::to_string)
            .collect())
    }

    /// Sends one prepared message; says what became of its recipient.
    async fn deliver(
        &self,
        client: &reqwest::Client,
        msg: &Prepared,
        stop: &AtomicBool,
    ) -> (String, Sent) {
        (
            msg.user_id.clone(),
            self.try_deliver(client, msg, stop).await,
        )
    }

    /// Sends one prepared message, with one more try on a refused token.
    async fn try_deliver(
        &self,
        client: &reqwest::Client,
        msg: &Prepared,
        stop: &AtomicBool,
    ) -> Sent {
        if stop.load(Ordering::SeqCst) {
            return Sent::Skipped;
        }
        let mut refreshed = false;
        loop {
            let token = match self.token(client).await {
                Ok(t) => t,
                Err(f) => {
                    stop.store(true, Ordering::SeqCst);
                    return Sent::Stopped(token_failure(f));
                }
            };
            let mut url = self.send_url.clone();
            url.query_pairs_mut()
                .append_pair("access_token", token.value.expose());
            let response = client
                .post(url)
                .timeout(TIMEOUT)
                .header("content-type", "application/json; charset=utf-8")
                .body(msg.body.clone())
                .send()
                .await;
            let (status, code, errmsg) = match read_answer(response).await.and_then(send_answer) {
                Ok(answer) => answer,
                Err(f) => {
                    stop.store(true, Ordering::SeqCst);
                    return Sent::Stopped(token_failure(f));
                }
            };
            let miss = |retry: bool, reason: String| {
                let user_id = msg.user_id.clone();
                Sent::Miss(
                    status,
                    Miss {
                        user_id,
                        retry,
                        reason,
                    },
                )
            };
            match send_meaning(code, &errmsg, &msg.personal) {
                Meaning::Delivered => return Sent::Delivered(status),
                Meaning::Token if !refreshed => {
                    refreshed = true;
                    self.shared.tokens.invalidate(self.key(), &token).await;
                }
                Meaning::Token => {
                    return miss(
                        true,
                        format!("{code} {errmsg}: refused a token fetched just now; retried later"),
                    );
                }
                Meaning::User => return miss(false, format!("{code} {errmsg}")),
                Meaning::Later => return miss(true, format!("{code} {errmsg}; retried later")),
                Meaning::Wait(until) => {
                    stop.store(true, Ordering::SeqCst);
                    return Sent::Stopped(Stop::Signal(Some(status), wait(until, code, &errmsg)));
                }
                Meaning::Broken(fix) => {
                    stop.store(true, Ordering::SeqCst);
                    let fix = fix.replace("{template}", &msg.template);
                    return Sent::Stopped(Stop::Signal(
                        Some(status),
                        Signal::Hold {
                            code: code.to_string(),
                            reason: format!("{code} {errmsg}: {fix}"),
                        },
                    ));
                }
            }
        }
    }
}

impl Channel for WechatChannel {
    fn batch_size(&self) -> usize {
        BATCH_SIZE
    }

    fn endpoint(&self) -> &str {
        &self.base
    }

    fn check(&self, message: &Message, params: &Map<String, Value>) -> Result<(), Vec<String>> {
        template::check(&self.templates, message, params, &self.dynamic, false).map(|_| ())
    }

    fn send<'a>(&'a self, batch: Outgoing<'a>) -> BoxFuture<'a, Report> {
        Box::pin(async move {
            let recipients = match batch.parsed_recipients() {
                Ok(r) => r,
                Err(e) => return Report::dead(None, e),
            };
            let params = batch.params();
            let template = match template::check(
                &self.templates,
                batch.message,
                &params,
                &self.dynamic,
                false,
            ) {
                Ok(t) => t,
                Err(problems) => {
                    return Report::dead(
                        None,
                        format!(
                            "the trigger no longer fits the touchpoint's templates, which changed since it was accepted: {}; send the campaign again with a trigger that fits",
                            problems.join("; ")
                        ),
                    );
                }
            };
            // The first token before any request: a refused credential holds the touchpoint
            // without a message tried.
            if let Err(f) = self.token(batch.client).await {
                return match token_failure(f) {
                    Stop::Signal(status, Signal::Hold { code, reason }) => {
                        Report::hold(status, code, reason)
                    }
                    Stop::Signal(status, Signal::Wait { wait, code, reason }) => {
                        Report::wait(status, wait, code, reason)
                    }
                    Stop::Transport { status, error } => {
                        Report::retry(status, None, format!("cannot get an access token: {error}"))
                    }
                };
            }
            let mut misses = Vec::new();
            let mut prepared = Vec::with_capacity(recipients.len());
            for r in &recipients {
                match prepare(template, &params, r, batch.batch_id) {
                    Ok(p) => prepared.push(p),
                    Err(miss) => misses.push(miss),
                }
            }
            let stop = AtomicBool::new(false);
            let mut waiting = prepared.iter();
            let mut running = FuturesUnordered::new();
            let mut results = Vec::with_capacity(prepared.len());
            loop {
                while running.len() < IN_FLIGHT {
                    let Some(p) = waiting.next() else { break };
                    running.push(self.deliver(batch.client, p, &stop));
                }
                match running.next().await {
                    Some(sent) => results.push(sent),
                    None => break,
                }
            }
            summarise(results, misses)
        })
    }

    fn probe<'a>(&'a self, client: &'a reqwest::Client) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let asked = Instant::now();
            let token = self
                .token(client)
                .await
                .map_err(|f| match token_failure(f) {
                    Stop::Signal(_, s) => s.reason().to_string(),
                    Stop::Transport { error, .. } => {
                        format!("cannot get an access token: {error}")
                    }
                })?;
            let got = if token.fetched < asked {
                "the access token in use is still fresh (not fetched again: a new one would retire it within 5 minutes)"
            } else if matches!(self.credential, Credential::Direct { .. }) {
                "its AppSecret got an access token"
            } else {
                "bound: its refresh token got an access token"
            };
            let found = format!("app id {}: {got}", self.app_id);
            match &self.credential {
                Credential::Direct { .. } => Ok(found),
                Credential::ThirdParty(tp) => self.probe_binding(client, tp, &token, found).await,
            }
        })
    }
}

/// Where a channel's access token comes from.
enum Credential {
    /// `/cgi-bin/token` with the account's AppSecret.
    Direct {
        secret: Secret,
        token_url: url::Url,
        key: CredentialKey,
    },
    /// `api_authorizer_token` through an open platform.
    ThirdParty(Box<ThirdParty>),
}

/// An Official Account in third-party mode.
struct ThirdParty {
    /// The id of the platform, looked up in [`Shared::platforms`] for each token (a platform
    /// applied again replaces the one before).
    platform: String,
    refresh: RefreshFile,
    /// The authorizer token's key: the platform and the account (the refresh token changes).
    key: CredentialKey,
}

/// The file that holds an account's refresh token: read again when it changes (a binding writes
/// a new one), written back when WeChat returns another.
struct RefreshFile {
    /// The touchpoint, for messages.
    touchpoint: String,
    reference: SecretRef,
    base: PathBuf,
    policy: SecretPolicy,
    read: Mutex<RefreshState>,
}

#[derive(Default)]
struct RefreshState {
    /// The file as last read: what identifies its version, and its value.
    seen: Option<(Stamp, Secret)>,
    /// A token WeChat rotated that could not be written yet, and why: used, and written on the
    /// next read, until the file changes.
    unwritten: Option<(Secret, String)>,
}

/// A file version: device, inode, length, modification time.
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

impl RefreshFile {
    fn path(&self) -> Option<PathBuf> {
        match &self.reference {
            SecretRef::File { file } => Some(self.base.join(file)),
            SecretRef::Env { .. } => None,
        }
    }

    fn not_bound(&self) -> Failure {
        Failure::Said(Signal::Hold {
            code: "not_bound".into(),
            reason: format!(
                "not bound yet: run `touchctl auth wechat {}`",
                self.touchpoint
            ),
        })
    }

    /// The refresh token, and whether the file changed to another one since it was last read
    /// (the account was bound again).
    fn current(&self) -> Result<(Secret, bool), Failure> {
        let mut state = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let now = match self.path().map(|p| stamp(&p)) {
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.not_bound());
            }
            Some(Ok(s)) => Some(s),
            _ => None,
        };
        if let (Some(now), Some((seen, value))) = (now, &state.seen)
            && now == *seen
        {
            let value = value.clone();
            if let Some((token, _)) = state.unwritten.take() {
                match write_refresh_token(&self.reference, &self.base, &self.policy, token.expose())
                {
                    Ok(path) => state.seen = stamp(&path).ok().map(|s| (s, token.clone())),
                    Err(e) => state.unwritten = Some((token.clone(), e.to_string())),
                }
                return Ok((token, false));
            }
            return Ok((value, false));
        }
        state.unwritten = None;
        let value = self
            .reference
            .resolve(&self.base, &self.policy)
            .map_err(|e| match e {
                SecretError::FileMissing(_) => self.not_bound(),
                e => Failure::Said(Signal::Hold {
                    code: e.code().into(),
                    reason: format!(
                        "cannot read `auth.authorizer_refresh_token` {}: {e}",
                        self.reference
                    ),
                }),
            })?;
        let rebound = state.seen.as_ref().is_some_and(|(_, v)| *v != value);
        state.seen = now.map(|s| (s, value.clone()));
        Ok((value, rebound))
    }

    /// Keeps the refresh token WeChat returned instead of the one sent.
    fn rotated(&self, token: Secret) {
        let mut state = self.read.lock().unwrap_or_else(|p| p.into_inner());
        match write_refresh_token(&self.reference, &self.base, &self.policy, token.expose()) {
            Ok(path) => {
                state.unwritten = None;
                state.seen = stamp(&path).ok().map(|s| (s, token));
            }
            Err(e) => state.unwritten = Some((token, e.to_string())),
        }
    }

    /// Why a rotated refresh token is not in the file yet, if it is not.
    fn unwritten(&self) -> Option<String> {
        let state = self.read.lock().unwrap_or_else(|p| p.into_inner());
        state.unwritten.as_ref().map(|(_, why)| why.clone())
    }
}

/// The permission set that lets a platform list an account's linked mini programs.
const LINK_PERMISSION: u32 = 33;

/// A permission set id as `name (label)`, or the bare id for the sets touchctl does not name.
fn permission_name(id: u32) -> String {
    match Permission::from_id(id) {
        Some(p) => format!("{} ({})", p.name(), p.label()),
        None if id == LINK_PERMISSION => format!("{id} (小程序关联管理)"),
        None => id.to_string(),
    }
}

/// The required permission sets not granted, in words, if any.
fn missing_permissions(required: &[Permission], granted: &[u32]) -> Option<String> {
    let missing: Vec<&Permission> = required
        .iter()
        .filter(|p| !granted.contains(&p.id()))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let names: Vec<String> = missing.iter().map(|p| permission_name(p.id())).collect();
    let mut text = format!("missing: {}", names.join(", "));
    if missing.iter().any(|p| p.exclusive()) {
        text.push_str(
            " — 4 and 24 can be held by one third-party platform only: the account may have granted them to another platform",
        );
    }
    text.push_str("; authorise again with `touchctl auth wechat` and grant them");
    Some(text)
}

/// What the file says is linked but WeChat does not list: the templates' mini programs and
/// `linked_mini_programs`.
fn unlinked(declared: &[String], templates: &[MessageTemplate], linked: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in templates {
        if let Some(mp) = &t.mini_program
            && !linked.contains(&mp.app_id)
        {
            out.push(format!(
                "template `{}` opens mini program {}, which is not linked to the account: link it (公众号后台 → 小程序管理) or change the template",
                t.id, mp.app_id
            ));
        }
    }
    for app_id in declared {
        if !linked.contains(app_id)
            && !templates
                .iter()
                .any(|t| t.mini_program.as_ref().is_some_and(|m| &m.app_id == app_id))
        {
            out.push(format!(
                "`linked_mini_programs` names {app_id}, which WeChat does not list as linked to the account"
            ));
        }
    }
    out
}

/// Why a third-party account's platform is missing.
fn not_live(platform: &str) -> String {
    format!("platform `{platform}` is not live: apply its file")
}

/// What a platform's failure to give an authorizer token means for the touchpoint.
fn platform_failure(touchpoint: &str, e: PlatformError) -> Failure {
    let said = |code: String, reason: String, hold: bool| {
        Failure::Said(if hold {
            Signal::Hold { code, reason }
        } else {
            Signal::Wait {
                wait: NO_TICKET_WAIT,
                code,
                reason,
            }
        })
    };
    match e {
        PlatformError::NoTicket { .. } => said(
            e.code()
                .map_or_else(|| "no_ticket".into(), |c| c.to_string()),
            format!("{e}; sending waits a minute"),
            false,
        ),
        PlatformError::Revoked { .. } => said(
            "61023".into(),
            format!(
                "authorisation revoked or refresh token invalid (61023): re-authorise with `touchctl auth wechat {touchpoint}`"
            ),
            true,
        ),
        PlatformError::Config { code, .. } => said(code.to_string(), e.to_string(), true),
        PlatformError::Refused(_) => said("network_refused".into(), e.to_string(), true),
        PlatformError::Code {
            code: code @ (45009 | 45011),
            errmsg,
        } => Failure::Code {
            status: 200,
            code,
            errmsg,
        },
        e => Failure::Transport {
            status: None,
            error: format!("cannot get an access token through the platform: {e}"),
        },
    }
}

/// How long a touchpoint waits for a platform without a valid ticket (WeChat pushes one every
/// 10 minutes).
const NO_TICKET_WAIT: Duration = Duration::from_secs(60);

fn api_base(spec: &WechatOaSpec) -> String {
    spec.api_base
        .as_deref()
        .unwrap_or(DEFAULT_API_BASE)
        .trim_end_matches('/')
        .to_string()
}

fn bad_base(base: &str, e: url::ParseError) -> Unavailable {
    Unavailable(format!(
        "`api_base` {base:?} does not make a valid URL ({e}): write it as https://host"
    ))
}

/// One recipient's message, ready to send.
#[derive(Debug)]
struct Prepared {
    user_id: String,
    /// The request body.
    body: Vec<u8>,
    /// The template's `id`, for reasons.
    template: String,
    /// The fields whose value was filled from this recipient's params.
    personal: Vec<String>,
}

/// The message for `recipient`: its `openid`, the template and its fields, placeholders filled
/// from the recipient. A recipient without an `openid` fails for good.
fn prepare(
    t: &MessageTemplate,
    params: &Map<String, Value>,
    recipient: &Map<String, Value>,
    batch_id: &str,
) -> Result<Prepared, Miss> {
    let user_id = recipient
        .get("user_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(openid) = recipient
        .get("openid")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return Err(Miss {
            user_id,
            retry: false,
            reason: "no `openid`: the user's attribute mapped to the `openid` dynamic param is missing or empty".into(),
        });
    };
    let mut data = Map::new();
    let mut personal = Vec::new();
    for field in &t.fields {
        let given = params
            .get(field)
            .and_then(template::text)
            .unwrap_or_default();
        if !template::placeholders(&given).is_empty() {
            personal.push(field.clone());
        }
        data.insert(
            field.clone(),
            json!({ "value": template::fill(&given, recipient) }),
        );
    }
    let mut body = Map::new();
    body.insert("touser".into(), json!(openid));
    body.insert("template_id".into(), json!(t.template_id));
    if let Some(url) = &t.url {
        body.insert("url".into(), json!(url));
    }
    if let Some(mp) = &t.mini_program {
        body.insert(
            "miniprogram".into(),
            json!({ "appid": mp.app_id, "pagepath": mp.page }),
        );
    }
    body.insert(
        "client_msg_id".into(),
        json!(client_msg_id(batch_id, &user_id)),
    );
    body.insert("data".into(), Value::Object(data));
    Ok(Prepared {
        user_id,
        // Writing a map to a Vec cannot fail.
        body: serde_json::to_vec(&body).unwrap_or_default(),
        template: t.id.clone(),
        personal,
    })
}

/// The `client_msg_id` of a recipient's message in a batch (see the module doc).
pub fn client_msg_id(batch_id: &str, user_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(batch_id.as_bytes());
    h.update([0]);
    h.update(user_id.as_bytes());
    let digest = h.finalize();
    format!("tc{}", hex::encode(&digest[..15]))
}

/// What became of one recipient.
enum Sent {
    /// Delivered (the HTTP status).
    Delivered(u16),
    /// Not delivered, this recipient alone.
    Miss(u16, Miss),
    /// Not delivered, and the rest of the batch is not sent.
    Stopped(Stop),
    /// Not sent: the batch stopped first.
    Skipped,
}

/// Why a batch stops.
enum Stop {
    /// The platform spoke for the whole touchpoint.
    Signal(Option<u16>, Signal),
    /// No usable answer.
    Transport { status: Option<u16>, error: String },
}

/// A request that did not get WeChat's answer, or got an errcode.
#[derive(Debug)]
pub(in crate::channel) enum Failure {
    /// The platform answered this errcode (from `/cgi-bin/token`).
    Code {
        status: u16,
        code: i64,
        errmsg: String,
    },
    /// No usable answer.
    Transport { status: Option<u16>, error: String },
    /// What it means is known already (third-party mode: not bound, revoked, no ticket).
    Said(Signal),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Code { code, errmsg, .. } => write!(f, "{code} {errmsg}"),
            Failure::Transport { error, .. } => f.write_str(error),
            Failure::Said(signal) => f.write_str(signal.reason()),
        }
    }
}

/// The answer's JSON object, or why there is none usable.
pub(in crate::channel) async fn read_answer(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<(u16, Map<String, Value>), Failure> {
    let response = response.map_err(|e| Failure::Transport {
        status: None,
        error: describe(&e, TIMEOUT),
    })?;
    let status = response.status().as_u16();
    let (body, cut) = read_capped(response, MAX_ANSWER).await;
    parse_answer(status, &body, cut)
}

/// Reads an answer's body (see [`read_answer`]).
pub(in crate::channel) fn parse_answer(
    status: u16,
    body: &[u8],
    cut: bool,
) -> Result<(u16, Map<String, Value>), Failure> {
    if !(200..300).contains(&status) {
        return Err(Failure::Transport {
            status: Some(status),
            error: format!("HTTP {status}{}", excerpt(body)),
        });
    }
    if cut {
        return Err(Failure::Transport {
            status: Some(status),
            error: format!(
                "HTTP {status} with an answer longer than {} KiB: not WeChat's",
                MAX_ANSWER / 1024
            ),
        });
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(answer)) => Ok((status, answer)),
        _ => Err(Failure::Transport {
            status: Some(status),
            error: format!(
                "HTTP {status} with an answer that is not WeChat's JSON{}",
                excerpt(body)
            ),
        }),
    }
}

/// A template send's answer: its status, errcode and errmsg.
fn send_answer((status, answer): (u16, Map<String, Value>)) -> Result<(u16, i64, String), Failure> {
    match errcode(&answer) {
        Some(code) => Ok((status, code, errmsg_of(&answer))),
        None => Err(Failure::Transport {
            status: Some(status),
            error: format!(
                "HTTP {status} with a JSON answer without an `errcode`: not WeChat's answer to a template send"
            ),
        }),
    }
}

/// The answer's errcode, when it has one (a number, or a number written as a string).
pub(in crate::channel) fn errcode(answer: &Map<String, Value>) -> Option<i64> {
    match answer.get("errcode")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The answer's errmsg, cut short and on one line (it is the platform's text).
pub(in crate::channel) fn errmsg_of(answer: &Map<String, Value>) -> String {
    let text = answer
        .get("errmsg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERRMSG)
        .collect();
    let one_line = one_line.trim();
    if one_line.is_empty() {
        "(no errmsg)".into()
    } else {
        one_line.to_string()
    }
}

/// A token answer: the token and its lifetime, or the errcode.
fn token_answer(answer: &Map<String, Value>) -> Result<(Secret, Duration), Failure> {
    if let Some(token) = answer
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        let lifetime = answer
            .get("expires_in")
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)
            .map_or(DEFAULT_LIFETIME, Duration::from_secs)
            .min(MAX_LIFETIME);
        return Ok((Secret::new(token), lifetime));
    }
    match errcode(answer) {
        Some(code) if code != 0 => Err(Failure::Code {
            status: 200,
            code,
            errmsg: errmsg_of(answer),
        }),
        _ => Err(Failure::Transport {
            status: Some(200),
            error: "the token answer has neither an `access_token` nor an `errcode`: not WeChat's"
                .into(),
        }),
    }
}

/// What a failed token fetch, or a request without a usable answer, means for the batch.
fn token_failure(f: Failure) -> Stop {
    let (status, code, errmsg) = match f {
        Failure::Transport { status, error } => return Stop::Transport { status, error },
        Failure::Said(signal) => return Stop::Signal(None, signal),
        Failure::Code {
            status,
            code,
            errmsg,
        } => (status, code, errmsg),
    };
    let fix = match code {
        45011 => return Stop::Signal(Some(status), wait(Wait::NextMinute, code, &errmsg)),
        45009 => return Stop::Signal(Some(status), wait(Wait::QuotaReset, code, &errmsg)),
        // On this endpoint 40001 means the AppSecret is wrong.
        40001 | 40125 | 41004 => SECRET_FIX,
        40013 | 41002 => APP_ID_FIX,
        40164 | 61004 => WHITELIST_FIX,
        40243 => FROZEN_FIX,
        40002 => "touchctl asked for a token the wrong way; please report this bug",
        _ => {
            return Stop::Transport {
                status: Some(status),
                error: format!("cannot get an access token: {code} {errmsg}"),
            };
        }
    };
    Stop::Signal(
        Some(status),
        Signal::Hold {
            code: code.to_string(),
            reason: format!("{code} {errmsg}: {fix}"),
        },
    )
}

const SECRET_FIX: &str = "WeChat refused the AppSecret: put the account's current AppSecret (公众号后台 → 设置与开发 → 基本配置) where `auth.app_secret` points, then apply";
const APP_ID_FIX: &str =
    "WeChat does not know this `app_id`: check it against the account's 基本配置 and apply";
const WHITELIST_FIX: &str = "this machine's IP address is not in the account's API IP whitelist: add it (公众号后台 → 设置与开发 → 基本配置 → IP白名单), then resume the touchpoint";
const FROZEN_FIX: &str = "the AppSecret is frozen: unfreeze or reset it in 公众号后台 → 设置与开发 → 基本配置, update `auth.app_secret`, then apply";

/// When a wait ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// A per-minute limit: the next minute.
    NextMinute,
    /// The daily quota: the next 00:00 China Standard Time.
    QuotaReset,
}

/// What an errcode from a template send means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meaning {
    Delivered,
    /// The token was refused: a new one, and once more.
    Token,
    /// This recipient fails for good.
    User,
    /// This recipient is tried again later.
    Later,
    /// The touchpoint waits.
    Wait(Wait),
    /// The touchpoint is held; what to fix (`{template}` stands for the template's id).
    Broken(&'static str),
}

/// What a template send's errcode means; `personal` are the fields filled from the recipient.
fn send_meaning(code: i64, errmsg: &str, personal: &[String]) -> Meaning {
    match code {
        0 => Meaning::Delivered,
        40001 | 40014 | 42001 => Meaning::Token,
        40003 | 43004 | 43019 | 43101 | 45047 | 50005 => Meaning::User,
        45011 => Meaning::Wait(Wait::NextMinute),
        45009 => Meaning::Wait(Wait::QuotaReset),
        47003 if blames_personal_field(errmsg, personal) => Meaning::User,
        47003 => Meaning::Broken(
            "a field of template `{template}` breaks the platform template's rules (too long, wrong kind of value, or a key the platform template does not have): fix the template's `fields` or the campaign's `template_params`, then apply or resume the touchpoint",
        ),
        40036 | 40037 => Meaning::Broken(
            "WeChat does not know template `{template}`'s `template_id` on this account: copy it from 公众号后台 → 广告与服务 → 模板消息, then apply",
        ),
        48001 => Meaning::Broken(
            "the account may not send template messages (a verified service account with 模板消息 enabled is needed): enable it, then resume the touchpoint",
        ),
        61007 => Meaning::Broken(
            "the account did not grant the needed permission set (群发与通知, id 7): authorise it again, then resume the touchpoint",
        ),
        40013 => Meaning::Broken(APP_ID_FIX),
        40125 => Meaning::Broken(SECRET_FIX),
        40164 | 61004 => Meaning::Broken(WHITELIST_FIX),
        40243 => Meaning::Broken(FROZEN_FIX),
        _ => Meaning::Later,
    }
}

/// Whether a 47003 errmsg (`argument invalid! data.thing23.value invalid`) names a field filled
/// from the recipient; when it names none, whether any field is (the recipient's value is then
/// the likelier cause, and failing it alone keeps the rest of the campaign going).
fn blames_personal_field(errmsg: &str, personal: &[String]) -> bool {
    let named = errmsg
        .split_whitespace()
        .find_map(|w| w.strip_prefix("data.")?.split('.').next());
    match named {
        Some(field) => personal.iter().any(|p| p == field),
        None => !personal.is_empty(),
    }
}

/// The wait a rate-limit errcode asks for, from now.
fn wait(until: Wait, code: i64, errmsg: &str) -> Signal {
    let now = crate::store::now_ms();
    let (wait, when) = match until {
        Wait::NextMinute => (to_next_minute(now), "the next minute"),
        Wait::QuotaReset => (
            to_quota_reset(now),
            "the daily quota resets at 00:00 China Standard Time",
        ),
    };
    Signal::Wait {
        wait,
        code: code.to_string(),
        reason: format!("{code} {errmsg}: sending waits until {when}"),
    }
}

/// The batch's report from each recipient's outcome (`misses`: those not sent at all).
fn summarise(results: Vec<(String, Sent)>, mut misses: Vec<Miss>) -> Report {
    let mut status = None;
    let mut signal: Option<Signal> = None;
    let mut transport: Option<String> = None;
    let mut not_sent = Vec::new();
    for (user_id, sent) in results {
        match sent {
            Sent::Delivered(s) => status = Some(s),
            Sent::Miss(s, miss) => {
                status = Some(s);
                misses.push(miss);
            }
            Sent::Stopped(stop) => {
                let reason = match stop {
                    Stop::Signal(s, sig) => {
                        status = s.or(status);
                        let reason = format!("{}; retried after that", sig.reason());
                        // A hold outweighs a wait.
                        if signal.is_none() || matches!(sig, Signal::Hold { .. }) {
                            signal = Some(sig);
                        }
                        reason
                    }
                    Stop::Transport { status: s, error } => {
                        status = s.or(status);
                        let reason = format!("{error}; retried later");
                        transport.get_or_insert(error);
                        reason
                    }
                };
                misses.push(Miss {
                    user_id,
                    retry: true,
                    reason,
                });
            }
            Sent::Skipped => not_sent.push(user_id),
        }
    }
    let why_stopped = signal
        .as_ref()
        .map(|s| s.reason().to_string())
        .or(transport.clone())
        .unwrap_or_default();
    let left = not_sent.len();
    for user_id in not_sent {
        misses.push(Miss {
            user_id,
            retry: true,
            reason: format!("not sent: the batch stopped ({why_stopped})"),
        });
    }
    let error = error_line(&misses, signal.as_ref(), transport.as_deref(), left);
    Report {
        status,
        misses,
        rest: Rest::Delivered,
        error,
        signal,
    }
}

/// The attempt log's line for a batch with misses: what stopped it, or the first reasons.
fn error_line(
    misses: &[Miss],
    signal: Option<&Signal>,
    transport: Option<&str>,
    not_sent: usize,
) -> Option<String> {
    if misses.is_empty() {
        return None;
    }
    let failed = misses.iter().filter(|m| !m.retry).count();
    let retried = misses.len() - failed;
    let mut counts = Vec::new();
    if failed > 0 {
        counts.push(format!("{failed} failed for good"));
    }
    if retried > 0 {
        counts.push(format!("{retried} to retry"));
    }
    let why = match (signal, transport) {
        (Some(s), _) => format!("stopped, {not_sent} not sent: {}", s.reason()),
        (None, Some(t)) => format!("stopped, {not_sent} not sent: {t}"),
        (None, None) => {
            let first_failed = misses.iter().find(|m| !m.retry);
            let first_retried = misses.iter().find(|m| m.retry);
            [first_failed, first_retried]
                .into_iter()
                .flatten()
                .map(|m| m.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    Some(format!("{} ({why})", counts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use axum::extract::{RawQuery, State};
    use axum::routing::{get, post};

    fn spec(api_base: &str) -> WechatOaSpec {
        toml::from_str(&format!(
            r#"
app_id = "wx8a7c3e1f5b2d4690"
api_base = "{api_base}"
allow_insecure = true
linked_mini_programs = ["wx1d2e3f4a5b6c7d8e"]
auth = {{ mode = "direct", app_secret = {{ env = "UNUSED" }} }}

[dynamic_params]
openid = "user.wechat_openid"
name = "user.name"

[[templates]]
id = "order_shipped"
template_id = "TM-SHIP"
fields = ["first", "keyword1"]
url = "https://m.example.com/orders"

[[templates]]
id = "member_day"
template_id = "TM-DAY"
fields = ["first"]
mini_program = {{ app_id = "wx1d2e3f4a5b6c7d8e", page = "pages/member/day" }}
"#
        ))
        .unwrap()
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn client_msg_ids_are_short_stable_and_differ_by_batch_and_user() {
        let id = client_msg_id("dsp_0190a1b2c3d_0", "u1");
        assert_eq!(id.len(), 32);
        assert!(id.starts_with("tc"), "{id}");
        assert!(id[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(id, client_msg_id("dsp_0190a1b2c3d_0", "u1"));
        assert_ne!(id, client_msg_id("dsp_0190a1b2c3d_1", "u1"));
        assert_ne!(id, client_msg_id("dsp_0190a1b2c3d_0", "u2"));
        // The separator keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(client_msg_id("a", "bc"), client_msg_id("ab", "c"));
        // SHA-256("b\0u") = 7c0b… : the derivation is the documented one.
        let digest = Sha256::digest(b"b\0u");
        assert_eq!(
            client_msg_id("b", "u"),
            format!("tc{}", hex::encode(&digest[..15]))
        );
    }

    #[test]
    fn a_message_has_the_documented_body_with_placeholders_filled() {
        let s = spec("http://127.0.0.1:1");
        let params = map(json!({"first": "您好 {{name}}", "keyword1": 42}));
        let recipient = map(json!({"user_id": "u1", "openid": "o-abc", "name": "小王"}));
        let p = prepare(&s.templates[0], &params, &recipient, "dsp_1_0").unwrap();
        let body: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            body,
            json!({
                "touser": "o-abc",
                "template_id": "TM-SHIP",
                "url": "https://m.example.com/orders",
                "client_msg_id": client_msg_id("dsp_1_0", "u1"),
                "data": {"first": {"value": "您好 小王"}, "keyword1": {"value": "42"}}
            })
        );
        assert_eq!(p.user_id, "u1");
        assert_eq!(p.personal, ["first"]);
        let mp = prepare(
            &s.templates[1],
            &map(json!({"first": "hi"})),
            &recipient,
            "b",
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&mp.body).unwrap();
        assert_eq!(
            body["miniprogram"],
            json!({"appid": "wx1d2e3f4a5b6c7d8e", "pagepath": "pages/member/day"})
        );
        assert!(body.get("url").is_none(), "{body}");
        assert!(mp.personal.is_empty());
        for no_openid in [
            json!({"user_id": "u2"}),
            json!({"user_id": "u2", "openid": ""}),
        ] {
            let miss = prepare(&s.templates[0], &params, &map(no_openid), "b").unwrap_err();
            assert_eq!(miss.user_id, "u2");
            assert!(!miss.retry);
            assert!(miss.reason.starts_with("no `openid`"), "{}", miss.reason);
        }
    }

    #[test]
    fn each_send_errcode_has_its_outcome() {
        let none: &[String] = &[];
        assert_eq!(send_meaning(0, "ok", none), Meaning::Delivered);
        for code in [40001, 40014, 42001] {
            assert_eq!(send_meaning(code, "", none), Meaning::Token, "{code}");
        }
        for code in [40003, 43004, 43019, 43101, 45047, 50005] {
            assert_eq!(send_meaning(code, "", none), Meaning::User, "{code}");
        }
        assert_eq!(
            send_meaning(45011, "", none),
            Meaning::Wait(Wait::NextMinute)
        );
        assert_eq!(
            send_meaning(45009, "", none),
            Meaning::Wait(Wait::QuotaReset)
        );
        for code in [
            40037, 40036, 47003, 40013, 40125, 40164, 61004, 40243, 48001, 61007,
        ] {
            assert!(
                matches!(send_meaning(code, "", none), Meaning::Broken(_)),
                "{code}"
            );
        }
        for code in [-1, 47001, 12345] {
            assert_eq!(send_meaning(code, "", none), Meaning::Later, "{code}");
        }
    }

    #[test]
    fn a_47003_fails_the_recipient_only_when_its_own_value_is_to_blame() {
        let personal = vec!["first".to_string()];
        let named = "argument invalid! data.first.value invalid rid: 1-2-3";
        assert_eq!(send_meaning(47003, named, &personal), Meaning::User);
        let other = "argument invalid! data.keyword1.value invalid rid: 1-2-3";
        assert!(matches!(
            send_meaning(47003, other, &personal),
            Meaning::Broken(_)
        ));
        assert_eq!(
            send_meaning(47003, "argument invalid!", &personal),
            Meaning::User
        );
        assert!(matches!(
            send_meaning(47003, named, &[]),
            Meaning::Broken(_)
        ));
    }

    fn code(code: i64, errmsg: &str) -> Failure {
        Failure::Code {
            status: 200,
            code,
            errmsg: errmsg.into(),
        }
    }

    #[test]
    fn each_token_errcode_has_its_outcome() {
        for (c, fix) in [
            (40001, "AppSecret"),
            (40125, "AppSecret"),
            (41004, "AppSecret"),
            (40013, "`app_id`"),
            (41002, "`app_id`"),
            (40164, "IP whitelist"),
            (61004, "IP whitelist"),
            (40243, "frozen"),
            (40002, "bug"),
        ] {
            match token_failure(code(c, "invalid x rid: 1")) {
                Stop::Signal(Some(200), Signal::Hold { code, reason }) => {
                    assert_eq!(code, c.to_string());
                    assert!(
                        reason.starts_with(&format!("{c} invalid x rid: 1: ")),
                        "{reason}"
                    );
                    assert!(reason.contains(fix), "{c}: {reason}");
                }
                _ => panic!("{c} does not hold"),
            }
        }
        for (c, within) in [(45011, 61_000), (45009, 86_401_000)] {
            match token_failure(code(c, "limit")) {
                Stop::Signal(_, Signal::Wait { wait, code, .. }) => {
                    assert_eq!(code, c.to_string());
                    assert!(wait <= Duration::from_millis(within), "{c}: {wait:?}");
                    assert!(wait >= Duration::from_secs(1), "{c}: {wait:?}");
                }
                _ => panic!("{c} does not wait"),
            }
        }
        for c in [-1, 99999] {
            match token_failure(code(c, "system error")) {
                Stop::Transport { error, .. } => {
                    assert_eq!(
                        error,
                        format!("cannot get an access token: {c} system error")
                    );
                }
                _ => panic!("{c} is not retried"),
            }
        }
    }

    #[test]
    fn waits_end_at_the_next_minute_and_at_midnight_china_time() {
        // 2026-12-03T10:15:42.500Z
        let now = 1_796_292_942_500;
        assert_eq!(to_next_minute(now), Duration::from_millis(17_500 + 1_000));
        assert_eq!(to_next_minute(now - 42_500), Duration::from_secs(61));
        // 10:15:42.5 UTC is 18:15:42.5 in UTC+8: midnight there is 5 h 44 min 17.5 s away.
        assert_eq!(
            to_quota_reset(now),
            Duration::from_millis(((5 * 60 + 44) * 60 + 17) * 1000 + 500 + 1_000)
        );
        // 16:00 UTC is midnight in UTC+8: a whole day to the next.
        assert_eq!(
            to_quota_reset(1_796_313_600_000),
            Duration::from_secs(86_401)
        );
        assert!(to_quota_reset(i64::MAX) <= Duration::from_secs(86_401));
    }

    #[test]
    fn answers_that_are_not_wechats_are_transport_failures() {
        for (status, body, cut, says) in [
            (502, &b"bad gateway"[..], false, "HTTP 502: bad gateway"),
            (200, b"<html>", false, "not WeChat's JSON"),
            (200, b"[1]", false, "not WeChat's JSON"),
            (200, b"{\"errcode\":0}", true, "longer than 64 KiB"),
        ] {
            match parse_answer(status, body, cut) {
                Err(Failure::Transport { status: s, error }) => {
                    assert_eq!(s, Some(status));
                    assert!(error.contains(says), "{error}");
                }
                other => panic!("{other:?}"),
            }
        }
        let (_, ok) = parse_answer(
            200,
            br#"{"errcode":"43004","errmsg":"require subscribe"}"#,
            false,
        )
        .unwrap();
        assert_eq!(errcode(&ok), Some(43004));
        assert!(matches!(
            send_answer((200, map(json!({"msgid": 1})))),
            Err(Failure::Transport { .. })
        ));
        assert_eq!(
            errmsg_of(&map(json!({"errmsg": "two\nlines\u{1b}[31m"}))),
            "two lines [31m"
        );
        assert_eq!(errmsg_of(&Map::new()), "(no errmsg)");
    }

    #[test]
    fn token_answers_give_a_bounded_lifetime() {
        let (t, life) =
            token_answer(&map(json!({"access_token": "T", "expires_in": 7200}))).unwrap();
        assert_eq!((t.expose(), life), ("T", Duration::from_secs(7200)));
        let (_, life) = token_answer(&map(json!({"access_token": "T"}))).unwrap();
        assert_eq!(life, DEFAULT_LIFETIME);
        let (_, life) =
            token_answer(&map(json!({"access_token": "T", "expires_in": u64::MAX}))).unwrap();
        assert_eq!(life, MAX_LIFETIME);
        assert!(matches!(
            token_answer(&map(
                json!({"errcode": 40125, "errmsg": "invalid appsecret"})
            )),
            Err(Failure::Code { code: 40125, .. })
        ));
        assert!(matches!(
            token_answer(&map(json!({"access_token": ""}))),
            Err(Failure::Transport { .. })
        ));
    }

    /// An OA in third-party mode through platform `open` of `f`, its refresh token in
    /// `secrets/oa-refresh` (written unless `bound` is false), its API at `api_base`.
    fn third_party(
        f: &super::super::open_platform::stub::Fixture,
        api_base: &str,
        bound: bool,
    ) -> Result<WechatChannel, Unavailable> {
        let mut s = spec(api_base);
        s.auth = toml::from_str(
            r#"mode = "third_party"
platform = "open"
authorizer_refresh_token = { file = "secrets/oa-refresh" }"#,
        )
        .unwrap();
        if bound {
            std::fs::write(
                f.dir.path().join("secrets/oa-refresh"),
                "refreshtoken@@@r1\n",
            )
            .unwrap();
        }
        WechatChannel::open("wechat-oa", &s, f.dir.path(), &f.policy, &f.shared)
    }

    fn batch<'a>(
        client: &'a reqwest::Client,
        message: &'a Message,
        recipients: &'a [u8],
    ) -> Outgoing<'a> {
        Outgoing {
            client,
            batch_id: "dsp_1_0",
            touchpoint: "wechat-oa",
            campaign: "c",
            dispatch_id: "dsp_1",
            index: 0,
            count: 1,
            template_params: r#"{"first": "Hi {{name}}", "keyword1": "x"}"#,
            message,
            recipients,
            recipient_count: 1,
        }
    }

    fn shipped() -> Message {
        Message {
            template: Some("order_shipped".into()),
            ..Message::default()
        }
    }

    #[tokio::test]
    async fn third_party_mode_sends_with_the_authorizer_token_from_the_refresh_token() {
        use super::super::open_platform::stub::{Stub, fixture};
        let stub = Stub::default();
        let base = stub.serve().await;
        let f = fixture(&base);
        let channel = third_party(&f, &base, true).unwrap();
        let (client, message) = (client(), shipped());
        let report = channel.send(batch(&client, &message, &users(3))).await;
        assert_eq!(report, Report::delivered(Some(200)));
        let report = channel.send(batch(&client, &message, &users(2))).await;
        assert_eq!(report, Report::delivered(Some(200)));
        stub.with(|a| {
            assert_eq!(a.sends.len(), 5);
            assert!(a.sends.iter().all(|(t, _)| t == "atok0"), "{:?}", a.sends);
            // One authorizer token for both batches, from the file's refresh token.
            assert_eq!(a.refreshed_with, ["refreshtoken@@@r1"]);
        });
        // The authorizer token is refused: a new one, and the message sent once more.
        stub.with(|a| a.authorizer_tokens += 1);
        let report = channel.send(batch(&client, &message, &users(1))).await;
        assert_eq!(report, Report::delivered(Some(200)));
        stub.with(|a| {
            assert_eq!(a.refreshed_with.len(), 2);
            assert_eq!(a.sends.last().unwrap().0, "atok2");
        });
        // Bound again: the file changes, and its new refresh token is used at once.
        // (A length of its own, so the change shows whatever the clock's resolution.)
        std::fs::write(
            f.dir.path().join("secrets/oa-refresh"),
            "refreshtoken@@@new\n",
        )
        .unwrap();
        let report = channel.send(batch(&client, &message, &users(1))).await;
        assert_eq!(report, Report::delivered(Some(200)));
        stub.with(|a| assert_eq!(a.refreshed_with.last().unwrap(), "refreshtoken@@@new"));
    }

    #[tokio::test]
    async fn a_rotated_refresh_token_is_written_back_owner_only() {
        use super::super::open_platform::stub::{Stub, fixture};
        use std::os::unix::fs::PermissionsExt;
        let stub = Stub::default();
        stub.with(|a| a.rotate_to = Some("refreshtoken@@@r2".into()));
        let base = stub.serve().await;
        let f = fixture(&base);
        let channel = third_party(&f, &base, true).unwrap();
        let (client, message) = (client(), shipped());
        assert_eq!(
            channel.send(batch(&client, &message, &users(1))).await,
            Report::delivered(Some(200))
        );
        let path = f.dir.path().join("secrets/oa-refresh");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "refreshtoken@@@r2\n"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The next token comes from the rotated refresh token, read as written (not a rebinding).
        stub.with(|a| {
            a.authorizer_tokens += 1;
            a.rotate_to = None;
        });
        channel.send(batch(&client, &message, &users(1))).await;
        stub.with(|a| assert_eq!(a.refreshed_with, ["refreshtoken@@@r1", "refreshtoken@@@r2"]));
    }

    #[tokio::test]
    async fn a_revoked_authorisation_holds_the_touchpoint_with_what_to_run() {
        use super::super::open_platform::stub::{Stub, fixture};
        let stub = Stub::default();
        stub.with(|a| a.revoked = true);
        let base = stub.serve().await;
        let f = fixture(&base);
        let channel = third_party(&f, &base, true).unwrap();
        let (client, message) = (client(), shipped());
        let report = channel.send(batch(&client, &message, &users(2))).await;
        assert_eq!(
            report,
            Report::hold(
                None,
                "61023",
                "authorisation revoked or refresh token invalid (61023): re-authorise with `touchctl auth wechat wechat-oa`"
            )
        );
        assert!(stub.with(|a| a.sends.is_empty()));
        let probed = channel.probe(&client).await.unwrap_err();
        assert!(probed.contains("(61023)"), "{probed}");
        assert!(!probed.contains("refreshtoken@@@"), "{probed}");
    }

    #[tokio::test]
    async fn without_a_ticket_the_touchpoint_waits_a_minute_and_without_a_binding_it_is_held() {
        use super::super::open_platform::stub::{Stub, fixture};
        let stub = Stub::default();
        let base = stub.serve().await;
        let f = fixture(&base);
        // Not bound: no channel, and the reason says what to run.
        let e = third_party(&f, &base, false).err().unwrap();
        assert_eq!(e.0, "not bound yet: run `touchctl auth wechat wechat-oa`");
        let channel = third_party(&f, &base, true).unwrap();
        f.tickets.0.lock().unwrap().clear();
        let (client, message) = (client(), shipped());
        let report = channel.send(batch(&client, &message, &users(1))).await;
        match &report.signal {
            Some(Signal::Wait { wait, code, reason }) => {
                assert_eq!(*wait, Duration::from_secs(60));
                assert_eq!(code, "no_ticket");
                assert!(reason.contains("/wechat/platforms/open/events"), "{reason}");
                assert!(reason.ends_with("sending waits a minute"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The file is removed after the channel opened: held until bound.
        std::fs::remove_file(f.dir.path().join("secrets/oa-refresh")).unwrap();
        let report = channel.send(batch(&client, &message, &users(1))).await;
        assert_eq!(
            report,
            Report::hold(
                None,
                "not_bound",
                "not bound yet: run `touchctl auth wechat wechat-oa`"
            )
        );
    }

    #[tokio::test]
    async fn an_account_whose_platform_is_not_live_is_unavailable() {
        use super::super::open_platform::stub::fixture;
        let f = fixture("http://127.0.0.1:9");
        f.shared.platforms.retain(Vec::<String>::new());
        let e = third_party(&f, "http://127.0.0.1:9", true).err().unwrap();
        assert_eq!(e.0, "platform `open` is not live: apply its file");
    }

    #[tokio::test]
    async fn probe_names_missing_permissions_and_unlinked_mini_programs() {
        use super::super::open_platform::stub::{Stub, fixture};
        let stub = Stub::default();
        let base = stub.serve().await;
        let f = fixture(&base);
        let channel = third_party(&f, &base, true).unwrap();
        let client = client();
        // All granted, 33 not: the mini programs cannot be listed, and are not checked.
        let ok = channel.probe(&client).await.unwrap();
        assert!(
            ok.contains("bound: its refresh token got an access token"),
            "{ok}"
        );
        assert!(
            ok.contains("granted: message (消息管理), user (用户管理)"),
            "{ok}"
        );
        stub.with(|a| {
            a.granted = vec![1, 2, 3, 7, 11, 15, 33];
            a.linked = vec![
                ("wx0000000000000001".into(), 1),
                ("wx1d2e3f4a5b6c7d8e".into(), 2),
            ];
        });
        let problems = channel.probe(&client).await.unwrap_err();
        assert!(
            problems.starts_with("missing: web (网页服务), open_account (开放平台帐号管理) — 4 and 24 can be held by one third-party platform only: the account may have granted them to another platform"),
            "{problems}"
        );
        assert!(
            problems.contains("template `member_day` opens mini program wx1d2e3f4a5b6c7d8e, which is not linked to the account"),
            "{problems}"
        );
        // Linked now, and only a non-exclusive set missing.
        stub.with(|a| {
            a.granted = vec![1, 2, 3, 4, 7, 11, 24, 33];
            a.linked = vec![("wx1d2e3f4a5b6c7d8e".into(), 1)];
        });
        let problems = channel.probe(&client).await.unwrap_err();
        assert_eq!(
            problems,
            "missing: menu (自定义菜单); authorise again with `touchctl auth wechat` and grant them"
        );
    }

    /// A stand-in for api.weixin.qq.com: answers each openid as `answers` says (0 by default,
    /// a list is used up in order), counts token fetches and sends.
    #[derive(Clone, Default)]
    struct Stub {
        answers: Arc<Mutex<HashMap<String, Vec<i64>>>>,
        token_code: Arc<Mutex<Option<i64>>>,
        tokens: Arc<AtomicUsize>,
        sends: Arc<Mutex<Vec<Value>>>,
        /// Sends to answer with a body that is not JSON.
        garbled: Arc<AtomicBool>,
    }

    async fn stub_token(State(s): State<Stub>, RawQuery(q): RawQuery) -> axum::Json<Value> {
        let q = q.unwrap_or_default();
        assert!(q.contains("grant_type=client_credential"), "{q}");
        assert!(q.contains("appid=wx8a7c3e1f5b2d4690"), "{q}");
        assert!(q.contains("secret=s3cret"), "{q}");
        if let Some(code) = *s.token_code.lock().unwrap() {
            return axum::Json(
                json!({"errcode": code, "errmsg": format!("refused {code} rid: 1-2-3")}),
            );
        }
        let n = s.tokens.fetch_add(1, Ordering::SeqCst);
        axum::Json(json!({"access_token": format!("tok{n}"), "expires_in": 7200}))
    }

    async fn stub_send(
        State(s): State<Stub>,
        RawQuery(q): RawQuery,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let body: Value = serde_json::from_slice(&body).unwrap();
        let token = q.unwrap_or_default();
        let mut sends = s.sends.lock().unwrap();
        sends.push(json!({"token": token, "body": body}));
        drop(sends);
        if s.garbled.load(Ordering::SeqCst) {
            return "<html>busy</html>".into_response();
        }
        let openid = body["touser"].as_str().unwrap().to_string();
        let current = format!(
            "access_token=tok{}",
            s.tokens.load(Ordering::SeqCst).saturating_sub(1)
        );
        let code = match s.answers.lock().unwrap().get_mut(&openid) {
            Some(list) if !list.is_empty() => list.remove(0),
            _ if token != current => 42001,
            _ => 0,
        };
        axum::Json(json!({"errcode": code, "errmsg": if code == 0 { "ok".to_string() } else { format!("code {code} rid: 1-2-3") }, "msgid": 1})).into_response()
    }

    async fn serve(stub: Stub) -> String {
        let app = axum::Router::new()
            .route("/cgi-bin/token", get(stub_token))
            .route("/cgi-bin/message/template/send", post(stub_send))
            .with_state(stub);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    struct Run {
        channel: WechatChannel,
        client: reqwest::Client,
        shared: Arc<Shared>,
    }

    async fn channel(stub: &Stub) -> Run {
        let base = serve(stub.clone()).await;
        let shared = Arc::new(Shared::default());
        Run {
            channel: WechatChannel::new(&spec(&base), Secret::new("s3cret"), &shared).unwrap(),
            client: client(),
            shared,
        }
    }

    fn users(n: usize) -> Vec<u8> {
        let objects: Vec<Map<String, Value>> = (0..n)
            .map(|i| map(json!({"user_id": format!("u{i}"), "openid": format!("o{i}"), "name": format!("n{i}")})))
            .collect();
        super::super::recipients(&objects)
    }

    impl Run {
        async fn send(&self, recipients: &[u8], count: u32) -> Report {
            let message = Message {
                template: Some("order_shipped".into()),
                ..Message::default()
            };
            self.channel
                .send(Outgoing {
                    client: &self.client,
                    batch_id: "dsp_1_0",
                    touchpoint: "wechat-oa",
                    campaign: "c",
                    dispatch_id: "dsp_1",
                    index: 0,
                    count: 1,
                    template_params: r#"{"first": "Hi {{name}}", "keyword1": "x"}"#,
                    message: &message,
                    recipients,
                    recipient_count: count,
                })
                .await
        }
    }

    #[tokio::test]
    async fn a_batch_is_sent_one_message_each_with_one_token_for_all() {
        let stub = Stub::default();
        let run = channel(&stub).await;
        let report = run.send(&users(10), 10).await;
        assert_eq!(report, Report::delivered(Some(200)));
        assert_eq!(stub.tokens.load(Ordering::SeqCst), 1);
        let sends = stub.sends.lock().unwrap().clone();
        assert_eq!(sends.len(), 10);
        let mut openids: Vec<&str> = sends
            .iter()
            .map(|s| s["body"]["touser"].as_str().unwrap())
            .collect();
        openids.sort();
        assert_eq!(
            openids,
            ["o0", "o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9"]
        );
        let o3 = sends.iter().find(|s| s["body"]["touser"] == "o3").unwrap();
        assert_eq!(o3["token"], "access_token=tok0");
        assert_eq!(o3["body"]["data"]["first"]["value"], "Hi n3");
        assert_eq!(o3["body"]["client_msg_id"], client_msg_id("dsp_1_0", "u3"));
        // A probe finds the token in use, and fetches none.
        let probed = run.channel.probe(&run.client).await.unwrap();
        assert!(
            probed.contains("the access token in use is still fresh"),
            "{probed}"
        );
        assert_eq!(run.shared.tokens.fetches(), 1);
    }

    #[tokio::test]
    async fn a_refused_token_is_fetched_again_once_and_the_message_sent_once_more() {
        let stub = Stub::default();
        let run = channel(&stub).await;
        assert_eq!(run.send(&users(1), 1).await, Report::delivered(Some(200)));
        // The stub now takes only a newer token than tok0: every recipient is refused once.
        stub.tokens.fetch_add(1, Ordering::SeqCst);
        assert_eq!(run.send(&users(6), 6).await, Report::delivered(Some(200)));
        // One new token for the six refusals.
        assert_eq!(run.shared.tokens.fetches(), 2);
        // The first IN_FLIGHT went with the old token and again with the new one; the others
        // started once one of those was done, with the new token.
        let sends = stub.sends.lock().unwrap().len();
        assert_eq!(sends, 1 + 2 * IN_FLIGHT + (6 - IN_FLIGHT));
        // A new token refused as well: that recipient is retried later, not sent a third time.
        stub.answers
            .lock()
            .unwrap()
            .insert("o0".into(), vec![42001, 42001]);
        let report = run.send(&users(1), 1).await;
        assert_eq!(report.misses.len(), 1);
        assert!(report.misses[0].retry);
        assert!(
            report.misses[0].reason.starts_with("42001 code 42001"),
            "{:?}",
            report.misses
        );
        assert_eq!(stub.sends.lock().unwrap().len(), sends + 2);
    }

    #[tokio::test]
    async fn only_the_users_the_platform_refuses_fail_and_busy_ones_are_retried() {
        let stub = Stub::default();
        {
            let mut a = stub.answers.lock().unwrap();
            a.insert("o1".into(), vec![43004]);
            a.insert("o2".into(), vec![40003]);
            a.insert("o3".into(), vec![-1]);
        }
        let run = channel(&stub).await;
        let mut report = run.send(&users(5), 5).await;
        report.misses.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        assert_eq!(report.rest, Rest::Delivered);
        assert_eq!(report.signal, None);
        let got: Vec<(&str, bool, &str)> = report
            .misses
            .iter()
            .map(|m| (m.user_id.as_str(), m.retry, m.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("u1", false, "43004 code 43004 rid: 1-2-3"),
                ("u2", false, "40003 code 40003 rid: 1-2-3"),
                ("u3", true, "-1 code -1 rid: 1-2-3; retried later"),
            ]
        );
        assert_eq!(
            report.error.as_deref(),
            Some(
                "2 failed for good, 1 to retry (43004 code 43004 rid: 1-2-3; -1 code -1 rid: 1-2-3; retried later)"
            )
        );
    }

    #[tokio::test]
    async fn a_rate_limit_stops_the_batch_and_makes_the_touchpoint_wait() {
        let stub = Stub::default();
        {
            let mut a = stub.answers.lock().unwrap();
            for i in 0..40 {
                a.insert(format!("o{i}"), vec![45011]);
            }
        }
        let run = channel(&stub).await;
        let report = run.send(&users(40), 40).await;
        // At most the requests already in flight were sent.
        let sent = stub.sends.lock().unwrap().len();
        assert!((1..=IN_FLIGHT).contains(&sent), "{sent}");
        assert_eq!(report.misses.len(), 40);
        assert!(report.misses.iter().all(|m| m.retry));
        match &report.signal {
            Some(Signal::Wait { wait, code, reason }) => {
                assert_eq!(code, "45011");
                assert!(*wait <= Duration::from_secs(61), "{wait:?}");
                assert!(
                    reason.ends_with("sending waits until the next minute"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let not_sent = report
            .misses
            .iter()
            .filter(|m| m.reason.starts_with("not sent: the batch stopped (45011"))
            .count();
        assert_eq!(not_sent, 40 - sent);
    }

    #[tokio::test]
    async fn a_bad_template_id_holds_the_touchpoint() {
        let stub = Stub::default();
        stub.answers
            .lock()
            .unwrap()
            .insert("o0".into(), vec![40037]);
        let run = channel(&stub).await;
        let report = run.send(&users(1), 1).await;
        match &report.signal {
            Some(Signal::Hold { code, reason }) => {
                assert_eq!(code, "40037");
                assert!(
                    reason.contains("template `order_shipped`'s `template_id`"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(report.misses[0].retry);
    }

    #[tokio::test]
    async fn a_refused_secret_holds_the_touchpoint_before_any_message() {
        let stub = Stub::default();
        *stub.token_code.lock().unwrap() = Some(40125);
        let run = channel(&stub).await;
        let report = run.send(&users(3), 3).await;
        assert_eq!(
            report,
            Report::hold(
                Some(200),
                "40125",
                format!("40125 refused 40125 rid: 1-2-3: {SECRET_FIX}")
            )
        );
        assert!(stub.sends.lock().unwrap().is_empty());
        let probed = run.channel.probe(&run.client).await.unwrap_err();
        assert!(probed.starts_with("40125 refused 40125"), "{probed}");
        assert!(!probed.contains("s3cret"), "{probed}");
    }

    #[tokio::test]
    async fn an_answer_that_is_not_wechats_retries_and_stops_the_batch() {
        let stub = Stub::default();
        stub.garbled.store(true, Ordering::SeqCst);
        let run = channel(&stub).await;
        let report = run.send(&users(20), 20).await;
        assert!(stub.sends.lock().unwrap().len() <= IN_FLIGHT);
        assert_eq!(report.signal, None);
        assert_eq!(report.misses.len(), 20);
        assert!(report.misses.iter().all(|m| m.retry));
        let error = report.error.unwrap();
        assert!(
            error.contains("not WeChat's JSON: <html>busy</html>"),
            "{error}"
        );
        assert!(!error.contains("tok0"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_platform_retries_without_printing_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let shared = Arc::new(Shared::default());
        let run = Run {
            channel: WechatChannel::new(&spec(&base), Secret::new("s3cret"), &shared).unwrap(),
            client: client(),
            shared,
        };
        let report = run.send(&users(2), 2).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        let error = report.error.unwrap();
        assert!(
            error.starts_with("cannot get an access token: cannot connect"),
            "{error}"
        );
        assert!(
            !error.contains("s3cret") && !error.contains("/cgi-bin"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_trigger_must_fit_the_templates_at_send_time() {
        let stub = Stub::default();
        let run = channel(&stub).await;
        let message = Message {
            template: Some("gone".into()),
            ..Message::default()
        };
        let report = run
            .channel
            .send(Outgoing {
                client: &run.client,
                batch_id: "b",
                touchpoint: "wechat-oa",
                campaign: "c",
                dispatch_id: "d",
                index: 0,
                count: 1,
                template_params: "{}",
                message: &message,
                recipients: &users(1),
                recipient_count: 1,
            })
            .await;
        assert_eq!(report.rest, Rest::Dead);
        assert!(report.error.unwrap().contains("`gone` is not a template"));
        assert!(stub.sends.lock().unwrap().is_empty());
    }
}
