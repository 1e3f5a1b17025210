//! The testbed launcher: from a scenario, generate every domain's CA and certificates, write
//! every component's config, serve the DNS zone, and start each component as its own OS process
//! (the real `ccf`, `capif-gateway` and `aef-stub` binaries), each logging JSON lines to the run
//! directory and, when the testbed has an OTLP endpoint, exporting its spans there.
//!
//! Children get SIGTERM when the launcher dies (PR_SET_PDEATHSIG) and are stopped on every exit
//! path, so a run leaves nothing behind but its directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, CcfId};
use ccf_core::kdf::Capif1eProfile;
use ccf_core::pki::{DomainCa, write_private_file};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::dns::DnsServer;
use crate::scenario::Scenario;

/// The file in the run directory that lists every component's `/metrics` address for
/// Prometheus' `file_sd_configs`.
pub const PROMETHEUS_TARGETS: &str = "prometheus-targets.json";

/// How long a component may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A port for a component to listen on, chosen before the component starts. Taken below Linux's
/// ephemeral range (32768 and up): a port from that range can be taken by an outgoing connection
/// of a component started in the meantime, and the later listener then fails with "address in
/// use". Random, and never the same twice in one process, so concurrent testbeds rarely meet.
fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().map_err(|_| anyhow!("port list poisoned"))?;
    for _ in 0..500 {
        let port = 20000 + rand::random::<u16>() % 12000;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Everything generated for one domain.
#[derive(Clone, Debug)]
pub struct DomainPlan {
    /// The CCF id.
    pub id: String,
    /// Its directory in the run directory.
    pub dir: PathBuf,
    /// CCF onboarding port.
    pub onboarding_port: u16,
    /// CCF CAPIF-1e/3/6 port.
    pub capif_port: u16,
    /// The domain's CAPIF-1e profile.
    pub capif1e: Capif1eProfile,
    /// CCF TLS 1.2 CAPIF-1e port (`tls12-annex-a` only).
    pub capif1e_port: Option<u16>,
    /// Gateway CAPIF-6 port.
    pub gw6_port: u16,
    /// Gateway CAPIF-6e port.
    pub gw6e_port: u16,
    /// AEFPSK validity, seconds.
    pub validity_secs: u64,
    /// The gateway's outbound fetch budget per partner (rate per second, burst), when set.
    pub fetch_budget: (Option<u32>, Option<u32>),
    /// Where its CCF keeps its state.
    pub store: ccf_core::pg::StoreBackend,
    /// Its CCF's database (`postgres` only), set when the run's server is up.
    pub store_url: Option<String>,
    /// Partner domains.
    pub partners: Vec<String>,
    /// Onboarding credential per invoker (member) name.
    pub credentials: BTreeMap<String, String>,
    /// The ports of replicas 2.. of its CCF and gateway (`replicas` in the scenario); replica
    /// 1 is the fields above.
    pub more_replicas: Vec<ReplicaPorts>,
}

/// The listen ports of one replica of a domain's CCF and gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaPorts {
    /// CCF onboarding port.
    pub onboarding_port: u16,
    /// CCF CAPIF-1e/3/6 port.
    pub capif_port: u16,
    /// CCF TLS 1.2 CAPIF-1e port (`tls12-annex-a` only).
    pub capif1e_port: Option<u16>,
    /// Gateway CAPIF-6 port.
    pub gw6_port: u16,
    /// Gateway CAPIF-6e port.
    pub gw6e_port: u16,
}

impl ReplicaPorts {
    fn new(capif1e: Capif1eProfile) -> Result<Self> {
        Ok(Self {
            onboarding_port: free_port()?,
            capif_port: free_port()?,
            capif1e_port: match capif1e {
                Capif1eProfile::Tls12AnnexA => Some(free_port()?),
                Capif1eProfile::Tls13Exporter => None,
            },
            gw6_port: free_port()?,
            gw6e_port: free_port()?,
        })
    }

    /// Where the domain's invokers run CAPIF-1e at this replica.
    pub fn capif1e_addr(&self) -> String {
        format!("127.0.0.1:{}", self.capif1e_port.unwrap_or(self.capif_port))
    }
}

/// The suffix of replica `n`'s files and component name: "" for replica 1 (today's names),
/// "-2" and "#2" and so on for the others.
fn replica_suffix(n: u32, sep: char) -> String {
    if n <= 1 {
        String::new()
    } else {
        format!("{sep}{n}")
    }
}

