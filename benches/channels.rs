//! Benchmark: the platform channels through the daemon against `touchctl sandbox`, each against a
//! bare loop in the same run that sends the same requests to the same sandbox endpoints with
//! nothing stored (no API, no queue, no attempt log):
//! - **OA**: template sends per second (one `POST /cgi-bin/message/template/send` per recipient),
//!   the loop sending them as the daemon does (batches of `channel::wechat::BATCH_SIZE`, each a
//!   task with `IN_FLIGHT` requests at a time, the daemon's `--concurrency` batches at once);
//! - **Getui**: recipients per second at batch size 1000 (`push/list/message` then
//!   `push/list/cid` of 1000 cids per batch), the loop with the daemon's `--concurrency` batches
//!   in flight, each a task, its bodies made by the channel's own functions (`channel::getui`).
//!
//! The daemon is the real `touchctl daemon` binary (queue on disk, every accepted trigger fsync'd),
//! given triggers of 10,000 users as a platform would send them, timed from the first trigger
//! sent to the last dispatch finished. The sandbox is the real `touchctl sandbox` binary, serving
//! both sides alike. Per channel, a warm-up round of each side is not counted, then the loop and
//! the daemon run in alternating rounds (the order switching each round); each round's ratio is
//! taken from its own two runs and the median ratio is the figure (target: at least 0.5). CPU time
//! per unit (getrusage for this process, `/proc` for the daemon and the sandbox) and the share of
//! the machine's CPU stolen by the host are shown per side.
//!
//! Run: `cargo bench --bench channels` (add `-- --rounds N`, `--oa N` for OA recipients per round,
//! `--getui N` for Getui recipients per round, `--only oa|getui`). With `BENCH_DAEMON_LOG` set,
//! every line the daemon logs is shown.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use touchctl::channel::getui::{auth_body, cid_body, message_body, request_id};
use touchctl::channel::wechat::{BATCH_SIZE, IN_FLIGHT, client_msg_id};
use touchctl::model::Secret;

mod support;
use support::{
    BENCH_ENV, TOUCHCTL, apply, arg, arg_str, cpu_of, cpu_self, start_daemon, with_steal,
};

const OA_APP: &str = "wx8a7c3e1f5b2d4690";
const OA_TEMPLATE: &str = "TM00015";
const GETUI_APP: &str = "Kq3Lm8Np2Rs5Tv7Wx9Yz1";
const GETUI_KEY: &str = "Ab4Cd6Ef8Gh0Ij2Kl4Mn6";
/// The daemon's default `--concurrency`: batches in flight to one touchpoint.
const CONCURRENCY: usize = 8;
/// Users per trigger.
const PER_TRIGGER: usize = 10_000;
const GETUI_BATCH: usize = 1000;

/// The secret both touchpoints name (`BENCH_TOKEN`).
fn secret() -> &'static str {
    BENCH_ENV[0].1
}

