//! A complete `macp.mode.task.v1` session against a dev-mode runtime, every agent
//! played through dev identities; prints each envelope with its Ack, then
//! the final state. The script itself lives in `macp_examples::modes`.
//!
//! `cargo run -p macp-examples --example task -- --addr 127.0.0.1:50051`

#[tokio::main]
async fn main() -> std::process::ExitCode {
    macp_examples::cli::mode_main(macp_examples::modes::Mode::Task).await
}
