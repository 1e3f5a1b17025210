//! The AEF's two gRPC services: `AefSecurity` (Authentication Initiation for invokers, revocation
//! from the CCF) on the security listener, and `DemoApi` behind the TLS-PSK endpoint (method 1)
//! and the TLS endpoint (methods 2 and 3). The invoker is the one its PSK handshake, its verified
//! certificate or its verified token names, and it may call only the APIs its authorization
//! information (or the token's scope) lists (docs/PROTOCOL.md 4.5, step 6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use capif_proto::v1::{
    self as pb, CheckAuthenticationReq, CheckAuthenticationRsp, ErrorReason, InvokeRequest,
    InvokeResponse, RevokeAuthorizationReq, RevokeAuthorizationRsp,
    aef_security_server::AefSecurity, demo_api_server::DemoApi, security_client::SecurityClient,
};
use ccf_core::grpc::{Refusal, UpstreamError, caller, error_status, invalid_field};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError, KeyId};
use ccf_core::kdf::AefPsk;
use ccf_core::telemetry::TracedChannel;
use tonic::{Code, Request, Response, Status};

use ccf_core::tls::ConnInfo;
use ccf_core::token::{KnownCaller, Scope};

use crate::certauth::CertRefusal;
use crate::keys::{self, HeldCa, HeldKey, InvokerRef, KeyStore};
use crate::metrics::Endpoint;
use crate::psk::PskPeer;
use crate::token::TokenRefusal;
use capif_2e::identity::PskIdentity;

/// What both services share.
#[derive(Debug)]
pub struct AefState {
    /// This AEF.
    pub aef_id: AefId,
    /// Its domain.
    pub ccf_id: CcfId,
    /// Keys held.
    pub keys: Arc<KeyStore>,
    /// CAPIF-3 client of the own CCF.
    pub ccf: SecurityClient<TracedChannel>,
    /// What invokers are told to dial for the PSK endpoint.
    pub psk_endpoint: String,
    /// What invokers are told to dial for the TLS endpoint (methods 2 and 3), if served.
    pub tls_endpoint: Option<String>,
    /// Method 3: bearer-token verification.
    pub tokens: crate::token::TokenVerifier,
    /// APIs served.
    pub apis: Vec<String>,
    /// Authentication Initiations allowed per source address (token buckets).
    pub initiation_limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    /// A presented key id refreshes a held key at most once in this interval.
    pub refresh_interval: Duration,
    /// The event counters of `/metrics`.
    pub metrics: crate::metrics::AefMetrics,
    /// Test-only fault: RevokeAuthorization is acknowledged and ignored.
    #[cfg(feature = "test-faults")]
    pub ignore_revocations: bool,
}

impl AefState {
    /// Takes one Authentication Initiation from the budget of the caller's source address.
    fn admit_initiation<T>(&self, request: &Request<T>) -> Result<(), Status> {
        // Every request reaches here through the TLS accept loop; one that did not is refused
        // rather than let through unbudgeted.
        let Some(ip) = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.remote_addr)
            .map(|a| a.ip())
        else {
            return Err(error_status(
                Code::Internal,
                ErrorReason::InternalFault,
                "the request carries no source address",
            ));
        };
        if self.initiation_limiter.check_key(&ip).is_ok() {
            return Ok(());
        }
        Err(Refused::RateLimited(ip).into())
    }
}

