//! The gRPC metadata the AEF's TLS endpoint (methods 2 and 3) reads besides the TLS session.

/// The API invoker a call names (method 2: it must be the one the client certificate names;
/// method 3: the token's subject).
pub const INVOKER_ID_HEADER: &str = "capif-api-invoker-id";

/// The metadata that carries a method-3 access token, as `Bearer <token>`.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The scheme of [`AUTHORIZATION_HEADER`].
pub const BEARER_PREFIX: &str = "Bearer ";
