//! touchctl's own state: where the registry and the queue are created (and where not), the leases
//! on the registry lock and on the queue, what a replay keeps, and what the API refuses to store.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon_support::{PATIENCE, Sink, custom_touchpoint, users};
use crate::support::{Project, Run};

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// Runs a prepared command to completion.
fn finish(mut cmd: Command) -> Run {
    let out = cmd.output().expect("run touchctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the binary with `dir` (inside the project) as the working folder.
fn run_in(p: &Project, dir: &str, args: &[&str]) -> Run {
    let mut cmd = p.command(args);
    cmd.current_dir(p.path().join(dir));
    finish(cmd)
}

/// Every `.touchctl` folder under `root`.
fn state_folders(root: &Path) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == ".touchctl")
        .map(|e| e.path().display().to_string())
        .collect()
}

#[test]
fn a_failing_command_creates_no_state_where_it_was_run() {
    let p = Project::with_samples();
    // Outside the repository (no touchpoints here), and inside `touchpoints/` (no
    // `touchpoints/touchpoints`): each fails, and leaves nothing behind.
    std::fs::create_dir_all(p.path().join("elsewhere")).unwrap();
    for dir in ["elsewhere", "touchpoints"] {
        run_in(&p, dir, &["plan"]).code(1);
        run_in(&p, dir, &["apply", "--auto-approve"]).code(1);
        run_in(&p, dir, &["validate"]).code(1);
        run_in(&p, dir, &["import", "--all"]);
        run_in(&p, dir, &["force-unlock", "a1b2c3d4"])
            .code(1)
            .stderr_has("there is no registry at .touchctl/state.db");
        run_in(&p, dir, &["deliveries", "list"]).code(1);
    }
    // Refused after planning: no terminal to confirm on.
    p.run(&["apply"]).code(1);
    // A read-only command that succeeds: plan against no registry plans from an empty one.
    p.run(&["plan", "--detailed-exitcode"])
        .code(2)
        .stdout_has("Plan: 7 to create, 0 to update, 0 to delete");
    assert_eq!(state_folders(p.path()), Vec::<String>::new());

    // Saving a plan creates the registry it is bound to; applying it writes to that one.
    p.run(&["plan", "--out", "plan.json"]).code(0);
    assert!(p.path().join(".touchctl/state.db").exists());
    p.run(&["apply", "plan.json"])
        .code(0)
        .stdout_has("Apply complete: 7 created");
    assert_eq!(
        state_folders(p.path()),
        [p.path().join(".touchctl").display().to_string()]
    );
}

#[test]
fn a_saved_plan_is_not_applied_where_its_registry_is_missing() {
    let p = Project::with_samples();
    p.run(&["plan", "--out", "plan.json"]).code(0);
    p.run(&["--state", "other/state.db", "apply", "plan.json"])
        .code(1)
        .stderr_has(
            "there is no registry at other/state.db, and this plan was made against registry",
        );
    assert!(!p.path().join("other").exists());
}

#[test]
fn a_touchctl_folder_at_any_depth_does_not_make_the_tree_dirty() {
    let p = Project::with_samples();
    p.git_init();
    // A repository whose .gitignore does not name the state folder.
    p.write(".gitignore", "");
    p.commit_all("no ignores");
    // What a failing command inside `touchpoints/` used to leave.
    p.write("touchpoints/.touchctl/state.db", "");
    p.write("touchpoints/custom/.touchctl/queue.db", "");
    p.run(&["apply", "--auto-approve"])
        .code(0)
        .stdout_has("Apply complete: 7 created");
    // This repository's own .gitignore ignores the state folder at any depth too.
    let ignored = Command::new("git")
        .args(["check-ignore", "-q", "touchpoints/.touchctl/state.db"])
        .current_dir(crate::support::repo_root())
        .status()
        .expect("run git");
    assert!(ignored.success(), "touchpoints/.touchctl/ is not ignored");
}

