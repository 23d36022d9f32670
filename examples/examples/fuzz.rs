//! The fuzz client: sends malformed and random envelopes to a dev-mode
//! runtime on loopback, checks every answer is a clean refusal, and reports
//! counts per error code and whether the server stayed up. Exits non-zero
//! on any violation.
//!
//! `cargo run -p macp-examples --example fuzz -- --iterations 2000 --seed 42`

use std::process::ExitCode;

use clap::Parser;
use macp_examples::cli::{fail, Connection};
use macp_examples::client::require_loopback;
use macp_examples::fuzz::{run, FuzzConfig};
use macp_examples::rng::Rng;

#[derive(Parser)]
#[command(about = "Sends malformed MACP envelopes and checks each is cleanly refused")]
struct Args {
    #[command(flatten)]
    connection: Connection,
    /// Requests to send.
    #[arg(long, default_value_t = 2000)]
    iterations: u64,
    /// Generator seed (default: from the clock; printed so the run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// The server's MACP_MAX_PAYLOAD_BYTES.
    #[arg(long, default_value_t = 1_048_576)]
    max_payload_bytes: usize,
    /// Also send up to 3 requests above the 4 MiB gRPC message limit.
    #[arg(long)]
    huge: bool,
    /// Print every case, not just violations.
    #[arg(long, short)]
    verbose: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = require_loopback(&args.connection.addr) {
        return fail(e);
    }
    let cfg = FuzzConfig {
        iterations: args.iterations,
        seed: args.seed.unwrap_or_else(Rng::seed_from_time),
        max_payload_bytes: args.max_payload_bytes,
        huge: args.huge,
    };
    println!("fuzzing {} with seed {} ({} requests)", args.connection.addr, cfg.seed, cfg.iterations);
    let agents = match args.connection.agents().await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let verbose = args.verbose;
    let report = run(&agents, &cfg, |c| {
        if verbose || c.violation.is_some() {
            println!(
                "#{:<6} {:<16} {:<55} -> {}{}",
                c.index,
                c.kind,
                c.detail.chars().take(55).collect::<String>(),
                c.outcome.label(),
                c.violation.as_ref().map(|v| format!("  VIOLATION: {v}")).unwrap_or_default()
            );
        }
    })
    .await;
    match report {
        Ok(r) => {
            println!("\n{}", r.render());
            if r.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}
