//! Terminal escapes from files, endpoints and users: every human-readable output shows them
//! escaped (`\x1b`, `\u{202e}`), never as the raw characters a terminal would act on, and the
//! JSON outputs stay valid JSON that carries the exact text.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::daemon_support::{Sink, custom_touchpoint, dispatch_args, users};
use crate::support::{Project, Run};

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// Sets the window title (OSC 0), ended by BEL.
const TITLE: &str = "\x1b]0;pwned\x07";
/// Clears the screen (CSI 2J).
const CLEAR: &str = "\x1b[2J";
/// The single-character CSI of C1, then a bidi override.
const C1_BIDI: &str = "\u{9b}31m\u{202e}";

/// The characters of `text` a terminal acts on or reorders by: controls other than line breaks
/// and tabs, and the bidi controls.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n' && c != '\t')
                || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// Asserts that neither output of a run holds a raw control or bidi character.
#[track_caller]
fn assert_escaped(what: &str, run: &Run) {
    let found = raw_controls(&run.all());
    assert!(
        found.is_empty(),
        "`{what}` printed raw {found:?}\n--- stdout\n{}\n--- stderr\n{}",
        run.stdout.escape_debug(),
        run.stderr.escape_debug()
    );
}

/// The JSON standard output of a run; fails the test if it is not JSON or holds raw controls.
#[track_caller]
fn json_out(what: &str, run: &Run) -> Value {
    assert_escaped(what, run);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("`{what}` is not JSON ({e}):\n{}", run.stdout.escape_debug()))
}

#[test]
fn terminal_escapes_in_field_names_and_values_are_escaped_by_validate() {
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        "id = \"sms\"\nname = \"s\"\nkind = \"custom\"\ncategory = \"\\u009b2Jother\"\nurl = \"https://sms.example.com\"\nauth_token = { env = \"T\" }\n\"\\u001b]0;pwned\\u0007\" = 1\n\"a\\u202eb\" = 2\n",
    );
    let text = p.run(&["validate"]);
    text.code(1)
        .stdout_has("unknown field `\\x1b]0;pwned\\x07`")
        .stdout_has("unknown field `a\\u{202e}b`")
        .stdout_has("\\x9b2Jother");
    assert_escaped("validate", &text);
    let run = p.run(&["validate", "--format", "json"]);
    run.code(1);
    let doc = json_out("validate --format json", &run);
    let messages: Vec<&str> = doc["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .filter_map(|d| d["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains(TITLE)),
        "the JSON carries the exact field name: {messages:?}"
    );
}

#[test]
fn terminal_escapes_in_file_names_are_escaped_by_validate_and_plan() {
    let p = Project::empty();
    let hostile = format!("touchpoints/{TITLE}{C1_BIDI}.toml");
    let spec = custom_touchpoint("sms", "https://sms.example.com", 10, "");
    p.write(&hostile, &format!("unknown_field = 1\n{spec}"));
    let run = p.run(&["validate"]);
    run.code(1)
        .stdout_has("touchpoints/\\x1b]0;pwned\\x07\\x9b31m\\u{202e}.toml:")
        .stdout_has("unknown_field");
    assert_escaped("validate", &run);
    let run = p.run(&["validate", "--format", "json"]);
    let doc = json_out("validate --format json", &run);
    assert_eq!(doc["diagnostics"][0]["path"], json!(hostile));
    // The same for plan, which reports invalid files the same way.
    assert_escaped("plan", p.run_env(&["plan"], &ENV).code(1));

    p.write(&hostile, &spec);
    for format in ["text", "markdown"] {
        let run = p.run_env(&["plan", "--format", format], &ENV);
        run.code(0).stdout_has("\\x1b]0;pwned\\x07");
        assert_escaped(&format!("plan --format {format}"), &run);
    }
    let run = p.run_env(&["plan", "--format", "json"], &ENV);
    let doc = json_out("plan --format json", run.code(0));
    assert_eq!(doc["changes"][0]["file"], json!(hostile));
}

#[test]
fn terminal_escapes_in_label_keys_and_values_are_escaped_by_plan() {
    let p = Project::empty();
    let spec = custom_touchpoint("sms", "https://sms.example.com", 10, "");
    let with = |description: &str| {
        format!(
            "{spec}\n[labels]\n\"\\u001b[2Jteam\" = \"growth\\u009b31m\"\n\"owner\\u202e\" = \"\\u001b]0;pwned\\u0007\"\n"
        )
        .replacen(
            "kind = \"custom\"",
            &format!("kind = \"custom\"\ndescription = \"{description}\""),
            1,
        )
    };
    // A multi-line description is shown as a line diff, line by line.
    p.write(
        "touchpoints/sms.toml",
        &with("first line\\nsecond line\\nthird line"),
    );
    // Apply prints the plan of the new touchpoint, labels and all.
    let apply = p.run_env(&["apply", "--auto-approve"], &ENV);
    assert_escaped("apply", apply.code(0));
    p.write(
        "touchpoints/sms.toml",
        &with("first line\\nsecond \\u001b]0;pwned\\u0007 line\\u202e\\nthird line\\r"),
    );
    p.write(
        "touchpoints/sms.toml",
        &p.read("touchpoints/sms.toml")
            .replace("\\u001b[2Jteam", "\\u001b[2Jteams"),
    );
    let text = p.run_env(&["plan"], &ENV);
    text.code(0)
        .stdout_has("+ second \\x1b]0;pwned\\x07 line\\u{202e}")
        .stdout_has("labels.\\x1b[2Jteams")
        .stdout_has("\\x9b31m");
    assert_escaped("plan", &text);
    let markdown = p.run_env(&["plan", "--format", "markdown"], &ENV);
    markdown
        .code(0)
        .stdout_has("+ second \\x1b]0;pwned\\x07 line\\u{202e}");
    assert_escaped("plan --format markdown", &markdown);
    let run = p.run_env(&["plan", "--format", "json"], &ENV);
    let doc = json_out("plan --format json", run.code(0));
    let paths: Vec<&str> = doc["changes"][0]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert!(
        paths.iter().any(|path| path.contains("\x1b[2Jteams")),
        "the JSON plan carries the exact label key: {paths:?}"
    );
}

