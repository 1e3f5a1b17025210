//! The gRPC contract of the CAPIF interconnect federation gateway.
//!
//! Every service of every binary is defined in `proto/capif/v1/*.proto` and compiled here once:
//!
//! - `InvokerManagement` — onboarding and offboarding (CAPIF-1e, TS 29.222 API invoker management);
//! - `Security` — security method, security information, revocation, tokens (CAPIF-1e, CAPIF-3;
//!   TS 29.222 CAPIF_Security_API);
//! - `AefSecurity` — served by AEFs (TS 29.222 AEF_Security_API, plus our home-CCF field);
//! - `Federation` — served by a CCF to its own gateway (CAPIF-6);
//! - `Gateway`, `Interconnect`, `GatewayAdmin` — served by the interconnect gateway (CAPIF-6 towards
//!   its CCF, CAPIF-6e towards partner gateways, inspection).
//!
//! `FILE_DESCRIPTOR_SET` feeds gRPC server reflection so `grpcurl describe` shows the comments.

/// Generated messages and services of package `capif.v1`.
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("capif.v1");
}

mod redact;

/// Encoded `FileDescriptorSet` of every `capif.v1` file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capif_descriptor");

/// The `domain` of every `google.rpc.ErrorInfo` our services return.
pub const ERROR_DOMAIN: &str = "capif.v1";
