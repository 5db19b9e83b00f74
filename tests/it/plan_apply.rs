//! plan and apply against the embedded registry, through the real binary.

use std::process::Stdio;

use crate::support::{Project, Run};

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

#[test]
fn first_plan_creates_everything_then_apply_converges() {
    let p = Project::with_samples();
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

#[test]
fn update_shows_field_changes_and_line_diffs() {
    let p = Project::with_samples();
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
    insta::assert_snapshot!("update_plan", run.stdout);
}

#[test]
fn json_plan_is_versioned_and_complete() {
    let p = Project::with_samples();
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

#[test]
fn secrets_never_appear_in_any_output_or_in_the_state() {
    let p = Project::with_samples();
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
    // The state file as bytes, and its write-ahead log when one is left.
    let state = std::fs::read(p.path().join(".touchctl/state.db")).expect("the state file");
    seen += &String::from_utf8_lossy(&state);
    match std::fs::read(p.path().join(".touchctl/state.db-wal")) {
        Ok(bytes) => seen += &String::from_utf8_lossy(&bytes),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
    }
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

#[test]
fn env_secret_missing_is_a_clear_error() {
    let p = Project::with_samples();
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

#[test]
fn saved_plan_applies_exactly_what_was_planned() {
    let p = Project::with_samples();
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
    let spec: String = p
        .state_db()
        .query_row("SELECT spec FROM touchpoints WHERE id = 'sms'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(spec["batch_size"], 200);
    // Applying the same plan twice is refused: sms moved on since.
    let run = p.run(&["apply", "plan.json"]);
    run.code(1);
    run.stderr_has("sms: planned against generation 1, now generation 2");
}

#[test]
fn stale_saved_plan_is_refused_naming_each_touchpoint() {
    let p = Project::with_samples();
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
    p.state_db()
        .execute(
            "UPDATE touchpoints SET paused = 1, generation = generation + 1 WHERE id = 'sms'",
            [],
        )
        .unwrap();
    p.state_db()
        .execute(
            "UPDATE touchpoints SET generation = 7 WHERE id = 'app-push'",
            [],
        )
        .unwrap();
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

#[test]
fn saved_plan_for_another_registry_is_refused() {
    let p = Project::with_samples();
    p.run(&["plan", "--out", "plan.json"]).code(0);
    let run = p.run(&["--state", "other.db", "apply", "plan.json"]);
    run.code(1);
    run.stderr_has("this plan was made against registry");
}

#[test]
fn deletes_need_allow_delete_and_respect_protect_and_max_deletes() {
    let p = Project::with_samples();
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

#[test]
fn drift_is_shown_apart_and_apply_restores_fields() {
    let p = Project::with_samples();
    applied(&p);
    let db = p.state_db();
    let spec: String = db
        .query_row("SELECT spec FROM touchpoints WHERE id = 'sms'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let changed = spec.replace("\"enabled\":true", "\"enabled\":false");
    assert_ne!(spec, changed);
    db.execute(
        "UPDATE touchpoints SET live_spec = ?1, generation = generation + 1 WHERE id = 'sms'",
        [changed],
    )
    .unwrap();
    db.execute(
        "UPDATE touchpoints SET paused = 1 WHERE id = 'wecom-stores'",
        [],
    )
    .unwrap();
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

#[test]
fn a_held_lock_fails_fast_naming_the_holder() {
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

#[test]
fn a_crashed_holders_lock_is_recovered() {
    let p = Project::with_samples();
    applied(&p);
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
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    let run = applied(&p);
    run.stderr_has("took over the registry lock (apply by ops@here");
    run.stderr_has("its process no longer runs on this host");
    let locks: i64 = p.query_one("SELECT count(*) FROM lock");
    assert_eq!(locks, 0, "apply released its lock");
}

#[test]
fn concurrent_applies_do_not_corrupt_the_registry() {
    let p = Project::with_samples();
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
    let ok: String = p.query_one("PRAGMA integrity_check");
    assert_eq!(ok, "ok");
    applied(&p);
    let gens: Vec<i64> = p.query_all("SELECT generation FROM touchpoints ORDER BY id");
    assert_eq!(gens, vec![1; 7]);
}

#[test]
fn a_failure_mid_apply_reports_what_landed_and_rerun_converges() {
    let p = Project::with_samples();
    // Something outside touchctl refuses one row (as a full disk or a constraint would). Saving
    // a plan creates the registry to put it in.
    p.run(&["plan", "--out", "plan.json"]).code(0);
    p.state_db()
        .execute_batch(
            "CREATE TRIGGER refuse_sms BEFORE INSERT ON touchpoints WHEN NEW.id = 'sms' \
             BEGIN SELECT RAISE(ABORT, 'disk quota exceeded'); END;",
        )
        .unwrap();
    let run = p.run(&["apply", "--auto-approve"]);
    run.code(1);
    run.stdout_has("create sms: FAILED:");
    assert!(run.stdout.contains("disk quota exceeded"));
    run.stdout_has("Apply incomplete: 6 of 7 change(s) landed");
    assert!(run.stdout.contains(
        "landed: app-push, loyalty-points, open-platform, wechat-oa, wechat-service, wecom-stores"
    ));
    assert!(run.stdout.contains("not applied: sms"));
    p.state_db()
        .execute_batch("DROP TRIGGER refuse_sms;")
        .unwrap();
    let run = p.run(&["plan"]);
    assert!(
        run.stdout
            .starts_with("Plan: 1 to create, 0 to update, 0 to delete, 6 unchanged.")
    );
    applied(&p);
    assert!(p.run(&["plan"]).stdout.contains("No changes"));
}

#[test]
fn apply_without_a_terminal_needs_auto_approve() {
    let p = Project::with_samples();
    p.run(&["apply"]).code(1).stderr_has(
        "apply needs confirmation, and standard input is not a terminal: review the plan, then run again with --auto-approve",
    );
    assert!(
        !p.path().join(".touchctl").exists(),
        "a refused apply created the state"
    );
}

#[test]
fn an_invalid_tree_changes_nothing() {
    let p = Project::with_samples();
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
    let spec: String = p
        .state_db()
        .query_row("SELECT spec FROM touchpoints WHERE id = 'sms'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(spec.contains("\"batch_size\":500"));
}

#[test]
fn usage_errors_exit_1_not_2() {
    let p = Project::empty();
    p.run(&["plan", "--no-such-flag"]).code(1);
    p.run(&["--help"]).code(0);
}

#[test]
fn a_hand_edited_saved_plan_is_refused() {
    let p = Project::with_samples();
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
#[test]
fn json_plan_snapshot() {
    let p = Project::with_samples();
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
    // What differs from run to run.
    doc["created_at"] = "[created_at]".into();
    doc["registry"]["id"] = "[registry id]".into();
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
    insta::assert_snapshot!("json_plan", serde_json::to_string_pretty(&doc).unwrap());
}
