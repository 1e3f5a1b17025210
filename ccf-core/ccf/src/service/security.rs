//! `Security`: security-method selection and AEFPSK derivation for invokers (CAPIF-1e), security
//! information and revocation for AEFs of this domain (CAPIF-3).
//!
//! The AEFPSK is derived from the binding of the very TLS session the request arrived on, so the
//! invoker derives the same key from its side (docs/PROTOCOL.md).

use std::sync::Arc;

use capif_proto::v1::{
    self as pb, AccessTokenReq, AccessTokenRsp, GetSecurityInformationRequest,
    InvokerSecurityInformation, ObtainSecurityMethodRequest, RevocationKind, RevocationNotice,
    RevokeAuthorizationRequest, RevokeAuthorizationResponse, ServiceSecurity, TokenKeySet,
    TokenKeySetRequest, security_server::Security,
};
use tonic::{Request, Response, Status};

use super::{
    Refused, aef_id, calling_invoker, ccf_id, invoker_id, of_domain, optional_key_id, own_domain,
    role_not_allowed, security_information, store_status, valid_context,
};
use crate::metrics::InvokerHome;
use crate::server::{CcfState, now_ms};
use crate::store::SecurityContext;
use ccf_core::grpc::{UpstreamError, caller, conn_info, invalid_field};
use ccf_core::identity::Role;
use ccf_core::ids::{ApiInvokerId, ApiName, CcfId};
use ccf_core::kdf::{AefPsk, Capif1eBinding};
use ccf_core::registry::{AefEntry, AefRegistry, Interface, SecurityMethod, select_method};
use ccf_core::token::{AccessTokenClaims, Scope};

/// Budget of a CAPIF-3 request that goes to the gateway when the AEF sets no deadline.
const DEFAULT_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest budget honoured.
const MAX_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// At most this many AEFs per ServiceSecurity request.
pub(super) const MAX_SECURITY_INFO: usize = 64;

/// The Security service.
#[derive(Clone, Debug)]
pub struct SecurityService {
    state: Arc<CcfState>,
}

impl SecurityService {
    /// A service over the CCF's state.
    pub fn new(state: Arc<CcfState>) -> Self {
        Self { state }
    }

    /// A refusal of the own gateway passes on with its reason; anything else means the gateway
    /// could not be reached, and says so without its address (`UpstreamError`).
    fn gateway_failure(&self, s: Status) -> Status {
        UpstreamError::from_status(
            format!("the interconnect gateway of {}", self.state.ccf_id),
            s,
        )
        .into()
    }

    /// This domain's operator (or an AEF, for itself) revokes the access of `invoker`, an
    /// invoker of `home`, to this domain's AEFs (`aef`, or all). Recorded durably first, so the
    /// refusal holds whatever happens next; then the AEFs drop its key and close its connections,
    /// and the gateway evicts its cached answers. Nothing is sent to `home`: the invoker stays
    /// valid there. Returns the AEFs at which it is now refused.
    async fn revoke_foreign(
        &self,
        home: &ccf_core::ids::CcfId,
        invoker: &ApiInvokerId,
        aef: Option<&ccf_core::ids::AefId>,
        cause: i32,
    ) -> Result<Vec<ccf_core::ids::AefId>, Status> {
        let own = &self.state.ccf_id;
        let aefs: Vec<ccf_core::ids::AefId> = match aef {
            Some(a) => match self.state.registry.get(a) {
                Some(e) if &e.ccf_id == own => vec![a.clone()],
                _ => {
                    return Err(Refused::NotOwnAef {
                        aef: a.clone(),
                        own: own.clone(),
                    }
                    .into());
                }
            },
            None => self
                .state
                .registry
                .iter()
                .filter(|e| &e.ccf_id == own)
                .map(|e| e.aef_id.clone())
                .collect(),
        };
        let until = now_ms().saturating_add(
            u64::try_from(self.state.foreign_revocation.as_millis()).unwrap_or(u64::MAX),
        );
        self.state
            .store
            .revoke_foreign(home, invoker, &aefs, until)
            .await
            .map_err(store_status)?;
        let notice = RevocationNotice {
            home_ccf_id: home.to_string(),
            api_invoker_id: invoker.to_string(),
            aef_ids: aefs.iter().map(ToString::to_string).collect(),
            kind: RevocationKind::AuthorizationRevoked as i32,
            cause,
            ..Default::default()
        };
        tracing::info!(
            api_invoker_id = %invoker,
            %home,
            aefs = ?notice.aef_ids,
            until_unix_ms = until,
            "access of a foreign invoker to this domain's AEFs revoked"
        );
        self.state.revoke_at_aefs(&notice, Some(&aefs));
        if let Some(gw) = &self.state.gateway {
            // The refusal is already recorded: a gateway that cannot be told keeps a cached
            // answer the CCF no longer hands to AEFs, until it expires.
            let mut r = Request::new(notice);
            r.set_timeout(std::time::Duration::from_secs(3));
            if let Err(e) = gw.clone().evict_partner_invoker(r).await {
                tracing::warn!(error = %e.message(), "could not tell the gateway to evict the foreign invoker");
            }
        }
        Ok(aefs)
    }

