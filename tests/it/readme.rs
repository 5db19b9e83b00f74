//! The README's command blocks run, in order, against the output they show, so the guide cannot
//! drift from the program.
//!
//! Every fenced block whose info string is `console` is a part of one session, run top to bottom
//! in a fresh copy of the repository's user-facing files (`touchpoints/`, `secrets/`, `schemas/`,
//! `examples/`, `.gitignore`) made a git repository with everything committed on `main`, with the
//! binary under test first on the `PATH`. One `bash` runs the whole session, so `export`, `cd`
//! and background jobs carry over from block to block, as in a reader's terminal.
//!
//! In a block:
//! - `$ COMMAND` is a command; a line ending in `\` continues on the next line.
//! - The lines up to the next `$ ` are what it prints (standard output and error together),
//!   compared line by line after trailing spaces are trimmed: `...` alone on a line stands for any
//!   number of lines, `[..]` for any text within a line.
//! - A trailing `# exits N` comment says the command exits with `N`; otherwise it must exit 0.
//! - A command ending in `&` runs in the background; the lines shown under it are the first lines
//!   it prints, which the session waits for (that is how it knows a server is up).
//!
//! What the session does differently from a reader, each for a reason:
//! - `cargo install --locked --path .` is skipped: the binary under test is already on the `PATH`.
//! - `bash .ci/run` is skipped: it is what runs this test.
//! - The daemon's and the sandbox's ports (8640, 8641) are replaced by free ports, in the commands,
//!   the copied files (the samples, `examples/demo/run.sh`) and the environment (`TOUCHCTL_LISTEN`, `TOUCHCTL_URL`), and put back in
//!   what is printed before it is compared: tests never take fixed ports.
//!
//! A `<!-- file: NAME -->` comment right before a `>` quote says that the quote is the file `NAME`
//! of the session's folder as GitHub renders it (the pull-request comment); it is compared after
//! the block that precedes it.
//!
//! A `<!-- session: postgres -->` comment right before a `console` block puts that block in a
//! second session, run by a test of its own against a database of its own on the test server
//! (`TOUCHCTL_TEST_POSTGRES`; without it that test says it is skipped, and fails under `CI=true`).
//! The README's database, `postgres://touchctl@127.0.0.1:5432/touchctl`, stands for it, swapped in
//! and out as the ports are; the second daemon's port, 8650, is swapped too.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{copy_dir, repo_root};

/// How long one command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// One `$` command of a block, with what it shows.
#[derive(Debug)]
struct Step {
    /// The README line the command starts on (1-based), for messages.
    line: usize,
    command: String,
    expected: Vec<String>,
    code: i32,
    background: bool,
    /// Whether the step belongs to the PostgreSQL session.
    postgres: bool,
}

/// A part of the README the session checks, in order.
#[derive(Debug)]
enum Part {
    Step(Step),
    /// A quote that shows a file of the session's folder.
    File {
        line: usize,
        name: String,
        expected: Vec<String>,
    },
}

