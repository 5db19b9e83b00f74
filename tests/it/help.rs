//! The command line as a newcomer meets it: each command's `--help` lists the options that command
//! uses and no other, and shows examples; the names say what they are; `dispatch` tells how to
//! pass the daemon's API token.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::daemon_support::{Sink, custom_touchpoint, dispatch_args, users};
use crate::support::{Project, Run, run_command};

/// The options that were global before each command declared its own, and the commands that use
/// each of them.
const SHARED: [&str; 8] = [
    "dir",
    "state",
    "queue",
    "verbose",
    "quiet",
    "color",
    "secrets-dir",
    "secret-env-allow",
];

/// The options of the commands that read secrets.
const SECRETS: [&str; 2] = ["secrets-dir", "secret-env-allow"];

/// Every command (as its words) and the shared options it takes.
fn expected() -> BTreeMap<&'static str, Vec<&'static str>> {
    let with_secrets = |options: &[&'static str]| [options, &SECRETS[..]].concat();
    BTreeMap::from([
        ("validate", vec!["dir", "quiet"]),
        ("schema", vec![]),
        (
            "plan",
            with_secrets(&["dir", "state", "verbose", "quiet", "color"]),
        ),
        ("apply", with_secrets(&["dir", "state", "quiet", "color"])),
        ("import", with_secrets(&["dir", "state", "quiet"])),
        ("daemon", with_secrets(&["dir", "state", "queue"])),
        ("dispatch", vec!["quiet"]),
        ("deliveries", vec!["state", "queue"]),
        ("deliveries list", vec!["state", "queue"]),
        ("deliveries show", vec!["state", "queue"]),
        ("deliveries replay", vec!["state", "queue"]),
        ("force-unlock", vec!["state", "queue"]),
        ("sandbox", with_secrets(&["dir"])),
        ("auth", vec![]),
        ("auth wechat", vec![]),
        ("state", vec![]),
        ("state migrate", vec!["queue", "quiet"]),
        ("state unmark", vec!["queue"]),
    ])
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn commands_listed(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long names of the options a help text lists (`--dir <DIR>` → `dir`).
fn options_listed(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            let long = l.split_whitespace().find(|w| w.starts_with("--"))?;
            let name = long.trim_start_matches("--").trim_end_matches(',');
            Some(name.to_string())
        })
        .collect()
}

fn help(p: &Project, words: &str) -> Run {
    let mut args: Vec<&str> = words.split(' ').filter(|w| !w.is_empty()).collect();
    args.push("--help");
    let run = p.run(&args);
    run.code(0);
    run
}

#[test]
fn every_command_help_has_an_example_and_no_option_that_does_not_apply() {
    let p = Project::empty();
    let expected = expected();
    let top = help(&p, "").stdout;
    let mut listed: BTreeSet<String> = commands_listed(&top).into_iter().collect();
    for parent in ["deliveries", "auth", "state"] {
        for sub in commands_listed(&help(&p, parent).stdout) {
            listed.insert(format!("{parent} {sub}"));
        }
    }
    let known: BTreeSet<String> = expected.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        listed, known,
        "every command is in this test's table, and every entry is a command"
    );
    let mut wrong = Vec::new();
    for (command, takes) in &expected {
        let text = help(&p, command).stdout;
        let example = text
            .lines()
            .skip_while(|l| *l != "Examples:" && *l != "Example:")
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .any(|l| l.contains(&format!("touchctl {command}")));
        if !example {
            wrong.push(format!(
                "`touchctl {command} --help` shows no example of it"
            ));
        }
        let options = options_listed(&text);
        for shared in SHARED {
            match (takes.contains(&shared), options.contains(shared)) {
                (true, false) => wrong.push(format!("`{command}` does not list --{shared}")),
                (false, true) => wrong.push(format!(
                    "`{command}` lists --{shared}, which it does not use"
                )),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn deliveries_format_help_describes_the_deliveries_output_not_validate() {
    let p = Project::empty();
    for (command, describes) in [
        ("deliveries list", "Only the batch ids"),
        ("deliveries show", "failed recipients"),
    ] {
        let text = help(&p, command).stdout;
        assert!(!text.contains("diagnostic"), "{command}:\n{text}");
        assert!(!text.contains("path:line:col"), "{command}:\n{text}");
        assert!(text.contains(describes), "{command}:\n{text}");
    }
}

#[test]
fn the_batch_state_filter_is_not_named_like_the_state_option() {
    let p = Project::empty();
    let text = help(&p, "deliveries list").stdout;
    assert!(text.contains("--only <BATCH_STATE>"), "{text}");
    assert!(!text.contains("--status"), "{text}");
    for value in ["pending", "delivered", "failed", "dead"] {
        assert!(text.contains(&format!("- {value}:")), "{value} in\n{text}");
    }
    // A queue file with nothing in it, so that listing runs.
    std::fs::create_dir_all(p.path().join(".touchctl")).expect("state dir");
    touchctl::dispatch::queue::Queue::open(&p.path().join(".touchctl/queue.db"))
        .expect("create the queue file");
    for filter in ["--only", "--status"] {
        p.run(&["deliveries", "list", filter, "dead"])
            .code(0)
            .stdout_has("No batches match.");
    }
    p.run(&["deliveries", "list", "--only", "gone"])
        .code(1)
        .stderr_has("[possible values: pending, delivered, failed, dead]");
}

#[test]
fn options_before_the_command_still_work_and_are_refused_where_they_do_not_apply() {
    let p = Project::empty();
    p.write(
        "elsewhere/sms.toml",
        &custom_touchpoint("sms", "https://sms.example.com", 10, ""),
    );
    let quiet = p.run(&["--dir", "elsewhere", "-q", "validate"]);
    assert_eq!(quiet.code(0).stdout, "", "-q: nothing on success");
    p.run(&["validate", "--dir", "elsewhere"])
        .code(0)
        .stdout_has("ok: 1 touchpoint(s) under elsewhere are valid");
    p.run(&["--dir=elsewhere", "validate"])
        .code(0)
        .stdout_has("ok: 1 touchpoint(s) under elsewhere");
    p.run_env(&["validate"], &[("TOUCHCTL_DIR", "elsewhere")])
        .code(0)
        .stdout_has("ok: 1 touchpoint(s) under elsewhere");
    p.run_env(
        &[
            "--dir=elsewhere",
            "--color",
            "never",
            "-v",
            "--state",
            "other/state.db",
            "plan",
            "--detailed-exitcode",
        ],
        &[("SINK_TOKEN", "t")],
    )
    .code(2)
    .stdout_has("+ create sms (custom)  elsewhere/sms.toml");
    // Short flags together, and an option of `deliveries` before it.
    std::fs::create_dir_all(p.path().join("other")).expect("state dir");
    touchctl::dispatch::queue::Queue::open(&p.path().join("other/queue.db")).expect("queue");
    p.run(&["-qq", "--state", "other/state.db", "deliveries", "list"])
        .code(1)
        .stderr_has("unexpected argument '-q'");
    p.run(&["--state", "other/state.db", "deliveries", "list"])
        .code(0)
        .stdout_has("No batches match.");
    let run = p.run(&[
        "--state",
        "other.db",
        "dispatch",
        "--touchpoint",
        "sms",
        "--campaign",
        "c",
        "--users",
        "users.json",
    ]);
    run.code(1).stderr_has("unexpected argument '--state'");
    p.run(&["schema", "--check", "--dir", "elsewhere"])
        .code(1)
        .stderr_has("unexpected argument '--dir'");
}

#[test]
fn dispatch_help_and_its_401_name_the_api_token_variable() {
    let p = Project::empty();
    let text = help(&p, "dispatch").stdout;
    assert!(text.contains("TOUCHCTL_API_TOKEN"), "{text}");
    assert!(text.contains("--api-token-file <FILE>"), "{text}");

    let sink = Sink::ok();
    let env = [("SINK_TOKEN", "sink-token-value")];
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 10, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &env).code(0);
    let token = "a-daemon-token-of-forty-characters-long!";
    let d = p.start_daemon(
        &["--allow-private-network"],
        &[env[0], ("TOUCHCTL_API_TOKEN", token)],
    );
    let file: String = users(3).iter().map(|u| format!("{u}\n")).collect();
    p.write("users.ndjson", &file);
    p.write("wrong-token", "not-the-daemon-token-but-just-as-long!!!\n");
    p.write("token", &format!("{token}\n"));
    let dispatch = |extra: &[&str], env_token: Option<&str>| {
        let mut args = dispatch_args(&d.url, "sms");
        args.extend_from_slice(extra);
        let mut cmd = p.command(&args);
        cmd.env_remove("TOUCHCTL_API_TOKEN");
        if let Some(t) = env_token {
            cmd.env("TOUCHCTL_API_TOKEN", t);
        }
        run_command(&mut cmd)
    };
    dispatch(&[], None)
        .code(1)
        .stderr_has("needs its API token (HTTP 401): set TOUCHCTL_API_TOKEN");
    dispatch(&[], Some("not-the-daemon-token-but-just-as-long!!!"))
        .code(1)
        .stderr_has("refused the API token (HTTP 401): TOUCHCTL_API_TOKEN must hold");
    dispatch(&["--api-token-file", "wrong-token"], None)
        .code(1)
        .stderr_has("refused the API token (HTTP 401): the token in wrong-token must hold");
    let run = dispatch(&["--api-token-file", "token", "--wait"], None);
    run.code(0);
    let receipt: serde_json::Value = serde_json::from_str(&run.stdout).expect("receipt");
    assert_eq!(receipt["accepted"], json!(3), "{receipt}");
}
