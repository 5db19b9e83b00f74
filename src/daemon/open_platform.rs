//! The daemon's open platform URLs (DESIGN.md §5) and the bindings API.
//!
//! Served without the API token, checked as WeChat signs them instead:
//! - `POST /wechat/platforms/{platform_id}/events`: the platform's 授权事件接收 URL. The body (at
//!   most 64 KiB) is opened with the platform's message crypto (`msg_signature` over `timestamp`,
//!   `nonce` and the ciphertext; AES payload) and read as an event. A bad signature is 401 (logged
//!   without the body), an unknown platform 404, anything else malformed 400; an accepted push is
//!   answered `success`. Every event is idempotent, so WeChat's retries do no harm:
//!   `component_verify_ticket` is kept in the registry (the latest wins; never logged);
//!   `authorized` completes the pending binding started with its pre-auth code, if any;
//!   `updateauthorized` reads the account's permissions again; `unauthorized` holds every live
//!   account touchpoint of that app id on that platform until it is bound again.
//! - `GET /wechat/platforms/{platform_id}/authorized?auth_code&expires_in&state`: where WeChat
//!   sends the administrator's browser after an authorisation; `state` is the binding id. It
//!   completes the binding and shows a small HTML page of the outcome.
//!
//! Behind the API token: `POST /v1/bindings {"touchpoint": ID}` starts a binding of a live
//! Official Account in third-party mode whose platform is live (the redirect URI is under
//! `--public-url`), and `GET /v1/bindings/{id}` says how it stands (see [`super::bindings`]).
//!
//! A binding completes by one road only (the first to claim it): the authorisation code is
//! exchanged (`api_query_auth`); a code for another account than the touchpoint's `app_id`
//! fails the binding and writes nothing; otherwise the refresh token is written to the file the
//! touchpoint names (0600, atomically), the granted permissions are kept with the touchpoint, and
//! its channel is opened again, which releases a hold (an `unauthorized` event, a revoked refresh
//! token).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::App;
use super::api::ApiError;
use super::bindings::{self, BindingError, Claim, Outcome, Target, View};
use crate::channel::Signal;
use crate::channel::open_platform::client::write_refresh_token;
use crate::channel::open_platform::crypt::{CryptError, MAX_BODY};
use crate::channel::open_platform::event::{self, Event};
use crate::channel::open_platform::{Platform, PlatformError};
use crate::model::Permission;
use crate::store::now_ms;

/// The code an `unauthorized` event holds a touchpoint with.
pub const REVOKED_CODE: &str = "unauthorized";

/// The largest `POST /v1/bindings` body.
const MAX_BINDING_BODY: usize = 4096;

/// The routes WeChat and the administrator's browser call: not behind the API token.
pub fn public_routes(app: Arc<App>) -> Router {
    Router::new()
        .route("/wechat/platforms/{platform_id}/events", post(events))
        .route(
            "/wechat/platforms/{platform_id}/authorized",
            get(authorized),
        )
        .with_state(app)
}

/// The bindings API, to be put behind the API token.
pub fn binding_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/bindings", post(start))
        .route("/v1/bindings/{id}", get(binding))
}

/// A plain-text answer to WeChat.
fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

#[derive(Deserialize)]
struct PushQuery {
    timestamp: Option<String>,
    nonce: Option<String>,
    msg_signature: Option<String>,
    encrypt_type: Option<String>,
}

/// `POST /wechat/platforms/{platform_id}/events`.
async fn events(
    State(app): State<Arc<App>>,
    Path(platform_id): Path<String>,
    Query(q): Query<PushQuery>,
    body: Body,
) -> Response {
    let Some(platform) = app.live.shared().platforms.get(&platform_id) else {
        return text(StatusCode::NOT_FOUND, unknown_platform(&app, &platform_id));
    };
    let (Some(timestamp), Some(nonce), Some(signature)) = (q.timestamp, q.nonce, q.msg_signature)
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "the query must carry timestamp, nonce and msg_signature, as WeChat sends them",
        );
    };
    if q.encrypt_type.as_deref().is_some_and(|t| t != "aes") {
        return text(
            StatusCode::BAD_REQUEST,
            "only encrypted pushes (encrypt_type=aes) are accepted: the platform's 消息加解密方式 must be 安全模式",
        );
    }
    let read = axum::body::to_bytes(body, MAX_BODY);
    let bytes = match tokio::time::timeout(app.limits.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return text(
                StatusCode::BAD_REQUEST,
                "the body is over 64 KiB or was broken off: it is not a push WeChat sends",
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time",
            );
        }
    };
    let opened = platform
        .crypt()
        .open(&bytes, &signature, &timestamp, &nonce)
        .and_then(|xml| event::parse(&xml, platform.component_app_id()));
    let event = match opened {
        Ok(e) => e,
        Err(e) => {
            app.metrics.platform_event(&platform_id, "refused");
            return refused(&platform_id, e);
        }
    };
    app.metrics.platform_event(&platform_id, counted(&event));
    match on_event(&app, &platform, event).await {
        Ok(()) => text(StatusCode::OK, "success"),
        Err(e) => {
            super::log(&format!("error: platform `{platform_id}`: {e}"));
            // Not `success`: WeChat pushes it again.
            text(StatusCode::INTERNAL_SERVER_ERROR, e)
        }
    }
}