fn parse(readme: &str) -> Vec<Part> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    let mut postgres_next = false;
    while i < lines.len() {
        let line = lines[i];
        if line.trim() == "<!-- session: postgres -->" {
            postgres_next = true;
            i += 1;
            continue;
        }
        if let Some(name) = line
            .trim()
            .strip_prefix("<!-- file: ")
            .and_then(|r| r.strip_suffix(" -->"))
        {
            let start = i + 1;
            let mut expected = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].starts_with('>') {
                let l = lines[i];
                expected.push(l.strip_prefix("> ").unwrap_or(&l[1..]).to_string());
                i += 1;
            }
            assert!(
                !expected.is_empty(),
                "README:{start}: no quote after the file comment"
            );
            parts.push(Part::File {
                line: start,
                name: name.to_string(),
                expected,
            });
            continue;
        }
        if line.trim_start().starts_with("```") && line.trim() == "```console" {
            let postgres = std::mem::take(&mut postgres_next);
            i += 1;
            let mut current: Option<Step> = None;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                let l = lines[i];
                if let Some(first) = l.strip_prefix("$ ") {
                    if let Some(s) = current.take() {
                        parts.push(Part::Step(s));
                    }
                    let start = i + 1;
                    let mut command = first.to_string();
                    while command.ends_with('\\') && i + 1 < lines.len() {
                        i += 1;
                        command.push('\n');
                        command.push_str(lines[i]);
                    }
                    let (command, code) = exit_comment(&command);
                    let background = command.trim_end().ends_with('&');
                    current = Some(Step {
                        line: start,
                        command,
                        expected: Vec::new(),
                        code,
                        background,
                        postgres,
                    });
                } else {
                    let step = current.as_mut().unwrap_or_else(|| {
                        panic!("README:{}: output before any `$ ` command", i + 1)
                    });
                    step.expected.push(l.to_string());
                }
                i += 1;
            }
            if let Some(s) = current.take() {
                parts.push(Part::Step(s));
            }
        }
        i += 1;
    }
    parts
}

/// Splits a trailing `# exits N` off a command.
fn exit_comment(command: &str) -> (String, i32) {
    if let Some((before, after)) = command.rsplit_once("# exits ")
        && let Ok(code) = after.trim().parse()
    {
        return (before.trim_end().to_string(), code);
    }
    (command.to_string(), 0)
}

