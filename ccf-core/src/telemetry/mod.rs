//! What a component says about its work, and how one request is followed across processes and
//! domains: the process's tracing subscriber (log lines on stderr, text or JSON, each carrying
//! the W3C trace id of the request it belongs to), OpenTelemetry spans exported over OTLP/gRPC
//! when an endpoint is configured, and W3C `traceparent` propagation as gRPC metadata on every
//! hop.
//!
//! How it fits: every binary calls [`init`] once (after reading its configuration, inside its
//! async runtime: the OTLP exporter is a tonic client) and holds the [`TelemetryGuard`] until it
//! stops, which flushes the spans not yet exported. Every server built by
//! [`crate::grpc::spawn_server`] / [`crate::limits::serve_builder`] runs [`ServerTraceLayer`],
//! which continues the caller's trace (or, at a partner boundary configured to restart, starts a
//! new one linked to it) and opens the server span `<grpc service>/<method>`; every client
//! channel of a product is a [`TracedChannel`], which opens the client span and injects the
//! context. Spans always get trace and span ids (an SDK tracer provider, sampled parent-based,
//! always on at the root), so logs carry trace ids even when nothing is exported; without an
//! endpoint no span leaves the process.
//!
//! - `logs` — [`LogLine`], the one log line format (fields documented in docs/OPERATIONS.md,
//!   "Logs").
//! - `rpc` — propagation ([`extract`], [`inject`]), [`ServerTraceLayer`], [`TracedChannel`],
//!   [`HandshakeTrace`].
//! - `notices` — [`NoticeTraces`]: a revocation notice's trace across the durable outboxes.

mod logs;
mod notices;
mod rpc;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::Deserialize;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use logs::LogLine;
pub use notices::NoticeTraces;
pub use rpc::{
    ClientChannel, HandshakeTrace, ServerTraceLayer, ServerTraceService, TracedChannel,
    current_trace_id, extract, inject, trace_id_of,
};

use crate::process::LogFormat;

/// `service.name` of the CCF.
pub const CCF: &str = "ccf";
/// `service.name` of the gateway.
pub const GATEWAY: &str = "capif-gateway";
/// `service.name` of the AEF.
pub const AEF: &str = "aef-stub";
/// `service.name` of the `capif` tool, whose invoker client is the invoker in a trace.
pub const INVOKER: &str = "capif";

/// `[telemetry]` of the CCF and the AEF (the gateway's adds `partner_traces`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint spans are exported to (`http://host:4317`). Unset: nothing is exported.
    pub otlp_endpoint: Option<String>,
}

/// What a gateway does with trace context at its partner boundary (`[telemetry]
/// partner_traces`): `continue` the partner's trace and send ours, or `restart`: send nothing
/// of ours to the partner and start a new trace for what a partner asks, linked to the
/// partner's context (an OTel span link) so the two can still be correlated locally.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartnerTraces {
    /// One trace across both domains (the default: testbeds and operators' joint debugging).
    #[default]
    Continue,
    /// A new trace at the boundary, in both directions.
    Restart,
}

/// Who is speaking: the resource attributes of every exported span.
#[derive(Clone, Debug)]
pub struct ServiceIdentity {
    /// `service.name`: [`CCF`], [`GATEWAY`], [`AEF`] or [`INVOKER`].
    pub name: &'static str,
    /// `service.namespace`: the component's domain (its CCF id), where it has one.
    pub namespace: Option<String>,
    /// `service.instance.id`: the AEF id of an AEF.
    pub instance_id: Option<String>,
}

impl ServiceIdentity {
    /// A service with only its name.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            namespace: None,
            instance_id: None,
        }
    }

    /// With its domain.
    pub fn in_domain(mut self, domain: impl Into<String>) -> Self {
        self.namespace = Some(domain.into());
        self
    }

    /// With its instance id.
    pub fn instance(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    fn resource(&self) -> Resource {
        let mut attrs = Vec::with_capacity(2);
        if let Some(ns) = &self.namespace {
            attrs.push(KeyValue::new("service.namespace", ns.clone()));
        }
        if let Some(id) = &self.instance_id {
            attrs.push(KeyValue::new("service.instance.id", id.clone()));
        }
        Resource::builder()
            .with_service_name(self.name)
            .with_attributes(attrs)
            .build()
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not a URL the exporter can use.
    #[error(
        "OTLP endpoint {0:?} is not usable: give http://host:port of an OTLP/gRPC receiver (plain HTTP/2, e.g. a local collector; https is not built in)"
    )]
    Endpoint(String),
    /// The exporter could not be built.
    #[error("cannot set up the OTLP exporter for {endpoint}: {why}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        why: String,
    },
    /// Another subscriber was installed first.
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
}

