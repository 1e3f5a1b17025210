//! `capif`: the testbed launcher (`capif testbed up|down`), the scenario runner
//! (`capif scenario run|check`) and the invoker role step by step (`capif invoker ...`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use capif_2e::psk::TlsProfile;
use capif_proto::v1::SecurityMethod;
use capif_scenarios::invoker::{self, Profile};
use capif_scenarios::runner::{Runner, table};
use capif_scenarios::scenario::Scenario;
use capif_scenarios::testbed::{ProcRecord, Testbed, confirm_own, proc_record};
use ccf_core::kdf::Capif1eProfile;
use ccf_core::process::LogFormat;
use clap::{Parser, Subcommand};

/// The CAPIF testbed CLI.
#[derive(Parser)]
#[command(name = "capif", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CAPIF_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Export spans over OTLP/gRPC to this endpoint (`http://host:4317`); a testbed this
    /// command starts passes it to every component. Unset: nothing is exported.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files.
    #[command(subcommand)]
    Scenario(ScenarioCommand),
    /// Bring a testbed up for hands-on work, or down.
    #[command(subcommand)]
    Testbed(TestbedCommand),
    /// Act as an API invoker.
    #[command(subcommand)]
    Invoker(InvokerCommand),
    /// Measure the gateway against a bare tonic floor in the same run (docs/BENCHMARKS.md).
    Bench {
        /// A short run that only shows the benchmark works (CI).
        #[arg(long)]
        smoke: bool,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run directory. Default: run/bench-<time>.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Where the ccf, capif-gateway and aef-stub binaries are. Default: beside this binary.
        #[arg(long, env = "CAPIF_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Also write the latency CDF plots (SVG) to this directory, e.g. docs/bench/. They
        /// always go to the run directory.
        #[arg(long)]
        plots: Option<PathBuf>,
        /// Run one case alone: `i` (replicas and the PostgreSQL store, three testbeds of its
        /// own). Without it every case runs, (i) last.
        #[arg(long, value_parser = ["i"])]
        only: Option<String>,
    },
    /// Steady load on a 3-domain testbed while sampling every component's RSS, fds and threads;
    /// fails when memory or fds grow beyond the bounds once warm (docs/SCENARIOS.md).
    Soak(SoakArgs),
    /// Steady load on a 3-domain testbed while faults are injected on a seeded schedule; an
    /// invariant checker counts violations; exit 1 on any (docs/SCENARIOS.md).
    Chaos(ChaosArgs),
    /// One bare hop of the benchmark floor (used by `capif bench`).
    #[command(hide = true)]
    BenchFloor {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        next: Option<String>,
    },
    /// One bare partner answerer of the benchmark's growth case (used by `capif bench`).
    #[command(hide = true)]
    BenchPartner {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        client_ca: PathBuf,
        #[arg(long)]
        listen: String,
    },
}