    /// CAPIF-3: an AEF of this domain asks for an invoker's security information; a foreign
    /// invoker's goes through the gateway.
    async fn security_information_for_aef(
        &self,
        request: Request<GetSecurityInformationRequest>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        let budget = ccf_core::grpc::budget(&request, DEFAULT_BUDGET, MAX_BUDGET);
        let Role::Aef(own_aef) = &who.role else {
            return Err(role_not_allowed(&who, "read invokers' security information").into());
        };
        let req = request.into_inner();
        let invoker = invoker_id("api_invoker_id", &req.api_invoker_id)?;
        optional_key_id("presented_key_id", &req.presented_key_id)?;
        if !req.aef_id.is_empty() && req.aef_id != own_aef.as_str() {
            return Err(Refused::NotTheCaller {
                field: "aef_id",
                caller: own_aef.to_string(),
            }
            .into());
        }
        let home = if req.home_ccf_id.is_empty() {
            self.state.ccf_id.clone()
        } else {
            ccf_id("home_ccf_id", &req.home_ccf_id)?
        };
        if home != self.state.ccf_id {
            if self
                .state
                .store
                .foreign_revoked_until(&home, &invoker, own_aef, now_ms())
                .await
                .map_err(store_status)?
                .is_some()
            {
                return Err(Refused::RevokedAtThisDomain {
                    invoker,
                    home,
                    aef: own_aef.clone(),
                    own: self.state.ccf_id.clone(),
                }
                .into());
            }
            let Some(gw) = &self.state.gateway else {
                return Err(Refused::NoInterconnectForInvoker {
                    invoker,
                    home,
                    own: self.state.ccf_id.clone(),
                }
                .into());
            };
            let mut r = Request::new(pb::SecurityInformationQuery {
                api_invoker_id: invoker.to_string(),
                home_ccf_id: home.to_string(),
                aef_id: own_aef.to_string(),
                presented_key_id: req.presented_key_id.clone(),
                security_method: req.security_method,
            });
            r.set_timeout(ccf_core::grpc::inner_budget(budget));
            let answer = gw
                .clone()
                .fetch_security_information(r)
                .await
                .map_err(|s| self.gateway_failure(s))?;
            // As frequent as the own domain's answer below (an AEF asks only when it holds no
            // valid key), and CCF-A's one line of a cross-domain request's trace.
            tracing::info!(
                api_invoker_id = %invoker,
                %home,
                aef_id = %own_aef,
                key_id = %answer.get_ref().key_id,
                "foreign security information handed to AEF"
            );
            return Ok(Response::new(answer.into_inner()));
        }
        let ctx = valid_context(&self.state, &invoker, own_aef).await?;
        tracing::info!(
            api_invoker_id = %invoker,
            aef_id = %own_aef,
            key_id = %ctx.key_id,
            "security information handed to AEF"
        );
        Ok(Response::new(security_information(&self.state, &ctx)))
    }

    fn resolve_aef(&self, i: usize, info: &pb::SecurityInformation) -> Result<&AefEntry, Status> {
        resolve_aef(&self.state.registry, &self.state.ccf_id, i, info)
    }

