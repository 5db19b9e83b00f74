//! `touchctl sandbox`: loads the touchpoints' credentials, says where it listens and what it
//! serves, and runs the sandbox until Ctrl-C or SIGTERM.

use std::io::Write;

use anyhow::{Context, Result, bail};

use touchctl::load::{self, LoadError};
use touchctl::sandbox::{self, Accounts, Options};
use touchctl::term::escape;

use super::{FAILED, OK, count_files, secret_policy};
use crate::cli::{Global, SandboxArgs};

pub fn sandbox_cmd(g: &Global, args: &SandboxArgs) -> Result<u8> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {} is not a loopback address: the sandbox accepts anyone and knows your touchpoints' credentials. Listen on 127.0.0.1, or add --allow-remote on a network you trust",
            args.listen
        );
    }
    let desired = match load::load_dir(&g.dir) {
        Ok(d) => d,
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                println!("{d}");
            }
            eprintln!(
                "error: {} problem(s) in {} file(s); the sandbox did not start. Fix them (touchctl validate) and start it again.",
                diagnostics.len(),
                count_files(&diagnostics)
            );
            return Ok(FAILED);
        }
        Err(e) => return Err(e.into()),
    };
    let (accounts, notices) = Accounts::load(&desired, &secret_policy(g));
    drop(desired);
    for n in &notices {
        eprintln!("{}", escape(&n.to_string()));
    }
    let options = Options {
        token_ttl: args.token_ttl,
        ..Options::default()
    };
    let rt = super::daemon::runtime()?;
    rt.block_on(run(g, args, accounts, options))?;
    Ok(OK)
}

async fn run(g: &Global, args: &SandboxArgs, accounts: Accounts, options: Options) -> Result<()> {
    // Before the sandbox says it listens: a signal from then on stops it cleanly.
    let stop = touchctl::daemon::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: pick another address with --listen (port 0 picks a free one)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "touchctl sandbox: listening on {base}")?;
        for line in accounts.describe(&base) {
            writeln!(out, "{}", escape(&line))?;
        }
        out.flush()?;
    }
    if accounts.is_empty() {
        eprintln!(
            "warning: no touchpoint under {} is served: the sandbox answers every credential as unknown",
            g.dir.display()
        );
    }
    sandbox::serve(listener, accounts, options, stop)
        .await
        .context("the sandbox stopped serving")?;
    Ok(())
}