#[derive(clap::Args)]
struct SoakArgs {
    /// How long the load runs: seconds, or 30s, 10m, 1h.
    #[arg(long, default_value = "10m", value_parser = capif_scenarios::load::parse_duration)]
    duration: std::time::Duration,
    /// A short run for CI: 30 s (overrides --duration).
    #[arg(long)]
    smoke: bool,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Share of the run before samples count as warm, percent.
    #[arg(long, default_value_t = 20)]
    warmup_pct: u32,
    /// Flows at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Invokers per domain.
    #[arg(long, default_value_t = 4)]
    invokers: u32,
    /// Fail when a component's RSS grows once warm by more than this many MiB...
    #[arg(long, default_value_t = 20.0)]
    max_rss_growth_mib: f64,
    /// ...and more than this share of its warm RSS, percent (the larger bound applies).
    #[arg(long, default_value_t = 25.0)]
    max_rss_growth_pct: f64,
    /// Fail when a component's open fds grow once warm by more than this.
    #[arg(long, default_value_t = 16)]
    max_fd_growth: i64,
    /// Fail when more than this share of flows fail, percent.
    #[arg(long, default_value_t = 1.0)]
    max_error_pct: f64,
    /// Seed of the load's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run directory. Default: run/soak-<time>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Where the ccf, capif-gateway and aef-stub binaries are. Default: beside this binary.
    #[arg(long, env = "CAPIF_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ChaosArgs {
    /// How long the load runs: seconds, or 30s, 10m, 1h.
    #[arg(long, default_value = "5m", value_parser = capif_scenarios::load::parse_duration)]
    duration: std::time::Duration,
    /// A short run for CI: 60 s, every fault kind once (overrides --duration).
    #[arg(long)]
    smoke: bool,
    /// Seed of the schedule and the load (default: a random one, printed to replay the run).
    #[arg(long)]
    seed: Option<u64>,
    /// Flows at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Invokers per domain.
    #[arg(long, default_value_t = 4)]
    invokers: u32,
    /// AEFPSK validity of the third domain, seconds (its keys expire during the run).
    #[arg(long, default_value_t = 8)]
    short_validity_secs: u64,
    /// How long a partner gateway stays stopped, seconds.
    #[arg(long, default_value_t = 4)]
    outage_secs: u64,
    /// Time between faults in a full run, seconds.
    #[arg(long, default_value_t = 10)]
    fault_every_secs: u64,
    /// A flow's deadline, seconds.
    #[arg(long, default_value_t = 20)]
    flow_deadline_secs: u64,
    /// How long after its acknowledgement a revoked or offboarded invoker may still be served, ms.
    #[arg(long, default_value_t = 2000)]
    revocation_grace_ms: u64,
    /// Test only: inject a fault the checker must catch (`ignore-revocations`; needs an aef-stub
    /// built with the `test-faults` feature, as `cargo test` builds it).
    #[arg(long = "break", value_parser = clap::value_parser!(capif_scenarios::chaos::Breakage))]
    breakage: Option<capif_scenarios::chaos::Breakage>,
    /// Run directory. Default: run/chaos-<time>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Where the ccf, capif-gateway and aef-stub binaries are. Default: beside this binary.
    #[arg(long, env = "CAPIF_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The scenario file (see docs/SCENARIOS.md).
    file: PathBuf,
    /// Run directory (configs, certificates, logs, report). Default: run/<scenario>-<time>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Where the ccf, capif-gateway and aef-stub binaries are. Default: beside this binary.
    #[arg(long, env = "CAPIF_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ScenarioRunArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Do not write report.html: no span receiver, and no OTLP endpoint for the components.
    #[arg(long)]
    no_report: bool,
}