/// A project with two custom touchpoints on `sink`: `sms` and `push`, applied.
fn two_touchpoints(sink: &Sink) -> Project {
    let p = Project::empty();
    for id in ["sms", "push"] {
        p.write(
            &format!("touchpoints/{id}.toml"),
            &custom_touchpoint(id, &sink.url, 10, ""),
        );
    }
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p
}

#[test]
fn terminal_escapes_from_endpoints_and_user_ids_are_escaped_by_deliveries_and_dispatch() {
    // `sms` answers 2xx, failing the hostile user for good with a hostile reason; `push`
    // refuses every batch with a hostile error body.
    let sink = Sink::new(Arc::new(|_, body: &Value| {
        if body["touchpoint"] == "sms" {
            let failed = json!({"failed": [{
                "user_id": CLEAR,
                "reason": format!("{TITLE} {C1_BIDI}"),
                "retry": false,
            }]});
            (200, Vec::new(), failed.to_string(), Duration::ZERO)
        } else {
            (
                400,
                Vec::new(),
                format!("bad request {TITLE}{C1_BIDI}"),
                Duration::ZERO,
            )
        }
    }));
    let p = two_touchpoints(&sink);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &ENV);
    let mut list = users(2);
    list[0]["user_id"] = json!(CLEAR);
    // No phone: rejected at intake, with its id in the answer.
    list.push(json!({"user_id": format!("{C1_BIDI}{CLEAR}"), "attributes": {"member_id": "m"}}));
    let file: String = list.iter().map(|u| format!("{u}\n")).collect();
    p.write("users.ndjson", &file);
    for touchpoint in ["sms", "push"] {
        let mut args = dispatch_args(&d.url, touchpoint);
        args.push("--wait");
        let run = p.run(&args);
        // Finished with failures: exit 1, and the receipt on stdout.
        run.code(1);
        let receipt = json_out("dispatch", &run);
        assert_eq!(
            receipt["rejected"][0]["user_id"],
            json!(format!("{C1_BIDI}{CLEAR}")),
            "{receipt}"
        );
    }

    let run = p.run(&["deliveries", "list"]);
    run.code(0)
        .stdout_has("HTTP 400: bad request \\x1b]0;pwned\\x07\\x9b31m\\u{202e}");
    assert_escaped("deliveries list", &run);
    let run = p.run(&["deliveries", "list", "--format", "json"]);
    let batches = json_out("deliveries list --format json", run.code(0));
    let batch = |touchpoint: &str| {
        batches
            .as_array()
            .expect("batches")
            .iter()
            .find(|b| b["touchpoint"] == touchpoint)
            .and_then(|b| b["id"].as_str())
            .unwrap_or_else(|| panic!("no {touchpoint} batch in {batches}"))
            .to_string()
    };

    let run = p.run(&["deliveries", "show", &batch("sms")]);
    run.code(0)
        .stdout_has("\\x1b[2J: \\x1b]0;pwned\\x07 \\x9b31m\\u{202e}");
    assert_escaped("deliveries show", &run);
    let run = p.run(&["deliveries", "show", &batch("push")]);
    run.code(0).stdout_has("bad request \\x1b]0;pwned\\x07");
    assert_escaped("deliveries show", &run);
    let run = p.run(&["deliveries", "show", &batch("sms"), "--format", "json"]);
    let doc = json_out("deliveries show --format json", run.code(0));
    assert_eq!(
        doc["failed_recipients"][0],
        json!({"user_id": CLEAR, "reason": format!("{TITLE} {C1_BIDI}")}),
        "the JSON carries the exact text"
    );

    // The daemon's answers quote what it was sent; the error line escapes them.
    let run = p.run(&dispatch_args(&d.url, TITLE));
    run.code(1).stderr_has("\\x1b]0;pwned\\x07");
    assert_escaped("dispatch to an unknown touchpoint", &run);
}

#[test]
fn terminal_escapes_in_files_are_escaped_in_the_daemon_log() {
    let p = Project::empty();
    let spec = custom_touchpoint("sms", "https://sms.example.com", 10, "");
    p.write(
        "touchpoints/sms.toml",
        &format!("\"\\u001b]0;pwned\\u0007\" = 1\n\"x\\u009b2J\\u202e\" = 2\n{spec}"),
    );
    let d = p.start_daemon(&["--insecure-no-auth", "--watch"], &ENV);
    // Both unknown fields are logged, one line each.
    let deadline = std::time::Instant::now() + crate::daemon_support::PATIENCE;
    while d.log().matches("unknown-field").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log never showed both problems:\n{}",
            d.log().escape_debug()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log();
    assert!(log.contains("x\\x9b2J\\u{202e}"), "{}", log.escape_debug());
    assert!(log.contains("\\x1b]0;pwned\\x07"), "{}", log.escape_debug());
    let found = raw_controls(&log);
    assert!(
        found.is_empty(),
        "the log holds raw {found:?}:\n{}",
        log.escape_debug()
    );
}
