//! The daemon's server against hostile input: endpoints behind IPv6 forms of private addresses,
//! connection floods at a low open-file limit, many large triggers at once, weak API tokens.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, PATIENCE, Sink, custom_touchpoint, http, users};
use crate::support::{Project, Run};

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// Each IPv6 form of a private IPv4 address in a touchpoint's URL (an IP literal, which the HTTP
/// client connects to without asking its resolver) is refused before any request, saying why.
#[test]
fn ipv6_forms_of_private_addresses_are_refused() {
    let forms = [
        ("compat", "[::127.0.0.1]"),
        ("translated", "[::ffff:0:127.0.0.1]"),
        ("nat64", "[64:ff9b::127.0.0.1]"),
        ("sixtofour", "[2002:7f00:1::]"),
        ("mapped", "[::ffff:127.0.0.1]"),
    ];
    let p = Project::empty();
    for (id, host) in forms {
        p.write(
            &format!("touchpoints/{id}.toml"),
            &custom_touchpoint(id, &format!("http://{host}:9"), 100, ""),
        );
    }
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    for (id, host) in forms {
        let (code, r) = d.dispatch(&json!({
            "touchpoint": id,
            "campaign": "c",
            "template_params": {"text": "hi"},
            "users": users(2),
        }));
        assert_eq!(code, 202, "{r}");
        let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
        assert_eq!(s["dead"], 2, "{id}: {s}");
        let list = p.run(&["deliveries", "list", "--touchpoint", id, "--format", "json"]);
        let batches: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        let batch = &batches[0];
        assert_eq!(
            batch["attempts"], 1,
            "{id}: refused at once, not retried: {batch}"
        );
        let error = batch["last_error"].as_str().unwrap_or_default();
        let bare = host.trim_matches(['[', ']']);
        assert!(
            error.starts_with("refused: [") && error.contains("--allow-private-network"),
            "{id} ({bare}): {error}"
        );
    }
}

/// A token a client could guess (one character was accepted), or one no client could send, keeps
/// the daemon from starting, with how to make a good one; a good one works.
#[test]
fn a_short_api_token_is_refused() {
    let p = Project::empty();
    let daemon = ["daemon", "--listen", "127.0.0.1:0"];
    for token in ["x", "0123456789abcdef0123456789abcde"] {
        refused_start(&p, &daemon, &[("TOUCHCTL_API_TOKEN", token)])
            .stderr_has(&format!(
                "the API token is {} characters long; it must be at least 32, from a random source: make one with `openssl rand -hex 32`",
                token.len()
            ));
    }
    p.write("api-token", "short\n");
    let with_file = [&daemon[..], &["--api-token-file", "api-token"]].concat();
    refused_start(&p, &with_file, &[]).stderr_has("the API token is 5 characters long");
    p.write("api-token", "0123456789abcdef 0123456789abcdef\n");
    let with_file = [&daemon[..], &["--api-token-file", "api-token"]].concat();
    refused_start(&p, &with_file, &[])
        .stderr_has("the API token may hold only visible ASCII characters");

    let good = "0123456789abcdef0123456789abcdef";
    let d = p.start_daemon(&[], &[("TOUCHCTL_API_TOKEN", good)]);
    let status = |token| http("GET", &format!("{}/v1/status", d.url), token, None).0;
    assert_eq!(status(Some(good)), 200);
    assert_eq!(status(None), 401);
}

/// Runs `touchctl` expecting it to refuse to start: its output once it exits with code 1. Fails
/// as soon as it listens instead.
fn refused_start(p: &Project, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = p.command(args);
    cmd.env_remove("TOUCHCTL_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start touchctl");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut log = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                if line.contains("listening on") {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("`touchctl {}` started:\n{log}{line}", args.join(" "));
                }
                log.push_str(&line);
                log.push('\n');
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                let run = Run {
                    code: status.code().unwrap_or(-1),
                    stdout: String::new(),
                    stderr: log,
                };
                run.code(1);
                return run;
            }
        }
        assert!(
            Instant::now() < deadline,
            "touchctl neither started nor stopped:\n{log}"
        );
    }
}

/// The daemon `touchctl daemon --insecure-no-auth` with `more` arguments, limited to 128 open files.
fn daemon_with_few_files(p: &Project, more: &[&str]) -> Daemon {
    let mut args = vec!["daemon", "--listen", "127.0.0.1:0", "--insecure-no-auth"];
    args.extend_from_slice(more);
    let mut cmd = p.command(&args);
    cmd.env_remove("TOUCHCTL_API_TOKEN").stdout(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 128,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    p.spawn_daemon(cmd)
}

/// `n` connections to the daemon that send nothing.
fn idle_connections(d: &Daemon, n: usize) -> Vec<TcpStream> {
    let addr = d.url.trim_start_matches("http://");
    (0..n)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect()
}

/// CPU time (user and system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The fields after the command name (which may hold spaces) start with the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks.
    let after = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The CPU time the process uses over `window`, against the wall clock.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (cpu, wall) = (cpu_time(pid), Instant::now());
    std::thread::sleep(window);
    (cpu_time(pid) - cpu).as_secs_f64() / wall.elapsed().as_secs_f64()
}

