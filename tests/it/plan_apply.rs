//! plan and apply against the registry, through the real binary: one suite, run on each backend
//! (`sqlite::*` and `postgres::*`, see [`crate::backend`]). The few tests of what only the SQLite
//! file does are `sqlite_only_*`.

use std::process::Stdio;

use crate::backend::{Backend, on_both_backends};
use crate::support::{Project, Run};

on_both_backends!(
    first_plan_creates_everything_then_apply_converges,
    update_shows_field_changes_and_line_diffs,
    json_plan_is_versioned_and_complete,
    secrets_never_appear_in_any_output_or_in_the_state,
    env_secret_missing_is_a_clear_error,
    saved_plan_applies_exactly_what_was_planned,
    stale_saved_plan_is_refused_naming_each_touchpoint,
    saved_plan_for_another_registry_is_refused,
    deletes_need_allow_delete_and_respect_protect_and_max_deletes,
    drift_is_shown_apart_and_apply_restores_fields,
    a_held_lock_fails_fast_naming_the_holder,
    a_crashed_holders_lock_is_recovered,
    concurrent_applies_do_not_corrupt_the_registry,
    a_failure_mid_apply_reports_what_landed_and_rerun_converges,
    apply_without_a_terminal_needs_auto_approve,
    an_invalid_tree_changes_nothing,
    a_hand_edited_saved_plan_is_refused,
    json_plan_snapshot,
);

/// A snapshot shared by the suite's runs on each backend (insta names snapshots after the module,
/// which differs between them).
macro_rules! assert_suite_snapshot {
    ($name:literal, $value:expr) => {
        insta::with_settings!({ prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!(concat!("it__plan_apply__", $name), $value);
        })
    };
}

/// The live spec of touchpoint `id`, as the registry stores it.
fn live_spec(p: &Project, id: &str) -> serde_json::Value {
    let spec: String = p.query_one(&format!("SELECT spec FROM touchpoints WHERE id = '{id}'"));
    serde_json::from_str(&spec).unwrap()
}

/// Every secret value the sample set resolves.
fn sample_secrets(p: &Project) -> Vec<String> {
    std::fs::read_dir(p.path().join("secrets/sandbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.extension().is_none())
        .map(|path| std::fs::read_to_string(path).unwrap().trim().to_string())
        .collect()
}

fn applied(p: &Project) -> Run {
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(0);
    run
}

fn first_plan_creates_everything_then_apply_converges(b: Backend) {
    let p = Project::with_samples_on(b);
    let run = p.run(&["plan", "--detailed-exitcode"]);
    run.code(2);
    assert!(
        run.stdout
            .starts_with("Plan: 7 to create, 0 to update, 0 to delete, 0 unchanged.")
    );
    let run = applied(&p);
    run.stdout_has("Apply complete: 7 created, 0 updated, 0 deleted.");
    let run = p.run(&["plan", "--detailed-exitcode"]);
    run.code(0);
    assert!(run.stdout.contains("No changes"));
    // Applying again changes nothing.
    let run = applied(&p);
    assert!(!run.stdout.contains("Apply complete"), "{}", run.stdout);
    let gens: Vec<i64> = p.query_all("SELECT generation FROM touchpoints");
    assert_eq!(gens, vec![1; 7]);
}

fn update_shows_field_changes_and_line_diffs(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.set("touchpoints/custom/sms.toml",
        "description = \"Marketing SMS through the in-house gateway.\"",
        "description = \"\"\"\nMarketing SMS through the in-house gateway.\nOwned by the CRM team.\"\"\"",
    );
    p.set(
        "touchpoints/channels/wecom.toml",
        "[dynamic_params]",
        "[dynamic_params]\nstore = \"user.store\"",
    );
    let run = p.run(&["plan"]);
    run.code(0);
    assert_suite_snapshot!("update_plan", run.stdout);
}

fn json_plan_is_versioned_and_complete(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    let run = p.run(&["plan", "--format", "json"]);
    run.code(0);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["format_version"], "1");
    assert_eq!(doc["summary"]["update"], 1);
    assert_eq!(doc["summary"]["no_op"], 6);
    assert_eq!(
        doc["registry"]["backend"],
        p.registry_description().as_str()
    );
    let sms = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "sms")
        .unwrap();
    assert_eq!(sms["action"], "update");
    assert_eq!(sms["live_generation"], 1);
    assert_eq!(
        sms["fields"],
        serde_json::json!([{"path": "batch_size", "action": "update", "before": 500, "after": 200, "sensitive": false, "value_changed": false}])
    );
    assert_eq!(sms["desired"]["batch_size"], 200);
}