    /// Shared by Obtain and Update: builds every context first, then stores them in one
    /// transaction, so a bad entry anywhere stores nothing.
    async fn negotiate(
        &self,
        request: Request<ObtainSecurityMethodRequest>,
        update: bool,
    ) -> Result<ServiceSecurity, Status> {
        let who = caller(&request)?;
        let id = calling_invoker(&self.state, &who, "obtain a security method").await?;
        let binding = conn_info(&request)?.binding.clone();
        let ss = requested_service_security(&id, request.into_inner())?;
        let now = now_ms();
        let negotiation = Negotiation {
            invoker: &id,
            binding: binding.as_deref(),
            update,
            now,
            expires: now + self.state.context_validity.as_millis() as u64,
        };
        let mut contexts = Vec::new();
        let mut answers = Vec::new();
        for (i, info) in ss.security_info.iter().enumerate() {
            let (answer, context) = self.negotiate_entry(&negotiation, i, info).await?;
            answers.push(answer);
            contexts.push(context);
        }
        // The notices of replaced keys are queued in the transaction that replaces them.
        let mut notices = Vec::new();
        self.state
            .store
            .put_contexts_queueing(&id, &contexts, |replaced| {
                notices = self.replaced_key_notices(&id, replaced, &contexts);
                notices
                    .iter()
                    .flat_map(|n| self.state.to_queue(n))
                    .collect()
            })
            .await
            .map_err(store_status)?;
        for n in notices {
            let aefs: Vec<ccf_core::ids::AefId> = n
                .aef_ids
                .iter()
                .filter_map(|a| ccf_core::ids::AefId::new(a.clone()).ok())
                .collect();
            self.state.publish_revocation(n, &aefs);
        }
        tracing::info!(
            api_invoker_id = %id,
            aefs = contexts.len(),
            "security method negotiated"
        );
        Ok(ServiceSecurity {
            security_info: answers,
            notification_destination: ss.notification_destination,
            request_test_notification: false,
            supported_features: ss.supported_features,
        })
    }

    /// One `security_info[i]` entry: the method selected for its AEF, the APIs allowed, and
    /// with PSK the AEFPSK of this session; as the answer and as the context to store.
    async fn negotiate_entry(
        &self,
        n: &Negotiation<'_>,
        i: usize,
        info: &pb::SecurityInformation,
    ) -> Result<(pb::SecurityInformation, SecurityContext), Status> {
        let entry = self.resolve_aef(i, info)?;
        if n.update {
            self.require_context_to_update(n.invoker, entry).await?;
        }
        let method = preferred_method(i, info, entry)?;
        let allowed_apis = allowed_apis(i, info, entry)?;
        let aef_psk = match method {
            SecurityMethod::Psk => Some(self.session_aef_psk(i, n.binding, entry)?),
            _ => None,
        };
        let key_id = aef_psk.as_ref().map(|k| k.key_id()).unwrap_or_default();
        let validity_secs = self.state.context_validity.as_secs();
        let answer = pb::SecurityInformation {
            aef_id: entry.aef_id.to_string(),
            interface_details: Some(entry.interface.to_proto(&entry.security_methods)),
            api_id: info.api_id.clone(),
            pref_security_methods: info.pref_security_methods.clone(),
            sel_security_method: method.to_proto() as i32,
            authentication_info: String::new(),
            authorization_info: allowed_apis
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
            aef_psk_validity_secs: if aef_psk.is_some() { validity_secs } else { 0 },
            aef_psk_key_id: key_id.clone(),
            interface_canonical: entry.interface_canonical.clone(),
            aef_ccf_id: entry.ccf_id.to_string(),
            aef_psk_derivation: if aef_psk.is_some() {
                self.state.capif1e.to_proto() as i32
            } else {
                0
            },
        };
        let context = SecurityContext {
            api_invoker_id: n.invoker.clone(),
            aef_id: entry.aef_id.clone(),
            aef_ccf_id: entry.ccf_id.clone(),
            method,
            aef_psk,
            key_id,
            interface_canonical: entry.interface_canonical.clone(),
            allowed_apis,
            created_at_ms: n.now,
            expires_at_ms: n.expires,
        };
        Ok((answer, context))
    }