/// Why the AEF refuses an Authentication Initiation, a revocation or a call (certificates and
/// tokens have their own types, [`CertRefusal`] and [`TokenRefusal`]). [`Refusal`] maps each
/// variant to its code and reason; the message is the `Display`.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The source address spent its budget of Authentication Initiations.
    #[error("too many authentication initiations from {0}; retry in a second")]
    RateLimited(std::net::IpAddr),
    /// The CCF's answer is about another invoker or home than asked.
    #[error("the CCF's answer is not about API invoker {invoker} of {home}")]
    AnswerNotAsked {
        /// The invoker asked about.
        invoker: ApiInvokerId,
        /// Its home.
        home: CcfId,
    },
    /// The CCF's answer carries a key id that is not one.
    #[error("the CCF's answer carries an unusable key id: {0}")]
    AnswerKeyId(#[source] IdError),
    /// A revocation arrived while the key or CA was being fetched.
    #[error("the authorization of API invoker {0} was revoked while its key was fetched")]
    RevokedMeanwhile(InvokerRef),
    /// The CCF holds no PSK for the invoker at this AEF (it negotiated another method).
    #[error("the CCF holds no PSK for API invoker {0} at this AEF")]
    NoPsk(ApiInvokerId),
    /// The invoker did not negotiate PKI for this AEF.
    #[error("API invoker {0} did not negotiate PKI for this AEF")]
    NotPki(ApiInvokerId),
    /// This AEF has no TLS endpoint for methods 2 and 3.
    #[error("AEF {aef} does not serve {method}")]
    MethodNotServed {
        /// This AEF.
        aef: AefId,
        /// The method asked for.
        method: &'static str,
    },
    /// The CA certificates the CCF named for the invoker cannot make a verifier.
    #[error("the CA certificates named for API invoker {invoker} are unusable: {source}")]
    UnusableCas {
        /// The invoker.
        invoker: ApiInvokerId,
        /// Why.
        #[source]
        source: ccf_core::tls::TlsError,
    },
    /// A revocation from another caller than the own domain's CCF.
    #[error("{0} may not revoke authorizations at this AEF")]
    RoleNotAllowed(PeerIdentity),
    /// The key a PSK connection was accepted with is no longer valid (revoked, replaced or
    /// expired since the handshake).
    #[error("the key of this connection is no longer valid: {}", .0.as_str())]
    KeyNoLongerValid(keys::Refusal),
    /// Methods 1 and 2: the API is not in the invoker's authorization information.
    #[error("API invoker {invoker} is not authorized for API {api:?} at {aef}")]
    ApiNotAuthorized {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The API called.
        api: String,
        /// This AEF.
        aef: AefId,
    },
    /// Method 3: the token's scope does not cover the API.
    #[error("API invoker {invoker} holds a token whose scope does not cover API {api:?} at {aef}")]
    InsufficientScope {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The API called.
        api: String,
        /// This AEF.
        aef: AefId,
    },
}

impl Refusal for Refused {
    fn code(&self) -> Code {
        match self {
            Self::RateLimited(_) => Code::ResourceExhausted,
            Self::AnswerNotAsked { .. } | Self::AnswerKeyId(_) => Code::Internal,
            Self::RevokedMeanwhile(_)
            | Self::RoleNotAllowed(_)
            | Self::ApiNotAuthorized { .. }
            | Self::InsufficientScope { .. } => Code::PermissionDenied,
            Self::NoPsk(_)
            | Self::NotPki(_)
            | Self::MethodNotServed { .. }
            | Self::UnusableCas { .. } => Code::FailedPrecondition,
            Self::KeyNoLongerValid(_) => Code::Unauthenticated,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            Self::RateLimited(_) => ErrorReason::RateLimited,
            Self::AnswerNotAsked { .. } | Self::AnswerKeyId(_) => ErrorReason::IdentityMismatch,
            Self::RevokedMeanwhile(_) => ErrorReason::RevokedDuringFetch,
            Self::NoPsk(_) | Self::NotPki(_) | Self::MethodNotServed { .. } => {
                ErrorReason::MethodMismatch
            }
            Self::UnusableCas { .. } => ErrorReason::CaNotFederated,
            Self::RoleNotAllowed(_) => ErrorReason::RoleNotAllowed,
            Self::KeyNoLongerValid(_) => ErrorReason::KeyExpired,
            Self::ApiNotAuthorized { .. } => ErrorReason::ApiNotAuthorized,
            Self::InsufficientScope { .. } => ErrorReason::InsufficientScope,
        }
    }
}

