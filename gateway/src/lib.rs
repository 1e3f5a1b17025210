//! The interconnect federation gateway of one CAPIF domain: the only endpoint a partner domain
//! ever talks to (docs/PROTOCOL.md section 6; TR 33.700-22 solution #13).
//!
//! A request for a foreign invoker moves like this: the own CCF calls `Gateway` on the CAPIF-6
//! listener ([`service`]); the [`cache`] answers or makes one upstream call through the partner's
//! [`partner`] link, which [`discovery`] locates (DNS SRV or static) and [`trust`] authenticates
//! (partner CA + partner identity); the partner gateway's `Interconnect` service asks its own CCF
//! on the caller's behalf. Revocations flow back the same way, pushed.
//!
//! - [`config`] — TOML configuration.
//! - [`credentials`] — the gateway's own certificates, in resolvers a reload swaps.
//! - [`trust`] — who a partner is: per-partner CA and identity checks, both directions.
//! - [`discovery`] — SRV lookup with priority/weight, static addresses.
//! - [`partner`] — one reused channel per partner, failover, deadlines, retry budget, state.
//! - [`partners`] — the current federation (trust + link per partner), swapped whole by a reload;
//!   the CAPIF-6e client verifier that asks it.
//! - [`cache`] — validity-bound moka cache with coalescing and negative entries.
//! - [`reload`] — live reconfiguration: load, diff, apply or refuse as a whole; file poll.
//! - [`store`] — fetch records, the revocation outbox and the notices seen (redb, survives a restart).
//! - [`outbox`] — delivering the outbox: retries with backoff until acknowledged or moot.
//! - [`state`] — what the services share.
//! - [`metrics`] — the Prometheus families: per-partner ones written from the current federation.
//! - [`service`] — `Gateway`, `Interconnect`, `GatewayAdmin`.
//! - [`server`] — starting a gateway.

pub mod cache;
pub mod config;
pub mod credentials;
pub mod discovery;
pub mod metrics;
pub mod outbox;
pub mod partner;
pub mod partners;
pub mod reload;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod trust;
