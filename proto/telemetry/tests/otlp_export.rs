//! Traces reach an OTLP/gRPC receiver, without the transport's own spans.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Receiver {
    span_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut names = self.span_names.lock().unwrap();
        for resource in &request.get_ref().resource_spans {
            for scope in &resource.scope_spans {
                names.extend(scope.spans.iter().map(|s| s.name.clone()));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_without_transport_noise() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let provider =
        steward_telemetry::otlp_tracer_provider("steward-test", &format!("http://{addr}")).unwrap();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("steward-test"))
        .with_filter(steward_telemetry::export_filter());
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::info_span!("enroll_node", node = "n1").in_scope(|| {
            tracing::info!("inside");
        });
        tracing::info_span!(target: "h2", "h2_frame").in_scope(|| {});
    });
    let flush = tokio::task::spawn_blocking(move || provider.shutdown());
    flush.await.unwrap().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names = receiver.span_names.lock().unwrap().clone();
        if names.iter().any(|n| n == "enroll_node") {
            assert!(
                !names.iter().any(|n| n == "h2_frame"),
                "transport span exported: {names:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no span received; got {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
