//! Helpers for the integration tests: a throw-away project folder and a way to run the real
//! `touchctl` binary in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root (where `touchpoints/` and `secrets/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// The exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(
            self.code, expected,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts that standard output contains `text`, showing it when it does not.
    #[track_caller]
    pub fn stdout_has(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "no {text:?} in stdout:\n{}",
            self.stdout
        );
        self
    }

    /// Asserts that standard error contains `text`, showing it when it does not.
    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "no {text:?} in stderr:\n{}",
            self.stderr
        );
        self
    }

    /// Standard output and standard error together.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A temporary project: a folder with `touchpoints/`, secrets and a state file of its own.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    /// An empty project with an empty `touchpoints/` folder.
    pub fn empty() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("touchpoints")).expect("touchpoints dir");
        Self { dir }
    }

    /// A project holding a copy of the repository's sample touchpoints and sandbox secrets.
    pub fn with_samples() -> Self {
        let p = Self::empty();
        copy_dir(
            &repo_root().join("touchpoints"),
            &p.path().join("touchpoints"),
        );
        copy_dir(&repo_root().join("secrets"), &p.path().join("secrets"));
        copy_dir(&repo_root().join("schemas"), &p.path().join("schemas"));
        p
    }

    /// The project folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (creating folders), relative to the project.
    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let path = self.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("parent dir");
        }
        std::fs::write(path, text).expect("write file");
        self
    }

    /// Reads a file relative to the project.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).expect("read file")
    }

    /// Removes a file relative to the project.
    pub fn remove(&self, rel: &str) -> &Self {
        std::fs::remove_file(self.path().join(rel)).expect("remove file");
        self
    }

    /// A command running the binary in the project, with no inherited touchctl settings. Outside
    /// git the repository is `touchpoints/` alone, so secret files beside it need a secrets
    /// folder: a project's `secrets/` is one, as an operator would configure it.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_touchctl"));
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("TOUCHCTL_DIR")
            .env_remove("TOUCHCTL_STATE")
            .env_remove("TOUCHCTL_SECRETS_DIR")
            .env_remove("TOUCHCTL_SECRET_ENV_ALLOW")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if self.path().join("secrets").is_dir() {
            cmd.env("TOUCHCTL_SECRETS_DIR", self.path().join("secrets"));
        }
        cmd
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// Runs the binary to completion with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run touchctl");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The single value a query of the state file returns.
    pub fn query_one<T: rusqlite::types::FromSql>(&self, sql: &str) -> T {
        self.state_db()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The first column of every row a query of the state file returns.
    pub fn query_all<T: rusqlite::types::FromSql>(&self, sql: &str) -> Vec<T> {
        let db = self.state_db();
        let mut stmt = db.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        stmt.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// How many touchpoints the registry holds.
    pub fn touchpoint_count(&self) -> i64 {
        self.query_one("SELECT count(*) FROM touchpoints")
    }

    /// Runs git in the project (author and committer fixed, no user config needed) and returns
    /// its trimmed standard output; fails the test if git fails.
    #[track_caller]
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.path())
            .env("GIT_AUTHOR_NAME", "Reviewer")
            .env("GIT_AUTHOR_EMAIL", "reviewer@example.com")
            .env("GIT_COMMITTER_NAME", "Reviewer")
            .env("GIT_COMMITTER_EMAIL", "reviewer@example.com")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.path())
            .output()
            .expect("run git (is it installed?)");
        assert!(
            out.status.success(),
            "git {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Makes the project a git repository on branch `main` with everything committed (the state
    /// folder ignored); returns the commit id.
    pub fn git_init(&self) -> String {
        self.git(&["init", "-q"]);
        self.git(&["symbolic-ref", "HEAD", "refs/heads/main"]);
        self.write(".gitignore", ".touchctl/\n");
        self.commit_all("touchpoints")
    }

    /// Commits everything in the work tree; returns the commit id.
    pub fn commit_all(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// Replaces the first `from` in a file with `to`, failing if `from` is not there.
    #[track_caller]
    pub fn set(&self, rel: &str, from: &str, to: &str) -> &Self {
        let text = self.read(rel);
        assert!(text.contains(from), "{from:?} not in {rel}");
        self.write(rel, &text.replacen(from, to, 1))
    }

    /// Opens the project's state file directly, to look at or tamper with it as another tool would.
    pub fn state_db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path().join(".touchctl/state.db")).expect("open state db")
    }
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Runs a command built with [`Project::command`] (and changed as a test needs) to completion.
pub fn run_command(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run touchctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the Python script `tests/conformance/<script>` with `args`: its run, or `None` when what
/// it needs here (a Python library, Chromium) is missing, which the script says by exiting 3. Under
/// `CI=true` a missing dependency fails the test instead: `.ci/run` installs everything.
pub fn conformance(test: &str, script: &str, args: &[&str]) -> Option<Run> {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/conformance").join(script))
        .args(args);
    let run = run_command(&mut cmd);
    if run.code == 3 && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!(
            "SKIPPED {test}: {}(.ci/run installs it; under CI=true this test fails instead)",
            run.stdout
        );
        return None;
    }
    Some(run)
}
