//! Logging and tracing set-up shared by the daemons (`kiln-worker`, `kiln-gateway`), and
//! W3C trace-context propagation over gRPC metadata so that a build's spans on the
//! gateway and on its worker form one trace.
//!
//! OTLP export (gRPC, through `opentelemetry-otlp`) is configured only by the standard
//! variables: it is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other `OTEL_*` variables, such as
//! `OTEL_BSP_SCHEDULE_DELAY`, apply as the SDK defines them). With neither set there is no
//! exporter, no OpenTelemetry layer and no propagator: [`extract`], [`set_parent`] and
//! [`inject`] then do nothing.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use tonic::codegen::http;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The variables that turn OTLP trace export on, most specific first.
pub const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP exporter could not be built from the environment.
    #[error("OTLP trace exporter for {endpoint}: {source}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed.
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(String),
}

/// Keeps the trace pipeline alive; dropping it flushes the spans not yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // The exporter's connection runs on the tokio runtime this may be dropped on:
            // flush from another thread so that runtime keeps running meanwhile.
            let flushed = std::thread::spawn(move || {
                p.shutdown_with_timeout(std::time::Duration::from_secs(5))
            })
            .join();
            if let Ok(Err(e)) = flushed {
                eprintln!("flushing traces: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs to stderr filtered by `filter` (RUST_LOG syntax)
/// and, when an OTLP endpoint variable is set, spans exported as `service`. Must run inside
/// a tokio runtime (the exporter's channel lives there).
pub fn init(service: &'static str, filter: &str) -> Result<Telemetry, Error> {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let filter = tracing_subscriber::EnvFilter::new(filter);
    let endpoint = ENDPOINT_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()));
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
            .map_err(|e| Error::Subscriber(e.to_string()))?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|source| Error::Exporter {
            endpoint: endpoint.clone(),
            source,
        })?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(service)))
        .try_init()
        .map_err(|e| Error::Subscriber(e.to_string()))?;
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// A remote parent read from a call's metadata (empty when there is none or tracing is
/// off).
#[derive(Debug, Clone)]
pub struct Parent(opentelemetry::Context);

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The trace context (`traceparent`, `tracestate`) a caller put in `metadata`.
pub fn extract(metadata: &MetadataMap) -> Parent {
    Parent(opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&MetadataExtractor(metadata))
    }))
}

/// Makes `span` a child of `parent` (a no-op when `parent` is empty).
pub fn set_parent(span: &tracing::Span, parent: Parent) {
    use opentelemetry::trace::TraceContextExt as _;
    if parent.0.span().span_context().is_valid() {
        let _ = span.set_parent(parent.0);
    }
}

/// Writes `span`'s trace context into the metadata of a call about to be forwarded, so the
/// callee's spans become its children.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// [`inject`] for a raw HTTP/2 request forwarded without decoding.
pub fn inject_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}
