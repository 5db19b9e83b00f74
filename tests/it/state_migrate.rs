//! `touchctl state migrate`: a single-node setup, made by the real daemon on SQLite, moved into a
//! PostgreSQL database of its own and read back row by row; what it refuses, and the mark it
//! leaves on the SQLite files.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::backend::{Backend, Database};
use crate::daemon_support::{Sink, custom_touchpoint, users};
use crate::support::Project;

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];
const DAEMON: [&str; 2] = ["--insecure-no-auth", "--allow-private-network"];

/// Whether the PostgreSQL tests can run here (see [`Backend::available`]).
fn postgres(test: &str) -> Option<Database> {
    Backend::Postgres.available(test).then(Database::create)
}

/// A custom touchpoint `slow` to `sink` whose retries wait an hour: what it gets stays pending.
fn slow_touchpoint(url: &str) -> String {
    custom_touchpoint("slow", url, 2, "").replace(
        "attempts = 20\nbackoff = \"20ms\"\nmax_backoff = \"200ms\"",
        "attempts = 20\nbackoff = \"1h\"\nmax_backoff = \"2h\"",
    )
}

/// How the sink answers, by campaign: `ok` delivered; `dead` one recipient failed for good and
/// one retried, then 400 (dead); `partial` one delivered and one to retry; `later` 503.
fn answer() -> Arc<crate::daemon_support::Answer> {
    Arc::new(|_, body: &Value| {
        let recipients = body["recipients"].as_array().map_or(0, Vec::len);
        let (status, text) = match body["campaign"].as_str().unwrap_or_default() {
            "dead" if recipients == 2 => (
                200,
                json!({"failed": [
                    {"user_id": "u0", "reason": "no such phone", "retry": false},
                    {"user_id": "u1", "reason": "busy", "retry": true}
                ]}),
            ),
            "dead" => (400, json!({"error": "unknown template"})),
            "partial" => (
                200,
                json!({"failed": [{"user_id": "u1", "reason": "busy", "retry": true}]}),
            ),
            "later" => (503, json!({"error": "down"})),
            _ => (200, json!({})),
        };
        (status, Vec::new(), text.to_string(), Duration::ZERO)
    })
}

fn trigger(touchpoint: &str, campaign: &str, n: usize) -> Value {
    json!({
        "touchpoint": touchpoint,
        "campaign": campaign,
        "template_params": {"text": "hi"},
        "users": users(n),
    })
}

/// A project with `sms` and `slow` applied to its SQLite registry, whose queue holds, made by the
/// daemon: delivered batches, a dead batch with a failed recipient and a replay, a pending batch
/// partly delivered (its rest rewritten), pending batches still in their segment, held (`slow`
/// paused), and an idempotency key. Returns the project and the sink (kept alive).
fn single_node_setup() -> (Project, Sink) {
    let sink = Sink::new(answer());
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 2, ""),
    );
    p.write("touchpoints/slow.toml", &slow_touchpoint(&sink.url));
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&DAEMON, &ENV);
    let accepted = |t: Value| {
        let (code, r) = d.dispatch(&t);
        assert_eq!(code, 202, "{r}");
        r["dispatch_id"].as_str().unwrap().to_string()
    };
    let ok = accepted(trigger("sms", "ok", 4));
    let dead = accepted(trigger("sms", "dead", 2));
    assert_eq!(d.wait_finished(&ok)["delivered"], 4);
    assert_eq!(d.wait_finished(&dead)["dead"], 1);
    p.run(&["deliveries", "replay", &format!("{dead}_0")])
        .code(0);
    d.wait_until(
        &format!("/v1/dispatches/{dead}"),
        "the replayed batch did not die again",
        |_, s| s["finished"] == true && s["batches"]["dead"] == 1,
    );
    let partial = accepted(trigger("slow", "partial", 2));
    let mut later = trigger("slow", "later", 3);
    later["idempotency_key"] = json!("later-1");
    accepted(later);
    d.wait_until(
        &format!("/v1/dispatches/{partial}"),
        "the partial batch was not sent",
        |_, s| s["delivered"] == 1,
    );
    sink.wait_for("the later batches", |r| {
        r.iter().filter(|r| r.body["campaign"] == "later").count() == 2
    });
    let (code, r) = d.call("POST", "/v1/touchpoints/slow/pause", None);
    assert_eq!(code, 200, "{r}");
    let (code, log) = d.terminate();
    assert_eq!(code, 0, "{log}");
    (p, sink)
}

