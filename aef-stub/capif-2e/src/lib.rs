//! CAPIF-2e as both of its ends speak it: what the invoker client and the AEF must agree on, in
//! one place. A shared library: the AEF (`aef-stub`) and the invoker client (`capif-scenarios`)
//! import it, and neither imports the other.
//!
//! - [`identity`] — the PSK identity `3GPP-CAPIF-AEFPSK/<home-ccf-id>/<api-invoker-id>/<key-id>`.
//! - [`psk`] — the TLS-PSK profiles and the invoker's side of the handshake.
//! - [`headers`] — the gRPC metadata names of the AEF's TLS endpoint.

pub mod headers;
pub mod identity;
pub mod psk;
