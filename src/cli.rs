//! What the user typed: the command line, parsed by clap, with no I/O.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Manage marketing touchpoints (触点) as code: validate the TOML files, plan against the live
/// registry, apply.
#[derive(Debug, Parser)]
#[command(name = "touchctl", version, about, long_about = None)]
#[command(
    after_help = "Exit codes: 0 success; 1 error (or invalid files); 2 changes present (plan --detailed-exitcode).\n\
Typical flow: touchctl validate && touchctl plan && touchctl apply"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Folder holding the touchpoint files (searched recursively for *.toml).
    #[arg(
        long,
        global = true,
        default_value = "touchpoints",
        env = "TOUCHCTL_DIR"
    )]
    pub dir: PathBuf,
    /// The live registry: a SQLite state file, created (mode 0600) if missing.
    #[arg(
        long,
        global = true,
        default_value = ".touchctl/state.db",
        env = "TOUCHCTL_STATE"
    )]
    pub state: PathBuf,
    /// More detail (e.g. list unchanged touchpoints).
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    /// Only errors and the requested output.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Colour in terminal output.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
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
    Validate {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
        format: ValidateFormat,
    },
    /// Write the JSON Schema of touchpoint files, generated from touchctl's types.
    Schema {
        /// Do not write; exit 1 if the file differs from what this touchctl generates.
        #[arg(long)]
        check: bool,
        /// Where the schema file lives.
        #[arg(long, default_value = touchctl::schema::DEFAULT_PATH)]
        out: PathBuf,
    },
    /// Show what apply would change in the registry to match the files.
    Plan {
        /// Output format.
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Also save the plan (JSON) to this file, for `touchctl apply FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Exit 0 when there are no changes, 1 on error, 2 when there are changes.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Compare the files at this git revision (branch, tag, commit) with the work tree instead
        /// of the registry: the pull-request view. Reads git objects, no checkout, no registry;
        /// secrets are compared by reference only.
        #[arg(long, value_name = "REV", conflicts_with = "out")]
        base: Option<String>,
    },
    /// Make the registry match the files: a saved plan exactly, or plan, confirm and apply.
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
    },
    /// Write the TOML file of a live touchpoint that has no file yet, to bring it under code.
    ///
    /// The file gets the `#:schema` line, secret references (never values), the canonical field
    /// order and no defaults, so that `touchctl plan` then shows no change for it.
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
    },
    /// Serve the dispatch API, keep the registry in step with the files, and deliver.
    ///
    /// Accepted triggers are stored in the queue file before the API answers 202; batches are sent
    /// to the live touchpoints with retries, and survive restarts. The API token comes from
    /// TOUCHCTL_API_TOKEN or --api-token-file. Stop with SIGTERM or Ctrl-C: open requests and
    /// in-flight deliveries finish first.
    Daemon(DaemonArgs),
    /// Send a campaign trigger to a running daemon (POST /v1/dispatch).
    ///
    /// Users come from a file (or `-` for standard input): a JSON array of
    /// {"user_id", "attributes": {...}} or one such object per line. They are streamed as NDJSON.
    Dispatch(DispatchArgs),
    /// The delivery log: list batches, show one with its attempts, replay dead-lettered ones.
    Deliveries {
        #[command(subcommand)]
        command: DeliveriesCommand,
        /// The queue file (default: queue.db beside --state).
        #[arg(long, global = true, value_name = "PATH")]
        queue: Option<PathBuf>,
    },
    /// Remove the registry lock left by a writer that is gone for good.
    ///
    /// A lock held by a process that no longer runs on this host is recovered automatically; this
    /// is for a holder on another machine. The lock id is in the "registry is locked" message.
    ForceUnlock {
        /// The lock id to remove.
        lock_id: String,
    },
}

/// `touchctl daemon` options.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:8640", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Reconcile the registry with the files: on every change (debounced) and every --interval.
    /// A tree with problems changes nothing; the problems show at /v1/status and in the log.
    #[arg(long)]
    pub watch: bool,
    /// Where --watch reads the files: `worktree` (as on disk) or `git:REF` (only what is committed
    /// at REF, e.g. git:main).
    #[arg(long, default_value = "worktree", value_name = "SOURCE")]
    pub source: String,
    /// How often to reconcile and re-read secrets even without a file event (at least 1s).
    #[arg(long, default_value = "60s", value_parser = parse_second_or_more, value_name = "DURATION")]
    pub interval: std::time::Duration,
    /// Deletes one reconcile may make at most (more refuses the whole reconcile).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_deletes: usize,
    /// The queue file (default: queue.db beside --state).
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
    /// Most recipients the queue holds before new triggers get 503 with Retry-After.
    #[arg(long, default_value_t = 10_000_000, value_name = "N")]
    pub max_queued: u64,
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
}

/// `touchctl deliveries` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List batches, newest first.
    List {
        /// Only batches in this state.
        #[arg(long, value_parser = ["pending", "delivered", "failed", "dead"], value_name = "STATE")]
        status: Option<String>,
        /// Only batches of this touchpoint.
        #[arg(long)]
        touchpoint: Option<String>,
        /// Only batches of this dispatch.
        #[arg(long)]
        dispatch: Option<String>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
        format: ValidateFormat,
    },
    /// Show one batch: its state, every attempt (status, latency, generation, error) and the
    /// recipients that failed for good.
    Show {
        /// The batch id (as listed; the `webhook-id` the endpoint saw).
        batch: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
        format: ValidateFormat,
    },
    /// Put dead-lettered batches back in the queue, due now, with a fresh attempt budget. A running
    /// daemon picks them up within a second.
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
