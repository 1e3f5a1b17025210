//! The CAPIF core function (CCF) of one domain: onboarding (CAPIF-1/1e), the domain CA in use,
//! security method negotiation and AEFPSK derivation (CAPIF-1e), security information for AEFs
//! (CAPIF-3), the CCF's side of interconnection (partner answers, forwarding of foreign invokers
//! to the gateway, revocation publishing), the token endpoint, and the store that makes every
//! acknowledged change durable. Built on the shared `ccf-core` library.
//!
//! How a request moves through it: `ccf_core::tls` accepts the connection and names the caller;
//! tonic routes the request to a service in [`service`]; the service checks the caller's role,
//! consults the registry (`ccf_core::registry`) and the [`store`], derives keys with
//! `ccf_core::kdf`, and answers with statuses built by `ccf_core::grpc`.
//!
//! - [`config`] — the TOML configuration.
//! - [`store`] — invokers and security contexts in redb.
//! - [`service`] — the gRPC services.
//! - [`server`] — starting a CCF.
//! - [`metrics`] — the Prometheus families.

pub mod config;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
