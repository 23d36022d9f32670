//! `macp-runtime`: the MACP gRPC server.
use clap::Parser;
use macp_transport_grpc::config::Config;
use macp_transport_grpc::server::{serve, shutdown_signal};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

/// mimalloc instead of glibc malloc: every request allocates many small,
/// short-lived strings and buffers, and the allocator was the largest single
/// cost in the kernel's profile (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    // Before anything else: from here on SIGINT/SIGTERM stop the process
    // cleanly (exit 0) instead of killing it.
    let shutdown = shutdown_signal();
    // RUST_LOG filters the log lines only: the OTLP exporter (when built in
    // and enabled) takes the request spans whatever the log level.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_filter(filter));
    #[cfg(feature = "otlp")]
    let _exporter = match macp_transport_grpc::otlp::layer_from_env() {
        Ok(Some((layer, exporter))) => {
            logs.with(layer).init();
            Some(exporter)
        }
        Ok(None) => {
            logs.init();
            None
        }
        Err(e) => {
            eprintln!("macp-runtime: {e}");
            std::process::exit(2);
        }
    };
    #[cfg(not(feature = "otlp"))]
    logs.init();
    let cfg = match Config::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("macp-runtime: {e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(cfg.bind_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("macp-runtime: cannot listen on {}: {e}", cfg.bind_addr);
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(cfg, listener, shutdown).await {
        eprintln!("macp-runtime: {e}");
        std::process::exit(1);
    }
}