/// A SQL value as text, the same for both databases: NULL, integers, text, bytes as hex.
fn cell(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => hex(b),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every row `sql` reads from a SQLite file, each as its cells joined.
fn sqlite_rows(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        Ok((0..n)
            .map(|i| cell(r.get_ref(i).unwrap()))
            .collect::<Vec<_>>()
            .join("|"))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Every row `sql` reads from PostgreSQL, each as its cells joined (as [`sqlite_rows`] shows them).
fn postgres_rows(db: &Database, sql: &str) -> Vec<String> {
    use postgres::types::Type;
    let rows = db
        .client()
        .query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    let ty = r.columns()[i].type_().clone();
                    let text = if ty == Type::INT8 {
                        r.get::<_, Option<i64>>(i).map(|v| v.to_string())
                    } else if ty == Type::INT4 {
                        r.get::<_, Option<i32>>(i).map(|v| v.to_string())
                    } else if ty == Type::BOOL {
                        r.get::<_, Option<bool>>(i)
                            .map(|v| i32::from(v).to_string())
                    } else if ty == Type::BYTEA {
                        r.get::<_, Option<Vec<u8>>>(i).map(|v| hex(&v))
                    } else {
                        r.get::<_, Option<String>>(i).map(|v| format!("{v:?}"))
                    };
                    text.unwrap_or_else(|| "NULL".into())
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// The users of every batch as the SQLite queue holds them, read without touchctl: from the
/// segment file the batch points into, else from `payloads`; by batch id.
fn sqlite_users(p: &Project) -> Vec<String> {
    let conn = rusqlite::Connection::open(p.path().join(".touchctl/queue.db")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT b.id, p.users, b.segment, b.seg_offset, b.seg_length FROM batches b \
             LEFT JOIN payloads p ON p.batch_id = b.id ORDER BY b.id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let id: String = r.get(0)?;
        let payload: Option<Vec<u8>> = r.get(1)?;
        let segment: Option<i64> = r.get(2)?;
        let users = match segment {
            Some(segment) => {
                let (offset, len): (i64, i64) = (r.get(3)?, r.get(4)?);
                let file = p
                    .path()
                    .join(format!(".touchctl/queue.db-payloads/{segment:016x}.seg"));
                let bytes = std::fs::read(&file).unwrap();
                Some(bytes[offset as usize..(offset + len) as usize].to_vec())
            }
            None => payload,
        };
        Ok(format!(
            "{id:?}|{}",
            users.map_or("NULL".into(), |u| hex(&u))
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

const QUEUE_TABLES: [(&str, &str); 5] = [
    (
        "dispatches",
        "SELECT id, touchpoint, campaign, idempotency_key, template_params, generation, receipt, created_at, message FROM dispatches ORDER BY id",
    ),
    (
        "batches",
        "SELECT id, dispatch_id, idx, count, touchpoint, size, remaining, delivered, failed, state, attempts, attempt_base, next_at, held, last_error, created_at, updated_at FROM batches ORDER BY id",
    ),
    (
        "attempts",
        "SELECT batch_id, attempt, generation, started_at, latency_ms, status, outcome, recipients, error FROM attempts ORDER BY batch_id, attempt",
    ),
    (
        "failures",
        "SELECT batch_id, user_id, reason, attempt FROM failures ORDER BY batch_id, user_id, attempt",
    ),
    (
        "replays",
        "SELECT batch_id, at, after_attempt, recipients FROM replays ORDER BY batch_id, at",
    ),
];

const REGISTRY_TABLES: [(&str, &str); 2] = [
    (
        "touchpoints",
        "SELECT id, kind, spec, live_spec, fingerprints, generation, paused, applied_at, applied_by, source_commit, source_dirty, source_file FROM touchpoints ORDER BY id",
    ),
    (
        "keys",
        "SELECT key, value FROM meta WHERE key IN ('registry_id', 'fingerprint_key') ORDER BY key",
    ),
];

#[test]
fn migrate_moves_every_row_of_a_single_node_setup_and_plan_then_shows_no_change() {
    let Some(db) = postgres("state_migrate::migrate_moves_every_row") else {
        return;
    };
    let (p, _sink) = single_node_setup();
    let queue = rusqlite::Connection::open(p.path().join(".touchctl/queue.db")).unwrap();
    let state = rusqlite::Connection::open(p.path().join(".touchctl/state.db")).unwrap();
    let before: Vec<(&str, Vec<String>)> = QUEUE_TABLES
        .iter()
        .map(|(t, sql)| (*t, sqlite_rows(&queue, sql)))
        .chain(
            REGISTRY_TABLES
                .iter()
                .map(|(t, sql)| (*t, sqlite_rows(&state, sql))),
        )
        .collect();
    let users = sqlite_users(&p);
    drop((queue, state));
    // The setup holds what the move must carry.
    let states = &before[1].1;
    for (what, n) in [
        ("|\"delivered\"|", 2),
        ("|\"dead\"|", 1),
        ("|\"pending\"|", 3),
        ("|\"paused through the API", 3),
    ] {
        assert_eq!(
            states.iter().filter(|b| b.contains(what)).count(),
            n,
            "{what} in {states:#?}"
        );
    }
    assert_eq!(before[3].1.len(), 1, "one failed recipient");
    assert_eq!(before[4].1.len(), 1, "one replay");
    assert!(users.iter().filter(|u| !u.ends_with("|NULL")).count() >= 4);

    let moved = p.run(&["state", "migrate", "--to", db.url(), "--json"]);
    moved.code(0);
    let summary: Value = serde_json::from_str(&moved.stdout).unwrap();
    assert_eq!(summary["touchpoints"], 2, "{summary}");
    assert_eq!(summary["paused"], 1, "{summary}");
    assert_eq!(summary["dispatches"], 4, "{summary}");
    assert_eq!(
        summary["batches"],
        json!({"total": 6, "pending": 3, "held": 3, "delivered": 2, "failed": 0, "dead": 1}),
        "{summary}"
    );
    assert_eq!(summary["recipients_pending"], 4, "{summary}");
    assert_eq!(summary["replays"], 1, "{summary}");
    assert!(
        moved.stderr.contains("moving: dispatches 4/4, batches 6/6"),
        "{}",
        moved.stderr
    );

    // Every row, as it was.
    for ((table, sql), (_, rows)) in QUEUE_TABLES
        .iter()
        .chain(REGISTRY_TABLES.iter())
        .zip(&before)
    {
        assert_eq!(&postgres_rows(&db, sql), rows, "{table}");
    }
    assert_eq!(
        postgres_rows(&db, "SELECT id, users FROM batches ORDER BY id"),
        users,
        "the users' stored bytes"
    );
    assert_eq!(
        postgres_rows(
            &db,
            "SELECT count(*) FROM batches WHERE lease_owner IS NOT NULL"
        ),
        ["0"]
    );

    // The fingerprints were made with the key that moved: nothing to change.
    p.run_env(&["plan", "--state", db.url(), "--detailed-exitcode"], &ENV)
        .code(0)
        .stdout_has("No changes");

    // The SQLite files are marked: the daemon, deliveries and apply refuse them; plan warns.
    let shown = db.url().to_string();
    let refused = format!(
        "error: the queue file .touchctl/queue.db was moved into PostgreSQL ({shown}) by `touchctl state migrate` at "
    );
    p.run_env(
        &["daemon", "--insecure-no-auth", "--listen", "127.0.0.1:0"],
        &ENV,
    )
    .code(1)
    .stderr_has(&refused)
    .stderr_has("`touchctl state unmark --queue .touchctl/queue.db` makes this file usable again");
    p.run(&["deliveries", "list"]).code(1).stderr_has(&refused);
    p.run_env(&["apply", "--auto-approve"], &ENV)
        .code(1)
        .stderr_has(&format!(
            "error: the registry .touchctl/state.db was moved into PostgreSQL ({shown})"
        ));
    p.run_env(&["plan"], &ENV).code(0).stderr_has(&format!(
        "warning: the registry .touchctl/state.db was moved into {shown} at "
    ));
    p.run(&["state", "migrate", "--to", db.url()])
        .code(1)
        .stderr_has("error: the registry .touchctl/state.db was moved into ");

    // Undone on request: the files work again.
    p.run(&["state", "unmark"])
        .code(0)
        .stdout_has("Unmarked the registry .touchctl/state.db")
        .stdout_has("Unmarked the queue .touchctl/queue.db");
    p.run(&["deliveries", "list", "--only", "dead"])
        .code(0)
        .stdout_has("dead");
}

#[test]
fn migrate_refuses_while_a_daemon_works_the_queue() {
    let Some(db) = postgres("state_migrate::migrate_refuses_while_a_daemon_works_the_queue") else {
        return;
    };
    let sink = Sink::ok();
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 2, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&DAEMON, &ENV);
    let refused = p.run(&["state", "migrate", "--to", db.url()]);
    refused
        .code(1)
        .stderr_has(&format!("error: a daemon (pid {} on ", d.pid()));
    refused.stderr_has(
        "works the queue .touchctl/queue.db: stop it (SIGTERM: it finishes what it is sending and records it), then run `touchctl state migrate` again",
    );
    assert_eq!(
        postgres_rows(&db, "SELECT count(*) FROM touchpoints"),
        ["0"]
    );
    let (code, log) = d.terminate();
    assert_eq!(code, 0, "{log}");
    // Nothing was marked: the files are as they were, and the move now goes through.
    p.run(&["deliveries", "list"]).code(0);
    p.run(&["state", "migrate", "--to", db.url(), "-q"])
        .code(0)
        .stdout_has("touchpoints         1 (0 paused, 0 drifted; 0 platform ticket(s))");
}

#[test]
fn migrate_refuses_a_database_that_holds_a_setup_and_changes_nothing() {
    let Some(db) = postgres("state_migrate::migrate_refuses_a_database_that_holds_a_setup") else {
        return;
    };
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", "http://127.0.0.1:9", 2, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p.run_env(&["apply", "--auto-approve", "--state", db.url()], &ENV)
        .code(0);
    let generation = postgres_rows(&db, "SELECT generation, applied_at FROM touchpoints");
    p.run(&["state", "migrate", "--to", db.url()])
        .code(1)
        .stderr_has(&format!(
            "error: the PostgreSQL database {} already holds 1 touchpoint(s) and 0 dispatch(es): a setup is moved only into a database without any, so that nothing is mixed or overwritten. Give --to a new, empty database (e.g. `createdb touchctl`); `touchctl plan --state {}` shows the touchpoints this one holds",
            db.url(),
            db.url()
        ));
    assert_eq!(
        postgres_rows(&db, "SELECT generation, applied_at FROM touchpoints"),
        generation
    );
    // Not marked: apply on the SQLite file still works.
    p.run_env(&["apply", "--auto-approve"], &ENV)
        .code(0)
        .stdout_has("No changes");
}

#[test]
fn a_dry_run_reports_what_would_move_and_writes_nothing() {
    let Some(db) = postgres("state_migrate::a_dry_run_reports_what_would_move_and_writes_nothing")
    else {
        return;
    };
    let sink = Sink::ok();
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 2, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&DAEMON, &ENV);
    let (code, r) = d.dispatch(&trigger("sms", "ok", 5));
    assert_eq!(code, 202, "{r}");
    d.wait_finished(r["dispatch_id"].as_str().unwrap());
    let (code, log) = d.terminate();
    assert_eq!(code, 0, "{log}");
    let queue_before = std::fs::read(p.path().join(".touchctl/queue.db")).unwrap();
    let run = p.run(&["state", "migrate", "--to", db.url(), "--dry-run", "--json"]);
    run.code(0);
    let summary: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["dry_run"], true, "{summary}");
    assert_eq!(summary["touchpoints"], 1, "{summary}");
    assert_eq!(summary["batches"]["delivered"], 3, "{summary}");
    assert_eq!(summary["attempts"], 3, "{summary}");
    p.run(&["state", "migrate", "--to", db.url(), "--dry-run"])
        .code(0)
        .stdout_has(&format!(
            "Dry run: nothing was written. Moving .touchctl/state.db and .touchctl/queue.db into {} would move:",
            db.url()
        ))
        .stdout_has("batches             3: 0 pending (0 held), 3 delivered, 0 failed, 0 dead");
    // Not even touchctl's tables were created, and the files carry no mark.
    assert_eq!(
        postgres_rows(
            &db,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        ["0"]
    );
    let marks: i64 = rusqlite::Connection::open(p.path().join(".touchctl/queue.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM meta WHERE key LIKE 'migrated%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(marks, 0);
    assert_eq!(
        rusqlite::Connection::open(p.path().join(".touchctl/queue.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM batches", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        3
    );
    drop(queue_before);
    p.run(&["deliveries", "list"]).code(0);
}

/// A server that speaks just enough of PostgreSQL's protocol to ask for a password and refuse
/// it, as a server refuses a wrong one; returns its port.
fn refusing_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut len = [0u8; 4];
        // The startup message: its length, then the rest.
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        let _ = conn.read_exact(&mut rest);
        // AuthenticationCleartextPassword.
        let _ = conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        let mut tag = [0u8; 1];
        if conn.read_exact(&mut tag).is_err() || conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut password = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        let _ = conn.read_exact(&mut password);
        let mut fields = Vec::new();
        for (code, text) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"touchctl\""),
        ] {
            fields.push(code);
            fields.extend_from_slice(text.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(&fields);
        let _ = conn.write_all(&message);
    });
    port
}

#[test]
fn bad_inputs_are_refused_with_what_to_do_and_no_password_shown() {
    let p = Project::empty();
    p.run(&["state", "migrate", "--to", "postgres://touchctl@127.0.0.1:9/touchctl"])
        .code(1)
        .stderr_has(
            "error: there is no registry at .touchctl/state.db: name the SQLite state file to move with --from (default .touchctl/state.db)",
        );
    p.run(&[
        "state",
        "migrate",
        "--from",
        "nowhere/state.db",
        "--to",
        "postgres://touchctl@127.0.0.1:9/touchctl",
    ])
    .code(1)
    .stderr_has("error: there is no registry at nowhere/state.db");
    assert!(!p.path().join("nowhere").exists());
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", "http://127.0.0.1:9", 2, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p.run(&["state", "migrate", "--to", ".touchctl/other.db"])
        .code(1)
        .stderr_has(
            "error: --to takes a PostgreSQL URL, postgres://USER@HOST:PORT/DB, not `.touchctl/other.db`",
        );
    let password = "S3cret-never-shown";
    let port = refusing_server();
    let url = format!("postgres://touchctl:{password}@127.0.0.1:{port}/touchctl");
    let run = p.run(&["state", "migrate", "--to", &url]);
    run.code(1).stderr_has(&format!(
        "error: cannot connect to the PostgreSQL registry postgres://touchctl@127.0.0.1:{port}/touchctl: db error: FATAL: password authentication failed for user \"touchctl\""
    ));
    assert!(!run.all().contains(password), "{}", run.all());
    // Nothing was marked.
    p.run(&["deliveries", "list"])
        .code(1)
        .stderr_has("there is no queue file");
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
}