impl From<Refused> for Status {
    fn from(e: Refused) -> Self {
        e.status()
    }
}

/// The CCF's answer must be about the invoker and home asked for.
fn check_answer(
    info: &pb::InvokerSecurityInformation,
    invoker: &ApiInvokerId,
    home: &CcfId,
) -> Result<(), Refused> {
    if info.api_invoker_id != invoker.as_str()
        || (!info.home_ccf_id.is_empty() && info.home_ccf_id != home.as_str())
    {
        return Err(Refused::AnswerNotAsked {
            invoker: invoker.clone(),
            home: home.clone(),
        });
    }
    Ok(())
}

/// Whether a refusal is the CCF's definite answer (as opposed to a budget or a failed link).
fn definite(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition
    )
}

/// The AefSecurity service.
#[derive(Clone, Debug)]
pub struct AefSecurityService {
    state: Arc<AefState>,
}

impl AefSecurityService {
    /// Over the AEF's state.
    pub fn new(state: Arc<AefState>) -> Self {
        Self { state }
    }

    async fn ask_ccf(
        &self,
        invoker: &ApiInvokerId,
        home: &CcfId,
        presented: &str,
        method: pb::SecurityMethod,
    ) -> Result<(pb::InvokerSecurityInformation, Instant), Status> {
        let mut r = Request::new(pb::GetSecurityInformationRequest {
            api_invoker_id: invoker.to_string(),
            aef_id: self.state.aef_id.to_string(),
            home_ccf_id: home.to_string(),
            authentication_info: true,
            authorization_info: true,
            presented_key_id: presented.to_string(),
            security_method: method as i32,
        });
        r.set_timeout(Duration::from_secs(5));
        let sent_at = Instant::now();
        let info = self
            .state
            .ccf
            .clone()
            .get_security_information(r)
            .await
            .map_err(|s| {
                UpstreamError::from_status(format!("the CCF of {}", self.state.ccf_id), s)
            })?
            .into_inner();
        Ok((info, sent_at))
    }

    async fn fetch(
        &self,
        invoker: &ApiInvokerId,
        home: &CcfId,
        presented: &str,
    ) -> Result<HeldKey, Status> {
        let (mut info, sent_at) = self
            .ask_ccf(invoker, home, presented, pb::SecurityMethod::Psk)
            .await?;
        let psk = AefPsk::from_slice(&info.aef_psk);
        zeroize::Zeroize::zeroize(&mut info.aef_psk);
        let psk = psk.ok_or_else(|| Refused::NoPsk(invoker.clone()))?;
        check_answer(&info, invoker, home)?;
        KeyId::new(info.key_id.as_str()).map_err(Refused::AnswerKeyId)?;
        Ok(HeldKey {
            key_id: info.key_id.clone(),
            psk,
            fetched_at: sent_at,
            last_refresh: None,
            // The AEF's own timer starts from the remaining validity it was given.
            expires_at: sent_at + Duration::from_millis(info.remaining_validity_ms),
            allowed_apis: info.allowed_api_names.clone(),
        })
    }

    /// Method 2: the CAs that may have issued the invoker's certificate.
    async fn fetch_ca(&self, invoker: &ApiInvokerId, home: &CcfId) -> Result<HeldCa, Status> {
        let (info, sent_at) = self
            .ask_ccf(invoker, home, "", pb::SecurityMethod::Pki)
            .await?;
        if info.sel_security_method != pb::SecurityMethod::Pki as i32 {
            return Err(Refused::NotPki(invoker.clone()).into());
        }
        check_answer(&info, invoker, home)?;
        let verifier =
            crate::certauth::verifier_for(&info.invoker_ca_certificates).map_err(|source| {
                Refused::UnusableCas {
                    invoker: invoker.clone(),
                    source,
                }
            })?;
        Ok(HeldCa {
            verifier,
            fetched_at: sent_at,
            expires_at: sent_at + Duration::from_millis(info.remaining_validity_ms),
            allowed_apis: info.allowed_api_names,
        })
    }

