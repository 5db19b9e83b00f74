//! Bad-input fixtures: each folder under `tests/fixtures/bad/` holds one or more touchpoint files with
//! a mistake a real user makes, and `expected.txt`, the exact standard output of
//! `touchctl validate --dir tests/fixtures/bad/<case>` run from the repository root.
//!
//! To regenerate the expected outputs after a deliberate change to the diagnostics, run
//! `TOUCHCTL_BLESS=1 cargo test --test it bad_fixtures`, then read the diff of every `expected.txt`
//! before committing it: each line is what a user will see.
//!
//! To add a case, create `tests/fixtures/bad/<case>/<name>.toml` (starting with
//! `#:schema ../../../../schemas/touchpoint.schema.json`), bless, and review the new `expected.txt`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{Run, repo_root};

/// The fixtures folder, relative to the repository root (as the binary is given it).
const BAD: &str = "tests/fixtures/bad";

/// Fewer cases than this means fixtures were lost.
const MIN_CASES: usize = 30;

/// Cases that must hold a literal secret, one per kind, so the leak check cannot silently check nothing.
const LITERAL_SECRET_CASES: &[&str] = &[
    "custom-literal-auth-token",
    "oa-literal-app-secret",
    "wecom-literal-secret",
    "push-literal-master-secret",
    "platform-literal-aes-key",
];

/// Whether `TOUCHCTL_BLESS=1` asks for the expected outputs to be rewritten.
fn blessing() -> bool {
    std::env::var_os("TOUCHCTL_BLESS").is_some_and(|v| v == "1")
}