#[test]
fn an_empty_state_file_is_refused_not_taken_as_a_new_registry() {
    let p = Project::with_samples();
    p.write(".touchctl/state.db", "");
    for args in [&["plan"][..], &["apply", "--auto-approve"]] {
        p.run(args)
            .code(1)
            .stderr_has("the state file .touchctl/state.db is empty (0 bytes)")
            .stderr_has("remove it and run again");
    }
    assert_eq!(p.read(".touchctl/state.db"), "", "left as it was");
    p.remove(".touchctl/state.db");
    p.run(&["apply", "--auto-approve"]).code(0);
    // The queue file alike.
    p.write(".touchctl/queue.db", "");
    p.run(&["deliveries", "list"])
        .code(1)
        .stderr_has("the queue file .touchctl/queue.db is empty (0 bytes)");
    p.run(&["daemon", "--insecure-no-auth", "--listen", "127.0.0.1:0"])
        .code(1)
        .stderr_has("the queue file .touchctl/queue.db is empty (0 bytes)");
    assert_eq!(p.read(".touchctl/queue.db"), "", "left as it was");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_stale_read_only_shm_file_does_not_block_later_writes() {
    let p = Project::with_samples();
    // Permissions bind only a user who is not root: as root, run touchctl as `nobody`.
    // SAFETY: geteuid has no preconditions.
    let nobody = (unsafe { libc::geteuid() } == 0).then_some(65534);
    if let Some(uid) = nobody {
        for entry in walkdir::WalkDir::new(p.path()) {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(uid), Some(uid)).unwrap();
        }
    }
    let run = |args: &[&str]| {
        let mut cmd = p.command(args);
        if let Some(uid) = nobody {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        finish(cmd)
    };
    run(&["apply", "--auto-approve"]).code(0);
    let db = p.path().join(".touchctl/state.db");
    let shm = p.path().join(".touchctl/state.db-shm");
    // The state file made read-only for a while (a backup tool, an operator): a plan then opens
    // it read-only, and SQLite leaves its working files behind with the file's mode.
    set_mode(&db, 0o400);
    run(&["plan"]).code(0).stdout_has("No changes");
    assert_eq!(
        mode(&shm),
        0o400,
        "the read-only open left a read-only -shm"
    );
    set_mode(&db, 0o600);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    run(&["apply", "--auto-approve"])
        .code(0)
        .stdout_has("Apply complete: 0 created, 1 updated");
    run(&["plan"]).code(0).stdout_has("No changes");
}

/// A project with one custom touchpoint `sms` delivering to `sink`, applied.
fn project(sink: &Sink) -> Project {
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 100, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p
}

fn queue_db(p: &Project) -> rusqlite::Connection {
    rusqlite::Connection::open(p.path().join(".touchctl/queue.db")).expect("open the queue")
}

/// The daemon holding the queue: host, pid and lease expiry.
fn holder(p: &Project) -> Option<(String, u32, i64)> {
    use rusqlite::OptionalExtension;
    queue_db(p)
        .query_row(
            "SELECT host, pid, expires_at FROM daemon WHERE singleton = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .expect("read the daemon slot")
}

fn now_ms() -> i64 {
    touchctl::store::now_ms()
}

const DAEMON: [&str; 3] = [
    "--insecure-no-auth",
    "--allow-private-network",
    "--listen=127.0.0.1:0",
];

#[test]
fn a_daemon_killed_on_a_replaced_host_is_taken_over_once_its_lease_expires() {
    let sink = Sink::ok();
    let p = project(&sink);
    let d = p.start_daemon(&["--insecure-no-auth", "--lease-ttl", "8s"], &ENV);
    let (_, _, first) = holder(&p).expect("the daemon holds the queue");
    // The heartbeat renews the lease: wait to see it pushed past the first expiry.
    let deadline = Instant::now() + PATIENCE;
    while holder(&p).expect("held").2 <= first {
        assert!(Instant::now() < deadline, "the lease was never renewed");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill9();
    // The container is gone and a new one, with another host name, starts the daemon: the record
    // left behind names a host this machine is not.
    queue_db(&p)
        .execute("UPDATE daemon SET host = 'replaced-vm'", [])
        .unwrap();
    let (_, pid, expires_at) = holder(&p).unwrap();
    let refused = p.run_env(&[&["daemon"][..], &DAEMON].concat(), &ENV);
    assert!(
        now_ms() < expires_at,
        "the machine was too slow to see the lease before it expired"
    );
    refused
        .code(1)
        .stderr_has(&format!("another daemon (pid {pid} on replaced-vm"))
        .stderr_has("its lease expires at ")
        .stderr_has("touchctl force-unlock --daemon");
    // Once the lease has expired, the successor takes over, saying from whom and why.
    while now_ms() <= expires_at {
        assert!(Instant::now() < deadline, "the lease never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    let log = d.log();
    assert!(
        log.contains(&format!(
            "took over the queue from a daemon that is gone (pid {pid} on replaced-vm"
        )) && log.contains("without being renewed"),
        "{log}"
    );
    let (host, pid2, _) = holder(&p).unwrap();
    assert_eq!(host, touchctl::registry::hostname());
    assert_ne!(pid2, pid);
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
    assert_eq!(holder(&p), None, "a clean stop leaves the queue free");
}

#[test]
fn force_unlock_daemon_releases_the_queue_and_refuses_a_live_daemon_without_force() {
    let sink = Sink::ok();
    let p = project(&sink);
    p.run(&["force-unlock", "--daemon"])
        .code(1)
        .stderr_has("there is no queue file at .touchctl/queue.db");
    let d = p.start_daemon(&["--insecure-no-auth", "--lease-ttl", "3s"], &ENV);
    let (_, pid, _) = holder(&p).unwrap();
    p.run(&["force-unlock", "--daemon"])
        .code(1)
        .stderr_has(&format!("the daemon holding this queue (pid {pid} on "))
        .stderr_has("touchctl force-unlock --daemon --force");
    assert!(holder(&p).is_some());
    p.run(&["force-unlock", "--daemon", "--force"])
        .code(0)
        .stdout_has("Released the queue .touchctl/queue.db from the daemon that held it");
    // The released daemon learns it at its next renewal and stops, so two never work one queue.
    let deadline = Instant::now() + PATIENCE;
    while !d.log().contains("stopped") {
        assert!(
            Instant::now() < deadline,
            "the daemon went on:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, log) = d.terminate();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("this daemon no longer holds the queue (it was taken over or released"),
        "{log}"
    );
    p.run(&["force-unlock", "--daemon"])
        .code(0)
        .stdout_has("No daemon holds the queue .touchctl/queue.db; nothing to release.");
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    assert!(!d.log().contains("took over"), "{}", d.log());
}

#[test]
fn a_registry_lock_left_on_a_replaced_host_is_taken_over_once_its_lease_expires() {
    let p = Project::with_samples();
    p.run(&["apply", "--auto-approve"]).code(0);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    let lock = |expires_at: i64| {
        p.state_db()
            .execute(
                "INSERT OR REPLACE INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at, expires_at) \
                 VALUES (1, 'a1b2c3d4', 'ci@replaced-vm', 4242, 'replaced-vm', 'apply', '2026-01-01T00:00:00Z', ?1)",
                [expires_at],
            )
            .unwrap();
    };
    lock(now_ms() + 600_000);
    p.run(&["apply", "--auto-approve"])
        .code(1)
        .stderr_has("the registry is locked: apply by ci@replaced-vm (pid 4242)")
        .stderr_has("its lease expires at ")
        .stderr_has("`touchctl force-unlock a1b2c3d4`");
    p.run(&["force-unlock", "a1b2c3d4"])
        .code(1)
        .stderr_has("touchctl force-unlock a1b2c3d4 --force");
    p.run(&["force-unlock", "a1b2c3d4", "--force"])
        .code(0)
        .stdout_has("Removed lock a1b2c3d4");
    lock(now_ms() - 1);
    p.run(&["apply", "--auto-approve"])
        .code(0)
        .stderr_has("warning: took over the registry lock (apply by ci@replaced-vm")
        .stderr_has("without being renewed")
        .stdout_has("Apply complete: 0 created, 1 updated");
    let locks: i64 = p.query_one("SELECT count(*) FROM lock");
    assert_eq!(locks, 0, "apply released its lock");
}

#[test]
fn deliveries_replay_keeps_the_earlier_attempts() {
    let sink = Sink::new(Arc::new(|_, _| {
        (
            400,
            Vec::new(),
            "{\"error\":\"unknown template\"}".into(),
            Duration::ZERO,
        )
    }));
    let p = project(&sink);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &ENV);
    let trigger = json!({
        "touchpoint": "sms",
        "campaign": "spring-sale",
        "template_params": {"text": "hi"},
        "users": users(10),
    });
    let (code, r) = d.dispatch(&trigger);
    assert_eq!(code, 202, "{r}");
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_finished(&id)["dead"], 10);
    sink.answer_with(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::ZERO)
    }));
    let batch = format!("{id}_0");
    p.run(&["deliveries", "replay", &batch]).code(0);
    assert_eq!(d.wait_finished(&id)["delivered"], 10);
    let show = p.run(&["deliveries", "show", &batch]);
    show.code(0);
    let lines: Vec<&str> = show.stdout.lines().map(str::trim).collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{}", show.stdout))
    };
    let (first, replayed, second) = (at("#1 "), at("replayed "), at("#2 "));
    assert!(first < replayed && replayed < second, "{}", show.stdout);
    assert!(lines[first].contains("HTTP 400") && lines[first + 1] == "→ dead");
    assert!(lines[replayed].contains("10 recipient(s) due again"));
    assert!(lines[second].contains("HTTP 200") && lines[second + 1] == "→ delivered");
    let json: serde_json::Value = serde_json::from_str(
        &p.run(&["deliveries", "show", &batch, "--format", "json"])
            .code(0)
            .stdout,
    )
    .unwrap();
    assert_eq!(json["attempts"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json["replays"][0]["after_attempt"], 1, "{json}");
    assert_eq!(json["batch"]["attempts"], 2, "{json}");
}

/// `touchctl dispatch` of the project's `users.json` to `sms` at the daemon `url`, with `more`.
fn dispatch_file(p: &Project, url: &str, more: &[&str]) -> Run {
    let mut args = vec![
        "dispatch",
        "--url",
        url,
        "--touchpoint",
        "sms",
        "--campaign",
        "c",
        "--param",
        "text=hi",
        "--users",
        "users.json",
    ];
    args.extend_from_slice(more);
    p.run(&args)
}

#[test]
fn a_duplicate_attribute_or_user_id_key_in_a_user_is_refused() {
    let sink = Sink::ok();
    let p = project(&sink);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &ENV);
    let head = r#"{"touchpoint":"sms","campaign":"c","template_params":{"text":"hi"}}"#;
    for (user, key) in [
        (
            r#"{"user_id":"u1","attributes":{"phone":"1","member_id":"m","phone":"2"}}"#,
            "attribute `phone`",
        ),
        (
            r#"{"user_id":"u1","user_id":"u2","attributes":{"phone":"1","member_id":"m"}}"#,
            "key `user_id`",
        ),
        (
            r#"{"user_id":"u1","attributes":{"phone":"1","member_id":"m"},"attributes":{}}"#,
            "key `attributes`",
        ),
    ] {
        let json = format!(r#"{{{},"users":[{user}]}}"#, &head[1..head.len() - 1]);
        for (content_type, body) in [
            ("application/json", json),
            ("application/x-ndjson", format!("{head}\n{user}\n")),
        ] {
            let (code, answer) = d.call(
                "POST",
                "/v1/dispatch",
                Some((content_type, body.into_bytes())),
            );
            assert_eq!(code, 400, "{content_type} {user}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("duplicate {key}")),
                "{content_type}: {answer}"
            );
        }
    }
    // The client refuses such a file before sending anything.
    p.write(
        "users.json",
        r#"[{"user_id":"u1","attributes":{"phone":"1","phone":"2"}}]"#,
    );
    dispatch_file(&p, &d.url, &[])
        .code(1)
        .stderr_has("duplicate attribute `phone`");
    assert!(sink.received().is_empty());
}

#[test]
fn an_idempotency_key_longer_than_256_bytes_is_refused() {
    let sink = Sink::ok();
    let p = project(&sink);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &ENV);
    let send = |key: &str| {
        d.dispatch(&json!({
            "touchpoint": "sms",
            "campaign": "c",
            "idempotency_key": key,
            "template_params": {"text": "hi"},
            "users": users(1),
        }))
    };
    for key in [
        "k".repeat(1024 * 1024),
        "k".repeat(257),
        "a\nb".into(),
        String::new(),
    ] {
        let (code, answer) = send(&key);
        assert_eq!(code, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "bad_idempotency_key", "{answer}");
    }
    let (_, answer) = send(&"k".repeat(257));
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("257 bytes long; it takes at most 256"),
        "{answer}"
    );
    let stored: i64 = queue_db(&p)
        .query_row("SELECT count(*) FROM dispatches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0, "nothing was stored");
    let (code, answer) = send(&"k".repeat(256));
    assert_eq!(code, 202, "{answer}");
    // The client says so before sending, counting the `#N` it adds to each part's key.
    p.write("users.json", &serde_json::to_string(&users(3)).unwrap());
    let key = "k".repeat(255);
    dispatch_file(
        &p,
        &d.url,
        &["--per-trigger", "1", "--idempotency-key", &key],
    )
    .code(1)
    .stderr_has("at most 256 bytes");
}
