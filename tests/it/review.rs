//! The git-native review workflow: `plan --base REV` against real git repositories, the markdown
//! pull-request comment, provenance and `--allow-dirty`, and `import`. What reads or writes the
//! registry runs on each of its backends.

use serde_json::Value;

use crate::backend::{Backend, on_both_backends};
use crate::support::Project;

on_both_backends!(
    markdown_comment_of_a_registry_plan_shows_drift_and_live_commits,
    apply_records_provenance_and_a_dirty_tree_needs_allow_dirty,
    import_round_trip_for_every_kind,
    import_refuses_what_it_cannot_do_cleanly,
);

/// The change entries of a JSON plan by id: (action, file, moved_from, risks).
fn actions(plan: &Value) -> Vec<(String, String, Value, Value)> {
    plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["action"].as_str().unwrap().to_string(),
                c["moved_from"].clone(),
                c["risks"].clone(),
            )
        })
        .collect()
}

fn json_plan(p: &Project, args: &[&str]) -> Value {
    let mut all = vec!["plan", "--format", "json"];
    all.extend_from_slice(args);
    let run = p.run(&all);
    run.code(0);
    serde_json::from_str(&run.stdout).expect("plan JSON")
}

/// A feature branch that updates, moves, deletes and creates touchpoints, committed.
fn feature_branch(p: &Project) -> String {
    p.git(&["checkout", "-q", "-b", "feature"]);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 100",
    )
    .set(
        "touchpoints/custom/sms.toml",
        "description = \"Marketing SMS through the in-house gateway.\"",
        "description = \"\"\"\nMarketing SMS through the in-house gateway.\nNow also for service notices.\n\"\"\"",
    )
    .set(
        "touchpoints/custom/sms.toml",
        "auth_token = { file = \"../../secrets/sandbox/sms_auth_token\" }",
        "auth_token = { env = \"SMS_GATEWAY_TOKEN\" }",
    );
    p.git(&[
        "mv",
        "touchpoints/channels/wecom.toml",
        "touchpoints/wecom-stores.toml",
    ]);
    p.set(
        "touchpoints/wecom-stores.toml",
        "../../schemas",
        "../schemas",
    );
    p.git(&["rm", "-q", "touchpoints/custom/points.toml"]);
    p.write(
        "touchpoints/custom/coupons.toml",
        "#:schema ../../schemas/touchpoint.schema.json\nid = \"coupons\"\nname = \"优惠券\"\nkind = \"custom\"\ncategory = \"benefit\"\nurl = \"https://coupons.example.com/v1/issue\"\nauth_token = { env = \"COUPON_TOKEN\" }\n\n[dynamic_params]\nmember_id = \"user.member_id\"\n",
    );
    p.commit_all("feature: sms batch, wecom moved, points gone, coupons")
}

#[test]
fn base_plan_compares_revisions_without_a_registry() {
    let p = Project::with_samples();
    let main = p.git_init();
    feature_branch(&p);

    let plan = json_plan(&p, &["--base", "main"]);
    assert_eq!(plan["registry"], Value::Null);
    assert_eq!(plan["base"]["rev"], "main");
    assert_eq!(plan["base"]["commit"], main.as_str());
    assert_eq!(plan["source"]["dirty"], false);
    let a = actions(&plan);
    let find = |id: &str| {
        a.iter()
            .find(|c| c.0 == id)
            .unwrap_or_else(|| panic!("{id}: {a:?}"))
    };
    // A moved file with the same id is neither a delete nor a create.
    let wecom = find("wecom-stores");
    assert_eq!(wecom.1, "no-op");
    assert_eq!(wecom.2, "touchpoints/channels/wecom.toml");
    assert_eq!(find("sms").1, "update");
    assert_eq!(
        find("sms").3,
        serde_json::json!(["auth_token", "batch_size"])
    );
    assert_eq!(find("loyalty-points").1, "delete");
    assert_eq!(
        find("loyalty-points").3,
        serde_json::json!(["delete (protected)"])
    );
    assert_eq!(find("coupons").1, "create");
    for untouched in ["wechat-oa", "app-push", "open-platform", "wechat-service"] {
        assert_eq!(find(untouched).1, "no-op", "{untouched}");
    }
    assert_eq!(a.len(), 8, "{a:?}");
    assert!(
        !p.path().join(".touchctl").exists(),
        "a --base plan reads no registry and creates none"
    );

    // Secrets compare by reference; no value is read (the env var is not even set).
    let text = p.run(&["plan", "--base", "main"]);
    text.code(0)
        .stdout_has("Comparing the touchpoints at main (")
        .stdout_has("~ auth_token: { file = \"../../secrets/sandbox/sms_auth_token\" } → { env = \"SMS_GATEWAY_TOKEN\" } (sensitive)")
        .stdout_has("→ move wecom-stores (wecom)  touchpoints/wecom-stores.toml (moved from touchpoints/channels/wecom.toml)")
        .stdout_has("+ Now also for service notices.");
    p.run(&["plan", "--base", "main", "--detailed-exitcode"])
        .code(2);

    // The branch against itself: nothing to review.
    p.run(&["plan", "--base", "feature", "--detailed-exitcode"])
        .code(0)
        .stdout_has("No changes: the work tree matches feature.");
    // Against its parent commit, by any revision syntax.
    let by_hash = json_plan(&p, &["--base", &main]);
    assert_eq!(actions(&by_hash), a);
    let by_parent = json_plan(&p, &["--base", "HEAD~1"]);
    assert_eq!(actions(&by_parent), a);
}

