//! Benchmark: how soon an edit to one touchpoint file is live. The real `touchctl daemon --watch`
//! runs on 10,000 generated touchpoints (all four kinds, 50 sub-folders, all applied); one file is
//! edited again and again, each edit a real change, and each is timed from the save (the file
//! written and closed, or with `--source git` the commit made) to the edited touchpoint's new
//! generation answered by the daemon's API. Also the daemon's CPU time per edit, and the share of
//! the machine's CPU the host stole meanwhile.
//!
//! Edits alternate between the two ways editors save: writing the file in place, and writing a
//! hidden temporary file beside it and renaming it over the file.
//!
//! Run: `cargo bench --bench watch` (add `-- --touchpoints N` for the tree's size, `--edits N` for
//! the edits timed, `--gap-ms N` for the pause after an edit is live before the next, `--source
//! git` to watch `git:main` and commit each edit, `--plain` for a folder outside any git
//! repository, and `--compare PATH` to run another build's daemon on its own copy of the tree,
//! edit for edit in turn with this build's). With `BENCH_DAEMON_LOG` set, every line the daemons
//! log is shown (errors always are).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::{
    Daemon, TOUCHCTL, apply, arg, arg_str, cpu_of, flag, percentile, rss_kib, start_daemon,
    touchpoint, touchpoint_path, with_steal,
};

/// The touchpoint that is edited: a custom one, so the daemon resolves its secrets too.
const EDITED: &str = "tp-00000";

/// Edits made before the timed ones, not counted: the first after a start pays for warming caches.
const WARM_UP: usize = 3;

/// How a daemon's API is asked for the edited touchpoint's generation.
#[derive(Clone, Copy, PartialEq)]
enum Probe {
    /// `GET /v1/touchpoints/{id}`: one small answer.
    One,
    /// `GET /v1/touchpoints`: the whole list (a build without the per-touchpoint endpoint). The
    /// list is large, and asking for it often would slow the daemon down: it is asked for only
    /// once the registry file holds the new generation (read directly, which costs the daemon
    /// nothing), every 10 ms.
    List,
}