/// Whether `actual` matches `expected`, where `...` lines stand for any lines and `[..]` for any
/// text within a line.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e.trim() == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((e, rest)) => match actual.split_first() {
            Some((a, arest)) => line_matches(e.trim_end(), a.trim_end()) && matches(rest, arest),
            None => false,
        },
    }
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let mut pieces = expected.split("[..]");
    let first = pieces.next().unwrap_or("");
    let Some(mut rest) = actual.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    for (n, piece) in pieces.iter().enumerate() {
        if n + 1 == pieces.len() {
            return rest.ends_with(piece);
        }
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The one shell of the session; background jobs it started are killed when it is dropped.
struct Session {
    shell: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
    logs: PathBuf,
    ports: [(u16, &'static str); 2],
    /// Text swapped in commands and back in what they print: (the session's, the README's).
    swaps: Vec<(String, String)>,
    count: usize,
}

impl Session {
    fn start(
        dir: &Path,
        logs: &Path,
        ports: [(u16, &'static str); 2],
        swaps: Vec<(String, String)>,
    ) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_touchctl"))
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let mut shell = Command::new("bash")
            .args(["--noprofile", "--norc", "-s"])
            .current_dir(dir)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("NO_COLOR", "1")
            .env("HOME", logs)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "Reviewer")
            .env("GIT_AUTHOR_EMAIL", "reviewer@example.com")
            .env("GIT_COMMITTER_NAME", "Reviewer")
            .env("GIT_COMMITTER_EMAIL", "reviewer@example.com")
            .env("TOUCHCTL_LISTEN", format!("127.0.0.1:{}", ports[0].0))
            .env("TOUCHCTL_URL", format!("http://127.0.0.1:{}", ports[0].0))
            .env_remove("TOUCHCTL_DIR")
            .env_remove("TOUCHCTL_STATE")
            .env_remove("TOUCHCTL_API_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash");
        let mut stdin = shell.stdin.take().expect("stdin");
        stdin
            .write_all(b"set -m\n")
            .expect("write to the session's shell");
        let stdout = shell.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            shell,
            stdin,
            lines,
            dir: dir.to_path_buf(),
            logs: logs.to_path_buf(),
            ports,
            swaps,
            count: 0,
        }
    }

    /// The command as the session runs it: skipped steps become `true`, ports are swapped.
    fn rewrite(&self, command: &str) -> String {
        let mut c = command.replace("cargo install --locked --path . && ", "");
        if c.trim() == "cargo install --locked --path ." || c.trim() == "bash .ci/run" {
            c = "true".to_string();
        }
        for (port, shown) in self.ports {
            c = c.replace(shown, &port.to_string());
        }
        for (actual, shown) in &self.swaps {
            c = c.replace(shown.as_str(), actual);
        }
        c
    }

    /// What a command printed, with the session's ports shown as the README's.
    fn normalize(&self, text: &str) -> Vec<String> {
        let mut t = text.to_string();
        for (actual, shown) in &self.swaps {
            t = t.replace(actual.as_str(), shown);
        }
        for (port, shown) in self.ports {
            t = t.replace(&port.to_string(), shown);
        }
        t.lines().map(|l| l.trim_end().to_string()).collect()
    }

    /// Runs one command to its end; returns its exit code and output.
    fn run(&mut self, step: &Step) -> (i32, Vec<String>) {
        self.count += 1;
        let n = self.count;
        let out = self.logs.join(format!("out.{n}"));
        let command = self.rewrite(&step.command);
        let script = if step.background {
            let body = command.trim_end().trim_end_matches('&');
            format!(
                "{{ {body}\n}} > {out} 2>&1 &\necho $! >> {pids}\necho \"__done_{n}=0\"\n",
                out = out.display(),
                pids = self.logs.join("pids").display()
            )
        } else {
            format!(
                "{{ {command}\n}} > {out} 2>&1 < /dev/null\necho \"__done_{n}=$?\"\n",
                out = out.display()
            )
        };
        self.stdin
            .write_all(script.as_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("write to the session's shell");
        let deadline = Instant::now() + COMMAND_LIMIT;
        let marker = format!("__done_{n}=");
        let code = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(code) = line.strip_prefix(&marker) {
                        break code.parse().unwrap_or(-1);
                    }
                }
                Err(_) => panic!(
                    "README:{}: `{}` did not finish within {COMMAND_LIMIT:?}; it printed:\n{}",
                    step.line,
                    step.command,
                    std::fs::read_to_string(&out).unwrap_or_default()
                ),
            }
        };
        if step.background {
            // Wait for the lines the README shows: the job is up once it has printed them.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                let printed = self.normalize(&text);
                if printed.len() >= step.expected.len() || Instant::now() > deadline {
                    let shown = printed.into_iter().take(step.expected.len()).collect();
                    return (code, shown);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        (code, self.normalize(&text))
    }

    fn file(&self, name: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("the session's file {name}: {e}"));
        self.normalize(&text)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The shell runs with job control on, so each background job leads a process group of
        // its own: signalling the group stops the job and everything it started.
        let pids = std::fs::read_to_string(self.logs.join("pids")).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// Copies what a reader's clone holds that the README uses, and commits it on `main`.
fn prepare(dir: &Path, daemon_port: u16, sink_port: u16) {
    for sub in ["touchpoints", "secrets", "schemas", "examples"] {
        copy_dir(&repo_root().join(sub), &dir.join(sub));
    }
    std::fs::copy(repo_root().join(".gitignore"), dir.join(".gitignore")).expect(".gitignore");
    for file in touchctl::load::discover(&dir.join("touchpoints")).expect("sample files") {
        let text = std::fs::read_to_string(&file).expect("sample");
        std::fs::write(&file, text.replace("8641", &sink_port.to_string())).expect("sample");
    }
    // The demo starts the sandbox and the daemon on the samples' ports.
    let demo = dir.join("examples/demo/run.sh");
    let text = std::fs::read_to_string(&demo).expect("examples/demo/run.sh");
    std::fs::write(
        &demo,
        text.replace("8641", &sink_port.to_string())
            .replace("8640", &daemon_port.to_string()),
    )
    .expect("examples/demo/run.sh");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .env("GIT_AUTHOR_NAME", "Reviewer")
            .env("GIT_AUTHOR_EMAIL", "reviewer@example.com")
            .env("GIT_COMMITTER_NAME", "Reviewer")
            .env("GIT_COMMITTER_EMAIL", "reviewer@example.com")
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    git(&["symbolic-ref", "HEAD", "refs/heads/main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "Touchpoints"]);
}

fn show(lines: &[String]) -> String {
    lines.join("\n")
}

#[test]
fn every_command_block_of_the_readme_prints_what_it_shows() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let parts: Vec<Part> = parse(&readme)
        .into_iter()
        .filter(|p| !matches!(p, Part::Step(s) if s.postgres))
        .collect();
    let steps = parts.iter().filter(|p| matches!(p, Part::Step(_))).count();
    assert!(steps >= 20, "only {steps} commands found in the README");
    run_session(&parts, Vec::new());
}

/// The README's blocks on several daemons sharing a PostgreSQL database, in a session of their
/// own against a database of the test server's.
#[test]
fn the_readme_s_postgresql_blocks_print_what_they_show() {
    let backend = crate::backend::Backend::Postgres;
    if !backend.available("readme::the_readme_s_postgresql_blocks_print_what_they_show") {
        return;
    }
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let parts: Vec<Part> = parse(&readme)
        .into_iter()
        .filter(|p| matches!(p, Part::Step(s) if s.postgres))
        .collect();
    assert!(
        parts.len() >= 5,
        "only {} PostgreSQL commands found in the README",
        parts.len()
    );
    let db = crate::backend::Database::create();
    run_session(
        &parts,
        vec![
            (
                db.url().to_string(),
                "postgres://touchctl@127.0.0.1:5432/touchctl".to_string(),
            ),
            (free_port().to_string(), "8650".to_string()),
        ],
    );
}

/// Runs `parts` in a fresh session, each against what the README shows.
fn run_session(parts: &[Part], swaps: Vec<(String, String)>) {
    let work = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let ports = [(free_port(), "8640"), (free_port(), "8641")];
    prepare(work.path(), ports[0].0, ports[1].0);
    let mut session = Session::start(work.path(), logs.path(), ports, swaps);
    for part in parts {
        match part {
            Part::Step(step) => {
                let (code, printed) = session.run(step);
                assert!(
                    matches(&step.expected, &printed),
                    "README:{}: `{}` printed\n{}\n--- where the README shows\n{}",
                    step.line,
                    step.command,
                    show(&printed),
                    show(&step.expected)
                );
                assert_eq!(
                    code,
                    step.code,
                    "README:{}: `{}` exit code (it printed:\n{})",
                    step.line,
                    step.command,
                    show(&printed)
                );
            }
            Part::File {
                line,
                name,
                expected,
            } => {
                let content = session.file(name);
                assert!(
                    matches(expected, &content),
                    "README:{line}: {name} is\n{}\n--- where the README shows\n{}",
                    show(&content),
                    show(expected)
                );
            }
        }
    }
}

#[test]
fn the_readme_matcher_takes_wildcards_and_nothing_else() {
    let e = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
    assert!(matches(&e("a\n...\nd"), &e("a\nb\nc\nd")));
    assert!(matches(&e("a\n...\nd"), &e("a\nd")));
    assert!(!matches(&e("a\n...\nd"), &e("a\nb")));
    assert!(matches(&e("id dsp_[..] done"), &e("id dsp_123 done")));
    assert!(!matches(&e("id dsp_[..] done"), &e("id dsp_123 failed")));
    assert!(!matches(&e("exact"), &e("exact\nmore")));
    assert!(matches(&e("[..]"), &e("anything")));
    assert!(!matches(&e("a [..] b [..] c"), &e("a x b y")));
    assert_eq!(
        exit_comment("touchctl validate   # exits 1"),
        ("touchctl validate".to_string(), 1)
    );
    assert_eq!(exit_comment("echo '# x'"), ("echo '# x'".to_string(), 0));
}
