//! The test harness of the workspace, a dev-only crate: every crate's integration tests use it
//! through a normal `[dev-dependencies]` entry, and no binary links it.
//!
//! - [`federation`] — several operator domains in one process: per-domain CA, a real CCF, a real
//!   gateway, optionally the AEF stubs, and the testbed's DNS server; helpers that onboard
//!   invokers, obtain keys over CAPIF-1e and ask as an AEF.
//! - [`ccf`] — one CCF on loopback in a temporary state directory, clients that act like
//!   invokers, AEFs and gateways, and a `ccf` child process for crash tests.
//! - [`logs`] — per-test capture of the components' log lines.
//! - [`grpcurl`] — the real grpcurl, for tests that inspect servers the way users do.
//! - [`postgres`] — one real PostgreSQL server per test binary and a fresh database per test,
//!   for the store backends' test matrix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod ccf;
pub mod federation;
pub mod grpcurl;
pub mod logs;
pub mod postgres;
