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
//! ## Layout: deciding and evolving
//!
//! * `admit` (private) decides: it checks an input against the
//!   configuration, the caller's grants and the state, and builds what the
//!   input makes happen as records.
//! * `state` (private) evolves: it applies records. It is the only code that
//!   changes a session, used by live admission and by recovery alike.
//! * [`query`] reads: typed questions ([`Query`]) with the read-access rule
//!   in one place ([`may_read`]).
//!
//! Imports run one way: admission and queries read the state; the state
//! knows neither. [`Kernel`] is the facade a driver owns.
//!
//! Modes plug in through [`mode::Mode`] / [`mode::ModeState`].
#![deny(missing_docs)]

mod admit;
pub mod commitment_hash;
pub mod config;
pub mod error;
pub mod io;
mod kernel;
pub mod mode;
pub mod policy;
pub mod query;
pub mod record;
pub mod session;
mod state;
pub mod text;
pub mod validate;
pub mod what_if;

pub use config::{KernelConfig, SessionIdPolicy};
pub use error::{ErrorCode, KResult, KernelError};
pub use io::{Accepted, Broadcast, ControlOp, Effect, Grants, Identity, Input, Reply, RequestId};
pub use kernel::Kernel;
pub use macp_wire;
pub use query::{may_read, may_read_metadata, Answer, ModeList, Query, SessionPage, SubscribePoint};
pub use state::ended::{Ended, EndedSessions, NoEnded};
pub use state::SnapshotError;

/// Whether an envelope of this type is ambient (Signal, Progress): outside
/// any session's history, never persisted, only broadcast.
pub fn is_ambient(message_type: &str) -> bool {
    admit::is_ambient(message_type)
}
