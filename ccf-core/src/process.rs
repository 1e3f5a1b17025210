//! What every binary of the workspace does the same way around its own work: logs on stderr
//! (text or JSON, `RUST_LOG` as the filter, colours only on a terminal, so log files written by
//! a testbed hold no ANSI codes; a serving binary installs them with spans through
//! [`crate::telemetry::init`]), waiting for SIGINT or SIGTERM, and running an async main to an
//! exit code with the error chain on stderr.

use std::future::Future;
use std::process::ExitCode;

/// Log format on stderr (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs a log subscriber without spans (`RUST_LOG` if set, else `default_filter`), for
/// commands that serve nothing; servers use [`crate::telemetry::init`].
pub fn init_logging(format: LogFormat, default_filter: &str) {
    crate::telemetry::init_logs_only(format, default_filter);
}

/// Waits for SIGINT or SIGTERM; says which.
pub async fn terminated() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Runs `main` on a multi-threaded runtime; failure prints `<name>: <error chain>` on stderr.
pub fn run_async<F>(name: &str, main: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    exit_code(
        name,
        tokio::runtime::Runtime::new()
            .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
            .and_then(|rt| rt.block_on(main)),
    )
}

/// The exit code of `result`, printing `<name>: <error chain>` on failure.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
