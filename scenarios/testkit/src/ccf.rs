//! Test harness: a CCF on loopback in a temporary state directory, and the clients that talk to
//! it the way real invokers, AEFs and gateways do (real TLS, real certificates).

use std::sync::Arc;
use std::time::Duration;

use capif_ccf::config::CcfConfig;
use capif_ccf::server::RunningCcf;
use capif_proto::v1::{
    self as pb, invoker_management_client::InvokerManagementClient, security_client::SecurityClient,
};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, CcfId};
use ccf_core::kdf::Capif1eProfile;
use ccf_core::pki::IssuedCredential;
use ccf_core::tls::{ExpectedPeer, SessionSlot, client_config, connect};
use tonic::transport::Channel;

pub const CCF: &str = "operator-a.test";
pub const CREDENTIALS: [&str; 3] = ["cred-one", "cred-two", "cred-three"];

pub fn config_text(dir: &std::path::Path, validity_secs: u64) -> String {
    config_text_profile(dir, validity_secs, Capif1eProfile::Tls13Exporter)
}

/// [`config_text`] for a domain of CAPIF-1e profile `profile` (with `tls12-annex-a`, its TLS 1.2
/// CAPIF-1e listener on a free port too).
pub fn config_text_profile(
    dir: &std::path::Path,
    validity_secs: u64,
    profile: Capif1eProfile,
) -> String {
    let capif1e = match profile {
        Capif1eProfile::Tls13Exporter => "",
        Capif1eProfile::Tls12AnnexA => "capif1e = \"127.0.0.1:0\"",
    };
    format!(
        r#"
ccf_id = "{CCF}"
state_dir = "{dir}"
[listen]
onboarding = "127.0.0.1:0"
capif = "127.0.0.1:0"
{capif1e}
[security]
aef_psk_validity_secs = {validity_secs}
capif1e = "{profile}"
[onboarding]
credentials = ["cred-one", "cred-two", "cred-three"]
[[aef]]
aef_id = "aef-weather"
interface = {{ fqdn = "aef-weather.operator-a.test", port = 8443, api_prefix = "/weather" }}
security_methods = ["PSK", "PKI"]
apis = ["weather-v1", "forecast-v1"]
[[aef]]
aef_id = "aef-location"
interface = {{ ipv4_addr = "127.0.0.1", port = 9443 }}
security_methods = ["PSK"]
apis = ["location-v1"]
[[aef]]
aef_id = "aef-b-maps"
ccf_id = "operator-b.test"
interface = {{ fqdn = "aef-maps.operator-b.test", port = 8443, api_prefix = "/maps" }}
security_methods = ["PSK"]
apis = ["maps-v1"]
{store}"#,
        dir = dir.display(),
        store = crate::postgres::store_section(dir),
    )
}

pub fn config(dir: &std::path::Path, validity_secs: u64) -> CcfConfig {
    CcfConfig::parse(&config_text(dir, validity_secs), "test config").expect("test config parses")
}

/// [`config`] on the redb store whatever `CAPIF_TEST_STORE` says: for the tests of the redb
/// file itself (its mode, its path in the state directory).
pub fn redb_config(dir: &std::path::Path, validity_secs: u64) -> CcfConfig {
    let mut c = config(dir, validity_secs);
    c.store = ccf_core::pg::StoreConfig::default();
    c
}

pub struct TestCcf {
    pub ccf: RunningCcf,
    pub dir: tempfile::TempDir,
}

pub async fn start(validity_secs: u64) -> TestCcf {
    start_profile(validity_secs, Capif1eProfile::Tls13Exporter).await
}

/// [`start`] for a domain of CAPIF-1e profile `profile`.
pub async fn start_profile(validity_secs: u64, profile: Capif1eProfile) -> TestCcf {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text_profile(dir.path(), validity_secs, profile);
    let config = CcfConfig::parse(&text, "test config").expect("test config parses");
    let ccf = capif_ccf::server::start(config).await.expect("CCF starts");
    crate::postgres::assert_backend(&ccf);
    TestCcf { ccf, dir }
}

