//! The HTTP API (DESIGN.md section 4): dispatch (JSON or NDJSON), dispatch status, touchpoints,
//! status, pause/resume and `/metrics`, behind a Bearer token compared in constant time. Every
//! error is a JSON body `{"error": {"code", "message", ...}}` saying what is wrong.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::App;
use super::body::BodyError;
use crate::dispatch::intake::{self, IntakeError};
use crate::dispatch::queue::QueueError;
use crate::dispatch::trigger::RawTrigger;
use crate::dispatch::worker::{Directory, Why};

/// The routes, with authentication in front of all of them.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/dispatch", post(dispatch))
        .route("/v1/dispatches/{id}", get(dispatch_status))
        .route("/v1/touchpoints", get(touchpoints))
        .route("/v1/touchpoints/{id}", get(touchpoint))
        .route("/v1/touchpoints/{id}/pause", post(pause))
        .route("/v1/touchpoints/{id}/resume", post(resume))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .merge(super::open_platform::binding_routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .with_state(app.clone())
        // WeChat and administrators' browsers: checked as WeChat signs them, not by the token.
        .merge(super::open_platform::public_routes(app))
}

/// An error answer.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, Value)>,
    /// Seconds for `Retry-After`.
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    fn with(mut self, key: &'static str, value: Value) -> Self {
        self.extra = Some((key, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some((k, v)) = self.extra {
            error[k] = v;
        }
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"touchctl\""),
            );
        }
        response
    }
}

async fn authenticate(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &app.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        let ok = given.is_some_and(|g| bool::from(g.ct_eq(token.expose().as_bytes())));
        if !ok {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the daemon's API token as `Authorization: Bearer <token>`",
            ));
        }
    }
    Ok(next.run(request).await)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such endpoint: {} {}; see DESIGN.md section 4 or the README for the API",
            request.method(),
            request.uri().path()
        ),
    )
}

/// `POST /v1/dispatch`.
async fn dispatch(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let response = match accept(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    app.metrics.request(response.status().as_u16());
    response
}

async fn accept(app: &Arc<App>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    if app.is_draining() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down; send the trigger again to its next instance",
        );
        e.retry_after = Some(5);
        return Err(e);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let ndjson = match content_type.as_str() {
        "application/json" => false,
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => true,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "content type `{other}` is not accepted: send application/json (one trigger with `users`) or application/x-ndjson (the trigger head on the first line, then one user per line)"
                ),
            ));
        }
    };
    let limits = &app.limits;
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let reading = app.bodies.read(body, limits.max_body, expects_continue);
    let (bytes, held) = match tokio::time::timeout(limits.body_timeout, reading).await {
        Ok(read) => read.map_err(body_error)?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(limits.body_timeout)
                ),
            ));
        }
    };
    // Parsing, checking and storing are CPU and disk work: off the async threads, and only a few
    // triggers at a time. The others wait here, taking no CPU: a burst all worked on at once
    // shares the cores with the queue's writer thread, which every one of them then waits for,
    // and all are answered late (sixty 500-user triggers at once made each wait 100 to 700 ms).
    let waiting = app.metrics.waiting_for_intake();
    let permit = app
        .intake
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| internal(e.to_string()))?;
    drop(waiting);
    let app2 = app.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let answer = process(&app2, ndjson, &bytes, permit);
        // The body's share of the memory budget goes back with the body.
        drop((bytes, held));
        answer
    })
    .await;
    match answer {
        Ok(result) => result,
        Err(e) => Err(internal(e.to_string())),
    }
}

fn body_error(e: BodyError) -> ApiError {
    match e {
        BodyError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
        }
        BodyError::Busy { .. } => {
            let mut busy = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "body_memory_full",
                e.to_string(),
            );
            busy.retry_after = Some(BODY_MEMORY_RETRY_AFTER);
            busy
        }
        BodyError::Read(_) => malformed(e.to_string()),
    }
}

/// Seconds a trigger refused for want of body memory is told to wait: about what the daemon takes
/// to store a trigger of the largest size.
const BODY_MEMORY_RETRY_AFTER: u64 = 2;

/// Checks a trigger against its touchpoint and stores it; the answer to send. The intake
/// `permit` is let go once the CPU work is done, before waiting for the disk.
fn process(
    app: &App,
    ndjson: bool,
    bytes: &[u8],
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let trigger = if ndjson {
        RawTrigger::from_ndjson(bytes).map_err(malformed)?
    } else {
        RawTrigger::from_json(bytes).map_err(|e| {
            malformed(format!(
                "the body is not a trigger: {e}. Expected {{\"touchpoint\", \"campaign\", \"idempotency_key\", \"template_params\": {{...}}, \"users\": [{{\"user_id\", \"attributes\": {{...}}}}]}}"
            ))
        })?
    };
    let taken = intake::take(
        &app.queue,
        app.live.as_ref(),
        app.limits.max_queued,
        &trigger,
        // The CPU work is done: the next trigger may start while this one waits for the disk.
        move || drop(permit),
    )
    .map_err(|e| intake_error(app, e))?;
    if !taken.replayed {
        app.wake.queued(&trigger.head.touchpoint);
        app.metrics
            .accepted(&trigger.head.touchpoint, taken.accepted, taken.rejected);
    }
    Ok(receipt_response(&taken.receipt, taken.replayed))
}

