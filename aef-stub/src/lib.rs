//! A working AEF for testbeds (docs/PROTOCOL.md sections 7 and 9): Authentication Initiation, a
//! real TLS-PSK endpoint, and one small demo API behind it.
//!
//! An invoker calls `AefSecurity.CheckAuthentication` ([`service`]); if the AEF holds no valid key
//! it asks its CCF (CAPIF-3; through the gateways for foreign invokers) and keeps the key in the
//! [`keys`] store with its own validity timer. The invoker then opens a TLS-PSK connection
//! ([`psk`]) whose identity (`capif_2e::identity`) names the invoker and the key id; after the handshake
//! the demo API serves only the APIs the invoker is authorized for.
//!
//! Methods 2 and 3 share a second endpoint, rustls TLS 1.3: with a client certificate
//! ([`certauth`] checks it against the CAs the invoker's CCF named), or server-authenticated with
//! a bearer token on every call ([`token`] verifies it with the issuer's published keys).
//!
//! - [`config`] — TOML configuration.
//! - [`keys`] — held keys, validity timers, open connections, revocation.
//! - [`psk`] — OpenSSL TLS-PSK server (accept loop feeding tonic); the profiles and the invoker's
//!   side are `capif_2e::psk`, shared with the invoker client.
//! - [`certauth`] — method 2: the client-certificate verifier of the TLS endpoint.
//! - [`token`] — method 3: bearer-token verification and the issuers' key sets.
//! - [`service`] — AefSecurity and DemoApi.
//! - [`server`] — starting an AEF.
//! - [`metrics`] — the Prometheus families.
//! - `props` — (tests) property tests of the PSK callback's decision and the config file.

pub mod certauth;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod psk;
pub mod server;
pub mod service;
pub mod token;

#[cfg(test)]
mod props;
