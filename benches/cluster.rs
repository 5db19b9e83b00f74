//! Benchmark: the daemon's queue in PostgreSQL against its SQLite file, and two daemons sharing
//! one PostgreSQL against one, in the same run on this machine.
//!
//! Each round runs three set-ups in turn, with the same triggers (10,000 users each, batches of
//! 500) POSTed from `--clients` connections and a local sink that answers 200 at once:
//! - `sqlite`: one daemon on its SQLite registry and queue (the embedded default);
//! - `pg x1`: one daemon with `--state postgres://…`;
//! - `pg x2`: two daemons on that database, the triggers split between them.
//!
//! Each is timed from the first trigger to the sink counting every recipient, and its CPU time is
//! summed over every process that does the work: the daemons, the PostgreSQL server's processes
//! (the postmaster and its children), and this process (clients and sink). The ratios are the
//! medians of the rounds' ratios, so a slow spell of the shared machine weighs on both sides.
//!
//! Before the rounds each set-up runs once unmeasured (20,000 recipients), so that no side pays
//! for its first start (files and tables created, caches cold) inside a round.
//!
//! The PostgreSQL server is a throwaway cluster started by `tests/postgres/cluster.sh` with its
//! durable defaults (fsync and synchronous commits on), so a 202 from either backend means the
//! users are on disk. `TOUCHCTL_BENCH_POSTGRES=postgres://…` uses a server of yours instead (a
//! superuser's URL: a database `touchctl_bench` is made afresh in it).
//!
//! Run: `cargo bench --bench cluster` (`-- --recipients N` per set-up and round, default
//! 200,000; `--rounds N`, default 3; `--clients N`, default 4).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::json;

mod support;
use support::{Daemon, TOUCHCTL, arg, cpu_of, cpu_self, start_daemon, with_steal};

const BATCH: usize = 500;
const PER_TRIGGER: usize = 10_000;