/// The HTTP answer to a trigger not taken in.
fn intake_error(app: &App, e: IntakeError) -> ApiError {
    let message = e.to_string();
    match e {
        IntakeError::UnknownTouchpoint { id, .. } if app.live.is_platform(&id) => {
            unknown_touchpoint(app, &id)
        }
        IntakeError::BadIdempotencyKey(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_idempotency_key", message)
        }
        IntakeError::UnknownTouchpoint { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_touchpoint", message)
        }
        IntakeError::NotAccepting { why, .. } => {
            let code = match why {
                Why::Paused => "touchpoint_paused",
                Why::Disabled => "touchpoint_disabled",
                Why::Platform => "touchpoint_held",
                Why::Unavailable | Why::Gone => "touchpoint_unavailable",
            };
            ApiError::new(StatusCode::CONFLICT, code, message)
        }
        IntakeError::BadTemplate { problems, .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_template_params",
            message,
        )
        .with("problems", json!(problems)),
        IntakeError::QueueFull { .. } => {
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", message);
            e.retry_after = Some(10);
            e
        }
        IntakeError::Queue(q) => queue_error(q),
    }
}

fn receipt_response(receipt: &crate::dispatch::queue::Receipt, replayed: bool) -> Response {
    let mut response = (StatusCode::ACCEPTED, axum::Json(receipt)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::IdempotencyConflict { .. } => ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            e.to_string(),
        ),
        other => internal(other.to_string()),
    }
}

/// Runs queue work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(queue_error),
        Err(e) => Err(internal(e.to_string())),
    }
}

fn internal(message: String) -> ApiError {
    super::log(&format!("error: {message}"));
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the daemon could not store or read the queue: {message}"),
    )
}

fn malformed(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "malformed", message)
}

/// `GET /v1/dispatches/{id}`.
async fn dispatch_status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let queue = app.queue.clone();
    let id2 = id.clone();
    match blocking(move || queue.dispatch(&id2)).await? {
        Some(s) => Ok(axum::Json(s).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_dispatch",
            format!("no dispatch `{id}` in this daemon's queue"),
        )),
    }
}

/// Work waiting for each touchpoint: `(pending, held)` batches.
async fn pending(
    app: &Arc<App>,
) -> Result<std::collections::HashMap<String, (u64, u64)>, ApiError> {
    let queue = app.queue.clone();
    let pending = blocking(move || queue.pending_touchpoints()).await?;
    Ok(pending.into_iter().map(|(tp, p, h)| (tp, (p, h))).collect())
}

/// A live touchpoint as the API shows it, with the work waiting for it.
fn shown(summary: &super::live::Summary, (pending, held): (u64, u64)) -> Value {
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["pending_batches"] = pending.into();
    v["held_batches"] = held.into();
    v
}

/// `GET /v1/touchpoints`.
async fn touchpoints(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let pending = pending(&app).await?;
    let list: Vec<Value> = app
        .live
        .summaries()
        .iter()
        .map(|s| shown(s, pending.get(&s.id).copied().unwrap_or_default()))
        .collect();
    // Work parked for touchpoints that are gone stays visible.
    let gone: Vec<Value> = pending
        .iter()
        .filter(|(tp, _)| app.live.get(tp).is_none())
        .map(|(tp, (p, h))| {
            json!({"id": tp, "pending_batches": p, "held_batches": h, "held": super::live::GONE})
        })
        .collect();
    Ok(axum::Json(json!({"touchpoints": list, "gone_with_pending_work": gone})).into_response())
}

/// 404 for a touchpoint that is not live, with the nearest live id as a hint; for an open
/// platform, that it is not a touchpoint.
pub(super) fn unknown_touchpoint(app: &App, id: &str) -> ApiError {
    if app.live.is_platform(id) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_touchpoint",
            format!(
                "`{id}` is a wechat_open_platform, not a touchpoint: nothing is dispatched to it; use an Official Account that names it in `auth.platform`"
            ),
        );
    }
    let ids = app.live.ids();
    let hint = crate::load::did_you_mean(id, ids.iter().map(String::as_str))
        .map(|n| format!("; did you mean `{n}`?"))
        .unwrap_or_default();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_touchpoint",
        format!("no live touchpoint `{id}`{hint}"),
    )
}

/// `GET /v1/touchpoints/{id}`: one live touchpoint, as listed by `GET /v1/touchpoints`.
async fn touchpoint(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some((summary, _)) = app.live.get(&id) else {
        return Err(unknown_touchpoint(&app, &id));
    };
    let pending = pending(&app).await?;
    let waiting = pending.get(&id).copied().unwrap_or_default();
    Ok(axum::Json(shown(&summary, waiting)).into_response())
}

