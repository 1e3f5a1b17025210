//! Test harness: several operator domains on loopback, each with its own CA, a real CCF and a
//! real gateway (in-process, real mutual TLS), and a real DNS server (hickory-server on
//! loopback) serving the `_capif-6e._tcp` SRV records the gateways discover each other with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capif_ccf::config::CcfConfig;
use capif_ccf::server::RunningCcf;
use capif_gateway::config::GatewayConfig;
use capif_gateway::server::RunningGateway;
use capif_proto::v1::{self as pb, security_client::SecurityClient};
use ccf_core::identity::PeerIdentity;
use ccf_core::pki::{DomainCa, IssuedCredential};
use ccf_core::tls::{SessionSlot, client_config, connect};
use tonic::transport::Channel;

// What nearly every federation test names.
pub use ccf_core::identity::Role;
pub use ccf_core::ids::{AefId, CcfId};
pub use ccf_core::tls::ExpectedPeer;

/// Every AEF of the federation: (aef id, owning domain). Each CCF's registry lists them all, as
/// interconnection publishing would.
pub const AEFS: [(&str, &str); 3] = [
    ("aef-a1", "operator-a.test"),
    ("aef-b1", "operator-b.test"),
    ("aef-c1", "operator-c.test"),
];

/// A port for a server started later. Below Linux's ephemeral range (32768 and up), so that an
/// outgoing connection of a component started in the meantime cannot take it; random, and never
/// handed out twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..500 {
        let port = 20000 + rand::random::<u16>() % 12000;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Options of one test federation.
#[derive(Clone)]
pub struct Options {
    pub domains: Vec<&'static str>,
    /// AEFPSK validity at every CCF, seconds.
    pub validity_secs: u64,
    /// Gateway cache margin and negative TTL, milliseconds.
    pub margin_ms: u64,
    pub negative_ttl_ms: u64,
    /// Find partners with DNS (true) or static addresses (false).
    pub use_dns: bool,
    /// Start an AEF stub for every AEF a domain owns.
    pub with_aefs: bool,
    /// Every gateway's outbound fetch budget per partner: rate per second and burst.
    pub fetch_rate: u32,
    pub fetch_burst: u32,
    /// TOML appended to every AEF's config (e.g. a `[budgets]` table).
    pub aef_extra: String,
    /// Start every gateway from its file `<domain dir>/gateway.toml`, so that it can reload
    /// (edit it with [`Domain::edit_gateway_toml`]).
    pub reloadable: bool,
    /// (x, y): x's gateway does not list y as a partner at start (y still lists x).
    pub not_partners: Vec<(&'static str, &'static str)>,
    /// TOML appended to every gateway's config (e.g. a `[reload]` table).
    pub gateway_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            domains: vec!["operator-a.test", "operator-b.test"],
            validity_secs: 3600,
            margin_ms: 500,
            negative_ttl_ms: 300,
            use_dns: true,
            with_aefs: false,
            fetch_rate: 100,
            fetch_burst: 1000,
            aef_extra: String::new(),
            reloadable: false,
            not_partners: Vec::new(),
            gateway_extra: String::new(),
        }
    }
}

pub struct Domain {
    pub id: String,
    pub dir: PathBuf,
    pub ca: DomainCa,
    pub ccf: Option<RunningCcf>,
    pub gw: Option<RunningGateway>,
    pub gw_config: GatewayConfig,
    /// The gateway's configuration file, when the testbed is `reloadable`.
    pub gw_file: Option<PathBuf>,
    pub ccf_port: u16,
    pub gw6_port: u16,
    pub gw6e_port: u16,
    /// Security-service ports of the AEFs this domain owns.
    pub aef_ports: BTreeMap<String, u16>,
    pub aefs: BTreeMap<String, aef_stub::server::RunningAef>,
}

