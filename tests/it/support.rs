//! Helpers for the integration tests: a throw-away project folder and a way to run the real
//! `touchctl` binary in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::backend::{Backend, Cell, Database};

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

/// A temporary project: a folder with `touchpoints/`, secrets and a registry of its own (the
/// SQLite file in the folder, or a PostgreSQL database of its own, see [`crate::backend`]).
pub struct Project {
    dir: tempfile::TempDir,
    /// The project's PostgreSQL database, when its registry is there.
    postgres: Option<Database>,
}

impl Project {
    /// An empty project with an empty `touchpoints/` folder.
    pub fn empty() -> Self {
        Self::empty_on(Backend::Sqlite)
    }

    /// An empty project whose registry is on `backend`.
    pub fn empty_on(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("touchpoints")).expect("touchpoints dir");
        let postgres = (backend == Backend::Postgres).then(Database::create);
        Self { dir, postgres }
    }

    /// A project holding a copy of the repository's sample touchpoints and sandbox secrets.
    pub fn with_samples() -> Self {
        Self::with_samples_on(Backend::Sqlite)
    }

    /// A project holding the samples whose registry is on `backend`.
    pub fn with_samples_on(backend: Backend) -> Self {
        let p = Self::empty_on(backend);
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

    /// Its registry, opened through the library as a command opens it.
    pub fn registry(&self) -> Box<dyn touchctl::registry::Registry> {
        let state = match &self.postgres {
            None => self.path().join(".touchctl/state.db"),
            Some(db) => PathBuf::from(db.url()),
        };
        touchctl::registry::open(&state).unwrap_or_else(|e| panic!("open the registry: {e}"))
    }

    /// Its registry as messages and plans name it (the registry's `describe()`).
    pub fn registry_description(&self) -> String {
        match &self.postgres {
            None => "sqlite .touchctl/state.db".into(),
            Some(db) => format!("postgres {}", db.url()),
        }
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
    /// folder: a project's `secrets/` is one, as an operator would configure it. A project on
    /// PostgreSQL names its database in `TOUCHCTL_STATE` (a `--state` given in `args` wins).
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
        if let Some(db) = &self.postgres {
            cmd.env("TOUCHCTL_STATE", db.url());
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

    /// The single value a query of the registry returns (SQL both backends understand).
    pub fn query_one<T: Cell>(&self, sql: &str) -> T {
        match &self.postgres {
            None => self
                .state_db()
                .query_row(sql, [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Some(db) => {
                let row = db
                    .client()
                    .query_one(sql, &[])
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                T::from_pg(&row, 0).unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        }
    }

    /// The first column of every row a query of the registry returns.
    pub fn query_all<T: Cell>(&self, sql: &str) -> Vec<T> {
        match &self.postgres {
            None => {
                let db = self.state_db();
                let mut stmt = db.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                stmt.query_map([], |r| r.get(0))
                    .and_then(|rows| rows.collect())
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Some(db) => db
                .client()
                .query(sql, &[])
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|row| T::from_pg(row, 0).unwrap_or_else(|e| panic!("{sql}: {e}")))
                .collect(),
        }
    }

    /// Runs a statement against the registry (as another tool would write it), with text
    /// parameters `$1`, `$2`, ... (SQLite numbers `$1` as its first parameter too); returns the
    /// number of rows it changed.
    #[track_caller]
    pub fn execute(&self, sql: &str, params: &[&str]) -> u64 {
        match &self.postgres {
            None => {
                let changed = self
                    .state_db()
                    .execute(sql, rusqlite::params_from_iter(params))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                changed as u64
            }
            Some(db) => {
                let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                db.client()
                    .execute(sql, &params)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        }
    }

    /// Everything the registry stores, as text: the SQLite file's bytes (and its write-ahead log
    /// when one is left), or every row of every table of the project's PostgreSQL database.
    pub fn state_dump(&self) -> String {
        match &self.postgres {
            None => {
                let state =
                    std::fs::read(self.path().join(".touchctl/state.db")).expect("the state file");
                let mut dump = String::from_utf8_lossy(&state).into_owned();
                match std::fs::read(self.path().join(".touchctl/state.db-wal")) {
                    Ok(bytes) => dump += &String::from_utf8_lossy(&bytes),
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
                }
                dump
            }
            Some(db) => {
                let mut client = db.client();
                let tables: Vec<String> = client
                    .query(
                        "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) \
                         FROM information_schema.tables \
                         WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                        &[],
                    )
                    .expect("list the tables")
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                assert!(!tables.is_empty(), "the registry's database has no tables");
                let mut dump = String::new();
                for table in tables {
                    let sql = format!("SELECT t::text FROM {table} t");
                    for row in client
                        .query(&sql, &[])
                        .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    {
                        dump += &format!("{table}: {}\n", row.get::<_, String>(0));
                    }
                }
                dump
            }
        }
    }

    /// Makes the registry refuse to insert touchpoint `id` with `message`, as something outside
    /// touchctl would (a full disk, a constraint); [`Project::allow_inserts`] undoes it.
    pub fn refuse_inserts_of(&self, id: &str, message: &str) {
        match &self.postgres {
            None => self
                .state_db()
                .execute_batch(&format!(
                    "CREATE TRIGGER refuse_insert BEFORE INSERT ON touchpoints WHEN NEW.id = '{id}' \
                     BEGIN SELECT RAISE(ABORT, '{message}'); END;"
                ))
                .expect("create the refusing trigger"),
            Some(db) => db
                .client()
                .batch_execute(&format!(
                    "CREATE FUNCTION refuse_insert() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF NEW.id = '{id}' THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END $$; \
                     CREATE TRIGGER refuse_insert BEFORE INSERT ON touchpoints \
                     FOR EACH ROW EXECUTE FUNCTION refuse_insert();"
                ))
                .expect("create the refusing trigger"),
        }
    }

    /// Undoes [`Project::refuse_inserts_of`].
    pub fn allow_inserts(&self) {
        match &self.postgres {
            None => self
                .state_db()
                .execute_batch("DROP TRIGGER refuse_insert;")
                .expect("drop the refusing trigger"),
            Some(db) => db
                .client()
                .batch_execute(
                    "DROP TRIGGER refuse_insert ON touchpoints; DROP FUNCTION refuse_insert();",
                )
                .expect("drop the refusing trigger"),
        }
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
    #[track_caller]
    pub fn state_db(&self) -> rusqlite::Connection {
        assert!(
            self.postgres.is_none(),
            "state_db() is the SQLite file; this project's registry is on PostgreSQL"
        );
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