/// The label an event is counted under: its `InfoType`, or `other`.
fn counted(event: &Event) -> &'static str {
    match event {
        Event::VerifyTicket { .. } => "component_verify_ticket",
        Event::Authorized { .. } => "authorized",
        Event::UpdateAuthorized { .. } => "updateauthorized",
        Event::Unauthorized { .. } => "unauthorized",
        Event::Other { .. } => "other",
    }
}

/// The answer to a push that did not open: 401 for a bad signature, 400 for the rest.
fn refused(platform_id: &str, e: CryptError) -> Response {
    super::log(&format!(
        "warning: refused a push to platform `{platform_id}`: {e}"
    ));
    let status = match e {
        CryptError::BadSignature => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    text(status, e.to_string())
}

/// What the daemon does with one event; an error makes WeChat push it again.
async fn on_event(app: &Arc<App>, platform: &Arc<Platform>, event: Event) -> Result<(), String> {
    let id = platform.id().to_string();
    match event {
        Event::VerifyTicket { ticket, .. } => {
            let p = platform.clone();
            tokio::task::spawn_blocking(move || p.store_ticket(&ticket))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot keep the verify ticket: {e}"))?;
            app.tickets_received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), crate::registry::now());
            super::log(&format!("platform `{id}`: verify ticket received"));
        }
        Event::Authorized {
            authorizer_app_id,
            auth_code,
            pre_auth_code,
            ..
        } => {
            let claim = match &pre_auth_code {
                Some(code) => app
                    .bindings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .claim_by_code(&id, code, now_ms()),
                None => Claim::Unknown,
            };
            match claim {
                Claim::Go(target) => {
                    super::log(&format!(
                        "platform `{id}`: {authorizer_app_id} authorised it (authorized event); completing binding {}",
                        target.id
                    ));
                    let app = app.clone();
                    tokio::spawn(async move {
                        complete(&app, target, &auth_code).await;
                    });
                }
                Claim::Unknown => super::log(&format!(
                    "platform `{id}`: {authorizer_app_id} authorised it (authorized event), for no binding this daemon started; nothing to do"
                )),
                Claim::Expired(view) => super::log(&format!(
                    "platform `{id}`: {authorizer_app_id} authorised it after binding {} expired; nothing written",
                    view.binding_id
                )),
                Claim::InProgress(_) | Claim::Done(_) => {}
            }
        }
        Event::UpdateAuthorized {
            authorizer_app_id, ..
        } => {
            super::log(&format!(
                "platform `{id}`: {authorizer_app_id} changed what it granted (updateauthorized event); reading its permissions again"
            ));
            let (app, platform) = (app.clone(), platform.clone());
            tokio::spawn(async move { reread(&app, &platform, &authorizer_app_id).await });
        }
        Event::Unauthorized {
            authorizer_app_id, ..
        } => {
            let held = hold_revoked(app, &id, &authorizer_app_id);
            super::update_live(app, |_| Ok(())).await;
            super::log(&format!(
                "platform `{id}`: {authorizer_app_id} revoked its authorisation (unauthorized event); held: {}",
                if held.is_empty() {
                    "no live touchpoint".to_string()
                } else {
                    held.join(", ")
                }
            ));
        }
        Event::Other { info_type } => super::log(&format!(
            "platform `{id}`: ignored a push of InfoType `{info_type}`"
        )),
    }
    Ok(())
}

