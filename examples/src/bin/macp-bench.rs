//! `macp-bench`: a closed-loop load generator for a local MACP runtime.
//! Prints a table and one JSON line; see `macp_examples::bench`.
//!
//! ```sh
//! cargo run --release -p macp-examples --bin macp-bench -- \
//!     --workload decision --concurrency 16 --duration 10s --warmup 2s
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use macp_examples::bench::{parse_duration, run, BenchConfig, Workload};
use macp_examples::client::{AuthMode, DEFAULT_ADDR};

#[derive(Parser)]
#[command(name = "macp-bench", about = "Closed-loop load generator for a local MACP runtime (loopback only)")]
struct Args {
    /// Runtime address; must resolve to loopback.
    #[arg(long, env = "MACP_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Concurrent closed-loop workers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Measured time (e.g. 10s, 500ms, 1m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// How dev identities are sent.
    #[arg(long, value_enum, default_value_t = AuthMode::AgentHeader)]
    auth: AuthMode,
    /// What each worker sends.
    #[arg(long, value_enum, default_value_t = Workload::Decision)]
    workload: Workload,
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let cfg = BenchConfig {
        addr: a.addr,
        concurrency: a.concurrency,
        connections: a.connections,
        duration: a.duration,
        warmup: a.warmup,
        auth: a.auth,
        workload: a.workload,
    };
    match run(cfg).await {
        Ok(r) => {
            print!("{}", r.table());
            println!("{}", r.json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("macp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
