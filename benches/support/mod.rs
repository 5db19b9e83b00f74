//! What the benchmarks share: command-line values, generated touchpoint files, the real daemon as
//! a child process, CPU time (own and another process's), the host's steal, percentiles. Each
//! benchmark uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value after `name`, as given.
pub fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Whether `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// The secrets the generated touchpoints name, as environment variables.
pub const BENCH_ENV: [(&str, &str); 2] = [
    ("BENCH_TOKEN", "bench-token-value"),
    // A Standard Webhooks secret, so that a daemon can make its signing key.
    ("BENCH_SIGNING", "whsec_YmVuY2gtc2lnbmluZy1rZXktMDEyMzQ1"),
];

/// One realistic touchpoint file; the kind rotates so all four are measured.
pub fn touchpoint(i: usize) -> String {
    let head = format!(
        "#:schema ../schemas/touchpoint.schema.json\nid = \"tp-{i:05}\"\nname = \"触点 {i}\"\ncategory = \"notification\"\ndescription = \"Generated touchpoint number {i} for the plan benchmark.\"\nlabels = {{ team = \"team-{}\", region = \"cn-east\" }}\n",
        i % 17
    );
    let body = match i % 4 {
        0 => format!(
            "kind = \"custom\"\nurl = \"https://hooks-{i}.example.com/v1/trigger\"\nauth_token = {{ env = \"BENCH_TOKEN\" }}\nsigning_secret = {{ env = \"BENCH_SIGNING\" }}\nbatch_size = 500\ntimeout = \"10s\"\nrate_limit = \"50/s\"\n\n[retry]\nattempts = 8\nbackoff = \"2s\"\nmax_backoff = \"5m\"\n\n[dynamic_params]\nphone = \"user.phone\"\nmember_id = \"user.member_id\"\nnickname = {{ from = \"user.nickname\", optional = true }}\n\n[[template_params]]\nname = \"text\"\ntype = \"string\"\nmax_length = 300\n\n[[template_params]]\nname = \"link\"\ntype = \"url\"\nrequired = false\n"
        ),
        1 => "kind = \"wechat_official_account\"\napp_id = \"wx8a7c3e1f5b2d4690\"\nlinked_mini_programs = [\"wx1d2e3f4a5b6c7d8e\"]\n\n[auth]\nmode = \"direct\"\napp_secret = { env = \"BENCH_TOKEN\" }\n\n[dynamic_params]\nopenid = \"user.openid\"\n\n[[templates]]\nid = \"order_shipped\"\ntemplate_id = \"TM00015\"\nfields = [\"first\", \"keyword1\", \"remark\"]\nurl = \"https://m.example.com/orders\"\n\n[[templates]]\nid = \"member_day\"\ntemplate_id = \"TM00872\"\nfields = [\"first\", \"remark\"]\nmini_program = { app_id = \"wx1d2e3f4a5b6c7d8e\", page = \"pages/day\" }\n".to_string(),
        2 => "kind = \"wecom\"\ncorp_id = \"ww4f1e2d3c4b5a6978\"\nagent_id = 1000005\nsecret = { env = \"BENCH_TOKEN\" }\nmessage = \"news\"\n\n[dynamic_params]\nuserid = \"user.wecom_userid\"\n\n[[templates]]\nid = \"arrivals\"\ntemplate_id = \"news-1\"\nfields = [\"title\", \"description\"]\nurl = \"https://m.example.com/new\"\n".to_string(),
        _ => "kind = \"app_push\"\nprovider = \"getui\"\napp_id = \"Kq3Lm8Np2Rs5Tv7Wx9Yz1\"\napp_key = \"Ab4Cd6Ef8Gh0Ij2Kl4Mn6\"\nmaster_secret = { env = \"BENCH_TOKEN\" }\nbatch_size = 500\nttl = \"1d\"\ntitle = \"会员专享\"\n\n[dynamic_params]\ncid = \"user.getui_cid\"\n".to_string(),
    };
    head + &body
}

/// Where generated touchpoint `i` is written under the touchpoint folder: 50 sub-folders.
pub fn touchpoint_path(i: usize) -> String {
    format!("group-{:02}/tp-{i:05}.toml", i % 50)
}

/// Applies the touchpoints in `dir` with `bin`, as the operator would: `touchctl apply`.
pub fn apply(bin: &str, dir: &std::path::Path) {
    let out = Command::new(bin)
        .args(["apply", "--auto-approve", "-q"])
        .current_dir(dir)
        .envs(BENCH_ENV)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU time (user and system) this process has used so far, all threads.
pub fn cpu_self() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage failed");
    // SAFETY: initialised by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time (user and system) another process has used so far, from `/proc/PID/stat`.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // The fields after the command name, which is in parentheses and may hold spaces: the
    // first is field 3 (state), so utime (field 14) and stime (15) are at 11 and 12.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// The machine's clock ticks so far, from the first line of `/proc/stat`: all of them, and the
/// ones the hypervisor gave to other guests while this one wanted to run (steal). None where
/// there is no `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice: guest time is already in
    // user and nice.
    let total = ticks.iter().take(8).sum();
    Some((total, ticks.get(7).copied().unwrap_or(0)))
}

/// Runs `f` and returns its result with the share of the machine's CPU time that was stolen
/// meanwhile (0 where it cannot be read): a shared machine's slow spell, made visible.
pub fn with_steal<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let before = machine_ticks();
    let out = f();
    let share = match (before, machine_ticks()) {
        (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
            s1.saturating_sub(s0) as f64 / (t1 - t0) as f64
        }
        _ => 0.0,
    };
    (out, share)
}

/// A process's resident memory (VmRSS) in KiB, from `/proc/PID/status`; 0 where it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The value at fraction `p` of sorted durations (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A running `touchctl daemon`, killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This build's `touchctl`.
pub const TOUCHCTL: &str = env!("CARGO_BIN_EXE_touchctl");

/// Starts `bin daemon` in `dir` on a random loopback port, without a token, with `extra`
/// arguments and the benchmark's secrets in its environment; waits until it listens. Lines that
/// speak of errors are shown (every line with `BENCH_DAEMON_LOG` set).
pub fn start_daemon(bin: &str, dir: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut child = Command::new(bin)
        .args([
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--insecure-no-auth",
            "--allow-private-network",
        ])
        .args(extra)
        .current_dir(dir)
        .envs(BENCH_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            } else if std::env::var_os("BENCH_DAEMON_LOG").is_some()
                || line.contains("error")
                || line.contains("panicked")
            {
                // What went wrong in the daemon shows beside the benchmark's own failure.
                eprintln!("  daemon: {line}");
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the daemon did not start");
    Daemon { child, url }
}
