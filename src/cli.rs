//! What the user typed: the command line, parsed by clap, with no I/O.
//!
//! Each command declares the options it uses, so its `--help` lists only those, with an example
//! section. The shared ones (`--dir`, `--state`, `-q`, `-v`, `--color`) are small `Args` groups
//! flattened into the commands that use them; [`Cli::global`] gathers them into one [`Global`] for
//! the code that runs the command. They may still be written before the command, as when they
//! were global (`touchctl --dir DIR validate`): [`hoist_leading_options`] moves them after it
//! before clap parses, so a command that does not take one refuses it as clap refuses any
//! unknown option.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use touchctl::model::EnvPattern;

/// Manage marketing touchpoints (触点) as code: validate the TOML files, plan against the live
/// registry, apply.
#[derive(Debug, Parser)]
#[command(name = "touchctl", version, about, long_about = None)]
#[command(
    after_help = "Exit codes: 0 success; 1 error (or invalid files); 2 changes present (plan --detailed-exitcode).\n\
Typical flow: touchctl validate && touchctl plan && touchctl apply\n\
Each command's --help lists its options (--dir, --state, ... where they apply) and examples; those\n\
options may also come before the command: touchctl --dir examples/production/touchpoints validate"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the touchpoint files are read when a command does not take `--dir`.
const DEFAULT_DIR: &str = "touchpoints";
/// The registry file when a command does not take `--state`.
const DEFAULT_STATE: &str = ".touchctl/state.db";

/// The shared options as the command took them, each at its default where the command does not
/// take it.
#[derive(Debug)]
pub struct Global {
    /// The touchpoint folder.
    pub dir: PathBuf,
    /// The registry file.
    pub state: PathBuf,
    /// More detail.
    pub verbose: bool,
    /// Only errors and the requested output.
    pub quiet: bool,
    /// When to colour.
    pub color: ColorChoice,
    /// A folder secret file references may also resolve into.
    pub secrets_dir: Option<PathBuf>,
    /// The variables secret references may name (any but `TOUCHCTL_*` when empty).
    pub secret_env_allow: Vec<EnvPattern>,
}

impl Default for Global {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_DIR),
            state: PathBuf::from(DEFAULT_STATE),
            verbose: false,
            quiet: false,
            color: ColorChoice::Auto,
            secrets_dir: None,
            secret_env_allow: Vec::new(),
        }
    }
}

/// `--dir`, for the commands that read the touchpoint files.
#[derive(Debug, Args)]
pub struct DirArg {
    /// Folder holding the touchpoint files (searched recursively for *.toml; hidden entries
    /// skipped; links to files inside it followed, other links are errors).
    #[arg(long, default_value = DEFAULT_DIR, env = "TOUCHCTL_DIR", value_name = "DIR")]
    pub dir: PathBuf,
}

/// `--state`, for the commands that use the registry (or, for `deliveries`, the queue beside it).
#[derive(Debug, Args)]
pub struct StateArg {
    /// The live registry: a SQLite state file (mode 0600), created by the first command that
    /// writes to it (apply, plan --out, the daemon); until then plan reads it as empty. The daemon's
    /// queue file is queue.db beside it. Or a PostgreSQL database shared by several machines,
    /// which holds the registry and the queue every daemon on it shares:
    /// postgres://USER@HOST:PORT/DB (sslmode=require for TLS; the password from PGPASSWORD or the
    /// URL; `touchctl state migrate` moves a single-machine setup there).
    // Global, so that `deliveries --state FILE list` and `deliveries list --state FILE` both work.
    #[arg(
        long,
        global = true,
        default_value = DEFAULT_STATE,
        env = "TOUCHCTL_STATE",
        value_name = "FILE"
    )]
    pub state: PathBuf,
}

/// Where secret references may read from, for the commands that read secrets (plan, apply,
/// import, daemon).
#[derive(Debug, Args)]
pub struct SecretsArgs {
    /// A folder secret file references may also resolve into, besides the repository (the git
    /// work tree holding --dir, or --dir itself outside git), e.g. /run/secrets.
    #[arg(long, env = "TOUCHCTL_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// The environment variables secret references may name: comma-separated names, or prefixes
    /// ending in `*` (e.g. SMS_GATEWAY_TOKEN,WECHAT_*). Default: any but touchctl's own
    /// (TOUCHCTL_*), which are never a secret source.
    #[arg(
        long,
        env = "TOUCHCTL_SECRET_ENV_ALLOW",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    pub secret_env_allow: Vec<EnvPattern>,
}

/// `-q`, for the commands that print more than what was asked.
#[derive(Debug, Args)]
pub struct QuietArg {
    /// Only errors and the requested output.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `--color`, for the commands that colour their output.
#[derive(Debug, Args)]
pub struct ColorArg {
    /// Colour in terminal output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,
}

/// When to colour output.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ColorChoice {
    /// When standard output is a terminal and NO_COLOR is unset.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Output formats of validate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ValidateFormat {
    /// `path:line:col: error[CODE]: message`, one per line.
    Text,
    /// One JSON document with every diagnostic.
    Json,
}

/// Output formats of `deliveries show`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeliveriesFormat {
    /// A report for people; text from endpoints is escaped.
    Text,
    /// The batch with its attempts, replays and failed recipients, as JSON.
    Json,
}

