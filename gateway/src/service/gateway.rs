//! `Gateway` (CAPIF-6): the own CCF asks for an invoker of another domain; answered from the
//! cache or fetched from that domain's gateway. Also where the own CCF publishes revocations,
//! which are pushed to every partner that fetched the invoker's keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capif_proto::v1::{
    ErrorReason, InvokerSecurityInformation, RevocationAck, RevocationKind, RevocationNotice,
    SecurityInformationQuery, SecurityMethod, TokenKeySet, TokenKeySetRequest,
    gateway_server::Gateway,
};
use ccf_core::grpc::{budget, caller, error_status, inner_budget};
use ccf_core::identity::Role;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, KeyId};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::{ids, invalid, require};
use crate::cache::CacheKey;
use crate::state::GatewayState;

/// How long a revocation push to one partner may take.
const PUSH_DEADLINE: Duration = Duration::from_secs(2);

/// The Gateway service.
#[derive(Clone, Debug)]
pub struct GatewayService {
    state: Arc<GatewayState>,
}

impl GatewayService {
    /// Over the gateway's state.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }

    /// When a call made for `request` must be answered: its budget, minus the reserve that lets
    /// a failure reach the caller with its reason.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        Instant::now()
            + inner_budget(budget(
                request,
                self.state.default_budget,
                self.state.max_budget,
            ))
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn fetch_security_information(
        &self,
        request: Request<SecurityInformationQuery>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Ccf,
            "ask the gateway for foreign invokers",
        )?;
        let deadline = self.deadline(&request);
        let q = request.into_inner();
        let (invoker, home, aef) = ids(&q.api_invoker_id, &q.home_ccf_id, &q.aef_id)?;
        KeyId::optional(&q.presented_key_id).map_err(|e| invalid("presented_key_id", e))?;
        if home == self.state.ccf_id {
            return Err(invalid(
                "home_ccf_id",
                "names this domain; ask the CCF directly",
            ));
        }
        let Some(link) = self.state.links.get(&home) else {
            return Err(error_status(
                Code::NotFound,
                ErrorReason::UnknownPartner,
                format!("{home} is not a partner of {}", self.state.ccf_id),
            ));
        };
        let span =
            tracing::info_span!("fetch", partner = %home, api_invoker_id = %invoker, aef_id = %aef);
        let key = CacheKey {
            home: home.clone(),
            invoker: invoker.clone(),
            aef: aef.clone(),
        };
        let presented = q.presented_key_id.clone();
        let outbound = q.clone();
        let trust = self.state.federation.get(&home);
        let fetch = async {
            link.take_fetch()?;
            let info = link
                .call(deadline, move |mut client, remaining| {
                    let mut r = Request::new(outbound.clone());
                    r.set_timeout(remaining);
                    async move { client.fetch_security_information(r).await }
                })
                .await?;
            // The answer must be about what was asked, before anything of it is cached.
            if let Err(why) = answer_matches(&info, &invoker, &home, &aef) {
                tracing::warn!(partner = %home, error = %why, "partner answer refused");
                return Err(error_status(
                    Code::PermissionDenied,
                    ErrorReason::IdentityMismatch,
                    format!("partner {home} answered about something else: {why}"),
                ));
            }
            // Method 2: the CA the partner names must be the one we trust for it.
            if info.sel_security_method == SecurityMethod::Pki as i32 {
                let verdict = trust
                    .map(|t| t.check_invoker_cas(&info.invoker_ca_certificates))
                    .unwrap_or_else(|| Err(format!("{home} has no configured CA")));
                if let Err(why) = verdict {
                    tracing::warn!(partner = %home, error = %why, "partner answer refused");
                    return Err(error_status(
                        Code::PermissionDenied,
                        ErrorReason::CaNotFederated,
                        why,
                    ));
                }
            }
            Ok(info)
        };
        let result = self
            .state
            .cache
            .get_or_fetch(key, &presented, q.security_method, fetch)
            .instrument(span.clone())
            .await;
        span.in_scope(|| match &result {
            // The hit path is hot: one log line per answer would cost more than the lookup.
            Ok(info) => tracing::debug!(key_id = %info.key_id, remaining_ms = info.remaining_validity_ms, "security information served"),
            Err(s) => tracing::info!(code = ?s.code(), error = %s.message(), "security information refused"),
        });
        result.map(Response::new)
    }

    async fn publish_revocation(
        &self,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let who = caller(&request)?;
        require(&self.state, &who, Role::Ccf, "publish revocations")?;
        let notice = request.into_inner();
        if notice.home_ccf_id != self.state.ccf_id.as_str() {
            return Err(invalid(
                "home_ccf_id",
                "a CCF publishes revocations of its own invokers only",
            ));
        }
        let invoker = ApiInvokerId::new(notice.api_invoker_id.clone())
            .map_err(|e| invalid("api_invoker_id", e))?;
        let forget = notice.kind() == RevocationKind::Offboarded;
        let partners = self.state.fetchers_of(&invoker, forget);
        let mut pushes = tokio::task::JoinSet::new();
        for p in partners {
            let state = self.state.clone();
            let notice = notice.clone();
            pushes.spawn(async move {
                let link = state.links.get(&p)?;
                let deadline = Instant::now() + PUSH_DEADLINE;
                let r = link
                    .call(deadline, move |mut c, remaining| {
                        let mut r = Request::new(notice.clone());
                        r.set_timeout(remaining);
                        async move { c.notify_revocation(r).await }
                    })
                    .await;
                match r {
                    Ok(_) => Some(()),
                    Err(e) => {
                        tracing::warn!(partner = %p, error = %e.message(), "revocation push failed");
                        None
                    }
                }
            });
        }
        let mut forwarded = 0;
        while let Some(r) = pushes.join_next().await {
            if matches!(r, Ok(Some(()))) {
                forwarded += 1;
            }
        }
        tracing::info!(api_invoker_id = %invoker, forwarded, kind = ?notice.kind(), "revocation pushed to partners");
        Ok(Response::new(RevocationAck {
            entries_removed: 0,
            forwarded,
        }))
    }

    async fn fetch_token_key_set(
        &self,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Ccf,
            "ask the gateway for partners' token keys",
        )?;
        let deadline = self.deadline(&request);
        let req = request.into_inner();
        let issuer =
            CcfId::new(req.issuer_ccf_id.clone()).map_err(|e| invalid("issuer_ccf_id", e))?;
        let Some(link) = self.state.links.get(&issuer) else {
            return Err(error_status(
                Code::NotFound,
                ErrorReason::UnknownPartner,
                format!("{issuer} is not a partner of {}", self.state.ccf_id),
            ));
        };
        let outbound = TokenKeySetRequest {
            issuer_ccf_id: issuer.to_string(),
            unknown_kid: String::new(),
        };
        let fetch = async {
            link.take_fetch()?;
            let set = link
                .call(deadline, move |mut client, remaining| {
                    let mut r = Request::new(outbound.clone());
                    r.set_timeout(remaining);
                    async move { client.get_token_key_set(r).await }
                })
                .await?;
            if set.issuer_ccf_id != issuer.as_str() {
                return Err(error_status(
                    Code::PermissionDenied,
                    ErrorReason::IdentityMismatch,
                    format!(
                        "{issuer}'s gateway sent the key set of {:?}",
                        set.issuer_ccf_id
                    ),
                ));
            }
            tracing::info!(partner = %issuer, keys = set.keys.len(), "partner token keys fetched");
            Ok(set)
        };
        let set = self
            .state
            .key_sets
            .get_or_fetch(&issuer, &req.unknown_kid, fetch)
            .await?;
        Ok(Response::new((*set).clone()))
    }
}

