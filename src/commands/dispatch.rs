//! `touchctl dispatch`: the client of `POST /v1/dispatch`. It reads a users file, checks all of it
//! before sending anything, and sends it as one trigger, or as several of at most
//! `--per-trigger` users each when it is larger (the daemon refuses bodies over its `--max-body`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};

use touchctl::dispatch::{Rejected, TriggerHead, User, check_idempotency_key};
use touchctl::term::{self, escape, escape_text};

use super::daemon::{read_token, runtime};
use super::{FAILED, OK};
use crate::cli::{DispatchArgs, Global};

/// How many times a part is sent again after the daemon answered 503 (queue full, or shutting
/// down), waiting as its `Retry-After` says.
const BUSY_RETRIES: usize = 30;

/// The longest wait between two tries of a part the daemon was too busy for.
const BUSY_WAIT_MAX: Duration = Duration::from_secs(60);

/// The users file, checked whole, to be read part by part.
enum Users {
    /// A JSON array (read into memory: it is one value).
    Array(Vec<User>),
    /// One user per line, from a file read again for each pass, or standard input kept in memory.
    Lines(LineSource),
}

enum LineSource {
    File(std::path::PathBuf),
    Text(String),
}

impl Users {
    /// Reads and checks every user; the distinct user ids. Nothing is sent from a file with
    /// errors.
    fn open(path: &Path) -> Result<(Self, HashSet<String>)> {
        let text =
            if path == Path::new("-") {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read the users from standard input")?;
                Some(text)
            } else {
                let mut file = std::fs::File::open(path)
                    .with_context(|| format!("cannot read the users file {}", path.display()))?;
                let mut start = [0u8; 512];
                let n = file
                    .read(&mut start)
                    .with_context(|| format!("cannot read the users file {}", path.display()))?;
                // An array is one JSON value: read it whole. Lines are read a part at a time.
                let array = start[..n]
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|&b| b == b'[');
                if array {
                    Some(std::fs::read_to_string(path).with_context(|| {
                        format!("cannot read the users file {}", path.display())
                    })?)
                } else {
                    None
                }
            };
        let users = match text {
            Some(text) if text.trim_start().starts_with('[') => {
                let users: Vec<User> = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{} is not a JSON array of users {{\"user_id\", \"attributes\": {{...}}}}",
                        path.display()
                    )
                })?;
                let ids = users.iter().map(|u| u.user_id.clone()).collect();
                return Ok((Users::Array(users), ids));
            }
            Some(text) => Users::Lines(LineSource::Text(text)),
            None => Users::Lines(LineSource::File(path.to_path_buf())),
        };
        let mut ids = HashSet::new();
        if let Users::Lines(source) = &users {
            source.each(path, |u| {
                ids.insert(u.user_id);
                Ok(())
            })?;
        }
        Ok((users, ids))
    }

    /// Calls `f` with every user in order, handing each over; a line that is not a user stops
    /// it with an error that names the line.
    fn each(self, path: &Path, f: impl FnMut(User) -> Result<()>) -> Result<()> {
        match self {
            Users::Array(users) => users.into_iter().try_for_each(f),
            Users::Lines(source) => source.each(path, f),
        }
    }
}

impl LineSource {
    /// Reads the lines (again, for a file) and calls `f` with each user.
    fn each(&self, path: &Path, mut f: impl FnMut(User) -> Result<()>) -> Result<()> {
        let lines: Box<dyn Iterator<Item = std::io::Result<String>> + '_> = match self {
            LineSource::Text(text) => Box::new(text.lines().map(|l| Ok(l.into()))),
            LineSource::File(file) => {
                let file = std::fs::File::open(file)
                    .with_context(|| format!("cannot read the users file {}", path.display()))?;
                Box::new(BufReader::new(file).lines())
            }
        };
        for (i, line) in lines.enumerate() {
            let line =
                line.with_context(|| format!("cannot read the users file {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let user = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {}: not a user {{\"user_id\", \"attributes\": {{...}}}}",
                    path.display(),
                    i + 1
                )
            })?;
            f(user)?;
        }
        Ok(())
    }
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

/// The idempotency key of part `index` (from 1) of `parts`: the key itself for a file sent
/// whole, `KEY#INDEX` for each part of a larger one.
fn part_key(key: Option<&str>, index: usize, parts: usize) -> Option<String> {
    key.map(|k| {
        if parts > 1 {
            format!("{k}#{index}")
        } else {
            k.to_string()
        }
    })
}

/// One trigger's NDJSON body: the head, then one user per line.
fn ndjson(head: &TriggerHead, users: &[User]) -> Result<Vec<u8>> {
    let mut body = serde_json::to_vec(head)?;
    body.push(b'\n');
    for u in users {
        serde_json::to_writer(&mut body, u)?;
        body.push(b'\n');
    }
    Ok(body)
}

