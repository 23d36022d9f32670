//! OTLP export of request spans (cargo feature `otlp`, off by default).
//!
//! Built with `--features otlp` and started with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set (for example
//! `http://otel-collector:4317`), the server sends a span for every request
//! to an OpenTelemetry collector over OTLP/gRPC. A request that carries a
//! W3C `traceparent` gets a span whose parent is the caller's span, so the
//! collector shows the runtime's work inside the agent's own trace; one
//! without it starts a trace of its own. The standard `OTEL_*` variables
//! the OpenTelemetry SDK reads apply (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_SERVICE_NAME`, …).
//!
//! Why a feature and not always on: the OpenTelemetry crates add about a
//! dozen crates to the build, and most deployments read the trace ids from
//! the log (see [`crate::trace_context`]). Why these crates: `opentelemetry`
//! with its SDK and OTLP exporter are the OpenTelemetry project's own, and
//! `tracing-opentelemetry` (the tokio project's) turns the server's
//! existing `tracing` spans into OpenTelemetry spans, so no span is written
//! twice. The exporter uses the tonic already in the tree.
//!
//! Spans are batched and sent from a background thread: a collector that is
//! slow or down costs dropped spans (logged by the SDK), never a request.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::trace_context::TraceParent;

/// The variable that turns export on.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Set once the exporter is installed: every request then gets a span.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (requests without a `traceparent` get a
/// span of their own only then).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace export ({ENDPOINT_VAR}): {0}")]
pub struct OtlpError(#[from] opentelemetry_otlp::ExporterBuildError);

/// The exporter while it runs: dropping it sends the spans still batched
/// and stops it.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            eprintln!("macp-runtime: OTLP exporter shutdown: {e}");
        }
    }
}

/// The `tracing` layer that exports spans, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or the traces-only variant) is set; `Ok(None)` otherwise. Must be called
/// inside the tokio runtime (the gRPC channel lives on it).
pub fn layer_from_env<S>() -> Result<Option<(impl Layer<S>, Exporter)>, OtlpError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    if !set(ENDPOINT_VAR) && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let mut resource = Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("macp-runtime");
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    let tracer = provider.tracer("macp-runtime");
    EXPORTING.store(true, Ordering::Relaxed);
    // The server's own request spans only (crate::trace_context), at any
    // log level: not the spans of the libraries underneath.
    let spans = Targets::new().with_target("macp_transport_grpc", Level::INFO);
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
    Ok(Some((layer, Exporter { provider })))
}

/// Makes the caller's span (from its `traceparent`) the parent of `span`.
pub fn set_remote_parent(span: &Span, tp: &TraceParent<'_>) {
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(tp.trace_id), SpanId::from_hex(tp.parent_id)) else {
        return;
    };
    let remote = SpanContext::new(trace_id, span_id, TraceFlags::new(tp.flags), true, TraceState::default());
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}
