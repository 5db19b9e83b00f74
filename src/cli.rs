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
    /// Remove the registry lock left by a writer that is gone for good.
    ///
    /// A lock held by a process that no longer runs on this host is recovered automatically; this
    /// is for a holder on another machine. The lock id is in the "registry is locked" message.
    ForceUnlock {
        /// The lock id to remove.
        lock_id: String,
    },
}