    /// Method 2: the CA held for `who`, or fetched from the CCF and held.
    async fn held_or_fetched_ca(&self, who: &InvokerRef) -> Result<HeldCa, Status> {
        if let Some(c) = self.state.keys.valid_ca(who) {
            return Ok(c);
        }
        let c = self.fetch_ca(&who.invoker, &who.home).await?;
        if !self.state.keys.put_ca(who.clone(), c.clone()) {
            return Err(Refused::RevokedMeanwhile(who.clone()).into());
        }
        tracing::info!(api_invoker_id = %who.invoker, home = %who.home, remaining_ms = c.remaining().as_millis() as u64, "invoker CA fetched from CCF");
        Ok(c)
    }

    /// Method 1: the key held for `who`, or fetched from the CCF and held. A presented key id
    /// that differs from the held one refreshes it (the invoker re-authenticated at home), at
    /// most once per interval; a refresh that fails for want of budget or reachability leaves
    /// the held key standing.
    async fn held_or_fetched_key(
        &self,
        who: &InvokerRef,
        presented: &str,
    ) -> Result<HeldKey, Status> {
        let held = self.state.keys.valid(who);
        let refresh = match &held {
            None => true,
            Some(k) => {
                !presented.is_empty()
                    && presented != k.key_id
                    && self
                        .state
                        .keys
                        .claim_refresh(who, self.state.refresh_interval)
            }
        };
        match (held, refresh) {
            (Some(k), false) => Ok(k),
            (held, _) => match self.fetch(&who.invoker, &who.home, presented).await {
                Ok(mut k) => {
                    // A refreshed key keeps the refresh mark: the next one waits the interval.
                    if held.is_some() {
                        k.last_refresh = Some(k.fetched_at);
                    }
                    if !self.state.keys.put(who.clone(), k.clone()) {
                        return Err(Refused::RevokedMeanwhile(who.clone()).into());
                    }
                    tracing::info!(api_invoker_id = %who.invoker, home = %who.home, key_id = %k.key_id, remaining_ms = k.remaining().as_millis() as u64, "key fetched from CCF");
                    Ok(k)
                }
                // The held key stands (nothing is written back: a revocation or a newer key
                // that arrived meanwhile must not be undone).
                Err(s) => match held {
                    Some(k) if !definite(&s) => Ok(k),
                    _ => Err(s),
                },
            },
        }
    }

