//! The daemon-side commands: `daemon`, `dispatch` (its client) and `deliveries` (the queue's log).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};

use touchctl::daemon::{self, reconcile::Source};
use touchctl::dispatch::queue::{Filter, Queue};
use touchctl::dispatch::{TriggerHead, User};
use touchctl::model::Secret;

use super::{FAILED, OK};
use crate::cli::{DaemonArgs, DeliveriesCommand, DispatchArgs, Global, ValidateFormat};

/// The queue file: given, or `queue.db` beside the registry file.
pub fn queue_path(g: &Global, given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || g.state.parent().unwrap_or(Path::new("")).join("queue.db"),
        Path::to_path_buf,
    )
}

fn read_token(file: Option<&Path>) -> Result<Option<Secret>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the API token file {}", file.display()))?;
        let token = text.trim();
        if token.is_empty() {
            bail!("the API token file {} is empty", file.display());
        }
        return Ok(Some(Secret::new(token)));
    }
    Ok(std::env::var("TOUCHCTL_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Secret::new(t.trim())))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn daemon_cmd(g: &Global, args: &DaemonArgs) -> Result<u8> {
    let source = Source::parse(&args.source).map_err(|e| anyhow!(e))?;
    if source != Source::Worktree && !args.watch {
        bail!("--source only matters with --watch: add --watch to reconcile from {source}");
    }
    let config = daemon::Config {
        listen: args.listen,
        dir: g.dir.clone(),
        state: g.state.clone(),
        queue: queue_path(g, args.queue.as_deref()),
        watch: args.watch,
        source,
        interval: args.interval,
        max_deletes: args.max_deletes,
        allow_private_network: args.allow_private_network,
        token: read_token(args.api_token_file.as_deref())?,
        insecure_no_auth: args.insecure_no_auth,
        concurrency: args.concurrency,
        max_in_flight: args.max_in_flight,
        max_body: args.max_body,
        max_queued: args.max_queued,
        client_timeout: args.client_timeout,
        drain: args.drain_timeout,
        retention: args.retention,
    };
    runtime()?.block_on(daemon::run(config, |_| {}))?;
    Ok(OK)
}

/// Reads the users file: a JSON array, or one JSON object per line.
fn read_users(path: &Path) -> Result<Vec<User>> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the users from standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the users file {}", path.display()))?;
    }
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a JSON array of users {{\"user_id\", \"attributes\": {{...}}}}",
                path.display()
            )
        });
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{} line {}: not a user {{\"user_id\", \"attributes\": {{...}}}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

fn template_params(args: &DispatchArgs) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--param {p:?}: write NAME=VALUE"))?;
        out.insert(k.to_string(), Value::String(v.to_string()));
    }
    for p in &args.params_json {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--param-json {p:?}: write NAME=JSON"))?;
        let value = serde_json::from_str(v).with_context(|| {
            format!("--param-json {k}: {v:?} is not JSON (quote text: '\"text\"', or use --param)")
        })?;
        out.insert(k.to_string(), value);
    }
    Ok(out)
}