    /// The AEFPSK of entry `i` from the request's TLS session, which must be of the domain's
    /// CAPIF-1e profile: the answer names that profile, and the invoker derives by it.
    fn session_aef_psk(
        &self,
        i: usize,
        binding: Option<&Capif1eBinding>,
        entry: &AefEntry,
    ) -> Result<AefPsk, Status> {
        let binding = binding.ok_or(Refused::SessionBindingMissing)?;
        if binding.profile() != self.state.capif1e {
            return Err(Refused::Capif1eProfileMismatch {
                own: self.state.ccf_id.clone(),
                domain: self.state.capif1e,
                session: binding.profile(),
            }
            .into());
        }
        binding
            .aefpsk(&entry.interface_canonical)
            .map_err(|e| invalid_field(&format!("service_security.security_info[{i}]"), e))
    }

    /// Update changes existing contexts only.
    async fn require_context_to_update(
        &self,
        id: &ApiInvokerId,
        entry: &AefEntry,
    ) -> Result<(), Status> {
        if self
            .state
            .store
            .context(id, &entry.aef_id)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(Refused::NothingToUpdate {
                aef: entry.aef_id.clone(),
            }
            .into());
        }
        Ok(())
    }

    /// The notices of the keys the new contexts replaced. Only a key that really changed is
    /// announced (the same session asking twice keeps it).
    fn replaced_key_notices(
        &self,
        id: &ApiInvokerId,
        replaced: &[SecurityContext],
        contexts: &[SecurityContext],
    ) -> Vec<RevocationNotice> {
        let new_ids: Vec<&str> = contexts.iter().map(|c| c.key_id.as_str()).collect();
        let mut notices = Vec::new();
        for old in replaced
            .iter()
            .filter(|c| !c.key_id.is_empty() && !new_ids.contains(&c.key_id.as_str()))
        {
            notices.push(self.state.revocation_notice(
                RevocationNotice {
                    home_ccf_id: self.state.ccf_id.to_string(),
                    api_invoker_id: id.to_string(),
                    aef_ids: vec![old.aef_id.to_string()],
                    kind: RevocationKind::KeyReplacedByNewer as i32,
                    cause: pb::Cause::KeyReplaced as i32,
                    key_id: old.key_id.clone(),
                    ..Default::default()
                },
                std::slice::from_ref(old),
            ));
        }
        notices
    }
}

/// What every entry of one Obtain or Update request shares.
struct Negotiation<'a> {
    /// The calling invoker.
    invoker: &'a ApiInvokerId,
    /// The CAPIF-1e binding of the request's TLS session: the AEFPSK derives from it.
    binding: Option<&'a Capif1eBinding>,
    /// Update rather than Obtain.
    update: bool,
    now: u64,
    expires: u64,
}

/// The registry entry of the AEF that entry `i` of a request names, by `aef_id` or else by its
/// interface (canonical P0).
pub(super) fn resolve_aef<'r>(
    registry: &'r AefRegistry,
    own: &CcfId,
    i: usize,
    info: &pb::SecurityInformation,
) -> Result<&'r AefEntry, Status> {
    let field = format!("service_security.security_info[{i}]");
    let entry = if !info.aef_id.is_empty() {
        let id = aef_id(&format!("{field}.aef_id"), &info.aef_id)?;
        registry.get(&id)
    } else if let Some(d) = &info.interface_details {
        let canonical = Interface::from_proto(d)
            .canonical()
            .map_err(|e| invalid_field(&format!("{field}.interface_details"), e))?;
        registry.by_interface(&canonical)
    } else {
        return Err(invalid_field(
            &field,
            "names no AEF: set aef_id or interface_details",
        ));
    };
    entry.ok_or_else(|| {
        Refused::AefNotRegistered {
            field,
            own: own.clone(),
        }
        .into()
    })
}

