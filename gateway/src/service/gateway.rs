//! `Gateway` (CAPIF-6): the own CCF asks for an invoker of another domain; answered from the
//! cache or fetched from that domain's gateway. Also where the own CCF publishes revocations,
//! queued durably for every partner that fetched the invoker's keys (the outbox delivers them),
//! and evicts a partner's invoker it revoked at its own AEFs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use capif_proto::v1::{
    InvokerSecurityInformation, RevocationAck, RevocationNotice, SecurityInformationQuery,
    SecurityMethod, TokenKeySet, TokenKeySetRequest, gateway_server::Gateway,
};
use ccf_core::clock::now_ms;
use ccf_core::delivery::NoticeId;
use ccf_core::grpc::{budget, caller, error_chain, inner_budget, invalid_field};
use ccf_core::identity::Role;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError, KeyId};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Refused, horizon, notice_aef_ids, query_ids, require, store_status};
use crate::metrics::Direction;
use crate::state::GatewayState;
use crate::trust::{InvokerCaError, PartnerTrust};

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
        let started = Instant::now();
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Ccf,
            "ask the gateway for foreign invokers",
        )?;
        let deadline = self.deadline(&request);
        let q = request.into_inner();
        let (invoker, home, aef) = query_ids(&q)?;
        if home == self.state.ccf_id {
            return Err(invalid_field(
                "home_ccf_id",
                "names this domain; ask the CCF directly",
            ));
        }
        let Some(link) = self.state.link(&home) else {
            return Err(Refused::NotAPartner {
                partner: home,
                own: self.state.ccf_id.clone(),
            }
            .into());
        };
        let key = self.state.cache.key(&home, invoker.clone(), &aef);
        let method = q.security_method;
        let presented = q.presented_key_id.clone();
        let trust = self.state.trust(&home);
        let outbound = q;
        // The span is opened when a fetch runs, not per request: a hit (the hot path) is one
        // lookup, and a span with three formatted fields would cost more than the lookup itself.
        // The request keeps its server span either way.
        // Runs on a miss only; boxed when it runs, so that the hit path's future does not
        // carry the link call's state.
        let fetch = async {
            let span = tracing::info_span!("fetch", partner = %home, api_invoker_id = %invoker, aef_id = %aef);
            Box::pin(async {
                link.take_fetch()?;
                let info = link
                    .call(deadline, move |mut client, remaining| {
                        let mut r = Request::new(outbound.clone());
                        r.set_timeout(remaining);
                        async move { client.fetch_security_information(r).await }
                    })
                    .await?;
                // The answer must be about what was asked, before anything of it is cached.
                if let Err(refused) = check_answer(&info, &invoker, &home, &aef, trust.as_deref())
                {
                    tracing::warn!(partner = %home, error = %error_chain(&refused), "partner answer refused");
                    return Err(refused.into());
                }
                // Misses are few (each takes from the partner's fetch budget): worth a line each.
                tracing::info!(partner = %home, key_id = %info.key_id, remaining_ms = info.remaining_validity_ms, "security information fetched from partner");
                Ok(info)
            })
            .instrument(span)
            .await
        };
        let (result, served) = self
            .state
            .cache
            .get_or_fetch_served(key, &presented, method, fetch)
            .await;
        let metrics = link.metrics();
        metrics.request(Direction::Outbound, "FetchSecurityInformation", &result);
        metrics.fetch_served(served, started.elapsed());
        match &result {
            // The hit path is hot: one log line per answer would cost more than the lookup.
            Ok(info) => {
                tracing::debug!(partner = %home, api_invoker_id = %invoker, aef_id = %aef, key_id = %info.key_id, remaining_ms = info.remaining_validity_ms, "security information served")
            }
            Err(s) => {
                tracing::info!(partner = %home, api_invoker_id = %invoker, aef_id = %aef, code = ?s.code(), error = %s.message(), "security information refused")
            }
        }
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
            return Err(invalid_field(
                "home_ccf_id",
                "a CCF publishes revocations of its own invokers only",
            ));
        }
        let invoker = ApiInvokerId::new(notice.api_invoker_id.clone())
            .map_err(|e| invalid_field("api_invoker_id", e))?;
        let id = NoticeId::new(&notice.notice_id).map_err(|e| invalid_field("notice_id", e))?;
        let now = now_ms();
        let seen_until = horizon(&self.state, notice.not_after_unix_ms, now);
        // One durable transaction: what is acknowledged below is on disk.
        let queued = self
            .state
            .store
            .queue_for_fetchers(&notice, &id, &invoker, now, seen_until, |p| {
                self.state.link(p).is_some()
            })
            .await
            .map_err(store_status)?;
        let Some(partners) = queued else {
            self.state
                .duplicate_revocations
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(api_invoker_id = %invoker, notice_id = %id, "revocation published again; already queued");
            return Ok(Response::new(RevocationAck {
                entries_removed: 0,
                forwarded: 0,
                duplicate: true,
            }));
        };
        self.state
            .revocations_published
            .fetch_add(1, Ordering::Relaxed);
        crate::outbox::remember_trace(&self.state, &notice.notice_id);
        for p in &partners {
            self.state.outbox.wake_partner(p);
        }
        // The own CCF is up: what waits for it goes now.
        self.state.outbox.wake(&crate::store::Destination::OwnCcf);
        tracing::info!(api_invoker_id = %invoker, notice_id = %id, partners = ?partners, kind = ?notice.kind(), "revocation queued for partners");
        Ok(Response::new(RevocationAck {
            entries_removed: 0,
            forwarded: partners.len() as u32,
            duplicate: false,
        }))
    }

    async fn evict_partner_invoker(
        &self,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Ccf,
            "evict a partner's invoker from the cache",
        )?;
        let notice = request.into_inner();
        let home =
            CcfId::new(notice.home_ccf_id.clone()).map_err(|e| invalid_field("home_ccf_id", e))?;
        if home == self.state.ccf_id {
            return Err(invalid_field(
                "home_ccf_id",
                "names this domain; its invokers are not cached here",
            ));
        }
        if self.state.link(&home).is_none() {
            return Err(Refused::NotAPartner {
                partner: home,
                own: self.state.ccf_id.clone(),
            }
            .into());
        }
        let invoker = ApiInvokerId::new(notice.api_invoker_id.clone())
            .map_err(|e| invalid_field("api_invoker_id", e))?;
        let aefs = notice_aef_ids(&notice.aef_ids)?;
        let removed = self.state.cache.revoke(&home, &invoker, &aefs).await;
        // The domain's other replicas cache too (PostgreSQL store; a no-op on redb). Not
        // durable: see `RevocationStore::broadcast_eviction`.
        let eviction = crate::store::Eviction {
            home: home.clone(),
            invoker: invoker.clone(),
            aefs,
            key_id: None,
        };
        if let Err(e) = self.state.store.broadcast_eviction(&eviction).await {
            tracing::warn!(error = %e, "could not tell the other replicas to evict");
        }
        tracing::info!(partner = %home, api_invoker_id = %invoker, aefs = ?notice.aef_ids, removed, "partner's invoker evicted at the own CCF's request");
        Ok(Response::new(RevocationAck {
            entries_removed: u32::try_from(removed).unwrap_or(u32::MAX),
            forwarded: 0,
            duplicate: false,
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
            CcfId::new(req.issuer_ccf_id.clone()).map_err(|e| invalid_field("issuer_ccf_id", e))?;
        let Some(link) = self.state.link(&issuer) else {
            return Err(Refused::NotAPartner {
                partner: issuer,
                own: self.state.ccf_id.clone(),
            }
            .into());
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
                return Err(Refused::KeySetMismatch {
                    issuer: issuer.clone(),
                    sent: set.issuer_ccf_id,
                }
                .into());
            }
            tracing::info!(partner = %issuer, keys = set.keys.len(), "partner token keys fetched");
            Ok(set)
        };
        let result = self
            .state
            .key_sets
            .get_or_fetch(&issuer, &req.unknown_kid, fetch)
            .await;
        link.metrics()
            .request(Direction::Outbound, "FetchTokenKeySet", &result);
        Ok(Response::new((*result?).clone()))
    }
}