#[derive(Subcommand)]
enum ScenarioCommand {
    /// Bring the testbed up, run the steps, print the table, write report.json and report.html
    /// (the steps and a sequence diagram of each cross-domain step, from the components'
    /// spans), stop everything. Exits non-zero when an expectation fails.
    Run(ScenarioRunArgs),
    /// Parse and validate a scenario file without starting anything.
    Check {
        /// The scenario file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TestbedCommand {
    /// Bring a scenario's testbed up (its steps are not run), print addresses and grpcurl
    /// commands, and keep it running until Ctrl-C.
    Up(RunArgs),
    /// Stop a testbed started with `up` in another shell or in the background.
    Down {
        /// The testbed's run directory.
        #[arg(long)]
        run_dir: PathBuf,
    },
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
        /// The home domain's CAPIF-1e profile (stored in the profile): tls13-exporter, or
        /// tls12-annex-a (TS 33.122 A.1 as written; --capif names the CCF's TLS 1.2 listener).
        #[arg(long, default_value = "tls13-exporter")]
        capif1e: Capif1eProfile,
    },
    /// CAPIF-1e: obtain a security method for an AEF. With PSK (the default), on a new TLS
    /// session, deriving the AEFPSK; prints the session's P1 (the TLS session ID with
    /// tls12-annex-a) and P0, so the key can be recomputed from an SSLKEYLOGFILE.
    Security {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        /// Ask authorization for this API only (default: every API of the AEF).
        #[arg(long)]
        api: Option<String>,
        /// Security method: psk, pki or oauth.
        #[arg(long, default_value = "psk", value_parser = invoker::parse_method)]
        method: SecurityMethod,
    },
    /// Method 3: obtain an access token from the home CCF and print it (the invoker's own
    /// credential, for calls with other tools).
    Token {
        #[command(flatten)]
        profile: ProfileArg,
        /// Scope, `3gpp#<aefId>:<apiName>[,<apiName>][;<aefId>:...]` (default: everything
        /// negotiated with method OAUTH).
        #[arg(long, default_value = "")]
        scope: String,
    },
    /// Authentication Initiation at the AEF.
    Auth {
        #[command(flatten)]
        profile: ProfileArg,
        /// The AEF.
        #[arg(long)]
        aef: String,
        /// The AEF's domain (the CCF id that owns it): the AEF's certificate must name
        /// capif://<aef-domain>/aef/<aef>. (`run` learns it from the home CCF's answer.)
        #[arg(long)]
        aef_domain: String,
        #[command(flatten)]
        target: AefArgs,
        /// Security method: psk, pki or oauth.
        #[arg(long, default_value = "psk", value_parser = invoker::parse_method)]
        method: SecurityMethod,
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
    /// The whole flow with one method: security method (and, for oauth, a token), Authentication
    /// Initiation, handshake (TLS-PSK, mutual TLS with the invoker's certificate, or TLS with a
    /// bearer token), API call.
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
        /// Security method: psk, pki or oauth.
        #[arg(long, default_value = "psk", value_parser = invoker::parse_method)]
        method: SecurityMethod,
        /// PSK TLS profile: tls13 or tls12.
        #[arg(long, default_value = "tls13")]
        tls: TlsProfile,
    },
}

fn run_dir(args: &RunArgs, s: &capif_scenarios::scenario::Scenario) -> PathBuf {
    args.run_dir.clone().unwrap_or_else(|| {
        let slug: String = s
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        PathBuf::from("run").join(format!(
            "{}-{}",
            slug.trim_matches('-'),
            ccf_core::clock::now_ms()
        ))
    })
}

use ccf_core::process::terminated as interrupted;

async fn scenario_run(
    args: ScenarioRunArgs,
    otlp_endpoint: Option<String>,
    receiver: Option<capif_scenarios::otlp::OtlpReceiver>,
) -> Result<bool> {
    let args = args.run;
    let s = Scenario::load(&args.file)?;
    let dir = run_dir(&args, &s);
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => capif_scenarios::testbed::default_bin_dir()?,
    };
    eprintln!(
        "scenario {:?}: {} domains, {} steps; run directory {}",
        s.name,
        s.domains.len(),
        s.steps.len(),
        dir.display()
    );
    let mut tb = tokio::select! {
        tb = Testbed::up_with(&s, &dir, &bin, false, otlp_endpoint) => tb?,
        sig = interrupted() => anyhow::bail!("{sig} while starting the testbed; everything started was stopped"),
    };
    let total = s.steps.len();
    let report = {
        let mut runner = Runner::new(&s, &mut tb);
        let run = runner.run(|i, step| {
            eprint!(
                "\rstep {}/{total}: {:<60}",
                i + 1,
                format!(
                    "{:?} {}",
                    step.action,
                    step.note.clone().unwrap_or_default()
                )
            );
        });
        tokio::select! {
            r = run => Some(r),
            sig = interrupted() => { eprintln!("\n{sig}: stopping the testbed"); None }
        }
    };
    eprint!("\r{:80}\r", "");
    // This process's own spans (the steps' roots, the invoker client's calls) go out first;
    // blocking: it waits for the batch exporter's export.
    let _ = tokio::task::spawn_blocking(|| {
        if let Some(t) = TELEMETRY.lock().ok().as_ref().and_then(|t| t.as_ref()) {
            t.flush();
        }
    })
    .await;
    // Components flush their last spans as they stop.
    tb.down().await;
    let Some(report) = report else {
        anyhow::bail!(
            "interrupted; all components stopped, run directory {}",
            dir.display()
        );
    };
    print!("{}", table(&report));
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", path.display());
    if let Some(r) = receiver {
        r.settle(
            std::time::Duration::from_millis(300),
            std::time::Duration::from_secs(3),
        )
        .await;
        let html = capif_scenarios::report::render(&report, &r.spans(), r.dropped());
        let path = dir.join("report.html");
        std::fs::write(&path, html).with_context(|| path.display().to_string())?;
        println!("report: {}", path.display());
    }
    Ok(report.passed)
}