impl DomainPlan {
    /// Where the domain's invokers run CAPIF-1e.
    pub fn capif1e_addr(&self) -> String {
        format!("127.0.0.1:{}", self.capif1e_port.unwrap_or(self.capif_port))
    }
    /// The domain CA certificate file.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The operator certificate and key files.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("operator.pem"), self.dir.join("operator.key"))
    }
    /// How many CCF and gateway replicas the domain runs.
    pub fn replica_count(&self) -> u32 {
        1 + self.more_replicas.len() as u32
    }

    /// The ports of replica `n` (1-based).
    pub fn replica(&self, n: u32) -> Option<ReplicaPorts> {
        match n {
            0 => None,
            1 => Some(ReplicaPorts {
                onboarding_port: self.onboarding_port,
                capif_port: self.capif_port,
                capif1e_port: self.capif1e_port,
                gw6_port: self.gw6_port,
                gw6e_port: self.gw6e_port,
            }),
            n => self.more_replicas.get(n as usize - 2).copied(),
        }
    }

    /// Every replica's ports, replica 1 first.
    pub fn replicas(&self) -> Vec<ReplicaPorts> {
        (1..=self.replica_count())
            .filter_map(|n| self.replica(n))
            .collect()
    }

    /// Every CCF replica's CAPIF-1e/3/6 address (`capif`), replica 1 first.
    pub fn capif_addrs(&self) -> Vec<String> {
        self.replicas()
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.capif_port))
            .collect()
    }

    /// Every CCF replica's onboarding address, replica 1 first.
    pub fn onboarding_addrs(&self) -> Vec<String> {
        self.replicas()
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.onboarding_port))
            .collect()
    }

    /// Every CCF replica's CAPIF-1e address, replica 1 first.
    pub fn capif1e_addrs(&self) -> Vec<String> {
        self.replicas()
            .iter()
            .map(ReplicaPorts::capif1e_addr)
            .collect()
    }

    /// The config file of replica `n` of the CCF (`ccf.toml`, `ccf-2.toml`, ...).
    pub fn ccf_config_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("ccf{}.toml", replica_suffix(n, '-')))
    }

    /// The config file of replica `n` of the gateway (`gateway.toml`, `gateway-2.toml`, ...).
    pub fn gateway_config_path(&self, n: u32) -> PathBuf {
        self.dir
            .join(format!("gateway{}.toml", replica_suffix(n, '-')))
    }

    /// The CA bundle this domain's gateway trusts for `partner`'s gateway.
    pub fn partner_ca(&self, partner: &str) -> PathBuf {
        self.dir.join("partners").join(format!("{partner}.pem"))
    }
}

/// File stem of the certificate and key a gateway presents to partners.
pub(crate) const INTERCONNECT_STEM: &str = "gateway-interconnect";

/// The names a domain's gateway certificate carries.
pub(crate) fn gateway_hosts(domain: &str) -> Vec<String> {
    vec![
        "localhost".into(),
        "127.0.0.1".into(),
        format!("gw.{domain}"),
    ]
}

/// A domain's CA certificate, as written by `generate`.
fn ca_pem_of(d: &DomainPlan) -> Result<String> {
    let id = CcfId::new(d.id.clone())?;
    Ok(
        DomainCa::load_or_generate(&id, &d.dir.join("ccf"), None, None)?
            .cert_pem()
            .to_string(),
    )
}

/// Everything generated for one AEF.
#[derive(Clone, Debug)]
pub struct AefPlan {
    /// Its id.
    pub id: String,
    /// Its domain.
    pub domain: String,
    /// Security service port.
    pub security_port: u16,
    /// PSK endpoint port.
    pub psk_port: u16,
    /// TLS endpoint port (methods 2 and 3).
    pub tls_port: u16,
    /// APIs.
    pub apis: Vec<String>,
    /// PSK TLS profile.
    pub psk_tls: String,
}

/// A component process.
struct Proc {
    child: Child,
    pid: u32,
}

/// A running testbed.
pub struct Testbed {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Domains.
    pub domains: BTreeMap<String, DomainPlan>,
    /// AEFs.
    pub aefs: BTreeMap<String, AefPlan>,
    /// DNS server (None with static discovery).
    pub dns: Option<DnsServer>,
    procs: BTreeMap<String, Proc>,
    quiet: bool,
    /// The OTLP/gRPC endpoint every component started exports its spans to (`--otlp-endpoint`),
    /// when set ([`Testbed::up_with`]).
    pub otlp_endpoint: Option<String>,
    /// Rotations of the CA partners trust for each domain's gateway (`live`), for CA names.
    pub(crate) rotations: BTreeMap<String, u32>,
    /// The `/metrics` port of every component (`--metrics-listen`), by component name.
    pub metrics_ports: BTreeMap<String, u16>,
    /// The run's PostgreSQL server (`run_dir/postgres`), when a domain keeps its state there;
    /// stopped with the testbed.
    postgres: Option<crate::postgres::PgServer>,
}

/// The directory holding `ccf`, `capif-gateway` and `aef-stub`: `$CAPIF_BIN_DIR`, else the
/// directory of the running `capif` binary.
pub fn default_bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CAPIF_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .ok_or_else(|| anyhow!("no parent of {}", exe.display()))?
        .to_path_buf())
}