/// Holds every live account touchpoint of `app_id` on `platform`; their ids.
fn hold_revoked(app: &App, platform: &str, app_id: &str) -> Vec<String> {
    let accounts = app.live.third_party(platform, Some(app_id));
    for (id, generation) in &accounts {
        crate::dispatch::worker::Directory::signal(
            app.live.as_ref(),
            id,
            *generation,
            &Signal::Hold {
                code: REVOKED_CODE.into(),
                reason: revoked_reason(id),
            },
        );
    }
    accounts.into_iter().map(|(id, _)| id).collect()
}

/// Why a touchpoint whose account revoked the platform is held.
pub fn revoked_reason(id: &str) -> String {
    format!(
        "unauthorized event: authorisation revoked by the account; re-authorise with `touchctl auth wechat {id}`"
    )
}

/// Reads the permissions of `app_id` again and keeps them with its touchpoints.
async fn reread(app: &Arc<App>, platform: &Platform, app_id: &str) {
    let id = platform.id();
    match platform.authorizer_info(app_id).await {
        Ok(info) => {
            let accounts = app.live.third_party(id, Some(app_id));
            for (tp, _) in &accounts {
                app.live.set_granted(tp, app_id, info.granted.clone());
            }
            super::log(&format!(
                "platform `{id}`: {app_id} grants {}",
                labels(info.granted.iter().filter_map(|&p| Permission::from_id(p)))
            ));
        }
        Err(e) => super::log(&format!(
            "error: platform `{id}`: cannot read the permissions of {app_id}: {e}"
        )),
    }
}