    /// Authentication Initiation: the endpoint to dial and, with PSK, the identity and the key
    /// held or fetched.
    async fn initiate(
        &self,
        request: Request<CheckAuthenticationReq>,
    ) -> Result<Response<CheckAuthenticationRsp>, Status> {
        // Anyone may initiate (the invoker has not authenticated yet), so each source address
        // gets a budget: a stranger cannot turn requests into CCF and partner fetches at will.
        self.state.admit_initiation(&request)?;
        let req = request.into_inner();
        let invoker = ApiInvokerId::new(req.api_invoker_id.clone())
            .map_err(|e| invalid_field("api_invoker_id", e))?;
        let home = if req.home_ccf_id.is_empty() {
            self.state.ccf_id.clone()
        } else {
            CcfId::new(req.home_ccf_id.clone()).map_err(|e| invalid_field("home_ccf_id", e))?
        };
        KeyId::optional(&req.key_id).map_err(|e| invalid_field("key_id", e))?;
        let who = InvokerRef::new(home, invoker);
        let method = pb::SecurityMethod::try_from(req.security_method)
            .unwrap_or(pb::SecurityMethod::Unspecified);
        match method {
            pb::SecurityMethod::Pki => {
                let endpoint = self.tls_endpoint("PKI")?;
                let ca = self.held_or_fetched_ca(&who).await?;
                return Ok(Response::new(CheckAuthenticationRsp {
                    supported_features: req.supported_features,
                    tls_endpoint: endpoint,
                    psk_identity: String::new(),
                    key_id: String::new(),
                    remaining_validity_ms: ca.remaining().as_millis() as u64,
                }));
            }
            pb::SecurityMethod::Oauth => {
                // Nothing to fetch: every call carries a token, checked with the issuer's keys.
                return Ok(Response::new(CheckAuthenticationRsp {
                    supported_features: req.supported_features,
                    tls_endpoint: self.tls_endpoint("OAUTH")?,
                    psk_identity: String::new(),
                    key_id: String::new(),
                    remaining_validity_ms: 0,
                }));
            }
            pb::SecurityMethod::Psk | pb::SecurityMethod::Unspecified => {}
        }
        let key = self.held_or_fetched_key(&who, &req.key_id).await?;
        let identity = PskIdentity {
            home_ccf_id: who.home,
            api_invoker_id: who.invoker,
            key_id: key.key_id.clone(),
        };
        Ok(Response::new(CheckAuthenticationRsp {
            supported_features: req.supported_features,
            tls_endpoint: self.state.psk_endpoint.clone(),
            psk_identity: identity.to_string(),
            key_id: key.key_id.clone(),
            remaining_validity_ms: key.remaining().as_millis() as u64,
        }))
    }

    fn tls_endpoint(&self, method: &'static str) -> Result<String, Refused> {
        self.state
            .tls_endpoint
            .clone()
            .ok_or_else(|| Refused::MethodNotServed {
                aef: self.state.aef_id.clone(),
                method,
            })
    }
}

#[tonic::async_trait]
impl AefSecurity for AefSecurityService {
    async fn check_authentication(
        &self,
        request: Request<CheckAuthenticationReq>,
    ) -> Result<Response<CheckAuthenticationRsp>, Status> {
        let method = request.get_ref().security_method;
        let result = self.initiate(request).await;
        self.state.metrics.initiation(method, &result);
        result
    }

    async fn revoke_authorization(
        &self,
        request: Request<RevokeAuthorizationReq>,
    ) -> Result<Response<RevokeAuthorizationRsp>, Status> {
        let who = caller(&request)?;
        if who.ccf_id != self.state.ccf_id || who.role != Role::Ccf {
            return Err(Refused::RoleNotAllowed(who).into());
        }
        let req = request.into_inner();
        let info = req
            .revoke_info
            .ok_or_else(|| invalid_field("revoke_info", "is required"))?;
        let invoker = ApiInvokerId::new(info.api_invoker_id)
            .map_err(|e| invalid_field("revoke_info.api_invoker_id", e))?;
        // The notice concerns the invoker of the domain it names (its home); empty: this domain.
        let home = if info.home_ccf_id.is_empty() {
            self.state.ccf_id.clone()
        } else {
            CcfId::new(info.home_ccf_id).map_err(|e| invalid_field("revoke_info.home_ccf_id", e))?
        };
        #[cfg(feature = "test-faults")]
        if self.state.ignore_revocations {
            tracing::warn!(api_invoker_id = %invoker, %home, "test fault: revocation ignored");
            return Ok(Response::new(RevokeAuthorizationRsp {
                supported_features: req.supported_features,
                connections_closed: 0,
            }));
        }
        let closed = self
            .state
            .keys
            .revoke(&InvokerRef::new(home.clone(), invoker.clone()));
        tracing::info!(api_invoker_id = %invoker, %home, connections_closed = closed, "authorization revoked by the CCF");
        self.state.metrics.revoked();
        Ok(Response::new(RevokeAuthorizationRsp {
            supported_features: req.supported_features,
            connections_closed: closed,
        }))
    }
}

/// The demo API.
#[derive(Clone, Debug)]
pub struct DemoApiService {
    state: Arc<AefState>,
}