/// The request's `service_security`, once the request is known to be the caller's own and to
/// name between 1 and [`MAX_SECURITY_INFO`] AEFs.
pub(super) fn requested_service_security(
    id: &ApiInvokerId,
    req: ObtainSecurityMethodRequest,
) -> Result<ServiceSecurity, Status> {
    if req.api_invoker_id != id.as_str() {
        return Err(Refused::NotTheCaller {
            field: "api_invoker_id",
            caller: id.to_string(),
        }
        .into());
    }
    let ss = req
        .service_security
        .ok_or_else(|| invalid_field("service_security", "is required"))?;
    if ss.security_info.is_empty() || ss.security_info.len() > MAX_SECURITY_INFO {
        return Err(invalid_field(
            "service_security.security_info",
            format!("needs between 1 and {MAX_SECURITY_INFO} entries"),
        ));
    }
    Ok(ss)
}

/// The first of the invoker's preferred methods that the AEF supports.
pub(super) fn preferred_method(
    i: usize,
    info: &pb::SecurityInformation,
    entry: &AefEntry,
) -> Result<SecurityMethod, Status> {
    let preferred: Vec<SecurityMethod> = info
        .pref_security_methods
        .iter()
        .map(|m| SecurityMethod::from_proto(*m))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            invalid_field(
                &format!("service_security.security_info[{i}].pref_security_methods"),
                "holds an unspecified or unknown method",
            )
        })?;
    if preferred.is_empty() {
        return Err(invalid_field(
            &format!("service_security.security_info[{i}].pref_security_methods"),
            "needs at least one method",
        ));
    }
    select_method(&preferred, &entry.security_methods).ok_or_else(|| {
        Refused::NoCommonMethod {
            aef: entry.aef_id.clone(),
            supported: entry.security_methods.clone(),
        }
        .into()
    })
}

/// The APIs the context allows: the one asked for, or every API of the AEF.
pub(super) fn allowed_apis(
    i: usize,
    info: &pb::SecurityInformation,
    entry: &AefEntry,
) -> Result<Vec<ApiName>, Status> {
    if info.api_id.is_empty() {
        return Ok(entry.apis.clone());
    }
    let api = ApiName::new(info.api_id.clone())
        .map_err(|e| invalid_field(&format!("service_security.security_info[{i}].api_id"), e))?;
    if !entry.apis.contains(&api) {
        return Err(Refused::ApiNotExposed {
            aef: entry.aef_id.clone(),
            api,
        }
        .into());
    }
    Ok(vec![api])
}

/// Whose authorization a `RevokeAuthorization` withdraws, for which AEF (`None`: all), as the
/// caller may ask: an operator of domain `own` for any AEF, an AEF of `own` only for itself.
pub(super) fn revoke_target(
    own: &CcfId,
    who: &ccf_core::identity::PeerIdentity,
    info: &pb::SecurityNotification,
) -> Result<(ApiInvokerId, Option<ccf_core::ids::AefId>), Status> {
    of_domain(own, who)?;
    let id = invoker_id("revoke_info.api_invoker_id", &info.api_invoker_id)?;
    let aef = if info.aef_id.is_empty() {
        None
    } else {
        Some(aef_id("revoke_info.aef_id", &info.aef_id)?)
    };
    match &who.role {
        Role::Operator => Ok((id, aef)),
        // An AEF revokes only its own authorization for the invoker.
        Role::Aef(own) if aef.as_ref().is_none_or(|a| a == own) => Ok((id, Some(own.clone()))),
        Role::Aef(_) => Err(Refused::RevokesForAnotherAef.into()),
        _ => Err(role_not_allowed(who, "revoke authorization").into()),
    }
}

#[tonic::async_trait]
impl Security for SecurityService {
    async fn obtain_security_method(
        &self,
        request: Request<ObtainSecurityMethodRequest>,
    ) -> Result<Response<ServiceSecurity>, Status> {
        let result = self.negotiate(request, false).await;
        self.state.metrics.negotiated(&result);
        result.map(Response::new)
    }

    async fn update_security_method(
        &self,
        request: Request<ObtainSecurityMethodRequest>,
    ) -> Result<Response<ServiceSecurity>, Status> {
        let result = self.negotiate(request, true).await;
        self.state.metrics.negotiated(&result);
        result.map(Response::new)
    }

    async fn get_security_information(
        &self,
        request: Request<GetSecurityInformationRequest>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let home = &request.get_ref().home_ccf_id;
        let scope = if home.is_empty() || home == self.state.ccf_id.as_str() {
            InvokerHome::Own
        } else {
            InvokerHome::Foreign
        };
        let result = self.security_information_for_aef(request).await;
        self.state.metrics.security_info(scope, &result);
        result
    }

