//! Logging and trace export shared by Steward's binaries.
//!
//! Logs go to stderr through `tracing` (filter with `RUST_LOG`). Traces are exported over
//! OTLP/gRPC only when an endpoint is configured; transport-internal spans (tonic, h2, hyper,
//! tower) are filtered out of the export so traces show Steward's own work.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
}

/// Telemetry settings common to every binary.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// `service.name` of exported traces.
    pub service_name: &'static str,
    /// OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`); `None` disables export.
    pub otlp_endpoint: Option<String>,
}

/// Flushes exported spans when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Builds the OTLP tracer provider alone (the caller wires it into a subscriber).
pub fn otlp_tracer_provider(
    service_name: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}

/// The export filter: Steward's spans at `info` and above, transport internals never.
pub fn export_filter() -> EnvFilter {
    EnvFilter::new("info,h2=off,tonic=off,hyper=off,hyper_util=off,tower=off,sqlx=off")
}

/// Installs the global subscriber. Must run inside a Tokio runtime when OTLP is enabled.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tonic=warn,hyper=warn,sqlx=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter);
    let (otel, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let provider = otlp_tracer_provider(config.service_name, endpoint)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(config.service_name))
                .with_filter(export_filter());
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// Displays an error with its whole source chain (`outer: cause: root cause`), which is how
/// every error is logged.
pub fn chain<'a>(err: &'a (dyn std::error::Error + 'static)) -> ErrorChain<'a> {
    ErrorChain(err)
}

pub struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_shows_every_cause() {
        let err = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(chain(&err).to_string(), "outer: disk on fire");
    }
}
