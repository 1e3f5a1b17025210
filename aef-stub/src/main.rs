//! `aef-stub`: a working AEF for testbeds.

use std::path::PathBuf;
use std::process::ExitCode;

use aef_stub::config::AefConfig;
use anyhow::Result;
use ccf_core::process::{LogFormat, run_async, terminated};
use ccf_core::telemetry::{self, ServiceIdentity};
use clap::Parser;

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
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (overrides `metrics.listen`;
    /// ip:port, port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "AEF_STUB_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = "AEF_STUB_LOG_FORMAT")]
    log_format: LogFormat,
    /// Export spans over OTLP/gRPC to this endpoint (`http://host:4317`); overrides
    /// `[telemetry] otlp_endpoint`. Unset in both: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Exit at once with success: this build carries the test-only faults (feature
    /// `test-faults`). The flag does not exist in other builds, so they refuse it.
    #[cfg(feature = "test-faults")]
    #[arg(long, hide = true)]
    has_test_faults: bool,
}

async fn run(cli: Cli) -> Result<()> {
    let mut cfg = AefConfig::load(&cli.config)?;
    let endpoint = cli.otlp_endpoint.or(cfg.telemetry.otlp_endpoint.clone());
    let telemetry = telemetry::init(
        &ServiceIdentity::new(telemetry::AEF)
            .in_domain(cfg.ccf_id.clone())
            .instance(cfg.aef_id.clone()),
        endpoint.as_deref(),
        cli.log_format,
        "info",
    )?;
    if let Some(a) = cli.listen_security {
        cfg.listen.security = a;
    }
    if let Some(a) = cli.listen_psk {
        cfg.listen.psk = a;
    }
    if let Some(a) = cli.metrics_listen {
        cfg.metrics.listen = Some(a);
    }
    let aef = aef_stub::server::start(cfg).await?;
    let metrics = aef
        .metrics_addr
        .map(|a| format!(" metrics={a}"))
        .unwrap_or_default();
    println!(
        "aef-stub ready aef_id={} security={} psk={}{metrics}",
        aef.state.aef_id, aef.security_addr, aef.psk_addr
    );
    let signal = terminated().await;
    tracing::info!(signal, "shutting down");
    aef.shutdown().await;
    telemetry.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "test-faults")]
    if cli.has_test_faults {
        println!("test-faults");
        return ExitCode::SUCCESS;
    }
    run_async("aef-stub", run(cli))
}