impl TestCcf {
    pub fn ca_pem(&self) -> String {
        self.ccf.ca_pem().to_string()
    }

    /// A certificate for any identity of this domain, issued by the CCF's own CA.
    pub fn issue(&self, role: Role) -> IssuedCredential {
        self.ccf
            .state
            .ca
            .issue_with_new_key(&PeerIdentity::new(CcfId::new(CCF).unwrap(), role), &[], 1)
            .expect("issue")
    }

    pub fn aef_cred(&self, aef: &str) -> IssuedCredential {
        self.issue(Role::Aef(AefId::new(aef).unwrap()))
    }
}

pub async fn channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<(Channel, SessionSlot), ccf_core::tls::TlsError> {
    // Every client of these tests calls the one CCF under test.
    let expected = ExpectedPeer::ccf(&CcfId::new(CCF).unwrap());
    let cfg = client_config(ca_pem, identity, expected).expect("client config");
    connect(&addr.to_string(), "localhost", cfg, Duration::from_secs(5)).await
}

/// An onboarded invoker: its key pair, certificate and id.
pub struct Invoker {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub async fn onboard(t: &TestCcf, credential: &str) -> Result<Invoker, tonic::Status> {
    let (ch, _) = channel(t.ccf.onboarding_addr, &t.ca_pem(), None)
        .await
        .expect("onboarding channel");
    onboard_over(ch, credential).await
}

/// Onboards a new invoker (a fresh key pair) with `credential` over an onboarding channel: the
/// one onboarding of the harness, for one CCF and for a federation's domains alike.
pub async fn onboard_over(ch: Channel, credential: &str) -> Result<Invoker, tonic::Status> {
    let key = rcgen::KeyPair::generate().expect("key");
    let rsp = InvokerManagementClient::new(ch)
        .onboard(pb::OnboardRequest {
            onboarding_information: Some(pb::OnboardingInformation {
                api_invoker_public_key: key.public_key_pem(),
                onboarding_credential: credential.to_string(),
            }),
            notification_destination: "https://invoker.example/notify".into(),
            api_invoker_information: "test invoker".into(),
        })
        .await?
        .into_inner();
    Ok(Invoker {
        id: rsp.api_invoker_id,
        cert_pem: rsp.api_invoker_certificate,
        key_pem: key.serialize_pem(),
    })
}

/// A CAPIF-1e session of an invoker: the channel and the client side of its TLS binding.
pub struct Session {
    pub security: SecurityClient<Channel>,
    pub slot: SessionSlot,
}

pub async fn capif1e(t: &TestCcf, inv: &Invoker) -> Session {
    let (ch, slot) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&inv.cert_pem, &inv.key_pem)),
    )
    .await
    .expect("CAPIF-1e channel");
    Session {
        security: SecurityClient::new(ch),
        slot,
    }
}

/// A CAPIF-1e session of an invoker on the TLS 1.2 listener of a `tls12-annex-a` domain.
pub async fn capif1e_tls12(t: &TestCcf, inv: &Invoker) -> Session {
    let client = ccf_core::tls12::client_context(
        &t.ca_pem(),
        &inv.cert_pem,
        &inv.key_pem,
        ExpectedPeer::ccf(&CcfId::new(CCF).unwrap()),
    )
    .expect("client context");
    let (ch, slot) = ccf_core::tls12::connect(
        &t.ccf.capif1e_addr.to_string(),
        "localhost",
        &client,
        Duration::from_secs(5),
    )
    .await
    .expect("CAPIF-1e TLS 1.2 channel");
    Session {
        security: SecurityClient::new(ch),
        slot,
    }
}

impl Session {
    pub fn binding(&self) -> Arc<ccf_core::kdf::Capif1eBinding> {
        self.slot
            .lock()
            .unwrap()
            .binding
            .clone()
            .expect("binding recorded at connect")
    }

