//! gRPC health (`grpc.health.v1`, what Kubernetes gRPC probes and load balancers ask) and
//! reflection (v1 and v1alpha, so `grpcurl list` works without proto files), shared by the
//! sidecar's Cache API listener and the origin's Feed listener.

use std::pin::Pin;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tonic_reflection::server::v1alpha::{
    ServerReflection as ServerReflectionAlpha,
    ServerReflectionServer as ServerReflectionAlphaServer,
};

/// The descriptor set of viewcar's protos, written by build.rs.
const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/viewcar_descriptor.bin"));

fn builder(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for s in services.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        b = b.with_service_name(*s);
    }
    b
}

/// The reflection services, v1 and v1alpha (older grpcurl and grpcui ask v1alpha), listing
/// `services` besides health and reflection: only what the listener really serves.
#[allow(clippy::expect_used)] // infallible: see below
pub(crate) fn reflection(
    services: &[&str],
) -> (
    ServerReflectionServer<impl ServerReflection>,
    ServerReflectionAlphaServer<impl ServerReflectionAlpha>,
) {
    // Both builds only parse the descriptor sets compiled in above, which build.rs produced
    // from protos that compiled; a failure is a build defect, caught by every test that starts
    // a server.
    let v1 = builder(services)
        .build_v1()
        .expect("compiled-in descriptor sets are valid");
    let alpha = builder(services)
        .build_v1alpha()
        .expect("compiled-in descriptor sets are valid");
    (v1, alpha)
}

/// A health service whose overall status ("") and `service`'s status start NOT_SERVING; the
/// caller flips them with [`set_serving`] once ready. Its Watch streams end when `shutdown`
/// flips, so that an open health watch does not hold the server's graceful drain.
pub(crate) async fn health(
    service: &str,
    shutdown: watch::Receiver<bool>,
) -> (HealthReporter, HealthServer<DrainingHealth>) {
    let reporter = HealthReporter::new();
    set_serving(&reporter, service, false).await;
    let inner = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(DrainingHealth { inner, shutdown }),
    )
}

/// `grpc.health.v1.Health`: tonic-health's service, with Watch streams bounded by shutdown.
pub(crate) struct DrainingHealth {
    inner: HealthService,
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl HealthApi for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut shutdown = self.shutdown.clone();
        let until = async move { crate::signalled(&mut shutdown).await };
        // At the shutdown signal the stream ends with NOT_SERVING (set just before the signal,
        // but the update could lose the race with the end): a watcher always hears it.
        let last = futures_util::stream::once(async {
            Ok(HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
            })
        });
        Ok(Response::new(Box::pin(
            statuses.take_until(until).chain(last),
        )))
    }
}

/// Sets the overall status and `service`'s status.
pub(crate) async fn set_serving(reporter: &HealthReporter, service: &str, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(service, status).await;
}