#[test]
fn base_plan_sees_the_dirty_work_tree() {
    let p = Project::with_samples();
    p.git_init();
    p.set(
        "touchpoints/channels/getui.toml",
        "ttl = \"1d\"",
        "ttl = \"2h\"",
    );
    p.write(
        "touchpoints/untracked.toml",
        "id = \"untracked\"\nname = \"n\"\nkind = \"custom\"\ncategory = \"other\"\nurl = \"https://u.example.com/\"\nauth_token = { env = \"U\" }\n",
    );
    let plan = json_plan(&p, &["--base", "HEAD"]);
    assert_eq!(plan["source"]["dirty"], true);
    let a = actions(&plan);
    let changed: Vec<(&str, &str)> = a
        .iter()
        .filter(|c| c.1 != "no-op")
        .map(|c| (c.0.as_str(), c.1.as_str()))
        .collect();
    assert_eq!(changed, [("app-push", "update"), ("untracked", "create")]);
    let ttl = &plan["changes"][0]["fields"][0];
    assert_eq!(ttl["path"], "ttl");
    assert_eq!(ttl["before"], "1d");
    assert_eq!(ttl["after"], "2h");
}

#[test]
fn base_plan_errors_say_what_to_do() {
    let p = Project::with_samples();
    p.run(&["plan", "--base", "main"])
        .code(1)
        .stderr_has("is not inside a git repository");
    p.git_init();
    p.run(&["plan", "--base", "no-such-branch"])
        .code(1)
        .stderr_has("`no-such-branch` is not a commit in this repository")
        .stderr_has("git fetch");
    p.run(&["plan", "--base", "main", "--out", "plan.json"])
        .code(1)
        .stderr_has("--out");

    // Broken files at the base are reported as such, named by revision.
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 0",
    );
    p.commit_all("broken");
    p.git(&["branch", "broken"]);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 0",
        "batch_size = 500",
    );
    p.run(&["plan", "--base", "broken"])
        .code(1)
        .stdout_has("broken:touchpoints/custom/sms.toml:12:14: error[out-of-range]")
        .stderr_has("the touchpoint files at `broken` have 1 problem(s)");
    // Broken files in the work tree are the usual diagnostics.
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 501",
    );
    p.run(&["plan", "--base", "main"])
        .code(1)
        .stdout_has("touchpoints/custom/sms.toml:12:14: error[out-of-range]");

    // A saved --base plan is for review only.
    let p = Project::with_samples();
    p.git_init();
    let plan = p.run(&["plan", "--base", "main", "--format", "json"]);
    p.write("review.json", &plan.stdout);
    p.run(&["apply", "review.json"])
        .code(1)
        .stderr_has("compares the files with `main` (plan --base), not with a registry");
}

#[test]
fn base_plan_of_a_folder_that_did_not_exist_creates_everything() {
    let p = Project::with_samples();
    let tree = std::fs::read_dir(p.path().join("touchpoints"))
        .unwrap()
        .count();
    assert!(tree > 0);
    std::fs::rename(p.path().join("touchpoints"), p.path().join("later")).unwrap();
    p.git_init();
    std::fs::rename(p.path().join("later"), p.path().join("touchpoints")).unwrap();
    let plan = json_plan(&p, &["--base", "main"]);
    assert_eq!(plan["summary"]["create"], 7);
}

