//! What a touchpoint file may read as a secret, and what a saved plan may apply: the findings of
//! issue 22 about secret references and saved plans, each pinned by a test named after it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::{Backend, on_both_backends};
use crate::daemon_support::{Daemon, PATIENCE, Sink, custom_touchpoint, http, users};
use crate::support::{Project, Run};

// What only the registry decides runs on each of its backends; the rest reads files or runs the
// daemon, whose queue is the SQLite file.
on_both_backends!(a_tampered_saved_plan_is_refused_naming_the_touchpoint);

/// A project whose one touchpoint, `sms`, reads its token through `reference` (on line 6).
fn with_reference(reference: &str) -> Project {
    let p = Project::empty();
    write_sms(&p, reference);
    p
}

fn write_sms(p: &Project, reference: &str) {
    p.write(
        "touchpoints/sms.toml",
        &format!(
            "id = \"sms\"\nname = \"短信\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"https://sms.example.com/hook\"\nauth_token = {reference}\n"
        ),
    );
}

/// Runs `args` in `p`, failing the test if it does not end within `PATIENCE` (a read that blocks
/// would hang the command for ever).
fn run_bounded(p: &Project, args: &[&str]) -> Run {
    let mut child = p
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run touchctl");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("touchctl {args:?} did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Waits until the daemon lists `id` as held with a reason containing `reason`; returns it.
fn wait_held(d: &Daemon, token: Option<&str>, id: &str, reason: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, body) = http("GET", &format!("{}/v1/touchpoints", d.url), token, None);
        assert_eq!(code, 200, "{body}");
        let entry = body["touchpoints"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["id"] == id))
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(held) = entry["held"].as_str()
            && held.contains(reason)
        {
            assert_eq!(entry["ready"], false, "{entry}");
            return held.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "`{id}` was never held for {reason:?}: {entry}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A trigger for the `sms` touchpoint of `custom_touchpoint`.
fn trigger() -> Value {
    json!({
        "touchpoint": "sms",
        "campaign": "spring-sale",
        "template_params": {"text": "hello"},
        "users": users(3),
    })
}

/// A project whose touchpoint `sms` sends to `sink` with the token read from `secrets/NAME`, which
/// holds `token`; applied.
fn applied_with_token_file(sink: &Sink, name: &str, token: &str) -> Project {
    let p = Project::empty();
    p.write(&format!("secrets/{name}"), token);
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 10, "").replace(
            "{ env = \"SINK_TOKEN\" }",
            &format!("{{ file = \"../secrets/{name}\" }}"),
        ),
    );
    p.run(&["apply", "--auto-approve"]).code(0);
    p
}

#[test]
fn secret_file_outside_the_repository_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("token"), "outside-secret-value\n").unwrap();
    let absolute = outside.path().join("token").display().to_string();
    let climbing = format!("{}{}", "../".repeat(30), absolute.trim_start_matches('/'));
    let p = with_reference("{ env = \"UNUSED\" }");
    std::os::unix::fs::symlink(&absolute, p.path().join("touchpoints/link")).unwrap();
    for file in [absolute.as_str(), climbing.as_str(), "link", "/etc/passwd"] {
        write_sms(&p, &format!("{{ file = \"{file}\" }}"));
        let run = p.run(&["plan"]);
        let shown = std::path::Path::new("touchpoints").join(file);
        run.code(1).stdout_has(&format!(
            "touchpoints/sms.toml:6:23: error[secret-source-refused]: `auth_token` {{ file = \"{file}\" }}: secret file {} resolves to ",
            shown.display()
        ));
        run.stdout_has("outside the repository");
        run.stdout_has("--secrets-dir");
        assert!(!run.all().contains("outside-secret-value"), "{}", run.all());
        assert!(!run.all().contains("root:"), "{}", run.all());
    }
    // An operator who keeps secrets there says so, and then the same reference is read.
    write_sms(&p, &format!("{{ file = \"{absolute}\" }}"));
    let secrets_dir = outside.path().display().to_string();
    p.run(&["--secrets-dir", &secrets_dir, "plan"])
        .code(0)
        .stdout_has("+ create sms");
    p.run_env(&["plan"], &[("TOUCHCTL_SECRETS_DIR", &secrets_dir)])
        .code(0);
}

#[test]
fn secret_files_inside_the_git_repository_are_read() {
    // In git, the repository is the whole work tree, not only the touchpoint folder.
    let p = with_reference("{ file = \"../config/token\" }");
    p.write("config/token", "in-repo-token\n");
    p.git_init();
    p.run(&["plan"]).code(0).stdout_has("+ create sms");
}