/// A sink that counts recipients (by their `"user_id"` keys, without parsing) and answers 200.
async fn start_sink(seen: Arc<AtomicU64>) -> String {
    let app = axum::Router::new().fallback(move |bytes: Bytes| {
        let seen = seen.clone();
        async move {
            let n = memchr::memmem::find_iter(&bytes, b"\"user_id\"").count();
            seen.fetch_add(n as u64, Ordering::Relaxed);
            "{}"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A serialized trigger: `PER_TRIGGER` users from `u{offset}` on.
fn trigger(offset: usize) -> Bytes {
    let users: Vec<_> = (offset..offset + PER_TRIGGER)
        .map(|i| {
            json!({
                "user_id": format!("u{i}"),
                "attributes": {"phone": format!("138{i:08}"), "member_id": format!("m{i}")}
            })
        })
        .collect();
    Bytes::from(
        serde_json::to_vec(&json!({
            "touchpoint": "bench", "campaign": "cluster",
            "template_params": {"text": "会员日满100减20"},
            "users": users,
        }))
        .expect("a trigger serializes"),
    )
}

fn touchpoint(sink: &str) -> String {
    format!(
        "id = \"bench\"\nname = \"bench\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"{sink}/hook\"\nallow_insecure = true\nauth_token = {{ env = \"BENCH_TOKEN\" }}\nbatch_size = {BATCH}\n\n[dynamic_params]\nphone = \"user.phone\"\nmember_id = \"user.member_id\"\n\n[[template_params]]\nname = \"text\"\ntype = \"string\"\n"
    )
}

/// Writes the `bench` touchpoint in `dir` and applies it to `state` (a file or a URL).
fn project(dir: &std::path::Path, sink: &str, state: &str) {
    std::fs::create_dir_all(dir.join("touchpoints")).unwrap();
    std::fs::write(dir.join("touchpoints/bench.toml"), touchpoint(sink)).unwrap();
    let out = std::process::Command::new(TOUCHCTL)
        .args(["--state", state, "apply", "--auto-approve", "-q"])
        .current_dir(dir)
        .env("BENCH_TOKEN", "bench-token")
        .output()
        .expect("run touchctl apply");
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway PostgreSQL cluster, stopped and removed when dropped; or a server of the user's.
struct Server {
    /// A superuser's URL.
    url: String,
    /// The cluster's folder, when this benchmark started it.
    dir: Option<tempfile::TempDir>,
}

impl Server {
    fn start() -> Self {
        if let Ok(url) = std::env::var("TOUCHCTL_BENCH_POSTGRES") {
            return Self { url, dir: None };
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postgres/cluster.sh");
        let out = std::process::Command::new("bash")
            .args([script, "start"])
            .arg(dir.path().join("pg"))
            .env("TOUCHCTL_PG_DURABLE", "1")
            .output()
            .expect("run tests/postgres/cluster.sh");
        assert!(
            out.status.success(),
            "cannot start PostgreSQL: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Self {
            url,
            dir: Some(dir),
        }
    }

    /// A fresh database `name` on the server; its URL.
    fn database(&self, name: &str) -> String {
        let mut admin =
            postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to PostgreSQL");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.simple_query(&sql).expect("a fresh database");
        }
        let (base, _) = self.url.rsplit_once('/').expect("a database in the URL");
        format!("{base}/{name}")
    }

    /// The server's processes (the postmaster and its children), when this benchmark runs it.
    fn pids(&self) -> Vec<u32> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(dir.path().join("pg/data/postmaster.pid")) else {
            return Vec::new();
        };
        let Some(main) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![main];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s[s.rfind(')')? + 1..]
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u32>()
                            .ok()
                    });
                if parent == Some(main) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// CPU time the server's processes have used so far (those alive now).
    fn cpu(&self) -> Duration {
        self.pids()
            .into_iter()
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}/stat")).exists())
            .map(cpu_of)
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postgres/cluster.sh");
            let _ = std::process::Command::new("bash")
                .args([script, "stop"])
                .arg(dir.path().join("pg"))
                .output();
        }
    }
}

/// One set-up's run: rate (recipients/s), CPU per recipient in all, and of the daemons, and of
/// the PostgreSQL server.
#[derive(Clone, Copy, Default)]
struct Run {
    rate: f64,
    cpu: Duration,
    daemons: Duration,
    server: Duration,
}

/// POSTs `triggers` to the daemons (trigger `i` to daemon `i % n`) from `clients` connections,
/// each waiting for a 202 before its next, and waits until the sink has every recipient.
async fn run(
    client: &reqwest::Client,
    daemons: &[&Daemon],
    server: &Server,
    seen: &AtomicU64,
    triggers: Arc<Vec<Bytes>>,
    clients: usize,
) -> Run {
    let daemon_cpu = || -> Duration { daemons.iter().map(|d| cpu_of(d.child.id())).sum() };
    let (d0, s0, me0) = (daemon_cpu(), server.cpu(), cpu_self());
    let start = Instant::now();
    let target = seen.load(Ordering::Relaxed) + (triggers.len() * PER_TRIGGER) as u64;
    let urls: Arc<Vec<String>> = Arc::new(daemons.iter().map(|d| d.url.clone()).collect());
    let mut senders = Vec::new();
    for k in 0..clients.max(1) {
        let (client, urls, triggers) = (client.clone(), urls.clone(), triggers.clone());
        senders.push(tokio::spawn(async move {
            for (i, t) in triggers.iter().enumerate().skip(k).step_by(clients.max(1)) {
                let r = client
                    .post(format!("{}/v1/dispatch", urls[i % urls.len()]))
                    .header("content-type", "application/json")
                    .body(t.clone())
                    .send()
                    .await
                    .expect("dispatch");
                assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
            }
        }));
    }
    for s in senders {
        s.await.expect("a client");
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    while seen.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "not everything was delivered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let total = (triggers.len() * PER_TRIGGER) as u32;
    let (d, s, me) = (daemon_cpu() - d0, server.cpu() - s0, cpu_self() - me0);
    Run {
        rate: f64::from(total) / start.elapsed().as_secs_f64(),
        cpu: (d + s + me) / total,
        daemons: d / total,
        server: s / total,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let recipients = arg("--recipients", 200_000).max(PER_TRIGGER);
    let rounds = arg("--rounds", 3).max(1);
    let clients = arg("--clients", 4).max(1);
    let per_round = recipients / PER_TRIGGER;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = Server::start();
    let seen = Arc::new(AtomicU64::new(0));
    let sink = rt.block_on(start_sink(seen.clone()));
    let lite_dir = tempfile::tempdir().expect("temp dir");
    project(lite_dir.path(), &sink, ".touchctl/state.db");
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let url = server.database("touchctl_bench");
    project(pg_dir.path(), &sink, &url);
    let client = reqwest::Client::new();
    println!(
        "cluster benchmark: {rounds} round(s) of {} recipients per set-up, batches of {BATCH}, {clients} client connection(s); PostgreSQL {}",
        per_round * PER_TRIGGER,
        if server.dir.is_some() {
            "started here (fsync on)"
        } else {
            "from TOUCHCTL_BENCH_POSTGRES"
        }
    );
    let mut next_user = 0usize;
    // A round of each set-up first, not counted: the first run of a daemon on a new queue pays
    // for creating its files and tables, warming the page cache and growing its allocator.
    {
        let warm = Arc::new(
            (0..2)
                .map(|i| trigger(next_user + i * PER_TRIGGER))
                .collect::<Vec<_>>(),
        );
        next_user += 2 * PER_TRIGGER;
        let lite = start_daemon(TOUCHCTL, lite_dir.path(), &[]);
        rt.block_on(run(
            &client,
            &[&lite],
            &server,
            &seen,
            warm.clone(),
            clients,
        ));
        drop(lite);
        let pg = start_daemon(TOUCHCTL, pg_dir.path(), &["--state", &url]);
        rt.block_on(run(&client, &[&pg], &server, &seen, warm, clients));
    }
    let mut batch_of_triggers = || {
        let t: Vec<Bytes> = (0..per_round)
            .map(|i| trigger(next_user + i * PER_TRIGGER))
            .collect();
        next_user += per_round * PER_TRIGGER;
        Arc::new(t)
    };
    let mut results: Vec<[(Run, f64); 3]> = Vec::new();
    for round in 1..=rounds {
        let lite = start_daemon(TOUCHCTL, lite_dir.path(), &[]);
        let t = batch_of_triggers();
        let a = with_steal(|| rt.block_on(run(&client, &[&lite], &server, &seen, t, clients)));
        drop(lite);
        let pg = start_daemon(TOUCHCTL, pg_dir.path(), &["--state", &url]);
        let t = batch_of_triggers();
        let b = with_steal(|| rt.block_on(run(&client, &[&pg], &server, &seen, t, clients)));
        let pg2 = start_daemon(TOUCHCTL, pg_dir.path(), &["--state", &url]);
        let t = batch_of_triggers();
        let c = with_steal(|| rt.block_on(run(&client, &[&pg, &pg2], &server, &seen, t, clients)));
        drop((pg, pg2));
        println!(
            "round {round}: sqlite {:>9.0}/s | pg x1 {:>9.0}/s ({:.0}%) | pg x2 {:>9.0}/s ({:.0}% of x1) | steal {:.0}% {:.0}% {:.0}%",
            a.0.rate,
            b.0.rate,
            100.0 * b.0.rate / a.0.rate,
            c.0.rate,
            100.0 * c.0.rate / b.0.rate,
            100.0 * a.1,
            100.0 * b.1,
            100.0 * c.1
        );
        results.push([a, b, c]);
    }
    let ratio =
        |i: usize, j: usize| median(results.iter().map(|r| r[i].0.rate / r[j].0.rate).collect());
    let rate = |i: usize| median(results.iter().map(|r| r[i].0.rate).collect());
    let cpu = |i: usize, f: fn(&Run) -> Duration| {
        Duration::from_secs_f64(median(
            results.iter().map(|r| f(&r[i].0).as_secs_f64()).collect(),
        ))
    };
    println!();
    println!("median over {rounds} round(s):");
    for (i, name) in ["sqlite", "pg x1", "pg x2"].iter().enumerate() {
        println!(
            "  {name:<6} {:>9.0} recipients/s; CPU per recipient {} (daemons {}, PostgreSQL {})",
            rate(i),
            us(cpu(i, |r| r.cpu)),
            us(cpu(i, |r| r.daemons)),
            us(cpu(i, |r| r.server)),
        );
    }
    println!(
        "  pg x1 / sqlite: {:.2} (target at least 0.40); pg x2 / pg x1: {:.2}",
        ratio(1, 0),
        ratio(2, 1)
    );
}
