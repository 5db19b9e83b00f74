//! Helpers for the daemon tests: the real daemon as a child process on a random loopback port, an
//! HTTP sink that records what it receives and answers as a test tells it, and a small client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::Project;

/// How long a test waits for something to happen before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running `touchctl daemon`.
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: Arc<Mutex<String>>,
    /// Closed by the log reader once the daemon's standard error ends.
    log_done: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Project {
    /// Starts the daemon in the project on a random loopback port, with `args` added; waits until
    /// it listens. No token unless `TOUCHCTL_API_TOKEN` is in `env`.
    pub fn start_daemon(&self, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut all = vec!["daemon", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut cmd = self.command(&all);
        cmd.env_remove("TOUCHCTL_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.spawn_daemon(cmd)
    }

    /// Starts the daemon `cmd` runs (its standard error is read for the address); waits until it
    /// listens.
    pub fn spawn_daemon(&self, mut cmd: std::process::Command) -> Daemon {
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the daemon");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, log_done) = std::sync::mpsc::channel::<()>();
        let log2 = log.clone();
        std::thread::spawn(move || {
            // Dropped when the loop ends: the log is complete.
            let _done = done_tx;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(url);
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = match rx.recv_timeout(PATIENCE) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon did not start listening:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Daemon {
            child: Some(child),
            url,
            log,
            log_done: Mutex::new(log_done),
        }
    }
}

impl Daemon {
    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for it to exit and for its log to end; returns the exit code and the
    /// whole log.
    pub fn terminate(mut self) -> (i32, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                // Its last lines may still be on their way to the reader: wait for the end.
                let left = deadline.saturating_duration_since(Instant::now());
                let ended = self.log_done.lock().unwrap().recv_timeout(left);
                assert!(
                    matches!(ended, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)),
                    "the daemon exited but its log did not end:\n{}",
                    self.log()
                );
                return (status.code().unwrap_or(-1), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A request to the API: `(status, JSON body)`.
    pub fn call(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> (u16, Value) {
        http(method, &format!("{}{path}", self.url), None, body)
    }

    /// `POST /v1/dispatch` with a JSON trigger.
    pub fn dispatch(&self, trigger: &Value) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/dispatch",
            Some(("application/json", serde_json::to_vec(trigger).unwrap())),
        )
    }

    /// Polls `GET path` until `done` accepts the answer (status and body), for at most
    /// `PATIENCE`; returns that body. `what` says what was awaited when it never comes.
    pub fn wait_until(&self, path: &str, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (code, body) = self.call("GET", path, None);
            if done(code, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: HTTP {code} {body}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the dispatch is finished (every batch delivered or dead); returns its status.
    pub fn wait_finished(&self, dispatch_id: &str) -> Value {
        self.wait_until(
            &format!("/v1/dispatches/{dispatch_id}"),
            &format!("dispatch {dispatch_id} did not finish"),
            |code, s| {
                assert_eq!(code, 200, "{s}");
                s["finished"] == true
            },
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One HTTP request: `(status, JSON body or {"raw": text})`.
pub fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let mut req = client.request(method.parse().expect("method"), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((ct, bytes)) = body {
            req = req.header("content-type", ct).body(bytes);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "raw": text }));
        (status, v)
    })
}

/// One request a sink received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    /// The JSON body.
    pub body: Value,
    /// The status the sink answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

/// How a sink answers request number `n` (from 0): status, extra headers, body, delay.
pub type Answer =
    dyn Fn(usize, &Value) -> (u16, Vec<(&'static str, String)>, String, Duration) + Send + Sync;

/// An HTTP endpoint on a random loopback port that records every request.
pub struct Sink {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Arc<Answer>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sink {
    /// A sink that answers 200 `{}` to everything.
    pub fn ok() -> Self {
        Self::new(Arc::new(|_, _| {
            (200, Vec::new(), "{}".into(), Duration::ZERO)
        }))
    }

    /// A sink that answers as `answer` says.
    pub fn new(answer: Arc<Answer>) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let (rec, ans) = (received.clone(), answer.clone());
        let count = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (rec, ans, count) = (rec.clone(), ans.clone(), count.clone());
                async move {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let headers = headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                v.to_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect();
                    let answer = ans.lock().unwrap().clone();
                    let (status, extra, text, delay) = answer(n, &body);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    rec.lock().unwrap().push(Received {
                        headers,
                        body,
                        status,
                        at: Instant::now(),
                    });
                    let mut resp = axum::response::Response::new(axum::body::Body::from(text));
                    *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                    for (k, v) in extra {
                        resp.headers_mut().insert(k, v.parse().unwrap());
                    }
                    resp
                }
            },
        );
        let (url, stop_tx) = serve_on_loopback(app);
        Self {
            url,
            received,
            answer,
            _stop: stop_tx,
        }
    }

    /// Changes how the sink answers from now on.
    pub fn answer_with(&self, answer: Arc<Answer>) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Every recipient of every request the sink answered 2xx, so far.
    pub fn delivered(&self) -> Vec<Value> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.body["recipients"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until `done` says the received requests are enough.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if done(&self.received()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sink never got {what}: {} request(s)",
                self.received().len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `n` users `u0..` with a phone and a member id.
pub fn users(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "user_id": format!("u{i}"),
                "attributes": {"phone": format!("138{i:08}"), "member_id": format!("m{i}"), "tier": "gold"}
            })
        })
        .collect()
}

/// A custom touchpoint file for `url`, with env secrets `SINK_TOKEN` / `SINK_SIGNING`.
pub fn custom_touchpoint(id: &str, url: &str, batch_size: u32, extra: &str) -> String {
    format!(
        "id = \"{id}\"\nname = \"{id}\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"{url}/hook/{id}\"\nallow_insecure = true\nauth_token = {{ env = \"SINK_TOKEN\" }}\nbatch_size = {batch_size}\n{extra}\n[retry]\nattempts = 20\nbackoff = \"20ms\"\nmax_backoff = \"200ms\"\n\n[dynamic_params]\nphone = \"user.phone\"\nmember_id = \"user.member_id\"\n\n[[template_params]]\nname = \"text\"\ntype = \"string\"\nmax_length = 70\n"
    )
}

impl Daemon {
    /// The sum of every series of the counter or gauge `name` at `/metrics` (0 when it has none
    /// yet), e.g. `touchctl_dispatch_requests_total` over all its statuses.
    pub fn metric(&self, name: &str) -> u64 {
        let (code, body) = self.call("GET", "/metrics", None);
        assert_eq!(code, 200, "{body}");
        let text = body["raw"].as_str().expect("the metrics as text");
        text.lines()
            .map(without_node_label)
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let value = if rest.starts_with('{') {
                    rest.split_once("} ")?.1
                } else {
                    rest.strip_prefix(' ')?
                };
                Some(
                    value
                        .parse::<u64>()
                        .unwrap_or_else(|e| panic!("{line}: {e}")),
                )
            })
            .sum()
    }
}

/// A metrics line without its `node` label (daemons sharing a PostgreSQL queue label every
/// series with their node), so a series is named the same whichever backend the daemon runs on.
pub fn without_node_label(line: &str) -> String {
    let Some(start) = line.find("node=\"") else {
        return line.to_string();
    };
    let Some(len) = line[start + 6..].find('"') else {
        return line.to_string();
    };
    let end = start + 6 + len + 1;
    let (before, after) = (&line[..start], &line[end..]);
    match (before.ends_with('{'), after.strip_prefix(',')) {
        (_, Some(rest)) => format!("{before}{rest}"),
        (true, None) if after.starts_with('}') => {
            format!("{}{}", &before[..before.len() - 1], &after[1..])
        }
        _ => format!("{before}{after}"),
    }
}

/// Counts the requests a sink was asked to answer: they arrived, answered or not yet.
#[derive(Clone, Default)]
pub struct Arrivals(Arc<AtomicUsize>);

impl Arrivals {
    /// `answer`, counting each request as it arrives.
    pub fn counting(&self, answer: Arc<Answer>) -> Arc<Answer> {
        let count = self.0.clone();
        Arc::new(move |n, body| {
            count.fetch_add(1, Ordering::SeqCst);
            answer(n, body)
        })
    }

    /// Waits until at least `n` requests arrived; `what` says what never happened otherwise.
    pub fn wait_for(&self, n: usize, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.0.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Answers 200 `{}`, holding the first request (for at most `PATIENCE`) until `gate` is set.
pub fn holding_the_first(gate: Arc<std::sync::atomic::AtomicBool>) -> Arc<Answer> {
    Arc::new(move |n, _| {
        let until = Instant::now() + PATIENCE;
        while n == 0 && !gate.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        (200, Vec::new(), "{}".into(), Duration::ZERO)
    })
}

/// `touchctl dispatch` of `users.ndjson` (in the project) to `touchpoint` of the daemon at
/// `url`, for campaign `c` with the template param `text=hi`; more arguments may follow.
pub fn dispatch_args<'a>(url: &'a str, touchpoint: &'a str) -> Vec<&'a str> {
    vec![
        "dispatch",
        "--url",
        url,
        "--touchpoint",
        touchpoint,
        "--campaign",
        "c",
        "--users",
        "users.ndjson",
        "--param",
        "text=hi",
    ]
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// A running `touchctl sandbox`.
pub struct SandboxProcess {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it printed on standard output, the listening line included.
    pub banner: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Project {
    /// Starts `touchctl sandbox` in the project on a random loopback port, with `args` added;
    /// waits for its "listening" line.
    pub fn start_sandbox(&self, args: &[&str]) -> SandboxProcess {
        let mut all = vec!["sandbox", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut cmd = self.command(&all);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the sandbox");
        let (stdout, stderr) = (
            child.stdout.take().expect("stdout"),
            child.stderr.take().expect("stderr"),
        );
        let (banner, errors) = (
            Arc::new(Mutex::new(String::new())),
            Arc::new(Mutex::new(String::new())),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let out = banner.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                {
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
                if let Some(url) = line.strip_prefix("touchctl sandbox: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let err = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = err.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let Ok(url) = rx.recv_timeout(PATIENCE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the sandbox did not start listening:\n{}{}",
                banner.lock().unwrap(),
                errors.lock().unwrap()
            );
        };
        SandboxProcess {
            child: Some(child),
            url,
            banner,
            stderr: errors,
        }
    }
}

impl SandboxProcess {
    /// Its standard output once it holds `lines` lines (the accounts are printed after the
    /// listening line), waiting for them up to [`PATIENCE`].
    pub fn banner_lines(&self, lines: usize) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let banner = self.banner.lock().unwrap().clone();
            if banner.lines().count() >= lines || std::time::Instant::now() > deadline {
                return banner;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Everything it wrote to standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `GET /_sandbox/messages` with a query (`channel=oa&kind=message`, or empty): the entries.
    pub fn messages(&self, query: &str) -> Vec<Value> {
        let (code, body) = http(
            "GET",
            &format!("{}/_sandbox/messages?{query}", self.url),
            None,
            None,
        );
        assert_eq!(code, 200, "{body}");
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    /// `POST /_sandbox/faults` with a list of rules; returns the active list.
    pub fn faults(&self, rules: &Value) -> Value {
        let (code, body) = http(
            "POST",
            &format!("{}/_sandbox/faults", self.url),
            None,
            Some(("application/json", serde_json::to_vec(rules).unwrap())),
        );
        assert_eq!(code, 200, "{body}");
        body
    }

    /// SIGTERM, then waits for it to exit; returns the exit code.
    pub fn terminate(mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the sandbox did not stop on SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Serves `app` on a random loopback port from a thread of its own until the returned sender is
/// dropped; returns `http://127.0.0.1:PORT`.
pub fn serve_on_loopback(app: axum::Router) -> (String, tokio::sync::oneshot::Sender<()>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        // Two workers: a slow answer does not hold up the others.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
        });
    });
    let addr = addr_rx.recv_timeout(PATIENCE).expect("server address");
    (format!("http://{addr}"), stop_tx)
}