    async fn revoke_authorization(
        &self,
        request: Request<RevokeAuthorizationRequest>,
    ) -> Result<Response<RevokeAuthorizationResponse>, Status> {
        let who = caller(&request)?;
        let info = request
            .into_inner()
            .revoke_info
            .ok_or_else(|| invalid_field("revoke_info", "is required"))?;
        let (id, aef) = revoke_target(&self.state.ccf_id, &who, &info)?;
        if !info.home_ccf_id.is_empty() && info.home_ccf_id != self.state.ccf_id.as_str() {
            let home = ccf_id("revoke_info.home_ccf_id", &info.home_ccf_id)?;
            let refused_at = self
                .revoke_foreign(&home, &id, aef.as_ref(), info.cause)
                .await?;
            return Ok(Response::new(RevokeAuthorizationResponse {
                security_contexts_removed: 0,
                aefs_refused: refused_at.iter().map(ToString::to_string).collect(),
            }));
        }
        // The notice is queued for the gateway in the transaction that removes the contexts.
        let mut notice = None;
        let removed = self
            .state
            .store
            .remove_contexts_queueing(&id, aef.as_ref(), |removed| {
                if removed.is_empty() {
                    return Vec::new();
                }
                let n = self.state.revocation_notice(
                    RevocationNotice {
                        home_ccf_id: self.state.ccf_id.to_string(),
                        api_invoker_id: id.to_string(),
                        aef_ids: removed.iter().map(|c| c.aef_id.to_string()).collect(),
                        kind: RevocationKind::AuthorizationRevoked as i32,
                        cause: info.cause,
                        key_id: String::new(),
                        ..Default::default()
                    },
                    removed,
                );
                let queued = self.state.to_queue(&n);
                notice = Some(n);
                queued
            })
            .await
            .map_err(store_status)?;
        if let Some(n) = notice {
            self.state.publish_revocation(
                n,
                &removed.iter().map(|c| c.aef_id.clone()).collect::<Vec<_>>(),
            );
        }
        Ok(Response::new(RevokeAuthorizationResponse {
            security_contexts_removed: removed.len() as u32,
            aefs_refused: Vec::new(),
        }))
    }

    async fn obtain_access_token(
        &self,
        request: Request<AccessTokenReq>,
    ) -> Result<Response<AccessTokenRsp>, Status> {
        let who = caller(&request)?;
        let id = calling_invoker(&self.state, &who, "obtain access tokens").await?;
        let req = request.into_inner();
        check_client_credentials(&id, &req)?;
        let asked = Scope::parse(&req.scope).map_err(Refused::ScopeUnparsable)?;
        let now = now_ms();
        let contexts = oauth_contexts(&self.state, &id, now).await?;
        let (granted, context_end) = granted_scope(&id, &asked, &contexts)?;
        // The token is meant for exactly the AEFs its scope names; each checks it is one of them.
        let aud = granted.aef_ids();
        let scope = granted.to_string();
        let now_s = now / 1000;
        let exp = (now_s + self.state.token_lifetime.as_secs()).min(context_end / 1000);
        if exp <= now_s {
            return Err(Refused::ContextsExpiring { invoker: id }.into());
        }
        let claims = AccessTokenClaims {
            iss: self.state.ccf_id.to_string(),
            // The invoker of the calling certificate, which client_id was checked against above.
            sub: id.to_string(),
            aud,
            client_id: id.to_string(),
            scope: scope.clone(),
            exp,
            nbf: Some(now_s),
            iat: now_s,
            jti: hex::encode(rand::random::<[u8; 12]>()),
        };
        let token = sign_access_token(&self.state, &claims)?;
        tracing::info!(api_invoker_id = %id, %scope, exp, kid = %self.state.token_keys.current_kid(), "access token issued");
        Ok(Response::new(AccessTokenRsp {
            access_token: token,
            token_type: "Bearer".into(),
            expires_in: exp - now_s,
            scope,
        }))
    }