async fn testbed_up(args: RunArgs, otlp_endpoint: Option<String>) -> Result<()> {
    let s = Scenario::load(&args.file)?;
    let dir = run_dir(&args, &s);
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => capif_scenarios::testbed::default_bin_dir()?,
    };
    let mut tb = Testbed::up_with(&s, &dir, &bin, false, otlp_endpoint).await?;
    let mut pids = tb.pids();
    pids.insert("launcher".into(), std::process::id());
    // With each pid its start time: `testbed down` signals only processes it can confirm.
    let records: std::collections::BTreeMap<String, ProcRecord> = pids
        .into_iter()
        .filter_map(|(k, pid)| Some((k, proc_record(pid)?)))
        .collect();
    std::fs::write(
        dir.join("testbed.json"),
        serde_json::to_string_pretty(&records)?,
    )?;
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    println!(
        "testbed {:?} is up; run directory {}",
        s.name,
        dir.display()
    );
    println!("{}", tb.describe(&grpcurl));
    println!(
        "Ctrl-C (or `capif testbed down --run-dir {}`) stops it.",
        dir.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let sig = interrupted().await;
    eprintln!("{sig}: stopping the testbed");
    tb.down().await;
    let _ = std::fs::remove_file(dir.join("testbed.json"));
    Ok(())
}

fn testbed_down(run_dir: &std::path::Path) -> Result<()> {
    let path = run_dir.join("testbed.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running testbed in {} ({})",
            run_dir.display(),
            path.display()
        )
    })?;
    let pids: std::collections::BTreeMap<String, ProcRecord> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a testbed record", path.display()))?;
    // The launcher stops its components itself on SIGTERM; the rest is a fallback.
    let order = pids
        .get_key_value("launcher")
        .into_iter()
        .chain(pids.iter().filter(|(k, _)| *k != "launcher"));
    for (name, rec) in order {
        if let Err(why) = confirm_own(rec) {
            println!("{name}: not signalled ({why})");
            continue;
        }
        // SAFETY: a plain signal to a pid just confirmed to be the recorded process (> 1).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(rec.pid as libc::pid_t, libc::SIGTERM);
        }
    }
    println!("testbed in {} told to stop", run_dir.display());
    Ok(())
}

/// The process's span pipeline, flushed on every way out (`failed` included).
static TELEMETRY: std::sync::Mutex<Option<ccf_core::telemetry::TelemetryGuard>> =
    std::sync::Mutex::new(None);

/// Exits with status 1 (an expectation or a bound failed), after flushing spans.
fn failed() -> ! {
    if let Some(t) = TELEMETRY.lock().ok().and_then(|mut t| t.take()) {
        t.shutdown();
    }
    std::process::exit(1);
}

async fn run(cli: Cli) -> Result<()> {
    // `scenario run` draws report.html from the spans of the run: unless they are sent elsewhere
    // (`--otlp-endpoint`), its own receiver takes them, this process's included, so it starts
    // before the process's span pipeline does.
    let receiver = match &cli.command {
        Command::Scenario(ScenarioCommand::Run(a))
            if !a.no_report && cli.otlp_endpoint.is_none() =>
        {
            use capif_scenarios::otlp::{OtlpReceiver, ReceiverLimits};
            Some(OtlpReceiver::start(ReceiverLimits::default()).await?)
        }
        _ => None,
    };
    let otlp_endpoint = cli
        .otlp_endpoint
        .clone()
        .or_else(|| receiver.as_ref().map(|r| r.endpoint()));
    let telemetry = ccf_core::telemetry::init(
        &ccf_core::telemetry::ServiceIdentity::new(ccf_core::telemetry::INVOKER),
        otlp_endpoint.as_deref(),
        cli.log_format,
        "warn",
    )?;
    if let Ok(mut t) = TELEMETRY.lock() {
        *t = Some(telemetry);
    }
    let r = run_command(cli, otlp_endpoint, receiver).await;
    if let Some(t) = TELEMETRY.lock().ok().and_then(|mut t| t.take()) {
        t.shutdown();
    }
    r
}