/// Runs the binary, asserts its exit code (a failing command's output proves nothing about
/// leaks) and adds its output to `seen`.
#[track_caller]
fn run_into(p: &Project, seen: &mut String, args: &[&str], code: i32) -> Run {
    let run = p.run(args);
    run.code(code);
    *seen += &run.all();
    run
}

fn secrets_never_appear_in_any_output_or_in_the_state(b: Backend) {
    let p = Project::with_samples_on(b);
    let mut seen = String::new();
    run_into(&p, &mut seen, &["plan"], 0).stdout_has("/sms_auth_token\" } (sensitive)");
    run_into(
        &p,
        &mut seen,
        &["plan", "--format", "json", "--out", "saved.json"],
        0,
    );
    seen += &p.read("saved.json");
    run_into(&p, &mut seen, &["apply", "saved.json"], 0)
        .stdout_has("Apply complete: 7 created, 0 updated, 0 deleted.");
    // A changed secret value.
    p.write(
        "secrets/sandbox/sms_auth_token",
        "rotated-secret-value-93e1\n",
    );
    run_into(&p, &mut seen, &["plan"], 0).stdout_has("~ auth_token: (sensitive value changed)");
    run_into(&p, &mut seen, &["plan", "--format", "json"], 0).stdout_has("\"sensitive\": true");
    run_into(&p, &mut seen, &["apply", "--auto-approve"], 0)
        .stdout_has("Apply complete: 0 created, 1 updated, 0 deleted.");
    run_into(&p, &mut seen, &["validate", "--format", "json"], 0);
    // Everything the registry stores: the state file as bytes (and its write-ahead log), or
    // every row of the database.
    let state = p.state_dump();
    assert!(state.contains("sms"), "the dump holds the touchpoints");
    seen += &state;
    let mut secrets = sample_secrets(&p);
    secrets.push("rotated-secret-value-93e1".into());
    assert!(secrets.len() >= 11);
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !seen.contains(&s),
            "secret {s:?} leaked into an output or the state"
        );
    }
}

fn env_secret_missing_is_a_clear_error(b: Backend) {
    let p = Project::with_samples_on(b);
    p.set(
        "touchpoints/custom/sms.toml",
        "auth_token = { file = \"../../secrets/sandbox/sms_auth_token\" }",
        "auth_token = { env = \"TEST_SMS_TOKEN\" }",
    );
    let run = p.run(&["plan"]);
    run.code(1);
    run.stdout_has("touchpoints/custom/sms.toml:10:22: error[secret-unreadable]: `auth_token` { env = \"TEST_SMS_TOKEN\" }: environment variable TEST_SMS_TOKEN is not set");
    let out = p
        .command(&["plan"])
        .env("TEST_SMS_TOKEN", "from-the-environment-55")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("from-the-environment-55"));
}

fn saved_plan_applies_exactly_what_was_planned(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.run(&["plan", "--out", "plan.json"]).code(0);
    // The files move on after the plan: apply must still write what was reviewed.
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 200",
        "batch_size = 300",
    );
    let run = p.run(&["apply", "plan.json"]);
    run.code(0);
    assert_eq!(live_spec(&p, "sms")["batch_size"], 200);
    // Applying the same plan twice is refused: sms moved on since.
    let run = p.run(&["apply", "plan.json"]);
    run.code(1);
    run.stderr_has("sms: planned against generation 1, now generation 2");
}

fn stale_saved_plan_is_refused_naming_each_touchpoint(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.set(
        "touchpoints/channels/getui.toml",
        "batch_size = 500",
        "batch_size = 100",
    );
    p.set(
        "touchpoints/channels/wecom.toml",
        "message = \"news\"",
        "message = \"textcard\"",
    );
    p.run(&["plan", "--out", "plan.json"]).code(0);
    // Someone else changes sms (a pause) and app-push (an apply) after the plan.
    let changed = p.execute(
        "UPDATE touchpoints SET paused = TRUE, generation = generation + 1 WHERE id = 'sms'",
        &[],
    );
    assert_eq!(changed, 1);
    let changed = p.execute(
        "UPDATE touchpoints SET generation = 7 WHERE id = 'app-push'",
        &[],
    );
    assert_eq!(changed, 1);
    let before: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'wecom-stores'");
    let run = p.run(&["apply", "plan.json"]);
    run.code(1);
    run.stderr_has("the plan is stale: 2 touchpoint(s) changed");
    assert!(
        run.stderr
            .contains("app-push: planned against generation 1, now generation 7")
    );
    assert!(
        run.stderr
            .contains("sms: planned against generation 1, now generation 2")
    );
    assert!(!run.stderr.contains("wecom-stores"));
    // Nothing was applied, not even the untouched wecom change.
    let after: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'wecom-stores'");
    assert_eq!(before, after);
}