/// Output formats of `deliveries list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// A table for people; text from endpoints is escaped.
    Text,
    /// The batches as JSON.
    Json,
    /// Only the batch ids, one a line: for `deliveries show` and `deliveries replay`.
    Ids,
}

/// The states a batch is in, for `deliveries list --only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatchState {
    /// Still to deliver: due, waiting for a retry, or held.
    Pending,
    /// Sent; recipients delivered (some may have failed for good).
    Delivered,
    /// Finished with every recipient failed for good, none delivered.
    Failed,
    /// Dead-lettered after its last attempt; `deliveries replay` sends it again.
    Dead,
}

impl BatchState {
    /// The name the queue stores.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Pending => "pending",
            BatchState::Delivered => "delivered",
            BatchState::Failed => "failed",
            BatchState::Dead => "dead",
        }
    }
}

/// Output formats of plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    /// For terminals and logs.
    Text,
    /// The versioned JSON plan document (see the README).
    Json,
    /// A pull-request comment: summary table with risk flags, details folded (under 65,000 characters).
    Markdown,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and check every touchpoint file; report every problem at once.
    ///
    /// Exit 0 when the tree is valid, 1 when any file has a problem.
    #[command(after_help = "Examples:
  touchctl validate
  touchctl validate --dir examples/production/touchpoints
  touchctl validate --format json > diagnostics.json")]
    Validate {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
        format: ValidateFormat,
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        quiet: QuietArg,
    },
    /// Write the JSON Schema of touchpoint files, generated from touchctl's types.
    #[command(after_help = "Examples:
  touchctl schema            write schemas/touchpoint.schema.json (commit it)
  touchctl schema --check    in CI: exit 1 when the committed schema is stale")]
    Schema {
        /// Do not write; exit 1 if the file differs from what this touchctl generates.
        #[arg(long)]
        check: bool,
        /// Where the schema file lives.
        #[arg(long, default_value = touchctl::model::schema::DEFAULT_PATH)]
        out: PathBuf,
    },
    /// Show what apply would change in the registry to match the files.
    #[command(after_help = "Examples:
  touchctl plan
  touchctl plan --out plan.json && touchctl apply plan.json
  touchctl plan --detailed-exitcode    exit 2 when there are changes (CI)
  touchctl plan --base main --format markdown > comment.md    the pull-request view, no registry
  touchctl plan --refresh    also check the platforms' credentials live (warnings only)")]
    Plan {
        /// Output format.
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Also save the plan (JSON) to this file, for `touchctl apply FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Exit 0 when there are no changes, 1 on error, 2 when there are changes: creates,
        /// updates, deletes. Drift counts as far as apply undoes it: a field changed outside apply
        /// is an update; a pause is kept by apply, so it is not a change.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Compare the files at this git revision (branch, tag, commit) with the work tree instead
        /// of the registry: the pull-request view. Reads git objects, no checkout, no registry;
        /// secrets are compared by reference only.
        #[arg(long, value_name = "REV", conflicts_with = "out")]
        base: Option<String>,
        /// Also check each channel touchpoint live (WeChat, WeCom, Getui): its credentials get a
        /// token, its app exists. Problems are warnings on the plan; the exit code is unchanged.
        #[arg(long)]
        refresh: bool,
        /// With --refresh: check platforms at loopback, private and link-local addresses too
        /// (a local sandbox), which are refused otherwise, as the daemon refuses them.
        #[arg(long, requires = "refresh")]
        allow_private_network: bool,
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        state: StateArg,
        #[command(flatten)]
        secrets: SecretsArgs,
        /// More detail: also list unchanged touchpoints.
        #[arg(short, long, conflicts_with = "quiet")]
        verbose: bool,
        #[command(flatten)]
        quiet: QuietArg,
        #[command(flatten)]
        color: ColorArg,
    },
    /// Make the registry match the files: a saved plan exactly, or plan, confirm and apply.
    #[command(after_help = "Examples:
  touchctl apply                   plan, confirm with 'yes', apply
  touchctl apply plan.json         apply exactly the plan saved by `touchctl plan --out plan.json`
  touchctl apply --auto-approve --allow-delete --max-deletes 1")]
    Apply {
        /// A plan saved by `touchctl plan --out FILE`. It is applied exactly, without a prompt, and
        /// refused if a touchpoint it changes has changed in the registry since.
        plan: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Allow deleting touchpoints whose files are gone.
        #[arg(long)]
        allow_delete: bool,
        /// Refuse to apply a plan with more deletes than this.
        #[arg(long, default_value_t = 5, value_name = "N")]
        max_deletes: usize,
        /// Apply even though the touchpoint folder has uncommitted changes (the registry records
        /// the commit with "dirty").
        #[arg(long)]
        allow_dirty: bool,
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        state: StateArg,
        #[command(flatten)]
        secrets: SecretsArgs,
        #[command(flatten)]
        quiet: QuietArg,
        #[command(flatten)]
        color: ColorArg,
    },
    /// Write the TOML file of a live touchpoint that has no file yet, to bring it under code.
    ///
    /// The file gets the `#:schema` line, secret references (never values), the canonical field
    /// order and no defaults, so that `touchctl plan` then shows no change for it.
    #[command(after_help = "Examples:
  touchctl import sms
  touchctl import sms --out touchpoints/custom/sms.toml
  touchctl import --all")]
    Import {
        /// The ids of the live touchpoints to import.
        #[arg(conflicts_with = "all")]
        ids: Vec<String>,
        /// Import every live touchpoint that no file describes.
        #[arg(long)]
        all: bool,
        /// Where to write the file (one id only). Default: the file the touchpoint was applied
        /// from, when that was under --dir; otherwise `<dir>/<id>.toml`.
        #[arg(long, value_name = "FILE", conflicts_with = "all")]
        out: Option<PathBuf>,
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        state: StateArg,
        #[command(flatten)]
        secrets: SecretsArgs,
        #[command(flatten)]
        quiet: QuietArg,
    },
    /// Serve the dispatch API, keep the registry in step with the files, and deliver.
    ///
    /// Accepted triggers are stored in the queue (its file, or the PostgreSQL database --state
    /// names, shared by every daemon on it) before the API answers 202; batches are sent to the
    /// live touchpoints with retries, and survive restarts. The API token comes from
    /// TOUCHCTL_API_TOKEN or --api-token-file. Stop with SIGTERM or Ctrl-C: open requests and
    /// in-flight deliveries finish first.
    #[command(after_help = "Examples:
  TOUCHCTL_API_TOKEN=\"$(cat /run/secrets/touchctl-api)\" touchctl daemon --listen 0.0.0.0:8640 --watch
  touchctl daemon --api-token-file /run/secrets/touchctl-api --watch --source git:main
  touchctl daemon --insecure-no-auth --allow-private-network    local testing, loopback only")]
    Daemon(DaemonArgs),
    /// Send a campaign trigger to a running daemon (POST /v1/dispatch).
    ///
    /// Users come from a file (or `-` for standard input): a JSON array of
    /// {"user_id", "attributes": {...}} or one such object per line. They are streamed as NDJSON.
    ///
    /// The daemon's API token is read from the environment variable TOUCHCTL_API_TOKEN, or from
    /// the file given with --api-token-file; without one, only a daemon started with
    /// --insecure-no-auth answers.
    #[command(after_help = "Examples:
  export TOUCHCTL_API_TOKEN=...    the daemon's API token (or --api-token-file FILE)
  touchctl dispatch --touchpoint sms --campaign member-day --users users.ndjson \\
      --param text=\"会员日满100减20\" --wait
  touchctl dispatch --url http://10.0.0.5:8640 --touchpoint sms --campaign member-day \\
      --users - --idempotency-key member-day-2026-12-03 < users.json")]
    Dispatch(DispatchArgs),
    /// Authorise an account for a touchpoint through a running daemon.
    #[command(
        subcommand,
        after_help = "Examples:
  touchctl auth wechat oa-main    bind the Official Account of touchpoint oa-main"
    )]
    Auth(AuthCommand),
    /// The delivery log: list batches, show one with its attempts, replay dead-lettered ones.
    #[command(after_help = "Examples:
  touchctl deliveries list --only dead
  touchctl deliveries show dsp_1a2013279ada69c38505917_0
  touchctl deliveries replay --all --touchpoint sms")]
    Deliveries {
        #[command(subcommand)]
        command: DeliveriesCommand,
        /// The SQLite queue file (default: queue.db beside --state; with a PostgreSQL --state the
        /// queue is read from the database unless this names a file).
        #[arg(long, global = true, value_name = "PATH")]
        queue: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
    /// Serve local stand-ins for the WeChat Official Account, WeChat open platform, WeCom and Getui
    /// APIs and a webhook sink for custom touchpoints, to try everything without accounts.
    ///
    /// The platform endpoints are served at their real paths and answer as the real services do
    /// (their success envelopes, error codes and messages, HTTP statuses, token lifetimes), knowing
    /// the credentials of the touchpoints in --dir: point a touchpoint's `api_base` at the sandbox
    /// (custom touchpoints: a url of http://ADDR/_sandbox/webhooks/NAME, with allow_insecure).
    /// Served: OA (GET /cgi-bin/token, POST /cgi-bin/message/template/send, POST
    /// /cgi-bin/wxopen/wxamplinkget); the open platform for every wechat_open_platform file (POST
    /// /cgi-bin/component/api_component_token, api_create_preauthcode, api_query_auth,
    /// api_authorizer_token, api_get_authorizer_info; the authorisation page GET
    /// /cgi-bin/componentloginpage, /safe/bindcomponent, /wxaopen/safe/bindcomponent, listing the
    /// OA files in third-party mode naming the platform, each with an Authorise link that
    /// redirects to redirect_uri with an auth_code; encrypted verify tickets pushed to
    /// --push-tickets-to every --ticket-interval, and now with POST /_sandbox/tickets); WeCom
    /// (GET /cgi-bin/gettoken, POST /cgi-bin/message/send, POST
    /// /cgi-bin/externalcontact/add_msg_template); Getui v2 (POST /v2/{appId}/auth,
    /// /v2/{appId}/push/list/message, /v2/{appId}/push/list/cid); POST /_sandbox/webhooks/NAME
    /// (Bearer token and Standard Webhooks signature checked).
    ///
    /// GET /_sandbox/messages[?channel=oa|wecom|getui|custom][&touchpoint=ID][&kind=token|message]
    /// lists what it received, oldest first (the last 100,000 requests, and at most 256 MiB of
    /// their bodies). POST /_sandbox/faults takes a JSON list of rules injecting failures
    /// ({"channel", "match": {"touchpoint", "endpoint": "token"|"send"}, "action", "count"}, actions
    /// expire_tokens, rate_limit {code}, fail_users {ids, code}, error {code | http_status}, slow
    /// {delay}; channel open_platform also grant_only {permission_ids}, revoke {app_id},
    /// expire_ticket); DELETE /_sandbox/faults clears them. Everything is kept in memory only, nothing
    /// between runs. Request bodies over 16 MiB are refused (413). Stop with Ctrl-C or SIGTERM.
    #[command(
        after_help = "Examples:
  touchctl sandbox                                 the sample touchpoints, on 127.0.0.1:8641
  touchctl sandbox --listen 127.0.0.1:0 --token-ttl 60s
  curl -s 'http://127.0.0.1:8641/_sandbox/messages?channel=oa'
  curl -s -X POST http://127.0.0.1:8641/_sandbox/faults \\
      -d '[{\"channel\": \"oa\", \"action\": \"rate_limit\", \"code\": 45011, \"count\": 2}]'
  curl -s -X POST http://127.0.0.1:8641/_sandbox/faults \\
      -d '[{\"channel\": \"wecom\", \"action\": \"fail_users\", \"ids\": [\"zhangsan\"]}]'
  curl -s -X DELETE http://127.0.0.1:8641/_sandbox/faults
  touchctl sandbox --push-tickets-to 'http://127.0.0.1:8640/wechat/platforms/{platform}/events'
  curl -s -X POST http://127.0.0.1:8641/_sandbox/tickets
  curl -s -X POST http://127.0.0.1:8641/_sandbox/faults \\
      -d '[{\"channel\": \"open_platform\", \"action\": \"revoke\", \"app_id\": \"wx8a7c3e1f5b2d4690\"}]'
  touchctl sandbox messages                        what a running sandbox received, a line each",
        args_conflicts_with_subcommands = true
    )]
    Sandbox(SandboxArgs),
    /// Move touchctl's state: a single-machine setup (SQLite registry and queue) into PostgreSQL.
    #[command(after_help = "Examples:
  touchctl state migrate --to postgres://touchctl@db.internal:5432/touchctl --dry-run
  touchctl state migrate --from .touchctl/state.db --to postgres://touchctl@db.internal:5432/touchctl
  touchctl state unmark --from .touchctl/state.db")]
    #[command(subcommand)]
    State(StateCommand),
    /// Remove the registry lock, or release the queue from a daemon, left by a process that is
    /// gone for good.
    ///
    /// A lock or queue held by a process that no longer runs on this host is taken over
    /// automatically, and so is one whose holder stopped renewing its lease 30 s ago (its host was
    /// replaced, say). This is for a holder you know is gone before then, or one from a touchctl
    /// before leases. The lock id is in the "registry is locked" message; --daemon releases the
    /// queue named in the "another daemon ... works this queue" message.
    #[command(group(ArgGroup::new("what").required(true).args(["lock_id", "daemon"])))]
    #[command(after_help = "Examples:
  touchctl force-unlock 9c1e5f0a2b7d4e36    the lock id the \"registry is locked\" message names
  touchctl force-unlock --daemon            release the queue from a daemon that is gone")]
    ForceUnlock {
        /// The registry lock id to remove.
        lock_id: Option<String>,
        /// Release the queue file from the daemon holding it, instead of a registry lock.
        #[arg(long)]
        daemon: bool,
        /// Remove it even though its holder still renews its lease (so looks alive). Only when you
        /// are sure it is gone: two writers at once could overwrite each other's changes, and two
        /// daemons on one queue send deliveries twice.
        #[arg(long)]
        force: bool,
        /// With --daemon: the queue file (default: queue.db beside --state).
        #[arg(long, value_name = "PATH", requires = "daemon")]
        queue: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
}

