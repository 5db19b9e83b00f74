//! The committed schema is current, taplo accepts it, and it really constrains files.

use std::process::Command;

use crate::support::{Project, repo_root};

#[test]
fn committed_schema_is_current() {
    let out = Command::new(env!("CARGO_BIN_EXE_touchctl"))
        .args(["schema", "--check"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "schemas/touchpoint.schema.json is stale: run `cargo run -- schema` and commit it\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn schema_check_fails_on_a_stale_file() {
    let p = Project::with_samples();
    let path = "schemas/touchpoint.schema.json";
    let text = p
        .read(path)
        .replace("Recipients per request", "Recipients per call");
    p.write(path, &text);
    let run = p.run(&["schema", "--check"]);
    run.code(1);
    assert!(run.stderr.contains("is stale"), "{}", run.stderr);
    p.run(&["schema"]).code(0);
    p.run(&["schema", "--check"]).code(0);
}

#[test]
fn every_sample_file_names_the_schema() {
    for dir in ["touchpoints", "examples"] {
        for file in walk(&repo_root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                text.starts_with("#:schema "),
                "{} does not start with a #:schema line",
                file.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out
}

fn taplo(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new("taplo")
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("taplo is not installed: `npm install -g @taplo/cli` (.ci/run does this)")
}

/// Lints `files` (relative to `cwd`) with taplo against the committed schema; fails the test,
/// showing taplo's complaint, if taplo refuses any of them.
#[track_caller]
pub fn taplo_lint(cwd: &std::path::Path, files: &[&str]) {
    let schema = format!(
        "file://{}/schemas/touchpoint.schema.json",
        repo_root().display()
    );
    let mut args = vec!["lint", "--schema", schema.as_str()];
    args.extend_from_slice(files);
    let out = taplo(&args, cwd);
    assert!(
        out.status.success(),
        "taplo refused {files:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Editors validate through taplo: the schema must be one taplo reads, and it must accept the
/// samples and refuse a broken file.
#[test]
fn taplo_accepts_the_samples_and_refuses_bad_files() {
    let root = repo_root();
    let schema = format!("file://{}/schemas/touchpoint.schema.json", root.display());
    let files: Vec<String> = walk(&root.join("touchpoints"))
        .into_iter()
        .map(|p| p.display().to_string())
        .collect();
    assert!(files.len() >= 5);
    taplo_lint(&root, &files.iter().map(String::as_str).collect::<Vec<_>>());

    let p = Project::with_samples();
    let sms = p
        .read("touchpoints/custom/sms.toml")
        .replace("batch_size = 500", "batch_size = 501");
    p.write("touchpoints/custom/sms.toml", &sms);
    let out = taplo(
        &[
            "lint",
            "--schema",
            schema.as_str(),
            "touchpoints/custom/sms.toml",
        ],
        p.path(),
    );
    assert!(
        !out.status.success(),
        "taplo accepted batch_size = 501: the schema does not constrain it"
    );
}