impl DemoApiService {
    /// Over the AEF's state.
    pub fn new(state: Arc<AefState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl DemoApi for DemoApiService {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let endpoint = if request.extensions().get::<PskPeer>().is_some() {
            Endpoint::Psk
        } else {
            Endpoint::Tls
        };
        let result = self.invoke_checked(request).await;
        self.state.metrics.api_call(endpoint, &result);
        result
    }
}

/// What a call may do, by method.
enum Allowed {
    /// Methods 1 and 2: the authorization information the CCF handed the AEF.
    Apis(Vec<String>),
    /// Method 3: the token's scope.
    Scope(Scope),
}

/// The authenticated invoker of one call.
struct Caller {
    invoker: ApiInvokerId,
    home: CcfId,
    key_id: String,
    method: &'static str,
    allowed: Allowed,
}

/// The metadata a method-2 call names its invoker in.
pub use capif_2e::headers::INVOKER_ID_HEADER;

/// The token of an `authorization: Bearer <token>` header, if the call carries one.
fn bearer_token<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(capif_2e::headers::AUTHORIZATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(capif_2e::headers::BEARER_PREFIX))
        .map(str::trim)
}

impl DemoApiService {
    /// A call: the invoker its connection authenticated, then its authorization.
    async fn invoke_checked(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let caller = if let Some(peer) = request.extensions().get::<PskPeer>().cloned() {
            self.psk_caller(&peer)?
        } else if let Some(info) = request.extensions().get::<ConnInfo>().cloned() {
            match &info.peer {
                // A bearer token makes the call method 3 even over a client certificate: the
                // token is what grants, and the certificate only names whom it must be issued to.
                Some(peer) if bearer_token(&request).is_none() => {
                    self.certificate_caller(&request, peer)?
                }
                peer => self.token_caller(&request, peer.as_deref()).await?,
            }
        } else {
            return Err(error_status(
                Code::Unauthenticated,
                ErrorReason::InternalFault,
                "this connection carries no authenticated invoker",
            ));
        };
        let req = request.into_inner();
        let allowed = match &caller.allowed {
            Allowed::Apis(list) => list.contains(&req.api_name),
            Allowed::Scope(scope) => scope.covers(&self.state.aef_id, &req.api_name),
        };
        if !self.state.apis.contains(&req.api_name) || !allowed {
            tracing::info!(api_invoker_id = %caller.invoker, method = caller.method, api = %req.api_name, "API call refused: not authorized");
            let (invoker, api, aef) = (caller.invoker, req.api_name, self.state.aef_id.clone());
            return Err(match caller.allowed {
                Allowed::Apis(_) => Refused::ApiNotAuthorized { invoker, api, aef },
                Allowed::Scope(_) => Refused::InsufficientScope { invoker, api, aef },
            }
            .into());
        }
        tracing::info!(api_invoker_id = %caller.invoker, method = caller.method, api = %req.api_name, "API call served");
        Ok(Response::new(InvokeResponse {
            aef_id: self.state.aef_id.to_string(),
            api_name: req.api_name,
            api_invoker_id: caller.invoker.to_string(),
            home_ccf_id: caller.home.to_string(),
            key_id: caller.key_id,
            result: req.payload,
        }))
    }

    fn psk_caller(&self, peer: &PskPeer) -> Result<Caller, Status> {
        // The handshake ran before this call, in a trace of its own: the call's span links it.
        peer.handshake.link_current();
        let id = &peer.identity;
        let key = self
            .state
            .keys
            .for_handshake(&id.invoker_ref(), &id.key_id)
            .map_err(|r| Status::from(Refused::KeyNoLongerValid(r)))?;
        Ok(Caller {
            invoker: id.api_invoker_id.clone(),
            home: id.home_ccf_id.clone(),
            key_id: id.key_id.clone(),
            method: "PSK",
            allowed: Allowed::Apis(key.allowed_apis),
        })
    }

