//! gRPC statuses with a stable reason (`google.rpc.ErrorInfo`, domain `capif.v1`), and error
//! chains for messages: the bottom of the gRPC plumbing, below `tls`, `limits` and `grpc`, so
//! that each of them can build statuses without depending on the others.

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

/// The ErrorInfo reason of a status, if it carries one.
pub fn error_reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|i| i.reason)
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
