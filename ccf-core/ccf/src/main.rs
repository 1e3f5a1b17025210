//! `ccf`: the CAPIF core function of one domain, plus two tools testbed users need: the AEFPSK
//! KDF on the command line (interop debugging) and certificate issuance from the domain CA.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use capif_ccf::config::{CcfConfig, DEMO_CONFIG};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::derive_aefpsk;
use ccf_core::pki::{DomainCa, write_private_file};
use ccf_core::process::{LogFormat, exit_code, init_logging, run_async, terminated};
use ccf_core::telemetry::{self, ServiceIdentity};
use clap::{Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

/// The CAPIF core function (CCF) of one operator domain.
///
/// Serves invoker onboarding (TLS with server authentication), CAPIF-1e (security method, AEFPSK
/// derivation), CAPIF-3 (security information for this domain's AEFs) and CAPIF-6 (answers to
/// partner domains through this domain's gateway), all with gRPC reflection and health so
/// grpcurl works out of the box.
#[derive(Parser)]
#[command(name = "ccf", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CCF_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CCF until Ctrl-C / SIGTERM. Prints one line "ccf ready ..." with the bound
    /// addresses on stdout once both listeners accept connections.
    Serve(ServeArgs),
    /// Key derivation tools.
    #[command(subcommand)]
    Kdf(KdfCommand),
    /// Domain PKI tools.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file (see ccf-core/ccf/demo/ccf.toml).
    #[arg(long, short, env = "CCF_CONFIG", required_unless_present = "demo")]
    config: Option<PathBuf>,
    /// Use the demo configuration built into the binary instead of a file.
    #[arg(long, conflicts_with = "config")]
    demo: bool,
    /// Override `ccf_id`.
    #[arg(long, env = "CCF_ID")]
    ccf_id: Option<String>,
    /// Override `state_dir`.
    #[arg(long, env = "CCF_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> Result<CcfConfig> {
        let mut cfg = match &self.config {
            Some(path) => CcfConfig::load(path)?,
            None => CcfConfig::parse(DEMO_CONFIG, "embedded demo config")?,
        };
        if let Some(id) = &self.ccf_id {
            cfg.ccf_id = id.clone();
        }
        if let Some(dir) = &self.state_dir {
            cfg.state_dir = dir.clone();
        }
        Ok(cfg)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Override `listen.onboarding` (host:port; port 0 picks a free one).
    #[arg(long, env = "CCF_LISTEN_ONBOARDING")]
    listen_onboarding: Option<String>,
    /// Override `listen.capif` (host:port; port 0 picks a free one).
    #[arg(long, env = "CCF_LISTEN_CAPIF")]
    listen_capif: Option<String>,
    /// Override `security.capif1e`: the domain's CAPIF-1e profile, tls13-exporter or
    /// tls12-annex-a (TS 33.122 A.1 as written, TLS 1.2; needs `listen.capif1e`).
    #[arg(long, env = "CCF_CAPIF1E")]
    capif1e: Option<ccf_core::kdf::Capif1eProfile>,
    /// Override `listen.capif1e`: the TLS 1.2 CAPIF-1e listener of tls12-annex-a (host:port).
    #[arg(long, env = "CCF_LISTEN_CAPIF1E")]
    listen_capif1e: Option<String>,
    /// Override `security.aef_psk_validity_secs`.
    #[arg(long, env = "CCF_AEF_PSK_VALIDITY_SECS")]
    aef_psk_validity_secs: Option<u64>,
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (overrides `metrics.listen`;
    /// ip:port, port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "CCF_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Export spans over OTLP/gRPC to this endpoint (`http://host:4317`); overrides
    /// `[telemetry] otlp_endpoint`. Unset in both: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Keep the state in this PostgreSQL database (`postgres://user:password@host:port/db`):
    /// overrides `store.url` and selects `store.backend = "postgres"`. Prefer the environment
    /// variable: a flag's value is visible to other users in the process list.
    #[arg(
        long,
        env = "CCF_STORE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    store_url: Option<String>,
}

#[derive(Subcommand)]
enum KdfCommand {
    /// Print AEFPSK = KDF(key, FC=0x7A, P0=interface, P1=session id) in hex (TS 33.122 A.1).
    Aefpsk {
        /// KDF key in hex: with tls12-annex-a the master secret (the third field of the key log's
        /// CLIENT_RANDOM line), with tls13-exporter the exporter value.
        #[arg(long)]
        key: String,
        /// P1 in hex: with tls12-annex-a the TLS session ID (`capif invoker security` prints it),
        /// with tls13-exporter the exporter value.
        #[arg(long)]
        session_id: String,
        /// P0: the canonical interface string, e.g. "aef1.operator-a.test:8443/weather".
        #[arg(long)]
        interface: String,
        /// Also print the key id on a second line.
        #[arg(long)]
        with_key_id: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Ccf,
    Gateway,
    Operator,
    Aef,
    Invoker,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Issue a certificate and key from the domain CA (generating the CA if the state directory
    /// has none). Writes <out>/<name>.pem, <out>/<name>.key (mode 0600) and <out>/ca.pem.
    Issue {
        #[command(flatten)]
        config: ConfigArgs,
        /// Role named in the certificate.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// AEF id or invoker id (roles aef and invoker).
        #[arg(long)]
        id: Option<String>,
        /// DNS names or IP addresses for the certificate (servers).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// File name stem (default: the role).
        #[arg(long)]
        name: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

async fn serve(args: ServeArgs, log_format: LogFormat) -> Result<()> {
    let mut cfg = args.config.load()?;
    let endpoint = args.otlp_endpoint.or(cfg.telemetry.otlp_endpoint.clone());
    let telemetry = telemetry::init(
        &ServiceIdentity::new(telemetry::CCF).in_domain(cfg.ccf_id.clone()),
        endpoint.as_deref(),
        log_format,
        "info",
    )?;
    if let Some(a) = args.listen_onboarding {
        cfg.listen.onboarding = a;
    }
    if let Some(a) = args.listen_capif {
        cfg.listen.capif = a;
    }
    if let Some(p) = args.capif1e {
        cfg.security.capif1e = p;
    }
    if let Some(a) = args.listen_capif1e {
        cfg.listen.capif1e = Some(a);
    }
    if let Some(v) = args.aef_psk_validity_secs {
        cfg.security.aef_psk_validity_secs = v;
    }
    if let Some(a) = args.metrics_listen {
        cfg.metrics.listen = Some(a);
    }
    if let Some(url) = args.store_url {
        cfg.store.backend = ccf_core::pg::StoreBackend::Postgres;
        cfg.store.url = Some(ccf_core::pg::DatabaseUrl::new(url));
    }
    let ca_path = cfg
        .pki
        .ca_cert
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("ca.pem"));
    let ccf = capif_ccf::server::start(cfg).await?;
    let metrics = ccf
        .metrics_addr
        .map(|a| format!(" metrics={a}"))
        .unwrap_or_default();
    println!(
        "ccf ready ccf_id={} onboarding={} capif={} capif1e={} capif1e_profile={} ca={}{metrics}",
        ccf.state.ccf_id,
        ccf.onboarding_addr,
        ccf.capif_addr,
        ccf.capif1e_addr,
        ccf.state.capif1e,
        ca_path.display()
    );
    let signal = terminated().await;
    tracing::info!(signal, "shutting down");
    ccf.shutdown().await;
    telemetry.shutdown();
    Ok(())
}

fn kdf_aefpsk(key: &str, session_id: &str, interface: &str, with_key_id: bool) -> Result<()> {
    let key = Zeroizing::new(hex::decode(key.trim()).context("--key is not hex")?);
    let sid = hex::decode(session_id.trim()).context("--session-id is not hex")?;
    let psk = derive_aefpsk(&key, &sid, interface)?;
    // The user asked for this key on purpose: printing it is this command's job.
    println!("{}", hex::encode(psk.expose()));
    if with_key_id {
        println!("{}", psk.key_id());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pki_issue(
    config: ConfigArgs,
    role: RoleArg,
    id: Option<String>,
    hosts: Vec<String>,
    out: PathBuf,
    name: Option<String>,
    days: i64,
) -> Result<()> {
    let cfg = config.load()?;
    let ccf_id = CcfId::new(cfg.ccf_id.clone()).context("ccf_id")?;
    let ca = DomainCa::load_or_generate(
        &ccf_id,
        &cfg.state_dir,
        cfg.pki.ca_cert.as_deref(),
        cfg.pki.ca_key.as_deref(),
    )?;
    let need_id = || id.clone().context("--id is required for this role");
    let role_v = match role {
        RoleArg::Ccf => Role::Ccf,
        RoleArg::Gateway => Role::Gateway,
        RoleArg::Operator => Role::Operator,
        RoleArg::Aef => Role::Aef(AefId::new(need_id()?)?),
        RoleArg::Invoker => Role::Invoker(ApiInvokerId::new(need_id()?)?),
    };
    let stem = name.unwrap_or_else(|| role_v.name().to_string());
    if stem.contains('/') || stem.is_empty() {
        bail!("--name must be a plain file name");
    }
    let cred = ca.issue_with_new_key(&PeerIdentity::new(ccf_id, role_v), &hosts, days)?;
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("{stem}.pem")), &cred.cert_pem)?;
    write_private_file(&out.join(format!("{stem}.key")), cred.key_pem.as_bytes())?;
    std::fs::write(out.join("ca.pem"), ca.cert_pem())?;
    println!("{}", out.join(format!("{stem}.pem")).display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Serving sets its logs up with spans once it knows its domain.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(cli.log_format, "info");
    }
    let result = match cli.command {
        Command::Serve(args) => return run_async("ccf", serve(args, cli.log_format)),
        Command::Kdf(KdfCommand::Aefpsk {
            key,
            session_id,
            interface,
            with_key_id,
        }) => kdf_aefpsk(&key, &session_id, &interface, with_key_id),
        Command::Pki(PkiCommand::Issue {
            config,
            role,
            id,
            hosts,
            out,
            name,
            days,
        }) => pki_issue(config, role, id, hosts, out, name, days),
    };
    exit_code("ccf", result)
}
