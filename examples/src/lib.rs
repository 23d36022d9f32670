//! # macp-examples
//!
//! Runnable MACP clients for macp-rs, and the plumbing they share, so each
//! program under `examples/` is a few lines of intent rather than a copy of
//! the connection, authentication and envelope boilerplate.
//!
//! * [`client`]: connecting, dev-identity authentication, one client per agent.
//! * [`envelopes`]: envelope and payload builders with the versions a session needs.
//! * [`ids`]: session and message identifiers in the formats the runtime accepts.
//! * [`modes`]: one complete, valid session script per coordination mode.
//! * [`watch`]: following a session's stream and the session lifecycle.
//! * [`fuzz`]: malformed and random envelopes, and the check that each is cleanly refused.
//! * [`retention`]: the end-to-end check of what ended sessions still answer, run after a soak.
//! * [`bench`]: the closed-loop load generator behind the `macp-bench` binary.
//! * [`rng`]: a tiny seeded generator, so fuzz runs can be replayed.
//! * [`cli`]: the command-line flags the programs share.
//!
//! Every function here is also called by `tests/examples.rs` against an
//! in-process server, so the examples cannot silently rot.
#![deny(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod envelopes;
pub mod fuzz;
pub mod ids;
pub mod modes;
pub mod retention;
pub mod rng;
/// The deterministic simulator (`macp-sim`): clients, network, crashes and storage faults around the real kernel.
pub mod sim;
pub mod transcript;
pub mod watch;

/// The error type of the examples: anything printable, because every caller
/// either reports it to a human or fails a test with it.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results of the examples.
pub type Result<T, E = Error> = std::result::Result<T, E>;