/// Starts the run's PostgreSQL server in `run_dir/postgres` (its own data directory and port)
/// and creates one database per domain that keeps its state there.
async fn start_postgres(
    run_dir: &Path,
    domains: &mut BTreeMap<String, DomainPlan>,
) -> Result<crate::postgres::PgServer> {
    let names: Vec<(String, String)> = domains
        .values()
        .filter(|d| d.store == ccf_core::pg::StoreBackend::Postgres)
        .map(|d| (d.id.clone(), database_name(&d.id)))
        .collect();
    let dir = run_dir.join("postgres");
    let (server, urls) = tokio::task::spawn_blocking(move || {
        crate::postgres::install_if_missing()?;
        let server = crate::postgres::PgServer::start(&dir)?;
        let mut urls = Vec::new();
        for (domain, db) in names {
            server.create_database(&db)?;
            urls.push((domain, server.database_url(&db)));
        }
        Ok::<_, anyhow::Error>((server, urls))
    })
    .await??;
    for (domain, url) in urls {
        if let Some(d) = domains.get_mut(&domain) {
            d.store_url = Some(url);
        }
    }
    Ok(server)
}

/// The database of a domain's CCF: `ccf_` and the CCF id with what SQL names do not take
/// replaced (`operator-a.test` -> `ccf_operator_a_test`).
fn database_name(domain: &str) -> String {
    let id: String = domain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("ccf_{id}")
}