/// The pull-request comment, whole.
#[test]
fn markdown_comment_snapshot() {
    let p = Project::with_samples();
    let main = p.git_init();
    let feature = feature_branch(&p);
    let run = p.run(&["plan", "--base", "main", "--format", "markdown"]);
    run.code(0);
    assert!(
        !run.stdout
            .contains(&p.read("secrets/sandbox/sms_auth_token").trim().to_string())
    );
    let text = run
        .stdout
        .replace(&main[..10], "[main]")
        .replace(&feature[..10], "[feature]")
        .replace(env!("CARGO_PKG_VERSION"), "[version]");
    insta::assert_snapshot!("review_markdown", text);
}

fn markdown_comment_of_a_registry_plan_shows_drift_and_live_commits(b: Backend) {
    let p = Project::with_samples_on(b);
    let main = p.git_init();
    p.run(&["apply", "--auto-approve"]).code(0);
    p.set(
        "touchpoints/custom/sms.toml",
        "url = \"http://127.0.0.1:8641/_sandbox/webhooks/sms\"",
        "url = \"https://sms.example.com/v2/send\"",
    );
    p.commit_all("sms moves to the new gateway");
    p.execute(
        "UPDATE touchpoints SET paused = TRUE WHERE id = 'wechat-oa'",
        &[],
    );
    let run = p.run(&["plan", "--format", "markdown"]);
    run.code(0)
        .stdout_has("| `sms` | custom | update | ⚠️ `url` |")
        .stdout_has(&format!(
            "Comparing the registry (`{}`)",
            p.registry_description()
        ))
        .stdout_has("- `wechat-oa` (wechat_official_account): paused through the admin API")
        .stdout_has(&format!("live from `{}`", &main[..10]))
        .stdout_has("~ url: \"http://127.0.0.1:8641/_sandbox/webhooks/sms\" → \"https://sms.example.com/v2/send\"");
}

#[test]
fn a_long_markdown_comment_stays_under_the_limit_and_says_what_was_cut() {
    let p = Project::empty();
    let tp = |i: usize, text: &str| {
        format!(
            "id = \"tp-{i:03}\"\nname = \"n\"\nkind = \"custom\"\ncategory = \"other\"\nurl = \"https://h{i}.example.com/\"\nauth_token = {{ env = \"T\" }}\ndescription = \"\"\"\n{text}\"\"\"\n"
        )
    };
    let para = |word: &str| format!("{word} line of a long description.\n").repeat(20);
    for i in 0..300 {
        p.write(&format!("touchpoints/tp-{i:03}.toml"), &tp(i, &para("old")));
    }
    p.git_init();
    for i in 0..300 {
        p.write(&format!("touchpoints/tp-{i:03}.toml"), &tp(i, &para("new")));
    }
    let run = p.run(&["plan", "--base", "main", "--format", "markdown"]);
    run.code(0);
    let chars = run.stdout.chars().count();
    assert!(chars <= 65_000, "{chars} characters");
    assert!(chars > 50_000, "the budget is used, not wasted: {chars}");
    run.stdout_has("### touchctl plan: 0 to create, 300 to update, 0 to delete, 0 unchanged")
        .stdout_has("| `tp-299` | custom | update |  |")
        .stdout_has("Cut to fit one comment (65000 characters):** the details of ")
        .stdout_has("Run `touchctl plan --base main` for the whole plan.");
    assert!(run.stdout.trim_end().ends_with("</sub>"));
}

fn apply_records_provenance_and_a_dirty_tree_needs_allow_dirty(b: Backend) {
    let p = Project::with_samples_on(b);
    let head = p.git_init();
    p.run(&["apply", "--auto-approve"]).code(0);
    let row = |id: &str| -> (String, bool, String) {
        let column = |name: &str| format!("SELECT {name} FROM touchpoints WHERE id = '{id}'");
        let dirty: i64 = p.query_one(&column("source_dirty"));
        (
            p.query_one(&column("source_commit")),
            dirty != 0,
            p.query_one(&column("source_file")),
        )
    };
    assert_eq!(
        row("sms"),
        (head.clone(), false, "touchpoints/custom/sms.toml".into())
    );

    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.run(&["plan"]).code(0).stdout_has(&format!(
        "~ update sms (custom)  touchpoints/custom/sms.toml  [live from {}]",
        &head[..10]
    ));
    let refused = p.run(&["apply", "--auto-approve"]);
    refused
        .code(1)
        .stderr_has("the touchpoint folder has uncommitted changes")
        .stderr_has("--allow-dirty");
    assert_eq!(row("sms").0, head, "nothing was written");
    // A saved plan remembers that its tree was dirty.
    p.run(&["plan", "--out", "dirty.json"]).code(0);
    p.run(&["apply", "dirty.json"])
        .code(1)
        .stderr_has("--allow-dirty");
    p.run(&["apply", "--auto-approve", "--allow-dirty"]).code(0);
    assert_eq!(
        row("sms"),
        (head.clone(), true, "touchpoints/custom/sms.toml".into())
    );

    let next = p.commit_all("sms batch 200");
    p.run(&["plan", "--detailed-exitcode"]).code(0);
    // Committed, the same spec is a no-op; the next real change records the new commit.
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 200",
        "batch_size = 300",
    );
    let last = p.commit_all("sms batch 300");
    assert_ne!(next, last);
    p.run(&["apply", "--auto-approve"]).code(0);
    assert_eq!(
        row("sms"),
        (last, false, "touchpoints/custom/sms.toml".into())
    );
    // Outside a repository there is nothing to be dirty about.
    let plain = Project::with_samples_on(b);
    plain.run(&["apply", "--auto-approve"]).code(0);
}