/// One daemon under test, on its own copy of the tree.
struct Side {
    name: String,
    /// Stopped before its folder is removed (fields drop in order).
    daemon: Daemon,
    dir: tempfile::TempDir,
    probe: Probe,
    /// The edited touchpoint's generation now.
    generation: u64,
    latencies: Vec<Duration>,
    cpu: Duration,
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates the tree in a new folder (a git repository on `main` with everything committed,
/// unless `plain`) and applies it with `bin`.
fn project(bin: &str, n: usize, plain: bool) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    for i in 0..n {
        let path = dir.join("touchpoints").join(touchpoint_path(i));
        std::fs::create_dir_all(path.parent().expect("a sub-folder")).expect("dir");
        std::fs::write(path, touchpoint(i)).expect("write");
    }
    if !plain {
        git(dir, &["init", "-q"]);
        git(dir, &["symbolic-ref", "HEAD", "refs/heads/main"]);
        std::fs::write(dir.join(".gitignore"), ".touchctl/\n").expect("write");
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", "touchpoints"]);
    }
    apply(bin, dir);
    tmp
}

fn get(client: &reqwest::Client, rt: &tokio::runtime::Runtime, url: &str) -> (u16, Value) {
    rt.block_on(async {
        let r = client.get(url).send().await.expect("GET");
        let status = r.status().as_u16();
        let body = r.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    })
}

/// The edited touchpoint's generation as the daemon answers it now.
fn generation(side: &Side, client: &reqwest::Client, rt: &tokio::runtime::Runtime) -> u64 {
    let entry = match side.probe {
        Probe::One => {
            let (status, v) = get(
                client,
                rt,
                &format!("{}/v1/touchpoints/{EDITED}", side.daemon.url),
            );
            assert_eq!(status, 200, "{v}");
            v
        }
        Probe::List => {
            let (_, v) = get(client, rt, &format!("{}/v1/touchpoints", side.daemon.url));
            v["touchpoints"]
                .as_array()
                .and_then(|l| l.iter().find(|t| t["id"] == EDITED).cloned())
                .expect("the edited touchpoint is live")
        }
    };
    entry["generation"].as_u64().expect("a generation")
}

/// Saves edit `k` of the edited file: in place for even `k`, by renaming a hidden temporary file
/// over it for odd `k`; with a git source, commits it too. Returns when the save is done.
fn save(dir: &Path, k: usize, git_source: bool) {
    let path = dir.join("touchpoints").join(touchpoint_path(0));
    let text = touchpoint(0).replace(
        "Generated touchpoint number 0 for the plan benchmark.",
        &format!("Edited {k} times by the watch benchmark."),
    );
    if k.is_multiple_of(2) {
        std::fs::write(&path, text).expect("write");
    } else {
        let tmp = path.with_file_name(format!(".{EDITED}.toml.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
    }
    if git_source {
        git(dir, &["commit", "-q", "-am", &format!("edit {k}")]);
    }
}

/// Makes edit `k` on `side` and waits until its new generation is answered; returns how long that
/// took from the save.
fn edit(
    side: &mut Side,
    k: usize,
    git_source: bool,
    client: &reqwest::Client,
    rt: &tokio::runtime::Runtime,
) -> Duration {
    let registry = rusqlite::Connection::open_with_flags(
        side.dir.path().join(".touchctl/state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the registry");
    let written = || -> u64 {
        registry
            .query_row(
                "SELECT generation FROM touchpoints WHERE id = ?1",
                [EDITED],
                |r| r.get::<_, i64>(0),
            )
            .expect("the edited touchpoint's row") as u64
    };
    save(side.dir.path(), k, git_source);
    let saved = Instant::now();
    let want = side.generation + 1;
    let poll = match side.probe {
        Probe::One => Duration::from_millis(2),
        Probe::List => {
            while written() < want {
                assert!(
                    saved.elapsed() < Duration::from_secs(60),
                    "{}: edit {k} was not applied after 60 s",
                    side.name
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Duration::from_millis(10)
        }
    };
    loop {
        let now = generation(side, client, rt);
        if now >= want {
            assert_eq!(now, want, "one edit, one new generation");
            side.generation = now;
            return saved.elapsed();
        }
        assert!(
            saved.elapsed() < Duration::from_secs(60),
            "{}: edit {k} was not live after 60 s",
            side.name
        );
        std::thread::sleep(poll);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--touchpoints", 10_000).max(1);
    let edits = arg("--edits", 100).max(1);
    let gap = Duration::from_millis(arg("--gap-ms", 300) as u64);
    let git_source = arg_str("--source").as_deref() == Some("git");
    let plain = flag("--plain");
    assert!(
        !(git_source && plain),
        "--source git needs a git repository: leave --plain away"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();

    let mut builds = vec![("this build".to_string(), TOUCHCTL.to_string())];
    if let Some(other) = arg_str("--compare") {
        builds.push((other.clone(), other));
    }
    let mut daemon_args = vec!["--watch", "--interval", "1h"];
    if git_source {
        daemon_args.extend(["--source", "git:main"]);
    }
    let mut sides: Vec<Side> = builds
        .into_iter()
        .map(|(name, bin)| {
            let dir = project(&bin, n, plain);
            let daemon = start_daemon(&bin, dir.path(), &daemon_args);
            let (status, _) = get(
                &client,
                &rt,
                &format!("{}/v1/touchpoints/{EDITED}", daemon.url),
            );
            let probe = if status == 200 {
                Probe::One
            } else {
                Probe::List
            };
            let mut side = Side {
                name,
                dir,
                daemon,
                probe,
                generation: 0,
                latencies: Vec::with_capacity(edits),
                cpu: Duration::ZERO,
            };
            side.generation = generation(&side, &client, &rt);
            side
        })
        .collect();

    // Edit for edit in turn on every side, so that a slow spell of the shared machine weighs on
    // each alike; after each, a pause with no requests, so the daemon is idle when the next comes.
    let ((), stolen) = with_steal(|| {
        for k in 0..WARM_UP + edits {
            for side in &mut sides {
                let cpu0 = cpu_of(side.daemon.child.id());
                let took = edit(side, k, git_source, &client, &rt);
                std::thread::sleep(gap);
                if k >= WARM_UP {
                    side.latencies.push(took);
                    side.cpu += cpu_of(side.daemon.child.id()) - cpu0;
                }
            }
        }
    });

    // Only the edited touchpoint was written: every other one is at its first generation still.
    for side in &sides {
        let (_, v) = get(&client, &rt, &format!("{}/v1/touchpoints", side.daemon.url));
        let list = v["touchpoints"].as_array().expect("a list");
        assert_eq!(list.len(), n, "{}: every touchpoint is live", side.name);
        let rewritten: Vec<&Value> = list
            .iter()
            .filter(|t| t["id"] != EDITED && t["generation"] != 1)
            .map(|t| &t["id"])
            .collect();
        assert!(
            rewritten.is_empty(),
            "{}: touchpoints that were not edited were written: {rewritten:?}",
            side.name
        );
    }

    println!(
        "watch benchmark: {n} touchpoints live, {edits} edits of one file (after {WARM_UP} not counted), {} ms apart, source {}{}",
        gap.as_millis(),
        if git_source {
            "git:main (each edit committed)"
        } else {
            "worktree"
        },
        if plain {
            ", not a git repository"
        } else if git_source {
            ""
        } else {
            ", in a git repository"
        }
    );
    for side in &mut sides {
        side.latencies.sort();
        let l = &side.latencies;
        println!(
            "  {}: save to new generation answered: median {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target: median under 250 ms, p99 under 500 ms){}",
            side.name,
            ms(percentile(l, 0.50)),
            ms(percentile(l, 0.90)),
            ms(percentile(l, 0.99)),
            ms(l[l.len() - 1]),
            if side.probe == Probe::List {
                "; read from the whole list, every 10 ms once in the registry file"
            } else {
                ""
            }
        );
        println!(
            "    daemon CPU per edit (user and system, answering the polls included): {:.0} ms; resident memory after the edits: {} MiB",
            ms(side.cpu / edits as u32),
            rss_kib(side.daemon.child.id()) / 1024
        );
    }
    println!(
        "  CPU stolen by the host during the edits: {:.0}%",
        stolen * 100.0
    );
}