/// `touchctl daemon` options.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub dir: DirArg,
    #[command(flatten)]
    pub state: StateArg,
    #[command(flatten)]
    pub secrets: SecretsArgs,
    /// Where the API listens.
    #[arg(
        long,
        default_value = "127.0.0.1:8640",
        env = "TOUCHCTL_LISTEN",
        value_name = "ADDR"
    )]
    pub listen: std::net::SocketAddr,
    /// The daemon's address as the browsers of account administrators and WeChat reach it
    /// (default: http://<--listen address>). WeChat sends an administrator's browser to
    /// URL/wechat/platforms/PLATFORM/authorized after an authorisation, and pushes a platform's
    /// events to URL/wechat/platforms/PLATFORM/events: set that as the platform's 授权事件接收URL in
    /// the open platform's console, and the redirect domain to this URL's host.
    #[arg(long, env = "TOUCHCTL_PUBLIC_URL", value_parser = parse_public_url, value_name = "URL")]
    pub public_url: Option<String>,
    /// Reconcile the registry with the files: on every change (once the files have been quiet
    /// for 50 ms; only the files that changed are read again) and every --interval (every file
    /// read again). A tree with problems changes nothing; the problems show at /v1/status and in
    /// the log.
    #[arg(long)]
    pub watch: bool,
    /// Where --watch reads the files. `worktree`: the files as they are on disk, committed or
    /// not, as `apply --allow-dirty` applies them; touchpoints applied from uncommitted files are
    /// recorded as from a dirty tree (in the registry, as `dirty` at /v1/status, and in the log).
    /// `git:REF`: only what is committed at REF (e.g. git:main), to apply reviewed changes only.
    #[arg(long, default_value = "worktree", value_name = "SOURCE")]
    pub source: String,
    /// How often to reconcile (reading every file again) and re-read secrets even without a file
    /// event (at least 1s).
    #[arg(long, default_value = "60s", value_parser = parse_second_or_more, value_name = "DURATION")]
    pub interval: std::time::Duration,
    /// Deletes one reconcile may make at most (more refuses the whole reconcile).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_deletes: usize,
    /// The queue file (default: queue.db beside --state; with a PostgreSQL --state the queue is
    /// in the database, and this is refused).
    #[arg(long, value_name = "PATH")]
    pub queue: Option<PathBuf>,
    /// Deliver to loopback, private and link-local addresses (local sinks, tests). Without it such
    /// endpoints are refused and their batches dead-lettered.
    #[arg(long)]
    pub allow_private_network: bool,
    /// Read the API token from this file instead of TOUCHCTL_API_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Serve the API without a token. Only on a loopback --listen address.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Requests in flight to one touchpoint at most.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub concurrency: usize,
    /// Requests in flight in all at most.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_in_flight: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    pub max_body: usize,
    /// Bytes of request bodies held in memory at once, from the first byte received until the
    /// trigger is stored; a trigger past it gets 503 with Retry-After. At least --max-body
    /// (default: twice --max-body, 128 MiB).
    #[arg(long, value_name = "BYTES")]
    pub max_body_memory: Option<usize>,
    /// Most recipients the queue holds before new triggers get 503 with Retry-After.
    #[arg(long, default_value_t = 10_000_000, value_name = "N")]
    pub max_queued: u64,
    /// API connections served at once; the next ones wait until one closes (default: half the
    /// open-file limit, `ulimit -n`, at most 1024).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// How long a client may take to send its request headers, and its body (at least 1s).
    #[arg(long, default_value = "30s", value_parser = parse_second_or_more, value_name = "DURATION")]
    pub client_timeout: std::time::Duration,
    /// How long to wait for open requests and in-flight deliveries when stopping. Deliveries still
    /// in flight then are cut off, recorded as interrupted, and sent again on the next start.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: std::time::Duration,
    /// How long a fully delivered dispatch (its batches, attempt log and idempotency key) is kept
    /// in the queue file. Dispatches with pending or dead batches are kept whatever their age.
    /// `0s` keeps everything.
    #[arg(long, default_value = "7d", value_parser = parse_duration, value_name = "DURATION")]
    pub retention: std::time::Duration,
    /// How long the daemon's hold lasts unless renewed (it renews it every sixth of that): on its
    /// queue file, or with a PostgreSQL --state on each batch it is sending. A daemon that dies is
    /// taken over this long after its last renewal; shorter takes over sooner, and makes a daemon
    /// that cannot reach the database for that long lose its batches to the others.
    #[arg(long, default_value = "30s", value_parser = parse_lease, value_name = "DURATION")]
    pub lease_ttl: std::time::Duration,
}

