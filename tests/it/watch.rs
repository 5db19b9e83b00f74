//! `touchctl daemon --watch`: every way a tree changes reaches the registry, and only the
//! touchpoints that changed are written; links in the touchpoint folder; uncommitted files.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon_support::{Daemon, PATIENCE, custom_touchpoint};
use crate::support::Project;

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// Where the touchpoints would send: never contacted here.
const URL: &str = "http://127.0.0.1:9";

fn file(id: &str, batch_size: u32) -> String {
    custom_touchpoint(id, URL, batch_size, "")
}

/// A project with touchpoints `a`, `b` and `c` (`c` in a sub-folder), applied.
fn three() -> Project {
    let p = Project::empty();
    p.write("touchpoints/a.toml", &file("a", 100));
    p.write("touchpoints/b.toml", &file("b", 100));
    p.write("touchpoints/sub/c.toml", &file("c", 100));
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p
}

fn watching(p: &Project, more: &[&str]) -> Daemon {
    let mut args = vec!["--insecure-no-auth", "--watch"];
    if !more.contains(&"--interval") {
        args.extend(["--interval", "1h"]);
    }
    args.extend_from_slice(more);
    p.start_daemon(&args, &ENV)
}

/// The touchpoint's live generation as the API answers it; `None` when it is not live.
fn generation(d: &Daemon, id: &str) -> Option<u64> {
    let (code, body) = d.call("GET", &format!("/v1/touchpoints/{id}"), None);
    match code {
        200 => body["generation"].as_u64(),
        404 => None,
        _ => panic!("GET /v1/touchpoints/{id}: HTTP {code} {body}"),
    }
}

