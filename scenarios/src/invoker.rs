//! The API invoker, as a library (`capif invoker ...` is a thin CLI over it): onboarding into a
//! profile directory, CAPIF-1e security method with AEFPSK derivation (the CCF's own KDF module,
//! `ccf_core::kdf`) by the home domain's CAPIF-1e profile (rustls TLS 1.3 `tls13-exporter`, or
//! OpenSSL TLS 1.2 `tls12-annex-a` through `ccf_core::tls12`; the CCF's answer must name the
//! same), Authentication Initiation at the AEF, and a TLS-PSK call of the AEF's demo API (the AEF
//! stub's own PSK client).
//!
//! Profile directory: `profile.toml` (ids and addresses), `invoker.pem`, `invoker.key` (0600),
//! `ca.pem` (home domain CA), and `keys/<aef-id>.toml` (0600: AEFPSK, key id, expiry).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use capif_2e::identity::PskIdentity;
use capif_2e::psk::{TlsProfile, demo_channel};
use capif_proto::v1::{
    self as pb, aef_security_client::AefSecurityClient, demo_api_client::DemoApiClient,
    invoker_management_client::InvokerManagementClient, security_client::SecurityClient,
};
use ccf_core::clock::now_ms;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::{AefPsk, Capif1eProfile};
use ccf_core::pki::write_private_file;
use ccf_core::telemetry::TracedChannel;
use ccf_core::tls::{ExpectedPeer, SessionSlot, client_config, connect};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use zeroize::Zeroizing;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `profile.toml` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileFile {
    /// The invoker's id.
    pub api_invoker_id: String,
    /// Its home CCF.
    pub ccf_id: String,
    /// host:port of the home CCF's CAPIF-1e listener.
    pub capif_addr: String,
    /// Name in the CCF's certificate.
    pub ccf_server_name: String,
    /// The home domain's CAPIF-1e profile, which this invoker derives AEFPSKs by: TLS 1.3 and
    /// `tls13-exporter` (default), or TLS 1.2 and `tls12-annex-a` (`capif_addr` is then the
    /// CCF's TLS 1.2 CAPIF-1e listener).
    #[serde(default)]
    pub capif1e: Capif1eProfile,
    /// host:port of the home CCF's other replicas (same CAPIF-1e profile), tried in order when
    /// `capif_addr` cannot be reached. Absent from profiles of a CCF without replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capif_alternates: Vec<String>,
}

/// An onboarded invoker's profile.
pub struct Profile {
    /// Where it lives.
    pub dir: PathBuf,
    /// Ids and addresses.
    pub file: ProfileFile,
    ca_pem: String,
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Profile({}, {:?})", self.file.api_invoker_id, self.dir)
    }
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// A key obtained for one AEF, as stored in the profile.
#[derive(Serialize, Deserialize)]
pub struct ObtainedKey {
    /// The AEF.
    pub aef_id: String,
    /// The AEFPSK in hex. Secret (file mode 0600).
    pub aef_psk_hex: String,
    /// Its key id.
    pub key_id: String,
    /// The canonical interface string it is bound to.
    pub interface: String,
    /// When it expires, Unix ms.
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for ObtainedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObtainedKey({}, key_id={}, <redacted>)",
            self.aef_id, self.key_id
        )
    }
}

impl Drop for ObtainedKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.aef_psk_hex);
    }
}

impl ObtainedKey {
    /// The AEFPSK.
    pub fn psk(&self) -> Result<AefPsk> {
        let bytes =
            Zeroizing::new(hex::decode(&self.aef_psk_hex).context("stored AEFPSK is not hex")?);
        AefPsk::from_slice(&bytes).ok_or_else(|| anyhow!("stored AEFPSK has the wrong length"))
    }
}

