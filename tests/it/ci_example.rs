//! `examples/ci/touchpoints-review.yml` works: it is valid GitHub Actions YAML with the triggers,
//! permissions and history a review needs, and its shell steps, run here as the runner would run
//! them, validate, plan a real pull request branch with `--base`, and fail on invalid files.

use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

use crate::support::{Project, repo_root};

fn workflow() -> Yaml {
    let text = std::fs::read_to_string(repo_root().join("examples/ci/touchpoints-review.yml"))
        .expect("the example workflow");
    YamlLoader::load_from_str(&text)
        .expect("valid YAML")
        .pop()
        .expect("one document")
}

/// The `run:` script of the step with this `id`.
fn script(wf: &Yaml, id: &str) -> String {
    wf["jobs"]["review"]["steps"]
        .as_vec()
        .expect("steps")
        .iter()
        .find(|s| s["id"].as_str() == Some(id))
        .and_then(|s| s["run"].as_str())
        .unwrap_or_else(|| panic!("no step with id {id} and a run script"))
        .to_string()
}

/// Runs a step's script as GitHub's `shell: bash` does, with the runner's variables pointing into
/// `tmp` and the freshly built touchctl first on the PATH.
fn run_step(p: &Project, tmp: &Path, body: &str) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_touchctl"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", body])
        .current_dir(p.path())
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .env("RUNNER_TEMP", tmp)
        .env("VALIDATE_OUT", tmp.join("validate.txt"))
        .env("PLAN_OUT", tmp.join("plan.md"))
        .env("BASE_REF", "main")
        .env("GITHUB_OUTPUT", tmp.join("output"))
        .env("GITHUB_PATH", tmp.join("path"))
        .env_remove("TOUCHCTL_DIR")
        .env_remove("TOUCHCTL_STATE")
        .output()
        .expect("bash")
}

#[test]
fn the_workflow_has_what_a_review_needs() {
    let wf = workflow();
    assert_eq!(wf["name"].as_str(), Some("touchpoints review"));
    assert!(
        !wf["on"]["pull_request"].is_badvalue(),
        "runs on pull requests"
    );
    assert_eq!(wf["permissions"]["pull-requests"].as_str(), Some("write"));
    let steps = wf["jobs"]["review"]["steps"].as_vec().expect("steps");
    let checkout = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/checkout@"))
        })
        .expect("a checkout step");
    assert_eq!(
        checkout["with"]["fetch-depth"].as_i64(),
        Some(0),
        "plan --base needs the base branch's history"
    );
    let comment = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.contains("sticky-pull-request-comment"))
        })
        .expect("a step posting the comment");
    assert_eq!(
        comment["with"]["path"].as_str(),
        Some("${{ runner.temp }}/plan.md")
    );
    assert!(script(&wf, "plan").contains("--format markdown"));
    for s in steps {
        if let Some(run) = s["run"].as_str() {
            assert!(
                !run.contains("${{"),
                "expressions belong in env, not in scripts (injection): {run}"
            );
        }
    }
}

#[test]
fn the_workflow_steps_validate_plan_and_fail_on_errors() {
    let wf = workflow();
    let p = Project::with_samples();
    p.git_init();
    p.git(&["checkout", "-q", "-b", "feature"]);
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 500",
        "batch_size = 100",
    );
    p.commit_all("smaller sms batches");
    let tmp = tempfile::tempdir().expect("temp");

    let validate = run_step(&p, tmp.path(), &script(&wf, "validate"));
    assert!(validate.status.success(), "{validate:?}");
    let plan = run_step(&p, tmp.path(), &script(&wf, "plan"));
    assert!(plan.status.success(), "{plan:?}");
    let comment = std::fs::read_to_string(tmp.path().join("plan.md")).expect("plan.md");
    assert!(
        comment.contains("| `sms` | custom | update | ⚠️ `batch_size` |"),
        "{comment}"
    );
    let output = std::fs::read_to_string(tmp.path().join("output")).expect("GITHUB_OUTPUT");
    assert_eq!(output, "changes=true\n");

    // An invalid file fails the check, and the explanation carries the diagnostic.
    p.set(
        "touchpoints/custom/sms.toml",
        "batch_size = 100",
        "batch_size = 0",
    );
    let validate = run_step(&p, tmp.path(), &script(&wf, "validate"));
    assert!(
        !validate.status.success(),
        "validation errors fail the check"
    );
    let explain = run_step(&p, tmp.path(), &script(&wf, "explain"));
    assert!(explain.status.success(), "{explain:?}");
    let comment = std::fs::read_to_string(tmp.path().join("plan.md")).expect("plan.md");
    assert!(comment.starts_with("### touchctl validate found problems"));
    assert!(
        comment.contains("touchpoints/custom/sms.toml:12:14: error[out-of-range]"),
        "{comment}"
    );
    // The plan step fails too rather than posting a plan of a broken tree.
    let plan = run_step(&p, tmp.path(), &script(&wf, "plan"));
    assert!(!plan.status.success());
}