/// How a partner's answer differs from what was asked, or why it is malformed.
#[derive(Debug, thiserror::Error)]
pub enum AnswerMismatch {
    /// It is about another invoker.
    #[error("api_invoker_id {0:?}")]
    Invoker(String),
    /// It is about an invoker of another home domain.
    #[error("home_ccf_id {0:?}")]
    Home(String),
    /// It is about another AEF.
    #[error("aef_id {0:?}")]
    Aef(String),
    /// A PSK answer whose key id is not one.
    #[error("{0}")]
    KeyId(#[source] IdError),
    /// A PSK answer without a 32-byte AEFPSK.
    #[error("a PSK answer without a 32-byte AEFPSK")]
    PskLength,
}

/// Whether a partner's answer may be cached and served: it is about what was asked
/// ([`answer_matches`]) and, for method 2, names only the CA the federation trusts for that
/// partner (`trust`, `None` when the domain is not a configured partner).
pub(super) fn check_answer(
    info: &InvokerSecurityInformation,
    invoker: &ApiInvokerId,
    home: &CcfId,
    aef: &AefId,
    trust: Option<&PartnerTrust>,
) -> Result<(), Refused> {
    answer_matches(info, invoker, home, aef).map_err(|why| Refused::AnswerMismatch {
        partner: home.clone(),
        why,
    })?;
    if info.sel_security_method != SecurityMethod::Pki as i32 {
        return Ok(());
    }
    let Some(trust) = trust else {
        return Err(InvokerCaError::NotAPartner {
            partner: home.clone(),
        }
        .into());
    };
    Ok(trust.check_invoker_cas(&info.invoker_ca_certificates)?)
}

/// Whether a partner's answer is about the invoker, home and AEF asked for, and is well formed
/// (a PSK answer carries a 32-byte key and a key id of the right syntax).
pub(super) fn answer_matches(
    info: &InvokerSecurityInformation,
    invoker: &ApiInvokerId,
    home: &CcfId,
    aef: &AefId,
) -> Result<(), AnswerMismatch> {
    if info.api_invoker_id != invoker.as_str() {
        return Err(AnswerMismatch::Invoker(info.api_invoker_id.clone()));
    }
    if info.home_ccf_id != home.as_str() {
        return Err(AnswerMismatch::Home(info.home_ccf_id.clone()));
    }
    if info.aef_id != aef.as_str() {
        return Err(AnswerMismatch::Aef(info.aef_id.clone()));
    }
    if info.sel_security_method == SecurityMethod::Psk as i32 {
        KeyId::new(info.key_id.as_str()).map_err(AnswerMismatch::KeyId)?;
        if info.aef_psk.len() != 32 {
            return Err(AnswerMismatch::PskLength);
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

    type Tamper = fn(&mut InvokerSecurityInformation);
    type Expect = fn(&AnswerMismatch) -> bool;

    #[test]
    fn partner_answers_must_match_the_request() {
        let (inv, home, aef) = (
            ApiInvokerId::new("inv-1").unwrap(),
            CcfId::new("operator-b.test").unwrap(),
            AefId::new("aef-a1").unwrap(),
        );
        assert!(answer_matches(&info(), &inv, &home, &aef).is_ok());
        let bad: [(Tamper, Expect); 5] = [
            (
                |i| i.api_invoker_id = "inv-2".into(),
                |e| matches!(e, AnswerMismatch::Invoker(x) if x == "inv-2"),
            ),
            (
                |i| i.home_ccf_id = "operator-c.test".into(),
                |e| matches!(e, AnswerMismatch::Home(_)),
            ),
            (
                |i| i.aef_id = "aef-a2".into(),
                |e| matches!(e, AnswerMismatch::Aef(_)),
            ),
            (
                |i| i.key_id = "XYZ".into(),
                |e| matches!(e, AnswerMismatch::KeyId(_)),
            ),
            (
                |i| i.aef_psk = vec![1; 5],
                |e| matches!(e, AnswerMismatch::PskLength),
            ),
        ];
        for (n, (f, expected)) in bad.iter().enumerate() {
            let mut i = info();
            f(&mut i);
            let e = answer_matches(&i, &inv, &home, &aef).unwrap_err();
            assert!(expected(&e), "case {n}: {e:?}");
        }
    }
}