    pub async fn obtain(
        &mut self,
        inv: &Invoker,
        aefs: &[&str],
    ) -> Result<pb::ServiceSecurity, tonic::Status> {
        self.security
            .obtain_security_method(pb::ObtainSecurityMethodRequest {
                api_invoker_id: inv.id.clone(),
                service_security: Some(pb::ServiceSecurity {
                    security_info: aefs
                        .iter()
                        .map(|a| pb::SecurityInformation {
                            aef_id: a.to_string(),
                            pref_security_methods: vec![pb::SecurityMethod::Psk as i32],
                            ..Default::default()
                        })
                        .collect(),
                    notification_destination: "https://invoker.example/notify".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// A CAPIF-3 client for an AEF of the test domain.
pub async fn aef_client(t: &TestCcf, aef: &str) -> SecurityClient<Channel> {
    let cred = t.aef_cred(aef);
    let (ch, _) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&cred.cert_pem, &cred.key_pem)),
    )
    .await
    .expect("AEF channel");
    SecurityClient::new(ch)
}

pub async fn get_info(
    c: &mut SecurityClient<Channel>,
    invoker: &str,
    aef: &str,
) -> Result<pb::InvokerSecurityInformation, tonic::Status> {
    c.get_security_information(pb::GetSecurityInformationRequest {
        api_invoker_id: invoker.into(),
        aef_id: aef.into(),
        home_ccf_id: String::new(),
        authentication_info: true,
        authorization_info: true,
        presented_key_id: String::new(),
        security_method: 0,
    })
    .await
    .map(|r| r.into_inner())
}

pub fn reason(s: &tonic::Status) -> String {
    ccf_core::grpc::error_reason(s).unwrap_or_else(|| format!("<no reason; {s:?}>"))
}

/// A `ccf` process started from the real binary; killed when dropped.
pub struct CcfProcess {
    pub child: std::process::Child,
    pub onboarding: std::net::SocketAddr,
    pub capif: std::net::SocketAddr,
    /// Where invokers run CAPIF-1e (the TLS 1.2 listener with `tls12-annex-a`).
    pub capif1e: std::net::SocketAddr,
}

impl CcfProcess {
    /// Starts the `ccf` binary at `bin` (a test passes `env!("CARGO_BIN_EXE_ccf")`).
    pub fn spawn(bin: &std::path::Path, config_path: &std::path::Path) -> Self {
        Self::spawn_with_env(bin, config_path, &[])
    }

    /// [`Self::spawn`] with these environment variables set for the process.
    pub fn spawn_with_env(
        bin: &std::path::Path,
        config_path: &std::path::Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--config"])
            .arg(config_path)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ccf starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| -> std::net::SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in ready line {line:?}"))
                .parse()
                .unwrap()
        };
        Self {
            onboarding: field("onboarding"),
            capif: field("capif"),
            capif1e: field("capif1e"),
            child,
        }
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for CcfProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TestCcf-like view of a process, so the same client helpers work against it.
pub fn process_view(p: &CcfProcess, state_dir: &std::path::Path) -> ProcessView {
    let ca = DomainCaHandle::load(state_dir);
    ProcessView {
        onboarding: p.onboarding,
        capif: p.capif,
        ca,
    }
}

pub struct DomainCaHandle(ccf_core::pki::DomainCa);

impl DomainCaHandle {
    pub fn load(state_dir: &std::path::Path) -> Self {
        Self(
            ccf_core::pki::DomainCa::load_or_generate(
                &CcfId::new(CCF).unwrap(),
                state_dir,
                None,
                None,
            )
            .expect("CA in state dir"),
        )
    }
}

pub struct ProcessView {
    pub onboarding: std::net::SocketAddr,
    pub capif: std::net::SocketAddr,
    pub ca: DomainCaHandle,
}

impl ProcessView {
    pub fn ca_pem(&self) -> String {
        self.ca.0.cert_pem().to_string()
    }
    pub fn issue(&self, role: Role) -> IssuedCredential {
        self.ca
            .0
            .issue_with_new_key(
                &PeerIdentity::new(CcfId::new(CCF).unwrap(), role),
                &["127.0.0.1".into()],
                1,
            )
            .unwrap()
    }
}
