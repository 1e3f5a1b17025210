//! `Interconnect` (CAPIF-6e): what partner gateways may ask. The partner is the one its
//! certificate names AND whose CA issued it (`trust::Federation::authenticate`); the own CCF
//! decides, on that partner's behalf, whether the key may leave (invariant 1). Answers reveal no
//! internal address (invariant 5): every call to the own CCF goes through [`call_own_ccf`], whose
//! failures other than the CCF's definite refusals become a plain `PARTNER_UNAVAILABLE` or
//! `PARTNER_TIMEOUT` (`ccf_core::status::UpstreamError`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capif_proto::v1::{
    InvokerSecurityInformation, PartnerSecurityInformationRequest, RevocationAck, RevocationKind,
    RevocationNotice, SecurityInformationQuery, TokenKeySet, TokenKeySetRequest,
    federation_client::FederationClient, interconnect_server::Interconnect,
};
use ccf_core::clock::now_ms;
use ccf_core::delivery::NoticeId;
use ccf_core::grpc::{UpstreamError, budget, conn_info, error_chain, inner_budget, invalid_field};
use ccf_core::ids::{ApiInvokerId, CcfId};
use ccf_core::telemetry::TracedChannel;
use tonic::{Request, Response, Status};

use super::{Refused, horizon, notice_aef_ids, query_ids, store_status};
use crate::metrics::Direction;
use crate::state::GatewayState;
use crate::store::Destination;

/// Calls the own CCF (`own` names its domain) with `call`, under `budget`: sent as the request's
/// deadline and enforced here, so that a CCF that does not answer costs the partner no more than
/// its budget. A failure is mapped by `UpstreamError` (invariant 5): the CCF's refusal with a
/// reason passes unchanged; anything else names the CCF by its domain only, never its address
/// (which the transport's error, logged here, may contain).
pub(crate) async fn call_own_ccf<Q, A, F, Fut>(
    ccf: &FederationClient<TracedChannel>,
    own: &CcfId,
    budget: Duration,
    message: Q,
    call: F,
) -> Result<A, UpstreamError>
where
    F: FnOnce(FederationClient<TracedChannel>, Request<Q>) -> Fut,
    Fut: Future<Output = Result<Response<A>, Status>>,
{
    let mut r = Request::new(message);
    r.set_timeout(budget);
    let what = || format!("the CCF of {own}");
    let failure = match tokio::time::timeout(budget, call(ccf.clone(), r)).await {
        Ok(Ok(rsp)) => return Ok(rsp.into_inner()),
        Ok(Err(s)) => UpstreamError::from_status(what(), s),
        Err(_) => UpstreamError::timeout(what()),
    };
    if let UpstreamError::Unavailable { source, .. } = &failure {
        tracing::error!(error = %source.message(), "own CCF unreachable");
    }
    Err(failure)
}

