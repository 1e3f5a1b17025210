//! The building blocks every CAPIF crate of the workspace shares: identifiers, certificate
//! identities, the domain PKI, TLS and gRPC plumbing with their limits, the AEFPSK KDF, access
//! tokens and the AEF registry's data model. It holds no product: the CCF itself is the
//! `capif-ccf` crate (`ccf-core/ccf/`), which builds on this one like the gateway and the AEF do.
//!
//! How a request moves through a server built on it: a TLS connection is admitted by [`limits`]
//! and accepted by [`tls`] (which reads the peer's identity from its verified certificate via
//! [`identity`] and, on CAPIF-1e, exports the session binding); tonic routes the request to the
//! product's service, which gets the caller from [`grpc`], checks ids with [`ids`], derives keys
//! with [`kdf`] and answers with statuses built by [`grpc`].
//!
//! - [`ids`] — validated identifiers (`CcfId`, `ApiInvokerId`, `AefId`, `ApiName`, `KeyId`).
//! - [`identity`] — `capif://<domain>/<role>` identities in certificates.
//! - [`pki`] — the domain root CA and the certificates it issues.
//! - [`tls`] — rustls configs, the accept loop feeding tonic, the client connector.
//! - [`tls12`] — CAPIF-1e under the `tls12-annex-a` profile: TLS 1.2 over OpenSSL, both ends.
//! - [`keylog`] — `SSLKEYLOGFILE` for CAPIF-1e sessions (NSS format, 0600, only when set).
//! - [`status`] — error statuses with stable reasons, error chains.
//! - [`pg`] — PostgreSQL for stores: the `[store]` section, the pool, versioned migrations.
//! - [`grpc`] — caller identity, health + reflection, serving a listener, request budgets.
//! - [`limits`] — connection caps, idle timeouts and message limits of every listener.
//! - [`metrics`] — the `/metrics` listener, listener/handshake and certificate-expiry families.
//! - [`kdf`] — AEFPSK (TS 33.220 B.2.0, TS 33.122 A.1, the two CAPIF-1e profiles).
//! - [`registry`] — the AEF registry and the canonical interface string.
//! - [`token`] — method 3: access-token claims, scope, signing keys, verification.
//! - [`keysets`] — issuers' token key sets, cached per issuer with the refetch rule.
//! - [`clock`] — wall-clock milliseconds.
//! - [`delivery`] — revocation notice ids and the outboxes' retry schedule.
//! - [`config_file`] — reading a component's TOML file with errors that name file and line.
//! - [`process`] — what every binary shares: logging, signals, exit codes.
//! - [`telemetry`] — log lines with trace ids, OTLP span export, `traceparent` on every hop.
//! - [`audit`] — audit log lines written by a writer task off the request path, drops counted.
//! - `testing` — (tests only, feature `proptest`) the one configuration of every property test.

pub mod audit;
pub mod balance;
pub mod clock;
pub mod config_file;
pub mod delivery;
pub mod grpc;
pub mod identity;
pub mod ids;
pub mod kdf;
pub mod keylog;
pub mod keysets;
pub mod limits;
pub mod metrics;
pub mod pg;
pub mod pki;
pub mod process;
pub mod registry;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod tls12;
pub mod token;

#[cfg(any(test, feature = "proptest"))]
pub mod testing;

#[cfg(test)]
mod props;