/// `touchctl sandbox` options.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub dir: DirArg,
    #[command(flatten)]
    pub secrets: SecretsArgs,
    /// Where the sandbox listens (port 0 picks a free port; the first line printed names it).
    #[arg(long, default_value = "127.0.0.1:8641", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Listen on an address other than loopback. The sandbox knows your touchpoints'
    /// credentials and accepts anyone: only on a network you trust.
    #[arg(long)]
    pub allow_remote: bool,
    /// Shorten token lifetimes to this (1s to 1d): WeChat, open platform and WeCom tokens last
    /// 7200s, Getui tokens a day, open platform pre-auth codes 1800s and authorisation codes 600s,
    /// unless this is shorter. `expires_in` and `expire_time` say so.
    #[arg(long, value_parser = parse_token_ttl, value_name = "DURATION")]
    pub token_ttl: Option<std::time::Duration>,
    /// Push each open platform's encrypted verify tickets (and authorisation events) to this URL,
    /// the daemon's event URL; `{platform}` is replaced by the platform's id, e.g.
    /// http://127.0.0.1:8640/wechat/platforms/{platform}/events. Without it, pushes start when
    /// POST /_sandbox/tickets names a URL.
    #[arg(long, value_name = "URL", value_parser = parse_push_url)]
    pub push_tickets_to: Option<String>,
    /// How often a verify ticket is pushed (1s to 1d; WeChat pushes every 10 minutes). The first
    /// is pushed right at start.
    #[arg(long, default_value = "600s", value_parser = parse_token_ttl, value_name = "DURATION")]
    pub ticket_interval: std::time::Duration,
    #[command(subcommand)]
    pub command: Option<SandboxCommand>,
}

