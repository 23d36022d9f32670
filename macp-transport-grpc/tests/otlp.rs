//! OTLP export (cargo feature `otlp`, issue 14 item 3): the real binary,
//! started with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a collector served
//! here (the OTLP/gRPC trace service, from the OpenTelemetry project's
//! protobuf definitions), exports a span for a request that carried a
//! `traceparent` in the caller's trace, with the caller's span as its
//! parent; and a span of its own trace for a request that carried none.
#![cfg(feature = "otlp")]

mod common;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use macp_wire::v1::GetSessionRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A collector: every exported span, with its service name.
struct Collector(mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let _ = self.0.send((service.clone(), span));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Kills the server however the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn request_spans_are_exported_in_the_callers_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (tx, mut spans) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_macp-runtime"))
            .args(["--dev", "--memory-only", "--bind-addr", &format!("127.0.0.1:{port}")])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_addr}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the server binary starts"),
    );
    let channel = connect_when_up(port).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let mut traced = macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
        channel.clone(),
        Auth::Headers(vec![("x-macp-agent-id", "alice".into()), ("traceparent", traceparent)]),
    );
    let mut plain = macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
        channel,
        Auth::Agent("alice".into()),
    );
    // One traced call and one untraced; both are answered NOT_FOUND.
    let e = traced.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = plain.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Both spans arrive (in whichever batches the exporter sends them).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut child_of_caller, mut own_trace) = (None, None);
    while child_of_caller.is_none() || own_trace.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (service, span) = tokio::time::timeout(left, spans.recv())
            .await
            .expect("the server exports both request spans within 30 s")
            .expect("the collector runs");
        assert!(service.contains("macp-runtime"), "service.name: {service}");
        let rpc = span.attributes.iter().find(|a| a.key == "rpc").map(|a| format!("{:?}", a.value));
        if span.name != "request" || !rpc.is_some_and(|r| r.contains("GetSession")) {
            continue;
        }
        if hex(&span.trace_id) == TRACE_ID {
            child_of_caller = Some(span);
        } else {
            own_trace = Some(span);
        }
    }
    let child = child_of_caller.unwrap();
    assert_eq!(hex(&child.parent_span_id), PARENT_ID, "the caller's span is the parent");
    assert_eq!(child.span_id.len(), 8);
    assert_ne!(hex(&child.span_id), PARENT_ID, "a span of the server's own");
    let own = own_trace.unwrap();
    assert!(own.parent_span_id.is_empty(), "no traceparent: a root span");
    assert_eq!(own.trace_id.len(), 16);
    assert_ne!(hex(&own.trace_id), TRACE_ID);
}

/// Connects once the server listens.
async fn connect_when_up(port: u16) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let endpoint = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        match endpoint.connect().await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the server did not listen within 60 s: {e}"),
        }
    }
}