async fn set_paused(app: Arc<App>, id: String, paused: bool) -> Result<Response, ApiError> {
    let registry = app.registry.clone();
    let id2 = id.clone();
    let result = tokio::task::spawn_blocking(move || {
        crate::registry::Registry::set_paused(registry.as_ref(), &id2, paused)
    })
    .await
    .map_err(|e| internal(e.to_string()))?;
    match result {
        Ok(_) => {}
        Err(crate::registry::RegistryError::NotFound(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_touchpoint",
                format!("no live touchpoint `{id}`"),
            ));
        }
        Err(e) => return Err(internal(e.to_string())),
    }
    if !paused {
        // A resume also releases what the platform said (held, waiting): the next batch asks it again.
        app.live.release(&id);
    }
    super::refresh(&app, false).await;
    super::log(&format!(
        "{} `{id}` through the API",
        if paused { "paused" } else { "resumed" }
    ));
    let summary = app.live.get(&id).map(|(s, _)| s);
    Ok(axum::Json(summary).into_response())
}

/// `POST /v1/touchpoints/{id}/pause`.
async fn pause(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(app, id, true).await
}

/// `POST /v1/touchpoints/{id}/resume`.
async fn resume(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(app, id, false).await
}

/// `GET /v1/status`.
async fn status(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let queue = app.queue.clone();
    let stats = blocking(move || queue.stats()).await?;
    let summaries = app.live.summaries();
    let ready = summaries.iter().filter(|s| s.ready).count();
    let count = |state: &str| summaries.iter().filter(|s| s.state == state).count();
    let reconcile = app.last_reconcile();
    let platforms = platforms(&app).await?;
    let nodes = match app.queue.postgres() {
        None => None,
        Some(_) => {
            let queue = app.queue.clone();
            Some(
                blocking(move || match queue.postgres() {
                    Some(q) => q.nodes(NODES_WITHIN),
                    None => Ok(Vec::new()),
                })
                .await?,
            )
        }
    };
    let mut answer = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": app.info.started_at,
        "uptime_seconds": app.info.started.elapsed().as_secs(),
        "draining": app.is_draining(),
        "source": app.info.source,
        "dir": app.info.dir,
        "watch": app.info.watch,
        "registry": app.info.registry,
        "queue_file": app.info.queue,
        "reconcile": reconcile,
        "touchpoints": {
            "live": summaries.len(),
            "ready": ready,
            "held": summaries.len() - ready,
            "paused": count("paused"),
            "waiting": count("waiting"),
            "held_by_platform": summaries
                .iter()
                .filter(|s| s.state == "held" && s.code.is_some())
                .map(|s| json!({"id": s.id, "code": s.code, "reason": s.held}))
                .collect::<Vec<_>>(),
        },
        "queue": stats,
        "platforms": platforms,
    });
    // Daemons sharing a PostgreSQL queue: this one, and every one that beat within the hour.
    if let Some(nodes) = nodes {
        answer["node"] = json!(app.info.node);
        answer["nodes"] = json!(
            nodes
                .iter()
                .map(|n| json!({
                    "node": n.node,
                    "host": n.host,
                    "pid": n.pid,
                    "listen": n.listen,
                    "started_at": n.started_at,
                    "last_heartbeat": super::live::rfc3339(n.heartbeat_at),
                    "heartbeat_age_seconds": n.heartbeat_age_ms as f64 / 1000.0,
                    "stopped": n.stopped_at.is_some(),
                    "this": Some(&n.node) == app.info.node.as_ref(),
                }))
                .collect::<Vec<_>>()
        );
    }
    Ok(axum::Json(answer).into_response())
}

/// How far back `/v1/status` lists the cluster's daemons.
const NODES_WITHIN: std::time::Duration = std::time::Duration::from_secs(3600);

/// The live open platforms as `/v1/status` shows them: whether the registry has a verify ticket
/// for each (never the ticket), when this daemon last received one, and what stops its use.
async fn platforms(app: &Arc<App>) -> Result<Vec<Value>, ApiError> {
    let summaries = app.live.platforms();
    let registry = app.registry.clone();
    let ids: Vec<String> = summaries.iter().map(|p| p.id.clone()).collect();
    let tickets = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| registry.platform_ticket(id).map(|t| t.is_some()))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| internal(e.to_string()))?;
    let received = app
        .tickets_received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(summaries
        .into_iter()
        .zip(tickets)
        .map(|(p, ticket)| {
            let mut v = serde_json::to_value(&p).unwrap_or_default();
            v["ticket"] = match ticket {
                Ok(true) => "present".into(),
                Ok(false) => "missing".into(),
                Err(e) => {
                    v["ticket_error"] = e.to_string().into();
                    "unknown".into()
                }
            };
            if let Some(at) = received.get(&p.id) {
                v["ticket_received_at"] = at.clone().into();
            }
            v
        })
        .collect())
}

/// `GET /metrics`.
async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let queue = app.queue.clone();
    let stats = blocking(move || queue.stats()).await?;
    let text = app.metrics.render(&stats, &app.live.summaries());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