/// What `touchctl sandbox` does besides serving.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Show what a running sandbox received (GET /_sandbox/messages): one line per request, its
    /// channel, touchpoint, recipients, what it carried and how the sandbox answered.
    #[command(after_help = "Examples:
  touchctl sandbox messages
  touchctl sandbox messages --channel oa --kind all
  touchctl sandbox messages --format json | jq '.messages | length'")]
    Messages {
        /// The sandbox.
        #[arg(
            long,
            env = "TOUCHCTL_SANDBOX_URL",
            default_value = "http://127.0.0.1:8641"
        )]
        url: String,
        /// Only this channel.
        #[arg(long, value_parser = ["oa", "wecom", "getui", "custom", "open_platform"])]
        channel: Option<String>,
        /// Only this touchpoint.
        #[arg(long, value_name = "ID")]
        touchpoint: Option<String>,
        /// Which requests: messages (sends, pushes, webhooks), tokens, queries, or all.
        #[arg(long, default_value = "message", value_parser = ["message", "token", "query", "all"])]
        kind: String,
        /// Output format: a line per request, or the sandbox's JSON as it is.
        #[arg(long, value_enum, default_value_t = MessagesFormat::Text)]
        format: MessagesFormat,
    },
    /// Act as an account's administrator on the sandbox's authorisation page: open URL (the PC or
    /// mobile link `touchctl auth wechat` prints), press the account's 授权 / Authorise button,
    /// follow the redirect back to the daemon, and print the page the daemon shows. What a person
    /// does in a browser, for a terminal or a script.
    #[command(after_help = "Example:
  touchctl auth wechat wechat-service > binding.txt &
  touchctl sandbox authorise \"$(sed -n 's/^PC URL: //p' binding.txt)\"")]
    Authorise {
        /// The authorisation link `touchctl auth wechat` printed (PC or mobile).
        url: String,
        /// The account to authorise (its app id), when the page lists more than one.
        #[arg(long, value_name = "APP_ID")]
        account: Option<String>,
    },
}

