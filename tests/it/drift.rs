//! Drift and `plan --detailed-exitcode`: the text, the JSON summary and the exit code say the same,
//! on each registry backend.

use serde_json::Value;

use crate::backend::{Backend, on_both_backends};
use crate::support::Project;

on_both_backends!(a_paused_touchpoint_is_no_change_in_the_text_the_json_and_the_exit_code);

fn a_paused_touchpoint_is_no_change_in_the_text_the_json_and_the_exit_code(b: Backend) {
    let p = Project::with_samples_on(b);
    p.run(&["apply", "--auto-approve"]).code(0);
    // Paused through the admin API, as the daemon's pause writes it.
    let changed = p.execute(
        "UPDATE touchpoints SET paused = TRUE, generation = generation + 1 WHERE id = 'wecom-stores'",
        &[],
    );
    assert_eq!(changed, 1);
    let run = p.run(&["plan", "--detailed-exitcode"]);
    run.code(0)
        .stdout_has("Plan: 0 to create, 0 to update, 0 to delete, 7 unchanged.")
        .stdout_has("! wecom-stores (wecom): paused through the admin API; not a change: apply keeps it paused")
        .stdout_has("No changes: the registry matches the files. 1 touchpoint is paused through the admin API, which is not a change: apply keeps it paused.");
    let json = p.run(&["plan", "--format", "json", "--detailed-exitcode"]);
    json.code(0);
    let doc: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        doc["summary"],
        serde_json::json!({"create": 0, "update": 0, "delete": 0, "no_op": 7, "drift": 1, "paused": 1})
    );
    p.run(&["plan", "--format", "markdown", "--detailed-exitcode"])
        .code(0)
        .stdout_has("**No changes.** 1 touchpoint is paused through the admin API, which is not a change: apply keeps it paused.");
    // Apply has nothing to do, and leaves the pause.
    p.run(&["apply", "--auto-approve"]).code(0);
    let paused: i64 = p.query_one("SELECT paused FROM touchpoints WHERE id = 'wecom-stores'");
    assert_eq!(paused, 1);

    // A field changed outside apply is a change: apply restores it.
    let spec: String = p.query_one("SELECT spec FROM touchpoints WHERE id = 'sms'");
    let changed = spec.replace("\"enabled\":true", "\"enabled\":false");
    assert_ne!(spec, changed);
    p.execute(
        "UPDATE touchpoints SET live_spec = $1, generation = generation + 1 WHERE id = 'sms'",
        &[changed.as_str()],
    );
    let run = p.run(&["plan", "--detailed-exitcode"]);
    run.code(2)
        .stdout_has("Plan: 0 to create, 1 to update, 0 to delete, 6 unchanged.");
    assert!(!run.stdout.contains("No changes"), "{}", run.stdout);
    let json = p.run(&["plan", "--format", "json", "--detailed-exitcode"]);
    json.code(2);
    let doc: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        (
            &doc["summary"]["update"],
            &doc["summary"]["drift"],
            &doc["summary"]["paused"]
        ),
        (&1.into(), &2.into(), &1.into())
    );
}