fn import_round_trip_for_every_kind(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["apply", "--auto-approve"]).code(0);
    let before = p.run(&["plan", "--format", "json"]);
    std::fs::remove_dir_all(p.path().join("touchpoints")).unwrap();
    std::fs::create_dir(p.path().join("touchpoints")).unwrap();
    p.run(&["plan", "--detailed-exitcode"])
        .code(2)
        .stdout_has("7 to delete");

    let run = p.run(&["import", "--all"]);
    run.code(0)
        .stdout_has("wrote touchpoints/custom/sms.toml (custom `sms`, generation 1)")
        .stdout_has(
            "wrote touchpoints/channels/wechat-oa.toml (wechat_official_account `wechat-oa`",
        )
        .stdout_has("wrote touchpoints/channels/wecom.toml (wecom `wecom-stores`")
        .stdout_has("wrote touchpoints/channels/getui.toml (app_push `app-push`")
        .stdout_has("wrote touchpoints/custom/points.toml (custom `loyalty-points`")
        .stdout_has(
            "wrote touchpoints/channels/open-platform.toml (wechat_open_platform `open-platform`",
        )
        .stdout_has(
            "wrote touchpoints/channels/wechat-service.toml (wechat_official_account `wechat-service`",
        );
    assert_eq!(run.stderr, "", "no warnings");
    p.run(&["validate"])
        .code(0)
        .stdout_has("ok: 7 touchpoint(s)");
    p.run(&["plan", "--detailed-exitcode"])
        .code(0)
        .stdout_has("No changes");
    let after = p.run(&["plan", "--format", "json"]);
    let specs = |run: &crate::support::Run| -> Vec<Value> {
        let doc: Value = serde_json::from_str(&run.stdout).unwrap();
        doc["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].clone())
            .collect()
    };
    assert_eq!(specs(&before), specs(&after));

    let sms = p.read("touchpoints/custom/sms.toml");
    assert!(
        sms.starts_with(
            "#:schema ../../schemas/touchpoint.schema.json\n# Imported from the registry"
        ),
        "{sms}"
    );
    assert!(sms.contains("auth_token = { file = \"../../secrets/sandbox/sms_auth_token\" }"));
    assert!(!sms.contains(p.read("secrets/sandbox/sms_auth_token").trim()));
    assert!(
        !sms.contains("enabled = true"),
        "defaults are left out:\n{sms}"
    );
    // Common fields first, then the kind's; plain values before tables.
    let pos = |s: &str| sms.find(s).unwrap_or_else(|| panic!("{s} missing:\n{sms}"));
    assert!(pos("id = ") < pos("name = ") && pos("name = ") < pos("kind = "));
    assert!(pos("kind = ") < pos("url = ") && pos("batch_size") < pos("[retry]"));
    assert!(pos("[retry]") < pos("[[template_params]]"));
    // The files satisfy the committed schema under taplo, like hand-written ones.
    crate::schema::taplo_lint(
        p.path(),
        &[
            "touchpoints/custom/sms.toml",
            "touchpoints/channels/wechat-oa.toml",
            "touchpoints/channels/open-platform.toml",
            "touchpoints/channels/wechat-service.toml",
        ],
    );
    // The open platform's secrets and the bound account's refresh token stay references.
    let platform = p.read("touchpoints/channels/open-platform.toml");
    for (field, name) in [
        ("component_secret", "component_secret"),
        ("token", "component_token"),
        ("encoding_aes_key", "component_aes_key"),
    ] {
        let reference = format!("{field} = {{ file = \"../../secrets/sandbox/{name}\" }}");
        assert!(platform.contains(&reference), "{reference}:\n{platform}");
        assert!(!platform.contains(p.read(&format!("secrets/sandbox/{name}")).trim()));
    }
    let service = p.read("touchpoints/channels/wechat-service.toml");
    assert!(
        service.contains("[auth]\nmode = \"third_party\"\nplatform = \"open-platform\"\nauthorizer_refresh_token = { file = \"../../secrets/sandbox/wechat_service_refresh_token\" }\n"),
        "{service}"
    );

    // Imported elsewhere, file references are rewritten to name the same secret files.
    p.remove("touchpoints/custom/sms.toml");
    let moved = p.run(&["import", "sms", "--out", "touchpoints/sms.toml"]);
    moved
        .code(0)
        .stderr_has("was rewritten to \"../secrets/sandbox/sms_auth_token\"");
    p.run(&["plan"])
        .code(0)
        .stdout_has("(moved from touchpoints/custom/sms.toml)")
        .stdout_has("(sensitive value unchanged)");
}