#[test]
fn touchctl_variables_are_never_a_secret_source() {
    let p = with_reference("{ env = \"TOUCHCTL_API_TOKEN\" }");
    let env = [("TOUCHCTL_API_TOKEN", "the-daemons-own-api-token-0123456789")];
    let expected = "touchpoints/sms.toml:6:22: error[secret-source-refused]: `auth_token`: `TOUCHCTL_API_TOKEN` is one of touchctl's own variables (TOUCHCTL_*), which are never a secret source";
    for args in [&["validate"][..], &["plan"], &["apply", "--auto-approve"]] {
        let run = p.run_env(args, &env);
        run.code(1).stdout_has(expected);
        assert!(!run.all().contains("the-daemons-own-api-token-0123456789"));
    }
    if p.path().join(".touchctl/state.db").exists() {
        assert_eq!(p.touchpoint_count(), 0);
    }
}

/// The finding itself: a live touchpoint naming `TOUCHCTL_API_TOKEN` (applied by an older
/// touchctl, here written into the registry directly) got the daemon's own token sent to its URL.
#[test]
fn the_daemons_api_token_is_never_sent_to_a_touchpoint() {
    let sink = Sink::ok();
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 10, ""),
    );
    p.run_env(
        &["apply", "--auto-approve"],
        &[("SINK_TOKEN", "sink-token")],
    )
    .code(0);
    p.state_db()
        .execute(
            "UPDATE touchpoints SET spec = replace(spec, 'SINK_TOKEN', 'TOUCHCTL_API_TOKEN')",
            [],
        )
        .unwrap();
    let token = "the-daemons-own-api-token-0123456789";
    let d = p.start_daemon(
        &["--allow-private-network"],
        &[("TOUCHCTL_API_TOKEN", token), ("SINK_TOKEN", "sink-token")],
    );
    let held = wait_held(&d, Some(token), "sms", "never a secret source");
    assert!(held.contains("`auth_token`"), "{held}");
    let (code, body) = http(
        "POST",
        &format!("{}/v1/dispatch", d.url),
        Some(token),
        Some(("application/json", serde_json::to_vec(&trigger()).unwrap())),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.to_string().contains("never a secret source"), "{body}");
    assert!(sink.received().is_empty());
    assert!(!d.log().contains(token));
}

#[test]
fn the_daemons_api_token_file_is_never_a_secret_source() {
    let sink = Sink::ok();
    // Planning alone cannot know which file a daemon will use for its token.
    let p = applied_with_token_file(
        &sink,
        "api-token",
        "api-token-from-a-file-0123456789abcdef\n",
    );
    let d = p.start_daemon(
        &[
            "--allow-private-network",
            "--api-token-file",
            "secrets/api-token",
        ],
        &[],
    );
    wait_held(
        &d,
        Some("api-token-from-a-file-0123456789abcdef"),
        "sms",
        "is the daemon's API token file, which is never a secret source",
    );
}

#[test]
fn secret_env_outside_the_allow_list_is_refused() {
    let p = with_reference("{ env = \"SHELL_SECRET\" }");
    let secret = ("SHELL_SECRET", "a-value-from-the-shell");
    let run = p.run_env(
        &["plan"],
        &[
            secret,
            ("TOUCHCTL_SECRET_ENV_ALLOW", "SMS_*,WECHAT_APP_SECRET"),
        ],
    );
    run.code(1).stdout_has(
        "touchpoints/sms.toml:6:22: error[secret-source-refused]: `auth_token` { env = \"SHELL_SECRET\" }: environment variable SHELL_SECRET is not in the allow-list of secret variables (SMS_*, WECHAT_APP_SECRET, set by --secret-env-allow or TOUCHCTL_SECRET_ENV_ALLOW)",
    );
    assert!(!run.all().contains("a-value-from-the-shell"));
    p.run_env(&["--secret-env-allow", "SMS_*", "plan"], &[secret])
        .code(1)
        .stdout_has("is not in the allow-list");
    p.run_env(&["--secret-env-allow", "SMS_*,SHELL_*", "plan"], &[secret])
        .code(0);
    p.run_env(&["plan"], &[secret]).code(0);
    p.run(&["--secret-env-allow", "SMS-*", "plan"])
        .code(1)
        .stderr_has("`SMS-*` is not a variable name or a prefix ending in `*`");
}