pub fn dispatch_cmd(g: &Global, args: &DispatchArgs) -> Result<u8> {
    let users = read_users(&args.users)?;
    let head = TriggerHead {
        touchpoint: args.touchpoint.clone(),
        campaign: args.campaign.clone(),
        idempotency_key: args.idempotency_key.clone(),
        template_params: template_params(args)?,
    };
    let mut body = serde_json::to_vec(&head)?;
    body.push(b'\n');
    for u in &users {
        serde_json::to_writer(&mut body, u)?;
        body.push(b'\n');
    }
    let token = read_token(None)?;
    let base = args.url.trim_end_matches('/').to_string();
    let quiet = g.quiet;
    let wait = args.wait;
    let _ = rustls::crypto::ring::default_provider().install_default();
    runtime()?.block_on(async move {
        let client = reqwest::Client::new();
        let auth = |r: reqwest::RequestBuilder| match &token {
            Some(t) => r.bearer_auth(t.expose()),
            None => r,
        };
        let response = auth(client.post(format!("{base}/v1/dispatch")))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {base} (is `touchctl daemon` running? --url or TOUCHCTL_URL)"))?;
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let text = response.text().await.unwrap_or_default();
        let doc: Value = serde_json::from_str(&text).unwrap_or(json!({"raw": text}));
        if status.as_u16() != 202 {
            let message = doc
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or(text.as_str());
            eprintln!("error: the daemon answered {status}: {message}");
            return Ok(FAILED);
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        if replayed && !quiet {
            eprintln!("This idempotency key was used before: that trigger's answer is shown, and nothing new was queued.");
        }
        if !wait {
            return Ok(OK);
        }
        let id = doc["dispatch_id"].as_str().unwrap_or_default().to_string();
        let mut last = String::new();
        loop {
            let text = auth(client.get(format!("{base}/v1/dispatches/{id}")))
                .send()
                .await?
                .text()
                .await?;
            let s: Value = serde_json::from_str(&text)
                .with_context(|| format!("the daemon's dispatch status is not JSON: {text}"))?;
            let line = format!(
                "{id}: {} delivered, {} failed, {} pending, {} dead",
                s["delivered"], s["failed"], s["pending"], s["dead"]
            );
            if line != last && !quiet {
                eprintln!("{line}");
                last = line;
            }
            if s["finished"].as_bool() == Some(true) {
                let clean = s["dead"].as_u64() == Some(0) && s["failed"].as_u64() == Some(0);
                return Ok(if clean { OK } else { FAILED });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn deliveries_cmd(g: &Global, command: &DeliveriesCommand, queue: Option<&Path>) -> Result<u8> {
    let path = queue_path(g, queue);
    if !path.exists() {
        bail!(
            "there is no queue file at {}: it is created by `touchctl daemon` (or point --queue at it)",
            path.display()
        );
    }
    let queue = Queue::open(&path)?;
    match command {
        DeliveriesCommand::List {
            status,
            touchpoint,
            dispatch,
            limit,
            format,
        } => {
            let batches = queue.batches(&Filter {
                state: status.clone(),
                touchpoint: touchpoint.clone(),
                dispatch_id: dispatch.clone(),
                limit: *limit,
            })?;
            if *format == ValidateFormat::Json {
                println!("{}", serde_json::to_string_pretty(&batches)?);
                return Ok(OK);
            }
            if batches.is_empty() {
                println!("No batches match.");
                return Ok(OK);
            }
            println!(
                "{:<40} {:<16} {:<9} {:>9} {:>9} {:>6} {:>8}  last change / note",
                "batch", "touchpoint", "state", "delivered", "remaining", "failed", "attempts"
            );
            for b in &batches {
                let note = match (&b.held, &b.last_error) {
                    (Some(h), _) => format!("held: {h}"),
                    (None, Some(e)) => e.clone(),
                    (None, None) => String::new(),
                };
                println!(
                    "{:<40} {:<16} {:<9} {:>9} {:>9} {:>6} {:>8}  {} {}",
                    b.id,
                    b.touchpoint,
                    b.state,
                    b.delivered,
                    b.remaining,
                    b.failed,
                    b.attempts,
                    when(b.updated_at),
                    note
                );
            }
            Ok(OK)
        }
        DeliveriesCommand::Show { batch, format } => {
            let found = queue.batches(&Filter {
                limit: 0,
                ..Filter::default()
            })?;
            let Some(info) = found.into_iter().find(|b| &b.id == batch) else {
                bail!(
                    "no batch `{batch}` in {}: `touchctl deliveries list` shows them",
                    path.display()
                );
            };
            let (attempts, failures) = queue.history(batch)?;
            if *format == ValidateFormat::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"batch": info, "attempts": attempts, "failed_recipients": failures})
                    )?
                );
                return Ok(OK);
            }
            println!(
                "batch {} ({} of {} in dispatch {}) to `{}`: {}{}",
                info.id,
                info.index + 1,
                info.count,
                info.dispatch_id,
                info.touchpoint,
                info.state,
                info.held
                    .as_deref()
                    .map(|h| format!(", held: {h}"))
                    .unwrap_or_default()
            );
            println!(
                "  recipients: {} in all, {} delivered, {} failed, {} remaining",
                info.size, info.delivered, info.failed, info.remaining
            );
            if let Some(next) = info.next_at {
                println!("  next attempt: {}", when(next));
            }
            println!("  attempts:");
            for a in &attempts {
                println!(
                    "    #{} {} generation {} {} {}ms {} recipient(s){}",
                    a.attempt,
                    when(a.started_at),
                    a.generation,
                    a.status
                        .map_or("no response".to_string(), |s| format!("HTTP {s}")),
                    a.latency_ms,
                    a.recipients,
                    a.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                println!("       → {}", a.outcome);
            }
            if attempts.is_empty() {
                println!("    none yet");
            }
            if !failures.is_empty() {
                println!("  failed recipients:");
                for f in &failures {
                    println!("    {}: {}", f.user_id, f.reason);
                }
            }
            Ok(OK)
        }
        DeliveriesCommand::Replay {
            batches,
            all,
            touchpoint,
        } => {
            if batches.is_empty() && !all {
                bail!(
                    "name the dead batches to replay, or pass --all (and optionally --touchpoint ID)"
                );
            }
            let replayed = queue.replay(batches, touchpoint.as_deref())?;
            let missing: Vec<&String> = batches.iter().filter(|b| !replayed.contains(b)).collect();
            for id in &replayed {
                println!("replayed {id}");
            }
            println!("{} batch(es) back in the queue.", replayed.len());
            if !missing.is_empty() {
                eprintln!(
                    "error: not dead (or unknown), so not replayed: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(FAILED);
            }
            Ok(OK)
        }
    }
}
