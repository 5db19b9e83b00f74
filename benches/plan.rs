//! Benchmark: `plan` of 10,000 touchpoints that are all live and unchanged, against a baseline that
//! only reads, parses and schema-validates the same files with the same crates (toml, jsonschema),
//! measured in the same run. Both use both cores (rayon).
//!
//! Run: `cargo bench --bench plan` (add `-- --touchpoints N --rounds R` to change the size).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
// The same allocator as the `touchctl` binary, for both measurements.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use touchctl::apply::{self, ApplyOptions};
use touchctl::load;
use touchctl::model::SecretPolicy;
use touchctl::plan::inputs::{make_plan, plan_dir};
use touchctl::registry::SqliteRegistry;

mod support;
use support::{arg, touchpoint, touchpoint_path};

fn files(dir: &Path) -> Vec<PathBuf> {
    load::discover(dir).expect("generated folder")
}

/// Reads, parses and schema-validates every file: the floor any plan has to pay.
fn baseline(dir: &Path, validator: &jsonschema::Validator) -> usize {
    files(dir)
        .par_iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("read");
            let doc: serde_json::Value = toml::from_str(&text).expect("parse");
            usize::from(validator.is_valid(&doc))
        })
        .sum()
}

/// What `touchctl plan` does: load and check the tree, fingerprint secrets, read the registry, diff.
fn plan(dir: &Path, state: &Path) -> usize {
    let registry = SqliteRegistry::open(state).expect("registry");
    let policy = SecretPolicy::new(Some(dir));
    let (_desired, plan) = plan_dir(dir, &registry, &policy).expect("plan");
    assert!(!plan.has_changes(), "the benchmark plans an unchanged tree");
    plan.summary.no_op
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(rounds);
    let mut last = None;
    for _ in 0..rounds {
        let start = Instant::now();
        last = Some(f());
        times.push(start.elapsed());
    }
    (median(times), last.expect("at least one round"))
}

fn main() {
    let n = arg("--touchpoints", 10_000);
    let rounds = arg("--rounds", 11).max(1);
    // SAFETY: set before any other thread exists.
    unsafe {
        for (name, value) in support::BENCH_ENV {
            std::env::set_var(name, value);
        }
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("touchpoints");
    std::fs::create_dir_all(&dir).expect("dir");
    for i in 0..n {
        let path = dir.join(touchpoint_path(i));
        std::fs::create_dir_all(path.parent().expect("a sub-folder")).expect("dir");
        std::fs::write(path, touchpoint(i)).expect("write");
    }
    let state = tmp.path().join("state.db");
    {
        let desired = match load::load_dir(&dir) {
            Ok(d) => d,
            Err(load::LoadError::Invalid(diags)) => {
                panic!("the generated tree is invalid; first problem: {}", diags[0])
            }
            Err(e) => panic!("{e}"),
        };
        let registry = SqliteRegistry::open(&state).expect("registry");
        let policy = SecretPolicy::new(Some(&dir));
        let plan = make_plan(&desired, &dir, &registry, &policy).expect("plan");
        let opts = ApplyOptions {
            allow_delete: false,
            max_deletes: 0,
            allow_dirty: true,
            applied_by: "bench@localhost".into(),
        };
        let outcomes = apply::execute(&plan, &registry, &opts, &mut |_| {});
        assert!(outcomes.iter().all(|o| o.result.is_ok()));
    }
    let validator =
        jsonschema::draft202012::new(touchctl::model::schema::schema()).expect("schema");

    // Warm the page cache and the allocator once for each.
    assert_eq!(baseline(&dir, &validator), n);
    assert_eq!(plan(&dir, &state), n);

    // Rounds alternate baseline and plan, so that a slow spell of the machine hits both alike;
    // the ratio reported is the median of the per-round ratios.
    let mut base_times = Vec::with_capacity(rounds);
    let mut plan_times = Vec::with_capacity(rounds);
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (b, valid) = time(1, || baseline(&dir, &validator));
        assert_eq!(valid, n);
        let (p, unchanged) = time(1, || plan(&dir, &state));
        assert_eq!(unchanged, n);
        base_times.push(b);
        plan_times.push(p);
        ratios.push(p.as_secs_f64() / b.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    let (base, full) = (median(base_times), median(plan_times));
    // Where the time goes.
    let (load_t, _) = time(rounds, || load::load_dir(&dir).expect("valid"));
    let (list_t, _) = time(rounds, || {
        use touchctl::registry::Registry;
        SqliteRegistry::open(&state)
            .expect("registry")
            .list()
            .expect("list")
            .len()
    });
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let (base1, _) = single.install(|| time(rounds.min(3), || baseline(&dir, &validator)));
    let (full1, _) = single.install(|| time(rounds.min(3), || plan(&dir, &state)));

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "plan benchmark: {n} touchpoints, all live and unchanged, median of {rounds} rounds, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "  baseline (read + parse + schema-validate): {:>8.1} ms",
        ms(base)
    );
    println!(
        "  touchctl plan (load, checks, secrets, registry, diff): {:>8.1} ms",
        ms(full)
    );
    println!(
        "  ratio plan / baseline, median of the rounds' ratios: {ratio:.2}x (target: at most 1.50x; rounds from {:.2}x to {:.2}x)",
        ratios[0],
        ratios[ratios.len() - 1]
    );
    println!(
        "  of which: load and check files {:.1} ms, read the registry {:.1} ms",
        ms(load_t),
        ms(list_t)
    );
    println!(
        "  one thread: baseline {:.1} ms, plan {:.1} ms, ratio {:.2}x",
        ms(base1),
        ms(full1),
        ms(full1) / ms(base1)
    );
}
