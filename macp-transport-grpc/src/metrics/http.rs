//! The metrics endpoint: HTTP/1 on its own port, for Prometheus and
//! orchestrators.
//!
//! - `GET /metrics`: the registry in the Prometheus text format.
//! - `GET /healthz`: 200 while the process serves this port (liveness).
//! - `GET /readyz`: 503 until storage is recovered and the gRPC server is
//!   serving, 200 after (readiness).
//!
//! It starts before recovery, so an orchestrator sees a live process that
//! is not yet ready during a long recovery. Bounded: at most
//! [`MAX_CONNECTIONS`] connections at once (further ones wait in the
//! listener's backlog), and a client gets [`HEADER_TIMEOUT`] to send its
//! request head. Requests are answered from the path alone; nothing a
//! client sends can make it panic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use super::Metrics;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the endpoint on `listener` until the returned future is dropped
/// (the server aborts its task when it stops).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&metrics, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!("metrics endpoint: connection from {peer}: {e}");
            }
            drop(permit);
        });
    }
}

/// The answer to one request.
fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
            );
            r
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" if metrics.is_ready() => plain(StatusCode::OK, "ready\n"),
        "/readyz" => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: recovering storage or starting\n"),
        _ => plain(StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
