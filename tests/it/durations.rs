//! Time and answers at the edges of delivery, end to end: a `Retry-After` that overflows or lies
//! centuries ahead, a daemon stopped while an endpoint hangs, a 2xx whose `failed` list cannot be
//! read, and a batch whose recipients all failed. (Duration fields out of range are bad fixtures.)

use std::io::Read;
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, PATIENCE, Sink, custom_touchpoint, users};
use crate::support::Project;

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// A project whose touchpoint `sms` (batches of 100) sends to `url`, applied; `extra` is added to
/// its file.
fn applied(url: &str, extra: &str) -> Project {
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", url, 100, extra),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p
}

fn start(p: &Project, more: &[&str]) -> Daemon {
    let mut args = vec!["--insecure-no-auth", "--allow-private-network"];
    args.extend_from_slice(more);
    p.start_daemon(&args, &ENV)
}

/// Sends `n` users to `sms`; returns the dispatch id.
fn send(d: &Daemon, n: usize) -> String {
    let (code, r) = d.dispatch(&json!({
        "touchpoint": "sms",
        "campaign": "spring-sale",
        "template_params": {"text": "hi"},
        "users": users(n),
    }));
    assert_eq!(code, 202, "{r}");
    r["dispatch_id"].as_str().expect("dispatch id").to_string()
}

/// Sends 10 users to `sink` through a daemon, waits until the dispatch is finished and checks how
/// many recipients were delivered and failed; returns the project and the dispatch's status.
fn ten_users_to(sink: &Sink, delivered: u64, failed: u64) -> (Project, Value) {
    let p = applied(&sink.url, "");
    let d = start(&p, &[]);
    let id = send(&d, 10);
    let s = d.wait_finished(&id);
    assert_eq!(
        (s["delivered"].as_u64(), s["failed"].as_u64()),
        (Some(delivered), Some(failed)),
        "{s}"
    );
    (p, s)
}

/// An endpoint that takes connections, reads what comes and never answers.
struct Hang {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Hang {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    // Until the client closes the connection: a request counts once its headers
                    // are in; nothing is ever sent back.
                    let mut tail: Vec<u8> = Vec::new();
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        tail.extend_from_slice(&buf[..n]);
                        if tail.windows(4).any(|w| w == b"\r\n\r\n") {
                            seen.fetch_add(1, Ordering::SeqCst);
                            tail.clear();
                        }
                        // Only the last bytes matter for finding the end of the headers.
                        let keep = tail.len().saturating_sub(3);
                        tail.drain(..keep);
                    }
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            requests,
            stop,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

/// Waits, for at most `PATIENCE`, until `done` holds.
#[track_caller]
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_with_a_hanging_endpoint_exits_after_the_drain_timeout_and_the_batch_goes_after_restart()
{
    let hang = Hang::new();
    // The longest timeout a touchpoint may have: stopping must not wait for it.
    let p = applied(&hang.url, "timeout = \"5m\"\n");
    let d = start(&p, &["--drain-timeout", "1s"]);
    let id = send(&d, 10);
    wait_until("the endpoint never got the batch", || hang.requests() >= 1);
    let asked = Instant::now();
    let (code, log) = d.terminate();
    let took = asked.elapsed();
    assert_eq!(code, 0, "{log}");
    assert!(
        took < Duration::from_secs(8),
        "stopping took {took:?} with --drain-timeout 1s:\n{log}"
    );
    assert!(
        log.contains("1 request(s) still in flight after the drain timeout (1s): cut off and recorded as interrupted"),
        "{log}"
    );
    let batch = format!("{id}_0");
    let show = p.run(&["deliveries", "show", &batch]);
    show.code(0)
        .stdout_has(": pending")
        .stdout_has("10 remaining")
        .stdout_has("#1 ")
        .stdout_has("drain timeout (1s) ran out before the endpoint answered")
        .stdout_has("→ interrupted");

    // Restarted against an endpoint that answers, the batch goes, under the same webhook-id.
    let sink = Sink::ok();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 100, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = start(&p, &[]);
    let s = d.wait_finished(&id);
    assert_eq!(s["delivered"], 10, "{s}");
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["webhook-id"], batch);
    let show = p.run(&["deliveries", "show", &batch]);
    show.code(0)
        .stdout_has(": delivered")
        .stdout_has("→ interrupted")
        .stdout_has("#2 ")
        .stdout_has("→ delivered");
}

