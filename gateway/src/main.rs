//! `capif-gateway`: the interconnect federation gateway of one domain. SIGHUP reloads the
//! configuration file (`RunningGateway::reload`); SIGINT/SIGTERM stop it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use capif_gateway::config::GatewayConfig;
use ccf_core::process::{LogFormat, run_async, terminated};
use ccf_core::telemetry::{self, ServiceIdentity};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// The interconnect federation gateway of one CAPIF domain.
///
/// Serves CAPIF-6 to its own CCF (security information for invokers of partner domains, cached
/// for no longer than the keys are valid; revocation publishing) and to its operator
/// (GatewayAdmin: counters, partner state, purge), and CAPIF-6e to partner gateways, which it
/// finds with DNS SRV `_capif-6e._tcp.<ccf-id>` and trusts only per the federation config.
#[derive(Parser)]
#[command(name = "capif-gateway", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "CAPIF_GATEWAY_CONFIG")]
    config: PathBuf,
    /// Override `listen.capif6` (host:port; port 0 picks a free one).
    #[arg(long, env = "CAPIF_GATEWAY_LISTEN_CAPIF6")]
    listen_capif6: Option<String>,
    /// Override `listen.capif6e` (host:port; port 0 picks a free one).
    #[arg(long, env = "CAPIF_GATEWAY_LISTEN_CAPIF6E")]
    listen_capif6e: Option<String>,
    /// Override `dns.nameserver` (ip:port).
    #[arg(long, env = "CAPIF_GATEWAY_NAMESERVER")]
    nameserver: Option<String>,
    /// Override `state_dir` (fetch records and the revocation outbox).
    #[arg(long, env = "CAPIF_GATEWAY_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (overrides `metrics.listen`;
    /// ip:port, port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "CAPIF_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "CAPIF_GATEWAY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Export spans over OTLP/gRPC to this endpoint (`http://host:4317`); overrides
    /// `[telemetry] otlp_endpoint`. Unset in both: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Keep fetch records, the outbox and the seen notices in this PostgreSQL database
    /// (`postgres://user:password@host:port/db`), shared by the domain's gateway replicas:
    /// overrides `store.url` and selects `store.backend = "postgres"`. Prefer the environment
    /// variable: a flag's value is visible to other users in the process list.
    #[arg(
        long,
        env = "CAPIF_GATEWAY_STORE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    store_url: Option<String>,
}

async fn run(cli: Cli) -> Result<()> {
    // Read once for the log and span set-up (the domain names the spans); the gateway reads
    // the file again as it starts, and at every reload.
    let file = GatewayConfig::load(&cli.config)?;
    let endpoint = cli.otlp_endpoint.or(file.telemetry.otlp_endpoint);
    let telemetry = telemetry::init(
        &ServiceIdentity::new(telemetry::GATEWAY).in_domain(file.ccf_id),
        endpoint.as_deref(),
        cli.log_format,
        "info",
    )?;
    // The overrides apply to every read of the file, so a reload does not undo them.
    let (l6, l6e, ns, sd, ml) = (
        cli.listen_capif6,
        cli.listen_capif6e,
        cli.nameserver,
        cli.state_dir,
        cli.metrics_listen,
    );
    let store_url = cli.store_url.map(ccf_core::pg::DatabaseUrl::new);
    let adjust = move |cfg: &mut GatewayConfig| {
        if let Some(a) = &l6 {
            cfg.listen.capif6 = a.clone();
        }
        if let Some(a) = &l6e {
            cfg.listen.capif6e = a.clone();
        }
        if let Some(n) = &ns {
            cfg.dns.nameserver = Some(n.clone());
        }
        if let Some(d) = &sd {
            cfg.state_dir = Some(d.clone());
        }
        if let Some(a) = ml {
            cfg.metrics.listen = Some(a);
        }
        if let Some(url) = &store_url {
            cfg.store.backend = ccf_core::pg::StoreBackend::Postgres;
            cfg.store.url = Some(url.clone());
        }
    };
    let gw = capif_gateway::server::start_from_file(cli.config, Some(Arc::new(adjust))).await?;
    // Before the ready line: a SIGHUP sent as soon as the gateway says it is ready must reload
    // it, not end it (SIGHUP's default action).
    let mut hup = signal(SignalKind::hangup())?;
    let metrics = gw
        .metrics_addr
        .map(|a| format!(" metrics={a}"))
        .unwrap_or_default();
    println!(
        "capif-gateway ready ccf_id={} capif6={} capif6e={}{metrics}",
        gw.state.ccf_id, gw.capif6_addr, gw.capif6e_addr
    );
    let stop = terminated();
    tokio::pin!(stop);
    let signal = loop {
        tokio::select! {
            s = &mut stop => break s,
            _ = hup.recv() => {
                // A refusal is logged and counted by the reload itself; the gateway runs on.
                let _ = gw.reload().await;
            }
        }
    };
    tracing::info!(signal, "shutting down");
    gw.shutdown().await;
    telemetry.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_async("capif-gateway", run(cli))
}