impl Domain {
    pub fn ccf(&self) -> &RunningCcf {
        self.ccf.as_ref().expect("CCF running")
    }
    pub fn gw(&self) -> &RunningGateway {
        self.gw.as_ref().expect("gateway running")
    }
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_string()
    }
    /// What a client of this domain's CCF expects its certificate to name.
    pub fn ccf_peer(&self) -> ExpectedPeer {
        ExpectedPeer::ccf(&CcfId::new(self.id.clone()).unwrap())
    }
    /// What a client of this domain's gateway expects its certificate to name.
    pub fn gw_peer(&self) -> ExpectedPeer {
        ExpectedPeer::gateway(&CcfId::new(self.id.clone()).unwrap())
    }
    /// What a client of this domain's AEF `aef` expects its certificate to name.
    pub fn aef_peer(&self, aef: &str) -> ExpectedPeer {
        ExpectedPeer::aef(
            &CcfId::new(self.id.clone()).unwrap(),
            &AefId::new(aef).unwrap(),
        )
    }
    pub fn issue(&self, role: Role) -> IssuedCredential {
        self.ca
            .issue_with_new_key(
                &PeerIdentity::new(CcfId::new(self.id.clone()).unwrap(), role),
                &["localhost".into(), "127.0.0.1".into()],
                1,
            )
            .unwrap()
    }

    pub async fn stop_gateway(&mut self) {
        if let Some(g) = self.gw.take() {
            g.shutdown().await;
        }
    }

    /// Ends the gateway as a crash would: its tasks aborted, nothing flushed beyond what it had
    /// committed; `start_gateway` then starts it again over the same state directory.
    pub fn crash_gateway(&mut self) {
        if let Some(g) = self.gw.take() {
            g.crash();
        }
    }

    pub async fn start_gateway(&mut self) {
        // The port may take a moment to be released by the previous instance.
        for _ in 0..50 {
            let started = match &self.gw_file {
                Some(f) => capif_gateway::server::start_from_file(f.clone(), None).await,
                None => capif_gateway::server::start(self.gw_config.clone()).await,
            };
            match started {
                Ok(g) => {
                    self.gw = Some(g);
                    return;
                }
                Err(e) => {
                    eprintln!("gateway restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("gateway of {} would not restart", self.id);
    }

    /// The `[[partner]]` block naming `partner` with the CA bundle at `ca`.
    pub fn partner_block(partner: &str, ca: &Path) -> String {
        format!(
            "\n[[partner]]\nccf_id = \"{partner}\"\nca_cert = \"{}\"\n",
            ca.display()
        )
    }

    /// Rewrites this domain's gateway file (a `reloadable` testbed) with `edit` applied to its
    /// text, atomically: a poll never reads half a file.
    pub fn edit_gateway_toml(&self, edit: impl FnOnce(String) -> String) {
        let f = self.gw_file.as_ref().expect("a reloadable testbed");
        let text = std::fs::read_to_string(f).unwrap();
        write_atomically(f, edit(text).as_bytes());
    }

    /// A GatewayAdmin client with an operator certificate of this domain.
    pub async fn gateway_admin(&self) -> pb::gateway_admin_client::GatewayAdminClient<Channel> {
        let op = self.issue(Role::Operator);
        pb::gateway_admin_client::GatewayAdminClient::new(
            channel(
                self.gw().capif6_addr,
                &self.ca_pem(),
                Some((&op.cert_pem, &op.key_pem)),
                self.gw_peer(),
            )
            .await,
        )
    }

    /// A certificate for this domain's gateway from `ca` (its own CA for a renewal, another
    /// for an interconnect identity), written to `<dir>/<name>.pem` and `.key`; returns the
    /// paths and the certificate.
    pub fn gateway_credential(
        &self,
        ca: &DomainCa,
        name: &str,
    ) -> (PathBuf, PathBuf, IssuedCredential) {
        let cred = ca
            .issue_with_new_key(
                &PeerIdentity::new(CcfId::new(self.id.clone()).unwrap(), Role::Gateway),
                &["localhost".into(), "127.0.0.1".into()],
                1,
            )
            .unwrap();
        let (cert, key) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        write_atomically(&cert, cred.cert_pem.as_bytes());
        write_atomically(&key, cred.key_pem.as_bytes());
        (cert, key, cred)
    }
}

/// Writes `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Testbeds of one test binary run one at a time: the timing assertions (deadlines, 1 s
/// revocation) must not compete with other testbeds for the 2 CI cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Testbed {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    pub tmp: tempfile::TempDir,
    pub domains: BTreeMap<String, Domain>,
    pub dns: Option<Dns>,
}

fn ccf_config(d: &Domain, o: &Options) -> CcfConfig {
    let mut aefs = String::new();
    for (i, (aef, owner)) in AEFS.iter().enumerate() {
        aefs += &format!(
            "[[aef]]\naef_id = \"{aef}\"\nccf_id = \"{owner}\"\ninterface = {{ fqdn = \"{aef}.{owner}\", port = {}, api_prefix = \"/api\" }}\nsecurity_methods = [\"PSK\", \"PKI\", \"OAUTH\"]\napis = [\"api-{aef}\", \"admin-{aef}\"]\n",
            8440 + i
        );
        if let Some(port) = d.aef_ports.get(*aef) {
            aefs += &format!("security_endpoint = \"127.0.0.1:{port}\"\n");
        }
    }
    let _ = o;
    let text = format!(
        r#"
ccf_id = "{id}"
state_dir = "{dir}"
[listen]
onboarding = "127.0.0.1:0"
capif = "127.0.0.1:{ccf_port}"
[security]
aef_psk_validity_secs = {validity}
[onboarding]
credentials = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]
[gateway]
address = "127.0.0.1:{gw6}"
server_name = "localhost"
{aefs}{store}"#,
        store = crate::postgres::store_section(&d.dir.join("ccf")),
        id = d.id,
        dir = d.dir.join("ccf").display(),
        ccf_port = d.ccf_port,
        validity = o.validity_secs,
        gw6 = d.gw6_port,
    );
    CcfConfig::parse(&text, "test ccf config").unwrap()
}

fn gateway_toml(d: &Domain, all: &[(String, PathBuf, u16)], o: &Options) -> String {
    let mut partners = String::new();
    let listed =
        |id: &str| id != d.id && !o.not_partners.iter().any(|(x, y)| *x == d.id && *y == id);
    for (id, ca, port) in all.iter().filter(|(id, _, _)| listed(id)) {
        partners += &format!(
            "[[partner]]\nccf_id = \"{id}\"\nca_cert = \"{}\"\n",
            ca.display()
        );
        if !o.use_dns {
            partners += &format!("address = \"127.0.0.1:{port}\"\n");
        }
    }
    format!(
        r#"
ccf_id = "{id}"
state_dir = "{dir}/gateway-state"
[listen]
capif6 = "127.0.0.1:{gw6}"
capif6e = "127.0.0.1:{gw6e}"
[tls]
ca_cert = "{dir}/ca.pem"
cert = "{dir}/gateway.pem"
key = "{dir}/gateway.key"
[ccf]
address = "127.0.0.1:{ccf}"
[dns]
nameserver = "NAMESERVER"
timeout_ms = 500
[cache]
safety_margin_ms = {margin}
negative_ttl_ms = {neg}
[outbound]
default_timeout_ms = 2000
connect_timeout_ms = 500
fetch_rate_per_sec = {rate}
fetch_burst = {burst}
{extra}
{partners}{store}"#,
        store = crate::postgres::store_section(&d.dir.join("gateway-state")),
        extra = o.gateway_extra,
        rate = o.fetch_rate,
        burst = o.fetch_burst,
        id = d.id,
        gw6 = d.gw6_port,
        gw6e = d.gw6e_port,
        dir = d.dir.display(),
        ccf = d.ccf_port,
        margin = o.margin_ms,
        neg = o.negative_ttl_ms,
    )
}

impl Testbed {
    /// Builds and starts the federation.
    pub async fn start(o: Options) -> Self {
        Self::start_with_dns(o, |_| None).await
    }

    /// `srv_override(domain)` may point a domain's SRV record at another port.
    pub async fn start_with_dns(o: Options, srv_override: impl Fn(&str) -> Option<u16>) -> Self {
        let serial = SERIAL.lock().await;
        let tmp = tempfile::tempdir().unwrap();
        let mut domains = BTreeMap::new();
        for id in &o.domains {
            let dir = tmp.path().join(id);
            std::fs::create_dir_all(dir.join("ccf")).unwrap();
            let ca =
                DomainCa::load_or_generate(&CcfId::new(*id).unwrap(), &dir.join("ccf"), None, None)
                    .unwrap();
            std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
            let d = Domain {
                id: id.to_string(),
                dir: dir.clone(),
                ca,
                ccf: None,
                gw: None,
                gw_config: GatewayConfig::parse(
                    "ccf_id = \"x.test\"\n[tls]\nca_cert=\"\"\ncert=\"\"\nkey=\"\"\n[ccf]\naddress=\"\"\n",
                    "placeholder",
                )
                .unwrap(),
                gw_file: None,
                ccf_port: free_port(),
                gw6_port: free_port(),
                gw6e_port: free_port(),
                aef_ports: if o.with_aefs {
                    AEFS.iter()
                        .filter(|(_, owner)| owner == id)
                        .map(|(aef, _)| (aef.to_string(), free_port()))
                        .collect()
                } else {
                    BTreeMap::new()
                },
                aefs: BTreeMap::new(),
            };
            let cred = d.issue(Role::Gateway);
            std::fs::write(dir.join("gateway.pem"), &cred.cert_pem).unwrap();
            std::fs::write(dir.join("gateway.key"), cred.key_pem.as_bytes()).unwrap();
            domains.insert(id.to_string(), d);
        }
        let all: Vec<(String, PathBuf, u16)> = domains
            .values()
            .map(|d| (d.id.clone(), d.dir.join("ca.pem"), d.gw6e_port))
            .collect();
        let srv: Vec<(String, u16)> = domains
            .values()
            .map(|d| (d.id.clone(), srv_override(&d.id).unwrap_or(d.gw6e_port)))
            .collect();
        let dns = if o.use_dns {
            Some(Dns::start(&srv).await.expect("DNS server"))
        } else {
            None
        };
        for d in domains.values_mut() {
            let text = match &dns {
                Some(n) => gateway_toml(d, &all, &o).replace("NAMESERVER", &n.addr.to_string()),
                None => gateway_toml(d, &all, &o).replace("nameserver = \"NAMESERVER\"", ""),
            };
            d.gw_config = GatewayConfig::parse(&text, "test gateway config").unwrap();
            if o.reloadable {
                let f = d.dir.join("gateway.toml");
                write_atomically(&f, text.as_bytes());
                d.gw_file = Some(f);
            }
            let ccf = capif_ccf::server::start(ccf_config(d, &o)).await.unwrap();
            crate::postgres::assert_backend(&ccf);
            d.ccf = Some(ccf);
            d.start_gateway().await;
            if let Some(gw) = &d.gw {
                assert_eq!(
                    gw.state.store.backend(),
                    crate::postgres::expected_backend(),
                    "the harness's gateway is on the wrong store"
                );
            }
            for (aef, port) in d.aef_ports.clone() {
                let cred = d.issue(Role::Aef(AefId::new(aef.clone()).unwrap()));
                let (cert, key) = (
                    d.dir.join(format!("{aef}.pem")),
                    d.dir.join(format!("{aef}.key")),
                );
                std::fs::write(&cert, &cred.cert_pem).unwrap();
                std::fs::write(&key, cred.key_pem.as_bytes()).unwrap();
                let text = format!(
                    "aef_id = \"{aef}\"\nccf_id = \"{id}\"\napis = [\"api-{aef}\", \"admin-{aef}\"]\n\
                     [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                     [ccf]\naddress = \"{ccf}\"\n\
                     [listen]\nsecurity = \"127.0.0.1:{port}\"\npsk = \"127.0.0.1:0\"\ntls = \"127.0.0.1:0\"\n{extra}",
                    extra = o.aef_extra,
                    id = d.id,
                    ca = d.dir.join("ca.pem").display(),
                    cert = cert.display(),
                    key = key.display(),
                    ccf = d.ccf().capif_addr,
                );
                let cfg = aef_stub::config::AefConfig::parse(&text, "test aef config").unwrap();
                d.aefs
                    .insert(aef, aef_stub::server::start(cfg).await.unwrap());
            }
        }
        Self {
            _serial: serial,
            tmp,
            domains,
            dns,
        }
    }

    pub fn d(&self, id: &str) -> &Domain {
        &self.domains[id]
    }
    pub fn d_mut(&mut self, id: &str) -> &mut Domain {
        self.domains.get_mut(id).unwrap()
    }
}

/// A client channel to `addr`, accepting only a server whose certificate names `expected`.
pub async fn channel(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    expected: ExpectedPeer,
) -> Channel {
    let cfg = client_config(ca_pem, identity, expected).unwrap();
    connect(&addr.to_string(), "localhost", cfg, Duration::from_secs(5))
        .await
        .unwrap()
        .0
}

/// An invoker onboarded at its home domain, with a CAPIF-1e session.
pub struct Invoker {
    pub id: String,
    pub home: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub security: SecurityClient<Channel>,
    pub slot: SessionSlot,
}

pub async fn onboard(d: &Domain, credential: &str) -> Invoker {
    let ch = channel(d.ccf().onboarding_addr, &d.ca_pem(), None, d.ccf_peer()).await;
    let inv = crate::ccf::onboard_over(ch, credential)
        .await
        .expect("onboarding");
    let (security, slot) = capif1e_session(d, &inv.cert_pem, &inv.key_pem).await;
    Invoker {
        id: inv.id,
        home: d.id.clone(),
        cert_pem: inv.cert_pem,
        key_pem: inv.key_pem,
        security,
        slot,
    }
}

/// A new CAPIF-1e TLS session at `d`'s CCF with the invoker's certificate.
async fn capif1e_session(
    d: &Domain,
    cert_pem: &str,
    key_pem: &str,
) -> (SecurityClient<Channel>, SessionSlot) {
    let cfg = client_config(&d.ca_pem(), Some((cert_pem, key_pem)), d.ccf_peer()).unwrap();
    let (ch, slot) = connect(
        &d.ccf().capif_addr.to_string(),
        "localhost",
        cfg,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    (SecurityClient::new(ch), slot)
}

impl Invoker {
    /// The same invoker on a new CAPIF-1e TLS session (re-authentication: a new AEFPSK).
    pub async fn new_session(&self, d: &Domain) -> Invoker {
        let (security, slot) = capif1e_session(d, &self.cert_pem, &self.key_pem).await;
        Invoker {
            id: self.id.clone(),
            home: self.home.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            security,
            slot,
        }
    }

    /// Obtains PSK for `aef` over CAPIF-1e; returns the AEFPSK the invoker derived (hex) and its key id.
    pub async fn obtain_psk(&mut self, aef: &str) -> (Vec<u8>, String) {
        let rsp = self
            .security
            .obtain_security_method(pb::ObtainSecurityMethodRequest {
                api_invoker_id: self.id.clone(),
                service_security: Some(pb::ServiceSecurity {
                    security_info: vec![pb::SecurityInformation {
                        aef_id: aef.into(),
                        pref_security_methods: vec![pb::SecurityMethod::Psk as i32],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            })
            .await
            .expect("obtain security method")
            .into_inner();
        let info = &rsp.security_info[0];
        let binding = self.slot.lock().unwrap().binding.clone().unwrap();
        let psk = binding.aefpsk(&info.interface_canonical).unwrap();
        assert_eq!(psk.key_id(), info.aef_psk_key_id);
        (psk.expose().to_vec(), psk.key_id())
    }
}

/// An AEF of `d` talking CAPIF-3 to its CCF.
pub async fn aef(d: &Domain, aef: &str) -> SecurityClient<Channel> {
    let cred = d.issue(Role::Aef(AefId::new(aef).unwrap()));
    SecurityClient::new(
        channel(
            d.ccf().capif_addr,
            &d.ca_pem(),
            Some((&cred.cert_pem, &cred.key_pem)),
            d.ccf_peer(),
        )
        .await,
    )
}

pub async fn ask(
    c: &mut SecurityClient<Channel>,
    aef: &str,
    inv: &str,
    home: &str,
    presented_key_id: &str,
    timeout: Duration,
) -> Result<pb::InvokerSecurityInformation, tonic::Status> {
    let mut r = tonic::Request::new(pb::GetSecurityInformationRequest {
        api_invoker_id: inv.into(),
        aef_id: aef.into(),
        home_ccf_id: home.into(),
        authentication_info: true,
        authorization_info: true,
        presented_key_id: presented_key_id.into(),
        security_method: 0,
    });
    r.set_timeout(timeout);
    c.get_security_information(r).await.map(|r| r.into_inner())
}

pub fn reason(s: &tonic::Status) -> String {
    ccf_core::grpc::error_reason(s)
        .unwrap_or_else(|| format!("<no reason: {:?} {}>", s.code(), s.message()))
}

/// The testbed's DNS server (the same one `capif testbed up` runs).
pub use capif_scenarios::dns::DnsServer as Dns;

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Onboards an invoker profile (the `capif invoker` client library) at `home` with
/// `credential`; it lives in the testbed's temporary directory.
pub async fn profile(
    t: &Testbed,
    home: &str,
    credential: &str,
) -> capif_scenarios::invoker::Profile {
    let d = t.d(home);
    capif_scenarios::invoker::onboard(
        &d.ccf().onboarding_addr.to_string(),
        &d.ccf().capif_addr.to_string(),
        &d.ca_pem(),
        "localhost",
        credential,
        &t.tmp.path().join(format!("{home}-{credential}")),
    )
    .await
    .expect("onboarding")
}

/// The whole PSK flow of `p` at `aef` (owned by some domain of `t`), as the `capif invoker`
/// client runs it: a new CAPIF-1e session and key at home, Authentication Initiation at the AEF
/// (which fetches the key through the gateways when it holds another), the TLS-PSK handshake
/// and one call of `api`. The error keeps the step's message and reason.
pub async fn psk_flow(
    t: &Testbed,
    p: &capif_scenarios::invoker::Profile,
    aef: &str,
    api: &str,
) -> Result<pb::InvokeResponse, String> {
    use capif_scenarios::invoker;
    let owner = AEFS.iter().find(|(a, _)| *a == aef).expect("a known AEF").1;
    let d = t.d(owner);
    let addr = d.aefs[aef].security_addr.to_string();
    let k = invoker::security(p, aef, None)
        .await
        .map_err(|e| format!("security: {e:#}"))?;
    let a = invoker::auth(
        p,
        Some(&k),
        &addr,
        &d.ca_pem(),
        "localhost",
        &d.aef_peer(aef),
    )
    .await
    .map_err(|e| format!("auth: {e:#}"))?;
    invoker::call(p, &k, &a.tls_endpoint, api, Default::default())
        .await
        .map_err(|e| format!("call: {e:#}"))
}
