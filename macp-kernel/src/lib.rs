//! # macp-kernel
//!
//! The deterministic heart of macp-rs: a sans-IO implementation of the
//! Multi-Agent Coordination Protocol's session rules.
//!
//! A driver owns one [`Kernel`] and runs this loop:
//!
//! ```text
//! loop {
//!     input  = next request, or Input::Tick when kernel.next_deadline() is due
//!     effects = kernel.handle(now_ms, input)
//!     for each Effect::Persist  -> append to storage; make durable (group commit)
//!     then each Effect::Reply   -> answer the caller
//!     then each Effect::Broadcast -> streams and watchers
//! }
//! ```
//!
//! The kernel performs no I/O, reads no clock (`now_ms` is passed in), uses no
//! randomness and iterates no hash map into an output: the same inputs give
//! byte-identical effects. Every accepted fact leaves as a storage
//! [`macp_wire::storage::Record`]; [`Kernel::apply_record`] replays records
//! through the same code that accepted them, which is how recovery works.
//!
//! Modes plug in through [`mode::Mode`] / [`mode::ModeState`].
#![deny(missing_docs)]

mod apply;
pub mod commitment_hash;
pub mod config;
pub mod error;
pub mod io;
mod kernel;
pub mod mode;
pub mod policy;
pub mod record;
pub mod session;
mod snapshot;
pub mod validate;

pub use config::{KernelConfig, SessionIdPolicy};
pub use error::{ErrorCode, KResult, KernelError};
pub use io::{Broadcast, ControlOp, Effect, Grants, Identity, Input, Reply, RequestId};
pub use kernel::{error_ack, is_ambient, Kernel};
pub use macp_wire;
pub use snapshot::SnapshotError;