/// Whether a partner's answer is about the invoker, home and AEF asked for, and is well formed
/// (a PSK answer carries a 32-byte key and a key id of the right syntax).
fn answer_matches(
    info: &InvokerSecurityInformation,
    invoker: &ApiInvokerId,
    home: &CcfId,
    aef: &AefId,
) -> Result<(), String> {
    if info.api_invoker_id != invoker.as_str() {
        return Err(format!("api_invoker_id {:?}", info.api_invoker_id));
    }
    if info.home_ccf_id != home.as_str() {
        return Err(format!("home_ccf_id {:?}", info.home_ccf_id));
    }
    if info.aef_id != aef.as_str() {
        return Err(format!("aef_id {:?}", info.aef_id));
    }
    if info.sel_security_method == SecurityMethod::Psk as i32 {
        KeyId::new(info.key_id.as_str()).map_err(|e| e.to_string())?;
        if info.aef_psk.len() != 32 {
            return Err("a PSK answer without a 32-byte AEFPSK".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> InvokerSecurityInformation {
        InvokerSecurityInformation {
            api_invoker_id: "inv-1".into(),
            home_ccf_id: "operator-b.test".into(),
            aef_id: "aef-a1".into(),
            sel_security_method: SecurityMethod::Psk as i32,
            aef_psk: vec![7; 32],
            key_id: "0123456789abcdef".into(),
            ..Default::default()
        }
    }

    #[test]
    fn partner_answers_must_match_the_request() {
        let (inv, home, aef) = (
            ApiInvokerId::new("inv-1").unwrap(),
            CcfId::new("operator-b.test").unwrap(),
            AefId::new("aef-a1").unwrap(),
        );
        assert!(answer_matches(&info(), &inv, &home, &aef).is_ok());
        let bad: [fn(&mut InvokerSecurityInformation); 5] = [
            |i| i.api_invoker_id = "inv-2".into(),
            |i| i.home_ccf_id = "operator-c.test".into(),
            |i| i.aef_id = "aef-a2".into(),
            |i| i.key_id = "XYZ".into(),
            |i| i.aef_psk = vec![1; 5],
        ];
        for (n, f) in bad.iter().enumerate() {
            let mut i = info();
            f(&mut i);
            assert!(answer_matches(&i, &inv, &home, &aef).is_err(), "case {n}");
        }
    }
}
