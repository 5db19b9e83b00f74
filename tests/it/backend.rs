//! The registry backends a test runs against: the embedded SQLite file, and PostgreSQL.
//!
//! A suite that is about the registry is written once, each test a `fn name(b: Backend)` that makes
//! its project with [`crate::support::Project::with_samples_on`] (or `empty_on`) and looks at the
//! registry through the project's backend-neutral helpers (`query_one`, `execute`, `state_dump`, ...).
//! [`on_both_backends!`] then turns the names into `sqlite::name` and `postgres::name` tests.
//!
//! The PostgreSQL server comes from `TOUCHCTL_TEST_POSTGRES` (a `postgres://` URL of a superuser:
//! `tests/postgres/cluster.sh start DIR` starts a throwaway one and prints it; `.ci/run` does that).
//! Each project gets a database of its own (`touchctl_it_*`), created for it and dropped with it,
//! so tests run in parallel. Without the variable the PostgreSQL tests print `SKIPPED ...` and
//! pass; under `CI=true` they fail instead, since CI must run them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where a test's registry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: `.touchctl/state.db` in the project.
    Sqlite,
    /// A database of its own on the server `TOUCHCTL_TEST_POSTGRES` names.
    Postgres,
}

/// The variable naming the PostgreSQL server of the tests.
pub const SERVER_VAR: &str = "TOUCHCTL_TEST_POSTGRES";

impl Backend {
    /// Whether `test` can run on this backend here. PostgreSQL needs [`SERVER_VAR`]: without it
    /// this prints why the test is skipped and returns false, or, under `CI=true`, fails the test.
    pub fn available(self, test: &str) -> bool {
        match self {
            Backend::Sqlite => true,
            Backend::Postgres => {
                if server_url().is_some() {
                    return true;
                }
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!(
                        "{test}: {SERVER_VAR} is not set, and CI=true requires the PostgreSQL tests: \
                         start a server with `tests/postgres/cluster.sh start DIR` and export the URL it prints as {SERVER_VAR}"
                    );
                }
                eprintln!(
                    "SKIPPED {test}: {SERVER_VAR} is not set (`tests/postgres/cluster.sh start DIR` starts a server and prints its URL; under CI=true this test fails instead)"
                );
                false
            }
        }
    }
}

/// The server URL, when one is configured.
fn server_url() -> Option<String> {
    std::env::var(SERVER_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// The URL of database `name` on the server at `server` (its user, host, port and options kept).
fn database_url(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let without_db = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{without_db}/{name}?{query}"),
        None => format!("{without_db}/{name}"),
    }
}

/// Connects to `url`, failing the test with what to do when the server does not answer.
pub fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "cannot connect to the test PostgreSQL server ({SERVER_VAR}={}): {e}; is it running? \
             `tests/postgres/cluster.sh start DIR` starts one",
            redact(url)
        )
    })
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!(
            "{}{user}:[redacted]{}",
            &url[..authority_start],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// A database of its own for one test, dropped (with whatever still connects to it) when this is.
pub struct Database {
    server: String,
    name: String,
    url: String,
}

impl Database {
    /// Creates an empty database on the test server. Call only after [`Backend::available`].
    pub fn create() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let server = server_url().unwrap_or_else(|| panic!("{SERVER_VAR} is not set"));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "touchctl_it_{}_{}_{nanos:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        connect(&server)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = database_url(&server, &name);
        Self { server, name, url }
    }

    /// Its URL, as `--state` takes it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new connection to it.
    pub fn client(&self) -> postgres::Client {
        connect(&self.url)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // FORCE ends the sessions still open on it (a touchctl a failed test left running).
        let dropped = postgres::Client::connect(&self.server, postgres::NoTls).and_then(|mut c| {
            c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        });
        if let Err(e) = dropped {
            eprintln!("could not drop the test database {}: {e}", self.name);
        }
    }
}

/// A value read from either backend's registry: integers (and PostgreSQL booleans, as 0 and 1)
/// and text (PostgreSQL's `json`/`jsonb` as their text).
pub trait Cell: rusqlite::types::FromSql + Sized {
    /// Column `idx` of a PostgreSQL row.
    fn from_pg(row: &postgres::Row, idx: usize) -> Result<Self, String>;
}

impl Cell for i64 {
    fn from_pg(row: &postgres::Row, idx: usize) -> Result<Self, String> {
        use postgres::types::Type;
        let ty = row.columns()[idx].type_().clone();
        let value = if ty == Type::INT8 {
            row.try_get::<_, i64>(idx)
        } else if ty == Type::INT4 {
            row.try_get::<_, i32>(idx).map(i64::from)
        } else if ty == Type::INT2 {
            row.try_get::<_, i16>(idx).map(i64::from)
        } else if ty == Type::BOOL {
            row.try_get::<_, bool>(idx).map(i64::from)
        } else {
            return Err(format!("column {idx} is {ty}, not an integer"));
        };
        value.map_err(|e| e.to_string())
    }
}

impl Cell for String {
    fn from_pg(row: &postgres::Row, idx: usize) -> Result<Self, String> {
        row.try_get::<_, AnyText>(idx)
            .map(|t| t.0)
            .map_err(|e| e.to_string())
    }
}

/// Text of a `text`, `varchar`, `name`, `json` or `jsonb` column.
struct AnyText(String);

impl<'a> postgres::types::FromSql<'a> for AnyText {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary form is a version byte (1) and then the JSON text.
        let raw = if *ty == postgres::types::Type::JSONB {
            raw.strip_prefix(&[1u8]).ok_or("unknown jsonb version")?
        } else {
            raw
        };
        Ok(AnyText(std::str::from_utf8(raw)?.to_string()))
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::Type;
        [
            Type::TEXT,
            Type::VARCHAR,
            Type::NAME,
            Type::BPCHAR,
            Type::JSON,
            Type::JSONB,
        ]
        .contains(ty)
    }
}

/// Makes each test fn listed, written as `fn name(b: Backend)` in this module, two tests:
/// `sqlite::name` and `postgres::name` (see the module docs for what PostgreSQL needs).
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::backend::Backend::Sqlite);
                }
            )+
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    let backend = $crate::backend::Backend::Postgres;
                    if backend.available(concat!(module_path!(), "::", stringify!($name))) {
                        super::$name(backend);
                    }
                }
            )+
        }
    };
}
pub(crate) use on_both_backends;

#[test]
fn database_urls_keep_the_server_and_its_options() {
    assert_eq!(
        database_url("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
        "postgres://postgres@127.0.0.1:5432/t1"
    );
    assert_eq!(
        database_url("postgresql://u:p@127.0.0.1:5432/x?sslmode=disable", "t1"),
        "postgresql://u:p@127.0.0.1:5432/t1?sslmode=disable"
    );
    assert_eq!(
        database_url("postgres://postgres@127.0.0.1:5432", "t1"),
        "postgres://postgres@127.0.0.1:5432/t1"
    );
    assert_eq!(
        redact("postgres://u:secret-pw@127.0.0.1:5432/x"),
        "postgres://u:[redacted]@127.0.0.1:5432/x"
    );
    assert_eq!(redact("postgres://u@h/x"), "postgres://u@h/x");
}