fn saved_plan_for_another_registry_is_refused(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["plan", "--out", "plan.json"]).code(0);
    let run = p.run(&["--state", "other.db", "apply", "plan.json"]);
    run.code(1);
    run.stderr_has("this plan was made against registry");
}

fn deletes_need_allow_delete_and_respect_protect_and_max_deletes(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.remove("touchpoints/channels/getui.toml");
    let run = p.run(&["plan"]);
    run.stdout_has("- delete app-push (app_push)");
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    run.stderr_has("pass --allow-delete");
    p.run(&["apply", "--auto-approve", "--allow-delete"])
        .code(0);
    assert!(p.run(&["plan"]).stdout.contains("No changes"));

    // A protected touchpoint is never deleted.
    p.remove("touchpoints/custom/points.toml");
    let run = p.run(&["plan"]);
    run.stdout_has("it is protected: apply will refuse to delete it");
    let run = p.run(&["apply", "--auto-approve", "--allow-delete"]);
    run.code(1);
    run.stderr_has("loyalty-points: is protected (protect = true)");

    // Mass prune guard.
    p.remove("touchpoints/custom/sms.toml");
    p.remove("touchpoints/channels/wecom.toml");
    let points =
        std::fs::read_to_string(crate::support::repo_root().join("touchpoints/custom/points.toml"))
            .unwrap();
    p.write("touchpoints/custom/points.toml", &points);
    let run = p.run(&[
        "apply",
        "--auto-approve",
        "--allow-delete",
        "--max-deletes",
        "1",
    ]);
    run.code(1);
    run.stderr_has("the plan deletes 2 touchpoints, more than --max-deletes 1");
    assert_eq!(p.touchpoint_count(), 6);
}

fn drift_is_shown_apart_and_apply_restores_fields(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'sms'");
    let changed = spec.replace("\"enabled\":true", "\"enabled\":false");
    assert_ne!(spec, changed);
    p.execute(
        "UPDATE touchpoints SET live_spec = $1, generation = generation + 1 WHERE id = 'sms'",
        &[changed.as_str()],
    );
    p.execute(
        "UPDATE touchpoints SET paused = TRUE WHERE id = 'wecom-stores'",
        &[],
    );
    let run = p.run(&["plan", "--detailed-exitcode"]);
    run.code(2);
    run.stdout_has("Plan: 0 to create, 1 to update, 0 to delete, 6 unchanged.");
    assert!(run.stdout.contains("~ update sms (custom)"));
    assert!(run.stdout.contains("    ~ enabled: false → true"));
    let drift = run.stdout.split("Drift").nth(1).expect("a drift section");
    assert!(
        drift.contains("! wecom-stores (wecom): paused through the admin API"),
        "{drift}"
    );
    assert!(
        drift.contains("! sms (custom): ~ enabled: true → false"),
        "{drift}"
    );
    applied(&p);
    let run = p.run(&["plan"]);
    assert!(
        run.stdout
            .contains("Plan: 0 to create, 0 to update, 0 to delete, 7 unchanged.")
    );
    // The pause is an operational hold: still shown, not undone by apply.
    assert!(run.stdout.contains("wecom-stores (wecom): paused"));
    assert!(!run.stdout.contains("sms (custom): ~ enabled"));
}

fn a_held_lock_fails_fast_naming_the_holder(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    // This test process holds the lock, as another apply would, and is alive: its lock is
    // neither stale nor expired.
    let registry = p.registry();
    let (held, recovered) = registry.lock("apply").expect("take the registry lock");
    assert_eq!(recovered, None);
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    run.stderr_has(&format!(
        "the registry is locked: apply by {} (pid {})",
        touchctl::registry::whoami(),
        std::process::id()
    ));
    run.stderr_has(&format!("touchctl force-unlock {}", held.lock_id));
    p.run(&["force-unlock", "wrong"])
        .code(1)
        .stderr_has("lock wrong is not held (the registry is locked by apply by");
    // Its holder is alive: only --force removes it.
    p.run(&["force-unlock", &held.lock_id])
        .code(1)
        .stderr_has(&format!("touchctl force-unlock {} --force", held.lock_id));
    p.run(&["force-unlock", &held.lock_id, "--force"]).code(0);
    let run = applied(&p);
    run.stdout_has("Apply complete: 0 created, 1 updated, 0 deleted.");
    drop(registry);
}