/// `touchctl state` subcommands.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Move a single-machine setup into an empty PostgreSQL database, so that several daemons can
    /// share it: the registry (every touchpoint with its spec, drift, fingerprints, generation,
    /// pause and provenance; the open platforms' verify tickets; the registry id and fingerprint
    /// key, so that `plan` against the database shows no change) and the queue (every dispatch
    /// with its idempotency key, every batch in every state with its users, every attempt, failed
    /// recipient and replay).
    ///
    /// Everything moves in one PostgreSQL transaction: all of it, or nothing. It is refused while
    /// a daemon works the queue file (stop the daemon first), while an apply holds the registry
    /// lock, and when the database holds touchpoints or dispatches already. While it runs it holds
    /// the queue and the registry lock itself, so no daemon or apply starts on the files. Then it
    /// marks both files as moved: a daemon, `deliveries` or apply on them is refused from then on
    /// (their batches are in PostgreSQL now, and would be sent twice), and `touchctl state unmark`
    /// undoes that. Progress goes to standard error, the summary to standard output.
    ///
    /// The password goes in PGPASSWORD (or the URL); it is never shown. Exit 0 when moved (or,
    /// with --dry-run, when it would be), 1 on any error (nothing moved).
    #[command(after_help = "Examples:
  touchctl state migrate --to postgres://touchctl@db.internal:5432/touchctl --dry-run
  PGPASSWORD=... touchctl state migrate --from .touchctl/state.db --to 'postgres://touchctl@db.internal:5432/touchctl?sslmode=require'
  touchctl state migrate --to postgres://touchctl@db.internal:5432/touchctl --json > moved.json
Afterwards: touchctl daemon --state postgres://touchctl@db.internal:5432/touchctl")]
    Migrate(MigrateArgs),
    /// Make SQLite files that `state migrate` moved usable again, by removing their mark. Only if
    /// the move was a mistake and nothing works the PostgreSQL copy: a daemon on these files then
    /// sends their pending batches, and one on PostgreSQL would send them too.
    #[command(after_help = "Examples:
  touchctl state unmark
  touchctl state unmark --from .touchctl/state.db --queue .touchctl/queue.db")]
    Unmark(UnmarkArgs),
}

/// `touchctl state migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The SQLite registry file to move.
    #[arg(long, default_value = DEFAULT_STATE, value_name = "FILE")]
    pub from: PathBuf,
    /// The PostgreSQL database to move it into: postgres://USER@HOST:PORT/DB (sslmode=require
    /// for TLS). It must hold no touchpoints or dispatches; touchctl's tables are created if
    /// missing.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// The queue file to move (default: queue.db beside --from). A missing one moves nothing and
    /// is created marked, so that no daemon starts on these files.
    #[arg(long, value_name = "FILE")]
    pub queue: Option<PathBuf>,
    /// Only read both sides and report what would move; nothing is written anywhere.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub quiet: QuietArg,
}

/// `touchctl state unmark` options.
#[derive(Debug, Args)]
pub struct UnmarkArgs {
    /// The SQLite registry file.
    #[arg(long, default_value = DEFAULT_STATE, value_name = "FILE")]
    pub from: PathBuf,
    /// The queue file (default: queue.db beside --from).
    #[arg(long, value_name = "FILE")]
    pub queue: Option<PathBuf>,
}

/// Output formats of `sandbox messages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MessagesFormat {
    /// A line per request.
    Text,
    /// The sandbox's JSON, as it answered.
    Json,
}