/// The case folders, sorted by name.
fn cases() -> Vec<String> {
    let dir = repo_root().join(BAD);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry"))
        .filter(|entry| entry.file_type().expect("file type").is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The touchpoint files of one case.
fn toml_files(case: &str) -> Vec<PathBuf> {
    let dir = repo_root().join(BAD).join(case);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn expected_path(case: &str) -> PathBuf {
    repo_root().join(BAD).join(case).join("expected.txt")
}

/// Runs `touchctl validate --dir tests/fixtures/bad/<case> <extra>` from the repository root.
fn validate(case: &str, extra: &[&str]) -> Run {
    let dir = format!("{BAD}/{case}");
    let out = Command::new(env!("CARGO_BIN_EXE_touchctl"))
        .args(["validate", "--dir", &dir])
        .args(extra)
        .current_dir(repo_root())
        .env_remove("TOUCHCTL_DIR")
        .env_remove("TOUCHCTL_STATE")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run touchctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Indents a block of output so a report of many cases stays readable.
fn indent(text: &str) -> String {
    if text.is_empty() {
        return "    (nothing)\n".into();
    }
    text.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn every_bad_fixture_prints_exactly_its_expected_diagnostics() {
    let cases = cases();
    assert!(
        cases.len() >= MIN_CASES,
        "expected at least {MIN_CASES} cases under {BAD}, found {}",
        cases.len()
    );
    let bless = blessing();
    let mut failures = Vec::new();
    for case in &cases {
        assert!(
            !toml_files(case).is_empty(),
            "{BAD}/{case} holds no .toml file"
        );
        let run = validate(case, &[]);
        if run.code != 1 {
            failures.push(format!(
                "{case}: exit code {} (expected 1)\n  stdout:\n{}  stderr:\n{}",
                run.code,
                indent(&run.stdout),
                indent(&run.stderr)
            ));
            continue;
        }
        let path = expected_path(case);
        if bless {
            std::fs::write(&path, &run.stdout)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            continue;
        }
        match std::fs::read_to_string(&path) {
            Err(e) => failures.push(format!(
                "{case}: cannot read {} ({e}); run with TOUCHCTL_BLESS=1 to create it\n  actual:\n{}",
                path.display(),
                indent(&run.stdout)
            )),
            Ok(expected) if expected != run.stdout => failures.push(format!(
                "{case}: stdout differs from expected.txt\n  expected:\n{}  actual:\n{}",
                indent(&expected),
                indent(&run.stdout)
            )),
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad fixture(s) failed (if the change is deliberate, rerun with TOUCHCTL_BLESS=1 \
         and review the diff):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The value at a dotted path of a TOML document, if any.
fn lookup<'a>(doc: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let first = doc.get(parts.next()?)?;
    parts.try_fold(first, |v, part| v.as_table()?.get(part))
}

/// Every literal secret written in a fixture: (case, field, value). Files that do not parse (the
/// syntax and encoding cases) hold none.
fn literal_secrets() -> Vec<(String, &'static str, String)> {
    let mut found = Vec::new();
    for case in cases() {
        for file in toml_files(&case) {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Ok(doc) = toml::from_str::<toml::Table>(&text) else {
                continue;
            };
            for field in touchctl::model::SECRET_FIELDS {
                if let Some(toml::Value::String(value)) = lookup(&doc, field) {
                    found.push((case.clone(), *field, value.clone()));
                }
            }
        }
    }
    found
}

#[test]
fn literal_secrets_never_appear_in_the_output() {
    let literals = literal_secrets();
    let with_literal: BTreeSet<&str> = literals.iter().map(|(c, _, _)| c.as_str()).collect();
    for case in LITERAL_SECRET_CASES {
        assert!(
            with_literal.contains(case),
            "{case} should hold a literal secret (found literals in: {with_literal:?})"
        );
    }
    let mut leaks = Vec::new();
    for (case, field, value) in &literals {
        for extra in [&[][..], &["--format", "json"][..]] {
            let run = validate(case, extra);
            if run.all().contains(value.as_str()) {
                leaks.push(format!(
                    "{case}: the literal `{field}` is echoed by `validate {}`\n  stdout:\n{}  stderr:\n{}",
                    extra.join(" "),
                    indent(&run.stdout),
                    indent(&run.stderr)
                ));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "literal secrets leaked:\n\n{}",
        leaks.join("\n")
    );
}

#[test]
fn json_diagnostics_match_the_text_ones() {
    let case = "several-files-several-problems";
    let text = validate(case, &[]);
    text.code(1);
    let json = validate(case, &["--format", "json"]);
    json.code(1);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("--format json is not JSON ({e}):\n{}", json.stdout));
    assert_eq!(doc["valid"], serde_json::Value::Bool(false), "{doc:#}");
    let diagnostics = doc["diagnostics"]
        .as_array()
        .unwrap_or_else(|| panic!("no diagnostics array:\n{doc:#}"));
    assert!(diagnostics.len() > 1, "{doc:#}");
    let rendered: String = diagnostics
        .iter()
        .map(|d| {
            let s = |k: &str| {
                d[k].as_str()
                    .unwrap_or_else(|| panic!("`{k}` is not a string in {d}"))
                    .to_string()
            };
            let n = |k: &str| {
                d[k].as_u64()
                    .unwrap_or_else(|| panic!("`{k}` is not a number in {d}"))
            };
            format!(
                "{}:{}:{}: error[{}]: {}\n",
                s("path"),
                n("line"),
                n("column"),
                s("code"),
                s("message")
            )
        })
        .collect();
    assert_eq!(rendered, text.stdout);
}

#[test]
fn fixture_files_point_at_the_schema() {
    let schema = repo_root().join("schemas/touchpoint.schema.json");
    assert!(schema.is_file(), "{} is missing", schema.display());
    let mut wrong = Vec::new();
    for case in cases() {
        for file in toml_files(&case) {
            // A link is a case of its own (`error[link]`), not a touchpoint file.
            if file.is_symlink() {
                continue;
            }
            let bytes = std::fs::read(&file).expect("read fixture");
            let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
            let Some(rel) = first.strip_prefix(b"#:schema ") else {
                wrong.push(format!("{}: no #:schema line", file.display()));
                continue;
            };
            let rel = String::from_utf8_lossy(rel);
            let target = file.parent().unwrap_or(Path::new(".")).join(rel.trim());
            if !target.is_file() {
                wrong.push(format!("{}: {rel} does not exist", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