fn labels(permissions: impl IntoIterator<Item = Permission>) -> String {
    let all: Vec<String> = permissions
        .into_iter()
        .map(|p| format!("{} ({})", p.name(), p.label()))
        .collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

/// Exchanges the code of a claimed binding and finishes it; its view.
async fn complete(app: &Arc<App>, target: Target, auth_code: &str) -> Option<View> {
    let outcome = exchange(app, &target, auth_code).await;
    let tp = target.touchpoint.clone();
    match &outcome {
        Outcome::Bound { app_id, granted } => {
            let missing = bindings::missing(&target.required, granted);
            super::log(&format!(
                "binding {}: `{tp}` is bound to {app_id}; missing: {}",
                target.id,
                labels(missing)
            ));
            app.live.set_granted(&tp, app_id, granted.clone());
        }
        Outcome::Failed(reason) => {
            super::log(&format!("binding {} of `{tp}` failed: {reason}", target.id));
        }
    }
    let bound = matches!(outcome, Outcome::Bound { .. });
    let view = app
        .bindings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .finish(&target.id, outcome);
    app.bindings_done.notify_waiters();
    if bound {
        // Opened again: the new refresh token is read, and a hold is released.
        app.live.release(&tp);
        super::refresh_only(app, vec![tp]).await;
    }
    view
}

/// The exchange itself: what became of the binding.
async fn exchange(app: &Arc<App>, target: &Target, auth_code: &str) -> Outcome {
    let (tp, platform_id) = (&target.touchpoint, &target.platform);
    let again = format!("run `touchctl auth wechat {tp}` again");
    let Some(platform) = app.live.shared().platforms.get(platform_id) else {
        return Outcome::Failed(format!(
            "the platform `{platform_id}` is no longer usable (see /v1/status): fix it, then {again}"
        ));
    };
    let authorization = match platform.query_auth(auth_code).await {
        Ok(a) => a,
        Err(e) => {
            return Outcome::Failed(format!(
                "WeChat did not exchange the authorisation code: {e}; then {again}"
            ));
        }
    };
    if authorization.app_id != target.app_id {
        let want = &target.app_id;
        return Outcome::Failed(format!(
            "the account that authorised is {}, but touchpoint {tp} is {want}: ask the administrator of {want} to scan",
            authorization.app_id
        ));
    }
    let (r, base, policy) = (
        target.refresh_token.clone(),
        target.base.clone(),
        app.live.policy().clone(),
    );
    let token = authorization.refresh_token;
    let written = tokio::task::spawn_blocking(move || {
        write_refresh_token(&r, &base, &policy, &token).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match written {
        Ok(_) => Outcome::Bound {
            app_id: authorization.app_id,
            granted: authorization.granted,
        },
        Err(e) => Outcome::Failed(format!(
            "the refresh token could not be written: {e}; fix that, then {again}"
        )),
    }
}

#[derive(Deserialize)]
struct RedirectQuery {
    auth_code: Option<String>,
    state: Option<String>,
}

/// `GET /wechat/platforms/{platform_id}/authorized`.
async fn authorized(
    State(app): State<Arc<App>>,
    Path(platform_id): Path<String>,
    Query(q): Query<RedirectQuery>,
) -> Response {
    let (Some(state), Some(auth_code)) = (q.state, q.auth_code) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Not authorised",
            &["WeChat sent no authorisation code or binding: run `touchctl auth wechat` again and authorise on the page it prints.".into()],
        );
    };
    let claim = app
        .bindings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .claim(&state, &platform_id, now_ms());
    match claim {
        Claim::Go(target) => match complete(&app, target, &auth_code).await {
            Some(view) => outcome_page(&view),
            None => page(
                StatusCode::NOT_FOUND,
                "Unknown binding",
                &[UNKNOWN_BINDING.into()],
            ),
        },
        Claim::Unknown => page(
            StatusCode::NOT_FOUND,
            "Unknown binding",
            &[UNKNOWN_BINDING.into()],
        ),
        Claim::Expired(view) | Claim::Done(view) => outcome_page(&view),
        Claim::InProgress(view) => match finished(&app, &view.binding_id).await {
            Some(view) => outcome_page(&view),
            None => page(
                StatusCode::OK,
                "Completing",
                &[format!(
                    "The authorisation of `{}` is being completed; `touchctl auth wechat` shows the outcome.",
                    view.touchpoint
                )],
            ),
        },
    }
}

/// How long the browser's page waits for the other road to finish a binding.
const PAGE_WAITS: std::time::Duration = std::time::Duration::from_secs(30);

/// The binding `id` once it is no longer pending, waiting up to [`PAGE_WAITS`] for it.
async fn finished(app: &App, id: &str) -> Option<View> {
    let deadline = tokio::time::Instant::now() + PAGE_WAITS;
    loop {
        // Registered before looking, so a finish in between is not missed.
        let notified = app.bindings_done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let view = app
            .bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id, now_ms())?;
        if view.status != "pending" {
            return Some(view);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

const UNKNOWN_BINDING: &str = "This daemon has no such binding (it may have restarted, or the link is from another daemon): run `touchctl auth wechat` again.";

/// The page of a finished binding.
fn outcome_page(view: &View) -> Response {
    let tp = &view.touchpoint;
    let named = |names: &Option<Vec<&'static str>>| {
        labels(
            names
                .iter()
                .flatten()
                .filter_map(|n| Permission::all().into_iter().find(|p| p.name() == *n)),
        )
    };
    match view.status {
        "bound" => {
            let mut lines = vec![
                format!(
                    "The account {} is bound to touchpoint `{tp}`.",
                    view.app_id.as_deref().unwrap_or_default()
                ),
                format!("Granted: {}", named(&view.granted)),
            ];
            let missing = view.missing.as_deref().unwrap_or_default();
            if missing.is_empty() {
                lines.push("Every required permission is granted. You can close this page.".into());
            } else {
                lines.push(format!("Missing: {}", named(&view.missing)));
                if missing
                    .iter()
                    .any(|m| *m == Permission::Web.name() || *m == Permission::OpenAccount.name())
                {
                    lines.push("4 (网页服务) and 24 (开放平台帐号管理) can be held by one third-party platform only: if the account granted them to another platform, it must cancel that authorisation first.".into());
                }
            }
            page(StatusCode::OK, "Bound", &lines)
        }
        "expired" => page(
            StatusCode::GONE,
            "Expired",
            &["This binding expired: run touchctl auth wechat again.".into()],
        ),
        "failed" => page(
            StatusCode::OK,
            "Not bound",
            &[view.reason.clone().unwrap_or_default()],
        ),
        _ => page(
            StatusCode::OK,
            "Pending",
            &["The binding is still pending.".into()],
        ),
    }
}

/// A small HTML page, every line escaped.
fn page(status: StatusCode, title: &str, lines: &[String]) -> Response {
    (status, Html(page_html(title, lines))).into_response()
}

fn page_html(title: &str, lines: &[String]) -> String {
    let mut body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>touchctl: {}</title></head><body>\n<h1>{}</h1>\n",
        html(title),
        html(title)
    );
    for line in lines {
        body.push_str(&format!("<p>{}</p>\n", html(line)));
    }
    body.push_str("</body></html>\n");
    body
}

/// Text for HTML.
fn html(s: &str) -> std::borrow::Cow<'_, str> {
    html_escape::encode_safe(s)
}

