//! gRPC statuses with a stable reason (`google.rpc.ErrorInfo`, domain `capif.v1`), and error
//! chains for messages: the bottom of the gRPC plumbing, below `tls`, `limits` and `grpc`, so
//! that each of them can build statuses without depending on the others.
//!
//! Refusals are typed: each crate's error enums implement [`Refusal`], which is the one place
//! where a refusal's variant is mapped to its gRPC code and `ErrorReason`; the status message is
//! the error's `Display`. A status received from a peer is read back with [`reason_of`], as an
//! `ErrorReason` value, never by comparing strings. [`UpstreamError`] is the one rule for what a
//! hop answers when a call to the next component fails (invariant 5: no address leaks).

use std::collections::HashMap;

use capif_proto::v1::ErrorReason;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A status whose details carry `google.rpc.ErrorInfo { reason, domain: "capif.v1" }`.
pub fn error_status(code: Code, reason: ErrorReason, message: impl Into<String>) -> Status {
    status_with_reason(code, reason.as_str_name(), message)
}

/// Like [`error_status`] with the reason as text (to re-create a status received from a peer).
pub fn status_with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason,
            capif_proto::ERROR_DOMAIN,
            HashMap::<String, String>::new(),
        ),
    )
}

/// The ErrorInfo reason of a status, if it carries one, as text (a peer may send a reason this
/// build does not know; it is passed on unchanged).
pub fn error_reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|i| i.reason)
}

/// The ErrorInfo reason of a status as an [`ErrorReason`]: `None` when it carries none, or one
/// this build does not know. Match on this, never on the reason's text.
pub fn reason_of(status: &Status) -> Option<ErrorReason> {
    status
        .get_details_error_info()
        .and_then(|i| ErrorReason::from_str_name(&i.reason))
}

/// A refusal of a request field: `INVALID_ARGUMENT` / `INVALID_FIELD`, "`field`: `why`".
pub fn invalid_field(field: &str, why: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        ErrorReason::InvalidField,
        format!("{field}: {why}"),
    )
}

/// A typed refusal: an error whose every variant names the gRPC code and the `ErrorReason` it is
/// answered with. Implementations are the one place that mapping is written; services turn the
/// error into a status with [`Refusal::status`] (or `?`, through a `From<_> for Status` that
/// calls it).
pub trait Refusal: std::error::Error {
    /// The gRPC code of the answer.
    fn code(&self) -> Code;

    /// The stable reason in the answer's ErrorInfo.
    fn reason(&self) -> ErrorReason;

    /// The answer: code, reason, and the error's `Display` as the message. Sources are not
    /// sent (they are for logs): a source may name what the peer must not learn.
    fn status(&self) -> Status {
        error_status(self.code(), self.reason(), self.to_string())
    }
}

/// Why a call to another component of the federation failed, as this hop answers its own caller.
/// Built by [`UpstreamError::from_status`] / [`UpstreamError::timeout`], the one rule (invariant
/// 5, topology hiding): a refusal that carries a reason is the component's definite answer and
/// passes on unchanged; any other failure (a transport error, whose text may name internal
/// addresses and ports) becomes a plain `PARTNER_UNAVAILABLE` that names the component only by
/// its role and domain; a call that ran out of its deadline becomes `PARTNER_TIMEOUT`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The component refused with a reason: answered as it came.
    #[error("{}", .0.message())]
    Refused(Status),
    /// The component could not be reached, or failed without a reason. `source` is what the
    /// transport said, for logs only.
    #[error("{what} is unavailable")]
    Unavailable {
        /// The component, by role and domain ("the CCF of operator-b.test").
        what: String,
        /// The failure as the transport reported it (may name addresses: never sent on).
        #[source]
        source: Status,
    },
    /// The component did not answer within the deadline.
    #[error("{what} did not answer within the deadline")]
    Timeout {
        /// The component, by role and domain.
        what: String,
    },
}

impl UpstreamError {
    /// A failed call to `what` (a phrase naming the component by role and domain, never by
    /// address): a refusal with a reason passes, anything else is [`UpstreamError::Unavailable`].
    pub fn from_status(what: impl Into<String>, status: Status) -> Self {
        if error_reason(&status).is_some() {
            Self::Refused(status)
        } else {
            Self::Unavailable {
                what: what.into(),
                source: status,
            }
        }
    }

    /// A call to `what` that ran out of its deadline.
    pub fn timeout(what: impl Into<String>) -> Self {
        Self::Timeout { what: what.into() }
    }
}

impl Refusal for UpstreamError {
    fn code(&self) -> Code {
        match self {
            Self::Refused(s) => s.code(),
            Self::Unavailable { .. } => Code::Unavailable,
            Self::Timeout { .. } => Code::DeadlineExceeded,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            Self::Refused(s) => reason_of(s).unwrap_or(ErrorReason::Unspecified),
            Self::Unavailable { .. } => ErrorReason::PartnerUnavailable,
            Self::Timeout { .. } => ErrorReason::PartnerTimeout,
        }
    }

    /// A refusal goes back exactly as it came (its reason, even one this build does not know,
    /// and its metadata); the others are built from the variant.
    fn status(&self) -> Status {
        match self {
            Self::Refused(s) => s.clone(),
            _ => error_status(self.code(), self.reason(), self.to_string()),
        }
    }
}

impl From<UpstreamError> for Status {
    fn from(e: UpstreamError) -> Self {
        e.status()
    }
}

/// The error and its sources, joined, for messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_as_values() {
        let s = error_status(Code::NotFound, ErrorReason::UnknownPartner, "x");
        assert_eq!(reason_of(&s), Some(ErrorReason::UnknownPartner));
        assert_eq!(reason_of(&Status::unavailable("x")), None);
        let unknown = status_with_reason(Code::NotFound, "FROM_A_NEWER_RELEASE", "x");
        assert_eq!(reason_of(&unknown), None);
        assert_eq!(
            error_reason(&unknown).as_deref(),
            Some("FROM_A_NEWER_RELEASE")
        );
        let s = invalid_field("aef_id", "is empty");
        assert_eq!(
            (s.code(), reason_of(&s)),
            (Code::InvalidArgument, Some(ErrorReason::InvalidField))
        );
        assert_eq!(s.message(), "aef_id: is empty");
    }

    /// Invariant 5: a definite refusal passes unchanged (even a reason this build does not
    /// know); a transport failure becomes PARTNER_UNAVAILABLE naming the component only; a
    /// timeout becomes PARTNER_TIMEOUT.
    #[test]
    fn upstream_failures_pass_refusals_and_hide_transport_errors() {
        let what = "the CCF of operator-b.test";
        let refusal = status_with_reason(Code::PermissionDenied, "FROM_A_NEWER_RELEASE", "no");
        let e = UpstreamError::from_status(what, refusal);
        assert!(matches!(e, UpstreamError::Refused(_)));
        let s = e.status();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(error_reason(&s).as_deref(), Some("FROM_A_NEWER_RELEASE"));
        assert_eq!(s.message(), "no");

        let transport = Status::unavailable("tcp connect error: 10.1.2.3:7443: refused");
        let e = UpstreamError::from_status(what, transport);
        assert!(matches!(e, UpstreamError::Unavailable { .. }));
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(reason_of(&s), Some(ErrorReason::PartnerUnavailable));
        assert_eq!(s.message(), "the CCF of operator-b.test is unavailable");
        assert!(!format!("{s:?}").contains("10.1.2.3"), "{s:?}");

        let s = UpstreamError::timeout(what).status();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert_eq!(reason_of(&s), Some(ErrorReason::PartnerTimeout));
    }
}