#[test]
fn secret_file_that_is_a_fifo_is_refused_without_hanging() {
    let p = with_reference("{ file = \"../secrets/fifo\" }");
    std::fs::create_dir_all(p.path().join("secrets")).unwrap();
    mkfifo(&p.path().join("secrets/fifo"));
    let run = run_bounded(&p, &["plan"]);
    run.code(1).stdout_has(
        "touchpoints/sms.toml:6:23: error[secret-source-refused]: `auth_token` { file = \"../secrets/fifo\" }: secret file touchpoints/../secrets/fifo is a FIFO (named pipe), not a regular file",
    );
}

/// A FIFO made the daemon's refresh block for ever, so it ignored SIGTERM.
#[test]
fn a_fifo_secret_holds_the_touchpoint_and_the_daemon_still_stops() {
    let sink = Sink::ok();
    let p = applied_with_token_file(&sink, "token", "sink-token\n");
    p.remove("secrets/token");
    mkfifo(&p.path().join("secrets/token"));
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &[]);
    wait_held(
        &d,
        None,
        "sms",
        "is a FIFO (named pipe), not a regular file",
    );
    let (code, log) = d.terminate();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn secret_file_larger_than_the_bound_or_a_device_is_refused() {
    let p = with_reference("{ file = \"../secrets/big\" }");
    p.write("secrets/big", &"x".repeat(8 * 1024 + 1));
    let run = run_bounded(&p, &["plan"]);
    run.code(1).stdout_has(
        "error[secret-source-refused]: `auth_token` { file = \"../secrets/big\" }: secret file touchpoints/../secrets/big holds more than 8192 bytes, the most a secret may have",
    );
    // /dev/zero never ends: even in an allowed folder, a device is refused before it is read.
    write_sms(&p, "{ file = \"/dev/zero\" }");
    let run = run_bounded(&p, &["--secrets-dir", "/dev", "plan"]);
    run.code(1)
        .stdout_has("secret file /dev/zero is a device, not a regular file");
    // At the bound, a file is read.
    p.write("secrets/big", &"x".repeat(8 * 1024));
    write_sms(&p, "{ file = \"../secrets/big\" }");
    run_bounded(&p, &["plan"]).code(0);
}

#[test]
fn new_touchpoints_url_and_secret_references_are_risks_in_review() {
    let p = Project::empty();
    p.write(
        "touchpoints/points.toml",
        "id = \"points\"\nname = \"积分\"\nkind = \"custom\"\ncategory = \"benefit\"\nurl = \"https://points.example.com/hook\"\nauth_token = { env = \"POINTS_TOKEN\" }\n",
    );
    p.git_init();
    p.write(
        "touchpoints/exfil.toml",
        "id = \"exfil\"\nname = \"x\"\nkind = \"custom\"\ncategory = \"other\"\nurl = \"https://collector.example.net/in\"\nauth_token = { env = \"POINTS_TOKEN\" }\nsigning_secret = { file = \"../touchpoints/points.toml\" }\n",
    );
    p.commit_all("a new touchpoint");
    let run = p.run(&["plan", "--base", "HEAD~1", "--format", "markdown"]);
    run.code(0)
        .stdout_has("⚠️ **1 risky change(s)**")
        .stdout_has("| `exfil` | custom | create | ⚠️ `auth_token`, `signing_secret`, `url` |");
    let json = p.run(&["plan", "--base", "HEAD~1", "--format", "json"]);
    let doc: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        doc["changes"][0]["risks"],
        json!(["auth_token", "signing_secret", "url"])
    );
}

/// The sample project, applied, with an sms update saved as `plan.json`; returns the plan.
fn saved_update(b: Backend) -> (Project, Value) {
    let p = Project::with_samples_on(b);
    p.run(&["apply", "--auto-approve"]).code(0);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.run(&["plan", "--out", "plan.json"]).code(0);
    let plan = serde_json::from_str(&p.read("plan.json")).unwrap();
    (p, plan)
}

fn change_of<'a>(plan: &'a mut Value, id: &str) -> &'a mut Value {
    plan["changes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no change {id}"))
}