impl Profile {
    /// Loads a profile directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let file: ProfileFile = toml::from_str(&read(&dir.join("profile.toml"))?)
            .with_context(|| format!("{}/profile.toml", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            ca_pem: read(&dir.join("ca.pem"))?,
            cert_pem: read(&dir.join("invoker.pem"))?,
            key_pem: Zeroizing::new(read(&dir.join("invoker.key"))?),
        })
    }

    /// The invoker's id.
    pub fn id(&self) -> &str {
        &self.file.api_invoker_id
    }

    fn key_path(&self, aef: &str) -> Result<PathBuf> {
        let aef = AefId::new(aef)?;
        Ok(self.dir.join("keys").join(format!("{aef}.toml")))
    }

    /// The home CCF, as its certificate must name it: `capif://<home>/ccf`.
    pub fn home_ccf(&self) -> Result<ExpectedPeer> {
        Ok(ExpectedPeer::ccf(&CcfId::new(self.file.ccf_id.clone())?))
    }

    /// A new CAPIF-1e (mutual TLS) channel to the home CCF.
    pub async fn capif1e_channel(&self) -> Result<TracedChannel> {
        Ok(self.capif1e_session().await?.0)
    }

    /// A new CAPIF-1e session with the home CCF, by the profile's CAPIF-1e profile (rustls TLS
    /// 1.3, or OpenSSL TLS 1.2): the channel, and the slot that holds the session's binding.
    /// Its secrets go to `SSLKEYLOGFILE` when that is set. The handshake is a client span
    /// `capif.capif1e_handshake` of the current trace.
    ///
    /// A replica that cannot be reached (connection or handshake failed) is passed over for the
    /// next of `capif_alternates`; the last failure is returned when none answers.
    pub async fn capif1e_session(&self) -> Result<(TracedChannel, SessionSlot)> {
        let mut last = None;
        for addr in std::iter::once(&self.file.capif_addr).chain(&self.file.capif_alternates) {
            match self.capif1e_session_at(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the profile names no CCF address")))
    }

    async fn capif1e_session_at(&self, addr: &str) -> Result<(TracedChannel, SessionSlot)> {
        let span = tracing::info_span!(
            "capif.capif1e_handshake",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            server.address = addr,
            capif.outcome = tracing::field::Empty,
            capif.profile = %self.file.capif1e,
        );
        let r = self.capif1e_connect(addr).instrument(span.clone()).await;
        span.record(
            "capif.outcome",
            if r.is_ok() { "accepted" } else { "refused" },
        );
        if r.is_err() {
            span.record("otel.status_code", "error");
        }
        let (ch, slot) = r?;
        Ok((TracedChannel::new(ch, addr), slot))
    }

    async fn capif1e_connect(
        &self,
        addr: &str,
    ) -> Result<(tonic::transport::Channel, SessionSlot)> {
        match self.file.capif1e {
            Capif1eProfile::Tls13Exporter => {
                let cfg = ccf_core::keylog::rustls_client(client_config(
                    &self.ca_pem,
                    Some((&self.cert_pem, &self.key_pem)),
                    self.home_ccf()?,
                )?);
                Ok(connect(addr, &self.file.ccf_server_name, cfg, CONNECT_TIMEOUT).await?)
            }
            Capif1eProfile::Tls12AnnexA => {
                let ctx = ccf_core::tls12::client_context(
                    &self.ca_pem,
                    &self.cert_pem,
                    &self.key_pem,
                    self.home_ccf()?,
                )?;
                Ok(ccf_core::tls12::connect(
                    addr,
                    &self.file.ccf_server_name,
                    &ctx,
                    CONNECT_TIMEOUT,
                )
                .await?)
            }
        }
    }

    /// The key stored for `aef`.
    pub fn key(&self, aef: &str) -> Result<ObtainedKey> {
        let p = self.key_path(aef)?;
        let text =
            Zeroizing::new(read(&p).with_context(|| {
                format!("no key for {aef}: run `capif invoker security` first")
            })?);
        toml::from_str(&text).with_context(|| p.display().to_string())
    }
}

/// Onboards at a CCF (TLS with server authentication): makes a key pair, sends the public key
/// and the credential, writes the profile (CAPIF-1e profile `tls13-exporter`).
pub async fn onboard(
    onboarding_addr: &str,
    capif_addr: &str,
    ca_pem: &str,
    server_name: &str,
    credential: &str,
    dir: &Path,
) -> Result<Profile> {
    onboard_profile(
        onboarding_addr,
        capif_addr,
        ca_pem,
        server_name,
        credential,
        dir,
        Capif1eProfile::default(),
    )
    .await
}

/// [`onboard`] into a home domain of CAPIF-1e profile `capif1e`; `capif_addr` is where the
/// domain runs CAPIF-1e (with `tls12-annex-a`, the CCF's TLS 1.2 listener).
pub async fn onboard_profile(
    onboarding_addr: &str,
    capif_addr: &str,
    ca_pem: &str,
    server_name: &str,
    credential: &str,
    dir: &Path,
    capif1e: Capif1eProfile,
) -> Result<Profile> {
    let key = rcgen::KeyPair::generate()?;
    // The home domain is not known before the answer: any CCF the CA vouches for, and then the
    // answer must name the domain its certificate named.
    let (ch, slot) = connect(
        onboarding_addr,
        server_name,
        client_config(ca_pem, None, ExpectedPeer::AnyCcf)?,
        CONNECT_TIMEOUT,
    )
    .await?;
    let rsp = InvokerManagementClient::new(TracedChannel::new(ch, onboarding_addr))
        .onboard(pb::OnboardRequest {
            onboarding_information: Some(pb::OnboardingInformation {
                api_invoker_public_key: key.public_key_pem(),
                onboarding_credential: credential.to_string(),
            }),
            notification_destination: String::new(),
            api_invoker_information: "capif invoker".into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let certified = slot
        .lock()
        .map_err(|_| anyhow!("session slot poisoned"))?
        .server_identity
        .clone()
        .ok_or_else(|| anyhow!("the onboarding session recorded no server identity"))?;
    if rsp.ccf_id != certified.ccf_id.as_str() {
        bail!(
            "the CCF answered ccf_id {:?}, but its certificate names {certified}",
            rsp.ccf_id
        );
    }
    std::fs::create_dir_all(dir.join("keys"))?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    write_private_file(&dir.join("invoker.key"), key_pem.as_bytes())?;
    std::fs::write(dir.join("invoker.pem"), &rsp.api_invoker_certificate)?;
    std::fs::write(dir.join("ca.pem"), rsp.ca_certificates.concat())?;
    let file = ProfileFile {
        api_invoker_id: rsp.api_invoker_id,
        ccf_id: rsp.ccf_id,
        capif_addr: capif_addr.to_string(),
        ccf_server_name: server_name.to_string(),
        capif1e,
        capif_alternates: Vec::new(),
    };
    write_profile_file(dir, &file)?;
    Profile::load(dir)
}

/// Writes `profile.toml` (ids and addresses; nothing secret).
pub fn write_profile_file(dir: &Path, file: &ProfileFile) -> Result<()> {
    let path = dir.join("profile.toml");
    std::fs::write(&path, toml::to_string(file)?).with_context(|| path.display().to_string())
}

/// A gRPC error a peer answered, kept typed so callers (the scenario runner) can match its code
/// and reason.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}{}: {message}", if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
pub struct StatusError {
    /// The gRPC code.
    pub code: tonic::Code,
    /// The ErrorInfo reason, or empty.
    pub reason: String,
    /// The message.
    pub message: String,
}

/// A status as an error a person reads: code, reason and message.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    StatusError {
        code: s.code(),
        reason: ccf_core::grpc::error_reason(&s).unwrap_or_default(),
        message: s.message().to_string(),
    }
    .into()
}

/// CAPIF-1e: obtains PSK for `aef` (optionally for one API only) on a NEW TLS session, derives
/// the AEFPSK from it and stores it.
pub async fn security(profile: &Profile, aef: &str, api: Option<&str>) -> Result<ObtainedKey> {
    Ok(obtain_psk(profile, aef, api).await?.0)
}

/// What anyone needs, besides the key's inputs from the TLS stack, to recompute an AEFPSK: the
/// CAPIF-1e profile and P1 of the session (not secret; docs/PROTOCOL.md 4.6).
#[derive(Clone, Debug)]
pub struct Capif1eSessionInfo {
    /// The profile the key was derived by.
    pub profile: Capif1eProfile,
    /// P1 in hex: the TLS session ID (`tls12-annex-a`) or the exporter value standing in for it.
    pub session_id_hex: String,
}

/// [`security`], also returning the session's [`Capif1eSessionInfo`].
pub async fn security_with_session(
    profile: &Profile,
    aef: &str,
    api: Option<&str>,
) -> Result<(ObtainedKey, Capif1eSessionInfo)> {
    let (key, _, session) = obtain_psk(profile, aef, api).await?;
    Ok((key, session))
}

/// Whether the CCF's answer names the derivation this invoker is configured for: a key derived
/// by another profile is not the one the invoker would hold.
pub fn check_derivation(configured: Capif1eProfile, answered: i32) -> Result<()> {
    match Capif1eProfile::from_proto(answered) {
        Some(p) if p == configured => Ok(()),
        Some(p) => bail!(
            "the CCF derived the AEFPSK by CAPIF-1e profile {p}, but this invoker is configured \
             for {configured} (capif1e in profile.toml): the two ends would hold different keys. \
             Onboard with --capif1e {p} and the address of the domain's CAPIF-1e listener"
        ),
        None => bail!(
            "the CCF's answer does not say by which CAPIF-1e profile it derived the AEFPSK \
             (aef_psk_derivation is unset); this invoker derives by {configured} and cannot tell \
             whether both ends hold the same key"
        ),
    }
}

/// The AEF an invoker expects at an AEF's endpoints: `capif://<domain>/aef/<aef>`.
pub fn expected_aef(domain: &str, aef: &str) -> Result<ExpectedPeer> {
    Ok(ExpectedPeer::aef(&CcfId::new(domain)?, &AefId::new(aef)?))
}

/// The AEF as the home CCF's answer places it: the asked id, in the domain the CCF names as its
/// owner (the invoker trusts its home CCF's registry for this, as for the interface).
fn aef_of_answer(aef: &str, info: &pb::SecurityInformation) -> Result<ExpectedPeer> {
    expected_aef(&info.aef_ccf_id, aef)
        .with_context(|| format!("the CCF's answer names no usable owner domain for {aef}"))
}

/// [`security`], also returning the AEF identity the answer implies ([`aef_of_answer`]) and
/// the session's [`Capif1eSessionInfo`].
async fn obtain_psk(
    profile: &Profile,
    aef: &str,
    api: Option<&str>,
) -> Result<(ObtainedKey, ExpectedPeer, Capif1eSessionInfo)> {
    let (ch, slot) = profile.capif1e_session().await?;
    let rsp = SecurityClient::new(ch)
        .obtain_security_method(pb::ObtainSecurityMethodRequest {
            api_invoker_id: profile.id().to_string(),
            service_security: Some(pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation {
                    aef_id: aef.to_string(),
                    api_id: api.unwrap_or_default().to_string(),
                    pref_security_methods: vec![pb::SecurityMethod::Psk as i32],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let info = rsp
        .security_info
        .first()
        .ok_or_else(|| anyhow!("the CCF answered no security information"))?;
    if info.sel_security_method != pb::SecurityMethod::Psk as i32 {
        bail!(
            "the CCF selected {:?}, not PSK",
            pb::SecurityMethod::try_from(info.sel_security_method)
        );
    }
    check_derivation(profile.file.capif1e, info.aef_psk_derivation)?;
    let binding = slot
        .lock()
        .map_err(|_| anyhow!("session slot poisoned"))?
        .binding
        .clone()
        .ok_or_else(|| anyhow!("the CAPIF-1e session exported no binding"))?;
    // P0 from the interface the CCF returned, with the same code the CCF uses.
    let iface = ccf_core::registry::Interface::from_proto(
        info.interface_details
            .as_ref()
            .ok_or_else(|| anyhow!("no interface in the answer"))?,
    )
    .canonical()?;
    let psk = binding.aefpsk(&iface)?;
    if psk.key_id() != info.aef_psk_key_id {
        bail!(
            "derived key id {} differs from the CCF's {}: the two sides derived different keys",
            psk.key_id(),
            info.aef_psk_key_id
        );
    }
    let key = ObtainedKey {
        aef_id: aef.to_string(),
        aef_psk_hex: hex::encode(psk.expose()),
        key_id: psk.key_id(),
        interface: iface,
        expires_at_ms: now_ms() + info.aef_psk_validity_secs * 1000,
    };
    let expected = aef_of_answer(aef, info)?;
    let text = Zeroizing::new(toml::to_string(&key)?);
    std::fs::create_dir_all(profile.dir.join("keys"))?;
    write_private_file(&profile.key_path(aef)?, text.as_bytes())?;
    let session = Capif1eSessionInfo {
        profile: binding.profile(),
        session_id_hex: hex::encode(binding.session_id()),
    };
    Ok((key, expected, session))
}

/// Authentication Initiation at the AEF (server-authenticated TLS with the AEF domain's CA), for
/// PSK. `key` is the key the invoker holds for that AEF, if any (its key id lets the AEF detect a
/// stale key). `aef` is the identity the AEF's certificate must name ([`expected_aef`]).
pub async fn auth(
    profile: &Profile,
    key: Option<&ObtainedKey>,
    aef_addr: &str,
    aef_ca_pem: &str,
    aef_server_name: &str,
    aef: &ExpectedPeer,
) -> Result<pb::CheckAuthenticationRsp> {
    let key_id = key.map(|k| k.key_id.as_str()).unwrap_or_default();
    auth_method(
        profile,
        pb::SecurityMethod::Psk,
        key_id,
        aef_addr,
        aef_ca_pem,
        aef_server_name,
        aef,
    )
    .await
}

/// The PSK identity for a stored key.
pub fn psk_identity(profile: &Profile, key: &ObtainedKey) -> Result<PskIdentity> {
    Ok(PskIdentity {
        home_ccf_id: CcfId::new(profile.file.ccf_id.clone())?,
        api_invoker_id: ApiInvokerId::new(profile.id())?,
        key_id: key.key_id.clone(),
    })
}

/// TLS-PSK handshake with the AEF and one demo API call.
pub async fn call(
    profile: &Profile,
    key: &ObtainedKey,
    endpoint: &str,
    api: &str,
    tls: TlsProfile,
) -> Result<pb::InvokeResponse> {
    let psk = key.psk()?;
    let ch = demo_channel(endpoint, &psk_identity(profile, key)?, &psk, tls).await?;
    DemoApiClient::new(TracedChannel::new(ch, endpoint))
        .invoke(pb::InvokeRequest {
            api_name: api.to_string(),
            payload: "hello from the invoker".into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// The method names the CLI and scenario files use.
pub fn parse_method(s: &str) -> Result<pb::SecurityMethod> {
    match s.to_ascii_lowercase().as_str() {
        "psk" => Ok(pb::SecurityMethod::Psk),
        "pki" => Ok(pb::SecurityMethod::Pki),
        "oauth" => Ok(pb::SecurityMethod::Oauth),
        _ => bail!("unknown security method {s:?}: use psk, pki or oauth"),
    }
}

/// CAPIF-1e: obtains `method` (PKI or OAUTH; PSK is [`security`], which also derives the key)
/// for `aef`, optionally for one API only. Returns the CCF's answer for that AEF.
pub async fn negotiate(
    profile: &Profile,
    aef: &str,
    api: Option<&str>,
    method: pb::SecurityMethod,
) -> Result<pb::SecurityInformation> {
    let rsp = SecurityClient::new(profile.capif1e_channel().await?)
        .obtain_security_method(pb::ObtainSecurityMethodRequest {
            api_invoker_id: profile.id().to_string(),
            service_security: Some(pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation {
                    aef_id: aef.to_string(),
                    api_id: api.unwrap_or_default().to_string(),
                    pref_security_methods: vec![method as i32],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let info = rsp
        .security_info
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the CCF answered no security information"))?;
    if info.sel_security_method != method as i32 {
        bail!(
            "the CCF selected {:?}, not {method:?}",
            pb::SecurityMethod::try_from(info.sel_security_method)
        );
    }
    Ok(info)
}

/// Method 3: an access token from the home CCF (client credentials grant over CAPIF-1e).
/// `scope` in the `3gpp#<aefId>:<apiName>` form; empty asks for everything negotiated.
pub async fn token(profile: &Profile, scope: &str) -> Result<pb::AccessTokenRsp> {
    SecurityClient::new(profile.capif1e_channel().await?)
        .obtain_access_token(pb::AccessTokenReq {
            grant_type: "client_credentials".into(),
            client_id: profile.id().to_string(),
            client_secret: String::new(),
            scope: scope.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Authentication Initiation for any method; `key_id` is the held AEFPSK's (PSK only). `aef` is
/// the identity the AEF's certificate must name: the invoker tells the AEF who it is and which
/// key it holds, which only that AEF should learn.
pub async fn auth_method(
    profile: &Profile,
    method: pb::SecurityMethod,
    key_id: &str,
    aef_addr: &str,
    aef_ca_pem: &str,
    aef_server_name: &str,
    aef: &ExpectedPeer,
) -> Result<pb::CheckAuthenticationRsp> {
    let (ch, _) = connect(
        aef_addr,
        aef_server_name,
        client_config(aef_ca_pem, None, aef.clone())?,
        CONNECT_TIMEOUT,
    )
    .await?;
    AefSecurityClient::new(TracedChannel::new(ch, aef_addr))
        .check_authentication(pb::CheckAuthenticationReq {
            api_invoker_id: profile.id().to_string(),
            supported_features: String::new(),
            home_ccf_id: profile.file.ccf_id.clone(),
            security_method: method as i32,
            key_id: key_id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

fn invoke_request(api: &str) -> pb::InvokeRequest {
    pb::InvokeRequest {
        api_name: api.to_string(),
        payload: "hello from the invoker".into(),
    }
}

/// Method 2: mutual TLS (rustls) with the certificate the home CCF issued, and one demo API call
/// that presents `presented_id` (normally the profile's own id) as the invoker, at the AEF whose
/// certificate names `aef`.
pub async fn call_pki(
    profile: &Profile,
    presented_id: &str,
    endpoint: &str,
    aef_ca_pem: &str,
    aef_server_name: &str,
    api: &str,
    aef: &ExpectedPeer,
) -> Result<pb::InvokeResponse> {
    let cfg = client_config(
        aef_ca_pem,
        Some((&profile.cert_pem, &profile.key_pem)),
        aef.clone(),
    )?;
    let (ch, _) = connect(endpoint, aef_server_name, cfg, CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            // The AEF's alert can arrive while the channel is still being set up.
            let text = e.to_string();
            if text.contains("alert") {
                anyhow::Error::new(HandshakeRefused(text))
            } else {
                e.into()
            }
        })?;
    let mut r = tonic::Request::new(invoke_request(api));
    // In TLS 1.3 the server judges the client's certificate after the client's handshake is
    // done, so a refusal arrives as the connection closing under the first call.
    r.metadata_mut().insert(
        capif_2e::headers::INVOKER_ID_HEADER,
        presented_id
            .parse()
            .map_err(|_| anyhow!("{presented_id:?} cannot be sent as metadata"))?,
    );
    DemoApiClient::new(TracedChannel::new(ch, endpoint))
        .invoke(r)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            if ccf_core::grpc::error_reason(&s).is_none()
                && matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                )
            {
                anyhow::Error::new(HandshakeRefused(s.message().to_string()))
            } else {
                status_error(s)
            }
        })
}

/// The AEF closed the connection instead of answering: it refused the certificate (its log
/// says why).
#[derive(Debug, thiserror::Error)]
#[error("the AEF refused the TLS handshake (certificate not accepted): {0}")]
pub struct HandshakeRefused(pub String);

/// Method 3: server-authenticated TLS (rustls) and one demo API call with the bearer token, at
/// the AEF whose certificate names `aef` (the token is a credential: only that AEF may see it).
pub async fn call_oauth(
    access_token: &str,
    endpoint: &str,
    aef_ca_pem: &str,
    aef_server_name: &str,
    api: &str,
    aef: &ExpectedPeer,
) -> Result<pb::InvokeResponse> {
    let (ch, _) = connect(
        endpoint,
        aef_server_name,
        client_config(aef_ca_pem, None, aef.clone())?,
        CONNECT_TIMEOUT,
    )
    .await?;
    let mut r = tonic::Request::new(invoke_request(api));
    r.metadata_mut().insert(
        capif_2e::headers::AUTHORIZATION_HEADER,
        format!("{}{access_token}", capif_2e::headers::BEARER_PREFIX)
            .parse()
            .map_err(|_| anyhow!("the access token cannot be sent as metadata"))?,
    );
    DemoApiClient::new(TracedChannel::new(ch, endpoint))
        .invoke(r)
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Where an AEF is and how to trust it.
#[derive(Clone, Debug)]
pub struct AefTarget<'a> {
    /// host:port of its security listener.
    pub addr: &'a str,
    /// Its domain's CA, PEM.
    pub ca_pem: &'a str,
    /// The name in its certificate.
    pub server_name: &'a str,
}

/// The whole flow with one method: obtain the method at the home CCF (and, for OAUTH, a token
/// scoped to this AEF and API), Authentication Initiation at the AEF, then one call.
pub async fn run_flow(
    profile: &Profile,
    method: pb::SecurityMethod,
    aef: &str,
    api: &str,
    target: &AefTarget<'_>,
    psk_tls: TlsProfile,
) -> Result<pb::InvokeResponse> {
    // Which AEF must answer comes from the home CCF's answer (its owner domain), not from the
    // caller: the same source as the key's interface.
    match method {
        pb::SecurityMethod::Pki => {
            let info = negotiate(profile, aef, None, method).await?;
            let expected = aef_of_answer(aef, &info)?;
            let a = auth_method(
                profile,
                method,
                "",
                target.addr,
                target.ca_pem,
                target.server_name,
                &expected,
            )
            .await?;
            call_pki(
                profile,
                profile.id(),
                &a.tls_endpoint,
                target.ca_pem,
                target.server_name,
                api,
                &expected,
            )
            .await
        }
        pb::SecurityMethod::Oauth => {
            let info = negotiate(profile, aef, None, method).await?;
            let expected = aef_of_answer(aef, &info)?;
            let t = token(
                profile,
                &format!("{}{aef}:{api}", ccf_core::token::SCOPE_PREFIX),
            )
            .await?;
            let a = auth_method(
                profile,
                method,
                "",
                target.addr,
                target.ca_pem,
                target.server_name,
                &expected,
            )
            .await?;
            call_oauth(
                &t.access_token,
                &a.tls_endpoint,
                target.ca_pem,
                target.server_name,
                api,
                &expected,
            )
            .await
        }
        _ => {
            let (k, expected, _) = obtain_psk(profile, aef, None).await?;
            let a = auth(
                profile,
                Some(&k),
                target.addr,
                target.ca_pem,
                target.server_name,
                &expected,
            )
            .await?;
            call(profile, &k, &a.tls_endpoint, api, psk_tls).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capif_proto::v1::AefPskDerivation;

    /// The invoker refuses a key the CCF derived by another profile than its own, and an answer
    /// that names none, each saying what to do; the matching profile passes.
    #[test]
    fn a_derivation_other_than_the_configured_profile_is_refused() {
        let (t12, t13) = (Capif1eProfile::Tls12AnnexA, Capif1eProfile::Tls13Exporter);
        check_derivation(t12, AefPskDerivation::Tls12AnnexA as i32).unwrap();
        check_derivation(t13, AefPskDerivation::Tls13Exporter as i32).unwrap();
        let e = check_derivation(t13, AefPskDerivation::Tls12AnnexA as i32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "the CCF derived the AEFPSK by CAPIF-1e profile tls12-annex-a, but this invoker \
                 is configured for tls13-exporter"
            ) && e.contains("--capif1e tls12-annex-a"),
            "{e}"
        );
        let e = check_derivation(t12, 0).unwrap_err().to_string();
        assert!(e.contains("aef_psk_derivation is unset"), "{e}");
    }
}
