//! The user-facing side of a testbed.
//!
//! - [`invoker`] — the API invoker client (`capif invoker ...`).
//! - [`scenario`] — scenario files: format and validation.
//! - [`testbed`] — the launcher: PKI, configs, DNS, component processes.
//! - [`live`] — changing a running testbed's federation: partner lists, reloads, CA rotation.
//! - [`dns`] — the testbed's DNS server (hickory-server on loopback).
//! - [`runner`] — runs a scenario's steps, prints the table, writes the JSON report.
//! - [`otlp`] — the OTLP/gRPC trace receiver a scenario run points its components at.
//! - [`postgres`] — a real, throwaway PostgreSQL server for tests (and later the testbed).
//! - [`report`] — `report.html`: the steps and a sequence diagram of each cross-domain step.
//! - [`bench`] — `capif bench`: the gateway against a bare floor, as ratios.
//! - [`load`] — the steady invoker load `soak` and `chaos` drive.
//! - [`background`] — a scenario's background load (`load_start` .. `load_stop`) and its verdict.
//! - [`chaos`] — `capif chaos`: load plus seeded faults, judged by the [`checker`].
//! - [`checker`] — the chaos run's invariants over every outcome and the ledger.
//! - [`soak`] — `capif soak`: steady load, memory/fd/thread samples, growth bounds.
//!
//! The `capif` binary is a CLI over this library.

pub mod background;
pub mod bench;
pub mod chaos;
pub mod checker;
pub mod dns;
pub mod invoker;
pub mod live;
pub mod load;
pub mod otlp;
pub mod postgres;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod soak;
pub mod testbed;