fn import_refuses_what_it_cannot_do_cleanly(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["apply", "--auto-approve"]).code(0);
    p.run(&["import", "sms"])
        .code(1)
        .stderr_has("`sms` is already described by touchpoints/custom/sms.toml");
    p.run(&["import", "smss"]).code(1).stderr_has(&format!(
        "no live touchpoint `smss` in {} (did you mean `sms`?)",
        p.registry_description()
    ));
    p.run(&["import"]).code(1).stderr_has("--all");
    p.run(&["import", "--all"])
        .code(0)
        .stdout_has("Nothing to import: every live touchpoint already has a file.");
    // Never over an existing file.
    let original = p.read("touchpoints/custom/sms.toml");
    p.remove("touchpoints/custom/sms.toml");
    p.write("notes.toml", "keep me");
    p.run(&["import", "sms", "--out", "notes.toml"])
        .code(1)
        .stderr_has("notes.toml already exists; import does not overwrite files");
    assert_eq!(p.read("notes.toml"), "keep me");
    p.run(&["import", "sms", "wechat-oa", "--out", "x.toml"])
        .code(1)
        .stderr_has("--out names one file");
    // An invalid tree is fixed first.
    p.write(
        "touchpoints/custom/sms.toml",
        &original.replace("batch_size = 500", "batch_size = 0"),
    );
    p.run(&["import", "--all"])
        .code(1)
        .stderr_has("fix them first");
}

/// A file anyone can add in a pull request is not read whole however large it is: in the work
/// tree and at a git revision alike it is refused, at its path, with the bound.
#[test]
fn a_touchpoint_file_larger_than_a_mebibyte_is_refused_unread() {
    let p = Project::with_samples();
    p.git_init();
    let huge = format!("# {}\n", "x".repeat(1024 * 1024));
    p.write("touchpoints/huge.toml", &huge);
    let expected = format!(
        "touchpoints/huge.toml:1:1: error[io]: the file holds {} bytes, more than the 1024 KiB a touchpoint file may hold",
        huge.len()
    );
    p.run(&["validate"]).code(1).stdout_has(&expected);
    // At the revision only: the blob is refused by its size, before its content is read.
    p.commit_all("a huge file");
    p.remove("touchpoints/huge.toml");
    let run = p.run(&["plan", "--base", "HEAD"]);
    run.code(1);
    run.stdout_has(&format!("HEAD:{expected}"));
}

/// A plan saved from uncommitted files stays a plan of a dirty tree after they are committed:
/// apply says so of the plan, instead of sending the reader to a `git status` that is clean.
#[test]
fn a_plan_saved_from_a_dirty_tree_says_so_after_the_tree_is_committed() {
    let p = Project::with_samples();
    p.git_init();
    p.run(&["apply", "--auto-approve"]).code(0);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 200",
    );
    p.run(&["plan", "--out", "plan.json"]).code(0);
    p.commit_all("smaller batches");
    let run = p.run(&["apply", "plan.json"]);
    run.code(1).stderr_has(
        "error: this plan was made while the touchpoint folder had uncommitted changes, so the registry could not record which commit its touchpoints came from (committing since does not change the plan): make the plan again",
    );
    assert!(!run.all().contains("git status"), "{}", run.all());
    p.run(&["plan", "--out", "plan.json"]).code(0);
    p.run(&["apply", "plan.json"])
        .code(0)
        .stdout_has("update sms: done (generation 2)");
}