/// `address = "..."` for one server, `addresses = [...]` for its replicas (the components'
/// `[ccf]` and `[gateway]` sections take either).
fn address_keys(addrs: &[String]) -> String {
    match addrs {
        [one] => format!("address = \"{one}\""),
        many => format!(
            "addresses = [{}]",
            many.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The gateway's `[store]` section: for a domain on PostgreSQL, the domain's database (the
/// gateway's tables are prefixed `gateway_`, beside the CCF's), shared by every gateway replica:
/// fetch records, the outbox and the seen notices, and LISTEN/NOTIFY evictions across replicas.
/// Empty for redb: each gateway keeps `gateway.redb` in its state directory.
fn gateway_store_section(d: &DomainPlan) -> String {
    match &d.store_url {
        Some(url) => format!("\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
        None => String::new(),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| path.display().to_string())
}

impl Testbed {
    /// Generates everything and starts every component; stops what it started on failure.
    pub async fn up(s: &Scenario, run_dir: &Path, bin_dir: &Path, quiet: bool) -> Result<Self> {
        Self::up_with(s, run_dir, bin_dir, quiet, None).await
    }

    /// [`Testbed::up`], every component exporting its spans to `otlp_endpoint` when given.
    pub async fn up_with(
        s: &Scenario,
        run_dir: &Path,
        bin_dir: &Path,
        quiet: bool,
        otlp_endpoint: Option<String>,
    ) -> Result<Self> {
        for b in ["ccf", "capif-gateway", "aef-stub"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{} not found in {}: build the workspace binaries first (cargo build --release --bins)",
                    b,
                    bin_dir.display()
                );
            }
        }
        std::fs::create_dir_all(run_dir)?;
        let members = s.invoker_members();
        let mut domains = BTreeMap::new();
        for d in &s.domains {
            let dir = run_dir.join(&d.id);
            std::fs::create_dir_all(dir.join("ccf"))?;
            let credentials = members
                .values()
                .flatten()
                .filter(|(_, home)| *home == d.id)
                .map(|(name, _)| (name.clone(), hex::encode(rand::random::<[u8; 16]>())))
                .collect();
            domains.insert(
                d.id.clone(),
                DomainPlan {
                    id: d.id.clone(),
                    dir,
                    onboarding_port: free_port()?,
                    capif_port: free_port()?,
                    capif1e: d.capif1e,
                    capif1e_port: match d.capif1e {
                        Capif1eProfile::Tls12AnnexA => Some(free_port()?),
                        Capif1eProfile::Tls13Exporter => None,
                    },
                    gw6_port: free_port()?,
                    gw6e_port: free_port()?,
                    validity_secs: d.aef_psk_validity_secs.unwrap_or(3600),
                    fetch_budget: (d.gateway_fetch_rate_per_sec, d.gateway_fetch_burst),
                    store: d.store,
                    store_url: None,
                    partners: s
                        .domains
                        .iter()
                        .filter(|o| s.trusts(&d.id, &o.id))
                        .map(|o| o.id.clone())
                        .collect(),
                    credentials,
                    more_replicas: (1..d.replica_count())
                        .map(|_| ReplicaPorts::new(d.capif1e))
                        .collect::<Result<_>>()?,
                },
            );
        }
        let mut aefs = BTreeMap::new();
        for d in &s.domains {
            for a in &d.aefs {
                aefs.insert(
                    a.id.clone(),
                    AefPlan {
                        id: a.id.clone(),
                        domain: d.id.clone(),
                        security_port: free_port()?,
                        psk_port: free_port()?,
                        tls_port: free_port()?,
                        apis: a.apis.clone(),
                        psk_tls: a.psk_tls.clone().unwrap_or_else(|| "tls13".into()),
                    },
                );
            }
        }
        let postgres = if domains
            .values()
            .any(|d| d.store == ccf_core::pg::StoreBackend::Postgres)
        {
            Some(start_postgres(run_dir, &mut domains).await?)
        } else {
            None
        };
        let use_dns = s.federation.discovery.as_deref() != Some("static");
        let dns = if use_dns {
            let zones: Vec<(String, Vec<u16>)> = domains
                .values()
                .map(|d| {
                    (
                        d.id.clone(),
                        d.replicas().iter().map(|r| r.gw6e_port).collect(),
                    )
                })
                .collect();
            Some(DnsServer::start_replicas(&zones).await?)
        } else {
            None
        };
        let mut tb = Testbed {
            run_dir: run_dir.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            domains,
            aefs,
            dns,
            procs: BTreeMap::new(),
            quiet,
            otlp_endpoint,
            rotations: BTreeMap::new(),
            metrics_ports: BTreeMap::new(),
            postgres,
        };
        for c in tb.components() {
            tb.metrics_ports.insert(c, free_port()?);
        }
        tb.generate()?;
        write(
            &run_dir.join(PROMETHEUS_TARGETS),
            &serde_json::to_string_pretty(&tb.prometheus_targets())?,
        )?;
        if let Err(e) = tb.start_all().await {
            tb.down().await;
            return Err(e);
        }
        Ok(tb)
    }

    fn generate(&self) -> Result<()> {
        for d in self.domains.values() {
            let id = CcfId::new(d.id.clone())?;
            let ca = DomainCa::load_or_generate(&id, &d.dir.join("ccf"), None, None)?;
            write(&d.ca_pem(), ca.cert_pem())?;
            let issue = |role: Role, hosts: &[&str], stem: &str| -> Result<()> {
                let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
                let c = ca.issue_with_new_key(&PeerIdentity::new(id.clone(), role), &hosts, 30)?;
                write(&d.dir.join(format!("{stem}.pem")), &c.cert_pem)?;
                write_private_file(&d.dir.join(format!("{stem}.key")), c.key_pem.as_bytes())?;
                Ok(())
            };
            issue(Role::Operator, &[], "operator")?;
            let gw_hosts = gateway_hosts(&d.id);
            let gw_hosts: Vec<&str> = gw_hosts.iter().map(String::as_str).collect();
            issue(Role::Gateway, &gw_hosts, "gateway")?;
            // The identity partners see starts out issued by the domain CA too; a rotation
            // (`rotate_partner_ca`) moves it to a CA of its own.
            issue(Role::Gateway, &gw_hosts, INTERCONNECT_STEM)?;
            std::fs::create_dir_all(d.dir.join("partners"))?;
            for p in &d.partners {
                write(&d.partner_ca(p), ca_pem_of(&self.domains[p])?.as_str())?;
            }
            for a in self.aefs.values().filter(|a| a.domain == d.id) {
                issue(
                    Role::Aef(AefId::new(a.id.clone())?),
                    &["localhost", "127.0.0.1"],
                    &a.id,
                )?;
                write(
                    &d.dir.join(format!("{}.toml", a.id)),
                    &self.aef_config(d, a),
                )?;
            }
            self.write_ccf_config(d)?;
            if !d.partners.is_empty() {
                for n in 1..=d.replica_count() {
                    self.write_gateway_config(d, n)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the config of every replica of the domain's CCF.
    fn write_ccf_config(&self, d: &DomainPlan) -> Result<()> {
        for n in 1..=d.replica_count() {
            self.write_ccf_replica_config(d, n)?;
        }
        Ok(())
    }

    /// Replica `n`'s config: the replicas of a CCF differ only in their listen ports; they
    /// share the state directory (the domain CA's files; replica 1 starts first and finds or
    /// makes them) and the database.
    fn write_ccf_replica_config(&self, d: &DomainPlan, n: u32) -> Result<()> {
        let r = d
            .replica(n)
            .ok_or_else(|| anyhow!("{} has no replica {n}", d.id))?;
        let mut t = format!(
            "ccf_id = \"{id}\"\nstate_dir = \"{state}\"\n\n[listen]\nonboarding = \"127.0.0.1:{on}\"\ncapif = \"127.0.0.1:{cap}\"\n{c1e}\n\
             [security]\naef_psk_validity_secs = {v}\ncapif1e = \"{profile}\"\n\n[onboarding]\ncredentials = [{creds}]\n",
            id = d.id,
            state = d.dir.join("ccf").display(),
            on = r.onboarding_port,
            cap = r.capif_port,
            c1e = r
                .capif1e_port
                .map(|p| format!("capif1e = \"127.0.0.1:{p}\"\n"))
                .unwrap_or_default(),
            profile = d.capif1e,
            v = d.validity_secs,
            creds = d
                .credentials
                .values()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if let Some(url) = &d.store_url {
            t += &format!("\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n");
        }
        if !d.partners.is_empty() {
            let gws: Vec<String> = d
                .replicas()
                .iter()
                .map(|r| format!("127.0.0.1:{}", r.gw6_port))
                .collect();
            t += &format!("\n[gateway]\n{}\n", address_keys(&gws));
        }
        // Every AEF of the scenario is published to every CCF (interconnection publishing is
        // wider than trust): an invoker may negotiate a key for an AEF whose domain its home
        // does not federate with; that AEF's gateway then refuses the unknown partner.
        for a in self.aefs.values() {
            t += &format!(
                "\n[[aef]]\naef_id = \"{id}\"\nccf_id = \"{dom}\"\ninterface = {{ fqdn = \"{id}.{dom}\", port = {port}, api_prefix = \"/{id}\" }}\n\
                 security_methods = [\"PSK\", \"PKI\", \"OAUTH\"]\napis = [{apis}]\n",
                id = a.id,
                dom = a.domain,
                port = a.psk_port,
                apis = a
                    .apis
                    .iter()
                    .map(|x| format!("\"{x}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            if a.domain == d.id {
                t += &format!("security_endpoint = \"127.0.0.1:{}\"\n", a.security_port);
            }
        }
        // Owner-only: it holds the onboarding credentials, and the database password when set.
        let path = d.ccf_config_path(n);
        write_private_file(&path, t.as_bytes()).with_context(|| path.display().to_string())
    }

    /// Writes replica `n`'s gateway configuration, owner-only: with a PostgreSQL store it holds
    /// the database password.
    pub(crate) fn write_gateway_config(&self, d: &DomainPlan, n: u32) -> Result<()> {
        let path = d.gateway_config_path(n);
        write_private_file(&path, self.gateway_replica_config(d, n).as_bytes())
            .with_context(|| path.display().to_string())
    }

    /// Replica `n`'s gateway configuration, as the domain's plan says now (the partner list may
    /// change while the testbed runs: `live`): its own listen ports and state directory
    /// (`gateway-state`, `gateway-state-2`, ...), every CCF replica as its CCF, and the rest as
    /// replica 1's.
    pub(crate) fn gateway_replica_config(&self, d: &DomainPlan, n: u32) -> String {
        let dir = d.dir.display();
        let r = d.replica(n).unwrap_or_else(|| d.replicas()[0]);
        let mut t = format!(
            "ccf_id = \"{id}\"\nstate_dir = \"{dir}/gateway-state{sfx}\"\n\n[listen]\ncapif6 = \"127.0.0.1:{g6}\"\ncapif6e = \"127.0.0.1:{g6e}\"\n\n\
             [tls]\nca_cert = \"{dir}/ca.pem\"\ncert = \"{dir}/gateway.pem\"\nkey = \"{dir}/gateway.key\"\n\
             interconnect_cert = \"{dir}/{ic}.pem\"\ninterconnect_key = \"{dir}/{ic}.key\"\n\n\
             [ccf]\n{ccf}\n",
            ic = INTERCONNECT_STEM,
            id = d.id,
            sfx = replica_suffix(n, '-'),
            g6 = r.gw6_port,
            g6e = r.gw6e_port,
            ccf = address_keys(&d.capif_addrs()),
        );
        t += &gateway_store_section(d);
        if let Some(dns) = &self.dns {
            t += &format!("\n[dns]\nnameserver = \"{}\"\n", dns.addr);
        }
        let (rate, burst) = d.fetch_budget;
        if rate.is_some() || burst.is_some() {
            t += "\n[outbound]\n";
            if let Some(r) = rate {
                t += &format!("fetch_rate_per_sec = {r}\n");
            }
            if let Some(b) = burst {
                t += &format!("fetch_burst = {b}\n");
            }
        }
        for p in &d.partners {
            let pd = &self.domains[p];
            // Its gateway is trusted with the bundle this domain holds for it (rotated live);
            // its invokers' certificates come from its domain CA.
            t += &format!(
                "\n[[partner]]\nccf_id = \"{p}\"\nca_cert = \"{}\"\ninvoker_ca_cert = \"{}\"\n",
                d.partner_ca(p).display(),
                pd.ca_pem().display()
            );
            if self.dns.is_none() {
                // Static discovery names one address per partner: its replica 1.
                t += &format!("address = \"127.0.0.1:{}\"\n", pd.gw6e_port);
            }
        }
        t
    }

    fn aef_config(&self, d: &DomainPlan, a: &AefPlan) -> String {
        let dir = d.dir.display();
        format!(
            "aef_id = \"{id}\"\nccf_id = \"{dom}\"\napis = [{apis}]\npsk_tls = \"{tls}\"\n\n\
             [tls]\nca_cert = \"{dir}/ca.pem\"\ncert = \"{dir}/{id}.pem\"\nkey = \"{dir}/{id}.key\"\n\n\
             [ccf]\n{ccf}\n\n[listen]\nsecurity = \"127.0.0.1:{sec}\"\npsk = \"127.0.0.1:{psk}\"\ntls = \"127.0.0.1:{tlsp}\"\n",
            id = a.id,
            dom = d.id,
            apis = a
                .apis
                .iter()
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(", "),
            tls = a.psk_tls,
            ccf = address_keys(&d.capif_addrs()),
            sec = a.security_port,
            psk = a.psk_port,
            tlsp = a.tls_port,
        )
    }

    /// Every component name, in start order.
    /// Replica 1 of a domain's CCF starts before its other replicas (it finds or makes the
    /// state they share), every CCF before the gateways.
    pub fn components(&self) -> Vec<String> {
        let replicas = |kind: &'static str, d: &'_ DomainPlan| {
            (1..=d.replica_count())
                .map(move |n| format!("{kind}:{}{}", d.id, replica_suffix(n, '#')))
                .collect::<Vec<_>>()
        };
        let mut v: Vec<String> = self
            .domains
            .values()
            .flat_map(|d| replicas("ccf", d))
            .collect();
        v.extend(
            self.domains
                .values()
                .filter(|d| !d.partners.is_empty())
                .flat_map(|d| replicas("gateway", d)),
        );
        v.extend(self.aefs.keys().map(|a| format!("aef:{a}")));
        v
    }

    /// Every component's `/metrics` address, by component name (`gateway:operator-a.test`).
    pub fn metrics_addrs(&self) -> BTreeMap<String, std::net::SocketAddr> {
        self.metrics_ports
            .iter()
            .map(|(c, p)| (c.clone(), std::net::SocketAddr::from(([127, 0, 0, 1], *p))))
            .collect()
    }

    /// The scrape targets in Prometheus' file-based discovery format (`file_sd_configs`), one
    /// group per component, labelled with the component and its domain.
    pub fn prometheus_targets(&self) -> serde_json::Value {
        let groups: Vec<serde_json::Value> = self
            .metrics_addrs()
            .into_iter()
            .map(|(c, addr)| {
                let domain = match crate::scenario::split_component(&c) {
                    Some(("aef", a, _)) => self.aefs.get(a).map(|a| a.domain.clone()),
                    Some((_, d, _)) => Some(d.to_string()),
                    None => None,
                };
                serde_json::json!({
                    "targets": [addr.to_string()],
                    "labels": { "component": c, "domain": domain.unwrap_or_default() },
                })
            })
            .collect();
        serde_json::Value::Array(groups)
    }

    async fn start_all(&mut self) -> Result<()> {
        let all = self.components();
        for (i, c) in all.iter().enumerate() {
            if !self.quiet {
                eprint!("\rstarting {}/{}: {c:<40}", i + 1, all.len());
            }
            self.start(c).await?;
        }
        if !self.quiet {
            eprintln!("\rtestbed up: {} components{:40}", all.len(), "");
        }
        Ok(())
    }

    fn command(&self, component: &str) -> Result<(PathBuf, Vec<String>)> {
        let (kind, name, n) = crate::scenario::split_component(component)
            .ok_or_else(|| anyhow!("bad component {component:?}"))?;
        let (bin, mut args) = self.component_command(kind, name, n, component)?;
        if let Some(port) = self.metrics_ports.get(component) {
            args.extend(["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
        }
        // JSON lines: one object per line with the trace id at the top level, so the logs of
        // every hop can be searched by trace (docs/OPERATIONS.md, "Logs").
        args.extend(["--log-format".into(), "json".into()]);
        if let Some(e) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".into(), e.clone()]);
        }
        Ok((bin, args))
    }

    fn component_command(
        &self,
        kind: &str,
        name: &str,
        replica: u32,
        component: &str,
    ) -> Result<(PathBuf, Vec<String>)> {
        let domain = || {
            let d = self
                .domains
                .get(name)
                .ok_or_else(|| anyhow!("unknown domain {name}"))?;
            if replica > d.replica_count() {
                bail!("{name} runs {} replicas, not {replica}", d.replica_count());
            }
            Ok(d)
        };
        Ok(match kind {
            "ccf" => (
                self.bin_dir.join("ccf"),
                vec![
                    "serve".into(),
                    "--config".into(),
                    domain()?.ccf_config_path(replica).display().to_string(),
                ],
            ),
            "gateway" => (
                self.bin_dir.join("capif-gateway"),
                vec![
                    "--config".into(),
                    domain()?.gateway_config_path(replica).display().to_string(),
                ],
            ),
            "aef" => {
                let a = self
                    .aefs
                    .get(name)
                    .ok_or_else(|| anyhow!("unknown AEF {name}"))?;
                let d = &self.domains[&a.domain];
                (
                    self.bin_dir.join("aef-stub"),
                    vec![
                        "--config".into(),
                        d.dir.join(format!("{name}.toml")).display().to_string(),
                    ],
                )
            }
            _ => bail!("bad component {component:?}"),
        })
    }

    /// Starts one component and waits for its ready line.
    pub async fn start(&mut self, component: &str) -> Result<()> {
        let component = &crate::scenario::canonical_component(component);
        if self.procs.contains_key(component) {
            bail!("{component} is already running");
        }
        let (bin, args) = self.command(component)?;
        let log = self
            .run_dir
            .join("logs")
            .join(format!("{}.log", component.replace([':', '#'], "-")));
        let (child, _) = spawn_ready_env(&bin, &args, &self.otlp_env(), &log)
            .await
            .with_context(|| component.to_string())?;
        let pid = child.id().unwrap_or(0);
        self.procs
            .insert(component.to_string(), Proc { child, pid });
        Ok(())
    }

    /// The environment that points a component at the OTLP endpoint: the variable the
    /// components' `--otlp-endpoint` flag reads, which a component built without OTLP export
    /// ignores, and a short batch delay so spans arrive while the run goes on (a component
    /// killed by a step loses only its last half second).
    fn otlp_env(&self) -> Vec<(&'static str, String)> {
        match &self.otlp_endpoint {
            Some(e) => vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", e.clone()),
                ("OTEL_BSP_SCHEDULE_DELAY", "500".into()),
            ],
            None => Vec::new(),
        }
    }

    /// Stops one component: SIGTERM and up to 5 s grace, or SIGKILL at once when `kill`.
    pub async fn stop(&mut self, component: &str, kill: bool) -> Result<()> {
        let component = &crate::scenario::canonical_component(component);
        let mut p = self
            .procs
            .remove(component)
            .ok_or_else(|| anyhow!("{component} is not running"))?;
        if !kill {
            // SAFETY: sending a signal to our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(p.pid as libc::pid_t, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        p.child.kill().await?;
        let _ = p.child.wait().await;
        Ok(())
    }

    /// Rewrites a CCF's config with a new AEFPSK validity (takes effect at its next start).
    pub fn set_validity(&mut self, domain: &str, secs: u64) -> Result<()> {
        let d = self
            .domains
            .get_mut(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?;
        d.validity_secs = secs;
        let d = d.clone();
        self.write_ccf_config(&d)
    }

    /// Pids of the running components.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.procs.iter().map(|(k, p)| (k.clone(), p.pid)).collect()
    }

    /// Stops everything (reverse start order), the run's PostgreSQL server last.
    pub async fn down(&mut self) {
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.reverse();
        for n in names {
            let _ = self.stop(&n, false).await;
        }
        if let Some(mut pg) = self.postgres.take() {
            let _ = tokio::task::spawn_blocking(move || pg.stop()).await;
        }
    }

    /// The port of the run's PostgreSQL server, when it has one.
    pub fn postgres_port(&self) -> Option<u16> {
        self.postgres.as_ref().map(|p| p.port())
    }

    /// Addresses and ready-to-paste grpcurl commands, per domain.
    pub fn describe(&self, grpcurl: &str) -> String {
        let mut out = String::new();
        for d in self.domains.values() {
            let (cert, key) = d.operator();
            let tls = format!(
                "-cacert {} -cert {} -key {}",
                d.ca_pem().display(),
                cert.display(),
                key.display()
            );
            out += &format!("\n== {} ==\n", d.id);
            for (i, r) in d.replicas().iter().enumerate() {
                out += &format!(
                    "  {:<9} onboarding 127.0.0.1:{}  capif 127.0.0.1:{}{}\n",
                    format!("ccf{}", replica_suffix(i as u32 + 1, '#')),
                    r.onboarding_port,
                    r.capif_port,
                    r.capif1e_port
                        .map(|p| format!("  capif1e (TLS 1.2, tls12-annex-a) 127.0.0.1:{p}"))
                        .unwrap_or_default()
                );
            }
            if let (Some(port), true) = (self.postgres_port(), d.store_url.is_some()) {
                out += &format!(
                    "  store     PostgreSQL 127.0.0.1:{port}, database {} (url in ccf.toml)\n",
                    database_name(&d.id)
                );
            }
            if !d.partners.is_empty() {
                for (i, r) in d.replicas().iter().enumerate() {
                    out += &format!(
                        "  {:<9} capif6 127.0.0.1:{}  capif6e 127.0.0.1:{}  partners {}\n",
                        format!("gateway{}", replica_suffix(i as u32 + 1, '#')),
                        r.gw6_port,
                        r.gw6e_port,
                        d.partners.join(", ")
                    );
                }
            }
            for a in self.aefs.values().filter(|a| a.domain == d.id) {
                out += &format!(
                    "  {:<9} security 127.0.0.1:{}  psk 127.0.0.1:{}  tls (pki, oauth) 127.0.0.1:{}  apis {}\n",
                    a.id,
                    a.security_port,
                    a.psk_port,
                    a.tls_port,
                    a.apis.join(", ")
                );
            }
            let metrics = self.metrics_addrs();
            let mut scrape: Vec<String> = Vec::new();
            for c in self.components() {
                let Some(addr) = metrics.get(&c) else {
                    continue;
                };
                let (kind, name, n) = crate::scenario::split_component(&c).unwrap_or((&c, "", 1));
                let ours = match kind {
                    "aef" => self.aefs.get(name).is_some_and(|a| a.domain == d.id),
                    _ => name == d.id,
                };
                if ours {
                    let who = if kind == "aef" {
                        name.to_string()
                    } else {
                        format!("{kind}{}", replica_suffix(n, '#'))
                    };
                    scrape.push(format!("{who} http://{addr}/metrics"));
                }
            }
            if !scrape.is_empty() {
                out += &format!("  metrics   {}\n", scrape.join("  "));
            }
            out += &format!("  {grpcurl} {tls} 127.0.0.1:{} list\n", d.capif_port);
            out += &format!(
                "  {grpcurl} {tls} 127.0.0.1:{} describe capif.v1.Security\n",
                d.capif_port
            );
            if !d.partners.is_empty() {
                out += &format!(
                    "  {grpcurl} {tls} 127.0.0.1:{} capif.v1.GatewayAdmin/GetStatus\n",
                    d.gw6_port
                );
            }
        }
        if !self.metrics_ports.is_empty() {
            out += &format!(
                "\nPrometheus scrape targets (file_sd_configs): {}\n",
                self.run_dir.join(PROMETHEUS_TARGETS).display()
            );
        }
        out
    }
}

/// What `testbed.json` records of one process: enough to tell it from a later process that got
/// the same pid.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcRecord {
    /// The pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22, clock ticks since boot).
    pub start_time: u64,
    /// Its command line (`/proc/<pid>/cmdline`, arguments joined by spaces).
    pub cmdline: String,
}

fn proc_cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The start time of `pid`, from `/proc/<pid>/stat` (`None`: no such process).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Records `pid` as it is now.
pub fn proc_record(pid: u32) -> Option<ProcRecord> {
    Some(ProcRecord {
        pid,
        start_time: proc_start_time(pid)?,
        cmdline: proc_cmdline(pid)?,
    })
}

/// Whether `rec` still names the process it was written for, so that signalling it cannot hit
/// another process (a pid reused since, or 0, 1 or our own, which `kill` would treat specially):
/// same start time and same command line, and the command is one of the project's binaries.
pub fn confirm_own(rec: &ProcRecord) -> Result<(), String> {
    if rec.pid <= 1 || rec.pid == std::process::id() || i32::try_from(rec.pid).is_err() {
        return Err(format!("pid {} is not a component's", rec.pid));
    }
    match proc_start_time(rec.pid) {
        None => Err(format!("pid {} has ended", rec.pid)),
        Some(t) if t != rec.start_time => Err(format!(
            "pid {} now belongs to another process (it started later)",
            rec.pid
        )),
        Some(_) => {
            let now = proc_cmdline(rec.pid).unwrap_or_default();
            let program = now.split(' ').next().unwrap_or_default();
            let ours = ["capif", "ccf", "capif-gateway", "aef-stub"]
                .iter()
                .any(|b| Path::new(program).file_name().is_some_and(|f| f == *b));
            if now != rec.cmdline || !ours {
                return Err(format!(
                    "pid {} runs {now:?}, not the recorded component",
                    rec.pid
                ));
            }
            Ok(())
        }
    }
}

/// Starts `bin args` with stderr appended to `log`, waits for its first stdout line, which must
/// contain " ready " (every binary of the project prints one when it accepts connections), and
/// returns the child and that line. The child gets SIGTERM if this process dies.
pub async fn spawn_ready(bin: &Path, args: &[String], log: &Path) -> Result<(Child, String)> {
    spawn_ready_env(bin, args, &[], log).await
}

/// [`spawn_ready`] with extra environment variables.
pub async fn spawn_ready_env(
    bin: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Result<(Child, String)> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child when
    // this process dies, so a killed launcher leaves no component running.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) if line.contains(" ready ") => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((child, line))
        }
        other => {
            let _ = child.kill().await;
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "did not become ready ({}); last log lines:\n{}",
                match other {
                    Err(_) => "timed out".to_string(),
                    Ok(Ok(None)) => "it exited".to_string(),
                    Ok(Ok(Some(l))) => format!("unexpected output {l:?}"),
                    Ok(Err(e)) => e.to_string(),
                },
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
    }
}

#[cfg(test)]
mod proc_tests {
    use super::*;

    #[test]
    fn only_recorded_processes_are_confirmed() {
        let me = proc_record(std::process::id()).unwrap();
        // Our own pid is never a component.
        assert!(confirm_own(&me).is_err());
        // A stand-in component: `sleep` under one of the project's binary names.
        let dir = tempfile::tempdir().unwrap();
        let ccf = dir.path().join("ccf");
        std::fs::copy("/bin/sleep", &ccf).unwrap();
        let mut child = std::process::Command::new(&ccf).arg("5").spawn().unwrap();
        // Recorded once it runs (the testbed records after the ready line; here, after exec).
        let mut rec = proc_record(child.id()).unwrap();
        for _ in 0..100 {
            if rec.cmdline.contains("ccf") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            rec = proc_record(child.id()).unwrap();
        }
        assert!(confirm_own(&rec).is_ok(), "{rec:?}");
        let stale = ProcRecord {
            start_time: rec.start_time + 1,
            ..rec.clone()
        };
        assert!(confirm_own(&stale).is_err(), "a reused pid");
        let other = ProcRecord {
            cmdline: format!("{} 6", ccf.display()),
            ..rec.clone()
        };
        assert!(confirm_own(&other).is_err(), "another command line");
        let mut sleep = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let foreign = proc_record(sleep.id()).unwrap();
        assert!(
            confirm_own(&foreign).is_err(),
            "not one of the project's binaries"
        );
        sleep.kill().unwrap();
        sleep.wait().unwrap();
        for pid in [0, 1, u32::MAX] {
            let r = ProcRecord {
                pid,
                start_time: 0,
                cmdline: String::new(),
            };
            assert!(confirm_own(&r).is_err(), "{pid}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(confirm_own(&rec).is_err(), "an ended process");
    }
}
