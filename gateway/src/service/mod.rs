//! The gateway's gRPC services: `Gateway` (CAPIF-6, called by the own CCF), `Interconnect`
//! (CAPIF-6e, called by partner gateways) and `GatewayAdmin` (the operator).

mod admin;
mod gateway;
mod interconnect;

pub use admin::AdminService;
pub use gateway::GatewayService;
pub use interconnect::InterconnectService;

use capif_proto::v1::ErrorReason;
use ccf_core::grpc::error_status;
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError};
use tonic::{Code, Status};

use crate::state::GatewayState;

pub(crate) fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        ErrorReason::InvalidField,
        format!("{field}: {e}"),
    )
}

pub(crate) fn parse<T>(
    field: &str,
    v: &str,
    f: impl FnOnce(&str) -> Result<T, IdError>,
) -> Result<T, Status> {
    f(v).map_err(|e| invalid(field, e))
}

pub(crate) fn ids(
    invoker: &str,
    home: &str,
    aef: &str,
) -> Result<(ApiInvokerId, CcfId, AefId), Status> {
    Ok((
        parse("api_invoker_id", invoker, |v| ApiInvokerId::new(v))?,
        parse("home_ccf_id", home, |v| CcfId::new(v))?,
        parse("aef_id", aef, |v| AefId::new(v))?,
    ))
}

/// The caller must be `role` of the own domain.
pub(crate) fn require(
    state: &GatewayState,
    who: &PeerIdentity,
    role: Role,
    what: &str,
) -> Result<(), Status> {
    if who.ccf_id != state.ccf_id || who.role != role {
        return Err(error_status(
            Code::PermissionDenied,
            ErrorReason::RoleNotAllowed,
            format!("{who} may not {what}"),
        ));
    }
    Ok(())
}