fn files(api_base: &str) -> [(&'static str, String); 2] {
    [
        (
            "touchpoints/oa.toml",
            format!(
                "id = \"oa\"\nname = \"OA\"\nkind = \"wechat_official_account\"\ncategory = \"notification\"\napp_id = \"{OA_APP}\"\napi_base = \"{api_base}\"\nallow_insecure = true\n\n[auth]\nmode = \"direct\"\napp_secret = {{ env = \"BENCH_TOKEN\" }}\n\n[dynamic_params]\nopenid = \"user.openid\"\n\n[[templates]]\nid = \"order_shipped\"\ntemplate_id = \"{OA_TEMPLATE}\"\nfields = [\"first\", \"keyword1\", \"remark\"]\nurl = \"https://m.example.com/orders\"\n"
            ),
        ),
        (
            "touchpoints/getui.toml",
            format!(
                "id = \"push\"\nname = \"Push\"\nkind = \"app_push\"\ncategory = \"notification\"\nprovider = \"getui\"\napp_id = \"{GETUI_APP}\"\napp_key = \"{GETUI_KEY}\"\nmaster_secret = {{ env = \"BENCH_TOKEN\" }}\nbatch_size = {GETUI_BATCH}\nttl = \"1d\"\ntitle = \"会员专享\"\nbody = \"满 100 减 20\"\napi_base = \"{api_base}\"\nallow_insecure = true\n\n[dynamic_params]\ncid = \"user.getui_cid\"\n"
            ),
        ),
    ]
}

fn write_files(dir: &Path, api_base: &str) {
    for (rel, text) in files(api_base) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// A running `touchctl sandbox`, killed when dropped.
struct Sandbox {
    child: Child,
    url: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sandbox(dir: &Path) -> Sandbox {
    let mut child = Command::new(TOUCHCTL)
        .args(["sandbox", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .envs(BENCH_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the sandbox");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("touchctl sandbox: listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the sandbox did not start");
    Sandbox { child, url }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Oa,
    Getui,
}

/// One side of one round: recipients per second, CPU per recipient (this process + the daemon,
/// and the sandbox apart), stolen share.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rate: f64,
    cpu_us: f64,
    sandbox_us: f64,
    steal: f64,
}

fn measure(sandbox_pid: u32, other_pid: Option<u32>, recipients: usize, f: impl FnOnce()) -> Run {
    let cpu = || cpu_self() + other_pid.map(cpu_of).unwrap_or_default();
    let (cpu0, sb0) = (cpu(), cpu_of(sandbox_pid));
    let t = Instant::now();
    let ((), steal) = with_steal(f);
    let secs = t.elapsed().as_secs_f64();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / recipients as f64;
    Run {
        rate: recipients as f64 / secs,
        cpu_us: per(cpu() - cpu0),
        sandbox_us: per(cpu_of(sandbox_pid) - sb0),
        steal,
    }
}

// ---------------------------------------------------------------------------------------------
// The bare loops.

/// An answer's body as JSON.
async fn json(r: reqwest::Response) -> Option<Value> {
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

/// OA: a token, then every recipient's template send.
async fn oa_loop(client: &reqwest::Client, base: &str, round: usize, n: usize) {
    let token: Value = client
        .get(format!(
            "{base}/cgi-bin/token?grant_type=client_credential&appid={OA_APP}&secret={}",
            secret()
        ))
        .send()
        .await
        .map(json)
        .expect("token")
        .await
        .expect("token json");
    let token = token["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let url = format!("{base}/cgi-bin/message/template/send?access_token={token}");
    // As the daemon sends them: batches of `BATCH_SIZE`, each a task with `IN_FLIGHT` requests
    // at a time, `CONCURRENCY` batches at once.
    let ok: usize = futures_util::stream::iter((0..n).step_by(BATCH_SIZE))
        .map(|start| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let batch = format!("loop-{round}-{start}");
                futures_util::stream::iter(start..(start + BATCH_SIZE).min(n))
                    .map(|i| {
                        let user = format!("u{round}-{i}");
                        let body = json!({
                            "touser": format!("o-{round}-{i}"),
                            "template_id": OA_TEMPLATE,
                            "url": "https://m.example.com/orders",
                            "client_msg_id": client_msg_id(&batch, &user),
                            "data": {
                                "first": {"value": "您好，您的订单已发货"},
                                "keyword1": {"value": "SF1234567890"},
                                "remark": {"value": "感谢您的惠顾"},
                            },
                        });
                        let request = client.post(&url).body(serde_json::to_vec(&body).unwrap());
                        async move {
                            let answer: Value = request.send().await.ok().map(json)?.await?;
                            (answer["errcode"] == 0).then_some(())
                        }
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .filter(|r| std::future::ready(r.is_some()))
                    .count()
                    .await
            })
        })
        .buffer_unordered(CONCURRENCY)
        .map(|sent| sent.unwrap_or(0))
        .fold(0, |a, d| std::future::ready(a + d))
        .await;
    assert_eq!(ok, n, "the OA loop's sends were not all accepted");
}

/// Getui: a token, then per 1000 cids a task and its push, `CONCURRENCY` batches at once.
async fn getui_loop(client: &reqwest::Client, base: &str, round: usize, n: usize) {
    let master = Secret::new(secret());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let auth: Value = client
        .post(format!("{base}/v2/{GETUI_APP}/auth"))
        .header("content-type", "application/json;charset=utf-8")
        .body(auth_body(GETUI_KEY, &master, now))
        .send()
        .await
        .map(json)
        .expect("auth")
        .await
        .expect("auth json");
    let token = auth["data"]["token"].as_str().expect("token").to_string();
    let batches = n.div_ceil(GETUI_BATCH);
    let delivered: usize = futures_util::stream::iter(0..batches)
        .map(|b| {
            let cids: Vec<String> = (b * GETUI_BATCH..((b + 1) * GETUI_BATCH).min(n))
                .map(|i| format!("cid-{round}-{i}"))
                .collect();
            let (client, token, base) = (client.clone(), token.clone(), base.to_string());
            tokio::spawn(async move {
                let message = message_body(
                    &request_id(&format!("loop-{round}-{b}")),
                    Some(Duration::from_secs(86_400)),
                    json!({"title": "会员专享", "body": "满 100 减 20", "click_type": "none"}),
                );
                let post = |path: &str, body: Vec<u8>| {
                    client
                        .post(format!("{base}/v2/{GETUI_APP}/{path}"))
                        .header("token", &token)
                        .header("content-type", "application/json;charset=utf-8")
                        .body(body)
                        .send()
                };
                let task: Value = post("push/list/message", message)
                    .await
                    .ok()
                    .map(json)?
                    .await?;
                let taskid = task["data"]["taskid"].as_str()?.to_string();
                let pushed: Value = post("push/list/cid", cid_body(&taskid, &cids))
                    .await
                    .ok()
                    .map(json)?
                    .await?;
                let statuses = pushed["data"][&taskid].as_object()?;
                Some(
                    statuses
                        .values()
                        .filter(|s| s.as_str().is_some_and(|s| s.starts_with("successed")))
                        .count(),
                )
            })
        })
        .buffer_unordered(CONCURRENCY)
        .map(|d| d.ok().flatten().unwrap_or(0))
        .fold(0, |a, d| std::future::ready(a + d))
        .await;
    assert_eq!(
        delivered, n,
        "the Getui loop's pushes were not all delivered"
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon.

/// The triggers of a round, serialized beforehand.
fn triggers(kind: Kind, round: usize, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .step_by(PER_TRIGGER)
        .map(|start| {
            let users: Vec<Value> = (start..(start + PER_TRIGGER).min(n))
                .map(|i| match kind {
                    Kind::Oa => json!({"user_id": format!("u{round}-{i}"), "attributes": {"openid": format!("o-{round}-{i}")}}),
                    Kind::Getui => json!({"user_id": format!("u{round}-{i}"), "attributes": {"getui_cid": format!("cid-{round}-{i}")}}),
                })
                .collect();
            let trigger = match kind {
                Kind::Oa => json!({
                    "touchpoint": "oa", "campaign": format!("bench-{round}"),
                    "template": "order_shipped",
                    "template_params": {
                        "first": "您好，您的订单已发货", "keyword1": "SF1234567890", "remark": "感谢您的惠顾"
                    },
                    "users": users,
                }),
                Kind::Getui => json!({
                    "touchpoint": "push", "campaign": format!("bench-{round}"), "users": users,
                }),
            };
            serde_json::to_vec(&trigger).unwrap()
        })
        .collect()
}

/// Sends the triggers one after the other, then waits until every dispatch is finished.
async fn daemon_round(client: &reqwest::Client, daemon: &str, triggers: Vec<Vec<u8>>, n: usize) {
    let mut ids = Vec::new();
    for t in triggers {
        let answer: Value = client
            .post(format!("{daemon}/v1/dispatch"))
            .header("content-type", "application/json")
            .body(t)
            .send()
            .await
            .map(json)
            .expect("dispatch")
            .await
            .expect("dispatch json");
        ids.push(
            answer["dispatch_id"]
                .as_str()
                .unwrap_or_else(|| panic!("not accepted: {answer}"))
                .to_string(),
        );
    }
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    for id in ids {
        loop {
            let s: Value = client
                .get(format!("{daemon}/v1/dispatches/{id}"))
                .send()
                .await
                .map(json)
                .expect("status")
                .await
                .expect("status json");
            if s["finished"] == true {
                delivered += s["delivered"].as_u64().unwrap_or(0) as usize;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dispatch {id} did not finish: {s}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(delivered, n, "the daemon did not deliver every recipient");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn show(label: &str, unit: &str, r: &Run) {
    println!(
        "  {label:<7} {:>9.0} {unit}/s   CPU {:>6.1} µs/{unit} (+ sandbox {:>6.1})   steal {:>4.1}%",
        r.rate,
        r.cpu_us,
        r.sandbox_us,
        r.steal * 100.0
    );
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rounds = arg("--rounds", 5);
    let only = arg_str("--only");
    let sizes = [
        (Kind::Oa, arg("--oa", 20_000)),
        (Kind::Getui, arg("--getui", 200_000)),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), "http://127.0.0.1:9");
    let sandbox = start_sandbox(dir.path());
    write_files(dir.path(), &sandbox.url);
    apply(TOUCHCTL, dir.path());
    let daemon = start_daemon(TOUCHCTL, dir.path(), &[]);
    let sandbox_pid = sandbox.child.id();
    let daemon_pid = daemon.child.id();
    println!(
        "channels benchmark: daemon and loop against touchctl sandbox, {rounds} alternating rounds after a warm-up"
    );
    let mut round_id = 0;
    for (kind, n) in sizes {
        let name = match kind {
            Kind::Oa => "oa",
            Kind::Getui => "getui",
        };
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let unit = match kind {
            Kind::Oa => "send",
            Kind::Getui => "recipient",
        };
        println!(
            "\n{}: {n} recipients a round",
            match kind {
                Kind::Oa => "OA template sends (one request each)",
                Kind::Getui => "Getui pushes at batch size 1000",
            }
        );
        let mut ratios = Vec::new();
        let mut loops = Vec::new();
        let mut daemons = Vec::new();
        for r in 0..=rounds {
            let mut pair = [Run::default(); 2];
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in order {
                round_id += 1;
                let id = round_id;
                pair[side] = if side == 0 {
                    measure(sandbox_pid, None, n, || {
                        rt.block_on(async {
                            match kind {
                                Kind::Oa => oa_loop(&client, &sandbox.url, id, n).await,
                                Kind::Getui => getui_loop(&client, &sandbox.url, id, n).await,
                            }
                        })
                    })
                } else {
                    let t = triggers(kind, id, n);
                    measure(sandbox_pid, Some(daemon_pid), n, || {
                        rt.block_on(daemon_round(&client, &daemon.url, t, n))
                    })
                };
            }
            if r == 0 {
                println!("  (warm-up round not counted)");
                continue;
            }
            println!("  round {r}: ratio {:.2}", pair[1].rate / pair[0].rate);
            show("loop", unit, &pair[0]);
            show("daemon", unit, &pair[1]);
            ratios.push(pair[1].rate / pair[0].rate);
            loops.push(pair[0].rate);
            daemons.push(pair[1].rate);
        }
        println!(
            "  median: loop {:.0}/s, daemon {:.0}/s, ratio {:.2} (target: at least 0.50)",
            median(loops),
            median(daemons),
            median(ratios)
        );
    }
}
