//! `macp-runtime`: the MACP gRPC server.
use clap::Parser;
use macp_transport_grpc::config::Config;
use macp_transport_grpc::server::{network_worker_threads, serve, shutdown_signal};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

/// mimalloc instead of glibc malloc: every request allocates many small,
/// short-lived strings and buffers, and the allocator was the largest single
/// cost in the kernel's profile (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cfg = match Config::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("macp-runtime: {e}");
            std::process::exit(2);
        }
    };
    // The network runtime: one worker per core, minus the core the
    // single-node driver's own thread takes (network_worker_threads), unless
    // TOKIO_WORKER_THREADS says otherwise (tokio reads it itself).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        runtime.worker_threads(network_worker_threads(&cfg, cores));
    }
    match runtime.build() {
        Ok(rt) => rt.block_on(run(cfg)),
        Err(e) => {
            eprintln!("macp-runtime: cannot start the network runtime: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(cfg: Config) {
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
