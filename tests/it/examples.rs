//! Every example under `examples/` validates and plans.

use std::path::Path;

use crate::support::{Project, copy_dir, repo_root};

/// The names inside `{ env = "NAME" }` references of a file.
fn env_refs(text: &str) -> Vec<String> {
    text.split("{ env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(String::from)
        .collect()
}

#[test]
fn every_example_validates_and_plans() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let example = entry.unwrap().path();
        if !example.join("touchpoints").is_dir() {
            continue;
        }
        seen += 1;
        let p = Project::empty();
        let mounted = tempfile::tempdir().unwrap();
        let run_secrets = mounted.path().display().to_string();
        copy_dir(&example.join("touchpoints"), &p.path().join("touchpoints"));
        copy_dir(&repo_root().join("schemas"), &p.path().join("schemas"));
        let mut envs = Vec::new();
        for file in touchctl::load::discover(&p.path().join("touchpoints")).unwrap() {
            let mut text = std::fs::read_to_string(&file).unwrap();
            envs.extend(env_refs(&text));
            // Secrets mounted at /run/secrets in production: stand-ins in a folder of the same
            // role, outside the repository, named by --secrets-dir as in production.
            if text.contains("{ file = \"/run/secrets/") {
                text = text.replace(
                    "{ file = \"/run/secrets/",
                    &format!("{{ file = \"{run_secrets}/"),
                );
                std::fs::write(&file, text).unwrap();
            }
        }
        std::fs::write(
            Path::new(&run_secrets).join("wechat_oa_refresh_token"),
            "stand-in-refresh-token",
        )
        .unwrap();
        let run = p.run(&["validate"]);
        run.code(0);
        let mut cmd = p.command(&["--secrets-dir", &run_secrets, "plan", "--detailed-exitcode"]);
        for name in &envs {
            cmd.env(name, format!("stand-in-{name}"));
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: plan failed\n{}{}",
            example.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("to create"), "{stdout}");
        for name in &envs {
            assert!(
                !stdout.contains(&format!("stand-in-{name}")),
                "a secret leaked into the plan"
            );
        }
    }
    assert!(seen >= 1, "no examples found");
}