/// `touchctl dispatch` options.
#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// The touchpoint id.
    #[arg(long)]
    pub touchpoint: String,
    /// The campaign the users were triggered by.
    #[arg(long)]
    pub campaign: String,
    /// The users: a JSON array, or one JSON object per line; `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub users: PathBuf,
    /// A template param as text: `--param text="会员日满100减20"` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// A template param as JSON: `--param-json points=100` (repeatable).
    #[arg(long = "param-json", value_name = "NAME=JSON")]
    pub params_json: Vec<String>,
    /// The template to send, by its `id` in the touchpoint's `[[templates]]` (Official Account,
    /// WeCom); its fields come from `--param`.
    #[arg(long, value_name = "ID")]
    pub template: Option<String>,
    /// App push: the notification title (instead of the touchpoint's `title`).
    #[arg(long)]
    pub title: Option<String>,
    /// App push: the notification body (instead of the touchpoint's `body`).
    #[arg(long)]
    pub body: Option<String>,
    /// App push: data handed to the app with the notification.
    #[arg(long)]
    pub payload: Option<String>,
    /// Makes the trigger idempotent: the same key again queues nothing and returns the first answer.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// The daemon's address.
    #[arg(
        long,
        env = "TOUCHCTL_URL",
        default_value = "http://127.0.0.1:8640",
        value_name = "URL"
    )]
    pub url: String,
    /// Wait until every batch is delivered or dead-lettered, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Users per trigger. A larger file is sent as several triggers, one after the other (the
    /// daemon refuses a body over its --max-body, 64 MiB by default); with --idempotency-key KEY,
    /// part N is sent with the key KEY#N, so running the same command again sends only the parts
    /// not accepted yet. A user id in more than one part is sent once.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub per_trigger: usize,
    /// Read the daemon's API token from this file instead of TOUCHCTL_API_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub quiet: QuietArg,
}

/// `touchctl auth` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Bind an Official Account in third-party mode: its administrator authorises the account's
    /// open platform, and the daemon writes the refresh token the touchpoint names.
    ///
    /// The daemon gets a pre-auth code and answers two authorisation URLs: this command prints
    /// them, and the mobile one as a QR code. The account's administrator opens the PC URL in a
    /// browser (and scans the code WeChat shows there) or scans the QR code with WeChat, and picks
    /// the permissions to grant. WeChat then sends the browser back to the daemon (its
    /// --public-url), which exchanges the code and writes the touchpoint's
    /// `authorizer_refresh_token` file. Meanwhile this command waits (until the pre-auth code
    /// expires, about 10 minutes) and prints which of the touchpoint's `required_permissions` were
    /// granted and which are missing.
    ///
    /// Exit status: 0 bound with every required permission, 2 bound with some missing, 1 failed
    /// or expired (the reason is printed).
    #[command(after_help = "Examples:
  export TOUCHCTL_API_TOKEN=...    the daemon's API token (or --api-token-file FILE)
  touchctl auth wechat oa-main
  touchctl auth wechat oa-main --daemon http://10.0.0.5:8640 --qr never")]
    Wechat(AuthWechatArgs),
}

/// `touchctl auth wechat` options.
#[derive(Debug, Args)]
pub struct AuthWechatArgs {
    /// The id of the Official Account touchpoint (`auth.mode = "third_party"`).
    pub touchpoint: String,
    /// The daemon's address.
    #[arg(
        long,
        env = "TOUCHCTL_URL",
        default_value = "http://127.0.0.1:8640",
        value_name = "URL"
    )]
    pub daemon: String,
    /// Read the daemon's API token from this file instead of TOUCHCTL_API_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// When to print the mobile URL as a QR code: `auto` when standard output is a terminal.
    #[arg(long, value_enum, default_value_t = QrChoice::Auto, value_name = "WHEN")]
    pub qr: QrChoice,
}

/// When `auth wechat` draws the QR code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QrChoice {
    /// When standard output is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never (the URLs are printed anyway).
    Never,
}

/// `touchctl deliveries` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List batches, newest first.
    #[command(after_help = "Examples:
  touchctl deliveries list
  touchctl deliveries list --only dead --touchpoint sms
  touchctl deliveries list --dispatch dsp_1a2013279ada69c38505917 --limit 0 --format json
  touchctl deliveries replay $(touchctl deliveries list --only dead --touchpoint sms --format ids)")]
    List {
        /// Only batches in this state.
        // `--status`, its former name, still works (hidden: it read like a sibling of --state).
        #[arg(long, value_enum, alias = "status", value_name = "BATCH_STATE")]
        only: Option<BatchState>,
        /// Only batches of this touchpoint.
        #[arg(long)]
        touchpoint: Option<String>,
        /// Only batches of this dispatch.
        #[arg(long)]
        dispatch: Option<String>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        format: ListFormat,
    },
    /// Show one batch: its state, every attempt (status, latency, generation, error) and the
    /// recipients that failed for good.
    #[command(after_help = "Examples:
  touchctl deliveries show dsp_1a2013279ada69c38505917_0
  touchctl deliveries show dsp_1a2013279ada69c38505917_0 --format json")]
    Show {
        /// The batch id (as listed; the `webhook-id` the endpoint saw).
        batch: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DeliveriesFormat::Text)]
        format: DeliveriesFormat,
    },
    /// Put dead-lettered batches back in the queue, due now, with a fresh attempt budget. A running
    /// daemon picks them up within a second.
    #[command(after_help = "Examples:
  touchctl deliveries replay dsp_1a2013279ada69c38505917_0
  touchctl deliveries replay --all --touchpoint sms")]
    Replay {
        /// The batch ids to replay.
        batches: Vec<String>,
        /// Replay every dead batch (of --touchpoint, if given).
        #[arg(long, conflicts_with = "batches")]
        all: bool,
        /// With --all: only this touchpoint's.
        #[arg(long, requires = "all")]
        touchpoint: Option<String>,
    },
}

