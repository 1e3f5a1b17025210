//! The user-facing side of a testbed: the API invoker client ([`invoker`]), and (to come) the
//! testbed launcher and the scenario runner. The `capif` binary is a CLI over this library.

pub mod invoker;