/// A lock row as a touchctl from before leases wrote it into the state file: no expiry, so
/// force-unlock removes it without --force.
#[test]
fn sqlite_only_a_lock_from_before_leases_fails_fast_naming_the_holder() {
    let p = Project::with_samples();
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    // This test process is alive, so its lock is not stale.
    p.state_db()
        .execute(
            "INSERT INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at) \
             VALUES (1, 'a1b2c3d4', 'ops@build-7', ?1, ?2, 'apply', '2026-01-01T00:00:00Z')",
            rusqlite::params![std::process::id(), touchctl::registry::hostname()],
        )
        .unwrap();
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    assert!(
        run.stderr
            .contains("the registry is locked: apply by ops@build-7 (pid"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("touchctl force-unlock a1b2c3d4"));
    p.run(&["force-unlock", "wrong"]).code(1);
    p.run(&["force-unlock", "a1b2c3d4"]).code(0);
    applied(&p);
}

/// The table of the registry lock's holder on each backend.
fn lock_table(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "lock",
        Backend::Postgres => "registry_lock",
    }
}

fn a_crashed_holders_lock_is_recovered(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    // A holder that crashed, leaving its lock behind.
    let (holder, _crashed) = match b {
        Backend::Sqlite => {
            // Its process no longer runs on this host.
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead_pid = child.id();
            child.wait().unwrap();
            p.state_db()
                .execute(
                    "INSERT INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at) \
                     VALUES (1, 'deadbeef', 'ops@here', ?1, ?2, 'apply', '2026-01-01T00:00:00Z')",
                    rusqlite::params![dead_pid, touchctl::registry::hostname()],
                )
                .unwrap();
            ("ops@here".to_string(), None)
        }
        Backend::Postgres => {
            // Its session, which held the advisory lock, is gone (ended here from the server's
            // side, waiting until it is); its row is left.
            let registry = p.registry();
            registry.lock("apply").expect("take the registry lock");
            let ended: i64 = p.query_one(
                "SELECT count(*) FROM registry_lock WHERE pg_terminate_backend(backend_pid, 5000)",
            );
            assert_eq!(ended, 1);
            (touchctl::registry::whoami(), Some(registry))
        }
    };
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    let run = applied(&p);
    run.stderr_has(&format!("took over the registry lock (apply by {holder}"));
    if b == Backend::Sqlite {
        run.stderr_has("its process no longer runs on this host");
    }
    let locks: i64 = p.query_one(&format!("SELECT count(*) FROM {}", lock_table(b)));
    assert_eq!(locks, 0, "apply released its lock");
}