/// What the daemon answered for one part.
struct Answer {
    status: reqwest::StatusCode,
    replayed: bool,
    retry_after: Option<Duration>,
    doc: Value,
    text: String,
}

/// What to do when the daemon answers 401: the token (from `token_file`, or the environment) is
/// missing, or not the daemon's.
pub(super) fn unauthorized(base: &str, token_file: Option<&Path>, had_token: bool) -> String {
    let source = match token_file {
        Some(file) => format!("the token in {}", file.display()),
        None => "TOUCHCTL_API_TOKEN".to_string(),
    };
    if had_token {
        format!(
            "the daemon at {base} refused the API token (HTTP 401): {source} must hold the token the daemon was started with (its TOUCHCTL_API_TOKEN or --api-token-file)"
        )
    } else {
        format!(
            "the daemon at {base} needs its API token (HTTP 401): set TOUCHCTL_API_TOKEN to the token the daemon was started with, or pass --api-token-file FILE"
        )
    }
}

impl Answer {
    fn message(&self) -> &str {
        self.doc
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or(self.text.as_str())
    }
}

pub fn dispatch_cmd(g: &Global, args: &DispatchArgs) -> Result<u8> {
    let params = template_params(args)?;
    let (users, mut ids) = Users::open(&args.users)?;
    let per = args.per_trigger.max(1);
    let parts = ids.len().div_ceil(per).max(1);
    if let Some(key) = &args.idempotency_key {
        // The daemon refuses a key it would not store: say so before sending anything.
        let longest = part_key(Some(key), parts, parts).unwrap_or_default();
        if let Err(e) = check_idempotency_key(&longest) {
            let parted = if parts > 1 {
                format!(" (counting the `#{parts}` added to the key of the last of {parts} parts)")
            } else {
                String::new()
            };
            bail!("--idempotency-key: {e}{parted}");
        }
    }
    let token = read_token(args.api_token_file.as_deref())?;
    let base = args.url.trim_end_matches('/').to_string();
    let quiet = g.quiet;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = runtime()?;
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match &token {
        Some(t) => r.bearer_auth(t.expose()),
        None => r,
    };
    let send = |body: Vec<u8>| {
        rt.block_on(async {
            let response = auth(client.post(format!("{base}/v1/dispatch")))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .with_context(|| format!("cannot reach the daemon at {base} (is `touchctl daemon` running? --url or TOUCHCTL_URL)"))?;
            let status = response.status();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_secs);
            let text = response.text().await.unwrap_or_default();
            let doc: Value = serde_json::from_str(&text).unwrap_or(json!({"raw": text}));
            anyhow::Ok(Answer {
                status,
                replayed,
                retry_after,
                doc,
                text,
            })
        })
    };

    // Part by part. Sent in parts, a user id goes once, with its first line (as the daemon
    // leaves out an id seen twice in one trigger); the parts are counted without the repeats.
    let mut receipts: Vec<Value> = Vec::new();
    let mut left_out: Vec<Rejected> = Vec::new();
    let mut part: Vec<User> = Vec::with_capacity(per.min(ids.len()));
    let mut index = 0;
    let mut failed: Option<String> = None;
    let mut send_part = |part: &mut Vec<User>, index: usize| -> Result<bool> {
        let head = TriggerHead {
            touchpoint: args.touchpoint.clone(),
            campaign: args.campaign.clone(),
            idempotency_key: part_key(args.idempotency_key.as_deref(), index, parts),
            template_params: params.clone(),
            template: args.template.clone(),
            title: args.title.clone(),
            body: args.body.clone(),
            payload: args.payload.clone(),
        };
        let body = ndjson(&head, part)?;
        let n = part.len();
        part.clear();
        let which = if parts > 1 {
            format!("part {index} of {parts} ({n} users): ")
        } else {
            String::new()
        };
        let mut tries = 0;
        let answer = loop {
            // What was accepted before is still shown when a later part cannot be sent.
            let answer = match send(body.clone()) {
                Ok(answer) => answer,
                Err(e) => {
                    failed = Some(format!("{which}{e:#}"));
                    return Ok(false);
                }
            };
            if answer.status.as_u16() != 503 || tries == BUSY_RETRIES {
                break answer;
            }
            tries += 1;
            let wait = answer
                .retry_after
                .unwrap_or(Duration::from_secs(5))
                .min(BUSY_WAIT_MAX);
            if !quiet {
                eprintln!(
                    "The daemon is busy ({}); sending part {index} of {parts} again in {}s.",
                    escape(answer.message()),
                    wait.as_secs()
                );
            }
            std::thread::sleep(wait);
        };
        if answer.status == reqwest::StatusCode::UNAUTHORIZED {
            failed = Some(format!(
                "{which}{}",
                unauthorized(&base, args.api_token_file.as_deref(), token.is_some())
            ));
            return Ok(false);
        }
        if answer.status.as_u16() != 202 {
            failed = Some(format!(
                "{which}the daemon answered {}: {}",
                answer.status,
                answer.message()
            ));
            return Ok(false);
        }
        if parts > 1 && !quiet {
            eprintln!(
                "part {index} of {parts}: {} accepted, {} rejected ({}){}",
                escape(&answer.doc["accepted"].to_string()),
                answer.doc["rejected"].as_array().map_or(0, Vec::len),
                escape(answer.doc["dispatch_id"].as_str().unwrap_or_default()),
                if answer.replayed {
                    ", sent before: nothing new queued"
                } else {
                    ""
                }
            );
        } else if answer.replayed && !quiet {
            eprintln!(
                "This idempotency key was used before: that trigger's answer is shown, and nothing new was queued."
            );
        }
        receipts.push(answer.doc);
        Ok(true)
    };
    let mut stopped = false;
    users.each(&args.users, |user| {
        if stopped {
            return Ok(());
        }
        // Each id is taken from the set once: its first occurrence.
        if parts > 1 && !ids.remove(&user.user_id) {
            left_out.push(Rejected {
                user_id: user.user_id,
                reason: "the same `user_id` appears earlier in the users file".into(),
            });
            return Ok(());
        }
        part.push(user);
        if part.len() == per {
            index += 1;
            stopped = !send_part(&mut part, index)?;
        }
        Ok(())
    })?;
    if !stopped && (!part.is_empty() || index == 0) {
        index += 1;
        send_part(&mut part, index)?;
    }

    let summary = if parts == 1 {
        receipts.first().cloned()
    } else {
        let sum = |key: &str| receipts.iter().filter_map(|r| r[key].as_u64()).sum::<u64>();
        let mut rejected: Vec<Value> = receipts
            .iter()
            .filter_map(|r| r["rejected"].as_array())
            .flatten()
            .cloned()
            .collect();
        rejected.extend(left_out.iter().map(|r| json!(r)));
        Some(json!({
            "dispatches": receipts,
            "accepted": sum("accepted"),
            "rejected": rejected,
            "batches": sum("batches"),
        }))
    };
    if let Some(summary) = &summary {
        println!("{}", term::json(serde_json::to_string_pretty(summary)?));
    }
    if let Some(error) = failed {
        eprintln!("error: {}", escape_text(&error));
        if receipts.is_empty() {
            return Ok(FAILED);
        }
        let again = if args.idempotency_key.is_some() {
            "Run the same command again (same file, --idempotency-key and --per-trigger) to send the rest: the parts already accepted are answered from the daemon's record and not queued again."
        } else {
            "The parts shown above were accepted and will be delivered. Running the command again would queue them again: send the rest only, or use --idempotency-key next time so a re-run sends only what is missing."
        };
        eprintln!(
            "{} of {parts} parts were accepted before that. {again}",
            receipts.len()
        );
        return Ok(FAILED);
    }
    if !args.wait {
        return Ok(OK);
    }
    let ids: Vec<String> = receipts
        .iter()
        .filter_map(|r| r["dispatch_id"].as_str().map(str::to_string))
        .collect();
    rt.block_on(async {
        let mut last = String::new();
        loop {
            let mut totals = [0u64; 4];
            let mut finished = true;
            for id in &ids {
                let response = auth(client.get(format!("{base}/v1/dispatches/{id}")))
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the daemon at {base} to follow the delivery; `touchctl deliveries list --dispatch {id}` shows it"))?;
                let status = response.status();
                let text = response.text().await?;
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    bail!("{}", unauthorized(&base, args.api_token_file.as_deref(), token.is_some()));
                }
                let s: Value = serde_json::from_str(&text)
                    .with_context(|| format!("the daemon's dispatch status is not JSON: {text}"))?;
                if !status.is_success() {
                    let message = s.pointer("/error/message").and_then(Value::as_str);
                    bail!(
                        "the daemon answered {status} for dispatch {id}: {}",
                        message.unwrap_or(text.as_str())
                    );
                }
                for (t, key) in totals
                    .iter_mut()
                    .zip(["delivered", "failed", "pending", "dead"])
                {
                    *t += s[key].as_u64().unwrap_or(0);
                }
                finished &= s["finished"].as_bool() == Some(true);
            }
            let [delivered, failed, pending, dead] = totals;
            let who = match ids.as_slice() {
                [one] => escape(one).into_owned(),
                more => format!("{} dispatches", more.len()),
            };
            let line = format!(
                "{who}: {delivered} delivered, {failed} failed, {pending} pending, {dead} dead"
            );
            if line != last && !quiet {
                eprintln!("{line}");
                last = line;
            }
            if finished {
                return Ok(if dead == 0 && failed == 0 { OK } else { FAILED });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
