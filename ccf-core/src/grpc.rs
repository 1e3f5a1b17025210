//! What every gRPC server of the project shares: the caller's verified identity, a listener that
//! serves the given routes within its limits plus health and reflection (v1 and v1alpha: grpcurl
//! 1.8.6 only speaks v1alpha), and request budgets. Statuses with a stable reason are
//! [`crate::status`], re-exported here.

use std::future::Future;
use std::sync::Arc;

use capif_proto::v1::ErrorReason;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::{Code, Request, Status};

use crate::identity::PeerIdentity;
use crate::limits::{ConnGate, serve_builder_traced};
use crate::telemetry::PartnerTraces;
use crate::tls::{ConnInfo, tls_incoming};

pub use crate::status::{
    Refusal, UpstreamError, error_chain, error_reason, error_status, invalid_field, reason_of,
    status_with_reason,
};

/// The connection info of a request accepted by [`spawn_server`].
pub fn conn_info<T>(req: &Request<T>) -> Result<&ConnInfo, Status> {
    req.extensions().get::<ConnInfo>().ok_or_else(|| {
        error_status(
            Code::Internal,
            ErrorReason::InternalFault,
            "request did not arrive through the TLS accept loop",
        )
    })
}

/// The caller's identity, read from its verified client certificate.
pub fn caller<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let info = conn_info(req)?;
    let peer = info.peer.as_ref().ok_or_else(|| {
        error_status(
            Code::Unauthenticated,
            ErrorReason::RoleNotAllowed,
            "this service needs a client certificate",
        )
    })?;
    peer.identity.clone().map_err(|e| {
        error_status(
            Code::PermissionDenied,
            ErrorReason::RoleNotAllowed,
            format!("the client certificate names no usable identity: {e}"),
        )
    })
}

/// The full gRPC name of a service (`capif.v1.Gateway`), as health and reflection list it.
pub fn service_name<S: tonic::server::NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// Adds grpc.health.v1 (each of `names` SERVING; any other name NOT_FOUND) and server reflection
/// v1 + v1alpha listing exactly `names`, health and reflection itself: the descriptors of the
/// whole contract are loaded (so `describe` resolves every message), but a listener lists only
/// what it serves, not the services of other components that would answer `Unimplemented` here.
pub async fn with_standard_services(routes: Routes, names: &[&str]) -> Result<Routes, Status> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let refl = |b: tonic_reflection::server::Builder<'static>| {
        let b = b
            .register_encoded_file_descriptor_set(capif_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        names
            .iter()
            .fold(b, |b, name| b.with_service_name(name.to_string()))
    };
    let v1 = refl(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| Status::internal(e.to_string()))?;
    let v1alpha = refl(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| Status::internal(e.to_string()))?;
    // Their requests name a service or a symbol: a few KiB is plenty, whatever `[limits]` says.
    const SMALL: usize = 16 * 1024;
    Ok(routes
        .add_service(health.max_decoding_message_size(SMALL))
        .add_service(v1.max_decoding_message_size(SMALL))
        .add_service(v1alpha.max_decoding_message_size(SMALL)))
}

/// Serves `routes` on `listener` over TLS until `shutdown` completes, within the limits of
/// `gate` (connection caps, handshake and idle timeouts, streams and header sizes), each request
/// in a server span of its caller's trace.
pub fn spawn_server(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    export_binding: bool,
    routes: Routes,
    gate: Arc<ConnGate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    spawn_server_traced(
        listener,
        tls,
        export_binding,
        routes,
        gate,
        PartnerTraces::Continue,
        shutdown,
    )
}

/// [`spawn_server`] for a listener that faces partner domains, whose traces `partner` says to
/// continue or restart.
pub fn spawn_server_traced(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    export_binding: bool,
    routes: Routes,
    gate: Arc<ConnGate>,
    partner: PartnerTraces,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let mut builder = serve_builder_traced(gate.limits(), ConnInfo::activity_of, partner);
    let incoming = tls_incoming(listener, tls, export_binding, gate);
    tokio::spawn(
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown),
    )
}

/// A component's serving tasks (its listeners, and background tasks that follow them), stopped
/// together: each serves until [`ServerTasks::stopped`] completes, which [`ServerTasks::shutdown`]
/// brings about before it waits for them all.
#[derive(Debug)]
pub struct ServerTasks {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Default for ServerTasks {
    fn default() -> Self {
        Self {
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }
}

impl ServerTasks {
    /// Completes once [`Self::shutdown`] was called.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Serves `registry` on `listen`, when set, as one of these tasks (`GET /metrics`, stopped
    /// with the others); returns the bound address.
    pub async fn serve_metrics(
        &mut self,
        listen: Option<std::net::SocketAddr>,
        registry: Arc<crate::metrics::Registry>,
    ) -> std::io::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = listen else {
            return Ok(None);
        };
        let (bound, task) = crate::metrics::bind_and_serve(addr, registry, self.stopped()).await?;
        self.push(tokio::spawn(async move {
            let _ = task.await;
            Ok(())
        }));
        Ok(Some(bound))
    }

    /// Adds a task to stop and wait for.
    pub fn push(&mut self, task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
        self.tasks.push(task);
    }

    /// Aborts every task at once, as a crash would end them (tests).
    pub fn abort(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The time budget of a request: the caller's `grpc-timeout`, else `default`, never above `max`.
/// Outbound calls made on its behalf use what is left of it (docs/PROTOCOL.md 6.6).
pub fn budget<T>(
    req: &Request<T>,
    default: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(default)
        .min(max)
}

/// What a hop passes on of its budget: a small reserve stays behind so that a failure further
/// down comes back with its reason before this hop's own caller gives up.
pub fn inner_budget(budget: std::time::Duration) -> std::time::Duration {
    let reserve = (budget / 10).min(std::time::Duration::from_millis(200));
    budget.saturating_sub(reserve)
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