/// Waits until the touchpoint's live generation is `want` (`None`: until it is gone).
#[track_caller]
fn wait_for(d: &Daemon, id: &str, want: Option<u64>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = generation(d, id);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{id}` is at generation {now:?}, not {want:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(d: &Daemon) -> Value {
    d.call("GET", "/v1/status", None).1["reconcile"].clone()
}

/// Each touchpoint's generation and when it was last written, from the registry file.
fn rows(p: &Project) -> Vec<(String, i64, String)> {
    let db = p.state_db();
    let mut stmt = db
        .prepare("SELECT id, generation, applied_at || ' ' || coalesce(source_file, '') FROM touchpoints ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn an_edit_rereads_one_file_and_writes_only_its_touchpoint() {
    let p = three();
    let d = watching(&p, &[]);
    let before = rows(&p);
    p.write("touchpoints/b.toml", &file("b", 200));
    wait_for(&d, "b", Some(2));
    // Only `b` was compared with the registry. (The other files may have been read again: they
    // were written less than two seconds before, too recently for their stamps to be trusted.)
    let r = status(&d);
    assert_eq!(
        (&r["planned"], &r["updated"], &r["ok"]),
        (&1.into(), &1.into(), &true.into()),
        "{r}"
    );
    let after = rows(&p);
    assert_eq!(after[0], before[0], "a was not written");
    assert_eq!(after[2], before[2], "c was not written");
    assert_eq!(after[1].1, 2);
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'b'");
    assert!(spec.contains("\"batch_size\":200"), "{spec}");
}

#[test]
fn a_renamed_file_moves_its_touchpoint_without_a_delete() {
    let p = three();
    let d = watching(&p, &[]);
    std::fs::create_dir_all(p.path().join("touchpoints/moved")).unwrap();
    std::fs::rename(
        p.path().join("touchpoints/a.toml"),
        p.path().join("touchpoints/moved/renamed.toml"),
    )
    .unwrap();
    // Renamed and changed: an update of the same touchpoint, now read from its new file.
    p.write("touchpoints/moved/renamed.toml", &file("a", 300));
    wait_for(&d, "a", Some(2));
    let file: String = p.query_one("SELECT source_file FROM touchpoints WHERE id = 'a'");
    assert!(file.ends_with("touchpoints/moved/renamed.toml"), "{file}");
    assert_eq!(p.touchpoint_count(), 3);
    assert!(
        !d.log()
            .lines()
            .any(|l| l.contains(" deleted") && !l.contains(", 0 deleted")),
        "{}",
        d.log()
    );
}

#[test]
fn a_deleted_file_and_a_file_moved_out_of_the_folder_delete_their_touchpoints() {
    let p = three();
    let d = watching(&p, &[]);
    p.remove("touchpoints/a.toml");
    wait_for(&d, "a", None);
    std::fs::rename(
        p.path().join("touchpoints/sub/c.toml"),
        p.path().join("c-elsewhere.toml"),
    )
    .unwrap();
    wait_for(&d, "c", None);
    let ids: Vec<String> = p.query_all("SELECT id FROM touchpoints");
    assert_eq!(ids, ["b"]);
    assert_eq!(generation(&d, "b"), Some(1));
}

#[test]
fn a_new_file_in_a_new_folder_creates_its_touchpoint() {
    let p = three();
    let d = watching(&p, &[]);
    // Written at once after the folder is made: before the watcher may watch the new folder.
    p.write("touchpoints/new/deeper/d.toml", &file("d", 100));
    wait_for(&d, "d", Some(1));
    assert_eq!(p.touchpoint_count(), 4);
}

/// Changes `b.toml` through a hard link outside the touchpoint folder: the file changes, but the
/// folder's watcher hears nothing of it.
fn change_b_unseen(p: &Project) {
    let link = p.path().join("b-outside.toml");
    std::fs::hard_link(p.path().join("touchpoints/b.toml"), &link).unwrap();
    std::fs::write(&link, file("b", 400)).unwrap();
}

#[test]
fn a_change_the_watcher_could_not_see_is_applied_by_the_next_reconcile() {
    let p = three();
    let d = watching(&p, &[]);
    change_b_unseen(&p);
    // Any event starts a reconcile, which looks at every file's stamp.
    p.write("touchpoints/a.toml", &file("a", 150));
    wait_for(&d, "a", Some(2));
    wait_for(&d, "b", Some(2));
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'b'");
    assert!(spec.contains("\"batch_size\":400"), "{spec}");
}

#[test]
fn a_change_the_watcher_could_not_see_is_applied_by_the_interval_pass() {
    let p = three();
    let d = watching(&p, &["--interval", "1s"]);
    change_b_unseen(&p);
    wait_for(&d, "b", Some(2));
    assert_eq!(generation(&d, "a"), Some(1));
}

#[test]
fn a_change_held_back_by_a_broken_file_lands_when_that_file_is_fixed() {
    let p = three();
    let d = watching(&p, &[]);
    p.write("touchpoints/b.toml", &file("b", 250));
    p.write("touchpoints/a.toml", "id = \"a\"\nkind = \"custom\"\n");
    d.wait_until("/v1/status", "the broken file was never noticed", |_, s| {
        s["reconcile"]["ok"] == false
    });
    assert_eq!(
        generation(&d, "b"),
        Some(1),
        "nothing lands from a broken tree"
    );
    // Only `a.toml` changes now, but `b`'s change is still to be made.
    p.write("touchpoints/a.toml", &file("a", 100));
    wait_for(&d, "b", Some(2));
    assert_eq!(generation(&d, "a"), Some(1));
}

#[test]
fn a_registry_write_by_another_process_is_corrected_by_the_next_reconcile() {
    let p = three();
    let d = watching(&p, &[]);
    // Another checkout applies another `a`.
    p.write("other/a.toml", &file("a", 7));
    p.write("other/b.toml", &file("b", 100));
    p.write("other/sub/c.toml", &file("c", 100));
    p.run_env(&["--dir", "other", "apply", "--auto-approve"], &ENV)
        .code(0);
    wait_for(&d, "a", Some(2));
    // An edit of `b` in the watched folder: the reconcile it starts looks at every touchpoint.
    p.write("touchpoints/b.toml", &file("b", 120));
    wait_for(&d, "b", Some(2));
    wait_for(&d, "a", Some(3));
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'a'");
    assert!(spec.contains("\"batch_size\":100"), "{spec}");
}

#[test]
fn a_changed_secret_file_in_the_folder_updates_the_touchpoints_that_read_it() {
    let p = Project::empty();
    p.write("touchpoints/token", "first-token\n");
    p.write(
        "touchpoints/a.toml",
        &file("a", 100).replace("{ env = \"SINK_TOKEN\" }", "{ file = \"token\" }"),
    );
    p.write("touchpoints/b.toml", &file("b", 100));
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = watching(&p, &[]);
    p.write("touchpoints/token", "rotated-token\n");
    wait_for(&d, "a", Some(2));
    assert_eq!(generation(&d, "b"), Some(1));
}

#[test]
fn a_git_source_applies_committed_edits_renames_and_deletes_only() {
    let p = three();
    p.git_init();
    let d = watching(&p, &["--source", "git:main"]);
    let r = status(&d);
    assert_eq!(r["ok"], true, "{r}");
    // An uncommitted edit stays out; committed, it goes live, and only its touchpoint is written.
    p.write("touchpoints/b.toml", &file("b", 210));
    p.write("touchpoints/a.toml", &file("a", 110));
    p.git(&["add", "touchpoints/a.toml"]);
    p.git(&["commit", "-q", "-m", "a"]);
    wait_for(&d, "a", Some(2));
    assert_eq!(generation(&d, "b"), Some(1));
    // A committed rename keeps the touchpoint; a committed delete removes it.
    p.git(&["mv", "touchpoints/sub/c.toml", "touchpoints/c-renamed.toml"]);
    p.git(&["rm", "-q", "touchpoints/a.toml"]);
    p.git(&["commit", "-q", "-m", "rename c, delete a"]);
    wait_for(&d, "a", None);
    assert_eq!(generation(&d, "c"), Some(1));
    assert_eq!(generation(&d, "b"), Some(1));
}

/// `touchpoints/sms.toml` as a link to `target` (relative to the link's folder).
fn link(p: &Project, target: &str) {
    std::os::unix::fs::symlink(target, p.path().join("touchpoints/sms.toml")).unwrap();
}

#[test]
fn a_symlinked_touchpoint_file_inside_the_folder_is_loaded_not_deleted() {
    let p = Project::empty();
    p.write("touchpoints/.versions/sms-v1.toml", &file("sms", 100));
    link(&p, ".versions/sms-v1.toml");
    p.write("touchpoints/b.toml", &file("b", 100));
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    assert_eq!(p.touchpoint_count(), 2);
    p.run_env(&["plan", "--detailed-exitcode"], &ENV)
        .code(0)
        .stdout_has("No changes");
    let d = watching(&p, &[]);
    // The linked file's own change is seen through the link.
    p.write("touchpoints/.versions/sms-v1.toml", &file("sms", 50));
    wait_for(&d, "sms", Some(2));
    // So is the link turned to another version.
    p.write("touchpoints/.versions/sms-v2.toml", &file("sms", 60));
    std::fs::remove_file(p.path().join("touchpoints/sms.toml")).unwrap();
    link(&p, ".versions/sms-v2.toml");
    wait_for(&d, "sms", Some(3));
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'sms'");
    assert!(spec.contains("\"batch_size\":60"), "{spec}");
}

#[test]
fn a_symlink_that_leaves_the_folder_or_leads_nowhere_is_an_error_not_a_delete() {
    let p = Project::empty();
    p.write("touchpoints/sms.toml", &file("sms", 100));
    p.write("touchpoints/b.toml", &file("b", 100));
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = watching(&p, &[]);
    // The file moves out of the folder, and a link to it takes its place.
    std::fs::rename(
        p.path().join("touchpoints/sms.toml"),
        p.path().join("sms-outside.toml"),
    )
    .unwrap();
    link(&p, "../sms-outside.toml");
    let r = d.wait_until("/v1/status", "the link was never refused", |_, s| {
        s["reconcile"]["diagnostics"][0]["code"] == "link"
    });
    let message = r["reconcile"]["diagnostics"][0]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("outside the touchpoint folder"),
        "{message}"
    );
    assert_eq!(generation(&d, "sms"), Some(1), "still live");
    let plan = p.run_env(&["plan", "--detailed-exitcode"], &ENV);
    plan.code(1)
        .stdout_has("touchpoints/sms.toml:1:1: error[link]:");
    assert!(!plan.stdout.contains("delete"), "{}", plan.stdout);

    // A broken link and a link to a folder are refused too.
    std::fs::remove_file(p.path().join("touchpoints/sms.toml")).unwrap();
    link(&p, "gone.toml");
    std::os::unix::fs::symlink("../elsewhere", p.path().join("touchpoints/more")).unwrap();
    std::fs::create_dir_all(p.path().join("elsewhere")).unwrap();
    let run = p.run_env(&["validate"], &ENV);
    run.code(1)
        .stdout_has("touchpoints/sms.toml:1:1: error[link]: this is a link to `gone.toml`, which does not exist")
        .stdout_has("touchpoints/more:1:1: error[link]: this is a link to the folder `../elsewhere`");
    d.wait_until("/v1/status", "the broken link was never refused", |_, s| {
        s["reconcile"]["diagnostics"].as_array().is_some_and(|all| {
            all.iter().any(|d| {
                d["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("does not exist"))
            })
        })
    });
    assert_eq!(generation(&d, "sms"), Some(1), "still live");
    assert_eq!(p.touchpoint_count(), 2);
}

#[test]
fn a_symlinked_touchpoint_file_at_a_git_revision_is_followed_as_in_the_work_tree() {
    let p = Project::empty();
    p.write("touchpoints/.versions/sms-v1.toml", &file("sms", 100));
    link(&p, ".versions/sms-v1.toml");
    p.write("touchpoints/b.toml", &file("b", 100));
    p.git_init();
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    // The review view reads the revision from git: the same touchpoints as the work tree.
    p.run(&["plan", "--base", "HEAD", "--detailed-exitcode"])
        .code(0)
        .stdout_has("No changes");
    let d = watching(&p, &["--source", "git:main"]);
    assert_eq!(status(&d)["ok"], true, "{}", status(&d));
    // A committed link that leaves the folder is refused, and the touchpoint stays live.
    p.write("sms-outside.toml", &file("sms", 70));
    std::fs::remove_file(p.path().join("touchpoints/sms.toml")).unwrap();
    link(&p, "../sms-outside.toml");
    p.commit_all("sms from outside");
    let s = d.wait_until(
        "/v1/status",
        "the committed link was never refused",
        |_, s| s["reconcile"]["diagnostics"][0]["code"] == "link",
    );
    let message = s["reconcile"]["diagnostics"][0]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("outside the touchpoint folder"),
        "{message}"
    );
    assert_eq!(generation(&d, "sms"), Some(1));
    // The review of a fix names the link at the revision.
    std::fs::remove_file(p.path().join("touchpoints/sms.toml")).unwrap();
    p.write("touchpoints/sms.toml", &file("sms", 70));
    p.run(&["plan", "--base", "HEAD"])
        .code(1)
        .stdout_has("HEAD:touchpoints/sms.toml:1:1: error[link]: this is a link to sms-outside.toml, outside the touchpoint folder touchpoints");
}

#[test]
fn an_uncommitted_edit_applied_by_watch_is_recorded_and_shown_as_dirty() {
    let p = three();
    p.git_init();
    let d = watching(&p, &[]);
    p.write("touchpoints/b.toml", &file("b", 220));
    wait_for(&d, "b", Some(2));
    let r = status(&d);
    assert_eq!(
        (&r["dirty"], &r["updated"]),
        (&true.into(), &1.into()),
        "{r}"
    );
    assert!(r["commit"].is_string(), "{r}");
    let dirty: i64 = p.query_one("SELECT source_dirty FROM touchpoints WHERE id = 'b'");
    assert_eq!(dirty, 1);
    assert!(
        d.log()
            .contains("reconciled: 0 created, 1 updated, 0 deleted from uncommitted files (recorded as a dirty tree; --source git:REF applies committed files only)"),
        "{}",
        d.log()
    );
    // The rule is in the daemon's help.
    p.run(&["daemon", "--help"])
        .code(0)
        .stdout_has("uncommitted");
}