async fn run_command(
    cli: Cli,
    otlp: Option<String>,
    receiver: Option<capif_scenarios::otlp::OtlpReceiver>,
) -> Result<()> {
    match cli.command {
        Command::Scenario(ScenarioCommand::Run(args)) => {
            if !scenario_run(args, otlp, receiver).await? {
                failed();
            }
            Ok(())
        }
        Command::Scenario(ScenarioCommand::Check { file }) => scenario_check(&file),
        Command::Testbed(TestbedCommand::Up(args)) => testbed_up(args, otlp).await,
        Command::Testbed(TestbedCommand::Down { run_dir }) => testbed_down(&run_dir),
        // One trace per invoker command: the invoker is where the flow starts.
        Command::Invoker(cmd) => {
            use tracing::Instrument as _;
            invoker_command(cmd)
                .instrument(tracing::info_span!(parent: None, "capif.invoker.command"))
                .await
        }
        Command::Bench {
            smoke,
            out,
            run_dir,
            bin_dir,
            plots,
            only,
        } => bench(smoke, out, run_dir, bin_dir, plots, only.is_some()).await,
        Command::Chaos(args) => {
            if !chaos(args).await? {
                failed();
            }
            Ok(())
        }
        Command::Soak(args) => {
            if !soak(args).await? {
                failed();
            }
            Ok(())
        }
        Command::BenchFloor {
            ca,
            cert,
            key,
            listen,
            next,
        } => capif_scenarios::bench::serve_floor(&ca, &cert, &key, &listen, next.as_deref()).await,
        Command::BenchPartner {
            cert,
            key,
            client_ca,
            listen,
        } => capif_scenarios::bench::serve_partner(&cert, &key, &client_ca, &listen).await,
    }
}

/// `capif scenario check`: parse and validate, start nothing.
fn scenario_check(file: &Path) -> Result<()> {
    let s = Scenario::load(file)?;
    println!(
        "{}: ok ({} domains, {} invoker entries, {} steps)",
        file.display(),
        s.domains.len(),
        s.invokers.len(),
        s.steps.len()
    );
    Ok(())
}

/// `capif bench`: the full run or the smoke run, stopped cleanly on a signal.
async fn bench(
    smoke: bool,
    out: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    plots: Option<PathBuf>,
    only_i: bool,
) -> Result<()> {
    let mut opts = if smoke {
        capif_scenarios::bench::BenchOpts::smoke()
    } else {
        capif_scenarios::bench::BenchOpts::full()
    };
    opts.plots = plots;
    opts.only_i = only_i;
    let dir = run_dir.unwrap_or_else(|| {
        PathBuf::from("run").join(format!("bench-{}", ccf_core::clock::now_ms()))
    });
    let bin = match bin_dir {
        Some(b) => b,
        None => capif_scenarios::testbed::default_bin_dir()?,
    };
    let me = std::env::current_exe()?;
    let report = tokio::select! {
        r = capif_scenarios::bench::run(&opts, &dir, &bin, &me) => r?,
        sig = interrupted() => anyhow::bail!("{sig}: benchmark stopped"),
    };
    if let Some(out) = out {
        std::fs::write(&out, &report)?;
        println!("report written to {}", out.display());
    }
    Ok(())
}