#[test]
fn a_retry_after_of_u64_max_seconds_or_in_the_year_2999_waits_max_backoff() {
    let sink = Sink::new(Arc::new(|n, _| match n {
        0 => (
            429,
            vec![("retry-after", "18446744073709551615".to_string())],
            String::new(),
            Duration::ZERO,
        ),
        1 => (
            503,
            vec![("retry-after", "Tue, 01 Jan 2999 00:00:00 GMT".to_string())],
            String::new(),
            Duration::ZERO,
        ),
        _ => (200, Vec::new(), "{}".into(), Duration::ZERO),
    }));
    // `max_backoff = "200ms"`: no wait may be longer, and with these answers none is shorter.
    ten_users_to(&sink, 10, 0);
    let got = sink.received();
    assert_eq!(got.len(), 3);
    for pair in got.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            (Duration::from_millis(150)..Duration::from_secs(10)).contains(&gap),
            "retried after {gap:?}, not after max_backoff (200ms)"
        );
    }
}

#[test]
fn a_2xx_with_an_invalid_failed_list_is_retried_as_a_malformed_answer() {
    let sink = Sink::new(Arc::new(|n, _| {
        let body = if n == 0 {
            r#"{"failed": "everyone"}"#
        } else {
            "{}"
        };
        (200, Vec::new(), body.into(), Duration::ZERO)
    }));
    let (p, s) = ten_users_to(&sink, 10, 0);
    let got = sink.received();
    assert_eq!(got.len(), 2, "the whole batch is sent again");
    assert_eq!(got[1].body["recipients"].as_array().map(Vec::len), Some(10));
    p.run(&[
        "deliveries",
        "show",
        &format!("{}_0", s["dispatch_id"].as_str().unwrap()),
    ])
    .code(0)
    .stdout_has("HTTP 200 with a malformed answer: `failed` is a string, not a list")
    .stdout_has("the whole batch is tried again")
    .stdout_has("→ retry")
    .stdout_has("→ delivered");
}

#[test]
fn a_batch_whose_recipients_all_failed_shows_failed_not_delivered() {
    let sink = Sink::new(Arc::new(|_, body: &Value| {
        let failed: Vec<Value> = body["recipients"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| json!({"user_id": r["user_id"], "reason": "number on the blocklist"}))
            .collect();
        let answer = json!({ "failed": failed }).to_string();
        (200, Vec::new(), answer, Duration::ZERO)
    }));
    let (p, s) = ten_users_to(&sink, 0, 10);
    assert_eq!(s["batches"]["failed"], 1, "{s}");
    assert_eq!(s["batches"]["delivered"], 0, "{s}");
    let batch = format!("{}_0", s["dispatch_id"].as_str().unwrap());
    let list = p.run(&["deliveries", "list"]);
    list.code(0);
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&batch))
        .unwrap_or_else(|| panic!("no {batch} in\n{}", list.stdout));
    assert_eq!(row.split_whitespace().nth(2), Some("failed"), "{row}");
    p.run(&["deliveries", "list", "--status", "failed"])
        .code(0)
        .stdout_has(&batch);
    p.run(&["deliveries", "list", "--status", "delivered"])
        .code(0)
        .stdout_has("No batches match.");
    p.run(&["deliveries", "show", &batch])
        .code(0)
        .stdout_has(": failed (every recipient failed for good; none was delivered)")
        .stdout_has("0 delivered, 10 failed")
        .stdout_has("→ failed");
}

#[test]
fn daemon_interval_0s_is_refused_instead_of_starting_without_its_timer() {
    let p = Project::empty();
    let mut child = p
        .command(&[
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--insecure-no-auth",
            "--interval",
            "0s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start touchctl");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`daemon --interval 0s` started instead of refusing the flag");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "invalid value '0s' for '--interval <DURATION>': 0s is too short: give at least 1s"
        ),
        "{stderr}"
    );
}

#[test]
fn a_live_timeout_of_0s_from_an_older_version_holds_the_touchpoint_until_applied_again() {
    let sink = Sink::ok();
    let p = applied(&sink.url, "");
    // What an older touchctl let through, and applied.
    p.state_db()
        .execute(
            "UPDATE touchpoints SET spec = json_set(spec, '$.timeout', '0s') WHERE id = 'sms'",
            [],
        )
        .expect("tamper with the registry");
    let d = start(&p, &[]);
    let sms = |d: &Daemon| {
        let (code, body) = d.call("GET", "/v1/touchpoints", None);
        assert_eq!(code, 200, "{body}");
        body["touchpoints"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["id"] == "sms"))
            .cloned()
            .unwrap_or_else(|| panic!("no sms in {body}"))
    };
    let held = sms(&d);
    assert_eq!(held["ready"], false, "{held}");
    let reason = held["held"].as_str().unwrap_or_default();
    assert!(
        reason.contains("`0s` is out of range: write a duration from 1s to 5m")
            && reason.contains("correct its file and apply it"),
        "{reason}"
    );
    // Applying the file (timeout 15s by default) makes it live again.
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    wait_until("sms never became ready", || sms(&d)["ready"] == true);
    let id = send(&d, 10);
    assert_eq!(d.wait_finished(&id)["delivered"], 10);
}