/// The end of a certificate's validity (seconds since the epoch), or `None` when it cannot be
/// read (then nothing is remembered and every request verifies the chain again).
fn not_after_unix_secs(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// The audit record of a key leaving the domain towards a partner, written by the audit writer
/// (`ccf_core::audit`) in the trace context of the request that handed it over.
#[derive(Debug)]
pub struct KeyHandedToPartner {
    partner: CcfId,
    invoker: ApiInvokerId,
    key_id: String,
}

impl ccf_core::audit::AuditRecord for KeyHandedToPartner {
    fn write(self) {
        let Self {
            partner,
            invoker,
            key_id,
        } = self;
        tracing::info!(%partner, api_invoker_id = %invoker, key_id = %key_id, "key handed to partner");
    }
}

/// The Interconnect service.
#[derive(Clone, Debug)]
pub struct InterconnectService {
    state: Arc<GatewayState>,
}

impl InterconnectService {
    /// Over the gateway's state.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }

    fn partner<T>(&self, req: &Request<T>) -> Result<CcfId, Status> {
        let info = conn_info(req)?;
        let peer = info.peer.as_ref().ok_or(Refused::NoCertificate)?;
        // The federation as configured now: a partner removed by a reload is refused here on
        // its next request, even on a connection opened before. The chain was verified in the
        // handshake; it is verified again only when the snapshot changed since this connection
        // last verified it, or the certificate has expired since (the memo holds its notAfter).
        let partners = self.state.partners();
        let generation = partners.generation();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(partner) = info.verified.get(generation, now) {
            self.state.outbox.wake_partner(&partner);
            return Ok(partner);
        }
        let partner = partners
            .federation()
            .authenticate(&peer.cert_der)
            .map_err(|e| {
                info.verified.clear();
                tracing::warn!(remote = ?info.remote_addr, error = %error_chain(&e), "partner refused");
                Status::from(Refused::Untrusted(e))
            })?;
        if let Some(not_after) = not_after_unix_secs(&peer.cert_der) {
            info.verified.set(generation, not_after, partner.clone());
        }
        // The partner is back: what waits for it in the outbox goes now.
        self.state.outbox.wake_partner(&partner);
        Ok(partner)
    }

    /// The answer to a notice acted on before.
    fn duplicate(&self, partner: &CcfId, invoker: &ApiInvokerId, id: &NoticeId) -> RevocationAck {
        self.state
            .duplicate_revocations
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%partner, api_invoker_id = %invoker, notice_id = %id, "revocation received again; acknowledged without acting");
        RevocationAck {
            entries_removed: 0,
            forwarded: 0,
            duplicate: true,
        }
    }

    /// The own CCF, under `budget`: [`call_own_ccf`].
    async fn own_ccf<Q, A, F, Fut>(
        &self,
        budget: Duration,
        message: Q,
        call: F,
    ) -> Result<A, UpstreamError>
    where
        F: FnOnce(FederationClient<TracedChannel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<A>, Status>>,
    {
        call_own_ccf(&self.state.ccf, &self.state.ccf_id, budget, message, call).await
    }

    /// What this gateway passes on of a partner's request budget.
    fn budget<T>(&self, request: &Request<T>) -> Duration {
        inner_budget(budget(
            request,
            self.state.default_budget,
            self.state.max_budget,
        ))
    }
}

#[tonic::async_trait]
impl Interconnect for InterconnectService {
    async fn fetch_security_information(
        &self,
        request: Request<SecurityInformationQuery>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let partner = self.partner(&request)?;
        let result = self.fetch_for(partner.clone(), request).await;
        self.observe(&partner, "FetchSecurityInformation", &result);
        result
    }

    async fn notify_revocation(
        &self,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let partner = self.partner(&request)?;
        let result = self.notify_from(partner.clone(), request).await;
        self.observe(&partner, "NotifyRevocation", &result);
        if let (Ok(ack), Some(link)) = (&result, self.state.link(&partner)) {
            link.metrics().revocation_received(ack.get_ref().duplicate);
        }
        result
    }

    async fn get_token_key_set(
        &self,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let partner = self.partner(&request)?;
        let result = self.keys_for(partner.clone(), request).await;
        self.observe(&partner, "GetTokenKeySet", &result);
        result
    }
}

/// The answers, once the partner is authenticated; the trait methods count how each ended.
impl InterconnectService {
    /// Counts a partner's request and how it ended (the partner's series, if it is still one).
    fn observe<T>(&self, partner: &CcfId, rpc: &'static str, result: &Result<T, Status>) {
        if let Some(link) = self.state.link(partner) {
            link.metrics().request(Direction::Inbound, rpc, result);
        }
    }

    async fn fetch_for(
        &self,
        partner: CcfId,
        request: Request<SecurityInformationQuery>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let deadline = Instant::now() + self.budget(&request);
        let q = request.into_inner();
        let (invoker, home, _aef) = query_ids(&q)?;
        if home != self.state.ccf_id {
            return Err(invalid_field(
                "home_ccf_id",
                format!("this gateway serves {} only", self.state.ccf_id),
            ));
        }
        // The fetch record exists before the key can leave: a revocation at home while this
        // fetch is in flight finds the partner. Provisional: the longest a key may be valid,
        // from when the answer may at the latest arrive; lowered below to the real expiry.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let provisional = now_ms()
            + u64::try_from((remaining + self.state.max_key_validity).as_millis())
                .unwrap_or(u64::MAX / 2);
        let ask = PartnerSecurityInformationRequest {
            partner_ccf_id: partner.to_string(),
            query: Some(q),
        };
        // The record's durable write and the question to the own CCF run side by side (the
        // fsync is the miss path's largest cost at this hop); the answer leaves only once the
        // record is on disk. A revocation whose queueing ran before the record was committed
        // did not see it: then the CCF is asked again, after the record, so that it either
        // refuses or its later revocation finds the record (`RevocationStore::queue_epoch`).
        let epoch = self
            .state
            .store
            .queue_epoch_before_record()
            .await
            .map_err(store_status)?;
        let sent = now_ms();
        let (prior, answer) = tokio::join!(
            self.state
                .store
                .extend_fetch_grouped(&invoker, &partner, provisional),
            self.own_ccf(remaining, ask.clone(), |mut ccf, r| async move {
                ccf.get_security_information_for_partner(r).await
            })
        );
        let prior = prior.map_err(store_status)?;
        let moved = match &answer {
            Ok(_) => self.state.store.queue_epoch().await.map_err(store_status)? != epoch,
            Err(_) => false,
        };
        let (sent, answer) = if moved {
            tracing::debug!(api_invoker_id = %invoker, "a revocation was queued while the fetch record was written; asking the CCF again");
            let remaining = deadline.saturating_duration_since(Instant::now());
            let sent = now_ms();
            let again = self
                .own_ccf(remaining, ask, |mut ccf, r| async move {
                    ccf.get_security_information_for_partner(r).await
                })
                .await;
            (sent, again)
        } else {
            (sent, answer)
        };
        let handed = answer
            .as_ref()
            .ok()
            .map(|a| sent.saturating_add(a.remaining_validity_ms));
        // A key that left settles with the next group commit, off this request; a refusal (no
        // key left) settles here, so the provisional record is gone when the refusal arrives.
        let settled = if handed.is_some() {
            self.state
                .store
                .settle_fetch_queued(&invoker, &partner, provisional, prior, handed)
        } else {
            self.state
                .store
                .settle_fetch(&invoker, &partner, provisional, prior, handed)
                .await
        };
        if let Err(e) = settled {
            // The provisional record stays: a notice may reach the partner needlessly.
            tracing::warn!(error = %e, "could not settle a fetch record");
        }
        let answer = answer?;
        self.state
            .partner_requests_served
            .fetch_add(1, Ordering::Relaxed);
        self.state.audit.record(KeyHandedToPartner {
            partner,
            invoker,
            key_id: answer.key_id.clone(),
        });
        Ok(Response::new(answer))
    }

    async fn notify_from(
        &self,
        partner: CcfId,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let notice = request.into_inner();
        if notice.home_ccf_id != partner.as_str() {
            return Err(Refused::RevokesOthers { partner }.into());
        }
        let invoker = ApiInvokerId::new(notice.api_invoker_id.clone())
            .map_err(|e| invalid_field("api_invoker_id", e))?;
        let id = NoticeId::new(&notice.notice_id).map_err(|e| invalid_field("notice_id", e))?;
        let aefs = notice_aef_ids(&notice.aef_ids)?;
        if self
            .state
            .store
            .seen(&partner, &id)
            .await
            .map_err(store_status)?
        {
            return Ok(Response::new(self.duplicate(&partner, &invoker, &id)));
        }
        // Mark and evict first: once acknowledged, nothing of the invoker is served here, and
        // a fetch in flight cannot cache it again.
        let removed =
            if notice.kind() == RevocationKind::KeyReplacedByNewer && !notice.key_id.is_empty() {
                // Only the replaced key: a fetch of the newer one must not fail for it.
                self.state
                    .cache
                    .revoke_key(&partner, &invoker, &aefs, &notice.key_id)
                    .await
            } else {
                self.state.cache.revoke(&partner, &invoker, &aefs).await
            };
        let now = now_ms();
        let until = horizon(&self.state, notice.not_after_unix_ms, now);
        // Seen and queued for the own CCF in one durable transaction, before the ack.
        if !self
            .state
            .store
            .accept_from_partner(&notice, &id, now, until)
            .await
            .map_err(store_status)?
        {
            return Ok(Response::new(self.duplicate(&partner, &invoker, &id)));
        }
        crate::outbox::remember_trace(&self.state, &notice.notice_id);
        self.state.outbox.wake(&Destination::OwnCcf);
        self.state
            .revocations_received
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%partner, api_invoker_id = %invoker, notice_id = %id, removed, kind = ?notice.kind(), "revocation received");
        Ok(Response::new(RevocationAck {
            entries_removed: u32::try_from(removed).unwrap_or(u32::MAX),
            forwarded: 1,
            duplicate: false,
        }))
    }

    async fn keys_for(
        &self,
        partner: CcfId,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let remaining = self.budget(&request);
        let req = request.into_inner();
        if !req.issuer_ccf_id.is_empty() && req.issuer_ccf_id != self.state.ccf_id.as_str() {
            return Err(invalid_field(
                "issuer_ccf_id",
                format!("this gateway serves {} only", self.state.ccf_id),
            ));
        }
        let ask = TokenKeySetRequest {
            issuer_ccf_id: self.state.ccf_id.to_string(),
            unknown_kid: String::new(),
        };
        let set = self
            .own_ccf(remaining, ask, |mut ccf, r| async move {
                ccf.get_token_key_set(r).await
            })
            .await?;
        tracing::info!(%partner, "token keys handed to partner");
        Ok(Response::new(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capif_proto::v1::ErrorReason;
    use ccf_core::grpc::{Refusal, error_status, reason_of};
    use tonic::Code;

    fn own() -> CcfId {
        CcfId::new("operator-b.test").unwrap()
    }

    /// A client of a CCF that is not there: a lazy channel to a port nobody listens on.
    async fn dead_ccf() -> (FederationClient<TracedChannel>, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        (
            FederationClient::new(TracedChannel::new(ch, addr.as_str())),
            addr,
        )
    }

    fn ask() -> TokenKeySetRequest {
        TokenKeySetRequest::default()
    }

    /// Invariant 5, at the one place the gateway calls its CCF: an unreachable CCF becomes
    /// PARTNER_UNAVAILABLE naming neither its address nor its port; one that does not answer in
    /// time becomes PARTNER_TIMEOUT; a refusal of the CCF passes unchanged.
    #[tokio::test]
    async fn own_ccf_failures_hide_the_ccfs_address() {
        let (ccf, addr) = dead_ccf().await;
        let port = addr.rsplit(':').next().unwrap().to_string();
        let e = call_own_ccf(
            &ccf,
            &own(),
            Duration::from_secs(2),
            ask(),
            |mut c, r| async move { c.get_token_key_set(r).await },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, UpstreamError::Unavailable { .. }), "{e:?}");
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(reason_of(&s), Some(ErrorReason::PartnerUnavailable));
        let seen = format!("{} {:?}", s.message(), s.metadata());
        assert!(!seen.contains(&addr) && !seen.contains(&port), "{seen}");
        assert!(s.message().contains("operator-b.test"), "{}", s.message());

        let e = call_own_ccf(
            &ccf,
            &own(),
            Duration::from_millis(50),
            ask(),
            |_, _| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Response::new(TokenKeySet::default()))
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, UpstreamError::Timeout { .. }), "{e:?}");
        assert_eq!(
            (e.code(), e.reason()),
            (Code::DeadlineExceeded, ErrorReason::PartnerTimeout)
        );

        let e = call_own_ccf(&ccf, &own(), Duration::from_secs(1), ask(), |_, _| async {
            Err::<Response<TokenKeySet>, _>(error_status(
                Code::PermissionDenied,
                ErrorReason::PartnerNotAuthorized,
                "not yours",
            ))
        })
        .await
        .unwrap_err();
        let s = Status::from(e);
        assert_eq!(
            (s.code(), reason_of(&s), s.message()),
            (
                Code::PermissionDenied,
                Some(ErrorReason::PartnerNotAuthorized),
                "not yours"
            )
        );
    }
}
