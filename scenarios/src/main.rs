//! `capif`: the invoker role step by step (`capif invoker ...`); the testbed launcher and the
//! scenario runner come next.

use std::path::PathBuf;
use std::process::ExitCode;

use aef_stub::psk::TlsProfile;
use anyhow::{Context, Result};
use capif_scenarios::invoker::{self, Profile};
use clap::{Parser, Subcommand};

/// The CAPIF testbed CLI.
#[derive(Parser)]
#[command(name = "capif", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Act as an API invoker.
    #[command(subcommand)]
    Invoker(InvokerCommand),
}

#[derive(clap::Args)]
struct ProfileArg {
    /// The invoker's profile directory (made by `onboard`).
    #[arg(long, env = "CAPIF_PROFILE")]
    profile: PathBuf,
}

#[derive(clap::Args)]
struct AefArgs {
    /// host:port of the AEF's security service (Authentication Initiation).
    #[arg(long)]
    aef_addr: String,
    /// CA certificate (PEM) of the AEF's domain.
    #[arg(long)]
    aef_ca: PathBuf,
    /// Name in the AEF's certificate.
    #[arg(long, default_value = "localhost")]
    aef_server_name: String,
}

#[derive(Subcommand)]
enum InvokerCommand {
    /// Onboard at the home CCF: make a key pair, store certificate, key (0600) and apiInvokerId.
    Onboard {
        #[command(flatten)]
        profile: ProfileArg,
        /// host:port of the CCF's onboarding listener.
        #[arg(long)]
        onboarding: String,
        /// host:port of the CCF's CAPIF-1e listener (stored in the profile).
        #[arg(long)]
        capif: String,
        /// The home domain's CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// The pre-provisioned onboarding credential.
        #[arg(long, env = "CAPIF_ONBOARDING_CREDENTIAL")]
        credential: String,
        /// Name in the CCF's certificate.
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
    /// CAPIF-1e: obtain PSK for an AEF on a new TLS session and derive the AEFPSK.
    Security {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        /// Ask authorization for this API only (default: every API of the AEF).
        #[arg(long)]
        api: Option<String>,
    },
    /// Authentication Initiation at the AEF.
    Auth {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        #[command(flatten)]
        target: AefArgs,
    },
    /// TLS-PSK handshake with the AEF and one demo API call.
    Call {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        /// host:port of the AEF's PSK endpoint (as `auth` printed).
        #[arg(long)]
        endpoint: String,
        /// The API to call.
        #[arg(long)]
        api: String,
        /// PSK TLS profile: tls13 or tls12.
        #[arg(long, default_value = "tls13")]
        tls: TlsProfile,
    },
    /// Print the PSK identity and the AEFPSK (hex) for an AEF: the invoker's own secret, for
    /// interop tests with other TLS stacks (e.g. `openssl s_client -psk_identity .. -psk ..`).
    Psk {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
    },
    /// The whole flow: security, auth, PSK handshake, API call.
    Run {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        #[command(flatten)]
        target: AefArgs,
        /// The API to call.
        #[arg(long)]
        api: String,
        /// PSK TLS profile: tls13 or tls12.
        #[arg(long, default_value = "tls13")]
        tls: TlsProfile,
    },
}

async fn run(cli: Cli) -> Result<()> {
    let Command::Invoker(cmd) = cli.command;
    match cmd {
        InvokerCommand::Onboard {
            profile,
            onboarding,
            capif,
            ca,
            credential,
            server_name,
        } => {
            let ca = std::fs::read_to_string(&ca).with_context(|| ca.display().to_string())?;
            let p = invoker::onboard(
                &onboarding,
                &capif,
                &ca,
                &server_name,
                &credential,
                &profile.profile,
            )
            .await?;
            println!(
                "onboarded api_invoker_id={} ccf_id={} profile={}",
                p.id(),
                p.file.ccf_id,
                p.dir.display()
            );
        }
        InvokerCommand::Security { profile, aef, api } => {
            let p = Profile::load(&profile.profile)?;
            let k = invoker::security(&p, &aef, api.as_deref()).await?;
            println!(
                "security method PSK for {aef}: key_id={} interface={} expires_at_ms={}",
                k.key_id, k.interface, k.expires_at_ms
            );
        }
        InvokerCommand::Auth {
            profile,
            aef,
            target,
        } => {
            let p = Profile::load(&profile.profile)?;
            let k = p.key(&aef)?;
            let ca = std::fs::read_to_string(&target.aef_ca)?;
            let r = invoker::auth(&p, &k, &target.aef_addr, &ca, &target.aef_server_name).await?;
            println!(
                "authenticated: tls_endpoint={} psk_identity={} remaining_validity_ms={}",
                r.tls_endpoint, r.psk_identity, r.remaining_validity_ms
            );
        }
        InvokerCommand::Call {
            profile,
            aef,
            endpoint,
            api,
            tls,
        } => {
            let p = Profile::load(&profile.profile)?;
            let r = invoker::call(&p, &p.key(&aef)?, &endpoint, &api, tls).await?;
            println!("{} answered {}: {}", r.aef_id, r.api_name, r.result);
        }
        InvokerCommand::Psk { profile, aef } => {
            let p = Profile::load(&profile.profile)?;
            let k = p.key(&aef)?;
            println!("{}", invoker::psk_identity(&p, &k)?);
            // The invoker asked for its own secret: printing it is this command's purpose.
            println!("{}", k.aef_psk_hex);
        }
        InvokerCommand::Run {
            profile,
            aef,
            target,
            api,
            tls,
        } => {
            let p = Profile::load(&profile.profile)?;
            let k = invoker::security(&p, &aef, None).await?;
            let ca = std::fs::read_to_string(&target.aef_ca)?;
            let a = invoker::auth(&p, &k, &target.aef_addr, &ca, &target.aef_server_name).await?;
            let r = invoker::call(&p, &k, &a.tls_endpoint, &api, tls).await?;
            println!(
                "{} answered {} for {} (key {}): {}",
                r.aef_id, r.api_name, r.api_invoker_id, r.key_id, r.result
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capif: {e:#}");
            ExitCode::FAILURE
        }
    }
}
