//! A working AEF for testbeds (DESIGN.md §3; seeds 000 and 002): Authentication Initiation, a
//! real TLS-PSK endpoint, and one small demo API behind it.
//!
//! An invoker calls `AefSecurity.CheckAuthentication` ([`service`]); if the AEF holds no valid key
//! it asks its CCF (CAPIF-3; through the gateways for foreign invokers) and keeps the key in the
//! [`keys`] store with its own validity timer. The invoker then opens a TLS-PSK connection
//! ([`psk`]) whose identity ([`identity`]) names the invoker and the key id; after the handshake
//! the demo API serves only the APIs the invoker is authorized for.
//!
//! - [`config`] — TOML configuration.
//! - [`identity`] — the PSK identity format.
//! - [`keys`] — held keys, validity timers, open connections, revocation.
//! - [`psk`] — OpenSSL TLS-PSK server (accept loop feeding tonic) and client.
//! - [`service`] — AefSecurity and DemoApi.
//! - [`server`] — starting an AEF.

pub mod config;
pub mod identity;
pub mod keys;
pub mod psk;
pub mod server;
pub mod service;