    fn certificate_caller<T>(
        &self,
        request: &Request<T>,
        peer: &ccf_core::tls::PeerInfo,
    ) -> Result<Caller, Status> {
        let refused = |refusal: CertRefusal| {
            tracing::info!(reason = %refusal, "certificate refused");
            Status::from(refusal)
        };
        let id = peer
            .identity
            .as_ref()
            .map_err(|e| refused(CertRefusal::NoIdentity(e.clone())))?;
        let Role::Invoker(invoker) = &id.role else {
            return Err(refused(CertRefusal::NotAnInvoker));
        };
        let presented = request
            .metadata()
            .get(INVOKER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if presented != invoker.as_str() {
            return Err(refused(CertRefusal::OtherInvoker {
                invoker: invoker.clone(),
                presented: presented.to_string(),
            }));
        }
        // Checked again on every call: a revocation or the end of validity since the handshake.
        let ca = self
            .state
            .keys
            .for_certificate(&InvokerRef::new(id.ccf_id.clone(), invoker.clone()))
            .map_err(|r| Status::from(CertRefusal::NoLongerAccepted(r)))?;
        Ok(Caller {
            invoker: invoker.clone(),
            home: id.ccf_id.clone(),
            key_id: String::new(),
            method: "PKI",
            allowed: Allowed::Apis(ca.allowed_apis),
        })
    }

    async fn token_caller<T>(
        &self,
        request: &Request<T>,
        peer: Option<&ccf_core::tls::PeerInfo>,
    ) -> Result<Caller, Status> {
        let bad = |r: TokenRefusal| {
            tracing::info!(reason = %r, check = r.check(), "access token refused");
            Status::from(r)
        };
        let Some(token) = bearer_token(request) else {
            return Err(bad(TokenRefusal::Missing));
        };
        // Whatever else names the caller must name the token's subject: a token issued to X is
        // not X's to lend. The texts below are not invoker ids, so they can match no `sub`.
        let cert_invoker = peer.map(|p| match &p.identity {
            Ok(id) => match &id.role {
                Role::Invoker(invoker) => (invoker.to_string(), Some(id.ccf_id.as_str())),
                _ => (format!("{id} (not an API invoker)"), None),
            },
            Err(_) => ("(no CAPIF identity)".to_string(), None),
        });
        let header = request
            .metadata()
            .get(INVOKER_ID_HEADER)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let mut callers = Vec::new();
        if let Some((invoker, home)) = &cert_invoker {
            callers.push(KnownCaller {
                invoker,
                home: *home,
                source: "the client certificate",
            });
        }
        if let Some(invoker) = header {
            callers.push(KnownCaller {
                invoker,
                home: None,
                source: "the capif-api-invoker-id header",
            });
        }
        let claims = self
            .state
            .tokens
            .verify(token, self.state.aef_id.as_str(), &callers)
            .await
            .map_err(bad)?;
        let invoker = ApiInvokerId::new(claims.sub.clone())
            .map_err(|e| bad(TokenRefusal::SubjectNotAnInvoker(e)))?;
        // `verify` checked `iss` names a CCF (the issuer whose keys verified the token).
        let home = CcfId::new(claims.iss.clone()).map_err(|why| {
            bad(TokenRefusal::BadIssuerName {
                iss: claims.iss.clone(),
                why,
            })
        })?;
        if self
            .state
            .keys
            .is_revoked(&InvokerRef::new(home.clone(), invoker.clone()))
        {
            return Err(bad(TokenRefusal::Revoked(invoker)));
        }
        let scope = Scope::parse(&claims.scope).map_err(|e| bad(TokenRefusal::BadScope(e)))?;
        Ok(Caller {
            invoker,
            home,
            key_id: String::new(),
            method: "OAUTH",
            allowed: Allowed::Scope(scope),
        })
    }
}