/// Waits until the daemon's log holds `text`.
fn wait_for_log(d: &Daemon, text: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !d.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the daemon never logged {text:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Out of file descriptors (a cap above the open-file limit, and 300 idle connections at a limit
/// of 128), the accept loop pauses instead of spinning a core, says what to do, and serves again
/// once connections close.
#[test]
fn accept_loop_on_emfile_does_not_spin() {
    let p = Project::empty();
    let d = daemon_with_few_files(&p, &["--max-connections", "1000"]);
    assert!(
        d.log()
            .contains("--max-connections 1000 is more than half the open-file limit (128)"),
        "{}",
        d.log()
    );
    let flood = idle_connections(&d, 300);
    wait_for_log(&d, "out of file descriptors");
    let share = cpu_share(d.pid(), Duration::from_secs(3));
    assert!(
        share < 0.2,
        "the daemon used {:.0}% of a core while out of file descriptors:\n{}",
        share * 100.0,
        d.log()
    );
    drop(flood);
    let (code, _) = d.call("GET", "/v1/status", None);
    assert_eq!(code, 200);
}

/// With the default cap (half the open-file limit), a flood of idle connections never uses up the
/// descriptors: the API answers while the flood is held (each idle connection is closed after
/// --client-timeout, making room for the next), and the daemon stays idle meanwhile.
#[test]
fn a_flood_of_idle_connections_does_not_starve_the_api() {
    let p = Project::empty();
    let d = daemon_with_few_files(&p, &["--client-timeout", "1s"]);
    let flood = idle_connections(&d, 300);
    wait_for_log(&d, "all 64 API connections are in use (--max-connections)");
    let share = cpu_share(d.pid(), Duration::from_secs(2));
    let (code, _) = d.call("GET", "/v1/status", None);
    assert_eq!(code, 200);
    drop(flood);
    assert!(
        share < 0.2,
        "the daemon used {:.0}% of a core",
        share * 100.0
    );
    assert!(
        !d.log().contains("cannot accept"),
        "the cap kept descriptors free:\n{}",
        d.log()
    );
}

/// A memory figure of the process from /proc/PID/status (`VmRSS`, `VmHWM`), in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

/// Many large triggers at once are held within `--max-body-memory`: those past it get 503 with
/// Retry-After before their bodies are buffered, the others are stored whole, and the daemon's
/// peak memory stays far below the sum of the bodies (24 triggers of 62 MB took 2.25 GB).
#[test]
fn concurrent_large_triggers_are_bounded_by_the_body_memory() {
    const MIB: usize = 1024 * 1024;
    const TRIGGERS: usize = 32;
    let sink = Sink::ok();
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 500, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let (max_body, budget) = (8 * MIB, 16 * MIB);
    let d = p.start_daemon(
        &[
            "--insecure-no-auth",
            "--allow-private-network",
            "--max-body",
            &max_body.to_string(),
            "--max-body-memory",
            &budget.to_string(),
        ],
        &ENV,
    );
    let idle = memory(d.pid(), "VmRSS");
    // About 7.5 MB: 6,000 users with a 1 KB attribute each.
    let pad = "x".repeat(1200);
    let users: Vec<Value> = users(6000)
        .into_iter()
        .map(|mut u| {
            u["attributes"]["note"] = pad.as_str().into();
            u
        })
        .collect();
    let body = serde_json::to_vec(&json!({
        "touchpoint": "sms",
        "campaign": "big",
        "template_params": {"text": "hi"},
        "users": users,
    }))
    .unwrap();
    assert!(
        body.len() > 7 * MIB && body.len() < max_body,
        "{}",
        body.len()
    );
    let body = axum::body::Bytes::from(body);
    let start = Arc::new(Barrier::new(TRIGGERS));
    let url = format!("{}/v1/dispatch", d.url);
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|s| {
        let posts: Vec<_> = (0..TRIGGERS)
            .map(|_| {
                let (start, body, url) = (start.clone(), body.clone(), url.clone());
                s.spawn(move || {
                    start.wait();
                    post(&url, body)
                })
            })
            .collect();
        posts.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let peak = memory(d.pid(), "VmHWM");
    // Storing a trigger takes a few times its body for as long as it is worked on (measured:
    // 86 to 98 MiB here, and 346 MiB without the budget).
    let grew = peak.saturating_sub(idle);
    assert!(
        grew < 10 * budget as u64,
        "the daemon grew by {} MiB for {TRIGGERS} triggers of {} MiB with a budget of {} MiB",
        grew / MIB as u64,
        body.len() / MIB,
        budget / MIB
    );
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|a| a.0 == 202)
        .map(|a| &a.2)
        .collect();
    let refused: Vec<&(u16, Option<String>, Value)> =
        answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(
        accepted.len() + refused.len(),
        TRIGGERS,
        "every answer is 202 or 503: {:?}",
        answers.iter().map(|a| (a.0, &a.2)).collect::<Vec<_>>()
    );
    assert!(!accepted.is_empty(), "some triggers fit");
    assert!(!refused.is_empty(), "some triggers did not fit");
    for r in accepted {
        assert_eq!(r["accepted"], 6000, "{r}");
    }
    for (_, retry_after, e) in &refused {
        assert_eq!(e["error"]["code"], "body_memory_full", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-body-memory"),
            "{e}"
        );
        assert_eq!(retry_after.as_deref(), Some("2"));
    }
}

/// A budget that could never hold the largest body accepted is refused at start, saying which
/// flag to change.
#[test]
fn a_body_memory_smaller_than_the_largest_body_is_refused() {
    let p = Project::empty();
    let args = [
        "daemon",
        "--listen",
        "127.0.0.1:0",
        "--insecure-no-auth",
        "--max-body",
        "2000",
        "--max-body-memory",
        "1000",
    ];
    refused_start(&p, &args, &[]).stderr_has(
        "--max-body-memory (1000 bytes) is smaller than --max-body (2000 bytes), so the largest trigger could never be read",
    );
}

/// One `POST` of a JSON body: status, `Retry-After`, JSON answer.
fn post(url: &str, body: axum::body::Bytes) -> (u16, Option<String>, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let response = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("an answer");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.text().await.unwrap_or_default();
        let answer = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        (status, retry_after, answer)
    })
}