/// Keeps the span pipeline of the process; flushes what is not exported yet when it is shut
/// down or dropped (at most 5 s).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans leave the process.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports what is pending now (blocking: call it off the async workers), keeping the
    /// pipeline; a run that reads its own spans back (the scenario report) needs them out first.
    pub fn flush(&self) {
        if let (Some(p), true) = (&self.provider, self.exporting) {
            let _ = p.force_flush();
        }
    }

    /// Exports what is pending and stops the pipeline.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Nothing to flush without an exporter; with one, a receiver that went away must
            // not hold the process's exit for long.
            if self.exporting {
                let _ = p.shutdown_with_timeout(Duration::from_secs(5));
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `url` is an endpoint the OTLP/gRPC exporter of this build can reach.
pub fn check_endpoint(url: &str) -> Result<(), TelemetryError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| TelemetryError::Endpoint(url.to_string()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || tonic::transport::Endpoint::from_shared(url.to_string()).is_err() {
        return Err(TelemetryError::Endpoint(url.to_string()));
    }
    Ok(())
}

/// A per-layer filter that depends on a callsite's metadata only, so that its decision is cached
/// per callsite (a `filter_fn` is asked again at every span and event).
fn static_filter<S>(
    pred: impl Fn(&Metadata<'_>) -> bool + Clone + Send + Sync + 'static,
) -> impl Filter<S> {
    let p = pred.clone();
    DynFilterFn::new(move |m, _| pred(m)).with_callsite_filter(move |m| {
        if p(m) {
            Interest::always()
        } else {
            Interest::never()
        }
    })
}

/// The log lines' filter: `RUST_LOG` if set, else `default_filter`.
fn log_filter(default_filter: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
}

fn fmt_layer<S>(
    format: LogFormat,
) -> tracing_subscriber::fmt::Layer<
    S,
    tracing_subscriber::fmt::format::DefaultFields,
    LogLine,
    fn() -> std::io::Stderr,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(LogLine::new(format))
}

/// Installs the process's subscriber: log lines on stderr in `format` (`RUST_LOG` if set, else
/// `default_filter`), and spans for `service` (info and above, whatever `RUST_LOG` says: a quiet
/// log must not break a trace), exported to `otlp_endpoint` when given. Call it inside the
/// async runtime when an endpoint is given.
pub fn init(
    service: &ServiceIdentity,
    otlp_endpoint: Option<&str>,
    format: LogFormat,
    default_filter: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(service.resource())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    if let Some(url) = otlp_endpoint {
        check_endpoint(url)?;
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: url.to_string(),
                why: e.to_string(),
            })?;
        let mut batch = BatchConfigBuilder::default();
        // A span shows up within a second unless the operator chose otherwise.
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(Duration::from_secs(1));
        }
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch.build())
                .build(),
        );
    }
    let provider = builder.build();
    let exporting = otlp_endpoint.is_some();
    // Spans at info and above, whatever RUST_LOG says. Log lines become span events only when
    // someone will read them: without an exporter they would be built for nothing.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("capif"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(static_filter(move |m| {
            *m.level() <= Level::INFO && (exporting || m.is_span())
        }));
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt_layer(format).with_filter(log_filter(default_filter)))
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard {
        provider: Some(provider),
        exporting: otlp_endpoint.is_some(),
    })
}

/// Installs a subscriber with log lines only (tools that serve nothing: `ccf kdf`, `ccf pki`).
pub fn init_logs_only(format: LogFormat, default_filter: &str) {
    let _ = tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(log_filter(default_filter)))
        .try_init();
}