impl Cli {
    /// The shared options as this command took them (the defaults for those it does not take).
    pub fn global(&self) -> Global {
        let mut g = Global::default();
        let mut secrets = None;
        match &self.command {
            Command::Validate { dir, quiet, .. } => {
                (g.dir, g.quiet) = (dir.dir.clone(), quiet.quiet);
            }
            Command::Schema { .. } => {}
            Command::Plan {
                dir,
                state,
                secrets: s,
                verbose,
                quiet,
                color,
                ..
            } => {
                (g.dir, g.state, g.verbose, g.quiet, g.color) = (
                    dir.dir.clone(),
                    state.state.clone(),
                    *verbose,
                    quiet.quiet,
                    color.color,
                );
                secrets = Some(s);
            }
            Command::Apply {
                dir,
                state,
                secrets: s,
                quiet,
                color,
                ..
            } => {
                (g.dir, g.state, g.quiet, g.color) = (
                    dir.dir.clone(),
                    state.state.clone(),
                    quiet.quiet,
                    color.color,
                );
                secrets = Some(s);
            }
            Command::Import {
                dir,
                state,
                secrets: s,
                quiet,
                ..
            } => {
                (g.dir, g.state, g.quiet) = (dir.dir.clone(), state.state.clone(), quiet.quiet);
                secrets = Some(s);
            }
            Command::Daemon(args) => {
                (g.dir, g.state) = (args.dir.dir.clone(), args.state.state.clone());
                secrets = Some(&args.secrets);
            }
            Command::Sandbox(args) => {
                g.dir = args.dir.dir.clone();
                secrets = Some(&args.secrets);
            }
            Command::Dispatch(args) => g.quiet = args.quiet.quiet,
            Command::Auth(_) => {}
            Command::State(StateCommand::Migrate(args)) => g.quiet = args.quiet.quiet,
            Command::State(StateCommand::Unmark(_)) => {}
            Command::Deliveries { state: s, .. } | Command::ForceUnlock { state: s, .. } => {
                g.state = s.state.clone();
            }
        }
        if let Some(s) = secrets {
            g.secrets_dir = s.secrets_dir.clone();
            g.secret_env_allow = s.secret_env_allow.clone();
        }
        g
    }
}

/// Options that belong to commands but may be written before the command, as when they were
/// global: each with whether it takes a value.
const LEADING_OPTIONS: &[(&str, bool)] = &[
    ("--dir", true),
    ("--state", true),
    ("--secrets-dir", true),
    ("--secret-env-allow", true),
    ("--color", true),
    ("--verbose", false),
    ("--quiet", false),
];

/// How many arguments from `args[i]` on are one leading option (with its value), if it is one.
fn leading_option(args: &[OsString], i: usize) -> Option<usize> {
    let arg = args.get(i)?.to_str()?;
    if let Some(short) = arg.strip_prefix('-')
        && !short.is_empty()
        && short.chars().all(|c| c == 'v' || c == 'q')
    {
        return Some(1);
    }
    LEADING_OPTIONS.iter().find_map(|&(name, takes_value)| {
        if arg == name {
            Some(if takes_value && i + 1 < args.len() {
                2
            } else {
                1
            })
        } else if takes_value && arg.strip_prefix(name)?.starts_with('=') {
            Some(1)
        } else {
            None
        }
    })
}

/// The command line with the options written before the command moved right after it
/// (`touchctl --state FILE apply` becomes `touchctl apply --state FILE`), so that clap finds them
/// among the command's own options, or refuses them for a command that does not take them.
/// Anything else is left as it is.
pub fn hoist_leading_options(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut i = 1;
    while let Some(n) = leading_option(&args, i) {
        i += n;
    }
    let is_command = args
        .get(i)
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.starts_with('-'));
    if i == 1 || !is_command {
        return args;
    }
    let mut out = Vec::with_capacity(args.len());
    out.push(args[0].clone());
    out.push(args[i].clone());
    out.extend_from_slice(&args[1..i]);
    out.extend_from_slice(&args[i + 1..]);
    out
}

fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    let ttl = parse_duration(s)?;
    let range = std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);
    if range.contains(&ttl) {
        Ok(ttl)
    } else {
        Err("a lease lasts from 1s to 1h".into())
    }
}

/// A token lifetime: from a second to a day.
fn parse_push_url(s: &str) -> Result<String, String> {
    touchctl::sandbox::check_push_url(s).map(|()| s.to_string())
}

fn parse_token_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_second_or_more(s)?;
    if d > std::time::Duration::from_secs(86_400) {
        return Err(format!("{s} is too long: tokens last a day at most (1d)"));
    }
    Ok(d)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 5m)"))
}

/// A duration of a second or more: a shorter period would spin a timer or cut off every client.
fn parse_second_or_more(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s} is too short: give at least 1s"));
    }
    Ok(d)
}

/// `--public-url`: an http(s) URL with a host and nothing after the path, written without its
/// trailing `/`.
fn parse_public_url(s: &str) -> Result<String, String> {
    let url = url::Url::parse(s).map_err(|e| {
        format!(
            "{e}: give the daemon's address as browsers reach it, e.g. https://touchctl.example.com"
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(
            "give an http:// or https:// URL with a host, e.g. https://touchctl.example.com".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err("give the URL without a query, fragment or user name: the daemon adds the paths and the query".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}