fn concurrent_applies_do_not_corrupt_the_registry(b: Backend) {
    let p = Project::with_samples_on(b);
    let children: Vec<_> = (0..6)
        .map(|_| {
            p.command(&["apply", "--auto-approve"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut created = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            if stdout.contains("Apply complete: 7 created") {
                created += 1;
            } else {
                assert!(stdout.contains("No changes"), "{stdout}");
            }
        } else {
            // The only acceptable failures: the lock, a compare-and-swap refusal, or (each apply
            // planning against a new registry) the file created by another one first.
            assert!(
                stderr.contains("the registry is locked")
                    || stdout.contains("changed in the registry since it was read")
                    || stderr.contains("was created by another process"),
                "unexpected failure:\n{stdout}\n{stderr}"
            );
        }
    }
    // The first to hold the lock creates them; each other one is refused by the lock or by the
    // compare-and-swap, or finds nothing to do.
    assert_eq!(created, 1, "the touchpoints are created exactly once");
    if b == Backend::Sqlite {
        let ok: String = p.query_one("PRAGMA integrity_check");
        assert_eq!(ok, "ok");
    }
    applied(&p);
    let gens: Vec<i64> = p.query_all("SELECT generation FROM touchpoints ORDER BY id");
    assert_eq!(gens, vec![1; 7]);
}

fn a_failure_mid_apply_reports_what_landed_and_rerun_converges(b: Backend) {
    let p = Project::with_samples_on(b);
    // Something outside touchctl refuses one row (as a full disk or a constraint would). Saving
    // a plan creates the registry to put it in.
    p.run(&["plan", "--out", "plan.json"]).code(0);
    p.refuse_inserts_of("sms", "disk quota exceeded");
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    run.stdout_has("create sms: FAILED:");
    assert!(run.stdout.contains("disk quota exceeded"));
    run.stdout_has("Apply incomplete: 6 of 7 change(s) landed");
    assert!(run.stdout.contains(
        "landed: app-push, loyalty-points, open-platform, wechat-oa, wechat-service, wecom-stores"
    ));
    assert!(run.stdout.contains("not applied: sms"));
    p.allow_inserts();
    let run = p.run(&["plan"]);
    assert!(
        run.stdout
            .starts_with("Plan: 1 to create, 0 to update, 0 to delete, 6 unchanged.")
    );
    applied(&p);
    assert!(p.run(&["plan"]).stdout.contains("No changes"));
}

fn apply_without_a_terminal_needs_auto_approve(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["apply"]).code(1).stderr_has(
        "apply needs confirmation, and standard input is not a terminal: review the plan, then run again with --auto-approve",
    );
    assert!(
        !p.path().join(".touchctl").exists(),
        "a refused apply created a state folder"
    );
    if b == Backend::Postgres {
        assert_eq!(p.touchpoint_count(), 0, "a refused apply wrote touchpoints");
    }
}

fn an_invalid_tree_changes_nothing(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.write(
        "touchpoints/broken.toml",
        "id = \"broken\"\nkind = \"custom\"\n",
    );
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    run.stdout_has("touchpoints/broken.toml:2:1: error[missing-field]");
    assert!(run.stderr.contains("nothing was changed"));
    assert_eq!(live_spec(&p, "sms")["batch_size"], 500);
}

#[test]
fn usage_errors_exit_1_not_2() {
    let p = Project::empty();
    p.run(&["plan", "--no-such-flag"]).code(1);
    p.run(&["--help"]).code(0);
}

fn a_hand_edited_saved_plan_is_refused(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["plan", "--out", "plan.json"]).code(0);
    let edited = p
        .read("plan.json")
        .replacen("\"batch_size\":500", "\"batch_size\":9999", 1);
    assert_ne!(edited, p.read("plan.json"));
    p.write("plan.json", &edited);
    let run = p.run(&["apply", "plan.json"]);
    run.code(1);
    run.stderr_has("the plan file was changed after `touchctl plan` saved it");
    run.stderr_has("\n  app-push: differs from the change that was planned");
    assert_eq!(p.touchpoint_count(), 0);
}

/// The JSON plan document, whole: what CI scripts and saved plans rely on.
fn json_plan_snapshot(b: Backend) {
    let p = Project::with_samples_on(b);
    applied(&p);
    p.set(
        "touchpoints/channels/getui.toml",
        "ttl = \"1d\"",
        "ttl = \"12h\"",
    );
    p.write(
        "secrets/sandbox/getui_master_secret",
        "rotated-master-secret\n",
    );
    p.remove("touchpoints/channels/wecom.toml");
    let run = p.run(&["plan", "--format", "json"]);
    run.code(0);
    let mut doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    // What differs from run to run, and from backend to backend.
    doc["created_at"] = "[created_at]".into();
    doc["registry"]["id"] = "[registry id]".into();
    assert_eq!(
        doc["registry"]["backend"],
        p.registry_description().as_str()
    );
    doc["registry"]["backend"] = "[backend]".into();
    let mask_mac = |v: &mut serde_json::Value| {
        assert!(v["mac"].as_str().unwrap().starts_with("hmac-sha256:"));
        v["mac"] = "[mac]".into();
    };
    mask_mac(&mut doc);
    for change in doc["changes"].as_array_mut().unwrap() {
        mask_mac(change);
        if let Some(fps) = change
            .get_mut("fingerprints")
            .and_then(|f| f.as_object_mut())
        {
            for v in fps.values_mut() {
                assert!(v.as_str().unwrap().starts_with("hmac-sha256:"));
                *v = "[fingerprint]".into();
            }
        }
    }
    assert_suite_snapshot!("json_plan", serde_json::to_string_pretty(&doc).unwrap());
}
