//! `aef-stub`: a working AEF for testbeds.

use std::path::PathBuf;
use std::process::ExitCode;

use aef_stub::config::AefConfig;
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

/// An API exposing function (AEF) for CAPIF testbeds.
///
/// Serves Authentication Initiation (AefSecurity.CheckAuthentication; the key is fetched from its
/// CCF, across domains through the gateways) and revocation from its CCF on the security
/// listener, and a TLS-PSK endpoint (TLS 1.3 psk_dhe_ke by default) with a small demo API that
/// enforces the invoker's authorization information.
#[derive(Parser)]
#[command(name = "aef-stub", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "AEF_STUB_CONFIG")]
    config: PathBuf,
    /// Override `listen.security` (host:port; port 0 picks a free one).
    #[arg(long, env = "AEF_STUB_LISTEN_SECURITY")]
    listen_security: Option<String>,
    /// Override `listen.psk`.
    #[arg(long, env = "AEF_STUB_LISTEN_PSK")]
    listen_psk: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = "AEF_STUB_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

async fn run(cli: Cli) -> Result<()> {
    let mut cfg = AefConfig::load(&cli.config)?;
    if let Some(a) = cli.listen_security {
        cfg.listen.security = a;
    }
    if let Some(a) = cli.listen_psk {
        cfg.listen.psk = a;
    }
    let aef = aef_stub::server::start(cfg).await?;
    println!(
        "aef-stub ready aef_id={} security={} psk={}",
        aef.state.aef_id, aef.security_addr, aef.psk_addr
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    aef.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    match tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aef-stub: {e:#}");
            ExitCode::FAILURE
        }
    }
}