/// `capif chaos`: the run, its table and `chaos.json`; false on any violation.
async fn chaos(a: ChaosArgs) -> Result<bool> {
    let seed = a.seed.unwrap_or_else(rand::random);
    let duration = if a.smoke {
        std::time::Duration::from_secs(60)
    } else {
        a.duration
    };
    let mut opts = capif_scenarios::chaos::ChaosOpts::new(duration, seed);
    opts.smoke = a.smoke;
    opts.concurrency = a.concurrency;
    opts.invokers = a.invokers;
    opts.short_validity_secs = a.short_validity_secs.max(1);
    opts.outage_secs = a.outage_secs;
    opts.fault_every_secs = a.fault_every_secs.max(1);
    opts.flow_deadline = std::time::Duration::from_secs(a.flow_deadline_secs.max(1));
    opts.revocation_grace = std::time::Duration::from_millis(a.revocation_grace_ms);
    opts.breakage = a.breakage;
    eprintln!(
        "chaos: seed {seed} (replay with --seed {seed}{})",
        if a.smoke { " --smoke" } else { "" }
    );
    let dir = a.run_dir.unwrap_or_else(|| {
        PathBuf::from("run").join(format!("chaos-{}", ccf_core::clock::now_ms()))
    });
    let bin = match a.bin_dir {
        Some(b) => b,
        None => capif_scenarios::testbed::default_bin_dir()?,
    };
    let report = tokio::select! {
        r = capif_scenarios::chaos::run(&opts, &dir, &bin) => r?,
        sig = interrupted() => anyhow::bail!("{sig}: chaos stopped"),
    };
    print!("{}", capif_scenarios::chaos::table(&report));
    println!("report written to {}", dir.join("chaos.json").display());
    Ok(report.passed)
}

/// `capif soak`: the run, its table and `soak.json`; false when a bound did not hold.
async fn soak(a: SoakArgs) -> Result<bool> {
    let opts = capif_scenarios::soak::SoakOpts {
        duration: if a.smoke {
            std::time::Duration::from_secs(30)
        } else {
            a.duration
        },
        sample_every: std::time::Duration::from_secs(a.sample_secs.max(1)),
        warmup_pct: a.warmup_pct.min(90),
        concurrency: a.concurrency,
        invokers: a.invokers,
        max_rss_growth_mib: a.max_rss_growth_mib,
        max_rss_growth_pct: a.max_rss_growth_pct,
        max_fd_growth: a.max_fd_growth,
        max_error_pct: a.max_error_pct,
        seed: a.seed,
    };
    let dir = a.run_dir.unwrap_or_else(|| {
        PathBuf::from("run").join(format!("soak-{}", ccf_core::clock::now_ms()))
    });
    let bin = match a.bin_dir {
        Some(b) => b,
        None => capif_scenarios::testbed::default_bin_dir()?,
    };
    let report = tokio::select! {
        r = capif_scenarios::soak::run(&opts, &dir, &bin) => r?,
        sig = interrupted() => anyhow::bail!("{sig}: soak stopped"),
    };
    print!("{}", capif_scenarios::soak::table(&report));
    println!("report written to {}", dir.join("soak.json").display());
    Ok(report.passed)
}

/// `capif invoker ...`: one step of the invoker role, its result on stdout.
async fn invoker_command(cmd: InvokerCommand) -> Result<()> {
    match cmd {
        InvokerCommand::Onboard {
            profile,
            onboarding,
            capif,
            ca,
            credential,
            server_name,
            capif1e,
        } => {
            let ca = std::fs::read_to_string(&ca).with_context(|| ca.display().to_string())?;
            let p = invoker::onboard_profile(
                &onboarding,
                &capif,
                &ca,
                &server_name,
                &credential,
                &profile.profile,
                capif1e,
            )
            .await?;
            println!(
                "onboarded api_invoker_id={} ccf_id={} capif1e={} profile={}",
                p.id(),
                p.file.ccf_id,
                p.file.capif1e,
                p.dir.display()
            );
        }
        InvokerCommand::Security {
            profile,
            aef,
            api,
            method,
        } => invoker_security(&profile.profile, &aef, api.as_deref(), method).await?,
        InvokerCommand::Token { profile, scope } => {
            let p = Profile::load(&profile.profile)?;
            let t = invoker::token(&p, &scope).await?;
            eprintln!("scope={} expires_in={}s", t.scope, t.expires_in);
            // The invoker asked for its own credential: printing it is this command's purpose.
            println!("{}", t.access_token);
        }
        InvokerCommand::Auth {
            profile,
            aef,
            aef_domain,
            target,
            method,
        } => invoker_auth(&profile.profile, &aef, &aef_domain, &target, method).await?,
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
            method,
            tls,
        } => invoker_run(&profile.profile, &aef, &target, &api, method, tls).await?,
    }
    Ok(())
}

