//! The `touchctl` binary: parses the command line, runs the command, maps the outcome to an exit code
//! (0 ok, 1 error, 2 changes present with `plan --detailed-exitcode`).

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

// Loading thousands of files allocates many small values on both cores; mimalloc keeps that fast.
// Its purge delay is set in `touchctl::allocator`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    touchctl::allocator::tune();
    let args = cli::hoist_leading_options(std::env::args_os());
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1, not clap's 2: 2 means "changes present" here.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // An error may quote a file, an endpoint or the daemon: escaped for the terminal.
            eprintln!("error: {}", touchctl::term::escape_text(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}
