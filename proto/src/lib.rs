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

/// A security-information answer of representative size (a PSK context with two APIs), for the
/// benchmark: its floor hops answer it and the gateway's cache-memory case caches it, so both
/// measure the same bytes. The key bytes are a fixed pattern, not a key.
pub fn example_security_information() -> v1::InvokerSecurityInformation {
    v1::InvokerSecurityInformation {
        api_invoker_id: "inv-0123456789abcdef".into(),
        home_ccf_id: "operator-b.test".into(),
        aef_id: "aef-weather".into(),
        sel_security_method: v1::SecurityMethod::Psk as i32,
        aef_psk: vec![0x5A; 32],
        key_id: "0123456789abcdef".into(),
        remaining_validity_ms: 3_599_000,
        allowed_api_names: vec!["weather-v1".into(), "forecast-v1".into()],
        invoker_ca_certificates: vec![],
        interface_canonical: "aef-weather.operator-a.test:44321/aef-weather".into(),
    }
}

/// Encoded `FileDescriptorSet` of every `capif.v1` file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capif_descriptor");

/// The `domain` of every `google.rpc.ErrorInfo` our services return.
pub const ERROR_DOMAIN: &str = "capif.v1";