/// Why `id` is not a usable platform.
fn unknown_platform(app: &App, id: &str) -> String {
    match app.live.platforms().into_iter().find(|p| p.id == id) {
        Some(p) => format!(
            "the platform `{id}` cannot be used: {}",
            p.problem.unwrap_or_default()
        ),
        None => format!(
            "no live wechat_open_platform `{id}`: apply its file (its id is the path's platform id)"
        ),
    }
}

/// `POST /v1/bindings`.
async fn start(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BINDING_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!(
                    "the body must be {{\"touchpoint\": \"ID\"}}, at most {MAX_BINDING_BODY} bytes"
                ),
            )
        })?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Start {
        touchpoint: String,
    }
    let Start { touchpoint: tp } = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("the body must be {{\"touchpoint\": \"ID\"}}: {e}"),
        )
    })?;
    if app.live.get(&tp).is_none() {
        return Err(super::api::unknown_touchpoint(&app, &tp));
    }
    let Some(third) = app.live.third_party_of(&tp) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_third_party",
            format!(
                "touchpoint `{tp}` is not an Official Account in third-party mode: a binding is for a `wechat_official_account` with `auth = {{ mode = \"third_party\", platform = \"...\", authorizer_refresh_token = {{ file = \"...\" }} }}`"
            ),
        ));
    };
    let Some(platform) = app.live.shared().platforms.get(&third.platform) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "platform_unusable",
            format!(
                "touchpoint `{tp}` names the platform `{}`: {}",
                third.platform,
                unknown_platform(&app, &third.platform)
            ),
        ));
    };
    let (code, lasts) = platform
        .pre_auth_code()
        .await
        .map_err(|e| platform_error(&third.platform, e))?;
    let now = now_ms();
    let expires_at = now.saturating_add(i64::try_from(lasts.as_millis()).unwrap_or(i64::MAX));
    let target = Target {
        id: String::new(),
        touchpoint: tp.clone(),
        platform: third.platform.clone(),
        app_id: third.app_id.clone(),
        refresh_token: third.refresh_token,
        base: third.base,
        required: third.required,
    };
    let started = app
        .bindings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .start(target, code.clone(), expires_at, now);
    let id = started.map_err(|e| match e {
        BindingError::Full(_) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_bindings",
                e.to_string(),
            );
            e.retry_after = Some(60);
            e
        }
        BindingError::Random(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    })?;
    let redirect = format!(
        "{}/wechat/platforms/{}/authorized?state={id}",
        app.public_url, third.platform
    );
    let view = app
        .bindings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id, now);
    let expires = view.map(|v| v.expires_at).unwrap_or_default();
    super::log(&format!(
        "binding {id} of `{tp}` ({}) started on platform `{}`; it expires at {expires}",
        third.app_id, third.platform
    ));
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "binding_id": id,
            "pc_url": platform.pc_url(&code, &redirect, &third.app_id),
            "mobile_url": platform.mobile_url(&code, &redirect, &third.app_id),
            "expires_at": expires,
        })),
    )
        .into_response())
}

/// The answer to a component API call that failed while starting a binding.
fn platform_error(platform: &str, e: PlatformError) -> ApiError {
    let message = format!("the platform `{platform}` could not get a pre-auth code: {e}");
    match e {
        PlatformError::NoTicket { .. } => {
            ApiError::new(StatusCode::CONFLICT, "no_verify_ticket", message)
        }
        e if e.is_config() => ApiError::new(StatusCode::CONFLICT, "platform_refused", message),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "platform_error", message),
    }
}

/// `GET /v1/bindings/{id}`.
async fn binding(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = app
        .bindings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id, now_ms());
    match view {
        Some(v) => Ok(axum::Json(v).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_binding",
            format!(
                "no binding `{id}` in this daemon (bindings are kept in memory, {} at most: it may have restarted): start one again",
                bindings::MAX_BINDINGS
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(html("<b>&\""), "&lt;b&gt;&amp;&quot;");
        let page = page_html("Not bound", &["<script>alert(1)</script>".into()]);
        assert!(page.contains("<p>&lt;script&gt;alert(1)&lt;"), "{page}");
        assert!(!page.contains("<script>"));
    }

    #[test]
    fn the_revoked_reason_names_the_command() {
        assert_eq!(
            revoked_reason("oa-main"),
            "unauthorized event: authorisation revoked by the account; re-authorise with `touchctl auth wechat oa-main`"
        );
    }
}
