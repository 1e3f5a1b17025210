//! The CAPIF core function (CCF) of one domain, and the building blocks the other crates reuse.
//!
//! How a request moves through it: a TLS connection is accepted by [`tls`] (which reads the
//! peer's identity from its verified certificate via [`identity`] and, on CAPIF-1e, exports the
//! session binding); tonic routes the request to a service in [`service`]; the service checks the
//! caller's role, consults the [`registry`] and the [`store`], derives keys with [`kdf`], and
//! answers with statuses built by [`grpc`].
//!
//! - [`ids`] — validated identifiers (`CcfId`, `ApiInvokerId`, `AefId`, `ApiName`).
//! - [`identity`] — `capif://<domain>/<role>` identities in certificates.
//! - [`pki`] — the domain root CA and the certificates it issues.
//! - [`tls`] — rustls configs, the accept loop feeding tonic, the client connector.
//! - [`grpc`] — error statuses with reasons, caller identity, health + reflection.
//! - [`limits`] — connection caps, idle timeouts and message limits of every listener.
//! - [`kdf`] — AEFPSK (TS 33.220 B.2.0, TS 33.122 A.1, our TLS 1.3 profile).
//! - [`registry`] — the AEF registry and the canonical interface string.
//! - [`store`] — invokers and security contexts in redb.
//! - [`token`] — method 3: access-token claims, scope, signing keys, verification.
//! - [`config`] — the TOML configuration.
//! - [`server`] — starting a CCF.
//! - [`testkit`] — helpers for the crates' integration tests (grpcurl).

pub mod config;
pub mod grpc;
pub mod identity;
pub mod ids;
pub mod kdf;
pub mod limits;
pub mod pki;
pub mod registry;
pub mod server;
pub mod service;
pub mod store;
pub mod testkit;
pub mod tls;
pub mod token;