/// `capif invoker security`: with PSK the key for the AEF, with another method its
/// authorization.
async fn invoker_security(
    profile: &Path,
    aef: &str,
    api: Option<&str>,
    method: SecurityMethod,
) -> Result<()> {
    let p = Profile::load(profile)?;
    if method == SecurityMethod::Psk {
        let (k, session) = invoker::security_with_session(&p, aef, api).await?;
        println!(
            "security method PSK for {aef}: key_id={} interface={} expires_at_ms={}",
            k.key_id, k.interface, k.expires_at_ms
        );
        // Not secret: with the key log's master secret they reproduce the key (PROTOCOL.md 4.6).
        println!(
            "capif1e={} session_id={} p0={}",
            session.profile, session.session_id_hex, k.interface
        );
    } else {
        let i = invoker::negotiate(&p, aef, api, method).await?;
        println!(
            "security method {} for {aef}: authorized APIs {}",
            method.as_str_name(),
            i.authorization_info
        );
    }
    Ok(())
}

/// `capif invoker auth`: Authentication Initiation at the AEF, with the stored PSK key or
/// with another method.
async fn invoker_auth(
    profile: &Path,
    aef: &str,
    aef_domain: &str,
    target: &AefArgs,
    method: SecurityMethod,
) -> Result<()> {
    let p = Profile::load(profile)?;
    if method != SecurityMethod::Psk {
        let ca = std::fs::read_to_string(&target.aef_ca)?;
        let r = invoker::auth_method(
            &p,
            method,
            "",
            &target.aef_addr,
            &ca,
            &target.aef_server_name,
            &invoker::expected_aef(aef_domain, aef)?,
        )
        .await?;
        println!(
            "authenticated: method={} tls_endpoint={} remaining_validity_ms={}",
            method.as_str_name(),
            r.tls_endpoint,
            r.remaining_validity_ms
        );
        return Ok(());
    }
    let k = p.key(aef)?;
    let ca = std::fs::read_to_string(&target.aef_ca)?;
    let r = invoker::auth(
        &p,
        Some(&k),
        &target.aef_addr,
        &ca,
        &target.aef_server_name,
        &invoker::expected_aef(aef_domain, aef)?,
    )
    .await?;
    println!(
        "authenticated: tls_endpoint={} psk_identity={} remaining_validity_ms={}",
        r.tls_endpoint, r.psk_identity, r.remaining_validity_ms
    );
    Ok(())
}

/// `capif invoker run`: the whole flow with one method, and the AEF's answer.
async fn invoker_run(
    profile: &Path,
    aef: &str,
    target: &AefArgs,
    api: &str,
    method: SecurityMethod,
    tls: TlsProfile,
) -> Result<()> {
    let p = Profile::load(profile)?;
    let ca = std::fs::read_to_string(&target.aef_ca)?;
    let t = invoker::AefTarget {
        addr: &target.aef_addr,
        ca_pem: &ca,
        server_name: &target.aef_server_name,
    };
    let r = invoker::run_flow(&p, method, aef, api, &t, tls).await?;
    println!(
        "{} answered {} for {} of {} ({}{}): {}",
        r.aef_id,
        r.api_name,
        r.api_invoker_id,
        r.home_ccf_id,
        method.as_str_name(),
        if r.key_id.is_empty() {
            String::new()
        } else {
            format!(", key {}", r.key_id)
        },
        r.result
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ccf_core::process::run_async("capif", run(cli))
}