fn a_tampered_saved_plan_is_refused_naming_the_touchpoint(b: Backend) {
    let (p, original) = saved_update(b);
    let live_sms = || -> String { p.query_one("SELECT spec FROM touchpoints WHERE id = 'sms'") };
    let before = live_sms();
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit, &str); 6] = [
        (
            "desired.url",
            |plan| {
                let spec = &mut change_of(plan, "sms")["desired"];
                spec["url"] = "https://attacker.example/collect".into();
            },
            "\n  sms: differs from the change that was planned",
        ),
        (
            "fields",
            |plan| {
                let sms = change_of(plan, "sms");
                sms["fields"][0]["after"] = 300.into();
            },
            "\n  sms: differs from the change that was planned",
        ),
        (
            "fingerprints",
            |plan| {
                let sms = change_of(plan, "sms");
                sms["fingerprints"]["auth_token"] = "hmac-sha256:00".into();
            },
            "\n  sms: differs from the change that was planned",
        ),
        (
            "an added change",
            |plan| {
                let mut extra = change_of(plan, "sms").clone();
                extra["id"] = "sms-copy".into();
                extra["desired"]["id"] = "sms-copy".into();
                extra["action"] = "create".into();
                extra["live_generation"] = Value::Null;
                plan["changes"].as_array_mut().unwrap().push(extra);
            },
            "\n  sms-copy: differs from the change that was planned",
        ),
        (
            "a removed change",
            |plan| {
                plan["changes"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|c| c["id"] != "wechat-oa");
            },
            "a change was removed or reordered",
        ),
        (
            "the seal",
            |plan| {
                plan.as_object_mut().unwrap().remove("mac");
            },
            "this plan carries no seal (`mac`)",
        ),
    ];
    for (what, edit, expected) in edits {
        let mut plan = original.clone();
        edit(&mut plan);
        p.write("edited.json", &serde_json::to_string_pretty(&plan).unwrap());
        let run = p.run(&["apply", "edited.json"]);
        run.code(1);
        assert!(run.stderr.contains(expected), "{what}:\n{}", run.stderr);
        assert_eq!(live_sms(), before, "{what}: something was applied");
        assert_eq!(p.touchpoint_count(), 7, "{what}");
    }
    // The plan as made applies, also after a JSON tool re-indented it.
    p.write("plan.json", &serde_json::to_string(&original).unwrap());
    p.run(&["apply", "plan.json"]).code(0);
    assert!(live_sms().contains("\"batch_size\":200"));
}

#[test]
fn multi_line_auth_token_is_refused_where_it_is_resolved() {
    let p = with_reference("{ file = \"../secrets/token\" }");
    p.write("secrets/token", "first-line\nsecond-line\n");
    let run = p.run(&["plan"]);
    run.code(1).stdout_has(
        "touchpoints/sms.toml:6:23: error[secret-invalid-value]: `auth_token` { file = \"../secrets/token\" }: secret file touchpoints/../secrets/token holds a line break inside the value: a secret must be one line of text",
    );
    assert!(!run.all().contains("first-line"));
    write_sms(&p, "{ env = \"SMS_TOKEN\" }");
    p.run_env(&["plan"], &[("SMS_TOKEN", "first-line\nsecond-line")])
        .code(1)
        .stdout_has("error[secret-invalid-value]: `auth_token` { env = \"SMS_TOKEN\" }: environment variable SMS_TOKEN holds a line break inside the value");
    p.run_env(&["plan"], &[("SMS_TOKEN", "one\u{7}line")])
        .code(1)
        .stdout_has("holds the control character U+0007 inside the value");
}

/// In the daemon, a token that became multi-line holds its touchpoint (before, every batch failed
/// as if the endpoint were down).
#[test]
fn multi_line_auth_token_holds_the_touchpoint_in_the_daemon() {
    let sink = Sink::ok();
    let p = applied_with_token_file(&sink, "token", "sink-token\n");
    p.write("secrets/token", "sink-token\nsecond-line\n");
    let d = p.start_daemon(
        &["--insecure-no-auth", "--allow-private-network", "--watch"],
        &[],
    );
    let held = wait_held(&d, None, "sms", "holds a line break inside the value");
    assert!(held.starts_with("cannot read `auth_token`"), "{held}");
    let (code, body) = d.dispatch(&trigger());
    assert_eq!(code, 409, "{body}");
    assert!(sink.received().is_empty());
    // The watch's reconcile reports it at the reference, as plan does, and changes nothing.
    let status = d.wait_until("/v1/status", "a reconcile report", |_, s| {
        s["reconcile"].is_object()
    });
    let report = &status["reconcile"];
    assert_eq!(report["ok"], false, "{report}");
    let diagnostic = &report["diagnostics"][0];
    assert_eq!(diagnostic["code"], "secret-invalid-value", "{report}");
    assert_eq!(
        (
            &diagnostic["path"],
            &diagnostic["line"],
            &diagnostic["column"]
        ),
        (&json!("touchpoints/sms.toml"), &json!(7), &json!(23)),
        "{report}"
    );
}