    async fn get_token_key_set(
        &self,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        if !matches!(who.role, Role::Aef(_) | Role::Operator) {
            return Err(role_not_allowed(&who, "read token verification keys").into());
        }
        let budget = ccf_core::grpc::budget(&request, DEFAULT_BUDGET, MAX_BUDGET);
        let req = request.into_inner();
        let issuer = if req.issuer_ccf_id.is_empty() {
            self.state.ccf_id.clone()
        } else {
            ccf_id("issuer_ccf_id", &req.issuer_ccf_id)?
        };
        if issuer == self.state.ccf_id {
            return Ok(Response::new(self.state.own_key_set().await));
        }
        let Some(gw) = &self.state.gateway else {
            return Err(Refused::NoInterconnectForIssuer {
                issuer,
                own: self.state.ccf_id.clone(),
            }
            .into());
        };
        let mut r = Request::new(TokenKeySetRequest {
            issuer_ccf_id: issuer.to_string(),
            unknown_kid: req.unknown_kid,
        });
        r.set_timeout(ccf_core::grpc::inner_budget(budget));
        let set = gw
            .clone()
            .fetch_token_key_set(r)
            .await
            .map_err(|s| self.gateway_failure(s))?;
        Ok(Response::new(set.into_inner()))
    }
}

/// Method 3: only the client-credentials grant, and only for the caller's own invoker id.
pub(super) fn check_client_credentials(
    id: &ApiInvokerId,
    req: &AccessTokenReq,
) -> Result<(), Status> {
    if req.grant_type != "client_credentials" {
        return Err(Refused::UnsupportedGrantType {
            grant_type: req.grant_type.clone(),
        }
        .into());
    }
    if req.client_id != id.as_str() {
        return Err(Refused::ClientIdNotTheCaller {
            invoker: id.clone(),
        }
        .into());
    }
    Ok(())
}

/// The invoker's security contexts with method OAUTH that are still valid at `now`; at least
/// one is needed for a token.
async fn oauth_contexts(
    state: &CcfState,
    id: &ApiInvokerId,
    now: u64,
) -> Result<Vec<SecurityContext>, Status> {
    let contexts: Vec<SecurityContext> = state
        .store
        .contexts_of(id)
        .await
        .map_err(store_status)?
        .into_iter()
        .filter(|c| c.method == SecurityMethod::Oauth && c.expires_at_ms > now)
        .collect();
    if contexts.is_empty() {
        return Err(Refused::NoOauthContext {
            invoker: id.clone(),
        }
        .into());
    }
    Ok(contexts)
}

/// What is granted: the asked scope, each part checked against a context; or, when no scope is
/// asked, everything the OAUTH contexts allow. With it, the earliest expiry of the contexts used.
fn granted_scope(
    id: &ApiInvokerId,
    asked: &Scope,
    contexts: &[SecurityContext],
) -> Result<(Scope, u64), Status> {
    let mut granted = Vec::new();
    let mut context_end = u64::MAX;
    if asked.is_empty() {
        for c in contexts {
            granted.push((c.aef_id.clone(), c.allowed_apis.clone()));
            context_end = context_end.min(c.expires_at_ms);
        }
    } else {
        for (aef, apis) in &asked.0 {
            let Some(c) = contexts.iter().find(|c| &c.aef_id == aef) else {
                return Err(Refused::ScopeAefNotAuthorized {
                    invoker: id.clone(),
                    aef: aef.clone(),
                }
                .into());
            };
            if let Some(api) = apis.iter().find(|a| !c.allowed_apis.contains(a)) {
                return Err(Refused::ScopeApiNotAuthorized {
                    invoker: id.clone(),
                    api: api.clone(),
                    aef: aef.clone(),
                }
                .into());
            }
            granted.push((aef.clone(), apis.clone()));
            context_end = context_end.min(c.expires_at_ms);
        }
    }
    Ok((Scope(granted), context_end))
}

/// Signs the token with the current key; a failure is logged here and answered as internal.
fn sign_access_token(state: &CcfState, claims: &AccessTokenClaims) -> Result<String, Status> {
    state.token_keys.sign(claims).map_err(|e| {
        tracing::error!(error = %e, "cannot sign an access token");
        Status::from(Refused::TokenSigningFailed)
    })
}
